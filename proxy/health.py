"""Endpoint health: outlier detection and active HTTP checks, feeding ``proxy.cluster``.

Theory of operation
-------------------
A :class:`ClusterHealth` watches one cluster. It keeps a :class:`HostHealth` per endpoint and
tells the cluster which endpoints to keep out of its balancer (``Cluster.set_unhealthy``): those
ejected by outlier detection plus those failing active checks. The cluster then rebuilds its
ring or table over the healthy ones and swaps the snapshot in one assignment, so a request in
flight finishes on the snapshot it started with (``proxy.cluster``). Rebuilds are coalesced and
run from the event loop (``call_soon``), never inside the data plane's parser callbacks.

**Outlier detection** is Envoy's, as Istio configures it from ``outlierDetection`` (Istio turns
off the success-rate detector, so only the consecutive-error ones remain):

* every attempt reports its outcome to its endpoint's ``HostHealth.put`` (``UpstreamPool.monitor``,
  see ``proxy.http1``): the response status, 503 for a connect failure or a reset (Envoy's
  ``LocalOriginConnectFailed``), 504 for a timeout. Attempts, not client requests: a request
  that failed on one pod and succeeded on a retry elsewhere still counts against the first pod;
* a 5xx counts towards ``consecutive5xxErrors``; 502/503/504 also towards
  ``consecutiveGatewayErrors`` (any other 5xx resets that one); anything below 500 resets both.
  When a counter *reaches* its threshold (0 disables it) the host is ejected at once: ejection is
  event driven, the interval does not delay it;
* an ejection is refused when ``100 * (ejected + 1) / hosts > maxEjectionPercent`` (Envoy since
  1.2x; Istio does not set ``always_eject_one_host``). So with Istio's default 10 % and fewer
  than ten pods, **nothing is ever ejected**: set ``maxEjectionPercent`` to eject among 3 pods;
* an ejected host stays out for ``baseEjectionTime * backoff`` (at most ``max(300 s, base)``),
  where ``backoff`` grows by one at each ejection and shrinks by one per ``interval`` the host
  spends back in service (Envoy's ``ejectTimeBackoff``: "multiplied by the number of times the
  host has been ejected" while it keeps failing). Un-ejection is checked every ``interval``, so
  a host returns between ``base`` and ``base + interval`` after its ejection;
* ``minHealthPercent`` is the cluster's panic threshold (``ClusterSpec.panic_threshold``):
  below it every endpoint is used again, ejected or not; 0 disables it.

**Active checks** (optional; Istio's gateway has none) come from the annotation
``sticky-proxy/health-check: "path=/healthz interval=5s timeout=1s unhealthy=2 healthy=1"`` on the
DestinationRule or ServiceEntry, read at load into ``ClusterSpec.health_check``
(``proxy.istio_reader.parse_health_check``). Every ``interval`` each endpoint gets ``GET path``
(aiohttp, Host = the service host); a status in ``expect`` (default 200) within ``timeout``
passes. ``unhealthy`` failures in a row take the endpoint out, ``healthy`` passes in
a row bring it back. As in Envoy (``successful_active_health_check_uneject_host``), a passing
check also ends an outlier ejection. Endpoints start healthy; the first round runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Final

import aiohttp

from proxy.cluster import Cluster
from proxy.config import ClusterSpec, Endpoint, HealthCheckSpec, OutlierDetection
from proxy.pool import UpstreamPool
from proxy.tls import UpstreamTls

__all__ = ["ClusterHealth", "HostHealth"]

log = logging.getLogger("proxy.health")

MAX_EJECTION_TIME: Final = 300.0  # Envoy's default max_ejection_time (or base, if larger)
_GATEWAY_ERRORS: Final = frozenset({502, 503, 504})


# --------------------------------------------------------------------------- per endpoint
class HostHealth:
    """One endpoint's health; its ``put`` is the pool's outlier monitor (``proxy.upstream``)."""

    __slots__ = (
        "_owner",
        "backoff",
        "c5xx",
        "cgw",
        "check_failed",
        "check_fails",
        "check_passes",
        "ejected",
        "ejected_at",
        "ejections",
        "endpoint",
        "unejected_at",
    )

    def __init__(self, owner: ClusterHealth, endpoint: Endpoint) -> None:
        self._owner = owner
        self.endpoint = endpoint
        self.c5xx = 0  # consecutive 5xx
        self.cgw = 0  # consecutive gateway errors (502/503/504)
        self.ejected = False
        self.ejections = 0  # times ejected (metrics, tests)
        self.backoff = 0  # Envoy's ejectTimeBackoff
        self.ejected_at = 0.0
        self.unejected_at: float | None = None
        self.check_failed = False  # out because of active checks
        self.check_fails = 0
        self.check_passes = 0

    def __repr__(self) -> str:
        return (
            f"<HostHealth {self.endpoint.key} 5xx={self.c5xx} gw={self.cgw} "
            f"ejected={self.ejected} check_failed={self.check_failed}>"
        )

    def put(self, status: int) -> None:
        """The outcome of one attempt (runs on the request path: cheap when all is well)."""
        if status < 500:
            if self.c5xx or self.cgw:
                self.c5xx = self.cgw = 0
            return
        owner = self._owner
        if status in _GATEWAY_ERRORS:
            self.cgw += 1
            if self.cgw == owner.gateway_threshold:
                owner._consecutive(self, gateway=True)
        else:
            self.cgw = 0
        self.c5xx += 1
        if self.c5xx == owner.c5xx_threshold:
            owner._consecutive(self, gateway=False)


# --------------------------------------------------------------------------- per cluster
class ClusterHealth:
    """Outlier detection and active checks for one cluster (see the module docstring).

    health = ClusterHealth(crt.spec, crt.cluster)
    health.sync()                       # after every Cluster.set_endpoints
    task = asyncio.create_task(health.run())
    ...
    task.cancel(); await health.close()
    """

    def __init__(
        self,
        spec: ClusterSpec,
        cluster: Cluster[UpstreamPool],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.cluster = cluster
        self.outlier: OutlierDetection | None = spec.outlier
        self.check: HealthCheckSpec | None = spec.health_check
        self.hosts: dict[str, HostHealth] = {}
        self._clock = clock
        o = self.outlier
        self.c5xx_threshold = o.consecutive_5xx_errors if o is not None else 0
        self.gateway_threshold = o.consecutive_gateway_errors if o is not None else 0
        self._session: aiohttp.ClientSession | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._apply_pending = False
        self._applied: frozenset[str] = frozenset()
        self._endpoints: tuple[Endpoint, ...] | None = None

    def __repr__(self) -> str:
        return f"<ClusterHealth {self.spec.name} unhealthy={sorted(self.unhealthy)}>"

    @property
    def enabled(self) -> bool:
        """Anything to do at all (outlier detection or active checks configured)."""
        return self.outlier is not None or self.check is not None

    @property
    def ejected(self) -> frozenset[str]:
        return frozenset(k for k, h in self.hosts.items() if h.ejected)

    @property
    def unhealthy(self) -> frozenset[str]:
        return frozenset(k for k, h in self.hosts.items() if h.ejected or h.check_failed)

    # ------------------------------------------------------------------ endpoints
    def sync(self) -> None:
        """Follow the cluster's endpoints: a HostHealth per endpoint, hooked to its pool."""
        snap = self.cluster.snapshot
        if snap.endpoints is self._endpoints:
            return
        self._endpoints = snap.endpoints
        keep: dict[str, HostHealth] = {}
        for ep in snap.endpoints:
            host = self.hosts.get(ep.key)
            if host is None:
                host = HostHealth(self, ep)
            keep[ep.key] = host
        self.hosts = keep
        self._attach(snap.pools)
        if self.unhealthy != self._applied:
            self._schedule_apply()

    def _attach(self, pools: Mapping[str, UpstreamPool]) -> None:
        for key, pool in pools.items():
            host = self.hosts.get(key)
            pool.monitor = host if host is not None and self.outlier is not None else None

    # ------------------------------------------------------------------ outlier detection
    def _consecutive(self, host: HostHealth, *, gateway: bool) -> None:
        if host.ejected or self.hosts.get(host.endpoint.key) is not host:
            return
        if gateway:
            host.cgw = 0
        else:
            host.c5xx = 0
        self._eject(host, "consecutive gateway errors" if gateway else "consecutive 5xx")

    def _eject(self, host: HostHealth, why: str) -> None:
        o = self.outlier
        assert o is not None
        ejected = sum(1 for h in self.hosts.values() if h.ejected)
        if 100.0 * (ejected + 1) / len(self.hosts) > o.max_ejection_percent:
            log.warning(
                "cluster %s: %s of %s, not ejected: %d of %d hosts already out and "
                "maxEjectionPercent is %d",
                self.spec.name,
                why,
                host.endpoint.key,
                ejected,
                len(self.hosts),
                o.max_ejection_percent,
            )
            return
        host.ejected = True
        host.ejections += 1
        host.ejected_at = self._clock()
        max_time = max(MAX_EJECTION_TIME, o.base_ejection_time)
        if host.backoff * o.base_ejection_time < max_time + o.base_ejection_time:
            host.backoff += 1
        log.warning(
            "cluster %s: ejected %s (%s) for %.1fs",
            self.spec.name,
            host.endpoint.key,
            why,
            self.ejection_time(host),
        )
        self._schedule_apply()

    def ejection_time(self, host: HostHealth) -> float:
        o = self.outlier
        assert o is not None
        max_time = max(MAX_EJECTION_TIME, o.base_ejection_time)
        return min(o.base_ejection_time * host.backoff, max_time)

    def _uneject(self, host: HostHealth, now: float, why: str) -> None:
        host.ejected = False
        host.unejected_at = now
        host.c5xx = host.cgw = 0
        log.warning("cluster %s: %s back in service (%s)", self.spec.name, host.endpoint.key, why)
        self._schedule_apply()

    def tick(self) -> None:
        """Envoy's interval timer: end ejections that have lasted long enough, decay backoff."""
        o = self.outlier
        if o is None:
            return
        now = self._clock()
        for host in self.hosts.values():
            if host.ejected:
                if self.ejection_time(host) <= now - host.ejected_at:
                    self._uneject(host, now, "ejection time over")
            elif (
                host.backoff
                and host.unejected_at is not None
                and now - host.unejected_at >= o.interval
            ):
                host.backoff -= 1

    # ------------------------------------------------------------------ applying
    def _schedule_apply(self) -> None:
        if self._apply_pending:
            return
        self._apply_pending = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.apply()
            return
        loop.call_soon(self.apply)

    def apply(self) -> None:
        """Hand the unhealthy set to the cluster (which rebuilds only when it changed)."""
        self._apply_pending = False
        unhealthy = self.unhealthy
        if unhealthy != self._applied:
            self._applied = unhealthy
            self.cluster.set_unhealthy(unhealthy)
            # Pools of new endpoints may have appeared with the rebuild's snapshot.
            self._attach(self.cluster.snapshot.pools)

    # ------------------------------------------------------------------ active checks
    async def check_once(self) -> None:
        """One round of active checks over every endpoint, concurrently."""
        if self.check is None:
            return
        self.sync()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.check.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        hosts = list(self.hosts.values())
        results = await asyncio.gather(*(self._probe(h) for h in hosts))
        for host, ok in zip(hosts, results, strict=True):
            self._checked(host, ok)

    async def _probe(self, host: HostHealth) -> bool:
        check = self.check
        assert check is not None and self._session is not None
        ep = host.endpoint
        address = f"[{ep.address}]" if ":" in ep.address else ep.address
        tls = self.spec.tls
        url = f"{'https' if tls else 'http'}://{address}:{ep.port}{check.path}"
        headers = {"Host": check.host or self.spec.host, "User-Agent": "sticky-proxy-health"}
        options: dict[str, object] = {}
        if tls is not None:
            # The cluster's TLS (its CA, client certificate, SNI), but no name check: the
            # check's request has no Host to take the name from (Envoy's auto_sni).
            if self._tls_context is None:
                self._tls_context = UpstreamTls(tls, check_names=False).context
            options = {"ssl": self._tls_context, "server_hostname": tls.sni or None}
        try:
            async with self._session.get(
                url,
                headers=headers,
                allow_redirects=False,
                **options,  # type: ignore[arg-type]
            ) as resp:
                await resp.read()
                return check.expect[0] <= resp.status <= check.expect[1]
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _checked(self, host: HostHealth, ok: bool) -> None:
        check = self.check
        assert check is not None
        if self.hosts.get(host.endpoint.key) is not host:
            return  # the endpoint left while it was checked
        if ok:
            host.check_fails = 0
            host.check_passes += 1
            if host.check_failed and host.check_passes >= check.healthy:
                host.check_failed = False
                log.warning("cluster %s: %s passes its checks", self.spec.name, host.endpoint.key)
                self._schedule_apply()
            if host.ejected:
                self._uneject(host, self._clock(), "active check passed")
        else:
            host.check_passes = 0
            host.check_fails += 1
            if not host.check_failed and host.check_fails >= check.unhealthy:
                host.check_failed = True
                log.warning("cluster %s: %s fails its checks", self.spec.name, host.endpoint.key)
                self._schedule_apply()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Until cancelled: the outlier interval timer and the active checks."""
        self.sync()
        tasks = []
        if self.outlier is not None:
            tasks.append(asyncio.create_task(self._run_outlier(self.outlier.interval)))
        if self.check is not None:
            tasks.append(asyncio.create_task(self._run_checks(self.check.interval)))
        if not tasks:
            return
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def _run_outlier(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sync()
            self.tick()

    async def _run_checks(self, interval: float) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a bug must not stop the checks for good
                log.exception("cluster %s: health check round failed", self.spec.name)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()
        for pool in self.cluster.pools():
            if isinstance(pool.monitor, HostHealth) and pool.monitor._owner is self:
                pool.monitor = None
