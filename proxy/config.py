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

import ipaddress
from collections.abc import Mapping, Sequence
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


def is_ip(text: str) -> bool:
    """True for an IPv4 or IPv6 address (an endpoint to use as is, not a name to resolve)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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
    """Istio's ``consistentHash``: the hash key policy and the ring or Maglev table behind it.

    ``hash_balance_factor`` is Envoy's bounded load (``proxy.bounded``), from the DestinationRule's
    ``sticky-proxy/hash-balance-factor`` annotation: 0 is off, else a percentage >= 100.
    """

    policy: HashPolicy
    algorithm: Literal["ring", "maglev"] = "ring"
    minimum_ring_size: int = 1024
    maximum_ring_size: int = 8388608
    table_size: int = 65537
    hash_balance_factor: int = 0


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
        bounded = f", bounded load {ch.hash_balance_factor}%" if ch.hash_balance_factor else ""
        if ch.algorithm == "maglev":
            return f"MAGLEV (table size {ch.table_size}{bounded})"
        return f"RING_HASH (minimum ring size {ch.minimum_ring_size}{bounded})"


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


# --------------------------------------------------------------------------- TLS

TLS_VERSIONS = ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")
"""Istio's ``TLSProtocol`` values; ``TLS_AUTO`` leaves Envoy's default."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate chain and its private key (PEM) as read at load, and what it says.

    ``source`` tells where it came from (the files, the Secret, the ``--credentials`` folder)
    for messages and logs; ``files`` are the files read, watched for rotation (``--watch``).
    The PEM bytes stay out of ``repr`` and ``/config_dump``.
    """

    chain: bytes = field(repr=False)
    key: bytes = field(repr=False)
    source: str
    serial: str = ""  # hex, as openssl prints it
    not_after: str = ""  # "Jan  1 00:00:00 2031 GMT"
    names: tuple[str, ...] = ()  # subjectAltName DNS entries
    files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """CA certificates (PEM) as read at load: for client certificates, or upstream servers'."""

    pem: bytes = field(repr=False)
    source: str
    files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A Gateway server's ``tls`` (Istio's ``ServerTLSSettings``) for a terminated HTTPS server.

    The fields as written (file paths, ``credentialName``) and, filled at load by
    ``proxy.istio_tls``, the material they name: ``certificate`` (always, once loaded) and
    ``client_ca`` (MUTUAL and OPTIONAL_MUTUAL). ``where`` is the YAML path, for messages.
    """

    mode: Literal["SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"]
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    ca_credential_name: str = ""  # caCertCredentialName
    min_version: str = "TLS_AUTO"
    max_version: str = "TLS_AUTO"
    cipher_suites: tuple[str, ...] = ()
    certificate: Certificate | None = None
    client_ca: TrustBundle | None = None
    where: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A DestinationRule's ``trafficPolicy.tls`` (Istio's ``ClientTLSSettings``), SIMPLE or MUTUAL.

    ``ca`` None means the system's trust store (Istio's default); ``certificate`` is the client
    certificate of MUTUAL. ``sni`` empty: the request's Host, as Envoy's auto_sni, and then with
    no ``subject_alt_names`` the server certificate must match that name (auto_san_validation).
    """

    mode: Literal["SIMPLE", "MUTUAL"]
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    sni: str = ""
    subject_alt_names: tuple[str, ...] = ()
    insecure_skip_verify: bool = False
    certificate: Certificate | None = None
    ca: TrustBundle | None = None
    where: str = field(default="", compare=False, repr=False)


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    """An active HTTP check (``proxy.health``), from the ``sticky-proxy/health-check`` annotation.

    ``proxy.istio_reader.parse_health_check`` reads the annotation's text, once, at load:
    ``path=/healthz interval=5s timeout=1s unhealthy=2 healthy=1``.
    """

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    unhealthy: int = 2
    healthy: int = 1
    expect: tuple[int, int] = (200, 200)  # inclusive status range that passes
    host: str | None = None  # Host header; None: the cluster's service host

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/': {self.path!r}")
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        if self.unhealthy < 1 or self.healthy < 1:
            raise ValueError("unhealthy and healthy must be >= 1")
        low, high = self.expect
        if not 100 <= low <= high <= 599:
            raise ValueError(f"expect must be a status range within 100-599: {low}-{high}")


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """A persistent (stateful) session: Envoy's stateful-session filter as Istio configures it.

    Istio turns it on for a service labelled ``istio.io/persistent-session: NAME[:PATH]`` (a
    cookie) or ``istio.io/persistent-session-header: NAME`` (a header); the value names the pod
    that served the session (``proxy.sessions``). The rest are sticky-proxy annotations beside
    the label: ``strict`` (503 when the named pod is gone, where Envoy's default re-picks),
    ``drain`` (seconds an endpoint that left discovery keeps serving its sessions), ``ttl``
    (seconds; 0 = no expiry, Istio's setting) and ``key`` (HMAC-SHA256 key that signs the value,
    read from ``key_file``; None: unsigned, Envoy's format). ``source`` names the resource.
    """

    mode: Literal["cookie", "header"]
    name: str
    path: str = "/"
    ttl: int = 0
    strict: bool = False
    drain: float = 0.0
    key: bytes | None = field(default=None, repr=False)
    key_file: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a persistent session needs a cookie or header name")
        if self.ttl < 0 or self.drain < 0:
            raise ValueError("ttl and drain must be >= 0")


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
    health_check: HealthCheckSpec | None = None  # sticky-proxy/health-check annotation
    panic_threshold: float = 50.0
    source: str = ""
    tls: ClientTls | None = None  # DestinationRule trafficPolicy.tls: TLS to the endpoints
    session: SessionSpec | None = None  # the service's persistent session (labels)


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
    prefix_rewrite: str | None = None  # replaces the route's matched prefix (not with uri)


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
    # sticky-proxy/sticky-weights: a weighted split picks by the request's hash (Envoy's
    # WeightedCluster.use_hash_policy), not at random.
    sticky_weights: bool = False

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
    tls: ServerTls | None = None  # an HTTPS server: TLS terminated here


def server_route_name(gateway: GatewaySpec, server: GatewayServer) -> str:
    """Istio's RDS name of an HTTPS server: ``https.443.<port name>.<gateway>.<namespace>``.

    Each HTTPS server has a route table of its own (Envoy: one filter chain per server, chosen
    by SNI), so a connection reaches only the virtual hosts of the server its SNI chose.
    """
    return f"https.{server.port}.{server.port_name}.{gateway.name}.{gateway.namespace}"


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
    """One listening socket per Gateway port; every server on that port shares it.

    ``protocol`` is HTTP, or HTTPS when its servers terminate TLS (``Config.tls_servers``).
    """

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
    # Certificate files read (Gateway and DestinationRule TLS, --credentials): --watch follows
    # them like the YAML files, so a rotated certificate is picked up.
    tls_files: tuple[str, ...] = ()

    def listener(self, port: int) -> ListenerSpec | None:
        for listener in self.listeners:
            if listener.port == port:
                return listener
        return None

    def tls_servers(self, port: int) -> list[tuple[str, GatewayServer]]:
        """(RDS name, server) of the HTTPS servers on ``port``, in configuration order."""
        return [
            (server_route_name(gw, server), server)
            for gw in self.gateways
            for server in gw.servers
            if server.port == port and server.served and server.tls is not None
        ]
