"""Lifecycle: build the runtime from a Config, listen, decide each request, reload, drain, stop.

Theory of operation
-------------------
Two planes share one object graph and never lock:

* the **control plane** (this module's ``Proxy``, ``proxy.discovery``, health, reload)
  turns a ``Config`` into a ``Runtime`` (``proxy.runtime``): a router per listener, a
  ``ClusterRuntime`` per cluster with its compiled ``Affinity``, connection pools per endpoint
  and its metric children. Endpoint changes rebuild a cluster's snapshot off the request path
  and swap one reference (``proxy.cluster``);
* the **request path** (``proxy.dispatch.Dispatcher``) reads ``proxy.ref.current`` once per
  request, routes, hashes, picks and returns a ``Forward`` for ``proxy.http1`` to carry out,
  then counts the finished exchange and logs it. Both allocate little: header edits, status
  replies, Set-Cookie pieces and metric children are precomputed per route and per cluster.

HTTPS listeners (``proxy.tls``) are created once with a context that wraps each new connection
with the current runtime's certificates, so a reload that reads rotated certificate files or
Secrets serves them on the next handshake while open connections keep theirs; ``--watch``
follows the certificate files (and the ``--credentials`` folder) like the YAML files.

Reload (SIGHUP, ``--watch``) loads and validates the files in a thread, builds a new ``Runtime``
keeping the ``ClusterRuntime`` (pools, discovery, stats) of every cluster whose spec did not
change, resolves the new clusters once, then swaps ``proxy.ref.current`` in one assignment. A
request in flight keeps the objects it already read; a cluster that went away closes its idle
connections (busy ones close when their exchange releases them). An invalid configuration
changes nothing: every error is logged and ``sticky_config_reloads_total{result="failure"}``
counts it.

Lifecycle follows uvicorn's ``serve -> startup -> main_loop -> shutdown``; the drain is Istio's:

    SIGTERM -> readiness 503 at once -> keep serving for drain_time (load balancers notice)
            -> stop accepting, idle keep-alive connections close, busy ones after their response
            -> wait up to drain_deadline for requests in flight, abort the rest -> exit 0

SIGINT (Ctrl-C) skips the drain_time; a second SIGTERM/SIGINT cuts the drain_time short.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TextIO

from proxy.admin import admin_app, metrics_app, readiness_app, start_app
from proxy.config import Config, ConfigError, DnsEndpoints, Endpoint
from proxy.discovery import DEFAULT_DNS_REFRESH, DiscoveryError, EndpointWatcher
from proxy.dispatch import Dispatcher
from proxy.exchange import ServerSettings
from proxy.http1 import serve
from proxy.istio import load_config
from proxy.istio_visibility import DEFAULT_GATEWAY_NAMESPACE
from proxy.listener import Connections
from proxy.runtime import ClusterRuntime, Runtime, RuntimeRef, build_runtime
from proxy.served import nothing_served
from proxy.tls import DownstreamHandshake, TlsListener, listener_context

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.accesslog import AccessLog
    from proxy.metrics import Metrics

log = logging.getLogger("proxy.server")

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a Config: listen addresses and control-plane knobs (not part of the YAML).

    ``admin``/``readiness``/``metrics`` are (host, port) to serve on, None for off; port 0 picks
    a free one. ``collect_metrics`` counts even without a metrics port (workers: the supervisor
    serves them). ``config_paths`` are re-read on reload (empty in quick mode: nothing to reload).
    """

    listen: tuple[Address, ...] = ()  # overrides the Gateway ports when given
    dns_refresh: float = DEFAULT_DNS_REFRESH
    drain_time: float = 5.0  # Istio's terminationDrainDuration
    drain_deadline: float = 20.0  # then at most this long for requests in flight
    settings: ServerSettings = field(default_factory=ServerSettings)
    reuse_port: bool = False
    admin: Address | None = None
    readiness: Address | None = None
    metrics: Address | None = None
    collect_metrics: bool = True
    access_log: str = "off"  # off | text | json
    access_log_stream: TextIO | None = field(default=None, compare=False, repr=False)
    config_paths: tuple[str, ...] = ()
    credentials: str | None = None  # --credentials: where credentialName is looked up
    namespace: str = DEFAULT_GATEWAY_NAMESPACE  # --namespace: the gateway's, for exportTo
    watch: float | None = None  # poll the config files every this many seconds
    worker: int = 0  # index among --workers (0 counts control-plane events)
    ready_fd: int | None = None  # a worker writes b"ready\n" here once it serves


