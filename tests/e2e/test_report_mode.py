"""Report mode end to end (`egress.enforcement: report`): the real `gateway run --data-plane --steer` in the egress
world of tests/factory.py, driven through its API only.

A sandbox created through the API inherits report mode from a template: what its allowlist misses (HTTPS, HTTP,
a DNS question, opaque TCP to an address that DNS answer returned) passes and is recorded `would_deny` with the
rule that would deny, in the flow records, the DNS query log and the metrics; explain says so. The guards and
the operator's deny_cidrs still refuse. Switched to enforce through the API, the next request is refused, with
no restart; an unknown enforcement value is refused with its code and changes nothing.
"""

from __future__ import annotations

import sys

import pytest

from tests.factory import (
    BANNER_CLIENT,
    NAMESPACE_API,
    AuditTail,
    EgressEnv,
    api,
    delta,
    egress_env,  # noqa: F401  (the fixture `env`)
    pin,
    scrape,
    wait_until,
)

API = NAMESPACE_API
WOULD_DENY = "report mode: would deny (host not in allowlist)"
SB = "sb3"  # attached, and in no record until the test creates it


@pytest.fixture(scope="module")
def reporting(env: EgressEnv) -> EgressEnv:
    """sb3 in report mode (from its template), allowed allowed.test, denied 198.18.1.3 by deny_cidrs."""
    status, answer = api(env, "POST", "/v1/templates", {"name": "rollout", "egress": {"enforcement": "report"}})
    assert status == 201, answer
    record = {
        "id": SB,
        "addresses": ["10.75.0.3", "fdd4:1476:6c7e::3"],
        "profile": "allowlisted",
        "template": "rollout",
        "egress": {"allow_hosts": ["allowed.test"], "deny_cidrs": ["198.18.1.3/32", "2001:db8:1::3/128"]},
    }
    status, answer = api(env, "POST", "/v1/sandboxes", record)
    assert status == 201, answer
    env.wait_steered(SB)
    return env


