"""Fuzzing the running proxy over sockets: generators, a strict backend, and the invariants.

Shared by tests/test_fuzz.py (bounded, part of ``make test``) and bench/fuzz.py (N minutes).

What is fuzzed
--------------
A :class:`Case` is one client connection: one to three pipelined requests built from generated
pieces (method, request-target form, version, Host, odd header lines, Cookie lines of many
pieces, Connection/Upgrade combinations, Content-Length and chunked bodies with their framing
tricks), the bytes cut into random segments. Every piece knows what RFC 9110/9112 and the
proxy's documented rules (``proxy.replies``' table, ``proxy.framing``) make of it, so every
request carries a *verdict*:

    ok       must be forwarded, once, with its method, target, authority and body intact
    either   the proxy may refuse it (4xx) or forward it; if forwarded, as for ok
    reject   must not reach the backend (a 4xx, 501 or 505, then the connection closes); a
             request whose head was fine and whose body breaks (bad chunk) may have its head
             streamed upstream, but the backend must never see it complete

The rules the verdicts follow (beyond the message grammar, which llhttp enforces):

* a head of more than 100 header lines (``ServerSettings.max_headers``) or over 60 KiB: 431;
* Host is ``host[:port]``, host a reg-name (RFC 3986 unreserved and sub-delims, no
  pct-encoding) or a bracketed IPv6 literal, port digits; OWS around it is not part of it; an
  empty Host is allowed; two Host lines, or none in HTTP/1.1 (whatever the target form): 400;
* targets: origin form; absolute form with http or https (its authority replaces Host, must
  agree with a Host header case-insensitively, the scheme's default port optional, and the
  backend gets the origin-form path and query as written: ``http://h/p?`` -> ``/p?``);
  ``OPTIONS *``; anything else, a ``#`` anywhere, userinfo or another scheme: 400;
* Upgrade (with ``Connection: upgrade``): ``websocket`` is forwarded (and refused with 400 when
  the request has a body), ``h2c`` is stripped (the request goes on as HTTP/1.1 with its body,
  without Upgrade, HTTP2-Settings or the Connection tokens), any other protocol: 403;
* the implicit default retry policy re-sends a request answered 503 (up to twice) only when
  its method is idempotent.

Invariants checked after every case (:func:`check`)
---------------------------------------------------
* the client's bytes parse as HTTP/1.1 responses (h11, client side), one per answered request,
  in order, each the backend's own answer to that request (its body names the request);
* every backend connection parses with h11 on the server side: anything h11 refuses is a
  failure, except a message cut short by the connection closing (the proxy abandoning it);
* no request reaches the backend twice (idempotent ones: at most the default retry policy's
  two retries after a 503), no rejected request reaches it, nothing after a request that closes
  the connection does, nothing smuggled inside a body does;
* hop-by-hop headers do not reach the backend, nor do Upgrade and Connection unless the
  request is a forwarded (websocket) upgrade;
* the proxy logs no ERROR (in-process target) and a clean request on a new connection is
  answered 200 afterwards.

Each request carries a unique marker (``x-fuzz`` header) so the backend can count it, and asks
the backend for an answer (``x-fuzz-reply``: 200 with Content-Length or chunked, 503, 204, 100
then 200, 101 for an upgrade). Requests smuggled inside bodies carry markers too.

A response head over the proxy's 60 KiB limit (62 KiB, in one write or in 16) must be a 502.
ERRORs are read from the proxy's loggers in-process, from its output as a process (bench/fuzz.py).

Known defects
-------------
:data:`KNOWN_DEFECTS` names the families of input that break an invariant today. The generators
leave them out (the guard is ``if name in known``, next to where the family is generated; each
has an explicit xfail-strict test with its minimal bytes in tests/test_fuzz.py), so the fuzz
test stays green while its invariants stay whole. When a fix lands, the xfail test XPASSes:
remove the name here and its guard, and the generators produce that family too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h11
import uvloop
from hypothesis import strategies as st

HOST = "127.0.0.1"
MARK = b"~" * 12  # placeholder for a marker: fixed length, so lengths and cut points hold
REJECT_STATUSES = frozenset(range(400, 500)) | {501, 505}
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
DEFAULT_RETRIES = 2  # Istio's default retry policy: 2 attempts on 503 (retriable-status-codes)
CLIENT_TIMEOUT = 5.0  # seconds the client waits for the proxy before calling it a hang
HEAD_LIMIT = 60 * 1024  # ServerSettings.max_header_bytes (request and response heads)
BIG_HEADS = ("bighead", "bigsplit")  # replies with a 62 KiB head: in one write, in 16
MAX_HEADERS = 100  # ServerSettings.max_headers: a request with more header lines gets 431

KNOWN_DEFECTS: dict[str, str] = {}


def compiled() -> bool:
    """Whether the request path runs as mypyc extensions."""
    import proxy.http1

    return str(proxy.http1.__file__).endswith(".so")


def active_defects(include_known: bool = False) -> frozenset[str]:
    """The known-defect families to keep out of generated cases."""
    return frozenset() if include_known else frozenset(KNOWN_DEFECTS)


# =========================================================================== the case model
@dataclass
class Req:
    """One generated request and what the proxy must make of it."""

    raw: bytes
    method: str
    verdict: str = "ok"  # ok | either | reject
    body_level: bool = False  # a reject found only in the body (its head may go upstream)
    complete: bool = True  # all of its bytes are sent (else it is the last of its case)
    reply: str = "cl"  # what the backend answers (x-fuzz-reply)
    body: bytes = b""  # the decoded body the backend must receive
    target: bytes = b"/"  # the origin-form target the backend must receive
    authority: bytes | None = None  # the Host the backend must receive (None: not checked)
    closes: bool = False  # the client asked to close after it (or it upgrades)
    upgrade: bool = False
    hop: tuple[bytes, ...] = ()  # header names the Connection header nominated
    why: tuple[str, ...] = ()  # what was generated, for reports

    @property
    def status(self) -> int:
        return {"cl": 200, "chunked": 200, "503": 503, "204": 204, "100": 200, "101": 101}.get(
            self.reply, 502
        )


@dataclass
class Case:
    requests: list[Req]
    cuts: tuple[int, ...] = ()  # cut points into the rendered bytes
    half_close: bool = True  # shutdown(SHUT_WR) after the last byte

    def data(self) -> bytes:
        return b"".join(r.raw for r in self.requests)

    def describe(self) -> str:
        lines = [f"half_close={self.half_close} cuts={list(self.cuts)}"]
        for i, r in enumerate(self.requests):
            lines.append(
                f"  request {i}: verdict={r.verdict}{' (body)' if r.body_level else ''} "
                f"complete={r.complete} reply={r.reply} why={list(r.why)}\n    {r.raw!r}"
            )
        return "\n".join(lines)


def _combine(verdicts: Iterable[str]) -> str:
    vs = set(verdicts)
    return "reject" if "reject" in vs else "either" if "either" in vs else "ok"


# =========================================================================== generators
_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKEN_NO_TILDE = _TOKEN.replace("~", "")
_PCHAR = "abcdefghijklmnopqrstuvwxyz0123456789-._!$&'()*+,;=:@"
_VCHAR_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "~")
_CTL = bytes([*range(0x01, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])

_tokens = st.text(_TOKEN_NO_TILDE, min_size=1, max_size=12)
_path = st.text(_PCHAR, max_size=20).map(lambda s: "/f/" + s)
_query = st.one_of(st.just(""), st.text(_PCHAR + "/?", max_size=20).map(lambda s: "?" + s))
_value = st.text(_VCHAR_SAFE + " \t", max_size=40).map(lambda s: s.strip(" \t"))

_HOST_CHARS = "abcxyzABC019-._~!$&'()*+,;=:[]@/?#%\\ \t\x80"
_HOST_RE = re.compile(
    rb"(?:\[(?P<literal>[0-9A-Fa-f:.]+)\]|[A-Za-z0-9\-._~!$&'()*+,;=]+)(?::[0-9]*)?"
)
_OWS = b" \t"


@functools.cache
def _pick(*options: Any) -> st.SearchStrategy[Any]:
    """``st.sampled_from(options)``, built once: hypothesis validates every strategy it is
    handed anew, which costs more than the draw (and a case draws from a few hundred)."""
    return st.sampled_from(options)


@functools.cache
def _one_in(n: int) -> st.SearchStrategy[bool]:
    """True once in ``n`` draws (and never in the simplest case, which hypothesis favours)."""
    return st.sampled_from([False] * (n - 1) + [True])


OK_HOSTS = [
    b"test.com",
    b"test.com:8080",
    b"TEST.com",
    b"127.0.0.1",
    b"127.0.0.1:80",
    b"[::1]",
    b"[::1]:8080",
    b"[::ffff:1.2.3.4]:1",
    b"a-b.example",
    b"xn--bcher-kva.example",
    b"a,b",  # sub-delims are reg-name characters
    b"a!$&'()*+;=~_.b",
    b"h:",  # RFC 3986: port = *DIGIT
]
BAD_HOSTS = [
    b"a b",
    b"evil.com/../x",
    b"x\\",
    b"@evil.com",
    b"[::1",
    b"h:abc",
    b"h?x",
    b"h#x",
    b"h:80:80",
    b"user@h",
    b":80",
    b"a%41",  # pct-encoded: refused
    b"[]",
    b"[::1]x",
    b"[::1]:8x",
    b"[v1.x]",
    b"[::1%25eth0]",
    b"h\x80",
]
ABSOLUTE_AUTHORITIES = [
    b"test.com",
    b"test.com:80",
    b"Test.COM",
    b"127.0.0.1:9",
    b"[::1]",
    b"[::1]:443",
    b"a,b",
]


def host_verdict(value: bytes) -> str:
    """What a Host value gets: ok, reject (400), or either (a bracketed text of IPv6 characters
    that is no IPv6 address, such as ``[:]``: refusing it is right, routing it harmless)."""
    value = value.strip(_OWS)
    if not value:
        return "ok"
    found = _HOST_RE.fullmatch(value)
    if found is None:
        return "reject"
    literal = found["literal"]
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode())
        except ValueError:
            return "either"
    return "ok"


def same_authority(host: bytes, authority: bytes, scheme: bytes) -> bool:
    """Whether a Host value names an absolute-form target's authority (RFC 9112 §3.2.2): hosts
    compare case-insensitively, and the scheme's default port may be written or left out."""
    default = b":443" if scheme.lower() == b"https" else b":80"
    a = host.strip(_OWS).lower().removesuffix(default)
    return a == authority.lower().removesuffix(default)


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def methods(draw: st.DrawFn, clean: bool = False) -> tuple[bytes, str, str]:
    """(method bytes, method for the client's h11, verdict)."""
    kind = draw(_pick(*(["std"] if clean else ["std", "std", "std", "token", "bad"])))
    if kind == "std":
        m = draw(_pick("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"))
        return m.encode(), m, "ok"
    if kind == "token":
        m = draw(st.one_of(_pick("PURGE", "get", "M-SEARCH", "PROPFIND", "FOO"), _tokens))
        return m.encode(), m, "either"  # unknown methods: forward, or refuse (501/4xx)
    bad = draw(_pick(b"", b"GE\x00T", b"G(T", b"CONNECT", b"GET\x7f", b"G\xc3\xa9T"))
    return bad, "GET", "reject"


