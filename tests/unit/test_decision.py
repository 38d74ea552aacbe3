"""Every path through `decide`, with the exact verdict (allowed, reason, rule)."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.decision import (
    DEFAULT_LIMITS,
    EffectiveLimits,
    Verdict,
    address_key,
    compile_policy,
    decide,
)
from gateway.errors import GatewayError
from gateway.policy import PROFILES, Egress, parse_sandbox
from gateway.presets import BUILTIN_PRESETS, make_preset
from gateway.rules import Rule
from tests.factory import CONTEXT, policy

PUBLIC = "93.184.216.34"

NOT_LISTED = Verdict(False, "host not in allowlist", Rule.DEFAULT_DENY)
NO_NAME = Verdict(False, "no hostname (SNI/Host) and address not in allow_cidrs", Rule.DEFAULT_DENY)
ISOLATED = Verdict(False, "profile isolated allows no network", Rule.ISOLATED)
NO_INTERNET = Verdict(False, "egress disabled (allow_internet is false)", Rule.NO_INTERNET)
ALLOW_ALL = Verdict(True, "profile unrestricted allows all egress", Rule.ALLOW_ALL)


def split_label(label: str) -> tuple[Rule, str]:
    """The (rule, detail) a record's rule label stands for: `allow_hosts a.com` -> (ALLOW_HOSTS, "a.com")."""
    rule, _, detail = label.partition(" ")
    return Rule(rule), detail


def host_allowed(name: str, rule: str, *, wildcard: bool | None = None) -> Verdict:
    """The verdict of an allow entry (`wildcard`: matched by a wildcard; by default, whether the rule names one)."""
    matched_by_wildcard = "*." in rule if wildcard is None else wildcard
    return Verdict(True, f"host {name} allowed by {rule}", *split_label(rule), wildcard=matched_by_wildcard)


def cidr_allowed(cidr: str) -> Verdict:
    return Verdict(True, f"address in allow_cidrs {cidr}", Rule.ALLOW_CIDRS, cidr)


def cidr_denied(cidr: str) -> Verdict:
    return Verdict(False, f"address in deny_cidrs {cidr}", Rule.DENY_CIDRS, cidr)


def port_denied(port: int, name: str, rule: str) -> Verdict:
    return Verdict(False, f"port {port} not allowed for host {name} ({rule})", *split_label(rule))


# --------------------------------------------------------------------------- SMTP, isolated, allow_internet

SMTP = {25: "SMTP", 465: "SMTPS", 587: "SMTP submission"}


@pytest.mark.parametrize("port", sorted(SMTP))
@pytest.mark.parametrize(
    ("profile", "egress"),
    [
        ("isolated", None),
        ("registry", None),
        ("allowlisted", {"allow_hosts": ["smtp.example.com"], "allow_cidrs": ["0.0.0.0/0"]}),
        ("unrestricted", None),
        ("unrestricted", {"mode": "allow_all"}),
    ],
)
def test_smtp_blocked_in_every_profile(profile: str, egress: object, port: int) -> None:
    expected = Verdict(False, f"port {port} blocked ({SMTP[port]}) in every profile", Rule.SMTP)
    p = policy(profile, egress)
    assert decide(p, "smtp.example.com", PUBLIC, port, "tcp") == expected
    assert decide(p, None, PUBLIC, port, "tcp") == expected


def test_smtp_blocked_even_when_the_host_allows_the_port() -> None:
    p = policy(egress={"allow_hosts": ["smtp.example.com"], "host_ports": [25, 587, 2525]})
    assert decide(p, "smtp.example.com", PUBLIC, 587, "tcp").rule == Rule.SMTP
    assert decide(p, "smtp.example.com", PUBLIC, 2525, "tcp") == host_allowed(
        "smtp.example.com", "allow_hosts smtp.example.com"
    )


@pytest.mark.parametrize(
    ("name", "address", "port", "protocol"),
    [
        ("github.com", PUBLIC, 443, "tls"),
        ("github.com", None, None, "dns"),
        ("pypi.org", None, None, "dns"),
        (None, "1.1.1.1", 53, "udp"),
        (None, "10.75.0.3", 22, "tcp"),
        ("x", "not-an-address", 80, "http"),
    ],
)
def test_isolated_denies_everything_including_dns(
    name: str | None, address: str | None, port: int | None, protocol: str
) -> None:
    assert decide(policy("isolated"), name, address, port, protocol) == ISOLATED


def test_isolated_ignores_a_permissive_template() -> None:
    p = policy("isolated", template={"egress": {"allow_hosts": ["github.com"], "allow_cidrs": ["0.0.0.0/0"]}})
    assert decide(p, "github.com", PUBLIC, 443, "tls") == ISOLATED
    assert p.effective_egress == Egress()


@pytest.mark.parametrize("profile", ["registry", "allowlisted", "unrestricted"])
def test_allow_internet_false_denies_every_connection(profile: str) -> None:
    p = policy(profile, {"allow_internet": False})
    assert decide(p, "pypi.org", PUBLIC, 443, "tls") == NO_INTERNET
    assert decide(p, None, "1.1.1.1", 443, "tcp") == NO_INTERNET


def test_allow_internet_false_still_resolves_names_the_policy_allows() -> None:
    """Seed 003: "DNS still resolves but connections are refused"."""
    assert decide(policy("registry", {"allow_internet": False}), "pypi.org", None, None, "dns").allowed
    assert not decide(policy("registry", {"allow_internet": False}), "evil.com", None, None, "dns").allowed
    assert decide(policy("unrestricted", {"allow_internet": False}), "evil.com", None, None, "dns").allowed


def test_unrestricted_resolves_every_name_even_under_deny_all_cidr_rules() -> None:
    """Seed 004's "all but a subnet" policy is about addresses: its names must resolve."""
    p = policy("unrestricted", {"mode": "deny_all", "allow_cidrs": ["0.0.0.0/0"], "deny_cidrs": ["10.0.0.0/8"]})
    verdict = decide(p, "anything.example", None, None, "dns")
    assert (verdict.allowed, verdict.rule) == (True, Rule.UNRESTRICTED_DNS)
    assert not decide(p, None, "10.1.2.3", 443, "tcp").allowed


def test_allowlisted_with_only_cidrs_resolves_no_names() -> None:
    """No DNS channel out of a CIDR-only allowlist: names must be listed to resolve."""
    p = policy("allowlisted", {"allow_cidrs": ["0.0.0.0/0"]})
    assert not decide(p, "anything.example", None, None, "dns").allowed


def test_allow_internet_false_beats_inherited_rules() -> None:
    p = policy("allowlisted", {"allow_internet": False}, template={"egress": {"allow_hosts": ["a.com"]}})
    assert decide(p, "a.com", PUBLIC, 443, "tls") == NO_INTERNET


# --------------------------------------------------------------------------- CIDRs


