"""Per-connection decisions: a policy compiled once, then `decide()` in O(1) of its list sizes.

`compile_policy` merges a sandbox over its template and applies the profile's
ceiling; `decide` is a pure function of the compiled policy and the connection's
(hostname, address, port, protocol). Host lookups are one dict probe for the exact
name and one for the parent of a first-level wildcard; CIDR lookups are one dict
probe per distinct prefix length present (at most 33 for IPv4, 129 for IPv6),
whatever the number of entries.

The `egress.inspect` entries are the first host table: a name they mark (exactly or by a wildcard) on one
of their ports is decided INSPECT even where allow_hosts or a preset also allows it, so the engine hands it
to the inspection tier; on their other ports the later tables still answer.

The `egress.deny_hosts` entries are looked up before every allow rule and profile switch (only SMTP and the
isolated profile come first): a name they refuse is refused whatever allows it, allow_all included. A host
entry with a port (`api.example.com:8443`, in allow_hosts or deny_hosts) applies to that port only; a DNS
question has no port, so only a bare deny entry refuses it.

A policy in report mode (`egress.enforcement: report`) turns a denial whose rule is `Rule.reportable` (an
allowlist's miss) into an allowing verdict marked `would_deny`, in `decide` and only there: every caller (the
engine's plan, the DNS interceptor, explain) lets it pass and records it as would-deny with the rule that
would have denied.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, astuple, dataclass, replace
from typing import Annotated, Any

from gateway.hostnames import normalize_query_name, split_host_entry
from gateway.inspection import InspectRule
from gateway.policy import (
    EGRESS_MODES,
    ENFORCEMENT_MODES,
    PORT_SCHEMA,
    PROFILE_EGRESS_FIELDS,
    PROFILES,
    Egress,
    IPAddress,
    IPNetwork,
    Limits,
    Sandbox,
    Template,
    schema_ref,
)
from gateway.presets import REGISTRY_PRESET, Preset
from gateway.revisions import REVISION_PATTERN, revision_id
from gateway.rules import Rule
from gateway.schema import Note

#: Refused in every profile (spam prevention; ZYBER's "Default Blocked", docs/feature-map.md).
ALWAYS_BLOCKED_PORTS: Mapping[int, str] = {25: "SMTP", 465: "SMTPS", 587: "SMTP submission"}
DEFAULT_LIMITS = Limits(connections_per_minute=1000, bandwidth_mbit=100, burst_mbit=1000, dns_queries_per_minute=500)
PROTOCOLS = ("tls", "http", "tcp", "udp", "dns")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of `decide`: the rule that decided and, for a rule naming a policy entry, which entry.
    `would_deny`: allowed only because the policy is in report mode; `rule` is the one that would deny.
    `wildcard`: allowed by a wildcard entry (`*.example.com`), so the name's first label is the client's own
    choice (the DNS interceptor limits such names: gateway.dns.budget)."""

    allowed: bool
    reason: str
    rule: Rule
    detail: str = ""
    would_deny: bool = False
    wildcard: bool = False

    @property
    def label(self) -> str:
        """The rule as records show it (`allow_hosts api.example.com`, `default:deny`)."""
        return self.rule.label(self.detail)

    def to_dict(self) -> dict[str, Any]:
        return asdict(VerdictView(self.allowed, self.reason, self.label, self.would_deny))


@dataclass(frozen=True, slots=True)
class VerdictView:
    """What the data plane decides for a connection, and why."""

    allowed: bool
    reason: Annotated[str, Note(description="Why, for people.")]
    rule: Annotated[
        str,
        Note(
            description="Which rule decided, e.g. `allow_hosts api.github.com`, `preset git-hosts`, "
            "`deny_cidrs 10.0.0.0/8`, `default:deny`."
        ),
    ]
    would_deny: Annotated[
        bool,
        Note(
            description="Allowed only because the policy is in report mode (egress.enforcement report): under "
            "enforce, `rule` would deny it."
        ),
    ] = False


