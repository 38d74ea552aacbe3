"""The live cut through `gateway run`: narrowing a sandbox's policy (or deleting it) with the CLI ends, before the
answer, the established connections the new policy no longer allows (a TLS WebSocket, opaque TCP to a DNS-learned
address) and flushes the learned addresses it no longer justifies; widening ends nothing. Same world as
test_egress (its `env` fixture): sb1 is allowlisted for allowed.test, among others."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.factory import BANNER_CLIENT, NAMESPACE_API, EgressEnv, Holder, egress_env, wait_until  # noqa: F401  (the fixture `env`)


def _cli(env: EgressEnv, *args: str) -> str:
    argv = [sys.executable, "-m", "gateway.cli", "--api", NAMESPACE_API, *args]
    result = env.topo.run("gw", argv, check=False, timeout=20)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _hosts(env: EgressEnv, *hosts: str) -> str:
    patch = json.dumps({"egress": {"allow_hosts": list(hosts)}})
    return _cli(env, "sandbox", "patch", "sb1", "--data", patch).splitlines()[0]


def _learn(env: EgressEnv) -> None:
    """sb1's own DNS answer for allowed.test (retried: after sb1 was created again, `--steer` adds its address to
    the table on its next look at the store, and until then its packets are dropped)."""
    dig = ["dig", "+time=1", "+tries=1", "@198.18.1.2", "allowed.test", "A", "+short"]
    assert wait_until(lambda: env.topo.run("sb1", dig, check=False, timeout=10).stdout.split() == ["198.18.1.1"], 10)


def _cut_records(env: EgressEnv) -> list[dict[str, Any]]:
    return [f for f in env.log_events("flow") if f["reason"].startswith("cut when the sandbox's policy changed")]


@pytest.mark.root
def test_narrowing_cuts_what_it_no_longer_allows_and_widening_cuts_nothing(env: EgressEnv) -> None:
    assert _hosts(env, "allowed.test", "later.test") == "patched sandbox sb1"
    _learn(env)  # 198.18.1.1 now vouches for allowed.test: opaque TCP to it (C) is allowed
    with Holder(env, "sb1") as holder:
        assert holder.check() == {"A": "alive", "B": "alive", "C": "alive"}

        assert _hosts(env, "allowed.test", "later.test", "wider.test") == "patched sandbox sb1"  # widening: no cut
        assert holder.check() == {"A": "alive", "B": "alive", "C": "alive"}

        # Narrowing: A (allowed.test over TLS) and C (its learned address) end before the answer; B goes on.
        assert _hosts(env, "later.test") == "patched sandbox sb1; ended 2 open connections it no longer allows"
        assert wait_until(lambda: holder.check() == {"A": "cut", "B": "alive", "C": "cut"}, timeout=5, interval=0.05)
        records = wait_until(lambda: len(_cut_records(env)) == 2 and _cut_records(env), timeout=5)
        assert records and {(r["hostname"], r["dst_port"], r["verdict"]) for r in records} == {
            ("allowed.test", 443, "deny"),
            (None, 23, "deny"),
        }
        assert all(r["bytes_up"] > 0 for r in records if r["dst_port"] == 443)  # they had been relaying
        narrowed = json.loads(_cli(env, "--json", "sandbox", "get", "sb1"))["revision"]
        assert {r["revision"] for r in records} == {narrowed}  # the revision that ended them decided their records

    # The learned address went with the name: allowing the name again does not reopen it without a new answer.
    assert _hosts(env, "allowed.test", "later.test") == "patched sandbox sb1"
    assert env.topo.python("sb1", BANNER_CLIENT, "198.18.1.1", "22").strip() == "RESET"
    _learn(env)
    assert env.topo.python("sb1", BANNER_CLIENT, "198.18.1.1", "22").strip().startswith("DATA SSH-2.0-TestOrigin")


@pytest.mark.root
def test_deleting_the_sandbox_cuts_all_of_its_connections(env: EgressEnv) -> None:
    assert _hosts(env, "allowed.test", "later.test")
    _learn(env)
    with Holder(env, "sb1") as holder:
        assert holder.check() == {"A": "alive", "B": "alive", "C": "alive"}
        record = _cli(env, "--json", "sandbox", "get", "sb1")
        deleted = _cli(env, "sandbox", "delete", "sb1").strip()
        assert deleted == "deleted sandbox sb1; ended 3 open connections it no longer allows"
        assert wait_until(lambda: holder.check() == {"A": "cut", "B": "cut", "C": "cut"}, timeout=5, interval=0.05)
    assert _cli(env, "sandbox", "create", "--data", record).startswith("created sandbox sb1")


@pytest.mark.root
def test_switching_report_mode_to_enforce_cuts_what_was_only_would_deny(env: EgressEnv) -> None:
    report = {"egress": {"allow_hosts": ["allowed.test"], "enforcement": "report"}}
    assert _cli(env, "sandbox", "patch", "sb1", "--data", json.dumps(report)).startswith("patched sandbox sb1\n")
    _learn(env)
    with Holder(env, "sb1") as holder:  # B (later.test) passes only as would_deny
        assert holder.check() == {"A": "alive", "B": "alive", "C": "alive"}
        enforce = json.dumps({"egress": {"enforcement": "enforce"}})
        patched = _cli(env, "sandbox", "patch", "sb1", "--data", enforce).splitlines()[0]
        assert patched == "patched sandbox sb1; ended 1 open connection it no longer allows"
        assert wait_until(lambda: holder.check() == {"A": "alive", "B": "cut", "C": "alive"}, timeout=5, interval=0.05)


@pytest.mark.root
def test_adding_a_deny_hosts_entry_cuts_what_it_now_denies(env: EgressEnv) -> None:
    assert _hosts(env, "allowed.test", "later.test")
    _learn(env)
    with Holder(env, "sb1") as holder:
        assert holder.check() == {"A": "alive", "B": "alive", "C": "alive"}
        earlier = len(_cut_records(env))
        deny = json.dumps({"egress": {"deny_hosts": ["allowed.test"]}})  # allow_hosts still lists it: deny wins
        patched = _cli(env, "sandbox", "patch", "sb1", "--data", deny).splitlines()[0]
        assert patched == "patched sandbox sb1; ended 2 open connections it no longer allows"
        assert wait_until(lambda: holder.check() == {"A": "cut", "B": "alive", "C": "cut"}, timeout=5, interval=0.05)
        cut = lambda: {(r["hostname"], r["dst_port"], r["rule"]) for r in _cut_records(env)[earlier:]}  # noqa: E731
        # The opaque one went with its learned address (flushed with the name), so no name decided it.
        expected = {("allowed.test", 443, "deny_hosts allowed.test"), (None, 23, "default:deny")}
        assert wait_until(lambda: cut() == expected, timeout=5), cut()
    undeny = json.dumps({"egress": {"deny_hosts": None}})  # the merge patch's null removes the field
    assert _cli(env, "sandbox", "patch", "sb1", "--data", undeny).startswith("patched sandbox sb1\n")
