"""Special-purpose, own and blocklisted destination addresses (gateway/destinations.py)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from gateway.destinations import Destinations, embedded_ipv4, parse_blocklist

PUBLIC_TEST_RANGES = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32")]


@pytest.fixture
def dest() -> Destinations:
    return Destinations()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", "private address (RFC 1918) 10.1.2.3"),
        ("172.16.0.1", "private address (RFC 1918) 172.16.0.1"),
        ("192.168.1.1", "private address (RFC 1918) 192.168.1.1"),
        ("100.64.0.1", "shared address space (CGNAT 100.64.0.0/10) 100.64.0.1"),
        ("127.0.0.1", "loopback address 127.0.0.1"),
        ("0.0.0.0", "'this network' address (0.0.0.0/8) 0.0.0.0"),
        ("224.0.0.1", "multicast address 224.0.0.1"),
        ("240.0.0.1", "reserved address (240.0.0.0/4) 240.0.0.1"),
        ("255.255.255.255", "broadcast address 255.255.255.255"),
        ("198.18.1.1", "benchmarking address (198.18.0.0/15) 198.18.1.1"),
        ("192.0.2.1", "documentation address (TEST-NET-1) 192.0.2.1"),
        ("203.0.113.9", "documentation address (TEST-NET-3) 203.0.113.9"),
        ("::1", "loopback address ::1"),
        ("::", "unspecified address ::"),
        ("fd00::1", "unique local address (fc00::/7) fd00::1"),
        ("fe80::1", "link-local address fe80::1"),
        ("ff02::1", "multicast address ff02::1"),
        ("100::1", "discard-only address (100::/64) 100::1"),
        ("2001:db8::1", "documentation address (2001:db8::/32) 2001:db8::1"),
        ("64:ff9b:1::1", "local-use NAT64 address (64:ff9b:1::/48) 64:ff9b:1::1"),
        # IPv4-mapped is unwrapped before anything else: it *is* that IPv4 address.
        ("::ffff:10.9.8.7", "private address (RFC 1918) 10.9.8.7"),
    ],
)
def test_special_purpose_addresses_are_refused_with_a_reason(dest: Destinations, address: str, reason: str) -> None:
    refusal = dest.check(address)
    assert refusal is not None
    assert refusal.reason == reason
    assert refusal.kind == "special" and refusal.overridable and refusal.rule == "builtin:special"


METADATA = [
    ("169.254.169.254", "cloud metadata service (AWS, GCP, Azure, OCI, OpenStack, DigitalOcean)"),
    ("169.254.170.2", "cloud metadata service (AWS ECS task metadata)"),
    ("169.254.170.23", "cloud metadata service (AWS EKS Pod Identity)"),
    ("169.254.0.23", "cloud metadata service (Tencent Cloud)"),
    ("169.254.1.1", "link-local address (cloud metadata services live here)"),
    ("100.100.100.200", "cloud metadata service (Alibaba Cloud)"),
    ("168.63.129.16", "cloud host agent (Azure WireServer)"),
    ("192.0.0.192", "cloud metadata service (Oracle Cloud)"),
    ("fd00:ec2::254", "cloud metadata service (AWS IMDS over IPv6)"),
    ("fd00:ec2::23", "cloud metadata service (AWS EKS Pod Identity over IPv6)"),
    ("fd20:ce::254", "cloud metadata service (Google Cloud over IPv6)"),
]


@pytest.mark.parametrize(("address", "label"), METADATA)
def test_metadata_endpoints_are_refused_whatever_the_public_ranges_say(address: str, label: str) -> None:
    # Even an operator who declares every address public (a lab, a CGNAT overlay) keeps them closed.
    dest = Destinations([ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")])
    refusal = dest.check(address)
    assert refusal is not None
    assert (refusal.kind, refusal.reason, refusal.rule, refusal.overridable) == (
        "metadata",
        f"{label} {address}",
        "builtin:metadata",
        False,
    )


def _spellings(v4: str) -> list[tuple[str, str]]:
    """Every IPv6 spelling of an IPv4 address the gateway unwraps, with the form's name."""
    value = int(ipaddress.IPv4Address(v4))
    inverted = ~value & 0xFFFFFFFF
    return [
        (f"::ffff:{v4}", ""),  # IPv4-mapped: it *is* the IPv4 address
        (str(ipaddress.IPv6Address(value)), "IPv4-compatible"),
        (str(ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1)), "6to4"),
        (str(ipaddress.IPv6Address((0x20010000 << 96) | (value << 64))), "Teredo server"),
        (str(ipaddress.IPv6Address((0x20010000 << 96) | (0x08080808 << 64) | inverted)), "Teredo client"),
        (str(ipaddress.IPv6Address((0x0064FF9B << 96) | value)), "NAT64"),
        (str(ipaddress.IPv6Address((0x0064FF9B0001 << 80) | value)), "local-use NAT64"),
    ]


@pytest.mark.parametrize("v4", ["169.254.169.254", "100.100.100.200", "168.63.129.16", "192.0.0.192"])
@pytest.mark.parametrize("form", range(7))
def test_every_ipv6_spelling_of_a_metadata_endpoint_is_refused(v4: str, form: int) -> None:
    address, name = _spellings(v4)[form]
    dest = Destinations([ipaddress.ip_network("::/0"), ipaddress.ip_network("0.0.0.0/0")])
    refusal = dest.check(address)
    assert refusal is not None and refusal.kind == "metadata" and not refusal.overridable
    if name:
        assert refusal.reason.startswith(f"IPv4 {v4} embedded in {name} {address} is refused: cloud ")
    else:
        assert refusal.reason.endswith(f" {v4}")


