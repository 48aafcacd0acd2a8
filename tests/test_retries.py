"""http1 retries, per-try timeouts, circuit breaking and outlier reports, against raw backends.

A *scripted* backend answers each request (in arrival order, across its connections) with the
next action of its script and records what it received, so every test can check exactly how
many times a request reached the server, and with which body.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Sequence

import pytest
from conftest import ForwardAll

from proxy.config import RetryPolicy
from proxy.pool import CircuitBreaker
from proxy.replies import CONNECT_FAILURE, CONNECTION_TERMINATION, OVERFLOW_TEXT
from proxy.retry import (
    RETRY_CONNECT_FAILURE,
    RETRY_RESET,
    RETRY_STATUS_CODES,
    RetryPlan,
    retry_plan,
)

pytestmark = pytest.mark.timeout(30)

DEFAULT = RetryPlan.from_policy(RetryPolicy())  # Istio's: 2 attempts, connect-failure, 503
NO_BACKOFF = 0.000001


class Script:
    """Actions: an int (that status, body "s<status>"), "reset" (RST after reading the
    request), "hang" (never answer), "close" (FIN after reading)."""

    def __init__(self, actions: Sequence[int | str]) -> None:
        self.actions = list(actions)
        self.requests: list[tuple[bytes, bytes]] = []  # (request line, body)
        self.arrived = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            lower = head.lower()
            if b"content-length:" in lower:
                length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
            elif b"transfer-encoding: chunked" in lower:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    body += (await reader.readexactly(size + 2))[:size]
                    if size == 0:
                        break
            self.requests.append((head.split(b"\r\n")[0], body))
            self.arrived.set()
            action = self.actions.pop(0) if self.actions else 200
            if action == "reset":
                writer.transport.abort()
                return
            if action == "close":
                writer.close()
                return
            if action == "hang":
                await reader.read()
                return
            assert isinstance(action, int)
            text = b"s%d" % action
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (action, len(text), text)
            )
            await writer.drain()


def plan(
    on: int = RETRY_STATUS_CODES | RETRY_CONNECT_FAILURE,
    codes: Sequence[int] = (503,),
    attempts: int = 2,
    **kwargs: object,
) -> RetryPlan:
    return RetryPlan(attempts, on, codes, backoff=NO_BACKOFF, **kwargs)  # type: ignore[arg-type]


async def post(client, body: bytes, path: str = "/") -> object:
    await client.send(
        b"POST %s HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), len(body), body)
    )
    return await client.read_response()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition that has no event to await (the proxy's internal queue)."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


class Recorder:
    """An outlier monitor that records every attempt's outcome."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def put(self, status: int) -> None:
        self.seen.append(status)


# --------------------------------------------------------------------------- the plan
def test_default_policy_plan() -> None:
    assert DEFAULT is not None
    assert DEFAULT.attempts == 2 and DEFAULT.statuses == {503}
    assert DEFAULT.on_connect and not DEFAULT.on_reset
    assert DEFAULT.connect_retries(3) == 2 and DEFAULT.connect_retries(1) == 0


def test_plan_expands_tokens_into_statuses() -> None:
    p = RetryPlan.from_policy(
        RetryPolicy(
            attempts=3,
            retry_on=("gateway-error", "retriable-4xx", "retriable-status-codes"),
            retriable_status_codes=(429,),
            per_try_timeout=0.5,
            retry_previous_hosts=False,
        )
    )
    assert p is not None
    assert p.statuses == {409, 429, 502, 503, 504}
    assert p.on_reset and p.on_connect and p.per_try_timeout == 0.5 and not p.other_hosts
    five = RetryPlan.from_policy(RetryPolicy(retry_on=("5xx",)))
    assert five is not None and five.statuses == frozenset(range(500, 600))
    grpc_only = RetryPlan.from_policy(RetryPolicy(retry_on=("unavailable", "refused-stream")))
    assert grpc_only is not None and not grpc_only.statuses and not grpc_only.on_connect


def test_plan_cached_per_policy_object_and_none_when_disabled() -> None:
    policy = RetryPolicy(attempts=4)
    assert retry_plan(policy) is retry_plan(policy)
    assert retry_plan(None) is None
    assert RetryPlan.from_policy(RetryPolicy(attempts=0)) is None


def test_backoff_is_jittered_and_capped() -> None:
    p = RetryPlan(5, RETRY_RESET, backoff=0.025)
    delays = [p.delay(n) for n in (1, 2, 10) for _ in range(50)]
    assert all(0 <= d < 0.25 for d in delays)
    assert max(p.delay(1) for _ in range(50)) < 0.025


