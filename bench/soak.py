"""Soak: sticky-proxy under a mixed load for N minutes, with reloads and pods killed.

    .venv/bin/python bench/soak.py [--minutes 10] [--sticky 8] [--fresh 2] [--ws 2] [--big 2]

Everything runs on 127.0.0.1: three demo pods (``python -m proxy.demo``, each its own process)
and ``sticky-proxy run`` (``python -m proxy run``) on the article's YAML with a ServiceEntry for
the pods and ``connectionPool.http.idleTimeout: 5s``, so the proxy's idle upstream connections
close soon after the load stops. The load, all at once until the time is up:

    sticky   keep-alive clients, each with its ISTIOID cookie: GET / must come from the same pod
             every time (outside a kill window, where the dead pod's share moves to the next)
    fresh    a new connection and no cookie per request: 200 and a Set-Cookie
    ws       WebSockets through the proxy to /ws: the pod's hello, then 20 echoes, then close
    big      4 MiB down (/bytes, chunked and with Content-Length), 4 MiB up (/upload, sha256
             checked) and 1 MiB through /echo
    reload   every 10 s the YAML is touched and the proxy gets SIGHUP (all must succeed)
    kill     every 60 s one pod (in turn) gets SIGKILL and is started again 3 s later on its port

An error is *caused by the kill* when it happened between a kill and 3 s after that pod's
restart, on a request to that pod or to a pod not known yet; the client then retries it up to
three times, 0.5 s apart, and it counts as retried away when a retry succeeds. Every other
error (and every sticky request that moved outside a kill window) is *other*: there should be
none. At the end the clients stop, the idle upstream connections time out, and the proxy's open
file descriptors must be what they were before the load; its RSS is shown before the load,
after the first minute and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fuzz import open_sockets, process_figures  # noqa: E402
from proxy_process import (  # noqa: E402
    OPS_LOCAL,
    OPS_PORTS,
    ProxyProcess,
    article_yaml,
    proxy_process,
    sample_sum,
    scrape,
)

HOST = "127.0.0.1"
PODS = 3
RELOAD_EVERY = 10.0
KILL_EVERY = 60.0
DOWN_FOR = 3.0  # a killed pod is started again after this long
GRACE = 3.0  # errors up to this long after the restart still count as the kill's
RETRIES = 3  # a client retries a request that failed because of a kill this many times
RETRY_PAUSE = 0.5
IDLE_TIMEOUT = 5  # connectionPool.http.idleTimeout in the YAML, seconds
BIG = 4 * 1024 * 1024
ECHO = 1024 * 1024
HEADERS = {"Host": "test.com"}


class Failure(Exception):
    """A request that came back, but wrong."""


# =========================================================================== pods
class Pods:
    """Demo pods as processes, so a kill is a real SIGKILL (the kernel resets their sockets)."""

    def __init__(self, count: int) -> None:
        self.names = [f"pod-{i + 1}" for i in range(count)]
        self.ports = [_free_port() for _ in range(count)]
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self._drains: list[asyncio.Task[None]] = []

    async def start(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.demo",
            "--host",
            HOST,
            "--port",
            str(self.ports[index]),
            "--name",
            self.names[index],
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        async with asyncio.timeout(20):  # the pod logs "listening" once it has bound its port
            while b"listening on" not in (line := await proc.stderr.readline()):
                if not line:
                    raise RuntimeError(f"{self.names[index]} exited: {await proc.wait()}")
        self._drains.append(asyncio.create_task(_drain(proc.stderr)))  # it logs every request
        self.procs[index] = proc

    async def kill(self, index: int) -> None:
        proc = self.procs[index]
        self.procs[index] = None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def close(self) -> None:
        for index in range(len(self.procs)):
            await self.kill(index)
        for task in self._drains:
            task.cancel()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# =========================================================================== bookkeeping
@dataclass
class Stats:
    done: collections.Counter[str] = field(default_factory=collections.Counter)
    kill_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    retried_away: int = 0
    not_recovered: int = 0
    other: collections.Counter[str] = field(default_factory=collections.Counter)
    other_examples: list[str] = field(default_factory=list)
    bytes_moved: int = 0
    reloads: int = 0
    kills: int = 0
    # (pod, from, to): a kill window; ``to`` is None while the pod is down
    windows: list[tuple[str, float, float | None]] = field(default_factory=list)

    def caused_by_kill(self, pod: str | None, started: float) -> bool:
        now = time.monotonic()
        for name, begin, end in self.windows:
            if (pod is None or pod == name) and started <= (end or now) and now >= begin:
                return True
        return False

    def add_other(self, kind: str, text: str) -> None:
        self.other[kind] += 1
        if len(self.other_examples) < 20:
            self.other_examples.append(f"{kind}: {text}")


Operation = Callable[[], Awaitable[str | None]]  # returns the pod that answered, if known


async def attempt(stats: Stats, kind: str, op: Operation, pod: Callable[[], str | None]) -> None:
    """Run ``op``; after an error caused by a kill, retry it like a client would."""
    started = time.monotonic()
    try:
        await op()
        stats.done[kind] += 1
        return
    except Exception as exc:  # every way a request can fail is classified, none ends the run
        error = f"{type(exc).__name__}: {exc}"
    if not stats.caused_by_kill(pod(), started):
        stats.add_other(kind, error)
        return
    stats.kill_errors[kind] += 1
    for _ in range(RETRIES):
        await asyncio.sleep(RETRY_PAUSE)  # a client's back-off: the pause is the point
        try:
            await op()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            continue
        stats.done[kind] += 1
        stats.retried_away += 1
        return
    stats.not_recovered += 1
    stats.add_other(f"{kind} (still failing after {RETRIES} retries)", error)


# =========================================================================== the clients
async def sticky_client(url: str, stats: Stats, stop: asyncio.Event) -> None:
    """Keep-alive, with its cookie: the same pod every time outside kill windows."""
    home: list[str | None] = [None]
    cookie: list[str | None] = [None]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def one() -> str | None:
            headers = dict(HEADERS)
            if cookie[0] is not None:
                headers["Cookie"] = cookie[0]
            started = time.monotonic()
            async with session.get(url, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise Failure(f"{resp.status} {body[:200]!r}")
                pod = json.loads(body)["pod"]
                set_cookie = resp.headers.get("Set-Cookie")
            if cookie[0] is None:
                if set_cookie is None:
                    raise Failure("the first response has no Set-Cookie")
                cookie[0] = set_cookie.split(";")[0]
                home[0] = pod
            elif pod != home[0] and not stats.caused_by_kill(home[0], started):
                stats.add_other("sticky moved", f"{cookie[0]} went to {pod}, not {home[0]}")
            return str(pod)

        while not stop.is_set():
            await attempt(stats, "sticky", one, lambda: home[0])


async def fresh_client(url: str, stats: Stats, stop: asyncio.Event) -> None:
    """A new connection per request, no cookie: the proxy issues one."""

    async def one() -> str | None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url, headers=HEADERS) as resp,
        ):
            body = await resp.read()
            if resp.status != 200:
                raise Failure(f"{resp.status} {body[:200]!r}")
            if not resp.headers.get("Set-Cookie", "").startswith("ISTIOID="):
                raise Failure(f"no ISTIOID Set-Cookie: {resp.headers!r}")
            return str(json.loads(body)["pod"])

    while not stop.is_set():
        await attempt(stats, "fresh", one, lambda: None)


async def ws_client(url: str, stats: Stats, stop: asyncio.Event) -> None:
    """WebSockets to /ws: the pod's hello, 20 echoes, close."""
    pod: list[str | None] = [None]
    async with aiohttp.ClientSession() as session:

        async def one() -> str | None:
            pod[0] = None
            async with session.ws_connect(url + "/ws", headers=HEADERS) as ws:
                hello = await ws.receive_json(timeout=10)
                pod[0] = hello["pod"]
                for i in range(20):
                    await ws.send_str(f"echo {i}")
                    message = await ws.receive(timeout=10)
                    if message.type != aiohttp.WSMsgType.TEXT or message.data != f"echo {i}":
                        raise Failure(f"echo {i} came back as {message!r}")
            return pod[0]

        while not stop.is_set():
            await attempt(stats, "websocket", one, lambda: pod[0])


