"""Routing: Envoy's virtual host and route selection as istiod builds it for a gateway."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping

import pytest

from proxy.affinity import CookiePolicy, HeaderPolicy
from proxy.config import Config, RetryPolicy
from proxy.exchange import HeaderEdit, LocalReply
from proxy.istio import load_text
from proxy.routing import RouteDecision, Router


def load(*docs: str) -> Config:
    return load_text("---\n".join(textwrap.dedent(d) for d in docs), "t.yaml")


def gateway(hosts: str = '["*"]', name: str = "gw", port: int = 80, extra: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {name}}}
spec:
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: {hosts}{extra}
"""


def vs(
    http: str,
    hosts: str = "[app.test]",
    name: str = "vs",
    gateways: str = "[gw]",
    namespace: str = "default",
) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: {hosts}
  gateways: {gateways}
  http:
{textwrap.indent(textwrap.dedent(http).strip(), "  ")}
"""


def to(host: str, extra: str = "") -> str:
    """One route to ``host`` port 80, optional extra route fields."""
    return f"- route:\n  - destination: {{host: {host}, port: {{number: 80}}}}\n{extra}"


def match(
    router: Router,
    authority: str = "app.test",
    path: str = "/",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> RouteDecision | None:
    return router.match(authority, path, method, headers or {}, query or {})


def decide(router: Router, authority: str = "app.test", path: str = "/") -> RouteDecision:
    decision = match(router, authority, path)
    assert decision is not None
    return decision


def always(value: float) -> Callable[[], float]:
    """A ``rand`` for ``Router`` that always draws ``value`` (picks a weighted route)."""
    return lambda: value


def short(decision: RouteDecision | None) -> str | None:
    """The destination's short host name, or None when nothing matched."""
    if decision is None or decision.cluster is None:
        return None
    return decision.cluster.rsplit("|", 1)[1].split(".")[0]


# --------------------------------------------------------------------------- virtual hosts


def test_host_selection_exact_then_longest_wildcard_then_star() -> None:
    config = load(
        gateway(),
        vs(to("exact"), hosts="[api.example.com]", name="a"),
        vs(to("wild"), hosts='["*.example.com"]', name="b"),
        vs(to("deeper"), hosts='["*.eu.example.com"]', name="c"),
        vs(to("star"), hosts='["*"]', name="d"),
    )
    router = Router(config, 80)
    assert short(match(router, "api.example.com")) == "exact"
    assert short(match(router, "API.Example.COM:8080")) == "exact"  # case and port ignored
    assert short(match(router, "web.example.com")) == "wild"
    assert short(match(router, "a.b.example.com")) == "wild"
    assert short(match(router, "shop.eu.example.com")) == "deeper"
    assert short(match(router, "example.com")) == "star"  # "*.x" needs at least one character
    assert short(match(router, "[::1]:80")) == "star"
    assert short(match(router, "")) == "star"


def test_no_virtual_host_means_no_route() -> None:
    router = Router(load(gateway(), vs(to("svc"))), 80)
    assert match(router, "other.test") is None
    assert router.vhosts == ("app.test",)


def test_server_hosts_intersect_virtual_service_hosts() -> None:
    config = load(
        gateway('["*.example.com", "shop/only.shop.test", "b.test"]'),
        vs(to("specific"), hosts="[a.example.com, other.test]", name="a"),
        vs(to("wild"), hosts='["*.test"]', name="b"),
        vs(
            to("shop"),
            hosts="[only.shop.test]",
            name="c",
            namespace="shop",
            gateways="[default/gw]",
        ),
        vs(
            to("nope"),
            hosts="[x.example.com]",
            name="d",
            namespace="other",
            gateways="[default/gw]",
        ),
    )
    router = Router(config, 80)
    # server *.example.com x VS a.example.com -> a.example.com; other.test is not served
    assert short(match(router, "a.example.com")) == "specific"
    assert match(router, "other.test") is None
    # server b.test x VS *.test -> only b.test (the more specific name)
    assert short(match(router, "b.test")) == "wild"
    assert match(router, "c.test") is None
    # "shop/..." hosts are only visible to VirtualServices in namespace shop
    assert short(match(router, "only.shop.test")) == "shop"
    # *.example.com (namespace *) is visible to every namespace
    assert short(match(router, "x.example.com")) == "nope"


