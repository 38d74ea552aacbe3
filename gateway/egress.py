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
   timeout, bandwidth buckets and byte counts. The relay is `os.splice` through a kernel
   pipe (zero-copy; the bytes never enter Python) except for the client->server side of
   plain HTTP, where every later request head on the connection is checked too: a Host
   other than the one dialled is cut with a 403 once the upstream has finished the
   earlier responses.

Sockets are driven directly on the event loop (sock_accept, add_reader/add_writer), not
through asyncio streams: splice needs the raw descriptors, and an idle relayed connection
then costs two sockets and one small task pair, no transport buffers and no pipes (the
pipes are made when data first flows).
6. One flow record per connection (allowed or denied), and a structured log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.config import Config
from gateway.decision import CompiledPolicy, decide
from gateway.destinations import Destinations, read_local_addresses
from gateway.dns.policy import DnsConfig
from gateway.dns.server import DnsInterceptor
from gateway.flowlog import FlowLog, FlowRecord
from gateway.learned import LearnedDestinations
from gateway.peek import (
    NEED_MORE,
    AlertDescription,
    ClientHello,
    ClientHelloParser,
    HttpError,
    HttpRequestTracker,
    PeekError,
    RequestHead,
    TrafficKind,
    Upgraded,
    classify,
    http_forbidden,
    sanitize_reason,
    tls_alert,
)
from gateway.ratelimit import BandwidthLimiter, ConnectionRateLimiter, SharedBucket
from gateway.resolver import ResolveError, Resolver
from gateway.state import PolicyState
from gateway.stores.base import PolicyStore

log = structlog.get_logger("gateway.egress")

IP_TRANSPARENT = 19  # SOL_IP
IPV6_TRANSPARENT = 75  # IPPROTO_IPV6
RELAY_CHUNK = 64 * 1024
#: After a denial is written, how long the client's remaining bytes are drained (so closing does not RST
#: away the 403 / alert before the client read it).
DRAIN_AFTER_DENIAL = 1.0
DRAIN_MAX_BYTES = 256 * 1024
#: How long a keep-alive connection cut at a refused request waits for the upstream to finish earlier responses.
HTTP_CUT_GRACE = 5.0
LISTEN_BACKLOG = 4096

_RST_LINGER = struct.pack("ii", 1, 0)
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), spelled out for Pythons built without it
PIPE_SIZE = 1 << 20
#: A new pipe's capacity (16 pages): a flow that moved this much is grown to PIPE_SIZE, small flows never pay for that.
DEFAULT_PIPE_SIZE = 64 * 1024
#: Upper bound of the idle sweeper's period (it is also at most a quarter of the idle timeout).
IDLE_SWEEP_INTERVAL = 1.0
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
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


