"""What the connections of one listener share: settings, the write batch, the live set.

uvicorn's ``ServerState`` is the model: state that outlives a connection and that every
connection reads lives below ``proxy.downstream`` and is handed to each connection when
the listener accepts it. :class:`ListenerState` carries the dispatcher, the settings and what is
precomputed from them, and the batch of writes held within one event-loop iteration (see
``DownstreamConnection.flush_soon``); :class:`Connections` is the set a graceful drain walks.

An HTTPS listener also has ``tls``, called once per connection when its handshake is over: it
answers with the dispatcher of the server the client's SNI chose (``proxy.tls``) and what the
handshake settled (``DownstreamTls``). A plain HTTP listener pays nothing for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.exchange import HOP_BY_HOP, Dispatcher, DownstreamTls, ServerSettings
from proxy.framing import CRLF, FORWARDING, REQUEST_OWN

if TYPE_CHECKING:
    # Typed as the class itself, not a Protocol: compiled, calls on it are C calls.
    from proxy.downstream import DownstreamConnection

TlsHandshake = Callable[[asyncio.BaseTransport], tuple[Dispatcher, DownstreamTls]]


class ListenerState:
    """Per-listener state every connection reads (copied onto the connection at creation)."""

    __slots__ = (
        "batch",
        "connections",
        "dispatcher",
        "holding",
        "proto_line",
        "request_drop",
        "server_line",
        "settings",
        "tls",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: ServerSettings,
        connections: Connections | None,
        tls: TlsHandshake | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        self.connections = connections
        self.tls = tls
        forwarding = FORWARDING if settings.xff else frozenset()
        self.request_drop = HOP_BY_HOP | REQUEST_OWN | forwarding
        self.server_line = b"server: " + settings.server_name.encode() + CRLF
        self.proto_line = b"x-forwarded-proto: " + settings.proto.encode() + CRLF
        # DownstreamConnection.flush_soon: from the first write of a loop iteration until
        # flush_batch runs, writes are held; these connections hold some.
        self.holding = False
        self.batch: list[DownstreamConnection] = []

    def flush_batch(self) -> None:
        """Send the writes held in the loop iteration that just ended, and stop holding."""
        self.holding = False
        batch = self.batch
        if not batch:
            return
        self.batch = []
        for conn in batch:
            conn.send_held()


class Connections:
    """The live client connections of one or more listeners, for a graceful drain.

    conns = Connections()
    server = await serve(dispatcher, "0.0.0.0", 8080, connections=conns)
    ...
    server.close()
    conns.shutdown()                 # idle ones close now, busy ones after their response
    async with asyncio.timeout(grace):   # then the caller may conns.abort() the rest
        await conns.wait_closed()
    """

    __slots__ = ("_conns", "_empty", "_on_add")

    def __init__(self, on_add: Callable[[], object] | None = None) -> None:
        self._conns: set[DownstreamConnection] = set()
        self._empty: asyncio.Event | None = None
        self._on_add = on_add  # e.g. a counter of accepted connections

    def __len__(self) -> int:
        return len(self._conns)

    def add(self, conn: DownstreamConnection) -> None:
        self._conns.add(conn)
        if self._on_add is not None:
            self._on_add()

    def discard(self, conn: DownstreamConnection) -> None:
        self._conns.discard(conn)
        if not self._conns and self._empty is not None:
            self._empty.set()

    def shutdown(self) -> None:
        for conn in list(self._conns):
            conn.shutdown()

    def abort(self) -> None:
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()

    async def wait_closed(self) -> None:
        """Until every connection closed (wrap in ``asyncio.timeout`` for a grace period)."""
        if not self._conns:
            return
        self._empty = asyncio.Event()
        await self._empty.wait()
