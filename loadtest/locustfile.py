"""Locust users that prove sticky sessions held through the proxy (or say where they broke).

Run it through ``loadtest/run.py`` (which also starts demo pods and the proxy, and can kill a pod
mid-run), or directly against any target::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080
    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s --host http://127.0.0.1:8080 \\
        --sticky-affinity header --sticky-key x-user --sticky-pod-from header:X-Pod

Users
-----
``StickyUser`` opens one session (its first request gets the cookie) and keeps requesting with
it (for its whole life, or ``--sticky-session-requests`` requests, then it opens another);
``NewVisitorUser`` is a new browser on every visit: it drops its cookies and its connections,
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

The rules that judge every served response (sessions, re-homed, violations, the spread over
pods) and their counters are in ``stickiness.py`` beside this file: locust puts the
locustfile's folder on ``sys.path`` while it loads it, so a plain import finds it.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from geventhttpclient.url import URL
from locust import FastHttpUser, events, task
from locust.env import Environment
from stickiness import STICKY, VISITOR, OutageLog, Session, Tracker, report, sticky_line
from stickiness import Outage as Outage  # re-exported: the rules test builds outages through here

AFFINITIES = ("cookie", "header", "query", "source-ip")
DEFAULT_KEYS = {"cookie": "ISTIOID", "header": "x-session", "query": "session", "source-ip": ""}


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
    session_requests: int = 0  # a StickyUser opens a new session after this many (0: never)
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
        "--sticky-session-requests",
        type=int,
        default=0,
        help="a StickyUser opens a new session after this many requests (default 0: never)",
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
        session_requests=max(0, int(parsed.sticky_session_requests)),
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


# --------------------------------------------------------------------------- users

TRACKER = Tracker()  # a new one at every test start (_on_test_start)
_source_ips = itertools.count()
_lives = itertools.count(1)


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
        self.life = 0  # this identity's number: its session may change keys, not its life
        self.life_requests = 0

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
        self.life = next(_lives)
        self.life_requests = 0
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
            if kind == STICKY:
                TRACKER.lived(self.life, pod, end)
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
        limit = self.opts.session_requests
        self.life_requests += 1
        if limit and self.life_requests >= limit:
            self.new_identity()
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
