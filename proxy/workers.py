"""``--workers N``: N proxy processes on the same ports, one supervisor that watches them.

Theory
------
Python runs one thread of proxy code per process, so more cores need more processes. Each
worker is a plain ``sticky-proxy run`` (same files, same flags) that binds the traffic ports with
``SO_REUSEPORT``: the kernel spreads new connections over the workers, no socket passing, no
accept lock. Routing needs no coordination: every worker loads the same config and builds the
same ring from the same sorted endpoints, so a cookie lands on the same pod whichever worker
accepts the connection (DESIGN §1: two replicas agree without sharing state).

The supervisor binds no traffic port. It

* resolves port 0 first (a bound, never-listening ``SO_REUSEPORT`` socket holds the number, and
  a socket that does not listen receives no connections), so every worker listens on one port;
* serves ``:15021/healthz/ready`` (200 while every worker is up and nobody is draining) and
  ``:15090/stats/prometheus``, which adds up all workers through prometheus-client's
  multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` (the caller's, or a temporary directory) is
  set in each worker's environment before it imports prometheus-client;
* leaves the admin port to worker 0 (``/clusters`` and ``/route`` are the same in every worker);
* restarts a worker that dies (after a back-off when it keeps dying), marking its gauges dead;
* forwards SIGHUP (each worker reloads itself) and SIGTERM/SIGINT (each worker drains), turns
  its own readiness to 503 at once, waits for the workers and exits 0 when they all did.

Each worker asks the kernel to SIGTERM it when the supervisor dies (``PR_SET_PDEATHSIG``), so a
killed supervisor leaves no orphans on the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("proxy.workers")

Address = tuple[str, int]
Command = Callable[[int, Sequence[Address], int | None, int], list[str]]

_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_MAX = 10.0


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket: resolves port 0 and holds the number."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Worker:
    """One worker process and its readiness."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.started_at = 0.0
        self.failures = 0  # consecutive quick deaths, for the back-off
        self.was_ready = False  # served at least once (else a death is a failure to start)


