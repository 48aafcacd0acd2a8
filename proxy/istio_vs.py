"""Istio ``VirtualService`` -> ``ParsedVirtualService``: hosts, gateways and ``http`` routes.

Theory
------
* **Routes.**  Each ``http[]`` entry becomes one Envoy route per ``match[]`` entry, in order;
  first match wins.  A route is *catch-all* when its path test is prefix ``/`` (or regex ``.*``)
  and it tests no header, method, authority, scheme or query parameter; building stops at the
  first catch-all of a VirtualService, and when several VirtualServices share a host the
  catch-alls move to the end (``SortVHostRoutes``).  That part lives in ``proxy.routing``.

A route is parsed before the DestinationRules are known (``RawRoute``): its destinations' hash
policies and the retry "previous hosts" predicate are filled in by ``proxy.istio_compile``, which
also checks the gateway and subset references once every resource has been read.  The match
conditions are ``proxy.istio_match``'s.  The rest of an entry follows Istio's validation: exactly
one of ``route``, ``redirect`` or ``directResponse``; redirect codes 301 (the default), 302, 303,
307 or 308; ``headers`` set/add sorted by name; the authority set at most once (rewrite or header);
``retries.attempts: 0`` disables retries, and ``retryOn`` takes Envoy's conditions and status codes.

* **Delegates.**  A VirtualService without ``hosts`` is a delegate: it names no gateways and its
  routes delegate no further; a route of another VirtualService with ``delegate: {name,
  namespace}`` (and no ``route`` or ``redirect``) takes its routes (``proxy.istio_delegate``).

Hosts are lowercased.  ``tcp`` and ``tls`` routes are not served: beside ``http`` routes they are
ignored, alone they make the VirtualService skipped (one warning each way).
"""

from __future__ import annotations

import base64
import binascii
import http
import re
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import (
    Destination,
    DirectResponse,
    HeaderOperations,
    Headers,
    HttpMatch,
    HttpRoute,
    Redirect,
    RetryPolicy,
    Rewrite,
    host_subset_of,
    is_ip,
)
from proxy.istio_match import read_match, regex_ok
from proxy.istio_names import (
    MESH_GATEWAY,
    NOT_SUPPORTED,
    Meta,
    check_gateway_name,
    resolve_gateway_name,
    resolve_short_name,
    words,
)
from proxy.istio_reader import (
    Reader,
    did_you_mean,
    is_dns1123_label,
    join_path,
    wildcard_domain_problem,
)

_HTTP_ROUTE_FIELDS = words(
    "name match route redirect directResponse rewrite timeout retries headers"
)
_HTTP_ROUTE_IGNORED = {
    "fault": f"fault injection is {NOT_SUPPORTED}",
    "mirror": f"mirroring is {NOT_SUPPORTED}",
    "mirrors": f"mirroring is {NOT_SUPPORTED}",
    "mirrorPercent": f"mirroring is {NOT_SUPPORTED}",
    "mirrorPercentage": f"mirroring is {NOT_SUPPORTED}",
    "corsPolicy": f"CORS policies are {NOT_SUPPORTED}",
}
_HEADER_VALUE = re.compile(r"[^\x00-\x08\x0A-\x1F\x7F]*")
_RETRY_ON = frozenset(
    words(
        "5xx gateway-error reset reset-before-request connect-failure retriable-4xx "
        "refused-stream retriable-status-codes retriable-headers envoy-ratelimited "
        "http3-post-connect-failure cancelled deadline-exceeded internal resource-exhausted "
        "unavailable"
    )
)
_HTTP_STATUSES = frozenset(int(s) for s in http.HTTPStatus)


@dataclass(frozen=True, slots=True)
class RawDestination:
    path: str
    destination: Destination
    weight: int
    headers: Headers | None


@dataclass(frozen=True, slots=True)
class RawRoute:
    """An ``http[]`` entry before the DestinationRules are known (hash policies, retries)."""

    path: str
    route: HttpRoute
    destinations: tuple[RawDestination, ...]
    match_gateway_paths: tuple[tuple[str, str], ...]  # (path, resolved gateway)
    retries_set: bool
    ignore_previous_hosts: bool | None
    delegate: str | None = None  # "namespace/name" of the delegate VirtualService
    reader: Reader | None = None  # the delegate's, once merged into its parent (messages)


@dataclass(slots=True)
class ParsedVirtualService:
    meta: Meta
    reader: Reader
    hosts: list[str]
    gateways: list[tuple[str, str]]  # (path, resolved)
    routes: list[RawRoute]
    is_delegate: bool = False  # no hosts: used only through a parent's ``delegate`` route


