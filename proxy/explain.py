"""Where would this request go? One answer for ``sticky-proxy route`` and the admin ``/route``.

This module owns the route explainer: a ``Probe`` (a request as the proxy would receive it) goes
through the proxy's own code - ``Router.match`` with the header and query folding of
``proxy.dispatch``, ``Affinity.compute`` for the session hash and the cookie the proxy would
invent, the cluster's balancer for the pick - and comes back as an ``Explanation``, a plain
value. The CLI prints it as ``label: value`` lines (``as_lines``) from the configuration's
endpoints; the admin port serves it as JSON (``as_json``) from the live snapshots. What differs
between the two is only where a cluster's endpoints come from (a ``ClusterView``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from proxy.affinity import (
    CookiePolicy,
    HashPolicy,
    HeaderPolicy,
    QueryParameterPolicy,
    set_cookie_value,
)
from proxy.cluster import Balancer, build_balancer
from proxy.config import ClusterSpec, Config, DnsEndpoints, Endpoint, ListenerSpec
from proxy.dispatch import fold_headers, query_params
from proxy.exchange import HeaderEdit
from proxy.routing import RouteDecision, Router

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


def configured_cluster(spec: ClusterSpec) -> ClusterView:
    """The view from the configuration alone: static endpoints, all healthy."""
    endpoints = spec.endpoints
    if isinstance(endpoints, DnsEndpoints):
        return ClusterView(spec, None, None)
    found = endpoints.endpoints
    return ClusterView(spec, found, build_balancer(spec.lb, found) if found else None)


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

    @property
    def request(self) -> str:
        return f"{self.probe.method} http://{self.probe.host}{self.probe.target}"

    @property
    def hash_key(self) -> str | None:
        return f"0x{self.hash:016x}" if self.hash is not None else None

    def as_lines(self) -> list[tuple[str, str]]:
        """(label, text) lines, as ``sticky-proxy route`` prints them."""
        return _lines(self)

    def as_json(self) -> tuple[int, dict[str, Any]]:
        """(status, answer) as the admin ``/route`` serves them; 404 when no route matches."""
        return _json(self)


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
    view: ClusterView | None = None
    hash_: int | None = None
    set_cookie: str | None = None
    endpoint: str | None = None
    source = ""
    if decision is not None:
        name = decision.action.virtual_service
        source = next((vs.source for vs in config.virtual_services if vs.key == name), "")
        if decision.local_reply is None:
            if clusters is None:
                spec = config.clusters.get(decision.cluster or "")
                view = configured_cluster(spec) if spec is not None else None
            else:
                view = clusters(decision.cluster or "")
    if view is not None and decision is not None:
        affinity = decision.action.affinity
        if affinity is not None:
            hash_, generated = affinity.compute(wire, target.encode("latin-1"), probe.client, local)
            policy = affinity.cookie_policy
            if generated is not None and policy is not None:
                set_cookie = set_cookie_value(policy, generated)
        if view.balancer is not None and view.spec.lb.consistent_hash is not None:
            endpoint = view.balancer.pick(hash_) if hash_ is not None else None
    return Explanation(
        probe=probe,
        port=router.port,
        local=local,
        listener=config.listener(router.port),
        vhosts=router.vhosts,
        decision=decision,
        source=source,
        cluster=view,
        hash=hash_,
        set_cookie=set_cookie,
        endpoint=endpoint,
    )


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


# --------------------------------------------------------------------------- the CLI's text
def _lines(ex: Explanation) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    add = out.append
    if ex.listener is not None:
        gateways = ", ".join(ex.listener.gateways)
        add(("listener", f"{ex.listener.bind}:{ex.port} (Gateway {gateways})"))
    add(("request", ex.request))
    add(("connection", f"client {_fmt(ex.probe.client)} -> proxy {_fmt(ex.local)}"))
    decision = ex.decision
    if decision is None:
        vhosts = ", ".join(ex.vhosts) or "none"
        add(("route", f"none: the proxy answers 404 (no route; virtual hosts: {vhosts})"))
        return out
    action = decision.action
    add(("virtual host", decision.vhost))
    if action.virtual_service:
        add(("VirtualService", f"{action.virtual_service} ({ex.source})"))
        match = f" match[{action.match_index}]" if action.match_index is not None else ""
        name = f" name {action.route_name!r}" if action.route_name else ""
        add(("route", f"http[{action.route_index}]{match}{name}"))
    reply = decision.local_reply
    if reply is not None:
        what = "redirect" if action.redirect is not None else "direct response"
        extra = f" -> {decision.location}" if decision.location else ""
        body = f" body {reply.body[:60]!r}" if reply.body else ""
        add(("reply", f"{what} {reply.status}{extra}{body}"))
        return out
    method = ex.probe.method
    host = (decision.authority or ex.probe.host.encode()).decode("latin-1")
    add(("cluster", decision.cluster or ""))
    add(("upstream", f"{method} {decision.path} (Host: {host})"))
    edits = _edits(decision.request_headers)
    if edits:
        add(("headers", edits))
    add(("timeout", f"{decision.timeout:g}s" if decision.timeout is not None else "none"))
    retries = decision.retries
    add(
        (
            "retries",
            f"{retries.attempts} on {','.join(retries.retry_on)}"
            if retries is not None
            else "disabled",
        )
    )
    view = ex.cluster
    if view is None:
        add(("endpoints", "none: the cluster does not exist (the proxy answers 503)"))
        return out
    lb = view.spec.lb
    add(("load balancer", lb.describe))
    affinity = action.affinity
    if affinity is not None:
        add(("hash policy", "; ".join(_policy(p) for p in affinity.policies)))
        add(("hash key", ex.hash_key or "none: no policy found its key, the pick is random"))
        policy = affinity.cookie_policy
        if ex.set_cookie is not None:
            add(("set-cookie", ex.set_cookie))
        elif policy is not None:
            reason = "the request carries it" if policy.ttl is not None else "no ttl: read only"
            add(("set-cookie", f"none ({reason})"))
    else:
        add(("hash policy", "none"))
    spec_endpoints = view.spec.endpoints
    if view.endpoints is None:
        targets = spec_endpoints.targets if isinstance(spec_endpoints, DnsEndpoints) else ()
        names = " ".join(t.key for t in targets) or "none"
        add(("endpoints", f"DNS {names} (resolved at run time; no endpoint picked)"))
        return out
    if view.balancer is None:
        add(("endpoints", "none: the proxy answers 503 no healthy upstream"))
        return out
    add(
        (
            "endpoints",
            " ".join(
                ep.key + (f" (weight {ep.weight})" if ep.weight != 1 else "")
                for ep in view.endpoints
            ),
        )
    )
    if lb.consistent_hash is None:
        add(("endpoint", f"chosen per request by {lb.describe} (not by a hash)"))
    elif ex.endpoint is None:
        add(("endpoint", "random (no hash key)"))
    else:
        add(("endpoint", ex.endpoint))
    return out


def _policy(policy: HashPolicy) -> str:
    if isinstance(policy, CookiePolicy):
        parts = [f"cookie {policy.name}"]
        parts.append(f"ttl {policy.ttl}s" if policy.ttl is not None else "no ttl (read only)")
        if policy.path:
            parts.append(f"path {policy.path}")
        parts.extend(f"{a.name}={a.value}" if a.value else a.name for a in policy.attributes)
        return ", ".join(parts)
    if isinstance(policy, HeaderPolicy):
        return f"header {policy.name}"
    if isinstance(policy, QueryParameterPolicy):
        return f"query parameter {policy.name}"
    return "source IP"


def _edits(edit: HeaderEdit | None) -> str:
    if edit is None:
        return ""
    parts = [f"-{n.decode()}" for n in sorted(edit.remove)]
    parts += [f"{n.decode()}={v.decode()}" for n, v in edit.set]
    parts += [f"+{n.decode()}={v.decode()}" for n, v in edit.add]
    return " ".join(parts)


def _fmt(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- the admin's JSON
def _json(ex: Explanation) -> tuple[int, dict[str, Any]]:
    answer: dict[str, Any] = {"port": ex.port, "request": ex.request}
    decision = ex.decision
    if decision is None:
        answer["route"] = None
        answer["reply"] = "404 no route"
        return 404, answer
    action = decision.action
    answer.update(
        virtual_host=decision.vhost,
        virtual_service=action.virtual_service,
        route=action.route_name or f"http[{action.route_index}]",
        cluster=decision.cluster,
    )
    reply = decision.local_reply
    if reply is not None:
        location = f" -> {decision.location}" if decision.location else ""
        answer["reply"] = f"{reply.status}{location}"
        return 200, answer
    view = ex.cluster
    if view is None:
        answer["reply"] = "503 no healthy upstream (no such cluster)"
        return 200, answer
    answer["upstream_path"] = decision.path
    if ex.set_cookie is not None:
        answer["set_cookie"] = ex.set_cookie
    answer["hash_key"] = ex.hash_key
    answer["endpoints"] = [ep.key for ep in view.endpoints] if view.endpoints is not None else None
    lb = view.spec.lb
    if view.balancer is None:
        answer["reply"] = "503 no healthy upstream"
    elif lb.consistent_hash is None or ex.hash is None:
        answer["endpoint"] = None
        answer["note"] = f"chosen per request by {lb.describe} (no hash key)"
    else:
        answer["endpoint"] = ex.endpoint
    return 200, answer
