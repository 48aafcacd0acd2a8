"""Persistent sessions: the cookie or header that names a session's pod, as Envoy writes it.

Theory
------
Consistent hashing maps a *key* to a pod, so a session moves whenever the set of pods changes.
Envoy's stateful-session filter (what Istio enables for a service labelled
``istio.io/persistent-session`` or ``istio.io/persistent-session-header``) stores the *pod*
instead: the response that opens a session carries the address of the pod that served it, and
every later request that carries it goes to that pod while the pod is known and healthy; when it
is not, the load balancer picks as usual and the response carries the new pod's address (Envoy's
non-strict mode; ``strict`` answers 503 instead). Adding pods moves no session at all.

The value, byte for byte as Envoy's ``envoy.http.stateful_session.cookie`` and ``.header``:

* **cookie**: base64 (standard alphabet, padded) of the serialized protobuf message
  ``envoy.Cookie { string address = 1; uint64 expires = 2; }``: ``0x0a``, the address length as
  a varint, the ``ip:port`` text, then, when a TTL is set, ``0x10`` and the expiry as a varint
  (seconds; Envoy writes its monotonic clock there, envoyproxy/envoy#44111, so replicas disagree:
  sticky-proxy writes and checks Unix wall-clock seconds). ``Set-Cookie: NAME="VALUE";
  [Max-Age=TTL;] Path=PATH; HttpOnly``, Envoy's ``makeSetCookieValue`` (Istio's path is ``/``
  unless the label says ``NAME:PATH``; its TTL is 0: a browser session cookie, no expiry).
  On input the value is decoded as a protobuf message first; when that fails (not a valid
  message), the decoded bytes are taken as a legacy ``ip:port`` (Envoy's older format). Like
  Envoy, a valid message with an empty address means no session, and a cookie is only read and
  written for requests whose path falls under the cookie's path.
* **header**: base64 of the ``ip:port`` text; the response sets the header (replacing one the
  pod sent) when the pod changed.

Base64 decoding is Envoy's strict one: a length that is not a multiple of 4, a character outside
the alphabet, misplaced padding or non-zero trailing bits make the value absent.

**The value names a pod address** (Envoy's own warning): a client can read it, and can write any
address of the cluster into it to choose its pod. Where that matters, a key file
(``sticky-proxy/persistent-session-key-file``) makes sticky-proxy sign the value: the message
gets one more field, 15 (bytes), the HMAC-SHA256 of the bytes before it under the key (with a
domain prefix), so the format stays a valid ``envoy.Cookie`` message; a value whose MAC does not
verify is treated as absent (and counted), and unsigned values are refused. Both forms carry
the signed message when a key is set.

Parsing is linear in the value and bounded by the request head; nothing here does I/O.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from proxy.affinity import CookiePolicy, cookie_name_can_match, parse_cookie, set_cookie_value

if TYPE_CHECKING:
    from proxy.config import SessionSpec

# What a request's session value said (``PersistentSession.read``).
ABSENT: Final = 0  # no value, an undecodable one, or a path the cookie does not cover
NAMED: Final = 1  # names an address (which may or may not be a usable endpoint)
EXPIRED: Final = 2
BAD_SIGNATURE: Final = 3
STATUS_TEXT: Final = ("absent", "names a pod", "expired", "bad signature")

_MASK64: Final = (1 << 64) - 1
_MAC_TAG: Final = b"\x7a\x20"  # field 15, wire type 2, length 32
_MAC_PREFIX: Final = b"sticky-proxy persistent session v1\n"
_MAC_SIZE: Final = 32
_MAX_GROUP_DEPTH: Final = 100  # protobuf's default recursion limit
LINE_CACHE_SIZE: Final = 4096


# --------------------------------------------------------------------------- base64


def b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode(text: bytes) -> bytes:
    """Envoy's ``Base64::decode``: ``b""`` unless ``text`` is canonical padded base64."""
    if not text or len(text) % 4:
        return b""
    try:
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return b""
    # Canonical only: the strict decoder still accepts non-zero bits after the last byte.
    if binascii.b2a_base64(data, newline=False) != text:
        return b""
    return data


