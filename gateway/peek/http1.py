"""HTTP/1.x request heads on a plain-HTTP client->server stream, the server's answers, and the 403 (pure, no I/O).

`HttpRequestTracker.feed(data)` -> events for every request head on a plain-HTTP (keep-alive,
pipelined) client->server stream: message framing is followed (Content-Length, chunked) so that
the Host of EVERY request is reported. Only two things make it wait for the server: a WebSocket
handshake (the one upgrade allowed: h2c and every other protocol would carry requests past the
check) and a request with `Expect` and a body (whose body the server might otherwise read as a
request). `ServerAnswer` reads the server's answer: only a genuine WebSocket `101` leaves HTTP.
Both must be the first request on their connection (the server's next bytes are then its answer,
not an earlier response's); a later request with `Expect` and a body ends the connection before
it (`EndsBefore`). `http_forbidden(...)`: the explicit denial, as bytes to write.

Every buffer is bounded (one request head or one line; bodies are counted, never stored).
Anything two implementations could frame differently is refused rather than guessed at (request
smuggling): bare LF or bare CR line endings, obs-fold, whitespace before a header colon,
Content-Length together with Transfer-Encoding, differing Content-Lengths, a final coding other
than chunked, duplicate Host. A refusal carries a stable `code` and a human `message`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from gateway.hostnames import hostname_problem, normalize_query_name
from gateway.peek.classify import NEED_MORE, TCHAR, NeedMore

# --------------------------------------------------------------------------- HTTP/1.x

MAX_HEAD_SIZE: Final = 32 * 1024
MAX_HEADERS: Final = 100
MAX_LINE_LENGTH: Final = 8 * 1024


class HttpErrorCode(StrEnum):
    HTTP_MALFORMED = "HTTP_MALFORMED"
    HTTP_UNSUPPORTED_VERSION = "HTTP_UNSUPPORTED_VERSION"
    HTTP_CONNECT_REFUSED = "HTTP_CONNECT_REFUSED"
    HTTP_MISSING_HOST = "HTTP_MISSING_HOST"
    HTTP_DUPLICATE_HOST = "HTTP_DUPLICATE_HOST"
    HTTP_INVALID_HOST = "HTTP_INVALID_HOST"
    HTTP_TARGET_HOST_MISMATCH = "HTTP_TARGET_HOST_MISMATCH"
    HTTP_AMBIGUOUS_LENGTH = "HTTP_AMBIGUOUS_LENGTH"
    HTTP_INVALID_CONTENT_LENGTH = "HTTP_INVALID_CONTENT_LENGTH"
    HTTP_CONFLICTING_CONTENT_LENGTH = "HTTP_CONFLICTING_CONTENT_LENGTH"
    HTTP_INVALID_TRANSFER_ENCODING = "HTTP_INVALID_TRANSFER_ENCODING"
    HTTP_INVALID_CHUNK = "HTTP_INVALID_CHUNK"
    HTTP_BAD_LINE_ENDING = "HTTP_BAD_LINE_ENDING"
    HTTP_OBS_FOLD = "HTTP_OBS_FOLD"
    HTTP_INVALID_HEADER = "HTTP_INVALID_HEADER"
    HTTP_HEAD_TOO_LARGE = "HTTP_HEAD_TOO_LARGE"
    HTTP_TOO_MANY_HEADERS = "HTTP_TOO_MANY_HEADERS"
    HTTP_LINE_TOO_LONG = "HTTP_LINE_TOO_LONG"
    HTTP_UPGRADE_REFUSED = "HTTP_UPGRADE_REFUSED"
    HTTP_BAD_RESPONSE = "HTTP_BAD_RESPONSE"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A complete, validated request head.

    `headers` are (lower-cased name, value decoded as latin-1) in order. `host` is the
    authority's host lower-cased without a trailing dot (IPv6 without brackets, in
    canonical form), None only for an HTTP/1.0 request that names no host at all.
    `offset` is where the request line starts in the client->server stream.
    """

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    host: str | None
    port_from_host: int | None
    host_is_ip: bool
    offset: int


@dataclass(frozen=True, slots=True)
class RequestEnd:
    """The request that began with the previous RequestHead ends at stream `offset`."""

    offset: int
    body_length: int


class Awaiting(StrEnum):
    """What a held request waits for from the server."""

    UPGRADE = "upgrade"  # a WebSocket handshake: a genuine 101 makes the rest WebSocket
    CONTINUE = "continue"  # a request with Expect and a body: 100 Continue lets the body go


