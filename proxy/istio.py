"""Istio resources -> the configuration model (``proxy.config``), with Istio's semantics.

Theory
------
Users bring the YAML their cluster already runs, so ``proxy.istio`` and the ``proxy.istio_*``
modules read Istio's own API (group ``networking.istio.io``, versions v1alpha3, v1beta1 and v1)
and reproduce what istiod does with it before Envoy sees anything.  The rules are read from
istio/istio (pilot's ``route.go``, ``gateway.go``, ``cluster_traffic_policy.go``, ``util.go``,
``destination_rule.go`` and ``pkg/config/validation``), not guessed; each module states the ones
it implements.

Loading is two passes.  This module, the entry point (``load_config``, ``load_text``), reads
files and documents, checks each document's ``apiVersion``, ``kind`` and ``metadata`` and hands
its ``spec`` to the parser of its kind, which checks that resource on its own.  Then the
cross-resource pass resolves references, merges DestinationRules and builds listeners and
clusters, and the result is assembled into a ``Config``:

* ``proxy.istio_reader``  - the strict YAML reader, durations, DNS names, the health-check text
* ``proxy.istio_names``   - host names, gateway references, metadata, shared constants
* ``proxy.istio_gateway`` - Gateway servers
* ``proxy.istio_vs``      - VirtualService: routes, destinations, redirects, rewrites, headers,
  retries; its match conditions in ``proxy.istio_match``
* ``proxy.istio_dr``      - DestinationRule (subsets, merging, which policy applies) and
  ServiceEntry; one level of a traffic policy in ``proxy.istio_policy``
* ``proxy.istio_delegate`` - delegate VirtualServices merged into their parents' routes
* ``proxy.istio_visibility`` - ``exportTo``: what the gateway's namespace (``namespace=``) sees
* ``proxy.istio_compile`` - the cross-resource pass

A ``kind: Secret`` (``apiVersion: v1``) is read too, for the certificates a Gateway's or a
DestinationRule's ``credentialName`` names (``proxy.istio_tls``); ``--credentials DIR`` is where
they are looked up next (``load_config(..., credentials=DIR)``).  A ``kind: Service`` (``v1``) gives
its host ports, the address dialled and session labels (``proxy.istio_service``).  Other kinds
(a helm chart's Deployments, Istio's Sidecars...) are skipped, summed up in one warning line.

Strictness: unknown fields, wrong types, bad durations (Go ``time.ParseDuration`` syntax: Istio
decodes specs with the legacy ``golang/protobuf/jsonpb``, whose Duration parser it is), missing
required fields, non-prime Maglev sizes and references to missing gateways are errors
naming the file, resource and YAML path. Istio fields that sticky-proxy does not act on (fault,
mirror, corsPolicy, tls origination, ...) are accepted with a warning. Ordering: resources apply in
the order they are read (files in the order given, a folder's ``*.yaml``/``*.yml`` by name,
documents in file order) - the order ``kubectl apply -f`` would create them in, which is Istio's
creation-time order.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from types import MappingProxyType

import yaml

from proxy.config import Config, ConfigError, HealthCheckSpec
from proxy.istio_compile import Compiler, Parsed
from proxy.istio_delegate import merge_delegates
from proxy.istio_dr import read_destination_rule, read_service_entry
from proxy.istio_gateway import read_gateway
from proxy.istio_lint import lint
from proxy.istio_names import (
    CLUSTER_DOMAIN,
    HEALTH_CHECK_ANNOTATION,
    MESH_GATEWAY,
    NOT_SUPPORTED,
    Meta,
    resolve_gateway_name,
    resolve_short_name,
)
from proxy.istio_reader import (
    Issues,
    Reader,
    did_you_mean,
    is_dns1123_label,
    parse_health_check,
    type_name,
)
from proxy.istio_service import SERVICE_FIELDS, read_service
from proxy.istio_tls import SECRET_FIELDS, read_secret
from proxy.istio_visibility import DEFAULT_GATEWAY_NAMESPACE, hide_unexported, read_export_to
from proxy.istio_vs import read_virtual_service

__all__ = [
    "API_GROUP",
    "API_VERSIONS",
    "CLUSTER_DOMAIN",
    "DEFAULT_NAMESPACE",
    "HEALTH_CHECK_ANNOTATION",
    "KINDS",
    "MESH_GATEWAY",
    "NOT_SUPPORTED",
    "compile_resources",
    "load_config",
    "load_text",
    "resolve_gateway_name",
    "resolve_short_name",
]

API_GROUP = "networking.istio.io"
API_VERSIONS = ("v1alpha3", "v1beta1", "v1")
KINDS = ("Gateway", "VirtualService", "DestinationRule", "ServiceEntry")
DEFAULT_NAMESPACE = "default"


# --------------------------------------------------------------------------- reading files


class _Loader(yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader):  # type: ignore[misc]
    """A safe loader that records duplicate keys instead of keeping the last one silently."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue
            if duplicate:
                self.duplicates.append((key_node.start_mark.line + 1, str(key)))
            seen.add(key)
        result: dict[object, object] = super().construct_mapping(node, deep=deep)
        return result


