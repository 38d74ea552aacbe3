"""Replay: a sandbox's recorded flows and DNS queries decided again under a candidate policy, before it is applied.

`replay` is pure: it reads NDJSON record lines (what the flow log's batches hold), decides each distinct
(name, address, port, protocol) once with `decision.decide` under the candidate's compiled policy, and compares
that with the recorded verdict. What counts is whether the flow passes: a recorded `would_deny` (report mode)
passed, so a candidate that enforces and denies it makes it newly denied; a candidate in report mode lets a
denial by an allowlist's miss pass (its verdict says `would_deny`).

A record cannot tell everything, and the answer says so rather than guess:

- a flow that carried no name is decided again by its address only (`by_address_only`): a name the sandbox
  resolved through the gateway's DNS (a learned destination) may decide such a connection, and the record
  does not carry it. A recorded flow that carried no name but was decided by a host rule (the learned name) is
  not replayed at all;
- a record decided by a built-in guard (metadata, special addresses, the blocklist, peek, TLS, ECH, dial,
  resolution), a limit or a DNS rule before the policy (class, type, name grammar) kept the outcome the
  guard gave: the candidate changes the policy, not the guard. An allow_cidrs entry may lift a special-address
  refusal, which replay does not try;
- the inspection tier's per-request records (their connection's record is replayed) and tunnel requests
  (ingress, not egress) are not replayed.

Those are counted in `not_replayed` by why and rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Final, Literal

from gateway.decision import CompiledPolicy, Verdict, decide
from gateway.errors import GatewayError
from gateway.flowlog import FlowRecord, FlowVerdict, decode_record, flow_verdict
from gateway.hostnames import is_ip_literal, normalize_query_name
from gateway.policy import schema_ref
from gateway.rules import Rule
from gateway.schema import Note

__all__ = ["DEFAULT_SINCE", "MAX_GROUPS", "MAX_SINCE_SECONDS", "DiffGroup", "PolicyDiff", "parse_since", "replay"]

DEFAULT_SINCE: Final = "24h"
#: The window a diff may look back over: 30 days.
MAX_SINCE_SECONDS: Final = 30 * 86400
#: Groups listed per direction at most (the largest first); the record counts are always whole.
MAX_GROUPS: Final = 1000
#: Destination addresses listed per group at most.
MAX_GROUP_ADDRESSES: Final = 10
_SINCE: Final = re.compile(r"([1-9][0-9]{0,6})([smhd])\Z")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}

#: Rules `decide` gives: a record decided by one of these is decided again under the candidate.
POLICY_RULES: Final = frozenset(
    {
        Rule.ALLOW_HOSTS,
        Rule.PRESET,
        Rule.INSPECT,
        Rule.ALLOW_CIDRS,
        Rule.DENY_CIDRS,
        Rule.ALLOW_PORTS,
        Rule.ALLOW_ALL,
        Rule.NO_INTERNET,
        Rule.ISOLATED,
        Rule.UNRESTRICTED_DNS,
        Rule.DEFAULT_DENY,
        Rule.SMTP,
    }
)
#: Policy rules that match a name: recorded for a flow without one, they decided a name learned from DNS.
NAME_RULES: Final = frozenset({Rule.ALLOW_HOSTS, Rule.PRESET, Rule.INSPECT})
#: DNS answers given after the policy allowed the name (an empty answer for a type not served): the name's
#: verdict is what the candidate changes.
DNS_AFTER_POLICY: Final = frozenset({Rule.DNS_HTTPS, Rule.DNS_QTYPE})

NotReplayedWhy = Literal["guard", "learned_name", "inspected_request", "tunnel"]
_WHY_TEXT: Final[dict[str, str]] = {
    "guard": "decided by a built-in guard, a limit or a DNS rule, not by the policy: the candidate keeps that outcome",
    "learned_name": "carried no name but was decided by a host rule (a name learned from DNS, which the record "
    "does not carry)",
    "inspected_request": "a request the inspection tier decided; its connection's record is replayed",
    "tunnel": "a request through a tunnel (ingress), which egress policy does not decide",
}


def parse_since(text: str) -> int:
    """Seconds of a look-back window: a positive integer and a unit, `90s`, `30m`, `24h`, `7d` (at most 30 days).
    Raises GatewayError INVALID_PARAMETER (field `since`)."""
    match = _SINCE.match(text) if isinstance(text, str) else None
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    if not match or seconds > MAX_SINCE_SECONDS:
        shown = repr(text) if len(str(text)) <= 40 else f"{str(text)[:20]!r}..."
        raise GatewayError(
            "INVALID_PARAMETER",
            f"since must be a duration like 90s, 30m, 24h or 7d, at most 30d; got {shown}",
            "since",
        )
    return seconds


@dataclass(frozen=True, slots=True)
class DiffGroup:
    """The recorded flows of one (name, port, protocol) whose outcome the candidate changes."""

    name: Annotated[
        str | None,
        Note(description="TLS SNI, HTTP Host or DNS question, normalized; null: the flows carried no name."),
    ]
    port: Annotated[int | None, Note(description="The destination port the sandbox asked for; null for DNS.")]
    protocol: Annotated[str, Note(enum=["tls", "http", "tcp", "dns"])]
    count: Annotated[int, Note(minimum=1, description="Records.")]
    addresses: Annotated[
        list[str], Note(description=f"Destination addresses the sandbox asked for (at most {MAX_GROUP_ADDRESSES}).")
    ]
    first_seen_us: Annotated[int, Note(description="The first record's end, µs since the epoch.")]
    last_seen_us: Annotated[int, Note(description="The last record's end, µs since the epoch.")]
    recorded_rule: Annotated[str, Note(description="The rule that decided the latest record.")]
    verdict: Annotated[FlowVerdict, Note(description="The candidate's verdict.")]
    rule: Annotated[str, Note(description="The rule that decides under the candidate.")]
    reason: Annotated[str, Note(description="The candidate's reason, for people.")]
    by_address_only: Annotated[
        bool,
        Note(
            description="The flows carried no name and are decided by address: a name the sandbox resolves "
            "through the gateway's DNS could decide such a connection differently."
        ),
    ]


@dataclass(frozen=True, slots=True)
class NotReplayed:
    """Records replay leaves out, by why and by the rule that decided them."""

    why: NotReplayedWhy
    rule: Annotated[str, Note(description="The recorded rule, without its detail.")]
    count: Annotated[int, Note(minimum=1)]
    explanation: str


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    """What a candidate policy would newly deny and newly allow among the sandbox's recorded flows and DNS
    queries. Nothing is applied."""

    sandbox: str
    since_us: Annotated[int, Note(description="Records that ended at or after this time, µs since the epoch.")]
    records: Annotated[int, Note(minimum=0, description="Records read in the window.")]
    replayed: Annotated[int, Note(minimum=0, description="Records decided again under the candidate.")]
    decisions: Annotated[int, Note(minimum=0, description="Distinct (name, address, port, protocol) decided.")]
    newly_denied_records: Annotated[int, Note(minimum=0)]
    newly_allowed_records: Annotated[int, Note(minimum=0)]
    unchanged_allowed: Annotated[int, Note(minimum=0, description="Replayed records that pass before and after.")]
    unchanged_denied: Annotated[int, Note(minimum=0, description="Replayed records denied before and after.")]
    newly_denied: Annotated[list[DiffGroup], Note(description=f"The largest {MAX_GROUPS} groups at most.")]
    newly_allowed: Annotated[list[DiffGroup], Note(description=f"The largest {MAX_GROUPS} groups at most.")]
    truncated: Annotated[bool, Note(description=f"A direction had more than {MAX_GROUPS} groups.")]
    not_replayed: list[NotReplayed]
    unreadable: Annotated[int, Note(minimum=0, description="Lines of the batches that are not flow records.")]
    policy: Annotated[dict[str, Any], Note(schema_ref("EffectivePolicy"), description="The candidate, compiled.")]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Group:
    count: int = 0
    first_us: int = 0
    last_us: int = 0
    recorded_rule: str = ""
    addresses: set[str] = field(default_factory=set)


_RULES_LONGEST_FIRST: Final = sorted(Rule, key=lambda rule: len(rule.value), reverse=True)


def rule_of(label: str) -> Rule | None:
    """The rule of a record's label (`allow_hosts api.example.com`, `tunnel:ab12`, `malware list x (line 3)`)."""
    for rule in _RULES_LONGEST_FIRST:
        value = rule.value
        if label.startswith(value) and (len(label) == len(value) or label[len(value)] in " :"):
            return rule
    return None