def read_virtual_service(r: Reader, meta: Meta, spec: object) -> ParsedVirtualService | None:
    s = r.mapping(spec, "spec", ("hosts", "gateways", "http", "tcp", "tls", "exportTo"))
    if s is None:
        return None
    gateways = [
        (p, resolve_gateway_name(g, meta.namespace))
        for p, g in r.string_list(s, "gateways", "spec")
    ]
    for p, raw in r.string_list(s, "gateways", "spec"):
        check_gateway_name(r, p, raw)
    mesh_only = not gateways or all(g == MESH_GATEWAY for _, g in gateways)
    hosts: list[str] = []
    raw_hosts = r.string_list(s, "hosts", "spec")
    delegate = not s.get("hosts")
    if delegate and isinstance(spec, dict):
        _check_delegate(r, spec)
    for p, raw_host in raw_hosts:
        host = raw_host.lower()  # Istio lowers VirtualService hosts (route.go, gateway.go)
        problem = None if host == "*" or is_ip(host) else wildcard_domain_problem(host)
        if problem is not None:
            r.error(p, problem)
            continue
        if host == "*" and mesh_only:
            r.error(
                p, "wildcard host * is not allowed for virtual services bound to the mesh gateway"
            )
            continue
        hosts.append(resolve_short_name(host, meta.namespace))
    for i, a in enumerate(hosts):
        for b in hosts[i + 1 :]:
            if host_subset_of(a, b) or host_subset_of(b, a):
                r.error(
                    join_path("spec", "hosts"), f"duplicate hosts in virtual service: {a} & {b}"
                )
    routes: list[RawRoute] = []
    for index, (path, item) in enumerate(r.items(s, "http", "spec")):
        route = _http_route(r, meta, index, path, item, in_delegate=delegate)
        if route is not None:
            routes.append(route)
    if not s.get("http") and not s.get("tls") and not s.get("tcp"):
        # Istio's validation rejects only a VirtualService with no route of any kind.
        r.error("spec", "http, tcp or tls must be provided in virtual service")
    elif not _served_routes(r, s):
        return None
    return ParsedVirtualService(meta, r, hosts, gateways, routes, delegate)


def _served_routes(r: Reader, s: Mapping[str, object]) -> bool:
    """Warn once about the TCP and TLS routes; False when the VirtualService has nothing else."""
    kinds = [kind for kind in ("tcp", "tls") if s.get(kind)]
    if s.get("http"):
        for kind in kinds:
            r.warn(join_path("spec", kind), f"ignored: {kind.upper()} routes are {NOT_SUPPORTED}")
        return True
    names = " and ".join(kind.upper() for kind in kinds)
    r.warn(
        "spec",
        f"{names} routes only ({', '.join(f'spec.{k}' for k in kinds)}), which sticky-proxy "
        "does not serve (HTTP routes only): VirtualService skipped",
    )
    return False


def _check_delegate(r: Reader, s: Mapping[object, object]) -> None:
    """pkg/config/validation/validation.go ``ValidateVirtualService``: a VirtualService without
    hosts must be a delegate (``s`` is the raw spec: tls and tcp are ignored fields)."""
    if s.get("gateways"):
        r.error("spec.gateways", "delegate virtual service must have no gateways specified")
    for key in ("tls", "tcp"):
        if s.get(key):
            r.error(f"spec.{key}", f"delegate virtual service must have no {key} route specified")


def _read_delegate(
    r: Reader, meta: Meta, path: str, m: Mapping[str, object], *, in_delegate: bool
) -> str | None:
    """``delegate: {name, namespace}`` -> ``namespace/name`` (the namespace defaults to ours)."""
    d = r.obj(m, "delegate", path, ("name", "namespace"))
    if d is None:
        return None
    here = join_path(path, "delegate")
    if in_delegate:
        r.error(here, "delegate HTTP route cannot contain delegate")
    name = r.string(d, "name", here) or ""
    for key in ("redirect", "route"):
        # validateHTTPRouteConflict: a root route only delegates.
        if m.get(key) is not None and not in_delegate:
            named = f" {m['name']}" if isinstance(m.get("name"), str) and m["name"] else ""
            r.error(path, f"root HTTP route{named} must not specify {key}")
    return f"{r.string(d, 'namespace', here) or meta.namespace}/{name}"


