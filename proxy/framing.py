"""Pure HTTP/1.1 decisions of the data plane: bytes in, verdicts and bytes out, no I/O.

``proxy.http1`` parses with httptools (llhttp), which enforces the message grammar: request
line, header syntax, Content-Length and chunked framing. What llhttp leaves to its user lives
here, as functions a test can call without a socket (h11's ``_body_framing`` is the model):

* which request targets, Host values and upgrades a proxy may act on (RFC 9112 §3.2, RFC 3986
  §3.2.2), and how an absolute-form target splits into the authority that replaces Host and
  the origin-form target that goes upstream;
* the request state those checks fill (:class:`ParsedRequest`: the headers the proxy acts on,
  the body's framing) and the request head sent upstream from it;
* how a response is framed for the client (Content-Length, chunked, or the connection's end).

Everything here is linear in its input and allocates little: it runs for every request.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from proxy.exchange import DownstreamTls, Exchange

if TYPE_CHECKING:
    from proxy.exchange import Forward

CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
CHUNKED_LINE: Final = b"transfer-encoding: chunked\r\n"
CLOSE_LINE: Final = b"connection: close\r\n"
KEEP_ALIVE_LINE: Final = b"connection: keep-alive\r\n"
UPGRADE_LINE: Final = b"connection: upgrade\r\n"

# Request headers we re-emit ourselves (framing, Host, forwarding headers).
REQUEST_OWN: Final = frozenset({b"host", b"content-length", b"x-request-id"})
FORWARDING: Final = frozenset({b"x-forwarded-for", b"x-forwarded-proto"})
_NOTHING: Final[frozenset[bytes]] = frozenset()

# Request headers looked at while parsing (everything else is only copied).
H_HOST: Final = 0
H_CL: Final = 1
H_TE: Final = 2
H_CONN: Final = 3
H_XFF: Final = 4
H_RID: Final = 5
H_UPGRADE: Final = 6
SPECIAL: Final = {
    b"host": H_HOST,
    b"content-length": H_CL,
    b"transfer-encoding": H_TE,
    b"connection": H_CONN,
    b"x-forwarded-for": H_XFF,
    b"x-request-id": H_RID,
    b"upgrade": H_UPGRADE,
}
_CONNECTION_TOKENS_IGNORED: Final = frozenset({b"close", b"keep-alive", b"upgrade"})

# What to do with an upgrade request (upgrade_verdict).
FORWARD: Final = 0
STRIP: Final = 1  # h2c: drop the upgrade, go on as HTTP/1.1 (Envoy's codec, nginx)
REFUSE: Final = 2  # any other protocol the listener does not allow: 403

# Response body framing towards the client (response_framing).
M_NONE: Final = 0
M_RAW: Final = 1
M_CHUNKED: Final = 2

# RFC 3986 reg-name: unreserved and sub-delims. pct-encoded is left out: no DNS name needs
# it, and a Host a router would have to decode is a Host two parsers can read differently.
_REG_NAME: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;="
_IP_LITERAL: Final = b"0123456789abcdefABCDEF:."  # IPv6 text inside [ ] (no zone, no IPvFuture)
_DIGITS: Final = b"0123456789"
_OWS: Final = b" \t"
_DEFAULT_PORTS: Final = {b"http": b":80", b"https": b":443"}


class RequestError(Exception):
    """A request refused with ``status`` and ``text`` (raised inside a parser callback)."""

    def __init__(self, status: int, text: bytes) -> None:
        super().__init__(status, text)
        self.status = status
        self.text = text


class ParsedRequest(Exchange):
    """An :class:`Exchange` with what the data plane alone needs of its request: the framing
    and hop-by-hop headers it acts on and the body it holds. Kept on the request (not on the
    connection) so that a queued pipelined request carries its own."""

    __slots__ = (
        "body_done",
        "chunked",
        "conn_tokens",
        "content_length",
        "error",
        "held",
        "held_bytes",
        "keep_alive",
        "replay",
        "replay_left",
        "upgrade",
        "xff",
    )

    def __init__(
        self,
        peer: tuple[str, int],
        sock: tuple[str, int],
        start: float,
        tls: DownstreamTls | None = None,
    ) -> None:
        super().__init__(peer, sock, start, tls)
        self.keep_alive = True
        self.upgrade: bytes | None = None  # Upgrade header value of an upgrade request
        self.chunked = False
        self.content_length: bytes | None = None
        self.conn_tokens: frozenset[bytes] | None = None  # headers named by Connection
        self.xff: bytes | None = None  # X-Forwarded-For as received (joined)
        self.held: list[bytes] = []  # body bytes not yet written upstream
        self.held_bytes = 0
        self.body_done = False
        self.error: tuple[int, bytes] | None = None  # reject with this once it is our turn
        self.replay: list[bytes] | None = None  # the whole body so far, while it may be resent
        self.replay_left = 0  # bytes the replay buffer may still take


class RequestIds:
    """UUID4 text for x-request-id, formatted 256 at a time (uuid.uuid4() costs ~10x more).

    A batch is 36 random hex digits per id (os.urandom), then a few strided slice assignments
    over the whole batch: dashes at 8, 13, 18 and 23, the version digit 4 at 14, and the
    variant digit mapped onto 8, 9, a, b at 19 (RFC 9562 §5.4). That keeps 122 random bits per
    id, as uuid4 does, and leaves one slice per request.
    """

    __slots__ = ("_ids", "_next")

    _COUNT: Final = 256
    _VARIANT: Final = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")

    def __init__(self) -> None:
        self._ids = b""
        self._next = self._COUNT * 36

    def _refill(self) -> None:
        n = self._COUNT
        batch = bytearray(os.urandom(n * 18).hex().encode())
        for at in (8, 13, 18, 23):
            batch[at::36] = b"-" * n
        batch[14::36] = b"4" * n
        batch[19::36] = bytes(batch[19::36]).translate(self._VARIANT)
        self._ids = bytes(batch)
        self._next = 0

    def take(self) -> bytes:
        if self._next >= len(self._ids):
            self._refill()
        i = self._next
        self._next = i + 36
        return self._ids[i : i + 36]


# --------------------------------------------------------------------------- request checks
def note_header(req: ParsedRequest, kind: int, value: bytes) -> None:
    """Record a header of kind ``H_*`` (see ``SPECIAL``) as it arrives; RequestError if it
    makes the request one we refuse."""
    if kind == H_HOST:
        if req.authority is not None:
            raise RequestError(400, b"duplicate host header")
        req.authority = value
    elif kind == H_CL:
        req.content_length = value  # llhttp rejects bad and duplicate values
    elif kind == H_TE:
        # llhttp accepts "gzip, chunked"; we could only forward it by decoding gzip.
        if value.strip().lower() != b"chunked":
            raise RequestError(501, b"transfer-encoding not implemented")
        req.chunked = True
    elif kind == H_CONN:
        tokens = frozenset(t.strip().lower() for t in value.split(b","))
        tokens -= _CONNECTION_TOKENS_IGNORED
        if tokens:
            req.conn_tokens = tokens | (req.conn_tokens or _NOTHING)
    elif kind == H_XFF:
        req.xff = value if req.xff is None else req.xff + b", " + value
    elif kind == H_RID:
        if not req.request_id:
            req.request_id = value
    else:  # H_UPGRADE
        req.upgrade = value


def check_target(req: ParsedRequest, checked: bytes) -> None:
    """Refuse what no route may see (RequestError); split an absolute-form target.

    After it, ``req.target`` is in origin form (or ``*`` for OPTIONS) and ``req.authority``
    is the Host to route on: the target's authority for absolute form (RFC 9112 §3.2.2), ""
    for HTTP/1.0 without Host. ``checked`` is a target known to hold no fragment (the
    connection's previous one: keep-alive clients repeat theirs), so that the scan for one,
    about 600 instructions compiled, is mostly skipped.
    """
    if req.chunked and req.version == b"1.0":
        raise RequestError(400, b"transfer-encoding in an HTTP/1.0 request")  # RFC 9112 §6.1
    if req.method == b"CONNECT":
        raise RequestError(405, b"CONNECT is not supported")
    if req.authority is None and req.version == b"1.1":
        raise RequestError(400, b"missing host header")  # RFC 9112 §3.2, any target form
    target = req.target
    # partition, not `in`: bytes.__contains__ first tries its argument as an int, which for
    # bytes raises and formats a TypeError it then discards (about 1.8k instructions).
    if target != checked and target.partition(b"#")[1]:
        raise RequestError(400, b"invalid request target")  # a fragment: Envoy's 400 too
    if target[:1] != b"/":
        if target == b"*":
            if req.method != b"OPTIONS":
                raise RequestError(400, b"invalid request target")
        else:
            split = split_absolute_form(target)
            if split is None:
                raise RequestError(400, b"invalid request target")
            authority, path = split
            host = req.authority
            if host is not None and (
                not authority_ok(host.rstrip(_OWS)) or not same_authority(host, authority, target)
            ):
                raise RequestError(400, b"host header does not match the request target")
            req.authority = authority
            req.target = path
    if req.authority is None:
        req.authority = b""  # HTTP/1.0 without Host


def checked_host(authority: bytes) -> bytes:
    """The Host to route on (trailing OWS, which llhttp keeps, dropped); RequestError when it
    is not ``host[:port]``."""
    if authority[-1:] == b" " or authority[-1:] == b"\t":
        authority = authority.rstrip(_OWS)
    if not authority_ok(authority):
        raise RequestError(400, b"invalid host header")
    return authority


def upgrade_verdict(value: bytes, allowed: frozenset[bytes]) -> int:
    """FORWARD an upgrade the listener allows (WebSocket by default, as Istio), STRIP h2c, as
    Envoy does (HTTP/2 behind our back would bypass routing), REFUSE anything else: Envoy's
    403 to an upgrade it is not configured for."""
    protocol = value.strip().lower()
    if protocol in allowed:
        return FORWARD
    return STRIP if protocol == b"h2c" else REFUSE


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


# --------------------------------------------------------------------------- heads
def request_head(
    req: ParsedRequest,
    fwd: Forward,
    drop: frozenset[bytes],
    forwarded_for: bytes | None,
    proto_line: bytes,
    forward_lines: bytes,
) -> bytes:
    """The head sent upstream: the request line in origin form, Host, the received headers
    less ``drop`` (hop-by-hop, our own, the route's removals), the forwarding headers
    (``forwarded_for`` is the client's IP, None to leave them alone; ``forward_lines`` the
    connection's x-forwarded-for and x-forwarded-proto lines made once, for the common case of
    no route edit and no x-forwarded-for received), x-request-id, the body's framing and the
    route's additions."""
    target = fwd.target if fwd.target is not None else req.target
    authority = fwd.authority if fwd.authority is not None else req.authority
    if not authority:
        authority = fwd.pool.key.encode()
    # The proxy's own headers count as received ones: a route edit may remove or set them.
    edit = fwd.request_headers
    edited = edit.drop if edit is not None else _NOTHING
    own = not edited  # nothing removed: skip the four lookups below
    # Fewer parts: the join pays about a hundred instructions for each, whatever its length,
    # while a %-format of bytes is, compiled, a single copy (mypyc's CPyBytes_Build).
    method = req.method
    if own or b"host" not in edited:
        parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method, target, authority)]
    else:
        parts = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    if req.conn_tokens:
        drop = drop | req.conn_tokens
    if edit is not None:
        drop = drop | edited
    for name, value in req.headers:
        if name not in drop:
            parts.append(b"%s: %s\r\n" % (name, value))
    if forwarded_for is not None and own and req.xff is None:
        parts.append(forward_lines)
    elif forwarded_for is not None:
        if own or b"x-forwarded-for" not in edited:
            xff = forwarded_for if req.xff is None else req.xff + b", " + forwarded_for
            parts.append(b"x-forwarded-for: %s\r\n" % xff)
        if own or b"x-forwarded-proto" not in edited:
            parts.append(proto_line)
    if own or b"x-request-id" not in edited:
        parts.append(b"x-request-id: %s\r\n" % req.request_id)
    upgrade = req.upgrade
    content_length = req.content_length
    if upgrade is not None:
        parts.append(b"upgrade: %s\r\n" % upgrade)
        parts.append(UPGRADE_LINE)
    elif req.chunked:
        parts.append(CHUNKED_LINE)
    elif content_length is not None:
        parts.append(b"content-length: %s\r\n" % content_length)
    if edit is not None:
        parts.append(edit.lines)
    parts.append(CRLF)
    return b"".join(parts)


def without(lines: list[bytes], drop: frozenset[bytes]) -> list[bytes]:
    """Response head ``lines`` (``proxy.upstream``'s layout: a slot for the status line, then
    b"name: value\r\n" per header, names lower-cased) less the headers named in ``drop``."""
    kept = [lines[0]]
    for i in range(1, len(lines)):
        line = lines[i]
        if line.partition(b":")[0] not in drop:
            kept.append(line)
    return kept


def response_framing(
    parts: list[bytes], content_length: bytes | None, no_body: bool, http10: bool
) -> int:
    """Append the framing header of a final (non-101) response to ``parts`` and say how its
    body goes to the client: M_NONE (HEAD, 204, 304), M_RAW (Content-Length passes through;
    or, for an HTTP/1.0 client, the connection's end delimits it: the caller must close),
    M_CHUNKED (anything else, to an HTTP/1.1 client)."""
    if content_length is not None:
        parts.append(b"content-length: %s\r\n" % content_length)
        return M_NONE if no_body else M_RAW
    if no_body:
        return M_NONE
    if http10:
        return M_RAW
    parts.append(CHUNKED_LINE)
    return M_CHUNKED
