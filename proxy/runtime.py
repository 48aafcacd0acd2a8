"""The runtime: everything the request path reads, built from one Config, behind one reference.

This module owns ``Runtime`` (the routers per listener port and per HTTPS server, the TLS
certificates of each HTTPS port (``proxy.tls.TlsListener``) and a ``ClusterRuntime`` per
cluster: its spec, its ``Cluster`` of connection pools, circuit breaker, health and stats),
``build_runtime``, which makes one from a ``Config`` and keeps the clusters of the previous one
whose spec did not change, and ``RuntimeRef``, the single slot the control plane
(``proxy.server``) swaps on reload and the request path (``proxy.dispatch``) reads once per
request. It sits below both of them, so neither imports the other (uvicorn's ``ServerState``
pattern). Compiled with mypyc (setup.py): the request path reads these objects' attributes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from proxy.cluster import Cluster
from proxy.config import DEFAULT_LB, ClusterSpec, Config, StaticEndpoints
from proxy.health import ClusterHealth
from proxy.pool import CircuitBreaker, UpstreamPool
from proxy.routing import Router
from proxy.tls import TlsListener, UpstreamTls

if TYPE_CHECKING:
    from proxy.metrics import ClusterStats, Metrics


class ClusterRuntime:
    """One cluster as the request path sees it: its spec, the live snapshot holder, its stats."""

    __slots__ = ("breaker", "cluster", "health", "spec", "stats", "tasks")

    def __init__(self, spec: ClusterSpec, metrics: Metrics | None = None) -> None:
        self.spec = spec
        pool = spec.pool
        # Envoy's circuit breakers are per cluster: every pool of the cluster shares one.
        breaker = self.breaker = CircuitBreaker(
            pool.max_connections, pool.http1_max_pending_requests, pool.max_retries
        )
        tls = UpstreamTls(spec.tls) if spec.tls is not None else None  # one context per cluster
        self.cluster: Cluster[UpstreamPool] = Cluster(
            spec.name,
            spec.lb,
            lambda ep: UpstreamPool(
                ep.address,
                ep.port,
                connect_timeout=pool.connect_timeout,
                idle_timeout=pool.idle_timeout,
                max_requests_per_connection=pool.max_requests_per_connection,
                max_connection_duration=pool.max_connection_duration,
                breaker=breaker,
                tls=tls,
            ),
            panic_threshold=spec.panic_threshold,
            on_rebuild=metrics.rebuilt if metrics is not None else None,  # type: ignore[arg-type]
            drain=spec.session.drain if spec.session is not None else 0.0,
        )
        self.stats: ClusterStats | None = metrics.cluster(spec) if metrics is not None else None
        self.health = ClusterHealth(spec, self.cluster)
        self.tasks: list[asyncio.Task[None]] = []  # discovery refresh, health checks


def _no_server_routers() -> Mapping[str, Router]:
    return MappingProxyType({})


def _no_tls() -> Mapping[int, TlsListener]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything the request path reads, built from one Config and swapped as one reference."""

    config: Config
    routers: Mapping[int, Router]
    clusters: Mapping[str, ClusterRuntime]
    server_routers: Mapping[str, Router] = field(default_factory=_no_server_routers)
    tls: Mapping[int, TlsListener] = field(default_factory=_no_tls)  # HTTPS port -> certificates
    # Clusters kept from the previous runtime whose endpoint source changed: the server
    # restarts their discovery (the endpoints that left may drain, the pools that stay stay).
    rediscover: frozenset[str] = frozenset()


class RuntimeRef:
    """The one reference a reload swaps: ``current`` is read once per request.

    A request keeps the ``Runtime`` it read to its end, so it never sees half of two configs.
    """

    __slots__ = ("current",)

    def __init__(self, current: Runtime) -> None:
        self.current = current


def build_runtime(
    config: Config, metrics: Metrics | None = None, previous: Runtime | None = None
) -> Runtime:
    """A Runtime for ``config``, reusing ``previous``'s clusters whose spec is unchanged."""
    routers = {listener.port: Router(config, listener.port) for listener in config.listeners}
    server_routers: dict[str, Router] = {}
    tls: dict[int, TlsListener] = {}
    for listener in config.listeners:
        if listener.protocol == "HTTPS":
            servers = config.tls_servers(listener.port)
            for name, _ in servers:
                server_routers[name] = Router(
                    config, listener.port, https_server=name, scheme="https"
                )
            tls[listener.port] = TlsListener(listener.port, servers)
    old = previous.clusters if previous is not None else {}
    clusters: dict[str, ClusterRuntime] = {}
    rediscover: list[str] = []
    for name, spec in config.clusters.items():
        kept = old.get(name)
        if kept is not None and _identity(kept.spec) == _identity(spec):
            if kept.spec.endpoints != spec.endpoints:
                rediscover.append(name)
            kept.spec = spec
            kept.cluster.drain = spec.session.drain if spec.session is not None else 0.0
            clusters[name] = kept
        else:
            clusters[name] = ClusterRuntime(spec, metrics)
    return Runtime(
        config,
        MappingProxyType(routers),
        MappingProxyType(clusters),
        MappingProxyType(server_routers),
        MappingProxyType(tls),
        frozenset(rediscover),
    )


def _identity(spec: ClusterSpec) -> tuple[object, ...]:
    """What a cluster's pools, ring and health machinery depend on: a reload that changes
    nothing else keeps the running cluster with its warm connections. Not in it: the hash policy
    (read from the route on every request), the file it came from, the persistent session (read
    from the route; its drain time is updated in place) and the endpoint source (the server
    re-runs discovery on the kept cluster, so endpoints that stay keep their connections and
    those that leave can drain)."""
    lb = spec.lb
    ch = lb.consistent_hash
    ring: tuple[object, ...] = ()
    if ch is not None:
        ring = (ch.algorithm, ch.minimum_ring_size, ch.maximum_ring_size, ch.table_size)
        ring += (ch.hash_balance_factor,)
    bare = replace(spec, lb=DEFAULT_LB, source="", session=None, endpoints=StaticEndpoints(()))
    return (bare, lb.simple, ring)
