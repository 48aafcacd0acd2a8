"""Istio ``HTTPMatchRequest`` -> ``HttpMatch``: the conditions of one ``match[]`` entry.

Theory
------
An entry tests ``uri``, ``scheme``, ``method``, ``authority``, ``headers``, ``withoutHeaders``
and ``queryParams``; every test of an entry must hold (``proxy.routing`` applies them).  Each
test is an Istio ``StringMatch``: exactly one of ``exact``, ``prefix`` or ``regex``.  An empty
match ``{}`` tests presence only (for ``uri`` it is no constraint), and so does regex ``*`` outside
``uri``.  Header names are compared lowercased.

Istio's regexes are RE2: a pattern Python's ``re`` would accept but RE2 rejects (lookarounds,
backreferences) is an error here too, as is one longer than 1024 characters.  ``sourceLabels``
and ``sourceNamespace`` select client workloads; a gateway has no labels, so such a match never
applies (as on an Istio gateway).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from proxy.config import HttpMatch, StringMatch, labels_of
from proxy.istio_names import (
    NOT_SUPPORTED,
    Meta,
    check_gateway_name,
    resolve_gateway_name,
    words,
)
from proxy.istio_reader import Reader, join_path, type_name
from proxy.regex import compile_regex

_MATCH_FIELDS = words(
    "name uri scheme method authority headers port sourceLabels gateways queryParams "
    "ignoreUriCase withoutHeaders sourceNamespace"
)
_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+")
_RE2_UNSUPPORTED = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=")


def _string_match(r: Reader, path: str, raw: object, *, presence: bool) -> StringMatch | None:
    """Istio StringMatch; ``presence``: ``{}`` or regex ``*`` test presence (headers, query)."""
    m = r.mapping(raw, path, ("exact", "prefix", "regex"))
    if m is None:
        if raw is None and presence:
            return StringMatch("present")
        return None
    set_keys = [k for k in ("exact", "prefix", "regex") if m.get(k) is not None]
    if len(set_keys) > 1:
        r.error(
            path, f"only one of exact, prefix or regex may be set (found {', '.join(set_keys)})"
        )
        return None
    if not set_keys:
        return StringMatch("present")
    kind = set_keys[0]
    value = r.string(m, kind, path)
    if value is None:
        return None
    here = join_path(path, kind)
    if kind == "regex":
        if presence and value == "*":
            return StringMatch("present")
        if not regex_ok(r, here, value):
            return None
        return StringMatch("regex", value)
    if kind == "prefix" and value == "":
        r.error(here, "prefix string match should not be empty")
        return None
    return StringMatch("exact" if kind == "exact" else "prefix", value)


def regex_ok(r: Reader, path: str, pattern: str) -> bool:
    if pattern == "":
        r.error(path, "regex string match should not be empty")
        return False
    if len(pattern) > 1024:
        r.error(path, "regex is too large, max length allowed is 1024")
        return False
    if _RE2_UNSUPPORTED.search(pattern):
        r.error(
            path,
            f"{pattern!r}: lookarounds and backreferences are not RE2 syntax; "
            "Istio uses RE2 style regex-based match (https://github.com/google/re2/wiki/Syntax)",
        )
        return False
    try:
        compile_regex(pattern)
    except ValueError as exc:
        r.error(
            path,
            f"{pattern!r}: {exc}; Istio uses RE2 style regex-based match "
            "(https://github.com/google/re2/wiki/Syntax)",
        )
        return False
    return True


def read_match(r: Reader, meta: Meta, path: str, raw: object) -> HttpMatch | None:
    m = r.mapping(raw, path, _MATCH_FIELDS, {"statPrefix": "statistics prefixes are not used"})
    if m is None:
        return HttpMatch() if raw is None else None
    fails = r.failed
    r.failed = False
    uri = _string_field(r, m, "uri", path)
    scheme = _string_field(r, m, "scheme", path)
    method = _string_field(r, m, "method", path)
    authority = _string_field(r, m, "authority", path)
    headers = _header_matches(r, m, "headers", path)
    without = _header_matches(r, m, "withoutHeaders", path)
    query: list[tuple[str, StringMatch]] = []
    qraw = m.get("queryParams")
    qpath = join_path(path, "queryParams")
    if qraw is not None and not isinstance(qraw, dict):
        r.error(qpath, f"expected an object of query parameter matches, got {type_name(qraw)}")
    elif isinstance(qraw, dict):
        for key, value in qraw.items():
            sm = _string_match(r, join_path(qpath, str(key)), value, presence=True)
            if sm is not None:
                query.append((str(key), sm))
    port = r.port(m, "port", path)
    gateways = tuple(
        resolve_gateway_name(g, meta.namespace) for _, g in r.string_list(m, "gateways", path)
    )
    for gpath, g in r.string_list(m, "gateways", path):
        check_gateway_name(r, gpath, g)
    source_labels = r.string_map(m, "sourceLabels", path) or {}
    source_namespace = r.string(m, "sourceNamespace", path) or ""
    if (source_labels or source_namespace) and not gateways:
        r.warn(
            path,
            "sourceLabels/sourceNamespace select client workloads; sticky-proxy is a "
            "gateway without labels, so this match never applies (as on an Istio gateway)",
        )
    ok = not r.failed
    r.failed = fails or r.failed
    if not ok:
        return None
    return HttpMatch(
        name=r.string(m, "name", path) or "",
        uri=uri,
        scheme=scheme,
        method=method,
        authority=authority,
        headers=tuple(headers),
        without_headers=tuple(without),
        query_params=tuple(query),
        ignore_uri_case=bool(r.boolean(m, "ignoreUriCase", path)),
        port=port,
        gateways=gateways,
        source_labels=labels_of(source_labels),
        source_namespace=source_namespace,
    )


def _string_field(r: Reader, m: Mapping[str, object], key: str, path: str) -> StringMatch | None:
    raw = m.get(key)
    if raw is None:
        return None
    sm = _string_match(r, join_path(path, key), raw, presence=key != "uri")
    if sm is not None and key == "uri" and sm.kind == "present":
        return None  # uri: {} is no constraint (Envoy's prefix "/")
    return sm


def _header_matches(
    r: Reader, m: Mapping[str, object], key: str, path: str
) -> list[tuple[str, StringMatch]]:
    raw = m.get(key)
    here = join_path(path, key)
    if raw is None:
        return []
    if not isinstance(raw, dict):
        r.error(here, f"expected an object of header matches, got {type_name(raw)}")
        return []
    out: list[tuple[str, StringMatch]] = []
    for name, value in raw.items():
        hpath = join_path(here, str(name))
        name = str(name)
        if name.startswith("@request.auth.claims"):
            r.error(hpath, f"JWT claim based routing is {NOT_SUPPORTED}")
            continue
        if not _HEADER_NAME.fullmatch(name):
            r.error(hpath, f"header name {name} is not a valid header name")
            continue
        if value is None:
            r.error(hpath, f"header match {name} cannot be null")
            continue
        sm = _string_match(r, hpath, value, presence=True)
        if sm is not None:
            out.append((name.lower(), sm))
    return out
