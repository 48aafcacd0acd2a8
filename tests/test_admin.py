"""The operating ports: readiness, admin (/ready, /clusters, /config_dump, /route), metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from proxy_process import article_yaml

from proxy.affinity import generated_cookie_value
from proxy.demo import PodSet
from proxy.hashing import RingHash, xxh64
from proxy.istio import load_text
from proxy.server import Proxy, RunOptions

pytestmark = pytest.mark.timeout(60)

CLUSTER = "outbound|8080||test2-bwce-srv.default.svc.cluster.local"
LOCAL = ("127.0.0.1", 0)


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(3) as podset:
        yield podset


@pytest.fixture
async def proxy(pods: PodSet) -> AsyncIterator[Proxy]:
    options = RunOptions(listen=(LOCAL,), admin=LOCAL, readiness=LOCAL, metrics=LOCAL, drain_time=0)
    running = Proxy(load_text(article_yaml(pods.addresses)), options)
    await running.start()
    yield running
    await running.stop(grace=2)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def url(proxy: Proxy, name: str, path: str) -> str:
    host, port = proxy.ports[name]
    return f"http://{host}:{port}{path}"


async def get(session: aiohttp.ClientSession, address: str) -> tuple[int, str]:
    async with session.get(address) as resp:
        return resp.status, await resp.text()


async def get_json(session: aiohttp.ClientSession, address: str) -> tuple[int, Any]:
    async with session.get(address) as resp:
        return resp.status, await resp.json()


async def test_readiness_and_ready_turn_503_when_draining(
    proxy: Proxy, session: aiohttp.ClientSession
) -> None:
    assert await get(session, url(proxy, "readiness", "/healthz/ready")) == (200, "")
    assert await get(session, url(proxy, "admin", "/ready")) == (200, "LIVE\n")
    proxy.begin_drain()
    assert (await get(session, url(proxy, "readiness", "/healthz/ready")))[0] == 503
    assert await get(session, url(proxy, "admin", "/ready")) == (503, "DRAINING\n")


async def test_clusters_show_health_weight_and_ring_share(
    proxy: Proxy, pods: PodSet, session: aiohttp.ClientSession
) -> None:
    status, table = await get_json(session, url(proxy, "admin", "/clusters?format=json"))
    assert status == 200
    (cluster,) = table
    assert cluster["name"] == CLUSTER and cluster["healthy"] == cluster["total"] == 3
    keys = [f"{h}:{p}" for h, p in pods.addresses]
    ring = RingHash(dict.fromkeys(keys, 1))
    assert [e["address"] for e in cluster["endpoints"]] == sorted(keys)
    for ep in cluster["endpoints"]:
        assert ep["health"] == "healthy" and ep["weight"] == 1
        assert ep["share"] == pytest.approx(ring.share(ep["address"]), abs=1e-6)
    assert sum(e["share"] for e in cluster["endpoints"]) == pytest.approx(1, abs=1e-5)
    status, text = await get(session, url(proxy, "admin", "/clusters"))
    assert f"{CLUSTER}::{keys[0]}::health_flags::healthy" in text.splitlines()


async def test_config_dump_is_the_effective_config_as_json(
    proxy: Proxy, session: aiohttp.ClientSession
) -> None:
    status, dump = await get_json(session, url(proxy, "admin", "/config_dump"))
    assert status == 200
    cluster = dump["config"]["clusters"][CLUSTER]
    assert cluster["lb"]["consistent_hash"]["policy"]["name"] == "ISTIOID"
    assert cluster["lb"]["consistent_hash"]["policy"]["ttl"] == 60
    assert dump["config"]["listeners"][0]["port"] == 80
    assert dump["options"]["drain_time"] == 0


async def test_route_answers_with_the_live_endpoints(
    proxy: Proxy, pods: PodSet, session: aiohttp.ClientSession
) -> None:
    keys = [f"{h}:{p}" for h, p in pods.addresses]
    status, answer = await get_json(
        session, url(proxy, "admin", "/route?host=test.com&path=/cart&cookie=ISTIOID=alice")
    )
    assert status == 200
    assert answer["cluster"] == CLUSTER
    assert answer["hash_key"] == f"0x{xxh64('alice'):016x}"
    assert answer["endpoint"] == RingHash(dict.fromkeys(keys, 1)).pick(xxh64("alice"))
    assert "set_cookie" not in answer
    # A first visit: the cookie the proxy would invent, and where it routes.
    status, answer = await get_json(
        session,
        url(proxy, "admin", "/route?host=test.com&client_ip=10.0.0.1&client_port=54321")
        + "&local=10.0.0.2:8080",
    )
    value = generated_cookie_value("10.0.0.1:54321", "10.0.0.2:8080")
    assert answer["set_cookie"] == f'ISTIOID="{value}"; Max-Age=60; HttpOnly'
    # Live: with a pod gone from the endpoints the answer changes at once.
    proxy.runtime.clusters[CLUSTER].cluster.set_endpoints(
        ep for ep in proxy.runtime.clusters[CLUSTER].cluster.snapshot.endpoints if ep.key != keys[0]
    )
    for i in range(20):
        _, answer = await get_json(
            session, url(proxy, "admin", f"/route?host=test.com&cookie=ISTIOID=u{i}")
        )
        assert answer["endpoint"] in keys[1:]
    status, answer = await get_json(session, url(proxy, "admin", "/route?host=other.com"))
    assert status == 404 and answer["route"] is None
    status, answer = await get_json(session, url(proxy, "admin", "/route?path=/"))
    assert status == 400 and "host" in answer["error"]


async def test_admin_serves_metrics_too(proxy: Proxy, session: aiohttp.ClientSession) -> None:
    status, text = await get(session, url(proxy, "admin", "/stats/prometheus"))
    assert status == 200 and "envoy_cluster_membership_healthy" in text
