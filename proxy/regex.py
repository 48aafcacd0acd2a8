"""Regular expressions as Envoy runs them: RE2 (google-re2), linear in the text they scan.

Istio's ``regex`` matches and ``uriRegexRewrite`` are RE2 patterns, and Envoy evaluates them
with RE2, whose matching time is linear in the input whatever the pattern. Python's ``re``
backtracks: a pattern such as ``(a+)+$`` in a VirtualService would let any client spend
seconds of CPU with a 50-byte path. So patterns are compiled here, once per config, with the
engine Envoy uses: the same syntax is accepted (no lookarounds, no backreferences) and the
same time bound holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import re2

_OPTIONS: Any = re2.Options()
_OPTIONS.log_errors = False  # errors are raised and reported with the YAML path, not logged


class Match(Protocol):
    def group(self, index: int) -> str | None: ...


class Regex(Protocol):
    """What the router uses of a compiled pattern."""

    def fullmatch(self, text: str) -> Match | None: ...

    def sub(self, repl: Callable[[Match], str], text: str) -> str: ...


def compile_regex(pattern: str) -> Regex:
    """The compiled pattern; ValueError with RE2's reason when it is not valid RE2."""
    try:
        compiled: Regex = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        raise ValueError(text) from None
    return compiled
