"""Client and upstream connection timeouts: every slow or silent peer is let go in time.

The timeouts are set to fractions of a second here; each test awaits what the proxy does when
one expires (a 408, a close, a reset upstream) rather than sleeping past it.
"""

from __future__ import annotations

import argparse
import asyncio

import pytest
from aiohttp import web

from proxy.exchange import ServerSettings
from proxy.flags import positive_seconds
from proxy.istio import load_text

pytestmark = pytest.mark.timeout(30)

SHORT = 0.3


def test_defaults_are_nginx_s() -> None:
    settings = ServerSettings()
    assert (settings.header_timeout, settings.idle_timeout) == (60.0, 75.0)
    assert (settings.body_timeout, settings.send_timeout) == (60.0, 60.0)


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("2", 2.0), ("1m", 60.0),
                                               ("1.5", 1.5), ("1m30s", 90.0)])  # fmt: skip
def test_duration_flags_take_istio_durations_and_seconds(text: str, seconds: float) -> None:
    assert positive_seconds(text) == seconds


@pytest.mark.parametrize("text", ["abc", "0", "-1s", "5 s", ""])
def test_duration_flags_refuse_nonsense(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_seconds(text)


async def test_a_connection_that_never_sends_a_byte_is_closed(
    proxy, pools, forward_all, raw_client
):
    dispatcher = forward_all(pools(1))
    port = await proxy(dispatcher, ServerSettings(header_timeout=SHORT, idle_timeout=30))
    client = await raw_client(port)
    assert await client.at_eof()  # closed after header_timeout, with nothing to answer
    assert dispatcher.dispatched == []


async def test_kept_alive_connection_waits_idle_timeout_not_header_timeout(
    backend, proxy, pools, forward_all, raw_client
):
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    be = await backend(app)
    settings = ServerSettings(header_timeout=SHORT, idle_timeout=3 * SHORT)
    port = await proxy(forward_all(pools(be.port)), settings)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    loop = asyncio.get_running_loop()
    answered = loop.time()
    assert await client.at_eof()
    assert loop.time() - answered >= 3 * SHORT - 0.05  # the idle timeout, not the head's


class Upstream:
    """Reads one request head and whatever body follows, until the proxy closes or resets."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.body = b""
        self.gone = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            while chunk := await reader.read(65536):
                self.body += chunk
        finally:
            self.gone.set()


async def test_a_stalled_request_body_gets_408_and_the_upstream_request_is_reset(
    raw_backend, proxy, pools, forward_all, raw_client
):
    upstream = Upstream()
    dispatcher = forward_all(pools(await raw_backend(upstream)))
    port = await proxy(dispatcher, ServerSettings(body_timeout=SHORT))
    client = await raw_client(port)
    await client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12345")
    resp = await client.read_response()
    assert resp.status == 408 and resp.header("connection") == "close"
    assert await client.at_eof()
    await upstream.gone.wait()  # the request went upstream, then was cut off
    assert len(upstream.heads) == 1 and upstream.body == b"12345"
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.status == 408 and ex.flags == "SI"


async def test_a_slow_but_moving_body_is_not_a_stall(
    raw_backend, proxy, pools, forward_all, raw_client
):
    received = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(8)
        received.set()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    port = await proxy(forward_all(pools(await raw_backend(upstream))),
                       ServerSettings(body_timeout=SHORT))  # fmt: skip
    client = await raw_client(port)
    await client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\n")
    for _ in range(8):  # 8 x SHORT/2: twice the body timeout in all, never silent for long
        await asyncio.sleep(SHORT / 2)  # the client's pace, not a wait for the proxy
        await client.send(b"x")
    await received.wait()
    assert (await client.read_response()).status == 200


async def test_a_client_that_stops_reading_is_let_go(
    backend, proxy, pools, forward_all, raw_client
):
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"e" * 65536)
        except Exception as exc:
            outcome.set_result(type(exc).__name__)
            raise

    app = web.Application()
    app.router.add_get("/endless", endless)
    be = await backend(app)
    dispatcher = forward_all(pools(be.port))
    port = await proxy(dispatcher, ServerSettings(send_timeout=SHORT))
    client = await raw_client(port)
    await client.send(b"GET /endless HTTP/1.1\r\nHost: h\r\n\r\n")
    # ... and never read: the proxy's buffers fill, it stops reading the pod, then gives up.
    assert "Error" in await outcome  # the pod's write failed: its connection was dropped
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "SI" and ex.status == 200


async def test_max_connection_duration_closes_upstream_connections_when_idle(
    raw_backend, proxy, pools, forward_all, raw_client
):
    closed: list[asyncio.Event] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gone = asyncio.Event()
        closed.append(gone)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            gone.set()

    pool = pools(await raw_backend(upstream), max_connection_duration=SHORT)
    client = await raw_client(await proxy(forward_all(pool)))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    await closed[0].wait()  # idle and past its duration: closed by the proxy
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    assert pool.opened == 2


@pytest.mark.parametrize(
    ("pool", "idle"),
    [
        ("tcp: {idleTimeout: 5s}", 5.0),
        ("tcp: {idleTimeout: 0s}", 0.0),
        ("{tcp: {idleTimeout: 5s}, http: {idleTimeout: 7s}}", 7.0),
        ("tcp: {maxConnections: 3}", 3600.0),
    ],
)
def test_tcp_idle_timeout_stands_in_for_the_http_one(pool: str, idle: float) -> None:
    # Istio's applyConnectionPool: both are Envoy's upstream idle_timeout, http's first.
    spec = "{" + pool + "}" if not pool.startswith("{") else pool
    config = load_text(
        f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dr}}
spec:
  host: svc.default.svc.cluster.local
  trafficPolicy: {{connectionPool: {spec}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: se}}
spec:
  hosts: [svc.default.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
"""
    )
    (cluster,) = config.clusters.values()
    assert cluster.pool.idle_timeout == idle