@dataclass(frozen=True, slots=True)
class AnswerAwaited:
    """Nothing from stream `offset` on is consumed until the caller reports the server's answer
    (`HttpRequestTracker.answered`, read with a `ServerAnswer`). For an upgrade `offset` is the request's
    end and `websocket_key` its Sec-WebSocket-Key; for `Expect` it is where the body starts."""

    offset: int
    awaiting: Awaiting
    websocket_key: str | None = None


@dataclass(frozen=True, slots=True)
class EndsBefore:
    """Nothing from stream `offset` on may go (terminal, not a refusal): the connection is to end once the server
    answered the requests before it; the client may send the request again on a new connection."""

    offset: int


@dataclass(frozen=True, slots=True)
class HttpError:
    """The stream is refused (terminal: later feeds return this same error)."""

    code: HttpErrorCode
    message: str


type HttpEvent = RequestHead | RequestEnd | AnswerAwaited | EndsBefore | NeedMore | HttpError


#: How long a request with `Expect` holds its body for the server's `100 Continue` before it goes anyway
#: (a server that ignores Expect waits for the body; curl's and Go's clients wait as long themselves).
CONTINUE_TIMEOUT: Final = 1.0
_WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer `key` with (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WEBSOCKET_GUID).digest()).decode("ascii")


class Answer(StrEnum):
    """What the server's answer means for the client bytes held behind a request."""

    SWITCH = "switch"  # a genuine WebSocket 101: the rest of the stream passes unparsed
    RESUME = "resume"  # check the held bytes as HTTP (an upgrade declined; 100 Continue or no answer in time)
    CLOSE = "close"  # forward nothing more from the client: the connection ends after the server's answer


class ServerAnswer:
    """Sans-I/O: the server's bytes after a held request in, what they mean out (`feed`: None while undecided).

    It only observes: the bytes are forwarded as they are (up to a refusal). The answer is read from the
    first bytes given, which must be the start of a response: an upgrade is refused unless it is the first
    request on its connection, so a response body an earlier request made the server send can never pose
    as the answer. Interim 1xx heads are skipped (for `Expect`, 100 is the answer).

    - UPGRADE: a 101 with `Upgrade: websocket`, `Connection: upgrade` and the Sec-WebSocket-Accept of the
      request's key is SWITCH, any other 101 a refusal (h2c, another protocol, a server that did not do
      the WebSocket handshake); a final status is RESUME (declined).
    - CONTINUE: 100 is RESUME; a final status CLOSE (the server answered without the body: whether it
      would read the body as a body or as the next request is not known); a 101 a refusal.
    - Either: a response head that cannot be read (or is over `max_head_size`) is a refusal; the
      server's end of stream (`closed`) is CLOSE; for CONTINUE, `timed_out` after `timeout` is RESUME.
    """

    __slots__ = ("_accept", "_buf", "_max", "awaiting")

    def __init__(
        self, awaiting: Awaiting, websocket_key: str | None = None, *, max_head_size: int = MAX_HEAD_SIZE
    ) -> None:
        if (awaiting is Awaiting.UPGRADE) != (websocket_key is not None):
            raise ValueError("a WebSocket key goes with an upgrade, and only there")
        self.awaiting = awaiting
        self._accept = websocket_accept(websocket_key) if websocket_key is not None else None
        self._buf = bytearray()
        self._max = max_head_size

    @property
    def timeout(self) -> float | None:
        """After this many seconds without an answer, `timed_out` answers (None: wait for the server)."""
        return CONTINUE_TIMEOUT if self.awaiting is Awaiting.CONTINUE else None

    def feed(self, data: bytes | bytearray | memoryview) -> Answer | HttpError | None:
        buf = self._buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max:
                    return _bad_response(f"the server's answer has a head over {self._max} bytes")
                return None
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or _RESPONSE_VERSION_RE.fullmatch(parts[0]) is None or not _STATUS_RE.fullmatch(parts[1]):
                return _bad_response(f"the server's answer starts {lines[0][:60]!r}, not with a status line")
            status = int(parts[1])
            if status == 101:
                return self._switched(lines[1:])
            if status == 100 and self.awaiting is Awaiting.CONTINUE:
                return Answer.RESUME
            if status >= 200:
                return Answer.RESUME if self.awaiting is Awaiting.UPGRADE else Answer.CLOSE

    def closed(self) -> Answer:
        """The server ended its stream before answering."""
        return Answer.CLOSE

    def timed_out(self) -> Answer:
        if self.awaiting is not Awaiting.CONTINUE:
            raise RuntimeError("only Expect has a deadline")
        return Answer.RESUME

    def _switched(self, lines: list[bytes]) -> Answer | HttpError:
        if self._accept is None:
            return _upgrade_refused("the server switched protocols (101) for a request that did not ask to upgrade")
        fields: dict[str, list[str]] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN_RE.match(name) is None:
                return _bad_response(f"invalid header line {line[:60]!r} in the server's 101")
            fields.setdefault(name.decode("ascii").lower(), []).append(value.strip(b" \t").decode("latin-1"))
        protocols = [p for value in fields.get("upgrade", []) for p in _split_list(value, lower=False)]
        if [p.lower() for p in protocols] != ["websocket"]:
            named = ", ".join(protocols) or "no protocol"
            return _upgrade_refused(f"the server switched to {named[:60]!r}, not to websocket")
        if "upgrade" not in [t for value in fields.get("connection", []) for t in _split_list(value)]:
            return _upgrade_refused("the server's 101 has no Connection: upgrade (RFC 6455 4.2.2)")
        if fields.get("sec-websocket-accept") != [self._accept]:
            return _upgrade_refused("the server's 101 does not answer the request's Sec-WebSocket-Key (RFC 6455 4.2.2)")
        return Answer.SWITCH


