"""A Kubernetes ``Service`` (``apiVersion: v1``) read beside the Istio resources of a folder.

Theory
------
Helm and kustomize output puts Services next to the Istio YAML, and Istio reads them: a Service
``reviews`` in namespace ``ns`` *is* the host ``reviews.ns.svc.cluster.local``, with the ports of
``spec.ports`` (pilot's ``serviceregistry/kube/conversion.go``, ``ConvertService``).  sticky-proxy
sees no pods, so it takes from a Service what does not need them:

* **Ports.**  A destination without a port goes to the Service's only port (Istio's
  ``GetDestinationCluster``), so bookinfo's ``host: reviews`` is port 9080 whatever the
  Gateway's port; a port the Service does not have is an error.
* **The address dialled** is the host name, resolved by DNS and refreshed.  A *headless* Service
  (``clusterIP: None``) resolves to the pods' IPs, which listen on ``targetPort``; a normal
  (ClusterIP) Service resolves to its cluster IP, which listens on ``port`` (kube-proxy forwards to
  the pods' targetPort).  A *named* targetPort is the name of a container port: without the pods
  it cannot be resolved, so a headless Service dials ``port`` and says so.  ``type:
  ExternalName`` resolves ``spec.externalName`` at ``port``.
* **Labels** (``metadata.labels``): ``istio.io/persistent-session`` and its kin
  (``proxy.istio_session``), as on a ServiceEntry.

The other fields of a Kubernetes ``ServiceSpec`` (``selector``, ``sessionAffinity``, node ports,
load balancer settings...) are accepted and ignored: they concern the cluster, not this proxy.
A field Kubernetes does not know is an error, as ``kubectl apply`` (strict field validation)
makes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.config import Endpoint
from proxy.istio_dr import ServicePort
from proxy.istio_names import CLUSTER_DOMAIN, Meta, words
from proxy.istio_reader import Reader, fqdn_problem, join_path, type_name

SERVICE_FIELDS = words("apiVersion kind metadata spec status")
# core/v1 ServiceSpec and ServicePort (Kubernetes 1.33), all accepted.
SPEC_FIELDS = words(
    """ports selector clusterIP clusterIPs type externalIPs sessionAffinity loadBalancerIP
    loadBalancerSourceRanges externalName externalTrafficPolicy healthCheckNodePort
    publishNotReadyAddresses sessionAffinityConfig ipFamilies ipFamilyPolicy
    allocateLoadBalancerNodePorts loadBalancerClass internalTrafficPolicy trafficDistribution"""
)
PORT_FIELDS = words("name protocol appProtocol port targetPort nodePort")
TYPES = words("ClusterIP NodePort LoadBalancer ExternalName")
PROTOCOLS = words("TCP UDP SCTP")
_NAMED_PROTOCOLS = words("HTTP HTTP2 HTTPS GRPC GRPC-WEB TCP TLS MONGO REDIS MYSQL")

# Kubernetes' IsValidPortName (IANA_SVC_NAME): at most 15 characters, lowercase letters, digits
# and single inner dashes, at least one letter.
_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*")


@dataclass(frozen=True, slots=True)
class ParsedService:
    meta: Meta
    reader: Reader
    host: str  # name.namespace.svc.cluster.local
    ports: tuple[ServicePort, ...]  # target: the pods' port (None: same as the port, or named)
    headless: bool  # clusterIP: None - DNS answers the pods' addresses
    external_name: str | None = None  # type: ExternalName

    def target(self, port: int) -> Endpoint:
        """The name resolved and the port dialled for the service port ``port``."""
        if self.external_name is not None:
            return Endpoint(self.external_name, port)
        if not self.headless:
            return Endpoint(self.host, port)  # the cluster IP listens on the service port
        found = next((p for p in self.ports if p.number == port), None)
        return Endpoint(self.host, (found.target if found else None) or port)


def service_host(meta: Meta) -> str:
    """Istio's ``ServiceHostname``: ``name.namespace.svc.<domain>``."""
    return f"{meta.name}.{meta.namespace}.svc.{CLUSTER_DOMAIN}"


