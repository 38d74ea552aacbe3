"""The egress engine: a transparent proxy fed by nftables TPROXY, deciding every sandbox connection.

Per accepted connection (original destination = the accepted socket's own address):

1. Identify the sandbox by source address in the *current* policy state (looked up at
   accept time, so a policy change applies to the next connection). Unknown: RST.
2. Cap connections in the peek phase (per sandbox and in total) and apply the
   connections-per-minute limit (waits up to `rate_limit_max_wait`, then refuses).
3. Peek under a deadline and a size bound without forwarding anything: a TLS
   ClientHello (reassembled across records and segments) gives the SNI, an HTTP/1.x
   request head gives the Host, anything else is opaque. A client that sends nothing
   within the deadline is taken as opaque (server-speaks-first protocols).
4. Decide (`plan`): a named connection is allowed by its name and then dialled to an
   address the gateway resolved itself: the original destination only if it is among
   them, else a resolved one (SNI spoofing gets the real host or nothing). Every address
   is checked against `Destinations` (private, link-local, metadata, own, blocklist;
   DNS rebinding lands here). Unnamed connections are allowed only by an `allow_cidrs`
   rule or by a DNS-learned address of this sandbox.
5. Deny explicitly (TLS alert, HTTP 403 with X-Gateway-Reason, RST for opaque) or dial
   with `SO_MARK = dial_mark` and relay both ways with backpressure, half-close, an idle
   timeout, bandwidth buckets and byte counts (`gateway.relay`: a handshake-sized start by
   copying, then `os.splice` through a kernel pipe so bulk bytes never enter Python). The
   client->server side of plain HTTP is always copied, because every later request head on
   the connection is checked too: a Host other than the one dialled is cut with a 403 once
   the upstream has finished the earlier responses. Only a genuine WebSocket handshake ends
   the checking (`gateway.peek`: h2c and other upgrades are refused).

Sockets are driven directly on the event loop (add_reader/add_writer), not through
asyncio streams: splice needs the raw descriptors. The deciding steps run in one task per
connection; once relayed (`gateway.relay`), a connection is only loop callbacks, so an idle
one costs two sockets and a few small objects: no task, no buffers, no pipes.
6. One flow record per connection (allowed or denied), and a structured log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.decision import CompiledPolicy, decide
from gateway.destinations import Destinations
from gateway.flowlog import FlowLog, FlowRecord
from gateway.learned import LearnedDestinations
from gateway.peek import (
    CLASSIFY_MAX_BYTES,
    NEED_MORE,
    AlertDescription,
    Answer,
    AnswerAwaited,
    ClientHello,
    ClientHelloParser,
    EndsBefore,
    HttpError,
    HttpRequestTracker,
    PeekError,
    RequestHead,
    ServerAnswer,
    TrafficKind,
    classify,
    http_forbidden,
    sanitize_reason,
    tls_alert,
)
from gateway.ratelimit import BandwidthLimiter, ConnectionRateLimiter
from gateway.relay import CAN_SPLICE, GuardStop, IdleSweeper, Relay
from gateway.resolver import ResolveError, Resolver
from gateway.settings import Config
from gateway.state import PolicyState

log = structlog.get_logger("gateway.egress")

IP_TRANSPARENT = 19  # SOL_IP
IPV6_TRANSPARENT = 75  # IPPROTO_IPV6
READ_CHUNK = 64 * 1024
#: After a denial is written, how long the client's remaining bytes are drained (so closing does not RST
#: away the 403 / alert before the client read it).
DRAIN_AFTER_DENIAL = 1.0
DRAIN_MAX_BYTES = 256 * 1024
#: How long a keep-alive connection cut at a refused request waits for the upstream to finish earlier responses.
HTTP_CUT_GRACE = 5.0
LISTEN_BACKLOG = 4096

ACCEPT_BATCH = 64
#: After accept() failed (EMFILE, ENOBUFS...), the listener is left alone this long.
ACCEPT_BACKOFF = 0.05

_RST_LINGER = struct.pack("ii", 1, 0)
#: Rules of `decide` whose denial needs neither a name nor an address.
_PORT_OR_PROFILE_RULES = frozenset({"builtin:smtp", "profile:isolated", "egress.allow_internet"})


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with a connection once its name (if any) is known."""

    allowed: bool
    reason: str
    rule: str
    dial: str | None = None  # the address to dial (the port is always the original one)
    from_allow_cidrs: bool = False
    unresolvable: bool = False


