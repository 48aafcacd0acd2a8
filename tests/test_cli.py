from __future__ import annotations

from dataclasses import fields, replace

import pytest

from proxy.__main__ import RunArgs, build_parser, main, run_argv, worker_argv


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("sticky-proxy ")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: sticky-proxy" in capsys.readouterr().out


# --------------------------------------------------------------------------- run's arguments
def parse_run(argv: list[str]) -> RunArgs:
    return RunArgs.parse(build_parser().parse_args(argv))


def test_run_args_has_one_field_per_run_option() -> None:
    namespace = build_parser().parse_args(["run", "config/"])
    assert set(vars(namespace)) - {"command"} == {f.name for f in fields(RunArgs)}


EVERYTHING = [
    "run",
    "--listen", "127.0.0.1:0", "--listen", "[::1]:8081", "--dns-refresh", "0.25",
    "--log-level", "debug", "--admin-port", "0", "--admin-address", "10.0.0.1",
    "--readiness-port", "off", "--metrics-port", "9999", "--ops-address", "::",
    "--access-log", "json", "--drain-time", "1.5", "--drain-deadline", "7", "--watch",
    "--workers", "auto", "--worker", "3", "--ready-fd", "9",
    "--upstream", "127.0.0.1:1", "--upstream", "127.0.0.1:2", "--cookie", "sid", "--ttl", "5m",
    "--passive", "--cookie-path=-app", "--header", "x-user", "--query", "u", "--source-ip",
    "--maglev", "--table-size", "131", "--ring-size", "2048", "--print-config",
    "--credentials", "/var/run/secrets/-certs",
    "--", "a.yaml", "-odd.yaml",
]  # fmt: skip


@pytest.mark.parametrize("argv", [["run", "config/"], EVERYTHING], ids=["defaults", "every-flag"])
def test_run_argv_parses_back_to_the_same_arguments(argv: list[str]) -> None:
    args = parse_run(argv)
    assert parse_run(run_argv(args)) == args


def test_a_worker_runs_the_users_flags_on_the_supervisors_ports() -> None:
    args = parse_run(
        ["run", "config/", "--workers", "2", "--dns-refresh", "2", "--watch", "--credentials", "c"]
    )
    listen = [("127.0.0.1", 8080), ("::1", 8081)]
    first = parse_run(worker_argv(args, 0, listen, 15000, ready_fd=7))
    assert first == replace(
        args,
        listen=("127.0.0.1:8080", "::1:8081"),
        workers="1",
        worker=0,
        ready_fd=7,
        admin_port="15000",
        readiness_port="off",
        metrics_port="off",
    )
    # Only worker 0 serves the admin port; none serves readiness or metrics (the supervisor does).
    second = parse_run(worker_argv(args, 1, listen, 15000, ready_fd=8))
    assert second == replace(first, worker=1, ready_fd=8, admin_port="off")
    assert parse_run(worker_argv(args, 0, listen, None, ready_fd=7)).admin_port == "off"
