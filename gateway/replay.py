"""Replay: a sandbox's recorded flows and DNS queries decided again under a candidate policy, before it is applied.

`replay` is pure: it reads the flow log's batches (NDJSON, a record a line, as `FlowLog.batches_since` gives
them), reduces the records to distinct recorded flows, decides each distinct (name, address, port, protocol)
once with `decision.decide` under the candidate's compiled policy, and compares that with the recorded
verdict. What counts is whether the flow passes: a recorded `would_deny` (report mode)
passed, so a candidate that enforces and denies it makes it newly denied; a candidate in report mode lets a
denial by an allowlist's miss pass (its verdict says `would_deny`).

A record cannot tell everything, and the answer says so rather than guess:

- a flow that carried no name is decided again on the name its address was learned from DNS for
  (`learned_name`, as the engine decided it), else by its address only (`by_address_only`). A record written
  before records carried that name, which carried no name but was decided by a host rule, is not replayed, nor
  is one denied before its first bytes were read (allow_internet false, the isolated profile), which carries no
  name either;
- a record decided by a built-in guard (metadata, special addresses, the blocklist, peek, TLS, ECH, dial,
  resolution), a limit or a DNS rule before the policy (class, type, name grammar) kept the outcome the
  guard gave: the candidate changes the policy, not the guard. An allow_cidrs entry may lift a special-address
  refusal, which replay does not try;
- the inspection tier's per-request records (their connection's record is replayed) and tunnel requests
  (ingress, not egress) are not replayed.

A named connection the gateway dialled to another address than the one the sandbox asked for (the name's own
address, where the sandbox's pointed elsewhere) is decided on both: the asked one first, as the engine does, then
the dialled one, which a candidate's address rules (`deny_cidrs`) may refuse, as they refuse a resolved address.

Those are counted in `not_replayed` by why and rule.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Annotated, Any, Final, Literal

import msgspec

from gateway.decision import CompiledPolicy, Verdict, decide
from gateway.errors import GatewayError
from gateway.flowlog import FlowRecord, FlowVerdict, flow_verdict
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
        Rule.DENY_HOSTS,
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
NAME_RULES: Final = frozenset({Rule.ALLOW_HOSTS, Rule.PRESET, Rule.INSPECT, Rule.DENY_HOSTS})
#: DNS answers given after the policy allowed the name (an empty answer for a type not served): the name's
#: verdict is what the candidate changes.
DNS_AFTER_POLICY: Final = frozenset({Rule.DNS_HTTPS, Rule.DNS_QTYPE})

NotReplayedWhy = Literal["guard", "learned_name", "unread", "inspected_request", "tunnel"]
#: Denials the engine gives before it reads a byte (engine: PORT_OR_PROFILE_RULES): such a record carries no
#: name even when the connection would have sent one. SMTP is left out: it denies whatever the name.
UNREAD_RULES: Final = frozenset({Rule.NO_INTERNET, Rule.ISOLATED})
_WHY_TEXT: Final[dict[str, str]] = {
    "guard": "decided by a built-in guard, a limit or a DNS rule, not by the policy: the candidate keeps that outcome",
    "learned_name": "carried no name but was decided by a host rule (a name learned from DNS, which records "
    "written before records carried learned_name do not carry)",
    "unread": "denied before its first bytes were read (allow_internet false, profile isolated): the record has "
    "no name to decide it on",
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
class Seen:
    """The records of one distinct recorded flow (its rule included): how many, when the first and last ended."""

    count: int
    first_us: int
    last_us: int


#: The fields replay reads, with FlowRecord's own types (decoding only these is over twice as fast as the whole
#: record, and 100,000 records must replay in well under 2 s).
_READ: Final = ("end_us", "sandbox", "dst_addr", "orig_dst_addr", "orig_dst_port", "hostname", "protocol", "verdict",
                "rule", "method", "learned_name")  # fmt: skip
_DEFAULTS: Final = {f.name: f.default for f in fields(FlowRecord) if f.default is not MISSING}
_HINTS: Final = typing.get_type_hints(FlowRecord, include_extras=True)
_Replayed: Final = msgspec.defstruct(
    "_Replayed",
    [(name, _HINTS[name], _DEFAULTS[name]) if name in _DEFAULTS else (name, _HINTS[name]) for name in _READ],
    gc=False,
)
_decoder: Final = msgspec.json.Decoder(_Replayed)


def _decode(batch: bytes) -> tuple[list[Any], int]:
    """A batch's records and how many of its lines are not records (then decoded line by line, to count them)."""
    try:
        return _decoder.decode_lines(batch), 0
    except (msgspec.DecodeError, ValueError):
        pass
    records, unreadable = [], 0
    for line in batch.splitlines():
        if line.strip():
            try:
                records.append(_decoder.decode(line))
            except (msgspec.DecodeError, ValueError):
                unreadable += 1
    return records, unreadable


