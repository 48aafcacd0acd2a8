"""Kubernetes objects beside the Istio YAML: a ``Service`` is read (``proxy.istio_service``), the
other kinds are summed up in one warning line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, DnsEndpoints, Endpoint, SessionSpec
from proxy.istio import load_config, load_text

ROOT = Path(__file__).resolve().parent.parent
REVIEWS = "reviews.default.svc.cluster.local"

GATEWAY = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
"""


def route_to(destination: str = "{host: reviews}") -> str:
    return f"""{GATEWAY}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http: [{{route: [{{destination: {destination}}}]}}]
"""


def service(spec: str, metadata: str = "{name: reviews}") -> str:
    return f"---\napiVersion: v1\nkind: Service\nmetadata: {metadata}\nspec: {spec}\n"


def load(*docs: str) -> Config:
    return load_text("".join(docs), "t.yaml")


def errors(*docs: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(*docs)
    return list(info.value.errors)


def test_a_destination_without_port_takes_the_services_only_port() -> None:
    # bookinfo: the Gateway listens on 8080, the Service on 9080; Istio's GetDestinationCluster
    # takes the service's only port, not the listener's.
    config = load(route_to(), service("{ports: [{port: 9080, name: http}]}"))
    assert list(config.clusters) == [f"outbound|9080||{REVIEWS}"]
    cluster = config.clusters[f"outbound|9080||{REVIEWS}"]
    assert cluster.endpoints == DnsEndpoints((Endpoint(REVIEWS, 9080),))
    assert cluster.source == "Service default/reviews"
    assert config.service_ports == {REVIEWS: (9080,)}
    assert config.warnings == ()  # no "port not set" fallback warning: the Service has one


def test_a_clusterip_service_is_dialled_at_its_port_a_headless_one_at_the_target_port() -> None:
    ports = "ports: [{port: 9080, targetPort: 8080, name: http}]"
    normal = load(route_to(), service(f"{{{ports}}}"))
    headless = load(route_to(), service(f"{{clusterIP: None, {ports}}}"))
    # The cluster IP listens on the service port; a headless name answers the pods' addresses,
    # which listen on targetPort.
    assert normal.clusters[f"outbound|9080||{REVIEWS}"].endpoints == DnsEndpoints(
        (Endpoint(REVIEWS, 9080),)
    )
    assert headless.clusters[f"outbound|9080||{REVIEWS}"].endpoints == DnsEndpoints(
        (Endpoint(REVIEWS, 8080),)
    )


def test_a_named_target_port_of_a_headless_service_warns_and_dials_the_port() -> None:
    named = "ports: [{port: 9080, targetPort: http-web, name: http}]"
    headless = load(route_to(), service(f"{{clusterIP: None, {named}}}"))
    assert headless.clusters[f"outbound|9080||{REVIEWS}"].endpoints == DnsEndpoints(
        (Endpoint(REVIEWS, 9080),)
    )
    assert headless.warnings == (
        "t.yaml[3]: Service reviews: spec.ports[0].targetPort: named port 'http-web' is a "
        "container port of the pods, which sticky-proxy does not see: the pods are dialled at "
        "the service port 9080",
    )
    assert load(route_to(), service(f"{{{named}}}")).warnings == ()  # the cluster IP: no need


def test_an_external_name_service_resolves_its_external_name() -> None:
    config = load(
        route_to(),
        service("{type: ExternalName, externalName: reviews.example.com, ports: [{port: 443}]}"),
    )
    assert config.clusters[f"outbound|443||{REVIEWS}"].endpoints == DnsEndpoints(
        (Endpoint("reviews.example.com", 443),)
    )


def test_kubernetes_service_fields_are_accepted_unknown_ones_are_errors() -> None:
    full = """{type: LoadBalancer, selector: {app: reviews}, clusterIP: 10.0.0.7,
      clusterIPs: [10.0.0.7], sessionAffinity: ClientIP,
      sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}, externalTrafficPolicy: Local,
      internalTrafficPolicy: Cluster, ipFamilies: [IPv4], ipFamilyPolicy: SingleStack,
      publishNotReadyAddresses: true, loadBalancerSourceRanges: [10.0.0.0/8],
      ports: [{name: http, port: 9080, targetPort: 9080, protocol: TCP, appProtocol: http,
               nodePort: 30080}]}"""
    config = load(route_to(), service(full), "status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n")
    assert config.warnings == ()
    assert list(config.clusters) == [f"outbound|9080||{REVIEWS}"]
    assert errors(route_to(), service("{selectr: {app: x}, ports: [{port: 80}]}")) == [
        "t.yaml[3]: Service reviews: spec.selectr: unknown field (did you mean selector?)"
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{}", "spec.ports: required (only a headless Service may have no ports)"),
        ("{ports: [{port: 0}]}", "spec.ports[0].port: port number 0 must be in the range 1..65535"),
        (
            "{ports: [{port: 80, name: a}, {port: 81}]}",
            "spec.ports[1].name: required",
        ),
        (
            "{ports: [{port: 80, name: a}, {port: 81, name: a}]}",
            "spec.ports[1].name: duplicate port name 'a'",
        ),
        (
            "{ports: [{port: 80, targetPort: Web_1}]}",
            "spec.ports[0].targetPort: invalid port name 'Web_1' (IANA_SVC_NAME)",
        ),
        (
            "{type: Cluster, ports: [{port: 80}]}",
            "spec.type: unsupported value 'Cluster': one "
            "of ClusterIP, NodePort, LoadBalancer, ExternalName",
        ),
    ],
)
def test_what_kubernetes_rejects_is_an_error(spec: str, message: str) -> None:
    assert errors(route_to(), service(spec)) == [f"t.yaml[3]: Service reviews: {message}"]


