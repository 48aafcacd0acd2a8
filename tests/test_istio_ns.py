"""exportTo and --namespace: the proxy is a gateway in one namespace and sees what is exported to it."""
# ruff: noqa: E501

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.__main__ import RunArgs, build_parser, run_argv, worker_argv
from proxy.config import Config, ConfigError, DnsEndpoints, Endpoint, StaticEndpoints
from proxy.explain import Probe, explain
from proxy.istio import load_config, load_text
from proxy.istio_visibility import visible
from proxy.routing import Router
from proxy.server import Proxy, RunOptions

ROOT = Path(__file__).resolve().parent.parent

GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
"""


def vs(export: str = "", namespace: str = "bookinfo") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bookinfo, namespace: {namespace}}}
spec:
  hosts: [bookinfo.test]
  gateways: [istio-system/bookinfo-gateway]{export}
  http:
  - route: [{{destination: {{host: productpage, port: {{number: 9080}}}}}}]
"""


def dr(export: str = "", namespace: str = "bookinfo") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: productpage, namespace: {namespace}}}
spec:
  host: productpage.bookinfo.svc.cluster.local{export}
  trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}}}
"""


def se(export: str = "", namespace: str = "bookinfo") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: productpage, namespace: {namespace}}}
spec:
  hosts: [productpage.bookinfo.svc.cluster.local]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 10.0.0.1}}]{export}
"""


def load(*docs: str, namespace: str | None = None) -> Config:
    text = "---\n".join(textwrap.dedent(d) for d in docs)
    if namespace is None:
        return load_text(text, "t.yaml")
    return load_text(text, "t.yaml", namespace=namespace)


def status(config: Config, host: str = "bookinfo.test", path: str = "/") -> int | None:
    """The cluster a request goes to, or None for the 404 of no route."""
    ex = explain(config, Router(config, 80), Probe(host, path))
    return None if ex.decision is None else 200


CLUSTER = "outbound|9080||productpage.bookinfo.svc.cluster.local"
HIDDEN = "not exported to namespace istio-system (the gateway's, --namespace): hidden by exportTo, so not used"


# --------------------------------------------------------------------------- VirtualService


def test_a_gateway_in_istio_system_serves_a_virtual_service_of_another_namespace() -> None:
    config = load(GATEWAY, vs())
    assert config.warnings == ()
    (service,) = config.virtual_services
    assert (service.key, service.gateways) == (
        "bookinfo/bookinfo",
        ("istio-system/bookinfo-gateway",),
    )
    assert status(config) == 200
    assert CLUSTER in config.clusters


def test_export_to_dot_hides_a_virtual_service_from_a_gateway_in_istio_system() -> None:
    config = load(GATEWAY, vs('\n  exportTo: ["."]'))
    assert config.virtual_services == ()
    assert status(config) is None  # no route: 404
    assert CLUSTER not in config.clusters
    assert config.warnings == (f"t.yaml[2]: VirtualService bookinfo: spec.exportTo: {HIDDEN}",)


def test_export_to_dot_is_seen_by_a_gateway_in_the_same_namespace() -> None:
    config = load(GATEWAY, vs('\n  exportTo: ["."]'), namespace="bookinfo")
    assert config.warnings == ()
    assert status(config) == 200


@pytest.mark.parametrize(
    ("export", "seen"),
    [
        ("", True),
        ('\n  exportTo: ["*"]', True),
        ("\n  exportTo: [istio-system]", True),
        ("\n  exportTo: [other, istio-system]", True),
        ("\n  exportTo: [other]", False),
        ("\n  exportTo: [bookinfo]", False),
        ("\n  exportTo: []", True),  # empty is Istio's default, *
    ],
)
def test_export_to_lists_the_namespaces_that_see_a_virtual_service(export: str, seen: bool) -> None:
    config = load(GATEWAY, vs(export))
    assert (status(config) == 200) is seen
    assert bool(config.warnings) is not seen


