from __future__ import annotations

import pytest

from proxy.affinity import CookiePolicy
from proxy.cluster import (
    Cluster,
    LeastRequest,
    RoundRobin,
    build_balancer,
    next_distinct,
)
from proxy.config import ConsistentHashLB, Endpoint, LoadBalancerSettings
from proxy.hashing import Maglev, RingHash, xxh64

RING = LoadBalancerSettings(
    simple=None, consistent_hash=ConsistentHashLB(policy=CookiePolicy("ISTIOID", ttl=60))
)
MAGLEV = LoadBalancerSettings(
    simple=None,
    consistent_hash=ConsistentHashLB(policy=CookiePolicy("ISTIOID", ttl=60), algorithm="maglev"),
)


def eps(*ports: int) -> list[Endpoint]:
    return [Endpoint("127.0.0.1", p) for p in ports]


def test_ring_matches_hashing_default_ring_whatever_the_input_order() -> None:
    expected = RingHash({"127.0.0.1:9001": 1, "127.0.0.1:9002": 1, "127.0.0.1:9003": 1})
    forward = build_balancer(RING, eps(9001, 9002, 9003))
    backward = build_balancer(RING, eps(9003, 9002, 9001))
    for i in range(500):
        h = xxh64(f"session-{i}")
        assert forward.pick(h) == expected.pick(h) == backward.pick(h)


def test_maglev_selected_by_settings() -> None:
    balancer = build_balancer(MAGLEV, eps(9001, 9002))
    assert isinstance(balancer, Maglev)
    assert balancer.stats.size == 65537


def test_empty_endpoints_is_an_error() -> None:
    with pytest.raises(ValueError, match="no endpoints"):
        build_balancer(RING, [])


def test_round_robin_follows_weights() -> None:
    rr = RoundRobin({"a:1": 1, "b:1": 2})
    picks = [rr.pick(0) for _ in range(6)]
    assert picks.count("b:1") == 4 and picks.count("a:1") == 2


def test_least_request_prefers_idle_endpoint() -> None:
    active = {"a:1": 5, "b:1": 0}
    lr = LeastRequest({"a:1": 1, "b:1": 1}, active)
    assert {lr.pick(0) for _ in range(50)} == {"b:1"}


def test_pools_survive_rebuilds_and_leavers_are_returned() -> None:
    made: list[str] = []

    def factory(ep: Endpoint) -> str:
        made.append(ep.key)
        return f"pool-{ep.key}"

    cluster = Cluster("c", RING, factory)
    assert cluster.set_endpoints(eps(9001, 9002, 9003)) == []
    first = cluster.snapshot
    removed = cluster.set_endpoints(eps(9001, 9002))
    assert removed == ["pool-127.0.0.1:9003"]
    assert made == ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
    assert cluster.snapshot.pools["127.0.0.1:9001"] == "pool-127.0.0.1:9001"
    # A request holding the old snapshot still sees the old, complete view.
    assert first.balancer is not None and len(first.balancer.hosts) == 3
    assert "127.0.0.1:9003" in first.pools


def test_same_endpoint_set_keeps_the_balancer_object() -> None:
    cluster = Cluster("c", RING, lambda ep: ep.key)
    cluster.set_endpoints(eps(9001, 9002))
    balancer = cluster.snapshot.balancer
    cluster.set_endpoints(reversed(eps(9001, 9002)))
    assert cluster.snapshot.balancer is balancer


def test_unhealthy_endpoints_leave_the_ring_as_envoy_rebuilds_it() -> None:
    # Envoy rebuilds the ring over the healthy hosts, so the scale (entries per host) changes
    # with the host count: the result must equal a fresh ring over the survivors.
    cluster = Cluster("c", RING, lambda ep: ep.key)
    cluster.set_endpoints(eps(9001, 9002, 9003))
    cluster.set_unhealthy({"127.0.0.1:9002"})
    after = cluster.snapshot.balancer
    assert after is not None and after.hosts == ("127.0.0.1:9001", "127.0.0.1:9003")
    expected = RingHash({"127.0.0.1:9001": 1, "127.0.0.1:9003": 1})
    for i in range(300):
        h = xxh64(f"s{i}")
        assert after.pick(h) == expected.pick(h)


def test_panic_threshold_puts_every_endpoint_back() -> None:
    cluster = Cluster("c", RING, lambda ep: ep.key, panic_threshold=50)
    cluster.set_endpoints(eps(9001, 9002, 9003))
    cluster.set_unhealthy({"127.0.0.1:9001", "127.0.0.1:9002"})
    snap = cluster.snapshot
    assert snap.panic and snap.healthy_count == 1
    assert snap.balancer is not None and len(snap.balancer.hosts) == 3


