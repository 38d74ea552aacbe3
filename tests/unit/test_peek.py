"""The egress peek's protocol logic: classification, ClientHello reassembly, HTTP request tracking, denials.

TLS inputs are genuine ClientHellos written by OpenSSL through Python's `ssl` module
(`SSLContext.wrap_bio` over `MemoryBIO`s), then split, re-framed and corrupted.
"""

from __future__ import annotations

import http.client
import io
import random
import ssl
import struct
import time
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.peek.classify import CLASSIFY_MAX_BYTES, NEED_MORE, NeedMore, TrafficKind, classify
from gateway.peek.http1 import (
    CONTINUE_TIMEOUT,
    Answer,
    AnswerAwaited,
    Awaiting,
    EndsBefore,
    HttpError,
    HttpErrorCode,
    HttpEvent,
    HttpRequestTracker,
    RequestEnd,
    RequestHead,
    ServerAnswer,
    http_forbidden,
    sanitize_reason,
    websocket_accept,
)
from gateway.peek.tls import (
    MAX_HANDSHAKE_SIZE,
    AlertDescription,
    ClientHello,
    ClientHelloParser,
    PeekError,
    TlsErrorCode,
    tls_alert,
)
from tests.factory import client_bios, genuine_hello


def parse_client_hello(
    data: bytes | bytearray | memoryview, max_handshake_size: int = MAX_HANDSHAKE_SIZE
) -> NeedMore | ClientHello | PeekError:
    """One-shot form of `ClientHelloParser` for bytes already collected."""
    return ClientHelloParser(max_handshake_size).feed(data)


# --------------------------------------------------------------------------- genuine ClientHellos


HELLO = genuine_hello()
HELLO_NO_SNI = genuine_hello(None, None)
# A genuine hello larger than one TCP segment (1460 bytes), like one with a post-quantum key share.
BIG_ALPN = [f"{'p' * 200}-{i}" for i in range(8)]
BIG_HELLO = genuine_hello("big.example.org", BIG_ALPN)


def unframe(data: bytes) -> tuple[int, bytes]:
    """(first record version, handshake bytes) of a sequence of handshake records."""
    out = bytearray()
    version = data[1] << 8 | data[2]
    i = 0
    while i < len(data):
        assert data[i] == 0x16
        length = data[i + 3] << 8 | data[i + 4]
        out += data[i + 5 : i + 5 + length]
        i += 5 + length
    assert i == len(data)
    return version, bytes(out)


def frame(handshake: bytes, sizes: Iterable[int] | int = 16384, version: int = 0x0301) -> bytes:
    """Wrap handshake bytes into handshake records of the given fragment sizes (cycled)."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    out = bytearray()
    i = k = 0
    while i < len(handshake):
        size = sizes[k % len(sizes)]
        k += 1
        fragment = handshake[i : i + size]
        out += struct.pack("!BHH", 0x16, version, len(fragment)) + fragment
        i += size
    return bytes(out)


def split_hello(handshake: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(fixed part of the ClientHello body, extensions) — an independent decoder for the tests."""
    assert handshake[0] == 1
    body = handshake[4:]
    i = 34
    i += 1 + body[i]
    i += 2 + (body[i] << 8 | body[i + 1])
    i += 1 + body[i]
    fixed, rest = body[:i], body[i:]
    total = rest[0] << 8 | rest[1]
    assert total == len(rest) - 2
    exts: list[tuple[int, bytes]] = []
    j = 2
    while j < len(rest):
        ext_type, ext_len = struct.unpack_from("!HH", rest, j)
        exts.append((ext_type, rest[j + 4 : j + 4 + ext_len]))
        j += 4 + ext_len
    return fixed, exts


def encode_ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


def build_hello(fixed: bytes, exts: Sequence[tuple[int, bytes]] | None, tail: bytes = b"") -> bytes:
    """A handshake message: ClientHello header + fixed part + extensions block (+ raw tail)."""
    body = fixed
    if exts is not None:
        block = b"".join(encode_ext(t, d) for t, d in exts)
        body += struct.pack("!H", len(block)) + block
    body += tail
    return b"\x01" + len(body).to_bytes(3, "big") + body


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return struct.pack("!H", len(entries)) + entries


def alpn_ext(*protocols: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protocols)
    return struct.pack("!H", len(entries)) + entries


HS_VERSION, HS = unframe(HELLO)
FIXED, EXTS = split_hello(HS)


def padded(size: int) -> bytes:
    """The genuine hello with its padding extension (OpenSSL sends one) grown to `size` bytes."""
    return build_hello(FIXED, [*((t, d) for t, d in EXTS if t != 0x0015), (0x0015, b"\x00" * size)])


def with_ext(ext_type: int, data: bytes) -> bytes:
    """The genuine hello's handshake with one extension replaced (or added at the front)."""
    exts = [(t, d) for t, d in EXTS if t != ext_type]
    return build_hello(FIXED, [(ext_type, data), *exts])


def feed_all(parser: ClientHelloParser, pieces: Iterable[bytes]) -> ClientHello | PeekError | NeedMore:
    """Feed every piece; a ClientHello may only complete with the last one, and a decision never changes."""
    pieces = list(pieces)
    result: ClientHello | PeekError | NeedMore = NEED_MORE
    for k, piece in enumerate(pieces):
        previous, result = result, parser.feed(piece)
        if isinstance(result, ClientHello) and k < len(pieces) - 1:
            pytest.fail(f"hello complete after piece {k} of {len(pieces)}")
        if previous is not NEED_MORE and result is not previous:
            pytest.fail(f"decision changed after piece {k}: {previous} -> {result}")
    return result


def random_pieces(data: bytes, rng: random.Random, low: int = 1, high: int = 7) -> list[bytes]:
    out = []
    i = 0
    while i < len(data):
        step = rng.randint(low, high)
        out.append(data[i : i + step])
        i += step
    return out


def tls_error(data: bytes, **kwargs: int) -> PeekError:
    result = parse_client_hello(data, **kwargs)
    assert isinstance(result, PeekError), result
    return result


# --------------------------------------------------------------------------- classification


def test_classify_genuine_tls_and_its_prefixes() -> None:
    assert classify(HELLO) is TrafficKind.TLS
    assert classify(HELLO[:3]) is TrafficKind.TLS
    assert classify(HELLO[:1]) is NEED_MORE
    assert classify(HELLO[:2]) is NEED_MORE


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\n", TrafficKind.HTTP),
        (b"GET ", TrafficKind.HTTP),
        (b"M-SEARCH * HTTP/1.1\r\n", TrafficKind.HTTP),
        (b"PRI * HTTP/2.0\r\n", TrafficKind.HTTP),  # the tracker refuses it with a specific code
        (b"CONNECT a:443 HTTP/1.1\r\n", TrafficKind.HTTP),
        (b"", NEED_MORE),
        (b"G", NEED_MORE),
        (b"GET", NEED_MORE),
        (b"A" * 24, NEED_MORE),
        (b"A" * 25, TrafficKind.OPAQUE),  # longer than any method
        (b"x" * (3 << 20), TrafficKind.OPAQUE),
        # A method-like word and a line that never ends within the bound: HTTP, refused by the tracker as too long.
        (b"a " + b"x" * (CLASSIFY_MAX_BYTES - 3), NEED_MORE),
        (b"a " + b"x" * (CLASSIFY_MAX_BYTES - 2), TrafficKind.HTTP),
        (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3\r\n", TrafficKind.OPAQUE),
        (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3", NEED_MORE),  # its line may still turn out to be a request line
        (b"SSH-2.0-TestClient\r\n", TrafficKind.OPAQUE),
        # Request lines some lenient HTTP server reads (RFC 9112 2.2, 3): refused by the tracker, never opaque.
        (b"get / HTTP/1.1\r\n", TrafficKind.HTTP),
        (b"-GET / HTTP/1.1\r\n", TrafficKind.HTTP),
        (b"GET\t/\tHTTP/1.1\r\n", TrafficKind.HTTP),
        (b"GET\x0b/\x0cHTTP/1.1\r\n", TrafficKind.HTTP),
        (b"GET\xa0/\x85HTTP/1.1\r\n", TrafficKind.HTTP),
        (b"GET\x1f/ HTTP/1.1\n", TrafficKind.HTTP),
        (b"\r\nGET / HTTP/1.1\r\n", TrafficKind.HTTP),
        (b"\r\n\r\n \tgEt / hTtP/1.1\r\n", TrafficKind.HTTP),
        (b"\nGET / HTTP/1.1\r\n", TrafficKind.HTTP),
        (b"\r\n", NEED_MORE),
        # Line protocols and binary ones stay opaque.
        (b"get foo\r\n", TrafficKind.OPAQUE),  # memcached
        (b"PING\r\n", TrafficKind.OPAQUE),
        (b"*1\r\n$4\r\nPING\r\n", TrafficKind.OPAQUE),  # RESP
        (b"<?xml version='1.0'?><stream:stream>", TrafficKind.OPAQUE),  # XMPP: no newline, decided anyway
        (b"0\x0c\x02\x01\x01`\x07", TrafficKind.OPAQUE),  # an LDAP bind
        (b"GET\t/\x01 HTTP/1.1\r\n", TrafficKind.OPAQUE),  # a control byte: binary (see the README's limits)
        (b"\x16\x04\x01", TrafficKind.OPAQUE),
        (b"\x16\x03\x05", TrafficKind.OPAQUE),
        (b"\x16\x03\x00", TrafficKind.TLS),
        (b"\x16\x03", NEED_MORE),
        (b"\x80\x2e\x01\x03\x01", TrafficKind.OPAQUE),  # SSLv2-compatible hello
        (b"\x00\x00\x00\x01", TrafficKind.OPAQUE),
        (b" GET / HTTP/1.1", NEED_MORE),
        (b" GET / HTTP/1.1\r\n", TrafficKind.HTTP),
    ],
)
def test_classify(data: bytes, expected: TrafficKind | NeedMore) -> None:
    assert classify(data) == expected


