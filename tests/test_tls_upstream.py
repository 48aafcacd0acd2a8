"""TLS to the pods (DestinationRule trafficPolicy.tls), with real handshakes.

The pods are demo pods serving HTTPS with certificates of their own CA; the client talks plain
HTTP to the proxy, which originates TLS as the DestinationRule says.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from tls_certs import CA, Issued, pods_yaml

from proxy.demo import PodState, make_pod_app
from proxy.hashing import RingHash, xxh64
from proxy.istio import load_text
from proxy.server import Proxy, RunOptions

pytestmark = pytest.mark.timeout(60)

CLUSTER = "outbound|443||pods.local"


class HttpsPods:
    """Demo pods serving HTTPS; each remembers the SNI names its handshakes asked for."""

    def __init__(self) -> None:
        self.states: list[PodState] = []
        self.addresses: list[tuple[str, int]] = []
        self.sni: list[list[str | None]] = []
        self._runners: list[web.AppRunner] = []

    async def add(self, name: str, ctx: ssl.SSLContext) -> None:
        state = PodState(name)
        seen: list[str | None] = []
        ctx.sni_callback = lambda _obj, sni, _ctx: seen.append(sni)
        runner = web.AppRunner(make_pod_app(name, state), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runners.append(runner)
        self.states.append(state)
        self.addresses.append(("127.0.0.1", port))
        self.sni.append(seen)

    @property
    def counts(self) -> list[int]:
        return [s.request_count for s in self.states]

    def index_of(self, key: str) -> int:
        return [f"{h}:{p}" for h, p in self.addresses].index(key)

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


@pytest.fixture
async def pods() -> AsyncIterator[HttpsPods]:
    podset = HttpsPods()
    yield podset
    await podset.close()


def config_yaml(pods: HttpsPods, tls: str, *, retries: str = "", sans: str = "") -> str:
    """Plain HTTP on port 80 to pods.local:443, whose DestinationRule has ``tls``."""
    gateway = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---"""
    policy = "\n    tls:\n" + tls.rstrip("\n")
    return gateway + pods_yaml(
        pods.addresses, port=443, route_extra=retries, entry_extra=sans, policy_extra=policy
    )


@asynccontextmanager
async def proxy_url(yaml: str) -> AsyncIterator[tuple[str, Proxy]]:
    proxy = Proxy(load_text(yaml), RunOptions(listen=(("127.0.0.1", 0),)))
    await proxy.start()
    try:
        host, port = proxy.addresses[0]
        yield f"http://{host}:{port}", proxy
    finally:
        await proxy.stop(grace=5)


def cookie_for(pods: HttpsPods, index: int) -> str:
    """A session cookie the ring puts on pod ``index``."""
    ring = RingHash(dict.fromkeys([f"{h}:{p}" for h, p in pods.addresses], 1), 1024)
    for i in range(1000):
        if pods.index_of(ring.pick(xxh64(f"s{i}"))) == index:
            return f"s{i}"
    raise AssertionError("no cookie found")


async def get(url: str, host: str = "test.com", cookie: str | None = None) -> tuple[int, str]:
    headers = {"Host": host}
    if cookie is not None:
        headers["Cookie"] = f"ISTIOID={cookie}"
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(url, headers=headers) as resp,
    ):
        return resp.status, await resp.text()


def indent(text: str) -> str:
    return "".join(f"      {line}\n" for line in text.strip().splitlines())


async def start_pods(
    pods: HttpsPods, ca: CA, certs: list[Issued], clients: CA | None = None
) -> None:
    for i, issued in enumerate(certs):
        await pods.add(f"pod-{i + 1}", ca.server_context(issued, clients))


# --------------------------------------------------------------------------- must show


async def test_pods_with_their_own_ca_and_one_with_a_wrong_certificate(
    pods: HttpsPods, tmp_path: Path
) -> None:
    ca = CA(tmp_path, "pods")
    stranger = CA(tmp_path, "stranger")
    await start_pods(pods, ca, [ca.issue("pods.local"), ca.issue("pods.local")])
    await pods.add("pod-3", stranger.server_context(stranger.issue("pods.local")))
    tls = indent(f"mode: SIMPLE\ncaCertificates: {ca.path}\nsni: pods.local")
    yaml = config_yaml(pods, tls, retries="\n    retries: {attempts: 0}")
    async with proxy_url(yaml) as (url, proxy):
        # A session on a good pod: served over TLS, one keep-alive connection reused.
        cookie = cookie_for(pods, 0)
        for _ in range(20):
            status, body = await get(url, cookie=cookie)
            assert status == 200, body
            assert json.loads(body)["pod"] == "pod-1"
        pool = proxy.runtime.clusters[CLUSTER].cluster.snapshot.pools[
            "{}:{}".format(*pods.addresses[0])
        ]
        assert pool.opened == 1
        assert pods.sni[0] == ["pods.local"]  # one handshake, with the rule's SNI

        # A session on the pod whose certificate another CA signed: Envoy's 503, and the pod
        # never got the request.
        status, body = await get(url, cookie=cookie_for(pods, 2))
        assert status == 503
        assert body.startswith(
            "upstream connect error or disconnect/reset before headers. reset reason: "
            "connection failure, transport failure reason: TLS_error:|SSL routines:"
            "CERTIFICATE_VERIFY_FAILED:verify cert failed: "
        ), body
        assert body.endswith(":TLS_error_end"), body
        assert pods.counts[2] == 0
        assert pods.counts[0] == 20


