"""Sessions that survive change, end to end: the proxy as a process, real demo pods.

Persistent sessions (Istio's ``istio.io/persistent-session`` label, Envoy's cookie), draining
endpoints, strict mode, bounded load and sticky weighted splits, each shown the way the issue
asks: pods started and stopped, the config reloaded with SIGHUP, every request a real one.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from proxy_process import (
    OPS_LOCAL,
    OPS_PORTS,
    ProxyProcess,
    gateway_yaml,
    proxy_process,
    sample_sum,
    scrape,
)

from proxy.demo import PodSet
from proxy.hashing import Maglev, RingHash, xxh64
from proxy.sessions import decode_message, encode_value

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

HOST = "app.test"
COOKIE = "sticky-session"


def session_yaml(
    pods: list[tuple[str, int]],
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    traffic_policy: str = "",
    dr_annotations: str = "",
) -> str:
    """Gateway, VirtualService app.test -> app.local:80, and the ServiceEntry of ``pods``."""
    label_text = ", ".join(f"{k}: {v!r}" for k, v in (labels or {}).items())
    annotation_text = ", ".join(f"{k}: {v!r}" for k, v in (annotations or {}).items())
    endpoints = "".join(
        f"  - {{address: {host}, ports: {{http: {port}}}}}\n" for host, port in pods
    )
    rule = ""
    if traffic_policy:
        rule = f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: app, annotations: {{{dr_annotations}}}}}
spec:
  host: app.local
  trafficPolicy: {traffic_policy}
"""
    return f"""{gateway_yaml("gw")}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: [{HOST}]
  gateways: [gw]
  http: [{{route: [{{destination: {{host: app.local, port: {{number: 80}}}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: app
  labels: {{{label_text}}}
  annotations: {{{annotation_text}}}
spec:
  hosts: [app.local]
  ports: [{{number: 80, name: http}}]
  resolution: STATIC
  endpoints:
{endpoints}{rule}"""


PERSISTENT = {"istio.io/persistent-session": COOKIE}


def address_of(value: str) -> str:
    """The ``ip:port`` an Envoy session cookie value names."""
    decoded = decode_message(base64.b64decode(value))
    assert decoded is not None
    return decoded[0]


def issued(resp: aiohttp.ClientResponse, name: str = COOKIE) -> str | None:
    """The value of the ``name`` cookie a response sets (quotes off), else None."""
    for header in resp.headers.getall("Set-Cookie", []):
        pair = header.split(";", 1)[0]
        key, _, value = pair.partition("=")
        if key.strip() == name:
            return value.strip().strip('"')
    return None


