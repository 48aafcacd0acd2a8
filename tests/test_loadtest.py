"""The locust load test: ``loadtest/run.py`` end to end, and the locustfile's stickiness rules.

Locust is never imported here: it monkey-patches the standard library with gevent on import,
which would break every asyncio test that runs after it in this process.  Everything that
needs locust runs in a child process (``run.py`` starts ``python -m locust``; the rules are
exercised by a small script that imports the locustfile), and each child is killed with its
whole process group if it outlives its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from proxy.demo import PodSet
from proxy.quick import QuickOptions, quick_config
from proxy.server import Proxy, RunOptions

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "loadtest" / "run.py"
LINE = re.compile(
    r"sticky: users=(?P<users>\d+) sessions=(?P<sessions>\d+) violations=(?P<violations>\d+) "
    r"rehomed=(?P<rehomed>\d+) pods=(?P<pods>\d+) max/mean=(?P<max_mean>\d+\.\d\d)"
)

needs_locust = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed in this environment (pip install -e '.[loadtest]')",
)


def run_py(*args: str, timeout: float) -> tuple[int, str, str]:
    """``loadtest/run.py ARGS`` in its own process group; (status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, str(RUN), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"run.py {' '.join(args)} did not finish in {timeout}s\n{out}\n{err[-3000:]}")
    return proc.returncode, out, err


def last_line(out: str) -> dict[str, float]:
    lines = out.rstrip("\n").splitlines()
    assert lines, "run.py printed nothing"
    match = LINE.fullmatch(lines[-1])
    assert match is not None, f"last line is not the sticky line: {lines[-1]!r}"
    return {k: float(v) for k, v in match.groupdict().items()}


