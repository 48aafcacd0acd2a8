"""What stands behind a destination host: its DestinationRules and its ServiceEntry.

Theory
------
* **Several DestinationRules for one host** merge as in Istio: subsets are concatenated (the
  first of a name wins), the first top-level traffic policy wins.  A host without a rule of its
  own takes the most specific wildcard rule that covers it.
* **Hash policy of a route** comes from the destination host's DestinationRule:
  subset port-level > subset > port-level > top-level ``consistentHash``, where the port-level
  entries are only consulted when the destination names its port (``hashForHTTPDestination``).
* **Cluster traffic policy** (``MergeSubsetTrafficPolicy``): the top-level policy, replaced
  *wholesale* by a port-level entry for the cluster's port (no inheritance: omitted fields get
  defaults); then the subset's fields override one by one, unless the subset has a port-level
  entry for the port, which again replaces all four (loadBalancer, connectionPool,
  outlierDetection, tls).  No DestinationRule, or no loadBalancer: LEAST_REQUEST.

A ServiceEntry names hosts, ports (unique names and numbers) and, for ``resolution: STATIC``, IP
endpoints or, for ``DNS``, names to resolve.  One with resolution NONE (original-destination
passthrough, the default), DNS_ROUND_ROBIN or a ``workloadSelector`` is skipped with a warning
(its hosts then resolve by DNS like any host without one), so is a ``unix://`` endpoint.  Host
names are lowercased.  How endpoints become a cluster's members is
``proxy.istio_compile``'s part.  The traffic policy of one level is parsed by
``proxy.istio_policy``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from proxy.affinity import HashPolicy
from proxy.config import (
    UINT32_MAX,
    ClientTls,
    Destination,
    HealthCheckSpec,
    host_subset_of,
    is_ip,
    labels_of,
)
from proxy.istio_names import NOT_SUPPORTED, Meta, resolve_short_name
from proxy.istio_policy import TrafficPolicy, read_traffic_policy
from proxy.istio_reader import (
    Reader,
    did_you_mean,
    fqdn_problem,
    is_dns1123_label,
    join_path,
    type_name,
    wildcard_domain_problem,
)

# --------------------------------------------------------------------------- DestinationRule


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    policy: TrafficPolicy | None


@dataclass(slots=True)
class ParsedDestinationRule:
    meta: Meta
    reader: Reader
    host: str
    policy: TrafficPolicy | None
    subsets: list[Subset]


def read_destination_rule(r: Reader, meta: Meta, spec: object) -> ParsedDestinationRule | None:
    s = r.mapping(
        spec,
        "spec",
        ("host", "trafficPolicy", "subsets", "exportTo"),
        {"workloadSelector": "a DestinationRule here applies to every request"},
    )
    if s is None:
        return None
    host = r.string(s, "host", "spec", required=True)
    if host is not None:
        host = host.lower()  # DNS names compare case-insensitively, as VirtualService hosts do
        problem = None if is_ip(host) else wildcard_domain_problem(host)
        if problem is not None:
            r.error("spec.host", problem)
            host = None
    policy = read_traffic_policy(r, s.get("trafficPolicy"), "spec.trafficPolicy", port_level=True)
    subsets: list[Subset] = []
    names: set[str] = set()
    for path, raw in r.items(s, "subsets", "spec"):
        sm = r.mapping(raw, path, ("name", "labels", "trafficPolicy"))
        if sm is None:
            if raw is None:
                r.error(path, "subset may not be null")
            continue
        name = r.string(sm, "name", path, required=True)
        labels = r.string_map(sm, "labels", path) or {}
        sub_policy = read_traffic_policy(
            r, sm.get("trafficPolicy"), join_path(path, "trafficPolicy"), port_level=True
        )
        if name is None:
            continue
        if not is_dns1123_label(name):
            r.error(join_path(path, "name"), f"subset name is invalid: {name}")
        if name in names:
            r.error(join_path(path, "name"), f"duplicate subset names: {name}")
        names.add(name)
        subsets.append(Subset(name, labels_of(labels), sub_policy))
    if host is None:
        return None
    return ParsedDestinationRule(meta, r, resolve_short_name(host, meta.namespace), policy, subsets)


@dataclass(slots=True)
class MergedRule:
    """The DestinationRules of one host merged as Istio does."""

    host: str
    names: list[str]
    policy: TrafficPolicy | None
    subsets: dict[str, Subset]
    health_check: HealthCheckSpec | None
    reader: Reader


def merge_rules(rules: Iterable[ParsedDestinationRule]) -> dict[str, MergedRule]:
    merged: dict[str, MergedRule] = {}
    for dr in rules:
        check = dr.meta.health_check
        existing = merged.get(dr.host)
        if existing is None:
            merged[dr.host] = MergedRule(
                dr.host, [dr.meta.key], dr.policy, {s.name: s for s in dr.subsets}, check, dr.reader
            )
            continue
        existing.names.append(dr.meta.key)
        for subset in dr.subsets:
            if subset.name in existing.subsets:
                dr.reader.warn(
                    "spec.subsets",
                    f"subset {subset.name} of host {dr.host} is "
                    f"already defined by DestinationRule {existing.names[0]}; Istio "
                    "keeps the first",
                )
            else:
                existing.subsets[subset.name] = subset
        if existing.policy is None:
            existing.policy = dr.policy
        elif dr.policy is not None:
            dr.reader.warn(
                "spec.trafficPolicy",
                f"host {dr.host} already has a traffic policy "
                f"from DestinationRule {existing.names[0]}; Istio keeps the first",
            )
        existing.health_check = existing.health_check or check
    return merged


def rule_for(host: str, rules: Mapping[str, MergedRule]) -> MergedRule | None:
    """Exact host first, then the most specific wildcard host that covers it."""
    exact = rules.get(host)
    if exact is not None:
        return exact
    best: MergedRule | None = None
    for pattern, rule in rules.items():
        covers = pattern.startswith("*") and host_subset_of(host, pattern)
        if covers and (best is None or len(pattern) > len(best.host)):
            best = rule
    return best


def _hash_of(policy: TrafficPolicy | None, port: int | None) -> HashPolicy | None:
    """``consistentHash`` of one level (its port-level entry when ``port`` is given)."""
    if policy is None:
        return None
    if port is not None:
        for number, level in policy.port_level:
            if number == port:
                lb = level.lb
                return lb.consistent_hash.policy if lb and lb.consistent_hash else None
        return None
    lb = policy.lb
    return lb.consistent_hash.policy if lb and lb.consistent_hash else None


def hash_for_destination(dest: Destination, rule: MergedRule | None) -> tuple[HashPolicy, ...]:
    """Istio's ``hashForHTTPDestination``: subset port-level > subset > port-level > top."""
    if rule is None:
        return ()
    chosen = _hash_of(rule.policy, None)
    port_level = _hash_of(rule.policy, dest.port) if dest.port is not None else None
    subset_hash = subset_port = None
    subset = rule.subsets.get(dest.subset or "")
    if subset is not None and dest.subset:
        subset_hash = _hash_of(subset.policy, None)
        subset_port = _hash_of(subset.policy, dest.port) if dest.port is not None else None
    for candidate in (subset_port, subset_hash, port_level):
        if candidate is not None:
            chosen = candidate
            break
    return (chosen,) if chosen is not None else ()


