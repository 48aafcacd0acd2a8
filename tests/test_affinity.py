"""Hash-key extraction and cookie generation, checked against independently computed XXH64."""

from __future__ import annotations

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.affinity import (
    Affinity,
    CookieAttribute,
    CookiePolicy,
    HashPolicy,
    HeaderPolicy,
    QueryParameterPolicy,
    SourceIPPolicy,
    cookie_line,
    format_address,
    generated_cookie_value,
    parse_cookie,
    set_cookie_value,
)

MASK = (1 << 64) - 1
REMOTE = ("10.0.0.1", 54321)
LOCAL = ("10.0.0.2", 8080)


def x(data: bytes) -> int:
    return xxhash.xxh64(data, seed=0).intdigest()


def rotl1(value: int) -> int:
    return ((value << 1) & MASK) | (value >> 63)


def compute(
    policies: list[HashPolicy],
    headers: list[tuple[bytes, bytes]] | None = None,
    target: bytes = b"/",
    remote: tuple[str, int] = REMOTE,
    local: tuple[str, int] = LOCAL,
) -> tuple[int | None, str | None]:
    return Affinity(policies).compute(headers or [], target, remote, local)


# --- addresses and the generated cookie -------------------------------------------------------


def test_format_address_v4_and_v6() -> None:
    assert format_address("1.2.3.4", 80) == "1.2.3.4:80"
    assert format_address("::1", 80) == "[::1]:80"
    assert format_address("2001:db8::7", 443) == "[2001:db8::7]:443"


def test_design_example_cookie_value() -> None:
    value = generated_cookie_value("10.0.0.1:54321", "10.0.0.2:8080")
    assert value == "d5bede35465dd05f"
    assert value == format(x(b"10.0.0.1:5432110.0.0.2:8080"), "016x")


def test_generated_value_is_zero_padded_lowercase_hex() -> None:
    # Search a remote port whose hash has a leading zero nibble (1 in 16 do): Envoy's
    # Hex::uint64ToHex always writes all 8 bytes.
    for port in range(1, 2000):
        value = generated_cookie_value(f"10.0.0.1:{port}", "10.0.0.2:8080")
        assert len(value) == 16
        assert value == value.lower()
        if value.startswith("0"):
            assert int(value, 16) < 1 << 60
            break
    else:
        raise AssertionError("no hash with a leading zero found")


def test_ipv6_cookie_generation_uses_brackets() -> None:
    policy = CookiePolicy(name="ISTIOID", ttl=60)
    hash_, generated = compute([policy], remote=("2001:db8::1", 40000), local=("::1", 8080))
    expected = format(x(b"[2001:db8::1]:40000[::1]:8080"), "016x")
    assert generated == expected
    assert hash_ == x(expected.encode())


def test_generated_cookie_routes_like_the_returned_cookie() -> None:
    affinity = Affinity([CookiePolicy(name="ISTIOID", ttl=60)])
    first_hash, generated = affinity.compute([], b"/", REMOTE, LOCAL)
    assert generated == "d5bede35465dd05f"
    headers = [(b"cookie", b'ISTIOID="d5bede35465dd05f"')]
    again, none = affinity.compute(headers, b"/", ("10.9.9.9", 1), LOCAL)
    assert none is None
    assert again == first_hash == x(b"d5bede35465dd05f")


# --- Set-Cookie text ----------------------------------------------------------------------------


def test_set_cookie_ttl_60() -> None:
    policy = CookiePolicy(name="ISTIOID", ttl=60)
    assert set_cookie_value(policy, "abc") == 'ISTIOID="abc"; Max-Age=60; HttpOnly'


def test_set_cookie_ttl_0_is_a_session_cookie() -> None:
    policy = CookiePolicy(name="ISTIOID", ttl=0)
    assert set_cookie_value(policy, "abc") == 'ISTIOID="abc"; HttpOnly'


def test_set_cookie_path() -> None:
    policy = CookiePolicy(name="s", path="/app", ttl=3600)
    assert set_cookie_value(policy, "v") == 's="v"; Max-Age=3600; Path=/app; HttpOnly'


def test_set_cookie_attributes_in_order() -> None:
    policy = CookiePolicy(
        name="ISTIOID",
        path="/",
        ttl=60,
        attributes=(
            CookieAttribute("SameSite", "None"),
            CookieAttribute("Secure"),
            CookieAttribute("Partitioned"),
        ),
    )
    assert (
        set_cookie_value(policy, "d5bede35465dd05f")
        == 'ISTIOID="d5bede35465dd05f"; Max-Age=60; Path=/; SameSite=None; Secure; Partitioned;'
        " HttpOnly"
    )


