"""Malformed Istio YAML: each input with the exact messages ``check`` prints for it.

Each expected message stays on one line, as ``sticky-proxy check`` prints it, so that a message
seen in a terminal can be found here with grep.
"""
# ruff: noqa: E501

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import ConfigError
from proxy.istio import load_config, load_text

GW = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: default-gw}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
"""


def VS(http, extra=""):
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: test-vs}}
spec:
  hosts: [test.com]
  gateways: [default-gw]{extra}
  http:
{textwrap.indent(textwrap.dedent(http).strip(), "  ")}
"""


def DR(spec):
    return f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: default-sticky-dr}}
spec:
  host: svc
{textwrap.indent(textwrap.dedent(spec).strip(), "  ")}
"""


def SE(spec):
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc-se}}
spec:
{textwrap.indent(textwrap.dedent(spec).strip(), "  ")}
"""


R = "- route:\n  - destination: {host: svc, port: {number: 8080}}"
CH = "trafficPolicy: {loadBalancer: {consistentHash: %s}}"

CASES = {
    "cookie_typo": [DR(CH % "{httpCookie: {name: ISTIOID, tll: 60s}}")],
    "spec_typo": [DR("hots: x")],
    "hosts_string": [GW, VS(R).replace("hosts: [test.com]", "hosts: test.com")],
    "ttl_no_unit": [DR(CH % "{httpCookie: {name: ISTIOID, ttl: '60'}}")],
    "ttl_int": [DR(CH % "{httpCookie: {name: ISTIOID, ttl: 60}}")],
    "timeout_unit": [GW, VS(R + "\n  timeout: 1d")],
    "timeout_zero": [GW, VS(R + "\n  timeout: 0s")],
    "timeout_us": [GW, VS(R + "\n  timeout: 1500us")],
    "ttl_negative": [DR(CH % "{httpCookie: {name: ISTIOID, ttl: -5s}}")],
    "dr_no_host": [
        DR("trafficPolicy: {loadBalancer: {simple: RANDOM}}").replace("  host: svc\n", "")
    ],
    "no_name": [GW.replace("{name: default-gw}", "{namespace: x}")],
    "maglev_prime": [DR(CH % "{httpHeaderName: x, maglev: {tableSize: 1000}}")],
    "maglev_zero": [DR(CH % "{httpHeaderName: x, maglev: {}}")],
    "ring_and_maglev": [DR(CH % "{httpHeaderName: x, maglev: {tableSize: 7}, ringHash: {}}")],
    "deprecated_and_ring": [DR(CH % "{httpHeaderName: x, minimumRingSize: 10, ringHash: {}}")],
    "simple_enum": [DR("trafficPolicy: {loadBalancer: {simple: round_robin}}")],
    "simple_and_ch": [
        DR("trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}")
    ],
    "two_keys": [DR(CH % "{httpHeaderName: x, useSourceIp: true}")],
    "no_key": [DR(CH % "{ringHash: {minimumRingSize: 1024}}")],
    "two_kinds": [
        GW,
        VS(
            "- match: [{uri: {exact: /a, prefix: /a}}]\n  route:\n  - destination: {host: svc, port: {number: 8080}}"
        ),
    ],
    "bad_regex": [
        GW,
        VS(
            "- match: [{uri: {regex: '([a-z]'}}]\n  route:\n  - destination: {host: svc, port: {number: 8080}}"
        ),
    ],
    "lookahead": [
        GW,
        VS(
            "- match: [{headers: {x-a: {regex: '(?=a)a'}}}]\n  route:\n  - destination: {host: svc, port: {number: 8080}}"
        ),
    ],
    "route_and_redirect": [GW, VS(R + "\n  redirect: {uri: /x}")],
    "no_action": [GW, VS("- match: [{uri: {prefix: /}}]")],
    "zero_total": [
        GW,
        VS(
            "- route:\n  - destination: {host: a}\n    weight: 0\n  - destination: {host: b}\n    weight: 0"
        ),
    ],
    "neg_weight": [GW, VS("- route:\n  - destination: {host: a}\n    weight: -5")],
    "static_hostname": [
        SE(
            "hosts: [svc.local]\nports: [{number: 80, name: http}]\nresolution: STATIC\nendpoints: [{address: pod.local}]"
        )
    ],
    "no_resolution": [
        SE(
            "hosts: [svc.local]\nports: [{number: 80, name: http}]\nendpoints: [{address: 10.0.0.1}]"
        )
    ],
    "ep_port_name": [
        SE(
            "hosts: [svc.local]\nports: [{number: 80, name: http}]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1, ports: {htp: 9000}}]"
        )
    ],
    "dest_port_not_in_se": [
        GW,
        VS("- route:\n  - destination: {host: svc.local, port: {number: 8081}}"),
        SE(
            "hosts: [svc.local]\nports: [{number: 8080, name: http}]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1}]"
        ),
    ],
    "protocol": [GW.replace("protocol: HTTP", "protocol: HTTPZ")],
    "no_port_name": [GW.replace("name: http, ", "")],
    "dup_key": [
        GW.replace(
            "metadata: {name: default-gw}", "metadata: {name: default-gw}\nmetadata: {name: x}"
        )
    ],
    "yaml_syntax": ["apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw\n"],
    "api_version": [GW.replace("networking.istio.io/v1", "networking.istio.io/v2")],
    "port_range": [GW.replace("number: 80", "number: 70000")],
    "label_int": [DR("subsets: [{name: v1, labels: {version: 1}}]")],
    "header_name": [
        GW,
        VS(
            "- match: [{headers: {'x user': {exact: a}}}]\n  route:\n  - destination: {host: svc, port: {number: 8080}}"
        ),
    ],
    "retry_on": [GW, VS(R + "\n  retries: {attempts: 2, retryOn: '5xxx'}")],
    "redirect_code": [GW, VS("- redirect: {uri: /x, redirectCode: 304}")],
    "local_origin": [DR("trafficPolicy: {outlierDetection: {consecutiveLocalOriginFailures: 3}}")],
    "eject_percent": [DR("trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}")],
    "gateway_name_dot": [GW.replace("{name: default-gw}", "{name: default.gw}")],
    "bad_host": [GW, VS(R).replace("[test.com]", "[te_st.com]")],
    "cookie_no_name": [DR(CH % "{httpCookie: {ttl: 60s}}")],
    "empty_tp": [DR("trafficPolicy: {}")],
    "attempts0": [GW, VS(R + "\n  retries: {attempts: 0, perTryTimeout: 1s}")],
    "rewrite_both": [GW, VS(R + "\n  rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}")],
    "authority_twice": [
        GW,
        VS(R + "\n  rewrite: {authority: a.test}\n  headers: {request: {set: {host: b.test}}}"),
    ],
    "header_op_colon": [GW, VS(R + "\n  headers: {request: {set: {':path': /x}}}")],
    "delegate": [
        GW,
        VS("- name: r1\n  delegate: {name: other}\n  route: [{destination: {host: svc}}]"),
    ],
    "status_range": [GW, VS("- directResponse: {status: 700}")],
    "pls_no_port": [DR("trafficPolicy: {portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}")],
    "passthrough": [DR("trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}")],
    "se_selector_and_endpoints": [
        SE(
            "hosts: [svc.local]\nports: [{number: 80, name: http}]\nresolution: STATIC\nworkloadSelector: {labels: {app: x}}\nendpoints: [{address: 10.0.0.1}]"
        )
    ],
}

