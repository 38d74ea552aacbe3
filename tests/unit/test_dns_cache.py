"""The per-sandbox DNS cache with a fake clock and real answers built by the policy layer."""

from __future__ import annotations

import struct

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from gateway.dns.answer import Answer, Outcome, accept_upstream
from gateway.dns.cache import DnsCache, Ready
from gateway.dns.config import DnsConfig
from gateway.dns.wire import Code, parse_query, render, upstream_packet
from tests.factory import Clock, policy, query

CONFIG = DnsConfig(min_ttl=5, max_ttl=3600)
OPEN = policy("unrestricted")


def answer_for(name: str, address: str, ttl: int, qtype: str = "A") -> Answer:
    q = parse_query(query(name, qtype))
    reply = DNSRecord.parse(upstream_packet(q, CONFIG)).reply()
    reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=ttl))
    return accept_upstream(q, bytes(reply.pack()), OPEN, CONFIG)


def test_entries_never_cross_sandboxes_and_keys_are_name_type_and_do() -> None:
    cache = DnsCache(clock=Clock())
    cache.put("sb1", "One.Test", QTYPE.A, False, answer_for("one.test", "192.0.2.1", 300))
    assert cache.get("sb2", "one.test", QTYPE.A, False) is None
    hit = cache.get("sb1", "ONE.TEST", QTYPE.A, False)
    assert hit is not None and hit[1] == 0
    assert cache.get("sb1", "one.test", QTYPE.AAAA, False) is None
    assert cache.get("sb1", "one.test", QTYPE.A, True) is None  # DNSSEC answers are a different entry
    assert (cache.hits, cache.misses) == (1, 3)


def test_ttl_expiry_and_decrement_on_the_way_out() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock)
    cache.put("sb1", "one.test", QTYPE.A, False, answer_for("one.test", "192.0.2.1", 60))
    clock.now += 42.5
    entry, elapsed = cache.get("sb1", "one.test", QTYPE.A, False)
    q = parse_query(query("one.test", qid=7))
    out = DNSRecord.parse(render(entry.answer.wire, entry.answer.offsets, elapsed, q))
    assert out.header.id == 7 and out.rr[0].ttl == 18
    clock.now += 17.5
    assert cache.get("sb1", "one.test", QTYPE.A, False) is None
    assert len(cache) == 0


def test_uncacheable_answers_are_not_stored() -> None:
    cache = DnsCache(clock=Clock())
    answer = answer_for("one.test", "192.0.2.1", 60)
    zero = Answer(answer.wire, answer.offsets, answer.rcode, 0)
    assert not cache.put("sb1", "one.test", QTYPE.A, False, zero)
    assert len(cache) == 0


def test_lru_bound_per_sandbox_and_globally() -> None:
    clock = Clock()
    cache = DnsCache(max_per_sandbox=3, max_total=5, clock=clock)
    answer = answer_for("one.test", "192.0.2.1", 300)
    for i in range(3):
        cache.put("sb1", f"n{i}.test", QTYPE.A, False, answer)
    cache.get("sb1", "n0.test", QTYPE.A, False)  # n0 is now the most recently used
    cache.put("sb1", "n3.test", QTYPE.A, False, answer)
    assert cache.get("sb1", "n1.test", QTYPE.A, False) is None  # the least recently used went
    assert cache.get("sb1", "n0.test", QTYPE.A, False) is not None
    assert cache.size("sb1") == 3
    for i in range(3):
        cache.put("sb2", f"m{i}.test", QTYPE.A, False, answer)
    # 6 > 5: the least recently active sandbox (sb1) loses its oldest entry.
    assert len(cache) == 5 and cache.size("sb1") == 2 and cache.size("sb2") == 3