def test_only_virtual_services_bound_to_the_gateway_route() -> None:
    config = load(
        gateway(name="gw"),
        gateway(name="other", port=8080),
        vs(to("mine"), name="a"),
        vs(to("theirs"), hosts="[b.test]", name="b", gateways="[other]"),
        vs(to("mesh"), hosts="[c.test]", name="c", gateways="[mesh]"),
    )
    router = Router(config, 80)
    assert short(match(router, "app.test")) == "mine"
    assert match(router, "b.test") is None
    assert match(router, "c.test") is None
    assert short(match(Router(config, 8080), "b.test")) == "theirs"
    assert Router(config, 9999).vhosts == ()


# --------------------------------------------------------------------------- route order


def test_first_match_wins_and_routes_after_a_catch_all_are_dropped() -> None:
    config = load(
        gateway(),
        vs("""
           - match: [{uri: {prefix: /api}}]
             route: [{destination: {host: api, port: {number: 80}}}]
           - route: [{destination: {host: web, port: {number: 80}}}]
           - match: [{uri: {prefix: /never}}]
             route: [{destination: {host: never, port: {number: 80}}}]
           """),
    )
    router = Router(config, 80)
    assert short(match(router, path="/api/x")) == "api"
    assert short(match(router, path="/never")) == "web"
    decision = match(router, path="/other")
    assert decision is not None and decision.action.route_index == 1
    assert decision.action.match_index is None


def test_catch_alls_of_several_virtual_services_move_to_the_end() -> None:
    config = load(
        gateway(),
        vs(to("first"), name="a"),  # created first: a catch-all
        vs(
            "- match: [{uri: {prefix: /api}}]\n"
            "  route: [{destination: {host: second, port: {number: 80}}}]\n",
            name="b",
        ),
    )
    router = Router(config, 80)
    assert short(match(router, path="/api")) == "second"  # Istio's SortVHostRoutes
    assert short(match(router, path="/")) == "first"


def test_match_port_and_match_gateways_filter_routes() -> None:
    config = load(
        gateway(name="gw"),
        gateway(name="alt", port=8080),
        vs(
            """
           - match: [{port: 8080, uri: {prefix: /p}}]
             route: [{destination: {host: on8080, port: {number: 80}}}]
           - match: [{gateways: [alt], uri: {prefix: /g}}]
             route: [{destination: {host: onalt, port: {number: 80}}}]
           - route: [{destination: {host: rest, port: {number: 80}}}]
           """,
            gateways="[gw, alt]",
        ),
    )
    on80, on8080 = Router(config, 80), Router(config, 8080)
    assert short(match(on80, path="/p")) == "rest"
    assert short(match(on8080, path="/p")) == "on8080"
    assert short(match(on80, path="/g")) == "rest"
    assert short(match(on8080, path="/g")) == "onalt"


# --------------------------------------------------------------------------- conditions

