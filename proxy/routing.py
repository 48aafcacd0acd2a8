"""Routing: a request's Host, path, method, headers and query -> VirtualService route -> cluster.

Theory
------
This is Envoy's route table as istiod builds it for an ingress gateway, compiled once per
listener port (``Router``) and then consulted per request with no allocation beyond the result:

1. **Virtual hosts.**  For every HTTP server of every Gateway on the port, and every
   VirtualService bound to that Gateway (in configuration order), the VirtualService's hosts are
   intersected with the server's hosts (``ns/host`` filtered by the VirtualService's namespace;
   the more specific of two overlapping names is kept).  Each resulting host becomes a virtual
   host; when several VirtualServices give the same host, their routes are appended in order, and
   then every *catch-all* route moves to the end (Istio's ``SortVHostRoutes``).
2. **Host selection** (Envoy): the port of the Host header is ignored (Istio sets
   ``ignore_port_in_host_matching``), names compare case-insensitively; an exact name wins, then
   the longest ``*suffix`` wildcard (the ``*`` must cover at least one character), then ``*``.
3. **Route selection**: first match wins.  A VirtualService contributes one route per
   ``match[]`` entry (none: one route matching everything); a match for another port or another
   gateway is left out; building stops at the first catch-all (prefix ``/`` or regex ``.*`` with
   no header, method, authority, scheme or query condition).  Path tests follow Envoy: ``prefix``
   looks at the whole ``:path`` (query string included), ``exact`` and ``regex`` at the path
   without the query; regexes must match the whole string; ``ignoreUriCase`` applies to prefix
   and exact only.  Headers: ``{}`` (or regex ``*``) tests presence; ``withoutHeaders`` inverts
   and treats a missing header as empty.  Query parameters: first occurrence, raw (not decoded).
4. **Action**: one destination, or a weighted pick among those with weight > 0 (``rand`` is
   injectable for tests); with ``sticky-proxy/sticky-weights`` the pick is left to the caller,
   who has the request's hash: ``RouteDecision.split`` picks ``hash % total`` on the running
   weights (Envoy's ``WeightedCluster.use_hash_policy``).  Rewrites replace the matched prefix
   (or the whole path for exact and regex matches) and keep the query; header operations are
   precomputed into ordered mutations (remove, then set/add in Istio's order).

Everything per route is precomputed in a ``RouteAction``; a ``RouteDecision`` adds only what
depends on the request (the chosen action, the upstream path, a redirect's Location).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.affinity import Affinity, HashPolicy
from proxy.config import (
    Config,
    Destination,
    DirectResponse,
    GatewayServer,
    HeaderOperations,
    Headers,
    HttpMatch,
    HttpRoute,
    Redirect,
    RetryPolicy,
    RouteDestination,
    SessionSpec,
    VirtualServiceSpec,
    cluster_name,
    destination_port,
    host_subset_of,
    server_route_name,
)
from proxy.exchange import HeaderEdit, LocalReply
from proxy.regex import Match, Regex, compile_regex
from proxy.route_match import HeaderTest, StringTest
from proxy.sessions import PersistentSession

# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class RouteAction:
    """What a matched route does; built once per route entry and destination."""

    virtual_service: str  # "namespace/name"
    route_name: str  # Envoy's route name: http[].name, + "." + match[].name
    route_index: int  # index in the VirtualService's http list
    match_index: int | None  # the match[] entry, None for a route without matches
    cluster: str | None  # None for a redirect or a direct response
    destination: Destination | None
    hash_policies: tuple[HashPolicy, ...]
    affinity: Affinity | None = field(compare=False, repr=False)
    authority: bytes | None  # the upstream Host header, None: unchanged
    request_headers: HeaderEdit | None
    response_headers: HeaderEdit | None
    redirect: Redirect | None
    direct_response: DirectResponse | None
    timeout: float | None  # None: no timeout (Istio's default)
    retries: RetryPolicy | None  # None: retries disabled
    reply: LocalReply | None = field(default=None, compare=False, repr=False)
    # The route's persistent session (Istio: the first destination service labelled for one).
    persistent: PersistentSession | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The route a request took: the precomputed action plus the request-specific parts.

    Redirects and direct responses come back as ``local_reply`` (``cluster`` is None then);
    otherwise forward to ``cluster`` with ``rewrite_target``, ``authority``, the header edits
    and the ``timeout``.
    """

    action: RouteAction
    vhost: str  # the Istio host that selected the virtual host
    target: str  # the request target as given to match()
    entry: _Entry = field(compare=False, repr=False)
    location: str | None = None  # for redirects: the Location header

    @property
    def virtual_service(self) -> str:
        return self.action.virtual_service

    @property
    def route_name(self) -> str:
        return self.action.route_name

    @property
    def cluster(self) -> str | None:
        return self.action.cluster

    @property
    def hash_policies(self) -> tuple[HashPolicy, ...]:
        return self.action.hash_policies

    @property
    def authority(self) -> bytes | None:
        return self.action.authority

    @property
    def request_headers(self) -> HeaderEdit | None:
        return self.action.request_headers

    @property
    def response_headers(self) -> HeaderEdit | None:
        return self.action.response_headers

    @property
    def timeout(self) -> float | None:
        return self.action.timeout

    @property
    def retries(self) -> RetryPolicy | None:
        return self.action.retries

    @property
    def rewrites_path(self) -> bool:
        return self.entry.rewrites

    @property
    def path(self) -> str:
        """The request target to send upstream (the given one when nothing rewrites it)."""
        q = self.target.find("?")
        return self.entry.rewrite(self.target, self.target if q < 0 else self.target[:q])

    def rewrite_target(self, path: str, query: str) -> bytes:
        """The upstream request target for ``path`` and raw ``query`` (without the ``?``)."""
        return self.entry.rewrite(path + "?" + query if query else path, path).encode("latin-1")

    @property
    def deterministic(self) -> bool:
        """The same request gets the same decision (no random pick among destinations)."""
        choice = self.entry.choice
        return len(choice.actions) == 1 or choice.by_hash

    @property
    def split(self) -> _Choice | None:
        """A weighted split that the caller picks by the request's hash (sticky weights)."""
        choice = self.entry.choice
        return choice if choice.by_hash and len(choice.actions) > 1 else None

    @property
    def local_reply(self) -> LocalReply | None:
        """The response for a redirect or direct response route, else None."""
        reply = self.action.reply
        if reply is None or self.location is None:
            return reply
        location = (b"location", self.location.encode("latin-1"))
        return LocalReply(reply.status, reply.body, (location, *reply.headers))


