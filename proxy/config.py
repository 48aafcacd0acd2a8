"""The configuration model: what the proxy does, as frozen values, independent of Istio's YAML.

Theory
------
Istio's resources (Gateway, VirtualService, DestinationRule, ServiceEntry) are an *input
language*; this module is the *model* they compile to (``proxy.istio`` does the compiling, with
Istio's precedence rules, defaults and name resolution already applied).  Everything here is an
immutable, hashable value, so a loaded ``Config`` can be shared by every worker, compared with the
next one on reload, and handed to the request path without locks.

The model follows Envoy's shape because Envoy is what Istio compiles to and what we must match:

* a ``ListenerSpec`` per Gateway port (servers on the same port merge, as in Istio);
* the routing table per listener port: ``GatewaySpec`` servers x ``VirtualServiceSpec`` hosts
  (``proxy.routing.Router`` builds Envoy's virtual hosts from them);
* a ``ClusterSpec`` per ``outbound|port|subset|host``, with the DestinationRule's traffic policy
  already merged for that port and subset (subset port-level > subset > port-level > top-level),
  the endpoints already filtered by the subset's labels, and Istio's defaults filled in.

Durations are float seconds; "unset" is ``None`` only where Istio distinguishes unset from zero.

Errors
------
``ConfigError`` carries every problem found, each one a line that names the file (and the
document, when the file holds several), the resource and the YAML path::

    ConfigError
     └─ .errors: ("config/dr.yaml[2]: DestinationRule default-sticky-dr:
                   spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.tll:
                   unknown field (did you mean ttl?)", ...)

Warnings (a skipped Kubernetes kind, an Istio field sticky-proxy ignores) are never raised; they
are returned in ``Config.warnings`` (and ``ConfigError.warnings``) for the caller to print or log.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from proxy.affinity import HashPolicy, format_address

Labels = tuple[tuple[str, str], ...]
"""Labels as sorted ``(key, value)`` pairs: hashable, comparable, order-independent."""

UINT32_MAX = 2**32 - 1


def labels_of(mapping: Mapping[str, str]) -> Labels:
    """Canonical ``Labels`` for a mapping (sorted by key)."""
    return tuple(sorted(mapping.items()))


def labels_match(labels: Labels, selector: Labels) -> bool:
    """True when every ``selector`` pair is among ``labels`` (Kubernetes label selection)."""
    have = dict(labels)
    return all(have.get(k) == v for k, v in selector)


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` lists every problem, one line each."""

    def __init__(self, errors: Sequence[str], warnings: Sequence[str] = ()) -> None:
        self.errors: tuple[str, ...] = tuple(errors)
        self.warnings: tuple[str, ...] = tuple(warnings)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------- endpoints


def endpoint_key(address: str, port: int) -> str:
    """Envoy's address text: ``1.2.3.4:80``, ``[::1]:80``, ``host:80``."""
    return format_address(address, port)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend (or, inside ``DnsEndpoints``, one name to resolve into backends)."""

    address: str
    port: int
    weight: int = 1
    labels: Labels = ()
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Precomputed: the key is read on every ring build and every pick.
        object.__setattr__(self, "key", endpoint_key(self.address, self.port))


@dataclass(frozen=True, slots=True)
class StaticEndpoints:
    """Endpoints known from the configuration (ServiceEntry ``resolution: STATIC``)."""

    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class DnsEndpoints:
    """Names resolved at run time; every A/AAAA record becomes an endpoint with the target's
    port, weight and labels (ServiceEntry ``resolution: DNS``, or a host with no ServiceEntry)."""

    targets: tuple[Endpoint, ...]


# --------------------------------------------------------------------------- traffic policy


@dataclass(frozen=True, slots=True)
class ConsistentHashLB:
    """Istio's ``consistentHash``: the hash key policy and the ring or Maglev table behind it."""

    policy: HashPolicy
    algorithm: Literal["ring", "maglev"] = "ring"
    minimum_ring_size: int = 1024
    maximum_ring_size: int = 8388608
    table_size: int = 65537


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    """Exactly one of ``simple`` (ROUND_ROBIN, LEAST_REQUEST, RANDOM) or ``consistent_hash``."""

    simple: str | None = "LEAST_REQUEST"
    consistent_hash: ConsistentHashLB | None = None

    @property
    def describe(self) -> str:
        ch = self.consistent_hash
        if ch is None:
            return self.simple or "LEAST_REQUEST"
        if ch.algorithm == "maglev":
            return f"MAGLEV (table size {ch.table_size})"
        return f"RING_HASH (minimum ring size {ch.minimum_ring_size})"


