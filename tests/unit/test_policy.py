"""The policy model: every validation rule, its error code and the field path it names."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.inspection import Credential, HeaderMatch, InspectRule
from gateway.policy import (
    EGRESS_FIELDS,
    INSPECT_FIELDS,
    MAX_ADDRESSES,
    MAX_LIST_ENTRIES,
    Egress,
    Ingress,
    Limits,
    PrivateLink,
    Sandbox,
    Template,
    parse_egress,
    parse_ingress,
    parse_limits,
    parse_sandbox,
    parse_template,
)
from gateway.presets import BUILTIN_PRESETS

SUBNETS = (ipaddress.ip_network("10.75.0.0/16"), ipaddress.ip_network("fdd4:1476:6c7e::/48"))
PRESETS = set(BUILTIN_PRESETS)
#: An operator with many presets, so a list of 51 distinct preset names is possible.
MANY_PRESETS = PRESETS | {f"op-{i}" for i in range(60)}
#: The secret names the [inspection] config would hold.
SECRETS = {"github", "openai"}
N = MAX_LIST_ENTRIES


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def sandbox(presets: set[str] = PRESETS, **fields: Any) -> Sandbox:
    data = {"id": "sb1", "addresses": ["10.75.0.2"], **fields}
    return parse_sandbox(data, subnets=SUBNETS, known_presets=presets, known_secrets=SECRETS)


def sandbox_error(data: object, presets: set[str] = PRESETS, sandbox_id: str | None = None) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        parse_sandbox(data, subnets=SUBNETS, known_presets=presets, known_secrets=SECRETS, sandbox_id=sandbox_id)
    return info.value


def fails(code: str, field: str | None, presets: set[str] = PRESETS, **fields: Any) -> GatewayError:
    """A sandbox record (id sb1, one good address, plus `fields`) is refused with `code` at `field`."""
    error = sandbox_error({"id": "sb1", "addresses": ["10.75.0.2"], **fields}, presets)
    assert (error.code, error.field) == (code, field), error
    return error


def egress_fails(code: str, field: str, egress: object, profile: str = "allowlisted") -> GatewayError:
    return fails(code, field, profile=profile, egress=egress)


def template_error(data: object, name: str | None = None) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        parse_template(data, known_presets=PRESETS, known_secrets=SECRETS, name=name)
    return info.value


# --------------------------------------------------------------------------- a good record


def test_minimal_sandbox_defaults() -> None:
    sb = sandbox()
    assert sb == Sandbox(id="sb1", addresses=(ipaddress.ip_address("10.75.0.2"),))
    assert sb.profile == "isolated"
    assert sb.egress == Egress() and not sb.egress.set_fields()
    assert sb.ingress == Ingress()
    assert sb.limits == Limits()
    assert sb.private_links == ()
    assert sb.template is None


def test_full_allowlisted_sandbox() -> None:
    sb = sandbox(
        profile="allowlisted",
        template="base",
        addresses=["10.75.0.2", "fdd4:1476:6c7e::2"],
        egress={
            "mode": "deny_all",
            "allow_internet": True,
            "allow_hosts": ["GitHub.com", "*.example.com", "github.com"],
            "presets": ["ai-apis"],
            "allow_cidrs": ["1.1.1.1/32", "2001:db8::/32"],
            "deny_cidrs": ["10.0.0.0/8"],
            "allow_ports": [443, 8080],
            "host_ports": [443],
        },
        labels={"team": "ml"},
    )
    assert sb.addresses == (ipaddress.ip_address("10.75.0.2"), ipaddress.ip_address("fdd4:1476:6c7e::2"))
    assert sb.egress.allow_hosts == ("github.com", "*.example.com")  # normalised, duplicates dropped
    assert sb.egress.allow_cidrs == (net("1.1.1.1/32"), net("2001:db8::/32"))
    assert sb.egress.deny_cidrs == (net("10.0.0.0/8"),)
    assert sb.egress.allow_ports == (443, 8080)
    assert sb.egress.host_ports == (443,)
    assert sb.egress.presets == ("ai-apis",)
    assert sb.template == "base"
    assert sb.labels == {"team": "ml"}


def test_null_egress_fields_are_unset() -> None:
    sb = sandbox(profile="allowlisted", egress={"allow_hosts": None, "mode": None})
    assert sb.egress == Egress()


# --------------------------------------------------------------------------- UNKNOWN_FIELD / INVALID_TYPE


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"profile": "allowlisted", "egress": {"allow_host": ["a.com"]}}, "egress.allow_host"),
        ({"limits": {"bandwidth": 5}}, "limits.bandwidth"),
        ({"ingress": {"source": []}}, "ingress.source"),
        ({"private_links": [{"source": "a", "port": [1]}]}, "private_links[0].port"),
    ],
)
def test_unknown_field(fields: dict[str, Any], field: str) -> None:
    error = fails("UNKNOWN_FIELD", field, **fields)
    assert "unknown field" in error.message


@pytest.mark.parametrize("data", [[], "sb1", 42, None])
def test_record_must_be_an_object(data: object) -> None:
    error = sandbox_error(data)
    assert error.code == "INVALID_TYPE"
    assert "expected an object" in error.message


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"addresses": "10.75.0.2"}, "addresses"),
        ({"profile": "allowlisted", "egress": "github.com"}, "egress"),
        ({"profile": "allowlisted", "egress": {"allow_internet": "yes"}}, "egress.allow_internet"),
        ({"profile": "allowlisted", "egress": {"allow_internet": 1}}, "egress.allow_internet"),
        ({"profile": "allowlisted", "egress": {"allow_hosts": "github.com"}}, "egress.allow_hosts"),
        ({"profile": "allowlisted", "egress": {"allow_cidrs": "10.0.0.0/8"}}, "egress.allow_cidrs"),
        ({"limits": {"bandwidth_mbit": "100"}}, "limits.bandwidth_mbit"),
        ({"limits": {"bandwidth_mbit": True}}, "limits.bandwidth_mbit"),
        ({"limits": {"bandwidth_mbit": 100.0}}, "limits.bandwidth_mbit"),
        ({"limits": []}, "limits"),
        ({"ingress": "open"}, "ingress"),
        ({"ingress": {"public_access": "yes"}}, "ingress.public_access"),
        ({"ingress": {"ports": 443}}, "ingress.ports"),
        ({"labels": {"team": 1}}, "labels.team"),
        ({"labels": ["team"]}, "labels"),
    ],
)
def test_invalid_type(fields: dict[str, Any], field: str) -> None:
    fails("INVALID_TYPE", field, **fields)


# --------------------------------------------------------------------------- id, profile, addresses


@pytest.mark.parametrize("data", [{"addresses": ["10.75.0.2"]}, {"id": None, "addresses": ["10.75.0.2"]}])
def test_missing_id(data: dict[str, Any]) -> None:
    error = sandbox_error(data)
    assert (error.code, error.field) == ("MISSING_FIELD", "id")


def test_id_from_the_key_when_the_record_has_none() -> None:
    sb = parse_sandbox(
        {"addresses": ["10.75.0.2"]},
        subnets=SUBNETS,
        known_presets=PRESETS,
        known_secrets=SECRETS,
        sandbox_id="from-key",
    )
    assert sb.id == "from-key"


def test_id_mismatch() -> None:
    error = sandbox_error({"id": "a", "addresses": ["10.75.0.2"]}, sandbox_id="b")
    assert (error.code, error.field) == ("ID_MISMATCH", "id")


@pytest.mark.parametrize("bad", ["", "Sb1", "-sb", "_sb", "sb 1", "sb.1", "a" * 64, "sb1\n", 7, ["sb1"]])
def test_invalid_id(bad: object) -> None:
    error = sandbox_error({"id": bad, "addresses": ["10.75.0.2"]})
    assert (error.code, error.field) == ("INVALID_ID", "id"), error


@pytest.mark.parametrize("good", ["a", "0", "sb-1_x", "a" * 63])
def test_valid_ids(good: str) -> None:
    assert sandbox(id=good).id == good


def test_invalid_template_reference() -> None:
    fails("INVALID_ID", "template", template="Base Image")


@pytest.mark.parametrize("profile", ["open", "ISOLATED", "", 3, None, ["isolated"], {"name": "isolated"}])
def test_invalid_profile(profile: object) -> None:
    error = fails("INVALID_PROFILE", "profile", profile=profile)
    assert "is not a profile" in error.message


def test_transit_profile_not_supported() -> None:
    error = fails("PROFILE_NOT_SUPPORTED", "profile", profile="transit")
    assert "transit" in error.message


@pytest.mark.parametrize("profile", ["isolated", "registry", "allowlisted", "unrestricted"])
def test_every_profile_accepted(profile: str) -> None:
    assert sandbox(profile=profile).profile == profile


def test_missing_addresses() -> None:
    error = sandbox_error({"id": "sb1"})
    assert (error.code, error.field) == ("MISSING_FIELD", "addresses")


def test_empty_addresses() -> None:
    fails("MISSING_FIELD", "addresses", addresses=[])


@pytest.mark.parametrize(("address", "index"), [("not-an-ip", 1), ("10.75.0.256", 1), (7, 1), ("10.75.0.0/24", 1)])
def test_invalid_address(address: object, index: int) -> None:
    fails("INVALID_ADDRESS", f"addresses[{index}]", addresses=["10.75.0.2", address])


@pytest.mark.parametrize(
    "address", ["10.76.0.1", "10.74.255.255", "192.168.1.1", "fdd4:1476:6c7f::1", "2001:db8::1", "::ffff:10.75.0.5"]
)
def test_address_outside_subnets(address: str) -> None:
    error = fails("ADDRESS_OUTSIDE_SUBNETS", "addresses[1]", addresses=["10.75.0.2", address])
    assert "10.75.0.0/16" in error.message and "fdd4:1476:6c7e::/48" in error.message


@pytest.mark.parametrize("address", ["10.75.0.0", "10.75.255.255", "fdd4:1476:6c7e::1", "fdd4:1476:6c7e:ffff::9"])
def test_address_inside_default_subnets(address: str) -> None:
    assert sandbox(addresses=[address]).addresses == (ipaddress.ip_address(address),)


def test_too_many_addresses() -> None:
    addresses = [f"10.75.0.{i}" for i in range(1, MAX_ADDRESSES + 2)]
    fails("TOO_MANY_ENTRIES", "addresses", addresses=addresses)
    assert len(sandbox(addresses=addresses[:MAX_ADDRESSES]).addresses) == MAX_ADDRESSES


# --------------------------------------------------------------------------- list limits


def _hosts(n: int) -> list[str]:
    return [f"h{i}.example.com" for i in range(n)]


def _cidrs(n: int) -> list[str]:
    return [f"198.{i}.0.0/16" for i in range(n)]


def _ports(n: int) -> list[int]:
    return [1000 + i for i in range(n)]


#: (list name, the record fields holding a list of n entries, the field path of that list)
LISTS: list[tuple[str, Any, str]] = [
    ("allow_hosts", lambda n: {"egress": {"allow_hosts": _hosts(n)}}, "egress.allow_hosts"),
    ("allow_cidrs", lambda n: {"egress": {"allow_cidrs": _cidrs(n)}}, "egress.allow_cidrs"),
    ("deny_cidrs", lambda n: {"egress": {"deny_cidrs": _cidrs(n)}}, "egress.deny_cidrs"),
    (
        "allow_ports",
        lambda n: {"egress": {"allow_cidrs": ["1.1.1.1/32"], "allow_ports": _ports(n)}},
        "egress.allow_ports",
    ),
    ("host_ports", lambda n: {"egress": {"host_ports": _ports(n)}}, "egress.host_ports"),
    ("presets", lambda n: {"egress": {"presets": sorted(MANY_PRESETS)[:n]}}, "egress.presets"),
    ("egress list", lambda n: {"egress": _hosts(n)}, "egress"),
    ("ingress.sources", lambda n: {"ingress": {"sources": [f"192.0.2.{i}" for i in range(n)]}}, "ingress.sources"),
    ("ingress.ports", lambda n: {"ingress": {"ports": _ports(n)}}, "ingress.ports"),
    ("private_links", lambda n: {"private_links": [f"peer-{i}" for i in range(n)]}, "private_links"),
    ("labels", lambda n: {"labels": {f"k{i}": "v" for i in range(n)}}, "labels"),
]


@pytest.mark.parametrize(("name", "make", "field"), LISTS, ids=[entry[0] for entry in LISTS])
def test_too_many_entries(name: str, make: Any, field: str) -> None:
    error = fails("TOO_MANY_ENTRIES", field, presets=MANY_PRESETS, profile="allowlisted", **make(N + 1))
    assert f"at most {N}" in error.message


@pytest.mark.parametrize(("name", "make", "field"), LISTS, ids=[entry[0] for entry in LISTS])
def test_fifty_entries_accepted(name: str, make: Any, field: str) -> None:
    sb = sandbox(presets=MANY_PRESETS, profile="allowlisted", **make(N))
    value: Any = sb
    for part in field.split("."):
        value = getattr(value, part)
    if name == "egress list":
        value = value.allow_hosts
    assert len(value) == N


# --------------------------------------------------------------------------- ports, CIDRs, presets, modes


@pytest.mark.parametrize("port", [0, -1, 65536, 100_000])
@pytest.mark.parametrize("where", ["host_ports", "allow_ports"])
def test_invalid_port_range(port: int, where: str) -> None:
    egress: dict[str, Any] = {where: [443, port]}
    if where == "allow_ports":
        egress["allow_cidrs"] = ["1.1.1.1/32"]
    error = egress_fails("INVALID_PORT", f"egress.{where}[1]", egress)
    assert "outside 1-65535" in error.message


@pytest.mark.parametrize("port", ["443", True, 443.0, None, [443]])
def test_port_of_the_wrong_type(port: object) -> None:
    # A port that is not an integer is a type error (booleans are not integers here), not a range error.
    error = egress_fails("INVALID_TYPE", "egress.host_ports[0]", {"host_ports": [port]})
    assert "expected an integer" in error.message


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_accepted(port: int) -> None:
    assert sandbox(profile="allowlisted", egress={"host_ports": [port]}).egress.host_ports == (port,)


@pytest.mark.parametrize("port", [0, 65536, "443", True])
def test_invalid_ingress_and_private_link_ports(port: object) -> None:
    code = "INVALID_PORT" if type(port) is int else "INVALID_TYPE"
    fails(code, "ingress.ports[0]", ingress={"ports": [port]})
    fails(code, "private_links[0].ports[0]", private_links=[{"source": "peer", "ports": [port]}])


@pytest.mark.parametrize("cidr", ["not-a-cidr", "10.0.0.0/33", "300.0.0.0/8", "2001:db8::/129", "", "10.0.0.0/"])
def test_malformed_cidr(cidr: str) -> None:
    error = egress_fails("INVALID_CIDR", "egress.allow_cidrs[0]", {"allow_cidrs": [cidr]})
    assert "is not a CIDR" in error.message


@pytest.mark.parametrize(
    ("cidr", "suggestion"),
    [("10.0.0.1/8", "10.0.0.0/8"), ("192.168.1.77/24", "192.168.1.0/24"), ("2001:db8::1/32", "2001:db8::/32")],
)
@pytest.mark.parametrize("where", ["allow_cidrs", "deny_cidrs"])
def test_cidr_with_host_bits_suggests_the_network(cidr: str, suggestion: str, where: str) -> None:
    error = egress_fails("INVALID_CIDR", f"egress.{where}[0]", {where: [cidr]})
    assert "host bits set" in error.message
    assert f"did you mean {suggestion}?" in error.message


@pytest.mark.parametrize("cidr", [10, None, ["10.0.0.0/8"]])
def test_cidr_of_the_wrong_type(cidr: object) -> None:
    egress_fails("INVALID_CIDR", "egress.allow_cidrs[0]", {"allow_cidrs": [cidr]})


def test_bare_address_is_a_host_cidr() -> None:
    sb = sandbox(profile="allowlisted", egress={"allow_cidrs": ["1.1.1.1", "2001:db8::1"]})
    assert sb.egress.allow_cidrs == (net("1.1.1.1/32"), net("2001:db8::1/128"))


@pytest.mark.parametrize("preset", ["nope", "GIT-HOSTS", 1, None, ["git-hosts"]])
def test_unknown_preset(preset: object) -> None:
    error = egress_fails("UNKNOWN_PRESET", "egress.presets[1]", {"presets": ["git-hosts", preset]})
    assert "ai-apis, git-hosts, package-registries" in error.message  # names the known ones


def test_known_presets() -> None:
    sb = sandbox(profile="allowlisted", egress={"presets": ["git-hosts", "ai-apis"]})
    assert sb.egress.presets == ("git-hosts", "ai-apis")


def test_operator_preset_is_known_when_configured() -> None:
    egress_fails("UNKNOWN_PRESET", "egress.presets[0]", {"presets": ["op-1"]})
    assert sandbox(presets=MANY_PRESETS, profile="allowlisted", egress={"presets": ["op-1"]}).egress.presets == (
        "op-1",
    )


@pytest.mark.parametrize("mode", ["block", "ALLOW_ALL", "deny", 1, True, ["deny_all"]])
def test_invalid_mode(mode: object) -> None:
    error = egress_fails("INVALID_MODE", "egress.mode", {"mode": mode})
    assert "allow_all or deny_all" in error.message


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"allow_cidrs": ["1.1.1.1/32"]}, "egress.allow_cidrs"),
        ({"deny_cidrs": ["10.0.0.0/8"]}, "egress.deny_cidrs"),
        ({"allow_ports": [443]}, "egress.allow_ports"),
        ({"allow_cidrs": ["1.1.1.1/32"], "allow_ports": [443]}, "egress.allow_cidrs"),
        ({"allow_hosts": ["a.com"]}, "egress.allow_hosts"),
        ({"presets": ["git-hosts"]}, "egress.presets"),
    ],
)
def test_allow_all_with_rules_is_a_mode_conflict(extra: dict[str, Any], field: str) -> None:
    # Seed 004: allow_all combined with allow_cidrs, deny_cidrs or allow_ports is a 400.
    error = egress_fails("EGRESS_MODE_CONFLICT", field, {"mode": "allow_all", **extra}, profile="unrestricted")
    assert "allow_all" in error.message


def test_allow_all_with_rules_is_a_mode_conflict_in_a_template_too() -> None:
    error = template_error({"name": "t", "egress": {"mode": "allow_all", "deny_cidrs": ["10.0.0.0/8"]}})
    assert (error.code, error.field) == ("EGRESS_MODE_CONFLICT", "egress.deny_cidrs")


def test_allow_all_alone_on_unrestricted() -> None:
    assert sandbox(profile="unrestricted", egress={"mode": "allow_all"}).egress.mode == "allow_all"


def test_allow_ports_without_cidrs() -> None:
    error = egress_fails("ALLOW_PORTS_WITHOUT_CIDRS", "egress.allow_ports", {"allow_ports": [443]})
    assert "allow_cidrs must be set" in error.message
    egress_fails("ALLOW_PORTS_WITHOUT_CIDRS", "egress.allow_ports", {"allow_ports": [443], "allow_cidrs": []})


@pytest.mark.parametrize(
    "cidr", ["169.254.0.0/16", "169.254.169.254/32", "169.254.1.0/24", "169.0.0.0/8", "128.0.0.0/1", "0.0.0.0/0"]
)
def test_deny_cidrs_may_not_touch_the_metadata_range(cidr: str) -> None:
    error = egress_fails("DENY_METADATA_RANGE", "egress.deny_cidrs[1]", {"deny_cidrs": ["10.0.0.0/8", cidr]})
    assert "169.254.0.0/16" in error.message


@pytest.mark.parametrize("cidr", ["169.253.0.0/16", "169.255.0.0/16", "10.0.0.0/8", "fe80::/10", "::/0"])
def test_deny_cidrs_next_to_the_metadata_range_accepted(cidr: str) -> None:
    assert sandbox(profile="allowlisted", egress={"deny_cidrs": [cidr]}).egress.deny_cidrs == (net(cidr),)


@pytest.mark.parametrize(
    "cidr", ["169.254.169.254/32", "169.254.0.0/16", "169.254.7.0/24", "168.63.129.16/32", "fd00:ec2::254/128"]
)
def test_allow_cidrs_inside_a_metadata_endpoint_refused(cidr: str) -> None:
    error = egress_fails("ALLOW_METADATA_ENDPOINT", "egress.allow_cidrs[0]", {"allow_cidrs": [cidr]})
    assert "refuses for every sandbox" in error.message


@pytest.mark.parametrize("cidr", ["100.64.0.0/10", "168.63.0.0/16", "fd00::/8", "169.0.0.0/8"])
def test_allow_cidrs_around_a_metadata_endpoint_accepted(cidr: str) -> None:
    # A wider range (a CGNAT overlay, a ULA network) is a real need; its metadata endpoint stays refused at dial time.
    assert sandbox(profile="allowlisted", egress={"allow_cidrs": [cidr]}).egress.allow_cidrs == (net(cidr),)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"allow_hosts": ["a.com"]}, "egress.allow_hosts"),
        ({"presets": ["ai-apis"]}, "egress.presets"),
        ({"allow_cidrs": ["1.1.1.1/32"]}, "egress.allow_cidrs"),
    ],
)
def test_egress_disabled_with_rules(extra: dict[str, Any], field: str) -> None:
    error = egress_fails("EGRESS_DISABLED_WITH_RULES", field, {"allow_internet": False, **extra})
    assert "allow_internet is false" in error.message


def test_egress_disabled_with_deny_rules_or_empty_lists_is_fine() -> None:
    sb = sandbox(
        profile="allowlisted", egress={"allow_internet": False, "deny_cidrs": ["10.0.0.0/8"], "allow_hosts": []}
    )
    assert sb.egress.allow_internet is False
    assert sb.egress.allow_hosts == ()


# --------------------------------------------------------------------------- profile ceilings

GOOD_EGRESS_VALUES: dict[str, Any] = {
    "mode": "deny_all",
    "allow_internet": True,
    "allow_hosts": ["a.com"],
    "deny_hosts": ["*.tracker.example"],
    "presets": ["git-hosts"],
    "allow_cidrs": ["1.1.1.1/32"],
    "deny_cidrs": ["10.0.0.0/8"],
    "allow_ports": [443],
    "host_ports": [443],
    "inspect": [{"hosts": ["api.github.com"]}],
    "allow_ech": ["cloudflare-ech.com"],
    "enforcement": "report",
    "deny_messages": {"default:deny": "ask #platform"},
}
#: What every profile takes, isolated too: an operator's words to the sandbox grant nothing.
EVERY_PROFILE_FIELDS = ("deny_messages",)


def test_good_egress_values_cover_every_field() -> None:
    assert set(GOOD_EGRESS_VALUES) == set(EGRESS_FIELDS)


@pytest.mark.parametrize("name", [name for name in EGRESS_FIELDS if name not in EVERY_PROFILE_FIELDS])
def test_isolated_takes_no_egress_field(name: str) -> None:
    egress: dict[str, Any] = {name: GOOD_EGRESS_VALUES[name]}
    if name == "allow_ports":
        egress["allow_cidrs"] = ["1.1.1.1/32"]  # else ALLOW_PORTS_WITHOUT_CIDRS comes first
    error = sandbox_error({"id": "sb1", "addresses": ["10.75.0.2"], "profile": "isolated", "egress": egress})
    assert error.code == "PROFILE_CONFLICT"
    assert error.field in (f"egress.{name}", "egress.allow_cidrs")
    assert "isolated" in error.message


@pytest.mark.parametrize("profile", ["isolated", "registry", "allowlisted", "unrestricted"])
def test_every_profile_takes_deny_messages(profile: str) -> None:
    record = {"id": "sb1", "addresses": ["10.75.0.2"], "profile": profile, "egress": {"deny_messages": {"x": "y"}}}
    assert sandbox_error(record).code == "INVALID_MESSAGE_RULE"  # validated, not refused by the profile
    record["egress"] = {"deny_messages": {"profile:isolated": "no network here, by design"}}
    parsed = sandbox(profile=profile, egress=record["egress"])
    assert parsed.egress.deny_messages == {"profile:isolated": "no network here, by design"}


def test_isolated_with_allow_all_is_a_profile_conflict() -> None:
    egress_fails("PROFILE_CONFLICT", "egress.mode", {"mode": "allow_all"}, profile="isolated")


def test_isolated_with_an_empty_egress_object_is_fine() -> None:
    assert sandbox(profile="isolated", egress={}).egress == Egress()


@pytest.mark.parametrize(
    ("egress", "field"),
    [
        ({"allow_hosts": ["a.com"]}, "egress.allow_hosts"),
        ({"allow_cidrs": ["1.1.1.1/32"]}, "egress.allow_cidrs"),
        ({"host_ports": [443]}, "egress.host_ports"),
        ({"inspect": [{"hosts": ["a.com"]}]}, "egress.inspect"),
        (["a.com"], "egress.allow_hosts"),
    ],
)
def test_registry_takes_no_hosts_or_cidrs(egress: object, field: str) -> None:
    error = egress_fails("PROFILE_CONFLICT", field, egress, profile="registry")
    assert "registry" in error.message


def test_registry_accepts_presets_deny_cidrs_and_allow_internet() -> None:
    egress = {"presets": ["git-hosts"], "deny_cidrs": ["10.0.0.0/8"], "allow_internet": True, "mode": "deny_all"}
    sb = sandbox(profile="registry", egress=egress)
    assert sb.egress.presets == ("git-hosts",)


def test_enforcement_is_enforce_or_report_on_a_sandbox_or_a_template() -> None:
    assert sandbox(profile="allowlisted", egress={"enforcement": "report"}).egress.enforcement == "report"
    assert sandbox(profile="unrestricted", egress={"enforcement": "enforce"}).egress.enforcement == "enforce"
    assert sandbox(profile="allowlisted", egress={"enforcement": None}).egress.enforcement is None  # null: inherit
    template = parse_template({"egress": {"enforcement": "report"}}, known_presets=PRESETS, known_secrets=SECRETS,
                              name="t1")  # fmt: skip
    assert template.egress.enforcement == "report"
    for bad in ("audit", "REPORT", "", True, 1, ["report"]):
        error = egress_fails("INVALID_ENFORCEMENT", "egress.enforcement", {"enforcement": bad})
        assert "use enforce or report" in error.message
    assert template_error({"egress": {"enforcement": "dry-run"}}, "t1").code == "INVALID_ENFORCEMENT"


def test_registry_cannot_use_report_mode() -> None:
    # Report mode passes any name the allowlist misses: past the registry profile's ceiling (its scope's grant).
    error = egress_fails("PROFILE_CONFLICT", "egress.enforcement", {"enforcement": "report"}, profile="registry")
    assert "registry" in error.message


@pytest.mark.parametrize("profile", ["registry", "allowlisted"])
def test_allow_all_needs_the_unrestricted_profile(profile: str) -> None:
    error = egress_fails("PROFILE_CONFLICT", "egress.mode", {"mode": "allow_all"}, profile=profile)
    assert "unrestricted" in error.message


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("name", ["bandwidth_mbit", "burst_mbit"])
@pytest.mark.parametrize("value", [0, 10_001, -5])
def test_bandwidth_out_of_range(name: str, value: int) -> None:
    error = fails("OUT_OF_RANGE", f"limits.{name}", limits={name: value})
    assert "outside 1-10000" in error.message


@pytest.mark.parametrize("value", [1, 10_000])
def test_bandwidth_bounds_accepted(value: int) -> None:
    assert sandbox(limits={"bandwidth_mbit": value}).limits.bandwidth_mbit == value
    assert parse_limits({"bandwidth_mbit": value}, "limits") == Limits(bandwidth_mbit=value)


@pytest.mark.parametrize("name", ["connections_per_minute", "dns_queries_per_minute"])
def test_rate_limits_out_of_range(name: str) -> None:
    fails("OUT_OF_RANGE", f"limits.{name}", limits={name: 0})
    fails("OUT_OF_RANGE", f"limits.{name}", limits={name: 1_000_001})
    assert getattr(sandbox(limits={name: 1_000_000}).limits, name) == 1_000_000


def test_burst_below_sustained() -> None:
    error = fails("BURST_BELOW_SUSTAINED", "limits.burst_mbit", limits={"bandwidth_mbit": 100, "burst_mbit": 50})
    assert "50" in error.message and "100" in error.message


def test_burst_equal_to_sustained_accepted() -> None:
    assert parse_limits({"bandwidth_mbit": 100, "burst_mbit": 100}, "limits") == Limits(
        bandwidth_mbit=100, burst_mbit=100
    )


def test_limits_parser_on_its_own() -> None:
    assert parse_limits(None, "limits") == Limits()
    assert parse_limits({"bandwidth_mbit": None}, "limits") == Limits()
    with pytest.raises(GatewayError) as info:
        parse_limits({"burst_mbit": 10, "bandwidth_mbit": 20}, "template.limits")
    assert (info.value.code, info.value.field) == ("BURST_BELOW_SUSTAINED", "template.limits.burst_mbit")


# --------------------------------------------------------------------------- seed 003 list shorthand


def test_egress_list_shorthand_splits_hosts_and_cidrs() -> None:
    egress = parse_egress(["api.openai.com", "10.0.0.0/8", "1.1.1.1", "Registry.npmjs.org"], "egress", PRESETS, SECRETS)
    assert egress == Egress(
        allow_hosts=("api.openai.com", "registry.npmjs.org"),
        allow_cidrs=(net("10.0.0.0/8"), net("1.1.1.1/32")),
    )


def test_egress_list_shorthand_ipv6_and_only_hosts() -> None:
    egress = parse_egress(["2001:db8::/32", "2001:db8::53"], "egress", PRESETS, SECRETS)
    assert egress.allow_cidrs == (net("2001:db8::/32"), net("2001:db8::53/128"))
    assert egress.allow_hosts == ()
    only_hosts = parse_egress(["a.com"], "egress", PRESETS, SECRETS)
    assert only_hosts.allow_hosts == ("a.com",)
    assert only_hosts.allow_cidrs is None  # not set: a template's CIDRs still apply


@pytest.mark.parametrize(
    ("entry", "code", "says"),
    [
        ("10.0.0.1/8", "INVALID_CIDR", "did you mean 10.0.0.0/8?"),
        ("https://api.openai.com", "INVALID_HOSTNAME", "is a URL"),
        ("**.foo.com", "INVALID_HOSTNAME", "double wildcard"),
        (42, "INVALID_HOSTNAME", "expected a hostname string"),
    ],
)
def test_egress_list_shorthand_errors(entry: object, code: str, says: str) -> None:
    error = egress_fails(code, "egress[1]", ["a.com", entry])
    assert says in error.message


def test_egress_list_shorthand_in_a_sandbox() -> None:
    sb = sandbox(profile="allowlisted", egress=["api.openai.com", "10.0.0.0/8", "1.1.1.1"])
    assert sb.egress.allow_hosts == ("api.openai.com",)
    assert sb.egress.allow_cidrs == (net("10.0.0.0/8"), net("1.1.1.1/32"))


def test_hostname_errors_carry_the_field_path() -> None:
    error = egress_fails("INVALID_HOSTNAME", "egress.allow_hosts[2]", {"allow_hosts": ["a.com", "b.com", "*.com"]})
    assert "top-level domain" in error.message


# --------------------------------------------------------------------------- ingress and private links


def test_ingress() -> None:
    ingress = parse_ingress(
        {"sources": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/48"], "ports": [80, 443, 22], "public_access": True},
        "ingress",
    )
    assert ingress == Ingress(
        sources=(net("10.0.0.0/8"), net("192.0.2.7/32"), net("2001:db8::/48")), ports=(80, 443, 22), public_access=True
    )
    assert parse_ingress(None, "ingress") == Ingress()


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("not-an-ip", "INVALID_ADDRESS"),
        ("10.0.0.1/8", "INVALID_CIDR"),
        ("10.0.0.0/40", "INVALID_CIDR"),
        (5, "INVALID_CIDR"),
    ],
)
def test_ingress_source_errors(source: object, code: str) -> None:
    fails(code, "ingress.sources[0]", ingress={"sources": [source]})


def test_private_links_string_and_object_forms() -> None:
    sb = sandbox(private_links=["agent-1", {"source": "agent-2", "ports": [8080, 9000]}, {"source": "agent-3"}])
    assert sb.private_links == (
        PrivateLink("agent-1"),
        PrivateLink("agent-2", (8080, 9000)),
        PrivateLink("agent-3"),
    )


def test_private_link_errors() -> None:
    fails("MISSING_FIELD", "private_links[0].source", private_links=[{"ports": [80]}])
    fails("INVALID_ID", "private_links[1]", private_links=["ok", "Not OK"])
    fails("INVALID_ID", "private_links[0].source", private_links=[{"source": "Not OK"}])
    fails("INVALID_TYPE", "private_links[0]", private_links=[42])
    fails("INVALID_TYPE", "private_links", private_links="agent-1")


def test_private_links_carry_a_protocol_tcp_unless_they_say_udp() -> None:
    sb = sandbox(private_links=["a", {"source": "b", "protocol": "udp", "ports": [53]}, {"source": "b"}])
    assert [link.protocol for link in sb.private_links] == ["tcp", "udp", "tcp"]
    assert sb.to_dict()["private_links"][1] == {"source": "b", "ports": [53], "protocol": "udp"}


@pytest.mark.parametrize("protocol", ["TCP", "sctp", "both", "tcp,udp", "", None, 6, ["tcp"], "udp "])
def test_private_link_protocol_errors(protocol: object) -> None:
    error = fails(
        "INVALID_PROTOCOL", "private_links[0].protocol", private_links=[{"source": "a", "protocol": protocol}]
    )
    assert "tcp or udp" in error.message


# --------------------------------------------------------------------------- templates


def test_template_parse() -> None:
    template = parse_template(
        {
            "name": "secure-python",
            "description": "deny private ranges",
            "egress": {"mode": "deny_all", "allow_cidrs": ["0.0.0.0/0"], "deny_cidrs": ["10.0.0.0/8"]},
            "limits": {"bandwidth_mbit": 50},
        },
        known_presets=PRESETS,
        known_secrets=SECRETS,
    )
    assert template.name == "secure-python"
    assert template.egress.allow_cidrs == (net("0.0.0.0/0"),)
    assert template.limits == Limits(bandwidth_mbit=50)


def test_template_name_from_the_key() -> None:
    assert parse_template({}, known_presets=PRESETS, known_secrets=SECRETS, name="t1") == Template(name="t1")


@pytest.mark.parametrize(
    ("data", "name", "code", "field"),
    [
        ({}, None, "MISSING_FIELD", "name"),
        ({"name": "Bad Name"}, None, "INVALID_ID", "name"),
        ({"name": "a"}, "b", "ID_MISMATCH", "name"),
        ({"name": "t", "profile": "allowlisted"}, None, "UNKNOWN_FIELD", "profile"),
        ({"name": "t", "description": 5}, None, "INVALID_TYPE", "description"),
        ({"name": "t", "description": "x" * 501}, None, "TOO_LONG", "description"),
        ({"name": "t", "egress": {"allow_hosts": ["a.com/x"]}}, None, "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
        ({"name": "t", "limits": {"bandwidth_mbit": 0}}, None, "OUT_OF_RANGE", "limits.bandwidth_mbit"),
        ({"name": "t", "egress": {"presets": ["nope"]}}, None, "UNKNOWN_PRESET", "egress.presets[0]"),
        ([], None, "INVALID_TYPE", ""),
    ],
)
def test_template_errors(data: object, name: str | None, code: str, field: str) -> None:
    error = template_error(data, name)
    assert (error.code, error.field or "") == (code, field)


def test_template_has_no_profile_ceiling() -> None:
    # A template may carry any egress; the ceiling is applied per sandbox when compiled.
    template = parse_template(
        {"name": "t", "egress": {"mode": "allow_all"}}, known_presets=PRESETS, known_secrets=SECRETS
    )
    assert template.egress.mode == "allow_all"


# --------------------------------------------------------------------------- round trips


def test_sandbox_round_trip() -> None:
    original = sandbox(
        profile="allowlisted",
        template="base",
        addresses=["10.75.0.2", "fdd4:1476:6c7e::2"],
        egress={
            "mode": "deny_all",
            "allow_internet": True,
            "allow_hosts": ["github.com", "*.example.com", "bücher.de"],
            "presets": ["git-hosts"],
            "allow_cidrs": ["1.1.1.0/24", "2001:db8::/32"],
            "deny_cidrs": ["10.0.0.0/8"],
            "allow_ports": [443],
            "host_ports": [22, 443],
        },
        ingress={"sources": ["10.0.0.0/8"], "ports": [8080], "public_access": True},
        limits={"bandwidth_mbit": 10, "burst_mbit": 20, "connections_per_minute": 60, "dns_queries_per_minute": 30},
        private_links=["a", {"source": "b", "ports": [80]}],
        labels={"tier": "free"},
    )
    data = json.loads(json.dumps(original.to_dict()))  # through JSON, as the stores keep it
    again = parse_sandbox(data, subnets=SUBNETS, known_presets=PRESETS, known_secrets=SECRETS)
    assert again == original
    assert again.to_dict() == original.to_dict()


@pytest.mark.parametrize("profile", ["isolated", "registry", "allowlisted", "unrestricted"])
def test_minimal_sandbox_round_trip(profile: str) -> None:
    original = sandbox(profile=profile)
    assert parse_sandbox(original.to_dict(), subnets=SUBNETS, known_presets=PRESETS, known_secrets=SECRETS) == original


def test_template_round_trip() -> None:
    original = parse_template(
        {
            "name": "secure-python",
            "description": "blocks RFC 1918",
            "egress": {
                "mode": "deny_all",
                "allow_cidrs": ["0.0.0.0/0"],
                "deny_cidrs": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
                "allow_hosts": ["*.pythonhosted.org"],
                "presets": ["package-registries"],
            },
            "limits": {"bandwidth_mbit": 5},
        },
        known_presets=PRESETS,
        known_secrets=SECRETS,
    )
    data = json.loads(json.dumps(original.to_dict()))
    assert parse_template(data, known_presets=PRESETS, known_secrets=SECRETS) == original
    assert parse_template(Template(name="t").to_dict(), known_presets=PRESETS, known_secrets=SECRETS) == Template(
        name="t"
    )


# --------------------------------------------------------------------------- robustness

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_field_values = st.sampled_from(
    ["10.75.0.2", "a.com", "*.a.com", "10.0.0.0/8", 443, 0, True, None, "allowlisted", "transit", "deny_all", []]
)
_egress = st.dictionaries(st.sampled_from([*EGRESS_FIELDS, "bogus"]), _json | _field_values | st.lists(_field_values))
_record = st.fixed_dictionaries(
    {},
    optional={
        "id": _json | st.just("sb1"),
        "addresses": _json | st.lists(_field_values, max_size=3) | st.just(["10.75.0.2"]),
        "profile": _json | st.sampled_from(["isolated", "registry", "allowlisted", "unrestricted", "transit"]),
        "template": _json,
        "egress": _json | _egress | st.lists(_field_values),
        "ingress": _json,
        "limits": _json | st.dictionaries(st.sampled_from(["bandwidth_mbit", "burst_mbit"]), _json),
        "private_links": _json,
        "labels": _json,
    },
)


@settings(max_examples=150, deadline=None)
@given(_record | _json)
def test_parse_sandbox_refuses_garbage_only_with_gateway_errors(data: object) -> None:
    try:
        parse_sandbox(data, subnets=SUBNETS, known_presets=PRESETS, known_secrets=SECRETS)
    except GatewayError as exc:
        assert exc.code and exc.message


@settings(max_examples=75, deadline=None)
@given(st.fixed_dictionaries({}, optional={"name": _json | st.just("t"), "egress": _json | _egress, "limits": _json}))
def test_parse_template_refuses_garbage_only_with_gateway_errors(data: object) -> None:
    try:
        parse_template(data, known_presets=PRESETS, known_secrets=SECRETS)
    except GatewayError as exc:
        assert exc.code and exc.message


@pytest.mark.parametrize("profile", ["isolated", "registry"])
def test_explicitly_empty_lists_are_accepted_in_restrictive_profiles(profile: str) -> None:
    """An empty list widens nothing, so it is no PROFILE_CONFLICT (e.g. seed 003's `egress: []`)."""
    assert sandbox(profile=profile, egress=[]).egress.allow_hosts == ()
    assert sandbox(profile=profile, egress={"allow_hosts": [], "allow_cidrs": []}).egress.allow_cidrs == ()
    fails("PROFILE_CONFLICT", "egress.allow_hosts", profile=profile, egress=["a.example.com"])


# --------------------------------------------------------------------------- egress.inspect

GITHUB_READ_ONLY: dict[str, Any] = {
    "hosts": ["API.GitHub.com", "*.githubusercontent.com"],
    "methods": ["GET", "HEAD", "OPTIONS"],
    "paths": ["/repos/*", "/user"],
    "headers": [{"name": "Accept", "prefix": "application/"}, {"name": "x-debug", "absent": True}],
    "deny_reason": "read-only GitHub",
    "credentials": [{"header": "Authorization", "secret": "github", "template": "Bearer {secret}"}],
}


def inspect_fails(code: str, field: str, *entries: Any, **egress: Any) -> GatewayError:
    """An allowlisted sandbox with `egress.inspect` = `entries` (plus `egress`) is refused with `code` at `field`."""
    return egress_fails(code, field, {"inspect": list(entries), **egress})


def entry(**fields: Any) -> dict[str, Any]:
    return {"hosts": ["api.example.com"], **fields}


def test_an_inspect_entry_is_parsed_into_the_shared_vocabulary() -> None:
    [rule] = sandbox(profile="allowlisted", egress={"inspect": [GITHUB_READ_ONLY]}).egress.inspect or ()
    assert rule == InspectRule(
        hosts=("api.github.com", "*.githubusercontent.com"),  # folded like allow_hosts
        ports=(443,),
        methods=("GET", "HEAD", "OPTIONS"),
        paths=("/repos/*", "/user"),
        headers=(HeaderMatch("accept", prefix="application/"), HeaderMatch("x-debug", absent=True)),
        deny_reason="read-only GitHub",
        credentials=(Credential("authorization", "github", "Bearer {secret}"),),
    )


def test_an_inspect_entry_needs_only_hosts() -> None:
    [rule] = (
        sandbox(profile="allowlisted", egress={"inspect": [{"hosts": ["a.com"], "ports": [443, 8443]}]}).egress.inspect
        or ()
    )
    assert rule == InspectRule(hosts=("a.com",), ports=(443, 8443))
    [default] = sandbox(profile="allowlisted", egress={"inspect": [{"hosts": ["a.com"]}]}).egress.inspect or ()
    assert default == InspectRule(hosts=("a.com",))
    [bare] = (
        sandbox(
            profile="allowlisted",
            egress={"inspect": [entry(credentials=[{"header": "x-api-key", "secret": "openai"}])]},
        ).egress.inspect
        or ()
    )
    assert bare.credentials == (Credential("x-api-key", "openai", "{secret}"),)


@pytest.mark.parametrize("profile", ["allowlisted", "unrestricted"])
def test_inspect_round_trips_through_json(profile: str) -> None:
    original = sandbox(profile=profile, egress={"mode": "deny_all", "inspect": [GITHUB_READ_ONLY, entry(ports=[80])]})
    data = json.loads(json.dumps(original.to_dict()))
    assert data["egress"]["inspect"][0]["headers"][1] == {"name": "x-debug", "absent": True}
    again = parse_sandbox(data, subnets=SUBNETS, known_presets=PRESETS, known_secrets=SECRETS)
    assert again == original and again.to_dict() == original.to_dict()


def test_a_template_carries_inspect_entries() -> None:
    template = parse_template(
        {"name": "gh", "egress": {"inspect": [GITHUB_READ_ONLY]}}, known_presets=PRESETS, known_secrets=SECRETS
    )
    assert template.egress.inspect and template.egress.inspect[0].deny_reason == "read-only GitHub"
    error = template_error({"name": "gh", "egress": {"inspect": [entry(methods=["get"])]}})
    assert (error.code, error.field) == ("INVALID_METHOD", "egress.inspect[0].methods[0]")


@pytest.mark.parametrize(
    ("egress", "code", "field"),
    [
        ({"inspect": "api.example.com"}, "INVALID_TYPE", "egress.inspect"),
        ({"inspect": ["api.example.com"]}, "INVALID_TYPE", "egress.inspect[0]"),
        ({"inspect": [entry() for _ in range(N + 1)]}, "TOO_MANY_ENTRIES", "egress.inspect"),
        ({"inspect": [{}]}, "MISSING_FIELD", "egress.inspect[0].hosts"),
        ({"inspect": [{"hosts": []}]}, "MISSING_FIELD", "egress.inspect[0].hosts"),
        ({"inspect": [{"hosts": "a.com"}]}, "INVALID_TYPE", "egress.inspect[0].hosts"),
        ({"inspect": [{"hosts": [f"h{n}.com" for n in range(N + 1)]}]}, "TOO_MANY_ENTRIES", "egress.inspect[0].hosts"),
        ({"inspect": [{"hosts": ["https://a.com"]}]}, "INVALID_HOSTNAME", "egress.inspect[0].hosts[0]"),
        ({"inspect": [{"hosts": ["a.com", "*"]}]}, "INVALID_HOSTNAME", "egress.inspect[0].hosts[1]"),
        ({"inspect": [entry(colour="red")]}, "UNKNOWN_FIELD", "egress.inspect[0].colour"),
        ({"inspect": [entry(ports=[])]}, "MISSING_FIELD", "egress.inspect[0].ports"),
        ({"inspect": [entry(ports=[0])]}, "INVALID_PORT", "egress.inspect[0].ports[0]"),
        ({"inspect": [entry(ports=["443"])]}, "INVALID_TYPE", "egress.inspect[0].ports[0]"),
        ({"inspect": [entry(ports=None)]}, "INVALID_TYPE", "egress.inspect[0].ports"),
        ({"inspect": [entry(methods="GET")]}, "INVALID_TYPE", "egress.inspect[0].methods"),
        ({"inspect": [entry(methods=["GET", "get"])]}, "INVALID_METHOD", "egress.inspect[0].methods[1]"),
        ({"inspect": [entry(methods=["TRACE"])]}, "INVALID_METHOD", "egress.inspect[0].methods[0]"),
        ({"inspect": [entry(methods=["BREW"])]}, "INVALID_METHOD", "egress.inspect[0].methods[0]"),
        ({"inspect": [entry(methods=[7])]}, "INVALID_METHOD", "egress.inspect[0].methods[0]"),
        ({"inspect": [entry(paths=["repos/*"])]}, "INVALID_PATH_PATTERN", "egress.inspect[0].paths[0]"),
        ({"inspect": [entry(paths=["/a", "/r*s"])]}, "INVALID_PATH_PATTERN", "egress.inspect[0].paths[1]"),
        ({"inspect": [entry(paths=["/a?b=1"])]}, "INVALID_PATH_PATTERN", "egress.inspect[0].paths[0]"),
        ({"inspect": [entry(paths=["/a#b"])]}, "INVALID_PATH_PATTERN", "egress.inspect[0].paths[0]"),
        ({"inspect": [entry(paths=["/a b"])]}, "INVALID_PATH_PATTERN", "egress.inspect[0].paths[0]"),
        ({"inspect": [entry(paths=["/a\r\nHost: evil"])]}, "INVALID_PATH_PATTERN", "egress.inspect[0].paths[0]"),
        ({"inspect": [entry(paths=["/bücher"])]}, "INVALID_PATH_PATTERN", "egress.inspect[0].paths[0]"),
        ({"inspect": [entry(paths=["/" + "a" * 256])]}, "TOO_LONG", "egress.inspect[0].paths[0]"),
        ({"inspect": [entry(paths=[3])]}, "INVALID_TYPE", "egress.inspect[0].paths[0]"),
        ({"inspect": [entry(headers=[{"equals": "x"}])]}, "MISSING_FIELD", "egress.inspect[0].headers[0].name"),
        ({"inspect": [entry(headers=[{"name": "a"}])]}, "HEADER_MATCH_AMBIGUOUS", "egress.inspect[0].headers[0]"),
        (
            {"inspect": [entry(headers=[{"name": "a", "equals": "x", "prefix": "x"}])]},
            "HEADER_MATCH_AMBIGUOUS",
            "egress.inspect[0].headers[0]",
        ),
        (
            {"inspect": [entry(headers=[{"name": "a", "absent": False}])]},
            "HEADER_MATCH_AMBIGUOUS",
            "egress.inspect[0].headers[0]",
        ),
        (
            {"inspect": [entry(headers=[{"name": "a", "absent": "yes"}])]},
            "INVALID_TYPE",
            "egress.inspect[0].headers[0].absent",
        ),
        (
            {"inspect": [entry(headers=[{"name": "a", "value": "x"}])]},
            "UNKNOWN_FIELD",
            "egress.inspect[0].headers[0].value",
        ),
        (
            {"inspect": [entry(headers=[{"name": ":authority", "equals": "a"}])]},
            "INVALID_HEADER_NAME",
            "egress.inspect[0].headers[0].name",
        ),
        (
            {"inspect": [entry(headers=[{"name": "x y", "equals": "a"}])]},
            "INVALID_HEADER_NAME",
            "egress.inspect[0].headers[0].name",
        ),
        (
            {"inspect": [entry(headers=[{"name": "ä", "equals": "a"}])]},
            "INVALID_HEADER_NAME",
            "egress.inspect[0].headers[0].name",
        ),
        (
            {"inspect": [entry(headers=[{"name": "a", "equals": "x\r\ny: z"}])]},
            "INVALID_HEADER_VALUE",
            "egress.inspect[0].headers[0].equals",
        ),
        (
            {"inspect": [entry(headers=[{"name": "a", "prefix": "ü"}])]},
            "INVALID_HEADER_VALUE",
            "egress.inspect[0].headers[0].prefix",
        ),
        (
            {"inspect": [entry(headers=[{"name": "a", "equals": "x "}])]},
            "INVALID_HEADER_VALUE",
            "egress.inspect[0].headers[0].equals",
        ),
        (
            {"inspect": [entry(headers=[{"name": "a", "equals": "x" * 1025}])]},
            "TOO_LONG",
            "egress.inspect[0].headers[0].equals",
        ),
        (
            {"inspect": [entry(headers=[{"name": "Accept", "equals": "a"}, {"name": "accept", "absent": True}])]},
            "HEADER_MATCH_DUPLICATE",
            "egress.inspect[0].headers[1].name",
        ),
        ({"inspect": [entry(deny_reason=7)]}, "INVALID_TYPE", "egress.inspect[0].deny_reason"),
        ({"inspect": [entry(deny_reason="x" * 501)]}, "TOO_LONG", "egress.inspect[0].deny_reason"),
        (
            {"inspect": [entry(deny_reason="no\r\nSet-Cookie: a")]},
            "INVALID_DENY_REASON",
            "egress.inspect[0].deny_reason",
        ),
        (
            {"inspect": [entry(deny_reason="nur lesen, bitte schön")]},
            "INVALID_DENY_REASON",
            "egress.inspect[0].deny_reason",
        ),
        ({"inspect": [entry(credentials={})]}, "INVALID_TYPE", "egress.inspect[0].credentials"),
        (
            {"inspect": [entry(credentials=[{"secret": "github"}])]},
            "MISSING_FIELD",
            "egress.inspect[0].credentials[0].header",
        ),
        (
            {"inspect": [entry(credentials=[{"header": "authorization"}])]},
            "MISSING_FIELD",
            "egress.inspect[0].credentials[0].secret",
        ),
        (
            {"inspect": [entry(credentials=[{"header": "authorization", "secret": "nope"}])]},
            "UNKNOWN_SECRET",
            "egress.inspect[0].credentials[0].secret",
        ),
        (
            {"inspect": [entry(credentials=[{"header": "authorization", "secret": ["github"]}])]},
            "INVALID_TYPE",
            "egress.inspect[0].credentials[0].secret",
        ),
        (
            {"inspect": [entry(credentials=[{"header": "authorization", "secret": "g" * 64}])]},
            "TOO_LONG",
            "egress.inspect[0].credentials[0].secret",
        ),
        (
            {"inspect": [entry(credentials=[{"header": ":authority", "secret": "github"}])]},
            "INVALID_CREDENTIAL_HEADER",
            "egress.inspect[0].credentials[0].header",
        ),
        (
            {"inspect": [entry(credentials=[{"header": "x\r\ny", "secret": "github"}])]},
            "INVALID_HEADER_NAME",
            "egress.inspect[0].credentials[0].header",
        ),
        (
            {"inspect": [entry(credentials=[{"header": "authorization", "secret": "github", "template": "Bearer"}])]},
            "CREDENTIAL_TEMPLATE",
            "egress.inspect[0].credentials[0].template",
        ),
        (
            {
                "inspect": [
                    entry(credentials=[{"header": "authorization", "secret": "github", "template": "{secret}{secret}"}])
                ]
            },
            "CREDENTIAL_TEMPLATE",
            "egress.inspect[0].credentials[0].template",
        ),
        (
            {
                "inspect": [
                    entry(credentials=[{"header": "a", "secret": "github", "template": "{secret}\r\nX-Injected: 1"}])
                ]
            },
            "CREDENTIAL_TEMPLATE",
            "egress.inspect[0].credentials[0].template",
        ),
        (
            {"inspect": [entry(credentials=[{"header": "a", "secret": "github", "template": "Bärer {secret}"}])]},
            "CREDENTIAL_TEMPLATE",
            "egress.inspect[0].credentials[0].template",
        ),
        (
            {"inspect": [entry(credentials=[{"header": "a", "secret": "github", "template": None}])]},
            "INVALID_TYPE",
            "egress.inspect[0].credentials[0].template",
        ),
        (
            {
                "inspect": [
                    entry(
                        credentials=[
                            {"header": "Authorization", "secret": "github"},
                            {"header": "x-api-key", "secret": "openai"},
                            {"header": "authorization", "secret": "openai"},
                        ]
                    )
                ]
            },
            "CREDENTIAL_HEADER_DUPLICATE",
            "egress.inspect[0].credentials[2].header",
        ),
        (
            {"inspect": [{"hosts": ["a.com", "b.com"]}, {"hosts": ["c.com", "B.com"]}]},
            "INSPECT_HOST_DUPLICATE",
            "egress.inspect[1].hosts[1]",
        ),
        (
            {"inspect": [{"hosts": ["a.com"]}, {"hosts": ["a.com"]}]},
            "INSPECT_HOST_DUPLICATE",
            "egress.inspect[1].hosts[0]",
        ),
        (
            {"inspect": [{"hosts": ["a.com"]}], "allow_internet": False},
            "EGRESS_DISABLED_WITH_RULES",
            "egress.inspect",
        ),
    ],
)
def test_inspect_entry_refusals(egress: dict[str, Any], code: str, field: str) -> None:
    egress_fails(code, field, egress)


@pytest.mark.parametrize(
    "header",
    ["Host", "content-length", "Transfer-Encoding", "connection", "keep-alive", "te", "upgrade", "proxy-authorization"],
)
def test_a_credential_cannot_bind_a_hop_by_hop_or_framing_header(header: str) -> None:
    credential = {"header": header, "secret": "github"}
    error = inspect_fails(
        "INVALID_CREDENTIAL_HEADER", "egress.inspect[0].credentials[0].header", entry(credentials=[credential])
    )
    assert header.lower() in error.message


SECRET_VALUE = "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB"


@pytest.mark.parametrize(
    ("entry_fields", "field"),
    [
        (
            {"credentials": [{"header": "authorization", "secret": "github", "value": SECRET_VALUE}]},
            "credentials[0].value",
        ),
        ({"credentials": [{"header": "authorization", "secret_value": SECRET_VALUE}]}, "credentials[0].secret_value"),
        ({"credentials": [{"header": "authorization", "token": SECRET_VALUE}]}, "credentials[0].token"),
        ({"credentials": [{"header": "authorization", "Password": SECRET_VALUE}]}, "credentials[0].Password"),
        ({"credentials": [{"header": "x-api-key", "api_key": SECRET_VALUE}]}, "credentials[0].api_key"),
        ({"token": SECRET_VALUE}, "token"),
        ({"apikey": SECRET_VALUE}, "apikey"),
    ],
)
def test_a_secret_value_in_a_policy_is_refused_and_never_echoed(entry_fields: dict[str, Any], field: str) -> None:
    error = inspect_fails("SECRET_VALUE_IN_POLICY", f"egress.inspect[0].{field}", entry(**entry_fields))
    assert SECRET_VALUE not in error.message


def test_an_unknown_secret_name_is_not_echoed_but_the_configured_names_are() -> None:
    credential = {"header": "authorization", "secret": SECRET_VALUE[:40]}
    error = inspect_fails("UNKNOWN_SECRET", "egress.inspect[0].credentials[0].secret", entry(credentials=[credential]))
    assert SECRET_VALUE[:40] not in error.message and "github, openai" in error.message
    with pytest.raises(GatewayError) as none:
        parse_sandbox(
            {
                "id": "sb1",
                "addresses": ["10.75.0.2"],
                "profile": "allowlisted",
                "egress": {"inspect": [entry(credentials=[{"header": "a", "secret": "github"}])]},
            },
            subnets=SUBNETS,
            known_presets=PRESETS,
            known_secrets=(),
        )
    assert none.value.code == "UNKNOWN_SECRET" and "configured: none" in none.value.message


def test_inspect_follows_the_profile_rules_of_allow_hosts() -> None:
    for profile in ("isolated", "registry"):
        egress_fails("PROFILE_CONFLICT", "egress.inspect", {"inspect": [entry()]}, profile=profile)
        assert sandbox(profile=profile, egress={"inspect": []}).egress.inspect == ()  # an empty list widens nothing
    unrestricted = {"id": "sb1", "addresses": ["10.75.0.2"], "profile": "unrestricted"}
    error = sandbox_error({**unrestricted, "egress": {"mode": "allow_all", "inspect": [entry()]}})
    assert (error.code, error.field) == ("EGRESS_MODE_CONFLICT", "egress.inspect")
    assert sandbox(profile="unrestricted", egress={"mode": "deny_all", "inspect": [entry()]}).egress.inspect


def test_duplicates_inside_one_entry_are_harmless() -> None:
    [rule] = (
        sandbox(
            profile="allowlisted",
            egress={"inspect": [{"hosts": ["a.com", "A.com"], "methods": ["GET", "GET"], "paths": ["/x", "/x"]}]},
        ).egress.inspect
        or ()
    )
    assert (rule.hosts, rule.methods, rule.paths) == (("a.com",), ("GET",), ("/x",))


_inspect_values = st.sampled_from(
    ["a.com", "GET", "get", "/x", "/x*", "*", "{secret}", "github", "authorization", ":path", "\r\n", True, None, 0]
)
_header_or_credential = st.dictionaries(
    st.sampled_from(["name", "equals", "prefix", "absent", "header", "secret", "template", "value", "bogus"]),
    _json | _inspect_values,
    max_size=4,
)
_inspect_entry = st.dictionaries(
    st.sampled_from([*INSPECT_FIELDS, "token", "bogus"]),
    _json | _inspect_values | st.lists(_inspect_values | _header_or_credential, max_size=3),
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_inspect_entry | _json, max_size=3))
def test_garbage_inspect_entries_are_refused_only_with_gateway_errors(entries: list[Any]) -> None:
    try:
        parse_egress({"inspect": entries}, "egress", PRESETS, SECRETS)
    except GatewayError as exc:
        assert exc.code and exc.message and exc.field and exc.field.startswith("egress.inspect")