def _upgrade_refused(message: str) -> HttpError:
    return HttpError(HttpErrorCode.HTTP_UPGRADE_REFUSED, message)


def _bad_response(message: str) -> HttpError:
    return HttpError(HttpErrorCode.HTTP_BAD_RESPONSE, message)


_RESPONSE_VERSION_RE: Final = re.compile(rb"HTTP/1\.[0-9]")
_STATUS_RE: Final = re.compile(rb"[1-5][0-9][0-9]")


class _HttpFail(Exception):
    def __init__(self, code: HttpErrorCode, message: str) -> None:
        self.code = code
        self.message = message


_TOKEN_RE: Final = re.compile(rb"[" + TCHAR + rb"]+\Z")
_FIELD_NAME_RE: Final = re.compile(rb"[" + TCHAR + rb"]+:")
_NAME_SPACE_COLON_RE: Final = re.compile(rb"[" + TCHAR + rb"]+[ \t]+:")
_BAD_VALUE_CHAR_RE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_RE: Final = re.compile(rb"[\x21-\x7e]+\Z")
_VERSION_RE: Final = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_ABSOLUTE_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([/?].*)?\Z", re.S)
_QUOTED: Final = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE_RE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*["
    + TCHAR
    + rb"]+(?:[ \t]*=[ \t]*(?:["
    + TCHAR
    + rb"]+|"
    + _QUOTED
    + rb"))?)*)\Z"
)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

# Parser states.
_HEAD: Final = 0
_BODY: Final = 1
_CHUNK_SIZE: Final = 2
_CHUNK_DATA: Final = 3
_CHUNK_CRLF: Final = 4
_TRAILER: Final = 5
_PASS: Final = 6
_ERROR: Final = 7
_AWAITING: Final = 8
_CLOSED: Final = 9
_LINE_STATES: Final = frozenset((_HEAD, _CHUNK_SIZE, _TRAILER))
_STOPPED_STATES: Final = frozenset((_AWAITING, _CLOSED))


