"""SIGTERM drains like Istio's gateway: readiness 503 at once, requests in flight finish, exit 0."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
from proxy_process import OPS_LOCAL, OPS_PORTS, eventually, proxy_process, readiness

from proxy.demo import PodSet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def test_sigterm_with_a_2s_request_in_flight_completes_it_and_exits_0() -> None:
    async with PodSet(1) as pods:
        host, port = pods.addresses[0]
        async with (
            proxy_process(
                "--upstream", f"{host}:{port}", "--listen", "127.0.0.1:0",
                *OPS_PORTS, *OPS_LOCAL, "--drain-time", "0.5", "--access-log", "off",
            ) as proxy,
            aiohttp.ClientSession() as session,
        ):  # fmt: skip
            traffic = await proxy.port("")
            ready_port = await proxy.port("readiness")
            await proxy.wait_for(r"admin listening on")
            assert await readiness(session, ready_port) == 200

            async def slow() -> tuple[int, str]:
                async with session.get(f"http://127.0.0.1:{traffic}/slow?ms=2000") as resp:
                    return resp.status, (await resp.json())["pod"]

            in_flight = asyncio.create_task(slow())
            await eventually(lambda: pods.request_counts[0] == 1)  # it reached the pod
            proxy.signal(signal.SIGTERM)
            await proxy.wait_for(r"draining: readiness 503")
            assert await readiness(session, ready_port) == 503
            # Still serving during the drain time (load balancers take a moment to notice).
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.get(f"http://127.0.0.1:{traffic}/") as resp,
            ):
                assert resp.status == 200
            # Past the drain time: no new connections, the request in flight still running.
            await proxy.wait_for(r"stopping: no new connections")
            assert not in_flight.done()
            assert await readiness(session, ready_port) == 503
            assert await in_flight == (200, "pod-1")
            assert await proxy.exit_code() == 0
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(f"http://127.0.0.1:{traffic}/")


async def test_a_request_past_the_drain_deadline_is_cut_and_the_exit_is_still_0() -> None:
    async with PodSet(1) as pods:
        host, port = pods.addresses[0]
        async with (
            proxy_process(
                "--upstream", f"{host}:{port}", "--listen", "127.0.0.1:0",
                "--admin-port", "off", "--readiness-port", "off", "--metrics-port", "off",
                "--drain-time", "0", "--drain-deadline", "0.3", "--access-log", "off",
            ) as proxy,
            aiohttp.ClientSession() as session,
        ):  # fmt: skip
            traffic = await proxy.port("")

            async def slow() -> int:
                async with session.get(f"http://127.0.0.1:{traffic}/slow?ms=5000") as resp:
                    await resp.read()
                    return resp.status

            in_flight = asyncio.create_task(slow())
            await eventually(lambda: pods.request_counts[0] == 1)
            proxy.signal(signal.SIGTERM)
            assert await proxy.exit_code(within=4) == 0
            with pytest.raises(aiohttp.ClientError):
                await in_flight
            await proxy.wait_for(r"still busy after 0\.3s")
