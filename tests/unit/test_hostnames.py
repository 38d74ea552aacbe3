"""Hostname pattern validation (seed 001's API-edge rules) and query-name normalisation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.hostnames import (
    MAX_HOSTNAME_LENGTH,
    normalize_host_entry,
    normalize_pattern,
    normalize_query_name,
    split_host_entry,
)


def rejected(value: object) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        normalize_pattern(value)
    assert info.value.code == "INVALID_HOSTNAME"
    return info.value


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("github.com", "github.com"),
        ("pypi.org", "pypi.org"),
        ("api.example.com", "api.example.com"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("1password.com", "1password.com"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("localhost", "localhost"),
        ("*.example.com", "*.example.com"),
        ("*.co.uk", "*.co.uk"),
    ],
)
def test_accepts_exact_names_and_first_level_wildcards(value: str, expected: str) -> None:
    assert normalize_pattern(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("*.bücher.de", "*.xn--bcher-kva.de"),
        ("münchen.example.com", "xn--mnchen-3ya.example.com"),
        ("例え.jp", "xn--r8jz45g.jp"),
        ("XN--BCHER-KVA.DE", "xn--bcher-kva.de"),
    ],
)
def test_internationalised_names_become_punycode(value: str, expected: str) -> None:
    assert normalize_pattern(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("API.Example.COM", "api.example.com"),
        ("*.EXAMPLE.com", "*.example.com"),
        ("example.com.", "example.com"),
        ("*.example.com.", "*.example.com"),
        ("Example.COM.", "example.com"),
    ],
)
def test_uppercase_is_lowered_and_trailing_dot_folded(value: str, expected: str) -> None:
    assert normalize_pattern(value) == expected


def test_longest_legal_label_and_name_are_accepted() -> None:
    label = "a" * 63
    assert normalize_pattern(f"{label}.com") == f"{label}.com"
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
    assert len(name) == MAX_HOSTNAME_LENGTH
    assert normalize_pattern(name) == name


# --------------------------------------------------------------------------- rejected, with the reason


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("https://api.example.com", "is a URL"),
        ("http://example.com/path", "is a URL"),
        ("ftp://example.com", "is a URL"),
        ("example.com/path", "contains a path"),
        ("example.com/", "contains a path"),
        ("example.com?q=1", "contains a path"),
        ("example.com#frag", "contains a path"),
        ("example.com:443", "contains a port"),
        ("*.example.com:8080", "contains a port"),
        ("user@example.com", "user information"),
        ("user:secret@example.com", "user information"),
        ("exa mple.com", "whitespace"),
        (" example.com", "whitespace"),
        ("example.com\n", "whitespace"),
        ("example.com\t", "whitespace"),
        ("", "is empty"),
    ],
)
def test_rejects_urls_and_non_hostname_parts(value: str, says: str) -> None:
    error = rejected(value)
    assert says in error.message
    assert repr(value) in error.message  # the message quotes what was given


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("*", "matches every host"),
        ("*.", "matches every host"),
        ("*.com", "wildcards a whole top-level domain"),
        ("*.com.", "wildcards a whole top-level domain"),
        ("**.foo.com", "double wildcard"),
        ("*.*.foo.com", "double wildcard"),
        ("**", "double wildcard"),
        ("foo*.example.com", "wildcard inside a name"),
        ("*foo.example.com", "wildcard inside a name"),
        ("a.*.b.com", "wildcard inside a name"),
        ("example.*", "wildcard inside a name"),
        ("api.example.c*m", "wildcard inside a name"),
    ],
)
def test_rejects_bad_wildcards(value: str, says: str) -> None:
    assert says in rejected(value).message


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a..b.com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("*..example.com", "empty label"),
        ("-foo.example.com", "invalid label '-foo'"),
        ("foo-.example.com", "invalid label 'foo-'"),
        ("api.-x-.com", "invalid label '-x-'"),
        ("under_score.example.com", "invalid label 'under_score'"),
        ("exa!mple.com", "invalid label"),
        ("example.123", "all-numeric"),
    ],
)
def test_rejects_bad_labels(value: str, says: str) -> None:
    assert says in rejected(value).message


def test_rejects_label_longer_than_63() -> None:
    error = rejected("a" * 64 + ".example.com")
    assert "label longer than 63 characters" in error.message


def test_rejects_idn_label_longer_than_63_after_encoding() -> None:
    # 60 non-ASCII characters encode to a much longer punycode label.
    error = rejected("ü" * 60 + ".de")
    assert "label" in error.message


def test_rejects_name_longer_than_253() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62])  # 254 characters
    assert len(name) == MAX_HOSTNAME_LENGTH + 1
    assert f"longer than {MAX_HOSTNAME_LENGTH} characters" in rejected(name).message


def test_wildcard_counts_towards_the_length_limit() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253: fine on its own
    assert f"longer than {MAX_HOSTNAME_LENGTH} characters" in rejected("*." + name).message


@pytest.mark.parametrize(
    "value",
    ["1.2.3.4", "10.0.0.1", "::1", "2001:db8::1", "[2001:db8::1]", "[::1]", "[1.2.3.4]", "::ffff:10.1.2.3"],
)
def test_rejects_ip_addresses(value: str) -> None:
    assert "is an IP address" in rejected(value).message


def test_rejects_dotted_quad_with_trailing_dot() -> None:
    # Not an IP address for ipaddress, but its last label is all-numeric, which no TLD is.
    assert "all-numeric" in rejected("1.2.3.4.").message


@pytest.mark.parametrize("value", ["xn--a.com", "xn--.com", "xn--abc-.com", "api.xn--zz-xxx.com"])
def test_rejects_invalid_punycode(value: str) -> None:
    assert "invalid punycode label" in rejected(value).message


@pytest.mark.parametrize("value", ["\u00ad.com", "\ud800.com", "a\u3002\u3002b.com"])
def test_rejects_invalid_internationalised_labels(value: str) -> None:
    error = rejected(value)
    assert "label" in error.message


@pytest.mark.parametrize(
    ("value", "type_name"), [(None, "NoneType"), (42, "int"), (["a.com"], "list"), (b"a.com", "bytes")]
)
def test_rejects_non_strings(value: object, type_name: str) -> None:
    error = rejected(value)
    assert error.message == f"expected a hostname string, got {type_name}"


def test_error_has_no_field_of_its_own() -> None:
    # The policy parser adds the field path (egress.allow_hosts[i]); the bare validator has none.
    assert rejected("https://x.com").field is None


# --------------------------------------------------------------------------- query names


@pytest.mark.parametrize(
    ("name", "expected"),
    [("API.Example.com", "api.example.com"), ("example.com.", "example.com"), ("example.com", "example.com")],
)
def test_normalize_query_name(name: str, expected: str) -> None:
    assert normalize_query_name(name) == expected


# --------------------------------------------------------------------------- host entries (pattern[:port])

_ENTRY_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="abc.*-:[]0123456789/@ \u0664", max_size=30),
    st.builds(
        lambda h, p: f"{h}:{p}", st.sampled_from(["a.example", "*.a.example", "A.Example.", ""]), st.text(max_size=8)
    ),
)


@settings(max_examples=600, deadline=None)
@given(_ENTRY_TEXT)
def test_a_host_entry_is_refused_with_a_stable_code_or_canonical_and_a_fixed_point(value: str) -> None:
    try:
        entry = normalize_host_entry(value)
    except GatewayError as exc:
        assert exc.code in ("INVALID_HOSTNAME", "INVALID_PORT"), exc
        return
    assert normalize_host_entry(entry) == entry
    pattern, port = split_host_entry(entry)
    assert normalize_pattern(pattern) == pattern
    assert port is None or (1 <= port <= 65535 and entry == f"{pattern}:{port}")
