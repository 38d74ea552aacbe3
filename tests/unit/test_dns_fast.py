"""The interceptor's shorter way for a packet it answered before (`DnsInterceptor._answer_again`), driven through
`handle_now` with a fake clock: same bytes as the slow way, per sandbox, invalidated by policy and list changes."""

from __future__ import annotations

import ipaddress
import re
import string
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from gateway.decision import DEFAULT_LIMITS
from gateway.dns import server as dns_server
from gateway.dns.answer import accept_upstream
from gateway.dns.blocklist import DomainBlocklist
from gateway.dns.cache import DnsCache
from gateway.dns.config import DnsConfig
from gateway.dns.server import DnsInterceptor
from gateway.dns.wire import Code, parse_query, query_key, splice, upstream_packet
from gateway.learned import LearnedDestinations
from gateway.presets import BUILTIN_PRESETS
from gateway.ratelimit import ConnectionRateLimiter
from gateway.resolver import Upstream
from gateway.state import PolicyContext, PolicyState
from tests.factory import DENIAL_SUFFIX, Clock, ede_of, query

SERVER = ("127.0.0.1", 53)
SB1, SB2 = ("10.75.0.1", 5301), ("10.75.0.2", 5302)
HOSTS = {"allow_hosts": ["one.test", "two.test"]}


