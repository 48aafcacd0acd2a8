"""Locust users that prove sticky sessions held through the proxy (or say where they broke).

Run it through ``loadtest/run.py`` (which also starts demo pods and the proxy, and can kill a pod
mid-run), or directly against any target::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080
    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s --host http://127.0.0.1:8080 \\
        --sticky-affinity header --sticky-key x-user --sticky-pod-from header:X-Pod

Users
-----
``StickyUser`` opens one session (its first request gets the cookie) and keeps requesting with
it; ``NewVisitorUser`` is a new browser on every visit: it drops its cookies and its connections,
gets a new cookie, and makes a few requests with it.  Both follow ``--sticky-affinity``:

=========== ======================================== =========================================
affinity    what carries the session                 the proxy's setting
=========== ======================================== =========================================
cookie      the cookie ``--sticky-key`` (ISTIOID)    ``httpCookie`` with ``ttl`` (issues it)
header      header ``--sticky-key`` = a random id    ``httpHeaderName``
query       ``?<--sticky-key>=<random id>``          ``httpQueryParameterName``
source-ip   the client's address: each user binds   ``useSourceIp``
            its own 127.x.y.z (Linux routes all of
            127/8 to loopback)
=========== ======================================== =========================================

A subclass may pin ``affinity`` and ``key_name`` as class attributes instead.  The pod that
served a response is read with ``--sticky-pod-from``: ``json:pod`` (default: the demo pods'
``{"pod": name}``; dotted paths reach nested fields), ``header:X-Pod``, or ``regex:PATTERN``
over the body (group 1 if the pattern has one, else the whole match).

The rules (what counts as what)
-------------------------------
A **session** is one session key: the cookie value a request carries (or, on the request that
carries none, the value the response's Set-Cookie issues: the proxy routes that request by it),
the header/query id, or the source address.  A StickyUser whose cookie expires and gets a
different value starts a new session (counted as *renewed*).  A response that issues a cookie
although the request sent one is counted as *cookie_reissued* (Envoy issues it only when absent).

A response is **served** when its status is below 400 and its pod can be read; anything else is
a **failed** request (connection error, 5xx, no pod, no session key).  Failed requests are
counted apart (those overlapping a pod outage separately) and are never judged for stickiness.

Pod outages come from the events file (``--sticky-events``, written by ``run.py`` when it kills
a pod): ``down_at`` is written *before* the pod is stopped, ``up_at`` *after* it listens again,
so a request ``[start, end]`` that overlaps ``[down_at, up_at]`` may have met the pod down.
Without an events file no pod is ever down.  For a served response from pod Q to a session:

1. The session's first served response makes Q its **home**.  If the request overlapped the
   outage of some pod X != Q, the session may belong to X: it is *born away* from X.
2. Q == home: fine.  A session that was away (rule 3) has **returned**.
3. Q != home and the request overlapped the home pod's outage: the session is **re-homed**
   (counted once per session) and Q becomes where it is *away*.
4. Q != home, the session is away and Q is where it is away: fine (the pod is back but the
   proxy still keeps it out - outlier detection does that - or the request raced the restart).
5. Q != home, the session was born away from Q: it moves to its own pod; Q becomes its home.
6. Anything else is a **violation**: the request is marked failed in locust with
   ``sticky violation: ...`` and counted.  A surviving pod's session served by another pod is
   always a violation.

For each outage of pod X: the sessions *alive* at ``down_at`` (opened before it, used after
it) and among them the *sessions of X* (home X, with a request overlapping the outage).  When
the proxy moves every one of them to another pod, ``re-homed == sessions of X``, and their
share of the alive sessions is close to X's share of the hash ring (about 1/N for N pods).
Sessions per pod count each StickyUser session (visitors apart) by its home; ``max/mean`` is
the largest count over the mean across pods (1.00 = perfectly even).

Counters are printed every ``--sticky-report-every`` seconds and at the end, shown in the web
UI's "Sticky sessions" tab, and written as JSON to ``--sticky-summary`` at test stop.  Counting
is per locust process: run it as a single process (no ``--processes``/workers).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
from geventhttpclient.url import URL
from locust import FastHttpUser, events, task
from locust.env import Environment

AFFINITIES = ("cookie", "header", "query", "source-ip")
DEFAULT_KEYS = {"cookie": "ISTIOID", "header": "x-session", "query": "session", "source-ip": ""}
STICKY = "sticky"
VISITOR = "visitor"


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class Options:
    """The ``--sticky-*`` arguments (defaults when locust runs as a library)."""

    affinity: str = "cookie"
    key: str = ""
    pod_from: str = "json:pod"
    path: str = "/"
    vhost: str = ""
    wait: tuple[float, float] = (0.5, 1.5)
    visit_requests: int = 3
    events_file: str = ""
    summary_file: str = ""
    started_file: str = ""
    report_every: float = 10.0
    quiet: bool = False

    @property
    def key_name(self) -> str:
        return self.key or DEFAULT_KEYS[self.affinity]


OPTIONS = Options()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    # On the parser itself: locust's ``include_in_web_ui`` is not understood by argument groups.
    group = parser
    group.add_argument(
        "--sticky-affinity",
        choices=AFFINITIES,
        default="cookie",
        help="what carries the session: cookie (default), header, query or source-ip",
    )
    group.add_argument(
        "--sticky-key",
        default="",
        help="cookie, header or query parameter name (ISTIOID, x-session, session)",
    )
    group.add_argument(
        "--sticky-pod-from",
        default="json:pod",
        help="where a response names its pod: json:FIELD, header:NAME or regex:PATTERN",
    )
    group.add_argument("--sticky-path", default="/", help="path to request (default /)")
    group.add_argument("--sticky-vhost", default="", help="Host header to send (default: none)")
    group.add_argument(
        "--sticky-wait", default="0.5:1.5", help="seconds between requests, MIN:MAX (0.5:1.5)"
    )
    group.add_argument(
        "--sticky-visit-requests",
        type=int,
        default=3,
        help="requests per NewVisitorUser visit (default 3)",
    )
    group.add_argument(
        "--sticky-events",
        default="",
        include_in_web_ui=False,
        help="JSON file of pod outages (written by run.py)",
    )
    group.add_argument(
        "--sticky-summary",
        default="",
        include_in_web_ui=False,
        help="write the sticky counters as JSON here at test stop",
    )
    group.add_argument(
        "--sticky-started",
        default="",
        include_in_web_ui=False,
        help="write the test start time here (run.py times pod kills from it)",
    )
    group.add_argument(
        "--sticky-report-every",
        type=float,
        default=10.0,
        include_in_web_ui=False,
        help="print the sticky line every N seconds (0: only at the end)",
    )
    group.add_argument(
        "--sticky-quiet",
        action="store_true",
        include_in_web_ui=False,
        help="no sticky table at test stop (run.py prints its own)",
    )


def options_from(parsed: Any) -> Options:
    if parsed is None:
        return Options()
    low, _, high = str(parsed.sticky_wait).partition(":")
    wait = (float(low), float(high or low))
    if not 0 <= wait[0] <= wait[1]:
        raise ValueError(f"--sticky-wait {parsed.sticky_wait!r}: expected MIN:MAX with MIN <= MAX")
    return Options(
        affinity=parsed.sticky_affinity,
        key=parsed.sticky_key,
        pod_from=parsed.sticky_pod_from,
        path=parsed.sticky_path,
        vhost=parsed.sticky_vhost,
        wait=wait,
        visit_requests=max(1, int(parsed.sticky_visit_requests)),
        events_file=parsed.sticky_events,
        summary_file=parsed.sticky_summary,
        started_file=parsed.sticky_started,
        report_every=float(parsed.sticky_report_every),
        quiet=parsed.sticky_quiet,
    )


# --------------------------------------------------------------------------- pod readers

PodReader = Callable[[Any], str | None]


def pod_reader(spec: str) -> PodReader:
    """``json:a.b``, ``header:Name`` or ``regex:PATTERN`` -> a function response -> pod."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError(
            f"--sticky-pod-from {spec!r}: expected json:FIELD, header:NAME or regex:RE"
        )
    if kind == "json":
        path = arg.split(".")

        def from_json(response: Any) -> str | None:
            try:
                value: Any = json.loads(response.content or b"")
            except ValueError:
                return None
            for part in path:
                if not isinstance(value, dict) or part not in value:
                    return None
                value = value[part]
            return None if value is None else str(value)

        return from_json
    if kind == "header":

        def from_header(response: Any) -> str | None:
            value = response.headers.get(arg) if response.headers is not None else None
            return None if value is None else str(value)

        return from_header
    if kind == "regex":
        pattern = re.compile(arg)

        def from_body(response: Any) -> str | None:
            match = pattern.search(response.text or "")
            if match is None:
                return None
            return match.group(1) if pattern.groups else match.group(0)

        return from_body
    raise ValueError(f"--sticky-pod-from {spec!r}: unknown source {kind!r} (json, header, regex)")


