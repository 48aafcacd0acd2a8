"""Fuzzing the running proxy over sockets: generators, a strict backend, and the invariants.

Shared by tests/test_fuzz.py (bounded, part of ``make test``) and bench/fuzz.py (N minutes).

What is fuzzed
--------------
A :class:`Case` is one client connection: one to three pipelined requests built from generated
pieces (method, request-target form, version, Host, odd header lines, Cookie lines of many
pieces, Connection/Upgrade combinations, Content-Length and chunked bodies with their framing
tricks), the bytes cut into random segments. Every piece knows what RFC 9110/9112 make of it,
so every request carries a *verdict*:

    ok       must be forwarded, once, with its method, target, authority and body intact
    either   the proxy may refuse it (4xx) or forward it; if forwarded, as for ok
    reject   must not reach the backend (a 4xx, 501 or 505, then the connection closes); a
             request whose head was fine and whose body breaks (bad chunk) may have its head
             streamed upstream, but the backend must never see it complete

Invariants checked after every case (:func:`check`)
---------------------------------------------------
* the client's bytes parse as HTTP/1.1 responses (h11, client side), one per answered request,
  in order, each the backend's own answer to that request (its body names the request);
* every backend connection parses with h11 on the server side: anything h11 refuses is a
  failure, except a message cut short by the connection closing (the proxy abandoning it);
* no request reaches the backend twice (idempotent ones: at most the default retry policy's
  two retries after a 503), no rejected request reaches it, nothing after a request that closes
  the connection does, nothing smuggled inside a body does;
* hop-by-hop headers and h2c upgrade headers do not reach the backend;
* the proxy logs no ERROR (in-process target) and a clean request on a new connection is
  answered 200 afterwards.

Each request carries a unique marker (``x-fuzz`` header) so the backend can count it, and asks
the backend for an answer (``x-fuzz-reply``: 200 with Content-Length or chunked, 503, 204, 100
then 200, 101 for an upgrade). Requests smuggled inside bodies carry markers too.

A response head over the proxy's 60 KiB limit (62 KiB, one write) must become a 502. ERRORs
are read from the proxy's loggers in-process, from its output as a process (bench/fuzz.py).

Known defects
-------------
:data:`KNOWN_DEFECTS` names the families of input that break an invariant on 3682cec: those
issue 18 lists and those this fuzzing found ("new: ..."). The generators leave them out (each
has an explicit xfail-strict test with its minimal bytes in tests/test_fuzz.py), so the fuzz
test stays green while its invariants stay whole. When a fix lands, remove the name here: the
generators then produce that family too.
"""

from __future__ import annotations

import asyncio
import contextlib
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
HEAD_LIMIT = 60 * 1024  # ServerSettings.max_header_bytes; response heads over it must be 502

KNOWN_DEFECTS: dict[str, str] = {
    "absolute-form": "issue 18: absolute-form targets answer 500 on the compiled build",
    "invalid-host": "issue 18: an invalid Host value is routed instead of refused (400)",
    "h2c": "issue 18: Upgrade: h2c and HTTP2-Settings are forwarded to the pod",
    "replay": "issue 18: a non-idempotent request answered 503 is sent again (default retries)",
    "big-response-head": "issue 18: a response head over 60 KiB in one read is relayed",
    "absolute-empty-query": "new: absolute-form http://h/p? is forwarded as /p (its empty query"
    " dropped), where origin-form /p? is forwarded as is",
    "head-error-body": "new: a 400 (or other error reply) to a HEAD request carries a body",
    "upgrade-body": "new: an Upgrade request's body is not forwarded as its body (it goes into"
    " the tunnel after a 101, chunk framing and all, or is dropped)",
}


def compiled() -> bool:
    """Whether the request path runs as mypyc extensions (the absolute-form crash needs them)."""
    import proxy.http1

    return str(proxy.http1.__file__).endswith(".so")


