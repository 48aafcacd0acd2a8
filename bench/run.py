#!/usr/bin/env python3
"""Benchmark: sticky-proxy beside nginx and HAProxy, same backends, same load, one command.

    python3 bench/run.py            # every row, 3 reps of 10 s (+2 s warm-up), returning + new
    python3 bench/run.py --quick    # 1 rep of 5 s, for a fast look
    python3 bench/run.py --idle 10000 --big     # add the idle-connection and 10 MB scenarios

Theory of the measurement
-------------------------
*What is compared.* Every row forwards the same requests to the same three "pods": one nginx
worker serving 127.0.0.1:9001-9003 with a tiny body that names the pod. The rows are
``direct`` (wrk straight to one pod: the ceiling), ``nginx`` (``hash $cookie consistent``,
keep-alive upstreams), ``haproxy`` (cookie hash, ``hash-type consistent``) and sticky-proxy
(1 worker; 2 workers, access-log and metrics variants once the CLI has the flags).

*Where.* On a 2-core machine the proxy gets CPU 0 to itself; wrk and the backend share CPU 1
(``taskset``). The single-core proxy is then the bottleneck of its row, so req/s is its
throughput, and the other processes never steal its core.

*What counts.* Throughput and latency move with noise on a shared machine; the steady figure is
**proxy CPU time per request**: utime+stime of the proxy's whole process tree (master, workers,
threads) read from /proc before and after a run, divided by the requests wrk completed. About
10 µs of it is kernel time on loopback, which every proxy pays. Ratios to nginx are taken per
repetition (same round, same machine state) and their median is reported:
``cpu-eff = nginx µs / row µs`` (>1: cheaper than nginx).

*How.* Each proxy is started fresh for its turn (so only one proxy runs at a time, RSS is per
turn and fixed ports such as a metrics port cannot clash), checked for stickiness, warmed up,
then measured under two loads: ``returning`` (every request carries the cookie ``ISTIOID``) and
``new`` (no cookie: the proxy invents one and sets it on every response). Rows alternate within
a round and the order is reversed every other round, so a slow drift of the machine does not
favour one row. Medians over ``--reps`` rounds are reported.

*TLS rows.* ``nginx-tls`` and ``sticky-1w-tls`` terminate HTTPS with the same certificate (RSA
2048, made with ``openssl`` in the run directory) in front of the same backends; sticky-proxy
reads it from a Gateway HTTPS server (``configs/sticky-tls.yaml``), nginx from ``ssl_certificate``.
They run two loads: ``returning`` (keep-alive: TLS record cost per request) and ``reconnect``
(``Connection: close`` on every request: a new TLS connection, handshake included, per
request, so req/s is new TLS connections per second). Their ratios are to ``nginx-tls``.

*sticky-proxy's command line is a template* (``--proxy-template``); rows that need a flag
(``--workers``, ``--access-log``, a metrics port) are skipped with a note until ``run --help``
lists it, so the table grows by itself as the proxy does.

Standard library only: runs with the system python3 or the project's venv. Every process it
starts is stopped by PID at the end, also on Ctrl-C, SIGTERM or an error. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import platform
import random
import re
import resource
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLK = os.sysconf("SC_CLK_TCK")
BACKENDS = ("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")
SINK = "127.0.0.1:9004"  # upload sink behind the backend nginx (--big)
COOKIE = "ISTIOID"
# A returning visitor sends back what sticky-proxy issued: 16 hex digits in quotes.
LOAD_COOKIE = '"d5bede35465dd05f"'
BIG_SIZE = 10 * 1024 * 1024
LOADS = ("returning", "new")
TLS_LOADS = ("returning", "reconnect")  # reconnect: Connection: close, a handshake per request
ALL_LOADS = ("returning", "new", "reconnect")

DEFAULT_PROXY = str(REPO / ".venv" / "bin" / "sticky-proxy")
DEFAULT_TEMPLATE = (
    "{proxy} run {upstreams} --cookie ISTIOID --ttl 60s --listen 127.0.0.1:{port} "
    "--log-level warning"
)

# Targets of issue 9.
TARGET_CPU_EFF = 0.67  # CPU/request at 1 worker <= 1.5 x nginx
TARGET_P99_SLACK_MS = 1.0  # p99 <= nginx p99 + 1 ms
TARGET_NEW_OVER_RETURNING = 1.1  # a new visitor costs <= 1.1 x a returning one
TARGET_IDLE_RSS_MB = 150.0
TARGET_BIG_MB = 5.0  # "flat, a few MB"
TARGET_TLS_CPU_EFF = 1 / 1.3  # issue 16: keep-alive CPU/request over TLS <= 1.3 x nginx's


# --------------------------------------------------------------------------- rows
@dataclass(frozen=True, slots=True)
class Row:
    """One configuration under test.

    For ``kind == "sticky"``: ``flags`` are appended to the proxy template and every option in
    them must appear in ``sticky-proxy run --help`` or the row is skipped; ``optional`` flags are
    appended only when the CLI knows them (e.g. ``--access-log off`` keeps the base rows
    comparable to nginx's ``access_log off``).
    """

    name: str
    kind: str  # direct | nginx | haproxy | sticky
    port: int
    desc: str
    workers: int = 1
    flags: tuple[str, ...] = ()
    optional: tuple[tuple[str, ...], ...] = ()
    loads: tuple[str, ...] = LOADS
    default: bool = True
    baseline: bool = False  # run with --baseline-cmd instead of --proxy-cmd
    tls: bool = False  # HTTPS on the same certificate (bench_certificate); ratios to nginx-tls

    @property
    def ref(self) -> str:
        """The row its ratios are taken to."""
        return "nginx-tls" if self.tls else "nginx"


# Ports the base rows switch off (when the CLI has them): a row measures the data plane plus
# exactly the feature it names, and nothing binds outside loopback or clashes with a demo.
OPS_OFF: tuple[tuple[str, ...], ...] = (
    ("--access-log", "off"),
    ("--admin-port", "off"),
    ("--readiness-port", "off"),
    ("--metrics-port", "off"),
)


# Stopping a row must not wait for a graceful drain (nothing is in flight by then).
FAST_STOP: tuple[str, ...] = ("--drain-time", "0")


def _ops_off(*keep: str) -> tuple[tuple[str, ...], ...]:
    return tuple(o for o in OPS_OFF if o[0] not in keep)


ROWS: tuple[Row, ...] = (
    Row("direct", "direct", 9001, "wrk -> pod-1, no proxy (the ceiling)"),
    Row("nginx", "nginx", 8081, "nginx 1 worker, hash $cookie consistent, keepalive 64"),
    Row("haproxy", "haproxy", 8082, "haproxy nbthread 1, hash req.cook consistent, reuse always"),
    Row("sticky-1w", "sticky", 8090, "sticky-proxy, 1 worker", optional=OPS_OFF),
    Row(
        "sticky-2w",
        "sticky",
        8091,
        "sticky-proxy, 2 workers (SO_REUSEPORT)",
        workers=2,
        flags=("--workers", "2"),
        optional=OPS_OFF,
    ),
    Row(
        "sticky-1w-log-text",
        "sticky",
        8092,
        "sticky-proxy, 1 worker, text access log (stdout to a file)",
        flags=("--access-log", "text"),
        optional=_ops_off("--access-log"),
        loads=("returning",),
    ),
    Row(
        "sticky-1w-log-json",
        "sticky",
        8093,
        "sticky-proxy, 1 worker, JSON access log (stdout to a file)",
        flags=("--access-log", "json"),
        optional=_ops_off("--access-log"),
        loads=("returning",),
    ),
    Row(
        "sticky-1w-metrics",
        "sticky",
        8094,
        "sticky-proxy, 1 worker, Prometheus metrics port on loopback",
        flags=("--metrics-port", "{metrics_port}"),
        optional=(("--ops-address", "127.0.0.1"), *_ops_off("--metrics-port")),
        loads=("returning",),
    ),
    Row(
        "sticky-1w-defaults",
        "sticky",
        8095,
        "sticky-proxy, 1 worker, out of the box (access log, metrics, admin, readiness; "
        "ports moved to loopback)",
        flags=("--metrics-port", "{metrics_port}"),
        optional=(
            ("--ops-address", "127.0.0.1"),
            ("--admin-address", "127.0.0.1"),
            ("--admin-port", "{admin_port}"),
            ("--readiness-port", "{ready_port}"),
        ),
        loads=("returning",),
    ),
    # Another build of sticky-proxy (--baseline-cmd, e.g. an older commit) beside this one in
    # the same run: before/after figures that share their nginx reference and machine state.
    Row(
        "baseline-1w",
        "sticky",
        8096,
        "--baseline-cmd build, 1 worker",
        optional=OPS_OFF,
        default=False,
        baseline=True,
    ),
    Row(
        "baseline-1w-metrics",
        "sticky",
        8097,
        "--baseline-cmd build, 1 worker, Prometheus metrics port on loopback",
        flags=("--metrics-port", "{metrics_port}"),
        optional=(("--ops-address", "127.0.0.1"), *_ops_off("--metrics-port")),
        loads=("returning",),
        default=False,
        baseline=True,
    ),
    Row(
        "nginx-tls",
        "nginx",
        8085,
        "nginx 1 worker, HTTPS (same certificate), hash $cookie consistent, keepalive 64",
        loads=TLS_LOADS,
        tls=True,
    ),
    Row(
        "sticky-1w-tls",
        "sticky-tls",
        8098,
        "sticky-proxy, 1 worker, HTTPS Gateway server (same certificate), DestinationRule "
        "cookie ISTIOID",
        optional=OPS_OFF,
        loads=TLS_LOADS,
        tls=True,
    ),
    Row("nginx-2w", "nginx", 8083, "nginx 2 workers", workers=2, default=False),
    Row("haproxy-2t", "haproxy", 8084, "haproxy nbthread 2", workers=2, default=False),
)


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc
def proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, utime ticks, stime ticks), whole thread groups."""
    out: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2 :].split()
        out[int(entry)] = (int(rest[1]), int(rest[11]), int(rest[12]))
    return out


