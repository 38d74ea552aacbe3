"""The suggestion core (`gateway.suggest`): recorded flows turned into the smallest allowlist, by class of record.

Every suggestion here is also checked the two ways an operator relies on: its record parses with the policy
parser (as a PUT takes it), and replaying the window under it, enforced, newly denies nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.decision import decide
from gateway.errors import GatewayError
from gateway.flowlog import flow_verdict
from gateway.policy import MAX_LIST_ENTRIES
from gateway.replay import replay
from gateway.state import PolicyState
from gateway.suggest import MIN_SIBLINGS, PolicySuggestion, entry_name, kept_record, suggest, wildcard_parent
from tests.factory import CONTEXT, PUBLIC, dns, flow, policy

DENY = {"verdict": "deny", "rule": "default:deny"}
WOULD = {"verdict": "would_deny", "rule": "default:deny"}


def run(lines: list[bytes], egress: Any = None, *, profile: str = "allowlisted", template: Any = None,
        since_us: int = 0) -> PolicySuggestion:  # fmt: skip
    """The suggestion for sb1 (created with `egress`) over the lines, checked: it parses, and replaying the
    lines under it enforced newly denies nothing."""
    state = PolicyState(CONTEXT)
    if template is not None:
        state.set_template(state.parse_template({"name": "t", "egress": template}))
    raw: dict[str, Any] = {"id": "sb1", "addresses": ["10.75.0.2"], "profile": profile}
    if egress is not None:
        raw["egress"] = egress
    if template is not None:
        raw["template"] = "t"
    sandbox = state.parse_sandbox(raw)
    state.check_sandbox(sandbox, create=True)
    state.set_sandbox(sandbox)
    result = suggest(sandbox, [b"\n".join(lines)], state.candidate("sb1", kept_record(sandbox)), since_us)
    state.candidate("sb1", result.record)  # as a PUT of it would take it (raises if it would not)
    parsed = state.parse_sandbox(result.record)
    assert list(parsed.egress.allow_hosts or ()) == result.record["egress"]["allow_hosts"]
    enforced = {**result.record, "egress": {**result.record["egress"], "enforcement": "enforce"}}
    diff = replay("sb1", [b"\n".join(lines)], state.candidate("sb1", enforced), since_us)
    # Only what no entry can express may flip: a DNS question whose name is none (`a_b.example.com` passes the
    # DNS grammar; in report mode it passed), counted as unusable.
    unusable = sum(e.count for e in result.excluded if e.why == "unusable")
    assert all(g.protocol == "dns" and entry_name(g.name or "") is None for g in diff.newly_denied), diff
    assert diff.newly_denied_records <= unusable
    return result


def hosts(result: PolicySuggestion) -> list[str]:
    hosts_: list[str] = result.record["egress"]["allow_hosts"]
    return hosts_


def excluded(result: PolicySuggestion) -> dict[tuple[str, str], int]:
    return {(e.why, e.rule): e.count for e in result.excluded}


# --------------------------------------------------------------------------- names and wildcards


def test_denied_and_allowed_names_become_entries_with_evidence() -> None:
    lines = [flow("api.example.com"), flow("api.example.com"), flow("new.example.org", **DENY), dns("new.example.org",
             **DENY)]  # fmt: skip
    result = run(lines, {"allow_hosts": ["api.example.com", "unused.example.net"]})
    assert hosts(result) == ["api.example.com", "new.example.org"]  # the unused entry is dropped
    assert result.record["egress"]["host_ports"] == [443]
    new = next(e for e in result.entries if e.entry == "new.example.org")
    assert (new.records, new.denied_records, new.names, new.ports) == (2, 2, ["new.example.org"], [443])
    assert new.first_seen_us <= new.last_seen_us
    assert result.records == result.covered_records == 4


def test_would_deny_records_of_report_mode_are_what_the_sandbox_wanted() -> None:
    result = run([flow("later.example.com", **WOULD)], {"enforcement": "report"})
    assert hosts(result) == ["later.example.com"] and result.record["egress"]["enforcement"] == "report"


def test_siblings_one_label_under_a_parent_collapse_to_a_wildcard() -> None:
    siblings = [f"n{i}.cdn.example.com" for i in range(MIN_SIBLINGS)]
    lines = [flow(name, **DENY) for name in siblings] + [flow("cdn.example.com", **DENY),
                                                          flow("deep.n0.cdn.example.com", **DENY)]  # fmt: skip
    result = run(lines)
    # The parent itself and a name two labels down are not what `*.` matches: they stay exact.
    assert hosts(result) == ["*.cdn.example.com", "cdn.example.com", "deep.n0.cdn.example.com"]
    wildcard = result.entries[0]
    assert wildcard.names == sorted(siblings) and wildcard.names_total == MIN_SIBLINGS


def test_fewer_siblings_than_the_threshold_stay_exact() -> None:
    names = [f"n{i}.cdn.example.com" for i in range(MIN_SIBLINGS - 1)]
    assert hosts(run([flow(name, **DENY) for name in names])) == names


@pytest.mark.parametrize(
    "parent", ["com", "uk", "co.uk", "com.au", "org.br", "localhost", "github.io", "s3.amazonaws.com", "test"]
)
def test_no_wildcard_directly_under_a_public_suffix(parent: str) -> None:
    names = [f"site{i}.{parent}" for i in range(MIN_SIBLINGS + 2)]
    assert hosts(run([flow(name, **DENY) for name in names])) == sorted(names)
    assert not wildcard_parent(parent)


@pytest.mark.parametrize(
    "parent", ["example.co.uk", "example.com", "my-bucket.s3.amazonaws.com", "example.dev", "storage.googleapis.com"]
)
def test_a_registrable_parent_takes_a_wildcard(parent: str) -> None:
    names = [f"site{i}.{parent}" for i in range(MIN_SIBLINGS)]
    assert hosts(run([flow(name, **DENY) for name in names])) == [f"*.{parent}"]


# --------------------------------------------------------------------------- ports


def test_a_name_on_another_port_is_a_host_port_entry_and_dns_joins_the_bare_one() -> None:
    lines = [flow("api.example.com", **DENY), flow("api.example.com", 8443, **DENY), dns("api.example.com", **DENY),
             flow("plain.example.com", 80, "http", **DENY)]  # fmt: skip
    result = run(lines)
    assert hosts(result) == ["api.example.com", "api.example.com:8443", "plain.example.com:80"]
    bare = result.entries[0]
    assert (bare.records, bare.ports) == (2, [443])  # the TLS flow and the DNS question


def test_a_name_only_on_another_port_and_resolved_is_that_entry_alone() -> None:
    result = run([flow("db.example.com", 5432, "tcp", **DENY), dns("db.example.com", **DENY)])
    assert hosts(result) == ["db.example.com:5432"] and "host_ports" not in result.record["egress"]
    assert result.entries[0].records == 2


def test_the_records_host_ports_are_the_ports_a_bare_entry_covers() -> None:
    lines = [flow("api.example.com", 8443, **DENY), flow("api.example.com", **DENY), flow("x.example.com", 80, **DENY)]
    result = run(lines, {"host_ports": [443, 8443]})
    assert hosts(result) == ["api.example.com", "x.example.com:80"]
    assert result.record["egress"]["host_ports"] == [443, 8443]


def test_a_wildcards_ports_are_its_siblings_ports() -> None:
    lines = [flow(f"n{i}.example.com", 443 if i else 8443, **DENY) for i in range(MIN_SIBLINGS)]
    assert hosts(run(lines)) == ["*.example.com", "*.example.com:8443"]


# --------------------------------------------------------------------------- addresses


def test_flows_without_a_name_become_host_networks_and_their_ports() -> None:
    lines = [flow(None, 5432, "tcp", address="203.0.113.7", **DENY),
             flow(None, 443, "tls", address="2001:db8::7", **DENY),
             flow(None, 5432, "tcp", address="::ffff:203.0.113.7", **DENY),
             flow("192.0.2.9", 80, "http", address="192.0.2.9", **DENY)]  # fmt: skip
    result = run(lines, {"allow_cidrs": ["198.51.100.0/24"], "allow_ports": [22]})
    egress = result.record["egress"]
    assert egress["allow_cidrs"] == ["192.0.2.9/32", "203.0.113.7/32", "2001:db8::7/128"]
    assert egress["allow_ports"] == [80, 443, 5432] and egress["allow_hosts"] == []
    mapped = next(e for e in result.entries if e.entry == "203.0.113.7/32")
    assert (mapped.field, mapped.records, mapped.ports, mapped.names) == ("allow_cidrs", 2, [5432], [])


def test_no_address_flows_leave_no_cidr_rules_not_even_the_templates() -> None:
    result = run([flow("api.example.com", **DENY)], template={"allow_cidrs": ["198.51.100.0/24"],
                                                               "allow_hosts": ["old.example.com"]})  # fmt: skip
    assert result.record["egress"]["allow_cidrs"] == [] and hosts(result) == ["api.example.com"]


def test_a_name_learned_from_dns_keeps_the_port_it_was_used_on() -> None:
    # No name in the record, but the exact entry that allowed it names the name the DNS answer taught it.
    lines = [flow(None, 22, "tcp", rule="allow_hosts git.example.com"), dns("git.example.com"),
             flow(None, 22, "tcp", rule="allow_hosts *.cdn.example.com", address="198.51.100.9")]  # fmt: skip
    result = run(lines, {"allow_hosts": ["git.example.com", "*.cdn.example.com"]})
    assert hosts(result) == ["git.example.com:22"] and result.entries[0].records == 2
    assert excluded(result) == {("learned_name", "allow_hosts"): 1}  # a wildcard does not say which name
    assert decide(policy("allowlisted", result.record["egress"]), "git.example.com", PUBLIC, 22, "tcp").allowed


def test_a_record_naming_the_learned_name_gives_it_whatever_entry_allowed_it() -> None:
    lines = [flow(None, 22, "tcp", rule="allow_hosts *.cdn.example.com", address="198.51.100.9",
                  learned_name="a.cdn.example.com"),
             flow(None, 5432, "tcp", rule="preset pypi", learned_name="db.example.com")]  # fmt: skip
    result = run(lines, {"allow_hosts": ["*.cdn.example.com"]})
    assert hosts(result) == ["a.cdn.example.com:22", "db.example.com:5432"] and excluded(result) == {}


# --------------------------------------------------------------------------- what is left out


@pytest.mark.parametrize(
    "rule",
    ["builtin:metadata", "builtin:special", "builtin:blocklist", "builtin:gateway", "malware list urlhaus (line 3)",
     "limits.connections_per_minute", "builtin:dial"],
)  # fmt: skip
def test_flows_a_guard_refused_are_counted_never_suggested(rule: str) -> None:
    result = run([flow("guarded.example.com", verdict="deny", rule=rule, address="169.254.169.254"),
                  flow(None, 80, "tcp", verdict="deny", rule=rule, address="10.0.0.1")])  # fmt: skip
    assert result.entries == [] and hosts(result) == [] and result.record["egress"]["allow_cidrs"] == []
    assert [(e.why, e.count) for e in result.excluded] == [("guard", 2)]


def test_rules_the_record_keeps_deny_or_allow_are_not_listed() -> None:
    lines = [flow("evil.example.com", verdict="deny", rule="deny_hosts evil.example.com"),
             flow(None, 80, "tcp", verdict="deny", rule="deny_cidrs 203.0.113.0/24", address="203.0.113.5"),
             flow("pypi.org", rule="preset package-registries"),
             flow("mail.example.com", 25, "tcp", verdict="deny", rule="builtin:smtp")]  # fmt: skip
    result = run(lines, {"deny_hosts": ["evil.example.com"], "deny_cidrs": ["203.0.113.0/24"],
                         "presets": ["package-registries"]})  # fmt: skip
    assert hosts(result) == []
    assert excluded(result) == {("kept_denial", "deny_hosts"): 1, ("kept_denial", "deny_cidrs"): 1,
                                ("already_allowed", "preset"): 1, ("kept_denial", "builtin:smtp"): 1}  # fmt: skip


def test_records_of_other_sandboxes_and_before_the_window_are_not_read() -> None:
    lines = [flow("old.example.com", end_us=10, **DENY), flow("other.example.com", sandbox="sb2", **DENY),
             flow("new.example.com", **DENY), b"not a record"]  # fmt: skip
    result = run(lines, since_us=1000)
    assert hosts(result) == ["new.example.com"] and result.records == 1 and result.unreadable == 1


# --------------------------------------------------------------------------- hostile records


@pytest.mark.parametrize("spelling", ["API.Example.COM", "api.example.com.", "Api.Example.Com."])
def test_spellings_of_one_name_are_one_entry(spelling: str) -> None:
    result = run([flow(spelling, **DENY), dns(spelling, **DENY), flow("api.example.com", **DENY)])
    assert hosts(result) == ["api.example.com"] and result.entries[0].records == 3


def test_an_idna_name_is_its_a_label_and_a_unicode_one_no_entry_can_match() -> None:
    lines = [flow("XN--BCHER-KVA.example.", **DENY), flow("bücher.example", **DENY), dns("bücher.example", **DENY)]
    result = run(lines)
    assert hosts(result) == ["xn--bcher-kva.example"] and excluded(result) == {("unusable", "default:deny"): 1}
    assert result.record["egress"]["allow_cidrs"] == [f"{PUBLIC}/32"]  # the connection, by its address


@pytest.mark.parametrize(
    "hostname",
    ["*.example.com", "*", "a_b.example.com", "api.example.com:443", "[::1]", "a" * 5000, "ex ample.com",
     "xn--zz.example", "a..example.com", "-a.example.com"],
)  # fmt: skip
def test_names_no_entry_can_express_are_never_suggested_their_connections_go_by_address(hostname: str) -> None:
    result = run([flow(hostname, **DENY), dns(hostname, **DENY)])
    assert hosts(result) == [] and excluded(result) == {("unusable", "default:deny"): 1}  # the DNS question
    (by_address,) = result.entries
    assert (by_address.entry, by_address.names, by_address.ports) == (f"{PUBLIC}/32", [], [443])


@pytest.mark.parametrize("port", [0, -1, 65536, 10**12])
def test_ports_out_of_range_are_counted_never_suggested(port: int) -> None:
    result = run([flow("api.example.com", port, **DENY), flow(None, port, "tcp", address=PUBLIC, **DENY)])
    assert hosts(result) == [] and result.record["egress"]["allow_ports"] == []
    assert excluded(result) == {("unusable", "default:deny"): 2}


def test_huge_counts_are_summed_and_one_distinct_flow_is_one_entry() -> None:
    lines = [flow("busy.example.com", **DENY)] * 5000
    result = run(lines)
    assert hosts(result) == ["busy.example.com"] and result.entries[0].records == 5000


def test_more_names_than_a_record_holds_is_refused_with_a_stable_code() -> None:
    lines = [flow(f"n{i}.example{i}.com", **DENY) for i in range(MAX_LIST_ENTRIES + 1)]
    with pytest.raises(GatewayError) as caught:
        run(lines)
    assert caught.value.code == "SUGGESTION_TOO_LARGE" and caught.value.status == 409


# --------------------------------------------------------------------------- the record


def test_the_record_is_the_current_one_with_only_the_allowlist_replaced() -> None:
    egress = {"allow_hosts": ["a.example.com"], "deny_hosts": ["evil.example.com"], "enforcement": "report",
              "presets": ["package-registries"]}  # fmt: skip
    result = run([flow("b.example.com", **WOULD)], egress)
    assert result.record["egress"] == {**egress, "allow_hosts": ["b.example.com"], "allow_cidrs": [],
                                       "allow_ports": [], "host_ports": [443]}  # fmt: skip
    assert result.record["id"] == "sb1" and result.record["profile"] == "allowlisted"


@pytest.mark.parametrize(
    ("profile", "egress"),
    [("registry", None), ("unrestricted", None), ("allowlisted", {"allow_internet": False})],
)
def test_a_sandbox_no_allowlist_applies_to_is_refused_with_a_stable_code(profile: str, egress: Any) -> None:
    with pytest.raises(GatewayError) as caught:
        run([flow("a.example.com", **DENY)], egress, profile=profile)
    assert caught.value.code == "SUGGEST_NOT_APPLICABLE" and caught.value.status == 409


def test_an_unrestricted_sandbox_under_deny_all_in_report_mode_gets_a_suggestion() -> None:
    result = run([flow("a.example.com", **WOULD)], {"mode": "deny_all", "enforcement": "report"},
                 profile="unrestricted")  # fmt: skip
    assert hosts(result) == ["a.example.com"]


# --------------------------------------------------------------------------- any mix of records

_NAMES = st.sampled_from(
    ["api.example.com", "a.cdn.example.com", "b.cdn.example.com", "c.cdn.example.com", "cdn.example.com",
     "x.co.uk", "y.co.uk", "z.co.uk", "API.Example.com.", "xn--bcher-kva.example", "a_b.example.com", "pypi.org",
     "github.com", "*.evil.example"]
)  # fmt: skip
_RECORD = st.tuples(
    st.one_of(st.none(), _NAMES),
    st.sampled_from([22, 80, 443, 8443, 25]),
    st.sampled_from(["tls", "http", "tcp", "dns"]),
    st.sampled_from(["203.0.113.5", "203.0.113.6", "198.51.100.7", "2001:db8::5", "::ffff:203.0.113.5"]),
    st.booleans(),  # a guard refused it (it never reached the policy's verdict)
)
_LIVE = st.fixed_dictionaries(
    {
        "allow_hosts": st.sampled_from([[], ["api.example.com"], ["*.cdn.example.com", "api.example.com:8443"]]),
        "allow_cidrs": st.sampled_from([[], ["203.0.113.0/24"]]),
        "deny_hosts": st.just(["pypi.org"]),
        "presets": st.just(["git-hosts"]),
        "enforcement": st.sampled_from(["enforce", "report"]),
    },
    optional={"host_ports": st.just([443, 8443])},
)


@given(st.lists(_RECORD, max_size=40), _LIVE)
@settings(max_examples=200, deadline=None)
def test_any_mix_gives_a_record_that_parses_newly_denies_nothing_and_counts_every_record(
    records: list[tuple[Any, ...]], live: dict[str, Any]
) -> None:
    """Records as the engine writes them (decided by the live policy, or refused by a guard), any mix."""
    decided = policy("allowlisted", live)
    lines = []
    for name, port, protocol, address, guarded in records:
        if protocol == "dns":
            name = name or "api.example.com"
        verdict = decide(decided, name, *((None, None) if protocol == "dns" else (address, port)), protocol)
        outcome = ("deny", "builtin:special") if guarded and protocol != "dns" else (
            flow_verdict(verdict.allowed, verdict.would_deny), verdict.label)  # fmt: skip
        lines.append(
            dns(name, *outcome) if protocol == "dns" else flow(name, port, protocol, *outcome, address=address)
        )
    result = run(lines, live)  # parses, and replaying it enforced newly denies nothing
    assert result.covered_records + sum(e.count for e in result.excluded) == result.records == len(lines)
    assert not any(entry.startswith(("*.co.uk", "*.evil")) for entry in hosts(result))
    assert len(set(hosts(result))) == len(hosts(result))