def test_a_port_the_service_does_not_have_is_an_error() -> None:
    two = "{ports: [{port: 9080, name: http}, {port: 9443, name: https}]}"
    assert errors(route_to(), service(two)) == [
        "t.yaml[2]: VirtualService vs: spec.http[0].route[0].destination.port: port 8080 "
        "(Istio's fallback, the listener port 8080) is not a port of Service default/reviews "
        "(ports: 9080, 9443)"
    ]
    config = load(route_to("{host: reviews, port: {number: 9443}}"), service(two))
    assert list(config.clusters) == [f"outbound|9443||{REVIEWS}"]


def test_the_service_namespace_makes_its_host() -> None:
    config = load(
        route_to("{host: reviews.shop.svc.cluster.local}"),
        service("{ports: [{port: 9080}]}", "{name: reviews, namespace: shop}"),
    )
    assert list(config.clusters) == ["outbound|9080||reviews.shop.svc.cluster.local"]


def test_a_second_service_of_one_name_replaces_the_first() -> None:
    config = load(
        route_to(), service("{ports: [{port: 9080}]}"), service("{ports: [{port: 9090}]}")
    )
    assert list(config.clusters) == ["outbound|9090||reviews.default.svc.cluster.local"]
    assert any("replaces Service default/reviews of t.yaml[3]" in w for w in config.warnings)


def test_a_persistent_session_label_on_a_service_gives_its_cluster_a_session() -> None:
    labelled = service(
        "{ports: [{port: 9080}]}",
        "{name: reviews, labels: {istio.io/persistent-session: my-cookie}}",
    )
    config = load(route_to(), labelled)
    assert config.clusters[f"outbound|9080||{REVIEWS}"].session == SessionSpec(
        "cookie", "my-cookie", "/", source="Service default/reviews"
    )
    assert (
        load(route_to(), service("{ports: [{port: 9080}]}"))
        .clusters[f"outbound|9080||{REVIEWS}"]
        .session
        is None
    )


def test_a_service_entry_for_the_same_host_wins_with_a_warning() -> None:
    entry = f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [{REVIEWS}]
  ports: [{{number: 9080, name: http}}]
  resolution: DNS
  endpoints: [{{address: reviews-v1}}]
"""
    labelled = service(
        "{ports: [{port: 9080}]}", "{name: reviews, labels: {istio.io/persistent-session: c}}"
    )
    config = load(route_to(), entry, labelled)
    cluster = config.clusters[f"outbound|9080||{REVIEWS}"]
    assert cluster.endpoints == DnsEndpoints((Endpoint("reviews-v1", 9080),))
    assert cluster.source == "ServiceEntry default/reviews"
    assert cluster.session is None  # the losing Service's labels are not read
    assert config.warnings == (
        f"t.yaml[4]: Service reviews: metadata.name: host {REVIEWS} is also defined by "
        "ServiceEntry default/reviews (t.yaml[3]): the ServiceEntry's ports and endpoints are "
        "used (Istio, which sees the pods, would use this Service's)",
    )


def test_a_helm_folder_gives_one_summary_line_for_what_is_skipped(tmp_path: Path) -> None:
    kinds = ["Deployment"] * 3 + ["ServiceAccount"] * 4
    docs = [f"apiVersion: v1\nkind: {k}\nmetadata: {{name: o{i}}}\n" for i, k in enumerate(kinds)]
    (tmp_path / "a.yaml").write_text("---\n".join(docs[:4]))
    (tmp_path / "b.yaml").write_text(
        "---\n".join(docs[4:])
        + "---\napiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: f}\n"
        + "---\n"
        + route_to()
        + service("{ports: [{port: 9080}]}")
    )
    config = load_config([str(tmp_path)])
    assert config.warnings == (
        "skipped 7 Kubernetes objects sticky-proxy does not read: Deployment x3, ServiceAccount x4",
        "skipped 1 Istio object sticky-proxy does not act on (it reads Gateway, VirtualService, "
        "DestinationRule and ServiceEntry): EnvoyFilter",
    )


def test_check_reads_a_service_and_prints_the_summary_once(tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text(
        route_to()
        + service("{ports: [{port: 9080}]}")
        + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews-v1}\n"
        + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews-v2}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "1 VirtualService(s), 1 cluster(s)" in done.stdout
    assert done.stderr == (
        "warning: skipped 2 Kubernetes objects sticky-proxy does not read: Deployment x2\n"
    )


def test_a_headless_service_without_ports_takes_the_listener_port_with_a_warning() -> None:
    config = load(route_to(), service("{clusterIP: None}"))
    assert config.clusters[f"outbound|8080||{REVIEWS}"].endpoints == DnsEndpoints(
        (Endpoint(REVIEWS, 8080),)
    )
    assert config.warnings == (
        "t.yaml[2]: VirtualService vs: spec.http[0].route[0].destination.port: not set and "
        f"host {REVIEWS} has no ServiceEntry: Istio's fallback, the Gateway port the request "
        "came in on, is used",
    )
