"""The gateway's stub resolver against a real tiny authoritative server on loopback (dnslib's, UDP and TCP)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from gateway.resolver import ResolveError, Resolver, ResolverConfig, Upstream, exchange, parse_upstream
from tests.factory import ResolverZone, make, resolver_server  # noqa: F401  (the fixture `server`)


@contextlib.contextmanager
def silent_udp() -> Iterator[int]:
    """A UDP port that receives and never answers (a dead upstream)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_timeout_then_next_upstream(server: tuple[ResolverZone, int]) -> None:
    _, port = server
    with silent_udp() as dead:
        resolver = make(port, timeout=0.3, extra=(Upstream("127.0.0.1", dead),))
        assert (await resolver.resolve("v4only.test")).addresses == ("192.0.2.4",)
        alone = Resolver(ResolverConfig((), 0.3, 5, 3600), upstreams=(Upstream("127.0.0.1", dead),))
        with pytest.raises(ResolveError) as caught:
            await alone.resolve("one.test")
        assert caught.value.code == "TIMEOUT"


async def test_spoofed_answers_with_a_wrong_id_or_question_are_ignored() -> None:
    """A responder that first sends a wrong id and a wrong question, then the real answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(3)
    port = sock.getsockname()[1]

    def respond() -> None:
        with contextlib.suppress(OSError):
            data, peer = sock.recvfrom(4096)
            query = DNSRecord.parse(data)
            wrong_id = query.reply()
            wrong_id.header.id = (query.header.id + 1) % 65536
            wrong_id.add_answer(RR("one.test", QTYPE.A, rdata=A("203.0.113.66"), ttl=60))
            wrong_q = DNSRecord.question("evil.test").reply()
            wrong_q.header.id = query.header.id
            wrong_q.add_answer(RR("evil.test", QTYPE.A, rdata=A("203.0.113.67"), ttl=60))
            good = query.reply()
            good.add_answer(RR("one.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
            for reply in (wrong_id, wrong_q, good):
                sock.sendto(reply.pack(), peer)

    thread = threading.Thread(target=respond, daemon=True)
    thread.start()
    try:
        query = DNSRecord.question("one.test")
        query.header.id = 4242
        answer = DNSRecord.parse(await exchange(query.pack(), (Upstream("127.0.0.1", port),), 2.0))
        assert answer.header.id == 4242  # the caller's id is restored
        assert [str(rr.rdata) for rr in answer.rr] == ["192.0.2.1"]
    finally:
        thread.join(3)
        sock.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", Upstream("192.0.2.53", 53)),
        ("192.0.2.53:5353", Upstream("192.0.2.53", 5353)),
        ("[2001:db8::53]:5353", Upstream("2001:db8::53", 5353)),
        ("[2001:db8::53]", Upstream("2001:db8::53", 53)),
        ("2001:db8::53", Upstream("2001:db8::53", 53)),
    ],
)
def test_parse_upstream(text: str, expected: Upstream) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize("text", ["dns.example", "192.0.2.1:0", "192.0.2.1:x", "[2001:db8::1"])
def test_parse_upstream_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream(text)


async def test_a_cached_name_with_only_a_records_is_answered_without_suspending(
    server: tuple[ResolverZone, int],
) -> None:
    """Its AAAA answer (NODATA) is cached like any answer: the per-connection path takes no tasks or waits."""
    _, port = server
    resolver = make(port)
    assert (await resolver.resolve("v4only.test")).addresses == ("192.0.2.4",)
    again = resolver.resolve("v4only.test")
    with pytest.raises(StopIteration) as done:
        again.send(None)  # a coroutine that never suspends finishes on its first step
    assert done.value.value.addresses == ("192.0.2.4",)