_TEXTISH = st.binary(max_size=64) | st.lists(
    st.sampled_from([b"GET", b"get", b" ", b"\t", b"\r", b"\n", b"/", b"HTTP/1.1", b"x", b"\xa0", b"\x00", b"-"]),
    max_size=12,
).map(b"".join)


@given(_TEXTISH, st.binary(max_size=30))
def test_classify_is_total_and_a_decision_never_changes(data: bytes, more: bytes) -> None:
    result = classify(data)
    assert result is NEED_MORE or isinstance(result, TrafficKind)
    if result is not NEED_MORE:
        assert classify(data + more) == result


@given(_TEXTISH)
def test_classify_decides_within_its_bound(data: bytes) -> None:
    padded = data + b" " + b"a" * CLASSIFY_MAX_BYTES
    assert classify(padded) is not NEED_MORE
    assert classify(padded) == classify(padded[:CLASSIFY_MAX_BYTES])


def test_classify_of_a_line_in_one_byte_segments_stays_cheap() -> None:
    # The peek classifies everything read so far on every segment: a line sent a byte at a time must not cost
    # quadratic Python work.
    data = b"A " + b"x" * (CLASSIFY_MAX_BYTES - 2)
    started = time.perf_counter()
    for end in range(1, len(data) + 1):
        classify(data[:end])
    assert time.perf_counter() - started < 2.0


# --------------------------------------------------------------------------- ClientHello: genuine


def test_genuine_hello_with_sni_and_alpn() -> None:
    result = parse_client_hello(HELLO)
    assert isinstance(result, ClientHello)
    assert result.sni == "api.example.com"
    assert result.alpn == (b"h2", b"http/1.1")
    assert 0x0304 in result.supported_versions
    assert 0x0303 in result.supported_versions
    assert result.legacy_version == 0x0303
    assert result.record_version == HELLO[1] << 8 | HELLO[2]
    assert result.has_ech is False
    assert result.extension_types == tuple(t for t, _ in EXTS)
    assert result.handshake_length == len(HS) - 4


def test_genuine_hello_without_sni() -> None:
    result = parse_client_hello(HELLO_NO_SNI)
    assert isinstance(result, ClientHello)
    assert result.sni is None
    assert result.alpn == ()
    assert 0 not in result.extension_types


def test_genuine_hello_bigger_than_one_segment() -> None:
    assert len(BIG_HELLO) > 1460
    segments = [BIG_HELLO[i : i + 1460] for i in range(0, len(BIG_HELLO), 1460)]
    assert len(segments) >= 2
    result = feed_all(ClientHelloParser(), segments)
    assert isinstance(result, ClientHello)
    assert result.sni == "big.example.org"
    assert result.alpn == tuple(p.encode() for p in BIG_ALPN)


@pytest.mark.parametrize("data", [HELLO, HELLO_NO_SNI, BIG_HELLO], ids=["sni", "no-sni", "big"])
def test_every_two_segment_split_gives_the_same_result(data: bytes) -> None:
    expected = parse_client_hello(data)
    assert isinstance(expected, ClientHello)
    for cut in range(1, len(data)):
        parser = ClientHelloParser()
        assert parser.feed(data[:cut]) is NEED_MORE, cut
        assert parser.feed(data[cut:]) == expected, cut


@pytest.mark.parametrize("seed", range(20))
def test_many_small_segments_give_the_same_result(seed: int) -> None:
    rng = random.Random(seed)
    for data in (HELLO, BIG_HELLO):
        assert feed_all(ClientHelloParser(), random_pieces(data, rng)) == parse_client_hello(data)


def test_one_byte_at_a_time() -> None:
    assert feed_all(ClientHelloParser(), [bytes([b]) for b in HELLO]) == parse_client_hello(HELLO)


@pytest.mark.parametrize(
    "sizes", [1, 2, 3, 7, 100, 512, [1, 1000], [5, 1, 300, 1], [len(HS) - 1, 1]], ids=lambda s: f"records-{s}"
)
def test_handshake_reframed_into_several_records(sizes: int | list[int]) -> None:
    data = frame(HS, sizes, version=0x0303)
    assert data != HELLO
    expected = parse_client_hello(HELLO)
    assert isinstance(expected, ClientHello)
    result = parse_client_hello(data)
    assert result == expected.__class__(**{**_fields(expected), "record_version": 0x0303})
    rng = random.Random(str(sizes))
    assert feed_all(ClientHelloParser(), random_pieces(data, rng)) == result


def _fields(hello: ClientHello) -> dict[str, object]:
    return {name: getattr(hello, name) for name in ClientHello.__slots__}


def test_every_proper_prefix_needs_more() -> None:
    for data in (HELLO, frame(HS, 1), BIG_HELLO):
        for cut in range(len(data)):
            assert parse_client_hello(data[:cut]) is NEED_MORE, cut


def test_padding_extension_pushes_hello_over_several_segments_and_records() -> None:
    data = frame(padded(5000), 4000)
    assert data.count(b"\x16\x03\x01") >= 2
    result = feed_all(ClientHelloParser(), [data[i : i + 1460] for i in range(0, len(data), 1460)])
    assert isinstance(result, ClientHello)
    assert result.sni == "api.example.com"
    assert result.extension_types[-1] == 0x0015


def test_results_are_final() -> None:
    parser = ClientHelloParser()
    result = parser.feed(HELLO)
    assert isinstance(result, ClientHello)
    assert parser.feed(b"\x17\x03\x03\x00\x05hello") is result
    assert parser.buffered == 0


# --------------------------------------------------------------------------- ClientHello: bounds


def test_oversize_claim_is_refused_from_the_header_alone() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (MAX_HANDSHAKE_SIZE + 1).to_bytes(3, "big")
    parser = ClientHelloParser()
    error = parser.feed(header)
    assert isinstance(error, PeekError)
    assert error.code == TlsErrorCode.TLS_TOO_LARGE
    assert str(MAX_HANDSHAKE_SIZE) in error.message


def test_handshake_bound_is_exact_and_configurable() -> None:
    overhead = len(padded(0)) - 4
    at_bound = padded(MAX_HANDSHAKE_SIZE - overhead)
    assert len(at_bound) - 4 == MAX_HANDSHAKE_SIZE
    assert isinstance(parse_client_hello(frame(at_bound)), ClientHello)
    over = padded(MAX_HANDSHAKE_SIZE - overhead + 1)
    assert tls_error(frame(over)).code == TlsErrorCode.TLS_TOO_LARGE
    assert isinstance(parse_client_hello(frame(over), max_handshake_size=32 * 1024), ClientHello)
    assert tls_error(frame(HS), max_handshake_size=100).code == TlsErrorCode.TLS_TOO_LARGE


def test_buffer_never_exceeds_the_bound_even_with_one_byte_records() -> None:
    data = frame(padded(MAX_HANDSHAKE_SIZE - 600), 1)
    parser = ClientHelloParser()
    peak = 0
    for i in range(0, len(data), 997):
        result = parser.feed(data[i : i + 997])
        peak = max(peak, parser.buffered)
    assert isinstance(result, ClientHello)
    assert peak <= MAX_HANDSHAKE_SIZE + 4 + 5


def test_record_overflow_is_refused_from_the_record_header() -> None:
    error = tls_error(b"\x16\x03\x01\x40\x01")
    assert error.code == TlsErrorCode.TLS_MALFORMED
    assert "16384" in error.message
    assert parse_client_hello(b"\x16\x03\x01\x40\x00") is NEED_MORE


# --------------------------------------------------------------------------- ClientHello: strictness


def _replace_fixed(offset: int, value: bytes) -> bytes:
    fixed = FIXED[:offset] + value + FIXED[offset + len(value) :]
    return build_hello(fixed, EXTS)


NO_SESSION = FIXED[:34] + b"\x00"  # legacy_version, random and an empty legacy_session_id
TAIL_AFTER_SESSION_ID = FIXED[35 + FIXED[34] :]  # cipher suites and compression methods


def test_hand_built_hello_parts_are_valid() -> None:
    assert isinstance(parse_client_hello(frame(build_hello(NO_SESSION + TAIL_AFTER_SESSION_ID, EXTS))), ClientHello)
    session32 = FIXED[:34] + b"\x20" + b"\x00" * 32 + TAIL_AFTER_SESSION_ID
    assert isinstance(parse_client_hello(frame(build_hello(session32, EXTS))), ClientHello)
    assert isinstance(parse_client_hello(frame(build_hello(FIXED, EXTS, tail=b""))), ClientHello)


def _cut_last_byte(handshake: bytes) -> bytes:
    """The message minus its last byte, with a consistent header: the extensions block overruns it."""
    return b"\x01" + (len(handshake) - 5).to_bytes(3, "big") + handshake[4:-1]