@pytest.mark.root
def test_what_the_allowlist_would_deny_passes_and_is_recorded_would_deny(reporting: EgressEnv) -> None:
    env = reporting
    _, before = scrape(env)
    tls = env.curl(SB, "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert tls.stdout.strip() == "ORIGIN 198.18.1.2 host=denied.test sni=denied.test path=/", tls.stderr
    http = env.curl(SB, "http://denied.test/h", "-i", *pin("denied.test", 80, "198.18.1.2"))
    assert http.stdout.startswith("HTTP/1.0 200") or http.stdout.startswith("HTTP/1.1 200"), http.stdout
    assert "ORIGIN 198.18.1.2 host=denied.test sni=- path=/h" in http.stdout and "X-Gateway" not in http.stdout
    allowed = env.curl(SB, "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
    assert allowed.stdout.startswith("ORIGIN 198.18.1.1 host=allowed.test"), allowed.stderr

    for protocol in ("tls", "http"):
        (record,) = env.logged_flows(SB, "denied.test", protocol)
        assert (record["verdict"], record["rule"], record["reason"]) == ("would_deny", "default:deny", WOULD_DENY)
        assert record["dst_addr"] == "198.18.1.2" and record["bytes_down"] > 0, record
    assert {f["verdict"] for f in env.logged_flows(SB, "allowed.test", "tls")} == {"allow"}
    _, after = scrape(env)
    for protocol in ("tls", "http"):
        labels = {"protocol": protocol, "verdict": "would_deny", "rule": "default:deny"}
        assert delta(before, after, "gateway_egress_connections_total", **labels) == 1, (labels, after)

    # Explain says the sandbox is in report mode and what enforce would do.
    status, explained = api(env, "GET", f"/v1/sandboxes/{SB}/explain?host=denied.test:443&address=198.18.1.2")
    assert status == 200, explained
    assert (explained["allowed"], explained["would_deny"], explained["rule"]) == (True, True, "default:deny")
    assert explained["reason"] == WOULD_DENY and explained["policy"]["enforcement"] == "report"
    status, explained = api(env, "GET", f"/v1/sandboxes/{SB}/explain?host=allowed.test:443")
    assert (explained["allowed"], explained["would_deny"]) == (True, False), explained
    cli = [
        sys.executable,
        "-m",
        "gateway.cli",
        "--api",
        API,
        "explain",
        SB,
        "denied.test:443",
        "--address",
        "198.18.1.2",
    ]
    shown = env.topo.run("gw", cli, check=False, timeout=20)
    assert shown.returncode == 0, shown.stderr  # it passes: exit 0, as for ALLOW
    verdict, chain = shown.stdout.split("  precedence chain:\n")
    assert verdict == f"WOULD-DENY  denied.test:443 via 198.18.1.2  {WOULD_DENY}  (rule default:deny)\n", shown.stdout
    # The chain says what would have denied, that report mode let it pass, and what stands.
    assert "default:deny: would deny (host not in allowlist); report mode lets it pass" in chain, chain
    assert chain.rstrip().endswith(f"=> default:deny: {WOULD_DENY}"), chain


@pytest.mark.root
def test_dns_answers_a_would_deny_name_and_its_address_opens_opaque_tcp(reporting: EgressEnv) -> None:
    env = reporting
    # The DNS answer is the real one, and its address then vouches for the name on opaque TCP (port 22 is in no
    # allow_cidrs rule): the record names the name, whose rule would deny it.
    answer = env.dig(SB, "@198.18.1.2", "denied.test", "A", "+short")
    assert answer.split() == ["198.18.1.2"], answer
    (query,) = [q for q in env.dns_log(SB) if q["name"] == "denied.test"]
    assert (query["rcode"], query["allowed"], query["would_deny"], query["rule"]) == (
        "NOERROR",
        True,
        True,
        "default:deny",
    ), query
    (record,) = env.logged_flows(SB, "denied.test", "dns")
    assert (record["verdict"], record["rule"], record["reason"]) == ("would_deny", "default:deny", WOULD_DENY)
    out = env.topo.python(SB, BANNER_CLIENT, "198.18.1.2", "22").strip()
    assert out == "DATA SSH-2.0-TestOrigin 198.18.1.2|ECHO SSH-2.0-TestClient|", out
    (opaque,) = env.logged_flows(SB, orig_dst_addr="198.18.1.2", orig_dst_port=22)
    assert (opaque["verdict"], opaque["rule"], opaque["protocol"]) == ("would_deny", "default:deny", "tcp"), opaque
    assert opaque["reason"] == f"{WOULD_DENY} (address learned from DNS for denied.test)"


@pytest.mark.root
def test_guards_and_deny_cidrs_stay_enforced_in_report_mode(reporting: EgressEnv) -> None:
    env = reporting
    out = env.curl(SB, "http://169.254.169.254/latest/meta-data/", "-i")
    assert out.stdout.startswith("HTTP/1.1 403") and "X-Gateway-Rule: builtin:metadata" in out.stdout, out.stdout
    out = env.curl(SB, "https://meta.test/", *pin("meta.test", 443, "198.18.1.1"))
    assert "alert access denied" in out.stderr.lower(), out.stderr
    out = env.curl(SB, "http://rebind.test/", "-i", *pin("rebind.test", 80, "198.18.1.1"))
    assert out.stdout.startswith("HTTP/1.1 403") and "X-Gateway-Rule: builtin:special" in out.stdout, out.stdout
    out = env.curl(SB, "http://later.test/", "-i", *pin("later.test", 80, "198.18.1.3"))
    assert "X-Gateway-Rule: deny_cidrs 198.18.1.3/32" in out.stdout, out.stdout
    refused = env.logged_flows(SB, verdict="deny")
    assert {f["rule"] for f in refused} >= {"builtin:metadata", "builtin:special", "deny_cidrs 198.18.1.3/32"}
    # explain says what the engine does: the address guards decide before report mode could let it pass.
    for address, rule in (("169.254.169.254", "builtin:metadata"), ("::ffff:169.254.169.254", "builtin:metadata")):
        status, explained = api(env, "GET", f"/v1/sandboxes/{SB}/explain?address={address}&port=80&protocol=http")
        assert status == 200, explained
        assert (explained["allowed"], explained["would_deny"], explained["rule"]) == (False, False, rule), explained


@pytest.mark.root
def test_audit_tail_follows_the_would_deny_records(reporting: EgressEnv) -> None:
    env = reporting
    would_deny = AuditTail(env, "--json", "--would-deny")
    lines = AuditTail(env, SB)  # human lines
    try:
        # The views subscribe when they have connected: until then a record may pass them by.
        def shown() -> bool:
            env.curl(SB, "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
            env.curl(SB, "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
            return bool(would_deny.lines) and any(" WOULD-DENY tls denied.test:443 -> " in line for line in lines.lines)

        assert wait_until(shown, timeout=15, interval=0.2), (would_deny.lines, lines.lines)
        assert {(r["verdict"], r["hostname"]) for r in would_deny.records()} == {("would_deny", "denied.test")}
        (line, *_) = [line for line in lines.lines if " WOULD-DENY tls denied.test:443 -> 198.18.1.2:443 " in line]
        assert " up=" in line and " rule=default:deny " in line and WOULD_DENY in line, line
    finally:
        assert [tail.stop() for tail in (would_deny, lines)] == [0, 0]  # Ctrl-C ends it, exit 0


@pytest.mark.root
def test_switching_to_enforce_through_the_api_refuses_the_next_request(reporting: EgressEnv) -> None:
    env = reporting
    # An unknown value is refused with its code and changes nothing: still report mode.
    status, error = api(env, "PATCH", f"/v1/sandboxes/{SB}", {"egress": {"enforcement": "audit"}})
    assert (status, error["code"], error["field"]) == (400, "INVALID_ENFORCEMENT", "egress.enforcement"), error
    status, error = api(env, "PUT", "/v1/templates/rollout", {"name": "rollout", "egress": {"enforcement": "off"}})
    assert (status, error["code"]) == (400, "INVALID_ENFORCEMENT"), error
    out = env.curl(SB, "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert out.stdout.startswith("ORIGIN 198.18.1.2 host=denied.test"), out.stderr

    status, answer = api(env, "PATCH", f"/v1/sandboxes/{SB}", {"egress": {"enforcement": "enforce"}})
    assert status == 200 and answer["egress"]["enforcement"] == "enforce", answer
    tls = env.curl(SB, "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert tls.returncode != 0 and "alert access denied" in tls.stderr.lower(), tls.stderr
    http = env.curl(SB, "http://denied.test/", "-i", *pin("denied.test", 80, "198.18.1.2"))
    assert http.stdout.startswith("HTTP/1.1 403") and "X-Gateway-Reason: host not in allowlist" in http.stdout
    assert "status: NXDOMAIN" in env.dig(SB, "@198.18.1.2", "denied.test", "A")
    last = env.logged_flows(SB, "denied.test", "tls")[-1]
    assert (last["verdict"], last["rule"], last["reason"]) == ("deny", "default:deny", "host not in allowlist")
