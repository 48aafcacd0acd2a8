"""Istio resources -> the configuration model (``proxy.config``), with Istio's semantics.

Theory
------
Users bring the YAML their cluster already runs, so this module reads Istio's own API (group
``networking.istio.io``, versions v1alpha3, v1beta1 and v1) and reproduces what istiod does
with it before Envoy sees anything.  The rules below are read from istio/istio (pilot's
``route.go``, ``gateway.go``, ``cluster_traffic_policy.go``, ``util.go``, ``destination_rule.go``
and ``pkg/config/validation``), not guessed:

* **Names.**  A short host ``svc`` in namespace ``ns`` becomes ``svc.ns.svc.cluster.local``; a
  name with a dot is taken as written (so ``svc.ns`` is *not* expanded - Istio's own trap);
  ``*`` and IP addresses stay.  The namespace is ``metadata.namespace``, else ``default``.
  Gateway references: ``name`` -> ``<vs namespace>/name``, ``ns/name``, ``./name``, and the
  legacy ``name.ns.svc.cluster.local``.
* **Routes.**  Each ``http[]`` entry becomes one Envoy route per ``match[]`` entry, in order;
  first match wins.  A route is *catch-all* when its path test is prefix ``/`` (or regex ``.*``)
  and it tests no header, method, authority, scheme or query parameter; building stops at the
  first catch-all of a VirtualService, and when several VirtualServices share a host the
  catch-alls move to the end (``SortVHostRoutes``).  That part lives in ``proxy.routing``.
* **Hash policy of a route** comes from the destination host's DestinationRule:
  subset port-level > subset > port-level > top-level ``consistentHash``, where the port-level
  entries are only consulted when the destination names its port (``hashForHTTPDestination``).
* **Cluster traffic policy** (``MergeSubsetTrafficPolicy``): the top-level policy, replaced
  *wholesale* by a port-level entry for the cluster's port (no inheritance: omitted fields get
  defaults); then the subset's fields override one by one, unless the subset has a port-level
  entry for the port, which again replaces all four (loadBalancer, connectionPool,
  outlierDetection, tls).  No DestinationRule, or no loadBalancer: LEAST_REQUEST.
* **Several DestinationRules for one host** merge as in Istio: subsets are concatenated (the
  first of a name wins), the first top-level traffic policy wins.
* **Destination port** when omitted: the ServiceEntry's only port, else the listener port
  (``GetDestinationCluster``) - so one route can target different clusters per Gateway port.
* **Endpoints**: a ServiceEntry gives them (STATIC addresses, or DNS names; endpoint ``ports``
  map the service port by name, else ``targetPort``, else the port itself; weight 0 means 1);
  a host without a ServiceEntry is resolved through DNS at the destination port (a Kubernetes
  headless Service answers one address per pod).  Subsets select endpoints by labels.

* **Gateways**: servers on one port merge into one listener; ``selector`` is accepted and
  ignored (sticky-proxy *is* the gateway it would select); HTTPS/TLS/TCP servers are skipped
  with a warning (plain HTTP only); ``tls.httpsRedirect`` answers 301 to https.

Strictness: unknown fields, wrong types, bad durations (Go ``time.ParseDuration`` syntax: Istio
decodes specs with the legacy ``golang/protobuf/jsonpb``, whose Duration parser it is), missing
required fields, non-prime Maglev sizes and references to missing gateways or subsets are errors
naming the file, resource and YAML path. Istio fields that sticky-proxy does not act on (fault,
mirror, corsPolicy, tls origination, ...) are accepted with a warning. Ordering: resources apply in
the order they are read (files in the order given, a folder's ``*.yaml``/``*.yml`` by name,
documents in file order) - the order ``kubectl apply -f`` would create them in, which is Istio's
creation-time order.
"""

from __future__ import annotations

import base64
import binascii
import http
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import yaml

from proxy.affinity import (
    CookieAttribute,
    CookiePolicy,
    HashPolicy,
    HeaderPolicy,
    QueryParameterPolicy,
    SourceIPPolicy,
)
from proxy.config import (
    DEFAULT_LB,
    DEFAULT_POOL,
    UINT32_MAX,
    ClusterSpec,
    Config,
    ConfigError,
    ConnectionPoolSettings,
    ConsistentHashLB,
    Destination,
    DirectResponse,
    DnsEndpoints,
    Endpoint,
    GatewayServer,
    GatewaySpec,
    HeaderOperations,
    Headers,
    HttpMatch,
    HttpRoute,
    Issues,
    ListenerSpec,
    LoadBalancerSettings,
    OutlierDetection,
    Reader,
    Redirect,
    RetryPolicy,
    Rewrite,
    RouteDestination,
    ServerHost,
    StaticEndpoints,
    StringMatch,
    TcpKeepalive,
    VirtualServiceSpec,
    cluster_name,
    destination_port,
    did_you_mean,
    fqdn_problem,
    host_subset_of,
    is_dns1123_label,
    is_ip,
    join_path,
    labels_match,
    labels_of,
    type_name,
    wildcard_domain_problem,
)
from proxy.health import parse_health_check

API_GROUP = "networking.istio.io"
API_VERSIONS = ("v1alpha3", "v1beta1", "v1")
KINDS = ("Gateway", "VirtualService", "DestinationRule", "ServiceEntry")
DEFAULT_NAMESPACE = "default"
CLUSTER_DOMAIN = "cluster.local"
HEALTH_CHECK_ANNOTATION = "sticky-proxy/health-check"
MESH_GATEWAY = "mesh"

NOT_SUPPORTED = "not supported by sticky-proxy"


def resolve_short_name(host: str, namespace: str) -> str:
    """Istio's ``ResolveShortnameToFQDN``: ``svc`` -> ``svc.<ns>.svc.cluster.local``."""
    if host == "*" or "." in host or is_ip(host):
        return host
    return f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}"


def resolve_gateway_name(name: str, namespace: str) -> str:
    """Istio's ``resolveGatewayName``: a VirtualService's gateway reference -> ``ns/name``."""
    if name == MESH_GATEWAY:
        return name
    if "/" in name:
        ns, _, gw = name.partition("/")
        return f"{namespace}/{gw}" if ns == "." else name
    if "." not in name:
        return f"{namespace}/{name}"
    # Legacy FQDN form name.ns[.svc.cluster.local].
    gw, _, rest = name.partition(".")
    return f"{rest.split('.', 1)[0]}/{gw}"


# --------------------------------------------------------------------------- reading files


class _Loader(yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader):  # type: ignore[misc]
    """A safe loader that records duplicate keys instead of keeping the last one silently."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue
            if duplicate:
                self.duplicates.append((key_node.start_mark.line + 1, str(key)))
            seen.add(key)
        result: dict[object, object] = super().construct_mapping(node, deep=deep)
        return result


def _files(paths: Sequence[str], issues: Issues) -> list[str]:
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(name for name in os.listdir(path) if name.endswith((".yaml", ".yml")))
            if not found:
                issues.errors.append(f"{path}: no .yaml or .yml files in this folder")
            files.extend(os.path.join(path, name) for name in found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            issues.errors.append(f"{path}: no such file or folder")
    return files


def _documents(path: str, issues: Issues) -> list[tuple[str, object]]:
    """``(where, data)`` for each document of a file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        issues.errors.append(f"{path}: cannot read: {exc}")
        return []
    return _parse_text(text, path, issues)


def _parse_text(text: str, name: str, issues: Issues) -> list[tuple[str, object]]:
    """``(where, data)`` per document; ``where`` is ``name`` or ``name[N]`` (N from 1)."""
    docs: list[tuple[object, list[tuple[int, str]]]] = []
    loader = _Loader(text)
    try:
        while loader.check_data():
            data = loader.get_data()
            docs.append((data, loader.duplicates))
            loader.duplicates = []
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc)
        issues.errors.append(f"{where}: invalid YAML: {problem}")
    finally:
        loader.dispose()
    several = sum(1 for data, _ in docs if data is not None) > 1
    out: list[tuple[str, object]] = []
    for index, (data, duplicates) in enumerate(docs, start=1):
        where = f"{name}[{index}]" if several else name
        for line, key in duplicates:
            issues.errors.append(f"{where}: line {line}: duplicate key {key!r}")
        out.append((where, data))
    return out


# --------------------------------------------------------------------------- parsed resources


@dataclass(frozen=True, slots=True)
class _Meta:
    kind: str
    name: str
    namespace: str
    annotations: Mapping[str, str]
    where: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class _Policy:
    """One level of a DestinationRule traffic policy; a None field is "not set here"."""

    lb: LoadBalancerSettings | None = None
    pool: ConnectionPoolSettings | None = None
    outlier: OutlierDetection | None = None
    port_level: tuple[tuple[int, _Policy], ...] = ()

    def for_port(self, port: int) -> tuple[_Policy, bool]:
        for number, policy in self.port_level:
            if number == port:
                return policy, True
        return self, False


