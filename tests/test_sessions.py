"""Persistent session values (``proxy.sessions``): Envoy's cookie and header, byte for byte.

The expectations follow Envoy's ``test/extensions/http/stateful_session/cookie/cookie_test.cc``
(proto cookie, expiry, legacy ``ip:port`` values, the path matcher) and ``header_test.cc``.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import SessionSpec
from proxy.sessions import (
    ABSENT,
    BAD_SIGNATURE,
    EXPIRED,
    NAMED,
    PersistentSession,
    b64decode,
    decode_message,
    decode_value,
    encode_message,
    encode_value,
    path_matcher_covers,
)

KEY = b"0123456789abcdef0123456789abcdef"


def cookie_header(name: str, value: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x"), (b"cookie", f"a=b; {name}={value}".encode())]


def test_the_message_is_envoys_cookie_proto() -> None:
    # envoy.Cookie{address: "1.2.3.4:80", expires: 1005}.SerializeToString()
    assert encode_message("1.2.3.4:80", 1005) == b"\x0a\x0a1.2.3.4:80\x10\xed\x07"
    assert encode_message("1.2.3.4:80", 0) == b"\x0a\x0a1.2.3.4:80"  # proto3 leaves 0 out
    assert decode_message(b"\x0a\x0a1.2.3.4:80\x10\xed\x07") == ("1.2.3.4:80", 1005)


def test_the_value_decodes_to_the_pod_address() -> None:
    value = encode_value("127.0.0.1:9001", 0, cookie=True, key=None)
    assert base64.b64decode(value) == b"\x0a\x0e127.0.0.1:9001"
    assert decode_value(value.encode(), 0.0, cookie=True, key=None) == ("127.0.0.1:9001", 0, NAMED)


def test_expiry_is_checked_against_the_clock_given() -> None:
    value = encode_value("2.3.4.5:80", 1005, cookie=True, key=None).encode()
    assert decode_value(value, 1005.0, cookie=True, key=None)[2] == NAMED
    assert decode_value(value, 1006.0, cookie=True, key=None) == ("2.3.4.5:80", 1005, EXPIRED)


def test_legacy_values_are_read_as_envoy_reads_them() -> None:
    # Not a protobuf message: the decoded text is the address (Envoy's old format).
    legacy = base64.b64encode(b"127.0.0.1:9001")
    assert decode_value(legacy, 0.0, cookie=True, key=None) == ("127.0.0.1:9001", 0, NAMED)
    assert decode_value(base64.b64encode(b"blahblah"), 0, cookie=True, key=None)[0] == "blahblah"
    # ...but "10.0.0.1:8080" happens to parse as a valid message (fields 6 and 7) with no
    # address, which Envoy takes as no session at all: so does sticky-proxy.
    assert decode_message(b"10.0.0.1:8080") == ("", 0)
    assert decode_value(base64.b64encode(b"10.0.0.1:8080"), 0, cookie=True, key=None)[2] == ABSENT


def test_base64_is_envoys_strict_decoder() -> None:
    assert b64decode(b"QQ==") == b"A"
    for bad in (b"QR==", b"QQ=", b"Q===", b"QQ", b"Q!==", b"", b"QQ==QQ=="):
        assert b64decode(bad) == b"", bad
    assert decode_value(b"not base64!", 0, cookie=True, key=None) == ("", 0, ABSENT)


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05ab",  # truncated length-delimited field
        b"\x00\x01",  # field number 0
        b"\x0e",  # wire type 6
        b"\x10" + b"\xff" * 10 + b"\x01",  # varint longer than 10 bytes
        b"\x0a\x02\xff\xfe",  # address that is not UTF-8 (proto3 string)
        b"\x1b\x0a\x01a",  # group never closed
        b"\x1b" * 101 + b"\x1c" * 101,  # deeper than protobuf's recursion limit
    ],
)
def test_malformed_messages_are_not_messages(data: bytes) -> None:
    assert decode_message(data) is None


def test_unknown_fields_and_groups_are_skipped_and_the_last_address_wins() -> None:
    data = b"\x0a\x01a" + b"\x1b\x0a\x01z\x1c" + b"\x29" + b"\0" * 8 + b"\x0a\x03b:1\x10\x05"
    assert decode_message(data) == ("b:1", 5)


@given(st.binary(max_size=300))
def test_any_bytes_decode_without_raising(data: bytes) -> None:
    decode_message(data)
    decode_value(base64.b64encode(data), 1.0, cookie=True, key=None)
    decode_value(base64.b64encode(data), 1.0, cookie=True, key=KEY)


@given(st.text(min_size=1, max_size=60), st.integers(min_value=0, max_value=2**64 - 1))
def test_messages_round_trip(address: str, expires: int) -> None:
    assert decode_message(encode_message(address, expires)) == (address, expires)


def test_signed_values_verify_and_forgeries_do_not() -> None:
    value = encode_value("127.0.0.1:9001", 0, cookie=True, key=KEY)
    assert decode_value(value.encode(), 0, cookie=True, key=KEY) == ("127.0.0.1:9001", 0, NAMED)
    # Still an envoy.Cookie message: the MAC is field 15, which Envoy would skip.
    assert decode_message(base64.b64decode(value)) == ("127.0.0.1:9001", 0)
    forged = encode_value("127.0.0.1:9002", 0, cookie=True, key=b"x" * 32)
    unsigned = encode_value("127.0.0.1:9002", 0, cookie=True, key=None)
    raw = bytearray(base64.b64decode(value))
    raw[5] ^= 1  # one bit of the address
    tampered = base64.b64encode(bytes(raw))
    for bad in (forged.encode(), unsigned.encode(), tampered):
        assert decode_value(bad, 0, cookie=True, key=KEY) == ("", 0, BAD_SIGNATURE)


def test_a_signed_expiry_cannot_be_extended() -> None:
    value = encode_value("127.0.0.1:9001", 100, cookie=True, key=KEY)
    assert decode_value(value.encode(), 101, cookie=True, key=KEY)[2] == EXPIRED
    mac = base64.b64decode(value)[-34:]  # field 15: the MAC of the old expiry...
    later = base64.b64encode(encode_message("127.0.0.1:9001", 10**9) + mac)  # ...on a new one
    assert decode_value(later, 101, cookie=True, key=KEY)[2] == BAD_SIGNATURE


@pytest.mark.parametrize(
    ("cookie_path", "accepted", "refused"),
    [
        ("", ["/", "/foo", "/foo/bar", "/foo#bar", "/foo?bar", "/foobar"], []),
        ("/", ["/", "/foo", "/foobar"], []),
        ("/foo/", ["/foo/", "/foo/bar"], ["/", "/foo", "/bar", "/foo#bar", "/foo?bar", "/foobar"]),
        ("/foo", ["/foo", "/foo/", "/foo/bar", "/foo#bar", "/foo?bar"], ["/", "/bar", "/foobar"]),
    ],
)
def test_cookie_path_matches_as_envoy(
    cookie_path: str, accepted: list[str], refused: list[str]
) -> None:
    assert all(path_matcher_covers(cookie_path, p) for p in accepted)
    assert not any(path_matcher_covers(cookie_path, p) for p in refused)


def test_set_cookie_is_envoys_make_set_cookie_value() -> None:
    session = PersistentSession(SessionSpec("cookie", "sticky", "/"))
    value = encode_value("127.0.0.1:9001", 0, cookie=True, key=None)
    assert session.line("127.0.0.1:9001", 0) == (
        f'set-cookie: sticky="{value}"; Path=/; HttpOnly\r\n'.encode()
    )
    with_ttl = PersistentSession(SessionSpec("cookie", "sticky", "/app", ttl=60))
    line = with_ttl.line("127.0.0.1:9001", 1000.9)
    expected = encode_value("127.0.0.1:9001", 1060, cookie=True, key=None)
    assert line == f'set-cookie: sticky="{expected}"; Max-Age=60; Path=/app; HttpOnly\r\n'.encode()


def test_a_request_carries_its_session_in_a_cookie_or_a_header() -> None:
    session = PersistentSession(SessionSpec("cookie", "sticky", "/"))
    value = encode_value("10.1.2.3:8080", 0, cookie=True, key=None)
    assert session.read(cookie_header("sticky", f'"{value}"'), 0) == ("10.1.2.3:8080", 0, NAMED)
    assert session.read([(b"cookie", b"other=1")], 0) == ("", 0, ABSENT)
    header = PersistentSession(SessionSpec("header", "X-Session"))
    encoded = base64.b64encode(b"10.1.2.3:8080")
    assert header.read([(b"x-session", encoded)], 0) == ("10.1.2.3:8080", 0, NAMED)
    assert header.line("10.1.2.3:8080", 0) == b"x-session: " + encoded + b"\r\n"


def test_outside_the_cookie_path_there_is_no_session() -> None:
    session = PersistentSession(SessionSpec("cookie", "sticky", "/app"))
    assert session.applies(b"/app/x?y=1")
    assert not session.applies(b"/other")