def active_defects(include_known: bool = False) -> frozenset[str]:
    """The known-defect families to keep out of generated cases in this build."""
    if include_known:
        return frozenset()
    known = set(KNOWN_DEFECTS)
    if not compiled():
        known.discard("absolute-form")  # the interpreted build handles it
    return frozenset(known)


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

OK_HOSTS = [
    b"test.com",
    b"test.com:8080",
    b"TEST.com",
    b"127.0.0.1",
    b"127.0.0.1:80",
    b"[::1]",
    b"[::1]:8080",
    b"a-b.example",
    b"xn--bcher-kva.example",
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
    b"a,b",
    b"h:80:80",
    b"user@h",
]


@st.composite
def methods(draw: st.DrawFn) -> tuple[bytes, str, str]:
    """(method bytes, method for the client's h11, verdict)."""
    kind = draw(st.sampled_from(["std", "std", "std", "token", "bad"]))
    if kind == "std":
        m = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
        return m.encode(), m, "ok"
    if kind == "token":
        m = draw(
            st.one_of(st.sampled_from(["PURGE", "get", "M-SEARCH", "PROPFIND", "FOO"]), _tokens)
        )
        return m.encode(), m, "either"  # unknown methods: forward, or refuse (501/4xx)
    bad = draw(st.sampled_from([b"", b"GE\x00T", b"G(T", b"CONNECT", b"GET\x7f", b"G\xc3\xa9T"]))
    return bad, "GET", "reject"


@st.composite
def targets(draw: st.DrawFn, method: str, known: frozenset[str]) -> tuple[bytes, Any]:
    """(request-target, (verdict, origin target the backend must see, authority or None, why))."""
    forms = ["origin"] * 4 + ["weird", "authority", "asterisk", "garbage"]
    if "absolute-form" not in known:
        forms += ["absolute", "absolute"]
    form = draw(st.sampled_from(forms))
    path = draw(_path).encode()
    query = draw(_query).encode()
    if form == "origin":
        t = path + query
        return t, ("ok", t, None, "origin")
    if form == "weird":
        t, verdict = draw(
            st.sampled_from(
                [
                    (b"//x", "ok"),
                    (b"/a%zz", "either"),
                    (b"/a#frag", "either"),
                    (b"/\xc3\xa9", "either"),
                    (b"/a\x7f", "reject"),
                    (b"/a\x01b", "reject"),
                    (b"/a b", "reject"),
                    (b"/a\tb", "reject"),
                    (b"/" + b"x" * 2000, "ok"),
                ]
            )
        )
        return t, (verdict, t, None, "weird-target")
    if form == "absolute":
        host = draw(st.sampled_from([b"test.com", b"test.com:80", b"Test.COM", b"127.0.0.1:9"]))
        scheme = draw(st.sampled_from([b"http://", b"http://", b"HTTP://", b"https://"]))
        bare = draw(st.booleans())
        if query == b"?" and "absolute-empty-query" in known:
            query = b""
        t = scheme + host + (b"" if bare else path + query)
        origin = b"/" if bare else path + query
        verdict = "either" if scheme == b"https://" else "ok"
        return t, (verdict, origin, host, "absolute-form")
    if form == "authority":
        return b"test.com:80", ("reject", b"", None, "authority-form")
    if form == "asterisk":
        return b"*", ("either" if method == "OPTIONS" else "reject", b"*", None, "asterisk-form")
    t = draw(
        st.sampled_from(
            [b"p", b"http://", b"http:///p", b"http://h:abc/p", b"ftp://h/p", b"?q", b"%2F", b""]
        )
    )
    return t, ("reject", b"", None, "garbage-target")


@st.composite
def versions(draw: st.DrawFn) -> tuple[bytes, str]:
    v = draw(st.sampled_from(["1.1"] * 6 + ["1.0"] * 2 + ["bad"]))
    if v != "bad":
        return b"HTTP/" + v.encode(), "ok"
    bad = draw(
        st.sampled_from(
            [
                b"HTTP/1.2",
                b"HTTP/2.0",
                b"HTTP/0.9",
                b"http/1.1",
                b"HTTP/1",
                b"HTTP/11",
                b"HTTP/1.1x",
            ]
        )
    )
    return bad, "reject"