@dataclass(frozen=True, slots=True)
class _Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    policy: _Policy | None


@dataclass(slots=True)
class _DestinationRule:
    meta: _Meta
    reader: Reader
    host: str
    policy: _Policy | None
    subsets: list[_Subset]


@dataclass(frozen=True, slots=True)
class _ServicePort:
    number: int
    name: str
    protocol: str
    target: int | None


@dataclass(frozen=True, slots=True)
class _WorkloadEntry:
    address: str
    ports: Mapping[str, int]
    labels: tuple[tuple[str, str], ...]
    weight: int


@dataclass(slots=True)
class _ServiceEntry:
    meta: _Meta
    reader: Reader
    hosts: list[str]
    ports: list[_ServicePort]
    resolution: str
    endpoints: list[_WorkloadEntry]


@dataclass(frozen=True, slots=True)
class _RawDestination:
    path: str
    destination: Destination
    weight: int
    headers: Headers | None


@dataclass(frozen=True, slots=True)
class _RawRoute:
    """An ``http[]`` entry before the DestinationRules are known (hash policies, retries)."""

    path: str
    route: HttpRoute
    destinations: tuple[_RawDestination, ...]
    match_gateway_paths: tuple[tuple[str, str], ...]  # (path, resolved gateway)
    retries_set: bool
    ignore_previous_hosts: bool | None


@dataclass(slots=True)
class _VirtualService:
    meta: _Meta
    reader: Reader
    hosts: list[str]
    gateways: list[tuple[str, str]]  # (path, resolved)
    routes: list[_RawRoute]


@dataclass(slots=True)
class _Parsed:
    gateways: list[tuple[GatewaySpec, Reader]] = field(default_factory=list)
    virtual_services: list[_VirtualService] = field(default_factory=list)
    destination_rules: list[_DestinationRule] = field(default_factory=list)
    service_entries: list[_ServiceEntry] = field(default_factory=list)
    seen: dict[tuple[str, str], str] = field(default_factory=dict)


# --------------------------------------------------------------------------- documents


