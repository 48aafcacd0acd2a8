"""Real Istio folders load: what sticky-proxy cannot serve is skipped with one warning.

The documents are Istio's own samples (samples/tcp-echo, samples/multicluster,
samples/external, samples/bookinfo), trimmed to the fields that matter.  Each skipped thing gives
exactly one warning and the rest of the set still loads and serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import RawClient, with_endpoints
from proxy_process import ROOT, gateway_yaml, proxy_process, service_yaml

from proxy.config import Config, ConfigError, Destination, DnsEndpoints, Endpoint, StaticEndpoints
from proxy.demo import PodSet
from proxy.dispatch import Dispatcher
from proxy.explain import Probe, explain
from proxy.istio import load_text
from proxy.routing import Router
from proxy.runtime import RuntimeRef, build_runtime

pytestmark = pytest.mark.timeout(30)


def load(*docs: str) -> Config:
    return load_text("---\n".join(textwrap.dedent(d) for d in docs), "t.yaml")


def warnings_about(config: Config, text: str) -> list[str]:
    return [w for w in config.warnings if text in w]


HTTP_GW = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
"""

HTTP_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web.test]
  gateways: [gw]
  http:
  - route:
    - destination: {host: web.local, port: {number: 80}}
"""

# samples/tcp-echo/tcp-echo-all-v1.yaml
TCP_ECHO = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tcp-echo-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo-destination}
spec:
  host: tcp-echo
  subsets:
  - name: v1
    labels: {version: v1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo}
spec:
  hosts: ["*"]
  gateways: [tcp-echo-gateway]
  tcp:
  - match:
    - port: 31400
    route:
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}
"""

# samples/multicluster/expose-istiod.yaml
EXPOSE_ISTIOD = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istiod-gateway}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {name: tls-istiod, number: 15012, protocol: tls}
    tls: {mode: PASSTHROUGH}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: istiod-vs}
spec:
  hosts: ["*"]
  gateways: [istiod-gateway]
  tls:
  - match:
    - port: 15012
      sniHosts: ["*"]
    route:
    - destination: {host: istiod.istio-system.svc.cluster.local, port: {number: 15012}}
"""


# --------------------------------------------------------------------------- 1. tcp/tls routes


@pytest.mark.parametrize(
    ("sample", "kind", "name"),
    [(TCP_ECHO, "TCP", "tcp-echo"), (EXPOSE_ISTIOD, "TLS", "istiod-vs")],
    ids=["tcp-echo", "expose-istiod"],
)
def test_a_virtual_service_of_tcp_or_tls_routes_only_is_skipped_with_one_warning(
    sample: str, kind: str, name: str
) -> None:
    config = load(sample, HTTP_GW, HTTP_VS)
    # The rest of the set is served; the TCP/TLS VirtualService is not in the model.
    assert [vs.name for vs in config.virtual_services] == ["web"]
    about = [w for w in config.warnings if f"VirtualService {name}:" in w]
    assert about == [
        f"t.yaml[{3 if kind == 'TCP' else 2}]: VirtualService {name}: spec: {kind} routes only "
        f"(spec.{kind.lower()}), which sticky-proxy does not serve (HTTP routes only): "
        "VirtualService skipped"
    ]


def test_tcp_routes_next_to_http_routes_are_ignored_with_one_warning() -> None:
    mixed = HTTP_VS + "  tcp:\n  - route:\n    - destination: {host: db.local}\n"
    config = load(HTTP_GW, mixed)
    assert [vs.name for vs in config.virtual_services] == ["web"]
    assert warnings_about(config, "VirtualService web:") == [
        "t.yaml[2]: VirtualService web: spec.tcp: ignored: TCP routes are not supported by "
        "sticky-proxy"
    ]


@pytest.mark.parametrize("routes", ["", "  http: []\n  tcp: []\n"], ids=["absent", "empty"])
def test_a_virtual_service_without_any_route_is_still_rejected(routes: str) -> None:
    # Istio's validation: len(http) == 0 && len(tcp) == 0 && len(tls) == 0.
    text = HTTP_VS.split("  http:")[0] + routes
    with pytest.raises(ConfigError) as exc:
        load(HTTP_GW, text)
    assert exc.value.errors == (
        "t.yaml[2]: VirtualService web: spec: http, tcp or tls must be provided in virtual service",
    )


# --------------------------------------------------------------------------- 2. ServiceEntries

# samples/external/github.yaml (the first document)
GITHUB = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: github-https}
spec:
  hosts: [github.com]
  ports:
  - {number: 443, name: https, protocol: HTTPS}
"""