@dataclass(frozen=True, slots=True)
class ChainStep:
    """One step of explain's precedence chain: a rule looked at, in `decide`'s order, and what it found."""

    rule: Annotated[str, Note(description="The rule, as records show it (`deny_hosts`, `default:deny`).")]
    result: Annotated[str, Note(description="What it found: why it passed the connection on, or the verdict.")]
    decided: Annotated[bool, Note(description="The last step: the one whose verdict stands.")] = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    """The connection explain was asked about."""

    host: str | None
    address: str | None
    port: Annotated[int, Note(PORT_SCHEMA)] | None
    protocol: Annotated[str, Note(enum=list(PROTOCOLS))]
    #: The HTTP request on the connection, when one was asked about (the path without its query).
    method: str | None = None
    path: Annotated[str, Note(description="Without its query.")] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    connections_per_minute: Annotated[int, Note(minimum=1)]
    bandwidth_mbit: Annotated[int, Note(minimum=1)]
    burst_mbit: Annotated[int, Note(minimum=1)]
    dns_queries_per_minute: Annotated[int, Note(minimum=1)]


@dataclass(frozen=True, slots=True)
class PolicyView:
    """The compiled policy the data plane enforces: the sandbox merged over its template, capped by its
    profile, with the default limits filled in."""

    sandbox: str
    revision: Annotated[
        str, Note(pattern=REVISION_PATTERN.pattern, description="The revision of the records it was compiled from.")
    ]
    profile: Annotated[str, Note(enum=list(PROFILES))]
    allow_internet: bool
    mode: Annotated[str, Note(enum=list(EGRESS_MODES))]
    enforcement: Annotated[str, Note(enum=list(ENFORCEMENT_MODES))]
    egress: Annotated[dict[str, Any], Note(schema_ref("Egress"))]
    limits: EffectiveLimits


# Bound once: address_key runs per connection, and attribute lookups are a good part of its cost.
_inet_pton, _AF_INET, _AF_INET6, _from_bytes = socket.inet_pton, socket.AF_INET, socket.AF_INET6, int.from_bytes


def address_key(address: str | IPAddress) -> tuple[int, int]:
    """(IP version, integer value) of an address; IPv4-mapped IPv6 is unwrapped to IPv4.

    Raises ValueError for a string that is not an address.
    """
    if isinstance(address, str):
        # IPv4 text never contains ':' and IPv6 text always does: pick the family instead of failing over.
        try:
            if ":" not in address:
                return 4, _from_bytes(_inet_pton(_AF_INET, address))
            value = _from_bytes(_inet_pton(_AF_INET6, address.split("%", 1)[0]))
        except OSError:
            raise ValueError(f"{address!r} is not an IP address") from None
    else:
        if address.version == 4:
            return 4, int(address)
        value = int(address)
    if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d
        return 4, value & 0xFFFFFFFF
    return 6, value


class NetSet:
    """A set of CIDRs answering "which entry contains this address" with one probe per prefix length."""

    __slots__ = ("_tables",)

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        by_version: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
        for net in networks:
            bits = net.max_prefixlen
            shift = bits - net.prefixlen
            table = by_version[net.version].setdefault(shift, {})
            table.setdefault(int(net.network_address) >> shift, str(net))
        # Smallest shift first: the most specific entry answers.
        self._tables: dict[int, tuple[tuple[int, dict[int, str]], ...]] = {
            version: tuple(sorted(tables.items())) for version, tables in by_version.items()
        }

    def match(self, key: tuple[int, int]) -> str | None:
        version, value = key
        for shift, table in self._tables[version]:
            hit = table.get(value >> shift)
            if hit is not None:
                return hit
        return None

    def __bool__(self) -> bool:
        return any(self._tables.values())


class NeverReach:
    """The `[invariants]` assertions that apply to one sandbox, ready for `decide`: each (networks, ports, name,
    description) refuses an address in its networks on one of its ports (an empty side: any)."""

    __slots__ = ("_entries",)

    def __init__(self, assertions: Iterable[tuple[Iterable[IPNetwork], frozenset[int], str, str]]) -> None:
        self._entries = tuple(
            (NetSet(nets) if nets else None, ports or None, Verdict(False, f"refused by {text}", Rule.INVARIANT, name))
            for nets, ports, name, text in assertions
        )

    def refusal(self, address: str | IPAddress | None, port: int | None) -> Verdict | None:
        key = None
        for nets, ports, verdict in self._entries:
            if ports is not None and port not in ports:
                continue
            if nets is not None:
                if address is None:
                    continue
                if key is None:
                    try:
                        key = address_key(address)
                    except ValueError:
                        return None  # decide refuses an unparseable address itself
                if nets.match(key) is None:
                    continue
            return verdict
        return None


