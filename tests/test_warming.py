"""Readiness waits for every cluster to have an endpoint (Envoy's warming), then stays ready."""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import aiohttp
import pytest
from proxy_process import OPS_LOCAL, OPS_PORTS, ROOT, article_yaml, proxy_process, readiness

from proxy.demo import PodSet
from proxy.istio import load_config
from proxy.server import Proxy, RunOptions

pytestmark = pytest.mark.timeout(60)

LOCAL = ("127.0.0.1", 0)
NO_PODS = """
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: test2-bwce-srv}
spec:
  hosts: [test2-bwce-srv.default.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: []
"""


async def status(session: aiohttp.ClientSession, proxy: Proxy, name: str, path: str) -> int:
    host, port = proxy.ports[name] if name else proxy.addresses[0]
    async with session.get(f"http://{host}:{port}{path}", headers={"Host": "test.com"}) as resp:
        return resp.status


async def test_not_ready_until_every_cluster_has_an_endpoint_then_ready_for_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text((ROOT / "config" / "sticky.yaml").read_text() + NO_PODS)
    options = RunOptions(
        listen=(LOCAL,), readiness=LOCAL, drain_time=0, config_paths=(str(config),)
    )
    proxy = Proxy(load_config([str(config)]), options)
    caplog.set_level(logging.INFO, logger="proxy.server")
    async with PodSet(2) as pods, aiohttp.ClientSession() as session:
        await proxy.start()
        try:
            # Cold: the only cluster has no endpoint, so readiness says what traffic would get.
            assert await status(session, proxy, "readiness", "/healthz/ready") == 503
            assert await status(session, proxy, "", "/") == 503
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(
                "outbound|8080||test2-bwce-srv.default.svc.cluster.local has no endpoint "
                "(no static endpoint configured): readiness stays 503" in w
                for w in warnings
            ), warnings

            config.write_text(article_yaml(pods.addresses))
            assert await proxy.reload()
            assert await status(session, proxy, "readiness", "/healthz/ready") == 200
            assert await status(session, proxy, "", "/") == 200
            assert "every cluster has an endpoint: ready" in caplog.text

            # Warm for good: pods scaled to zero later only fail that cluster's requests.
            config.write_text((ROOT / "config" / "sticky.yaml").read_text() + NO_PODS)
            assert await proxy.reload()
            assert await status(session, proxy, "", "/") == 503
            assert await status(session, proxy, "readiness", "/healthz/ready") == 200
        finally:
            await proxy.stop(grace=2)


async def test_workers_report_ready_to_the_supervisor_only_once_warm(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text((ROOT / "config" / "sticky.yaml").read_text() + NO_PODS)
    async with proxy_process(
        str(config), "--listen", "127.0.0.1:0", *OPS_PORTS, *OPS_LOCAL,
        "--workers", "2", "--access-log", "off", "--drain-time", "0",
    ) as proxy:  # fmt: skip
        ready = await proxy.port("readiness")
        # Both workers are up (a SIGHUP before a worker handles signals would kill it).
        cold = r"has no endpoint \(no static endpoint configured\)"
        await proxy.wait_for(cold)
        first = next(i for i, line in enumerate(proxy.lines) if re.search(cold, line))
        await proxy.wait_for(cold, start=first + 1)
        async with PodSet(1) as pods, aiohttp.ClientSession() as session:
            assert await readiness(session, ready) == 503
            start = len(proxy.lines)
            config.write_text(article_yaml(pods.addresses))
            proxy.signal(signal.SIGHUP)  # the supervisor forwards it: each worker reloads
            await proxy.wait_for(r"all 2 workers ready", start=start)
            assert await readiness(session, ready) == 200
        proxy.signal(signal.SIGTERM)
        assert await proxy.exit_code() == 0
