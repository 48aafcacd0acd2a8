"""Routing as Istio documents it, on Istio's own sample YAML, through real requests where it counts.

The bookinfo files come unchanged from ``tests/istio_corpus/istio-samples`` (istio/istio's
``samples/``); the test adds what a cluster would have: endpoints for the services (a STATIC
ServiceEntry whose endpoints carry the ``version`` labels the subsets select, on demo pods), and,
for the ``reviews`` VirtualService that Istio applies to the mesh (the productpage's sidecar calls
``reviews``), the gateway it is reached through here. Istio's documentation of each behaviour:
https://istio.io/latest/docs/reference/config/networking/virtual-service/ and the bookinfo tasks
(request routing, traffic shifting).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import running

from proxy.config import Config
from proxy.demo import PodSet
from proxy.explain import Probe, explain
from proxy.istio import load_text
from proxy.routing import Router

pytestmark = pytest.mark.timeout(60)

NETWORKING = Path(__file__).parent / "istio_corpus" / "istio-samples" / "bookinfo" / "networking"
REVIEWS = "reviews.default.svc.cluster.local"


def sample(name: str) -> list[dict[str, Any]]:
    """The documents of a bookinfo networking file, as written."""
    return [d for d in yaml.safe_load_all((NETWORKING / name).read_text()) if d]


def through_gateway(docs: list[dict[str, Any]], gateway: str = "bookinfo-gateway") -> str:
    """A mesh VirtualService bound to the gateway too: the gateway stands in for the sidecar."""
    for doc in docs:
        if doc["kind"] == "VirtualService":
            doc["spec"]["gateways"] = [gateway]
    return yaml.safe_dump_all(docs)


def service(name: str, pods: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """A STATIC ServiceEntry for bookinfo's service ``name`` (port 9080): pod i is version
    v(i+1), as the Deployments of bookinfo.yaml label them. No DNS lookups in tests."""
    endpoints = [
        {"address": host, "ports": {"http": port}, "labels": {"app": name, "version": f"v{i + 1}"}}
        for i, (host, port) in enumerate(pods)
    ]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name},
        "spec": {
            "hosts": [f"{name}.default.svc.cluster.local"],
            "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
            "resolution": "STATIC",
            "endpoints": endpoints,
        },
    }


def reviews_pods(pods: Sequence[tuple[str, int]]) -> str:
    """reviews on the pods, productpage on the first one."""
    return yaml.safe_dump_all([service("reviews", pods), service("productpage", pods[:1])])


def bookinfo(vs_file: str, pods: Sequence[tuple[str, int]]) -> Config:
    parts = [
        (NETWORKING / "bookinfo-gateway.yaml").read_text(),
        (NETWORKING / "destination-rule-all.yaml").read_text(),
        through_gateway(sample(vs_file)),
        reviews_pods(pods),
    ]
    return load_text("\n---\n".join(parts), "bookinfo")


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(3, names=["reviews-v1", "reviews-v2", "reviews-v3"]) as podset:
        yield podset


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


async def get(
    session: aiohttp.ClientSession, url: str, host: str, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    sent = {"Host": host, **(headers or {})}
    async with session.get(url, headers=sent, allow_redirects=False) as r:
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, body, r


# --------------------------------------------------------------------------- bookinfo


async def test_jason_gets_reviews_v2_everyone_else_v3(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    """Istio's "request routing" task: the end-user header (name case-insensitive, value
    case-sensitive, ``exact``) sends jason to v2; everyone else reaches v3."""
    async with running(bookinfo("virtual-service-reviews-jason-v2-v3.yaml", pods.addresses)) as url:
        asked = {
            "jason": {"end-user": "jason"},
            "JASON's header name in capitals": {"End-User": "jason"},
            "Jason": {"end-user": "Jason"},
            "nobody": {},
            "jasonx": {"end-user": "jasonx"},
        }
        answers = {}
        for who, headers in asked.items():
            status, body, _ = await get(session, url + "/reviews/0", REVIEWS, headers)
            assert status == 200, who
            answers[who] = body["pod"]
    assert answers == {
        "jason": "reviews-v2",
        "JASON's header name in capitals": "reviews-v2",
        "Jason": "reviews-v3",
        "nobody": "reviews-v3",
        "jasonx": "reviews-v3",
    }


async def test_host_header_port_and_case_do_not_matter(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    """Envoy compares domains case-insensitively; Istio's gateways ignore the Host's port."""
    async with running(bookinfo("virtual-service-reviews-v3.yaml", pods.addresses)) as url:
        for host in (REVIEWS, REVIEWS.upper(), f"{REVIEWS}:8080", f"{REVIEWS.upper()}:12345"):
            status, body, _ = await get(session, url + "/reviews/0", host)
            assert (status, body["pod"]) == (200, "reviews-v3"), host


async def test_rewrite_keeps_the_query_and_redirect_answers_itself(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    """HTTPRewrite replaces the matched prefix and keeps the query string; HTTPRedirect is
    answered by the gateway (301 by default) with the new path and the request's host."""
    docs = sample("virtual-service-reviews-v3.yaml")
    docs[0]["spec"]["http"] = [
        {"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new"}},
        {
            "match": [{"uri": {"prefix": "/v1/"}}],
            "rewrite": {"uri": "/api/"},
            "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
        },
    ]
    parts = [
        (NETWORKING / "bookinfo-gateway.yaml").read_text(),
        (NETWORKING / "destination-rule-all.yaml").read_text(),
        through_gateway(docs),
        reviews_pods(pods.addresses),
    ]
    async with running(load_text("\n---\n".join(parts), "bookinfo")) as url:
        status, body, _ = await get(session, url + "/v1/reviews?product=0&x=y", REVIEWS)
        assert (status, body["pod"], body["path"]) == (200, "reviews-v1", "/api/reviews")
        assert body["query"] == "product=0&x=y"
        status, _, response = await get(session, url + "/old/page?q=1", REVIEWS)
        assert status == 301
        # Istio's redirect.uri replaces the whole path; Envoy keeps the query (strip_query off).
        assert response.headers["Location"] == f"http://{REVIEWS}/new?q=1"