# name: (handshake message or records, a fragment of the expected message)
MALFORMED_HELLOS: dict[str, tuple[bytes, str]] = {
    "zero-length record": (b"\x16\x03\x01\x00\x00" + frame(HS), "zero-length"),
    "record overflow": (b"\x16\x03\x01\x40\x01" + frame(HS), "16384"),
    "interleaved alert record": (
        frame(HS[:10]) + b"\x15\x03\x01\x00\x02\x02\x28" + frame(HS[10:]),
        "content type 21 interleaved",
    ),
    "interleaved ccs record": (
        frame(HS[:10]) + b"\x14\x03\x01\x00\x01\x01" + frame(HS[10:]),
        "content type 20 interleaved",
    ),
    "record version 2.0": (b"\x16\x02\x00" + frame(HS)[3:], "major byte is 2"),
    "second record version 0x0305": (frame(HS[:10]) + b"\x16\x03\x05" + frame(HS[10:])[3:], "0x0305"),
    "extra data in the last record": (frame(HS + b"\x00"), "data follows"),
    "extra handshake message in the last record": (frame(HS + b"\x14\x00\x00\x00"), "data follows"),
    "extensions block longer than the message": (_cut_last_byte(HS), "does not match"),
    "trailing garbage after the extensions": (
        build_hello(FIXED, EXTS, tail=encode_ext(0x4469, b"")),
        "does not match",
    ),
    "one stray byte instead of extensions": (build_hello(FIXED, None, tail=b"\x00"), "stray byte"),
    "duplicate extension": (build_hello(FIXED, [*EXTS, EXTS[1]]), "twice"),
    "duplicate SNI extension": (build_hello(FIXED, [(0, sni_ext(b"a.com")), *EXTS]), "extension 0 appears twice"),
    "pre_shared_key not last": (
        build_hello(FIXED, [*EXTS, (0x0029, b"\x00" * 8), (0x4469, b"")]),
        "pre_shared_key is not the last",
    ),
    "extension length beyond the block": (
        build_hello(FIXED, None, tail=b"\x00\x06\x00\x15\x00\x09\x00\x00"),
        "extension 21 length 9",
    ),
    "extension header cut": (build_hello(FIXED, None, tail=b"\x00\x02\x00\x15"), "inside an extension header"),
    "session id of 33 bytes": (
        build_hello(FIXED[:34] + b"\x21" + b"\x00" * 33 + TAIL_AFTER_SESSION_ID, EXTS),
        "legacy_session_id of 33",
    ),
    "session id cut": (build_hello(FIXED[:34] + b"\x20" + b"\x00" * 32, None), "ends inside legacy_session_id"),
    "odd cipher suites length": (
        build_hello(NO_SESSION + b"\x00\x03\x13\x01\x13" + b"\x01\x00", EXTS),
        "not a positive even",
    ),
    "no cipher suites": (build_hello(NO_SESSION + b"\x00\x00\x01\x00", EXTS), "not a positive even"),
    "cipher suites beyond the message": (
        build_hello(NO_SESSION + b"\x00\x40\x13\x01" + b"\x00" * 4, None),
        "cipher_suites length 64 exceeds",
    ),
    "no compression methods field": (build_hello(NO_SESSION + b"\x00\x02\x13\x01", None), "ends before"),
    "no compression methods": (build_hello(NO_SESSION + b"\x00\x02\x13\x01\x00", EXTS), "is empty"),
    "compression methods beyond the message": (
        build_hello(NO_SESSION + b"\x00\x02\x13\x01\x05\x00", None),
        "legacy_compression_methods length 5 exceeds",
    ),
    "legacy_version 2.0": (_replace_fixed(0, b"\x02\x00"), "legacy_version"),
    "hello shorter than its fixed fields": (build_hello(FIXED[:30], None), "shorter than its fixed fields"),
    "SNI list length mismatch": (with_ext(0, b"\x00\x09\x00\x00\x05a.com"), "server_name list length"),
    "SNI name length beyond the list": (with_ext(0, b"\x00\x08\x00\x00\x09a.com"), "server name length 9"),
    "SNI extension empty in a ClientHello": (with_ext(0, b""), "server_name extension is too short"),
    "SNI entry header cut": (with_ext(0, b"\x00\x02\x00\x00"), "inside an entry header"),
    "ALPN empty protocol name": (with_ext(0x10, b"\x00\x03\x00\x01a"), "protocol name length 0"),
    "ALPN list length mismatch": (with_ext(0x10, b"\x00\x05\x02h2"), "ALPN list length"),
    "ALPN extension empty": (with_ext(0x10, b""), "ALPN extension is too short"),
    "supported_versions odd": (with_ext(0x2B, b"\x03\x03\x04\x03"), "supported_versions length 3"),
    "supported_versions empty": (with_ext(0x2B, b""), "supported_versions extension is empty"),
    "supported_versions length mismatch": (with_ext(0x2B, b"\x04\x03\x04"), "supported_versions length 4"),
}


@pytest.mark.parametrize(("handshake_or_records", "fragment"), MALFORMED_HELLOS.values(), ids=MALFORMED_HELLOS.keys())
def test_malformed_hellos_are_refused(handshake_or_records: bytes, fragment: str) -> None:
    data = handshake_or_records if handshake_or_records[0] == 0x16 else frame(handshake_or_records)
    error = tls_error(data)
    assert error.code == TlsErrorCode.TLS_MALFORMED, error
    assert fragment in error.message, error
    # Same verdict when the bytes trickle in.
    assert feed_all(ClientHelloParser(), random_pieces(data, random.Random(1))) == error


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x17\x03\x03\x00\x05\x01\x00\x00\x40", TlsErrorCode.TLS_NOT_CLIENT_HELLO),
        (b"\x17", TlsErrorCode.TLS_NOT_CLIENT_HELLO),
        (b"\x15\x03\x01\x00\x02\x02\x28", TlsErrorCode.TLS_NOT_CLIENT_HELLO),
        (frame(b"\x02" + HS[1:]), TlsErrorCode.TLS_NOT_CLIENT_HELLO),
        (b"\x16\x03\x01\x00\x01\x0b", TlsErrorCode.TLS_NOT_CLIENT_HELLO),
    ],
)
def test_not_a_client_hello(data: bytes, code: TlsErrorCode) -> None:
    assert tls_error(data).code == code


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b"a\x00.example.com",
        "bücher.de".encode(),
        b"\xff.example.com",
        b"1.2.3.4",
        b"::1",
        b"[::1]",
        b"2130706433",
        b"0x7f000001",
        b"127.1",
        b"0x7f.0.0.1",
        b"a b.com",
        b"a/b.com",
        b"evil.com:443",
        b"a..b.com",
        b".a.com",
        b"a" * 64 + b".com",
        (b"a" * 60 + b".") * 5 + b"com",
    ],
)
def test_invalid_sni_is_refused(name: bytes) -> None:
    error = tls_error(frame(with_ext(0, sni_ext(name))))
    assert error.code == TlsErrorCode.TLS_SNI_INVALID, error


def test_ip_literal_sni_message_cites_rfc_6066() -> None:
    assert "RFC 6066" in tls_error(frame(with_ext(0, sni_ext(b"10.0.0.1")))).message


def test_sni_refusals_say_why() -> None:
    assert "NUL" in tls_error(frame(with_ext(0, sni_ext(b"a\x00.example.com")))).message
    assert "ASCII" in tls_error(frame(with_ext(0, sni_ext("bücher.de".encode())))).message
    assert "empty" in tls_error(frame(with_ext(0, sni_ext(b"")))).message
    assert "numeric" in tls_error(frame(with_ext(0, sni_ext(b"2130706433")))).message


def test_two_host_names_are_refused() -> None:
    error = tls_error(frame(with_ext(0, sni_ext(b"a.com", b"b.com"))))
    assert error.code == TlsErrorCode.TLS_SNI_INVALID
    assert "more than one" in error.message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"API.Example.COM", "api.example.com"),
        (b"api.example.com.", "api.example.com"),
        (b"xn--bcher-kva.de", "xn--bcher-kva.de"),
        (b"_acme-challenge.example.com", "_acme-challenge.example.com"),
        (b"localhost", "localhost"),
        (b"1e100.net", "1e100.net"),
        (b"a" * 63 + b".com", "a" * 63 + ".com"),
    ],
)
def test_valid_sni_is_normalised(name: bytes, expected: str) -> None:
    result = parse_client_hello(frame(with_ext(0, sni_ext(name))))
    assert isinstance(result, ClientHello)
    assert result.sni == expected


def test_other_name_types_are_skipped() -> None:
    entries = b"\x07\x00\x03xyz" + b"\x00\x00\x05a.com"
    result = parse_client_hello(frame(with_ext(0, struct.pack("!H", len(entries)) + entries)))
    assert isinstance(result, ClientHello)
    assert result.sni == "a.com"
    only_other = b"\x07\x00\x03xyz"
    result = parse_client_hello(frame(with_ext(0, struct.pack("!H", len(only_other)) + only_other)))
    assert isinstance(result, ClientHello)
    assert result.sni is None


def test_encrypted_client_hello_is_reported() -> None:
    result = parse_client_hello(frame(with_ext(0xFE0D, b"\x00\x00\x01\x00\x01\x42\x00\x00\x00\x00")))
    assert isinstance(result, ClientHello)
    assert result.has_ech is True
    assert result.sni == "api.example.com"


def test_hello_without_extensions_is_accepted() -> None:
    result = parse_client_hello(frame(build_hello(FIXED, None)))
    assert isinstance(result, ClientHello)
    assert result.sni is None
    assert result.extension_types == ()
    assert result.supported_versions == ()


