"""The TLS ClientHello as the egress engine's peek reads it, and the alerts it denies with (pure, no I/O).

`ClientHelloParser.feed(data)` -> `NeedMore | ClientHello | PeekError`: the TLS ClientHello
reassembled across records and segments (post-quantum key shares make hellos larger than one
TCP segment; 1-byte records are legal and handled), with SNI, ALPN, supported_versions and the
presence of Encrypted Client Hello. `tls_alert(...)`: the explicit denial, as bytes to write.

The parser keeps offsets, so a feed costs time proportional to the new bytes only, and its
buffer is bounded by the handshake bound. Parsing is deliberately strict: every length field is
checked against what remains, duplicate extensions are refused (RFC 8446 4.2), and the hello
must end exactly at a record boundary (RFC 8446 5.1). A refusal carries a stable `code` and a
human `message`. The SNI is checked with the one hostname grammar of `gateway.hostnames`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

from gateway.hostnames import hostname_problem, is_ip_literal, normalize_query_name
from gateway.peek.classify import NEED_MORE, NeedMore


class TlsErrorCode(StrEnum):
    TLS_MALFORMED = "TLS_MALFORMED"
    TLS_TOO_LARGE = "TLS_TOO_LARGE"
    TLS_NOT_CLIENT_HELLO = "TLS_NOT_CLIENT_HELLO"
    TLS_SNI_INVALID = "TLS_SNI_INVALID"


@dataclass(frozen=True, slots=True)
class PeekError:
    """The first bytes of a TLS connection are not an acceptable ClientHello."""

    code: TlsErrorCode
    message: str


# --------------------------------------------------------------------------- TLS ClientHello

#: Default bound on the ClientHello handshake message body.
MAX_HANDSHAKE_SIZE: Final = 16 * 1024
_MAX_RECORD: Final = 1 << 14  # TLSPlaintext.length bound (RFC 8446 5.1)

_EXT_SERVER_NAME: Final = 0x0000
_EXT_ALPN: Final = 0x0010
_EXT_PRE_SHARED_KEY: Final = 0x0029
_EXT_SUPPORTED_VERSIONS: Final = 0x002B
_EXT_ECH: Final = 0xFE0D


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the policy needs from a ClientHello.

    `sni` is lower-cased without a trailing dot, None when the client sent no
    server_name. With `has_ech` the SNI is the ECH *outer* (public) name: the real
    destination is encrypted and not visible here.
    """

    sni: str | None
    alpn: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    has_ech: bool
    legacy_version: int
    record_version: int
    extension_types: tuple[int, ...]
    handshake_length: int


class _TlsFail(Exception):
    def __init__(self, code: TlsErrorCode, message: str) -> None:
        self.code = code
        self.message = message


def _malformed(message: str) -> _TlsFail:
    return _TlsFail(TlsErrorCode.TLS_MALFORMED, message)


def _sni_invalid(message: str) -> _TlsFail:
    return _TlsFail(TlsErrorCode.TLS_SNI_INVALID, message)


