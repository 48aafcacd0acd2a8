"""Access log: Envoy's default fields, text or JSON, and a slow reader never blocks the loop."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from proxy_process import article_yaml, eventually

from proxy.accesslog import MAX_BATCHES, AccessLog
from proxy.demo import PodSet
from proxy.exchange import Exchange
from proxy.istio import load_text
from proxy.server import Proxy, RunOptions

pytestmark = pytest.mark.timeout(60)

TEXT_LINE = re.compile(
    r'^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] "(\S+) (\S+) (HTTP/1\.[01])" (\d+) (\S+) '
    r'(\d+) (\d+) (\d+) - "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)"$'
)


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(2) as podset:
        yield podset


async def run_requests(pods: PodSet, fmt: str) -> tuple[list[str], list[dict[str, object]]]:
    stream = io.StringIO()
    options = RunOptions(listen=(("127.0.0.1", 0),), access_log=fmt, access_log_stream=stream)
    proxy = Proxy(load_text(article_yaml(pods.addresses)), options)
    await proxy.start()
    answers: list[dict[str, object]] = []
    try:
        host, port = proxy.addresses[0]
        async with aiohttp.ClientSession() as session:
            headers = {"Host": "test.com", "User-Agent": "probe/1.0", "X-Forwarded-For": "9.9.9.9"}
            async with session.post(
                f"http://{host}:{port}/upload?x=1", data=b"a" * 1234, headers=headers
            ) as resp:
                answers.append({"status": resp.status, "length": len(await resp.read())})
            async with session.get(f"http://{host}:{port}/", headers=headers) as resp:
                body = await resp.json()
                answers.append({"rid": body["headers"]["X-Request-ID"], "pod": body["pod"]})
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # rejected by http1: 400
        await reader.read()
        writer.close()
    finally:
        await proxy.stop(grace=2)
    return stream.getvalue().splitlines(), answers


async def test_text_lines_carry_envoys_default_fields(pods: PodSet) -> None:
    lines, answers = await run_requests(pods, "text")
    assert len(lines) == 3, lines
    upload, get, bad = (TEXT_LINE.match(line) for line in lines)
    assert upload is not None and get is not None and bad is not None, lines
    assert upload.group(2, 3, 4, 5, 6, 7) == ("POST", "/upload?x=1", "HTTP/1.1", "200", "-", "1234")
    assert int(upload.group(8)) == answers[0]["length"]
    assert upload.group(10, 11, 13) == ("9.9.9.9", "probe/1.0", "test.com")
    pod_keys = {f"{h}:{p}" for h, p in pods.addresses}
    assert upload.group(14) in pod_keys
    assert get.group(12) == answers[1]["rid"]  # the x-request-id the upstream received
    assert bad.group(5, 6) == ("400", "DPE")
    assert bad.group(14) == "-"
    stamp = time.strptime(get.group(1)[:19], "%Y-%m-%dT%H:%M:%S")
    assert abs(time.mktime(stamp) - time.mktime(time.gmtime())) < 60


async def test_json_lines_use_istios_keys(pods: PodSet) -> None:
    lines, answers = await run_requests(pods, "json")
    records = [json.loads(line) for line in lines]
    assert [r["response_code"] for r in records] == [200, 200, 400]
    upload, get, bad = records
    assert upload["method"] == "POST" and upload["path"] == "/upload?x=1"
    assert upload["bytes_received"] == 1234 and upload["protocol"] == "HTTP/1.1"
    assert upload["user_agent"] == "probe/1.0" and upload["authority"] == "test.com"
    assert get["request_id"] == answers[1]["rid"]
    assert bad["response_flags"] == "DPE" and bad["upstream_host"] is None
    assert set(get) >= {"start_time", "duration", "x_forwarded_for", "upstream_service_time"}


class StuckStream(io.StringIO):
    """A stdout whose reader stopped reading: write blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


async def test_a_stuck_reader_drops_batches_instead_of_blocking_the_loop() -> None:
    stream = StuckStream()
    log = AccessLog("text", stream)
    ex = Exchange(("127.0.0.1", 1), ("127.0.0.1", 80), asyncio.get_running_loop().time())
    ex.method, ex.target, ex.status = b"GET", b"/", 200
    started = time.monotonic()
    for _ in range(MAX_BATCHES + 10):
        log.log(ex)
        log.flush()
    assert time.monotonic() - started < 1.0  # never waited for the writer
    assert log.dropped >= 9
    stream.release.set()
    await asyncio.to_thread(log.close)
    assert len(stream.getvalue().splitlines()) == MAX_BATCHES + 10 - log.dropped


async def test_lines_are_flushed_on_a_timer_without_more_traffic() -> None:
    stream = io.StringIO()
    log = AccessLog("text", stream)
    ex = Exchange(("127.0.0.1", 1), ("127.0.0.1", 80), asyncio.get_running_loop().time())
    log.log(ex)
    await eventually(lambda: bool(stream.getvalue()), within=5)  # the writer thread wrote it
    assert stream.getvalue().startswith("[")
    log.close()
