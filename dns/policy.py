"""The DNS interceptor's decisions: bytes in, a decision or bytes out. No sockets, no clock, no I/O but the blocklist.

`decide(data, policy, config, blocklist)` parses one query and says what to do with it:

- `DROP`: nothing can be answered (shorter than a header, or a response rather than a query:
  answering responses would let two resolvers bounce packets at each other);
- `ANSWER`: the response is ready (`Decision.response`): FORMERR, REFUSED, NXDOMAIN for a blocked
  name (with a synthetic SOA for negative caching and an RFC 8914 Extended DNS Error when the client
  speaks EDNS), NOERROR-empty for HTTPS/SVCB;
- `FORWARD`: ask the upstreams `upstream_packet(query, config)`, then turn their answer into the
  client's with `accept_upstream` and `render`.

A denied name never reaches `FORWARD`, so it never leaves the gateway (no exfiltration through DNS).
Every decision carries a stable `code` (below) and the reason and rule of the policy verdict.

Choices worth knowing:

- the operator malware list applies to every profile, not only `unrestricted` (a listed name that an
  allowlist also names is blocked: the operator's list wins);
- in `registry` / `allowlisted` the answer keeps the CNAME chain even when a target name is not itself
  allowed (the egress engine decides connections on the SNI / Host, not on the DNS answer);
- the synthetic SOA's owner is the blocked name's last two labels. A client cache that implements
  RFC 8020 may then take an NXDOMAIN for `a.example.com` to cover `x.a.example.com` too; with a small
  `blocked_ttl` that lasts seconds.

Answers are kept as wire bytes without OPT record and with id 0 (`Answer.wire`), so the cache can
hand out the same bytes to later queries: `render` puts the client's id and question back, lowers
the TTLs by the time spent in the cache, appends an OPT record when the client sent one, and
truncates (TC) what does not fit in the client's UDP size.

Every answer is a function of the query packet but for its id and the letter case of the question
(and of the policy, the malware list, the cache and the clock), so `query_key` names a packet without
parsing it, and `splice` turns the response made for one packet into the response to another packet
with the same key: the interceptor's shorter way for a query it has answered before.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from dnslib import QTYPE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from gateway.dns.config import DnsConfig
from gateway.files import read_regular_file

if TYPE_CHECKING:
    from gateway.decision import CompiledPolicy

__all__ = [
    "ANSWER",
    "DROP",
    "FORWARD",
    "Answer",
    "Code",
    "Decision",
    "DomainBlocklist",
    "Malformed",
    "Outcome",
    "Query",
    "accept_upstream",
    "decide",
    "decide_query",
    "failure_answer",
    "parse_query",
    "query_key",
    "render",
    "splice",
    "synthetic",
    "ttl_offsets",
    "upstream_packet",
]

# --------------------------------------------------------------------------- constants

DROP: Final = "drop"
ANSWER: Final = "answer"
FORWARD: Final = "forward"

T_A, T_NS, T_CNAME, T_SOA, T_AAAA, T_OPT, T_RRSIG, T_NSEC, T_NSEC3 = 1, 2, 5, 6, 28, 41, 46, 47, 50
T_SVCB, T_HTTPS, T_IXFR, T_AXFR, T_MAILB, T_MAILA, T_ANY = 64, 65, 251, 252, 253, 254, 255
C_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # extended rcode: upper 8 bits (1) in the OPT record, lower 4 bits (0) in the header

#: RFC 8914 info-codes used here.
EDE_OTHER, EDE_BLOCKED, EDE_PROHIBITED, EDE_NO_REACHABLE_AUTHORITY = 0, 15, 18, 22
EDE_OPTION = 15

#: The EDNS UDP size the gateway advertises upstream and to clients (the DNS flag day 2020 value).
EDNS_UDP_SIZE: Final = 1232
CLASSIC_UDP_SIZE: Final = 512
#: Types never answered: zone transfers and "everything" (amplification, enumeration).
REFUSED_QTYPES: Final = frozenset({T_ANY, T_AXFR, T_IXFR, T_MAILA, T_MAILB})
#: HTTPS/SVCB answered empty for names the policy allows by name: an HTTPS record can carry an ECH config,
#: and with ECH the real SNI is encrypted, so the egress engine could no longer check it.
EMPTY_QTYPES: Final = frozenset({T_HTTPS, T_SVCB})
MAX_CNAME_HOPS: Final = 16
SYNTHETIC_MNAME: Final = "blocked.sandbox-gateway.invalid."
SYNTHETIC_RNAME: Final = "hostmaster.sandbox-gateway.invalid."


class Code(StrEnum):
    """Stable codes for what happened to a query (query log, flow log, metrics)."""

    FORWARDED = "FORWARDED"
    CACHED = "CACHED"
    BLOCKED_POLICY = "BLOCKED_POLICY"
    BLOCKED_MALWARE = "BLOCKED_MALWARE"
    BLOCKED_NAME = "BLOCKED_NAME"  # labels with dots or unprintable bytes: no policy can match them
    REFUSED_UNKNOWN_SANDBOX = "REFUSED_UNKNOWN_SANDBOX"
    REFUSED_ISOLATED = "REFUSED_ISOLATED"
    REFUSED_QTYPE = "REFUSED_QTYPE"
    REFUSED_CLASS = "REFUSED_CLASS"
    REFUSED_RATE_LIMIT = "REFUSED_RATE_LIMIT"
    EMPTY_HTTPS = "EMPTY_HTTPS"
    EMPTY_QTYPE = "EMPTY_QTYPE"
    FORMERR = "FORMERR"
    NOTIMP = "NOTIMP"
    BADVERS = "BADVERS"
    DROPPED = "DROPPED"
    UPSTREAM_FAILED = "UPSTREAM_FAILED"
    DNSSEC_UNVALIDATED = "DNSSEC_UNVALIDATED"


# --------------------------------------------------------------------------- malware blocklist


_HOSTS_BOILERPLATE: Final = frozenset(
    {"localhost", "localhost.localdomain", "local", "broadcasthost", "ip6-localhost", "ip6-loopback", "0.0.0.0"}
)


class DomainBlocklist:
    """Operator malware-domain list: hosts-file lines (`0.0.0.0 bad.example`) or one name per line, `#` comments.

    A listed domain blocks its subdomains too. The file is re-read when its (inode, size, mtime) changes,
    checked at most every `check_interval` seconds; a missing or unreadable file blocks nothing and keeps
    the last good list (an operator's typo must not cut DNS for every sandbox, nor silently drop the list).
    `generation` counts the lists read, so answers decided under an older list can be told apart.
    """

    def __init__(self, path: Path, check_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.check_interval = check_interval
        self._clock = clock
        self._domains: dict[str, int] = {}  # domain -> line number
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self.error: str | None = None
        self.generation = 0
        self._reload()

    @staticmethod
    def parse(lines: Iterable[str]) -> dict[str, int]:
        domains: dict[str, int] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            tokens = line.split()
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(tokens[0].split("%", 1)[0])
                tokens = tokens[1:]  # hosts-file format: the address is not a name
            for token in tokens:
                name = token.strip().rstrip(".").lower()
                if not name or name in _HOSTS_BOILERPLATE or "." not in name:
                    continue
                domains.setdefault(name, number)
        return domains

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return
            text = read_regular_file(self.path).decode("utf-8", "replace")
        except OSError as exc:  # also a directory, FIFO or oversized file put in its place
            self.error = f"{self.path}: {exc.strerror or exc}"
            return
        self._domains = self.parse(text.splitlines())
        self._stamp = stamp
        self.error = None
        self.generation += 1

    def maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked >= self.check_interval:
            self._checked = now
            self._reload()

    def match(self, name: str) -> tuple[str, int] | None:
        """(listed domain, line) when `name` is that domain or below it."""
        self.maybe_reload()
        if not self._domains:
            return None
        candidate = name
        while True:
            line = self._domains.get(candidate)
            if line is not None:
                return candidate, line
            dot = candidate.find(".")
            if dot < 0:
                return None
            candidate = candidate[dot + 1 :]

    def __len__(self) -> int:
        return len(self._domains)


# --------------------------------------------------------------------------- queries


class Malformed(Exception):
    """A query that cannot be answered normally: `response` is the error answer, or None to drop it."""

    def __init__(self, code: Code, reason: str, response: bytes | None, rcode: int) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.response = response
        self.rcode = rcode


@dataclass(frozen=True, slots=True)
class Query:
    id: int
    rd: bool
    cd: bool
    ad: bool
    name: str  # lowercased, no trailing dot ("" for the root); see name_ok
    labels: tuple[bytes, ...]
    name_ok: bool  # every label printable ASCII without "." (otherwise the text form is ambiguous)
    qtype: int
    qclass: int
    question: bytes  # the question section exactly as the client sent it (case included)
    edns: bool
    edns_size: int
    edns_version: int
    do: bool

    @property
    def type_name(self) -> str:
        return QTYPE.get(self.qtype, str(self.qtype))

    def udp_limit(self) -> int:
        """Largest UDP answer this client accepts (RFC 6891: at least 512, capped at what we advertise)."""
        if not self.edns:
            return CLASSIC_UDP_SIZE
        return max(CLASSIC_UDP_SIZE, min(self.edns_size, EDNS_UDP_SIZE))


def _header_reply(data: bytes, rcode: int) -> bytes:
    """An answer made from the query's header alone (id, opcode, RD), no sections: for unparseable queries."""
    flags = 0x80 | (data[2] & 0x79)  # QR, opcode, RD
    return data[:2] + bytes((flags, rcode & 0x0F)) + bytes(8)


_LABEL_OK: Final = re.compile(rb"[\x21-\x2d\x2f-\x7e]+")  # printable ASCII but "."


def parse_query(data: bytes) -> Query:
    """Parse one query. Raises Malformed (with the answer to send, or None to drop); never anything else.

    Parsed here rather than with dnslib: a query is a header, one question and a few records, and this
    runs for every packet a sandbox sends (dnslib's parser costs about ten times as much).
    """
    size = len(data)
    if size < 12:
        raise Malformed(Code.DROPPED, "shorter than a DNS header", None, -1)
    qid, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHHHH", data)
    if flags & 0x8000:
        raise Malformed(Code.DROPPED, "a response, not a query", None, -1)
    opcode = (flags >> 11) & 0x0F
    if opcode != 0:
        raise Malformed(Code.NOTIMP, f"opcode {opcode} not implemented", _header_reply(data, NOTIMP), NOTIMP)

    def formerr(reason: str) -> Malformed:
        return Malformed(Code.FORMERR, reason, _header_reply(data, FORMERR), FORMERR)

    if qdcount != 1:
        raise formerr(f"{qdcount} questions (exactly one is supported)")
    if ancount:
        raise formerr("a query with answers")
    labels: list[bytes] = []
    i, wire_length = 12, 1
    while True:
        if i >= size:
            raise formerr("question name runs past the message")
        length = data[i]
        i += 1
        if length == 0:
            break
        if length & 0xC0:
            raise formerr("compressed or extended label in the question")
        if i + length > size:
            raise formerr("question name runs past the message")
        labels.append(bytes(data[i : i + length]))
        i += length
        wire_length += 1 + length
        if wire_length > 255:
            raise formerr("question name longer than 255 octets")
    if i + 4 > size:
        raise formerr("question runs past the message")
    qtype, qclass = struct.unpack_from("!HH", data, i)
    question_end = i = i + 4
    edns, edns_size, edns_version, do = False, 0, 0, False
    try:
        for index in range(nscount + arcount):
            owner = i
            i = _skip_name(data, i)
            rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, i)
            i += 10 + rdlen
            if i > size:
                raise formerr("record runs past the message")
            if rtype == T_OPT:
                if index < nscount or edns or data[owner] != 0:
                    raise formerr("misplaced, repeated or named OPT record")
                edns, edns_size, edns_version, do = True, rclass, (ttl >> 16) & 0xFF, bool(ttl & 0x8000)
    except (IndexError, ValueError, struct.error):
        raise formerr("records run past the message") from None
    name_ok = all(_LABEL_OK.fullmatch(label) for label in labels)
    name = b".".join(labels).decode("ascii", "replace").lower()
    return Query(
        id=qid,
        rd=bool(flags & 0x0100),
        cd=bool(flags & 0x0010),
        ad=bool(flags & 0x0020),
        name=name,
        labels=tuple(labels),
        name_ok=name_ok,
        qtype=qtype,
        qclass=qclass,
        question=bytes(data[12:question_end]),
        edns=edns,
        edns_size=edns_size,
        edns_version=edns_version,
        do=do,
    )


