"""Prometheus metrics with Istio's and Envoy's names, cheap on the request path.

Theory
------
Dashboards built for the Istio ingress gateway read three families, and we keep their names:

* Istio's standard request metrics, labelled the way a gateway reports them
  (``reporter="source"``, ``source_workload`` = us, ``destination_*`` = the cluster's service,
  ``connection_security_policy="unknown"`` on HTTP and HTTPS alike, as Istio's)::

      istio_requests_total                    counter
      istio_request_duration_milliseconds     histogram (Istio's buckets, 0.5 ms .. 1 h)
      istio_request_bytes / istio_response_bytes   histograms (1, 10, ..., 1e8 bytes)

* Envoy's cluster statistics, labelled ``cluster_name`` as Istio's Envoy exports them
  (``envoy_cluster_membership_healthy``, ``..._total``, upstream requests by code class, retries,
  active connections and requests, ejections);
* the proxy's own ``sticky_*`` counters (cookies issued, sessions re-homed, balancer rebuilds,
  config reloads; persistent sessions routed, re-picked by reason and served while draining,
  and requests bounded load spilled off a full endpoint).

prometheus-client appends ``_total`` to every counter it exposes, so Envoy's counters appear as
``envoy_cluster_upstream_rq_xx_total`` and so on; gauges keep Envoy's names exactly.

Cost
----
A prometheus-client increment takes a lock (~0.4 us; ``Counter.inc`` ~0.6 us) and a label
lookup hashes a tuple of strings: a request touching six values that way pays ~3.5 us. So the
request path never calls prometheus-client. A :class:`ClusterStats` is built with each
cluster's runtime (and rebuilt only when its spec changes on reload); per (status, response
flags) it keeps a ``_Tally`` of plain numbers (request count, upstream count, and for the three
histograms a count per bucket plus the sum). A request pays one dict lookup, three bucket scans
and a few attribute increments (~0.7 us); :meth:`Metrics.flush` moves the tallies into the label
children they were built with, right before each scrape (one process), every second (workers),
and at shutdown. Figures that only matter at scrape time (membership, active connections) are
read from the live snapshots by :meth:`Metrics.refresh`, never counted per request. The session
key is never a label.

Several workers (``--workers N``) write through prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before a worker imports this module); the
supervisor's endpoint adds them up.  Gauges say how to combine workers (``livemax`` for figures
every worker sees alike, ``livesum`` for what each worker holds), and control-plane events every
worker repeats (reloads, rebuilds) are counted by worker 0 only, so a sum is not N times the truth.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from proxy.cluster import Cluster, ClusterSnapshot
    from proxy.config import ClusterSpec
    from proxy.exchange import Exchange

# Istio's default buckets (istio/proxy extensions/stats: DURATION and BYTES buckets).
DURATION_BUCKETS_MS: Final = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
    1800000, 3600000,
)  # fmt: skip
BYTES_BUCKETS: Final = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)

ISTIO_LABELS: Final = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_version",
    "destination_port",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
)
UNKNOWN: Final = "unknown"
# Istio's stats filter sets connection_security_policy (mutual_tls / none) only where it
# reports as the destination; a gateway reports as the source, where it is always "unknown",
# with or without TLS (istio/proxy istio_stats.cc, populateFlagsAndConnectionSecurity).
SECURITY_POLICY: Final = UNKNOWN


CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# ``*_created`` series double the output and no Istio dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    """The directory workers write metrics to, when running as workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def service_labels(spec: ClusterSpec | None) -> tuple[str, str, str, str, str, str]:
    """destination_service, _name, _namespace, _version, _port, _cluster of a cluster."""
    if spec is None:
        return (UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
    host = spec.host
    parts = host.split(".")
    # Kubernetes names: svc.ns.svc.cluster.local; anything else (a ServiceEntry host) is itself.
    name = parts[0] if len(parts) > 1 and ".svc." in host else host
    namespace = parts[1] if len(parts) > 2 and ".svc." in host else UNKNOWN
    return (host, name, namespace, spec.subset or UNKNOWN, str(spec.port), spec.name)


class Metrics:
    """Every collector of one proxy process, in its own registry."""

    def __init__(
        self,
        *,
        workload: str = "sticky-proxy",
        namespace: str = "default",
        control: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.control = control  # worker 0 (or the only process) counts control-plane events
        self.source = ("source", workload, namespace)
        reg = self.registry
        self.requests = Counter("istio_requests", "Requests processed", ISTIO_LABELS, registry=reg)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration (first request byte to last response byte)",
            ISTIO_LABELS,
            buckets=DURATION_BUCKETS_MS,
            registry=reg,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes", "Request body size", ISTIO_LABELS, buckets=BYTES_BUCKETS,
            registry=reg,
        )  # fmt: skip
        self.response_bytes = Histogram(
            "istio_response_bytes", "Response body size", ISTIO_LABELS, buckets=BYTES_BUCKETS,
            registry=reg,
        )  # fmt: skip
        c = ("cluster_name",)
        self.membership_healthy = Gauge(
            "envoy_cluster_membership_healthy", "Healthy endpoints", c,
            registry=reg, multiprocess_mode="livemax",
        )  # fmt: skip
        self.membership_total = Gauge(
            "envoy_cluster_membership_total", "Endpoints", c,
            registry=reg, multiprocess_mode="livemax",
        )  # fmt: skip
        self.ejections_active = Gauge(
            "envoy_cluster_outlier_detection_ejections_active",
            "Endpoints out of the balancer (outlier ejection or failed health checks)",
            c, registry=reg, multiprocess_mode="livemax",
        )  # fmt: skip
        self.cx_active = Gauge(
            "envoy_cluster_upstream_cx_active", "Upstream connections (busy + idle)", c,
            registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.rq_active = Gauge(
            "envoy_cluster_upstream_rq_active", "Requests in flight", c,
            registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.upstream_rq = Counter(
            "envoy_cluster_upstream_rq_xx",
            "Upstream responses by code class",
            ("cluster_name", "response_code_class"),
            registry=reg,
        )
        self.upstream_retries = Counter(
            "envoy_cluster_upstream_rq_retry", "Upstream request retries", c, registry=reg
        )
        self.cookies_issued = Counter(
            "sticky_cookies_issued", "Session cookies issued (first visits)", c, registry=reg
        )
        self.rehomed = Counter(
            "sticky_sessions_rehomed",
            "Requests with a session key sent to another endpoint than the key's own",
            ("cluster_name", "reason"),
            registry=reg,
        )
        self.replays = Counter(
            "sticky_requests_replayed",
            "Requests sent again after they had reached an endpoint (retries, stale connections)",
            c,
            registry=reg,
        )
        self.session_routed = Counter(
            "sticky_persistent_sessions_routed",
            "Requests a persistent session cookie or header sent to the pod it names",
            c,
            registry=reg,
        )
        self.session_repicked = Counter(
            "sticky_persistent_sessions_repicked",
            "Requests whose persistent session could not be used: the balancer picked again "
            "(reason: gone, unhealthy, expired, bad_signature)",
            ("cluster_name", "reason"),
            registry=reg,
        )
        self.session_draining = Counter(
            "sticky_persistent_sessions_draining",
            "Requests a persistent session sent to an endpoint that is draining",
            c,
            registry=reg,
        )
        self.bounded_spilled = Counter(
            "sticky_bounded_load_spilled",
            "Requests bounded load sent off their hashed endpoint because it was full",
            c,
            registry=reg,
        )
        self.rebuilds = Counter("sticky_balancer_rebuilds", "Ring/table rebuilds", c, registry=reg)
        self.reloads = Counter(
            "sticky_config_reloads", "Configuration reloads", ("result",), registry=reg
        )
        self.worker_connections = Counter(
            "sticky_worker_downstream_cx",
            "Downstream connections accepted, by worker",
            ("worker",),
            registry=reg,
        )
        self.all_stats: list[ClusterStats] = []  # every one ever built, for flush()
        self.unknown = ClusterStats(self, None)

    # ------------------------------------------------------------------ control plane
    def cluster(self, spec: ClusterSpec) -> ClusterStats:
        return ClusterStats(self, spec)

    def reload(self, ok: bool) -> None:
        if self.control:
            self.reloads.labels("success" if ok else "failure").inc()

    def rebuilt(self, cluster: Cluster[object]) -> None:
        if self.control:
            self.rebuilds.labels(cluster.name).inc()

    def refresh(self, clusters: Iterable[tuple[str, ClusterSnapshot[object], int]]) -> None:
        """Set the scrape-time gauges from live snapshots: (name, snapshot, requests active)."""
        for name, snap, active in clusters:
            total = len(snap.endpoints)
            self.membership_total.labels(name).set(total)
            self.membership_healthy.labels(name).set(len(snap.healthy))
            self.ejections_active.labels(name).set(total - len(snap.healthy))
            self.rq_active.labels(name).set(active)
            idle = sum(getattr(pool, "idle_count", 0) for pool in snap.pools.values())
            self.cx_active.labels(name).set(idle + active)

    def forget(self, name: str) -> None:
        """A cluster went away on reload: drop its gauges (counters keep their history)."""
        for gauge in (
            self.membership_total,
            self.membership_healthy,
            self.ejections_active,
            self.rq_active,
            self.cx_active,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    def flush(self) -> None:
        """Move the request path's plain counts into the collectors (before a scrape)."""
        for stats in self.all_stats:
            stats.flush()

    def exposition(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)


def aggregate(path: str) -> bytes:
    """The Prometheus text of every worker's files under ``path`` (the supervisor's scrape)."""
    registry = CollectorRegistry(auto_describe=True)
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


# Variable-length tuple types on purpose: compiled (setup.py), a fixed-length tuple is an
# unboxed C struct that would be boxed again, element by element, on every use.
# Floats all: compiled, each bound is unboxed as it is compared, and an int unboxes slowly.
_DURATION_BOUNDS: Final[tuple[float, ...]] = (*map(float, DURATION_BUCKETS_MS), math.inf)
_BYTES_BOUNDS: Final[tuple[int, ...]] = BYTES_BUCKETS  # +Inf is the slot past the last


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    """``bisect_left(bounds, value)`` by a scan from the smallest bound: the values recorded
    (milliseconds, bytes) nearly always fall in the first few buckets, and compiled this is a
    few float compares where bisect compares Python objects."""
    i = 0
    for bound in bounds:
        if value <= bound:
            return i
        i += 1
    return i


def _size_bucket(value: int) -> int:
    """``_bucket`` for a byte count: int compares (compiled, a float bound is unboxed first)."""
    i = 0
    for bound in _BYTES_BOUNDS:
        if value <= bound:
            return i
        i += 1
    return i


def _add_to_histogram(child: Histogram, counts: list[int], total: float) -> None:
    """Add bucket counts (non-cumulative, one per bound incl. +Inf) and a sum to a histogram
    child: what ``observe`` would have done once per observation."""
    buckets = child._buckets
    for i, count in enumerate(counts):
        if count:
            buckets[i].inc(count)
            counts[i] = 0
    child._sum.inc(total)


class _Tally:
    """Counts of one (cluster, status, flags) since the last flush, as plain numbers."""

    __slots__ = (
        "children",
        "dur",
        "dur_sum",
        "n",
        "req",
        "req_sum",
        "resp",
        "resp_sum",
        "retries",
        "up",
    )

    def __init__(
        self,
        children: tuple[Counter, Histogram, Histogram, Histogram, Counter | None],
    ) -> None:
        self.children = children
        self.n = 0
        self.up = 0
        self.retries = 0
        self.dur = [0] * len(_DURATION_BOUNDS)
        self.req = [0] * (len(_BYTES_BOUNDS) + 1)
        self.resp = [0] * (len(_BYTES_BOUNDS) + 1)
        self.dur_sum = 0.0
        self.req_sum = 0
        self.resp_sum = 0

    def flush(self) -> None:
        if not self.n:
            return
        requests, duration, req_bytes, resp_bytes, upstream = self.children
        requests.inc(self.n)
        _add_to_histogram(duration, self.dur, self.dur_sum)
        _add_to_histogram(req_bytes, self.req, self.req_sum)
        _add_to_histogram(resp_bytes, self.resp, self.resp_sum)
        if upstream is not None and self.up:
            upstream.inc(self.up)
        self.n = self.up = self.req_sum = self.resp_sum = 0
        self.dur_sum = 0.0


class ClusterStats:
    """The metric children of one cluster (or of requests that reached none), cached.

    ``record`` is the request path, called from ``Dispatcher.finished`` for every exchange: it
    adds to plain numbers in a ``_Tally`` (a few attribute increments and three bucket scans, no
    lock); :meth:`flush` moves them into the prometheus-client children, at scrape time (one
    process) or every second (workers). ``active`` (requests in flight) and ``cookies`` are
    plain ints too, and so are the persistent-session and bounded-load counts (``session_*``,
    ``spilled``; their label children are made at the first flush that has something to add).
    """

    __slots__ = (
        "_base",
        "_by_result",
        "_by_status",
        "_cookies_child",
        "_metrics",
        "active",
        "cookies",
        "name",
        "rehomed",
        "replayed",
        "replays",
        "retried",
        "retries",
        "session_bad_signature",
        "session_draining",
        "session_expired",
        "session_gone",
        "session_routed",
        "session_unhealthy",
        "spilled",
    )

    def __init__(self, metrics: Metrics, spec: ClusterSpec | None) -> None:
        self._metrics = metrics
        self._base = (*metrics.source, *service_labels(spec), "http")
        self.name = spec.name if spec is not None else UNKNOWN
        self._by_result: dict[tuple[int, str], _Tally] = {}
        # The same tallies for flags "-" (nearly every request) by status alone: no key tuple.
        self._by_status: dict[int, _Tally] = {}
        self.active = 0
        self.cookies = 0
        self.retried = 0  # attempts after the first, from Exchange.retries
        self._cookies_child = metrics.cookies_issued.labels(self.name)
        self.retries = metrics.upstream_retries.labels(self.name)
        self.replayed = 0  # from Exchange.replays
        self.replays = metrics.replays.labels(self.name)
        self.rehomed = metrics.rehomed.labels(self.name, "connect_failure")
        self.session_routed = 0
        self.session_draining = 0
        self.session_gone = 0
        self.session_unhealthy = 0
        self.session_expired = 0
        self.session_bad_signature = 0
        self.spilled = 0
        metrics.all_stats.append(self)

    def _tally(self, key: tuple[int, str]) -> _Tally:
        m = self._metrics
        status, flags = key
        labels = (*self._base, str(status), flags, SECURITY_POLICY)
        upstream = None
        if self.name != UNKNOWN and status:
            upstream = m.upstream_rq.labels(self.name, f"{status // 100}xx")
        tally = _Tally(
            (
                m.requests.labels(*labels),
                m.duration.labels(*labels),
                m.request_bytes.labels(*labels),
                m.response_bytes.labels(*labels),
                upstream,
            )
        )
        self._by_result[key] = tally
        return tally

    def record(self, ex: Exchange) -> None:
        status = ex.status
        if ex.flags == "-":
            t = self._by_status.get(status)
            if t is None:
                t = self._by_status[status] = self._tally((status, "-"))
        else:
            key = (status, ex.flags)
            t = self._by_result.get(key) or self._tally(key)
        t.n += 1
        # counts[i] = counts[i] + 1, not counts[i] += 1: compiled, the augmented form on a list
        # item is a generic PyNumber_InPlaceAdd, the plain one an unboxed int add.
        ms = (ex.end - ex.start) * 1000.0
        counts = t.dur
        i = _bucket(_DURATION_BOUNDS, ms)
        counts[i] = counts[i] + 1
        t.dur_sum += ms
        size = ex.bytes_received
        counts = t.req
        i = _size_bucket(size)
        counts[i] = counts[i] + 1
        t.req_sum += size
        size = ex.bytes_sent
        counts = t.resp
        i = _size_bucket(size)
        counts[i] = counts[i] + 1
        t.resp_sum += size
        if ex.upstream is not None:
            t.up += 1
        if ex.retries:
            self.retried += ex.retries
        if ex.replays:
            self.replayed += ex.replays

    def flush(self) -> None:
        for tally in list(self._by_result.values()):
            tally.flush()
        if self.retried:
            self.retries.inc(self.retried)
            self.retried = 0
        if self.replayed:
            self.replays.inc(self.replayed)
            self.replayed = 0
        if self.cookies:
            self._cookies_child.inc(self.cookies)
            self.cookies = 0
        m = self._metrics
        if self.session_routed:
            m.session_routed.labels(self.name).inc(self.session_routed)
            self.session_routed = 0
        if self.session_draining:
            m.session_draining.labels(self.name).inc(self.session_draining)
            self.session_draining = 0
        if self.spilled:
            m.bounded_spilled.labels(self.name).inc(self.spilled)
            self.spilled = 0
        for reason, count in (
            ("gone", self.session_gone),
            ("unhealthy", self.session_unhealthy),
            ("expired", self.session_expired),
            ("bad_signature", self.session_bad_signature),
        ):
            if count:
                m.session_repicked.labels(self.name, reason).inc(count)
        self.session_gone = self.session_unhealthy = 0
        self.session_expired = self.session_bad_signature = 0