@dataclass(slots=True)
class _Group:
    """The distinct recorded flows of one (name, port, protocol) whose outcome the candidate changes."""

    verdict: Verdict
    first_us: int
    last_us: int
    recorded_rule: str
    count: int = 0
    addresses: set[str] = field(default_factory=set)

    def add(self, entry: Seen, rule: str, address: str | None) -> None:
        self.count += entry.count
        self.first_us = min(self.first_us, entry.first_us)
        if entry.last_us >= self.last_us:
            self.last_us, self.recorded_rule = entry.last_us, rule
        if address is not None and len(self.addresses) < MAX_GROUP_ADDRESSES:
            self.addresses.add(address)

    def view(self, name: str | None, port: int | None, protocol: str) -> DiffGroup:
        verdict = self.verdict
        return DiffGroup(
            name=name,
            port=port,
            protocol=protocol,
            count=self.count,
            addresses=sorted(self.addresses),
            first_seen_us=self.first_us,
            last_seen_us=self.last_us,
            recorded_rule=self.recorded_rule,
            verdict=flow_verdict(verdict.allowed, verdict.would_deny),
            rule=verdict.label,
            reason=verdict.reason,
            by_address_only=name is None,
        )


def why_not_replayed(
    protocol: str, verdict: str, rule: Rule | None, name: str | None, inspected: bool
) -> NotReplayedWhy | None:
    """Why a recorded flow is not decided again (None: it is)."""
    if inspected:
        return "inspected_request"
    if rule is Rule.TUNNEL:
        return "tunnel"
    if protocol == "dns":
        allowed_name = rule in DNS_AFTER_POLICY and verdict != "deny"
        return None if rule in POLICY_RULES or allowed_name else "guard"
    if rule not in POLICY_RULES:
        return "guard"
    if name is None and rule in NAME_RULES:
        return "learned_name"
    if name is None and rule in UNREAD_RULES:
        return "unread"
    return None


def decided_name(hostname: str | None, protocol: str) -> str | None:
    """The name the engine decided the connection on: an HTTP Host that is an address is decided by address."""
    if not hostname:
        return None
    # An address Host starts with a digit (IPv4) or has a ':' (IPv6): only those are parsed.
    if protocol == "http" and (hostname[0].isdigit() or ":" in hostname) and is_ip_literal(hostname.strip("[]")):
        return None
    return normalize_query_name(hostname)


#: A distinct recorded flow: (hostname, protocol, destination address, port, verdict, rule label, inspected, the
#: address dialled when it is another: None when it is the same, the name its address was learned from DNS for).
FlowKey = tuple[str | None, str, str, int, str, str, bool, str | None, str | None]


