"""A cluster: endpoints x health -> an immutable balancer snapshot, swapped as one reference.

The control plane (discovery, health checks, outlier detection, reload) calls ``set_endpoints`` and
``set_unhealthy``; each builds a new ``ClusterSnapshot`` off the request path and replaces
``Cluster.snapshot`` in one assignment. A request reads ``cluster.snapshot`` once and uses that
object to the end, so a rebuild never changes the decision of a request already in flight.

Only healthy endpoints enter the ring or table. When fewer than ``panic_threshold`` percent of the
endpoints are healthy, all of them do (Envoy's panic mode; Istio's ``minHealthPercent``). The
balancer is rebuilt only when the (sorted) set of endpoints that enter it changes.

Connection pools live in the cluster, keyed by endpoint, across snapshots: a rebuild keeps every
warm keep-alive connection of the endpoints that stay.

Draining (``drain`` > 0, the ``sticky-proxy/session-drain`` of a service with persistent
sessions): an endpoint that leaves the endpoint set (discovery or reload dropped it: a pod
scaled down or replaced, which usually still runs for its termination grace period) stays in
``snapshot.targets`` for ``drain`` seconds with its pool, so the persistent sessions that name it
keep going to it; it is in no balancer, so no new session starts there. ``end_drain`` (a connect
failure) ends its window at once; ``expire_draining`` (a timer the server sets at
``next_drain_deadline``) drops the endpoints whose window is over and hands back their pools.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar

from proxy.bounded import BoundedLoad
from proxy.config import Endpoint, LoadBalancerSettings
from proxy.hashing import Maglev, RingHash

log = logging.getLogger("proxy.cluster")

_MASK64 = (1 << 64) - 1


class Balancer(Protocol):
    """What the request path needs from a load balancer: an endpoint key for a hash."""

    @property
    def hosts(self) -> tuple[str, ...]: ...

    def pick(self, hash: int, attempt: int = 0) -> str: ...

    def share(self, key: str) -> float: ...


class RoundRobin:
    """Envoy's ROUND_ROBIN (weights expanded into a cycle); the hash is ignored."""

    def __init__(self, weights: Mapping[str, int]) -> None:
        self.hosts = tuple(weights)
        self._total = sum(weights.values())
        self._weights = dict(weights)
        self._cycle = itertools.cycle([k for k, w in weights.items() for _ in range(w)])

    def pick(self, hash: int, attempt: int = 0) -> str:
        return next(self._cycle)

    def share(self, key: str) -> float:
        return self._weights.get(key, 0) / self._total


class RandomPick:
    """Envoy's RANDOM, weighted; the hash is ignored."""

    def __init__(self, weights: Mapping[str, int]) -> None:
        self.hosts = tuple(weights)
        self._weights = list(weights.values())
        self._total = sum(self._weights)
        self._by_key = dict(weights)

    def pick(self, hash: int, attempt: int = 0) -> str:
        return random.choices(self.hosts, self._weights)[0]

    def share(self, key: str) -> float:
        return self._by_key.get(key, 0) / self._total


class LeastRequest:
    """Envoy's LEAST_REQUEST: power of two random choices on active requests (Istio's default)."""

    def __init__(self, weights: Mapping[str, int], active: Mapping[str, int]) -> None:
        self.hosts = tuple(weights)
        self._active = active
        self._total = sum(weights.values())
        self._by_key = dict(weights)

    def pick(self, hash: int, attempt: int = 0) -> str:
        hosts = self.hosts
        if len(hosts) == 1:
            return hosts[0]
        a, b = random.sample(hosts, 2)
        return a if self._active.get(a, 0) <= self._active.get(b, 0) else b

    def share(self, key: str) -> float:
        return self._by_key.get(key, 0) / self._total


