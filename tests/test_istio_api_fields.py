"""Every field of istio/api's networking/v1alpha3 messages that sticky-proxy reads is accepted.

The field lists below are data, generated once from the protos of istio/api commit
b8f8791d9653b2edc77a071d48887e582cfe84bf (``networking/v1alpha3/{gateway,virtual_service,
destination_rule,service_entry,workload_entry}.proto``), in the JSON (lowerCamel) names YAML
uses, oneof members included.  A newer istio/api adds fields: regenerate the lists from its
protos.  Each field is set to null in an otherwise minimal resource at the place its message
appears; the load may fail for other reasons (a required field missing), but never with
"unknown field" for it, while a made-up field at the same place must be one (so the place is
really read).

Messages not listed are not read field by field: their parent field is accepted and ignored
whole with a warning (``tls``/``tcp`` routes with TLSRoute, TCPRoute, RouteDestination,
L4MatchAttributes, TLSMatchAttributes; ``fault``, ``mirror``/``mirrors`` with Percent,
``corsPolicy``; ``tunnel``, ``proxyProtocol``, ``retryBudget``; ``localityLbSetting``,
``zoneAwareLbSetting``, ``warmup``; ``http2KeepAlive``; a DestinationRule's
``workloadSelector``), or are refused as a whole (``tlsCertificates``, a ServiceEntry's
``workloadSelector``).
"""

from __future__ import annotations

import copy
import textwrap

import pytest
import yaml
from proxy_process import gateway_yaml

from proxy.config import Config, ConfigError, Redirect
from proxy.istio import load_text
from proxy.routing import Router

# message -> its fields, from the protos (see the module docstring for the commit).
FIELDS: dict[str, str] = {
    # networking/v1alpha3/gateway.proto
    "Gateway": "servers selector",
    "Server": "port bind hosts tls defaultEndpoint name",
    "Port": "number protocol name targetPort",
    "ServerTLSSettings": "httpsRedirect mode serverCertificate privateKey caCertificates caCrl "
    "credentialName credentialNames caCertCredentialName tlsCertificates subjectAltNames "
    "verifyCertificateSpki verifyCertificateHash minProtocolVersion maxProtocolVersion "
    "cipherSuites insecureSkipVerify",
    # networking/v1alpha3/virtual_service.proto
    "VirtualService": "hosts gateways http tls tcp exportTo",
    "HTTPRoute": "name match route redirect directResponse delegate rewrite timeout retries "
    "fault mirror mirrors mirrorPercent mirrorPercentage corsPolicy headers",
    "HTTPMatchRequest": "name uri scheme method authority headers port sourceLabels gateways "
    "queryParams ignoreUriCase withoutHeaders sourceNamespace statPrefix",
    "StringMatch": "exact prefix regex",
    "HTTPRouteDestination": "destination weight headers",
    "Destination": "host subset port",
    "PortSelector": "number",
    "Headers": "request response",
    "Headers.HeaderOperations": "set add remove",
    "HTTPRedirect": "uri authority port derivePort scheme redirectCode prefixRewrite",
    "HTTPDirectResponse": "status body",
    "HTTPBody": "string bytes",
    "HTTPRewrite": "uri authority uriRegexRewrite",
    "RegexRewrite": "match rewrite",
    "HTTPRetry": "attempts perTryTimeout retryOn retryRemoteLocalities retryIgnorePreviousHosts "
    "backoff",
    "Delegate": "name namespace",
    # networking/v1alpha3/destination_rule.proto
    "DestinationRule": "host trafficPolicy subsets exportTo workloadSelector",
    "TrafficPolicy": "loadBalancer connectionPool outlierDetection tls portLevelSettings tunnel "
    "proxyProtocol retryBudget",
    "TrafficPolicy.PortTrafficPolicy": "port loadBalancer connectionPool outlierDetection tls",
    "Subset": "name labels trafficPolicy",
    "LoadBalancerSettings": "simple consistentHash localityLbSetting zoneAwareLbSetting "
    "warmupDurationSecs warmup",
    "LoadBalancerSettings.ConsistentHashLB": "httpHeaderName httpCookie useSourceIp "
    "httpQueryParameterName ringHash maglev minimumRingSize",
    "LoadBalancerSettings.ConsistentHashLB.RingHash": "minimumRingSize",
    "LoadBalancerSettings.ConsistentHashLB.MagLev": "tableSize",
    "LoadBalancerSettings.ConsistentHashLB.HTTPCookie": "name path ttl attributes",
    "LoadBalancerSettings.ConsistentHashLB.HTTPCookie.Attribute": "name value",
    "ConnectionPoolSettings": "tcp http",
    "ConnectionPoolSettings.TCPSettings": "maxConnections connectTimeout tcpKeepalive "
    "maxConnectionDuration idleTimeout",
    "ConnectionPoolSettings.TCPSettings.TcpKeepalive": "probes time interval",
    "ConnectionPoolSettings.HTTPSettings": "http1MaxPendingRequests http2MaxRequests "
    "maxRequestsPerConnection maxRetries idleTimeout h2UpgradePolicy useClientProtocol "
    "maxConcurrentStreams http2KeepAlive",
    "OutlierDetection": "consecutiveErrors splitExternalLocalOriginErrors "
    "consecutiveLocalOriginFailures consecutiveGatewayErrors consecutive5xxErrors interval "
    "baseEjectionTime maxEjectionPercent minHealthPercent outlierDetectionHttpErrorCodes",
    "ClientTLSSettings": "mode clientCertificate privateKey caCertificates credentialName "
    "subjectAltNames sni insecureSkipVerify caCrl",
    # networking/v1alpha3/service_entry.proto (+ workload_entry.proto for its endpoints)
    "ServiceEntry": "hosts addresses ports location resolution endpoints workloadSelector "
    "exportTo subjectAltNames",
    "ServicePort": "number protocol name targetPort",
    "WorkloadEntry": "address ports labels network locality weight serviceAccount",
}