CONDITIONS = """
- match: [{uri: {exact: /exact}}]
  route: [{destination: {host: exact, port: {number: 80}}}]
- match: [{uri: {regex: "/r/[0-9]+"}}]
  route: [{destination: {host: regex, port: {number: 80}}}]
- match: [{uri: {prefix: /CIP}, ignoreUriCase: true}]
  route: [{destination: {host: ci, port: {number: 80}}}]
- match: [{uri: {exact: /CiExact}, ignoreUriCase: true}]
  route: [{destination: {host: ciexact, port: {number: 80}}}]
- match: [{uri: {regex: "/Re"}, ignoreUriCase: true}]
  route: [{destination: {host: reci, port: {number: 80}}}]
- match: [{uri: {prefix: "/q?x"}}]
  route: [{destination: {host: queryprefix, port: {number: 80}}}]
- match: [{headers: {x-user: {exact: alice}}}]
  route: [{destination: {host: alice, port: {number: 80}}}]
- match: [{headers: {x-tier: {prefix: gold}}}]
  route: [{destination: {host: gold, port: {number: 80}}}]
- match: [{headers: {x-id: {regex: "[0-9]{3}"}}}]
  route: [{destination: {host: id, port: {number: 80}}}]
- match: [{headers: {x-beta: {}}}]
  route: [{destination: {host: beta, port: {number: 80}}}]
- match: [{queryParams: {v: {exact: "2"}}}]
  route: [{destination: {host: v2, port: {number: 80}}}]
- match: [{queryParams: {debug: {}}}]
  route: [{destination: {host: debug, port: {number: 80}}}]
- match: [{queryParams: {lang: {prefix: en}}}]
  route: [{destination: {host: english, port: {number: 80}}}]
- match: [{queryParams: {page: {regex: "[0-9]+"}}}]
  route: [{destination: {host: page, port: {number: 80}}}]
- match: [{method: {exact: DELETE}}]
  route: [{destination: {host: delete, port: {number: 80}}}]
- match: [{authority: {exact: "app.test:8443"}}]
  route: [{destination: {host: authority, port: {number: 80}}}]
- match: [{scheme: {exact: https}}]
  route: [{destination: {host: https, port: {number: 80}}}]
- match: [{uri: {prefix: /w}, withoutHeaders: {x-skip: {}}}]
  route: [{destination: {host: noskip, port: {number: 80}}}]
- match: [{uri: {prefix: /v}, withoutHeaders: {x-env: {exact: prod}}}]
  route: [{destination: {host: notprod, port: {number: 80}}}]
- match: [{uri: {prefix: /both}, headers: {a: {exact: "1"}, b: {exact: "2"}}}, {uri: {prefix: /or}}]
  route: [{destination: {host: both, port: {number: 80}}}]
- route: [{destination: {host: fallback, port: {number: 80}}}]
"""


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"path": "/exact"}, "exact"),
        ({"path": "/exact?x=1"}, "exact"),  # exact ignores the query
        ({"path": "/exact/more"}, "fallback"),
        ({"path": "/r/42"}, "regex"),
        ({"path": "/r/42/x"}, "fallback"),  # regexes must match the whole path
        ({"path": "/cip/x"}, "ci"),
        ({"path": "/CIEXACT"}, "ciexact"),
        ({"path": "/re"}, "fallback"),  # ignoreUriCase does not apply to regex
        ({"path": "/Re"}, "reci"),
        ({"path": "/q?x=1"}, "queryprefix"),  # prefix sees the query string
        ({"headers": {"x-user": "alice"}}, "alice"),
        ({"headers": {"x-user": "Alice"}}, "fallback"),
        ({"headers": {"x-tier": "gold-plus"}}, "gold"),
        ({"headers": {"x-id": "123"}}, "id"),
        ({"headers": {"x-id": "1234"}}, "fallback"),
        ({"headers": {"x-beta": ""}}, "beta"),  # presence, even empty
        ({"query": {"v": "2"}}, "v2"),
        ({"query": {"debug": ""}}, "debug"),
        ({"query": {"lang": "en-GB"}}, "english"),
        ({"query": {"page": "12"}}, "page"),
        ({"query": {"page": "1a"}}, "fallback"),
        ({"method": "DELETE"}, "delete"),
        ({"authority": "app.test:8443"}, "authority"),
        ({"path": "/w"}, "noskip"),
        ({"path": "/w", "headers": {"x-skip": "1"}}, "fallback"),
        ({"path": "/v"}, "notprod"),  # a missing header counts as empty
        ({"path": "/v", "headers": {"x-env": "dev"}}, "notprod"),
        ({"path": "/v", "headers": {"x-env": "prod"}}, "fallback"),
        ({"path": "/both", "headers": {"a": "1", "b": "2"}}, "both"),
        ({"path": "/both", "headers": {"a": "1"}}, "fallback"),
        ({"path": "/or"}, "both"),  # match entries are ORed
        ({}, "fallback"),  # scheme is always http here
    ],
)
def test_match_conditions(request_: dict[str, object], expected: str) -> None:
    router = Router(load(gateway(), vs(CONDITIONS)), 80)
    assert short(match(router, **request_)) == expected  # type: ignore[arg-type]


