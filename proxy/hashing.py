"""Consistent hashing, bit for bit as Envoy (and so Istio) does it. Pure: no I/O, no clocks.

Theory of operation
===================

A sticky session is a function ``hash(request) -> endpoint`` that every proxy replica computes
the same way and that changes as little as possible when the endpoint set changes. The request
side of the hash (cookie, header, source IP) lives in ``proxy/affinity.py``; this module owns the
64-bit hash functions and the two structures Envoy maps a hash onto. All hashes are unsigned
64-bit integers, ``0 .. 2**64 - 1``.

Ring hash (Envoy ``RING_HASH``, Karger et al.; lookup ported from libketama)
----------------------------------------------------------------------------
Every endpoint is placed on a circle of 2**64 positions many times ("ring points", "virtual
nodes"). Point ``i`` of endpoint ``key`` sits at ``hash(f"{key}_{i}")``: the key is the address
text Envoy prints (``127.0.0.1:8080``, ``[::1]:8080``) or the hostname with
``use_hostname_for_hashing``. A request hash ``h`` belongs to the first point clockwise, i.e. the
first point whose position is ``>= h``; past the last point it wraps to the first. Each endpoint
therefore owns the arcs that end at its points, and removing an endpoint hands its arcs to the
next points clockwise while every other arc stays where it was.

How many points: weights are normalised to ``w / sum(w)`` (a float, in Envoy's exact operation
order, so rounding matches), then ``scale = min(ceil(min_w * min_ring) / min_w, max_ring)`` makes
the lightest endpoint get a whole number of points. Endpoints are walked *in the given order*
with two running float sums, ``target += scale * w`` and ``while current < target: push point;
current += 1``, so fractional shares carry over to the next endpoint instead of being rounded
per endpoint. The points are then sorted by position only (Envoy's ``std::sort`` on the hash);
two points with the same 64-bit position are left in Python's stable order, where Envoy's
unstable sort leaves them in an unspecified order -- a collision needs two equal xxh64 values
among a few thousand strings, odds around 2**-40, and is documented rather than emulated.

Consequence worth knowing (it is Envoy's, kept for parity): the per-endpoint point count
``ceil(min_ring / N)`` depends on ``N``, so when an endpoint leaves, the survivors may *gain*
points and those new points take keys from other survivors. The ring is strictly minimal-
disruption only when the survivors' counts stay the same (see ``tests/test_hashing_properties.py``
and ``bench/hashing.py`` for the measured figures).

Retries: ``attempt`` k (Envoy's retry host predicate) returns the entry ``k`` places further
round the ring, ``(index + k) % ring_size`` -- it may be the same endpoint again.

Maglev (Envoy ``MAGLEV``, Eisenbud et al., NSDI 2016, pseudocode listing 1)
---------------------------------------------------------------------------
A lookup table of ``M`` slots; a request goes to ``table[h % M]`` -- one modulo, no search.
Each endpoint gets a permutation of the slots, ``(offset + skip * j) % M`` for ``j = 0, 1, ...``,
with ``offset = xxh64(key, seed=0) % M`` and ``skip = xxh64(key, seed=1) % (M - 1) + 1``.
Endpoints, sorted by key so the result does not depend on discovery order, take turns claiming
the next still-empty slot of their permutation until the table is full. Weights enter through the
turn rule: in round ``r`` (1, 2, ...) an endpoint takes a turn when ``r * w >= target`` and then
raises ``target`` by the largest normalised weight, so the heaviest endpoint claims every round
and one with a third of its weight every third round.

Why ``M`` must be prime: ``skip`` is in ``1 .. M-1``, and ``j -> offset + skip * j (mod M)``
visits every slot exactly once only when ``gcd(skip, M) == 1``. With ``M`` prime that holds for
every skip, so each permutation is a full permutation and the fill always terminates. Envoy
rejects a non-prime size ("The table size of maglev must be prime number"); so do we. ``M``
should be much larger than the endpoint count (the paper uses 65537) so every endpoint's share
is close to ``1/N``: Maglev trades a little disruption on membership change (a few keys move
between survivors) for near-perfect balance.

Retries: Envoy's Maglev does not walk the table; attempt ``k > 0`` looks up
``table[(h ^ (2**64 - k)) % M]`` ("a value with most bits set" so retries scatter).

Parity
------
Everything above follows ``source/extensions/load_balancing_policies/ring_hash/ring_hash_lb.cc``,
``maglev/maglev_lb.cc``, ``common/thread_aware_lb_impl.cc`` (weight normalisation) and
``source/common/common/hash.{h,cc}`` (xxHash64, MurmurHash2). ``tests/test_hashing.py`` checks
the rings and tables printed in Envoy's own unit tests. ``MURMUR3`` is *not* an Envoy option; it
is offered for interoperability (mmh3's 128-bit x64 hash, first 64 bits, seed 0) and is labelled
as an extension wherever it appears.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import mmh3
import xxhash

__all__ = [
    "DEFAULT_MAX_RING_SIZE",
    "DEFAULT_MIN_RING_SIZE",
    "DEFAULT_TABLE_SIZE",
    "HASH_FUNCTIONS",
    "MASK64",
    "MAX_RING_SIZE",
    "MAX_TABLE_SIZE",
    "Balancer",
    "BalancerStats",
    "Maglev",
    "RingHash",
    "combine_hashes",
    "is_prime",
    "murmur2_64",
    "murmur3_64",
    "xxh64",
]

MASK64: Final = (1 << 64) - 1
_SPACE: Final = 1 << 64

# Envoy's defaults and the limits its API validation enforces (ring_hash.proto, maglev.proto).
DEFAULT_MIN_RING_SIZE: Final = 1024
DEFAULT_MAX_RING_SIZE: Final = 8_388_608
MAX_RING_SIZE: Final = 8_388_608
DEFAULT_TABLE_SIZE: Final = 65537
MAX_TABLE_SIZE: Final = 5_000_011
# validateEndpoints() in thread_aware_lb_impl.cc: the sum of weights must fit a uint32.
_MAX_TOTAL_WEIGHT: Final = (1 << 32) - 1

# std::hash<std::string> seed in libstdc++, which Envoy's MurmurHash2 reuses.
_MURMUR2_SEED: Final = 0xC70F6907
_MURMUR2_MUL: Final = 0xC6A4A7935BD1E995


# --------------------------------------------------------------------------------------------
# Hash functions
# --------------------------------------------------------------------------------------------


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


_xxh64_intdigest: Final = xxhash.xxh64_intdigest  # compiled, a module attribute is a lookup


def xxh64(data: bytes | str, seed: int = 0) -> int:
    """XXH64 (Envoy's ``HashUtil::xxHash64``); ``str`` is hashed as its UTF-8 bytes."""
    return _xxh64_intdigest(_as_bytes(data), seed)


def murmur2_64(data: bytes | str, seed: int = _MURMUR2_SEED) -> int:
    """Envoy's ``MurmurHash::murmurHash2`` (64-bit MurmurHash2 as in libstdc++'s hash_bytes.cc).

    Eight-byte little-endian blocks are mixed, then the 1..7 tail bytes are loaded little-endian
    into one word and mixed once more; the final avalanche is two ``v ^ (v >> 47)`` shift-mixes.
    """
    buf = _as_bytes(data)
    mul = _MURMUR2_MUL
    n = len(buf)
    aligned = n & ~7
    h = (seed ^ (n * mul)) & MASK64
    from_bytes = int.from_bytes
    for p in range(0, aligned, 8):
        k = (from_bytes(buf[p : p + 8], "little") * mul) & MASK64
        k = ((k ^ (k >> 47)) * mul) & MASK64
        h = ((h ^ k) * mul) & MASK64
    if n & 7:
        h = ((h ^ from_bytes(buf[aligned:], "little")) * mul) & MASK64
    h = ((h ^ (h >> 47)) * mul) & MASK64
    return h ^ (h >> 47)


def murmur3_64(data: bytes | str) -> int:
    """MurmurHash3 x64-128, first 64 bits, seed 0, unsigned (``mmh3.hash64(...)[0]``).

    Not an Envoy hash function: an extension for rings that must agree with other MurmurHash3
    based clients. The low half of the 128-bit digest is the conventional 64-bit reduction.
    """
    return mmh3.hash64(_as_bytes(data), signed=False)[0]


def combine_hashes(old: int | None, new: int) -> int:
    """Fold one more hash-policy result into the running hash, as Envoy's HashPolicyImpl does.

    The old value is rotated left by one before the XOR so that two identical policies do not
    cancel each other out; ``None`` (no hash yet) counts as 0.
    """
    if old is None:
        return new & MASK64
    return (((old << 1) | (old >> 63)) & MASK64) ^ (new & MASK64)


HASH_FUNCTIONS: Final[Mapping[str, Callable[[bytes], int]]] = {
    "XX_HASH": xxh64,
    "MURMUR_HASH_2": murmur2_64,
    "MURMUR3": murmur3_64,  # extension, not an Envoy option
}


def is_prime(n: int) -> bool:
    """Deterministic trial division; table sizes are at most ~5e6, so sqrt(n) <= ~2237."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


# --------------------------------------------------------------------------------------------
# Shared shape
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BalancerStats:
    """Envoy's per-balancer gauges, under neutral names.

    ============================  ==================================  ===========================
    field                         ring hash (``ring_hash_lb.*``)      Maglev (``maglev_lb.*``)
    ============================  ==================================  ===========================
    ``size``                      ``size`` = ``ceil(scale)``          table size ``M``
    ``min_entries_per_host``      ``min_hashes_per_host``             ``min_entries_per_host``
    ``max_entries_per_host``      ``max_hashes_per_host``             ``max_entries_per_host``
    ============================  ==================================  ===========================
    """

    size: int
    min_entries_per_host: int
    max_entries_per_host: int


class Balancer(Protocol):
    """What a consistent-hash balancer offers the cluster and the admin pages."""

    @property
    def hosts(self) -> tuple[str, ...]: ...

    @property
    def stats(self) -> BalancerStats: ...

    def pick(self, hash: int, attempt: int = 0) -> str: ...

    def share(self, key: str) -> float: ...


def _normalized_weights(weights: Mapping[str, int]) -> tuple[list[str], list[float]]:
    """Validate, then ``w / sum`` per host in the given order (normalizeHostWeights)."""
    if not weights:
        raise ValueError("weights: empty; a balancer needs at least one endpoint")
    keys: list[str] = []
    raw: list[int] = []
    for key, w in weights.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"endpoint key must be a non-empty string, got {key!r}")
        if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
            raise ValueError(f"weight of {key!r} must be a positive integer, got {w!r}")
        keys.append(key)
        raw.append(w)
    total = sum(raw)
    if total > _MAX_TOTAL_WEIGHT:
        raise ValueError(f"sum of weights {total} exceeds {_MAX_TOTAL_WEIGHT} (uint32, as Envoy)")
    # Envoy: host->weight() * normalized_locality_weight(1.0) / sum, in doubles. Python's
    # int / int is correctly rounded, which equals double(w) * 1.0 / double(sum) for these sizes.
    return keys, [w / total for w in raw]


# --------------------------------------------------------------------------------------------
# Ring hash
# --------------------------------------------------------------------------------------------


class RingHash:
    """Envoy's ketama ring. ``weights`` is an ordered mapping endpoint key -> positive weight.

    The order of ``weights`` matters (as in Envoy, which walks hosts in host-set order): it
    decides which endpoint receives a fractional leftover point.

    >>> ring = RingHash({"10.0.0.1:80": 1, "10.0.0.2:80": 1}, minimum_ring_size=16)
    >>> ring.pick(xxh64("session-42")) in ring.hosts
    True
    """

    __slots__ = (
        "_arcs",
        "_buckets",
        "_hashes",
        "_hosts",
        "_keys",
        "_n",
        "_shift",
        "_stats",
        "hash_function",
    )

    def __init__(
        self,
        weights: Mapping[str, int],
        minimum_ring_size: int = DEFAULT_MIN_RING_SIZE,
        maximum_ring_size: int = DEFAULT_MAX_RING_SIZE,
        hash_function: str = "XX_HASH",
    ) -> None:
        hash_fn = HASH_FUNCTIONS.get(hash_function)
        if hash_fn is None:
            raise ValueError(
                f"ring hash: unknown hash_function {hash_function!r} "
                f"(expected one of {', '.join(HASH_FUNCTIONS)})"
            )
        _check_ring_sizes(minimum_ring_size, maximum_ring_size)
        keys, normalized = _normalized_weights(weights)
        self.hash_function = hash_function
        self._hosts = tuple(keys)

        min_w = min(normalized)
        # Same float operations, same order, as Ring::Ring: ceil(double * uint64) / double,
        # then std::min with the maximum converted to double.
        scale = min(
            math.ceil(min_w * minimum_ring_size) / min_w,
            float(maximum_ring_size),
        )
        ring_size = math.ceil(scale)

        points: list[tuple[int, str]] = []
        push = points.append
        current = 0.0
        target = 0.0
        min_per_host = ring_size
        max_per_host = 0
        for key, w in zip(keys, normalized, strict=True):
            prefix = f"{key}_"
            target += scale * w
            i = 0
            while current < target:
                push((hash_fn(f"{prefix}{i}".encode()), key))
                i += 1
                current += 1
            min_per_host = min(i, min_per_host)
            max_per_host = max(i, max_per_host)

        points.sort(key=_hash_of)  # on the hash only; stable where Envoy's std::sort is not
        self._hashes = [h for h, _ in points]
        self._keys = [k for _, k in points]
        self._n = len(points)
        self._stats = BalancerStats(ring_size, min_per_host, max_per_host)
        self._arcs: dict[str, int] | None = None
        self._shift, self._buckets = _bucket_index(self._hashes)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Endpoint keys in the order given (including any that got no point)."""
        return self._hosts

    @property
    def stats(self) -> BalancerStats:
        """Envoy's ``ring_hash_lb.size`` / ``min_hashes_per_host`` / ``max_hashes_per_host``.

        ``size`` is Envoy's gauge, ``ceil(scale)``; ``len(ring)`` is the number of points
        actually pushed, which the float running sums can make differ from it by one.
        """
        return self._stats

    @property
    def entries(self) -> tuple[tuple[int, str], ...]:
        """The sorted ring as ``(position, key)`` pairs (for tests and the admin page)."""
        return tuple(zip(self._hashes, self._keys, strict=True))

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (
            f"RingHash({len(self._hosts)} hosts, {self._n} points, "
            f"hash_function={self.hash_function})"
        )

    def pick(self, hash: int, attempt: int = 0) -> str:
        """The endpoint owning ``hash`` (unsigned 64-bit); ``attempt`` k walks k entries on.

        Equivalent to Envoy's ketama binary search: the first entry with position >= hash,
        index 0 when hash is past the last entry. The search starts from the hash's bucket
        (see ``_bucket_index``), which holds about one entry; bisecting the whole ring would
        compare a dozen 64-bit Python ints.
        """
        hashes = self._hashes
        if 0 <= hash < _SPACE:
            b = hash >> self._shift
            i = self._buckets[b]
            end = self._buckets[b + 1]
            if end - i > _SCAN:
                i = bisect_left(hashes, hash, i, end)
            else:
                while i < end and hashes[i] < hash:
                    i += 1
        else:
            i = bisect_left(hashes, hash)
        if i == self._n:
            i = 0
        if attempt:
            i = (i + attempt) % self._n
        return self._keys[i]

    def share(self, key: str) -> float:
        """Fraction of the 2**64 hash space whose lookups land on ``key`` (0.0 if absent)."""
        arcs = self._arcs
        if arcs is None:
            arcs = self._arcs = self._compute_arcs()
        return arcs.get(key, 0) / _SPACE

    def _compute_arcs(self) -> dict[str, int]:
        # Entry i owns (hash[i-1], hash[i]]; entry 0 also owns everything past the last entry,
        # so its arc is hash[0] - hash[-1] + 2**64 (the full circle when there is one entry).
        arcs = dict.fromkeys(self._hosts, 0)
        hashes, keys = self._hashes, self._keys
        prev = hashes[-1] - _SPACE
        for h, k in zip(hashes, keys, strict=True):
            arcs[k] += h - prev
            prev = h
        return arcs


# Entries a pick walks one by one before it bisects its bucket instead.
_SCAN: Final = 8
# 2**16 buckets at most: 64k list slots for the largest rings (Envoy allows 8M entries).
_MAX_BUCKET_BITS: Final = 16


def _bucket_index(hashes: list[int]) -> tuple[int, list[int]]:
    """Split the hash space into 2**k equal buckets, k about log2(len(hashes)), so about one
    entry falls in each; returns (64 - k, first) where first[b] is the index of the first
    entry at or past bucket b's start (first[2**k] == len(hashes)). The entry owning a hash
    in bucket b is then among first[b] .. first[b + 1]."""
    bits = max(1, min(_MAX_BUCKET_BITS, len(hashes).bit_length()))
    shift = 64 - bits
    first: list[int] = []
    i = 0
    n = len(hashes)
    for b in range((1 << bits) + 1):
        start = b << shift
        while i < n and hashes[i] < start:
            i += 1
        first.append(i)
    return shift, first


def _hash_of(point: tuple[int, str]) -> int:
    return point[0]


def _check_ring_sizes(minimum: int, maximum: int) -> None:
    for name, value in (("minimum_ring_size", minimum), ("maximum_ring_size", maximum)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"ring hash: {name} must be an integer, got {value!r}")
        if value > MAX_RING_SIZE:
            raise ValueError(f"ring hash: {name} ({value}) exceeds the limit {MAX_RING_SIZE}")
    if minimum < 1:
        raise ValueError(f"ring hash: minimum_ring_size must be at least 1, got {minimum}")
    if minimum > maximum:
        # Envoy's own wording (RingHashLoadBalancer constructor).
        raise ValueError(
            f"ring hash: minimum_ring_size ({minimum}) > maximum_ring_size ({maximum})"
        )


# --------------------------------------------------------------------------------------------
# Maglev
# --------------------------------------------------------------------------------------------


class Maglev:
    """Envoy's Maglev lookup table of prime size ``table_size`` over weighted endpoints.

    >>> table = Maglev({"10.0.0.1:80": 1, "10.0.0.2:80": 2}, table_size=17)
    >>> table.stats.size, sorted(table.hosts) == sorted(set(table.table))
    (17, True)
    """

    __slots__ = ("_counts", "_hosts", "_m", "_stats", "_table")

    def __init__(self, weights: Mapping[str, int], table_size: int = DEFAULT_TABLE_SIZE) -> None:
        m = table_size
        if isinstance(m, bool) or not isinstance(m, int):
            raise ValueError(f"maglev: table_size must be an integer, got {m!r}")
        if m > MAX_TABLE_SIZE:
            raise ValueError(f"maglev: table_size {m} exceeds the limit {MAX_TABLE_SIZE}")
        if not is_prime(m):
            raise ValueError(f"maglev: table_size {m} is not a prime number (it must be prime)")
        keys, normalized = _normalized_weights(weights)
        self._hosts = tuple(keys)
        self._m = m

        # Envoy sorts (key, host, weight) tuples; keys are unique here, so the key decides.
        # Bytes order == std::string_view order (unsigned char compare) for any UTF-8 text.
        order = sorted(range(len(keys)), key=lambda j: keys[j].encode())
        skeys = [keys[j] for j in order]
        sweights = [normalized[j] for j in order]

        if len(skeys) == 1:
            # Newer Envoy builds a "degenerate" table for one host (every slot is that host) and
            # reports 1 entry for it; the routing is the same either way.
            self._table = [skeys[0]] * m
            self._counts = {skeys[0]: m}
            self._stats = BalancerStats(m, 1, 1)
            return

        offsets = [xxh64(k.encode()) % m for k in skeys]
        skips = [xxh64(k.encode(), 1) % (m - 1) + 1 for k in skeys]
        slots, counts = _maglev_fill(offsets, skips, sweights, max(normalized), m)
        self._table = [skeys[i] for i in slots]
        self._counts = dict(zip(skeys, counts, strict=True))
        self._stats = BalancerStats(m, min(counts), max(counts))

    @property
    def hosts(self) -> tuple[str, ...]:
        """Endpoint keys in the order given (the table itself is built in sorted order)."""
        return self._hosts

    @property
    def stats(self) -> BalancerStats:
        """Envoy's table size and ``maglev_lb.min_entries_per_host`` / ``max_entries_per_host``."""
        return self._stats

    @property
    def table(self) -> tuple[str, ...]:
        """Slot -> endpoint key, ``M`` entries (for tests and the admin page)."""
        return tuple(self._table)

    def __len__(self) -> int:
        return self._m

    def __repr__(self) -> str:
        return f"Maglev({len(self._hosts)} hosts, table_size={self._m})"

    def pick(self, hash: int, attempt: int = 0) -> str:
        """``table[hash % M]``; retry ``attempt`` k > 0 first XORs the hash with ``2**64 - k``."""
        if attempt:
            hash ^= _SPACE - attempt  # Envoy: hash ^= ~0ULL - attempt + 1
        return self._table[hash % self._m]

    def share(self, key: str) -> float:
        """Fraction of the table's slots owned by ``key`` (0.0 if absent)."""
        return self._counts.get(key, 0) / self._m


def _maglev_fill(
    offsets: list[int], skips: list[int], weights: list[float], max_weight: float, m: int
) -> tuple[list[int], list[int]]:
    """OriginalMaglevTable::constructImplementationInternals, as a tight CPython loop.

    Returns (slot -> host index, claims per host). Instead of recomputing
    ``(offset + skip * next) % m`` per probe, ``pos`` keeps each host's current permutation
    value and advances by ``skip`` with a conditional subtract (both terms are below ``m``).
    """
    n = len(offsets)
    table = [-1] * m
    pos = list(offsets)
    targets = [0.0] * n
    counts = [0] * n
    filled = 0
    iteration = 1
    hosts = range(n)
    while filled < m:
        for i in hosts:
            # A host claims in round r when r * w >= its target (floats, as Envoy).
            if iteration * weights[i] < targets[i]:
                continue
            targets[i] += max_weight
            c = pos[i]
            s = skips[i]
            while table[c] >= 0:
                c += s
                if c >= m:
                    c -= m
            table[c] = i
            c += s
            if c >= m:
                c -= m
            pos[i] = c
            counts[i] += 1
            filled += 1
            if filled == m:
                break
        iteration += 1
    return table, counts
