"""Names shared by every Istio resource: hosts, gateway references, metadata.

Theory
------
* **Names.**  A short host ``svc`` in namespace ``ns`` becomes ``svc.ns.svc.cluster.local``; a
  name with a dot is taken as written (so ``svc.ns`` is *not* expanded - Istio's own trap);
  ``*`` and IP addresses stay.  The namespace is ``metadata.namespace``, else ``default``.
  Gateway references: ``name`` -> ``<vs namespace>/name``, ``ns/name``, ``./name``, and the
  legacy ``name.ns.svc.cluster.local``.

Every resource parser gets the document's metadata as a ``Meta`` - kind, name, namespace,
annotations (the health-check one already parsed), labels and where it was read - and shares the
constants below.  The YAML-path, type and error helpers (``Reader``, ``Issues``, ``join_path``,
durations, ports) are ``proxy.istio_reader``'s; this module imports no other ``proxy.istio*``
module but that one, so the parsers can all stand on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.config import HealthCheckSpec, is_ip
from proxy.istio_reader import Reader, fqdn_problem, is_dns1123_label

CLUSTER_DOMAIN = "cluster.local"
HEALTH_CHECK_ANNOTATION = "sticky-proxy/health-check"
MESH_GATEWAY = "mesh"

NOT_SUPPORTED = "not supported by sticky-proxy"


def resolve_short_name(host: str, namespace: str) -> str:
    """Istio's ``ResolveShortnameToFQDN``: ``svc`` -> ``svc.<ns>.svc.cluster.local``."""
    if host == "*" or "." in host or is_ip(host):
        return host
    return f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}"


def resolve_gateway_name(name: str, namespace: str) -> str:
    """Istio's ``resolveGatewayName``: a VirtualService's gateway reference -> ``ns/name``."""
    if name == MESH_GATEWAY:
        return name
    if "/" in name:
        ns, _, gw = name.partition("/")
        return f"{namespace}/{gw}" if ns == "." else name
    if "." not in name:
        return f"{namespace}/{name}"
    # Legacy FQDN form name.ns[.svc.cluster.local].
    gw, _, rest = name.partition(".")
    return f"{rest.split('.', 1)[0]}/{gw}"


def check_gateway_name(r: Reader, path: str, name: str) -> None:
    if name == MESH_GATEWAY:
        return
    ns, slash, gw = name.partition("/")
    if slash:
        if not ns or not gw:
            r.error(path, "config namespace and gateway name cannot be empty")
        elif ns != "." and not is_dns1123_label(ns):
            r.error(path, f"invalid value for namespace: {ns!r}")
        elif not is_dns1123_label(gw):
            r.error(path, f"invalid value for gateway name: {gw!r}")
    elif fqdn_problem(name) is not None:
        r.error(path, f"invalid gateway name {name!r}")


@dataclass(frozen=True, slots=True)
class Meta:
    kind: str
    name: str
    namespace: str
    annotations: Mapping[str, str]
    where: str
    health_check: HealthCheckSpec | None = None  # the sticky-proxy/health-check annotation
    # metadata.labels (istio.io/persistent-session: proxy.istio_session reads them)
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def words(text: str) -> tuple[str, ...]:
    """Field and value lists, written as text to keep the tables short."""
    return tuple(text.split())