WEB_SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web}
spec:
  hosts: [web.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
"""


def se(spec: str, name: str = "other") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
{textwrap.indent(textwrap.dedent(spec).strip(), "  ")}
"""


@pytest.mark.parametrize(
    ("doc", "path", "why"),
    [
        (
            GITHUB,
            "spec.resolution",
            "resolution NONE (the default) is original-destination passthrough",
        ),
        (
            se("hosts: [x.test]\nports: [{number: 80, name: http}]\nresolution: NONE"),
            "spec.resolution",
            "resolution NONE is original-destination passthrough",
        ),
        (
            se("hosts: [x.test]\nports: [{number: 80, name: http}]\nresolution: DNS_ROUND_ROBIN"),
            "spec.resolution",
            "resolution DNS_ROUND_ROBIN (one address at a time)",
        ),
        (
            se(
                "hosts: [x.test]\nports: [{number: 80, name: http}]\nresolution: STATIC\n"
                "workloadSelector: {labels: {app: x}}"
            ),
            "spec.workloadSelector",
            "it selects WorkloadEntries and pods by labels",
        ),
        (
            se(
                "hosts: [x.test]\nports: [{number: 80, name: http}]\nresolution: STATIC\n"
                "endpoints: [{address: 'unix:///var/run/x.sock'}]"
            ),
            "spec.endpoints",
            "its endpoints are all unix domain sockets",
        ),
    ],
    ids=["github-default-none", "none", "dns-round-robin", "workload-selector", "unix-only"],
)
def test_a_service_entry_sticky_proxy_cannot_act_on_is_skipped_with_one_warning(
    doc: str, path: str, why: str
) -> None:
    config = load(HTTP_GW, HTTP_VS, WEB_SE, doc)
    hosts = "github.com" if doc is GITHUB else "x.test"
    name = "github-https" if doc is GITHUB else "other"
    assert config.warnings == (
        f"t.yaml[4]: ServiceEntry {name}: {path}: {why}, which is not supported by "
        f"sticky-proxy: ServiceEntry skipped (a route to {hosts} resolves the host name by DNS)",
    )
    # The rest of the set loads: the other ServiceEntry still gives its cluster's endpoints.
    assert config.clusters["outbound|80||web.local"].endpoints == StaticEndpoints(
        (Endpoint("10.0.0.1", 80),)
    )
    assert set(config.service_ports) == {"web.local"}


def test_a_route_to_a_skipped_service_entry_host_resolves_the_host_by_dns() -> None:
    route = HTTP_VS.replace("web.local, port: {number: 80}", "github.com, port: {number: 443}")
    config = load(HTTP_GW, route, GITHUB)
    spec = config.clusters["outbound|443||github.com"]
    assert spec.endpoints == DnsEndpoints((Endpoint("github.com", 443),))
    assert spec.source == "DNS github.com"
    assert len(warnings_about(config, "ServiceEntry github-https")) == 1


def test_unix_socket_endpoints_are_skipped_one_by_one() -> None:
    doc = se(
        """
        hosts: [web.local]
        ports: [{number: 80, name: http}]
        resolution: STATIC
        endpoints:
        - address: unix:///var/run/a.sock
        - address: 10.0.0.2
        """,
        name="web",
    )
    config = load(HTTP_GW, HTTP_VS, doc)
    assert config.warnings == (
        "t.yaml[3]: ServiceEntry web: spec.endpoints[0].address: unix domain socket endpoints "
        "are not supported by sticky-proxy: endpoint skipped",
    )
    assert config.clusters["outbound|80||web.local"].endpoints == StaticEndpoints(
        (Endpoint("10.0.0.2", 80),)
    )


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (
            "hosts: [x.test]\nports: [{number: 80, name: http}]\nendpoints: [{address: 10.0.0.1}]",
            "spec.endpoints: no endpoints should be provided for resolution type none",
        ),
        (
            "hosts: [x.test]\nports: [{number: 80, name: http}]\nresolution: STATIC\n"
            "workloadSelector: {labels: {app: x}}\nendpoints: [{address: 10.0.0.1}]",
            "spec: only one of WorkloadSelector or Endpoints is allowed in Service Entry",
        ),
        (
            "hosts: [x.test]\nports: [{number: 80, name: http}]\nresolution: DNS_ROUND_ROBIN\n"
            "endpoints: [{address: a.test}, {address: b.test}]",
            "spec.endpoints: there must only be 0 or 1 endpoint for resolution mode "
            "DNS_ROUND_ROBIN",
        ),
        (
            "hosts: [x.test]\nports: [{number: 80, name: http}]\nresolution: DNS\n"
            "endpoints: [{address: 'unix:///var/run/a.sock'}]",
            "spec.endpoints[0].address: endpoint address 'unix:///var/run/a.sock' is not a valid "
            "FQDN or an IP address",
        ),
        (
            "hosts: [x.test]\nports: [{number: 80, name: http}, {number: 81, name: b}]\n"
            "resolution: STATIC\nendpoints: [{address: 'unix:///a.sock', ports: {http: 8080}}]",
            "spec.endpoints[0].ports: unix endpoint unix:///a.sock must not include ports",
        ),
    ],
    ids=["none-endpoints", "selector-endpoints", "round-robin-2", "dns-unix", "unix-port"],
)
def test_what_istio_rejects_in_a_service_entry_is_still_an_error(spec: str, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(se(spec))
    assert exc.value.errors[0] == f"t.yaml: ServiceEntry other: {error}"


# --------------------------------------------------------------------------- 3. host case

MIXED_CASE = [
    """
    apiVersion: networking.istio.io/v1
    kind: Gateway
    metadata: {name: gw}
    spec:
      servers:
      - port: {number: 80, name: http, protocol: HTTP}
        hosts: [HttpBin.Example.com, ./Web.Example.COM]
    """,
    """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: httpbin}
    spec:
      hosts: [HttpBin.Example.com, Web.Example.COM]
      gateways: [gw]
      http:
      - route:
        - destination: {host: Stable.Local, subset: v1}
    """,
    """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: stable}
    spec:
      host: STABLE.local
      subsets: [{name: v1}]
    """,
]


def mixed_case_docs(pod: tuple[str, int]) -> list[str]:
    entry = service_yaml("stable", pod).replace("stable.local", "Stable.LOCAL")
    return [*MIXED_CASE, entry]


def test_host_names_in_every_resource_are_lowercased() -> None:
    config = load(*mixed_case_docs(("10.0.0.1", 8080)))
    (server,) = config.gateways[0].servers
    assert [h.host for h in server.hosts] == ["httpbin.example.com", "web.example.com"]
    (vs,) = config.virtual_services
    assert vs.hosts == ("httpbin.example.com", "web.example.com")
    assert vs.http[0].route[0].destination == Destination("stable.local", None, "v1")
    assert config.clusters["outbound|80|v1|stable.local"].endpoints == StaticEndpoints(
        (Endpoint("10.0.0.1", 8080),)
    )
    assert config.warnings == ()


def test_the_host_header_matches_mixed_case_hosts_in_the_route_explainer() -> None:
    config = load(*mixed_case_docs(("10.0.0.1", 8080)))
    answer = explain(config, Router(config, 80), Probe("HTTPBIN.example.com:80", "/"))
    assert answer.decision is not None
    lines = dict(answer.as_lines())
    assert lines["cluster"] == "outbound|80|v1|stable.local"


@pytest.fixture
async def pods() -> AsyncIterator[PodSet]:
    async with PodSet(2) as podset:
        yield podset


async def get(client: RawClient, host: str) -> tuple[int, str]:
    await client.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    response = await client.read_response()
    if response.status != 200:
        return response.status, response.body.decode()
    return 200, str(json.loads(response.body)["pod"])


async def test_a_request_reaches_a_mixed_case_host_whatever_the_case_of_its_host_header(
    pods: PodSet,
    proxy: Callable[..., Awaitable[int]],
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    runtime = with_endpoints(build_runtime(load(*mixed_case_docs(pods.addresses[0]))))
    client = await raw_client(await proxy(Dispatcher(RuntimeRef(runtime), 80)))
    for host in ("httpbin.example.com", "HTTPBIN.EXAMPLE.COM", "web.Example.com:80"):
        assert await get(client, host) == (200, "pod-1")
    assert (await get(client, "other.example.com"))[0] == 404


# --------------------------------------------------------------------------- 4. references

# samples/bookinfo/networking/virtual-service-reviews-v3.yaml
REVIEWS_V3 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v3}
"""


def test_a_mesh_only_virtual_service_is_not_cross_checked() -> None:
    mesh = REVIEWS_V3.replace(
        "  - route:", "  - match: [{gateways: [missing-gw]}]\n    route:"
    ).replace("  hosts: [reviews]", "  hosts: [reviews]\n  gateways: [mesh]")
    for doc in (REVIEWS_V3, mesh):
        config = load(HTTP_GW, HTTP_VS, WEB_SE, doc)
        assert config.warnings == (
            "t.yaml[4]: VirtualService reviews: spec.gateways: bound to the mesh only (no "
            "gateways): sticky-proxy serves Gateway-bound routes, so this VirtualService is not "
            "used",
        )


def subset_route(subset: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: [app.test]
  gateways: [gw]
  http:
  - match: [{{uri: {{prefix: /v9}}}}]
    route: [{{destination: {{host: stable.local, subset: {subset}}}}}]
  - route: [{{destination: {{host: stable.local}}}}]
"""


STABLE_RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: stable}
spec:
  host: stable.local
  subsets: [{name: v1}]