@dataclass(frozen=True)
class Target:
    """A request-target and what the backend must see of it."""

    raw: bytes
    verdict: str
    origin: bytes  # the target the backend must receive
    authority: bytes | None = None  # absolute form: the authority that replaces Host
    scheme: bytes = b""  # absolute form: its scheme (for the default port)
    why: str = "origin"


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def targets(draw: st.DrawFn, options: bool, clean: bool = False) -> Target:
    """A request-target (``options``: for an OPTIONS request)."""
    forms = ["origin"] * 4 + ["absolute"] * 2
    if not clean:
        forms += ["weird", "authority", "asterisk", "garbage"]
    form = draw(_pick(*forms))
    path = draw(_path).encode()
    query = draw(_query).encode()
    fragment = b"#" + draw(_path).encode() if not clean and draw(_one_in(12)) else b""
    if form == "origin":
        if fragment:  # a fragment anywhere in the target: 400 (Envoy's too)
            return Target(path + query + fragment, "reject", b"", why="origin+fragment")
        return Target(path + query, "ok", path + query)
    if form == "weird":
        t, verdict = draw(
            _pick(
                (b"//x", "ok"),
                (b"/a?b?c", "ok"),
                (b"/a%zz", "either"),
                (b"/a#frag", "reject"),
                (b"/?#", "reject"),
                (b"/\xc3\xa9", "either"),
                (b"/a\x7f", "reject"),
                (b"/a\x01b", "reject"),
                (b"/a b", "reject"),
                (b"/a\tb", "reject"),
                (b"/" + b"x" * 2000, "ok"),
            )
        )
        return Target(t, verdict, t, why="weird-target")
    if form == "absolute":
        authority = draw(_pick(*ABSOLUTE_AUTHORITIES))
        scheme = draw(_pick(b"http", b"http", b"HTTP", b"https"))
        shape = draw(_pick("path", "path", "bare", "query"))
        rest = path + query if shape == "path" else b"" if shape == "bare" else b"?" + query
        origin = (b"/" + rest if rest[:1] == b"?" else rest) or b"/"
        raw = scheme + b"://" + authority + rest + fragment
        verdict = "reject" if fragment else "ok"
        return Target(raw, verdict, origin, authority, scheme, f"absolute-{shape}")
    if form == "authority":
        return Target(b"test.com:80", "reject", b"", why="authority-form")
    if form == "asterisk":
        # OPTIONS * passes the checks; no route matches it here (a 404 of the proxy's own).
        return Target(b"*", "either" if options else "reject", b"*", why="asterisk")
    t = draw(
        _pick(
            b"p",
            b"http://",
            b"http:///p",
            b"http://h:abc/p",
            b"ftp://h/p",
            b"?q",
            b"%2F",
            b"",
            b"http://u@test.com/p",
            b"http://[::1/p",
            b"http:/test.com/p",
        )
    )
    return Target(t, "reject", b"", why="garbage-target")


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def host_values(draw: st.DrawFn) -> bytes:
    """A Host value: a good one, a bad one, an IPv6 literal, or random bytes of Host's trades."""
    kind = draw(_pick(*(["ok"] * 6 + ["bad", "ipv6", "random"])))
    if kind == "ok":
        return draw(_pick(*OK_HOSTS))
    if kind == "bad":
        return draw(_pick(*BAD_HOSTS))
    if kind == "ipv6":
        address = draw(st.ip_addresses(v=6))
        port = draw(_pick(b"", b":8080", b":"))
        return b"[" + str(address).encode() + b"]" + port
    text = draw(st.text(_HOST_CHARS, max_size=16)).strip(" \t")
    return text.encode("latin-1")


