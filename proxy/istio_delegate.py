"""Delegate VirtualServices: a parent route's ``delegate`` is replaced by the delegate's routes.

Theory
------
A VirtualService without ``hosts`` is a *delegate*: it is never used alone, only through a route
of a *root* VirtualService (one with hosts) that says ``delegate: {name, namespace}``, the
namespace defaulting to the root's.  Istio merges them before building any route
(pilot/pkg/model/virtualservice_controller.go ``mergeVirtualServices``, and the merge rules of
pilot/pkg/model/virtualservice.go ``MergeHTTPRoutes``), and so does this module, before the
cross-resource pass:

* The root route is replaced, in place, by one route per route of the delegate.  A delegate
  that is not found, or not exported to the root's namespace (``proxy.istio_visibility``), drops
  only that root route (a warning): its requests go on to the next routes, else 404.
* Matches: with no match on one side the other's apply; otherwise each match of the delegate
  route is combined with every root match it does not conflict with, and a delegate route with a
  match that conflicts with every root match is dropped (``mergeHTTPMatchRequests``).  Combined,
  the delegate's conditions win and the root's fill in what it lacks (uri, scheme, method,
  authority, port, gateways; headers, withoutHeaders and queryParams are merged by name).  A
  conflict is two path/scheme/method/authority/header/query tests that cannot both hold - a
  root ``prefix: /a`` takes a delegate ``prefix: /a/b`` or ``exact: /a/x``, not ``/b``; an exact
  only itself; a regex on either side allows nothing else on that field (``hasConflict``,
  ``stringMatchConflict``) - or different ``ignoreUriCase``, ports or gateways.
* The route: named ``<root>-<delegate>``; the root's ``rewrite``, ``directResponse``,
  ``timeout``, ``retries`` and ``headers`` apply where the delegate route has none
  (``mergeHTTPRoute``).
* The merged VirtualService is the root: its hosts, gateways and ``exportTo``.  A delegate may
  serve several roots; one delegating further is rejected when read (``proxy.istio_vs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from proxy.config import HttpMatch, HttpRoute, StringMatch, labels_of
from proxy.istio_reader import did_you_mean, join_path
from proxy.istio_visibility import ExportTo, visible
from proxy.istio_vs import ParsedVirtualService, RawRoute

if TYPE_CHECKING:
    from proxy.istio_compile import Parsed

__all__ = ["merge_delegates", "merge_matches", "merge_route"]


def merge_delegates(parsed: Parsed) -> None:
    """Replace every ``delegate`` route by its delegate's routes; drop the delegates."""
    delegates = {vs.meta.key: vs for vs in parsed.virtual_services if vs.is_delegate}
    roots = [vs for vs in parsed.virtual_services if not vs.is_delegate]
    referenced: set[str] = set()
    for vs in roots:
        if any(raw.delegate is not None for raw in vs.routes):
            vs.routes = _merged_routes(vs, delegates, roots, parsed.exports, referenced)
    for key, child in delegates.items():
        if key not in referenced:
            child.reader.warn(
                "spec.hosts",
                "no hosts, so this is a delegate VirtualService, and no route delegates to it: "
                "not used",
            )
    parsed.virtual_services = roots


def _merged_routes(
    vs: ParsedVirtualService,
    delegates: Mapping[str, ParsedVirtualService],
    roots: Sequence[ParsedVirtualService],
    exports: Mapping[tuple[str, str], ExportTo],
    referenced: set[str],
) -> list[RawRoute]:
    out: list[RawRoute] = []
    for raw in vs.routes:
        key = raw.delegate
        if key is None:
            out.append(raw)
            continue
        here = join_path(raw.path, "delegate")
        child = delegates.get(key)
        if child is None:
            vs.reader.warn(here, _not_found(key, delegates, roots))
            continue
        referenced.add(key)
        if not visible(exports.get(("VirtualService", key), frozenset()), vs.meta.namespace):
            vs.reader.warn(
                here,
                f"delegate VirtualService {key} is not exported to namespace "
                f"{vs.meta.namespace}: this route is not used",
            )
            continue
        for sub in child.routes:
            merged = merge_route(raw, sub)
            if merged is None:
                child.reader.warn(
                    join_path(sub.path, "match"),
                    f"conflicts with every match of VirtualService {vs.meta.key} {raw.path} "
                    "(a delegate's match must narrow its root's): not used under that route",
                )
                continue
            out.append(replace(merged, reader=child.reader))
    # The merged VirtualService's routes are numbered anew, as Istio's merged http list is.
    return [replace(raw, route=replace(raw.route, index=i)) for i, raw in enumerate(out)]


def _not_found(
    key: str, delegates: Mapping[str, ParsedVirtualService], roots: Sequence[ParsedVirtualService]
) -> str:
    if any(vs.meta.key == key for vs in roots):
        return (
            f"VirtualService {key} has hosts, so it is not a delegate (a delegate has none): "
            "this route is not used"
        )
    return f"delegate VirtualService {key} not found{did_you_mean(key, delegates)}: " + (
        "this route is not used"
    )


