"""The gateway's stub resolver against a real tiny authoritative server on loopback (dnslib's, UDP and TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver

from gateway.resolver import ResolveError, Resolver, ResolverConfig, Upstream, exchange, parse_upstream
from tests import authdns

ZONE: dict[str, list[tuple[str, str, int]]] = {
    "one.test": [("A", "192.0.2.1", 300), ("AAAA", "2001:db8::1", 300)],
    "short.test": [("A", "192.0.2.2", 1)],
    "long.test": [("A", "192.0.2.3", 999_999)],
    "alias.test": [("CNAME", "mid.test", 60)],
    "mid.test": [("CNAME", "one.test", 30)],
    "v4only.test": [("A", "192.0.2.4", 300)],
    "big.test": [("A", f"198.51.100.{i}", 300) for i in range(1, 101)],
    # For the egress planning tests (tests/unit/test_egress.py), which reuse this server.
    "private.test": [("A", "10.0.0.5", 300)],
    "mixed.test": [("A", "10.0.0.6", 300), ("A", "192.0.2.9", 300)],
    "metadata.test": [("A", "169.254.169.254", 300)],
}


class Zone(BaseResolver):
    def __init__(self) -> None:
        self.queries: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname, qtype, handler.protocol))
        name = qname
        for _ in range(10):
            records = ZONE.get(name)
            if records is None:
                if name == qname:
                    reply.header.rcode = 3  # NXDOMAIN
                return reply
            target = None
            for rtype, value, ttl in records:
                if rtype == qtype:
                    rdata = A(value) if rtype == "A" else AAAA(value)
                    reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
                elif rtype == "CNAME":
                    reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(value), ttl=ttl))
                    target = value
            if target is None:
                return reply
            name = target
        return reply


@pytest.fixture
def server() -> Iterator[tuple[Zone, int]]:
    zone = Zone()
    with authdns.serve(zone) as port:
        yield zone, port


def make(port: int, *, min_ttl: int = 5, max_ttl: int = 3600, timeout: float = 1.0, extra: tuple[Upstream, ...] = ()):
    config = ResolverConfig((), timeout, min_ttl, max_ttl)
    return Resolver(config, upstreams=(*extra, Upstream("127.0.0.1", port)))


async def test_a_and_aaaa_with_cache(server: tuple[Zone, int]) -> None:
    zone, port = server
    resolver = make(port)
    result = await resolver.resolve("One.Test.")
    assert set(result.addresses) == {"192.0.2.1", "2001:db8::1"}
    assert result.ttl == 300
    before = len(zone.queries)
    assert await resolver.resolve("one.test") == result  # from the cache: the same addresses and TTL
    assert len(zone.queries) == before == 2  # A + AAAA once, then the cache


async def test_ttl_is_clamped(server: tuple[Zone, int]) -> None:
    _, port = server
    resolver = make(port, min_ttl=10, max_ttl=600)
    assert (await resolver.resolve("short.test")).ttl == 10
    assert (await resolver.resolve("long.test")).ttl == 600


async def test_cname_chain_is_followed_within_the_answer(server: tuple[Zone, int]) -> None:
    _, port = server
    result = await make(port).resolve("alias.test")
    assert set(result.addresses) == {"192.0.2.1", "2001:db8::1"}
    assert result.ttl == 30  # the smallest TTL on the chain


async def test_nxdomain_is_raised_and_cached(server: tuple[Zone, int]) -> None:
    zone, port = server
    resolver = make(port)
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve("missing.test")
    assert caught.value.code == "NXDOMAIN"
    count = len(zone.queries)
    with pytest.raises(ResolveError):
        await resolver.resolve("missing.test")
    assert len(zone.queries) == count


async def test_one_family_only_is_fine(server: tuple[Zone, int]) -> None:
    _, port = server
    assert (await make(port).resolve("v4only.test")).addresses == ("192.0.2.4",)


async def test_truncated_udp_answer_is_retried_over_tcp(server: tuple[Zone, int]) -> None:
    zone, port = server
    result = await make(port).resolve("big.test")
    assert len(result.addresses) == 100
    assert ("big.test", "A", "udp") in zone.queries and ("big.test", "A", "tcp") in zone.queries


async def test_concurrent_lookups_share_one_query(server: tuple[Zone, int]) -> None:
    zone, port = server
    resolver = make(port)
    results = await asyncio.gather(*(resolver.resolve("one.test") for _ in range(20)))
    assert len({r.addresses for r in results}) == 1
    assert len(zone.queries) == 2


@contextlib.contextmanager
def silent_udp() -> Iterator[int]:
    """A UDP port that receives and never answers (a dead upstream)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_timeout_then_next_upstream(server: tuple[Zone, int]) -> None:
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
