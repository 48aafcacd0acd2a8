"""Demo pods over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.demo import PodSet, build_parser


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(3) as pod_set:
        yield pod_set


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_each_pod_answers_with_its_name(pods: PodSet, session: aiohttp.ClientSession) -> None:
    assert pods.names == ["pod-1", "pod-2", "pod-3"]
    assert len({port for _, port in pods.addresses}) == 3
    for name, url in zip(pods.names, pods.urls, strict=True):
        async with session.post(
            f"{url}/some/path?a=1", data=b"xyz", headers={"Cookie": "ISTIOID=abc"}
        ) as response:
            assert response.status == 200
            assert response.headers["X-Pod"] == name
            body = await response.json()
        assert body["pod"] == name
        assert body["method"] == "POST"
        assert body["path"] == "/some/path"
        assert body["query"] == "a=1"
        assert body["cookie"] == "ISTIOID=abc"
        assert body["body_bytes"] == 3
        assert body["request_count"] == 1
        assert body["hostname"]
    async with session.get(pods.urls[1]) as response:
        assert (await response.json())["request_count"] == 2
    assert pods.request_counts == [1, 2, 1]


async def test_bytes_chunked_and_with_length(pods: PodSet, session: aiohttp.ClientSession) -> None:
    n = 3 * 65536 + 123
    async with session.get(f"{pods.urls[0]}/bytes?n={n}") as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert len(await response.read()) == n
    async with session.get(f"{pods.urls[0]}/bytes?n={n}&cl=1") as response:
        assert response.headers["Content-Length"] == str(n)
        assert len(await response.read()) == n
    async with session.get(f"{pods.urls[0]}/bytes?n=oops") as response:
        assert response.status == 400


async def test_upload_sha256(pods: PodSet, session: aiohttp.ClientSession) -> None:
    payload = os.urandom(300_000)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 50_000):
            yield payload[start : start + 50_000]

    async with session.put(f"{pods.urls[2]}/upload", data=stream()) as response:
        body = await response.json()
    assert body == {
        "pod": "pod-3",
        "received": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


async def test_echo_streams_the_body_back(pods: PodSet, session: aiohttp.ClientSession) -> None:
    payload = os.urandom(200_000)
    async with session.post(f"{pods.urls[0]}/echo", data=payload) as response:
        assert response.headers["Content-Length"] == str(len(payload))
        assert await response.read() == payload


async def test_websocket_echo(pods: PodSet, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(f"{pods.urls[1]}/ws") as ws:
        assert await ws.receive_json() == {"pod": "pod-2"}
        await ws.send_str("hello")
        assert await ws.receive_str() == "hello"
        await ws.send_bytes(b"\x00\x01binary")
        assert await ws.receive_bytes() == b"\x00\x01binary"


async def test_status_slow_and_health(pods: PodSet, session: aiohttp.ClientSession) -> None:
    url = pods.urls[0]
    async with session.get(f"{url}/status/503") as response:
        assert response.status == 503
        assert await response.text() == "pod-1 503\n"
    async with session.get(f"{url}/status/204") as response:
        assert response.status == 204
        assert await response.read() == b""
    async with session.get(f"{url}/slow?ms=20") as response:
        assert (await response.json())["ms"] == 20
    async with session.get(f"{url}/healthz") as response:
        assert (response.status, await response.text()) == (200, "ok")
    async with session.post(f"{url}/healthz/fail") as response:
        assert response.status == 200
    async with session.get(f"{url}/healthz") as response:
        assert (response.status, await response.text()) == (503, "fail")
    async with session.post(f"{url}/healthz/ok") as response:
        assert response.status == 200
    async with session.get(f"{url}/healthz") as response:
        assert response.status == 200
    # Health probes do not count as traffic.
    assert pods.request_counts[0] == 3


async def test_stop_and_start_on_the_same_port(pods: PodSet) -> None:
    host, port = pods.addresses[1]
    async with aiohttp.ClientSession() as session, session.get(pods.urls[1]) as response:
        assert (await response.json())["request_count"] == 1

    await pods.stop(1)
    assert not pods.is_running(1)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, port)
    assert pods.addresses[1] == (host, port)

    await pods.start(1)
    assert pods.is_running(1)
    assert pods.addresses[1] == (host, port)
    async with aiohttp.ClientSession() as session, session.get(pods.urls[1]) as response:
        body = await response.json()
    assert body["pod"] == "pod-2"
    assert body["request_count"] == 2


async def test_fixed_ports_and_names() -> None:
    async with PodSet(1, names=["alpha"]) as first:
        port = first.addresses[0][1]
    async with PodSet(1, ports=[port], names=["beta"]) as pods:
        assert pods.addresses == [("127.0.0.1", port)]
        async with aiohttp.ClientSession() as session, session.get(pods.urls[0]) as response:
            assert (await response.json())["pod"] == "beta"
    with pytest.raises(ValueError, match="2 ports given for 1 pods"):
        PodSet(1, ports=[1, 2])


def test_parser_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.name) == ("0.0.0.0", 8080, None)


async def test_module_runs_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.demo",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--name",
        "cli-pod",
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        match = re.search(rb"pod cli-pod listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{int(match.group(1))}/") as response,
        ):
            assert (await response.json())["pod"] == "cli-pod"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