def merge_route(root: RawRoute, sub: RawRoute) -> RawRoute | None:
    """``mergeHTTPRoute``: ``sub`` under ``root``, None when their matches conflict."""
    matches = merge_matches(root.route.matches, sub.route.matches)
    if matches is None:
        return None
    r, s = root.route, sub.route
    retries = sub if sub.retries_set else root
    route = HttpRoute(
        index=s.index,
        name=_joined(r.name, s.name),
        matches=matches,
        route=s.route,
        redirect=s.redirect,
        # Envoy's route takes the redirect first (route.go translateRoute): a delegate's redirect
        # is not hidden by its root's directResponse.
        direct_response=s.direct_response or (r.direct_response if s.redirect is None else None),
        rewrite=s.rewrite or r.rewrite,
        timeout=s.timeout if s.timeout is not None else r.timeout,
        retries=retries.route.retries,
        headers=s.headers or r.headers,
    )
    return replace(
        sub,
        route=route,
        retries_set=retries.retries_set,
        ignore_previous_hosts=retries.ignore_previous_hosts,
    )


def _joined(root: str, sub: str) -> str:
    if not sub:
        return root
    return f"{root}-{sub}" if root else sub


def merge_matches(
    root: tuple[HttpMatch, ...], sub: tuple[HttpMatch, ...]
) -> tuple[HttpMatch, ...] | None:
    """``mergeHTTPMatchRequests``: the combined matches, None on a conflict."""
    if not root:
        return sub
    if not sub:
        return root
    out: list[HttpMatch] = []
    for leaf in sub:
        found = [_merge_match(parent, leaf) for parent in root if not _conflict(parent, leaf)]
        if not found:
            return None
        out.extend(found)
    return tuple(out)


def _merge_match(root: HttpMatch, leaf: HttpMatch) -> HttpMatch:
    """``mergeHTTPMatchRequest``: the leaf's conditions, the root's where the leaf has none."""
    return replace(
        leaf,
        name=_joined(root.name, leaf.name),
        uri=leaf.uri or root.uri,
        scheme=leaf.scheme or root.scheme,
        method=leaf.method or root.method,
        authority=leaf.authority or root.authority,
        headers=_merged_pairs(root.headers, leaf.headers),
        without_headers=_merged_pairs(root.without_headers, leaf.without_headers),
        query_params=_merged_pairs(root.query_params, leaf.query_params),
        port=leaf.port if leaf.port is not None else root.port,
        gateways=leaf.gateways or root.gateways,
        source_labels=labels_of({**dict(root.source_labels), **dict(leaf.source_labels)}),
        source_namespace=leaf.source_namespace or root.source_namespace,
    )


def _merged_pairs(
    root: tuple[tuple[str, StringMatch], ...], leaf: tuple[tuple[str, StringMatch], ...]
) -> tuple[tuple[str, StringMatch], ...]:
    """``maps.MergeCopy(root, leaf)``: by name, the leaf's value wins."""
    return tuple({**dict(root), **dict(leaf)}.items())


def _conflict(root: HttpMatch, leaf: HttpMatch) -> bool:
    """``hasConflict``: no request can satisfy both (then they are not merged)."""
    pairs = (
        (root.uri, leaf.uri),
        (root.scheme, leaf.scheme),
        (root.method, leaf.method),
        (root.authority, leaf.authority),
    )
    if any(_string_conflict(a, b) for a, b in pairs):
        return True
    for mine, theirs in (
        (root.headers, leaf.headers),
        (root.without_headers, leaf.without_headers),
        (root.query_params, leaf.query_params),
    ):
        parent = dict(mine)
        if any(_string_conflict(parent.get(name), value) for name, value in theirs):
            return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    if root.port is not None and leaf.port is not None and root.port != leaf.port:
        return True
    if root.source_namespace and leaf.source_namespace != root.source_namespace:
        return True
    labels = dict(root.source_labels)
    if any(labels.get(k, v) != v for k, v in leaf.source_labels):
        return True
    if root.gateways and leaf.gateways:
        return len(root.gateways) < len(leaf.gateways) or not set(leaf.gateways) <= set(
            root.gateways
        )
    return False


def _string_conflict(root: StringMatch | None, leaf: StringMatch | None) -> bool:
    """``stringMatchConflict``: a leaf test that the root's does not contain."""
    if root is None or leaf is None:
        return False
    if root.kind == "regex" and leaf.kind in ("regex", "prefix", "exact"):
        return True
    if leaf.kind == "regex" and root.kind in ("regex", "prefix", "exact"):
        return True
    if root.kind == "exact":
        return leaf.kind != "exact" or leaf.value != root.value
    if root.kind == "prefix" and leaf.kind in ("prefix", "exact"):
        return not leaf.value.startswith(root.value)
    return True