def query_key(data: bytes) -> tuple[bytes, int] | None:
    """(key, end of the question) of a query packet without parsing it: the key is the packet after its id
    with the question name lowercased, so two packets with one key have one answer but for the id and the
    question's letter case (0x20 randomisation), which `splice` copies from each. None when the question
    name is not plain labels: only `parse_query` judges those.

    Label lengths are below 64 here, and `lower` changes only the bytes of letters, so it cannot change the
    lengths: the key is a function of the packet with its name case-folded, nothing more."""
    i = 12
    try:
        length = data[i]
        while length:
            if length > 63:
                return None
            i += 1 + length
            length = data[i]
    except IndexError:
        return None
    end = i + 5  # the root label, type and class
    if end > len(data):
        return None
    return b"".join((data[2:12], data[12:i].lower(), data[i:])), end  # bytes (hashable) from a bytearray too


def splice(query: bytes, end: int, response: bytes) -> bytes:
    """`response` (made for a packet with the same `query_key`) with this query's id and question bytes."""
    return b"".join((query[:2], response[2:12], query[12:end], response[end:]))


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


def decide(
    data: bytes, policy: CompiledPolicy | None, config: DnsConfig, blocklist: DomainBlocklist | None = None
) -> Decision:
    """What to do with one query packet from the sandbox whose policy this is (None: unknown source)."""
    try:
        query = parse_query(data)
    except Malformed as exc:
        action = DROP if exc.response is None else ANSWER
        return Decision(action, None, exc.response, exc.rcode, False, exc.code, exc.reason, "parse")
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
    ) -> Decision:
        wire = synthetic(query, rcode, soa_ttl=config.blocked_ttl if soa else None)
        ede_option = (ede, reason) if ede is not None else None
        return Decision(ANSWER, query, render(wire, (), 0, query, ede=ede_option), rcode, allowed, code, reason, rule)

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
            "parse",
        )
    if policy is None:
        return answer(
            REFUSED,
            Code.REFUSED_UNKNOWN_SANDBOX,
            "source address belongs to no sandbox",
            "default:deny",
            ede=EDE_PROHIBITED,
        )
    if policy.profile == "isolated":
        return answer(
            REFUSED, Code.REFUSED_ISOLATED, "profile isolated allows no network", "profile:isolated", ede=EDE_PROHIBITED
        )
    if query.qclass != C_IN:
        return answer(REFUSED, Code.REFUSED_CLASS, f"class {query.qclass} not served (only IN)", "dns:class")
    if query.qtype in REFUSED_QTYPES:
        return answer(REFUSED, Code.REFUSED_QTYPE, f"type {query.type_name} not served", "dns:qtype")
    if not query.name_ok:
        return answer(
            NXDOMAIN,
            Code.BLOCKED_NAME,
            "blocked: name has labels with dots or unprintable bytes",
            "dns:name",
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
                f"malware list {hit[0]} (line {hit[1]})",
                soa=True,
                ede=EDE_BLOCKED,
            )
    if policy.profile != "unrestricted" and query.qtype not in (T_A, T_AAAA) and query.qtype not in config.extra_qtypes:
        if query.qtype in EMPTY_QTYPES:
            return answer(
                NOERROR,
                Code.EMPTY_HTTPS,
                f"{query.type_name} answered empty (keeps the SNI visible)",
                "dns:https",
                soa=True,
                allowed=True,
            )
        if config.other_qtypes == "refuse":
            return answer(
                REFUSED,
                Code.REFUSED_QTYPE,
                f"type {query.type_name} not served in profile {policy.profile}",
                "dns:qtype",
            )
        return answer(
            NOERROR,
            Code.EMPTY_QTYPE,
            f"type {query.type_name} answered empty in profile {policy.profile}",
            "dns:qtype",
            soa=True,
            allowed=True,
        )
    return Decision(FORWARD, query, None, -1, True, Code.FORWARDED, verdict.reason, verdict.label)