def issued_cookie(response: Any, name: str) -> str | None:
    """The value a ``Set-Cookie: NAME="VALUE"; ...`` response issues (one pair of quotes off)."""
    if response.headers is None:
        return None
    for header in response.headers.getlist("set-cookie"):
        pair = header.split(";", 1)[0]
        cname, sep, value = pair.partition("=")
        if sep and cname.strip() == name:
            return _unquote(value.strip())
    return None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


# --------------------------------------------------------------------------- outages


@dataclass(frozen=True, slots=True)
class Outage:
    """Pod ``pod`` may have been down in ``[down_at, up_at]`` (wall clock; up_at None: still)."""

    pod: str
    down_at: float
    up_at: float | None = None

    def overlaps(self, start: float, end: float) -> bool:
        return self.down_at <= end and (self.up_at is None or self.up_at >= start)


class OutageLog:
    """The events file, re-read whenever it changes (one ``stat`` per request)."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._mtime: float | None = None
        self.outages: tuple[Outage, ...] = ()
        self.pods: tuple[str, ...] = ()

    def current(self) -> tuple[Outage, ...]:
        if not self.path:
            return self.outages
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return self.outages
        if mtime != self._mtime:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            self._mtime = mtime
            self.pods = tuple(data.get("pods", ()))
            self.outages = tuple(
                Outage(o["pod"], float(o["down_at"]), o.get("up_at")) for o in data["outages"]
            )
        return self.outages


# --------------------------------------------------------------------------- the rules


@dataclass(slots=True, eq=False)
class Session:
    sid: int
    kind: str
    key: str
    home: str | None = None
    born_at: float = 0.0
    born_away_from: frozenset[str] = frozenset()
    away: str | None = None
    rehomed: bool = False
    returned: bool = False
    moved_home: bool = False
    served: int = 0
    failed: int = 0
    violations: int = 0


@dataclass(slots=True)
class OutageStats:
    alive: set[int] = field(default_factory=set)
    of_pod: set[int] = field(default_factory=set)


class Tracker:
    """Applies the module's rules to every response and keeps the counters."""

    def __init__(self, outage_log: OutageLog | None = None) -> None:
        self.log = outage_log or OutageLog()
        self.started_at = time.time()
        self.users = 0
        self.sessions: list[Session] = []
        self.renewed = 0
        self.reissued = 0
        self.failed = 0
        self.failed_in_outage = 0
        self.failure_reasons: Counter[str] = Counter()
        self.requests_per_pod: Counter[str] = Counter()
        self.violation_samples: list[str] = []
        # keyed by (pod, down_at): the Outage itself changes when its up_at is written
        self.outage_stats: dict[tuple[str, float], OutageStats] = {}
        self._ids = itertools.count(1)

    def open(self, kind: str, key: str, replaces: Session | None = None) -> Session:
        if replaces is not None:
            self.renewed += 1
        session = Session(next(self._ids), kind, key)
        self.sessions.append(session)
        return session

    def served(self, s: Session, pod: str, start: float, end: float) -> str | None:
        """Judge one served response; a message when it is a violation."""
        outages = self.log.current()
        self._note_outages(s, start, end, outages)
        s.served += 1
        self.requests_per_pod[pod] += 1
        if s.home is None:  # rule 1
            s.home, s.born_at = pod, end
            s.born_away_from = frozenset(
                o.pod for o in outages if o.pod != pod and o.overlaps(start, end)
            )
            return None
        if pod == s.home:  # rule 2
            if s.away is not None:
                s.away, s.returned = None, True
            return None
        home = s.home
        if any(o.pod == home and o.overlaps(start, end) for o in outages):  # rule 3
            s.rehomed, s.away = True, pod
            return None
        if pod == s.away:  # rule 4
            return None
        if pod in s.born_away_from:  # rule 5
            s.home, s.away, s.moved_home, s.born_away_from = pod, None, True, frozenset()
            return None
        s.violations += 1  # rule 6
        message = f"sticky violation: {s.kind} session {s.key} of {home} served by {pod}"
        if len(self.violation_samples) < 20:
            self.violation_samples.append(message)
        return message

    def failed_request(self, s: Session | None, start: float, end: float, reason: str) -> None:
        outages = self.log.current()
        if s is not None:
            s.failed += 1
            self._note_outages(s, start, end, outages)
        self.failed += 1
        if any(o.overlaps(start, end) for o in outages):
            self.failed_in_outage += 1
        self.failure_reasons[reason] += 1

    def _note_outages(
        self, s: Session, start: float, end: float, outages: tuple[Outage, ...]
    ) -> None:
        if s.kind != STICKY or s.home is None:
            return
        for outage in outages:
            if end < outage.down_at or s.born_at >= outage.down_at:
                continue
            stats = self.outage_stats.setdefault((outage.pod, outage.down_at), OutageStats())
            stats.alive.add(s.sid)
            if s.home == outage.pod and outage.overlaps(start, end):
                stats.of_pod.add(s.sid)

    # ----------------------------------------------------------------------- reporting

    def pods(self) -> list[str]:
        self.log.current()
        seen = set(self.log.pods) | set(self.requests_per_pod)
        seen.update(s.home for s in self.sessions if s.home is not None)
        return sorted(seen)

    def summary(self) -> dict[str, Any]:
        sticky = [s for s in self.sessions if s.kind == STICKY and s.home is not None]
        visitors = [s for s in self.sessions if s.kind == VISITOR and s.home is not None]
        pods = self.pods()
        per_pod = Counter(s.home for s in sticky)
        counts = [per_pod.get(p, 0) for p in pods]
        mean = sum(counts) / len(counts) if counts else 0.0
        by_id = {s.sid: s for s in sticky}
        outages = []
        for outage in self.log.current():
            stats = self.outage_stats.get((outage.pod, outage.down_at), OutageStats())
            of_pod = [by_id[i] for i in stats.of_pod if i in by_id]
            outages.append(
                {
                    "pod": outage.pod,
                    "down_at": round(outage.down_at - self.started_at, 3),
                    "up_at": None
                    if outage.up_at is None
                    else round(outage.up_at - self.started_at, 3),
                    "sessions_alive": len(stats.alive),
                    "sessions_of_pod": len(of_pod),
                    "rehomed": sum(s.rehomed for s in of_pod),
                    "returned": sum(s.returned for s in of_pod),
                    "share": round(len(of_pod) / len(stats.alive), 4) if stats.alive else 0.0,
                    "expected_share": round(1 / len(pods), 4) if pods else 0.0,
                }
            )
        return {
            "users": self.users,
            "sessions": len(sticky),
            "violations": sum(s.violations for s in self.sessions),
            "sticky_violations": sum(s.violations for s in sticky),
            "rehomed": sum(s.rehomed for s in sticky),
            "returned": sum(s.returned for s in sticky),
            "born_away_moved_home": sum(s.moved_home for s in sticky),
            "renewed": self.renewed,
            "cookie_reissued": self.reissued,
            "visitor_sessions": len(visitors),
            "visitor_violations": sum(s.violations for s in visitors),
            "visitor_rehomed": sum(s.rehomed for s in visitors),
            "visitor_moved_home": sum(s.moved_home for s in visitors),
            "served": sum(self.requests_per_pod.values()),
            "failed": self.failed,
            "failed_in_outage": self.failed_in_outage,
            "failure_reasons": dict(self.failure_reasons.most_common(10)),
            "pods": {
                p: {"sessions": per_pod.get(p, 0), "requests": self.requests_per_pod.get(p, 0)}
                for p in pods
            },
            "pod_count": len(pods),
            "max_mean": round(max(counts) / mean, 4) if mean else 0.0,
            "outages": outages,
            "violation_samples": self.violation_samples,
        }

    def rows(self) -> list[dict[str, Any]]:
        """The web UI table: one row per pod and a total."""
        data = self.summary()
        sticky = [s for s in self.sessions if s.kind == STICKY and s.home is not None]
        total = data["sessions"] or 1
        rows = []
        for pod, counts in data["pods"].items():
            mine = [s for s in sticky if s.home == pod]
            rows.append(
                {
                    "name": pod,
                    "sessions": counts["sessions"],
                    "share": f"{100 * counts['sessions'] / total:.1f}%",
                    "requests": counts["requests"],
                    "violations": sum(s.violations for s in mine),
                    "rehomed": sum(s.rehomed for s in mine),
                    "returned": sum(s.returned for s in mine),
                }
            )
        rows.append(
            {
                "name": f"all (max/mean {data['max_mean']:.2f})",
                "sessions": data["sessions"],
                "share": "100%",
                "requests": data["served"],
                "violations": data["violations"],
                "rehomed": data["rehomed"],
                "returned": data["returned"],
            }
        )
        return rows


