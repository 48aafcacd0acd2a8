"""Quick mode: the Istio resources that ``run --upstream ... --cookie ... --ttl ...`` stands for.

Rather than a second configuration path, quick mode writes the four Istio objects a user would
have written (Gateway, VirtualService, DestinationRule, ServiceEntry) and compiles them with the
same loader, so quick mode and YAML mode cannot drift apart, and ``--print-config`` shows the
YAML to start from when the flags are no longer enough.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from proxy.config import Config, is_ip
from proxy.istio import load_text

SERVICE_HOST = "upstream.sticky-proxy.local"
SERVICE_PORT = 80


@dataclass(frozen=True, slots=True)
class QuickOptions:
    """What the quick-mode flags say."""

    upstreams: tuple[tuple[str, int], ...]
    port: int  # the Gateway port (the listen port)
    cookie: str | None = "ISTIOID"
    ttl: str | None = "60s"
    cookie_path: str | None = None
    header: str | None = None
    query: str | None = None
    source_ip: bool = False
    maglev: bool = False
    table_size: int | None = None
    ring_size: int | None = None


def parse_address(
    text: str, *, flag: str = "--upstream", allow_zero: bool = False
) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; raises ValueError naming the flag and the bad text."""
    host, sep, port = text.rpartition(":")
    low = 0 if allow_zero else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9001")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _consistent_hash(opts: QuickOptions) -> dict[str, object]:
    ch: dict[str, object]
    if opts.header:
        ch = {"httpHeaderName": opts.header}
    elif opts.query:
        ch = {"httpQueryParameterName": opts.query}
    elif opts.source_ip:
        ch = {"useSourceIp": True}
    else:
        cookie: dict[str, object] = {"name": opts.cookie or "ISTIOID"}
        if opts.ttl is not None:
            cookie["ttl"] = opts.ttl
        if opts.cookie_path:
            cookie["path"] = opts.cookie_path
        ch = {"httpCookie": cookie}
    if opts.maglev:
        ch["maglev"] = {"tableSize": opts.table_size or 65537}
    elif opts.ring_size:
        ch["ringHash"] = {"minimumRingSize": opts.ring_size}
    return ch


def quick_resources(opts: QuickOptions) -> list[dict[str, object]]:
    """The Istio objects equivalent to the quick-mode flags."""
    meta = {"name": "sticky-proxy", "namespace": "default"}
    static = all(is_ip(host) for host, _ in opts.upstreams)
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": meta,
            "spec": {
                "servers": [
                    {
                        "port": {"number": opts.port, "name": "http", "protocol": "HTTP"},
                        "hosts": ["*"],
                    }
                ]
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": meta,
            "spec": {
                "hosts": ["*"],
                "gateways": ["sticky-proxy"],
                "http": [
                    {
                        "route": [
                            {
                                "destination": {
                                    "host": SERVICE_HOST,
                                    "port": {"number": SERVICE_PORT},
                                }
                            }
                        ]
                    }
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": meta,
            "spec": {
                "host": SERVICE_HOST,
                "trafficPolicy": {"loadBalancer": {"consistentHash": _consistent_hash(opts)}},
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": meta,
            "spec": {
                "hosts": [SERVICE_HOST],
                "location": "MESH_INTERNAL",
                "ports": [{"number": SERVICE_PORT, "name": "http", "protocol": "HTTP"}],
                "resolution": "STATIC" if static else "DNS",
                "endpoints": [
                    {"address": host, "ports": {"http": port}} for host, port in opts.upstreams
                ],
            },
        },
    ]


def quick_yaml(opts: QuickOptions) -> str:
    return yaml.safe_dump_all(quick_resources(opts), sort_keys=False)


def quick_config(opts: QuickOptions) -> Config:
    """Compile the quick-mode resources (raises ConfigError like any YAML would)."""
    if not opts.upstreams:
        raise ValueError("quick mode needs at least one --upstream HOST:PORT")
    return load_text(quick_yaml(opts), "<quick mode flags>")
