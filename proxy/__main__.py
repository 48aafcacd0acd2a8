"""Command line: ``sticky-proxy run | demo | check | route``.

``check`` validates Istio YAML the way the proxy loads it (exit 0, or 2 with every error).
``route`` answers, offline, the question Istio users cannot ask Envoy: *where would this request
go?*  It runs the proxy's own code (``proxy.explain``, which the admin ``/route`` serves too:
``proxy.routing.Router`` to route, ``proxy.affinity.Affinity`` to hash and invent the cookie,
the cluster's balancer to pick), so its answer is the running proxy's answer for the same
endpoints.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from proxy import __version__
from proxy.config import Config, ConfigError
from proxy.demo_command import add_demo_parser
from proxy.flags import (
    LISTEN_ENV,
    env_listen,
    istio_duration,
    namespace_name,
    positive_seconds,
    seconds,
)
from proxy.istio import load_config
from proxy.istio_visibility import DEFAULT_GATEWAY_NAMESPACE

EXIT_OK = 0
EXIT_NO_ROUTE = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sticky-proxy",
        description="Istio's sticky sessions without Istio.",
    )
    parser.add_argument("--version", action="version", version=f"sticky-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parser(sub)
    add_demo_parser(sub)

    check = sub.add_parser(
        "check",
        help="validate Istio YAML files or folders (exit 0 when valid, 2 with the errors)",
    )
    check.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or folder")
    _add_credentials(check)

    route = sub.add_parser(
        "route",
        help="show where a request would go: route, cluster, hash key, cookie, endpoint",
        description="Route one request offline through the proxy's own routing and hashing "
        "code. Exit 0 when a route matches, 1 when none does (the proxy would answer 404), "
        "2 when the configuration or the arguments are wrong.",
    )
    route.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or folder")
    _add_credentials(route)
    route.add_argument("--host", required=True, help="Host header (a port in it is ignored)")
    route.add_argument("--path", default="/", help="request path, may include ?query (default /)")
    route.add_argument("--method", default="GET", help="request method (default GET)")
    route.add_argument(
        "--header", action="append", default=[], metavar="K:V", help="request header (repeatable)"
    )
    route.add_argument(
        "--cookie", action="append", default=[], metavar="NAME=VALUE", help="cookie (repeatable)"
    )
    route.add_argument(
        "--query", action="append", default=[], metavar="K=V", help="query parameter (repeatable)"
    )
    route.add_argument(
        "--client-ip",
        default="127.0.0.1",
        help="client address, for useSourceIp and the generated cookie (default 127.0.0.1)",
    )
    route.add_argument("--client-port", type=int, default=54321, help="client port (default 54321)")
    route.add_argument(
        "--local",
        metavar="IP:PORT",
        help="the proxy's local address of the connection "
        "(default 127.0.0.1:<listener port>); part of a generated cookie's value",
    )
    route.add_argument("--port", type=int, help="Gateway port (default: the only one)")
    return parser


def _add_credentials(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--credentials",
        metavar="DIR",
        help="where a credentialName with no Secret in the YAML is looked up: DIR/NAME/tls.crt, "
        "tls.key, ca.crt (a Kubernetes Secret as mounted)",
    )
    parser.add_argument(
        "--namespace",
        type=namespace_name,
        default=DEFAULT_GATEWAY_NAMESPACE,
        metavar="NS",
        help="the gateway's namespace: only what exportTo exports to it is used "
        f"(default {DEFAULT_GATEWAY_NAMESPACE}, Istio's ingress gateway's)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(RunArgs.parse(args), parser)
    if args.command == "demo":
        from proxy.demo_command import run_demo

        _setup_logging(args.log_level if "log_level" in args else "info")
        return _run_loop(run_demo(args))
    if args.command == "check":
        return _check(args.paths, args.credentials, args.namespace)
    if args.command == "route":
        return _route(args)
    parser.print_help()
    return 2


# --------------------------------------------------------------------------- run


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="serve Istio YAML (files or folders), or quick mode with --upstream",
        description="Serve the Gateways, VirtualServices, DestinationRules and ServiceEntries in "
        "PATH... (files or folders). Quick mode, without YAML: --upstream HOST:PORT (repeat) "
        "with --cookie/--ttl (default ISTIOID, 60s) or --header/--query/--source-ip.",
    )
    run.add_argument("paths", nargs="*", metavar="PATH", help="YAML file or folder")
    _add_credentials(run)
    run.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR:PORT",
        help="listen here instead of 0.0.0.0:<Gateway port> (one per Gateway port; port 0 "
        f"picks a free one; default: ${LISTEN_ENV}, comma-separated, if set)",
    )
    run.add_argument(
        "--dns-refresh", type=seconds, default=5.0, metavar="DURATION", help="DNS refresh (5s)"
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ops = run.add_argument_group("operating it (Istio ingress gateway ports)")
    ops.add_argument(
        "--admin-port",
        default="15000",
        metavar="PORT|off",
        help="admin (/config_dump, /clusters, /ready, /route) (15000; 0 picks one)",
    )
    ops.add_argument(
        "--admin-address",
        default="127.0.0.1",
        metavar="ADDR",
        help="admin bind address (127.0.0.1)",
    )
    ops.add_argument(
        "--readiness-port", default="15021", metavar="PORT|off", help="/healthz/ready (15021)"
    )
    ops.add_argument(
        "--metrics-port", default="15090", metavar="PORT|off", help="/stats/prometheus (15090)"
    )
    ops.add_argument(
        "--ops-address",
        default="0.0.0.0",
        metavar="ADDR",
        help="bind address of the readiness and metrics ports (0.0.0.0)",
    )
    ops.add_argument(
        "--access-log",
        default="text",
        choices=["off", "text", "json"],
        help="one line per request on stdout, Envoy's default fields (text)",
    )
    ops.add_argument(
        "--drain-time",
        type=seconds,
        default=5.0,
        metavar="DURATION",
        help="on SIGTERM: readiness 503 and keep serving this long (5s, Istio's "
        "terminationDrainDuration; durations: 500ms, 5s, 1m or plain seconds)",
    )
    ops.add_argument(
        "--drain-deadline",
        type=seconds,
        default=20.0,
        metavar="DURATION",
        help="then wait at most this long for requests in flight (20s)",
    )
    ops.add_argument(
        "--watch", action="store_true", help="reload when the config files change (SIGHUP too)"
    )
    limits = run.add_argument_group(
        "client timeouts (Istio durations such as 500ms, 60s, 1m, or seconds)"
    )
    limits.add_argument(
        "--idle-timeout", type=positive_seconds, default=75.0, metavar="DURATION",
        help="close a keep-alive connection idle this long (75s)",
    )  # fmt: skip
    limits.add_argument(
        "--header-timeout", type=positive_seconds, default=60.0, metavar="DURATION",
        help="408 when a request head is not complete this long after its first byte, or after "
        "a new connection opened (60s)",
    )  # fmt: skip
    limits.add_argument(
        "--body-timeout", type=positive_seconds, default=60.0, metavar="DURATION",
        help="408 when a request body makes no progress this long (60s)",
    )  # fmt: skip
    limits.add_argument(
        "--send-timeout", type=positive_seconds, default=60.0, metavar="DURATION",
        help="close when the client reads nothing of its response this long (60s)",
    )  # fmt: skip
    ops.add_argument(
        "--workers",
        default="1",
        metavar="N|auto",
        help="processes serving the same ports with SO_REUSEPORT (1; auto = the CPUs this "
        "process may use: its affinity mask and cgroup CPU limit)",
    )
    ops.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    ops.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    quick = run.add_argument_group("quick mode (no YAML)")
    quick.add_argument("--upstream", action="append", default=[], metavar="HOST:PORT")
    quick.add_argument("--cookie", default="ISTIOID", help="cookie name (default ISTIOID)")
    quick.add_argument(
        "--ttl", type=istio_duration, default="60s", metavar="DURATION", help="cookie TTL (60s)"
    )
    quick.add_argument("--passive", action="store_true", help="never issue the cookie, only read")
    quick.add_argument("--cookie-path", help="Path attribute of the issued cookie")
    quick.add_argument("--header", help="hash on this request header instead of a cookie")
    quick.add_argument("--query", help="hash on this query parameter instead of a cookie")
    quick.add_argument("--source-ip", action="store_true", help="hash on the client IP")
    quick.add_argument("--maglev", action="store_true", help="Maglev table instead of a ring")
    quick.add_argument("--table-size", type=int, help="Maglev table size (prime, 65537)")
    quick.add_argument("--ring-size", type=int, help="minimum ring size (default 1024)")
    quick.add_argument(
        "--print-config", action="store_true", help="print the equivalent Istio YAML and exit"
    )


@dataclass(frozen=True, slots=True)
class RunArgs:
    """``sticky-proxy run``'s arguments as parsed: one field per option, named like its dest.

    The parser keeps the defaults and the help; this is the typed value ``_run`` reads and
    ``run_argv`` turns back into a command line (a worker's: ``worker_argv``).
    """

    paths: tuple[str, ...]
    credentials: str | None
    namespace: str
    listen: tuple[str, ...]
    dns_refresh: float
    log_level: str
    admin_port: str
    admin_address: str
    readiness_port: str
    metrics_port: str
    ops_address: str
    access_log: str
    drain_time: float
    drain_deadline: float
    watch: bool
    idle_timeout: float
    header_timeout: float
    body_timeout: float
    send_timeout: float
    workers: str
    worker: int | None
    ready_fd: int | None
    upstream: tuple[str, ...]
    cookie: str
    ttl: str
    passive: bool
    cookie_path: str | None
    header: str | None
    query: str | None
    source_ip: bool
    maglev: bool
    table_size: int | None
    ring_size: int | None
    print_config: bool

    @classmethod
    def parse(cls, namespace: argparse.Namespace) -> RunArgs:
        """From the ``run`` subcommand's namespace (lists become tuples)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(namespace, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)


def run_argv(args: RunArgs) -> list[str]:
    """``args`` as a ``run`` command line that parses back to the same ``RunArgs``.

    Every field is written as its option (``--dns-refresh=2.0``), lists as the option repeated,
    true flags alone, None and false omitted; the paths come last, after ``--``.
    """
    argv = ["run"]
    for f in fields(args):
        value = getattr(args, f.name)
        if f.name == "paths" or value is None or value is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, tuple):
            argv.extend(f"{flag}={item}" for item in value)
        else:
            argv.append(f"{flag}={value}")  # one word: a value may start with "-"
    return [*argv, "--", *args.paths]


