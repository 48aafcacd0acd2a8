"""``proxy.istio_lint``: each sticky-session pitfall warned once, with its fix, and only then."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from proxy_process import proxy_process
from tls_certs import CA

from proxy.istio import load_text
from proxy.istio_lint import header_problem


def gateway(tls: bool = False) -> str:
    server = (
        "port: {number: 443, name: https, protocol: HTTPS}\n"
        "    tls: {mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem}\n"
        if tls
        else "port: {number: 80, name: http, protocol: HTTP}\n"
    )
    return (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\n"
        f"spec:\n  servers:\n  - {server}    hosts: ['*']\n"
    )


def virtual_service(route: str, annotations: str = "{}") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: vs, annotations: {annotations}}}\n"
        "spec:\n  hosts: [app.test]\n  gateways: [gw]\n  http:\n  - route:\n"
        + textwrap.indent(textwrap.dedent(route).strip(), "    ")
        + "\n"
    )


ONE_ROUTE = "- destination: {host: svc, port: {number: 8080}}"


def rule(policy: str, subsets: str = "") -> str:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr}\n"
        "spec:\n  host: svc\n  trafficPolicy:\n"
        + textwrap.indent(textwrap.dedent(policy).strip(), "    ")
        + "\n"
    )
    if subsets:
        text += "  subsets:\n" + textwrap.indent(textwrap.dedent(subsets).strip(), "  ") + "\n"
    return text


def entry(addresses: int, resolution: str = "STATIC") -> str:
    endpoints = ", ".join(
        f"{{address: 10.0.0.{i + 1}, labels: {{version: v{i % 2 + 1}}}}}" for i in range(addresses)
    )
    listed = f"  endpoints: [{endpoints}]\n" if addresses else ""
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\n"
        "spec:\n  hosts: [svc.default.svc.cluster.local]\n"
        "  ports: [{number: 8080, name: http, protocol: HTTP}]\n"
        f"  resolution: {resolution}\n{listed}"
    )


def warnings(*docs: str) -> list[str]:
    return list(load_text("---\n".join(docs), "t.yaml").warnings)


def lint_of(*docs: str) -> list[str]:
    """The lint's lines: those that name a consistentHash, an outlierDetection or a split."""
    keys = ("consistentHash", "outlierDetection", "].route:", "Secure")
    return [w for w in warnings(*docs) if any(k in w for k in keys)]


COOKIE = "loadBalancer: {consistentHash: {httpCookie: {name: ID, %s}}}"
HASH = "t.yaml[3]: DestinationRule dr: spec.trafficPolicy.loadBalancer.consistentHash"


# --------------------------------------------------------------------------- the cookie's path


def test_a_generated_cookie_without_path_is_warned_with_the_fix() -> None:
    found = lint_of(gateway(), virtual_service(ONE_ROUTE), rule(COOKIE % "ttl: 1h"), entry(2))
    assert found == [
        f"{HASH}.httpCookie: cookie ID has no path: its Set-Cookie then has no Path (Istio sets "
        "none either), so a browser keeps it for the directory of the first request only (a "
        "first visit to /shop/cart/item sets it for /shop/cart) and other paths get another "
        "cookie, maybe another pod; add `path: /`"
    ]


@pytest.mark.parametrize(
    "fields",
    [
        "path: /, ttl: 1h",  # the fix
        "path: /, ttl: 0s",  # a session cookie
        "path: /, ttl: 0.5s",  # whole seconds: a session cookie too
        "path: /api",  # no ttl: the application sets the cookie, with its own Path
    ],
)
def test_a_cookie_with_a_path_or_not_generated_is_fine(fields: str) -> None:
    assert lint_of(gateway(), virtual_service(ONE_ROUTE), rule(COOKIE % fields), entry(2)) == []


# --------------------------------------------------------------------------- the cookie's ttl


def test_a_short_ttl_says_what_happens_when_it_expires() -> None:
    found = lint_of(
        gateway(), virtual_service(ONE_ROUTE), rule(COOKIE % "path: /, ttl: 60s"), entry(2)
    )
    assert found == [
        f"{HASH}.httpCookie.ttl: cookie ID expires 60s after it is set (it is set once, never "
        "refreshed): the next request then gets a new cookie, maybe another pod, and the "
        "session moves; if that is not meant, use a longer ttl (1h) or ttl 0s (a session "
        "cookie, kept until the browser closes)"
    ]


@pytest.mark.parametrize("ttl", ["5m", "300s", "24h", "0s"])
def test_a_ttl_of_five_minutes_or_more_or_zero_is_fine(ttl: str) -> None:
    policy = COOKIE % f"path: /, ttl: {ttl}"
    assert lint_of(gateway(), virtual_service(ONE_ROUTE), rule(policy), entry(2)) == []


