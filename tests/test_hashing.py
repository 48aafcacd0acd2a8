"""proxy.hashing against Envoy's own unit-test vectors, DESIGN §4, and reference implementations.

Vectors marked "Envoy" are copied from envoyproxy/envoy test/common/common/hash_test.cc,
test/extensions/load_balancing_policies/ring_hash/ring_hash_lb_test.cc and
.../maglev/maglev_lb_test.cc: the rings and tables Envoy itself prints.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import mmh3
import pytest

from proxy import hashing
from proxy.hashing import (
    DEFAULT_TABLE_SIZE,
    MASK64,
    Balancer,
    BalancerStats,
    Maglev,
    RingHash,
    combine_hashes,
    is_prime,
    murmur2_64,
    murmur3_64,
    xxh64,
)

MAX64 = MASK64
PORTS_90_95 = {f"127.0.0.1:{p}": 1 for p in range(90, 96)}


def port(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


# ------------------------------------------------------------------------------------------------
# Reference implementations, written independently from the module's code
# ------------------------------------------------------------------------------------------------


def ref_murmur2(data: bytes, seed: int = 0xC70F6907) -> int:
    """libstdc++ _Hash_bytes (64-bit) written the way the C reads: struct loads, per-byte tail."""
    m = 0xC6A4A7935BD1E995

    def shift_mix(v: int) -> int:
        return v ^ (v >> 47)

    length = len(data)
    hash_ = (seed ^ ((length * m) % 2**64)) % 2**64
    n_blocks = length // 8
    for b in range(n_blocks):
        (block,) = struct.unpack_from("<Q", data, 8 * b)
        block = (shift_mix((block * m) % 2**64) * m) % 2**64
        hash_ ^= block
        hash_ = (hash_ * m) % 2**64
    tail = data[8 * n_blocks :]
    if tail:
        loaded = 0
        for byte in reversed(tail):  # load_bytes: result = (result << 8) + p[n], n descending
            loaded = (loaded << 8) + byte
        hash_ ^= loaded
        hash_ = (hash_ * m) % 2**64
    hash_ = (shift_mix(hash_) * m) % 2**64
    return shift_mix(hash_)


def ketama_choose(ring: list[tuple[int, str]], h: int, attempt: int = 0) -> str:
    """Envoy's RingHashLoadBalancer::Ring::chooseHost, line for line (signed lowp/highp)."""
    lowp, highp = 0, len(ring)
    while True:
        midp = (lowp + highp) // 2  # operands are never negative here, so // == C's /
        if midp == len(ring):
            midp = 0
            break
        midval = ring[midp][0]
        midval1 = 0 if midp == 0 else ring[midp - 1][0]
        if midval1 < h <= midval:
            break
        if midval < h:
            lowp = midp + 1
        else:
            highp = midp - 1
        if lowp > highp:
            midp = 0
            break
    if attempt > 0:
        midp = (midp + attempt) % len(ring)
    return ring[midp][1]


def ref_ring(weights: Mapping[str, int], min_ring: int, max_ring: int) -> list[tuple[int, str]]:
    """Ring::Ring with explicit floats, unsorted push then sort on the hash."""
    total = sum(weights.values())
    normalized = [(k, w * 1.0 / total) for k, w in weights.items()]
    min_w = min(w for _, w in normalized)
    scale = min(math.ceil(min_w * min_ring) / min_w, float(max_ring))
    ring: list[tuple[int, str]] = []
    current = target = 0.0
    for key, w in normalized:
        target += scale * w
        i = 0
        while current < target:
            ring.append((xxh64((key + "_" + str(i)).encode("utf-8")), key))
            i += 1
            current += 1
    ring.sort(key=lambda e: e[0])
    return ring


@dataclass
class _BuildEntry:  # Envoy's TableBuildEntry
    key: str
    offset: int
    skip: int
    weight: float
    target: float = 0.0
    next: int = 0