# --------------------------------------------------------------------------- status retries
async def test_503_retried_on_the_same_pod(raw_backend, proxy, pools, raw_client):
    script = Script([503, 200])
    pool = pools(await raw_backend(script))
    dispatcher = ForwardAll(pool, retry=plan())
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"s200"
    assert len(script.requests) == 2
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.retries == 1 and ex.status == 200
    assert pool.opened == 1  # the dropped 503 was read to its end: its connection was reused


async def test_retries_exhausted_pass_the_last_503_through(raw_backend, proxy, pools, raw_client):
    script = Script([503, 503, 503, 200])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=plan())
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 503 and resp.body == b"s503"
    assert len(script.requests) == 3  # the first try and 2 retries


async def test_other_statuses_are_not_retried(raw_backend, proxy, pools, raw_client):
    script = Script([500, 200])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=plan())
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 500
    assert len(script.requests) == 1


async def test_status_retry_replays_a_buffered_body(raw_backend, proxy, pools, raw_client):
    script = Script([503, 503, 200])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=plan())
    client = await raw_client(await proxy(dispatcher))
    resp = await post(client, b"hello")
    assert resp.status == 200  # type: ignore[attr-defined]
    assert [body for _, body in script.requests] == [b"hello"] * 3
    await client.send(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    script.actions = [503, 200]
    assert (await client.read_response()).status == 200
    assert [body for _, body in script.requests[3:]] == [b"abcde", b"abcde"]


async def test_retry_to_other_hosts_uses_next_pool(raw_backend, proxy, pools, raw_client):
    first, second = Script([503]), Script([200])
    a, b = pools(await raw_backend(first)), pools(await raw_backend(second))
    dispatcher = ForwardAll(a, retry=plan(other_hosts=True), next_pool=lambda k: b)
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    assert len(first.requests) == len(second.requests) == 1
    assert dispatcher.finished_[0].upstream == b.key


# --------------------------------------------------------------------------- resets and bodies
async def test_reset_after_the_body_is_not_replayed_by_default(
    raw_backend, proxy, pools, raw_client
):
    script = Script(["reset", 200])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=DEFAULT)
    client = await raw_client(await proxy(dispatcher))
    resp = await post(client, b"pay once")
    assert resp.status == 503 and resp.body == CONNECTION_TERMINATION  # type: ignore[attr-defined]
    assert [body for _, body in script.requests] == [b"pay once"]


async def test_reset_replayed_when_retry_on_asks_and_the_body_was_held(
    raw_backend, proxy, pools, raw_client
):
    script = Script(["reset", 200])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=plan(RETRY_RESET))
    client = await raw_client(await proxy(dispatcher))
    resp = await post(client, b"again")
    assert resp.status == 200  # type: ignore[attr-defined]
    assert [body for _, body in script.requests] == [b"again", b"again"]


async def test_body_longer_than_the_replay_limit_is_never_replayed(
    raw_backend, proxy, pools, raw_client
):
    script = Script([503, 503, 200])
    limited = plan(replay_limit=16)
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=limited)
    client = await raw_client(await proxy(dispatcher))
    resp = await post(client, b"x" * 17)
    assert resp.status == 503  # type: ignore[attr-defined]
    assert len(script.requests) == 1
    resp = await post(client, b"x" * 16)  # within the limit: replayed
    assert resp.status == 200  # type: ignore[attr-defined]
    assert len(script.requests) == 3


async def test_large_body_streams_and_is_not_replayed(raw_backend, proxy, pools, raw_client):
    script = Script(["reset"])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=plan(RETRY_RESET))
    client = await raw_client(await proxy(dispatcher))
    body = b"y" * (256 * 1024)
    resp = await post(client, body)
    assert resp.status == 503  # type: ignore[attr-defined]
    assert len(script.requests) == 1 and script.requests[0][1] == body


# --------------------------------------------------------------------------- timeouts
async def test_per_try_timeout_retries_then_succeeds(raw_backend, proxy, pools, raw_client):
    script = Script(["hang", 200])
    timed = plan(RETRY_RESET, per_try_timeout=0.2)
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=timed, timeout=5.0)
    client = await raw_client(await proxy(dispatcher))
    started = time.monotonic()
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 200 and 0.2 <= time.monotonic() - started < 2.0
    assert len(script.requests) == 2


async def test_per_try_timeouts_exhausted_is_504(raw_backend, proxy, pools, raw_client):
    script = Script(["hang", "hang"])
    timed = plan(RETRY_RESET, per_try_timeout=0.1, attempts=1)
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=timed)
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 504 and resp.body == b"upstream request timeout"
    assert len(script.requests) == 2
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "UT"


