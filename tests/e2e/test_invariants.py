"""The operator's [invariants] end to end: the real `gateway run --data-plane --steer` with a config file that
declares a never_reach assertion and a label ceiling, in the egress world of tests/factory.py, driven through
its API (curl in the gateway's namespace) and its policy file, with curl and dig in the sandboxes.

- An unrestricted sandbox reaches later.test on port 80 but not on 443, which the assertion forbids: the TLS
  connection is refused and its flow record names `invariant no-later`. A write through the API that grants the
  address is refused with INVARIANT_VIOLATED and the assertion; a hand edit of the policy file that does the same
  is rejected (visible in /v1/status) while the last good record stays in force.
- sb4, labelled tier=ci, stays within the template ci-ceiling: a PATCH widening its allow list is refused with
  CEILING_EXCEEDED; narrowing the ceiling through the API cuts sb4's access to the name it dropped at once
  (connections refused with `ceiling ci-ceiling`, DNS NXDOMAIN); the ceiling cannot be deleted while it bounds sb4.
- Last (it rewrites the config file): an assertion added by SIGHUP holds at once for the next connection, ends an
  open one (the live cut) and refuses the next write; sb1, whose record grants it, keeps its record and is
  reported; a bad [invariants] on the next SIGHUP changes nothing; one dropping it lets the connections pass again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.factory import EgressEnv, Holder, api, egress_policies, egress_world, pin, wait_until
from tests.netns import Topology, live_namespaces

INVARIANTS = """
[invariants]
never_reach = [{ name = "no-later", cidrs = ["198.18.1.3/32"], ports = [443], reason = "later.test is production" }]
ceilings = [{ labels = { tier = "ci" }, template = "ci-ceiling" }]
"""
LATER = ("later.test", 443, "198.18.1.3")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressEnv]:
    with Topology(sandboxes=5, origins=4) as topo:
        e = egress_world(topo, tmp_path_factory.mktemp("invariants"))
        e.write_policies(egress_policies())
        e.config_sections = INVARIANTS
        e.start_gateway()
        yield e
    assert live_namespaces(topo.prefix) == []


@pytest.mark.root
def test_a_never_reach_assertion_holds_for_every_write_and_every_connection(env: EgressEnv) -> None:
    # sb2 is unrestricted: the assertion refuses what allow_all would let through, on its port only.
    tls = env.curl("sb2", "https://later.test/", *pin(*LATER))
    assert tls.returncode != 0 and "ORIGIN" not in tls.stdout, tls.stdout
    assert wait_until(lambda: env.logged_flows("sb2", "later.test", "tls"), timeout=5)
    [record] = env.logged_flows("sb2", "later.test", "tls")
    assert (record["verdict"], record["rule"]) == ("deny", "invariant no-later"), record
    assert "later.test is production" in record["reason"], record
    http = env.curl("sb2", "http://later.test/", *pin("later.test", 80, "198.18.1.3"))
    assert http.stdout.startswith("ORIGIN 198.18.1.3"), http.stdout + http.stderr

    # Through the API: refused with the assertion, nothing stored.
    grant = {"egress": {"allow_cidrs": ["198.18.1.0/24"]}}
    status, answer = api(env, "PATCH", "/v1/sandboxes/sb1", grant)
    assert (status, answer["code"], answer["field"]) == (400, "INVARIANT_VIOLATED", "egress.allow_cidrs[0]"), answer
    assert "no-later" in answer["message"] and "later.test is production" in answer["message"], answer
    status, sb1 = api(env, "GET", "/v1/sandboxes/sb1")
    assert status == 200 and sb1["egress"]["allow_cidrs"] == ["198.18.1.4/32"], sb1
    # So is the same grant on the gateway's own API port (the built-in gateway-services assertion).
    status, answer = api(env, "PATCH", "/v1/sandboxes/sb1", {"egress": {"allow_cidrs": ["127.0.0.1/32"]}})
    assert (status, answer["code"]) == (400, "INVARIANT_VIOLATED") and "gateway-services" in answer["message"]

    # A hand edit of the policy file: rejected, the last good record stays in force.
    policies = json.loads(env.policy_file.read_text())
    policies["sandboxes"]["sb4"]["egress"] = {"allow_hosts": ["allowed.test"], "allow_cidrs": ["198.18.1.3/32"]}
    env.write_policies(policies)

    def rejection() -> dict[str, object] | None:
        _, status = api(env, "GET", "/v1/status")
        return next((r for r in status["rejected"] if r["key"] == "sb4"), None)

    assert wait_until(lambda: rejection() is not None, timeout=10)
    found = rejection()
    assert found is not None and (found["code"], found["field"]) == ("INVARIANT_VIOLATED", "egress.allow_cidrs[0]")
    status, sb4 = api(env, "GET", "/v1/sandboxes/sb4")
    assert status == 200 and "allow_cidrs" not in sb4["egress"], sb4
    assert env.curl("sb4", "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1")).returncode == 0
    policies["sandboxes"]["sb4"]["egress"] = {"allow_hosts": ["allowed.test"]}
    env.write_policies(policies)
    assert wait_until(lambda: rejection() is None, timeout=10)


@pytest.mark.root
def test_a_label_ceiling_refuses_widening_and_narrows_its_sandboxes_live(env: EgressEnv) -> None:
    # sb4 gets the label before its ceiling exists: refused, the ceiling must be there first.
    status, answer = api(env, "PATCH", "/v1/sandboxes/sb4", {"labels": {"tier": "ci"}})
    assert (status, answer["code"]) == (400, "CEILING_TEMPLATE_NOT_FOUND"), answer
    ceiling = {"name": "ci-ceiling", "egress": {"allow_hosts": ["allowed.test", "denied.test"]}}
    status, answer = api(env, "POST", "/v1/templates", ceiling)
    assert status == 201, answer
    status, answer = api(env, "PATCH", "/v1/sandboxes/sb4", {"labels": {"tier": "ci"}})
    assert status == 200, answer

    status, answer = api(env, "PATCH", "/v1/sandboxes/sb4", {"egress": {"allow_hosts": ["allowed.test", "meta.test"]}})
    assert (status, answer["code"], answer["field"]) == (400, "CEILING_EXCEEDED", "egress.allow_hosts[1]"), answer
    assert "ci-ceiling" in answer["message"], answer
    status, answer = api(
        env, "PATCH", "/v1/sandboxes/sb4", {"egress": {"allow_hosts": ["allowed.test", "denied.test"]}}
    )
    assert status == 200, answer
    allowed = ("allowed.test", 443, "198.18.1.1")
    assert env.curl("sb4", "https://allowed.test/", *pin(*allowed)).stdout.startswith("ORIGIN 198.18.1.1")

    # Narrowing the ceiling is accepted and narrows sb4 at once: allowed.test is no longer within it.
    status, answer = api(
        env, "PUT", "/v1/templates/ci-ceiling", {**ceiling, "egress": {"allow_hosts": ["denied.test"]}}
    )
    assert status == 200, answer
    tls = env.curl("sb4", "https://allowed.test/", *pin(*allowed))
    assert tls.returncode != 0 and "ORIGIN" not in tls.stdout, tls.stdout
    records = env.logged_flows("sb4", "allowed.test", "tls")
    assert records and records[-1]["verdict"] == "deny" and records[-1]["rule"] == "ceiling ci-ceiling", records[-1]
    answer_text = env.dig("sb4", "@198.18.1.2", "allowed.test", "A")
    assert "status: NXDOMAIN" in answer_text and "ci-ceiling" in answer_text, answer_text
    assert env.curl("sb4", "https://denied.test/", *pin("denied.test", 443, "198.18.1.2")).returncode == 0

    status, answer = api(env, "DELETE", "/v1/templates/ci-ceiling")
    assert (status, answer["code"]) == (409, "TEMPLATE_IN_USE"), answer
    status, explained = api(env, "GET", "/v1/sandboxes/sb4/explain?host=allowed.test:443&address=198.18.1.1")
    assert status == 200 and (explained["allowed"], explained["rule"]) == (False, "ceiling ci-ceiling"), explained


#: INVARIANTS with one more assertion, added by a reload: sb2 (unrestricted) reaches 198.18.1.1 on ports 80 and 23
#: before it; sb1's record grants 198.18.1.4 (allow_cidrs, any port).
NO_FIRST = INVARIANTS.replace(
    "never_reach = [",
    'never_reach = [{ name = "no-first", cidrs = ["198.18.1.1/32", "198.18.1.4/32"], ports = [80, 23] }, ',
)


@pytest.mark.root
def test_an_assertion_added_by_sighup_holds_at_once_for_connections_and_writes(env: EgressEnv) -> None:
    assert env.gateway is not None
    plain = ("allowed.test", 80, "198.18.1.1")
    assert env.curl("sb2", "http://allowed.test/", *pin(*plain)).stdout.startswith("ORIGIN 198.18.1.1")
    fourth = env.curl("sb1", "http://198.18.1.4/")
    assert fourth.stdout.startswith("ORIGIN 198.18.1.4"), fourth.stdout + fourth.stderr
    applied = lambda: env.log_events("policies.recompiled")  # noqa: E731
    failed = lambda: env.log_events("config.reload_failed")  # noqa: E731
    with Holder(env, "sb2", {"C": ["opaque", "198.18.1.1", 23]}) as holder:
        assert holder.check() == {"C": "alive"}
        env.reload(NO_FIRST)
        assert wait_until(lambda: len(applied()) == 1, timeout=10), env.log_file.read_text()[-2000:]
        assert applied()[0]["never_reach"] == ["gateway-services", "no-first", "no-later"]
        assert holder.check() == {"C": "cut"}  # the open connection it forbids, ended at once
    refused = env.curl("sb2", "http://allowed.test/", *pin(*plain))
    assert "ORIGIN" not in refused.stdout, refused.stdout
    record = env.logged_flows("sb2", "allowed.test", "http")[-1]
    assert (record["verdict"], record["rule"]) == ("deny", "invariant no-first"), record
    assert "ORIGIN" not in env.curl("sb1", "http://198.18.1.4/").stdout
    # sb1's record grants what it forbids: kept in force (held to it, above), reported in the status and the log.
    _, status = api(env, "GET", "/v1/status")
    violating = [(v["key"], v["code"], v["field"]) for v in status["violating"]]
    assert violating == [("sb1", "INVARIANT_VIOLATED", "egress.allow_cidrs[0]")], status["violating"]
    assert [(e["sandbox"], e["code"]) for e in env.log_events("invariants.violated")] == [("sb1", "INVARIANT_VIOLATED")]
    status_code, sb1 = api(env, "GET", "/v1/sandboxes/sb1")
    assert status_code == 200 and sb1["egress"]["allow_cidrs"] == ["198.18.1.4/32"], sb1
    # Every later write is checked against it.
    status_code, answer = api(env, "PATCH", "/v1/sandboxes/sb4", {"egress": {"allow_cidrs": ["198.18.1.0/24"]}})
    assert (status_code, answer["code"]) == (400, "INVARIANT_VIOLATED") and "no-first" in answer["message"], answer

    # A bad [invariants] on the next SIGHUP changes nothing.
    env.reload('[invariants]\nnever_reach = [{ name = "no-first" }]\n')
    assert wait_until(lambda: len(failed()) == 1, timeout=10)
    assert failed()[0]["code"] == "CONFIG_INVALID" and len(applied()) == 1
    assert "ORIGIN" not in env.curl("sb2", "http://allowed.test/", *pin(*plain)).stdout
    assert env.logged_flows("sb2", "allowed.test", "http")[-1]["rule"] == "invariant no-first"

    # Dropping it: the connections pass again, sb1 is no longer reported.
    env.reload(INVARIANTS)
    assert wait_until(lambda: len(applied()) == 2, timeout=10)
    assert env.curl("sb2", "http://allowed.test/", *pin(*plain)).stdout.startswith("ORIGIN 198.18.1.1")
    assert env.curl("sb1", "http://198.18.1.4/").stdout.startswith("ORIGIN 198.18.1.4")
    _, status = api(env, "GET", "/v1/status")
    assert status["violating"] == []
