"""``sticky-proxy check`` and ``sticky-proxy route`` on real files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import xxhash

from proxy.__main__ import main
from proxy.hashing import RingHash, xxh64

CONFIG = Path(__file__).resolve().parent.parent / "config"
ENDPOINTS = ("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")
# proxy.istio_lint's advice on the article's cookie (no path, ttl 60s): printed by every command.
ARTICLE_LINT = f"warning: {CONFIG / 'sticky.yaml'}[3]: DestinationRule default-sticky-dr: "


def without_lint(err: str) -> str:
    """``err`` less the article's lint warnings."""
    return "".join(line for line in err.splitlines(True) if not line.startswith(ARTICLE_LINT))


def lines(text: str) -> dict[str, str]:
    """``label: value`` lines of the route report as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        label, _, value = line.partition(":")
        out[label] = value.strip()
    return out


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# --------------------------------------------------------------------------- check


def test_check_accepts_the_article_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(CONFIG)]) == 0
    out, err = capsys.readouterr()
    assert out == (
        "ok: 2 file(s), listeners on port(s) 80, 1 VirtualService(s), 1 cluster(s)\n"
        "serves: port 80 (HTTP) host test.com -> default/test-vs\n"
    )
    assert [line.split(": ")[3] for line in err.splitlines()] == [
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie",
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
    ]
    assert without_lint(err) == ""


def test_check_reports_every_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = (CONFIG / "sticky.yaml").read_text().replace("ttl: 60s", "tll: 60s")
    bad = bad.replace("prefix: /", "prefx: /")
    path = write(tmp_path, "sticky.yaml", bad)
    assert main(["check", path, str(CONFIG / "serviceentry.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}[2]: VirtualService test-vs: spec.http[0].match[0].uri.prefx: unknown field "
        "(did you mean prefix?)",
        f"{path}[3]: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer."
        "consistentHash.httpCookie.tll: unknown field (did you mean ttl?)",
        "2 errors",
    ]


def test_check_prints_warnings_and_still_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = write(
        tmp_path,
        "k8s.yaml",
        """
        apiVersion: v1
        kind: Service
        metadata: {name: test2-bwce-srv}
        spec: {clusterIP: None, ports: [{port: 8080}]}
        """,
    )
    assert main(["check", str(CONFIG), extra]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: 3 file(s)")
    assert without_lint(err) == (
        f"warning: {extra}: Service test2-bwce-srv: metadata.name: host "
        "test2-bwce-srv.default.svc.cluster.local is also defined by ServiceEntry "
        f"default/test2-bwce-srv ({CONFIG / 'serviceentry.yaml'}): the ServiceEntry's ports "
        "and endpoints are used (Istio, which sees the pods, would use this Service's)\n"
    )


# --------------------------------------------------------------------------- route


def istio_ring() -> RingHash:
    """Istio's default ring (1024 entries minimum) over the article's three replicas."""
    return RingHash(dict.fromkeys(ENDPOINTS, 1), minimum_ring_size=1024)


@pytest.mark.parametrize("cookie", ["abc", "session-1", "session-2", "session-3", "x" * 40])
def test_route_with_a_cookie_names_the_endpoint_hashing_predicts(
    cookie: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["route", str(CONFIG), "--host", "test.com", "--cookie", f"ISTIOID={cookie}"]) == 0
    report = lines(capsys.readouterr().out)
    assert report["VirtualService"] == f"default/test-vs ({CONFIG}/sticky.yaml[2])"
    assert report["route"] == "http[0] match[0]"
    assert report["cluster"] == "outbound|8080||test2-bwce-srv.default.svc.cluster.local"
    assert report["load balancer"] == "RING_HASH (minimum ring size 1024)"
    assert report["hash policy"] == "cookie ISTIOID, ttl 60s"
    assert report["hash key"] == f"0x{xxh64(cookie):016x}"
    assert report["set-cookie"] == "none (the request carries it)"
    assert report["endpoints"] == " ".join(ENDPOINTS)
    assert report["endpoint"] == istio_ring().pick(xxh64(cookie))


def test_route_cookies_reach_every_replica(capsys: pytest.CaptureFixture[str]) -> None:
    seen = set()
    for i in range(40):
        main(["route", str(CONFIG), "--host", "test.com", "--cookie", f"ISTIOID=s{i}"])
        seen.add(lines(capsys.readouterr().out)["endpoint"])
    assert seen == set(ENDPOINTS)


def test_route_without_a_cookie_shows_the_cookie_envoy_would_issue(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["route", str(CONFIG), "--host", "test.com:80", "--path", "/api?x=1"]) == 0
    report = lines(capsys.readouterr().out)
    # Envoy: hex(xxh64(remote "ip:port" + local "ip:port")), computed here independently
    value = f"{xxhash.xxh64_intdigest(b'127.0.0.1:54321127.0.0.1:80'):016x}"
    assert report["connection"] == "client 127.0.0.1:54321 -> proxy 127.0.0.1:80"
    assert report["request"] == "GET http://test.com:80/api?x=1"
    assert report["upstream"] == "GET /api?x=1 (Host: test.com:80)"
    assert report["set-cookie"] == f'ISTIOID="{value}"; Max-Age=60; HttpOnly'
    assert report["hash key"] == f"0x{xxh64(value):016x}"
    assert report["endpoint"] == istio_ring().pick(xxh64(value))
    # another client port, another cookie
    main(
        [
            "route",
            str(CONFIG),
            "--host",
            "test.com",
            "--client-ip",
            "10.0.0.1",
            "--client-port",
            "54321",
            "--local",
            "10.0.0.2:8080",
        ]
    )
    report = lines(capsys.readouterr().out)
    assert report["set-cookie"] == 'ISTIOID="d5bede35465dd05f"; Max-Age=60; HttpOnly'


def test_route_without_a_match_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", str(CONFIG), "--host", "unknown.test"]) == 1
    report = lines(capsys.readouterr().out)
    assert report["route"] == "none: the proxy answers 404 (no route; virtual hosts: test.com)"


def test_route_argument_and_config_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["route", str(CONFIG), "--host", "test.com", "--port", "8080"]) == 2
    assert without_lint(capsys.readouterr().err) == (
        "sticky-proxy route: no Gateway server listens on port 8080 (ports: 80)\n"
    )
    assert main(["route", str(CONFIG), "--host", "test.com", "--header", "no-colon"]) == 2
    assert without_lint(capsys.readouterr().err) == (
        "sticky-proxy route: --header 'no-colon' must look like NAME:VALUE\n"
    )
    bad = write(tmp_path, "bad.yaml", "kind: Gateway\n")
    assert main(["route", bad, "--host", "test.com"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{bad}: Gateway: apiVersion: required (networking.istio.io/v1, v1beta1 or v1alpha3)",
        f"{bad}: Gateway: metadata: required",
        f"{bad}: Gateway: spec: required",
        "3 errors",
    ]


def _extra_config(tmp_path: Path) -> str:
    return write(
        tmp_path,
        "more.yaml",
        """
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: alt}
        spec:
          servers:
          - port: {number: 8080, name: http, protocol: HTTP}
            hosts: ["*"]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: alt}
        spec:
          hosts: ["*"]
          gateways: [alt]
          http:
          - match: [{uri: {prefix: /old}}]
            redirect: {uri: /new}
          - match: [{headers: {x-user: {}}}]
            route: [{destination: {host: users.example.com, port: {number: 80}}}]
          - route: [{destination: {host: ip.local, port: {number: 80}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: users}
        spec:
          host: users.example.com
          trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: ip}
        spec:
          host: ip.local
          trafficPolicy:
            loadBalancer:
              consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ip}
        spec:
          hosts: [ip.local]
          ports: [{number: 80, name: http}]
          resolution: STATIC
          endpoints: [{address: 10.0.0.1}, {address: 10.0.0.2, weight: 3}]
        """,
    )


def test_route_other_policies_redirects_and_dns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    more = _extra_config(tmp_path)
    assert main(["route", str(CONFIG), more, "--host", "test.com"]) == 2
    assert without_lint(capsys.readouterr().err) == (
        "sticky-proxy route: choose a Gateway port with --port (ports: 80, 8080)\n"
    )

    args = ["route", str(CONFIG), more, "--port", "8080", "--host", "x.test"]
    assert main([*args, "--path", "/old/a?q=1"]) == 0
    assert lines(capsys.readouterr().out)["reply"] == "redirect 301 -> http://x.test/new?q=1"

    assert main([*args, "--header", "X-User: bob"]) == 0
    report = lines(capsys.readouterr().out)
    assert report["hash policy"] == "header x-user"
    assert report["hash key"] == f"0x{xxh64('bob'):016x}"
    assert report["endpoints"] == (
        "DNS users.example.com:80 (resolved at run time; no endpoint picked)"
    )

    assert main([*args, "--client-ip", "192.0.2.7"]) == 0
    report = lines(capsys.readouterr().out)
    assert report["load balancer"] == "MAGLEV (table size 65537)"
    assert report["hash key"] == f"0x{xxh64('192.0.2.7'):016x}"
    assert report["endpoints"] == "10.0.0.1:80 10.0.0.2:80 (weight 3)"
    assert report["endpoint"] in ("10.0.0.1:80", "10.0.0.2:80")


def test_route_least_request_cluster_names_no_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_dr = write(
        tmp_path,
        "sticky.yaml",
        (CONFIG / "sticky.yaml")
        .read_text()
        .split("---\napiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule")[0],
    )
    assert main(["route", no_dr, str(CONFIG / "serviceentry.yaml"), "--host", "test.com"]) == 0
    report = lines(capsys.readouterr().out)
    assert report["load balancer"] == "LEAST_REQUEST"
    assert report["hash policy"] == "none"
    assert report["endpoint"] == "chosen per request by LEAST_REQUEST (not by a hash)"
