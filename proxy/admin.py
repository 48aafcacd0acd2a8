"""The operating ports, as the Istio ingress gateway has them (served by aiohttp).

::

    :15021  GET /healthz/ready      200 while serving; 503 before start and from SIGTERM on
    :15090  GET /stats/prometheus   every metric (all workers added up with --workers N)
    :15000  (127.0.0.1 only unless told otherwise) Envoy-like admin:
            GET /ready              200 LIVE | 503 DRAINING / PRE_INITIALIZING (Envoy's words)
            GET /config_dump        the effective configuration as JSON (the compiled model)
            GET /clusters           each endpoint: health, weight, share of the ring/table;
                                    ?format=json for JSON
            GET /route?host=H&path=P[&method=M][&header=K:V][&cookie=N=V]
                       [&client_ip=IP][&client_port=N][&local=IP:PORT][&port=GATEWAY_PORT]
                                    the CLI's ``route``, answered with the live endpoints
            GET /stats/prometheus   as on :15090

The data plane never runs here: these apps read the proxy's current ``Runtime`` (one reference)
and its snapshots, exactly what the request path reads. They see the proxy through
``AdminView`` (what they read, nothing more), so this module does not import ``proxy.server``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from multidict import MultiMapping

from proxy.explain import ClusterView, Probe, address_of, explain, split_pair
from proxy.metrics import CONTENT_TYPE
from proxy.steering import in_flight

if TYPE_CHECKING:
    from proxy.runtime import Runtime, RuntimeRef

log = logging.getLogger("proxy.admin")


class AdminView(Protocol):
    """What the admin endpoints read from the running proxy (``proxy.server.Proxy`` is one)."""

    @property
    def ref(self) -> RuntimeRef:
        """The runtime requests read now: ``ref.current``."""
        ...

    @property
    def options(self) -> object:
        """The run options, a dataclass (shown by ``/config_dump``)."""
        ...

    @property
    def started(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    def exposition(self) -> bytes:
        """The Prometheus text of this process."""
        ...


# --------------------------------------------------------------------------- apps
def readiness_app(is_ready: Callable[[], bool]) -> web.Application:
    """Istio's ``/healthz/ready`` on the readiness port."""

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if is_ready() else 503)

    app = web.Application()
    app.router.add_get("/healthz/ready", ready)
    return app


def metrics_app(exposition: Callable[[], bytes]) -> web.Application:
    """Prometheus' scrape endpoint ``/stats/prometheus``."""

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"content-type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/stats/prometheus", scrape)
    return app


def admin_app(proxy: AdminView) -> web.Application:
    """The admin endpoints (bind them to loopback: they show the whole configuration)."""

    async def ready(request: web.Request) -> web.Response:
        if proxy.draining:
            return web.Response(status=503, text="DRAINING\n")
        if not proxy.started:
            return web.Response(status=503, text="PRE_INITIALIZING\n")
        return web.Response(text="LIVE\n")

    async def config_dump(request: web.Request) -> web.Response:
        return web.json_response(
            {"config": plain(proxy.ref.current.config), "options": plain(proxy.options)},
            dumps=_dumps,
        )

    async def clusters(request: web.Request) -> web.Response:
        table = clusters_table(proxy.ref.current)
        if request.query.get("format") == "json":
            return web.json_response(table, dumps=_dumps)
        return web.Response(text=clusters_text(table))

    async def route(request: web.Request) -> web.Response:
        status, answer = route_request(proxy.ref.current, request.query)
        return web.json_response(answer, status=status, dumps=_dumps)

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=proxy.exposition(), headers={"content-type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/config_dump", config_dump)
    app.router.add_get("/clusters", clusters)
    app.router.add_get("/route", route)
    app.router.add_get("/stats/prometheus", scrape)
    return app


