"""The decision vocabulary: every rule that can decide a connection, a DNS question or a tunnel request.

One `StrEnum` shared by `decision.decide`, the egress engine, the DNS interceptor and the tunnel, so no
code reads meaning back out of a string. A verdict carries a `Rule` and, for rules that name a policy
entry (`allow_hosts api.example.com`, `allow_cidrs 10.0.0.0/8`, `preset pypi`, `inspect api.github.com`), a
detail; `label()` spells the pair as flow records, logs and `explain` show it (the strings are part of the record format
and do not change).
"""

from __future__ import annotations

from enum import StrEnum


class Rule(StrEnum):
    # The policy's own entries (a detail names the entry).
    ALLOW_HOSTS = "allow_hosts"
    PRESET = "preset"
    ALLOW_CIDRS = "allow_cidrs"
    DENY_CIDRS = "deny_cidrs"
    #: An egress.deny_hosts entry: refused before every allow rule, in every profile that looks at names.
    DENY_HOSTS = "deny_hosts"
    ALLOW_PORTS = "allow_ports"
    # Profile and egress switches.
    ALLOW_ALL = "egress.mode:allow_all"
    NO_INTERNET = "egress.allow_internet"
    ISOLATED = "profile:isolated"
    UNRESTRICTED_DNS = "profile:unrestricted"
    DEFAULT_DENY = "default:deny"
    UNKNOWN_SOURCE = "default:unknown-source"
    # Limits.
    CONNECTION_RATE = "limits.connections_per_minute"
    DNS_QUERY_RATE = "limits.dns_queries_per_minute"
    # Guards built into the gateway, whatever the policy says.
    SMTP = "builtin:smtp"
    SPECIAL_ADDRESS = "builtin:special"
    METADATA = "builtin:metadata"
    BLOCKLIST = "builtin:blocklist"
    GATEWAY_ADDRESS = "builtin:gateway"
    RESOLVE_FAILED = "builtin:resolve"
    DIAL_FAILED = "builtin:dial"
    PEEK = "builtin:peek"
    PEEK_CAP = "builtin:peek-cap"
    TLS = "builtin:tls"
    #: A ClientHello carrying Encrypted Client Hello whose outer name no `egress.allow_ech` entry opts in.
    ECH = "builtin:ech"
    HTTP = "builtin:http"
    HOST_MISMATCH = "builtin:host-mismatch"
    INSPECTION_DOWN = "builtin:inspection"
    # The DNS interceptor's own rules.
    DNS_PARSE = "parse"
    DNS_CLASS = "dns:class"
    DNS_QTYPE = "dns:qtype"
    DNS_NAME = "dns:name"
    DNS_HTTPS = "dns:https"
    #: A label under a wildcard entry over a shape limit (dns.max_label_length, dns.max_label_alternations).
    DNS_LABEL = "builtin:dns_label"
    #: A new name past the sandbox's distinct-name or NXDOMAIN budget (dns.name_budget, dns.nxdomain_budget).
    DNS_BUDGET = "builtin:dns_budget"
    MALWARE_LIST = "malware list"
    # The operator's [invariants] (a detail names the assertion, resp. the ceiling template): enforced always.
    INVARIANT = "invariant"
    CEILING = "ceiling"
    # The tunnel (a detail names the tunnel).
    TUNNEL = "tunnel"
    # An egress.inspect entry (a detail names its host pattern): allowed, and handed to the inspection tier.
    INSPECT = "inspect"

    @property
    def reportable(self) -> bool:
        """Whether report mode (`egress.enforcement: report`) lets a denial by this rule pass, recorded as
        `would_deny`: only an allowlist's miss (a name, an address or a port it does not list). Every other denial
        stays enforced in report mode: the built-in guards (metadata, the gateway's own and special addresses,
        SMTP, ECH, malformed or smuggled protocol input), deny_cidrs and deny_hosts (an operator's explicit
        refusal, not a miss), the isolated profile and the allow_internet switch, rate limits. A rule added later
        is enforced unless it is listed here."""
        return self in _REPORTABLE

    @classmethod
    def of_label(cls, label: str) -> Rule | None:
        """The rule of a record's label (`allow_hosts api.example.com`, `tunnel:ab12`, `malware list x (line 3)`)."""
        for rule in _LONGEST_FIRST:
            value = rule.value
            if label.startswith(value) and (len(label) == len(value) or label[len(value)] in " :"):
                return rule
        return None

    def label(self, detail: str = "") -> str:
        """The rule as records show it: `allow_hosts api.example.com`, `tunnel:ab12`, `default:deny`."""
        if not detail:
            return self.value
        return f"{self.value}:{detail}" if self is Rule.TUNNEL else f"{self.value} {detail}"


_REPORTABLE = frozenset({Rule.DEFAULT_DENY, Rule.ALLOW_PORTS, Rule.ALLOW_HOSTS, Rule.PRESET, Rule.INSPECT})
_LONGEST_FIRST = sorted(Rule, key=lambda rule: len(rule.value), reverse=True)