def test_deny_cidrs_beat_allow_cidrs() -> None:
    p = policy(egress={"allow_cidrs": ["10.0.0.0/8"], "deny_cidrs": ["10.1.0.0/16"]})
    assert decide(p, None, "10.1.2.3", 443, "tcp") == cidr_denied("10.1.0.0/16")
    assert decide(p, None, "10.2.0.1", 443, "tcp") == cidr_allowed("10.0.0.0/8")


def test_deny_cidrs_beat_an_allowed_host() -> None:
    p = policy(egress={"allow_hosts": ["api.example.com"], "deny_cidrs": ["10.0.0.0/8"]})
    assert decide(p, "api.example.com", "10.9.9.9", 443, "tls") == cidr_denied("10.0.0.0/8")
    assert decide(p, "api.example.com", PUBLIC, 443, "tls") == host_allowed(
        "api.example.com", "allow_hosts api.example.com"
    )


def test_deny_cidrs_beat_unrestricted() -> None:
    p = policy("unrestricted", {"deny_cidrs": ["10.0.0.0/8", "2001:db8::/32"]})
    assert decide(p, "anything.example", "10.3.3.3", 443, "tls") == cidr_denied("10.0.0.0/8")
    assert decide(p, "anything.example", "2001:db8::1", 443, "tls") == cidr_denied("2001:db8::/32")
    assert decide(p, "anything.example", PUBLIC, 443, "tls") == ALLOW_ALL


