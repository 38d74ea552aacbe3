"""`gateway policy suggest` end to end: the real `gateway run --data-plane --steer` in the egress world of
tests/factory.py, driven through its API and CLI only.

A sandbox in report mode allows one name and makes real connections the allowlist misses (HTTPS to a name,
HTTP to three sibling names, a DNS question, opaque TCP to an address): they pass, recorded would_deny. `gateway
policy suggest --write FILE` proposes the smallest allowlist (the names, `*.parent:80` for the siblings, a /32
with its port) as the whole record; `policy diff` of it, enforced, newly denies nothing; `sandbox update` applies
it. Enforced, the same connections pass, a new sibling passes by the wildcard, and what the sandbox never did
(another name, the HTTPS name on port 80) is refused.
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
    "egress": {"allow_hosts": ["allowed.test"], "enforcement": "report"},
    "labels": {"team": "rollout"},
}
SIBLINGS = ("a.cdn.test", "b.cdn.test", "c.cdn.test")


def cli(env: EgressEnv, *args: str) -> tuple[int, str, str]:
    """`gateway --api API ARGS` in the gateway's namespace: (exit code, stdout, stderr)."""
    out = env.topo.run("gw", [sys.executable, "-m", "gateway.cli", "--api", API, *args], check=False, timeout=30)
    return out.returncode, out.stdout, out.stderr


def https_later(env: EgressEnv) -> str:
    return env.curl(SB, "https://later.test/", *pin("later.test", 443, "198.18.1.3")).stdout


def http(env: EgressEnv, name: str) -> str:
    return env.curl(SB, f"http://{name}/p", *pin(name, 80, "198.18.1.3")).stdout


def ssh_like(env: EgressEnv) -> str:
    return env.topo.python(SB, BANNER_CLIENT, "198.18.1.4", "22").strip()


def denied_test_refused(env: EgressEnv) -> bool:
    refused = env.curl(SB, "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"), timeout=2)
    return refused.returncode != 0 and "alert access denied" in refused.stderr.lower()


@pytest.mark.root
def test_a_suggestion_applied_allows_what_the_sandbox_did_and_refuses_the_rest(env: EgressEnv) -> None:
    status, answer = api(env, "POST", "/v1/sandboxes", RECORD)
    assert status == 201, answer
    env.wait_steered(SB)

    # Report mode: what the allowlist misses passes.
    assert https_later(env).startswith("ORIGIN 198.18.1.3 host=later.test")
    for name in SIBLINGS:
        assert http(env, name).startswith(f"ORIGIN 198.18.1.3 host={name}")
    assert env.dig(SB, "@198.18.1.2", "later.test", "A", "+short").split() == ["198.18.1.3"]
    assert ssh_like(env).startswith("DATA SSH-2.0-TestOrigin 198.18.1.4")

    def recorded() -> bool:
        seen = {(f["hostname"], f["protocol"], f["verdict"]) for f in env.flows() if f["sandbox"] == SB}
        wanted = {("later.test", "tls"), ("later.test", "dns"), (None, "tcp"), *((n, "http") for n in SIBLINGS)}
        return {(name, protocol, "would_deny") for name, protocol in wanted} <= seen

    assert wait_until(recorded, timeout=10, interval=0.2)

    path = Path(env.workdir) / "suggested.json"
    code, table, err = cli(env, "policy", "suggest", SB, "--since", "1h", "--write", str(path))
    assert code == 0, err
    assert f"the record is in {path}" in table and f"gateway sandbox update {SB} --file FILE" in table
    (wildcard_row,) = [line for line in table.splitlines() if line.startswith("*.cdn.test:80 ")]
    assert wildcard_row.split()[1:5] == ["allow_hosts", "3", "3", "80"] and "a.cdn.test, b.cdn.test" in wildcard_row

    code, out, err = cli(env, "--json", "policy", "suggest", SB, "--since", "1h")
    assert code == 0, err
    suggestion = json.loads(out)
    assert [(e["entry"], e["ports"]) for e in suggestion["entries"]] == [
        ("*.cdn.test:80", [80]),
        ("allowed.test", [443]),
        ("later.test", [443]),  # its TLS flow and its DNS question
        ("198.18.1.4/32", [22]),
    ]
    record: dict[str, Any] = json.loads(path.read_text())
    assert record == suggestion["record"]
    assert record["egress"] == {
        "allow_hosts": ["*.cdn.test:80", "allowed.test", "later.test"],
        "allow_cidrs": ["198.18.1.4/32"],
        "allow_ports": [22],
        "host_ports": [443],
        "enforcement": "report",  # the mode stays: enforcing is the operator's step
    }
    assert record["labels"] == RECORD["labels"]
    _, current = api(env, "GET", f"/v1/sandboxes/{SB}")
    assert current["egress"] == RECORD["egress"]  # nothing was applied

    # Enforced, it newly denies nothing the sandbox did in the window; then it is applied.
    record["egress"]["enforcement"] = "enforce"
    path.write_text(json.dumps(record))
    code, out, err = cli(env, "--json", "policy", "diff", SB, "--file", str(path), "--since", "1h")
    assert code == 0, err
    assert json.loads(out)["newly_denied"] == []
    code, _, err = cli(env, "sandbox", "update", SB, "--file", str(path))
    assert code == 0, err

    assert wait_until(lambda: denied_test_refused(env), timeout=10, interval=0.2)  # enforced, another name refused
    assert https_later(env).startswith("ORIGIN 198.18.1.3 host=later.test")
    for name in (*SIBLINGS, "d.cdn.test"):  # a sibling it never used passes by the wildcard
        assert http(env, name).startswith(f"ORIGIN 198.18.1.3 host={name}")
    assert ssh_like(env).startswith("DATA SSH-2.0-TestOrigin 198.18.1.4")
    assert env.dig(SB, "@198.18.1.2", "later.test", "A", "+short").split() == ["198.18.1.3"]
    refused = env.curl(SB, "http://later.test/p", "-i", *pin("later.test", 80, "198.18.1.3"))
    assert refused.stdout.startswith("HTTP/1.1 403"), refused.stdout  # a port it never used for that name
    assert not http(env, "deep.a.cdn.test").startswith("ORIGIN")  # `*.` matches one label only