def build_balancer(
    lb: LoadBalancerSettings,
    endpoints: Sequence[Endpoint],
    active: Mapping[str, int] | None = None,
) -> Balancer:
    """The balancer the DestinationRule asks for, over ``endpoints`` in canonical (sorted) order.

    Raises ValueError on an empty endpoint list: callers answer 503 before asking.
    """
    if not endpoints:
        raise ValueError("no endpoints to balance over")
    weights = {ep.key: ep.weight for ep in sorted(endpoints, key=lambda ep: ep.key)}
    ch = lb.consistent_hash
    if ch is not None:
        if ch.algorithm == "maglev":
            return Maglev(weights, table_size=ch.table_size)
        return RingHash(
            weights,
            minimum_ring_size=ch.minimum_ring_size,
            maximum_ring_size=ch.maximum_ring_size,
        )
    if lb.simple == "ROUND_ROBIN":
        return RoundRobin(weights)
    if lb.simple == "RANDOM":
        return RandomPick(weights)
    return LeastRequest(weights, active if active is not None else {})


def build_bounded(
    lb: LoadBalancerSettings, endpoints: Sequence[Endpoint], balancer: Balancer | None
) -> BoundedLoad | None:
    """Envoy's bounded load over ``balancer`` when the DestinationRule asks for it."""
    ch = lb.consistent_hash
    if ch is None or not ch.hash_balance_factor or balancer is None or not endpoints:
        return None
    if not isinstance(balancer, (RingHash, Maglev)):
        return None
    weights = {ep.key: ep.weight for ep in sorted(endpoints, key=lambda ep: ep.key)}
    return BoundedLoad(balancer, weights, ch.hash_balance_factor)


def random_hash() -> int:
    """Envoy picks with a random hash when a consistent-hash policy yields no key."""
    return random.getrandbits(64)


PoolT = TypeVar("PoolT")


@dataclass(frozen=True, slots=True)
class ClusterSnapshot(Generic[PoolT]):
    """Everything one request needs about a cluster, never mutated after it is built."""

    endpoints: tuple[Endpoint, ...]
    healthy: tuple[Endpoint, ...]
    balancer: Balancer | None
    pools: Mapping[str, PoolT]
    panic: bool = False
    version: int = 0
    # What a persistent session may name: the healthy endpoints and the draining ones.
    targets: Mapping[str, PoolT] = field(default_factory=lambda: MappingProxyType({}))
    draining: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # deadline
    bounded: BoundedLoad | None = None  # the balancer with its hash-balance-factor

    @property
    def healthy_count(self) -> int:
        return len(self.healthy)


