"""The data plane: one client connection, from bytes in to a forwarded request and back.

An :class:`HttpConnection` parses with httptools, asks the listener's dispatcher what to do
with each request, forwards it over an ``proxy.upstream`` connection and relays the response.
Its neighbours hold what is not connection state: ``proxy.framing`` the pure request checks
and head building, ``proxy.replies`` the failure -> response table and the bytes of local
replies, ``proxy.retry`` what is retried and where, ``proxy.listener`` what the connections of
one listener share.

Theory of operation
-------------------
One :class:`HttpConnection` per client connection. httptools (llhttp) parses the requests and
calls us back; the connection answers them strictly in order, one *active* exchange at a time.
A request parsed while another is active (pipelining) waits in a queue with its body bytes, and
reading from the client pauses until the queue drains, so a pipelining client costs at most one
socket read of buffering.

For the active exchange the dispatcher (routing, affinity, clusters: not our business) returns a
:class:`Forward` or a :class:`LocalReply`. For a Forward we take an idle connection from the
pool (no coroutine at all on the keep-alive path) or open one in a task, send the rewritten head,
and stream the body: Content-Length bodies as they come, chunked bodies re-framed chunk by chunk
from the parser's ``on_body``. The upstream connection parses the response and reports it back
(see ``proxy.upstream``); we rewrite the head (hop-by-hop headers out, edits in, Set-Cookie) and
frame the body for this client: Content-Length passes through, anything else becomes chunked for
an HTTP/1.1 client or close-delimited for HTTP/1.0.

Backpressure is the transports' own: when a receiving transport's buffer passes its high-water
mark, asyncio calls ``pause_writing`` on its protocol and we pause *reading* on the sending side
until ``resume_writing``. Reading from the client can be paused for several reasons at once
(upstream full, pipelined request waiting, body arriving before the upstream is connected, an
upgrade waiting for its 101), so those are bits in one mask. Either way at most a socket read
plus a transport buffer per direction is held, whatever the body size.

Bytes meant for one socket during one read are queued and written once, so a small response head
and body leave in one ``send``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
from typing import Final, cast

import httptools

from proxy.exchange import Dispatcher, Forward, LocalReply, ServerSettings
from proxy.framing import (
    CHUNKED_LINE,
    CLOSE_LINE,
    CRLF,
    FORWARD,
    H_HOST,
    KEEP_ALIVE_LINE,
    LAST_CHUNK,
    M_CHUNKED,
    M_NONE,
    M_RAW,
    REFUSE,
    SPECIAL,
    UPGRADE_LINE,
    ParsedRequest,
    RequestError,
    RequestIds,
    check_target,
    checked_host,
    note_header,
    request_head,
    response_framing,
    upgrade_verdict,
    without,
)
from proxy.listener import Connections, ListenerState
from proxy.replies import (
    CONNECT_FAILURE,
    CONNECTION_TERMINATION,
    OVERFLOW_TEXT,
    PROTOCOL_ERROR_TEXT,
    STATUS_LINES,
    UPSTREAM_TIMEOUT,
    local_reply,
    parse_error_reply,
    status_line,
)
from proxy.retry import IDEMPOTENT, RetryPlan
from proxy.upstream import (
    OPEN,
    PROTOCOL_ERROR,
    QUEUED,
    CircuitBreaker,
    UpstreamConnection,
    UpstreamPool,
    callback_error,
)

__all__ = ["HttpConnection", "serve"]

logger = logging.getLogger("proxy.http1")

_LOWER: Final = bytes.lower  # as in proxy.upstream: no method lookup per header
_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}

# Reasons reading from the client is paused (bits of HttpConnection._paused).
_P_UPSTREAM: Final = 1  # upstream write buffer full
_P_QUEUE: Final = 2  # a pipelined request waits its turn
_P_CONNECTING: Final = 4  # body bytes buffered while no upstream connection is attached
_P_UPGRADE: Final = 8  # an upgrade request waits for its 101
_P_DONE: Final = 16  # nothing more will be read (error, closing)

_BUFFER_LIMIT: Final = 64 * 1024  # body bytes held for a request not yet attached upstream
# A read at least this large is relayed at once, not at the end of the loop iteration
# (HttpConnection.flush_soon): libuv reads a socket again in the same iteration only after a
# read that filled its buffer, so holding the smaller ones keeps at most one read per
# connection waiting, and a streamed body's flow control acts as each large read arrives.
FLUSH_NOW: Final = 32 * 1024

_REQUEST_IDS: Final = RequestIds()


class _StopParsing(Exception):
    """Raised in a parser callback to stop at a message boundary (closing, pipeline full)."""


# --------------------------------------------------------------------------- the connection
class HttpConnection(asyncio.Protocol):
    """One client connection: parse, dispatch, forward, answer in order."""

    def __init__(self, listener: ListenerState) -> None:
        # global state
        settings = listener.settings
        self._listener = listener
        self._dispatcher = listener.dispatcher
        self._loop = asyncio.get_running_loop()
        self._max_head = settings.max_header_bytes
        self._header_timeout = settings.header_timeout
        self._idle_timeout = settings.idle_timeout
        self._body_timeout = settings.body_timeout
        self._send_timeout = settings.send_timeout
        self._max_pipeline = settings.max_pipeline
        self._max_headers = settings.max_headers
        self._upgrades = settings.upgrades
        self._xff = settings.xff
        self._proto_line = listener.proto_line
        self._request_drop = listener.request_drop

        # per-connection state
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer: tuple[str, int] = ("", 0)
        self._sock: tuple[str, int] = ("", 0)
        # The client's IP for x-forwarded-for; None when the listener leaves it alone.
        self._forwarded_for: bytes | None = b"" if self._xff else None
        self._closed = False  # close() called or connection lost: write nothing more
        self._paused = 0  # _P_* bits: why reading from the client is paused
        self._write_paused = False
        self._in_feed = False  # inside parser.feed_data: upstream writes are flushed after
        self._eof = False  # the client half-closed: close once the queue is answered
        self._draining = False  # Connections.shutdown(): close after the current exchange
        self._queue: collections.deque[ParsedRequest] = collections.deque()
        self._parsing: ParsedRequest | None = None  # the request the parser is inside
        self._head_open = False  # between on_message_begin and on_headers_complete
        self._head_bytes = 0  # size of the head so far, as seen through the callbacks
        self._head_unparsed = 0  # bytes fed while the head stayed open (httptools buffers them)
        self._stripped: ParsedRequest | None = None  # its h2c upgrade was stripped (_feed)
        self._resuming: ParsedRequest | None = None  # its body follows our head (_feed)
        self._fresh = b""  # the bytes being fed, when they start at a request line
        self._messages = 0
        self._idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._body_watched: ParsedRequest | None = None  # whose body _on_timer checks for progress
        self._body_seen = 0  # its body bytes at the last check
        self._body_since = 0.0  # ... and when that check was
        self._write_paused_at = 0.0
        self._wbuf: list[bytes] = []
        self._batched = False  # in _shared.batch: its writes go out at the iteration's end
        self._memo: object = None  # the dispatcher's, carried from one exchange to the next
        self._host_ok = b""  # the last Host found valid here (clients repeat theirs)

        # per-request state (the active exchange)
        self._active: ParsedRequest | None = None
        self._forward: Forward | None = None
        self._upstream: UpstreamConnection | None = None
        self._request_head = b""
        self._pool: UpstreamPool | None = None  # where the current attempt goes
        self._connect_task: asyncio.Task[UpstreamConnection] | None = None
        self._waiting: UpstreamPool | None = None  # queued there by its circuit breaker
        self._attempt = 0  # connect failures moved on to Forward.next_pool(k)
        self._retries = 0  # retries made under Forward.retry
        self._resent_stale = False  # the one resend after a stale keep-alive connection
        self._discard = False  # dropping a response that will be retried
        self._retry_handle: asyncio.Handle | None = None  # a retry waiting for its back-off
        self._retry_slot: CircuitBreaker | None = None  # holds one of its max_retries
        self._response_deadline: float | None = None  # Forward.timeout, as loop time
        self._try_deadline: float | None = None  # RetryPlan.per_try_timeout, as loop time
        self._started = False  # final response head written to the client
        self._mode = M_NONE
        self._keep = True  # keep the client connection after this response
        self._tunnel = False

    # ================================================================== asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance here.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self._peer = (peer[0], peer[1])
            if self._xff:
                self._forwarded_for = peer[0].encode()
        if isinstance(sock, tuple):
            self._sock = (sock[0], sock[1])
        if self._listener.connections is not None:
            self._listener.connections.add(self)
        self._go_idle(self._loop.time())

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._listener.connections is not None:
            self._listener.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ex = self._active
        if ex is not None:
            if self._tunnel:
                conn, self._upstream = self._upstream, None
                if conn is not None:
                    conn.abandon(graceful=True)  # let the last frames reach the upstream
            else:
                if ex.flags == "-":
                    ex.flags = "DC"
                self._drop_upstream()
            self._release_retry_slot()
            self._active = None
            self._report_finished(ex)
        while self._queue:
            ex = self._queue.popleft()
            ex.flags = "DC"
            self._report_finished(ex)

    def eof_received(self) -> bool | None:
        ex = self._active
        if self._tunnel or ex is None or self._parsing is not None:
            return None  # nothing to answer, or a request cut short: close
        self._eof = True  # half-close after a complete request: answer, then close
        self._pause(_P_DONE)
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = now = self._loop.time()
        self._set_deadline(now + self._send_timeout)
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            self._tunnel_out(data)
            return
        if self._paused & _P_DONE:
            return  # after an error or a final request: ignore the rest
        if self._paused & _P_UPGRADE:
            self._hold_upgrade_data(data)
            return
        messages = self._messages
        head_was_open = self._head_open
        self._in_feed = True
        if self._parsing is None:
            self._fresh = data
        try:
            self._feed(data)
        finally:
            self._in_feed = False
            self._fresh = b""
        if self._head_open:
            self._head_still_open(len(data), head_was_open and messages == self._messages)
        elif self._parsing is not None and self._parsing is not self._body_watched:
            self._watch_body(self._parsing)
        if len(data) < FLUSH_NOW:
            self.flush_soon()
        else:
            self._flush_both()

    def _feed(self, data: bytes) -> None:
        parser = self._parser
        while True:
            try:
                parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                rest = data[exc.args[0] :]
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
                return
            ex = self._stripped
            if ex is None:
                self._upgrade_data(rest)  # the rest is the new protocol's
                return
            # An h2c upgrade we strip: llhttp stopped right after its head, as for any upgrade
            # (httptools makes it skip the body), and httptools has already resumed it, so
            # what follows is HTTP again. A declared body comes first: a new parser reads it
            # behind a head of ours with the same framing (on_message_begin knows it).
            self._fresh = b""
            self._stripped = None
            if ex.body_done:
                data = rest
                continue
            self._resuming = ex
            parser = self._parser = httptools.HttpRequestParser(self)
            framing = CHUNKED_LINE if ex.chunked else b"content-length: %s\r\n" % ex.content_length
            data = b"PUT / HTTP/1.1\r\n" + framing + CRLF + rest

    # ================================================================== httptools callbacks
    def on_message_begin(self) -> None:
        ex = self._resuming
        if ex is not None:
            self._parsing = ex  # our head for a stripped upgrade's body (_feed): not a request
            return
        if self._closed or len(self._queue) >= self._max_pipeline:
            raise _StopParsing  # answer what we have, then close
        self._messages += 1
        self._parsing = ParsedRequest(self._peer, self._sock, self._loop.time())
        self._head_open = True
        self._head_bytes = 0
        self._head_unparsed = 0

    def on_url(self, url: bytes) -> None:
        if self._resuming is not None:
            return
        ex = self._parsing
        assert ex is not None
        ex.target += url
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head:
            raise RequestError(431, b"request header fields too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_open:
            return  # chunked trailers: dropped, like Envoy does by default
        ex = self._parsing
        assert ex is not None
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            raise RequestError(431, b"request header fields too large")
        name = _LOWER(name)
        headers = ex.headers
        if len(headers) >= self._max_headers:
            raise RequestError(431, b"too many headers")
        headers.append((name, value))
        kind = SPECIAL.get(name)
        if kind is not None:
            if kind == H_HOST and ex.authority is None:
                ex.authority = value  # the one nearly every request has
            else:
                note_header(ex, kind, value)

    def on_headers_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        if self._resuming is not None:
            self._resuming = None  # what follows is the stripped upgrade's body
            return
        self._head_open = False
        parser = self._parser
        ex.method = parser.get_method()
        ex.version = self._version(ex)
        ex.keep_alive = parser.should_keep_alive()
        self._check_request(ex)
        ex.body_done = ex.upgrade is not None or not (
            ex.chunked or ex.content_length not in (None, b"0")
        )
        if ex.request_id == b"":
            ex.request_id = _REQUEST_IDS.take()
        if self._active is None and not self._queue:
            self._activate(ex)
        else:
            self._queue.append(ex)
            self._pause(_P_QUEUE)

    def _version(self, ex: ParsedRequest) -> bytes:
        """HTTP version of the request whose head just ended.

        httptools only offers ``get_http_version``, which formats a str (about a tenth of the
        request's CPU). When the bytes being fed began with this request's line, llhttp has
        accepted "METHOD SP target SP HTTP/x.y CRLF" there, so the version sits at a known
        offset; it is read from the parser only otherwise (split or pipelined heads).
        """
        fresh = self._fresh
        if fresh:
            self._fresh = b""  # a pipelined request after this one starts elsewhere
            at = len(ex.method) + len(ex.target) + 2
            found = fresh[at : at + 10]
            if found == b"HTTP/1.1\r\n":
                return b"1.1"
            if found == b"HTTP/1.0\r\n":
                return b"1.0"
        version = _VERSIONS.get(self._parser.get_http_version())
        if version is None:
            raise RequestError(505, b"HTTP version not supported")
        return version

    def on_body(self, data: bytes) -> None:
        ex = self._parsing
        assert ex is not None
        ex.bytes_received += len(data)
        replay = ex.replay
        if replay is not None:
            ex.replay_left -= len(data)
            if ex.replay_left < 0:
                ex.replay = None  # too long to hold: this request is never resent
            else:
                replay.append(data)
        up = self._upstream
        if up is not None and ex is self._active:
            if ex.chunked:
                up.write_body(b"%x\r\n" % len(data))
                up.write_body(data)
                up.write(CRLF)
            else:
                up.write_body(data)
        elif ex.error is None:
            ex.held.append(data)
            ex.held_bytes += len(data)
            if ex.held_bytes > _BUFFER_LIMIT:
                self._pause(_P_CONNECTING)

    def on_message_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        self._parsing = None
        if ex is self._stripped:
            return  # not complete: llhttp skipped its body, which _feed reads next
        if ex.body_done:
            return  # bodiless request: already complete at the head
        ex.body_done = True
        if ex is self._active:
            self._arm_timeout()
            if self._upstream is not None:
                self._request_sent()

    # ================================================================== request checks
    def _check_request(self, ex: ParsedRequest) -> None:
        check_target(ex)
        authority = ex.authority
        if authority and authority != self._host_ok:
            ex.authority = self._host_ok = checked_host(authority)
        if ex.upgrade is not None:
            self._check_upgrade(ex)

    def _check_upgrade(self, ex: ParsedRequest) -> None:
        """Forward the upgrades the listener allows; strip h2c (see _feed); refuse the rest."""
        assert ex.upgrade is not None
        if not self._parser.should_upgrade():
            ex.upgrade = None  # Upgrade without "Connection: upgrade" is just a header
            return
        verdict = upgrade_verdict(ex.upgrade, self._upgrades)
        if verdict == FORWARD:
            return
        if verdict == REFUSE:
            raise RequestError(403, b"upgrade not allowed")
        ex.upgrade = None
        self._stripped = ex  # llhttp will stop after this head all the same: see _feed

    # ================================================================== exchange lifecycle
    def _activate(self, ex: ParsedRequest) -> None:
        """Make ``ex`` the active exchange: dispatch it and start forwarding or answering."""
        self._active = ex
        self._started = False
        self._keep = ex.keep_alive and not self._draining
        self._attempt = 0
        self._retries = 0
        self._resent_stale = False
        if ex.error is not None:
            self._local_reply(ex, ex.error[0], ex.error[1], close=True)
            return
        ex.memo = self._memo
        try:
            decision = self._dispatcher.dispatch(ex)
            self._memo = ex.memo
        except Exception:
            logger.exception("dispatch failed for %r", ex)
            decision = LocalReply(500, b"internal error")
        if isinstance(decision, LocalReply):
            self._local_reply(ex, decision.status, decision.body, decision.headers, decision.close)
            return
        self._forward = decision
        self._request_head = request_head(
            ex, decision, self._request_drop, self._forwarded_for, self._proto_line
        )
        plan = decision.retry
        if plan is not None and ex.bytes_received == 0 and not ex.body_done:
            # Hold the body (bounded) in case a retry must send it again. A queued request may
            # have body bytes already: past the limit, do not start holding at all.
            ex.replay = []
            ex.replay_left = plan.replay_limit
        elif plan is not None and ex.upgrade is None and 0 < ex.bytes_received <= plan.replay_limit:
            ex.replay = list(ex.held)
            ex.replay_left = plan.replay_limit - ex.bytes_received
        if ex.body_done:
            self._arm_timeout()
        self._use_pool(decision.pool, fresh=False)

    def _use_pool(self, pool: UpstreamPool, *, fresh: bool) -> None:
        ex = self._active
        assert ex is not None
        ex.upstream = pool.key
        self._pool = pool
        if fresh:
            self._open(ex, pool)
            return
        got = pool.checkout(self)
        if isinstance(got, UpstreamConnection):
            self._attach(got)
        elif got == OPEN:
            self._open(ex, pool)
        elif got == QUEUED:
            self._waiting = pool
        else:  # OVERFLOW
            ex.flags = "UO"
            self._local_reply(ex, 503, OVERFLOW_TEXT)

    def _open(self, ex: ParsedRequest, pool: UpstreamPool) -> None:
        task = self._connect_task = pool.open()
        task.add_done_callback(functools.partial(self._connected, ex, pool))

    def _connected(
        self, ex: ParsedRequest, pool: UpstreamPool, task: asyncio.Task[UpstreamConnection]
    ) -> None:
        if task.cancelled():
            return  # _drop_upstream: the exchange is over
        if self._connect_task is task:
            self._connect_task = None
        exc = task.exception()
        if exc is not None:  # refused, unreachable, timeout; anything else is logged
            if not isinstance(exc, OSError | TimeoutError):
                logger.warning("connect to %s failed", pool.key, exc_info=exc)
            if self._active is ex and not self._closed:
                self._connect_failed(ex, pool)
            return
        conn = task.result()
        if self._active is not ex or self._closed:
            pool.release(conn)  # fresh and unused: still good for someone else
            return
        self._attach(conn)

    def pool_ready(self, conn: UpstreamConnection | None) -> None:
        """PoolWaiter: the circuit breaker let this queued request through."""
        pool = self._waiting
        self._waiting = None
        ex = self._active
        if pool is None or ex is None or self._closed:
            if conn is not None and pool is not None:
                pool.release(conn)
            return
        if conn is None:
            self._open(ex, pool)
        else:
            self._attach(conn)
            conn.flush()
            self.flush()

    def _connect_failed(self, ex: ParsedRequest, pool: UpstreamPool) -> None:
        fwd = self._forward
        assert fwd is not None
        monitor = pool.monitor
        if monitor is not None:
            monitor.put(503)  # Envoy: LocalOriginConnectFailed
        plan = fwd.retry
        while (
            fwd.next_pool is not None
            and self._attempt < fwd.connect_retries
            and (plan is None or self._take_retry(plan))
        ):
            self._attempt += 1
            nxt = fwd.next_pool(self._attempt)
            if nxt is None:
                break
            ex.retries += 1
            self._use_pool(nxt, fresh=False)  # at once: nothing was sent (module docstring)
            return
        ex.flags = "UF"
        self._local_reply(ex, 503, CONNECT_FAILURE)

    # ================================================================== retries
    def _take_retry(self, plan: RetryPlan) -> bool:
        """Count one retry against the plan and the cluster's max_retries breaker."""
        if self._retries >= plan.attempts:
            return False
        self._release_retry_slot()
        pool = self._pool
        breaker = pool.breaker if pool is not None else None
        if breaker is not None:
            if not breaker.try_retry():
                return False
            self._retry_slot = breaker
        self._retries += 1
        return True

    def _release_retry_slot(self) -> None:
        slot = self._retry_slot
        if slot is not None:
            self._retry_slot = None
            slot.retry_done()

    def _may_retry(self, ex: ParsedRequest, plan: RetryPlan) -> bool:
        """Can the active request be sent again (and is a retry left)?"""
        if self._started or ex.upgrade is not None or not ex.body_done:
            return False
        if ex.bytes_received and ex.replay is None:
            return False  # a body we did not keep (too long): never replayed
        if not plan.may_resend(ex.method):
            return False  # it may have been processed: only when the route asked (docstring)
        return self._take_retry(plan)

    def _retry(self, ex: ParsedRequest, plan: RetryPlan) -> None:
        """Drop the current attempt and send the request again after the back-off."""
        self._discard = False
        self._drop_upstream()
        self._try_deadline = None
        ex.retries += 1
        ex.replays += 1
        fwd = self._forward
        pool = self._pool
        assert fwd is not None and pool is not None
        if plan.other_hosts and fwd.next_pool is not None:
            self._attempt += 1
            pool = fwd.next_pool(self._attempt) or pool
        self._retry_handle = self._loop.call_later(
            plan.delay(self._retries), self._send_again, ex, pool
        )

    def _send_again(self, ex: ParsedRequest, pool: UpstreamPool) -> None:
        self._retry_handle = None
        if self._active is not ex or self._closed:
            return
        if ex.replay:
            ex.held = list(ex.replay)
        self._arm_try_timeout()
        self._use_pool(pool, fresh=False)
        if self._upstream is not None:
            self._upstream.flush()
        self.flush()

    def _attach(self, conn: UpstreamConnection) -> None:
        """Send the request (head and whatever body we hold) on ``conn``."""
        ex = self._active
        assert ex is not None
        self._upstream = conn
        conn.attach(self, head_only=ex.method == b"HEAD", upgrade=ex.upgrade is not None)
        if self._write_paused:
            conn.pause_reading()
        conn.write(self._request_head)
        if ex.held:
            body, ex.held, ex.held_bytes = ex.held, [], 0
            if ex.upgrade is not None:
                ex.held = body  # early tunnel bytes wait for the 101
            elif ex.chunked:
                for data in body:
                    conn.write_body(b"%x\r\n" % len(data))
                    conn.write_body(data)
                    conn.write(CRLF)
            else:
                for data in body:
                    conn.write_body(data)
            self._resume(_P_CONNECTING)
        if ex.body_done:
            self._request_sent()
        if not self._in_feed:
            conn.flush()

    def _request_sent(self) -> None:
        """The whole request is queued on the upstream connection."""
        ex = self._active
        conn = self._upstream
        assert ex is not None and conn is not None
        if ex.chunked:
            conn.write(LAST_CHUNK)
        conn.request_done = True

    def _arm_timeout(self) -> None:
        """Start Forward.timeout: like Envoy's route timeout, from the end of the request."""
        fwd = self._forward
        if fwd is None:
            return
        if fwd.timeout is not None and self._response_deadline is None:
            self._response_deadline = deadline = self._loop.time() + fwd.timeout
            self._set_deadline(deadline)
        if fwd.retry is not None and fwd.retry.per_try_timeout is not None:
            self._arm_try_timeout()

    def _arm_try_timeout(self) -> None:
        """Each attempt gets a fresh per-try timeout, from the end of the request."""
        fwd = self._forward
        plan = fwd.retry if fwd is not None else None
        if plan is not None and plan.per_try_timeout is not None:
            self._try_deadline = deadline = self._loop.time() + plan.per_try_timeout
            self._set_deadline(deadline)

    def _on_timeout(self) -> None:
        self._response_deadline = None
        self._try_deadline = None
        ex = self._active
        if ex is None or self._closed:
            return
        self._report_attempt(504)
        ex.flags = "UT"
        self._drop_upstream()
        if self._started:
            self._abort()
        else:
            self._local_reply(ex, 504, UPSTREAM_TIMEOUT)

    def _on_try_timeout(self) -> None:
        self._try_deadline = None
        ex = self._active
        fwd = self._forward
        if ex is None or fwd is None or self._closed or self._tunnel:
            return
        if self._upstream is None and self._connect_task is None and self._waiting is None:
            return  # between two attempts (back-off): nothing to time out
        plan = fwd.retry
        if plan is not None and self._discard:
            self._retry(ex, plan)  # the dropped response is slow: the retry is already counted
            return
        if plan is not None and plan.on_reset and self._may_retry(ex, plan):
            self._report_attempt(504)  # Envoy: LocalOriginTimeout
            self._retry(ex, plan)
            return
        self._on_timeout()

    def _report_attempt(self, status: int) -> None:
        """Outlier detection: the current attempt failed with ``status`` (503/504)."""
        pool = self._pool
        if (
            pool is not None
            and pool.monitor is not None
            and (self._upstream is not None or self._connect_task is not None)
        ):
            pool.monitor.put(status)

    def _finish(self) -> None:
        """The active exchange is answered: report it and move on to the next one."""
        ex = self._active
        assert ex is not None
        self._active = None
        self._forward = None
        self._pool = None
        self._upstream = None
        self._request_head = b""
        self._response_deadline = None
        self._try_deadline = None
        self._discard = False
        if self._retry_slot is not None:
            self._release_retry_slot()
        if self._paused:
            self._resume(_P_UPSTREAM | _P_CONNECTING)
        self.flush_soon()
        self._report_finished(ex)
        if not self._keep or not ex.body_done or ex.upgrade is not None:
            self._close()
        elif self._queue:
            # Not now: we may be inside the upstream parser's callback, and the next request
            # could be handed the very connection that parser belongs to.
            self._loop.call_soon(self._activate_next)
        elif self._eof:
            self._close()
        else:
            self._go_idle(ex.end)  # read from the loop clock just now, in _finished

    def _activate_next(self) -> None:
        if self._closed or self._active is not None or not self._queue:
            return
        ex = self._queue.popleft()
        if not self._queue:
            self._resume(_P_QUEUE)
        self._activate(ex)
        if self._upstream is not None:
            self._upstream.flush()
        self.flush()

    def _report_finished(self, ex: ParsedRequest) -> None:
        ex.end = self._loop.time()
        try:
            self._dispatcher.finished(ex)
        except Exception:
            logger.exception("finished() failed for %r", ex)

    def _drop_upstream(self) -> None:
        if self._connect_task is not None:
            self._connect_task.cancel()
            self._connect_task = None
        if self._waiting is not None:
            self._waiting.cancel_wait(self)
            self._waiting = None
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        conn = self._upstream
        if conn is not None:
            self._upstream = None
            conn.abandon()

    # ================================================================== the upstream sink
    def response_interim(self, status: int, lines: list[bytes]) -> None:
        """A 1xx head; ``lines`` as for :meth:`response_head`."""
        ex = self._active
        if ex is None or ex.version != b"1.1":
            return  # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client
        lines[0] = status_line(status)
        lines.append(CRLF)
        self._wbuf.append(b"".join(lines))

    def response_head(
        self,
        status: int,
        lines: list[bytes],
        content_length: bytes | None,
        no_body: bool,
        connection_tokens: frozenset[bytes],
        upgrade_to: bytes | None,
    ) -> None:
        """The final response head. ``lines`` is ours to finish: a slot for the status line,
        then name, ": ", value, CRLF for each header but the hop-by-hop ones and
        content-length, which the upstream keeps out (framing is ours to write)."""
        ex = self._active
        fwd = self._forward
        assert ex is not None and fwd is not None
        pool = self._pool
        if pool is not None and pool.monitor is not None:
            pool.monitor.put(status)
        plan = fwd.retry
        if plan is not None and status in plan.statuses and self._may_retry(ex, plan):
            self._discard = True  # read this response to its end, drop it, then retry
            return
        ex.status = status
        self._started = True
        upgraded = status == 101
        if not upgraded and (not ex.body_done or ex.upgrade is not None):
            # Answered before the body ended, or an upgrade refused (what the client sent after
            # its head is not HTTP): either way the client's framing cannot be trusted.
            self._keep = False
        drop = connection_tokens
        edit = fwd.response_headers
        if edit is not None:
            drop = drop | edit.drop
        parts = without(lines, drop) if drop else lines
        parts[0] = STATUS_LINES.get(status) or status_line(status)
        if upgraded:
            self._mode = M_NONE
            if upgrade_to is not None:
                parts += (b"upgrade: ", upgrade_to, CRLF)  # a 101 names its new protocol
            parts.append(UPGRADE_LINE)
        else:
            http10 = ex.version == b"1.0"
            mode = self._mode = response_framing(parts, content_length, no_body, http10)
            if mode == M_RAW and http10 and content_length is None:
                self._keep = False  # the end of the connection delimits the body
        if edit is not None:
            parts.append(edit.lines)
        if fwd.set_cookie is not None:
            parts.append(fwd.set_cookie)
        if not upgraded:
            if not self._keep:
                parts.append(CLOSE_LINE)
            elif ex.version == b"1.0":
                parts.append(KEEP_ALIVE_LINE)
        parts.append(CRLF)
        self._wbuf.append(b"".join(parts))
        if upgraded:
            self._start_tunnel(ex)

    def response_body(self, data: bytes) -> None:
        if self._discard:
            return
        ex = self._active
        assert ex is not None
        ex.bytes_sent += len(data)
        mode = self._mode
        if mode == M_RAW:
            self._wbuf.append(data)
        elif mode == M_CHUNKED:
            self._wbuf += (b"%x\r\n" % len(data), data, CRLF)

    def response_end(self) -> None:
        self._upstream = None
        if self._discard:
            self._retry_dropped()
            return
        if self._mode == M_CHUNKED:
            self._wbuf.append(LAST_CHUNK)
        self._finish()

    def _retry_dropped(self) -> None:
        """The response being dropped ended (or broke): now send the request again."""
        ex = self._active
        fwd = self._forward
        self._discard = False
        if ex is None or fwd is None or fwd.retry is None or self._closed:
            return
        self._retry(ex, fwd.retry)

    def response_failed(self, reason: int, retryable: bool) -> None:
        ex = self._active
        self._upstream = None
        if ex is None or self._closed:
            return
        if self._tunnel:
            self._close()
            return
        if self._discard:
            self._retry_dropped()
            return
        protocol = reason == PROTOCOL_ERROR
        plan = self._forward.retry if self._forward is not None else None
        if (
            retryable
            and not self._resent_stale
            and not protocol
            and not self._started
            and (ex.method in IDEMPOTENT or (plan is not None and plan.explicit and plan.on_reset))
        ):
            # A stale keep-alive connection the server closed as we reused it: only the head
            # went out, and the server most likely closed before reading it. Most likely is
            # not surely, so a non-idempotent request is resent only when the route asked.
            self._resent_stale = True
            ex.replays += 1
            assert self._pool is not None
            self._use_pool(self._pool, fresh=True)
            return
        pool = self._pool
        if pool is not None and pool.monitor is not None:
            pool.monitor.put(503)  # Envoy counts a reset as a locally originated 503
        if plan is not None and plan.on_reset and self._may_retry(ex, plan):
            self._retry(ex, plan)
            return
        if ex.flags == "-":
            ex.flags = "UPE" if protocol else "UC"
        if self._started:
            self._abort()  # mid-response: the client must see a truncated message
        elif protocol:
            self._local_reply(ex, 502, PROTOCOL_ERROR_TEXT)
        else:
            self._local_reply(ex, 503, CONNECTION_TERMINATION)

    def upstream_paused(self, paused: bool) -> None:
        if paused:
            self._pause(_P_UPSTREAM)
        else:
            self._resume(_P_UPSTREAM)

    def flush_soon(self) -> None:
        """Write what is queued here and on the upstream side: at once when it is the first
        write of this loop iteration, else with the others held since, once the iteration's
        callbacks are done (:meth:`ListenerState.flush_batch`).

        Under load one iteration reads many connections. Writing each answer as its read
        comes in makes the kernel deliver to, and wake, a peer per write; the same writes
        sent back to back cost it much less. The first write goes at once, so that a lone
        request waits for nothing and its peer starts on it while the rest are read
        (holding every write instead lost 40 % of the throughput at 4 connections). Reads of
        FLUSH_NOW bytes or more are flushed at once (:meth:`flush`): flow control of a
        streamed body acts immediately and nothing large is ever held.
        """
        up = self._upstream
        if self._batched or not (self._wbuf or (up is not None and up.pending())):
            return
        listener = self._listener
        if listener.holding:
            self._batched = True
            listener.batch.append(self)
            return
        listener.holding = True
        self._loop.call_soon(listener.flush_batch)
        self._flush_both()

    def send_held(self) -> None:
        """ListenerState.flush_batch: the loop iteration ended, send what was held."""
        self._batched = False
        try:
            self._flush_both()
        except Exception:  # one broken connection must not hold the others' writes back
            logger.exception("flush failed for %r", self)
            self._wbuf.clear()
            with contextlib.suppress(Exception):
                self._abort()

    def flush_relayed(self, size: int) -> None:
        """After the upstream relayed a read of ``size`` bytes here: hold it like any small
        write (:meth:`flush_soon`), or send it now when it is large."""
        if size < FLUSH_NOW:
            self.flush_soon()
        else:
            self.flush()

    def _flush_both(self) -> None:
        up = self._upstream
        if up is not None:
            up.flush()
        self.flush()

    def flush(self) -> None:
        buf = self._wbuf
        if not buf:
            return
        if not self._closed and self.transport is not None:
            if len(buf) == 1:
                self.transport.write(buf[0])
            else:
                self.transport.writelines(buf)
        buf.clear()

    # ================================================================== upgrade / tunnel
    def _upgrade_data(self, rest: bytes) -> None:
        """The parser stopped after an upgrade request; ``rest`` is already the new protocol."""
        self._parsing = None
        self._pause(_P_UPGRADE)
        self._hold_upgrade_data(rest)

    def _hold_upgrade_data(self, data: bytes) -> None:
        ex = self._active
        if ex is None and self._queue:
            ex = self._queue[-1]
        if ex is None or not data:
            return
        ex.held.append(data)
        ex.bytes_received += len(data)

    def _start_tunnel(self, ex: ParsedRequest) -> None:
        self._tunnel = True
        self._mode = M_NONE
        conn = self._upstream
        assert conn is not None
        self._response_deadline = None  # a tunnel lives as long as its ends do
        early, ex.held = ex.held, []
        for data in early:
            conn.write_body(data)
        conn.flush()
        self._resume(_P_UPGRADE)

    def response_tunnel(self, data: bytes) -> None:
        ex = self._active
        if ex is not None:
            ex.bytes_sent += len(data)
        self._wbuf.append(data)

    def _tunnel_out(self, data: bytes) -> None:
        ex = self._active
        conn = self._upstream
        if ex is None or conn is None:
            return
        ex.bytes_received += len(data)
        conn.write_raw(data)

    # ================================================================== local replies, errors
    def _local_reply(
        self,
        ex: ParsedRequest,
        status: int,
        body: bytes,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        close: bool = False,
    ) -> None:
        """Answer ``ex`` ourselves (text/plain) and finish it."""
        if close or not ex.body_done or ex.upgrade is not None:
            self._keep = False
        head_request = ex.method == b"HEAD"
        self._wbuf.append(
            local_reply(
                status,
                body,
                headers,
                keep=self._keep,
                http10=ex.version == b"1.0",
                head_request=head_request,
                server_line=self._listener.server_line,
            )
        )
        if not head_request:
            ex.bytes_sent = len(body)
        ex.status = status
        self._started = True
        self._finish()

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        """The client sent something we cannot parse: reject it in turn and close."""
        self._pause(_P_DONE)
        self._head_open = False
        self._stripped = self._resuming = None
        cause = callback_error(exc)
        if isinstance(cause, _StopParsing):
            self._parsing = None
            if self._queue:
                self._queue[-1].keep_alive = False
            elif self._active is not None:
                self._keep = False
            return
        status, text = parse_error_reply(cause)
        if status == 500:  # raised by our own code inside a callback: a bug, not the client
            logger.error("error handling a request from %s", self._peer, exc_info=cause)
        elif cause is None:
            logger.debug("bad request from %s: %s", self._peer, exc)
        ex = self._parsing
        self._parsing = None
        if ex is None:
            ex = ParsedRequest(self._peer, self._sock, self._loop.time())
        ex.error = (status, text)
        ex.body_done = True
        ex.held = []
        if status != 500:
            ex.flags = "DPE"
        if ex is self._active:
            # The body of the request being forwarded is broken: the upstream got half of it.
            self._drop_upstream()
            if self._started:
                self._abort()
            else:
                self._local_reply(ex, status, text, close=True)
        elif ex in self._queue:
            pass  # answered in its turn
        elif self._active is None and not self._queue:
            self._activate(ex)
        else:
            self._queue.append(ex)

    def _abort(self) -> None:
        """Close the client connection mid-response (the truncation tells it something broke)."""
        self._keep = False
        self._drop_upstream()
        self.flush()
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    def _close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    # ================================================================== flow control
    def _pause(self, bit: int) -> None:
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._paused |= bit

    def _resume(self, bits: int) -> None:
        if self._paused & bits:
            self._paused &= ~bits
            if not self._paused and self.transport is not None and not self._closed:
                self.transport.resume_reading()

    # ================================================================== timers
    # One timer per connection for every deadline it has (idle, request head, response), re-armed
    # lazily: moving a deadline later costs nothing, the timer wakes at the old time, finds the
    # new deadline and sleeps again. A timer is replaced only when a deadline moves earlier
    # (idle 1 h -> a 15 s response timeout), so on a busy keep-alive connection with a route
    # timeout the cost is one timer per timeout period instead of two timer calls per request.
    def _go_idle(self, now: float) -> None:
        self._idle_since = now
        at = now + self._idle_limit()
        if self._timer is None or self._timer_at > at:
            self._set_deadline(at)

    def _idle_limit(self) -> float:
        """How long the connection may wait for a request's first byte: a new connection gets
        the head's time (nginx's client_header_timeout), a kept-alive one the idle timeout."""
        return self._idle_timeout if self._messages else self._header_timeout

    def _set_deadline(self, at: float) -> None:
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _head_still_open(self, size: int, same_head: bool) -> None:
        """After a read that did not complete a head: bound what httptools holds, arm 408."""
        if same_head:
            self._head_unparsed += size
            if self._head_unparsed > self._max_head:
                self._reject_open_head(431, b"request header fields too large")
                return
        ex = self._parsing
        if ex is not None:
            self._set_deadline(ex.start + self._header_timeout)

    def _watch_body(self, ex: ParsedRequest) -> None:
        """A read ended inside ``ex``'s body: from now on it must keep coming (body_timeout)."""
        self._body_watched = ex
        self._body_seen = ex.bytes_received
        self._body_since = ex.start  # no clock read per request: the head was just now
        self._set_deadline(ex.start + self._body_timeout)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        deadlines = []
        if self._response_deadline is not None:  # only ever set while an exchange is active
            if now >= self._response_deadline:
                self._on_timeout()  # 504 then idle (which re-arms), or abort
                return
            deadlines.append(self._response_deadline)
        if self._try_deadline is not None:
            if now >= self._try_deadline:
                self._on_try_timeout()  # a retry (re-arms), or as _on_timeout
                if self._timer is None and not self._closed:
                    self._on_timer()  # re-arm whatever deadlines remain
                return
            deadlines.append(self._try_deadline)
        if self._write_paused:
            if now >= self._write_paused_at + self._send_timeout:
                self._stalled(None)  # the client stopped reading what we send it
                return
            deadlines.append(self._write_paused_at + self._send_timeout)
        ex = self._parsing
        if self._head_open and ex is not None:
            head_deadline = ex.start + self._header_timeout
            if now >= head_deadline:
                self._reject_open_head(408, b"request timeout")
                return
            deadlines.append(head_deadline)
        elif ex is not None and ex is self._body_watched:
            if self._paused or ex.bytes_received != self._body_seen:
                # Progress, or we are the ones not reading (upstream full, request queued):
                # the client gets a whole new period from here.
                self._body_seen = ex.bytes_received
                self._body_since = now
            elif now >= self._body_since + self._body_timeout:
                self._stalled(ex)  # the client stopped sending its body
                return
            deadlines.append(self._body_since + self._body_timeout)
        elif self._active is None and not self._queue:
            idle_deadline = self._idle_since + self._idle_limit()
            if now >= idle_deadline:
                self._close()
                return
            deadlines.append(idle_deadline)
        if deadlines:
            self._set_deadline(min(deadlines))
        # else busy with no response deadline: _go_idle re-arms when the exchange ends

    def _stalled(self, ex: ParsedRequest | None) -> None:
        """A client stopped sending its request body (``ex``) or reading its response (None)
        for a whole period: reset the upstream request, answer 408 if we still can, close."""
        self._pause(_P_DONE)
        active = self._active
        if active is not None and active.flags == "-":
            active.flags = "SI"  # Envoy's stream idle timeout
        if ex is None:
            # What we hold for it would never drain: reset rather than close after a flush.
            self._abort()
            if self.transport is not None:
                self.transport.abort()
            return
        if ex is not active or self._started:
            self._abort()  # the next pipelined requests (if any) are dropped with the connection
            return
        self._parsing = None
        self._drop_upstream()
        self._local_reply(ex, 408, b"request timeout", close=True)

    def _reject_open_head(self, status: int, text: bytes) -> None:
        ex = self._parsing
        self._pause(_P_DONE)
        self._head_open = False
        self._parsing = None
        if ex is None:
            return
        ex.error = (status, text)
        ex.body_done = True
        if status == 431:
            ex.flags = "DPE"
        if self._active is None and not self._queue:
            self._activate(ex)
        else:
            self._queue.append(ex)

    # ================================================================== drain
    def shutdown(self) -> None:
        """Stop taking requests: close now if idle, else after the current response."""
        self._draining = True
        self._keep = False
        if self._active is None and not self._queue and not self._head_open:
            self._close()


async def serve(
    dispatcher: Dispatcher,
    host: str | None,
    port: int | None,
    settings: ServerSettings = ServerSettings(),
    *,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
    connections: Connections | None = None,
    backlog: int = 1024,
) -> asyncio.Server:
    """Listen on ``host:port`` (or on ``sock``) and proxy every request through ``dispatcher``."""
    listener = ListenerState(dispatcher, settings, connections)
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(
            lambda: HttpConnection(listener), sock=sock, backlog=backlog
        )
    if port is None:
        raise ValueError("port is required without sock")
    return await loop.create_server(
        lambda: HttpConnection(listener),
        host,
        port,
        reuse_port=reuse_port or None,
        backlog=backlog,
    )
