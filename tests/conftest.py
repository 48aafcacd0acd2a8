"""Shared fixtures: real servers and clients on 127.0.0.1, port 0, closed at teardown.

    backend        start an aiohttp ``web.Application``      -> Backend(host, port, url)
    raw_backend    start an asyncio server from a (reader, writer) coroutine -> port
    proxy          start the data plane (``proxy.http1.serve``) with a dispatcher -> port
    pools          make an UpstreamPool to 127.0.0.1:port (closed at teardown)
    raw_client     open a byte-level HTTP/1.1 client (RawClient) to a port

``ForwardAll`` (``from conftest import ForwardAll``) is a dispatcher sending everything to one
pool and recording the exchanges. ``running(config)`` runs the whole in-process proxy
(``proxy.server.Proxy``) on 127.0.0.1 port 0 and yields its URL; ``with_endpoints(runtime)``
gives a runtime's static clusters their endpoints, as discovery does at start.

RawClient is for tests that need control over the bytes (pipelining, malformed input, half
reads); everything else should use ``aiohttp.ClientSession``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from proxy.config import Config, StaticEndpoints
from proxy.exchange import Dispatcher, Exchange, Forward, LocalReply, ServerSettings
from proxy.http1 import serve
from proxy.listener import Connections
from proxy.pool import UpstreamPool
from proxy.runtime import Runtime
from proxy.server import Proxy, RunOptions

HOST = "127.0.0.1"
PROXY_DIR = Path(__file__).resolve().parent.parent / "proxy"


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test stale extensions: an edited module must be compiled again first."""
    stale = []
    for so in PROXY_DIR.glob("*.so"):
        source = PROXY_DIR / (so.name.split(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
            stale.append(source.name)
    if stale:
        raise pytest.UsageError(
            f"proxy/{', proxy/'.join(sorted(stale))} changed after it was compiled: "
            "run `make unit` (it compiles again), or `STICKY_PROXY_PURE=1 make unit`"
        )


@dataclass(frozen=True, slots=True)
class Backend:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture
async def backend() -> AsyncIterator[Callable[[web.Application], Awaitable[Backend]]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, **runner_kwargs: object) -> Backend:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, **runner_kwargs)  # type: ignore[arg-type]
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        runners.append(runner)
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return Backend(HOST, port)

    yield start
    for runner in runners:
        await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(handler: Handler) -> int:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                tasks.discard(task)

        server = await asyncio.start_server(run, HOST, 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
    for task in list(tasks):
        task.cancel()
    for server in servers:
        await server.wait_closed()


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    servers: list[tuple[asyncio.Server, Connections]] = []

    async def start(dispatcher: Dispatcher, settings: ServerSettings | None = None) -> int:
        conns = Connections()
        server = await serve(dispatcher, HOST, 0, settings or ServerSettings(), connections=conns)
        servers.append((server, conns))
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server, conns in servers:
        server.close()
        conns.abort()
        await server.wait_closed()


# --------------------------------------------------------------------------- raw client
@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_head: bytes = b""
    chunked: bool = False
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]


class RawClient:
    """Bytes in, parsed responses out (a deliberately small HTTP/1.1 response reader)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self) -> Response:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        assert version.startswith("HTTP/1."), lines[0]
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
        return Response(int(status), reason[0] if reason else "", headers, raw_head=raw)

    async def read_response(self, *, head: bool = False, interim: bool = True) -> Response:
        """One final response; 1xx heads are skipped (their codes kept in ``interim``)."""
        codes = []
        while True:
            resp = await self.read_head()
            if resp.status >= 200 or resp.status == 101 or not interim:
                break
            codes.append(resp.status)
        resp.interim = codes
        if head or resp.status in (101, 204, 304) or resp.status < 200:
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None:
            assert te.lower() == "chunked", te
            resp.chunked = True
            resp.body = await self._read_chunked()
        elif cl is not None:
            resp.body = await self.reader.readexactly(int(cl))
        else:
            resp.body = await self.reader.read()
        return resp

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return bytes(body)
            body += await self.reader.readexactly(size)
            assert await self.reader.readexactly(2) == b"\r\n"

    async def at_eof(self) -> bool:
        """True when the server closed the connection (reads what is left)."""
        rest = await self.reader.read()
        return rest == b"" and self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def raw_client() -> AsyncIterator[Callable[[int], Awaitable[RawClient]]]:
    clients: list[RawClient] = []

    async def connect(port: int, *, limit: int = 2**20) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port, limit=limit)
        client = RawClient(reader, writer)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.close()


# --------------------------------------------------------------------------- dispatchers
class ForwardAll(Dispatcher):
    """A Dispatcher that forwards every request to one pool and records the exchanges."""

    def __init__(self, pool: UpstreamPool, **forward: object) -> None:
        self.pool = pool
        self.forward = forward
        self.dispatched: list[Exchange] = []
        self.finished_: list[Exchange] = []
        self._changed = asyncio.Event()

    def dispatch(self, exchange: Exchange) -> Forward | LocalReply:
        self.dispatched.append(exchange)
        return Forward(self.pool, **self.forward)  # type: ignore[arg-type]

    def finished(self, exchange: Exchange) -> None:
        self.finished_.append(exchange)
        self._changed.set()

    async def wait_finished(self, count: int) -> list[Exchange]:
        """Until ``count`` exchanges have been reported finished."""
        while len(self.finished_) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.finished_


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., UpstreamPool]]:
    made: list[UpstreamPool] = []

    def make(port: int, host: str = HOST, **kwargs: object) -> UpstreamPool:
        pool = UpstreamPool(host, port, **kwargs)  # type: ignore[arg-type]
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


@pytest.fixture
def forward_all() -> type[ForwardAll]:
    """The ForwardAll class, for test_http1*.py until they import it like the others do."""
    return ForwardAll


LOOPBACK = RunOptions(listen=(("127.0.0.1", 0),))


@asynccontextmanager
async def running(config: Config, options: RunOptions = LOOPBACK) -> AsyncIterator[str]:
    """The proxy on ``config``, started and stopped around the block; yields its base URL."""
    proxy = Proxy(config, options)
    await proxy.start()
    try:
        host, port = proxy.addresses[0]
        yield f"http://{host}:{port}"
    finally:
        await proxy.stop(grace=5)


def with_endpoints(runtime: Runtime) -> Runtime:
    """What discovery does at start for static endpoints."""
    for crt in runtime.clusters.values():
        assert isinstance(crt.spec.endpoints, StaticEndpoints)
        crt.cluster.set_endpoints(crt.spec.endpoints.endpoints)
    return runtime
