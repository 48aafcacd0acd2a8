"""proxy.server: listeners per Gateway port, reloads that add clusters, quick-mode reloads.

The real ``Proxy`` on 127.0.0.1 port 0 with demo pods behind it; what the end-to-end files do
not cover: which listener serves which Gateway port's routes, and the order of a reload (the
new clusters are resolved before the swap, so their first request finds endpoints).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from proxy_process import gateway_yaml, service_yaml

from proxy.demo import PodSet
from proxy.istio import load_config, load_text
from proxy.quick import QuickOptions, quick_config
from proxy.server import Proxy, RunOptions

pytestmark = pytest.mark.timeout(60)

ANY = ("127.0.0.1", 0)


def routes(name: str, gateway: str, to: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [app.test]
  gateways: [{gateway}]
  http: [{{route: [{{destination: {{host: {to}.local, port: {{number: 80}}}}}}]}}]
"""


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(2) as podset:
        yield podset


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


async def pod_at(session: aiohttp.ClientSession, address: tuple[str, int]) -> str:
    host, port = address
    async with session.get(f"http://{host}:{port}/", headers={"Host": "app.test"}) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["pod"])


async def test_each_listen_address_serves_the_routes_of_its_gateway_port(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    # Gateway port 80 routes app.test to pod-1, port 8080 to pod-2; --listen addresses are
    # given in the order of the ports, each serving its own port's routes.
    docs = [
        gateway_yaml("web", 80),
        gateway_yaml("alt", 8080),
        routes("web", "web", "stable"),
        routes("alt", "alt", "canary"),
        service_yaml("stable", pods.addresses[0]),
        service_yaml("canary", pods.addresses[1]),
    ]
    config = load_text("---".join(docs), "ports.yaml")
    proxy = Proxy(config, RunOptions(listen=(ANY, ANY)))
    await proxy.start()
    try:
        first, second = proxy.addresses
        assert first != second
        assert [await pod_at(session, first) for _ in range(3)] == ["pod-1"] * 3
        assert [await pod_at(session, second) for _ in range(3)] == ["pod-2"] * 3
    finally:
        await proxy.stop(grace=2)
    # One address for two ports cannot say which port it serves: refused before listening.
    proxy = Proxy(config, RunOptions(listen=(ANY,)))
    with pytest.raises(ValueError, match=r"1 --listen addresses for 2 gateway ports: .* 80, 8080"):
        await proxy.start()
    assert proxy.addresses == []
    await proxy.stop(grace=0)


async def test_a_reload_that_adds_a_cluster_serves_its_first_request(
    pods: PodSet, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    files = tmp_path / "istio.yaml"
    before = [
        gateway_yaml("web", 80),
        routes("web", "web", "stable"),
        service_yaml("stable", pods.addresses[0]),
    ]
    files.write_text("---".join(before))
    proxy = Proxy(load_config([str(files)]), RunOptions(listen=(ANY,), config_paths=(str(files),)))
    await proxy.start()
    try:
        (address,) = proxy.addresses
        assert await pod_at(session, address) == "pod-1"
        after = [
            gateway_yaml("web", 80),
            routes("web", "web", "canary"),
            service_yaml("canary", pods.addresses[1]),
        ]
        files.write_text("---".join(after))
        assert await proxy.reload()
        # No wait, no retry: the new cluster's endpoints were found before the swap.
        assert await pod_at(session, address) == "pod-2"
        assert list(proxy.runtime.clusters) == ["outbound|80||canary.local"]
    finally:
        await proxy.stop(grace=2)


async def test_a_reload_in_quick_mode_keeps_the_runtime(pods: PodSet) -> None:
    config = quick_config(QuickOptions(upstreams=tuple(pods.addresses), port=80))
    proxy = Proxy(config, RunOptions(listen=(ANY,)))  # no config files to read again
    before = proxy.runtime
    assert await proxy.reload()
    assert proxy.runtime is before