# --------------------------------------------------------------------------- envoy.Cookie


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_message(address: str, expires: int) -> bytes:
    """``envoy.Cookie{address, expires}`` serialized (``expires`` 0 is left out, as proto3)."""
    raw = address.encode()
    body = b"\x0a" + _varint(len(raw)) + raw
    if expires:
        body += b"\x10" + _varint(expires & _MASK64)
    return body


def _read_varint(data: bytes, pos: int, limit: int) -> tuple[int, int]:
    """(value, next position); next position -1 when truncated or longer than ``limit`` bytes."""
    value = 0
    shift = 0
    end = len(data)
    for _ in range(limit):
        if pos >= end:
            return 0, -1
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _MASK64, pos
        shift += 7
    return 0, -1


def decode_message(data: bytes) -> tuple[str, int] | None:
    """``(address, expires)`` of a serialized ``envoy.Cookie``; None when ``data`` is not a
    valid protobuf message (protobuf's ``ParseFromString``: unknown fields and groups skipped,
    a field of the wrong wire type kept as unknown, the last occurrence of a field wins, a
    truncated field, field number 0, wire types 6-7 or an address that is not UTF-8 fail)."""
    address = ""
    expires = 0
    pos = 0
    end = len(data)
    groups: list[int] = []
    while pos < end:
        tag, pos = _read_varint(data, pos, 5)
        if pos < 0 or tag > 0xFFFFFFFF:
            return None
        field = tag >> 3
        wire = tag & 7
        if field == 0:
            return None
        if wire == 0:
            value, pos = _read_varint(data, pos, 10)
            if pos < 0:
                return None
            if field == 2 and not groups:
                expires = value
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                return None
        elif wire == 2:
            size, pos = _read_varint(data, pos, 5)
            if pos < 0 or size > end - pos:
                return None
            if field == 1 and not groups:
                try:
                    address = data[pos : pos + size].decode("utf-8")
                except UnicodeDecodeError:
                    return None
            pos += size
        elif wire == 3:
            if len(groups) >= _MAX_GROUP_DEPTH:
                return None
            groups.append(field)
        elif wire == 4:
            if not groups or groups.pop() != field:
                return None
        else:
            return None
    if groups:
        return None
    return address, expires


def sign(key: bytes, body: bytes) -> bytes:
    """``body`` with field 15 appended: HMAC-SHA256 over the domain prefix and ``body``."""
    mac = hmac.new(key, _MAC_PREFIX + body, hashlib.sha256).digest()
    return body + _MAC_TAG + mac


def verify(key: bytes, message: bytes) -> bytes | None:
    """The signed body of ``message``, or None when its MAC is missing or wrong."""
    if len(message) < len(_MAC_TAG) + _MAC_SIZE:
        return None
    body = message[: -_MAC_SIZE - len(_MAC_TAG)]
    tag = message[-_MAC_SIZE - len(_MAC_TAG) : -_MAC_SIZE]
    expected = hmac.new(key, _MAC_PREFIX + body, hashlib.sha256).digest()
    if tag != _MAC_TAG or not hmac.compare_digest(expected, message[-_MAC_SIZE:]):
        return None
    return body


# --------------------------------------------------------------------------- the value


def decode_value(
    raw: bytes, now: float, *, cookie: bool, key: bytes | None
) -> tuple[str, int, int]:
    """``(address, expires, status)`` of a session value as a request carries it."""
    data = b64decode(raw)
    if not data:
        return "", 0, ABSENT
    if key is not None:
        body = verify(key, data)
        parsed = decode_message(body) if body is not None else None
        if parsed is None:
            return "", 0, BAD_SIGNATURE
    elif cookie:
        parsed = decode_message(data)
        if parsed is None:
            parsed = (data.decode("latin-1"), 0)  # the legacy value: base64 of "ip:port"
    else:
        parsed = (data.decode("latin-1"), 0)  # Envoy's header: base64 of "ip:port"
    address, expires = parsed
    if not address:
        return "", 0, ABSENT
    if expires and now > expires:
        return address, expires, EXPIRED
    return address, expires, NAMED


def encode_value(address: str, expires: int, *, cookie: bool, key: bytes | None) -> str:
    """The value a response carries for ``address`` (``expires`` 0: none)."""
    if key is not None:
        return b64encode(sign(key, encode_message(address, expires)))
    if cookie:
        return b64encode(encode_message(address, expires))
    return b64encode(address.encode())