async def start_app(
    app: web.Application, host: str, port: int, *, reuse_port: bool = False
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve ``app`` on host:port (0 picks one); returns the runner and the bound address."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return runner, (bound[0], bound[1])


# --------------------------------------------------------------------------- config_dump
def plain(value: object) -> Any:
    """A JSON-able rendering of the frozen config model (dataclasses, mappings, tuples)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.repr and hasattr(value, f.name)
        }
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted((plain(v) for v in value), key=str)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, re.Pattern):
        return value.pattern
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)


# --------------------------------------------------------------------------- clusters
def clusters_table(runtime: Runtime) -> list[dict[str, Any]]:
    """Each cluster of ``runtime`` with its endpoints' health, weight and balancer share."""
    out: list[dict[str, Any]] = []
    for name, crt in sorted(runtime.clusters.items()):
        snap = crt.cluster.snapshot
        healthy = {ep.key for ep in snap.healthy}
        balancer = snap.balancer
        in_balancer = set(balancer.hosts) if balancer is not None else set()
        endpoints = [
            {
                "address": ep.key,
                "health": "healthy" if ep.key in healthy else "unhealthy",
                "weight": ep.weight,
                "share": round(balancer.share(ep.key), 6)
                if balancer is not None and ep.key in in_balancer
                else 0.0,
            }
            for ep in snap.endpoints
        ]
        out.append(
            {
                "name": name,
                "load_balancer": crt.spec.lb.describe,
                "panic": snap.panic,
                "healthy": len(snap.healthy),
                "total": len(snap.endpoints),
                "endpoints": endpoints,
            }
        )
    return out


def clusters_text(table: list[dict[str, Any]]) -> str:
    """Envoy's ``/clusters`` text shape: ``cluster::host::field::value``."""
    lines: list[str] = []
    for cluster in table:
        name = cluster["name"]
        lines.append(f"{name}::load_balancer::{cluster['load_balancer']}")
        lines.append(f"{name}::panic::{str(cluster['panic']).lower()}")
        for ep in cluster["endpoints"]:
            prefix = f"{name}::{ep['address']}"
            lines.append(f"{prefix}::health_flags::{ep['health']}")
            lines.append(f"{prefix}::weight::{ep['weight']}")
            lines.append(f"{prefix}::share::{ep['share']:.6f}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- route
def route_request(runtime: Runtime, query: MultiMapping[str]) -> tuple[int, dict[str, Any]]:
    """Where would this request go, now? (status, answer); 404 when no route matches."""
    host = query.get("host")
    if not host:
        return 400, {"error": "host is required: /route?host=example.com&path=/"}
    ports = sorted(runtime.routers)
    try:
        port = int(query["port"]) if "port" in query else (ports[0] if len(ports) == 1 else -1)
        client = (query.get("client_ip", "127.0.0.1"), int(query.get("client_port", "54321")))
    except ValueError as exc:
        return 400, {"error": str(exc)}
    router = runtime.routers.get(port)
    if router is None:
        return 400, {"error": f"choose a Gateway port with port= (ports: {ports})"}
    local_text = query.get("local", f"127.0.0.1:{port}")
    local = address_of(local_text)
    if local is None:
        return 400, {"error": f"local={local_text!r} must look like IP:PORT"}
    pairs: dict[str, list[tuple[str, str]]] = {"header": [], "cookie": []}
    for kind, sep in (("header", ":"), ("cookie", "=")):
        for value in query.getall(kind, []):
            pair = split_pair(value, sep)
            if pair is None:
                return 400, {"error": f"{kind}={value!r} must look like NAME{sep}VALUE"}
            pairs[kind].append(pair)
    probe = Probe(
        host,
        query.get("path", "/"),
        query.get("method", "GET"),
        headers=tuple(pairs["header"]),
        cookies=tuple(pairs["cookie"]),
        client=client,
        local=local,
    )
    return explain(runtime.config, router, probe, functools.partial(_live, runtime)).as_json()


def _live(runtime: Runtime, name: str) -> ClusterView | None:
    """A cluster as requests see it now: the healthy endpoints and the current balancer, the
    persistent sessions' targets (draining ones with the seconds they have left) and the
    requests in flight per endpoint (bounded load reads them)."""
    crt = runtime.clusters.get(name)
    if crt is None:
        return None
    snap = crt.cluster.snapshot
    now = time.monotonic()
    return ClusterView(
        crt.spec,
        snap.healthy,
        snap.balancer,
        targets=frozenset(snap.targets),
        draining={key: max(0.0, deadline - now) for key, deadline in snap.draining.items()},
        load={key: in_flight(pool) for key, pool in {**snap.pools, **snap.targets}.items()},
        bounded=snap.bounded,
        known=frozenset(snap.pools),
    )