def _http_route(
    r: Reader, meta: Meta, index: int, path: str, item: object, *, in_delegate: bool = False
) -> RawRoute | None:
    m = r.mapping(item, path, (*_HTTP_ROUTE_FIELDS, "delegate"), _HTTP_ROUTE_IGNORED)
    if m is None:
        return None
    delegate = _read_delegate(r, meta, path, m, in_delegate=in_delegate)
    name = r.string(m, "name", path) or ""
    matches: list[HttpMatch] = []
    gateway_refs: list[tuple[str, str]] = []
    for mpath, raw in r.items(m, "match", path):
        match = read_match(r, meta, mpath, raw)
        if match is not None:
            matches.append(match)
            gateway_refs.extend(
                (join_path(join_path(mpath, "gateways"), i), g)
                for i, g in enumerate(match.gateways)
            )
    destinations: list[RawDestination] = []
    total = 0
    for dpath, raw in r.items(m, "route", path):
        dest = _route_destination(r, meta, dpath, raw)
        if dest is not None:
            destinations.append(dest)
            total += dest.weight
    if len(destinations) > 1 and total == 0:
        r.error(join_path(path, "route"), "total destination weight = 0")
    redirect = _redirect(r, path, m, matches)
    direct = _direct_response(r, path, m)
    rewrite = _rewrite(r, path, m)
    headers = _headers(r, m, "headers", path)
    has_route = m.get("route") is not None
    if delegate is not None:
        pass  # a root route: checked by _read_delegate
    elif redirect is not None or m.get("redirect") is not None:
        if has_route:
            r.error(path, "HTTP route cannot contain both route and redirect")
        if m.get("directResponse") is not None:
            r.error(path, "HTTP route cannot contain both redirect and directResponse")
        if m.get("rewrite") is not None:
            r.error(path, "HTTP route rule cannot contain both rewrite and redirect")
    elif m.get("directResponse") is not None:
        if has_route:
            r.error(path, "HTTP route cannot contain both route and directResponse")
    elif not has_route:
        r.error(path, "HTTP route, redirect or direct response is required")
    _check_authority_once(r, path, rewrite, headers)
    timeout = r.duration(m, "timeout", path)
    retries, retries_set, ignore_previous = _retries(r, path, m)
    route = HttpRoute(
        index=index,
        name=name,
        matches=tuple(matches),
        route=(),
        redirect=redirect,
        direct_response=direct,
        rewrite=rewrite,
        timeout=timeout,
        retries=retries,
        headers=headers,
    )
    return RawRoute(
        path,
        route,
        tuple(destinations),
        tuple(gateway_refs),
        retries_set,
        ignore_previous,
        delegate,
    )


def _route_destination(r: Reader, meta: Meta, path: str, raw: object) -> RawDestination | None:
    m = r.mapping(raw, path, ("destination", "weight", "headers"))
    if m is None:
        if raw is None:
            r.error(path, "weight may not be nil")
        return None
    dest = _destination(r, meta, path, m)
    weight = r.integer(m, "weight", path)
    if weight is not None and weight < 0:
        r.error(join_path(path, "weight"), f"weight {weight} < 0")
        weight = 0
    headers = _headers(r, m, "headers", path)
    if dest is None:
        return None
    return RawDestination(path, dest, weight or 0, headers)


def _destination(r: Reader, meta: Meta, path: str, m: Mapping[str, object]) -> Destination | None:
    d = r.obj(m, "destination", path, ("host", "subset", "port"), required=True)
    if d is None:
        return None
    dpath = join_path(path, "destination")
    host = r.string(d, "host", dpath, required=True)
    subset = r.string(d, "subset", dpath)
    if subset is not None and not is_dns1123_label(subset):
        r.error(join_path(dpath, "subset"), f"subset name is invalid: {subset}")
    port_obj = r.obj(d, "port", dpath, ("number",))
    port = r.port(port_obj, "number", join_path(dpath, "port"), required=True) if port_obj else None
    if host is None:
        return None
    host = host.lower()  # DNS names compare case-insensitively, as VirtualService hosts do
    if host == "*":
        r.error(join_path(dpath, "host"), "invalid destination host *")
        return None
    problem = None if is_ip(host) else wildcard_domain_problem(host)
    if problem is not None:
        r.error(join_path(dpath, "host"), problem)
        return None
    return Destination(resolve_short_name(host, meta.namespace), port, subset or None)


