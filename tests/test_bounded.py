"""Bounded load (``proxy.bounded``): Envoy's BoundedLoadHashingLoadBalancer, case by case.

The shuffle sequences and the expected picks are the ones in Envoy's
``test/common/upstream/bounded_load_hlb_test.cc``; its test hashing balancer maps hash ``h`` to
host ``h % N`` of a list (a ring with one or two entries per host), reproduced by ``ListLb``.
"""

from __future__ import annotations

import pytest

from proxy.bounded import BoundedLoad, Mt19937, probe_order, uniform_int
from proxy.hashing import Maglev, RingHash, xxh64


class ListLb:
    """Envoy's TestHashingLoadBalancer: ``ring[hash % len(ring)]``."""

    def __init__(self, ring: list[str]) -> None:
        self.ring = ring

    def pick(self, hash: int, attempt: int = 0) -> str:
        return self.ring[hash % len(self.ring)]


def slots(in_flight: int, factor: int, n: int) -> int:
    """Envoy's slots of one of ``n`` equal hosts with ``in_flight`` requests elsewhere."""
    total_slots = ((in_flight + 1) * factor + 99) // 100
    return max(-(-total_slots // n), 1)


def hosts(n: int) -> dict[str, int]:
    return {f"127.0.0.1{i}:90": 1 for i in range(n)}


def test_mt19937_is_the_standard_engine() -> None:
    # C++11 [rand.predef]: the 10000th output of a default-constructed mt19937 is 4123659995.
    random = Mt19937(5489)
    first = random()
    for _ in range(9998):
        random()
    assert (first, random()) == (3499211612, 4123659995)
    # The engine keeps the seed mod 2**32, as std::mt19937 does with a 64-bit hash.
    assert Mt19937(7 + (1 << 40))() == Mt19937(7)()


def test_uniform_int_stays_in_range() -> None:
    random = Mt19937(1)
    assert {uniform_int(random, 3) for _ in range(300)} == {0, 1, 2}


@pytest.mark.parametrize(
    ("seed", "order"), [(2, [2, 1, 0, 4, 3]), (6, [4, 0, 2, 3, 1]), (7, [0, 1, 4, 3, 2])]
)
def test_probe_order_is_envoys_shuffle(seed: int, order: list[int]) -> None:
    assert list(probe_order(seed, 5)) == order


def test_no_host_overloaded_keeps_the_hashed_host() -> None:
    weights = hosts(5)
    bounded = BoundedLoad(ListLb(list(weights)), weights, 125)
    for i in range(5):
        assert bounded.choose(i, lambda key: 0, 0) == (f"127.0.0.1{i}:90", False)


def test_one_overloaded_host_spills_to_the_next_in_the_shuffle() -> None:
    # Envoy's ActualHostOverloaded / OneHostOverloaded: hash 2 -> .12, overloaded -> .11.
    weights = hosts(5)
    bounded = BoundedLoad(ListLb(list(weights)), weights, 100)
    load = {"127.0.0.12:90": 2}
    # 2 in flight: total_slots = (2 + 1) * 100 / 100 = 3, a host's slots = ceil(3 / 5) = 1.
    assert bounded.choose(2, lambda key: load.get(key, 0), 2) == ("127.0.0.11:90", True)
    assert bounded.choose(2, lambda key: load.get(key, 0) - 1, 1) == ("127.0.0.12:90", False)


def test_several_overloaded_hosts_are_passed_over() -> None:
    # Envoy's MultipleHostOverloaded: .10 .11 .12 full, sequence 2 1 0 4 3 -> .14.
    weights = hosts(5)
    bounded = BoundedLoad(ListLb(list(weights)), weights, 100)
    load = dict.fromkeys(["127.0.0.10:90", "127.0.0.11:90", "127.0.0.12:90"], 3)
    # 9 in flight: total_slots 10, 2 slots a host: 3 is over, 0 is not.
    assert bounded.choose(2, lambda key: load.get(key, 0), 9) == ("127.0.0.14:90", True)


def test_two_hashes_on_one_full_host_probe_different_sequences() -> None:
    # Envoy's MultipleHashSameHostOverloaded: ring 0 0 1 1 2 2 3 3 4 4, host 3 full.
    weights = hosts(5)
    ring = [key for key in weights for _ in range(2)]
    bounded = BoundedLoad(ListLb(ring), weights, 100)
    load = {"127.0.0.13:90": 2}
    assert bounded.choose(6, lambda key: load.get(key, 0), 2)[0] == "127.0.0.14:90"
    assert bounded.choose(7, lambda key: load.get(key, 0), 2)[0] == "127.0.0.10:90"


def test_all_hosts_overloaded_picks_the_least_overloaded() -> None:
    # Envoy's AllHostsOverloaded: hash 0 -> .10 (full); .11 is the least overloaded.
    weights = hosts(3)
    bounded = BoundedLoad(ListLb(list(weights)), weights, 100)
    # 8 in flight: total_slots 9, 3 slots each; factors .10 5/3, .11 4/3, .12 6/3.
    load = {"127.0.0.10:90": 5, "127.0.0.11:90": 4, "127.0.0.12:90": 6}
    assert bounded.choose(0, load.__getitem__, 8) == ("127.0.0.11:90", True)


def test_weights_give_heavier_hosts_more_slots() -> None:
    weights = {"a:1": 3, "b:1": 1}
    bounded = BoundedLoad(ListLb(list(weights)), weights, 100)
    # 3 in flight: total_slots 4; a gets ceil(4 * 0.75) = 3 slots, b ceil(4 * 0.25) = 1.
    assert bounded.overload("a:1", 3, 3) == 1.0
    assert bounded.overload("b:1", 2, 3) == 2.0


@pytest.mark.parametrize("kind", ["ring", "maglev"])
def test_no_host_above_the_cap_and_keys_return_when_the_load_goes(kind: str) -> None:
    """Place 300 requests whose keys all hash to one host, one at a time, each counted in
    flight: with factor 125 no host ever exceeds its slots; with the load gone every key is
    back on its hashed host."""
    weights = {f"10.0.0.{i}:80": 1 for i in range(1, 6)}
    balancer = RingHash(weights, 1024) if kind == "ring" else Maglev(weights, 65537)
    bounded = BoundedLoad(balancer, weights, 125)
    target = balancer.pick(xxh64("k0"))
    keys = [f"k{i}" for i in range(5000) if balancer.pick(xxh64(f"k{i}")) == target][:300]
    assert len(keys) == 300
    load = dict.fromkeys(weights, 0)
    spilled = 0
    for n, key in enumerate(keys):
        chosen, moved = bounded.choose(xxh64(key), load.__getitem__, n)
        spilled += moved
        load[chosen] += 1
        # A host takes a request while its load is within its slots: at most slots + 1 after.
        assert max(load.values()) <= slots(n, 125, 5) + 1
    assert spilled > 0
    assert max(load.values()) <= slots(299, 125, 5) + 1 == 76  # 1.25 x the mean (60), + 1
    idle = dict.fromkeys(weights, 0)
    assert all(bounded.choose(xxh64(k), idle.__getitem__, 0) == (target, False) for k in keys)


def test_factor_below_100_is_refused() -> None:
    with pytest.raises(ValueError, match="100"):
        BoundedLoad(ListLb(["a:1"]), {"a:1": 1}, 99)
