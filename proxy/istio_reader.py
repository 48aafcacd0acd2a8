"""Reading Istio's YAML strictly: typed access, YAML paths, Go durations, DNS names, errors.

This module owns the validation primitives the Istio compiler (``proxy.istio`` and the
``proxy.istio_*`` modules) reads untyped YAML with: ``Reader``, which checks types and field
names and records every problem in ``Issues`` instead of raising at the first one (a user fixing
a file sees all of its mistakes at once), each message naming the file, resource and YAML path
(``join_path``, ``type_name``, ``did_you_mean``); Go's ``time.ParseDuration`` syntax that Istio
durations use (``parse_duration``); Istio's host-name checks (``is_dns1123_label``,
``fqdn_problem``, ``wildcard_domain_problem``); and the ``sticky-proxy/health-check``
annotation's mini-language (``parse_health_check``). It produces values of the model
(``proxy.config``) and is imported by nothing on the request path.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from proxy.config import HealthCheckSpec


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest candidate (difflib), case-insensitive first."""
    pool = list(candidates)
    for candidate in pool:
        if candidate.lower() == word.lower():
            return f" (did you mean {candidate}?)"
    close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
DURATION_HINT = "Istio durations look like 60s, 1.5s, 100ms, 1m30s, 1h"


def parse_duration(text: str) -> int:
    """Nanoseconds of a duration in Go's ``time.ParseDuration`` syntax, which Istio's YAML uses.

    Istio decodes ``google.protobuf.Duration`` fields with ``time.ParseDuration`` (not only the
    protobuf JSON form ``"3.5s"``): a sign, then one or more ``<number><unit>`` with units ns, us
    (or \u00b5s), ms, s, m, h; ``"0"`` alone is zero.  Raises ValueError with the reason.
    """
    s = text
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None or m.end() == pos:  # pragma: no cover - the pattern always matches
            raise ValueError(f"invalid duration {text!r}")
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac:
            raise ValueError(f"invalid duration {text!r}")
        if not unit:
            raise ValueError(f"missing unit in duration {text!r}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        scale = _DURATION_UNITS[unit]
        value = int(whole or "0") * scale
        if frac:
            # Go keeps the fraction exact down to the nanosecond and truncates the rest.
            value += int(frac) * scale // 10 ** len(frac)
        total += value
        pos = m.end()
    return sign * total


def is_dns1123_label(text: str) -> bool:
    return len(text) <= 63 and _DNS1123_LABEL.fullmatch(text) is not None


_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_WILDCARD_LABEL = re.compile(r"\*|(\*|\*-)?[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def fqdn_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS name Istio accepts (``ValidateFQDN``), or None."""
    if not name:
        return "domain name cannot be empty"
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    for label in labels:
        if not is_dns1123_label(label):
            return f"domain name {name!r} invalid (label {label!r} invalid)"
    return None


def wildcard_domain_problem(name: str) -> str | None:
    """Why ``name`` is not a host Istio accepts (``ValidateWildcardDomain``), or None.

    Only the first label may hold a wildcard: ``*``, ``*.example.com``, ``*-api.example.com``.
    """
    if not name:
        return "domain name cannot be empty"
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    first, _, rest = name.partition(".")
    if len(first) > 63 or _WILDCARD_LABEL.fullmatch(first) is None:
        return f"domain name {name!r} invalid (label {first!r} invalid)"
    if rest:
        for label in rest.split("."):
            if not is_dns1123_label(label):
                return f"domain name {name!r} invalid (label {label!r} invalid)"
    return None


_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def join_path(path: str, key: str | int) -> str:
    """YAML path text: ``spec.http[0].match[1].headers.x-user``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _SIMPLE_KEY.fullmatch(key) is None:
        key = '"' + key.replace('"', '\\"') + '"'
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class Issues:
    """Errors and warnings collected while loading; turned into ``ConfigError`` at the end."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []


_INDEX = re.compile(r"\[[0-9]+\]")


class Reader:
    """Typed, strict access to one resource's YAML; every problem is recorded, none raised.

    ``where`` names the file (``config/dr.yaml[2]`` for the second document), ``what`` the
    resource (``DestinationRule default-sticky-dr``).  Getters return None when a value is absent
    or wrong (the error is already recorded), so callers fall back to defaults and go on reading.
    """

    def __init__(self, issues: Issues, where: str, what: str) -> None:
        self.issues = issues
        self.where = where
        self.what = what
        self.failed = False
        self._ignored_seen: set[str] = set()  # ignored fields already warned about

    def _line(self, path: str, message: str) -> str:
        head = f"{self.where}: {self.what}" if self.what else self.where
        return f"{head}: {path}: {message}" if path else f"{head}: {message}"

    def error(self, path: str, message: str) -> None:
        self.failed = True
        self.issues.errors.append(self._line(path, message))

    def warn(self, path: str, message: str) -> None:
        self.issues.warnings.append(self._line(path, message))

    # ---- containers

    def mapping(
        self,
        value: object,
        path: str,
        fields: Iterable[str],
        ignored: Mapping[str, str] | None = None,
    ) -> dict[str, object] | None:
        """``value`` as an object whose keys are all in ``fields`` (or ``ignored``: warned)."""
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(path, f"expected an object, got {type_name(value)}")
            return None
        known = set(fields)
        skipped = ignored or {}
        out: dict[str, object] = {}
        for key, item in value.items():
            name = str(key)
            if name in known:
                out[name] = item
            elif name in skipped:
                # One warning per ignored field per resource, not one per list element.
                seen = _INDEX.sub("[]", join_path(path, name))
                if item is not None and seen not in self._ignored_seen:
                    self._ignored_seen.add(seen)
                    self.warn(join_path(path, name), f"ignored: {skipped[name]}")
            else:
                hint = did_you_mean(name, [*known, *skipped])
                self.error(join_path(path, name), f"unknown field{hint}")
        return out

    def obj(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        fields: Iterable[str],
        ignored: Mapping[str, str] | None = None,
        *,
        required: bool = False,
    ) -> dict[str, object] | None:
        value = m.get(key)
        if value is None and required:
            self.error(join_path(path, key), "required")
            return None
        return self.mapping(value, join_path(path, key), fields, ignored)

    def items(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> list[tuple[str, object]]:
        """``(path, item)`` for each element of a list field."""
        value = m.get(key)
        here = join_path(path, key)
        if value is None:
            if required:
                self.error(here, "required")
            return []
        if not isinstance(value, list):
            self.error(here, f"expected a list, got {type_name(value)}")
            return []
        if required and not value:
            self.error(here, "must not be empty")
        return [(join_path(here, i), item) for i, item in enumerate(value)]

    def string_map(self, m: Mapping[str, object], key: str, path: str) -> dict[str, str] | None:
        value = m.get(key)
        here = join_path(path, key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(here, f"expected an object of strings, got {type_name(value)}")
            return None
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                self.error(
                    join_path(here, str(k)),
                    f"expected a string, got {type_name(v)}"
                    + (" (quote it)" if isinstance(v, (int, float, bool)) else ""),
                )
                continue
            out[str(k)] = v
        return out

    def string_list(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for here, item in self.items(m, key, path, required=required):
            if isinstance(item, str):
                out.append((here, item))
            else:
                self.error(here, f"expected a string, got {type_name(item)}")
        return out

    # ---- scalars

    def string(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> str | None:
        value = m.get(key)
        here = join_path(path, key)
        if value is None or (required and value == ""):
            if required:
                self.error(here, "required")
            return None
        if not isinstance(value, str):
            quote = " (quote it)" if isinstance(value, (int, float, bool)) else ""
            self.error(here, f"expected a string, got {type_name(value)}{quote}")
            return None
        return value

    def integer(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        value = m.get(key)
        here = join_path(path, key)
        if value is None:
            if required:
                self.error(here, "required")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(here, f"expected an integer, got {type_name(value)}")
            return None
        if minimum is not None and value < minimum:
            self.error(here, f"must be at least {minimum}, got {value}")
            return None
        if maximum is not None and value > maximum:
            self.error(here, f"must be at most {maximum}, got {value}")
            return None
        return value

    def port(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> int | None:
        value = m.get(key)
        here = join_path(path, key)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 < value <= 65535:
            self.error(here, f"port number {value} must be in the range 1..65535")
            return None
        return self.integer(m, key, path, required=required)

    def boolean(self, m: Mapping[str, object], key: str, path: str) -> bool | None:
        value = m.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.error(join_path(path, key), f"expected true or false, got {type_name(value)}")
            return None
        return value

    def enum(
        self, m: Mapping[str, object], key: str, path: str, values: Sequence[str]
    ) -> str | None:
        value = self.string(m, key, path)
        if value is None:
            return None
        if value not in values:
            hint = did_you_mean(value, values)
            self.error(
                join_path(path, key), f"unknown value {value!r}{hint}; one of {', '.join(values)}"
            )
            return None
        return value

    def duration(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        *,
        istio_minimum: bool = True,
        allow_zero: bool = False,
    ) -> float | None:
        """Seconds.  ``istio_minimum``: Istio's ``ValidateDuration`` (>= 1ms, whole ms)."""
        value = m.get(key)
        here = join_path(path, key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(
                here, f"expected a duration string, got {type_name(value)} ({DURATION_HINT})"
            )
            return None
        try:
            ns = parse_duration(value)
        except ValueError as exc:
            self.error(here, f"{exc} ({DURATION_HINT})")
            return None
        if ns < 0:
            self.error(here, f"duration {value!r} must not be negative")
            return None
        if istio_minimum and not (allow_zero and ns == 0):
            if ns < 1_000_000:
                self.error(here, f"duration {value!r} must be at least 1ms")
                return None
            if ns % 1_000_000:
                self.error(
                    here, f"duration {value!r}: only durations to ms precision are supported"
                )
                return None
        return ns / 1e9


# --------------------------------------------------------------------------- health-check text


_KEYS: Final = ("path", "interval", "timeout", "unhealthy", "healthy", "expect", "host")


def _duration(key: str, text: str) -> float:
    try:
        seconds = parse_duration(text) / 1e9
    except ValueError as exc:
        raise ValueError(f"{key}: {exc} ({DURATION_HINT})") from None
    if seconds <= 0:
        raise ValueError(f"{key}: must be > 0")
    return seconds


def _count(key: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{key}: {text!r} is not a whole number")
    return int(text)


def parse_health_check(text: str) -> HealthCheckSpec:
    """``key=value`` pairs separated by spaces; raises ValueError naming the bad part.

    Keys: path, interval, timeout (Istio durations: 500ms, 5s, 1m), unhealthy, healthy (counts),
    expect (200 or 200-399), host (the Host header to send).
    """
    values: dict[str, object] = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ValueError(f"{part!r}: expected key=value")
        if key not in _KEYS:
            raise ValueError(f"{key!r}: unknown key (known: {', '.join(_KEYS)})")
        if key in values:
            raise ValueError(f"{key!r} given twice")
        if key in ("interval", "timeout"):
            values[key] = _duration(key, value)
        elif key in ("unhealthy", "healthy"):
            values[key] = _count(key, value)
        elif key == "expect":
            low, _, high = value.partition("-")
            values[key] = (_count(key, low), _count(key, high or low))
        else:
            values[key] = value
    return HealthCheckSpec(**values)  # type: ignore[arg-type]
