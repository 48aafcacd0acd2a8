"""Session affinity: which bytes of a request become the hash key (Envoy's hash policies).

Theory
------
Istio's ``consistentHash`` (``httpCookie``, ``httpHeaderName``, ``httpQueryParameterName``,
``useSourceIp``) becomes an Envoy ``RouteAction.hash_policy`` list.  For every request the
router evaluates the policies in order; each one either yields a 64-bit key or nothing, and the
keys fold into one with a rotate-left-1 XOR (``old = rotl1(old) ^ new``) so that two identical
policies do not cancel out.  A ``terminal`` policy stops the walk once *a* hash exists (the
accumulated one: a terminal policy that found nothing still stops when an earlier one did).
No key at all means the load balancer picks at random.  The key is then looked up on the ring or
Maglev table (``proxy.hashing``), so two proxies that agree on the key agree on the pod.

The cookie policy is the sticky-session workhorse.  When the request carries no such cookie and
the policy has a ``ttl``, Envoy *invents* one: its value is the XXH64 of the downstream
connection's ``remote + local`` address text, as 16 zero-padded lowercase hex digits, and the
request is routed by ``xxh64(value)`` - exactly what later requests that send the cookie back
will hash to, so the first request already lands where the session will stay.  The value is a
function of the connection only, so concurrent streams on one connection get the same cookie.
Without ``ttl`` the cookie is only read (passive): absent cookie, no key.

Envoy parity (read from envoyproxy/envoy, main branch)
------------------------------------------------------
* ``source/common/http/hash_policy.cc`` - ``HashPolicyImpl::generateHash`` (rotate-XOR fold,
  terminal test on the accumulated hash); ``CookieHashMethod`` (existing non-empty value wins,
  else generate when ``ttl`` is set); ``HeaderHashMethod`` (all values of the header, sorted,
  ``HashUtil::xxHash64(Span)``); ``QueryParameterHashMethod`` (``getFirstValue``);
  ``IpHashMethod`` (``ip()->addressAsString()``: the address without port, IPv6 unbracketed).
* ``source/common/common/hash.cc`` - ``HashUtil::xxHash64(absl::Span<absl::string_view>)`` does
  **not** hash the concatenation: it chains seeds, ``seed = XXH64(piece, seed)`` from seed 0.
  (Envoy's own test: {"foo", "bar"} -> 17745830980996999794, which is not xxh64("foobar").)
  For a single value this equals plain ``xxh64(value)``.
* ``source/common/http/utility.cc`` - ``forEachCookie``/``parseCookie``: every ``Cookie`` header
  in order, ``splitToken(value, ";")`` (empty pieces skipped), a piece without ``=`` skipped,
  name = from the first non-space (only ' ') up to the first ``=`` (case-sensitive, trailing
  spaces kept), value = everything after that ``=`` with one pair of surrounding double quotes
  removed; the *first* piece whose name matches ends the search, even if its value is empty (an
  empty value then counts as absent).  ``makeSetCookieValue``: ``NAME="VALUE"``, then
  ``; Max-Age=N`` when N != 0, ``; Path=P`` when P is not empty, each attribute as ``; name`` or
  ``; name=value``, then ``; HttpOnly`` (the router always passes httponly=true).
  ``QueryParamsMulti::parseQueryString`` (``decode_params=false``): from the first ``?``, split
  on ``&``, name/value split at the first ``=``, a parameter without ``=`` has value ``""``
  (so it *is* present and hashes ``xxh64("")``); names and values are compared/hashed raw,
  never percent-decoded.
* ``source/common/router/router.h`` - ``Filter::addDownstreamSetCookie``: value =
  ``Hex::uint64ToHex(HashUtil::xxHash64(remote->asString() + local->asString()))``;
  ``source/common/common/hex.cc`` ``uint64ToHex`` writes all 8 bytes big-endian (16 digits,
  zero padded).  ``Address::Ipv4Instance::asString`` is ``1.2.3.4:80``, ``Ipv6Instance`` is
  ``[::1]:80``.
* ``source/common/http/header_map_impl.cc`` - the request header map aliases ``host`` to
  ``:authority`` (so a header policy on either name reads the Host header), and *inline* headers
  (Host, User-Agent, X-Forwarded-*, X-Request-Id, Content-Type, ...) are coalesced on arrival:
  a repeated one is appended to the first with ``,`` (empty repeats skipped) and therefore
  hashed as one value in arrival order, not sorted.  Other headers keep one entry per line.
  The HTTP/1 codec trims leading/trailing whitespace from values; we do the same.

Not modelled: Envoy's header policy ``regex_rewrite`` and ``filter_state`` (Istio exposes
neither); headers the connection manager rewrites before routing (X-Forwarded-For append,
X-Request-Id generation) are hashed as the caller passes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from proxy.hashing import combine_hashes, xxh64


@dataclass(frozen=True, slots=True)
class CookieAttribute:
    """One extra Set-Cookie attribute (Istio httpCookie.attributes): ``name`` or ``name=value``."""

    name: str
    value: str = ""


@dataclass(frozen=True, slots=True)
class CookiePolicy:
    """Hash on a cookie; with ``ttl`` set (seconds, 0 = session cookie) generate it when absent."""

    name: str
    path: str = ""
    ttl: int | None = None
    attributes: tuple[CookieAttribute, ...] = ()
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """Hash on every value of one request header (name stored lower-case)."""

    name: str
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class QueryParameterPolicy:
    """Hash on the first occurrence of one query parameter."""

    name: str
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class SourceIPPolicy:
    """Hash on the downstream peer's IP address text (no port)."""

    terminal: bool = False


