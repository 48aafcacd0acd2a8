"""The request path's pieces for sessions that survive change, apart from the common path.

``proxy.dispatch`` sends a request whose route has a persistent session (``proxy.sessions``), a
cluster with bounded load (``proxy.bounded``) or a sticky weighted split down a second path,
chosen when the route is prepared, so the common request pays nothing for any of them. This
module holds what that path uses and the common one does not:

* ``in_flight``: an endpoint's requests in flight, its busy upstream connections (HTTP/1.1 has
  one request per connection): Envoy's ``rq_active``, which bounded load reads;
* ``SessionRetry``: where a request goes after a connect failure when the endpoint was chosen
  by a persistent session or by bounded load: a draining endpoint's window ends at once
  (``Cluster.end_drain``), the balancer picks again (the key's own endpoint first, then further
  round the ring), and the response names the new endpoint (the Set-Cookie or header of the
  ``Forward`` is rewritten: it is this request's own object);
* ``with_removed``: a route's response header edit that also drops one header (the session
  header a pod might send, which Envoy replaces when it names a new pod).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING

from proxy.exchange import HeaderEdit

if TYPE_CHECKING:
    from proxy.affinity import Affinity
    from proxy.cluster import Balancer, Cluster
    from proxy.exchange import Exchange, Forward
    from proxy.metrics import ClusterStats
    from proxy.pool import UpstreamPool
    from proxy.sessions import PersistentSession

_MASK64 = (1 << 64) - 1


def in_flight(pool: UpstreamPool) -> int:
    """Requests on ``pool``'s endpoint now: its connections open or opening, less the idle."""
    return pool.connections - pool.idle_count


def cluster_in_flight(
    pools: Mapping[str, UpstreamPool],
    targets: Mapping[str, UpstreamPool],
    draining: Mapping[str, float],
) -> int:
    """The cluster's requests in flight (Envoy's ``upstream_rq_active``), draining included."""
    total = 0
    for pool in pools.values():
        total += pool.connections - pool.idle_count
    for key in draining:
        pool = targets[key]
        total += pool.connections - pool.idle_count
    return total


def nth_other(balancer: Balancer, hash: int, avoid: str, attempt: int) -> str | None:
    """The ``attempt``-th distinct endpoint other than ``avoid``, in the key's ring order
    (its own endpoint first); None when there is none."""
    seen = {avoid}
    found: str | None = None
    k = 0
    limit = 4 * len(balancer.hosts) + 64
    for _ in range(attempt):
        found = None
        while k <= limit:
            candidate = balancer.pick(hash & _MASK64, k)
            k += 1
            if candidate not in seen:
                seen.add(candidate)
                found = candidate
                break
        if found is None:
            return None
    return found


def with_removed(edit: HeaderEdit | None, name: bytes) -> HeaderEdit:
    """``edit`` that also removes the header ``name`` from the response."""
    if edit is None:
        return HeaderEdit(remove=frozenset({name}))
    return HeaderEdit(set=edit.set, add=edit.add, remove=edit.remove | {name})


class SessionRetry:
    """``Forward.next_pool`` for an endpoint a persistent session or bounded load chose."""

    __slots__ = (
        "affinity",
        "base_cookie",
        "cluster",
        "drop_edit",
        "exchange",
        "first",
        "forward",
        "hash",
        "keyed",
        "now",
        "persistent",
        "stats",
    )

    def __init__(
        self,
        cluster: Cluster[UpstreamPool],
        hash_: int | None,
        first: str,
        stats: ClusterStats | None,
        keyed: bool,
        persistent: PersistentSession | None,
        base_cookie: bytes | None,
        drop_edit: HeaderEdit | None,
        now: float,
    ) -> None:
        self.cluster = cluster
        self.hash = hash_
        self.first = first
        self.stats = stats
        self.keyed = keyed  # a session or a session key chose ``first``, not chance
        self.persistent = persistent
        self.base_cookie = base_cookie  # a generated hash-policy cookie, kept on a re-pick
        self.drop_edit = drop_edit
        self.now = now
        self.forward: Forward | None = None  # set right after the Forward is built
        # With no hash yet (a session went to its pod): the route's affinity and the exchange
        # to compute it from, once a connect failure needs it.
        self.affinity: Affinity | None = None
        self.exchange: Exchange | None = None

    def __call__(self, attempt: int) -> UpstreamPool | None:
        cluster = self.cluster
        if attempt == 1:
            cluster.end_drain(self.first)  # nothing answers there: its sessions move now
            stats = self.stats
            if stats is not None and self.keyed:
                stats.rehomed.inc()
        snap = cluster.snapshot
        balancer = snap.balancer
        if balancer is None:
            return None
        hash_ = self.hash
        if hash_ is None:
            hash_ = self.hash = self._hash()
        key = nth_other(balancer, hash_, self.first, attempt)
        if key is None:
            return None
        persistent = self.persistent
        forward = self.forward
        if persistent is not None and forward is not None:
            line = persistent.line(key, self.now)
            base = self.base_cookie
            forward.set_cookie = line if base is None else base + line
            if self.drop_edit is not None:
                forward.response_headers = self.drop_edit
        return snap.pools.get(key)

    def _hash(self) -> int:
        affinity = self.affinity
        ex = self.exchange
        found: int | None = None
        if affinity is not None and ex is not None:
            found, _ = affinity.compute(ex.headers, ex.target, ex.peer, ex.sock)
        return found if found is not None else random.getrandbits(64)