def test_reviews_80_20_shifts_about_80_percent_to_v1() -> None:
    """Istio's "traffic shifting" task: ``virtual-service-reviews-80-20.yaml``. Each request
    draws anew (seeded here: the same 2000 draws every run)."""
    config = bookinfo("virtual-service-reviews-80-20.yaml", [("127.0.0.1", 1)] * 3)
    router = Router(config, 8080, rand=random.Random(15).random)
    seen = Counter(
        router.match(REVIEWS, "/reviews/0", "GET", {}, {}).cluster  # type: ignore[union-attr]
        for _ in range(2000)
    )
    assert set(seen) == {f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|v2|{REVIEWS}"}
    assert 1500 <= seen[f"outbound|9080|v1|{REVIEWS}"] <= 1700  # 1600 expected, 4.5 sigma


def test_the_bookinfo_gateway_routes_only_the_listed_paths() -> None:
    """``bookinfo-gateway.yaml``: exact /productpage, /login, /logout; prefix /static and
    /api/v1/products; anything else on host ``*`` is a 404."""
    config = bookinfo("virtual-service-reviews-v3.yaml", [("127.0.0.1", 1)])
    router = Router(config, 8080)
    product = "outbound|9080||productpage.default.svc.cluster.local"
    expected = {
        "/productpage": product,
        "/productpage?u=normal": product,  # exact looks at the path without the query
        "/productpage/": None,
        "/static/x.css": product,
        "/staticfiles": product,  # prefix is a string prefix, not a path segment
        "/login": product,
        "/logout": product,
        "/api/v1/products/0/reviews": product,
        "/": None,
    }
    for path, cluster in expected.items():
        ex = explain(config, router, Probe("bookinfo.example", path))
        assert (ex.decision.cluster if ex.decision else None) == cluster, path


# --------------------------------------------------------------------------- matching rules


def gateway(name: str = "gw", namespace: str = "default", hosts: str = '["*"]') -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n"
        f"    hosts: {hosts}\n"
    )


