"""`gateway policy diff` end to end: the real `gateway run --data-plane --steer` in the egress world of
tests/factory.py, driven through its API and CLI only.

A sandbox created through the API makes real connections (HTTPS, HTTP, a DNS question; one denied). Its flow
records reach the audit batches; `gateway policy diff` with a narrower candidate lists what it would newly deny,
grouped by name, port and protocol with the rule that decides under the candidate, and a wider one what it would
newly allow. Nothing is applied: the record, the policy file and the flow records stay as they were, and the
connection the candidate would deny still passes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.factory import (
    BANNER_CLIENT,
    NAMESPACE_API,
    EgressEnv,
    api,
    egress_env,  # noqa: F401  (the fixture `env`)
    pin,
    wait_until,
)

API = NAMESPACE_API
SB = "sb3"  # attached, and in no record until the test creates it
RECORD = {
    "id": SB,
    "addresses": ["10.75.0.3", "fdd4:1476:6c7e::3"],
    "profile": "allowlisted",
    "egress": {"allow_hosts": ["allowed.test", "later.test"]},
}


def diff_cli(env: EgressEnv, candidate: dict[str, Any], *args: str) -> tuple[int, str, str]:
    """`gateway policy diff SB --file FILE ARGS` in the gateway's namespace: (exit code, stdout, stderr)."""
    path = Path(env.workdir) / "candidate.json"
    path.write_text(json.dumps(candidate))
    cli = [sys.executable, "-m", "gateway.cli", "--api", API, "policy", "diff", SB, "--file", str(path), *args]
    out = env.topo.run("gw", cli, check=False, timeout=30)
    return out.returncode, out.stdout, out.stderr


def sandbox_flows(env: EgressEnv) -> list[dict[str, Any]]:
    return [f for f in env.flows() if f["sandbox"] == SB]


def groups(answer: dict[str, Any], key: str) -> list[tuple[str | None, int | None, str, int, str]]:
    rows = [(g["name"], g["port"], g["protocol"], g["count"], g["rule"]) for g in answer[key]]
    return sorted(rows, key=lambda row: (row[0] or "", row[2]))


