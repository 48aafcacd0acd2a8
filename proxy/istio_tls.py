"""Istio's TLS settings -> the model: Gateway server ``tls``, DestinationRule ``tls``, Secrets.

Theory
------
* **Gateway servers** (``ServerTLSSettings``): an HTTPS server with ``mode`` SIMPLE, MUTUAL or
  OPTIONAL_MUTUAL terminates TLS here. PASSTHROUGH (the default mode) and AUTO_PASSTHROUGH route
  raw TLS by SNI to ``tls`` routes, which sticky-proxy does not do: such a server is skipped
  with a warning. ISTIO_MUTUAL is an error: it needs the mesh identity istiod issues to the
  gateway's Envoy. Istio's validation (``validateTLSOptions``) is applied: one certificate
  source, a server certificate and key, a client CA for MUTUAL, invalid and duplicate cipher
  suites dropped with a warning. Settings sticky-proxy cannot honour and that would let in
  clients Envoy refuses (``subjectAltNames``, ``verifyCertificateSpki``/``Hash``, ``caCrl``) are
  errors, not warnings.
* **DestinationRule** ``trafficPolicy.tls`` (``ClientTLSSettings``): SIMPLE and MUTUAL; DISABLE
  is no TLS; ISTIO_MUTUAL (the same mesh identity) is plain HTTP with a warning. Istio's
  ``ValidateTLSSettings`` rules apply; a ServiceEntry's ``subjectAltNames`` stand in for a rule
  without SANs (``constructUpstreamTLS``).
* **Certificates** are read when the configuration loads, so ``check`` reports what ``run``
  would refuse: ``serverCertificate``/``privateKey``/``caCertificates`` (files), or
  ``credentialName``, looked up as Istio's SDS does: a ``kind: Secret`` in the loaded YAML
  (the Gateway's namespace first, else the only Secret of that name), else the folder given
  with ``--credentials`` (``DIR/NAME/tls.crt``, ``tls.key``, ``ca.crt``: a mounted Secret).
  Keys ``cert``/``key``/``cacert`` (an Opaque Secret) come before ``tls.crt``/``tls.key``/
  ``ca.crt`` (``ExtractCertInfo``); the CA of NAME is NAME-cacert's, else NAME's own
  (``GetCaCert``). A file or key that cannot be read, a key that does not match, an expired
  certificate: an error naming the Gateway (or DestinationRule), the server and the file.
* **One port, several servers**: their certificates are chosen by SNI (``proxy.tls``); they
  must agree on what OpenSSL fixes before the SNI is known (mode, versions, ciphers), and a
  port is HTTPS or HTTP, not both.

A cookie generated on HTTPS without ``Secure`` is linted by ``proxy.istio_lint``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from proxy.config import (
    TLS_VERSIONS,
    Certificate,
    ClientTls,
    GatewayServer,
    GatewaySpec,
    ServerTls,
    TrustBundle,
)
from proxy.istio_names import NOT_SUPPORTED, Meta, words
from proxy.istio_reader import Reader, join_path, type_name
from proxy.tls import TlsMaterialError, check_ca_bundle, check_ciphers, load_certificate

SERVER_TLS_FIELDS = words(
    "httpsRedirect mode serverCertificate privateKey caCertificates caCrl credentialName "
    "credentialNames caCertCredentialName tlsCertificates subjectAltNames verifyCertificateSpki "
    "verifyCertificateHash minProtocolVersion maxProtocolVersion cipherSuites insecureSkipVerify"
)
CLIENT_TLS_FIELDS = words(
    "mode clientCertificate privateKey caCertificates credentialName subjectAltNames sni "
    "insecureSkipVerify caCrl"
)
_SERVER_MODES = words("PASSTHROUGH SIMPLE MUTUAL AUTO_PASSTHROUGH ISTIO_MUTUAL OPTIONAL_MUTUAL")
_CLIENT_MODES = words("DISABLE SIMPLE MUTUAL ISTIO_MUTUAL")
# Istio's ValidCipherSuites (pkg/config/security): what Gateway cipherSuites may name.
VALID_CIPHERS = frozenset(
    words(
        "ECDHE-ECDSA-AES128-GCM-SHA256 ECDHE-RSA-AES128-GCM-SHA256 ECDHE-ECDSA-AES256-GCM-SHA384 "
        "ECDHE-RSA-AES256-GCM-SHA384 ECDHE-ECDSA-CHACHA20-POLY1305 ECDHE-RSA-CHACHA20-POLY1305 "
        "ECDHE-ECDSA-AES128-SHA ECDHE-RSA-AES128-SHA ECDHE-ECDSA-AES256-SHA ECDHE-RSA-AES256-SHA "
        "AES128-GCM-SHA256 AES256-GCM-SHA384 AES128-SHA AES256-SHA DES-CBC3-SHA"
    )
)
_MESH_IDENTITY = (
    "ISTIO_MUTUAL uses the mesh's workload certificates, which istiod issues to Istio's own "
    "proxies; sticky-proxy has no mesh identity"
)
_MAX_CREDENTIAL_FILE = 1024 * 1024  # a certificate chain or key larger than this is not one


# --------------------------------------------------------------------------- Gateway servers


def read_server_tls(r: Reader, tls: Mapping[str, object], path: str) -> ServerTls | None:
    """An HTTPS server's ``tls`` (already checked for unknown fields), or None: skipped
    (passthrough, warned) or invalid (errors recorded)."""
    mode = r.enum(tls, "mode", path, _SERVER_MODES) or "PASSTHROUGH"
    if mode == "ISTIO_MUTUAL":
        r.error(
            join_path(path, "mode"),
            f"{_MESH_IDENTITY}: use MUTUAL with serverCertificate, privateKey and "
            "caCertificates (or a credentialName) instead",
        )
        return None
    if mode in ("PASSTHROUGH", "AUTO_PASSTHROUGH"):
        r.warn(
            join_path(path, "mode"),
            f"TLS passthrough ({mode}: raw TLS routed by SNI to tls routes) is {NOT_SUPPORTED}; "
            "server skipped (use SIMPLE or MUTUAL to terminate TLS here)",
        )
        return None
    for key, why in (
        ("subjectAltNames", "checking client certificate names"),
        ("verifyCertificateSpki", "pinning client certificates"),
        ("verifyCertificateHash", "pinning client certificates"),
        ("caCrl", "certificate revocation lists"),
    ):
        if tls.get(key):
            r.error(
                join_path(path, key),
                f"{why} is {NOT_SUPPORTED}; it would accept clients Envoy refuses",
            )
    if tls.get("insecureSkipVerify"):
        r.error(join_path(path, "insecureSkipVerify"), f"{NOT_SUPPORTED} on Gateway servers")
    for key in ("credentialNames", "tlsCertificates"):
        if tls.get(key):
            r.error(
                join_path(path, key),
                f"several certificates per server (RSA and ECDSA) are {NOT_SUPPORTED}; "
                "give one with serverCertificate/privateKey or credentialName",
            )
    cert = r.string(tls, "serverCertificate", path) or ""
    key = r.string(tls, "privateKey", path) or ""
    ca = r.string(tls, "caCertificates", path) or ""
    credential = r.string(tls, "credentialName", path) or ""
    ca_credential = r.string(tls, "caCertCredentialName", path) or ""
    sources = [bool(cert and key), bool(credential)]
    if sum(sources) > 1:
        r.error(
            path,
            "only one of credential_name, credential_names, server_certificate/private_key, "
            "tls_certificates should be specified",
        )
    mutual = mode in ("MUTUAL", "OPTIONAL_MUTUAL")
    if not credential:
        prefix = "MUTUAL TLS" if mutual else "SIMPLE TLS"
        if not cert:
            r.error(join_path(path, "serverCertificate"), f"{prefix} requires a server certificate")
        if not key:
            r.error(join_path(path, "privateKey"), f"{prefix} requires a private key")
        if mutual and not ca and not ca_credential:
            r.error(join_path(path, "caCertificates"), f"{prefix} requires a client CA bundle")
    low = r.enum(tls, "minProtocolVersion", path, TLS_VERSIONS) or "TLS_AUTO"
    high = r.enum(tls, "maxProtocolVersion", path, TLS_VERSIONS) or "TLS_AUTO"
    if "TLS_AUTO" not in (low, high) and TLS_VERSIONS.index(low) > TLS_VERSIONS.index(high):
        r.error(path, f"minProtocolVersion {low} is above maxProtocolVersion {high}")
    suites = _cipher_suites(r, tls, path)
    if low in ("TLSV1_0", "TLSV1_1") and not suites:
        r.warn(
            join_path(path, "minProtocolVersion"),
            "TLS version below TLSV1_2 require setting compatible ciphers as by default they "
            "no longer include compatible ciphers.",
        )
    return ServerTls(
        mode,  # type: ignore[arg-type]  # one of the three, checked above
        server_certificate=cert,
        private_key=key,
        ca_certificates=ca,
        credential_name=credential,
        ca_credential_name=ca_credential,
        min_version=low,
        max_version=high,
        cipher_suites=suites,
        where=path,
    )


def _cipher_suites(r: Reader, tls: Mapping[str, object], path: str) -> tuple[str, ...]:
    """Istio's ``FilterCipherSuites``: invalid and duplicate names dropped, with a warning."""
    kept: list[str] = []
    invalid: list[str] = []
    duplicate: list[str] = []
    for _, suite in r.string_list(tls, "cipherSuites", path):
        if suite and suite not in VALID_CIPHERS and (suite[0].isalnum() and suite != "ALL"):
            invalid.append(suite)
        elif suite in kept:
            duplicate.append(suite)
        elif suite:
            kept.append(suite)
    here = join_path(path, "cipherSuites")
    if invalid:
        r.warn(here, f"ignoring invalid cipher suites: {sorted(set(invalid))}")
    if duplicate:
        r.warn(here, f"ignoring duplicate cipher suites: {sorted(set(duplicate))}")
    if kept:
        try:
            check_ciphers(kept)
        except TlsMaterialError as exc:
            r.error(here, str(exc))
    return tuple(kept)


