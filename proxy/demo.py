"""Demo pods: small aiohttp apps that answer with their own name.

Why this exists
---------------
Sticky sessions are only visible when the replicas behind the proxy can be told apart.  Like the
article's app that logs its hostname, every pod here answers JSON carrying its name (and an
``X-Pod`` header), so a browser, ``curl``, the tests and the locust run can all see which pod
served each request and count how many each one got.  The same module is:

* the backends of ``sticky-proxy demo`` (``proxy.demo_command``) and of the end-to-end tests
  (:class:`PodSet` starts N pods on 127.0.0.1 and can stop one and start it again *on the same
  port*, which is how health checking, outlier detection and re-homing of sessions are tested
  with real sockets);
* the container image of the compose/Kubernetes example: ``python -m proxy.demo --port 8080``
  names the pod after the hostname, which is the pod name in Kubernetes.

Routes (anything not listed answers the JSON echo, whatever the method)::

    GET  /healthz              200 "ok" (503 "fail" after POST /healthz/fail; POST /healthz/ok)
    GET  /ws                   WebSocket: sends {"pod": name}, then echoes text and binary
    GET  /slow?ms=N            answers after N milliseconds
    GET  /status/{code}        that status (small text body unless the status forbids one)
    GET  /bytes?n=N[&cl=1]     N bytes in 64 KiB writes, chunked (or with Content-Length)
    POST|PUT /upload           reads the body as a stream; {"pod", "received", "sha256"}
    POST /echo                 streams the request body back

Health probes are not counted in ``request_count``: a proxy's active health checks would
otherwise blur the distribution that the load tests measure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from aiohttp import WSMsgType, web

logger = logging.getLogger("proxy.demo")

_CHUNK = 64 * 1024
_ZEROS = b"\0" * _CHUNK
_MAX_SLOW_MS = 600_000
_MAX_BYTES = 1 << 34
_NO_BODY_STATUSES = frozenset({204, 205, 304})


@dataclass(slots=True)
class PodState:
    """What outlives one run of a pod's server: its name, request count and health flag."""

    name: str
    request_count: int = 0
    healthy: bool = True


POD_STATE = web.AppKey("pod_state", PodState)


def _state(request: web.Request) -> PodState:
    return request.app[POD_STATE]


def _count(request: web.Request) -> int:
    state = _state(request)
    state.request_count += 1
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s %s %s", state.name, request.method, request.path_qs)
    return state.request_count


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer\n") from None
    if not 0 <= value <= maximum:
        raise web.HTTPBadRequest(text=f"{name} must be between 0 and {maximum}\n")
    return value


async def _add_pod_header(request: web.Request, response: web.StreamResponse) -> None:
    # A signal rather than a middleware: streamed responses send their head before a
    # middleware would see them.
    response.headers["X-Pod"] = request.app[POD_STATE].name


async def handle_any(request: web.Request) -> web.Response:
    """The pod's answer to everything else: who served it and what it received."""
    count = _count(request)
    body_bytes = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        body_bytes += len(chunk)
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return web.json_response(
        {
            "pod": _state(request).name,
            "hostname": socket.gethostname(),
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "cookie": request.headers.get("Cookie"),
            "headers": headers,
            "body_bytes": body_bytes,
            "request_count": count,
        }
    )


async def handle_healthz(request: web.Request) -> web.Response:
    if _state(request).healthy:
        return web.Response(text="ok")
    return web.Response(status=503, text="fail")


async def handle_healthz_fail(request: web.Request) -> web.Response:
    _state(request).healthy = False
    return web.Response(text="fail")


async def handle_healthz_ok(request: web.Request) -> web.Response:
    _state(request).healthy = True
    return web.Response(text="ok")


async def handle_ws(request: web.Request) -> web.WebSocketResponse:
    _count(request)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_json({"pod": _state(request).name})
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
        else:
            break
    return ws


async def handle_slow(request: web.Request) -> web.Response:
    count = _count(request)
    ms = _int_param(request, "ms", 100, _MAX_SLOW_MS)
    await asyncio.sleep(ms / 1000)
    return web.json_response({"pod": _state(request).name, "ms": ms, "request_count": count})


async def handle_status(request: web.Request) -> web.Response:
    _count(request)
    try:
        code = int(request.match_info["code"])
    except ValueError:
        raise web.HTTPBadRequest(text="status must be an integer\n") from None
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be between 200 and 599\n")
    if code in _NO_BODY_STATUSES:
        return web.Response(status=code)
    return web.Response(status=code, text=f"{_state(request).name} {code}\n")


async def handle_bytes(request: web.Request) -> web.StreamResponse:
    _count(request)
    n = _int_param(request, "n", 1024, _MAX_BYTES)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("cl") == "1":
        response.content_length = n
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    remaining = n
    while remaining > 0:
        size = min(remaining, _CHUNK)
        await response.write(_ZEROS if size == _CHUNK else _ZEROS[:size])
        remaining -= size
    await response.write_eof()
    return response


