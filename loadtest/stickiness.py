"""The stickiness rules of the load test: what a served response proves, and the counters.

Apart from the locustfile because it is the part a reader audits and a test checks: it imports
neither locust nor gevent (locust monkey-patches the standard library when imported), so it can
be read, imported and exercised on its own.  The locustfile reads the responses (pod, session
key) and feeds them in; ``Tracker`` judges each one against the rules below and keeps every
counter; ``summary`` (the JSON ``run.py`` reads), ``sticky_line`` and ``report`` are the text.

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

Membership changes (``run.py --scale``, ``--rolling-restart``) come from the events file too:
each ``change`` has an ``at`` written *before* the proxy's configuration changes and a ``done``
written *after* the new one is in place.  A session served by another pod than its home, when a
change began before this request ended and was not yet done when its previous request started,
is **moved by a change** (rule 5b, checked before rule 6): with consistent hashing, adding or
removing pods moves sessions of surviving pods too, by design (Envoy's ring), so that is counted,
not called a violation; the new pod becomes its home.

**Sessions broken per event** are counted on *lives*, not keys: a StickyUser's life is one
session from its first request to the next ``new_identity`` (``--sticky-session-requests``), and
keeps its identity when a persistent-session cookie is re-issued with a new value.  A life is
broken by change E when its pod changes (a response from another pod than its previous one) at
or after E and before the next change; it was *alive* at E when it had a response before E and
one after it.

For each outage of pod X: the sessions *alive* at ``down_at`` (opened before it, used after
it) and among them the *sessions of X* (home X, with a request overlapping the outage).  When
the proxy moves every one of them to another pod, ``re-homed == sessions of X``, and their
share of the alive sessions is close to X's share of the hash ring (about 1/N for N pods).
Sessions per pod count each StickyUser session (visitors apart) by its home; ``max/mean`` is
the largest count over the mean across pods (1.00 = perfectly even).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Session kinds: the users that open them (visitors are counted apart from the spread).
STICKY = "sticky"
VISITOR = "visitor"


# --------------------------------------------------------------------------- outages


@dataclass(frozen=True, slots=True)
class Outage:
    """Pod ``pod`` may have been down in ``[down_at, up_at]`` (wall clock; up_at None: still)."""

    pod: str
    down_at: float
    up_at: float | None = None
    reason: str = "kill"  # or "left": the pod left the proxy at a change, then stopped

    def overlaps(self, start: float, end: float) -> bool:
        return self.down_at <= end and (self.up_at is None or self.up_at >= start)


@dataclass(frozen=True, slots=True)
class Change:
    """The proxy's pod set changed at ``at`` (wall clock): ``kind`` scale-up, scale-down or
    restart, ``label`` says what (``3 -> 5 pods``, ``pod-2 -> pod-6``)."""

    kind: str
    at: float
    label: str = ""
    done: float | None = None  # None: still being applied

    def explains(self, previous_start: float, end: float) -> bool:
        """Could this change have moved a session between two of its requests?"""
        return self.at <= end and (self.done is None or self.done >= previous_start)


class OutageLog:
    """The events file, re-read whenever it changes (one ``stat`` per request)."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._mtime: float | None = None
        self.outages: tuple[Outage, ...] = ()
        self.changes: tuple[Change, ...] = ()
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
                Outage(o["pod"], float(o["down_at"]), o.get("up_at"), o.get("reason", "kill"))
                for o in data["outages"]
            )
            self.changes = tuple(
                Change(c["kind"], float(c["at"]), c.get("label", ""), c.get("done"))
                for c in data.get("changes", ())
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
    moved_by_change: bool = False
    last_start: float = 0.0
    served: int = 0
    failed: int = 0
    violations: int = 0


@dataclass(slots=True, eq=False)
class Life:
    """One StickyUser session from its first request to its last (see the module docstring)."""

    first_end: float
    last_end: float
    pod: str
    moves: list[float] = field(default_factory=list)  # when its pod changed (response end)


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
        self.lives: dict[int, Life] = {}
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
        previous_start, s.last_start = s.last_start, start
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
        if any(c.explains(previous_start, end) for c in self.log.changes):  # rule 5b
            s.home, s.away, s.moved_by_change = pod, None, True
            return None
        s.violations += 1  # rule 6
        message = f"sticky violation: {s.kind} session {s.key} of {home} served by {pod}"
        if len(self.violation_samples) < 20:
            self.violation_samples.append(message)
        return message

    def lived(self, life: int, pod: str, end: float) -> None:
        """A StickyUser life (its ``life`` number) was served by ``pod``, ending at ``end``."""
        found = self.lives.get(life)
        if found is None:
            self.lives[life] = Life(end, end, pod)
            return
        if pod != found.pod:
            found.moves.append(end)
            found.pod = pod
        found.last_end = end

    def broken_per_change(self) -> list[dict[str, Any]]:
        """For each membership change: the lives alive at it and those it broke."""
        changes = sorted(self.log.changes, key=lambda c: c.at)
        out = []
        for i, change in enumerate(changes):
            until = changes[i + 1].at if i + 1 < len(changes) else float("inf")
            alive = [
                life for life in self.lives.values() if life.first_end < change.at < life.last_end
            ]
            broken = sum(1 for life in alive if any(change.at <= t < until for t in life.moves))
            out.append(
                {
                    "kind": change.kind,
                    "label": change.label,
                    "at": round(change.at - self.started_at, 3),
                    "sessions_alive": len(alive),
                    "sessions_broken": broken,
                }
            )
        return out

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
                    "reason": outage.reason,
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
            "moved_by_change": sum(s.moved_by_change for s in sticky),
            "changes": self.broken_per_change(),
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