async def peek(recv: Callable[[int], Awaitable[bytes]], timeout: float, max_bytes: int) -> Peeked:
    """Read (never forward) until the traffic is classified and its name known, within `timeout` and `max_bytes`."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    kind: TrafficKind | None = None
    parser: ClientHelloParser | None = None
    tracker: HttpRequestTracker | None = None
    events: list[Any] = []
    out = Peeked(None, buf)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if not buf:
                out.kind = TrafficKind.OPAQUE  # nothing said: a server-speaks-first protocol
            else:
                out.kind = kind
                out.problem = f"no complete {kind or 'protocol'} header within {timeout}s"
            return out
        want = max_bytes - len(buf)
        if want <= 0:
            out.kind = kind
            out.problem = f"{kind or 'protocol'} header larger than {max_bytes} bytes"
            return out
        try:
            chunk = await asyncio.wait_for(recv(min(want, RELAY_CHUNK)), remaining)
        except TimeoutError:
            continue
        if not chunk:
            out.kind = kind
            out.problem = "client closed the connection before its request was complete" if buf else "closed"
            return out
        start = len(buf)
        buf += chunk
        if kind is None:
            decided = classify(buf)
            if decided is NEED_MORE:
                continue
            kind = decided  # type: ignore[assignment]
            start = 0  # the parsers get everything read so far
            if kind is TrafficKind.OPAQUE:
                out.kind = kind
                return out
            if kind is TrafficKind.TLS:
                parser = ClientHelloParser(max_handshake_size=max_bytes)
            else:
                tracker = HttpRequestTracker(max_head_size=max_bytes)
                out.tracker = tracker
        new = bytes(buf[start:])
        if parser is not None:
            result = parser.feed(new)
            if isinstance(result, ClientHello):
                out.kind, out.hello = kind, result
                return out
            if isinstance(result, PeekError):
                out.kind, out.tls_error = kind, result
                return out
        elif tracker is not None:
            events.extend(e for e in tracker.feed(new) if e is not NEED_MORE)
            for index, event in enumerate(events):
                if isinstance(event, HttpError):
                    out.kind, out.http_error = kind, event
                    return out
                if isinstance(event, RequestHead):
                    out.kind, out.head = kind, event
                    out.later = events[index + 1 :]
                    return out


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

    def check(self, events: list[Any], chunk_start: int) -> tuple[int, str, str] | None:
        """(bytes of the chunk that may be forwarded, reason, rule) at the first refused event, or None."""
        for event in events:
            if isinstance(event, HttpError):
                return 0, f"{event.code}: {event.message}", "builtin:http"
            if isinstance(event, Upgraded):
                return None  # the rest is another protocol (the tracker passes it through unparsed)
            if isinstance(event, RequestHead) and event.host != self.host:
                cut = max(0, event.offset - chunk_start)
                verdict = decide(self.policy, None if event.host_is_ip else event.host, None, self.port, "http")
                if not verdict.allowed:
                    return cut, f"host {event.host}: {verdict.reason}", verdict.rule
                return (
                    cut,
                    f"request for host {event.host} on a connection opened for {self.host} (domain fronting)",
                    "builtin:host-mismatch",
                )
        return None

    def feed(self, chunk: bytes) -> tuple[int, str, str] | None:
        start = self.tracker.offset
        return self.check(self.tracker.feed(chunk), start)


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
        self.splice = splice and hasattr(os, "splice")
        self.listeners: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._peeking: dict[str, int] = {}
        self._peeking_total = 0
        self._sweeper: _IdleSweeper | None = None
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
        for family in (socket.AF_INET, socket.AF_INET6):
            listener = self._listener(family)
            self.listeners.append(listener)
            self._accepting.append(asyncio.create_task(self._accept_loop(listener)))
        log.info("egress.listening", port=self.egress.listen_port, splice=self.splice)

    async def close(self) -> None:
        for task in (*self._accepting, *self._connections):
            task.cancel()
        await asyncio.gather(*self._accepting, *self._connections, return_exceptions=True)
        self._accepting.clear()
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE, ENOBUFS...: the listener stays; back off a little
                log.warning("egress.accept_failed", error=str(exc))
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._handle(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    # ------------------------------------------------------------------ per connection

    async def _handle(self, conn: socket.socket) -> None:
        try:
            await self._connection(conn)
        except Exception:
            log.exception("egress.error")
            _reset(conn)
        finally:
            conn.close()

    async def _connection(self, conn: socket.socket) -> None:
        self.stats["accepted"] += 1
        try:
            peer = conn.getpeername()
            local = conn.getsockname()
        except OSError:
            return  # already gone
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flow = _Flow(time.time_ns() // 1000, "", peer[0], peer[1], local[0], local[1])
        policy = self.state_provider().policy_for_address(flow.src_addr)
        if policy is None:
            self._deny(flow, "unknown sandbox (source address not attached to any sandbox)", "default:unknown-source")
            _reset(conn)
            return
        flow.sandbox = policy.sandbox_id
        sandbox = policy.sandbox_id
        # Denials that depend on nothing the peek could reveal (SMTP ports, isolated, internet off) are given
        # at once: a server-speaks-first client would otherwise wait out the whole peek deadline first.
        early = decide(policy, None, None, flow.orig_dst_port, "tcp")
        if not early.allowed and early.rule in _PORT_OR_PROFILE_RULES:
            self._deny(flow, early.reason, early.rule)
            _reset(conn)
            return
        if (
            self._peeking_total >= self.egress.max_peeking_total
            or self._peeking.get(sandbox, 0) >= self.egress.max_peeking_per_sandbox
        ):
            self._deny(flow, "too many connections waiting for their first bytes", "builtin:peek-cap")
            _reset(conn)
            return
        self._peeking_total += 1
        self._peeking[sandbox] = self._peeking.get(sandbox, 0) + 1
        loop = asyncio.get_running_loop()
        try:
            if self.connection_limiter is not None and not await self.connection_limiter.admit(
                sandbox, policy.limits.connections_per_minute, self.egress.rate_limit_max_wait
            ):
                self._deny(flow, "connection rate limit", "limits.connections_per_minute")
                _reset(conn)
                return
            peeked = await peek(lambda n: loop.sock_recv(conn, n), self.egress.peek_timeout, self.egress.peek_max_bytes)
        finally:
            self._peeking_total -= 1
            left = self._peeking[sandbox] - 1
            if left:
                self._peeking[sandbox] = left
            else:
                del self._peeking[sandbox]
        await self._after_peek(conn, flow, policy, peeked)

    async def _after_peek(self, conn: socket.socket, flow: _Flow, policy: CompiledPolicy, peeked: Peeked) -> None:
        orig, port = flow.orig_dst_addr, flow.orig_dst_port
        kind = peeked.kind
        if kind is None:
            if peeked.problem == "closed":
                return  # connected and closed without a byte: nothing to decide, nothing to record
            self._deny(flow, peeked.problem or "nothing decidable", "builtin:peek")
            _reset(conn)
            return
        if kind is TrafficKind.TLS:
            flow.protocol = "tls"
            if peeked.tls_error is not None or peeked.hello is None:
                reason = (
                    f"{peeked.tls_error.code}: {peeked.tls_error.message}" if peeked.tls_error else peeked.problem or ""
                )
                self._deny(flow, reason, "builtin:tls")
                await _deny_with(conn, tls_alert(AlertDescription.DECODE_ERROR))
                return
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
                return
            await self._relay(conn, flow, policy, plan, _take_data(peeked), None)
            return
        if kind is TrafficKind.HTTP:
            flow.protocol = "http"
            head = peeked.head
            if peeked.http_error is not None or head is None:
                error = peeked.http_error
                reason = f"{error.code}: {error.message}" if error else peeked.problem or "incomplete request"
                self._deny(flow, reason, "builtin:http")
                await _deny_with(conn, http_forbidden(reason, "builtin:http"))
                return
            flow.hostname = head.host
            if head.host and not head.host_is_ip:
                plan = await plan_named(policy, head.host, orig, port, "http", self.destinations, self.resolver)
            else:
                plan = plan_unnamed(policy, orig, port, "http", self.destinations, self.learned)
            if not plan.allowed:
                self._deny(flow, plan.reason, plan.rule)
                await _deny_with(conn, http_forbidden(plan.reason, plan.rule))
                return
            assert peeked.tracker is not None
            guard = _HttpGuard(policy, peeked.tracker, head.host, port)
            await self._relay(conn, flow, policy, plan, _take_data(peeked), guard, peeked.later)
            return
        # Opaque TCP (or a client that said nothing): by address only.
        if kind is not TrafficKind.OPAQUE or peeked.problem:
            self._deny(flow, peeked.problem or "undecidable", "builtin:peek")
            _reset(conn)
            return
        plan = plan_unnamed(policy, orig, port, "tcp", self.destinations, self.learned)
        if not plan.allowed:
            self._deny(flow, plan.reason, plan.rule)
            _reset(conn)
            return
        await self._relay(conn, flow, policy, plan, _take_data(peeked), None)

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
        guard: _HttpGuard | None,
        later_events: list[Any] | None = None,
    ) -> None:
        assert plan.dial is not None
        flow.dst_addr, flow.dst_port = plan.dial, flow.orig_dst_port
        flow.verdict, flow.reason, flow.rule = "allow", plan.reason, plan.rule
        try:
            upstream = await self._dial(plan.dial, flow.orig_dst_port)
        except (OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            self._deny(flow, f"upstream {plan.dial} unreachable: {why}", "builtin:dial")
            if guard is not None:
                await _deny_with(conn, _bad_gateway(flow.reason))
            else:
                _reset(conn)
            return
        self.stats["allowed"] += 1
        up_bucket = down_bucket = None
        if self.bandwidth is not None:
            limits = policy.limits
            up_bucket = self.bandwidth.bucket(flow.sandbox, "up", limits.bandwidth_mbit, limits.burst_mbit)
            down_bucket = self.bandwidth.bucket(flow.sandbox, "down", limits.bandwidth_mbit, limits.burst_mbit)
        sweeper = self._sweeper
        loop = asyncio.get_running_loop()
        if sweeper is None or sweeper.loop is not loop:
            sweeper = self._sweeper = _IdleSweeper(loop, min(IDLE_SWEEP_INTERVAL, self.egress.idle_timeout / 4))
        pipe = _Pipe(self.egress.idle_timeout, sweeper)
        cut: list[tuple[str, str]] = []  # set when a later HTTP request is refused

        def count_up(n: int) -> None:
            flow.bytes_up += n

        def count_down(n: int) -> None:
            flow.bytes_down += n

        async def send_up(data: bytes) -> None:
            if up_bucket is not None:
                await up_bucket.consume(len(data))
            await pipe.send(upstream, data)
            flow.bytes_up += len(data)

        async def upstream_direction() -> None:
            nonlocal first
            data, first = first, b""  # the only reference once sent: an idle connection keeps no ClientHello
            if guard is not None and later_events:
                refused = guard.check(later_events, 0)
                if refused is not None:
                    data = data[: refused[0]]
                    cut.append(refused[1:])
            if data:
                await send_up(data)
                data = b""
            if cut:
                _shutdown_write(upstream)
                return
            if guard is None:
                await pipe.pump(conn, upstream, count_up, up_bucket, lambda: _shutdown_write(upstream), self.splice)
                return
            while True:  # plain HTTP: every byte goes through the request tracker
                chunk = await pipe.recv(conn)
                if not chunk:
                    _shutdown_write(upstream)
                    return
                refused = guard.feed(chunk)
                if refused is not None:
                    if refused[0]:
                        await send_up(chunk[: refused[0]])
                    cut.append(refused[1:])
                    _shutdown_write(upstream)  # the upstream finishes the earlier responses, then closes
                    return
                await send_up(chunk)

        def client_eof() -> None:
            if not cut:
                _shutdown_write(conn)

        up = asyncio.create_task(upstream_direction())
        down = asyncio.create_task(pipe.pump(upstream, conn, count_down, down_bucket, client_eof, self.splice))
        try:
            done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            failed = _failure(done)
            if failed is None and pending:
                if cut:
                    # Let the upstream finish the responses to the requests it already has (bounded).
                    await asyncio.wait(pending, timeout=HTTP_CUT_GRACE)
                else:
                    # Half-closed: the other direction runs on until its own EOF (or the idle timeout).
                    await asyncio.wait(pending)
                failed = _failure({up, down})
            if failed is not None:
                if isinstance(failed, TimeoutError):
                    flow.reason += f"; closed after {self.egress.idle_timeout}s idle"
                _reset(conn)
            elif cut:
                reason, rule = cut[0]
                flow.verdict, flow.reason, flow.rule = "deny", reason, rule
                self._log_denial(flow)
                await _deny_with(conn, http_forbidden(reason, rule))
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            pipe.release()
            upstream.close()
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


def _set_ready(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _IdleSweeper:
    """One periodic check for the idle timeouts of all relayed connections (instead of a timer per wait).

    Every `interval` seconds each registered pipe whose idle clock ran out has its current waits
    failed with TimeoutError (a pipe nobody waits on is checked again at the next sweep). The
    sweep is scheduled only while some pipe is registered.
    """

    __slots__ = ("handle", "interval", "loop", "pipes")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.pipes: set[_Pipe] = set()
        self.handle: asyncio.TimerHandle | None = None

    def add(self, pipe: _Pipe) -> None:
        self.pipes.add(pipe)
        if self.handle is None:
            self.handle = self.loop.call_later(self.interval, self._sweep)

    def discard(self, pipe: _Pipe) -> None:
        self.pipes.discard(pipe)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _sweep(self) -> None:
        self.handle = None
        now = time.monotonic()
        for pipe in [p for p in self.pipes if p.waiters and now - p.last >= p.idle]:
            pipe.expire()
        if self.pipes:
            self.handle = self.loop.call_later(self.interval, self._sweep)


class _Pipe:
    """Moves bytes one way between two non-blocking sockets, with a shared idle clock for both directions.

    With splice: socket -> pipe -> socket inside the kernel (Linux), never copied into Python.
    Backpressure is natural: nothing more is taken from the source while the pipe cannot be
    emptied into the destination, so the source's receive window closes. Bandwidth is charged
    between the two halves, i.e. before the bytes are forwarded.

    With a sweeper the idle timeout is enforced by it (no timer per wait); without one (the short
    drains after a denial) every wait carries its own timer.
    """

    __slots__ = ("idle", "last", "sweeper", "waiters")

    def __init__(self, idle_timeout: float, sweeper: _IdleSweeper | None = None) -> None:
        self.idle = idle_timeout
        self.last = time.monotonic()
        self.sweeper = sweeper
        self.waiters: list[asyncio.Future[None]] = []
        if sweeper is not None:
            sweeper.add(self)

    def release(self) -> None:
        if self.sweeper is not None:
            self.sweeper.discard(self)
            self.sweeper = None

    def expire(self) -> None:
        """The idle timeout ran out: every current wait raises TimeoutError."""
        for future in self.waiters:
            if not future.done():
                future.set_exception(TimeoutError())

    async def _wait(self, fd: int, *, write: bool) -> None:
        """Until `fd` is ready; TimeoutError once neither direction moved for the idle timeout."""
        loop = asyncio.get_running_loop()
        if self.sweeper is not None:
            future: asyncio.Future[None] = loop.create_future()
            waiters = self.waiters
            waiters.append(future)
            if write:
                loop.add_writer(fd, _set_ready, future)
            else:
                loop.add_reader(fd, _set_ready, future)
            try:
                await future
            finally:
                waiters.remove(future)
                if write:
                    loop.remove_writer(fd)
                else:
                    loop.remove_reader(fd)
            return
        while True:
            future = loop.create_future()
            if write:
                loop.add_writer(fd, _set_ready, future)
            else:
                loop.add_reader(fd, _set_ready, future)
            try:
                await asyncio.wait_for(future, self.idle)
                return
            except TimeoutError:
                if time.monotonic() - self.last >= self.idle:
                    raise
            finally:
                if write:
                    loop.remove_writer(fd)
                else:
                    loop.remove_reader(fd)

    async def recv(self, sock: socket.socket) -> bytes:
        while True:
            try:
                data = sock.recv(RELAY_CHUNK)
            except (BlockingIOError, InterruptedError):
                await self._wait(sock.fileno(), write=False)
                continue
            self.last = time.monotonic()
            return data

    async def send(self, sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = sock.send(view)
                except (BlockingIOError, InterruptedError):
                    await self._wait(sock.fileno(), write=True)
                    continue
                view = view[sent:]
                self.last = time.monotonic()
        finally:
            view.release()  # a bytearray cannot be resized while exported

    async def pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        count: Callable[[int], None],
        bucket: SharedBucket | None,
        on_eof: Callable[[], None],
        splice: bool,
    ) -> None:
        if not splice:
            while True:
                data = await self.recv(src)
                if not data:
                    on_eof()
                    return
                if bucket is not None:
                    await bucket.consume(len(data))
                await self.send(dst, data)
                count(len(data))
        sfd, dfd = src.fileno(), dst.fileno()
        # The pipe is made once data flows, so an idle connection holds no pipe (memory and descriptors).
        await self._wait(sfd, write=False)
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Grown to PIPE_SIZE (fewer wake-ups) only once the flow has moved 64 KiB: small flows skip the resize.
        moved = 0
        try:
            while True:
                try:
                    n = os.splice(sfd, write_end, PIPE_SIZE, flags=_SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    await self._wait(sfd, write=False)
                    continue
                if n == 0:
                    on_eof()
                    return
                self.last = time.monotonic()
                if moved < DEFAULT_PIPE_SIZE:
                    moved += n
                    if moved >= DEFAULT_PIPE_SIZE:
                        with contextlib.suppress(OSError):  # the default size works too
                            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
                if bucket is not None:
                    await bucket.consume(n)
                left = n
                while left:
                    try:
                        left -= os.splice(read_end, dfd, left, flags=_SPLICE_FLAGS)
                    except (BlockingIOError, InterruptedError):
                        await self._wait(dfd, write=True)
                        continue
                    self.last = time.monotonic()
                count(n)
        finally:
            os.close(read_end)
            os.close(write_end)


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
    pipe = _Pipe(DRAIN_AFTER_DENIAL)
    try:
        await pipe.send(sock, payload)
        _shutdown_write(sock)
        deadline = time.monotonic() + DRAIN_AFTER_DENIAL
        drained = 0
        while drained < DRAIN_MAX_BYTES and time.monotonic() < deadline:
            chunk = await asyncio.wait_for(pipe.recv(sock), max(0.0, deadline - time.monotonic()))
            if not chunk:
                break
            drained += len(chunk)
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()


def _failure(tasks: set[asyncio.Task[None]]) -> BaseException | None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            return task.exception()
    return None


def _bad_gateway(reason: str) -> bytes:
    body = f"Upstream unreachable: {sanitize_reason(reason)}\n".encode("ascii")
    return (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(body)
        + body
    )


# --------------------------------------------------------------------------- wiring for `gateway run --data-plane`

LOCAL_ADDRESS_REFRESH = 30.0
STEERING_POLL = 1.0


class DataPlane:
    """The resolver, destination checks, learned addresses and the engine, around one policy store.

    With `steer`, also the nftables table and the fwmark policy routing in this network
    namespace, re-applied when the store's set of sandbox addresses changes. Host routes and
    proxy ARP for each sandbox's interface are the attach tooling's job (the store does not
    know interfaces). The table outlives the process on purpose: if the gateway dies,
    TPROXYed traffic finds no listener and is dropped, never forwarded.
    """

    def __init__(self, config: Config, store: PolicyStore, flowlog: FlowLog, *, steer: bool = False) -> None:
        self.config = config
        self.store = store
        self.steer = steer
        self.engine: EgressEngine | None = None
        self.destinations: Destinations | None = None
        self.flowlog = flowlog
        #: Shared with the DNS interceptor: its answers are what opaque TCP may reach.
        self.learned = LearnedDestinations()
        # Built now (no sockets yet) so the control API can serve its query log; it has its own rate
        # limiter: DNS queries and connections are separate budgets.
        self.dns = DnsInterceptor(
            DnsConfig.from_config(config), lambda: store.state, learned=self.learned, flowlog=flowlog
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._attached: frozenset[Any] | None = None

    async def start(self) -> None:
        _raise_fd_limit()
        egress = self.config.egress
        local = await asyncio.to_thread(read_local_addresses)
        self.destinations = Destinations(
            egress.public_ranges, egress.gateway_addresses, egress.blocklist_path, local_addresses=local
        )
        self.engine = EgressEngine(
            lambda: self.store.state,
            self.config,
            Resolver(self.config.resolver),
            self.destinations,
            self.learned,
            flowlog=self.flowlog,
            connection_limiter=ConnectionRateLimiter(),
            bandwidth=BandwidthLimiter(),
        )
        if self.steer:
            await self.apply_steering()
        await self.dns.start_transparent()
        await self.engine.start()
        self._tasks.append(asyncio.create_task(self._refresh_local_addresses()))
        if self.steer:
            self._tasks.append(asyncio.create_task(self._follow_store()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.engine is not None:
            await self.engine.close()
        await self.dns.close()

    def _wanted(self) -> frozenset[Any]:
        return frozenset(a for sandbox in self.store.state.sandboxes.values() for a in sandbox.addresses)

    async def apply_steering(self) -> None:
        from gateway import netplumb
        from gateway.nft import SteeringConfig, render_ruleset

        egress = self.config.egress
        subnets = self.config.sandbox_subnets
        attached = self._wanted()
        steering = SteeringConfig(
            sandbox_subnets=subnets,
            sandbox_interfaces=egress.sandbox_interfaces,
            attached=attached,
            gateway_addresses=frozenset(
                a for a in egress.gateway_addresses if not any(a.version == n.version and a in n for n in subnets)
            ),
            egress_port=egress.listen_port,
            dns_port=egress.dns_port,
            fwmark=egress.fwmark,
            route_table=egress.route_table,
            dial_mark=egress.dial_mark,
        )
        await asyncio.to_thread(netplumb.ensure_routing_for, steering.policy_routing)
        await asyncio.to_thread(netplumb.apply_ruleset, render_ruleset(steering))
        self._attached = attached
        log.info("steering.applied", attached=len(attached))

    async def _follow_store(self) -> None:
        while True:
            await asyncio.sleep(STEERING_POLL)
            if self._wanted() != self._attached:
                try:
                    await self.apply_steering()
                except Exception:  # keep the last good table; try again on the next change
                    log.exception("steering.apply_failed")
                    self._attached = self._wanted()

    async def _refresh_local_addresses(self) -> None:
        while True:
            await asyncio.sleep(LOCAL_ADDRESS_REFRESH)
            try:
                addresses = await asyncio.to_thread(read_local_addresses)
            except Exception:
                log.exception("egress.local_addresses_failed")
                continue
            if self.destinations is not None:
                self.destinations.set_local_addresses(addresses)


def _raise_fd_limit() -> None:
    """Each relayed connection holds two sockets and, while data flows, two pipes: lift the soft
    descriptor limit to the hard one (the default soft limit of 1024 caps a gateway at ~250 flows)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
