"""The second path's helpers (``proxy.steering``): re-picks, in-flight counts, header edits."""

from __future__ import annotations

from proxy.exchange import HeaderEdit
from proxy.hashing import RingHash, xxh64
from proxy.pool import UpstreamPool
from proxy.steering import in_flight, nth_other, with_removed


def test_nth_other_starts_with_the_keys_own_endpoint_and_skips_the_failed_one() -> None:
    ring = RingHash({f"10.0.0.{i}:80": 1 for i in range(1, 4)}, 64)
    h = xxh64("session")
    own = ring.pick(h)
    # The failed endpoint was not the key's own (a session's pod): the key's own comes first.
    failed = next(key for key in ring.hosts if key != own)
    assert nth_other(ring, h, failed, 1) == own
    # The key's own failed: the next distinct endpoint round the ring, then the last one.
    second = nth_other(ring, h, own, 1)
    third = nth_other(ring, h, own, 2)
    assert len({own, second, third}) == 3
    assert nth_other(ring, h, own, 3) is None  # no fourth endpoint


def test_in_flight_is_busy_connections() -> None:
    pool = UpstreamPool("127.0.0.1", 9)
    assert in_flight(pool) == 0
    pool.connections = 3  # open or opening; none idle
    assert in_flight(pool) == 3


def test_with_removed_keeps_the_route_edits() -> None:
    edit = HeaderEdit(set=((b"x-a", b"1"),), add=((b"x-b", b"2"),), remove=frozenset({b"x-c"}))
    both = with_removed(edit, b"x-session")
    assert both.set == edit.set and both.add == edit.add
    assert both.remove == {b"x-c", b"x-session"}
    assert with_removed(None, b"x-session").drop == {b"x-session"}