HostRule = tuple[frozenset[int] | None, Rule, str]  # (ports or None for any port, rule, its detail)


@dataclass(frozen=True, slots=True)
class HostTable:
    """Host rules indexed for lookup: exact names, and first-level wildcards by their parent name."""

    exact: Mapping[str, tuple[HostRule, ...]]
    wildcard: Mapping[str, tuple[HostRule, ...]]

    @classmethod
    def build(cls, rules: Iterable[tuple[str, frozenset[int] | None, Rule, str]]) -> HostTable:
        exact: dict[str, list[HostRule]] = {}
        wildcard: dict[str, list[HostRule]] = {}
        for pattern, ports, rule, detail in rules:
            if pattern.startswith("*."):
                wildcard.setdefault(pattern[2:], []).append((ports, rule, detail))
            else:
                exact.setdefault(pattern, []).append((ports, rule, detail))
        return cls({name: tuple(r) for name, r in exact.items()}, {name: tuple(r) for name, r in wildcard.items()})

    def denial(self, name: str, port: int | None) -> str | None:
        """The detail of the first entry refusing `name` on `port` (a deny list's lookup): a bare entry refuses
        every port, a host:port entry its own port only, so a question with no port (DNS) only by a bare one."""
        rules = self.exact.get(name)
        if rules is None:
            dot = name.find(".")
            rules = self.wildcard.get(name[dot + 1 :]) if dot > 0 else None
        elif (dot := name.find(".")) > 0 and name[dot + 1 :] in self.wildcard:
            rules = (*rules, *self.wildcard[name[dot + 1 :]])  # rare: the name and its parent's wildcard are listed
        for ports, _, detail in rules or ():
            if ports is None or (port is not None and port in ports):
                return detail
        return None

    def covers(self, name: str) -> bool:
        """Whether an entry names `name` (exactly, or as a first-level wildcard), whatever its ports."""
        dot = name.find(".")
        return name in self.exact or (dot > 0 and name[dot + 1 :] in self.wildcard)


def host_entry_rules(
    entries: Iterable[str], bare_ports: frozenset[int] | None, rule: Rule
) -> Iterable[tuple[str, frozenset[int] | None, Rule, str]]:
    """`HostTable.build`'s rules for canonical host entries: a host:port entry on its port, a bare one on
    `bare_ports` (None: any); each names its entry as the detail (`allow_hosts api.example.com:8443`)."""
    for entry in entries:
        pattern, port = split_host_entry(entry)
        yield pattern, bare_ports if port is None else frozenset((port,)), rule, entry


@functools.lru_cache(maxsize=1024)
def preset_table(preset: Preset) -> HostTable:
    """One table per preset, shared by every policy that uses it (a 500-name preset is indexed once)."""
    return HostTable.build((pattern, preset.ports, Rule.PRESET, preset.name) for pattern in preset.hosts)