async def big_client(url: str, stats: Stats, stop: asyncio.Event, turn: int) -> None:
    """Large bodies both ways, in turn: chunked and Content-Length downloads, upload, echo."""
    pod: list[str | None] = [None]
    payload = os.urandom(BIG)
    digest = hashlib.sha256(payload).hexdigest()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def download(cl: bool) -> str | None:
            pod[0] = None
            query = f"/bytes?n={BIG}" + ("&cl=1" if cl else "")
            async with session.get(url + query, headers=HEADERS) as resp:
                pod[0] = resp.headers.get("X-Pod")
                size = 0
                async for chunk in resp.content.iter_chunked(65536):
                    size += len(chunk)
                if resp.status != 200 or size != BIG:
                    raise Failure(f"download: {resp.status}, {size} bytes of {BIG}")
            stats.bytes_moved += size
            return pod[0]

        async def upload() -> str | None:
            pod[0] = None
            async with session.post(url + "/upload", data=payload, headers=HEADERS) as resp:
                pod[0] = resp.headers.get("X-Pod")
                if resp.status != 200:
                    raise Failure(f"upload: {resp.status} {(await resp.read())[:200]!r}")
                answer = await resp.json()
                if answer.get("received") != BIG or answer.get("sha256") != digest:
                    raise Failure(f"upload: {resp.status} {answer!r}")
            stats.bytes_moved += BIG
            return pod[0]

        async def echo() -> str | None:
            pod[0] = None
            data = payload[:ECHO]
            async with session.post(url + "/echo", data=data, headers=HEADERS) as resp:
                pod[0] = resp.headers.get("X-Pod")
                back = await resp.read()
                if back != data:
                    raise Failure(f"echo: {resp.status}, {len(back)} bytes back, not the same")
            stats.bytes_moved += 2 * ECHO
            return pod[0]

        ops: list[tuple[str, Operation]] = [
            ("download chunked", lambda: download(False)),
            ("download content-length", lambda: download(True)),
            ("upload", upload),
            ("echo", echo),
        ]
        while not stop.is_set():
            kind, op = ops[turn % len(ops)]
            turn += 1
            await attempt(stats, kind, op, lambda: pod[0])


