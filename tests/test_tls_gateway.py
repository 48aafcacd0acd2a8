"""HTTPS at the gateway, with real handshakes: SNI, redirect, MUTUAL, stickiness, parameters.

The Gateway of issue 16: port 443 serves test.com (certificate files) and other.com (a Secret
in the same YAML), port 80 redirects to https, port 8443 requires client certificates. The
proxy runs in this process on 127.0.0.1, port 0 for each Gateway port.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import RawClient
from proxy_process import sample_sum
from tls_certs import CA, connect, secret_yaml
from tls_certs import pods_yaml as routes

from proxy.config import Config
from proxy.demo import PodSet
from proxy.hashing import RingHash, xxh64
from proxy.istio import load_text
from proxy.server import Proxy, RunOptions

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(3) as podset:
        yield podset


class Certs:
    def __init__(self, folder: Path) -> None:
        self.ca = CA(folder)
        self.test = self.ca.issue("test.com")
        self.other = self.ca.issue("other.com")
        self.mtls = self.ca.issue("mtls.test.com")
        self.clients = CA(folder, "clients")
        self.client = self.clients.issue("client.example")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def pods_yaml(pods: PodSet, attributes: str = "") -> str:
    return routes(
        pods.addresses, hosts="[test.com, other.com, mtls.test.com]", cookie_extra=attributes
    )


def gateway_yaml(certs: Certs, https_extra: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [test.com]
    tls:
      mode: SIMPLE
      serverCertificate: {certs.test.cert}
      privateKey: {certs.test.key}{https_extra}
  - port: {{number: 443, name: https-other, protocol: HTTPS}}
    hosts: [other.com]
    tls:
      mode: SIMPLE
      credentialName: other-cred{https_extra}
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [test.com, other.com]
    tls: {{httpsRedirect: true}}
  - port: {{number: 8443, name: mtls, protocol: HTTPS}}
    hosts: [mtls.test.com]
    tls:
      mode: MUTUAL
      serverCertificate: {certs.mtls.cert}
      privateKey: {certs.mtls.key}
      caCertificates: {certs.clients.path}
"""


def issue_config(
    certs: Certs, pods: PodSet, *, https_extra: str = "", attributes: str = ""
) -> Config:
    return load_text(
        "\n---\n".join(
            [gateway_yaml(certs, https_extra), secret_yaml("other-cred", certs.other),
             pods_yaml(pods, attributes)]
        ),
        "issue16.yaml",
    )  # fmt: skip


class Running:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        # Listeners in Gateway port order: 80, 443, 8443.
        self.http, self.https, self.mutual = (port for _, port in proxy.addresses)


@asynccontextmanager
async def running(config: Config, **options: object) -> AsyncIterator[Running]:
    proxy = Proxy(config, RunOptions(listen=(("127.0.0.1", 0),) * 3, **options))  # type: ignore[arg-type]
    await proxy.start()
    try:
        yield Running(proxy)
    finally:
        await proxy.stop(grace=5)


async def refused(port: int, ctx: ssl.SSLContext, sni: str) -> None:
    """The server ends the handshake: an alert, or (asyncio and uvloop do not flush OpenSSL's
    alert when a server handshake fails) the connection reset. Not an error of the client's
    own making, such as a protocol it will not offer."""
    with pytest.raises((ssl.SSLError, ConnectionResetError)) as failed:
        async with connect(port, ctx, sni=sni):
            pass
    if isinstance(failed.value, ssl.SSLError):
        assert "ALERT" in str(failed.value.reason), failed.value


@asynccontextmanager
async def one_port(servers: str, pods: PodSet) -> AsyncIterator[int]:
    """The proxy serving Gateway ``servers`` (YAML list items) for *.example.com: its port."""
    gateway = f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  servers:{servers}
