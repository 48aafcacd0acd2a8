"""Duration flags take Istio's (Go's) durations and plain seconds, and name the flag when wrong."""

from __future__ import annotations

import argparse

import pytest

from proxy.__main__ import build_parser
from proxy.flags import env_listen, istio_duration, seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", 5.0),
        ("0", 0.0),
        ("0.5", 0.5),
        (" 20 ", 20.0),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("250us", 0.00025),
    ],
)
def test_seconds_accepts_durations_and_plain_seconds(text: str, expected: float) -> None:
    assert seconds(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("5x", "unknown unit 'x'"),
        ("", "invalid duration"),
        ("s", "invalid duration"),
        ("-1", "cannot be negative"),
        ("-2s", "cannot be negative"),
        ("inf", "invalid duration"),
        ("1e3", "unknown unit 'e'"),
        ("五", "invalid duration"),
    ],
)
def test_seconds_refuses_what_is_not_a_duration(text: str, reason: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=reason):
        seconds(text)


def test_istio_duration_gives_plain_seconds_a_unit() -> None:
    assert istio_duration("60") == "60s"
    assert istio_duration("1.5") == "1.5s"
    assert istio_duration("1m") == "1m"
    with pytest.raises(argparse.ArgumentTypeError, match="cannot be negative"):
        istio_duration("-3")


def test_every_duration_flag_of_run_takes_both_forms() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["run", "config/", "--drain-time", "5s", "--drain-deadline", "20", "--dns-refresh", "500ms"]
    )
    assert (args.drain_time, args.drain_deadline, args.dns_refresh) == (5.0, 20.0, 0.5)
    quick = parser.parse_args(["run", "--upstream", "127.0.0.1:9001", "--ttl", "90"])
    assert quick.ttl == "90s"
    defaults = parser.parse_args(["run", "config/"])
    assert (defaults.drain_time, defaults.drain_deadline, defaults.ttl) == (5.0, 20.0, "60s")


def test_a_bad_duration_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "config/", "--drain-time", "5 s"])
    assert exc.value.code == 2
    assert "argument --drain-time: " in capsys.readouterr().err


def test_listen_addresses_from_the_environment() -> None:
    assert env_listen({}) == []
    assert env_listen({"STICKY_PROXY_LISTEN": "0.0.0.0:8080"}) == ["0.0.0.0:8080"]
    assert env_listen({"STICKY_PROXY_LISTEN": " 0.0.0.0:8080, [::]:8443 "}) == [
        "0.0.0.0:8080",
        "[::]:8443",
    ]
