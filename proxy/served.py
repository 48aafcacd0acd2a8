"""What a loaded ``Config`` serves, in words: ``check`` and ``run`` print it.

A real Istio folder may hold much that sticky-proxy skips (TCP/TLS servers, mesh-only
VirtualServices; each warned once when loading).  This summary says what is left: per
listener port, each virtual host and the VirtualServices behind it, the way
``proxy.routing.Router`` builds them (a server's hosts visible to the VirtualService's namespace
intersected with its hosts, the more specific name kept; an ``httpsRedirect`` server's hosts
answer 301); then what is not served.  When nothing at all is served, ``nothing_served`` says
why, and the commands refuse the config.
"""

from __future__ import annotations

from proxy.config import Config, GatewayServer, VirtualServiceSpec, host_subset_of
from proxy.istio_names import MESH_GATEWAY


def _hosts(server: GatewayServer, vs: VirtualServiceSpec) -> list[str]:
    """Istio's ``Names.Intersection`` of the server's visible hosts with the VirtualService's."""
    out: list[str] = []
    for sh in server.hosts:
        if sh.namespace not in ("*", vs.namespace):
            continue
        for h in vs.hosts:
            pick = (
                sh.host if host_subset_of(sh.host, h) else h if host_subset_of(h, sh.host) else None
            )
            if pick is not None and pick not in out:
                out.append(pick)
    return out


def virtual_hosts(config: Config, port: int) -> dict[str, list[str]]:
    """Virtual host -> the VirtualServices (``ns/name``) behind it on ``port``, in order."""
    out: dict[str, list[str]] = {}
    for gw in config.gateways:
        for server in gw.servers:
            if server.port != port or not server.served:
                continue
            for vs in config.virtual_services:
                if gw.key not in vs.gateways:
                    continue
                for host in _hosts(server, vs):
                    keys = out.setdefault(host, [])
                    if vs.key not in keys:
                        keys.append(vs.key)
            if server.https_redirect:
                for sh in server.hosts:
                    out.setdefault(sh.host, [])
    return out


def served_lines(config: Config) -> list[str]:
    """``port 80 (HTTP) host a.test -> default/a`` for every virtual host of every listener."""
    lines: list[str] = []
    for listener in config.listeners:
        where = f"port {listener.port} ({listener.protocol})"
        vhosts = virtual_hosts(config, listener.port)
        for host, keys in vhosts.items():
            lines.append(f"{where} host {host} -> {', '.join(keys) or 'https redirect'}")
    return lines


def unserved_lines(config: Config) -> list[str]:
    """Gateway servers, listeners and VirtualServices that serve no request, and why."""
    lines: list[str] = []
    for gw in config.gateways:
        for server in gw.servers:
            if not server.served:
                lines.append(
                    f"Gateway {gw.key} server on port {server.port} ({server.protocol}): "
                    "HTTP and HTTPS servers only"
                )
    used: set[str] = set()
    for listener in config.listeners:
        vhosts = virtual_hosts(config, listener.port)
        if not vhosts:
            lines.append(
                f"port {listener.port} ({listener.protocol}): no VirtualService has a host of "
                "its servers, every request gets 404"
            )
        used.update(key for keys in vhosts.values() for key in keys)
    for vs in config.virtual_services:
        if vs.key in used:
            continue
        if all(g == MESH_GATEWAY for g in vs.gateways):
            why = "bound to the mesh only"
        else:
            why = "no host in common with an HTTP or HTTPS server of its Gateways"
        lines.append(f"VirtualService {vs.key}: {why}")
    return lines


def nothing_served(config: Config) -> str | None:
    """Why no request at all can be served, or None when some can."""
    if not config.listeners:
        return "no Gateway has an HTTP or HTTPS server sticky-proxy can serve"
    if not any(virtual_hosts(config, listener.port) for listener in config.listeners):
        return "no VirtualService bound to a Gateway has a host of its HTTP or HTTPS servers"
    return None
