"""The DNS wire codec: query parsing, synthetic answers, rendering a cached answer for one client. No I/O.

Answers are kept as wire bytes without OPT record and with id 0 (`Answer.wire`), so the cache can
hand out the same bytes to later queries: `render` puts the client's id and question back, lowers
the TTLs by the time spent in the cache, appends an OPT record when the client sent one, and
truncates (TC) what does not fit in the client's UDP size.

Every answer is a function of the query packet but for its id and the letter case of the question
(and of the policy, the malware list, the cache and the clock), so `query_key` names a packet without
parsing it, and `splice` turns the response made for one packet into the response to another packet
with the same key: the interceptor's shorter way for a query it has answered before.

`Code` names what happened to a query (query log, flow records, metrics): the parser's refusals are the
first of them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from dnslib import QTYPE, DNSLabel, DNSQuestion

from gateway.dns.config import DnsConfig

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------- constants


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
SYNTHETIC_MNAME: Final = "blocked.sandbox-gateway.invalid."
SYNTHETIC_RNAME: Final = "hostmaster.sandbox-gateway.invalid."


class Code(StrEnum):
    """Stable codes for what happened to a query (query log, flow log, metrics)."""

    FORWARDED = "FORWARDED"
    CACHED = "CACHED"
    BLOCKED_POLICY = "BLOCKED_POLICY"
    BLOCKED_MALWARE = "BLOCKED_MALWARE"
    BLOCKED_NAME = "BLOCKED_NAME"  # labels with dots or unprintable bytes: no policy can match them
    BLOCKED_LABEL_LENGTH = "BLOCKED_LABEL_LENGTH"  # the label a wildcard matched is over dns.max_label_length
    BLOCKED_LABEL_RANDOM = "BLOCKED_LABEL_RANDOM"  # ... or looks random (dns.max_label_alternations)
    REFUSED_UNKNOWN_SANDBOX = "REFUSED_UNKNOWN_SANDBOX"
    REFUSED_ISOLATED = "REFUSED_ISOLATED"
    REFUSED_QTYPE = "REFUSED_QTYPE"
    REFUSED_CLASS = "REFUSED_CLASS"
    REFUSED_RATE_LIMIT = "REFUSED_RATE_LIMIT"
    REFUSED_NAME_BUDGET = "REFUSED_NAME_BUDGET"  # a new name past dns.name_budget distinct names in the window
    REFUSED_NXDOMAIN_BUDGET = "REFUSED_NXDOMAIN_BUDGET"  # a new name past dns.nxdomain_budget NXDOMAINs
    EMPTY_HTTPS = "EMPTY_HTTPS"
    EMPTY_QTYPE = "EMPTY_QTYPE"
    FORMERR = "FORMERR"
    NOTIMP = "NOTIMP"
    BADVERS = "BADVERS"
    DROPPED = "DROPPED"
    UPSTREAM_FAILED = "UPSTREAM_FAILED"
    DNSSEC_UNVALIDATED = "DNSSEC_UNVALIDATED"


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


# --------------------------------------------------------------------------- building answers


def question_of(query: Query) -> DNSQuestion:
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