# =========================================================================== the disturbances
async def reloader(proxy: ProxyProcess, yaml: Path, stats: Stats, stop: asyncio.Event) -> None:
    while not await _wait(stop, RELOAD_EVERY):
        os.utime(yaml)
        proxy.signal(signal.SIGHUP)
        stats.reloads += 1


async def killer(pods: Pods, stats: Stats, stop: asyncio.Event) -> None:
    index = 0
    while not await _wait(stop, KILL_EVERY):
        name = pods.names[index]
        began = time.monotonic()
        stats.windows.append((name, began, None))
        await pods.kill(index)
        stats.kills += 1
        await asyncio.sleep(DOWN_FOR)  # the time the pod is down is the point
        await pods.start(index)
        stats.windows[-1] = (name, began, time.monotonic() + GRACE)
        print(f"  killed {name} and started it again", flush=True)
        index = (index + 1) % len(pods.names)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop``; True when stopped."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


# =========================================================================== the run
async def soak(args: argparse.Namespace) -> int:
    stats = Stats()
    stop = asyncio.Event()
    pods = Pods(PODS)
    try:
        for index in range(PODS):
            await pods.start(index)
        with tempfile.TemporaryDirectory() as tmp:
            yaml = Path(tmp) / "soak.yaml"
            text = article_yaml([(HOST, port) for port in pods.ports])
            pool = f"    connectionPool:\n      http:\n        idleTimeout: {IDLE_TIMEOUT}s\n"
            yaml.write_text(text.replace("    loadBalancer:\n", pool + "    loadBalancer:\n", 1))
            run_args = (tmp, "--listen", f"{HOST}:0", "--access-log", "off", *OPS_PORTS, *OPS_LOCAL)
            async with proxy_process(*run_args) as proxy:
                return await _drive(args, proxy, yaml, pods, stats, stop)
    finally:
        await pods.close()