# --------------------------------------------------------------------------- host entries: deny_hosts, host:port


@pytest.mark.parametrize("name", ["allow_hosts", "deny_hosts"])
@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("api.example.com:8443", "api.example.com:8443"),
        ("API.Example.COM.:443", "api.example.com:443"),  # case and the trailing dot fold as for a bare name
        ("*.tracker.example:80", "*.tracker.example:80"),  # a wildcard takes a port too
        ("bücher.example:1", "xn--bcher-kva.example:1"),  # IDNA as for a bare name
        ("a.example:65535", "a.example:65535"),
        ("*.tracker.example", "*.tracker.example"),  # a bare entry is unchanged
    ],
)
def test_host_entries_take_an_optional_port_in_canonical_form(name: str, entry: str, canonical: str) -> None:
    assert getattr(sandbox(profile="allowlisted", egress={name: [entry]}).egress, name) == (canonical,)


@pytest.mark.parametrize("name", ["allow_hosts", "deny_hosts"])
@pytest.mark.parametrize(
    ("entry", "code", "says"),
    [
        ("a.example:", "INVALID_PORT", "no port"),
        ("a.example:0", "INVALID_PORT", "not a port in 1-65535"),
        ("a.example:65536", "INVALID_PORT", "not a port in 1-65535"),
        ("a.example:99999999999", "INVALID_PORT", "not a port in 1-65535"),
        ("a.example:0443", "INVALID_PORT", "plain decimal"),  # no leading zero: one spelling per entry
        ("a.example:+443", "INVALID_PORT", "plain decimal"),
        ("a.example:-1", "INVALID_PORT", "plain decimal"),
        ("a.example:0x1bb", "INVALID_PORT", "plain decimal"),
        ("a.example:\u0664\u0664\u0663", "INVALID_PORT", "plain decimal"),  # Arabic-Indic digits pass isdigit()
        ("a.example:https", "INVALID_PORT", "plain decimal"),
        ("a.example:443:80", "INVALID_HOSTNAME", "more than one ':'"),
        (":443", "INVALID_HOSTNAME", "no hostname"),
        ("https://a.example:443", "INVALID_HOSTNAME", "is a URL"),
        ("a.example:443/path", "INVALID_HOSTNAME", "contains a path"),
        ("user@a.example:22", "INVALID_HOSTNAME", "user information"),
        ("a.example: 443", "INVALID_HOSTNAME", "whitespace"),
        ("[2001:db8::1]:443", "INVALID_HOSTNAME", "is an IP address"),
        ("[::1]", "INVALID_HOSTNAME", "is an IP address"),
        ("2001:db8::1", "INVALID_HOSTNAME", "is an IP address"),
        ("::ffff:1.2.3.4", "INVALID_HOSTNAME", "is an IP address"),
        ("1.2.3.4:80", "INVALID_HOSTNAME", "is an IP address"),
        ("*.*.a.example:443", "INVALID_HOSTNAME", "double wildcard"),
        ("a.*.example:443", "INVALID_HOSTNAME", "wildcard inside"),
        ("*:443", "INVALID_HOSTNAME", "matches every host"),
    ],
)
def test_hostile_host_entries_are_refused_with_a_stable_code(name: str, entry: str, code: str, says: str) -> None:
    error = egress_fails(code, f"egress.{name}[1]", {name: ["ok.example", entry]})
    assert says in error.message, error


