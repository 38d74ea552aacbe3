"""HTTP/1.1 for the tunnel, the pure part: request and response heads, header rewriting, body framing,
WebSocket frame boundaries. No I/O here (that is `gateway.tunnel.wire`); everything is bytes in, bytes out.

Header names are compared lowercased; values are passed through byte for byte (latin-1 text where the
gateway reads them), so nothing the app or the client sent is re-encoded on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

#: Connection-level headers (RFC 9110 7.6.1): never forwarded, each hop sets its own.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Forwarding and identity headers: a client's copies never reach the app (the gateway sets its own
#: X-Forwarded-For/Proto/Host from what it saw). Names are compared with case and `_` folded to `-`, because
#: CGI, WSGI and Rack map `X_Forwarded_For` and `X-Forwarded-For` alike to HTTP_X_FORWARDED_FOR. The list is
#: what frameworks and their proxy middlewares read as the client's address, scheme, host, port or path:
#: Werkzeug's ProxyFix, Django, Rack/Rails, Express, Spring, Symfony/IIS (X-Original-URL, X-Rewrite-URL) and
#: the CDN headers (Cloudflare, Akamai, Fastly, App Engine); `Proxy` because CGI turns it into HTTP_PROXY.
FORWARDING: Final = frozenset(
    {
        b"forwarded",
        b"forwarded-for",
        b"x-forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"x-cluster-client-ip",
        b"fastly-client-ip",
        b"x-proxyuser-ip",
        b"remote-addr",
        b"x-host",
        b"x-rewrite-url",
        b"x-scheme",
        b"x-url-scheme",
        b"x-https",
        b"front-end-https",
        b"proxy",
    }
)
FORWARDING_PREFIXES: Final = (
    b"x-forwarded-",
    b"x-original-",
    b"x-real-",
    b"x-client-",
    b"x-remote-",
    b"true-client-",
    b"cf-",
    b"x-appengine-",
)
#: Beyond the names above, the shape of a client-address claim, whoever invented the header (X-Originating-IP,
#: Fly-Client-IP, X-Azure-ClientIP/-SocketIP, X-Envoy-External-Address, CloudFront-Viewer-Address, ...), and
#: `forwarded` anywhere in the name (X-Vercel-Forwarded-For, X-ProxyUser-Forwarded, ...).
FORWARDING_SUFFIXES: Final = (
    b"-ip",
    b"-ips",
    b"clientip",
    b"socketip",
    b"-client-address",
    b"-external-address",
    b"-viewer-address",
)
#: Responses that never have a body, whatever their headers say (RFC 9110 6.4.1).
NO_BODY_STATUS: Final = frozenset({204, 304})
MAX_HEAD_BYTES: Final = 64 * 1024  # request line + headers from a client, and a response head from an app
MAX_HEADERS: Final = 128

Headers = list[tuple[bytes, bytes]]

REASONS: Final = {status.value: status.phrase.encode() for status in HTTPStatus}


class HeadTooLarge(Exception):
    """A request or response head over MAX_HEAD_BYTES or MAX_HEADERS."""


@dataclass(slots=True)
class HeadBuilder:
    """Collects a head from parser callbacks (target or reason, then fields), bounded in size and count."""

    first: bytes = b""
    headers: Headers = field(default_factory=list)
    size: int = 0

    def add_first(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_HEAD_BYTES:
            raise HeadTooLarge("head too large")
        self.first += data

    def add_header(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value) + 4
        if self.size > MAX_HEAD_BYTES or len(self.headers) >= MAX_HEADERS:
            raise HeadTooLarge("head too large")
        self.headers.append((name, value))


def header_map(headers: Headers) -> dict[bytes, bytes]:
    """Lowercased name -> value (a repeated field: the values joined with `, `, as RFC 9110 5.3 allows)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        key = name.lower()
        found[key] = found[key] + b", " + value if key in found else value
    return found


def fold(name: bytes) -> bytes:
    """A header name as CGI-style servers see it: lowercase, `_` the same as `-`."""
    lower = name.lower()
    return lower.replace(b"_", b"-") if b"_" in lower else lower


def is_forwarding(folded: bytes) -> bool:
    """Whether a (folded) request header claims something about the client or the path to it."""
    return (
        folded in FORWARDING
        or folded.startswith(FORWARDING_PREFIXES)
        or folded.endswith(FORWARDING_SUFFIXES)
        or b"forwarded" in folded
    )


def connection_tokens(value: bytes | None) -> frozenset[bytes]:
    """The folded tokens of a Connection header: the names it lists are hop-by-hop too."""
    if not value:
        return frozenset()
    return frozenset(fold(t.strip()) for t in value.split(b","))


def _listed(headers: Headers, fields: dict[bytes, bytes] | None) -> frozenset[bytes]:
    if fields is not None:
        return connection_tokens(fields.get(b"connection"))
    return connection_tokens(b", ".join(value for name, value in headers if name.lower() == b"connection"))


