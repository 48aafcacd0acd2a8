"""Certificates for the TLS tests (trustme), and a client that reports what a handshake showed.

    ca = CA(tmp_path)                       # a fresh CA; ca.path is its PEM file
    cert = ca.issue("test.com")             # cert.cert / cert.key: PEM files, cert.serial
    async with connect(port, ca, sni="test.com") as conn:
        conn.serial                          # the serial of the certificate the server showed
        await conn.get("/", host="test.com") # -> conftest.Response (one request, keep-alive)

``serial`` is the hex text ``ssl`` prints (``getpeercert()["serialNumber"]``), the same the
proxy logs for the certificates it serves.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme
from conftest import RawClient, Response


@dataclass(frozen=True)
class Issued:
    cert: Path  # the chain (leaf first)
    key: Path
    serial: str
    leaf: trustme.LeafCert

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


class CA:
    """A trustme CA whose certificates are written as PEM files under ``folder``."""

    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.ca = trustme.CA()
        self.folder = folder
        self.name = name
        self.path = folder / f"{name}.crt"
        self.ca.cert_pem.write_to_path(str(self.path))
        self._count = 0

    def issue(
        self,
        *names: str,
        stem: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Issued:
        self._count += 1
        stem = stem or f"{self.name}-{names[0].replace('*', 'star')}-{self._count}"
        kwargs = {}
        if not_before is not None:
            kwargs["not_before"] = not_before
        if not_after is not None:
            kwargs["not_after"] = not_after
        leaf = self.ca.issue_cert(*names, **kwargs)  # type: ignore[arg-type]
        cert, key = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return Issued(cert, key, serial_of(cert.read_bytes()), leaf)

    def client_context(self, client: Issued | None = None) -> ssl.SSLContext:
        """A client trusting this CA (names not checked: tests set SNI and Host apart)."""
        ctx = ssl.create_default_context(cafile=str(self.path))
        ctx.check_hostname = False
        if client is not None:
            ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx

    def server_context(self, server: Issued, clients: CA | None = None) -> ssl.SSLContext:
        """A pod's server context; with ``clients`` it requires their certificates."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(server.cert), str(server.key))
        if clients is not None:
            ctx.load_verify_locations(str(clients.path))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def serial_of(chain: bytes) -> str:
    """The leaf's serial as ``ssl`` prints it (uppercase hex)."""
    end = b"-----END CERTIFICATE-----"
    leaf = chain[: chain.index(end) + len(end)].decode()
    der = ssl.PEM_cert_to_DER_cert(leaf)
    from cryptography import x509  # trustme's own dependency

    text = format(x509.load_der_x509_certificate(der).serial_number, "X")
    return "0" * (len(text) % 2) + text  # whole bytes, as OpenSSL prints them


def secret_yaml(
    name: str,
    issued: Issued | None = None,
    *,
    ca: CA | None = None,
    namespace: str = "default",
    string_data: bool = False,
) -> str:
    """A Kubernetes Secret (type kubernetes.io/tls) holding ``issued`` and/or a CA."""
    data: dict[str, bytes] = {}
    if issued is not None:
        data["tls.crt"] = issued.cert_pem
        data["tls.key"] = issued.key_pem
    if ca is not None:
        data["ca.crt"] = ca.path.read_bytes()
    if string_data:
        body = "stringData:\n" + "".join(
            f"  {k}: |\n" + "".join(f"    {line}\n" for line in v.decode().splitlines())
            for k, v in data.items()
        )
    else:
        body = "data:\n" + "".join(
            f"  {k}: {base64.b64encode(v).decode()}\n" for k, v in data.items()
        )
    return (
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        f"type: kubernetes.io/tls\n{body}"
    )


def pods_yaml(
    addresses: Sequence[tuple[str, int]],
    *,
    hosts: str = '["*"]',
    port: int = 80,
    cookie: str | None = "ISTIOID",
    cookie_extra: str = "",
    route_extra: str = "",
    entry_extra: str = "",
    policy_extra: str = "",
) -> str:
    """A VirtualService on Gateway ``gw`` sending ``hosts`` to ``pods.local:port``, a STATIC
    ServiceEntry for ``addresses``, and a DestinationRule hashing on ``cookie`` (None: no rule).
    The ``*_extra`` texts go at the end of the route, the ServiceEntry's spec and the cookie's
    and the traffic policy's fields."""
    endpoints = "".join(f"  - {{address: {h}, ports: {{web: {p}}}}}\n" for h, p in addresses)
    text = f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  hosts: {hosts}
  gateways: [gw]
  http:
  - route: [{{destination: {{host: pods.local, port: {{number: {port}}}}}}}]{route_extra}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pods}}
spec:
  hosts: [pods.local]
  ports: [{{number: {port}, name: web}}]
  resolution: STATIC{entry_extra}
  endpoints:
{endpoints}"""
    if cookie is None:
        return text
    return (
        text
        + f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pods}}
spec:
  host: pods.local
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {{name: {cookie}, ttl: 60s{cookie_extra}}}{policy_extra}
"""
    )


class TlsConnection(RawClient):
    """A client connection after its handshake: what the server showed, then requests."""

    @property
    def ssl_object(self) -> ssl.SSLObject:
        obj = self.writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        return obj

    @property
    def serial(self) -> str:
        cert = self.ssl_object.getpeercert()
        assert cert, "no validated peer certificate"
        return str(cert["serialNumber"])

    async def get(self, path: str = "/", *, host: str, headers: str = "") -> Response:
        await self.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        return await self.read_response()


@asynccontextmanager
async def connect(
    port: int,
    ca: CA | ssl.SSLContext,
    *,
    sni: str | None,
    client: Issued | None = None,
) -> AsyncIterator[TlsConnection]:
    """A TLS connection to 127.0.0.1:``port`` asking for ``sni`` (None: no SNI at all)."""
    ctx = ca if isinstance(ca, ssl.SSLContext) else ca.client_context(client)
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=sni or ""
        )
    conn = TlsConnection(reader, writer)
    try:
        yield conn
    finally:
        await conn.close()