def ref_maglev(weights: Mapping[str, int], m: int) -> list[str]:
    """The paper's listing 1 as Envoy extends it (weights, turns), with next_ counters."""
    total = sum(weights.values())
    max_w = max(weights.values()) / total
    entries = [
        _BuildEntry(key, xxh64(key) % m, xxh64(key, 1) % (m - 1) + 1, weights[key] / total)
        for key in sorted(weights)
    ]
    table: list[str | None] = [None] * m
    filled = 0
    iteration = 1
    while filled < m:
        for e in entries:
            if filled >= m:
                break
            if iteration * e.weight < e.target:
                continue
            e.target += max_w
            c = (e.offset + e.skip * e.next) % m
            while table[c] is not None:
                e.next += 1
                c = (e.offset + e.skip * e.next) % m
            table[c] = e.key
            e.next += 1
            filled += 1
        iteration += 1
    return [k for k in table if k is not None]


# ------------------------------------------------------------------------------------------------
# Hash functions
# ------------------------------------------------------------------------------------------------

# Envoy hash_test.cc
ENVOY_XXH64 = {
    b"foo": 3728699739546630719,
    b"bar": 5234164152756840025,
    b"foo\nbar": 8917841378505826757,
    b"lyft": 4400747396090729504,
    b"": 17241709254077376921,
}
ENVOY_MURMUR2 = {
    b"foo": 9631199822919835226,
    b"bar": 11474628671133349555,
    b"foo\nbar": 16306510975912980159,
    b"lyft": 12847078931730529320,
    b"": 6142509188972423790,
}


@pytest.mark.parametrize(("data", "expected"), ENVOY_XXH64.items())
def test_xxh64_envoy_vectors(data: bytes, expected: int) -> None:
    assert xxh64(data) == expected
    assert xxh64(data.decode()) == expected


def test_xxh64_str_is_utf8_and_seed_changes_value() -> None:
    assert xxh64("café") == xxh64("café".encode())
    assert xxh64("foo", 1) != xxh64("foo")
    assert 0 <= xxh64("foo", 1) <= MAX64


@pytest.mark.parametrize(("data", "expected"), ENVOY_MURMUR2.items())
def test_murmur2_envoy_vectors(data: bytes, expected: int) -> None:
    assert murmur2_64(data) == expected
    assert ref_murmur2(data) == expected  # the reference agrees with Envoy too


def test_murmur2_matches_reference_on_every_tail_length_and_seed() -> None:
    rng = random.Random(20240501)
    for length in range(0, 41):  # 0..5 blocks, every tail length 0..7
        for _ in range(20):
            data = rng.randbytes(length)
            seed = rng.choice([0, 1, 0xC70F6907, rng.getrandbits(64)])
            assert murmur2_64(data, seed) == ref_murmur2(data, seed), (data, seed)


def test_murmur2_high_bytes_are_unsigned() -> None:
    # load_bytes casts each char to unsigned char; a signed load would change these.
    data = bytes([0xFF, 0x80, 0x81])
    assert murmur2_64(data) == ref_murmur2(data)
    assert murmur2_64(data) != murmur2_64(bytes([0x7F, 0x00, 0x01]))


def test_murmur3_is_mmh3_first_unsigned_half() -> None:
    assert murmur3_64(b"foo") == mmh3.hash64(b"foo", signed=False)[0]
    assert murmur3_64("foo") == murmur3_64(b"foo")
    assert murmur3_64(b"foo") not in (xxh64(b"foo"), murmur2_64(b"foo"))


def test_combine_hashes_is_rotate_left_one_xor() -> None:
    assert combine_hashes(None, 42) == 42
    assert combine_hashes(0, 42) == 42
    assert combine_hashes(1 << 63, 0) == 1  # the top bit rotates into bit 0
    assert combine_hashes(0b1011, 0) == 0b10110
    x = xxh64("user-1")
    # The rotation is why two identical policies do not cancel out (a plain XOR would give 0).
    assert combine_hashes(x, x) != 0
    assert combine_hashes(x, x) == ((((x << 1) | (x >> 63)) & MAX64) ^ x)
    assert 0 <= combine_hashes(MAX64, MAX64) <= MAX64


def test_is_prime() -> None:
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(65537) and is_prime(5000011)
    assert not is_prime(65535) and not is_prime(1) and not is_prime(0)