def virtual_service(
    name: str, http: str, hosts: str = "[app.test]", gateways: str = "[gw]", ns: str = "default"
) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec:\n  hosts: {hosts}\n  gateways: {gateways}\n  http:\n{http}"
    )


def to(host: str) -> str:
    """The ``route`` of an ``http[]`` entry that has a ``match`` (its first line)."""
    return f"    route: [{{destination: {{host: {host}, port: {{number: 80}}}}}}]\n"


def only(host: str) -> str:
    """An ``http[]`` entry without ``match``: it matches everything."""
    return "  - " + to(host).lstrip()


def cluster_of(config: Config, host: str, path: str) -> str | None:
    ex = explain(config, Router(config, 80), Probe(host, path))
    if ex.decision is None:
        return None
    cluster = ex.decision.cluster
    return cluster.split("|")[3] if cluster else None


def test_exact_prefix_and_regex_match_as_istio_documents() -> None:
    """``exact`` and ``regex`` look at the path without the query; a regex must match the WHOLE
    path (RE2 full match); ``prefix`` is a plain string prefix."""
    http = (
        "  - match: [{uri: {exact: /a}}]\n"
        + to("exact.local")
        + "  - match: [{uri: {regex: '/r[0-9]+'}}]\n"
        + to("regex.local")
        + "  - match: [{uri: {prefix: /p}}]\n"
        + to("prefix.local")
    )
    config = load_text(gateway() + "---\n" + virtual_service("vs", http), "m")
    expected = {
        "/a": "exact.local",
        "/a?x=1": "exact.local",
        "/a/": None,
        "/ab": None,
        "/r12": "regex.local",
        "/r12?x=1": "regex.local",
        "/r12x": None,  # not a whole match
        "/xr12": None,
        "/p": "prefix.local",
        "/pqr/s": "prefix.local",
        "/A": None,  # case-sensitive unless ignoreUriCase
    }
    assert {path: cluster_of(config, "app.test", path) for path in expected} == expected


def test_two_virtual_services_for_one_host_are_merged_in_creation_order() -> None:
    """On a gateway Istio merges the VirtualServices of one host (gateway.go: routes appended
    in creation order, the file order here), and ``SortVHostRoutes`` moves catch-all routes
    last, so the first one's catch-all does not hide the second one's routes."""
    first = virtual_service(
        "first", "  - match: [{uri: {prefix: /a}}]\n" + to("a.local") + only("all.local")
    )
    second = virtual_service(
        "second",
        "  - match: [{uri: {prefix: /a}}]\n"
        + to("second-a.local")
        + "  - match: [{uri: {prefix: /b}}]\n"
        + to("b.local"),
    )
    config = load_text("---\n".join((gateway(), first, second)), "two")
    assert cluster_of(config, "app.test", "/a/x") == "a.local"  # the first created wins
    assert cluster_of(config, "app.test", "/b/x") == "b.local"
    assert cluster_of(config, "app.test", "/c") == "all.local"


def test_a_gateway_in_istio_system_serves_a_virtual_service_of_another_namespace() -> None:
    """The docs' layout: the Gateway in istio-system, the VirtualService in bookinfo naming it
    ``istio-system/NAME``. A server host ``bookinfo/*`` admits only VirtualServices of
    namespace bookinfo (``ns/host`` of ``Server.hosts``)."""
    vs_bookinfo = virtual_service(
        "reviews", only("reviews"), gateways="[istio-system/gw]", ns="bookinfo"
    )
    vs_other = virtual_service(
        "other",
        only("other.local"),
        hosts="[other.test]",
        gateways="[istio-system/gw]",
        ns="shop",
    )
    for hosts, other in (('["*"]', "other.local"), ('["bookinfo/*"]', None)):
        config = load_text(
            "---\n".join((gateway(namespace="istio-system", hosts=hosts), vs_bookinfo, vs_other)),
            "ns",
        )
        # The destination host "reviews" is short for reviews.bookinfo.svc.cluster.local.
        assert cluster_of(config, "app.test", "/") == "reviews.bookinfo.svc.cluster.local"
        assert cluster_of(config, "other.test", "/") == other, hosts
