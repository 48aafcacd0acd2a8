"""Pure HTTP/1.1 decisions of the data plane: bytes in, verdicts out, no I/O.

``proxy.http1`` parses with httptools (llhttp), which enforces the message grammar: request
line, header syntax, Content-Length and chunked framing. What llhttp leaves to its user lives
here, as functions a test can call without a socket (h11's ``_body_framing`` is the model):
which request targets and Host values a proxy may act on (RFC 9112 §3.2, RFC 3986 §3.2.2),
and how an absolute-form target splits into the authority that replaces Host and the
origin-form target that goes upstream.

Everything here is linear in its input and allocates little: it runs for every request.
"""

from __future__ import annotations

from typing import Final

# RFC 3986 reg-name: unreserved and sub-delims. pct-encoded is left out: no DNS name needs
# it, and a Host a router would have to decode is a Host two parsers can read differently.
_REG_NAME: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;="
_IP_LITERAL: Final = b"0123456789abcdefABCDEF:."  # IPv6 text inside [ ] (no zone, no IPvFuture)
_DIGITS: Final = b"0123456789"
_OWS: Final = b" \t"
_DEFAULT_PORTS: Final = {b"http": b":80", b"https": b":443"}


def authority_ok(value: bytes) -> bool:
    """Whether ``value`` is ``host [ ":" port ]`` (RFC 9112 §3.2: anything else is a 400).

    An empty value is valid: a request whose target has no authority sends an empty Host.
    No userinfo (``@``), no path, no spaces or backslashes, brackets only around an IPv6
    literal, and a port of digits only.
    """
    if value[:1] == b"[":
        close = value.find(b"]")
        if close < 2 or value[1:close].translate(None, _IP_LITERAL):
            return False
        rest = value[close + 1 :]
        return not rest or (rest[:1] == b":" and not rest[1:].translate(None, _DIGITS))
    host, colon, port = value.partition(b":")
    if host.translate(None, _REG_NAME):
        return False  # a byte outside reg-name
    return not colon or (bool(host) and not port.translate(None, _DIGITS))


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """``(authority, origin-form target)`` of an absolute-form target, None when invalid.

    ``http://Example.com:8080/a?b`` -> ``(b"Example.com:8080", b"/a?b")``; a target with no
    path gets ``/`` (``http://h?q`` -> ``/?q``). Only the http and https schemes are served;
    userinfo is refused (RFC 9110 §4.2.4: it must not be sent in an http URI).
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in _DEFAULT_PORTS:
        return None
    end = len(rest)
    slash = rest.find(b"/")
    if 0 <= slash < end:
        end = slash
    question = rest.find(b"?")
    if 0 <= question < end:
        end = question
    authority = rest[:end]
    if not authority or not authority_ok(authority):
        return None
    path = rest[end:]
    if not path:
        path = b"/"
    elif path[:1] == b"?":
        path = b"/" + path
    return authority, path


def same_authority(host: bytes, authority: bytes, target: bytes) -> bool:
    """Whether a Host header names the authority of an absolute-form ``target``.

    RFC 9112 §3.2 asks a client to send the target's authority as Host; hosts compare
    case-insensitively, and the scheme's default port may be written or left out.
    """
    default = _DEFAULT_PORTS.get(target.partition(b"://")[0].lower(), b"")
    a = host.rstrip(_OWS).lower()
    b = authority.lower()
    if default:
        a = a.removesuffix(default)
        b = b.removesuffix(default)
    return a == b
