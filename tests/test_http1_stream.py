"""proxy.http1: streaming with backpressure, disconnects, WebSocket tunnels, uvloop.

The memory tests run the proxy in a child process (``python tests/test_http1_stream.py LOOP
PORT`` serves a forward-everything proxy) and read its peak RSS (VmHWM): a proxy that buffered a
10 MB body would grow by at least 10 MB; one that streams grows by a few socket reads.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.exchange import Dispatcher, Exchange, Forward, LocalReply, ServerSettings
from proxy.http1 import serve
from proxy.pool import UpstreamPool

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024
BIG = 10 * MB
PIECE = 64 * 1024
# Peak RSS growth allowed while 10 MB pass through: streaming measured 0-0.4 MB, the same
# proxy without backpressure 5-7 MB (the kernel socket buffers absorb the rest).
MAX_GROWTH = 2 * MB


def stream_app() -> web.Application:
    """/download?n=N sends N bytes as fast as it can; /upload counts the body (?slow=1 slowly)."""
    app = web.Application()

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["n"])
        resp = web.StreamResponse()
        if "chunked" in request.query:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        piece = b"d" * PIECE
        sent = 0
        while sent < size:
            n = min(PIECE, size - sent)
            await resp.write(piece[:n])
            sent += n
        await resp.write_eof()
        return resp

    async def upload(request: web.Request) -> web.Response:
        total = 0
        slow = "slow" in request.query
        while chunk := await request.content.read(16 * 1024 if slow else PIECE):
            total += len(chunk)
            if slow:
                await asyncio.sleep(0.0005)  # a slow consumer, by definition
        return web.Response(text=str(total))

    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    return app


# --------------------------------------------------------------------------- child proxy
class _ForwardAll(Dispatcher):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def dispatch(self, exchange: Exchange) -> Forward | LocalReply:
        return Forward(self.pool)

    def finished(self, exchange: Exchange) -> None:
        pass


async def _child_main(upstream_port: int) -> None:
    server = await serve(_ForwardAll(UpstreamPool("127.0.0.1", upstream_port)), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildProxy:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    def peak_rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


@pytest.fixture(params=["asyncio", "uvloop"])
async def child_proxy(request, backend) -> AsyncIterator[ChildProxy]:
    be = await backend(stream_app())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        request.param,
        str(be.port),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        child = ChildProxy(proc, int(await proc.stdout.readline()))
        # Warm up: the first big transfers size Python's and the allocator's pools.
        async with aiohttp.ClientSession() as session:
            await download(session, child.port, MB)
            await upload(session, child.port, MB)
        yield child
    finally:
        proc.terminate()
        await proc.wait()


async def download(session: aiohttp.ClientSession, port: int, size: int, query: str = "") -> int:
    got = 0
    async with session.get(f"http://127.0.0.1:{port}/download?n={size}{query}") as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(PIECE):
            got += len(chunk)
    return got


async def body_pieces(size: int) -> AsyncIterator[bytes]:
    piece = b"u" * PIECE
    for sent in range(0, size, PIECE):
        yield piece[: min(PIECE, size - sent)]


async def upload(session: aiohttp.ClientSession, port: int, size: int, query: str = "") -> int:
    async with session.post(
        f"http://127.0.0.1:{port}/upload{query}",
        data=body_pieces(size),
        headers={"content-length": str(size)},
    ) as r:
        assert r.status == 200
        return int(await r.text())


async def test_10mb_download_and_upload_stream_with_flat_memory(child_proxy):
    before = child_proxy.peak_rss()
    async with aiohttp.ClientSession() as session:
        assert await download(session, child_proxy.port, BIG) == BIG
        assert await download(session, child_proxy.port, BIG, "&chunked=1") == BIG
        assert await upload(session, child_proxy.port, BIG) == BIG
    growth = child_proxy.peak_rss() - before
    assert growth < MAX_GROWTH, f"proxy peak RSS grew by {growth / MB:.1f} MB"


async def test_slow_client_fast_upstream_bounded(child_proxy, raw_client):
    before = child_proxy.peak_rss()
    client = await raw_client(child_proxy.port)
    await client.send(b"GET /download?n=%d HTTP/1.1\r\nHost: h\r\n\r\n" % BIG)
    head = await client.read_head()
    assert head.status == 200
    got = 0
    while got < BIG:
        got += len(await client.reader.read(16 * 1024))
        await asyncio.sleep(0.0005)  # a slow reader, by definition
    growth = child_proxy.peak_rss() - before
    assert growth < MAX_GROWTH, f"proxy peak RSS grew by {growth / MB:.1f} MB"


async def test_fast_client_slow_upstream_bounded(child_proxy):
    before = child_proxy.peak_rss()
    async with aiohttp.ClientSession() as session:
        assert await upload(session, child_proxy.port, BIG, "?slow=1") == BIG
    growth = child_proxy.peak_rss() - before
    assert growth < MAX_GROWTH, f"proxy peak RSS grew by {growth / MB:.1f} MB"


# --------------------------------------------------------------------------- disconnects
async def test_client_disconnect_mid_body_aborts_upstream(
    backend, proxy, pools, forward_all, raw_client
):
    app = web.Application()
    outcome: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
    half = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        total = 0
        try:
            while chunk := await request.content.read(PIECE):
                total += len(chunk)
                if total >= MB // 2:
                    half.set()
        except Exception as exc:  # what the backend sees when the proxy drops the request
            outcome.set_result((total, type(exc).__name__))
            raise
        outcome.set_result((total, "complete"))
        return web.Response(text=str(total))

    app.router.add_post("/upload", upload)
    be = await backend(app)
    pool = pools(be.port)
    dispatcher = forward_all(pool)
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % BIG)
    await client.send(b"x" * MB)
    await half.wait()  # the body is streaming through to the backend
    client.writer.transport.abort()
    received, how = await outcome
    assert received < BIG and how != "complete"
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "DC" and ex.status == 0
    assert pool.idle_count == 0  # the upstream connection was closed, not pooled


async def test_client_disconnect_mid_response_closes_upstream(
    backend, proxy, pools, forward_all, raw_client
):
    app = web.Application()
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"e" * PIECE)
        except Exception as exc:
            outcome.set_result(type(exc).__name__)
            raise

    app.router.add_get("/endless", endless)
    be = await backend(app)
    pool = pools(be.port)
    dispatcher = forward_all(pool)
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET /endless HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_head()).status == 200
    await client.reader.readexactly(MB)
    client.writer.transport.abort()
    assert "Error" in await outcome  # the backend's write failed: its connection was dropped
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "DC" and ex.status == 200 and ex.bytes_sent >= MB
    assert pool.idle_count == 0


# --------------------------------------------------------------------------- WebSocket
def ws_app() -> web.Application:
    app = web.Application()

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo " + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app.router.add_get("/ws", echo)
    return app


COOKIE = b'set-cookie: ISTIOID="4f2d"; Max-Age=60; HttpOnly\r\n'


def masked_text_frame(text: bytes) -> bytes:
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    assert len(text) < 126
    return struct.pack("!BB", 0x81, 0x80 | len(text)) + mask + payload


async def test_websocket_tunnel_with_cookie_on_101(backend, proxy, pools, forward_all, raw_client):
    be = await backend(ws_app())
    dispatcher = forward_all(pools(be.port), set_cookie=COOKIE)
    port = await proxy(dispatcher)

    # Byte level: the 101 carries the cookie and the upgrade headers, then frames flow.
    client = await raw_client(port)
    key = base64.b64encode(os.urandom(16))
    await client.send(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    head = await client.read_head()
    assert head.status == 101
    assert head.header("set-cookie") == 'ISTIOID="4f2d"; Max-Age=60; HttpOnly'
    assert head.header("upgrade") == "websocket"
    assert head.header("connection") == "upgrade"
    await client.send(masked_text_frame(b"hi"))
    assert await client.reader.readexactly(9) == b"\x81\x07echo hi"

    # aiohttp client: many messages both ways, one big enough to need backpressure.
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws,
    ):
        for i in range(50):
            await ws.send_str(f"m{i}")
            assert (await ws.receive_str()) == f"echo m{i}"
        big = os.urandom(3 * MB)  # aiohttp caps messages at 4 MB
        await ws.send_bytes(big)
        assert (await ws.receive_bytes()) == big
    await client.close()
    done = await dispatcher.wait_finished(2)
    assert [e.status for e in done] == [101, 101]
    assert all(e.flags == "-" for e in done)
    assert max(e.bytes_sent for e in done) > 3 * MB


async def test_upgrade_refused_by_upstream(backend, proxy, pools, forward_all, raw_client):
    app = web.Application()

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="no upgrade here")

    app.router.add_get("/ws", plain)
    be = await backend(app)
    port = await proxy(forward_all(pools(be.port)))
    client = await raw_client(port)
    await client.send(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"no upgrade here"
    assert resp.header("connection") == "close"  # the bytes after the head were not HTTP
    assert await client.at_eof()


class H2cPod:
    """A pod that switches to h2c when asked (and then ignores everything), else echoes the
    request line and body; records every request head it reads."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            lower = head.lower()
            if b"upgrade: h2c" in lower:
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: h2c\r\n\r\n")  # fmt: skip
                await reader.read()
                return
            body = b""
            if b"content-length:" in lower:
                length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
            elif b"transfer-encoding: chunked" in lower:
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    body += (await reader.readexactly(size + 2))[:size]
                await reader.readuntil(b"\r\n")
            text = head.split(b"\r\n")[0] + b" " + body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
            await writer.drain()


