"""`EgressEngine`: the steps of the egress pipeline, in order, for every accepted connection.

1. Accept (`listener`; the kernel holds a connection until its first bytes arrive, for up to a second,
   which the peek deadline counts). Identify the sandbox by source address in the *current* policy state
   (looked up at accept time, so a policy change applies to the next connection). Unknown: RST.
   Denials that depend on nothing the peek could reveal (SMTP ports, isolated, internet off) are
   given at once: a server-speaks-first client would otherwise wait out the whole peek deadline.
2. Cap connections in the peek phase (per sandbox and in total) and apply the connections-per-minute
   limit (waits up to `rate_limit_max_wait`, then refuses).
3. Peek under a deadline and a size bound without forwarding anything (`session`).
4. Plan (`plan`): decide on the name and the addresses, check every address against `Destinations`.
5. Deny explicitly (`deny`) or dial (`dial`) and relay both ways (`relay`) with backpressure,
   half-close, an idle timeout, bandwidth buckets and byte counts; plain HTTP and clients that said
   nothing are watched by a `guard`.
6. One decision record per connection, allowed or denied (`record`).

Sockets are driven directly on the event loop (add_reader/add_writer), not through asyncio streams:
splice needs the raw descriptors. The deciding steps run in one task per connection; once relayed, a
connection is only loop callbacks, so an idle one costs two sockets and a few small objects: no task,
no buffers, no pipes.

The engine receives its own config section (`EgressConfig`) and its collaborators (the policy state
getter, destination checks, resolver, limiters, flow log, DNS-learned addresses); it builds none of them.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.decision import PORT_OR_PROFILE_RULES, CompiledPolicy, decide
from gateway.destinations import BLOCKLIST_CHECK_INTERVAL, Destinations
from gateway.engine.config import EgressConfig
from gateway.engine.deny import bad_gateway, deny_with, reset
from gateway.engine.dial import dial
from gateway.engine.guard import FirstWordsGuard, HttpGuard
from gateway.engine.handover import HandoverFailed, TierRoute, hand_over
from gateway.engine.listener import DEFER_ACCEPT, Listeners
from gateway.engine.plan import Plan, plan_named, plan_unnamed, replan
from gateway.engine.record import Flow, FlowRecorder
from gateway.engine.relay import CAN_SPLICE, Guard, GuardStop, IdleSweeper, Relay
from gateway.engine.session import (
    READ_CHUNK,
    Closed,
    HttpRequest,
    Opaque,
    Peeked,
    Peeker,
    PeekFailed,
    TlsHello,
    peek,
)
from gateway.flowlog import FlowLog
from gateway.inspection import InspectionContext
from gateway.learned import LearnedDestinations
from gateway.peek.classify import TrafficKind
from gateway.peek.http1 import http_forbidden
from gateway.peek.tls import AlertDescription, tls_alert
from gateway.ratelimit import CONNECTION_RATE_REASON, BandwidthLimiter, ConnectionRateLimiter
from gateway.resolver import Resolver
from gateway.rules import Rule
from gateway.state import PolicyState

log = structlog.get_logger("gateway.egress")

#: How long a keep-alive connection cut at a refused request waits for the upstream to finish earlier responses.
HTTP_CUT_GRACE = 5.0
POLICY_CUT_PREFIX = "cut when the sandbox's policy changed"
ECH_REFUSED_REASON = (
    "Encrypted Client Hello hides the real destination behind its outer name; no egress.allow_ech entry opts it in"
)


class PolicyCut(Exception):
    """Why a relayed connection was ended: its sandbox's new policy no longer allows it (see `policy_changed`)."""

    def __init__(self, reason: str, rule: str) -> None:
        super().__init__(reason)
        self.reason, self.rule = reason, rule


@dataclass(slots=True)
class _Relayed:
    """What a policy change decides a relayed connection on again."""

    flow: Flow
    plan: Plan
    guard: Guard | None