def test_the_gateway_namespace_flag_of_load_config(tmp_path: Path) -> None:
    (tmp_path / "all.yaml").write_text(GATEWAY + "---\n" + vs('\n  exportTo: ["."]'))
    assert load_config([str(tmp_path)]).virtual_services == ()
    assert len(load_config([str(tmp_path)], namespace="bookinfo").virtual_services) == 1


# --------------------------------------------------------------------------- DestinationRule, ServiceEntry


def test_a_hidden_destination_rule_is_not_applied() -> None:
    shown = load(GATEWAY, vs(), dr()).clusters[CLUSTER]
    assert shown.lb.consistent_hash is not None
    config = load(GATEWAY, vs(), dr('\n  exportTo: ["."]'))
    assert config.clusters[CLUSTER].lb.consistent_hash is None
    assert config.warnings == (f"t.yaml[3]: DestinationRule productpage: spec.exportTo: {HIDDEN}",)
    assert load(GATEWAY, vs(), dr("\n  exportTo: [istio-system]")).clusters[CLUSTER].lb == shown.lb


def test_a_destination_rule_exported_elsewhere_is_not_seen_in_its_own_namespace() -> None:
    # setDestinationRules: a rule enters its own namespace's pool only when exported there too.
    config = load(GATEWAY, vs(), dr("\n  exportTo: [other]"), namespace="bookinfo")
    assert config.clusters[CLUSTER].lb.consistent_hash is None


def test_a_hidden_service_entry_leaves_its_host_to_dns() -> None:
    shown = load(GATEWAY, vs(), se()).clusters[CLUSTER]
    assert isinstance(shown.endpoints, StaticEndpoints)
    for export in ('\n  exportTo: ["."]', '\n  exportTo: ["~"]'):
        config = load(GATEWAY, vs(), se(export))
        assert config.clusters[CLUSTER].endpoints == DnsEndpoints(
            (Endpoint("productpage.bookinfo.svc.cluster.local", 9080),)
        )
        assert config.warnings == (f"t.yaml[3]: ServiceEntry productpage: spec.exportTo: {HIDDEN}",)
    # ~ hides it from everyone, even its own namespace's gateway.
    own = load(GATEWAY, vs(), se('\n  exportTo: ["~"]'), namespace="bookinfo")
    assert isinstance(own.clusters[CLUSTER].endpoints, DnsEndpoints)
    dot = load(GATEWAY, vs(), se('\n  exportTo: ["."]'), namespace="bookinfo")
    assert isinstance(dot.clusters[CLUSTER].endpoints, StaticEndpoints)


