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

pytestmark = pytest.mark.timeout(60)


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
            "--admin-port",
            "off",
            "--readiness-port",
            "off",
            "--metrics-port",
            "off",
            "--drain-time",
            "0",
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