class CompiledPolicy:
    """Everything `decide` needs for one sandbox, in lookup-ready form."""

    __slots__ = (
        "_allow_nets",
        "_allow_ports",
        "_allow_verdicts",
        "_deny_hosts",
        "_deny_nets",
        "_deny_verdicts",
        "_ech_names",
        "_exact_verdicts",
        "_host_tables",
        "_inspect_rules",
        "_messages",
        "_never_reach",
        "allow_all",
        "allow_internet",
        "ceilings",
        "effective_egress",
        "limits",
        "profile",
        "report",
        "revision",
        "sandbox_id",
    )

    def __init__(
        self,
        sandbox_id: str,
        profile: str,
        egress: Egress,
        host_tables: tuple[HostTable, ...],
        limits: EffectiveLimits,
        never_reach: NeverReach | None = None,
        ceilings: tuple[tuple[str, CompiledPolicy], ...] = (),
        revision: str = "",
    ) -> None:
        self.sandbox_id = sandbox_id
        #: The content id of the records it was compiled from (`gateway.revisions`): what flow records name.
        self.revision = revision
        self.profile = profile
        self.effective_egress = egress
        self.allow_internet = egress.allow_internet is not False
        self.allow_all = profile == "unrestricted" and egress.mode != "deny_all"
        self.report = egress.enforcement == "report"
        self._host_tables = host_tables
        denied = egress.deny_hosts
        self._deny_hosts = HostTable.build(host_entry_rules(denied, None, Rule.DENY_HOSTS)) if denied else None
        self._ech_names = HostTable.build((pattern, None, Rule.ECH, pattern) for pattern in egress.allow_ech or ())
        self._inspect_rules = {pattern: rule for rule in egress.inspect or () for pattern in rule.hosts}
        # Verdicts whose reason depends only on the rule (an exact name's, a CIDR's) are built on the rule's
        # first hit and reused: bounded by the number of rules, and compiling stays as cheap as before.
        self._exact_verdicts: dict[tuple[str, Rule, str], Verdict] = {}
        self._allow_verdicts: dict[str, Verdict] = {}
        self._deny_verdicts: dict[str, Verdict] = {}
        self._allow_nets = NetSet(egress.allow_cidrs or ())
        self._deny_nets = NetSet(egress.deny_cidrs or ())
        self._allow_ports = frozenset(egress.allow_ports) if egress.allow_ports else None
        self.limits = limits
        self._never_reach = never_reach
        self._messages = egress.deny_messages or {}
        #: (template name, that template compiled alone for this sandbox): a verdict allows only where each does.
        self.ceilings = ceilings

    @property
    def inspects(self) -> bool:
        """Whether an `egress.inspect` entry marks any host (then the inspection tier must run)."""
        return bool(self._inspect_rules)

    def inspect_rule(self, pattern: str) -> InspectRule | None:
        """The inspect entry behind a verdict of rule INSPECT, by the verdict's detail (its host pattern)."""
        return self._inspect_rules.get(pattern)

    def ech_accepted(self, outer_name: str | None) -> bool:
        """May a ClientHello carrying Encrypted Client Hello with this outer name pass? ECH hides the real
        destination, so only where no name is checked anyway (allow_all without deny_hosts: with them, a CDN's
        outer name would carry a denied inner one past them) or an `allow_ech` entry opts it in."""
        if self.allow_all and self._deny_hosts is None:
            return True
        return outer_name is not None and self._ech_names.covers(outer_name)

    def message_for(self, label: str) -> str:
        """The operator's message for a denial by the rule `label` names (`deny_hosts *.x.example`): the one for
        that entry, else the one for the rule, else none. Only denials ask, so the fast path never does."""
        messages = self._messages
        if not messages:
            return ""
        found = messages.get(label)
        if found is None:
            rule = Rule.of_label(label)
            found = messages.get(rule.value, "") if rule is not None else ""
        return found

    def covers_host(self, pattern: str, ports: frozenset[int] | None) -> bool:
        """Whether this policy's host rules allow every name `pattern` (a name or `*.parent`) stands for on every
        one of `ports` (None: any port), and its deny_hosts refuse none of them: a ceiling's write check."""
        if self._deny_hosts is not None and self._deny_hosts.denial(pattern.removeprefix("*."), None) is not None:
            return False
        granted: set[int] = set()
        for table in self._host_tables:
            if pattern.startswith("*."):
                rules = table.wildcard.get(pattern[2:], ())
            else:
                dot = pattern.find(".")
                rules = (
                    *table.exact.get(pattern, ()),
                    *(table.wildcard.get(pattern[dot + 1 :], ()) if dot > 0 else ()),
                )
            for rule_ports, _, _ in rules:
                if rule_ports is None:
                    return True
                granted |= rule_ports
        return ports is not None and bool(ports) and ports <= granted

    def name_allowed(self, name: str) -> Verdict:
        """Whether a name may be resolved (the DNS question), regardless of port."""
        return decide(self, name, None, None, "dns")

    def describe(self) -> dict[str, Any]:
        return asdict(
            PolicyView(
                sandbox=self.sandbox_id,
                revision=self.revision,
                profile=self.profile,
                allow_internet=self.allow_internet,
                mode="allow_all" if self.allow_all else "deny_all",
                enforcement="report" if self.report else "enforce",
                egress=self.effective_egress.to_dict(),
                limits=self.limits,
            )
        )


