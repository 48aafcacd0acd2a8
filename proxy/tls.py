"""TLS with Python's ``ssl``: certificates checked at load, the contexts built from them, SNI.

No TLS code of our own: OpenSSL (through ``ssl`` and uvloop's TLS transport) does every
handshake; this module only decides which certificate, which CA, which parameters.

Certificates (control plane, at load)
-------------------------------------
``load_certificate`` takes a chain and its key (PEM bytes: files and Secrets are read by
``proxy.istio_tls``), loads them into a context (a key that does not match its certificate
fails there), then runs one handshake against itself in memory, trusting the leaf alone
(``VERIFY_X509_PARTIAL_CHAIN``) and not checking its dates (``X509_V_FLAG_NO_CHECK_TIME``), to
read what the certificate says (serial, dates, names) with nothing but ``ssl``'s public API;
an expired or not yet valid certificate is refused with its dates.

Gateway ports (downstream)
--------------------------
Envoy picks a filter chain per server by SNI before the handshake starts. With ``ssl`` the
server's context is chosen in ``sni_callback``, during the handshake: :class:`TlsListener` (one
per HTTPS port, built with each ``Runtime``) holds a :class:`ServerContext` per server (its
certificate, client CA, RDS route name) and a *base* context that starts every handshake; its
``sni_callback`` switches the connection to the server matching the SNI with Istio's host rules
(exact name, then the longest ``*.suffix``, then ``*``), or to the port's first server for no
SNI or an unknown name (Envoy's default filter chain). OpenSSL fixes the protocol versions,
cipher list and client-certificate request of a connection before that callback runs, so the
servers of one port must agree on those (``proxy.istio_tls`` checks it).

The listening socket is created once with a :class:`ListenerContext` whose ``wrap_bio`` (what
uvloop calls for each accepted connection) delegates to the base context of the *current*
runtime's snapshot: a reload that rotates a certificate swaps the snapshot with the runtime, new
handshakes get the new certificate, established connections keep the context they were made
with. ALPN offers ``http/1.1`` only (no HTTP/2 yet).

Endpoints (upstream)
--------------------
:class:`UpstreamTls` is a cluster's DestinationRule ``tls``: the client context (the system
store or ``caCertificates``, the client certificate of MUTUAL, or no verification with
``insecureSkipVerify``), the SNI, and the subject alternative names checked after the
handshake (Envoy's ``match_subject_alt_names``, exact). With no ``sni`` the request's Host is
the SNI and, with no SANs either, the name the certificate must match (Envoy's auto_sni and
auto_san_validation), so such a pool keeps connections per name (``UpstreamPool.named``).
A handshake that fails becomes Envoy's ``transport failure reason`` text (``failure_reason``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from proxy.config import ClientTls, GatewayServer, ServerTls
from proxy.exchange import DownstreamTls

if TYPE_CHECKING:
    from proxy.exchange import Dispatcher

# Envoy's default server and client cipher lists (TLS 1.0-1.2; TLS 1.3 suites are not set by
# Envoy either), in their OpenSSL spelling: source/common/tls/*_context_config_impl.cc.
DEFAULT_CIPHERS: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
)
VERSIONS: Final = {
    "TLSV1_0": ssl.TLSVersion.TLSv1,
    "TLSV1_1": ssl.TLSVersion.TLSv1_1,
    "TLSV1_2": ssl.TLSVersion.TLSv1_2,
    "TLSV1_3": ssl.TLSVersion.TLSv1_3,
}
# Envoy's server defaults (TLS_AUTO): TLS 1.2 to 1.3. Its client defaults are 1.2 to 1.2, but
# Istio sets 1.2 to 1.3 on every upstream TLS context (cluster_tls.go).
SERVER_MIN: Final = ssl.TLSVersion.TLSv1_2
SERVER_MAX: Final = ssl.TLSVersion.TLSv1_3
ALPN: Final = ["http/1.1"]
_NO_CHECK_TIME: Final = 0x200000  # OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not named by ssl)
_SNI_ATTRIBUTE: Final = "sticky_proxy_sni"


class TlsMaterialError(Exception):
    """A certificate, key or CA bundle that cannot be used; the text says why."""

    def __init__(self, text: str, *, mismatch: bool = False) -> None:
        super().__init__(text)
        self.mismatch = mismatch  # the private key is not the certificate's


# --------------------------------------------------------------------------- certificates


@contextlib.contextmanager
def _pem_files(chain: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    """``load_cert_chain`` reads files only: the PEM goes to a private temporary folder (0700,
    removed at once), so a key read from a Secret never lands anywhere else on disk."""
    with tempfile.TemporaryDirectory(prefix="sticky-proxy-tls-") as folder:
        cert_path = os.path.join(folder, "tls.crt")
        key_path = os.path.join(folder, "tls.key")
        for path, data in ((cert_path, chain), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        yield cert_path, key_path


def _load_chain(ctx: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise TlsMaterialError("no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    if b"PRIVATE KEY-----" not in key:
        raise TlsMaterialError("no PEM private key (-----BEGIN ... PRIVATE KEY-----) in it")
    with _pem_files(chain, key) as (cert_path, key_path):
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise TlsMaterialError(
                    "the private key does not match the certificate", mismatch=True
                ) from None
            raise TlsMaterialError(f"cannot load it: {_ssl_text(exc)}") from None
        except ValueError as exc:  # e.g. an encrypted key (no password can be given)
            raise TlsMaterialError(f"cannot load it: {exc}") from None


def _ssl_text(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)


def _alt_names(decoded: Mapping[str, object]) -> list[tuple[str, str]]:
    """(type, value) of a decoded certificate's subjectAltName: ("DNS", "test.com"), ..."""
    alt = decoded.get("subjectAltName", ())
    found: list[tuple[str, str]] = []
    if isinstance(alt, tuple):
        for entry in alt:
            if isinstance(entry, tuple) and len(entry) == 2:
                found.append((str(entry[0]), str(entry[1])))
    return found


