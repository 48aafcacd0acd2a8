"""Istio YAML -> model: every supported field, Istio's defaults, names and precedence rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from proxy_process import article_yaml

from proxy.affinity import (
    CookieAttribute,
    CookiePolicy,
    HeaderPolicy,
    QueryParameterPolicy,
    SourceIPPolicy,
)
from proxy.config import (
    DEFAULT_LB,
    ClusterSpec,
    Config,
    ConnectionPoolSettings,
    ConsistentHashLB,
    Destination,
    DirectResponse,
    DnsEndpoints,
    Endpoint,
    HeaderOperations,
    Headers,
    HealthCheckSpec,
    HttpRoute,
    LoadBalancerSettings,
    OutlierDetection,
    Redirect,
    RetryPolicy,
    Rewrite,
    ServerHost,
    StaticEndpoints,
    StringMatch,
    TcpKeepalive,
)
from proxy.istio import load_config, load_text, resolve_gateway_name, resolve_short_name

CONFIG = Path(__file__).resolve().parent.parent / "config"
SVC = "test2-bwce-srv.default.svc.cluster.local"


def load(*docs: str) -> Config:
    return load_text("---\n".join(textwrap.dedent(d) for d in docs), "t.yaml")


GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
"""


def vs(http: str, hosts: str = "[app.test]", name: str = "vs") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: {hosts}
  gateways: [gw]
  http:
{textwrap.indent(textwrap.dedent(http).strip(), "  ")}
"""


def dr(spec: str, name: str = "dr", host: str = "svc") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: {host}
{textwrap.indent(textwrap.dedent(spec).strip(), "  ")}
"""


def se(spec: str, name: str = "se") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
{textwrap.indent(textwrap.dedent(spec).strip(), "  ")}
"""


SVC_FQDN = "svc.default.svc.cluster.local"
ROUTE_TO_SVC = """
- route:
  - destination: {host: svc, port: {number: 8080}}
"""


def route0(config: Config) -> HttpRoute:
    return config.virtual_services[0].http[0]


def cluster(config: Config, name: str = f"outbound|8080||{SVC_FQDN}") -> ClusterSpec:
    return config.clusters[name]


# --------------------------------------------------------------------------- the article


def test_article_yaml_loads_unchanged() -> None:
    config = load_config([str(CONFIG)])
    # Only proxy.istio_lint's advice on the cookie: no path, a 60s ttl.
    assert [w.split(": ")[2] for w in config.warnings] == [
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie",
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
    ]
    assert [(li.port, li.bind, li.gateways) for li in config.listeners] == [
        (80, "0.0.0.0", ("default/default-gw",))
    ]
    (gw,) = config.gateways
    assert gw.selector == (("istio", "ingressgateway"),)
    assert gw.servers[0].hosts == (ServerHost("*", "*"),)
    (vspec,) = config.virtual_services
    assert (vspec.key, vspec.hosts, vspec.gateways) == (
        "default/test-vs",
        ("test.com",),
        ("default/default-gw",),
    )
    route = vspec.http[0]
    assert route.matches[0].uri == StringMatch("prefix", "/")
    cookie = CookiePolicy("ISTIOID", "", 60)
    assert route.route[0].destination == Destination(SVC, 8080)
    assert route.route[0].hash_policies == (cookie,)
    spec = config.clusters[f"outbound|8080||{SVC}"]
    assert spec.lb == LoadBalancerSettings(None, ConsistentHashLB(cookie, "ring", 1024))
    assert spec.endpoints == StaticEndpoints(
        (Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002), Endpoint("127.0.0.1", 9003))
    )
    assert (spec.port, spec.subset, spec.outlier, spec.panic_threshold) == (8080, None, None, 50.0)
    assert list(config.clusters) == [f"outbound|8080||{SVC}"]


def test_files_and_folders_give_the_same_config(tmp_path: Path) -> None:
    files = [str(CONFIG / "sticky.yaml"), str(CONFIG / "serviceentry.yaml")]
    assert load_config(files).clusters == load_config([str(CONFIG)]).clusters
    (tmp_path / "a.yml").write_text((CONFIG / "sticky.yaml").read_text())
    (tmp_path / "b.yaml").write_text((CONFIG / "serviceentry.yaml").read_text())
    (tmp_path / "notes.txt").write_text("not yaml: [")
    config = load_config([str(tmp_path)])
    assert config.sources == (str(tmp_path / "a.yml"), str(tmp_path / "b.yaml"))
    assert len(config.clusters) == 1


def test_other_kinds_are_skipped_with_one_summary_line() -> None:
    config = load(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 3}\n",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: kgw}\n"
        "spec: {gatewayClassName: istio}\n",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\nspec: {replicas: 1}\n",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\nspec: {}\n",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n",
        GATEWAY,
    )
    assert config.warnings == (
        "skipped 3 Kubernetes objects sticky-proxy does not read: "
        "Deployment x2, Gateway (gateway.networking.k8s.io/v1)",
        "skipped 2 Istio objects sticky-proxy does not act on (it reads Gateway, "
        "VirtualService, DestinationRule and ServiceEntry): Sidecar, PeerAuthentication",
    )
    assert [g.key for g in config.gateways] == ["default/gw"]


def test_kubectl_list_output_is_read() -> None:
    text = """
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}
- apiVersion: networking.istio.io/v1beta1
  kind: Gateway
  metadata: {name: gw, namespace: edge, resourceVersion: "42", uid: abc}
  spec: {servers: [{port: {number: 8080, name: web, protocol: HTTP}, hosts: ["*"]}]}
  status: {}