async def handle_upload(request: web.Request) -> web.Response:
    _count(request)
    digest = hashlib.sha256()
    received = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        digest.update(chunk)
        received += len(chunk)
    return web.json_response(
        {"pod": _state(request).name, "received": received, "sha256": digest.hexdigest()}
    )


async def handle_echo(request: web.Request) -> web.StreamResponse:
    _count(request)
    response = web.StreamResponse(
        headers={"Content-Type": request.headers.get("Content-Type", "application/octet-stream")}
    )
    if request.content_length is not None:
        response.content_length = request.content_length
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    async for chunk in request.content.iter_chunked(_CHUNK):
        await response.write(chunk)
    await response.write_eof()
    return response


def make_pod_app(name: str, state: PodState | None = None) -> web.Application:
    """One demo pod.  Pass ``state`` to keep counts and health across restarts."""
    app = web.Application()
    app[POD_STATE] = state if state is not None else PodState(name)
    app.on_response_prepare.append(_add_pod_header)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_post("/healthz/fail", handle_healthz_fail)
    app.router.add_post("/healthz/ok", handle_healthz_ok)
    app.router.add_get("/ws", handle_ws)
    app.router.add_get("/slow", handle_slow)
    app.router.add_route("*", "/status/{code}", handle_status)  # any method: retry tests
    app.router.add_get("/bytes", handle_bytes)
    app.router.add_post("/upload", handle_upload)
    app.router.add_put("/upload", handle_upload)
    app.router.add_post("/echo", handle_echo)
    app.router.add_route("*", "/{tail:.*}", handle_any)
    return app


class PodSet:
    """N demo pods on ``host`` (ports chosen by the OS unless given), named pod-1..pod-N.

    Pods are addressed by index (0-based, the order of :attr:`addresses`).  ``stop(i)`` closes
    the listener and the pod's connections (so new connections are refused); ``start(i)`` binds
    the same port again with SO_REUSEADDR and keeps the pod's request count.

    ::

        async with PodSet(3) as pods:
            host, port = pods.addresses[0]
            await pods.stop(0)
            await pods.start(0)
    """

    def __init__(
        self,
        count: int = 3,
        *,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
        shutdown_timeout: float = 0.5,
    ) -> None:
        if ports is not None and len(ports) != count:
            raise ValueError(f"{len(ports)} ports given for {count} pods")
        if names is not None and len(names) != count:
            raise ValueError(f"{len(names)} names given for {count} pods")
        self._host = host
        self._ports: list[int] = list(ports) if ports is not None else [0] * count
        self._states = [
            PodState(name) for name in (names or [f"pod-{i + 1}" for i in range(count)])
        ]
        self._runners: list[web.AppRunner | None] = [None] * count
        self._shutdown_timeout = shutdown_timeout

    async def __aenter__(self) -> PodSet:
        try:
            for index in range(len(self._states)):
                await self.start(index)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(self._host, port) for port in self._ports]

    @property
    def urls(self) -> list[str]:
        return [f"http://{self._host}:{port}" for port in self._ports]

    @property
    def names(self) -> list[str]:
        return [state.name for state in self._states]

    @property
    def request_counts(self) -> list[int]:
        return [state.request_count for state in self._states]

    def reset_counts(self) -> None:
        for state in self._states:
            state.request_count = 0

    def set_healthy(self, index: int, healthy: bool) -> None:
        """What ``POST /healthz/fail`` and ``/healthz/ok`` do, without a request."""
        self._states[index].healthy = healthy

    def is_running(self, index: int) -> bool:
        return self._runners[index] is not None

    async def start(self, index: int) -> None:
        """Start pod ``index``; after a stop it binds the port it had before."""
        if self._runners[index] is not None:
            return
        state = self._states[index]
        runner = web.AppRunner(
            make_pod_app(state.name, state),
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._ports[index], reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._ports[index] = _bound_port(runner)
        self._runners[index] = runner

    async def add(self, name: str | None = None) -> int:
        """Start one more pod, on a port of its own, named ``pod-<n>`` unless ``name``; returns
        its index (scaling up, or the new pod of a rolling restart)."""
        index = len(self._states)
        self._states.append(PodState(name or f"pod-{index + 1}"))
        self._ports.append(0)
        self._runners.append(None)
        await self.start(index)
        return index

    async def stop(self, index: int) -> None:
        """Stop pod ``index``: its port refuses connections until :meth:`start`."""
        runner = self._runners[index]
        if runner is None:
            return
        self._runners[index] = None
        await runner.cleanup()

    async def close(self) -> None:
        for index in range(len(self._runners)):
            await self.stop(index)


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("pod is not listening on a TCP port")


async def _serve(host: str, port: int, name: str) -> None:
    runner = web.AppRunner(make_pod_app(name), access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    logger.info("pod %s listening on %s:%d", name, host, _bound_port(runner))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        logger.info("pod %s stopping", name)
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.demo",
        description="A demo pod that answers every request with its own name.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default 8080)")
    parser.add_argument("--name", default=None, help="pod name (default: the hostname)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    name = args.name or socket.gethostname()
    try:
        asyncio.run(_serve(args.host, args.port, name))
    except OSError as exc:
        logger.error("pod %s cannot listen on %s:%d: %s", name, args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