def test_set_cookie_header_line() -> None:
    affinity = Affinity([CookiePolicy(name="ISTIOID", path="/", ttl=60)])
    assert affinity.generates_cookie
    assert affinity.cookie_policy == CookiePolicy(name="ISTIOID", path="/", ttl=60)
    assert (
        affinity.set_cookie_header("d5bede35465dd05f")
        == b'set-cookie: ISTIOID="d5bede35465dd05f"; Max-Age=60; Path=/; HttpOnly\r\n'
    )


def test_passive_cookie_policy_does_not_generate() -> None:
    policy = CookiePolicy(name="ISTIOID")
    affinity = Affinity([policy])
    assert not affinity.generates_cookie
    assert affinity.cookie_policy == policy
    assert affinity.compute([], b"/", REMOTE, LOCAL) == (None, None)
    assert affinity.compute([(b"cookie", b"ISTIOID=abc")], b"/", REMOTE, LOCAL) == (
        x(b"abc"),
        None,
    )


# --- cookie extraction --------------------------------------------------------------------------


def test_quoted_and_unquoted_values_hash_the_same() -> None:
    policy = CookiePolicy(name="ISTIOID")
    quoted = compute([policy], [(b"cookie", b'ISTIOID="abc123"')])
    plain = compute([policy], [(b"cookie", b"ISTIOID=abc123")])
    assert quoted == plain == (x(b"abc123"), None)


def test_only_one_pair_of_quotes_is_stripped() -> None:
    policy = CookiePolicy(name="k")
    assert compute([policy], [(b"cookie", b'k=""v""')])[0] == x(b'"v"')
    assert compute([policy], [(b"cookie", b'k="v')])[0] == x(b'"v')


def test_cookie_among_others_with_spaces() -> None:
    policy = CookiePolicy(name="ISTIOID")
    headers = [(b"cookie", b"a=1;  ISTIOID=xyz ; b=2")]
    # Envoy trims leading spaces of the name only; the value keeps its trailing space.
    assert compute([policy], headers)[0] == x(b"xyz ")


def test_multiple_cookie_headers_first_match_wins() -> None:
    policy = CookiePolicy(name="ISTIOID")
    headers = [
        (b"accept", b"*/*"),
        (b"cookie", b"a=1; b=2"),
        (b"cookie", b"ISTIOID=first"),
        (b"cookie", b"ISTIOID=second"),
    ]
    assert compute([policy], headers)[0] == x(b"first")


def test_cookie_name_is_case_sensitive() -> None:
    policy = CookiePolicy(name="ISTIOID", ttl=60)
    hash_, generated = compute([policy], [(b"cookie", b"istioid=abc")])
    assert generated == "d5bede35465dd05f"
    assert hash_ == x(b"d5bede35465dd05f")


def test_empty_cookie_value_counts_as_absent() -> None:
    passive = CookiePolicy(name="ISTIOID")
    assert compute([passive], [(b"cookie", b"ISTIOID=; other=1")]) == (None, None)
    # The first matching pair ends the search even when it is empty (Envoy's parseCookie).
    assert compute([passive], [(b"cookie", b"ISTIOID=; ISTIOID=late")]) == (None, None)


def test_pieces_without_equals_are_skipped() -> None:
    policy = CookiePolicy(name="k")
    assert compute([policy], [(b"cookie", b"k; flag; k=v")])[0] == x(b"v")


# --- header policy ------------------------------------------------------------------------------


def test_header_single_value() -> None:
    assert compute([HeaderPolicy(name="x-user")], [(b"x-user", b"alice")])[0] == x(b"alice")


def test_header_absent_gives_no_key() -> None:
    assert compute([HeaderPolicy(name="x-user")], [(b"x-other", b"a")]) == (None, None)


def test_repeated_header_in_two_orders_gives_the_same_hash() -> None:
    policy = HeaderPolicy(name="x-user")
    one = compute([policy], [(b"x-user", b"bob"), (b"x-user", b"alice")])[0]
    two = compute([policy], [(b"x-user", b"alice"), (b"x-user", b"bob")])[0]
    # Envoy's HashUtil::xxHash64(Span) chains seeds over the sorted values.
    expected = xxhash.xxh64(b"bob", seed=x(b"alice")).intdigest()
    assert one == two == expected
    assert expected != x(b"alicebob")


