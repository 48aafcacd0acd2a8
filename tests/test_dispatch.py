"""proxy.dispatch: route, hash, pick per request, behind the data plane on real sockets.

The end-to-end files drive the whole Proxy; these tests drive one ``Dispatcher`` over a
``RuntimeRef`` they control, served by ``proxy.http1.serve`` on port 0 with demo pods behind it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import MappingProxyType

import pytest
from conftest import RawClient, with_endpoints
from proxy_process import gateway_yaml, sample_sum, service_yaml

from proxy.config import Config
from proxy.demo import PodSet
from proxy.dispatch import ROUTE_CACHE_SIZE, Dispatcher
from proxy.exchange import Exchange, Forward
from proxy.istio import load_text
from proxy.metrics import Metrics
from proxy.runtime import Runtime, RuntimeRef, build_runtime

pytestmark = pytest.mark.timeout(30)


def app_routes(http: str) -> str:
    """The VirtualService of app.test on Gateway gw, with these ``http`` routes."""
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: [app.test]
  gateways: [gw]
  http: {http}
"""


def canary_config(pods: PodSet) -> Config:
    """app.test goes to pod-2 with ``x-canary: yes``, to pod-1 otherwise."""
    routes = app_routes("""
  - match: [{headers: {x-canary: {exact: "yes"}}}]
    route: [{destination: {host: canary.local}}]
  - route: [{destination: {host: stable.local}}]""")
    stable, canary = (
        service_yaml("stable", pods.addresses[0]),
        service_yaml("canary", pods.addresses[1]),
    )
    return load_text("---".join([gateway_yaml(), routes, stable, canary]), "canary.yaml")


def simple_config(pods: PodSet) -> Config:
    """app.test goes to pod-1, whatever the request carries."""
    routes = app_routes("[{route: [{destination: {host: stable.local}}]}]")
    stable = service_yaml("stable", pods.addresses[0])
    return load_text("---".join([gateway_yaml(), routes, stable]), "simple.yaml")


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(2) as podset:
        yield podset


async def ask(client: RawClient, *lines: str) -> tuple[int, str]:
    """One request on an open connection: (status, the pod that answered or the body)."""
    head = "".join(f"{line}\r\n" for line in ("GET /same HTTP/1.1", "Host: app.test", *lines))
    await client.send(head.encode() + b"\r\n")
    response = await client.read_response()
    if response.status != 200:
        return response.status, response.body.decode()
    return 200, str(json.loads(response.body)["pod"])


async def test_a_header_condition_routes_every_request_of_a_keep_alive_connection(
    pods: PodSet,
    proxy: Callable[..., Awaitable[int]],
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    # Same Host, method and target on one connection: only the header differs, so neither the
    # route cache nor the connection's memo may answer for the next request.
    ref = RuntimeRef(with_endpoints(build_runtime(canary_config(pods))))
    client = await raw_client(await proxy(Dispatcher(ref, 80)))
    answers = [
        await ask(client, *(["x-canary: yes"] if canary else []))
        for canary in (False, True, True, False, True, False, False)
    ]
    pod = {False: (200, "pod-1"), True: (200, "pod-2")}
    assert answers == [pod[c] for c in (False, True, True, False, True, False, False)]


async def test_a_route_whose_cluster_is_missing_answers_503_and_counts_nc(
    pods: PodSet,
    proxy: Callable[..., Awaitable[int]],
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    runtime = with_endpoints(build_runtime(canary_config(pods)))
    metrics = Metrics()
    ref = RuntimeRef(runtime)
    client = await raw_client(await proxy(Dispatcher(ref, 80, metrics)))
    assert await ask(client) == (200, "pod-1")
    # A runtime whose routes name clusters it does not have (Envoy: NC, no cluster found).
    ref.current = Runtime(runtime.config, runtime.routers, MappingProxyType({}))
    assert await ask(client) == (503, "no healthy upstream")
    metrics.flush()
    text = metrics.exposition().decode()
    assert sample_sum(text, "istio_requests_total", response_code="503", response_flags="NC") == 1
    assert sample_sum(text, "istio_requests_total", response_code="200") == 1


@pytest.mark.parametrize(
    ("build", "cached"),
    [(simple_config, ROUTE_CACHE_SIZE), (canary_config, 0)],
    ids=["host-only-routes", "header-condition"],
)
def test_the_route_cache_stays_bounded_under_a_scan_of_targets(
    pods: PodSet, build: Callable[[PodSet], Config], cached: int
) -> None:
    # Every distinct target is a new cache key: a client walking through paths must not grow
    # the cache without bound, and routing must stay right when it starts over. A config with
    # a header condition is not cached at all (its routes depend on more than the key).
    runtime = with_endpoints(build_runtime(build(pods)))
    stable = runtime.clusters["outbound|80||stable.local"].cluster
    dispatcher = Dispatcher(RuntimeRef(runtime), 80)
    largest = 0
    for i in range(ROUTE_CACHE_SIZE + 10):
        ex = Exchange(("127.0.0.1", 40000), ("127.0.0.1", 80), 0.0)
        ex.method, ex.target, ex.authority = b"GET", f"/p/{i}".encode(), b"app.test"
        forward = dispatcher.dispatch(ex)
        assert isinstance(forward, Forward)
        assert forward.pool is stable.snapshot.pools[f"127.0.0.1:{pods.addresses[0][1]}"]
        largest = max(largest, len(dispatcher._cache))
    assert largest == cached