def test_all_unhealthy_without_panic_has_no_balancer() -> None:
    cluster = Cluster("c", RING, lambda ep: ep.key)
    cluster.set_endpoints(eps(9001))
    cluster.set_unhealthy({"127.0.0.1:9001"})
    assert cluster.snapshot.balancer is None


def test_next_distinct_skips_entries_of_the_failed_host() -> None:
    balancer = build_balancer(RING, eps(9001, 9002, 9003))
    h = xxh64("abc")
    first = balancer.pick(h)
    second = next_distinct(balancer, h, first, 1)
    third = next_distinct(balancer, h, first, 2)
    assert len({first, second, third}) == 3


# --------------------------------------------------------------------------- draining


def draining_cluster(drain: float) -> Cluster[str]:
    cluster: Cluster[str] = Cluster("c", RING, lambda ep: f"pool-{ep.port}", drain=drain)
    cluster.set_endpoints(eps(9001, 9002, 9003), now=100.0)
    return cluster


def test_without_drain_a_removed_endpoint_is_gone_at_once() -> None:
    cluster = draining_cluster(0.0)
    assert cluster.set_endpoints(eps(9002, 9003), now=101.0) == ["pool-9001"]
    assert "127.0.0.1:9001" not in cluster.snapshot.targets
    assert cluster.next_drain_deadline is None


def test_a_removed_endpoint_drains_its_sessions_then_leaves() -> None:
    cluster = draining_cluster(30.0)
    assert cluster.set_endpoints(eps(9002, 9003), now=101.0) == []
    snap = cluster.snapshot
    assert snap.balancer is not None and "127.0.0.1:9001" not in snap.balancer.hosts
    assert "127.0.0.1:9001" not in snap.pools  # no new session goes there
    assert snap.targets["127.0.0.1:9001"] == "pool-9001"  # its sessions still do
    assert snap.draining == {"127.0.0.1:9001": 131.0}
    assert cluster.next_drain_deadline == 131.0
    assert cluster.expire_draining(now=130.9) == []
    assert cluster.expire_draining(now=131.0) == ["pool-9001"]
    assert "127.0.0.1:9001" not in cluster.snapshot.targets
    assert cluster.next_drain_deadline is None
    assert cluster.pools() == ["pool-9002", "pool-9003"]


def test_a_connect_failure_ends_the_drain_window_at_once() -> None:
    cluster = draining_cluster(30.0)
    cluster.set_endpoints(eps(9002, 9003), now=101.0)
    assert cluster.end_drain("127.0.0.1:9001") is True
    assert cluster.end_drain("127.0.0.1:9001") is False
    assert "127.0.0.1:9001" not in cluster.snapshot.targets
    assert "pool-9001" in cluster.pools()  # closed when the timer hands it back
    assert cluster.expire_draining(now=102.0) == ["pool-9001"]


def test_an_endpoint_that_comes_back_keeps_its_pool() -> None:
    cluster = draining_cluster(30.0)
    cluster.set_endpoints(eps(9002, 9003), now=101.0)
    cluster.set_endpoints(eps(9001, 9002, 9003), now=102.0)
    assert cluster.snapshot.pools["127.0.0.1:9001"] == "pool-9001"
    assert cluster.snapshot.draining == {}
    assert cluster.expire_draining(now=200.0) == []


def test_unhealthy_endpoints_are_no_session_targets() -> None:
    cluster = draining_cluster(0.0)
    cluster.set_unhealthy({"127.0.0.1:9002"})
    assert set(cluster.snapshot.targets) == {"127.0.0.1:9001", "127.0.0.1:9003"}


def test_bounded_load_is_built_with_the_balancer() -> None:
    bounded_lb = LoadBalancerSettings(
        simple=None,
        consistent_hash=ConsistentHashLB(
            policy=CookiePolicy("ISTIOID", ttl=60), hash_balance_factor=150
        ),
    )
    cluster: Cluster[str] = Cluster("c", bounded_lb, lambda ep: f"pool-{ep.port}")
    cluster.set_endpoints(eps(9001, 9002))
    bounded = cluster.snapshot.bounded
    assert bounded is not None and bounded.factor == 150
    assert bounded.balancer is cluster.snapshot.balancer
    assert draining_cluster(0.0).snapshot.bounded is None