class CertificateInfo:
    """What a certificate says, as ``ssl`` decodes it."""

    __slots__ = ("names", "not_after", "not_before", "serial")

    def __init__(self, decoded: Mapping[str, object]) -> None:
        self.serial = str(decoded.get("serialNumber", ""))
        self.not_before = str(decoded.get("notBefore", ""))
        self.not_after = str(decoded.get("notAfter", ""))
        self.names = tuple(value for kind, value in _alt_names(decoded) if kind == "DNS")


def load_certificate(chain: bytes, key: bytes, *, now: float | None = None) -> CertificateInfo:
    """Check that ``chain`` and ``key`` can serve TLS now; what the leaf certificate says.

    Raises ``TlsMaterialError``: no PEM, a key that does not match, an expired certificate.
    """
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(server, chain, key)
    info = _decode_leaf(server, chain)
    if info is None:
        return CertificateInfo({})
    moment = time.time() if now is None else now
    if info.not_after and ssl.cert_time_to_seconds(info.not_after) < moment:
        raise TlsMaterialError(
            f"the certificate expired on {info.not_after} (serial {info.serial})"
        )
    if info.not_before and ssl.cert_time_to_seconds(info.not_before) > moment:
        raise TlsMaterialError(
            f"the certificate is not valid before {info.not_before} (serial {info.serial})"
        )
    return info


def _decode_leaf(server: ssl.SSLContext, chain: bytes) -> CertificateInfo | None:
    """One in-memory handshake with ``server``, whose leaf alone the client trusts, to have
    ``ssl`` decode the certificate (None when OpenSSL would not verify it for another reason,
    such as a key usage for clients only: then nothing more is known of it)."""
    end = b"-----END CERTIFICATE-----"
    leaf = chain[chain.index(b"-----BEGIN CERTIFICATE-----") : chain.index(end) + len(end)]
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | _NO_CHECK_TIME
    try:
        client.load_verify_locations(cadata=leaf.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError):
        return None
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(to_client, to_server)
    theirs = server.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(8):  # a TLS 1.3 handshake takes two round trips here
        for side in (ours, theirs):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return None
        with contextlib.suppress(ValueError):  # ValueError: handshake not done yet
            decoded = ours.getpeercert()
            if decoded:
                return CertificateInfo(decoded)
    return None


def check_ca_bundle(pem: bytes) -> int:
    """The number of CA certificates in ``pem``; raises ``TlsMaterialError`` when it has none."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise TlsMaterialError("no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
    except ssl.SSLError as exc:
        raise TlsMaterialError(f"cannot load it: {_ssl_text(exc)}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise TlsMaterialError(f"cannot load it: {exc}") from None
    return int(ctx.cert_store_stats()["x509"])


def check_ciphers(suites: Sequence[str]) -> None:
    """Raises ``TlsMaterialError`` when OpenSSL can use none of ``suites``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.set_ciphers(":".join(suites))
    except ssl.SSLError:
        raise TlsMaterialError(
            f"OpenSSL supports none of the cipher suites {', '.join(suites)}"
        ) from None


# --------------------------------------------------------------------------- gateway ports


