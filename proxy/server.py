"""Lifecycle: build the runtime from a Config, listen, decide each request, stop.

Theory of operation
-------------------
Two planes share one object graph and never lock:

* the **control plane** (this module's ``Proxy``, ``proxy.discovery``, later health and reload)
  turns a ``Config`` into a ``Runtime``: a router per listener, a ``Cluster`` per cluster with
  its compiled ``Affinity``, connection pools per endpoint. Endpoint changes rebuild a cluster's
  snapshot off the request path and swap one reference (``proxy.cluster``);
* the **request path** (``Dispatcher.dispatch``) reads ``proxy.runtime`` once, routes, hashes,
  picks and returns a ``Forward`` for ``proxy.http1`` to carry out. It allocates little: the
  header edits, status replies and Set-Cookie pieces are precomputed per route and per cluster.

Lifecycle follows uvicorn's ``serve -> startup -> main_loop -> shutdown``: startup resolves every
cluster once (so the first request finds endpoints), then opens the listeners; shutdown closes
the listeners, lets requests in flight finish within a grace period, then closes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.cluster import Balancer, Cluster, next_distinct
from proxy.config import ClusterSpec, Config, Endpoint
from proxy.discovery import DEFAULT_DNS_REFRESH, DiscoveryError, EndpointWatcher
from proxy.http1 import Connections, Exchange, Forward, LocalReply, ServerSettings, serve
from proxy.routing import Router
from proxy.upstream import UpstreamPool

log = logging.getLogger("proxy.server")

# Envoy's local replies (DESIGN §7); bodies are Envoy's text so Istio users recognise them.
NO_ROUTE = LocalReply(404)
NO_HEALTHY_UPSTREAM = LocalReply(503, b"no healthy upstream")
NO_CLUSTER = LocalReply(503, b"no healthy upstream")
# A connect failure sent nothing, so it may go on to the next endpoint (issue 5 refines this
# with the route's retry policy); Istio's default policy makes 2 retries.
CONNECT_RETRIES = 2
_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a Config: listen addresses and control-plane knobs (not part of the YAML)."""

    listen: tuple[tuple[str, int], ...] = ()  # overrides the Gateway ports when given
    dns_refresh: float = DEFAULT_DNS_REFRESH
    drain_time: float = 5.0
    settings: ServerSettings = field(default_factory=ServerSettings)
    reuse_port: bool = False


