"""``sticky-proxy demo``: the article's Istio YAML served in front of demo pods, with Istio's ports.

It loads the article's Gateway, VirtualService and DestinationRule from ``proxy/demo.yaml``
(package data, so the demo runs from an installed wheel or the container image, not only from a
checkout), adds a ServiceEntry naming the demo pods it started (``proxy.demo.PodSet``), and runs
the proxy with the readiness, metrics and admin ports. Every port has an option; one left at its
default moves to a free port when that one is taken, so a second demo, a test run or a benchmark
on the usual ports does not stop it. The banner prints where everything is and what to try.

This module imports aiohttp only when the demo runs: ``proxy.__main__`` imports it for the
``demo`` flags, and the container's health check imports ``proxy.__main__``.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence
from importlib import resources

from proxy.config import ConfigError

DEMO_YAML = "demo.yaml"
# (what, flag, the port Istio's ingress gateway uses)
OPERATING_PORTS = (
    ("readiness", "--readiness-port", 15021),
    ("metrics", "--metrics-port", 15090),
    ("admin", "--admin-port", 15000),
)


def add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``demo`` subcommand's flags (``sticky-proxy demo --help``)."""
    demo = sub.add_parser(
        "demo",
        help="start demo pods and the proxy (the article's YAML) on 127.0.0.1:8080",
        description="Start demo pods and the proxy serving the article's Istio YAML, with "
        "Istio's operating ports. A port left at its default moves to a free one when it is "
        "taken; a port given must be free; 0 picks a free one.",
    )
    demo.add_argument("--port", type=int, default=8080, help="proxy port (8080)")
    demo.add_argument(
        "--address",
        default="127.0.0.1",
        help="where the proxy and its operating ports listen (127.0.0.1; 0.0.0.0 in a container)",
    )
    demo.add_argument("--pods", type=int, default=3, help="demo pods to start (3)")
    demo.add_argument(
        "--pod-port",
        type=int,
        default=None,
        metavar="PORT",
        help="the first pod's port, the others follow (9001; 0 picks free ones)",
    )
    for name, flag, default in OPERATING_PORTS:
        demo.add_argument(
            flag, default=None, metavar="PORT|off", help=f"the {name} port ({default})"
        )


def demo_yaml(pods: Sequence[tuple[str, int]]) -> str:
    """The article's YAML plus a ServiceEntry whose static endpoints are ``pods``."""
    article = resources.files("proxy").joinpath(DEMO_YAML).read_text(encoding="utf-8")
    endpoints = "".join(f"  - address: {h}\n    ports:\n      http: {p}\n" for h, p in pods)
    return (
        article
        + "\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        + "metadata:\n  name: test2-bwce-srv\nspec:\n"
        + "  hosts:\n  - test2-bwce-srv.default.svc.cluster.local\n"
        + "  ports:\n  - number: 8080\n    name: http\n    protocol: HTTP\n"
        + f"  resolution: STATIC\n  endpoints:\n{endpoints}"
    )


