"""Upstream side of the data plane: one connection to a pod and the response reader.

Theory of operation
-------------------
Connections live in the keep-alive pools of ``proxy.pool`` (one per endpoint).

An :class:`UpstreamConnection` carries one exchange at a time (no pipelining upstream: a response
can be matched to its request only by order, and a reset would then lose every request behind
it). While it serves an exchange it is *attached* to its sink — the downstream connection,
``http1.HttpConnection`` — and reports the response through a handful of calls:

    response_interim(status, lines, ...) 1xx other than 101, zero or more times
    response_head(status, lines, ...)    the final response head
    response_body(data) ...              body bytes as httptools delivers them,
    response_end()                       then the end
    response_tunnel(data)                after 101: raw bytes from the upstream
    response_failed(reason, retryable)   the connection died or spoke garbage; the sink maps
                                         it to 502/503 or a truncated response (replies)

The connection decides whether it may be reused (upstream keep-alive, request fully written,
response fully read, request cap) and returns itself to its pool *before* telling the sink the
exchange ended; the sink never touches pooling. Idle connections keep reading: a FIN or RST from
the server while idle lands in ``connection_lost`` and drops the connection from the pool, and
any byte from the server while idle is a protocol violation that closes it.

Why a fresh parser after HEAD: httptools does not let ``on_headers_complete`` say "no body"
(llhttp supports it, the binding reserves the return value for upgrades), so a response to HEAD
with ``Content-Length: 5`` would leave the parser waiting for five body bytes. We end the
exchange at the head ourselves and give the next exchange a new parser.

Writes are batched: the sink queues bytes with :meth:`UpstreamConnection.write` while it parses
a read from the client, then calls :meth:`flush` once, so a small request head and body go out
in one ``send``.

TLS to the endpoint (DestinationRule ``tls``)
---------------------------------------------
A pool with ``tls`` (``proxy.tls.UpstreamTls``) opens its connections with the cluster's
``ssl`` context; keep-alive reuses them like plain ones. A handshake that fails, or a server
certificate whose names the DestinationRule does not list, fails the connect with
:class:`UpstreamTlsError`, whose ``reason`` is Envoy's transport failure text: nothing was sent.
With no ``sni`` in the rule the SNI is the request's Host (Envoy's auto_sni), so connections
are kept per name: :meth:`UpstreamPool.named` gives the pool of one name, which shares the
endpoint's breaker and monitor (a client chooses its Host: past 64 names, those with no
connection are forgotten).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxy.exchange import HOP_BY_HOP, LOWER

if TYPE_CHECKING:
    # The sink is typed as the one class that implements it, not as a Protocol: compiled, a
    # call through a Protocol is a Python method call, a call on a native class a C call.
    from proxy.http1 import HttpConnection
    from proxy.pool import UpstreamPool

__all__ = [
    "PROTOCOL_ERROR",
    "RESET",
    "UpstreamConnection",
    "UpstreamTlsError",
    "callback_error",
    "write_buffers",
]

logger = logging.getLogger("proxy.upstream")

MAX_RESPONSE_HEAD: Final = 60 * 1024  # Envoy's max_response_headers_kb default

# Why an attached exchange failed (argument of HttpConnection.failed).
RESET: Final = 1  # connection closed/reset by the upstream before the response ended
PROTOCOL_ERROR: Final = 2  # the upstream sent something that is not HTTP/1.x

_KEEP_ALIVE_TOKENS: Final = frozenset({b"close", b"keep-alive"})
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
# Response headers the proxy acts on and never copies: hop-by-hop ones and content-length,
# which the sink writes itself from the framing it chooses.
_NOT_COPIED: Final = HOP_BY_HOP | {b"content-length"}
# on_header only looks up names of these lengths (literals there, for speed): keep them in step.
assert {len(name) for name in _NOT_COPIED} == {2, 7, 10, 14, 16, 17}


def callback_error(exc: httptools.HttpParserError) -> BaseException | None:
    """The exception one of our parser callbacks raised, when ``exc`` reports one.

    Only a callback error carries it (as ``__context__``); on any other parser error the
    context is whatever exception happened to be handled around ``feed_data``, which compiled
    coroutines can leave behind on the loop, so it must not be read as ours.
    """
    return exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None


# A head and a body piece up to this size go to uvloop as one buffer: copying them costs less
# than writelines' second buffer (about 500 instructions).
_COALESCE: Final = 4096


def write_buffers(transport: asyncio.Transport, buf: list[bytes]) -> None:
    """Write the queued pieces ``buf`` (at least one) to ``transport``, in as few calls as
    pays: both sides of the data plane batch their writes this way."""
    n = len(buf)
    if n == 1:
        transport.write(buf[0])
    elif n == 2 and len(buf[1]) <= _COALESCE:
        transport.write(buf[0] + buf[1])
    else:
        transport.writelines(buf)


class UpstreamTlsError(Exception):
    """The TLS handshake with the endpoint failed; ``reason`` is Envoy's transport failure
    reason (``TLS_error:|...:TLS_error_end``), shown in the 503's body. (Not an OSError:
    mypyc compiles subclasses of Exception only.)"""

    def __init__(self, reason: bytes) -> None:
        super().__init__(reason.decode("latin-1"))
        self.reason = reason


class _Unexpected(Exception):
    """Raised inside a parser callback when the upstream breaks the protocol in a way that is
    not a parse error: talking while no exchange is attached, a head over the limit, ..."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an upstream endpoint."""

    __slots__ = (
        "_body_sent",
        "_chunked",
        "_conn_tokens",
        "_content_length",
        "_counting",
        "_final",
        "_got_bytes",
        "_head_bytes",
        "_head_only",
        "_header_bytes",
        "_lines",
        "_parser",
        "_parser_stale",
        "_reading_paused",
        "_sink",
        "_tunnel",
        "_upgrade",
        "_upgrade_to",
        "_wbuf",
        "closed",
        "counted",
        "expired",
        "idle_since",
        "pool",
        "request_done",
        "requests",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        # per-connection state
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.requests = 0  # exchanges completed on this connection
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._parser_stale = False
        self._sink: HttpConnection | None = None
        self._wbuf: list[bytes] = []
        self.closed = False  # closing or closed: never pooled, never written
        self.counted = False  # holds one of the pool's connection counts (see connect)
        self.expired = False  # past the pool's max_connection_duration: never pooled again
        self._reading_paused = False
        self._tunnel = False
        # per-exchange state (reset by attach)
        self.request_done = False  # the whole request (head + body + terminator) is queued
        self._body_sent = False  # a request body byte was queued: never replay
        self._got_bytes = False  # a response byte arrived: never replay
        self._head_bytes = 0  # bytes read while the response head is incomplete
        self._header_bytes = 0  # header lines of the head being parsed (on_header)
        self._counting = False  # this read may take the head past the limit: count its lines
        self._head_only = False
        self._upgrade = False
        self._final = False  # final (non-1xx) head delivered
        # The head's header lines as the sink writes them: a slot for its status line, then
        # b"name: value\r\n" per header (no tuple per header, no second pass to copy).
        self._lines: list[bytes] = [b""]
        self._content_length: bytes | None = None
        self._chunked = False
        self._conn_tokens = _NO_TOKENS
        self._upgrade_to: bytes | None = None  # a 101's Upgrade header

    # ------------------------------------------------------------------ used by the sink
    @property
    def reused(self) -> bool:
        """True when this connection already served an exchange (it may have gone stale)."""
        return self.requests > 0

    def attach(self, sink: HttpConnection, *, head_only: bool, upgrade: bool) -> None:
        """Start an exchange: responses are reported to ``sink`` until ``end``/``failed``."""
        self._sink = sink
        self.request_done = False
        self._body_sent = False
        self._got_bytes = False
        self._head_bytes = 0
        self._head_only = head_only
        self._upgrade = upgrade
        self._final = False
        if self._parser_stale:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_stale = False

    def write(self, data: bytes) -> None:
        """Queue request head/framing bytes; sent by :meth:`flush`."""
        self._wbuf.append(data)

    def write_body(self, data: bytes) -> None:
        """Queue request body bytes (from then on the request is never replayed)."""
        self._body_sent = True
        self._wbuf.append(data)

    def pending(self) -> bool:
        """Bytes are queued for :meth:`flush`."""
        return bool(self._wbuf)

    def flush(self) -> None:
        buf = self._wbuf
        if not buf:
            return
        if self.closed or self.transport is None:
            buf.clear()
            return
        write_buffers(self.transport, buf)
        buf.clear()

    def write_raw(self, data: bytes) -> None:
        """Tunnel bytes from the client, written at once."""
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.closed and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self.closed and self.transport is not None:
                self.transport.resume_reading()

    def expire(self) -> None:
        """The pool's max_connection_duration is up: close now if idle, else after this
        exchange (``_complete`` then does not pool it)."""
        self.expired = True
        if self._sink is None:
            self.close()

    def abandon(self, *, graceful: bool = False) -> None:
        """Detach and drop the connection (client gone, timeout): never pooled again.

        ``graceful`` flushes what is queued first (the end of a tunnel), else the connection
        is reset at once (an aborted request must not look complete to the server).
        """
        self._sink = None
        self.close(abort=not graceful)

    def close(self, *, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._wbuf.clear()
        self.pool.discard(self)
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            # A server may only speak when asked; anything else means the framing is lost.
            self.close(abort=True)
            return
        if self._tunnel:
            sink.response_tunnel(data)
            sink.flush_relayed(len(data))
            return
        self._got_bytes = True
        if not self._final:
            # Only a read that could take the head past the limit has its header lines
            # counted (on_header): the others cannot, and counting costs every response.
            self._counting = self._head_bytes + len(data) > MAX_RESPONSE_HEAD
            if self._counting and self._header_bytes < self._head_bytes:
                # What earlier reads of this head held: an upper bound (a line they split is
                # counted again whole), so the limit errs on the side of a 502.
                self._header_bytes = self._head_bytes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if rest and self._sink is not None:
                self._sink.response_tunnel(rest)
        except httptools.HttpParserError as exc:
            cause = callback_error(exc)
            if cause is not None and not isinstance(cause, _Unexpected):
                # Raised by the sink's code inside a callback: a bug, not the upstream's fault.
                logger.error("error relaying a response from %s", self.pool.key, exc_info=cause)
            self._fail(PROTOCOL_ERROR)
            return
        if self._sink is None:
            return  # the exchange ended in this read (and the sink wrote its last bytes)
        if not self._final:
            # Still in the head: httptools holds it all, so bound it (Envoy: 60 KiB).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD:
                self._fail(PROTOCOL_ERROR)
                return
        sink.flush_relayed(len(data))

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self._wbuf.clear()
        if not was_closed:
            self.pool.discard(self)
        sink = self._sink
        if sink is None:
            return
        if (
            exc is None
            and self._final
            and not self._tunnel
            and self._content_length is None
            and not self._chunked
        ):
            # A body delimited by the end of the connection: a clean close (FIN) *is* its end.
            # A reset is not: the client must see a truncated response, not a complete one.
            self._sink = None
            sink.response_end()
            return
        self._fail(RESET)

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.upstream_paused(True)

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.upstream_paused(False)

    # ------------------------------------------------------------------ httptools callbacks
    def on_message_begin(self) -> None:
        if self._sink is None:
            raise _Unexpected
        self._lines = [b""]
        self._header_bytes = 0
        self._content_length = None
        self._chunked = False
        self._conn_tokens = _NO_TOKENS
        self._upgrade_to = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._final:
            return  # trailers: HTTP/1.1 to the client has no place for them, like Envoy
        if self._counting:
            # The limit holds however the head arrives: data_received bounds what httptools
            # buffers between reads, this what one large read holds (a whole head, say).
            size = self._header_bytes + len(name) + len(value) + 4
            if size > MAX_RESPONSE_HEAD:
                raise _Unexpected  # -> 502, as any upstream protocol error
            self._header_bytes = size
        name = name.translate(LOWER)
        n = len(name)
        # Only names of these lengths can be one we act on: one int compare spares the others
        # any lookup (compiled, hashing a fresh name costs more than the rest of this call).
        if (n == 10 or n == 14 or n == 17 or n == 7 or n == 2 or n == 16) and self._not_copied(
            name, value
        ):
            return
        # One piece per line: compiled, a %-format of bytes is a single copy, and the sink's
        # join pays about a hundred instructions for every piece, whatever its length.
        self._lines.append(b"%s: %s\r\n" % (name, value))

    def _not_copied(self, name: bytes, value: bytes) -> bool:
        """Act on a hop-by-hop header or content-length (True), or say it is neither."""
        if name == b"content-length":
            self._content_length = value
        elif name == b"connection":  # the headers it names are hop-by-hop too
            if value != b"keep-alive" and value != b"close":  # what nearly every response says
                self._connection_tokens(value)
        elif name == b"transfer-encoding":
            # llhttp only treats the body as chunked when chunked is the last coding;
            # any other coding means "read until close" (RFC 9112 §6.3).
            self._chunked = value.rstrip().lower().endswith(b"chunked")
        elif name == b"upgrade":
            self._upgrade_to = value
        elif name not in _NOT_COPIED:
            return False
        return True

    def _connection_tokens(self, value: bytes) -> None:
        value = value.lower()
        if value not in _KEEP_ALIVE_TOKENS:
            tokens = frozenset(t.strip() for t in value.split(b","))
            self._conn_tokens |= tokens - _KEEP_ALIVE_TOKENS

    def on_headers_complete(self) -> None:
        sink = self._sink
        if sink is None:
            raise _Unexpected
        status = self._parser.get_status_code()
        if status < 200 and status != 101:
            sink.response_interim(status, self._lines, self._conn_tokens)
            return
        if status == 101 and not self._upgrade:
            raise _Unexpected  # 101 to a request that did not ask for it
        self._final = True
        if self._chunked:
            self._content_length = None  # RFC 9112 §6.3: TE overrides CL (llhttp rejects both)
        no_body = self._head_only or status in (204, 304)
        sink.response_head(
            status,
            self._lines,
            self._content_length,
            no_body,
            self._conn_tokens,
            self._upgrade_to,
        )
        if status == 101:
            self._tunnel = True
        elif self._head_only:
            self._parser_stale = True  # see module docstring
            self._complete(reusable=self._parser.should_keep_alive())

    def on_body(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            raise _Unexpected  # e.g. a body after a response to HEAD
        sink.response_body(data)

    def on_message_complete(self) -> None:
        if not self._final or self._tunnel or self._sink is None:
            return  # end of a 1xx, of a 101 head, or of a HEAD response we already ended
        self._complete(reusable=self._parser.should_keep_alive())

    # ------------------------------------------------------------------ internals
    def _complete(self, *, reusable: bool) -> None:
        sink = self._sink
        assert sink is not None
        self._sink = None
        self.requests += 1
        pool = self.pool
        if (
            reusable
            and self.request_done
            and not self.closed
            and not self.expired
            and (
                not pool.max_requests_per_connection
                or self.requests < pool.max_requests_per_connection
            )
        ):
            if self._reading_paused:
                self.resume_reading()
            pool.release(self)
        else:
            self.close()
        sink.response_end()

    def _fail(self, reason: int) -> None:
        sink = self._sink
        self._sink = None
        retryable = self.reused and not self._body_sent and not self._got_bytes
        self.close(abort=reason == PROTOCOL_ERROR)
        if sink is not None:
            sink.response_failed(reason, retryable)