_GATEWAY = """
kind: Gateway
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
    tls: {}
"""
_VIRTUAL_SERVICE = """
kind: VirtualService
spec:
  hosts: [app.test]
  gateways: [gw]
  http:
  - match: [{uri: {}}]
    route: [{destination: {host: svc, port: {}}, headers: {request: {}}}]
    redirect: {}
    directResponse: {body: {}}
    rewrite: {uriRegexRewrite: {}}
    retries: {}
"""
_DELEGATING = """
kind: VirtualService
spec:
  hosts: [app.test]
  gateways: [gw]
  http:
  - delegate: {}
"""
_POLICY = """
loadBalancer:
  consistentHash: {ringHash: {}, maglev: {}, httpCookie: {attributes: [{}]}}
connectionPool: {tcp: {tcpKeepalive: {}}, http: {}}
outlierDetection: {}
tls: {}
"""
_DESTINATION_RULE = f"""
kind: DestinationRule
spec:
  host: svc
  trafficPolicy:
{textwrap.indent(_POLICY.strip(), "    ")}
    portLevelSettings: [{{port: {{number: 80}}}}]
  subsets: [{{name: v1}}]
"""
_SERVICE_ENTRY = """
kind: ServiceEntry
spec:
  hosts: [svc.test]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
"""

