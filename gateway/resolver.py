"""The gateway's own stub resolver (asyncio + dnslib): names are resolved here, never trusted from the client.

Two layers:

* `exchange(packet, upstreams, timeout)`: the forwarding core, reusable by the DNS
  interceptor. Sends one query packet to the upstreams in turn (UDP; TCP when the UDP
  answer is truncated), with a fresh random 16-bit id from `secrets` on the wire. A
  response counts only if it comes from the upstream's address and port (connected UDP
  socket, and checked again), carries our id and echoes our question; anything else is
  ignored until the timeout (an off-path spoofer must guess the id and the port). The
  caller's id is put back in the returned packet.
* `Resolver.resolve(name)`: A and AAAA at once, CNAME chains followed inside the
  answer, a cache keyed by (name, type) with the TTL clamped to [min_ttl, max_ttl],
  negative answers (NXDOMAIN, no data) cached briefly, concurrent lookups of one name
  sharing one query. Raises `ResolveError(code, message)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import structlog
from dnslib import QTYPE, RCODE, DNSRecord
from msgspec import Meta

from gateway.config import OptionError, Section
from gateway.untrusted import parse_decimal

log = structlog.get_logger("gateway.resolver")

NEGATIVE_TTL_MAX = 30
MAX_CNAME_HOPS = 8
CACHE_SIZE = 10_000
MAX_UDP_SIZE = 65535


class ResolveError(Exception):
    """`code`: NXDOMAIN, NODATA, SERVFAIL, REFUSED, TIMEOUT or INVALID."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ResolveResult:
    addresses: tuple[str, ...]
    ttl: int


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int = 53

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """`addr`, `addr:port`, `[v6]:port` or a bare IPv6 address. Raises ValueError."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: unclosed '['")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            parsed = parse_decimal(rest[1:], 1, 65535) if rest.startswith(":") else None
            if parsed is None:
                raise ValueError(f"{text[:60]!r}: expected [address]:port with a port in 1-65535")
            port = parsed
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        parsed = parse_decimal(port_text, 1, 65535)
        if parsed is None:
            raise ValueError(f"{text[:60]!r}: the port must be a number in 1-65535")
        port = parsed
    try:
        ipaddress.ip_address(host)  # a resolver is an address: no name to resolve before resolving
    except ValueError:
        raise ValueError(f"{host[:60]!r} is not an IP address") from None
    return Upstream(host, port)


class ResolverConfig(Section, frozen=True):
    """The gateway's own resolver (names are resolved by the gateway, never trusted from the client)."""

    upstreams: Annotated[
        tuple[str, ...],
        Meta(description='"address" or "address:port" / "[v6]:port"; empty: the nameservers in /etc/resolv.conf.'),
    ] = ()
    timeout: Annotated[float, Meta(ge=0.05, le=60, description="Seconds to wait for an upstream.")] = 2.0
    min_ttl: Annotated[int, Meta(ge=0, le=86_400, description="Answers are cached at least this long (s)...")] = 5
    max_ttl: Annotated[int, Meta(ge=1, le=604_800, description="...and at most this long.")] = 3600

    def __post_init__(self) -> None:
        for index, text in enumerate(self.upstreams):
            try:
                parse_upstream(text)
            except ValueError as exc:
                raise OptionError(
                    f"upstreams[{index}]",
                    f"{exc}; an upstream is an address with an optional port (192.0.2.53, 192.0.2.53:5353, "
                    "[2001:db8::53]:53): the resolver cannot resolve its own name",
                ) from None
        if self.min_ttl > self.max_ttl:
            raise OptionError("min_ttl", "min_ttl must not exceed max_ttl")


def system_upstreams(path: Path = Path("/etc/resolv.conf")) -> tuple[Upstream, ...]:
    out: list[Upstream] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                out.append(parse_upstream(parts[1].split("%", 1)[0]))
    return tuple(out)


# --------------------------------------------------------------------------- the forwarding core


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, upstream: Upstream, query_id: int, question: bytes) -> None:
        self.upstream = upstream
        self.query_id = query_id
        self.question = question
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int] | tuple[str, int, int, int]) -> None:
        if self.future.done():
            return
        # A connected socket already filters by source; checked again because that is the whole defence.
        if ipaddress.ip_address(addr[0].split("%", 1)[0]) != ipaddress.ip_address(self.upstream.host):
            return
        if addr[1] != self.upstream.port:
            return
        if _matches(data, self.query_id, self.question):
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _question_bytes(packet: bytes) -> bytes:
    """The question section (name, type, class) of a packet with exactly one question, lower-cased name."""
    if len(packet) < 12 or packet[4:6] != b"\x00\x01":
        raise ValueError("not a single-question DNS message")
    i = 12
    labels = 0
    while True:
        if i >= len(packet):
            raise ValueError("question name runs past the message")
        length = packet[i]
        if length & 0xC0:
            raise ValueError("compressed question name")  # never in our own question
        i += 1 + length
        labels += 1
        if length == 0 or labels > 128:
            break
    if i + 4 > len(packet):
        raise ValueError("question runs past the message")
    return packet[12:i].lower() + packet[i : i + 4]


