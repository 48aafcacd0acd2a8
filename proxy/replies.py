"""What the client gets when something goes wrong: the one table, Envoy's texts, the bytes.

Every failure of the data plane becomes a response (or a closed connection) here, and only
here::

    where it breaks                                   client gets                          flags
    ------------------------------------------------  -----------------------------------  -----
    downstream (the client)
      TLS handshake fails on an HTTPS port (no or     nothing; closed before any request   -
        a bad client certificate for MUTUAL, no
        common version or cipher, not done within
        header_timeout)
      head > max_header_bytes, > max_headers lines    431 Request Header Fields Too Large   DPE
      malformed line/header/chunk, CL+TE, obs-fold,   400 Bad Request                       DPE
        duplicate Host, no Host on 1.1, TE on 1.0,
        Host not host[:port], a target other than
        origin/absolute form (OPTIONS * excepted),
        absolute-form authority other than Host,
        an upgrade request with a body
      Transfer-Encoding other than chunked            501 Not Implemented                   DPE
      HTTP version other than 1.0/1.1                 505 HTTP Version Not Supported        DPE
      CONNECT                                         405 Method Not Allowed                DPE
      Upgrade to a protocol the listener does not     403 Forbidden                         DPE
        allow (h2c is stripped instead)
      head not complete within header_timeout         408 Request Timeout                   -
        of its first byte
      request body stalls for body_timeout            408 Request Timeout; upstream reset   SI
        (all of the above then close the connection; other connections are untouched)
      no first byte within header_timeout of the      nothing; closed                       -
        connection's start, or within idle_timeout
        of the previous response (keep-alive)
      client reads nothing of its response            nothing; closed, upstream reset       SI
        for send_timeout
      client closes mid-request or mid-response       nothing; upstream connection dropped  DC
    dispatcher
      LocalReply(...)                                 as given (404 no route, 503 ...)      its own
      dispatch() raised                               500 Internal Server Error             -
    upstream
      circuit breaker full (max connections and       503 upstream connect error or
        pending requests, see proxy.upstream)             disconnect/reset before headers.
                                                          reset reason: overflow            UO
      connect refused / connect timeout               503 upstream connect error or
        (after Forward.next_pool attempts)                disconnect/reset before headers.
                                                          reset reason: connection failure  UF
      TLS handshake with the endpoint failed, or its  503 ... reset reason: connection
        certificate names are not the ones the            failure, transport failure
        DestinationRule lists (nothing was sent)          reason: TLS_error:|...:TLS_error_end
                                                                                            UF
      closed after the request, before the head       503 ... reset reason: connection
        (a reused idle connection with nothing            termination                       UC
         but a head sent is first retried once,
         when idempotent or the route asked)
      not HTTP (bad status line, bad chunk, ...)      502 ... reset reason: protocol error  UPE
      no complete response within Forward.timeout     504 upstream request timeout          UT
        or the retry plan's per-try timeout
      any of these after the response head was sent   connection closed (truncated body)    same

``proxy.http1`` decides *when* (it holds the connection's state); this module holds *what*:
the texts, Envoy's so that Istio users recognise them, and the bytes of a reply the proxy makes
itself, built without I/O.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from proxy.framing import CLOSE_LINE, CRLF, KEEP_ALIVE_LINE, RequestError

CONNECT_FAILURE: Final = (
    b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
)
CONNECTION_TERMINATION: Final = (
    b"upstream connect error or disconnect/reset before headers. "
    b"reset reason: connection termination"
)
OVERFLOW_TEXT: Final = (
    b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
)
PROTOCOL_ERROR_TEXT: Final = (
    b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"
)
UPSTREAM_TIMEOUT: Final = b"upstream request timeout"

STATUS_LINES: Final = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


_date_cache: list[object] = [0, b""]


def date_line() -> bytes:
    """`date` header line for local replies, formatted at most once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = b"date: " + formatdate(now, usegmt=True).encode() + CRLF
    line = _date_cache[1]
    assert isinstance(line, bytes)
    return line


def local_reply(
    status: int,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...],
    *,
    keep: bool,
    http10: bool,
    head_request: bool,
    server_line: bytes,
) -> bytes:
    """A whole response made by the proxy (text/plain); no body bytes to a HEAD request."""
    parts = [
        status_line(status),
        b"content-length: %d\r\ncontent-type: text/plain\r\n" % len(body),
        date_line(),
        server_line,
    ]
    for name, value in headers:
        parts += (name, b": ", value, CRLF)
    if not keep:
        parts.append(CLOSE_LINE)
    elif http10:
        parts.append(KEEP_ALIVE_LINE)
    parts.append(CRLF)
    if not head_request:
        parts.append(body)
    return b"".join(parts)


def parse_error_reply(cause: BaseException | None) -> tuple[int, bytes]:
    """Status and text for a request httptools stopped on: ``cause`` is what one of our
    callbacks raised (``proxy.upstream.callback_error``), None for llhttp's own verdict."""
    if isinstance(cause, RequestError):
        return cause.status, cause.text
    if cause is not None:
        return 500, b"internal error"  # our own bug, logged by the caller: not the client's
    return 400, b"bad request"