def test_visible() -> None:
    assert visible(frozenset(), "a")
    assert visible(frozenset({"*"}), "a")
    assert visible(frozenset({"b", "a"}), "a")
    assert not visible(frozenset({"b"}), "a")
    assert not visible(frozenset({"~"}), "a")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            vs('\n  exportTo: [bookinfo, "."]'),
            "t.yaml[2]: VirtualService bookinfo: spec.exportTo[1]: duplicate entries in exportTo: . and current namespace bookinfo",
        ),
        (
            vs("\n  exportTo: [a, a]"),
            "t.yaml[2]: VirtualService bookinfo: spec.exportTo[1]: duplicate entries in exportTo for entry a",
        ),
        (
            vs('\n  exportTo: ["*", a]'),
            "t.yaml[2]: VirtualService bookinfo: spec.exportTo: cannot have both public (*) and non-public exportTo values for a resource",
        ),
        (
            vs('\n  exportTo: ["~"]'),
            "t.yaml[2]: VirtualService bookinfo: spec.exportTo[0]: exportTo ~ (none) is not allowed for Istio configuration objects",
        ),
        (
            dr("\n  exportTo: [Bad_NS]"),
            "t.yaml[2]: DestinationRule productpage: spec.exportTo[0]: only .,*, or a valid DNS 1123 label is allowed as exportTo entry",
        ),
        (
            se('\n  exportTo: ["~", a]'),
            "t.yaml[2]: ServiceEntry productpage: spec.exportTo: cannot export service entry to no one (~) and someone",
        ),
        (
            vs("\n  exportTo: ."),
            "t.yaml[2]: VirtualService bookinfo: spec.exportTo: expected a list, got string",
        ),
    ],
)
def test_export_to_is_validated_as_istio_does(doc: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(GATEWAY, doc)
    assert list(exc.value.errors) == [message]


# --------------------------------------------------------------------------- command line


def test_namespace_reaches_run_arguments_and_workers() -> None:
    parser = build_parser()
    default = RunArgs.parse(parser.parse_args(["run", "config/"]))
    assert default.namespace == "istio-system"
    args = RunArgs.parse(parser.parse_args(["run", "--namespace", "bookinfo", "config/"]))
    assert "--namespace=bookinfo" in run_argv(args)
    worker = worker_argv(args, 1, [("127.0.0.1", 8080)], None, ready_fd=5)
    assert RunArgs.parse(parser.parse_args(worker)).namespace == "bookinfo"


def test_a_reload_loads_in_the_runs_namespace(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    path.write_text(GATEWAY + "---\n" + vs('\n  exportTo: ["."]'))
    paths = [str(tmp_path)]
    config = load_config(paths, namespace="bookinfo")
    options = RunOptions(config_paths=tuple(paths), namespace="bookinfo", collect_metrics=False)
    reloaded, _ = Proxy(config, options)._load_runtime(paths)
    assert [v.key for v in reloaded.virtual_services] == ["bookinfo/bookinfo"]


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_route_and_check_take_the_gateway_namespace(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    path.write_text(GATEWAY + "---\n" + vs('\n  exportTo: ["."]'))
    hidden = cli("route", str(path), "--host", "bookinfo.test")
    assert hidden.returncode == 1, hidden.stderr
    assert "spec.exportTo: not exported to namespace istio-system" in hidden.stderr
    assert "the proxy answers 404" in hidden.stdout
    seen = cli("route", str(path), "--host", "bookinfo.test", "--namespace", "bookinfo")
    assert seen.returncode == 0, seen.stderr
    assert f"cluster:        {CLUSTER}" in seen.stdout
    checked = cli("check", str(path), "--namespace", "bookinfo")
    assert checked.returncode == 0 and "1 VirtualService(s)" in checked.stdout
    bad = cli("check", str(path), "--namespace", "Not_A_Namespace")
    assert bad.returncode == 2
    assert "--namespace: 'Not_A_Namespace' is not a namespace name" in bad.stderr


# --------------------------------------------------------------------------- Kubernetes Service


def service(annotation: str) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata:
  name: productpage
  namespace: bookinfo
  annotations: {{networking.istio.io/exportTo: "{annotation}"}}
spec:
  clusterIP: None
  ports: [{{port: 9080, targetPort: 8080, name: http}}]
"""


@pytest.mark.parametrize(
    ("annotation", "seen"),
    [("*", True), (".", False), ("istio-system", True), ("a, istio-system", True), ("a,b", False)],
)
def test_a_kubernetes_service_is_exported_by_its_annotation(annotation: str, seen: bool) -> None:
    config = load(GATEWAY, vs(), service(annotation))
    endpoints = config.clusters[CLUSTER].endpoints
    # Seen: the headless Service's pods are dialled at targetPort; hidden: a plain DNS name.
    port = 8080 if seen else 9080
    assert endpoints == DnsEndpoints((Endpoint("productpage.bookinfo.svc.cluster.local", port),))
    if not seen:
        assert config.warnings == (
            f"t.yaml[3]: Service productpage: metadata.annotations.networking.istio.io/exportTo: {HIDDEN}",
        )


def test_a_service_exported_to_dot_is_seen_from_its_namespace() -> None:
    dot = load(GATEWAY, vs(), service("."), namespace="bookinfo")
    assert dot.clusters[CLUSTER].endpoints == DnsEndpoints(
        (Endpoint("productpage.bookinfo.svc.cluster.local", 8080),)
    )
