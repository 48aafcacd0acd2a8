"""Run the locust sticky-session load test and say whether stickiness held.

::

    .venv/bin/python loadtest/run.py --users 200 --spawn-rate 50 --duration 60s
    .venv/bin/python loadtest/run.py --users 200 --spawn-rate 50 --duration 60s \\
        --kill-pod-at 20s --restart-pod-at 40s
    .venv/bin/python loadtest/run.py --users 50 --duration 30s --target http://127.0.0.1:8080
    .venv/bin/python loadtest/run.py --affinity header --kill-pod-at 5s --eject-for 10s ...

Without ``--target`` the runner owns the system under test: it starts N demo pods
(``proxy.demo.PodSet``) and the proxy in quick mode (``proxy.quick``) in a thread with its own
event loop, so it can stop a pod and start it again on the same port in the middle of the run.
Locust runs headless in a child process (``python -m locust``, never imported here: gevent's
monkey-patching has no place in a process that runs asyncio), for a bounded time.  The two
talk through three files in a temporary directory:

* ``started.json`` - written by the locustfile at test start; pod kills are timed from it, like
  locust's own ``--run-time``;
* ``events.json`` - written here: the pod names and each outage, ``down_at`` *before* the pod
  is stopped and ``up_at`` *after* it listens again (wall clock), so the locustfile can tell a
  session moved because its pod was down (re-homed) from a sticky violation;
* ``summary.json`` - written by the locustfile at test stop: every counter.

Membership changes, the way a Deployment makes them: ``--scale 3,5,2`` starts with 3 pods, then
scales to 5 and to 2; ``--rolling-restart`` then replaces every pod, one at a time, by a new one
on a new port.  The changes are spread evenly over the run; each one rewrites the proxy's YAML
and reloads it (``events.json`` gets a ``change`` first), and a pod that leaves keeps running for
``--grace`` (its termination grace period) before it stops.  ``--persistent`` labels the
service ``istio.io/persistent-session`` (Envoy's stateful-session cookie, which the users then
carry), ``--session-drain`` adds ``sticky-proxy/session-drain``; ``--session-requests N`` makes
a StickyUser open a new session every N requests, so sessions can end inside a drain window.
The summary says, for each change, how many live sessions it broke (moved to another pod).

The last line printed is ``sticky: users=N sessions=S violations=V rehomed=R pods=P
max/mean=X.XX``.  Exit status: 0 when no request broke stickiness (sessions moved off a killed
pod are not violations; see the rules in ``stickiness.py``), 1 on violations or when no session
was served at all, 2 when the run itself failed (bad arguments, locust crashed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")
SESSION_COOKIE = "sticky-session"  # the persistent-session cookie of --persistent

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
EXIT_OK, EXIT_VIOLATIONS, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_USERS = 5000
MAX_DURATION = 3600.0
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """``60``, ``60s``, ``1m30s``, ``1.5m``, ``1h`` -> seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration like 60s, 1m30s or 90")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s


# --------------------------------------------------------------------------- system under test


@dataclass(frozen=True, slots=True)
class Affinity:
    mode: str  # cookie | header | query | source-ip
    key: str  # cookie, header or query parameter name
    ttl: str  # cookie TTL (Istio duration)
    maglev: bool = False
    eject_for: float | None = None  # outlierDetection baseEjectionTime, None: no ejection
    persistent: bool = False  # istio.io/persistent-session on the service
    drain: float = 0.0  # sticky-proxy/session-drain, seconds


