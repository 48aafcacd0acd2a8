"""The data plane's vocabulary: one exchange, the decision taken on it, the listener settings.

``proxy.http1`` fills an :class:`Exchange` as it parses a request head and hands it to a
:class:`Dispatcher`, which answers with a :class:`Forward` (send it to this pool, with these
edits, retries and timeouts) or a :class:`LocalReply` (answer it here). Keeping these plain
types apart from the connection code lets the dispatcher, the metrics and the access log depend
on them without depending on the protocol machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    from proxy.pool import UpstreamPool
    from proxy.retry import RetryPlan

# Hop-by-hop header fields (RFC 9110 §7.6.1 plus the legacy ones every proxy strips): never
# forwarded, never set by a route.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"http2-settings",  # only ever sent with "Upgrade: h2c", which we strip
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_EDITABLE: Final = HOP_BY_HOP | {b"content-length"}
# ``name.translate(LOWER)`` is ``name.lower()``: compiled, translate with a bytes table is a C
# loop (mypyc's CPyBytes_Translate, no copy when nothing changes), lower() a Python method call.
LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_CRLF: Final = b"\r\n"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Listener settings (defaults are Envoy's where Envoy has one)."""

    max_header_bytes: int = 60 * 1024
    max_headers: int = 100  # Envoy's max_headers_count: more is a 431
    # The client's side, nginx's defaults (Envoy has none this short): a head not complete
    # within header_timeout gets 408 (a new connection must start one as soon); a kept-alive
    # connection waits idle_timeout for the next request; a request body or a response read
    # that makes no progress for body_timeout / send_timeout ends the exchange (408 or close).
    header_timeout: float = 60.0
    idle_timeout: float = 75.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    max_pipeline: int = 32  # queued pipelined requests before we stop parsing and close after
    # Upgrade protocols forwarded (lower case); h2c is always stripped, any other is a 403.
    upgrades: frozenset[bytes] = frozenset({b"websocket"})
    xff: bool = True  # append the peer to x-forwarded-for, set x-forwarded-proto
    proto: str = "http"  # value of x-forwarded-proto
    server_name: str = "sticky-proxy"  # `server` header of local replies

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024:
            raise ValueError("max_header_bytes must be at least 1024")
        if min(self.header_timeout, self.idle_timeout, self.body_timeout, self.send_timeout) <= 0:
            raise ValueError("timeouts must be > 0")
        if self.max_headers < 1:
            raise ValueError("max_headers must be >= 1")
        if self.max_pipeline < 1:
            raise ValueError("max_pipeline must be >= 1")
        if b"h2c" in self.upgrades or any(p != p.lower() for p in self.upgrades):
            raise ValueError("upgrades are lower-case protocol names, h2c excluded (stripped)")


def _check_header(name: bytes, value: bytes) -> None:
    if not name or name != name.lower() or any(c in name for c in b" \t\r\n:"):
        raise ValueError(f"header name must be a lower-case token: {name!r}")
    if any(c in value for c in b"\r\n\x00"):
        raise ValueError(f"header value contains CR, LF or NUL: {value!r}")


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """Header changes for one route, applied as: remove, then set (replace), then add.

    Built once per route by the control plane; ``drop`` and ``lines`` are precomputed so that
    applying an edit costs one set lookup per header and one append.

        HeaderEdit(set=((b"x-env", b"prod"),), add=((b"via", b"sp"),), remove=frozenset({b"x-dbg"}))
    """

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()
    drop: frozenset[bytes] = field(init=False, repr=False, compare=False)
    lines: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value in (*self.set, *self.add):
            _check_header(name, value)
        for name in self.remove:
            _check_header(name, b"")
        framing = {n for n, _ in (*self.set, *self.add)} | self.remove
        if framing & _NOT_EDITABLE:
            names = b", ".join(sorted(framing & _NOT_EDITABLE)).decode()
            raise ValueError(f"framing and hop-by-hop headers cannot be edited: {names}")
        object.__setattr__(self, "drop", self.remove | {name for name, _ in self.set})
        object.__setattr__(
            self, "lines", b"".join(n + b": " + v + _CRLF for n, v in (*self.set, *self.add))
        )


@dataclass(frozen=True, slots=True)
class LocalReply:
    """A response made by the proxy itself (content-type text/plain).

    The dispatcher may set ``exchange.flags`` (e.g. "NR", "UH") before returning one.
    """

    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    close: bool = False


