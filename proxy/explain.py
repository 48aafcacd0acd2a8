"""Where would this request go? One answer for ``sticky-proxy route`` and the admin ``/route``.

This module owns the route explainer: a ``Probe`` (a request as the proxy would receive it) goes
through the proxy's own code - ``Router.match`` with the header and query folding of
``proxy.dispatch``, ``Affinity.compute`` for the session hash and the cookie the proxy would
invent, the cluster's balancer for the pick, and, where configured, a sticky split's pick by
hash, the persistent session's value (decoded, its pod's state: healthy, draining, unhealthy or
gone) and bounded load's spill - and comes back as an ``Explanation``, a plain value. The CLI
prints it as ``label: value`` lines (``as_lines``) from the configuration's endpoints; the admin
port serves it as JSON (``as_json``) from the live snapshots; both texts are
``proxy.explain_text``'s. What differs between the two is only where a cluster's endpoints come
from (a ``ClusterView``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

from proxy import explain_text
from proxy.affinity import (
    set_cookie_value,
)
from proxy.bounded import BoundedLoad
from proxy.cluster import Balancer, build_balancer, build_bounded
from proxy.config import ClusterSpec, Config, DnsEndpoints, Endpoint, ListenerSpec
from proxy.dispatch import fold_headers, query_params
from proxy.routing import RouteDecision, Router
from proxy.sessions import ABSENT, NAMED, STATUS_TEXT, PersistentSession

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Probe:
    """A request to explain: Host, target, method, headers and cookies, and its connection.

    ``local`` is the proxy's address of the connection (part of a generated cookie's value);
    None stands for ``127.0.0.1:<listener port>``.
    """

    host: str
    path: str = "/"  # may include ?query
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    cookies: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()  # appended to the path's own query
    client: Address = ("127.0.0.1", 54321)
    local: Address | None = None

    @property
    def target(self) -> str:
        """The request-target in origin form: the path with the query parameters."""
        target = self.path if self.path.startswith("/") else "/" + self.path
        if self.query:
            target += ("&" if "?" in target else "?") + urlencode(self.query, safe="/:@,")
        return target

    def wire_headers(self) -> list[tuple[bytes, bytes]]:
        """The header block as the proxy would parse it: Host first, the cookies as one line."""
        headers = [("host", self.host), *self.headers]
        if self.cookies:
            headers.append(("cookie", "; ".join(f"{n}={v}" for n, v in self.cookies)))
        return [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]


@dataclass(frozen=True, slots=True)
class ClusterView:
    """A cluster as the explainer sees it: its spec and what a request would be balanced over.

    ``endpoints`` are the live healthy ones (admin) or the configured ones (CLI); None when they
    are DNS names, known only at run time. ``balancer`` is None when there is nothing to pick
    from (the proxy answers 503 no healthy upstream).
    """

    spec: ClusterSpec
    endpoints: tuple[Endpoint, ...] | None
    balancer: Balancer | None
    # What a persistent session may name (None: the endpoints), the draining ones with the
    # seconds they have left, the requests in flight per endpoint (None: no load) and the
    # bounded-load balancer.
    targets: frozenset[str] | None = None
    draining: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    load: Mapping[str, int] | None = None
    bounded: BoundedLoad | None = None
    known: frozenset[str] | None = None  # every endpoint, healthy or not (None: the endpoints)

    def is_target(self, address: str) -> bool:
        if self.targets is not None:
            return address in self.targets
        return any(ep.key == address for ep in self.endpoints or ())

    def state_of(self, address: str) -> str:
        """The state of the pod a session names: healthy, draining, unhealthy or gone."""
        left = self.draining.get(address)
        if left is not None:
            return f"draining, {left:.0f}s left"
        if self.is_target(address):
            return "healthy"
        if self.known is not None and address in self.known:
            return "unhealthy"
        return "gone"


def configured_cluster(spec: ClusterSpec) -> ClusterView:
    """The view from the configuration alone: static endpoints, all healthy, no load."""
    endpoints = spec.endpoints
    if isinstance(endpoints, DnsEndpoints):
        return ClusterView(spec, None, None)
    found = endpoints.endpoints
    balancer = build_balancer(spec.lb, found) if found else None
    return ClusterView(spec, found, balancer, bounded=build_bounded(spec.lb, found, balancer))


@dataclass(frozen=True, slots=True)
class SessionNote:
    """What the route's persistent session does with the probe."""

    persistent: PersistentSession
    status: int  # proxy.sessions: ABSENT, NAMED, EXPIRED, BAD_SIGNATURE
    address: str
    expires: int
    covered: bool  # the request path is under the cookie's path
    state: str  # the named pod: "healthy", "draining, 12s left", "unhealthy", "gone", ""
    routed: bool  # the request goes to the pod the value names
    strict_reply: bool  # strict mode answers 503
    set_value: str | None  # the response's new session cookie or header (None: none)

    def value_text(self) -> str:
        if not self.covered:
            return f"none: the path is not under the cookie path {self.persistent.path}"
        text = STATUS_TEXT[self.status]
        if self.status == ABSENT:
            return "absent"
        expiry = f", expires {self.expires}" if self.expires else ""
        if self.address:
            return f"{text}: {self.address}{expiry}"
        return text

    def pod_text(self) -> str:
        if self.routed:
            return f"{self.address} ({self.state}): the request goes there"
        if self.strict_reply:
            return f"{self.address} ({self.state}): strict, the proxy answers 503"
        if self.status == NAMED:
            return f"{self.address} ({self.state}): the balancer picks again"
        return "none: the balancer picks"