# message -> (resource, path of the object the field goes into)
PLACES: dict[str, tuple[str, tuple[str | int, ...]]] = {
    "Gateway": (_GATEWAY, ("spec",)),
    "Server": (_GATEWAY, ("spec", "servers", 0)),
    "Port": (_GATEWAY, ("spec", "servers", 0, "port")),
    "ServerTLSSettings": (_GATEWAY, ("spec", "servers", 0, "tls")),
    "VirtualService": (_VIRTUAL_SERVICE, ("spec",)),
    "HTTPRoute": (_VIRTUAL_SERVICE, ("spec", "http", 0)),
    "HTTPMatchRequest": (_VIRTUAL_SERVICE, ("spec", "http", 0, "match", 0)),
    "StringMatch": (_VIRTUAL_SERVICE, ("spec", "http", 0, "match", 0, "uri")),
    "HTTPRouteDestination": (_VIRTUAL_SERVICE, ("spec", "http", 0, "route", 0)),
    "Destination": (_VIRTUAL_SERVICE, ("spec", "http", 0, "route", 0, "destination")),
    "PortSelector": (_VIRTUAL_SERVICE, ("spec", "http", 0, "route", 0, "destination", "port")),
    "Headers": (_VIRTUAL_SERVICE, ("spec", "http", 0, "route", 0, "headers")),
    "Headers.HeaderOperations": (
        _VIRTUAL_SERVICE,
        ("spec", "http", 0, "route", 0, "headers", "request"),
    ),
    "HTTPRedirect": (_VIRTUAL_SERVICE, ("spec", "http", 0, "redirect")),
    "HTTPDirectResponse": (_VIRTUAL_SERVICE, ("spec", "http", 0, "directResponse")),
    "HTTPBody": (_VIRTUAL_SERVICE, ("spec", "http", 0, "directResponse", "body")),
    "HTTPRewrite": (_VIRTUAL_SERVICE, ("spec", "http", 0, "rewrite")),
    "RegexRewrite": (_VIRTUAL_SERVICE, ("spec", "http", 0, "rewrite", "uriRegexRewrite")),
    "HTTPRetry": (_VIRTUAL_SERVICE, ("spec", "http", 0, "retries")),
    "Delegate": (_DELEGATING, ("spec", "http", 0, "delegate")),
    "DestinationRule": (_DESTINATION_RULE, ("spec",)),
    "TrafficPolicy": (_DESTINATION_RULE, ("spec", "trafficPolicy")),
    "TrafficPolicy.PortTrafficPolicy": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "portLevelSettings", 0),
    ),
    "Subset": (_DESTINATION_RULE, ("spec", "subsets", 0)),
    "LoadBalancerSettings": (_DESTINATION_RULE, ("spec", "trafficPolicy", "loadBalancer")),
    "LoadBalancerSettings.ConsistentHashLB": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "loadBalancer", "consistentHash"),
    ),
    "LoadBalancerSettings.ConsistentHashLB.RingHash": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "loadBalancer", "consistentHash", "ringHash"),
    ),
    "LoadBalancerSettings.ConsistentHashLB.MagLev": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "loadBalancer", "consistentHash", "maglev"),
    ),
    "LoadBalancerSettings.ConsistentHashLB.HTTPCookie": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "loadBalancer", "consistentHash", "httpCookie"),
    ),
    "LoadBalancerSettings.ConsistentHashLB.HTTPCookie.Attribute": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "loadBalancer", "consistentHash", "httpCookie", "attributes", 0),
    ),
    "ConnectionPoolSettings": (_DESTINATION_RULE, ("spec", "trafficPolicy", "connectionPool")),
    "ConnectionPoolSettings.TCPSettings": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "connectionPool", "tcp"),
    ),
    "ConnectionPoolSettings.TCPSettings.TcpKeepalive": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "connectionPool", "tcp", "tcpKeepalive"),
    ),
    "ConnectionPoolSettings.HTTPSettings": (
        _DESTINATION_RULE,
        ("spec", "trafficPolicy", "connectionPool", "http"),
    ),
    "OutlierDetection": (_DESTINATION_RULE, ("spec", "trafficPolicy", "outlierDetection")),
    "ClientTLSSettings": (_DESTINATION_RULE, ("spec", "trafficPolicy", "tls")),
    "ServiceEntry": (_SERVICE_ENTRY, ("spec",)),
    "ServicePort": (_SERVICE_ENTRY, ("spec", "ports", 0)),
    "WorkloadEntry": (_SERVICE_ENTRY, ("spec", "endpoints", 0)),
}

CASES = [(message, field) for message, names in FIELDS.items() for field in names.split()]


def _problems(message: str, field: str) -> list[str]:
    """Errors and warnings of loading the message's resource with ``field: null`` in place."""
    text, path = PLACES[message]
    doc = yaml.safe_load(text)
    doc = {"apiVersion": "networking.istio.io/v1", "metadata": {"name": "x"}, **doc}
    target = copy.deepcopy(doc)
    here = target
    for key in path:
        here = here[key]
    here[field] = None
    try:
        loaded = load_text(yaml.safe_dump(target, sort_keys=False), "t.yaml")
    except ConfigError as exc:
        return [*exc.errors, *exc.warnings]
    return list(loaded.warnings)


def test_every_message_read_has_a_place() -> None:
    assert set(PLACES) == set(FIELDS)


@pytest.mark.parametrize(("message", "field"), CASES, ids=[f"{m}.{f}" for m, f in CASES])
def test_istio_api_field_is_accepted(message: str, field: str) -> None:
    unknown = [p for p in _problems(message, field) if "unknown field" in p]
    assert unknown == []


@pytest.mark.parametrize("message", list(FIELDS))
def test_a_field_istio_api_lacks_is_an_error_there(message: str) -> None:
    unknown = [p for p in _problems(message, "notAField") if "unknown field" in p]
    assert len(unknown) == 1 and ".notAField: unknown field" in unknown[0]


# --------------------------------------------------------------------------- newer fields


def _load(*docs: str) -> Config:
    gateway = gateway_yaml()
    return load_text("---\n".join((gateway, *docs)), "t.yaml")