def is_chunked(transfer_encoding: bytes | None) -> bool:
    return transfer_encoding is not None and transfer_encoding.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def _cookie_name(pair: bytes) -> bytes:
    """The lowercased name of a `name=value` cookie pair as a server reads it back from the Cookie header (a pair
    without `=` is all name). A nameless cookie (`=x=y`) is sent back as its bare value, `x=y`: its name is x."""
    name, sep, value = pair.partition(b"=")
    name = name.strip()
    if not name and sep:
        return _cookie_name(value)
    return name.lower()


def strip_cookies(value: bytes, names: frozenset[bytes]) -> bytes:
    """The Cookie header without the cookies `names` (lowercased: the gateway's own, in any case spelling)."""
    parts = [p.strip() for p in value.split(b";")]
    return b"; ".join(p for p in parts if p and _cookie_name(p) not in names)


def sets_cookie(value: bytes, names: frozenset[bytes]) -> bool:
    """Whether a Set-Cookie value sets one of `names` (lowercased). Browsers read one cookie per line, but
    clients that fold Set-Cookie lines into one (fetch's `Headers.get`, some HTTP libraries) split it on `,`
    again, so a name after a comma counts too (an `Expires` date's comma never starts a cookie name)."""
    if _cookie_name(value.split(b";", 1)[0]) in names:
        return True
    return b"," in value and any(_cookie_name(part.split(b";", 1)[0]) in names for part in value.split(b",")[1:])


def cookie_value(value: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header, or None. The name matches exactly: a cookie whose name
    differs only in case is another cookie (one that a sibling site may have set)."""
    if not value or name not in value:
        return None
    for part in value.split(b";"):
        key, sep, found = part.strip().partition(b"=")
        if sep and key == name:
            return found.strip().strip(b'"')
    return None


class InvalidHost(ValueError):
    """A Host header that is not exactly one `name[:port]`."""


def parse_host(value: bytes | None) -> tuple[str, int | None]:
    """The one Host of a request as (lowercased name, port or None); raises InvalidHost otherwise.

    The name is letters, digits, `-` and `.` only, so userinfo (`@`), a path (`/`), a second Host line (joined
    as `a, b`), spaces and brackets are all refused; the port, when there is a `:`, is 1-5 digits in 1-65535."""
    if value is None:
        raise InvalidHost("the request has no Host header")
    if b"," in value:
        raise InvalidHost("the request has more than one Host header")
    text = value.strip().decode("latin-1").lower()
    name, colon, port = text.partition(":")
    if not name or not all(c in _HOST_CHARS for c in name):
        raise InvalidHost("Host must be a DNS name, optionally with :port")
    if not colon:
        return name, None
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise InvalidHost("the port in Host must be a number in 1-65535")
    return name, int(port)


_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def clears_cookies(value: bytes) -> bool:
    """Whether a Clear-Site-Data value asks for cookies (`"cookies"` or `"*"`, any case): browsers clear them for
    the whole site, which is every tunnel's gateway session when the tunnel domain is not a public suffix."""
    lower = value.lower()
    return b"cookies" in lower or b"*" in lower


def valid_reason(reason: bytes) -> bool:
    """A status line's reason phrase: HTAB, SP, visible ASCII and obs-text only (RFC 9112 4)."""
    return all(b == 0x09 or 0x20 <= b != 0x7F for b in reason)


@dataclass(slots=True)
class Forwarding:
    """What the gateway adds to a request for the app (and removes from it)."""

    host: bytes  # the Host the app sees (the tunnel's, or `localhost:<port>` with host rewriting)
    forwarded_host: bytes  # the Host the client used (validated and normalised)
    forwarded_for: bytes  # the client's address
    strip_cookies: frozenset[bytes]  # the gateway's own cookie names (lowercased)
    strip_basic: bool  # the tunnel has a password: Basic credentials are the gateway's, not the app's


def upstream_request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    fwd: Forwarding,
    *,
    content_length: bytes | None,
    chunked: bool,
    websocket: bool,
    fields: dict[bytes, bytes] | None = None,
) -> bytes:
    """The request head sent to the app: the client's end-to-end headers, minus hop-by-hop ones, forwarding
    headers, Host and Expect (the gateway answers 100-continue itself) and the gateway's credentials, plus the
    gateway's Host and X-Forwarded-*, and the body framing the gateway relays (Content-Length as the client
    sent it, or chunked). A WebSocket handshake keeps its Sec-WebSocket-* fields and asks for the upgrade.
    Names are folded (`fold`) before every rule, so `Transfer_Encoding` or `X_Forwarded_For` never pass as
    end-to-end headers to an app whose server reads `_` as `-`.
    `fields`: `header_map(headers)` when the caller has it (saves a pass over the headers)."""
    listed = _listed(headers, fields)
    out = [method, b" ", target, b" HTTP/1.1\r\nHost: ", fwd.host, b"\r\n"]
    for name, value in headers:
        folded = fold(name)
        if folded in HOP_BY_HOP or folded in listed or is_forwarding(folded):
            continue
        if folded == b"host" or folded == b"expect" or folded == b"content-length":
            continue
        if folded == b"cookie":
            value = strip_cookies(value, fwd.strip_cookies)
            if not value:
                continue
        elif folded == b"authorization" and fwd.strip_basic and value[:6].lower() == b"basic ":
            continue
        out += (name, b": ", value, b"\r\n")
    out += (b"X-Forwarded-For: ", fwd.forwarded_for, b"\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: ")
    out += (fwd.forwarded_host, b"\r\n")
    if websocket:
        out.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    elif chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None:
        out += (b"Content-Length: ", content_length, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


@dataclass(slots=True)
class ResponseFraming:
    """How a response body is delimited: by the app (its Content-Length or chunks, or its closing the
    connection) and towards the client (Content-Length passed through, chunked, or close)."""

    has_body: bool
    content_length: int | None  # the app's, when it gave one (and no chunking)
    until_close: bool  # the app ends the body by closing the connection
    chunk_to_client: bool  # the gateway re-chunks it for an HTTP/1.1 client
    close_client: bool  # the client connection must close after this response


def response_has_body(status: int, *, head_request: bool) -> bool:
    return not (head_request or status in NO_BODY_STATUS or 100 <= status < 200)


def response_length(headers: dict[bytes, bytes]) -> tuple[int | None, bool]:
    """(Content-Length or None, whether the app ends the body by closing) for a response that has a body."""
    if is_chunked(headers.get(b"transfer-encoding")):
        return None, False
    raw = headers.get(b"content-length")
    if raw is not None and raw.strip().isdigit():
        return int(raw), False
    return None, True  # neither: the body runs until the app closes the connection (RFC 9112 6.3)


def response_framing(
    status: int, headers: dict[bytes, bytes], *, head_request: bool, client_keep_alive: bool, client_http11: bool
) -> ResponseFraming:
    if not response_has_body(status, head_request=head_request):
        return ResponseFraming(False, None, False, False, not client_keep_alive)
    length, until_close = response_length(headers)
    if length is not None:
        return ResponseFraming(True, length, False, False, not client_keep_alive)
    if client_http11:
        return ResponseFraming(True, None, until_close, True, not client_keep_alive)
    return ResponseFraming(True, None, until_close, False, True)  # HTTP/1.0: the end of the body is the close


def client_response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    framing: ResponseFraming,
    *,
    extra: Sequence[tuple[bytes, bytes]] = (),
    fields: dict[bytes, bytes] | None = None,
    gateway_cookies: frozenset[bytes] = frozenset(),
) -> bytes:
    """The response head for the client: the app's end-to-end headers and the gateway's framing. A Set-Cookie
    for one of `gateway_cookies` (lowercased names), and a Clear-Site-Data that clears cookies, are dropped: the
    app must not plant or end the gateway's session (nor, through the shared site, another tunnel's)."""
    listed = _listed(headers, fields)
    out = [b"HTTP/1.1 %d " % status, reason or REASONS.get(status, b"Status"), b"\r\n"]
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in listed:
            continue
        if lower == b"set-cookie" and sets_cookie(value, gateway_cookies):
            continue
        if lower == b"clear-site-data" and clears_cookies(value):
            continue
        if lower == b"content-length" and (
            (framing.has_body and framing.content_length is None) or status == 204 or status < 200
        ):
            # The app sent both a length and chunks: the chunks win (and the length goes). A 1xx or 204 has no
            # body and must not announce one (RFC 9110 8.6): a client that believed it would read the next
            # response as this one's body.
            continue
        out += (name, b": ", value, b"\r\n")
    for name, value in extra:
        out += (name, b": ", value, b"\r\n")
    if framing.chunk_to_client:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if framing.close_client:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def simple_response(status: int, headers: Headers, body: bytes, *, close: bool, head_request: bool = False) -> bytes:
    """A complete response the gateway makes itself (pages, redirects, refusals)."""
    out = [b"HTTP/1.1 %d " % status, REASONS.get(status, b"Status"), b"\r\n"]
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    out.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    if not head_request:
        out.append(body)
    return b"".join(out)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"


