"""Gateway and DestinationRule TLS as loaded: certificates found, checked, errors that say where."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from tls_certs import CA, Issued, pods_yaml, secret_yaml

from proxy.__main__ import main
from proxy.admin import plain
from proxy.config import ConfigError
from proxy.istio import load_config, load_text

ROUTES = pods_yaml([("127.0.0.1", 80)], cookie=None)


def gateway(*servers: str, namespace: str = "default") -> str:
    body = "".join(f"\n  - {s}" for s in servers)
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: {namespace}}}
spec:
  servers:{body}
"""


def https(tls: str, *, port: int = 443, name: str = "https", hosts: str = '["*"]') -> str:
    return (
        f"{{port: {{number: {port}, name: {name}, protocol: HTTPS}}, hosts: {hosts}, tls: {tls}}}"
    )


def files(issued: Issued, mode: str = "SIMPLE", extra: str = "") -> str:
    return paths(issued.cert, issued.key, mode, extra)


def paths(cert: Path, key: Path, mode: str = "SIMPLE", extra: str = "") -> str:
    return f"{{mode: {mode}, serverCertificate: {cert}, privateKey: {key}{extra}}}"


def errors_of(*documents: str, credentials: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_text("\n---\n".join(documents), "t.yaml", credentials)
    return list(exc.value.errors)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path)


# --------------------------------------------------------------------------- certificates


def test_certificate_files_are_read_and_described(ca: CA) -> None:
    issued = ca.issue("test.com", "www.test.com")
    config = load_text(gateway(https(files(issued), hosts="[test.com]")) + "---" + ROUTES)
    (listener,) = config.listeners
    assert listener.protocol == "HTTPS"
    ((route, server),) = config.tls_servers(443)
    assert route == "https.443.https.gw.default"
    assert server.tls is not None and server.tls.certificate is not None
    cert = server.tls.certificate
    assert (cert.serial, cert.names) == (issued.serial, ("test.com", "www.test.com"))
    assert cert.source == str(issued.cert)
    assert config.tls_files == (str(issued.cert), str(issued.key))
    # /config_dump shows where the certificate came from and what it says, never the PEM.
    dumped = json.dumps(plain(config))
    assert issued.serial in dumped and "PRIVATE KEY" not in dumped and "BEGIN" not in dumped


def test_bad_certificates_name_the_gateway_the_server_and_the_file(ca: CA, tmp_path: Path) -> None:
    good = ca.issue("test.com")
    other = ca.issue("other.com")
    expired = ca.issue(
        "old.com",
        not_before=datetime.datetime(2020, 1, 1),
        not_after=datetime.datetime(2021, 1, 1),
    )
    missing = tmp_path / "missing.crt"
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    servers = [
        https(paths(missing, good.key), port=1001, name="a"),
        https(paths(good.cert, other.key), port=1002, name="b"),
        https(files(expired), port=1003, name="c"),
        https(paths(garbage, good.key), port=1004, name="d"),
        https(paths(tmp_path, good.key), port=1005, name="e"),
        https(files(good, "MUTUAL", f", caCertificates: {garbage}"), port=1006, name="f"),
    ]
    errors = errors_of(gateway(*servers), ROUTES)
    head = "t.yaml[1]: Gateway gw: spec.servers"
    assert errors == [
        f"{head}[0].tls.serverCertificate: server a (port 1001): cannot read {missing}: "
        "No such file or directory",
        f"{head}[1].tls.privateKey: server b (port 1002): {other.key} does not match the "
        f"certificate {good.cert}",
        f"{head}[2].tls.serverCertificate: server c (port 1003): {expired.cert}: the certificate "
        f"expired on Jan  1 00:00:00 2021 GMT (serial {expired.serial})",
        f"{head}[3].tls.serverCertificate: server d (port 1004): {garbage}: no PEM certificate "
        "(-----BEGIN CERTIFICATE-----) in it",
        f"{head}[4].tls.serverCertificate: server e (port 1005): cannot read {tmp_path}: "
        "Is a directory",
        f"{head}[5].tls.caCertificates: server f (port 1006): {garbage}: no PEM certificate "
        "(-----BEGIN CERTIFICATE-----) in it",
    ]