# --------------------------------------------------------------------------- matching pieces


_ABSENT = object()


@dataclass(frozen=True, slots=True)
class _Choice:
    actions: tuple[RouteAction, ...]
    cumulative: tuple[int, ...]  # running weights, for weighted destinations
    total: int
    by_hash: bool = False  # sticky weights: the caller picks with pick(hash)

    def pick(self, value: int) -> RouteAction:
        """Envoy's ``pickClusterIndex``: the destination whose interval holds value % total."""
        point = value % self.total
        for action, upto in zip(self.actions, self.cumulative, strict=True):
            if point < upto:
                return action
        return self.actions[-1]


class _Entry:
    """One Envoy route: compiled conditions, the rewrite, and the action(s)."""

    __slots__ = (
        "authority",
        "catch_all",
        "choice",
        "headers",
        "match_index",
        "method",
        "path_ci",
        "path_kind",
        "path_regex",
        "path_value",
        "query",
        "rewrite_prefix",
        "rewrite_regex",
        "rewrite_sub",
        "rewrites",
        "scheme",
    )

    def __init__(
        self, match: HttpMatch | None, match_index: int | None, route: HttpRoute, choice: _Choice
    ) -> None:
        m = match or HttpMatch()
        uri = m.uri
        self.match_index = match_index
        self.path_ci = m.ignore_uri_case
        self.path_regex: Regex | None = None
        if uri is None or uri.kind == "present":
            self.path_kind, self.path_value = "prefix", "/"
        elif uri.kind == "regex":
            self.path_kind, self.path_value = "regex", uri.value
            self.path_regex = compile_regex(uri.value)
        else:
            self.path_kind = uri.kind
            self.path_value = uri.value.lower() if self.path_ci else uri.value
        self.method = StringTest(m.method) if m.method else None
        self.authority = StringTest(m.authority) if m.authority else None
        self.scheme = StringTest(m.scheme) if m.scheme else None
        self.headers = tuple(
            [HeaderTest(n, sm, invert=False) for n, sm in m.headers]
            + [HeaderTest(n, sm, invert=True) for n, sm in m.without_headers]
        )
        self.query = tuple((name, StringTest(sm)) for name, sm in m.query_params)
        is_root = (self.path_kind == "prefix" and self.path_value == "/") or (
            self.path_kind == "regex" and self.path_value == ".*"
        )
        self.catch_all = (
            is_root
            and not self.headers
            and not self.query
            and self.method is None
            and self.authority is None
            and self.scheme is None
        )
        rewrite = route.rewrite
        self.rewrite_prefix = rewrite.uri if rewrite is not None else None
        self.rewrite_regex: Regex | None = None
        self.rewrite_sub: Callable[[Match], str] | None = None
        if rewrite is not None and rewrite.uri_regex is not None:
            self.rewrite_regex = compile_regex(rewrite.uri_regex[0])
            self.rewrite_sub = _re2_substitution(rewrite.uri_regex[1])
        self.rewrites = self.rewrite_prefix is not None or self.rewrite_regex is not None
        self.choice = choice

    def matches(
        self,
        path: str,
        bare: str,
        method: str,
        authority: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        scheme: str = "http",
    ) -> bool:
        kind = self.path_kind
        if kind == "prefix":
            if self.path_ci:
                if path[: len(self.path_value)].lower() != self.path_value:
                    return False
            elif not path.startswith(self.path_value):
                return False
        elif kind == "exact":
            if (bare.lower() if self.path_ci else bare) != self.path_value:
                return False
        else:
            assert self.path_regex is not None
            if self.path_regex.fullmatch(bare) is None:
                return False
        if self.method is not None and not self.method(method):
            return False
        if self.authority is not None and not self.authority(authority):
            return False
        if self.scheme is not None and not self.scheme(scheme):
            return False
        for test in self.headers:
            if not test(headers.get(test.name)):
                return False
        for name, qtest in self.query:
            value = query.get(name)
            if value is None or not qtest(value):
                return False
        return True

    def rewrite(self, path: str, bare: str) -> str:
        """The upstream request target: Envoy's prefix_rewrite / regex_rewrite."""
        if self.rewrite_regex is not None:
            assert self.rewrite_sub is not None
            return self.rewrite_regex.sub(self.rewrite_sub, bare) + path[len(bare) :]
        prefix = self.rewrite_prefix
        if prefix is None:
            return path
        return self.replace_prefix(prefix, path, bare)

    def replace_prefix(self, prefix: str, path: str, bare: str) -> str:
        """The matched prefix (an exact match: the whole path) replaced; the query kept."""
        matched = len(self.path_value) if self.path_kind == "prefix" else len(bare)
        return prefix + path[matched:]