class Env:
    def __init__(self, tmp: Path, limit: int = 1000) -> None:
        self.clock = Clock()
        self.state = PolicyState(
            PolicyContext((ipaddress.ip_network("10.75.0.0/16"),), BUILTIN_PRESETS, DEFAULT_LIMITS)
        )
        self.limit = limit
        self.set("sb1", "10.75.0.1", HOSTS)
        self.set("sb2", "10.75.0.2", HOSTS)
        self.blocklist_path = tmp / "malware.hosts"
        self.blocklist_path.write_text("bad.example\n")
        self.dns = self.interceptor()

    def set(self, sid: str, address: str, egress: dict[str, Any]) -> None:
        raw = {"id": sid, "addresses": [address], "profile": "allowlisted", "egress": egress}
        sandbox = self.state.parse_sandbox({**raw, "limits": {"dns_queries_per_minute": self.limit}})
        self.state.set_sandbox(sandbox)

    def interceptor(self) -> DnsInterceptor:
        """Another interceptor over the same state and clock, with empty caches: what the slow way answers."""
        config = DnsConfig(rate_limit_max_wait=1.0)
        return DnsInterceptor(
            config,
            lambda: self.state,
            upstreams=(Upstream("127.0.0.1", 1),),
            learned=LearnedDestinations(clock=self.clock),
            limiter=ConnectionRateLimiter(clock=self.clock),
            cache=DnsCache(clock=self.clock),
            blocklist=DomainBlocklist(self.blocklist_path, check_interval=0.0, clock=self.clock),
        )

    def upstream_answer(self, dns: DnsInterceptor, sid: str, packet: bytes, address: str, ttl: int) -> None:
        """Put the upstream's answer into `dns`'s cache, as `_forward` would have."""
        q = parse_query(packet)
        policy = self.state.compiled[sid]
        reply = DNSRecord.parse(upstream_packet(q, dns.config)).reply()
        reply.add_answer(RR(q.name, QTYPE.A, rdata=A(address), ttl=ttl))
        dns.cache.bind_policy(sid, policy)
        dns.cache.put(sid, q.name, q.qtype, q.do, accept_upstream(q, bytes(reply.pack()), policy, dns.config))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every packet that took the slow way (was parsed and decided)."""
    calls: list[bytes] = []
    decide = dns_server.decide_packet

    def counting(data: bytes, *args: Any) -> Any:
        calls.append(data)
        return decide(data, *args)

    monkeypatch.setattr(dns_server, "decide_packet", counting)
    yield calls


def ask(dns: DnsInterceptor, packet: bytes, client: tuple[str, int] = SB1) -> bytes:
    response = dns.handle_now(packet, client, SERVER, "udp")
    assert isinstance(response, bytes), response
    return response


def ttls(response: bytes) -> list[int]:
    return [rr.ttl for rr in DNSRecord.parse(response).rr]


def mixed_case(packet: bytes, qid: int) -> bytes:
    """The same query with another id and its name in 0x20 mixed case, as a hardened stub sends it."""
    out = bytearray(packet)
    struct.pack_into("!H", out, 0, qid)
    i = 12
    while out[i]:
        for j in range(i + 1, i + 1 + out[i], 2):
            out[j] = ord(chr(out[j]).upper())
        i += 1 + out[i]
    return bytes(out)


def test_a_cached_answer_again_is_byte_for_byte_the_slow_ways_with_the_ttl_counted_down(
    env: Env, slow_calls: list[bytes]
) -> None:
    for edns in (False, True):
        fast_way, slow_way = env.interceptor(), env.interceptor()
        first = query("one.test", edns=edns, qid=1)
        for dns in (fast_way, slow_way):
            env.upstream_answer(dns, "sb1", first, "192.0.2.1", 300)
        assert ttls(ask(fast_way, first)) == [300]  # the slow way, from the cache: keeps its response ready
        env.clock.now += 7.5
        again = mixed_case(first, 0xBEEF)
        slow_calls.clear()
        fast = ask(fast_way, again)
        assert slow_calls == []  # answered without parsing
        slow = ask(slow_way, again)
        assert slow_calls == [again]
        assert fast == slow
        found = query_key(again)
        assert found is not None and fast[12 : found[1]] == again[12 : found[1]] != first[12 : found[1]]
        assert DNSRecord.parse(fast).header.id == 0xBEEF and ttls(fast) == [293]  # 300 - 7 whole seconds
        env.clock.now += 1.0
        assert ttls(ask(fast_way, again)) == [292]  # rendered again as the second turns
        env.clock.now += 300
        slow_calls.clear()
        assert isinstance(fast_way.handle_now(again, SB1, SERVER, "udp"), dns_server.Pending)  # expired: upstream
        assert slow_calls == [again]


def test_the_question_is_echoed_in_the_clients_own_case(env: Env) -> None:
    denied = query("denied.example", qid=5)
    ask(env.dns, denied)
    shouted = mixed_case(denied, 6)
    response = ask(env.dns, shouted)
    question_end = len(shouted)
    assert response[:2] == b"\x00\x06" and response[12:question_end] == shouted[12:question_end]
    assert DNSRecord.parse(response).header.rcode == RCODE.NXDOMAIN


def test_a_denied_name_again_is_the_same_nxdomain_with_ede_and_is_logged(env: Env, slow_calls: list[bytes]) -> None:
    packet = query("denied.example", edns=True, qid=9)
    first = ask(env.dns, packet)
    second = ask(env.dns, packet)
    assert slow_calls == [packet] and first == second
    # The answer kept for the same packet again repeats its denial id: both records name the first denial.
    code, text = ede_of(second, denial_id=True) or (0, "")
    assert code == 15 and re.fullmatch(
        r"blocked by sandbox policy: host not in allowlist \(denial [0-9a-f-]{19}\)", text
    )
    log = env.dns.query_log("sb1")
    assert log[0]["denial_id"] == log[1]["denial_id"] and log[0]["denial_id"] in text
    assert [(e["name"], e["rcode"], e["code"], e["allowed"]) for e in log] == [
        ("denied.example", "NXDOMAIN", Code.BLOCKED_POLICY, False)
    ] * 2
    assert env.dns.counts[Code.BLOCKED_POLICY] == 2
    assert env.dns.query_counts() == {("BLOCKED_POLICY", "NXDOMAIN", "deny"): 2}  # the short way counts like the slow


def test_a_policy_change_takes_effect_on_the_next_query(env: Env, slow_calls: list[bytes]) -> None:
    allowed, denied = query("one.test"), query("three.test")
    env.upstream_answer(env.dns, "sb1", allowed, "192.0.2.1", 300)
    assert DNSRecord.parse(ask(env.dns, allowed)).header.rcode == RCODE.NOERROR
    assert DNSRecord.parse(ask(env.dns, denied)).header.rcode == RCODE.NXDOMAIN
    env.set("sb1", "10.75.0.1", {"allow_hosts": ["three.test"]})
    slow_calls.clear()
    assert DNSRecord.parse(ask(env.dns, allowed)).header.rcode == RCODE.NXDOMAIN  # no longer allowed
    assert isinstance(env.dns.handle_now(denied, SB1, SERVER, "udp"), dns_server.Pending)  # now asked upstream
    assert slow_calls == [allowed, denied]


def test_a_sandbox_never_gets_another_sandboxs_answer(env: Env) -> None:
    packet = query("one.test")
    env.upstream_answer(env.dns, "sb1", packet, "192.0.2.1", 300)
    ask(env.dns, packet)
    ask(env.dns, packet)
    assert env.dns.cache.ready_size("sb1") == 1
    # sb2 sends the very same bytes: its own cache is empty, so the query goes upstream for it.
    assert isinstance(env.dns.handle_now(packet, SB2, SERVER, "udp"), dns_server.Pending)
    # With a policy that denies the name, sb2 is told NXDOMAIN, whatever sb1 has cached.
    env.set("sb2", "10.75.0.2", {"allow_hosts": ["two.test"]})
    assert DNSRecord.parse(ask(env.dns, packet, SB2)).header.rcode == RCODE.NXDOMAIN


def test_a_hit_refreshes_the_learned_destinations_and_counts_as_cached(env: Env) -> None:
    packet = query("one.test")
    env.upstream_answer(env.dns, "sb1", packet, "192.0.2.1", 300)
    ask(env.dns, packet)
    learned = env.dns.learned
    assert learned is not None and learned.lookup("sb1", "192.0.2.1") == "one.test"
    learned.forget("sb1")  # e.g. pushed out of the bounded table by other answers
    env.clock.now += 10
    hits = env.dns.cache.hits
    ask(env.dns, packet)
    assert learned.lookup("sb1", "192.0.2.1") == "one.test" and env.dns.cache.hits == hits + 1
    env.clock.now += 289.5  # the learned entry lasts as long as the answer's TTL, not longer
    assert learned.lookup("sb1", "192.0.2.1") == "one.test"
    env.clock.now += 1
    assert learned.lookup("sb1", "192.0.2.1") is None
    last = env.dns.query_log("sb1", 1)[0]
    assert (last["code"], last["cached"], last["answers"]) == (Code.CACHED, True, ["192.0.2.1"])
    assert env.dns.query_counts() == {("CACHED", "NOERROR", "allow"): 2}  # the slow way's hit, then the short way's


def test_a_malware_list_change_takes_effect_on_the_next_query(env: Env) -> None:
    packet = query("www.two.test")
    env.set("sb1", "10.75.0.1", {"allow_hosts": ["*.two.test"]})
    env.upstream_answer(env.dns, "sb1", packet, "192.0.2.2", 300)
    assert DNSRecord.parse(ask(env.dns, packet)).header.rcode == RCODE.NOERROR
    env.blocklist_path.write_text("two.test\n# a new line changes the size: the list is read again\n")
    assert DNSRecord.parse(ask(env.dns, packet)).header.rcode == RCODE.NXDOMAIN


def test_the_rate_limit_holds_on_the_short_way(tmp_path: Path, slow_calls: list[bytes]) -> None:
    env = Env(tmp_path, limit=60)  # 60 at once, then one a second; a query waits 1 s at most
    packet = query("denied.example", edns=True)
    for _ in range(60):
        assert DNSRecord.parse(ask(env.dns, packet)).header.rcode == RCODE.NXDOMAIN
    assert slow_calls == [packet]
    pending = env.dns.handle_now(packet, SB1, SERVER, "udp")  # must wait for its token: the slow way queues it
    assert isinstance(pending, dns_server.Pending) and pending.wait == pytest.approx(1.0)
    assert env.dns.handle_now(packet, SB2, SERVER, "udp") is not None  # another sandbox is not affected
    slow_calls.clear()
    again = mixed_case(packet, 77)
    refused = ask(env.dns, again)  # would wait too long: refused, still the short way
    assert slow_calls == []
    assert DNSRecord.parse(refused).header.rcode == RCODE.REFUSED and refused[:2] == b"\x00\x4d"
    assert ede_of(refused) == (0, "dns query rate limit")
    assert env.dns.counts[Code.REFUSED_RATE_LIMIT] == 1
    # Counted once, as refused (not also under the code it was decided with), the 60 before it as answered.
    assert env.dns.query_counts() == {
        ("BLOCKED_POLICY", "NXDOMAIN", "deny"): 61,
        ("REFUSED_RATE_LIMIT", "REFUSED", "deny"): 1,
    }
    assert env.dns.query_log("sb1", 1)[0]["code"] == Code.REFUSED_RATE_LIMIT
    # The slow way refuses the same packet with the same bytes, but for the denial's own id.
    slow_way = env.interceptor()
    other = query("other.example")
    for _ in range(61):
        slow_way.handle_now(other, SB1, SERVER, "udp")
    slow = ask(slow_way, again)
    assert DENIAL_SUFFIX.sub("", slow.decode("latin-1")) == DENIAL_SUFFIX.sub("", refused.decode("latin-1"))
    assert ede_of(slow, denial_id=True) != ede_of(refused, denial_id=True)


@given(
    labels=st.lists(
        st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=20), min_size=1, max_size=4
    ),
    qid=st.integers(0, 0xFFFF),
    edns=st.booleans(),
)
def test_the_key_ignores_the_id_and_the_names_case_and_nothing_else(labels: list[str], qid: int, edns: bool) -> None:
    name = ".".join(labels)
    lower, asked = query(name.lower(), edns=edns, qid=1), query(name, edns=edns, qid=qid)
    found = query_key(asked)
    assert found is not None and found == query_key(lower)
    key, end = found
    assert key == lower[2:]  # everything but the id, the name lowercased
    assert end == 12 + sum(1 + len(label) for label in labels) + 5
    assert splice(asked, end, lower) == asked  # its id and question, the rest from the other
    assert query_key(query(name, "AAAA", edns=edns)) != found
    assert query_key(query(name, edns=not edns)) != found
    assert query_key(query(name, edns=True, do=True)) != query_key(query(name, edns=True))


def test_names_that_are_not_plain_labels_have_no_key() -> None:
    packet = query("one.test")
    assert query_key(packet[:11]) is None  # shorter than a header
    assert query_key(packet[:20]) is None  # the name runs past the end
    assert query_key(packet[:-1]) is None  # type and class cut short
    pointer = packet[:12] + b"\xc0\x0c" + packet[-4:]  # a compression pointer in the question
    assert query_key(pointer) is None
    assert query_key(packet[:12] + b"\x40" + b"a" * 64 + packet[-5:]) is None  # a label over 63 bytes


def test_a_packet_given_no_answer_counts_as_dropped(env: Env) -> None:
    assert env.dns.handle_now(b"\x00\x01", SB1, SERVER, "udp") is None  # shorter than a DNS header
    assert env.dns.query_counts() == {("DROPPED", "DROPPED", "deny"): 1}
