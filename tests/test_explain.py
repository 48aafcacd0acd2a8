"""proxy.explain: one answer to "where would this request go?", as CLI lines and as admin JSON."""

from __future__ import annotations

from pathlib import Path

from proxy.config import Config
from proxy.explain import ClusterView, Probe, address_of, configured_cluster, explain, split_pair
from proxy.hashing import RingHash, xxh64
from proxy.istio import load_config
from proxy.routing import Router

CONFIG = Path(__file__).resolve().parent.parent / "config"
CLUSTER = "outbound|8080||test2-bwce-srv.default.svc.cluster.local"
ENDPOINTS = ("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")


def article() -> tuple[Config, Router]:
    config = load_config([str(CONFIG)])
    return config, Router(config, 80)


def test_lines_and_json_tell_the_same_route_hash_and_endpoint() -> None:
    config, router = article()
    ex = explain(config, router, Probe("test.com", "/cart", cookies=(("ISTIOID", "alice"),)))
    assert ex.hash == xxh64("alice")
    assert ex.endpoint == RingHash(dict.fromkeys(ENDPOINTS, 1)).pick(xxh64("alice"))
    lines = dict(ex.as_lines())
    status, answer = ex.as_json()
    assert status == 200
    assert lines["cluster"] == answer["cluster"] == CLUSTER
    assert lines["hash key"] == answer["hash_key"] == f"0x{xxh64('alice'):016x}"
    assert lines["endpoint"] == answer["endpoint"] == ex.endpoint
    assert lines["endpoints"].split() == answer["endpoints"] == list(ENDPOINTS)


def test_a_probe_is_the_request_the_proxy_would_parse() -> None:
    probe = Probe(
        "Test.com",
        "api?x=1",
        headers=(("X-User", "bob"), ("x-user", "carol")),
        cookies=(("a", "1"), ("b", "2")),
        query=(("q", "a b/c"),),
    )
    assert probe.target == "/api?x=1&q=a+b/c"
    assert probe.wire_headers() == [
        (b"host", b"Test.com"),
        (b"x-user", b"bob"),
        (b"x-user", b"carol"),
        (b"cookie", b"a=1; b=2"),
    ]


def test_no_route_is_a_404_that_names_the_virtual_hosts() -> None:
    config, router = article()
    ex = explain(config, router, Probe("elsewhere.test"))
    assert ex.decision is None and ex.cluster is None and ex.endpoint is None
    assert ex.as_json() == (
        404,
        {
            "port": 80,
            "request": "GET http://elsewhere.test/",
            "route": None,
            "reply": "404 no route",
        },
    )
    assert ("route", "none: the proxy answers 404 (no route; virtual hosts: test.com)") in (
        ex.as_lines()
    )


def test_a_cluster_with_nothing_healthy_answers_503_in_both_forms() -> None:
    config, router = article()
    spec = config.clusters[CLUSTER]
    ex = explain(config, router, Probe("test.com"), lambda name: ClusterView(spec, (), None))
    assert ex.endpoint is None and ex.set_cookie is not None  # the cookie is still invented
    status, answer = ex.as_json()
    assert (status, answer["reply"], answer["endpoints"]) == (200, "503 no healthy upstream", [])
    assert dict(ex.as_lines())["endpoints"] == "none: the proxy answers 503 no healthy upstream"


def test_the_configured_view_balances_over_the_static_endpoints() -> None:
    config, _ = article()
    view = configured_cluster(config.clusters[CLUSTER])
    assert view.endpoints is not None and [ep.key for ep in view.endpoints] == list(ENDPOINTS)
    assert view.balancer is not None and sorted(view.balancer.hosts) == list(ENDPOINTS)


def test_argument_pairs_and_addresses() -> None:
    assert split_pair(" X-User : bob ", ":") == ("X-User", "bob")
    assert split_pair("sid= a b", "=") == ("sid", " a b")  # cookie values are kept as given
    assert split_pair("no-separator", ":") is None and split_pair(":x", ":") is None
    assert address_of("[::1]:8080") == ("::1", 8080)
    assert address_of("10.0.0.1:80") == ("10.0.0.1", 80)
    assert address_of("10.0.0.1") is None and address_of(":80") is None


# ---------------------------------------------------------------- sessions that survive change