class Backend:
    """Demo pods and the proxy, served by an event loop in a thread of this process.

    The proxy reads its YAML from ``config`` (a file), so membership changes rewrite it and
    reload, as an operator (or istiod) would change the proxy's view of the pods.
    """

    def __init__(self, pods: int, affinity: Affinity, config: Path) -> None:
        self.count = pods
        self.affinity = affinity
        self.config = config
        self.url = ""
        self.names: list[str] = []
        self.addresses: list[tuple[str, int]] = []
        self.live: list[int] = []  # the pods in the proxy's configuration, by index
        self.ring_shares: dict[str, float] = {}  # pod -> fraction of the hash space it owns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._pods: Any = None
        self._proxy: Any = None
        self._thread = threading.Thread(target=self._run, name="sut", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"demo pods and proxy not ready after {timeout:.0f}s")
        if self._error is not None:
            raise RuntimeError(f"cannot start demo pods and proxy: {self._error}")

    def _run(self) -> None:
        import uvloop

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._serve())
        except BaseException as exc:  # reported to the main thread by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from proxy.demo import PodSet
        from proxy.server import Proxy, RunOptions

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with PodSet(self.count) as pods:
            self._pods = pods
            self.live = list(range(self.count))
            config = self._write_config()
            options = RunOptions(listen=(("127.0.0.1", 0),), config_paths=(str(self.config),))
            proxy = self._proxy = Proxy(config, options)
            try:
                await proxy.start()
                host, port = proxy.addresses[0]
                self.url = f"http://{host}:{port}"
                self.names = pods.names
                self.addresses = pods.addresses
                self.ring_shares = ring_shares(config, pods.names, pods.addresses)
                self._ready.set()
                await self._stop.wait()
            finally:
                await proxy.stop(grace=1.0)

    def _write_config(self) -> Any:
        from proxy.istio import load_config

        addresses = [self._pods.addresses[i] for i in self.live]
        self.config.write_text(proxy_yaml(self.affinity, addresses), encoding="utf-8")
        return load_config([str(self.config)])

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        assert self._loop is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def kill(self, index: int) -> None:
        self._call(self._pods.stop(index))

    def restart(self, index: int) -> None:
        self._call(self._pods.start(index))

    def scale(self, count: int) -> list[int]:
        """The proxy's pods become ``count``: new pods start (and join), or the last ones
        leave the configuration (returned: the caller stops them after their grace period)."""
        return self._call(self._scale(count))

    def replace(self, position: int) -> tuple[int, int]:
        """A new pod takes the place of the live pod at ``position``: (old, new) indices."""
        return self._call(self._replace(position))

    async def _scale(self, count: int) -> list[int]:
        gone = self.live[count:]
        while len(self.live) < count:
            self.live.append(await self._pods.add())
        self.live = self.live[:count]
        await self._reload()
        return gone

    async def _replace(self, position: int) -> tuple[int, int]:
        old = self.live[position]
        new = await self._pods.add()
        self.live[position] = new
        await self._reload()
        return old, new

    async def _reload(self) -> None:
        self.names = self._pods.names
        self.addresses = self._pods.addresses
        addresses = [self._pods.addresses[i] for i in self.live]
        self.config.write_text(proxy_yaml(self.affinity, addresses), encoding="utf-8")
        if not await self._proxy.reload():
            raise RuntimeError("the proxy refused the new configuration (see its log)")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10.0)


def proxy_config(aff: Affinity, upstreams: list[tuple[str, int]]) -> Any:
    """The proxy's configuration for these pods (``proxy_yaml`` compiled)."""
    from proxy.istio import load_text

    return load_text(proxy_yaml(aff, upstreams), "<loadtest/run.py>")


def proxy_yaml(aff: Affinity, upstreams: list[tuple[str, int]]) -> str:
    """Quick mode's Istio resources for these pods, plus outlier detection and persistent
    sessions when asked."""
    import yaml

    from proxy.quick import QuickOptions, quick_resources

    resources = quick_resources(
        QuickOptions(
            upstreams=tuple(upstreams),
            port=8080,  # the Gateway port; the listener binds a free port instead
            cookie=aff.key if aff.mode == "cookie" else "ISTIOID",
            ttl=aff.ttl,
            header=aff.key if aff.mode == "header" else None,
            query=aff.key if aff.mode == "query" else None,
            source_ip=aff.mode == "source-ip",
            maglev=aff.maglev,
        )
    )
    if aff.eject_for is not None:
        # One failure ejects (a connect failure counts as a 503), and 100 %: Istio's default 10 %
        # never ejects one pod of three.
        for resource in resources:
            if resource["kind"] == "DestinationRule":
                spec: Any = resource["spec"]
                spec["trafficPolicy"]["outlierDetection"] = {
                    "consecutive5xxErrors": 1,
                    "interval": "1s",
                    "baseEjectionTime": f"{aff.eject_for:g}s",
                    "maxEjectionPercent": 100,
                }
    if aff.persistent:
        for resource in resources:
            if resource["kind"] == "ServiceEntry":
                meta: dict[str, Any] = dict(resource["metadata"])  # type: ignore[arg-type]
                meta["labels"] = {"istio.io/persistent-session": SESSION_COOKIE}
                if aff.drain:
                    meta["annotations"] = {"sticky-proxy/session-drain": f"{aff.drain:g}s"}
                resource["metadata"] = meta
    return yaml.safe_dump_all(resources, sort_keys=False)