def load_run_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``loadtest/run.py`` as a module (it imports no locust; its dataclasses need sys.modules)."""
    spec = importlib.util.spec_from_file_location("loadtest_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- end to end


@needs_locust
@pytest.mark.timeout(90)
def test_short_run_keeps_every_session_on_its_pod(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    status, out, err = run_py(
        "--users", "20", "--spawn-rate", "20", "--duration", "10s", "--json", str(summary),
        timeout=80,
    )  # fmt: skip
    assert status == 0, f"{out}\n{err[-3000:]}"
    line = last_line(out)
    data = json.loads(summary.read_text())
    # weights 9:1 -> 18 StickyUsers, one session each (the 60 s cookie outlives the run)
    assert line == {
        "users": 20,
        "sessions": 18,
        "violations": 0,
        "rehomed": 0,
        "pods": 3,
        "max_mean": pytest.approx(data["max_mean"], abs=0.005),
    }
    assert sum(p["sessions"] for p in data["pods"].values()) == 18
    assert data["failed"] == 0
    assert data["visitor_sessions"] > 0
    assert data["visitor_violations"] == 0
    assert data["served"] > 100
    assert sorted(data["ring_shares"]) == ["pod-1", "pod-2", "pod-3"]
    assert sum(data["ring_shares"].values()) == pytest.approx(1.0)


@needs_locust
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_killed_pod_sessions_are_rehomed_and_come_back(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    status, out, err = run_py(
        "--users", "30", "--spawn-rate", "30", "--duration", "12s",
        "--kill-pod-at", "4s", "--restart-pod-at", "8s", "--kill-pod", "2",
        "--json", str(summary),
        timeout=80,
    )  # fmt: skip
    assert status == 0, f"{out}\n{err[-3000:]}"
    line = last_line(out)
    data = json.loads(summary.read_text())
    (outage,) = data["outages"]
    assert outage["pod"] == "pod-2"
    assert outage["down_at"] == pytest.approx(4.0, abs=1.0)
    assert outage["up_at"] == pytest.approx(8.0, abs=1.0)
    assert line["violations"] == 0
    assert line["pods"] == 3
    assert line["sessions"] == 27
    # every session of the killed pod moved, none other did, and all came back after restart
    # (no outlier detection in quick mode: the pod never left the ring)
    assert outage["sessions_alive"] == 27
    assert outage["sessions_of_pod"] == data["pods"]["pod-2"]["sessions"] > 0
    assert line["rehomed"] == outage["rehomed"] == outage["sessions_of_pod"]
    assert outage["returned"] == outage["rehomed"]
    assert data["failed"] == data["failed_in_outage"]  # any failure was during the outage
    assert "kill: pod-2 down at" in out


@needs_locust
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_header_query_and_source_ip_variants(tmp_path: Path) -> None:
    procs = {}
    for affinity in ("header", "query", "source-ip"):
        procs[affinity] = subprocess.Popen(
            [sys.executable, str(RUN), "--users", "10", "--spawn-rate", "10", "--duration", "4s",
             "--affinity", affinity, "--json", str(tmp_path / f"{affinity}.json")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
    try:
        results = {name: proc.communicate(timeout=60) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    for affinity, (out, err) in results.items():
        assert procs[affinity].returncode == 0, f"{affinity}\n{out}\n{err[-3000:]}"
        line = last_line(out)
        data = json.loads((tmp_path / f"{affinity}.json").read_text())
        assert line["violations"] == 0, affinity
        assert line["sessions"] == 9, affinity
        assert data["failed"] == 0, affinity
        # distinct keys spread: with one shared key (e.g. an unbound source address) every
        # session would sit on one pod
        assert sum(1 for p in data["pods"].values() if p["sessions"]) >= 2, (affinity, data)


@needs_locust
@pytest.mark.timeout(60)
async def test_broken_stickiness_is_reported_and_fails_the_run() -> None:
    # A passive cookie policy and users that send no cookie: the proxy has no hash key and
    # picks at random, so sessions wander - which run.py must catch.
    async with PodSet(3) as pods:
        config = quick_config(QuickOptions(upstreams=tuple(pods.addresses), port=8080, ttl=None))
        proxy = Proxy(config, RunOptions(listen=(("127.0.0.1", 0),)))
        await proxy.start()
        try:
            host, port = proxy.addresses[0]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(RUN), "--target", f"http://{host}:{port}",
                "--affinity", "header", "--no-visitors",
                "--users", "4", "--spawn-rate", "4", "--duration", "3s",
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 45)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.communicate()
                raise
        finally:
            await proxy.stop(grace=1)
    text = out.decode()
    assert proc.returncode == 1, f"{text}\n{err.decode()[-3000:]}"
    line = last_line(text)
    assert line["violations"] > 0
    assert line["sessions"] == 4
    assert "sticky violation: sticky session" in text


# --------------------------------------------------------------------------- the rules

RULES_SCRIPT = r"""
import json, sys
sys.path.insert(0, "loadtest")
import locustfile as lf

log = lf.OutageLog()
log.outages = (lf.Outage("pod-1", 100.0, 200.0),)
log.pods = ("pod-1", "pod-2", "pod-3")
t = lf.Tracker(log)
t.started_at = 0.0
r = {}
a = t.open("sticky", "a")
r["a_first"] = t.served(a, "pod-1", 10, 11)
r["a_moved_without_outage"] = t.served(a, "pod-2", 50, 51)
r["a_home_down"] = t.served(a, "pod-2", 120, 121)
r["a_still_away_after_restart"] = t.served(a, "pod-2", 210, 211)
r["a_back_home"] = t.served(a, "pod-1", 220, 221)
r["a_elsewhere_again"] = t.served(a, "pod-3", 230, 231)
b = t.open("sticky", "b")
t.served(b, "pod-2", 10, 11)
r["b_survivor_moved"] = t.served(b, "pod-3", 150, 151)
c = t.open("sticky", "c")
r["c_born_in_outage"] = t.served(c, "pod-3", 150, 151)
r["c_moves_to_its_pod"] = t.served(c, "pod-1", 250, 251)
r["c_then_elsewhere"] = t.served(c, "pod-3", 260, 261)
d = t.open("sticky", "d")
t.served(d, "pod-1", 10, 11)
r["d_straddles_down_at"] = t.served(d, "pod-2", 99, 101)
e = t.open("sticky", "e")
t.served(e, "pod-1", 10, 11)
t.failed_request(e, 150, 151, "HTTP 503")
t.failed_request(None, 300, 301, "HTTP 502")
v = t.open("visitor", "v")
t.served(v, "pod-2", 10, 11)
r["v_moved"] = t.served(v, "pod-3", 12, 13)
t.open("sticky", "a2", replaces=a)