H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"


@pytest.mark.parametrize(
    "request_",
    [
        b"GET /one HTTP/1.1\r\nHost: h\r\n" + H2C + b"\r\n",
        b"POST /one HTTP/1.1\r\nHost: h\r\n" + H2C + b"Content-Length: 5\r\n\r\nhello",
        b"POST /one HTTP/1.1\r\nHost: h\r\n" + H2C
        + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
    ],
    ids=["get", "post-content-length", "post-chunked"],
)  # fmt: skip
async def test_h2c_upgrade_is_stripped_and_http_goes_on(
    raw_backend, proxy, pools, forward_all, raw_client, request_
):
    # An h2c-capable pod must never be asked: after its 101, raw requests on that connection
    # would reach it unrouted. Like Envoy and nginx, the request goes on as HTTP/1.1, its body
    # included, and so does a request pipelined behind it.
    pod = H2cPod()
    port = await proxy(forward_all(pools(await raw_backend(pod))))
    client = await raw_client(port)
    await client.send(request_ + b"GET /two HTTP/1.1\r\nHost: h\r\n\r\n")
    first = await client.read_response()
    second = await client.read_response()
    assert first.status == 200 and second.status == 200
    method = request_.split(b" ")[0]
    assert first.body == method + b" /one HTTP/1.1 " + (b"hello" if method == b"POST" else b"")
    assert second.body == b"GET /two HTTP/1.1 "
    assert len(pod.heads) == 2
    for head in pod.heads:
        assert b"upgrade" not in head.lower() and b"http2-settings" not in head.lower()


