"""Envoy's string and header matchers, compiled once per route (``proxy.routing`` uses them).

A ``StringTest`` is one Istio ``StringMatch`` (exact, prefix, regex on RE2 - whole-string, as
Envoy's ``safe_regex`` - or presence), optionally case-insensitive; a ``HeaderTest`` is Envoy's
``HeaderMatcher`` with the two flags Istio sets (``invert_match`` for ``withoutHeaders``, which
also treats a missing header as empty). Pure: no I/O, no state beyond the compiled match.
"""

from __future__ import annotations

from proxy.config import StringMatch
from proxy.regex import compile_regex

__all__ = ["HeaderTest", "StringTest"]


class StringTest:
    """One compiled StringMatch; ``present`` matches any value."""

    __slots__ = ("ci", "kind", "regex", "value")

    def __init__(self, match: StringMatch, *, ignore_case: bool = False) -> None:
        self.kind = match.kind
        self.ci = ignore_case
        self.value = match.value.lower() if ignore_case else match.value
        self.regex = compile_regex(match.value) if match.kind == "regex" else None

    def __call__(self, value: str) -> bool:
        kind = self.kind
        if kind == "exact":
            return (value.lower() if self.ci else value) == self.value
        if kind == "prefix":
            if self.ci:
                return value[: len(self.value)].lower() == self.value
            return value.startswith(self.value)
        if kind == "regex":
            assert self.regex is not None
            return self.regex.fullmatch(value) is not None
        return True


class HeaderTest:
    """Envoy's HeaderMatcher, including ``invert_match`` and ``treat_missing_header_as_empty``."""

    __slots__ = ("invert", "missing_as_empty", "name", "present", "test")

    def __init__(self, name: str, match: StringMatch, *, invert: bool) -> None:
        self.name = name
        self.present = match.kind == "present"
        self.test = StringTest(match)
        self.invert = invert
        # Istio sets treat_missing_header_as_empty on inverted value matches (withoutHeaders).
        self.missing_as_empty = invert and not self.present

    def __call__(self, value: str | None) -> bool:
        if value is None:
            if not self.missing_as_empty:
                return self.invert and self.present
            value = ""
        matched = self.present or self.test(value)
        return matched != self.invert