# --------------------------------------------------------------------------- WebSocket


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """A server-to-client (unmasked) Close frame (RFC 6455 5.5.1)."""
    payload = code.to_bytes(2, "big") + reason[:123]
    return bytes((0x88, len(payload))) + payload


class FrameBoundary:
    """Follows one direction of a relayed WebSocket stream just enough to know where frames end, so the
    gateway can put a Close frame of its own between two frames (never inside one)."""

    __slots__ = ("_header", "_left")

    def __init__(self) -> None:
        self._left = 0  # payload bytes of the current frame still to come
        self._header = b""  # a frame header split across reads

    @property
    def at_boundary(self) -> bool:
        return self._left == 0 and not self._header

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                step = min(self._left, end - pos)
                self._left -= step
                pos += step
                continue
            header = self._header + data[pos : pos + 14]
            size = _frame_header_size(header)
            if size is None or len(header) < size:
                self._header = header
                return
            used = size - len(self._header)
            self._header = b""
            pos += used
            self._left = _frame_payload_length(header)


def _frame_header_size(header: bytes) -> int | None:
    if len(header) < 2:
        return None
    length = header[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if header[1] & 0x80 else 0)


def _frame_payload_length(header: bytes) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int.from_bytes(header[2:4], "big")
    if length == 127:
        return int.from_bytes(header[2:10], "big")
    return length
