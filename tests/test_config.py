"""The model's building blocks: durations, names, endpoints, the strict YAML reader."""

from __future__ import annotations

import pytest

from proxy.config import (
    Destination,
    Endpoint,
    cluster_name,
    destination_port,
    host_subset_of,
    labels_match,
    labels_of,
)
from proxy.istio_reader import (
    Issues,
    Reader,
    did_you_mean,
    fqdn_problem,
    join_path,
    parse_duration,
    wildcard_domain_problem,
)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("60s", 60_000_000_000),
        ("1.5s", 1_500_000_000),
        ("100ms", 100_000_000),
        ("1m30s", 90_000_000_000),
        ("1h", 3_600_000_000_000),
        ("2h45m", 9_900_000_000_000),
        ("0", 0),
        ("0s", 0),
        (".5s", 500_000_000),
        ("1.s", 1_000_000_000),
        ("1us", 1_000),
        ("1\u00b5s", 1_000),
        ("1\u03bcs", 1_000),
        ("10ns", 10),
        ("-1s", -1_000_000_000),
        ("+2s", 2_000_000_000),
        ("0.1234567891s", 123_456_789),  # Go truncates below the nanosecond
    ],
)
def test_parse_duration_accepts_go_syntax(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("60", "missing unit in duration '60'"),
        ("60sec", "unknown unit 'sec' in duration '60sec'"),
        ("", "invalid duration ''"),
        ("s", "invalid duration 's'"),
        (".s", "invalid duration '.s'"),
        ("1d", "unknown unit 'd' in duration '1d'"),
        ("-", "invalid duration '-'"),
    ],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_duration(text)
    assert str(exc.value) == message


def test_endpoint_key_and_hashability() -> None:
    assert Endpoint("10.0.0.1", 80).key == "10.0.0.1:80"
    assert Endpoint("::1", 8080).key == "[::1]:8080"
    assert Endpoint("pod.example", 9000).key == "pod.example:9000"
    a = Endpoint("10.0.0.1", 80, 2, labels_of({"v": "1", "a": "b"}))
    b = Endpoint("10.0.0.1", 80, 2, labels_of({"a": "b", "v": "1"}))
    assert a == b and hash(a) == hash(b)
    assert a.labels == (("a", "b"), ("v", "1"))
    assert {a, b} == {a}


def test_labels_match_is_subset_selection() -> None:
    labels = labels_of({"version": "v1", "app": "web"})
    assert labels_match(labels, labels_of({"version": "v1"}))
    assert labels_match(labels, ())
    assert not labels_match(labels, labels_of({"version": "v2"}))
    assert not labels_match((), labels_of({"version": "v1"}))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.com", "a.com", True),
        ("a.com", "b.com", False),
        ("x.a.com", "*.a.com", True),
        ("*.a.com", "x.a.com", False),
        ("*.x.a.com", "*.a.com", True),
        ("*.a.com", "*.x.a.com", False),
        ("anything", "*", True),
        ("*", "*.a.com", False),
        ("*.a.com", "*", True),
    ],
)
def test_host_subset_of_follows_istio(a: str, b: str, expected: bool) -> None:
    assert host_subset_of(a, b) is expected


def test_cluster_name_and_destination_port() -> None:
    assert cluster_name("h.ns.svc.cluster.local", 8080) == "outbound|8080||h.ns.svc.cluster.local"
    assert cluster_name("h", 80, "v1") == "outbound|80|v1|h"
    ports = {"one": (8080,), "two": (8080, 9090)}
    assert destination_port(Destination("one", 7000), 80, ports) == 7000
    assert destination_port(Destination("one"), 80, ports) == 8080
    assert destination_port(Destination("two"), 80, ports) == 80
    assert destination_port(Destination("none"), 443, ports) == 443


def test_domain_validation() -> None:
    assert fqdn_problem("test.com") is None
    assert fqdn_problem("Test.com") == "domain name 'Test.com' invalid (label 'Test' invalid)"
    assert fqdn_problem("a..b") == "domain name 'a..b' invalid (label '' invalid)"
    assert wildcard_domain_problem("*.example.com") is None
    assert wildcard_domain_problem("*") is None
    assert wildcard_domain_problem("*-api.example.com") is None
    assert wildcard_domain_problem("a.*.com") == "domain name 'a.*.com' invalid (label '*' invalid)"
    assert wildcard_domain_problem("x" * 64) is not None


def test_did_you_mean_and_paths() -> None:
    assert did_you_mean("tll", ["name", "path", "ttl"]) == " (did you mean ttl?)"
    assert did_you_mean("round_robin", ["ROUND_ROBIN", "RANDOM"]) == " (did you mean ROUND_ROBIN?)"
    assert did_you_mean("zzz", ["name"]) == ""
    assert join_path("", "spec") == "spec"
    assert join_path("spec", "http") == "spec.http"
    assert join_path("spec.http", 0) == "spec.http[0]"
    assert join_path("labels", "app.kubernetes.io/name") == 'labels["app.kubernetes.io/name"]'


def test_reader_collects_every_problem() -> None:
    issues = Issues()
    r = Reader(issues, "f.yaml[2]", "Thing t")
    m = r.mapping({"name": 1, "porr": 2, "skip": 3}, "spec", ("name", "port"), {"skip": "why"})
    assert m == {"name": 1}
    assert r.string(m, "name", "spec") is None
    assert r.integer({"n": True}, "n", "spec") is None
    assert r.duration({"d": "5"}, "d", "spec") is None
    assert r.duration({"d": "500us"}, "d", "spec") is None
    assert r.duration({"d": "0s"}, "d", "spec", allow_zero=True) == 0.0
    assert r.duration({"d": "1500ms"}, "d", "spec") == 1.5
    assert r.enum({"e": "round_robin"}, "e", "spec", ("ROUND_ROBIN",)) is None
    assert issues.errors == [
        "f.yaml[2]: Thing t: spec.porr: unknown field (did you mean port?)",
        "f.yaml[2]: Thing t: spec.name: expected a string, got integer (quote it)",
        "f.yaml[2]: Thing t: spec.n: expected an integer, got boolean",
        "f.yaml[2]: Thing t: spec.d: missing unit in duration '5' "
        "(Istio durations look like 60s, 1.5s, 100ms, 1m30s, 1h)",
        "f.yaml[2]: Thing t: spec.d: duration '500us' must be at least 1ms",
        "f.yaml[2]: Thing t: spec.e: unknown value 'round_robin' (did you mean ROUND_ROBIN?); "
        "one of ROUND_ROBIN",
    ]
    assert issues.warnings == ["f.yaml[2]: Thing t: spec.skip: ignored: why"]