def test_envoy_span_hash_vector() -> None:
    # Envoy's test/common/common/hash_test.cc: xxHash64({"foo", "bar"}) == 17745830980996999794.
    # The header policy sorts first, so foo, bar is hashed as bar then foo.
    policy = HeaderPolicy(name="x-k")
    got = compute([policy], [(b"x-k", b"foo"), (b"x-k", b"bar")])[0]
    assert got == xxhash.xxh64(b"foo", seed=x(b"bar")).intdigest()
    assert xxhash.xxh64(b"bar", seed=x(b"foo")).intdigest() == 17745830980996999794


def test_host_header_reached_as_authority() -> None:
    headers = [(b"host", b"shop.example.com")]
    assert compute([HeaderPolicy(name=":authority")], headers)[0] == x(b"shop.example.com")
    assert compute([HeaderPolicy(name="Host")], headers)[0] == x(b"shop.example.com")


def test_inline_header_repeats_are_joined_in_arrival_order() -> None:
    policy = HeaderPolicy(name="user-agent")
    got = compute([policy], [(b"user-agent", b"b"), (b"user-agent", b"a")])[0]
    assert got == x(b"b,a")


# --- query parameter ----------------------------------------------------------------------------


def test_query_first_occurrence() -> None:
    policy = QueryParameterPolicy(name="user")
    assert compute([policy], target=b"/p?x=1&user=alice&user=bob")[0] == x(b"alice")


def test_query_value_is_not_percent_decoded() -> None:
    policy = QueryParameterPolicy(name="user")
    assert compute([policy], target=b"/p?user=a%20b")[0] == x(b"a%20b")


def test_query_parameter_without_equals_hashes_empty_string() -> None:
    policy = QueryParameterPolicy(name="debug")
    assert compute([policy], target=b"/p?debug&x=1")[0] == x(b"")


def test_query_absent() -> None:
    policy = QueryParameterPolicy(name="user")
    assert compute([policy], target=b"/p?username=alice") == (None, None)
    assert compute([policy], target=b"/p") == (None, None)
    assert compute([policy], target=b"/p#user=alice") == (None, None)


# --- source IP ----------------------------------------------------------------------------------


def test_source_ip_v4() -> None:
    assert compute([SourceIPPolicy()], remote=("192.168.1.7", 5555))[0] == x(b"192.168.1.7")


def test_source_ip_v6_without_brackets() -> None:
    assert compute([SourceIPPolicy()], remote=("2001:db8::1", 5555))[0] == x(b"2001:db8::1")


def test_source_ip_ignores_port() -> None:
    first = compute([SourceIPPolicy()], remote=("10.1.1.1", 1))
    second = compute([SourceIPPolicy()], remote=("10.1.1.1", 2))
    assert first == second


# --- combination and terminal -------------------------------------------------------------------


def test_two_policies_combine_with_rotate_xor() -> None:
    policies: list[HashPolicy] = [HeaderPolicy(name="x-user"), SourceIPPolicy()]
    hash_, _ = compute(policies, [(b"x-user", b"alice")], remote=("10.0.0.9", 1))
    header_hash = x(b"alice")
    ip_hash = x(b"10.0.0.9")
    assert hash_ == rotl1(header_hash) ^ ip_hash
    # By hand: rotl1 moves the top bit to bit 0.
    assert rotl1(1 << 63) == 1 and rotl1(3) == 6


def test_duplicate_policies_do_not_cancel() -> None:
    hash_, _ = compute([SourceIPPolicy(), SourceIPPolicy()], remote=("10.0.0.9", 1))
    assert hash_ not in (0, None)


def test_missing_first_policy_leaves_second_unrotated() -> None:
    hash_, _ = compute([HeaderPolicy(name="x-user"), SourceIPPolicy()], remote=("10.0.0.9", 1))
    assert hash_ == x(b"10.0.0.9")


def test_terminal_stops_after_a_hash() -> None:
    policies: list[HashPolicy] = [HeaderPolicy(name="x-user", terminal=True), SourceIPPolicy()]
    hit = compute(policies, [(b"x-user", b"alice")])[0]
    assert hit == x(b"alice")
    miss = compute(policies, [], remote=("10.0.0.9", 1))[0]
    assert miss == x(b"10.0.0.9")


def test_terminal_cookie_generation_stops_the_walk() -> None:
    policies: list[HashPolicy] = [
        CookiePolicy(name="ISTIOID", ttl=60, terminal=True),
        SourceIPPolicy(),
    ]
    assert compute(policies) == (x(b"d5bede35465dd05f"), "d5bede35465dd05f")