def test_every_ipv6_spelling_of_the_gateways_own_and_blocklisted_addresses_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("8.8.4.0/24\n")
    dest = Destinations([ipaddress.ip_network("::/0")], [ipaddress.ip_address("9.9.9.9")], path)
    for v4, kind in (("9.9.9.9", "gateway"), ("8.8.4.4", "blocklist")):
        for address, _ in _spellings(v4):
            refusal = dest.check(address)
            assert refusal is not None and (refusal.kind, refusal.overridable) == (kind, False), address


@pytest.mark.parametrize(
    ("address", "form", "inner"),
    [
        ("2002:a01:203::1", "6to4", "10.1.2.3"),
        ("2002:a9fe:a9fe::", "6to4", "169.254.169.254"),
        ("::10.0.0.1", "IPv4-compatible", "10.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "NAT64", "169.254.169.254"),
        ("64:ff9b::7f00:1", "NAT64", "127.0.0.1"),
        # Teredo: server 65.54.227.120 (public), client obfuscated: ~f5fe:fdfc = 10.1.2.3
        ("2001:0:4136:e378:8000:63bf:f5fe:fdfc", "Teredo client", "10.1.2.3"),
        ("2001:0:a01:203::", "Teredo server", "10.1.2.3"),
    ],
)
def test_ipv4_embedded_in_ipv6_is_unwrapped_and_checked(
    dest: Destinations, address: str, form: str, inner: str
) -> None:
    refusal = dest.check(address)
    assert refusal is not None
    assert refusal.reason.startswith(f"IPv4 {inner} embedded in {form} {address} is refused: ")


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700::1", "2002:808:808::1", "64:ff9b::808:808", "192.88.98.1"]
)
def test_public_addresses_pass(dest: Destinations, address: str) -> None:
    assert dest.check(address) is None


def test_embedded_forms() -> None:
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700::1")) == []
    assert [str(v4) for _, v4 in embedded_ipv4(ipaddress.IPv6Address("2002:c000:201::"))] == ["192.0.2.1"]


def test_public_ranges_make_test_networks_public_but_not_the_gateway() -> None:
    dest = Destinations(PUBLIC_TEST_RANGES, [ipaddress.ip_address("198.18.0.2")])
    assert dest.check("198.18.1.1") is None
    assert dest.check("2001:db8:1::1") is None
    assert dest.check("2002:c612:101::1") is None  # 6to4 around a now-public address
    own = dest.check("198.18.0.2")
    assert own is not None and own.kind == "gateway" and not own.overridable
    assert dest.check("10.0.0.1") is not None


def test_local_addresses_count_as_the_gateways_own() -> None:
    dest = Destinations(local_addresses=[ipaddress.ip_address("8.8.4.4")])
    refusal = dest.check("8.8.4.4")
    assert refusal is not None and refusal.reason == "the gateway's own address 8.8.4.4"
    dest.set_local_addresses([])
    assert dest.check("8.8.4.4") is None


def test_parse_blocklist_skips_bad_lines_with_their_numbers() -> None:
    entries, problems = parse_blocklist("# feed\n203.0.113.0/24\n\nnot-an-ip\n8.8.8.8 # one host\n2001:db8::/48\n")
    assert entries == {"203.0.113.0/24": 2, "8.8.8.8/32": 5, "2001:db8::/48": 6}
    assert problems == [(4, "'not-an-ip' is not an IP address or CIDR")]


def test_blocklist_applies_in_every_case_and_is_reloaded_on_change(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# threat feed\n9.9.9.0/24\nbogus\n2606:4700::/32\n")
    dest = Destinations(PUBLIC_TEST_RANGES, blocklist_path=path)
    refusal = dest.check("9.9.9.9")
    assert refusal is not None
    assert refusal.reason == "operator blocklist 9.9.9.0/24 (line 2)"
    assert refusal.kind == "blocklist" and not refusal.overridable
    assert dest.check("2606:4700::1") is not None
    assert dest.check("::ffff:9.9.9.9") is not None
    assert dest.check("1.1.1.1") is None

    path.write_text("1.1.1.1\n")
    os.utime(path, ns=(1, 1))  # a different mtime even within the filesystem's timestamp granularity
    assert dest.check("1.1.1.1") is None  # the check never looks at the file: the reload does
    assert dest.reload_blocklist() and not dest.reload_blocklist()  # read once per change
    refusal = dest.check("1.1.1.1")
    assert refusal is not None and refusal.reason == "operator blocklist 1.1.1.1/32 (line 1)"
    assert dest.check("9.9.9.9") is None

    path.unlink()  # a missing file is an empty list (logged), not an error
    assert dest.reload_blocklist()
    assert dest.check("1.1.1.1") is None


def test_missing_blocklist_at_start_is_empty(tmp_path: Path) -> None:
    dest = Destinations(blocklist_path=tmp_path / "absent.txt")
    assert dest.check("8.8.8.8") is None


def test_unparseable_address_is_refused(dest: Destinations) -> None:
    refusal = dest.check("not-an-address")
    assert refusal is not None and not refusal.overridable