_SMTP_VERDICTS = {
    port: Verdict(False, f"port {port} blocked ({what}) in every profile", Rule.SMTP)
    for port, what in ALWAYS_BLOCKED_PORTS.items()
}
_ISOLATED = Verdict(False, "profile isolated allows no network", Rule.ISOLATED)
_NO_INTERNET = Verdict(False, "egress disabled (allow_internet is false)", Rule.NO_INTERNET)
_DNS_UNRESTRICTED = Verdict(True, "profile unrestricted resolves every name", Rule.UNRESTRICTED_DNS)
_ALLOW_ALL = Verdict(True, "profile unrestricted allows all egress", Rule.ALLOW_ALL)
_NOT_LISTED = Verdict(False, "host not in allowlist", Rule.DEFAULT_DENY)
_NO_NAME = Verdict(False, "no hostname (SNI/Host) and address not in allow_cidrs", Rule.DEFAULT_DENY)
#: Rules whose denial needs neither a name nor an address (the engine gives them before peeking).
PORT_OR_PROFILE_RULES = frozenset({Rule.SMTP, Rule.ISOLATED, Rule.NO_INTERNET})


def decide(
    policy: CompiledPolicy,
    hostname: str | None,
    address: str | IPAddress | None,
    port: int | None,
    protocol: str,
    note: Callable[[Rule, str], None] | None = None,
) -> Verdict:
    """The one decision function. Pure; fails closed; the reason says which rule decided.

    `hostname` is the TLS SNI, HTTP Host or DNS question (None when the connection
    carries no name). `address` is None for a DNS question, which is decided on the
    name alone. In report mode a denial by a reportable rule comes back allowed and `would_deny`.
    `note`, when given (explain's precedence chain), is told each step that was looked at and did not decide.
    """
    verdict = _decide(policy, hostname, address, port, protocol, note)
    if not verdict.allowed:
        if not policy.report or not verdict.rule.reportable:
            return verdict
        if note:
            note(verdict.rule, f"would deny ({verdict.reason}); report mode lets it pass")
        verdict = Verdict(True, f"report mode: would deny ({verdict.reason})", verdict.rule, verdict.detail, True)
    if not policy.ceilings:
        return verdict
    if note:
        note(verdict.rule, verdict.reason)  # what the policy alone decided; the ceilings come after it
    return _within_ceilings(policy, verdict, hostname, address, port, protocol, note)


def _within_ceilings(
    policy: CompiledPolicy,
    verdict: Verdict,
    hostname: str | None,
    address: str | IPAddress | None,
    port: int | None,
    protocol: str,
    note: Callable[[Rule, str], None] | None = None,
) -> Verdict:
    """An allowing verdict, kept only where every ceiling of the policy allows the connection too."""
    for name, ceiling in policy.ceilings:
        bound = decide(ceiling, hostname, address, port, protocol)
        if note and bound.allowed:
            note(Rule.CEILING, f"template {name} allows it too ({bound.label})")
        if not bound.allowed:
            return Verdict(False, f"beyond the ceiling template {name}: {bound.reason}", Rule.CEILING, name)
        if bound.rule is Rule.INSPECT and (
            verdict.rule is not Rule.INSPECT
            or policy.inspect_rule(verdict.detail) != ceiling.inspect_rule(bound.detail)
        ):
            reason = f"the ceiling template {name} inspects this host under its own HTTP rules, which this policy drops"
            return Verdict(False, reason, Rule.CEILING, name)
        if (verdict.rule is Rule.ALLOW_CIDRS and bound.rule is not Rule.ALLOW_CIDRS) or (
            bound.would_deny and not verdict.would_deny
        ):
            # The ceiling's way through: an allow_cidrs entry of the sandbox alone neither lifts a special-address
            # refusal nor skips resolving the name, and the ceiling's report mode marks what it would deny.
            verdict = bound
    return verdict


