"""The request path's decision: route, hash, pick an endpoint; count and log the exchange.

``proxy.http1`` calls ``Dispatcher.dispatch`` once per request head and ``finished`` once per
exchange. ``dispatch`` reads ``RuntimeRef.current`` once (a reload swaps that one reference, so a
request never sees half of two configs), routes on Host, method and target, computes the
session hash from the route's affinity (cookie, header, query or source IP; a missing cookie is
invented and returned as a Set-Cookie line), picks the endpoint on the cluster's current ring or
Maglev table and returns a ``Forward`` carrying everything the connection needs, retries and
timeouts included. Everything that does not depend on the request (header edits, retry plans,
the route itself for requests whose route depends only on Host, method and target) is computed
once and remembered, so the common request costs a few dict lookups and one hash.

A route with a persistent session, a cluster with bounded load or a sticky weighted split
(sessions that survive change) goes down a second path, ``Dispatcher._extended``: its
``Prepared`` keeps its cluster in ``ext`` and none in ``crt``, so the common path pays nothing
for those features (the test it already makes for a missing cluster sends them there). The
second path reads the session's value and goes to the pod it names while that pod is a target
(healthy, or draining), else picks as usual (bounded by the load when configured) and names the
new pod in the response; ``proxy.steering`` holds its helpers.

This module is compiled with mypyc (setup.py), like the rest of the request path; the control
plane that builds what it reads (``proxy.server``) stays interpreted; what it reads is defined
in ``proxy.runtime`` (compiled too), below both.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, cast

from proxy import exchange
from proxy.affinity import Affinity, cookie_line
from proxy.cluster import Balancer, next_distinct
from proxy.exchange import Exchange, Forward, LocalReply
from proxy.hashing import Maglev, RingHash
from proxy.pool import UpstreamPool
from proxy.prepared import Extended, Prepared, connect_retries
from proxy.sessions import ABSENT, BAD_SIGNATURE, EXPIRED, NAMED
from proxy.steering import SessionRetry, cluster_in_flight, in_flight

if TYPE_CHECKING:
    from proxy.accesslog import AccessLog
    from proxy.metrics import ClusterStats, Metrics
    from proxy.routing import Router
    from proxy.runtime import Runtime, RuntimeRef

# Envoy's local replies (DESIGN §7); bodies are Envoy's text so Istio users recognise them.
NO_ROUTE: Final = LocalReply(404)
NO_HEALTHY_UPSTREAM: Final = LocalReply(503, b"no healthy upstream")
NO_CLUSTER: Final = LocalReply(503, b"no healthy upstream")
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


def query_params(target: str) -> dict[str, str]:
    """First occurrence of each query parameter, raw: ``Router.match``'s ``query`` argument
    (Istio's queryParams match). ``proxy.explain`` folds its probes with this one too."""
    found: dict[str, str] = {}
    start = target.find("?")
    if start >= 0:
        for pair in target[start + 1 :].split("&"):
            name, _, value = pair.partition("=")
            found.setdefault(name, value)
    return found


def fold_headers(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Parsed (lower-case name, value) pairs as ``Router.match`` reads them: a repeated header's
    values joined with ``,``, as Envoy does. ``proxy.explain`` folds its probes with this too."""
    result: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        result[key] = f"{result[key]},{text}" if key in result else text
    return result


class _NextPool:
    """After a connect failure (nothing was sent): the next distinct endpoint on the ring."""

    __slots__ = ("balancer", "first", "hash", "keyed", "pools", "stats")

    def __init__(
        self,
        pools: Mapping[str, UpstreamPool],
        balancer: Balancer,
        hash_: int,
        first: str,
        stats: ClusterStats | None,
        keyed: bool,
    ) -> None:
        self.pools = pools
        self.balancer = balancer
        self.hash = hash_
        self.first = first
        self.stats = stats
        self.keyed = keyed  # the hash came from a session key (not a random pick)

    def __call__(self, attempt: int) -> UpstreamPool | None:
        stats = self.stats
        if stats is not None and attempt == 1 and self.keyed:
            stats.rehomed.inc()
        return self.pools.get(next_distinct(self.balancer, self.hash, self.first, attempt))


class _Memo:
    """One connection's last route, session hash and Forward (``Exchange.memo``).

    A client on a keep-alive connection mostly repeats its Host, target and Cookie line, so
    the next request of the connection is checked against the last one with a few byte
    compares before anything is hashed, looked up or parsed. Only what is a function of those
    inputs is kept: a route only when the route cache could hold it, a hash only for a
    cookie-only policy (a generated cookie depends on the connection, the same for every
    request on it), and the Forward built from them only while the cluster's snapshot is the
    same object (any change of endpoints or health makes a new one) and its balancer is a
    ring or Maglev table, whose pick is a function of the hash.
    """

    __slots__ = (
        "affinity",
        "authority",
        "cookie",
        "forward",
        "forward_hash",
        "forward_route",
        "hash",
        "method",
        "route",
        "runtime",
        "set_cookie",
        "snapshot",
        "target",
    )

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.authority: bytes | None = None
        self.method = b""
        self.target = b""
        self.route: Prepared | None = None
        self.affinity: Affinity | None = None
        self.cookie = b""
        self.hash: int | None = None
        self.set_cookie: bytes | None = None
        self.snapshot: object = None
        self.forward_route: Prepared | None = None
        self.forward_hash = 0
        self.forward: Forward | None = None


# Distinct (Host, method, target) triples remembered per listener before the cache starts over.
ROUTE_CACHE_SIZE: Final = 4096


class Dispatcher(exchange.Dispatcher):
    """``proxy.exchange.Dispatcher`` for one listener port: route, hash, pick; count and log.

    Routing a request whose route depends only on Host, method and target (no header or query
    conditions, no weighted split) gives the same answer every time for the same runtime, so
    those answers are remembered: the common request pays one dict lookup instead of decoding
    the head and walking the route table.
    """

    __slots__ = (
        "_access_log",
        "_cache",
        "_cacheable",
        "_cached_for",
        "_metrics",
        "_router",
        "port",
        "ref",
        "server",
    )

    def __init__(
        self,
        ref: RuntimeRef,
        port: int,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
        server: str | None = None,
    ) -> None:
        self.ref = ref
        self.port = port
        # An HTTPS server's route table (its RDS name): the connections whose SNI chose it
        # reach its hosts only (Runtime.server_routers); None: the port's table.
        self.server = server
        # Both live as long as the proxy: a reload swaps only ``ref.current``.
        self._metrics = metrics
        self._access_log = access_log
        self._cache: dict[tuple[bytes | None, bytes, bytes], Prepared] = {}
        # What the cache was filled from, and that runtime's router for this port.
        self._cached_for: Runtime | None = None
        self._router: Router | None = None
        self._cacheable = False

    def _route(self, runtime: Runtime, ex: Exchange, memo: _Memo) -> Prepared | None:
        if (
            memo.runtime is runtime
            and memo.target == ex.target
            and memo.authority == ex.authority
            and memo.method == ex.method
        ):
            return memo.route
        if runtime is not self._cached_for:
            self._cache.clear()
            self._cached_for = runtime
            self._router = (
                runtime.routers.get(self.port)
                if self.server is None
                else runtime.server_routers.get(self.server)
            )
            self._cacheable = self._router is not None and not (
                self._router.needs_headers or self._router.needs_query
            )
        router = self._router
        if router is None:
            return None
        key = (ex.authority, ex.method, ex.target)
        cacheable = self._cacheable
        if cacheable:
            found = self._cache.get(key)
            if found is not None:
                self._remember(memo, runtime, ex, found)
                return found
        target = ex.target.decode("latin-1")
        headers = fold_headers(ex.headers) if router.needs_headers else _EMPTY
        params = query_params(target) if router.needs_query else _EMPTY
        authority = ex.authority.decode("latin-1") if ex.authority else ""
        decision = router.match(authority, target, ex.method.decode("latin-1"), headers, params)
        if decision is None:
            return None
        prepared = Prepared(decision, runtime)
        if cacheable and decision.deterministic:
            if len(self._cache) >= ROUTE_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = prepared
            self._remember(memo, runtime, ex, prepared)
        return prepared

    @staticmethod
    def _remember(memo: _Memo, runtime: Runtime, ex: Exchange, route: Prepared) -> None:
        memo.runtime = runtime
        memo.authority = ex.authority
        memo.method = ex.method
        memo.target = ex.target
        memo.route = route

    @staticmethod
    def _session(memo: _Memo, affinity: Affinity, ex: Exchange) -> tuple[int | None, bytes | None]:
        """The request's hash and the Set-Cookie line to answer with (None: no new cookie)."""
        line = cookie_line(ex.headers) if affinity.cookie_only else None
        if line is not None and memo.affinity is affinity and memo.cookie == line:
            return memo.hash, memo.set_cookie
        hash_, generated = affinity.compute(ex.headers, ex.target, ex.peer, ex.sock)
        set_cookie = None if generated is None else affinity.set_cookie_header(generated)
        if line is not None:
            memo.affinity = affinity
            memo.cookie = line
            memo.hash = hash_
            memo.set_cookie = set_cookie
        return hash_, set_cookie

    def dispatch(self, ex: Exchange) -> Forward | LocalReply:
        runtime = self.ref.current
        memo = ex.memo
        if not isinstance(memo, _Memo):
            memo = _Memo()
            ex.memo = memo
        route = self._route(runtime, ex, memo)
        if route is None:
            ex.flags = "NR"
            return NO_ROUTE
        if route.reply is not None:
            return route.reply
        crt = route.crt
        if crt is None:
            ext = route.ext
            if ext is not None:
                return self._extended(route, ext, ex, memo)
            ex.flags = "NC"
            return NO_CLUSTER
        stats = crt.stats
        if stats is not None:
            stats.active += 1
            ex.tag = stats
        snap = crt.cluster.snapshot
        balancer = snap.balancer
        if balancer is None:
            ex.flags = "UH"
            return NO_HEALTHY_UPSTREAM
        set_cookie = None
        hash_: int | None = None
        affinity = route.affinity
        if affinity is not None:
            hash_, set_cookie = self._session(memo, affinity, ex)
            if set_cookie is not None and stats is not None:
                stats.cookies += 1
        keyed = hash_ is not None
        if hash_ is None:
            hash_ = random.getrandbits(64)
        elif (
            memo.forward is not None
            and memo.snapshot is snap
            and memo.forward_route is route
            and memo.forward_hash == hash_
            and memo.forward.set_cookie is set_cookie
        ):
            return memo.forward  # the same table, route and key: the same endpoint and Forward
        key = balancer.pick(hash_)
        plan = route.plan
        forward = Forward(
            snap.pools[key],
            target=route.target,
            authority=route.authority,
            request_headers=route.request_headers,
            response_headers=route.response_headers,
            set_cookie=set_cookie,
            timeout=route.timeout,
            next_pool=_NextPool(snap.pools, balancer, hash_, key, stats, keyed),
            connect_retries=connect_retries(plan, balancer),
            retry=plan,
        )
        if keyed and isinstance(balancer, (RingHash, Maglev)):  # a pick is a function of the hash
            memo.snapshot = snap
            memo.forward_route = route
            memo.forward_hash = hash_
            memo.forward = forward
        return forward

    def _extended(
        self, route: Prepared, ext: Extended, ex: Exchange, memo: _Memo
    ) -> Forward | LocalReply:
        """The second path: persistent session, draining endpoints, bounded load, sticky split."""
        persistent = ext.persistent
        address = ""
        status = ABSENT
        now = 0.0
        if persistent is not None:
            if persistent.applies(ex.target):
                now = time.time()  # wall clock: every replica reads an expiry alike
                address, _, status = persistent.read(ex.headers, now)
            else:
                persistent = None  # Envoy: no session state outside the cookie's path
        hash_: int | None = None
        set_cookie: bytes | None = None
        hashed = False
        if ext.split is not None:
            part = ext.part_holding(address) if status == NAMED else None
            if part is None:
                affinity = route.affinity
                if affinity is not None:
                    hash_, set_cookie = self._session(memo, affinity, ex)
                hashed = True
                part = ext.part_for(hash_ if hash_ is not None else random.getrandbits(64))
            route = part
            part_ext = part.ext
            assert part_ext is not None
            ext = part_ext
        crt = ext.crt
        if crt is None:
            ex.flags = "NC"
            return NO_CLUSTER
        stats = crt.stats
        if stats is not None:
            stats.active += 1
            ex.tag = stats
        cluster = crt.cluster
        snap = cluster.snapshot
        if status == NAMED:
            assert persistent is not None
            pool = snap.targets.get(address)
            if pool is not None:  # the session's pod: no hash, no new cookie (Envoy's override)
                if stats is not None:
                    stats.session_routed += 1
                    if address in snap.draining:
                        stats.session_draining += 1
                return self._to_session_pod(route, ext, ex, pool, address, stats, now)
            if stats is not None:
                if address in snap.pools:
                    stats.session_unhealthy += 1
                else:
                    stats.session_gone += 1
            if persistent.strict:
                ex.flags = "UH"  # Envoy: the strict destination is not available
                return NO_HEALTHY_UPSTREAM
        elif status != ABSENT and stats is not None:
            if status == EXPIRED:
                stats.session_expired += 1
            elif status == BAD_SIGNATURE:
                stats.session_bad_signature += 1
        balancer = snap.balancer
        if balancer is None:
            ex.flags = "UH"
            return NO_HEALTHY_UPSTREAM
        if not hashed:
            affinity = route.affinity
            if affinity is not None:
                hash_, set_cookie = self._session(memo, affinity, ex)
        if set_cookie is not None and stats is not None:
            stats.cookies += 1
        keyed = hash_ is not None
        if hash_ is None:
            hash_ = random.getrandbits(64)
        bounded = snap.bounded
        if bounded is not None:
            pools = snap.pools
            total = cluster_in_flight(pools, snap.targets, snap.draining)
            key, spilled = bounded.choose(hash_, lambda k: in_flight(pools[k]), total)
            if spilled and stats is not None:
                stats.spilled += 1
        else:
            key = balancer.pick(hash_)
        hash_cookie = set_cookie  # a cookie the hash policy generated: kept on a re-pick
        response_headers = route.response_headers
        if persistent is not None and (status != NAMED or key != address):
            line = persistent.line(key, now)
            set_cookie = line if set_cookie is None else set_cookie + line
            if ext.drop_edit is not None:
                response_headers = ext.drop_edit
        retry = SessionRetry(
            cluster, hash_, key, stats, keyed, persistent, hash_cookie, ext.drop_edit, now
        )
        plan = route.plan
        forward = Forward(
            snap.pools[key],
            target=route.target,
            authority=route.authority,
            request_headers=route.request_headers,
            response_headers=response_headers,
            set_cookie=set_cookie,
            timeout=route.timeout,
            next_pool=retry,
            connect_retries=connect_retries(plan, balancer),
            retry=plan,
        )
        retry.forward = forward
        return forward

    @staticmethod
    def _to_session_pod(
        route: Prepared,
        ext: Extended,
        ex: Exchange,
        pool: UpstreamPool,
        address: str,
        stats: ClusterStats | None,
        now: float,
    ) -> Forward:
        """Forward to the pod the session names; a connect failure re-picks by the route's hash
        (computed then, from the exchange: a request that reaches its pod never needs it) and
        names the new pod."""
        crt = ext.crt
        assert crt is not None
        cluster = crt.cluster
        retry = SessionRetry(
            cluster, None, address, stats, True, ext.persistent, None, ext.drop_edit, now
        )
        retry.affinity = route.affinity
        retry.exchange = ex
        plan = route.plan
        forward = Forward(
            pool,
            target=route.target,
            authority=route.authority,
            request_headers=route.request_headers,
            response_headers=route.response_headers,
            timeout=route.timeout,
            next_pool=retry,
            connect_retries=connect_retries(plan, cluster.snapshot.balancer),
            retry=plan,
        )
        retry.forward = forward
        return forward

    def finished(self, ex: Exchange) -> None:
        metrics = self._metrics
        if metrics is not None:
            stats = cast("ClusterStats | None", ex.tag)
            if stats is None:
                stats = metrics.unknown  # rejected by http1, no route, local reply
            else:
                stats.active -= 1
            stats.record(ex)
        access_log = self._access_log
        if access_log is not None:
            access_log.log(ex)