SESSION_YAML = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, annotations: {sticky-proxy/sticky-weights: 'true'}}
spec:
  hosts: [app.test]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /canary}}]
    route:
    - {destination: {host: app.local, subset: v1, port: {number: 80}}, weight: 50}
    - {destination: {host: app.local, subset: v2, port: {number: 80}}, weight: 50}
  - route: [{destination: {host: app.local, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, annotations: {sticky-proxy/hash-balance-factor: '125'}}
spec:
  host: app.local
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
  subsets: [{name: v1, labels: {v: '1'}}, {name: v2, labels: {v: '2'}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: app
  labels: {istio.io/persistent-session: sticky}
spec:
  hosts: [app.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: 9001}, labels: {v: '1'}}
  - {address: 127.0.0.1, ports: {http: 9002}, labels: {v: '2'}}
"""
APP = "outbound|80||app.local"


def sessions() -> tuple[Config, Router]:
    from proxy.istio import load_text

    config = load_text(SESSION_YAML, "s.yaml")
    return config, Router(config, 80)


def test_a_session_cookie_is_decoded_and_its_pod_named() -> None:
    from proxy.sessions import encode_value

    config, router = sessions()
    cookie = encode_value("127.0.0.1:9002", 0, cookie=True, key=None)
    ex = explain(config, router, Probe("app.test", "/", cookies=(("sticky", cookie),)))
    lines = dict(ex.as_lines())
    assert lines["session"].startswith("cookie sticky, path /, no expiry, non-strict")
    assert lines["session value"] == "names a pod: 127.0.0.1:9002"
    assert lines["session pod"] == "127.0.0.1:9002 (healthy): the request goes there"
    assert lines["endpoint"] == ex.endpoint == "127.0.0.1:9002"
    _, answer = ex.as_json()
    assert answer["persistent_session"]["routed"] is True and answer["endpoint"] == ex.endpoint
    # A pod that is not in the cluster: the balancer picks, and the response names its pick.
    gone = encode_value("10.9.9.9:80", 0, cookie=True, key=None)
    ex = explain(
        config,
        router,
        Probe("app.test", "/", headers=(("x-user", "u1"),), cookies=(("sticky", gone),)),
    )
    lines = dict(ex.as_lines())
    assert lines["session pod"] == "10.9.9.9:80 (gone): the balancer picks again"
    assert ex.endpoint in ("127.0.0.1:9001", "127.0.0.1:9002")
    value = encode_value(ex.endpoint, 0, cookie=True, key=None)
    assert lines["session cookie"] == f'sticky="{value}"; Path=/; HttpOnly'
    assert lines["bounded load"].endswith(
        "has room at zero load (the CLI sees no traffic) (0 of 0 in flight)"
    )


def test_bounded_load_spills_in_the_live_view() -> None:
    config, router = sessions()
    spec = config.clusters[APP]
    base = configured_cluster(spec)
    probe = Probe("app.test", "/", headers=(("x-user", "u1"),))
    hashed = explain(config, router, probe).endpoint
    assert hashed is not None
    other = next(key for key in ENDPOINTS[:2] if key != hashed)
    busy = ClusterView(
        spec, base.endpoints, base.balancer, bounded=base.bounded, load={hashed: 10, other: 0}
    )
    ex = explain(config, router, probe, lambda name: busy)
    assert ex.endpoint == other
    assert ex.bounded is not None and f"{hashed} is full now (10 in flight" in ex.bounded
    assert ex.as_json()[1]["bounded_load"] == ex.bounded


def test_a_sticky_split_is_picked_by_hash() -> None:
    config, router = sessions()
    probe = Probe("app.test", "/canary", headers=(("x-user", "u7"),))
    ex = explain(config, router, probe)
    # The split folds both destinations' policies into one key (Istio), hashed as Envoy does.
    assert ex.hash is not None and ex.hash != xxh64("u7")
    point = ex.hash % 100
    subset = "v1" if point < 50 else "v2"
    assert ex.decision is not None and ex.decision.cluster == f"outbound|80|{subset}|app.local"
    lines = dict(ex.as_lines())
    assert lines["weighted pick"] == (
        f"by hash: {point} of 100 -> outbound|80|{subset}|app.local (v1 50, v2 50)"
    )