def test_cookie_pitfalls_in_a_subset_port_level_name_its_path() -> None:
    subsets = """
    - name: v1
      labels: {version: v1}
      trafficPolicy:
        portLevelSettings:
        - port: {number: 8080}
          loadBalancer: {consistentHash: {httpCookie: {name: S, path: /, ttl: 10s}}}
    """
    found = lint_of(
        gateway(),
        virtual_service("- destination: {host: svc, subset: v1, port: {number: 8080}}"),
        rule("connectionPool: {tcp: {maxConnections: 10}}", subsets),
        entry(2),
    )
    assert [w.split(": ")[2] for w in found] == [
        "spec.subsets[0].trafficPolicy.portLevelSettings[0].loadBalancer.consistentHash"
        ".httpCookie.ttl"
    ]


# --------------------------------------------------------------------------- outlier detection


def outlier(fields: str = "") -> str:
    return "outlierDetection: {consecutive5xxErrors: 3%s}" % (f", {fields}" if fields else "")


def test_the_default_max_ejection_percent_never_ejects_from_few_static_endpoints() -> None:
    found = lint_of(gateway(), virtual_service(ONE_ROUTE), rule(outlier()), entry(3))
    assert found == [
        "t.yaml[3]: DestinationRule dr: spec.trafficPolicy.outlierDetection.maxEjectionPercent: "
        "maxEjectionPercent 10 (Envoy's default, Istio's when unset) never lets a pod of "
        "outbound|8080||svc.default.svc.cluster.local (3 endpoints) be ejected (Envoy ejects a "
        "pod only while 100 x (ejected + 1) / pods <= maxEjectionPercent), so a failing pod "
        "keeps its sessions and their errors; set maxEjectionPercent to at least 34, or 100"
    ]


@pytest.mark.parametrize(
    ("fields", "pods"),
    [
        ("maxEjectionPercent: 34", 3),  # 100 x 1/3 = 33.3 <= 34: one ejection allowed
        ("maxEjectionPercent: 100", 2),
        ("", 10),  # 100 x 1/10 = 10 <= 10
        ("", 1),  # one endpoint: nothing to eject to
        ("consecutive5xxErrors: 0", 3),  # every detector off (the key repeated is an error)
    ],
)
def test_outlier_detection_that_can_eject_is_fine(fields: str, pods: int) -> None:
    policy = (
        outlier(fields)
        if not fields.startswith("consecutive5xx")
        else "outlierDetection: {consecutive5xxErrors: 0}"
    )
    assert lint_of(gateway(), virtual_service(ONE_ROUTE), rule(policy), entry(pods)) == []


def test_with_dns_endpoints_the_warning_says_how_many_pods_it_needs() -> None:
    found = lint_of(
        gateway(),
        virtual_service(ONE_ROUTE),
        rule(outlier("maxEjectionPercent: 20")),
        entry(0, "DNS"),
    )
    assert found == [
        "t.yaml[3]: DestinationRule dr: spec.trafficPolicy.outlierDetection.maxEjectionPercent: "
        "maxEjectionPercent 20: outbound|8080||svc.default.svc.cluster.local (DNS) ejects no pod "
        "while it has fewer than 5 (Envoy ejects a pod only while 100 x (ejected + 1) / pods <= "
        "maxEjectionPercent), so a failing pod keeps its sessions and their errors; with N pods "
        "set at least 100 / N (rounded up), or 100"
    ]
    fine = rule(outlier("maxEjectionPercent: 50"))
    assert lint_of(gateway(), virtual_service(ONE_ROUTE), fine, entry(0, "DNS")) == []


# --------------------------------------------------------------------------- weighted splits

SPLIT = """
- destination: {host: svc, subset: v1, port: {number: 8080}}
  weight: 80
- destination: {host: svc, subset: v2, port: {number: 8080}}
  weight: 20
"""
SUBSETS = """
- {name: v1, labels: {version: v1}}
- {name: v2, labels: {version: v2}}
"""


def test_hashing_behind_a_weighted_split_suggests_sticky_weights() -> None:
    found = lint_of(
        gateway(), virtual_service(SPLIT), rule(COOKIE % "path: /, ttl: 1h", SUBSETS), entry(4)
    )
    assert found == [
        "t.yaml[2]: VirtualService vs: spec.http[0].route: consistent hashing behind a weighted "
        "split (svc.default.svc.cluster.local subset v1, svc.default.svc.cluster.local subset "
        "v2): Istio picks the destination at random for each request before hashing, so a "
        "session moves between them; annotate the VirtualService with sticky-proxy/sticky-"
        'weights: "true" to pick the destination by the request\'s hash too'
    ]


