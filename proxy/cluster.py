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
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar

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
    _pools: dict[str, PoolT] = field(default_factory=dict)
    _unhealthy: frozenset[str] = frozenset()
    _in_balancer: tuple[str, ...] | None = None

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> list[PoolT]:
        """New endpoint set; returns the pools of endpoints that left (the caller closes them)."""
        ordered = tuple(sorted({ep.key: ep for ep in endpoints}.values(), key=lambda e: e.key))
        keys = {ep.key for ep in ordered}
        removed = [self._pools.pop(k) for k in list(self._pools) if k not in keys]
        for ep in ordered:
            if ep.key not in self._pools:
                self._pools[ep.key] = self.pool_factory(ep)
        self._rebuild(ordered, self._unhealthy & keys)
        return removed

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
        else:
            balancer = build_balancer(self.lb, chosen, self.active) if chosen else None
            self._in_balancer = keys
        self.snapshot = ClusterSnapshot(
            endpoints=endpoints,
            healthy=healthy,
            balancer=balancer,
            pools=MappingProxyType(dict(self._pools)),
            panic=panic,
            version=old.version + 1,
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
        return list(self._pools.values())


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