class Client:
    """Requests through the proxy with an explicit Cookie header (no cookie jar)."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.url = f"http://127.0.0.1:{port}/"

    async def get(self, cookie: str | None = None, **headers: str) -> tuple[int, str, str | None]:
        """(status, pod, the session cookie issued)."""
        sent = {"Host": HOST, **headers}
        if cookie is not None:
            sent["Cookie"] = f'{COOKIE}="{cookie}"'
        async with self.session.get(self.url, headers=sent) as resp:
            body = await resp.read()
            pod = (await resp.json())["pod"] if resp.status == 200 else body.decode()
            return resp.status, pod, issued(resp)


async def reload(proxy: ProxyProcess) -> None:
    start = len(proxy.lines)
    proxy.signal(signal.SIGHUP)
    await proxy.wait_for(r"reload: configuration applied", start=start)


@asynccontextmanager
async def start_proxy(config: Path) -> AsyncIterator[tuple[ProxyProcess, Client, int]]:
    async with (
        proxy_process(
            str(config), "--listen", "127.0.0.1:0", *OPS_PORTS, *OPS_LOCAL,
            "--access-log", "off", "--drain-time", "0",
        ) as proxy,
        aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), connector=aiohttp.TCPConnector(limit=0)
        ) as session,
    ):  # fmt: skip
        port = await proxy.port("")
        metrics = await proxy.port("metrics")
        await proxy.wait_for("admin listening on")
        yield proxy, Client(session, port), metrics


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(5) as podset:
        yield podset


def names_by_address(pods: PodSet) -> dict[str, str]:
    return {f"{h}:{p}": name for name, (h, p) in zip(pods.names, pods.addresses, strict=True)}


# --------------------------------------------------------------------------- persistent cookie


async def test_persistent_cookie_names_the_pod_and_adding_pods_moves_no_session(
    pods: PodSet, tmp_path: Path
) -> None:
    config = tmp_path / "istio.yaml"
    config.write_text(session_yaml(pods.addresses[:3], labels=PERSISTENT))
    where = names_by_address(pods)
    async with start_proxy(config) as (proxy, client, metrics):
        # (The value names the pod, so every session of a pod carries the same cookie.)
        sessions: list[tuple[str, str]] = []  # (cookie, pod) of each visitor
        for _ in range(300):
            status, pod, cookie = await client.get()
            assert status == 200 and cookie is not None, (status, pod)
            assert where[address_of(cookie)] == pod  # the value decodes to the pod's ip:port
            sessions.append((cookie, pod))
        assert {pod for _, pod in sessions} == {"pod-1", "pod-2", "pod-3"}

        config.write_text(session_yaml(pods.addresses, labels=PERSISTENT))  # 2 more pods
        await reload(proxy)
        moved = 0
        for cookie, pod in sessions:
            status, now, again = await client.get(cookie)
            assert status == 200 and again is None  # Envoy sets it only for a new pod
            moved += now != pod
        assert moved == 0
        newcomers = Counter([(await client.get())[1] for _ in range(300)])
        assert set(newcomers) == set(pods.names)
        assert min(newcomers.values()) >= 25, newcomers

        text = await scrape(client.session, metrics)
        assert sample_sum(text, "sticky_persistent_sessions_routed_total") == 300
        assert sample_sum(text, "sticky_persistent_sessions_repicked_total") == 0


# --------------------------------------------------------------------------- draining


async def test_a_removed_pod_keeps_its_sessions_until_it_stops(
    pods: PodSet, tmp_path: Path
) -> None:
    config = tmp_path / "istio.yaml"
    drain = {"sticky-proxy/session-drain": "30s"}
    config.write_text(session_yaml(pods.addresses[:3], labels=PERSISTENT, annotations=drain))
    async with start_proxy(config) as (proxy, client, metrics):
        sessions = []
        for _ in range(90):
            _, pod, cookie = await client.get()
            assert cookie is not None
            sessions.append((cookie, pod))
        of_pod1 = [c for c, pod in sessions if pod == "pod-1"]
        assert len(of_pod1) >= 10

        # pod-1 leaves the configuration but still runs: its sessions stay on it.
        config.write_text(session_yaml(pods.addresses[1:3], labels=PERSISTENT, annotations=drain))
        await reload(proxy)
        await proxy.wait_for(r"draining for 30s")
        for cookie, pod in sessions:
            status, now, again = await client.get(cookie)
            assert (status, now, again) == (200, pod, None)
        visitors = Counter([(await client.get())[1] for _ in range(100)])
        assert "pod-1" not in visitors and set(visitors) == {"pod-2", "pod-3"}

        # pod-1 stops: its sessions move at once (not after 30 s), with a new cookie, no error.
        await pods.stop(0)
        moved = []
        for cookie in of_pod1:
            status, now, again = await client.get(cookie)
            assert status == 200 and now in ("pod-2", "pod-3")
            assert again is not None and address_of(again) != address_of(cookie)
            moved.append((again, now))
        for cookie, pod in moved:  # and the new cookie sticks
            assert (await client.get(cookie))[:2] == (200, pod)
        await proxy.wait_for(r"stopped draining: connect failure")

        text = await scrape(client.session, metrics)
        assert sample_sum(text, "sticky_persistent_sessions_draining_total") >= len(of_pod1)


# --------------------------------------------------------------------------- strict mode


async def test_strict_answers_503_for_a_gone_pod_and_non_strict_re_picks(
    pods: PodSet, tmp_path: Path
) -> None:
    config = tmp_path / "istio.yaml"
    strict = {"sticky-proxy/persistent-session-strict": "true"}
    config.write_text(session_yaml(pods.addresses[:2], labels=PERSISTENT, annotations=strict))
    async with start_proxy(config) as (proxy, client, metrics):
        cookie = None
        while cookie is None:
            _, pod, issued_cookie = await client.get()
            if pod == "pod-1":
                cookie = issued_cookie
        assert cookie is not None
        config.write_text(session_yaml(pods.addresses[1:2], labels=PERSISTENT, annotations=strict))
        await reload(proxy)
        status, body, again = await client.get(cookie)
        assert (status, body, again) == (503, "no healthy upstream", None)
        assert (await client.get())[:2] == (200, "pod-2")  # no cookie: the balancer picks

        config.write_text(session_yaml(pods.addresses[1:2], labels=PERSISTENT))
        await reload(proxy)
        status, pod, again = await client.get(cookie)
        assert (status, pod) == (200, "pod-2")
        assert again is not None and address_of(again) == "{}:{}".format(*pods.addresses[1])

        text = await scrape(client.session, metrics)
        assert sample_sum(text, "sticky_persistent_sessions_repicked_total", reason="gone") == 2


# --------------------------------------------------------------------------- bounded load


class HeldPods:
    """Three backends that hold every request until released and count those in flight."""

    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.addresses: list[tuple[str, int]] = []
        self._runners: list[web.AppRunner] = []

    def app(self, name: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.in_flight[name] += 1
            self.arrived.set()
            try:
                if request.query.get("hold"):
                    await self.release.wait()
            finally:
                self.in_flight[name] -= 1
            return web.json_response({"pod": name})

        app = web.Application()
        app.router.add_get("/", handle)
        return app

    async def start(self, count: int) -> None:
        for i in range(count):
            runner = web.AppRunner(self.app(f"pod-{i + 1}"), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            port = runner.addresses[0][1]
            self.addresses.append(("127.0.0.1", port))

    async def close(self) -> None:
        self.release.set()
        for runner in self._runners:
            await runner.cleanup()


@pytest.mark.parametrize("algorithm", ["ring", "maglev"])
async def test_bounded_load_caps_a_hot_pod_and_keys_come_back(
    tmp_path: Path, algorithm: str
) -> None:
    held = HeldPods()
    await held.start(3)
    try:
        keys = {f"{h}:{p}": f"pod-{i + 1}" for i, (h, p) in enumerate(held.addresses)}
        if algorithm == "ring":
            hashing = "{consistentHash: {httpHeaderName: x-user}}"
            balancer: RingHash | Maglev = RingHash(dict.fromkeys(sorted(keys), 1), 1024)
        else:
            hashing = "{consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}"
            balancer = Maglev(dict.fromkeys(sorted(keys), 1), 65537)
        target = keys[balancer.pick(xxh64("user-0"))]
        users = [u for u in (f"user-{i}" for i in range(3000))
                 if keys[balancer.pick(xxh64(u))] == target][:30]  # fmt: skip
        config = tmp_path / "istio.yaml"
        config.write_text(
            session_yaml(
                held.addresses,
                traffic_policy=f"{{loadBalancer: {hashing}}}",
                dr_annotations="sticky-proxy/hash-balance-factor: '125'",
            )
        )
        async with start_proxy(config) as (_, client, metrics):
            pending = []
            peak: Counter[str] = Counter()
            for n, user in enumerate(users):
                held.arrived.clear()
                request = client.session.get(
                    client.url + "?hold=1", headers={"Host": HOST, "x-user": user}
                )
                pending.append(asyncio.ensure_future(request))
                await held.arrived.wait()  # in flight at its pod before the next one starts
                for pod, count in held.in_flight.items():
                    peak[pod] = max(peak[pod], count)
                # Envoy's cap: a pod takes a request while its load is within its slots.
                slots = -(-(((n + 1) * 125 + 99) // 100) // 3)
                assert max(held.in_flight.values()) <= slots + 1
            assert sum(held.in_flight.values()) == 30
            # 1.25 x the mean of 10 is 13 slots; the pod holding 13 may take one more (Envoy
            # does not count the request being placed): the hot pod ends at 14, the rest spill.
            assert held.in_flight[target] == peak[target] == 14
            assert max(peak.values()) <= 14
            held.release.set()
            for response in await asyncio.gather(*pending):
                assert response.status == 200
                response.release()
            text = await scrape(client.session, metrics)
            assert sample_sum(text, "sticky_bounded_load_spilled_total") == 30 - 14
            # The load is gone: every key is back on its hashed pod.
            for user in users:
                async with client.session.get(
                    client.url, headers={"Host": HOST, "x-user": user}
                ) as resp:
                    assert (await resp.json())["pod"] == target
    finally:
        await held.close()


# --------------------------------------------------------------------------- sticky weights


def canary_yaml(pods: list[tuple[str, int]], *, sticky: bool) -> str:
    annotation = "{sticky-proxy/sticky-weights: 'true'}" if sticky else "{}"
    endpoints = "".join(
        f"  - {{address: {h}, ports: {{http: {p}}}, labels: {{version: v{1 + i % 2}}}}}\n"
        for i, (h, p) in enumerate(pods)
    )
    return f"""{gateway_yaml("gw")}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, annotations: {annotation}}}