async def test_bytes_after_a_queued_upgrade_request_belong_to_it(
    raw_backend, proxy, pools, forward_all, raw_client
):
    # The first request of a new pool is active while its connection is being made; the
    # upgrade request queued behind it owns what follows its head (the new protocol's bytes):
    # they once went into the first request's held body, and to the pod as a request.
    heads: list[bytes] = []

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head.split(b"\r\n")[0])
            if b"upgrade: websocket" in head.lower():
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: websocket\r\n\r\n")  # fmt: skip
                await writer.drain()
                await reader.read()  # the tunnel: raw bytes, no more requests
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    port = await proxy(forward_all(pools(await raw_backend(pod))))
    client = await raw_client(port)
    await client.send(
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert (await client.read_response()).status == 200
    assert (await client.read_head()).status == 101
    assert heads == [b"GET /a HTTP/1.1", b"GET /ws HTTP/1.1"]


async def test_a_request_refused_after_a_stripped_h2c_one_gets_its_4xx(
    raw_backend, proxy, pools, forward_all, raw_client, caplog
):
    pod = H2cPod()
    port = await proxy(forward_all(pools(await raw_backend(pod))))
    client = await raw_client(port)
    await client.send(
        b"GET /one HTTP/1.1\r\nHost: h\r\n" + H2C + b"\r\n"
        b"GET http://h/two HTTP/1.1\r\nHost: other\r\n\r\n"
    )
    assert (await client.read_response()).status == 200
    resp = await client.read_response()
    assert resp.status == 400 and resp.body == b"host header does not match the request target"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_upgrade_in_an_http10_request_is_ignored(
    raw_backend, proxy, pools, forward_all, raw_client
):
    # RFC 9110 §7.8: a server must ignore Upgrade in an HTTP/1.0 request.
    pod = H2cPod()
    port = await proxy(forward_all(pools(await raw_backend(pod))))
    client = await raw_client(port)
    await client.send(
        b"GET /one HTTP/1.0\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"GET /one HTTP/1.1 "
    assert b"upgrade" not in pod.heads[0].lower()


async def test_upgrade_to_a_protocol_not_allowed_is_403(
    backend, proxy, pools, forward_all, raw_client
):
    dispatcher = forward_all(pools(1))  # never dispatched
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 403 and resp.header("connection") == "close"
    assert await client.at_eof()
    assert dispatcher.dispatched == []


async def test_allowed_upgrades_are_a_listener_setting(
    raw_backend, proxy, pools, forward_all, raw_client
):
    pod = H2cPod()
    settings = ServerSettings(upgrades=frozenset({b"websocket", b"foo"}))
    port = await proxy(forward_all(pools(await raw_backend(pod))), settings)
    client = await raw_client(port)
    await client.send(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: Foo\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200  # the pod would not switch to foo: a plain answer, then close
    assert b"upgrade: Foo" in pod.heads[0]
    with pytest.raises(ValueError, match="h2c"):
        ServerSettings(upgrades=frozenset({b"h2c"}))


# --------------------------------------------------------------------------- uvloop
def test_on_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        runner = web.AppRunner(stream_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        be_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ws_runner = web.AppRunner(ws_app(), access_log=None)
        await ws_runner.setup()
        ws_site = web.TCPSite(ws_runner, "127.0.0.1", 0)
        await ws_site.start()
        ws_port = ws_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pool = UpstreamPool("127.0.0.1", be_port)
        server = await serve(_ForwardAll(pool), "127.0.0.1", 0)
        ws_server = await serve(_ForwardAll(UpstreamPool("127.0.0.1", ws_port)), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(5):
                    assert await download(session, port, 1000) == 1000
                assert await download(session, port, 3 * MB, "&chunked=1") == 3 * MB
                assert await upload(session, port, 3 * MB) == 3 * MB
                async with session.ws_connect(
                    f"http://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}/ws"
                ) as ws:
                    await ws.send_str("uv")
                    assert await ws.receive_str() == "echo uv"
            assert pool.opened == 1
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        finally:
            for s in (server, ws_server):
                s.close()
            await pool.close()
            await runner.cleanup()
            await ws_runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))


if __name__ == "__main__":  # the child proxy of the memory tests
    if sys.argv[1] == "uvloop":
        import uvloop

        uvloop.run(_child_main(int(sys.argv[2])))
    else:
        asyncio.run(_child_main(int(sys.argv[2])))