def _decide(
    policy: CompiledPolicy,
    hostname: str | None,
    address: str | IPAddress | None,
    port: int | None,
    protocol: str,
    note: Callable[[Rule, str], None] | None = None,
) -> Verdict:
    """`decide` as enforced. `note` (explain's) hears each step that was looked at and did not decide."""
    if port is not None and port in _SMTP_VERDICTS:
        return _SMTP_VERDICTS[port]
    if note:
        note(Rule.SMTP, "not an SMTP port" if port is not None else "no port (a DNS question)")
    if policy._never_reach is not None:
        refused = policy._never_reach.refusal(address, port)
        if refused is not None:
            return refused
        if note:
            note(Rule.INVARIANT, "no [invariants] assertion forbids it")
    if policy.profile == "isolated":
        return _ISOLATED
    name = None
    if hostname and policy._deny_hosts is not None:
        # Before every allow rule and profile switch: deny wins over allow_hosts, presets, inspect and allow_all.
        name = normalize_query_name(hostname)
        denied_by = policy._deny_hosts.denial(name, port)
        if denied_by is not None:
            return Verdict(
                False, f"host {name} denied by {Rule.DENY_HOSTS.label(denied_by)}", Rule.DENY_HOSTS, denied_by
            )
        if note:
            note(Rule.DENY_HOSTS, f"no entry denies {name}")
    if protocol == "dns":
        # unrestricted resolves every name (also under mode deny_all, whose CIDR rules need names
        # to resolve). With allow_internet false, DNS still resolves and only connections are
        # refused (docs/feature-map.md: scaibunker's and Oblien's rules).
        if policy.profile == "unrestricted":
            return _DNS_UNRESTRICTED
    elif not policy.allow_internet:
        return _NO_INTERNET
    elif note:
        note(Rule.NO_INTERNET, "egress allowed")
    key = None
    if address is not None:
        try:
            key = address_key(address)
        except ValueError:
            return Verdict(False, f"unparseable address {address!r}", Rule.DEFAULT_DENY)
        denied_by = policy._deny_nets.match(key)
        if denied_by is not None:
            verdict = policy._deny_verdicts.get(denied_by)
            if verdict is None:
                verdict = Verdict(False, f"address in deny_cidrs {denied_by}", Rule.DENY_CIDRS, denied_by)
                policy._deny_verdicts[denied_by] = verdict
            return verdict
        if note and policy._deny_nets:
            note(Rule.DENY_CIDRS, f"{address} is in no entry")
    if policy.allow_all:
        return _ALLOW_ALL
    if note:
        note(Rule.ALLOW_ALL, f"not in force (profile {policy.profile}): only what the policy lists is allowed")
    if hostname and name is None:  # not normalised above (no deny list): allow_all, the common case, skips it
        name = normalize_query_name(hostname)
    port_miss: tuple[Rule, str] | None = None
    if name:
        dot = name.find(".")
        parent = name[dot + 1 :] if dot > 0 else None
        for table in policy._host_tables:
            for ports, rule, detail in table.exact.get(name, ()):
                if ports is None or port is None or port in ports:
                    verdict = policy._exact_verdicts.get((name, rule, detail))
                    if verdict is None:
                        verdict = Verdict(True, f"host {name} allowed by {rule.label(detail)}", rule, detail)
                        policy._exact_verdicts[name, rule, detail] = verdict
                    return verdict
                port_miss = rule, detail
            if parent is not None:
                for ports, rule, detail in table.wildcard.get(parent, ()):
                    if ports is None or port is None or port in ports:
                        reason = f"host {name} allowed by {rule.label(detail)}"
                        return Verdict(True, reason, rule, detail, wildcard=True)
                    port_miss = rule, detail
        if note:
            missed = (
                f"{port_miss[0].label(port_miss[1])} names it, not on port {port}" if port_miss else "none names it"
            )
            note(Rule.ALLOW_HOSTS, f"inspect entries, presets and allow_hosts for {name}: {missed}")
    if key is not None:
        allowed_by = policy._allow_nets.match(key)
        if allowed_by is not None:
            if policy._allow_ports is None or port in policy._allow_ports:
                verdict = policy._allow_verdicts.get(allowed_by)
                if verdict is None:
                    verdict = Verdict(True, f"address in allow_cidrs {allowed_by}", Rule.ALLOW_CIDRS, allowed_by)
                    policy._allow_verdicts[allowed_by] = verdict
                return verdict
            if port_miss is None:
                return Verdict(False, f"port {port} not in allow_ports for allow_cidrs {allowed_by}", Rule.ALLOW_PORTS)
        elif note:
            note(Rule.ALLOW_CIDRS, f"{address} is in no entry")
    if port_miss is not None:
        rule, detail = port_miss
        return Verdict(False, f"port {port} not allowed for host {name} ({rule.label(detail)})", rule, detail)
    return _NOT_LISTED if name else _NO_NAME