def test_credential_name_from_a_secret_in_the_yaml(ca: CA) -> None:
    test = ca.issue("test.com")
    clients = CA(ca.folder, "clients")
    yaml = [
        gateway(
            https("{mode: SIMPLE, credentialName: test-cred}", hosts="[test.com]"),
            https("{mode: MUTUAL, credentialName: mtls-cred}", port=8443, name="mtls"),
            namespace="istio-system",
        ),
        # The Gateway's namespace first; another namespace's Secret of the same name is not
        # taken when it has one.
        secret_yaml("test-cred", ca.issue("decoy.com"), namespace="elsewhere"),
        secret_yaml("test-cred", test, namespace="istio-system", string_data=True),
        secret_yaml("mtls-cred", test, namespace="istio-system"),
        secret_yaml("mtls-cred-cacert", ca=clients, namespace="istio-system"),
        ROUTES.replace("gateways: [gw]", "gateways: [istio-system/gw]"),
    ]
    config = load_text("\n---\n".join(yaml))
    (_, simple), (_, mutual) = config.tls_servers(443) + config.tls_servers(8443)
    assert simple.tls is not None and simple.tls.certificate is not None
    assert simple.tls.certificate.serial == test.serial
    assert simple.tls.certificate.source == "Secret istio-system/test-cred"
    assert mutual.tls is not None and mutual.tls.client_ca is not None
    assert mutual.tls.client_ca.source == "Secret istio-system/mtls-cred-cacert"
    assert mutual.tls.client_ca.pem == clients.path.read_bytes()


def test_credential_name_from_the_credentials_folder(ca: CA, tmp_path: Path) -> None:
    test = ca.issue("test.com")
    folder = tmp_path / "creds" / "test-cred"
    folder.mkdir(parents=True)
    (folder / "tls.crt").write_bytes(test.cert_pem)
    (folder / "tls.key").write_bytes(test.key_pem)
    (folder / "ca.crt").write_bytes(ca.path.read_bytes())
    (folder / "..data").mkdir()  # what a Kubernetes mount also has: skipped
    yaml = gateway(https("{mode: OPTIONAL_MUTUAL, credentialName: test-cred}")) + "---" + ROUTES
    config = load_text(yaml, credentials=str(tmp_path / "creds"))
    ((_, server),) = config.tls_servers(443)
    assert server.tls is not None and server.tls.certificate is not None
    assert server.tls.certificate.serial == test.serial
    assert server.tls.certificate.source == str(folder)
    # No NAME-cacert: the CA is the credential's own ca.crt (Istio's GetCaCert).
    assert server.tls.client_ca is not None and server.tls.client_ca.source == str(folder)
    assert sorted(config.tls_files) == sorted(
        str(folder / n) for n in ("ca.crt", "tls.crt", "tls.key")
    )


def test_credential_errors_say_where_they_looked(ca: CA, tmp_path: Path) -> None:
    test = ca.issue("test.com")
    opaque = "apiVersion: v1\nkind: Secret\nmetadata: {name: opaque}\nstringData: {username: x}\n"
    errors = errors_of(
        gateway(
            https("{mode: SIMPLE, credentialName: nowhere}", port=1001, name="a"),
            https("{mode: SIMPLE, credentialName: opaque}", port=1002, name="b"),
            https("{mode: MUTUAL, credentialName: no-ca}", port=1003, name="c"),
        ),
        opaque,
        secret_yaml("no-ca", test),
        ROUTES,
        credentials=str(tmp_path),
    )
    head = "t.yaml[1]: Gateway gw: spec.servers"
    assert errors == [
        f"{head}[0].tls.credentialName: server a (port 1001): Secret nowhere not found in the "
        f"loaded YAML or {tmp_path}/nowhere/",
        f"{head}[1].tls.credentialName: server b (port 1002): Secret default/opaque: didn't have "
        "expected keys (cert and key) or (tls.crt and tls.key); found: username",
        f"{head}[2].tls.credentialName: server c (port 1003): CA certificates: Secret "
        "default/no-ca: didn't have expected keys (cacert) or (ca.crt); found: tls.crt, tls.key",
    ]