"""
    config = load_text(text, "list.yaml")
    assert [g.key for g in config.gateways] == ["edge/gw"]
    assert config.warnings == ("skipped 1 Kubernetes object sticky-proxy does not read: ConfigMap",)


def test_istio_api_versions_are_all_accepted() -> None:
    for version in ("v1alpha3", "v1beta1", "v1"):
        config = load(GATEWAY.replace("networking.istio.io/v1", f"networking.istio.io/{version}"))
        assert len(config.gateways) == 1


# --------------------------------------------------------------------------- names


def test_short_names_resolve_like_istio() -> None:
    assert resolve_short_name("svc", "ns") == "svc.ns.svc.cluster.local"
    assert resolve_short_name("svc.ns", "ns") == "svc.ns"  # Istio does not expand it either
    assert resolve_short_name("*", "ns") == "*"
    assert resolve_short_name("10.0.0.1", "ns") == "10.0.0.1"
    assert resolve_short_name("*.example.com", "ns") == "*.example.com"


def test_gateway_references_resolve_like_istio() -> None:
    assert resolve_gateway_name("gw", "ns") == "ns/gw"
    assert resolve_gateway_name("other/gw", "ns") == "other/gw"
    assert resolve_gateway_name("./gw", "ns") == "ns/gw"
    assert resolve_gateway_name("gw.edge.svc.cluster.local", "ns") == "edge/gw"
    assert resolve_gateway_name("gw.edge", "ns") == "edge/gw"
    assert resolve_gateway_name("mesh", "ns") == "mesh"


def test_namespace_from_metadata_applies_to_hosts_and_gateways() -> None:
    config = load(
        GATEWAY.replace("{name: gw}", "{name: gw, namespace: edge}"),
        vs(ROUTE_TO_SVC, hosts="[app.test, web]")
        .replace("{name: vs}", "{name: vs, namespace: shop}")
        .replace("gateways: [gw]", "gateways: [edge/gw]"),
        dr("trafficPolicy: {loadBalancer: {simple: RANDOM}}").replace(
            "{name: dr}", "{name: dr, namespace: shop}"
        ),
    )
    (vspec,) = config.virtual_services
    assert vspec.hosts == ("app.test", "web.shop.svc.cluster.local")
    assert vspec.gateways == ("edge/gw",)
    host = "svc.shop.svc.cluster.local"
    assert vspec.http[0].route[0].destination.host == host
    assert config.clusters[f"outbound|8080||{host}"].lb.simple == "RANDOM"
    assert config.clusters[f"outbound|8080||{host}"].endpoints == DnsEndpoints(
        (Endpoint(host, 8080),)
    )


# --------------------------------------------------------------------------- Gateway


def test_gateway_servers_ports_hosts_and_merging() -> None:
    config = load(
        """
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: a, namespace: edge}
        spec:
          selector: {app: my-gateway}
          servers:
          - port: {number: 80, name: http, protocol: http}
            hosts: ["*", "*.example.com", "shop/api.example.com", "./own.example.com"]
          - port: {number: 8443, name: https, protocol: HTTPS}
            hosts: ["*"]
            tls: {mode: PASSTHROUGH}
          - port: {number: 9090, name: grpc, protocol: GRPC}
            hosts: ["*"]
            bind: 127.0.0.1
        """,
        """
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: b, namespace: edge}
        spec:
          servers:
          - port: {number: 80, name: http2, protocol: HTTP}
            hosts: ["b.example.com"]
            tls: {httpsRedirect: true}
        """,
    )
    a, b = config.gateways
    http, https, grpc = a.servers
    assert (http.port, http.port_name, http.protocol, http.served) == (80, "http", "HTTP", True)
    assert http.hosts == (
        ServerHost("*", "*"),
        ServerHost("*", "*.example.com"),
        ServerHost("shop", "api.example.com"),
        ServerHost("edge", "own.example.com"),
    )
    assert a.selector == (("app", "my-gateway"),)
    assert not https.served and grpc.served and grpc.bind == "127.0.0.1"
    assert b.servers[0].https_redirect
    assert [(li.port, li.bind, li.gateways) for li in config.listeners] == [
        (80, "0.0.0.0", ("edge/a", "edge/b")),
        (9090, "127.0.0.1", ("edge/a",)),
    ]
    assert config.warnings == (
        "t.yaml[1]: Gateway a: spec.servers[1].tls.mode: TLS passthrough (PASSTHROUGH: raw TLS "
        "routed by SNI to tls routes) is not supported by sticky-proxy; server skipped (use "
        "SIMPLE or MUTUAL to terminate TLS here)",
        "t.yaml[1]: Gateway a: spec.servers[2].port.protocol: GRPC is served as HTTP/1.1 by "
        "sticky-proxy",
    )


# --------------------------------------------------------------------------- VirtualService


def test_every_match_field() -> None:
    config = load(
        GATEWAY,
        vs(
            """
            - name: r
              match:
              - name: m
                uri: {regex: "/v[0-9]+/.*"}
                scheme: {exact: http}
                method: {exact: GET}
                authority: {prefix: app}
                headers:
                  X-User: {exact: alice}
                  x-beta: {}
                  x-any: {regex: "*"}
                  x-re: {regex: "a.c"}
                queryParams:
                  debug: {exact: "1"}
                  trace: {}
                  v: {prefix: "2"}
                withoutHeaders:
                  x-skip: {}
                  x-env: {exact: prod}
                ignoreUriCase: true
                port: 80
                gateways: [gw]
              - uri: {exact: /exact}
              - uri: {prefix: /pre}
              route:
              - destination: {host: svc, port: {number: 8080}}
            """
        ),
    )
    m0, m1, m2 = route0(config).matches
    assert route0(config).name == "r" and m0.name == "m"
    assert m0.uri == StringMatch("regex", "/v[0-9]+/.*")
    assert m0.scheme == StringMatch("exact", "http")
    assert m0.method == StringMatch("exact", "GET")
    assert m0.authority == StringMatch("prefix", "app")
    assert m0.headers == (
        ("x-user", StringMatch("exact", "alice")),
        ("x-beta", StringMatch("present")),
        ("x-any", StringMatch("present")),
        ("x-re", StringMatch("regex", "a.c")),
    )
    assert m0.query_params == (
        ("debug", StringMatch("exact", "1")),
        ("trace", StringMatch("present")),
        ("v", StringMatch("prefix", "2")),
    )
    assert m0.without_headers == (
        ("x-skip", StringMatch("present")),
        ("x-env", StringMatch("exact", "prod")),
    )
    assert (m0.ignore_uri_case, m0.port, m0.gateways) == (True, 80, ("default/gw",))
    assert m1.uri == StringMatch("exact", "/exact")
    assert m2.uri == StringMatch("prefix", "/pre")


def test_route_destinations_rewrite_headers_timeout_retries() -> None:
    config = load(
        GATEWAY,
        vs(
            """
            - route:
              - destination: {host: svc, subset: v1, port: {number: 8080}}
                weight: 90
                headers:
                  request: {set: {x-canary: "no"}}
              - destination: {host: svc, subset: v2, port: {number: 8080}}
                weight: 10
              rewrite: {uri: /v2, authority: backend.test}
              headers:
                request:
                  set: {x-b: "2", x-a: "1"}
                  add: {x-add: v}
                  remove: [x-secret]
                response:
                  set: {cache-control: no-store}
                  remove: [server]
              timeout: 1.5s
              retries:
                attempts: 3
                perTryTimeout: 500ms
                retryOn: 5xx,connect-failure,503
                retryRemoteLocalities: true
                retryIgnorePreviousHosts: false
                backoff: 25ms
            - route:
              - destination: {host: svc, port: {number: 8080}}
              rewrite:
                uriRegexRewrite: {match: "^/old/(.*)", rewrite: "/new/\\\\1"}
              retries: {attempts: 0}
            """
        ),
        dr("subsets: [{name: v1, labels: {v: '1'}}, {name: v2, labels: {v: '2'}}]"),
    )
    first, second = config.virtual_services[0].http
    d1, d2 = first.route
    assert (d1.destination, d1.weight) == (Destination(SVC_FQDN, 8080, "v1"), 90)
    assert (d2.destination, d2.weight) == (Destination(SVC_FQDN, 8080, "v2"), 10)
    assert d1.headers == Headers(HeaderOperations(set=(("x-canary", "no"),)))
    assert first.rewrite == Rewrite("/v2", "backend.test")
    assert first.headers == Headers(
        HeaderOperations((("x-a", "1"), ("x-b", "2")), (("x-add", "v"),), ("x-secret",)),
        HeaderOperations((("cache-control", "no-store"),), (), ("server",)),
    )
    assert first.timeout == 1.5
    assert first.retries == RetryPolicy(
        attempts=3,
        retry_on=("5xx", "connect-failure", "retriable-status-codes"),
        retriable_status_codes=(503,),
        per_try_timeout=0.5,
        retry_previous_hosts=False,
        retry_remote_localities=True,
        backoff=0.025,
        explicit=True,
    )
    assert second.rewrite == Rewrite(uri_regex=("^/old/(.*)", "/new/\\1"))
    assert second.retries is None  # attempts: 0 disables retries
    assert set(config.clusters) >= {
        f"outbound|8080|v1|{SVC_FQDN}",
        f"outbound|8080|v2|{SVC_FQDN}",
        f"outbound|8080||{SVC_FQDN}",
    }


def test_default_retries_and_timeout_are_istios() -> None:
    config = load(GATEWAY, vs(ROUTE_TO_SVC))
    route = route0(config)
    assert route.timeout is None
    assert route.retries == RetryPolicy()  # 2 attempts, connect-failure... and 503
    hashing = load(
        GATEWAY,
        vs(ROUTE_TO_SVC),
        dr("trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}"),
    )
    # Istio drops the previous-hosts predicate on hashing routes.
    assert route0(hashing).retries == RetryPolicy(retry_previous_hosts=False)


def test_redirect_and_direct_response() -> None:
    config = load(
        GATEWAY,
        vs(
            """
            - match: [{uri: {prefix: /old}}]
              redirect: {uri: /new, authority: new.test, port: 8080, scheme: https,
                         redirectCode: 308}
            - match: [{uri: {prefix: /derive}}]
              redirect: {authority: x.test, derivePort: FROM_REQUEST_PORT}
            - match: [{uri: {prefix: /health}}]
              directResponse: {status: 200, body: {string: ok}}
            - directResponse: {status: 503, body: {bytes: aGVsbG8=}}
            """
        ),
    )
    r0, r1, r2, r3 = config.virtual_services[0].http
    assert r0.redirect == Redirect("/new", "new.test", 8080, None, "https", 308)
    assert r1.redirect == Redirect(None, "x.test", None, "FROM_REQUEST_PORT", None, 301)
    assert r2.direct_response == DirectResponse(200, b"ok")
    assert r3.direct_response == DirectResponse(503, b"hello")
    assert r0.route == () and config.clusters == {}


def test_istio_fields_sticky_proxy_ignores_are_warned() -> None:
    config = load(
        GATEWAY,
        vs(
            """
            - route:
              - destination: {host: svc, port: {number: 8080}}
              fault: {abort: {httpStatus: 500, percentage: {value: 1}}}
              mirror: {host: shadow}
              corsPolicy: {allowOrigins: [{exact: "*"}]}
            """
        ),
    )
    assert [w.split(": ", 3)[2:] for w in config.warnings] == [
        ["spec.http[0].fault", "ignored: fault injection is not supported by sticky-proxy"],
        ["spec.http[0].mirror", "ignored: mirroring is not supported by sticky-proxy"],
        ["spec.http[0].corsPolicy", "ignored: CORS policies are not supported by sticky-proxy"],
    ]


# --------------------------------------------------------------------------- DestinationRule


@pytest.mark.parametrize(
    ("simple", "expected"),
    [
        ("ROUND_ROBIN", "ROUND_ROBIN"),
        ("LEAST_REQUEST", "LEAST_REQUEST"),
        ("RANDOM", "RANDOM"),
        ("LEAST_CONN", "LEAST_REQUEST"),
        ("UNSPECIFIED", "LEAST_REQUEST"),
    ],
)
def test_simple_load_balancers(simple: str, expected: str) -> None:
    config = load(
        GATEWAY, vs(ROUTE_TO_SVC), dr(f"trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}")
    )
    assert cluster(config).lb == LoadBalancerSettings(expected, None)
    assert route0(config).route[0].hash_policies == ()


def test_no_destination_rule_means_least_request() -> None:
    config = load(GATEWAY, vs(ROUTE_TO_SVC))
    assert cluster(config).lb == DEFAULT_LB == LoadBalancerSettings("LEAST_REQUEST", None)
    assert cluster(config).outlier is None
    assert cluster(config).pool == ConnectionPoolSettings()


@pytest.mark.parametrize(
    ("consistent_hash", "expected"),
    [
        ("{httpHeaderName: X-User}", ConsistentHashLB(HeaderPolicy("x-user"))),
        ("{httpQueryParameterName: session}", ConsistentHashLB(QueryParameterPolicy("session"))),
        ("{useSourceIp: true}", ConsistentHashLB(SourceIPPolicy())),
        ("{httpCookie: {name: s}}", ConsistentHashLB(CookiePolicy("s"))),
        (
            "{httpCookie: {name: s, path: /app, ttl: 1.5s, attributes: [{name: SameSite, "
            "value: Strict}, {name: Secure}]}}",
            ConsistentHashLB(
                CookiePolicy(
                    "s",
                    "/app",
                    1,
                    (CookieAttribute("SameSite", "Strict"), CookieAttribute("Secure")),
                )
            ),
        ),
        ("{httpCookie: {name: s, ttl: 0s}}", ConsistentHashLB(CookiePolicy("s", ttl=0))),
        ("{httpCookie: {name: s, ttl: 1h}}", ConsistentHashLB(CookiePolicy("s", ttl=3600))),
        (
            "{httpHeaderName: x, ringHash: {minimumRingSize: 4096}}",
            ConsistentHashLB(HeaderPolicy("x"), "ring", minimum_ring_size=4096),
        ),
        ("{httpHeaderName: x, ringHash: {}}", ConsistentHashLB(HeaderPolicy("x"))),
        (
            "{httpHeaderName: x, maglev: {tableSize: 65521}}",
            ConsistentHashLB(HeaderPolicy("x"), "maglev", table_size=65521),
        ),
    ],
)
def test_consistent_hash_forms(consistent_hash: str, expected: ConsistentHashLB) -> None:
    config = load(
        GATEWAY,
        vs(ROUTE_TO_SVC),
        dr(f"trafficPolicy: {{loadBalancer: {{consistentHash: {consistent_hash}}}}}"),
    )
    assert cluster(config).lb == LoadBalancerSettings(None, expected)
    assert route0(config).route[0].hash_policies == (expected.policy,)


def test_deprecated_minimum_ring_size_is_honoured_and_warned() -> None:
    config = load(
        GATEWAY,
        vs(ROUTE_TO_SVC),
        dr(
            "trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, "
            "minimumRingSize: 2048}}}"
        ),
    )
    assert cluster(config).lb.consistent_hash == ConsistentHashLB(
        SourceIPPolicy(), minimum_ring_size=2048
    )
    assert config.warnings == (
        "t.yaml[3]: DestinationRule dr: spec.trafficPolicy.loadBalancer.consistentHash."
        "minimumRingSize: consistent hash MinimumRingSize is deprecated, use ConsistentHashLB's "
        "RingHash configuration instead",
    )


def test_outlier_detection_and_connection_pool() -> None:
    config = load(
        GATEWAY,
        vs(ROUTE_TO_SVC),
        dr(
            """
            trafficPolicy:
              outlierDetection:
                consecutive5xxErrors: 3
                consecutiveGatewayErrors: 2
                splitExternalLocalOriginErrors: true
                consecutiveLocalOriginFailures: 4
                interval: 5s
                baseEjectionTime: 1m
                maxEjectionPercent: 50
                minHealthPercent: 30
              connectionPool:
                tcp:
                  maxConnections: 100
                  connectTimeout: 250ms
                  tcpKeepalive: {probes: 3, time: 2h, interval: 75s}
                  maxConnectionDuration: 10m
                  idleTimeout: 0s
                http:
                  http1MaxPendingRequests: 10
                  http2MaxRequests: 20
                  maxRequestsPerConnection: 1
                  maxRetries: 4
                  idleTimeout: 30s
                  h2UpgradePolicy: DO_NOT_UPGRADE
                  useClientProtocol: true
                  maxConcurrentStreams: 8
            """
        ),
    )
    spec = cluster(config)
    assert spec.outlier == OutlierDetection(3, 2, True, 4, 5.0, 60.0, 50, 30)
    assert spec.panic_threshold == 30.0
    assert spec.pool == ConnectionPoolSettings(
        max_connections=100,
        connect_timeout=0.25,
        tcp_keepalive=TcpKeepalive(3, 7200.0, 75.0),
        max_connection_duration=600.0,
        tcp_idle_timeout=0.0,
        http1_max_pending_requests=10,
        http2_max_requests=20,
        max_requests_per_connection=1,
        max_retries=4,
        idle_timeout=30.0,
        h2_upgrade_policy="DO_NOT_UPGRADE",
        use_client_protocol=True,
        max_concurrent_streams=8,
    )


def test_outlier_and_pool_defaults_are_istios() -> None:
    config = load(
        GATEWAY,
        vs(ROUTE_TO_SVC),
        dr("""
           trafficPolicy:
             outlierDetection: {}
             connectionPool: {tcp: {maxConnections: 0}, http: {http1MaxPendingRequests: 0}}
           """),
    )
    spec = cluster(config)
    # 5 consecutive 5xx, gateway errors off, 10 s interval, 30 s ejection, 10 %, panic off.
    assert spec.outlier == OutlierDetection(5, 0, False, 5, 10.0, 30.0, 10, 0)
    assert spec.panic_threshold == 0.0
    assert spec.pool == ConnectionPoolSettings()  # 0 means "not set" in Istio


# ---- precedence: subset port-level > subset > port-level > top-level

PRECEDENCE = """
trafficPolicy:
  loadBalancer: {consistentHash: {httpCookie: {name: top, ttl: 10s}}}
  outlierDetection: {consecutive5xxErrors: 7}
  connectionPool: {tcp: {maxConnections: 7}}
  portLevelSettings:
  - port: {number: 9090}
    loadBalancer: {consistentHash: {httpHeaderName: x-port}}
