"""The whole proxy, end to end: the article's YAML, real demo pods, real sockets on 127.0.0.1.

Every expectation about *which* pod answers is computed independently with ``proxy.hashing``
(Envoy's ring or Maglev over the pods' "ip:port" keys), so these tests prove Istio parity through
the running proxy, not just that requests come back.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest
from conftest import LOOPBACK, running

from proxy.affinity import format_address, generated_cookie_value
from proxy.config import Config
from proxy.demo import PodSet
from proxy.hashing import Maglev, RingHash, xxh64
from proxy.istio import load_config, load_text
from proxy.quick import QuickOptions, quick_config
from proxy.server import Proxy, RunOptions

pytestmark = pytest.mark.timeout(60)

ARTICLE = (Path(__file__).parent.parent / "config" / "sticky.yaml").read_text()


def service_entry(pods: Sequence[tuple[str, int]], resolution: str = "STATIC") -> str:
    endpoints = "".join(f"  - address: {h}\n    ports:\n      http: {p}\n" for h, p in pods)
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        "metadata:\n  name: test2-bwce-srv\nspec:\n"
        "  hosts:\n  - test2-bwce-srv.default.svc.cluster.local\n"
        "  ports:\n  - number: 8080\n    name: http\n    protocol: HTTP\n"
        f"  resolution: {resolution}\n  endpoints:\n{endpoints}"
    )


def article_config(pods: Sequence[tuple[str, int]], extra: str = "") -> Config:
    return load_text(ARTICLE + "\n---\n" + service_entry(pods) + extra, "article")


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(3) as podset:
        yield podset


def keys(pods: PodSet) -> list[str]:
    return [f"{h}:{p}" for h, p in pods.addresses]


def pod_of(pods: PodSet, key: str) -> str:
    return pods.names[keys(pods).index(key)]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


async def get_pod(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> str:
    async with session.get(url, headers={"Host": "test.com", **(headers or {})}) as resp:
        assert resp.status == 200, await resp.text()
        pod = (await resp.json())["pod"]
        assert isinstance(pod, str)
        return pod


async def test_first_response_sets_envoy_cookie_and_the_session_sticks(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    async with running(article_config(pods.addresses)) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            local = writer.get_extra_info("sockname")
            writer.write(b"GET / HTTP/1.1\r\nHost: test.com\r\n\r\n")
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
        finally:
            writer.close()
        value = generated_cookie_value(format_address(*local[:2]), f"{host}:{port}")
        set_cookie = [
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("set-cookie:")
        ]
        assert set_cookie == [f'ISTIOID="{value}"; Max-Age=60; HttpOnly']
        expected = pod_of(pods, RingHash(dict.fromkeys(keys(pods), 1)).pick(xxh64(value)))
        seen = {await get_pod(session, url, {"Cookie": f'ISTIOID="{value}"'}) for _ in range(50)}
        assert seen == {expected}


async def test_300_cookies_land_where_istios_default_ring_puts_them(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    ring = RingHash(dict.fromkeys(keys(pods), 1), minimum_ring_size=1024)
    async with running(article_config(pods.addresses)) as url:
        landed: Counter[str] = Counter()
        for i in range(300):
            cookie = f"session-{i}"
            pod = await get_pod(session, url, {"Cookie": f"other=1; ISTIOID={cookie}"})
            assert pod == pod_of(pods, ring.pick(xxh64(cookie))), cookie
            landed[pod] += 1
    assert set(landed) == set(pods.names)
    assert min(landed.values()) > 50  # 100 each on average


async def test_a_request_with_the_cookie_gets_no_new_one(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    async with running(article_config(pods.addresses)) as url:
        async with session.get(url, headers={"Host": "test.com", "Cookie": "ISTIOID=x"}) as r:
            assert r.status == 200 and "Set-Cookie" not in r.headers
        async with session.get(url, headers={"Host": "test.com"}) as r:
            assert r.headers["Set-Cookie"].startswith('ISTIOID="')


@pytest.mark.parametrize(
    ("options", "headers", "path", "key"),
    [
        (dict(header="x-user"), {"x-user": "alice"}, "/", "alice"),
        (dict(query="user"), {}, "/cart?user=bob&user=eve", "bob"),
        (dict(header="x-user", maglev=True), {"x-user": "carol"}, "/", "carol"),
        (dict(maglev=True), {"Cookie": "ISTIOID=dave"}, "/", "dave"),
    ],
    ids=["header", "query", "maglev-header", "maglev-cookie"],
)
async def test_hash_policies_route_as_envoy_would(
    pods: PodSet,
    session: aiohttp.ClientSession,
    options: dict[str, object],
    headers: dict[str, str],
    path: str,
    key: str,
) -> None:
    config = quick_config(QuickOptions(upstreams=tuple(pods.addresses), port=80, **options))  # type: ignore[arg-type]
    weights = dict.fromkeys(keys(pods), 1)
    balancer = Maglev(weights) if options.get("maglev") else RingHash(weights)
    async with running(config) as url:
        for i in range(20):
            k = f"{key}{i}"
            sent = {n: v.replace(key, k) for n, v in headers.items()}
            got = await get_pod(session, url + path.replace(key, k), sent)
            assert got == pod_of(pods, balancer.pick(xxh64(k))), k


async def test_source_ip_policy_uses_the_client_address(pods: PodSet) -> None:
    config = quick_config(QuickOptions(upstreams=tuple(pods.addresses), port=80, source_ip=True))
    ring = RingHash(dict.fromkeys(keys(pods), 1))
    async with running(config) as url:
        for last in range(1, 21):
            client_ip = f"127.0.0.{last}"
            connector = aiohttp.TCPConnector(local_addr=(client_ip, 0))
            async with aiohttp.ClientSession(connector=connector) as s:
                pods_seen = {await get_pod(s, url) for _ in range(3)}
            assert pods_seen == {pod_of(pods, ring.pick(xxh64(client_ip)))}


async def test_unknown_host_is_404_no_route(pods: PodSet, session: aiohttp.ClientSession) -> None:
    async with (
        running(article_config(pods.addresses)) as url,
        session.get(url, headers={"Host": "other.com"}) as resp,
    ):
        assert resp.status == 404


async def test_no_endpoints_is_503_no_healthy_upstream(session: aiohttp.ClientSession) -> None:
    config = load_text(ARTICLE + "\n---\n" + service_entry([("nonexistent.invalid", 80)], "DNS"))
    async with running(config) as url, session.get(url, headers={"Host": "test.com"}) as resp:
        assert resp.status == 503
        assert await resp.text() == "no healthy upstream"


async def test_every_pod_down_is_503_connect_error(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    async with running(article_config(pods.addresses)) as url:
        for i in range(3):
            await pods.stop(i)
        async with session.get(url, headers={"Host": "test.com"}) as resp:
            assert resp.status == 503
            assert await resp.text() == (
                "upstream connect error or disconnect/reset before headers. "
                "reset reason: connection failure"
            )


async def test_dead_pod_with_nothing_sent_goes_to_the_next_ring_endpoint(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    async with running(article_config(pods.addresses)) as url:
        await pods.stop(0)
        for i in range(30):
            assert await get_pod(session, url, {"Cookie": f"ISTIOID=s{i}"}) != pods.names[0]


async def test_route_timeout_is_504(pods: PodSet, session: aiohttp.ClientSession) -> None:
    timed = ARTICLE.replace(
        "    route:\n    - destination:", "    timeout: 0.2s\n    route:\n    - destination:"
    )
    assert timed != ARTICLE
    config = load_text(timed + "\n---\n" + service_entry(pods.addresses))
    async with (
        running(config) as url,
        session.get(url + "/slow?ms=3000", headers={"Host": "test.com"}) as resp,
    ):
        assert resp.status == 504
        assert await resp.text() == "upstream request timeout"


async def test_websocket_through_the_proxy_keeps_the_session(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    ring = RingHash(dict.fromkeys(keys(pods), 1))
    async with running(article_config(pods.addresses)) as url:
        headers = {"Host": "test.com", "Cookie": "ISTIOID=ws-user"}
        async with session.ws_connect(url + "/ws", headers=headers) as ws:
            hello = json.loads((await ws.receive(timeout=5)).data)
            assert hello["pod"] == pod_of(pods, ring.pick(xxh64("ws-user")))
            await ws.send_str("ping")
            assert (await ws.receive(timeout=5)).data == "ping"


def _split_config(pods: PodSet) -> Config:
    (h1, p1), (h2, p2) = pods.addresses[:2]
    return load_text(f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: split}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route:
    - {{destination: {{host: a.local}}, weight: 50}}
    - {{destination: {{host: b.local}}, weight: 50}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: a}}
spec:
  hosts: [a.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {h1}, ports: {{http: {p1}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: b}}
spec:
  hosts: [b.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {h2}, ports: {{http: {p2}}}}}]
""")


