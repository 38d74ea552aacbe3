"""A token limited to some sandboxes, through `gateway run --data-plane --steer` with a config file holding it
and a full token: two sandboxes connect, the scoped token's `gateway audit tail` shows only its sandbox's records
while the full token's shows both, and the scoped token's lookup of the other sandbox's denial id is 404."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.factory import AuditTail, EgressEnv, allowlisted, api, egress_world, pin, wait_until
from tests.netns import Topology, live_namespaces

MINE, THEIRS = "tenant-a-1", "other"
FULL_TOKEN = "e2e-full-token-0123456789"
TENANT_TOKEN = "e2e-tenant-token-0123456789"
TOKENS = (
    "[api]\n"
    f'tokens = [{{ name = "ops", token = "{FULL_TOKEN}", scopes = ["sandboxes:read", "audit:read"] }}, '
    f'{{ name = "tenant-a", token = "{TENANT_TOKEN}", scopes = ["sandboxes:read", "audit:read"], '
    'sandboxes = ["tenant-a-*"] }]\n'
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressEnv]:
    with Topology(sandboxes=2, origins=4) as topo:
        e = egress_world(topo, tmp_path_factory.mktemp("scope"))
        e.config_sections = TOKENS
        e.write_policies(allowlisted((MINE, "10.75.0.1", ["allowed.test"]), (THEIRS, "10.75.0.2", ["allowed.test"])))
        e.start_gateway()
        yield e
    assert live_namespaces(topo.prefix) == []


def _denied(env: EgressEnv, sb: str) -> str:
    """sb's plain-HTTP request to a name its allowlist lacks: the 403's denial id."""
    http = env.curl(sb, "http://denied.test/", "-i", *pin("denied.test", 80, "198.18.1.2"))
    assert http.stdout.startswith("HTTP/1.1 403"), http.stdout + http.stderr
    found = re.search(r"^X-Gateway-Denial-Id: ([0-9a-f]{8}-[0-9a-f]{10})\r?$", http.stdout, re.M)
    assert found, http.stdout
    return found.group(1)


@pytest.mark.root
def test_a_scoped_tokens_audit_tail_and_denial_lookups_see_only_its_sandbox(env: EgressEnv) -> None:
    everything = AuditTail(env, "--json", token=FULL_TOKEN)
    tenant = AuditTail(env, "--json", token=TENANT_TOKEN)
    theirs = AuditTail(env, "--json", "--sandbox", THEIRS, token=TENANT_TOKEN)

    def fetch(sb: str) -> bool:
        return env.curl(sb, "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1")).returncode == 0

    # The views subscribe once connected: until each shows a record of MINE, a record may pass them by.
    assert wait_until(lambda: fetch("sb1") and bool(everything.lines) and bool(tenant.lines), timeout=15)
    their_denial = _denied(env, "sb2")
    assert fetch("sb2")
    my_denial = _denied(env, "sb1")

    def sandboxes(tail: AuditTail) -> list[str]:
        return [record["sandbox"] for record in tail.records()]

    def has(tail: AuditTail, denial_id: str) -> bool:
        return any(record.get("denial_id") == denial_id for record in tail.records())

    # Every view gets the records in the order they were decided: once the tenant's shows sb1's last denial,
    # it would have shown the sandbox `other`'s earlier ones, had it been given them.
    assert wait_until(lambda: has(everything, my_denial) and has(tenant, my_denial), timeout=10)
    assert has(everything, their_denial) and THEIRS in sandboxes(everything) and MINE in sandboxes(everything)
    assert set(sandboxes(tenant)) == {MINE}, tenant.lines
    assert theirs.lines == []  # another tenant's sandbox named: nothing, as for an unknown one
    for tail in (everything, tenant, theirs):
        tail.stop()

    status, record = api(env, "GET", f"/v1/denials/{their_denial}", token=TENANT_TOKEN)
    assert (status, record["code"]) == (404, "DENIAL_NOT_FOUND"), record
    status, record = api(env, "GET", f"/v1/denials/{my_denial}", token=TENANT_TOKEN)
    assert (status, record["sandbox"], record["hostname"]) == (200, MINE, "denied.test"), record
    status, record = api(env, "GET", f"/v1/denials/{their_denial}", token=FULL_TOKEN)
    assert (status, record["sandbox"]) == (200, THEIRS), record
    status, listed = api(env, "GET", "/v1/sandboxes", token=TENANT_TOKEN)
    assert (status, [s["id"] for s in listed["sandboxes"]]) == (200, [MINE]), listed
    status, hidden = api(env, "GET", f"/v1/sandboxes/{THEIRS}/audit-batches", token=TENANT_TOKEN)
    assert (status, hidden["code"]) == (404, "SANDBOX_NOT_FOUND"), hidden