def tree(root: int, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """``root`` and its descendants (by parent pid)."""
    table = table if table is not None else proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
            todo.extend(kids.get(pid, []))
    return found


def tree_ticks(root: int | None) -> dict[int, tuple[int, int]]:
    if root is None:
        return {}
    table = proc_table()
    return {pid: table[pid][1:] for pid in tree(root, table)}


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_kb(pids: Sequence[int], key: str) -> int:
    """Sum over the tree (pages shared between forked workers are counted in each)."""
    return sum(status_kb(pid, key) for pid in pids)


def tree_pss_kb(pids: Sequence[int]) -> int:
    """Proportional set size of the tree: pages shared by forked workers counted once overall."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def reset_hwm(pids: Sequence[int]) -> None:
    """Reset VmHWM (Linux >= 4.0: 5 > clear_refs) so the next VmHWM is this interval's peak."""
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")


def cpu_busy() -> dict[str, tuple[int, int]]:
    """cpuN -> (busy jiffies, total jiffies) from /proc/stat."""
    found: dict[str, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if re.match(r"cpu\d+ ", line):
                values = [int(x) for x in line.split()[1:9]]
                idle = values[3] + values[4]
                found[line.split()[0]] = (sum(values) - idle, sum(values))
    return found


# --------------------------------------------------------------------------- processes
class Proc:
    """A process we started (own session, pinned with taskset), stopped by PID."""

    live: list[Proc] = []  # the registry every exit path stops

    def __init__(self, name: str, argv: list[str], cpus: str | None, run_dir: Path) -> None:
        self.name = name
        self.log_path = run_dir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        full = (["taskset", "-c", cpus] if cpus else []) + argv
        self.argv = full
        self.popen = subprocess.Popen(
            full,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it ourselves
        )
        self.pid = self.popen.pid
        Proc.live.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        if self in Proc.live:
            Proc.live.remove(self)
        descendants = tree(self.pid)[1:] if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        for pid in descendants:  # workers we started, if the parent left any behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def stop_all() -> None:
    for proc in reversed(list(Proc.live)):
        proc.stop()


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def wait_port(port: int, proc: Proc | None, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and not proc.alive():
            return False
        if port_open(port):
            return True
        time.sleep(0.05)
    return False


def render(template: str, out: Path, **values: object) -> Path:
    text = (BENCH / "configs" / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", str(value))
    if "@@" in text:
        raise SystemExit(f"{template}: unrendered placeholder in {out}")
    out.write_text(text)
    return out


# --------------------------------------------------------------------------- setup
@dataclass(slots=True)
class Bench:
    """What every phase needs: options, the run directory, flags the CLI knows."""

    args: argparse.Namespace
    run_dir: Path
    nofile: int
    cli_flags: set[str] | None
    backend: Proc | None = None
    notes: dict[str, str] = field(default_factory=dict)  # per row: check result or why skipped
    failed: set[str] = field(default_factory=set)  # rows that did not start or stick


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard one (inherited by every process we start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def sticky_cli_flags(proxy_cmd: str) -> set[str] | None:
    """Options listed by ``sticky-proxy run --help`` (None: the command does not answer)."""
    try:
        out = subprocess.run(
            [*shlex.split(proxy_cmd), "run", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", out.stdout))


def ensure_free(ports: Sequence[int], wait: float = 15.0) -> None:
    """Fixed ports must be ours: a test suite's demo pods on 9001 would silently stand in for
    the backends. A transient holder gets ``wait`` seconds to go away."""
    end = time.monotonic() + wait
    busy = [p for p in ports if port_open(p)]
    while busy and time.monotonic() < end:
        time.sleep(0.5)
        busy = [p for p in busy if port_open(p)]
    if busy:
        raise SystemExit(
            f"127.0.0.1 port(s) {', '.join(map(str, busy))} already in use by another process; "
            "stop it (ss -ltnp shows which) and run again"
        )


def start_backends(b: Bench) -> None:
    conns = max(1024, b.nofile - 1000)
    conf = render(
        "backend-nginx.conf",
        b.run_dir / "backend-nginx.conf",
        RUN=b.run_dir,
        SINK=SINK,
        NOFILE=b.nofile,
        CONNS=conns,
    )
    argv = ["nginx", "-c", str(conf), "-e", str(b.run_dir / "backend-nginx.startup.err")]
    b.backend = Proc("backend-nginx", argv, b.args.load_cpus, b.run_dir)
    for backend in BACKENDS:
        if not wait_port(int(backend.rsplit(":", 1)[1]), b.backend):
            raise SystemExit(f"backend nginx did not start: {b.backend.log_tail()}")
    time.sleep(0.3)  # nginx exits shortly after a failed bind: make sure it is the one serving
    if not b.backend.alive():
        raise SystemExit(f"backend nginx exited: {b.backend.log_tail()}")


def start_sink(b: Bench) -> Proc:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-sink", SINK]
    sink = Proc("upload-sink", argv, b.args.load_cpus, b.run_dir)
    if not wait_port(int(SINK.rsplit(":", 1)[1]), sink):
        raise SystemExit(f"upload sink did not start: {sink.log_tail()}")
    return sink


def bench_certificate(run_dir: Path) -> tuple[Path, Path]:
    """One self-signed certificate (RSA 2048, CN bench.test) both TLS rows serve."""
    cert, key = run_dir / "bench-tls.crt", run_dir / "bench-tls.key"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    return cert, key


def row_argv(b: Bench, row: Row) -> tuple[list[str] | None, str]:
    """The command of a row, or (None, why it is skipped)."""
    nofile = b.nofile
    conns = max(1024, nofile - 1000)
    if row.kind == "direct":
        return None, ""
    if row.kind == "nginx":
        cert, key = bench_certificate(b.run_dir) if row.tls else (Path(), Path())
        conf = render(
            "proxy-nginx-tls.conf" if row.tls else "proxy-nginx.conf",
            b.run_dir / f"proxy-nginx-{row.port}.conf",
            RUN=b.run_dir,
            PORT=row.port,
            WORKERS=row.workers,
            NOFILE=nofile,
            CONNS=conns,
            **({"CERT": cert, "KEY": key} if row.tls else {}),
        )
        err = b.run_dir / f"proxy-nginx-{row.port}.startup.err"
        return ["nginx", "-c", str(conf), "-e", str(err)], ""
    if row.kind == "haproxy":
        # HAProxy reserves 2 fds per connection and refuses to start when RLIMIT_NOFILE (whose
        # hard limit we cannot raise) is short of that, so its maxconn is half the limit.
        conf = render(
            "proxy-haproxy.cfg",
            b.run_dir / f"proxy-haproxy-{row.port}.cfg",
            PORT=row.port,
            THREADS=row.workers,
            CONNS=(nofile - 100) // 2,
        )
        return ["haproxy", "-db", "-f", str(conf)], ""
    flags = b.cli_flags
    wanted = [f for f in row.flags if f.startswith("--")]
    if wanted and flags is None:
        return None, "skipped: `run --help` did not answer, cannot check " + " ".join(wanted)
    missing = [f for f in wanted if flags is not None and f not in flags]
    if missing:
        return None, f"skipped: the CLI has no {' '.join(missing)} yet"
    extra = list(row.flags)
    for option in (*row.optional, FAST_STOP):
        if flags is not None and option[0] in flags:
            extra += option
    extra += shlex.split(b.args.proxy_args)
    # Side ports of a row, each its own so no two rows (nor a demo on 15000/15021/15090) clash.
    ports = {
        "port": row.port,
        "metrics_port": row.port + 10000,
        "admin_port": row.port + 11000,
        "ready_port": row.port + 12000,
    }
    extra = [x.format(**ports) for x in extra]
    a = b.args
    proxy = a.baseline_cmd if row.baseline else a.proxy_cmd
    if row.kind == "sticky-tls":
        # A Gateway HTTPS server, so not the quick-mode template: the same flags otherwise.
        cert, key = bench_certificate(b.run_dir)
        endpoints = "\n".join(
            f"  - {{address: {u.rsplit(':', 1)[0]}, ports: {{http: {u.rsplit(':', 1)[1]}}}}}"
            for u in BACKENDS
        )
        config = render(
            "sticky-tls.yaml",
            b.run_dir / f"sticky-tls-{row.port}.yaml",
            PORT=row.port,
            CERT=cert,
            KEY=key,
            ENDPOINTS=endpoints,
        )
        argv = [*shlex.split(proxy), "run", str(config), "--listen", f"127.0.0.1:{row.port}"]
        return [*argv, "--log-level", "warning", *extra], ""
    upstreams = " ".join(f"--upstream {u}" for u in BACKENDS)
    text = a.proxy_template.format(proxy=proxy, upstreams=upstreams, port=row.port)
    return [*shlex.split(text), *extra], ""


def row_cpus(b: Bench, row: Row) -> str | None:
    if row.kind == "direct":
        return None
    return str(b.args.multi_cpus if row.workers > 1 else b.args.proxy_cpus)


@contextlib.contextmanager
def running(b: Bench, row: Row, argv: list[str] | None) -> Iterator[Proc | None]:
    """Start the row's proxy (nothing for direct), yield it once it listens, always stop it."""
    if argv is None:
        yield None
        return
    if port_open(row.port):
        raise RowError(f"port {row.port} is already in use by another process")
    proc = Proc(row.name, argv, row_cpus(b, row), b.run_dir)
    try:
        if not wait_port(row.port, proc):
            raise RowError(f"did not start: {proc.log_tail()}")
        yield proc
    finally:
        proc.stop()


class RowError(Exception):
    """The row cannot be measured (did not start, failed the sticky check)."""


# What ends one row's turn (noted in the report) without ending the benchmark.
ROW_FAILURES = (RowError, OSError, http.client.HTTPException, subprocess.SubprocessError)


# --------------------------------------------------------------------------- HTTP helpers
def http_get(
    port: int, cookie: str | None, path: str = "/", tls: bool = False
) -> tuple[int, str, str | None]:
    """(status, pod named by the body, value of an issued ISTIOID cookie or None)."""
    if tls:  # the rows' self-signed certificate: not verified here
        unverified = ssl._create_unverified_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=10, context=unverified
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Cookie": f"{COOKIE}={cookie}"} if cookie else {})
        resp = conn.getresponse()
        words = resp.read().decode("latin-1").split()
        issued = None
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                if key.strip() == COOKIE:
                    issued = rest.split(";", 1)[0].strip()
        return resp.status, words[-1] if words else "", issued
    finally:
        conn.close()


def check_row(port: int, proxy: bool, tls: bool = False) -> str:
    """Functional check before any load; raises RowError when the row does not stick."""
    try:
        return _check_row(port, proxy, tls)
    except (OSError, http.client.HTTPException) as exc:
        raise RowError(f"CHECK FAILED: {exc!r}") from exc


def _check_row(port: int, proxy: bool, tls: bool) -> str:
    status, pod, _ = http_get(port, LOAD_COOKIE, tls=tls)
    if status != 200 or not pod.startswith("pod-"):
        raise RowError(f"CHECK FAILED: GET / answered {status} {pod!r}")
    if not proxy:
        return f"200 {pod}"
    sticky, first = 0, set()
    for i in range(30):
        pods = {http_get(port, f"user{i}", tls=tls)[1] for _ in range(3)}
        sticky += len(pods) == 1
        first |= pods
    issued_ok = 0
    for _ in range(5):  # new visitors: the issued cookie must lead back to the first pod
        _, pod0, value = http_get(port, None, tls=tls)
        if value and all(http_get(port, value, tls=tls)[1] == pod0 for _ in range(3)):
            issued_ok += 1
    note = f"sticky {sticky}/30, pods {len(first)}/3, issued cookie sticks {issued_ok}/5"
    if sticky < 30 or len(first) < 2 or issued_ok < 5:
        raise RowError("CHECK FAILED: " + note)
    return note


# --------------------------------------------------------------------------- wrk
def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(b: Bench, port: int, load: str, seconds: float, tls: bool = False) -> dict[str, Any]:
    a = b.args
    argv = ["taskset", "-c", a.load_cpus, "wrk", "-t1", f"-c{a.conns}", f"-d{seconds:g}s"]
    argv += ["--latency"]
    if load in ("returning", "reconnect"):
        argv += ["-H", f"Cookie: {COOKIE}={LOAD_COOKIE}"]
    if load == "reconnect":
        argv += ["-H", "Connection: close"]  # every request on a new (TLS) connection
    argv.append(f"{'https' if tls else 'http'}://127.0.0.1:{port}/")
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 60, check=False
    ).stdout
    r: dict[str, Any] = {"wrk": shlex.join(argv)}
    m = re.search(r"(\d+) requests in", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        r[f"p{pct}_ms"] = _ms(value, unit)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["errors"] = sum(map(int, m.groups())) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["errors"] += int(m.group(1)) if m else 0
    if not r["requests"]:
        r["errors"] += 1
        r["wrk_output"] = out[-500:]
    return r


def measure(b: Bench, row: Row, proc: Proc | None, load: str, rep: int) -> dict[str, Any]:
    a = b.args
    if a.warmup > 0:
        run_wrk(b, row.port, load, a.warmup, row.tls)
    root = proc.pid if proc else None
    assert b.backend is not None
    t0, k0, c0, w0 = tree_ticks(root), tree_ticks(b.backend.pid), cpu_busy(), time.monotonic()
    r = run_wrk(b, row.port, load, a.duration, row.tls)
    t1, k1, c1, w1 = tree_ticks(root), tree_ticks(b.backend.pid), cpu_busy(), time.monotonic()
    wall = w1 - w0
    user = sum(t1[p][0] - t0[p][0] for p in t1 if p in t0) / CLK
    sys_ = sum(t1[p][1] - t0[p][1] for p in t1 if p in t0) / CLK
    backend = sum(sum(k1[p]) - sum(k0[p]) for p in k1 if p in k0) / CLK
    n = max(r["requests"], 1)
    busy = {
        cpu: round((c1[cpu][0] - c0[cpu][0]) / max(c1[cpu][1] - c0[cpu][1], 1), 3) for cpu in c1
    }
    # CPU time others (another test, a cron job) took on the proxy's own cores: the row's
    # req/s and latency are suspect when this is large; its CPU us/request much less so.
    own = (row_cpus(b, row) or a.proxy_cpus).split(",")
    shared = set(own) & set(a.load_cpus.split(","))
    foreign = None
    if not shared and own != [""]:
        foreign = max(0.0, sum(busy.get(f"cpu{c}", 0.0) for c in own) - (user + sys_) / wall)
    r.update(
        row=row.name,
        foreign_on_proxy_cpu=foreign,
        load=load,
        rep=rep,
        wall_s=round(wall, 3),
        proxy_cpu_s=user + sys_ if proc else None,
        us_per_req=(user + sys_) / n * 1e6 if proc else None,
        user_us_per_req=user / n * 1e6 if proc else None,
        sys_us_per_req=sys_ / n * 1e6 if proc else None,
        proxy_util=(user + sys_) / wall if proc else None,
        backend_us_per_req=backend / n * 1e6,
        cpu_busy=busy,
    )
    return r


# --------------------------------------------------------------------------- main phase
def row_turn(
    b: Bench,
    row: Row,
    argv: list[str] | None,
    loads: list[str],
    rep: int,
    results: list[dict[str, Any]],
) -> None:
    """Start the row, check it, measure each load, note its memory, stop it."""
    with running(b, row, argv) as proc:
        note = check_row(row.port, proc is not None, row.tls)
        b.notes.setdefault(row.name, note)
        log(f"[check] {row.name}: {note}")
        pids = tree(proc.pid) if proc else []
        batch = []
        for load in loads:
            r = measure(b, row, proc, load, rep)
            results.append(r)
            batch.append(r)
            log(
                f"[rep {rep}] {row.name:19s} {load:9s} {r['rps']:8.0f} req/s "
                f"p50 {r.get('p50_ms', 0):6.2f} p99 {r.get('p99_ms', 0):6.2f} ms "
                f"proxy {fmt(r['us_per_req'], '.1f'):>5} us/req err {r['errors']}"
            )
        if proc:
            pids = tree(proc.pid) or pids
            hwm = tree_kb(pids, "VmHWM") / 1024
            pss = tree_pss_kb(pids) / 1024
            for r in batch:
                r["peak_rss_mb"] = round(hwm, 1)
                r["end_pss_mb"] = round(pss, 1)


def bench_rows(b: Bench, rows: list[Row], results: list[dict[str, Any]]) -> None:
    """Rounds over the rows; appends one record per (row, load, rep) to ``results`` (so an
    interrupted benchmark still reports what it measured)."""
    a = b.args
    live = [row for row in rows if row.name not in b.notes]
    for rep in range(a.reps):
        order = live if rep % 2 == 0 else live[::-1]
        for row in order:
            if row.name in b.failed:
                continue
            argv, _ = row_argv(b, row)
            loads = [load for load in row.loads if load in a.loads]
            loads = loads if rep % 2 == 0 else loads[::-1]
            try:
                row_turn(b, row, argv, loads, rep, results)
            except ROW_FAILURES as exc:
                b.notes[row.name] = str(exc)
                b.failed.add(row.name)
                log(f"[check] {row.name}: {exc}")


# --------------------------------------------------------------------------- summary
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _pick(results: list[dict[str, Any]], row: str, load: str) -> list[dict[str, Any]]:
    return [r for r in results if r["row"] == row and r["load"] == load]


def _per_rep(
    results: list[dict[str, Any]],
    x: tuple[str, str],
    y: tuple[str, str],
    f: Callable[[dict[str, Any], dict[str, Any]], float | None],
) -> float | None:
    """Median over reps of f(record of x, record of y) taken within the same rep."""
    values = []
    for rx in _pick(results, *x):
        for ry in _pick(results, *y):
            if ry["rep"] == rx["rep"]:
                values.append(f(rx, ry))
    return _median(values)


def _rps_ratio(rx: dict[str, Any], ry: dict[str, Any]) -> float | None:
    return float(rx["rps"] / ry["rps"]) if ry["rps"] else None


def _cpu_ratio(rx: dict[str, Any], ry: dict[str, Any]) -> float | None:
    if rx["us_per_req"] and ry["us_per_req"]:
        return float(ry["us_per_req"] / rx["us_per_req"])
    return None


def summarize(
    results: list[dict[str, Any]], rows: list[Row], loads: Sequence[str]
) -> dict[str, dict[str, Any]]:
    keys = ["rps", "p50_ms", "p99_ms", "us_per_req", "user_us_per_req", "sys_us_per_req"]
    keys += ["proxy_util", "backend_us_per_req", "foreign_on_proxy_cpu"]
    summary: dict[str, dict[str, Any]] = {}
    for row in rows:
        for load in loads:
            runs = _pick(results, row.name, load)
            if not runs:
                continue
            s: dict[str, Any] = {k: _median([r.get(k) for r in runs]) for k in keys}
            s["rps_range"] = [min(r["rps"] for r in runs), max(r["rps"] for r in runs)]
            s["errors"] = sum(r["errors"] for r in runs)
            s["reps"] = len(runs)
            rss = [r["peak_rss_mb"] for r in runs if "peak_rss_mb" in r]
            s["peak_rss_mb"] = max(rss) if rss else None
            pss = [r["end_pss_mb"] for r in runs if "end_pss_mb" in r]
            s["end_pss_mb"] = max(pss) if pss else None
            s["cpu_busy"] = {
                cpu: _median([r["cpu_busy"].get(cpu) for r in runs]) for cpu in runs[0]["cpu_busy"]
            }
            # Ratios to nginx (HTTPS rows: to nginx-tls), kept under the same keys.
            if row.name != row.ref and _pick(results, row.ref, load):
                ref = (row.ref, load)
                me = (row.name, load)
                s["rps_vs_nginx"] = _per_rep(results, me, ref, _rps_ratio)
                s["cpu_eff_vs_nginx"] = _per_rep(results, me, ref, _cpu_ratio)
                s["p99_minus_nginx_ms"] = _per_rep(
                    results, me, ref, lambda x, y: x.get("p99_ms", 0) - y.get("p99_ms", 0)
                )
            summary[f"{row.name}/{load}"] = s
    return summary


def targets(
    results: list[dict[str, Any]], summary: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue's targets, each PASS / FAIL / n/a with the figure it rests on."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, ok: bool | None, text: str) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "value": value, "verdict": verdict, "detail": text})

    # The issue's CPU and p99 targets are "with cookie stickiness and metrics on": judged on the
    # metrics row when it ran, and again with the access log on (reported, same thresholds).
    ng = summary.get("nginx/returning", {})
    main = "sticky-1w-metrics" if "sticky-1w-metrics/returning" in summary else "sticky-1w"
    judged = [(main, "")]
    if "sticky-1w-log-text/returning" in summary:
        judged.append(("sticky-1w-log-text", ", access log on"))
    for name, extra in judged:
        s1 = summary.get(f"{name}/returning", {})
        eff = s1.get("cpu_eff_vs_nginx")
        add(
            f"CPU/request at 1 worker <= 1.5 x nginx (cpu-eff >= 0.67){extra}",
            eff,
            None if eff is None else eff >= TARGET_CPU_EFF,
            f"cpu-eff {fmt(eff, '.2f')}: {name} {fmt(s1.get('us_per_req'), '.1f')} us/req, "
            f"nginx {fmt(ng.get('us_per_req'), '.1f')} us/req (returning visitors)",
        )
        p99, ref = s1.get("p99_ms"), ng.get("p99_ms")
        ok = None if p99 is None or ref is None else p99 <= ref + TARGET_P99_SLACK_MS
        add(
            f"p99 at 50 connections <= nginx p99 + 1 ms{extra}",
            None if p99 is None or ref is None else p99 - ref,
            ok,
            f"{name} p99 {fmt(p99, '.2f')} ms, nginx p99 {fmt(ref, '.2f')} ms",
        )
    s1 = summary.get("sticky-1w/returning", {})
    new_ratio = _per_rep(
        results,
        ("sticky-1w", "new"),
        ("sticky-1w", "returning"),
        lambda x, y: x["us_per_req"] / y["us_per_req"],
    )
    add(
        "new visitor <= 1.1 x returning visitor (CPU us/request)",
        new_ratio,
        None if new_ratio is None else new_ratio <= TARGET_NEW_OVER_RETURNING,
        f"new/returning {fmt(new_ratio, '.3f')}: "
        f"{fmt(summary.get('sticky-1w/new', {}).get('us_per_req'), '.1f')} vs "
        f"{fmt(s1.get('us_per_req'), '.1f')} us/req",
    )
    tls_ng = summary.get("nginx-tls/returning", {})
    tls_me = summary.get("sticky-1w-tls/returning", {})
    eff = tls_me.get("cpu_eff_vs_nginx")
    add(
        "TLS keep-alive CPU/request <= 1.3 x nginx with TLS (cpu-eff >= 0.77)",
        eff,
        None if eff is None else eff >= TARGET_TLS_CPU_EFF,
        f"cpu-eff {fmt(eff, '.2f')}: sticky-1w-tls {fmt(tls_me.get('us_per_req'), '.1f')} us/req, "
        f"nginx-tls {fmt(tls_ng.get('us_per_req'), '.1f')} us/req (returning visitors)",
    )
    new_ng = summary.get("nginx-tls/reconnect", {})
    new_me = summary.get("sticky-1w-tls/reconnect", {})
    ratio = new_me.get("rps_vs_nginx")
    add(
        "new TLS connections per second, ratio to nginx with TLS (reported)",
        ratio,
        None,
        f"{fmt(new_me.get('rps'), '.0f')} vs {fmt(new_ng.get('rps'), '.0f')} "
        f"handshakes+requests/s (ratio {fmt(ratio, '.2f')}); CPU per new connection "
        f"{fmt(new_me.get('us_per_req'), '.0f')} vs {fmt(new_ng.get('us_per_req'), '.0f')} us "
        f"(cpu-eff {fmt(new_me.get('cpu_eff_vs_nginx'), '.2f')})",
    )
    for load in LOADS:
        two, one = summary.get(f"sticky-2w/{load}"), summary.get(f"sticky-1w/{load}")
        if two is None or one is None:
            add(f"2 workers never slower than 1 ({load})", None, None, "no sticky-2w row")
            continue
        ratio = _per_rep(
            results, ("sticky-2w", load), ("sticky-1w", load), lambda x, y: x["rps"] / y["rps"]
        )
        add(
            f"2 workers never slower than 1 ({load})",
            ratio,
            None if ratio is None else ratio >= 1.0,
            f"req/s 2w/1w {fmt(ratio, '.3f')}: {two['rps']:.0f} vs {one['rps']:.0f}",
        )
    return out


def table(
    b: Bench, rows: list[Row], summary: dict[str, dict[str, Any]], checks: list[dict[str, Any]]
) -> str:
    a = b.args
    lines = [
        f"wrk -t1 -c{a.conns} -d{a.duration:g}s (+{a.warmup:g}s warm-up), reps={a.reps}, "
        f"proxy on CPU {a.proxy_cpus} (2 workers: {a.multi_cpus}), wrk + backends on CPU "
        f"{a.load_cpus}; medians; ratios are medians of per-rep ratios to nginx (to nginx-tls "
        "for the -tls rows)",
        "",
        "| row | load | req/s | p50 ms | p99 ms | CPU us/req | usr+sys | util | RSS peak (PSS) MB "
        "| rps/nginx | cpu-eff | p99-nginx ms | cpu0/cpu1 busy | others | err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for load in a.loads:
            s = summary.get(f"{row.name}/{load}")
            if s is None:
                continue
            busy = "/".join(f"{(v or 0) * 100:.0f}%" for _, v in sorted(s["cpu_busy"].items()))
            util = s["proxy_util"]
            other = s["foreign_on_proxy_cpu"]
            lines.append(
                f"| {row.name} | {load} | {s['rps']:.0f} | {fmt(s['p50_ms'], '.2f')} "
                f"| {fmt(s['p99_ms'], '.2f')} | {fmt(s['us_per_req'], '.1f')} "
                f"| {fmt(s['user_us_per_req'], '.1f')}+{fmt(s['sys_us_per_req'], '.1f')} "
                f"| {fmt(util and util * 100, '.0f')}{'%' if util else ''} "
                f"| {fmt(s['peak_rss_mb'], '.1f')} ({fmt(s['end_pss_mb'], '.1f')}) "
                f"| {fmt(s.get('rps_vs_nginx'), '.2f')} "
                f"| {fmt(s.get('cpu_eff_vs_nginx'), '.2f')} "
                f"| {fmt(s.get('p99_minus_nginx_ms'), '+.2f')} | {busy} "
                f"| {fmt(other and other * 100, '.0f')}{'%' if other is not None else ''} "
                f"| {s['errors']} |"
            )
    lines += [
        "",
        "CPU us/req: the proxy tree's utime+stime per request; util: its CPU use during the run "
        "(100% = one core); RSS peak: sum of VmHWM over the tree (forked workers count shared "
        "pages again), PSS: proportional set size at the end of the turn; others: CPU time "
        "other processes took on the proxy's cores (>10%: req/s and latency of that row are "
        "disturbed); cpu-eff = nginx us / row us. Load reconnect: Connection: close on every "
        "request, so req/s is new (TLS) connections per second.",
        "",
        "Rows:",
    ]
    for row in rows:
        lines.append(f"- {row.name}: {row.desc} -- {b.notes.get(row.name, 'not run')}")
    lines += ["", "Targets:"]
    for t in checks:
        lines.append(f"- [{t['verdict']}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- side scenarios
# One scenario's measurement of one running row: (what the log line names, a result) pairs,
# yielded one at a time so each is kept and logged before the next one can fail.
Measure = Callable[[Row, list[int]], Iterator[tuple[str, dict[str, Any]]]]


def each_row(
    b: Bench, rows: list[Row], tag: str, warm: int, measure: Measure
) -> list[dict[str, Any]]:
    """One turn per proxy row for a side scenario (--idle, --big), results in row order.

    As in the load rounds, each proxy is started fresh and alone, and this process (the client
    here) is pinned to the load CPUs like wrk. ``warm`` requests go first so the baseline is
    taken on a proxy that has served, then ``measure`` runs on the proxy's process tree. A row
    that failed the load rounds is left out; one that fails here gets an error entry and the
    scenario goes on with the next row.
    """
    found: list[dict[str, Any]] = []
    for row in rows:
        argv, _ = row_argv(b, row)
        if argv is None or row.name in b.failed:
            continue
        try:
            with running(b, row, argv) as proc, pinned(b.args.load_cpus):
                assert proc is not None
                for i in range(warm):
                    http_get(row.port, f"warm{i}")
                for label, r in measure(row, tree(proc.pid)):
                    found.append(r)
                    log(f"[{tag}] {label}: {r}")
        except ROW_FAILURES as exc:
            found.append({"row": row.name, "error": str(exc)})
            log(f"[{tag}] {row.name}: {exc}")
    return found


# --------------------------------------------------------------------------- --idle
async def _idle_connections(
    port: int, count: int, sample: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Open ``count`` keep-alive connections (one request each), sample, probe, close."""
    gate = asyncio.Semaphore(100)
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {COOKIE}={LOAD_COOKIE}\r\n\r\n"
    ).encode()

    async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        await reader.readexactly(int(m.group(1)) if m else 0)
        return head.startswith(b"HTTP/1.1 200")

    failures = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError)

    async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with gate:
            writer = None
            try:
                async with asyncio.timeout(10):  # past a proxy's maxconn: queued, never served
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    if await one_request(reader, writer):
                        return reader, writer
            except failures:
                pass
            if writer is not None:
                writer.close()
            return None

    started = time.monotonic()
    opened = await asyncio.gather(*(open_one() for _ in range(count)))
    conns = [c for c in opened if c is not None]
    result: dict[str, Any] = {"opened": len(conns), "open_s": round(time.monotonic() - started, 2)}
    await asyncio.sleep(1.0)  # let the proxy settle (idle timers, freed request state)
    result.update(await asyncio.to_thread(sample))
    probe = random.Random(1).sample(conns, min(100, len(conns)))
    ok = 0
    for reader, writer in probe:
        with contextlib.suppress(*failures):
            ok += await asyncio.wait_for(one_request(reader, writer), 10)
    result["probe_ok"] = f"{ok}/{len(probe)}"
    for _, writer in conns:
        writer.close()
    return result


def idle_phase(b: Bench, rows: list[Row]) -> list[dict[str, Any]]:
    count = b.args.idle

    def measure(row: Row, pids: list[int]) -> Iterator[tuple[str, dict[str, Any]]]:
        base = tree_kb(pids, "VmRSS") / 1024
        base_pss = tree_pss_kb(pids) / 1024

        def sample() -> dict[str, Any]:
            return {
                "rss_mb": round(tree_kb(pids, "VmRSS") / 1024, 1),
                "pss_mb": round(tree_pss_kb(pids) / 1024, 1),
            }

        r = asyncio.run(_idle_connections(row.port, count, sample))
        r.update(row=row.name, connections=count, baseline_mb=round(base, 1))
        r["baseline_pss_mb"] = round(base_pss, 1)
        r["kb_per_conn"] = round((r["rss_mb"] - base) * 1024 / max(r["opened"], 1), 2)
        yield row.name, r

    return each_row(b, rows, "idle", 200, measure)


@contextlib.contextmanager
def pinned(cpus: str) -> Iterator[None]:
    """Run this process's client work on the load CPUs, like wrk."""
    before = os.sched_getaffinity(0)
    wanted = {int(c) for c in cpus.split(",") if c.strip().isdigit()}
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, wanted)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --------------------------------------------------------------------------- --big
class RssSampler(threading.Thread):
    """Samples the proxy tree's RSS every 50 ms; the kernel's VmHWM catches what falls between."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak_kb = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_kb = max(self.peak_kb, tree_kb(self.pids, "VmRSS"))
            self.samples += 1
            self._halt.wait(0.05)

    def finish(self) -> None:
        self._halt.set()
        self.join()
        self.peak_kb = max(self.peak_kb, tree_kb(self.pids, "VmRSS"))


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("connection closed before the response head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _content_length(head: bytes) -> int:
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m is None:
        raise OSError("response without content-length: " + head[:80].decode("latin-1"))
    return int(m.group(1))


def big_download(port: int, slow: bool) -> tuple[bool, str]:
    """GET /big through the proxy; slow = a reader with a small receive buffer and pauses."""
    sock = socket.socket()
    try:
        if slow:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            f"GET /big HTTP/1.1\r\nHost: x\r\nCookie: {COOKIE}={LOAD_COOKIE}\r\n\r\n".encode()
        )
        head, body = _read_head(sock)
        length = _content_length(head)
        digest = hashlib.sha256(body)
        got = len(body)
        while got < length:
            chunk = sock.recv(min(65536, length - got))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
            if slow:
                time.sleep(0.005)
        return got == length == BIG_SIZE, f"{got} bytes sha256 {digest.hexdigest()[:12]}"
    finally:
        sock.close()


def big_upload(port: int, payload: bytes, slow: bool) -> tuple[bool, str]:
    """POST 10 MB through the proxy to the sink; slow = the sink reads with pauses."""
    sock = socket.socket()
    try:
        sock.settimeout(60)
        sock.connect(("127.0.0.1", port))
        path = "/upload?slow=1" if slow else "/upload"
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nCookie: {COOKIE}={LOAD_COOKIE}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock.sendall(request.encode())
        view = memoryview(payload)
        for start in range(0, len(payload), 256 * 1024):
            sock.sendall(view[start : start + 256 * 1024])
        head, body = _read_head(sock)
        length = _content_length(head)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        text = body.decode("latin-1").strip()
        want = f"received {len(payload)} {hashlib.sha256(payload).hexdigest()}"
        return head.startswith(b"HTTP/1.1 200") and text == want, text[:40]
    finally:
        sock.close()


def big_leg(pids: list[int], port: int, fn: Callable[[int], tuple[bool, str]]) -> dict[str, Any]:
    """One transfer with the proxy tree's RSS watched: baseline, sampled peak, kernel peak."""
    base = tree_kb(pids, "VmRSS")
    reset_hwm(pids)
    sampler = RssSampler(pids)
    sampler.start()
    started = time.monotonic()
    try:
        ok, detail = fn(port)
    except OSError as exc:
        ok, detail = False, f"error: {exc}"
    seconds = time.monotonic() - started
    sampler.finish()
    sampled = (sampler.peak_kb - base) / 1024
    hwm = (tree_kb(pids, "VmHWM") - base) / 1024
    return {
        "ok": ok,
        "detail": detail,
        "seconds": round(seconds, 3),
        "mb_per_s": round(BIG_SIZE / 2**20 / max(seconds, 1e-6), 1),
        "baseline_mb": round(base / 1024, 1),
        "sampled_peak_minus_base_mb": round(sampled, 2),
        "hwm_minus_base_mb": round(hwm, 2),
        "peak_minus_base_mb": round(max(sampled, hwm), 2),
        "samples": sampler.samples,
    }


def big_phase(b: Bench, rows: list[Row], payload: bytes) -> list[dict[str, Any]]:
    """Each leg twice per proxy: the first may include one-time allocator growth."""
    legs: list[tuple[str, Callable[[int], tuple[bool, str]]]] = [
        ("download", lambda port: big_download(port, slow=False)),
        ("download, slow client", lambda port: big_download(port, slow=True)),
        ("upload", lambda port: big_upload(port, payload, slow=False)),
        ("upload, slow upstream", lambda port: big_upload(port, payload, slow=True)),
    ]

    def measure(row: Row, pids: list[int]) -> Iterator[tuple[str, dict[str, Any]]]:
        for leg, fn in legs:
            for attempt in range(2):
                r = {"row": row.name, "leg": leg, "attempt": attempt}
                r.update(big_leg(pids, row.port, fn))
                yield f"{row.name} {leg} #{attempt}", r

    return each_row(b, rows, "big", 50, measure)


def idle_table(idle: list[dict[str, Any]]) -> str:
    lines = [
        "| row | idle conns open | baseline RSS (PSS) MB | with idle RSS (PSS) MB | KB/conn "
        "| probe ok |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in idle:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['opened']}/{r['connections']} "
            f"| {r['baseline_mb']:.1f} ({r['baseline_pss_mb']:.1f}) "
            f"| {r['rss_mb']:.1f} ({r['pss_mb']:.1f}) | {r['kb_per_conn']:.1f} | {r['probe_ok']} |"
        )
    return "\n".join(lines)


def big_table(big: list[dict[str, Any]]) -> str:
    lines = [
        "| row | leg | ok | MB/s | baseline RSS MB | peak - baseline MB (sampled / VmHWM) |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in big:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['leg']} #{r['attempt']} | {'yes' if r['ok'] else 'NO'} "
            f"| {r['mb_per_s']:.0f} | {r['baseline_mb']:.1f} "
            f"| {r['sampled_peak_minus_base_mb']:.2f} / {r['hwm_minus_base_mb']:.2f} |"
        )
    return "\n".join(lines)


def extra_targets(idle: list[dict[str, Any]], big: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in idle:
        if r.get("row") == "sticky-1w" and "rss_mb" in r:
            ok = r["rss_mb"] <= TARGET_IDLE_RSS_MB and r["opened"] == r["connections"]
            out.append(
                {
                    "target": f"RSS with {r['connections']} idle connections <= 150 MB",
                    "value": r["rss_mb"],
                    "verdict": "PASS" if ok else "FAIL",
                    "detail": f"sticky-1w {r['rss_mb']:.1f} MB with {r['opened']} open "
                    f"(baseline {r['baseline_mb']:.1f} MB), probe {r['probe_ok']}",
                }
            )
    legs = [r for r in big if r.get("row") == "sticky-1w" and "leg" in r]
    if legs:
        worst = max(legs, key=lambda r: r["peak_minus_base_mb"])
        ok = all(r["ok"] for r in legs) and worst["peak_minus_base_mb"] <= TARGET_BIG_MB
        out.append(
            {
                "target": "10 MB streamed up and down: RSS flat (peak - baseline <= 5 MB)",
                "value": worst["peak_minus_base_mb"],
                "verdict": "PASS" if ok else "FAIL",
                "detail": f"sticky-1w worst {worst['peak_minus_base_mb']:.2f} MB "
                f"({worst['leg']} #{worst['attempt']}); all transfers verified: "
                f"{'yes' if all(r['ok'] for r in legs) else 'NO'}",
            }
        )
    return out


# --------------------------------------------------------------------------- upload sink
async def _sink_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the whole request body (Content-Length), answer its size and SHA-256."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ", 2)[1]
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        length = int(m.group(1)) if m else 0
        slow = b"slow" in target
        digest = hashlib.sha256()
        got = 0
        while got < length:
            chunk = await reader.read(min(65536, length - got))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
            if slow:
                await asyncio.sleep(0.005)
        body = f"received {got} {digest.hexdigest()}\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _serve_sink(address: str) -> None:
    host, _, port = address.rpartition(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # A small receive buffer makes a slow sink push back instead of the kernel absorbing MBs.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.bind((host, int(port)))
    server = await asyncio.start_server(_sink_connection, sock=sock)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------- meta
def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def _git_head() -> str:
    """The checked-out commit, read from .git without running git."""
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "?"


def meta(b: Bench) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
        "host": {
            "cpu": cpu,
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "versions": {
            "sticky-proxy": _version([*shlex.split(b.args.proxy_cmd), "--version"]),
            "git_head": _git_head(),
            "nginx": _version(["nginx", "-v"]),
            "haproxy": _version(["haproxy", "-v"]),
            "wrk": _version(["wrk", "-v"]),
        },
        "options": {k: v for k, v in vars(b.args).items() if k != "serve_sink"},
        "run_dir": str(b.run_dir),
    }


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [r.name for r in ROWS]
    ap.add_argument(
        "--rows",
        default=",".join(r.name for r in ROWS if r.default),
        help=f"comma list of rows (known: {', '.join(names)})",
    )
    ap.add_argument(
        "--loads",
        default=",".join(ALL_LOADS),
        help="returning,new,reconnect (default all; each row runs those it has: reconnect is "
        "the TLS rows' new-connection load)",
    )
    ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", "3")))
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load first")
    ap.add_argument("--quick", action="store_true", help="1 rep of 5 s (a fast look)")
    ap.add_argument("--conns", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--idle", type=int, default=0, metavar="N", help="idle-connection scenario")
    ap.add_argument("--big", action="store_true", help="10 MB upload/download scenario")
    ap.add_argument("--no-load", action="store_true", help="skip the wrk rounds")
    ap.add_argument("--proxy-cmd", default=DEFAULT_PROXY, help="sticky-proxy command")
    ap.add_argument(
        "--baseline-cmd",
        default="",
        help="another sticky-proxy build to measure beside --proxy-cmd in the same run "
        "(adds the baseline-* rows), e.g. an older commit",
    )
    ap.add_argument(
        "--proxy-template",
        default=DEFAULT_TEMPLATE,
        help="sticky-proxy command line; {proxy} {upstreams} {port} are substituted and each "
        "row's flags appended (default: %(default)s)",
    )
    ap.add_argument("--proxy-args", default="", help="extra flags for every sticky-proxy row")
    ap.add_argument("--proxy-cpus", default="0", help="taskset list for 1-worker proxies")
    ap.add_argument("--multi-cpus", default="0,1", help="taskset list for 2-worker proxies")
    ap.add_argument("--load-cpus", default="1", help="taskset list for wrk and the backends")
    ap.add_argument("--run-dir", help="logs and rendered configs (default: a new temp dir)")
    ap.add_argument("--out", default=str(BENCH / "results"), help="where latest.json goes")
    ap.add_argument("--serve-sink", metavar="ADDR:PORT", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.duration = 1, 5.0
    a.loads = [x for x in a.loads.split(",") if x]
    if set(a.loads) - set(ALL_LOADS):
        ap.error(f"--loads: known loads are {', '.join(ALL_LOADS)}")
    unknown = [n for n in a.rows.split(",") if n and n not in names]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(names)}")
    baseline_rows = [r.name for r in ROWS if r.baseline]
    if a.baseline_cmd and a.rows == ap.get_default("rows"):
        a.rows += "," + ",".join(baseline_rows)
    if not a.baseline_cmd and set(a.rows.split(",")) & set(baseline_rows):
        ap.error("the baseline-* rows need --baseline-cmd")
    if (os.cpu_count() or 1) < 2:
        log("warning: fewer than 2 CPUs, pinning disabled")
        a.proxy_cpus = a.multi_cpus = a.load_cpus = ""
    return a


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.serve_sink:
        asyncio.run(_serve_sink(a.serve_sink))
        return 0
    for tool in ("nginx", "haproxy", "wrk", "taskset"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":")):
            raise SystemExit(f"{tool} not found: run bench/setup.sh")
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="sticky-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o755)  # nginx workers run as nobody and serve big.bin from here
    b = Bench(a, run_dir, raise_nofile(), sticky_cli_flags(a.proxy_cmd))
    if b.cli_flags is None:
        log(f"warning: `{a.proxy_cmd} run --help` failed; rows needing flags are skipped")
    rows = [r for r in ROWS if r.name in a.rows.split(",")]
    for row in rows:
        argv_, why = row_argv(b, row)
        if argv_ is None and why:
            b.notes[row.name] = why
            log(f"[rows] {row.name}: {why}")
        elif argv_ is not None:
            log(f"[rows] {row.name}: {shlex.join(argv_)}")
    # Explicit, so that Ctrl-C works even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    results: list[dict[str, Any]] = []
    idle: list[dict[str, Any]] = []
    big: list[dict[str, Any]] = []
    interrupted = False
    payload = b""
    try:
        fixed = [int(x.rsplit(":", 1)[1]) for x in (*BACKENDS, SINK)]
        ensure_free(fixed + [r.port for r in rows if r.kind != "direct"])
        if a.big:
            payload = os.urandom(BIG_SIZE)
            (run_dir / "big.bin").write_bytes(payload)
            start_sink(b)
        start_backends(b)
        if not a.no_load:
            bench_rows(b, rows, results)
        # The side scenarios speak plain HTTP: the TLS rows have their own loads.
        plain = [r for r in rows if r.kind != "direct" and not r.tls]
        if a.idle:
            idle = idle_phase(b, plain)
        if a.big:
            big = big_phase(b, plain, payload)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    finally:
        stop_all()
        with contextlib.suppress(OSError):
            (run_dir / "big.bin").unlink()
    summary = summarize(results, rows, a.loads)
    checks = targets(results, summary) + extra_targets(idle, big)
    report = table(b, rows, summary, checks) if results else "no load rounds"
    if idle:
        report += f"\n\nIdle keep-alive connections ({a.idle}):\n\n" + idle_table(idle)
    if big:
        report += "\n\n10 MB bodies through the proxy (RSS every 50 ms + VmHWM):\n\n"
        report += big_table(big)
    if idle or big:
        report += "\n\nTargets (extra scenarios):\n" + "\n".join(
            f"- [{t['verdict']}] {t['target']}: {t['detail']}" for t in extra_targets(idle, big)
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta(b),
        "notes": b.notes,
        "summary": summary,
        "targets": checks,
        "runs": results,
        "idle": idle,
        "big": big,
        "interrupted": interrupted,
        "report": report,
    }
    text = json.dumps(doc, indent=1)
    (out / "latest.json").write_text(text)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"run-{stamp}.json").write_text(text)
    print(report)
    print(f"\nresults: {out / 'latest.json'}   logs: {run_dir}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