def _parameters(ctx: ssl.SSLContext, tls: ServerTls) -> None:
    """Protocol versions, cipher suites and the client-certificate request of a server."""
    ctx.minimum_version = VERSIONS.get(tls.min_version, SERVER_MIN)
    ctx.maximum_version = VERSIONS.get(tls.max_version, SERVER_MAX)
    ctx.set_ciphers(":".join(tls.cipher_suites) if tls.cipher_suites else DEFAULT_CIPHERS)
    ctx.verify_mode = {
        "MUTUAL": ssl.CERT_REQUIRED,
        "OPTIONAL_MUTUAL": ssl.CERT_OPTIONAL,
    }.get(tls.mode, ssl.CERT_NONE)
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # Envoy (BoringSSL) refuses renegotiation too
    ctx.set_alpn_protocols(ALPN)


class ServerContext(ssl.SSLContext):
    """The context of one HTTPS server: its certificate, client CA and route table name.

    A connection's handshake switches to it (``TlsListener``), so the connection can ask its
    ``ssl_object.context`` which server (``route``) it belongs to.
    """

    route: str
    description: str


def server_context(route: str, server: GatewayServer) -> ServerContext:
    tls = server.tls
    assert tls is not None and tls.certificate is not None
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, tls.certificate.chain, tls.certificate.key)
    if tls.client_ca is not None:
        ctx.load_verify_locations(cadata=tls.client_ca.pem.decode("ascii"))
    _parameters(ctx, tls)
    ctx.route = route
    hosts = ", ".join(h.host for h in server.hosts)
    ctx.description = (
        f"{hosts}: {tls.mode}, certificate serial {tls.certificate.serial or '?'} "
        f"from {tls.certificate.source}"
    )
    return ctx


