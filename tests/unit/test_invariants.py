"""[invariants]: assertions and ceilings, checked on every write from every source and enforced by `decide`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.decision import decide
from gateway.errors import GatewayError
from gateway.rules import Rule
from gateway.settings import load_config
from gateway.state import SANDBOX, TEMPLATE, PolicyContext, PolicyState

PUBLIC = "93.184.216.34"

INVARIANTS = """
[invariants]
never_reach = [
  { name = "no-databases", cidrs = ["10.20.0.0/16", "fd00:db::/32"], ports = [5432], reason = "prod data" },
  { name = "no-ssh", ports = [22], labels = { tier = "untrusted" } },
]
ceilings = [{ labels = { tier = "ci" }, template = "ci-ceiling" }]
"""


def state_for(tmp_path: Path, text: str = INVARIANTS) -> PolicyState:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return PolicyState(load_config(path, {}).policy_context())


def record(sid: str = "sb", **fields: Any) -> dict[str, Any]:
    return {"id": sid, "addresses": ["10.75.0.2"], "profile": "allowlisted", **fields}


def write(state: PolicyState, raw: dict[str, Any]) -> None:
    """A sandbox write as a store makes it: checked completely, then applied."""
    sandbox = state.parse_sandbox(raw)
    state.check_sandbox(sandbox, create=None)
    state.set_sandbox(sandbox)


def write_template(state: PolicyState, raw: dict[str, Any]) -> None:
    template = state.parse_template(raw)
    state.check_template(template, create=None)
    state.set_template(template)


def refused(state: PolicyState, raw: dict[str, Any], code: str, field: str) -> str:
    before = state.records()
    with pytest.raises(GatewayError) as caught:
        write(state, raw)
    assert (caught.value.code, caught.value.field) == (code, field), caught.value
    assert state.records() == before  # nothing changed
    return caught.value.message


# --------------------------------------------------------------------------- the section


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('never_reach = [{ name = "x" }]', "invariants.never_reach[0]"),
        ('never_reach = [{ name = "gateway-services", ports = [1] }]', "invariants.never_reach[0].name"),
        ('never_reach = [{ name = "Bad Name", ports = [1] }]', "invariants.never_reach[0].name"),
        ('never_reach = [{ name = "a", ports = [1] }, { name = "a", ports = [2] }]', "invariants.never_reach[1].name"),
        ('never_reach = [{ name = "a", ports = [0] }]', "invariants.never_reach"),
        ('never_reach = [{ name = "a", cidrs = ["10.0.0.0/33"] }]', "invariants.never_reach"),
        ('never_reach = [{ name = "a", ports = [1], colour = "red" }]', "invariants.never_reach"),
        ('ceilings = [{ labels = {}, template = "t" }]', "invariants.ceilings[0].labels"),
        ('ceilings = [{ labels = { a = "b" }, template = "not a name" }]', "invariants.ceilings[0].template"),
    ],
)
def test_a_bad_invariant_is_a_config_error_naming_the_option(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(GatewayError) as caught:
        state_for(tmp_path, f"[invariants]\n{text}\n")
    assert caught.value.code == "CONFIG_INVALID"
    assert (caught.value.field or "").startswith(where), caught.value


# --------------------------------------------------------------------------- never_reach


@pytest.mark.parametrize(
    ("egress", "field"),
    [
        ({"allow_cidrs": ["10.0.0.0/8"]}, "egress.allow_cidrs[0]"),  # wider than the assertion
        ({"allow_cidrs": ["10.20.3.4/32"]}, "egress.allow_cidrs[0]"),  # inside it
        ({"allow_cidrs": ["192.0.2.0/24", "10.20.0.0/16"], "allow_ports": [80, 5432]}, "egress.allow_cidrs[1]"),
        ({"allow_cidrs": ["fd00::/8"]}, "egress.allow_cidrs[0]"),
    ],
)
def test_a_record_granting_a_forbidden_destination_is_refused(
    tmp_path: Path, egress: dict[str, Any], field: str
) -> None:
    state = state_for(tmp_path)
    message = refused(state, record(egress=egress), "INVARIANT_VIOLATED", field)
    assert "no-databases" in message and "prod data" in message


def test_a_record_that_avoids_the_forbidden_ports_or_networks_is_accepted(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    write(state, record(egress={"allow_cidrs": ["10.0.0.0/8"], "allow_ports": [443]}))
    write(state, record("other", addresses=["10.75.0.3"], egress={"allow_cidrs": ["10.30.0.0/16"]}))
    assert set(state.sandboxes) == {"sb", "other"}


@pytest.mark.parametrize(
    ("egress", "field"),
    [
        ({"allow_hosts": ["git.example.com:22"]}, "egress.allow_hosts[0]"),
        ({"allow_hosts": ["git.example.com"], "host_ports": [443, 22]}, "egress.host_ports[1]"),
        ({"allow_cidrs": ["192.0.2.0/24"], "allow_ports": [22]}, "egress.allow_cidrs[0]"),
    ],
)
def test_a_port_assertion_applies_to_the_sandboxes_with_its_labels(
    tmp_path: Path, egress: dict[str, Any], field: str
) -> None:
    state = state_for(tmp_path)
    refused(state, record(labels={"tier": "untrusted"}, egress=egress), "INVARIANT_VIOLATED", field)
    write(state, record(labels={"tier": "trusted"}, egress=egress))  # not selected: its labels differ


def test_decide_refuses_a_forbidden_destination_whatever_allows_it(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    write(state, record(egress={"allow_hosts": ["db.example.com"], "enforcement": "report"}))
    write(state, record("open", addresses=["10.75.0.9"], profile="unrestricted"))
    for sid in ("sb", "open"):
        policy = state.compiled[sid]
        for address in ("10.20.1.1", "::ffff:10.20.1.1", "fd00:db::5"):
            verdict = decide(policy, "db.example.com", address, 5432, "tcp")
            assert (verdict.allowed, verdict.rule, verdict.detail) == (False, Rule.INVARIANT, "no-databases")
            assert "prod data" in verdict.reason
        assert decide(policy, "db.example.com", "10.20.1.1", 443, "tls").rule is not Rule.INVARIANT
        assert decide(policy, "db.example.com", PUBLIC, 5432, "tcp").allowed


def test_records_from_outside_that_break_an_invariant_keep_the_last_good_one(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    write(state, record(egress={"allow_cidrs": ["10.30.0.0/16"]}))
    rejection = state.apply_external(SANDBOX, "sb", record(egress={"allow_cidrs": ["10.20.0.0/16"]}))
    assert rejection is not None and rejection.error.code == "INVARIANT_VIOLATED"
    assert [str(n) for n in state.sandboxes["sb"].egress.allow_cidrs or ()] == ["10.30.0.0/16"]


def test_a_template_write_that_would_make_a_sandbox_break_an_invariant_is_refused(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    write_template(state, {"name": "base", "egress": {"allow_hosts": ["example.com"]}})
    write(state, record(template="base"))
    with pytest.raises(GatewayError) as caught:
        write_template(state, {"name": "base", "egress": {"allow_cidrs": ["10.20.0.0/24"]}})
    assert (caught.value.code, caught.value.field) == ("INVARIANT_VIOLATED", "egress.allow_cidrs[0]")
    assert "'sb'" in caught.value.message
    assert state.templates["base"].egress.allow_hosts == ("example.com",)
    rejection = state.apply_external(TEMPLATE, "base", {"name": "base", "egress": {"allow_cidrs": ["10.20.0.0/24"]}})
    assert rejection is not None and rejection.error.code == "INVARIANT_VIOLATED"
    # Set by the template, refused at the sandbox's write with where it comes from.
    write_template(state, {"name": "wide", "egress": {"allow_cidrs": ["10.0.0.0/8"]}})
    message = refused(
        state,
        record("b", addresses=["10.75.0.4"], template="wide"),
        "INVARIANT_VIOLATED",
        "template",
    )
    assert "set by template 'wide'" in message


def test_the_gateway_services_are_never_reachable(tmp_path: Path) -> None:
    state = state_for(tmp_path, '[api]\nport = 8471\n[store]\nredis_url = "redis://10.9.0.7:6390/0"\n')
    for aimed in ("127.0.0.0/8", "127.0.0.2/32", "10.9.0.7/32"):
        message = refused(state, record(egress={"allow_cidrs": [aimed]}), "INVARIANT_VIOLATED", "egress.allow_cidrs[0]")
        assert "gateway-services" in message
    write(state, record(egress={"allow_cidrs": ["0.0.0.0/0"]}))  # broad: accepted, and kept off the services
    policy = state.compiled["sb"]
    for address, port in (("127.0.0.2", 8471), ("127.0.0.1", 15080), ("10.9.0.7", 6390), ("::1", 8471)):
        assert decide(policy, None, address, port, "tcp").rule is Rule.INVARIANT, (address, port)
    assert decide(policy, None, PUBLIC, 8471, "tcp").rule is Rule.ALLOW_CIDRS


# --------------------------------------------------------------------------- ceilings

CEILING = {
    "name": "ci-ceiling",
    "egress": {
        "allow_hosts": ["pypi.org", "*.pythonhosted.org", "api.example.com:8443"],
        "presets": ["git-hosts"],
        "allow_cidrs": ["192.0.2.0/24"],
        "allow_ports": [443],
        "deny_hosts": ["evil.pythonhosted.org"],
    },
    "limits": {"bandwidth_mbit": 50},
}


def ci_state(tmp_path: Path, **ceiling: Any) -> PolicyState:
    state = state_for(tmp_path)
    write_template(state, {**CEILING, **ceiling})
    return state


def ci(sid: str = "sb", **fields: Any) -> dict[str, Any]:
    return record(sid, labels={"tier": "ci"}, **fields)


def test_a_sandbox_within_its_ceiling_is_accepted(tmp_path: Path) -> None:
    state = ci_state(tmp_path)
    write(
        state,
        ci(
            egress={
                "allow_hosts": ["pypi.org", "files.pythonhosted.org", "*.pythonhosted.org", "api.example.com:8443"],
                "allow_cidrs": ["192.0.2.128/25"],
                "allow_ports": [443],
            },
            limits={"bandwidth_mbit": 10},
        ),
    )
    write(state, ci("narrow", addresses=["10.75.0.5"], egress={"allow_hosts": [], "allow_internet": False}))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"egress": {"allow_hosts": ["pypi.org", "example.net"]}}, "egress.allow_hosts[1]"),
        ({"egress": {"allow_hosts": ["*.pypi.org"]}}, "egress.allow_hosts[0]"),  # a wildcard the ceiling lacks
        ({"egress": {"allow_hosts": ["*.example.org"]}}, "egress.allow_hosts[0]"),
        ({"egress": {"allow_hosts": ["api.example.com"]}}, "egress.allow_hosts[0]"),  # every port, not 8443
        ({"egress": {"allow_hosts": ["api.example.com:9443"]}}, "egress.allow_hosts[0]"),
        ({"egress": {"allow_hosts": ["evil.pythonhosted.org"]}}, "egress.allow_hosts[0]"),  # the ceiling denies it
        ({"egress": {"presets": ["package-registries"]}}, "egress.presets[0]"),
        ({"egress": {"allow_cidrs": ["192.0.0.0/16"]}}, "egress.allow_cidrs[0]"),
        ({"egress": {"allow_cidrs": ["192.0.2.0/24"], "allow_ports": [443, 80]}}, "egress.allow_ports"),
        ({"egress": {"allow_cidrs": ["192.0.2.0/24"]}}, "egress.allow_ports"),  # any port
        ({"egress": {"enforcement": "report"}}, "egress.enforcement"),
        ({"limits": {"bandwidth_mbit": 51}}, "limits.bandwidth_mbit"),
        ({"profile": "unrestricted"}, "egress.mode"),
    ],
)
def test_a_sandbox_widening_its_label_ceiling_is_refused(tmp_path: Path, fields: dict[str, Any], field: str) -> None:
    state = ci_state(tmp_path)
    message = refused(state, ci(**fields), "CEILING_EXCEEDED", field)
    assert "ci-ceiling" in message


def test_a_template_marked_ceiling_bounds_the_sandboxes_naming_it(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    write_template(state, {"name": "team", "ceiling": True, "egress": {"allow_hosts": ["pypi.org"]}})
    write(state, record(template="team", egress={"allow_hosts": []}))  # narrower: fine
    refused(
        state,
        record(template="team", egress={"allow_hosts": ["pypi.org", "x.example"]}),
        "CEILING_EXCEEDED",
        "egress.allow_hosts[1]",
    )
    # Unmarked, the same template is a base a sandbox may replace fields of.
    write_template(state, {"name": "team", "egress": {"allow_hosts": ["pypi.org"]}})
    write(state, record(template="team", egress={"allow_hosts": ["x.example"]}))


def test_narrowing_a_ceiling_narrows_its_sandboxes_at_once(tmp_path: Path) -> None:
    state = ci_state(tmp_path)
    write(state, ci(egress={"allow_hosts": ["pypi.org", "files.pythonhosted.org"]}, limits={"bandwidth_mbit": 40}))
    assert decide(state.compiled["sb"], "files.pythonhosted.org", PUBLIC, 443, "tls").allowed
    narrowed = {
        **CEILING,
        "egress": {**CEILING["egress"], "allow_hosts": ["pypi.org"]},
        "limits": {"bandwidth_mbit": 5},
    }
    before = state.compiled["sb"].revision
    write_template(state, narrowed)  # accepted: narrowing a ceiling is what it is for
    policy = state.compiled["sb"]
    assert policy.revision != before  # a new revision of the sandbox, which flow records name
    verdict = decide(policy, "files.pythonhosted.org", PUBLIC, 443, "tls")
    assert (verdict.allowed, verdict.rule, verdict.detail) == (False, Rule.CEILING, "ci-ceiling")
    assert decide(policy, "files.pythonhosted.org", None, None, "dns").rule is Rule.CEILING
    assert decide(policy, "pypi.org", PUBLIC, 443, "tls").allowed
    assert policy.limits.bandwidth_mbit == 5
    # The sandbox's next write must fit the ceiling as it is now.
    refused(
        state,
        ci(egress={"allow_hosts": ["pypi.org", "files.pythonhosted.org"]}),
        "CEILING_EXCEEDED",
        "egress.allow_hosts[1]",
    )


def test_a_ceiling_keeps_its_denials_and_its_address_rules_at_run_time(tmp_path: Path) -> None:
    state = ci_state(tmp_path, egress={**CEILING["egress"], "deny_cidrs": ["192.0.2.7/32"]})
    write(
        state, ci(egress={"allow_hosts": ["*.pythonhosted.org"], "allow_cidrs": ["192.0.2.0/24"], "allow_ports": [443]})
    )
    policy = state.compiled["sb"]
    assert decide(policy, "evil.pythonhosted.org", PUBLIC, 443, "tls").rule is Rule.CEILING
    assert decide(policy, None, "192.0.2.7", 443, "tcp").rule is Rule.CEILING
    assert decide(policy, None, "192.0.2.8", 443, "tcp").rule is Rule.ALLOW_CIDRS


def test_a_ceiling_template_must_exist_and_cannot_go_while_it_bounds_a_sandbox(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    message = refused(state, ci(), "CEILING_TEMPLATE_NOT_FOUND", "labels")
    assert "ci-ceiling" in message
    write(state, record(labels={"tier": "dev"}))  # other labels: no ceiling
    write_template(state, CEILING)
    write(state, ci("c1", addresses=["10.75.0.8"]))
    with pytest.raises(GatewayError) as caught:
        state.check_remove_template("ci-ceiling")
    assert caught.value.code == "TEMPLATE_IN_USE"


def test_a_ceilings_inspect_entries_stay_with_its_sandboxes(tmp_path: Path) -> None:
    inspect = [{"hosts": ["api.example.com"], "ports": [443], "methods": ["GET"]}]
    state = ci_state(tmp_path, egress={**CEILING["egress"], "inspect": inspect})
    write(state, ci(egress={"inspect": inspect}))
    assert decide(state.compiled["sb"], "api.example.com", PUBLIC, 443, "tls").rule is Rule.INSPECT
    refused(state, ci(egress={"inspect": [], "allow_hosts": ["pypi.org"]}), "CEILING_EXCEEDED", "egress.inspect")


# --------------------------------------------------------------------------- a reload puts new invariants in force


def context_of(tmp_path: Path, text: str) -> PolicyContext:
    """The policy context a reload of a config file with `text` puts in force."""
    path = tmp_path / "reloaded.toml"
    path.write_text(text)
    return load_config(path, {}).policy_context()


def test_reloaded_assertions_hold_at_once_and_records_breaking_them_stay_reported(tmp_path: Path) -> None:
    state = state_for(tmp_path, "")
    write(state, record(egress={"allow_cidrs": ["10.20.0.0/16"]}))
    write(state, record("other", addresses=["10.75.0.3"], egress={"allow_cidrs": ["10.30.0.0/16"]}))
    cut: list[str] = []
    state.change_listeners.append(lambda sid: cut.append(sid) or 1)
    before = state.compiled["sb"]
    assert decide(before, None, "10.20.1.1", 5432, "tcp").allowed
    found = state.set_context(context_of(tmp_path, INVARIANTS))
    assert [(r.key, r.error.code, r.error.field) for r in found] == [
        ("sb", "INVARIANT_VIOLATED", "egress.allow_cidrs[0]")
    ]
    assert state.violations == {"sb": found[0]}
    assert cut == ["other", "sb"] and state.last_cut == 2  # the live cut looked at each sandbox
    verdict = decide(state.compiled["sb"], None, "10.20.1.1", 5432, "tcp")  # the record stays, held to the assertion
    assert (verdict.allowed, verdict.rule, verdict.detail) == (False, Rule.INVARIANT, "no-databases")
    assert state.sandboxes["sb"].egress.allow_cidrs and state.compiled["sb"].revision == before.revision
    # Every later write is checked against them; a write that passes replaces the violator.
    refused(state, record(egress={"allow_cidrs": ["10.20.0.0/24"]}), "INVARIANT_VIOLATED", "egress.allow_cidrs[0]")
    write(state, record(egress={"allow_cidrs": ["10.30.0.0/16"]}))
    assert state.violations == {}
    # A reload that drops them: the next connection passes again.
    state.set_context(context_of(tmp_path, ""))
    write(state, record(egress={"allow_cidrs": ["10.20.0.0/16"]}))
    assert decide(state.compiled["sb"], None, "10.20.1.1", 5432, "tcp").allowed


def test_a_reloaded_ceiling_bounds_its_sandboxes_at_once_and_is_a_new_revision_from_the_config(tmp_path: Path) -> None:
    state = state_for(tmp_path, "")
    write_template(state, CEILING)
    write(state, ci(egress={"allow_hosts": ["pypi.org", "other.example"]}))
    before = state.compiled["sb"].revision
    assert decide(state.compiled["sb"], "other.example", PUBLIC, 443, "tls").allowed
    (found,) = state.set_context(context_of(tmp_path, INVARIANTS))
    assert (found.key, found.error.code, found.error.field) == ("sb", "CEILING_EXCEEDED", "egress.allow_hosts[1]")
    policy = state.compiled["sb"]
    verdict = decide(policy, "other.example", PUBLIC, 443, "tls")
    assert (verdict.allowed, verdict.rule, verdict.detail) == (False, Rule.CEILING, "ci-ceiling")
    assert decide(policy, "pypi.org", PUBLIC, 443, "tls").allowed
    entry = state.history.entries("sb")[0]
    assert policy.revision != before and (entry.revision, entry.source) == (policy.revision, "config")
    # A ceiling naming a template that does not exist fails closed: reported, and nothing passes.
    state.set_context(
        context_of(tmp_path, '[invariants]\nceilings = [{ labels = { tier = "ci" }, template = "gone" }]\n')
    )
    assert state.violations["sb"].error.code == "CEILING_TEMPLATE_NOT_FOUND"
    assert not decide(state.compiled["sb"], "pypi.org", PUBLIC, 443, "tls").allowed


def test_a_reload_reports_what_it_made_invalid_not_what_a_narrowed_ceiling_template_left(tmp_path: Path) -> None:
    state = ci_state(tmp_path)
    write(state, ci(egress={"allow_hosts": ["pypi.org", "files.pythonhosted.org"]}))
    write_template(state, {**CEILING, "egress": {**CEILING["egress"], "allow_hosts": ["pypi.org"]}})
    assert state.set_context(context_of(tmp_path, INVARIANTS + "\n")) == []  # nothing new in force
    assert state.violations == {}
    assert decide(state.compiled["sb"], "files.pythonhosted.org", PUBLIC, 443, "tls").rule is Rule.CEILING
