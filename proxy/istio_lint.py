"""Sticky-session pitfalls in valid Istio YAML: warnings, each with its fix.

Theory
------
Everything linted here is accepted by Istio and served as written; it still quietly breaks the
stickiness the configuration asks for. ``lint`` looks at the compiled ``Config`` and the parsed
DestinationRules (for the file and YAML path of each finding) and returns warning lines in the
loader's format (``file[N]: Kind name: path: message``); ``proxy.istio.compile_resources`` adds
them to ``Config.warnings``, so ``check``, ``run`` and a reload print them once each, with the
others. It changes nothing and reads nothing but its arguments.

* ``httpCookie`` generated without ``path``: Envoy's ``Set-Cookie`` then has no ``Path``
  (``makeSetCookieValue``; ``proxy.affinity.set_cookie_value``), and a browser scopes such a
  cookie to the directory of the request that set it (RFC 6265 §5.1.4, "default-path"): a first
  visit to ``/deep/er/page`` gets a cookie for ``/deep/er`` only, and ``/`` a second one.
* ``httpCookie`` ``ttl`` under ``SHORT_TTL`` seconds (0 is a session cookie: fine): Envoy sets
  the cookie once, when a request comes without it, and never refreshes it; once it expires the
  next request gets a new value (from the connection's addresses), maybe another pod.
* ``outlierDetection`` that can never eject: Envoy ejects a host only while
  ``100 * (ejected + 1) / hosts <= maxEjectionPercent`` (``DetectorImpl::ejectHost`` in
  envoy's ``source/common/upstream/outlier_detection_impl.cc``; ``proxy.health`` does the
  same), and Istio leaves Envoy's default 10 when the field is unset or 0
  (``cluster_traffic_policy.go``): with fewer than ten pods a failing pod is never ejected and
  keeps its sessions failing.
* ``consistentHash`` behind a weighted split: Envoy picks one of the weighted destinations at
  random for each request before it hashes, so a session moves between subsets, unless the
  VirtualService has ``sticky-proxy/sticky-weights`` (``proxy.istio_session``).
* ``httpHeaderName`` a client cannot usefully send: hop-by-hop headers (they describe the
  connection and Envoy removes them before routing), headers the gateway sets for every
  request, pseudo-headers other than ``:authority``, names that are not HTTP tokens.
* ``httpCookie`` generated on an HTTPS server without the ``Secure`` attribute: the browser
  would also send it over plain HTTP (Istio adds no attribute either).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.affinity import CookiePolicy, HashPolicy, HeaderPolicy
from proxy.config import (
    ClusterSpec,
    Config,
    OutlierDetection,
    StaticEndpoints,
    host_subset_of,
)
from proxy.istio_dr import ParsedDestinationRule
from proxy.istio_names import MESH_GATEWAY, Meta
from proxy.istio_policy import TrafficPolicy
from proxy.istio_reader import join_path
from proxy.istio_session import STICKY_WEIGHTS_ANNOTATION

SHORT_TTL: Final = 300
"""Seconds: a generated cookie that expires sooner ends most browsing sessions mid-way."""

ISTIO_MAX_EJECTION_PERCENT: Final = 10

# RFC 9110 §7.6.1 and the legacy ones: Envoy's connection manager removes them from a request
# before the router hashes it (ConnectionManagerUtility::mutateRequestHeaders).
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    }
)
# Headers the gateway writes itself. sticky-proxy hashes a request's headers as the client sent
# them (proxy.affinity); Envoy hashes them after its connection manager set these.
_SET_BY_PROXY: Final = {
    "x-request-id": "clients send none and the gateway makes up a new one for every request, "
    "so no two requests share a key",
    "x-forwarded-proto": "clients send none and the gateway sets the listener's scheme, the "
    "same for everyone: no key in sticky-proxy (a random pod), one pod for all in Envoy",
    "x-forwarded-for": "sticky-proxy hashes the value the client sent (Envoy appends the "
    "client's address first); browsers send none, so without a load balancer in front that "
    "sets it every request goes to a random pod (useSourceIp: true hashes the client's address)",
}
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def lint(config: Config, rules: Sequence[ParsedDestinationRule]) -> list[str]:
    """Warning lines for the pitfalls above, in the loader's ``where: what: path: message``."""
    out: list[str] = []
    for dr in rules:
        for path, policy in _levels(dr):
            out.extend(_lint_level(config, dr.meta, path, policy))
    out.extend(_weighted_splits(config))
    out.extend(_cookie_not_secure(config))
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- DestinationRules