class TlsListener:
    """The certificates of one HTTPS port by SNI: an immutable snapshot, built per Runtime.

    ``base`` starts every handshake (parameters the port's servers share, no certificate); its
    ``sni_callback`` moves the connection to a server's context (module docstring).
    """

    def __init__(self, port: int, servers: Sequence[tuple[str, GatewayServer]]) -> None:
        if not servers:
            raise ValueError(f"port {port} has no HTTPS server")
        self.port = port
        self.contexts: list[ServerContext] = []
        self._exact: dict[str, ServerContext] = {}
        wildcards: list[tuple[str, ServerContext]] = []
        self._star: ServerContext | None = None
        for route, server in servers:
            ctx = server_context(route, server)
            self.contexts.append(ctx)
            for sh in server.hosts:
                name = sh.host.lower()
                if name == "*":
                    self._star = self._star or ctx
                elif name.startswith("*"):
                    wildcards.append((name[1:], ctx))
                else:
                    self._exact.setdefault(name, ctx)  # two servers, one name: the first wins
        # The longest suffix first: *.a.example.com before *.example.com (Envoy's order).
        self._wildcards = sorted(wildcards, key=lambda item: len(item[0]), reverse=True)
        self.default = self.contexts[0]
        first = servers[0][1].tls
        assert first is not None
        self.base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _parameters(self.base, first)
        self.base.sni_callback = self._sni

    def select(self, name: str | None) -> ServerContext:
        """The server for an SNI name: exact, then the longest wildcard, then ``*``, then the
        port's first server (also for no SNI at all)."""
        if not name:
            return self.default
        name = name.lower()
        found = self._exact.get(name)
        if found is not None:
            return found
        for suffix, ctx in self._wildcards:
            if len(name) > len(suffix) and name.endswith(suffix):
                return ctx
        return self._star or self.default

    def _sni(self, obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        # Called by OpenSSL once per handshake, with or without an SNI extension. The name is
        # kept on the SSL object for the access log (requested_server_name): ssl offers no
        # other way to read a server-side SNI afterwards.
        setattr(obj, _SNI_ATTRIBUTE, name)
        obj.context = self.select(name)

    def describe(self) -> list[str]:
        return [f"{ctx.route}: {ctx.description}" for ctx in self.contexts]


class ListenerContext(ssl.SSLContext):
    """What a TLS listening socket is created with: each accepted connection is wrapped by the
    base context of the current snapshot (``current``), so certificates rotate without
    re-binding (module docstring)."""

    current: Callable[[], TlsListener]

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.current().base.wrap_bio(
            incoming, outgoing, server_side, server_hostname, session
        )


def listener_context(current: Callable[[], TlsListener]) -> ListenerContext:
    ctx = ListenerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.current = current
    return ctx


def requested_server_name(obj: object) -> str | None:
    """The SNI a server-side connection was asked for (kept by ``TlsListener._sni``)."""
    name = getattr(obj, _SNI_ATTRIBUTE, None)
    return name if isinstance(name, str) else None


class DownstreamHandshake:
    """``ListenerState.tls`` for a proxy's HTTPS listener: once per connection, after its
    handshake, the dispatcher of the server its SNI chose, and what the access log tells."""

    def __init__(self, make_dispatcher: Callable[[str], Dispatcher]) -> None:
        self._make = make_dispatcher
        self._dispatchers: dict[str, Dispatcher] = {}

    def __call__(self, transport: asyncio.BaseTransport) -> tuple[Dispatcher, DownstreamTls]:
        obj = transport.get_extra_info("ssl_object")
        ctx = getattr(obj, "context", None)
        route = ctx.route if isinstance(ctx, ServerContext) else ""
        dispatcher = self._dispatchers.get(route)
        if dispatcher is None:
            dispatcher = self._dispatchers[route] = self._make(route)
        version = obj.version() if isinstance(obj, ssl.SSLObject) else None
        return dispatcher, DownstreamTls(version or "", requested_server_name(obj))


# --------------------------------------------------------------------------- endpoints


class UpstreamTls:
    """A cluster's TLS to its endpoints (DestinationRule ``trafficPolicy.tls``)."""

    __slots__ = ("auto_sni", "context", "sans", "sni")

    def __init__(self, tls: ClientTls, *, check_names: bool = True) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_ciphers(DEFAULT_CIPHERS)
        self.sni = tls.sni or None
        # SANs to check after the handshake: the DestinationRule's (or its ServiceEntry's,
        # filled in by proxy.istio_tls); none with insecureSkipVerify.
        self.sans = () if tls.insecure_skip_verify else tls.subject_alt_names
        self.auto_sni = not tls.sni
        if tls.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            if tls.ca is not None:
                ctx.load_verify_locations(cadata=tls.ca.pem.decode("ascii"))
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            # Envoy checks the name only with auto_san_validation: no sni and no SANs. Then
            # OpenSSL checks the certificate against server_hostname, the request's Host.
            ctx.check_hostname = check_names and self.auto_sni and not self.sans
        if tls.mode == "MUTUAL" and tls.certificate is not None:
            _load_chain(ctx, tls.certificate.chain, tls.certificate.key)
        self.context = ctx

    def check(self, transport: asyncio.BaseTransport) -> bytes | None:
        """After the handshake: Envoy's failure reason when the SANs do not match, else None."""
        if not self.sans:
            return None
        obj = transport.get_extra_info("ssl_object")
        decoded = obj.getpeercert() if isinstance(obj, ssl.SSLObject) else None
        for kind, value in _alt_names(decoded or {}):
            if kind in ("DNS", "URI", "IP Address") and any(
                _san_matches(value, want, kind == "DNS") for want in self.sans
            ):
                return None
        return _reason("SSL routines", "CERTIFICATE_VERIFY_FAILED", "verify SAN list")

    @staticmethod
    def failure_reason(exc: BaseException) -> bytes | None:
        """Envoy's transport failure reason for a failed handshake (None: not a TLS error)."""
        return failure_reason(exc)


def _san_matches(san: str, want: str, dns: bool) -> bool:
    """Envoy's exact SAN match; a DNS SAN may be a ``*.`` wildcard (``dnsNameMatch``)."""
    if san == want or (dns and san.lower() == want.lower()):
        return True
    if dns and san.startswith("*.") and len(want) > len(san) - 1:
        head = want[: len(want) - len(san) + 1]
        return "." not in head and want[len(head) :].lower() == san[1:].lower()
    return False


def _reason(library: str, reason: str, detail: str = "") -> bytes:
    """Envoy's TLS transport failure text (``SslSocket::drainErrorQueue``).

    Envoy prints ``TLS_error:|<code>:<library>:<function>:<REASON>:TLS_error_end`` from
    BoringSSL's error queue; OpenSSL through ``ssl`` gives the library and the reason (and, for
    a certificate, why it failed verification), not BoringSSL's numeric code and function name,
    so those two fields are left out.
    """
    text = f"TLS_error:|{library}:{reason}"
    if detail:
        text += f":verify cert failed: {detail}"
    return (text + ":TLS_error_end").encode("latin-1", "replace")


def failure_reason(exc: BaseException) -> bytes | None:
    """Envoy's ``transport failure reason`` for a failed upstream handshake (None: not TLS)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _reason("SSL routines", "CERTIFICATE_VERIFY_FAILED", exc.verify_message or "")
    if isinstance(exc, ssl.SSLError):
        library = f"{exc.library} routines" if exc.library else "SSL routines"
        return _reason(library, exc.reason or type(exc).__name__)
    if isinstance(exc, ConnectionResetError):
        return _reason("system library", "Connection reset by peer")
    return None
