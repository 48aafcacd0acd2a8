"""``exportTo``: the VirtualServices, DestinationRules, ServiceEntries, Services the gateway sees.

Theory
------
sticky-proxy runs as an Istio gateway proxy does, in one namespace (``--namespace``, by default
``istio-system``, the ingress gateway's), and uses only the resources exported to it.  A
resource's ``exportTo`` lists namespaces: ``.`` is its own namespace, ``*`` every namespace,
``~`` none (ServiceEntry only), any other entry a namespace name; no ``exportTo`` at all means
``*`` (Istio's default while the mesh config sets no ``defaultExportTo``, which sticky-proxy does
not read).  A Kubernetes Service says it with the ``networking.istio.io/exportTo`` annotation
(comma-separated).  A resource not exported to the gateway's namespace is not used, with a
warning; a hidden Service's host is then resolved as a plain DNS name.

Visibility (pilot/pkg/model/push_context.go): ``initVirtualServices`` indexes a VirtualService
by the namespaces of its ``exportTo`` (``.`` resolved to its own, see ``convertExportToSet``);
``setDestinationRules`` puts a rule in its own namespace's pool only if ``exportTo`` is empty or
holds ``*``, ``.`` or that namespace, and ``IsServiceVisible`` does the same for services.
Validation (pkg/config/validation/validation.go ``validateExportTo`` and
pkg/config/visibility): entries are ``.``, ``*`` or a DNS-1123 label (``~`` too for a
ServiceEntry), without duplicates (``.`` counts as the own namespace), and ``*`` or ``~`` stand
alone.  Gateways have no ``exportTo``: a gateway proxy selects them by labels, so every Gateway
read is served.  Not modelled: Istio's precedence among several visible DestinationRules for one
host (the proxy's namespace, then the service's, then the root namespace); sticky-proxy merges
the visible ones as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from proxy.istio_names import Meta
from proxy.istio_reader import Reader, is_dns1123_label, join_path

if TYPE_CHECKING:
    from proxy.istio_compile import Parsed

__all__ = [
    "DEFAULT_GATEWAY_NAMESPACE",
    "EXPORT_TO_ANNOTATION",
    "PUBLIC",
    "ExportTo",
    "hide_unexported",
    "read_export_to",
    "service_export_to",
    "visible",
]

DEFAULT_GATEWAY_NAMESPACE = "istio-system"
EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"  # on a Kubernetes Service
PUBLIC = "*"
PRIVATE = "."
NONE = "~"

ExportTo = frozenset[str]  # namespace names, "*" or "~"; "." is resolved to the own namespace


def read_export_to(r: Reader, meta: Meta, spec: object) -> ExportTo:
    """``spec.exportTo``, validated as Istio does; empty when absent (meaning ``*``)."""
    if not isinstance(spec, Mapping) or spec.get("exportTo") is None:
        return frozenset()
    entries = r.string_list(spec, "exportTo", "spec")
    service_entry = meta.kind == "ServiceEntry"
    seen: set[str] = set()
    for path, entry in entries:
        key = meta.namespace if entry == PRIVATE else entry
        if key in seen:
            r.error(
                path,
                f"duplicate entries in exportTo: . and current namespace {meta.namespace}"
                if key != entry
                else f"duplicate entries in exportTo for entry {entry}",
            )
            continue
        problem = _entry_problem(entry, service_entry=service_entry)
        if problem is not None:
            r.error(path, problem)
            continue
        seen.add(key)
    here = join_path("spec", "exportTo")
    if PUBLIC in seen and len(entries) > 1:
        r.error(here, "cannot have both public (*) and non-public exportTo values for a resource")
    if NONE in seen and len(entries) > 1:
        r.error(here, "cannot export service entry to no one (~) and someone")
    return frozenset(seen)


def _entry_problem(entry: str, *, service_entry: bool) -> str | None:
    """pkg/config/visibility ``Instance.Validate`` (``~`` is allowed for ServiceEntries)."""
    if entry in (PRIVATE, PUBLIC) or (entry == NONE and service_entry):
        return None
    if entry == NONE:
        return "exportTo ~ (none) is not allowed for Istio configuration objects"
    if not is_dns1123_label(entry):
        return "only .,*, or a valid DNS 1123 label is allowed as exportTo entry"
    return None


def visible(export_to: ExportTo, namespace: str) -> bool:
    """Whether a resource exported to ``export_to`` is seen from ``namespace``."""
    return not export_to or PUBLIC in export_to or namespace in export_to


class _Resource(Protocol):
    @property
    def meta(self) -> Meta: ...
    @property
    def reader(self) -> Reader: ...


_R = TypeVar("_R", bound=_Resource)


def hide_unexported(parsed: Parsed, namespace: str) -> None:
    """Drop the VirtualServices, DestinationRules and ServiceEntries ``namespace`` does not see.

    Runs after delegates are merged (a delegate is checked against its parent's namespace, and
    the merged VirtualService is exported as its parent is: virtualservice_controller.go)."""
    parsed.virtual_services = _exported(parsed.virtual_services, parsed.exports, namespace)
    parsed.destination_rules = _exported(parsed.destination_rules, parsed.exports, namespace)
    parsed.service_entries = _exported(parsed.service_entries, parsed.exports, namespace)
    services = []
    for svc in parsed.services:
        if visible(service_export_to(svc.meta), namespace):
            services.append(svc)
        else:
            svc.reader.warn(f"metadata.annotations.{EXPORT_TO_ANNOTATION}", _hidden(namespace))
    parsed.services = services


def service_export_to(meta: Meta) -> ExportTo:
    """A Kubernetes Service's ``networking.istio.io/exportTo`` annotation, comma-separated, as
    pilot/pkg/serviceregistry/kube/conversion.go reads it (no validation there)."""
    text = meta.annotations.get(EXPORT_TO_ANNOTATION, "")
    entries = (entry.strip() for entry in text.split(",")) if text else ()
    return frozenset(meta.namespace if entry == PRIVATE else entry for entry in entries)


def _hidden(namespace: str) -> str:
    return (
        f"not exported to namespace {namespace} (the gateway's, --namespace): "
        "hidden by exportTo, so not used"
    )


def _exported(
    items: list[_R], exports: Mapping[tuple[str, str], ExportTo], namespace: str
) -> list[_R]:
    kept: list[_R] = []
    for item in items:
        meta = item.meta
        if visible(exports.get((meta.kind, meta.key), frozenset()), namespace):
            kept.append(item)
        else:
            item.reader.warn("spec.exportTo", _hidden(namespace))
    return kept