@dataclass(frozen=True, slots=True)
class Explanation:
    """What the proxy would do with a ``Probe``, now.

    ``decision`` is None when no route matches (404); ``cluster`` is None for a redirect or a
    direct response, and when the route names a cluster that does not exist (503).
    ``set_cookie`` is the Set-Cookie value the proxy would issue (None: it issues none).
    ``endpoint`` is the pick when it is a function of the hash (a ring or Maglev table and a
    key), None otherwise.
    """

    probe: Probe
    port: int
    local: Address
    listener: ListenerSpec | None
    vhosts: tuple[str, ...]  # the listener's virtual hosts (told when nothing matches)
    decision: RouteDecision | None
    source: str  # the file of the VirtualService that matched
    cluster: ClusterView | None
    hash: int | None
    set_cookie: str | None
    endpoint: str | None
    split: str | None = None  # a sticky split's pick by hash
    session: SessionNote | None = None
    bounded: str | None = None  # bounded load's verdict on the hashed endpoint

    @property
    def request(self) -> str:
        return f"{self.probe.method} http://{self.probe.host}{self.probe.target}"

    @property
    def hash_key(self) -> str | None:
        return f"0x{self.hash:016x}" if self.hash is not None else None

    def as_lines(self) -> list[tuple[str, str]]:
        """(label, text) lines, as ``sticky-proxy route`` prints them."""
        return explain_text.lines(self)

    def as_json(self) -> tuple[int, dict[str, Any]]:
        """(status, answer) as the admin ``/route`` serves them; 404 when no route matches."""
        return explain_text.as_json(self)


def explain(
    config: Config,
    router: Router,
    probe: Probe,
    clusters: Callable[[str], ClusterView | None] | None = None,
) -> Explanation:
    """Route, hash and pick ``probe`` on ``router``'s listener port.

    ``clusters`` finds a cluster's view by name (the admin port passes the live snapshots);
    None reads the endpoints from ``config``.
    """
    local = probe.local or ("127.0.0.1", router.port)
    target = probe.target
    wire = probe.wire_headers()
    decision = router.match(
        probe.host, target, probe.method, fold_headers(wire), query_params(target)
    )
    walk = _Walk(config, probe, wire, local, clusters)
    source = ""
    if decision is not None:
        name = decision.action.virtual_service
        source = next((vs.source for vs in config.virtual_services if vs.key == name), "")
        if decision.local_reply is None:
            decision = walk.run(decision)
    return Explanation(
        probe=probe,
        port=router.port,
        local=local,
        listener=config.listener(router.port),
        vhosts=router.vhosts,
        decision=decision,
        source=source,
        cluster=walk.view,
        hash=walk.hash,
        set_cookie=walk.set_cookie,
        endpoint=walk.endpoint,
        split=walk.split,
        session=walk.note,
        bounded=walk.bounded,
    )