---"""
    config = load_text(gateway + routes(pods.addresses, hosts='["*.example.com"]'))
    proxy = Proxy(config, RunOptions(listen=(("127.0.0.1", 0),)))
    await proxy.start()
    try:
        yield proxy.addresses[0][1]
    finally:
        await proxy.stop(grace=5)


def pod_of(pods: PodSet, key: str) -> str:
    return pods.names[[f"{h}:{p}" for h, p in pods.addresses].index(key)]


# --------------------------------------------------------------------------- must show


async def test_sni_certificates_redirect_and_mutual_on_one_gateway(
    certs: Certs, pods: PodSet, raw_client: Callable[[int], Awaitable[RawClient]]
) -> None:
    async with running(issue_config(certs, pods)) as gw:
        # Port 443: each SNI name gets its own certificate, and its own routes.
        for sni, issued in (("test.com", certs.test), ("other.com", certs.other)):
            async with connect(gw.https, certs.ca, sni=sni) as conn:
                assert conn.serial == issued.serial
                assert conn.ssl_object.version() in ("TLSv1.2", "TLSv1.3")
                resp = await conn.get("/hello", host=sni)
                assert resp.status == 200
                assert json.loads(resp.body)["pod"] in pods.names
        assert certs.test.serial != certs.other.serial

        # Port 80 redirects to https, path and query kept.
        client = await raw_client(gw.http)
        await client.send(b"GET /cart?item=1 HTTP/1.1\r\nHost: test.com\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 301
        location = resp.header("location")
        assert location == "https://test.com/cart?item=1"
        # ... which the HTTPS port serves (here on its own port, not 443).
        url = urlsplit(location)
        assert url.hostname is not None
        async with connect(gw.https, certs.ca, sni=url.hostname) as conn:
            followed = await conn.get(f"{url.path}?{url.query}", host=url.hostname)
            assert followed.status == 200
            assert json.loads(followed.body)["query"] == "item=1"

        # Port 8443 refuses a client without a certificate, and the pods hear nothing.
        before = sum(pods.request_counts)
        no_cert = certs.ca.client_context()
        no_cert.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.2: refused in the handshake
        await refused(gw.mutual, no_cert, "mtls.test.com")
        # TLS 1.3 ends the client's half of the handshake first: the refusal comes as an alert
        # on the first read, before any request is served.
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            async with connect(gw.mutual, certs.ca, sni="mtls.test.com") as conn:
                await conn.get("/", host="mtls.test.com")
        assert sum(pods.request_counts) == before

        # ... and serves one with a certificate its CA signed.
        async with connect(gw.mutual, certs.ca, sni="mtls.test.com", client=certs.client) as conn:
            assert conn.serial == certs.mtls.serial
            assert (await conn.get("/", host="mtls.test.com")).status == 200
        # A certificate from another CA is refused like none.
        stranger = CA(certs.ca.folder, "stranger").issue("client.example")
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            async with connect(gw.mutual, certs.ca, sni="mtls.test.com", client=stranger) as conn:
                await conn.get("/", host="mtls.test.com")


async def test_stickiness_over_tls_matches_istios_ring(certs: Certs, pods: PodSet) -> None:
    async with running(issue_config(certs, pods)) as gw:
        async with connect(gw.https, certs.ca, sni="test.com") as conn:
            first = await conn.get("/", host="test.com")
            set_cookie = first.header("set-cookie")
            assert set_cookie is not None and set_cookie.startswith('ISTIOID="')
            # Exactly Istio's cookie: no Secure unless the DestinationRule asks for it.
            assert set_cookie.endswith("; Max-Age=60; HttpOnly"), set_cookie
            value = set_cookie.split(";")[0].split("=", 1)[1]
            pod = json.loads(first.body)["pod"]
            for _ in range(20):
                resp = await conn.get("/", host="test.com", headers=f"Cookie: ISTIOID={value}\r\n")
                assert json.loads(resp.body)["pod"] == pod
                assert resp.header("set-cookie") is None
            ring = RingHash(dict.fromkeys([f"{h}:{p}" for h, p in pods.addresses], 1), 1024)
            landed: Counter[str] = Counter()
            for i in range(300):
                cookie = f"session-{i}"
                resp = await conn.get("/", host="test.com", headers=f"Cookie: ISTIOID={cookie}\r\n")
                got = json.loads(resp.body)["pod"]
                assert got == pod_of(pods, ring.pick(xxh64(cookie))), cookie
                landed[got] += 1
        assert set(landed) == set(pods.names)


# --------------------------------------------------------------------------- SNI and routes


async def test_a_host_of_another_server_is_404_and_no_sni_gets_the_first_certificate(
    certs: Certs, pods: PodSet
) -> None:
    async with running(issue_config(certs, pods)) as gw:
        async with connect(gw.https, certs.ca, sni="other.com") as conn:
            # other.com's connection may not reach test.com's routes (Envoy: another filter
            # chain), even though one VirtualService serves both names.
            resp = await conn.get("/", host="test.com")
            assert resp.status == 404
            assert (await conn.get("/", host="other.com")).status == 200
        for sni in (None, "unknown.example"):
            async with connect(gw.https, certs.ca, sni=sni) as conn:
                assert conn.serial == certs.test.serial  # the port's first server
                assert (await conn.get("/", host="test.com")).status == 200
                assert (await conn.get("/", host="other.com")).status == 404
        assert sum(pods.request_counts) == 3


async def test_exact_name_before_wildcard_and_longest_wildcard_first(
    tmp_path: Path, pods: PodSet
) -> None:
    ca = CA(tmp_path)
    star = ca.issue("*.example.com")
    deep = ca.issue("*.api.example.com")
    exact = ca.issue("www.example.com")
    servers = "".join(
        f"""
  - port: {{number: 443, name: {name}, protocol: HTTPS}}
    hosts: ["{host}"]
    tls: {{mode: SIMPLE, serverCertificate: {issued.cert}, privateKey: {issued.key}}}"""
        for name, host, issued in (
            ("star", "*.example.com", star),
            ("deep", "*.api.example.com", deep),
            ("exact", "www.example.com", exact),
        )
    )
    async with one_port(servers, pods) as port:
        for sni, issued in (
            ("www.example.com", exact),
            ("WWW.Example.COM", exact),
            ("shop.example.com", star),
            ("v1.api.example.com", deep),
            ("a.b.api.example.com", deep),
            ("example.com", star),  # not covered by any name: the first server
        ):
            async with connect(port, ca, sni=sni) as conn:
                assert conn.serial == issued.serial, sni
                if sni != "example.com":
                    assert (await conn.get("/", host=sni.lower())).status == 200


async def test_two_mutual_servers_on_one_port_each_trust_their_own_clients(
    tmp_path: Path, pods: PodSet
) -> None:
    """The certificate store the client certificate is checked against is the one of the
    server the SNI chose, not the port's first."""
    ca = CA(tmp_path)
    a_clients, b_clients = CA(tmp_path, "a-clients"), CA(tmp_path, "b-clients")
    a_client, b_client = a_clients.issue("a.client"), b_clients.issue("b.client")
    servers = "".join(
        f"""
  - port: {{number: 443, name: {name}, protocol: HTTPS}}
    hosts: [{name}.example.com]
    tls:
      mode: MUTUAL
      serverCertificate: {issued.cert}
      privateKey: {issued.key}
      caCertificates: {clients.path}"""
        for name, issued, clients in (
            ("a", ca.issue("a.example.com"), a_clients),
            ("b", ca.issue("b.example.com"), b_clients),
        )
    )
    async with one_port(servers, pods) as port:
        for sni, good, bad in (
            ("a.example.com", a_client, b_client),
            ("b.example.com", b_client, a_client),
        ):
            async with connect(port, ca, sni=sni, client=good) as conn:
                assert (await conn.get("/", host=sni)).status == 200
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                async with connect(port, ca, sni=sni, client=bad) as conn:
                    await conn.get("/", host=sni)
        assert sum(pods.request_counts) == 2