# --------------------------------------------------------------------------- modes, ports


def test_modes_sticky_proxy_does_not_serve(ca: CA) -> None:
    errors = errors_of(
        gateway(https("{mode: ISTIO_MUTUAL}"), https("{mode: PASSTHROUGH}", port=444, name="p")),
        ROUTES,
    )
    assert errors == [
        "t.yaml[1]: Gateway gw: spec.servers[0].tls.mode: ISTIO_MUTUAL uses the mesh's workload "
        "certificates, which istiod issues to Istio's own proxies; sticky-proxy has no mesh "
        "identity: use MUTUAL with serverCertificate, privateKey and caCertificates (or a "
        "credentialName) instead"
    ]
    config = load_text(
        gateway(https("{mode: AUTO_PASSTHROUGH}", port=444, name="p")) + "---" + ROUTES
    )
    assert config.listeners == ()
    assert (
        "TLS passthrough (AUTO_PASSTHROUGH: raw TLS routed by SNI to tls routes) is not "
        in (config.warnings[0])
    )


def test_istio_validation_of_server_tls(ca: CA) -> None:
    good = ca.issue("test.com")
    errors = errors_of(
        gateway(
            https("{mode: SIMPLE}", port=1001, name="a"),
            https(files(good, "MUTUAL"), port=1002, name="b"),
            https(files(good, extra=", credentialName: x"), port=1003, name="c"),
            https(
                files(good, extra=", minProtocolVersion: TLSV1_3, maxProtocolVersion: TLSV1_2"),
                port=1004,
                name="d",
            ),
            https(files(good, extra=", subjectAltNames: [a]"), port=1005, name="e"),
        ),
        ROUTES,
    )  # fmt: skip
    head = "t.yaml[1]: Gateway gw: spec.servers"
    assert errors[:5] == [
        f"{head}[0].tls.serverCertificate: SIMPLE TLS requires a server certificate",
        f"{head}[0].tls.privateKey: SIMPLE TLS requires a private key",
        f"{head}[1].tls.caCertificates: MUTUAL TLS requires a client CA bundle",
        f"{head}[2].tls: only one of credential_name, credential_names, "
        "server_certificate/private_key, tls_certificates should be specified",
        f"{head}[3].tls: minProtocolVersion TLSV1_3 is above maxProtocolVersion TLSV1_2",
    ]
    assert (
        f"{head}[4].tls.subjectAltNames: checking client certificate names is not supported"
        in (errors[5])
    )


def test_cipher_suites_istio_drops_are_dropped_with_a_warning(ca: CA) -> None:
    good = ca.issue("test.com")
    extra = (
        ", cipherSuites: [ECDHE-RSA-AES256-GCM-SHA384, NOT-A-CIPHER, ECDHE-RSA-AES256-GCM-SHA384]"
    )
    config = load_text(gateway(https(files(good, extra=extra))) + "---" + ROUTES, "t.yaml")
    ((_, server),) = config.tls_servers(443)
    assert server.tls is not None and server.tls.cipher_suites == ("ECDHE-RSA-AES256-GCM-SHA384",)
    assert config.warnings == (
        "t.yaml[1]: Gateway gw: spec.servers[0].tls.cipherSuites: ignoring invalid cipher suites: "
        "['NOT-A-CIPHER']",
        "t.yaml[1]: Gateway gw: spec.servers[0].tls.cipherSuites: ignoring duplicate cipher "
        "suites: ['ECDHE-RSA-AES256-GCM-SHA384']",
    )


