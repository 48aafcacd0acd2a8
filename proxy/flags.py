"""Command-line values that are more than a number: durations, and defaults from the environment.

Every duration flag (``--drain-time``, ``--drain-deadline``, ``--dns-refresh``, ``--ttl``, the
client timeouts) takes
what Istio's YAML takes, Go's ``time.ParseDuration`` syntax (``500ms``, ``5s``, ``1m30s``), and
plain seconds (``5``, ``0.5``), so a value copied from a DestinationRule or from Istio's
``terminationDrainDuration`` works as it is, and so does a bare number. These are argparse
``type=`` functions: a bad value is reported by argparse, naming the flag.

``STICKY_PROXY_LISTEN`` stands for ``--listen`` when no ``--listen`` is given: the container
image sets it to ``0.0.0.0:8080``, as Istio's ingress gateway listens on 8080 for a Gateway's
port 80, so the image runs as non-root wherever it runs, whatever command line it is given.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping

from proxy.istio_reader import DURATION_HINT, is_dns1123_label, parse_duration

__all__ = [
    "LISTEN_ENV",
    "env_listen",
    "istio_duration",
    "namespace_name",
    "positive_seconds",
    "seconds",
]

LISTEN_ENV = "STICKY_PROXY_LISTEN"


def seconds(text: str) -> float:
    """``5``, ``0.5``, ``500ms``, ``5s``, ``1m`` -> seconds (>= 0)."""
    value = _plain_seconds(text)
    if value is None:
        try:
            value = parse_duration(text.strip()) / 1e9
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"{exc}: give seconds (5, 0.5) or a duration ({DURATION_HINT})"
            ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration cannot be negative")
    return value


def positive_seconds(text: str) -> float:
    """:func:`seconds`, more than 0 (a timeout of nothing would close at once)."""
    value = seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def istio_duration(text: str) -> str:
    """A duration for Istio YAML (quick mode's ``--ttl``): plain seconds get their unit."""
    seconds(text)  # the same errors as the other duration flags
    body = text.strip()
    return f"{body}s" if _plain_seconds(body) is not None else body


def namespace_name(text: str) -> str:
    """``--namespace``: a Kubernetes namespace name (a DNS-1123 label)."""
    if not is_dns1123_label(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a namespace name (lowercase letters, digits and '-', "
            "at most 63 characters)"
        )
    return text


def _plain_seconds(text: str) -> float | None:
    """A plain decimal number of seconds, or None (``inf``, ``nan`` and ``1e3`` are not)."""
    body = text.strip()
    digits = body.lstrip("+-").replace(".", "", 1)
    if not digits.isdigit() or not digits.isascii():
        return None
    value = float(body)
    return value if math.isfinite(value) else None


def env_listen(environ: Mapping[str, str] = os.environ) -> list[str]:
    """``$STICKY_PROXY_LISTEN``'s addresses (comma- or space-separated), [] when unset."""
    return environ.get(LISTEN_ENV, "").replace(",", " ").split()