DEFAULT_LB = LoadBalancerSettings()
"""What Istio configures with no DestinationRule (or no loadBalancer): LEAST_REQUEST."""


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Istio's ``outlierDetection`` with the values Envoy then runs with.

    A threshold of 0 disables that detector.  ``consecutive_gateway_errors`` is off unless set:
    Istio only enforces it when the field is present.  ``min_health_percent`` becomes the panic
    threshold of the cluster.
    """

    consecutive_5xx_errors: int = 5
    consecutive_gateway_errors: int = 0
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failures: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    """SO_KEEPALIVE on upstream sockets; None leaves the OS default."""

    probes: int | None = None
    time: float | None = None
    interval: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    """Istio's ``connectionPool`` with Envoy's defaults (2^32-1 means no limit)."""

    max_connections: int = UINT32_MAX
    connect_timeout: float = 10.0
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: float | None = None
    tcp_idle_timeout: float | None = None
    http1_max_pending_requests: int = UINT32_MAX
    http2_max_requests: int = UINT32_MAX
    max_requests_per_connection: int = 0  # 0: unlimited
    max_retries: int = UINT32_MAX
    idle_timeout: float = 3600.0  # upstream idle keep-alive connections; 0 = never closed
    h2_upgrade_policy: str = "DEFAULT"
    use_client_protocol: bool = False
    max_concurrent_streams: int | None = None


DEFAULT_POOL = ConnectionPoolSettings()


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """One upstream cluster, Envoy-named ``outbound|PORT|SUBSET|HOST``.

    ``port`` is the service port (the one in the name); each endpoint carries its own target port
    (a ServiceEntry endpoint's ``ports`` map or the port's ``targetPort``).  The endpoint list is
    already filtered by the subset's labels.  ``panic_threshold`` is a percentage: Envoy's 50
    without outlier detection, Istio's ``minHealthPercent`` (default 0, i.e. off) with it.
    """

    name: str
    host: str
    port: int
    subset: str | None
    lb: LoadBalancerSettings
    endpoints: StaticEndpoints | DnsEndpoints
    outlier: OutlierDetection | None = None
    pool: ConnectionPoolSettings = DEFAULT_POOL
    health_check: str | None = None
    panic_threshold: float = 50.0
    source: str = ""


def cluster_name(host: str, port: int, subset: str | None = None) -> str:
    """Envoy/Istio cluster name: ``outbound|8080|v1|reviews.default.svc.cluster.local``."""
    return f"outbound|{port}|{subset or ''}|{host}"


def host_subset_of(a: str, b: str) -> bool:
    """Istio's ``host.Name.SubsetOf``: every name ``a`` covers is covered by ``b``.

    A wildcard covers any name ending with the text after its ``*`` (``*`` covers everything).
    """
    if a.startswith("*"):
        return b.startswith("*") and a[1:].endswith(b[1:])
    if b.startswith("*"):
        return a.endswith(b[1:])
    return a == b


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio's StringMatch; ``present`` is a header/query presence test (``{}`` or regex ``*``)."""

    kind: Literal["exact", "prefix", "regex", "present"]
    value: str = ""


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """One ``http[].match[]`` entry; every condition set must hold."""

    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    ignore_uri_case: bool = False
    port: int | None = None
    gateways: tuple[str, ...] = ()  # resolved "namespace/name"
    source_labels: Labels = ()
    source_namespace: str = ""


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    """``set``/``add``/``remove`` for one direction, as written (Istio sorts set/add by name)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()


@dataclass(frozen=True, slots=True)
class Destination:
    """``route[].destination``; ``host`` is already a fully qualified name."""

    host: str
    port: int | None = None
    subset: str | None = None


def destination_port(
    dest: Destination, listener_port: int, service_ports: Mapping[str, tuple[int, ...]]
) -> int:
    """Istio's ``GetDestinationCluster`` port: explicit, else the service's only port, else the
    port of the listener the request came in on."""
    if dest.port is not None:
        return dest.port
    ports = service_ports.get(dest.host)
    if ports is not None and len(ports) == 1:
        return ports[0]
    return listener_port


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination
    weight: int = 0
    headers: Headers | None = None
    hash_policies: tuple[HashPolicy, ...] = ()  # from the host's DestinationRule (Istio's rule)


@dataclass(frozen=True, slots=True)
class Rewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex: tuple[str, str] | None = None  # (RE2 pattern, substitution)


@dataclass(frozen=True, slots=True)
class Redirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: str | None = None
    code: int = 301


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Istio's ``retries`` as Envoy runs it; ``attempts`` are retries after the first try.

    With no ``retries`` field Istio applies its default (2 attempts on connect-failure,
    refused-stream, unavailable, cancelled and 503); ``attempts: 0`` disables retries (the
    route then has ``retries=None``).  ``retry_previous_hosts`` is Istio's default unless the
    route hashes (a consistent-hash route must retry on the same ring).
    """

    attempts: int = 2
    retry_on: tuple[str, ...] = (
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
        "retriable-status-codes",
    )
    retriable_status_codes: tuple[int, ...] = (503,)
    per_try_timeout: float | None = None
    retry_previous_hosts: bool = True
    retry_remote_localities: bool = False
    backoff: float | None = None
    host_selection_max_attempts: int = 5
    # Written in the VirtualService: the user asked for these retries, so a request that may
    # have reached the pod is sent again even when its method is not idempotent (Istio's
    # behaviour). Istio's implicit default never resends those (RFC 9110 §9.2.2).
    explicit: bool = False


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """One ``http[]`` entry of a VirtualService.  ``matches`` empty means "match everything"."""

    index: int
    name: str = ""
    matches: tuple[HttpMatch, ...] = ()
    route: tuple[RouteDestination, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout: float | None = None  # None: no timeout (Istio's default)
    retries: RetryPolicy | None = RetryPolicy()
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class VirtualServiceSpec:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    gateways: tuple[str, ...]  # resolved "namespace/name", or "mesh"
    http: tuple[HttpRoute, ...]
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --------------------------------------------------------------------------- gateways, listeners


@dataclass(frozen=True, slots=True)
class ServerHost:
    """A Gateway server host ``namespace/dnsName``; ``namespace`` ``*`` means any."""

    namespace: str
    host: str


@dataclass(frozen=True, slots=True)
class GatewayServer:
    port: int
    port_name: str
    protocol: str
    hosts: tuple[ServerHost, ...]
    bind: str = ""
    name: str = ""
    https_redirect: bool = False
    served: bool = True  # False: a TLS/TCP server sticky-proxy does not serve (warned)


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """A Gateway; ``selector`` is kept for display only: sticky-proxy *is* the gateway."""

    name: str
    namespace: str
    servers: tuple[GatewayServer, ...]
    selector: Labels = ()
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One listening socket per Gateway port; every HTTP server on that port shares it."""

    port: int
    bind: str = "0.0.0.0"
    protocol: str = "HTTP"
    gateways: tuple[str, ...] = ()  # "namespace/name" of the gateways with a server here


# --------------------------------------------------------------------------- the whole


def _frozen_clusters() -> Mapping[str, ClusterSpec]:
    return MappingProxyType({})


def _frozen_ports() -> Mapping[str, tuple[int, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    """A validated configuration: listeners, routing inputs and clusters (read-only)."""

    listeners: tuple[ListenerSpec, ...] = ()
    clusters: Mapping[str, ClusterSpec] = field(default_factory=_frozen_clusters)
    gateways: tuple[GatewaySpec, ...] = ()
    virtual_services: tuple[VirtualServiceSpec, ...] = ()
    service_ports: Mapping[str, tuple[int, ...]] = field(default_factory=_frozen_ports)
    sources: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def listener(self, port: int) -> ListenerSpec | None:
        for listener in self.listeners:
            if listener.port == port:
                return listener
        return None


# --------------------------------------------------------------------------- validation primitives
#
# The Istio compiler (proxy.istio) reads untyped YAML through a Reader, which checks types and
# field names and records every problem instead of raising at the first one: a user fixing a file
# sees all of its mistakes at once.


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest candidate (difflib), case-insensitive first."""
    pool = list(candidates)
    for candidate in pool:
        if candidate.lower() == word.lower():
            return f" (did you mean {candidate}?)"
    close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
DURATION_HINT = "Istio durations look like 60s, 1.5s, 100ms, 1m30s, 1h"


def parse_duration(text: str) -> int:
    """Nanoseconds of a duration in Go's ``time.ParseDuration`` syntax, which Istio's YAML uses.

    Istio decodes ``google.protobuf.Duration`` fields with ``time.ParseDuration`` (not only the
    protobuf JSON form ``"3.5s"``): a sign, then one or more ``<number><unit>`` with units ns, us
    (or \u00b5s), ms, s, m, h; ``"0"`` alone is zero.  Raises ValueError with the reason.
    """
    s = text
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None or m.end() == pos:  # pragma: no cover - the pattern always matches
            raise ValueError(f"invalid duration {text!r}")
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac:
            raise ValueError(f"invalid duration {text!r}")
        if not unit:
            raise ValueError(f"missing unit in duration {text!r}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        scale = _DURATION_UNITS[unit]
        value = int(whole or "0") * scale
        if frac:
            # Go keeps the fraction exact down to the nanosecond and truncates the rest.
            value += int(frac) * scale // 10 ** len(frac)
        total += value
        pos = m.end()
    return sign * total


def is_dns1123_label(text: str) -> bool:
    return len(text) <= 63 and _DNS1123_LABEL.fullmatch(text) is not None


_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_WILDCARD_LABEL = re.compile(r"\*|(\*|\*-)?[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def fqdn_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS name Istio accepts (``ValidateFQDN``), or None."""
    if not name:
        return "domain name cannot be empty"
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    for label in labels:
        if not is_dns1123_label(label):
            return f"domain name {name!r} invalid (label {label!r} invalid)"
    return None


def wildcard_domain_problem(name: str) -> str | None:
    """Why ``name`` is not a host Istio accepts (``ValidateWildcardDomain``), or None.

    Only the first label may hold a wildcard: ``*``, ``*.example.com``, ``*-api.example.com``.
    """
    if not name:
        return "domain name cannot be empty"
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    first, _, rest = name.partition(".")
    if len(first) > 63 or _WILDCARD_LABEL.fullmatch(first) is None:
        return f"domain name {name!r} invalid (label {first!r} invalid)"
    if rest:
        for label in rest.split("."):
            if not is_dns1123_label(label):
                return f"domain name {name!r} invalid (label {label!r} invalid)"
    return None


_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def join_path(path: str, key: str | int) -> str:
    """YAML path text: ``spec.http[0].match[1].headers.x-user``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _SIMPLE_KEY.fullmatch(key) is None:
        key = '"' + key.replace('"', '\\"') + '"'
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class Issues:
    """Errors and warnings collected while loading; turned into ``ConfigError`` at the end."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []


class Reader:
    """Typed, strict access to one resource's YAML; every problem is recorded, none raised.

    ``where`` names the file (``config/dr.yaml[2]`` for the second document), ``what`` the
    resource (``DestinationRule default-sticky-dr``).  Getters return None when a value is absent
    or wrong (the error is already recorded), so callers fall back to defaults and go on reading.
    """

    def __init__(self, issues: Issues, where: str, what: str) -> None:
        self.issues = issues
        self.where = where
        self.what = what
        self.failed = False

    def _line(self, path: str, message: str) -> str:
        head = f"{self.where}: {self.what}" if self.what else self.where
        return f"{head}: {path}: {message}" if path else f"{head}: {message}"

    def error(self, path: str, message: str) -> None:
        self.failed = True
        self.issues.errors.append(self._line(path, message))

    def warn(self, path: str, message: str) -> None:
        self.issues.warnings.append(self._line(path, message))

    # ---- containers

    def mapping(
        self,
        value: object,
        path: str,
        fields: Iterable[str],
        ignored: Mapping[str, str] | None = None,
    ) -> dict[str, object] | None:
        """``value`` as an object whose keys are all in ``fields`` (or ``ignored``: warned)."""
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(path, f"expected an object, got {type_name(value)}")
            return None
        known = set(fields)
        skipped = ignored or {}
        out: dict[str, object] = {}
        for key, item in value.items():
            name = str(key)
            if name in known:
                out[name] = item
            elif name in skipped:
                if item is not None:
                    self.warn(join_path(path, name), f"ignored: {skipped[name]}")
            else:
                hint = did_you_mean(name, [*known, *skipped])
                self.error(join_path(path, name), f"unknown field{hint}")
        return out

    def obj(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        fields: Iterable[str],
        ignored: Mapping[str, str] | None = None,
        *,
        required: bool = False,
    ) -> dict[str, object] | None:
        value = m.get(key)
        if value is None and required:
            self.error(join_path(path, key), "required")
            return None
        return self.mapping(value, join_path(path, key), fields, ignored)

    def items(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> list[tuple[str, object]]:
        """``(path, item)`` for each element of a list field."""
        value = m.get(key)
        here = join_path(path, key)
        if value is None:
            if required:
                self.error(here, "required")
            return []
        if not isinstance(value, list):
            self.error(here, f"expected a list, got {type_name(value)}")
            return []
        if required and not value:
            self.error(here, "must not be empty")
        return [(join_path(here, i), item) for i, item in enumerate(value)]

    def string_map(self, m: Mapping[str, object], key: str, path: str) -> dict[str, str] | None:
        value = m.get(key)
        here = join_path(path, key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(here, f"expected an object of strings, got {type_name(value)}")
            return None
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                self.error(
                    join_path(here, str(k)),
                    f"expected a string, got {type_name(v)}"
                    + (" (quote it)" if isinstance(v, (int, float, bool)) else ""),
                )
                continue
            out[str(k)] = v
        return out

    def string_list(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for here, item in self.items(m, key, path, required=required):
            if isinstance(item, str):
                out.append((here, item))
            else:
                self.error(here, f"expected a string, got {type_name(item)}")
        return out

    # ---- scalars

    def string(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> str | None:
        value = m.get(key)
        here = join_path(path, key)
        if value is None or (required and value == ""):
            if required:
                self.error(here, "required")
            return None
        if not isinstance(value, str):
            quote = " (quote it)" if isinstance(value, (int, float, bool)) else ""
            self.error(here, f"expected a string, got {type_name(value)}{quote}")
            return None
        return value

    def integer(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        value = m.get(key)
        here = join_path(path, key)
        if value is None:
            if required:
                self.error(here, "required")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(here, f"expected an integer, got {type_name(value)}")
            return None
        if minimum is not None and value < minimum:
            self.error(here, f"must be at least {minimum}, got {value}")
            return None
        if maximum is not None and value > maximum:
            self.error(here, f"must be at most {maximum}, got {value}")
            return None
        return value

    def port(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> int | None:
        value = m.get(key)
        here = join_path(path, key)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 < value <= 65535:
            self.error(here, f"port number {value} must be in the range 1..65535")
            return None
        return self.integer(m, key, path, required=required)

    def boolean(self, m: Mapping[str, object], key: str, path: str) -> bool | None:
        value = m.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.error(join_path(path, key), f"expected true or false, got {type_name(value)}")
            return None
        return value

    def enum(
        self, m: Mapping[str, object], key: str, path: str, values: Sequence[str]
    ) -> str | None:
        value = self.string(m, key, path)
        if value is None:
            return None
        if value not in values:
            hint = did_you_mean(value, values)
            self.error(
                join_path(path, key), f"unknown value {value!r}{hint}; one of {', '.join(values)}"
            )
            return None
        return value

    def duration(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        *,
        istio_minimum: bool = True,
        allow_zero: bool = False,
    ) -> float | None:
        """Seconds.  ``istio_minimum``: Istio's ``ValidateDuration`` (>= 1ms, whole ms)."""
        value = m.get(key)
        here = join_path(path, key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(
                here, f"expected a duration string, got {type_name(value)} ({DURATION_HINT})"
            )
            return None
        try:
            ns = parse_duration(value)
        except ValueError as exc:
            self.error(here, f"{exc} ({DURATION_HINT})")
            return None
        if ns < 0:
            self.error(here, f"duration {value!r} must not be negative")
            return None
        if istio_minimum and not (allow_zero and ns == 0):
            if ns < 1_000_000:
                self.error(here, f"duration {value!r} must be at least 1ms")
                return None
            if ns % 1_000_000:
                self.error(
                    here, f"duration {value!r}: only durations to ms precision are supported"
                )
                return None
        return ns / 1e9


def load_config(paths: Sequence[str]) -> Config:
    """Load Istio YAML files or folders (multi-document) into a ``Config``.

    Raises ``ConfigError`` listing every error of every file.  Warnings are returned in
    ``Config.warnings``, not logged: the caller decides where they go.
    """
    from proxy.istio import load_paths  # the compiler depends on this module, not the reverse

    return load_paths(paths)