def test_one_port_is_http_or_https_and_its_servers_agree(ca: CA) -> None:
    test, other = ca.issue("test.com"), ca.issue("other.com")
    errors = errors_of(
        gateway(
            https(files(test), hosts="[test.com]"),
            https(
                files(other, "MUTUAL", f", caCertificates: {ca.path}"), name="o", hosts="[o.com]"
            ),
            "{port: {number: 443, name: plain, protocol: HTTP}, hosts: [p.com]}",
        ),
        ROUTES,
    )
    assert errors == [
        "t.yaml[1]: Gateway gw: spec.servers[0]: port 443 has HTTPS server https (Gateway "
        "default/gw) and HTTP server plain (Gateway default/gw): one listener cannot serve "
        "both; use another port for one of them"
    ]
    errors = errors_of(
        gateway(
            https(files(test), hosts="[test.com]"),
            https(
                files(other, "MUTUAL", f", caCertificates: {ca.path}"), name="o", hosts="[o.com]"
            ),
        ),
        ROUTES,
    )
    assert errors == [
        "t.yaml[1]: Gateway gw: spec.servers[1].tls: port 443: mode differs from server https "
        "(Gateway default/gw); the servers of one port must agree on them: sticky-proxy chooses "
        "a server's certificate by SNI during the handshake (Python's ssl sni_callback), after "
        "OpenSSL has fixed those for the connection"
    ]


# --------------------------------------------------------------------------- DestinationRule


def rule(tls: str, extra: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pods}}
spec:
  host: pods.local
  trafficPolicy:
    tls: {tls}{extra}
