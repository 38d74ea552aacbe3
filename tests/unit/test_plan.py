"""The egress plan (gateway.engine.plan) without sockets to a sandbox: a real resolver against a real
(loopback) authoritative server, real Destinations, compiled policies as the API makes them."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.decision import Verdict, decide
from gateway.destinations import Destinations
from gateway.engine import plan as plan_module
from gateway.engine.plan import plan_named, plan_unnamed, replan
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
    assert plan.reason.endswith(
        "cloud metadata service (AWS, GCP, Azure, OCI, OpenStack, DigitalOcean) 169.254.169.254"
    )
    assert plan.label == "builtin:metadata"
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


def test_allow_cidrs_around_a_metadata_endpoint_never_open_it() -> None:
    pol = policy("allowlisted", {"allow_cidrs": ["100.64.0.0/10", "168.63.0.0/16", "fd00::/8"]})
    assert plan_unnamed(pol, "100.64.1.1", 443, "tcp", DEST, None).allowed  # the CGNAT overlay itself
    for address in ("100.100.100.200", "168.63.129.16", "fd00:ec2::254", "::ffff:100.100.100.200"):
        plan = plan_unnamed(pol, address, 80, "tcp", DEST, None)
        assert not plan.allowed and plan.label == "builtin:metadata", address


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
    assert plan_unnamed(anything, "169.254.169.254", 80, "http", dest, None).label == "builtin:metadata"
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
    assert plan.learned == "git.example.com"  # the record names it
    refused = plan_unnamed(pol, "8.8.4.4", 22, "tcp", DEST, learned)
    assert not refused.allowed and refused.learned is None
    now[0] = 31
    assert not plan_unnamed(pol, "8.8.8.8", 22, "tcp", DEST, learned).allowed


def test_learned_is_bounded() -> None:
    learned = LearnedDestinations(max_per_sandbox=2)
    learned.add("sb1", "a.test", ["192.0.2.1", "192.0.2.2", "192.0.2.3"], ttl=60)
    assert learned.lookup("sb1", "192.0.2.1") is None and learned.lookup("sb1", "192.0.2.3") == "a.test"
    assert len(learned) == 2


def test_a_name_vouches_for_a_bounded_number_of_addresses() -> None:
    # A hostile authoritative server answering an allowed name with ever new addresses cannot make a whole range
    # reachable by address: the name keeps its latest `max_per_name`.
    learned = LearnedDestinations(max_per_name=3)
    for n in range(1, 11):
        learned.add("sb1", "pool.test", [f"192.0.2.{n}"], ttl=60)
    learned.add("sb1", "other.test", ["198.51.100.1"], ttl=60)
    assert [learned.lookup("sb1", f"192.0.2.{n}") for n in range(1, 11)] == [None] * 7 + ["pool.test"] * 3
    assert learned.lookup("sb1", "198.51.100.1") == "other.test" and len(learned) == 4
    # One answer with more addresses than the bound keeps its last ones.
    learned.add("sb1", "wide.test", [f"203.0.113.{n}" for n in range(1, 9)], ttl=60)
    assert [learned.lookup("sb1", f"203.0.113.{n}") for n in (5, 6, 7, 8)] == [
        None,
        "wide.test",
        "wide.test",
        "wide.test",
    ]


def test_a_shared_address_vouches_for_the_name_that_last_returned_it_on_that_names_ports() -> None:
    learned = LearnedDestinations(max_per_name=2)
    pol = policy("allowlisted", {"allow_hosts": ["web.cdn.test"], "host_ports": [443]})
    learned.add("sb1", "web.cdn.test", ["8.8.8.8"], ttl=60)
    assert plan_unnamed(pol, "8.8.8.8", 443, "tcp", DEST, learned).allowed
    assert not plan_unnamed(pol, "8.8.8.8", 22, "tcp", DEST, learned).allowed  # the name's ports, nothing wider
    learned.add("sb1", "blocked.cdn.test", ["8.8.8.8"], ttl=60)  # the same CDN address, for a name not allowed
    assert not plan_unnamed(pol, "8.8.8.8", 443, "tcp", DEST, learned).allowed
    # The address left web.cdn.test's share of the bound: two more of its addresses do not evict anything else.
    learned.add("sb1", "web.cdn.test", ["8.8.4.4", "1.1.1.1"], ttl=60)
    assert learned.lookup("sb1", "8.8.8.8") == "blocked.cdn.test"
    assert learned.lookup("sb1", "8.8.4.4") == learned.lookup("sb1", "1.1.1.1") == "web.cdn.test"


async def test_report_mode_plans_what_the_allowlist_misses_and_still_refuses_guarded_addresses(server) -> None:
    resolver = make(server[1])
    pol = policy("allowlisted", {"allow_hosts": ["one.test"], "enforcement": "report"})
    plan = await plan_named(pol, "v4only.test", "192.0.2.4", 443, "tls", DEST, resolver)
    assert plan.allowed and plan.would_deny and plan.dial == "192.0.2.4" and plan.label == "default:deny"
    assert plan.reason == "report mode: would deny (host not in allowlist)"
    # Dialled only where the name resolves, as an allowed name is (here past its private address).
    plan = await plan_named(pol, "mixed.test", "192.0.2.77", 443, "tls", DEST, resolver)
    assert plan.allowed and plan.would_deny and plan.dial == "192.0.2.9"
    plan = await plan_named(pol, "one.test", "192.0.2.1", 443, "tls", DEST, resolver)
    assert plan.allowed and not plan.would_deny
    # The address checks are not the allowlist's: metadata and private addresses stay refused.
    plan = await plan_named(pol, "metadata.test", "192.0.2.1", 80, "http", DEST, resolver)
    assert not plan.allowed and plan.label == "builtin:metadata"
    plan = await plan_named(pol, "private.test", "192.0.2.1", 80, "http", DEST, resolver)
    assert not plan.allowed and plan.label == "builtin:special"
    assert plan_unnamed(pol, "169.254.169.254", 80, "tcp", DEST, None).label == "builtin:metadata"
    plan = plan_unnamed(pol, "192.0.2.9", 22, "tcp", DEST, None)
    assert plan.allowed and plan.would_deny and plan.dial == "192.0.2.9"


# --------------------------------------------------------------------------- the live cut: decided again


async def test_an_established_connection_is_decided_again_on_its_name_at_the_address_it_dialled(server) -> None:
    resolver = make(server[1])
    before = policy("allowlisted", ALLOW)
    plan = await plan_named(before, "one.test", "192.0.2.77", 443, "tls", DEST, resolver)
    assert plan.allowed and plan.name == "one.test" and plan.dial == "192.0.2.1"
    # No resolution this time: the connection is already dialled; only the policy changed.
    assert replan(before, plan.name, "192.0.2.1", 443, "tls", DEST, None).allowed
    narrowed = policy("allowlisted", {"allow_hosts": ["private.test"]})
    again = replan(narrowed, plan.name, "192.0.2.1", 443, "tls", DEST, None)
    assert not again.allowed and again.reason == "host not in allowlist"
    ports = policy("allowlisted", {"allow_hosts": ["one.test"], "host_ports": [8443]})
    assert not replan(ports, plan.name, "192.0.2.1", 443, "tls", DEST, None).allowed
    denied = policy("allowlisted", {"allow_hosts": ["one.test"], "deny_cidrs": ["192.0.2.0/28"]})
    assert not replan(denied, plan.name, "192.0.2.1", 443, "tls", DEST, None).allowed
    # A special address stays dialable only while an allow_cidrs entry lets it be.
    private = policy("allowlisted", {"allow_hosts": ["private.test"], "allow_cidrs": ["10.0.0.0/24"]})
    assert replan(private, "private.test", "10.0.0.5", 443, "tls", DEST, None).allowed
    unlisted = policy("allowlisted", {"allow_hosts": ["private.test"]})
    refused = replan(unlisted, "private.test", "10.0.0.5", 443, "tls", DEST, None)
    assert not refused.allowed and refused.label == "builtin:special"


def test_an_unnamed_connection_is_decided_again_as_a_new_one_and_loses_a_flushed_learned_address() -> None:
    learned = LearnedDestinations()
    learned.add("sb1", "web.test", ["8.8.8.8"], ttl=60)
    learned.add("sb1", "api.test", ["8.8.4.4"], ttl=60)
    pol = policy("allowlisted", {"allow_hosts": ["web.test", "api.test"]})
    assert replan(pol, None, "8.8.8.8", 22, "tcp", DEST, learned).allowed
    narrowed = policy("allowlisted", {"allow_hosts": ["api.test"]})
    assert learned.retain("sb1", lambda name: narrowed.name_allowed(name).allowed) == 1
    assert learned.lookup("sb1", "8.8.8.8") is None and learned.lookup("sb1", "8.8.4.4") == "api.test"
    # Allowing the name again does not bring the flushed address back: only a new DNS answer does.
    assert not replan(pol, None, "8.8.8.8", 22, "tcp", DEST, learned).allowed
    assert replan(pol, None, "8.8.4.4", 22, "tcp", DEST, learned).allowed
    assert learned.forget("sb1") == 1 and learned.lookup("sb1", "8.8.4.4") is None and len(learned) == 0