HashPolicy = CookiePolicy | HeaderPolicy | QueryParameterPolicy | SourceIPPolicy


# Inline request headers of Envoy's RequestHeaderMap (envoy/http/header_map.h
# INLINE_REQ_HEADERS / INLINE_REQ_RESP_HEADERS), limited to names a client can usefully send;
# the x-envoy-* ones are Envoy-internal.  Repeats of these are joined with "," on arrival.
_INLINE_REQUEST_HEADERS: Final = frozenset(
    {
        b"host",
        b"user-agent",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-client-cert",
        b"x-client-trace-id",
        b"x-request-id",
        b"grpc-timeout",
        b"expect",
        b"te",
        b"connection",
        b"content-type",
        b"content-length",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-status",
        b"transfer-encoding",
        b"upgrade",
        b"via",
    }
)

_OWS: Final = b" \t"
GENERATED_CACHE_SIZE: Final = 4096  # connections whose generated cookie is remembered
_COOKIE: Final = b"cookie"


def format_address(host: str, port: int) -> str:
    """Envoy's ``Address::Instance::asString``: ``1.2.3.4:80``, ``[::1]:80``."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def generated_cookie_value(remote: str, local: str) -> str:
    """The value Envoy invents for an absent cookie: hex of xxh64(remote + local), 16 digits."""
    return f"{xxh64(remote + local):016x}"


def set_cookie_value(policy: CookiePolicy, value: str) -> str:
    """``Set-Cookie`` value text, byte for byte as Envoy's ``makeSetCookieValue``."""
    parts = [f'{policy.name}="{value}"']
    if policy.ttl:
        parts.append(f"Max-Age={policy.ttl}")
    if policy.path:
        parts.append(f"Path={policy.path}")
    for attribute in policy.attributes:
        parts.append(f"{attribute.name}={attribute.value}" if attribute.value else attribute.name)
    parts.append("HttpOnly")
    return "; ".join(parts)