class Proxy:
    """The running proxy: runtime, discovery tasks, listeners, operating ports."""

    def __init__(self, config: Config, options: RunOptions = RunOptions()) -> None:
        self.options = options
        self.metrics: Metrics | None = None
        if options.collect_metrics:
            from proxy.metrics import Metrics

            self.metrics = Metrics(control=options.worker == 0)
        self.access_log: AccessLog | None = None
        if options.access_log != "off":
            from proxy.accesslog import AccessLog

            self.access_log = AccessLog(options.access_log, options.access_log_stream)
        self.ref = RuntimeRef(build_runtime(config, self.metrics))
        # Counting what each worker accepted proves SO_REUSEPORT spreads the connections.
        accepted = (
            self.metrics.worker_connections.labels(str(options.worker)) if self.metrics else None
        )
        self.connections = Connections(accepted.inc if accepted is not None else None)
        self.servers: list[asyncio.Server] = []
        self.runners: list[web.AppRunner] = []
        self.ports: dict[str, Address] = {}  # "admin"/"readiness"/"metrics" -> bound address
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self.started = False
        self.warm = False  # every cluster of the first configuration has had an endpoint
        self.draining = False
        self.stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # cut the drain time short (SIGINT, second signal)
        self._signals = False
        self._cold_logged = False
        self._drain_timers: dict[ClusterRuntime, asyncio.TimerHandle] = {}

    @property
    def addresses(self) -> list[Address]:
        """Where the listeners actually listen (port 0 resolved)."""
        found: list[Address] = []
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                found.append((host, port))
        return found

    @property
    def runtime(self) -> Runtime:
        """The runtime requests read now (``ref.current``)."""
        return self.ref.current

    @property
    def ready(self) -> bool:
        return self.started and self.warm and not self.draining

    def exposition(self) -> bytes:
        """The Prometheus text of this process (gauges refreshed from the live snapshots)."""
        if self.metrics is None:
            return b""
        self.refresh_metrics()
        return self.metrics.exposition()

    def refresh_metrics(self) -> None:
        """Flush the request path's counts and set the gauges from the live snapshots."""
        if self.metrics is not None:
            self.metrics.flush()
            self.metrics.refresh(
                (name, crt.cluster.snapshot, crt.stats.active if crt.stats else 0)  # type: ignore[misc]
                for name, crt in self.runtime.clusters.items()
            )

    # ------------------------------------------------------------------ startup
    async def start(self) -> None:
        await self._start_discovery(self.runtime.clusters.values())
        await self._start_listeners()
        await self._start_operating_ports()
        if self.options.watch is not None and self.options.config_paths:
            self._tasks.append(asyncio.create_task(self._watch(self.options.watch)))
        if self.metrics is not None and self.options.metrics is None:
            # Workers: nobody scrapes this process, so keep the scrape-time gauges fresh.
            self._tasks.append(asyncio.create_task(self._refresh_every(1.0)))
        self.started = True
        self._check_warm()

    async def _start_discovery(self, clusters: Iterable[ClusterRuntime]) -> None:
        clusters = list(clusters)
        first: list[asyncio.Task[bool]] = []
        for crt in clusters:
            watcher = EndpointWatcher(
                crt.spec.name,
                crt.spec.endpoints,
                functools.partial(self._endpoints_changed, crt),
                refresh=self.options.dns_refresh,
            )
            first.append(asyncio.create_task(watcher.refresh_once()))
            if watcher.is_dynamic:
                crt.tasks.append(asyncio.create_task(self._refresh_later(watcher)))
        for task in first:
            try:
                await task
            except DiscoveryError as exc:
                log.warning("%s (will retry)", exc)
        for crt in clusters:
            if crt.health.enabled:
                crt.tasks.append(asyncio.create_task(crt.health.run()))

    async def _refresh_later(self, watcher: EndpointWatcher) -> None:
        await asyncio.sleep(self.options.dns_refresh)
        await watcher.run()

    async def _refresh_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.refresh_metrics()

    def _endpoints_changed(self, crt: ClusterRuntime, endpoints: tuple[Endpoint, ...]) -> None:
        removed = crt.cluster.set_endpoints(endpoints)
        crt.health.sync()
        log.info(
            "cluster %s: %d endpoints: %s",
            crt.spec.name,
            len(endpoints),
            " ".join(ep.key for ep in endpoints) or "-",
        )
        for pool in removed:
            self._tasks.append(asyncio.create_task(pool.close()))
        self._schedule_drain(crt)
        self._check_warm()

    def _schedule_drain(self, crt: ClusterRuntime) -> None:
        """Wake up when the cluster's next drain window ends (``proxy.cluster``: draining)."""
        deadline = crt.cluster.next_drain_deadline
        old = self._drain_timers.pop(crt, None)
        if old is not None:
            old.cancel()
        if deadline is None:
            return
        delay = max(0.0, deadline - time.monotonic()) + 0.001
        loop = asyncio.get_running_loop()
        self._drain_timers[crt] = loop.call_later(delay, self._drain_over, crt)

    def _drain_over(self, crt: ClusterRuntime) -> None:
        self._drain_timers.pop(crt, None)
        for pool in crt.cluster.expire_draining():
            log.info("cluster %s: %s drained", crt.spec.name, pool.key)
            self._tasks.append(asyncio.create_task(pool.close()))
        self._schedule_drain(crt)

    def _check_warm(self) -> None:
        """Envoy's cluster warming: not ready until every cluster has had an endpoint.

        A proxy whose cluster has no endpoint at all can only answer 503 (a DNS name that does
        not resolve, a ServiceEntry for pods that are not there), so readiness stays 503 and the
        log says which cluster waits for what. Once warm it stays warm: a cluster emptied later
        (its pods scaled to zero) must not take the other clusters' traffic away by failing
        readiness. A worker tells the supervisor it is ready only from here on.
        """
        if self.warm or not self.started:
            return
        cold = [crt for crt in self.runtime.clusters.values() if not crt.cluster.snapshot.endpoints]
        if cold:
            if not self._cold_logged:
                self._cold_logged = True
                for crt in cold:
                    source = crt.spec.endpoints
                    where = (
                        f"DNS {' '.join(t.key for t in source.targets)}: no address yet"
                        if isinstance(source, DnsEndpoints)
                        else "no static endpoint configured"
                    )
                    log.warning(
                        "cluster %s has no endpoint (%s): readiness stays 503 and its requests "
                        "get 503 'no healthy upstream' until it has one",
                        crt.spec.name,
                        where,
                    )
            return
        self.warm = True
        if self._cold_logged:
            log.info("every cluster has an endpoint: ready")
        if self.options.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.options.ready_fd, b"ready\n")
                os.close(self.options.ready_fd)

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
            settings = self.options.settings
            context = handshake = None
            spec = self.runtime.config.listener(gateway_port)
            if spec is not None and spec.protocol == "HTTPS":
                settings = replace(settings, proto="https")
                context = listener_context(functools.partial(self._tls_of, gateway_port))
                handshake = DownstreamHandshake(
                    functools.partial(self._server_dispatcher, gateway_port)
                )
            server = await serve(
                Dispatcher(self.ref, gateway_port, self.metrics, self.access_log),
                host,
                port,
                settings,
                reuse_port=self.options.reuse_port,
                connections=self.connections,
                ssl=context,
                tls=handshake,
            )
            self.servers.append(server)
            for sock in server.sockets:
                bound_host, bound_port = sock.getsockname()[:2]
                log.info("listening on %s:%d", bound_host, bound_port)
            if context is not None:
                for line in self.runtime.tls[gateway_port].describe():
                    log.info("port %d TLS %s", gateway_port, line)

    def _tls_of(self, port: int) -> TlsListener:
        """The certificates of HTTPS port ``port`` in the runtime requests read now."""
        return self.ref.current.tls[port]

    def _server_dispatcher(self, port: int, route: str) -> Dispatcher:
        return Dispatcher(self.ref, port, self.metrics, self.access_log, server=route)

    async def _start_operating_ports(self) -> None:
        opts = self.options
        apps: list[tuple[str, Address | None, web.Application | None]] = [
            ("readiness", opts.readiness, None),
            ("metrics", opts.metrics, None),
            ("admin", opts.admin, None),
        ]
        for name, where, _ in apps:
            if where is None:
                continue
            if name == "readiness":
                app = readiness_app(lambda: self.ready)
            elif name == "metrics":
                app = metrics_app(self.exposition)
            else:
                app = admin_app(self)
            runner, bound = await start_app(app, where[0], where[1], reuse_port=opts.reuse_port)
            self.runners.append(runner)
            self.ports[name] = bound
            log.info("%s listening on %s:%d", name, *bound)

    # ------------------------------------------------------------------ reload
    async def reload(self) -> bool:
        """Re-read the config files and swap the runtime; False (and nothing changed) on error."""
        paths = self.options.config_paths
        if not paths:
            log.info("reload: quick mode has no files to re-read; nothing changed")
            return True
        async with self._reload_lock:
            try:
                # Parse, validate, compile routes: all in a thread, off the request path.
                config, runtime = await asyncio.to_thread(self._load_runtime, paths)
            except ConfigError as exc:
                for line in exc.errors:
                    log.error("reload: %s", line)
                self._reloaded(ok=False, detail=f"{len(exc.errors)} error(s)")
                return False
            except Exception as exc:  # a bug must not take the running config down
                log.exception("reload: %s", exc)
                self._reloaded(ok=False, detail=str(exc))
                return False
            for line in config.warnings:
                log.warning("reload: %s", line)
            why = nothing_served(config)
            if why is not None:  # as `run` refuses to start on it: keep what serves
                log.error("reload: nothing to serve: %s; the running config is kept", why)
                self._reloaded(ok=False, detail="nothing to serve")
                return False
            old = self.runtime
            self._log_certificates(old, runtime)
            added = [
                crt for name, crt in runtime.clusters.items() if old.clusters.get(name) is not crt
            ]
            new = len(added)
            for name in runtime.rediscover:  # kept clusters whose endpoint source changed
                kept = runtime.clusters[name]
                for task in kept.tasks:
                    task.cancel()
                kept.tasks.clear()
                added.append(kept)
            await self._start_discovery(added)  # the first request on a new cluster finds endpoints
            self.ref.current = runtime  # the swap: requests from here on see the new config
            self._check_warm()
            gone = [
                crt for name, crt in old.clusters.items() if runtime.clusters.get(name) is not crt
            ]
            for crt in gone:
                self._retire(crt, still_named=crt.spec.name in runtime.clusters)
            self._reloaded(
                ok=True,
                detail=f"{len(runtime.clusters)} cluster(s), {new} new, {len(gone)} retired",
            )
            return True

    def _log_certificates(self, old: Runtime, new: Runtime) -> None:
        """Say which HTTPS servers serve another certificate from now on (rotation)."""
        for port, listener in new.tls.items():
            before = set(old.tls[port].describe()) if port in old.tls else set()
            for line in listener.describe():
                if line not in before:
                    log.info("reload: port %d TLS %s", port, line)

    def _load_runtime(self, paths: Sequence[str]) -> tuple[Config, Runtime]:
        config = load_config(list(paths), self.options.credentials, self.options.namespace)
        problem = self._unreloadable(config)
        if problem:
            raise ConfigError([problem])
        return config, build_runtime(config, self.metrics, self.runtime)

    def _unreloadable(self, config: Config) -> str | None:
        old = sorted(ls.port for ls in self.runtime.config.listeners)
        new = sorted(ls.port for ls in config.listeners)
        if old != new:
            return (
                f"the Gateway ports changed ({old} -> {new}): listeners are not re-bound on "
                "reload; restart the proxy to listen elsewhere"
            )
        for listener in config.listeners:
            before = self.runtime.config.listener(listener.port)
            if before is not None and before.protocol != listener.protocol:
                return (
                    f"port {listener.port} changed from {before.protocol} to "
                    f"{listener.protocol}: a listener does not change protocol on reload; "
                    "restart the proxy"
                )
        return None

    def _retire(self, crt: ClusterRuntime, *, still_named: bool) -> None:
        for task in crt.tasks:
            task.cancel()
        # Idle connections close now; busy ones close when their exchange releases them.
        for pool in crt.cluster.pools():
            self._tasks.append(asyncio.create_task(pool.close()))
        if self.metrics is not None and not still_named:
            self.metrics.forget(crt.spec.name)

    def _reloaded(self, *, ok: bool, detail: str) -> None:
        if self.metrics is not None:
            self.metrics.reload(ok)
        if ok:
            log.info("reload: configuration applied (%s)", detail)
        else:
            log.error("reload: failed (%s); still serving the previous configuration", detail)

    def _watched(self) -> tuple[str, ...]:
        """The config files and folders, and the certificate files the running config read."""
        paths = [*self.options.config_paths, *self.runtime.config.tls_files]
        if self.options.credentials is not None:
            paths.append(self.options.credentials)
        return tuple(paths)

    async def _watch(self, interval: float) -> None:
        watched = self._watched()
        seen = _fingerprint(watched)
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(_fingerprint, watched)
            if now != seen:
                seen = now
                log.info("config files changed: reloading")
                await self.reload()
                if self._watched() != watched:
                    # The new configuration reads other certificate files: follow those from
                    # here on (their state now is the one just loaded, not a change).
                    watched = self._watched()
                    seen = await asyncio.to_thread(_fingerprint, watched)

    # ------------------------------------------------------------------ drain and stop
    def begin_drain(self, *, hurry: bool = False) -> None:
        """Readiness turns 503 now; ``run_until_signalled`` then drains and stops."""
        if self.stopping.is_set() or hurry:
            self._hurry.set()
        if not self.draining:
            log.info(
                "draining: readiness 503, serving for %.1fs more",
                0 if hurry else self.options.drain_time,
            )
        self.draining = True
        self.stopping.set()

    async def stop(self, grace: float = 10.0) -> None:
        self.draining = True
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
        for timer in self._drain_timers.values():
            timer.cancel()
        self._drain_timers.clear()
        tasks = [*self._tasks, *(t for crt in self.runtime.clusters.values() for t in crt.tasks)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for crt in self.runtime.clusters.values():
            for pool in crt.cluster.pools():
                await pool.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for runner in self.runners:
            await runner.cleanup()
        self.runners.clear()
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)
        if self.metrics is not None:
            self.metrics.flush()  # a worker's last counts reach the shared files

    def handle_signals(self) -> None:
        """SIGTERM drains, SIGINT stops without the drain time, SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        self._signals = True
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain)
        loop.add_signal_handler(signal.SIGINT, functools.partial(self.begin_drain, hurry=True))
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        if not self.started:
            log.warning("SIGHUP ignored: still starting")
            return
        log.info("SIGHUP: reloading")
        self._tasks.append(asyncio.create_task(self._reload_on_signal()))

    async def _reload_on_signal(self) -> None:
        await self.reload()  # it logs and counts its outcome; the task keeps no result

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and stop."""
        if not self._signals:
            self.handle_signals()
        await self.stopping.wait()
        if not self._hurry.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.drain_time):
                    await self._hurry.wait()
        log.info(
            "stopping: no new connections; %d open, up to %.1fs for requests in flight",
            len(self.connections),
            self.options.drain_deadline,
        )
        await self.stop(grace=self.options.drain_deadline)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info("stopped")