def test_needs_headers_and_query_only_when_a_route_tests_them() -> None:
    assert not Router(load(gateway(), vs(to("a"))), 80).needs_headers
    assert not Router(load(gateway(), vs(to("a"))), 80).needs_query
    full = Router(load(gateway(), vs(CONDITIONS)), 80)
    assert full.needs_headers and full.needs_query
    method_only = Router(
        load(
            gateway(),
            vs("- match: [{method: {exact: GET}}]\n  route: [{destination: {host: a}}]\n"),
        ),
        80,
    )
    assert not method_only.needs_headers


# --------------------------------------------------------------------------- actions


def test_weighted_split_uses_rand_and_skips_zero_weights() -> None:
    config = load(
        gateway(),
        vs("""
        - route:
          - {destination: {host: a, port: {number: 80}}, weight: 75}
          - {destination: {host: zero, port: {number: 80}}, weight: 0}
          - {destination: {host: b, port: {number: 80}}, weight: 25}
        """),
    )
    picks = {
        x: short(match(Router(config, 80, rand=always(x)))) for x in (0.0, 0.5, 0.749, 0.75, 0.9999)
    }
    assert picks == {0.0: "a", 0.5: "a", 0.749: "a", 0.75: "b", 0.9999: "b"}
    counts = {"a": 0, "b": 0}
    router = Router(config, 80)
    for _ in range(2000):
        counts[short(match(router)) or ""] += 1
    assert 1300 < counts["a"] < 1700


@pytest.mark.parametrize(
    ("route_match", "rewrite", "path", "upstream"),
    [
        ("{uri: {prefix: /api}}", "{uri: /v2}", "/api/users?x=1", "/v2/users?x=1"),
        ("{uri: {prefix: /API}, ignoreUriCase: true}", "{uri: /v2}", "/api/users", "/v2/users"),
        ("{uri: {exact: /old}}", "{uri: /new}", "/old?q=1", "/new?q=1"),
        ("{uri: {regex: '/r/.*'}}", "{uri: /fixed}", "/r/a/b?z", "/fixed?z"),
        ("{headers: {x: {}}}", "{uri: /v2}", "/foo", "/v2foo"),  # Istio's known surprise
        (
            "{uri: {prefix: /}}",
            "{uriRegexRewrite: {match: '^/old/(.*)$', rewrite: '/new/\\1'}}",
            "/old/a/b?k=v",
            "/new/a/b?k=v",
        ),
    ],
)
def test_rewrite(route_match: str, rewrite: str, path: str, upstream: str) -> None:
    config = load(
        gateway(),
        vs(f"""
        - match: [{route_match}]
          rewrite: {rewrite}
          route: [{{destination: {{host: a, port: {{number: 80}}}}}}]
        """),
    )
    decision = match(Router(config, 80), path=path, headers={"x": "1"})
    assert decision is not None and decision.rewrites_path
    assert decision.path == upstream
    bare, _, query = path.partition("?")
    assert decision.rewrite_target(bare, query) == upstream.encode()


def test_no_rewrite_leaves_the_target_alone() -> None:
    decision = match(Router(load(gateway(), vs(to("a"))), 80), path="/x?y=1")
    assert decision is not None and not decision.rewrites_path
    assert decision.path == "/x?y=1"
    assert decision.rewrite_target("/x", "y=1") == b"/x?y=1"
    assert decision.authority is None


def test_authority_rewrite_sources() -> None:
    config = load(
        gateway(),
        vs("""
        - match: [{uri: {prefix: /rw}}]
          rewrite: {authority: rewritten.test}
          route: [{destination: {host: a, port: {number: 80}}}]
        - match: [{uri: {prefix: /hdr}}]
          headers: {request: {set: {Host: from-header.test}}}
          route: [{destination: {host: a, port: {number: 80}}}]
        - route:
          - destination: {host: a, port: {number: 80}}
            headers: {request: {set: {":authority": from-destination.test}}}
        """),
    )
    router = Router(config, 80)
    assert decide(router, path="/rw").authority == b"rewritten.test"
    assert decide(router, path="/hdr").authority == b"from-header.test"
    assert decide(router, path="/").authority == b"from-destination.test"