class ClusterRuntime:
    """One cluster as the request path sees it: its spec and the live snapshot holder."""

    __slots__ = ("cluster", "spec")

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        pool = spec.pool
        self.cluster: Cluster[UpstreamPool] = Cluster(
            spec.name,
            spec.lb,
            lambda ep: UpstreamPool(
                ep.address,
                ep.port,
                connect_timeout=pool.connect_timeout,
                max_requests_per_connection=pool.max_requests_per_connection,
            ),
            panic_threshold=spec.panic_threshold,
        )


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything the request path reads, built from one Config and swapped as one reference."""

    config: Config
    routers: Mapping[int, Router]
    clusters: Mapping[str, ClusterRuntime]


def build_runtime(config: Config) -> Runtime:
    routers = {listener.port: Router(config, listener.port) for listener in config.listeners}
    clusters = {name: ClusterRuntime(spec) for name, spec in config.clusters.items()}
    return Runtime(config, MappingProxyType(routers), MappingProxyType(clusters))


def _query_params(target: str) -> dict[str, str]:
    """First occurrence of each query parameter, raw (Istio's queryParams match)."""
    found: dict[str, str] = {}
    start = target.find("?")
    if start >= 0:
        for pair in target[start + 1 :].split("&"):
            name, _, value = pair.partition("=")
            found.setdefault(name, value)
    return found


def _headers_map(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        result[key] = f"{result[key]},{text}" if key in result else text
    return result


class _NextPool:
    """After a connect failure (nothing was sent): the next distinct endpoint on the ring."""

    __slots__ = ("balancer", "first", "hash", "pools")

    def __init__(
        self, pools: Mapping[str, UpstreamPool], balancer: Balancer, hash_: int, first: str
    ) -> None:
        self.pools = pools
        self.balancer = balancer
        self.hash = hash_
        self.first = first

    def __call__(self, attempt: int) -> UpstreamPool | None:
        return self.pools.get(next_distinct(self.balancer, self.hash, self.first, attempt))


class Dispatcher:
    """``proxy.http1.Dispatcher`` for one listener port: route, hash, pick."""

    __slots__ = ("port", "proxy")

    def __init__(self, proxy: Proxy, port: int) -> None:
        self.proxy = proxy
        self.port = port

    def dispatch(self, ex: Exchange) -> Forward | LocalReply:
        runtime = self.proxy.runtime
        router = runtime.routers.get(self.port)
        if router is None:
            ex.flags = "NR"
            return NO_ROUTE
        target = ex.target.decode("latin-1")
        headers = _headers_map(ex.headers) if router.needs_headers else _EMPTY
        params = _query_params(target) if router.needs_query else _EMPTY
        authority = ex.authority.decode("latin-1") if ex.authority else ""
        decision = router.match(authority, target, ex.method.decode("latin-1"), headers, params)
        if decision is None:
            ex.flags = "NR"
            return NO_ROUTE
        reply = decision.local_reply
        if reply is not None:
            return reply
        crt = runtime.clusters.get(decision.cluster or "")
        if crt is None:
            ex.flags = "NC"
            return NO_CLUSTER
        snap = crt.cluster.snapshot
        balancer = snap.balancer
        if balancer is None:
            ex.flags = "UH"
            return NO_HEALTHY_UPSTREAM
        set_cookie = None
        hash_: int | None = None
        # Istio puts the hash policy on the route (a weighted split folds every destination's
        # policy into one key), so the route's affinity decides, not the cluster's.
        affinity = decision.action.affinity
        if affinity is not None:
            hash_, generated = affinity.compute(ex.headers, ex.target, ex.peer, ex.sock)
            if generated is not None:
                set_cookie = affinity.set_cookie_header(generated)
        if hash_ is None:
            hash_ = random.getrandbits(64)
        key = balancer.pick(hash_)
        return Forward(
            snap.pools[key],
            target=decision.path.encode("latin-1") if decision.rewrites_path else None,
            authority=decision.authority,
            request_headers=decision.request_headers,
            response_headers=decision.response_headers,
            set_cookie=set_cookie,
            timeout=decision.timeout,
            next_pool=_NextPool(snap.pools, balancer, hash_, key),
            connect_retries=min(CONNECT_RETRIES, len(balancer.hosts) - 1),
        )

    def finished(self, ex: Exchange) -> None:
        self.proxy.finished(ex)


class Proxy:
    """The running proxy: runtime, discovery tasks, listeners."""

    def __init__(self, config: Config, options: RunOptions = RunOptions()) -> None:
        self.options = options
        self.runtime = build_runtime(config)
        self.connections = Connections()
        self.servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the listeners actually listen (port 0 resolved)."""
        found: list[tuple[str, int]] = []
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                found.append((host, port))
        return found

    async def start(self) -> None:
        await self._start_discovery(self.runtime)
        await self._start_listeners()

    async def _start_discovery(self, runtime: Runtime) -> None:
        first: list[asyncio.Task[bool]] = []
        for crt in runtime.clusters.values():
            watcher = EndpointWatcher(
                crt.spec.name,
                crt.spec.endpoints,
                functools.partial(self._endpoints_changed, crt),
                refresh=self.options.dns_refresh,
            )
            first.append(asyncio.create_task(watcher.refresh_once()))
            if watcher.is_dynamic:
                self._tasks.append(asyncio.create_task(self._refresh_later(watcher)))
        for task in first:
            try:
                await task
            except DiscoveryError as exc:
                log.warning("%s (will retry)", exc)

    async def _refresh_later(self, watcher: EndpointWatcher) -> None:
        await asyncio.sleep(self.options.dns_refresh)
        await watcher.run()

    def _endpoints_changed(self, crt: ClusterRuntime, endpoints: tuple[Endpoint, ...]) -> None:
        removed = crt.cluster.set_endpoints(endpoints)
        log.info(
            "cluster %s: %d endpoints: %s",
            crt.spec.name,
            len(endpoints),
            " ".join(ep.key for ep in endpoints) or "-",
        )
        for pool in removed:
            self._tasks.append(asyncio.create_task(pool.close()))

    def _listen_addresses(self) -> list[tuple[str, int, int]]:
        """(bind host, port, gateway port) for each listener."""
        listeners = self.runtime.config.listeners
        if not self.options.listen:
            return [(ls.bind, ls.port, ls.port) for ls in listeners]
        if len(listeners) > 1 and len(self.options.listen) != len(listeners):
            raise ValueError(
                f"{len(self.options.listen)} --listen addresses for {len(listeners)} gateway "
                "ports: give one per port, in the order of the ports "
                + ", ".join(str(ls.port) for ls in listeners)
            )
        if len(listeners) == 1:
            return [(h, p, listeners[0].port) for h, p in self.options.listen]
        return [(h, p, ls.port) for (h, p), ls in zip(self.options.listen, listeners, strict=True)]

    async def _start_listeners(self) -> None:
        for host, port, gateway_port in self._listen_addresses():
            server = await serve(
                Dispatcher(self, gateway_port),
                host,
                port,
                self.options.settings,
                reuse_port=self.options.reuse_port,
                connections=self.connections,
            )
            self.servers.append(server)
        for host, port in self.addresses:
            log.info("listening on %s:%d", host, port)

    def finished(self, ex: Exchange) -> None:
        """Per-request hook (metrics and access log attach here)."""

    async def stop(self, grace: float = 10.0) -> None:
        for server in self.servers:
            server.close()
        self.connections.shutdown()
        try:
            async with asyncio.timeout(grace):
                await self.connections.wait_closed()
        except TimeoutError:
            log.warning(
                "%d connections still busy after %.1fs: closing them", len(self.connections), grace
            )
            self.connections.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for crt in self.runtime.clusters.values():
            for pool in crt.cluster.pools():
                await pool.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def handle_signals(self) -> None:
        """SIGINT/SIGTERM set ``stopping`` (call right after ``start``)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)

    async def run_until_signalled(self) -> None:
        """Serve until SIGINT/SIGTERM, then stop."""
        self.handle_signals()
        await self.stopping.wait()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("stopping")
        await self.stop()


async def run_proxy(config: Config, options: RunOptions) -> int:
    """``sticky-proxy run``: serve until SIGINT/SIGTERM; 1 when a listener cannot bind."""
    proxy = Proxy(config, options)
    try:
        await proxy.start()
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        await proxy.stop(grace=0)
        return 1
    await proxy.run_until_signalled()
    return 0
