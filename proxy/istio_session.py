"""The labels and annotations behind sessions that survive change, read from any resource's Meta.

Theory
------
Istio turns on Envoy's stateful-session filter for a *service* by its labels (pilot's
``MaybeBuildStatefulSessionFilterConfig``, behind ``PILOT_ENABLE_PERSISTENT_SESSION_FILTER``):

* ``istio.io/persistent-session: NAME`` or ``NAME:PATH`` - a cookie named NAME (path PATH, else
  ``/``; Istio gives it no TTL), which wins when both labels are set;
* ``istio.io/persistent-session-header: NAME`` - a header.

A route whose destination host carries one gets the session (the first such host of a weighted
split, as Istio). sticky-proxy reads the labels from a ServiceEntry's ``metadata.labels``; a
Kubernetes ``Service`` has the same ``metadata`` and goes through the same ``read_session``.
Beside the label, on the same object, sticky-proxy's own annotations (none of them Istio's):

================================================  ==========================================
``sticky-proxy/persistent-session-strict``        ``"true"``: 503 when the session's pod is gone
``sticky-proxy/session-drain``                    duration an endpoint that left discovery keeps
                                                  serving the sessions it has (default 0: off)
``sticky-proxy/persistent-session-ttl``           duration; the value expires (wall clock) and
                                                  the cookie gets Max-Age (default 0: never)
``sticky-proxy/persistent-session-key-file``      a file holding an HMAC key: values are signed
================================================  ==========================================

and two more for consistent hashing:

* ``sticky-proxy/hash-balance-factor: "125"`` on a DestinationRule: Envoy's bounded load
  (``proxy.bounded``), an integer >= 100;
* ``sticky-proxy/sticky-weights: "true"`` on a VirtualService: weighted destinations are picked
  by the request's hash (Envoy's ``WeightedCluster.use_hash_policy``), so a session keeps its
  subset.

Every value is checked here and reported with the resource and the annotation's path, once.
"""

from __future__ import annotations

import os
from typing import Final

from proxy.config import SessionSpec
from proxy.istio_names import Meta
from proxy.istio_reader import DURATION_HINT, Reader, parse_duration

PERSISTENT_SESSION_LABEL: Final = "istio.io/persistent-session"
PERSISTENT_SESSION_HEADER_LABEL: Final = "istio.io/persistent-session-header"
STRICT_ANNOTATION: Final = "sticky-proxy/persistent-session-strict"
DRAIN_ANNOTATION: Final = "sticky-proxy/session-drain"
TTL_ANNOTATION: Final = "sticky-proxy/persistent-session-ttl"
KEY_FILE_ANNOTATION: Final = "sticky-proxy/persistent-session-key-file"
BALANCE_ANNOTATION: Final = "sticky-proxy/hash-balance-factor"
STICKY_WEIGHTS_ANNOTATION: Final = "sticky-proxy/sticky-weights"
SESSION_ANNOTATIONS: Final = (
    STRICT_ANNOTATION,
    DRAIN_ANNOTATION,
    TTL_ANNOTATION,
    KEY_FILE_ANNOTATION,
)

MAX_DRAIN: Final = 24 * 3600.0
MIN_KEY_BYTES: Final = 16
MAX_KEY_BYTES: Final = 4096


def _annotation(key: str) -> str:
    return f"metadata.annotations.{key}"


def _boolean(r: Reader, meta: Meta, key: str) -> bool:
    text = meta.annotations.get(key)
    if text is None:
        return False
    if text not in ("true", "false"):
        r.error(_annotation(key), f'expected "true" or "false", got {text!r}')
        return False
    return text == "true"


