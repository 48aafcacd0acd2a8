"""The fuzz test's generators and invariants, for N minutes, against the proxy as a process.

    .venv/bin/python bench/fuzz.py --minutes 10 [--include-known] [--seed N]

Runs ``sticky-proxy run`` (``python -m proxy run``, uvloop, the build installed in .venv) on a
catch-all VirtualService with a cookie-hash DestinationRule in front of two strict h11 backends
(tests/fuzz_http.py), then throws hypothesis-generated connections at it until the time is up:
rounds of 200 random cases, each failure shrunk by hypothesis to a minimal case and printed
with its bytes. ``--include-known`` also generates the known-defect families (KNOWN_DEFECTS),
to see them fire. Prints the cases run, the failures, and the proxy's RSS and open file
descriptors at the start and the end (its upstream keep-alive connections count among them).
Exit status 1 when a failure was found.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_http import KNOWN_DEFECTS, Harness, active_defects, cases, compiled, report  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import FlakyFailure  # noqa: E402
from proxy_process import OPS_LOCAL, OPS_PORTS, ProxyProcess, proxy_process  # noqa: E402

ROUND = 200  # cases per hypothesis run; a failure ends its round (after shrinking)


class Found(Exception):
    """A broken invariant, with the case in words (hypothesis shrinks it before it reaches us)."""


def process_figures(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a process, from /proc."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def open_sockets(pid: int) -> list[str]:
    """The TCP sockets a process holds, as "local -> remote state" (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[9] in inodes:
            local, remote = (_address(x) for x in parts[1:3])
            found.append(f"{local} -> {remote} {states.get(parts[3], parts[3])}")
    return found


def _address(hex_address: str) -> str:
    ip, port = hex_address.split(":")
    return f"{socket.inet_ntoa(bytes.fromhex(ip)[::-1])}:{int(port, 16)}"


class ProcessHarness(Harness):
    """The harness with the proxy in a subprocess; its ERROR lines are the logged errors."""

    def __init__(self, config_dir: Path) -> None:
        super().__init__(in_process=False)
        self.config_dir = config_dir
        self.process: ProxyProcess | None = None
        self._stack = contextlib.AsyncExitStack()
        self._seen_lines = 0

    def __enter__(self) -> ProcessHarness:
        super().__enter__()
        self.write_config(self.config_dir)
        self.process = self.call(self._start())
        self.port = self.call(self.process.port(""))
        for name in ("admin", "readiness", "metrics"):
            self.call(self.process.port(name))  # every listener is open before the first count
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._stack.aclose())
        super().__exit__(*exc)

    async def _start(self) -> ProxyProcess:
        args = (str(self.config_dir), "--listen", "127.0.0.1:0", "--access-log", "off")
        return await self._stack.enter_async_context(proxy_process(*args, *OPS_PORTS, *OPS_LOCAL))

    def proxy_errors(self) -> list[str]:
        assert self.process is not None
        lines = self.process.lines[self._seen_lines :]
        self._seen_lines += len(lines)
        if self.process.proc.returncode is not None:
            return [f"the proxy exited with {self.process.proc.returncode}"]
        return [line.rstrip() for line in lines if " ERROR " in line or "Traceback" in line]


def _key(problem: str) -> str:
    """A failure's kind: a broken invariant without the numbers and quoted bytes."""
    return re.sub(r"\d+|b'[^']*'|b\"[^\"]*\"", "#", problem.strip(" -"))[:120]


def _record(failures: dict[str, str], message: str, how: str) -> None:
    kind = _key(message.splitlines()[1])  # the report's first broken invariant
    if kind not in failures:
        failures[kind] = message
        print(f"\nFAILURE {len(failures)} ({how}):\n{message}\n", flush=True)


def run(minutes: float, include_known: bool, first_seed: int) -> int:
    known = active_defects(include_known)
    deadline = time.monotonic() + minutes * 60
    failures: dict[str, str] = {}  # kind -> the shrunk report
    counts: collections.Counter[str] = collections.Counter()  # failing cases of each kind
    rounds = 0
    with tempfile.TemporaryDirectory() as tmp, ProcessHarness(Path(tmp)) as harness:
        assert harness.process is not None
        pid = harness.process.proc.pid
        rss0, fds0 = process_figures(pid)
        sockets0 = open_sockets(pid)
        print(
            f"proxy pid {pid} ({'compiled' if compiled() else 'interpreted'} build) on port "
            f"{harness.port}: RSS {rss0:.1f} MB, {fds0} fds at the start"
        )
        print(f"known defects left out: {', '.join(sorted(known)) or 'none'}", flush=True)
        started = time.monotonic()
        next_report = started + 60

        @settings(
            max_examples=ROUND,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
            report_multiple_bugs=False,
        )
        @given(case=cases(known))
        def one(case: Any) -> None:
            if time.monotonic() > deadline:
                return  # the round ends fast once the time is up
            problems = harness.run(case)
            if problems:
                kind = _key(problems[0])
                counts[kind] += 1
                if kind not in failures:  # a new kind: let hypothesis shrink it
                    raise Found(report(case, problems))

        while time.monotonic() < deadline:
            rounds += 1
            try:
                seed(first_seed + rounds)(one)()
            except Found as exc:
                _record(failures, str(exc), "shrunk")
            except FlakyFailure as exc:  # failed, then passed when hypothesis ran it again
                for inner in exc.exceptions:
                    _record(failures, str(inner), "flaky: it did not fail every time")
            if time.monotonic() >= next_report:
                next_report += 60
                rss, fds = process_figures(pid)
                print(
                    f"{(time.monotonic() - started) / 60:4.1f} min: {harness.cases} cases, "
                    f"{len(failures)} kinds of failure; proxy RSS {rss:.1f} MB, {fds} fds",
                    flush=True,
                )
        elapsed = time.monotonic() - started
        rss1, fds1 = process_figures(pid)
        print(
            f"\n{harness.cases} cases in {elapsed:.0f} s ({harness.cases / elapsed:.0f}/s, "
            f"{rounds} rounds of up to {ROUND}, shrinking included); "
            f"{len(failures)} kinds of failure"
        )
        for kind, count in counts.most_common():
            print(f"  {count:6d} failing cases: {kind}")
        print(
            f"proxy RSS {rss0:.1f} -> {rss1:.1f} MB, fds {fds0} -> {fds1} "
            f"(backend connections open: {harness.backend.connections})"
        )
        for sock in sorted(set(open_sockets(pid)) - set(sockets0)):
            print(f"  open at the end, not at the start: {sock}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to fuzz (5)")
    parser.add_argument(
        "--include-known",
        action="store_true",
        help=f"also generate the known defects ({', '.join(KNOWN_DEFECTS)})",
    )
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = parser.parse_args()
    print(f"bench/fuzz.py --minutes {args.minutes} --seed {args.seed}")
    return run(args.minutes, args.include_known, args.seed)


if __name__ == "__main__":
    sys.exit(main())
