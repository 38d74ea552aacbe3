"""`egress.deny_hosts` and host:port allow entries end to end: the real `gateway run --data-plane --steer` in the
egress world of tests/factory.py, driven through its API only (curl in the gateway's namespace), with curl and
dig in the sandboxes.

sb3, created through the API as unrestricted from a template that denies later.test, denies denied.test itself:
both names are refused over TLS (an alert) and HTTP (a 403 naming the rule), their DNS questions get NXDOMAIN with
an Extended DNS Error naming the entry, while allowed.test passes; flow records and explain name the
`deny_hosts <entry>` rule. sb4's allow list becomes `allowed.test:443`: HTTPS passes, HTTP on port 80 is refused;
a hostile entry is refused with its code and changes nothing. A deny entry added to sb3's template through the CLI
ends sb3's open connection to that name before the answer; the others go on.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.factory import NAMESPACE_API, EgressEnv, Holder, api, egress_env, pin, wait_until  # noqa: F401  (the fixture `env`)

API = NAMESPACE_API
SB = "sb3"  # attached, and in no record until the test creates it


@pytest.fixture(scope="module")
def denying(env: EgressEnv) -> EgressEnv:
    """sb3 unrestricted, denying later.test (its template's entry) and denied.test (its own)."""
    status, answer = api(env, "POST", "/v1/templates", {"name": "no-later", "egress": {"deny_hosts": ["later.test"]}})
    assert status == 201, answer
    record = {
        "id": SB,
        "addresses": ["10.75.0.3", "fdd4:1476:6c7e::3"],
        "profile": "unrestricted",
        "template": "no-later",
        "egress": {"deny_hosts": ["Denied.Test."]},  # stored folded, as every host entry
    }
    status, answer = api(env, "POST", "/v1/sandboxes", record)
    assert status == 201, answer
    assert answer["egress"]["deny_hosts"] == ["denied.test"], answer
    env.wait_steered(SB)
    return env


@pytest.mark.root
def test_a_denied_name_is_refused_over_tls_and_http_under_unrestricted(denying: EgressEnv) -> None:
    env = denying
    for name, address in (("denied.test", "198.18.1.2"), ("later.test", "198.18.1.3")):
        rule = f"deny_hosts {name}"
        reason = f"host {name} denied by {rule}"
        tls = env.curl(SB, f"https://{name}/", *pin(name, 443, address))
        assert tls.returncode != 0 and "alert access denied" in tls.stderr.lower(), tls.stderr
        http = env.curl(SB, f"http://{name}/", "-i", *pin(name, 80, address))
        assert http.stdout.startswith("HTTP/1.1 403"), http.stdout
        assert f"X-Gateway-Reason: {reason}" in http.stdout and f"X-Gateway-Rule: {rule}" in http.stdout, http.stdout
        assert "ORIGIN" not in http.stdout
        for protocol in ("tls", "http"):
            records = env.logged_flows(SB, name, protocol)
            assert records and {(r["verdict"], r["rule"], r["reason"]) for r in records} == {("deny", rule, reason)}

    # What no entry names passes, as unrestricted allows: also plain HTTP, and a name the wildcard-free entry
    # does not cover.
    tls = env.curl(SB, "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
    assert tls.stdout.strip() == "ORIGIN 198.18.1.1 host=allowed.test sni=allowed.test path=/", tls.stderr
    http = env.curl(SB, "http://allowed.test/h", *pin("allowed.test", 80, "198.18.1.1"))
    assert http.stdout.strip() == "ORIGIN 198.18.1.1 host=allowed.test sni=- path=/h", http.stderr
    assert {r["rule"] for r in env.logged_flows(SB, "allowed.test", "tls")} == {"egress.mode:allow_all"}

    # Explain names the rule, through the API.
    status, explained = api(env, "GET", f"/v1/sandboxes/{SB}/explain?host=denied.test:443&address=198.18.1.2")
    assert status == 200, explained
    assert (explained["allowed"], explained["rule"]) == (False, "deny_hosts denied.test"), explained
    assert explained["policy"]["egress"]["deny_hosts"] == ["later.test", "denied.test"], explained


@pytest.mark.root
def test_dns_answers_nxdomain_naming_the_entry_for_a_denied_name(denying: EgressEnv) -> None:
    env = denying
    for name in ("denied.test", "later.test"):
        for transport in ((), ("+tcp",)):
            answer = env.dig(SB, "@198.18.1.2", *transport, name, "A")
            assert "status: NXDOMAIN" in answer, answer
            assert "EDE: 15 (Blocked)" in answer and f"denied by deny_hosts {name}" in answer, answer
    assert env.dig(SB, "@198.18.1.2", "allowed.test", "A", "+short").split() == ["198.18.1.1"]
    assert env.dig(SB, "@2001:db8:1::2", "allowed.test", "AAAA", "+short").split() == ["2001:db8:1::1"]
    blocked = [q for q in env.dns_log(SB) if q["name"] == "denied.test"]
    assert blocked and blocked[-1]["rcode"] == "NXDOMAIN" and not blocked[-1]["allowed"], blocked


@pytest.mark.root
def test_a_host_port_entry_allows_its_port_and_refuses_another(denying: EgressEnv) -> None:
    env = denying
    status, answer = api(env, "PATCH", "/v1/sandboxes/sb4", {"egress": {"allow_hosts": ["allowed.test:443"]}})
    assert status == 200, answer
    assert answer["egress"]["allow_hosts"] == ["allowed.test:443"], answer
    tls = env.curl("sb4", "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
    assert tls.stdout.strip() == "ORIGIN 198.18.1.1 host=allowed.test sni=allowed.test path=/", tls.stderr
    http = env.curl("sb4", "http://allowed.test/", "-i", *pin("allowed.test", 80, "198.18.1.1"))
    assert http.stdout.startswith("HTTP/1.1 403"), http.stdout
    reason = "port 80 not allowed for host allowed.test (allow_hosts allowed.test:443)"
    assert f"X-Gateway-Reason: {reason}" in http.stdout and "ORIGIN" not in http.stdout, http.stdout
    # DNS has no port: the name resolves.
    assert env.dig("sb4", "@198.18.1.2", "allowed.test", "A", "+short").split() == ["198.18.1.1"]

    # Hostile spellings are refused with their code and the field path, and change nothing.
    for entry, code in (
        ("allowed.test:0", "INVALID_PORT"),
        ("allowed.test:65536", "INVALID_PORT"),
        ("allowed.test:", "INVALID_PORT"),
        ("https://allowed.test:443", "INVALID_HOSTNAME"),
        ("[2001:db8:1::1]:443", "INVALID_HOSTNAME"),
    ):
        status, answer = api(env, "PATCH", "/v1/sandboxes/sb4", {"egress": {"allow_hosts": ["ok.test", entry]}})
        assert (status, answer["code"], answer["field"]) == (400, code, "egress.allow_hosts[1]"), (entry, answer)
    status, record = api(env, "GET", "/v1/sandboxes/sb4")
    assert status == 200 and record["egress"]["allow_hosts"] == ["allowed.test:443"], record
    tls = env.curl("sb4", "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
    assert tls.returncode == 0, tls.stderr


@pytest.mark.root
def test_a_deny_entry_added_to_the_template_cuts_open_connections_to_that_name(denying: EgressEnv) -> None:
    env = denying
    cli = [sys.executable, "-m", "gateway.cli", "--api", API, "template", "update", "no-later", "--data"]

    def template_denies(*hosts: str) -> str:
        result = env.topo.run("gw", [*cli, json.dumps({"egress": {"deny_hosts": list(hosts)}})], check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[0]

    assert template_denies() == "replaced template no-later"  # later.test passes again: the holder's B opens
    with Holder(env, SB) as holder:  # A: allowed.test (TLS), B: later.test (TLS), C: opaque TCP to 198.18.1.1:23
        assert holder.check() == {"A": "alive", "B": "alive", "C": "alive"}
        cut = template_denies("allowed.test")
        assert cut == "replaced template no-later; ended 1 open connection it no longer allows", cut
        # C names no host: under unrestricted it is decided by address, which no name denies (deny_cidrs would).
        assert wait_until(lambda: holder.check() == {"A": "cut", "B": "alive", "C": "alive"}, timeout=5, interval=0.05)
    records = [
        f
        for f in env.logged_flows(SB, "allowed.test", "tls")
        if f["reason"].startswith("cut when the sandbox's policy changed")
    ]
    assert [r["rule"] for r in records] == ["deny_hosts allowed.test"], records
    assert template_denies("later.test") == "replaced template no-later"
