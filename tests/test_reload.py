"""Reload: SIGHUP and --watch swap the config atomically; an invalid one keeps the old config."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from proxy_process import (
    OPS_LOCAL,
    OPS_PORTS,
    article_yaml,
    eventually,
    proxy_process,
    sample_sum,
    scrape,
)

from proxy.demo import PodSet
from proxy.istio import load_config
from proxy.server import Proxy, RunOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(3) as podset:
        yield podset


async def cookie_name(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, headers={"Host": "test.com"}) as resp:
        assert resp.status == 200
        return resp.headers["Set-Cookie"].split("=", 1)[0]


async def test_sighup_changes_the_cookie_and_a_2s_request_in_flight_completes(
    pods: PodSet, tmp_path: Path
) -> None:
    config = tmp_path / "istio.yaml"
    config.write_text(article_yaml(pods.addresses, "ISTIOID"))
    async with (
        proxy_process(
            str(tmp_path), "--listen", "127.0.0.1:0", *OPS_PORTS, *OPS_LOCAL,
            "--access-log", "off", "--drain-time", "0",
        ) as proxy,
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
    ):  # fmt: skip
        url = f"http://127.0.0.1:{await proxy.port('')}"
        metrics = await proxy.port("metrics")
        await proxy.wait_for("admin listening on")
        assert await cookie_name(session, url) == "ISTIOID"

        async def slow() -> tuple[int, str | None]:
            async with session.get(url + "/slow?ms=2000", headers={"Host": "test.com"}) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Set-Cookie")

        in_flight = asyncio.create_task(slow())
        await eventually(lambda: sum(pods.request_counts) == 2)  # the slow one reached its pod
        config.write_text(article_yaml(pods.addresses, "SESSION"))
        mark = len(proxy.lines)
        proxy.signal(signal.SIGHUP)
        await proxy.wait_for(r"reload: configuration applied", start=mark)
        assert not in_flight.done()
        assert await cookie_name(session, url) == "SESSION"
        status, set_cookie = await in_flight
        assert status == 200
        assert set_cookie is not None and set_cookie.startswith('ISTIOID="')  # decided before

        # An invalid file: every error logged, counted, and the running config kept.
        config.write_text(article_yaml(pods.addresses, "OTHER").replace("ttl: 60s", "tll: 60s"))
        mark = len(proxy.lines)
        proxy.signal(signal.SIGHUP)
        error = await proxy.wait_for(r"reload: .*tll", start=mark)
        assert "did you mean ttl" in error.string
        await proxy.wait_for(r"reload: failed", start=mark)
        assert await cookie_name(session, url) == "SESSION"
        text = await scrape(session, metrics)
        assert sample_sum(text, "sticky_config_reloads_total", result="success") == 1
        assert sample_sum(text, "sticky_config_reloads_total", result="failure") == 1
        proxy.signal(signal.SIGTERM)
        assert await proxy.exit_code() == 0


async def test_watch_follows_the_files_and_keeps_unchanged_clusters(
    pods: PodSet, tmp_path: Path
) -> None:
    config = tmp_path / "istio.yaml"
    config.write_text(article_yaml(pods.addresses))
    options = RunOptions(listen=(("127.0.0.1", 0),), config_paths=(str(tmp_path),), watch=0.05)
    proxy = Proxy(load_config([str(tmp_path)]), options)
    await proxy.start()
    try:
        url = "http://{}:{}".format(*proxy.addresses[0])
        before = proxy.runtime
        (cluster,) = before.clusters.values()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            assert await cookie_name(session, url) == "ISTIOID"
            # Only the cookie name changes: the cluster (pools, ring) is kept as it is.
            config.write_text(article_yaml(pods.addresses, "WATCHED"))
            await eventually(lambda: proxy.runtime is not before)
            assert await cookie_name(session, url) == "WATCHED"
            assert next(iter(proxy.runtime.clusters.values())) is cluster
            # A new endpoint set keeps the cluster (and the pools of the endpoints that stay);
            # discovery runs again on it, so the endpoint that left is gone from the balancer.
            current = proxy.runtime
            kept_pool = cluster.cluster.snapshot.pools["{}:{}".format(*pods.addresses[0])]
            config.write_text(article_yaml(pods.addresses[:2], "WATCHED"))
            await eventually(lambda: proxy.runtime is not current)
            (replaced,) = proxy.runtime.clusters.values()
            assert replaced is cluster
            snapshot = replaced.cluster.snapshot
            assert len(snapshot.endpoints) == 2
            assert snapshot.pools["{}:{}".format(*pods.addresses[0])] is kept_pool
            seen = set()
            for i in range(30):
                headers = {"Host": "test.com", "Cookie": f"WATCHED=s{i}"}
                async with session.get(url, headers=headers) as resp:
                    seen.add((await resp.json())["pod"])
            assert seen <= {"pod-1", "pod-2"}
    finally:
        await proxy.stop(grace=2)


@asynccontextmanager
async def article_proxy(pods: PodSet, config: Path) -> AsyncIterator[Proxy]:
    """A started in-process proxy on the article's YAML for ``pods``, written to ``config``."""
    await asyncio.to_thread(config.write_text, article_yaml(pods.addresses))
    options = RunOptions(listen=(("127.0.0.1", 0),), config_paths=(str(config),))
    proxy = Proxy(load_config([str(config)]), options)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop(grace=2)


async def test_a_reload_that_changes_the_gateway_port_is_refused(
    pods: PodSet, tmp_path: Path
) -> None:
    config = tmp_path / "istio.yaml"
    async with article_proxy(pods, config) as proxy:
        before = proxy.runtime
        config.write_text(article_yaml(pods.addresses).replace("number: 80\n", "number: 81\n"))
        assert await proxy.reload() is False
        assert proxy.runtime is before
        assert proxy.metrics is not None
        text = proxy.exposition().decode()
        assert sample_sum(text, "sticky_config_reloads_total", result="failure") == 1


async def test_a_reload_to_a_config_that_serves_nothing_keeps_the_running_one(
    pods: PodSet, tmp_path: Path
) -> None:
    """`run` refuses such a config at start; a reload refuses it too, rather than 404 all."""
    config = tmp_path / "istio.yaml"
    async with article_proxy(pods, config) as proxy:
        before = proxy.runtime
        # The VirtualService loses its Gateway: bound to the mesh only, it serves nothing.
        config.write_text(article_yaml(pods.addresses).replace("  gateways:\n  - default-gw\n", ""))
        assert await proxy.reload() is False
        assert proxy.runtime is before
        url = "http://{}:{}".format(*proxy.addresses[0])
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            assert await cookie_name(session, url) == "ISTIOID"