# ------------------------------------------------------------------------------------------------
# Ring hash: DESIGN §4 and Envoy's printed rings
# ------------------------------------------------------------------------------------------------


def test_design_ring_examples() -> None:
    ring = RingHash(PORTS_90_95, minimum_ring_size=12)
    assert len(ring) == 12
    assert ring.stats == BalancerStats(12, 2, 2)
    assert port(ring.pick(0)) == 94
    assert port(ring.pick(MAX64)) == 94
    point = xxh64("127.0.0.1:95_0")
    assert port(ring.pick(point)) == 95
    assert port(ring.pick(point + 1)) == 93


ENVOY_BASIC_RING = [  # ring_hash_lb_test.cc Basic
    (94, 833437586790550860),
    (92, 928266305478181108),
    (90, 1033482794131418490),
    (95, 3551244743356806947),
    (93, 3851675632748031481),
    (91, 5583722120771150861),
    (91, 6311230543546372928),
    (93, 7700377290971790572),
    (95, 13144177310400110813),
    (92, 13444792449719432967),
    (94, 15516499411664133160),
    (90, 16117243373044804889),
]


def test_envoy_basic_ring_exactly() -> None:
    ring = RingHash(PORTS_90_95, minimum_ring_size=12)
    assert [(port(k), h) for h, k in ring.entries] == ENVOY_BASIC_RING
    assert port(ring.pick(16117243373044804880)) == 90  # Envoy's "random" pick in the same test


def test_envoy_ring_with_hostnames() -> None:
    ring = RingHash({str(p): 1 for p in range(90, 96)}, minimum_ring_size=12)
    assert [(int(k), h) for h, k in ring.entries] == [
        (95, 1975508444536362413),
        (95, 2376063919839173711),
        (93, 2386806903309390596),
        (94, 6749904478991551885),
        (93, 6803900775736438537),
        (92, 7225015537174310577),
        (90, 8787465352164086522),
        (92, 11282020843382717940),
        (91, 13723418369486627818),
        (90, 13776502110861797421),
        (91, 14338313586354474791),
        (94, 15364271037087512980),
    ]
    assert ring.pick(0) == "95" and ring.pick(MAX64) == "95"
    assert ring.pick(7225015537174310577) == "92"
    assert ring.pick(6803900775736438537) == "93"


def test_envoy_ring_with_murmur2() -> None:
    ring = RingHash(
        {f"127.0.0.1:{p}": 1 for p in range(80, 86)},
        minimum_ring_size=12,
        hash_function="MURMUR_HASH_2",
    )
    assert ring.stats == BalancerStats(12, 2, 2)
    assert [(port(k), h) for h, k in ring.entries] == [
        (85, 1358027074129602068),
        (83, 4361834613929391114),
        (84, 7224494972555149682),
        (81, 7701421856454313576),
        (82, 8649315368077433379),
        (84, 8739448859063030639),
        (81, 9887544217113020895),
        (82, 10150910876324007731),
        (83, 15168472011420622455),
        (80, 15427156902705414897),
        (85, 16375050414328759093),
        (80, 17613279263364193813),
    ]
    assert port(ring.pick(0)) == 85 and port(ring.pick(MAX64)) == 85
    assert port(ring.pick(1358027074129602069)) == 83
    assert port(ring.pick(10150910876324007730)) == 82


def test_envoy_retry_attempts_walk_the_ring() -> None:
    ring = RingHash(PORTS_90_95, minimum_ring_size=12)
    # BasicWithRetryHostPredicate: attempts 0, 1, 2 from hash 0, then 13 attempts wrap.
    assert [port(ring.pick(0, k)) for k in range(3)] == [94, 92, 90]
    assert port(ring.pick(0, 13)) == 92
    # Every attempt is the entry k places on, modulo the ring size.
    order = [port(k) for _, k in ring.entries]
    for k in range(30):
        assert port(ring.pick(0, k)) == order[k % 12]
    # From the last entry, attempt 1 wraps to entry 0.
    assert port(ring.pick(ENVOY_BASIC_RING[-1][1], 1)) == order[0]


