"""Delegate VirtualServices: a root route's ``delegate`` merged with the delegate's routes."""
# ruff: noqa: E501

from __future__ import annotations

import textwrap

import aiohttp
import pytest
from proxy_process import service_yaml

from proxy.config import (
    Config,
    ConfigError,
    HeaderOperations,
    Headers,
    HttpMatch,
    Rewrite,
    StringMatch,
)
from proxy.demo import PodSet
from proxy.explain import Probe, explain
from proxy.istio import load_text
from proxy.istio_delegate import merge_matches
from proxy.routing import Router
from proxy.server import Proxy, RunOptions


def load(*docs: str, namespace: str = "istio-system") -> Config:
    text = "---\n".join(textwrap.dedent(d) for d in docs)
    return load_text(text, "t.yaml", namespace=namespace)


def host_of(config: Config, host: str, path: str = "/", **probe: object) -> str | None:
    """The destination host a request is routed to; None for no route (404)."""
    ex = explain(config, Router(config, 80), Probe(host, path, **probe))  # type: ignore[arg-type]
    if ex.decision is None:
        return None
    return ex.cluster.spec.host if ex.cluster is not None else "local reply"


GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: mygateway}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
"""

# The example of istio/api networking/v1alpha3/virtual_service.proto (message Delegate), with
# lowercase namespaces (nsA is not a valid namespace name) and destination ports.
ROOT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
  - "bookinfo.com"
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        prefix: "/productpage"
    delegate:
       name: productpage
       namespace: nsa
  - match:
    - uri:
        prefix: "/reviews"
    delegate:
        name: reviews
        namespace: nsb
"""
PRODUCTPAGE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: productpage
  namespace: nsa
spec:
  http:
  - match:
     - uri:
        prefix: "/productpage/v1/"
    route:
    - destination:
        host: productpage-v1.nsa.svc.cluster.local
        port: {number: 9080}
  - route:
    - destination:
        host: productpage.nsa.svc.cluster.local
        port: {number: 9080}
"""
REVIEWS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: nsb
spec:
  http:
  - route:
    - destination:
        host: reviews.nsb.svc.cluster.local
        port: {number: 9080}
"""


def test_the_delegate_example_of_istios_api() -> None:
    config = load(GATEWAY, ROOT, PRODUCTPAGE, REVIEWS)
    assert config.warnings == ()
    (vs,) = config.virtual_services  # the delegates are not VirtualServices of their own
    assert vs.key == "default/bookinfo"
    assert [(r.index, r.matches[0].uri) for r in vs.http] == [
        (0, StringMatch("prefix", "/productpage/v1/")),
        (1, StringMatch("prefix", "/productpage")),
        (2, StringMatch("prefix", "/reviews")),
    ]
    assert (
        host_of(config, "bookinfo.com", "/productpage/v1/x")
        == "productpage-v1.nsa.svc.cluster.local"
    )
    assert host_of(config, "bookinfo.com", "/productpage") == "productpage.nsa.svc.cluster.local"
    assert host_of(config, "bookinfo.com", "/reviews/1") == "reviews.nsb.svc.cluster.local"
    assert host_of(config, "bookinfo.com", "/ratings") is None
    assert {c.host for c in config.clusters.values()} == {
        "productpage-v1.nsa.svc.cluster.local",
        "productpage.nsa.svc.cluster.local",
        "reviews.nsb.svc.cluster.local",
    }


