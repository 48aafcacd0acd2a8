"""Certificate rotation: SIGHUP and --watch serve new certificates to new handshakes only.

The SIGHUP test runs ``python -m proxy run`` (uvloop, the real command line); the --watch tests
run the proxy in this process with a short poll interval.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from proxy_process import OPS_LOCAL, OPS_PORTS, eventually, proxy_process
from tls_certs import CA, Issued, connect, pods_yaml, secret_yaml

from proxy.demo import PodSet
from proxy.istio import load_config
from proxy.server import Proxy, RunOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(2) as podset:
        yield podset


def routes_yaml(pods: PodSet) -> str:
    return pods_yaml(pods.addresses, hosts="[test.com]", cookie=None)


def gateway_yaml(tls: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [test.com]
    tls: {tls}
"""


def install(issued: Issued, cert: Path, key: Path) -> None:
    """Put ``issued`` where the configuration points (as a rotation job would)."""
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)


async def test_sighup_rotates_the_certificate_and_open_connections_keep_working(
    pods: PodSet, tmp_path: Path
) -> None:
    ca = CA(tmp_path)
    first, second = ca.issue("test.com"), ca.issue("test.com")
    stranger = CA(tmp_path, "stranger").issue("test.com")
    cert, key = tmp_path / "test.crt", tmp_path / "test.key"
    install(first, cert, key)
    config = tmp_path / "config"
    config.mkdir()
    (config / "gw.yaml").write_text(
        gateway_yaml(f"{{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}")
    )
    (config / "routes.yaml").write_text(routes_yaml(pods))
    async with proxy_process(
        str(config), "--listen", "127.0.0.1:0", *OPS_PORTS, *OPS_LOCAL,
        "--access-log", "off", "--drain-time", "0",
    ) as proxy:  # fmt: skip
        port = await proxy.port("")
        await proxy.wait_for(rf"port 443 TLS .* serial {first.serial}")
        await proxy.wait_for("admin listening on")
        async with connect(port, ca, sni="test.com") as before:
            assert before.serial == first.serial
            assert (await before.get("/", host="test.com")).status == 200

            install(second, cert, key)
            mark = len(proxy.lines)
            proxy.signal(signal.SIGHUP)
            await proxy.wait_for(rf"reload: port 443 TLS .* serial {second.serial}", start=mark)
            await proxy.wait_for("reload: configuration applied", start=mark)
            async with connect(port, ca, sni="test.com") as after:
                assert after.serial == second.serial
                assert (await after.get("/", host="test.com")).status == 200
            # The keep-alive connection made before the rotation keeps its session.
            assert (await before.get("/again", host="test.com")).status == 200
            assert before.serial == first.serial

            # A key that is not the certificate's: the reload fails, says why, changes nothing.
            key.write_bytes(stranger.key_pem)
            mark = len(proxy.lines)
            proxy.signal(signal.SIGHUP)
            error = await proxy.wait_for(r"reload: .*privateKey", start=mark)
            assert f"{key} does not match the certificate {cert}" in error.string
            await proxy.wait_for("reload: failed", start=mark)
            async with connect(port, ca, sni="test.com") as later:
                assert later.serial == second.serial
                assert (await later.get("/", host="test.com")).status == 200
            assert (await before.get("/third", host="test.com")).status == 200
        proxy.signal(signal.SIGTERM)
        assert await proxy.exit_code() == 0


@pytest.mark.parametrize("where", ["secret", "credentials"])
async def test_watch_follows_a_rotated_secret(pods: PodSet, tmp_path: Path, where: str) -> None:
    """The Secret in the YAML folder, or the --credentials folder as Kubernetes mounts it."""
    ca = CA(tmp_path)
    first, second = ca.issue("test.com"), ca.issue("test.com")
    config = tmp_path / "config"
    config.mkdir()
    (config / "gw.yaml").write_text(gateway_yaml("{mode: SIMPLE, credentialName: test-cred}"))
    (config / "routes.yaml").write_text(routes_yaml(pods))
    mounted = tmp_path / "credentials" / "test-cred"
    mounted.mkdir(parents=True)

    def publish(issued: Issued) -> None:
        if where == "secret":
            (config / "secret.yaml").write_text(secret_yaml("test-cred", issued))
        else:
            install(issued, mounted / "tls.crt", mounted / "tls.key")

    publish(first)
    credentials = str(tmp_path / "credentials") if where == "credentials" else None
    options = RunOptions(
        listen=(("127.0.0.1", 0),),
        config_paths=(str(config),),
        credentials=credentials,
        watch=0.05,
    )
    proxy = Proxy(load_config([str(config)], credentials), options)
    await proxy.start()
    try:
        port = proxy.addresses[0][1]
        async with connect(port, ca, sni="test.com") as before:
            assert before.serial == first.serial
            runtime = proxy.runtime
            publish(second)
            await eventually(lambda: proxy.runtime is not runtime)
            async with connect(port, ca, sni="test.com") as after:
                assert after.serial == second.serial
                assert (await after.get("/", host="test.com")).status == 200
            assert (await before.get("/", host="test.com")).status == 200
    finally:
        await proxy.stop(grace=5)