@pytest.mark.root
def test_policy_diff_lists_what_a_narrower_candidate_would_deny_and_applies_nothing(env: EgressEnv) -> None:
    status, answer = api(env, "POST", "/v1/sandboxes", RECORD)
    assert status == 201, answer

    def later() -> bool:
        return env.curl(SB, "https://later.test/", *pin("later.test", 443, "198.18.1.3"), timeout=2).returncode == 0

    assert wait_until(later, timeout=10, interval=0.2)  # the gateway steers the new sandbox within about a second
    allowed = env.curl(SB, "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
    assert allowed.stdout.startswith("ORIGIN 198.18.1.1 host=allowed.test"), allowed.stderr
    http = env.curl(SB, "http://later.test/p", *pin("later.test", 80, "198.18.1.3"))
    assert http.stdout.startswith("ORIGIN 198.18.1.3 host=later.test"), http.stdout + http.stderr
    denied = env.curl(SB, "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert denied.returncode != 0 and "alert access denied" in denied.stderr.lower(), denied.stderr
    assert env.dig(SB, "@198.18.1.2", "later.test", "A", "+short").split() == ["198.18.1.3"]

    # The diff reads the audit batches: wait until the flush has written every one of those records.
    def recorded() -> bool:
        seen = {(f["hostname"], f["protocol"]) for f in sandbox_flows(env)}
        return seen >= {("later.test", "tls"), ("later.test", "http"), ("later.test", "dns"), ("allowed.test", "tls"),
                        ("denied.test", "tls")}  # fmt: skip

    assert wait_until(recorded, timeout=10, interval=0.2), sandbox_flows(env)
    flows_before = sandbox_flows(env)
    file_before = env.policy_file.read_bytes()
    _, record_before = api(env, "GET", f"/v1/sandboxes/{SB}")
    later_tls = len([f for f in flows_before if (f["hostname"], f["protocol"]) == ("later.test", "tls")])

    narrower = {**RECORD, "egress": {"allow_hosts": ["allowed.test"]}}
    code, out, err = diff_cli(env, narrower, "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert groups(answer, "newly_denied") == [
        ("later.test", None, "dns", 1, "default:deny"),
        ("later.test", 80, "http", 1, "default:deny"),
        ("later.test", 443, "tls", later_tls, "default:deny"),
    ]
    assert all(g["recorded_rule"] == "allow_hosts later.test" for g in answer["newly_denied"])
    tls_group = next(g for g in answer["newly_denied"] if g["protocol"] == "tls")
    assert tls_group["addresses"] == ["198.18.1.3"] and tls_group["first_seen_us"] <= tls_group["last_seen_us"]
    assert answer["newly_allowed"] == [] and answer["unchanged_denied"] >= 1 and answer["unchanged_allowed"] >= 1

    # The same through the table a person reads.
    code, table, err = diff_cli(env, narrower, "--since", "1h")
    assert code == 0, err
    assert f"newly denied: {answer['newly_denied_records']} records" in table and "nothing was applied" in table
    (tls_row,) = [line for line in table.splitlines() if line.startswith("later.test") and " tls " in line]
    assert tls_row.split()[:4] == ["later.test", "443", "tls", str(later_tls)] and "default:deny" in tls_row

    # A wider candidate: what it would newly allow, and by which entry.
    wider = {**RECORD, "egress": {"allow_hosts": ["allowed.test", "later.test", "denied.test"]}}
    code, out, err = diff_cli(env, wider, "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert groups(answer, "newly_allowed") == [("denied.test", 443, "tls", 1, "allow_hosts denied.test")]
    assert answer["newly_denied"] == []

    # A candidate a PUT would refuse is refused the same way, with its code.
    code, _, err = diff_cli(env, {**RECORD, "egress": {"allow_hosts": ["https://later.test"]}})
    assert code == 1 and "INVALID_HOSTNAME" in err and "egress.allow_hosts[0]" in err, err

    # Nothing was applied: the record, the file, the flow records; the connection still passes.
    assert env.policy_file.read_bytes() == file_before
    assert api(env, "GET", f"/v1/sandboxes/{SB}")[1] == record_before
    assert sandbox_flows(env) == flows_before
    assert later()


@pytest.mark.root
def test_a_candidates_deny_cidrs_apply_to_the_address_a_flow_was_dialled_to(env: EgressEnv) -> None:
    """After the test above (SB exists). later.test asked for at allowed.test's address: the gateway dials the
    name's own address, 198.18.1.3, which the candidate's deny_cidrs refuse: the flow is newly denied too."""
    asked = env.curl(SB, "https://later.test/", *pin("later.test", 443, "198.18.1.1"))
    assert asked.stdout.startswith("ORIGIN 198.18.1.3 host=later.test"), asked.stdout + asked.stderr

    def dialled_elsewhere() -> list[dict[str, Any]]:
        return [
            f
            for f in sandbox_flows(env)
            if (f["hostname"], f["protocol"], f["orig_dst_addr"], f["dst_addr"])
            == ("later.test", "tls", "198.18.1.1", "198.18.1.3")
        ]

    assert wait_until(dialled_elsewhere, timeout=10, interval=0.2), sandbox_flows(env)
    later_tls = [f for f in sandbox_flows(env) if (f["hostname"], f["protocol"]) == ("later.test", "tls")]
    candidate = {**RECORD, "egress": {**RECORD["egress"], "deny_cidrs": ["198.18.1.3/32"]}}
    code, out, err = diff_cli(env, candidate, "--json")
    assert code == 0, err
    answer = json.loads(out)
    (tls,) = [g for g in answer["newly_denied"] if (g["name"], g["protocol"]) == ("later.test", "tls")]
    assert (tls["rule"], tls["count"]) == ("deny_cidrs 198.18.1.3/32", len(later_tls)), tls
    assert tls["addresses"] == ["198.18.1.1", "198.18.1.3"], tls  # the addresses the sandbox asked for
    assert not any(g["name"] == "allowed.test" for g in answer["newly_denied"])


@pytest.mark.root
def test_a_connection_to_a_dns_learned_address_is_replayed_on_the_name_it_was_learned_for(env: EgressEnv) -> None:
    """After the tests above (SB exists). Opaque TCP carries no name: the gateway allowed it because SB's own DNS
    answer for allowed.test gave the address; its record names that name, and the diff decides it on it."""
    assert env.dig(SB, "@198.18.1.2", "allowed.test", "A", "+short").split() == ["198.18.1.1"]
    out = env.topo.python(SB, BANNER_CLIENT, "198.18.1.1", "22").strip()
    assert out.startswith("DATA SSH-2.0-TestOrigin 198.18.1.1"), out

    def learned() -> list[dict[str, Any]]:
        return [f for f in sandbox_flows(env) if (f["orig_dst_addr"], f["orig_dst_port"]) == ("198.18.1.1", 22)]

    assert wait_until(learned, timeout=10, interval=0.2), sandbox_flows(env)
    (record,) = learned()
    assert (record["hostname"], record["learned_name"], record["rule"]) == (
        None,
        "allowed.test",
        "allow_hosts allowed.test",
    )
    code, out, err = diff_cli(env, {**RECORD, "egress": {"allow_hosts": ["later.test"]}}, "--json")
    assert code == 0, err
    answer = json.loads(out)
    (opaque,) = [g for g in answer["newly_denied"] if (g["port"], g["protocol"]) == (22, "tcp")]
    assert (opaque["name"], opaque["by_address_only"], opaque["rule"]) == ("allowed.test", False, "default:deny")
    assert opaque["addresses"] == ["198.18.1.1"] and opaque["count"] == 1
    assert not [n for n in answer["not_replayed"] if n["why"] == "learned_name"]
