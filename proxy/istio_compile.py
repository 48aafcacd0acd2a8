"""The cross-resource pass: parsed resources -> listeners, virtual services and clusters.

Theory
------
It runs once every document has been parsed, so a reference may name a resource read later: it
checks the Gateways named by VirtualServices and their matches and the subsets named by
destinations (a subset no DestinationRule defines is a warning: Istio accepts it and answers 503;
a mesh-only VirtualService, not used here, is not checked), and reports a host claimed by two
ServiceEntries (the first keeps it).  Listeners: one
per port, the servers of every Gateway on that port together (they must agree on the bind address).
Clusters: one per destination reachable through a listener, and per port (and subset) of every
ServiceEntry host.

* **Destination port** when omitted: the ServiceEntry's (or Kubernetes Service's) only port,
  else the listener port (``GetDestinationCluster``) - so one route can target different
  clusters per Gateway port.  A host defined by both keeps the ServiceEntry (with a warning).
* **TLS** (``proxy.istio_tls``): certificates named by Gateway servers and DestinationRules are
  read first (Secrets of the YAML, then the ``--credentials`` folder); a port whose servers
  terminate TLS is an HTTPS listener, and may not also have plain HTTP servers.
* **Sessions that survive change** (``proxy.istio_session``): a ServiceEntry's (or Service's)
  persistent-session labels give every cluster of its hosts a ``SessionSpec``; a DestinationRule's
  ``sticky-proxy/hash-balance-factor`` bounds the load of its consistent-hash clusters; a
  VirtualService's ``sticky-proxy/sticky-weights`` makes its weighted splits follow the hash.
* **Endpoints**: a ServiceEntry gives them (STATIC addresses, or DNS names; endpoint ``ports``
  map the service port by name, else ``targetPort``, else the port itself; weight 0 means 1);
  a host without a ServiceEntry is resolved through DNS at the destination port (a Kubernetes
  headless Service answers one address per pod, dialled at its ``targetPort``:
  ``proxy.istio_service``).  Subsets select endpoints by labels; DNS answers carry none, so a
  label subset needs ServiceEntry endpoints with labels, and ``check`` shows that ServiceEntry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import yaml

from proxy.config import (
    DEFAULT_LB,
    DEFAULT_POOL,
    ClusterSpec,
    Destination,
    DnsEndpoints,
    Endpoint,
    GatewaySpec,
    HttpRoute,
    ListenerSpec,
    LoadBalancerSettings,
    RouteDestination,
    SessionSpec,
    StaticEndpoints,
    VirtualServiceSpec,
    cluster_name,
    destination_port,
    host_subset_of,
    labels_match,
)
from proxy.istio_dr import (
    ParsedDestinationRule,
    ParsedServiceEntry,
    ServicePort,
    effective_policy,
    hash_for_destination,
    merge_rules,
    resolve_rule_tls,
    rule_for,
)
from proxy.istio_names import MESH_GATEWAY
from proxy.istio_reader import Issues, Reader, did_you_mean, join_path
from proxy.istio_service import ParsedService
from proxy.istio_session import (
    BALANCE_ANNOTATION,
    read_balance_factor,
    read_session,
    read_sticky_weights,
)
from proxy.istio_tls import (
    Credentials,
    ParsedSecret,
    PortServers,
    check_port,
    resolve_client_tls,
    resolve_server_tls,
)
from proxy.istio_vs import ParsedVirtualService, RawDestination, RawRoute


@dataclass(slots=True)
class Parsed:
    gateways: list[tuple[GatewaySpec, Reader]] = field(default_factory=list)
    virtual_services: list[ParsedVirtualService] = field(default_factory=list)
    destination_rules: list[ParsedDestinationRule] = field(default_factory=list)
    service_entries: list[ParsedServiceEntry] = field(default_factory=list)
    secrets: list[ParsedSecret] = field(default_factory=list)
    services: list[ParsedService] = field(default_factory=list)  # Kubernetes Services
    skipped: list[tuple[str, bool]] = field(default_factory=list)  # (kind, is an Istio kind)
    seen: dict[tuple[str, str], str] = field(default_factory=dict)
    # (kind, namespace/name) -> spec.exportTo ("." resolved; empty: everywhere), for
    # proxy.istio_visibility and proxy.istio_delegate
    exports: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    def forget(self, kind: str, key: str) -> None:
        """Drop the resource ``kind`` ``namespace/name`` read so far: a later document of the
        same name replaces it, as a later ``kubectl apply`` of the same object does."""
        if kind == "Gateway":
            self.gateways = [(gw, r) for gw, r in self.gateways if gw.key != key]
        elif kind == "VirtualService":
            self.virtual_services = [x for x in self.virtual_services if x.meta.key != key]
        elif kind == "DestinationRule":
            self.destination_rules = [x for x in self.destination_rules if x.meta.key != key]
        elif kind == "ServiceEntry":
            self.service_entries = [x for x in self.service_entries if x.meta.key != key]
        elif kind == "Secret":
            self.secrets = [x for x in self.secrets if x.meta.key != key]
        elif kind == "Service":
            self.services = [x for x in self.services if x.meta.key != key]


class Compiler:
    """Cross-resource work: references, DestinationRule merging, clusters, listeners."""

    def __init__(self, parsed: Parsed, issues: Issues, credentials: str | None = None) -> None:
        self.parsed = parsed
        self.issues = issues
        self.credentials = Credentials(parsed.secrets, credentials)
        self._read_certificates()
        self.gateways = {gw.key: gw for gw, _ in parsed.gateways}
        self.rules = merge_rules(parsed.destination_rules)
        self.entries: dict[str, ParsedServiceEntry] = {}
        for se in parsed.service_entries:
            for host in se.hosts:
                other = self.entries.get(host)
                if other is not None:
                    se.reader.error(
                        "spec.hosts",
                        f"host {host} is already defined by "
                        f"ServiceEntry {other.meta.key} ({other.meta.where})",
                    )
                else:
                    self.entries[host] = se
        self.services = self._services(parsed.services)
        self.service_ports = {
            host: tuple(p.number for p in se.ports) for host, se in self.entries.items()
        } | {host: tuple(p.number for p in svc.ports) for host, svc in self.services.items()}
        # Persistent sessions by service host, from the labels of the object that defines the
        # service (a ServiceEntry or a Kubernetes Service).
        self.sessions: dict[str, SessionSpec] = {}
        for se in parsed.service_entries:
            session = read_session(se.reader, se.meta)
            for host in se.hosts:
                if session is not None and self.entries.get(host) is se:
                    self.sessions[host] = session
        for host, svc in self.services.items():
            session = read_session(svc.reader, svc.meta)
            if session is not None:
                self.sessions[host] = session
        # Bounded load by DestinationRule host (the first rule of a host that sets it).
        self.balance: dict[str, tuple[int, Reader]] = {}
        for dr in parsed.destination_rules:
            factor = read_balance_factor(dr.reader, dr.meta)
            if factor:
                self.balance.setdefault(dr.host, (factor, dr.reader))
        self.clusters: dict[str, ClusterSpec] = {}
        self._warned_subsets: set[tuple[str, str | None]] = set()

    def _services(self, services: Sequence[ParsedService]) -> dict[str, ParsedService]:
        """Kubernetes Services by host; a host a ServiceEntry defines keeps the ServiceEntry."""
        out: dict[str, ParsedService] = {}
        for svc in services:
            se = self.entries.get(svc.host)
            if se is None:
                out[svc.host] = svc
                continue
            # Istio prefers the Kubernetes Service (push_context.go, initServiceRegistry), whose
            # pods it sees; sticky-proxy does not, and the ServiceEntry lists the endpoints.
            svc.reader.warn(
                "metadata.name",
                f"host {svc.host} is also defined by ServiceEntry {se.meta.key} "
                f"({se.meta.where}): the ServiceEntry's ports and endpoints are used "
                "(Istio, which sees the pods, would use this Service's)",
            )
        return out

    def _read_certificates(self) -> None:
        """Every certificate the Gateways and DestinationRules name, read (errors recorded)."""
        creds = self.credentials
        gateways = []
        for gw, r in self.parsed.gateways:
            servers = tuple(resolve_server_tls(r, gw, server, creds) for server in gw.servers)
            gateways.append((replace(gw, servers=servers), r))
        self.parsed.gateways = gateways
        for dr in self.parsed.destination_rules:
            what = f"host {dr.host}"
            resolve_rule_tls(
                dr,
                lambda tls, dr=dr, what=what: resolve_client_tls(  # type: ignore[misc]
                    dr.reader, tls, creds, what, dr.meta.namespace
                ),
            )

    # ---- virtual services

    def virtual_services(self) -> list[VirtualServiceSpec]:
        out: list[VirtualServiceSpec] = []
        for vs in self.parsed.virtual_services:
            gateways = tuple(g for _, g in vs.gateways) or (MESH_GATEWAY,)
            # A VirtualService of the mesh only is not used here: its references are not
            # checked (Istio's validation checks none; a sidecar would resolve them).
            used = any(g != MESH_GATEWAY for g in gateways)
            for path, ref in vs.gateways:
                self._check_gateway_ref(vs.reader, path, ref)
            routes = []
            for raw in vs.routes:
                if used:
                    for path, ref in raw.match_gateway_paths:
                        self._check_gateway_ref(raw.reader or vs.reader, path, ref)
                routes.append(self._route(vs, raw, check=used))
            if not used:
                vs.reader.warn(
                    "spec.gateways",
                    "bound to the mesh only (no gateways): "
                    "sticky-proxy serves Gateway-bound routes, so this VirtualService "
                    "is not used",
                )
            out.append(
                VirtualServiceSpec(
                    vs.meta.name,
                    vs.meta.namespace,
                    tuple(vs.hosts),
                    gateways,
                    tuple(routes),
                    vs.meta.where,
                    read_sticky_weights(vs.reader, vs.meta),
                )
            )
        return out

    def _check_gateway_ref(self, r: Reader, path: str, ref: str) -> None:
        if ref == MESH_GATEWAY or ref in self.gateways:
            return
        # Istio accepts the reference (the Gateway may come later; istioctl analyze reports
        # IST0101): nothing is served through it, and the served/not-served summary says so.
        r.warn(
            path,
            f"Gateway {ref} not found{did_you_mean(ref, self.gateways)}: nothing is served "
            "through it",
        )

    def _route(self, vs: ParsedVirtualService, raw: RawRoute, *, check: bool) -> HttpRoute:
        destinations: list[RouteDestination] = []
        for d in raw.destinations:
            if check:
                self._check_subset(raw.reader or vs.reader, d)
            rule = rule_for(d.destination.host, self.rules)
            destinations.append(
                RouteDestination(
                    d.destination, d.weight, d.headers, hash_for_destination(d.destination, rule)
                )
            )
        retries = raw.route.retries
        if retries is not None:
            # Istio drops the previous-hosts predicate on hashing routes: a retry must stay on
            # the ring.  retryIgnorePreviousHosts, when given, decides instead.
            hashing = len(destinations) == 1 and bool(destinations[0].hash_policies)
            previous_hosts = (
                raw.ignore_previous_hosts if raw.ignore_previous_hosts is not None else not hashing
            )
            retries = replace(retries, retry_previous_hosts=previous_hosts)
        return replace(raw.route, route=tuple(destinations), retries=retries)

    def _check_subset(self, r: Reader, d: RawDestination) -> None:
        """A subset no DestinationRule defines: Istio accepts it and Envoy finds no cluster for
        it, answering 503; sticky-proxy builds no cluster either (``_cluster``) and warns."""
        subset = d.destination.subset
        if subset is None:
            return
        rule = rule_for(d.destination.host, self.rules)
        path = join_path(join_path(d.path, "destination"), "subset")
        outcome = "requests to this destination get 503 (no such cluster)"
        if rule is None:
            r.warn(
                path,
                f"subset {subset} not found: no DestinationRule for host "
                f"{d.destination.host}; {outcome}",
            )
        elif subset not in rule.subsets:
            known = ", ".join(rule.subsets) or "none"
            r.warn(
                path,
                f"subset {subset} not found in DestinationRule {rule.names[0]} "
                f"(subsets: {known}){did_you_mean(subset, rule.subsets)}; {outcome}",
            )

    # ---- listeners

    def listeners(self) -> list[ListenerSpec]:
        by_port: dict[int, tuple[str, list[str], str]] = {}
        kinds: dict[int, PortServers] = {}
        for gw, r in self.parsed.gateways:
            for i, server in enumerate(gw.servers):
                if not server.served:
                    continue
                on_port = kinds.setdefault(server.port, PortServers())
                entry = (gw.key, server, r, f"spec.servers[{i}]")
                (on_port.secure if server.tls is not None else on_port.plain).append(entry)
                bind = server.bind or "0.0.0.0"
                current = by_port.get(server.port)
                if current is None:
                    by_port[server.port] = (bind, [gw.key], gw.key)
                    continue
                if current[0] != bind:
                    r.error(
                        f"spec.servers[{i}].bind",
                        f"port {server.port} is already bound to "
                        f"{current[0]} by Gateway {current[2]}; sticky-proxy opens one "
                        "listener per port",
                    )
                if gw.key not in current[1]:
                    current[1].append(gw.key)
        for port, servers in kinds.items():
            check_port(port, servers)
        return [
            ListenerSpec(port, bind, "HTTPS" if kinds[port].secure else "HTTP", tuple(gws))
            for port, (bind, gws, _) in sorted(by_port.items())
        ]

    # ---- clusters

    def build_clusters(
        self, listeners: Sequence[ListenerSpec], virtual_services: Sequence[VirtualServiceSpec]
    ) -> None:
        raw_by_vs = {vs.meta.key: vs for vs in self.parsed.virtual_services}
        for listener in listeners:
            bound = set(listener.gateways)
            for vs in virtual_services:
                if not bound.intersection(vs.gateways):
                    continue
                raw = raw_by_vs[vs.key]
                if not self._serves_any_host(vs, listener):
                    continue
                for route, raw_route in zip(vs.http, raw.routes, strict=True):
                    for dest, raw_dest in zip(route.route, raw_route.destinations, strict=True):
                        self._destination_cluster(
                            raw_route.reader or raw.reader,
                            raw_dest.path,
                            dest.destination,
                            listener.port,
                        )
        for se in self.parsed.service_entries:
            for host in se.hosts:
                if self.entries.get(host) is not se:
                    continue
                rule = self.rules.get(host)
                for port in se.ports:
                    self._cluster(host, port.number, None)
                    for subset in rule.subsets if rule else ():
                        self._cluster(host, port.number, subset)
        for parsed_vs in self.parsed.virtual_services:
            refs = [g for _, g in parsed_vs.gateways if g in self.gateways]
            hosts = set(parsed_vs.hosts)
            if refs and not any(
                self._vs_matches_gateway(parsed_vs, hosts, self.gateways[g]) for g in refs
            ):
                parsed_vs.reader.warn(
                    "spec.hosts",
                    "no host matches a host of its Gateways' servers, "
                    "so no request reaches this VirtualService",
                )

    def _serves_any_host(self, vs: VirtualServiceSpec, listener: ListenerSpec) -> bool:
        for key in listener.gateways:
            gw = self.gateways.get(key)
            if gw is None or key not in vs.gateways:
                continue
            for server in gw.servers:
                if server.port == listener.port and server.served:
                    for sh in server.hosts:
                        if sh.namespace in ("*", vs.namespace) and any(
                            host_subset_of(sh.host, h) or host_subset_of(h, sh.host)
                            for h in vs.hosts
                        ):
                            return True
        return False

    @staticmethod
    def _vs_matches_gateway(vs: ParsedVirtualService, hosts: set[str], gw: GatewaySpec) -> bool:
        for server in gw.servers:
            for sh in server.hosts:
                if sh.namespace in ("*", vs.meta.namespace) and any(
                    host_subset_of(sh.host, h) or host_subset_of(h, sh.host) for h in hosts
                ):
                    return True
        return False

    def _destination_cluster(
        self, r: Reader, path: str, dest: Destination, listener_port: int
    ) -> None:
        port = destination_port(dest, listener_port, self.service_ports)
        se = self.entries.get(dest.host)
        dpath = join_path(path, "destination")
        if se is not None and port not in (p.number for p in se.ports):
            ports = ", ".join(str(p.number) for p in se.ports)
            if dest.port is not None:
                r.error(
                    join_path(dpath, "port") + ".number",
                    f"port {port} is not a port of ServiceEntry {se.meta.key} for host "
                    f"{dest.host} (ports: {ports})",
                )
            else:
                r.error(
                    join_path(dpath, "port"),
                    f"required: ServiceEntry {se.meta.key} has several ports ({ports}) and "
                    f"Istio's fallback, the listener port {listener_port}, is not one of them",
                )
            return
        svc = self.services.get(dest.host)
        if svc is not None and svc.ports and port not in (p.number for p in svc.ports):
            ports = ", ".join(str(p.number) for p in svc.ports)
            fallback = "" if dest.port else f" (Istio's fallback, the listener port {port})"
            r.error(
                join_path(dpath, "port"),
                f"port {port}{fallback} is not a port of Service {svc.meta.key} (ports: {ports})",
            )
            return
        if se is None and (svc is None or not svc.ports) and dest.port is None:
            # One text for every listener, so it is printed once (no port number in it).
            r.warn(
                join_path(dpath, "port"),
                f"not set and host {dest.host} has no ServiceEntry: Istio's fallback, the "
                "Gateway port the request came in on, is used",
            )
        self._cluster(dest.host, port, dest.subset)

    def _cluster(self, host: str, port: int, subset: str | None) -> None:
        name = cluster_name(host, port, subset)
        if name in self.clusters:
            return
        rule = rule_for(host, self.rules)
        if subset is not None and (rule is None or subset not in rule.subsets):
            return  # reported by _check_subset
        policy = effective_policy(rule, subset, port)
        se = self.entries.get(host)
        selector = rule.subsets[subset].labels if rule and subset else ()
        endpoints, source = self._endpoints(host, port, selector, subset)
        outlier = policy.outlier if policy else None
        defined = se or self.services.get(host)
        health = (rule.health_check if rule else None) or (
            defined.meta.health_check if defined else None
        )
        tls = policy.tls if policy else None
        if (
            tls is not None
            and se is not None
            and se.subject_alt_names
            and not tls.subject_alt_names
            and not tls.insecure_skip_verify
        ):
            # Istio's constructUpstreamTLS: the ServiceEntry's SANs stand in.
            tls = replace(tls, subject_alt_names=se.subject_alt_names)
        self.clusters[name] = ClusterSpec(
            name=name,
            host=host,
            port=port,
            subset=subset,
            lb=self._bounded(rule.host if rule else None, policy.lb if policy else None),
            endpoints=endpoints,
            outlier=outlier,
            pool=(policy.pool if policy and policy.pool else DEFAULT_POOL),
            health_check=health,
            panic_threshold=float(outlier.min_health_percent) if outlier else 50.0,
            source=source,
            tls=tls,
            session=self.sessions.get(host),
        )

    def _bounded(
        self, rule_host: str | None, lb: LoadBalancerSettings | None
    ) -> LoadBalancerSettings:
        """The cluster's load balancer, with its rule's hash-balance-factor when it hashes."""
        lb = lb or DEFAULT_LB
        found = self.balance.get(rule_host) if rule_host is not None else None
        if found is None:
            return lb
        factor, reader = found
        ch = lb.consistent_hash
        if ch is None:
            reader.warn(
                f"metadata.annotations.{BALANCE_ANNOTATION}",
                f"ignored for a {lb.describe} load balancer: bounded load applies to "
                "consistentHash (ring hash and Maglev)",
            )
            return lb
        return replace(lb, consistent_hash=replace(ch, hash_balance_factor=factor))

    def _endpoints(
        self, host: str, port: int, selector: tuple[tuple[str, str], ...], subset: str | None
    ) -> tuple[StaticEndpoints | DnsEndpoints, str]:
        se = self.entries.get(host)
        svc = self.services.get(host)
        if se is None or (selector and not se.endpoints and se.resolution == "DNS"):
            # DNS answers carry no labels (nor does the one endpoint Istio makes of a DNS
            # ServiceEntry's host: serviceentry/conversion.go), so a selector picks nothing.
            if selector:
                self._warn_unlabelled_subset(host, port, selector, subset)
                return DnsEndpoints(()), _source(se, svc, host)
            if svc is not None:
                return DnsEndpoints((svc.target(port),)), _source(se, svc, host)
            return DnsEndpoints((Endpoint(host, port),)), _source(se, svc, host)
        service_port = next(p for p in se.ports if p.number == port)
        chosen: list[Endpoint] = []
        for ep in se.endpoints:
            if selector and not labels_match(ep.labels, selector):
                continue
            target = ep.ports.get(service_port.name) or service_port.target or port
            chosen.append(Endpoint(ep.address, target, ep.weight, ep.labels))
        where = f"ServiceEntry {se.meta.key}"
        if selector and not chosen and (host, subset) not in self._warned_subsets:
            self._warned_subsets.add((host, subset))
            rule = rule_for(host, self.rules)
            if rule is not None:
                rule.reader.warn(
                    "spec.subsets",
                    f"subset {subset} selects {_labels_text(selector)} but no endpoint of "
                    f"{where} carries these labels: the subset has no endpoints (503)",
                )
        if se.resolution == "STATIC":
            return StaticEndpoints(tuple(chosen)), where
        if not se.endpoints:
            return DnsEndpoints((Endpoint(host, service_port.target or port),)), where
        return DnsEndpoints(tuple(chosen)), where

    def _warn_unlabelled_subset(
        self, host: str, port: int, selector: tuple[tuple[str, str], ...], subset: str | None
    ) -> None:
        """Why a label subset of a DNS-resolved host is empty, and the ServiceEntry that fixes
        it (Istio's answer too): endpoints named by DNS, each with the labels it stands for."""
        rule = rule_for(host, self.rules)
        if rule is None or (host, subset) in self._warned_subsets:
            return
        self._warned_subsets.add((host, subset))
        se = self.entries.get(host)
        svc = self.services.get(host)
        ports = se.ports if se else (svc.ports if svc and svc.ports else ())
        if not ports:
            ports = [ServicePort(port, "http", "HTTP", None)]
        what = (
            f"ServiceEntry {se.meta.key} of host {host} lists no endpoints"
            if se
            else f"host {host} has no ServiceEntry"
        )
        placeholder = f"{host.split('.', 1)[0]}-{subset}"
        rule.reader.warn(
            "spec.subsets",
            f"subset {subset} selects {_labels_text(selector)} but {what}: "
            "DNS answers carry no labels, so this subset has no endpoints (503). A "
            "ServiceEntry naming the pods, each with its labels, fixes it (one per host: "
            f"list every subset's endpoints in it; replace {placeholder} with the names "
            f"DNS resolves to this subset's pods):\n"
            + _service_entry_yaml(host, ports, selector, placeholder),
        )


def _source(se: ParsedServiceEntry | None, svc: ParsedService | None, host: str) -> str:
    if se is not None:
        return f"ServiceEntry {se.meta.key}"
    return f"Service {svc.meta.key}" if svc is not None else f"DNS {host}"


def _labels_text(selector: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in selector)


def _service_entry_yaml(
    host: str,
    ports: Sequence[ServicePort],
    selector: tuple[tuple[str, str], ...],
    address: str,
) -> str:
    """The ServiceEntry giving ``host`` one DNS endpoint with the subset's labels."""
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: ServiceEntry",
        "metadata:",
        f"  name: {host.split('.', 1)[0]}",
        "spec:",
        "  hosts:",
        f"  - {host}",
        "  location: MESH_INTERNAL",
        "  ports:",
    ]
    for p in ports:
        name = p.name or "http"
        lines += [f"  - number: {p.number}", f"    name: {name}", "    protocol: HTTP"]
    lines += ["  resolution: DNS", "  endpoints:", f"  - address: {address}"]
    targets = [(p.name or "http", p.target) for p in ports if p.target]
    if targets:
        lines.append("    ports:")
        lines += [f"      {name}: {target}" for name, target in targets]
    lines.append("    labels:")
    lines += [f"      {k}: {_yaml_scalar(v)}" for k, v in selector]
    return "\n".join(f"    {line}" for line in lines)


def _yaml_scalar(text: str) -> str:
    """``text`` as a YAML string (quoted when YAML would read it as something else)."""
    try:
        loaded = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        loaded = None
    plain = isinstance(loaded, str) and loaded == text and ":" not in text
    return text if plain else json.dumps(text)  # a JSON string is a YAML string