def test_terminal_without_own_hash_still_stops_on_accumulated_hash() -> None:
    # Envoy tests `terminal() && hash` on the accumulated hash, not the policy's own result.
    policies: list[HashPolicy] = [
        SourceIPPolicy(),
        HeaderPolicy(name="x-user", terminal=True),
        SourceIPPolicy(),
    ]
    hash_, _ = compute(policies, remote=("10.0.0.9", 1))
    assert hash_ == x(b"10.0.0.9")


def test_no_policies_no_key() -> None:
    affinity = Affinity([])
    assert not affinity.generates_cookie
    assert affinity.cookie_policy is None
    assert affinity.compute([(b"cookie", b"a=1")], b"/?a=1", REMOTE, LOCAL) == (None, None)


def test_generated_cookie_is_per_connection_even_when_remembered() -> None:
    affinity = Affinity([CookiePolicy("ISTIOID", ttl=60)])
    local = ("10.0.0.2", 8080)
    seen = {}
    for port in (54321, 54322, 54321):
        hash_, value = affinity.compute([], b"/", ("10.0.0.1", port), local)
        expected = generated_cookie_value(f"10.0.0.1:{port}", "10.0.0.2:8080")
        assert value == expected and hash_ == xxhash.xxh64_intdigest(expected.encode())
        seen[port] = value
    assert seen[54321] == "d5bede35465dd05f" and seen[54322] != seen[54321]


def _parse_cookie_by_pieces(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    """Envoy's parseCookie written the way Envoy does it (split on ";"): the reference."""
    for header, raw in headers:
        if header != b"cookie":
            continue
        for piece in raw.strip(b" \t").split(b";"):
            equals = piece.find(b"=")
            if equals < 0:
                continue
            start = len(piece) - len(piece.lstrip(b" "))
            if piece[start:equals] != name:
                continue
            value = piece[equals + 1 :]
            if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            return value
    return b""


_COOKIE_BYTES = st.text(alphabet=' \t;="aIb', max_size=24).map(str.encode)


@settings(max_examples=3000)
@given(
    lines=st.lists(_COOKIE_BYTES, max_size=3),
    name=st.sampled_from([b"I", b"aI", b"I=", b"a;I", b"II"]),
)
def test_parse_cookie_matches_the_split_reference(lines: list[bytes], name: bytes) -> None:
    headers = [(b"host", b"I=x")] + [(b"cookie", line) for line in lines]
    assert parse_cookie(headers, name) == _parse_cookie_by_pieces(headers, name)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "line",
    [
        b"ISTIOID" * 450_000,  # the name again and again, never followed by "="
        b"x; " + b"ISTIOID;" * 400_000 + b" ISTIOID=found",
        b"aISTIOID=" * 350_000,
    ],
    ids=["repeats", "pieces-then-match", "suffix-matches"],
)
def test_cookie_scan_is_linear_in_a_hostile_line(line: bytes) -> None:
    # About 3 MB each: a scan that looks back over the line for every occurrence of the name
    # (as the first version did) takes minutes here; a linear one, milliseconds.
    expected = _parse_cookie_by_pieces([(b"cookie", line)], b"ISTIOID")
    assert parse_cookie([(b"cookie", line)], b"ISTIOID") == expected
    assert expected == (b"found" if line.endswith(b"found") else b"")


def test_parse_cookie_empty_name_matches_nothing() -> None:
    # Istio requires httpCookie.name, so no policy asks for ""; Envoy would match "=v".
    assert parse_cookie([(b"cookie", b"=v; a=1")], b"") == b""


def test_cookie_line_is_the_one_cookie_header_or_none_for_several() -> None:
    host = (b"host", b"test.com")
    assert cookie_line([host]) == b""
    assert cookie_line([host, (b"cookie", b"ISTIOID=a")]) == b"ISTIOID=a"
    assert cookie_line([(b"cookie", b"a=1"), host, (b"cookie", b"ISTIOID=a")]) is None


def test_only_cookie_policies_make_a_cookie_only_affinity() -> None:
    cookie = CookiePolicy(name="ISTIOID", ttl=60)
    assert Affinity([cookie]).cookie_only
    assert Affinity([cookie, CookiePolicy(name="other")]).cookie_only
    assert not Affinity([cookie, HeaderPolicy(name="x-user")]).cookie_only
    assert not Affinity([QueryParameterPolicy(name="u"), cookie]).cookie_only
    assert not Affinity([SourceIPPolicy()]).cookie_only