class _Walk:
    """The dispatcher's decision, step by step, for one probe (``proxy.dispatch._extended``)."""

    def __init__(
        self,
        config: Config,
        probe: Probe,
        wire: list[tuple[bytes, bytes]],
        local: Address,
        clusters: Callable[[str], ClusterView | None] | None,
    ) -> None:
        self.config = config
        self.probe = probe
        self.wire = wire
        self.local = local
        self.clusters = clusters
        self.view: ClusterView | None = None
        self.hash: int | None = None
        self.hashed = False
        self.set_cookie: str | None = None
        self.endpoint: str | None = None
        self.split: str | None = None
        self.note: SessionNote | None = None
        self.bounded: str | None = None

    def view_of(self, name: str) -> ClusterView | None:
        if self.clusters is not None:
            return self.clusters(name)
        spec = self.config.clusters.get(name)
        return configured_cluster(spec) if spec is not None else None

    def compute_hash(self, decision: RouteDecision) -> None:
        self.hashed = True
        affinity = decision.action.affinity
        if affinity is not None:
            target = self.probe.target.encode("latin-1")
            self.hash, generated = affinity.compute(
                self.wire, target, self.probe.client, self.local
            )
            policy = affinity.cookie_policy
            if generated is not None and policy is not None:
                self.set_cookie = set_cookie_value(policy, generated)

    def run(self, decision: RouteDecision) -> RouteDecision:
        persistent = decision.action.persistent
        now = time.time()
        status, address, expires, covered = ABSENT, "", 0, True
        if persistent is not None:
            covered = persistent.applies(self.probe.target.encode("latin-1"))
            if covered:
                address, expires, status = persistent.read(self.wire, now)
        split = decision.split
        if split is not None:
            decision = self.pick_split(decision, split, address if status == NAMED else "")
        view = self.view = self.view_of(decision.cluster or "")
        if view is None:
            return decision
        if persistent is not None:
            routed = status == NAMED and view.is_target(address)
            self.note = SessionNote(
                persistent,
                status,
                address,
                expires,
                covered,
                view.state_of(address) if status == NAMED else "",
                routed,
                status == NAMED and not routed and persistent.strict,
                None,
            )
            if routed:
                self.endpoint = address
                return decision
            if self.note.strict_reply:
                return decision
        if not self.hashed:
            self.compute_hash(decision)
        hash_ = self.hash
        hashing = view.spec.lb.consistent_hash is not None
        if view.balancer is not None and hashing and hash_ is not None:
            self.endpoint = view.balancer.pick(hash_)
            if view.bounded is not None:
                self.endpoint, self.bounded = _bounded(view, hash_, self.endpoint)
        note = self.note
        named = note.address if note is not None and note.status == NAMED else None
        if note is not None and note.covered and self.endpoint not in (None, named):
            assert self.endpoint is not None
            self.note = replace(note, set_value=note.persistent.value(self.endpoint, now))
        return decision

    def pick_split(self, decision: RouteDecision, split: Any, address: str) -> RouteDecision:
        """A sticky split: the destination holding the session's pod, else by hash."""
        actions = split.actions
        weights = ", ".join(
            f"{_destination_name(a)} {upto - (split.cumulative[i - 1] if i else 0)}"
            for i, (a, upto) in enumerate(zip(actions, split.cumulative, strict=True))
        )
        if address:
            for action in actions:
                view = self.view_of(action.cluster or "")
                if view is not None and view.is_target(address):
                    self.split = f"{action.cluster}: it holds the session's pod ({weights})"
                    return replace(decision, action=action)
        self.compute_hash(decision)
        if self.hash is None:
            chosen = actions[0]
            self.split = f"random per request: no hash key ({weights})"
        else:
            chosen = split.pick(self.hash)
            point = self.hash % split.total
            self.split = f"by hash: {point} of {split.total} -> {chosen.cluster} ({weights})"
        return replace(decision, action=chosen)


def _destination_name(action: Any) -> str:
    dest = action.destination
    return (dest.subset or dest.host) if dest is not None else str(action.cluster)


def _bounded(view: ClusterView, hash_: int, hashed: str) -> tuple[str, str]:
    """(endpoint, verdict) of bounded load at the view's load (none in the CLI)."""
    bounded = view.bounded
    assert bounded is not None
    load = view.load or {}
    total = sum(load.values())
    chosen, spilled = bounded.choose(hash_, lambda key: load.get(key, 0), total)
    where = "now" if view.load is not None else "at zero load (the CLI sees no traffic)"
    factor = f"{bounded.factor}%: no endpoint above {bounded.factor / 100:g}x its share"
    active = load.get(hashed, 0)
    if spilled:
        return chosen, (
            f"{factor}; {hashed} is full {where} ({active} in flight, "
            f"overload {bounded.overload(hashed, active, total):.2f}): spills to {chosen}"
        )
    return chosen, f"{factor}; {hashed} has room {where} ({active} of {total} in flight)"


# --------------------------------------------------------------------------- arguments
def split_pair(text: str, sep: str) -> tuple[str, str] | None:
    """``NAME<sep>VALUE`` -> (name, value); None when malformed. ``:`` (headers) trims both."""
    key, found, value = text.partition(sep)
    if not found or not key.strip():
        return None
    return key.strip(), value.strip() if sep == ":" else value


def address_of(text: str) -> Address | None:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (ip, port); None when malformed."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)