@dataclass(slots=True)
class Cluster(Generic[PoolT]):
    """Mutable owner of one cluster's state; the request path only reads ``snapshot``."""

    name: str
    lb: LoadBalancerSettings
    pool_factory: Callable[[Endpoint], PoolT]
    panic_threshold: float = 0.0  # percent; 0 disables panic mode
    on_rebuild: Callable[[Cluster[PoolT]], None] | None = None
    active: dict[str, int] = field(default_factory=dict)
    snapshot: ClusterSnapshot[PoolT] = field(
        default_factory=lambda: ClusterSnapshot((), (), None, MappingProxyType({}))
    )
    drain: float = 0.0  # seconds a removed endpoint keeps its persistent sessions
    _pools: dict[str, PoolT] = field(default_factory=dict)
    _unhealthy: frozenset[str] = frozenset()
    _in_balancer: tuple[str, ...] | None = None
    # key -> (pool, deadline on time.monotonic(), window ended early)
    _draining: dict[str, tuple[PoolT, float, bool]] = field(default_factory=dict)

    def set_endpoints(self, endpoints: Iterable[Endpoint], now: float | None = None) -> list[PoolT]:
        """New endpoint set; returns the pools of endpoints that left (the caller closes them).

        With ``drain`` set, an endpoint that leaves starts draining instead (module docstring);
        one that comes back ends its drain and keeps its pool.
        """
        ordered = tuple(sorted({ep.key: ep for ep in endpoints}.values(), key=lambda e: e.key))
        keys = {ep.key for ep in ordered}
        removed: list[PoolT] = []
        deadline = (time.monotonic() if now is None else now) + self.drain
        for key in list(self._pools):
            if key in keys:
                continue
            pool = self._pools.pop(key)
            if self.drain > 0:
                self._draining[key] = (pool, deadline, False)
                log.info("cluster %s: %s draining for %gs", self.name, key, self.drain)
            else:
                removed.append(pool)
        for ep in ordered:
            if ep.key in self._pools:
                continue
            back = self._draining.pop(ep.key, None)
            self._pools[ep.key] = back[0] if back is not None else self.pool_factory(ep)
        self._rebuild(ordered, self._unhealthy & keys)
        return removed

    def end_drain(self, key: str) -> bool:
        """A draining endpoint failed to connect: its window ends now (its sessions re-pick).

        The pool stays until ``expire_draining`` hands it back; True when a window ended.
        """
        found = self._draining.get(key)
        if found is None or found[2]:
            return False
        self._draining[key] = (found[0], found[1], True)
        log.info("cluster %s: %s stopped draining: connect failure", self.name, key)
        self._rebuild(self.snapshot.endpoints, self._unhealthy)
        return True

    def expire_draining(self, now: float | None = None) -> list[PoolT]:
        """Drop the endpoints whose drain window is over; returns their pools to close."""
        now = time.monotonic() if now is None else now
        done = [k for k, (_, deadline, ended) in self._draining.items() if ended or deadline <= now]
        if not done:
            return []
        pools = [self._draining.pop(k)[0] for k in done]
        self._rebuild(self.snapshot.endpoints, self._unhealthy)
        return pools

    @property
    def next_drain_deadline(self) -> float | None:
        """When the next drain window ends (time.monotonic()), None when nothing drains."""
        return min((deadline for _, deadline, _ in self._draining.values()), default=None)

    def set_unhealthy(self, keys: Iterable[str]) -> None:
        """Endpoints to keep out of the balancer (health checks, outlier ejection)."""
        unhealthy = frozenset(keys)
        if unhealthy != self._unhealthy:
            self._rebuild(self.snapshot.endpoints, unhealthy)

    def _rebuild(self, endpoints: tuple[Endpoint, ...], unhealthy: frozenset[str]) -> None:
        self._unhealthy = unhealthy
        healthy = tuple(ep for ep in endpoints if ep.key not in unhealthy)
        panic = bool(endpoints) and len(healthy) * 100 < self.panic_threshold * len(endpoints)
        chosen = endpoints if panic else healthy
        keys = tuple(ep.key for ep in chosen)
        old = self.snapshot
        if keys == self._in_balancer:
            balancer = old.balancer
            bounded = old.bounded
        else:
            balancer = build_balancer(self.lb, chosen, self.active) if chosen else None
            bounded = build_bounded(self.lb, chosen, balancer)
            self._in_balancer = keys
        pools = self._pools
        targets = {ep.key: pools[ep.key] for ep in healthy}
        draining: dict[str, float] = {}
        for key, (pool, deadline, ended) in self._draining.items():
            if not ended:
                targets[key] = pool
                draining[key] = deadline
        self.snapshot = ClusterSnapshot(
            endpoints=endpoints,
            healthy=healthy,
            balancer=balancer,
            pools=MappingProxyType(dict(pools)),
            panic=panic,
            version=old.version + 1,
            targets=MappingProxyType(targets),
            draining=MappingProxyType(draining),
            bounded=bounded,
        )
        if balancer is not old.balancer:
            log.info(
                "cluster %s: balancer over %d of %d endpoints%s",
                self.name,
                len(chosen),
                len(endpoints),
                " (panic: all endpoints used)" if panic else "",
            )
            if self.on_rebuild is not None:
                self.on_rebuild(self)

    def pools(self) -> list[PoolT]:
        """Every pool, the draining endpoints' included (to close them all)."""
        return [*self._pools.values(), *(pool for pool, _, _ in self._draining.values())]


def next_distinct(balancer: Balancer, hash: int, first: str, attempt: int) -> str:
    """The ``attempt``-th endpoint after ``first`` on the ring that differs from it.

    Used after a connect failure (nothing was sent): a ring gives each host many adjacent
    entries, so walking by one entry would often land on the same dead host again.
    """
    seen = {first}
    k = 0
    found = first
    for _ in range(attempt):
        while True:
            k += 1
            candidate = balancer.pick(hash & _MASK64, k)
            if candidate not in seen or k > 4 * len(balancer.hosts) + 64:
                break
        seen.add(candidate)
        found = candidate
    return found
