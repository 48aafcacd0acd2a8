"""Retry plans: a VirtualService ``retries`` policy, precomputed once per route.

The request path (``proxy.http1``, whose docstring says what is retried, when and where)
decides on a response status with one set lookup and on a reset or connect failure with one
flag, so everything Envoy's router derives from ``retryOn`` is derived here when a route is
built: the status set (5xx expanded, 409 for retriable-4xx, the bare codes), whether connect
failures and resets count, the per-try timeout, the back-off base and how much body may be held
for a replay.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Final

from proxy.config import RetryPolicy

# retryOn conditions (bits of RetryPlan.on)
RETRY_5XX: Final = 1
RETRY_GATEWAY_ERROR: Final = 2
RETRY_RESET: Final = 4
RETRY_CONNECT_FAILURE: Final = 8
RETRY_RESET_BEFORE_REQUEST: Final = 16
RETRY_RETRIABLE_4XX: Final = 32
RETRY_STATUS_CODES: Final = 64
_RETRY_ON_BITS: Final = {
    "5xx": RETRY_5XX,
    "gateway-error": RETRY_GATEWAY_ERROR,
    "reset": RETRY_RESET,
    "connect-failure": RETRY_CONNECT_FAILURE,
    "reset-before-request": RETRY_RESET_BEFORE_REQUEST,
    "retriable-4xx": RETRY_RETRIABLE_4XX,
    "retriable-status-codes": RETRY_STATUS_CODES,
}
_ON_RESET: Final = RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RESET
_ON_CONNECT: Final = _ON_RESET | RETRY_CONNECT_FAILURE | RETRY_RESET_BEFORE_REQUEST
REPLAY_LIMIT: Final = 64 * 1024
# RFC 9110 §9.2.2: methods whose repetition has the effect of one request.
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
BACKOFF_BASE: Final = 0.025  # Envoy's default base retry interval


class RetryPlan:
    """A route's retry policy, precomputed for the request path (see ``proxy.http1``).

    ``statuses`` holds every response status that triggers a retry (5xx expanded, 409 for
    retriable-4xx, the bare codes), so deciding costs one set lookup per response.

        plan = RetryPlan.from_policy(RetryPolicy())   # Istio's default: 2 attempts, 503
    """

    __slots__ = (
        "attempts",
        "backoff",
        "explicit",
        "on",
        "on_connect",
        "on_reset",
        "other_hosts",
        "per_try_timeout",
        "replay_limit",
        "statuses",
    )

    def __init__(
        self,
        attempts: int,
        on: int,
        codes: Iterable[int] = (),
        *,
        per_try_timeout: float | None = None,
        other_hosts: bool = False,
        backoff: float = BACKOFF_BASE,
        replay_limit: int = REPLAY_LIMIT,
        explicit: bool = True,
    ) -> None:
        if attempts < 0 or replay_limit < 0 or backoff < 0:
            raise ValueError("attempts, replay_limit and backoff must be >= 0")
        if per_try_timeout is not None and per_try_timeout <= 0:
            raise ValueError("per_try_timeout must be > 0")
        self.attempts = attempts
        self.on = on
        statuses: set[int] = set()
        if on & RETRY_5XX:
            statuses.update(range(500, 600))
        if on & RETRY_GATEWAY_ERROR:
            statuses.update((502, 503, 504))
        if on & RETRY_RETRIABLE_4XX:
            statuses.add(409)
        if on & RETRY_STATUS_CODES:
            statuses.update(codes)
        self.statuses = frozenset(statuses)
        self.on_connect = bool(on & _ON_CONNECT)
        self.on_reset = bool(on & _ON_RESET)  # resets, protocol errors and per-try timeouts
        self.per_try_timeout = per_try_timeout
        self.other_hosts = other_hosts
        self.backoff = backoff
        self.replay_limit = replay_limit
        # Asked for in the VirtualService: non-idempotent requests are resent too (see http1).
        self.explicit = explicit

    def __repr__(self) -> str:
        return (
            f"<RetryPlan attempts={self.attempts} on={self.on:#x} "
            f"statuses={sorted(self.statuses)[:8]} per_try={self.per_try_timeout}>"
        )

    @classmethod
    def from_policy(cls, policy: RetryPolicy | None) -> RetryPlan | None:
        """None when the route does not retry (``attempts: 0``)."""
        if policy is None or policy.attempts <= 0:
            return None
        on = 0
        for token in policy.retry_on:
            on |= _RETRY_ON_BITS.get(token, 0)
        return cls(
            policy.attempts,
            on,
            policy.retriable_status_codes,
            per_try_timeout=policy.per_try_timeout,
            other_hosts=policy.retry_previous_hosts,
            backoff=policy.backoff if policy.backoff else BACKOFF_BASE,
            explicit=policy.explicit,
        )

    def may_resend(self, method: bytes) -> bool:
        """Whether a request that may have reached the pod can be sent again under this plan."""
        return self.explicit or method in IDEMPOTENT

    def connect_retries(self, endpoints: int) -> int:
        """How many connect failures may move on to another endpoint (``endpoints`` in all)."""
        return min(self.attempts, endpoints - 1) if self.on_connect else 0

    def delay(self, retry: int) -> float:
        """Envoy's fully jittered exponential back-off before retry number ``retry`` (1, 2...)."""
        cap = min(self.backoff * (1 << min(retry - 1, 16)), 10 * self.backoff)
        return random.random() * cap


_plans: dict[int, tuple[RetryPolicy, RetryPlan | None]] = {}


def retry_plan(policy: RetryPolicy | None) -> RetryPlan | None:
    """:meth:`RetryPlan.from_policy`, memoised per policy object (routes are built once).

    Keyed by identity: hashing a frozen dataclass costs a tuple of its fields on every call.
    The entry keeps its policy alive, so an id is never reused while it is cached.
    """
    if policy is None:
        return None
    hit = _plans.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    if len(_plans) > 4096:
        _plans.clear()  # old configs after many reloads
    plan = RetryPlan.from_policy(policy)
    _plans[id(policy)] = (policy, plan)
    return plan