@st.composite
def agreeing_host(
    draw: st.DrawFn, target: Target, known: frozenset[str], clean: bool = False
) -> bytes:
    """A Host value naming the absolute-form target's authority (or not quite)."""
    assert target.authority is not None
    default = b":443" if target.scheme.lower() == b"https" else b":80"
    bare = target.authority.removesuffix(default)
    with_port = bare + default
    host = draw(_pick(*([bare, with_port] + ([] if clean else [bare + b":1", b"other." + bare]))))
    return host.swapcase() if draw(st.booleans()) else host


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def versions(draw: st.DrawFn, clean: bool = False) -> tuple[bytes, str]:
    v = draw(_pick(*(["1.1"] * 6 + ["1.0"] * 2 + ([] if clean else ["bad"]))))
    if v != "bad":
        return b"HTTP/" + v.encode(), "ok"
    bad = draw(
        _pick(
            b"HTTP/1.2",
            b"HTTP/2.0",
            b"HTTP/0.9",
            b"http/1.1",
            b"HTTP/1",
            b"HTTP/11",
            b"HTTP/1.1x",
        )
    )
    return bad, "reject"


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def cookie_lines(draw: st.DrawFn) -> bytes:
    """A Cookie line of many pieces: the ISTIOID cookie (or look-alikes) among others."""
    piece = st.one_of(
        st.builds(lambda n, v: n + b"=" + v, _tokens.map(str.encode), _tokens.map(str.encode)),
        _pick(
            b"ISTIOID=abc",
            b'ISTIOID="quoted"',
            b"ISTIOID",
            b"ISTIOID=",
            b" ISTIOID = v",
            b"xISTIOID=1",
            b"",
            b"=v",
        ),
    )
    pieces = draw(st.lists(piece, min_size=1, max_size=40))
    repeat = draw(_pick(1, 1, 1, 20))
    return b"; ".join(pieces * repeat)


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def extra_header(draw: st.DrawFn, clean: bool = False) -> tuple[bytes, str, str]:
    """(header line without CRLF, verdict, why)."""
    kinds = ["ok", "ok", "ows", "cookie", "many", "expect"]
    if not clean:
        kinds += [
            "obs-text",
            "ctl",
            "nul-cr",
            "space-colon",
            "empty-name",
            "bad-name",
            "obs-fold",
            "no-colon",
        ]
    kind = draw(_pick(*kinds))
    name = draw(_tokens).encode()
    value = draw(_value).encode()
    if kind == "ok":
        return b"x-h-" + name + b": " + value, "ok", "header"
    if kind == "ows":
        return b"x-h-" + name + b":  \t" + value + b" \t", "ok", "header-ows"
    if kind == "cookie":
        return b"Cookie: " + draw(cookie_lines()), "ok", "cookie"
    if kind == "obs-text":
        return b"x-h-" + name + b": a\x80\xffb", "either", "obs-text"
    if kind == "ctl":
        c = draw(_pick(*_CTL))
        return b"x-h-" + name + b": a" + bytes([c]) + b"b", "either", f"ctl-{c:#x}"
    if kind == "nul-cr":
        bad = draw(_pick(b"\x00", b"\r", b"\rX"))
        return b"x-h-" + name + b": a" + bad + b"b", "reject", "nul-cr-in-value"
    if kind == "space-colon":
        ws = draw(_pick(b" ", b"\t", b"  "))
        return b"x-h-" + name + ws + b": v", "reject", "space-before-colon"
    if kind == "empty-name":
        return b": v", "reject", "empty-name"
    if kind == "bad-name":
        c = draw(_pick(*b'()<>@,;\\"/[]?={} ', 0x80, 0x01))
        return b"x-h" + bytes([c]) + b"n: v", "reject", f"bad-name-{c:#x}"
    if kind == "obs-fold":
        return b"x-h-" + name + b": a\r\n b", "reject", "obs-fold"
    if kind == "no-colon":
        return b"x-h-" + name, "reject", "no-colon"
    if kind == "many":  # requests() judges the count: over MAX_HEADERS lines is a 431
        n = draw(
            st.integers(10, 80) if clean else st.one_of(st.integers(10, 80), st.integers(90, 110))
        )
        return b"\r\n".join(b"x-m%d: %d" % (i, i) for i in range(n)), "ok", "many-headers"
    return b"Expect: 100-continue", "ok", "expect-100"


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def chunked_body(draw: st.DrawFn, clean: bool = False) -> tuple[bytes, bytes, str, str]:
    """(encoded body, decoded body, verdict, why); verdict reject means a body-level error."""
    datas = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    tricks = ["plain"] * 4 + ["upper-hex", "leading-zeros", "ext", "quoted-ext", "trailer"]
    if not clean:
        tricks += [
            "bws",
            "hex-garbage",
            "0x",
            "negative",
            "huge",
            "plus",
            "missing-crlf",
            "bare-lf",
            "size-too-small",
            "no-last-chunk",
        ]
    trick = draw(_pick(*tricks))
    out = bytearray()
    verdict = "ok"
    for i, d in enumerate(datas):
        size = b"%x" % len(d)
        if trick == "upper-hex":
            size = size.upper()
        elif trick == "leading-zeros":
            size = b"000" + size
        elif trick == "ext" and i == 0:
            size += b";a=b;c"
        elif trick == "quoted-ext" and i == 0:
            size += b';a="x;y"'
        elif trick == "bws" and i == 0:
            size += b" ;a=b"
            verdict = "either"
        elif trick == "size-too-small" and i == 0 and len(d) > 1:
            size = b"%x" % (len(d) - 1)
            verdict = "reject"  # the extra byte lands where CRLF must be
        elif trick == "missing-crlf" and i == 0:
            out += size + b"\r\n" + d
            verdict = "reject"
            continue
        elif trick == "bare-lf" and i == 0:
            out += size + b"\n" + d + b"\n"
            verdict = "reject"
            continue
        out += size + b"\r\n" + d + b"\r\n"
    bad = {
        "hex-garbage": b"zz\r\nabc\r\n",
        "0x": b"0x5\r\nabcde\r\n",
        "negative": b"-1\r\na\r\n",
        "huge": b"1" + b"0" * 17 + b"\r\na\r\n",
        "plus": b"+5\r\nabcde\r\n",
    }.get(trick)
    if bad is not None:
        out += bad
        verdict = "reject"
    if trick == "no-last-chunk":
        return bytes(out), b"".join(datas), "incomplete", trick
    out += b"0\r\nx-trailer: t\r\n\r\n" if trick == "trailer" else b"0\r\n\r\n"
    return bytes(out), b"".join(datas), verdict, f"chunked-{trick}"


