"""Endpoint discovery: static lists and DNS, refreshed off the request path.

A cluster's endpoints come from one source. Static sources (ServiceEntry ``resolution: STATIC``,
``--upstream``) never change. DNS sources resolve every target name to *all* its A and AAAA records
(a Kubernetes headless Service or a compose service name yields one record per pod) and refresh on
an interval. A failed lookup never empties a cluster: the last good set stays and the failure is
logged, as Envoy does for STRICT_DNS clusters.

The result is always sorted by endpoint key so that every proxy replica with the same DNS answers
builds the same ring, whatever order the resolver returned the records in.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver

from proxy.config import DnsEndpoints, Endpoint, StaticEndpoints, is_ip

log = logging.getLogger("proxy.discovery")

DEFAULT_DNS_REFRESH = 5.0  # seconds; Envoy's default dns_refresh_rate


class DiscoveryError(Exception):
    """A DNS lookup failed; the caller keeps the endpoints it had."""


def sort_endpoints(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """Canonical order (by key, duplicates dropped) so replicas build identical balancers."""
    unique = {ep.key: ep for ep in endpoints}
    return tuple(unique[key] for key in sorted(unique))


async def resolve_targets(
    targets: Sequence[Endpoint], resolver: AbstractResolver
) -> tuple[Endpoint, ...]:
    """Every A/AAAA record of every target becomes an endpoint with the target's port and weight."""
    resolved: list[Endpoint] = []
    for target in targets:
        if is_ip(target.address):
            resolved.append(target)
            continue
        try:
            records = await resolver.resolve(target.address, target.port, socket.AF_UNSPEC)
        except OSError as exc:
            raise DiscoveryError(f"DNS lookup of {target.address} failed: {exc}") from exc
        for record in records:
            resolved.append(replace(target, address=record["host"]))
    return sort_endpoints(resolved)


class EndpointWatcher:
    """Resolves one cluster's endpoint source and reports each change of the sorted set."""

    def __init__(
        self,
        name: str,
        source: StaticEndpoints | DnsEndpoints,
        on_change: Callable[[tuple[Endpoint, ...]], Awaitable[None] | None],
        *,
        resolver: AbstractResolver | None = None,
        refresh: float = DEFAULT_DNS_REFRESH,
    ) -> None:
        self.name = name
        self.source = source
        self._on_change = on_change
        self._resolver = resolver
        self._refresh = refresh
        self._current: tuple[Endpoint, ...] | None = None

    @property
    def is_dynamic(self) -> bool:
        return isinstance(self.source, DnsEndpoints)

    async def refresh_once(self) -> bool:
        """Resolve now; returns True when the endpoint set changed. Raises DiscoveryError."""
        if isinstance(self.source, StaticEndpoints):
            endpoints = sort_endpoints(self.source.endpoints)
        else:
            if self._resolver is None:
                self._resolver = ThreadedResolver()
            endpoints = await resolve_targets(self.source.targets, self._resolver)
        if endpoints == self._current:
            return False
        self._current = endpoints
        result = self._on_change(endpoints)
        if result is not None:
            await result
        return True

    async def run(self) -> None:
        """Refresh forever (cancel to stop); lookups that fail keep the last good set."""
        while True:
            try:
                await self.refresh_once()
            except DiscoveryError as exc:
                log.warning(
                    "cluster %s: %s; keeping %d known endpoints",
                    self.name,
                    exc,
                    len(self._current or ()),
                )
            if not self.is_dynamic:
                return
            await asyncio.sleep(self._refresh)