def _fingerprint(paths: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """(file, mtime_ns, size) of every config file, to notice edits (``--watch``).

    A folder counts with its files and those of its subfolders one level down: the
    ``--credentials`` folder holds one folder per Secret, as Kubernetes mounts them.
    """
    found: list[tuple[str, int, int]] = []
    for path in paths:
        names = [path]
        if os.path.isdir(path):
            with contextlib.suppress(OSError):
                names = [os.path.join(path, n) for n in sorted(os.listdir(path))]
            for name in list(names):
                if os.path.isdir(name) and not os.path.basename(name).startswith(".."):
                    with contextlib.suppress(OSError):
                        names += [os.path.join(name, n) for n in sorted(os.listdir(name))]
        for name in names:
            try:
                st = os.stat(name)
            except OSError:
                continue
            found.append((name, st.st_mtime_ns, st.st_size))
    return tuple(found)


async def run_proxy(config: Config, options: RunOptions) -> int:
    """``sticky-proxy run``: serve until SIGINT/SIGTERM; 1 when a listener cannot bind."""
    proxy = Proxy(config, options)
    proxy.handle_signals()  # a SIGTERM while starting drains too, instead of killing us
    try:
        await proxy.start()
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        await proxy.stop(grace=0)
        return 1
    await proxy.run_until_signalled()
    return 0
