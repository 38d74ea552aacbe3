"""The egress engine's decisions and peek, without sockets to a sandbox: a real resolver against a real
(loopback) authoritative server, real Destinations, compiled policies as the API makes them."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from gateway.destinations import Destinations
from gateway.egress import Peeker, _FirstWordsGuard, _HttpGuard, peek, plan_named, plan_unnamed
from gateway.learned import LearnedDestinations
from gateway.peek import HttpRequestTracker, TrafficKind
from tests.factory import genuine_hello, make, policy, resolver_server  # noqa: F401  (the fixture `server`)

# The loopback zone uses documentation ranges; here they stand for the public internet.
DEST = Destinations([ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")])
ALLOW = {"allow_hosts": ["one.test", "private.test", "mixed.test", "metadata.test", "missing.test"]}


async def test_named_dials_the_original_destination_only_when_it_resolved_there(server) -> None:
    resolver = make(server[1])
    pol = policy("allowlisted", ALLOW)
    plan = await plan_named(pol, "one.test", "192.0.2.1", 443, "tls", DEST, resolver)
    assert plan.allowed and plan.dial == "192.0.2.1" and plan.rule == "allow_hosts one.test"
    # SNI spoofing: the client sent the allowed name to another address; the resolved one is dialled instead.
    plan = await plan_named(pol, "one.test", "192.0.2.77", 443, "tls", DEST, resolver)
    assert plan.allowed and plan.dial == "192.0.2.1"
    plan = await plan_named(pol, "one.test", "2001:db8::77", 443, "tls", DEST, resolver)
    assert plan.dial == "2001:db8::1"  # the same family as the client asked for


async def test_named_refusals(server) -> None:
    resolver = make(server[1])
    pol = policy("allowlisted", ALLOW)
    plan = await plan_named(pol, "other.test", "192.0.2.1", 443, "tls", DEST, resolver)
    assert not plan.allowed and plan.reason == "host not in allowlist"
    plan = await plan_named(pol, "private.test", "192.0.2.1", 80, "http", DEST, resolver)
    assert not plan.allowed
    assert plan.reason == "private.test resolves to a refused address: private address (RFC 1918) 10.0.0.5"
    plan = await plan_named(pol, "metadata.test", "192.0.2.1", 80, "http", DEST, resolver)
    assert plan.reason.endswith("metadata service 169.254.169.254")
    plan = await plan_named(pol, "missing.test", "192.0.2.1", 443, "tls", DEST, resolver)
    assert not plan.allowed and plan.unresolvable and plan.reason.startswith("cannot resolve missing.test: NXDOMAIN")
    # A rebinding answer mixing a private and a public address: only the public one is ever dialled.
    plan = await plan_named(pol, "mixed.test", "10.0.0.6", 80, "http", DEST, resolver)
    assert plan.allowed and plan.dial == "192.0.2.9"
    # deny_cidrs apply to the resolved addresses too.
    pol = policy("allowlisted", {**ALLOW, "deny_cidrs": ["192.0.2.0/28"]})
    plan = await plan_named(pol, "one.test", "192.0.2.200", 443, "tls", DEST, resolver)
    assert plan.allowed and plan.dial == "2001:db8::1"  # the denied IPv4 address is skipped
    pol = policy("allowlisted", {**ALLOW, "deny_cidrs": ["192.0.2.0/28", "2001:db8::/64"]})
    plan = await plan_named(pol, "one.test", "192.0.2.200", 443, "tls", DEST, resolver)
    assert not plan.allowed and plan.rule == "deny_cidrs 192.0.2.0/28"


async def test_allow_cidrs_may_open_a_special_range_but_not_the_blocklist_or_the_gateway(tmp_path) -> None:
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("10.9.9.0/24\n")
    dest = Destinations(gateway_addresses=[ipaddress.ip_address("10.8.0.1")], blocklist_path=blocklist)
    pol = policy("allowlisted", {"allow_cidrs": ["10.0.0.0/8"]})
    plan = plan_unnamed(pol, "10.1.2.3", 5432, "tcp", dest, None)
    assert plan.allowed and plan.from_allow_cidrs and plan.rule == "allow_cidrs 10.0.0.0/8"
    plan = plan_unnamed(pol, "10.9.9.9", 5432, "tcp", dest, None)
    assert not plan.allowed and plan.reason == "operator blocklist 10.9.9.0/24 (line 1)"
    plan = plan_unnamed(pol, "10.8.0.1", 5432, "tcp", dest, None)
    assert not plan.allowed and plan.rule == "builtin:gateway"
    # unrestricted allows everything except special ranges, the blocklist and SMTP.
    anything = policy("unrestricted")
    assert plan_unnamed(anything, "8.8.8.8", 22, "tcp", dest, None).allowed
    assert plan_unnamed(anything, "169.254.169.254", 80, "http", dest, None).reason == (
        "metadata service 169.254.169.254"
    )
    assert plan_unnamed(anything, "8.8.8.8", 25, "tcp", dest, None).rule == "builtin:smtp"


def test_opaque_tcp_by_a_dns_learned_address_per_sandbox_with_ttl() -> None:
    now = [0.0]
    learned = LearnedDestinations(clock=lambda: now[0])
    pol = policy("allowlisted", {"allow_hosts": ["git.example.com"]})
    assert not plan_unnamed(pol, "8.8.8.8", 22, "tcp", DEST, learned).allowed
    learned.add("sb1", "git.example.com", ["8.8.8.8"], ttl=30)
    learned.add("sb9", "git.example.com", ["8.8.4.4"], ttl=30)  # another sandbox's answer vouches for nothing here
    plan = plan_unnamed(pol, "8.8.8.8", 22, "tcp", DEST, learned)
    assert plan.allowed and "learned from DNS for git.example.com" in plan.reason
    assert not plan_unnamed(pol, "8.8.4.4", 22, "tcp", DEST, learned).allowed
    now[0] = 31
    assert not plan_unnamed(pol, "8.8.8.8", 22, "tcp", DEST, learned).allowed


def test_learned_is_bounded() -> None:
    learned = LearnedDestinations(max_per_sandbox=2)
    learned.add("sb1", "a.test", ["192.0.2.1", "192.0.2.2", "192.0.2.3"], ttl=60)
    assert learned.lookup("sb1", "192.0.2.1") is None and learned.lookup("sb1", "192.0.2.3") == "a.test"
    assert len(learned) == 2


def _reader(*chunks: bytes, eof: bool = False) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


async def test_peek_http_head_split_across_segments_and_pipelined_requests() -> None:
    reader = asyncio.StreamReader()

    async def trickle() -> None:
        for part in (b"GET / HT", b"TP/1.1\r\nHost: a.test\r\n", b"\r\nGET /2 HTTP/1.1\r\nHost: b.test\r\n\r\n"):
            await asyncio.sleep(0.01)
            reader.feed_data(part)

    task = asyncio.create_task(trickle())
    peeked = await peek(reader.read, 2.0, 16384)
    await task
    assert peeked.kind is TrafficKind.HTTP and peeked.head is not None and peeked.head.host == "a.test"
    guard = _HttpGuard(policy("allowlisted", {"allow_hosts": ["a.test"]}), peeked.tracker, "a.test", 80)
    refused = guard.check(peeked.later, 0)
    if refused is None:  # the second head had not arrived when the first decided: it comes through the relay
        refused = guard.feed(await reader.read(1024))
    assert refused is not None and refused.refusal is not None
    assert refused.refusal[0] == "host b.test: host not in allowlist"


async def test_peek_gives_up_within_bounds() -> None:
    peeked = await peek(_reader(b"\x16\x03\x01\x00").read, 0.2, 16384)
    assert peeked.kind is TrafficKind.TLS and peeked.problem and "within 0.2s" in peeked.problem
    silent = await peek(_reader().read, 0.1, 16384)
    assert silent.kind is TrafficKind.OPAQUE and not silent.data  # server-speaks-first: decided by address
    opaque = await peek(_reader(b"SSH-2.0-OpenSSH_9.6\r\n").read, 1.0, 16384)
    assert opaque.kind is TrafficKind.OPAQUE and bytes(opaque.data) == b"SSH-2.0-OpenSSH_9.6\r\n"
    big = await peek(_reader(b"GET /" + b"a" * 5000).read, 1.0, 2048)
    assert big.kind is TrafficKind.HTTP and (big.problem or big.http_error)
    closed = await peek(_reader(eof=True).read, 1.0, 16384)
    assert closed.kind is None and closed.problem == "closed"


def test_http_guard_cuts_a_fronted_request_at_its_offset() -> None:
    tracker = HttpRequestTracker()
    first = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    tracker.feed(first)
    guard = _HttpGuard(policy("allowlisted", {"allow_hosts": ["a.test", "b.test"]}), tracker, "a.test", 80)
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
    guard = _HttpGuard(policy("allowlisted", {"allow_hosts": ["a.test"]}), tracker, "a.test", 80)
    cut = guard.feed(bad)
    assert cut is not None and cut.forward == 0 and cut.refusal is not None and cut.refusal[1] == "builtin:http"


def test_peeker_decides_from_bytes_already_read_and_keeps_every_byte() -> None:
    hello = genuine_hello("one.test")
    whole = Peeker(16384).feed(hello)
    assert whole is not None and whole.kind is TrafficKind.TLS and whole.hello is not None
    assert whole.hello.sni == "one.test" and bytes(whole.data) == hello
    split = Peeker(16384)
    assert split.feed(hello[:3]) is None and split.feed(hello[3:40]) is None  # undecided: the engine waits
    rest = split.feed(hello[40:])
    assert rest is not None and rest.hello is not None and bytes(rest.data) == hello
    bounded = Peeker(64)
    assert bounded.feed(b"GET /" + b"a" * 59) is None and bounded.want == 0
    assert bounded.too_large().problem == "http header larger than 64 bytes"


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
    guard = _FirstWordsGuard(5.0)
    stops = [guard.feed(piece) for piece in pieces]
    assert all(stop is None for stop in stops[:-1])
    last = stops[-1]
    assert last is not None and last.forward == 0 and last.refusal is not None
    assert last.refusal[1] == "builtin:peek" and "said nothing for 5.0s" in last.refusal[0]


def test_a_silent_clients_other_protocol_passes_once_classified() -> None:
    guard = _FirstWordsGuard(5.0)
    assert guard.feed(b"SSH-2.0-") is None
    stop = guard.feed(b"OpenSSH_9.6\r\n")
    assert stop is not None and stop.passthrough and stop.forward == len(b"OpenSSH_9.6\r\n") and stop.refusal is None