def _re2_substitution(template: str) -> Callable[[Match], str]:
    r"""RE2's rewrite string (``\1``..``\9``, ``\\``) as a function of a match."""
    parts: list[str | int] = []
    text = ""
    i = 0
    while i < len(template):
        ch = template[i]
        if ch == "\\" and i + 1 < len(template):
            nxt = template[i + 1]
            if nxt.isdigit():
                parts.append(text)
                parts.append(int(nxt))
                text = ""
                i += 2
                continue
            if nxt == "\\":
                text += "\\"
                i += 2
                continue
        text += ch
        i += 1
    parts.append(text)

    def substitute(m: Match) -> str:
        return "".join(p if isinstance(p, str) else (m.group(p) or "") for p in parts)

    return substitute


# --------------------------------------------------------------------------- building


def _is_internal(name: str) -> bool:
    return name.startswith(":") or name.lower() == "host"


def _is_authority(name: str) -> bool:
    return name.lower() in (":authority", "host")


_Op = tuple[str, str, str]  # ("remove" | "set" | "add", name, value)


def _ops(ops: HeaderOperations) -> tuple[list[_Op], str | None]:
    """Istio's ``TranslateHeadersOperations`` for one direction: Envoy's operation order
    (removes, then set, then add; Host and ``:`` headers dropped) and the authority it sets."""
    authority = None
    for name, value in ops.add:
        if _is_authority(name):
            authority = value
    for name, value in ops.set:
        if _is_authority(name):
            authority = value  # set wins over add
    out: list[_Op] = [("remove", n.lower(), "") for n in ops.remove if not _is_internal(n)]
    out += [("set", n.lower(), v) for n, v in ops.set if not _is_internal(n)]
    out += [("add", n.lower(), v) for n, v in ops.add if not _is_internal(n)]
    return out, authority