def test_most_specific_cidr_names_the_rule() -> None:
    p = policy(egress={"allow_cidrs": ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"]})
    assert decide(p, None, "10.1.2.3", 443, "tcp") == cidr_allowed("10.1.2.0/24")
    assert decide(p, None, "10.1.3.3", 443, "tcp") == cidr_allowed("10.1.0.0/16")
    assert decide(p, None, "10.2.0.0", 443, "tcp") == cidr_allowed("10.0.0.0/8")


@pytest.mark.parametrize("egress", [None, {"mode": "allow_all"}])
def test_unrestricted_allows_all(egress: object) -> None:
    p = policy("unrestricted", egress)
    assert p.allow_all
    assert decide(p, "anything.example", PUBLIC, 443, "tls") == ALLOW_ALL
    assert decide(p, None, "1.1.1.1", 12345, "tcp") == ALLOW_ALL
    assert decide(p, "anything.example", None, None, "dns") == Verdict(
        True, "profile unrestricted resolves every name", Rule.UNRESTRICTED_DNS
    )


def test_seed_004_deny_all_with_carve_out() -> None:
    # "Allow all external traffic but deny a specific subnet."
    p = policy("unrestricted", {"mode": "deny_all", "allow_cidrs": ["0.0.0.0/0"], "deny_cidrs": ["10.0.0.0/8"]})
    assert not p.allow_all
    assert decide(p, None, "8.8.8.8", 443, "tcp") == cidr_allowed("0.0.0.0/0")
    assert decide(p, "example.com", PUBLIC, 443, "tls") == cidr_allowed("0.0.0.0/0")
    assert decide(p, None, "10.5.5.5", 443, "tcp") == cidr_denied("10.0.0.0/8")
    assert decide(p, "example.com", "10.5.5.5", 443, "tls") == cidr_denied("10.0.0.0/8")
    assert decide(p, None, "2001:db8::1", 443, "tcp") == NO_NAME  # 0.0.0.0/0 is IPv4 only


def test_seed_004_template_blocks_rfc1918() -> None:
    template = {
        "egress": {
            "mode": "deny_all",
            "allow_cidrs": ["0.0.0.0/0"],
            "deny_cidrs": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
        }
    }
    p = policy("unrestricted", template=template)
    assert decide(p, None, "172.20.1.1", 80, "tcp") == cidr_denied("172.16.0.0/12")
    assert decide(p, None, "192.168.1.1", 80, "tcp") == cidr_denied("192.168.0.0/16")
    assert decide(p, None, "1.1.1.1", 80, "tcp") == cidr_allowed("0.0.0.0/0")


def test_seed_004_cloudflare_https_only() -> None:
    p = policy(
        "unrestricted", {"mode": "deny_all", "allow_cidrs": ["1.1.1.1/32", "1.0.0.1/32"], Rule.ALLOW_PORTS: [443]}
    )
    assert decide(p, None, "1.1.1.1", 443, "tcp") == cidr_allowed("1.1.1.1/32")
    assert decide(p, None, "1.0.0.1", 443, "tcp") == cidr_allowed("1.0.0.1/32")
    assert decide(p, None, "1.0.0.1", 80, "tcp") == Verdict(
        False, "port 80 not in allow_ports for allow_cidrs 1.0.0.1/32", Rule.ALLOW_PORTS
    )
    assert decide(p, None, "8.8.8.8", 443, "tcp") == NO_NAME


def test_allow_cidrs_with_allow_ports() -> None:
    p = policy(egress={"allow_cidrs": ["203.0.113.0/24"], Rule.ALLOW_PORTS: [443, 8080]})
    assert decide(p, None, "203.0.113.9", 443, "tcp") == cidr_allowed("203.0.113.0/24")
    assert decide(p, None, "203.0.113.9", 8080, "tcp") == cidr_allowed("203.0.113.0/24")
    assert decide(p, None, "203.0.113.9", 22, "tcp") == Verdict(
        False, "port 22 not in allow_ports for allow_cidrs 203.0.113.0/24", Rule.ALLOW_PORTS
    )
    assert decide(p, "named.example", "203.0.113.9", 22, "tls") == Verdict(
        False, "port 22 not in allow_ports for allow_cidrs 203.0.113.0/24", Rule.ALLOW_PORTS
    )


def test_allow_cidrs_without_allow_ports_allow_any_port() -> None:
    p = policy(egress={"allow_cidrs": ["203.0.113.0/24"]})
    for port in (1, 22, 443, 65535):
        assert decide(p, None, "203.0.113.200", port, "tcp") == cidr_allowed("203.0.113.0/24")


def test_no_hostname_and_address_not_in_allow_cidrs() -> None:
    p = policy(egress={"allow_hosts": ["a.com"], "allow_cidrs": ["203.0.113.0/24"]})
    assert decide(p, None, PUBLIC, 443, "tcp") == NO_NAME
    assert decide(p, "", PUBLIC, 443, "tcp") == NO_NAME
    assert decide(p, None, None, None, "dns") == NO_NAME


def test_name_not_listed_and_address_not_in_allow_cidrs() -> None:
    p = policy(egress={"allow_hosts": ["a.com"], "allow_cidrs": ["203.0.113.0/24"]})
    assert decide(p, "b.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(p, "b.com", "203.0.113.1", 443, "tls") == cidr_allowed("203.0.113.0/24")


def test_ipv4_mapped_ipv6_is_unwrapped() -> None:
    p = policy(egress={"allow_cidrs": ["10.0.0.0/8"], "deny_cidrs": ["10.66.0.0/16"]})
    assert decide(p, None, "::ffff:10.1.2.3", 443, "tcp") == cidr_allowed("10.0.0.0/8")
    assert decide(p, None, ipaddress.ip_address("::ffff:10.1.2.3"), 443, "tcp") == cidr_allowed("10.0.0.0/8")
    assert decide(p, None, "::ffff:10.66.0.1", 443, "tcp") == cidr_denied("10.66.0.0/16")
    assert decide(p, None, "::ffff:11.0.0.1", 443, "tcp") == NO_NAME
    assert address_key("::ffff:10.1.2.3") == address_key("10.1.2.3") == (4, 0x0A010203)


def test_ipv6_cidrs() -> None:
    p = policy(egress={"allow_cidrs": ["2001:db8::/32", "2606:4700::1111/128"], "deny_cidrs": ["2001:db8:bad::/48"]})
    assert decide(p, None, "2001:db8:1::5", 443, "tcp") == cidr_allowed("2001:db8::/32")
    assert decide(p, None, "2001:DB8:0001::5", 443, "tcp") == cidr_allowed("2001:db8::/32")
    assert decide(p, None, "2606:4700::1111", 443, "tcp") == cidr_allowed("2606:4700::1111/128")
    assert decide(p, None, "2001:db8:bad::1", 443, "tcp") == cidr_denied("2001:db8:bad::/48")
    assert decide(p, None, "2001:db9::1", 443, "tcp") == NO_NAME
    assert decide(p, None, "fe80::1%eth0", 443, "tcp") == NO_NAME  # a zone index is ignored, not an error


def test_ipv4_cidr_never_matches_an_ipv6_address_with_the_same_bits() -> None:
    p = policy(egress={"allow_cidrs": ["0.0.0.0/8"]})
    assert decide(p, None, "::1", 443, "tcp") == NO_NAME  # ::1 is integer 1, inside 0.0.0.0/8 as an int


@pytest.mark.parametrize(
    "address",
    [ipaddress.ip_address("203.0.113.5"), ipaddress.ip_address("2001:db8::5"), "203.0.113.5", "2001:db8::5"],
)
def test_preparsed_and_string_addresses_decide_the_same(address: object) -> None:
    p = policy(egress={"allow_cidrs": ["203.0.113.0/24", "2001:db8::/32"]})
    verdict = decide(p, None, address, 443, "tcp")  # type: ignore[arg-type]
    assert verdict.allowed
    assert verdict.label in ("allow_cidrs 203.0.113.0/24", "allow_cidrs 2001:db8::/32")


@pytest.mark.parametrize("address", ["not-an-ip", "999.1.1.1", "10.0.0.0/8", "", "1.2.3", "::g"])
def test_unparseable_address_is_denied(address: str) -> None:
    p = policy(egress={"allow_hosts": ["a.com"], "allow_cidrs": ["0.0.0.0/0"]})
    assert decide(p, "a.com", address, 443, "tls") == Verdict(
        False, f"unparseable address {address!r}", Rule.DEFAULT_DENY
    )


def test_unparseable_address_is_denied_in_unrestricted_too() -> None:
    assert decide(policy("unrestricted"), "a.com", "bogus", 443, "tls").allowed is False


# --------------------------------------------------------------------------- hosts


def test_exact_host() -> None:
    p = policy(egress={"allow_hosts": ["api.example.com"]})
    assert decide(p, "api.example.com", PUBLIC, 443, "tls") == host_allowed(
        "api.example.com", "allow_hosts api.example.com"
    )
    assert decide(p, "example.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(p, "x.api.example.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(p, "api.example.com.evil.net", PUBLIC, 443, "tls") == NOT_LISTED


def test_wildcard_matches_one_level_only() -> None:
    p = policy(egress={"allow_hosts": ["*.example.com"]})
    assert decide(p, "a.example.com", PUBLIC, 443, "tls") == host_allowed("a.example.com", "allow_hosts *.example.com")
    assert decide(p, "example.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(p, "a.b.example.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(p, "aexample.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(p, ".example.com", PUBLIC, 443, "tls") == NOT_LISTED


def test_wildcard_and_exact_together() -> None:
    p = policy(egress={"allow_hosts": ["*.example.com", "example.com"]})
    assert decide(p, "example.com", PUBLIC, 443, "tls") == host_allowed("example.com", "allow_hosts example.com")
    assert decide(p, "www.example.com", PUBLIC, 443, "tls").allowed


@pytest.mark.parametrize("query", ["API.Example.COM", "api.example.com.", "Api.Example.Com.", "API.EXAMPLE.COM"])
def test_query_names_are_case_insensitive_and_may_end_in_a_dot(query: str) -> None:
    p = policy(egress={"allow_hosts": ["api.example.com", "*.wild.example"]})
    assert decide(p, query, PUBLIC, 443, "tls") == host_allowed("api.example.com", "allow_hosts api.example.com")
    assert decide(
        p,
        query.replace("api.example.com", "x.wild.example").replace("API.EXAMPLE.COM", "X.WILD.EXAMPLE"),
        None,
        None,
        "dns",
    ).allowed


def test_idn_pattern_matches_its_punycode_query() -> None:
    p = policy(egress={"allow_hosts": ["bücher.de"]})
    assert decide(p, "xn--bcher-kva.de", PUBLIC, 443, "tls") == host_allowed(
        "xn--bcher-kva.de", "allow_hosts xn--bcher-kva.de"
    )


def test_host_ports_restrict_allowed_hosts() -> None:
    p = policy(egress={"allow_hosts": ["a.com", "*.b.com"], "host_ports": [443]})
    assert decide(p, "a.com", PUBLIC, 443, "tls") == host_allowed("a.com", "allow_hosts a.com")
    assert decide(p, "a.com", PUBLIC, 80, "http") == port_denied(80, "a.com", "allow_hosts a.com")
    assert decide(p, "x.b.com", PUBLIC, 8443, "tls") == port_denied(8443, "x.b.com", "allow_hosts *.b.com")
    assert decide(p, "a.com", None, None, "dns") == host_allowed("a.com", "allow_hosts a.com")


def test_host_without_host_ports_allows_any_port() -> None:
    p = policy(egress={"allow_hosts": ["a.com"]})
    for port in (22, 80, 443, 5432):
        assert decide(p, "a.com", PUBLIC, port, "tcp") == host_allowed("a.com", "allow_hosts a.com")


def test_host_port_miss_falls_back_to_allow_cidrs() -> None:
    p = policy(egress={"allow_hosts": ["a.com"], "host_ports": [443], "allow_cidrs": ["203.0.113.0/24"]})
    assert decide(p, "a.com", "203.0.113.7", 80, "http") == cidr_allowed("203.0.113.0/24")
    assert decide(p, "a.com", PUBLIC, 80, "http") == port_denied(80, "a.com", "allow_hosts a.com")


def test_host_port_miss_is_reported_over_the_cidr_port_miss() -> None:
    p = policy(
        egress={
            "allow_hosts": ["a.com"],
            "host_ports": [443],
            "allow_cidrs": ["203.0.113.0/24"],
            Rule.ALLOW_PORTS: [8443],
        }
    )
    assert decide(p, "a.com", "203.0.113.7", 8443, "tls") == cidr_allowed("203.0.113.0/24")
    assert decide(p, "a.com", "203.0.113.7", 80, "http") == port_denied(80, "a.com", "allow_hosts a.com")


@pytest.mark.parametrize(
    ("name", "port", "expected"),
    [
        ("github.com", 22, host_allowed("github.com", "preset git-hosts")),
        ("github.com", 443, host_allowed("github.com", "preset git-hosts")),
        ("gitlab.com", 22, host_allowed("gitlab.com", "preset git-hosts")),
        ("github.com", 80, port_denied(80, "github.com", "preset git-hosts")),
        ("github.com", 9418, port_denied(9418, "github.com", "preset git-hosts")),
        ("api.openai.com", 443, host_allowed("api.openai.com", "preset ai-apis")),
        ("api.anthropic.com", 443, host_allowed("api.anthropic.com", "preset ai-apis")),
        ("api.openai.com", 22, port_denied(22, "api.openai.com", "preset ai-apis")),
        ("api.openai.com", 80, port_denied(80, "api.openai.com", "preset ai-apis")),
        ("pypi.org", 443, NOT_LISTED),
    ],
)
def test_presets_with_their_ports(name: str, port: int, expected: Verdict) -> None:
    p = policy(egress={"presets": ["git-hosts", "ai-apis"]})
    assert decide(p, name, PUBLIC, port, "tcp") == expected


def test_a_host_in_a_preset_and_in_allow_hosts_takes_the_wider_rule() -> None:
    p = policy(egress={"presets": ["ai-apis"], "allow_hosts": ["api.openai.com"]})
    assert decide(p, "api.openai.com", PUBLIC, 443, "tls") == host_allowed("api.openai.com", "preset ai-apis")
    assert decide(p, "api.openai.com", PUBLIC, 8080, "tcp") == host_allowed(
        "api.openai.com", "allow_hosts api.openai.com"
    )


def test_operator_preset() -> None:
    internal = make_preset("internal", ["*.corp.example", "git.corp.example"], [443, 8443])
    presets = {**BUILTIN_PRESETS, "internal": internal}
    p = policy(egress={"presets": ["internal"]}, presets=presets)
    assert decide(p, "svc.corp.example", PUBLIC, 8443, "tls") == host_allowed(
        "svc.corp.example", "preset internal", wildcard=True
    )
    assert decide(p, "svc.corp.example", PUBLIC, 80, "http") == port_denied(80, "svc.corp.example", "preset internal")
    # A preset removed from the configuration since the record was accepted grants nothing.
    sandbox = parse_sandbox(
        {"id": "sb1", "addresses": ["10.75.0.2"], "profile": "allowlisted", "egress": {"presets": ["internal"]}},
        subnets=CONTEXT.subnets,
        known_presets=presets,
        known_secrets=(),
    )
    gone = compile_policy(sandbox, None, BUILTIN_PRESETS)
    assert decide(gone, "svc.corp.example", PUBLIC, 443, "tls") == NOT_LISTED


def test_unlisted_port_is_allowed_for_dns() -> None:
    p = policy(egress={"presets": ["ai-apis"]})
    assert decide(p, "api.openai.com", None, None, "dns") == host_allowed("api.openai.com", "preset ai-apis")
    assert p.name_allowed("api.openai.com") == host_allowed("api.openai.com", "preset ai-apis")
    assert p.name_allowed("evil.example") == NOT_LISTED


# --------------------------------------------------------------------------- registry profile


@pytest.mark.parametrize("name", ["pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "crates.io"])
def test_registry_profile_allows_package_registries(name: str) -> None:
    p = policy("registry")
    assert decide(p, name, PUBLIC, 443, "tls") == host_allowed(name, "preset package-registries")
    assert decide(p, name, None, None, "dns") == host_allowed(name, "preset package-registries")


def test_registry_profile_allows_nothing_else() -> None:
    p = policy("registry")
    assert decide(p, "github.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(p, "example.com", None, None, "dns") == NOT_LISTED
    assert decide(p, None, "1.1.1.1", 443, "tcp") == NO_NAME
    assert decide(p, "pypi.org", PUBLIC, 22, "tcp") == port_denied(22, "pypi.org", "preset package-registries")
    assert decide(p, "deb.debian.org", PUBLIC, 80, "http") == host_allowed(
        "deb.debian.org", "preset package-registries"
    )


def test_registry_profile_ignores_a_templates_hosts_and_cidrs() -> None:
    template = {"egress": {"allow_hosts": ["github.com"], "allow_cidrs": ["0.0.0.0/0"], "host_ports": [443]}}
    p = policy("registry", template=template)
    assert not policy("registry", template={"egress": {"mode": "allow_all"}}).allow_all
    assert decide(p, "github.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(p, None, "1.1.1.1", 443, "tcp") == NO_NAME
    assert decide(p, "pypi.org", PUBLIC, 80, "http").allowed  # host_ports did not narrow the registry preset
    assert p.effective_egress.allow_hosts is None
    assert p.effective_egress.allow_cidrs is None


def test_registry_profile_with_extra_presets_and_deny_cidrs() -> None:
    p = policy("registry", {"presets": ["git-hosts"], "deny_cidrs": ["10.0.0.0/8"]})
    assert decide(p, "github.com", PUBLIC, 22, "tcp") == host_allowed("github.com", "preset git-hosts")
    assert decide(p, "pypi.org", "10.1.1.1", 443, "tls") == cidr_denied("10.0.0.0/8")


# --------------------------------------------------------------------------- templates and limits


def test_template_fields_are_inherited_when_unset() -> None:
    p = policy(
        "allowlisted",
        {"host_ports": [443]},
        template={"egress": {"allow_hosts": ["a.com"], "deny_cidrs": ["10.0.0.0/8"]}},
    )
    assert decide(p, "a.com", PUBLIC, 443, "tls") == host_allowed("a.com", "allow_hosts a.com")
    assert decide(p, "a.com", PUBLIC, 80, "http") == port_denied(80, "a.com", "allow_hosts a.com")
    assert decide(p, "a.com", "10.0.0.1", 443, "tls") == cidr_denied("10.0.0.0/8")


def test_sandbox_field_overrides_the_template_field() -> None:
    p = policy("allowlisted", {"allow_hosts": ["b.com"]}, template={"egress": {"allow_hosts": ["a.com"]}})
    assert decide(p, "b.com", PUBLIC, 443, "tls") == host_allowed("b.com", "allow_hosts b.com")
    assert decide(p, "a.com", PUBLIC, 443, "tls") == NOT_LISTED


def test_an_empty_list_overrides_the_template_too() -> None:
    p = policy("allowlisted", {"allow_hosts": []}, template={"egress": {"allow_hosts": ["a.com"]}})
    assert decide(p, "a.com", PUBLIC, 443, "tls") == NOT_LISTED


def test_template_allow_all_is_capped_by_the_profile() -> None:
    template = {"egress": {"mode": "allow_all"}}
    assert decide(policy("allowlisted", template=template), "a.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert decide(policy("unrestricted", template=template), "a.com", PUBLIC, 443, "tls") == ALLOW_ALL


def test_sandbox_deny_all_overrides_an_unrestricted_template() -> None:
    p = policy(
        "unrestricted", {"mode": "deny_all", "allow_hosts": ["a.com"]}, template={"egress": {"mode": "allow_all"}}
    )
    assert decide(p, "a.com", PUBLIC, 443, "tls") == host_allowed("a.com", "allow_hosts a.com")
    assert decide(p, "b.com", PUBLIC, 443, "tls") == NOT_LISTED


def test_limits_default() -> None:
    assert policy().limits == EffectiveLimits(1000, 100, 1000, 500)
    assert DEFAULT_LIMITS.bandwidth_mbit == 100  # seed 000's defaults


def test_limits_are_layered_sandbox_over_template_over_defaults() -> None:
    p = policy(
        template={"limits": {"bandwidth_mbit": 50, "connections_per_minute": 10, "burst_mbit": 500}},
        limits={"connections_per_minute": 20},
    )
    assert p.limits == EffectiveLimits(
        connections_per_minute=20, bandwidth_mbit=50, burst_mbit=500, dns_queries_per_minute=500
    )


@pytest.mark.parametrize(
    ("template_limits", "sandbox_limits", "bandwidth", "burst"),
    [
        (None, {"bandwidth_mbit": 2000}, 2000, 2000),  # default burst 1000 < sandbox bandwidth 2000
        ({"burst_mbit": 200}, {"bandwidth_mbit": 500}, 500, 500),
        ({"bandwidth_mbit": 800}, {"burst_mbit": 300}, 800, 800),  # each record is valid on its own
        ({"bandwidth_mbit": 10}, None, 10, 1000),
    ],
)
def test_burst_is_never_below_sustained(
    template_limits: dict[str, int] | None, sandbox_limits: dict[str, int] | None, bandwidth: int, burst: int
) -> None:
    template = {"limits": template_limits} if template_limits else None
    p = policy(template=template, limits=sandbox_limits)
    assert (p.limits.bandwidth_mbit, p.limits.burst_mbit) == (bandwidth, burst)


def test_compile_policy_accepts_a_custom_default() -> None:
    sandbox = parse_sandbox(
        {"id": "a", "addresses": ["10.75.0.9"]}, subnets=CONTEXT.subnets, known_presets=(), known_secrets=()
    )
    from gateway.policy import Limits

    compiled = compile_policy(sandbox, None, {}, Limits(7, 8, 9, 10))
    assert compiled.limits == EffectiveLimits(7, 8, 9, 10)


def test_describe() -> None:
    p = policy("allowlisted", {"allow_hosts": ["a.com"], "allow_internet": True})
    described = p.describe()
    assert described["sandbox"] == "sb1"
    assert described["profile"] == "allowlisted"
    assert described["mode"] == "deny_all"
    assert described["egress"] == {"allow_internet": True, "allow_hosts": ["a.com"]}
    assert described["limits"]["bandwidth_mbit"] == 100


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_fails_closed_for_an_unknown_name(profile: str) -> None:
    verdict = decide(policy(profile), "unknown.invalid", PUBLIC, 443, "tls")
    assert verdict.allowed is (profile == "unrestricted")


def test_repeated_decisions_on_one_policy_keep_their_own_reasons() -> None:
    # Verdicts are reused between connections; each must still name its own host and CIDR.
    p = policy(
        egress={
            "presets": ["git-hosts"],
            "allow_hosts": ["*.example.com"],
            "allow_cidrs": ["203.0.113.0/24", "198.51.100.0/24"],
            "deny_cidrs": ["10.0.0.0/8", "192.168.0.0/16"],
        }
    )
    for _ in range(3):
        assert decide(p, "github.com", PUBLIC, 443, "tls") == host_allowed("github.com", "preset git-hosts")
        assert decide(p, "gitlab.com", PUBLIC, 22, "tcp") == host_allowed("gitlab.com", "preset git-hosts")
        assert decide(p, "github.com", PUBLIC, 80, "http") == port_denied(80, "github.com", "preset git-hosts")
        assert decide(p, "a.example.com", PUBLIC, 443, "tls") == host_allowed(
            "a.example.com", "allow_hosts *.example.com"
        )
        assert decide(p, "b.example.com", PUBLIC, 443, "tls") == host_allowed(
            "b.example.com", "allow_hosts *.example.com"
        )
        assert decide(p, None, "203.0.113.1", 443, "tcp") == cidr_allowed("203.0.113.0/24")
        assert decide(p, None, "198.51.100.1", 443, "tcp") == cidr_allowed("198.51.100.0/24")
        assert decide(p, None, "10.0.0.1", 443, "tcp") == cidr_denied("10.0.0.0/8")
        assert decide(p, None, "192.168.1.1", 443, "tcp") == cidr_denied("192.168.0.0/16")


def test_a_cidr_in_both_lists_is_denied() -> None:
    p = policy(egress={"allow_cidrs": ["203.0.113.0/24"], "deny_cidrs": ["203.0.113.0/24"]})
    assert decide(p, None, "203.0.113.1", 443, "tcp") == cidr_denied("203.0.113.0/24")


# --------------------------------------------------------------------------- egress.inspect

READ_ONLY = {"hosts": ["api.github.com", "*.githubusercontent.com"], "methods": ["GET"], "deny_reason": "read-only"}


def test_an_inspect_entry_allows_and_marks_its_hosts_on_its_ports() -> None:
    p = policy(egress={"inspect": [READ_ONLY]})
    assert decide(p, "api.github.com", PUBLIC, 443, "tls") == host_allowed("api.github.com", "inspect api.github.com")
    assert decide(p, "raw.githubusercontent.com", PUBLIC, 443, "tls") == host_allowed(
        "raw.githubusercontent.com", "inspect *.githubusercontent.com"
    )
    # 443 only by default; the name still resolves.
    assert decide(p, "api.github.com", PUBLIC, 80, "http") == port_denied(
        80, "api.github.com", "inspect api.github.com"
    )
    assert p.name_allowed("api.github.com") == host_allowed("api.github.com", "inspect api.github.com")
    assert decide(p, "github.com", PUBLIC, 443, "tls") == NOT_LISTED


def test_inspect_wins_over_allow_hosts_and_presets_on_its_ports_only() -> None:
    p = policy(
        egress={
            "presets": ["git-hosts"],
            "allow_hosts": ["api.github.com", "raw.githubusercontent.com"],
            "inspect": [READ_ONLY],
        }
    )
    for _ in range(2):  # the cached verdict is the same one
        assert decide(p, "api.github.com", PUBLIC, 443, "tls").label == "inspect api.github.com"
    # A wildcard entry marks a name that allow_hosts lists exactly: marked is marked.
    assert decide(p, "raw.githubusercontent.com", PUBLIC, 443, "tls").label == "inspect *.githubusercontent.com"
    # Off the entry's ports, the other rules answer as before.
    assert decide(p, "api.github.com", PUBLIC, 8443, "tcp") == host_allowed(
        "api.github.com", "allow_hosts api.github.com"
    )


def test_inspect_rule_gives_the_entry_behind_a_verdict() -> None:
    second = {
        "hosts": ["api.openai.com"],
        "ports": [443, 8443],
        "credentials": [{"header": "authorization", "secret": "openai", "template": "Bearer {secret}"}],
    }
    p = policy(egress={"inspect": [READ_ONLY, second]})
    verdict = decide(p, "objects.githubusercontent.com", PUBLIC, 443, "tls")
    entry = p.inspect_rule(verdict.detail)
    assert entry is not None and entry.hosts == ("api.github.com", "*.githubusercontent.com")
    assert entry.methods == ("GET",) and entry.deny_reason == "read-only"
    openai = p.inspect_rule(decide(p, "api.openai.com", PUBLIC, 8443, "tcp").detail)
    assert openai is not None and openai.credentials[0].secret == "openai"
    assert p.inspect_rule("github.com") is None
    assert policy(egress={"allow_hosts": ["api.github.com"]}).inspect_rule("api.github.com") is None


def test_inspect_entries_are_inherited_and_overridden_like_every_field() -> None:
    template = {"egress": {"inspect": [READ_ONLY]}}
    inherited = policy(template=template)
    assert decide(inherited, "api.github.com", PUBLIC, 443, "tls").label == "inspect api.github.com"
    own = policy(egress={"inspect": [{"hosts": ["api.openai.com"]}]}, template=template)
    assert decide(own, "api.github.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert own.inspect_rule("api.github.com") is None and own.inspect_rule("api.openai.com") is not None
    # A registry sandbox never gains a template's inspect entries (they are allow entries).
    registry = policy("registry", template=template)
    assert decide(registry, "api.github.com", PUBLIC, 443, "tls") == NOT_LISTED
    assert registry.inspect_rule("api.github.com") is None
    assert registry.describe()["egress"] == {}


def test_describe_shows_the_inspect_entries() -> None:
    described = policy(egress={"inspect": [READ_ONLY]}).describe()
    assert described["egress"]["inspect"] == [
        {
            "hosts": ["api.github.com", "*.githubusercontent.com"],
            "ports": [443],
            "methods": ["GET"],
            "paths": [],
            "headers": [],
            "deny_reason": "read-only",
            "credentials": [],
        }
    ]


def test_unrestricted_deny_all_decides_inspect_entries_too() -> None:
    p = policy("unrestricted", {"mode": "deny_all", "inspect": [READ_ONLY]})
    assert decide(p, "api.github.com", PUBLIC, 443, "tls").label == "inspect api.github.com"


def test_encrypted_client_hello_is_accepted_only_for_opted_in_outer_names() -> None:
    pol = policy("allowlisted", {"allow_hosts": ["*.cdn.test", "a.test"], "allow_ech": ["ech.cdn.test", "*.ech.test"]})
    assert pol.ech_accepted("ech.cdn.test")
    assert pol.ech_accepted("x.ech.test")
    for name in ("a.test", "other.cdn.test", "ech.test", "x.y.ech.test", "", None):
        assert not pol.ech_accepted(name), name
    # No name is checked under allow_all, so ECH hides nothing there; deny_all unrestricted checks names again.
    assert policy("unrestricted").ech_accepted("anything.test")
    # A deny list checks names even under allow_all: ECH would hide a denied name behind an outer one.
    denying = policy("unrestricted", {"deny_hosts": ["tracker.test"]})
    assert not denying.ech_accepted("cdn.test") and not denying.ech_accepted(None)
    assert policy("unrestricted", {"deny_hosts": ["tracker.test"], "allow_ech": ["cdn.test"]}).ech_accepted("cdn.test")
    explicit = {"mode": "allow_all", "deny_hosts": ["tracker.test"], "allow_ech": ["cdn.test"]}  # no mode conflict
    assert policy("unrestricted", explicit).ech_accepted("cdn.test")
    assert not policy("unrestricted", {"mode": "deny_all", "allow_hosts": ["a.test"]}).ech_accepted("a.test")
    assert not policy("registry").ech_accepted("pypi.org")


def test_allow_ech_is_a_per_record_field_with_the_hostname_grammar() -> None:
    with pytest.raises(GatewayError) as info:
        policy("allowlisted", {"allow_ech": ["https://x.test"]})
    assert info.value.field == "egress.allow_ech[0]"
    # No conflict with mode allow_all: with deny_hosts (its own or a template's) allow_all checks names, ECH too.
    assert policy("unrestricted", {"mode": "allow_all", "allow_ech": ["x.test"]}).ech_accepted("other.test")
    templated = policy("unrestricted", {"mode": "allow_all", "allow_ech": ["x.test"]}, template=DENYING_TEMPLATE)
    assert templated.ech_accepted("x.test") and not templated.ech_accepted("other.test")


DENYING_TEMPLATE = {"egress": {"deny_hosts": ["tracker.test"]}}


# --------------------------------------------------------------------------- report mode (egress.enforcement)

REPORT = {"allow_hosts": ["a.test"], "host_ports": [443], "allow_cidrs": ["93.184.0.0/16"], "allow_ports": [22]}


def would_deny(verdict: Verdict) -> Verdict:
    return Verdict(True, f"report mode: would deny ({verdict.reason})", verdict.rule, verdict.detail, True)


def test_only_allowlist_misses_are_reportable() -> None:
    # A deliberate list: every other rule (and any rule added later) stays enforced in report mode.
    assert {rule for rule in Rule if rule.reportable} == {
        Rule.DEFAULT_DENY,
        Rule.ALLOW_PORTS,
        Rule.ALLOW_HOSTS,
        Rule.PRESET,
        Rule.INSPECT,
    }


def test_report_mode_lets_the_allowlists_denials_pass_as_would_deny() -> None:
    enforced = policy("allowlisted", REPORT)
    reported = policy("allowlisted", {**REPORT, "enforcement": "report"})
    for asked in [
        ("b.test", PUBLIC, 443, "tls"),  # not listed
        ("a.test", PUBLIC, 8443, "tls"),  # a listed name on a port host_ports does not list
        (None, "93.184.1.1", 443, "tcp"),  # an allow_cidrs address on a port allow_ports does not list
        (None, "1.1.1.1", 443, "tcp"),  # no name, address not listed
        ("b.test", None, None, "dns"),
    ]:
        verdict = decide(enforced, *asked)
        assert not verdict.allowed and verdict.rule.reportable
        assert decide(reported, *asked) == would_deny(verdict)
    assert reported.name_allowed("b.test") == would_deny(NOT_LISTED)
    # What the policy allows is allowed as before, not would-deny.
    assert decide(reported, "a.test", PUBLIC, 443, "tls") == host_allowed("a.test", "allow_hosts a.test")
    assert decide(reported, None, "93.184.1.1", 22, "tcp") == cidr_allowed("93.184.0.0/16")


def test_report_mode_keeps_smtp_deny_cidrs_and_the_internet_switch_enforced() -> None:
    reported = policy("allowlisted", {**REPORT, "deny_cidrs": ["93.184.216.0/24"], "enforcement": "report"})
    assert decide(reported, "b.test", PUBLIC, 443, "tls") == cidr_denied("93.184.216.0/24")
    assert decide(reported, "b.test", "1.1.1.1", 25, "tcp").rule is Rule.SMTP
    off = policy("allowlisted", {"allow_internet": False, "enforcement": "report"})
    assert decide(off, "b.test", PUBLIC, 443, "tls") == NO_INTERNET


def test_report_mode_is_inherited_from_a_template_within_the_profiles_ceiling() -> None:
    template = {"egress": {"allow_hosts": ["a.test"], "enforcement": "report"}}
    inherited = policy("allowlisted", template=template)
    assert inherited.report and decide(inherited, "b.test", PUBLIC, 443, "tls") == would_deny(NOT_LISTED)
    assert inherited.describe()["enforcement"] == "report"
    overridden = policy("allowlisted", {"enforcement": "enforce"}, template=template)
    assert not overridden.report and decide(overridden, "b.test", PUBLIC, 443, "tls") == NOT_LISTED
    assert overridden.describe()["enforcement"] == "enforce"
    # The registry profile may not use it, so a template's report mode is ignored there (like its allow_hosts).
    registry = policy("registry", template=template)
    assert not registry.report and not decide(registry, "b.test", PUBLIC, 443, "tls").allowed
    assert not policy("isolated", template=template).report


# --------------------------------------------------------------------------- egress.deny_hosts, host:port entries


def host_denied(name: str, entry: str) -> Verdict:
    return Verdict(False, f"host {name} denied by deny_hosts {entry}", Rule.DENY_HOSTS, entry)


DENY = {"deny_hosts": ["tracker.example", "*.ads.example", "tls-only.example:443"]}


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("tracker.example", "tracker.example"),
        ("TRACKER.Example.", "tracker.example"),  # the spellings a connection or question may carry
        ("x.ads.example", "*.ads.example"),
        ("X.ADS.EXAMPLE.", "*.ads.example"),
    ],
)
@pytest.mark.parametrize("protocol", ["tls", "http"])
@pytest.mark.parametrize("port", [80, 443, 8443])
def test_a_denied_name_is_refused_under_unrestricted_on_every_port(
    name: str, entry: str, protocol: str, port: int
) -> None:
    for unrestricted in (policy("unrestricted", DENY), policy("unrestricted", {**DENY, "mode": "deny_all"})):
        assert decide(unrestricted, name, PUBLIC, port, protocol) == host_denied(name.lower().rstrip("."), entry)


def test_a_wildcard_denies_one_extra_label_only_and_other_names_pass() -> None:
    unrestricted = policy("unrestricted", DENY)
    for name in ("ads.example", "a.b.ads.example", "tracker.example.net", "nottracker.example", "example"):
        assert decide(unrestricted, name, PUBLIC, 443, "tls") == ALLOW_ALL, name
    assert decide(unrestricted, None, PUBLIC, 443, "tcp") == ALLOW_ALL  # no name: nothing to deny by name


def test_deny_wins_over_allow_hosts_presets_and_inspect() -> None:
    allowing = {
        "allow_hosts": ["tracker.example", "*.ads.example"],
        "presets": ["git-hosts"],
        "inspect": [{"hosts": ["api.github.com"]}],
        "deny_hosts": ["tracker.example", "*.ads.example", "github.com", "api.github.com"],
    }
    for profile in ("allowlisted", "unrestricted"):
        p = policy(profile, {**allowing, **({"mode": "deny_all"} if profile == "unrestricted" else {})})
        assert decide(p, "tracker.example", PUBLIC, 443, "tls") == host_denied("tracker.example", "tracker.example")
        assert decide(p, "x.ads.example", PUBLIC, 443, "http") == host_denied("x.ads.example", "*.ads.example")
        assert decide(p, "github.com", PUBLIC, 443, "tls") == host_denied("github.com", "github.com")  # a preset's
        assert decide(p, "api.github.com", PUBLIC, 443, "tls") == host_denied("api.github.com", "api.github.com")
    registry = policy("registry", {"deny_hosts": ["pypi.org"]})
    assert decide(registry, "pypi.org", PUBLIC, 443, "tls") == host_denied("pypi.org", "pypi.org")


def test_deny_hosts_answers_dns_nxdomain_worthy_but_a_port_entry_leaves_the_name_resolvable() -> None:
    unrestricted = policy("unrestricted", DENY)
    assert unrestricted.name_allowed("tracker.example") == host_denied("tracker.example", "tracker.example")
    assert unrestricted.name_allowed("a.ads.example") == host_denied("a.ads.example", "*.ads.example")
    # Denied on 443 only: it resolves, and other ports pass.
    assert unrestricted.name_allowed("tls-only.example").allowed
    assert decide(unrestricted, "tls-only.example", PUBLIC, 443, "tls") == host_denied(
        "tls-only.example", "tls-only.example:443"
    )
    assert decide(unrestricted, "tls-only.example", PUBLIC, 80, "http") == ALLOW_ALL


def test_deny_hosts_from_the_template_and_the_sandbox_both_deny() -> None:
    p = policy("unrestricted", {"deny_hosts": ["own.example"]}, template={"egress": {"deny_hosts": ["tpl.example"]}})
    assert decide(p, "own.example", PUBLIC, 443, "tls") == host_denied("own.example", "own.example")
    assert decide(p, "tpl.example", PUBLIC, 443, "tls") == host_denied("tpl.example", "tpl.example")
    assert p.describe()["egress"]["deny_hosts"] == ["tpl.example", "own.example"]


def test_deny_hosts_stays_enforced_in_report_mode() -> None:
    # An operator's explicit refusal, like deny_cidrs: report mode passes only what an allowlist misses.
    reported = policy("allowlisted", {**REPORT, "deny_hosts": ["a.test"], "enforcement": "report"})
    assert decide(reported, "a.test", PUBLIC, 443, "tls") == host_denied("a.test", "a.test")
    assert reported.name_allowed("a.test") == host_denied("a.test", "a.test")
    assert decide(reported, "b.test", "1.1.1.1", 443, "tls") == would_deny(NOT_LISTED)
    assert not Rule.DENY_HOSTS.reportable


def test_isolated_and_smtp_and_the_internet_switch_come_before_the_deny_list() -> None:
    assert decide(policy("isolated"), "tracker.example", PUBLIC, 443, "tls") == ISOLATED
    assert decide(policy("unrestricted", DENY), "tracker.example", PUBLIC, 25, "tcp").rule is Rule.SMTP


def test_a_host_port_entry_allows_its_port_only() -> None:
    p = policy("allowlisted", {"allow_hosts": ["api.example.com:8443", "*.svc.example:443"]})
    assert decide(p, "api.example.com", PUBLIC, 8443, "tls") == host_allowed(
        "api.example.com", "allow_hosts api.example.com:8443"
    )
    assert decide(p, "API.example.com.", PUBLIC, 8443, "tls").allowed
    for port in (443, 80, 8444, 1):
        assert decide(p, "api.example.com", PUBLIC, port, "tls") == port_denied(
            port, "api.example.com", "allow_hosts api.example.com:8443"
        )
    assert decide(p, "a.svc.example", PUBLIC, 443, "tls") == host_allowed(
        "a.svc.example", "allow_hosts *.svc.example:443"
    )
    assert decide(p, "a.svc.example", PUBLIC, 80, "http").rule is Rule.ALLOW_HOSTS  # the port miss names the entry
    assert not decide(p, "a.svc.example", PUBLIC, 80, "http").allowed
    assert p.name_allowed("api.example.com").allowed  # DNS has no port: the name resolves


def test_a_bare_entry_keeps_host_ports_and_a_host_port_entry_is_its_own() -> None:
    p = policy("allowlisted", {"allow_hosts": ["bare.example", "api.example.com:8443"], "host_ports": [443]})
    assert decide(p, "bare.example", PUBLIC, 443, "tls").allowed
    assert not decide(p, "bare.example", PUBLIC, 8443, "tls").allowed
    assert decide(p, "api.example.com", PUBLIC, 8443, "tls").allowed  # not subject to host_ports
    assert not decide(p, "api.example.com", PUBLIC, 443, "tls").allowed


def test_two_ports_for_one_name_are_two_entries() -> None:
    p = policy("allowlisted", {"allow_hosts": ["api.example.com:8443", "api.example.com:443"]})
    assert decide(p, "api.example.com", PUBLIC, 443, "tls") == host_allowed(
        "api.example.com", "allow_hosts api.example.com:443"
    )
    assert decide(p, "api.example.com", PUBLIC, 8443, "tls").allowed
    assert not decide(p, "api.example.com", PUBLIC, 80, "http").allowed


def test_a_name_listed_on_a_port_is_still_denied_on_others_by_its_parents_wildcard() -> None:
    p = policy("unrestricted", {"deny_hosts": ["a.ads.example:443", "*.ads.example:80", "*.web.example"]})
    assert decide(p, "a.ads.example", PUBLIC, 443, "tls") == host_denied("a.ads.example", "a.ads.example:443")
    assert decide(p, "a.ads.example", PUBLIC, 80, "http") == host_denied("a.ads.example", "*.ads.example:80")
    assert decide(p, "a.ads.example", PUBLIC, 8080, "http") == ALLOW_ALL
    assert p.name_allowed("a.ads.example").allowed  # only port entries: it resolves
    both = policy("unrestricted", {"deny_hosts": ["x.web.example:443", "*.web.example"]})
    assert decide(both, "x.web.example", PUBLIC, 8080, "http") == host_denied("x.web.example", "*.web.example")
    assert not both.name_allowed("x.web.example").allowed


# --------------------------------------------------------------------------- explain's precedence chain


CHAIN_CASES = [
    ("allowlisted", {"allow_hosts": ["a.com:8443", "*.b.com"], "deny_hosts": ["x.b.com"]}, "a.com", PUBLIC, 443, "tls"),
    (
        "allowlisted",
        {"allow_hosts": ["a.com:8443", "*.b.com"], "deny_hosts": ["x.b.com"]},
        "y.b.com",
        PUBLIC,
        443,
        "tls",
    ),
    (
        "allowlisted",
        {"allow_hosts": ["a.com:8443", "*.b.com"], "deny_hosts": ["x.b.com"]},
        "x.b.com",
        None,
        None,
        "dns",
    ),
    ("allowlisted", {"allow_cidrs": ["192.0.2.0/24"], "deny_cidrs": ["192.0.2.9/32"]}, None, "192.0.2.9", 22, "tcp"),
    ("allowlisted", {"allow_cidrs": ["192.0.2.0/24"], "allow_ports": [443]}, None, "192.0.2.1", 22, "tcp"),
    ("allowlisted", {"allow_hosts": ["a.com"], "enforcement": "report"}, "c.com", PUBLIC, 443, "tls"),
    ("unrestricted", {}, "c.com", PUBLIC, 25, "tcp"),
    ("unrestricted", {}, "c.com", PUBLIC, 443, "tls"),
    ("isolated", {}, "c.com", PUBLIC, 443, "tls"),
]


@pytest.mark.parametrize(("profile", "egress", "host", "address", "port", "protocol"), CHAIN_CASES)
def test_the_chain_explain_hears_does_not_change_the_verdict_and_follows_the_documented_order(
    profile: str, egress: dict[str, object], host: str | None, address: str | None, port: int | None, protocol: str
) -> None:
    p = policy(profile, egress)
    steps: list[Rule] = []
    heard = decide(p, host, address, port, protocol, lambda rule, result: steps.append(rule))
    assert heard == decide(p, host, address, port, protocol)
    order = [Rule.SMTP, Rule.INVARIANT, Rule.DENY_HOSTS, Rule.NO_INTERNET, Rule.DENY_CIDRS, Rule.ALLOW_ALL,
             Rule.ALLOW_HOSTS, Rule.ALLOW_CIDRS]  # fmt: skip
    passed = [rule for rule in steps if not (heard.would_deny and rule is heard.rule)]
    assert passed == sorted(passed, key=order.index), steps
    if port in SMTP:
        assert steps == []  # the first step decided
    if profile == "isolated":
        assert steps == [Rule.SMTP]
    if heard.would_deny:
        assert steps[-1] is heard.rule  # report mode says what would have denied, then lets it pass
    if egress.get("deny_hosts") and host:
        assert Rule.DENY_HOSTS in steps or heard.rule is Rule.DENY_HOSTS