@pytest.mark.parametrize(
    ("route", "annotations", "policy"),
    [
        (SPLIT, "{sticky-proxy/sticky-weights: 'true'}", COOKIE % "path: /, ttl: 1h"),
        (SPLIT, "{}", "loadBalancer: {simple: ROUND_ROBIN}"),  # nothing to keep
        (  # weight 0: one destination really
            SPLIT.replace("weight: 80", "weight: 100").replace("weight: 20", "weight: 0"),
            "{}",
            COOKIE % "path: /, ttl: 1h",
        ),
    ],
)
def test_no_split_warning_when_fixed_or_not_hashing(
    route: str, annotations: str, policy: str
) -> None:
    docs = (gateway(), virtual_service(route, annotations), rule(policy, SUBSETS), entry(4))
    assert lint_of(*docs) == []


# --------------------------------------------------------------------------- hash header


def by_header(name: str) -> str:
    return "loadBalancer: {consistentHash: {httpHeaderName: '" + name + "'}}"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("Connection", "a hop-by-hop header"),
        ("upgrade", "a hop-by-hop header"),
        ("x-request-id", "a new one for every request"),
        ("X-Forwarded-Proto", "one pod for all in Envoy"),
        ("x-forwarded-for", "browsers send none"),
        (":path", "a pseudo-header"),
        ("x user", "not a valid header name"),
    ],
)
def test_a_hash_header_clients_cannot_send_is_warned(name: str, why: str) -> None:
    policy = by_header(name)
    (found,) = lint_of(gateway(), virtual_service(ONE_ROUTE), rule(policy), entry(2))
    assert found.startswith(f"{HASH}.httpHeaderName: {name.lower()}: ")
    assert why in found
    assert found.endswith(
        "; hash on a cookie (httpCookie) or a header your application sends on every request"
    )


@pytest.mark.parametrize("name", ["x-user", "Host", ":authority", "end-user", "x-session-id"])
def test_a_header_clients_send_is_fine(name: str) -> None:
    assert header_problem(name) is None
    policy = by_header(name)
    assert lint_of(gateway(), virtual_service(ONE_ROUTE), rule(policy), entry(2)) == []


# --------------------------------------------------------------------------- HTTPS: Secure


def https_warnings(cookie: str, tmp_path: Path) -> list[str]:
    leaf = CA(tmp_path).issue("app.test")
    gw = gateway(tls=True).replace("/c.pem", str(leaf.cert)).replace("/k.pem", str(leaf.key))
    return lint_of(gw, virtual_service(ONE_ROUTE), rule(cookie), entry(2))


def test_a_cookie_generated_on_https_without_secure_is_warned(tmp_path: Path) -> None:
    assert https_warnings(COOKIE % "path: /, ttl: 1h", tmp_path) == [
        "t.yaml[2]: VirtualService default/vs: the cookie ID its DestinationRule generates is "
        "served on HTTPS (Gateway default/gw server https port 443) without the Secure "
        "attribute (Istio adds none either); add `attributes: [{name: Secure}]` to httpCookie "
        "to keep it off plain HTTP"
    ]
    secure = COOKIE % "path: /, ttl: 1h, attributes: [{name: Secure}]"
    assert https_warnings(secure, tmp_path) == []
    assert https_warnings(COOKIE % "path: /", tmp_path) == []  # not generated here


# --------------------------------------------------------------------------- printed once


def test_check_prints_each_lint_warning_once(tmp_path: Path) -> None:
    """Config.warnings holds it once, so check, run and a reload print it once each."""
    docs = (gateway(), virtual_service(ONE_ROUTE), rule(COOKIE % "ttl: 1h"), entry(2))
    assert sum("add `path: /`" in w for w in warnings(*docs)) == 1
    (tmp_path / "all.yaml").write_text("---\n".join(docs))
    check = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0
    assert check.stderr.count("add `path: /`") == 1


@pytest.mark.timeout(60)
async def test_run_prints_each_lint_warning_once_at_start(tmp_path: Path) -> None:
    docs = (gateway(), virtual_service(ONE_ROUTE), rule(COOKIE % "ttl: 1h"), entry(2))
    (tmp_path / "all.yaml").write_text("---\n".join(docs))
    args = ("--listen", "127.0.0.1:0", "--admin-port", "off", "--readiness-port", "off")
    async with proxy_process(str(tmp_path), *args, "--metrics-port", "off") as proxy:
        await proxy.port("")
        proxy.signal(signal.SIGTERM)
        assert await proxy.exit_code() == 0
    assert sum("add `path: /`" in line for line in proxy.lines) == 1
