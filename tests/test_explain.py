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