def ring_shares(
    config: Any, names: list[str], addresses: list[tuple[str, int]]
) -> dict[str, float]:
    """Each pod's share of the hash space, from the same balancer the proxy builds.

    With few pods a ring's arcs are uneven (Envoy's too), so this, not 1/N, is the share of
    sessions to expect on each pod.
    """
    from proxy.cluster import build_balancer
    from proxy.config import StaticEndpoints

    for spec in config.clusters.values():
        if isinstance(spec.endpoints, StaticEndpoints) and spec.endpoints.endpoints:
            balancer = build_balancer(spec.lb, spec.endpoints.endpoints)
            return {
                name: balancer.share(f"{host}:{port}")
                for name, (host, port) in zip(names, addresses, strict=True)
            }
    return {}


class EventsFile:
    """``events.json``: the pods and their outages, replaced atomically on every change."""

    def __init__(self, path: Path, pods: list[str]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"pods": pods, "outages": []}
        self._write()

    def down(self, pod: str, reason: str = "kill") -> None:
        self.data["outages"].append(
            {"pod": pod, "down_at": time.time(), "up_at": None, "reason": reason}
        )
        self._write()

    def change(self, kind: str, label: str, pods: list[str]) -> None:
        """The proxy's pods are about to change (written before the reload)."""
        self.data.setdefault("changes", []).append(
            {"kind": kind, "at": time.time(), "label": label, "done": None}
        )
        self.data["pods"] = sorted(set(self.data["pods"]) | set(pods))
        self._write()

    def changed(self, pods: list[str]) -> None:
        """The change in progress is done; every pod name seen so far (new ones included)."""
        changes = self.data.get("changes", [])
        if changes and changes[-1].get("done") is None:
            changes[-1]["done"] = time.time()
        self.data["pods"] = sorted(set(self.data["pods"]) | set(pods))
        self._write()

    def up(self, pod: str) -> None:
        for outage in self.data["outages"]:
            if outage["pod"] == pod and outage["up_at"] is None:
                outage["up_at"] = time.time()
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data), encoding="utf-8")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- the run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loadtest/run.py",
        description="Locust through the proxy, headless and bounded; reports sticky violations, "
        "sessions per pod and sessions re-homed by a pod failure.",
        epilog="Arguments after -- go to locust, e.g. -- --sticky-pod-from header:X-Pod",
    )
    p.add_argument("--users", type=int, default=20, help="peak users (default 20)")
    p.add_argument("--spawn-rate", type=float, default=10.0, help="users started per second")
    p.add_argument("--duration", type=parse_duration, default=60.0, help="run time (60s)")
    p.add_argument("--target", help="proxy URL to test; without it demo pods and a proxy start")
    p.add_argument("--pods", type=int, default=3, help="demo pods to start (default 3)")
    p.add_argument(
        "--affinity",
        choices=("cookie", "header", "query", "source-ip"),
        default="cookie",
        help="what carries the session (default cookie)",
    )
    p.add_argument(
        "--key", default="", help="cookie/header/query name (ISTIOID, x-session, session)"
    )
    p.add_argument("--ttl", default="60s", help="cookie TTL of the started proxy (default 60s)")
    p.add_argument("--maglev", action="store_true", help="started proxy uses a Maglev table")
    p.add_argument(
        "--eject-for",
        type=parse_duration,
        metavar="DURATION",
        help="started proxy ejects a failing pod for this long (outlierDetection)",
    )
    p.add_argument("--kill-pod-at", type=parse_duration, help="stop a pod this long into the test")
    p.add_argument("--restart-pod-at", type=parse_duration, help="start it again at this time")
    p.add_argument("--kill-pod", type=int, default=1, help="which pod: 1 for pod-1 (default)")
    p.add_argument(
        "--scale",
        type=parse_counts,
        metavar="N,N,...",
        help="pod counts over the run: start with the first, scale to each next (3,5,2)",
    )
    p.add_argument(
        "--rolling-restart",
        action="store_true",
        help="replace every pod, one at a time, by a new one on a new port (after --scale)",
    )
    p.add_argument(
        "--grace",
        type=parse_duration,
        metavar="DURATION",
        help="a pod that leaves keeps running this long before it stops "
        "(default: --session-drain, else 10s)",
    )
    p.add_argument(
        "--persistent",
        action="store_true",
        help="started proxy: istio.io/persistent-session on the service (Envoy's cookie "
        f"{SESSION_COOKIE}, which the users carry)",
    )
    p.add_argument(
        "--session-drain",
        type=parse_duration,
        metavar="DURATION",
        help="started proxy: sticky-proxy/session-drain (needs --persistent)",
    )
    p.add_argument(
        "--session-requests",
        type=int,
        default=0,
        metavar="N",
        help="a StickyUser opens a new session every N requests (default 0: one for its life)",
    )
    p.add_argument("--no-visitors", action="store_true", help="StickyUser only, no NewVisitorUser")
    p.add_argument("--csv", metavar="PREFIX", help="locust's CSV statistics")
    p.add_argument("--html", metavar="FILE", help="locust's HTML report")
    p.add_argument("--json", metavar="FILE", help="keep the sticky counters (summary.json) here")
    p.add_argument("--verbose", action="store_true", help="locust's periodic statistics too")
    p.add_argument("locust_args", nargs="*", help=argparse.SUPPRESS)
    return p