subsets:
- name: plain
  labels: {v: plain}
- name: lb
  labels: {v: lb}
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-subset}}
- name: lb-ports
  labels: {v: lb-ports}
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-subset}}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: RANDOM}
    - port: {number: 8080}
      loadBalancer: {consistentHash: {httpHeaderName: x-subset-port}}
- name: rr
  labels: {v: rr}
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
"""

SE_TWO_PORTS = """
hosts: [svc.default.svc.cluster.local]
ports:
- {number: 8080, name: http, protocol: HTTP}
- {number: 9090, name: admin, protocol: HTTP}
resolution: STATIC
endpoints:
- {address: 10.0.0.1, labels: {v: plain}}
- {address: 10.0.0.2, labels: {v: lb}}
- {address: 10.0.0.3, labels: {v: lb-ports}}
- {address: 10.0.0.4, labels: {v: rr}}
"""


def precedence_config(routes: str) -> Config:
    return load(GATEWAY, vs(routes), dr(PRECEDENCE), se(SE_TWO_PORTS))


def test_cluster_policy_precedence() -> None:
    config = precedence_config(ROUTE_TO_SVC)

    def spec(port: int, subset: str | None) -> ClusterSpec:
        return config.clusters[f"outbound|{port}|{subset or ''}|{SVC_FQDN}"]

    top = LoadBalancerSettings(None, ConsistentHashLB(CookiePolicy("top", ttl=10)))
    # top-level
    assert spec(8080, None).lb == top
    assert spec(8080, None).outlier == OutlierDetection(consecutive_5xx_errors=7)
    assert spec(8080, None).pool.max_connections == 7
    # port-level replaces the top-level policy wholesale: no outlier, default pool
    assert spec(9090, None).lb == LoadBalancerSettings(
        None, ConsistentHashLB(HeaderPolicy("x-port"))
    )
    assert spec(9090, None).outlier is None
    assert spec(9090, None).pool == ConnectionPoolSettings()
    # a subset without a policy inherits; a subset's fields override one by one
    assert spec(8080, "plain").lb == top
    assert spec(8080, "lb").lb.consistent_hash == ConsistentHashLB(HeaderPolicy("x-subset"))
    assert spec(8080, "lb").outlier == OutlierDetection(consecutive_5xx_errors=7)
    assert spec(8080, "lb").pool.max_connections == 7
    # a subset on a port with the DR's port-level entry: port-level first, then the subset
    assert spec(9090, "lb").lb.consistent_hash == ConsistentHashLB(HeaderPolicy("x-subset"))
    assert spec(9090, "lb").outlier is None
    # subset port-level replaces all four fields
    assert spec(8080, "lb-ports").lb.consistent_hash == ConsistentHashLB(
        HeaderPolicy("x-subset-port")
    )
    assert spec(8080, "lb-ports").outlier is None
    assert spec(8080, "lb-ports").pool == ConnectionPoolSettings()
    assert spec(9090, "lb-ports").lb == LoadBalancerSettings("RANDOM", None)
    assert spec(8080, "rr").lb == LoadBalancerSettings("ROUND_ROBIN", None)
    # endpoints filtered by the subset labels
    assert spec(8080, "lb").endpoints == StaticEndpoints(
        (Endpoint("10.0.0.2", 8080, labels=(("v", "lb"),)),)
    )
    assert len(spec(8080, None).endpoints.endpoints) == 4  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("{host: svc, port: {number: 8080}}", CookiePolicy("top", ttl=10)),
        ("{host: svc, port: {number: 9090}}", HeaderPolicy("x-port")),
        ("{host: svc, port: {number: 8080}, subset: plain}", CookiePolicy("top", ttl=10)),
        ("{host: svc, port: {number: 9090}, subset: plain}", HeaderPolicy("x-port")),
        ("{host: svc, port: {number: 8080}, subset: lb}", HeaderPolicy("x-subset")),
        ("{host: svc, port: {number: 9090}, subset: lb}", HeaderPolicy("x-subset")),
        ("{host: svc, port: {number: 8080}, subset: lb-ports}", HeaderPolicy("x-subset-port")),
        # the subset's port-level entry has no consistentHash: fall to the subset's
        ("{host: svc, port: {number: 9090}, subset: lb-ports}", HeaderPolicy("x-subset")),
        # Istio quirk: a subset with a simple LB keeps the top-level hash on the route
        ("{host: svc, port: {number: 8080}, subset: rr}", CookiePolicy("top", ttl=10)),
        # port-level entries are consulted only when the destination names its port
        ("{host: svc, subset: lb-ports}", HeaderPolicy("x-subset")),
    ],
)
def test_route_hash_policy_precedence(destination: str, expected: object) -> None:
    routes = f"- route:\n  - destination: {destination}\n"
    if "number" in destination:
        config = precedence_config(routes)
    else:  # without the two-port ServiceEntry, a port-less destination is allowed
        config = load(GATEWAY, vs(routes), dr(PRECEDENCE))
    assert route0(config).route[0].hash_policies == (expected,)


def test_destination_rules_of_one_host_merge_like_istio() -> None:
    config = load(
        GATEWAY,
        vs(ROUTE_TO_SVC),
        dr(
            """
           trafficPolicy: {loadBalancer: {simple: RANDOM}}
           subsets: [{name: v1, labels: {v: '1'}}]
           """,
            name="first",
        ),
        dr(
            """
           trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
           subsets: [{name: v1, labels: {v: x}}, {name: v2, labels: {v: '2'}}]
           """,
            name="second",
            host="svc.default.svc.cluster.local",
        ),
    )
    assert cluster(config).lb.simple == "RANDOM"
    assert f"outbound|8080|v2|{SVC_FQDN}" not in config.clusters  # built only when routed to
    assert config.warnings == (
        "t.yaml[4]: DestinationRule second: spec.subsets: subset v1 of host "
        "svc.default.svc.cluster.local is already defined by DestinationRule default/first; "
        "Istio keeps the first",
        "t.yaml[4]: DestinationRule second: spec.trafficPolicy: host "
        "svc.default.svc.cluster.local already has a traffic policy from DestinationRule "
        "default/first; Istio keeps the first",
    )


def test_wildcard_destination_rule_most_specific_wins() -> None:
    config = load(
        GATEWAY,
        vs("- route:\n  - destination: {host: api.shop.example.com, port: {number: 80}}\n"),
        dr("trafficPolicy: {loadBalancer: {simple: RANDOM}}", "all", "'*.example.com'"),
        dr("trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}", "shop", "'*.shop.example.com'"),
    )
    assert config.clusters["outbound|80||api.shop.example.com"].lb.simple == "ROUND_ROBIN"


def test_health_check_annotation_reaches_the_cluster() -> None:
    config = load(
        GATEWAY,
        vs(ROUTE_TO_SVC),
        dr("trafficPolicy: {loadBalancer: {simple: RANDOM}}").replace(
            "{name: dr}",
            "{name: dr, annotations: {sticky-proxy/health-check: 'path=/healthz interval=5s'}}",
        ),
    )
    assert cluster(config).health_check == HealthCheckSpec(path="/healthz", interval=5.0)


# --------------------------------------------------------------------------- ServiceEntry


def test_service_entry_static_endpoints_ports_weights_labels() -> None:
    config = load(
        GATEWAY,
        vs("- route:\n  - destination: {host: pods.local, subset: blue}\n"),
        dr("subsets: [{name: blue, labels: {color: blue}}]", host="pods.local"),
        se("""
           hosts: [pods.local]
           ports: [{number: 8080, name: http, protocol: HTTP, targetPort: 9000}]
           resolution: STATIC
           endpoints:
           - {address: 127.0.0.1, ports: {http: 9001}, labels: {color: blue}, weight: 3}
           - {address: 127.0.0.2, labels: {color: green}}
           - {address: "::1", labels: {color: blue}, weight: 0}
           """),
    )
    blue = config.clusters["outbound|8080|blue|pods.local"]
    assert blue.endpoints == StaticEndpoints(
        (
            Endpoint("127.0.0.1", 9001, 3, (("color", "blue"),)),
            Endpoint("::1", 9000, 1, (("color", "blue"),)),
        )
    )
    assert [ep.key for ep in blue.endpoints.endpoints] == ["127.0.0.1:9001", "[::1]:9000"]
    everyone = config.clusters["outbound|8080||pods.local"]
    assert len(everyone.endpoints.endpoints) == 3  # type: ignore[union-attr]
    assert config.service_ports == {"pods.local": (8080,)}


def test_service_entry_dns_resolution() -> None:
    config = load(
        GATEWAY,
        vs("- route:\n  - destination: {host: api.example.com}\n", name="a"),
        vs("- route:\n  - destination: {host: pool.example.com}\n", name="b", hosts="[b.test]"),
        se(
            """
           hosts: [api.example.com]
           ports: [{number: 443, name: http, protocol: HTTP}]
           resolution: DNS
           """,
            name="api",
        ),
        se(
            """
           hosts: [pool.example.com]
           ports: [{number: 80, name: http}]
           resolution: DNS
           endpoints:
           - {address: a.pool.example.com, labels: {zone: a}}
           - {address: b.pool.example.com, ports: {http: 8080}, weight: 2}
           """,
            name="pool",
        ),
    )
    # a destination without a port uses the ServiceEntry's only port
    assert config.clusters["outbound|443||api.example.com"].endpoints == DnsEndpoints(
        (Endpoint("api.example.com", 443),)
    )
    assert config.clusters["outbound|80||pool.example.com"].endpoints == DnsEndpoints(
        (
            Endpoint("a.pool.example.com", 80, 1, (("zone", "a"),)),
            Endpoint("b.pool.example.com", 8080, 2),
        )
    )


def test_host_without_service_entry_is_resolved_through_dns() -> None:
    config = load(GATEWAY, vs(ROUTE_TO_SVC))
    assert cluster(config).endpoints == DnsEndpoints((Endpoint(SVC_FQDN, 8080),))


def test_destination_without_port_falls_back_to_the_listener_port() -> None:
    config = load(GATEWAY, vs("- route:\n  - destination: {host: svc}\n"))
    assert list(config.clusters) == [f"outbound|80||{SVC_FQDN}"]
    assert config.warnings == (
        "t.yaml[2]: VirtualService vs: spec.http[0].route[0].destination.port: not set and host "
        "svc.default.svc.cluster.local has no ServiceEntry: Istio's fallback, the Gateway port "
        "the request came in on, is used",
    )


def test_every_envoy_retry_on_condition_is_accepted() -> None:
    conditions = (
        "5xx,gateway-error,reset,reset-before-request,connect-failure,retriable-4xx,"
        "refused-stream,retriable-status-codes,retriable-headers,envoy-ratelimited,"
        "http3-post-connect-failure,cancelled,deadline-exceeded,internal,resource-exhausted,"
        "unavailable"
    )
    config = load(
        GATEWAY, vs(ROUTE_TO_SVC + f"  retries: {{attempts: 1, retryOn: '{conditions},429'}}\n")
    )
    retries = route0(config).retries
    assert retries is not None
    assert retries.retry_on == tuple(conditions.split(","))
    assert retries.retriable_status_codes == (429,)


def test_retries_written_in_the_virtual_service_are_explicit() -> None:
    base = article_yaml([("127.0.0.1", 9001)])
    implicit = load_text(base).virtual_services[0].http[0].retries
    retries = "    retries: {attempts: 3, retryOn: 5xx}\n"
    asked = base.replace("    route:\n", retries + "    route:\n", 1)
    explicit = load_text(asked).virtual_services[0].http[0].retries
    assert implicit is not None and not implicit.explicit
    assert explicit is not None and explicit.explicit and explicit.attempts == 3