class EgressEngine:
    def __init__(
        self,
        egress: EgressConfig,
        state_provider: Callable[[], PolicyState],
        resolver: Resolver,
        destinations: Destinations,
        learned: LearnedDestinations | None = None,
        *,
        flowlog: FlowLog | None = None,
        connection_limiter: ConnectionRateLimiter | None = None,
        bandwidth: BandwidthLimiter | None = None,
        tier: TierRoute | None = None,
        host: tuple[str, str] = ("0.0.0.0", "::"),
        splice: bool = True,
    ) -> None:
        self.egress = egress
        self.state_provider = state_provider
        self.resolver = resolver
        self.destinations = destinations
        self.learned = learned
        self.recorder = FlowRecorder(flowlog)
        self.connection_limiter = connection_limiter
        self.bandwidth = bandwidth
        #: The inspection tier, for connections an `egress.inspect` entry marks (None: they are refused).
        self.tier = tier
        self.host = host
        #: Relay TLS and opaque bytes with os.splice (kernel pipes, no copy through Python) where available.
        self.splice = splice and CAN_SPLICE
        self._listeners = Listeners(self._accepted)
        self._connections: set[asyncio.Task[None]] = set()
        #: Relayed connections per sandbox, for the live cut.
        self._relayed_by_sandbox: dict[str, dict[Relay, _Relayed]] = {}
        self._peeking: dict[str, int] = {}
        self._peeking_total = 0
        self._sweeper: IdleSweeper | None = None
        self._blocklist_task: asyncio.Task[None] | None = None
        #: Set by `stop_accepting`: new connections are reset at once, open ones go on.
        self.draining = False
        self._drained = asyncio.Event()
        self.stats = {"accepted": 0, "allowed": 0, "denied": 0, "refused_draining": 0}

    @property
    def listeners(self) -> list[socket.socket]:
        return self._listeners.sockets

    @property
    def relaying(self) -> int:
        """Connections being relayed now (allowed, dialled, not ended)."""
        return 0 if self._sweeper is None else len(self._sweeper.relays)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the IPv4 and IPv6 transparent listeners (needs CAP_NET_ADMIN)."""
        self._listeners.open(self.host, self.egress.listen_port, self._defers(self.egress))
        if self.destinations.blocklist_path is not None:
            self._blocklist_task = asyncio.create_task(self._follow_blocklist())
        log.info("egress.listening", port=self.egress.listen_port, splice=self.splice)

    def reconfigure(self, egress: EgressConfig) -> None:
        """The `[egress]` section a reload made (only its live options differ): each new connection is peeked, capped,
        limited and dialled under it; open connections keep going and are held to the new idle timeout."""
        self.egress = egress
        self._listeners.defer(self._defers(egress))
        if self._sweeper is not None:
            self._sweeper.retime(egress.idle_timeout)

    @staticmethod
    def _defers(egress: EgressConfig) -> bool:
        """Whether the listeners have the kernel hold a silent connection (`listener.DEFER_ACCEPT`): only when the
        peek deadline leaves room for it, so that a shorter one (for server-speaks-first protocols) stays as short."""
        return egress.peek_timeout >= DEFER_ACCEPT

    async def _follow_blocklist(self) -> None:
        """The operator blocklist is reloaded here, on a schedule, so that the per-connection check never stats it."""
        while True:
            await asyncio.sleep(BLOCKLIST_CHECK_INTERVAL)
            try:
                self.destinations.reload_blocklist()
            except Exception:  # keep the last good list; look again next time
                log.exception("egress.blocklist_reload_failed")

    async def close(self) -> None:
        self._listeners.close()
        if self._blocklist_task is not None:
            self._blocklist_task.cancel()
            await asyncio.gather(self._blocklist_task, return_exceptions=True)
            self._blocklist_task = None
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

    def open_flows(self) -> int:
        """Connections being decided or relayed now (a relayed one holds no task: the sweeper knows it)."""
        return len(self._connections) + self.relaying

    def stop_accepting(self) -> int:
        """Start draining: from now on a new connection is reset at once (the listeners stay open, so a sandbox
        is told at once instead of its SYN finding no listener and timing out). Returns the open flows."""
        self.draining = True
        self._check_drained()
        return self.open_flows()

    async def drained(self) -> None:
        """Returns once draining and no connection is open any more."""
        await self._drained.wait()

    def _check_drained(self) -> None:
        if self.draining and not self.open_flows():
            self._drained.set()

    def _accepted(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        if self.draining:
            self.stats["refused_draining"] += 1
            reset(conn)
            return
        self._track(asyncio.create_task(self._handle(conn, peer, time.perf_counter())))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._connections.add(task)
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        self._check_drained()

    # ------------------------------------------------------------------ per connection

    async def _handle(self, conn: socket.socket, peer: tuple[Any, ...], accepted: float) -> None:
        relayed = False
        try:
            relayed = await self._connection(conn, peer, accepted)
        except Exception:
            log.exception("egress.error")
            reset(conn)
        finally:
            if not relayed:  # once relayed, the relay's end closes it
                conn.close()

    async def _connection(self, conn: socket.socket, peer: tuple[Any, ...], accepted: float) -> bool:
        """Decide one accepted connection (`peer`: its source address; `accepted`: its perf_counter time, for the
        decision latency); True when it was handed to a relay (which then owns the socket)."""
        self.stats["accepted"] += 1
        try:
            local = conn.getsockname()
        except OSError:
            return False  # already gone
        flow = Flow(time.time_ns() // 1000, "", peer[0], peer[1], local[0], local[1], accepted=accepted)
        policy = self.state_provider().policy_for_address(flow.src_addr)
        if policy is None:
            self._deny(flow, "unknown sandbox (source address not attached to any sandbox)", Rule.UNKNOWN_SOURCE)
            reset(conn)
            return False
        flow.sandbox = sandbox = policy.sandbox_id
        flow.policy = policy
        flow.revision = policy.revision
        # Denials that depend on nothing the peek could reveal (SMTP ports, isolated, internet off) are given
        # at once: a server-speaks-first client would otherwise wait out the whole peek deadline first.
        early = decide(policy, None, None, flow.orig_dst_port, "tcp")
        if not early.allowed and early.rule in PORT_OR_PROFILE_RULES:
            self._deny(flow, early.reason, early.label)
            reset(conn)
            return False
        egress = self.egress
        peeker = Peeker(egress.peek_max_bytes)
        try:  # the ClientHello or request head is usually here already: then nothing waits for first bytes
            ready = conn.recv(min(READ_CHUNK, peeker.want))
        except (BlockingIOError, InterruptedError):
            ready = None
        except OSError:  # reset before its first byte: as if closed, nothing to decide or record
            ready = b""
        peeked = None if ready is None else peeker.feed(ready)
        waiting = peeked is None  # only connections that must wait for their first bytes count against the caps
        if waiting and (
            self._peeking_total >= egress.max_peeking_total
            or self._peeking.get(sandbox, 0) >= egress.max_peeking_per_sandbox
        ):
            self._deny(flow, "too many connections waiting for their first bytes", Rule.PEEK_CAP)
            reset(conn)
            return False
        if waiting:
            self._peeking_total += 1
            self._peeking[sandbox] = self._peeking.get(sandbox, 0) + 1
        try:
            if self.connection_limiter is not None and not await self.connection_limiter.admit(
                sandbox, policy.limits.connections_per_minute, egress.rate_limit_max_wait
            ):
                self._deny(flow, CONNECTION_RATE_REASON, Rule.CONNECTION_RATE)
                reset(conn)
                return False
            if peeked is None:
                loop = asyncio.get_running_loop()
                # Accepted with nothing to read yet: the kernel held it for the listeners' deferral already, which
                # the peek deadline counts (it runs from the handshake).
                peeked = await peek(
                    lambda n: loop.sock_recv(conn, n),
                    egress.peek_timeout,
                    egress.peek_max_bytes,
                    peeker,
                    waited=self._listeners.deferral,
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

    async def _after_peek(self, conn: socket.socket, flow: Flow, policy: CompiledPolicy, peeked: Peeked) -> bool:
        orig, port = flow.orig_dst_addr, flow.orig_dst_port
        match peeked:
            case TlsHello(data=data, hello=hello):
                flow.protocol = "tls"
                flow.hostname = hello.sni
                if hello.has_ech and not policy.ech_accepted(hello.sni):
                    self._deny(flow, ECH_REFUSED_REASON, Rule.ECH)
                    await deny_with(conn, tls_alert(AlertDescription.ACCESS_DENIED, hello.record_version))
                    return False
                if hello.sni:
                    plan = await plan_named(policy, hello.sni, orig, port, "tls", self.destinations, self.resolver)
                else:
                    plan = self._unnamed(flow, policy, "tls")
                if not plan.allowed:
                    self._deny(flow, plan.reason, plan.label)
                    alert = AlertDescription.UNRECOGNIZED_NAME if plan.unresolvable else AlertDescription.ACCESS_DENIED
                    await deny_with(conn, tls_alert(alert, hello.record_version))
                    return False
                return await self._relay(conn, flow, policy, plan, data, None)
            case HttpRequest(data=data, head=head, tracker=tracker, later=later):
                flow.protocol = "http"
                flow.hostname = head.host
                if head.host and not head.host_is_ip:
                    plan = await plan_named(policy, head.host, orig, port, "http", self.destinations, self.resolver)
                else:
                    plan = self._unnamed(flow, policy, "http")
                if not plan.allowed:
                    self._deny(flow, plan.reason, plan.label)
                    await deny_with(conn, http_forbidden(plan.reason, plan.label, flow.message, flow.denial_id))
                    return False
                guard = HttpGuard(policy, tracker, head.host, port)
                # Requests pipelined behind the first one, read while peeking, are checked like later chunks.
                first_stop = guard.check(later, 0) if later else None
                return await self._relay(conn, flow, policy, plan, data, guard, first_stop)
            case Opaque(data=data):
                plan = self._unnamed(flow, policy, "tcp")
                if not plan.allowed:
                    self._deny(flow, plan.reason, plan.label)
                    reset(conn)
                    return False
                # Said nothing (the server speaks first): what the client says first is looked at still.
                silent = None if data else FirstWordsGuard(self.egress.peek_timeout)
                return await self._relay(conn, flow, policy, plan, data, silent)
            case PeekFailed(kind=TrafficKind.TLS, reason=reason):
                flow.protocol = "tls"
                self._deny(flow, reason, Rule.TLS)
                await deny_with(conn, tls_alert(AlertDescription.DECODE_ERROR))
                return False
            case PeekFailed(kind=TrafficKind.HTTP, reason=reason):
                flow.protocol = "http"
                self._deny(flow, reason, Rule.HTTP)
                await deny_with(conn, http_forbidden(reason, Rule.HTTP, flow.message, flow.denial_id))
                return False
            case PeekFailed(reason=reason):
                self._deny(flow, reason, Rule.PEEK)
                reset(conn)
                return False
            case Closed():
                return False  # connected and closed without a byte: nothing to decide, nothing to record

    def _unnamed(self, flow: Flow, policy: CompiledPolicy, protocol: str) -> Plan:
        """The plan of a connection without a usable name; its record names the name a DNS-learned address was
        decided on, if any."""
        plan = plan_unnamed(policy, flow.orig_dst_addr, flow.orig_dst_port, protocol, self.destinations, self.learned)
        flow.learned_name = plan.learned
        return plan

    # ------------------------------------------------------------------ dial + relay

    async def _relay(
        self,
        conn: socket.socket,
        flow: Flow,
        policy: CompiledPolicy,
        plan: Plan,
        first: bytes | bytearray,
        guard: Guard | None,
        first_stop: GuardStop | None = None,
    ) -> bool:
        """Dial and hand both sockets to a `Relay`; True when it owns the client socket from now on."""
        assert plan.dial is not None
        flow.dst_addr, flow.dst_port = plan.dial, flow.orig_dst_port
        flow.allow(plan.reason, plan.label, plan.would_deny)
        self.recorder.decided(flow)
        egress = self.egress
        try:
            # A would-deny INSPECT plan is a port no inspect entry marks: relayed as it is, not inspected.
            if (
                plan.rule is Rule.INSPECT
                and not plan.would_deny
                and not (self.tier is not None and self.tier.excluded(flow.hostname or ""))
            ):
                upstream = await self._hand_over(flow, policy, plan)
                guard = first_stop = None  # the tier decides every request on it
            else:
                upstream = await self._dial(plan.dial, flow.orig_dst_port)
        except HandoverFailed as exc:
            self._deny(flow, f"{flow.hostname} is inspected and {exc}", Rule.INSPECTION_DOWN)
            if flow.protocol == "http":
                await deny_with(conn, bad_gateway(flow.reason))
            else:
                await deny_with(conn, tls_alert(AlertDescription.INTERNAL_ERROR))
            return False
        except (OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            self._deny(flow, f"upstream {plan.dial} unreachable: {why}", Rule.DIAL_FAILED)
            if isinstance(guard, HttpGuard):
                await deny_with(conn, bad_gateway(flow.reason))
            else:
                reset(conn)
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
            sweeper = self._sweeper = IdleSweeper(loop, egress.idle_timeout)
        relay = Relay(
            conn,
            upstream,
            functools.partial(self._relayed, conn, flow),
            sweeper=sweeper,
            first=first,
            first_stop=first_stop,
            guard=guard,
            up_bucket=up_bucket,
            down_bucket=down_bucket,
            splice=self.splice,
            cut_grace=HTTP_CUT_GRACE,
        )
        if not relay.done:  # (its first bytes can end it at once)
            self._relayed_by_sandbox.setdefault(flow.sandbox, {})[relay] = _Relayed(flow, plan, guard)
        return True

    async def _dial(self, address: str, port: int) -> socket.socket:
        """The upstream connect (`dial`), its time observed by outcome. The socket comes with its poll registration
        parked for the relay, which `_relay` builds before it yields to the loop."""
        egress = self.egress
        started = time.perf_counter()
        try:
            upstream = await dial(address, port, egress.dial_mark, egress.connect_timeout, park=True)
        except (OSError, TimeoutError):
            self.recorder.dialled(False, time.perf_counter() - started)
            raise
        self.recorder.dialled(True, time.perf_counter() - started)
        return upstream

    async def _hand_over(self, flow: Flow, policy: CompiledPolicy, plan: Plan) -> socket.socket:
        """The connection goes to the inspection tier, with who asked for what, to dial plan.dial itself."""
        rule = policy.inspect_rule(plan.detail)
        if self.tier is None or rule is None or not flow.hostname:
            raise HandoverFailed("no inspection tier runs here")
        assert plan.dial is not None
        context = InspectionContext(
            flow.sandbox,
            flow.hostname,
            flow.orig_dst_port,
            plan.detail,
            rule,
            src_addr=flow.src_addr,
            src_port=flow.src_port,
            orig_dst_addr=flow.orig_dst_addr,
            orig_dst_port=flow.orig_dst_port,
            revision=policy.revision,  # `rule` is this policy's: what the tier decides the requests with
        )
        upstream = await hand_over(self.tier, plan.dial, flow.orig_dst_port, context, self.egress.connect_timeout)
        flow.reason += "; handed to the inspection tier"
        return upstream

    def _relayed(self, conn: socket.socket, flow: Flow, relay: Relay) -> None:
        """The relay ended: close (or reset) the client, deliver a cut's denial, record the flow."""
        flow.bytes_up, flow.bytes_down = relay.bytes_up, relay.bytes_down
        relayed = self._relayed_by_sandbox.get(flow.sandbox)
        if relayed is not None and relayed.pop(relay, None) is not None and not relayed:
            del self._relayed_by_sandbox[flow.sandbox]
        if isinstance(relay.error, PolicyCut):
            flow.deny(f"{POLICY_CUT_PREFIX}: {relay.error.reason}", relay.error.rule)
            reset(conn)
        elif relay.error is not None:
            if isinstance(relay.error, TimeoutError):
                flow.reason += f"; closed after {self.egress.idle_timeout}s idle"
            reset(conn)
        elif relay.cut is not None:
            reason, rule = relay.cut
            flow.deny(reason, rule)
            forbidden = http_forbidden(reason, rule, flow.message, flow.denial_id)
            self._track(asyncio.get_running_loop().create_task(deny_with(conn, forbidden)))
        elif relay.closed_early:
            flow.reason += "; ended at the server's answers (Expect): the client's later bytes were not forwarded"
            # Nothing to add to the server's answer; draining first keeps the close from resetting it away.
            self._track(asyncio.get_running_loop().create_task(deny_with(conn, b"")))
        else:
            conn.close()
        self.recorder.record(flow)
        self._check_drained()

    def policy_changed(self, sandbox_id: str) -> int:
        """The sandbox's policy changed or it was removed: end (RST both ways) each of its relayed connections the
        policy in force now no longer allows, as a new connection with the same name and address would be refused;
        the others go on under it. Returns how many were ended."""
        relayed = self._relayed_by_sandbox.get(sandbox_id)
        if not relayed:
            return 0
        state = self.state_provider()
        cut = 0
        for relay, entry in list(relayed.items()):
            flow = entry.flow
            policy = state.policy_for_address(flow.src_addr)
            if policy is None or policy.sandbox_id != sandbox_id:
                gone = f"{flow.src_addr} is no longer an address of sandbox {sandbox_id}"
                refusal = PolicyCut(gone, Rule.UNKNOWN_SOURCE)
            else:
                plan = replan(
                    policy, entry.plan.name, flow.dst_addr, flow.orig_dst_port, flow.protocol, self.destinations,
                    self.learned,
                )  # fmt: skip
                if plan.allowed:
                    if isinstance(entry.guard, HttpGuard):
                        entry.guard.policy = policy  # its later requests are decided on the policy in force
                    continue
                refusal = PolicyCut(plan.reason, plan.label)
                flow.revision = policy.revision  # the revision that ended it decided its record
            relay.finish(refusal)
            cut += 1
        if cut:
            log.info("egress.policy_cut", sandbox=sandbox_id, flows=cut)
        return cut

    def _deny(self, flow: Flow, reason: str, rule: str) -> None:
        # Allowed before: that verdict was timed in _relay, and this is its dial or hand-over failing.
        timed = flow.allowed
        flow.deny(reason, rule)
        if not timed:
            self.recorder.decided(flow)
        self.stats["denied"] += 1
        self.recorder.record(flow)
