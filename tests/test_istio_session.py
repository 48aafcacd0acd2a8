"""Reading the labels and annotations of sessions that survive change (``proxy.istio_session``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, SessionSpec
from proxy.istio import load_text
from proxy.routing import Router

GW = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
"""


def config(labels: str = "{}", annotations: str = "{}", dr: str = "", vs: str = "{}") -> str:
    rule = (
        f"---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: dr, annotations: {dr}}}\nspec:\n  host: app.local\n"
        "  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n"
        "  subsets: [{name: v1, labels: {v: '1'}}, {name: v2, labels: {v: '2'}}]\n"
        if dr
        else ""
    )
    return f"""{GW}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs, annotations: {vs}}}
spec:
  hosts: [app.test]
  gateways: [gw]
  http: [{{route: [{{destination: {{host: app.local, port: {{number: 80}}}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: app, labels: {labels}, annotations: {annotations}}}
spec:
  hosts: [app.local]
  ports: [{{number: 80, name: http}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: 9001}}, labels: {{v: '1'}}}}]
{rule}"""


def session_of(text: str) -> SessionSpec | None:
    return load_text(text, "t.yaml").clusters["outbound|80||app.local"].session


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(text, "t.yaml")
    return list(info.value.errors)


def test_no_label_no_session() -> None:
    assert session_of(config()) is None


def test_cookie_label_as_istio_reads_it() -> None:
    assert session_of(config("{istio.io/persistent-session: sticky}")) == SessionSpec(
        "cookie", "sticky", "/", source="ServiceEntry default/app"
    )
    with_path = session_of(config("{istio.io/persistent-session: 'sticky:/app'}"))
    assert with_path is not None and (with_path.name, with_path.path) == ("sticky", "/app")


def test_the_cookie_label_wins_over_the_header_label() -> None:
    both = "{istio.io/persistent-session: c, istio.io/persistent-session-header: x-s}"
    assert session_of(config(both)) == SessionSpec(
        "cookie", "c", "/", source="ServiceEntry default/app"
    )
    header = session_of(config("{istio.io/persistent-session-header: X-Session}"))
    assert header == SessionSpec("header", "x-session", "", source="ServiceEntry default/app")


def test_sticky_proxy_annotations_beside_the_label(tmp_path: Path) -> None:
    key = tmp_path / "session.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    annotations = (
        "{sticky-proxy/persistent-session-strict: 'true', sticky-proxy/session-drain: 1m30s, "
        "sticky-proxy/persistent-session-ttl: 1h, "
        f"sticky-proxy/persistent-session-key-file: {key}}}"
    )
    session = session_of(config("{istio.io/persistent-session: s}", annotations))
    assert session is not None
    assert (session.strict, session.drain, session.ttl) == (True, 90.0, 3600)
    assert session.key == b"0123456789abcdef0123456789abcdef"  # the newline is not the key's
    assert "0123" not in repr(session)  # never printed


@pytest.mark.parametrize(
    ("labels", "annotations", "message"),
    [
        (
            "{}",
            "{sticky-proxy/session-drain: 30s}",
            "t.yaml[3]: ServiceEntry app: metadata.annotations.sticky-proxy/session-drain: "
            "needs the label istio.io/persistent-session (or istio.io/persistent-session-header) "
            "on the same ServiceEntry",
        ),
        (
            "{istio.io/persistent-session: s}",
            "{sticky-proxy/session-drain: soon}",
            "metadata.annotations.sticky-proxy/session-drain: invalid duration 'soon'",
        ),
        (
            "{istio.io/persistent-session: s}",
            "{sticky-proxy/persistent-session-strict: 'yes'}",
            'metadata.annotations.sticky-proxy/persistent-session-strict: expected "true" or '
            "\"false\", got 'yes'",
        ),
        (
            "{istio.io/persistent-session: s}",
            "{sticky-proxy/persistent-session-ttl: 1.5s}",
            "metadata.annotations.sticky-proxy/persistent-session-ttl: must be whole seconds",
        ),
        (
            "{istio.io/persistent-session: s}",
            "{sticky-proxy/persistent-session-key-file: /nonexistent/key}",
            "metadata.annotations.sticky-proxy/persistent-session-key-file: cannot read the key "
            "file '/nonexistent/key'",
        ),
        (
            "{istio.io/persistent-session: ':/x'}",
            "{}",
            "metadata.labels.istio.io/persistent-session: invalid cookie name ''",
        ),
        (
            "{istio.io/persistent-session: 's:x'}",
            "{}",
            "metadata.labels.istio.io/persistent-session: the cookie path must start with '/'",
        ),
    ],
)
def test_bad_values_name_the_resource_and_path(labels: str, annotations: str, message: str) -> None:
    found = errors(config(labels, annotations))
    assert any(message in line for line in found), found


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "short.key"
    key.write_bytes(b"short")
    annotations = f"{{sticky-proxy/persistent-session-key-file: {key}}}"
    found = errors(config("{istio.io/persistent-session: s}", annotations))
    assert any("must hold 16 to 4096 bytes (got 5)" in line for line in found), found


def test_hash_balance_factor_on_the_destination_rule() -> None:
    loaded = load_text(config(dr="{sticky-proxy/hash-balance-factor: '150'}"), "t.yaml")
    for name in ("outbound|80||app.local", "outbound|80|v1|app.local"):
        ch = loaded.clusters[name].lb.consistent_hash
        assert ch is not None and ch.hash_balance_factor == 150
    found = errors(config(dr="{sticky-proxy/hash-balance-factor: '99'}"))
    assert any("expected a whole percentage from 100 to 100000" in line for line in found)


def test_hash_balance_factor_without_consistent_hash_is_warned() -> None:
    text = config().replace("endpoints:", "endpoints:") + (
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: dr, annotations: {sticky-proxy/hash-balance-factor: '125'}}\n"
        "spec: {host: app.local}\n"
    )
    loaded = load_text(text, "t.yaml")
    assert any("ignored for a LEAST_REQUEST load balancer" in w for w in loaded.warnings)


def test_sticky_weights_on_the_virtual_service() -> None:
    text = config(vs="{sticky-proxy/sticky-weights: 'true'}", dr="{}").replace(
        "http: [{route: [{destination: {host: app.local, port: {number: 80}}}]}]",
        "http: [{route: [{destination: {host: app.local, subset: v1, port: {number: 80}}, "
        "weight: 30}, {destination: {host: app.local, subset: v2, port: {number: 80}}, "
        "weight: 70}]}]",
    )
    loaded = load_text(text, "t.yaml")
    assert loaded.virtual_services[0].sticky_weights
    decision = Router(loaded, 80).match("app.test", "/", "GET", {}, {})
    assert decision is not None and decision.deterministic and decision.split is not None
    # Envoy's pickClusterIndex: hash % 100 in [0, 30) -> v1, [30, 100) -> v2.
    assert decision.split.pick(29).cluster == "outbound|80|v1|app.local"
    assert decision.split.pick(130).cluster == "outbound|80|v2|app.local"
    plain = load_text(text.replace("'true'", "'false'"), "t.yaml")
    plain_decision = Router(plain, 80).match("app.test", "/", "GET", {}, {})
    assert plain_decision is not None and plain_decision.split is None


def test_the_route_takes_the_session_of_its_destination_service() -> None:
    loaded = load_text(config("{istio.io/persistent-session: s}"), "t.yaml")
    decision = Router(loaded, 80).match("app.test", "/", "GET", {}, {})
    assert decision is not None and decision.action.persistent is not None
    assert decision.action.persistent.name == "s"