def _level(*parts: list[_Op]) -> list[_Op]:
    """Operation lists merged into one Envoy header list, which removes first."""
    ops = [op for part in parts for op in part]
    return [op for op in ops if op[0] == "remove"] + [op for op in ops if op[0] != "remove"]


def _fold(ops: Sequence[_Op]) -> HeaderEdit | None:
    """A sequence of header operations as one equivalent ``HeaderEdit`` (remove, set, add).

    Exact: a later ``set`` or ``remove`` of a name cancels the earlier adds of that name.
    """
    removed: set[str] = set()
    sets: dict[str, str] = {}
    adds: list[tuple[str, str]] = []
    for kind, name, value in ops:
        if kind == "add":
            adds.append((name, value))
            continue
        adds = [a for a in adds if a[0] != name]
        if kind == "remove":
            removed.add(name)
            sets.pop(name, None)
        else:
            sets[name] = value
    if not (removed or sets or adds):
        return None
    return HeaderEdit(
        set=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in sets.items()),
        add=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in adds),
        remove=frozenset(n.encode("latin-1") for n in removed),
    )


def _local_reply(route: HttpRoute, response: HeaderEdit | None) -> LocalReply | None:
    """Redirects and direct responses (a redirect's Location is added per request)."""
    extra = (*response.set, *response.add) if response is not None else ()
    if route.direct_response is not None:
        d = route.direct_response
        return LocalReply(d.status, d.body or b"", tuple(extra))
    if route.redirect is not None:
        return LocalReply(route.redirect.code, b"", tuple(extra))
    return None


_EMPTY = Headers()