def _parse_authority(value: str, what: str) -> tuple[str, int | None, bool]:
    """`host[:port]` -> (host, port, is_ip). Raises HTTP_INVALID_HOST."""

    def bad(why: str) -> _HttpFail:
        return _HttpFail(HttpErrorCode.HTTP_INVALID_HOST, f"{what} {value[:100]!r} {why}")

    if not value.isascii():
        raise bad("is not ASCII (internationalised names travel as punycode)")
    if "@" in value:
        raise bad("contains user information")
    port: int | None = None
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise bad("has an unclosed '['")
        literal, rest = value[1:close], value[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise bad("has characters after the bracketed address")
            port = _parse_port(rest[1:])
            if port is None:
                raise bad("has an invalid port")
        if "%" in literal:
            raise bad("has an IPv6 zone identifier")
        try:
            return str(ipaddress.IPv6Address(literal)), port, True
        except ValueError:
            raise bad("is not a valid bracketed IPv6 address") from None
    host, sep, port_text = value.partition(":")
    if sep:
        if ":" in port_text:
            raise bad("is an IPv6 address without brackets or has several ':'")
        port = _parse_port(port_text)
        if port is None:
            raise bad("has an invalid port")
    host = normalize_query_name(host)
    if host and host[0].isdigit():
        try:
            return str(ipaddress.IPv4Address(host)), port, True
        except ValueError:
            pass
    problem = hostname_problem(host)
    if problem is not None:
        raise bad(problem)
    return host, port, False


def _parse_port(text: str) -> int | None:
    if text.isdigit() and text.isascii() and len(text) <= 5 and 0 < int(text) <= 65535:
        return int(text)
    return None


class HttpRequestTracker:
    """Follows a client->server HTTP/1.x byte stream and reports every request head.

    `feed(data)` returns the events the new bytes complete, in stream order:
    `RequestHead` (decide on its host before forwarding any byte at or after its
    `offset`), `RequestEnd`, and finally one of `NeedMore` (waiting for bytes: the normal
    state, between requests too), `HttpError` (terminal), `EndsBefore` (terminal) or `AnswerAwaited`.

    Leaving the checked state: an `Upgrade` header field, in any request, is refused
    (HTTP_UPGRADE_REFUSED) unless the request is a complete WebSocket handshake (RFC 6455
    4.1: HTTP/1.1 GET, `Upgrade: websocket` alone, `Connection: upgrade`, one valid
    Sec-WebSocket-Key, Sec-WebSocket-Version 13, no body) and the first request on the
    connection. h2c and every other protocol would let the client name any host per stream
    after the switch; a server may honour an Upgrade without `Connection: upgrade` too. When
    the handshake ends, `AnswerAwaited` is emitted and the tracker stops consuming until the
    caller reports the server's answer (`ServerAnswer`, then `answered`): after SWITCH the
    rest of the stream passes unparsed; after RESUME the bytes from the event's `offset` on
    are fed again and checked as requests, so a declined upgrade cannot smuggle requests.

    `Expect` (100-continue or anything else) on a request with a body: a server that answers
    such a request at once and keeps the connection may read the body as the next request,
    past the check. The tracker stops after the head (`AnswerAwaited` at the body's start):
    RESUME (100 Continue, or no answer within `CONTINUE_TIMEOUT`) goes on with the body;
    CLOSE (a final status first) means nothing more from the client may go. Only on the first
    request: behind earlier requests the server's next bytes may be their responses (a 100 an
    earlier request's Expect drew, or a body holding one), not the answer to this one, so a
    later request with `Expect` and a body is `EndsBefore` its start (terminal).

    Memory: at most one request head (`max_head_size`) or one chunk-size/trailer line is
    held; bodies are counted and dropped.
    """

    __slots__ = (
        "_awaiting",
        "_body_length",
        "_crlf_seen",
        "_error",
        "_head_size",
        "_headers",
        "_heads",
        "_line",
        "_max_head",
        "_max_headers",
        "_max_line",
        "_pos",
        "_remaining",
        "_request_line",
        "_request_offset",
        "_resume",
        "_state",
        "_websocket_key",
    )

    def __init__(
        self,
        *,
        max_head_size: int = MAX_HEAD_SIZE,
        max_headers: int = MAX_HEADERS,
        max_line_length: int = MAX_LINE_LENGTH,
    ) -> None:
        if min(max_head_size, max_headers, max_line_length) < 1:
            raise ValueError("bounds must be positive")
        self._max_head = max_head_size
        self._max_headers = max_headers
        self._max_line = min(max_line_length, max_head_size)
        self._state = _HEAD
        self._line = bytearray()
        self._pos = 0
        self._error: HttpError | None = None
        self._websocket_key: str | None = None  # of the upgrade request being read
        self._awaiting = Awaiting.UPGRADE
        self._resume = _HEAD  # the state an Expect request's body goes on in
        self._heads = 0
        self._remaining = 0
        self._body_length = 0
        self._crlf_seen = 0
        self._reset_head()

    def _reset_head(self) -> None:
        self._head_size = 0
        self._headers: list[tuple[str, str]] = []
        self._request_line: tuple[str, str, str] | None = None
        self._request_offset = self._pos

    @property
    def offset(self) -> int:
        """Stream bytes consumed so far."""
        return self._pos

    @property
    def buffered(self) -> int:
        """Bytes currently held: the partial line (complete head lines are kept decoded)."""
        return len(self._line) + (self._head_size if self._state == _HEAD else 0)

    @property
    def passthrough(self) -> bool:
        return self._state == _PASS

    @property
    def awaiting_answer(self) -> bool:
        return self._state == _AWAITING

    def answered(self, answer: Answer) -> None:
        """The server's answer to the held request (see `ServerAnswer`); after RESUME feed the held bytes again."""
        if self._state != _AWAITING:
            raise RuntimeError("no request awaits the server's answer")
        if answer is Answer.SWITCH:
            if self._awaiting is not Awaiting.UPGRADE:
                raise ValueError("only a WebSocket handshake may switch protocols")
            self._state = _PASS
        elif answer is Answer.CLOSE:
            self._state = _CLOSED
        elif self._awaiting is Awaiting.UPGRADE:
            self._state = _HEAD
            self._reset_head()
        else:
            self._state = self._resume

    def feed(self, data: bytes | bytearray | memoryview) -> list[HttpEvent]:
        if self._state == _ERROR:
            assert self._error is not None
            return [self._error]
        data = bytes(data)
        if self._state == _PASS:
            self._pos += len(data)
            return []
        if self._state == _AWAITING:
            raise RuntimeError("a request awaits the server's answer: call answered() first")
        if self._state == _CLOSED:
            raise RuntimeError("the connection ends at the server's answer: nothing more is checked")
        events: list[HttpEvent] = []
        try:
            self._feed(data, events)
        except _HttpFail as fail:
            self._state = _ERROR
            self._error = HttpError(fail.code, fail.message)
            self._line = bytearray()
            events.append(self._error)
            return events
        if self._state not in _STOPPED_STATES:
            events.append(NEED_MORE)
        return events

    def _feed(self, data: bytes, events: list[HttpEvent]) -> None:
        i = 0
        n = len(data)
        base = self._pos
        while i < n:
            state = self._state
            if state in _LINE_STATES:
                j = data.find(b"\n", i)
                if j < 0:
                    self._partial_line(data, i, n)
                    self._pos = base + n
                    return
                line_len = len(self._line) + j - i
                if line_len > self._max_line + 1:
                    raise self._too_long()
                if self._line:
                    self._line += data[i:j]
                    line = bytes(self._line)
                    self._line.clear()
                else:
                    line = data[i:j]
                # Strict CRLF, on purpose: a bare LF or a CR not followed by LF is a line end for
                # some implementations and not for others, the classic request-smuggling vector.
                if line.find(b"\r", 0, len(line) - 1) >= 0:
                    raise _HttpFail(HttpErrorCode.HTTP_BAD_LINE_ENDING, "CR not followed by LF inside a line")
                if not line.endswith(b"\r"):
                    raise _HttpFail(HttpErrorCode.HTTP_BAD_LINE_ENDING, "line ends with a bare LF (CRLF required)")
                line = line[:-1]
                line_start = base + j + 1 - (line_len + 1)
                i = j + 1
                self._pos = base + i
                if state == _HEAD:
                    self._head_line(line, line_start, line_len + 1, events)
                elif state == _CHUNK_SIZE:
                    self._chunk_size_line(line, events)
                else:
                    self._trailer_line(line, line_len + 1, events)
                if self._state in _STOPPED_STATES:
                    return  # nothing after a held request (or head) is consumed before the server answered
            elif state == _CHUNK_CRLF:
                expected = 0x0D if self._crlf_seen == 0 else 0x0A
                if data[i] != expected:
                    raise _HttpFail(HttpErrorCode.HTTP_INVALID_CHUNK, "chunk data is not followed by CRLF")
                i += 1
                self._pos = base + i
                if self._crlf_seen == 0:
                    self._crlf_seen = 1
                else:
                    self._state = _CHUNK_SIZE
            else:  # _BODY or _CHUNK_DATA: count, never store
                take = min(self._remaining, n - i)
                i += take
                self._pos = base + i
                self._remaining -= take
                self._body_length += take
                if self._remaining == 0:
                    if state == _BODY:
                        self._end_request(events)
                        if self._state == _AWAITING:
                            return
                    else:
                        self._state = _CHUNK_CRLF
                        self._crlf_seen = 0
        self._pos = base + n

    def _too_long(self) -> _HttpFail:
        return _HttpFail(HttpErrorCode.HTTP_LINE_TOO_LONG, f"a line is longer than {self._max_line} bytes")

    def _partial_line(self, data: bytes, i: int, n: int) -> None:
        # A CR inside the segment that is not its last byte, or a held CR followed by more
        # bytes, is a CR not followed by LF (there is no LF in this segment).
        if data.find(b"\r", i, n - 1) >= 0 or (self._line and self._line[-1] == 0x0D):
            raise _HttpFail(HttpErrorCode.HTTP_BAD_LINE_ENDING, "CR not followed by LF inside a line")
        size = len(self._line) + n - i
        if size > self._max_line + 1:
            raise self._too_long()
        if self._state == _HEAD and self._head_size + size > self._max_head:
            raise self._head_too_large()
        if self._state == _TRAILER and self._head_size + size > self._max_head:
            raise self._head_too_large("trailer section")
        self._line += data[i:n]

    def _head_too_large(self, what: str = "request head") -> _HttpFail:
        return _HttpFail(HttpErrorCode.HTTP_HEAD_TOO_LARGE, f"{what} is larger than {self._max_head} bytes")

    # ------------------------------------------------------------------ request head

    def _head_line(self, line: bytes, line_start: int, size: int, events: list[HttpEvent]) -> None:
        self._head_size += size
        if self._head_size > self._max_head:
            raise self._head_too_large()
        if self._request_line is None:
            if not line:
                return  # RFC 9112 2.2: ignore empty lines before a request line (some clients send a CRLF after a body)
            self._request_offset = line_start
            self._request_line = _parse_request_line(line)
            return
        if not line:
            self._finish_head(events)
            return
        if len(self._headers) >= self._max_headers:
            raise _HttpFail(HttpErrorCode.HTTP_TOO_MANY_HEADERS, f"more than {self._max_headers} header fields")
        self._headers.append(_parse_field_line(line))

    def _finish_head(self, events: list[HttpEvent]) -> None:
        assert self._request_line is not None
        method, target, version = self._request_line
        headers = self._headers
        hosts: list[str] = []
        lengths: list[str] = []
        codings: list[str] = []
        connection: list[str] = []
        upgrade_fields: list[str] = []
        expect = False
        keys: list[str] = []
        versions: list[str] = []
        for name, value in headers:
            if name == "host":
                hosts.append(value)
            elif name == "content-length":
                lengths.append(value)
            elif name == "transfer-encoding":
                codings.append(value)
            elif name == "connection":
                connection.extend(_split_list(value))
            elif name == "upgrade":
                upgrade_fields.append(value)
            elif name == "expect":
                expect = True
            elif name == "sec-websocket-key":
                keys.append(value)
            elif name == "sec-websocket-version":
                versions.append(value)

        if len(hosts) > 1:
            raise _HttpFail(HttpErrorCode.HTTP_DUPLICATE_HOST, f"{len(hosts)} Host header fields")
        host: str | None = None
        port: int | None = None
        is_ip = False
        if hosts:
            host, port, is_ip = _parse_authority(hosts[0], "Host")
        elif version == "HTTP/1.1":
            raise _HttpFail(HttpErrorCode.HTTP_MISSING_HOST, "HTTP/1.1 request without a Host header field")

        if not target.startswith("/") and target != "*":
            match = _ABSOLUTE_RE.match(target)
            if match is None:
                raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, f"request target {target[:80]!r} is not a valid URL")
            scheme = match.group(1).lower()
            if scheme not in _DEFAULT_PORTS:
                raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, f"request target scheme {scheme!r} is not http(s)")
            t_host, t_port, t_is_ip = _parse_authority(match.group(2), "request target authority")
            default = _DEFAULT_PORTS[scheme]
            if host is None:
                host, port, is_ip = t_host, t_port, t_is_ip
            elif (t_host, t_port or default) != (host, port or default):
                raise _HttpFail(
                    HttpErrorCode.HTTP_TARGET_HOST_MISMATCH,
                    f"request target names {match.group(2)!r} but Host is {hosts[0]!r}",
                )

        if lengths and codings:
            raise _HttpFail(
                HttpErrorCode.HTTP_AMBIGUOUS_LENGTH, "both Content-Length and Transfer-Encoding (request smuggling)"
            )
        chunked = False
        length = 0
        if codings:
            chunked = _check_transfer_encoding(codings, version)
        elif lengths:
            length = _content_length(lengths)

        self._heads += 1
        # Any Upgrade field, whatever Connection says: a server may switch on it all the same.
        self._websocket_key = (
            _websocket_key(method, version, upgrade_fields, connection, keys, versions, chunked or length > 0)
            if upgrade_fields
            else None
        )
        if self._websocket_key is not None and self._heads > 1:
            raise _upgrade_fail(
                "a WebSocket upgrade must be the first request on its connection "
                "(the server's answer is then the first bytes it sends)"
            )
        events.append(
            RequestHead(
                method=method,
                target=target,
                version=version,
                headers=tuple(headers),
                host=host,
                port_from_host=port,
                host_is_ip=is_ip,
                offset=self._request_offset,
            )
        )
        self._body_length = 0
        if not (chunked or length):
            self._end_request(events)
            return
        body = _CHUNK_SIZE if chunked else _BODY
        self._remaining = length
        if not expect:
            self._state = body
        elif self._heads > 1:
            self._state = _CLOSED
            events.append(EndsBefore(self._request_offset))
        else:
            self._resume = body
            self._await(events, Awaiting.CONTINUE, None)

    def _end_request(self, events: list[HttpEvent]) -> None:
        events.append(RequestEnd(self._pos, self._body_length))
        if self._websocket_key is not None:
            self._await(events, Awaiting.UPGRADE, self._websocket_key)
            return
        self._state = _HEAD
        self._reset_head()

    def _await(self, events: list[HttpEvent], awaiting: Awaiting, websocket_key: str | None) -> None:
        self._awaiting = awaiting
        self._state = _AWAITING
        events.append(AnswerAwaited(self._pos, awaiting, websocket_key))

    # ------------------------------------------------------------------ chunked body

    def _chunk_size_line(self, line: bytes, events: list[HttpEvent]) -> None:
        m = _CHUNK_LINE_RE.match(line)
        if m is None:
            raise _HttpFail(HttpErrorCode.HTTP_INVALID_CHUNK, f"invalid chunk-size line {line[:60]!r}")
        size = int(m.group(1), 16)
        if size == 0:
            self._state = _TRAILER
            self._head_size = 0
            self._headers = []
        else:
            self._state = _CHUNK_DATA
            self._remaining = size

    def _trailer_line(self, line: bytes, size: int, events: list[HttpEvent]) -> None:
        self._head_size += size
        if self._head_size > self._max_head:
            raise self._head_too_large("trailer section")
        if not line:
            self._end_request(events)
            return
        if len(self._headers) >= self._max_headers:
            raise _HttpFail(HttpErrorCode.HTTP_TOO_MANY_HEADERS, f"more than {self._max_headers} trailer fields")
        self._headers.append(_parse_field_line(line))


