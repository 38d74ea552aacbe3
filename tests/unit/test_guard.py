"""The relay's guards (gateway.engine.guard): later HTTP requests, and the first words of a silent client."""

from __future__ import annotations

import pytest

from gateway.engine.guard import FirstWordsGuard, HttpGuard
from gateway.peek.http1 import HttpRequestTracker
from tests.factory import genuine_hello, policy


def test_http_guard_cuts_a_fronted_request_at_its_offset() -> None:
    tracker = HttpRequestTracker()
    first = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    tracker.feed(first)
    guard = HttpGuard(policy("allowlisted", {"allow_hosts": ["a.test", "b.test"]}), tracker, "a.test", 80)
    chunk = b"GET /again HTTP/1.1\r\nHost: a.test\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n"
    cut = guard.feed(chunk)
    assert cut is not None
    assert chunk[: cut.forward] == b"GET /again HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert cut.refusal is not None and cut.refusal[1] == "builtin:host-mismatch"


@pytest.mark.parametrize(
    "bad", [b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", b"CONNECT a:1 HTTP/1.1\r\n"]
)
def test_http_guard_refuses_smuggling_shapes_later_in_the_stream(bad: bytes) -> None:
    tracker = HttpRequestTracker()
    tracker.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    guard = HttpGuard(policy("allowlisted", {"allow_hosts": ["a.test"]}), tracker, "a.test", 80)
    cut = guard.feed(bad)
    assert cut is not None and cut.forward == 0 and cut.refusal is not None and cut.refusal[1] == "builtin:http"


@pytest.mark.parametrize(
    "pieces",
    [
        [b"GET / HTTP/1.1\r\nHost: b.com\r\n\r\n"],
        [b"G", b"ET / HTTP/1.1\r\n"],  # undecided bytes go; the line that decides is cut
        [b"\r\nget\t/\tHTTP/1.1\r\n"],  # what a lenient server reads as a request line
        [genuine_hello("b.com")],
    ],
)
def test_a_silent_clients_first_bytes_may_be_no_tls_hello_or_http_request(pieces: list[bytes]) -> None:
    guard = FirstWordsGuard(5.0)
    stops = [guard.feed(piece) for piece in pieces]
    assert all(stop is None for stop in stops[:-1])
    last = stops[-1]
    assert last is not None and last.forward == 0 and last.refusal is not None
    assert last.refusal[1] == "builtin:peek" and "said nothing for 5.0s" in last.refusal[0]


def test_a_silent_clients_other_protocol_passes_once_classified() -> None:
    guard = FirstWordsGuard(5.0)
    assert guard.feed(b"SSH-2.0-") is None
    stop = guard.feed(b"OpenSSH_9.6\r\n")
    assert stop is not None and stop.passthrough and stop.forward == len(b"OpenSSH_9.6\r\n") and stop.refusal is None