def test_the_list_shorthand_takes_host_port_entries() -> None:
    egress = sandbox(profile="allowlisted", egress=["api.example.com:8443", "10.0.0.0/8"]).egress
    assert egress.allow_hosts == ("api.example.com:8443",)
    egress_fails("INVALID_PORT", "egress[0]", ["api.example.com:0"])


def test_allow_ech_and_inspect_hosts_stay_bare_names() -> None:
    egress_fails("INVALID_HOSTNAME", "egress.allow_ech[0]", {"allow_ech": ["a.example:443"]})
    egress_fails("INVALID_HOSTNAME", "egress.inspect[0].hosts[0]", {"inspect": [{"hosts": ["a.example:443"]}]})


@pytest.mark.parametrize("profile", ["registry", "allowlisted", "unrestricted"])
def test_deny_hosts_in_every_profile_that_looks_at_names(profile: str) -> None:
    assert sandbox(profile=profile, egress={"deny_hosts": ["t.example"]}).egress.deny_hosts == ("t.example",)


def test_deny_hosts_with_allow_all_or_the_internet_off_is_no_conflict() -> None:
    # It only narrows: mode allow_all (the unrestricted profile's point) and allow_internet false both take it.
    both = sandbox(profile="unrestricted", egress={"mode": "allow_all", "deny_hosts": ["t.example"]})
    assert both.egress.deny_hosts == ("t.example",)
    off = sandbox(profile="allowlisted", egress={"allow_internet": False, "deny_hosts": ["t.example"]})
    assert off.egress.deny_hosts == ("t.example",)


def test_deny_hosts_is_unioned_with_the_templates_and_other_fields_still_replace() -> None:
    template = Egress(deny_hosts=("a.example", "*.b.example"), allow_hosts=("x.example",))
    own = Egress(deny_hosts=("c.example", "a.example"), allow_hosts=("y.example",))
    merged = own.merged_over(template)
    assert merged.deny_hosts == ("a.example", "*.b.example", "c.example")
    assert merged.allow_hosts == ("y.example",)
    assert Egress(deny_hosts=()).merged_over(template).deny_hosts == ("a.example", "*.b.example")  # never lifted
    assert Egress().merged_over(template).deny_hosts == template.deny_hosts
    assert own.merged_over(Egress()).deny_hosts == own.deny_hosts
