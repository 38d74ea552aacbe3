"""PolicyState: the cross-record rules, the address index, and records written by others."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from gateway.decision import DEFAULT_LIMITS, Verdict, decide
from gateway.errors import Conflict, GatewayError, NotFound
from gateway.presets import BUILTIN_PRESETS, make_preset
from gateway.rules import Rule
from gateway.state import SANDBOX, TEMPLATE, PolicyContext, PolicyState

CONTEXT = PolicyContext(
    (ipaddress.ip_network("10.75.0.0/16"), ipaddress.ip_network("fdd4:1476:6c7e::/48")),
    BUILTIN_PRESETS,
    DEFAULT_LIMITS,
)
PUBLIC = "93.184.216.34"


def record(sid: str, *addresses: str, **fields: Any) -> dict[str, Any]:
    return {"id": sid, "addresses": list(addresses) or ["10.75.0.2"], "profile": "allowlisted", **fields}


def create(state: PolicyState, raw: dict[str, Any]) -> None:
    sandbox = state.parse_sandbox(raw)
    state.check_sandbox(sandbox, create=True)
    state.set_sandbox(sandbox)


def create_template(state: PolicyState, raw: dict[str, Any]) -> None:
    template = state.parse_template(raw)
    state.check_template(template, create=True)
    state.set_template(template)


def allowed(state: PolicyState, sid: str, name: str, port: int = 443) -> bool:
    return decide(state.compiled[sid], name, PUBLIC, port, "tls").allowed


@pytest.fixture
def state() -> PolicyState:
    return PolicyState(CONTEXT)


# --------------------------------------------------------------------------- create / replace / remove


def test_create_indexes_and_compiles(state: PolicyState) -> None:
    create(state, record("a", "10.75.0.2", "fdd4:1476:6c7e::2", egress={"allow_hosts": ["a.com"]}))
    assert set(state.sandboxes) == {"a"}
    assert state.compiled["a"].sandbox_id == "a"
    assert state.policy_for_address("10.75.0.2") is state.compiled["a"]
    assert state.policy_for_address("fdd4:1476:6c7e::2") is state.compiled["a"]
    assert state.policy_for_address("FDD4:1476:6C7E:0::2") is state.compiled["a"]
    assert allowed(state, "a", "a.com")


def test_policy_for_unknown_or_bad_address_is_none(state: PolicyState) -> None:
    create(state, record("a", "10.75.0.2"))
    assert state.policy_for_address("10.75.0.3") is None
    assert state.policy_for_address("fdd4:1476:6c7e::3") is None
    assert state.policy_for_address("not-an-address") is None
    assert state.policy_for_address("") is None


def test_policy_for_ipv4_mapped_source_address(state: PolicyState) -> None:
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; it is the same sandbox.
    create(state, record("a", "10.75.0.2"))
    assert state.policy_for_address("::ffff:10.75.0.2") is state.compiled["a"]


def test_create_twice_is_sandbox_exists(state: PolicyState) -> None:
    create(state, record("a"))
    with pytest.raises(Conflict) as info:
        create(state, record("a", "10.75.0.9"))
    assert (info.value.code, info.value.field, info.value.status) == ("SANDBOX_EXISTS", "id", 409)
    assert state.sandboxes["a"].addresses == (ipaddress.ip_address("10.75.0.2"),)  # unchanged


def test_replace_missing_is_not_found(state: PolicyState) -> None:
    with pytest.raises(NotFound) as info:
        state.check_sandbox(state.parse_sandbox(record("ghost")), create=False)
    assert (info.value.code, info.value.status) == ("SANDBOX_NOT_FOUND", 404)


def test_replace_changes_policy_and_moves_addresses(state: PolicyState) -> None:
    create(state, record("a", "10.75.0.2", egress={"allow_hosts": ["a.com"]}))
    new = state.parse_sandbox(record("a", "10.75.0.7", egress={"allow_hosts": ["b.com"]}))
    state.check_sandbox(new, create=False)
    state.set_sandbox(new)
    assert state.policy_for_address("10.75.0.2") is None
    assert state.policy_for_address("10.75.0.7") is state.compiled["a"]
    assert not allowed(state, "a", "a.com")
    assert allowed(state, "a", "b.com")


def test_profile_is_immutable(state: PolicyState) -> None:
    create(state, record("a"))
    changed = state.parse_sandbox({**record("a"), "profile": "unrestricted"})
    with pytest.raises(Conflict) as info:
        state.check_sandbox(changed, create=False)
    assert (info.value.code, info.value.field) == ("PROFILE_IMMUTABLE", "profile")
    assert "allowlisted -> unrestricted" in info.value.message


def test_template_must_exist(state: PolicyState) -> None:
    with pytest.raises(GatewayError) as info:
        create(state, record("a", template="missing"))
    assert (info.value.code, info.value.field, info.value.status) == ("TEMPLATE_NOT_FOUND", "template", 400)
    assert not state.sandboxes


def test_get_missing_records(state: PolicyState) -> None:
    with pytest.raises(NotFound) as info:
        state.get_template("nope")
    assert info.value.code == "TEMPLATE_NOT_FOUND"
    with pytest.raises(NotFound) as info:
        state.get_sandbox("nope")
    assert info.value.code == "SANDBOX_NOT_FOUND"
    with pytest.raises(NotFound):
        state.remove_sandbox("nope")


@pytest.mark.parametrize("address", ["10.75.0.2", "fdd4:1476:6c7e::2"])
def test_address_in_use(state: PolicyState, address: str) -> None:
    create(state, record("a", "10.75.0.2", "fdd4:1476:6c7e::2"))
    with pytest.raises(Conflict) as info:
        create(state, record("b", "10.75.0.3", address))
    assert (info.value.code, info.value.field) == ("ADDRESS_IN_USE", "addresses[1]")
    assert "'a'" in info.value.message
    assert "b" not in state.sandboxes
    assert state.policy_for_address("10.75.0.3") is None


def test_same_sandbox_may_keep_its_address(state: PolicyState) -> None:
    create(state, record("a", "10.75.0.2"))
    state.check_sandbox(state.parse_sandbox(record("a", "10.75.0.2", "10.75.0.3")), create=False)


def test_remove_frees_the_addresses(state: PolicyState) -> None:
    create(state, record("a", "10.75.0.2"))
    removed = state.remove_sandbox("a")
    assert removed.id == "a"
    assert state.policy_for_address("10.75.0.2") is None
    assert not state.by_address and not state.compiled
    create(state, record("b", "10.75.0.2"))
    assert state.policy_for_address("10.75.0.2") is state.compiled["b"]


def test_the_owner_of_an_address_follows_every_change(state: PolicyState) -> None:
    create(state, record("a", "10.75.0.2"))
    first = state.compiled["a"]
    assert state.policy_for_address("10.75.0.2") is first  # remembered per address text from here on
    assert state.policy_for_address("10.75.0.9") is None
    changed = state.parse_sandbox(record("a", "10.75.0.2", egress={"allow_hosts": ["a.com"]}))
    state.check_sandbox(changed, create=False)
    state.set_sandbox(changed)
    assert state.policy_for_address("10.75.0.2") is state.compiled["a"] is not first
    create(state, record("b", "10.75.0.9"))
    assert state.policy_for_address("10.75.0.9") is state.compiled["b"]  # no one's a moment ago
    state.remove_sandbox("a")
    assert state.policy_for_address("10.75.0.2") is None


def test_explain(state: PolicyState) -> None:
    create(state, record("a", egress={"allow_hosts": ["a.com"]}))
    verdict, compiled = state.explain("a", "a.com", PUBLIC, 443, "tls")
    assert verdict == Verdict(True, "host a.com allowed by allow_hosts a.com", Rule.ALLOW_HOSTS, "a.com")
    assert compiled is state.compiled["a"]
    with pytest.raises(NotFound):
        state.explain("b", "a.com", PUBLIC, 443, "tls")


# --------------------------------------------------------------------------- templates


def test_template_exists_and_not_found(state: PolicyState) -> None:
    create_template(state, {"name": "t"})
    with pytest.raises(Conflict) as info:
        create_template(state, {"name": "t"})
    assert info.value.code == "TEMPLATE_EXISTS"
    with pytest.raises(NotFound) as info:
        state.check_template(state.parse_template({"name": "u"}), create=False)
    assert info.value.code == "TEMPLATE_NOT_FOUND"


def test_template_in_use_cannot_be_removed(state: PolicyState) -> None:
    create_template(state, {"name": "t"})
    create(state, record("a", template="t"))
    create(state, record("b", "10.75.0.3", template="t"))
    with pytest.raises(Conflict) as info:
        state.remove_template("t")
    assert (info.value.code, info.value.field) == ("TEMPLATE_IN_USE", "name")
    assert "2 sandbox(es): a, b" in info.value.message
    assert "t" in state.templates
    state.remove_sandbox("a")
    state.remove_sandbox("b")
    assert state.remove_template("t").name == "t"
    assert not state.templates


def test_template_change_recompiles_dependents(state: PolicyState) -> None:
    create_template(state, {"name": "t", "egress": {"allow_hosts": ["a.com"]}, "limits": {"bandwidth_mbit": 10}})
    create(state, record("uses", template="t"))
    create(state, record("own", "10.75.0.3", template="t", egress={"allow_hosts": ["own.com"]}))
    create(state, record("other", "10.75.0.4", egress={"allow_hosts": ["a.com"]}))
    assert allowed(state, "uses", "a.com") and not allowed(state, "uses", "b.com")
    before_other = state.compiled["other"]

    state.set_template(state.parse_template({"name": "t", "egress": {"allow_hosts": ["b.com"]}}))

    assert allowed(state, "uses", "b.com") and not allowed(state, "uses", "a.com")
    assert state.compiled["uses"].limits.bandwidth_mbit == 100  # the template no longer sets it
    assert allowed(state, "own", "own.com") and not allowed(state, "own", "b.com")  # own field wins
    assert state.compiled["other"] is before_other  # not a dependent: not recompiled
    assert state.policy_for_address("10.75.0.2") is state.compiled["uses"]  # index follows the new object


def test_dependents(state: PolicyState) -> None:
    create_template(state, {"name": "t"})
    create(state, record("b", "10.75.0.3", template="t"))
    create(state, record("a", template="t"))
    create(state, record("c", "10.75.0.4"))
    assert state.dependents("t") == ["a", "b"]


# --------------------------------------------------------------------------- records from outside


def test_apply_external_valid_record(state: PolicyState) -> None:
    assert state.apply_external(SANDBOX, "a", record("a", egress={"allow_hosts": ["a.com"]})) is None
    assert allowed(state, "a", "a.com")
    assert not state.rejections


def test_apply_external_keeps_last_good_and_records_a_rejection(state: PolicyState) -> None:
    state.apply_external(SANDBOX, "a", record("a", egress={"allow_hosts": ["a.com"]}))
    good = state.compiled["a"]

    rejection = state.apply_external(SANDBOX, "a", record("a", egress={"allow_hosts": ["https://a.com"]}))

    assert rejection is not None
    assert (rejection.kind, rejection.key) == (SANDBOX, "a")
    assert (rejection.error.code, rejection.error.field) == ("INVALID_HOSTNAME", "egress.allow_hosts[0]")
    assert state.rejections[(SANDBOX, "a")] == rejection
    assert state.compiled["a"] is good
    assert allowed(state, "a", "a.com")
    body = rejection.to_dict()
    assert body["code"] == "INVALID_HOSTNAME" and body["key"] == "a" and body["kind"] == "sandbox"

    assert state.apply_external(SANDBOX, "a", record("a", egress={"allow_hosts": ["b.com"]})) is None
    assert (SANDBOX, "a") not in state.rejections
    assert allowed(state, "a", "b.com") and not allowed(state, "a", "a.com")


def test_apply_external_enforces_cross_record_rules(state: PolicyState) -> None:
    state.apply_external(SANDBOX, "a", record("a", "10.75.0.2"))
    rejection = state.apply_external(SANDBOX, "b", record("b", "10.75.0.2"))
    assert rejection is not None and rejection.error.code == "ADDRESS_IN_USE"
    assert "b" not in state.sandboxes
    rejection = state.apply_external(SANDBOX, "a", {**record("a"), "profile": "registry"})
    assert rejection is not None and rejection.error.code == "PROFILE_IMMUTABLE"
    rejection = state.apply_external(SANDBOX, "c", record("c", "10.75.0.9", template="nope"))
    assert rejection is not None and rejection.error.code == "TEMPLATE_NOT_FOUND"


def test_apply_external_key_and_id_must_agree(state: PolicyState) -> None:
    rejection = state.apply_external(SANDBOX, "b", record("a"))
    assert rejection is not None and rejection.error.code == "ID_MISMATCH"
    assert not state.sandboxes


def test_apply_external_deletes(state: PolicyState) -> None:
    state.apply_external(SANDBOX, "a", record("a"))
    state.apply_external(SANDBOX, "ghost", {"id": "ghost"})  # a rejection for a record that never applied
    assert (SANDBOX, "ghost") in state.rejections
    assert state.apply_external(SANDBOX, "a", None) is None
    assert state.apply_external(SANDBOX, "ghost", None) is None
    assert not state.sandboxes and not state.by_address and not state.rejections


def test_apply_external_template_rules(state: PolicyState) -> None:
    assert state.apply_external(TEMPLATE, "t", {"egress": {"allow_hosts": ["a.com"]}}) is None
    state.apply_external(SANDBOX, "a", record("a", template="t"))
    assert allowed(state, "a", "a.com")

    rejection = state.apply_external(TEMPLATE, "t", {"egress": {"allow_hosts": ["**.a.com"]}})
    assert rejection is not None and rejection.error.code == "INVALID_HOSTNAME"
    assert allowed(state, "a", "a.com")  # last good template still compiled in

    rejection = state.apply_external(TEMPLATE, "t", None)
    assert rejection is not None and rejection.error.code == "TEMPLATE_IN_USE"
    assert "t" in state.templates

    assert state.apply_external(TEMPLATE, "t", {"egress": {"allow_hosts": ["c.com"]}}) is None
    assert allowed(state, "a", "c.com")
    assert not state.rejections


def test_apply_external_unknown_kind(state: PolicyState) -> None:
    rejection = state.apply_external("widget", "x", {})
    assert rejection is not None and rejection.error.code == "UNKNOWN_KIND"


# --------------------------------------------------------------------------- whole snapshots


def test_replace_all_adds_changes_and_removes(state: PolicyState) -> None:
    state.replace_all(
        {"t": {"egress": {"allow_hosts": ["t.com"]}}, "old": {}},
        {"keep": record("keep", "10.75.0.2", template="t"), "gone": record("gone", "10.75.0.3", template="old")},
    )
    assert set(state.sandboxes) == {"keep", "gone"} and set(state.templates) == {"t", "old"}

    rejections = state.replace_all(
        {"t": {"egress": {"allow_hosts": ["t2.com"]}}, "new": {}},
        {"keep": record("keep", "10.75.0.2", template="t"), "added": record("added", "10.75.0.3", template="new")},
    )

    assert rejections == []
    assert set(state.sandboxes) == {"keep", "added"}
    assert set(state.templates) == {"t", "new"}  # "old" went after its last user did
    assert allowed(state, "keep", "t2.com") and not allowed(state, "keep", "t.com")
    assert state.policy_for_address("10.75.0.3") is state.compiled["added"]


@pytest.mark.parametrize(("first", "second"), [("a", "b"), ("b", "a")])
def test_replace_all_moves_an_address_between_sandboxes(state: PolicyState, first: str, second: str) -> None:
    # `first` gives 10.75.0.2 up and `second` takes it, in one snapshot; order of application must not matter
    # (records are applied sorted by id, so the parametrisation covers both orders).
    state.replace_all({}, {first: record(first, "10.75.0.2"), second: record(second, "10.75.0.3")})
    assert state.policy_for_address("10.75.0.2") is state.compiled[first]

    rejections = state.replace_all({}, {first: record(first, "10.75.0.4"), second: record(second, "10.75.0.2")})

    assert rejections == []
    assert state.policy_for_address("10.75.0.2") is state.compiled[second]
    assert state.policy_for_address("10.75.0.4") is state.compiled[first]
    assert state.policy_for_address("10.75.0.3") is None


def test_replace_all_swap_of_addresses_keeps_a_consistent_last_good_state(state: PolicyState) -> None:
    # A swap is a cycle: each record conflicts with the other's current state, so neither can go first.
    # Both keep their last good version (never two owners for one address) and say why.
    state.replace_all({}, {"a": record("a", "10.75.0.2"), "b": record("b", "10.75.0.3")})
    rejections = state.replace_all({}, {"a": record("a", "10.75.0.3"), "b": record("b", "10.75.0.2")})
    assert sorted((r.key, r.error.code) for r in rejections) == [("a", "ADDRESS_IN_USE"), ("b", "ADDRESS_IN_USE")]
    assert state.policy_for_address("10.75.0.2") is state.compiled["a"]
    assert state.policy_for_address("10.75.0.3") is state.compiled["b"]


def test_replace_all_invalid_record_keeps_last_good(state: PolicyState) -> None:
    state.replace_all({}, {"a": record("a", egress={"allow_hosts": ["a.com"]})})
    rejections = state.replace_all({}, {"a": record("a", egress={"allow_hosts": ["a.com:0"]})})
    assert [(r.key, r.error.code) for r in rejections] == [("a", "INVALID_PORT")]
    assert allowed(state, "a", "a.com")


def test_replace_all_forgets_the_rejection_of_a_record_that_is_gone(state: PolicyState) -> None:
    state.replace_all({}, {"a": record("a")})
    rejections = state.replace_all(
        {"t": {"name": "t", "egress": {"allow_hosts": ["*"]}}},
        {"a": record("a"), "new": record("new", "10.75.0.9", egress={"allow_hosts": ["a.com:0"]})},
    )
    assert sorted((r.kind, r.key) for r in rejections) == [(SANDBOX, "new"), (TEMPLATE, "t")]
    # never applied, so nothing to remove but the rejection, which would otherwise be shown for ever
    assert state.replace_all({}, {"a": record("a")}) == []
    assert set(state.sandboxes) == {"a"} and not state.templates


def test_records_round_trip_through_a_snapshot(state: PolicyState) -> None:
    create_template(state, {"name": "t", "egress": {"deny_cidrs": ["10.0.0.0/8"]}, "limits": {"bandwidth_mbit": 7}})
    create(state, record("a", "10.75.0.2", "fdd4:1476:6c7e::2", template="t", egress={"allow_hosts": ["*.a.com"]}))
    create(state, {"id": "r", "addresses": ["10.75.0.3"], "profile": "registry"})
    templates, sandboxes = state.records()

    copy = PolicyState(CONTEXT)
    assert copy.replace_all(templates, sandboxes) == []
    assert copy.sandboxes == state.sandboxes
    assert copy.templates == state.templates
    assert copy.by_address == state.by_address
    assert copy.compiled["a"].limits == state.compiled["a"].limits
    assert decide(copy.compiled["a"], "x.a.com", "10.1.1.1", 443, "tls").label == "deny_cidrs 10.0.0.0/8"


# --------------------------------------------------------------------------- change listeners (the live cut)


def test_every_change_of_a_sandboxs_policy_is_heard_and_its_cut_counted(state: PolicyState) -> None:
    heard: list[str] = []

    def listener(sandbox_id: str) -> int:
        heard.append(sandbox_id)
        return 2 if sandbox_id == "sb-b" else 1

    state.change_listeners.append(listener)
    create_template(state, {"name": "base", "egress": {"allow_hosts": ["a.test"]}})
    create(state, record("sb-a", "10.75.0.2", template="base"))
    create(state, record("sb-b", "10.75.0.3", template="base"))
    create(state, record("sb-c", "10.75.0.4"))
    assert heard == ["sb-a", "sb-b", "sb-c"] and state.last_cut == 1
    heard.clear()
    state.set_template(state.parse_template({"name": "base", "egress": {"allow_hosts": ["b.test"]}}))
    assert sorted(heard) == ["sb-a", "sb-b"] and state.last_cut == 3  # the template's sandboxes, summed
    heard.clear()
    state.remove_sandbox("sb-b")
    assert heard == ["sb-b"] and state.last_cut == 2
    heard.clear()
    state.apply_external(SANDBOX, "sb-c", None)  # another writer's deletion is heard too
    assert heard == ["sb-c"]


# --------------------------------------------------------------------------- a reload's policy context


def test_a_reloaded_context_recompiles_every_sandbox_under_its_presets_and_limits_defaults() -> None:
    team = make_preset("team", ["api.team.example"], None, "")
    state = PolicyState(dataclasses.replace(CONTEXT, presets={**BUILTIN_PRESETS, "team": team}))
    create(state, record("a", egress={"presets": ["team"]}))
    create(state, record("b", "10.75.0.3", limits={"connections_per_minute": 5}))
    cut: list[str] = []
    state.change_listeners.append(lambda sid: cut.append(sid) or 0)
    assert allowed(state, "a", "api.team.example") and not allowed(state, "a", "new.team.example")
    widened = {**BUILTIN_PRESETS, "team": make_preset("team", ["new.team.example"], None, "")}
    lower = dataclasses.replace(DEFAULT_LIMITS, connections_per_minute=10)
    assert state.set_context(dataclasses.replace(CONTEXT, presets=widened, default_limits=lower)) == []
    assert allowed(state, "a", "new.team.example") and not allowed(state, "a", "api.team.example")
    assert state.compiled["a"].limits.connections_per_minute == 10  # the new default
    assert state.compiled["b"].limits.connections_per_minute == 5  # its own stays
    assert sorted(cut) == ["a", "b"]  # the live cut looked at each
    # A preset the configuration no longer has grants nothing; the record stays.
    state.set_context(CONTEXT)
    assert not allowed(state, "a", "new.team.example") and "a" in state.sandboxes