def effective_policy(
    rule: MergedRule | None, subset: str | None, port: int
) -> TrafficPolicy | None:
    """Istio's ``MergeSubsetTrafficPolicy`` for one cluster."""
    if rule is None:
        return None
    original = rule.policy.for_port(port)[0] if rule.policy else None
    sub = rule.subsets.get(subset) if subset else None
    if sub is None or sub.policy is None:
        return original
    sub_policy, has_port_level = sub.policy.for_port(port)
    if original is None:
        return sub_policy
    return TrafficPolicy(
        lb=sub_policy.lb if sub_policy.lb is not None or has_port_level else original.lb,
        pool=sub_policy.pool if sub_policy.pool is not None or has_port_level else original.pool,
        outlier=(
            sub_policy.outlier
            if sub_policy.outlier is not None or has_port_level
            else original.outlier
        ),
        tls=sub_policy.tls if sub_policy.tls is not None or has_port_level else original.tls,
    )


def resolve_rule_tls(dr: ParsedDestinationRule, resolve: Callable[[ClientTls], ClientTls]) -> None:
    """Every ``tls`` of ``dr`` (top, subsets, their port levels) with its certificates read."""

    def walk(policy: TrafficPolicy | None) -> TrafficPolicy | None:
        if policy is None:
            return None
        levels = tuple((port, walk(level) or level) for port, level in policy.port_level)
        tls = resolve(policy.tls) if policy.tls is not None else None
        return replace(policy, tls=tls, port_level=levels)

    dr.policy = walk(dr.policy)
    dr.subsets = [replace(s, policy=walk(s.policy)) for s in dr.subsets]


