"""The DNS interceptor in plain mode on loopback, against a real authoritative server (dnslib's, UDP and TCP),
queried with dig and with raw sockets from 127.0.0.x source addresses that stand for sandboxes."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import re
import shutil
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from dnslib.server import BaseResolver

from gateway.audit_config import AuditConfig
from gateway.decision import DEFAULT_LIMITS
from gateway.dns.budget import NameBudgets
from gateway.dns.config import DnsConfig
from gateway.dns.server import INTERNAL_ERROR, DnsInterceptor
from gateway.dns.wire import Code
from gateway.flowlog import FlowLog
from gateway.learned import LearnedDestinations
from gateway.presets import BUILTIN_PRESETS
from gateway.resolver import Upstream
from gateway.state import PolicyContext, PolicyState
from tests import authdns
from tests.factory import Clock, ede_of, query

ZONE: dict[str, list[tuple[str, Any, int]]] = {
    "one.test": [("A", "192.0.2.1", 300), ("AAAA", "2001:db8::1", 300), ("HTTPS", None, 300)],
    "alias.test": [("CNAME", "mid.test", 60)],
    "mid.test": [("CNAME", "one.test", 30)],
    "big.test": [("A", f"198.51.100.{i}", 300) for i in range(1, 101)],
    "txt.test": [("TXT", "hello from the zone", 300)],
    "signed.test": [("A", "192.0.2.7", 300)],
    "bad.example": [("A", "192.0.2.66", 300)],
    **{
        f"{n}.wild.test": [("A", f"192.0.2.{80 + i}", 300), ("AAAA", f"2001:db8::{80 + i}", 300)]
        for i, n in enumerate(("a", "b", "c", "d"))
    },
}
SIGNED = {"signed.test"}


class Zone(BaseResolver):
    def __init__(self) -> None:
        self.queries: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def count(self, name: str) -> int:
        with self.lock:
            return sum(1 for q in self.queries if q[0] == name)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname, qtype, handler.protocol))
        reply.header.ad = int(qname in SIGNED)
        name = qname
        for _ in range(10):
            records = ZONE.get(name)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN if name == qname else 0
                reply.add_auth(RR("test", QTYPE.SOA, rdata=SOA("ns.test", "h.test", (1, 60, 60, 60, 60)), ttl=60))
                return reply
            target = None
            for rtype, value, ttl in records:
                if rtype == "CNAME":
                    reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(value), ttl=ttl))
                    target = value
                elif rtype == qtype and value is not None:
                    rdata = {"A": A, "AAAA": AAAA, "TXT": TXT}[rtype](value)
                    reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
            if target is None:
                return reply
            name = target
        return reply


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Zone, int]]:
    zone = Zone()
    with authdns.serve(zone) as port:
        yield zone, port


SANDBOXES: dict[str, dict[str, Any]] = {
    "sb-a": {
        "addresses": ["127.0.0.2"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["one.test", "alias.test", "big.test", "signed.test"]},
    },
    "sb-b": {"addresses": ["127.0.0.3"], "profile": "allowlisted", "egress": {"allow_hosts": ["one.test"]}},
    "sb-iso": {"addresses": ["127.0.0.4"], "profile": "isolated"},
    "sb-open": {"addresses": ["127.0.0.5"], "profile": "unrestricted"},
    "sb-slow": {
        "addresses": ["127.0.0.6"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["one.test"]},
        "limits": {"dns_queries_per_minute": 60},
    },
    # Every name directly under wild.test, by a wildcard: the names it makes up are budgeted.
    "sb-wild": {
        "addresses": ["127.0.0.7"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["*.wild.test", "one.test"]},
    },
    # Report mode lets every name through: those only report mode allows are budgeted too.
    "sb-report": {
        "addresses": ["127.0.0.8"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["one.test"], "enforcement": "report"},
    },
}


def make_state() -> PolicyState:
    state = PolicyState(PolicyContext((ipaddress.ip_network("127.0.0.0/8"),), BUILTIN_PRESETS, DEFAULT_LIMITS))
    for sid, raw in SANDBOXES.items():
        set_sandbox(state, sid, raw)
    return state


def set_sandbox(state: PolicyState, sid: str, raw: dict[str, Any]) -> None:
    sandbox = state.parse_sandbox({"id": sid, **raw})
    state.check_sandbox(sandbox, create=None)
    state.set_sandbox(sandbox)


class Gateway:
    def __init__(self, dns: DnsInterceptor, port: int, zone: Zone, state: PolicyState, tmp: Path) -> None:
        self.dns, self.port, self.zone, self.state, self.tmp = dns, port, zone, state, tmp


@pytest.fixture
async def gw(upstream: tuple[Zone, int], tmp_path: Path) -> AsyncIterator[Gateway]:
    zone, port = upstream
    state = make_state()
    blocklist = tmp_path / "malware.hosts"
    blocklist.write_text("0.0.0.0 bad.example\n")
    config = DnsConfig(
        upstream_timeout=1.0, rate_limit_max_wait=1.2, malware_blocklist=blocklist, blocklist_check_interval=0.0
    )
    flowlog = FlowLog(AuditConfig(tmp_path / "audit", 60.0, "", 1000))
    dns = DnsInterceptor(
        config,
        lambda: state,
        upstreams=(Upstream("127.0.0.1", port),),
        learned=LearnedDestinations(),
        flowlog=flowlog,
    )
    bound = await dns.start_plain("127.0.0.1", 0)
    try:
        yield Gateway(dns, bound, zone, state, tmp_path)
    finally:
        await dns.close()


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.answers.put_nowait(data)


async def ask_udp(port: int, packet: bytes, source: str = "127.0.0.2", timeout: float = 3.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(
        _Client, local_addr=(source, 0), remote_addr=("127.0.0.1", port)
    )
    try:
        transport.sendto(packet)
        try:
            return await asyncio.wait_for(client.answers.get(), timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


async def ask_tcp(port: int, packets: list[bytes], source: str = "127.0.0.2", expect: int | None = None) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        for packet in packets:
            writer.write(struct.pack("!H", len(packet)) + packet)
        await writer.drain()
        out = []
        for _ in range(len(packets) if expect is None else expect):
            (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 3))
            out.append(await asyncio.wait_for(reader.readexactly(size), 3))
        return out
    finally:
        writer.close()


async def dig(gw: Gateway, *args: str, source: str = "127.0.0.2") -> str:
    exe = shutil.which("dig")
    if exe is None:
        pytest.fail("dig is missing (apt package dnsutils)", pytrace=False)
    proc = await asyncio.create_subprocess_exec(
        exe, "@127.0.0.1", "-p", str(gw.port), "-b", source, "+time=2", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    return out.decode()


def parsed(data: bytes | None) -> DNSRecord:
    assert data is not None, "no answer"
    return DNSRecord.parse(data)


# --------------------------------------------------------------------------- dig


async def test_dig_allowed_denied_tcp_https_and_truncation(gw: Gateway) -> None:
    out = await dig(gw, "one.test", "A")
    assert "status: NOERROR" in out and re.search(r"one\.test\.\s+\d+\s+IN\s+A\s+192\.0\.2\.1", out)
    out = await dig(gw, "alias.test", "AAAA")
    assert "CNAME" in out and "2001:db8::1" in out
    out = await dig(gw, "evil.example", "A")
    assert "status: NXDOMAIN" in out
    assert re.search(
        r"EDE: 15 \(Blocked\): \(blocked by sandbox policy: host not in allowlist \(denial [0-9a-f-]{19}\)\)", out
    )
    assert "sandbox-gateway.invalid" in out  # the SOA for negative caching
    out = await dig(gw, "+tcp", "one.test", "AAAA")
    assert "status: NOERROR" in out and "2001:db8::1" in out
    out = await dig(gw, "one.test", "HTTPS")
    assert "status: NOERROR" in out and "ANSWER: 0" in out
    # 100 A records: over UDP the answer is truncated (TC), dig's own retry over TCP gets it all.
    out = await dig(gw, "+ignore", "big.test", "A")
    assert " tc" in out.split("flags:")[1].split(";")[0] and "ANSWER: 0" in out
    out = await dig(gw, "big.test", "A")
    assert "Truncated, retrying in TCP mode" in out and "ANSWER: 100" in out
    assert ("big.test", "A", "tcp") in gw.zone.queries  # upstream side: TCP fallback too
    out = await dig(gw, "+dnssec", "signed.test", "A")
    assert re.search(r"flags:[^;]* ad", out)  # AD passed back


# --------------------------------------------------------------------------- python sockets


async def test_cache_is_per_sandbox(gw: Gateway) -> None:
    before = gw.zone.count("one.test")
    for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"):
        answer = parsed(await ask_udp(gw.port, query("one.test"), source))
        assert [str(rr.rdata) for rr in answer.rr] == ["192.0.2.1"]
    assert gw.zone.count("one.test") - before == 2  # once per sandbox, never shared
    log = gw.dns.query_log("sb-b")
    assert [e["cached"] for e in log] == [False, True]


async def test_policy_change_takes_effect_on_the_next_query(gw: Gateway) -> None:
    assert parsed(await ask_udp(gw.port, query("one.test"), "127.0.0.3")).header.rcode == RCODE.NOERROR
    assert parsed(await ask_udp(gw.port, query("one.test"), "127.0.0.3")).header.rcode == RCODE.NOERROR
    asked = gw.zone.count("one.test")
    set_sandbox(gw.state, "sb-b", {**SANDBOXES["sb-b"], "egress": {"allow_hosts": ["one.test", "txt.test"]}})
    assert parsed(await ask_udp(gw.port, query("one.test"), "127.0.0.3")).header.rcode == RCODE.NOERROR
    assert gw.zone.count("one.test") == asked + 1  # the cache was flushed with the change
    set_sandbox(gw.state, "sb-b", {**SANDBOXES["sb-b"], "egress": {"allow_hosts": ["txt.test"]}})
    answer = parsed(await ask_udp(gw.port, query("one.test"), "127.0.0.3"))
    assert answer.header.rcode == RCODE.NXDOMAIN and gw.zone.count("one.test") == asked + 1


async def test_rate_limit_throttles_then_refuses(gw: Gateway) -> None:
    # 60/min: a full bucket of 60, then one a second; a query may wait 1.2 s at most. Whatever the burst took
    # (under 0.8 s), the next query waits for its token and the one after would wait too long.
    for _ in range(60):
        assert parsed(await ask_udp(gw.port, query("denied.test"), "127.0.0.6")).header.rcode == RCODE.NXDOMAIN
    started = time.monotonic()
    throttled, refused = await asyncio.gather(
        ask_udp(gw.port, query("denied.test", qid=1), "127.0.0.6"),
        ask_udp(gw.port, query("denied.test", qid=2, edns=True), "127.0.0.6"),
    )
    answers = {parsed(a).header.id: parsed(a) for a in (throttled, refused)}
    assert answers[1].header.rcode == RCODE.NXDOMAIN  # waited for its token
    assert answers[2].header.rcode == RCODE.REFUSED  # would have waited too long
    assert ede_of(refused) == (0, "dns query rate limit")
    assert 0.2 < time.monotonic() - started < 3
    # Other sandboxes are not affected.
    assert parsed(await ask_udp(gw.port, query("denied.test"), "127.0.0.3")).header.rcode == RCODE.NXDOMAIN
    codes = [e["code"] for e in gw.dns.query_log("sb-slow", 2)]
    assert codes == [Code.REFUSED_RATE_LIMIT, Code.BLOCKED_POLICY]  # the throttled query finished last


async def test_name_budgets_refuse_new_names_under_a_wildcard_and_keep_known_ones(
    upstream: tuple[Zone, int],
) -> None:
    zone, port = upstream
    clock = Clock()
    state = make_state()
    budgets = NameBudgets(4, 2, 60.0, clock=clock)
    dns = DnsInterceptor(DnsConfig(), lambda: state, upstreams=(Upstream("127.0.0.1", port),), budgets=budgets)
    bound = await dns.start_plain("127.0.0.1", 0)
    wild = "127.0.0.7"

    async def rcode(name: str, qtype: str = "A") -> int:
        return int(parsed(await ask_udp(bound, query(name, qtype), wild)).header.rcode)

    try:
        assert await rcode("a.wild.test") == RCODE.NOERROR
        for name in ("gone1.wild.test", "gone2.wild.test"):  # made up: NXDOMAIN upstream; 2 is the NXDOMAIN budget
            assert await rcode(name) == RCODE.NXDOMAIN
        # A new name now: refused with the reason, and never asked upstream; the same packet again too (a refusal
        # is not kept as the packet's ready answer: the window moves on).
        for _ in range(2):
            data = await ask_udp(bound, query("gone3.wild.test", edns=True), wild)
            assert parsed(data).header.rcode == RCODE.REFUSED
            assert ede_of(data) == (15, "DNS_NXDOMAIN_BUDGET: sandbox got more than 2 NXDOMAIN answers in 60 s")
        assert zone.count("gone3.wild.test") == 0
        # Known names keep resolving: cached, and another type of the same name goes upstream.
        assert await rcode("A.Wild.Test.") == RCODE.NOERROR
        assert await rcode("a.wild.test", "AAAA") == RCODE.NOERROR
        assert zone.count("a.wild.test") == 2
        # The sandbox's exact entry is not budgeted.
        assert await rcode("one.test") == RCODE.NOERROR
        (refused, *_) = [e for e in dns.query_log("sb-wild") if e["name"] == "gone3.wild.test"]
        assert (refused["code"], refused["rule"], refused["rcode"], refused["allowed"]) == (
            Code.REFUSED_NXDOMAIN_BUDGET,
            "builtin:dns_budget",
            "REFUSED",
            False,
        )
        assert dns.query_counts()[(Code.REFUSED_NXDOMAIN_BUDGET, "REFUSED", "deny")] == 2
        # The window moves on: the name goes upstream.
        clock.now += 61
        assert await rcode("gone3.wild.test") == RCODE.NXDOMAIN
        assert zone.count("gone3.wild.test") == 1
        # ... and the distinct-name budget (4): gone3 and three more, then a new name is refused.
        for name in ("b.wild.test", "c.wild.test", "d.wild.test"):
            assert await rcode(name) == RCODE.NOERROR
        data = await ask_udp(bound, query("e.wild.test", edns=True), wild)
        assert parsed(data).header.rcode == RCODE.REFUSED
        assert ede_of(data) == (15, "DNS_NAME_BUDGET: sandbox queried more than 4 distinct names in 60 s")
        assert zone.count("e.wild.test") == 0
        assert await rcode("b.wild.test", "AAAA") == RCODE.NOERROR  # known: still resolves
        # Over TCP the same.
        (data,) = await ask_tcp(bound, [query("e.wild.test", edns=True)], wild)
        assert parsed(data).header.rcode == RCODE.REFUSED and ede_of(data) is not None
        (data,) = await ask_tcp(bound, [query("b.wild.test")], wild)
        assert parsed(data).header.rcode == RCODE.NOERROR
        # Report mode: names only report mode lets through go upstream within the budgets, then are refused
        # (denied, not `would_deny`: a limit holds in report mode).
        for name in ("r1.other.test", "r2.other.test"):
            assert parsed(await ask_udp(bound, query(name), "127.0.0.8")).header.rcode == RCODE.NXDOMAIN
        assert parsed(await ask_udp(bound, query("r3.other.test"), "127.0.0.8")).header.rcode == RCODE.REFUSED
        assert zone.count("r3.other.test") == 0
        entry = dns.query_log("sb-report", 1)[0]
        assert (entry["code"], entry["allowed"], entry["would_deny"]) == (Code.REFUSED_NXDOMAIN_BUDGET, False, False)
        assert dns.query_log("sb-report", 2)[0]["would_deny"] is True  # r2 went upstream, allowed by report mode
    finally:
        await dns.close()


async def test_unknown_source_and_isolated_are_refused_and_nothing_goes_upstream(gw: Gateway) -> None:
    before = len(gw.zone.queries)
    assert parsed(await ask_udp(gw.port, query("one.test"), "127.0.0.99")).header.rcode == RCODE.REFUSED
    assert parsed(await ask_udp(gw.port, query("one.test"), "127.0.0.4")).header.rcode == RCODE.REFUSED
    assert parsed(await ask_udp(gw.port, query("evil.test"), "127.0.0.2")).header.rcode == RCODE.NXDOMAIN
    assert len(gw.zone.queries) == before  # denied names never leave the gateway
    assert gw.dns.query_log("sb-iso")[0]["code"] == Code.REFUSED_ISOLATED


async def test_unrestricted_forwards_everything_but_the_malware_list(gw: Gateway) -> None:
    answer = parsed(await ask_udp(gw.port, query("txt.test", "TXT"), "127.0.0.5"))
    assert answer.header.rcode == RCODE.NOERROR and "hello from the zone" in str(answer.rr[0].rdata)
    data = await ask_udp(gw.port, query("www.bad.example", edns=True), "127.0.0.5")
    assert parsed(data).header.rcode == RCODE.NXDOMAIN and ede_of(data) == (15, "blocked: malware domain list")
    (gw.tmp / "malware.hosts").write_text("# emptied\n")  # another size: a changed signature at once
    answer = parsed(await ask_udp(gw.port, query("bad.example"), "127.0.0.5"))
    assert answer.header.rcode == RCODE.NOERROR and str(answer.rr[0].rdata) == "192.0.2.66"  # reloaded


async def test_learned_destinations_query_log_and_flow_log(gw: Gateway) -> None:
    await ask_udp(gw.port, query("alias.test"), "127.0.0.2")
    await ask_udp(gw.port, query("nope.test"), "127.0.0.2")
    learned = gw.dns.learned
    assert learned is not None
    assert learned.lookup("sb-a", "192.0.2.1") == "alias.test"
    assert learned.lookup("sb-b", "192.0.2.1") is None  # per sandbox
    assert learned.lookup("sb-a", "192.0.2.99") is None
    first, second = gw.dns.query_log("sb-a", 10)
    assert first["name"] == "alias.test" and first["type"] == "A" and first["rcode"] == "NOERROR"
    assert first["answers"] == ["192.0.2.1"] and first["allowed"] and first["rule"] == "allow_hosts alias.test"
    assert first["latency_ms"] >= 0 and first["client"].startswith("127.0.0.2:") and first["transport"] == "udp"
    assert second["rcode"] == "NXDOMAIN" and not second["allowed"] and second["code"] == Code.BLOCKED_POLICY
    assert second["reason"] == "blocked by sandbox policy: host not in allowlist"
    assert gw.dns.query_log("sb-a", 1) == [second]
    flowlog = gw.dns.flowlog
    assert flowlog is not None
    await flowlog.flush()
    batches = list((gw.tmp / "audit" / "sb-a").glob("*.ndjson"))
    records = [json.loads(line) for p in batches for line in p.read_text().splitlines()]
    assert {(r["protocol"], r["hostname"], r["verdict"], r["rule"]) for r in records} == {
        ("dns", "alias.test", "allow", "allow_hosts alias.test"),
        ("dns", "nope.test", "deny", "default:deny"),
    }
    assert all(r["src_addr"] == "127.0.0.2" and r["dst_port"] == gw.port for r in records)


async def test_garbage_gets_formerr_or_nothing_and_the_server_keeps_going(gw: Gateway) -> None:
    good = query("one.test", qid=0x1234)
    answer = await ask_udp(gw.port, good[:-2], "127.0.0.2")
    assert answer is not None and answer[:2] == good[:2] and answer[3] & 0x0F == RCODE.FORMERR
    assert await ask_udp(gw.port, b"\x01\x02\x03", "127.0.0.2", timeout=0.3) is None  # dropped
    two = DNSRecord.question("one.test")
    two.add_question(DNSRecord.question("alias.test").q)
    assert parsed(await ask_udp(gw.port, bytes(two.pack()), "127.0.0.2")).header.rcode == RCODE.FORMERR
    # TCP: several queries on one connection, garbage among them, answers in order.
    answers = await ask_tcp(gw.port, [query("one.test", qid=1), good[:-2], query("evil.test", qid=3)])
    assert [a[:2] for a in answers] == [b"\x00\x01", good[:2], b"\x00\x03"]
    assert [a[3] & 0x0F for a in answers] == [RCODE.NOERROR, RCODE.FORMERR, RCODE.NXDOMAIN]
    assert parsed(await ask_udp(gw.port, query("one.test"), "127.0.0.2")).header.rcode == RCODE.NOERROR


async def test_a_stream_of_random_and_mangled_packets_does_not_hurt_the_server(gw: Gateway) -> None:
    rng = random.Random(4)
    seeds = [query("one.test"), query("alias.test", "AAAA", edns=True, do=True), query("x.test", "HTTPS")]
    loop = asyncio.get_running_loop()
    transport, flood = await loop.create_datagram_endpoint(
        _Client, local_addr=("127.0.0.5", 0), remote_addr=("127.0.0.1", gw.port)
    )
    try:
        for i in range(300):
            if i % 2:
                packet = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
            else:
                mangled = bytearray(rng.choice(seeds))
                for _ in range(rng.randrange(1, 4)):
                    mangled[rng.randrange(len(mangled))] = rng.randrange(256)
                packet = bytes(mangled[: rng.randrange(len(mangled) + 1)])
            transport.sendto(packet)
            if i % 50 == 0:
                await asyncio.sleep(0)
        # The server reads its socket in order: once this query is answered, it has been through the whole stream.
        transport.sendto(query("one.test", qid=0xBEEF))
        while (await asyncio.wait_for(flood.answers.get(), 5))[:2] != b"\xbe\xef":
            pass
    finally:
        transport.close()
    assert parsed(await ask_udp(gw.port, query("one.test"), "127.0.0.2")).header.rcode == RCODE.NOERROR
    (answer,) = await ask_tcp(gw.port, [b"\xff" * 5, query("one.test", qid=9)], expect=1)  # the first: dropped
    assert answer[:2] == b"\x00\x09"
    assert gw.dns.counts[INTERNAL_ERROR] == 0 and gw.dns.counts[Code.FORMERR] > 50


async def test_tcp_idle_connections_are_closed() -> None:
    state = make_state()
    dns = DnsInterceptor(
        DnsConfig(tcp_idle_timeout=0.3, tcp_max_connections=2), lambda: state, upstreams=(Upstream("127.0.0.1", 1),)
    )
    port = await dns.start_plain("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server after 0.3 s idle
        writer.close()
        conns = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)) for _ in range(3)]
        assert await asyncio.wait_for(conns[2][0].read(), 3) == b""  # over the limit: closed at once
        for _, w in conns:
            w.close()
    finally:
        await dns.close()


async def test_unreachable_upstream_is_servfail_with_the_reason_and_not_cached() -> None:
    state = make_state()
    dns = DnsInterceptor(DnsConfig(upstream_timeout=0.5), lambda: state, upstreams=(Upstream("127.0.0.1", 1),))
    port = await dns.start_plain("127.0.0.1", 0)
    try:
        for _ in range(2):
            data = await ask_udp(port, query("one.test", edns=True), "127.0.0.2")
            assert parsed(data).header.rcode == RCODE.SERVFAIL
            code, text = ede_of(data) or (None, "")
            assert code == 22 and text.startswith("upstream: ")
        assert dns.upstream_queries == 2  # failures are not cached
        assert dns.query_log("sb-a", 1)[0]["code"] == Code.UPSTREAM_FAILED
    finally:
        await dns.close()