@st.composite
def cookie_lines(draw: st.DrawFn) -> bytes:
    """A Cookie line of many pieces: the ISTIOID cookie (or look-alikes) among others."""
    piece = st.one_of(
        st.builds(lambda n, v: n + b"=" + v, _tokens.map(str.encode), _tokens.map(str.encode)),
        st.sampled_from(
            [
                b"ISTIOID=abc",
                b'ISTIOID="quoted"',
                b"ISTIOID",
                b"ISTIOID=",
                b" ISTIOID = v",
                b"xISTIOID=1",
                b"",
                b"=v",
            ]
        ),
    )
    pieces = draw(st.lists(piece, min_size=1, max_size=40))
    repeat = draw(st.sampled_from([1, 1, 1, 20]))
    return b"; ".join(pieces * repeat)


@st.composite
def extra_header(draw: st.DrawFn) -> tuple[bytes, str, str]:
    """(header line without CRLF, verdict, why)."""
    kind = draw(
        st.sampled_from(
            [
                "ok",
                "ok",
                "ows",
                "cookie",
                "obs-text",
                "ctl",
                "nul-cr",
                "space-colon",
                "empty-name",
                "bad-name",
                "obs-fold",
                "no-colon",
                "many",
                "expect",
            ]
        )
    )
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
        c = draw(st.sampled_from(list(_CTL)))
        return b"x-h-" + name + b": a" + bytes([c]) + b"b", "either", f"ctl-{c:#x}"
    if kind == "nul-cr":
        c = draw(st.sampled_from([b"\x00", b"\r", b"\rX"]))
        return b"x-h-" + name + b": a" + c + b"b", "reject", "nul-cr-in-value"
    if kind == "space-colon":
        ws = draw(st.sampled_from([b" ", b"\t", b"  "]))
        return b"x-h-" + name + ws + b": v", "reject", "space-before-colon"
    if kind == "empty-name":
        return b": v", "reject", "empty-name"
    if kind == "bad-name":
        c = draw(st.sampled_from([*b'()<>@,;\\"/[]?={} ', 0x80, 0x01]))
        return b"x-h" + bytes([c]) + b"n: v", "reject", f"bad-name-{c:#x}"
    if kind == "obs-fold":
        return b"x-h-" + name + b": a\r\n b", "reject", "obs-fold"
    if kind == "no-colon":
        return b"x-h-" + name, "reject", "no-colon"
    if kind == "many":
        n = draw(st.integers(10, 80))
        return b"\r\n".join(b"x-m%d: %d" % (i, i) for i in range(n)), "ok", "many-headers"
    return b"Expect: 100-continue", "ok", "expect-100"