def _upgrade_fail(message: str) -> _HttpFail:
    return _HttpFail(HttpErrorCode.HTTP_UPGRADE_REFUSED, message)


def _websocket_key(
    method: str,
    version: str,
    upgrade_fields: list[str],
    connection: list[str],
    keys: list[str],
    versions: list[str],
    has_body: bool,
) -> str:
    """The Sec-WebSocket-Key of a request that has Upgrade fields, if it is a complete WebSocket handshake
    (RFC 6455 4.1); else HTTP_UPGRADE_REFUSED saying what is missing."""
    protocols = [p for value in upgrade_fields for p in _split_list(value, lower=False)]
    if len(upgrade_fields) != 1 or [p.lower() for p in protocols] != ["websocket"]:
        named = ", ".join(upgrade_fields)[:60]
        raise _upgrade_fail(
            f"Upgrade {named!r} refused: only a WebSocket upgrade may leave HTTP/1 "
            "(h2c and other protocols would carry requests for any host past the check)"
        )
    if version != "HTTP/1.1":
        raise _upgrade_fail(f"WebSocket upgrade in an {version} request (RFC 6455 4.1 needs HTTP/1.1)")
    if method != "GET":
        raise _upgrade_fail(f"WebSocket upgrade with method {method[:20]} (RFC 6455 4.1 needs GET)")
    if "upgrade" not in connection:
        raise _upgrade_fail("WebSocket upgrade without the 'upgrade' option in Connection")
    if len(keys) != 1 or not _is_websocket_key(keys[0]):
        raise _upgrade_fail("WebSocket upgrade without exactly one Sec-WebSocket-Key of 16 bytes in base64")
    if versions != ["13"]:
        shown = ", ".join(versions)[:20] or "none"
        raise _upgrade_fail(f"WebSocket upgrade with Sec-WebSocket-Version {shown!r} (13 required)")
    if has_body:
        raise _upgrade_fail("WebSocket upgrade with a request body")
    return keys[0]