def _line(meta: Meta, path: str, message: str) -> str:
    return f"{meta.where}: {meta.kind} {meta.name}: {path}: {message}"


def _levels(dr: ParsedDestinationRule) -> Iterator[tuple[str, TrafficPolicy]]:
    """Every traffic policy of a rule with its YAML path: top, subsets, their port levels."""
    tops: list[tuple[str, TrafficPolicy | None]] = [("spec.trafficPolicy", dr.policy)]
    for i, subset in enumerate(dr.subsets):
        tops.append((f"spec.subsets[{i}].trafficPolicy", subset.policy))
    for path, policy in tops:
        if policy is None:
            continue
        yield path, policy
        for k, (_, level) in enumerate(policy.port_level):
            yield f"{path}.portLevelSettings[{k}]", level


def _lint_level(config: Config, meta: Meta, path: str, policy: TrafficPolicy) -> Iterator[str]:
    ch = policy.lb.consistent_hash if policy.lb is not None else None
    here = f"{path}.loadBalancer.consistentHash"
    if ch is not None and isinstance(ch.policy, CookiePolicy):
        yield from _cookie(meta, join_path(here, "httpCookie"), ch.policy)
    if ch is not None and isinstance(ch.policy, HeaderPolicy):
        problem = header_problem(ch.policy.name)
        if problem is not None:
            yield _line(
                meta,
                join_path(here, "httpHeaderName"),
                f"{ch.policy.name}: {problem}; hash on a cookie (httpCookie) or a header your "
                "application sends on every request",
            )
    if policy.outlier is not None:
        clusters = [c for c in config.clusters.values() if c.outlier is policy.outlier]
        # Identity, not equality: the clusters this very level configured (effective_policy
        # hands the level's object on unchanged), not those of an equal-looking other level.
        message = _outlier(policy.outlier, clusters)
        if message is not None:
            yield _line(meta, f"{path}.outlierDetection.maxEjectionPercent", message)


def _cookie(meta: Meta, path: str, policy: CookiePolicy) -> Iterator[str]:
    if policy.ttl is None:
        return  # passive: the application sets the cookie, with its own Path and expiry
    if not policy.path:
        yield _line(
            meta,
            path,
            f"cookie {policy.name} has no path: its Set-Cookie then has no Path (Istio sets "
            "none either), so a browser keeps it for the directory of the first request only "
            "(a first visit to /shop/cart/item sets it for /shop/cart) and other paths get "
            "another cookie, maybe another pod; add `path: /`",
        )
    if 0 < policy.ttl < SHORT_TTL:
        yield _line(
            meta,
            join_path(path, "ttl"),
            f"cookie {policy.name} expires {policy.ttl}s after it is set (it is set once, "
            "never refreshed): the next request then gets a new cookie, maybe another pod, "
            "and the session moves; if that is not meant, use a longer ttl (1h) or ttl 0s "
            "(a session cookie, kept until the browser closes)",
        )


def header_problem(name: str) -> str | None:
    """Why a client cannot usefully send header ``name`` to hash on, or None."""
    lower = name.lower()
    if lower in (":authority", "host"):
        return None
    if lower.startswith(":"):
        return (
            "a pseudo-header: sticky-proxy hashes the request's header fields only (of the "
            "pseudo-headers just :authority, the Host), so no request has it and every request "
            "goes to a random pod"
        )
    if not _TOKEN.fullmatch(name):
        return "not a valid header name (RFC 9110 token), no client can send it"
    if lower in _HOP_BY_HOP:
        return (
            "a hop-by-hop header: it describes the connection, not the session (Envoy removes "
            "it before routing, and clients send the same few values or none), so it keeps no "
            "session on its pod"
        )
    return _SET_BY_PROXY.get(lower)