# --------------------------------------------------------------------------- building answers


def _question(query: Query) -> DNSQuestion:
    # The client's labels as bytes, so the packed question is byte for byte the client's (case included).
    return DNSQuestion(DNSLabel(list(query.labels)), query.qtype, query.qclass)


def _encode_name(labels: Iterable[bytes]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


_SOA_NAMES: Final = _encode_name(n.encode() for n in SYNTHETIC_MNAME.split(".") if n) + _encode_name(
    n.encode() for n in SYNTHETIC_RNAME.split(".") if n
)


def synthetic(query: Query, rcode: int, *, soa_ttl: int | None = None) -> bytes:
    """An answer made here (no OPT, id 0): header, the client's question, optionally an SOA for negative caching.

    Packed by hand: it is what every denied query costs. The SOA's owner is the name's last two labels
    (an ancestor of the name, as RFC 2308 wants), lowercased.
    """
    flags = 0x8080 | (0x0100 if query.rd else 0) | (rcode & 0x0F)  # QR, RA, RD
    out = struct.pack("!HHHHHH", 0, flags, 1, 0, 0 if soa_ttl is None else 1, 0) + query.question
    if soa_ttl is not None:
        owner = _encode_name(label.lower() for label in query.labels[-2:]) if query.name_ok else b"\x00"
        rdata = _SOA_NAMES + struct.pack("!IIIII", 1, 3600, 600, 86400, soa_ttl)
        out += owner + struct.pack("!HHIH", T_SOA, C_IN, soa_ttl, len(rdata)) + rdata
    return out


def _skip_name(data: bytes | bytearray, i: int) -> int:
    for _ in range(128):
        length = data[i]
        if length & 0xC0 == 0xC0:
            return i + 2
        if length & 0xC0:
            raise ValueError("unknown label type")
        i += 1 + length
        if length == 0:
            return i
    raise ValueError("too many labels")


def ttl_offsets(wire: bytes) -> tuple[int, ...]:
    """Offsets of the TTL fields of every record but OPT (whose "TTL" holds EDNS flags). Raises ValueError."""
    try:
        qd, an, ns, ar = struct.unpack_from("!HHHH", wire, 4)
        i = 12
        for _ in range(qd):
            i = _skip_name(wire, i) + 4
        out: list[int] = []
        for _ in range(an + ns + ar):
            i = _skip_name(wire, i)
            rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", wire, i)
            if rtype != T_OPT:
                out.append(i + 4)
            i += 10 + rdlen
        if i > len(wire):
            raise ValueError("record runs past the message")
        return tuple(out)
    except (IndexError, struct.error) as exc:
        raise ValueError(f"truncated message: {exc}") from None


def _opt_record(query: Query, ede: tuple[int, str] | None, ext_rcode: int = 0) -> bytes:
    options = b""
    if ede is not None:
        text = ede[1].encode("utf-8", "replace")[:400]
        options = struct.pack("!HHH", EDE_OPTION, 2 + len(text), ede[0]) + text
    flags = 0x8000 if query.do else 0
    ttl = (ext_rcode << 24) | flags
    return b"\x00" + struct.pack("!HHIH", T_OPT, EDNS_UDP_SIZE, ttl, len(options)) + options


def render(
    wire: bytes,
    offsets: tuple[int, ...],
    elapsed: float,
    query: Query,
    *,
    ede: tuple[int, str] | None = None,
    ext_rcode: int = 0,
    limit: int | None = None,
) -> bytes:
    """The client's answer from stored wire bytes (id 0, no OPT): its id, RD, question bytes; TTLs minus the
    seconds `elapsed` in the cache; an OPT record (with the EDE option) when the client sent EDNS; and, when
    longer than `limit`, a truncated answer (TC, question and OPT only) so the client retries over TCP."""
    out = bytearray(wire)
    struct.pack_into("!H", out, 0, query.id)
    out[2] = (out[2] & 0xFE) | int(query.rd)
    if not (query.do or query.ad):
        out[3] &= ~0x20 & 0xFF  # AD only for clients that asked for it (RFC 6840 5.8)
    qlen = len(query.question)
    if out[12 : 12 + qlen].lower() == query.question.lower():
        out[12 : 12 + qlen] = query.question  # the client's own case (0x20 randomisation)
    drop = int(elapsed)
    if drop > 0:
        for off in offsets:
            (ttl,) = struct.unpack_from("!I", out, off)
            struct.pack_into("!I", out, off, max(0, ttl - drop))
    if query.edns:
        out += _opt_record(query, ede, ext_rcode)
        struct.pack_into("!H", out, 10, struct.unpack_from("!H", out, 10)[0] + 1)
    if limit is not None and len(out) > limit:
        header = bytearray(out[:12])
        header[2] |= 0x02  # TC
        struct.pack_into("!HHHH", header, 4, 1, 0, 0, 1 if query.edns else 0)
        out = header + query.question + (_opt_record(query, None, ext_rcode) if query.edns else b"")
    return bytes(out)


def upstream_packet(query: Query, config: DnsConfig) -> bytes:
    """The query sent upstream: the client's question (its case too), RD, CD; our own EDNS (size, DO); AD asked
    for when the client did or strict DNSSEC is on. None of the client's other EDNS options leave the gateway."""
    flags = 0x0100  # RD: the upstream is a recursive resolver
    if query.cd:
        flags |= 0x0010
    if query.ad or query.do or config.require_ad:
        flags |= 0x0020
    header = struct.pack("!HHHHHH", query.id, flags, 1, 0, 0, 1)
    opt = b"\x00" + struct.pack("!HHIH", T_OPT, EDNS_UDP_SIZE, 0x8000 if query.do else 0, 0)
    return header + query.question + opt


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
    out.add_question(_question(query))
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