def read_service(r: Reader, meta: Meta, spec: object) -> ParsedService | None:
    s = r.mapping(spec, "spec", SPEC_FIELDS)
    if s is None:
        if spec is None:
            r.error("spec", "required")
        return None
    kind = r.string(s, "type", "spec") or "ClusterIP"
    if kind not in TYPES:
        r.error("spec.type", f"unsupported value {kind!r}: one of {', '.join(TYPES)}")
    headless = s.get("clusterIP") == "None"
    external = r.string(s, "externalName", "spec") if kind == "ExternalName" else None
    if kind == "ExternalName" and (external is None or fqdn_problem(external) is not None):
        r.error(
            "spec.externalName", f"a DNS name is required for type ExternalName, got {external!r}"
        )
        external = None
    ports: list[ServicePort] = []
    items = r.items(s, "ports", "spec")
    if not items and not headless and kind != "ExternalName":
        r.error("spec.ports", "required (only a headless Service may have no ports)")
    for path, raw in items:
        port = _port(r, path, raw, headless, several=len(items) > 1)
        if port is None:
            continue
        if any(p.number == port.number and p.protocol == port.protocol for p in ports):
            r.error(join_path(path, "port"), f"duplicate port {port.number}/{port.protocol}")
        if port.name and any(p.name == port.name for p in ports):
            r.error(join_path(path, "name"), f"duplicate port name {port.name!r}")
        ports.append(port)
    if r.failed:
        return None
    return ParsedService(meta, r, service_host(meta), tuple(ports), headless, external)


def _port(
    r: Reader, path: str, raw: object, headless: bool, *, several: bool
) -> ServicePort | None:
    m = r.mapping(raw, path, PORT_FIELDS)
    if m is None:
        if raw is None:
            r.error(path, "expected an object, got null")
        return None
    number = r.port(m, "port", path, required=True)
    name = r.string(m, "name", path, required=several) or ""
    if name and (len(name) > 15 or not _PORT_NAME.fullmatch(name) or name.isdigit()):
        r.error(join_path(path, "name"), f"invalid port name {name!r} (IANA_SVC_NAME)")
    protocol = r.string(m, "protocol", path) or "TCP"
    if protocol not in PROTOCOLS:
        r.error(join_path(path, "protocol"), f"unsupported value {protocol!r}: TCP, UDP or SCTP")
    app = r.string(m, "appProtocol", path)
    r.port(m, "nodePort", path)
    target = _target_port(r, path, m.get("targetPort"), number, headless)
    if number is None:
        return None
    if protocol != "TCP":
        r.warn(path, f"{protocol} port {number}: sticky-proxy proxies HTTP over TCP only")
    # Istio's kube.ConvertProtocol: appProtocol, else the name's prefix (http-web -> HTTP).
    prefix = name.split("-", 1)[0].upper()
    label = app or (prefix if protocol == "TCP" and prefix in _NAMED_PROTOCOLS else protocol)
    return ServicePort(number, name, label.upper(), target)


def _target_port(
    r: Reader, path: str, value: object, number: int | None, headless: bool
) -> int | None:
    here = join_path(path, "targetPort")
    if value is None:
        return None
    if isinstance(value, str):
        if not value or len(value) > 15 or not _PORT_NAME.fullmatch(value) or value.isdigit():
            r.error(here, f"invalid port name {value!r} (IANA_SVC_NAME)")
        elif headless:
            r.warn(
                here,
                f"named port {value!r} is a container port of the pods, which sticky-proxy "
                f"does not see: the pods are dialled at the service port {number}",
            )
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        r.error(here, f"expected a port number or name, got {type_name(value)}")
        return None
    if not 0 < value <= 65535:
        r.error(here, f"port number {value} must be in the range 1..65535")
        return None
    return value