def _cidr_allows(policy: CompiledPolicy, address: str, port: int) -> bool:
    return decide(policy, None, address, port, "tcp").rule.startswith("allow_cidrs")


def plan_unnamed(
    policy: CompiledPolicy,
    orig: str,
    port: int,
    protocol: str,
    destinations: Destinations,
    learned: LearnedDestinations | None,
) -> Plan:
    """A connection with no usable name (opaque TCP, TLS without SNI, HTTP with an IP Host): by address only."""
    name = learned.lookup(policy.sandbox_id, orig) if learned is not None else None
    verdict = decide(policy, name, orig, port, protocol)
    if not verdict.allowed:
        return Plan(False, verdict.reason, verdict.rule)
    from_cidrs = verdict.rule.startswith("allow_cidrs")
    refusal = destinations.check(orig)
    if refusal is not None and not (refusal.overridable and from_cidrs):
        return Plan(False, refusal.reason, refusal.rule)
    reason = verdict.reason if name is None else f"{verdict.reason} (address learned from DNS for {name})"
    return Plan(True, reason, verdict.rule, orig, from_cidrs)


async def plan_named(
    policy: CompiledPolicy,
    name: str,
    orig: str,
    port: int,
    protocol: str,
    destinations: Destinations,
    resolver: Resolver,
) -> Plan:
    """A connection that names its host: decide on the name, then dial only what the gateway resolved."""
    verdict = decide(policy, name, orig, port, protocol)
    if not verdict.allowed:
        return Plan(False, verdict.reason, verdict.rule)
    if verdict.rule.startswith("allow_cidrs"):
        # The address itself is explicitly allowed (the name is not): the connection goes where the client
        # sent it, exactly as an opaque connection to that address would.
        refusal = destinations.check(orig)
        if refusal is not None and not refusal.overridable:
            return Plan(False, refusal.reason, refusal.rule)
        return Plan(True, verdict.reason, verdict.rule, orig, True)
    try:
        resolved = await resolver.resolve(name)
    except ResolveError as exc:
        return Plan(False, f"cannot resolve {name}: {exc.code} ({exc.message})", "builtin:resolve", unresolvable=True)
    usable: list[str] = []
    first_refusal: str | None = None
    first_rule = "builtin:special"
    for address in resolved.addresses:
        per_address = decide(policy, name, address, port, protocol)  # deny_cidrs apply to resolved addresses
        if not per_address.allowed:
            if first_refusal is None:
                first_refusal, first_rule = f"{name} resolves to {address}: {per_address.reason}", per_address.rule
            continue
        refusal = destinations.check(address)
        if refusal is not None and not (refusal.overridable and _cidr_allows(policy, address, port)):
            if first_refusal is None:
                first_refusal, first_rule = f"{name} resolves to a refused address: {refusal.reason}", refusal.rule
            continue
        usable.append(address)
    if not usable:
        return Plan(False, first_refusal or f"{name} has no usable address", first_rule)
    if orig in usable:
        dial = orig
    else:
        same_family = [a for a in usable if (":" in a) == (":" in orig)]
        dial = (same_family or usable)[0]
    return Plan(True, verdict.reason, verdict.rule, dial)


# --------------------------------------------------------------------------- peek


@dataclass(slots=True)
class Peeked:
    kind: TrafficKind | None  # None: the client closed or failed before anything was decidable
    data: bytearray
    hello: ClientHello | None = None
    tls_error: PeekError | None = None
    head: RequestHead | None = None
    http_error: HttpError | None = None
    later: list[Any] = field(default_factory=list)  # HTTP events after the first head (pipelined requests)
    tracker: HttpRequestTracker | None = None
    problem: str | None = None  # timeout / too large / closed early