def _matches(data: bytes, query_id: int, question: bytes, *, bare_tc: bool = True) -> bool:
    if len(data) < 12 or int.from_bytes(data[:2]) != query_id or not data[2] & 0x80:
        return False
    if bare_tc and data[2] & 0x02 and data[4:6] == b"\x00\x00":
        # Some servers (dnslib's among them) send a truncated reply without the question. It is only ever a
        # signal to ask again over TCP, where the answer is checked in full, so the id is enough here.
        return True
    try:
        return _question_bytes(data) == question
    except ValueError:
        return False


async def _udp(packet: bytes, upstream: Upstream, query_id: int, question: bytes, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(upstream, query_id, question),
        remote_addr=(upstream.host, upstream.port),
        family=upstream.family,
    )
    try:
        transport.sendto(packet)
        return await asyncio.wait_for(protocol.future, timeout)
    finally:
        transport.close()


async def _tcp(packet: bytes, upstream: Upstream, query_id: int, question: bytes, timeout: float) -> bytes:
    async def run() -> bytes:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            while True:  # a TCP upstream may in principle answer other ids first: skip those
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(size)
                if _matches(data, query_id, question, bare_tc=False):
                    return data
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.wait_for(run(), timeout)


async def exchange(packet: bytes, upstreams: Sequence[Upstream], timeout: float) -> bytes:
    """Send a one-question query to the upstreams in turn; the first valid response, with the caller's id.

    Raises ResolveError("TIMEOUT" | "SERVFAIL" | "INVALID").
    """
    try:
        question = _question_bytes(packet)
    except ValueError as exc:
        raise ResolveError("INVALID", str(exc)) from None
    if not upstreams:
        raise ResolveError("SERVFAIL", "no upstream resolver configured")
    caller_id = packet[:2]
    failures: list[str] = []
    for upstream in upstreams:
        query_id = secrets.randbits(16)
        wire = query_id.to_bytes(2) + packet[2:]
        try:
            data = await _udp(wire, upstream, query_id, question, timeout)
            if data[2] & 0x02:  # TC: the answer did not fit in UDP; ask again over TCP
                query_id = secrets.randbits(16)
                wire = query_id.to_bytes(2) + packet[2:]
                data = await _tcp(wire, upstream, query_id, question, timeout)
        except TimeoutError:
            failures.append(f"{upstream} timed out after {timeout}s")
            continue
        except (OSError, asyncio.IncompleteReadError, struct.error) as exc:
            failures.append(f"{upstream}: {exc or type(exc).__name__}")
            continue
        rcode = data[3] & 0x0F
        if rcode in (RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP, RCODE.FORMERR):
            failures.append(f"{upstream} answered {RCODE.get(rcode)}")
            continue  # another upstream may do better
        return caller_id + data[2:]
    code = "TIMEOUT" if failures and all("timed out" in f for f in failures) else "SERVFAIL"
    raise ResolveError(code, "; ".join(failures))


# --------------------------------------------------------------------------- the resolver


@dataclass(slots=True)
class _Entry:
    addresses: tuple[str, ...]
    ttl: int
    expires: float
    error: ResolveError | None = None