async def test_a_wrong_certificate_is_a_connect_failure_that_moves_on(
    pods: HttpsPods, tmp_path: Path
) -> None:
    """Istio's default retry policy retries connect failures (a TLS one is one) elsewhere."""
    ca = CA(tmp_path, "pods")
    stranger = CA(tmp_path, "stranger")
    await start_pods(pods, ca, [ca.issue("pods.local"), ca.issue("pods.local")])
    await pods.add("pod-3", stranger.server_context(stranger.issue("pods.local")))
    tls = indent(f"mode: SIMPLE\ncaCertificates: {ca.path}\nsni: pods.local")
    async with proxy_url(config_yaml(pods, tls)) as (url, _):
        status, body = await get(url, cookie=cookie_for(pods, 2))
        assert status == 200
        assert json.loads(body)["pod"] in ("pod-1", "pod-2")
        assert pods.counts[2] == 0


async def test_mutual_tls_to_pods_that_require_a_client_certificate(
    pods: HttpsPods, tmp_path: Path
) -> None:
    ca = CA(tmp_path, "pods")
    clients = CA(tmp_path, "clients")
    proxy_cert = clients.issue("proxy.example")
    await start_pods(pods, ca, [ca.issue("pods.local")] * 3, clients=clients)
    tls = indent(
        f"mode: MUTUAL\ncaCertificates: {ca.path}\nclientCertificate: {proxy_cert.cert}\n"
        f"privateKey: {proxy_cert.key}\nsni: pods.local"
    )
    async with proxy_url(config_yaml(pods, tls)) as (url, _):
        for i in range(3):
            status, body = await get(url, cookie=cookie_for(pods, i))
            assert status == 200, body
            assert json.loads(body)["pod"] == f"pod-{i + 1}"


# --------------------------------------------------------------------------- names


async def test_no_sni_in_the_rule_sends_the_host_and_checks_the_certificate_against_it(
    pods: HttpsPods, tmp_path: Path
) -> None:
    """Envoy's auto_sni and auto_san_validation: the request's Host is both."""
    ca = CA(tmp_path, "pods")
    await start_pods(pods, ca, [ca.issue("test.com", "www.test.com")] * 3)
    tls = indent(f"mode: SIMPLE\ncaCertificates: {ca.path}")
    no_retry = "\n    retries: {attempts: 0}"
    async with proxy_url(config_yaml(pods, tls, retries=no_retry)) as (url, _):
        cookie = cookie_for(pods, 1)
        for host in ("test.com", "www.test.com:8080", "test.com"):
            status, body = await get(url, host=host, cookie=cookie)
            assert status == 200, body
        assert pods.sni[1] == ["test.com", "www.test.com"]  # one connection per name
        status, body = await get(url, host="other.com", cookie=cookie)
        assert status == 503
        assert "CERTIFICATE_VERIFY_FAILED:verify cert failed: Hostname mismatch" in body, body
        assert pods.counts[1] == 3


async def test_subject_alt_names_of_the_rule_or_of_the_service_entry(
    pods: HttpsPods, tmp_path: Path
) -> None:
    ca = CA(tmp_path, "pods")
    await start_pods(pods, ca, [ca.issue("pod.internal", "spiffe.example")] * 3)
    no_retry = "\n    retries: {attempts: 0}"
    base = f"mode: SIMPLE\ncaCertificates: {ca.path}\nsni: pods.local"
    listed = indent(base + "\nsubjectAltNames: [other.internal, pod.internal]")
    async with proxy_url(config_yaml(pods, listed, retries=no_retry)) as (url, _):
        assert (await get(url, cookie="a"))[0] == 200
    wrong = indent(base + "\nsubjectAltNames: [other.internal]")
    async with proxy_url(config_yaml(pods, wrong, retries=no_retry)) as (url, _):
        status, body = await get(url, cookie="a")
        assert status == 503
        assert body.endswith(
            "transport failure reason: TLS_error:|SSL routines:CERTIFICATE_VERIFY_FAILED:"
            "verify cert failed: verify SAN list:TLS_error_end"
        ), body
    served = sum(pods.counts)
    # With none in the rule, the ServiceEntry's subjectAltNames are checked (Istio).
    entry = "\n  subjectAltNames: [nobody.internal]"
    async with proxy_url(config_yaml(pods, indent(base), retries=no_retry, sans=entry)) as (url, _):
        status, body = await get(url, cookie="a")
        assert status == 503 and "verify SAN list" in body, body
    assert sum(pods.counts) == served


async def test_without_ca_certificates_the_system_store_verifies(
    pods: HttpsPods, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Istio's default CA is the system's: OpenSSL's default verify paths, which SSL_CERT_FILE
    points at the pods' CA here."""
    ca = CA(tmp_path, "pods")
    await start_pods(pods, ca, [ca.issue("pods.local")] * 3)
    tls = indent("mode: SIMPLE\nsni: pods.local")
    no_retry = "\n    retries: {attempts: 0}"
    async with proxy_url(config_yaml(pods, tls, retries=no_retry)) as (url, _):
        status, body = await get(url, cookie="x")
        assert status == 503 and "CERTIFICATE_VERIFY_FAILED" in body, body
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.path))
    async with proxy_url(config_yaml(pods, tls, retries=no_retry)) as (url, _):
        status, body = await get(url, cookie="x")
        assert status == 200, body


async def test_insecure_skip_verify_accepts_any_certificate(
    pods: HttpsPods, tmp_path: Path
) -> None:
    stranger = CA(tmp_path, "stranger")
    await start_pods(pods, stranger, [stranger.issue("anything.example")] * 3)
    tls = indent("mode: SIMPLE\ninsecureSkipVerify: true\nsni: pods.local")
    async with proxy_url(config_yaml(pods, tls)) as (url, _):
        status, body = await get(url, cookie="x")
        assert status == 200, body