def port_or_free(host: str, port: int) -> int:
    """``port`` when it can be bound on ``host`` now, else 0 (a free one, chosen at bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return 0
    return port


def _operating_port(text: str | None, flag: str, host: str, default: int) -> int | None:
    if text is None:
        return port_or_free(host, default)
    if text == "off":
        return None
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"{flag} must be a port number (0 picks a free one) or off: {text!r}")
    return int(text)


def _pod_ports(first: int | None, count: int) -> list[int]:
    if first is None:
        wanted = [9001 + i for i in range(count)]
        if all(port_or_free("127.0.0.1", p) for p in wanted):
            return wanted
        return [0] * count
    if first == 0:
        return [0] * count
    return [first + i for i in range(count)]


async def _show(url: str) -> list[str]:
    """Three requests as a browser would make them: the cookie arrives, then sticks."""
    import aiohttp

    lines: list[str] = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        for i in range(3):
            async with session.get(url, headers={"Host": "test.com"}) as resp:
                body = await resp.json()
                cookie = resp.headers.get("Set-Cookie", "-")
                lines.append(
                    f"  request {i + 1}: {resp.status} from {body['pod']}, set-cookie: {cookie}"
                )
    return lines


def _url(address: tuple[str, int], path: str = "/") -> str:
    host, port = address
    host = "127.0.0.1" if host == "0.0.0.0" else host
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


async def run_demo(args: argparse.Namespace) -> int:
    """``sticky-proxy demo``: demo pods, the proxy in front of them, its operating ports."""
    from proxy.demo import PodSet
    from proxy.istio import load_text
    from proxy.server import Proxy, RunOptions

    host = args.address
    try:
        if args.pods < 1:
            raise ValueError(f"--pods must be at least 1: {args.pods}")
        pod_ports = _pod_ports(args.pod_port, args.pods)
        for flag, port in (("--port", args.port), *(("--pod-port", p) for p in pod_ports)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{flag}: {port} is not a port number (0 picks a free one)")
        ops = {
            name: _operating_port(getattr(args, flag[2:].replace("-", "_")), flag, host, default)
            for name, flag, default in OPERATING_PORTS
        }
        pods = PodSet(args.pods, ports=pod_ports)
    except ValueError as exc:
        print(f"sticky-proxy demo: {exc}")
        return 2
    try:
        await pods.__aenter__()
    except OSError as exc:
        print(f"sticky-proxy demo: cannot start the demo pods: {exc}")
        return 1
    try:
        try:
            config = load_text(demo_yaml(pods.addresses), f"proxy/{DEMO_YAML} + the demo pods")
        except ConfigError as exc:
            print("\n".join(["sticky-proxy demo:", *exc.errors]))
            return 1
        bind = {name: (host, port) for name, port in ops.items() if port is not None}
        options = RunOptions(
            listen=((host, args.port),),
            drain_time=0,
            readiness=bind.get("readiness"),
            metrics=bind.get("metrics"),
            admin=bind.get("admin"),
        )
        proxy = Proxy(config, options)
        try:
            await proxy.start()
        except OSError as exc:
            print(f"sticky-proxy demo: cannot listen: {exc}")
            await proxy.stop(grace=0)
            return 1
        proxy.handle_signals()
        url = _url(proxy.addresses[0])
        print(f"\nsticky-proxy demo: the proxy on {url} serves the article's Gateway,")
        print("VirtualService and DestinationRule, with a ServiceEntry for its demo pods:")
        for name, (pod_host, pod_port) in zip(pods.names, pods.addresses, strict=True):
            print(f"  {name} on {pod_host}:{pod_port}")
        paths = {"readiness": "/healthz/ready", "metrics": "/stats/prometheus", "admin": "/"}
        print("Operating ports, as on Istio's ingress gateway:")
        for name, _, default in OPERATING_PORTS:
            if name in proxy.ports:
                moved = f" ({default} was taken)" if proxy.ports[name][1] != default else ""
                print(f"  {name:<10} {_url(proxy.ports[name], paths[name])}{moved}")
        print("A first visit gets the ISTIOID cookie; later visits carrying it stay on one pod:")
        for line in await _show(url):
            print(line)
        print("\nTry it yourself (the cookie jar keeps the session; delete it for a new one):")
        print(f"  curl -s -H 'Host: test.com' -c /tmp/sticky.jar -b /tmp/sticky.jar {url}")
        print(f"  curl -si -H 'Host: test.com' {url}     # a new visitor: Set-Cookie")
        print(f"  curl -s -H 'Host: test.com' -H 'Cookie: ISTIOID=alice' {url}")
        if "admin" in proxy.ports:
            route = _url(proxy.ports["admin"], "/route?host=test.com&cookie=ISTIOID=alice")
            print(f"  curl -s '{route}'   # which pod, and why")
        if "metrics" in proxy.ports:
            metrics = _url(proxy.ports["metrics"], "/stats/prometheus")
            print(f"  curl -s {metrics} | grep istio_requests_total")
        print("Ctrl-C stops everything.\n", flush=True)
        await proxy.run_until_signalled()
    finally:
        await pods.close()
    return 0