def path_matcher_covers(cookie_path: str, request_path: str) -> bool:
    """Envoy's cookie path match: ``""``/``/`` cover every request; ``/foo/`` covers paths
    starting with it; ``/foo`` covers ``/foo`` and paths continuing with ``/``, ``?`` or ``#``."""
    if not cookie_path or cookie_path == "/":
        return True
    if cookie_path.endswith("/"):
        return request_path.startswith(cookie_path)
    if not request_path.startswith(cookie_path):
        return False
    if len(request_path) == len(cookie_path):
        return True
    return request_path[len(cookie_path)] in "/?#"


def _first_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    for header, value in headers:
        if header == name:
            return value.strip(b" \t")
    return b""


class PersistentSession:
    """A ``SessionSpec`` compiled for the request path: read a request's value, write one.

    Built once per route when the config is loaded (``proxy.routing``); ``read`` costs a
    cookie or header lookup, a base64 decode and a short protobuf walk, ``line`` a dict lookup
    (lines without an expiry are remembered per address).
    """

    __slots__ = (
        "_lines",
        "_prefix",
        "_suffix",
        "cookie",
        "covers_all",
        "key",
        "name",
        "path",
        "spec",
        "strict",
        "ttl",
        "wire_name",
    )

    def __init__(self, spec: SessionSpec) -> None:
        self.spec = spec
        self.cookie = spec.mode == "cookie"
        self.name = spec.name
        self.path = spec.path
        self.ttl = spec.ttl if self.cookie else 0
        self.strict = spec.strict
        self.key = spec.key
        self.covers_all = not self.cookie or not spec.path or spec.path == "/"
        self.wire_name = spec.name.encode() if self.cookie else spec.name.lower().encode()
        if self.cookie and not cookie_name_can_match(self.wire_name):
            raise ValueError(f"cookie name {spec.name!r} cannot appear in a Cookie header")
        if self.cookie:
            policy = CookiePolicy(spec.name, path=spec.path, ttl=self.ttl)
            prefix, _, suffix = set_cookie_value(policy, "\0").partition("\0")
            self._prefix = b"set-cookie: " + prefix.encode()
            self._suffix = suffix.encode() + b"\r\n"
        else:
            self._prefix = self.wire_name + b": "
            self._suffix = b"\r\n"
        self._lines: dict[str, bytes] = {}

    def applies(self, target: bytes) -> bool:
        """Envoy creates no session state for a request outside the cookie's path."""
        return self.covers_all or path_matcher_covers(self.path, target.decode("latin-1"))

    def read(self, headers: Sequence[tuple[bytes, bytes]], now: float) -> tuple[str, int, int]:
        """``(address, expires, status)`` of the request's session value (``ABSENT`` ...)."""
        if self.cookie:
            raw = parse_cookie(headers, self.wire_name)
        else:
            raw = _first_header(headers, self.wire_name)
        if not raw:
            return "", 0, ABSENT
        return decode_value(raw, now, cookie=self.cookie, key=self.key)

    def value(self, address: str, now: float) -> str:
        expires = int(now) + self.ttl if self.ttl else 0
        return encode_value(address, expires, cookie=self.cookie, key=self.key)

    def line(self, address: str, now: float) -> bytes:
        """The response line naming ``address``: ``set-cookie: ...`` or ``NAME: ...``."""
        if self.ttl:
            return self._prefix + self.value(address, now).encode() + self._suffix
        found = self._lines.get(address)
        if found is None:
            if len(self._lines) >= LINE_CACHE_SIZE:
                self._lines.clear()
            found = self._prefix + self.value(address, now).encode() + self._suffix
            self._lines[address] = found
        return found

    def describe(self) -> str:
        """One line for ``route`` and the admin ``/route``."""
        spec = self.spec
        parts = [f"{spec.mode} {spec.name}"]
        if self.cookie:
            parts.append(f"path {spec.path or '/'}")
            parts.append(f"ttl {spec.ttl}s" if spec.ttl else "no expiry")
        parts.append("strict (503 when its pod is gone)" if spec.strict else "non-strict")
        if spec.drain:
            parts.append(f"drain {spec.drain:g}s")
        if spec.key is not None:
            parts.append("signed (HMAC-SHA256)")
        if spec.source:
            parts.append(f"from {spec.source}")
        return ", ".join(parts)