def _not_replayed(record: FlowRecord, rule: Rule | None) -> NotReplayedWhy | None:
    """Why a record is not decided again (None: it is)."""
    if record.method is not None:
        return "inspected_request"
    if rule is Rule.TUNNEL:
        return "tunnel"
    if record.protocol == "dns":
        allowed_name = rule in DNS_AFTER_POLICY and record.verdict != "deny"
        return None if rule in POLICY_RULES or allowed_name else "guard"
    if rule not in POLICY_RULES:
        return "guard"
    if rule in NAME_RULES and _name(record) is None:
        return "learned_name"
    return None


def _name(record: FlowRecord) -> str | None:
    """The name the engine decided the connection on: an HTTP Host that is an address is decided by address."""
    hostname = record.hostname
    if not hostname or (record.protocol == "http" and is_ip_literal(hostname.strip("[]"))):
        return None
    return normalize_query_name(hostname)


def replay(sandbox_id: str, lines: Iterable[bytes], candidate: CompiledPolicy, since_us: int) -> PolicyDiff:
    """The candidate's diff over the record lines (one NDJSON flow record each) of `sandbox_id` that ended at or
    after `since_us`; lines of other sandboxes are skipped, lines that are not records counted as unreadable."""
    records = replayed = unreadable = unchanged_allowed = unchanged_denied = 0
    verdicts: dict[tuple[str | None, str | None, int | None, str], Verdict] = {}
    changed: dict[tuple[bool, str | None, int | None, str], _Group] = {}
    changed_verdicts: dict[tuple[bool, str | None, int | None, str], tuple[Verdict, bool]] = {}
    skipped: dict[tuple[NotReplayedWhy, str], int] = {}
    rules: dict[str, Rule | None] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            record = decode_record(line)
        except ValueError:
            unreadable += 1
            continue
        if record.sandbox != sandbox_id or record.end_us < since_us:
            continue
        records += 1
        label = record.rule
        if label not in rules:
            rules[label] = rule_of(label)
        rule = rules[label]
        why = _not_replayed(record, rule)
        if why is not None:
            key = (why, rule.value if rule is not None else label)
            skipped[key] = skipped.get(key, 0) + 1
            continue
        replayed += 1
        name = _name(record)
        if record.protocol == "dns":
            decision_key: tuple[str | None, str | None, int | None, str] = (name, None, None, "dns")
        else:
            decision_key = (name, record.orig_dst_addr, record.orig_dst_port, record.protocol)
        verdict = verdicts.get(decision_key)
        if verdict is None:
            verdict = verdicts[decision_key] = decide(candidate, *decision_key)
        passed = record.verdict != "deny"
        if passed == verdict.allowed:
            if passed:
                unchanged_allowed += 1
            else:
                unchanged_denied += 1
            continue
        group_key = (verdict.allowed, name, decision_key[2], decision_key[3])
        group = changed.get(group_key)
        if group is None:
            group = changed[group_key] = _Group(first_us=record.end_us, last_us=record.end_us)
            changed_verdicts[group_key] = verdict, name is None
        group.count += 1
        if record.end_us <= group.first_us:
            group.first_us = record.end_us
        if record.end_us >= group.last_us:
            group.last_us, group.recorded_rule = record.end_us, label
        if decision_key[1] is not None and len(group.addresses) < MAX_GROUP_ADDRESSES:
            group.addresses.add(decision_key[1])
    directions: dict[bool, list[DiffGroup]] = {True: [], False: []}
    for (allowed, name, port, protocol), group in changed.items():
        verdict, by_address = changed_verdicts[allowed, name, port, protocol]
        directions[allowed].append(
            DiffGroup(
                name=name,
                port=port,
                protocol=protocol,
                count=group.count,
                addresses=sorted(group.addresses),
                first_seen_us=group.first_us,
                last_seen_us=group.last_us,
                recorded_rule=group.recorded_rule,
                verdict=flow_verdict(verdict.allowed, verdict.would_deny),
                rule=verdict.label,
                reason=verdict.reason,
                by_address_only=by_address,
            )
        )
    for groups in directions.values():
        groups.sort(key=lambda g: (-g.count, g.name or "", g.protocol, g.port or 0))
    return PolicyDiff(
        sandbox=sandbox_id,
        since_us=since_us,
        records=records,
        replayed=replayed,
        decisions=len(verdicts),
        newly_denied_records=sum(g.count for g in directions[False]),
        newly_allowed_records=sum(g.count for g in directions[True]),
        unchanged_allowed=unchanged_allowed,
        unchanged_denied=unchanged_denied,
        newly_denied=directions[False][:MAX_GROUPS],
        newly_allowed=directions[True][:MAX_GROUPS],
        truncated=max(len(directions[False]), len(directions[True])) > MAX_GROUPS,
        not_replayed=[
            NotReplayed(why, rule, count, _WHY_TEXT[why])
            for (why, rule), count in sorted(skipped.items(), key=lambda item: (-item[1], item[0]))
        ],
        unreadable=unreadable,
        policy=candidate.describe(),
    )
