"""Property-based checks of the matchers against plain reference implementations.

(a) `NetSet.match` against a brute force over `ipaddress` (most specific network wins);
(b) host matching in `decide` against a reference exact + first-level-wildcard matcher;
(c) `normalize_pattern`: idempotent on whatever it accepts, and only ever raises GatewayError.
"""

from __future__ import annotations

import ipaddress
import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.decision import DEFAULT_LIMITS, NetSet, address_key, compile_policy, decide
from gateway.errors import GatewayError
from gateway.hostnames import MAX_HOSTNAME_LENGTH, normalize_pattern
from gateway.policy import Egress, IPAddress, IPNetwork, Sandbox
from gateway.presets import BUILTIN_PRESETS

# --------------------------------------------------------------------------- (a) CIDR sets

V4_BITS, V6_BITS = 32, 128


def _network(version: int, value: int, prefix: int) -> IPNetwork:
    bits = V4_BITS if version == 4 else V6_BITS
    base = value >> (bits - prefix) << (bits - prefix) if prefix < bits else value
    return ipaddress.ip_network((base, prefix)) if version == 4 else ipaddress.IPv6Network((base, prefix))


v4_networks = st.builds(_network, st.just(4), st.integers(0, 2**32 - 1), st.integers(0, 32))
# Short IPv6 prefixes are rare in practice but make overlaps (and thus "most specific wins") likely.
v6_networks = st.builds(
    _network, st.just(6), st.integers(0, 2**128 - 1), st.one_of(st.integers(0, 16), st.integers(0, 128))
)
v4_addresses = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6_addresses = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
mapped_addresses = st.builds(lambda v: ipaddress.IPv6Address((0xFFFF << 32) | v), st.integers(0, 2**32 - 1))


@st.composite
def nested_networks(draw: st.DrawFn) -> list[IPNetwork]:
    """A chain of networks each inside the previous one, so one address has several matches."""
    net = draw(st.one_of(v4_networks, v6_networks))
    chain = [net]
    for _ in range(draw(st.integers(0, 4))):
        if net.prefixlen == net.max_prefixlen:
            break
        prefix = draw(st.integers(net.prefixlen + 1, net.max_prefixlen))
        index = draw(st.integers(0, 2 ** (prefix - net.prefixlen) - 1))
        base = int(net.network_address) + (index << (net.max_prefixlen - prefix))
        net = _network(net.version, base, prefix)
        chain.append(net)
    return chain


@st.composite
def address_inside(draw: st.DrawFn, networks: list[IPNetwork]) -> IPAddress:
    net = draw(st.sampled_from(networks))
    offset = draw(st.integers(0, net.num_addresses - 1))
    value = int(net.network_address) + offset
    return ipaddress.IPv4Address(value) if net.version == 4 else ipaddress.IPv6Address(value)


def reference_match(networks: list[IPNetwork], address: IPAddress) -> str | None:
    """Brute force: every network that contains the address; the longest prefix wins."""
    if address.version == 6 and address.ipv4_mapped is not None:  # the gateway unwraps ::ffff:a.b.c.d
        address = address.ipv4_mapped
    containing = [net for net in networks if net.version == address.version and address in net]
    if not containing:
        return None
    return str(max(containing, key=lambda net: net.prefixlen))


@st.composite
def netsets_and_addresses(draw: st.DrawFn) -> tuple[list[IPNetwork], list[IPAddress]]:
    networks = draw(st.lists(st.one_of(v4_networks, v6_networks), max_size=30))
    for _ in range(draw(st.integers(0, 2))):
        networks += draw(nested_networks())
    networks = draw(st.permutations(networks))
    addresses = draw(st.lists(st.one_of(v4_addresses, v6_addresses, mapped_addresses), max_size=5))
    if networks:
        addresses += draw(st.lists(address_inside(networks), min_size=1, max_size=10))
        v4 = [net for net in networks if net.version == 4]
        if v4:  # the same IPv4 addresses, as a dual-stack socket reports them
            inside = draw(st.lists(address_inside(v4), min_size=1, max_size=3))
            addresses += [ipaddress.IPv6Address(f"::ffff:{addr}") for addr in inside]
    return networks, addresses


@settings(max_examples=150, deadline=None)
@given(netsets_and_addresses())
def test_netset_agrees_with_brute_force(case: tuple[list[IPNetwork], list[IPAddress]]) -> None:
    networks, addresses = case
    netset = NetSet(networks)
    assert bool(netset) == bool(networks)
    for address in addresses:
        expected = reference_match(networks, address)
        assert netset.match(address_key(address)) == expected, (address, networks)
        assert netset.match(address_key(str(address))) == expected, (str(address), networks)


@settings(max_examples=60, deadline=None)
@given(st.lists(v4_networks, min_size=1, max_size=20), st.data())
def test_decide_cidr_verdicts_agree_with_brute_force(networks: list[IPNetwork], data: st.DataObject) -> None:
    """The same property end to end: allow_cidrs in a compiled policy, addresses as strings."""
    sandbox = Sandbox(
        id="sb",
        addresses=(ipaddress.ip_address("10.75.0.2"),),
        profile="allowlisted",
        egress=Egress(allow_cidrs=tuple(dict.fromkeys(networks))),
    )
    policy = compile_policy(sandbox, None, BUILTIN_PRESETS, DEFAULT_LIMITS)
    for address in data.draw(st.lists(st.one_of(v4_addresses, address_inside(networks)), min_size=1, max_size=10)):
        expected = reference_match(networks, address)
        verdict = decide(policy, None, str(address), 443, "tcp")
        assert verdict.allowed is (expected is not None)
        assert verdict.label == (f"allow_cidrs {expected}" if expected else "default:deny")


