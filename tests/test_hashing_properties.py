"""Balance and disruption of RingHash and Maglev, as properties over 3..100 endpoints.

``measure()`` is a plain function (no hypothesis) that bench/hashing.py reuses for its table.
All load figures are taken over random unsigned 64-bit request hashes, the way real traffic
lands; the bounds below state their tolerance and where it comes from.

What the figures show (and the tests pin down):

* Maglev (M = 65537): slot counts differ by at most one between equal endpoints, so the load
  spread is sampling noise; removing or adding one endpoint moves ~1/N of the keys plus a small
  fraction that moves between endpoints that stayed (measured <= 0.6 % for N <= 100).
* Ring hash: every key that changes endpoint is explained by a ring point that appeared or
  disappeared -- the consistent-hashing property -- so when the surviving endpoints keep their
  points, exactly the removed endpoint's keys move. But Envoy sizes the ring with
  ``ceil(min_ring / N)`` points per endpoint, so a change of N usually changes every survivor's
  count and the new points take keys from other survivors: on Envoy's defaults a removal moves
  up to ~8x the ideal 1/N (N = 94, min ring 1024). Parity with Envoy keeps this behaviour.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.hashing import Balancer, Maglev, RingHash

Build = Callable[[Mapping[str, int]], Balancer]

KEYS = 20_000  # request hashes per example: sampling sd of a 1/N share is sqrt(N / KEYS)
SIGMAS = 5.0  # every statistical bound below is mean +- 5 sd (derandomized runs, no flakes)
MAGLEV_M = 65537
MAGLEV_SURVIVOR_BOUND = 0.01  # fraction of all keys; measured max 0.006 for N <= 100, M = 65537


# ------------------------------------------------------------------------------------------------
# The figures (plain functions, reused by bench/hashing.py)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """Balance and disruption of one balancer kind over ``n`` equal-weight endpoints.

    Fractions are of all request keys. Ideal: ``max_over_mean`` 1, ``moved_on_remove`` 1/n,
    ``moved_on_add`` 1/(n+1), the two ``*_between_*`` figures 0.
    """

    n: int
    keys: int
    max_over_mean: float
    moved_on_remove: float
    moved_between_survivors: float  # on remove: from one remaining endpoint to another
    moved_on_add: float
    moved_between_existing: float  # on add: moved, but not to the new endpoint

    @property
    def remove_vs_ideal(self) -> float:
        return self.moved_on_remove * self.n

    @property
    def add_vs_ideal(self) -> float:
        return self.moved_on_add * (self.n + 1)


def endpoint_keys(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct "ip:port" keys, deterministic for a seed."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        out[f"{ip}:{rng.choice((80, 8080, 9000))}"] = None
    return list(out)


def random_hashes(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(count)]


def measure(
    build: Build,
    endpoints: Sequence[str],
    hashes: Sequence[int],
    removed: int | None = None,
    added: str = "added.example:8080",
) -> Figures:
    """Build over ``endpoints`` (weight 1), without ``endpoints[removed]``, and with ``added``."""
    n = len(endpoints)
    gone = endpoints[n // 2 if removed is None else removed]
    base = build(dict.fromkeys(endpoints, 1))
    before = [base.pick(h) for h in hashes]
    loads = Counter(before)
    k = len(hashes)

    smaller = build({e: 1 for e in endpoints if e != gone})
    after = [smaller.pick(h) for h in hashes]
    moved = survivors = 0
    for x, y in zip(before, after, strict=True):
        if x != y:
            moved += 1
            survivors += x != gone

    larger = build({**dict.fromkeys(endpoints, 1), added: 1})
    grown = [larger.pick(h) for h in hashes]
    moved_add = existing = 0
    for x, y in zip(before, grown, strict=True):
        if x != y:
            moved_add += 1
            existing += y != added

    return Figures(
        n=n,
        keys=k,
        max_over_mean=max(loads.get(e, 0) for e in endpoints) / (k / n),
        moved_on_remove=moved / k,
        moved_between_survivors=survivors / k,
        moved_on_add=moved_add / k,
        moved_between_existing=existing / k,
    )


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------

_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
_label = st.from_regex(r"[a-z][a-z0-9-]{0,12}(\.[a-z][a-z0-9-]{0,8}){0,2}", fullmatch=True)
ADDED = "[fd00::add]:8080"


@st.composite
def endpoint_lists(draw: st.DrawFn, min_n: int = 3, max_n: int = 100) -> list[str]:
    """n distinct keys mixing "ipv4:port", "[ipv6]:port" and hostnames. Distinct by
    construction (port base + i, "pod-i." prefix) so hypothesis never retries duplicates."""
    n = draw(st.integers(min_n, max_n))
    base = draw(st.integers(1, 65535 - max_n))
    out = []
    for i in range(n):
        kind = draw(st.sampled_from(("v4", "v6", "name")))
        if kind == "name":
            out.append(f"pod-{i}.{draw(_label)}")
        else:
            out.append(f"{draw(_ipv4 if kind == 'v4' else _ipv6)}:{base + i}")
    return out


PROPS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _sd(n: int, keys: int = KEYS, points: float = math.inf) -> float:
    """Relative sd of one endpoint's load: sampling (N/keys) plus arc spread (1/points)."""
    return math.sqrt(n / keys + 1 / points)