def _read_document(issues: Issues, where: str, data: object, out: _Parsed) -> None:
    if data is None:
        return
    bare = Reader(issues, where, "")
    if not isinstance(data, dict):
        bare.error("", f"expected a Kubernetes object, got {type_name(data)}")
        return
    kind = data.get("kind")
    if kind == "List" and isinstance(data.get("items"), list):
        for i, item in enumerate(data["items"]):
            _read_document(issues, f"{where} items[{i}]", item, out)
        return
    if not isinstance(kind, str) or not kind:
        bare.error("kind", "required")
        return
    metadata = data.get("metadata")
    raw_name = metadata.get("name") if isinstance(metadata, dict) else None
    name = raw_name if isinstance(raw_name, str) and raw_name else ""
    api = data.get("apiVersion")
    group, _, version = api.partition("/") if isinstance(api, str) else ("", "", "")
    if kind not in KINDS or (group and group != API_GROUP):
        label = f"{kind} {name}".strip()
        group_note = f" ({api})" if isinstance(api, str) and kind in KINDS else ""
        issues.warnings.append(
            f"{where}: skipped {label}{group_note}: sticky-proxy reads only "
            f"{API_GROUP} Gateway, VirtualService, DestinationRule and ServiceEntry"
        )
        return
    r = Reader(issues, where, f"{kind} {name}" if name else kind)
    top = r.mapping(data, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if top is None:
        return
    if not isinstance(api, str):
        r.error("apiVersion", f"required ({API_GROUP}/v1, v1beta1 or v1alpha3)")
    elif version not in API_VERSIONS:
        versions = ", ".join(f"{API_GROUP}/{v}" for v in API_VERSIONS)
        r.error(
            "apiVersion",
            f"unknown version {api!r}{did_you_mean(version, API_VERSIONS)}; one of {versions}",
        )
    meta = _metadata(r, kind, metadata)
    spec = top.get("spec")
    if spec is None:
        r.error("spec", "required")
        return
    if meta is None:
        return
    previous = out.seen.get((kind, meta.key))
    if previous is not None:
        r.error("metadata.name", f"duplicate {kind} {meta.key} (first defined in {previous})")
        return
    out.seen[(kind, meta.key)] = where
    if kind == "Gateway":
        gateway = _gateway(r, meta, spec)
        if gateway is not None:
            out.gateways.append((gateway, r))
    elif kind == "VirtualService":
        vs = _virtual_service(r, meta, spec)
        if vs is not None:
            out.virtual_services.append(vs)
    elif kind == "DestinationRule":
        dr = _destination_rule(r, meta, spec)
        if dr is not None:
            out.destination_rules.append(dr)
    else:
        se = _service_entry(r, meta, spec)
        if se is not None:
            out.service_entries.append(se)


def _metadata(r: Reader, kind: str, metadata: object) -> _Meta | None:
    if metadata is None:
        r.error("metadata", "required")
        return None
    if not isinstance(metadata, dict):
        r.error("metadata", f"expected an object, got {type_name(metadata)}")
        return None
    name = r.string(metadata, "name", "metadata", required=True)
    namespace = r.string(metadata, "namespace", "metadata") or DEFAULT_NAMESPACE
    if not is_dns1123_label(namespace):
        r.error("metadata.namespace", f"invalid namespace {namespace!r}")
    annotations = r.string_map(metadata, "annotations", "metadata") or {}
    check = annotations.get(HEALTH_CHECK_ANNOTATION)
    if check is not None:
        try:
            parse_health_check(check)
        except ValueError as exc:
            r.error(f"metadata.annotations.{HEALTH_CHECK_ANNOTATION}", str(exc))
    r.string_map(metadata, "labels", "metadata")
    if name is None:
        return None
    return _Meta(kind, name, namespace, MappingProxyType(annotations), r.where)


def _words(text: str) -> tuple[str, ...]:
    """Field and value lists, written as text to keep the tables short."""
    return tuple(text.split())


# --------------------------------------------------------------------------- Gateway

_PROTOCOLS = _words("HTTP HTTPS GRPC GRPC-WEB HTTP2 MONGO REDIS MYSQL TCP TLS UDP")
_HTTP_LIKE = ("HTTP2", "GRPC", "GRPC-WEB")
_SERVER_TLS_FIELDS = _words(
    "httpsRedirect mode serverCertificate privateKey caCertificates caCrl credentialName "
    "credentialNames tlsCertificates subjectAltNames verifyCertificateSpki "
    "verifyCertificateHash minProtocolVersion maxProtocolVersion cipherSuites"
)


def _gateway(r: Reader, meta: _Meta, spec: object) -> GatewaySpec | None:
    s = r.mapping(spec, "spec", ("servers", "selector"))
    if s is None:
        return None
    if not is_dns1123_label(meta.name):
        r.error("metadata.name", f"invalid gateway name: {meta.name!r} (a DNS label: no dots)")
    selector = r.string_map(s, "selector", "spec") or {}
    servers: list[GatewayServer] = []
    port_names: dict[str, str] = {}
    for path, item in r.items(s, "servers", "spec", required=True):
        server = _server(r, path, item, meta.namespace)
        if server is None:
            continue
        if server.port_name in port_names:
            r.error(
                join_path(path, "port") + ".name",
                f"port names in servers must be unique: duplicate name {server.port_name} "
                f"(also {port_names[server.port_name]})",
            )
        port_names[server.port_name] = path
        servers.append(server)
    return GatewaySpec(meta.name, meta.namespace, tuple(servers), labels_of(selector), meta.where)


def _server(r: Reader, path: str, item: object, namespace: str) -> GatewayServer | None:
    m = r.mapping(
        item,
        path,
        ("port", "bind", "hosts", "tls", "name"),
        {"defaultEndpoint": "used by Sidecars only"},
    )
    if m is None:
        return None
    port = r.obj(
        m,
        "port",
        path,
        ("number", "protocol", "name"),
        {"targetPort": "has no impact on Gateways"},
        required=True,
    )
    ppath = join_path(path, "port")
    number = protocol = port_name = None
    if port is not None:
        number = r.port(port, "number", ppath, required=True)
        raw_protocol = r.string(port, "protocol", ppath, required=True)
        if raw_protocol is not None:
            protocol = raw_protocol.upper()
            if protocol not in _PROTOCOLS:
                r.error(
                    join_path(ppath, "protocol"),
                    f"invalid protocol {raw_protocol!r}{did_you_mean(raw_protocol, _PROTOCOLS)}"
                    f"; one of {', '.join(_PROTOCOLS)}",
                )
                protocol = None
        port_name = r.string(port, "name", ppath, required=True)
    hosts: list[ServerHost] = []
    for hpath, text in r.string_list(m, "hosts", path, required=True):
        parsed = _server_host(r, hpath, text, namespace)
        if parsed is not None:
            hosts.append(parsed)
    bind = r.string(m, "bind", path) or ""
    if bind.startswith("unix://"):
        r.error(join_path(path, "bind"), f"unix domain sockets are {NOT_SUPPORTED}")
    elif bind and not is_ip(bind):
        r.error(join_path(path, "bind"), f"{bind!r} is not a valid IP address")
    tls = r.obj(m, "tls", path, _SERVER_TLS_FIELDS)
    https_redirect = bool(tls and r.boolean(tls, "httpsRedirect", join_path(path, "tls")))
    name = r.string(m, "name", path) or ""
    if number is None or protocol is None or port_name is None:
        return None
    served = True
    if protocol in ("HTTPS", "TLS"):
        if tls is None:
            r.error(join_path(path, "tls"), "server must have TLS settings for HTTPS/TLS protocols")
        served = False
    elif tls is not None:
        if protocol == "HTTP" and set(tls) - {"httpsRedirect"}:
            r.error(
                join_path(path, "tls"),
                "server cannot have TLS settings for plain text HTTP ports (only httpsRedirect)",
            )
        elif protocol != "HTTP" and protocol not in _HTTP_LIKE:
            r.error(
                join_path(path, "tls"), "server cannot have TLS settings for non HTTPS/TLS ports"
            )
    if https_redirect and protocol != "HTTP":
        r.warn(
            join_path(path, "tls.httpsRedirect"),
            "tls.httpsRedirect should only be used with http servers",
        )
    if protocol in _HTTP_LIKE:
        r.warn(join_path(ppath, "protocol"), f"{protocol} is served as HTTP/1.1 by sticky-proxy")
    elif protocol != "HTTP":
        r.warn(
            ppath,
            f"protocol {protocol} is {NOT_SUPPORTED} (plain HTTP only); "
            f"server on port {number} skipped",
        )
        served = False
    return GatewayServer(
        number, port_name, protocol, tuple(hosts), bind, name, https_redirect, served
    )


def _server_host(r: Reader, path: str, text: str, namespace: str) -> ServerHost | None:
    ns, slash, host = text.partition("/")
    if not slash:
        ns, host = "*", text
    if ns == ".":
        ns = namespace
    if ns != "*" and not is_dns1123_label(ns):
        r.error(path, f"namespace {ns!r} in {text!r} must be *, . or a namespace name")
        return None
    problem = None if host == "*" else wildcard_domain_problem(host)
    if problem is not None:
        r.error(path, problem)
        return None
    return ServerHost(ns, host)


# --------------------------------------------------------------------------- VirtualService

_HTTP_ROUTE_FIELDS = _words(
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
_MATCH_FIELDS = _words(
    "name uri scheme method authority headers port sourceLabels gateways queryParams "
    "ignoreUriCase withoutHeaders sourceNamespace"
)
_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+")
_HEADER_VALUE = re.compile(r"[^\x00-\x08\x0A-\x1F\x7F]*")
_RE2_UNSUPPORTED = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=")
_RETRY_ON = frozenset(
    _words(
        "5xx gateway-error reset reset-before-request connect-failure retriable-4xx "
        "refused-stream retriable-status-codes retriable-headers envoy-ratelimited "
        "http3-post-connect-failure cancelled deadline-exceeded internal resource-exhausted "
        "unavailable"
    )
)
_HTTP_STATUSES = frozenset(int(s) for s in http.HTTPStatus)


def _virtual_service(r: Reader, meta: _Meta, spec: object) -> _VirtualService | None:
    s = r.mapping(
        spec,
        "spec",
        ("hosts", "gateways", "http", "exportTo"),
        {"tls": f"TLS routes are {NOT_SUPPORTED}", "tcp": f"TCP routes are {NOT_SUPPORTED}"},
    )
    if s is None:
        return None
    gateways = [
        (p, resolve_gateway_name(g, meta.namespace))
        for p, g in r.string_list(s, "gateways", "spec")
    ]
    for p, raw in r.string_list(s, "gateways", "spec"):
        _check_gateway_name(r, p, raw)
    mesh_only = not gateways or all(g == MESH_GATEWAY for _, g in gateways)
    hosts: list[str] = []
    raw_hosts = r.string_list(s, "hosts", "spec", required=True)
    for p, host in raw_hosts:
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
    routes: list[_RawRoute] = []
    for index, (path, item) in enumerate(r.items(s, "http", "spec")):
        route = _http_route(r, meta, index, path, item)
        if route is not None:
            routes.append(route)
    if s.get("http") is None and s.get("tls") is None and s.get("tcp") is None:
        r.error("spec", "http, tcp or tls must be provided in virtual service")
    return _VirtualService(meta, r, hosts, gateways, routes)


def _check_gateway_name(r: Reader, path: str, name: str) -> None:
    if name == MESH_GATEWAY:
        return
    ns, slash, gw = name.partition("/")
    if slash:
        if not ns or not gw:
            r.error(path, "config namespace and gateway name cannot be empty")
        elif ns != "." and not is_dns1123_label(ns):
            r.error(path, f"invalid value for namespace: {ns!r}")
        elif not is_dns1123_label(gw):
            r.error(path, f"invalid value for gateway name: {gw!r}")
    elif fqdn_problem(name) is not None:
        r.error(path, f"invalid gateway name {name!r}")


def _http_route(r: Reader, meta: _Meta, index: int, path: str, item: object) -> _RawRoute | None:
    m = r.mapping(item, path, (*_HTTP_ROUTE_FIELDS, "delegate"), _HTTP_ROUTE_IGNORED)
    if m is None:
        return None
    if m.get("delegate") is not None:
        r.error(
            join_path(path, "delegate"),
            f"delegate VirtualServices are {NOT_SUPPORTED} (inline the delegate's routes)",
        )
    name = r.string(m, "name", path) or ""
    matches: list[HttpMatch] = []
    gateway_refs: list[tuple[str, str]] = []
    for mpath, raw in r.items(m, "match", path):
        match = _match(r, meta, mpath, raw)
        if match is not None:
            matches.append(match)
            gateway_refs.extend(
                (join_path(join_path(mpath, "gateways"), i), g)
                for i, g in enumerate(match.gateways)
            )
    destinations: list[_RawDestination] = []
    total = 0
    for dpath, raw in r.items(m, "route", path):
        dest = _route_destination(r, meta, dpath, raw)
        if dest is not None:
            destinations.append(dest)
            total += dest.weight
    if len(destinations) > 1 and total == 0:
        r.error(join_path(path, "route"), "total destination weight = 0")
    redirect = _redirect(r, path, m)
    direct = _direct_response(r, path, m)
    rewrite = _rewrite(r, path, m)
    headers = _headers(r, m, "headers", path)
    has_route = m.get("route") is not None
    if redirect is not None or m.get("redirect") is not None:
        if has_route:
            r.error(path, "HTTP route cannot contain both route and redirect")
        if m.get("directResponse") is not None:
            r.error(path, "HTTP route cannot contain both redirect and directResponse")
        if m.get("rewrite") is not None:
            r.error(path, "HTTP route rule cannot contain both rewrite and redirect")
    elif m.get("directResponse") is not None:
        if has_route:
            r.error(path, "HTTP route cannot contain both route and directResponse")
    elif not has_route and m.get("delegate") is None:
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
    return _RawRoute(
        path, route, tuple(destinations), tuple(gateway_refs), retries_set, ignore_previous
    )


def _string_match(r: Reader, path: str, raw: object, *, presence: bool) -> StringMatch | None:
    """Istio StringMatch; ``presence``: ``{}`` or regex ``*`` test presence (headers, query)."""
    m = r.mapping(raw, path, ("exact", "prefix", "regex"))
    if m is None:
        if raw is None and presence:
            return StringMatch("present")
        return None
    set_keys = [k for k in ("exact", "prefix", "regex") if m.get(k) is not None]
    if len(set_keys) > 1:
        r.error(
            path, f"only one of exact, prefix or regex may be set (found {', '.join(set_keys)})"
        )
        return None
    if not set_keys:
        return StringMatch("present")
    kind = set_keys[0]
    value = r.string(m, kind, path)
    if value is None:
        return None
    here = join_path(path, kind)
    if kind == "regex":
        if presence and value == "*":
            return StringMatch("present")
        if not _regex_ok(r, here, value):
            return None
        return StringMatch("regex", value)
    if kind == "prefix" and value == "":
        r.error(here, "prefix string match should not be empty")
        return None
    return StringMatch("exact" if kind == "exact" else "prefix", value)


def _regex_ok(r: Reader, path: str, pattern: str) -> bool:
    if pattern == "":
        r.error(path, "regex string match should not be empty")
        return False
    if len(pattern) > 1024:
        r.error(path, "regex is too large, max length allowed is 1024")
        return False
    if _RE2_UNSUPPORTED.search(pattern):
        r.error(
            path,
            f"{pattern!r}: lookarounds and backreferences are not RE2 syntax; "
            "Istio uses RE2 style regex-based match (https://github.com/google/re2/wiki/Syntax)",
        )
        return False
    try:
        re.compile(pattern)
    except re.error as exc:
        r.error(
            path,
            f"{pattern!r}: {exc}; Istio uses RE2 style regex-based match "
            "(https://github.com/google/re2/wiki/Syntax)",
        )
        return False
    return True


def _match(r: Reader, meta: _Meta, path: str, raw: object) -> HttpMatch | None:
    m = r.mapping(raw, path, _MATCH_FIELDS, {"statPrefix": "statistics prefixes are not used"})
    if m is None:
        return HttpMatch() if raw is None else None
    fails = r.failed
    r.failed = False
    uri = _string_field(r, m, "uri", path)
    scheme = _string_field(r, m, "scheme", path)
    method = _string_field(r, m, "method", path)
    authority = _string_field(r, m, "authority", path)
    headers = _header_matches(r, m, "headers", path)
    without = _header_matches(r, m, "withoutHeaders", path)
    query: list[tuple[str, StringMatch]] = []
    qraw = m.get("queryParams")
    qpath = join_path(path, "queryParams")
    if qraw is not None and not isinstance(qraw, dict):
        r.error(qpath, f"expected an object of query parameter matches, got {type_name(qraw)}")
    elif isinstance(qraw, dict):
        for key, value in qraw.items():
            sm = _string_match(r, join_path(qpath, str(key)), value, presence=True)
            if sm is not None:
                query.append((str(key), sm))
    port = r.port(m, "port", path)
    gateways = tuple(
        resolve_gateway_name(g, meta.namespace) for _, g in r.string_list(m, "gateways", path)
    )
    for gpath, g in r.string_list(m, "gateways", path):
        _check_gateway_name(r, gpath, g)
    source_labels = r.string_map(m, "sourceLabels", path) or {}
    source_namespace = r.string(m, "sourceNamespace", path) or ""
    if (source_labels or source_namespace) and not gateways:
        r.warn(
            path,
            "sourceLabels/sourceNamespace select client workloads; sticky-proxy is a "
            "gateway without labels, so this match never applies (as on an Istio gateway)",
        )
    ok = not r.failed
    r.failed = fails or r.failed
    if not ok:
        return None
    return HttpMatch(
        name=r.string(m, "name", path) or "",
        uri=uri,
        scheme=scheme,
        method=method,
        authority=authority,
        headers=tuple(headers),
        without_headers=tuple(without),
        query_params=tuple(query),
        ignore_uri_case=bool(r.boolean(m, "ignoreUriCase", path)),
        port=port,
        gateways=gateways,
        source_labels=labels_of(source_labels),
        source_namespace=source_namespace,
    )


def _string_field(r: Reader, m: Mapping[str, object], key: str, path: str) -> StringMatch | None:
    raw = m.get(key)
    if raw is None:
        return None
    sm = _string_match(r, join_path(path, key), raw, presence=key != "uri")
    if sm is not None and key == "uri" and sm.kind == "present":
        return None  # uri: {} is no constraint (Envoy's prefix "/")
    return sm


def _header_matches(
    r: Reader, m: Mapping[str, object], key: str, path: str
) -> list[tuple[str, StringMatch]]:
    raw = m.get(key)
    here = join_path(path, key)
    if raw is None:
        return []
    if not isinstance(raw, dict):
        r.error(here, f"expected an object of header matches, got {type_name(raw)}")
        return []
    out: list[tuple[str, StringMatch]] = []
    for name, value in raw.items():
        hpath = join_path(here, str(name))
        name = str(name)
        if name.startswith("@request.auth.claims"):
            r.error(hpath, f"JWT claim based routing is {NOT_SUPPORTED}")
            continue
        if not _HEADER_NAME.fullmatch(name):
            r.error(hpath, f"header name {name} is not a valid header name")
            continue
        if value is None:
            r.error(hpath, f"header match {name} cannot be null")
            continue
        sm = _string_match(r, hpath, value, presence=True)
        if sm is not None:
            out.append((name.lower(), sm))
    return out


def _route_destination(r: Reader, meta: _Meta, path: str, raw: object) -> _RawDestination | None:
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
    return _RawDestination(path, dest, weight or 0, headers)


def _destination(r: Reader, meta: _Meta, path: str, m: Mapping[str, object]) -> Destination | None:
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
    if host == "*":
        r.error(join_path(dpath, "host"), "invalid destination host *")
        return None
    problem = None if is_ip(host) else wildcard_domain_problem(host)
    if problem is not None:
        r.error(join_path(dpath, "host"), problem)
        return None
    return Destination(resolve_short_name(host, meta.namespace), port, subset or None)


def _redirect(r: Reader, path: str, m: Mapping[str, object]) -> Redirect | None:
    d = r.obj(
        m, "redirect", path, ("uri", "authority", "port", "derivePort", "scheme", "redirectCode")
    )
    if d is None:
        return None
    here = join_path(path, "redirect")
    uri = r.string(d, "uri", here)
    authority = r.string(d, "authority", here)
    port = r.port(d, "port", here)
    derive = r.enum(d, "derivePort", here, ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"))
    scheme = r.string(d, "scheme", here)
    code = r.integer(d, "redirectCode", here)
    if d.get("port") is not None and d.get("derivePort") is not None:
        r.error(here, "only one of port or derivePort may be set")
    if not (uri or authority or scheme or d.get("port") is not None or derive):
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
        elif _regex_ok(r, join_path(rpath, "match"), pattern):
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
        )
    return policy, True, ignore_previous


# --------------------------------------------------------------------------- DestinationRule

_LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
_CLIENT_TLS_FIELDS = _words(
    "mode clientCertificate privateKey caCertificates credentialName subjectAltNames sni "
    "insecureSkipVerify caCrl"
)
_POLICY_IGNORED = {
    "tunnel": f"tunnel settings are {NOT_SUPPORTED}",
    "proxyProtocol": f"the PROXY protocol is {NOT_SUPPORTED}",
    "retryBudget": f"retry budgets are {NOT_SUPPORTED}",
}


def _destination_rule(r: Reader, meta: _Meta, spec: object) -> _DestinationRule | None:
    s = r.mapping(
        spec,
        "spec",
        ("host", "trafficPolicy", "subsets", "exportTo"),
        {"workloadSelector": "a DestinationRule here applies to every request"},
    )
    if s is None:
        return None
    host = r.string(s, "host", "spec", required=True)
    if host is not None:
        problem = None if is_ip(host) else wildcard_domain_problem(host)
        if problem is not None:
            r.error("spec.host", problem)
            host = None
    policy = _traffic_policy(r, s.get("trafficPolicy"), "spec.trafficPolicy", port_level=True)
    subsets: list[_Subset] = []
    names: set[str] = set()
    for path, raw in r.items(s, "subsets", "spec"):
        sm = r.mapping(raw, path, ("name", "labels", "trafficPolicy"))
        if sm is None:
            if raw is None:
                r.error(path, "subset may not be null")
            continue
        name = r.string(sm, "name", path, required=True)
        labels = r.string_map(sm, "labels", path) or {}
        sub_policy = _traffic_policy(
            r, sm.get("trafficPolicy"), join_path(path, "trafficPolicy"), port_level=True
        )
        if name is None:
            continue
        if not is_dns1123_label(name):
            r.error(join_path(path, "name"), f"subset name is invalid: {name}")
        if name in names:
            r.error(join_path(path, "name"), f"duplicate subset names: {name}")
        names.add(name)
        subsets.append(_Subset(name, labels_of(labels), sub_policy))
    if host is None:
        return None
    return _DestinationRule(meta, r, resolve_short_name(host, meta.namespace), policy, subsets)


def _traffic_policy(r: Reader, raw: object, path: str, *, port_level: bool) -> _Policy | None:
    fields = ["loadBalancer", "connectionPool", "outlierDetection", "tls"]
    if port_level:
        fields.append("portLevelSettings")
    else:
        fields.append("port")
    m = r.mapping(raw, path, fields, _POLICY_IGNORED if port_level else None)
    if m is None:
        return None
    present = [f for f in fields if f != "port" and m.get(f) is not None]
    if port_level:
        ignored = isinstance(raw, dict) and any(raw.get(k) is not None for k in _POLICY_IGNORED)
        if not present and not ignored:
            r.error(path, "traffic policy must have at least one field")
    elif not present:
        r.error(path, "port traffic policy must have at least one field")
    lb = _load_balancer(r, m, path)
    pool = _connection_pool(r, m, path)
    outlier = _outlier(r, m, path)
    tls = r.obj(m, "tls", path, _CLIENT_TLS_FIELDS)
    if tls is not None:
        mode = r.enum(
            tls, "mode", join_path(path, "tls"), ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
        )
        if mode in ("SIMPLE", "MUTUAL"):
            r.warn(
                join_path(path, "tls.mode"),
                f"TLS origination ({mode}) is {NOT_SUPPORTED}; upstream connections are plain HTTP",
            )
    levels: list[tuple[int, _Policy]] = []
    if port_level:
        for ppath, item in r.items(m, "portLevelSettings", path):
            if item is None:
                r.error(ppath, "traffic policy may not be null")
                continue
            sub = _traffic_policy(r, item, ppath, port_level=False)
            port_obj = item.get("port") if isinstance(item, dict) else None
            if port_obj is None:
                r.error(ppath, "portTrafficPolicy must have valid port")
                continue
            pm = r.mapping(port_obj, join_path(ppath, "port"), ("number",))
            number = r.port(pm, "number", join_path(ppath, "port"), required=True) if pm else None
            if sub is None or number is None:
                continue
            if any(n == number for n, _ in levels):
                r.warn(
                    join_path(ppath, "port") + ".number",
                    f"port {number} appears twice in portLevelSettings; Istio uses the first",
                )
                continue
            levels.append((number, sub))
    return _Policy(lb, pool, outlier, tuple(levels))


def _load_balancer(r: Reader, m: Mapping[str, object], path: str) -> LoadBalancerSettings | None:
    lb = r.obj(
        m,
        "loadBalancer",
        path,
        ("simple", "consistentHash"),
        {
            "localityLbSetting": "locality load balancing is not modelled (one locality)",
            "warmupDurationSecs": f"slow start is {NOT_SUPPORTED}",
            "warmup": f"slow start is {NOT_SUPPORTED}",
        },
    )
    if lb is None:
        return None
    here = join_path(path, "loadBalancer")
    simple = r.enum(lb, "simple", here, _LB_SIMPLE)
    if lb.get("simple") is not None and lb.get("consistentHash") is not None:
        r.error(here, "only one of simple or consistentHash may be set")
        return None
    if lb.get("consistentHash") is not None:
        ch = _consistent_hash(r, lb, here)
        return LoadBalancerSettings(None, ch) if ch is not None else None
    if simple == "PASSTHROUGH":
        r.error(join_path(here, "simple"), f"PASSTHROUGH (original destination) is {NOT_SUPPORTED}")
        return None
    if simple in (None, "UNSPECIFIED", "LEAST_CONN"):
        simple = "LEAST_REQUEST"  # Istio's default; LEAST_CONN is its deprecated alias
    return LoadBalancerSettings(simple, None)


_HASH_KEYS = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")


def _consistent_hash(r: Reader, lb: Mapping[str, object], path: str) -> ConsistentHashLB | None:
    ch = r.obj(lb, "consistentHash", path, (*_HASH_KEYS, "ringHash", "maglev", "minimumRingSize"))
    if ch is None:
        return None
    here = join_path(path, "consistentHash")
    keys = [k for k in _HASH_KEYS if ch.get(k) is not None]
    policy: HashPolicy | None = None
    if len(keys) > 1:
        r.error(here, f"only one of {', '.join(_HASH_KEYS)} may be set (found {', '.join(keys)})")
    elif not keys:
        r.error(here, f"one of {', '.join(_HASH_KEYS)} is required")
    elif keys[0] == "httpHeaderName":
        name = r.string(ch, "httpHeaderName", here, required=True)
        policy = HeaderPolicy(name.lower()) if name else None
    elif keys[0] == "httpQueryParameterName":
        name = r.string(ch, "httpQueryParameterName", here, required=True)
        policy = QueryParameterPolicy(name) if name else None
    elif keys[0] == "useSourceIp":
        use = r.boolean(ch, "useSourceIp", here)
        if use is False:
            r.error(join_path(here, "useSourceIp"), "must be true to hash on the source IP")
        policy = SourceIPPolicy() if use else None
    else:
        policy = _cookie(r, ch, here)
    deprecated = r.integer(ch, "minimumRingSize", here, minimum=0)
    ring = r.obj(ch, "ringHash", here, ("minimumRingSize",))
    maglev = r.obj(ch, "maglev", here, ("tableSize",))
    if ring is not None and maglev is not None:
        r.error(here, "only one of ringHash or maglev may be set")
        return None
    if deprecated and (ring is not None or maglev is not None):
        r.error(here, "only one of MinimumRingSize or Maglev/Ringhash can be specified")
        return None
    if deprecated:
        r.warn(
            join_path(here, "minimumRingSize"),
            "consistent hash MinimumRingSize is deprecated, "
            "use ConsistentHashLB's RingHash configuration instead",
        )
    if policy is None:
        return None
    if maglev is not None:
        mpath = join_path(here, "maglev")
        size = r.integer(maglev, "tableSize", mpath, minimum=0)
        if not size:
            if size == 0 or maglev.get("tableSize") is None:
                r.error(join_path(mpath, "tableSize"), "tableSize must be set for maglev")
            return None
        if size >= 5000011:
            r.error(join_path(mpath, "tableSize"), "tableSize must be less than 5000011 for maglev")
            return None
        if not _is_prime(size):
            r.error(
                join_path(mpath, "tableSize"),
                f"tableSize must be a prime number for maglev, got {size}"
                f" (nearest primes: {_prev_prime(size)}, {_next_prime(size)})",
            )
            return None
        return ConsistentHashLB(policy, "maglev", table_size=size)
    minimum = deprecated or 0
    if ring is not None:
        minimum = r.integer(ring, "minimumRingSize", join_path(here, "ringHash"), minimum=0) or 0
    if minimum > 8388608:
        r.error(
            join_path(here, "ringHash.minimumRingSize"),
            f"minimumRingSize {minimum} exceeds Envoy's maximum ring size 8388608",
        )
        return None
    return ConsistentHashLB(policy, "ring", minimum_ring_size=minimum or 1024)


def _cookie(r: Reader, ch: Mapping[str, object], path: str) -> CookiePolicy | None:
    c = r.obj(ch, "httpCookie", path, ("name", "path", "ttl", "attributes"))
    if c is None:
        return None
    here = join_path(path, "httpCookie")
    name = r.string(c, "name", here)
    if not name:
        r.error(join_path(here, "name"), "name required for HttpCookie")
    cookie_path = r.string(c, "path", here) or ""
    ttl_seconds = r.duration(c, "ttl", here, istio_minimum=False)
    attributes: list[CookieAttribute] = []
    for apath, raw in r.items(c, "attributes", here):
        am = r.mapping(raw, apath, ("name", "value"))
        if am is None:
            continue
        aname = r.string(am, "name", apath, required=True)
        avalue = r.string(am, "value", apath) or ""
        if aname:
            attributes.append(CookieAttribute(aname, avalue))
    if not name:
        return None
    # Envoy keeps whole seconds of the TTL (Max-Age); a sub-second TTL is a session cookie.
    ttl = None if ttl_seconds is None else int(ttl_seconds)
    return CookiePolicy(name, cookie_path, ttl, tuple(attributes))


def _is_prime(x: int) -> bool:
    """Envoy's (and Istio's) ``isPrime``: note 1 counts as prime there."""
    if 0 < x < 4:
        return True
    if x % 2 == 0:
        return False
    factor = 3
    while factor * factor <= x:
        if x % factor == 0:
            return False
        factor += 2
    return True


def _next_prime(x: int) -> int:
    while not _is_prime(x):
        x += 1
    return x


def _prev_prime(x: int) -> int:
    while x > 2 and not _is_prime(x):
        x -= 1
    return x


def _connection_pool(
    r: Reader, m: Mapping[str, object], path: str
) -> ConnectionPoolSettings | None:
    cp = r.obj(m, "connectionPool", path, ("tcp", "http"))
    if cp is None:
        return None
    here = join_path(path, "connectionPool")
    if cp.get("tcp") is None and cp.get("http") is None:
        r.error(here, "connection pool must have at least one field")
    pool = DEFAULT_POOL
    values: dict[str, object] = {}
    tcp = r.obj(
        cp,
        "tcp",
        here,
        (
            "maxConnections",
            "connectTimeout",
            "tcpKeepalive",
            "maxConnectionDuration",
            "idleTimeout",
        ),
    )
    if tcp is not None:
        tpath = join_path(here, "tcp")
        # Istio treats 0 as "not set" for these limits (proto3 scalars have no presence).
        values["max_connections"] = r.integer(tcp, "maxConnections", tpath, minimum=0) or None
        values["connect_timeout"] = r.duration(tcp, "connectTimeout", tpath)
        values["max_connection_duration"] = r.duration(tcp, "maxConnectionDuration", tpath)
        values["tcp_idle_timeout"] = r.duration(tcp, "idleTimeout", tpath, allow_zero=True)
        ka = r.obj(tcp, "tcpKeepalive", tpath, ("probes", "time", "interval"))
        if ka is not None:
            kpath = join_path(tpath, "tcpKeepalive")
            values["tcp_keepalive"] = TcpKeepalive(
                r.integer(ka, "probes", kpath, minimum=0) or None,
                r.duration(ka, "time", kpath),
                r.duration(ka, "interval", kpath),
            )
    hp = r.obj(
        cp,
        "http",
        here,
        (
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
            "h2UpgradePolicy",
            "useClientProtocol",
            "maxConcurrentStreams",
        ),
    )
    if hp is not None:
        hpath = join_path(here, "http")
        values["http1_max_pending_requests"] = (
            r.integer(hp, "http1MaxPendingRequests", hpath, minimum=0) or None
        )
        values["http2_max_requests"] = r.integer(hp, "http2MaxRequests", hpath, minimum=0) or None
        values["max_requests_per_connection"] = r.integer(
            hp, "maxRequestsPerConnection", hpath, minimum=0
        )
        values["max_retries"] = r.integer(hp, "maxRetries", hpath, minimum=0) or None
        values["idle_timeout"] = r.duration(hp, "idleTimeout", hpath)
        values["h2_upgrade_policy"] = r.enum(
            hp, "h2UpgradePolicy", hpath, ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
        )
        values["use_client_protocol"] = r.boolean(hp, "useClientProtocol", hpath)
        values["max_concurrent_streams"] = r.integer(hp, "maxConcurrentStreams", hpath, minimum=0)
        if values["h2_upgrade_policy"] == "UPGRADE" and values["use_client_protocol"]:
            r.error(hpath, "use client protocol must not be true when H2UpgradePolicy is UPGRADE")
    set_values = {k: v for k, v in values.items() if v is not None}
    return replace(pool, **set_values)  # type: ignore[arg-type]


def _outlier(r: Reader, m: Mapping[str, object], path: str) -> OutlierDetection | None:
    o = r.obj(
        m,
        "outlierDetection",
        path,
        (
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveLocalOriginFailures",
            "splitExternalLocalOriginErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
        ),
        {
            "consecutiveErrors": "deprecated; Istio ignores it (use consecutive5xxErrors or "
            "consecutiveGatewayErrors)"
        },
    )
    if o is None:
        return None
    here = join_path(path, "outlierDetection")
    d = OutlierDetection()
    c5 = r.integer(o, "consecutive5xxErrors", here, minimum=0, maximum=UINT32_MAX)
    cg = r.integer(o, "consecutiveGatewayErrors", here, minimum=0, maximum=UINT32_MAX)
    cl = r.integer(o, "consecutiveLocalOriginFailures", here, minimum=0, maximum=UINT32_MAX)
    split = bool(r.boolean(o, "splitExternalLocalOriginErrors", here))
    if cl and not split:
        r.error(
            join_path(here, "consecutiveLocalOriginFailures"),
            "outlier detection consecutive local origin failures is specified, but split "
            "external local origin errors is set to false",
        )
    interval = r.duration(o, "interval", here)
    base = r.duration(o, "baseEjectionTime", here)
    max_eject = _percent(r, o, "maxEjectionPercent", here)
    min_health = _percent(r, o, "minHealthPercent", here)
    return OutlierDetection(
        consecutive_5xx_errors=d.consecutive_5xx_errors if c5 is None else c5,
        consecutive_gateway_errors=cg or 0,
        split_external_local_origin_errors=split,
        consecutive_local_origin_failures=cl if cl else d.consecutive_local_origin_failures,
        interval=interval if interval is not None else d.interval,
        base_ejection_time=base if base is not None else d.base_ejection_time,
        # Istio only passes maxEjectionPercent when > 0; Envoy's default is 10.
        max_ejection_percent=max_eject or d.max_ejection_percent,
        min_health_percent=min_health or 0,
    )


def _percent(r: Reader, m: Mapping[str, object], key: str, path: str) -> int | None:
    value = r.integer(m, key, path)
    if value is not None and not 0 <= value <= 100:
        r.error(join_path(path, key), f"percentage {value} is not in range 0..100")
        return None
    return value


# --------------------------------------------------------------------------- ServiceEntry

_RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")


def _service_entry(r: Reader, meta: _Meta, spec: object) -> _ServiceEntry | None:
    s = r.mapping(
        spec,
        "spec",
        (
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "exportTo",
            "subjectAltNames",
            "workloadSelector",
        ),
    )
    if s is None:
        return None
    if s.get("workloadSelector") is not None:
        r.error(
            "spec.workloadSelector",
            f"WorkloadEntry selection is {NOT_SUPPORTED}; list the endpoints in spec.endpoints",
        )
    hosts: list[str] = []
    for path, host in r.string_list(s, "hosts", "spec", required=True):
        if host == "*":
            r.error(path, "invalid host *")
            continue
        problem = wildcard_domain_problem(host)
        if problem is not None:
            r.error(path, problem)
            continue
        hosts.append(host)
    r.string_list(s, "addresses", "spec")
    r.enum(s, "location", "spec", ("MESH_EXTERNAL", "MESH_INTERNAL"))
    ports: list[_ServicePort] = []
    for path, raw in r.items(s, "ports", "spec", required=True):
        pm = r.mapping(raw, path, ("number", "protocol", "name", "targetPort"))
        if pm is None:
            continue
        number = r.port(pm, "number", path, required=True)
        name = r.string(pm, "name", path, required=True)
        protocol = (r.string(pm, "protocol", path) or "").upper()
        target = r.port(pm, "targetPort", path)
        if number is None or name is None:
            continue
        if any(p.name == name for p in ports):
            r.error(join_path(path, "name"), f"service entry port name {name!r} already defined")
        if any(p.number == number for p in ports):
            r.error(join_path(path, "number"), f"service entry port {number} already defined")
        ports.append(_ServicePort(number, name, protocol, target))
    resolution = r.enum(s, "resolution", "spec", _RESOLUTIONS) or "NONE"
    if s.get("resolution") is None:
        r.error(
            "spec.resolution",
            "NONE (the default) means original-destination passthrough, "
            f"which is {NOT_SUPPORTED}; use STATIC with endpoints, or DNS",
        )
    elif resolution in ("NONE", "DNS_ROUND_ROBIN"):
        r.error("spec.resolution", f"{resolution} is {NOT_SUPPORTED}; use STATIC or DNS")
    endpoints: list[_WorkloadEntry] = []
    port_names = {p.name for p in ports}
    for path, raw in r.items(s, "endpoints", "spec"):
        ep = _workload_entry(r, path, raw, resolution, port_names)
        if ep is not None:
            endpoints.append(ep)
    if resolution == "DNS" and not s.get("endpoints"):
        for path, host in r.string_list(s, "hosts", "spec"):
            if fqdn_problem(host) is not None and wildcard_domain_problem(host) is None:
                r.error(
                    path, "hosts must be FQDN if no endpoints are provided for resolution mode DNS"
                )
    if resolution == "STATIC" and not s.get("endpoints"):
        r.warn("spec.endpoints", "STATIC resolution without endpoints: the service has no backends")
    return _ServiceEntry(meta, r, hosts, ports, resolution, endpoints)


def _workload_entry(
    r: Reader, path: str, raw: object, resolution: str, port_names: set[str]
) -> _WorkloadEntry | None:
    m = r.mapping(
        raw, path, ("address", "ports", "labels", "weight", "network", "locality", "serviceAccount")
    )
    if m is None:
        if raw is None:
            r.error(path, "endpoint cannot be nil")
        return None
    address = r.string(m, "address", path, required=True)
    ports_raw = m.get("ports")
    ports: dict[str, int] = {}
    if ports_raw is not None:
        ppath = join_path(path, "ports")
        if not isinstance(ports_raw, dict):
            r.error(ppath, f"expected an object of port numbers, got {type_name(ports_raw)}")
        else:
            for name in ports_raw:
                number = r.port(ports_raw, name, ppath, required=True)
                if str(name) not in port_names:
                    hint = did_you_mean(str(name), port_names)
                    r.error(
                        join_path(ppath, str(name)),
                        f"endpoint port {number} is not defined by the service entry "
                        f"(port names: {', '.join(sorted(port_names)) or 'none'}){hint}",
                    )
                elif number is not None:
                    ports[str(name)] = number
    labels = r.string_map(m, "labels", path) or {}
    weight = r.integer(m, "weight", path, minimum=0, maximum=UINT32_MAX) or 0
    if address is None:
        return None
    if address.startswith("unix://"):
        r.error(join_path(path, "address"), f"unix domain socket endpoints are {NOT_SUPPORTED}")
        return None
    if resolution == "STATIC" and not is_ip(address):
        r.error(
            join_path(path, "address"),
            f"endpoint address {address!r} is not a valid IP "
            "address (STATIC resolution; use DNS resolution for names)",
        )
        return None
    if resolution == "DNS" and not is_ip(address) and fqdn_problem(address) is not None:
        r.error(
            join_path(path, "address"),
            f"endpoint address {address!r} is not a valid FQDN or an IP address",
        )
        return None
    # Envoy's load balancing weight must be >= 1; Istio turns 0 (unset) into 1.
    return _WorkloadEntry(address, MappingProxyType(ports), labels_of(labels), weight or 1)


# --------------------------------------------------------------------------- compiling


@dataclass(slots=True)
class _MergedRule:
    """The DestinationRules of one host merged as Istio does."""

    host: str
    names: list[str]
    policy: _Policy | None
    subsets: dict[str, _Subset]
    health_check: str | None
    reader: Reader


def _merge_rules(rules: Iterable[_DestinationRule]) -> dict[str, _MergedRule]:
    merged: dict[str, _MergedRule] = {}
    for dr in rules:
        check = dr.meta.annotations.get(HEALTH_CHECK_ANNOTATION)
        existing = merged.get(dr.host)
        if existing is None:
            merged[dr.host] = _MergedRule(
                dr.host, [dr.meta.key], dr.policy, {s.name: s for s in dr.subsets}, check, dr.reader
            )
            continue
        existing.names.append(dr.meta.key)
        for subset in dr.subsets:
            if subset.name in existing.subsets:
                dr.reader.warn(
                    "spec.subsets",
                    f"subset {subset.name} of host {dr.host} is "
                    f"already defined by DestinationRule {existing.names[0]}; Istio "
                    "keeps the first",
                )
            else:
                existing.subsets[subset.name] = subset
        if existing.policy is None:
            existing.policy = dr.policy
        elif dr.policy is not None:
            dr.reader.warn(
                "spec.trafficPolicy",
                f"host {dr.host} already has a traffic policy "
                f"from DestinationRule {existing.names[0]}; Istio keeps the first",
            )
        existing.health_check = existing.health_check or check
    return merged


def _rule_for(host: str, rules: Mapping[str, _MergedRule]) -> _MergedRule | None:
    """Exact host first, then the most specific wildcard host that covers it."""
    exact = rules.get(host)
    if exact is not None:
        return exact
    best: _MergedRule | None = None
    for pattern, rule in rules.items():
        covers = pattern.startswith("*") and host_subset_of(host, pattern)
        if covers and (best is None or len(pattern) > len(best.host)):
            best = rule
    return best


def _hash_of(policy: _Policy | None, port: int | None) -> HashPolicy | None:
    """``consistentHash`` of one level (its port-level entry when ``port`` is given)."""
    if policy is None:
        return None
    if port is not None:
        for number, level in policy.port_level:
            if number == port:
                lb = level.lb
                return lb.consistent_hash.policy if lb and lb.consistent_hash else None
        return None
    lb = policy.lb
    return lb.consistent_hash.policy if lb and lb.consistent_hash else None


def _hash_for_destination(dest: Destination, rule: _MergedRule | None) -> tuple[HashPolicy, ...]:
    """Istio's ``hashForHTTPDestination``: subset port-level > subset > port-level > top."""
    if rule is None:
        return ()
    chosen = _hash_of(rule.policy, None)
    port_level = _hash_of(rule.policy, dest.port) if dest.port is not None else None
    subset_hash = subset_port = None
    subset = rule.subsets.get(dest.subset or "")
    if subset is not None and dest.subset:
        subset_hash = _hash_of(subset.policy, None)
        subset_port = _hash_of(subset.policy, dest.port) if dest.port is not None else None
    for candidate in (subset_port, subset_hash, port_level):
        if candidate is not None:
            chosen = candidate
            break
    return (chosen,) if chosen is not None else ()


def _effective_policy(rule: _MergedRule | None, subset: str | None, port: int) -> _Policy | None:
    """Istio's ``MergeSubsetTrafficPolicy`` for one cluster."""
    if rule is None:
        return None
    original = rule.policy.for_port(port)[0] if rule.policy else None
    sub = rule.subsets.get(subset) if subset else None
    if sub is None or sub.policy is None:
        return original
    sub_policy, has_port_level = sub.policy.for_port(port)
    if original is None:
        return sub_policy
    return _Policy(
        lb=sub_policy.lb if sub_policy.lb is not None or has_port_level else original.lb,
        pool=sub_policy.pool if sub_policy.pool is not None or has_port_level else original.pool,
        outlier=(
            sub_policy.outlier
            if sub_policy.outlier is not None or has_port_level
            else original.outlier
        ),
    )


class _Compiler:
    """Cross-resource work: references, DestinationRule merging, clusters, listeners."""

    def __init__(self, parsed: _Parsed, issues: Issues) -> None:
        self.parsed = parsed
        self.issues = issues
        self.gateways = {gw.key: gw for gw, _ in parsed.gateways}
        self.rules = _merge_rules(parsed.destination_rules)
        self.entries: dict[str, _ServiceEntry] = {}
        for se in parsed.service_entries:
            for host in se.hosts:
                other = self.entries.get(host)
                if other is not None:
                    se.reader.error(
                        "spec.hosts",
                        f"host {host} is already defined by "
                        f"ServiceEntry {other.meta.key} ({other.meta.where})",
                    )
                else:
                    self.entries[host] = se
        self.service_ports = {
            host: tuple(p.number for p in se.ports) for host, se in self.entries.items()
        }
        self.clusters: dict[str, ClusterSpec] = {}

    # ---- virtual services

    def virtual_services(self) -> list[VirtualServiceSpec]:
        out: list[VirtualServiceSpec] = []
        for vs in self.parsed.virtual_services:
            for path, ref in vs.gateways:
                self._check_gateway_ref(vs.reader, path, ref)
            routes = []
            for raw in vs.routes:
                for path, ref in raw.match_gateway_paths:
                    self._check_gateway_ref(vs.reader, path, ref)
                routes.append(self._route(vs, raw))
            gateways = tuple(g for _, g in vs.gateways) or (MESH_GATEWAY,)
            if gateways == (MESH_GATEWAY,):
                vs.reader.warn(
                    "spec.gateways",
                    "bound to the mesh only (no gateways): "
                    "sticky-proxy serves Gateway-bound routes, so this VirtualService "
                    "is not used",
                )
            out.append(
                VirtualServiceSpec(
                    vs.meta.name,
                    vs.meta.namespace,
                    tuple(vs.hosts),
                    gateways,
                    tuple(routes),
                    vs.meta.where,
                )
            )
        return out

    def _check_gateway_ref(self, r: Reader, path: str, ref: str) -> None:
        if ref == MESH_GATEWAY or ref in self.gateways:
            return
        r.error(path, f"Gateway {ref} not found{did_you_mean(ref, self.gateways)}")

    def _route(self, vs: _VirtualService, raw: _RawRoute) -> HttpRoute:
        destinations: list[RouteDestination] = []
        for d in raw.destinations:
            self._check_subset(vs.reader, d)
            rule = _rule_for(d.destination.host, self.rules)
            destinations.append(
                RouteDestination(
                    d.destination, d.weight, d.headers, _hash_for_destination(d.destination, rule)
                )
            )
        retries = raw.route.retries
        if retries is not None:
            # Istio drops the previous-hosts predicate on hashing routes: a retry must stay on
            # the ring.  retryIgnorePreviousHosts, when given, decides instead.
            hashing = len(destinations) == 1 and bool(destinations[0].hash_policies)
            previous_hosts = (
                raw.ignore_previous_hosts if raw.ignore_previous_hosts is not None else not hashing
            )
            retries = replace(retries, retry_previous_hosts=previous_hosts)
        return replace(raw.route, route=tuple(destinations), retries=retries)

    def _check_subset(self, r: Reader, d: _RawDestination) -> None:
        subset = d.destination.subset
        if subset is None:
            return
        rule = _rule_for(d.destination.host, self.rules)
        path = join_path(join_path(d.path, "destination"), "subset")
        if rule is None:
            r.error(
                path, f"subset {subset} not found: no DestinationRule for host {d.destination.host}"
            )
        elif subset not in rule.subsets:
            known = ", ".join(rule.subsets) or "none"
            r.error(
                path,
                f"subset {subset} not found in DestinationRule {rule.names[0]} "
                f"(subsets: {known}){did_you_mean(subset, rule.subsets)}",
            )

    # ---- listeners

    def listeners(self) -> list[ListenerSpec]:
        by_port: dict[int, tuple[str, list[str], str]] = {}
        for gw, r in self.parsed.gateways:
            for i, server in enumerate(gw.servers):
                if not server.served:
                    continue
                bind = server.bind or "0.0.0.0"
                current = by_port.get(server.port)
                if current is None:
                    by_port[server.port] = (bind, [gw.key], gw.key)
                    continue
                if current[0] != bind:
                    r.error(
                        f"spec.servers[{i}].bind",
                        f"port {server.port} is already bound to "
                        f"{current[0]} by Gateway {current[2]}; sticky-proxy opens one "
                        "listener per port",
                    )
                if gw.key not in current[1]:
                    current[1].append(gw.key)
        return [
            ListenerSpec(port, bind, "HTTP", tuple(gws))
            for port, (bind, gws, _) in sorted(by_port.items())
        ]

    # ---- clusters

    def build_clusters(
        self, listeners: Sequence[ListenerSpec], virtual_services: Sequence[VirtualServiceSpec]
    ) -> None:
        raw_by_vs = {vs.meta.key: vs for vs in self.parsed.virtual_services}
        for listener in listeners:
            bound = set(listener.gateways)
            for vs in virtual_services:
                if not bound.intersection(vs.gateways):
                    continue
                raw = raw_by_vs[vs.key]
                if not self._serves_any_host(vs, listener):
                    continue
                for route, raw_route in zip(vs.http, raw.routes, strict=True):
                    for dest, raw_dest in zip(route.route, raw_route.destinations, strict=True):
                        self._destination_cluster(
                            raw.reader, raw_dest.path, dest.destination, listener.port
                        )
        for se in self.parsed.service_entries:
            for host in se.hosts:
                if self.entries.get(host) is not se:
                    continue
                rule = self.rules.get(host)
                for port in se.ports:
                    self._cluster(host, port.number, None)
                    for subset in rule.subsets if rule else ():
                        self._cluster(host, port.number, subset)
        for parsed_vs in self.parsed.virtual_services:
            refs = [g for _, g in parsed_vs.gateways if g in self.gateways]
            hosts = set(parsed_vs.hosts)
            if refs and not any(
                self._vs_matches_gateway(parsed_vs, hosts, self.gateways[g]) for g in refs
            ):
                parsed_vs.reader.warn(
                    "spec.hosts",
                    "no host matches a host of its Gateways' servers, "
                    "so no request reaches this VirtualService",
                )

    def _serves_any_host(self, vs: VirtualServiceSpec, listener: ListenerSpec) -> bool:
        for key in listener.gateways:
            gw = self.gateways.get(key)
            if gw is None or key not in vs.gateways:
                continue
            for server in gw.servers:
                if server.port == listener.port and server.served:
                    for sh in server.hosts:
                        if sh.namespace in ("*", vs.namespace) and any(
                            host_subset_of(sh.host, h) or host_subset_of(h, sh.host)
                            for h in vs.hosts
                        ):
                            return True
        return False

    @staticmethod
    def _vs_matches_gateway(vs: _VirtualService, hosts: set[str], gw: GatewaySpec) -> bool:
        for server in gw.servers:
            for sh in server.hosts:
                if sh.namespace in ("*", vs.meta.namespace) and any(
                    host_subset_of(sh.host, h) or host_subset_of(h, sh.host) for h in hosts
                ):
                    return True
        return False

    def _destination_cluster(
        self, r: Reader, path: str, dest: Destination, listener_port: int
    ) -> None:
        port = destination_port(dest, listener_port, self.service_ports)
        se = self.entries.get(dest.host)
        dpath = join_path(path, "destination")
        if se is not None and port not in (p.number for p in se.ports):
            ports = ", ".join(str(p.number) for p in se.ports)
            if dest.port is not None:
                r.error(
                    join_path(dpath, "port") + ".number",
                    f"port {port} is not a port of ServiceEntry {se.meta.key} for host "
                    f"{dest.host} (ports: {ports})",
                )
            else:
                r.error(
                    join_path(dpath, "port"),
                    f"required: ServiceEntry {se.meta.key} has several ports ({ports}) and "
                    f"Istio's fallback, the listener port {listener_port}, is not one of them",
                )
            return
        if se is None and dest.port is None:
            r.warn(
                join_path(dpath, "port"),
                f"not set and host {dest.host} has no "
                f"ServiceEntry: Istio's fallback, the listener port {listener_port}, is used",
            )
        self._cluster(dest.host, port, dest.subset)

    def _cluster(self, host: str, port: int, subset: str | None) -> None:
        name = cluster_name(host, port, subset)
        if name in self.clusters:
            return
        rule = _rule_for(host, self.rules)
        if subset is not None and (rule is None or subset not in rule.subsets):
            return  # reported by _check_subset
        policy = _effective_policy(rule, subset, port)
        se = self.entries.get(host)
        selector = rule.subsets[subset].labels if rule and subset else ()
        endpoints, source = self._endpoints(host, port, selector, subset)
        outlier = policy.outlier if policy else None
        health = (rule.health_check if rule else None) or (
            se.meta.annotations.get(HEALTH_CHECK_ANNOTATION) if se else None
        )
        self.clusters[name] = ClusterSpec(
            name=name,
            host=host,
            port=port,
            subset=subset,
            lb=(policy.lb if policy and policy.lb else DEFAULT_LB),
            endpoints=endpoints,
            outlier=outlier,
            pool=(policy.pool if policy and policy.pool else DEFAULT_POOL),
            health_check=health,
            panic_threshold=float(outlier.min_health_percent) if outlier else 50.0,
            source=source,
        )

    def _endpoints(
        self, host: str, port: int, selector: tuple[tuple[str, str], ...], subset: str | None
    ) -> tuple[StaticEndpoints | DnsEndpoints, str]:
        se = self.entries.get(host)
        if se is None:
            if selector:
                rule = _rule_for(host, self.rules)
                if rule is not None:
                    rule.reader.warn(
                        "spec.subsets",
                        f"subset {subset} selects labels but host "
                        f"{host} has no ServiceEntry: DNS answers carry no labels, "
                        "so this subset has no endpoints",
                    )
                return DnsEndpoints(()), f"DNS {host}"
            return DnsEndpoints((Endpoint(host, port),)), f"DNS {host}"
        service_port = next(p for p in se.ports if p.number == port)
        chosen: list[Endpoint] = []
        for ep in se.endpoints:
            if selector and not labels_match(ep.labels, selector):
                continue
            target = ep.ports.get(service_port.name) or service_port.target or port
            chosen.append(Endpoint(ep.address, target, ep.weight, ep.labels))
        where = f"ServiceEntry {se.meta.key}"
        if se.resolution == "STATIC":
            return StaticEndpoints(tuple(chosen)), where
        if not se.endpoints:
            return DnsEndpoints((Endpoint(host, service_port.target or port),)), where
        return DnsEndpoints(tuple(chosen)), where


def load_paths(paths: Sequence[str]) -> Config:
    """Read files and folders and compile them; raises ConfigError with every error found."""
    issues = Issues()
    parsed = _Parsed()
    files = _files(paths, issues)
    order: list[str] = []
    for path in files:
        for where, data in _documents(path, issues):
            order.append(where)
            _read_document(issues, where, data, parsed)
    return compile_resources(parsed, issues, files, order)


def load_text(text: str, name: str = "<text>") -> Config:
    """Compile Istio YAML given as a string; ``name`` stands for the file in messages."""
    issues = Issues()
    parsed = _Parsed()
    order: list[str] = []
    for where, data in _parse_text(text, name, issues):
        order.append(where)
        _read_document(issues, where, data, parsed)
    return compile_resources(parsed, issues, [name], order)


def _grouped(lines: Iterable[str], order: Sequence[str]) -> list[str]:
    """Lines in the order their files and documents were read (each keeps its own order)."""
    listed = list(lines)
    rank = {where: i for i, where in enumerate(order)}
    first: dict[str, int] = {}
    for i, line in enumerate(listed):
        first.setdefault(line.split(": ", 1)[0], len(order) + i)

    def key(line: str) -> int:
        where = line.split(": ", 1)[0]
        return rank.get(where, first[where])

    return sorted(listed, key=key)


def compile_resources(
    parsed: _Parsed, issues: Issues, sources: Sequence[str], order: Sequence[str] = ()
) -> Config:
    """Cross-resource compilation; ``order`` lists the documents as read, for the messages."""
    compiler = _Compiler(parsed, issues)
    virtual_services = compiler.virtual_services()
    listeners = compiler.listeners()
    compiler.build_clusters(listeners, virtual_services)
    errors = _grouped(dict.fromkeys(issues.errors), order)
    warnings = _grouped(dict.fromkeys(issues.warnings), order)
    if errors:
        raise ConfigError(errors, warnings)
    return Config(
        listeners=tuple(listeners),
        clusters=MappingProxyType(dict(compiler.clusters)),
        gateways=tuple(gw for gw, _ in parsed.gateways),
        virtual_services=tuple(virtual_services),
        service_ports=MappingProxyType(dict(compiler.service_ports)),
        sources=tuple(sources),
        warnings=tuple(warnings),
    )
