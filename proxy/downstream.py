"""The client's side of a connection: HTTP/1.1 requests in, responses out, in order.

:class:`DownstreamConnection` is an HTTP/1.1 server connection that knows nothing of
upstreams: it parses requests with httptools (llhttp), checks them (``proxy.framing``), queues
pipelined ones, answers them strictly in order, and keeps the connection's timers, flow control
and drain. What to do with each request is its subclass's business (``proxy.http1``'s
``HttpConnection`` forwards it), through a handful of hooks: :meth:`_activate` a request,
:meth:`_request_data` for its body, :meth:`_request_complete`, :meth:`_exchange_done`, and
the ones that reach the other side (flush, pause, drop).

Theory of operation
-------------------
One exchange is *active* at a time. A request parsed while another is active (pipelining)
waits in a queue with its body bytes, and reading from the client pauses until the queue
drains, so a pipelining client costs at most one socket read of buffering.

Backpressure is the transports' own: when the client's transport buffer passes its high-water
mark, asyncio calls ``pause_writing`` and the subclass stops reading what it relays until
``resume_writing``. Reading from the client can be paused for several reasons at once
(upstream full, pipelined request waiting, body arriving before the upstream is connected, an
upgrade waiting for its 101), so those are bits in one mask. Either way at most a socket read
plus a transport buffer per direction is held, whatever the body size.

Bytes meant for the client during one read are queued and written once, so a small response
head and body leave in one ``send``; see :meth:`flush_soon` for how writes are held to the end
of an event-loop iteration.

One timer per connection serves every deadline it has (see the ``timers`` section): the
subclass's response deadlines, the request head, a stalled body, a client that stops reading,
and idleness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final, cast

import httptools

from proxy.exchange import LOWER, DownstreamTls
from proxy.framing import (
    CHUNKED_LINE,
    CRLF,
    FORWARD,
    H_HOST,
    REFUSE,
    SPECIAL,
    ParsedRequest,
    RequestError,
    RequestIds,
    check_target,
    checked_host,
    note_header,
    upgrade_verdict,
)
from proxy.listener import ListenerState
from proxy.replies import local_reply, parse_error_reply
from proxy.upstream import callback_error, write_buffers

logger = logging.getLogger("proxy.downstream")

_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}

# Reasons reading from the client is paused (bits of DownstreamConnection._paused).
P_UPSTREAM: Final = 1  # upstream write buffer full
P_QUEUE: Final = 2  # a pipelined request waits its turn
P_CONNECTING: Final = 4  # body bytes buffered while no upstream connection is attached
P_UPGRADE: Final = 8  # an upgrade request waits for its 101
P_DONE: Final = 16  # nothing more will be read (error, closing)

_BUFFER_LIMIT: Final = 64 * 1024  # body bytes held for a request not yet sent on
# A read at least this large is relayed at once, not at the end of the loop iteration
# (flush_soon): libuv reads a socket again in the same iteration only after a read that
# filled its buffer, so holding the smaller ones keeps at most one read per connection
# waiting, and a streamed body's flow control acts as each large read arrives.
FLUSH_NOW: Final = 32 * 1024


_REQUEST_IDS: Final = RequestIds()


class _StopParsing(Exception):
    """Raised in a parser callback to stop at a message boundary (closing, pipeline full)."""


class DownstreamConnection(asyncio.Protocol):
    """One client connection: parse, check, queue, answer in order (subclass: forward)."""

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

        # per-connection state
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer: tuple[str, int] = ("", 0)
        self._sock: tuple[str, int] = ("", 0)
        self._closed = False  # close() called or connection lost: write nothing more
        self._paused = 0  # P_* bits: why reading from the client is paused
        self._write_paused = False
        self._in_feed = False  # inside parser.feed_data: the other side is flushed after
        self._eof = False  # the client half-closed: close once the queue is answered
        self._draining = False  # Connections.shutdown(): close after the current exchange
        # Pipelined requests waiting their turn: at most max_pipeline (32), so a list and
        # pop(0) (an empty deque takes 760 bytes on every idle connection, a list 56).
        self._queue: list[ParsedRequest] = []
        self._parsing: ParsedRequest | None = None  # the request the parser is inside
        self._head_open = False  # between on_message_begin and on_headers_complete
        self._head_bytes = 0  # size of the head so far, as seen through the callbacks
        self._head_unparsed = 0  # bytes fed while the head stayed open (httptools buffers them)
        self._stripped: ParsedRequest | None = None  # its h2c upgrade was stripped (_after_upgrade)
        self._resuming: ParsedRequest | None = None  # its body follows our head (_after_upgrade)
        self._fresh = b""  # the bytes being fed, when they start at a request line
        self._messages = 0
        self._idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._body_watched: ParsedRequest | None = None  # whose body _on_timer checks
        self._body_seen = 0  # its body bytes at the last check
        self._body_since = 0.0  # ... and when that check was
        self._write_paused_at = 0.0
        self._wbuf: list[bytes] = []
        self._batched = False  # in the listener's batch: written at the iteration's end
        self._host_ok = b""  # the last Host found valid here (clients repeat theirs)
        self._target_ok = b""  # the last target found without a fragment here, likewise
        self._tunnel = False  # upgraded: what the client sends goes to _tunnel_data
        self._tls: DownstreamTls | None = None  # an HTTPS listener's connection: its handshake

        # per-request state (the active exchange)
        self._active: ParsedRequest | None = None
        self._started = False  # final response head written to the client
        self._keep = True  # keep the client connection after this response

    # ================================================================== hooks (subclass)
    def _activate(self, ex: ParsedRequest) -> None:
        """``ex`` is the active exchange now, with no error to answer: act on it."""
        raise NotImplementedError

    def _request_data(self, ex: ParsedRequest, data: bytes) -> bool:
        """Body bytes of the active request: True when sent on, False to have them held
        (``ex.held``) until the subclass takes them."""
        return False

    def _request_complete(self, ex: ParsedRequest) -> None:
        """The active request's body ended (called only for a request with a body)."""

    def _tunnel_data(self, data: bytes) -> None:
        """Client bytes after an upgrade (``_tunnel`` set)."""

    def _client_gone(self, ex: ParsedRequest) -> None:
        """The client connection was lost while ``ex`` was active."""

    def _exchange_done(self) -> None:
        """The active exchange was answered (or dropped): forget its per-request state."""

    def _drop_upstream(self) -> None:
        """Stop whatever the active exchange has under way on the other side."""

    def _other_side_pending(self) -> bool:
        """Bytes are queued for the other side (sent by :meth:`_flush_other_side`)."""
        return False

    def _flush_other_side(self) -> None:
        """Send what is queued for the other side."""

    def _client_writable(self, writable: bool) -> None:
        """The client's transport stopped (False) or resumed (True) taking our writes."""

    def _other_deadlines(self, now: float, deadlines: list[float]) -> bool:
        """The subclass's deadlines on the shared timer: act on the expired ones (True: it
        acted, stop here) or add the pending ones to ``deadlines``."""
        return False

    # ================================================================== asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance here.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self._peer = (peer[0], peer[1])
        if isinstance(sock, tuple):
            self._sock = (sock[0], sock[1])
        tls = self._listener.tls
        if tls is not None:
            # The handshake is over (uvloop calls us after it): the server the client's SNI
            # chose has its own route table, hence its own dispatcher (proxy.tls).
            self._dispatcher, self._tls = tls(transport)
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
            self._client_gone(ex)
            self._active = None
            self._report_finished(ex)
        while self._queue:
            ex = self._queue.pop(0)
            ex.flags = "DC"
            self._report_finished(ex)

    def eof_received(self) -> bool | None:
        ex = self._active
        if self._tls is not None:
            return None  # a TLS transport closes on EOF whatever we answer (uvloop warns)
        if self._tunnel or ex is None or self._parsing is not None:
            return None  # nothing to answer, or a request cut short: close
        self._eof = True  # half-close after a complete request: answer, then close
        self._pause(P_DONE)
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = now = self._loop.time()
        self._set_deadline(now + self._send_timeout)
        self._client_writable(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._client_writable(True)

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            self._tunnel_data(data)
            return
        if self._paused & P_DONE:
            return  # after an error or a final request: ignore the rest
        if self._paused & P_UPGRADE:
            self._hold_upgrade_data(data)
            return
        messages = self._messages
        head_was_open = self._head_open
        self._in_feed = True
        if self._parsing is None:
            self._fresh = data
        try:
            upgraded = -1
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                upgraded = exc.args[0]
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
            if upgraded >= 0:
                # Outside the except clause: a callback error raised while reading on would
                # get the upgrade as its __context__, where callback_error looks for ours.
                self._after_upgrade(data[upgraded:])
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

    def _after_upgrade(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head; ``rest`` is what followed it."""
        while True:
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
            else:
                self._resuming = ex
                self._parser = httptools.HttpRequestParser(self)
                framing = (
                    CHUNKED_LINE if ex.chunked else b"content-length: %s\r\n" % ex.content_length
                )
                data = b"PUT / HTTP/1.1\r\n" + framing + CRLF + rest
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                rest = data[exc.args[0] :]
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
                return

    # ================================================================== httptools callbacks
    def on_message_begin(self) -> None:
        ex = self._resuming
        if ex is not None:
            self._parsing = (
                ex  # our head for a stripped upgrade's body (_after_upgrade): not a request
            )
            return
        if self._closed or len(self._queue) >= self._max_pipeline:
            raise _StopParsing  # answer what we have, then close
        self._messages += 1
        self._parsing = ParsedRequest(self._peer, self._sock, self._loop.time(), self._tls)
        self._head_open = True
        self._head_bytes = 0
        self._head_unparsed = 0

    def on_url(self, url: bytes) -> None:
        if self._resuming is not None:
            return
        ex = self._parsing
        assert ex is not None
        if not ex.method:
            # Known from here on, so that a head refused before its end still gets a reply
            # without a body when it is a HEAD.
            ex.method = self._parser.get_method()
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
        name = name.translate(LOWER)
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
        ex.version = self._version(ex)
        ex.keep_alive = parser.should_keep_alive()
        self._check_request(ex)
        ex.body_done = ex.upgrade is not None or not (
            ex.chunked or ex.content_length not in (None, b"0")
        )
        if ex.request_id == b"":
            ex.request_id = _REQUEST_IDS.take()
        if self._active is None and not self._queue:
            self._begin(ex)
        else:
            self._queue.append(ex)
            self._pause(P_QUEUE)

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
        if ex is self._active and self._request_data(ex, data):
            return
        if ex.error is None:
            ex.held.append(data)
            ex.held_bytes += len(data)
            if ex.held_bytes > _BUFFER_LIMIT:
                self._pause(P_CONNECTING)

    def on_message_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        self._parsing = None
        if ex is self._stripped:
            return  # not complete: llhttp skipped its body, which _after_upgrade reads next
        if ex.body_done:
            return  # bodiless request: already complete at the head
        ex.body_done = True
        if ex is self._active:
            self._request_complete(ex)

    # ================================================================== request checks
    def _check_request(self, ex: ParsedRequest) -> None:
        target = ex.target
        check_target(ex, self._target_ok)
        self._target_ok = target
        authority = ex.authority
        if authority and authority != self._host_ok:
            ex.authority = self._host_ok = checked_host(authority)
        if ex.upgrade is not None:
            self._check_upgrade(ex)

    def _check_upgrade(self, ex: ParsedRequest) -> None:
        """Forward the upgrades the listener allows; strip h2c (_after_upgrade); refuse others."""
        assert ex.upgrade is not None
        if not self._parser.should_upgrade():
            ex.upgrade = None  # Upgrade without "Connection: upgrade" is just a header
            return
        if ex.version == b"1.0":
            # RFC 9110 §7.8: a server must ignore Upgrade in an HTTP/1.0 request. llhttp stops
            # after its head all the same: read on as for a stripped h2c.
            ex.upgrade = None
            self._stripped = ex
            return
        verdict = upgrade_verdict(ex.upgrade, self._upgrades)
        if verdict == FORWARD:
            if ex.chunked or ex.content_length not in (None, b"0"):
                # httptools makes llhttp skip an upgrade request's body: it would reach the
                # pod unframed, as the new protocol's first bytes.
                raise RequestError(400, b"upgrade request with a body")
            return
        if verdict == REFUSE:
            raise RequestError(403, b"upgrade not allowed")
        ex.upgrade = None
        self._stripped = ex  # llhttp will stop after this head all the same: see _after_upgrade

    # ================================================================== exchange lifecycle
    def _begin(self, ex: ParsedRequest) -> None:
        """Make ``ex`` the active exchange: answer its error, or let the subclass act."""
        self._active = ex
        self._started = False
        self._keep = ex.keep_alive and not self._draining
        if ex.error is not None:
            self._local_reply(ex, ex.error[0], ex.error[1], close=True)
            return
        self._activate(ex)

    def _finish(self) -> None:
        """The active exchange is answered: report it and move on to the next one."""
        ex = self._active
        assert ex is not None
        self._active = None
        self._exchange_done()
        if self._paused:
            self._resume(P_UPSTREAM | P_CONNECTING)
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
            self._go_idle(ex.end)  # read from the loop clock just now, in _report_finished

    def _activate_next(self) -> None:
        if self._closed or self._active is not None or not self._queue:
            return
        ex = self._queue.pop(0)
        if not self._queue:
            self._resume(P_QUEUE)
        self._begin(ex)
        self._flush_both()

    def _report_finished(self, ex: ParsedRequest) -> None:
        ex.end = self._loop.time()
        try:
            self._dispatcher.finished(ex)
        except Exception:
            logger.exception("finished() failed for %r", ex)

    # ================================================================== writing
    def flush_soon(self) -> None:
        """Write what is queued here and for the other side: at once when it is the first
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
        if self._batched or not (self._wbuf or self._other_side_pending()):
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

    def _flush_both(self) -> None:
        self._flush_other_side()
        self.flush()

    def flush(self) -> None:
        buf = self._wbuf
        if not buf:
            return
        if not self._closed and self.transport is not None:
            write_buffers(self.transport, buf)
        buf.clear()

    def _upgrade_data(self, rest: bytes) -> None:
        """The parser stopped after an upgrade request; ``rest`` is already the new protocol."""
        self._parsing = None
        self._pause(P_UPGRADE)
        self._hold_upgrade_data(rest)

    def _hold_upgrade_data(self, data: bytes) -> None:
        # The upgrade request is the last one parsed (nothing is parsed after it): queued
        # behind the active one, or the active one itself.
        ex = self._queue[-1] if self._queue else self._active
        if ex is None or not data:
            return
        ex.held.append(data)
        ex.bytes_received += len(data)

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
        self._pause(P_DONE)
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
            ex = ParsedRequest(self._peer, self._sock, self._loop.time(), self._tls)
        elif not ex.method and not isinstance(exc, httptools.HttpParserInvalidMethodError):
            # Refused inside its target (on_url never came): llhttp has read this request's
            # method, and a HEAD must get no body. (A refused method leaves llhttp holding the
            # previous request's.)
            ex.method = self._parser.get_method()
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
            self._begin(ex)
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
        deadlines: list[float] = []
        if self._active is not None and self._other_deadlines(now, deadlines):
            return
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
        # else busy with no deadline: _go_idle re-arms when the exchange ends

    def _stalled(self, ex: ParsedRequest | None) -> None:
        """A client stopped sending its request body (``ex``) or reading its response (None)
        for a whole period: reset the upstream request, answer 408 if we still can, close."""
        self._pause(P_DONE)
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
        self._pause(P_DONE)
        self._head_open = False
        self._parsing = None
        if ex is None:
            return
        ex.error = (status, text)
        ex.body_done = True
        if status == 431:
            ex.flags = "DPE"
        if self._active is None and not self._queue:
            self._begin(ex)
        else:
            self._queue.append(ex)

    # ================================================================== drain
    def shutdown(self) -> None:
        """Stop taking requests: close now if idle, else after the current response."""
        self._draining = True
        self._keep = False
        if self._active is None and not self._queue and not self._head_open:
            self._close()