def parse_counts(text: str) -> list[int]:
    """``3,5,2`` -> [3, 5, 2] (pods, 1..64 each, at least two counts)."""
    parts = text.split(",")
    if len(parts) < 2 or not all(p.strip().isdigit() and 1 <= int(p) <= 64 for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected pod counts like 3,5,2 (1 to 64 each, at least two)"
        )
    return [int(p) for p in parts]


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.users <= MAX_USERS:
        p.error(f"--users must be between 1 and {MAX_USERS}")
    if args.spawn_rate <= 0:
        p.error("--spawn-rate must be positive")
    if not 1 <= args.duration <= MAX_DURATION:
        p.error(f"--duration must be between 1s and {MAX_DURATION:.0f}s")
    if not 1 <= args.pods <= 64:
        p.error("--pods must be between 1 and 64")
    if args.target and (args.eject_for is not None or args.maglev):
        p.error("--eject-for and --maglev configure the runner's own proxy: drop --target")
    if args.restart_pod_at is not None and args.kill_pod_at is None:
        p.error("--restart-pod-at needs --kill-pod-at")
    if args.session_drain is not None and not args.persistent:
        p.error("--session-drain drains persistent sessions: add --persistent")
    if args.session_requests < 0:
        p.error("--session-requests must be >= 0")
    changing = args.scale is not None or args.rolling_restart
    if (args.persistent or changing) and args.target:
        p.error("--persistent, --scale and --rolling-restart configure the runner's own proxy "
                "and pods: drop --target")  # fmt: skip
    if changing and args.kill_pod_at is not None:
        p.error("--kill-pod-at does not combine with --scale or --rolling-restart")
    if args.scale is not None:
        args.pods = args.scale[0]
    if changing:
        grace = change_grace(args)
        spacing = args.duration / (len(change_plan(args)) + 1)
        if spacing <= grace + 2:
            p.error(
                f"changes every {spacing:.1f}s leave no time for a pod's {grace:g}s grace period: "
                "give a longer --duration or a shorter --grace"
            )
    if args.kill_pod_at is not None:
        if args.target:
            p.error("--kill-pod-at needs the runner's own pods: drop --target")
        if not 0 < args.kill_pod_at < args.duration:
            p.error("--kill-pod-at must fall inside --duration")
        if args.restart_pod_at is not None and not args.kill_pod_at < args.restart_pod_at:
            p.error("--restart-pod-at must come after --kill-pod-at")
        if not 1 <= args.kill_pod <= args.pods:
            p.error(f"--kill-pod must be between 1 and --pods ({args.pods})")
        if args.pods < 2:
            p.error("a kill scenario needs at least 2 pods")