def sticky_line(data: dict[str, Any]) -> str:
    return (
        f"sticky: users={data['users']} sessions={data['sessions']} "
        f"violations={data['violations']} rehomed={data['rehomed']} "
        f"pods={data['pod_count']} max/mean={data['max_mean']:.2f}"
    )


def report(data: dict[str, Any]) -> str:
    lines = [f"{'pod':<16} {'sessions':>8} {'share':>7} {'requests':>9}"]
    total = data["sessions"] or 1
    for pod, counts in data["pods"].items():
        share = 100 * counts["sessions"] / total
        lines.append(f"{pod:<16} {counts['sessions']:>8} {share:>6.1f}% {counts['requests']:>9}")
    lines.append(
        f"visitors: {data['visitor_sessions']} sessions, {data['visitor_violations']} violations;"
        f" failed requests: {data['failed']} ({data['failed_in_outage']} during pod outages)"
    )
    lines.extend(data["violation_samples"][:5])
    lines.append(sticky_line(data))
    return "\n".join(lines)


TRACKER = Tracker()


# --------------------------------------------------------------------------- users

_source_ips = itertools.count()


def next_source_ip() -> str:
    """A fresh loopback address: 127.1.1.1, 127.1.1.2, ... (all of 127/8 is loopback)."""
    n = next(_source_ips)
    return f"127.{1 + (n // 64516) % 254}.{1 + (n // 254) % 254}.{1 + n % 254}"


