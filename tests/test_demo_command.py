"""``sticky-proxy demo`` as a user starts it: free ports only, from outside the source tree."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest
import yaml
from proxy_process import ProxyProcess, sample_sum

from proxy.__main__ import main
from proxy.demo_command import demo_yaml, port_or_free
from proxy.istio import load_text

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
FREE = ("--port", "0", "--pod-port", "0")
FREE_OPS = ("--admin-port", "0", "--readiness-port", "0", "--metrics-port", "0")


async def test_demo_serves_sticky_traffic_and_its_operating_ports(tmp_path: Path) -> None:
    # From an empty directory: the demo needs nothing next to the source tree.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", *FREE, *FREE_OPS, "--pods", "2",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    demo = ProxyProcess(proc)
    try:
        await demo.wait_for(r"Ctrl-C stops everything")
        text = "".join(demo.lines)
        url = re.search(r"the proxy on (http://127\.0\.0\.1:\d+/)", text)
        pods = re.findall(r"(pod-\d) on 127\.0\.0\.1:(\d+)", text)
        ports = dict(re.findall(r"  (readiness|metrics|admin) +(http://127\.0\.0\.1:\d+)/", text))
        assert url and len(pods) == 2 and set(ports) == {"readiness", "metrics", "admin"}, text
        shown = re.findall(r"request \d: 200 from (pod-\d)", text)
        assert len(shown) == 3 and len(set(shown)) == 1, text  # the cookie kept one pod

        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            async with session.get(ports["readiness"] + "/healthz/ready") as resp:
                assert resp.status == 200
            alice = {"Host": "test.com", "Cookie": "ISTIOID=alice"}
            served = set()
            for _ in range(3):
                async with session.get(url.group(1), headers=alice) as resp:
                    served.add((await resp.json())["pod"])
            assert len(served) == 1
            route = ports["admin"] + "/route?host=test.com&cookie=ISTIOID=alice"
            async with session.get(route) as resp:
                answer = await resp.json()
            assert dict(pods)[served.pop()] == answer["endpoint"].rsplit(":", 1)[1]
            async with session.get(ports["metrics"] + "/stats/prometheus") as resp:
                scraped = await resp.text()
            assert sample_sum(scraped, "istio_requests_total", response_code="200") == 6

        demo.signal(signal.SIGTERM)
        assert await demo.exit_code() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_ports_given_must_be_free() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "demo", "--port", "0", "--pod-port", str(port),
            *FREE_OPS, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    assert proc.returncode == 1
    assert b"cannot start the demo pods" in out and b"address already in use" in out


def test_a_default_port_that_is_taken_becomes_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_or_free("127.0.0.1", port) == 0
    assert port_or_free("127.0.0.1", port) == port


def test_the_packaged_yaml_is_the_article_as_in_config() -> None:
    packaged = yaml.safe_load_all((ROOT / "proxy" / "demo.yaml").read_text())
    article = yaml.safe_load_all((ROOT / "config" / "sticky.yaml").read_text())
    assert list(packaged) == list(article)
    config = load_text(demo_yaml([("127.0.0.1", 1), ("127.0.0.1", 2)]))
    (cluster,) = config.clusters.values()
    assert [ep.key for ep in cluster.endpoints.endpoints] == ["127.0.0.1:1", "127.0.0.1:2"]  # type: ignore[union-attr]


def test_the_wheel_ships_the_demo_yaml(tmp_path: Path) -> None:
    # What the image's build stage copies, built as a pure wheel (no compiler: seconds).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(
        ROOT / "proxy", source / "proxy", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        env={**os.environ, "STICKY_PROXY_PURE": "1"}, check=True, timeout=120,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("sticky_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "proxy/demo.yaml" in archive.namelist()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pods", "0"], "--pods must be at least 1"),
        (["--port", "70000"], "--port: 70000 is not a port number"),
        (["--pod-port", "65535"], "--pod-port: 65536 is not a port number"),
        (["--admin-port", "x"], "--admin-port must be a port number"),
    ],
)
def test_bad_ports_are_refused_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *flags]) == 2
    assert message in capsys.readouterr().out