EXPECTED: dict[str, list[str]] = {
    "cookie_typo": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.tll: unknown field (did you mean ttl?)",
    ],
    "spec_typo": [
        "t.yaml: DestinationRule default-sticky-dr: spec.hots: unknown field (did you mean host?)",
    ],
    "hosts_string": [
        "t.yaml[2]: VirtualService test-vs: spec.hosts: expected a list, got string",
    ],
    "ttl_no_unit": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl: missing unit in duration '60' (Istio durations look like 60s, 1.5s, 100ms, 1m30s, 1h)",
    ],
    "ttl_int": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl: expected a duration string, got integer (Istio durations look like 60s, 1.5s, 100ms, 1m30s, 1h)",
    ],
    "timeout_unit": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].timeout: unknown unit 'd' in duration '1d' (Istio durations look like 60s, 1.5s, 100ms, 1m30s, 1h)",
    ],
    "timeout_zero": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].timeout: duration '0s' must be at least 1ms",
    ],
    "timeout_us": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].timeout: duration '1500us': only durations to ms precision are supported",
    ],
    "ttl_negative": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl: duration '-5s' must not be negative",
    ],
    "dr_no_host": [
        "t.yaml: DestinationRule default-sticky-dr: spec.host: required",
    ],
    "no_name": [
        "t.yaml: Gateway: metadata.name: required",
    ],
    "maglev_prime": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: tableSize must be a prime number for maglev, got 1000 (nearest primes: 997, 1009)",
    ],
    "maglev_zero": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: tableSize must be set for maglev",
    ],
    "ring_and_maglev": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash: only one of ringHash or maglev may be set",
    ],
    "deprecated_and_ring": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash: only one of MinimumRingSize or Maglev/Ringhash can be specified",
    ],
    "simple_enum": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.simple: unknown value 'round_robin' (did you mean ROUND_ROBIN?); one of UNSPECIFIED, LEAST_CONN, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST",
    ],
    "simple_and_ch": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer: only one of simple or consistentHash may be set",
    ],
    "two_keys": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash: only one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName may be set (found httpHeaderName, useSourceIp)",
    ],
    "no_key": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash: one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName is required",
    ],
    "two_kinds": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].match[0].uri: only one of exact, prefix or regex may be set (found exact, prefix)",
    ],
    "bad_regex": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].match[0].uri.regex: '([a-z]': missing ): ([a-z]; Istio uses RE2 style regex-based match (https://github.com/google/re2/wiki/Syntax)",
    ],
    "lookahead": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].match[0].headers.x-a.regex: '(?=a)a': lookarounds and backreferences are not RE2 syntax; Istio uses RE2 style regex-based match (https://github.com/google/re2/wiki/Syntax)",
    ],
    "route_and_redirect": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0]: HTTP route cannot contain both route and redirect",
    ],
    "no_action": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0]: HTTP route, redirect or direct response is required",
    ],
    "zero_total": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].route: total destination weight = 0",
    ],
    "neg_weight": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].route[0].weight: weight -5 < 0",
    ],
    "static_hostname": [
        "t.yaml: ServiceEntry svc-se: spec.endpoints[0].address: endpoint address 'pod.local' is not a valid IP address (STATIC resolution; use DNS resolution for names)",
    ],
    "no_resolution": [
        "t.yaml: ServiceEntry svc-se: spec.endpoints: no endpoints should be provided for resolution type none",
    ],
    "ep_port_name": [
        "t.yaml: ServiceEntry svc-se: spec.endpoints[0].ports.htp: endpoint port 9000 is not defined by the service entry (port names: http) (did you mean http?)",
    ],
    "dest_port_not_in_se": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].route[0].destination.port.number: port 8081 is not a port of ServiceEntry default/svc-se for host svc.local (ports: 8080)",
    ],
    "protocol": [
        "t.yaml: Gateway default-gw: spec.servers[0].port.protocol: invalid protocol 'HTTPZ' (did you mean HTTP?); one of HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, REDIS, MYSQL, TCP, TLS, UDP",
    ],
    "no_port_name": [
        "t.yaml: Gateway default-gw: spec.servers[0].port.name: required",
    ],
    "dup_key": [
        "t.yaml: line 4: duplicate key 'metadata'",
    ],
    "yaml_syntax": [
        "t.yaml:4:1: invalid YAML: did not find expected ',' or '}'",
    ],
    "api_version": [
        "t.yaml: Gateway default-gw: apiVersion: unknown version 'networking.istio.io/v2'; one of networking.istio.io/v1alpha3, networking.istio.io/v1beta1, networking.istio.io/v1",
    ],
    "port_range": [
        "t.yaml: Gateway default-gw: spec.servers[0].port.number: port number 70000 must be in the range 1..65535",
    ],
    "label_int": [
        "t.yaml: DestinationRule default-sticky-dr: spec.subsets[0].labels.version: expected a string, got integer (quote it)",
    ],
    "header_name": [
        't.yaml[2]: VirtualService test-vs: spec.http[0].match[0].headers["x user"]: header name x user is not a valid header name',
    ],
    "retry_on": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].retries.retryOn: '5xxx' is not a valid retryOn policy (did you mean 5xx?)",
    ],
    "redirect_code": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].redirect.redirectCode: redirect code 304 is not supported by Istio (301, 302, 303, 307, 308)",
    ],
    "local_origin": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures: outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false",
    ],
    "eject_percent": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.outlierDetection.maxEjectionPercent: percentage 150 is not in range 0..100",
    ],
    "gateway_name_dot": [
        "t.yaml: Gateway default.gw: metadata.name: invalid gateway name: 'default.gw' (a DNS label: no dots)",
    ],
    "bad_host": [
        "t.yaml[2]: VirtualService test-vs: spec.hosts[0]: domain name 'te_st.com' invalid (label 'te_st' invalid)",
    ],
    "cookie_no_name": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name: name required for HttpCookie",
    ],
    "empty_tp": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy: traffic policy must have at least one field",
    ],
    "attempts0": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].retries: http retry policy configured when attempts are set to 0 (disabled)",
    ],
    "rewrite_both": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].rewrite: rewrite may only contain one of URI or UriRegexRewrite",
    ],
    "authority_twice": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].headers: authority header cannot be set multiple times: have 'a.test', attempting to set 'b.test'",
    ],
    "header_op_colon": [
        't.yaml[2]: VirtualService test-vs: spec.http[0].headers.request.set[":path"]: invalid header ":path": header cannot have ":" prefix',
    ],
    "delegate": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0]: root HTTP route r1 must not specify route",
    ],
    "status_range": [
        "t.yaml[2]: VirtualService test-vs: spec.http[0].directResponse.status: HTTP status 700 is not in range 200-599",
    ],
    "pls_no_port": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.portLevelSettings[0]: portTrafficPolicy must have valid port",
    ],
    "passthrough": [
        "t.yaml: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer.simple: PASSTHROUGH (original destination) is not supported by sticky-proxy",
    ],
    "se_selector_and_endpoints": [
        "t.yaml: ServiceEntry svc-se: spec: only one of WorkloadSelector or Endpoints is allowed in Service Entry",
    ],
}