def _files(paths: Sequence[str], issues: Issues) -> list[str]:
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(name for name in os.listdir(path) if name.endswith((".yaml", ".yml")))
            if not found:
                issues.errors.append(f"{path}: no .yaml or .yml files in this folder")
            files.extend(os.path.join(path, name) for name in found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            issues.errors.append(f"{path}: no such file or folder")
    return files


def _documents(path: str, issues: Issues) -> list[tuple[str, object]]:
    """``(where, data)`` for each document of a file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        issues.errors.append(f"{path}: cannot read: {exc}")
        return []
    return _parse_text(text, path, issues)


def _parse_text(text: str, name: str, issues: Issues) -> list[tuple[str, object]]:
    """``(where, data)`` per document; ``where`` is ``name`` or ``name[N]`` (N from 1)."""
    docs: list[tuple[object, list[tuple[int, str]]]] = []
    loader = _Loader(text)
    try:
        while loader.check_data():
            data = loader.get_data()
            docs.append((data, loader.duplicates))
            loader.duplicates = []
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc)
        issues.errors.append(f"{where}: invalid YAML: {problem}")
    finally:
        loader.dispose()
    several = sum(1 for data, _ in docs if data is not None) > 1
    out: list[tuple[str, object]] = []
    for index, (data, duplicates) in enumerate(docs, start=1):
        where = f"{name}[{index}]" if several else name
        for line, key in duplicates:
            issues.errors.append(f"{where}: line {line}: duplicate key {key!r}")
        out.append((where, data))
    return out


# --------------------------------------------------------------------------- documents


def _read_document(issues: Issues, where: str, data: object, out: Parsed) -> None:
    if data is None:
        return
    bare = Reader(issues, where, "")
    if not isinstance(data, dict):
        bare.error("", f"expected a Kubernetes object, got {type_name(data)}")
        return
    kind = data.get("kind")
    if kind == "List" and isinstance(data.get("items"), list):
        for i, item in enumerate(data["items"]):
            _read_document(issues, f"{where} items[{i}]", item, out)
        return
    if not isinstance(kind, str) or not kind:
        bare.error("kind", "required")
        return
    metadata = data.get("metadata")
    raw_name = metadata.get("name") if isinstance(metadata, dict) else None
    name = raw_name if isinstance(raw_name, str) and raw_name else ""
    api = data.get("apiVersion")
    if kind == "Secret" and api == "v1":
        _read_secret(issues, where, data, name, out)
        return
    if kind == "Service" and api == "v1":
        _read_service(issues, where, data, name, out)
        return
    group, _, version = api.partition("/") if isinstance(api, str) else ("", "", "")
    if kind not in KINDS or (group and group != API_GROUP):
        # Counted, then summed up in one line per load (_skipped_summary): a helm chart's
        # Deployments and ServiceAccounts are expected here, not worth a warning each.
        group_note = f" ({api})" if isinstance(api, str) and kind in KINDS else ""
        out.skipped.append((f"{kind}{group_note}", group.endswith(".istio.io")))
        return
    r = Reader(issues, where, f"{kind} {name}" if name else kind)
    top = r.mapping(data, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if top is None:
        return
    if not isinstance(api, str):
        r.error("apiVersion", f"required ({API_GROUP}/v1, v1beta1 or v1alpha3)")
    elif version not in API_VERSIONS:
        versions = ", ".join(f"{API_GROUP}/{v}" for v in API_VERSIONS)
        r.error(
            "apiVersion",
            f"unknown version {api!r}{did_you_mean(version, API_VERSIONS)}; one of {versions}",
        )
    meta = _metadata(r, kind, metadata)
    spec = top.get("spec")
    if spec is None:
        r.error("spec", "required")
        return
    if meta is None:
        return
    _claim(r, out, kind, meta.key, where)
    if kind != "Gateway":
        out.exports[(kind, meta.key)] = read_export_to(r, meta, spec)
    if kind == "Gateway":
        gateway = read_gateway(r, meta, spec)
        if gateway is not None:
            out.gateways.append((gateway, r))
    elif kind == "VirtualService":
        vs = read_virtual_service(r, meta, spec)
        if vs is not None:
            out.virtual_services.append(vs)
    elif kind == "DestinationRule":
        dr = read_destination_rule(r, meta, spec)
        if dr is not None:
            out.destination_rules.append(dr)
    else:
        se = read_service_entry(r, meta, spec)
        if se is not None:
            out.service_entries.append(se)


def _claim(r: Reader, out: Parsed, kind: str, key: str, where: str) -> None:
    """Record that ``where`` defines ``kind`` ``key``. A second definition replaces the first,
    with a warning: ``kubectl apply -f`` on the folder would do that, and Istio's samples ship
    alternatives of one object (bookinfo's ``virtual-service-reviews-*.yaml``) side by side."""
    previous = out.seen.get((kind, key))
    if previous is not None:
        r.warn(
            "metadata.name",
            f"replaces {kind} {key} of {previous}: the last one read wins, as with kubectl apply",
        )
        out.forget(kind, key)
        out.exports.pop((kind, key), None)
    out.seen[(kind, key)] = where


def _core_object(
    issues: Issues,
    where: str,
    data: dict[object, object],
    name: str,
    out: Parsed,
    kind: str,
    fields: tuple[str, ...],
) -> tuple[Reader, Meta, dict[str, object]] | None:
    """A Kubernetes core (v1) object's reader, metadata and top level, its name claimed; None
    when it is too broken to read further (errors recorded)."""
    r = Reader(issues, where, f"{kind} {name}" if name else kind)
    top = r.mapping(data, "", fields)
    if top is None:
        return None
    meta = _metadata(r, kind, top.get("metadata"))
    if meta is None:
        return None
    _claim(r, out, kind, meta.key, where)
    return r, meta, top


def _read_secret(
    issues: Issues, where: str, data: dict[object, object], name: str, out: Parsed
) -> None:
    """A Kubernetes Secret: certificates for ``credentialName`` (``proxy.istio_tls``)."""
    found = _core_object(issues, where, data, name, out, "Secret", SECRET_FIELDS)
    secret = read_secret(*found) if found is not None else None
    if secret is not None:
        out.secrets.append(secret)


def _read_service(
    issues: Issues, where: str, data: dict[object, object], name: str, out: Parsed
) -> None:
    """A Kubernetes Service: its host's ports, address and labels (``proxy.istio_service``)."""
    found = _core_object(issues, where, data, name, out, "Service", SERVICE_FIELDS)
    if found is None:
        return
    r, meta, top = found
    service = read_service(r, meta, top.get("spec"))
    if service is not None:
        out.services.append(service)


def _skipped_summary(skipped: Sequence[tuple[str, bool]], issues: Issues) -> None:
    """One warning line per family for the objects sticky-proxy does not read."""
    for istio, family, what in (
        (False, "Kubernetes", "sticky-proxy does not read"),
        (
            True,
            "Istio",
            "sticky-proxy does not act on (it reads Gateway, VirtualService, "
            "DestinationRule and ServiceEntry)",
        ),
    ):
        counts = Counter(kind for kind, is_istio in skipped if is_istio == istio)
        if counts:
            kinds = ", ".join(k if n == 1 else f"{k} x{n}" for k, n in counts.items())
            total = sum(counts.values())
            objects = "object" if total == 1 else "objects"
            issues.warnings.append(f"skipped {total} {family} {objects} {what}: {kinds}")


def _metadata(r: Reader, kind: str, metadata: object) -> Meta | None:
    if metadata is None:
        r.error("metadata", "required")
        return None
    if not isinstance(metadata, dict):
        r.error("metadata", f"expected an object, got {type_name(metadata)}")
        return None
    name = r.string(metadata, "name", "metadata", required=True)
    namespace = r.string(metadata, "namespace", "metadata") or DEFAULT_NAMESPACE
    if not is_dns1123_label(namespace):
        r.error("metadata.namespace", f"invalid namespace {namespace!r}")
    annotations = r.string_map(metadata, "annotations", "metadata") or {}
    check = _health_check(r, annotations.get(HEALTH_CHECK_ANNOTATION))
    labels = r.string_map(metadata, "labels", "metadata") or {}
    if name is None:
        return None
    return Meta(
        kind,
        name,
        namespace,
        MappingProxyType(annotations),
        r.where,
        check,
        MappingProxyType(labels),
    )


def _health_check(r: Reader, text: str | None) -> HealthCheckSpec | None:
    """The ``sticky-proxy/health-check`` annotation, parsed once (None: absent or invalid)."""
    if text is None:
        return None
    try:
        return parse_health_check(text)
    except ValueError as exc:
        r.error(f"metadata.annotations.{HEALTH_CHECK_ANNOTATION}", str(exc))
        return None


# --------------------------------------------------------------------------- loading


def load_config(
    paths: Sequence[str],
    credentials: str | None = None,
    namespace: str = DEFAULT_GATEWAY_NAMESPACE,
) -> Config:
    """Load Istio YAML files or folders (multi-document) into a ``Config``.

    ``credentials`` is the ``--credentials`` folder, where a ``credentialName`` with no Secret
    in the YAML is looked up; ``namespace`` is the gateway's (``--namespace``), which sees only
    what ``exportTo`` exports to it. Raises ``ConfigError`` listing every error of every file.
    Warnings are returned in ``Config.warnings``, not logged: the caller decides where they go.
    """
    issues = Issues()
    parsed = Parsed()
    files = _files(paths, issues)
    order: list[str] = []
    for path in files:
        for where, data in _documents(path, issues):
            order.append(where)
            _read_document(issues, where, data, parsed)
    return compile_resources(parsed, issues, files, order, credentials, namespace)


def load_text(
    text: str,
    name: str = "<text>",
    credentials: str | None = None,
    namespace: str = DEFAULT_GATEWAY_NAMESPACE,
) -> Config:
    """Compile Istio YAML given as a string; ``name`` stands for the file in messages."""
    issues = Issues()
    parsed = Parsed()
    order: list[str] = []
    for where, data in _parse_text(text, name, issues):
        order.append(where)
        _read_document(issues, where, data, parsed)
    return compile_resources(parsed, issues, [name], order, credentials, namespace)


def _grouped(lines: Iterable[str], order: Sequence[str]) -> list[str]:
    """Lines in the order their files and documents were read (each keeps its own order)."""
    listed = list(lines)
    rank = {where: i for i, where in enumerate(order)}
    first: dict[str, int] = {}
    for i, line in enumerate(listed):
        first.setdefault(line.split(": ", 1)[0], len(order) + i)

    def key(line: str) -> int:
        where = line.split(": ", 1)[0]
        return rank.get(where, first[where])

    return sorted(listed, key=key)


def compile_resources(
    parsed: Parsed,
    issues: Issues,
    sources: Sequence[str],
    order: Sequence[str] = (),
    credentials: str | None = None,
    namespace: str = DEFAULT_GATEWAY_NAMESPACE,
) -> Config:
    """Cross-resource compilation; ``order`` lists the documents as read, for the messages."""
    _skipped_summary(parsed.skipped, issues)
    merge_delegates(parsed)  # before visibility: a merged VirtualService is exported as its root
    hide_unexported(parsed, namespace)
    compiler = Compiler(parsed, issues, credentials)
    virtual_services = compiler.virtual_services()
    listeners = compiler.listeners()
    compiler.build_clusters(listeners, virtual_services)
    errors = _grouped(dict.fromkeys(issues.errors), order)
    if errors:
        raise ConfigError(errors, _grouped(dict.fromkeys(issues.warnings), order))
    config = Config(
        listeners=tuple(listeners),
        clusters=MappingProxyType(dict(compiler.clusters)),
        gateways=tuple(gw for gw, _ in parsed.gateways),
        virtual_services=tuple(virtual_services),
        service_ports=MappingProxyType(dict(compiler.service_ports)),
        sources=tuple(sources),
        tls_files=tuple(dict.fromkeys(compiler.credentials.files)),
    )
    # Sticky-session pitfalls (proxy.istio_lint), among the other warnings of their document.
    found = [*issues.warnings, *lint(config, parsed.destination_rules)]
    return replace(config, warnings=tuple(_grouped(dict.fromkeys(found), order)))
