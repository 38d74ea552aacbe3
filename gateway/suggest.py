"""Suggest: the smallest allowlist that would have allowed what a sandbox did, as a record to review and apply.

`suggest` is pure: it reads the flow log's batches as replay does (`replay.distinct_flows`), keeps the flows and
DNS questions of the window that the sandbox's own allowlist decided (allowed, denied, or would-deny in report
mode: what it wanted), and turns them into `allow_hosts`, `allow_cidrs` and `allow_ports` entries:

- a flow with a name (TLS SNI, HTTP Host, DNS question) gives that name; its ports decide the entry's form: a
  name used only on the ports a bare entry covers (`host_ports`; 443 when the record sets none, and then the
  candidate sets `host_ports: [443]` so that a bare entry means what the evidence shows) is a bare entry, any
  other port a `name:port` entry. A DNS question has no port and any entry of its name answers it: it joins the
  bare entry, or the lowest-port one when there is no bare one (a name only resolved is a bare entry);
- at least `MIN_SIBLINGS` distinct names one label under the same parent become `*.parent` (which matches
  exactly one extra label), with the union of their ports, unless the parent is a public suffix (`com`, `co.uk`,
  `github.io`, `s3.amazonaws.com`: the Public Suffix List): a wildcard there would allow strangers' names;
- a flow without a name, or whose name no entry can express (`_`, `*`, non-ASCII), gives its address as a /32
  or /128 in allow_cidrs, and its port to allow_ports (which restricts every allow_cidrs entry: the schema has
  no per-address port).

Left out, and counted by why: records a built-in guard, a limit or a DNS rule before the policy decided (the
guard refuses them whatever the allowlist says, so listing them would promise what the gateway will not do),
denials by a rule the record keeps (deny_hosts, deny_cidrs, SMTP), flows the rules the record keeps already
allow (presets, inspect entries), DNS names and ports no entry can express, and the records replay cannot decide
either (unread denials, inspected requests, tunnels). A flow without a name of its own to an address the gateway's
DNS answered with gives the name it was learned for (`learned_name`) on that port; in a record written before
records carried it, an exact allow_hosts entry's label names it (a wildcard's or a preset's does not: left out).

The candidate is the current record with allow_hosts, allow_cidrs and allow_ports (and host_ports when a bare
entry needs it) replaced; everything else, the enforcement mode included, stays. The caller compiles it as a PUT
would take it (the API does; a suggestion the parser refused would be refused with the parser's error).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Final, Literal

from gateway.decision import CompiledPolicy, Verdict, decide
from gateway.errors import GatewayError
from gateway.hostnames import is_public_suffix, normalize_pattern, split_host_entry
from gateway.policy import MAX_LIST_ENTRIES, PROFILE_EGRESS_FIELDS, Sandbox, schema_ref
from gateway.replay import DecisionKey, Seen, decided_name, decision_key_of, distinct_flows, why_not_replayed
from gateway.rules import Rule
from gateway.schema import Note

__all__ = ["MIN_SIBLINGS", "PolicySuggestion", "SuggestedEntry", "check_applicable", "kept_record", "suggest"]

#: Distinct names one label under a parent that become `*.parent`.
MIN_SIBLINGS: Final = 3
#: The port a bare entry covers when the record sets no host_ports (the candidate then sets it).
DEFAULT_BARE_PORT: Final = 443
#: Names listed per entry at most (the count is always whole).
MAX_EVIDENCE_NAMES: Final = 20
#: The allowlist fields the suggestion replaces.
REPLACED_FIELDS: Final = ("allow_hosts", "allow_cidrs", "allow_ports")
#: Denials by rules the candidate keeps (or the port guard): no allow entry lifts them.
KEPT_DENIALS: Final = frozenset({Rule.DENY_HOSTS, Rule.DENY_CIDRS, Rule.SMTP, Rule.NO_INTERNET, Rule.ISOLATED})

ExcludedWhy = Literal[
    "guard", "kept_denial", "already_allowed", "unusable", "learned_name", "unread", "inspected_request", "tunnel"
]
_WHY_TEXT: Final[dict[str, str]] = {
    "guard": "refused by a built-in guard, a limit or a DNS rule before the policy: no entry would allow them",
    "kept_denial": "denied by a rule the candidate keeps (deny_hosts, deny_cidrs, a blocked port)",
    "already_allowed": "allowed by a rule the candidate keeps (a preset, an inspect entry)",
    "unusable": "a DNS name or a port no allowlist entry can express (not a hostname pattern, a port outside "
    "1-65535, an unparseable address)",
    "learned_name": "carried no name but was decided by a wildcard or a preset (a name learned from DNS, which "
    "records written before records carried learned_name do not carry; the DNS question gives the name)",
    "unread": "denied before its first bytes were read (allow_internet false, profile isolated)",
    "inspected_request": "a request the inspection tier decided; its connection is counted",
    "tunnel": "a request through a tunnel (ingress), which egress policy does not decide",
}


@dataclass(frozen=True, slots=True)
class SuggestedEntry:
    """One entry of the suggestion and the records behind it."""

    entry: Annotated[str, Note(description="As it appears in the candidate's list.")]
    field: Annotated[str, Note(enum=["allow_hosts", "allow_cidrs"])]
    records: Annotated[int, Note(minimum=1, description="Records (flows and DNS questions) the entry covers.")]
    denied_records: Annotated[
        int, Note(minimum=0, description="Of those, records that were denied or would-denied (report mode).")
    ]
    names: Annotated[
        list[str], Note(description=f"Names the entry covers, at most {MAX_EVIDENCE_NAMES}; empty for an address.")
    ]
    names_total: Annotated[int, Note(minimum=0)]
    ports: Annotated[list[int], Note(description="Destination ports of its flows (none for DNS questions).")]
    first_seen_us: Annotated[int, Note(description="The first record's end, µs since the epoch.")]
    last_seen_us: Annotated[int, Note(description="The last record's end, µs since the epoch.")]


@dataclass(frozen=True, slots=True)
class Excluded:
    """Records the suggestion leaves out, by why and by the rule that decided them."""

    why: ExcludedWhy
    rule: Annotated[str, Note(description="The recorded rule, without its detail (for already_allowed and "
                                          "kept_denial: the rule that decides under the candidate).")]  # fmt: skip
    count: Annotated[int, Note(minimum=1)]
    explanation: str


@dataclass(frozen=True, slots=True)
class PolicySuggestion:
    """The smallest allowlist that would have allowed the sandbox's recorded flows and DNS queries, as a
    complete candidate record. Nothing is applied."""

    sandbox: str
    since_us: Annotated[int, Note(description="Records that ended at or after this time, µs since the epoch.")]
    records: Annotated[int, Note(minimum=0, description="Records read in the window.")]
    covered_records: Annotated[int, Note(minimum=0, description="Records the suggested entries cover.")]
    entries: list[SuggestedEntry]
    excluded: list[Excluded]
    unreadable: Annotated[int, Note(minimum=0, description="Lines of the batches that are not flow records.")]
    record: Annotated[
        dict[str, Any],
        Note(
            schema_ref("SandboxReplace"),
            description="The candidate: the current record with allow_hosts, allow_cidrs, allow_ports (and "
            "host_ports) replaced. Review it, try it with policy diff, apply it with a PUT.",
        ),
    ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Use:
    """The records of one name on one port (None: DNS questions), or of one address on one port."""

    records: int = 0
    denied: int = 0
    first_us: int = 0
    last_us: int = 0

    def add(self, seen: Seen, denied: bool) -> None:
        if self.records == 0 or seen.first_us < self.first_us:
            self.first_us = seen.first_us
        self.last_us = max(self.last_us, seen.last_us)
        self.records += seen.count
        self.denied += seen.count if denied else 0


@dataclass(slots=True)
class _Evidence:
    """An entry's records, gathered from its names' (or its address's) uses."""

    names: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    uses: list[_Use] = field(default_factory=list)

    def add(self, name: str | None, port: int | None, use: _Use) -> None:
        if name is not None:
            self.names.add(name)
        if port is not None:
            self.ports.add(port)
        self.uses.append(use)

    def view(self, entry: str, field_name: str) -> SuggestedEntry:
        names = sorted(self.names)
        return SuggestedEntry(
            entry=entry,
            field=field_name,
            records=sum(u.records for u in self.uses),
            denied_records=sum(u.denied for u in self.uses),
            names=names[:MAX_EVIDENCE_NAMES],
            names_total=len(names),
            ports=sorted(self.ports),
            first_seen_us=min(u.first_us for u in self.uses),
            last_seen_us=max(u.last_us for u in self.uses),
        )


def entry_name(name: str) -> str | None:
    """The name as an allow_hosts entry matches it, or None when no entry can: an entry is a canonical pattern,
    and decide looks names up lowercased without a trailing dot, so only a name that is its own canonical form
    (ASCII, punycode for IDNA, no `*`) is one an entry would match."""
    if "*" in name:
        return None
    try:
        return name if normalize_pattern(name) == name else None
    except GatewayError:
        return None


def _address_network(address: str) -> str | None:
    """The /32 or /128 of a recorded destination address (an IPv4-mapped IPv6 one as IPv4), None if unparseable."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return str(ipaddress.ip_network(parsed))


def wildcard_parent(parent: str) -> bool:
    """Whether `*.parent` is a wildcard the suggestion may propose: the parent is no public suffix, so the wildcard
    never spans several registrants' names (`*.co.uk`, `*.github.io`, every bucket of `*.s3.amazonaws.com`)."""
    return not is_public_suffix(parent)


def _patterns(names: Iterable[str]) -> dict[str, list[str]]:
    """Each pattern (an exact name or a collapsed `*.parent`) and the names it stands for."""
    by_parent: dict[str, list[str]] = {}
    for name in names:
        dot = name.find(".")
        if dot > 0:
            by_parent.setdefault(name[dot + 1 :], []).append(name)
    patterns: dict[str, list[str]] = {}
    collapsed: set[str] = set()
    for parent, siblings in by_parent.items():
        if len(siblings) >= MIN_SIBLINGS and wildcard_parent(parent):
            patterns[f"*.{parent}"] = siblings
            collapsed.update(siblings)
    for name in names:
        if name not in collapsed:
            patterns[name] = [name]
    return patterns


def _too_many(field_name: str, count: int) -> GatewayError:
    return GatewayError(
        "SUGGESTION_TOO_LARGE",
        f"the suggestion needs {count} {field_name} entries and a record holds at most {MAX_LIST_ENTRIES}; "
        "give a shorter since, or write the record by hand (a preset holds more)",
        status=409,
    )


def check_applicable(sandbox: Sandbox, kept: CompiledPolicy) -> None:
    """Raises SUGGEST_NOT_APPLICABLE (409) when an allowlist would change nothing for the sandbox."""
    why = None
    if "allow_hosts" not in PROFILE_EGRESS_FIELDS[sandbox.profile]:
        why = f"profile {sandbox.profile} takes no allow_hosts"
    elif kept.allow_all:
        why = "the policy allows all egress (profile unrestricted, mode allow_all); set egress.mode deny_all with "
        why += "egress.enforcement report first, so the allowlist's misses pass and are recorded"
    elif not kept.allow_internet:
        why = "egress is disabled (allow_internet false)"
    if why is not None:
        raise GatewayError("SUGGEST_NOT_APPLICABLE", f"no allowlist applies to sandbox {sandbox.id}: {why}",
                           status=409)  # fmt: skip


def kept_record(sandbox: Sandbox) -> dict[str, Any]:
    """The sandbox's record without its allowlist (the replaced fields set empty, so a template's do not come
    back): compiled, what decides the flows the suggestion needs no entry for."""
    current = sandbox.to_dict()
    return {**current, "egress": {**current["egress"], **{name: [] for name in REPLACED_FIELDS}}}


def suggest(sandbox: Sandbox, batches: Iterable[bytes], kept: CompiledPolicy, since_us: int) -> PolicySuggestion:
    """The suggestion for `sandbox` from the batches' records that ended at or after `since_us`. `kept` is
    `kept_record(sandbox)` compiled as a PUT of it would be; the caller checks the answer's record the same way
    (here it is only built: parsing reads the live policy state, which belongs to the caller's thread)."""
    check_applicable(sandbox, kept)
    current = sandbox.to_dict()
    bare_ports = frozenset(kept.effective_egress.host_ports or (DEFAULT_BARE_PORT,))

    seen, unreadable = distinct_flows(sandbox.id, batches, since_us)
    records = 0
    name_uses: dict[str, dict[int | None, _Use]] = {}
    address_uses: dict[str, dict[int, _Use]] = {}
    excluded: dict[tuple[ExcludedWhy, str], int] = {}
    # Memoized as replay does: a busy sandbox's distinct flows share a few labels, names and decisions.
    rules: dict[str, Rule | None] = {}
    entry_names: dict[str, str | None] = {}
    verdicts: dict[DecisionKey, Verdict] = {}
    for (hostname, protocol, address, port, recorded, label, inspected, _dialled, learned), entry in seen.items():
        records += entry.count
        rule = rules[label] if label in rules else rules.setdefault(label, Rule.of_label(label))
        name = decided_name(hostname, protocol) or learned
        why: ExcludedWhy | None = why_not_replayed(protocol, recorded, rule, name, inspected)
        shown = rule.value if rule is not None else label
        if why == "learned_name" and rule is Rule.ALLOW_HOSTS:
            # Decided by the name the gateway's DNS answer taught it, which the label names when the entry is an
            # exact one: that name was used on this port (with host_ports [443], a bare entry would not be).
            learned, _ = split_host_entry(label.partition(" ")[2])
            if "*" not in learned:
                why, name = None, learned
        if why is None:
            key = decision_key_of(name, protocol, address, port)
            verdict = verdicts.get(key)
            if verdict is None:
                verdict = verdicts[key] = decide(kept, *key)
            if verdict.allowed and not verdict.would_deny:
                why, shown = "already_allowed", verdict.rule.value
            elif verdict.rule in KEPT_DENIALS:
                why, shown = "kept_denial", verdict.rule.value
        use_port = None if protocol == "dns" else port
        if why is None and use_port is not None and not 0 < use_port <= 65535:
            why = "unusable"
        if why is None:
            denied = recorded != "allow"
            if name is not None:
                usable = entry_names[name] if name in entry_names else entry_names.setdefault(name, entry_name(name))
                if usable is not None:
                    name_uses.setdefault(usable, {}).setdefault(use_port, _Use()).add(entry, denied)
                    continue
            # A connection without a name, or whose name no entry can express (decide tries the address after
            # the name's miss): its address.
            if use_port is not None and (network := _address_network(address)) is not None:
                address_uses.setdefault(network, {}).setdefault(use_port, _Use()).add(entry, denied)
                continue
            why = "unusable"
        excluded[why, shown] = excluded.get((why, shown), 0) + entry.count

    host_entries: dict[str, _Evidence] = {}
    for pattern, names in sorted(_patterns(name_uses).items()):
        used = {port for name in names for port in name_uses[name] if port is not None}
        other_ports = used - bare_ports
        bare = not other_ports or bool(used & bare_ports)
        # A DNS question has no port and any entry of its name answers it: the bare one when there is one, so a
        # name used only on 8443 and resolved is `name:8443` alone, not also a bare entry it never used.
        dns_entry = pattern if bare else f"{pattern}:{min(other_ports)}"
        for name in names:
            for on, use in name_uses[name].items():
                entry_text = dns_entry if on is None else pattern if on in bare_ports else f"{pattern}:{on}"
                host_entries.setdefault(entry_text, _Evidence()).add(name, on, use)
    cidr_entries: dict[str, _Evidence] = {}
    for network, uses in address_uses.items():
        for on_port, address_use in uses.items():
            cidr_entries.setdefault(network, _Evidence()).add(None, on_port, address_use)
    cidr_order = sorted(cidr_entries, key=lambda net: (ipaddress.ip_network(net).version, ipaddress.ip_network(net)))
    ports = sorted({port for uses in address_uses.values() for port in uses})
    for field_name, count in (("allow_hosts", len(host_entries)), ("allow_cidrs", len(cidr_order)),
                              ("allow_ports", len(ports))):  # fmt: skip
        if count > MAX_LIST_ENTRIES:
            raise _too_many(field_name, count)

    egress = {**current["egress"], "allow_hosts": sorted(host_entries), "allow_cidrs": cidr_order,
              "allow_ports": ports}  # fmt: skip
    if not kept.effective_egress.host_ports and any(":" not in entry for entry in host_entries):
        egress["host_ports"] = [DEFAULT_BARE_PORT]
    candidate = {**current, "egress": egress}
    entries = [host_entries[e].view(e, "allow_hosts") for e in sorted(host_entries)]
    entries += [cidr_entries[net].view(net, "allow_cidrs") for net in cidr_order]
    return PolicySuggestion(
        sandbox=sandbox.id,
        since_us=since_us,
        records=records,
        covered_records=sum(e.records for e in entries),
        entries=entries,
        excluded=[
            Excluded(why, rule, count, _WHY_TEXT[why])
            for (why, rule), count in sorted(excluded.items(), key=lambda item: (-item[1], item[0]))
        ],
        unreadable=unreadable,
        record=candidate,
    )