def _vs(http: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  hosts: [app.test]
  gateways: [gw]
  http:
{textwrap.indent(textwrap.dedent(http).strip(), "  ")}
"""


def _location(router: Router, path: str) -> str | None:
    decision = router.match("app.test", path, "GET", {}, {})
    assert decision is not None
    return decision.location


def test_redirect_prefix_rewrite_replaces_the_matched_prefix() -> None:
    config = _load(
        _vs(
            """
            - match: [{uri: {prefix: /foo/}}]
              redirect: {authority: foo.example.com, prefixRewrite: /}
            - match: [{uri: {prefix: /old}, ignoreUriCase: true}]
              redirect: {prefixRewrite: /new, redirectCode: 302}
            - redirect: {prefixRewrite: /root/}
            """
        )
    )
    router = Router(config, 80)
    assert config.virtual_services[0].http[0].redirect == Redirect(
        authority="foo.example.com", prefix_rewrite="/"
    )
    assert _location(router, "/foo/bar?x=1") == "http://foo.example.com/bar?x=1"
    assert _location(router, "/OLD/a") == "http://app.test/new/a"
    assert _location(router, "/other") == "http://app.test/root/other"


def test_redirect_prefix_rewrite_is_checked_like_istio() -> None:
    routes = """
    - match: [{uri: {exact: /a}}]
      redirect: {prefixRewrite: /b}
    - match: [{uri: {prefix: /c}}]
      redirect: {prefixRewrite: /d, uri: /e}
    """
    with pytest.raises(ConfigError) as info:
        _load(_vs(routes))
    assert [e.split(": ", 2)[2] for e in info.value.errors] == [
        "spec.http[0].redirect.prefixRewrite: redirect prefixRewrite requires all URI matches "
        "to use prefix match type",
        "spec.http[1].redirect: redirect may only specify one of uri or prefixRewrite",
    ]


ZONE_AWARE_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr}
spec:
  host: svc
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      zoneAwareLbSetting: {enabled: true, failover: [{from: us-east, to: eu-west}]}
    connectionPool: {http: {http2KeepAlive: {interval: 30s, timeout: 5s}}}
    outlierDetection: {consecutive5xxErrors: 5, outlierDetectionHttpErrorCodes: [503, 504],
      maxEjectionPercent: 100}
"""


def test_newer_destination_rule_fields_are_warned_as_ignored() -> None:
    config = _load(_vs("- route: [{destination: {host: svc, port: {number: 80}}}]"), ZONE_AWARE_DR)
    assert [w.split(": ", 2)[2] for w in config.warnings] == [
        "spec.trafficPolicy.loadBalancer.zoneAwareLbSetting: ignored: zone-aware load "
        "balancing is not modelled (one locality)",
        "spec.trafficPolicy.connectionPool.http.http2KeepAlive: ignored: HTTP/2 keepalive "
        "pings do not apply (HTTP/1.1 to the endpoints)",
        "spec.trafficPolicy.outlierDetection.outlierDetectionHttpErrorCodes: ignored: custom "
        "error codes are not supported by sticky-proxy (5xx responses count as errors)",
    ]


def test_locality_and_zone_aware_settings_exclude_each_other() -> None:
    both = ZONE_AWARE_DR.replace("simple: ROUND_ROBIN", "localityLbSetting: {enabled: true}")
    with pytest.raises(ConfigError) as info:
        _load(both)
    assert [e.split(": ", 2)[2] for e in info.value.errors] == [
        "spec.trafficPolicy.loadBalancer: only one of localityLbSetting and zoneAwareLbSetting "
        "can be set"
    ]


def test_an_ignored_field_is_warned_once_per_resource() -> None:
    routes = """
    - match: [{uri: {prefix: /a}}]
      route: [{destination: {host: svc, port: {number: 80}}}]
      mirror: {host: shadow}
    - route: [{destination: {host: svc, port: {number: 80}}}]
      mirror: {host: shadow}
      fault: {abort: {httpStatus: 500}}
    """
    config = _load(_vs(routes), _vs(routes).replace("name: vs", "name: vs2"))
    assert [w.split(": ", 1)[1] for w in config.warnings] == [
        "VirtualService vs: spec.http[0].mirror: ignored: mirroring is not supported by "
        "sticky-proxy",
        "VirtualService vs: spec.http[1].fault: ignored: fault injection is not supported by "
        "sticky-proxy",
        "VirtualService vs2: spec.http[0].mirror: ignored: mirroring is not supported by "
        "sticky-proxy",
        "VirtualService vs2: spec.http[1].fault: ignored: fault injection is not supported by "
        "sticky-proxy",
    ]