def worker_argv(
    args: RunArgs,
    index: int,
    listen: Sequence[tuple[str, int]],
    admin_port: int | None,
    ready_fd: int,
) -> list[str]:
    """The ``run`` command line of worker ``index``: the user's flags, with the supervisor's
    resolved listen addresses, the admin port on worker 0 only, no readiness/metrics ports."""
    worker = replace(
        args,
        listen=tuple(f"{h}:{p}" for h, p in listen),
        workers="1",
        worker=index,
        ready_fd=ready_fd,
        admin_port=str(admin_port) if index == 0 and admin_port is not None else "off",
        readiness_port="off",
        metrics_port="off",
    )
    return run_argv(worker)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    try:
        return int(uvloop.run(coro))
    except KeyboardInterrupt:
        return 130


def _run(args: RunArgs, parser: argparse.ArgumentParser) -> int:
    from proxy.exchange import ServerSettings
    from proxy.quick import QuickOptions, parse_address, quick_config, quick_yaml
    from proxy.server import RunOptions, run_proxy

    # The container image sets STICKY_PROXY_LISTEN (8080, like Istio's gateway): a non-root
    # process cannot bind port 80 under podman, --network host or Kubernetes by default.
    flag, texts = ("--listen", args.listen) if args.listen else (LISTEN_ENV, env_listen())
    try:
        listen = tuple(parse_address(text, flag=flag, allow_zero=True) for text in texts)
        upstreams = tuple(parse_address(text) for text in args.upstream)
    except ValueError as exc:
        print(f"sticky-proxy run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if bool(args.paths) == bool(upstreams):
        parser.error("run: give YAML PATHs or --upstream HOST:PORT (quick mode), not both")
    if upstreams:
        opts = QuickOptions(
            upstreams=upstreams,
            port=listen[0][1] if listen and listen[0][1] else 8080,
            cookie=args.cookie,
            ttl=None if args.passive else args.ttl,
            cookie_path=args.cookie_path,
            header=args.header,
            query=args.query,
            source_ip=args.source_ip,
            maglev=args.maglev,
            table_size=args.table_size,
            ring_size=args.ring_size,
        )
        if args.print_config:
            print(quick_yaml(opts), end="")
            return EXIT_OK
        try:
            config = quick_config(opts)
        except ConfigError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            return EXIT_CONFIG
        if not listen:
            listen = (("0.0.0.0", opts.port),)
    else:
        loaded = _load(args.paths, args.credentials, args.namespace)
        if loaded is None or _serves_nothing(loaded):
            return EXIT_CONFIG
        config = loaded
    _setup_logging(args.log_level)
    if args.paths and args.worker is None:
        _log_served(config)
    try:
        admin = _port(args.admin_port, "--admin-port")
        readiness = _port(args.readiness_port, "--readiness-port")
        metrics = _port(args.metrics_port, "--metrics-port")
        workers = _workers(args.workers)
    except ValueError as exc:
        print(f"sticky-proxy run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if workers > 1:
        from proxy.workers import Supervisor

        if not listen:
            listen = tuple((ls.bind, ls.port) for ls in config.listeners)
        supervisor = Supervisor(
            workers,
            listen=listen,
            admin=(args.admin_address, admin) if admin is not None else None,
            readiness=(args.ops_address, readiness) if readiness is not None else None,
            metrics=(args.ops_address, metrics) if metrics is not None else None,
            drain_time=args.drain_time,
            drain_deadline=args.drain_deadline,
            command=functools.partial(worker_argv, args),
        )
        return _run_loop(supervisor.run())
    worker = args.worker
    if worker is not None:
        from proxy.workers import die_with_parent

        die_with_parent()
    options = RunOptions(
        settings=ServerSettings(
            idle_timeout=args.idle_timeout,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            send_timeout=args.send_timeout,
        ),
        listen=listen,
        dns_refresh=args.dns_refresh,
        drain_time=args.drain_time,
        drain_deadline=args.drain_deadline,
        reuse_port=worker is not None,
        admin=(args.admin_address, admin) if admin is not None else None,
        readiness=(args.ops_address, readiness) if readiness is not None else None,
        metrics=(args.ops_address, metrics) if metrics is not None else None,
        # A worker counts into the supervisor's multiprocess directory (when it set one).
        collect_metrics=metrics is not None
        if worker is None
        else bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")),
        access_log=args.access_log,
        config_paths=tuple(args.paths),
        credentials=args.credentials,
        namespace=args.namespace,
        watch=1.0 if args.watch else None,
        worker=worker or 0,
        ready_fd=args.ready_fd,
    )
    return _run_loop(run_proxy(config, options))


def _port(text: str, flag: str) -> int | None:
    if text == "off":
        return None
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"{flag} must be a port number (0 picks a free one) or off: {text!r}")
    return int(text)


def _workers(text: str) -> int:
    if text == "auto":
        from proxy.cpus import cpu_budget

        budget = cpu_budget()
        plural = "s" if budget.count != 1 else ""
        logging.getLogger("proxy.cpus").info(
            "--workers auto: %d worker%s (%s)", budget.count, plural, budget.reason
        )
        return budget.count
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--workers must be a number >= 1 or auto: {text!r}")
    return int(text)


# --------------------------------------------------------------------------- check


def _load(
    paths: Sequence[str],
    credentials: str | None = None,
    namespace: str = DEFAULT_GATEWAY_NAMESPACE,
) -> Config | None:
    try:
        config = load_config(paths, credentials, namespace)
    except ConfigError as exc:
        for line in exc.warnings:
            print(f"warning: {line}", file=sys.stderr)
        for line in exc.errors:
            print(line, file=sys.stderr)
        count = len(exc.errors)
        print(f"{count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return None
    for line in config.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return config


def _serves_nothing(config: Config) -> bool:
    """True (and why printed) when the config gives no request to serve: a mistake to report,
    not a proxy to start that answers nothing."""
    from proxy.served import nothing_served, unserved_lines

    why = nothing_served(config)
    if why is None:
        return False
    print(f"nothing to serve: {why}", file=sys.stderr)
    for line in unserved_lines(config):
        print(f"not served: {line}", file=sys.stderr)
    return True


def _log_served(config: Config) -> None:
    from proxy.served import served_lines, unserved_lines

    log = logging.getLogger("proxy.served")
    for line in served_lines(config):
        log.info("serves: %s", line)
    for line in unserved_lines(config):
        log.info("not served: %s", line)


def _check(
    paths: Sequence[str],
    credentials: str | None = None,
    namespace: str = DEFAULT_GATEWAY_NAMESPACE,
) -> int:
    from proxy.served import served_lines, unserved_lines

    config = _load(paths, credentials, namespace)
    if config is None or _serves_nothing(config):
        return EXIT_CONFIG
    ports = ", ".join(str(listener.port) for listener in config.listeners) or "none"
    print(
        f"ok: {len(config.sources)} file(s), listeners on port(s) {ports}, "
        f"{len(config.virtual_services)} VirtualService(s), {len(config.clusters)} cluster(s)"
    )
    for line in served_lines(config):
        print(f"serves: {line}")
    for line in unserved_lines(config):
        print(f"not served: {line}")
    return EXIT_OK


# --------------------------------------------------------------------------- route


def _pairs(values: Sequence[str], sep: str, what: str) -> tuple[tuple[str, str], ...] | None:
    from proxy.explain import split_pair

    out: list[tuple[str, str]] = []
    for value in values:
        pair = split_pair(value, sep)
        if pair is None:
            print(
                f"sticky-proxy route: {what} {value!r} must look like NAME{sep}VALUE",
                file=sys.stderr,
            )
            return None
        out.append(pair)
    return tuple(out)


def _route(args: argparse.Namespace) -> int:
    from proxy.explain import Probe, address_of, explain
    from proxy.routing import Router

    config = _load(args.paths, args.credentials, args.namespace)
    # No listener: no port to route on, say why. A listener without routes answers 404 (exit 1).
    if config is None or (not config.listeners and _serves_nothing(config)):
        return EXIT_CONFIG
    headers = _pairs(args.header, ":", "--header")
    cookies = _pairs(args.cookie, "=", "--cookie")
    queries = _pairs(args.query, "=", "--query")
    if headers is None or cookies is None or queries is None:
        return EXIT_CONFIG
    ports = [listener.port for listener in config.listeners]
    port = args.port
    if port is None:
        if len(ports) != 1:
            listed = ", ".join(map(str, ports)) or "none"
            print(
                f"sticky-proxy route: choose a Gateway port with --port (ports: {listed})",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        port = ports[0]
    if config.listener(port) is None:
        listed = ", ".join(map(str, ports)) or "none"
        print(
            f"sticky-proxy route: no Gateway server listens on port {port} (ports: {listed})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    local = address_of(args.local) if args.local else ("127.0.0.1", port)
    if local is None:
        print(f"sticky-proxy route: --local {args.local!r} must look like IP:PORT", file=sys.stderr)
        return EXIT_CONFIG
    probe = Probe(
        args.host,
        args.path,
        args.method,
        headers=headers,
        cookies=cookies,
        query=queries,
        client=(args.client_ip, args.client_port),
        local=local,
    )
    explanation = explain(config, Router(config, port), probe)
    for label, text in explanation.as_lines():
        print(f"{label + ':':<16}{text}")
    return EXIT_NO_ROUTE if explanation.decision is None else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