def distinct_flows(sandbox_id: str, batches: Iterable[bytes], since_us: int) -> tuple[dict[FlowKey, Seen], int]:
    """The distinct recorded flows of `sandbox_id` that ended at or after `since_us` in the batches (NDJSON, a
    flow record a line), each with how many records and when; and how many lines are not records."""
    seen: dict[FlowKey, Seen] = {}
    unreadable = 0
    for batch in batches:
        decoded, bad = _decode(batch)
        unreadable += bad
        for r in decoded:
            end_us = r.end_us
            if end_us < since_us or r.sandbox != sandbox_id:
                continue
            orig, dialled = r.orig_dst_addr, r.dst_addr
            key = (r.hostname, r.protocol, orig, r.orig_dst_port, r.verdict, r.rule, r.method is not None,
                   None if dialled == orig or not dialled else dialled, r.learned_name)  # fmt: skip
            entry = seen.get(key)
            if entry is None:
                seen[key] = Seen(1, end_us, end_us)
                continue
            entry.count += 1
            if end_us < entry.first_us:
                entry.first_us = end_us
            if end_us >= entry.last_us:
                entry.last_us = end_us
    return seen, unreadable


#: `decide`'s arguments after the policy: (name, address, port, protocol).
DecisionKey = tuple[str | None, str | None, int | None, str]


def decision_key_of(name: str | None, protocol: str, address: str, port: int) -> DecisionKey:
    """What a recorded flow is decided on: a DNS question on its name alone, a connection on all four."""
    return (name, None, None, "dns") if protocol == "dns" else (name, address, port, protocol)


def replay(sandbox_id: str, batches: Iterable[bytes], candidate: CompiledPolicy, since_us: int) -> PolicyDiff:
    """The candidate's diff over the batches (NDJSON, a flow record a line) of `sandbox_id`, for the records that
    ended at or after `since_us`; records of other sandboxes are skipped, lines that are not records counted."""
    # First the records, each reduced to its distinct recorded flow (most of a busy sandbox's records repeat a
    # few thousand); then each distinct flow classified and decided once.
    seen, unreadable = distinct_flows(sandbox_id, batches, since_us)
    records = replayed = unchanged_allowed = unchanged_denied = 0
    verdicts: dict[DecisionKey, Verdict] = {}
    changed: dict[tuple[bool, str | None, int | None, str], _Group] = {}
    skipped: dict[tuple[NotReplayedWhy, str], int] = {}
    rules: dict[str, Rule | None] = {}
    for (hostname, protocol, address, port, recorded, label, inspected, dialled, learned), entry in seen.items():
        records += entry.count
        rule = rules[label] if label in rules else rules.setdefault(label, Rule.of_label(label))
        name = decided_name(hostname, protocol) or learned
        why = why_not_replayed(protocol, recorded, rule, name, inspected)
        if why is not None:
            skipped_key = (why, rule.value if rule is not None else label)
            skipped[skipped_key] = skipped.get(skipped_key, 0) + entry.count
            continue
        replayed += entry.count
        decision_key = decision_key_of(name, protocol, address, port)
        verdict = verdicts.get(decision_key)
        if verdict is None:
            verdict = verdicts[decision_key] = decide(candidate, *decision_key)
        if (
            dialled is not None
            and name is not None
            and protocol != "dns"
            and verdict.allowed
            and verdict.rule is not Rule.ALLOW_CIDRS
        ):
            # Allowed by its name at the address asked for: the address it was dialled to is decided too (the
            # engine decides every resolved address it would dial on the name and that address; allowed by
            # allow_cidrs, it dials the address asked for, as an unnamed connection).
            dialled_key = (name, dialled, port, protocol)
            at_dialled = verdicts.get(dialled_key)
            if at_dialled is None:
                at_dialled = verdicts[dialled_key] = decide(candidate, *dialled_key)
            if not at_dialled.allowed:
                verdict = at_dialled
        passed = recorded != "deny"
        if passed == verdict.allowed:
            if passed:
                unchanged_allowed += entry.count
            else:
                unchanged_denied += entry.count
            continue
        group_key = (verdict.allowed, name, decision_key[2], decision_key[3])
        group = changed.get(group_key)
        if group is None:
            group = changed[group_key] = _Group(verdict, entry.first_us, entry.last_us, label)
        group.add(entry, label, decision_key[1])
    directions: dict[bool, list[DiffGroup]] = {True: [], False: []}
    for (allowed, group_name, group_port, group_protocol), group in changed.items():
        directions[allowed].append(group.view(group_name, group_port, group_protocol))
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
