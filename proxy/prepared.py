"""A route decision prepared for the request path: computed once per distinct decision.

``proxy.dispatch`` turns each ``RouteDecision`` it meets into a ``Prepared`` once (the route
cache keeps it) and then reads only its attributes per request: the cluster runtime, the
affinity, the rewritten target and authority, header edits, timeout and retry plan.

A route that uses a feature of sessions that survive change (a persistent session, a cluster
with bounded load, a sticky weighted split) gets an ``Extended`` as well and no ``crt``: the
dispatcher's common path finds no cluster and hands the request to its second path, which reads
``ext``. A sticky split prepares each of its destinations as a part (``Extended.parts``) and
picks among them by the request's hash, as Envoy's ``pickClusterIndex`` does with
``use_hash_policy``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from proxy.exchange import HeaderEdit
from proxy.retry import retry_plan
from proxy.sessions import PersistentSession
from proxy.steering import with_removed

if TYPE_CHECKING:
    from proxy.cluster import Balancer
    from proxy.retry import RetryPlan
    from proxy.routing import RouteDecision
    from proxy.runtime import ClusterRuntime, Runtime


class Prepared:
    """What a route decision means for the request path, computed once per distinct decision."""

    __slots__ = (
        "affinity",
        "authority",
        "cluster",
        "crt",
        "ext",
        "plan",
        "reply",
        "request_headers",
        "response_headers",
        "target",
        "timeout",
    )

    def __init__(self, decision: RouteDecision, runtime: Runtime, *, part: bool = False) -> None:
        self.reply = decision.local_reply
        self.cluster = decision.cluster or ""
        # Valid as long as the runtime is: a reload makes new Prepared objects.
        self.crt: ClusterRuntime | None = runtime.clusters.get(self.cluster)
        # Istio puts the hash policy on the route (a weighted split folds every destination's
        # policy into one key), so the route's affinity decides, not the cluster's.
        self.affinity = decision.action.affinity
        self.target = decision.path.encode("latin-1") if decision.rewrites_path else None
        self.authority = decision.authority
        self.request_headers = decision.request_headers
        self.response_headers = decision.response_headers
        self.timeout = decision.timeout
        self.plan = retry_plan(decision.retries)
        self.ext: Extended | None = None
        if part or extends(decision, self.crt):
            # The second path (module docstring): the common one finds no cluster here.
            self.ext = Extended(decision, runtime, self, part)
            self.crt = None


def extends(decision: RouteDecision, crt: ClusterRuntime | None) -> bool:
    """Does this route use a feature of the second path (decided once per route)?"""
    if decision.local_reply is not None:
        return False
    if decision.split is not None or decision.action.persistent is not None:
        return True
    ch = crt.spec.lb.consistent_hash if crt is not None else None
    return ch is not None and ch.hash_balance_factor > 0


class Extended:
    """A route's second-path state: its cluster, persistent session and sticky split."""

    __slots__ = ("crt", "drop_edit", "parts", "persistent", "split")

    def __init__(
        self, decision: RouteDecision, runtime: Runtime, route: Prepared, part: bool
    ) -> None:
        self.crt = route.crt
        persistent = decision.action.persistent
        self.persistent: PersistentSession | None = persistent
        # The header form replaces a header the pod sent when it names a new pod.
        self.drop_edit: HeaderEdit | None = None
        if persistent is not None and not persistent.cookie:
            self.drop_edit = with_removed(route.response_headers, persistent.wire_name)
        split = None if part else decision.split
        self.split = split
        self.parts: tuple[Prepared, ...] = ()
        if split is not None:
            self.parts = tuple(
                Prepared(replace(decision, action=action), runtime, part=True)
                for action in split.actions
            )

    def part_for(self, hash_: int) -> Prepared:
        """The destination a sticky split gives this hash (Envoy's pickClusterIndex)."""
        split = self.split
        assert split is not None
        point = hash_ % split.total
        index = 0
        for upto in split.cumulative:
            if point < upto:
                break
            index += 1
        return self.parts[min(index, len(self.parts) - 1)]

    def part_holding(self, address: str) -> Prepared | None:
        """The destination whose cluster can serve the session's pod, if any."""
        for part in self.parts:
            ext = part.ext
            crt = ext.crt if ext is not None else None
            if crt is not None and address in crt.cluster.snapshot.targets:
                return part
        return None


def connect_retries(plan: RetryPlan | None, balancer: Balancer | None) -> int:
    if plan is None or balancer is None:
        return 0
    return plan.connect_retries(len(balancer.hosts))