async def test_weighted_split_is_decided_per_request_not_remembered(
    pods: PodSet, session: aiohttp.ClientSession
) -> None:
    # The dispatcher remembers route decisions per (Host, method, target); a weighted split
    # must not be remembered, or every later request would follow the first one's draw.
    async with running(_split_config(pods)) as url:
        seen = Counter([await get_pod(session, url + "/same") for _ in range(60)])
    assert set(seen) == {pods.names[0], pods.names[1]}


async def _ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, *lines: str
) -> tuple[int, dict[str, str], str | None]:
    """One request on an open connection: status, lower-cased headers, the pod that answered."""
    extra = "".join(f"{line}\r\n" for line in lines)
    writer.write(f"GET /same HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    fields = {n.lower(): v for n, _, v in (line.partition(": ") for line in head[1:] if line)}
    body = await reader.readexactly(int(fields["content-length"]))
    pod = json.loads(body)["pod"] if head[0].endswith("200 OK") else None
    return int(head[0].split()[1]), fields, pod


async def test_one_connection_routes_and_hashes_each_request_on_its_own(
    pods: PodSet, tmp_path: Path
) -> None:
    # The dispatcher remembers a connection's last route and hash (keep-alive clients repeat
    # them): any change of Cookie, Host or config between two requests must still count.
    ring = RingHash(dict.fromkeys(keys(pods), 1))
    names = [f"user-{i}" for i in range(40)]
    a = names[0]
    b = next(n for n in names if ring.pick(xxh64(n)) != ring.pick(xxh64(a)))
    c = next(n for n in names if ring.pick(xxh64(n)) not in {ring.pick(xxh64(x)) for x in (a, b)})
    config = tmp_path / "istio.yaml"
    config.write_text(ARTICLE + "\n---\n" + service_entry(pods.addresses))
    options = RunOptions(listen=(("127.0.0.1", 0),), config_paths=(str(config),))
    proxy = Proxy(load_config([str(config)]), options)
    await proxy.start()
    host, port = proxy.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:

        def on(key: str) -> str:
            return pod_of(pods, ring.pick(xxh64(key)))

        for key in (a, b, a, a, c, b):
            status, fields, pod = await _ask(reader, writer, "test.com", f"Cookie: ISTIOID={key}")
            assert (status, pod, "set-cookie" in fields) == (200, on(key), False), key
        # A new visitor, twice on the same connection: the same generated value both times.
        local = writer.get_extra_info("sockname")
        value = generated_cookie_value(format_address(*local[:2]), f"{host}:{port}")
        for _ in range(2):
            status, fields, pod = await _ask(reader, writer, "test.com")
            assert fields["set-cookie"] == f'ISTIOID="{value}"; Max-Age=60; HttpOnly'
            assert pod == on(value)
        # Two Cookie lines: the cookie is found in the second one.
        status, fields, pod = await _ask(
            reader, writer, "test.com", "Cookie: other=1", f"Cookie: ISTIOID={c}"
        )
        assert (pod, "set-cookie" in fields) == (on(c), False)
        status, _, _ = await _ask(reader, writer, "unknown.example", f"Cookie: ISTIOID={a}")
        assert status == 404
        assert (await _ask(reader, writer, "test.com", f"Cookie: ISTIOID={a}"))[2] == on(a)
        # A reload that renames the cookie applies to the very next request on the connection.
        config.write_text(config.read_text().replace("name: ISTIOID", "name: SESSION"))
        assert await proxy.reload()
        _, fields, pod = await _ask(reader, writer, "test.com", f"Cookie: ISTIOID={a}; SESSION={b}")
        assert (pod, "set-cookie" in fields) == (on(b), False)
        # So does a change of endpoints: a session whose pod left moves with the next request.
        two = RingHash(dict.fromkeys(keys(pods)[:2], 1))
        moved = next(n for n in names if ring.pick(xxh64(n)) == keys(pods)[2])
        assert (await _ask(reader, writer, "test.com", f"Cookie: SESSION={moved}"))[2] == on(moved)
        config.write_text(
            ARTICLE.replace("name: ISTIOID", "name: SESSION")
            + "\n---\n"
            + service_entry(pods.addresses[:2])
        )
        assert await proxy.reload()
        _, _, pod = await _ask(reader, writer, "test.com", f"Cookie: SESSION={moved}")
        assert pod == pod_of(pods, two.pick(xxh64(moved)))
    finally:
        writer.close()
        await proxy.stop(grace=2)


async def test_requests_arriving_together_are_each_answered_by_their_pod(pods: PodSet) -> None:
    # Requests read in one loop iteration have their writes held and sent together at its end
    # (HttpConnection.flush_soon): every one of them, upstream and back, must still go out.
    ring = RingHash(dict.fromkeys(keys(pods), 1))
    async with running(article_config(pods.addresses)) as url:
        host, port = url.removeprefix("http://").split(":")
        conns = [await asyncio.open_connection(host, int(port)) for _ in range(30)]
        try:
            for round_ in range(3):
                for i, (_, writer) in enumerate(conns):
                    cookie = f"ISTIOID=u{i}-{round_}"
                    writer.write(
                        f"GET / HTTP/1.1\r\nHost: test.com\r\nCookie: {cookie}\r\n\r\n".encode()
                    )
                answers = await asyncio.wait_for(
                    asyncio.gather(*(_read_answer(reader) for reader, _ in conns)), 10
                )
                expected = [pod_of(pods, ring.pick(xxh64(f"u{i}-{round_}"))) for i in range(30)]
                assert answers == expected
        finally:
            for _, writer in conns:
                writer.close()


async def _read_answer(reader: asyncio.StreamReader) -> str:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = next(
        int(line.split(":", 1)[1])
        for line in head.split("\r\n")
        if line.lower().startswith("content-length:")
    )
    pod = json.loads(await reader.readexactly(length))["pod"]
    assert isinstance(pod, str)
    return pod


async def test_a_session_follows_its_pod_out_of_the_ring_on_the_same_connection(
    pods: PodSet,
) -> None:
    # The dispatcher reuses a connection's last Forward only while the cluster snapshot it was
    # picked from is current: a pod taken out (health, ejection) moves the very next request.
    ring = RingHash(dict.fromkeys(keys(pods), 1))
    cookie = next(f"s{i}" for i in range(100) if ring.pick(xxh64(f"s{i}")) == keys(pods)[0])
    rest = RingHash(dict.fromkeys(keys(pods)[1:], 1))
    proxy = Proxy(article_config(pods.addresses), LOOPBACK)
    await proxy.start()
    host, port = proxy.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        (crt,) = proxy.runtime.clusters.values()
        for _ in range(3):
            _, _, pod = await _ask(reader, writer, "test.com", f"Cookie: ISTIOID={cookie}")
            assert pod == pods.names[0]
        crt.cluster.set_unhealthy({keys(pods)[0]})
        _, _, pod = await _ask(reader, writer, "test.com", f"Cookie: ISTIOID={cookie}")
        assert pod == pod_of(pods, rest.pick(xxh64(cookie))) != pods.names[0]
        crt.cluster.set_unhealthy(())
        _, _, pod = await _ask(reader, writer, "test.com", f"Cookie: ISTIOID={cookie}")
        assert pod == pods.names[0]
    finally:
        writer.close()
        await proxy.stop(grace=2)
