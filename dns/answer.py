"""The DNS interceptor's decisions: bytes in, a decision or bytes out. No sockets, no clock, no I/O.

`decide_packet(data, policy, config, blocklist)` parses one query and says what to do with it:

- `DROP`: nothing can be answered (shorter than a header, or a response rather than a query:
  answering responses would let two resolvers bounce packets at each other);
- `ANSWER`: the response is ready (`Decision.response`): FORMERR, REFUSED, NXDOMAIN for a blocked
  name (with a synthetic SOA for negative caching and an RFC 8914 Extended DNS Error when the client
  speaks EDNS), NOERROR-empty for HTTPS/SVCB;
- `FORWARD`: ask the upstreams `upstream_packet(query, config)`, then turn their answer into the
  client's with `accept_upstream` and `render`.

A denied name never reaches `FORWARD`, so it never leaves the gateway (no exfiltration through DNS). In
report mode (`egress.enforcement: report`) a name only the allowlist would deny is forwarded like an
allowed one, its decision marked `would_deny` (the verdict's, `gateway.decision.decide`). A name a wildcard
entry allows (or report mode lets through) is the sandbox's own making: its labels must pass the shape limits
(`gateway.dns.budget.label_limit`, NXDOMAIN otherwise), and its FORWARD is marked `budgeted` for the server
to check the sandbox's name budget before it goes upstream.
Every decision carries a stable `code` (below) and the reason and rule of the policy verdict.

Choices worth knowing:

- the operator malware list applies to every profile, not only `unrestricted` (a listed name that an
  allowlist also names is blocked: the operator's list wins);
- in `registry` / `allowlisted` the answer keeps the CNAME chain even when a target name is not itself
  allowed (the egress engine decides connections on the SNI / Host, not on the DNS answer);
- the synthetic SOA's owner is the blocked name's last two labels. A client cache that implements
  RFC 8020 may then take an NXDOMAIN for `a.example.com` to cover `x.a.example.com` too; with a small
  `blocked_ttl` that lasts seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from dnslib import DNSHeader, DNSRecord

from gateway.dns.blocklist import DomainBlocklist
from gateway.dns.budget import label_limit
from gateway.dns.config import DnsConfig
from gateway.dns.wire import (
    BADVERS,
    C_IN,
    EDE_BLOCKED,
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_OTHER,
    EDE_PROHIBITED,
    NOERROR,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    T_A,
    T_AAAA,
    T_ANY,
    T_AXFR,
    T_CNAME,
    T_HTTPS,
    T_IXFR,
    T_MAILA,
    T_MAILB,
    T_NSEC,
    T_NSEC3,
    T_OPT,
    T_RRSIG,
    T_SOA,
    T_SVCB,
    Code,
    Malformed,
    Query,
    parse_query,
    question_of,
    render,
    synthetic,
    ttl_offsets,
)
from gateway.flowlog import new_denial_id
from gateway.rules import Rule

if TYPE_CHECKING:
    from gateway.decision import CompiledPolicy


DROP: Final = "drop"
ANSWER: Final = "answer"
FORWARD: Final = "forward"
#: Types never answered: zone transfers and "everything" (amplification, enumeration).
REFUSED_QTYPES: Final = frozenset({T_ANY, T_AXFR, T_IXFR, T_MAILA, T_MAILB})
#: HTTPS/SVCB answered empty for names the policy allows by name: an HTTPS record can carry an ECH config,
#: and with ECH the real SNI is encrypted, so the egress engine could no longer check it.
EMPTY_QTYPES: Final = frozenset({T_HTTPS, T_SVCB})
MAX_CNAME_HOPS: Final = 16

# --------------------------------------------------------------------------- decisions


class Outcome(NamedTuple):
    """What a query came to: the query log's fields, kept as they are and formatted only when the log is read
    (a response kept for a repeated query keeps its outcome too)."""

    name: str
    type: str
    rcode: int  # -1: dropped
    answers: tuple[str, ...]
    allowed: bool
    code: Code
    reason: str
    rule: str
    cached: bool
    would_deny: bool = False
    message: str = ""  # a denial's: the operator's message for its rule
    denial_id: str = ""  # a denial's id (an answer kept for the same packet again repeats it)


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # DROP, ANSWER, FORWARD
    query: Query | None
    response: bytes | None  # ANSWER: the full answer for the client
    rcode: int  # of the answer (-1: none, dropped; for FORWARD the upstream's, known later)
    allowed: bool
    code: Code
    reason: str
    rule: str
    would_deny: bool = False  # allowed (answered) only because the policy is in report mode
    message: str = ""  # a denial's: the operator's message for its rule
    denial_id: str = ""  # a denial's id, also in its EDE text
    #: FORWARD of a name no entry spells out (a wildcard's, or one report mode lets through): it must pass the
    #: sandbox's name budget before it goes upstream (gateway.dns.budget).
    budgeted: bool = False


def denial_text(reason: str, message: str, denial_id: str) -> str:
    """A denial's Extended DNS Error text: why, the operator's message, the id to quote."""
    return f"{reason}{f' -- {message}' if message else ''} (denial {denial_id})"


def decide_packet(
    data: bytes, policy: CompiledPolicy | None, config: DnsConfig, blocklist: DomainBlocklist | None = None
) -> Decision:
    """What to do with one query packet from the sandbox whose policy this is (None: unknown source)."""
    try:
        query = parse_query(data)
    except Malformed as exc:
        action = DROP if exc.response is None else ANSWER
        return Decision(action, None, exc.response, exc.rcode, False, exc.code, exc.reason, Rule.DNS_PARSE)
    return decide_query(query, policy, config, blocklist)


def decide_query(
    query: Query, policy: CompiledPolicy | None, config: DnsConfig, blocklist: DomainBlocklist | None = None
) -> Decision:
    def answer(
        rcode: int,
        code: Code,
        reason: str,
        rule: str,
        *,
        soa: bool = False,
        ede: int | None = None,
        allowed: bool = False,
        would_deny: bool = False,
    ) -> Decision:
        wire = synthetic(query, rcode, soa_ttl=config.blocked_ttl if soa else None)
        message = denial_id = ""
        if not allowed:
            denial_id = new_denial_id()
            message = policy.message_for(rule) if policy is not None else ""
        ede_option = (
            (ede, denial_text(reason, message, denial_id) if denial_id else reason) if ede is not None else None
        )
        response = render(wire, (), 0, query, ede=ede_option)
        return Decision(ANSWER, query, response, rcode, allowed, code, reason, rule, would_deny, message, denial_id)

    if query.edns and query.edns_version > 0:
        wire = synthetic(query, NOERROR)
        response = render(wire, (), 0, query, ext_rcode=BADVERS >> 4)
        return Decision(
            ANSWER,
            query,
            response,
            BADVERS,
            False,
            Code.BADVERS,
            f"EDNS version {query.edns_version} not supported",
            Rule.DNS_PARSE,
        )
    if policy is None:
        return answer(
            REFUSED,
            Code.REFUSED_UNKNOWN_SANDBOX,
            "source address belongs to no sandbox",
            Rule.DEFAULT_DENY,
            ede=EDE_PROHIBITED,
        )
    if policy.profile == "isolated":
        return answer(
            REFUSED, Code.REFUSED_ISOLATED, "profile isolated allows no network", Rule.ISOLATED, ede=EDE_PROHIBITED
        )
    if query.qclass != C_IN:
        return answer(REFUSED, Code.REFUSED_CLASS, f"class {query.qclass} not served (only IN)", Rule.DNS_CLASS)
    if query.qtype in REFUSED_QTYPES:
        return answer(REFUSED, Code.REFUSED_QTYPE, f"type {query.type_name} not served", Rule.DNS_QTYPE)
    if not query.name_ok:
        return answer(
            NXDOMAIN,
            Code.BLOCKED_NAME,
            "blocked: name has labels with dots or unprintable bytes",
            Rule.DNS_NAME,
            soa=True,
            ede=EDE_BLOCKED,
        )
    verdict = policy.name_allowed(query.name)
    if not verdict.allowed:
        return answer(
            NXDOMAIN,
            Code.BLOCKED_POLICY,
            f"blocked by sandbox policy: {verdict.reason}",
            verdict.label,
            soa=True,
            ede=EDE_BLOCKED,
        )
    if blocklist is not None:
        hit = blocklist.match(query.name)
        if hit is not None:
            return answer(
                NXDOMAIN,
                Code.BLOCKED_MALWARE,
                "blocked: malware domain list",
                Rule.MALWARE_LIST.label(f"{hit[0]} (line {hit[1]})"),
                soa=True,
                ede=EDE_BLOCKED,
            )
    budgeted = verdict.wildcard or verdict.would_deny
    if budgeted:
        # A wildcard matched the first label only; a name report mode lets through is the client's own throughout.
        labels = query.name.split(".")
        own = labels[:1] if verdict.wildcard else labels
        limited = label_limit(own, config.max_label_length, config.max_label_alternations)
        if limited is not None:
            return answer(NXDOMAIN, limited.code, limited.reason, Rule.DNS_LABEL, soa=True, ede=EDE_BLOCKED)
    if policy.profile != "unrestricted" and query.qtype not in (T_A, T_AAAA) and query.qtype not in config.extra_qtypes:
        if query.qtype in EMPTY_QTYPES:
            return answer(
                NOERROR,
                Code.EMPTY_HTTPS,
                f"{query.type_name} answered empty (keeps the SNI visible)",
                Rule.DNS_HTTPS,
                soa=True,
                allowed=True,
                would_deny=verdict.would_deny,
            )
        if config.other_qtypes == "refuse":
            return answer(
                REFUSED,
                Code.REFUSED_QTYPE,
                f"type {query.type_name} not served in profile {policy.profile}",
                Rule.DNS_QTYPE,
            )
        return answer(
            NOERROR,
            Code.EMPTY_QTYPE,
            f"type {query.type_name} answered empty in profile {policy.profile}",
            Rule.DNS_QTYPE,
            soa=True,
            allowed=True,
            would_deny=verdict.would_deny,
        )
    return Decision(
        FORWARD,
        query,
        None,
        -1,
        True,
        Code.FORWARDED,
        verdict.reason,
        verdict.label,
        verdict.would_deny,
        budgeted=budgeted,
    )


# --------------------------------------------------------------------------- upstream answers


@dataclass(frozen=True, slots=True)
class Answer:
    """A forwarded answer ready to cache and render."""

    wire: bytes  # id 0, no OPT, TTLs clamped
    offsets: tuple[int, ...]
    rcode: int
    ttl: int  # how long it may be cached (0: not at all)
    addresses: tuple[str, ...] = ()  # A/AAAA on the question's CNAME chain
    addresses_ttl: int = 0
    ad: bool = False
    code: Code = Code.FORWARDED
    reason: str = ""
    ede: tuple[int, str] | None = field(default=None)


_RESTRICTED_ANSWER_TYPES: Final = frozenset({T_A, T_AAAA, T_CNAME})
_DNSSEC_TYPES: Final = frozenset({T_RRSIG, T_NSEC, T_NSEC3})


def failure_answer(query: Query, code: Code, reason: str, ede_code: int = EDE_OTHER) -> Answer:
    return Answer(synthetic(query, SERVFAIL), (), SERVFAIL, 0, code=code, reason=reason, ede=(ede_code, reason))


def accept_upstream(query: Query, data: bytes, policy: CompiledPolicy, config: DnsConfig) -> Answer:
    """Turn an upstream response into the client's answer (never raises: an unusable response is SERVFAIL).

    `registry` / `allowlisted`: only A, AAAA and CNAME records (and their RRSIGs when the client asked
    for DNSSEC) in the answer section, only SOA (and DNSSEC denial records) in the authority section,
    nothing in the additional section: nothing but addresses for allowed names reaches the sandbox.
    `unrestricted`: everything but the upstream's OPT record.
    """
    try:
        record = DNSRecord.parse(data)
    except Exception as exc:
        return failure_answer(query, Code.UPSTREAM_FAILED, f"unparseable upstream answer: {exc}")
    rcode = record.header.rcode
    ad = bool(record.header.ad)
    if rcode not in (NOERROR, NXDOMAIN):
        return failure_answer(query, Code.UPSTREAM_FAILED, f"upstream answered {rcode}", EDE_NO_REACHABLE_AUTHORITY)
    if config.require_ad and not ad:
        return failure_answer(query, Code.DNSSEC_UNVALIDATED, "upstream did not validate the answer (AD bit not set)")
    restricted = policy.profile != "unrestricted"
    answers, auth, additional = list(record.rr), list(record.auth), [rr for rr in record.ar if rr.rtype != T_OPT]
    if restricted:
        keep = _RESTRICTED_ANSWER_TYPES | (_DNSSEC_TYPES if query.do else frozenset())
        answers = [rr for rr in answers if rr.rtype in keep or rr.rtype in config.extra_qtypes]
        auth = [rr for rr in auth if rr.rtype == T_SOA or (query.do and rr.rtype in _DNSSEC_TYPES)]
        additional = []
    positive = [rr for rr in answers if rr.rtype != T_RRSIG]
    if positive and rcode == NOERROR:
        ttl = max(config.min_ttl, min(config.max_ttl, min(rr.ttl for rr in positive)))
        clamp_to = (config.min_ttl, config.max_ttl)
    else:
        soa = [rr for rr in auth if rr.rtype == T_SOA]
        negative = min(soa[0].ttl, soa[0].rdata.times[4]) if soa else config.min_ttl
        ttl = max(config.min_ttl, min(config.negative_max_ttl, config.max_ttl, negative))
        clamp_to = (config.min_ttl, ttl)
    for rr in (*answers, *auth, *additional):
        rr.ttl = max(clamp_to[0], min(clamp_to[1], rr.ttl))
    addresses, addresses_ttl = _chain_addresses(query.name, answers)
    out = DNSRecord(DNSHeader(id=0, qr=1, ra=1, rd=int(query.rd), ad=int(ad), cd=int(query.cd), rcode=rcode))
    out.add_question(question_of(query))
    out.rr, out.auth, out.ar = answers, auth, additional
    try:
        wire = bytes(out.pack())
        offsets = ttl_offsets(wire)
    except Exception as exc:
        return failure_answer(query, Code.UPSTREAM_FAILED, f"cannot re-encode upstream answer: {exc}")
    return Answer(wire, offsets, rcode, ttl, addresses, addresses_ttl, ad, Code.FORWARDED, "")


def _chain_addresses(name: str, answers: list[Any]) -> tuple[tuple[str, ...], int]:
    """A/AAAA addresses of `name`, following the CNAMEs in the answer; TTL = smallest on the chain."""
    owners = {name}
    ttls: list[int] = []
    found: list[str] = []
    for _ in range(MAX_CNAME_HOPS):
        grew = False
        for rr in answers:
            owner = str(rr.rname).rstrip(".").lower()
            if owner not in owners:
                continue
            if rr.rtype == T_CNAME:
                target = str(rr.rdata).rstrip(".").lower()
                if target not in owners:
                    owners.add(target)
                    ttls.append(rr.ttl)
                    grew = True
        if not grew:
            break
    for rr in answers:
        if rr.rtype in (T_A, T_AAAA) and str(rr.rname).rstrip(".").lower() in owners:
            found.append(str(rr.rdata))
            ttls.append(rr.ttl)
    if not found:
        return (), 0
    return tuple(dict.fromkeys(found)), min(ttls)
