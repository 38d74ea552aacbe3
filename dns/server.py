"""The DNS interceptor's asyncio shell: UDP and TCP listeners around the pure core (policy.py, cache.py).

Two ways to listen, same handling:

- **transparent** (the data plane): `IP_TRANSPARENT` / `IPV6_TRANSPARENT` sockets on `dns_port`, fed by
  the nft TPROXY rule for UDP/TCP 53 whatever address the sandbox sent to. UDP learns the original
  destination from the `IP_ORIGDSTADDR` control message and answers from it (a transparent socket bound
  to that address and port with SO_REUSEADDR), so the sandbox sees the answer come from the resolver it
  asked; TCP gets it as the accepted socket's local address, and answers on that socket.
- **plain**: an ordinary bind to one address (tests on loopback, or a fallback without TPROXY).

Per query (`DnsInterceptor.handle`): the sandbox is the owner of the source address in the live
`PolicyState` (`state_provider()`); unknown sources are REFUSED. The pure `decide` says drop, answer or
forward; the sandbox's `dns_queries_per_minute` is enforced (wait up to `rate_limit_max_wait`, then
REFUSED); forwarded queries are answered from the sandbox's cache or, when a name a wildcard allowed fits
the sandbox's name budget (`gateway.dns.budget`: REFUSED otherwise, never kept for `_answer_again`), sent
to the upstreams with `gateway.resolver.exchange` (random id on the wire, UDP with TCP fallback, source
checks), concurrent identical queries of one sandbox sharing one upstream exchange. Addresses of allowed
A/AAAA answers go to `LearnedDestinations`; every query goes to the sandbox's query-log ring and, when a
FlowLog is given, to the flow log (protocol "dns"). A bad packet can cost its own answer, never the
server: each packet is handled in its own task under a catch-all, bounded in number.

The common UDP cases, a name the sandbox asked before (a cached answer) and a denied name asked again,
take a shorter way (`_answer_again`): the sandbox's cache keeps the response last sent to that very
packet (`cache.Ready`, keyed by `policy.query_key`), so the query is answered by copying its id and
question into it, with no parsing, policy walk or rendering. Everything around the answer is the same as
on the slow way: the rate limit, the counts, the query log, the flow record, the DNS-learned addresses
refreshed. It holds only while the policy object (the cache is flushed when it changes) and the malware
list's generation are the ones it was decided under. Query-log entries are kept as tuples and turned into
`gateway.querylog.DnsQuery` records only when read.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog
from dnslib import RCODE

from gateway.dns.answer import (
    ANSWER,
    DROP,
    Answer,
    Decision,
    Outcome,
    accept_upstream,
    decide_packet,
    denial_text,
    failure_answer,
)
from gateway.dns.blocklist import DomainBlocklist
from gateway.dns.budget import NameBudgets
from gateway.dns.cache import CacheEntry, DnsCache, Ready
from gateway.dns.config import DnsConfig
from gateway.dns.wire import (
    EDE_BLOCKED,
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_OTHER,
    NXDOMAIN,
    REFUSED,
    Code,
    Query,
    parse_query,
    query_key,
    render,
    splice,
    synthetic,
    upstream_packet,
)
from gateway.flowlog import FlowLog, FlowRecord, flow_verdict, new_denial_id
from gateway.querylog import DnsQuery
from gateway.ratelimit import ConnectionRateLimiter, TokenBucket
from gateway.readiness import rearm_reader
from gateway.resolver import ResolveError, Upstream, exchange, parse_upstream, system_upstreams
from gateway.rules import Rule

if TYPE_CHECKING:
    from gateway.decision import CompiledPolicy
    from gateway.learned import LearnedDestinations
    from gateway.state import PolicyState

__all__ = ["DnsInterceptor"]

log = structlog.get_logger("gateway.dns")

IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR = 20, 74
RATE_LIMIT_REASON: Final = "dns query rate limit"
RATE_LIMIT_RULE: Final = Rule.DNS_QUERY_RATE.label()
#: `queries` code of packets whose handling raised (a bug: each is answered with nothing and logged at debug).
INTERNAL_ERROR: Final = "INTERNAL_ERROR"
#: Datagrams read per wake-up of the UDP reader before yielding to the loop (fairness with TCP and tasks).
UDP_BATCH: Final = 64
#: Receive buffer per datagram: a query is at most a few hundred bytes (4096 is the largest EDNS size in use);
#: anything longer arrives cut and is answered FORMERR. Not 65535: that would be allocated for every packet.
UDP_BUFFER: Final = 4096
#: Transparent reply sockets kept open, one per original destination (resolver address) a sandbox asked.
MAX_REPLY_SOCKETS: Final = 256
TCP_MAX_MESSAGE: Final = 65535
MAX_LOGGED_SANDBOXES: Final = 100_000
DEBUG_LOG_BURST: Final = 20  # malformed-packet debug lines per DEBUG_LOG_WINDOW seconds at most
DEBUG_LOG_WINDOW: Final = 10.0


#: A query-log entry as kept: (start, wall clock in µs; client address; transport; latency in seconds; outcome).
#: A tuple because one is made per query; `_log_dict` gives it its documented shape when the log is read.
LogEntry = tuple[int, tuple[Any, ...], str, float, Outcome]


class _CappedDebug:
    """At most `burst` debug lines per `window` seconds: a flood of garbage must not become a flood of logs."""

    def __init__(self, burst: int = DEBUG_LOG_BURST, window: float = DEBUG_LOG_WINDOW) -> None:
        self.burst, self.window = burst, window
        self._start, self._count, self.suppressed = 0.0, 0, 0

    def __call__(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._start >= self.window:
            if self.suppressed:
                log.debug("dns.debug_suppressed", count=self.suppressed)
            self._start, self._count, self.suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            log.debug(event, **fields)
        else:
            self.suppressed += 1


def _rcode_name(rcode: int) -> str:
    if rcode < 0:
        return "DROPPED"
    if rcode == 16:
        return "BADVERS"
    return str(RCODE.get(rcode, rcode))


def _log_dict(sandbox_id: str, entry: LogEntry) -> dict[str, Any]:
    start_us, client, transport, latency, outcome = entry
    return DnsQuery(
        time=start_us / 1e6,
        sandbox=sandbox_id,
        client=f"[{client[0]}]:{client[1]}" if ":" in str(client[0]) else f"{client[0]}:{client[1]}",
        transport=transport,
        name=outcome.name,
        type=outcome.type,
        rcode=_rcode_name(outcome.rcode),
        answers=list(outcome.answers),
        latency_ms=round(latency * 1000, 3),
        allowed=outcome.allowed,
        code=str(outcome.code),
        reason=outcome.reason,
        rule=outcome.rule,
        cached=outcome.cached,
        would_deny=outcome.would_deny,
        denial_id=outcome.denial_id or None,
    ).to_dict()


def _refused(query: Query, code: Code, reason: str, rule: str, ede_code: int) -> tuple[bytes, Outcome]:
    """REFUSED with the reason (EDE, with the denial's id) for a query over one of its sandbox's limits, and its
    log outcome (a limit holds in report mode too: the query is denied, not `would_deny`)."""
    denial_id = new_denial_id()
    response = render(synthetic(query, REFUSED), (), 0, query, ede=(ede_code, denial_text(reason, "", denial_id)))
    outcome = Outcome(query.name, query.type_name, REFUSED, (), False, code, reason, rule, False)
    return response, outcome._replace(denial_id=denial_id)


def _rate_limited(query: Query) -> tuple[bytes, Outcome]:
    """The answer to a query over its sandbox's rate limit."""
    return _refused(query, Code.REFUSED_RATE_LIMIT, RATE_LIMIT_REASON, RATE_LIMIT_RULE, EDE_OTHER)


@dataclass(slots=True)
class Pending:
    """One query on its way: what `handle_now` found out, for `complete` to finish."""

    started: float
    start_us: int
    data: bytes
    client: tuple[Any, ...]
    server: tuple[Any, ...]
    transport: str
    policy: CompiledPolicy | None = None
    sandbox_id: str = ""
    decision: Decision | None = None
    generation: int = 0  # of the malware list the decision was made under
    bucket: TokenBucket | None = None
    wait: float = 0.0


class DnsInterceptor:
    """The DNS interceptor: `start_plain` / `start_transparent`, then `close`. See the module doc."""

    def __init__(
        self,
        config: DnsConfig,
        state_provider: Callable[[], PolicyState | None],
        *,
        upstreams: Sequence[Upstream] | None = None,
        learned: LearnedDestinations | None = None,
        flowlog: FlowLog | None = None,
        limiter: ConnectionRateLimiter | None = None,
        cache: DnsCache | None = None,
        blocklist: DomainBlocklist | None = None,
        budgets: NameBudgets | None = None,
    ) -> None:
        self.config = config
        self.state_provider = state_provider
        if upstreams is None:
            upstreams = tuple(parse_upstream(u) for u in config.upstreams) or system_upstreams()
        self.upstreams = tuple(upstreams)
        self.learned = learned
        self.flowlog = flowlog
        # `is not None`, not `or`: an empty limiter or cache has a length of 0, so it is falsy.
        self.limiter = limiter if limiter is not None else ConnectionRateLimiter()
        self.cache = cache if cache is not None else DnsCache(config.cache_per_sandbox, config.cache_total)
        if blocklist is None and config.malware_blocklist is not None:
            blocklist = DomainBlocklist(config.malware_blocklist, config.blocklist_check_interval)
        self.blocklist = blocklist
        if budgets is None:
            budgets = NameBudgets(config.name_budget, config.nxdomain_budget, config.budget_window)
        self.budgets = budgets
        #: Every query once, when its fate is sealed: by (code, rcode of the answer or -1 when none was sent, allowed).
        #: The code stays beside the rcode: NXDOMAIN alone would not tell a policy block from a malware block,
        #: nor NOERROR a cached answer from a forwarded one.
        self.queries: Counter[tuple[str, int, bool]] = Counter()
        self.upstream_queries = 0  # exchanges sent upstream (tests, metrics)
        self._logs: OrderedDict[str, deque[LogEntry]] = OrderedDict()
        self._inflight: dict[tuple[str, int, str, int, bool], asyncio.Future[tuple[Answer, CacheEntry | None]]] = {}
        self._udp: list[_UdpListener] = []
        self._tcp_servers: list[asyncio.Server] = []
        self._tcp_count = 0
        self._tcp_by_source: Counter[str] = Counter()
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        self._debug = _CappedDebug()

    def reconfigure(self, config: DnsConfig) -> None:
        """The `[dns]` section a reload made (only its live options differ): each new query is decided, limited and
        budgeted under it. Cached answers and kept responses were made under the old one (a TTL, a label limit,
        require_ad): they go, and are asked for again."""
        if config == self.config:
            return
        self.config = config
        self.budgets.reconfigure(config.name_budget, config.nxdomain_budget, config.budget_window)
        self.cache.clear()

    # ------------------------------------------------------------------ listeners

    async def start_plain(self, host: str, port: int = 0) -> int:
        """Listen on `host` (UDP and TCP, the same port; 0 picks a free one). Returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        last: OSError | None = None
        for _ in range(20 if port == 0 else 1):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.bind((host, port))
                bound = udp.getsockname()[1]
                tcp = socket.socket(family, socket.SOCK_STREAM)
                try:
                    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    tcp.bind((host, bound))
                except OSError:
                    tcp.close()
                    raise
            except OSError as exc:
                udp.close()
                last = exc
                continue
            await self._serve(udp, tcp, transparent=False)
            return bound
        raise last or OSError("could not bind")

    @property
    def listening(self) -> bool:
        """Whether it serves queries (UDP and TCP) on some port."""
        return bool(self._udp) and bool(self._tcp_servers)

    async def start_transparent(
        self, port: int | None = None, families: Sequence[int] = (socket.AF_INET, socket.AF_INET6)
    ) -> None:
        """Listen on the TPROXY port (default `config.port`) for every address, IPv4 and IPv6."""
        port = self.config.port if port is None else port
        for family in families:
            udp = _transparent_socket(family, socket.SOCK_DGRAM)
            tcp = _transparent_socket(family, socket.SOCK_STREAM)
            try:
                if family == socket.AF_INET6:
                    udp.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
                else:
                    udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
                wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
                udp.bind((wildcard, port))
                tcp.bind((wildcard, port))
            except OSError:
                udp.close()
                tcp.close()
                raise
            await self._serve(udp, tcp, transparent=True)

    async def _serve(self, udp: socket.socket, tcp: socket.socket, *, transparent: bool) -> None:
        udp.setblocking(False)
        self._udp.append(_UdpListener(self, udp, transparent))
        tcp.listen(512)
        tcp.setblocking(False)
        self._tcp_servers.append(await asyncio.start_server(self._on_tcp, sock=tcp))

    async def close(self) -> None:
        for listener in self._udp:
            listener.close()
        self._udp.clear()
        for server in self._tcp_servers:
            server.close()
        for task in list(self._tcp_tasks):
            task.cancel()
        for server in self._tcp_servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._tcp_servers.clear()

    # ------------------------------------------------------------------ reads for the API

    def query_log(self, sandbox_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The sandbox's last `limit` queries, oldest first."""
        ring = self._logs.get(sandbox_id)
        if not ring or limit <= 0:
            return []
        return [_log_dict(sandbox_id, entry) for entry in list(ring)[-limit:]]

    def flush(self, sandbox_id: str) -> int:
        """Drop the sandbox's cached answers (its policy changed). Returns how many."""
        return self.cache.flush(sandbox_id)

    @property
    def counts(self) -> Counter[str]:
        """Queries by code."""
        out: Counter[str] = Counter()
        for (code, _, _), n in self.queries.items():
            out[str(code)] += n
        return out

    def query_counts(self) -> dict[tuple[str, str, str], int]:
        """Queries by (code, rcode name (DROPPED: no answer was sent), verdict), for metrics."""
        out: dict[tuple[str, str, str], int] = {}
        for (code, rcode, allowed), n in self.queries.items():
            key = (str(code), _rcode_name(rcode), "allow" if allowed else "deny")
            out[key] = out.get(key, 0) + n
        return out

    def _unanswered(self, code: str, allowed: bool = False) -> None:
        """Count a query that gets no answer and no record (dropped, shed, or its handling failed)."""
        self.queries[(code, -1, allowed)] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "cache_entries": len(self.cache),
            "ready_responses": self.cache.ready_size(),
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "upstream_queries": self.upstream_queries,
            "tcp_connections": self._tcp_count,
        }

    # ------------------------------------------------------------------ one query

    async def handle(
        self, data: bytes, client: tuple[Any, ...], server: tuple[Any, ...], transport: str
    ) -> bytes | None:
        """The answer to one query packet from `client` sent to `server` (the original destination), or None."""
        result = self.handle_now(data, client, server, transport)
        if isinstance(result, Pending):
            return await self.complete(result)
        return result

    def handle_now(
        self, data: bytes, client: tuple[Any, ...], server: tuple[Any, ...], transport: str
    ) -> bytes | Pending | None:
        """Everything that needs no waiting, synchronously: the answer (or None to drop it), or a `Pending` for
        `complete` when the query must wait for the rate limit or go upstream. Denied and cached queries never
        cost a task."""
        started = time.monotonic()
        state = self.state_provider()
        policy = state.policy_for_address(client[0]) if state is not None else None
        if policy is not None:
            self.cache.bind_policy(policy.sandbox_id, policy)
            if transport == "udp":  # TCP answers have another size limit, and TCP is rare: always the slow way
                again = self._answer_again(data, client, server, policy, started)
                if again is not None:
                    return again
        ctx = Pending(started, time.time_ns() // 1000, data, client, server, transport, policy)
        if policy is not None:
            ctx.sandbox_id = policy.sandbox_id
        ctx.generation = self._generation()  # reloads the malware list first: the decision itself does no I/O
        decision = ctx.decision = decide_packet(data, policy, self.config, self.blocklist)
        if decision.action == DROP:
            self._unanswered(decision.code)
            self._debug("dns.dropped", client=client[0], reason=decision.reason, size=len(data))
            return None
        query = decision.query
        if query is None:
            self._debug("dns.malformed", client=client[0], reason=decision.reason, size=len(data))
        if policy is not None:
            bucket = ctx.bucket = self._bucket(policy)
            wait = bucket.try_reserve(1, self.config.rate_limit_max_wait)
            if wait is None:  # over the limit by more than the longest wait: refused, no token taken
                if query is None:
                    self._unanswered(Code.REFUSED_RATE_LIMIT)
                    return None
                response, outcome = _rate_limited(query)
                self._record_pending(ctx, outcome, response)
                return response
            if wait > 0:
                ctx.wait = wait
                return ctx
        return self._respond(ctx)

    def _answer_again(
        self,
        data: bytes,
        client: tuple[Any, ...],
        server: tuple[Any, ...],
        policy: CompiledPolicy,
        started: float,
    ) -> bytes | None:
        """The UDP answer to a packet the sandbox sent before (same `query_key`, same policy and malware list),
        from its ready response; with the rate limit, counts, log, flow record and learned addresses of the slow
        way. None: not known, or the query must wait for its token: the slow way does that."""
        found = query_key(data)
        if found is None:
            return None
        key, end = found
        sandbox_id = policy.sandbox_id
        hit = self.cache.get_ready(sandbox_id, key)
        if hit is None:
            return None
        ready, elapsed = hit
        if ready.generation != self._generation():
            return None
        start_us = time.time_ns() // 1000
        bucket = self._bucket(policy)
        wait = bucket.try_reserve(1, self.config.rate_limit_max_wait)
        if wait is not None and wait > 0:
            bucket.refund(1)  # the slow way takes it again and queues the query for it
            return None
        # parse_query(data) below cannot fail: a packet with this key was parsed before.
        if wait is None:  # over the limit by more than the longest wait: refused, no token taken
            response, outcome = _rate_limited(parse_query(data))
        else:
            entry = ready.entry
            if entry is not None:
                second = int(elapsed)
                if second != ready.second:  # its TTLs count down once a second
                    ready.response = self._render(entry.answer, elapsed, parse_query(data), "udp")
                    ready.second = second
                self.cache.hits += 1
                self._learn(sandbox_id, ready.outcome.name, entry.answer, elapsed)
            response = splice(data, end, ready.response)
            outcome = ready.outcome
        self._record(
            sandbox_id, policy.revision, outcome, started, start_us, client, server, "udp", len(data), len(response)
        )
        return response

    def _generation(self) -> int:
        if self.blocklist is None:
            return 0
        self.blocklist.maybe_reload()
        return self.blocklist.generation

    def _bucket(self, policy: CompiledPolicy) -> TokenBucket:
        return self.limiter.bucket(policy.sandbox_id, policy.limits.dns_queries_per_minute)

    def _keep_ready(
        self, ctx: Pending, response: bytes, outcome: Outcome, entry: CacheEntry | None = None, second: int = 0
    ) -> None:
        """Keep a UDP response for `_answer_again` (made from `entry` rendered `second` seconds into its life),
        unless the policy changed while it was made."""
        decision = ctx.decision
        if ctx.transport != "udp" or decision is None or decision.query is None or ctx.policy is None:
            return
        found = query_key(ctx.data)
        if found is None or self.cache.bound(ctx.sandbox_id) is not ctx.policy:
            return
        ready = Ready(response, outcome, ctx.generation, entry, second)
        self.cache.put_ready(ctx.sandbox_id, found[0], ready)

    def _respond(self, ctx: Pending) -> bytes | Pending:
        decision = ctx.decision
        assert decision is not None
        query = decision.query
        if decision.action == ANSWER:
            response = decision.response or b""  # synthetic answers are small: they always fit
            outcome = Outcome(
                query.name if query is not None else "",
                query.type_name if query is not None else "",
                decision.rcode,
                (),
                decision.allowed,
                decision.code,
                decision.reason,
                decision.rule,
                False,
                decision.would_deny,
                decision.message,
                decision.denial_id,
            )
            self._record_pending(ctx, outcome, response)
            self._keep_ready(ctx, response, outcome)
            return response
        assert query is not None  # FORWARD always has a query
        hit = self.cache.get(ctx.sandbox_id, query.name, query.qtype, query.do)
        if hit is None:
            if decision.budgeted:  # it would go upstream: a new name must fit the sandbox's budget
                limited = self.budgets.admit(ctx.sandbox_id, query.name)
                if limited is not None:  # not kept for `_answer_again`: the window moves on
                    response, outcome = _refused(query, limited.code, limited.reason, Rule.DNS_BUDGET, EDE_BLOCKED)
                    self._record_pending(ctx, outcome, response)
                    return response
            return ctx
        entry, elapsed = hit
        return self._deliver(ctx, entry.answer, elapsed, cached=True, entry=entry)

    async def complete(self, ctx: Pending) -> bytes | None:
        """The waiting part: the rate-limit delay, then the upstream exchange when the cache did not answer."""
        if ctx.wait > 0:
            try:
                await self.limiter.sleep(ctx.wait)
            except asyncio.CancelledError:
                if ctx.bucket is not None:
                    ctx.bucket.refund(1)  # the client went away while queued: its token is not spent
                raise
            ctx.wait = 0.0
            result = self._respond(ctx)
            if not isinstance(result, Pending):
                return result
        assert ctx.decision is not None and ctx.decision.query is not None and ctx.policy is not None
        answer, entry = await self._forward(ctx.sandbox_id, ctx.decision.query, ctx.policy)
        if answer.rcode == NXDOMAIN and ctx.decision.budgeted:
            self.budgets.nxdomain(ctx.sandbox_id, ctx.decision.query.name)
        return self._deliver(ctx, answer, 0.0, cached=False, entry=entry)

    def _render(self, answer: Answer, elapsed: float, query: Query, transport: str) -> bytes:
        limit = query.udp_limit() if transport == "udp" else TCP_MAX_MESSAGE
        return render(answer.wire, answer.offsets, elapsed, query, ede=answer.ede, limit=limit)

    def _learn(self, sandbox_id: str, name: str, answer: Answer, elapsed: float) -> None:
        """The answer's addresses become (again) DNS-learned destinations of the sandbox, for what is left of
        their TTL: every answer refreshes them, so an entry the learned table dropped comes back with it."""
        if answer.addresses and self.learned is not None:
            remaining = answer.addresses_ttl - int(elapsed)
            if remaining > 0:
                self.learned.add(sandbox_id, name, answer.addresses, remaining)

    def _deliver(
        self, ctx: Pending, answer: Answer, elapsed: float, *, cached: bool, entry: CacheEntry | None
    ) -> bytes:
        """The client's response from an answer (`entry`: the cache entry holding it, when it was stored)."""
        decision = ctx.decision
        assert decision is not None and decision.query is not None
        query = decision.query
        response = self._render(answer, elapsed, query, ctx.transport)
        self._learn(ctx.sandbox_id, query.name, answer, elapsed)
        outcome = Outcome(
            query.name,
            query.type_name,
            answer.rcode,
            answer.addresses,
            True,
            Code.CACHED if cached else answer.code,
            answer.reason or decision.reason,
            decision.rule,
            cached,
            decision.would_deny,
        )
        self._record_pending(ctx, outcome, response)
        if entry is not None:  # the same packet again is answered from the cache: log it as such
            self._keep_ready(ctx, response, outcome._replace(code=Code.CACHED, cached=True), entry, int(elapsed))
        return response

    async def _forward(self, sandbox_id: str, query: Query, policy: CompiledPolicy) -> tuple[Answer, CacheEntry | None]:
        """Ask the upstreams (one exchange for concurrent identical queries of one sandbox); cache the answer.
        Returns the answer and its cache entry (None: not cached)."""
        key = (sandbox_id, id(policy), query.name, query.qtype, query.do)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[Answer, CacheEntry | None]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            self.upstream_queries += 1
            entry = None
            try:
                data = await exchange(upstream_packet(query, self.config), self.upstreams, self.config.upstream_timeout)
            except ResolveError as exc:
                answer = failure_answer(query, Code.UPSTREAM_FAILED, f"upstream: {exc}", EDE_NO_REACHABLE_AUTHORITY)
            else:
                answer = accept_upstream(query, data, policy, self.config)
                if self.cache.bound(sandbox_id) is policy:  # not if the policy changed meanwhile
                    entry = self.cache.put(sandbox_id, query.name, query.qtype, query.do, answer)
            future.set_result((answer, entry))
            return answer, entry
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]

    def _record_pending(self, ctx: Pending, outcome: Outcome, response: bytes) -> None:
        self._record(
            ctx.sandbox_id,
            ctx.policy.revision if ctx.policy is not None else None,
            outcome,
            ctx.started,
            ctx.start_us,
            ctx.client,
            ctx.server,
            ctx.transport,
            len(ctx.data),
            len(response),
        )

    def _record(
        self,
        sandbox_id: str,
        revision: str | None,
        outcome: Outcome,
        started: float,
        start_us: int,
        client: tuple[Any, ...],
        server: tuple[Any, ...],
        transport: str,
        bytes_up: int,
        bytes_down: int,
    ) -> None:
        """The one place a query's decision is recorded: its count, the sandbox's query-log ring (the API's recent
        view) and, with a FlowLog, its flow record (which is also its log line)."""
        self.queries[(outcome.code, outcome.rcode, outcome.allowed)] += 1
        if not sandbox_id:
            self._debug("dns.unknown_source", client=client[0], code=str(outcome.code))
            return  # no sandbox to file it under; the counters still count it
        latency = time.monotonic() - started
        ring = self._logs.get(sandbox_id)
        if ring is None:
            ring = self._logs[sandbox_id] = deque(maxlen=self.config.query_log_size)
            while len(self._logs) > MAX_LOGGED_SANDBOXES:
                self._logs.popitem(last=False)
        else:
            self._logs.move_to_end(sandbox_id)
        ring.append((start_us, client, transport, latency, outcome))
        if self.flowlog is None:
            return
        try:
            self.flowlog.record(
                FlowRecord(
                    start_us=start_us,
                    end_us=time.time_ns() // 1000,
                    sandbox=sandbox_id,
                    src_addr=str(client[0]),
                    src_port=int(client[1]),
                    dst_addr=str(server[0]),
                    dst_port=int(server[1]),
                    orig_dst_addr=str(server[0]),
                    orig_dst_port=int(server[1]),
                    hostname=outcome.name or None,
                    protocol="dns",
                    bytes_up=bytes_up,
                    bytes_down=bytes_down,
                    duration_ms=round(latency * 1000, 3),
                    verdict=flow_verdict(outcome.allowed, outcome.would_deny),
                    reason=outcome.reason,
                    rule=outcome.rule,
                    message=outcome.message or None,
                    denial_id=outcome.denial_id or None,
                    revision=revision,
                )
            )
        except Exception:  # the audit trail must never break DNS
            self._debug("dns.flowlog_failed")

    # ------------------------------------------------------------------ TCP

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        local = writer.get_extra_info("sockname") or ("?", 0)
        source = str(peer[0])
        if self._tcp_count >= self.config.tcp_max_connections or (
            self._tcp_by_source[source] >= self.config.tcp_max_per_sandbox
        ):
            self._unanswered("TCP_REFUSED_CONNECTION_LIMIT")  # its queries are never read
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tcp_tasks.add(task)
        self._tcp_count += 1
        self._tcp_by_source[source] += 1
        idle = self.config.tcp_idle_timeout
        try:
            while True:
                try:
                    (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), idle))
                    if size == 0:
                        break
                    data = await asyncio.wait_for(reader.readexactly(size), idle)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
                    break
                try:
                    response = await self.handle(data, peer, local, "tcp")
                except Exception as exc:
                    self._unanswered(INTERNAL_ERROR)
                    self._debug("dns.handle_failed", error=repr(exc))
                    response = None
                if response is None:
                    continue
                writer.write(struct.pack("!H", len(response)) + response)
                try:
                    await asyncio.wait_for(writer.drain(), idle)
                except (TimeoutError, ConnectionError, OSError):
                    break
        finally:
            self._tcp_count -= 1
            self._tcp_by_source[source] -= 1
            if self._tcp_by_source[source] <= 0:
                del self._tcp_by_source[source]
            if task is not None:
                self._tcp_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