# --------------------------------------------------------------------------- ServiceEntry

_RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str
    protocol: str
    target: int | None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    address: str
    ports: Mapping[str, int]
    labels: tuple[tuple[str, str], ...]
    weight: int


@dataclass(slots=True)
class ParsedServiceEntry:
    meta: Meta
    reader: Reader
    hosts: list[str]
    ports: list[ServicePort]
    resolution: str
    endpoints: list[WorkloadEntry]
    subject_alt_names: tuple[str, ...] = ()  # checked on TLS to its endpoints (istio_tls)


def read_service_entry(r: Reader, meta: Meta, spec: object) -> ParsedServiceEntry | None:
    s = r.mapping(
        spec,
        "spec",
        (
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "exportTo",
            "subjectAltNames",
            "workloadSelector",
        ),
    )
    if s is None:
        return None
    if s.get("workloadSelector") is not None and s.get("endpoints") is not None:
        r.error("spec", "only one of WorkloadSelector or Endpoints is allowed in Service Entry")
    hosts: list[str] = []
    for path, raw_host in r.string_list(s, "hosts", "spec", required=True):
        host = raw_host.lower()  # DNS names compare case-insensitively; Istio's own are lowered
        if host == "*":
            r.error(path, "invalid host *")
            continue
        problem = wildcard_domain_problem(host)
        if problem is not None:
            r.error(path, problem)
            continue
        hosts.append(host)
    r.string_list(s, "addresses", "spec")
    r.enum(s, "location", "spec", ("MESH_EXTERNAL", "MESH_INTERNAL"))
    ports: list[ServicePort] = []
    for path, raw in r.items(s, "ports", "spec", required=True):
        pm = r.mapping(raw, path, ("number", "protocol", "name", "targetPort"))
        if pm is None:
            continue
        number = r.port(pm, "number", path, required=True)
        name = r.string(pm, "name", path, required=True)
        protocol = (r.string(pm, "protocol", path) or "").upper()
        target = r.port(pm, "targetPort", path)
        if number is None or name is None:
            continue
        if any(p.name == name for p in ports):
            r.error(join_path(path, "name"), f"service entry port name {name!r} already defined")
        if any(p.number == number for p in ports):
            r.error(join_path(path, "number"), f"service entry port {number} already defined")
        ports.append(ServicePort(number, name, protocol, target))
    resolution = r.enum(s, "resolution", "spec", _RESOLUTIONS) or "NONE"
    if resolution == "NONE" and s.get("endpoints"):
        r.error("spec.endpoints", "no endpoints should be provided for resolution type none")
    listed = s.get("endpoints")
    if resolution == "DNS_ROUND_ROBIN" and isinstance(listed, list) and len(listed) > 1:
        r.error(
            "spec.endpoints", f"there must only be 0 or 1 endpoint for resolution mode {resolution}"
        )
    endpoints: list[WorkloadEntry] = []
    port_names = {p.name for p in ports}
    sockets: list[str] = []
    for path, raw in r.items(s, "endpoints", "spec"):
        ep = _workload_entry(r, path, raw, resolution, port_names, sockets)
        if ep is not None:
            endpoints.append(ep)
    if resolution in ("DNS", "DNS_ROUND_ROBIN") and not s.get("endpoints"):
        for path, raw_host in r.string_list(s, "hosts", "spec"):
            host = raw_host.lower()
            if fqdn_problem(host) is not None and wildcard_domain_problem(host) is None:
                r.error(
                    path,
                    "hosts must be FQDN if no endpoints are provided for resolution mode "
                    f"{resolution}",
                )
    skip = _skip_reason(s, resolution, all_sockets=bool(sockets) and not endpoints)
    if skip is not None:
        # What Istio accepts loads: the rest of the set is served; a route to one of these
        # hosts finds no ServiceEntry and resolves the host name by DNS (proxy.istio_compile).
        r.warn(
            skip[0],
            f"{skip[1]}, which is {NOT_SUPPORTED}: ServiceEntry skipped (a route to "
            f"{', '.join(hosts) or 'its hosts'} resolves the host name by DNS)",
        )
        return None
    for path in sockets:
        r.warn(path, f"unix domain socket endpoints are {NOT_SUPPORTED}: endpoint skipped")
    if resolution == "STATIC" and not s.get("endpoints"):
        r.warn("spec.endpoints", "STATIC resolution without endpoints: the service has no backends")
    sans = tuple(name for _, name in r.string_list(s, "subjectAltNames", "spec"))
    return ParsedServiceEntry(meta, r, hosts, ports, resolution, endpoints, sans)