def _points(ring: RingHash) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for h, k in ring.entries:
        out.setdefault(k, set()).add(h)
    return out


# ------------------------------------------------------------------------------------------------
# Balance
# ------------------------------------------------------------------------------------------------


@PROPS
@given(endpoint_lists(), st.integers(0, 2**32))
def test_ring_balance(endpoints: list[str], seed: int) -> None:
    """max/mean <= 1 + 5 sd, sd = sqrt(N/keys + 1/k): k points per endpoint, each endpoint's
    arc total is ~Gamma(k)/k, so its relative spread is 1/sqrt(k)."""
    ring = RingHash(dict.fromkeys(endpoints, 1), minimum_ring_size=16384)
    n = len(endpoints)
    loads = Counter(ring.pick(h) for h in random_hashes(KEYS, seed))
    k = ring.stats.min_entries_per_host
    assert k >= 16384 // n
    max_over_mean = max(loads.values()) / (KEYS / n)
    assert max_over_mean <= 1 + SIGMAS * _sd(n, points=k), (n, k, max_over_mean)
    assert math.isclose(sum(ring.share(e) for e in endpoints), 1.0)


@PROPS
@given(endpoint_lists(), st.integers(0, 2**32))
def test_maglev_balance(endpoints: list[str], seed: int) -> None:
    """Equal endpoints take turns, so slot counts are floor/ceil(M/N); only sampling remains:
    max/mean <= 1 + N/M + 5 sqrt(N/keys)."""
    table = Maglev(dict.fromkeys(endpoints, 1), table_size=MAGLEV_M)
    n = len(endpoints)
    assert table.stats.max_entries_per_host - table.stats.min_entries_per_host <= 1
    loads = Counter(table.pick(h) for h in random_hashes(KEYS, seed))
    max_over_mean = max(loads.values()) / (KEYS / n)
    assert max_over_mean <= 1 + n / MAGLEV_M + SIGMAS * _sd(n), (n, max_over_mean)


@PROPS
@given(
    st.lists(st.integers(1, 5), min_size=3, max_size=100),
    st.integers(0, 2**32),
)
def test_maglev_weighted_slots_follow_weights(weights: list[int], seed: int) -> None:
    """Each endpoint's slot count is within 2 + N*w/W of M*w/W. After R rounds endpoint i has
    claimed R*w_i/w_max + t_i slots, 0 < t_i <= 1 (its first claim is in round 1); the t_j of all
    N endpoints are spread over the table in proportion w_i/W; the last round may be partial."""
    eps = endpoint_keys(len(weights), seed)
    w = dict(zip(eps, weights, strict=True))
    total = sum(weights)
    table = Maglev(w, table_size=MAGLEV_M)
    for e, we in w.items():
        expected = MAGLEV_M * we / total
        slots = table.share(e) * MAGLEV_M
        assert abs(slots - expected) <= 2 + len(w) * we / total, (e, we, slots, expected)


# ------------------------------------------------------------------------------------------------
# Disruption: ring
# ------------------------------------------------------------------------------------------------


@PROPS
@given(endpoint_lists(), st.data())
def test_ring_removal_moves_only_the_removed_endpoints_keys(
    endpoints: list[str], data: st.DataObject
) -> None:
    """With min ring c*(N-1), c < N, every endpoint has c points before and after a removal
    (ceil(c(N-1)/N) == c), so the survivors' points are unchanged and the ring is consistent:
    0 keys move between survivors; moved * N is 1 within 5 sd, sd = sqrt(N/keys + 1/c)."""
    n = len(endpoints)
    c = data.draw(st.integers(1, n - 1), label="points per endpoint")
    gone = data.draw(st.integers(0, n - 1), label="removed index")
    seed = data.draw(st.integers(0, 2**32), label="seed")
    build = partial(RingHash, minimum_ring_size=c * (n - 1))
    before = RingHash(dict.fromkeys(endpoints, 1), minimum_ring_size=c * (n - 1))
    after = RingHash(
        {e: 1 for e in endpoints if e != endpoints[gone]}, minimum_ring_size=c * (n - 1)
    )
    old, new = _points(before), _points(after)
    # The float running sums may still hand one endpoint an extra point; those cases are the
    # general property's (next test), not this one's.
    assume(all(old.get(e) == new.get(e) for e in endpoints if e != endpoints[gone]))

    fig = measure(build, endpoints, random_hashes(KEYS, seed), removed=gone, added=ADDED)
    assert fig.moved_between_survivors == 0
    removed_share = before.share(endpoints[gone])
    assert abs(fig.moved_on_remove - removed_share) <= SIGMAS * math.sqrt(removed_share / KEYS)
    assert abs(fig.remove_vs_ideal - 1) <= SIGMAS * _sd(n, points=c) + 1 / c