_SMUGGLE = (
    b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: test.com\r\nx-fuzz: " + MARK + b"\r\n\r\n"
)


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def bodies(
    draw: st.DrawFn, version: bytes, clean: bool = False
) -> tuple[list[bytes], bytes, bytes, str, str]:
    """(framing header lines, encoded body, decoded body, verdict, why).

    verdict: ok | either | reject (head-level) | body-reject | incomplete | long.
    """
    kinds = ["none"] * 3 + ["cl"] * 3 + ["chunked"] * 3 + ["cl-long", "smuggle"]
    if not clean:
        kinds += ["cl-short", "cl-odd", "cl-dup", "te-odd", "cl-te"]
    if clean and version == b"HTTP/1.0":
        kinds = [k for k in kinds if k != "chunked"]
    kind = draw(_pick(*kinds))
    data = draw(st.binary(max_size=200))
    if kind == "none":
        return [], b"", b"", "ok", "no-body"
    if kind == "cl":
        return [b"Content-Length: %d" % len(data)], data, data, "ok", "cl"
    if kind == "smuggle":
        return [b"Content-Length: %d" % len(_SMUGGLE)], _SMUGGLE, _SMUGGLE, "ok", "smuggle-cl"
    if kind == "cl-short":
        extra = draw(st.integers(1, 50))
        return [b"Content-Length: %d" % (len(data) + extra)], data, data, "incomplete", kind
    if kind == "cl-long":
        junk = draw(_pick(b"x", b"\r\n", b"garbage\r\n\r\n", b"\x00\x01"))
        return [b"Content-Length: %d" % len(data)], data + junk, data, "long", kind
    if kind == "cl-odd":
        n = len(data)
        value, verdict = draw(
            st.sampled_from(
                [
                    (b"0%d" % n, "ok"),
                    (b" %d " % n, "ok"),
                    (b"+%d" % n, "reject"),
                    (b"-%d" % n, "reject"),
                    (b"0x%x" % n, "reject"),
                    (b"%d, %d" % (n, n), "reject"),  # llhttp: a list is no number
                    (b"%d,%d" % (n, n + 1), "reject"),
                    (b"%d.0" % n, "reject"),
                    (b"99999999999999999999999", "reject"),
                    (b"", "reject"),
                    (b"%d\x00" % n, "reject"),
                ]
            )
        )
        return [b"Content-Length: " + value], data, data, verdict, f"cl-odd:{value!r}"
    if kind == "cl-dup":
        n = len(data)
        same = draw(st.booleans())
        lines = [b"Content-Length: %d" % n, b"Content-Length: %d" % (n if same else n + 1)]
        return lines, data, data, "reject", f"cl-dup-same={same}"  # llhttp: even if equal
    if kind == "cl-te":
        first = draw(st.booleans())
        lines = [b"Content-Length: 3", b"Transfer-Encoding: chunked"]
        return lines[:: 1 if first else -1], b"0\r\n\r\n", b"", "reject", "cl+te"
    enc, dec, verdict, why = draw(chunked_body(clean))
    te = [b"chunked"]  # one Transfer-Encoding line per value
    head_reject = False  # the head itself is refused (verdict "reject" so far: the body's)
    if kind == "te-odd":
        te, te_verdict = draw(
            st.sampled_from(
                [
                    ([b"Chunked"], "ok"),
                    ([b" chunked "], "ok"),
                    ([b"chunked, chunked"], "reject"),
                    ([b"chunked", b"chunked"], "reject"),  # two lines: chunked twice
                    ([b"gzip", b"chunked"], "reject"),
                    ([b"chunked", b"gzip"], "reject"),
                    ([b"gzip, chunked"], "reject"),
                    ([b"chunked, gzip"], "reject"),
                    ([b"identity"], "reject"),
                    ([b"xchunked"], "reject"),
                    ([b"chunked\x00"], "reject"),
                    ([b""], "reject"),
                ]
            )
        )
        why = f"te:{te!r}+{why}"
        head_reject = te_verdict == "reject"
    if head_reject:
        verdict = "reject"
    elif version == b"HTTP/1.0":
        verdict = "reject"  # RFC 9112 §6.1: chunked in an HTTP/1.0 request
        why += "+te-on-1.0"
    elif verdict == "reject":
        # A good head (an odd but valid Transfer-Encoding such as "Chunked" included) with a
        # broken chunk: the head may be streamed upstream, the body never completes there.
        verdict = "body-reject"
    return [b"Transfer-Encoding: " + v for v in te], enc, dec, verdict, why