def test_there_are_enough_cases() -> None:
    assert set(CASES) == set(EXPECTED)
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_reports_exact_messages(case: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text("---\n".join(CASES[case]), "t.yaml")
    assert list(exc.value.errors) == EXPECTED[case]
    assert str(exc.value) == "\n".join(EXPECTED[case])


# What Istio accepts though it looks wrong: it loads, with these exact warnings.
WARNED = {
    "gateway_missing": (
        [GW, VS(R).replace("[default-gw]", "[default-gateway]")],
        "t.yaml[2]: VirtualService test-vs: spec.gateways[0]: Gateway default/default-gateway not found (did you mean default/default-gw?): nothing is served through it",
    ),
    "dup_resource": (
        [GW, GW.replace('hosts: ["*"]', 'hosts: ["b.com"]')],
        "t.yaml[2]: Gateway default-gw: metadata.name: replaces Gateway default/default-gw of t.yaml[1]: the last one read wins, as with kubectl apply",
    ),
}


@pytest.mark.parametrize("case", sorted(WARNED))
def test_what_istio_accepts_loads_with_an_exact_warning(case: str) -> None:
    documents, warning = WARNED[case]
    config = load_text("---\n".join(documents), "t.yaml")
    assert warning in config.warnings


def test_a_later_definition_replaces_the_earlier_one() -> None:
    documents, _ = WARNED["dup_resource"]
    config = load_text("---\n".join(documents), "t.yaml")
    [gateway] = config.gateways
    assert [h.host for s in gateway.servers for h in s.hosts] == ["b.com"]


def test_all_errors_of_a_file_are_reported_at_once(tmp_path: Path) -> None:
    bad = "---\n".join(
        [
            GW.replace("protocol: HTTP", "protocol: HTTPZ"),
            VS(R + "\n  timeout: 1d"),
            DR(CH % "{httpCookie: {name: ISTIOID, tll: 60s}, maglev: {tableSize: 1000}}"),
            SE(
                "hosts: [svc.local]\nports: [{number: 80, name: http}]\nendpoints: [{address: x.y}]"
            ),
        ]
    )
    path = tmp_path / "all.yaml"
    path.write_text(bad)
    other = tmp_path / "other.yaml"
    other.write_text(DR("hots: x").replace("default-sticky-dr", "second"))
    with pytest.raises(ConfigError) as exc:
        load_config([str(path), str(other)])
    p, o = str(path), str(other)
    assert list(exc.value.errors) == [
        f"{p}[1]: Gateway default-gw: spec.servers[0].port.protocol: invalid protocol 'HTTPZ' "
        "(did you mean HTTP?); one of HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, REDIS, MYSQL, "
        "TCP, TLS, UDP",
        f"{p}[2]: VirtualService test-vs: spec.http[0].timeout: unknown unit 'd' in duration '1d' "
        "(Istio durations look like 60s, 1.5s, 100ms, 1m30s, 1h)",
        f"{p}[3]: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer."
        "consistentHash.httpCookie.tll: unknown field (did you mean ttl?)",
        f"{p}[3]: DestinationRule default-sticky-dr: spec.trafficPolicy.loadBalancer."
        "consistentHash.maglev.tableSize: tableSize must be a prime number for maglev, got 1000 "
        "(nearest primes: 997, 1009)",
        f"{p}[4]: ServiceEntry svc-se: spec.endpoints: no endpoints should be provided for "
        "resolution type none",
        f"{o}: DestinationRule second: spec.hots: unknown field (did you mean host?)",
    ]


def test_missing_paths_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config([str(tmp_path / "nope.yaml"), str(tmp_path)])
    assert list(exc.value.errors) == [
        f"{tmp_path / 'nope.yaml'}: no such file or folder",
        f"{tmp_path}: no .yaml or .yml files in this folder",
    ]


def test_retry_on_tokens_may_have_spaces_after_commas() -> None:
    config = load_text(
        GW + "---\n" + VS(R + "\n  retries: {attempts: 2, retryOn: '5xx, reset, 503'}")
    )
    (vs,) = config.virtual_services
    retries = vs.http[0].retries
    assert (
        retries is not None
        and "reset" in retries.retry_on
        and 503 in retries.retriable_status_codes
    )


def test_bad_health_check_annotation_is_a_load_error() -> None:
    dr = DR(CH % "{httpCookie: {name: ISTIOID, ttl: 60s}}").replace(
        "metadata: {name: default-sticky-dr}",
        "metadata:\n  name: default-sticky-dr\n  annotations:\n"
        '    sticky-proxy/health-check: "path=/healthz unhealthy=two"',
    )
    with pytest.raises(ConfigError) as exc:
        load_text(GW + "---\n" + VS(R) + "---\n" + dr, "t.yaml")
    (line,) = exc.value.errors
    assert line.startswith(
        "t.yaml[3]: DestinationRule default-sticky-dr: "
        "metadata.annotations.sticky-proxy/health-check: "
    )
    assert "unhealthy" in line