def test_two_endpoints_min_ring_3_gives_4_entries() -> None:
    ring = RingHash({"127.0.0.1:80": 1, "127.0.0.1:81": 1}, minimum_ring_size=3)
    assert len(ring) == 4
    assert ring.stats == BalancerStats(4, 2, 2)
    assert [(port(k), h) for h, k in ring.entries] == [  # Envoy UnevenHosts
        (80, 5454692015285649509),
        (81, 7859399908942313493),
        (80, 13838424394637650569),
        (81, 16064866803292627174),
    ]
    moved = RingHash({"127.0.0.1:81": 1, "127.0.0.1:82": 1}, minimum_ring_size=3)
    assert [(port(k), h) for h, k in moved.entries] == [
        (81, 7859399908942313493),
        (82, 8241336090459785962),
        (82, 12882406409176325258),
        (81, 16064866803292627174),
    ]


def test_weights_1_2_3_on_a_ring_of_exactly_6() -> None:
    weights = {"127.0.0.1:90": 1, "127.0.0.1:91": 2, "127.0.0.1:92": 3}
    ring = RingHash(weights, minimum_ring_size=6, maximum_ring_size=6)
    assert ring.stats == BalancerStats(6, 1, 3)
    assert Counter(port(k) for _, k in ring.entries) == {90: 1, 91: 2, 92: 3}
    expected = {  # Envoy HostWeightedTinyRing
        928266305478181108: 92,
        4443673547860492590: 92,
        5583722120771150861: 91,
        6311230543546372928: 91,
        13444792449719432967: 92,
        16117243373044804889: 90,
    }
    assert {h: port(k) for h, k in ring.entries} == expected


def test_weighted_large_ring_distribution_matches_envoy_counts() -> None:
    weights = {"127.0.0.1:90": 1, "127.0.0.1:91": 2, "127.0.0.1:92": 3}
    ring = RingHash(weights, minimum_ring_size=6144)
    assert ring.stats == BalancerStats(6144, 1024, 3072)
    step = MAX64 // 6000
    counts = Counter(port(ring.pick(i * step)) for i in range(6000))
    assert counts == {90: 987, 91: 1932, 92: 3081}  # Envoy HostWeightedLargeRing


