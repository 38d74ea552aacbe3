"""The egress plan (gateway.engine.plan) without sockets to a sandbox: a real resolver against a real
(loopback) authoritative server, real Destinations, compiled policies as the API makes them."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.decision import Verdict, decide
from gateway.destinations import Destinations
from gateway.engine import plan as plan_module
from gateway.engine.plan import plan_named, plan_unnamed
from gateway.learned import LearnedDestinations
from tests.factory import make, policy, resolver_server  # noqa: F401  (the fixture `server`)

# The loopback zone uses documentation ranges; here they stand for the public internet.
DEST = Destinations([ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")])
ALLOW = {"allow_hosts": ["one.test", "private.test", "mixed.test", "metadata.test", "missing.test"]}


async def test_a_named_connection_is_decided_once_per_name_address_and_port(
    server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[object, ...]] = []

    def counting(*args: object) -> Verdict:
        asked.append(args[1:])
        return decide(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(plan_module, "decide", counting)
    resolver = make(server[1])
    pol = policy("allowlisted", ALLOW)
    await resolver.resolve("one.test")  # cached, as on every connection but the first
    plan = await plan_named(pol, "one.test", "192.0.2.1", 443, "tls", DEST, resolver)
    assert plan.allowed and plan.dial == "192.0.2.1"
    assert asked == [("one.test", "192.0.2.1", 443, "tls")]
    asked.clear()
    plan = await plan_named(pol, "one.test", "192.0.2.77", 443, "tls", DEST, resolver)  # another address
    assert plan.allowed and len(asked) == len(set(asked))  # each (name, address, port) at most once


async def test_named_dials_the_original_destination_only_when_it_resolved_there(server) -> None:
    resolver = make(server[1])
    pol = policy("allowlisted", ALLOW)
    plan = await plan_named(pol, "one.test", "192.0.2.1", 443, "tls", DEST, resolver)
    assert plan.allowed and plan.dial == "192.0.2.1" and plan.label == "allow_hosts one.test"
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
    assert not plan.allowed and plan.label == "deny_cidrs 192.0.2.0/28"


async def test_allow_cidrs_may_open_a_special_range_but_not_the_blocklist_or_the_gateway(tmp_path) -> None:
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("10.9.9.0/24\n")
    dest = Destinations(gateway_addresses=[ipaddress.ip_address("10.8.0.1")], blocklist_path=blocklist)
    pol = policy("allowlisted", {"allow_cidrs": ["10.0.0.0/8"]})
    plan = plan_unnamed(pol, "10.1.2.3", 5432, "tcp", dest, None)
    assert plan.allowed and plan.from_allow_cidrs and plan.label == "allow_cidrs 10.0.0.0/8"
    plan = plan_unnamed(pol, "10.9.9.9", 5432, "tcp", dest, None)
    assert not plan.allowed and plan.reason == "operator blocklist 10.9.9.0/24 (line 1)"
    plan = plan_unnamed(pol, "10.8.0.1", 5432, "tcp", dest, None)
    assert not plan.allowed and plan.label == "builtin:gateway"
    # unrestricted allows everything except special ranges, the blocklist and SMTP.
    anything = policy("unrestricted")
    assert plan_unnamed(anything, "8.8.8.8", 22, "tcp", dest, None).allowed
    assert plan_unnamed(anything, "169.254.169.254", 80, "http", dest, None).reason == (
        "metadata service 169.254.169.254"
    )
    assert plan_unnamed(anything, "8.8.8.8", 25, "tcp", dest, None).label == "builtin:smtp"


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