def test_flush_and_policy_change() -> None:
    cache = DnsCache(clock=Clock())
    answer = answer_for("one.test", "192.0.2.1", 300)
    first, second = (
        policy("allowlisted", {"allow_hosts": ["one.test"]}),
        policy("allowlisted", {"allow_hosts": ["a.b"]}),
    )
    assert not cache.bind_policy("sb1", first)
    cache.put("sb1", "one.test", QTYPE.A, False, answer)
    cache.put("sb2", "one.test", QTYPE.A, False, answer)
    assert not cache.bind_policy("sb1", first)  # the same policy object: nothing changes
    assert cache.get("sb1", "one.test", QTYPE.A, False) is not None
    assert cache.bind_policy("sb1", second)
    assert cache.get("sb1", "one.test", QTYPE.A, False) is None
    assert cache.bound("sb1") is second
    assert cache.flush("sb2") == 1 and len(cache) == 0
    cache.forget("sb1")
    assert cache.bound("sb1") is None


def test_clear_forgets_every_answer_and_kept_response_and_keeps_the_policy_bindings() -> None:
    cache = DnsCache(clock=Clock())
    bound = policy("allowlisted", {"allow_hosts": ["one.test"]})
    cache.bind_policy("sb1", bound)
    outcome = Outcome("one.test", "A", 0, (), True, Code.CACHED, "", "", True)
    for sandbox in ("sb1", "sb2"):
        cache.put(sandbox, "one.test", QTYPE.A, False, answer_for("one.test", "192.0.2.1", 300))
        cache.put_ready(sandbox, b"packet", Ready(b"r", outcome, 0))
    cache.clear()
    assert (len(cache), cache.ready_size()) == (0, 0)
    assert cache.get("sb1", "one.test", QTYPE.A, False) is None and cache.get_ready("sb2", b"packet") is None
    assert cache.bound("sb1") is bound
    cache.put("sb1", "one.test", QTYPE.A, False, answer_for("one.test", "192.0.2.1", 300))
    assert cache.size() == 1  # the totals start again from nothing


def test_answer_wire_ttl_offsets_are_right() -> None:
    answer = answer_for("one.test", "192.0.2.1", 123)
    (offset,) = answer.offsets
    assert struct.unpack_from("!I", answer.wire, offset)[0] == 123


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError):
        DnsCache(max_per_sandbox=0)


def test_ready_responses_expire_with_their_answer_and_go_with_the_sandboxs_entries() -> None:
    clock = Clock()
    cache = DnsCache(max_per_sandbox=2, max_total=3, clock=clock)
    outcome = Outcome("one.test", "A", 0, (), True, Code.CACHED, "", "", True)
    entry = cache.put("sb1", "one.test", QTYPE.A, False, answer_for("one.test", "192.0.2.1", 60))
    assert entry is not None
    cache.put_ready("sb1", b"from-answer", Ready(b"r1", outcome, 0, entry))
    cache.put_ready("sb1", b"from-policy", Ready(b"r2", outcome, 0))
    clock.now += 30.5
    hit = cache.get_ready("sb1", b"from-answer")
    assert hit is not None and hit[0].response == b"r1" and hit[1] == 30.5
    assert cache.get_ready("sb2", b"from-answer") is None  # per sandbox
    clock.now += 30
    assert cache.get_ready("sb1", b"from-answer") is None  # its answer's TTL is over
    assert cache.get_ready("sb1", b"from-policy") is not None  # lives until the policy changes
    for key in (b"a", b"b", b"c"):
        cache.put_ready("sb1", key, Ready(b"r", outcome, 0))
    assert cache.ready_size("sb1") == 2 and cache.size("sb1") == 1  # bounded on their own
    cache.put_ready("sb2", b"a", Ready(b"r", outcome, 0))
    cache.put_ready("sb3", b"a", Ready(b"r", outcome, 0))
    assert cache.ready_size() == 3 and cache.ready_size("sb1") == 1  # globally too: sb1 was the least recent
    cache.bind_policy("sb2", policy("allowlisted", {"allow_hosts": ["one.test"]}))
    cache.bind_policy("sb2", policy("allowlisted", {"allow_hosts": ["two.test"]}))
    assert cache.ready_size("sb2") == 0  # a policy change flushes them
    cache.flush("sb3")
    assert cache.ready_size("sb3") == 0
