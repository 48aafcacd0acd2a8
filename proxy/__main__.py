"""Command line: ``sticky-proxy run | demo | check | route``.

``check`` validates Istio YAML the way the proxy loads it (exit 0, or 2 with every error).
``route`` answers, offline, the question Istio users cannot ask Envoy: *where would this request
go?*  It runs the proxy's own code - ``proxy.istio`` to load, ``proxy.routing.Router`` to route,
``proxy.affinity.Affinity`` to hash (and invent the cookie), ``proxy.cluster.build_balancer`` to
pick - so its answer is the running proxy's answer for the same endpoints.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import urlencode

from proxy import __version__
from proxy.config import ClusterSpec, Config, ConfigError, StaticEndpoints, load_config
from proxy.demo_command import add_demo_parser
from proxy.flags import LISTEN_ENV, env_listen, istio_duration, seconds

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

    route = sub.add_parser(
        "route",
        help="show where a request would go: route, cluster, hash key, cookie, endpoint",
        description="Route one request offline through the proxy's own routing and hashing "
        "code. Exit 0 when a route matches, 1 when none does (the proxy would answer 404), "
        "2 when the configuration or the arguments are wrong.",
    )
    route.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or folder")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args, parser)
    if args.command == "demo":
        from proxy.demo_command import run_demo

        _setup_logging(args.log_level if "log_level" in args else "info")
        return _run_loop(run_demo(args))
    if args.command == "check":
        return _check(args.paths)
    if args.command == "route":
        return _route(args)
    parser.print_help()
    return 2


# --------------------------------------------------------------------------- run


_RUN_PARSER: list[argparse.ArgumentParser] = []  # for the workers' command lines


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="serve Istio YAML (files or folders), or quick mode with --upstream",
        description="Serve the Gateways, VirtualServices, DestinationRules and ServiceEntries in "
        "PATH... (files or folders). Quick mode, without YAML: --upstream HOST:PORT (repeat) "
        "with --cookie/--ttl (default ISTIOID, 60s) or --header/--query/--source-ip.",
    )
    run.add_argument("paths", nargs="*", metavar="PATH", help="YAML file or folder")
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
    _RUN_PARSER[:] = [run]


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


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
        loaded = _load(args.paths)
        if loaded is None:
            return EXIT_CONFIG
        config = loaded
    _setup_logging(args.log_level)
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
            command=functools.partial(_worker_command, args),
        )
        return _run_loop(supervisor.run())
    worker = args.worker
    if worker is not None:
        from proxy.workers import die_with_parent

        die_with_parent()
    options = RunOptions(
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


def _worker_command(
    args: argparse.Namespace,
    index: int,
    listen: Sequence[tuple[str, int]],
    admin_port: int | None,
    ready_fd: int,
) -> list[str]:
    """The ``run`` command line of worker ``index``: the user's flags, with the supervisor's
    resolved listen addresses, the admin port on worker 0 only, no readiness/metrics ports."""
    override = {
        "listen": [f"{h}:{p}" for h, p in listen],
        "workers": "1",
        "worker": str(index),
        "ready_fd": str(ready_fd),
        "admin_port": str(admin_port) if index == 0 and admin_port is not None else "off",
        "readiness_port": "off",
        "metrics_port": "off",
    }
    argv = ["run"]
    for action in _RUN_PARSER[0]._actions:
        if action.dest == "help":
            continue
        value = override.get(action.dest, getattr(args, action.dest, None))
        if not action.option_strings:
            argv.extend(value or [])
        elif isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(action.option_strings[0])
        elif isinstance(action, argparse._AppendAction):
            for item in value or []:
                argv += [action.option_strings[0], str(item)]
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


# --------------------------------------------------------------------------- check


def _load(paths: Sequence[str]) -> Config | None:
    try:
        config = load_config(paths)
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


def _check(paths: Sequence[str]) -> int:
    config = _load(paths)
    if config is None:
        return EXIT_CONFIG
    ports = ", ".join(str(listener.port) for listener in config.listeners) or "none"
    print(
        f"ok: {len(config.sources)} file(s), listeners on port(s) {ports}, "
        f"{len(config.virtual_services)} VirtualService(s), {len(config.clusters)} cluster(s)"
    )
    return EXIT_OK


# --------------------------------------------------------------------------- route


def _pairs(values: Sequence[str], sep: str, what: str) -> list[tuple[str, str]] | None:
    out: list[tuple[str, str]] = []
    for value in values:
        key, found, rest = value.partition(sep)
        if not found or not key.strip():
            print(
                f"sticky-proxy route: {what} {value!r} must look like NAME{sep}VALUE",
                file=sys.stderr,
            )
            return None
        out.append((key.strip(), rest.strip() if sep == ":" else rest))
    return out


def _address(text: str) -> tuple[str, int] | None:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _route(args: argparse.Namespace) -> int:
    from proxy.routing import Router

    config = _load(args.paths)
    if config is None:
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
    listener = config.listener(port)
    if listener is None:
        listed = ", ".join(map(str, ports)) or "none"
        print(
            f"sticky-proxy route: no Gateway server listens on port {port} (ports: {listed})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    local = _address(args.local) if args.local else ("127.0.0.1", port)
    if local is None:
        print(f"sticky-proxy route: --local {args.local!r} must look like IP:PORT", file=sys.stderr)
        return EXIT_CONFIG
    remote = (args.client_ip, args.client_port)

    target = args.path if args.path.startswith("/") else "/" + args.path
    if queries:
        target += ("&" if "?" in target else "?") + urlencode(queries, safe="/:@,")
    raw_headers: list[tuple[str, str]] = [("host", args.host), *headers]
    if cookies:
        raw_headers.append(("cookie", "; ".join(f"{n}={v}" for n, v in cookies)))
    header_map: dict[str, str] = {}
    for name, value in raw_headers:
        key = name.lower()
        header_map[key] = f"{header_map[key]},{value}" if key in header_map else value
    query_map: dict[str, str] = {}
    _, _, raw_query = target.partition("?")
    for pair in raw_query.split("&") if raw_query else ():
        name, _, value = pair.partition("=")
        query_map.setdefault(name, value)

    router = Router(config, port)
    out = _Printer()
    out.line("listener", f"{listener.bind}:{port} (Gateway {', '.join(listener.gateways)})")
    out.line("request", f"{args.method} http://{args.host}{target}")
    out.line("connection", f"client {_fmt(remote)} -> proxy {_fmt(local)}")
    decision = router.match(args.host, target, args.method, header_map, query_map)
    if decision is None:
        vhosts = ", ".join(router.vhosts) or "none"
        out.line("route", f"none: the proxy answers 404 (no route; virtual hosts: {vhosts})")
        return EXIT_NO_ROUTE
    action = decision.action
    out.line("virtual host", decision.vhost)
    if action.virtual_service:
        source = next(
            (vs.source for vs in config.virtual_services if vs.key == action.virtual_service), ""
        )
        out.line("VirtualService", f"{action.virtual_service} ({source})")
        match = f" match[{action.match_index}]" if action.match_index is not None else ""
        name = f" name {action.route_name!r}" if action.route_name else ""
        out.line("route", f"http[{action.route_index}]{match}{name}")
    reply = decision.local_reply
    if reply is not None:
        what = "redirect" if action.redirect is not None else "direct response"
        extra = f" -> {decision.location}" if decision.location else ""
        body = f" body {reply.body[:60]!r}" if reply.body else ""
        out.line("reply", f"{what} {reply.status}{extra}{body}")
        return EXIT_OK
    assert decision.cluster is not None
    upstream = decision.path
    host = (decision.authority or args.host.encode()).decode("latin-1")
    out.line("cluster", decision.cluster)
    out.line("upstream", f"{args.method} {upstream} (Host: {host})")
    edits = _edits("request headers", decision.request_headers)
    if edits:
        out.line("headers", edits)
    out.line("timeout", f"{decision.timeout:g}s" if decision.timeout is not None else "none")
    retries = decision.retries
    out.line(
        "retries",
        f"{retries.attempts} on {','.join(retries.retry_on)}"
        if retries is not None
        else "disabled",
    )
    spec = config.clusters.get(decision.cluster)
    if spec is None:
        out.line("endpoints", "none: the cluster does not exist (the proxy answers 503)")
        return EXIT_OK
    return _pick(out, spec, decision.action.affinity, raw_headers, target, remote, local)


def _pick(
    out: _Printer,
    spec: ClusterSpec,
    affinity: object,
    raw_headers: list[tuple[str, str]],
    target: str,
    remote: tuple[str, int],
    local: tuple[str, int],
) -> int:
    from proxy.affinity import Affinity, set_cookie_value
    from proxy.cluster import build_balancer

    out.line("load balancer", spec.lb.describe)
    hash_: int | None = None
    if isinstance(affinity, Affinity):
        out.line("hash policy", "; ".join(_policy(p) for p in affinity.policies))
        wire = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in raw_headers]
        hash_, generated = affinity.compute(wire, target.encode("latin-1"), remote, local)
        out.line(
            "hash key",
            f"0x{hash_:016x}"
            if hash_ is not None
            else "none: no policy found its key, the pick is random",
        )
        policy = affinity.cookie_policy
        if generated is not None and policy is not None:
            out.line("set-cookie", set_cookie_value(policy, generated))
        elif policy is not None:
            reason = "the request carries it" if policy.ttl is not None else "no ttl: read only"
            out.line("set-cookie", f"none ({reason})")
    else:
        out.line("hash policy", "none")
    endpoints = spec.endpoints
    if not isinstance(endpoints, StaticEndpoints):
        names = " ".join(t.key for t in endpoints.targets) or "none"
        out.line("endpoints", f"DNS {names} (resolved at run time; no endpoint picked)")
        return EXIT_OK
    if not endpoints.endpoints:
        out.line("endpoints", "none: the proxy answers 503 no healthy upstream")
        return EXIT_OK
    out.line(
        "endpoints",
        " ".join(
            ep.key + (f" (weight {ep.weight})" if ep.weight != 1 else "")
            for ep in endpoints.endpoints
        ),
    )
    if spec.lb.consistent_hash is None:
        out.line("endpoint", f"chosen per request by {spec.lb.describe} (not by a hash)")
        return EXIT_OK
    if hash_ is None:
        out.line("endpoint", "random (no hash key)")
        return EXIT_OK
    balancer = build_balancer(spec.lb, endpoints.endpoints)
    out.line("endpoint", balancer.pick(hash_))
    return EXIT_OK


def _policy(policy: object) -> str:
    from proxy.affinity import CookiePolicy, HeaderPolicy, QueryParameterPolicy

    if isinstance(policy, CookiePolicy):
        parts = [f"cookie {policy.name}"]
        parts.append(f"ttl {policy.ttl}s" if policy.ttl is not None else "no ttl (read only)")
        if policy.path:
            parts.append(f"path {policy.path}")
        parts.extend(f"{a.name}={a.value}" if a.value else a.name for a in policy.attributes)
        return ", ".join(parts)
    if isinstance(policy, HeaderPolicy):
        return f"header {policy.name}"
    if isinstance(policy, QueryParameterPolicy):
        return f"query parameter {policy.name}"
    return "source IP"


def _edits(label: str, edit: object) -> str:
    from proxy.http1 import HeaderEdit

    if not isinstance(edit, HeaderEdit):
        return ""
    parts = [f"-{n.decode()}" for n in sorted(edit.remove)]
    parts += [f"{n.decode()}={v.decode()}" for n, v in edit.set]
    parts += [f"+{n.decode()}={v.decode()}" for n, v in edit.add]
    return " ".join(parts)


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Printer:
    def line(self, label: str, text: str) -> None:
        print(f"{label + ':':<16}{text}")


if __name__ == "__main__":
    sys.exit(main())
