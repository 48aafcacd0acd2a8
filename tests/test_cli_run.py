"""``sticky-proxy run`` as a user starts it: real processes."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from proxy.demo import PodSet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

# No operating ports, no drain time: a stop is quick and nothing else is bound.
QUIET: tuple[str, ...] = ("--admin-port", "off", "--readiness-port", "off", "--metrics-port", "off")
QUIET += ("--drain-time", "0")


@asynccontextmanager
async def process(*args: str, ready: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Start ``python -m proxy ARGS``; yield it and the first line matching ``ready``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, f"exited early with {await proc.wait()}"
                if re.search(ready, line):
                    break
        yield proc, line
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        return await proc.wait()


async def test_quick_mode_serves_sticky_and_exits_0_on_sigterm() -> None:
    async with PodSet(2) as pods:
        ups = [arg for h, p in pods.addresses for arg in ("--upstream", f"{h}:{p}")]
        async with process(
            "run",
            *ups,
            "--listen",
            "127.0.0.1:0",
            *QUIET,
            ready=r"listening on 127\.0\.0\.1:\d+",
        ) as (proc, line):
            port = int(line.rsplit(":", 1)[1])
            # A new connection per request: only the cookie can keep the session on one pod.
            async with aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(force_close=True),
            ) as session:
                url = f"http://127.0.0.1:{port}/"
                seen = set()
                for _ in range(10):
                    async with session.get(url) as resp:
                        seen.add((await resp.json())["pod"])
                assert len(seen) == 1
                assert "ISTIOID" in {c.key for c in session.cookie_jar}
            assert await stop(proc) == 0


async def test_run_with_a_bad_config_exits_2_naming_the_error(tmp_path: object) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "config/",
        "tests/no-such-file.yaml",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"no-such-file.yaml" in err


async def test_sticky_proxy_listen_stands_for_listen_unless_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The image sets STICKY_PROXY_LISTEN=0.0.0.0:8080; here a free port on loopback stands in.
    monkeypatch.setenv("STICKY_PROXY_LISTEN", "127.0.0.2:0")
    async with PodSet(1) as pods:
        upstream = "{}:{}".format(*pods.addresses[0])
        async with process(
            "run", "--upstream", upstream, *QUIET, ready=r"listening on [\d.]+:\d+"
        ) as (proc, line):
            assert re.search(r"listening on 127\.0\.0\.2:\d+$", line.strip()), line
            port = int(line.rsplit(":", 1)[1])
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.2:{port}/") as resp,
            ):
                assert (await resp.json())["pod"] == "pod-1"
            assert await stop(proc) == 0
        async with process(
            "run", "--upstream", upstream, "--listen", "127.0.0.1:0", *QUIET,
            ready=r"listening on [\d.]+:\d+",
        ) as (proc, line):  # fmt: skip
            assert "listening on 127.0.0.1:" in line
            assert await stop(proc) == 0
        monkeypatch.setenv("STICKY_PROXY_LISTEN", "nowhere")
        bad = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--upstream", upstream,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(20):
            _, err = await bad.communicate()
        assert bad.returncode == 2
        assert b"STICKY_PROXY_LISTEN 'nowhere': expected HOST:PORT" in err