class ClientHelloParser:
    """Incremental ClientHello reader: feed it the client's bytes as they arrive.

    Returns NEED_MORE until the hello is complete, then the ClientHello or a PeekError;
    the result is final (later feeds return it again without looking at the bytes).
    Holds at most `max_handshake_size` + 4 handshake bytes and one 5-byte record header.
    """

    __slots__ = ("_hdr", "_hs", "_hs_len", "_max", "_rec_left", "_record_version", "_records", "_result")

    def __init__(self, max_handshake_size: int = MAX_HANDSHAKE_SIZE) -> None:
        if max_handshake_size < 35:
            raise ValueError("max_handshake_size cannot hold even an empty ClientHello")
        self._max = max_handshake_size
        self._hdr = bytearray()
        self._hs = bytearray()
        self._hs_len = -1
        self._rec_left = 0
        self._records = 0
        self._record_version = 0
        self._result: ClientHello | PeekError | None = None

    @property
    def buffered(self) -> int:
        """Bytes currently held (record header fragment + handshake message so far)."""
        return len(self._hdr) + len(self._hs)

    def feed(self, data: bytes | bytearray | memoryview) -> NeedMore | ClientHello | PeekError:
        if self._result is not None:
            return self._result
        try:
            result = self._feed(memoryview(data).cast("B"))
        except _TlsFail as fail:
            result = PeekError(fail.code, fail.message)
        if not isinstance(result, NeedMore):
            self._result = result
            self._hs = bytearray()
            self._hdr = bytearray()
        return result

    def _check_header(self, hdr: bytearray) -> None:
        first = self._records == 0
        if hdr[0] != 0x16:
            if first:
                raise _TlsFail(TlsErrorCode.TLS_NOT_CLIENT_HELLO, f"first TLS record has content type {hdr[0]}, not 22")
            raise _malformed(f"record of content type {hdr[0]} interleaved with the ClientHello's handshake records")
        if len(hdr) >= 2 and hdr[1] != 0x03:
            raise _malformed(f"record version major byte is {hdr[1]}, not 3")
        if len(hdr) >= 3 and hdr[2] > 0x04:
            raise _malformed(f"record version 0x03{hdr[2]:02x} is not a TLS version")

    def _feed(self, data: memoryview) -> NeedMore | ClientHello | PeekError:
        i = 0
        n = len(data)
        hdr = self._hdr
        hs = self._hs
        while i < n:
            left = self._rec_left
            if left == 0:
                take = min(5 - len(hdr), n - i)
                hdr += data[i : i + take]
                i += take
                self._check_header(hdr)
                if len(hdr) < 5:
                    break
                length = hdr[3] << 8 | hdr[4]
                if length == 0:
                    raise _malformed("zero-length handshake record (forbidden by RFC 8446 5.1)")
                if length > _MAX_RECORD:
                    raise _malformed(f"record of {length} bytes exceeds the 16384-byte limit")
                if self._records == 0:
                    self._record_version = hdr[1] << 8 | hdr[2]
                self._records += 1
                self._rec_left = length
                hdr.clear()
                continue
            take = min(left, n - i)
            if self._hs_len < 0:
                take = min(take, 4 - len(hs))
                hs += data[i : i + take]
                i += take
                self._rec_left = left - take
                if hs[0] != 0x01:
                    raise _TlsFail(
                        TlsErrorCode.TLS_NOT_CLIENT_HELLO,
                        f"first handshake message has type {hs[0]}, not ClientHello (1)",
                    )
                if len(hs) == 4:
                    self._hs_len = hs[1] << 16 | hs[2] << 8 | hs[3]
                    if self._hs_len > self._max:
                        raise _TlsFail(
                            TlsErrorCode.TLS_TOO_LARGE,
                            f"ClientHello claims {self._hs_len} bytes, more than the {self._max}-byte bound",
                        )
                    if self._hs_len < 35:
                        raise _malformed(f"ClientHello of {self._hs_len} bytes is shorter than its fixed fields")
                continue
            missing = self._hs_len + 4 - len(hs)
            if take > missing:
                raise _malformed("data follows the ClientHello inside its last record (RFC 8446 5.1)")
            hs += data[i : i + take]
            i += take
            self._rec_left = left - take
            if take == missing:
                if self._rec_left:
                    raise _malformed("data follows the ClientHello inside its last record (RFC 8446 5.1)")
                return _parse_hello_body(bytes(hs[4:]), self._record_version)
        return NEED_MORE