# --------------------------------------------------------------------------- DestinationRule


def read_client_tls(r: Reader, tls: Mapping[str, object], path: str) -> ClientTls | None:
    """A traffic policy's ``tls`` (fields checked), or None: DISABLE, or invalid."""
    mode = r.enum(tls, "mode", path, _CLIENT_MODES) or "DISABLE"
    if mode == "ISTIO_MUTUAL":
        # Istio accepts it, and folders written for a mesh carry it (bookinfo's
        # destination-rule-all-mtls.yaml). Pods without a sidecar, or with PERMISSIVE mTLS
        # (Istio's default), take plain HTTP, so the rule still serves; STRICT ones refuse the
        # connection, which the 503's reset reason then shows. Loud, not silent: a warning.
        r.warn(
            join_path(path, "mode"),
            f"{_MESH_IDENTITY}, so connections to these pods are plain HTTP (pods without a "
            "sidecar or with PERMISSIVE mTLS accept it); for TLS use MUTUAL with "
            "clientCertificate, privateKey and caCertificates (or a credentialName), or SIMPLE",
        )
        return None
    if tls.get("caCrl"):
        r.error(
            join_path(path, "caCrl"),
            f"certificate revocation lists are {NOT_SUPPORTED}; it would accept endpoints Envoy "
            "refuses",
        )
    cert = r.string(tls, "clientCertificate", path) or ""
    key = r.string(tls, "privateKey", path) or ""
    ca = r.string(tls, "caCertificates", path) or ""
    credential = r.string(tls, "credentialName", path) or ""
    sni = r.string(tls, "sni", path) or ""
    sans = tuple(name for _, name in r.string_list(tls, "subjectAltNames", path))
    insecure = bool(r.boolean(tls, "insecureSkipVerify", path))
    if mode == "DISABLE":
        return None
    # Istio's ValidateTLSSettings.
    if insecure and (ca or sans or (credential and mode == "SIMPLE")):
        what = "CaCertificates or CredentialName or SubjectAltNames"
        if mode == "MUTUAL":
            what = "CaCertificates or SubjectAltNames"
        r.error(path, f"cannot specify {what} when InsecureSkipVerify is set true")
    if credential and (cert or ca or key):
        r.error(
            path,
            "cannot specify client certificates or CA certificate or CA CRL If credentialName "
            "is set",
        )
    elif mode == "MUTUAL" and not credential:
        if not cert:
            r.error(
                join_path(path, "clientCertificate"), "client certificate required for mutual tls"
            )
        if not key:
            r.error(join_path(path, "privateKey"), "private key required for mutual tls")
    return ClientTls(
        mode,  # type: ignore[arg-type]  # SIMPLE or MUTUAL here
        client_certificate=cert,
        private_key=key,
        ca_certificates=ca,
        credential_name=credential,
        sni=sni,
        subject_alt_names=sans,
        insecure_skip_verify=insecure,
        where=path,
    )