async def _drive(
    args: argparse.Namespace,
    proxy: ProxyProcess,
    yaml: Path,
    pods: Pods,
    stats: Stats,
    stop: asyncio.Event,
) -> int:
    port = await proxy.port("")
    metrics = await proxy.port("metrics")
    for name in ("admin", "readiness"):
        await proxy.port(name)  # every listener is open before the first count
    url = f"http://{HOST}:{port}"
    pid = proxy.proc.pid
    rss0, fds0 = process_figures(pid)
    sockets0 = open_sockets(pid)
    print(f"proxy pid {pid} on {url}: RSS {rss0:.1f} MB, {fds0} fds before the load", flush=True)
    clients = [
        *(sticky_client(url, stats, stop) for _ in range(args.sticky)),
        *(fresh_client(url, stats, stop) for _ in range(args.fresh)),
        *(ws_client(url, stats, stop) for _ in range(args.ws)),
        *(big_client(url, stats, stop, turn) for turn in range(args.big)),
        reloader(proxy, yaml, stats, stop),
        killer(pods, stats, stop),
    ]
    tasks = [asyncio.create_task(c) for c in clients]
    started = time.monotonic()
    rss_warm: float | None = None
    minute = 0
    while time.monotonic() - started < args.minutes * 60:
        await asyncio.sleep(min(60.0, args.minutes * 60 - (time.monotonic() - started)))
        minute += 1
        rss, fds = process_figures(pid)
        if rss_warm is None:
            rss_warm = rss
        print(
            f"{(time.monotonic() - started) / 60:4.1f} min: {sum(stats.done.values())} done, "
            f"{sum(stats.kill_errors.values())} errors from kills, "
            f"{sum(stats.other.values())} other; RSS {rss:.1f} MB, {fds} fds",
            flush=True,
        )
    stop.set()
    async with asyncio.timeout(150):  # a big transfer in flight finishes first
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            stats.add_other("client crashed", repr(result))
    elapsed = time.monotonic() - started

    # The idle upstream connections close after idleTimeout; then the fds are the start's.
    await asyncio.sleep(IDLE_TIMEOUT * 3)  # nothing to await in another process: time passes
    fds1 = process_figures(pid)[1]
    extra = sorted(set(open_sockets(pid)) - set(sockets0))
    rss1 = process_figures(pid)[0]
    async with aiohttp.ClientSession() as session:
        text = await scrape(session, metrics)
    reload_ok = sample_sum(text, "sticky_config_reloads_total", result="success")
    reload_failed = sample_sum(text, "sticky_config_reloads_total", result="failure")
    proxy_errors = [line for line in proxy.lines if " ERROR " in line or "Traceback" in line]

    done = sum(stats.done.values())
    print(f"\n{done} operations in {elapsed:.0f} s ({done / elapsed:.0f}/s), by kind:")
    for kind, count in sorted(stats.done.items()):
        print(f"  {kind:26s} {count}")
    print(f"bytes moved in large bodies: {stats.bytes_moved / 2**30:.2f} GiB")
    print(
        f"reloads: {stats.reloads} sent, {reload_ok:.0f} succeeded, {reload_failed:.0f} failed; "
        f"pods killed and restarted: {stats.kills}"
    )
    print(
        f"errors caused by the kills: {sum(stats.kill_errors.values())} "
        f"({dict(stats.kill_errors)}), retried away {stats.retried_away}, "
        f"not recovered {stats.not_recovered}"
    )
    print(f"other errors: {sum(stats.other.values())} {dict(stats.other)}")
    for example in stats.other_examples:
        print(f"  {example}")
    print(f"proxy ERROR lines: {len(proxy_errors)}")
    for line in proxy_errors[:10]:
        print(f"  {line.rstrip()}")
    print(
        f"proxy RSS: {rss0:.1f} MB before the load, {rss_warm or rss0:.1f} MB after the first "
        f"minute, {rss1:.1f} MB at the end"
    )
    print(f"proxy fds: {fds0} before the load, {fds1} at the end (after idle connections closed)")
    for sock in extra:
        print(f"  still open at the end: {sock}")
    bad = stats.other or proxy_errors or fds1 != fds0 or reload_failed or stats.not_recovered
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (10)")
    parser.add_argument("--sticky", type=int, default=8, help="keep-alive clients with cookies")
    parser.add_argument("--fresh", type=int, default=2, help="clients with a new connection each")
    parser.add_argument("--ws", type=int, default=2, help="WebSocket clients")
    parser.add_argument("--big", type=int, default=2, help="clients moving large bodies")
    args = parser.parse_args()
    print(f"bench/soak.py --minutes {args.minutes}", flush=True)
    import uvloop

    return int(uvloop.run(soak(args)))


if __name__ == "__main__":
    sys.exit(main())