def test_alpn_and_versions_are_extracted_from_built_hellos() -> None:
    hs = build_hello(FIXED, [(0x10, alpn_ext(b"x", b"\xff\x00")), (0x2B, b"\x04\x7a\x7a\x03\x04")])
    result = parse_client_hello(frame(hs))
    assert isinstance(result, ClientHello)
    assert result.alpn == (b"x", b"\xff\x00")
    assert result.supported_versions == (0x7A7A, 0x0304)


# --------------------------------------------------------------------------- ClientHello: fuzz


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            break
        pos %= len(buf)
        if kind == 0:
            buf[pos] = value
        elif kind == 1:
            buf.insert(pos, value)
        elif kind == 2:
            del buf[pos]
        else:
            del buf[pos:]
    return bytes(buf)


_OPS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from([HELLO, HELLO_NO_SNI, frame(HS, 3)]), ops=_OPS, seed=st.integers(0, 1000))
def test_mutated_genuine_hellos_never_raise_and_splitting_does_not_matter(
    base: bytes, ops: list[tuple[int, int, int]], seed: int
) -> None:
    data = _mutate(base, ops)
    whole = parse_client_hello(data)
    assert isinstance(whole, ClientHello | PeekError | NeedMore)
    if isinstance(whole, PeekError):
        assert isinstance(whole.code, TlsErrorCode)
        assert whole.message
    parser = ClientHelloParser()
    pieces = random_pieces(data, random.Random(seed), 1, 50)
    results = [parser.feed(p) for p in pieces]
    assert (results[-1] if results else NEED_MORE) == whole


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), ClientHello | PeekError | NeedMore)
    assert isinstance(parse_client_hello(b"\x16\x03\x01" + data), ClientHello | PeekError | NeedMore)


def test_parsing_a_genuine_hello_is_cheap() -> None:
    data = BIG_HELLO[:]
    rounds = 300
    start = time.perf_counter()
    for _ in range(rounds):
        parse_client_hello(data)
    per_hello = (time.perf_counter() - start) / rounds
    # The target is well under 50 µs on a normal core; 1 ms catches a quadratic or an accident only.
    assert per_hello < 1e-3, per_hello


# --------------------------------------------------------------------------- TLS alerts


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        (AlertDescription.UNRECOGNIZED_NAME, "TLSV1_UNRECOGNIZED_NAME"),
        (AlertDescription.ACCESS_DENIED, "TLSV1_ALERT_ACCESS_DENIED"),
        (AlertDescription.HANDSHAKE_FAILURE, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
    ],
)
def test_alert_bytes_parse_back_and_a_real_client_reports_them(description: AlertDescription, reason: str) -> None:
    obj, incoming, outgoing = client_bios("blocked.example.com")
    hello = parse_client_hello(outgoing.read())
    assert isinstance(hello, ClientHello)
    alert = tls_alert(description, hello.record_version)
    content_type, version, length = struct.unpack("!BHH", alert[:5])
    assert (content_type, version, length) == (21, hello.record_version, 2)
    assert alert[5:] == bytes([2, int(description)])  # fatal
    incoming.write(alert)
    with pytest.raises(ssl.SSLError) as info:
        obj.do_handshake()
    assert info.value.reason == reason


def test_alert_arguments_are_checked() -> None:
    assert tls_alert(112) == b"\x15\x03\x03\x00\x02\x02\x70"
    with pytest.raises(ValueError):
        tls_alert(7)
    with pytest.raises(ValueError):
        tls_alert(AlertDescription.ACCESS_DENIED, 0x0200)


# --------------------------------------------------------------------------- HTTP: helpers


def events_of(data: bytes | Iterable[bytes], **bounds: int) -> list[HttpEvent]:
    """All events except NeedMore, for the stream given whole or as pieces."""
    tracker = HttpRequestTracker(**bounds)
    pieces = [data] if isinstance(data, bytes) else list(data)
    out: list[HttpEvent] = []
    for piece in pieces:
        out += [e for e in tracker.feed(piece) if e is not NEED_MORE]
        if out and isinstance(out[-1], HttpError | AnswerAwaited):
            break  # terminal (an error repeats; a held request awaits the server's answer)
    return out


def heads(events: Iterable[HttpEvent]) -> list[RequestHead]:
    return [e for e in events if isinstance(e, RequestHead)]


def http_error(data: bytes, **bounds: int) -> HttpError:
    events = events_of(data, **bounds)
    assert events, "no event"
    assert isinstance(events[-1], HttpError), events
    return events[-1]