def _is_websocket_key(key: str) -> bool:
    try:
        return len(key) == 24 and len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3:
        if len(parts) == 2 and _TOKEN_RE.match(parts[0]):
            raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, "HTTP/0.9 request line (no version) is not supported")
        raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, f"invalid request line {line[:80]!r}")
    method, target, version = parts
    if _TOKEN_RE.match(method) is None:
        raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, f"invalid method {method[:40]!r}")
    if _VERSION_RE.match(version) is None:
        raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, f"invalid HTTP version {version[:20]!r}")
    if method == b"PRI" and version == b"HTTP/2.0":
        raise _HttpFail(HttpErrorCode.HTTP_UNSUPPORTED_VERSION, "HTTP/2 prior-knowledge preface (only HTTP/1.x)")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _HttpFail(HttpErrorCode.HTTP_UNSUPPORTED_VERSION, f"{version.decode()} is not HTTP/1.0 or HTTP/1.1")
    if method == b"CONNECT":
        raise _HttpFail(HttpErrorCode.HTTP_CONNECT_REFUSED, "CONNECT is not allowed through the gateway")
    if _TARGET_RE.match(target) is None:
        raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, "request target contains characters outside visible ASCII")
    if target == b"*":
        if method != b"OPTIONS":
            raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, "asterisk-form target is only valid with OPTIONS")
    elif not target.startswith(b"/") and b"://" not in target:
        raise _HttpFail(HttpErrorCode.HTTP_MALFORMED, f"request target {target[:80]!r} is neither a path nor a URL")
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def _parse_field_line(line: bytes) -> tuple[str, str]:
    if line[0] in b" \t":
        raise _HttpFail(HttpErrorCode.HTTP_OBS_FOLD, "obsolete line folding (header continuation line)")
    m = _FIELD_NAME_RE.match(line)
    if m is None:
        if _NAME_SPACE_COLON_RE.match(line):
            raise _HttpFail(HttpErrorCode.HTTP_INVALID_HEADER, "whitespace between header name and colon")
        raise _HttpFail(HttpErrorCode.HTTP_INVALID_HEADER, f"invalid header line {line[:60]!r}")
    value = line[m.end() :].strip(b" \t")
    if _BAD_VALUE_CHAR_RE.search(value):
        raise _HttpFail(HttpErrorCode.HTTP_INVALID_HEADER, "control character in a header value")
    return line[: m.end() - 1].decode("ascii").lower(), value.decode("latin-1")


