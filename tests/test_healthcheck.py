"""The image's HEALTHCHECK probes the readiness port the running proxy's command line names."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from aiohttp import web

from proxy.admin import readiness_app, start_app
from proxy.healthcheck import check, run_arguments

pytestmark = pytest.mark.timeout(30)

ENTRY = ["/usr/local/bin/python", "/usr/local/bin/sticky-proxy"]


def fake_proc(root: Path, processes: dict[int, Sequence[str]]) -> Path:
    for pid, argv in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (root / "self").mkdir()  # not a pid: ignored
    return root


class Readiness:
    def __init__(self) -> None:
        self.ready = True
        self.port = 0


@pytest.fixture
async def readiness() -> AsyncIterator[Readiness]:
    state = Readiness()
    runner: web.AppRunner
    runner, (_, state.port) = await start_app(readiness_app(lambda: state.ready), "127.0.0.1", 0)
    yield state
    await runner.cleanup()


async def probe(proc: Path) -> tuple[int, str]:
    return await asyncio.to_thread(check, proc)


async def test_probes_the_port_on_the_proxys_command_line(
    tmp_path: Path, readiness: Readiness
) -> None:
    flags = ["--readiness-port", str(readiness.port), "--ops-address", "127.0.0.1"]
    proc = fake_proc(tmp_path, {1: [*ENTRY, "run", "/etc/sticky-proxy", *flags]})
    code, line = await probe(proc)
    assert code == 0, line
    assert line == f"http://127.0.0.1:{readiness.port}/healthz/ready: 200 ready"
    readiness.ready = False  # starting, warming or draining
    code, line = await probe(proc)
    assert code == 1 and ": 503 " in line


async def test_the_supervisor_is_probed_not_its_workers_nor_other_processes(
    tmp_path: Path, readiness: Readiness
) -> None:
    port = str(readiness.port)
    worker = [sys.executable, "-m", "proxy", "run", "/etc/sticky-proxy", "--worker", "0"]
    proc = fake_proc(
        tmp_path,
        {
            1: ["/sbin/docker-init", "--", "sticky-proxy", "check", "/etc/sticky-proxy"],
            7: [*worker, "--readiness-port", "off"],
            9: [*ENTRY, "run", "/etc/sticky-proxy", "--workers", "2", "--readiness-port=" + port],
            12: [sys.executable, "-m", "proxy.demo", "--port", "8080"],
        },
    )
    code, line = await probe(proc)
    assert code == 0 and f":{port}/healthz/ready" in line, line


async def test_a_wildcard_ops_address_is_probed_on_loopback(
    tmp_path: Path, readiness: Readiness
) -> None:
    args = ["run", "/etc/sticky-proxy", "--readiness-port", str(readiness.port)]
    code, line = await probe(fake_proc(tmp_path, {1: [*ENTRY, *args]}))  # --ops-address 0.0.0.0
    assert code == 0 and line.startswith("http://127.0.0.1:"), line


async def test_the_demo_is_probed_on_its_address(tmp_path: Path, readiness: Readiness) -> None:
    argv = [*ENTRY, "demo", "--address", "127.0.0.1", "--readiness-port", str(readiness.port)]
    code, line = await probe(fake_proc(tmp_path, {1: argv}))
    assert code == 0 and line.startswith(f"http://127.0.0.1:{readiness.port}/"), line


async def test_nothing_to_probe(tmp_path: Path) -> None:
    off = fake_proc(tmp_path / "a", {1: [*ENTRY, "run", "x.yaml", "--readiness-port", "off"]})
    assert await probe(off) == (0, "the proxy runs with --readiness-port off: nothing to probe")
    zero = fake_proc(tmp_path / "b", {1: [*ENTRY, "run", "x.yaml", "--readiness-port", "0"]})
    code, line = await probe(zero)
    assert code == 1 and "give it a number" in line
    none = fake_proc(tmp_path / "c", {1: ["/bin/sh"], 2: [*ENTRY, "route", "x", "--host", "h"]})
    code, line = await probe(none)
    assert code == 1 and "no `sticky-proxy run` (or demo) process" in line


async def test_nobody_listening_is_unhealthy(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free again once closed: nothing listens there
    proc = fake_proc(tmp_path, {1: [*ENTRY, "run", "x.yaml", "--readiness-port", str(port)]})
    code, line = await probe(proc)
    assert code == 1 and "refused" in line, line


def test_run_arguments() -> None:
    assert run_arguments([*ENTRY, "run", "a"]) == ["run", "a"]
    assert run_arguments(["python3", "-m", "proxy", "run"]) == ["run"]
    assert run_arguments([*ENTRY, "demo"]) == ["demo"]
    assert run_arguments([*ENTRY, "check", "a"]) is None
    assert run_arguments(["python", "-m", "proxy.demo"]) is None
    assert run_arguments([]) is None