class Forward:
    """Send the request to ``pool`` (see the field comments for the rest)."""

    __slots__ = (
        "authority",
        "connect_retries",
        "next_pool",
        "pool",
        "request_headers",
        "response_headers",
        "retry",
        "set_cookie",
        "target",
        "timeout",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        target: bytes | None = None,
        authority: bytes | None = None,
        request_headers: HeaderEdit | None = None,
        response_headers: HeaderEdit | None = None,
        set_cookie: bytes | None = None,
        timeout: float | None = None,
        next_pool: Callable[[int], UpstreamPool | None] | None = None,
        connect_retries: int = 0,
        retry: RetryPlan | None = None,
    ) -> None:
        self.pool = pool
        self.target = target  # rewritten request-target, None = unchanged
        self.authority = authority  # rewritten Host, None = unchanged
        self.request_headers = request_headers
        self.response_headers = response_headers
        self.set_cookie = set_cookie  # a whole line: b"set-cookie: ...\r\n"
        # From the end of the request to the end of the response (Envoy's route timeout).
        self.timeout = timeout
        # After a connect failure (nothing sent): the pool for attempt k = 1, 2, ...
        # next_pool(k) is also where a retry goes when retry.other_hosts is set.
        self.next_pool = next_pool
        self.connect_retries = connect_retries
        # Retries after a connection was made (status, reset, per-try timeout); None: only the
        # connect failures above and the one resend of a stale keep-alive connection.
        self.retry = retry


class DownstreamTls:
    """What a TLS client connection's handshake settled, shared by its exchanges (access log).

    ``version`` is OpenSSL's name (``TLSv1.3``: Envoy's %DOWNSTREAM_TLS_VERSION%), ``sni`` the
    name the client asked for (Envoy's %REQUESTED_SERVER_NAME%), None without SNI.
    """

    __slots__ = ("sni", "version")

    def __init__(self, version: str, sni: str | None) -> None:
        self.version = version
        self.sni = sni


class Exchange:
    """One request/response: what the dispatcher decides on, and the access-log record.

    Filled by the connection: the request fields before ``dispatch``; ``status``, ``flags``,
    ``end``, byte counts and ``upstream`` by the time ``finished`` is called. ``target`` is the
    request-target in origin form (an absolute-form target is split and its authority wins over
    Host, RFC 9112 §3.2.2); ``authority`` is the Host ("" for HTTP/1.0 without one).
    ``headers`` are (lower-cased name, value) as received, hop-by-hop ones included.

    ``flags`` are Envoy's response flags: "-" none, set here: DC downstream closed, DPE
    downstream protocol error, UF upstream connect failure, UC upstream closed/reset, UPE
    upstream protocol error, UT upstream timeout, SI a client that stopped sending its body or
    reading its response; the dispatcher may set its own (NR, UH, ...) before returning a
    LocalReply; UO is a circuit breaker overflow. ``bytes_received``/``bytes_sent`` count body
    bytes (tunnel bytes after a 101). ``status`` is 0 when no response was started.
    ``retries`` counts the attempts after the first (connect failures included), ``replays``
    those that sent the request again after it had reached a pod. ``tls`` is the connection's
    ``DownstreamTls`` (None on plain HTTP).
    """

    __slots__ = (
        "authority",
        "bytes_received",
        "bytes_sent",
        "end",
        "flags",
        "headers",
        "memo",
        "method",
        "peer",
        "replays",
        "request_id",
        "retries",
        "sock",
        "start",
        "status",
        "tag",
        "target",
        "tls",
        "upstream",
        "version",
    )

    def __init__(
        self,
        peer: tuple[str, int],
        sock: tuple[str, int],
        start: float,
        tls: DownstreamTls | None = None,
    ) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.authority: bytes | None = None
        self.peer = peer
        self.sock = sock
        self.tls = tls
        self.start = start
        self.end = 0.0
        self.status = 0
        self.flags = "-"
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream: str | None = None
        self.request_id = b""
        self.retries = 0
        self.replays = 0  # sent again after it reached a pod (retries, stale connection)
        self.tag: object = None  # the dispatcher's own per-exchange state (http1 ignores it)
        # The dispatcher's own per-connection state: http1 hands each exchange the value the
        # previous one of its connection left here, and never looks inside.
        self.memo: object = None

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.target!r} {self.status} {self.flags}>"


@mypyc_attr(allow_interpreted_subclasses=True)
class Dispatcher:
    """The decision maker (``proxy.dispatch.Dispatcher``: routing, affinity, clusters).

    A base class, not a Protocol: compiled, a call through a Protocol is a Python method call
    (argument parsing and all), a call on a native class a C call through its vtable. Tests
    subclass it in Python, which mypyc allows here (their calls go through Python).
    """

    def dispatch(self, exchange: Exchange) -> Forward | LocalReply:
        """Synchronous and fast: runs on the request path."""
        raise NotImplementedError

    def finished(self, exchange: Exchange) -> None:
        """Called once per exchange, after its last byte or its abort.

        Also for requests the connection rejects itself (400, 431, 408 ...), which were never
        dispatched (their request fields may be partial), and for pipelined requests dropped
        when the client disconnected (status 0, flags "DC").
        """
        raise NotImplementedError
