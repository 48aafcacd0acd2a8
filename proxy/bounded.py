"""Bounded load: consistent hashing with a cap on any one endpoint's share of the requests.

Theory
------
A ring or Maglev table sends a key to the same endpoint whatever that endpoint is doing, so a
few hot keys can pile onto one pod. Envoy's ``hash_balance_factor`` (Mirrokni et al.,
"Consistent Hashing with Bounded Loads", arXiv 1608.01350) keeps the hash's choice unless that
endpoint is overloaded, and only then looks elsewhere. sticky-proxy reads it from the
``sticky-proxy/hash-balance-factor`` annotation of a DestinationRule (Istio does not expose it);
this module is Envoy's ``BoundedLoadHashingLoadBalancer`` (``thread_aware_lb_impl.cc``), exactly:

* with ``A`` requests in flight in the whole cluster (not counting the one being placed) and a
  factor ``f`` (a percentage, at least 100), the cluster has
  ``total_slots = ((A + 1) * f + 99) // 100`` slots (uint32 arithmetic);
* an endpoint of normalised weight ``w`` (``weight / sum of weights``) gets
  ``slots = max(ceil(total_slots * w), 1)`` of them, and is *overloaded* when its own requests in
  flight exceed its slots; its overload factor is ``active / slots``;
* the hashed endpoint is used unless it is overloaded. Then the endpoints are visited in a random
  order *seeded by the hash* (a Fisher-Yates shuffle driven by ``std::mt19937(hash)``, so a key
  always probes the same sequence and two replicas agree), the first one not overloaded wins,
  and when every endpoint is overloaded the least overloaded one does (the hashed one on ties).

So no endpoint holds more than about ``f / 100`` times its weighted share of the requests in
flight, and a key stays on its hashed endpoint whenever that endpoint is under its cap: when the
load goes, every key is back where the ring puts it. The probe is O(N) in endpoints, but only
for requests whose endpoint is full.

``std::mt19937`` is reproduced here (``Mt19937``): seeded with ``init_genrand`` from the low 32
bits of the hash (Python's ``random`` module seeds through ``init_by_array`` instead, so it
cannot be used), tempered 32-bit outputs, and Envoy's rejection-sampling ``uniform_int``.

"In flight" is the caller's count: ``proxy.dispatch`` passes each endpoint's busy upstream
connections (one request each on HTTP/1.1: Envoy's ``rq_active``, attached requests only) and
their sum over the cluster (``upstream_rq_active``). With ``--workers N`` each worker counts its
own requests, as each would need shared memory to do otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Final, Protocol

_MASK32: Final = 0xFFFFFFFF
_N: Final = 624
_M: Final = 397
_SPACE32: Final = 1 << 32
MIN_FACTOR: Final = 100  # Envoy's validation: hash_balance_factor >= 100


class Mt19937:
    """``std::mt19937``: the 32-bit Mersenne Twister, seeded as its one-integer constructor."""

    __slots__ = ("_i", "_mt")

    def __init__(self, seed: int) -> None:
        mt = [0] * _N
        x = seed & _MASK32  # the engine keeps seed mod 2**32
        mt[0] = x
        for i in range(1, _N):
            x = (1812433253 * (x ^ (x >> 30)) + i) & _MASK32
            mt[i] = x
        self._mt = mt
        self._i = _N

    def _twist(self) -> None:
        mt = self._mt
        for i in range(_N):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % _N] & 0x7FFFFFFF)
            value = mt[(i + _M) % _N] ^ (y >> 1)
            if y & 1:
                value ^= 0x9908B0DF
            mt[i] = value
        self._i = 0

    def __call__(self) -> int:
        """The next output, 0 .. 2**32 - 1."""
        if self._i >= _N:
            self._twist()
        y = self._mt[self._i]
        self._i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & _MASK32


def uniform_int(random: Mt19937, k: int) -> int:
    """Envoy's ``uniform_int``: a uniform value in ``[0, k)`` by rejection sampling."""
    bucket = _SPACE32 // k
    x = k
    while x >= k:
        x = random() // bucket
    return x


class HashPick(Protocol):
    """A ring or Maglev table: the endpoint owning a hash (``proxy.hashing``)."""

    def pick(self, hash: int, attempt: int = 0) -> str: ...


Load = Callable[[str], int]
"""Requests in flight on one endpoint, by endpoint key."""


class BoundedLoad:
    """Envoy's ``hash_balance_factor`` over ``balancer`` (built from the same ``weights``).

    ``weights`` is the ordered mapping the balancer was built from: its order is Envoy's host
    order, which decides the shuffle's starting permutation.

    >>> from proxy.hashing import RingHash, xxh64
    >>> weights = {"10.0.0.1:80": 1, "10.0.0.2:80": 1}
    >>> bounded = BoundedLoad(RingHash(weights, 16), weights, factor=125)
    >>> bounded.choose(xxh64("key"), lambda key: 0, 0)[1]
    False
    """

    __slots__ = ("_keys", "_weight_of", "_weights", "balancer", "factor")

    def __init__(self, balancer: HashPick, weights: Mapping[str, int], factor: int) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < MIN_FACTOR:
            raise ValueError(f"hash_balance_factor must be an integer >= {MIN_FACTOR}: {factor!r}")
        if not weights:
            raise ValueError("bounded load needs at least one endpoint")
        total = sum(weights.values())
        self.balancer = balancer
        self.factor = factor
        self._keys: list[str] = list(weights)
        # Envoy's normalized_host_weights_: weight * 1.0 / sum, in doubles.
        self._weights: list[float] = [w / total for w in weights.values()]
        self._weight_of: dict[str, float] = dict(zip(self._keys, self._weights, strict=True))

    def overload(self, key: str, active: int, total_active: int) -> float:
        """``hostOverloadFactor``: the endpoint's requests over its slots (> 1.0: overloaded)."""
        return active / self._slots(self._weight_of[key], total_active)

    def _slots(self, weight: float, total_active: int) -> int:
        total_slots = (((total_active + 1) * self.factor + 99) & _MASK32) // 100
        return max(math.ceil(total_slots * weight) & _MASK32, 1)

    def choose(
        self, hash: int, load: Load, total_active: int, attempt: int = 0
    ) -> tuple[str, bool]:
        """(endpoint, spilled): the hashed endpoint, or where a full one's request goes instead.

        ``load(key)`` is an endpoint's requests in flight, ``total_active`` the cluster's.
        """
        host = self.balancer.pick(hash, attempt)
        least = self.overload(host, load(host), total_active)
        if least <= 1.0:
            return host, False
        keys = self._keys
        weights = self._weights
        chosen = host
        for k in probe_order(hash, len(keys)):
            candidate = keys[k]
            if candidate == host:
                continue
            factor = load(candidate) / self._slots(weights[k], total_active)
            if factor <= 1.0:
                return candidate, True
            if least > factor:
                chosen = candidate
                least = factor
        return chosen, chosen != host


def probe_order(hash: int, n: int) -> Iterator[int]:
    """Host indices in the order an overloaded key probes them: a Fisher-Yates shuffle of
    ``0 .. n-1`` drawn lazily from ``std::mt19937(hash)`` (Envoy's test: hash 2, 5 hosts ->
    2 1 0 4 3)."""
    order = list(range(n))
    random = Mt19937(hash)
    for i in range(n):
        j = uniform_int(random, n - i)
        order[i], order[i + j] = order[i + j], order[i]
        yield order[i]