def request(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + body


KEEP_ALIVE = (
    request("GET /one HTTP/1.1\nHost: first.example\nUser-Agent: t\n\n")
    + request("POST /two HTTP/1.1\nHost: Second.Example.:8080\nContent-Length: 41\n\n")
    + b"GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n"[:41]
    + request("PUT /three HTTP/1.1\nHost: third.example\nTransfer-Encoding: chunked\n\n")
    + b'1e;name=value;quoted="a;b\\"c"\r\nGET / HTTP/1.1\r\nHost: evil\r\n\r\n'
    + b"\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"
)
KEEP_ALIVE_EXPECTED = [
    ("first.example", None, "/one", 0),
    ("second.example", 8080, "/two", 41),
    ("third.example", None, "/three", 30),
]


def summary(events: list[HttpEvent]) -> list[tuple[str | None, int | None, str, int]]:
    out = []
    ends = [e for e in events if isinstance(e, RequestEnd)]
    for head, end in zip(heads(events), ends, strict=True):
        out.append((head.host, head.port_from_host, head.target, end.body_length))
    return out


# --------------------------------------------------------------------------- HTTP: framing


def test_keep_alive_requests_each_report_their_host() -> None:
    events = events_of(KEEP_ALIVE)
    assert summary(events) == KEEP_ALIVE_EXPECTED
    assert not any(isinstance(e, HttpError) for e in events)
    offsets = [h.offset for h in heads(events)]
    assert [KEEP_ALIVE[o : o + 4] for o in offsets] == [b"GET ", b"POST", b"PUT "]
    ends = [e.offset for e in events if isinstance(e, RequestEnd)]
    assert ends[:2] == offsets[1:]
    assert ends[-1] == len(KEEP_ALIVE)


def test_keep_alive_one_byte_at_a_time() -> None:
    assert events_of([bytes([b]) for b in KEEP_ALIVE]) == events_of(KEEP_ALIVE)


def test_keep_alive_split_anywhere() -> None:
    expected = events_of(KEEP_ALIVE)
    for cut in range(1, len(KEEP_ALIVE)):
        assert events_of([KEEP_ALIVE[:cut], KEEP_ALIVE[cut:]]) == expected, cut


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60))
def test_keep_alive_any_segmentation(sizes: list[int]) -> None:
    pieces = []
    i = k = 0
    while i < len(KEEP_ALIVE):
        pieces.append(KEEP_ALIVE[i : i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    assert events_of(pieces) == events_of(KEEP_ALIVE)


def test_every_feed_ends_with_need_more_while_tracking() -> None:
    tracker = HttpRequestTracker()
    assert tracker.feed(b"") == [NEED_MORE]
    assert tracker.feed(b"GET / HT") == [NEED_MORE]
    events = tracker.feed(b"TP/1.1\r\nHost: a.com\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead, RequestEnd, NeedMore]


def test_requests_without_length_have_no_body() -> None:
    data = request("GET / HTTP/1.1\nHost: a.com\n\nDELETE /x HTTP/1.1\nHost: b.com\n\n")
    assert [h.host for h in heads(events_of(data))] == ["a.com", "b.com"]


def test_content_length_body_split_anywhere_is_counted_not_parsed() -> None:
    body = b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n" * 3
    data = request(f"POST /u HTTP/1.1\nHost: up.example\nContent-Length: {len(body)}\n\n", body)
    data += request("GET /after HTTP/1.1\nHost: after.example\n\n")
    expected = [("up.example", None, "/u", len(body)), ("after.example", None, "/after", 0)]
    for cut in range(1, len(data)):
        assert summary(events_of([data[:cut], data[cut:]])) == expected, cut


def test_chunked_body_with_extensions_and_trailers() -> None:
    chunks = b'5;a\r\nhello\r\n6 ; b = c ; d="q;\\""\r\n world\r\nA\r\n0123456789\r\n000\r\nTrailer-One: x\r\n\r\n'
    data = request("POST /c HTTP/1.1\nHost: c.example\nTransfer-Encoding: gzip, Chunked\n\n", chunks)
    data += request("GET /next HTTP/1.1\nHost: next.example\n\n")
    expected = [("c.example", None, "/c", 21), ("next.example", None, "/next", 0)]
    assert summary(events_of(data)) == expected
    assert summary(events_of([bytes([b]) for b in data])) == expected


def test_chunked_body_without_trailers_and_large_chunk() -> None:
    data = request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\n\n", b"FFFF\r\n" + b"x" * 0xFFFF)
    data += b"\r\n0\r\n\r\n" + request("GET / HTTP/1.1\nHost: b.com\n\n")
    assert summary(events_of(data)) == [("a.com", None, "/", 0xFFFF), ("b.com", None, "/", 0)]


@pytest.mark.parametrize(
    "chunks",
    [
        b"5\r\nhelloX\r\n0\r\n\r\n",  # data longer than its size
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after data
        b"g\r\nx\r\n0\r\n\r\n",
        b"-5\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"\r\n",
        b"5;\r\nhello\r\n0\r\n\r\n",
        b'5;a="unterminated\r\n',
        b"5;a b\r\n",
        b"1" * 17 + b"\r\n",
    ],
)
def test_invalid_chunks_are_refused(chunks: bytes) -> None:
    data = request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\n\n", chunks)
    assert http_error(data).code == HttpErrorCode.HTTP_INVALID_CHUNK


def test_bare_lf_in_chunk_size_line_is_a_line_ending_error() -> None:
    data = request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\n\n", b"5\nhello\r\n")
    assert http_error(data).code == HttpErrorCode.HTTP_BAD_LINE_ENDING


def test_empty_lines_between_requests_are_ignored() -> None:
    data = request("POST / HTTP/1.1\nHost: a.com\nContent-Length: 2\n\nhi\n\nGET / HTTP/1.1\nHost: b.com\n\n")
    events = events_of(data)
    assert [h.host for h in heads(events)] == ["a.com", "b.com"]
    assert data[heads(events)[1].offset :].startswith(b"GET ")


def test_http_1_0_without_host_reports_none_and_absolute_form_supplies_it() -> None:
    (head,) = heads(events_of(request("GET / HTTP/1.0\n\n")))
    assert head.host is None
    (head,) = heads(events_of(request("GET http://Abs.Example:81/p HTTP/1.0\n\n")))
    assert (head.host, head.port_from_host) == ("abs.example", 81)


def test_headers_are_reported_lowercased_in_order() -> None:
    (head,) = heads(events_of(request("GET /p?q=1 HTTP/1.1\nHost: a.com\nX-Thing:  v a l \nAccept: */*\n\n")))
    assert head.method == "GET"
    assert head.target == "/p?q=1"
    assert head.version == "HTTP/1.1"
    assert head.headers == (("host", "a.com"), ("x-thing", "v a l"), ("accept", "*/*"))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("EXAMPLE.com.", ("example.com", None, False)),
        ("example.com:8080", ("example.com", 8080, False)),
        ("[::1]:8080", ("::1", 8080, True)),
        ("[2001:DB8:0::1]", ("2001:db8::1", None, True)),
        ("10.0.0.1:80", ("10.0.0.1", 80, True)),
        ("xn--bcher-kva.de", ("xn--bcher-kva.de", None, False)),
        ("localhost:65535", ("localhost", 65535, False)),
    ],
)
def test_host_parsing(host: str, expected: tuple[str, int | None, bool]) -> None:
    (head,) = heads(events_of(request(f"GET / HTTP/1.1\nHost: {host}\n\n")))
    assert (head.host, head.port_from_host, head.host_is_ip) == expected


@pytest.mark.parametrize(
    "host",
    [
        "",
        "a b.com",
        "a.com, b.com",
        "[::1",
        "[::1]x",
        "::1",
        "[fe80::1%25eth0]",
        "[not-v6]",
        "a.com:0",
        "a.com:99999",
        "a.com:",
        "a.com:http",
        "a.com:000080",
        "a.com:+80",
        "a..com",
        "2130706433",
        "0x7f.1",
        "010.0.0.1",
        "ex%41mple.com",
        "bücher.de",
        "user@a.com",
        "a" * 64 + ".com",
    ],
)
def test_invalid_host_is_refused(host: str) -> None:
    assert http_error(request(f"GET / HTTP/1.1\nHost: {host}\n\n")).code == HttpErrorCode.HTTP_INVALID_HOST


@pytest.mark.parametrize(
    ("target", "host", "reported"),
    [
        ("http://a.com/x", "a.com", ("a.com", None)),
        ("http://A.COM./x", "a.com", ("a.com", None)),
        ("http://a.com:80/x", "a.com", ("a.com", None)),
        ("http://a.com/x", "a.com:80", ("a.com", 80)),
        ("https://a.com/x", "a.com:443", ("a.com", 443)),
        ("HTTP://a.com", "a.com", ("a.com", None)),
        ("http://a.com?q", "a.com", ("a.com", None)),
        ("http://[::1]:8080/", "[::1]:8080", ("::1", 8080)),
    ],
)
def test_absolute_form_with_the_same_host(target: str, host: str, reported: tuple[str, int | None]) -> None:
    (head,) = heads(events_of(request(f"GET {target} HTTP/1.1\nHost: {host}\n\n")))
    assert (head.host, head.port_from_host) == reported
    assert head.target == target


# --------------------------------------------------------------------------- HTTP: refusals

REFUSALS: list[tuple[str, bytes, HttpErrorCode]] = [
    ("connect", request("CONNECT a.com:443 HTTP/1.1\nHost: a.com:443\n\n"), HttpErrorCode.HTTP_CONNECT_REFUSED),
    ("duplicate host", request("GET / HTTP/1.1\nHost: a.com\nHost: a.com\n\n"), HttpErrorCode.HTTP_DUPLICATE_HOST),
    ("duplicate host 1.0", request("GET / HTTP/1.0\nHost: a.com\nhost: b.com\n\n"), HttpErrorCode.HTTP_DUPLICATE_HOST),
    ("missing host", request("GET / HTTP/1.1\nAccept: */*\n\n"), HttpErrorCode.HTTP_MISSING_HOST),
    (
        "missing host absolute",
        request("GET http://a.com/ HTTP/1.1\nAccept: */*\n\n"),
        HttpErrorCode.HTTP_MISSING_HOST,
    ),
    (
        "cl and te",
        request("POST / HTTP/1.1\nHost: a.com\nContent-Length: 5\nTransfer-Encoding: chunked\n\n"),
        HttpErrorCode.HTTP_AMBIGUOUS_LENGTH,
    ),
    (
        "te and cl",
        request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\nContent-Length: 5\n\n"),
        HttpErrorCode.HTTP_AMBIGUOUS_LENGTH,
    ),
    (
        "cl and bogus te",
        request("POST / HTTP/1.1\nHost: a.com\nContent-Length: 5\nTransfer-Encoding: bogus\n\n"),
        HttpErrorCode.HTTP_AMBIGUOUS_LENGTH,
    ),
    (
        "differing cl headers",
        request("POST / HTTP/1.1\nHost: a.com\nContent-Length: 5\nContent-Length: 6\n\n"),
        HttpErrorCode.HTTP_CONFLICTING_CONTENT_LENGTH,
    ),
    (
        "differing cl list",
        request("POST / HTTP/1.1\nHost: a.com\nContent-Length: 5, 6\n\n"),
        HttpErrorCode.HTTP_CONFLICTING_CONTENT_LENGTH,
    ),
    *[
        (
            f"invalid cl {value!r}",
            request(f"POST / HTTP/1.1\nHost: a.com\nContent-Length: {value}\n\n"),
            HttpErrorCode.HTTP_INVALID_CONTENT_LENGTH,
        )
        for value in ["-1", "+5", "abc", "", "0x10", "1 000", "5,", "١٢", "9" * 19]
    ],
    (
        "superscript digit cl",  # '²' (latin-1 0xb2) passes str.isdigit()
        b"POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: \xb2\r\n\r\n",
        HttpErrorCode.HTTP_INVALID_CONTENT_LENGTH,
    ),
    *[
        (
            f"invalid te {value!r}",
            request(f"POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: {value}\n\n"),
            HttpErrorCode.HTTP_INVALID_TRANSFER_ENCODING,
        )
        for value in ["gzip", "identity", "chunked, gzip", "chunked, chunked", "xchunked", "chunked;q=1", "", ","]
    ],
    (
        "two te headers",
        request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\nTransfer-Encoding: chunked\n\n"),
        HttpErrorCode.HTTP_INVALID_TRANSFER_ENCODING,
    ),
    (
        "te in http/1.0",
        request("POST / HTTP/1.0\nHost: a.com\nTransfer-Encoding: chunked\n\n"),
        HttpErrorCode.HTTP_INVALID_TRANSFER_ENCODING,
    ),
    ("obs-fold", request("GET / HTTP/1.1\nHost: a.com\nX-Long: a\n  b\n\n"), HttpErrorCode.HTTP_OBS_FOLD),
    ("obs-fold tab", request("GET / HTTP/1.1\nX: a\n\tHost: b.com\n\n"), HttpErrorCode.HTTP_OBS_FOLD),
    ("bare lf request line", b"GET / HTTP/1.1\nHost: a.com\r\n\r\n", HttpErrorCode.HTTP_BAD_LINE_ENDING),
    ("bare lf header", b"GET / HTTP/1.1\r\nHost: a.com\n\r\n", HttpErrorCode.HTTP_BAD_LINE_ENDING),
    ("bare lf end of head", b"GET / HTTP/1.1\r\nHost: a.com\r\n\n", HttpErrorCode.HTTP_BAD_LINE_ENDING),
    ("bare cr in header", b"GET / HTTP/1.1\r\nHost: a.com\rX: y\r\n\r\n", HttpErrorCode.HTTP_BAD_LINE_ENDING),
    ("bare cr in request line", b"GET /\r HTTP/1.1\r\nHost: a.com\r\n\r\n", HttpErrorCode.HTTP_BAD_LINE_ENDING),
    ("space before colon", request("GET / HTTP/1.1\nHost : a.com\n\n"), HttpErrorCode.HTTP_INVALID_HEADER),
    ("tab before colon", request("GET / HTTP/1.1\nHost\t: a.com\n\n"), HttpErrorCode.HTTP_INVALID_HEADER),
    ("no colon", request("GET / HTTP/1.1\nHost a.com\n\n"), HttpErrorCode.HTTP_INVALID_HEADER),
    ("empty name", request("GET / HTTP/1.1\n: a.com\n\n"), HttpErrorCode.HTTP_INVALID_HEADER),
    ("ctl in value", request("GET / HTTP/1.1\nHost: a.com\nX: a\x00b\n\n"), HttpErrorCode.HTTP_INVALID_HEADER),
    (
        "target host mismatch",
        request("GET http://other.com/x HTTP/1.1\nHost: a.com\n\n"),
        HttpErrorCode.HTTP_TARGET_HOST_MISMATCH,
    ),
    (
        "target port mismatch",
        request("GET http://a.com:8080/x HTTP/1.1\nHost: a.com\n\n"),
        HttpErrorCode.HTTP_TARGET_HOST_MISMATCH,
    ),
    (
        "target scheme port mismatch",
        request("GET https://a.com/x HTTP/1.1\nHost: a.com:80\n\n"),
        HttpErrorCode.HTTP_TARGET_HOST_MISMATCH,
    ),
    (
        "target userinfo",
        request("GET http://a.com@evil.com/ HTTP/1.1\nHost: evil.com\n\n"),
        HttpErrorCode.HTTP_INVALID_HOST,
    ),
    ("target bad host", request("GET http:///x HTTP/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_INVALID_HOST),
    ("target ftp", request("GET ftp://a.com/ HTTP/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
    ("authority form", request("GET a.com:80 HTTP/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
    ("not a url", request("GET 1http://a.com/ HTTP/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
    ("asterisk not options", request("GET * HTTP/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
    ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HttpErrorCode.HTTP_UNSUPPORTED_VERSION),
    ("http/2.0", request("GET / HTTP/2.0\nHost: a.com\n\n"), HttpErrorCode.HTTP_UNSUPPORTED_VERSION),
    ("http/1.2", request("GET / HTTP/1.2\nHost: a.com\n\n"), HttpErrorCode.HTTP_UNSUPPORTED_VERSION),
    ("http/0.9", b"GET /\r\n", HttpErrorCode.HTTP_MALFORMED),
    ("garbage", b"\x00\x01\x02\x03\r\n", HttpErrorCode.HTTP_MALFORMED),
    ("lowercase version", request("GET / http/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
    ("double space", request("GET  / HTTP/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
    ("trailing space", request("GET / HTTP/1.1 \nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
    ("non-ascii target", request("GET /é HTTP/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
    ("bad method", request("G(T / HTTP/1.1\nHost: a.com\n\n"), HttpErrorCode.HTTP_MALFORMED),
]


@pytest.mark.parametrize(("data", "code"), [(d, c) for _, d, c in REFUSALS], ids=[n for n, _, _ in REFUSALS])
def test_refusals(data: bytes, code: HttpErrorCode) -> None:
    error = http_error(data)
    assert error.code == code, error
    assert error.message
    # Same refusal byte by byte, and on a later request of a keep-alive connection.
    assert http_error(b"".join(bytes([b]) for b in data)) == error
    prefix = request("GET / HTTP/1.1\nHost: ok.example\n\n")
    events = events_of(prefix + data)
    assert heads(events)[0].host == "ok.example"
    assert events[-1] == error


def test_whitespace_before_colon_refusal_says_why() -> None:
    assert "whitespace" in http_error(request("GET / HTTP/1.1\nHost : a.com\n\n")).message


def test_userinfo_refusal_says_why() -> None:
    error = http_error(request("GET http://a.com@evil.com/ HTTP/1.1\nHost: evil.com\n\n"))
    assert "user information" in error.message


def test_errors_are_final() -> None:
    tracker = HttpRequestTracker()
    (error,) = tracker.feed(b"CONNECT a:1 HTTP/1.1\r\n")
    assert isinstance(error, HttpError)
    assert tracker.feed(request("GET / HTTP/1.1\nHost: a.com\n\n")) == [error]
    assert tracker.buffered == 0


def test_refusals_come_as_soon_as_the_request_line_is_complete() -> None:
    tracker = HttpRequestTracker()
    assert tracker.feed(b"PRI * HTTP/2.0\r") == [NEED_MORE]
    (error,) = tracker.feed(b"\n")
    assert isinstance(error, HttpError)
    assert error.code == HttpErrorCode.HTTP_UNSUPPORTED_VERSION
    # A bare CR is refused before any LF arrives.
    (error,) = HttpRequestTracker().feed(b"GET /\rx")
    assert isinstance(error, HttpError)
    assert error.code == HttpErrorCode.HTTP_BAD_LINE_ENDING
    tracker = HttpRequestTracker()
    assert tracker.feed(b"GET /\r") == [NEED_MORE]
    (error,) = tracker.feed(b"x")
    assert isinstance(error, HttpError)
    assert error.code == HttpErrorCode.HTTP_BAD_LINE_ENDING


def test_identical_content_lengths_are_accepted() -> None:
    data = request("POST / HTTP/1.1\nHost: a.com\nContent-Length: 3\nContent-Length: 3, 3\n\nabc")
    assert summary(events_of(data)) == [("a.com", None, "/", 3)]


# --------------------------------------------------------------------------- HTTP: upgrade and Expect

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3's example
WS = "GET /ws HTTP/1.1\nHost: ws.example\nUpgrade: websocket\nConnection: keep-alive, Upgrade\n"
WS += f"Sec-WebSocket-Key: {KEY}\nSec-WebSocket-Version: 13\n\n"
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def test_websocket_accept_is_rfc_6455s_example() -> None:
    assert websocket_accept(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_websocket_handshake_holds_what_follows_until_the_server_answered() -> None:
    tracker = HttpRequestTracker()
    head = request(WS)
    events = tracker.feed(head + b"\x81\x05hello GET / HTTP/1.1\r\nHost: evil\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead, RequestEnd, AnswerAwaited]
    assert events[2] == AnswerAwaited(len(head), Awaiting.UPGRADE, KEY)
    assert tracker.awaiting_answer and tracker.offset == len(head)  # nothing after the request was consumed
    with pytest.raises(RuntimeError):
        tracker.feed(b"more")
    tracker.answered(Answer.SWITCH)  # a genuine 101: WebSocket from here on
    assert tracker.passthrough
    assert tracker.feed(b"\x81\x05hello GET / HTTP/1.1\r\nHost: evil\r\n\r\n\x00\xff \r\n\n\r") == []
    assert tracker.buffered == 0


def test_a_declined_upgrade_keeps_checking_the_requests_that_follow() -> None:
    tracker = HttpRequestTracker()
    head = request(WS)
    assert isinstance(tracker.feed(head)[-1], AnswerAwaited)
    tracker.answered(Answer.RESUME)  # the server said 200: still HTTP
    later = request("GET / HTTP/1.1\nHost: evil\n\n")
    [head_event, *_] = tracker.feed(later)
    assert isinstance(head_event, RequestHead) and head_event.host == "evil" and head_event.offset == len(head)
    with pytest.raises(RuntimeError):
        tracker.answered(Answer.SWITCH)  # nothing awaits an answer


def _ws(line: str = "GET /ws HTTP/1.1", extra: str = "", **fields: str | None) -> bytes:
    """The WebSocket handshake with `fields` replaced ('_' for '-'; None removes one) and `extra` lines added."""
    named: dict[str, str | None] = {
        "Host": "ws.example",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    named.update({name.replace("_", "-"): value for name, value in fields.items()})
    lines = [line, *(f"{k}: {v}" for k, v in named.items() if v is not None)]
    return request("\n".join(lines) + "\n" + extra + "\n")


# Every way a request could ask to leave HTTP other than a complete WebSocket handshake: refused as it is read.
UPGRADE_REFUSALS = [
    (
        "h2c",
        _ws(Upgrade="h2c", Connection="Upgrade, HTTP2-Settings", extra="HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\n"),
    ),
    ("H2C upper case", _ws(Upgrade="H2C")),
    ("h2c without Connection", _ws(Upgrade="h2c", Connection=None)),
    ("h2c with HTTP/1.0", _ws(line="GET / HTTP/1.0", Upgrade="h2c")),
    ("h2c in a list", _ws(Upgrade="websocket, h2c")),
    ("h2c first in a list", _ws(Upgrade="h2c, websocket")),
    ("h2c in a second field", _ws(extra="Upgrade: h2c\n")),
    ("websocket twice", _ws(extra="Upgrade: websocket\n")),
    ("h2", _ws(Upgrade="h2")),
    ("tls", _ws(Upgrade="TLS/1.0")),
    ("other", _ws(Upgrade="echo")),
    ("websocket with a version", _ws(Upgrade="websocket/13")),
    ("empty", _ws(Upgrade="")),
    ("list of nothing", _ws(Upgrade=" , ")),
    ("websocket without Connection", _ws(Connection=None)),
    ("websocket with Connection close", _ws(Connection="close")),
    ("websocket in HTTP/1.0", _ws(line="GET /ws HTTP/1.0")),
    ("websocket with POST", _ws(line="POST /ws HTTP/1.1")),
    ("websocket with CONNECT-like method", _ws(line="OPTIONS /ws HTTP/1.1")),
    ("websocket without key", _ws(Sec_WebSocket_Key=None)),
    ("websocket with a short key", _ws(Sec_WebSocket_Key="c2hvcnQ=")),
    ("websocket with a key not base64", _ws(Sec_WebSocket_Key="!GhlIHNhbXBsZSBub25jZQ==")),
    ("websocket with two keys", _ws(extra=f"Sec-WebSocket-Key: {KEY}\n")),
    ("websocket without version", _ws(Sec_WebSocket_Version=None)),
    ("websocket version 8", _ws(Sec_WebSocket_Version="8")),
    ("websocket with a body", _ws(extra="Content-Length: 2\n")),
    ("websocket with a chunked body", _ws(extra="Transfer-Encoding: chunked\n")),
]


@pytest.mark.parametrize("data", [d for _, d in UPGRADE_REFUSALS], ids=[n for n, _ in UPGRADE_REFUSALS])
def test_every_upgrade_but_a_complete_websocket_handshake_is_refused(data: bytes) -> None:
    error = http_error(data)
    assert error.code == HttpErrorCode.HTTP_UPGRADE_REFUSED and error.message, error
    assert http_error(b"".join(bytes([b]) for b in data)) == error


def test_the_h2c_refusal_says_why() -> None:
    message = http_error(_ws(Upgrade="h2c")).message
    assert "'h2c' refused" in message and "only a WebSocket upgrade" in message


def test_a_websocket_handshake_is_refused_after_another_request() -> None:
    # The server's answer must be the first bytes it sends: then no body an earlier request made it send can
    # pose as the 101.
    events = events_of(request("GET / HTTP/1.1\nHost: ws.example\n\n") + _ws())
    assert heads(events)[0].host == "ws.example"
    assert isinstance(events[-1], HttpError) and events[-1].code == HttpErrorCode.HTTP_UPGRADE_REFUSED
    assert "first request" in events[-1].message


@pytest.mark.parametrize(
    "head",
    [
        "GET / HTTP/1.1\nHost: a.com\nConnection: upgrade\n\n",  # no Upgrade: nothing to switch to
        "GET / HTTP/1.1\nHost: a.com\nConnection: Upgrade, HTTP2-Settings\nHTTP2-Settings: AAMAAABk\n\n",
    ],
)
def test_connection_upgrade_alone_is_an_ordinary_request(head: str) -> None:
    events = events_of(request(head) + request("GET / HTTP/1.1\nHost: b.com\n\n"))
    assert [h.host for h in heads(events)] == ["a.com", "b.com"]
    assert not any(isinstance(e, AnswerAwaited | HttpError) for e in events)


@pytest.mark.parametrize("expect", ["100-continue", "100-CONTINUE", "something-else"])
@pytest.mark.parametrize("framing", ["Content-Length: 4", "Transfer-Encoding: chunked"])
def test_expect_holds_the_body_until_the_server_answered(expect: str, framing: str) -> None:
    tracker = HttpRequestTracker()
    head = request(f"PUT /f HTTP/1.1\nHost: a.com\nExpect: {expect}\n{framing}\n\n")
    body = b"data" if framing.startswith("Content") else b"4\r\ndata\r\n0\r\n\r\n"
    smuggled = request("GET / HTTP/1.1\nHost: b.com\n\n")
    events = tracker.feed(head + body + smuggled)
    assert [type(e) for e in events] == [RequestHead, AnswerAwaited]
    assert events[1] == AnswerAwaited(len(head), Awaiting.CONTINUE)
    assert tracker.offset == len(head)
    tracker.answered(Answer.RESUME)  # 100 Continue (or no answer in time): the body goes on as a body
    events = tracker.feed(body + smuggled)
    assert [type(e) for e in events] == [RequestEnd, RequestHead, RequestEnd, NeedMore]
    assert events[0] == RequestEnd(len(head) + len(body), 4) and events[1].host == "b.com"  # type: ignore[union-attr]


def test_expect_answered_with_a_final_status_ends_the_checking() -> None:
    tracker = HttpRequestTracker()
    tracker.feed(request("POST /f HTTP/1.1\nHost: a.com\nExpect: 100-continue\nContent-Length: 4\n\n"))
    tracker.answered(Answer.CLOSE)
    with pytest.raises(RuntimeError):
        tracker.feed(b"data")
    with pytest.raises(RuntimeError):
        tracker.answered(Answer.RESUME)


def test_expect_cannot_switch_protocols() -> None:
    tracker = HttpRequestTracker()
    tracker.feed(request("POST /f HTTP/1.1\nHost: a.com\nExpect: 100-continue\nContent-Length: 4\n\n"))
    with pytest.raises(ValueError):
        tracker.answered(Answer.SWITCH)


def test_expect_without_a_body_holds_nothing() -> None:
    events = events_of(request("GET / HTTP/1.1\nHost: a.com\nExpect: 100-continue\n\nGET / HTTP/1.1\nHost: b\n\n"))
    assert [h.host for h in heads(events)] == ["a.com", "b"]
    assert not any(isinstance(e, AnswerAwaited) for e in events)


@pytest.mark.parametrize(
    "earlier", ["GET / HTTP/1.1\nHost: a.com\n\n", "POST / HTTP/1.1\nHost: a.com\nExpect: 100-continue\n\n"]
)
def test_expect_with_a_body_behind_earlier_requests_ends_the_connection_before_it(earlier: str) -> None:
    # The server's next bytes may be an earlier request's response (or a 100 its Expect drew), not this answer.
    first = request(earlier)
    tracker = HttpRequestTracker()
    events = tracker.feed(first + request("PUT /f HTTP/1.1\nHost: a.com\nExpect: 100-continue\nContent-Length: 4\n\n"))
    assert [type(e) for e in events] == [RequestHead, RequestEnd, RequestHead, EndsBefore]
    assert isinstance(events[-1], EndsBefore) and events[-1].offset == len(first)
    with pytest.raises(RuntimeError):
        tracker.feed(b"data")


def _answer(awaiting: Awaiting, pieces: list[bytes]) -> list[Answer | HttpError | None]:
    watch = ServerAnswer(awaiting, KEY if awaiting is Awaiting.UPGRADE else None, max_head_size=16384)
    return [watch.feed(piece) for piece in pieces]


@pytest.mark.parametrize(
    ("pieces", "answer"),
    [
        ([SWITCHED + b"\x81\x00"], Answer.SWITCH),
        ([bytes([b]) for b in SWITCHED], Answer.SWITCH),
        ([SWITCHED.replace(b"websocket", b"WebSocket").replace(b"Upgrade\r\nSec", b"upgrade\r\nSec")], Answer.SWITCH),
        ([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" + SWITCHED], Answer.SWITCH),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], Answer.RESUME),
        ([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 426 Upgrade Required\r\n\r\n"], Answer.RESUME),
        ([b"HTTP/1.1 101 Switching"], None),
    ],
)
def test_the_answer_to_a_websocket_handshake(pieces: list[bytes], answer: Answer | None) -> None:
    results = _answer(Awaiting.UPGRADE, pieces)
    assert results[-1] is answer and all(r is None for r in results[:-1])


@pytest.mark.parametrize(
    ("answer", "code", "says"),
    [
        (SWITCHED.replace(b"Upgrade: websocket", b"Upgrade: h2c"), "HTTP_UPGRADE_REFUSED", "'h2c', not to websocket"),
        (SWITCHED.replace(b"Upgrade: websocket", b"Upgrade: websocket, h2c"), "HTTP_UPGRADE_REFUSED", "not to"),
        (SWITCHED.replace(b"Upgrade: websocket\r\n", b""), "HTTP_UPGRADE_REFUSED", "no protocol"),
        (SWITCHED.replace(b"Connection: Upgrade\r\n", b""), "HTTP_UPGRADE_REFUSED", "Connection"),
        (SWITCHED.replace(b"s3pP", b"AAAA"), "HTTP_UPGRADE_REFUSED", "Sec-WebSocket-Key"),
        (
            SWITCHED.replace(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", b""),
            "HTTP_UPGRADE_REFUSED",
            "Key",
        ),
        (SWITCHED[:-2] + b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n", "HTTP_UPGRADE_REFUSED", "Key"),
        (b"SSH-2.0-x\r\n\r\n", "HTTP_BAD_RESPONSE", "status line"),
        (b"HTTP/1.1 1O1 x\r\n\r\n", "HTTP_BAD_RESPONSE", "status line"),
        (b"HTTP/2 101\r\n\r\n", "HTTP_BAD_RESPONSE", "status line"),
        (b"HTTP/1.1 101 x\r\nbad line\r\n\r\n", "HTTP_BAD_RESPONSE", "header line"),
        (b"HTTP/1.1 101 x\r\n" + b"X: y\r\n" * 5000, "HTTP_BAD_RESPONSE", "over 16384"),
    ],
)
def test_a_101_that_is_not_a_websocket_switch_is_refused(answer: bytes, code: str, says: str) -> None:
    [result] = _answer(Awaiting.UPGRADE, [answer])
    assert isinstance(result, HttpError) and result.code == code and says in result.message, result


@pytest.mark.parametrize(
    ("pieces", "answer"),
    [
        ([b"HTTP/1.1 100 Continue\r\n\r\n"], Answer.RESUME),
        ([b"HTTP/1.1 100 Continue\r", b"\n\r\n"], Answer.RESUME),
        ([b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"], Answer.RESUME),
        ([b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n"], Answer.CLOSE),
        ([b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope!"], Answer.CLOSE),
        ([b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.0 200 OK\r\n\r\n"], Answer.CLOSE),
        ([b"HTTP/1.1 100 Cont"], None),
    ],
)
def test_the_answer_to_expect(pieces: list[bytes], answer: Answer | None) -> None:
    results = _answer(Awaiting.CONTINUE, pieces)
    assert results[-1] is answer and all(r is None for r in results[:-1])


def test_a_101_for_a_request_that_did_not_ask_to_upgrade_is_refused() -> None:
    [result] = _answer(Awaiting.CONTINUE, [SWITCHED])
    assert isinstance(result, HttpError) and result.code == HttpErrorCode.HTTP_UPGRADE_REFUSED
    assert "did not ask to upgrade" in result.message


def test_no_answer_and_the_end_of_the_servers_stream() -> None:
    expect = ServerAnswer(Awaiting.CONTINUE)
    assert expect.timeout == CONTINUE_TIMEOUT and expect.timed_out() is Answer.RESUME
    assert expect.closed() is Answer.CLOSE
    upgrade = ServerAnswer(Awaiting.UPGRADE, KEY)
    assert upgrade.timeout is None and upgrade.closed() is Answer.CLOSE
    with pytest.raises(RuntimeError):
        upgrade.timed_out()  # a WebSocket handshake waits for the server (the idle timeout bounds it)
    with pytest.raises(ValueError):
        ServerAnswer(Awaiting.UPGRADE)


# --------------------------------------------------------------------------- HTTP: bounds


def test_head_size_bound() -> None:
    filler = "".join(f"X-F{i}: {'v' * 300}\n" for i in range(99))
    small_enough = request(f"GET / HTTP/1.1\nHost: a.com\n{filler}\n")
    assert len(small_enough) <= 32 * 1024
    assert heads(events_of(small_enough))[0].host == "a.com"
    too_big = request(f"GET / HTTP/1.1\nHost: a.com\n{filler}X-Big: {'v' * 3000}\n\n")
    assert http_error(too_big).code == HttpErrorCode.HTTP_HEAD_TOO_LARGE
    # Refused before the end of the head arrives, and never holding more than the bound.
    tracker = HttpRequestTracker()
    peak = 0
    error = None
    for i in range(0, len(too_big), 100):
        events = tracker.feed(too_big[i : i + 100])
        peak = max(peak, tracker.buffered)
        if isinstance(events[-1], HttpError):
            error = events[-1]
            break
    assert error is not None
    assert error.code == HttpErrorCode.HTTP_HEAD_TOO_LARGE
    assert i + 100 < len(too_big)
    assert peak <= 32 * 1024


def test_head_without_end_is_bounded() -> None:
    tracker = HttpRequestTracker(max_head_size=1024, max_line_length=100)
    tracker.feed(b"GET / HTTP/1.1\r\n")
    for _ in range(20):
        events = tracker.feed(b"X: " + b"v" * 50 + b"\r\n")
        if isinstance(events[-1], HttpError):
            break
        assert tracker.buffered <= 1024
    assert isinstance(events[-1], HttpError)
    assert events[-1].code == HttpErrorCode.HTTP_HEAD_TOO_LARGE


def test_header_count_bound() -> None:
    def with_headers(count: int) -> bytes:
        return request("GET / HTTP/1.1\nHost: a.com\n" + "".join(f"X-{i}: v\n" for i in range(count - 1)) + "\n")

    assert heads(events_of(with_headers(100)))
    assert http_error(with_headers(101)).code == HttpErrorCode.HTTP_TOO_MANY_HEADERS
    assert http_error(with_headers(11), max_headers=10).code == HttpErrorCode.HTTP_TOO_MANY_HEADERS


def test_line_length_bound() -> None:
    ok = request(f"GET /{'a' * 8000} HTTP/1.1\nHost: a.com\n\n")
    assert heads(events_of(ok))
    long_target = request(f"GET /{'a' * 9000} HTTP/1.1\nHost: a.com\n\n")
    assert http_error(long_target).code == HttpErrorCode.HTTP_LINE_TOO_LONG
    long_header = request(f"GET / HTTP/1.1\nHost: a.com\nX: {'a' * 200}\n\n")
    assert http_error(long_header, max_line_length=100).code == HttpErrorCode.HTTP_LINE_TOO_LONG
    # No newline at all: refused once the line is too long, not when the head bound is reached.
    assert http_error(b"GET /" + b"a" * 9000).code == HttpErrorCode.HTTP_LINE_TOO_LONG
    long_chunk_ext = request(
        "POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\n\n", b"1;" + b"e" * 9000 + b"\r\n"
    )
    assert http_error(long_chunk_ext).code == HttpErrorCode.HTTP_LINE_TOO_LONG


def test_trailer_bounds() -> None:
    trailers = "".join(f"T-{i}: v\n" for i in range(101))
    data = request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\n\n", b"0\r\n") + request(trailers + "\n")
    assert http_error(data).code == HttpErrorCode.HTTP_TOO_MANY_HEADERS
    folded = request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\n\n", b"0\r\nT: a\r\n b\r\n\r\n")
    assert http_error(folded).code == HttpErrorCode.HTTP_OBS_FOLD
    big = request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\n\n", b"0\r\n")
    big += request("".join(f"T-{i}: {'v' * 1000}\n" for i in range(40)) + "\n")
    assert http_error(big).code == HttpErrorCode.HTTP_HEAD_TOO_LARGE


def test_partial_trailer_line_is_bounded() -> None:
    tracker = HttpRequestTracker(max_head_size=1024, max_line_length=1000)
    tracker.feed(request("POST / HTTP/1.1\nHost: a.com\nTransfer-Encoding: chunked\n\n0\n"))
    assert tracker.feed(b"T: " + b"v" * 900 + b"\r\n") == [NEED_MORE]
    (error,) = tracker.feed(b"U: " + b"v" * 200)  # no line end yet
    assert isinstance(error, HttpError)
    assert error.code == HttpErrorCode.HTTP_HEAD_TOO_LARGE
    assert "trailer" in error.message


def test_bodies_are_counted_not_buffered() -> None:
    size = 10 * 1024 * 1024
    tracker = HttpRequestTracker()
    tracker.feed(request(f"POST / HTTP/1.1\nHost: a.com\nContent-Length: {size}\n\n"))
    chunk = b"\x00" * 65536
    for _ in range(size // len(chunk) - 1):
        assert tracker.feed(chunk) == [NEED_MORE]
        assert tracker.buffered == 0
    events = tracker.feed(chunk + request("GET / HTTP/1.1\nHost: b.com\n\n"))
    assert isinstance(events[0], RequestEnd)
    assert events[0].body_length == size
    assert isinstance(events[1], RequestHead)
    assert events[1].host == "b.com"
    assert tracker.offset == events[0].offset + len(request("GET / HTTP/1.1\nHost: b.com\n\n"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 20))
def test_arbitrary_bytes_yield_events_not_exceptions(data: bytes, step: int) -> None:
    tracker = HttpRequestTracker(max_head_size=256, max_line_length=64)
    for i in range(0, len(data), step):
        for event in tracker.feed(data[i : i + step]):
            assert isinstance(event, RequestHead | RequestEnd | AnswerAwaited | NeedMore | HttpError)
        assert tracker.buffered <= 256 + 65
        if tracker.awaiting_answer:
            tracker.answered(Answer.RESUME)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_keep_alive_streams_never_raise(data: st.DataObject) -> None:
    ops = data.draw(_OPS)
    stream = _mutate(KEEP_ALIVE, ops)
    whole = events_of(stream)
    step = data.draw(st.integers(1, 30))
    assert events_of([stream[i : i + step] for i in range(0, len(stream), step)]) == whole


# --------------------------------------------------------------------------- HTTP 403


class _FakeSocket:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def read_response(raw: bytes) -> tuple[http.client.HTTPResponse, bytes]:
    response = http.client.HTTPResponse(_FakeSocket(raw))  # type: ignore[arg-type]
    response.begin()
    return response, response.read()


def test_forbidden_is_valid_http() -> None:
    response, body = read_response(http_forbidden("host evil.example is not in the allowlist", "egress.allow_hosts"))
    assert response.status == 403
    assert response.reason == "Forbidden"
    assert response.version == 11
    assert response.getheader("Content-Type") == "text/plain"
    assert response.getheader("X-Gateway-Reason") == "host evil.example is not in the allowlist"
    assert response.getheader("X-Gateway-Rule") == "egress.allow_hosts"
    assert response.getheader("Connection") == "close"
    assert response.will_close
    assert body == b"Blocked by sandbox egress policy: host evil.example is not in the allowlist\n"
    assert int(response.getheader("Content-Length") or -1) == len(body)


def test_forbidden_reason_cannot_inject_headers() -> None:
    raw = http_forbidden("bad\r\nSet-Cookie: session=stolen\r\n\r\n<html>é\x00", "rule\nX-Evil: 1")
    response, body = read_response(raw)
    assert response.getheader("Set-Cookie") is None
    assert response.getheader("X-Evil") is None
    reason = response.getheader("X-Gateway-Reason") or ""
    assert reason == "bad Set-Cookie: session=stolen <html>??"
    assert all(0x20 <= ord(ch) < 0x7F for ch in reason)
    assert body.count(b"\n") == 1


def test_forbidden_reason_is_capped() -> None:
    response, body = read_response(http_forbidden("x" * 1000, ""))
    assert response.getheader("X-Gateway-Reason") == "x" * 200
    assert response.getheader("X-Gateway-Rule") is None
    assert body == b"Blocked by sandbox egress policy: " + b"x" * 200 + b"\n"


def test_forbidden_with_empty_reason_still_says_something() -> None:
    response, _ = read_response(http_forbidden(" \r\n ", "r"))
    assert response.getheader("X-Gateway-Reason") == "denied"


@given(st.text(max_size=400), st.text(max_size=50))
def test_forbidden_is_always_parseable(reason: str, rule: str) -> None:
    response, body = read_response(http_forbidden(reason, rule))
    assert response.status == 403
    header = response.getheader("X-Gateway-Reason") or ""
    assert 0 < len(header) <= 200
    assert header == (sanitize_reason(reason) or "denied")
    assert body == f"Blocked by sandbox egress policy: {header}\n".encode()