def parse_cookie(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    """Value of cookie ``name`` as Envoy's ``parseCookie`` finds it; ``b""`` when absent.

    Envoy strips the line, splits it on ";", strips each piece's leading spaces and compares the
    text before the piece's first "=" with the name; the first match wins, its value loses one
    pair of surrounding double quotes.
    """
    if not cookie_name_can_match(name):
        return b""
    return _find_cookie(list(headers), name)


def cookie_name_can_match(name: bytes) -> bool:
    """No piece's key can hold ";" or "="; an empty name (which Envoy would match against
    "=value") cannot come from Istio, which requires httpCookie.name."""
    return bool(name) and not name.partition(b";")[1] and not name.partition(b"=")[1]


def _find_cookie(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    """``parse_cookie`` for a name that can match; linear in the size of the Cookie lines.

    The common line, whose first piece is the cookie, costs one ``partition`` and a few slices
    (compiled, each bytes method call costs hundreds of instructions, so a split per request
    would cost more than the rest of the hash). Any other line is split on ";" once and each
    piece compared, as Envoy does: searching on for later occurrences of the name instead
    would look back over the line for each one, quadratic in a hostile line of repeats.
    """
    for header, raw in headers:
        if header != _COOKIE:
            continue
        before, found, after = raw.partition(name)
        if found and after[:1] == b"=" and not before.strip(_OWS):
            value, semicolon, _ = after[1:].partition(b";")
            if not semicolon:
                value = value.rstrip(_OWS)
            return _unquoted(value)
        if not found:
            continue
        for piece in raw.strip(_OWS).split(b";"):
            key, equals, value = piece.partition(b"=")
            if equals and key.lstrip(b" ") == name:
                return _unquoted(value)
    return b""


def _unquoted(value: bytes) -> bytes:
    """The value less one pair of surrounding double quotes (Envoy's parseCookie)."""
    if len(value) >= 2 and value[0] == 0x22 and value[-1] == 0x22:
        return value[1:-1]
    return value


def cookie_line(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The request's one Cookie line (``b""`` without one); None when it has several."""
    found: bytes | None = b""
    seen = False
    for header, raw in headers:
        if header == _COOKIE:
            found = None if seen else raw
            seen = True
    return found


def query_first_value(target: bytes, name: bytes) -> bytes | None:
    """First raw value of query parameter ``name`` (``b""`` when it has no ``=``), else None."""
    start = target.find(b"?")
    if start < 0:
        return None
    query = target[start + 1 :]
    fragment = query.find(b"#")
    if fragment >= 0:
        # Envoy rejects (default) or strips a #fragment before routing; it never hashes it.
        query = query[:fragment]
    params = query.split(b"&")
    if not params[-1]:
        # Envoy's parser stops at the end of the string: "a=1&" has no empty last parameter.
        params.pop()
    for param in params:
        key, sep, value = param.partition(b"=")
        if key == name:
            return value if sep else b""
    return None


def _header_hash(headers: list[tuple[bytes, bytes]], name: bytes, inline: bool) -> int | None:
    values = [raw.strip(_OWS) for header, raw in headers if header == name]
    if not values:
        return None
    if inline:
        return xxh64(b",".join(value for value in values if value))
    values.sort()
    seed = 0
    for value in values:
        seed = xxh64(value, seed)
    return seed


_KIND_COOKIE: Final = 0
_KIND_HEADER: Final = 1
_KIND_QUERY: Final = 2
_KIND_SOURCE_IP: Final = 3


class Affinity:
    """A compiled list of hash policies: build once per config, call :meth:`compute` per request.

    ``compute`` returns ``(hash, generated)``: ``hash`` is None when no policy produced a key
    (pick at random); ``generated`` is the invented cookie value when a cookie policy with a
    ``ttl`` found its cookie absent (answer with :meth:`set_cookie_header`), else None.
    """

    __slots__ = (
        "_connections",
        "_set_cookie_prefix",
        "_set_cookie_suffix",
        "_steps",
        "cookie_only",
        "cookie_policy",
        "generates_cookie",
        "policies",
    )

    def __init__(self, policies: Sequence[HashPolicy]) -> None:
        self.policies: tuple[HashPolicy, ...] = tuple(policies)
        steps: list[tuple[int, bytes, bool, bool]] = []
        generator: CookiePolicy | None = None
        first_cookie: CookiePolicy | None = None
        for policy in self.policies:
            if isinstance(policy, CookiePolicy):
                first_cookie = first_cookie or policy
                generates = policy.ttl is not None
                if generates and generator is None:
                    generator = policy
                name = policy.name.encode()
                if not cookie_name_can_match(name):
                    name = b""  # found in no request: generated, if the policy has a ttl
                steps.append((_KIND_COOKIE, name, generates, policy.terminal))
            elif isinstance(policy, HeaderPolicy):
                name = policy.name.lower().encode()
                if name == b":authority":
                    name = b"host"
                inline = name in _INLINE_REQUEST_HEADERS
                steps.append((_KIND_HEADER, name, inline, policy.terminal))
            elif isinstance(policy, QueryParameterPolicy):
                steps.append((_KIND_QUERY, policy.name.encode(), False, policy.terminal))
            else:
                steps.append((_KIND_SOURCE_IP, b"", False, policy.terminal))
        self._steps: tuple[tuple[int, bytes, bool, bool], ...] = tuple(steps)
        # Then a request's hash depends on its Cookie line and its connection alone.
        self.cookie_only: bool = all(step[0] == _KIND_COOKIE for step in steps)
        self.generates_cookie: bool = generator is not None
        self.cookie_policy: CookiePolicy | None = generator or first_cookie
        self._set_cookie_prefix = b""
        self._set_cookie_suffix = b""
        # The generated value depends on the connection only; a client that makes several
        # requests before it stores the cookie reuses it from here.
        self._connections: dict[tuple[tuple[str, int], tuple[str, int]], tuple[str, int]] = {}
        if generator is not None:
            prefix, _, suffix = set_cookie_value(generator, "\0").partition("\0")
            self._set_cookie_prefix = b"set-cookie: " + prefix.encode()
            self._set_cookie_suffix = suffix.encode() + b"\r\n"

    def compute(
        self,
        headers: list[tuple[bytes, bytes]],
        target: bytes,
        remote: tuple[str, int],
        local: tuple[str, int],
    ) -> tuple[int | None, str | None]:
        """Hash key of one request and the cookie value generated for it (or None)."""
        result: int | None = None
        generated: str | None = None
        for kind, name, flag, terminal in self._steps:
            new: int | None
            if kind == _KIND_COOKIE:
                value = _find_cookie(headers, name) if name else b""
                if value:
                    new = xxh64(value)
                elif flag:
                    if generated is None:
                        generated, new = self._generated(remote, local)
                    else:
                        new = xxh64(generated)
                else:
                    new = None
            elif kind == _KIND_HEADER:
                new = _header_hash(headers, name, flag)
            elif kind == _KIND_QUERY:
                found = query_first_value(target, name)
                new = None if found is None else xxh64(found)
            else:
                new = xxh64(remote[0]) if remote[0] else None
            if new is not None:
                result = combine_hashes(result, new)
            if terminal and result is not None:
                break
        return result, generated

    def _generated(self, remote: tuple[str, int], local: tuple[str, int]) -> tuple[str, int]:
        """The generated cookie value for this connection and its hash."""
        key = (remote, local)
        found = self._connections.get(key)
        if found is None:
            value = generated_cookie_value(format_address(*remote), format_address(*local))
            found = (value, xxh64(value))
            if len(self._connections) >= GENERATED_CACHE_SIZE:
                self._connections.clear()
            self._connections[key] = found
        return found

    def set_cookie_header(self, value: str) -> bytes:
        """The full ``set-cookie: ...\\r\\n`` line for the (first) generating cookie policy."""
        if not self.generates_cookie:
            raise ValueError("no cookie policy with a ttl: nothing generates a cookie")
        return self._set_cookie_prefix + value.encode() + self._set_cookie_suffix