"""


PLAIN_GATEWAY = gateway("{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}")


def test_destination_rule_tls_reaches_the_cluster(ca: CA) -> None:
    client = ca.issue("proxy.example")
    tls = (
        f"{{mode: MUTUAL, clientCertificate: {client.cert}, privateKey: {client.key}, "
        f"caCertificates: {ca.path}, sni: pods.local}}"
    )
    port_level = (
        "\n    portLevelSettings:\n    - port: {number: 80}\n      tls: {mode: SIMPLE, sni: p80}"
    )
    config = load_text("\n---\n".join([PLAIN_GATEWAY, ROUTES, rule(tls, port_level)]))
    cluster = config.clusters["outbound|80||pods.local"]
    # The port-level policy replaces the top level wholesale, tls included (Istio).
    assert cluster.tls is not None
    assert (cluster.tls.mode, cluster.tls.sni, cluster.tls.ca) == ("SIMPLE", "p80", None)
    config = load_text("\n---\n".join([PLAIN_GATEWAY, ROUTES, rule(tls)]))
    tls_spec = config.clusters["outbound|80||pods.local"].tls
    assert tls_spec is not None and tls_spec.certificate is not None and tls_spec.ca is not None
    assert tls_spec.certificate.serial == client.serial
    assert tls_spec.ca.source == str(ca.path)


def test_istio_mutual_in_a_destination_rule_is_plain_http_with_a_warning() -> None:
    """Istio accepts it and mesh folders carry it; with no mesh identity to present, the
    connection stays plain (what a sidecar-less or PERMISSIVE pod takes), and says so."""
    config = load_text("\n---\n".join([PLAIN_GATEWAY, ROUTES, rule("{mode: ISTIO_MUTUAL}")]))
    assert config.clusters["outbound|80||pods.local"].tls is None
    [warning] = [w for w in config.warnings if "ISTIO_MUTUAL" in w]
    assert warning.startswith("<text>[4]: DestinationRule pods: spec.trafficPolicy.tls.mode: ")
    assert "connections to these pods are plain HTTP" in warning


def test_destination_rule_tls_errors(ca: CA) -> None:
    errors = errors_of(PLAIN_GATEWAY, ROUTES, rule("{mode: MUTUAL}"))
    assert errors == [
        "t.yaml[4]: DestinationRule pods: spec.trafficPolicy.tls.clientCertificate: client "
        "certificate required for mutual tls",
        "t.yaml[4]: DestinationRule pods: spec.trafficPolicy.tls.privateKey: private key "
        "required for mutual tls",
    ]
    errors = errors_of(
        PLAIN_GATEWAY,
        ROUTES,
        rule(f"{{mode: SIMPLE, insecureSkipVerify: true, caCertificates: {ca.path}}}"),
    )
    assert errors == [
        "t.yaml[4]: DestinationRule pods: spec.trafficPolicy.tls: cannot specify CaCertificates "
        "or CredentialName or SubjectAltNames when InsecureSkipVerify is set true"
    ]


def test_service_entry_subject_alt_names_stand_in(ca: CA) -> None:
    routes = pods_yaml(
        [("127.0.0.1", 80)], cookie=None, entry_extra="\n  subjectAltNames: [spiffe://x]"
    )
    config = load_text("\n---\n".join([PLAIN_GATEWAY, routes, rule("{mode: SIMPLE}")]))
    tls = config.clusters["outbound|80||pods.local"].tls
    assert tls is not None and tls.subject_alt_names == ("spiffe://x",) and tls.ca is None


# --------------------------------------------------------------------------- command line


def test_check_and_run_refuse_a_bad_certificate_and_check_suggests_secure(
    ca: CA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = ca.issue("test.com")
    config = tmp_path / "config"
    config.mkdir()
    (config / "gw.yaml").write_text(gateway(https("{mode: SIMPLE, credentialName: test-cred}")))
    (config / "routes.yaml").write_text(
        ROUTES + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: sticky}\nspec:\n  host: pods.local\n  trafficPolicy:\n"
        "    loadBalancer: {consistentHash: {httpCookie: {name: ISTIOID, ttl: 60s}}}\n"
    )
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert (
        "spec.servers[0].tls.credentialName: server https (port 443): Secret test-cred not found"
        in err
    )
    assert main(["run", str(config), "--listen", "127.0.0.1:0", "--admin-port", "off"]) == 2
    assert "Secret test-cred not found" in capsys.readouterr().err

    creds = tmp_path / "creds" / "test-cred"
    creds.mkdir(parents=True)
    (creds / "tls.crt").write_bytes(good.cert_pem)
    (creds / "tls.key").write_bytes(good.key_pem)
    assert main(["check", str(config), "--credentials", str(tmp_path / "creds")]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ok: 2 file(s), listeners on port(s) 443")
    assert (
        "warning: " + str(config / "routes.yaml") + "[1]: VirtualService default/vs: the cookie "
        "ISTIOID its DestinationRule generates is served on HTTPS (Gateway default/gw server "
        "https port 443) without the Secure attribute (Istio adds none either); add "
        "`attributes: [{name: Secure}]` to httpCookie to keep it off plain HTTP"
    ) in out.err


def test_load_config_reads_secrets_from_files(ca: CA, tmp_path: Path) -> None:
    test = ca.issue("test.com")
    (tmp_path / "gw.yaml").write_text(
        gateway(https("{mode: SIMPLE, credentialName: c}")) + "---" + ROUTES
    )
    (tmp_path / "secret.yml").write_text(secret_yaml("c", test))
    config = load_config([str(tmp_path)])
    ((_, server),) = config.tls_servers(443)
    assert server.tls is not None and server.tls.certificate is not None
    assert server.tls.certificate.serial == test.serial
    bad = secret_yaml("c", test).split("  tls.key:")[0] + '  tls.key: "not base64!"\n'
    (tmp_path / "secret.yml").write_text(bad)
    with pytest.raises(ConfigError) as exc:
        load_config([str(tmp_path)])
    assert list(exc.value.errors) == [
        f"{tmp_path}/gw.yaml[1]: Gateway gw: spec.servers[0].tls.credentialName: server https "
        "(port 443): Secret default/c: didn't have expected keys (cert and key) or (tls.crt and "
        "tls.key); found: tls.crt",
        f'{tmp_path}/secret.yml: Secret c: data["tls.key"]: not valid base64 (use stringData for '
        "plain text)",
    ]