spec:
  hosts: [{HOST}]
  gateways: [gw]
  http:
  - route:
    - {{destination: {{host: app.local, subset: v1, port: {{number: 80}}}}, weight: 50}}
    - {{destination: {{host: app.local, subset: v2, port: {{number: 80}}}}, weight: 50}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: app}}
spec:
  host: app.local
  trafficPolicy: {{loadBalancer: {{consistentHash: {{httpCookie: {{name: ISTIOID, ttl: 0s}}}}}}}}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: app}}
spec:
  hosts: [app.local]
  ports: [{{number: 80, name: http}}]
  resolution: STATIC
  endpoints:
{endpoints}"""


async def canary_sessions(client: Client, version: dict[str, str]) -> list[set[str]]:
    """200 sessions of 10 requests each: the subsets each session was served by.

    Every request has a connection of its own, as browsers do: the cookie the proxy invents
    for a first visit is made from the connection's addresses.
    """
    seen: list[set[str]] = []
    fresh = aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), connector=aiohttp.TCPConnector(force_close=True)
    )
    async with fresh:
        for _ in range(200):
            seen.append(await canary_session(fresh, client.url, version))
    return seen


async def canary_session(
    session: aiohttp.ClientSession, url: str, version: dict[str, str]
) -> set[str]:
    cookie = None
    subsets = set()
    for _ in range(10):
        headers = {"Host": HOST}
        if cookie is not None:
            headers["Cookie"] = f"ISTIOID={cookie}"
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200
            subsets.add(version[(await resp.json())["pod"]])
            cookie = cookie or issued(resp, "ISTIOID")
    return subsets


@pytest.mark.parametrize("sticky", [True, False])
async def test_sticky_weights_keep_every_session_on_one_subset(
    pods: PodSet, tmp_path: Path, sticky: bool
) -> None:
    config = tmp_path / "istio.yaml"
    config.write_text(canary_yaml(pods.addresses[:4], sticky=sticky))
    version = {name: f"v{1 + i % 2}" for i, name in enumerate(pods.names[:4])}
    async with start_proxy(config) as (_, client, _):
        seen = await canary_sessions(client, version)
    if sticky:
        assert all(len(subsets) == 1 for subsets in seen)
        share = sum(subsets == {"v1"} for subsets in seen) / len(seen)
        assert 0.40 <= share <= 0.60, share
    else:  # Istio's random pick per request: sessions bounce between v1 and v2
        assert sum(len(subsets) == 2 for subsets in seen) > 150


# --------------------------------------------------------------------------- forms and values


async def test_header_form_signed_values_and_expiry(pods: PodSet, tmp_path: Path) -> None:
    key = tmp_path / "session.key"
    key.write_bytes(b"an HMAC key of at least 16 bytes\n")
    config = tmp_path / "istio.yaml"
    signed = {"sticky-proxy/persistent-session-key-file": str(key)}
    header = {"istio.io/persistent-session-header": "x-session"}
    config.write_text(session_yaml(pods.addresses[:2], labels=header, annotations=signed))
    where = names_by_address(pods)
    async with start_proxy(config) as (proxy, client, metrics):
        url = client.url
        async with client.session.get(url, headers={"Host": HOST}) as resp:
            value = resp.headers["x-session"]
            pod = (await resp.json())["pod"]
        raw = base64.b64decode(value)
        assert decode_message(raw) is not None and where[address_of(value)] == pod  # signed msg
        for _ in range(5):
            async with client.session.get(url, headers={"Host": HOST, "x-session": value}) as r:
                assert (await r.json())["pod"] == pod and "x-session" not in r.headers
        # A client that writes another pod's address without the key is not believed.
        other = next(a for a, name in where.items() if name != pod and name in ("pod-1", "pod-2"))
        forged = base64.b64encode(b"\x0a" + bytes([len(other)]) + other.encode()).decode()
        async with client.session.get(url, headers={"Host": HOST, "x-session": forged}) as resp:
            assert resp.status == 200 and resp.headers.get("x-session") is not None
        text = await scrape(client.session, metrics)
        assert (
            sample_sum(text, "sticky_persistent_sessions_repicked_total", reason="bad_signature")
            == 1
        )

        # The cookie form with a TTL: an expired value (wall clock) is re-picked, with Max-Age.
        ttl = {"sticky-proxy/persistent-session-ttl": "60s"}
        config.write_text(session_yaml(pods.addresses[:2], labels=PERSISTENT, annotations=ttl))
        await reload(proxy)
        status, pod, cookie = await client.get()
        assert status == 200 and cookie is not None
        address, expires = decode_message(base64.b64decode(cookie)) or ("", 0)
        assert where[address] == pod and abs(expires - (time.time() + 60)) < 5
        stale = encode_value(address, int(time.time()) - 10, cookie=True, key=None)
        async with client.session.get(
            url, headers={"Host": HOST, "Cookie": f'{COOKIE}="{stale}"'}
        ) as resp:
            assert resp.status == 200
            assert "Max-Age=60; Path=/; HttpOnly" in resp.headers["Set-Cookie"]
        text = await scrape(client.session, metrics)
        assert sample_sum(text, "sticky_persistent_sessions_repicked_total", reason="expired") == 1


async def test_route_and_admin_route_explain_a_draining_session(
    pods: PodSet, tmp_path: Path
) -> None:
    config = tmp_path / "istio.yaml"
    drain = {"sticky-proxy/session-drain": "30s"}
    config.write_text(session_yaml(pods.addresses[:2], labels=PERSISTENT, annotations=drain))
    first = "{}:{}".format(*pods.addresses[0])
    cookie = encode_value(first, 0, cookie=True, key=None)
    async with start_proxy(config) as (proxy, client, _):
        admin = await proxy.port("admin")
        query = {"host": HOST, "cookie": f"{COOKIE}={cookie}"}
        async with client.session.get(f"http://127.0.0.1:{admin}/route", params=query) as resp:
            answer = await resp.json()
        assert answer["endpoint"] == first
        assert answer["persistent_session"]["pod_state"] == "healthy"
        config.write_text(session_yaml(pods.addresses[1:2], labels=PERSISTENT, annotations=drain))
        await reload(proxy)
        async with client.session.get(f"http://127.0.0.1:{admin}/route", params=query) as resp:
            answer = await resp.json()
        assert answer["endpoint"] == first
        assert answer["persistent_session"]["pod_state"].startswith("draining, ")
        assert answer["persistent_session"]["value"] == f"names a pod: {first}"