def _transparent_socket(family: int, kind: int) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except OSError:
        sock.close()
        raise
    return sock


def _orig_dst(family: int, ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    for level, ctype, cdata in ancillary:
        if family == socket.AF_INET and level == socket.SOL_IP and ctype == IP_RECVORIGDSTADDR and len(cdata) >= 8:
            return socket.inet_ntop(socket.AF_INET, cdata[4:8]), struct.unpack("!H", cdata[2:4])[0]
        if (
            family == socket.AF_INET6
            and level == socket.IPPROTO_IPV6
            and ctype == IPV6_RECVORIGDSTADDR
            and len(cdata) >= 24
        ):
            return socket.inet_ntop(socket.AF_INET6, cdata[8:24]), struct.unpack("!H", cdata[2:4])[0]
    return None


class _UdpListener:
    """A non-blocking UDP socket read with `recvmsg` (asyncio's datagram endpoints hide the control messages)."""

    def __init__(self, owner: DnsInterceptor, sock: socket.socket, transparent: bool) -> None:
        self.owner = owner
        self.sock = sock
        self.transparent = transparent
        self.family = sock.family
        self.local = sock.getsockname()
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self.by_source: Counter[str] = Counter()
        #: Transparent mode: (address, port) a sandbox asked -> a socket bound there that sends the answers.
        self.replies: OrderedDict[tuple[str, int], socket.socket] = OrderedDict()
        self.loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for reply in self.replies.values():
            reply.close()
        self.replies.clear()
        for task in list(self.tasks):
            task.cancel()

    def _readable(self) -> None:
        owner, config = self.owner, self.owner.config
        for _ in range(UDP_BATCH):
            try:
                if self.transparent:
                    data, ancillary, _flags, peer = self.sock.recvmsg(UDP_BUFFER, 256)
                else:
                    data, peer = self.sock.recvfrom(UDP_BUFFER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors reported on the socket: nothing to do with the next packet
                owner._debug("dns.udp_recv_error", error=str(exc))
                continue
            if self.transparent:
                dst = _orig_dst(self.family, ancillary)
                if dst is None:
                    owner._debug("dns.udp_no_orig_dst", client=peer[0])
                    continue
            else:
                dst = self.local
            try:
                result = owner.handle_now(data, peer, dst, "udp")
            except Exception as exc:  # one bad packet costs its own answer, nothing more
                owner._unanswered(INTERNAL_ERROR)
                owner._debug("dns.handle_failed", error=repr(exc))
                continue
            if result is None:
                continue
            if not isinstance(result, Pending):
                self._send(result, peer, dst)
                continue
            source = str(peer[0])
            if len(self.tasks) >= config.max_inflight or self.by_source[source] >= config.max_inflight_per_sandbox:
                owner._unanswered("UDP_DROPPED_INFLIGHT", result.decision is not None and result.decision.allowed)
                if result.bucket is not None:
                    result.bucket.refund(1)  # not answered: the token is not spent
                continue
            self.by_source[source] += 1
            task = self.loop.create_task(self._serve(result, peer, dst, source))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        rearm_reader(self.loop, self.sock.fileno(), self._readable)  # a full batch: the rest on the next turn

    async def _serve(self, pending: Pending, peer: tuple[Any, ...], dst: tuple[Any, ...], source: str) -> None:
        try:
            response = await self.owner.complete(pending)
            if response is not None:
                self._send(response, peer, dst)
        except Exception as exc:
            self.owner._unanswered(INTERNAL_ERROR)
            self.owner._debug("dns.handle_failed", error=repr(exc))
        finally:
            self.by_source[source] -= 1
            if self.by_source[source] <= 0:
                del self.by_source[source]

    def _reply_socket(self, dst: tuple[Any, ...]) -> socket.socket:
        """The answer must come from the address and port the sandbox asked: a transparent socket bound there,
        kept for the next answers (opening one per answer is five system calls). It never receives a query:
        TPROXY's lookup skips unconnected UDP sockets for established flows and finds the listener on the
        TPROXY port, and nothing else is delivered locally to a foreign address."""
        key = (str(dst[0]), int(dst[1]))
        reply = self.replies.get(key)
        if reply is not None:
            self.replies.move_to_end(key)
            return reply
        reply = _transparent_socket(self.family, socket.SOCK_DGRAM)
        try:
            reply.setblocking(False)
            reply.bind(key)
        except OSError:
            reply.close()
            raise
        self.replies[key] = reply
        if len(self.replies) > MAX_REPLY_SOCKETS:
            self.replies.popitem(last=False)[1].close()
        return reply

    def _send(self, response: bytes, peer: tuple[Any, ...], dst: tuple[Any, ...]) -> None:
        try:
            if not self.transparent:
                self.sock.sendto(response, peer)
                return
            self._reply_socket(dst).sendto(response, peer)
        except OSError as exc:  # a full socket buffer or a vanished route: the client retries
            self.owner._debug("dns.udp_send_error", error=str(exc), client=peer[0])