def _duration(r: Reader, meta: Meta, key: str, *, whole_seconds: bool = False) -> float:
    text = meta.annotations.get(key)
    if text is None:
        return 0.0
    try:
        seconds = parse_duration(text) / 1e9
    except ValueError as exc:
        r.error(_annotation(key), f"{exc} ({DURATION_HINT})")
        return 0.0
    if seconds < 0 or seconds > MAX_DRAIN:
        r.error(_annotation(key), f"must be between 0s and 24h, got {text!r}")
        return 0.0
    if whole_seconds and seconds != int(seconds):
        r.error(_annotation(key), f"must be whole seconds, got {text!r}")
        return 0.0
    return seconds


def _key(r: Reader, meta: Meta) -> tuple[bytes | None, str]:
    path = meta.annotations.get(KEY_FILE_ANNOTATION)
    if path is None:
        return None, ""
    here = _annotation(KEY_FILE_ANNOTATION)
    try:
        with open(path, "rb") as f:
            key = f.read(MAX_KEY_BYTES + 1).strip()
    except OSError as exc:
        r.error(here, f"cannot read the key file {path!r}: {exc.strerror or exc}")
        return None, path
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        r.error(
            here,
            f"the key file {path!r} must hold {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes "
            f"(got {len(key)}); for example: head -c 32 /dev/urandom | base64 > {path}",
        )
        return None, path
    return key, os.path.abspath(path)


def read_session(r: Reader, meta: Meta) -> SessionSpec | None:
    """The persistent session a ServiceEntry's (or Service's) labels ask for, or None."""
    cookie = meta.labels.get(PERSISTENT_SESSION_LABEL, "")
    header = meta.labels.get(PERSISTENT_SESSION_HEADER_LABEL, "")
    if not cookie and not header:
        for name in SESSION_ANNOTATIONS:
            if name in meta.annotations:
                r.error(
                    _annotation(name),
                    f"needs the label {PERSISTENT_SESSION_LABEL} (or "
                    f"{PERSISTENT_SESSION_HEADER_LABEL}) on the same {meta.kind}",
                )
        return None
    strict = _boolean(r, meta, STRICT_ANNOTATION)
    drain = _duration(r, meta, DRAIN_ANNOTATION)
    ttl = int(_duration(r, meta, TTL_ANNOTATION, whole_seconds=True))
    key, key_file = _key(r, meta)
    source = f"{meta.kind} {meta.key}"
    if cookie:
        name, found, path = cookie.partition(":")
        label = f"metadata.labels.{PERSISTENT_SESSION_LABEL}"
        if not name or ";" in name or "=" in name or " " in name:
            r.error(label, f"invalid cookie name {name!r} (the label is NAME or NAME:PATH)")
            return None
        if found and path and not path.startswith("/"):
            r.error(label, f"the cookie path must start with '/': {path!r}")
            return None
        return SessionSpec(
            "cookie", name, path if found else "/", ttl, strict, drain, key, key_file, source
        )
    if ttl:
        r.warn(
            _annotation(TTL_ANNOTATION),
            "ignored: Envoy's header form carries no expiry (only the cookie form does)",
        )
    if not header.replace("-", "").replace("_", "").isalnum():
        r.error(
            f"metadata.labels.{PERSISTENT_SESSION_HEADER_LABEL}", f"invalid header name {header!r}"
        )
        return None
    return SessionSpec("header", header.lower(), "", 0, strict, drain, key, key_file, source)


def read_balance_factor(r: Reader, meta: Meta) -> int:
    """``sticky-proxy/hash-balance-factor`` of a DestinationRule: 0 (off) or a factor >= 100."""
    text = meta.annotations.get(BALANCE_ANNOTATION)
    if text is None:
        return 0
    if not text.isdigit() or int(text) < 100 or int(text) > 100_000:
        r.error(
            _annotation(BALANCE_ANNOTATION),
            f"expected a whole percentage from 100 to 100000 (125: no pod above 1.25x the mean "
            f"of requests in flight), got {text!r}",
        )
        return 0
    return int(text)


def read_sticky_weights(r: Reader, meta: Meta) -> bool:
    """``sticky-proxy/sticky-weights`` of a VirtualService."""
    return _boolean(r, meta, STICKY_WEIGHTS_ANNOTATION)
