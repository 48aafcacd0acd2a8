"""``python -m proxy run ...`` as a real process, for the signal tests (reload, drain, workers).

Output (stdout and stderr together) is read continuously into ``lines`` so a busy proxy never
blocks on a full pipe; ``wait_for`` awaits a line matching a pattern (no sleeps), and ``port``
reads the ``<name> listening on HOST:PORT`` lines the proxy logs for every port it binds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from proxy.demo_command import demo_yaml

ROOT = Path(__file__).parent.parent
OPS_PORTS = ("--admin-port", "0", "--readiness-port", "0", "--metrics-port", "0")
OPS_LOCAL = ("--ops-address", "127.0.0.1")


class ProxyProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for(self, pattern: str, *, start: int = 0, within: float = 20) -> re.Match[str]:
        """The first line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        index = start
        async with asyncio.timeout(within):
            while True:
                while index < len(self.lines):
                    found = regex.search(self.lines[index])
                    if found:
                        return found
                    index += 1
                if self._reader.done():
                    raise AssertionError(f"exited before {pattern!r}:\n{''.join(self.lines)}")
                self._new_line.clear()
                await self._new_line.wait()

    async def port(self, name: str) -> int:
        """The port of ``name`` ("admin", "readiness", "metrics"; "" for traffic)."""
        prefix = rf"\b{name} " if name else r"proxy\.server: "
        found = await self.wait_for(prefix + r"listening on [\d.]+:(\d+)")
        return int(found.group(1))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, within: float = 20) -> int:
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            await self._reader
        return code


@asynccontextmanager
async def proxy_process(*args: str) -> AsyncIterator[ProxyProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    running = ProxyProcess(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        await asyncio.gather(running._reader, return_exceptions=True)


async def readiness(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/healthz/ready") as resp:
        return resp.status


async def scrape(session: aiohttp.ClientSession, port: int) -> str:
    async with session.get(f"http://127.0.0.1:{port}/stats/prometheus") as resp:
        assert resp.status == 200
        return await resp.text()


def sample_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def gateway_yaml(name: str = "gw", port: int = 80) -> str:
    """A Gateway ``name`` with one HTTP server for every host on ``port``."""
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {name}}}
spec:
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
"""


def service_yaml(name: str, pod: tuple[str, int]) -> str:
    """A STATIC ServiceEntry: host ``<name>.local`` port 80 is the one ``pod``."""
    host, port = pod
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.local]
  ports: [{{number: 80, name: http}}]
  resolution: STATIC
  endpoints: [{{address: {host}, ports: {{http: {port}}}}}]
"""


def article_yaml(pods: list[tuple[str, int]], cookie: str = "ISTIOID") -> str:
    """The article's Gateway/VirtualService/DestinationRule plus a ServiceEntry for ``pods``."""
    return demo_yaml(pods).replace("ISTIOID", cookie)


async def eventually(predicate: Callable[[], bool], within: float = 10) -> None:
    """Poll ``predicate`` (state in another process or thread, with no event to await)."""
    async with asyncio.timeout(within):
        for _ in itertools.count():
            if predicate():
                return
            await asyncio.sleep(0.02)


async def unshare_available() -> bool:
    """Whether ``unshare --mount`` works here (root): tests give a proxy its own /etc/hosts."""
    if not shutil.which("unshare"):
        return False
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "true", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await proc.wait() == 0


@asynccontextmanager
async def proxy_with_hosts(
    command: list[str], hosts: Path, env: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """Run the proxy ``command`` in its own mount namespace, where ``hosts`` is /etc/hosts (so
    that compose's service names resolve to loopback pods), listening on a free loopback port
    (STICKY_PROXY_LISTEN; ``env`` adds variables). Yields its URL once it listens; SIGTERM
    after. Needs :func:`unshare_available`."""
    script = f"mount --bind {shlex.quote(str(hosts))} /etc/hosts && exec {shlex.join(command)}"
    proc = await asyncio.create_subprocess_exec(
        "unshare",
        "--mount",
        "sh",
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {}), "STICKY_PROXY_LISTEN": "127.0.0.1:0"},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while b"listening on" not in (line := await proc.stdout.readline()):
                assert line, "the proxy exited"
        yield f"http://127.0.0.1:{int(line.decode().rsplit(':', 1)[1])}/"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await proc.wait()