class Headers(dict):
    def getlist(self, name):
        return self.get(name, [])

class Response:
    content = b'{"pod": "pod-9", "meta": {"host": "h1"}}'
    text = "served by <b>pod-7</b>"
    headers = Headers({"X-Pod": "pod-8", "set-cookie": ["A=1", 'ISTIOID="00ff"; Max-Age=60']})

readers = {
    "json": lf.pod_reader("json:pod")(Response),
    "json_nested": lf.pod_reader("json:meta.host")(Response),
    "json_missing": lf.pod_reader("json:nope")(Response),
    "header": lf.pod_reader("header:X-Pod")(Response),
    "regex_group": lf.pod_reader(r"regex:<b>(pod-\d+)</b>")(Response),
    "regex_whole": lf.pod_reader(r"regex:pod-\d+")(Response),
    "cookie": lf.issued_cookie(Response, "ISTIOID"),
    "no_cookie": lf.issued_cookie(Response, "OTHER"),
}
print(json.dumps({"results": r, "summary": t.summary(), "readers": readers,
                  "line": lf.sticky_line(t.summary())}))
"""


@needs_locust
@pytest.mark.timeout(60)
def test_stickiness_rules() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", RULES_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    results = got["results"]
    violations = {name for name, message in results.items() if message is not None}
    assert violations == {
        "a_moved_without_outage",
        "a_elsewhere_again",
        "b_survivor_moved",
        "c_then_elsewhere",
        "v_moved",
    }
    assert (
        results["b_survivor_moved"] == "sticky violation: sticky session b of pod-2 served by pod-3"
    )
    s = got["summary"]
    assert s["violations"] == 5
    assert s["sticky_violations"] == 4
    assert s["visitor_violations"] == 1
    assert s["sessions"] == 5  # a, b, c, d, e (a2 never served, visitors apart)
    assert s["rehomed"] == 2  # a and d
    assert s["returned"] == 1  # a
    assert s["born_away_moved_home"] == 1  # c
    assert s["renewed"] == 1
    assert (s["failed"], s["failed_in_outage"]) == (2, 1)
    assert s["pods"]["pod-1"]["sessions"] == 4  # a, c (moved home), d, e
    assert s["max_mean"] == pytest.approx(4 / (5 / 3), abs=1e-4)
    (outage,) = s["outages"]
    # alive at down_at: a, b, d, e (c was born later); of pod-1: a, d, e; e only ever failed
    assert outage["sessions_alive"] == 4
    assert outage["sessions_of_pod"] == 3
    assert outage["rehomed"] == 2
    assert outage["returned"] == 1
    assert got["readers"] == {
        "json": "pod-9",
        "json_nested": "h1",
        "json_missing": None,
        "header": "pod-8",
        "regex_group": "pod-7",
        "regex_whole": "pod-7",
        "cookie": "00ff",
        "no_cookie": None,
    }
    assert got["line"] == "sticky: users=0 sessions=5 violations=5 rehomed=2 pods=3 max/mean=2.40"


def load_stickiness(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``loadtest/stickiness.py`` (no locust in it, so it loads in this process)."""
    path = ROOT / "loadtest" / "stickiness.py"
    spec = importlib.util.spec_from_file_location("loadtest_stickiness", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_membership_changes_move_sessions_and_count_broken_lives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    st = load_stickiness(monkeypatch)
    log = st.OutageLog()
    log.changes = (
        st.Change("scale-up", 100.0, "3 -> 5 pods", 101.0),
        st.Change("restart", 200.0, "x", 201.0),
    )
    t = st.Tracker(log)
    t.started_at = 0.0
    a = t.open("sticky", "a")  # moved by the scale-up: counted, not a violation
    assert t.served(a, "pod-1", 90, 91) is None
    t.lived(1, "pod-1", 91)
    assert t.served(a, "pod-1", 100.5, 102) is None  # started before the change was done
    t.lived(1, "pod-1", 102)
    assert t.served(a, "pod-4", 105, 106) is None
    t.lived(1, "pod-4", 106)
    assert t.served(a, "pod-4", 150, 151) is None
    t.lived(1, "pod-4", 151)
    moved = t.served(a, "pod-2", 160, 161)  # no change since its last request: a violation
    assert moved == "sticky violation: sticky session a of pod-4 served by pod-2"
    t.lived(1, "pod-2", 161)
    # life 2 keeps its pod through the scale-up, is broken by the restart (its key changed:
    # a persistent cookie re-issued; the life is the same)
    for end, pod in ((95, "pod-3"), (120, "pod-3"), (210, "pod-5"), (220, "pod-5")):
        t.lived(2, pod, end)
    t.lived(3, "pod-1", 130)  # born after the scale-up, ended before the restart: never alive
    t.lived(3, "pod-1", 140)
    summary = t.summary()
    assert summary["moved_by_change"] == 1
    assert summary["sticky_violations"] == 1
    assert summary["changes"] == [
        {"kind": "scale-up", "label": "3 -> 5 pods", "at": 100.0, "sessions_alive": 2,
         "sessions_broken": 1},
        {"kind": "restart", "label": "x", "at": 200.0, "sessions_alive": 1,
         "sessions_broken": 1},
    ]  # fmt: skip


@needs_locust
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scale_and_rolling_restart_report_sessions_broken_per_event(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    status, out, err = run_py(
        "--users", "20", "--spawn-rate", "20", "--duration", "24s", "--no-visitors",
        "--scale", "2,3", "--rolling-restart", "--grace", "1s",
        "--persistent", "--session-drain", "1s", "--json", str(summary),
        timeout=110,
    )  # fmt: skip
    assert status == 0, f"{out}\n{err[-3000:]}"
    data = json.loads(summary.read_text())
    kinds = [change["kind"] for change in data["changes"]]
    assert kinds == ["scale-up", "restart", "restart", "restart"]
    scale_up = data["changes"][0]
    assert scale_up["sessions_alive"] > 0
    assert scale_up["sessions_broken"] == 0  # persistent sessions: adding a pod moves none
    assert data["failed"] == 0
    assert data["violations"] == 0
    assert "sessions broken per event: scale-up 0/" in out
    assert "change: restart pod-1 -> pod-4 at" in out


# --------------------------------------------------------------------------- run.py arguments


def test_durations_and_argument_checks(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = load_run_module(monkeypatch)
    assert run.parse_duration("60s") == 60
    assert run.parse_duration("1m30s") == 90
    assert run.parse_duration("1.5m") == 90
    assert run.parse_duration("12") == 12
    assert run.parse_duration("1h") == 3600
    with pytest.raises(Exception, match="expected a duration"):
        run.parse_duration("soon")
    bad = [
        ["--kill-pod-at", "20s", "--target", "http://127.0.0.1:1"],
        ["--restart-pod-at", "5s"],
        ["--kill-pod-at", "5s", "--restart-pod-at", "4s"],
        ["--kill-pod-at", "90s", "--duration", "60s"],
        ["--kill-pod-at", "5s", "--kill-pod", "4"],
        ["--users", "0"],
        ["--scale", "3"],
        ["--scale", "3,0"],
        ["--session-drain", "5s"],
        ["--scale", "3,5,2", "--duration", "10s"],
        ["--rolling-restart", "--target", "http://127.0.0.1:1"],
        ["--scale", "3,5", "--kill-pod-at", "5s"],
    ]
    for argv in bad:
        with pytest.raises(SystemExit) as exc:
            run.main(argv)
        assert exc.value.code == 2, argv
    assert "--kill-pod-at needs the runner's own pods" in capsys.readouterr().err
