"""The replay core (`gateway.replay`): recorded flows decided again under a candidate policy, by class of record."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.decision import CompiledPolicy
from gateway.errors import GatewayError
from gateway.replay import MAX_SINCE_SECONDS, PolicyDiff, parse_since, replay
from gateway.state import PolicyState
from tests.factory import CONTEXT, PUBLIC, RECORDS_T0, dns, flow, policy


def diff(lines: list[bytes], candidate: CompiledPolicy, since_us: int = 0) -> PolicyDiff:
    return replay("sb1", [b"\n".join(lines)], candidate, since_us)


def names(groups: list[Any]) -> list[tuple[str | None, int | None, str, int]]:
    return [(g.name, g.port, g.protocol, g.count) for g in groups]


ALLOWLIST = {"allow_hosts": ["api.example.com", "*.cdn.example.com", "pypi.org"]}


# --------------------------------------------------------------------------- names that flip


def test_a_narrower_candidate_lists_what_it_newly_denies_with_counts_and_times() -> None:
    lines = [
        flow("api.example.com"),
        flow("pypi.org", rule="allow_hosts pypi.org"),
        flow("pypi.org", rule="allow_hosts pypi.org"),
        flow("pypi.org", 80, "http", rule="allow_hosts pypi.org"),
    ]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"]}))
    assert names(result.newly_denied) == [("pypi.org", 443, "tls", 2), ("pypi.org", 80, "http", 1)]
    group = result.newly_denied[0]
    assert group.verdict == "deny" and group.rule == "default:deny" and group.reason == "host not in allowlist"
    assert group.recorded_rule == "allow_hosts pypi.org" and group.addresses == [PUBLIC]
    assert group.first_seen_us < group.last_seen_us
    assert result.newly_allowed == [] and result.unchanged_allowed == 1 and result.unchanged_denied == 0
    assert (result.records, result.replayed, result.newly_denied_records) == (4, 4, 3)


def test_a_broader_candidate_lists_what_it_newly_allows_and_the_rule_that_does() -> None:
    lines = [
        flow("github.com", verdict="deny", rule="default:deny"),
        flow("evil.test", verdict="deny", rule="default:deny"),
    ]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["github.com"]}))
    assert names(result.newly_allowed) == [("github.com", 443, "tls", 1)]
    assert result.newly_allowed[0].rule == "allow_hosts github.com" and result.newly_allowed[0].verdict == "allow"
    assert result.unchanged_denied == 1 and result.newly_denied == []


def test_a_deny_hosts_entry_added_or_dropped_flips_what_it_names() -> None:
    unrestricted = policy("unrestricted", {"deny_hosts": ["*.tracker.example"]})
    allowed = [
        flow("ads.tracker.example", rule="egress.mode:allow_all"),
        flow("api.example.com", rule="egress.mode:allow_all"),
    ]
    result = diff(allowed, unrestricted)
    assert names(result.newly_denied) == [("ads.tracker.example", 443, "tls", 1)]
    assert result.newly_denied[0].rule == "deny_hosts *.tracker.example" and result.unchanged_allowed == 1
    denied = [flow("ads.tracker.example", verdict="deny", rule="deny_hosts *.tracker.example")]
    result = diff(denied, policy("unrestricted", {}))
    assert names(result.newly_allowed) == [("ads.tracker.example", 443, "tls", 1)] and result.replayed == 1


@pytest.mark.parametrize("spelling", ["PyPI.org", "pypi.org.", "PYPI.ORG."])
def test_spellings_of_one_name_are_one_group_under_its_normal_form(spelling: str) -> None:
    lines = [flow("pypi.org", rule="allow_hosts pypi.org"), flow(spelling, rule="allow_hosts pypi.org")]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"]}))
    assert names(result.newly_denied) == [("pypi.org", 443, "tls", 2)]
    assert result.decisions == 1  # decided once: the key is the name's normal form


# --------------------------------------------------------------------------- wildcard vs exact


def test_a_wildcard_narrowed_to_one_exact_name_denies_its_siblings_and_not_the_parent_it_never_covered() -> None:
    lines = [
        flow("a.cdn.example.com", rule="allow_hosts *.cdn.example.com"),
        flow("b.cdn.example.com", rule="allow_hosts *.cdn.example.com"),
        flow("cdn.example.com", verdict="deny", rule="default:deny"),  # a wildcard never covers its parent
        flow("x.a.cdn.example.com", verdict="deny", rule="default:deny"),  # nor a second level
    ]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["a.cdn.example.com"]}))
    assert names(result.newly_denied) == [("b.cdn.example.com", 443, "tls", 1)]
    assert result.unchanged_allowed == 1 and result.unchanged_denied == 2


def test_an_exact_name_widened_to_a_wildcard_allows_the_siblings_it_now_covers() -> None:
    lines = [
        flow("a.cdn.example.com", verdict="deny", rule="default:deny"),
        flow("cdn.example.com", verdict="deny", rule="default:deny"),
    ]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["*.cdn.example.com"]}))
    assert names(result.newly_allowed) == [("a.cdn.example.com", 443, "tls", 1)]
    assert result.newly_allowed[0].rule == "allow_hosts *.cdn.example.com"


# --------------------------------------------------------------------------- ports


def test_host_ports_deny_the_other_ports_of_an_allowed_name_by_that_entry() -> None:
    lines = [flow("api.example.com", 443), flow("api.example.com", 8443), flow("api.example.com", 80, "http")]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"], "host_ports": [443]}))
    assert names(result.newly_denied) == [("api.example.com", 80, "http", 1), ("api.example.com", 8443, "tls", 1)]
    assert {g.rule for g in result.newly_denied} == {"allow_hosts api.example.com"}
    assert all("port" in g.reason for g in result.newly_denied)


def test_smtp_stays_denied_whatever_the_candidate_allows() -> None:
    lines = [flow("mail.example.com", port, "tcp", "deny", "builtin:smtp") for port in (25, 465, 587)]
    result = diff(lines, policy("unrestricted"))
    assert result.newly_allowed == [] and result.unchanged_denied == 3


def test_allow_ports_narrow_an_address_rule() -> None:
    lines = [flow(None, port, "tcp", rule="allow_cidrs 93.184.216.0/24") for port in (443, 22)]
    candidate = policy("allowlisted", {"mode": "deny_all", "allow_cidrs": ["93.184.216.0/24"], "allow_ports": [443]})
    result = diff(lines, candidate)
    assert names(result.newly_denied) == [(None, 22, "tcp", 1)]
    assert result.newly_denied[0].rule == "allow_ports" and result.newly_denied[0].by_address_only


# --------------------------------------------------------------------------- report mode


def test_enforcing_a_report_mode_policy_newly_denies_what_it_would_have_denied() -> None:
    lines = [
        flow("api.example.com"),
        flow("pypi.org", verdict="would_deny", rule="default:deny"),
        flow("pypi.org", verdict="would_deny", rule="default:deny"),
    ]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"]}))
    assert names(result.newly_denied) == [("pypi.org", 443, "tls", 2)]
    assert result.newly_denied[0].recorded_rule == "default:deny"


def test_a_candidate_in_report_mode_lets_pass_what_it_would_deny_and_says_so() -> None:
    lines = [flow("pypi.org", rule="allow_hosts pypi.org"), flow("evil.test", verdict="deny", rule="default:deny")]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"], "enforcement": "report"}))
    assert result.newly_denied == []  # it passes still: report mode denies nothing an allowlist misses
    assert names(result.newly_allowed) == [("evil.test", 443, "tls", 1)]
    assert result.newly_allowed[0].verdict == "would_deny" and result.newly_allowed[0].rule == "default:deny"
    assert result.unchanged_allowed == 1


def test_report_mode_keeps_enforcing_deny_cidrs() -> None:
    lines = [flow("api.example.com")]
    candidate = policy(
        "allowlisted", {"allow_hosts": ["api.example.com"], "deny_cidrs": ["93.184.216.0/24"], "enforcement": "report"}
    )
    result = diff(lines, candidate)
    assert names(result.newly_denied) == [("api.example.com", 443, "tls", 1)]
    assert result.newly_denied[0].rule == "deny_cidrs 93.184.216.0/24" and result.newly_denied[0].verdict == "deny"


def test_deny_cidrs_newly_deny_a_named_flow_by_the_address_it_was_dialled_to() -> None:
    # The sandbox asked for 203.0.113.9 (its own resolution, or a pinned one); the gateway dialled the name's own
    # address, PUBLIC: the candidate's deny_cidrs refuse that one, as the engine refuses a resolved address.
    elsewhere = "203.0.113.9"
    lines = [flow("api.example.com", address=elsewhere, dst_addr=PUBLIC) for _ in range(3)]
    lines.append(flow("api.example.com", address=elsewhere, dst_addr="198.51.100.7"))
    candidate = policy("allowlisted", {"allow_hosts": ["api.example.com"], "deny_cidrs": ["93.184.216.0/24"]})
    result = diff(lines, candidate)
    assert names(result.newly_denied) == [("api.example.com", 443, "tls", 3)]
    group = result.newly_denied[0]
    assert (group.rule, group.verdict, group.addresses) == ("deny_cidrs 93.184.216.0/24", "deny", [elsewhere])
    assert result.unchanged_allowed == 1  # dialled elsewhere, outside the network
    # The asked address alone decides where nothing else was dialled (the record says the same address).
    assert diff([flow("api.example.com", address=elsewhere)], candidate).newly_denied == []
    # A candidate allowing the asked address itself (allow_cidrs) would have it dialled there, not by the name.
    by_address = policy("allowlisted", {"allow_cidrs": [f"{elsewhere}/32"], "deny_cidrs": ["93.184.216.0/24"]})
    assert diff(lines[:1], by_address).newly_denied == []
    # A flow without a name was dialled where the sandbox asked: one address, one decision.
    unnamed = [flow(None, address=PUBLIC, rule="allow_cidrs 93.184.216.0/24", protocol="tcp")]
    cidrs = policy("allowlisted", {"allow_cidrs": ["93.184.216.0/24"], "deny_cidrs": ["93.184.216.34/32"]})
    assert names(diff(unnamed, cidrs).newly_denied) == [(None, 443, "tcp", 1)]


# --------------------------------------------------------------------------- DNS


def test_dns_questions_are_decided_on_the_name_alone_and_grouped_without_a_port() -> None:
    lines = [dns("pypi.org", rule="allow_hosts pypi.org"), dns("pypi.org", rule="allow_hosts pypi.org"),
             dns("api.example.com"), dns("github.com", "deny", "default:deny")]  # fmt: skip
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com", "github.com"]}))
    assert names(result.newly_denied) == [("pypi.org", None, "dns", 2)]
    assert names(result.newly_allowed) == [("github.com", None, "dns", 1)]
    assert result.newly_denied[0].addresses == []  # a question has no destination address
    assert result.decisions == 3


def test_an_empty_answer_given_after_the_policy_allowed_the_name_is_replayed_by_its_name() -> None:
    lines = [dns("pypi.org", "allow", "dns:https")]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"]}))
    assert names(result.newly_denied) == [("pypi.org", None, "dns", 1)]


@pytest.mark.parametrize(
    "rule",
    [
        "dns:qtype",
        "dns:class",
        "dns:name",
        "parse",
        "malware list evil.test (line 3)",
        "builtin:dns_label",  # the exfiltration limits: a candidate allowing the name does not lift them
        "builtin:dns_budget",
    ],
)
def test_dns_refusals_before_or_beside_the_policy_are_not_replayed(rule: str) -> None:
    result = diff([dns("evil.test", "deny", rule)], policy("unrestricted"))
    assert result.replayed == 0 and result.newly_allowed == []
    assert [(s.why, s.count) for s in result.not_replayed] == [("guard", 1)]


# --------------------------------------------------------------------------- what a record cannot tell


def test_a_flow_without_a_name_is_decided_by_address_and_says_so() -> None:
    lines = [flow(None, 22, "tcp", rule="allow_cidrs 93.184.216.0/24", address=a) for a in (PUBLIC, "93.184.216.35")]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"]}))
    (group,) = result.newly_denied
    assert (group.name, group.port, group.by_address_only) == (None, 22, True)
    assert group.addresses == [PUBLIC, "93.184.216.35"] and group.count == 2


def test_an_http_host_that_is_an_address_is_decided_by_address() -> None:
    lines = [flow(PUBLIC, 80, "http", rule="allow_cidrs 93.184.216.0/24")]
    result = diff(lines, policy("allowlisted", {"allow_hosts": [PUBLIC.replace(".", "-") + ".example.com"]}))
    assert result.newly_denied[0].name is None and result.newly_denied[0].by_address_only


def test_a_flow_without_a_name_decided_by_a_host_rule_used_a_learned_name_and_is_not_replayed() -> None:
    lines = [flow(None, 443, "tls", rule="allow_hosts api.example.com")]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["other.example.com"]}))
    assert result.replayed == 0 and result.newly_denied == []
    assert [(s.why, s.rule) for s in result.not_replayed] == [("learned_name", "allow_hosts")]


def test_a_flow_without_a_name_to_a_dns_learned_address_is_decided_on_the_name_it_was_learned_for() -> None:
    learned = [
        flow(None, 22, "tcp", rule="allow_hosts *.cdn.example.com", learned_name="a.cdn.example.com"),
        flow(None, 22, "tcp", rule="allow_hosts *.cdn.example.com", learned_name="b.cdn.example.com"),
    ]
    # The wildcard narrowed to one name: the other's connections are newly denied, by that name.
    result = diff(learned, policy("allowlisted", {"allow_hosts": ["a.cdn.example.com"]}))
    assert result.replayed == 2 and result.not_replayed == []
    (group,) = result.newly_denied
    assert (group.name, group.port, group.protocol, group.by_address_only) == ("b.cdn.example.com", 22, "tcp", False)
    assert result.unchanged_allowed == 1
    # A candidate that allows neither name but the address itself keeps both (decided as the engine would).
    by_cidr = diff(learned, policy("allowlisted", {"allow_cidrs": [f"{PUBLIC}/32"]}))
    assert by_cidr.newly_denied == [] and by_cidr.unchanged_allowed == 2


@pytest.mark.parametrize("rule", ["egress.allow_internet", "profile:isolated"])
def test_a_connection_denied_before_its_first_bytes_has_no_name_to_replay(rule: str) -> None:
    lines = [flow(None, 443, "tcp", "deny", rule), flow("api.example.com", 443, "tls", "allow")]
    result = diff(lines, policy("allowlisted", {"allow_internet": False}))
    assert [(s.why, s.rule, s.count) for s in result.not_replayed] == [("unread", rule, 1)]
    assert names(result.newly_denied) == [("api.example.com", 443, "tls", 1)]  # a named record is decided again
    assert result.newly_denied[0].rule == "egress.allow_internet"


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ("builtin:metadata", "guard"),
        ("builtin:special", "guard"),
        ("builtin:dial", "guard"),
        ("limits.connections_per_minute", "guard"),
        ("tunnel:ab12", "tunnel"),
        ("no-such-rule", "guard"),
    ],
)
def test_records_a_guard_limit_or_tunnel_decided_are_counted_not_replayed(rule: str, why: str) -> None:
    result = diff([flow("api.example.com", verdict="deny", rule=rule)], policy("unrestricted"))
    assert result.replayed == 0 and result.newly_allowed == []
    assert [(s.why, s.count) for s in result.not_replayed] == [(why, 1)]


def test_the_inspection_tiers_request_records_are_not_replayed_but_their_connection_is() -> None:
    lines = [
        flow("api.example.com", rule="inspect api.example.com"),
        flow("api.example.com", protocol="https", rule="inspect api.example.com", method="GET", path="/", status=200),
    ]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["other.example.com"]}))
    assert names(result.newly_denied) == [("api.example.com", 443, "tls", 1)]
    assert [(s.why, s.count) for s in result.not_replayed] == [("inspected_request", 1)]


# --------------------------------------------------------------------------- the window and the input


def test_only_this_sandboxs_records_in_the_window_count_and_bad_lines_are_counted() -> None:
    lines = [
        flow("pypi.org", end_us=RECORDS_T0 - 1),
        flow("pypi.org", end_us=RECORDS_T0 + 5, sandbox="other"),
        b"{not json",
        b'{"start_us": "x"}',
        flow("pypi.org", end_us=RECORDS_T0 + 6).replace(b'"verdict":"allow"', b'"verdict":"maybe"'),
        flow("pypi.org", end_us=RECORDS_T0 + 7).replace(b'"protocol":"tls"', b'"protocol":"gopher"'),
        b"",
        flow("pypi.org", end_us=RECORDS_T0 + 10),
    ]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"]}), since_us=RECORDS_T0)
    assert (
        result.records == 1 and result.unreadable == 4 and names(result.newly_denied) == [("pypi.org", 443, "tls", 1)]
    )


def test_each_distinct_flow_is_decided_once() -> None:
    lines = [flow("pypi.org", rule="allow_hosts pypi.org") for _ in range(500)]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"]}))
    assert result.decisions == 1 and result.newly_denied_records == 500
    assert result.to_dict()["policy"]["egress"]["allow_hosts"] == ["api.example.com"]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800),
                                               ("30d", MAX_SINCE_SECONDS)])  # fmt: skip
def test_since_durations(text: str, seconds: int) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "24",
        "h",
        "0h",
        "-1h",
        "+1h",
        "1.5h",
        "24H",
        " 24h",
        "24h ",
        "24h\n",
        "31d",
        "1w",
        "２４h",
        "1e3s",
        "9999999d",
        "x" * 10_000,
    ],
)
def test_since_refuses_anything_else_with_a_stable_code(text: str) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_since(text)
    assert (caught.value.code, caught.value.field) == ("INVALID_PARAMETER", "since")
    assert len(caught.value.message) < 200


# --------------------------------------------------------------------------- the candidate: as a PUT would take it


@pytest.fixture
def state() -> PolicyState:
    state = PolicyState(CONTEXT)
    for raw in ({"id": "sb1", "addresses": ["10.75.0.2"], "profile": "allowlisted"},
                {"id": "sb2", "addresses": ["10.75.0.3"], "profile": "allowlisted"}):  # fmt: skip
        sandbox = state.parse_sandbox(raw)
        state.check_sandbox(sandbox, create=True)
        state.set_sandbox(sandbox)
    return state


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        ({"addresses": ["10.75.0.2"], "profile": "unrestricted"}, "PROFILE_IMMUTABLE", "profile"),
        ({"addresses": ["10.75.0.2"], "profile": "allowlisted", "template": "nope"}, "TEMPLATE_NOT_FOUND", "template"),
        ({"addresses": ["10.75.0.3"], "profile": "allowlisted"}, "ADDRESS_IN_USE", "addresses[0]"),
        ({"id": "sb2", "addresses": ["10.75.0.2"], "profile": "allowlisted"}, "ID_MISMATCH", "id"),
        ({"addresses": ["10.75.0.2"], "egress": {"allow_hosts": ["https://x"]}}, "INVALID_HOSTNAME",
         "egress.allow_hosts[0]"),
        ({"addresses": ["10.75.0.2"], "egres": {}}, "UNKNOWN_FIELD", "egres"),
        ([], "INVALID_TYPE", ""),
    ],
)  # fmt: skip
def test_a_candidate_is_refused_as_a_put_of_it_would_be_and_changes_nothing(
    state: PolicyState, raw: Any, code: str, field: str
) -> None:
    before = state.compiled["sb1"]
    with pytest.raises(GatewayError) as caught:
        state.candidate("sb1", raw)
    assert caught.value.code == code and caught.value.field == field
    assert state.compiled["sb1"] is before


def test_a_candidate_is_compiled_over_the_template_it_names_and_nothing_is_applied(state: PolicyState) -> None:
    template = state.parse_template({"name": "t", "egress": {"allow_hosts": ["pypi.org"]}})
    state.set_template(template)
    before = state.compiled["sb1"]
    candidate = state.candidate("sb1", {"addresses": ["10.75.0.2"], "profile": "allowlisted", "template": "t"})
    assert candidate.describe()["egress"]["allow_hosts"] == ["pypi.org"]
    assert state.compiled["sb1"] is before and state.sandboxes["sb1"].template is None


def test_an_idna_entry_matches_the_a_label_a_connection_carries() -> None:
    lines = [
        flow("xn--bcher-kva.example", verdict="deny", rule="default:deny"),
        dns("XN--BCHER-KVA.example.", "deny", "default:deny"),
    ]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["bücher.example"]}))
    assert names(result.newly_allowed) == [
        ("xn--bcher-kva.example", None, "dns", 1),
        ("xn--bcher-kva.example", 443, "tls", 1),
    ]


@pytest.mark.parametrize(
    "hostname",
    ["*.example.com", "api.example.com:443", "1.2.3.4", "[::1]", "a" * 5000, "ex ample.com", "é.example", ""],
)
@pytest.mark.parametrize("port", [0, 1, 65535, 70000, -1])
def test_hostile_record_fields_are_decided_or_counted_never_raised(hostname: str, port: int) -> None:
    lines = [flow(hostname, port, protocol, "allow", "allow_hosts api.example.com") for protocol in ("tls", "http")]
    result = diff(lines, policy("allowlisted", {"allow_hosts": ["api.example.com"]}))
    assert result.records == 2 and result.records == result.replayed + sum(s.count for s in result.not_replayed)
    assert result.newly_allowed == [] and result.unchanged_allowed + result.newly_denied_records == result.replayed