# --------------------------------------------------------------------------- parameters


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_protocol_versions_ciphers_and_alpn(certs: Certs, pods: PodSet) -> None:
    # Istio's defaults first: TLS 1.2 at least, ALPN http/1.1 only.
    async with running(issue_config(certs, pods)) as gw:
        old = certs.ca.client_context()
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client does offer TLS 1.1
        await refused(gw.https, old, "test.com")
        h2 = certs.ca.client_context()
        h2.set_alpn_protocols(["h2", "http/1.1"])
        async with connect(gw.https, h2, sni="test.com") as conn:
            assert conn.ssl_object.selected_alpn_protocol() == "http/1.1"
        only_h2 = certs.ca.client_context()
        only_h2.set_alpn_protocols(["h2"])
        async with connect(gw.https, only_h2, sni="test.com") as conn:
            assert conn.ssl_object.selected_alpn_protocol() is None
            assert (await conn.get("/", host="test.com")).status == 200

    extra = (
        "\n      minProtocolVersion: TLSV1_2\n      maxProtocolVersion: TLSV1_2"
        "\n      cipherSuites: [ECDHE-RSA-AES256-GCM-SHA384, ECDHE-ECDSA-AES256-GCM-SHA384]"
    )
    async with running(issue_config(certs, pods, https_extra=extra)) as gw:
        async with connect(gw.https, certs.ca, sni="test.com") as conn:
            assert conn.ssl_object.version() == "TLSv1.2"
            cipher = conn.ssl_object.cipher()
            assert cipher is not None and cipher[0] in (
                "ECDHE-RSA-AES256-GCM-SHA384",
                "ECDHE-ECDSA-AES256-GCM-SHA384",
            )
        tls13 = certs.ca.client_context()
        tls13.minimum_version = ssl.TLSVersion.TLSv1_3
        await refused(gw.https, tls13, "test.com")
        aes128 = certs.ca.client_context()
        aes128.maximum_version = ssl.TLSVersion.TLSv1_2
        aes128.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256")
        await refused(gw.https, aes128, "other.com")  # no shared cipher


