"""Istio ``Gateway`` -> ``GatewaySpec``: the servers sticky-proxy listens for.

Theory
------
* **Gateways**: servers on one port merge into one listener; ``selector`` is accepted and
  ignored (sticky-proxy *is* the gateway it would select); HTTPS servers terminate TLS (their
  ``tls`` is ``proxy.istio_tls``'s); TLS/TCP servers are skipped with a warning;
  ``tls.httpsRedirect`` answers 301 to https.

A server's ``hosts`` entry is ``[namespace/]host``: no namespace means ``*``, ``.`` the
Gateway's own namespace.  HTTP2, GRPC and GRPC-WEB servers are served as HTTP/1.1 (with a
warning).  Port names must be unique within a Gateway, as Istio validates.  The listeners
themselves are built in ``proxy.istio_compile`` once every Gateway has been read.
"""

from __future__ import annotations

from proxy.config import GatewayServer, GatewaySpec, ServerHost, is_ip, labels_of
from proxy.istio_names import NOT_SUPPORTED, Meta, words
from proxy.istio_reader import (
    Reader,
    did_you_mean,
    is_dns1123_label,
    join_path,
    wildcard_domain_problem,
)
from proxy.istio_tls import SERVER_TLS_FIELDS, read_server_tls

_PROTOCOLS = words("HTTP HTTPS GRPC GRPC-WEB HTTP2 MONGO REDIS MYSQL TCP TLS UDP")
_HTTP_LIKE = ("HTTP2", "GRPC", "GRPC-WEB")


def read_gateway(r: Reader, meta: Meta, spec: object) -> GatewaySpec | None:
    s = r.mapping(spec, "spec", ("servers", "selector"))
    if s is None:
        return None
    if not is_dns1123_label(meta.name):
        r.error("metadata.name", f"invalid gateway name: {meta.name!r} (a DNS label: no dots)")
    selector = r.string_map(s, "selector", "spec") or {}
    servers: list[GatewayServer] = []
    port_names: dict[str, str] = {}
    for path, item in r.items(s, "servers", "spec", required=True):
        server = _server(r, path, item, meta.namespace)
        if server is None:
            continue
        if server.port_name in port_names:
            r.error(
                join_path(path, "port") + ".name",
                f"port names in servers must be unique: duplicate name {server.port_name} "
                f"(also {port_names[server.port_name]})",
            )
        port_names[server.port_name] = path
        servers.append(server)
    return GatewaySpec(meta.name, meta.namespace, tuple(servers), labels_of(selector), meta.where)


def _server(r: Reader, path: str, item: object, namespace: str) -> GatewayServer | None:
    m = r.mapping(
        item,
        path,
        ("port", "bind", "hosts", "tls", "name"),
        {"defaultEndpoint": "used by Sidecars only"},
    )
    if m is None:
        return None
    port = r.obj(
        m,
        "port",
        path,
        ("number", "protocol", "name"),
        {"targetPort": "has no impact on Gateways"},
        required=True,
    )
    ppath = join_path(path, "port")
    number = protocol = port_name = None
    if port is not None:
        number = r.port(port, "number", ppath, required=True)
        raw_protocol = r.string(port, "protocol", ppath, required=True)
        if raw_protocol is not None:
            protocol = raw_protocol.upper()
            if protocol not in _PROTOCOLS:
                r.error(
                    join_path(ppath, "protocol"),
                    f"invalid protocol {raw_protocol!r}{did_you_mean(raw_protocol, _PROTOCOLS)}"
                    f"; one of {', '.join(_PROTOCOLS)}",
                )
                protocol = None
        port_name = r.string(port, "name", ppath, required=True)
    hosts: list[ServerHost] = []
    for hpath, text in r.string_list(m, "hosts", path, required=True):
        parsed = _server_host(r, hpath, text, namespace)
        if parsed is not None:
            hosts.append(parsed)
    bind = r.string(m, "bind", path) or ""
    if bind.startswith("unix://"):
        r.error(join_path(path, "bind"), f"unix domain sockets are {NOT_SUPPORTED}")
    elif bind and not is_ip(bind):
        r.error(join_path(path, "bind"), f"{bind!r} is not a valid IP address")
    tls = r.obj(m, "tls", path, SERVER_TLS_FIELDS)
    https_redirect = bool(tls and r.boolean(tls, "httpsRedirect", join_path(path, "tls")))
    name = r.string(m, "name", path) or ""
    if number is None or protocol is None or port_name is None:
        return None
    served = True
    server_tls = None
    if protocol == "HTTPS" and tls is not None:
        server_tls = read_server_tls(r, tls, join_path(path, "tls"))
    if protocol in ("HTTPS", "TLS"):
        if tls is None:
            r.error(join_path(path, "tls"), "server must have TLS settings for HTTPS/TLS protocols")
        served = server_tls is not None
    elif tls is not None:
        if protocol == "HTTP" and set(tls) - {"httpsRedirect"}:
            r.error(
                join_path(path, "tls"),
                "server cannot have TLS settings for plain text HTTP ports (only httpsRedirect)",
            )
        elif protocol != "HTTP" and protocol not in _HTTP_LIKE:
            r.error(
                join_path(path, "tls"), "server cannot have TLS settings for non HTTPS/TLS ports"
            )
    if https_redirect and protocol != "HTTP":
        r.warn(
            join_path(path, "tls.httpsRedirect"),
            "tls.httpsRedirect should only be used with http servers",
        )
    if protocol in _HTTP_LIKE:
        r.warn(join_path(ppath, "protocol"), f"{protocol} is served as HTTP/1.1 by sticky-proxy")
    elif protocol not in ("HTTP", "HTTPS"):
        r.warn(
            ppath,
            f"protocol {protocol} is {NOT_SUPPORTED} (HTTP and HTTPS only); "
            f"server on port {number} skipped",
        )
        served = False
    return GatewayServer(
        number, port_name, protocol, tuple(hosts), bind, name, https_redirect, served, server_tls
    )


def _server_host(r: Reader, path: str, text: str, namespace: str) -> ServerHost | None:
    ns, slash, host = text.partition("/")
    if not slash:
        ns, host = "*", text
    if ns == ".":
        ns = namespace
    host = host.lower()  # Istio lowers server hosts into Envoy's domains (gateway.go)
    if ns != "*" and not is_dns1123_label(ns):
        r.error(path, f"namespace {ns!r} in {text!r} must be *, . or a namespace name")
        return None
    problem = None if host == "*" else wildcard_domain_problem(host)
    if problem is not None:
        r.error(path, problem)
        return None
    return ServerHost(ns, host)