class _Builder:
    """Turns one VirtualService into Envoy routes for one listener port and gateway."""

    def __init__(self, config: Config, port: int) -> None:
        self.config = config
        self.port = port
        self.affinities: dict[tuple[HashPolicy, ...], Affinity] = {}
        self.sessions: dict[SessionSpec, PersistentSession] = {}

    def persistent(self, route: HttpRoute) -> PersistentSession | None:
        """Istio's rule: the first destination whose service has a persistent session."""
        for dest in route.route:
            if dest.weight == 0 and len(route.route) > 1:
                continue
            d = dest.destination
            port = destination_port(d, self.port, self.config.service_ports)
            spec = self.config.clusters.get(cluster_name(d.host, port, d.subset))
            if spec is not None and spec.session is not None:
                found = self.sessions.get(spec.session)
                if found is None:
                    found = self.sessions[spec.session] = PersistentSession(spec.session)
                return found
        return None

    def affinity(self, policies: tuple[HashPolicy, ...]) -> Affinity | None:
        if not policies:
            return None
        found = self.affinities.get(policies)
        if found is None:
            found = self.affinities[policies] = Affinity(policies)
        return found

    def entries(self, vs: VirtualServiceSpec, gateway: str) -> list[_Entry]:
        """Istio's ``BuildHTTPRoutesForVirtualService``: stop at the first catch-all."""
        out: list[_Entry] = []
        for route in vs.http:
            if not route.matches:
                out.append(_Entry(None, None, route, self.choice(vs, route, None, None)))
                break
            stop = False
            for index, match in enumerate(route.matches):
                if match.port is not None and match.port != self.port:
                    continue
                if not _source_matches(match, gateway):
                    continue
                entry = _Entry(match, index, route, self.choice(vs, route, match, index))
                out.append(entry)
                if entry.catch_all:
                    stop = True
                    break
            if stop:
                break
        return out

    def choice(
        self, vs: VirtualServiceSpec, route: HttpRoute, match: HttpMatch | None, index: int | None
    ) -> _Choice:
        name = route.name + ("." + match.name if match is not None and match.name else "")
        route_headers = route.headers or _EMPTY
        req, req_authority = _ops(route_headers.request)
        resp, _ = _ops(route_headers.response)
        authority = route.rewrite.authority if route.rewrite and route.rewrite.authority else None
        authority = authority or req_authority
        persistent = self.persistent(route)

        def action(
            dest: RouteDestination | None,
            req_ops: list[_Op],
            resp_ops: list[_Op],
            host: str | None,
            policies: tuple[HashPolicy, ...] = (),
        ) -> RouteAction:
            cluster = None
            if dest is not None:
                d = dest.destination
                port = destination_port(d, self.port, self.config.service_ports)
                cluster = cluster_name(d.host, port, d.subset)
            response = _fold(resp_ops)
            return RouteAction(
                virtual_service=vs.key,
                route_name=name,
                route_index=route.index,
                match_index=index,
                cluster=cluster,
                destination=dest.destination if dest is not None else None,
                hash_policies=policies,
                affinity=self.affinity(policies),
                authority=host.encode("latin-1") if host else None,
                request_headers=_fold(req_ops),
                response_headers=response,
                redirect=route.redirect,
                direct_response=route.direct_response,
                timeout=route.timeout,
                retries=route.retries,
                reply=_local_reply(route, response),
                persistent=persistent if dest is not None else None,
            )

        if route.redirect is not None or route.direct_response is not None or not route.route:
            only = action(None, _level(req), _level(resp), authority)
            return _Choice((only,), (1,), 1)
        if len(route.route) == 1:
            dest = route.route[0]
            dh = dest.headers or _EMPTY
            dreq, dauth = _ops(dh.request)
            dresp, _ = _ops(dh.response)
            # Istio appends the destination's operations to the route's own list, and a
            # destination's authority only applies when the route sets none.
            only = action(
                dest, _level(req, dreq), _level(resp, dresp), authority or dauth, dest.hash_policies
            )
            return _Choice((only,), (1,), 1)
        actions: list[RouteAction] = []
        cumulative: list[int] = []
        total = 0
        # Istio appends every weighted destination's hash policy to the one route action, and
        # Envoy folds them all into the key whichever cluster the split picks.
        policies = tuple(p for d in route.route if d.weight != 0 for p in d.hash_policies)
        for dest in route.route:
            if dest.weight == 0:
                continue  # Istio drops zero-weight destinations of a split
            dh = dest.headers or _EMPTY
            dreq, dauth = _ops(dh.request)
            dresp, _ = _ops(dh.response)
            # Envoy applies a weighted cluster's headers first, then the route's (which win).
            req_ops = _level(dreq) + _level(req)
            resp_ops = _level(dresp) + _level(resp)
            actions.append(action(dest, req_ops, resp_ops, dauth or authority, policies))
            total += dest.weight
            cumulative.append(total)
        return _Choice(tuple(actions), tuple(cumulative), total, vs.sticky_weights)


def _source_matches(match: HttpMatch, gateway: str) -> bool:
    """Istio's ``sourceMatchHTTP`` for a gateway proxy that has no labels of its own."""
    if match.gateways:
        return gateway in match.gateways
    return not match.source_labels and not match.source_namespace


