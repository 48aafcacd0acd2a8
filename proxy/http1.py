"""The data plane: forward each request of a client connection and relay its response.

:class:`HttpConnection` is the client's connection (``proxy.downstream``: parsing, checks,
order, timers) that forwards. For the active exchange the dispatcher (routing, affinity,
clusters: not our business) returns a :class:`~proxy.exchange.Forward` or a
:class:`~proxy.exchange.LocalReply`. For a Forward we take an idle connection from the pool
(no coroutine at all on the keep-alive path) or open one in a task, send the rewritten head
(``proxy.framing``), and stream the body: Content-Length bodies as they come, chunked bodies
re-framed chunk by chunk. The upstream connection parses the response and reports it back
through the ``response_*`` methods (see ``proxy.upstream``); we rewrite the head (hop-by-hop
headers out, edits in, Set-Cookie) and frame the body for this client: Content-Length passes
through, anything else becomes chunked for an HTTP/1.1 client or close-delimited for HTTP/1.0.
What fails and how the client hears of it is ``proxy.replies``' table; what is retried, and
where, ``proxy.retry``'s.

After a 101 the connection is a tunnel: bytes flow both ways untouched until either end
closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from ssl import SSLContext

from proxy.downstream import (
    FLUSH_NOW,
    P_CONNECTING,
    P_UPGRADE,
    P_UPSTREAM,
    DownstreamConnection,
)
from proxy.exchange import Dispatcher, Forward, LocalReply, ServerSettings
from proxy.framing import (
    CLOSE_LINE,
    CRLF,
    KEEP_ALIVE_LINE,
    LAST_CHUNK,
    M_CHUNKED,
    M_NONE,
    M_RAW,
    UPGRADE_LINE,
    ParsedRequest,
    request_head,
    response_framing,
    without,
)
from proxy.listener import Connections, ListenerState, TlsHandshake
from proxy.pool import OPEN, QUEUED, CircuitBreaker, UpstreamPool
from proxy.replies import (
    CONNECT_FAILURE,
    CONNECTION_TERMINATION,
    OVERFLOW_TEXT,
    PROTOCOL_ERROR_TEXT,
    STATUS_LINES,
    UPSTREAM_TIMEOUT,
    status_line,
)
from proxy.retry import IDEMPOTENT, RetryPlan
from proxy.upstream import PROTOCOL_ERROR, UpstreamConnection, UpstreamTlsError

__all__ = ["HttpConnection", "serve"]

logger = logging.getLogger("proxy.http1")


class HttpConnection(DownstreamConnection):
    """One client connection whose requests are forwarded upstream."""

    def __init__(self, listener: ListenerState) -> None:
        super().__init__(listener)
        # global state
        self._xff = listener.settings.xff
        self._proto_line = listener.proto_line
        self._request_drop = listener.request_drop

        # per-connection state
        # The client's IP for x-forwarded-for; None when the listener leaves it alone.
        self._forwarded_for: bytes | None = b"" if self._xff else None
        self._forward_lines = b""  # x-forwarded-for and -proto for this client, made once
        self._memo: object = None  # the dispatcher's, carried from one exchange to the next

        # per-request state (the active exchange's upstream side)
        self._forward: Forward | None = None
        self._upstream: UpstreamConnection | None = None
        self._request_head = b""
        self._pool: UpstreamPool | None = None  # where the current attempt goes
        self._connect_task: asyncio.Task[UpstreamConnection] | None = None
        self._waiting: UpstreamPool | None = None  # queued there by its circuit breaker
        self._attempt = 0  # connect failures moved on to Forward.next_pool(k)
        # The latest connect failure's TLS reason (Envoy's text), b"" for another failure: set
        # on every connect failure, read only by the 503 that follows one.
        self._tls_failure = b""
        self._retries = 0  # retries made under Forward.retry
        self._resent_stale = False  # the one resend after a stale keep-alive connection
        self._discard = False  # dropping a response that will be retried
        self._retry_handle: asyncio.Handle | None = None  # a retry waiting for its back-off
        self._retry_slot: CircuitBreaker | None = None  # holds one of its max_retries
        self._response_deadline: float | None = None  # Forward.timeout, as loop time
        self._try_deadline: float | None = None  # RetryPlan.per_try_timeout, as loop time
        self._mode = M_NONE  # how the response body is framed for the client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._xff and self._peer[0]:
            self._forwarded_for = self._peer[0].encode()
        if self._forwarded_for is not None:
            self._forward_lines = (
                b"x-forwarded-for: " + self._forwarded_for + b"\r\n" + self._proto_line
            )

    # ================================================================== hooks of the client side
    def _request_data(self, ex: ParsedRequest, data: bytes) -> bool:
        replay = ex.replay
        if replay is not None:
            ex.replay_left -= len(data)
            if ex.replay_left < 0:
                ex.replay = None  # too long to hold: this request is never resent
            else:
                replay.append(data)
        up = self._upstream
        if up is None:
            return False
        if ex.chunked:
            up.write_body(b"%x\r\n" % len(data))
            up.write_body(data)
            up.write(CRLF)
        else:
            up.write_body(data)
        return True

    def _request_complete(self, ex: ParsedRequest) -> None:
        self._arm_timeout()
        if self._upstream is not None:
            self._request_sent()

    def _client_gone(self, ex: ParsedRequest) -> None:
        if self._tunnel:
            conn, self._upstream = self._upstream, None
            if conn is not None:
                conn.abandon(graceful=True)  # let the last frames reach the upstream
        else:
            if ex.flags == "-":
                ex.flags = "DC"
            self._drop_upstream()
        self._release_retry_slot()

    def _exchange_done(self) -> None:
        self._forward = None
        self._pool = None
        self._upstream = None
        self._request_head = b""
        self._response_deadline = None
        self._try_deadline = None
        self._discard = False
        if self._retry_slot is not None:
            self._release_retry_slot()

    def _other_side_pending(self) -> bool:
        up = self._upstream
        return up is not None and up.pending()

    def _flush_other_side(self) -> None:
        up = self._upstream
        if up is not None:
            up.flush()

    def _client_writable(self, writable: bool) -> None:
        up = self._upstream
        if up is not None:
            if writable:
                up.resume_reading()
            else:
                up.pause_reading()

    def _other_deadlines(self, now: float, deadlines: list[float]) -> bool:
        if self._response_deadline is not None:  # only ever set while an exchange is active
            if now >= self._response_deadline:
                self._on_timeout()  # 504 then idle (which re-arms), or abort
                return True
            deadlines.append(self._response_deadline)
        if self._try_deadline is not None:
            if now >= self._try_deadline:
                self._on_try_timeout()  # a retry (re-arms), or as _on_timeout
                if self._timer is None and not self._closed:
                    self._on_timer()  # re-arm whatever deadlines remain
                return True
            deadlines.append(self._try_deadline)
        return False

    # ================================================================== exchange lifecycle
    def _activate(self, ex: ParsedRequest) -> None:
        """Dispatch the active exchange and start forwarding or answering it."""
        self._attempt = 0
        self._retries = 0
        self._resent_stale = False
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
            ex,
            decision,
            self._request_drop,
            self._forwarded_for,
            self._proto_line,
            self._forward_lines,
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
        if pool.auto_sni:  # TLS with the Host as SNI: one pool per name (proxy.upstream)
            fwd = self._forward
            authority = fwd.authority if fwd is not None else None
            pool = pool.named(authority or ex.authority or b"")
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
        if exc is not None:  # refused, unreachable, timeout, TLS; anything else is logged
            if isinstance(exc, UpstreamTlsError):
                self._tls_failure = exc.reason
            else:
                self._tls_failure = b""
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
        text = CONNECT_FAILURE
        if self._tls_failure:
            text += b", transport failure reason: " + self._tls_failure
        self._local_reply(ex, 503, text)

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
            self._resume(P_CONNECTING)
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
    def response_interim(
        self, status: int, lines: list[bytes], connection_tokens: frozenset[bytes]
    ) -> None:
        """A 1xx head; ``lines`` and ``connection_tokens`` as for :meth:`response_head`."""
        ex = self._active
        if ex is None or ex.version != b"1.1":
            return  # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client
        if connection_tokens:
            lines = without(lines, connection_tokens)
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
                parts.append(b"upgrade: %s\r\n" % upgrade_to)  # a 101 names its new protocol
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
            self._pause(P_UPSTREAM)
        else:
            self._resume(P_UPSTREAM)

    def flush_relayed(self, size: int) -> None:
        """After the upstream relayed a read of ``size`` bytes here: hold it like any small
        write (:meth:`flush_soon`), or send it now when it is large."""
        if size < FLUSH_NOW:
            self.flush_soon()
        else:
            self.flush()

    # ================================================================== upgrade / tunnel
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
        self._resume(P_UPGRADE)

    def response_tunnel(self, data: bytes) -> None:
        ex = self._active
        if ex is not None:
            ex.bytes_sent += len(data)
        self._wbuf.append(data)

    def _tunnel_data(self, data: bytes) -> None:
        ex = self._active
        conn = self._upstream
        if ex is None or conn is None:
            return
        ex.bytes_received += len(data)
        conn.write_raw(data)


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
    ssl: SSLContext | None = None,
    tls: TlsHandshake | None = None,
) -> asyncio.Server:
    """Listen on ``host:port`` (or on ``sock``) and proxy every request through ``dispatcher``.

    With ``ssl`` the listener terminates TLS (uvloop's TLS transport, ``proxy.tls``): ``tls``
    then tells each connection, after its handshake, which dispatcher serves it; the handshake
    must be over within the settings' ``header_timeout``.
    """
    listener = ListenerState(dispatcher, settings, connections, tls)
    loop = asyncio.get_running_loop()
    handshake = settings.header_timeout if ssl is not None else None
    if sock is not None:
        return await loop.create_server(
            lambda: HttpConnection(listener),
            sock=sock,
            backlog=backlog,
            ssl=ssl,
            ssl_handshake_timeout=handshake,
        )
    if port is None:
        raise ValueError("port is required without sock")
    return await loop.create_server(
        lambda: HttpConnection(listener),
        host,
        port,
        reuse_port=reuse_port or None,
        backlog=backlog,
        ssl=ssl,
        ssl_handshake_timeout=handshake,
    )