class SessionUser(FastHttpUser):
    """What both users share: carry a session key, request, judge the answer."""

    abstract = True
    affinity: str | None = None  # a subclass may pin these; else --sticky-affinity/--sticky-key
    key_name: str | None = None
    concurrency = 1  # one request at a time: one connection per user

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.opts = OPTIONS
        self.mode = self.affinity or self.opts.affinity
        if self.mode not in AFFINITIES:
            raise ValueError(f"affinity {self.mode!r}: expected one of {', '.join(AFFINITIES)}")
        name = self.key_name or (self.opts.key if not self.affinity else "")
        self.key_field = name or DEFAULT_KEYS[self.mode]
        self.read_pod = pod_reader(self.opts.pod_from)
        self.session: Session | None = None
        self.ident = ""  # the header/query id or the source address of the current session

    def wait_time(self) -> float:
        low, high = self.opts.wait
        return random.uniform(low, high)

    def on_start(self) -> None:
        TRACKER.users += 1

    def new_identity(self) -> None:
        """Become a new client: no cookie, no connection, a new id or source address."""
        self.client.cookiejar.clear()
        agent = self.client.client
        agent.clientpool.close()
        self.session = None
        if self.mode in ("header", "query"):
            self.ident = uuid.uuid4().hex
        elif self.mode == "source-ip":
            self.ident = next_source_ip()
            _bind_source(agent.clientpool.get_client(URL(self.host or "")), self.ident)

    def carried_key(self) -> str | None:
        if self.mode != "cookie":
            return self.ident
        for cookie in self.client.cookiejar:
            if cookie.name == self.key_field and not cookie.is_expired() and cookie.value:
                return _unquote(cookie.value)
        return None

    def request(self, kind: str, label: str) -> None:
        path = self.opts.path
        if self.mode == "query":
            path += ("&" if "?" in path else "?") + f"{self.key_field}={self.ident}"
        headers = {"Host": self.opts.vhost} if self.opts.vhost else {}
        if self.mode == "header":
            headers[self.key_field] = self.ident
        sent = self.carried_key()
        start = time.time()
        with self.client.get(path, headers=headers, catch_response=True, name=label) as resp:
            end = time.time()
            key = sent
            if self.mode == "cookie":
                issued = issued_cookie(resp, self.key_field)
                if key is None:
                    key = issued
                elif issued is not None and issued != key:
                    TRACKER.reissued += 1  # Envoy issues the cookie only when it is absent
            current = self.session if self.session is not None and self.session.key == key else None
            status = resp.status_code or 0
            if not 0 < status < 400:
                reason = f"HTTP {status}" if status else f"error {type(resp.error).__name__}"
                TRACKER.failed_request(current, start, end, reason)
                resp.failure(reason)
                return
            pod = self.read_pod(resp)
            if pod is None:
                TRACKER.failed_request(current, start, end, "no pod in the response")
                resp.failure(f"no pod in the response ({self.opts.pod_from})")
                return
            if key is None:
                TRACKER.failed_request(current, start, end, "no session key")
                resp.failure(f"no session key: no {self.key_field} cookie sent or issued")
                return
            if current is None:
                current = self.session = TRACKER.open(kind, key, replaces=self.session)
            violation = TRACKER.served(current, pod, start, end)
            if violation is not None:
                resp.failure(violation)
            else:
                resp.success()


