"""--workers 2: two processes on one port route identically; one metrics endpoint adds them up."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket

import aiohttp
import pytest
from proxy_process import OPS_LOCAL, OPS_PORTS, proxy_process, readiness, sample_sum, scrape

from proxy.demo import PodSet
from proxy.hashing import RingHash, xxh64

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def scrape_until(session: aiohttp.ClientSession, port: int, requests: int) -> str:
    """The scrape once it counts ``requests`` 200s (workers flush every second)."""
    async with asyncio.timeout(10):
        for _ in itertools.count():
            text = await scrape(session, port)
            counted = sample_sum(text, "istio_requests_total", response_code="200")
            assert counted <= requests
            if counted == requests:
                return text
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def test_two_workers_route_200_cookies_the_same_and_a_dead_worker_comes_back() -> None:
    async with PodSet(3) as pods:
        upstreams = [a for h, p in pods.addresses for a in ("--upstream", f"{h}:{p}")]
        keys = [f"{h}:{p}" for h, p in pods.addresses]
        ring = RingHash(dict.fromkeys(keys, 1))
        expected = {f"c{i}": pods.names[keys.index(ring.pick(xxh64(f"c{i}")))] for i in range(200)}
        async with proxy_process(
            *upstreams, "--listen", "127.0.0.1:0", *OPS_PORTS, *OPS_LOCAL,
            "--workers", "2", "--access-log", "off", "--drain-time", "0",
        ) as proxy:  # fmt: skip
            await proxy.wait_for(r"all 2 workers ready")
            url = f"http://127.0.0.1:{await proxy.port('')}/"
            metrics = await proxy.port("metrics")
            ready = await proxy.port("readiness")
            # One connection per request: the kernel chooses the worker every time.
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                cookie_jar=aiohttp.DummyCookieJar(),
            ) as session:
                assert await readiness(session, ready) == 200
                for cookie, pod in expected.items():
                    async with session.get(url, headers={"Cookie": f"ISTIOID={cookie}"}) as r:
                        assert (await r.json())["pod"] == pod, cookie
                # Workers flush their counts every second; the one endpoint adds them up.
                text = await scrape_until(session, metrics, 200)
                # Both workers took connections.
                per_worker = [
                    sample_sum(text, "sticky_worker_downstream_cx_total", worker=str(w))
                    for w in (0, 1)
                ]
                assert min(per_worker) > 0 and sum(per_worker) == 200, per_worker
                assert sample_sum(text, "istio_requests_total", response_code="200") == 200
                assert sample_sum(text, "envoy_cluster_upstream_rq_xx_total") == 200

                # Kill worker 1: the supervisor starts it again and routing stays the same.
                found = await proxy.wait_for(r"worker 1 started \(pid (\d+)\)")
                mark = len(proxy.lines)
                os.kill(int(found.group(1)), signal.SIGKILL)
                await proxy.wait_for(r"worker 1 .* exited with -9; restarting", start=mark)
                await proxy.wait_for(r"all 2 workers ready", start=mark)
                for cookie in list(expected)[:50]:
                    async with session.get(url, headers={"Cookie": f"ISTIOID={cookie}"}) as r:
                        assert (await r.json())["pod"] == expected[cookie], cookie
                # The dead worker's counts are kept: nothing is lost from the totals.
                await scrape_until(session, metrics, 250)

            proxy.signal(signal.SIGTERM)
            assert await proxy.exit_code() == 0


async def test_workers_that_cannot_listen_stop_the_supervisor_with_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # no SO_REUSEPORT: the workers' bind fails
        port = taken.getsockname()[1]
        async with proxy_process(
            "--upstream", "127.0.0.1:9", "--listen", f"127.0.0.1:{port}",
            "--admin-port", "off", "--readiness-port", "off", "--metrics-port", "0", *OPS_LOCAL,
            "--workers", "2", "--access-log", "off",
        ) as proxy:  # fmt: skip
            assert await proxy.exit_code() == 1
            await proxy.wait_for(r"could not start .*: stopping")