# --------------------------------------------------------------------------- Secrets


@dataclass(slots=True)
class ParsedSecret:
    """A Kubernetes Secret of the loaded YAML (``data`` decoded, ``stringData`` merged in)."""

    meta: Meta
    reader: Reader
    type: str
    data: dict[str, bytes]


SECRET_FIELDS = ("apiVersion", "kind", "metadata", "type", "data", "stringData", "immutable")


def read_secret(r: Reader, meta: Meta, doc: Mapping[str, object]) -> ParsedSecret | None:
    """A ``kind: Secret`` document (``apiVersion: v1``), for ``credentialName``."""
    secret_type = r.string(doc, "type", "") or "Opaque"
    data: dict[str, bytes] = {}
    raw = doc.get("data")
    if raw is not None and not isinstance(raw, dict):
        r.error("data", f"expected an object of base64 strings, got {type_name(raw)}")
    elif isinstance(raw, dict):
        for name, value in raw.items():
            here = join_path("data", str(name))
            if not isinstance(value, str):
                r.error(here, f"expected a base64 string, got {type_name(value)}")
                continue
            try:
                data[str(name)] = base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                r.error(here, "not valid base64 (use stringData for plain text)")
    # Kubernetes writes stringData over data, key by key.
    for name, value in (r.string_map(doc, "stringData", "") or {}).items():
        data[name] = value.encode("utf-8")
    r.boolean(doc, "immutable", "")
    return ParsedSecret(meta, r, secret_type, data)