def _redirect(
    r: Reader, path: str, m: Mapping[str, object], matches: list[HttpMatch]
) -> Redirect | None:
    d = r.obj(
        m,
        "redirect",
        path,
        ("uri", "authority", "port", "derivePort", "scheme", "redirectCode", "prefixRewrite"),
    )
    if d is None:
        return None
    here = join_path(path, "redirect")
    uri = r.string(d, "uri", here)
    prefix = r.string(d, "prefixRewrite", here)
    # pkg/config/validation/validation.go (validateHTTPRedirect)
    if uri and prefix:
        r.error(here, "redirect may only specify one of uri or prefixRewrite")
    if prefix and any(mt.uri is not None and mt.uri.kind != "prefix" for mt in matches):
        r.error(
            join_path(here, "prefixRewrite"),
            "redirect prefixRewrite requires all URI matches to use prefix match type",
        )
    authority = r.string(d, "authority", here)
    port = r.port(d, "port", here)
    derive = r.enum(d, "derivePort", here, ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"))
    scheme = r.string(d, "scheme", here)
    code = r.integer(d, "redirectCode", here)
    if d.get("port") is not None and d.get("derivePort") is not None:
        r.error(here, "only one of port or derivePort may be set")
    if not (uri or prefix or authority or scheme or d.get("port") is not None or derive):
        r.error(here, "redirect must specify URI, authority, scheme, or port")
    if scheme is not None and scheme not in ("http", "https"):
        r.error(join_path(here, "scheme"), 'invalid redirect scheme, must be "http" or "https"')
    if code is not None and code not in (301, 302, 303, 307, 308):
        if 300 <= code <= 399:
            r.error(
                join_path(here, "redirectCode"),
                f"redirect code {code} is not supported by Istio (301, 302, 303, 307, 308)",
            )
        else:
            r.error(
                join_path(here, "redirectCode"), f"{code} is not a valid redirect code, must be 3xx"
            )
        code = None
    derive_value = derive if derive in ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT") else None
    return Redirect(
        uri or None,
        authority or None,
        port,
        derive_value,  # type: ignore[arg-type]
        scheme or None,
        code or 301,
        prefix or None,
    )


def _direct_response(r: Reader, path: str, m: Mapping[str, object]) -> DirectResponse | None:
    d = r.obj(m, "directResponse", path, ("status", "body"))
    if d is None:
        return None
    here = join_path(path, "directResponse")
    status = r.integer(d, "status", here, required=True)
    if status is not None and not 200 <= status <= 599:
        r.error(join_path(here, "status"), f"HTTP status {status} is not in range 200-599")
        status = None
    body_obj = r.obj(d, "body", here, ("string", "bytes"))
    body: bytes | None = None
    if body_obj is not None:
        bpath = join_path(here, "body")
        text = r.string(body_obj, "string", bpath)
        raw = r.string(body_obj, "bytes", bpath)
        if text is not None and raw is not None:
            r.error(bpath, "only one of string or bytes may be set")
        elif text is not None:
            body = text.encode()
        elif raw is not None:
            try:
                body = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                r.error(join_path(bpath, "bytes"), "not valid base64")
        if body is not None and len(body) > 1024 * 1024:
            r.error(
                bpath,
                "large direct_responses may impact control plane performance, must "
                "be less than 1MB",
            )
    if status is None:
        return None
    return DirectResponse(status, body)


def _rewrite(r: Reader, path: str, m: Mapping[str, object]) -> Rewrite | None:
    d = r.obj(m, "rewrite", path, ("uri", "authority", "uriRegexRewrite"))
    if d is None:
        return None
    here = join_path(path, "rewrite")
    uri = r.string(d, "uri", here)
    authority = r.string(d, "authority", here)
    regex = r.obj(d, "uriRegexRewrite", here, ("match", "rewrite"))
    uri_regex: tuple[str, str] | None = None
    if regex is not None:
        rpath = join_path(here, "uriRegexRewrite")
        pattern = r.string(regex, "match", rpath)
        substitution = r.string(regex, "rewrite", rpath)
        if not pattern or not substitution:
            r.error(rpath, "UriRegexRewrite requires both Rewrite and Match fields to be specified")
        elif regex_ok(r, join_path(rpath, "match"), pattern):
            uri_regex = (pattern, substitution)
    if uri and regex is not None:
        r.error(here, "rewrite may only contain one of URI or UriRegexRewrite")
    if not uri and regex is None and not authority:
        r.error(here, "rewrite must specify at least one of URI, UriRegexRewrite, or authority")
    return Rewrite(uri or None, authority or None, uri_regex)


def _header_ops(
    r: Reader, m: Mapping[str, object], key: str, path: str, *, request: bool
) -> HeaderOperations:
    d = r.obj(m, key, path, ("set", "add", "remove"))
    if d is None:
        return HeaderOperations()
    here = join_path(path, key)
    out: dict[str, tuple[tuple[str, str], ...]] = {}
    for op in ("set", "add"):
        values = r.string_map(d, op, here) or {}
        for name, value in values.items():
            hpath = join_path(join_path(here, op), name)
            problem = _header_op_name_problem(name, allow_authority=request)
            if problem:
                r.error(hpath, problem)
            elif not _HEADER_VALUE.fullmatch(value):
                r.error(hpath, f"header value configuration {value!r} is invalid")
        # Istio sorts the options by header name.
        out[op] = tuple(sorted(values.items(), key=lambda kv: kv[0]))
    removes = [name for _, name in r.string_list(d, "remove", here)]
    for i, name in enumerate(removes):
        problem = _header_op_name_problem(name, allow_authority=False)
        if problem:
            r.error(join_path(join_path(here, "remove"), i), problem)
    return HeaderOperations(out["set"], out["add"], tuple(removes))


def _header_op_name_problem(name: str, *, allow_authority: bool) -> str | None:
    if name == "":
        return "header name cannot be empty"
    lowered = name.lower()
    if allow_authority and lowered in ("host", ":authority"):
        return None
    if lowered == "host":
        return f'invalid header "{name}": cannot set Host header'
    if name.startswith(":"):
        return f'invalid header "{name}": header cannot have ":" prefix'
    return None


def _headers(r: Reader, m: Mapping[str, object], key: str, path: str) -> Headers | None:
    d = r.obj(m, key, path, ("request", "response"))
    if d is None:
        return None
    here = join_path(path, key)
    return Headers(
        _header_ops(r, d, "request", here, request=True),
        _header_ops(r, d, "response", here, request=False),
    )


def _check_authority_once(
    r: Reader, path: str, rewrite: Rewrite | None, headers: Headers | None
) -> None:
    current = rewrite.authority if rewrite else None
    if headers is None:
        return
    for name, value in (*headers.request.set, *headers.request.add):
        if name.lower() not in ("host", ":authority"):
            continue
        if current:
            r.error(
                join_path(path, "headers"),
                f"authority header cannot be set multiple "
                f"times: have {current!r}, attempting to set {value!r}",
            )
            return
        current = value


def _retries(
    r: Reader, path: str, m: Mapping[str, object]
) -> tuple[RetryPolicy | None, bool, bool | None]:
    d = r.obj(
        m,
        "retries",
        path,
        (
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
            "backoff",
        ),
    )
    if d is None:
        return RetryPolicy(), False, None
    here = join_path(path, "retries")
    attempts = r.integer(d, "attempts", here) or 0
    if attempts < 0:
        r.error(join_path(here, "attempts"), "attempts cannot be negative")
    per_try = r.duration(d, "perTryTimeout", here)
    retry_on = r.string(d, "retryOn", here)
    remote = r.boolean(d, "retryRemoteLocalities", here)
    ignore_previous = r.boolean(d, "retryIgnorePreviousHosts", here)
    backoff = r.duration(d, "backoff", here)
    if attempts == 0 and (d.get("perTryTimeout") is not None or retry_on or remote is not None):
        r.error(here, "http retry policy configured when attempts are set to 0 (disabled)")
    if attempts <= 0:
        return None, True, ignore_previous
    policy = RetryPolicy(
        attempts=attempts,
        per_try_timeout=per_try,
        retry_remote_localities=bool(remote),
        backoff=backoff,
        explicit=True,
    )
    if retry_on:
        conditions: list[str] = []
        codes: list[int] = []
        for part in retry_on.split(","):
            piece = part.strip()
            if piece.isdigit() and int(piece) in _HTTP_STATUSES:
                codes.append(int(piece))
            elif piece in _RETRY_ON:
                conditions.append(piece)
            elif piece:
                hint = did_you_mean(piece, sorted(_RETRY_ON))
                r.error(join_path(here, "retryOn"), f"{part!r} is not a valid retryOn policy{hint}")
        if codes and "retriable-status-codes" not in conditions:
            conditions.append("retriable-status-codes")
        policy = RetryPolicy(
            attempts=attempts,
            retry_on=tuple(conditions),
            retriable_status_codes=tuple(codes),
            per_try_timeout=per_try,
            retry_remote_localities=bool(remote),
            backoff=backoff,
            explicit=True,
        )
    return policy, True, ignore_previous