async def test_route_timeout_bounds_all_attempts(raw_backend, proxy, pools, raw_client):
    script = Script(["hang", "hang", "hang"])
    timed = plan(RETRY_RESET, per_try_timeout=0.2)
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=timed, timeout=0.3)
    client = await raw_client(await proxy(dispatcher))
    started = time.monotonic()
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 504
    assert time.monotonic() - started < 0.6
    assert len(script.requests) == 2


# --------------------------------------------------------------------------- connect failures
async def test_connect_failures_share_the_attempt_budget(proxy, pools, raw_client):
    dead = [pools(dead_port()) for _ in range(3)]
    asked: list[int] = []

    def next_pool(k: int):
        asked.append(k)
        return dead[k]

    dispatcher = ForwardAll(dead[0], retry=plan(attempts=1), next_pool=next_pool, connect_retries=2)
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await client.read_response()
    assert resp.status == 503 and resp.body == CONNECT_FAILURE
    assert asked == [1]


async def test_every_attempt_reports_to_its_pools_monitor(raw_backend, proxy, pools, raw_client):
    script = Script([503, 200])
    dead, live = pools(dead_port()), pools(await raw_backend(script))
    dead.monitor, live.monitor = Recorder(), Recorder()
    dispatcher = ForwardAll(dead, retry=plan(), next_pool=lambda k: live, connect_retries=2)
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    assert dead.monitor.seen == [503]
    assert live.monitor.seen == [503, 200]