@dataclass(frozen=True, slots=True)
class Found:
    """A credential found: its keys, where it came from, the files read (a folder's)."""

    data: Mapping[str, bytes]
    source: str
    files: tuple[str, ...] = ()


class Credentials:
    """Where ``credentialName`` is looked up: the loaded Secrets, then ``--credentials DIR``.

    ``files`` collects every file read (certificate paths of the YAML too), for ``--watch``.
    """

    def __init__(self, secrets: Sequence[ParsedSecret], folder: str | None) -> None:
        self._by_name: dict[str, list[ParsedSecret]] = {}
        for secret in secrets:
            self._by_name.setdefault(secret.meta.name, []).append(secret)
        self.folder = folder
        self.files: list[str] = []

    def find(self, name: str, namespace: str) -> Found | str:
        """The Secret's data, or why it was not found."""
        found = self._by_name.get(name, [])
        local = [s for s in found if s.meta.namespace == namespace]
        if local or len(found) == 1:
            secret = (local or found)[0]
            return Found(secret.data, f"Secret {secret.meta.key}")
        if len(found) > 1:
            listed = ", ".join(s.meta.key for s in found)
            return f"Secret {name} is ambiguous: {listed} (none in namespace {namespace})"
        if self.folder is not None:
            folder = os.path.join(self.folder, name)
            if os.path.isdir(folder):
                return self._read_folder(folder)
        places = "the loaded YAML"
        if self.folder is not None:
            places += f" or {os.path.join(self.folder, name)}{os.sep}"
        return f"Secret {name} not found in {places}"

    def _read_folder(self, folder: str) -> Found:
        """A mounted Secret: one file per key (Kubernetes' ``..data`` links skipped)."""
        data: dict[str, bytes] = {}
        files: list[str] = []
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.startswith("..") or not os.path.isfile(path):
                continue
            try:
                data[entry] = _read_file(path)
            except OSError:
                continue  # reported when the key is needed, by name
            files.append(path)
        self.files.extend(files)
        return Found(data, folder, tuple(files))

    def read(self, path: str) -> bytes:
        """A certificate file named in the YAML (OSError when it cannot be read)."""
        data = _read_file(path)
        self.files.append(path)
        return data


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(_MAX_CREDENTIAL_FILE + 1)
    if len(data) > _MAX_CREDENTIAL_FILE:
        raise OSError(f"larger than {_MAX_CREDENTIAL_FILE} bytes: not a certificate or key")
    return data


def _keys(data: Mapping[str, bytes], pairs: Sequence[tuple[str, ...]]) -> tuple[bytes, ...] | str:
    """The first key group with values (Istio's ``ExtractCertInfo``/``ExtractRoot`` order)."""
    for group in pairs:
        if all(data.get(k) for k in group):
            return tuple(data[k] for k in group)
    for group in pairs:
        if all(k in data for k in group):
            return f"found keys {' and '.join(repr(k) for k in group)}, but they were empty"
    found = ", ".join(sorted(data)) or "none"
    wanted = " or ".join("(" + " and ".join(g) + ")" for g in pairs)
    return f"didn't have expected keys {wanted}; found: {found}"


