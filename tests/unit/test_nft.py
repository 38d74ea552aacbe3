"""The nftables table as text (gateway/nft.py): pure rendering, validation, links from the store, and the
reading of `nft -j` answers. The kernel's view of the same table is tested through `gateway run` in
tests/e2e/test_steering.py."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.nft import (
    LinkRule,
    SteeringConfig,
    UnattachedSources,
    links_from_sandboxes,
    parse_counter_packets,
    parse_set_elements,
    render_ruleset,
)
from gateway.policy import parse_sandbox

SANDBOX_V4 = ipaddress.ip_network("10.75.0.0/16")
SANDBOX_V6 = ipaddress.ip_network("fdd4:1476:6c7e::/48")
GATEWAY_V4 = ipaddress.ip_address("198.18.0.2")
GATEWAY_V6 = ipaddress.ip_address("2001:db8:ff::2")
A, B = ipaddress.ip_address("10.75.0.1"), ipaddress.ip_address("10.75.0.2")


def _config(**changes: Any) -> SteeringConfig:
    base = SteeringConfig(
        sandbox_subnets=(SANDBOX_V4, SANDBOX_V6),
        sandbox_interfaces=("vif*",),
        attached=frozenset({A, B, ipaddress.ip_address("fdd4:1476:6c7e::1")}),
        gateway_addresses=frozenset({GATEWAY_V4, GATEWAY_V6}),
        private_links=(LinkRule(A, B, (8080,)),),
    )
    return replace(base, **changes)


def _chain(text: str, name: str) -> list[str]:
    return [line.strip() for line in text.split(f"chain {name} {{\n", 1)[1].split("\n\t}", 1)[0].splitlines()]


def _index(rules: list[str], fragment: str) -> int:
    return next(i for i, rule in enumerate(rules) if fragment in rule)


def test_render_is_deterministic_and_has_the_documented_shape() -> None:
    text = render_ruleset(_config())
    assert text == render_ruleset(_config())
    assert text.splitlines()[2:4] == ["add table inet sandbox_gateway", "delete table inet sandbox_gateway"]
    assert "elements = { 10.75.0.1, 10.75.0.2 }" in text
    assert "elements = { 10.75.0.1 . 10.75.0.2 . tcp . 8080 }" in text
    assert "tproxy ip to :15001 accept" in text and "tproxy ip6 to :15001 accept" in text
    assert "meta mark set 0x1 tproxy ip to :15053 accept" in text
    for chain in ("from_sandbox", "sandbox_input", "sandbox_forward"):
        assert _chain(text, chain)[-1].startswith("counter drop"), f"{chain} must end in an unconditional drop"
    assert "chain output" not in text  # only with dial_mark


def test_dns_to_any_address_is_intercepted_before_the_sandbox_subnet_drop() -> None:
    """The resolver a sandbox is given may lie inside the sandbox subnets (the gateway's address there)."""
    steer = _chain(render_ruleset(_config()), "from_sandbox")
    for family in ("ipv4", "ipv6"):
        dns = _index(steer, f"meta nfproto {family} meta l4proto {{ tcp, udp }} th dport 53")
        assert dns < _index(steer, "sandbox to sandbox, not linked")
        assert dns < _index(steer, "the gateway's own services")
        # ... but never before the source checks: an unattached or spoofed source gets no DNS either.
        assert dns > _index(steer, "unattached source") and dns > _index(steer, "source not routed")
    # Only port 53: the subnet drop still comes before the egress TPROXY of every other port.
    assert _index(steer, "sandbox to sandbox, not linked") < _index(steer, "tproxy ip to :15001")


def test_links_carry_their_protocol_and_any_port_absorbs_specific_ports_of_that_protocol() -> None:
    gone = ipaddress.ip_address("10.75.0.9")
    links = (
        LinkRule(A, B, (80,)),
        LinkRule(A, B),
        LinkRule(A, B, (53, 5353), "udp"),
        LinkRule(A, gone, (1,)),  # a detached end: inert
    )
    text = render_ruleset(_config(private_links=links))
    assert "type ipv4_addr . ipv4_addr . inet_proto . inet_service" in text
    assert "elements = { 10.75.0.1 . 10.75.0.2 . tcp . 1-65535, 10.75.0.1 . 10.75.0.2 . udp . 53, " in text
    assert "10.75.0.1 . 10.75.0.2 . udp . 1-65535" not in text  # a TCP link opens no UDP
    assert "10.75.0.9" not in text
    # The set key matches the packet's own L4 protocol, in prerouting and forward, and the replies back.
    for chain in ("from_sandbox", "sandbox_forward"):
        assert "meta l4proto { tcp, udp } ip saddr . ip daddr . meta l4proto . th dport @link_v4 accept" in _chain(
            text, chain
        )
    assert any("ip daddr . ip saddr . meta l4proto . th sport @link_v4" in r for r in _chain(text, "sandbox_forward"))


def test_unattached_sources_are_remembered_in_a_bounded_set_and_counted_and_still_dropped() -> None:
    text = render_ruleset(_config(unattached_interval=7))
    assert "\tcounter unattached {" in text
    for version, family in ((4, "ip"), (6, "ip6")):
        block = text.split(f"set unattached_v{version} {{\n", 1)[1].split("\n\t}", 1)[0]
        assert "size 4096" in block and "flags dynamic,timeout" in block and "timeout 7s" in block
        steer = _chain(text, "from_sandbox")
        add = steer.index(f"{family} saddr != @sandbox_v{version} add @unattached_v{version} {{ {family} saddr }}")
        # Link-local sources (router solicitations, MLD) are dropped before: they are no unattached sandbox.
        assert (
            steer.index('ip6 saddr fe80::/10 counter drop comment "link-local source: neighbour discovery only"') < add
        )
        # The drop is its own rule after the `add`: a full set cannot skip it.
        assert steer[add + 1] == (
            f'{family} saddr != @sandbox_v{version} counter name "unattached" drop comment "unattached source"'
        )


def test_workers_get_the_tcp_of_their_sandboxes_through_a_verdict_map() -> None:
    c = ipaddress.ip_address("fdd4:1476:6c7e::1")
    text = render_ruleset(_config(workers=3, worker_of={A: 0, B: 2, c: 2}))
    assert "elements = { 10.75.0.1 : jump egress_worker_0, 10.75.0.2 : jump egress_worker_2 }" in text
    assert "elements = { fdd4:1476:6c7e::1 : jump egress_worker_2 }" in text
    steer = "\n".join(_chain(text, "from_sandbox"))
    assert "meta l4proto tcp ip saddr vmap @worker_v4" in steer and "tproxy ip to :15001" not in steer
    for worker in range(3):
        body = _chain(text, f"egress_worker_{worker}")
        assert body[0].endswith(f"tproxy ip to :{15001 + worker} accept") and body[-1] == "counter drop"
    assert "th dport { 15001-15003, 15053 }" in text  # every worker's port is closed to direct connections


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"attached": frozenset({ipaddress.ip_address("192.0.2.1")})}, "attached"),
        ({"egress_port": 0}, "egress_port"),
        ({"dns_port": 15001}, "dns_port"),
        ({"route_table": 254}, "route_table"),
        ({"fwmark": 0x3, "fwmark_mask": 0x1}, "fwmark"),
        ({"dial_mark": 0x1}, "dial_mark"),
        ({"sandbox_interfaces": ('vif"; drop',)}, "sandbox_interfaces[0]"),
        ({"sandbox_interfaces": ()}, "sandbox_interfaces"),
        ({"gateway_addresses": frozenset({ipaddress.ip_address("10.75.9.9")})}, "gateway_addresses"),
        ({"workers": 0}, "workers"),
        ({"workers": 2, "egress_port": 65535}, "workers"),
        ({"workers": 60, "dns_port": 15053}, "dns_port"),
        ({"workers": 2, "worker_of": {ipaddress.ip_address("10.75.0.9"): 1}}, "worker_of"),
        ({"workers": 2, "worker_of": {ipaddress.ip_address("10.75.0.1"): 2}}, "worker_of"),
        ({"private_links": (LinkRule(A, B, (80,), "sctp"),)}, "private_links[0].protocol"),
        ({"private_links": (LinkRule(A, B, (80,), "tcp, udp"),)}, "private_links[0].protocol"),
        ({"private_links": (LinkRule(A, B, (0,)),)}, "private_links[0].ports"),
        ({"private_links": (LinkRule(A, ipaddress.ip_address("fdd4:1476:6c7e::2")),)}, "private_links[0]"),
        ({"unattached_interval": 0.5}, "unattached_interval"),
    ],
)
def test_invalid_configs_are_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(GatewayError) as caught:
        _config(**changes)
    assert caught.value.code == "STEERING_INVALID" and caught.value.field == field