@PROPS
@given(endpoint_lists(), st.data())
def test_ring_addition_moves_only_keys_to_the_new_endpoint(
    endpoints: list[str], data: st.DataObject
) -> None:
    """Mirror image: min ring c*N, c <= N keeps c points per endpoint for N and N+1 endpoints."""
    n = len(endpoints)
    c = data.draw(st.integers(1, n), label="points per endpoint")
    seed = data.draw(st.integers(0, 2**32), label="seed")
    size = c * n
    before = RingHash(dict.fromkeys(endpoints, 1), minimum_ring_size=size)
    after = RingHash({**dict.fromkeys(endpoints, 1), ADDED: 1}, minimum_ring_size=size)
    old, new = _points(before), _points(after)
    assume(all(old.get(e) == new.get(e) for e in endpoints))

    build = partial(RingHash, minimum_ring_size=size)
    fig = measure(build, endpoints, random_hashes(KEYS, seed), added=ADDED)
    assert fig.moved_between_existing == 0
    added_share = after.share(ADDED)
    assert abs(fig.moved_on_add - added_share) <= SIGMAS * math.sqrt(added_share / KEYS)
    assert abs(fig.add_vs_ideal - 1) <= SIGMAS * _sd(n + 1, points=c) + 1 / c


@PROPS
@given(endpoint_lists(), st.integers(1, 16384), st.data())
def test_ring_every_move_is_explained_by_a_changed_point(
    endpoints: list[str], min_ring: int, data: st.DataObject
) -> None:
    """Any ring size: a key changes endpoint only if its old point vanished or a new point now
    comes first -- never because unrelated points were shuffled (exact, per key)."""
    gone = endpoints[data.draw(st.integers(0, len(endpoints) - 1), label="removed index")]
    seed = data.draw(st.integers(0, 2**32), label="seed")
    base = RingHash(dict.fromkeys(endpoints, 1), minimum_ring_size=min_ring)
    variants = [
        RingHash({e: 1 for e in endpoints if e != gone}, minimum_ring_size=min_ring),
        RingHash({**dict.fromkeys(endpoints, 1), ADDED: 1}, minimum_ring_size=min_ring),
    ]
    old_entries = base.entries
    old_set = set(old_entries)
    old_hashes = [h for h, _ in old_entries]
    for other in variants:
        new_entries = other.entries
        new_set = set(new_entries)
        new_hashes = [h for h, _ in new_entries]
        for h in random_hashes(2000, seed):
            was, now = base.pick(h), other.pick(h)
            if was == now:
                continue
            e_old = old_entries[_owner(old_hashes, h)]
            e_new = new_entries[_owner(new_hashes, h)]
            assert e_old not in new_set or e_new not in old_set, (h, e_old, e_new)


def _owner(hashes: list[int], h: int) -> int:
    i = bisect_left(hashes, h)
    return 0 if i == len(hashes) else i


def test_envoy_ring_rescaling_moves_keys_between_survivors() -> None:
    """Documented Envoy behaviour, kept for parity: 94 -> 93 endpoints at min ring 1024 takes
    every survivor from 11 to 12 points (1024/94 = 10.9, 1024/93 = 11.01), and the new points
    take ~1/12 of all keys from other survivors -- about 8x the ideal 1/N of moved keys."""
    endpoints = endpoint_keys(94, seed=94)
    before = RingHash(dict.fromkeys(endpoints, 1))
    after = RingHash({e: 1 for e in endpoints if e != endpoints[47]})
    assert before.stats.max_entries_per_host == 11
    assert after.stats.min_entries_per_host == 12
    fig = measure(RingHash, endpoints, random_hashes(KEYS, 1), removed=47)
    assert fig.moved_between_survivors > 4 / 94
    assert 5 < fig.remove_vs_ideal < 11


# ------------------------------------------------------------------------------------------------
# Disruption: Maglev
# ------------------------------------------------------------------------------------------------


@PROPS
@given(endpoint_lists(), st.data())
def test_maglev_disruption(endpoints: list[str], data: st.DataObject) -> None:
    """Remove/add one endpoint at M = 65537: keys of the changed endpoint move (1/N, 1/(N+1)
    within 5 sampling sd + N/M), and at most 1 % of all keys move between endpoints that stayed
    (Maglev is near-minimal, not minimal; measured max 0.6 % for N <= 100)."""
    n = len(endpoints)
    gone = data.draw(st.integers(0, n - 1), label="removed index")
    seed = data.draw(st.integers(0, 2**32), label="seed")
    fig = measure(
        lambda w: Maglev(w, table_size=MAGLEV_M),
        endpoints,
        random_hashes(KEYS, seed),
        removed=gone,
        added=ADDED,
    )
    assert fig.moved_between_survivors <= MAGLEV_SURVIVOR_BOUND
    assert fig.moved_between_existing <= MAGLEV_SURVIVOR_BOUND
    own_remove = (fig.moved_on_remove - fig.moved_between_survivors) * n
    own_add = (fig.moved_on_add - fig.moved_between_existing) * (n + 1)
    tol = SIGMAS * _sd(n + 1) + (n + 1) / MAGLEV_M
    assert abs(own_remove - 1) <= tol, fig
    assert abs(own_add - 1) <= tol, fig