def change_grace(args: argparse.Namespace) -> float:
    if args.grace is not None:
        return float(args.grace)
    return float(args.session_drain) if args.session_drain is not None else 10.0


def change_plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The membership changes, in order: ("scale", count) and ("restart", position)."""
    plan: list[tuple[str, int]] = []
    counts = args.scale or [args.pods]
    plan += [("scale", count) for count in counts[1:]]
    if args.rolling_restart:
        plan += [("restart", position) for position in range(counts[-1])]
    return plan


def locust_command(args: argparse.Namespace, url: str, tmp: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{math.ceil(args.duration)}s",
        "--host",
        url,
        "--sticky-affinity",
        args.affinity,
        "--sticky-summary",
        str(tmp / "summary.json"),
        "--sticky-started",
        str(tmp / "started.json"),
        "--sticky-quiet",
    ]
    if args.key:
        cmd += ["--sticky-key", args.key]
    elif args.persistent:
        cmd += ["--sticky-key", SESSION_COOKIE]
    if args.session_requests:
        cmd += ["--sticky-session-requests", str(args.session_requests)]
    if not args.target:
        cmd += ["--sticky-events", str(tmp / "events.json")]
    if not args.verbose:
        cmd += ["--only-summary"]
    if args.csv:
        cmd += ["--csv", args.csv]
    if args.html:
        cmd += ["--html", args.html]
    cmd += args.locust_args
    if args.no_visitors:
        cmd += ["StickyUser"]
    return cmd


def wait_for_start(proc: subprocess.Popen[bytes], marker: Path, timeout: float = 60.0) -> float:
    """The test start time the locustfile wrote; raises if locust exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            return float(json.loads(marker.read_text(encoding="utf-8"))["started_at"])
        if proc.poll() is not None:
            raise RuntimeError(
                f"locust exited with status {proc.returncode} before the test started"
            )
        time.sleep(0.05)
    raise RuntimeError(f"locust did not start the test within {timeout:.0f}s")


def drive(
    args: argparse.Namespace,
    proc: subprocess.Popen[bytes],
    backend: Backend | None,
    events_file: EventsFile | None,
    tmp: Path,
) -> None:
    """Wait for locust, killing and restarting the pod, or changing the pods, on schedule."""
    limit = args.duration + 60.0
    plan = change_plan(args)
    if len(plan) and backend is not None and events_file is not None:
        started = wait_for_start(proc, tmp / "started.json")
        change_pods(args, proc, backend, events_file, started, plan)
        limit = max(1.0, started + limit - time.time())
    elif args.kill_pod_at is not None and backend is not None and events_file is not None:
        started = wait_for_start(proc, tmp / "started.json")
        index = args.kill_pod - 1
        pod = backend.names[index]
        plan = [(args.kill_pod_at, "kill")]
        if args.restart_pod_at is not None:
            plan.append((args.restart_pod_at, "restart"))
        for at, action in plan:
            remaining = started + at - time.time()
            if remaining > 0:
                try:
                    proc.wait(timeout=remaining)
                    return  # locust ended before the event
                except subprocess.TimeoutExpired:
                    pass
            if action == "kill":
                events_file.down(pod)
                backend.kill(index)
                print(f"run.py: {pod} stopped at {time.time() - started:.1f}s", flush=True)
            else:
                backend.restart(index)
                events_file.up(pod)
                print(f"run.py: {pod} started again at {time.time() - started:.1f}s", flush=True)
        limit = max(1.0, started + limit - time.time())
    proc.wait(timeout=limit)


