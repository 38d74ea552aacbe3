"""The DNS interceptor's pure core with crafted packets: decisions, answers, upstream handling, fuzzing."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import msgspec
from dnslib import AAAA, EDNS0, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord, EDNSOption
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dns.answer import ANSWER, DROP, FORWARD, accept_upstream, decide_packet
from gateway.dns.blocklist import DomainBlocklist
from gateway.dns.config import DnsConfig
from gateway.dns.wire import Code, parse_query, render, ttl_offsets, upstream_packet
from tests.factory import ede_of, policy, query

CONFIG = DnsConfig()
ALLOW = policy("allowlisted", {"allow_hosts": ["one.test", "*.wild.test"]})
OPEN = policy("unrestricted")


def upstream_reply(packet: bytes, zone: str, *, rcode: int = 0, ad: bool = False) -> bytes:
    reply = DNSRecord.parse(packet).replyZone(zone) if zone else DNSRecord.parse(packet).reply()
    reply.header.rcode = rcode
    reply.header.ad = int(ad)
    return bytes(reply.pack())


# --------------------------------------------------------------------------- decisions


def test_unknown_sandbox_and_isolated_are_refused() -> None:
    d = decide_packet(query("one.test", edns=True), None, CONFIG)
    assert (d.action, d.rcode, d.code, d.allowed) == (ANSWER, RCODE.REFUSED, Code.REFUSED_UNKNOWN_SANDBOX, False)
    assert ede_of(d.response) == (18, "source address belongs to no sandbox")
    d = decide_packet(query("one.test"), policy("isolated"), CONFIG)
    assert (d.rcode, d.code, d.rule) == (RCODE.REFUSED, Code.REFUSED_ISOLATED, "profile:isolated")
    assert DNSRecord.parse(d.response).header.id == 0x4242


def test_denied_name_is_nxdomain_with_soa_and_extended_error_only_with_edns() -> None:
    d = decide_packet(query("Evil.Example.com", edns=True, do=True), ALLOW, CONFIG)
    assert (d.action, d.code, d.rule) == (ANSWER, Code.BLOCKED_POLICY, "default:deny")
    answer = DNSRecord.parse(d.response)
    assert answer.header.rcode == RCODE.NXDOMAIN and answer.header.qr and not answer.rr
    assert str(answer.q.qname) == "Evil.Example.com."  # the client's case comes back
    (soa,) = answer.auth
    assert soa.rtype == QTYPE.SOA and str(soa.rname) == "example.com." and soa.ttl == CONFIG.blocked_ttl
    assert soa.rdata.times[4] == CONFIG.blocked_ttl
    assert ede_of(d.response) == (15, "blocked by sandbox policy: host not in allowlist")
    opt = next(rr for rr in answer.ar if rr.rtype == QTYPE.OPT)
    assert opt.ttl & 0x8000  # DO echoed
    plain = DNSRecord.parse(decide_packet(query("evil.example.com"), ALLOW, CONFIG).response)
    assert plain.header.rcode == RCODE.NXDOMAIN and not plain.ar  # no OPT to a client that sent none


def test_allowed_names_forward_only_a_and_aaaa_https_svcb_empty_others_configurable() -> None:
    for qtype in ("A", "AAAA"):
        d = decide_packet(query("one.test", qtype), ALLOW, CONFIG)
        assert (d.action, d.allowed, d.rule) == (FORWARD, True, "allow_hosts one.test")
    assert decide_packet(query("x.wild.test"), ALLOW, CONFIG).action == FORWARD
    for qtype in ("HTTPS", "SVCB"):
        d = decide_packet(query("one.test", qtype), ALLOW, CONFIG)
        answer = DNSRecord.parse(d.response)
        assert (d.code, answer.header.rcode, len(answer.rr)) == (Code.EMPTY_HTTPS, RCODE.NOERROR, 0)
        assert answer.auth[0].rtype == QTYPE.SOA
    d = decide_packet(query("one.test", "MX"), ALLOW, CONFIG)
    assert (d.code, d.rcode) == (Code.EMPTY_QTYPE, RCODE.NOERROR)  # the documented default
    refusing = DnsConfig(other_qtypes="refuse")
    assert decide_packet(query("one.test", "MX"), ALLOW, refusing).rcode == RCODE.REFUSED
    srv = DnsConfig(extra_qtypes=frozenset({QTYPE.SRV}))
    assert decide_packet(query("one.test", "SRV"), ALLOW, srv).action == FORWARD
    # A denied name stays denied whatever the type: never forwarded.
    for qtype in ("A", "TXT", "HTTPS", "MX"):
        assert decide_packet(query("other.test", qtype), ALLOW, CONFIG).code == Code.BLOCKED_POLICY


def test_any_and_zone_transfers_refused_even_unrestricted_which_forwards_the_rest() -> None:
    for qtype in ("ANY", "AXFR", "IXFR"):
        d = decide_packet(query("one.test", qtype), OPEN, CONFIG)
        assert (d.rcode, d.code) == (RCODE.REFUSED, Code.REFUSED_QTYPE)
    for qtype in ("A", "TXT", "MX", "HTTPS"):
        d = decide_packet(query("anything.example", qtype), OPEN, CONFIG)
        assert (d.action, d.rule) == (FORWARD, "profile:unrestricted")


def test_a_denied_name_is_nxdomain_with_its_rule_even_unrestricted_and_in_report_mode() -> None:
    deny = {"deny_hosts": ["tracker.test", "*.ads.test", "web.test:443"]}
    for p in (policy("unrestricted", deny), policy("allowlisted", {**deny, "allow_hosts": ["tracker.test"]})):
        for name, entry in (("Tracker.Test.", "tracker.test"), ("x.ads.test", "*.ads.test")):
            d = decide_packet(query(name, edns=True), p, CONFIG)
            assert (d.action, d.rcode, d.code, d.rule) == (
                ANSWER, RCODE.NXDOMAIN, Code.BLOCKED_POLICY, f"deny_hosts {entry}"
            )  # fmt: skip
            reason = f"blocked by sandbox policy: host {name.lower().rstrip('.')} denied by deny_hosts {entry}"
            assert ede_of(d.response) == (15, reason)
    # Denied on one port only: the name still resolves.
    assert decide_packet(query("web.test"), policy("unrestricted", deny), CONFIG).action == FORWARD
    assert decide_packet(query("other.test"), policy("unrestricted", deny), CONFIG).action == FORWARD
    reported = policy("allowlisted", {**deny, "enforcement": "report"})
    assert decide_packet(query("tracker.test"), reported, CONFIG).rcode == RCODE.NXDOMAIN


def test_registry_profile_uses_the_registry_preset() -> None:
    reg = policy("registry")
    assert decide_packet(query("pypi.org"), reg, CONFIG).action == FORWARD
    assert decide_packet(query("example.com"), reg, CONFIG).code == Code.BLOCKED_POLICY


def test_malformed_queries_formerr_or_drop() -> None:
    good = query("one.test")
    assert decide_packet(good[:11], ALLOW, CONFIG).action == DROP  # no header
    response = bytes(DNSRecord.parse(good).reply().pack())
    assert decide_packet(response, ALLOW, CONFIG).action == DROP  # never answer an answer
    two = DNSRecord.question("one.test")
    two.add_question(DNSRecord.question("two.test").q)
    d = decide_packet(bytes(two.pack()), ALLOW, CONFIG)
    assert (d.rcode, d.code) == (RCODE.FORMERR, Code.FORMERR)
    d = decide_packet(good[:-3], ALLOW, CONFIG)
    assert d.rcode == RCODE.FORMERR and d.response[:2] == good[:2] and d.response[2] & 0x80
    notify = bytearray(good)
    notify[2] = (notify[2] & 0x87) | (4 << 3)
    assert decide_packet(bytes(notify), ALLOW, CONFIG).rcode == RCODE.NOTIMP
    no_question = good[:4] + b"\x00\x00" + good[6:12]
    assert decide_packet(no_question, ALLOW, CONFIG).rcode == RCODE.FORMERR


def test_odd_labels_edns_version_and_class() -> None:
    dotted = DNSRecord.question("x.test")
    dotted.q.qname.label = (b"one.test",)  # one label that prints like an allowed name
    d = decide_packet(bytes(dotted.pack()), ALLOW, CONFIG)
    assert (d.rcode, d.code) == (RCODE.NXDOMAIN, Code.BLOCKED_NAME)
    record = DNSRecord.question("one.test")
    record.add_ar(EDNS0(udp_len=1232, version=1))
    d = decide_packet(bytes(record.pack()), ALLOW, CONFIG)
    assert d.code == Code.BADVERS
    opt = next(rr for rr in DNSRecord.parse(d.response).ar if rr.rtype == QTYPE.OPT)
    assert opt.ttl >> 24 == 1  # extended rcode 16 = BADVERS
    twice = DNSRecord.question("one.test")
    twice.add_ar(EDNS0(udp_len=1232))
    twice.add_ar(EDNS0(udp_len=1232))
    assert decide_packet(bytes(twice.pack()), ALLOW, CONFIG).code == Code.FORMERR
    in_authority = DNSRecord.question("one.test")
    in_authority.add_auth(EDNS0(udp_len=1232))
    assert decide_packet(bytes(in_authority.pack()), ALLOW, CONFIG).code == Code.FORMERR
    long_name = query("one.test")[:12] + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01"
    assert decide_packet(long_name, OPEN, CONFIG).code == Code.FORMERR  # 257 octets > 255
    chaos = DNSRecord.question("version.bind", "TXT", "CH")
    assert decide_packet(bytes(chaos.pack()), OPEN, CONFIG).code == Code.REFUSED_CLASS


def test_report_mode_forwards_what_the_allowlist_would_deny_marked_would_deny(tmp_path: Path) -> None:
    report = policy("allowlisted", {"allow_hosts": ["one.test"], "enforcement": "report"})
    d = decide_packet(query("other.test"), report, CONFIG)
    assert (d.action, d.allowed, d.would_deny, d.rule) == (FORWARD, True, True, "default:deny")
    assert d.reason == "report mode: would deny (host not in allowlist)"
    d = decide_packet(query("one.test"), report, CONFIG)
    assert (d.action, d.would_deny, d.rule) == (FORWARD, False, "allow_hosts one.test")
    d = decide_packet(query("other.test", "HTTPS"), report, CONFIG)
    assert (d.code, d.allowed, d.would_deny) == (Code.EMPTY_HTTPS, True, True)
    # The malware list and malformed names are not the allowlist's: enforced in report mode too.
    path = tmp_path / "malware.hosts"
    path.write_text("bad.example\n")
    d = decide_packet(query("bad.example"), report, CONFIG, DomainBlocklist(path))
    assert (d.code, d.allowed, d.would_deny) == (Code.BLOCKED_MALWARE, False, False)
    dotted = DNSRecord.question("x.test")
    dotted.q.qname.label = (b"other.test",)  # one label with a dot in it
    assert decide_packet(bytes(dotted.pack()), report, CONFIG).code == Code.BLOCKED_NAME


def test_malware_blocklist_formats_subdomains_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "malware.hosts"
    path.write_text("# feed\n127.0.0.1 localhost\n0.0.0.0 bad.example  # trailing\n:: worse.example\nplain.example\n")
    now = [0.0]
    blocklist = DomainBlocklist(path, check_interval=1.0, clock=lambda: now[0])
    assert len(blocklist) == 3
    for name in ("bad.example", "a.b.bad.example", "worse.example", "plain.example"):
        d = decide_packet(query(name, edns=True), OPEN, CONFIG, blocklist)
        assert (d.rcode, d.code) == (RCODE.NXDOMAIN, Code.BLOCKED_MALWARE)
        assert ede_of(d.response) == (15, "blocked: malware domain list")
    assert decide_packet(query("notbad.example"), OPEN, CONFIG, blocklist).action == FORWARD
    assert decide_packet(query("localhost"), OPEN, CONFIG, blocklist).action == FORWARD
    path.write_text("new.example\n")
    blocklist.maybe_reload()  # within check_interval of the last check: not re-read
    assert decide_packet(query("bad.example"), OPEN, CONFIG, blocklist).code == Code.BLOCKED_MALWARE
    now[0] = 2.0
    assert decide_packet(query("bad.example"), OPEN, CONFIG, blocklist).code == Code.BLOCKED_MALWARE  # decide: no I/O
    blocklist.maybe_reload()
    assert decide_packet(query("bad.example"), OPEN, CONFIG, blocklist).action == FORWARD
    assert decide_packet(query("x.new.example"), OPEN, CONFIG, blocklist).rule == "malware list new.example (line 1)"
    path.unlink()
    now[0] = 4.0
    blocklist.maybe_reload()
    assert (
        decide_packet(query("new.example"), OPEN, CONFIG, blocklist).code == Code.BLOCKED_MALWARE
    )  # last good list kept
    assert blocklist.error


# --------------------------------------------------------------------------- upstream side


def test_upstream_packet_carries_our_edns_and_do_but_no_client_options() -> None:
    record = DNSRecord.question("One.Test")
    record.header.cd = 1
    record.add_ar(EDNS0(udp_len=4096, flags="do", opts=[EDNSOption(8, b"\x00\x01\x18\x00\x0a\x00\x00")]))
    q = parse_query(bytes(record.pack()))
    sent = DNSRecord.parse(upstream_packet(q, CONFIG))
    assert str(sent.q.qname) == "One.Test." and sent.header.rd and sent.header.cd and sent.header.ad
    (opt,) = sent.ar
    assert opt.ttl & 0x8000 and opt.rclass == 1232 and not opt.rdata  # DO, our size, no ECS
    plain = DNSRecord.parse(upstream_packet(parse_query(query("one.test")), CONFIG))
    assert not plain.header.ad and not plain.ar[0].ttl & 0x8000


def test_restricted_answers_keep_only_addresses_and_the_cname_chain() -> None:
    q = parse_query(query("alias.one.test", edns=True))
    pol = policy("allowlisted", {"allow_hosts": ["alias.one.test"]})
    zone = (
        "alias.one.test 60 CNAME mid.test\nmid.test 30 CNAME one.test\none.test 300 A 192.0.2.1\n"
        "one.test 300 MX 10 mail.one.test\nunrelated.test 300 A 192.0.2.99"
    )
    data = bytearray(upstream_reply(upstream_packet(q, CONFIG), zone))
    answer = accept_upstream(q, bytes(data), pol, CONFIG)
    parsed = DNSRecord.parse(answer.wire)
    assert [QTYPE[rr.rtype] for rr in parsed.rr] == ["CNAME", "CNAME", "A", "A"]  # no MX
    assert answer.addresses == ("192.0.2.1",) and answer.addresses_ttl == 30 and answer.ttl == 30
    assert not parsed.ar  # OPT is added per client by render
    out = DNSRecord.parse(render(answer.wire, answer.offsets, 7, q))
    assert out.header.id == 0x4242 and [rr.ttl for rr in out.rr][:3] == [53, 23, 293]
    assert out.ar[0].rtype == QTYPE.OPT
    # unrestricted keeps everything but the upstream's OPT.
    full = accept_upstream(q, bytes(data), OPEN, CONFIG)
    assert len(DNSRecord.parse(full.wire).rr) == 5


def test_ttls_clamped_negative_answers_cached_per_soa_minimum() -> None:
    q = parse_query(query("one.test", "AAAA"))
    config = DnsConfig(min_ttl=10, max_ttl=100, negative_max_ttl=50)
    reply = DNSRecord.parse(upstream_packet(q, config)).reply()
    reply.add_answer(RR("one.test", QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=99999))
    answer = accept_upstream(q, bytes(reply.pack()), ALLOW, config)
    assert answer.ttl == 100 and DNSRecord.parse(answer.wire).rr[0].ttl == 100
    reply = DNSRecord.parse(upstream_packet(q, config)).reply()
    reply.add_answer(RR("one.test", QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=1))
    assert accept_upstream(q, bytes(reply.pack()), ALLOW, config).ttl == 10
    nx = DNSRecord.parse(upstream_packet(q, config)).reply()
    nx.header.rcode = RCODE.NXDOMAIN
    nx.add_auth(RR("test", QTYPE.SOA, rdata=SOA("ns.test", "h.test", (1, 2, 3, 4, 20)), ttl=3600))
    answer = accept_upstream(q, bytes(nx.pack()), ALLOW, config)
    assert (answer.rcode, answer.ttl) == (RCODE.NXDOMAIN, 20)
    nx.auth[0].rdata.times = (1, 2, 3, 4, 9999)
    assert accept_upstream(q, bytes(nx.pack()), ALLOW, config).ttl == 50


def test_dnssec_ad_passed_back_and_strict_mode() -> None:
    q = parse_query(query("one.test", edns=True, do=True))
    signed = upstream_reply(upstream_packet(q, CONFIG), "one.test 300 A 192.0.2.1", ad=True)
    answer = accept_upstream(q, signed, ALLOW, CONFIG)
    assert answer.ad and DNSRecord.parse(render(answer.wire, answer.offsets, 0, q)).header.ad
    no_do = parse_query(query("one.test"))
    assert not DNSRecord.parse(render(answer.wire, answer.offsets, 0, no_do)).header.ad  # not asked for
    unsigned = upstream_reply(upstream_packet(q, CONFIG), "one.test 300 A 192.0.2.1")
    strict = DnsConfig(require_ad=True)
    answer = accept_upstream(q, unsigned, ALLOW, strict)
    assert (answer.rcode, answer.code, answer.ttl) == (RCODE.SERVFAIL, Code.DNSSEC_UNVALIDATED, 0)
    assert accept_upstream(q, signed, ALLOW, strict).rcode == RCODE.NOERROR
    assert DNSRecord.parse(upstream_packet(parse_query(query("one.test")), strict)).header.ad  # AD asked for


def test_upstream_failures_and_garbage_become_servfail() -> None:
    q = parse_query(query("one.test"))
    assert accept_upstream(q, b"\x00\x01garbage", ALLOW, CONFIG).rcode == RCODE.SERVFAIL
    refused = upstream_reply(upstream_packet(q, CONFIG), "", rcode=RCODE.REFUSED)
    assert accept_upstream(q, refused, ALLOW, CONFIG).code == Code.UPSTREAM_FAILED


def test_render_truncates_over_the_client_udp_size() -> None:
    q = parse_query(query("big.test"))
    reply = DNSRecord.parse(upstream_packet(q, CONFIG)).reply()
    for i in range(60):
        reply.add_answer(RR("big.test", QTYPE.A, rdata=A(f"198.51.100.{i}"), ttl=60))
    reply.add_answer(RR("big.test", QTYPE.TXT, rdata=TXT("x" * 200), ttl=60))
    answer = accept_upstream(q, bytes(reply.pack()), OPEN, CONFIG)
    full = render(answer.wire, answer.offsets, 0, q)
    assert len(full) > 512
    cut = render(answer.wire, answer.offsets, 0, q, limit=q.udp_limit())
    parsed = DNSRecord.parse(cut)
    assert parsed.header.tc and not parsed.rr and str(parsed.q.qname) == "big.test." and len(cut) <= 512
    big = parse_query(query("big.test", edns=True))
    assert big.udp_limit() == 1232
    assert DNSRecord.parse(render(answer.wire, answer.offsets, 0, big, limit=big.udp_limit())).header.tc == 0


def test_ttl_offsets_skip_opt_and_reject_truncation() -> None:
    record = DNSRecord.parse(query("one.test")).reply()
    record.add_answer(RR("one.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=77))
    record.add_answer(RR("one.test", QTYPE.MX, rdata=MX("mx.one.test"), ttl=88))
    record.add_ar(EDNS0(udp_len=1232))
    wire = bytes(record.pack())
    offsets = ttl_offsets(wire)
    assert [struct.unpack_from("!I", wire, o)[0] for o in offsets] == [77, 88]
    for cut in range(12, len(wire) - 1):
        with contextlib.suppress(ValueError):
            ttl_offsets(wire[:cut])


# --------------------------------------------------------------------------- fuzzing: never raise


def _decide_everywhere(data: bytes) -> None:
    for pol in (None, ALLOW, OPEN, policy("isolated")):
        d = decide_packet(data, pol, CONFIG)
        assert d.action in (DROP, ANSWER, FORWARD)
        if d.action == ANSWER:
            assert len(d.response) >= 12 and d.response[2] & 0x80
        if d.action == FORWARD:
            upstream_packet(d.query, CONFIG)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decide_everywhere(data)


SEEDS = [
    query("one.test"),
    query("one.test", "AAAA", edns=True, do=True),
    query("x.wild.test", "HTTPS", edns=True),
    bytes(DNSRecord.question("a.b.c.example", "TXT").pack()),
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(SEEDS),
    st.integers(0, 80),
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=6),
)
def test_fuzz_truncated_and_mutated_queries(seed: bytes, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(seed[: max(cut, 0)] if cut < len(seed) else seed)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    _decide_everywhere(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SEEDS[:2]), st.binary(max_size=300))
def test_fuzz_upstream_answers_never_raise(seed: bytes, tail: bytes) -> None:
    q = parse_query(seed)
    base = upstream_reply(upstream_packet(q, CONFIG), "one.test 60 A 192.0.2.1\none.test 60 AAAA 2001:db8::1")
    for data in (base[: len(tail)], base[:12] + tail, base + tail):
        for pol in (ALLOW, OPEN):
            answer = accept_upstream(q, data, pol, CONFIG)
            render(answer.wire, answer.offsets, 3, q, limit=512)


def test_every_truncation_of_valid_queries() -> None:
    for seed in SEEDS:
        for cut in range(len(seed)):
            _decide_everywhere(seed[:cut])


def test_config_from_the_gateway_config(tmp_path: Path) -> None:
    from gateway.settings import load_config

    config = load_config(
        None,
        {
            "GATEWAY_EGRESS__DNS_PORT": "5353",
            "GATEWAY_EGRESS__RATE_LIMIT_MAX_WAIT": "0.25",
            "GATEWAY_RESOLVER__UPSTREAMS": '["192.0.2.53"]',
            "GATEWAY_RESOLVER__MIN_TTL": "7",
        },
    )
    dns = msgspec.structs.replace(config.dns, malware_blocklist=tmp_path / "list", extra_qtypes=frozenset({33}))
    assert (dns.port, dns.rate_limit_max_wait, dns.upstreams, dns.min_ttl, dns.max_ttl) == (
        5353,
        1.0,  # the DNS default, not the egress engine's connection wait
        ("192.0.2.53",),
        7,
        3600,
    )
    assert dns.malware_blocklist == tmp_path / "list" and dns.extra_qtypes == frozenset({33})
    assert dns.other_qtypes == "empty" and not dns.require_ad


def test_the_dns_section_of_the_config_reaches_the_interceptor_with_the_same_defaults() -> None:
    from gateway.settings import load_config

    assert load_config(environ={}).dns == DnsConfig()  # every field, the supplied port and upstreams too
    tuned = load_config(environ={"GATEWAY_DNS__OTHER_QTYPES": "refuse"}).dns
    assert tuned.other_qtypes == "refuse"