def test_header_operations_fold_in_envoys_order() -> None:
    config = load(
        gateway(),
        vs("""
        - match: [{uri: {prefix: /one}}]
          headers:
            request: {set: {x-b: "2", x-a: "1"}, add: {x-dup: route}, remove: [x-secret]}
            response: {set: {cache-control: no-store}, add: {x-r: "1"}, remove: [server]}
          route:
          - destination: {host: a, port: {number: 80}}
            headers: {request: {set: {x-dup: dest}}}
        - headers:
            request: {set: {x-who: route}}
          route:
          - destination: {host: a, port: {number: 80}}
            weight: 100
            headers: {request: {set: {x-who: dest}, add: {x-extra: d}}}
          - destination: {host: b, port: {number: 80}}
            weight: 0
        """),
    )
    router = Router(config, 80)
    one = match(router, path="/one")
    assert one is not None
    # single destination: its operations follow the route's, so its set wipes the route's add
    assert one.request_headers == HeaderEdit(
        set=((b"x-a", b"1"), (b"x-b", b"2"), (b"x-dup", b"dest")),
        remove=frozenset({b"x-secret"}),
    )
    assert one.response_headers == HeaderEdit(
        set=((b"cache-control", b"no-store"),),
        add=((b"x-r", b"1"),),
        remove=frozenset({b"server"}),
    )
    two = match(router, path="/two")
    assert two is not None
    # weighted destinations: the destination's edits first, the route's win
    assert two.request_headers == HeaderEdit(set=((b"x-who", b"route"),), add=((b"x-extra", b"d"),))


def test_redirects() -> None:
    config = load(
        gateway(),
        vs("""
        - match: [{uri: {prefix: /full}}]
          redirect: {uri: /new, authority: new.test, port: 8443, scheme: https, redirectCode: 308}
        - match: [{uri: {prefix: /path}}]
          redirect: {uri: /moved}
        - match: [{uri: {prefix: /host}}]
          redirect: {authority: other.test}
        - match: [{uri: {prefix: /derive}}]
          redirect: {authority: d.test, derivePort: FROM_REQUEST_PORT}
        - match: [{uri: {prefix: /tls}}]
          redirect: {scheme: https}
        - match: [{uri: {prefix: /std}}]
          redirect: {scheme: https, port: 443}
        """),
    )
    router = Router(config, 80)

    def go(path: str, authority: str = "app.test") -> tuple[int, str | None]:
        decision = match(router, authority, path)
        assert decision is not None and decision.cluster is None
        reply = decision.local_reply
        assert reply is not None and reply.body == b""
        headers = dict(reply.headers)
        return reply.status, headers[b"location"].decode()

    assert go("/full?a=1") == (308, "https://new.test:8443/new?a=1")
    assert go("/path?keep=1") == (301, "http://app.test/moved?keep=1")
    assert go("/path", "app.test:8080") == (301, "http://app.test:8080/moved")
    assert go("/host/x") == (301, "http://other.test/host/x")
    assert go("/derive") == (301, "http://d.test/derive")  # port 80 is http's default: omitted
    assert go("/tls", "app.test:80") == (301, "https://app.test/tls")  # :80 dropped for https
    # Istio drops an explicit 443 for https, and Envoy then keeps the request's own port
    assert go("/std", "app.test:8080") == (301, "https://app.test:8080/std")


def test_direct_response_with_response_headers() -> None:
    config = load(
        gateway(),
        vs("""
        - directResponse: {status: 503, body: {string: maintenance}}
          headers: {response: {set: {retry-after: "120"}}}
        """),
    )
    decision = match(Router(config, 80))
    assert decision is not None and decision.cluster is None
    assert decision.local_reply == LocalReply(503, b"maintenance", ((b"retry-after", b"120"),))


