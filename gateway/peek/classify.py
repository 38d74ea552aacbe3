"""Classification of a connection's first bytes: TLS, HTTP/1.x or opaque (pure, no I/O).

`classify(data)` -> `TrafficKind.TLS | HTTP | OPAQUE`, or `NeedMore` while undecidable: anything
some HTTP/1 server could read as a request line is HTTP (and then parsed strictly by
`gateway.peek.http1`), so that no request reaches an address the sandbox may reach "opaquely"
without its Host being checked.

Like the rest of `gateway.peek`, nothing here touches a socket, a clock or asyncio, in the style
of h11 / mitmproxy's layers: the same code is exercised by unit tests byte by byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not decidable yet: feed more bytes (or give up when the engine's deadline passes)."""


#: The one instance every parser returns (compare with `is` or `isinstance`).
NEED_MORE: Final = NeedMore()


class TrafficKind(StrEnum):
    TLS = "tls"
    HTTP = "http"
    OPAQUE = "opaque"


#: Longest method token the fast path of `classify` recognises; methods in use are far shorter.
_MAX_METHOD_LENGTH: Final = 24
#: `classify` always decides once it has this many bytes (the request line bound of `HttpRequestTracker`).
CLASSIFY_MAX_BYTES: Final = 8 * 1024
_METHOD_BYTES: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
#: The token characters of RFC 9110 5.6.2 (a method, a header name), as a regex character class body.
TCHAR: Final = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
# What some HTTP/1 parser skips before a request line or splits its words at: RFC 9112 3 lets recipients split
# at any whitespace, and Python's str.split() of a latin-1 line also splits at \x1c-\x1f, \x85 and \xa0.
_LENIENT_SPACE: Final = rb" \t\x0b\x0c\r\x1c-\x1f\x85\xa0"
_LENIENT_START_RE: Final = re.compile(
    rb"[\n" + _LENIENT_SPACE + rb"]*([" + TCHAR + rb"]{0,%d})(.?)" % (_MAX_METHOD_LENGTH + 1), re.S
)
_LENIENT_SEPARATOR_RE: Final = re.compile(rb"[" + _LENIENT_SPACE + rb"]")
# Bytes no text protocol line holds (TAB, LF, VT, FF, CR and \x1c-\x1f are whitespace above): binary traffic.
_CONTROL_RE: Final = re.compile(rb"[\x00-\x08\x0e-\x1b\x7f]")
_VERSION_WORD_RE: Final = re.compile(rb"http/", re.IGNORECASE)


def classify(data: bytes | bytearray | memoryview) -> TrafficKind | NeedMore:
    """What the first bytes a client sent look like.

    TLS: a handshake record header (0x16, version 0x03 0x00..0x04). HTTP/1.x: at once for a
    registered method (upper-case letters, '-', '_') and a space; otherwise whatever a lenient
    HTTP server could still take for a request line, so that the strict tracker refuses it
    instead of it being relayed unchecked: blank lines or whitespace first, then a token of any
    case (at most `_MAX_METHOD_LENGTH` bytes, longer than any method), a whitespace byte and,
    by the end of that line, `HTTP/` in any case (`get / HTTP/1.1`,
    `GET\t/\tHTTP/1.1`, `\r\nGET ...`). Banners such as `SSH-2.0-OpenSSH_9.6 ...` and
    binary protocols stay opaque: a first word that is no token, a control byte in the first
    line, or a first line without `HTTP/`. Anything else, including SSLv2-compatible hellos, is
    OPAQUE. Waits for the first line's end (a text line without one is undecidable) and decides
    with at most `CLASSIFY_MAX_BYTES` bytes (a longer line is HTTP: the tracker refuses it).
    """
    n = len(data)
    if n == 0:
        return NEED_MORE
    first = data[0]
    if first == 0x16:
        if n >= 2 and data[1] != 0x03:
            return TrafficKind.OPAQUE
        if n >= 3:
            return TrafficKind.TLS if data[2] <= 0x04 else TrafficKind.OPAQUE
        return NEED_MORE
    if first in _METHOD_BYTES and first not in b"-_":
        for k in range(1, min(n, _MAX_METHOD_LENGTH + 1)):
            byte = data[k]
            if byte == 0x20:
                return TrafficKind.HTTP
            if byte not in _METHOD_BYTES:
                break
    return _classify_line(bytes(data[:CLASSIFY_MAX_BYTES]))


def _classify_line(view: bytes) -> TrafficKind | NeedMore:
    """The lenient request-line test of `classify`, on at most `CLASSIFY_MAX_BYTES` bytes."""
    undecided = NEED_MORE if len(view) < CLASSIFY_MAX_BYTES else TrafficKind.HTTP
    start = _LENIENT_START_RE.match(view)
    assert start is not None  # every part of the pattern may be empty
    word, after = start.group(1), start.group(2)
    if len(word) > _MAX_METHOD_LENGTH:
        return TrafficKind.OPAQUE  # longer than any method
    if not after:
        return undecided  # the bytes end before the first word did
    if not word or _LENIENT_SEPARATOR_RE.fullmatch(after) is None:
        return TrafficKind.OPAQUE  # the first word is no method: no HTTP server takes this for a request
    rest = start.end(2) - 1
    end = view.find(b"\n", rest)
    line = view[rest : end if end >= 0 else len(view)]
    if _CONTROL_RE.search(line) is not None:
        return TrafficKind.OPAQUE
    if end < 0:
        return undecided
    return TrafficKind.HTTP if _VERSION_WORD_RE.search(line) is not None else TrafficKind.OPAQUE
