"""Policy revisions end to end: the real `gateway run --data-plane --steer` in the egress world of tests/factory.py,
driven through its API, its CLI and its policy file only.

A sandbox created through the API, narrowed, and restored through the CLI: each write answers with the revision
in force, and the flow records of a request made after each name the revision that decided it (the restored one
is the first again: revision ids are content ids). A hand edit of the policy file is a revision too (source
file), and DNS query records name it. The history is listed newest first and survives a restart of the gateway.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.factory import (
    NAMESPACE_API,
    EgressEnv,
    api,
    egress_env,  # noqa: F401  (the fixture `env`)
    pin,
    wait_until,
)

API = NAMESPACE_API
SB = "sb3"  # attached, and in no record until the test creates it
WIDE = ["allowed.test", "denied.test"]


def request_denied_test(env: EgressEnv) -> tuple[bool, dict[str, Any]]:
    """Whether sb3 reached denied.test over TLS, and the flow record of that connection."""
    before = len(env.logged_flows(SB, "denied.test", "tls"))
    out = env.curl(SB, "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert wait_until(lambda: len(env.logged_flows(SB, "denied.test", "tls")) > before, 5)
    record = env.logged_flows(SB, "denied.test", "tls")[-1]
    return out.stdout.startswith("ORIGIN 198.18.1.2 host=denied.test"), record


def cli(env: EgressEnv, *args: str) -> str:
    shown = env.topo.run("gw", [sys.executable, "-m", "gateway.cli", "--api", API, *args], check=False, timeout=20)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return shown.stdout


def revisions(env: EgressEnv) -> list[tuple[str, str]]:
    status, listed = api(env, "GET", f"/v1/sandboxes/{SB}/revisions")
    assert status == 200, listed
    return [(entry["revision"], entry["source"]) for entry in listed["revisions"]]


@pytest.mark.root
def test_flow_records_name_the_revision_that_decided_through_narrowing_restore_and_a_hand_edit(
    env: EgressEnv,
) -> None:
    record = {"id": SB, "addresses": ["10.75.0.3", "fdd4:1476:6c7e::3"], "profile": "allowlisted",
              "egress": {"allow_hosts": WIDE}}  # fmt: skip
    status, created = api(env, "POST", "/v1/sandboxes", record)
    assert status == 201, created
    wide = created["revision"]
    env.wait_steered(SB)
    reached, flow = request_denied_test(env)
    assert reached and (flow["verdict"], flow["revision"]) == ("allow", wide), flow

    status, narrowed = api(env, "PUT", f"/v1/sandboxes/{SB}", {**record, "egress": {"allow_hosts": ["allowed.test"]}})
    assert status == 200, narrowed
    narrow = narrowed["revision"]
    assert narrow != wide
    reached, flow = request_denied_test(env)
    assert not reached and (flow["verdict"], flow["rule"], flow["revision"]) == ("deny", "default:deny", narrow)

    restored = json.loads(cli(env, "--json", "policy", "restore", SB))
    assert restored["revision"] == wide and restored["egress"] == {"allow_hosts": WIDE}
    reached, flow = request_denied_test(env)
    assert reached and (flow["verdict"], flow["revision"]) == ("allow", wide), flow
    assert revisions(env) == [(wide, "api"), (narrow, "api")]  # accepted again: the newest once more

    # A hand edit of the policy file is a revision of its own, and DNS records name it too.
    data = json.loads(env.policy_file.read_text())
    data["sandboxes"][SB]["labels"] = {"edited": "by-hand"}
    env.write_policies(data)
    assert wait_until(lambda: revisions(env)[0][1] == "file", 5), revisions(env)
    edited = revisions(env)[0][0]
    assert revisions(env) == [(edited, "file"), (wide, "api"), (narrow, "api")]
    answer = env.dig(SB, "@198.18.1.2", "denied.test", "A", "+short")
    assert answer.split() == ["198.18.1.2"], answer
    assert wait_until(lambda: env.logged_flows(SB, "denied.test", "dns"), 5)
    assert env.logged_flows(SB, "denied.test", "dns")[-1]["revision"] == edited
    reached, flow = request_denied_test(env)
    assert reached and flow["revision"] == edited, flow
    status, policy = api(env, "GET", f"/v1/sandboxes/{SB}/policy")
    assert policy["revision"] == edited

    listed = cli(env, "policy", "revisions", SB)
    assert listed.splitlines()[1].split()[:2] == ["*", edited] and " file " in listed.splitlines()[1], listed

    # The history survives a restart (kept next to the policy file), and restoring goes on from it.
    assert env.stop_gateway() == 0
    env.start_gateway()
    assert revisions(env) == [(edited, "file"), (wide, "api"), (narrow, "api")]
    restored = json.loads(cli(env, "--json", "policy", "restore", SB, "--revision", narrow))
    assert restored["revision"] == narrow
    env.wait_steered(SB)
    reached, flow = request_denied_test(env)
    assert not reached and flow["revision"] == narrow, flow