def _split_list(value: str, *, lower: bool = True) -> list[str]:
    items = (item.strip(" \t") for item in value.split(","))
    return [item.lower() if lower else item for item in items if item]


def _check_transfer_encoding(values: list[str], version: str) -> bool:
    if version == "HTTP/1.0":
        raise _HttpFail(
            HttpErrorCode.HTTP_INVALID_TRANSFER_ENCODING, "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)"
        )
    if len(values) > 1:
        raise _HttpFail(HttpErrorCode.HTTP_INVALID_TRANSFER_ENCODING, "several Transfer-Encoding header fields")
    codings = [item.strip(" \t").lower() for item in values[0].split(",")]
    for coding in codings:
        if not coding or _TOKEN_RE.match(coding.encode("latin-1")) is None:
            raise _HttpFail(HttpErrorCode.HTTP_INVALID_TRANSFER_ENCODING, f"invalid Transfer-Encoding {values[0]!r}")
    if codings[-1] != "chunked" or codings.count("chunked") != 1:
        raise _HttpFail(
            HttpErrorCode.HTTP_INVALID_TRANSFER_ENCODING,
            f"Transfer-Encoding {values[0]!r}: chunked must be the final coding, applied once",
        )
    return True


def _content_length(values: list[str]) -> int:
    found: set[int] = set()
    for value in values:
        for item in value.split(","):
            item = item.strip(" \t")
            if not (item.isdigit() and item.isascii() and len(item) <= 18):
                raise _HttpFail(HttpErrorCode.HTTP_INVALID_CONTENT_LENGTH, f"invalid Content-Length {value[:40]!r}")
            found.add(int(item))
    if len(found) > 1:
        raise _HttpFail(
            HttpErrorCode.HTTP_CONFLICTING_CONTENT_LENGTH, f"differing Content-Length values {sorted(found)}"
        )
    return found.pop()


