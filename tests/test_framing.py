"""proxy.framing: the request-target and Host decisions, without sockets."""

from __future__ import annotations

import pytest

from proxy.framing import authority_ok, same_authority, split_absolute_form


@pytest.mark.parametrize(
    "value",
    [b"", b"a", b"test.com", b"Test.COM:8080", b"a:", b"127.0.0.1:80", b"[::1]", b"[::1]:8443",
     b"[2001:db8::1]:", b"under_score.example", b"x-y~z.example", b"a!$&'()*+,;=b"],
)  # fmt: skip
def test_valid_authorities(value: bytes) -> None:
    assert authority_ok(value)


@pytest.mark.parametrize(
    "value",
    [b"evil.com/../x", b"a b", b"x\\", b"@evil.com", b"user@evil.com", b"[::1", b"[]",
     b"[::1]x", b"[::1]:8x", b"[g::1]", b"a:8x", b"a:1:2", b":80", b"a%41.com", b"a\tb",
     b"a\x00", b"a/", b"a?b", b"a#b", b"\xc3\xa9.example", b"a]", b"a["],
)  # fmt: skip
def test_invalid_authorities(value: bytes) -> None:
    assert not authority_ok(value)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://h/p?q=1", (b"h", b"/p?q=1")),
        (b"http://h", (b"h", b"/")),
        (b"http://h?q", (b"h", b"/?q")),
        (b"http://h:80/", (b"h:80", b"/")),
        (b"HTTPS://H.example:443/a/b", (b"H.example:443", b"/a/b")),
        (b"http://[::1]:8080/x", (b"[::1]:8080", b"/x")),
        (b"http://h/a?b=http://c/d", (b"h", b"/a?b=http://c/d")),
    ],
)
def test_absolute_form_splits_into_authority_and_origin_form(
    target: bytes, expected: tuple[bytes, bytes]
) -> None:
    assert split_absolute_form(target) == expected


@pytest.mark.parametrize(
    "target",
    [b"ftp://h/", b"http:/h/", b"http//h/", b"http:///p", b"http://u@h/", b"http://a b/",
     b"http://h:x/", b"h:80", b"//h/p", b"http://"],
)  # fmt: skip
def test_invalid_absolute_forms(target: bytes) -> None:
    assert split_absolute_form(target) is None


@pytest.mark.parametrize(
    ("host", "authority", "target", "same"),
    [
        (b"h", b"h", b"http://h/", True),
        (b"H.Example", b"h.example", b"http://h.example/", True),
        (b"h:80", b"h", b"http://h/", True),
        (b"h", b"h:80", b"http://h:80/", True),
        (b"h:443", b"h", b"https://h/", True),
        (b"h:443", b"h", b"http://h/", False),
        (b"h:8080", b"h", b"http://h/", False),
        (b"other", b"h", b"http://h/", False),
        (b"h ", b"h", b"http://h/", True),
    ],
)
def test_host_must_name_the_targets_authority(
    host: bytes, authority: bytes, target: bytes, same: bool
) -> None:
    assert same_authority(host, authority, target) is same