_CERT_KEYS = (("cert", "key"), ("tls.crt", "tls.key"))
_CA_KEYS = (("cacert",), ("ca.crt",))


# --------------------------------------------------------------------------- resolution


def _certificate(
    r: Reader,
    path: str,
    what: str,
    chain: bytes,
    key: bytes,
    source: str,
    files: tuple[str, ...],
    key_path: str,
) -> Certificate | None:
    """``source`` is a Secret or folder, or the certificate file when ``files`` are the two
    files: a message then names the one at fault."""
    try:
        info = load_certificate(chain, key)
    except TlsMaterialError as exc:
        cert_name, key_name = files if len(files) == 2 and key_path != path else (source, source)
        if exc.mismatch:
            r.error(key_path, f"{what}: {key_name} does not match the certificate {cert_name}")
        else:
            r.error(path, f"{what}: {cert_name}: {exc}")
        return None
    return Certificate(chain, key, source, info.serial, info.not_after, info.names, files)


def _bundle(
    r: Reader, path: str, what: str, pem: bytes, source: str, files: tuple[str, ...]
) -> TrustBundle | None:
    try:
        check_ca_bundle(pem)
    except TlsMaterialError as exc:
        r.error(path, f"{what}: {source}: {exc}")
        return None
    return TrustBundle(pem, source, files)


def _file(r: Reader, creds: Credentials, path: str, what: str, name: str) -> bytes | None:
    try:
        return creds.read(name)
    except OSError as exc:
        r.error(path, f"{what}: cannot read {name}: {exc.strerror or exc}")
        return None


def _credential_pair(
    r: Reader, creds: Credentials, path: str, what: str, name: str, namespace: str
) -> tuple[bytes, bytes, str, tuple[str, ...]] | None:
    found = creds.find(name, namespace)
    if isinstance(found, str):
        r.error(path, f"{what}: {found}")
        return None
    pair = _keys(found.data, _CERT_KEYS)
    if isinstance(pair, str):
        r.error(path, f"{what}: {found.source}: {pair}")
        return None
    return pair[0], pair[1], found.source, found.files


def _credential_ca(
    r: Reader,
    creds: Credentials,
    path: str,
    what: str,
    name: str,
    namespace: str,
    *,
    suffixed: bool,
) -> TrustBundle | None:
    """Istio's ``GetCaCert``: NAME-cacert, else NAME itself (``suffixed``); keys cacert/ca.crt."""
    found = creds.find(name + "-cacert", namespace) if suffixed else "-"
    if isinstance(found, str):
        found = creds.find(name, namespace)
    if isinstance(found, str):
        r.error(path, f"{what}: CA certificates: {found}")
        return None
    ca = _keys(found.data, _CA_KEYS)
    if isinstance(ca, str):
        r.error(path, f"{what}: CA certificates: {found.source}: {ca}")
        return None
    return _bundle(r, path, what, ca[0], found.source, found.files)


def _file_pair(
    r: Reader,
    creds: Credentials,
    path: str,
    what: str,
    cert_field: str,
    cert_file: str,
    key_file: str,
) -> Certificate | None:
    """A certificate and key named by file paths (``cert_field`` and ``privateKey``)."""
    cpath = join_path(path, cert_field)
    kpath = join_path(path, "privateKey")
    chain = _file(r, creds, cpath, what, cert_file)
    key = _file(r, creds, kpath, what, key_file)
    if chain is None or key is None:
        return None
    return _certificate(r, cpath, what, chain, key, cert_file, (cert_file, key_file), kpath)


def _ca_file(r: Reader, creds: Credentials, path: str, what: str, name: str) -> TrustBundle | None:
    apath = join_path(path, "caCertificates")
    pem = _file(r, creds, apath, what, name)
    return None if pem is None else _bundle(r, apath, what, pem, name, (name,))


def _credential(
    r: Reader, creds: Credentials, path: str, what: str, name: str, namespace: str
) -> Certificate | None:
    """A certificate and key named by ``credentialName``."""
    pair = _credential_pair(r, creds, path, what, name, namespace)
    return None if pair is None else _certificate(r, path, what, *pair, key_path=path)


