"""How a connection is decided, asked of a running `gateway run`: one table of (sandbox, host[:port], address,
protocol) -> verdict and deciding rule, answered alike by `GET /v1/sandboxes/{id}/explain` and by
`gateway explain` (exit 0 ALLOW, 4 DENY); templates inherited, overridden field by field, and changed live."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest

from tests.factory import Server, gateway
from tests.product import ProductApi

TEMPLATE = {
    "name": "web",
    "egress": {"allow_hosts": ["tpl.example.com", "tpl2.example.com"], "host_ports": [443]},
    "limits": {"bandwidth_mbit": 7, "burst_mbit": 70},
}

SANDBOXES: list[dict[str, Any]] = [
    {
        "id": "wild",
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["*.example.com", "api.example.net"], "host_ports": [443, 8443]},
    },
    {"id": "iso"},  # the default profile
    {"id": "iso-tpl", "template": "web"},  # a template cannot widen isolated
    {"id": "off", "profile": "allowlisted", "egress": {"allow_internet": False}},
    {"id": "reg", "profile": "registry"},
    {"id": "reg-tpl", "profile": "registry", "template": "web"},  # nor registry's hosts
    {
        "id": "cidr",
        "profile": "allowlisted",
        "egress": {
            "allow_hosts": ["named.example.com"],
            "allow_cidrs": ["203.0.113.0/24"],
            "deny_cidrs": ["203.0.113.128/25"],
            "allow_ports": [443, 8443],
        },
    },
    {"id": "open", "profile": "unrestricted"},
    {
        "id": "but",
        "profile": "unrestricted",
        "egress": {"mode": "deny_all", "allow_cidrs": ["0.0.0.0/0"], "deny_cidrs": ["10.0.0.0/8"]},
    },
    {"id": "inh", "profile": "allowlisted", "template": "web"},
    {"id": "ports", "profile": "allowlisted", "template": "web", "egress": {"host_ports": [8443]}},
    {"id": "own", "profile": "allowlisted", "template": "web", "egress": {"allow_hosts": ["own.example.com"]}},
    {"id": "none", "profile": "allowlisted", "template": "web", "egress": {"allow_hosts": []}},
]

# (sandbox, host[:port], address, protocol, allowed, rule)
DECISIONS: list[tuple[str, str, str | None, str | None, bool, str]] = [
    (
        "wild",
        "a.example.com",
        None,
        None,
        True,
        "allow_hosts *.example.com",
    ),  # host a.example.com allowed by allow_hosts *.example.com
    ("wild", "example.com", None, None, False, "default:deny"),  # host not in allowlist
    ("wild", "a.b.example.com", None, None, False, "default:deny"),  # host not in allowlist
    (
        "wild",
        "a.example.com:8443",
        None,
        None,
        True,
        "allow_hosts *.example.com",
    ),  # host a.example.com allowed by allow_hosts *.example.com
    (
        "wild",
        "a.example.com:80",
        None,
        "http",
        False,
        "allow_hosts *.example.com",
    ),  # port 80 not allowed for host a.example.com (allow_hosts *.example.com)
    (
        "wild",
        "api.example.net",
        None,
        None,
        True,
        "allow_hosts api.example.net",
    ),  # host api.example.net allowed by allow_hosts api.example.net
    (
        "wild",
        "a.example.com",
        None,
        "dns",
        True,
        "allow_hosts *.example.com",
    ),  # host a.example.com allowed by allow_hosts *.example.com
    ("iso", "a.example.com", None, None, False, "profile:isolated"),  # profile isolated allows no network
    ("iso", "a.example.com", None, "dns", False, "profile:isolated"),  # profile isolated allows no network
    ("iso-tpl", "tpl.example.com", None, None, False, "profile:isolated"),  # profile isolated allows no network
    ("off", "a.example.com", None, None, False, "egress.allow_internet"),  # egress disabled (allow_internet is false)
    (
        "reg",
        "pypi.org",
        None,
        None,
        True,
        "preset package-registries",
    ),  # host pypi.org allowed by preset package-registries
    (
        "reg",
        "registry.npmjs.org:80",
        None,
        "http",
        True,
        "preset package-registries",
    ),  # host registry.npmjs.org allowed by preset package-registries
    (
        "reg",
        "pypi.org:22",
        None,
        "tcp",
        False,
        "preset package-registries",
    ),  # port 22 not allowed for host pypi.org (preset package-registries)
    ("reg", "github.com", None, None, False, "default:deny"),  # host not in allowlist
    ("reg-tpl", "tpl.example.com", None, None, False, "default:deny"),  # host not in allowlist
    ("cidr", "203.0.113.7", None, None, True, "allow_cidrs 203.0.113.0/24"),  # address in allow_cidrs 203.0.113.0/24
    (
        "cidr",
        "203.0.113.7:8443",
        None,
        "tcp",
        True,
        "allow_cidrs 203.0.113.0/24",
    ),  # address in allow_cidrs 203.0.113.0/24
    (
        "cidr",
        "203.0.113.7:22",
        None,
        "tcp",
        False,
        "allow_ports",
    ),  # port 22 not in allow_ports for allow_cidrs 203.0.113.0/24
    (
        "cidr",
        "203.0.113.200",
        None,
        None,
        False,
        "deny_cidrs 203.0.113.128/25",
    ),  # address in deny_cidrs 203.0.113.128/25
    (
        "cidr",
        "named.example.com",
        "203.0.113.200",
        None,
        False,
        "deny_cidrs 203.0.113.128/25",
    ),  # address in deny_cidrs 203.0.113.128/25
    (
        "cidr",
        "x.example.com",
        "203.0.113.7",
        None,
        True,
        "allow_cidrs 203.0.113.0/24",
    ),  # address in allow_cidrs 203.0.113.0/24
    (
        "cidr",
        "[::ffff:203.0.113.7]:443",
        None,
        None,
        True,
        "allow_cidrs 203.0.113.0/24",
    ),  # address in allow_cidrs 203.0.113.0/24
    (
        "cidr",
        "[::ffff:203.0.113.200]:443",
        None,
        None,
        False,
        "deny_cidrs 203.0.113.128/25",
    ),  # address in deny_cidrs 203.0.113.128/25
    (
        "open",
        "anything.example",
        "198.51.100.1",
        None,
        True,
        "egress.mode:allow_all",
    ),  # profile unrestricted allows all egress
    ("open", "mail.example:25", None, "tcp", False, "builtin:smtp"),  # port 25 blocked (SMTP) in every profile
    ("open", "mail.example:465", None, "tcp", False, "builtin:smtp"),  # port 465 blocked (SMTPS) in every profile
    (
        "open",
        "mail.example:587",
        None,
        "tcp",
        False,
        "builtin:smtp",
    ),  # port 587 blocked (SMTP submission) in every profile
    (
        "wild",
        "smtp.example.com:587",
        None,
        "tcp",
        False,
        "builtin:smtp",
    ),  # port 587 blocked (SMTP submission) in every profile
    ("but", "198.51.100.1:22", None, "tcp", True, "allow_cidrs 0.0.0.0/0"),  # address in allow_cidrs 0.0.0.0/0
    ("but", "10.1.2.3:443", None, None, False, "deny_cidrs 10.0.0.0/8"),  # address in deny_cidrs 10.0.0.0/8
    ("but", "[::ffff:10.1.2.3]:443", None, None, False, "deny_cidrs 10.0.0.0/8"),  # address in deny_cidrs 10.0.0.0/8
    (
        "inh",
        "tpl.example.com",
        None,
        None,
        True,
        "allow_hosts tpl.example.com",
    ),  # host tpl.example.com allowed by allow_hosts tpl.example.com
    (
        "inh",
        "tpl.example.com:8443",
        None,
        None,
        False,
        "allow_hosts tpl.example.com",
    ),  # port 8443 not allowed for host tpl.example.com (allow_hosts tpl.example.com)
    (
        "ports",
        "tpl.example.com:8443",
        None,
        None,
        True,
        "allow_hosts tpl.example.com",
    ),  # host tpl.example.com allowed by allow_hosts tpl.example.com
    (
        "ports",
        "tpl.example.com",
        None,
        None,
        False,
        "allow_hosts tpl.example.com",
    ),  # port 443 not allowed for host tpl.example.com (allow_hosts tpl.example.com)
    (
        "own",
        "own.example.com",
        None,
        None,
        True,
        "allow_hosts own.example.com",
    ),  # host own.example.com allowed by allow_hosts own.example.com
    ("own", "tpl.example.com", None, None, False, "default:deny"),  # host not in allowlist
    ("none", "tpl.example.com", None, None, False, "default:deny"),  # host not in allowlist
]


@pytest.fixture(scope="module")
def api(product_server: Server) -> ProductApi:
    client = ProductApi.checked(product_server.url)
    client.call("POST", "/v1/templates", TEMPLATE, expect=201)
    for number, record in enumerate(SANDBOXES, start=1):
        client.call("POST", "/v1/sandboxes", {"addresses": [f"10.75.4.{number}"], **record}, expect=201)
    return client


def explain_query(host: str, address: str | None, protocol: str | None) -> str:
    query = {"host": host, "address": address, "protocol": protocol}
    return urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})


def row_id(row: tuple[str, str, str | None, str | None, bool, str]) -> str:
    sandbox_id, host, address, protocol, allowed, _ = row
    return f"{sandbox_id}-{host}-{address or ''}-{protocol or 'tls'}-{'allow' if allowed else 'deny'}"


@pytest.mark.parametrize(
    ("sandbox_id", "host", "address", "protocol", "allowed", "rule"), DECISIONS, ids=[row_id(r) for r in DECISIONS]
)
def test_the_api_and_the_cli_decide_each_connection_with_the_readme_rule(
    api: ProductApi,
    product_server: Server,
    sandbox_id: str,
    host: str,
    address: str | None,
    protocol: str | None,
    allowed: bool,
    rule: str,
) -> None:
    answer = api.call("GET", f"/v1/sandboxes/{sandbox_id}/explain?{explain_query(host, address, protocol)}", expect=200)
    assert (answer.body["allowed"], answer.body["rule"]) == (allowed, rule), answer.body
    flags = [*(["--address", address] if address else []), *(["--protocol", protocol] if protocol else [])]
    result = gateway("explain", sandbox_id, host, *flags, server=product_server)
    assert result.returncode == (0 if allowed else 4), result.stderr
    word = "ALLOW" if allowed else "DENY"
    assert result.stdout.startswith(f"{word} ") and f"{answer.body['reason']}  (rule {rule})" in result.stdout


def test_the_effective_policy_merges_the_template_field_by_field(api: ProductApi) -> None:
    inherited = api.call("GET", "/v1/sandboxes/inh/policy", expect=200).body
    assert inherited["limits"]["bandwidth_mbit"] == 7 and inherited["limits"]["burst_mbit"] == 70, inherited
    assert inherited["egress"]["allow_hosts"] == TEMPLATE["egress"]["allow_hosts"], inherited
    own = api.call("GET", "/v1/sandboxes/own/policy", expect=200).body
    assert own["egress"]["allow_hosts"] == ["own.example.com"] and own["egress"]["host_ports"] == [443], own
    ceiling = api.call("GET", "/v1/sandboxes/reg-tpl/policy", expect=200).body
    assert "tpl.example.com" not in json.dumps(ceiling["egress"]), ceiling


def test_a_template_change_reaches_every_sandbox_that_inherits_it(api: ProductApi, product_server: Server) -> None:
    changed = {**TEMPLATE, "egress": {"allow_hosts": ["next.example.com"], "host_ports": [443]}}
    api.call("PUT", "/v1/templates/web", changed, expect=200)
    try:
        for sandbox_id, allowed in (("inh", True), ("ports", False), ("own", False), ("iso-tpl", False)):
            verdict = api.call("GET", f"/v1/sandboxes/{sandbox_id}/explain?host=next.example.com", expect=200).body
            assert verdict["allowed"] is allowed, (sandbox_id, verdict)
        assert gateway("explain", "inh", "next.example.com", server=product_server).returncode == 0
        assert gateway("explain", "inh", "tpl.example.com", server=product_server).returncode == 4
        ported = api.call("GET", "/v1/sandboxes/ports/explain?host=next.example.com:8443", expect=200).body
        assert ported["allowed"], ported  # the sandbox's own host_ports still override the new template
    finally:
        api.call("PUT", "/v1/templates/web", TEMPLATE, expect=200)