def _skip_reason(
    s: Mapping[str, object], resolution: str, *, all_sockets: bool
) -> tuple[str, str] | None:
    """(path, why) when sticky-proxy cannot act on this ServiceEntry at all, else None."""
    if resolution == "NONE":
        default = " (the default)" if s.get("resolution") is None else ""
        return "spec.resolution", f"resolution NONE{default} is original-destination passthrough"
    if resolution == "DNS_ROUND_ROBIN":
        return "spec.resolution", "resolution DNS_ROUND_ROBIN (one address at a time)"
    if s.get("workloadSelector") is not None:
        return "spec.workloadSelector", "it selects WorkloadEntries and pods by labels"
    if all_sockets:
        return "spec.endpoints", "its endpoints are all unix domain sockets"
    return None


def _workload_entry(
    r: Reader,
    path: str,
    raw: object,
    resolution: str,
    port_names: set[str],
    sockets: list[str],
) -> WorkloadEntry | None:
    m = r.mapping(
        raw, path, ("address", "ports", "labels", "weight", "network", "locality", "serviceAccount")
    )
    if m is None:
        if raw is None:
            r.error(path, "endpoint cannot be nil")
        return None
    address = r.string(m, "address", path, required=True)
    ports_raw = m.get("ports")
    ports: dict[str, int] = {}
    if ports_raw is not None:
        ppath = join_path(path, "ports")
        if not isinstance(ports_raw, dict):
            r.error(ppath, f"expected an object of port numbers, got {type_name(ports_raw)}")
        else:
            for name in ports_raw:
                number = r.port(ports_raw, name, ppath, required=True)
                if str(name) not in port_names:
                    hint = did_you_mean(str(name), port_names)
                    r.error(
                        join_path(ppath, str(name)),
                        f"endpoint port {number} is not defined by the service entry "
                        f"(port names: {', '.join(sorted(port_names)) or 'none'}){hint}",
                    )
                elif number is not None:
                    ports[str(name)] = number
    labels = r.string_map(m, "labels", path) or {}
    weight = r.integer(m, "weight", path, minimum=0, maximum=UINT32_MAX) or 0
    if address is None:
        return None
    if address.startswith("unix://") and resolution == "STATIC":
        # Istio's validateWorkloadEntry: a socket has no ports; the service has exactly one.
        if ports_raw is not None:
            r.error(join_path(path, "ports"), f"unix endpoint {address} must not include ports")
        if len(port_names) != 1:
            r.error(path, "exactly 1 service port required for unix endpoints")
        sockets.append(join_path(path, "address"))  # skipped with a warning by the caller
        return None
    if resolution == "STATIC" and not is_ip(address):
        r.error(
            join_path(path, "address"),
            f"endpoint address {address!r} is not a valid IP "
            "address (STATIC resolution; use DNS resolution for names)",
        )
        return None
    if resolution != "STATIC" and not is_ip(address) and fqdn_problem(address) is not None:
        r.error(
            join_path(path, "address"),
            f"endpoint address {address!r} is not a valid FQDN or an IP address",
        )
        return None
    # Envoy's load balancing weight must be >= 1; Istio turns 0 (unset) into 1.
    return WorkloadEntry(address, MappingProxyType(ports), labels_of(labels), weight or 1)