class Supervisor:
    """Starts, watches and stops the workers; serves readiness and the summed metrics."""

    def __init__(
        self,
        workers: int,
        *,
        listen: Sequence[Address],
        admin: Address | None,
        readiness: Address | None,
        metrics: Address | None,
        drain_time: float,
        drain_deadline: float,
        command: Command,
    ) -> None:
        self.count = workers
        self.listen = tuple(listen)
        self.admin = admin
        self.readiness = readiness
        self.metrics = metrics
        self.drain_time = drain_time
        self.drain_deadline = drain_deadline
        self.command = command
        self.workers = [Worker(i) for i in range(workers)]
        self.draining = False
        self.failed = False  # a worker could not start: exit 1
        self.stopping = asyncio.Event()
        self.ports: dict[str, Address] = {}
        self._reserved: list[socket.socket] = []
        self._metrics_dir: str | None = None
        self._own_dir = False
        self._signal: int = signal.SIGTERM

    @property
    def ready(self) -> bool:
        return not self.draining and all(w.ready for w in self.workers)

    async def run(self) -> int:
        runners: list[web.AppRunner] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                self._prepare()
                runners = await self._serve_ports()
            except OSError as exc:
                log.error("cannot start: %s", exc)
                return 1
            log.info("supervisor pid %d: starting %d workers", os.getpid(), self.count)
            tasks = [asyncio.create_task(self._keep(w)) for w in self.workers]
            self._handle_signals()
            await self.stopping.wait()
            code = await self._stop(tasks)
            log.info("stopped")
            return code
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for runner in runners:
                await runner.cleanup()
            for sock in self._reserved:
                sock.close()
            if self._own_dir and self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

    # ------------------------------------------------------------------ start
    def _prepare(self) -> None:
        resolved: list[Address] = []
        for host, port in self.listen:
            if port == 0:
                sock = reserve_port(host, 0)
                self._reserved.append(sock)
                port = sock.getsockname()[1]
            resolved.append((host, port))
        self.listen = tuple(resolved)
        if self.admin is not None and self.admin[1] == 0:
            sock = reserve_port(*self.admin)
            self._reserved.append(sock)
            self.admin = (self.admin[0], sock.getsockname()[1])
        if self.metrics is not None:
            path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if not path:
                path = tempfile.mkdtemp(prefix="sticky-proxy-metrics-")
                self._own_dir = True
            os.makedirs(path, exist_ok=True)
            for name in os.listdir(path):  # a previous run's files would add up with ours
                if name.endswith(".db"):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(path, name))
            self._metrics_dir = path

    async def _serve_ports(self) -> list[web.AppRunner]:
        from proxy.admin import metrics_app, readiness_app, start_app
        from proxy.metrics import aggregate

        runners: list[web.AppRunner] = []
        if self.readiness is not None:
            runner, bound = await start_app(readiness_app(lambda: self.ready), *self.readiness)
            runners.append(runner)
            self.ports["readiness"] = bound
            log.info("readiness listening on %s:%d", *bound)
        if self.metrics is not None and self._metrics_dir is not None:
            path = self._metrics_dir
            runner, bound = await start_app(metrics_app(lambda: aggregate(path)), *self.metrics)
            runners.append(runner)
            self.ports["metrics"] = bound
            log.info("metrics listening on %s:%d (all workers)", *bound)
        return runners

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self._metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        else:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return env

    async def _spawn(self, worker: Worker) -> asyncio.StreamReader:
        read_fd, write_fd = os.pipe()
        try:
            argv = self.command(
                worker.index, self.listen, self.admin[1] if self.admin else None, write_fd
            )
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                *argv,
                pass_fds=(write_fd,),
                env=self._environment(),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        return reader

    async def _keep(self, worker: Worker) -> None:
        """Run one worker; restart it whenever it dies, until the supervisor stops."""
        while not self.stopping.is_set():
            reader = await self._spawn(worker)
            proc = worker.proc
            assert proc is not None
            if await reader.readline() == b"ready\n":
                worker.ready = worker.was_ready = True
                worker.failures = 0
                if self.ready:
                    log.info("all %d workers ready", self.count)
            code = await proc.wait()
            if not worker.was_ready and not self.stopping.is_set():
                # It never served (a port in use, no permission): restarting will not help.
                log.error("worker %d could not start (exit code %s): stopping", worker.index, code)
                self.failed = True
                self._stop_signal(signal.SIGTERM)
                return
            worker.ready = False
            if self._metrics_dir is not None:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(proc.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if self.stopping.is_set():
                return
            lived = time.monotonic() - worker.started_at
            worker.failures = worker.failures + 1 if lived < 5 else 1
            delay = min(RESTART_BACKOFF_MAX, 0.1 * 2 ** (worker.failures - 1))
            log.error(
                "worker %d (pid %d) exited with %s; restarting in %.1fs",
                worker.index,
                proc.pid,
                code,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stopping.wait()

    # ------------------------------------------------------------------ signals and stop
    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._stop_signal, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)

    def _stop_signal(self, sig: int) -> None:
        if not self.draining:
            log.info("draining: readiness 503; workers drain and stop")
        self.draining = True
        self._forward(sig)  # a second signal reaches the workers too: they cut the drain short
        self.stopping.set()

    def _forward(self, sig: int) -> None:
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _stop(self, tasks: list[asyncio.Task[None]]) -> int:
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(self.drain_time + self.drain_deadline + 5):
                codes = [await proc.wait() for proc in procs]
        except TimeoutError:
            log.error("workers still running after the drain deadline: killing them")
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            codes = [await proc.wait() for proc in procs]
        await asyncio.gather(*tasks, return_exceptions=True)
        failed = [c for c in codes if c != 0]
        if failed:
            log.error("workers exited with %s", failed)
        return 1 if failed or self.failed else 0