def change_pods(
    args: argparse.Namespace,
    proc: subprocess.Popen[bytes],
    backend: Backend,
    events_file: EventsFile,
    started: float,
    plan: list[tuple[str, int]],
) -> None:
    """Apply ``plan`` evenly over the run; each pod that leaves stops after the grace period."""
    grace = change_grace(args)
    spacing = args.duration / (len(plan) + 1)
    actions: list[tuple[float, int, str, int]] = [
        (started + spacing * (i + 1), i, kind, value) for i, (kind, value) in enumerate(plan)
    ]
    heapq.heapify(actions)
    order = len(actions)
    while actions:
        at, _, kind, value = heapq.heappop(actions)
        remaining = at - time.time()
        if remaining > 0:
            try:
                proc.wait(timeout=remaining)
                return  # locust ended first
            except subprocess.TimeoutExpired:
                pass
        offset = time.time() - started
        if kind == "stop":
            pod = backend.names[value]
            events_file.down(pod, "left")
            backend.kill(value)
            print(f"run.py: {pod} stopped at {offset:.1f}s (after its grace period)", flush=True)
            continue
        before = len(backend.live)
        # A pod's termination starts when it leaves the endpoints, before the proxy hears of it:
        # so its grace period (and its stop) is timed from here, not from the reload's end.
        stop_at = time.time() + grace
        if kind == "scale":
            label = f"{before} -> {value} pods"
            events_file.change("scale-up" if value > before else "scale-down", label, [])
            gone = backend.scale(value)
        else:
            old_name = backend.names[backend.live[value]]
            label = f"{old_name} -> pod-{len(backend.names) + 1}"  # PodSet.add's next name
            events_file.change("restart", label, [])
            old, _ = backend.replace(value)
            gone = [old]
        events_file.changed(backend.names)
        print(f"run.py: {label} at {offset:.1f}s", flush=True)
        for index in gone:
            order += 1
            heapq.heappush(actions, (stop_at, order, "stop", index))