class Resolver:
    def __init__(self, config: ResolverConfig, upstreams: Sequence[Upstream] | None = None) -> None:
        self.config = config
        if upstreams is None:
            upstreams = tuple(parse_upstream(u) for u in config.upstreams) or system_upstreams()
        self.upstreams = tuple(upstreams)
        self._cache: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, int], asyncio.Future[_Entry]] = {}
        self.queries = 0  # upstream queries sent (for tests and metrics)

    def _clamp(self, ttl: int) -> int:
        return max(self.config.min_ttl, min(self.config.max_ttl, ttl))

    async def resolve(self, name: str) -> ResolveResult:
        """Every A and AAAA address of `name` (CNAMEs followed). Raises ResolveError."""
        name = name.rstrip(".").lower()
        if not name or len(name) > 253:
            raise ResolveError("INVALID", f"{name!r} is not a host name")
        cached = self._cached(name)
        if cached is not None:
            return cached
        a, aaaa = await asyncio.gather(
            self.lookup(name, QTYPE.A), self.lookup(name, QTYPE.AAAA), return_exceptions=True
        )
        results = [r for r in (a, aaaa) if isinstance(r, _Entry)]
        addresses = tuple(addr for r in results for addr in r.addresses)
        if addresses:
            return ResolveResult(addresses, min(r.ttl for r in results if r.addresses))
        errors = [r.error if isinstance(r, _Entry) else r for r in (a, aaaa)]
        for code in ("NXDOMAIN", "TIMEOUT", "SERVFAIL"):
            for error in errors:
                if isinstance(error, ResolveError) and error.code == code:
                    raise error
        for error in errors:
            if isinstance(error, BaseException) and not isinstance(error, ResolveError):
                raise error
        raise ResolveError("NODATA", f"{name} has no A or AAAA record")

    def _cached(self, name: str) -> ResolveResult | None:
        """Both answers fresh in the cache, with an address: the common case, answered without tasks or waits."""
        now = time.monotonic()
        results = (self._cache.get((name, QTYPE.A)), self._cache.get((name, QTYPE.AAAA)))
        # A family with no records (NODATA, cached like any answer) is an answer too: a name with only A records
        # must not take the slow path, with its tasks, on every connection.
        if any(r is None or r.expires <= now or (r.error is not None and r.error.code != "NODATA") for r in results):
            return None
        addresses = tuple(addr for r in results if r is not None for addr in r.addresses)
        if not addresses:
            return None  # the slow path says why (NODATA)
        return ResolveResult(addresses, min(r.ttl for r in results if r is not None and r.addresses))

    async def lookup(self, name: str, qtype: int) -> _Entry:
        key = (name, qtype)
        entry = self._cache.get(key)
        now = time.monotonic()
        if entry is not None:
            if entry.expires > now:
                return entry
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            entry = await self._query(name, qtype)
            future.set_result(entry)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]
        return entry

    async def _query(self, name: str, qtype: int) -> _Entry:
        query = DNSRecord.question(name, QTYPE.get(qtype))
        query.header.rd = 1
        self.queries += 1
        data = await exchange(query.pack(), self.upstreams, self.config.timeout)
        try:
            answer = DNSRecord.parse(data)
        except Exception as exc:  # dnslib raises its own DNSError and others on garbage
            raise ResolveError("SERVFAIL", f"unparseable answer for {name}: {exc}") from None
        now = time.monotonic()
        rcode = answer.header.rcode
        if rcode == RCODE.NXDOMAIN:
            return self._negative(name, qtype, ResolveError("NXDOMAIN", f"{name} does not exist"), answer, now)
        if rcode != RCODE.NOERROR:
            raise ResolveError("SERVFAIL", f"{name}: upstream answered {RCODE.get(rcode)}")
        addresses, ttl = _follow(answer, name, qtype)
        if not addresses:
            return self._negative(name, qtype, ResolveError("NODATA", f"{name} has no {QTYPE.get(qtype)}"), answer, now)
        ttl = self._clamp(ttl)
        entry = _Entry(addresses, ttl, now + ttl)
        self._store((name, qtype), entry)
        return entry

    def _negative(self, name: str, qtype: int, error: ResolveError, answer: DNSRecord, now: float) -> _Entry:
        soa = [rr.ttl for rr in answer.auth if rr.rtype == QTYPE.SOA]
        ttl = max(self.config.min_ttl, min(NEGATIVE_TTL_MAX, self.config.max_ttl, soa[0] if soa else NEGATIVE_TTL_MAX))
        entry = _Entry((), ttl, now + ttl, error)
        self._store((name, qtype), entry)
        return entry

    def _store(self, key: tuple[str, int], entry: _Entry) -> None:
        if entry.ttl <= 0:
            return
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)


def _follow(answer: DNSRecord, name: str, qtype: int) -> tuple[tuple[str, ...], int]:
    """Addresses of `name` in the answer section, following CNAMEs found there; TTL = smallest on the chain."""
    current = name
    ttls: list[int] = []
    for _ in range(MAX_CNAME_HOPS + 1):
        found: list[str] = []
        target: str | None = None
        for rr in answer.rr:
            owner = str(rr.rname).rstrip(".").lower()
            if owner != current:
                continue
            if rr.rtype == qtype:
                found.append(str(rr.rdata))
                ttls.append(rr.ttl)
            elif rr.rtype == QTYPE.CNAME and target is None:
                target = str(rr.rdata).rstrip(".").lower()
                ttls.append(rr.ttl)
        if found:
            return tuple(dict.fromkeys(found)), min(ttls)
        if target is None:
            break
        current = target
    return (), 0