@functools.cache  # one strategy per arguments (see _pick)
@st.composite
def requests(draw: st.DrawFn, known: frozenset[str], first: bool, last: bool) -> list[Req]:
    """One request (and junk after it); ``first`` on its connection; ``last``: it may be cut
    short (nothing follows it).

    One request in three is *clean*: every piece is drawn from the well-formed ones, so that
    forwarding (bodies, pipelining, upgrades, retries) gets as many cases as refusing does.
    """
    clean = draw(_one_in(3))
    mbytes, method, m_verdict = draw(methods(clean))
    target = draw(targets(method == "OPTIONS", clean))
    version, v_verdict = draw(versions(clean))
    why = [f"method:{mbytes!r}", target.why, version.decode("latin-1")]
    verdicts = [m_verdict, target.verdict, v_verdict]

    headers: list[bytes] = [b"x-fuzz: " + MARK]
    host_line, authority, h_verdict, h_why = draw(host_header(target, version, known, clean))
    if host_line:
        headers.insert(draw(st.integers(0, 1)), host_line)
    verdicts.append(h_verdict)
    why.append(h_why)

    for line, verdict, hwhy in draw(st.lists(extra_header(clean), max_size=3)):
        headers.insert(draw(st.integers(1, len(headers))), line)
        verdicts.append(verdict)
        why.append(hwhy)

    closes = version == b"HTTP/1.0"
    hop: tuple[bytes, ...] = ()
    upgrade = False
    conn_kinds = ["none"] * 4 + ["close", "keep-alive", "hop", "websocket", "h2c", "bare-upgrade"]
    conn_kind = draw(_pick(*(conn_kinds if clean else [*conn_kinds, "other-upgrade"])))
    if conn_kind == "close":
        headers.append(b"Connection: close")
        closes = True
    elif conn_kind == "keep-alive":
        headers.append(b"Connection: keep-alive")
        closes = False
    elif conn_kind == "hop":
        headers += [b"Connection: x-hop-a, X-Hop-B", b"X-Hop-A: 1", b"x-hop-b: 2"]
        hop = (b"x-hop-a", b"x-hop-b")
    elif conn_kind == "websocket":  # forwarded: the backend answers 101 or refuses it
        connection = draw(_pick(b"Upgrade", b"keep-alive, upgrade"))
        headers += [
            b"Connection: " + connection,
            b"Upgrade: " + draw(_pick(b"websocket", b"WebSocket")),
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
        ]
        # RFC 9110 §7.8: an HTTP/1.0 request's Upgrade is ignored (the request goes on, and
        # the connection stays if it asked for keep-alive).
        upgrade = version != b"HTTP/1.0"
        closes = upgrade or b"keep-alive" not in connection
    elif conn_kind == "h2c":  # stripped: the request goes on as HTTP/1.1, body and all
        headers += [
            b"Connection: " + draw(_pick(b"Upgrade, HTTP2-Settings", b"HTTP2-Settings, upgrade")),
            b"Upgrade: " + draw(_pick(b"h2c", b"H2C")),
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ]
        hop = (b"http2-settings",)
    elif conn_kind == "other-upgrade":  # a protocol the listener does not allow: 403
        protocol = draw(_pick(b"foo", b"TLS/1.0", b"HTTP/2.0", b"websocket, h2c"))
        headers += [b"Connection: upgrade", b"Upgrade: " + protocol]
        if version != b"HTTP/1.0":  # RFC 9110 §7.8: HTTP/1.0's Upgrade is ignored
            verdicts.append("reject")
    elif conn_kind == "bare-upgrade":  # no "Connection: upgrade": just a (hop-by-hop) header
        headers.append(b"Upgrade: " + draw(_pick(b"websocket", b"h2c", b"foo")))
    why.append(f"conn:{conn_kind}")

    framing, encoded, decoded, b_verdict, b_why = draw(bodies(version, clean))
    if upgrade and draw(st.booleans()):  # most upgrades have no body (with one: 400)
        framing, encoded, decoded, b_verdict, b_why = [], b"", b"", "ok", "no-body"
    why.append(b_why)
    complete = True
    junk = b""
    if b_verdict == "incomplete" and last:
        complete = False
    elif b_verdict == "incomplete":  # something follows: send the body whole instead
        encoded = decoded
        framing = [b"Content-Length: %d" % len(decoded)]
    elif b_verdict == "long":
        if last:
            junk = encoded[len(decoded) :]
        encoded = decoded
    elif b_verdict != "body-reject":
        verdicts.append(b_verdict)
    if upgrade:
        verdicts.append(upgrade_body_verdict(framing))
    for line in framing:
        headers.insert(draw(st.integers(1, len(headers))), line)

    reply = draw(_pick(*(["cl"] * 4 + ["chunked", "503", "204", "100"])))
    if upgrade and draw(st.booleans()):
        reply = "101"
    if draw(_one_in(40)):
        reply = draw(_pick(*BIG_HEADS))
    headers.insert(1, b"x-fuzz-reply: " + reply.encode())

    eol_kind = draw(_pick(*(["crlf"] * 12 + ([] if clean else ["lf", "one-lf", "cr"]))))
    lines = [mbytes + b" " + target.raw + b" " + version, *headers]
    if eol_kind in ("one-lf", "cr"):
        at = draw(st.integers(0, len(lines) - 1))
        lines[at] += b"\n" if eol_kind == "one-lf" else b"\r"
        head = b"".join(x if i == at else x + b"\r\n" for i, x in enumerate(lines)) + b"\r\n"
    else:
        eol = b"\n" if eol_kind == "lf" else b"\r\n"
        head = eol.join(lines) + eol + eol
    if eol_kind != "crlf":
        verdicts.append("reject")
        why.append(f"eol:{eol_kind}")
    count = sum(1 + line.count(b"\r\n") for line in headers)
    if count > MAX_HEADERS:
        verdicts.append("reject")  # 431
        why.append(f"{count}-header-lines")
    if len(head) > HEAD_LIMIT:
        # 431 past the limit as the proxy counts (name, value and 4 per line: a little under
        # the head's size); between the two, either.
        verdicts.append("reject" if len(head) > HEAD_LIMIT + 512 else "either")
        why.append(f"head-of-{len(head)}-bytes")
    raw = head + encoded
    if not complete:
        raw = raw[: len(raw) - draw(st.integers(0, min(len(encoded), 20)))]
    verdict = _combine(verdicts)
    body_level = b_verdict == "body-reject" and verdict != "reject"
    req = Req(
        raw=raw,
        method=method,
        verdict="reject" if body_level else verdict,
        body_level=body_level,
        complete=complete,
        reply=reply,
        body=decoded,
        target=target.origin,
        authority=authority,
        closes=closes,
        upgrade=upgrade,
        hop=hop,
        why=tuple(why),
    )
    if not junk:
        return [req]
    # Bytes past the declared body start the next "request": refused (4xx) or, cut short by the
    # end of the connection, dropped (after an upgrade: the new protocol's first bytes).
    return [req, Req(raw=junk, method="GET", verdict="reject", complete=False, why=("junk",))]


@st.composite
def host_header(
    draw: st.DrawFn, target: Target, version: bytes, known: frozenset[str], clean: bool = False
) -> tuple[bytes, bytes | None, str, str]:
    """(Host line or b"", the Host the backend must see or None, verdict, why)."""
    kind = draw(_pick(*(["one"] * 7 + ["empty", "ows"] + ([] if clean else ["dup", "none"]))))
    if kind == "none":
        if version == b"HTTP/1.1":
            return b"", None, "reject", "no-host"  # RFC 9112 §3.2, whatever the target form
        return b"", target.authority, "ok", "no-host"  # HTTP/1.0: routed on "" or the target's
    name = draw(_pick(b"Host", b"host", b"HOST", b"hOsT"))
    if kind == "empty":
        value = b""
    elif target.authority is not None and (clean or draw(st.integers(0, 3))):
        value = draw(agreeing_host(target, known, clean))
    else:
        value = draw(_pick(*OK_HOSTS) if clean else host_values())
    if kind == "ows":
        value = b"  \t" + value + b" \t"
    line = name + b": " + value
    if kind == "dup":
        line += b"\r\nHost: " + draw(host_values())
        return line, None, "reject", "duplicate-host"
    verdict = host_verdict(value)
    why = f"host:{value!r}"
    if target.authority is None:
        return line, value.strip(_OWS) or None, verdict, why  # empty: the pool's name goes
    if not same_authority(value, target.authority, target.scheme):
        return line, None, "reject", why + "-mismatch"  # RFC 9112 §3.2.2
    return line, target.authority, verdict, why


def upgrade_body_verdict(framing: list[bytes]) -> str:
    """A forwarded upgrade request has no body: with one it is refused (400), as a body would
    reach the pod unframed. Content-Length 0 spelled other than "0" may be refused as well."""
    for line in framing:
        name, _, value = line.partition(b":")
        if name.lower() == b"transfer-encoding":
            return "reject"
        value = value.lstrip(_OWS)
        if value != b"0":
            return "either" if value.strip(_OWS) in (b"00", b"0") else "reject"
    return "ok"


