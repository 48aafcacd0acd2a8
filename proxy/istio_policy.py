"""One level of a DestinationRule ``trafficPolicy`` -> ``TrafficPolicy``.

Theory
------
A traffic policy appears at the top of a DestinationRule, in each subset, and in the
``portLevelSettings`` of either; ``TrafficPolicy`` holds one level, with None for "not set here", so
that ``proxy.istio_dr`` can combine the levels as Istio does.  Within a level:

* ``loadBalancer``: ``simple`` (unset and the deprecated ``LEAST_CONN`` mean LEAST_REQUEST,
  PASSTHROUGH is not supported) or ``consistentHash`` with exactly one hash key (header, cookie,
  source IP, query parameter).  A ring's minimum size defaults to 1024 (at most Envoy's 8388608);
  a Maglev table size must be a prime below 5000011, by Envoy's ``isPrime`` (which counts 1).
* ``connectionPool`` and ``outlierDetection``: what is not set keeps Istio's and Envoy's
  defaults, and several limits take 0 as "not set" (proto3 scalars have no presence).
* ``tls``: TLS to the endpoints (``proxy.istio_tls`` reads it; the certificates it names are
  read in the cross-resource pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from proxy.affinity import (
    CookieAttribute,
    CookiePolicy,
    HashPolicy,
    HeaderPolicy,
    QueryParameterPolicy,
    SourceIPPolicy,
)
from proxy.config import (
    DEFAULT_POOL,
    UINT32_MAX,
    ClientTls,
    ConnectionPoolSettings,
    ConsistentHashLB,
    LoadBalancerSettings,
    OutlierDetection,
    TcpKeepalive,
)
from proxy.istio_names import NOT_SUPPORTED
from proxy.istio_reader import Reader, join_path
from proxy.istio_tls import CLIENT_TLS_FIELDS, read_client_tls

_LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
_POLICY_IGNORED = {
    "tunnel": f"tunnel settings are {NOT_SUPPORTED}",
    "proxyProtocol": f"the PROXY protocol is {NOT_SUPPORTED}",
    "retryBudget": f"retry budgets are {NOT_SUPPORTED}",
}


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """One level of a DestinationRule traffic policy; a None field is "not set here"."""

    lb: LoadBalancerSettings | None = None
    pool: ConnectionPoolSettings | None = None
    outlier: OutlierDetection | None = None
    port_level: tuple[tuple[int, TrafficPolicy], ...] = ()
    tls: ClientTls | None = None

    def for_port(self, port: int) -> tuple[TrafficPolicy, bool]:
        for number, policy in self.port_level:
            if number == port:
                return policy, True
        return self, False


def read_traffic_policy(
    r: Reader, raw: object, path: str, *, port_level: bool
) -> TrafficPolicy | None:
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
    raw_tls = r.obj(m, "tls", path, CLIENT_TLS_FIELDS)
    tls = read_client_tls(r, raw_tls, join_path(path, "tls")) if raw_tls is not None else None
    levels: list[tuple[int, TrafficPolicy]] = []
    if port_level:
        for ppath, item in r.items(m, "portLevelSettings", path):
            if item is None:
                r.error(ppath, "traffic policy may not be null")
                continue
            sub = read_traffic_policy(r, item, ppath, port_level=False)
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
    return TrafficPolicy(lb, pool, outlier, tuple(levels), tls)


def _load_balancer(r: Reader, m: Mapping[str, object], path: str) -> LoadBalancerSettings | None:
    lb = r.obj(
        m,
        "loadBalancer",
        path,
        ("simple", "consistentHash"),
        {
            "localityLbSetting": "locality load balancing is not modelled (one locality)",
            "zoneAwareLbSetting": "zone-aware load balancing is not modelled (one locality)",
            "warmupDurationSecs": f"slow start is {NOT_SUPPORTED}",
            "warmup": f"slow start is {NOT_SUPPORTED}",
        },
    )
    if lb is None:
        return None
    here = join_path(path, "loadBalancer")
    raw = m.get("loadBalancer")
    if isinstance(raw, dict) and all(
        raw.get(k) is not None for k in ("localityLbSetting", "zoneAwareLbSetting")
    ):
        # pkg/config/validation/validation.go (validateLoadBalancer)
        r.error(here, "only one of localityLbSetting and zoneAwareLbSetting can be set")
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
        {"http2KeepAlive": "HTTP/2 keepalive pings do not apply (HTTP/1.1 to the endpoints)"},
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
    if values.get("idle_timeout") is None:
        # Istio's applyConnectionPool: tcp.idleTimeout stands in for http.idleTimeout, both
        # being Envoy's upstream idle_timeout (0 disables it).
        values["idle_timeout"] = values.get("tcp_idle_timeout")
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
            "consecutiveGatewayErrors)",
            "outlierDetectionHttpErrorCodes": f"custom error codes are {NOT_SUPPORTED} "
            "(5xx responses count as errors)",
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
