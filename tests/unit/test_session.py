"""The peek session (gateway.engine.session): typed results from bytes read under a deadline and a bound."""

from __future__ import annotations

import asyncio

from gateway.engine.guard import HttpGuard
from gateway.engine.session import Closed, HttpRequest, Opaque, Peeker, PeekFailed, TlsHello, peek
from gateway.peek.classify import TrafficKind
from tests.factory import genuine_hello, policy


def _reader(*chunks: bytes, eof: bool = False) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


async def test_peek_http_head_split_across_segments_and_pipelined_requests() -> None:
    segments = [b"GET / HT", b"TP/1.1\r\nHost: a.test\r\n", b"\r\nGET /2 HTTP/1.1\r\nHost: b.test\r\n\r\n"]

    async def recv(limit: int) -> bytes:  # one segment a read, as they would arrive from a slow client
        segment = segments.pop(0)
        assert len(segment) <= limit
        return segment

    peeked = await peek(recv, 2.0, 16384)
    assert not segments and isinstance(peeked, HttpRequest) and peeked.head.host == "a.test"
    guard = HttpGuard(policy("allowlisted", {"allow_hosts": ["a.test"]}), peeked.tracker, "a.test", 80)
    refused = guard.check(peeked.later, 0)  # the second head came in the read that ended the first
    assert refused is not None and refused.refusal is not None
    assert refused.refusal[0] == "host b.test: host not in allowlist"


async def test_peek_gives_up_within_bounds() -> None:
    peeked = await peek(_reader(b"\x16\x03\x01\x00").read, 0.2, 16384)
    assert isinstance(peeked, PeekFailed) and peeked.kind is TrafficKind.TLS and "within 0.2s" in peeked.reason
    silent = await peek(_reader().read, 0.1, 16384)
    assert isinstance(silent, Opaque) and not silent.data  # server-speaks-first: decided by address
    opaque = await peek(_reader(b"SSH-2.0-OpenSSH_9.6\r\n").read, 1.0, 16384)
    assert isinstance(opaque, Opaque) and bytes(opaque.data) == b"SSH-2.0-OpenSSH_9.6\r\n"
    big = await peek(_reader(b"GET /" + b"a" * 5000).read, 1.0, 2048)
    assert isinstance(big, PeekFailed) and big.kind is TrafficKind.HTTP and big.reason
    closed = await peek(_reader(eof=True).read, 1.0, 16384)
    assert isinstance(closed, Closed)
    cut_short = await peek(_reader(b"\x16\x03\x01", eof=True).read, 1.0, 16384)
    assert isinstance(cut_short, PeekFailed) and cut_short.kind is TrafficKind.TLS
    assert cut_short.reason == "client closed the connection before its request was complete"


async def test_peek_counts_the_time_already_waited_against_its_deadline() -> None:
    # A connection the kernel held for the deferred accept has spent that much of its deadline: the peek gives up
    # when the rest is over (well inside the whole deadline), and says the deadline the operator configured.
    partial = await asyncio.wait_for(peek(_reader(b"\x16\x03\x01\x00").read, 5.0, 16384, waited=4.8), 2.0)
    assert isinstance(partial, PeekFailed) and "within 5.0s" in partial.reason
    silent = await asyncio.wait_for(peek(_reader().read, 5.0, 16384, waited=5.0), 1.0)
    assert isinstance(silent, Opaque) and not silent.data


def test_peeker_decides_from_bytes_already_read_and_keeps_every_byte() -> None:
    hello = genuine_hello("one.test")
    whole = Peeker(16384).feed(hello)
    assert isinstance(whole, TlsHello)
    assert whole.hello.sni == "one.test" and bytes(whole.data) == hello
    split = Peeker(16384)
    assert split.feed(hello[:3]) is None and split.feed(hello[3:40]) is None  # undecided: the engine waits
    rest = split.feed(hello[40:])
    assert isinstance(rest, TlsHello) and bytes(rest.data) == hello
    bounded = Peeker(64)
    assert bounded.feed(b"GET /" + b"a" * 59) is None and bounded.want == 0
    assert bounded.too_large() == PeekFailed(TrafficKind.HTTP, "http header larger than 64 bytes")
