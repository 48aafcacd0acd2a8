"""Keep-alive pools of upstream connections, and the circuit breakers their cluster shares.

Theory of operation
-------------------
An :class:`UpstreamPool` holds idle keep-alive connections to one endpoint ("ip:port"). It is
long-lived (the cluster code keeps one per endpoint across config snapshots), so it takes the
running loop lazily and never assumes it was built inside one. Idle connections sit in a LIFO;
the connection itself (``proxy.upstream.UpstreamConnection``) decides whether it may be reused
and hands itself back with :meth:`UpstreamPool.release` or :meth:`UpstreamPool.discard`.

Circuit breaking (Envoy's cluster circuit breakers, Istio's ``connectionPool``)
------------------------------------------------------------------------------
The pools of one cluster share a :class:`CircuitBreaker`: ``max_connections`` counts every
connection of the cluster, open or opening; ``max_pending`` counts the requests waiting for a
connection (opening one, or queued because the cluster is at ``max_connections``);
``max_retries`` counts retries in flight. :meth:`UpstreamPool.checkout` hands out an idle
connection, or says "open one", "you are queued" (the waiter is called back with a released
connection, or told to open one when the count drops), or "overflow" (Envoy's 503 with reset
reason ``overflow``, flag UO). Like Envoy, a pool with no connection at all may always open one,
so a request for a host the others crowd out never waits for ever.

Outlier detection hooks in per endpoint: ``UpstreamPool.monitor`` (set by ``proxy.health``)
receives the outcome of every attempt (:class:`HostMonitor`), so a request that fails on one
pod and succeeds on a retry still counts the failure against the first pod.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import TYPE_CHECKING, Final, Protocol

from proxy.upstream import UpstreamConnection, UpstreamTlsError

if TYPE_CHECKING:
    from proxy.tls import UpstreamTls

__all__ = [
    "OPEN",
    "OVERFLOW",
    "QUEUED",
    "UNLIMITED",
    "CircuitBreaker",
    "HostMonitor",
    "PoolWaiter",
    "UpstreamPool",
]

# What UpstreamPool.checkout answers when it has no idle connection to give.
OPEN: Final = 1  # open a new connection (UpstreamPool.connect)
QUEUED: Final = 2  # wait: PoolWaiter.pool_ready is called later
OVERFLOW: Final = 3  # a circuit breaker is full: 503, reset reason overflow

UNLIMITED: Final = 2**32 - 1  # Envoy's "no limit" for circuit breakers (Istio's defaults)
_MAX_NAMES: Final = 64  # SNI names kept per endpoint before the unused ones are dropped


class HostMonitor(Protocol):
    """Outlier detection for one endpoint (``proxy.health``): the outcome of each attempt.

    ``status`` is the response status, or what Envoy reports for a failure of its own: 503 for
    a connect failure or a reset, 504 for a timeout.
    """

    def put(self, status: int) -> None: ...


class PoolWaiter(Protocol):
    """A request queued by :meth:`UpstreamPool.checkout` (implemented by ``http1``)."""

    def pool_ready(self, conn: UpstreamConnection | None) -> None:
        """A connection for you, or None: open one now (the breaker has room again)."""
        ...


class CircuitBreaker:
    """Envoy's per-cluster circuit breakers, shared by the pools of one cluster."""

    __slots__ = (
        "_waiting",
        "connections",
        "max_connections",
        "max_pending",
        "max_retries",
        "overflows",
        "pending",
        "retries",
    )

    def __init__(
        self,
        max_connections: int = UNLIMITED,
        max_pending: int = UNLIMITED,
        max_retries: int = UNLIMITED,
    ) -> None:
        if min(max_connections, max_pending, max_retries) < 0:
            raise ValueError("circuit breaker limits must be >= 0")
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_retries = max_retries
        self.connections = 0  # open or opening, all pools
        self.pending = 0  # requests waiting for a connection
        self.retries = 0  # retries in flight
        self.overflows = 0  # requests refused (metrics, tests)
        self._waiting: set[UpstreamPool] = set()

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker connections={self.connections}/{self.max_connections} "
            f"pending={self.pending}/{self.max_pending} retries={self.retries}/{self.max_retries}>"
        )

    def try_retry(self) -> bool:
        """Take a retry slot (False: retry overflow, answer with the failure at hand)."""
        if self.retries >= self.max_retries:
            return False
        self.retries += 1
        return True

    def retry_done(self) -> None:
        self.retries -= 1

    def _room(self) -> None:
        """A connection closed: pools with queued requests may open one now."""
        for pool in list(self._waiting):
            pool._schedule_waiters()