@st.composite
def cases(draw: st.DrawFn, known: frozenset[str] = frozenset(KNOWN_DEFECTS), most: int = 3) -> Case:
    """One client connection: up to ``most`` requests (then perhaps junk), cut in segments."""
    n = draw(st.integers(1, most))
    reqs = [r for i in range(n) for r in draw(requests(known, i == 0, i == n - 1))]
    size = sum(len(r.raw) for r in reqs)
    cuts = tuple(sorted(set(draw(st.lists(st.integers(1, max(1, size - 1)), max_size=6)))))
    complete = all(r.complete for r in reqs)
    half_close = not complete or draw(st.booleans())
    return Case(reqs, cuts, half_close)


# =========================================================================== the backend
@dataclass
class Seen:
    """One request as the backend's h11 saw it."""

    marker: str
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    port: int = 0

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


class Backend:
    """Strict HTTP/1.1 servers (h11) on 127.0.0.1 that record every request they receive."""

    def __init__(self) -> None:
        self.seen: dict[str, list[Seen]] = {}
        self.errors: list[str] = []
        self.busy = 0  # connections inside a message
        self.connections = 0
        self.servers: list[asyncio.Server] = []
        self.ports: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, count: int = 2) -> None:
        for _ in range(count):
            server = await asyncio.start_server(self._serve, HOST, 0)
            self.servers.append(server)
            self.ports.append(int(server.sockets[0].getsockname()[1]))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def reset(self) -> None:
        self.seen = {}
        self.errors = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        received = bytearray()
        inside: list[Seen] = []  # the message being received, if any
        try:
            await self._exchange(reader, writer, received, inside)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a bug here must show as a failure, not pass silently
            self.errors.append(f"backend crashed: {exc!r} after receiving {bytes(received)!r}")
        finally:
            if inside:
                self.busy -= 1
            self.connections -= 1
            self._tasks.discard(task)
            writer.close()

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        received: bytearray,
        inside: list[Seen],
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
        port = int(writer.get_extra_info("sockname")[1])
        current: Seen | None = None
        eof = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if inside and eof:
                    return  # cut short by the proxy closing: an abandoned request
                self.errors.append(
                    f"backend h11 refused what the proxy sent: {exc} (port {port}); "
                    f"bytes on that connection: {bytes(received[-4000:])!r}"
                )
                return
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    eof = True
                received += data
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                headers = [(bytes(k).lower(), bytes(v)) for k, v in event.headers]
                marker = next((v.decode("latin-1") for k, v in headers if k == b"x-fuzz"), "")
                current = Seen(
                    marker, event.method.decode(), bytes(event.target), headers, port=port
                )
                self.seen.setdefault(marker, []).append(current)
                self.busy += 1
                inside.append(current)
            elif isinstance(event, h11.Data):
                assert current is not None
                current.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert current is not None
                current.complete = True
                self.busy -= 1
                inside.clear()
                switched = await self._reply(conn, writer, current)
                if switched or conn.our_state is h11.MUST_CLOSE:
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    current = None
            elif isinstance(event, h11.ConnectionClosed):
                return
            elif event is h11.PAUSED:
                return  # a switch was refused and h11 waits: nothing more to serve here

    @staticmethod
    async def _reply(conn: h11.Connection, writer: asyncio.StreamWriter, seen: Seen) -> bool:
        """Answer as x-fuzz-reply asks; True when the connection switched protocols."""
        reply = (seen.header(b"x-fuzz-reply") or [b"cl"])[0].decode()
        body = b"m:" + seen.marker.encode()
        head_only = seen.method == "HEAD"
        out: list[bytes] = []
        if reply in BIG_HEADS:
            head = (
                b"HTTP/1.1 200 OK\r\nx-big: "
                + b"a" * (62 * 1024)
                + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            step = len(head) if reply == "bighead" else 4096  # bigsplit: 16 writes
            for at in range(0, len(head), step):
                writer.write(head[at : at + step])
                await writer.drain()
                await asyncio.sleep(0)  # each its own send (the proxy may read them as one)
            return True
        if reply == "101" and conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
            out.append(
                conn.send(
                    h11.InformationalResponse(
                        status_code=101,
                        headers=[("upgrade", "websocket"), ("connection", "upgrade")],
                    )
                )
                or b""
            )
            out.append(b"tunnel:" + body)
            writer.write(b"".join(out))
            await writer.drain()
            return True
        if reply == "100":
            out.append(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        status = {"503": 503, "204": 204}.get(reply, 200)
        if status == 204:
            out.append(conn.send(h11.Response(status_code=204, headers=[])) or b"")
        elif reply == "chunked":
            out.append(
                conn.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
                or b""
            )
            if not head_only:
                out.append(conn.send(h11.Data(data=body[:3])) or b"")
                out.append(conn.send(h11.Data(data=body[3:])) or b"")
        else:
            out.append(
                conn.send(
                    h11.Response(status_code=status, headers=[("content-length", str(len(body)))])
                )
                or b""
            )
            if not head_only:
                out.append(conn.send(h11.Data(data=body)) or b"")
        out.append(conn.send(h11.EndOfMessage()) or b"")
        writer.write(b"".join(out))
        await writer.drain()
        return False

    async def quiet(self, within: float = 3.0) -> bool:
        """Until no backend connection is inside a message (False if it takes too long)."""
        deadline = asyncio.get_running_loop().time() + within
        while self.busy > 0:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)
        return True


# =========================================================================== the client side
@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    interim: list[int] = field(default_factory=list)
    tunnel: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def closes(self) -> bool:
        value = self.header(b"connection") or b""
        return b"close" in value.lower()


@dataclass
class Outcome:
    answers: list[Answer]
    raw: bytes
    eof: bool
    reset: bool
    error: str | None  # the response stream was not HTTP/1.1, or the proxy hung


_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ResponseReader:
    """The client's strict view of what came back: h11 in client mode, request by request."""

    def __init__(self, requests: list[Req]) -> None:
        self.requests = requests
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=HEAD_LIMIT + 4096)
        self.answers: list[Answer] = []
        self.error: str | None = None
        self.tunnel = False
        self.closed = False
        self._current: Answer | None = None
        self._interim: list[int] = []
        self._index = 0
        self._send_next()

    def _send_next(self) -> None:
        if self._index >= len(self.requests):
            return
        req = self.requests[self._index]
        method = req.method.encode() if _TOKEN_RE.fullmatch(req.method.encode()) else b"GET"
        headers = [(b"host", b"x")]
        if req.upgrade:
            headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
        self.conn.send(h11.Request(method=method, target=b"/", headers=headers))
        self.conn.send(h11.EndOfMessage())

    @property
    def done(self) -> bool:
        """Every request has its final answer (or the stream ended)."""
        return (
            self.closed
            or self.tunnel
            or self.error is not None
            or (len(self.answers) == len(self.requests) and self._current is None)
        )

    def feed(self, data: bytes) -> None:
        """Bytes from the proxy; ``b""`` for the end of the connection."""
        if self.error is not None or self.closed:
            return
        if self.tunnel:
            self.answers[-1].tunnel += data
            return
        if not data and self._current is None and self.conn.their_state is h11.SEND_RESPONSE:
            self.closed = True  # closed with no answer under way: check() judges the silence
            return
        self.conn.receive_data(data)
        try:
            self._events()
        except h11.RemoteProtocolError as exc:
            self.error = f"response is not valid HTTP/1.1 (h11: {exc})"

    def _events(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self.answers.append(Answer(101, _lower(event.headers)))
                    self.tunnel = True
                    self.answers[-1].tunnel = bytes(self.conn.trailing_data[0])
                    return
                self._interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                self._current = Answer(
                    event.status_code, _lower(event.headers), interim=self._interim
                )
                self._interim = []
            elif isinstance(event, h11.Data):
                assert self._current is not None
                self._current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert self._current is not None
                self.answers.append(self._current)
                self._current = None
                if self.conn.their_state is h11.MUST_CLOSE or self.conn.our_state is h11.MUST_CLOSE:
                    continue
                self.conn.start_next_cycle()
                self._index += 1
                if self._index >= len(self.requests):
                    return
                self._send_next()
            elif isinstance(event, h11.ConnectionClosed):
                self.closed = True
                return
            elif event is h11.PAUSED:
                if len(self.answers) >= len(self.requests):
                    return  # more bytes after the last answer: read_case reports them
                self.error = "h11 paused"
                return


def _lower(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(bytes(k).lower(), bytes(v)) for k, v in headers]


def render(case: Case, markers: Iterable[str]) -> tuple[bytes, list[str], list[str]]:
    """Fill the case's placeholders with fresh markers, in place (``raw`` and ``body``).

    Returns (bytes to send, one marker per request, the markers smuggled inside bodies).
    """
    it = iter(markers)
    req_markers: list[str] = []
    smuggled: list[str] = []
    for req in case.requests:
        mine = [next(it) for _ in range(req.raw.count(MARK))] or [next(it)]
        req_markers.append(mine[0])
        smuggled += mine[1:]
        for m in mine:
            req.raw = req.raw.replace(MARK, m.encode(), 1)
        for m in mine[1:]:
            req.body = req.body.replace(MARK, m.encode(), 1)
    return case.data(), req_markers, smuggled


def send_case(port: int, case: Case, data: bytes) -> Outcome:
    """One connection: send the segments, read the answers (blocking socket, bounded)."""
    reader = ResponseReader(case.requests)
    raw = bytearray()
    eof = reset = False
    error: str | None = None
    sock = socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pieces = [data[a:b] for a, b in itertools.pairwise((0, *case.cuts, len(data)))]
        with contextlib.suppress(OSError):
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(0.001)  # separate reads on the proxy's side (best effort)
                sock.sendall(piece)
            if case.half_close:
                sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while True:
            if not case.half_close and reader.done and not reader.tunnel:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                error = f"the proxy hung: no EOF and no complete answer in {CLIENT_TIMEOUT}s"
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            except TimeoutError:
                continue
            if not chunk:
                eof = True
                reader.feed(b"")
                break
            raw += chunk
            reader.feed(chunk)  # bytes after the last answer: h11 calls them an error
    finally:
        sock.close()
    return Outcome(reader.answers, bytes(raw), eof, reset, error or reader.error)


# =========================================================================== the invariants
def check(
    case: Case,
    req_markers: list[str],
    smuggled: list[str],
    outcome: Outcome,
    backend: Backend,
) -> list[str]:
    """Every invariant the case broke, in words (empty: all held)."""
    problems: list[str] = []
    if outcome.error:
        problems.append(outcome.error)
    problems += [f"backend: {e}" for e in backend.errors]
    answers = list(outcome.answers)
    closed_at: int | None = None  # index of the request after which nothing may be answered
    refused_at: int | None = None  # the request the proxy refused, closing the connection
    local: set[int] = set()  # requests the proxy answered itself
    for i, req in enumerate(case.requests):
        if closed_at is not None:
            break
        answer = answers.pop(0) if answers else None
        if answer is None:
            lost = outcome.reset or outcome.error is not None
            if req.complete and not lost:
                problems.append(f"request {i} ({req.verdict}, complete) got no answer")
            closed_at = i
            break
        refused = answer.status in REJECT_STATUSES
        if refused and req.verdict == "either" and not answer.closes:
            local.add(i)  # a local answer (404 no route, 501): the connection goes on
            continue
        if req.verdict == "reject" or (refused and req.verdict == "either"):
            if not refused:
                problems.append(f"request {i} must be refused with a 4xx, got {answer.status}")
            if not answer.closes:
                problems.append(f"request {i} refused ({answer.status}) without connection: close")
            closed_at = refused_at = i
            local.add(i)
            continue
        if refused and not req.complete:
            closed_at = i
            continue  # a 400/408 for a request cut short is fine
        if req.reply in BIG_HEADS:
            if answer.status != 502:
                problems.append(
                    f"request {i}: a 62 KiB response head must give 502, got {answer.status}"
                )
            if req.closes or answer.closes or req.upgrade:
                closed_at = i  # else the client connection goes on (the upstream one closed)
            continue
        expected = req.status if req.reply != "101" or req.upgrade else 200
        if answer.status != expected:
            problems.append(
                f"request {i} ({req.verdict}) must get the backend's {expected}, got "
                f"{answer.status} {answer.body[:200]!r}"
            )
        elif expected not in (101, 204) and req.method != "HEAD":
            want = b"m:" + req_markers[i].encode()
            if answer.body != want:
                problems.append(f"request {i}: answer body {answer.body[:200]!r}, want {want!r}")
        if answer.status == 101 or req.closes or answer.closes or req.upgrade:
            closed_at = i
    if answers:
        problems.append(f"{len(answers)} answer(s) more than requests answered: {answers!r}")

    # The backend's view, request by request.
    after_close = False
    for i, req in enumerate(case.requests):
        marker = req_markers[i]
        seen = backend.seen.get(marker, [])
        # The implicit default policy re-sends a 503's request when its method is idempotent
        # (and it can be sent again: not an upgrade), and only then.
        retried = req.reply == "503" and req.method in IDEMPOTENT and not req.upgrade
        limit = 1 + (DEFAULT_RETRIES if retried else 0)
        if len(seen) > limit:
            problems.append(f"request {i} ({req.method}) reached the backend {len(seen)} times")
        if after_close and seen:
            problems.append(f"request {i} came after one that closes, yet reached the backend")
        if req.verdict == "reject" and not req.body_level and seen:
            problems.append(f"request {i} must be refused, yet reached the backend: {seen[0]!r}")
        if req.verdict == "reject" and req.body_level and any(s.complete for s in seen):
            problems.append(f"request {i} has a broken body, yet reached the backend complete")
        for s in seen:
            for name in (b"http2-settings", *req.hop):
                if s.header(name):
                    problems.append(f"request {i}: hop-by-hop header {name!r} reached the backend")
            if req.upgrade:
                if [v.lower() for v in s.header(b"upgrade")] != [b"websocket"]:
                    problems.append(f"request {i}: backend saw Upgrade {s.header(b'upgrade')!r}")
            elif s.header(b"upgrade") or s.header(b"connection"):
                # Only a forwarded upgrade has them: h2c is stripped, a bare Upgrade dropped.
                problems.append(
                    f"request {i}: backend saw Upgrade {s.header(b'upgrade')!r} and Connection "
                    f"{s.header(b'connection')!r} on a request that does not upgrade"
                )
        if req.verdict != "reject" and req.complete and not after_close and i not in local and seen:
            s = seen[0]
            if not s.complete:
                problems.append(f"request {i} reached the backend incomplete")
            if s.method != req.method:
                problems.append(f"request {i}: backend saw method {s.method!r}")
            if s.target != req.target:
                problems.append(
                    f"request {i}: backend saw target {s.target!r}, want {req.target!r}"
                )
            if s.complete and bytes(s.body) != req.body:
                problems.append(f"request {i}: backend saw body {bytes(s.body)[:200]!r}")
            if retried and len(seen) != limit:
                problems.append(
                    f"request {i} ({req.method}) answered 503 reached the backend {len(seen)} "
                    f"times, not {limit} (the default retry policy)"
                )
            hosts = s.header(b"host")
            if req.authority is not None and [h.lower() for h in hosts] != [req.authority.lower()]:
                problems.append(f"request {i}: backend saw Host {hosts!r}, want {req.authority!r}")
        if req.verdict == "ok" and req.complete and not after_close and not seen:
            answered = i < len(outcome.answers)
            if answered or not (outcome.reset or outcome.error):
                problems.append(f"request {i} (ok, complete) never reached the backend")
        if req.closes or req.verdict == "reject" or not req.complete or req.upgrade:
            after_close = True
        if i == refused_at:
            after_close = True
        if i == closed_at and not (outcome.reset or outcome.error):
            after_close = True  # answered with "connection: close" (or not at all): served serially
        if i in local and any(s.complete for s in seen):
            problems.append(f"request {i} was answered by the proxy, yet reached the backend")
    for m in smuggled:
        if m in backend.seen:
            problems.append(f"a request smuggled inside a body reached the backend ({m})")
    expected_markers = set(req_markers) | set(smuggled)
    strangers = [m for m in backend.seen if m not in expected_markers]
    if strangers:
        problems.append(f"the backend saw requests this case did not send: {strangers}")
    return problems


# =========================================================================== the targets
def article_config_yaml(ports: Iterable[int]) -> str:
    """A Gateway, a catch-all VirtualService, a cookie DestinationRule, static endpoints."""
    endpoints = "".join(f"  - address: {HOST}\n    ports:\n      http: {p}\n" for p in ports)
    return f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: fuzz-gw}}