def test_masked_fwmark_keeps_other_bits() -> None:
    text = render_ruleset(_config(fwmark=0x100, fwmark_mask=0x100))
    assert "meta mark set meta mark & 0xfffffeff | 0x100" in text
    assert "meta mark & 0x100 == 0x100 socket transparent 1 accept" in text
    assert _config(fwmark=0x100, fwmark_mask=0x100).policy_routing.commands()[0][5] == "0x100/0x100"


def _sandbox(sid: str, *addresses: str, links: list[Any] | None = None) -> Any:
    return parse_sandbox(
        {"id": sid, "addresses": list(addresses), "private_links": links or []},
        subnets=(SANDBOX_V4, SANDBOX_V6),
        known_presets=(),
        known_secrets=(),
    )


def test_links_from_the_store_join_every_address_pair_of_one_version_one_way() -> None:
    db = _sandbox(
        "db",
        "10.75.0.2",
        "fdd4:1476:6c7e::2",
        links=["app", {"source": "app", "ports": [5353, 53], "protocol": "udp"}, "ghost", "db"],
    )
    app = _sandbox("app", "10.75.0.1", "fdd4:1476:6c7e::1")
    v4a, v6a = app.addresses
    v4d, v6d = db.addresses
    assert links_from_sandboxes([db, app]) == (
        LinkRule(v4a, v4d, (), "tcp"),
        LinkRule(v6a, v6d, (), "tcp"),
        LinkRule(v4a, v4d, (53, 5353), "udp"),
        LinkRule(v6a, v6d, (53, 5353), "udp"),
    )  # "ghost" is in no record and "db" is the target itself: nothing
    assert links_from_sandboxes([app]) == ()  # the link lives on the target: without it, nothing