def test_fractional_scales_match_envoy() -> None:
    two = RingHash({"127.0.0.1:90": 1, "127.0.0.1:91": 1}, 1023, 1023)
    assert two.stats == BalancerStats(1023, 511, 512)
    step = MAX64 // 1023
    assert Counter(port(two.pick(i * step)) for i in range(1023)) == {90: 526, 91: 497}

    four = RingHash({f"127.0.0.1:{p}": 1 for p in range(90, 94)}, 2, 2)
    assert four.stats == BalancerStats(2, 0, 1)
    hit = {four.pick(i * (MAX64 // 1024)) for i in range(1024)}
    assert len(hit) == 2  # two hosts got no point at all
    assert sum(four.share(k) for k in four.hosts) == pytest.approx(1.0)
    assert sorted(four.share(k) > 0 for k in four.hosts) == [False, False, True, True]


def test_float_running_sum_can_push_one_more_point_than_the_size_gauge() -> None:
    # 99 equal hosts: scale = 11 / (1/99) is a hair above 1089 in doubles, so the first host's
    # target is 11.000000000000002 and it gets a 12th point. Envoy does the same arithmetic.
    weights = {f"10.0.0.{i}:80": 1 for i in range(1, 100)}
    ring = RingHash(weights)
    assert ring.stats == BalancerStats(1089, 11, 12)
    assert len(ring) == 1090
    assert ring.entries == tuple(ref_ring(weights, 1024, 8388608))


# ------------------------------------------------------------------------------------------------
# Ring hash: lookup boundaries against the literal ketama port
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_ring", [1, 3, 12, 100])
def test_every_ring_boundary(min_ring: int) -> None:
    ring = RingHash(PORTS_90_95, minimum_ring_size=min_ring)
    entries = list(ring.entries)
    for i, (h, key) in enumerate(entries):
        nxt = entries[(i + 1) % len(entries)][1]  # the last entry's successor is entry 0
        prev = entries[i - 1][0] if i else -1
        assert ring.pick(h) == key  # a point owns its own position...
        if h - 1 > prev:
            assert ring.pick(h - 1) == key  # ...and the arc just before it
        assert ring.pick(h + 1) == nxt  # one past belongs to the next entry (wrapping)
        for probe in (h - 1, h, h + 1):
            if 0 <= probe <= MAX64:
                assert ring.pick(probe) == ketama_choose(entries, probe)
    # Past the last point wraps to the first; 0 lands on the first.
    assert ring.pick(entries[-1][0] + 1) == entries[0][1]
    assert ring.pick(MAX64) == entries[0][1]
    assert ring.pick(0) == entries[0][1]


def test_pick_agrees_with_ketama_on_random_hashes_and_attempts() -> None:
    weights = {f"10.1.{i}.7:8080": 1 + i % 3 for i in range(17)}
    ring = RingHash(weights, minimum_ring_size=200)
    entries = list(ring.entries)
    assert entries == ref_ring(weights, 200, 8388608)
    rng = random.Random(7)
    for _ in range(3000):
        h = rng.getrandbits(64)
        attempt = rng.choice([0, 0, 1, 2, 5, 1000])
        assert ring.pick(h, attempt) == ketama_choose(entries, h, attempt)


def test_pick_on_a_ring_whose_buckets_are_bisected() -> None:
    # 2**20 entries share 2**16 buckets (16 a bucket): picks bisect inside the bucket.
    ring = RingHash({"a:1": 1, "b:1": 1, "c:1": 1}, minimum_ring_size=2**20)
    entries = list(ring.entries)
    assert len(entries) > 8 * 2**16
    rng = random.Random(11)
    probes = [rng.getrandbits(64) for _ in range(2000)]
    for i in rng.sample(range(len(entries)), 500):
        h = entries[i][0]
        probes += [h - 1, h, h + 1]
    for h in probes:
        if 0 <= h <= MAX64:
            assert ring.pick(h) == ketama_choose(entries, h)


def test_ring_with_one_point_owns_everything() -> None:
    ring = RingHash({"only:1": 1}, minimum_ring_size=1)
    assert len(ring) == 1
    assert {ring.pick(h) for h in (0, 1, MAX64 // 2, MAX64)} == {"only:1"}
    assert ring.pick(123, attempt=7) == "only:1"
    assert ring.share("only:1") == 1.0


def test_ring_share_is_the_exact_arc() -> None:
    ring = RingHash(PORTS_90_95, minimum_ring_size=12)
    arcs = Counter[str]()
    prev = ENVOY_BASIC_RING[-1][1] - 2**64
    for p, h in ENVOY_BASIC_RING:
        arcs[f"127.0.0.1:{p}"] += h - prev
        prev = h
    for key in PORTS_90_95:
        assert ring.share(key) == arcs[key] / 2**64
    assert sum(ring.share(k) for k in ring.hosts) == pytest.approx(1.0, abs=1e-12)
    assert ring.share("127.0.0.1:99") == 0.0


# ------------------------------------------------------------------------------------------------
# Keys: IPv6 and hostnames
# ------------------------------------------------------------------------------------------------


def test_ipv6_and_hostname_keys_hash_their_text() -> None:
    weights = {"[::1]:8080": 1, "[fd00::2]:8080": 1, "api-0.api.default.svc.cluster.local": 1}
    ring = RingHash(weights, minimum_ring_size=9)
    assert Counter(k for _, k in ring.entries) == dict.fromkeys(weights, 3)
    points = {h for h, _ in ring.entries}
    assert points == {xxh64(f"{k}_{i}") for k in weights for i in range(3)}
    assert xxh64("[::1]:8080_0") in points  # bracketed, as Envoy's Address::asString prints it

    table = Maglev(weights, table_size=13)
    assert table.table == tuple(ref_maglev(weights, 13))
    assert set(table.table) == set(weights)


# ------------------------------------------------------------------------------------------------
# Maglev
# ------------------------------------------------------------------------------------------------


def test_design_maglev_example() -> None:
    table = Maglev(PORTS_90_95, table_size=7)
    assert [port(k) for k in table.table] == [92, 94, 90, 91, 95, 90, 93]
    assert table.stats == BalancerStats(7, 1, 2)
    for h in range(21):  # Envoy Basic: hashes 0..20 walk the table three times
        assert table.pick(h) == table.table[h % 7]


def test_maglev_with_hostnames_matches_envoy() -> None:
    table = Maglev({str(p): 1 for p in range(90, 96)}, table_size=7)
    assert table.table == ("92", "95", "90", "93", "94", "91", "90")


def test_maglev_retry_attempts_match_envoy() -> None:
    table = Maglev(PORTS_90_95, table_size=7)
    # BasicWithRetryHostPredicate: hash 10 -> slot 3 (:91); attempt 1 -> :90; attempt 2 -> :95.
    assert [port(table.pick(10, k)) for k in range(3)] == [91, 90, 95]
    for k in range(1, 50):
        assert table.pick(10, k) == table.table[(10 ^ (2**64 - k)) % 7]


def test_maglev_order_of_weights_does_not_matter() -> None:
    keys = list(PORTS_90_95)
    random.Random(3).shuffle(keys)
    shuffled = Maglev(dict.fromkeys(keys, 1), table_size=7)
    assert shuffled.table == Maglev(PORTS_90_95, table_size=7).table
    assert shuffled.hosts == tuple(keys)  # hosts keeps the caller's order


def test_maglev_weights_1_2_at_17() -> None:
    weights = {"127.0.0.1:90": 1, "127.0.0.1:91": 2}
    table = Maglev(weights, table_size=17)
    expected = [91, 90, 90, 91, 90, 91, 91, 90, 91, 91, 91, 91, 91, 90, 91, 90, 91]  # Envoy
    assert [port(k) for k in table.table] == expected
    assert list(table.table) == ref_maglev(weights, 17)
    assert Counter(port(k) for k in table.table) == {90: 6, 91: 11}
    assert table.stats == BalancerStats(17, 6, 11)
    assert table.share("127.0.0.1:90") == 6 / 17
    assert table.share("127.0.0.1:91") == 11 / 17
    assert table.share("127.0.0.1:92") == 0.0


def test_maglev_matches_reference_on_random_weighted_sets() -> None:
    rng = random.Random(11)
    for m in (101, 1009, 4099):
        weights = {f"10.2.{i}.{rng.randrange(256)}:{rng.randrange(1, 65536)}": 0 for i in range(9)}
        weights = {k: rng.randint(1, 7) for k in weights}
        assert list(Maglev(weights, table_size=m).table) == ref_maglev(weights, m)


def test_maglev_single_host_is_degenerate_like_envoy() -> None:
    table = Maglev({"127.0.0.1:90": 7}, table_size=17)
    assert table.stats == BalancerStats(17, 1, 1)  # Envoy WeightedSingleHost
    assert {table.pick(h, a) for h in range(40) for a in range(3)} == {"127.0.0.1:90"}
    assert table.share("127.0.0.1:90") == 1.0


def test_maglev_default_table_over_100_hosts_builds_fast_and_even() -> None:
    weights = {f"10.3.{i // 200}.{i % 200}:8080": 1 for i in range(100)}
    start = time.perf_counter()
    table = Maglev(weights)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    assert len(table) == DEFAULT_TABLE_SIZE
    # Equal weights take turns round-robin, so counts are floor or ceil of M / N.
    assert table.stats == BalancerStats(65537, 655, 656)
    assert sum(table.share(k) for k in weights) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Hash function choice, protocol, errors
# ------------------------------------------------------------------------------------------------


def test_murmur_rings_build_and_differ_from_xxhash() -> None:
    xx = RingHash(PORTS_90_95, minimum_ring_size=60)
    m2 = RingHash(PORTS_90_95, minimum_ring_size=60, hash_function="MURMUR_HASH_2")
    m3 = RingHash(PORTS_90_95, minimum_ring_size=60, hash_function="MURMUR3")
    assert len(xx) == len(m2) == len(m3) == 60
    assert {h for h, _ in m2.entries} == {
        murmur2_64(f"{k}_{i}".encode()) for k in PORTS_90_95 for i in range(10)
    }
    assert {h for h, _ in m3.entries} == {
        murmur3_64(f"{k}_{i}".encode()) for k in PORTS_90_95 for i in range(10)
    }
    positions = [{h for h, _ in r.entries} for r in (xx, m2, m3)]
    assert not (positions[0] & positions[1]) and not (positions[0] & positions[2])
    assert xx.hash_function == "XX_HASH" and m3.hash_function == "MURMUR3"


def test_both_satisfy_the_balancer_protocol() -> None:
    ring: Balancer = RingHash(PORTS_90_95, minimum_ring_size=12)
    table: Balancer = Maglev(PORTS_90_95, table_size=7)
    for b in (ring, table):
        assert b.hosts == tuple(PORTS_90_95)
        assert b.pick(12345) in b.hosts
        assert isinstance(b.stats, BalancerStats)
    with pytest.raises(AttributeError):
        ring.stats.size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, "weights: empty"),
        ({"a:1": 0}, "weight of 'a:1' must be a positive integer, got 0"),
        ({"a:1": -2}, "weight of 'a:1' must be a positive integer, got -2"),
        ({"": 1}, "endpoint key must be a non-empty string, got ''"),
        ({"a:1": 2**32 - 1, "b:1": 1}, "sum of weights 4294967296 exceeds 4294967295"),
    ],
)
def test_bad_weights(weights: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RingHash(weights)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        Maglev(weights, table_size=7)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"minimum_ring_size": 20, "maximum_ring_size": 10},
            r"ring hash: minimum_ring_size \(20\) > maximum_ring_size \(10\)",  # Envoy's text
        ),
        ({"minimum_ring_size": 0}, "minimum_ring_size must be at least 1, got 0"),
        ({"minimum_ring_size": -5}, "minimum_ring_size must be at least 1, got -5"),
        ({"maximum_ring_size": 8388609}, r"maximum_ring_size \(8388609\) exceeds the limit"),
        ({"hash_function": "SHA1"}, "unknown hash_function 'SHA1'.*XX_HASH, MURMUR_HASH_2"),
        ({"hash_function": "xx_hash"}, "unknown hash_function 'xx_hash'"),
    ],
)
def test_bad_ring_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RingHash(PORTS_90_95, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (8, "maglev: table_size 8 is not a prime number"),
        (65535, "maglev: table_size 65535 is not a prime number"),
        (1, "maglev: table_size 1 is not a prime number"),
        (0, "maglev: table_size 0 is not a prime number"),
        (5000023, "maglev: table_size 5000023 exceeds the limit 5000011"),
    ],
)
def test_bad_maglev_table_size(size: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Maglev(PORTS_90_95, table_size=size)  # type: ignore[arg-type]


COMPILED = hashing.__file__ is not None and hashing.__file__.endswith(".so")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        # The wrong types are the point: what a caller that mypy does not check would pass.
        (lambda: RingHash({"a:1": 1.5}), "weight of 'a:1' must be a positive integer, got 1.5"),  # type: ignore[dict-item]
        (lambda: Maglev({"a:1": "3"}, 7), "weight of 'a:1' must be a positive integer, got '3'"),  # type: ignore[dict-item]
        (lambda: RingHash(PORTS_90_95, 2.0), "minimum_ring_size must be an integer, got 2.0"),  # type: ignore[arg-type]
        (lambda: Maglev(PORTS_90_95, 7.0), "maglev: table_size must be an integer, got 7.0"),  # type: ignore[arg-type]
    ],
)
def test_wrong_types_are_refused(build: Callable[[], object], message: str) -> None:
    # Interpreted, the checks above name the value; compiled (setup.py), mypyc refuses the
    # argument at the call with a TypeError before any of our code runs.
    if COMPILED:
        with pytest.raises(TypeError, match="object expected; got"):
            build()
    else:
        with pytest.raises(ValueError, match=message):
            build()


@pytest.mark.skipif(COMPILED, reason="compiled, a bool argument arrives as the int it is")
def test_bool_weight_is_refused_interpreted() -> None:
    with pytest.raises(ValueError, match="weight of 'a:1' must be a positive integer, got True"):
        RingHash({"a:1": True})