def test_https_redirect_server_redirects_every_request() -> None:
    config = load(
        gateway(extra="\n    tls: {httpsRedirect: true}"),
        vs(to("a")),
    )
    decision = match(Router(config, 80), "app.test:80", "/x?y")
    assert decision is not None and decision.cluster is None
    reply = decision.local_reply
    assert reply is not None
    assert (reply.status, dict(reply.headers)[b"location"]) == (301, b"https://app.test:80/x?y")
    # a host with no VirtualService on that server still redirects
    assert decide(Router(config, 80), "other.test").location == ("https://other.test/")


def test_cluster_port_hash_policies_timeout_and_retries() -> None:
    config = load(
        gateway(),
        vs("""
           - timeout: 2s
             retries: {attempts: 5, retryOn: 5xx}
             route: [{destination: {host: svc}}]
           """),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: dr}
        spec:
          host: svc
          trafficPolicy:
            loadBalancer: {consistentHash: {httpCookie: {name: SID, ttl: 30s}}}
        """,
    )
    decision = match(Router(config, 80))
    assert decision is not None
    # no port on the destination and no ServiceEntry: the listener port (Istio)
    assert decision.cluster == "outbound|80||svc.default.svc.cluster.local"
    assert decision.cluster in config.clusters
    assert decision.hash_policies == (CookiePolicy("SID", ttl=30),)
    assert decision.action.affinity is not None and decision.action.affinity.generates_cookie
    assert decision.timeout == 2.0
    assert decision.retries == RetryPolicy(
        attempts=5,
        retry_on=("5xx",),
        retriable_status_codes=(),
        retry_previous_hosts=False,
        explicit=True,
    )
    assert (decision.virtual_service, decision.vhost) == ("default/vs", "app.test")


def test_affinity_objects_are_shared_between_routes_with_the_same_policies() -> None:
    config = load(
        gateway(),
        vs("""
           - match: [{uri: {prefix: /a}}]
             route: [{destination: {host: svc, port: {number: 80}}}]
           - route: [{destination: {host: svc, port: {number: 80}}}]
           """),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: dr}
        spec:
          host: svc
          trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}
        """,
    )
    router = Router(config, 80)
    a, b = match(router, path="/a"), match(router, path="/b")
    assert a is not None and b is not None
    assert a.hash_policies == (HeaderPolicy("x-user"),)
    assert a.action.affinity is b.action.affinity


def test_weighted_routes_carry_every_destinations_hash_policy() -> None:
    config = load(
        gateway(),
        vs("""
           - route:
             - {destination: {host: svc, subset: v1, port: {number: 80}}, weight: 50}
             - {destination: {host: svc, subset: v2, port: {number: 80}}, weight: 50}
             - {destination: {host: svc, subset: v3, port: {number: 80}}, weight: 0}
           """),
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: dr}
        spec:
          host: svc
          trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: SID, ttl: 10s}}}}
          subsets:
          - {name: v1, labels: {v: "1"}}
          - name: v2
            labels: {v: "2"}
            trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
          - {name: v3, labels: {v: "3"}}
        """,
    )
    both = (CookiePolicy("SID", ttl=10), HeaderPolicy("x-user"))
    for x in (0.1, 0.9):
        decision = match(Router(config, 80, rand=always(x)))
        assert decision is not None
        assert decision.hash_policies == both  # Envoy folds both keys, whichever subset
    assert short(match(Router(config, 80, rand=lambda: 0.1))) == "svc"


@pytest.mark.timeout(10)
def test_regexes_take_linear_time_whatever_the_pattern() -> None:
    # RE2, as Envoy: with a backtracking engine this pattern and a 40-byte path take minutes.
    router = Router(
        load(
            gateway(),
            vs("""
               - match: [{uri: {regex: "/(a+)+$"}}]
                 route: [{destination: {host: evil, port: {number: 80}}}]
               - match: [{headers: {x-id: {regex: "(x|x)*y"}}}]
                 route: [{destination: {host: evil, port: {number: 80}}}]
               - route: [{destination: {host: fine, port: {number: 80}}}]
            """),
        ),
        80,
    )
    hostile = "/" + "a" * 40 + "!"
    decision = match(router, path=hostile, headers={"x-id": "x" * 40_000})
    assert decision is not None and decision.cluster is not None
    assert decision.cluster.endswith("|fine.default.svc.cluster.local")
