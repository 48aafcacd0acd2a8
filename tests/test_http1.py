"""proxy.http1: forwarding through the data plane with real backends on 127.0.0.1.

Bad input and upstream failures are in test_http1_errors.py; big bodies, backpressure,
WebSocket and uvloop in test_http1_stream.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import aiohttp
import pytest
from aiohttp import web

from proxy.exchange import Dispatcher, Exchange, Forward, HeaderEdit, LocalReply
from proxy.framing import RequestIds

pytestmark = pytest.mark.timeout(30)

PEERS = web.AppKey("peers", set[int])
UUID4 = re.compile(rb"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_request_ids_are_uuid4_text_across_batches() -> None:
    ids = RequestIds()
    made = [ids.take() for _ in range(1000)]  # several batches of 256
    assert all(UUID4.match(i) for i in made), [i for i in made if not UUID4.match(i)][:3]
    assert len(set(made)) == len(made)
    assert {i[19:20] for i in made} == {b"8", b"9", b"a", b"b"}  # the variant keeps 2 bits
    assert all(uuid.UUID(i.decode()).version == 4 for i in made)


def echo_app(name: str = "pod") -> web.Application:
    """Echoes the request as JSON and remembers every upstream connection it saw."""
    app = web.Application()
    peers: set[int] = set()

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername")[1])
        return web.json_response(
            {
                "pod": name,
                "method": request.method,
                "target": request.raw_path,
                "version": f"{request.version.major}.{request.version.minor}",
                "headers": [[k.decode().lower(), v.decode()] for k, v in request.raw_headers],
                "body": body.decode("latin-1"),
            },
            headers={"x-pod": name},
        )

    app.router.add_route("*", "/{tail:.*}", echo)
    app[PEERS] = peers
    return app


def header_values(echoed: dict[str, object], name: str) -> list[str]:
    headers = echoed["headers"]
    assert isinstance(headers, list)
    return [v for k, v in headers if k == name]


async def test_get_and_post_reuse_one_upstream_connection(backend, proxy, pools, forward_all):
    app = echo_app()
    be = await backend(app)
    pool = pools(be.port)
    dispatcher = forward_all(pool)
    port = await proxy(dispatcher)

    async with aiohttp.ClientSession() as session:
        for i in range(20):
            if i % 2:
                async with session.post(f"http://127.0.0.1:{port}/p/{i}", data=b"x" * i) as r:
                    echoed = await r.json()
                    assert echoed["body"] == "x" * i
                    assert header_values(echoed, "content-length") == [str(i)]
            else:
                async with session.get(f"http://127.0.0.1:{port}/g/{i}?q=1") as r:
                    echoed = await r.json()
                    assert echoed["target"] == f"/g/{i}?q=1"
            assert r.status == 200
            assert echoed["method"] == ("POST" if i % 2 else "GET")
            assert echoed["version"] == "1.1"

    assert len(app[PEERS]) == 1  # the backend saw a single connection
    assert pool.opened == 1
    done = await dispatcher.wait_finished(20)
    assert [e.status for e in done] == [200] * 20
    assert all(e.upstream == pool.key and e.flags == "-" for e in done)
    assert [e.bytes_received for e in done] == [i if i % 2 else 0 for i in range(20)]
    assert all(e.bytes_sent > 0 and e.end >= e.start for e in done)


async def test_forwarding_headers(backend, proxy, pools, forward_all, raw_client):
    be = await backend(echo_app())
    dispatcher = forward_all(pools(be.port))
    port = await proxy(dispatcher)
    client = await raw_client(port)

    await client.send(b"GET /a HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 10.1.1.1\r\n\r\n")
    first = (await client.read_response()).body
    await client.send(
        b"GET /b HTTP/1.1\r\nHost: example.com\r\nX-Request-Id: my-id-1\r\n"
        b"X-Forwarded-Proto: https\r\n\r\n"
    )
    second = (await client.read_response()).body
    a, b = json.loads(first), json.loads(second)
    assert header_values(a, "host") == ["example.com"]
    assert header_values(a, "x-forwarded-for") == ["10.1.1.1, 127.0.0.1"]
    assert header_values(a, "x-forwarded-proto") == ["http"]
    (generated,) = header_values(a, "x-request-id")
    assert UUID4.match(generated.encode())
    assert header_values(b, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(b, "x-forwarded-proto") == ["http"]  # set, not trusted from the client
    assert header_values(b, "x-request-id") == ["my-id-1"]
    ex_a, ex_b = dispatcher.dispatched
    assert ex_a.request_id == generated.encode() and ex_b.request_id == b"my-id-1"
    assert ex_a.authority == b"example.com" and ex_a.peer[0] == "127.0.0.1"
    assert ex_a.sock == ("127.0.0.1", port)
    assert (b"x-forwarded-for", b"10.1.1.1") in ex_a.headers  # as received, names lower-cased


async def test_hop_by_hop_headers_removed_both_ways(
    raw_backend, proxy, pools, forward_all, raw_client
):
    seen: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: x-secret, keep-alive\r\nX-Secret: 1\r\n"
            b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTrailer: x-t\r\n"
            b"Upgrade: h2c\r\nServer: upstream/1.0\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        await reader.read()

    port = await proxy(forward_all(pools(await raw_backend(upstream))))
    client = await raw_client(port)
    await client.send(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Drop-Me\r\nX-Drop-Me: 1\r\n"
        b"Keep-Alive: 300\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: x\r\n"
        b"Upgrade: websocket\r\nX-Keep: yes\r\n\r\n"
    )
    resp = await client.read_response()

    head = seen[0].lower()
    for name in (b"connection", b"x-drop-me", b"keep-alive", b"proxy-connection", b"te:"):
        assert name not in head, head
    assert b"\r\ntrailer:" not in head and b"upgrade" not in head
    assert b"x-keep: yes" in head
    assert head.startswith(b"get / http/1.1\r\nhost: h\r\n")
    assert resp.status == 200 and resp.body == b"ok"
    names = {name for name, _ in resp.headers}
    assert names.isdisjoint({"connection", "x-secret", "keep-alive", "proxy-connection"})
    assert names.isdisjoint({"trailer", "upgrade"})
    assert resp.header("server") == "upstream/1.0"  # the upstream's own Server is kept
    assert resp.header("date") is None  # date is only added to local replies


@pytest.mark.parametrize("piece", [0, 1, 9], ids=["one-write", "byte-by-byte", "9-bytes"])
async def test_interim_and_final_heads_arrive_whole_however_the_reads_split_them(
    raw_backend, proxy, pools, forward_all, raw_client, piece: int
) -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x-hint\r\n"
        b"X-Hint: 1\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nX-Mixed-Case: Value \r\nContent-Length: 2\r\n\r\nok"
    )
    served = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while await reader.readuntil(b"\r\n\r\n"):  # both requests on one connection
            step = piece or len(response)
            for i in range(0, len(response), step):
                writer.write(response[i : i + step])
                await writer.drain()
            served += 1

    port = await proxy(forward_all(pools(await raw_backend(upstream))))
    client = await raw_client(port)
    for _ in range(2):
        await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await client.read_head()).raw_head == b"HTTP/1.1 100 Continue\r\n\r\n"
        hints = await client.read_head()
        assert hints.status == 103 and hints.headers == [("link", "</a.css>; rel=preload")]
        final = await client.read_response()
        assert final.status == 200 and final.header("x-mixed-case") == "Value"
        assert final.body == b"ok"
    assert served == 2


async def test_set_cookie_and_header_edits(backend, proxy, pools, forward_all):
    be = await backend(echo_app())
    dispatcher = forward_all(
        pools(be.port),
        set_cookie=b'set-cookie: ISTIOID="abc"; Max-Age=60; HttpOnly\r\n',
        request_headers=HeaderEdit(
            set=((b"x-set", b"new"),),
            add=((b"x-add", b"1"),),
            remove=frozenset({b"x-remove", b"x-request-id"}),
        ),
        response_headers=HeaderEdit(
            set=((b"x-pod", b"hidden"),), add=((b"x-resp-add", b"2"),), remove=frozenset()
        ),
    )
    port = await proxy(dispatcher)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{port}/",
            headers={"X-Set": "old", "X-Remove": "gone", "X-Add": "0", "X-Request-Id": "r"},
        ) as r,
    ):
        echoed = await r.json()
        assert r.headers.getall("Set-Cookie") == ['ISTIOID="abc"; Max-Age=60; HttpOnly']
        assert r.headers.getall("x-pod") == ["hidden"]
        assert r.headers["x-resp-add"] == "2"
    assert header_values(echoed, "x-set") == ["new"]
    assert header_values(echoed, "x-add") == ["0", "1"]  # add keeps what was there
    assert header_values(echoed, "x-remove") == []
    assert header_values(echoed, "x-request-id") == []  # the edit applies to ours too


def test_header_edit_rejects_injection():
    with pytest.raises(ValueError, match="CR, LF"):
        HeaderEdit(set=((b"x-a", b"1\r\nx-evil: 2"),))
    with pytest.raises(ValueError, match="lower-case token"):
        HeaderEdit(add=((b"X-Upper", b"1"),))
    edit = HeaderEdit(set=((b"x-a", b"1"),), add=((b"x-b", b"2"),), remove=frozenset({b"x-c"}))
    assert edit.drop == {b"x-a", b"x-c"} and edit.lines == b"x-a: 1\r\nx-b: 2\r\n"


class ByPath(Dispatcher):
    """Picks a pool by path prefix, rewriting the target and Host like a VirtualService."""

    def __init__(self, routes: dict[bytes, object]) -> None:
        self.routes = routes

    def dispatch(self, exchange: Exchange) -> Forward | LocalReply:
        for prefix, pool in self.routes.items():
            if exchange.target.startswith(prefix):
                rest = exchange.target[len(prefix) :]
                return Forward(pool, target=b"/" + rest.lstrip(b"/"), authority=b"svc.local")  # type: ignore[arg-type]
        exchange.flags = "NR"
        return LocalReply(404, b"no route")

    def finished(self, exchange: Exchange) -> None:
        pass


async def test_dispatch_by_path_with_rewrite_and_local_reply(backend, proxy, pools):
    a = await backend(echo_app("a"))
    b = await backend(echo_app("b"))
    port = await proxy(ByPath({b"/a/": pools(a.port), b"/b/": pools(b.port)}))
    async with aiohttp.ClientSession() as session:
        for path, pod in (("/a/x", "a"), ("/b/y?z=1", "b"), ("/a/", "a")):
            async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                echoed = await r.json()
            assert echoed["pod"] == pod
            assert echoed["target"] == "/" + path.split("/", 2)[2]
            assert header_values(echoed, "host") == ["svc.local"]
        async with session.get(f"http://127.0.0.1:{port}/nowhere") as r:
            assert r.status == 404
            assert await r.read() == b"no route"
            assert r.headers["content-type"] == "text/plain"
            assert r.headers["server"] == "sticky-proxy"
            assert "date" in r.headers
            assert "connection" not in r.headers  # a local reply keeps the connection
        async with session.get(f"http://127.0.0.1:{port}/a/again") as r:
            assert r.status == 200


def chunked_app() -> web.Application:
    app = web.Application()

    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for piece in (b"got ", str(len(body)).encode(), b" bytes: ", body):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    app.router.add_route("*", "/{tail:.*}", stream)
    return app


async def test_chunked_request_and_response(backend, proxy, pools, forward_all, raw_client):
    be = await backend(chunked_app())
    port = await proxy(forward_all(pools(be.port)))
    client = await raw_client(port)

    await client.send(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    await client.send(b"5\r\nhello\r\n")
    await client.send(b"6;ext=1\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and resp.chunked
    assert resp.body == b"got 11 bytes: hello world"

    # The same connection, an HTTP/1.0 client: no chunked for it, the close ends the body.
    await client.send(b"POST /c HTTP/1.0\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
    resp = await client.read_response()
    assert resp.status == 200 and not resp.chunked
    assert resp.header("connection") == "close"
    assert resp.body == b"got 3 bytes: abc"
    assert await client.at_eof()


async def test_http10_keep_alive_and_close(backend, proxy, pools, forward_all, raw_client):
    be = await backend(echo_app())
    port = await proxy(forward_all(pools(be.port)))
    client = await raw_client(port)
    await client.send(b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and resp.header("connection") == "keep-alive"
    await client.send(b"GET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and resp.header("connection") == "close"
    assert await client.at_eof()
    client = await raw_client(port)
    await client.send(b"GET /3 HTTP/1.0\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and resp.header("connection") == "close"
    assert await client.at_eof()


def bodiless_app() -> web.Application:
    app = web.Application()

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(body=b"x" * 100)  # also answers HEAD with content-length: 100

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def test_head_204_304_have_no_body(backend, proxy, pools, forward_all, raw_client):
    be = await backend(bodiless_app())
    pool = pools(be.port)
    port = await proxy(forward_all(pool))
    client = await raw_client(port)
    for _ in range(2):
        await client.send(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n")
        resp = await client.read_response(head=True)
        assert resp.status == 200 and resp.header("content-length") == "100"
        await client.send(b"GET /204 HTTP/1.1\r\nHost: h\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 204 and resp.header("transfer-encoding") is None
        await client.send(b'GET /304 HTTP/1.1\r\nHost: h\r\nIf-None-Match: "v1"\r\n\r\n')
        resp = await client.read_response()
        assert resp.status == 304 and resp.header("etag") == '"v1"'
        await client.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 200 and resp.body == b"x" * 100  # no stray bytes before it
    assert pool.opened == 1


async def test_expect_100_continue(backend, proxy, pools, forward_all, raw_client):
    be = await backend(echo_app())
    port = await proxy(forward_all(pools(be.port)))
    client = await raw_client(port)
    await client.send(
        b"PUT /up HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    interim = await client.read_head()  # the upstream's 100, relayed before we send the body
    assert interim.status == 100
    await client.send(b"data")
    resp = await client.read_response()
    assert resp.status == 200
    echoed = json.loads(resp.body)
    assert echoed["body"] == "data"
    assert header_values(echoed, "expect") == ["100-continue"]


async def test_http_version_read_however_the_head_arrives(
    backend, proxy, pools, forward_all, raw_client
):
    # The version is read from the bytes when a read starts with the request line, else from
    # the parser: a head in pieces, a pipelined request, a blank line first must all agree.
    be = await backend(echo_app())
    dispatcher = forward_all(pools(be.port))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    for line in (b"GET /split HTTP/1.0\r\n", b"Connection: keep-alive\r\n", b"\r\n"):
        await client.send(line)  # separate segments (the proxy may still read them as one)
    resp = await client.read_response()
    assert resp.status == 200 and resp.header("connection") == "keep-alive"
    await client.send(b"\r\nGET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
    assert [(await client.read_response()).status for _ in range(2)] == [200, 200]
    assert await client.at_eof()  # an HTTP/1.0 request without keep-alive ends it
    done = await dispatcher.wait_finished(3)
    assert [(e.target, e.version) for e in done] == [
        (b"/split", b"1.0"),
        (b"/a", b"1.1"),
        (b"/b", b"1.0"),
    ]


async def test_pipelined_requests_answered_in_order(backend, proxy, pools, forward_all, raw_client):
    app = web.Application()
    arrived, release = asyncio.Event(), asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if request.path == "/slow":
            arrived.set()
            await release.wait()
        return web.Response(body=request.path.encode() + b":" + body)

    app.router.add_route("*", "/{tail:.*}", handle)
    be = await backend(app)
    dispatcher = forward_all(pools(be.port))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(
        b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /post HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /last HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    await arrived.wait()  # the first request is held upstream, the others wait in the proxy
    assert len(dispatcher.dispatched) == 1
    release.set()
    bodies = [(await client.read_response()).body for _ in range(3)]
    assert bodies == [b"/slow:", b"/post:hello", b"/last:"]
    assert [e.target for e in await dispatcher.wait_finished(3)] == [b"/slow", b"/post", b"/last"]


async def test_read_until_close_upstream_becomes_chunked(
    raw_backend, proxy, pools, forward_all, raw_client
):
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Old: style\r\n\r\nall of this until the close")
        await writer.drain()
        writer.close()

    pool = pools(await raw_backend(upstream))
    port = await proxy(forward_all(pool))
    client = await raw_client(port)
    for _ in range(2):
        await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 200 and resp.chunked
        assert resp.body == b"all of this until the close"
    assert pool.opened == 2 and pool.idle_count == 0  # never reused


@pytest.mark.parametrize(
    ("target", "host", "authority", "upstream_target"),
    [
        (b"http://Example.org:8080/p?q=1", b"example.org:8080", b"Example.org:8080", "/p?q=1"),
        (b"http://other.example/abs?q=1", b"other.example", b"other.example", "/abs?q=1"),
        (b"http://other.example/abs", b"other.example", b"other.example", "/abs"),
        (b"http://other.example:80/abs", b"other.example", b"other.example:80", "/abs"),
        (b"HTTP://other.example", b"other.example:80", b"other.example", "/"),
        (b"http://other.example?q", b"other.example", b"other.example", "/?q"),
        (b"https://[::1]:8443/x", b"[::1]:8443", b"[::1]:8443", "/x"),
    ],
)
async def test_absolute_form_target(
    backend, proxy, pools, forward_all, raw_client, target, host, authority, upstream_target
):
    # RFC 9112 §3.2.2: accepted, and its authority replaces Host (the compiled build once
    # crashed on targets without a port or a query).
    be = await backend(echo_app())
    dispatcher = forward_all(pools(be.port))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host))
    resp = await client.read_response()
    assert resp.status == 200, resp.body
    echoed = json.loads(resp.body)
    assert echoed["target"] == upstream_target
    assert header_values(echoed, "host") == [authority.decode()]
    assert dispatcher.dispatched[0].authority == authority


async def test_asterisk_form_options_is_forwarded(backend, proxy, pools, forward_all, raw_client):
    be = await backend(echo_app())
    dispatcher = forward_all(pools(be.port))
    port = await proxy(dispatcher)
    client = await raw_client(port)
    await client.send(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status in (200, 404, 405)  # whatever the pod says: it got a valid request
    assert dispatcher.dispatched[0].target == b"*"


def test_header_edit_cannot_touch_framing():
    for name in (b"content-length", b"transfer-encoding", b"connection", b"upgrade"):
        with pytest.raises(ValueError, match="framing and hop-by-hop"):
            HeaderEdit(set=((name, b"1"),))
        with pytest.raises(ValueError, match="framing and hop-by-hop"):
            HeaderEdit(remove=frozenset({name}))


async def test_header_edit_may_set_host(backend, proxy, pools, forward_all):
    be = await backend(echo_app())
    edit = HeaderEdit(set=((b"host", b"edited.local"),))
    port = await proxy(forward_all(pools(be.port), request_headers=edit))
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as r:
        echoed = await r.json()
    assert header_values(echoed, "host") == ["edited.local"]


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        (b"a.example \t", "a.example"),
        (b"[::1]:8080", "[::1]:8080"),
        (b"A.Example:80", "A.Example:80"),
    ],
)
async def test_valid_host_forwarded_without_trailing_whitespace(
    backend, proxy, pools, forward_all, raw_client, sent, forwarded
):
    be = await backend(echo_app())
    port = await proxy(forward_all(pools(be.port)))
    client = await raw_client(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % sent)
    resp = await client.read_response()
    assert resp.status == 200
    assert header_values(json.loads(resp.body), "host") == [forwarded]
