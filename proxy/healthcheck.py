"""The container's HEALTHCHECK: ask ``/healthz/ready`` where the running proxy was told to serve it.

A Dockerfile's HEALTHCHECK is fixed when the image is built, while the readiness port is chosen
when it runs (``--readiness-port``, ``--ops-address``), so a check that probes 15021 marks a
proxy unhealthy as soon as it is given another port. ``python -m proxy.healthcheck`` reads the
command line of the proxy in the container from ``/proc`` instead: the lowest-numbered
``sticky-proxy run`` (or ``demo``) process that is not a worker (PID 1 in a plain container; the
supervisor with ``--workers``; the child of ``docker run --init``'s init), parsed with the CLI's
own parser.
It probes ``/healthz/ready`` on that port and exits 0 (healthy) on a 200, 1 (unhealthy)
otherwise, printing one line that Docker keeps in ``docker inspect``'s health log. Readiness is
503 while the proxy starts, while a cluster waits for its first endpoint and while it drains.

Two command lines leave nothing to probe. ``--readiness-port off`` asks for no readiness, so the
proxy counts as healthy while it runs. ``--readiness-port 0`` binds a port chosen at start,
known only from the proxy's log: the check reports unhealthy and says to give a number.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

PATH = "/healthz/ready"
TIMEOUT = 2.0
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # a wildcard bind: ask locally


def run_arguments(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``sticky-proxy`` (or ``python -m proxy``): ``run`` or ``demo``."""
    for i, word in enumerate(argv):
        if os.path.basename(word) == "sticky-proxy":
            rest = list(argv[i + 1 :])
        elif word == "-m" and argv[i + 1 : i + 2] == ["proxy"]:
            rest = list(argv[i + 2 :])
        else:
            continue
        return rest if rest[:1] in (["run"], ["demo"]) else None
    return None


def find_proxy(proc: Path) -> argparse.Namespace | None:
    """The parsed command line of the supervising ``sticky-proxy run`` under ``proc``."""
    from proxy.__main__ import build_parser

    pids = sorted(int(entry.name) for entry in proc.iterdir() if entry.name.isdigit())
    for pid in pids:
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:  # gone since the listing, or not ours to read
            continue
        argv = raw.decode(errors="surrogateescape").split("\0")
        if argv and argv[-1] == "":
            argv.pop()
        rest = run_arguments(argv)
        if rest is None:
            continue
        try:
            args = build_parser().parse_args(rest)
        except SystemExit:  # not a command line the proxy accepts: not a running proxy
            continue
        if getattr(args, "worker", None) is None:
            return args
    return None


def check(proc: Path = Path("/proc")) -> tuple[int, str]:
    """(exit code, one line): 0 when the proxy is ready."""
    args = find_proxy(proc)
    if args is None:
        return 1, f"no `sticky-proxy run` (or demo) process found in {proc}"
    if args.command == "demo":  # its own flags: --address, and 15021 unless told otherwise
        port, host = args.readiness_port or "15021", args.address
    else:
        port, host = args.readiness_port, args.ops_address
    if port == "off":
        return 0, "the proxy runs with --readiness-port off: nothing to probe"
    if not port.isdigit() or int(port) == 0:
        return 1, f"the proxy runs with --readiness-port {port}: give it a number to check it"
    host = LOOPBACK.get(host, host)
    url = f"http://[{host}]:{port}{PATH}" if ":" in host else f"http://{host}:{port}{PATH}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        return 1, f"{url}: {exc}"
    if status == 200:
        return 0, f"{url}: 200 ready"
    return 1, f"{url}: {status} (starting, waiting for endpoints, or draining)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.healthcheck",
        description="Probe the readiness port of the sticky-proxy running here (exit 0 = ready).",
    )
    parser.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
    code, line = check(Path(parser.parse_args(argv).proc))
    print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