class UpstreamPool:
    """Keep-alive connections to one endpoint: a bounded LIFO of idle ones.

    LIFO keeps the hottest connections busy and lets the oldest ones age out: idle connections
    sit in a deque ordered by the time they went idle, so one timer on the oldest is enough.
    """

    __slots__ = (
        "_closed",
        "_idle",
        "_loop",
        "_named",
        "_timer",
        "_waiters",
        "_waiters_scheduled",
        "auto_sni",
        "breaker",
        "connect_timeout",
        "connections",
        "host",
        "idle_timeout",
        "key",
        "max_connection_duration",
        "max_idle",
        "max_requests_per_connection",
        "monitor",
        "opened",
        "port",
        "sni",
        "tls",
    )

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int = 64,
        idle_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_requests_per_connection: int = 0,
        max_connection_duration: float | None = None,
        breaker: CircuitBreaker | None = None,
        tls: UpstreamTls | None = None,
        sni: str | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if max_idle < 0 or idle_timeout < 0 or connect_timeout <= 0:
            raise ValueError("max_idle and idle_timeout must be >= 0, connect_timeout > 0")
        if max_connection_duration is not None and max_connection_duration <= 0:
            raise ValueError("max_connection_duration must be > 0")
        self.host = host
        self.port = port
        self.key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout  # 0: idle connections stay until the server closes
        self.connect_timeout = connect_timeout
        self.max_requests_per_connection = max_requests_per_connection
        # Envoy's max_connection_duration: a connection older than this is closed when idle
        # (or at once, if it already is), so long-lived keep-alive reaches new pods too.
        self.max_connection_duration = max_connection_duration
        # A pool without a breaker of its own gets an unlimited private one.
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.monitor: HostMonitor | None = None  # outlier detection (proxy.health)
        self.opened = 0  # connections ever opened (metrics, tests)
        self.connections = 0  # open or opening
        # Idle connections, oldest first: taken from the end (the warmest), expired from the
        # start. A list: compiled, its append and pop are C calls, a deque's method calls.
        self._idle: list[UpstreamConnection] = []
        self._waiters: collections.deque[PoolWaiter] = collections.deque()
        self._waiters_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.tls = tls
        # With TLS and no fixed SNI, each request's Host is its SNI: the pool to use is then
        # named(host), never this one (http1's _use_pool). A named pool has its sni set.
        self.sni = sni if sni is not None else (tls.sni if tls is not None else None)
        self.auto_sni = tls is not None and tls.auto_sni and sni is None
        self._named: dict[str, UpstreamPool] = {}

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.key} idle={len(self._idle)} opened={self.opened}>"

    @property
    def idle_count(self) -> int:
        return len(self._idle) + sum(len(p._idle) for p in self._named.values())

    def named(self, authority: bytes) -> UpstreamPool:
        """The pool of this endpoint for one SNI name (``auto_sni``): ``authority`` is the
        upstream request's Host; its port is not part of the name (Envoy's auto_sni)."""
        host = authority.decode("latin-1").lower()
        if host.startswith("["):  # [v6]:port
            end = host.find("]")
            host = host[1:end] if end > 0 else host
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        pool = self._named.get(host)
        if pool is None:
            if len(self._named) >= _MAX_NAMES:
                # A client chooses its Host: names with no connection are forgotten, so the
                # map holds at most the names of open connections, plus a few.
                for name, unused in list(self._named.items()):
                    if not unused.connections and not unused._waiters:
                        del self._named[name]
            pool = UpstreamPool(
                self.host,
                self.port,
                max_idle=self.max_idle,
                idle_timeout=self.idle_timeout,
                connect_timeout=self.connect_timeout,
                max_requests_per_connection=self.max_requests_per_connection,
                max_connection_duration=self.max_connection_duration,
                breaker=self.breaker,
                tls=self.tls,
                sni=host,
            )
            self._named[host] = pool
        pool.monitor = self.monitor  # outlier detection sees the endpoint, whatever the name
        return pool

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def take(self) -> UpstreamConnection | None:
        """The most recently used idle connection, or None (then call :meth:`connect`)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:  # (closed ones remove themselves; belt and braces)
                return conn
        return None

    def can_open(self) -> bool:
        """Room for one more connection (a pool with none may always open one, like Envoy)."""
        b = self.breaker
        return self.connections == 0 or b.connections < b.max_connections

    def checkout(self, waiter: PoolWaiter) -> UpstreamConnection | int:
        """An idle connection, or OPEN (call :meth:`open` now), QUEUED or OVERFLOW."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        b = self.breaker
        if b.pending >= b.max_pending:
            b.overflows += 1
            return OVERFLOW
        if self.can_open():
            return OPEN
        b.pending += 1
        self._waiters.append(waiter)
        b._waiting.add(self)
        return QUEUED

    def cancel_wait(self, waiter: PoolWaiter) -> None:
        """Forget a queued request (its client left, or it timed out)."""
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self.breaker.pending -= 1
        if not self._waiters:
            self.breaker._waiting.discard(self)

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises OSError (refused, unreachable), TimeoutError or
        UpstreamTlsError (its TLS handshake failed)."""
        self._reserve()
        return await self._open_reserved()

    def open(self) -> asyncio.Task[UpstreamConnection]:
        """:meth:`connect` in a task, counted against the breaker from now on.

        The count is taken synchronously, so a burst of requests in one loop iteration cannot
        all see room for "one more" connection; a task cancelled before it ever ran gives the
        count back in its done callback.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._reserve()
        started: list[bool] = []
        task = loop.create_task(self._open_reserved(started))
        task.add_done_callback(lambda _: None if started else self._unreserve())
        return task

    def _reserve(self) -> None:
        b = self.breaker
        self.connections += 1
        b.connections += 1
        b.pending += 1

    def _unreserve(self) -> None:
        self.breaker.pending -= 1
        self._uncount()

    async def _open_reserved(self, started: list[bool] | None = None) -> UpstreamConnection:
        # Envoy counts a connection against max_connections from its first SYN, and the
        # request that waits for it against max_pending.
        if started is not None:
            started.append(True)
        loop = asyncio.get_running_loop()
        conn: UpstreamConnection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.tls is None:
                    _, conn = await loop.create_connection(
                        lambda: UpstreamConnection(self), self.host, self.port
                    )
                else:
                    conn = await self._connect_tls(loop, self.tls)
        except BaseException:
            if conn is not None:
                conn.close(abort=True)
            self._unreserve()
            raise
        self.breaker.pending -= 1
        if conn.closed:  # lost between connection_made and here
            self._uncount()
            raise ConnectionResetError("upstream connection closed while connecting")
        conn.counted = True
        self.opened += 1
        if self.max_connection_duration is not None:
            loop.call_later(self.max_connection_duration, conn.expire)
        if self._waiters:
            self._schedule_waiters()
        return conn

    async def _connect_tls(
        self, loop: asyncio.AbstractEventLoop, tls: UpstreamTls
    ) -> UpstreamConnection:
        """A connection whose handshake succeeded and whose certificate names are accepted."""
        try:
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self),
                self.host,
                self.port,
                ssl=tls.context,
                # No SNI without a name (an IP is never sent as SNI); "" tells asyncio so.
                server_hostname=self.sni or "",
            )
        except OSError as exc:
            reason = tls.failure_reason(exc)
            if reason is None:
                raise
            raise UpstreamTlsError(reason) from exc
        transport = conn.transport
        problem = tls.check(transport) if transport is not None else None
        if problem is not None:
            conn.close(abort=True)
            raise UpstreamTlsError(problem)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose exchange ended cleanly."""
        if self._closed or (len(self._idle) >= self.max_idle and not self._waiters):
            conn.close()
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._waiters:
            self._schedule_waiters()
        if self._timer is None and self.idle_timeout:
            self._timer = loop.call_at(conn.idle_since + self.idle_timeout, self._expire)

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a connection that closed (called by the connection itself, once)."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self._uncount()

    async def close(self) -> None:
        """Close idle connections; in-flight ones finish and are closed on release."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._idle:
            self._idle.pop().close()
        for pool in list(self._named.values()):
            await pool.close()

    def _uncount(self) -> None:
        self.connections -= 1
        b = self.breaker
        b.connections -= 1
        if b._waiting:
            b._room()

    def _schedule_waiters(self) -> None:
        # Never hand a connection over inside its own parser callback (release runs there):
        # the next request would write on a connection whose parser is still on the stack.
        if not self._waiters_scheduled:
            self._waiters_scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._serve_waiters)

    def _serve_waiters(self) -> None:
        self._waiters_scheduled = False
        waiters = self._waiters
        b = self.breaker
        while waiters:
            conn = self.take()
            if conn is None and not self.can_open():
                break
            waiter = waiters.popleft()
            b.pending -= 1
            waiter.pool_ready(conn)  # None: the waiter opens one (counted at once, see open)
        if not waiters:
            b._waiting.discard(self)

    def _expire(self) -> None:
        self._timer = None
        assert self._loop is not None
        deadline = self._loop.time() - self.idle_timeout
        idle = self._idle
        expired = 0
        while expired < len(idle) and idle[expired].idle_since <= deadline:
            expired += 1
        old = idle[:expired]
        del idle[:expired]  # one move of the rest, however many expired
        for conn in old:
            conn.close()
        if idle:
            self._timer = self._loop.call_at(idle[0].idle_since + self.idle_timeout, self._expire)