# --------------------------------------------------------------------------- HTTP 403

_REASON_LIMIT: Final = 200
_SPACES_RE: Final = re.compile(r"\s+")
_NOT_VISIBLE_RE: Final = re.compile(r"[^\x20-\x7e]")


def sanitize_reason(text: str, limit: int = _REASON_LIMIT) -> str:
    """One line of visible ASCII (plus single spaces), at most `limit` characters."""
    text = _NOT_VISIBLE_RE.sub("?", _SPACES_RE.sub(" ", text)).strip()
    return text[:limit].rstrip()


def forbidden_parts(
    reason: str, rule: str = "", message: str = "", denial_id: str = ""
) -> tuple[list[tuple[str, str]], bytes]:
    """A policy denial's headers and body (the reason in `X-Gateway-Reason` and the body; the operator's message,
    if any, in `X-Gateway-Message`; the denial's id in `X-Gateway-Denial-Id`): the same answer from the fast path
    (`http_forbidden`) and from the inspection tier, which frames it itself."""
    clean = sanitize_reason(reason) or "denied"
    headers = [("Content-Type", "text/plain"), ("X-Gateway-Reason", clean)]
    clean_rule = sanitize_reason(rule)
    if clean_rule:
        headers.append(("X-Gateway-Rule", clean_rule))
    body = f"Blocked by sandbox egress policy: {clean}\n"
    clean_message = sanitize_reason(message)
    if clean_message:
        headers.append(("X-Gateway-Message", clean_message))
        body += f"{clean_message}\n"
    clean_id = sanitize_reason(denial_id)
    if clean_id:
        headers.append(("X-Gateway-Denial-Id", clean_id))
        body += f"Denial id: {clean_id} (quote it to the operator)\n"
    headers.append(("Cache-Control", "no-store"))
    return headers, body.encode("ascii")


def http_forbidden(reason: str, rule: str = "", message: str = "", denial_id: str = "") -> bytes:
    """`HTTP/1.1 403 Forbidden` and `Connection: close` (the engine closes the connection after writing it)."""
    headers, body = forbidden_parts(reason, rule, message, denial_id)
    lines = ["HTTP/1.1 403 Forbidden", *(f"{name}: {value}" for name, value in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii") + body
