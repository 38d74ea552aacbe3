"""The tunnel's pure HTTP/1.1 rules: what reaches the app, what reaches the client, how bodies are framed,
where WebSocket frames end."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.tunnel.http1 import (
    MAX_HEAD_BYTES,
    Forwarding,
    FrameBoundary,
    HeadBuilder,
    HeadTooLarge,
    InvalidHost,
    chunk,
    client_response_head,
    close_frame,
    cookie_value,
    header_map,
    parse_host,
    response_framing,
    simple_response,
    strip_cookies,
    upstream_request_head,
    valid_reason,
)

FWD = Forwarding(
    host=b"abc.tunnel.test",
    forwarded_host=b"abc.tunnel.test",
    forwarded_for=b"203.0.113.7",
    strip_cookies=frozenset({b"__host-gw"}),
    strip_basic=True,
)


def head_lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def test_the_app_gets_end_to_end_headers_and_the_gateways_forwarding_headers() -> None:
    sent = [
        (b"Host", b"evil.example"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Forwarded", b"for=6.6.6.6"),
        (b"X-Real-IP", b"6.6.6.6"),
        (b"Expect", b"100-continue"),
        (b"Cookie", b"a=1; __Host-gw=secret; b=2"),
        (b"Authorization", b"Basic bWU6cHc="),
        (b"Accept", b"*/*"),
        (b"Content-Length", b"5"),
    ]
    head = upstream_request_head(b"POST", b"/x?y=1", sent, FWD, content_length=b"5", chunked=False, websocket=False)
    lines = head_lines(head)
    assert lines[0] == b"POST /x?y=1 HTTP/1.1"
    assert lines[1:] == [
        b"Host: abc.tunnel.test",
        b"Cookie: a=1; b=2",
        b"Accept: */*",
        b"X-Forwarded-For: 203.0.113.7",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Host: abc.tunnel.test",
        b"Content-Length: 5",
    ]


def test_an_apps_own_credentials_and_a_lone_gateway_cookie() -> None:
    open_tunnel = Forwarding(b"h", b"h", b"1.2.3.4", frozenset({b"__host-gw"}), strip_basic=False)
    sent = [(b"Authorization", b"Basic bWU6cHc="), (b"Cookie", b"__Host-gw=secret")]
    lines = head_lines(upstream_request_head(b"GET", b"/", sent, open_tunnel, content_length=None, chunked=False,
                                             websocket=False))  # fmt: skip
    assert b"Authorization: Basic bWU6cHc=" in lines  # no password on the tunnel: Basic is the app's
    assert not any(line.lower().startswith(b"cookie") for line in lines)  # nothing left of the cookie header
    bearer = [(b"Authorization", b"Bearer t")]
    lines = head_lines(upstream_request_head(b"GET", b"/", bearer, FWD, content_length=None, chunked=False,
                                             websocket=False))  # fmt: skip
    assert b"Authorization: Bearer t" in lines


def test_request_body_framing_and_websocket_handshake() -> None:
    chunked = upstream_request_head(
        b"PUT", b"/", [(b"Transfer-Encoding", b"chunked")], FWD, content_length=None, chunked=True, websocket=False
    )
    assert head_lines(chunked)[-1] == b"Transfer-Encoding: chunked"
    assert chunked.count(b"Transfer-Encoding") == 1
    ws = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Protocol", b"chat"),
    ]
    lines = head_lines(upstream_request_head(b"GET", b"/ws", ws, FWD, content_length=None, chunked=False,
                                             websocket=True))  # fmt: skip
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in lines and b"Sec-WebSocket-Protocol: chat" in lines
    assert lines[-2:] == [b"Connection: Upgrade", b"Upgrade: websocket"]


@pytest.mark.parametrize(
    ("status", "headers", "head", "keep", "http11", "expected"),
    [
        (200, {b"content-length": b"3"}, False, True, True, (True, 3, False, False, False)),
        (200, {b"transfer-encoding": b"chunked"}, False, True, True, (True, None, False, True, False)),
        (200, {b"transfer-encoding": b"chunked"}, False, True, False, (True, None, False, False, True)),
        (200, {}, False, True, True, (True, None, True, True, False)),  # until the app closes: re-chunked
        (200, {}, False, True, False, (True, None, True, False, True)),  # HTTP/1.0: the close ends it
        (200, {b"content-length": b"3"}, True, True, True, (False, None, False, False, False)),  # HEAD
        (204, {}, False, True, True, (False, None, False, False, False)),
        (304, {b"content-length": b"10"}, False, False, True, (False, None, False, False, True)),
        (200, {b"content-length": b"3"}, False, False, True, (True, 3, False, False, True)),
    ],
)
def test_response_framing(
    status: int,
    headers: dict[bytes, bytes],
    head: bool,
    keep: bool,
    http11: bool,
    expected: tuple[bool, int | None, bool, bool, bool],
) -> None:
    framing = response_framing(status, headers, head_request=head, client_keep_alive=keep, client_http11=http11)
    assert (
        framing.has_body,
        framing.content_length,
        framing.until_close,
        framing.chunk_to_client,
        framing.close_client,
    ) == expected


def test_the_client_gets_end_to_end_headers_and_the_gateways_framing() -> None:
    headers = [
        (b"Content-Type", b"text/plain"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    framing = response_framing(200, header_map(headers), head_request=False, client_keep_alive=True, client_http11=True)
    lines = head_lines(client_response_head(200, b"OK", headers, framing))
    assert lines == [
        b"HTTP/1.1 200 OK",
        b"Content-Type: text/plain",
        b"Set-Cookie: a=1",
        b"Set-Cookie: b=2",
        b"Transfer-Encoding: chunked",
    ]
    closing = response_framing(200, {}, head_request=False, client_keep_alive=True, client_http11=False)
    assert head_lines(client_response_head(201, b"", [], closing)) == [b"HTTP/1.1 201 Created", b"Connection: close"]


def test_simple_responses_and_chunks() -> None:
    answer = simple_response(404, [(b"Content-Type", b"application/json")], b"{}", close=True)
    assert answer == b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n" + (
        b"Connection: close\r\n\r\n{}"
    )
    assert simple_response(200, [], b"body", close=False, head_request=True).endswith(b"Content-Length: 4\r\n\r\n")
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


def test_cookies() -> None:
    assert cookie_value(b"a=1; __Host-gw=tok; b=2", b"__Host-gw") == b"tok"
    assert cookie_value(b'__Host-gw="tok"', b"__Host-gw") == b"tok"
    assert cookie_value(b"x__Host-gw=tok", b"__Host-gw") is None
    assert cookie_value(None, b"__Host-gw") is None
    gateway = frozenset({b"__host-gw"})
    assert strip_cookies(b"a=1; __Host-gw=tok;b=2", gateway) == b"a=1; b=2"
    assert strip_cookies(b"a=1; __HOST-GW=x; __host-gw ; c", gateway) == b"a=1; c"  # any case, even nameless
    assert strip_cookies(b"a=1", gateway) == b"a=1"


def test_heads_are_bounded() -> None:
    builder = HeadBuilder()
    builder.add_first(b"/" * 100)
    with pytest.raises(HeadTooLarge):
        builder.add_header(b"X", b"v" * MAX_HEAD_BYTES)
    many = HeadBuilder()
    with pytest.raises(HeadTooLarge):
        for i in range(1000):
            many.add_header(b"X-%d" % i, b"1")


# --------------------------------------------------------------------------- WebSocket frames


def frame(payload: bytes, *, masked: bool = False, opcode: int = 0x2) -> bytes:
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, size | (0x80 if masked else 0)))
    elif size < 65536:
        header = bytes((0x80 | opcode, 126 | (0x80 if masked else 0))) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127 | (0x80 if masked else 0))) + size.to_bytes(8, "big")
    if masked:
        header += b"\x01\x02\x03\x04"  # the payload bytes need not be really masked for boundary tracking
    return header + payload


@given(
    sizes=st.lists(st.sampled_from([0, 1, 125, 126, 127, 300, 65535, 65536, 70000]), min_size=1, max_size=6),
    masked=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=70000), max_size=12),
)
def test_frame_boundaries_are_found_however_the_stream_is_cut(sizes: list[int], masked: bool, cuts: list[int]) -> None:
    frames = [frame(b"\xa5" * size, masked=masked) for size in sizes]
    stream = b"".join(frames)
    ends = set()
    offset = 0
    for f in frames:
        offset += len(f)
        ends.add(offset)
    tracker = FrameBoundary()
    position = 0
    points = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
    for point in points:
        if point <= position:
            continue
        tracker.feed(stream[position:point])
        position = point
        assert tracker.at_boundary == (position in ends)
    assert tracker.at_boundary


def test_close_frame() -> None:
    assert close_frame(1008, b"tunnel ended") == b"\x88\x0e\x03\xf0tunnel ended"
    tracker = FrameBoundary()
    tracker.feed(close_frame(1000))
    assert tracker.at_boundary


# --------------------------------------------------------------------------- the rules for hostile input


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"abc.tunnel.test", ("abc.tunnel.test", None)),
        (b"ABC.Tunnel.Test:8443", ("abc.tunnel.test", 8443)),
        (b"abc.tunnel.test:08443", ("abc.tunnel.test", 8443)),
    ],
)
def test_a_host_is_one_name_and_an_optional_numeric_port(value: bytes, expected: tuple[str, int | None]) -> None:
    assert parse_host(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b":8443",
        b"abc.tunnel.test:",
        b"abc.tunnel.test:443@evil.example",
        b"abc.tunnel.test:abc",
        b"abc.tunnel.test:0",
        b"abc.tunnel.test:65536",
        b"abc.tunnel.test:123456",
        b"abc.tunnel.test:8443:1",
        b"abc.tunnel.test/x",
        b"abc.tunnel.test:8443/x",
        b"user@abc.tunnel.test",
        b"user:pw@abc.tunnel.test",
        b"abc.tunnel.test, evil.example",  # two Host lines, as header_map joins them
        b"abc.tunnel.test, abc.tunnel.test",
        b"abc.tunnel.test\tevil",
        b"abc tunnel.test",
        b"[::1]:8443",
        b"abc.tunnel.test:\xd9\xa1",  # a non-ASCII digit
        b"\xc3\xa4bc.tunnel.test",
        b"abc.tunnel.test?x",
        b"abc.tunnel.test#x",
    ],
)
def test_every_other_host_is_refused(value: bytes | None) -> None:
    with pytest.raises(InvalidHost):
        parse_host(value)


FORGED = [
    b"X-Forwarded-For",
    b"X_Forwarded_For",
    b"x_forwarded-for",
    b"X-FORWARDED-HOST",
    b"X-Forwarded-Port",
    b"X-Forwarded-Prefix",
    b"X-Forwarded-Scheme",
    b"X-Forwarded-Ssl",
    b"X-Forwarded-Server",
    b"X-Forwarded-Proto",
    b"X_Forwarded_Proto",
    b"X-Forwarded",
    b"Forwarded",
    b"X-Real-IP",
    b"X_Real_Ip",
    b"X-Client-IP",
    b"Client-IP",
    b"Client_Ip",
    b"True-Client-IP",
    b"CF-Connecting-IP",
    b"Cf_Connecting_Ip",
    b"CF-Visitor",
    b"Fastly-Client-IP",
    b"X-Cluster-Client-IP",
    b"X-Original-URL",
    b"X-Original-Host",
    b"X-Original-Forwarded-For",
    b"X-Rewrite-URL",
    b"X-Host",
    b"X-Url-Scheme",
    b"X-Scheme",
    b"Front-End-Https",
    b"X-Appengine-User-IP",
    b"X-Remote-Addr",
    b"Remote-Addr",
    b"Proxy",  # httpoxy: CGI makes it HTTP_PROXY
]


def test_no_forwarding_or_identity_header_of_the_client_reaches_the_app_in_any_spelling() -> None:
    sent = [(name, b"6.6.6.6") for name in FORGED] + [(b"X-Request-Id", b"keep"), (b"Accept", b"*/*")]
    lines = head_lines(upstream_request_head(b"GET", b"/", sent, FWD, content_length=None, chunked=False,
                                             websocket=False))  # fmt: skip
    assert lines[1:] == [
        b"Host: abc.tunnel.test",
        b"X-Request-Id: keep",
        b"Accept: */*",
        b"X-Forwarded-For: 203.0.113.7",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Host: abc.tunnel.test",
    ]
    assert b"6.6.6.6" not in b"".join(lines)


def test_framing_and_credential_headers_in_underscore_spellings_never_pass() -> None:
    sent = [
        (b"Transfer_Encoding", b"chunked"),
        (b"Content_Length", b"99"),
        (b"Keep_Alive", b"1"),
        (b"Proxy_Authorization", b"Basic eA=="),
        (b"Connection", b"close, X_Hop"),
        (b"X-Hop", b"1"),
        (b"Host_", b"x"),
    ]
    lines = head_lines(upstream_request_head(b"POST", b"/", sent, FWD, content_length=b"5", chunked=False,
                                             websocket=False))  # fmt: skip
    assert [line for line in lines[1:] if not line.startswith(b"X-Forwarded-")] == [
        b"Host: abc.tunnel.test",
        b"Host_: x",
        b"Content-Length: 5",
    ]


def test_the_app_cannot_set_or_clear_the_gateways_cookies() -> None:
    headers = [
        (b"Set-Cookie", b"__Host-gw=planted; Path=/; Secure"),
        (b"set-cookie", b"__host-gw=planted"),
        (b"SET-COOKIE", b" __HOST-GW =x; Domain=tunnel.test"),
        (b"Set-Cookie", b"__Host-gw"),  # no `=`: sent back as `__Host-gw`, which servers read as the name
        (b"Set-Cookie", b"=__Host-gw=planted; Path=/"),  # nameless: sent back as `__Host-gw=planted`
        (b"Set-Cookie", b" = __host-gw"),
        (b"Set-Cookie", b'__Host-gw=""; Max-Age=0'),
        (b"Set-Cookie", b"app=1; Path=/"),
        (b"Set-Cookie", b"x__Host-gw=1"),
        (b"Set-Cookie", b"=x__Host-gw=1"),
        (b"Set-Cookie", b"a=1, __Host-gw=planted; Path=/"),  # two cookies for clients that split on `,`
        (b"Set-Cookie", b"b=2; Expires=Wed, 09 Jun 2100 10:18:14 GMT; Path=/"),
        (b"Clear-Site-Data", b'"cookies"'),
        (b"clear-site-data", b'"cache", "*"'),
        (b"Clear-Site-Data", b'"Cookies"'),
        (b"Clear-Site-Data", b'"cache", "storage"'),
    ]
    framing = response_framing(200, {}, head_request=True, client_keep_alive=True, client_http11=True)
    lines = head_lines(client_response_head(200, b"OK", headers, framing, gateway_cookies=frozenset({b"__host-gw"})))
    assert lines == [
        b"HTTP/1.1 200 OK",
        b"Set-Cookie: app=1; Path=/",
        b"Set-Cookie: x__Host-gw=1",
        b"Set-Cookie: =x__Host-gw=1",
        b"Set-Cookie: b=2; Expires=Wed, 09 Jun 2100 10:18:14 GMT; Path=/",
        b'Clear-Site-Data: "cache", "storage"',
    ]


def test_reason_phrases() -> None:
    assert valid_reason(b"OK") and valid_reason(b"Not\tFound \xe9") and valid_reason(b"")
    assert not valid_reason(b"OK\x00") and not valid_reason(b"O\x7fK") and not valid_reason(b"\x1b[31m")


def test_a_204_never_announces_a_body() -> None:
    headers = [(b"Content-Length", b"5"), (b"X-App", b"1")]
    no_content = response_framing(
        204, {b"content-length": b"5"}, head_request=False, client_keep_alive=True, client_http11=True
    )
    assert head_lines(client_response_head(204, b"", headers, no_content)) == [b"HTTP/1.1 204 No Content", b"X-App: 1"]
    # A 304 or an answer to HEAD keeps its length: it is the length of what a GET would get.
    not_modified = response_framing(
        304, {b"content-length": b"5"}, head_request=False, client_keep_alive=True, client_http11=True
    )
    assert b"Content-Length: 5" in head_lines(client_response_head(304, b"", headers, not_modified))