class Peeker:
    """Sans-I/O peek: bytes in, a `Peeked` out once the traffic is classified and its name known (or not
    decidable within `max_bytes`). Nothing read is ever forwarded by the peek itself."""

    __slots__ = ("buf", "events", "kind", "max_bytes", "out", "parser", "tracker")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.kind: TrafficKind | None = None
        self.parser: ClientHelloParser | None = None
        self.tracker: HttpRequestTracker | None = None
        self.events: list[Any] = []
        self.out = Peeked(None, self.buf)

    @property
    def want(self) -> int:
        """How many more bytes may be read (0: the bound is reached, see `too_large`)."""
        return self.max_bytes - len(self.buf)

    def too_large(self) -> Peeked:
        self.out.kind = self.kind
        self.out.problem = f"{self.kind or 'protocol'} header larger than {self.max_bytes} bytes"
        return self.out

    def timed_out(self, timeout: float) -> Peeked:
        out = self.out
        if not self.buf:
            out.kind = TrafficKind.OPAQUE  # nothing said: a server-speaks-first protocol
        else:
            out.kind = self.kind
            out.problem = f"no complete {self.kind or 'protocol'} header within {timeout}s"
        return out

    def feed(self, chunk: bytes) -> Peeked | None:
        """The next bytes from the client (b"" = it closed); the result once decided, else None."""
        out, buf = self.out, self.buf
        if not chunk:
            out.kind = self.kind
            out.problem = "client closed the connection before its request was complete" if buf else "closed"
            return out
        start = len(buf)
        buf += chunk
        if self.kind is None:
            decided = classify(buf)
            if decided is NEED_MORE:
                return None
            self.kind = kind = decided  # type: ignore[assignment]
            start = 0  # the parsers get everything read so far
            if kind is TrafficKind.OPAQUE:
                out.kind = kind
                return out
            if kind is TrafficKind.TLS:
                self.parser = ClientHelloParser(max_handshake_size=self.max_bytes)
            else:
                self.tracker = out.tracker = HttpRequestTracker(max_head_size=self.max_bytes)
        new = bytes(buf[start:])
        if self.parser is not None:
            result = self.parser.feed(new)
            if isinstance(result, ClientHello):
                out.kind, out.hello = self.kind, result
                return out
            if isinstance(result, PeekError):
                out.kind, out.tls_error = self.kind, result
                return out
        elif self.tracker is not None:
            events = self.events
            events.extend(e for e in self.tracker.feed(new) if e is not NEED_MORE)
            for index, event in enumerate(events):
                if isinstance(event, HttpError):
                    out.kind, out.http_error = self.kind, event
                    return out
                if isinstance(event, RequestHead):
                    out.kind, out.head = self.kind, event
                    out.later = events[index + 1 :]
                    return out
        return None


async def peek(
    recv: Callable[[int], Awaitable[bytes]], timeout: float, max_bytes: int, peeker: Peeker | None = None
) -> Peeked:
    """Read (never forward) until the traffic is classified and its name known, within `timeout` and `max_bytes`.
    `peeker` continues a peek that already has some bytes."""
    deadline = time.monotonic() + timeout
    peeker = peeker or Peeker(max_bytes)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return peeker.timed_out(timeout)
        want = peeker.want
        if want <= 0:
            return peeker.too_large()
        try:
            chunk = await asyncio.wait_for(recv(min(want, READ_CHUNK)), remaining)
        except TimeoutError:
            continue
        peeked = peeker.feed(chunk)
        if peeked is not None:
            return peeked


# --------------------------------------------------------------------------- the engine


@dataclass(slots=True)
class _Flow:
    start_us: int
    sandbox: str
    src_addr: str
    src_port: int
    orig_dst_addr: str
    orig_dst_port: int
    dst_addr: str = ""
    dst_port: int = 0
    hostname: str | None = None
    protocol: str = "tcp"
    bytes_up: int = 0
    bytes_down: int = 0
    verdict: str = "deny"
    reason: str = ""
    rule: str = ""


class _HttpGuard:
    """Checks every later request head of a plain-HTTP connection against the host the upstream was dialled for."""

    def __init__(self, policy: CompiledPolicy, tracker: HttpRequestTracker, host: str | None, port: int) -> None:
        self.policy = policy
        self.tracker = tracker
        self.host = host
        self.port = port

    def check(self, events: list[Any], chunk_start: int) -> GuardStop | None:
        """Where the chunk that produced `events` must stop, or None when all of it may go."""
        for event in events:
            if isinstance(event, HttpError):
                return GuardStop(0, (f"{event.code}: {event.message}", "builtin:http"))
            if isinstance(event, AnswerAwaited):  # the rest waits for the server's answer
                watch = ServerAnswer(event.awaiting, event.websocket_key)
                return GuardStop(max(0, event.offset - chunk_start), None, watch)
            if isinstance(event, EndsBefore):
                return GuardStop(max(0, event.offset - chunk_start), None)
            if isinstance(event, RequestHead) and event.host != self.host:
                cut = max(0, event.offset - chunk_start)
                verdict = decide(self.policy, None if event.host_is_ip else event.host, None, self.port, "http")
                if not verdict.allowed:
                    return GuardStop(cut, (f"host {event.host}: {verdict.reason}", verdict.rule))
                reason = f"request for host {event.host} on a connection opened for {self.host} (domain fronting)"
                return GuardStop(cut, (reason, "builtin:host-mismatch"))
        return None

    def feed(self, chunk: bytes) -> GuardStop | None:
        start = self.tracker.offset
        return self.check(self.tracker.feed(chunk), start)

    def answered(self, answer: Answer | HttpError) -> Answer | tuple[str, str]:
        if isinstance(answer, HttpError):
            return (f"{answer.code}: {answer.message}", "builtin:http")
        self.tracker.answered(answer)
        return answer