# --------------------------------------------------------------------------- (b) host patterns

# A small alphabet of labels, so that generated patterns and queries collide often.
labels = st.sampled_from(["a", "b", "c", "ab", "x-y", "example", "com", "io", "xn--bcher-kva", "a1"])
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
exact_patterns = names
wildcard_patterns = st.lists(labels, min_size=2, max_size=3).map(lambda parts: "*." + ".".join(parts))


def reference_host_rule(patterns: list[str], query: str) -> str | None:
    """Exact match first; else `*.parent` when the query is exactly one label under `parent`."""
    name = query.lower()
    name = name.removesuffix(".")
    if name in patterns:
        return f"allow_hosts {name}"
    first, dot, parent = name.partition(".")
    if dot and first and f"*.{parent}" in patterns:
        return f"allow_hosts *.{parent}"
    return None


@st.composite
def queries_for(draw: st.DrawFn, patterns: list[str]) -> str:
    source = draw(st.sampled_from(["random", "pattern", "under", "deeper", "parent"]))
    pattern = draw(st.sampled_from(patterns))
    bare = pattern.removeprefix("*.")
    if source == "random":
        name = draw(names)
    elif source == "pattern":
        name = bare
    elif source == "under":
        name = f"{draw(labels)}.{bare}"
    elif source == "deeper":
        name = f"{draw(labels)}.{draw(labels)}.{bare}"
    else:
        name = bare.partition(".")[2] or bare
    if draw(st.booleans()):
        name = "".join(ch.upper() if draw(st.booleans()) else ch for ch in name)
    if draw(st.booleans()):
        name += "."
    return name


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(exact_patterns, wildcard_patterns), min_size=1, max_size=20, unique=True), st.data())
def test_host_matching_agrees_with_reference(patterns: list[str], data: st.DataObject) -> None:
    patterns = [normalize_pattern(p) for p in patterns]  # the alphabet is valid: this only checks that
    sandbox = Sandbox(
        id="sb",
        addresses=(ipaddress.ip_address("10.75.0.2"),),
        profile="allowlisted",
        egress=Egress(allow_hosts=tuple(dict.fromkeys(patterns))),
    )
    policy = compile_policy(sandbox, None, BUILTIN_PRESETS, DEFAULT_LIMITS)
    for query in data.draw(st.lists(queries_for(patterns), min_size=1, max_size=10)):
        expected = reference_host_rule(patterns, query)
        for address, port, protocol in ((None, None, "dns"), ("93.184.216.34", 443, "tls")):
            verdict = decide(policy, query, address, port, protocol)
            assert verdict.allowed is (expected is not None), (query, patterns)
            assert verdict.label == (expected or "default:deny"), (query, patterns)


# --------------------------------------------------------------------------- (c) normalize_pattern

CANONICAL = re.compile(r"(\*\.)?[a-z0-9-]+(\.[a-z0-9-]+)*")

hostnameish = st.lists(
    st.one_of(
        labels,
        st.text(alphabet="abcXYZ019-*_üß.é例", min_size=0, max_size=8),
        st.sampled_from(["*", "**", "xn--", "XN--BCHER-KVA", "-a", "a-", "", "a" * 63, "a" * 64, "1", "ｅｘ"]),
    ),
    min_size=1,
    max_size=6,
).map(".".join)
decorated = st.tuples(
    st.sampled_from(["", "*.", "https://", " ", "["]), hostnameish, st.sampled_from(["", ".", ":443", "/x", "]", ".."])
).map("".join)


def _check_normalize(value: str) -> None:
    try:
        normalized = normalize_pattern(value)
    except GatewayError as exc:
        assert exc.code == "INVALID_HOSTNAME"
        assert exc.message
        return
    assert normalize_pattern(normalized) == normalized  # idempotent
    assert CANONICAL.fullmatch(normalized), normalized
    assert len(normalized) <= MAX_HOSTNAME_LENGTH
    assert all(0 < len(label) <= 63 for label in normalized.removeprefix("*.").split("."))
    if value.isascii():
        assert normalized == value.lower().removesuffix(".")  # ASCII input is only lowercased and folded


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_normalize_pattern_on_arbitrary_text(value: str) -> None:
    _check_normalize(value)


@settings(max_examples=400, deadline=None)
@given(st.one_of(hostnameish, decorated))
def test_normalize_pattern_on_hostname_like_text(value: str) -> None:
    _check_normalize(value)


@settings(max_examples=200, deadline=None)
@given(st.lists(labels, min_size=1, max_size=5).map(".".join), st.booleans())
def test_normalize_pattern_accepts_valid_names(name: str, wildcard: bool) -> None:
    value = f"*.{name}" if wildcard else name
    assume(not wildcard or "." in name)  # *.tld is refused on purpose
    assert normalize_pattern(value) == value
    assert normalize_pattern(value.upper() + ".") == value


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.text(max_size=5))))
def test_normalize_pattern_refuses_non_strings(value: object) -> None:
    try:
        normalize_pattern(value)
    except GatewayError as exc:
        assert exc.code == "INVALID_HOSTNAME"
        assert "expected a hostname string" in exc.message
    else:
        raise AssertionError(f"{value!r} accepted")