def test_nft_json_answers_are_read_in_both_element_shapes() -> None:
    meta = {"metainfo": {"version": "1.0.6"}}
    counter = {"nftables": [meta, {"counter": {"name": "unattached", "packets": 12, "bytes": 900}}]}
    assert parse_counter_packets(json.dumps(counter)) == 12
    assert parse_counter_packets(json.dumps({"nftables": [meta]})) == 0
    elements = [{"elem": {"val": "10.75.0.9", "expires": 9}}, "10.75.0.8"]
    listing = {"nftables": [meta, {"set": {"name": "unattached_v4", "elem": elements}}]}
    assert parse_set_elements(json.dumps(listing)) == ["10.75.0.9", "10.75.0.8"]
    assert parse_set_elements(json.dumps({"nftables": [meta, {"set": {"name": "x"}}]})) == []
    with pytest.raises(GatewayError):
        parse_set_elements("not json")


def test_unattached_sources_are_logged_once_per_address_per_interval_and_bounded() -> None:
    seen = UnattachedSources(interval=10, max_logged=2)
    seen.count(5)
    assert seen.observe(["10.75.0.9"], now=100) == (["10.75.0.9"], 0)
    assert seen.observe(["10.75.0.9"], now=105) == ([], 0)  # within the interval: not again
    assert seen.observe(["10.75.0.9"], now=110) == (["10.75.0.9"], 0)  # the next interval: again
    due, more = seen.observe(["10.75.0.1", "10.75.0.2", "10.75.0.3", "10.75.0.9"], now=111)
    assert (due, more) == (["10.75.0.1", "10.75.0.2"], 1)  # 10.75.0.9 was just logged; one more left out
    seen.count(3)
    seen.count(-1)  # never goes backwards
    assert seen.total == 8 and len(seen.recent) == 2
