"""The inspection tier's pure decisions (gateway.addons.enforce) and the hand-over context they read."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest

from gateway.addons.enforce import (
    MIN_SECRET_LENGTH,
    REDACTED,
    Decision,
    Scrubber,
    credential_headers,
    decide,
    framing_fault,
    names_host,
    names_sni,
    parse_secrets,
    path_fault,
    request_path,
    scrubber_for,
    target_fault,
)
from gateway.inspection import (
    MAX_HANDOVER_LINE,
    Credential,
    HeaderMatch,
    InspectionContext,
    InspectRule,
    handover_line,
    parse_handover,
)

RULE = InspectRule(
    hosts=("api.example.com",),
    methods=("GET",),
    paths=("/repos/*",),
    headers=(HeaderMatch("accept", prefix="application/"),),
    credentials=(Credential("authorization", "github", "Bearer {secret}"), Credential("x-api-key", "other")),
)
CONTEXT = InspectionContext(
    "sb-1", "api.example.com", 443, "api.example.com", RULE, "10.75.0.10", 40000, "1.2.3.4", 443, "r0123456789ab"
)
SECRETS = {"github": "ghp_0123456789", "other": "key-abcdefgh"}


def fields(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def test_the_context_survives_the_hand_over_line() -> None:
    token = CONTEXT.encode()
    assert token.isascii() and "\r" not in token and "\n" not in token
    assert InspectionContext.decode(token) == CONTEXT
    with pytest.raises((ValueError, KeyError, TypeError)):
        InspectionContext.decode(base64.urlsafe_b64encode(b'{"sandbox": "x"}').decode())
    # The revision its records name: the engine's policy's, a revision id or none; anything else is no context.
    assert InspectionContext.decode(replace(CONTEXT, revision=None).encode()).revision is None
    with pytest.raises(ValueError, match="revision"):
        InspectionContext.decode(replace(CONTEXT, revision="r1; drop").encode())


def test_the_hand_over_line_round_trips() -> None:
    line = handover_line("tok-123", "2001:db8::1", 443, CONTEXT)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) < MAX_HANDOVER_LINE
    assert parse_handover(line, "tok-123") == ("2001:db8::1", 443, CONTEXT)


GOOD = handover_line("tok-123", "192.0.2.7", 443, CONTEXT)


@pytest.mark.parametrize(
    ("line", "token", "why"),
    [
        (GOOD, "tok-124", "token is wrong"),
        (GOOD, "", "token is wrong"),  # no token configured: nobody, not everybody
        (GOOD.replace(b"tok-123", b"tok-12"), "tok-123", "token is wrong"),  # a prefix of the token
        (b"GET / HTTP/1.1\r\n", "tok-123", "not a GATEWAY-HANDOVER/1 line"),  # a request without a hand-over
        (b"CONNECT 192.0.2.7:443 HTTP/1.1\r\n", "tok-123", "not a GATEWAY-HANDOVER/1 line"),
        (GOOD.replace(b"/1 ", b"/2 "), "tok-123", "not a GATEWAY-HANDOVER/1 line"),
        (GOOD.replace(b" 443 ", b" 443  "), "tok-123", "not a GATEWAY-HANDOVER/1 line"),  # an extra word
        (GOOD.replace(b"192.0.2.7", b"api.example.com"), "tok-123", "does not appear to be an IPv4 or IPv6"),
        (GOOD.replace(b" 443 ", b" 8443 "), "tok-123", "port 8443 is not the context's 443"),
        (GOOD.replace(b" 443 ", b" x "), "tok-123", "invalid literal"),
        (GOOD[:-20] + b"\n", "tok-123", "context is not the engine's"),
        (GOOD.rsplit(b" ", 1)[0] + b" " + base64.urlsafe_b64encode(b'{"sandbox": "x"}') + b"\n", "tok-123", "engine's"),
        (b"GATEWAY-HANDOVER/1 \xff 192.0.2.7 443 x\n", "tok-123", "token is wrong"),
    ],
)
def test_a_hand_over_line_not_the_engines_is_refused(line: bytes, token: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_handover(line, token)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("api.example.com", True),
        ("API.Example.COM.", True),
        ("api.example.com:443", True),
        ("api.example.com:8443", False),
        ("api.example.com:", False),
        ("api.example.com:+443", False),
        ("evil.example.com", False),
        ("user@api.example.com", False),
        ("api.example.com.evil", False),
        ("", False),
    ],
)
def test_names_host(value: str, expected: bool) -> None:
    assert names_host(value, "api.example.com", 443) is expected


def test_names_sni() -> None:
    assert names_sni("API.example.com", "api.example.com")
    assert not names_sni(None, "api.example.com")
    assert not names_sni("cdn.example.com", "api.example.com")


def test_every_named_host_must_be_the_connections() -> None:
    assert target_fault("", ["api.example.com"], "api.example.com", 443) is None
    assert target_fault("api.example.com", [], "api.example.com", 443) is None
    assert (
        target_fault("", [], "api.example.com", 443)
        == "the request names no host (this connection is for api.example.com)"
    )
    assert target_fault("api.example.com", ["cdn.example.com"], "api.example.com", 443) is not None
    assert target_fault("cdn.example.com", ["api.example.com"], "api.example.com", 443) is not None


@pytest.mark.parametrize(
    ("version", "pairs", "fault"),
    [
        ("HTTP/1.1", [("X-Folded", "one\r\n two")], "header x-folded has a line break or NUL in its value"),
        ("HTTP/1.1", [("X-Nul", "a\x00b")], "header x-nul has a line break or NUL in its value"),
        ("HTTP/1.1", [("Host", "a"), ("host", "a")], "more than one Host header"),
        ("HTTP/2.0", [("connection", "keep-alive")], "connection-specific header connection"),
        ("HTTP/2.0", [("upgrade", "h2c")], "connection-specific header upgrade"),
        ("HTTP/2.0", [("te", "gzip")], "connection-specific header te"),
        ("HTTP/3", [("transfer-encoding", "chunked")], "connection-specific header transfer-encoding"),
    ],
)
def test_framing_faults(version: str, pairs: list[tuple[str, str]], fault: str) -> None:
    found = framing_fault(version, fields(*pairs))
    assert found is not None and found.startswith(fault)


def test_well_framed_requests_pass() -> None:
    assert framing_fault("HTTP/2.0", fields(("te", "trailers"), ("accept", "*/*"))) is None
    assert framing_fault("HTTP/1.1", fields(("Connection", "keep-alive"), ("Host", "a"))) is None


@pytest.mark.parametrize(
    "path",
    ["/repos/../admin", "/repos/%2e%2e/admin", "/repos/%2E./admin", "/repos/%252e%252e/admin", "/repos\\..\\admin",
     "/repos/./x", "/..", "repos/x", "http://x/"],
)  # fmt: skip
def test_paths_an_origin_could_read_past_a_rule_are_refused(path: str) -> None:
    assert path_fault(path, "GET") is not None


@pytest.mark.parametrize("path", ["/repos/a/b", "/repos/a..b", "/.well-known/x", "/a%2fb"])
def test_ordinary_paths_pass(path: str) -> None:
    assert path_fault(path, "GET") is None


def test_options_star_is_a_path() -> None:
    assert path_fault("*", "OPTIONS") is None and path_fault("*", "GET") is not None


def test_request_path_drops_the_query() -> None:
    assert request_path("/a/b?token=x#frag") == "/a/b"
    assert request_path("/a#f?x") == "/a"


JSON_ACCEPT = (("Host", "api.example.com"), ("Accept", "application/json"))


def ask(
    context: InspectionContext = CONTEXT,
    *,
    method: str = "GET",
    target: str = "/repos/x?page=2",
    headers: tuple[tuple[str, str], ...] = JSON_ACCEPT,
) -> Decision:
    return decide(context, http_version="HTTP/1.1", method=method, target=target, authority="", fields=fields(*headers))


def test_decide_in_order_framing_target_path_rules() -> None:
    assert ask().allowed
    assert ask(method="POST", headers=(("Host", "cdn.example.com"), ("X", "a\r\n b"))).status == 400
    assert ask(method="POST", target="/../x", headers=(("Host", "cdn.example.com"),)).status == 421
    dots = ask(method="POST", target="/repos/%2e%2e/admin")
    assert (dots.status, dots.failed) == (400, "path")
    post = ask(method="POST")
    assert (post.status, post.failed) == (403, "method")
    other = ask(target="/user")
    assert (other.status, other.failed) == (403, "path")
    html = ask(headers=(("Host", "api.example.com"), ("Accept", "text/html")))
    assert (html.status, html.failed) == (403, "header accept")


def test_decide_uses_the_operators_reason_and_refuses_trace() -> None:
    anything = replace(CONTEXT, rule=replace(RULE, methods=(), paths=(), headers=(), deny_reason="read-only"))
    trace = ask(anything, method="TRACE")
    assert (trace.status, trace.reason) == (403, "read-only")
    assert ask(anything, method="DELETE").allowed


def test_credentials_render_their_templates() -> None:
    assert credential_headers(CONTEXT, SECRETS) == [
        ("authorization", "Bearer ghp_0123456789"),
        ("x-api-key", "key-abcdefgh"),
    ]
    assert credential_headers(CONTEXT, {"github": "ghp_0123456789"}) is None  # fail closed on a missing secret
    assert credential_headers(replace(CONTEXT, rule=replace(RULE, credentials=())), {}) == []


def test_the_scrubber_removes_every_form_of_a_secret() -> None:
    secret = 'tok/en+"x&y'
    scrub = Scrubber([secret, "tok/en"])
    echoed = f"raw={secret} json={json.dumps(secret)} url=tok%2Fen%2B%22x%26y part=tok/en".encode()
    clean = scrub.data(echoed)
    assert clean == f'raw={REDACTED} json="{REDACTED}" url={REDACTED} part={REDACTED}'.encode()
    assert scrub.text(f"Bearer {secret}") == f"Bearer {REDACTED}"


def test_a_scrubber_without_secrets_changes_nothing() -> None:
    scrub = scrubber_for(replace(CONTEXT, rule=replace(RULE, credentials=())), SECRETS)
    assert not scrub and scrub.data(b"ghp_0123456789") == b"ghp_0123456789"
    assert scrubber_for(CONTEXT, SECRETS).data(b"x ghp_0123456789 key-abcdefgh") == f"x {REDACTED} {REDACTED}".encode()


def test_the_secrets_file() -> None:
    assert parse_secrets('{"github": "ghp_0123456789"}') == {"github": "ghp_0123456789"}
    for bad in ('["x"]', '{"a": 1}', '{"a": "short"}', '{"a": "0123456789\\r\\nX: y"}'):
        with pytest.raises(ValueError):
            parse_secrets(bad)
    assert MIN_SECRET_LENGTH == 8