def _names_for_namespace(server: GatewayServer, namespace: str) -> list[str]:
    """Istio's ``NamesForNamespace``: the server hosts visible to a VirtualService namespace."""
    return [h.host for h in server.hosts if h.namespace in ("*", namespace)]


def _intersection(server_hosts: Sequence[str], vs_hosts: Sequence[str]) -> list[str]:
    """Istio's ``Names.Intersection``: for overlapping names keep the more specific one."""
    out: list[str] = []
    for a in server_hosts:
        for b in vs_hosts:
            pick = a if host_subset_of(a, b) else b if host_subset_of(b, a) else None
            if pick is not None and pick not in out:
                out.append(pick)
    return out


@dataclass(slots=True)
class _VHost:
    name: str
    entries: list[_Entry] = field(default_factory=list)
    require_tls: bool = False


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end >= 0 else authority
    host, colon, port = authority.rpartition(":")
    return host if colon and port.isdigit() else authority


_HTTPS_REDIRECT = RouteAction(
    virtual_service="",
    route_name="https_redirect",
    route_index=-1,
    match_index=None,
    cluster=None,
    destination=None,
    hash_policies=(),
    affinity=None,
    authority=None,
    request_headers=None,
    response_headers=None,
    redirect=Redirect(scheme="https", code=301),
    direct_response=None,
    timeout=None,
    retries=None,
    reply=LocalReply(301),
)
_NO_ENTRY = _Entry(None, None, HttpRoute(index=-1), _Choice((_HTTPS_REDIRECT,), (1,), 1))


