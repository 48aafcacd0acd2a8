"""Micro-benchmark and quality figures for proxy.hashing (not a test).

    .venv/bin/python bench/hashing.py [--keys 100000] [--picks 200000]

Part 1, speed: build time and picks per second of RingHash(min 1024), RingHash(min 16384) and
Maglev(65537) over 3, 100 and 1000 equal-weight endpoints. A pick is the hot-path call
``balancer.pick(hash)`` on a precomputed random 64-bit hash.

Part 2, quality: over ``--keys`` random request hashes, for N = 3, 10, 100 endpoints:
max/mean load (ideal 1), keys moved when one endpoint is removed or one is added as a multiple
of the ideal 1/N (resp. 1/(N+1)), and the percentage of all keys that moved between endpoints
that stayed (ideal 0). The figures come from ``measure()`` in tests/test_hashing_properties.py,
the same function the property tests check.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_hashing_properties import endpoint_keys, measure, random_hashes  # noqa: E402

from proxy.hashing import Balancer, Maglev, RingHash  # noqa: E402

Build = Callable[[Mapping[str, int]], Balancer]

KINDS: list[tuple[str, Build]] = [
    ("RingHash(1024)", lambda w: RingHash(w, minimum_ring_size=1024)),
    ("RingHash(16384)", lambda w: RingHash(w, minimum_ring_size=16384)),
    ("Maglev(65537)", lambda w: Maglev(w, table_size=65537)),
]


def _best_build(build: Build, weights: Mapping[str, int], repeat: int) -> tuple[float, Balancer]:
    best = float("inf")
    balancer: Balancer | None = None
    for _ in range(repeat):
        start = time.perf_counter()
        balancer = build(weights)
        best = min(best, time.perf_counter() - start)
    assert balancer is not None
    return best, balancer


def _picks_per_second(balancer: Balancer, hashes: Sequence[int], repeat: int = 3) -> float:
    pick = balancer.pick
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for h in hashes:
            pick(h)
        best = min(best, time.perf_counter() - start)
    return len(hashes) / best


def speed(picks: int) -> None:
    hashes = random_hashes(picks, seed=42)
    print("Speed (best of 3; CPython", sys.version.split()[0] + ")")
    header = (
        f"{'balancer':<16} {'N':>5} {'entries':>9} {'build ms':>9} {'picks/s':>11} {'ns/pick':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, build in KINDS:
        for n in (3, 100, 1000):
            weights = dict.fromkeys(endpoint_keys(n, seed=n), 1)
            build_s, balancer = _best_build(build, weights, repeat=3)
            rate = _picks_per_second(balancer, hashes)
            entries = len(balancer)  # type: ignore[arg-type]
            print(
                f"{name:<16} {n:>5} {entries:>9} {build_s * 1e3:>9.1f} "
                f"{rate:>11,.0f} {1e9 / rate:>8.0f}"
            )
    print()


def quality(keys: int) -> None:
    hashes = random_hashes(keys, seed=7)
    print(f"Balance and disruption ({keys:,} random keys; equal weights; removed = endpoint N//2)")
    header = (
        f"{'balancer':<16} {'N':>4} {'max/mean':>9} {'remove x1/N':>12} {'among surv.':>12} "
        f"{'add x1/(N+1)':>13} {'among exist.':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, build in KINDS:
        for n in (3, 10, 100):
            f = measure(build, endpoint_keys(n, seed=n), hashes)
            print(
                f"{name:<16} {n:>4} {f.max_over_mean:>9.3f} {f.remove_vs_ideal:>12.3f} "
                f"{f.moved_between_survivors:>11.2%} {f.add_vs_ideal:>13.3f} "
                f"{f.moved_between_existing:>12.2%}"
            )
    print()
    print(
        "remove/add columns: keys moved as a multiple of the ideal (1.000 = only the keys of the\n"
        "endpoint that left/arrived). 'among' columns: % of all keys that moved between endpoints\n"
        "present before and after (ideal 0). Envoy's ring gives each endpoint ceil(min_ring/N)\n"
        "points, so a change of N usually changes every survivor's count and moves keys among them."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keys", type=int, default=100_000, help="request hashes for part 2")
    parser.add_argument("--picks", type=int, default=200_000, help="picks timed per balancer")
    args = parser.parse_args(argv)
    speed(args.picks)
    quality(args.keys)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