spec:
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: fuzz-vs}}
spec:
  hosts: ["*"]
  gateways: [fuzz-gw]
  http:
  - route:
    - destination: {{host: fuzz-backend, port: {{number: 8080}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: fuzz-dr}}
spec:
  host: fuzz-backend.default.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {{name: ISTIOID, ttl: 60s}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: fuzz-backend}}
spec:
  hosts: [fuzz-backend.default.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}"""


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


class Harness:
    """A uvloop loop in a thread running the backend and (in-process) the real proxy.

    ``run(case)`` sends one case over a new connection, then a clean request on another, and
    returns the broken invariants. With ``proxy_port`` given, the proxy is someone else's (a
    subprocess, bench/fuzz.py) and only the backend runs here.
    """

    def __init__(self, *, in_process: bool = True) -> None:
        self.in_process = in_process
        self.loop = uvloop.new_event_loop()  # the loop `sticky-proxy run` uses
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.backend = Backend()
        self.proxy: Any = None
        self.port = 0
        self.errors = _ErrorLog()
        self.errors.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self._markers = (f"m{n:011d}" for n in itertools.count())
        self.cases = 0

    def __enter__(self) -> Harness:
        self.thread.start()
        self.call(self.backend.start())
        if self.in_process:
            self.call(self._start_proxy())
            logging.getLogger("proxy").addHandler(self.errors)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("proxy").removeHandler(self.errors)
        if self.proxy is not None:
            self.call(self.proxy.stop(grace=1))
        self.call(self.backend.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start_proxy(self) -> None:
        from proxy.istio import load_text
        from proxy.server import Proxy, RunOptions

        config = load_text(article_config_yaml(self.backend.ports), "fuzz")
        self.proxy = Proxy(config, RunOptions(listen=((HOST, 0),), access_log="off"))
        await self.proxy.start()
        self.port = self.proxy.addresses[0][1]

    def write_config(self, directory: Path) -> Path:
        path = directory / "fuzz.yaml"
        path.write_text(article_config_yaml(self.backend.ports))
        return path

    def run(self, case: Case) -> list[str]:
        self.cases += 1
        self.call(self._reset())
        self.proxy_errors()
        case = Case([replace(r) for r in case.requests], case.cuts, case.half_close)
        data, req_markers, smuggled = render(case, self._markers)
        outcome = send_case(self.port, case, data)
        probe_marker = next(self._markers)
        probe = self.probe(probe_marker)
        if not self.call(self.backend.quiet()):
            probe.append("a backend connection stayed inside a message (abandoned request)")
        self.backend.seen.pop(probe_marker, None)
        problems = check(case, req_markers, smuggled, outcome, self.backend)
        problems += probe
        problems += [f"the proxy logged an ERROR: {r}" for r in self.proxy_errors()]
        return problems

    def proxy_errors(self) -> list[str]:
        """ERROR records the proxy logged since the last case (in-process: its loggers)."""
        records = list(self.errors.records)
        self.errors.records.clear()
        return records

    async def _reset(self) -> None:
        await self.backend.quiet()
        self.backend.reset()

    def probe(self, marker: str) -> list[str]:
        """A clean request on a new connection must still be served."""
        data = (
            b"GET /probe HTTP/1.1\r\nHost: test.com\r\nx-fuzz: %s\r\nx-fuzz-reply: cl\r\n"
            b"Connection: close\r\n\r\n" % marker.encode()
        )
        case = Case([Req(raw=data, method="GET", closes=True)], half_close=False)
        outcome = send_case(self.port, case, data)
        if outcome.error or not outcome.answers:
            return [f"a clean request on a new connection failed afterwards: {outcome.error}"]
        answer = outcome.answers[0]
        if answer.status != 200 or answer.body != b"m:" + marker.encode():
            return [f"a clean request afterwards got {answer.status} {answer.body[:200]!r}"]
        return []


def report(case: Case, problems: list[str]) -> str:
    """A failure in words, with the bytes to reproduce it."""
    return "\n".join(
        ["broken invariants:", *(f"  - {p}" for p in problems), "case:", case.describe()]
    )