def root(http: str, name: str = "root", hosts: str = "[app.test]", extra: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: {hosts}
  gateways: [mygateway]{extra}
  http:
{textwrap.indent(textwrap.dedent(http).strip(), "  ")}
"""


def child(http: str, name: str = "child", namespace: str = "default", extra: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {namespace}}}
spec:{extra}
  http:
{textwrap.indent(textwrap.dedent(http).strip(), "  ")}
"""


def to(host: str) -> str:
    return f"route: [{{destination: {{host: {host}, port: {{number: 80}}}}}}]"


def test_a_delegates_exact_path_under_its_roots_prefix() -> None:
    config = load(
        GATEWAY,
        root("- match: [{uri: {prefix: /productpage}}]\n  delegate: {name: child}"),
        child(
            f"- match: [{{uri: {{exact: /productpage/v1}}}}]\n  {to('v1')}\n"
            f"- match: [{{uri: {{prefix: /reviews}}}}]\n  {to('reviews')}\n"
            f"- {to('rest')}"
        ),
    )
    (vs,) = config.virtual_services
    assert [r.matches for r in vs.http] == [
        (HttpMatch(uri=StringMatch("exact", "/productpage/v1")),),
        (HttpMatch(uri=StringMatch("prefix", "/productpage")),),  # the child's catch-all
    ]
    assert host_of(config, "app.test", "/productpage/v1") == "v1.default.svc.cluster.local"
    assert host_of(config, "app.test", "/productpage/v2") == "rest.default.svc.cluster.local"
    assert host_of(config, "app.test", "/reviews") is None  # outside the root's prefix
    assert config.warnings == (
        "t.yaml[3]: VirtualService child: spec.http[1].match: conflicts with every match of "
        "VirtualService default/root spec.http[0] (a delegate's match must narrow its root's): "
        "not used under that route",
    )


def test_the_root_fills_in_what_the_delegates_route_lacks() -> None:
    config = load(
        GATEWAY,
        root(
            """
            - name: root
              match:
              - {uri: {prefix: /a}, headers: {x-env: {exact: prod}}, name: m}
              - {uri: {prefix: /b}}
              delegate: {name: child}
              rewrite: {uri: /}
              timeout: 3s
              retries: {attempts: 5}
              headers: {request: {set: {x-root: "1"}}}
            """
        ),
        child(
            f"""
            - name: own
              match: [{{uri: {{prefix: /a/x}}, headers: {{x-user: {{exact: bob}}}}, name: leaf}}]
              timeout: 1s
              {to("x")}
            - match: [{{method: {{exact: POST}}}}]
              rewrite: {{uri: /post}}
              retries: {{attempts: 0}}
              headers: {{request: {{set: {{x-child: "1"}}}}}}
              {to("post")}
            """
        ),
    )
    own, post = config.virtual_services[0].http
    assert own.name == "root-own" and post.name == "root"
    assert own.matches == (
        HttpMatch(
            name="m-leaf",
            uri=StringMatch("prefix", "/a/x"),
            headers=(
                ("x-env", StringMatch("exact", "prod")),
                ("x-user", StringMatch("exact", "bob")),
            ),
        ),
    )  # /a/x is not under /b: only the first root match applies
    assert own.timeout == 1.0 and post.timeout == 3.0
    assert own.rewrite == Rewrite(uri="/") and post.rewrite == Rewrite(uri="/post")
    assert own.retries is not None and own.retries.attempts == 5
    assert post.retries is None  # attempts: 0 is the child's own choice
    assert own.headers == Headers(request=HeaderOperations(set=(("x-root", "1"),)))
    assert post.headers == Headers(request=HeaderOperations(set=(("x-child", "1"),)))
    # POST under each root match: /a with the header, and /b.
    assert [(m.uri, m.method, m.headers) for m in post.matches] == [
        (
            StringMatch("prefix", "/a"),
            StringMatch("exact", "POST"),
            (("x-env", StringMatch("exact", "prod")),),
        ),
        (StringMatch("prefix", "/b"), StringMatch("exact", "POST"), ()),
    ]
    assert host_of(config, "app.test", "/b", method="POST") == "post.default.svc.cluster.local"
    assert host_of(config, "app.test", "/b") is None


@pytest.mark.parametrize(
    ("parent", "leaf", "conflict"),
    [
        (StringMatch("prefix", "/a"), StringMatch("prefix", "/a/b"), False),
        (StringMatch("prefix", "/a/b"), StringMatch("prefix", "/a"), True),
        (StringMatch("prefix", "/a"), StringMatch("exact", "/a"), False),
        (StringMatch("exact", "/a"), StringMatch("exact", "/a"), False),
        (StringMatch("exact", "/a"), StringMatch("exact", "/b"), True),
        (StringMatch("exact", "/a"), StringMatch("prefix", "/a"), True),
        (StringMatch("regex", "/a.*"), StringMatch("prefix", "/a"), True),
        (StringMatch("prefix", "/a"), StringMatch("regex", "/a.*"), True),
        (StringMatch("regex", "/a.*"), StringMatch("regex", "/a.*"), True),
        (None, StringMatch("regex", "/a.*"), False),
        (StringMatch("regex", "/a.*"), None, False),
    ],
)
def test_string_match_conflicts_follow_istio(
    parent: StringMatch | None, leaf: StringMatch | None, conflict: bool
) -> None:
    merged = merge_matches((HttpMatch(uri=parent),), (HttpMatch(uri=leaf),))
    assert (merged is None) is conflict
    if merged is not None:
        assert merged == (HttpMatch(uri=leaf or parent),)


def test_other_conflicts_and_empty_sides() -> None:
    a = HttpMatch(port=80, gateways=("default/a", "default/b"), ignore_uri_case=True)
    assert merge_matches((a,), ()) == (a,)
    assert merge_matches((), (a,)) == (a,)
    assert merge_matches((a,), (HttpMatch(port=81, ignore_uri_case=True),)) is None
    assert merge_matches((a,), (HttpMatch(ignore_uri_case=False),)) is None
    assert merge_matches((a,), (HttpMatch(gateways=("default/c",), ignore_uri_case=True),)) is None
    (merged,) = (
        merge_matches((a,), (HttpMatch(gateways=("default/b",), ignore_uri_case=True),)) or ()
    )
    assert (merged.port, merged.gateways) == (80, ("default/b",))
    env = HttpMatch(headers=(("x", StringMatch("exact", "1")),))
    assert merge_matches((env,), (HttpMatch(headers=(("x", StringMatch("exact", "2")),)),)) is None


def test_a_missing_delegate_drops_only_its_route() -> None:
    config = load(
        GATEWAY,
        root(f"- match: [{{uri: {{prefix: /a}}}}]\n  delegate: {{name: chld}}\n- {to('rest')}"),
        child(f"- {to('x')}", name="child-other"),
    )
    # Istio skips the route (virtualservice_controller.go): /a goes on to the next route.
    assert host_of(config, "app.test", "/a") == "rest.default.svc.cluster.local"
    assert config.warnings == (
        "t.yaml[2]: VirtualService root: spec.http[0].delegate: delegate VirtualService default/chld not found (did you mean default/child-other?): this route is not used",
        "t.yaml[3]: VirtualService child-other: spec.hosts: no hosts, so this is a delegate VirtualService, and no route delegates to it: not used",
    )
    alone = load(GATEWAY, root("- match: [{uri: {prefix: /a}}]\n  delegate: {name: child}"))
    assert host_of(alone, "app.test", "/a") is None  # 404
    assert alone.virtual_services[0].http == ()


def test_a_delegate_must_be_a_virtual_service_without_hosts() -> None:
    config = load(
        GATEWAY,
        root("- delegate: {name: other}"),
        root(f"- {to('x')}", name="other", hosts="[other.test]"),
    )
    assert host_of(config, "app.test") is None
    assert config.warnings[0] == (
        "t.yaml[2]: VirtualService root: spec.http[0].delegate: VirtualService default/other has "
        "hosts, so it is not a delegate (a delegate has none): this route is not used"
    )


def test_a_delegate_serves_two_roots_and_its_namespace_defaults_to_the_roots() -> None:
    config = load(
        GATEWAY,
        root(
            "- match: [{uri: {prefix: /one}}]\n  delegate: {name: child}",
            name="one",
            hosts="[one.test]",
        ),
        root(
            "- match: [{uri: {prefix: /two}}]\n  delegate: {name: child, namespace: default}",
            name="two",
            hosts="[two.test]",
        ),
        child(f"- {to('shared')}"),
    )
    assert config.warnings == ()
    assert host_of(config, "one.test", "/one") == "shared.default.svc.cluster.local"
    assert host_of(config, "two.test", "/two") == "shared.default.svc.cluster.local"
    assert host_of(config, "one.test", "/two") is None
    one, two = config.virtual_services
    assert one.http[0].matches[0].uri == StringMatch("prefix", "/one")
    assert two.http[0].matches[0].uri == StringMatch("prefix", "/two")


def test_a_delegate_must_be_exported_to_its_roots_namespace() -> None:
    doc = child(f"- {to('x')}", namespace="team", extra='\n  exportTo: ["."]')
    ref = "- delegate: {name: child, namespace: team}"
    config = load(GATEWAY, root(ref), doc)
    assert host_of(config, "app.test") is None
    assert config.warnings == (
        "t.yaml[2]: VirtualService root: spec.http[0].delegate: delegate VirtualService team/child is not exported to namespace default: this route is not used",
    )
    shown = load(GATEWAY, root(ref), doc.replace('["."]', "[default]"))
    assert host_of(shown, "app.test") == "x.team.svc.cluster.local"  # resolved in its namespace


def test_the_merged_virtual_service_is_exported_as_its_root() -> None:
    # The delegate is exported to the root only, the root to everyone: the gateway sees it.
    ref = "- delegate: {name: child, namespace: team}"
    doc = child(f"- {to('x')}", namespace="team", extra="\n  exportTo: [default]")
    assert host_of(load(GATEWAY, root(ref), doc), "app.test") == "x.team.svc.cluster.local"
    hidden = load(GATEWAY, root(ref, extra='\n  exportTo: ["."]'), child(f"- {to('x')}"))
    assert hidden.virtual_services == ()


def test_warnings_on_a_delegates_route_name_the_delegate() -> None:
    # A subset no DestinationRule defines: Istio accepts it and answers 503.
    config = load(
        GATEWAY,
        root("- delegate: {name: child}"),
        child("- route: [{destination: {host: svc, subset: v9, port: {number: 80}}}]"),
    )
    assert config.warnings == (
        "t.yaml[3]: VirtualService child: spec.http[0].route[0].destination.subset: subset v9 not found: no DestinationRule for host svc.default.svc.cluster.local; requests to this destination get 503 (no such cluster)",
    )


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        (
            [child(f"- {to('x')}", extra="\n  gateways: [mygateway]\n  hosts: []")],
            "t.yaml[2]: VirtualService child: spec.gateways: delegate virtual service must have no gateways specified",
        ),
        (
            [child("- delegate: {name: other}")],
            "t.yaml[2]: VirtualService child: spec.http[0].delegate: delegate HTTP route cannot contain delegate",
        ),
        (
            [root("- delegate: {name: child}\n  redirect: {uri: /x}")],
            "t.yaml[2]: VirtualService root: spec.http[0]: root HTTP route must not specify redirect",
        ),
        (
            [root("- delegate: {name: child, version: 2}")],
            "t.yaml[2]: VirtualService root: spec.http[0].delegate.version: unknown field",
        ),
    ],
)
def test_delegates_are_validated_as_istio_does(docs: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(GATEWAY, *docs)
    assert list(exc.value.errors) == [message]


# --------------------------------------------------------------------------- real requests


@pytest.mark.timeout(60)
async def test_real_requests_follow_the_delegate_and_not_the_hidden_service() -> None:
    async with PodSet(2, names=["pod-v1", "pod-rest"]) as pods:
        config = load(
            GATEWAY.replace("{name: mygateway}", "{name: mygateway, namespace: istio-system}"),
            root(
                "- match: [{uri: {prefix: /app}}]\n  delegate: {name: child, namespace: team}",
                hosts="[app.test]",
            ).replace("[mygateway]", "[istio-system/mygateway]"),
            child(
                "- match: [{uri: {prefix: /app/v1}}]\n  route: [{destination: {host: v1.local}}]\n"
                "- route: [{destination: {host: rest.local}}]",
                namespace="team",
            ),
            root(
                f"- {to('rest.local')}",
                name="hidden",
                hosts="[hidden.test]",
                extra='\n  exportTo: ["."]',
            ).replace("[mygateway]", "[istio-system/mygateway]"),
            service_yaml("v1", pods.addresses[0]),
            service_yaml("rest", pods.addresses[1]),
        )
        proxy = Proxy(config, RunOptions(listen=(("127.0.0.1", 0),), collect_metrics=False))
        await proxy.start()
        try:
            host, port = proxy.addresses[0]
            async with aiohttp.ClientSession() as session:

                async def get(host_header: str, path: str) -> tuple[int, str | None]:
                    url = f"http://{host}:{port}{path}"
                    async with session.get(url, headers={"Host": host_header}) as resp:
                        body = await resp.json() if resp.status == 200 else None
                        return resp.status, body["pod"] if body else None

                assert await get("app.test", "/app/v1/x") == (200, "pod-v1")
                assert await get("app.test", "/app/other") == (200, "pod-rest")
                assert await get("app.test", "/elsewhere") == (404, None)
                assert await get("hidden.test", "/") == (404, None)
        finally:
            await proxy.stop(grace=5)