def resolve_server_tls(
    r: Reader, gateway: GatewaySpec, server: GatewayServer, creds: Credentials
) -> GatewayServer:
    """``server`` with its certificate (and client CA) read; errors recorded on ``r``."""
    tls = server.tls
    if tls is None:
        return server
    path, namespace = tls.where, gateway.namespace
    what = f"server {server.port_name} (port {server.port})"
    certificate: Certificate | None = None
    client_ca: TrustBundle | None = None
    cpath = join_path(path, "credentialName")
    if tls.credential_name:
        certificate = _credential(r, creds, cpath, what, tls.credential_name, namespace)
    elif tls.server_certificate and tls.private_key:
        certificate = _file_pair(
            r, creds, path, what, "serverCertificate", tls.server_certificate, tls.private_key
        )
    if tls.mode != "SIMPLE":
        if tls.ca_certificates:
            client_ca = _ca_file(r, creds, path, what, tls.ca_certificates)
        elif tls.ca_credential_name:
            apath = join_path(path, "caCertCredentialName")
            name = tls.ca_credential_name
            client_ca = _credential_ca(r, creds, apath, what, name, namespace, suffixed=False)
        elif tls.credential_name:
            name = tls.credential_name
            client_ca = _credential_ca(r, creds, cpath, what, name, namespace, suffixed=True)
    return replace(server, tls=replace(tls, certificate=certificate, client_ca=client_ca))


def resolve_client_tls(
    r: Reader, tls: ClientTls, creds: Credentials, what: str, namespace: str
) -> ClientTls:
    """``tls`` with its client certificate and CA read; errors recorded on ``r``."""
    path = tls.where
    certificate: Certificate | None = None
    ca: TrustBundle | None = None
    mutual = tls.mode == "MUTUAL"
    if tls.credential_name:
        cpath, name = join_path(path, "credentialName"), tls.credential_name
        if mutual:
            certificate = _credential(r, creds, cpath, what, name, namespace)
        if not tls.insecure_skip_verify:
            ca = _credential_ca(r, creds, cpath, what, name, namespace, suffixed=True)
    else:
        if mutual and tls.client_certificate and tls.private_key:
            certificate = _file_pair(
                r, creds, path, what, "clientCertificate", tls.client_certificate, tls.private_key
            )
        if tls.ca_certificates:
            ca = _ca_file(r, creds, path, what, tls.ca_certificates)
    return replace(tls, certificate=certificate, ca=ca)


# --------------------------------------------------------------------------- one port


@dataclass(slots=True)
class PortServers:
    """The served servers of one port, as the listener pass sees them."""

    plain: list[tuple[str, GatewayServer, Reader, str]] = field(default_factory=list)
    secure: list[tuple[str, GatewayServer, Reader, str]] = field(default_factory=list)


def check_port(port: int, servers: PortServers) -> None:
    """One listener per port: all HTTP or all HTTPS, and HTTPS servers that agree on what
    OpenSSL fixes before the SNI chooses one of them (module docstring)."""
    if servers.plain and servers.secure:
        gw, server, r, path = servers.secure[0]
        other_gw, other, _, _ = servers.plain[0]
        r.error(
            path,
            f"port {port} has HTTPS server {server.port_name} (Gateway {gw}) and HTTP server "
            f"{other.port_name} (Gateway {other_gw}): one listener cannot serve both; "
            "use another port for one of them",
        )
        return
    if len(servers.secure) < 2:
        return
    first_gw, first, _, _ = servers.secure[0]
    assert first.tls is not None
    want = _shared(first.tls)
    for _, server, r, path in servers.secure[1:]:
        assert server.tls is not None
        got = _shared(server.tls)
        if got != want:
            differ = [name for name, a, b in zip(_SHARED, want, got, strict=True) if a != b]
            r.error(
                join_path(path, "tls"),
                f"port {port}: {', '.join(differ)} {'differs' if len(differ) == 1 else 'differ'} "
                f"from server {first.port_name} "
                f"(Gateway {first_gw}); the servers of one port must agree on them: sticky-proxy "
                "chooses a server's certificate by SNI during the handshake (Python's ssl "
                "sni_callback), after OpenSSL has fixed those for the connection",
            )


_SHARED = ("mode", "minProtocolVersion", "maxProtocolVersion", "cipherSuites")


def _shared(tls: ServerTls) -> tuple[object, ...]:
    return (tls.mode, tls.min_version, tls.max_version, tls.cipher_suites)