def _outlier(outlier: OutlierDetection, clusters: Iterable[ClusterSpec]) -> str | None:
    if not (
        outlier.consecutive_5xx_errors
        or outlier.consecutive_gateway_errors
        or (
            outlier.split_external_local_origin_errors and outlier.consecutive_local_origin_failures
        )
    ):
        return None  # every detector is off: nothing would be ejected anyway
    most = outlier.max_ejection_percent
    if most <= 0:  # not reachable from YAML: Istio turns 0 into Envoy's default
        return None
    need = -(-100 // most)  # the fewest hosts of which one is within `most` percent
    small: list[str] = []
    dns: list[str] = []
    least = 0
    for cluster in sorted(clusters, key=lambda c: c.name):
        if isinstance(cluster.endpoints, StaticEndpoints):
            count = len(cluster.endpoints.endpoints)
            if 2 <= count < need:  # one endpoint: ejecting it would leave nothing
                small.append(f"{cluster.name} ({count} endpoints)")
                least = max(least, -(-100 // count))
        elif need > 2:
            dns.append(cluster.name)
    default = " (Envoy's default, Istio's when unset)" if most == ISTIO_MAX_EJECTION_PERCENT else ""
    rule = "Envoy ejects a pod only while 100 x (ejected + 1) / pods <= maxEjectionPercent"
    if small:
        return (
            f"maxEjectionPercent {most}{default} never lets a pod of {', '.join(small)} be "
            f"ejected ({rule}), so a failing pod keeps its sessions and their errors; set "
            f"maxEjectionPercent to at least {least}, or 100"
        )
    if dns:
        return (
            f"maxEjectionPercent {most}{default}: {', '.join(dns)} (DNS) ejects no pod while "
            f"it has fewer than {need} ({rule}), so a failing pod keeps its sessions and their "
            f"errors; with N pods set at least 100 / N (rounded up), or 100"
        )
    return None


# --------------------------------------------------------------------------- VirtualServices


def _gateway_bound(gateways: Sequence[str]) -> bool:
    return any(g != MESH_GATEWAY for g in gateways)


def _weighted_splits(config: Config) -> Iterator[str]:
    for vs in config.virtual_services:
        if vs.sticky_weights or not _gateway_bound(vs.gateways):
            continue
        for route in vs.http:
            live = [d for d in route.route if d.weight > 0] or list(route.route)
            if len(live) < 2 or not any(d.hash_policies for d in live):
                continue
            names = ", ".join(_named(d.destination.host, d.destination.subset) for d in live)
            yield (
                f"{vs.source}: VirtualService {vs.name}: spec.http[{route.index}].route: "
                f"consistent hashing behind a weighted split ({names}): Istio picks the "
                "destination at random for each request before hashing, so a session moves "
                f"between them; annotate the VirtualService with {STICKY_WEIGHTS_ANNOTATION}: "
                '"true" to pick the destination by the request\'s hash too'
            )


def _named(host: str, subset: str | None) -> str:
    return f"{host} subset {subset}" if subset else host


# --------------------------------------------------------------------------- HTTPS


@dataclass(frozen=True, slots=True)
class _Generated:
    name: str
    secure: bool


def _generated_cookies(policies: Iterable[HashPolicy]) -> Iterator[_Generated]:
    for policy in policies:
        if isinstance(policy, CookiePolicy) and policy.ttl is not None:
            secure = any(a.name.lower() == "secure" for a in policy.attributes)
            yield _Generated(policy.name, secure)


def _cookie_not_secure(config: Config) -> Iterator[str]:
    """A cookie generated on an HTTPS server without ``Secure``.

    Istio sets exactly the attributes given (so does sticky-proxy): without ``Secure`` a browser
    also sends the session cookie over plain HTTP, e.g. to the port that redirects to HTTPS.
    """
    for vs in config.virtual_services:
        servers = list(_https_servers_of(config, vs.gateways, vs.hosts, vs.namespace))
        if not servers:
            continue
        seen: set[str] = set()
        for route in vs.http:
            for dest in route.route:
                for cookie in _generated_cookies(dest.hash_policies):
                    if cookie.secure or cookie.name in seen:
                        continue
                    seen.add(cookie.name)
                    yield (
                        f"{vs.source}: VirtualService {vs.key}: the cookie {cookie.name} its "
                        f"DestinationRule generates is served on HTTPS ({', '.join(servers)}) "
                        "without the Secure attribute (Istio adds none either); add "
                        "`attributes: [{name: Secure}]` to httpCookie to keep it off plain HTTP"
                    )


def _https_servers_of(
    config: Config, gateways: Iterable[str], hosts: Sequence[str], namespace: str
) -> Iterator[str]:
    bound = set(gateways)
    for gw in config.gateways:
        if gw.key not in bound:
            continue
        for server in gw.servers:
            if server.tls is None or not server.served:
                continue
            if any(
                sh.namespace in ("*", namespace)
                and any(host_subset_of(sh.host, h) or host_subset_of(h, sh.host) for h in hosts)
                for sh in server.hosts
            ):
                yield f"Gateway {gw.key} server {server.port_name} port {server.port}"
