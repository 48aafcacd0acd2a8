"""proxy.http1: bad input from clients, and every way an upstream can fail (Envoy's texts)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest
from aiohttp import web

from proxy.exchange import Dispatcher, Exchange, Forward, LocalReply, ServerSettings
from proxy.replies import (
    CONNECT_FAILURE,
    CONNECTION_TERMINATION,
    PROTOCOL_ERROR_TEXT,
    UPSTREAM_TIMEOUT,
)

pytestmark = pytest.mark.timeout(30)


def ok_app() -> web.Application:
    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=b"ok " + request.path.encode() + b" " + body)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def refused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, never listening)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


BAD_REQUESTS = {
    "garbage request line": (b"HELLO THERE\r\n\r\n", 400),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "bad version": (b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 400),
    "http/2.0 over http/1": (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    "bare LF": (b"GET / HTTP/1.1\nHost: h\n\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n c\r\n\r\n", 400),
    "CL with TE": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\n",
        400,
    ),
    "TE with CL": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
        b"\r\n0\r\n\r\n",
        400,
    ),
    "invalid content-length": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3x\r\n\r\n", 400),
    "two content-lengths": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
        400,
    ),
    "invalid chunk size": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "chunked on HTTP/1.0": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
        400,
    ),
    "unknown transfer coding": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "no host on 1.1": (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    "two hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "authority-form target": (b"GET example.com:80 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "asterisk-form GET": (b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "fragment in target": (b"GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "absolute-form, Host disagrees": (
        b"GET http://other.example/abs?q=1 HTTP/1.1\r\nHost: evil.com\r\n\r\n",
        400,
    ),
    "absolute-form, Host invalid but its prefix agrees": (
        b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9:80\r\n\r\n",
        400,
    ),
    "absolute-form without Host on 1.1": (b"GET http://a.example/ HTTP/1.1\r\n\r\n", 400),
    "absolute-form with userinfo": (b"GET http://u@a.example/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "absolute-form, other scheme": (b"GET ftp://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "absolute-form, empty authority": (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "Host with a path": (b"GET / HTTP/1.1\r\nHost: evil.com/../x\r\n\r\n", 400),
    "Host with a space": (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "Host with a backslash": (b"GET / HTTP/1.1\r\nHost: x\\\r\n\r\n", 400),
    "Host with userinfo": (b"GET / HTTP/1.1\r\nHost: @evil.com\r\n\r\n", 400),
    "Host, unclosed IPv6": (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
    "Host, port not digits": (b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n", 400),
    "Host, two colons": (b"GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n", 400),
    "Host after Host with other case": (b"GET / HTTP/1.1\r\nHost: a\r\nhOST: a\r\n\r\n", 400),
    "upgrade with a body": (
        b"POST /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        400,
    ),
    "upgrade with a chunked body": (
        b"POST /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "101 headers": (
        b"GET / HTTP/1.1\r\nHost: h\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(100))
        + b"\r\n",
        431,
    ),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    "NUL in header value": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400),
    "headers over 60 KiB": (
        b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n",
        431,
    ),
    "many headers over 60 KiB": (
        b"GET / HTTP/1.1\r\nHost: h\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(600))
        + b"\r\n",
        431,
    ),
    "target over 60 KiB": (b"GET /" + b"a" * (61 * 1024) + b" HTTP/1.1\r\nHost: h\r\n\r\n", 431),
}


async def test_bad_requests_rejected_while_others_are_served(
    backend, proxy, pools, forward_all, raw_client
):
    be = await backend(ok_app())
    dispatcher = forward_all(pools(be.port))
    port = await proxy(dispatcher)

    async with aiohttp.ClientSession() as good:
        for name, (data, status) in BAD_REQUESTS.items():
            async with good.get(f"http://127.0.0.1:{port}/before") as r:
                assert r.status == 200, name
            client = await raw_client(port)
            await client.send(data)
            resp = await client.read_response()
            assert resp.status == status, (name, resp.body)
            assert resp.header("connection") == "close", name
            assert resp.header("content-type") == "text/plain", name
            assert await client.at_eof(), name
            async with good.get(f"http://127.0.0.1:{port}/after") as r:
                assert r.status == 200, name
                assert await r.read() == b"ok /after "
        assert len(good.connector._conns) == 1  # type: ignore[union-attr]  # one keep-alive
    rejected = [e for e in dispatcher.finished_ if e.status >= 400]
    assert len(rejected) == len(BAD_REQUESTS)  # reported to finished() without a dispatch
    assert all(e.flags == "DPE" for e in rejected)
    # Only the bad chunk was dispatched (its head was fine); its upstream request was dropped.
    assert [e.target for e in rejected if e.upstream] == [b"/"]
    assert dispatcher.pool.opened == 2
    assert sorted({e.status for e in dispatcher.dispatched}) == [200, 400]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HEAD / HTTP/1.1\r\nHost: h\r\nx-a\r\n\r\n", 400),
        (b"HEAD / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"HEAD / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"HEAD / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n", 431),
        (b"HEAD /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ],
    ids=["bad-header", "two-hosts", "gzip", "too-large", "bad-target"],
)
async def test_a_refused_head_request_gets_no_body(
    proxy, pools, forward_all, raw_client, head, status
):
    # Refused before its head ended: the reply must still have no body (RFC 9110 §9.3.2).
    client = await raw_client(await proxy(forward_all(pools(1))))
    await client.send(head)
    resp = await client.read_response(head=True)
    assert resp.status == status and int(resp.header("content-length") or 0) > 0
    assert await client.reader.read() == b""  # no body bytes after the head, then the close


async def test_a_refused_method_after_a_head_request_gets_its_body(
    backend, proxy, pools, forward_all, raw_client
):
    be = await backend(ok_app())
    client = await raw_client(await proxy(forward_all(pools(be.port))))
    await client.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\nget / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response(head=True)).status == 200
    resp = await client.read_response()
    assert resp.status == 400 and resp.body == b"bad request"


async def test_bad_request_after_good_pipelined_one(backend, proxy, pools, forward_all, raw_client):
    be = await backend(ok_app())
    port = await proxy(forward_all(pools(be.port)))
    client = await raw_client(port)
    await client.send(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost : h\r\n\r\n")
    first = await client.read_response()
    assert first.status == 200 and first.body == b"ok /first "
    second = await client.read_response()
    assert second.status == 400
    assert await client.at_eof()


async def test_endless_header_stopped_without_waiting_for_its_end(
    backend, proxy, pools, forward_all, raw_client
):
    be = await backend(ok_app())
    port = await proxy(forward_all(pools(be.port)))
    client = await raw_client(port)
    good = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Endless: ")
    resp_task = asyncio.ensure_future(client.read_response())
    served = 0
    with contextlib.suppress(ConnectionError):
        for _ in range(100):  # 6.4 MB unless the proxy stops us first
            if resp_task.done():
                break
            await client.send(b"a" * 65536)
            await good.send(b"GET /during HTTP/1.1\r\nHost: h\r\n\r\n")  # meanwhile, elsewhere
            assert (await good.read_response()).body == b"ok /during "
            served += 1
    resp = await resp_task
    assert resp.status == 431
    assert served >= 1


async def test_header_timeout_sends_408(backend, proxy, pools, forward_all, raw_client):
    be = await backend(ok_app())
    port = await proxy(forward_all(pools(be.port)), ServerSettings(header_timeout=0.2))
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n")  # ... and nothing more
    resp = await client.read_response()
    assert resp.status == 408 and resp.header("connection") == "close"
    assert await client.at_eof()


async def test_idle_keep_alive_connection_closed(backend, proxy, pools, forward_all, raw_client):
    be = await backend(ok_app())
    port = await proxy(forward_all(pools(be.port)), ServerSettings(idle_timeout=0.2))
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    assert await client.at_eof()  # closed by the proxy after 0.2 s of idleness


class Failing(Dispatcher):
    def dispatch(self, exchange: Exchange) -> Forward | LocalReply:
        raise RuntimeError("boom")

    def finished(self, exchange: Exchange) -> None:
        pass


async def test_dispatcher_exception_gives_500(proxy, raw_client, caplog):
    port = await proxy(Failing())
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 500
    assert "dispatch failed" in caplog.text
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # the connection survives
    assert (await client.read_response()).status == 500


# --------------------------------------------------------------------------- upstream failures
async def test_connect_refused_503(proxy, pools, forward_all, raw_client):
    dispatcher = forward_all(pools(refused_port()))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 503
    assert resp.body == CONNECT_FAILURE
    assert resp.body == (
        b"upstream connect error or disconnect/reset before headers. "
        b"reset reason: connection failure"
    )
    assert resp.header("connection") is None  # the client connection stays usable
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "UF" and ex.status == 503


async def test_connect_failure_moves_to_next_pool(backend, proxy, pools, forward_all, raw_client):
    be = await backend(ok_app())
    dead, live = pools(refused_port()), pools(be.port)
    asked: list[int] = []

    def next_pool(attempt: int):
        asked.append(attempt)
        return dead if attempt == 1 else live

    dispatcher = forward_all(dead, next_pool=next_pool, connect_retries=2)
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"ok /x "
    assert asked == [1, 2]
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.upstream == live.key and ex.flags == "-"


async def test_connect_retries_exhausted(proxy, pools, forward_all, raw_client):
    dead = pools(refused_port())
    dispatcher = forward_all(dead, next_pool=lambda attempt: dead, connect_retries=2)
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 503 and resp.body == CONNECT_FAILURE


async def test_connect_timeout(proxy, pools, forward_all, raw_client):
    # A listener that never accepts, with its accept queue (one slot with backlog 0) full:
    # Linux drops further SYNs, so a connect hangs until our timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    loop = asyncio.get_running_loop()
    filler = socket.socket()
    filler.setblocking(False)
    await loop.sock_connect(filler, listener.getsockname())
    fillers = [filler]
    try:
        dispatcher = forward_all(pools(listener.getsockname()[1], connect_timeout=0.3))
        port = await proxy(dispatcher)
        client = await raw_client(port)
        started = loop.time()
        await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 503 and resp.body == CONNECT_FAILURE
        assert loop.time() - started >= 0.3
        (ex,) = await dispatcher.wait_finished(1)
        assert ex.flags == "UF"
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_upstream_closes_after_request_503(
    raw_backend, proxy, pools, forward_all, raw_client
):
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # read the request, then hang up

    dispatcher = forward_all(pools(await raw_backend(upstream)))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 503
    assert resp.body == CONNECTION_TERMINATION
    assert resp.body.endswith(b"reset reason: connection termination")
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "UC"


async def test_malformed_upstream_response_502(raw_backend, proxy, pools, forward_all, raw_client):
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 2000 Nope\r\n\r\n")
        await reader.read()

    dispatcher = forward_all(pools(await raw_backend(upstream)))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 502 and resp.body == PROTOCOL_ERROR_TEXT
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "UPE"


async def test_upstream_timeout_504(backend, proxy, pools, forward_all, raw_client):
    app = web.Application()
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await release.wait()
        return web.Response(body=b"fast")

    app.router.add_route("*", "/{tail:.*}", handle)
    be = await backend(app)
    pool = pools(be.port)
    dispatcher = forward_all(pool, timeout=0.2)
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    release.set()
    assert resp.status == 504 and resp.body == UPSTREAM_TIMEOUT
    await client.send(b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).body == b"fast"  # same client connection
    done = await dispatcher.wait_finished(2)
    assert [e.flags for e in done] == ["UT", "-"]
    assert pool.opened == 2  # the timed-out upstream connection was not reused


async def test_upstream_timeout_after_head_truncates(
    raw_backend, proxy, pools, forward_all, raw_client
):
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await reader.read()

    dispatcher = forward_all(pools(await raw_backend(upstream)), timeout=0.2)
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await client.read_head()
    assert head.status == 200
    assert await client.reader.read() == b"only part"  # then the connection closes
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "UT"


async def test_reset_mid_response_truncates(raw_backend, proxy, pools, forward_all, raw_client):
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    dispatcher = forward_all(pools(await raw_backend(upstream)))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await client.read_head()
    assert head.status == 200 and head.header("content-length") == "100"
    assert await client.reader.read() == b"partial"
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "UC"


async def test_idle_connection_closed_by_backend_is_dropped(
    raw_backend, proxy, pools, forward_all, raw_client
):
    connections = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # keep-alive advertised, then closed while idle (a backend's keep-alive timeout)

    pool = pools(await raw_backend(upstream))
    port = await proxy(forward_all(pool))
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    await connections[0].wait_closed()
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    assert len(connections) == 2


async def test_stale_connection_retried_once(raw_backend, proxy, pools, forward_all, raw_client):
    """The race: the backend drops a reused connection as our request reaches it."""
    requests: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.transport.abort()  # RST, no response: the request must be replayed elsewhere
        raise ConnectionResetError

    async def upstream_wrapper(reader, writer):
        if requests:  # second connection: answer normally
            requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            await writer.drain()
            await reader.read()
        else:
            await upstream(reader, writer)

    pool = pools(await raw_backend(upstream_wrapper))
    dispatcher = forward_all(pool)
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).body == b"first"
    await client.send(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"second"
    assert [r.split(b" ")[1] for r in requests] == [b"/1", b"/2", b"/2"]
    assert pool.opened == 2
    assert [e.flags for e in await dispatcher.wait_finished(2)] == ["-", "-"]


async def test_post_body_never_replayed(raw_backend, proxy, pools, forward_all, raw_client):
    bodies: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            bodies.append(await reader.readexactly(length))
            if len(bodies) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            else:
                writer.transport.abort()  # the body arrived, then the connection died
                return

    pool = pools(await raw_backend(upstream))
    dispatcher = forward_all(pool)
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\none")
    assert (await client.read_response()).status == 200
    await client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\ntwo")
    resp = await client.read_response()
    assert resp.status == 503 and resp.body == CONNECTION_TERMINATION
    assert bodies == [b"one", b"two"]  # "two" exactly once
    assert pool.opened == 1


async def test_timeout_counts_from_each_request(backend, proxy, pools, forward_all, raw_client):
    """The connection timer is re-armed lazily: an earlier request must not shorten a later one."""
    app = web.Application()
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await release.wait()  # answers only after the proxy gave up
        return web.Response(body=b"fast")

    app.router.add_route("*", "/{tail:.*}", handle)
    be = await backend(app)
    port = await proxy(forward_all(pools(be.port), timeout=0.4))
    client = await raw_client(port)
    loop = asyncio.get_running_loop()
    await client.send(b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).body == b"fast"
    await asyncio.sleep(0.25)  # time passing is the point: the first deadline is now near
    started = loop.time()
    await client.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    elapsed = loop.time() - started
    release.set()
    assert resp.status == 504
    assert 0.4 <= elapsed < 1.5, elapsed
    await client.send(b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).body == b"fast"


async def test_pipeline_limit_answers_then_closes(backend, proxy, pools, forward_all, raw_client):
    be = await backend(ok_app())
    dispatcher = forward_all(pools(be.port))
    port = await proxy(dispatcher, ServerSettings(max_pipeline=2))
    client = await raw_client(port)
    await client.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(5)))
    bodies = []
    for _ in range(3):
        resp = await client.read_response()
        bodies.append(resp.body)
    assert bodies == [b"ok /0 ", b"ok /1 ", b"ok /2 "]
    assert resp.header("connection") == "close"  # the last one we took tells the client
    assert await client.at_eof()
    assert len(await dispatcher.wait_finished(3)) == 3


async def test_client_half_close_still_answered(backend, proxy, pools, forward_all, raw_client):
    be = await backend(ok_app())
    port = await proxy(forward_all(pools(be.port)))
    client = await raw_client(port)
    await client.send(b"POST /h HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    client.writer.write_eof()
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"ok /h hi"
    assert await client.at_eof()


async def test_upstream_head_too_large_502(raw_backend, proxy, pools, forward_all, raw_client):
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # 2.5 MB of one header value, unless the proxy hangs up
                writer.write(b"a" * 65536)
                await writer.drain()
        await reader.read()

    dispatcher = forward_all(pools(await raw_backend(upstream)))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 502 and resp.body == PROTOCOL_ERROR_TEXT


@pytest.mark.parametrize("size", [61 * 1024, 100 * 1024, 300 * 1024])
async def test_upstream_head_over_the_limit_in_one_read_502(
    raw_backend, proxy, pools, forward_all, raw_client, size
):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(size // 1010))
    head = b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok"

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)  # all at once: one read on loopback for the smaller ones
        await reader.read()

    dispatcher = forward_all(pools(await raw_backend(upstream)))
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 502 and resp.body == PROTOCOL_ERROR_TEXT
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "UPE"


async def test_upstream_head_under_the_limit_passes(
    raw_backend, proxy, pools, forward_all, raw_client
):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(58))

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok")
        await reader.read()

    client = await raw_client(await proxy(forward_all(pools(await raw_backend(upstream)))))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"ok" and len(resp.raw_head) > 58_000


async def test_local_reply_to_head_has_no_body(proxy, raw_client):
    class NotFound(Dispatcher):
        def dispatch(self, exchange: Exchange) -> Forward | LocalReply:
            return LocalReply(404, b"no route", headers=((b"x-why", b"test"),))

        def finished(self, exchange: Exchange) -> None:
            pass

    port = await proxy(NotFound())
    client = await raw_client(port)
    await client.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response(head=True)
    assert resp.status == 404 and resp.header("content-length") == "8"
    assert resp.header("x-why") == "test"
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # no stray body before this one
    resp = await client.read_response()
    assert resp.status == 404 and resp.body == b"no route"


async def test_drain_closes_idle_and_finishes_busy(backend, raw_client, pools, forward_all):
    from proxy.http1 import serve
    from proxy.listener import Connections

    app = web.Application()
    arrived, release = asyncio.Event(), asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/slow":
            arrived.set()
            await release.wait()
        return web.Response(body=b"done")

    app.router.add_route("*", "/{tail:.*}", handle)
    be = await backend(app)
    conns = Connections()
    server = await serve(forward_all(pools(be.port)), "127.0.0.1", 0, connections=conns)
    port = server.sockets[0].getsockname()[1]
    try:
        idle = await raw_client(port)
        await idle.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await idle.read_response()).status == 200
        busy = await raw_client(port)
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        await arrived.wait()
        assert len(conns) == 2
        server.close()
        conns.shutdown()
        assert await idle.at_eof()  # idle: closed at once
        release.set()
        resp = await busy.read_response()  # busy: answered, told to close, closed
        assert resp.body == b"done" and resp.header("connection") == "close"
        assert await busy.at_eof()
        async with asyncio.timeout(5):
            await conns.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_reset_of_close_delimited_body_is_not_completed(
    raw_backend, proxy, pools, forward_all, raw_client
):
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nsome of the body")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST, not FIN: the body did not end, it broke

    dispatcher = forward_all(pools(await raw_backend(upstream)))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await client.read_head()
    assert head.status == 200 and head.header("transfer-encoding") == "chunked"
    async with asyncio.timeout(5):  # a "completed" response would leave the connection open
        rest = await client.reader.read()
    assert rest.startswith(b"10\r\nsome of the body\r\n")
    assert not rest.endswith(b"0\r\n\r\n")  # no last chunk: the client knows it is truncated
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "UC"
