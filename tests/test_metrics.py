"""Metrics: exact counts after a known set of requests, scraped from the real endpoint."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import AsyncIterator

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from proxy_process import article_yaml, sample_sum

from proxy.demo import PodSet
from proxy.dispatch import Dispatcher
from proxy.exchange import Exchange
from proxy.istio import load_text
from proxy.metrics import _BYTES_BOUNDS, _DURATION_BOUNDS, Metrics, _bucket, service_labels
from proxy.server import Proxy, RunOptions

pytestmark = pytest.mark.timeout(60)

CLUSTER = "outbound|8080||test2-bwce-srv.default.svc.cluster.local"


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(3) as podset:
        yield podset


@pytest.fixture
async def proxy(pods: PodSet) -> AsyncIterator[Proxy]:
    options = RunOptions(listen=(("127.0.0.1", 0),), metrics=("127.0.0.1", 0))
    running = Proxy(load_text(article_yaml(pods.addresses)), options)
    await running.start()
    yield running
    await running.stop(grace=2)


async def test_scrape_after_known_requests_counts_exactly(pods: PodSet, proxy: Proxy) -> None:
    url = "http://{}:{}".format(*proxy.addresses[0])
    scrape_url = "http://{}:{}/stats/prometheus".format(*proxy.ports["metrics"])
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        cookies = []
        for _ in range(7):  # first visits: no cookie, one issued each
            async with session.get(url, headers={"Host": "test.com"}) as resp:
                assert resp.status == 200
                cookies.append(resp.headers["Set-Cookie"].split(";")[0])
        for i in range(13):  # returning visits: the cookie is sent back, none issued
            headers = {"Host": "test.com", "Cookie": cookies[i % 7]}
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200 and "Set-Cookie" not in resp.headers
        for _ in range(4):  # no route
            async with session.get(url, headers={"Host": "nowhere.com"}) as resp:
                assert resp.status == 404
        for code in (500, 503):  # upstream answers
            path = f"/status/{code}"
            async with session.get(url + path, headers={"Host": "test.com", "Cookie": "x=1"}) as r:
                assert r.status == code
        body = b"x" * 5000
        async with session.post(url + "/upload", data=body, headers={"Host": "test.com"}) as r:
            assert r.status == 200
        async with session.get(scrape_url) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()

    def total(name: str, **labels: str) -> float:
        return sample_sum(text, name, **labels)

    assert total("istio_requests_total", response_code="200", destination_cluster=CLUSTER) == 21
    assert total("istio_requests_total", response_code="404", response_flags="NR") == 4
    assert total("istio_requests_total", response_code="404", destination_service="unknown") == 4
    assert total("istio_requests_total", response_code="500") == 1
    assert total("istio_requests_total", response_code="503") == 1
    assert total("istio_requests_total") == 27
    # Cookies issued equals first visits (7 GETs, the POST, the two /status without ISTIOID).
    assert total("sticky_cookies_issued_total", cluster_name=CLUSTER) == 7 + 1 + 2
    labels = {
        "destination_service": "test2-bwce-srv.default.svc.cluster.local",
        "destination_service_name": "test2-bwce-srv",
        "destination_service_namespace": "default",
        "destination_port": "8080",
        "reporter": "source",
        "request_protocol": "http",
        "response_code": "200",
    }
    assert total("istio_requests_total", **labels) == 21
    assert total("istio_request_duration_milliseconds_count", **labels) == 21
    assert total("istio_request_bytes_count", **labels) == 21
    assert total("istio_request_bytes_sum", **labels) == 5000
    assert total("istio_request_bytes_bucket", le="1000.0", **labels) == 20
    assert total("istio_response_bytes_sum", **labels) > 0
    assert total("envoy_cluster_upstream_rq_xx_total", response_code_class="2xx") == 21
    assert total("envoy_cluster_upstream_rq_xx_total", response_code_class="5xx") == 2
    assert total("envoy_cluster_membership_healthy", cluster_name=CLUSTER) == 3
    assert total("envoy_cluster_membership_total", cluster_name=CLUSTER) == 3
    assert total("envoy_cluster_upstream_rq_active", cluster_name=CLUSTER) == 0
    assert total("sticky_balancer_rebuilds_total", cluster_name=CLUSTER) == 1
    # Istio's default retries (no `retries` in the VirtualService) sent the idempotent GET of
    # /status/503 twice more; nothing else was sent again.
    assert total("sticky_requests_replayed_total", cluster_name=CLUSTER) == 2
    assert total("sticky_worker_downstream_cx_total", worker="0") >= 1
    # Never a session key among the label values.
    assert not any(c.split("=", 1)[1].strip('"') in text for c in cookies)


async def test_a_dead_pod_counts_retries_and_rehomed_sessions(pods: PodSet, proxy: Proxy) -> None:
    url = "http://{}:{}".format(*proxy.addresses[0])
    await pods.stop(0)
    async with aiohttp.ClientSession() as session:
        for i in range(30):
            headers = {"Host": "test.com", "Cookie": f"ISTIOID=s{i}"}
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200
    text = proxy.exposition().decode()
    rehomed = sample_sum(text, "sticky_sessions_rehomed_total", reason="connect_failure")
    retries = sample_sum(text, "envoy_cluster_upstream_rq_retry_total", cluster_name=CLUSTER)
    assert 0 < rehomed <= retries
    assert sample_sum(text, "istio_requests_total", response_code="200") == 30


def exchange(status: int, flags: str = "-", upstream: str | None = None) -> Exchange:
    ex = Exchange(("127.0.0.1", 5000), ("127.0.0.1", 80), 1.0)
    ex.status, ex.flags, ex.upstream, ex.end = status, flags, upstream, 1.25
    return ex


async def test_finished_tolerates_exchanges_that_were_never_dispatched() -> None:
    proxy = Proxy(load_text(article_yaml([("127.0.0.1", 9)])), RunOptions())
    dispatcher = Dispatcher(proxy.ref, 80, proxy.metrics, proxy.access_log)
    for ex in (exchange(400, "DPE"), exchange(431, "DPE"), exchange(0, "DC"), exchange(408)):
        dispatcher.finished(ex)
    assert proxy.metrics is not None
    text = proxy.exposition().decode()
    assert sample_sum(text, "istio_requests_total", destination_service="unknown") == 4
    assert sample_sum(text, "istio_requests_total", response_code="0", response_flags="DC") == 1
    assert sample_sum(text, "istio_request_duration_milliseconds_sum") == 4 * 250
    assert sample_sum(text, "envoy_cluster_upstream_rq_xx_total") == 0


def test_service_labels_split_kubernetes_names() -> None:
    config = load_text(article_yaml([("127.0.0.1", 9)]))
    spec = config.clusters[CLUSTER]
    assert service_labels(spec) == (
        "test2-bwce-srv.default.svc.cluster.local",
        "test2-bwce-srv",
        "default",
        "unknown",
        "8080",
        CLUSTER,
    )
    assert service_labels(None)[0] == "unknown"


def test_workers_other_than_0_do_not_count_control_plane_events() -> None:
    quiet = Metrics(control=False)
    quiet.reload(True)
    assert sample_sum(quiet.exposition().decode(), "sticky_config_reloads_total") == 0
    loud = Metrics()
    loud.reload(True)
    loud.reload(False)
    text = loud.exposition().decode()
    assert sample_sum(text, "sticky_config_reloads_total", result="success") == 1
    assert sample_sum(text, "sticky_config_reloads_total", result="failure") == 1


@given(st.floats(min_value=0, max_value=1e10) | st.sampled_from(_DURATION_BOUNDS + _BYTES_BOUNDS))
def test_bucket_scan_is_bisect_left(value: float) -> None:
    for bounds in (_DURATION_BOUNDS, _BYTES_BOUNDS):
        assert _bucket(bounds, value) == bisect_left(bounds, value)


@pytest.mark.parametrize(("retries", "sent"), [("", 1), ("retries: {attempts: 2}", 3)])
async def test_a_post_is_resent_only_when_the_virtual_service_asks(
    pods: PodSet, retries: str, sent: int
) -> None:
    yaml = article_yaml(pods.addresses)
    if retries:
        yaml = yaml.replace("    route:\n", f"    {retries}\n    route:\n", 1)
    options = RunOptions(listen=(("127.0.0.1", 0),))
    running = Proxy(load_text(yaml), options)
    await running.start()
    try:
        url = "http://{}:{}/status/503".format(*running.addresses[0])
        async with aiohttp.ClientSession() as session:
            headers = {"Host": "test.com", "Cookie": "ISTIOID=one"}
            async with session.post(url, data=b"order", headers=headers) as resp:
                assert resp.status == 503
        assert sum(pods.request_counts) == sent
        text = running.exposition().decode()
        assert sample_sum(text, "sticky_requests_replayed_total") == sent - 1
    finally:
        await running.stop(grace=2)