def _parse_hello_body(b: bytes, record_version: int) -> ClientHello:
    n = len(b)  # at least 35: checked from the handshake header
    if b[0] != 0x03:
        raise _malformed(f"ClientHello legacy_version 0x{b[0]:02x}{b[1]:02x} is not a TLS version")
    legacy_version = b[0] << 8 | b[1]
    sid_len = b[34]
    if sid_len > 32:
        raise _malformed(f"legacy_session_id of {sid_len} bytes (at most 32)")
    i = 35 + sid_len
    if i + 2 > n:
        raise _malformed("ClientHello ends inside legacy_session_id or before cipher_suites")
    cs_len = b[i] << 8 | b[i + 1]
    i += 2
    if cs_len < 2 or cs_len & 1:
        raise _malformed(f"cipher_suites length {cs_len} is not a positive even number")
    if i + cs_len > n:
        raise _malformed(f"cipher_suites length {cs_len} exceeds the {n - i} bytes that remain")
    i += cs_len
    if i >= n:
        raise _malformed("ClientHello ends before legacy_compression_methods")
    cm_len = b[i]
    i += 1
    if cm_len < 1:
        raise _malformed("legacy_compression_methods is empty")
    if i + cm_len > n:
        raise _malformed(f"legacy_compression_methods length {cm_len} exceeds the {n - i} bytes that remain")
    i += cm_len
    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = ()
    has_ech = False
    types: list[int] = []
    if i < n:
        if i + 2 > n:
            raise _malformed("one stray byte where the extensions length should be")
        ext_total = b[i] << 8 | b[i + 1]
        i += 2
        if i + ext_total != n:
            raise _malformed(
                f"extensions length {ext_total} does not match the {n - i} bytes that remain in the ClientHello"
            )
        seen: set[int] = set()
        while i < n:
            if i + 4 > n:
                raise _malformed("extensions block ends inside an extension header")
            ext_type = b[i] << 8 | b[i + 1]
            ext_len = b[i + 2] << 8 | b[i + 3]
            i += 4
            end = i + ext_len
            if end > n:
                raise _malformed(f"extension {ext_type} length {ext_len} exceeds the {n - i} bytes that remain")
            if ext_type in seen:
                raise _malformed(f"extension {ext_type} appears twice (RFC 8446 4.2)")
            if _EXT_PRE_SHARED_KEY in seen:
                raise _malformed("pre_shared_key is not the last extension (RFC 8446 4.2.11)")
            seen.add(ext_type)
            types.append(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                sni = _parse_sni(b, i, end)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(b, i, end)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_versions(b, i, end)
            elif ext_type == _EXT_ECH:
                has_ech = True
            i = end
    return ClientHello(
        sni=sni,
        alpn=alpn,
        supported_versions=versions,
        has_ech=has_ech,
        legacy_version=legacy_version,
        record_version=record_version,
        extension_types=tuple(types),
        handshake_length=n,
    )


def _parse_sni(b: bytes, i: int, end: int) -> str | None:
    if end - i < 2:
        raise _malformed("server_name extension is too short for its list length")
    list_len = b[i] << 8 | b[i + 1]
    i += 2
    if list_len == 0 or i + list_len != end:
        raise _malformed(f"server_name list length {list_len} does not match the extension's {end - i} bytes")
    host: bytes | None = None
    while i < end:
        if i + 3 > end:
            raise _malformed("server_name list ends inside an entry header")
        name_type = b[i]
        name_len = b[i + 1] << 8 | b[i + 2]
        i += 3
        if i + name_len > end:
            raise _malformed(f"server name length {name_len} exceeds the {end - i} bytes that remain")
        if name_type == 0:
            if host is not None:
                raise _sni_invalid("more than one host_name in server_name (RFC 6066 3)")
            host = b[i : i + name_len]
        i += name_len
    if host is None:
        return None
    if not host:
        raise _sni_invalid("SNI host_name is empty")
    if b"\x00" in host:
        raise _sni_invalid("SNI host_name contains a NUL byte")
    if not host.isascii():
        raise _sni_invalid("SNI host_name is not ASCII (internationalised names travel as punycode)")
    name = normalize_query_name(host.decode("ascii"))
    problem = hostname_problem(name)
    if problem is not None:
        if is_ip_literal(name):
            problem += ", which RFC 6066 3 forbids in SNI"
        raise _sni_invalid(f"SNI {name[:80]!r} {problem}")
    return name


def _parse_alpn(b: bytes, i: int, end: int) -> tuple[bytes, ...]:
    if end - i < 2:
        raise _malformed("ALPN extension is too short for its list length")
    list_len = b[i] << 8 | b[i + 1]
    i += 2
    if list_len < 2 or i + list_len != end:
        raise _malformed(f"ALPN list length {list_len} does not match the extension's {end - i} bytes")
    out: list[bytes] = []
    while i < end:
        plen = b[i]
        i += 1
        if plen == 0 or i + plen > end:
            raise _malformed(f"ALPN protocol name length {plen} is empty or exceeds what remains")
        out.append(b[i : i + plen])
        i += plen
    return tuple(out)


def _parse_versions(b: bytes, i: int, end: int) -> tuple[int, ...]:
    if end - i < 1:
        raise _malformed("supported_versions extension is empty")
    vlen = b[i]
    i += 1
    if vlen < 2 or vlen & 1 or i + vlen != end:
        raise _malformed(f"supported_versions length {vlen} is odd, empty or does not match the extension")
    return tuple(b[k] << 8 | b[k + 1] for k in range(i, end, 2))


# --------------------------------------------------------------------------- TLS alert


class AlertDescription(IntEnum):
    HANDSHAKE_FAILURE = 40
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    INTERNAL_ERROR = 80
    UNRECOGNIZED_NAME = 112


def tls_alert(description: AlertDescription | int, record_version: int = 0x0303) -> bytes:
    """A fatal alert record (plaintext, before any key exchange), ready to write.

    Pass the client's `ClientHello.record_version` as `record_version`.
    """
    description = AlertDescription(description)
    if not 0x0300 <= record_version <= 0x0304:
        raise ValueError(f"record_version 0x{record_version:04x} is not a TLS version")
    return bytes((0x15, record_version >> 8, record_version & 0xFF, 0x00, 0x02, 0x02, description))