@st.composite
def chunked_body(draw: st.DrawFn) -> tuple[bytes, bytes, str, str]:
    """(encoded body, decoded body, verdict, why); verdict reject means a body-level error."""
    datas = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    trick = draw(
        st.sampled_from(
            ["plain"] * 4
            + [
                "upper-hex",
                "leading-zeros",
                "ext",
                "quoted-ext",
                "trailer",
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
        )
    )
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


@st.composite
def bodies(draw: st.DrawFn, version: bytes) -> tuple[list[bytes], bytes, bytes, str, str]:
    """(framing header lines, encoded body, decoded body, verdict, why).

    verdict: ok | either | reject (head-level) | body-reject | incomplete | long.
    """
    kind = draw(
        st.sampled_from(
            ["none"] * 3
            + ["cl"] * 3
            + ["chunked"] * 3
            + ["cl-short", "cl-long", "cl-odd", "cl-dup", "te-odd", "cl-te", "smuggle"]
        )
    )
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
        junk = draw(st.sampled_from([b"x", b"\r\n", b"garbage\r\n\r\n", b"\x00\x01"]))
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
                    (b"%d, %d" % (n, n), "either"),
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
        return lines, data, data, "either" if same else "reject", f"cl-dup-same={same}"
    if kind == "cl-te":
        first = draw(st.booleans())
        lines = [b"Content-Length: 3", b"Transfer-Encoding: chunked"]
        return lines[:: 1 if first else -1], b"0\r\n\r\n", b"", "reject", "cl+te"
    enc, dec, verdict, why = draw(chunked_body())
    te = [b"chunked"]  # one Transfer-Encoding line per value
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
        if te_verdict == "reject":
            verdict = "reject"
    if version == b"HTTP/1.0" and verdict != "reject":
        verdict = "reject"  # RFC 9112 §6.1: chunked in an HTTP/1.0 request
        why += "+te-on-1.0"
    elif verdict == "reject" and kind != "te-odd":
        verdict = "body-reject"
    return [b"Transfer-Encoding: " + v for v in te], enc, dec, verdict, why


@st.composite
def requests(draw: st.DrawFn, known: frozenset[str], last: bool) -> list[Req]:
    """One request (and junk after it); ``last``: it may be cut short (nothing follows it)."""
    mbytes, method, m_verdict = draw(methods())
    target, (t_verdict, origin, t_authority, t_why) = draw(targets(method, known))
    version, v_verdict = draw(versions())
    why = [f"method:{mbytes!r}", t_why, version.decode("latin-1")]
    verdicts = [m_verdict, t_verdict, v_verdict]

    headers: list[bytes] = [b"x-fuzz: " + MARK]
    authority: bytes | None = t_authority
    host_kind = draw(st.sampled_from(["ok"] * 6 + ["bad", "dup", "none", "empty", "ows"]))
    if host_kind == "bad" and "invalid-host" in known:
        host_kind = "ok"
    host = draw(st.sampled_from(OK_HOSTS))
    if host_kind in ("ok", "ows"):
        headers.insert(
            draw(st.integers(0, 1)), b"Host: " + (b"  %s \t" % host if host_kind == "ows" else host)
        )
        if t_authority is None:
            authority = host
        elif t_authority.lower() != host.lower():
            verdicts.append("either")  # RFC 9112 §3.2.2: Host must equal the target's authority
            why.append("host-mismatch")
    elif host_kind == "bad":
        headers.append(b"Host: " + draw(st.sampled_from(BAD_HOSTS)))
        verdicts.append("reject")
        why.append("invalid-host")
    elif host_kind == "dup":
        headers += [b"Host: " + host, b"Host: " + draw(st.sampled_from(OK_HOSTS))]
        verdicts.append("reject")
        why.append("duplicate-host")
    elif host_kind == "empty":
        headers.append(b"Host:")
        verdicts.append("either")
        why.append("empty-host")
    else:
        if version == b"HTTP/1.1":
            verdicts.append("either" if t_authority is not None else "reject")
        else:
            verdicts.append("either")  # HTTP/1.0 without Host: may be refused or unroutable
        why.append("no-host")

    for line, verdict, hwhy in draw(st.lists(extra_header(), max_size=3)):
        headers.insert(draw(st.integers(1, len(headers))), line)
        verdicts.append(verdict)
        why.append(hwhy)

    closes = version == b"HTTP/1.0"
    hop: tuple[bytes, ...] = ()
    upgrade = False
    conn_kind = draw(
        st.sampled_from(
            ["none"] * 4 + ["close", "keep-alive", "hop", "websocket", "h2c", "bare-upgrade"]
        )
    )
    if conn_kind == "h2c" and "h2c" in known:
        conn_kind = "none"
    if conn_kind == "close":
        headers.append(b"Connection: close")
        closes = True
    elif conn_kind == "keep-alive":
        headers.append(b"Connection: keep-alive")
        closes = False
    elif conn_kind == "hop":
        headers += [b"Connection: x-hop-a, X-Hop-B", b"X-Hop-A: 1", b"x-hop-b: 2"]
        hop = (b"x-hop-a", b"x-hop-b")
    elif conn_kind == "websocket":
        headers += [
            b"Connection: " + draw(st.sampled_from([b"Upgrade", b"keep-alive, upgrade"])),
            b"Upgrade: websocket",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
        ]
        upgrade = True
        closes = True
    elif conn_kind == "h2c":
        headers += [
            b"Connection: Upgrade, HTTP2-Settings",
            b"Upgrade: h2c",
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ]
        hop = (b"http2-settings",)
    elif conn_kind == "bare-upgrade":
        headers.append(b"Upgrade: websocket")  # no "Connection: upgrade": just a header
    why.append(f"conn:{conn_kind}")

    framing, encoded, decoded, b_verdict, b_why = draw(bodies(version))
    if upgrade and "upgrade-body" in known:
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
    if upgrade and (encoded or framing):
        verdicts.append("either")  # an upgrade with a body: what follows a 101 is unclear
    for line in framing:
        headers.insert(draw(st.integers(1, len(headers))), line)

    reply = draw(st.sampled_from(["cl"] * 4 + ["chunked", "503", "204", "100"]))
    if upgrade and draw(st.booleans()):
        reply = "101"
    if reply == "503" and "replay" in known and method not in IDEMPOTENT:
        reply = "cl"
    if draw(st.integers(0, 40)) == 0 and "big-response-head" not in known:
        reply = "bighead"
    headers.insert(1, b"x-fuzz-reply: " + reply.encode())

    eol_kind = draw(st.sampled_from(["crlf"] * 12 + ["lf", "one-lf", "cr"]))
    lines = [mbytes + b" " + target + b" " + version, *headers]
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
    raw = head + encoded
    if not complete:
        raw = raw[: len(raw) - draw(st.integers(0, min(len(encoded), 20)))]
    verdict = _combine(verdicts)
    body_level = b_verdict == "body-reject" and verdict != "reject"
    if "head-error-body" in known and method == "HEAD" and (verdict != "ok" or body_level):
        raw, method = b"GET" + raw[4:], "GET"
    req = Req(
        raw=raw,
        method=method,
        verdict="reject" if body_level else verdict,
        body_level=body_level,
        complete=complete,
        reply=reply,
        body=decoded,
        target=origin,
        authority=authority,
        closes=closes,
        upgrade=upgrade,
        hop=hop,
        why=tuple(why),
    )
    if not junk:
        return [req]
    # Bytes past the declared body start the next "request": refused (4xx) or, cut short by the
    # end of the connection, dropped.
    return [req, Req(raw=junk, method="GET", verdict="reject", complete=False, why=("junk",))]


@st.composite
def cases(draw: st.DrawFn, known: frozenset[str] = frozenset(KNOWN_DEFECTS), most: int = 3) -> Case:
    """One client connection: up to ``most`` requests (then perhaps junk), cut in segments."""
    n = draw(st.integers(1, most))
    reqs = [r for i in range(n) for r in draw(requests(known, last=i == n - 1))]
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
        self._tasks.add(task)  # type: ignore[arg-type]
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
            self._tasks.discard(task)  # type: ignore[arg-type]
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
        if reply == "bighead":
            writer.write(
                b"HTTP/1.1 200 OK\r\nx-big: "
                + b"a" * (62 * 1024)
                + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            await writer.drain()
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
        if req.reply == "bighead":
            if answer.status != 502:
                problems.append(
                    f"request {i}: a 62 KiB response head must give 502, got {answer.status}"
                )
            closed_at = i
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
        limit = 1 + (DEFAULT_RETRIES if req.reply == "503" and req.method in IDEMPOTENT else 0)
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
            if any(v.lower() == b"h2c" for v in s.header(b"upgrade")):
                problems.append(f"request {i}: Upgrade: h2c reached the backend")
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