def compile_policy(
    sandbox: Sandbox,
    template: Template | None,
    presets: Mapping[str, Preset],
    default_limits: Limits = DEFAULT_LIMITS,
    never_reach: NeverReach | None = None,
    ceilings: tuple[tuple[str, CompiledPolicy], ...] = (),
) -> CompiledPolicy:
    """Merge sandbox over template, apply the profile's ceiling, and index the result. `never_reach` and
    `ceilings` are the operator's invariants that apply to the sandbox (gateway.invariants); a ceiling's limits
    cap the sandbox's.

    Template fields the sandbox's profile may not use are ignored (a registry sandbox
    never gains a template's allow_hosts); the sandbox's own fields were already
    checked against its profile when it was parsed.
    """
    merged = sandbox.egress.merged_over(template.egress if template else Egress())
    allowed_fields = PROFILE_EGRESS_FIELDS[sandbox.profile]
    egress = Egress(**{name: getattr(merged, name) for name in merged.set_fields() if name in allowed_fields})
    if sandbox.profile != "unrestricted" and egress.mode == "allow_all":
        egress = replace(egress, mode="deny_all")

    host_tables: list[HostTable] = []
    if sandbox.profile != "isolated":
        preset_names = list(egress.presets or ())
        if sandbox.profile == "registry":
            preset_names.insert(0, REGISTRY_PRESET)
        for preset_name in dict.fromkeys(preset_names):
            preset = presets.get(preset_name)
            if preset is not None:  # a preset removed from the config since the record was accepted grants nothing
                host_tables.append(preset_table(preset))
        if egress.allow_hosts:
            host_ports = frozenset(egress.host_ports) if egress.host_ports else None
            host_tables.append(HostTable.build(host_entry_rules(egress.allow_hosts, host_ports, Rule.ALLOW_HOSTS)))
        if egress.inspect:
            # First: a marked name must reach the tier, whatever else also allows it on that port.
            marked = ((p, frozenset(rule.ports), Rule.INSPECT, p) for rule in egress.inspect for p in rule.hosts)
            host_tables.insert(0, HostTable.build(marked))

    base_limits = template.limits.merged_over(default_limits) if template else default_limits
    limits = sandbox.limits.merged_over(base_limits)
    effective = EffectiveLimits(
        connections_per_minute=limits.connections_per_minute or 1,
        bandwidth_mbit=limits.bandwidth_mbit or 1,
        burst_mbit=max(limits.burst_mbit or 1, limits.bandwidth_mbit or 1),
        dns_queries_per_minute=limits.dns_queries_per_minute or 1,
    )
    for _, ceiling in ceilings:
        effective = EffectiveLimits(
            *(min(mine, cap) for mine, cap in zip(astuple(effective), astuple(ceiling.limits), strict=True))
        )
    # A ceiling changes what the sandbox may do: its revision is part of the sandbox's.
    bounds = {name: ceiling.revision for name, ceiling in ceilings}
    revision = revision_id(sandbox.to_dict(), template.to_dict() if template else None, bounds)
    return CompiledPolicy(
        sandbox.id, sandbox.profile, egress, tuple(host_tables), effective, never_reach, ceilings, revision
    )
