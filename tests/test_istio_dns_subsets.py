"""Label subsets with DNS discovery: endpoint names carry the labels DNS answers cannot.

Istio's answer, and sticky-proxy's: a ServiceEntry with ``resolution: DNS`` whose endpoints name
each version (compose services ``reviews-v1``, ``reviews-v2``) with its labels; every name is
resolved and refreshed, and each address inherits its endpoint's labels.  Here the names are
``localhost`` (127.0.0.1) at a different port per version, with real demo pods behind them.
Without such endpoints a label subset is empty, and ``check`` shows the ServiceEntry to add.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.resolver import ThreadedResolver
from conftest import running
from proxy_process import proxy_with_hosts, unshare_available

from proxy.config import Config, DnsEndpoints, Endpoint, StaticEndpoints
from proxy.demo import PodSet
from proxy.discovery import EndpointWatcher
from proxy.hashing import RingHash, xxh64
from proxy.istio import load_config, load_text
from proxy.server import RunOptions

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "compose-versions"
REVIEWS = "reviews.default.svc.cluster.local"
V1 = (("version", "v1"),)
V2 = (("version", "v2"),)

GATEWAY_AND_ROUTES = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews.test]
  gateways: [gw]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 0s}}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def service_entry(endpoints: Sequence[tuple[str, int, str]], resolution: str = "DNS") -> str:
    """The ServiceEntry of ``reviews``: one endpoint per ``(name, port, version)``."""
    listed = "".join(
        f"  - {{address: {name}, ports: {{http: {port}}}, labels: {{version: {version}}}}}\n"
        for name, port, version in endpoints
    )
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [{REVIEWS}]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: {resolution}
  endpoints:
{listed}"""


def load(*docs: str) -> Config:
    return load_text(GATEWAY_AND_ROUTES + "".join(docs), "t.yaml")


def subset_warnings(config: Config) -> list[str]:
    return [w for w in config.warnings if "spec.subsets" in w]


# --------------------------------------------------------------------------- compiled


def test_dns_endpoint_names_are_split_into_subsets_by_their_labels() -> None:
    config = load(service_entry([("reviews-v1", 9081, "v1"), ("reviews-v2", 9082, "v2")]))
    v1 = config.clusters[f"outbound|9080|v1|{REVIEWS}"].endpoints
    v2 = config.clusters[f"outbound|9080|v2|{REVIEWS}"].endpoints
    assert v1 == DnsEndpoints((Endpoint("reviews-v1", 9081, labels=V1),))
    assert v2 == DnsEndpoints((Endpoint("reviews-v2", 9082, labels=V2),))
    assert subset_warnings(config) == []


async def test_the_labels_survive_a_real_dns_resolution() -> None:
    config = load(service_entry([("localhost", 9081, "v1"), ("localhost", 9082, "v2")]))
    resolved: dict[str, tuple[Endpoint, ...]] = {}
    resolver = ThreadedResolver()
    try:
        for subset in ("v1", "v2"):
            name = f"outbound|9080|{subset}|{REVIEWS}"
            found: list[tuple[Endpoint, ...]] = []
            watcher = EndpointWatcher(
                name, config.clusters[name].endpoints, found.append, resolver=resolver
            )
            assert await watcher.refresh_once()
            resolved[subset] = found[0]
    finally:
        await resolver.close()
    assert [(ep.key, ep.labels) for ep in resolved["v1"]] == [("127.0.0.1:9081", V1)]
    assert [(ep.key, ep.labels) for ep in resolved["v2"]] == [("127.0.0.1:9082", V2)]


# --------------------------------------------------------------------------- end to end


DNS_LOOPBACK = RunOptions(listen=(("127.0.0.1", 0),), dns_refresh=0.2)