# --------------------------------------------------------------------------- circuit breaking
async def test_overflow_beyond_max_connections_and_pending(raw_backend, proxy, pools, raw_client):
    release = asyncio.Event()
    arrived: list[bytes] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            arrived.append(await reader.readuntil(b"\r\n\r\n"))
            if len(arrived) == 1:
                await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    breaker = CircuitBreaker(max_connections=1, max_pending=1)
    pool = pools(await raw_backend(slow), breaker=breaker)
    dispatcher = ForwardAll(pool)
    port = await proxy(dispatcher)
    first, second, third = [await raw_client(port) for _ in range(3)]
    await first.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    await until(lambda: bool(arrived))
    await second.send(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")  # queued: pending 1 of 1
    await until(lambda: pool.waiting == 1)
    await third.send(b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await third.read_response()
    assert resp.status == 503 and resp.body == OVERFLOW_TEXT
    release.set()
    assert (await first.read_response()).status == 200
    assert (await second.read_response()).status == 200  # on the first one's connection
    assert pool.opened == 1 and breaker.overflows == 1
    assert "UO" in [ex.flags for ex in await dispatcher.wait_finished(3)]
    assert breaker.pending == 0 and breaker.connections == 1


async def test_max_retries_breaker_stops_retrying(raw_backend, proxy, pools, raw_client):
    script = Script([503, 200])
    breaker = CircuitBreaker(max_retries=0)
    dispatcher = ForwardAll(pools(await raw_backend(script), breaker=breaker), retry=plan())
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 503
    assert len(script.requests) == 1 and breaker.retries == 0


async def test_breaker_counts_return_to_zero(raw_backend, proxy, pools, raw_client):
    script = Script([503, "reset", 200, 200])
    breaker = CircuitBreaker(max_connections=4)
    pool = pools(await raw_backend(script), breaker=breaker)
    dispatcher = ForwardAll(pool, retry=plan(RETRY_RESET | RETRY_STATUS_CODES, attempts=3))
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    await dispatcher.wait_finished(1)
    assert breaker.retries == 0 and breaker.pending == 0
    assert breaker.connections == pool.connections == pool.idle_count == 1


async def test_queued_request_leaves_the_queue_when_its_client_goes(
    raw_backend, proxy, pools, raw_client
):
    arrived = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await reader.read()

    breaker = CircuitBreaker(max_connections=1)
    pool = pools(await raw_backend(hold), breaker=breaker)
    dispatcher = ForwardAll(pool)
    port = await proxy(dispatcher)
    first, second = [await raw_client(port) for _ in range(2)]
    await first.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    await arrived.wait()
    await second.send(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    await until(lambda: pool.waiting == 1)
    sock = second.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    second.writer.transport.abort()  # RST: gone (after a FIN the request is still answered)
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.flags == "DC" and ex.target == b"/2"
    assert pool.waiting == 0 and breaker.pending == 0


async def test_upstream_idle_connections_close_after_the_idle_timeout(
    raw_backend, proxy, pools, raw_client
):
    closed = asyncio.Event()

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        assert await reader.read() == b""  # our FIN, not a request
        closed.set()

    pool = pools(await raw_backend(once), idle_timeout=0.1)
    client = await raw_client(await proxy(ForwardAll(pool)))
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    async with asyncio.timeout(5):
        await closed.wait()
    assert pool.idle_count == 0 and pool.connections == 0


async def test_expiry_closes_only_the_connections_idle_past_the_timeout(
    raw_backend, proxy, pools, raw_client
):
    arrived = 0
    both = asyncio.Event()

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal arrived
        while await reader.readuntil(b"\r\n\r\n"):
            arrived += 1
            if arrived == 2:
                both.set()
            await both.wait()  # two requests in flight at once: two pooled connections
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    pool = pools(await raw_backend(pod), idle_timeout=3600)
    port = await proxy(ForwardAll(pool))
    clients = [await raw_client(port), await raw_client(port)]
    for client in clients:
        await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    for client in clients:
        assert (await client.read_response()).status == 200
    assert pool.idle_count == 2
    old, recent = pool._idle
    now = asyncio.get_running_loop().time()
    old.idle_since, recent.idle_since = now - 7200, now
    pool._expire()
    assert pool._idle == [recent] and old.closed and not recent.closed


# ---------------------------------------------------------------- methods (RFC 9110 §9.2.2)
async def test_default_policy_never_resends_a_post_that_reached_the_pod(
    raw_backend, proxy, pools, raw_client
):
    # Istio's implicit default would send this POST three times; a proxy must not retry a
    # non-idempotent request on its own once it may have been processed.
    script = Script([503, 200])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=DEFAULT)
    client = await raw_client(await proxy(dispatcher))
    resp = await post(client, b"pay once")
    assert resp.status == 503 and resp.body == b"s503"  # type: ignore[attr-defined]
    assert [body for _, body in script.requests] == [b"pay once"]
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.retries == 0 and ex.replays == 0


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE"])
async def test_default_policy_resends_idempotent_requests(
    raw_backend, proxy, pools, raw_client, method
):
    script = Script([503, 200])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=DEFAULT)
    client = await raw_client(await proxy(dispatcher))
    await client.send(method + b" / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    assert (await client.read_response()).status == 200
    assert len(script.requests) == 2
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.retries == 1 and ex.replays == 1


async def test_explicit_retries_resend_a_post_as_istio_does(raw_backend, proxy, pools, raw_client):
    asked = RetryPlan.from_policy(RetryPolicy(explicit=True))
    assert asked is not None and asked.explicit and not DEFAULT.explicit  # type: ignore[union-attr]
    script = Script([503, 200])
    dispatcher = ForwardAll(pools(await raw_backend(script)), retry=asked)
    client = await raw_client(await proxy(dispatcher))
    resp = await post(client, b"again")
    assert resp.status == 200  # type: ignore[attr-defined]
    assert [body for _, body in script.requests] == [b"again", b"again"]
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.replays == 1


async def test_connect_failure_moves_a_post_on_even_by_default(
    raw_backend, proxy, pools, raw_client
):
    script = Script([200])
    live = pools(await raw_backend(script))
    dispatcher = ForwardAll(pools(dead_port()), retry=DEFAULT, next_pool=lambda k: live,
                             connect_retries=1)  # fmt: skip
    client = await raw_client(await proxy(dispatcher))
    resp = await post(client, b"sent once")
    assert resp.status == 200  # type: ignore[attr-defined]
    assert [body for _, body in script.requests] == [b"sent once"]
    (ex,) = await dispatcher.wait_finished(1)
    assert ex.retries == 1 and ex.replays == 0  # nothing had been sent: not a replay


def stale_once_backend(requests: list[bytes]):
    """Answers the first request of its first connection, then drops that connection as the
    second request arrives (a keep-alive race); answers everything on later connections."""

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = not requests
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            requests.append(head.split(b"\r\n")[0])
            if first and len(requests) == 2:
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return upstream


@pytest.mark.parametrize(
    ("method", "retry", "resent"),
    [
        (b"GET", None, True),
        (b"POST", None, False),
        (b"POST", DEFAULT, False),
        (b"POST", RetryPlan(2, RETRY_RESET, backoff=NO_BACKOFF), True),
    ],
    ids=["get", "post", "post-default-policy", "post-explicit-reset"],
)
async def test_stale_connection_resend_only_when_safe(
    raw_backend, proxy, pools, raw_client, method, retry, resent
):
    requests: list[bytes] = []
    dispatcher = ForwardAll(pools(await raw_backend(stale_once_backend(requests))), retry=retry)
    client = await raw_client(await proxy(dispatcher))
    await client.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.read_response()).status == 200
    await client.send(method + b" /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    resp = await client.read_response()
    if resent:
        assert resp.status == 200 and len(requests) == 3
    else:
        assert resp.status == 503 and resp.body == CONNECTION_TERMINATION
        assert len(requests) == 2
    done = await dispatcher.wait_finished(2)
    assert done[1].replays == (1 if resent else 0)