class _FirstWordsGuard:
    """The client of a connection decided by address because it said nothing within the peek (a protocol where
    the server speaks first): its first bytes may be neither a TLS hello nor an HTTP request, which would name a
    host that decision never checked (an address learned from DNS for one name serves others too). Done once
    they are classified; until then they go (no request is complete before its first line is)."""

    __slots__ = ("buf", "waited")

    def __init__(self, waited: float) -> None:
        self.buf = bytearray()
        self.waited = waited

    def feed(self, chunk: bytes) -> GuardStop | None:
        self.buf += chunk[: CLASSIFY_MAX_BYTES - len(self.buf)]
        kind = classify(self.buf)
        if kind is NEED_MORE:
            return None
        if kind is TrafficKind.OPAQUE:
            return GuardStop(len(chunk), None, passthrough=True)
        reason = f"{kind} from a client that said nothing for {self.waited}s (decided by address, no name checked)"
        return GuardStop(0, (reason, "builtin:peek"))

    def answered(self, answer: Answer | HttpError) -> Answer | tuple[str, str]:
        raise RuntimeError("no request of a server-speaks-first connection awaits an answer")


class EgressEngine:
    def __init__(
        self,
        state_provider: Callable[[], PolicyState],
        config: Config,
        resolver: Resolver,
        destinations: Destinations,
        learned: LearnedDestinations | None = None,
        *,
        flowlog: FlowLog | None = None,
        connection_limiter: ConnectionRateLimiter | None = None,
        bandwidth: BandwidthLimiter | None = None,
        host: tuple[str, str] = ("0.0.0.0", "::"),
        splice: bool = True,
    ) -> None:
        self.state_provider = state_provider
        self.config = config
        self.egress = config.egress
        self.resolver = resolver
        self.destinations = destinations
        self.learned = learned
        self.flowlog = flowlog
        self.connection_limiter = connection_limiter
        self.bandwidth = bandwidth
        self.host = host
        #: Relay TLS and opaque bytes with os.splice (kernel pipes, no copy through Python) where available.
        self.splice = splice and CAN_SPLICE
        self.listeners: list[socket.socket] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._peeking: dict[str, int] = {}
        self._peeking_total = 0
        self._sweeper: IdleSweeper | None = None
        self.stats = {"accepted": 0, "allowed": 0, "denied": 0}

    # ------------------------------------------------------------------ lifecycle

    def _listener(self, family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                sock.bind((self.host[1], self.egress.listen_port))
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((self.host[0], self.egress.listen_port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        """Open the IPv4 and IPv6 transparent listeners (needs CAP_NET_ADMIN)."""
        loop = asyncio.get_running_loop()
        for family in (socket.AF_INET, socket.AF_INET6):
            listener = self._listener(family)
            self.listeners.append(listener)
            loop.add_reader(listener.fileno(), self._accept_ready, listener)
        log.info("egress.listening", port=self.egress.listen_port, splice=self.splice)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.remove_reader(listener.fileno())
            listener.close()
        self.listeners.clear()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._sweeper is not None:
            for relay in list(self._sweeper.relays):
                relay.finish(ConnectionAbortedError("the gateway is shutting down"))
            self._sweeper.stop()
            self._sweeper = None
        # Denials started by relays that just ended.
        await asyncio.gather(*self._connections, return_exceptions=True)

    def _accept_ready(self, listener: socket.socket) -> None:
        """Accept what the backlog holds (bounded per wake-up, so one listener cannot starve the loop)."""
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS...: the listener stays; back off a little
                log.warning("egress.accept_failed", error=str(exc))
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_BACKOFF, self._resume_accepting, listener)
                return
            conn.setblocking(False)
            self._track(asyncio.create_task(self._handle(conn)))

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener in self.listeners:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept_ready, listener)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    # ------------------------------------------------------------------ per connection

    async def _handle(self, conn: socket.socket) -> None:
        relayed = False
        try:
            relayed = await self._connection(conn)
        except Exception:
            log.exception("egress.error")
            _reset(conn)
        finally:
            if not relayed:  # once relayed, the relay's end closes it
                conn.close()

    async def _connection(self, conn: socket.socket) -> bool:
        """Decide one accepted connection; True when it was handed to a relay (which then owns the socket)."""
        self.stats["accepted"] += 1
        try:
            peer = conn.getpeername()
            local = conn.getsockname()
        except OSError:
            return False  # already gone
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flow = _Flow(time.time_ns() // 1000, "", peer[0], peer[1], local[0], local[1])
        policy = self.state_provider().policy_for_address(flow.src_addr)
        if policy is None:
            self._deny(flow, "unknown sandbox (source address not attached to any sandbox)", "default:unknown-source")
            _reset(conn)
            return False
        flow.sandbox = policy.sandbox_id
        sandbox = policy.sandbox_id
        # Denials that depend on nothing the peek could reveal (SMTP ports, isolated, internet off) are given
        # at once: a server-speaks-first client would otherwise wait out the whole peek deadline first.
        early = decide(policy, None, None, flow.orig_dst_port, "tcp")
        if not early.allowed and early.rule in _PORT_OR_PROFILE_RULES:
            self._deny(flow, early.reason, early.rule)
            _reset(conn)
            return False
        peeker = Peeker(self.egress.peek_max_bytes)
        try:  # the ClientHello or request head is usually here already: then nothing waits for first bytes
            ready = conn.recv(min(READ_CHUNK, peeker.want))
        except (BlockingIOError, InterruptedError):
            ready = None
        except OSError:  # reset before its first byte: as if closed, nothing to decide or record
            ready = b""
        peeked = None if ready is None else peeker.feed(ready)
        waiting = peeked is None  # only connections that must wait for their first bytes count against the caps
        if waiting and (
            self._peeking_total >= self.egress.max_peeking_total
            or self._peeking.get(sandbox, 0) >= self.egress.max_peeking_per_sandbox
        ):
            self._deny(flow, "too many connections waiting for their first bytes", "builtin:peek-cap")
            _reset(conn)
            return False
        if waiting:
            self._peeking_total += 1
            self._peeking[sandbox] = self._peeking.get(sandbox, 0) + 1
        loop = asyncio.get_running_loop()
        try:
            if self.connection_limiter is not None and not await self.connection_limiter.admit(
                sandbox, policy.limits.connections_per_minute, self.egress.rate_limit_max_wait
            ):
                self._deny(flow, "connection rate limit", "limits.connections_per_minute")
                _reset(conn)
                return False
            if peeked is None:
                peeked = await peek(
                    lambda n: loop.sock_recv(conn, n), self.egress.peek_timeout, self.egress.peek_max_bytes, peeker
                )
        finally:
            if waiting:
                self._peeking_total -= 1
                left = self._peeking[sandbox] - 1
                if left:
                    self._peeking[sandbox] = left
                else:
                    del self._peeking[sandbox]
        return await self._after_peek(conn, flow, policy, peeked)

    async def _after_peek(self, conn: socket.socket, flow: _Flow, policy: CompiledPolicy, peeked: Peeked) -> bool:
        orig, port = flow.orig_dst_addr, flow.orig_dst_port
        kind = peeked.kind
        if kind is None:
            if peeked.problem == "closed":
                return False  # connected and closed without a byte: nothing to decide, nothing to record
            self._deny(flow, peeked.problem or "nothing decidable", "builtin:peek")
            _reset(conn)
            return False
        if kind is TrafficKind.TLS:
            flow.protocol = "tls"
            if peeked.tls_error is not None or peeked.hello is None:
                reason = (
                    f"{peeked.tls_error.code}: {peeked.tls_error.message}" if peeked.tls_error else peeked.problem or ""
                )
                self._deny(flow, reason, "builtin:tls")
                await _deny_with(conn, tls_alert(AlertDescription.DECODE_ERROR))
                return False
            hello = peeked.hello
            flow.hostname = hello.sni
            if hello.sni:
                plan = await plan_named(policy, hello.sni, orig, port, "tls", self.destinations, self.resolver)
            else:
                plan = plan_unnamed(policy, orig, port, "tls", self.destinations, self.learned)
            if not plan.allowed:
                self._deny(flow, plan.reason, plan.rule)
                alert = AlertDescription.UNRECOGNIZED_NAME if plan.unresolvable else AlertDescription.ACCESS_DENIED
                await _deny_with(conn, tls_alert(alert, hello.record_version))
                return False
            return await self._relay(conn, flow, policy, plan, _take_data(peeked), None)
        if kind is TrafficKind.HTTP:
            flow.protocol = "http"
            head = peeked.head
            if peeked.http_error is not None or head is None:
                error = peeked.http_error
                reason = f"{error.code}: {error.message}" if error else peeked.problem or "incomplete request"
                self._deny(flow, reason, "builtin:http")
                await _deny_with(conn, http_forbidden(reason, "builtin:http"))
                return False
            flow.hostname = head.host
            if head.host and not head.host_is_ip:
                plan = await plan_named(policy, head.host, orig, port, "http", self.destinations, self.resolver)
            else:
                plan = plan_unnamed(policy, orig, port, "http", self.destinations, self.learned)
            if not plan.allowed:
                self._deny(flow, plan.reason, plan.rule)
                await _deny_with(conn, http_forbidden(plan.reason, plan.rule))
                return False
            assert peeked.tracker is not None
            guard = _HttpGuard(policy, peeked.tracker, head.host, port)
            return await self._relay(conn, flow, policy, plan, _take_data(peeked), guard, peeked.later)
        # Opaque TCP (or a client that said nothing): by address only.
        if kind is not TrafficKind.OPAQUE or peeked.problem:
            self._deny(flow, peeked.problem or "undecidable", "builtin:peek")
            _reset(conn)
            return False
        plan = plan_unnamed(policy, orig, port, "tcp", self.destinations, self.learned)
        if not plan.allowed:
            self._deny(flow, plan.reason, plan.rule)
            _reset(conn)
            return False
        first = _take_data(peeked)
        # Said nothing (the server speaks first): what the client says first is looked at still.
        guard = None if first else _FirstWordsGuard(self.egress.peek_timeout)
        return await self._relay(conn, flow, policy, plan, first, guard)

    # ------------------------------------------------------------------ dial + relay

    async def _dial(self, address: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # The ruleset's dial guard keys on this mark: a dial can never reach the gateway or a sandbox.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.egress.dial_mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (address, port)), self.egress.connect_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _relay(
        self,
        conn: socket.socket,
        flow: _Flow,
        policy: CompiledPolicy,
        plan: Plan,
        first: bytes | bytearray,
        guard: _HttpGuard | _FirstWordsGuard | None,
        later_events: list[Any] | None = None,
    ) -> bool:
        """Dial and hand both sockets to a `Relay`; True when it owns the client socket from now on."""
        assert plan.dial is not None
        flow.dst_addr, flow.dst_port = plan.dial, flow.orig_dst_port
        flow.verdict, flow.reason, flow.rule = "allow", plan.reason, plan.rule
        try:
            upstream = await self._dial(plan.dial, flow.orig_dst_port)
        except (OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            self._deny(flow, f"upstream {plan.dial} unreachable: {why}", "builtin:dial")
            if isinstance(guard, _HttpGuard):
                await _deny_with(conn, _bad_gateway(flow.reason))
            else:
                _reset(conn)
            return False
        self.stats["allowed"] += 1
        up_bucket = down_bucket = None
        if self.bandwidth is not None:
            limits = policy.limits
            up_bucket = self.bandwidth.bucket(flow.sandbox, "up", limits.bandwidth_mbit, limits.burst_mbit)
            down_bucket = self.bandwidth.bucket(flow.sandbox, "down", limits.bandwidth_mbit, limits.burst_mbit)
        loop = asyncio.get_running_loop()
        sweeper = self._sweeper
        if sweeper is None or sweeper.loop is not loop:
            sweeper = self._sweeper = IdleSweeper(loop, self.egress.idle_timeout)
        Relay(
            conn,
            upstream,
            functools.partial(self._relayed, conn, flow),
            sweeper=sweeper,
            first=first,
            # Requests pipelined behind the first one, read while peeking, are checked like later chunks.
            first_stop=guard.check(later_events, 0) if isinstance(guard, _HttpGuard) and later_events else None,
            guard=guard,
            up_bucket=up_bucket,
            down_bucket=down_bucket,
            splice=self.splice,
            cut_grace=HTTP_CUT_GRACE,
        )
        return True

    def _relayed(self, conn: socket.socket, flow: _Flow, relay: Relay) -> None:
        """The relay ended: close (or reset) the client, deliver a cut's denial, record the flow."""
        flow.bytes_up, flow.bytes_down = relay.bytes_up, relay.bytes_down
        if relay.error is not None:
            if isinstance(relay.error, TimeoutError):
                flow.reason += f"; closed after {self.egress.idle_timeout}s idle"
            _reset(conn)
        elif relay.cut is not None:
            reason, rule = relay.cut
            flow.verdict, flow.reason, flow.rule = "deny", reason, rule
            self._log_denial(flow)
            self._track(asyncio.get_running_loop().create_task(_deny_with(conn, http_forbidden(reason, rule))))
        elif relay.closed_early:
            flow.reason += "; ended at the server's answers (Expect): the client's later bytes were not forwarded"
            # Nothing to add to the server's answer; draining first keeps the close from resetting it away.
            self._track(asyncio.get_running_loop().create_task(_deny_with(conn, b"")))
        else:
            conn.close()
        self._emit(flow)

    # ------------------------------------------------------------------ records

    def _deny(self, flow: _Flow, reason: str, rule: str) -> None:
        flow.verdict, flow.reason, flow.rule = "deny", reason, rule
        self.stats["denied"] += 1
        self._log_denial(flow)
        self._emit(flow)

    def _log_denial(self, flow: _Flow) -> None:
        log.warning(
            "egress.deny",
            sandbox=flow.sandbox or None,
            src=flow.src_addr,
            dst=flow.orig_dst_addr,
            port=flow.orig_dst_port,
            host=flow.hostname,
            protocol=flow.protocol,
            reason=flow.reason,
            rule=flow.rule,
        )

    def _emit(self, flow: _Flow) -> None:
        end_us = time.time_ns() // 1000
        record = FlowRecord(
            start_us=flow.start_us,
            end_us=end_us,
            sandbox=flow.sandbox,
            src_addr=flow.src_addr,
            src_port=flow.src_port,
            dst_addr=flow.dst_addr or flow.orig_dst_addr,
            dst_port=flow.dst_port or flow.orig_dst_port,
            orig_dst_addr=flow.orig_dst_addr,
            orig_dst_port=flow.orig_dst_port,
            hostname=flow.hostname,
            protocol=flow.protocol,
            bytes_up=flow.bytes_up,
            bytes_down=flow.bytes_down,
            duration_ms=max(0, end_us - flow.start_us) / 1000,
            verdict=flow.verdict,
            reason=flow.reason,
            rule=flow.rule,
        )
        if self.flowlog is None:
            log.info("flow", **record.to_dict())  # the flow log writes this line itself when it is there
        else:
            self.flowlog.record(record)  # never raises, never blocks


# --------------------------------------------------------------------------- the relay


def _take_data(peeked: Peeked) -> bytearray:
    """The bytes read while peeking, handed over (not copied) to the relay: the peek result keeps none."""
    data, peeked.data = peeked.data, bytearray()
    return data


# --------------------------------------------------------------------------- denial helpers


def _shutdown_write(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the explicit denial for opaque TCP, never a silent hang."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    sock.close()


async def _deny_with(sock: socket.socket, payload: bytes) -> None:
    """Write the denial, send FIN, and drain what the client still sends for a moment, so that closing with
    unread bytes (which makes the kernel send RST) cannot destroy the denial before the client reads it."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(DRAIN_AFTER_DENIAL):
            await loop.sock_sendall(sock, payload)
            _shutdown_write(sock)
            drained = 0
            while drained < DRAIN_MAX_BYTES:
                chunk = await loop.sock_recv(sock, READ_CHUNK)
                if not chunk:
                    break
                drained += len(chunk)
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()


def _bad_gateway(reason: str) -> bytes:
    body = f"Upstream unreachable: {sanitize_reason(reason)}\n".encode("ascii")
    return (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(body)
        + body
    )