"""


@pytest.mark.parametrize(
    ("rule", "warning"),
    [
        (
            "",
            "subset v9 not found: no DestinationRule for host stable.local; requests to this "
            "destination get 503 (no such cluster)",
        ),
        (
            STABLE_RULE,
            "subset v9 not found in DestinationRule default/stable (subsets: v1); requests to "
            "this destination get 503 (no such cluster)",
        ),
    ],
    ids=["no-rule", "no-such-subset"],
)
async def test_a_gateway_route_to_an_undefined_subset_warns_and_answers_503(
    rule: str,
    warning: str,
    pods: PodSet,
    proxy: Callable[..., Awaitable[int]],
    raw_client: Callable[[int], Awaitable[RawClient]],
) -> None:
    docs = [gateway_yaml(), subset_route("v9"), service_yaml("stable", pods.addresses[0])]
    config = load(*docs, *([rule] if rule else []))
    assert config.warnings == (
        f"t.yaml[2]: VirtualService app: spec.http[0].route[0].destination.subset: {warning}",
    )
    assert "outbound|80|v9|stable.local" not in config.clusters
    runtime = with_endpoints(build_runtime(config))
    client = await raw_client(await proxy(Dispatcher(RuntimeRef(runtime), 80)))
    await client.send(b"GET /v9 HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert (await client.read_response()).status == 503
    assert await get(client, "app.test") == (200, "pod-1")


# --------------------------------------------------------------------------- 5, 6. the CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write(tmp_path: Path, *docs: str) -> str:
    path = tmp_path / "istio.yaml"
    path.write_text("---\n".join(textwrap.dedent(d) for d in docs))
    return str(path)


QUIET = ("--admin-port", "off", "--readiness-port", "off", "--metrics-port", "off")


@pytest.mark.parametrize(
    ("docs", "why", "unserved"),
    [
        (
            [TCP_ECHO],
            "no Gateway has an HTTP or HTTPS server sticky-proxy can serve",
            [
                "Gateway default/tcp-echo-gateway server on port 31400 (TCP): HTTP and HTTPS "
                "servers only"
            ],
        ),
        (
            [REVIEWS_V3],
            "no Gateway has an HTTP or HTTPS server sticky-proxy can serve",
            ["VirtualService default/reviews: bound to the mesh only"],
        ),
        (
            [HTTP_GW, REVIEWS_V3],
            "no VirtualService bound to a Gateway has a host of its HTTP or HTTPS servers",
            [
                "port 80 (HTTP): no VirtualService has a host of its servers, every request "
                "gets 404",
                "VirtualService default/reviews: bound to the mesh only",
            ],
        ),
    ],
    ids=["tcp-only", "mesh-only", "http-gateway-mesh-only"],
)
@pytest.mark.parametrize(
    "command",
    [("check",), ("run", "--listen", "127.0.0.1:0", *QUIET), ("route", "--host", "a.test")],
    ids=["check", "run", "route"],
)
def test_a_config_that_serves_nothing_is_refused_with_exit_2_saying_why(
    tmp_path: Path, docs: list[str], why: str, unserved: list[str], command: tuple[str, ...]
) -> None:
    path = write(tmp_path, *docs)
    done = cli(command[0], path, *command[1:])
    if command[0] == "route" and why.startswith("no VirtualService"):
        # route still answers for a port that exists: 404 (exit 1), not a refusal.
        assert done.returncode == 1, done.stderr
        assert "the proxy answers 404" in done.stdout
        return
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert lines == [f"nothing to serve: {why}", *(f"not served: {u}" for u in unserved)]
    assert done.stdout == ""


def test_check_prints_what_is_served_and_what_is_not(tmp_path: Path) -> None:
    tcp_server = "  - port: {number: 31400, name: tcp, protocol: TCP}\n    hosts: ['*']\n"
    other = HTTP_VS.replace("name: web", "name: api").replace("web.test", "api.test")
    path = write(tmp_path, HTTP_GW + tcp_server, HTTP_VS, other, WEB_SE, REVIEWS_V3)
    done = cli("check", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "ok: 1 file(s), listeners on port(s) 80, 3 VirtualService(s), 1 cluster(s)",
        "serves: port 80 (HTTP) host web.test -> default/web",
        "serves: port 80 (HTTP) host api.test -> default/api",
        "not served: Gateway default/gw server on port 31400 (TCP): HTTP and HTTPS servers only",
        "not served: VirtualService default/reviews: bound to the mesh only",
    ]


async def test_run_logs_what_it_serves_before_listening(tmp_path: Path) -> None:
    path = write(tmp_path, HTTP_GW, HTTP_VS, WEB_SE, REVIEWS_V3)
    async with proxy_process(path, "--listen", "127.0.0.1:0", *QUIET) as proc:
        await proc.port("")
        served = [line.split("proxy.served: ", 1)[1] for line in proc.lines if "served: " in line]
        assert served == [
            "serves: port 80 (HTTP) host web.test -> default/web\n",
            "not served: VirtualService default/reviews: bound to the mesh only\n",
        ]


def test_route_prints_each_warning_once(tmp_path: Path) -> None:
    # Two Gateway ports: the destination without a port makes a cluster per listener, and
    # used to warn once per listener (the same line but for the port number).
    two_ports = HTTP_GW + "  - port: {number: 8080, name: alt, protocol: HTTP}\n    hosts: ['*']\n"
    no_port = HTTP_VS.replace(", port: {number: 80}", "")
    tcp = HTTP_VS.replace("name: web", "name: db").replace("http:", "tcp:")
    path = write(tmp_path, two_ports, no_port, tcp, GITHUB, REVIEWS_V3)
    done = cli("route", path, "--host", "web.test", "--port", "80")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 4
    assert sorted(set(warnings)) == sorted(warnings)
    assert done.stderr.splitlines() == warnings
    assert "cluster:        outbound|80||web.local" in done.stdout.splitlines()