class Router:
    """The route table of one listener port, compiled from a ``Config``.

    ``match`` takes the Host header (``authority``), the request target (``path``; pass the query
    string too, ``/a?b=1``, for Envoy's exact behaviour: a ``prefix`` match sees it and a redirect
    keeps it; a path without one also works), the method, the headers (lower-case names; repeated
    headers joined with ``,`` as Envoy does) and the query parameters (first occurrence, raw), and
    returns the decision or None (Envoy answers 404 ``NR``). ``needs_headers`` / ``needs_query``
    tell the caller whether any route looks at them at all.

    ``https_server`` (an HTTPS server's RDS name, ``server_route_name``) builds that server's own
    table, Envoy's route config for the filter chain its SNI chose: only its hosts, requests
    on scheme ``https``. Without it the table has every server of the port (``route``).
    """

    def __init__(
        self,
        config: Config,
        port: int,
        *,
        https_server: str | None = None,
        scheme: str = "http",
        rand: Callable[[], float] | None = None,
    ) -> None:
        self.port = port
        self.scheme = scheme
        self._rand = rand or random.random
        builder = _Builder(config, port)
        only = https_server
        vhosts: dict[str, _VHost] = {}
        cache: dict[tuple[str, str], list[_Entry]] = {}
        for gateway in config.gateways:
            for server in gateway.servers:
                if server.port != port or not server.served:
                    continue
                if only is not None and server_route_name(gateway, server) != only:
                    continue
                for vs in config.virtual_services:
                    if gateway.key not in vs.gateways:
                        continue
                    hosts = _intersection(_names_for_namespace(server, vs.namespace), vs.hosts)
                    if not hosts:
                        continue
                    key = (gateway.key, vs.key)
                    entries = cache.get(key)
                    if entries is None:
                        entries = cache[key] = builder.entries(vs, gateway.key)
                    for host in hosts:
                        vhost = vhosts.setdefault(host, _VHost(host))
                        vhost.entries.extend(entries)
                        vhost.require_tls |= server.https_redirect
                if server.https_redirect:
                    for sh in server.hosts:
                        vhosts.setdefault(sh.host, _VHost(sh.host)).require_tls = True
        for vhost in vhosts.values():
            # Istio's SortVHostRoutes: catch-alls last, the rest in their order.
            vhost.entries = [e for e in vhost.entries if not e.catch_all] + [
                e for e in vhost.entries if e.catch_all
            ]
        self.vhosts: tuple[str, ...] = tuple(vhosts)
        self._exact = {name: v for name, v in vhosts.items() if not name.startswith("*")}
        self._wildcards = sorted(
            ((name[1:], v) for name, v in vhosts.items() if name.startswith("*") and name != "*"),
            key=lambda item: len(item[0]),
            reverse=True,
        )
        self._star = vhosts.get("*")
        self._host_cache: dict[str, _VHost | None] = {}
        all_entries = [e for v in vhosts.values() for e in v.entries]
        self.needs_headers = any(e.headers for e in all_entries)
        self.needs_query = any(e.query for e in all_entries)

    def _vhost(self, authority: str) -> _VHost | None:
        found = self._host_cache.get(authority, _ABSENT)
        if found is not _ABSENT:
            return found  # type: ignore[return-value]
        host = _strip_port(authority).lower()
        vhost = self._exact.get(host)
        if vhost is None:
            for suffix, candidate in self._wildcards:
                if len(host) > len(suffix) and host.endswith(suffix):
                    vhost = candidate
                    break
            else:
                vhost = self._star
        if len(self._host_cache) >= 4096:
            self._host_cache.clear()
        self._host_cache[authority] = vhost
        return vhost

    def match(
        self,
        authority: str,
        path: str,
        method: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
    ) -> RouteDecision | None:
        vhost = self._vhost(authority)
        if vhost is None:
            return None
        if vhost.require_tls:
            location = f"https://{authority}{path}"
            return RouteDecision(_HTTPS_REDIRECT, vhost.name, path, _NO_ENTRY, location)
        q = path.find("?")
        bare = path if q < 0 else path[:q]
        for entry in vhost.entries:
            if entry.matches(path, bare, method, authority, headers, query, self.scheme):
                return self._decide(entry, vhost.name, authority, path, bare)
        return None

    def _decide(
        self, entry: _Entry, vhost: str, authority: str, path: str, bare: str
    ) -> RouteDecision:
        choice = entry.choice
        action = choice.actions[0]
        if len(choice.actions) > 1 and not choice.by_hash:
            point = min(int(self._rand() * choice.total), choice.total - 1)
            for candidate, upto in zip(choice.actions, choice.cumulative, strict=True):
                if point < upto:
                    action = candidate
                    break
        if action.redirect is not None:
            target = path
            if action.redirect.prefix_rewrite is not None:  # Envoy's RedirectAction.prefix_rewrite
                target = entry.replace_prefix(action.redirect.prefix_rewrite, path, bare)
            location = _location(action.redirect, authority, target, bare, self.port, self.scheme)
            return RouteDecision(action, vhost, path, entry, location)
        return RouteDecision(action, vhost, path, entry)


def _location(
    redirect: Redirect,
    authority: str,
    path: str,
    bare: str,
    listener_port: int,
    request_scheme: str = "http",
) -> str:
    """Envoy's redirect URL (``RouteEntryImplBase::newUri``) as Istio configures it."""
    scheme = redirect.scheme or request_scheme
    port = redirect.port
    if redirect.derive_port == "FROM_REQUEST_PORT":
        port = listener_port
    if port is not None and (
        (port == 80 and scheme == "http") or (port == 443 and scheme == "https")
    ):
        port = None  # Istio omits the scheme's default port
    if redirect.authority:
        host = redirect.authority
    else:
        host = authority
        stripped = _strip_port(authority)
        request_port = authority[len(stripped) :]
        default = ":443" if request_scheme == "https" else ":80"
        remove = port is not None or (scheme != request_scheme and request_port == default)
        if request_port and remove:
            host = stripped
    if port is not None:
        host = f"{host}:{port}"
    if redirect.uri:
        target = redirect.uri if "?" in redirect.uri else redirect.uri + path[len(bare) :]
    else:
        target = path
    return f"{scheme}://{host}{target}"