def _bind_source(client: Any, address: str) -> None:
    """Make the client's new sockets leave from ``address`` (geventhttpclient has no option)."""
    pool = client._connection_pool
    create = pool._create_tcp_socket

    def create_bound(family: int, socktype: int, protocol: int) -> Any:
        sock = create(family, socktype, protocol)
        sock.bind((address, 0))
        return sock

    pool._create_tcp_socket = create_bound


class StickyUser(SessionUser):
    """One session for the user's life: open it, then keep requesting on it."""

    weight = 9

    def on_start(self) -> None:
        super().on_start()
        self.new_identity()
        self.request(STICKY, "open session")

    @task
    def keep_requesting(self) -> None:
        label = "session" if self.session is not None else "open session"
        self.request(STICKY, label)


class NewVisitorUser(SessionUser):
    """A new browser on every visit: drops cookies and connection, then a few requests."""

    weight = 1

    @task
    def visit(self) -> None:
        self.new_identity()
        for i in range(self.opts.visit_requests):
            self.request(VISITOR, "new visitor" if i == 0 else "visitor again")


# --------------------------------------------------------------------------- hooks


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    global OPTIONS
    OPTIONS = options_from(environment.parsed_options)
    pod_reader(OPTIONS.pod_from)  # a bad spec fails here, not in every user
    web_ui = environment.web_ui
    if web_ui is None or web_ui.app is None:
        return
    from flask import request

    columns = ["name", "sessions", "share", "requests", "violations", "rehomed", "returned"]
    titles = ["Pod", "Sessions", "Share", "Requests", "Violations", "Re-homed", "Returned"]
    web_ui.template_args["extended_tabs"] = [{"title": "Sticky sessions", "key": "sticky"}]
    web_ui.template_args["extended_tables"] = [
        {
            "key": "sticky",
            "structure": [{"key": k, "title": t} for k, t in zip(columns, titles, strict=True)],
        }
    ]

    @web_ui.app.after_request
    def _sticky_stats(response: Any) -> Any:
        if request.path == "/stats/requests" and response.is_json:
            data = response.get_json()
            data["extended_stats"] = [{"key": "sticky", "data": TRACKER.rows()}]
            response.set_data(json.dumps(data))
        return response


_reporter: gevent.Greenlet | None = None


def _reporter_loop(every: float) -> None:
    while True:
        gevent.sleep(every)
        print(sticky_line(TRACKER.summary()), flush=True)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    global TRACKER, OPTIONS, _reporter
    OPTIONS = options_from(environment.parsed_options)
    TRACKER = Tracker(OutageLog(OPTIONS.events_file))
    if OPTIONS.started_file:
        _write_json(OPTIONS.started_file, {"started_at": TRACKER.started_at})
    if OPTIONS.report_every > 0:
        _reporter = gevent.spawn(_reporter_loop, OPTIONS.report_every)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    global _reporter
    if _reporter is not None:
        _reporter.kill(block=False)
        _reporter = None
    data = TRACKER.summary()
    if OPTIONS.summary_file:
        _write_json(OPTIONS.summary_file, data)
    if not OPTIONS.quiet:
        print(report(data), file=sys.stdout, flush=True)


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