def stop_process(proc: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    """Let locust finish for ``grace`` seconds, then SIGTERM, then SIGKILL."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- the report


def sticky_line(data: dict[str, Any]) -> str:
    return (
        f"sticky: users={data['users']} sessions={data['sessions']} "
        f"violations={data['violations']} rehomed={data['rehomed']} "
        f"pods={data['pod_count']} max/mean={data['max_mean']:.2f}"
    )


def render(data: dict[str, Any], args: argparse.Namespace, url: str) -> list[str]:
    shares: dict[str, float] = data.get("ring_shares", {})
    mode = args.affinity + (f" {args.key}" if args.key else "")
    lines = [
        "",
        f"== sticky sessions: {data['users']} users for {args.duration:g}s through {url} "
        f"({mode} affinity)",
        f"{'pod':<16} {'sessions':>8} {'share':>7} {'ring':>7} {'requests':>9}",
    ]
    total = data["sessions"] or 1
    for pod, counts in data["pods"].items():
        share = 100 * counts["sessions"] / total
        ring = f"{100 * shares[pod]:6.1f}%" if pod in shares else f"{'-':>7}"
        lines.append(
            f"{pod:<16} {counts['sessions']:>8} {share:>6.1f}% {ring} {counts['requests']:>9}"
        )
    reasons = ", ".join(f"{k} x{v}" for k, v in data["failure_reasons"].items()) or "-"
    lines += [
        f"sessions per pod: max/mean {data['max_mean']:.2f} over {data['pod_count']} pods "
        f"({data['sessions']} StickyUser sessions, {data['renewed']} renewed after cookie expiry, "
        f"{data['cookie_reissued']} cookies issued although the request sent one)",
        f"requests: {data['served']} served, {data['failed']} failed "
        f"({data['failed_in_outage']} during pod outages): {reasons}",
        f"visitors: {data['visitor_sessions']} sessions, {data['visitor_violations']} violations, "
        f"{data['visitor_rehomed']} re-homed, {data['visitor_moved_home']} moved to their pod "
        "after its restart",
    ]
    for outage in data["outages"]:
        if outage.get("reason") == "left":
            lines.append(
                f"stop: {outage['pod']} (it left the proxy at a change) stopped at "
                f"{outage['down_at']:.1f}s: {outage['sessions_of_pod']} live sessions were "
                f"still on it, re-homed {outage['rehomed']}"
            )
            continue
        up = "stayed down" if outage["up_at"] is None else f"up at {outage['up_at']:.1f}s"
        owned = shares.get(outage["pod"])
        ring_text = "" if owned is None else f"its ring share {100 * owned:.1f}%; "
        one_in_n = 100 * outage["expected_share"]
        lines.append(
            f"kill: {outage['pod']} down at {outage['down_at']:.1f}s, {up}: "
            f"{outage['sessions_of_pod']} of {outage['sessions_alive']} live sessions were on it "
            f"({100 * outage['share']:.1f}%; {ring_text}1/N = {one_in_n:.1f}%); "
            f"re-homed {outage['rehomed']}/{outage['sessions_of_pod']}, "
            f"back on {outage['pod']} after restart {outage['returned']}/{outage['rehomed']}"
        )
    lines += change_lines(data)
    lines.append(
        f"violations: {data['violations']} (sessions of surviving pods served elsewhere, or "
        "moved without an outage)"
    )
    lines += [f"  {sample}" for sample in data["violation_samples"][:10]]
    lines.append(sticky_line(data))
    return lines


def change_lines(data: dict[str, Any]) -> list[str]:
    """One line per membership change, then the sessions broken per kind of change."""
    lines = []
    totals: dict[str, list[int]] = {}
    for change in data.get("changes", []):
        alive, broken = change["sessions_alive"], change["sessions_broken"]
        share = f" ({100 * broken / alive:.1f}%)" if alive else ""
        lines.append(
            f"change: {change['kind']} {change['label']} at {change['at']:.1f}s: "
            f"{broken} of {alive} live sessions broken{share}"
        )
        total = totals.setdefault(change["kind"], [0, 0])
        total[0] += broken
        total[1] += alive
    if totals:
        lines.append(
            "sessions broken per event: "
            + ", ".join(f"{kind} {b}/{a}" for kind, (b, a) in totals.items())
            + f" (moved by a change: {data.get('moved_by_change', 0)})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if importlib.util.find_spec("locust") is None:
        print("run.py: locust is not installed: pip install -e '.[loadtest]'", file=sys.stderr)
        return EXIT_ERROR
    signal.signal(signal.SIGTERM, _exit_on_signal)
    key = args.key or {"cookie": "ISTIOID", "header": "x-session", "query": "session"}.get(
        args.affinity, ""
    )
    backend: Backend | None = None
    proc: subprocess.Popen[bytes] | None = None
    interrupted = False
    url = ""
    with tempfile.TemporaryDirectory(prefix="sticky-loadtest-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            events_file = None
            if args.target:
                url = args.target.rstrip("/")
            else:
                backend = Backend(
                    args.pods,
                    Affinity(
                        args.affinity,
                        key,
                        args.ttl,
                        args.maglev,
                        args.eject_for,
                        args.persistent,
                        args.session_drain or 0.0,
                    ),
                    tmp / "istio.yaml",
                )
                backend.start()
                url = backend.url
                events_file = EventsFile(tmp / "events.json", backend.names)
                pods = ", ".join(
                    f"{n} {h}:{p}"
                    for n, (h, p) in zip(backend.names, backend.addresses, strict=True)
                )
                print(f"run.py: proxy {url} -> {pods}", flush=True)
            cmd = locust_command(args, url, tmp)
            proc = subprocess.Popen(cmd)
            drive(args, proc, backend, events_file, tmp)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"run.py: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:  # locust got the SIGINT too and stops with a summary
            print("run.py: interrupted", file=sys.stderr)
            interrupted = True
        finally:
            if proc is not None:
                stop_process(proc, grace=10.0 if interrupted else 0.0)
            if backend is not None:
                backend.stop()
        summary = tmp / "summary.json"
        if not summary.exists():
            if interrupted:
                return EXIT_INTERRUPTED
            status = proc.returncode if proc is not None else None
            print(f"run.py: locust wrote no summary (exit status {status})", file=sys.stderr)
            return EXIT_ERROR
        data = json.loads(summary.read_text(encoding="utf-8"))
        if backend is not None:
            data["ring_shares"] = backend.ring_shares
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print("\n".join(render(data, args, url)), flush=True)
    if data["violations"] or not data["sessions"]:
        return EXIT_VIOLATIONS
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