async def pod_for(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    async with session.get(url, headers={"Host": "reviews.test", **headers}) as resp:
        assert resp.status == 200, await resp.text()
        pod = (await resp.json())["pod"]
        assert isinstance(pod, str)
        return pod


async def test_versions_route_to_their_pods_and_sessions_stick_within_a_version() -> None:
    names = ["pod-v1a", "pod-v1b", "pod-v2"]
    async with PodSet(3, names=names) as pods:
        (_, p1a), (_, p1b), (_, p2) = pods.addresses
        entry = service_entry(
            [("localhost", p1a, "v1"), ("localhost", p1b, "v1"), ("localhost", p2, "v2")]
        )
        ring = RingHash({f"127.0.0.1:{p1a}": 1, f"127.0.0.1:{p1b}": 1}, minimum_ring_size=1024)
        by_key = {f"127.0.0.1:{p1a}": "pod-v1a", f"127.0.0.1:{p1b}": "pod-v1b"}
        jar = aiohttp.DummyCookieJar()
        async with running(load(entry)) as url, aiohttp.ClientSession(cookie_jar=jar) as s:
            # end-user: jason -> subset v2, the one pod labelled version: v2.
            assert {await pod_for(s, url, {"end-user": "jason"}) for _ in range(10)} == {"pod-v2"}
            # Everyone else -> subset v1; the cookie picks a v1 pod where Envoy's ring puts it.
            seen = set()
            for i in range(30):
                cookie = {"Cookie": f"user=u{i}"}
                expected = by_key[ring.pick(xxh64(f"u{i}"))]
                assert {await pod_for(s, url, cookie) for _ in range(3)} == {expected}
                seen.add(expected)
            assert seen == {"pod-v1a", "pod-v1b"}


# --------------------------------------------------------------------------- the warning


def fix_of(warning: str) -> str:
    """The ServiceEntry YAML a warning shows (its indented lines)."""
    return textwrap.dedent(warning.split("\n", 1)[1])


def test_a_label_subset_without_labelled_endpoints_is_empty_and_check_shows_the_fix() -> None:
    config = load()
    assert config.clusters[f"outbound|8080|v1|{REVIEWS}"].endpoints == DnsEndpoints(())
    warnings = subset_warnings(config)
    assert [w.split("\n", 1)[0] for w in warnings] == [
        f"t.yaml[3]: DestinationRule reviews: spec.subsets: subset {v} selects version={v} but "
        f"host {REVIEWS} has no ServiceEntry: DNS answers carry no labels, so this subset has no "
        "endpoints (503). A ServiceEntry naming the pods, each with its labels, fixes it (one "
        "per host: list every subset's endpoints in it; replace "
        f"reviews-{v} with the names DNS resolves to this subset's pods):"
        for v in ("v2", "v1")
    ]
    assert fix_of(warnings[1]) == textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: reviews
        spec:
          hosts:
          - {REVIEWS}
          location: MESH_INTERNAL
          ports:
          - number: 8080
            name: http
            protocol: HTTP
          resolution: DNS
          endpoints:
          - address: reviews-v1
            labels:
              version: v1""")
    # The fix, as shown, loads and gives the subset its endpoint (the other subset still warns).
    fixed = load("---\n" + fix_of(warnings[1]) + "\n")
    assert fixed.clusters[f"outbound|8080|v1|{REVIEWS}"].endpoints == DnsEndpoints(
        (Endpoint("reviews-v1", 8080, labels=V1),)
    )
    assert [w.split(" selects")[0] for w in subset_warnings(fixed)] == [
        "t.yaml[3]: DestinationRule reviews: spec.subsets: subset v2"
    ]


def test_check_prints_each_empty_subset_once_with_its_service_entry(tmp_path: Path) -> None:
    (tmp_path / "reviews.yaml").write_text(GATEWAY_AND_ROUTES)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr  # a warning, not an error: Istio accepts it
    warnings = [w for w in done.stderr.split("warning: ") if "spec.subsets" in w]
    assert [w.split(" selects")[0].rsplit(": ", 1)[1] for w in warnings] == [
        "subset v2",
        "subset v1",
    ]
    for version, warning in zip(("v2", "v1"), warnings, strict=True):
        assert f"    - address: reviews-{version}\n" in warning
        assert f"        version: {version}\n" in warning


def test_the_fix_takes_the_ports_of_a_kubernetes_service() -> None:
    svc = (
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews}\n"
        "spec: {ports: [{port: 9080, targetPort: 9000, name: http-api}]}\n"
    )
    warnings = subset_warnings(load(svc))
    assert len(warnings) == 2
    fix = fix_of(warnings[0])
    assert "  - number: 9080\n    name: http-api\n" in fix
    assert "  - address: reviews-v2\n    ports:\n      http-api: 9000\n" in fix
    fixed = load(svc, "---\n" + fix + "\n")  # the ServiceEntry wins over the Service
    assert fixed.clusters[f"outbound|9080|v2|{REVIEWS}"].endpoints == DnsEndpoints(
        (Endpoint("reviews-v2", 9000, labels=V2),)
    )


def test_a_dns_service_entry_without_endpoints_gives_a_label_subset_nothing() -> None:
    # Istio makes one endpoint of the host itself, with no labels (serviceentry/conversion.go):
    # a subset selecting labels has no endpoints. It used to get every address of the host.
    entry = f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [{REVIEWS}]
  ports: [{{number: 9080, name: http}}]
  resolution: DNS
"""
    config = load(entry)
    assert config.clusters[f"outbound|9080|v1|{REVIEWS}"].endpoints == DnsEndpoints(())
    assert config.clusters[f"outbound|9080||{REVIEWS}"].endpoints == DnsEndpoints(
        (Endpoint(REVIEWS, 9080),)
    )
    first_lines = [w.split(" (503)", 1)[0] for w in subset_warnings(config)]
    assert first_lines == [
        f"t.yaml[3]: DestinationRule reviews: spec.subsets: subset {v} selects version={v} but "
        f"ServiceEntry default/reviews of host {REVIEWS} lists no endpoints: DNS answers carry "
        "no labels, so this subset has no endpoints"
        for v in ("v2", "v1")
    ]


def test_labelled_endpoints_that_match_no_subset_are_reported_once_per_subset() -> None:
    entry = service_entry([("127.0.0.1", 9081, "v1")], "STATIC")
    two_ports = entry.replace(
        "ports: [{number: 9080, name: http, protocol: HTTP}]",
        "ports: [{number: 8080, name: http}, {number: 9090, name: admin}]",
    )
    config = load(two_ports.replace("{http: 9081}", "{http: 9081, admin: 9091}"))
    assert config.clusters[f"outbound|9090|v2|{REVIEWS}"].endpoints == StaticEndpoints(())
    assert subset_warnings(config) == [
        "t.yaml[3]: DestinationRule reviews: spec.subsets: subset v2 selects version=v2 but no "
        "endpoint of ServiceEntry default/reviews carries these labels: the subset has no "
        "endpoints (503)"
    ]


# --------------------------------------------------------------------------- the compose example


def compose_services() -> dict[str, Any]:
    services = yaml.safe_load((ROOT / "compose.versions.yaml").read_text())["services"]
    assert isinstance(services, dict)
    return services


def test_compose_versions_example_references_hold() -> None:
    services = compose_services()
    proxy = services.pop("proxy")
    assert proxy["volumes"] == ["./config/compose-versions:/etc/sticky-proxy:ro"]
    assert sorted(proxy["depends_on"]) == sorted(services)
    config = load_config([str(EXAMPLE)])
    assert config.warnings == ()
    for subset, pods in (("v1", ["pod-v1a", "pod-v1b"]), ("v2", ["pod-v2"])):
        targets = config.clusters[f"outbound|9080|{subset}|{REVIEWS}"].endpoints.targets  # type: ignore[union-attr]
        assert [t.address for t in targets] == pods  # each compose service, by its name
        for target in targets:
            command = services[target.address]["entrypoint"]
            # The pod answers with its own name, on the port its endpoint is dialled at.
            assert command[command.index("--name") + 1] == target.address
            assert int(command[command.index("--port") + 1]) == target.port


async def test_compose_versions_example_runs_unchanged_with_real_processes(
    tmp_path: Path,
) -> None:
    """The compose topology without a container runtime: the three pods on loopback addresses,
    their compose names answered by /etc/hosts in the proxy's own mount namespace, and the
    proxy run with compose's command line on config/compose-versions/ as it is."""
    if not await unshare_available():
        pytest.skip("needs `unshare --mount` (root) to give the proxy its own /etc/hosts")
    services = compose_services()
    command = services.pop("proxy")["command"]
    net = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}"
    addresses = {name: f"{net}.{i}" for i, name in enumerate(services, start=2)}
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{ip} {name}\n" for name, ip in addresses.items()))
    pods = [PodSet(1, host=ip, ports=[8080], names=[name]) for name, ip in addresses.items()]
    for podset in pods:
        await podset.__aenter__()
    assert command[:2] == ["run", "/etc/sticky-proxy"]
    run = [sys.executable, "-m", "proxy", "run", str(EXAMPLE), *command[2:]]
    run += ["--admin-port", "off", "--metrics-port", "off", "--readiness-port", "off"]
    run += ["--drain-time", "0s"]  # no load balancer to tell: stop at once
    try:
        async with proxy_with_hosts(run, hosts) as url:
            jar = aiohttp.DummyCookieJar()
            async with aiohttp.ClientSession(cookie_jar=jar) as s:
                jason = {"Host": "test.com", "end-user": "jason"}
                assert {await pod_for(s, url, jason) for _ in range(10)} == {"pod-v2"}
                spread: Counter[str] = Counter()
                for i in range(40):
                    cookie = {"Host": "test.com", "Cookie": f"ISTIOID=user-{i}"}
                    answers = {await pod_for(s, url, cookie) for _ in range(3)}
                    assert len(answers) == 1  # sticky
                    spread[answers.pop()] += 1
                assert set(spread) == {"pod-v1a", "pod-v1b"}  # version v1 only, both of its pods
    finally:
        for podset in pods:
            await podset.close()
