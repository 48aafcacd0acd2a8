"""proxy.health: Envoy's outlier detection rules with a fake clock, active checks on real pods."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.affinity import CookiePolicy
from proxy.cluster import Cluster
from proxy.config import (
    ClusterSpec,
    ConsistentHashLB,
    Endpoint,
    HealthCheckSpec,
    LoadBalancerSettings,
    OutlierDetection,
    StaticEndpoints,
)
from proxy.demo import PodSet
from proxy.hashing import RingHash
from proxy.health import ClusterHealth
from proxy.istio_reader import parse_health_check
from proxy.pool import UpstreamPool

ENDPOINTS = tuple(Endpoint("127.0.0.1", 9000 + i) for i in range(3))
KEYS = [ep.key for ep in ENDPOINTS]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


OUTLIER = OutlierDetection(
    consecutive_5xx_errors=3, max_ejection_percent=50, interval=1.0, base_ejection_time=10.0
)


def make(
    outlier: OutlierDetection | None = OUTLIER,
    health_check: str | None = None,
    panic: float = 0.0,
    endpoints: tuple[Endpoint, ...] = ENDPOINTS,
) -> tuple[ClusterHealth, Cluster[UpstreamPool], Clock]:
    spec = ClusterSpec(
        name="outbound|80||svc",
        host="svc.default.svc.cluster.local",
        port=80,
        subset=None,
        lb=LoadBalancerSettings(),
        endpoints=StaticEndpoints(endpoints),
        outlier=outlier,
        health_check=parse_health_check(health_check) if health_check else None,
        panic_threshold=panic,
    )
    cluster: Cluster[UpstreamPool] = Cluster(
        spec.name, spec.lb, lambda ep: UpstreamPool(ep.address, ep.port), panic_threshold=panic
    )
    cluster.set_endpoints(endpoints)
    clock = Clock()
    health = ClusterHealth(spec, cluster, clock=clock)
    health.sync()
    return health, cluster, clock


def in_balancer(cluster: Cluster[UpstreamPool]) -> set[str]:
    assert cluster.snapshot.balancer is not None
    return set(cluster.snapshot.balancer.hosts)


# --------------------------------------------------------------------------- annotation
def test_annotation_parses_every_key() -> None:
    spec = parse_health_check(
        "path=/ready interval=500ms timeout=2s unhealthy=3 healthy=2 expect=200-299 host=a.b"
    )
    assert spec == HealthCheckSpec("/ready", 0.5, 2.0, 3, 2, (200, 299), "a.b")
    assert parse_health_check("") == HealthCheckSpec()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path", "expected key=value"),
        ("paht=/x", "unknown key"),
        ("interval=5", "missing unit"),
        ("timeout=0s", "must be > 0"),
        ("unhealthy=two", "not a whole number"),
        ("healthy=0", "must be >= 1"),
        ("path=healthz", "must start with '/'"),
        ("expect=600", "status range"),
        ("path=/a path=/b", "given twice"),
    ],
)
def test_bad_annotation_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_health_check(text)


# --------------------------------------------------------------------------- outlier detection
def test_pools_get_monitors_only_with_outlier_detection() -> None:
    health, cluster, _ = make()
    assert all(pool.monitor is health.hosts[pool.key] for pool in cluster.pools())
    health, cluster, _ = make(outlier=None)
    assert all(pool.monitor is None for pool in cluster.pools())


def test_consecutive_5xx_ejects_at_once_and_the_ring_loses_the_host() -> None:
    health, cluster, _ = make()
    host = health.hosts[KEYS[0]]
    host.put(500)
    host.put(503)
    assert not host.ejected
    host.put(502)  # the third in a row: ejected now, not at the next interval
    assert host.ejected and health.ejected == {KEYS[0]}
    assert in_balancer(cluster) == set(KEYS[1:])  # (no loop running: applied at once)


def test_a_success_resets_the_count() -> None:
    health, _, _ = make()
    host = health.hosts[KEYS[0]]
    for status in (503, 503, 200, 503, 503, 404, 500, 500):
        host.put(status)
    assert not host.ejected


def test_gateway_errors_count_502_503_504_only() -> None:
    outlier = OutlierDetection(
        consecutive_5xx_errors=0, consecutive_gateway_errors=2, max_ejection_percent=100
    )
    health, _, _ = make(outlier)
    host = health.hosts[KEYS[0]]
    for status in (503, 500, 504, 500):  # a 500 resets the gateway count
        host.put(status)
    assert not host.ejected
    host.put(504)
    assert not host.ejected
    host.put(504)
    assert host.ejected


def test_max_ejection_percent_istio_default_ejects_nothing_among_three() -> None:
    health, cluster, _ = make(OutlierDetection(consecutive_5xx_errors=1))  # 10 %
    health.hosts[KEYS[0]].put(503)
    assert health.ejected == frozenset()
    assert in_balancer(cluster) == set(KEYS)


def test_max_ejection_percent_caps_the_ejected_share() -> None:
    health, _, _ = make(OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=34))
    for key in KEYS:
        health.hosts[key].put(503)
    assert health.ejected == {KEYS[0]}  # 2 of 3 would be 67 % > 34 %


def test_ejection_time_grows_with_each_ejection_and_returns_at_a_tick() -> None:
    health, cluster, clock = make()
    host = health.hosts[KEYS[0]]
    for _ in range(3):
        host.put(503)
    assert health.ejection_time(host) == 10.0
    clock.now += 9.9
    health.tick()
    assert host.ejected
    clock.now += 0.1
    health.tick()
    assert not host.ejected and in_balancer(cluster) == set(KEYS)
    for _ in range(3):  # fails again at once: ejected twice as long
        host.put(503)
    assert host.ejected and health.ejection_time(host) == 20.0
    clock.now += 20.0
    health.tick()
    assert not host.ejected
    for _ in range(3):  # backoff decays one step per healthy interval
        clock.now += 1.0
        health.tick()
    assert host.backoff == 0


def test_panic_threshold_uses_every_endpoint() -> None:
    outlier = OutlierDetection(
        consecutive_5xx_errors=1, max_ejection_percent=100, min_health_percent=50
    )
    health, cluster, _ = make(outlier, panic=50.0)
    health.hosts[KEYS[0]].put(503)
    assert in_balancer(cluster) == set(KEYS[1:])  # 2 of 3 healthy: 67 % >= 50 %
    health.hosts[KEYS[1]].put(503)
    assert health.ejected == {KEYS[0], KEYS[1]}
    assert cluster.snapshot.panic and in_balancer(cluster) == set(KEYS)


async def test_rebuild_is_deferred_out_of_the_request_path() -> None:
    health, cluster, _ = make()
    version = cluster.snapshot.version
    snap = cluster.snapshot
    for _ in range(3):
        health.hosts[KEYS[2]].put(503)
    assert cluster.snapshot is snap  # a request in flight keeps its snapshot...
    await asyncio.sleep(0)
    assert cluster.snapshot.version == version + 1  # ...the next one sees the rebuild
    assert in_balancer(cluster) == set(KEYS[:2])


def test_endpoints_leaving_and_joining_follow_the_cluster() -> None:
    health, cluster, _ = make()
    for _ in range(3):
        health.hosts[KEYS[0]].put(503)
    new = Endpoint("127.0.0.1", 9100)
    cluster.set_endpoints((*ENDPOINTS[1:], new))
    health.sync()
    assert set(health.hosts) == {*KEYS[1:], new.key}
    assert health.ejected == frozenset()
    assert cluster.snapshot.pools[new.key].monitor is health.hosts[new.key]


def test_ring_rebuilt_without_the_host_matches_envoys_rule() -> None:
    ring = LoadBalancerSettings(
        simple=None, consistent_hash=ConsistentHashLB(CookiePolicy("ISTIOID"))
    )
    cluster: Cluster[UpstreamPool] = Cluster(
        "c", ring, lambda ep: UpstreamPool(ep.address, ep.port)
    )
    cluster.set_endpoints(ENDPOINTS)
    outlier = OutlierDetection(consecutive_5xx_errors=3, max_ejection_percent=50)
    spec = ClusterSpec("c", "svc", 80, None, ring, StaticEndpoints(ENDPOINTS), outlier=outlier)
    health = ClusterHealth(spec, cluster)
    health.sync()
    for _ in range(3):
        health.hosts[KEYS[1]].put(503)
    expected = RingHash({KEYS[0]: 1, KEYS[2]: 1})
    balancer = cluster.snapshot.balancer
    assert balancer is not None
    assert all(balancer.pick(h) == expected.pick(h) for h in range(0, 2**64, 2**58))


# --------------------------------------------------------------------------- active checks
@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(3, shutdown_timeout=0.1) as podset:
        yield podset


def pod_endpoints(pods: PodSet) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(h, p) for h, p in pods.addresses)


async def test_active_checks_mark_down_after_unhealthy_and_up_after_healthy(pods: PodSet) -> None:
    eps = pod_endpoints(pods)
    health, cluster, _ = make(
        outlier=None, health_check="path=/healthz unhealthy=2 healthy=2", endpoints=eps
    )
    try:
        pods.set_healthy(0, False)
        await health.check_once()
        assert health.unhealthy == frozenset()  # one failure is not enough
        await health.check_once()
        await asyncio.sleep(0)
        assert health.unhealthy == {eps[0].key}
        assert in_balancer(cluster) == {ep.key for ep in eps[1:]}
        await pods.stop(1)  # refused connections fail too
        await health.check_once()
        await health.check_once()
        await asyncio.sleep(0)
        assert health.unhealthy == {eps[0].key, eps[1].key}
        pods.set_healthy(0, True)
        await health.check_once()
        assert eps[0].key in health.unhealthy  # healthy=2
        await health.check_once()
        await asyncio.sleep(0)
        assert health.unhealthy == {eps[1].key}
    finally:
        await health.close()


async def test_a_passing_check_ends_an_outlier_ejection(pods: PodSet) -> None:
    eps = pod_endpoints(pods)
    outlier = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100)
    health, _, _ = make(outlier=outlier, health_check="path=/healthz", endpoints=eps)
    try:
        health.hosts[eps[0].key].put(500)
        assert health.ejected == {eps[0].key}
        await health.check_once()
        assert health.ejected == frozenset()
    finally:
        await health.close()


async def test_run_loop_checks_on_its_interval(pods: PodSet) -> None:
    eps = pod_endpoints(pods)
    health, cluster, _ = make(outlier=None, health_check="interval=50ms unhealthy=1", endpoints=eps)
    changed = asyncio.Event()
    cluster.on_rebuild = lambda _: changed.set()
    pods.set_healthy(2, False)
    task = asyncio.create_task(health.run())
    try:
        async with asyncio.timeout(5):
            await changed.wait()
        assert in_balancer(cluster) == {ep.key for ep in eps[:2]}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert health._session is None  # closed on the way out