async def test_secure_attribute_when_the_rule_asks_and_forwarded_proto(
    certs: Certs, pods: PodSet
) -> None:
    config = issue_config(certs, pods, attributes=", attributes: [{name: Secure}]")
    async with running(config) as gw, connect(gw.https, certs.ca, sni="test.com") as conn:
        resp = await conn.get("/", host="test.com")
        set_cookie = resp.header("set-cookie")
        assert set_cookie is not None and "; Secure" in set_cookie, set_cookie
        headers = json.loads(resp.body)["headers"]
        assert headers["X-Forwarded-Proto"] == "https"
        assert headers["X-Forwarded-For"] == "127.0.0.1"  # the peer, read through TLS


async def test_access_log_and_metrics_tell_tls(certs: Certs, pods: PodSet) -> None:
    stream = io.StringIO()
    async with running(
        issue_config(certs, pods), access_log="json", access_log_stream=stream
    ) as gw:
        async with connect(gw.https, certs.ca, sni="other.com") as conn:
            assert (await conn.get("/", host="other.com")).status == 200
        async with connect(gw.https, certs.ca, sni=None) as conn:
            assert (await conn.get("/", host="test.com")).status == 200
        text = gw.proxy.exposition().decode()
    # Stopping the proxy closed the access log: every line is written.
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["requested_server_name"], x["authority"]) for x in lines] == [
        ("other.com", "other.com"),
        (None, "test.com"),
    ]
    assert {x["downstream_tls_version"] for x in lines} <= {"TLSv1.2", "TLSv1.3"}
    assert all(x["downstream_tls_version"] for x in lines)
    # Istio's gateway reports connection_security_policy "unknown", TLS or not.
    assert sample_sum(text, "istio_requests_total", connection_security_policy="unknown") == 2
