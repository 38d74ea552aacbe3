"""The composition root: the one module that builds the egress engine, the DNS interceptor, the tunnel and the
control API together, handing each its own configuration section and collaborators.

`gateway run` (gateway/cli.py parses the flags and calls `run`):

* `serve`: the policy store, the flow log (one for the API's audit routes and every data-plane
  component), the tunnel service when `[tunnel] enabled`, the control API and, with `--data-plane`,
  a `DataPlane`. What can be refused is refused before anything listens (`check_runnable`: the API's
  exposure, the tunnel's certificate); the API listens before the data plane starts, so readiness
  can say what does not serve yet; shutdown runs in reverse.
* `DataPlane`: the resolver, the destination checks, the learned addresses, the DNS interceptor and
  the egress engine around one policy store; with `steer`, the nftables table and policy routing.
* `serve_worker`: worker k of `--workers N` (gateway/workers.py has the pool and the fan-out of
  DNS-learned addresses): a store, a flow log and a data plane without DNS on `egress.listen_port + k`.

The components know nothing of each other: the engine gets a `LearnedDestinations` (which the DNS
interceptor fills) and a `Destinations`; the API gets the data plane's status and readiness as
callables; the DNS interceptor gets its `DnsConfig`.

A start-up failure is a `StartupError`: `config_error` says whether the configuration is at fault
(the CLI exits 2) or the environment (a store that is down, a port in use: exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any, TextIO

import msgspec
import structlog
from aiohttp import web

from gateway.api import TOKENS_KEY, ApiTokens, check_api_exposure, create_app
from gateway.decision import CompiledPolicy
from gateway.destinations import Destinations, Refusal, read_local_addresses
from gateway.dns.server import DnsInterceptor
from gateway.engine.engine import EgressEngine
from gateway.engine.handover import TierRoute
from gateway.engine.plan import dial_refusal
from gateway.errors import GatewayError
from gateway.flowlog import FlowLog
from gateway.formatting import listen_description, store_description
from gateway.inspection import TIER_TOKEN_VARIABLE
from gateway.learned import LearnedDestinations
from gateway.metrics import Snapshot, TierSnapshot, registry_for, render
from gateway.nft import SteeringConfig, SteeringStatus, UnattachedSources, links_from_sandboxes, render_ruleset
from gateway.ratelimit import BandwidthLimiter, ConnectionRateLimiter
from gateway.resolver import Resolver
from gateway.settings import Config, load_config, plan_reload
from gateway.state import PolicyContext
from gateway.stores import open_store
from gateway.stores.base import PolicyStore
from gateway.tier.supervisor import TierSupervisor
from gateway.tunnel.certs import build_server_context
from gateway.tunnel.service import TunnelService
from gateway.workers import (
    COUNTERS_INTERVAL,
    LISTENING_LINE,
    MAX_PENDING_BYTES,
    EngineCounters,
    LearnedFanout,
    WorkerPool,
    apply_learned_line,
    counters_line,
    record_lines,
    worker_index,
)

log = structlog.get_logger("gateway.service")


class StartupError(Exception):
    """`gateway run` cannot start; the message is `CODE: message` for a person."""

    def __init__(self, message: str, *, config_error: bool) -> None:
        super().__init__(message)
        self.message = message
        #: True: the configuration is at fault (fix it and retry); False: the environment is.
        self.config_error = config_error


class Shutdown:
    """SIGTERM/SIGINT: the first asks for a drain (`requested`), a second one (or `now`) for closing at once."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()

    def signal(self) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.requested.set()

    def now(self) -> None:
        self.requested.set()
        self.hurry.set()

    def draining(self) -> bool:
        return self.requested.is_set()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.signal)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class Reloader:
    """SIGHUP: load the configuration again (the same file, the environment as it is now), exactly as at start.
    An invalid one changes nothing (logged with its code); of a valid one the options marked live
    (`gateway.config.LIVE`) are applied and every other changed option is logged as needing a restart and keeps
    its running value. `config` is what runs now; `tokens` the API's, `pool` the workers to pass SIGHUP on to;
    `components` get the configuration that runs from now on when a live option of theirs may have changed;
    `store` the policy store a changed policy context (invariants, presets, limits defaults) is put in force in
    (each process its own), and `report`: whether this process logs the sandboxes that break the invariants (the
    main one; its workers find the same)."""

    def __init__(
        self,
        config: Config,
        path: str | None,
        *,
        tokens: ApiTokens | None = None,
        pool: WorkerPool | None = None,
        components: Sequence[Callable[[Config], None]] = (),
        store: PolicyStore | None = None,
        report: bool = True,
    ) -> None:
        self.config = config
        self.path = path
        self.tokens = tokens
        self.pool = pool
        self.components = tuple(components)
        self.store = store
        self.report = report
        self._applying: set[asyncio.Task[None]] = set()

    def reload(self) -> None:
        from gateway.logs import configure_logging

        if self.pool is not None:
            self.pool.send_signal(signal.SIGHUP)  # each worker reads the file itself
        try:
            loaded = load_config(self.path)
            plan = plan_reload(self.config, loaded)
            if self.tokens is not None:
                self.tokens.replace(plan.config.api.tokens)
        except GatewayError as exc:
            log.error("config.reload_failed", code=exc.code, error=str(exc), source=self.path or "defaults")
            return
        configure_logging(plan.config.log.format, plan.config.log.level)
        context = plan.config.policy_context()
        context_changed = context != self.config.policy_context()
        self.config = plan.config
        if plan.applied:
            for reconfigure in self.components:
                reconfigure(plan.config)
        for option in plan.restart_needed:
            log.warning("config.restart_needed", option=option, reason="changed in the file; the running value stays")
        log.info("config.reloaded", applied=list(plan.applied), restart_needed=list(plan.restart_needed))
        if context_changed and self.store is not None:
            task = asyncio.get_running_loop().create_task(self._apply_context(self.store, context))
            self._applying.add(task)
            task.add_done_callback(self._applying.discard)

    async def _apply_context(self, store: PolicyStore, context: PolicyContext) -> None:
        """The reloaded [invariants] (with the built-in gateway-services assertion of the running listeners),
        presets and [limits] defaults in force, between two writes; each sandbox whose record breaks the
        invariants is one log line."""
        invariants = context.invariants
        violating = await store.apply_context(context)
        if self.report:
            for found in violating:
                error = found.error
                log.warning("invariants.violated", sandbox=found.key, code=error.code, error=error.message,
                            field=error.field)  # fmt: skip
        log.info(
            "policies.recompiled",
            never_reach=[a.name for a in invariants.never_reach],
            ceilings=len(invariants.ceilings),
            presets=sorted(context.presets),
            violating=len(violating),
            cut=store.state.last_cut,
        )

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_signal_handler(signal.SIGHUP)


async def drain(plane: DataPlane, shutdown: Shutdown, timeout: float) -> None:
    """Reset new connections, let the open ones end for up to `timeout` (or until `shutdown.hurry`); the caller
    then closes the plane, which cuts what is left."""
    log.info("gateway.draining", open_flows=plane.stop_accepting(), timeout=timeout)
    if timeout > 0 and not shutdown.hurry.is_set():
        waits = [asyncio.ensure_future(plane.drained()), asyncio.ensure_future(shutdown.hurry.wait())]
        _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    log.info("gateway.drained", cut=plane.open_flows())


def check_runnable(config: Config) -> None:
    """What `gateway run` refuses at start-up beyond what loading the configuration checks: `run` calls this
    before it starts anything, and `check-config` calls it, so the two never disagree. Raises GatewayError."""
    check_api_exposure(config.api.host, config.api.tokens)
    if config.tunnel.enabled:  # the tunnel serves from its first second: the pair must load now
        build_server_context(config.tunnel.cert_path, config.tunnel.key_path)


def run(
    config: Config,
    out: TextIO,
    *,
    data_plane: bool = False,
    steer: bool = False,
    workers: int = 1,
    event_loop: str = "uvloop",
    worker: int | None = None,
    worker_argv: Callable[[int], list[str]] | None = None,
    config_path: str | None = None,
) -> int:
    """`gateway run` after its flags were checked: logging, the event loop, then `serve` (or, for a process
    started by a main process's pool, `serve_worker`). Returns the exit code."""
    from gateway.logs import configure_logging

    configure_logging(config.log.format, config.log.level)
    loop_factory = None
    if event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    if worker is not None:
        return asyncio.run(serve_worker(config, worker, workers, config_path), loop_factory=loop_factory)
    main = serve(
        config,
        out,
        data_plane=data_plane,
        steer=steer,
        workers=workers,
        worker_argv=worker_argv,
        config_path=config_path,
    )
    return asyncio.run(main, loop_factory=loop_factory)


async def serve(
    config: Config,
    out: TextIO,
    *,
    data_plane: bool = False,
    steer: bool = False,
    workers: int = 1,
    worker_argv: Callable[[int], list[str]] | None = None,
    config_path: str | None = None,
) -> int:
    """The main process until SIGINT/SIGTERM: store, flow log, tunnel, API and (`data_plane`) the data plane.
    The first signal drains the data plane (`drain`) while everything else serves; a second closes at once."""
    store = open_store(config.policy_context(), config.store)
    # One flow log for the API's audit routes and every data-plane component.
    flows = FlowLog.from_config(config.audit, config.store.redis_url)
    tunnels: TunnelService | None = None
    pool = WorkerPool(workers, worker_argv, flows.record) if workers > 1 and worker_argv is not None else None
    plane = DataPlane(config, store, flows, steer=steer, pool=pool) if data_plane else None  # nothing listens yet
    shutdown = Shutdown()
    try:
        if config.tunnel.enabled:  # loads the certificate now: a missing one stops start-up with CERT_INVALID
            tunnels = TunnelService(
                store,
                config.tunnel,
                policy_path=config.store.path,
                redis_url=config.store.redis_url,
                redis_prefix=config.store.redis_prefix,
                flows=flows,
            )
        # refuses an exposed API without tokens before anything starts
        app = create_app(
            store,
            host=config.api.host,
            port=config.api.port,
            tokens=config.api.tokens,
            flows=flows,
            tunnels=tunnels.store if tunnels else None,
            dns=plane.dns if plane else None,
            data_plane_status=plane.status if plane else None,
            unready=plane.unready if plane else None,
            draining=shutdown.draining,
            inspection_excluded=config.inspection.excluded,
            dial_refusal=plane.dial_refusal if plane else None,
            metrics=functools.partial(render, registry_for(lambda: snapshot(store, flows, plane, tunnels))),
        )
    except GatewayError as exc:
        raise StartupError(str(exc), config_error=True) from None
    loop = asyncio.get_running_loop()
    shutdown.install(loop)
    reloader = Reloader(
        config,
        config_path,
        tokens=app[TOKENS_KEY],
        pool=pool,
        components=[plane.reconfigure] if plane else [],
        store=store,
    )
    reloader.install(loop)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    started: DataPlane | None = None
    try:
        try:
            await store.start()
        except GatewayError as exc:
            raise StartupError(str(exc), config_error=False) from None
        except OSError as exc:  # the embedded store creates its file and folder on first start
            raise StartupError(f"STORE_UNAVAILABLE: {store_description(config)}: {exc}", config_error=False) from None
        await flows.start()
        if tunnels is not None:
            await tunnels.start()
            out.write(f"tunnels served on https://*.{config.tunnel.domain}:{config.tunnel.origin_port}/\n")
        await runner.setup()
        site = web.TCPSite(runner, config.api.host, config.api.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"LISTEN_FAILED: cannot listen on {config.api.host}:{config.api.port}: {exc.strerror or exc}",
                config_error=False,
            ) from None
        listening = listen_description(runner.addresses)  # as bound, not as configured
        out.write(f"gateway API listening on {listening}, store {store_description(config)}\n")
        out.flush()
        if plane is not None:
            try:
                await plane.start()
            except (GatewayError, OSError) as exc:
                await plane.close()
                raise StartupError(f"DATA_PLANE_FAILED: {exc}", config_error=False) from None
            started = plane
            steering = " (steering applied)" if steer else ""
            first = config.egress.listen_port
            ports = f"ports {first}-{first + workers - 1} ({workers} workers)" if workers > 1 else f"port {first}"
            out.write(f"egress engine listening on {ports}{steering}\n")
            out.flush()
        await shutdown.requested.wait()
        log.info("gateway.stopping")
        if started is not None:  # the API (and readiness: 503 DRAINING), DNS and the tunnel keep serving meanwhile
            await drain(started, shutdown, reloader.config.egress.drain_timeout)
    finally:
        if started is not None:
            await started.close()
        await runner.cleanup()
        if tunnels is not None:
            await tunnels.close()
        await flows.close()  # writes what is still queued
        await store.close()
        shutdown.remove(loop)
        reloader.remove(loop)
    return 0


def snapshot(store: PolicyStore, flows: FlowLog, plane: DataPlane | None, tunnels: TunnelService | None) -> Snapshot:
    """Every exported counter, read now from the components that keep them (for GET /metrics)."""
    state = store.state
    server = tunnels.server if tunnels is not None else None
    base = Snapshot(
        store_ready=store.ready.is_set(),
        store_sync_lag=store.sync_lag(),
        store_rejected=len(state.rejections),
        sandboxes=len(state.sandboxes),
        flow_records_written=flows.written,
        flow_records_dropped=flows.dropped,
        tunnel_requests=dict(server.answered) if server is not None else None,
        tunnel_logins=dict(server.login.results) if server is not None else None,
    )
    if plane is None:
        return base
    tier, pool = plane.tier, plane.pool
    egress = plane.counters()
    if pool is not None:
        egress.add(pool.totals())
    return replace(
        base,
        flow_records_dropped=egress.flow_records_dropped,  # this process's flow log's and the workers'
        connections=egress.connections,
        bytes_up=egress.bytes_up,
        bytes_down=egress.bytes_down,
        relaying=egress.relaying,
        decisions=egress.decisions,
        dials=egress.dials,
        dns_queries=plane.dns.query_counts() if plane.dns is not None else None,
        tier=TierSnapshot(tier.ready, tier.restarts, tier.bad_records) if tier is not None else None,
        worker_restarts=pool.restarts if pool is not None else 0,  # one process: none to restart
    )


def worker_config(config: Config, worker: int) -> Config:
    """Worker k's configuration: its own egress port."""
    egress = msgspec.structs.replace(config.egress, listen_port=config.egress.listen_port + worker)
    return replace(config, egress=egress)


async def serve_worker(config: Config, worker: int, workers: int, config_path: str | None = None) -> int:
    """A worker process: the store and an egress engine, until stdin closes or SIGTERM/SIGINT. Its flow records go
    to the main process on stdout (`gateway.workers`), the records of one loop turn in one write."""
    loop = asyncio.get_running_loop()
    # StreamWriter.drain() waits through its protocol's flow control, which a plain asyncio.Protocol lacks (drain
    # would raise AttributeError): a StreamReaderProtocol has it.
    out_transport, out_protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), sys.stdout.buffer
    )
    # Non-blocking: a main process slow to read delays nothing here; beyond the bound, records are dropped (counted).
    output = asyncio.StreamWriter(out_transport, out_protocol, None, loop)

    def forward(lines: list[str]) -> None:
        if output.transport.get_write_buffer_size() > MAX_PENDING_BYTES:
            raise OSError("the main process does not read its records")  # counted as dropped by the flow log
        output.write(record_lines(lines))

    store = open_store(config.policy_context(), config.store, keeps_history=False)
    flows = FlowLog(config.audit, forward=forward)
    plane = DataPlane(worker_config(config, worker), store, flows, dns=False)
    shutdown = Shutdown()
    shutdown.install(loop)
    reloader = Reloader(
        config,
        config_path,
        components=[lambda c: plane.reconfigure(worker_config(c, worker))],
        store=store,
        report=False,
    )
    reloader.install(loop)
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def learn() -> None:
        while line := await reader.readline():
            if not apply_learned_line(plane.learned, line):
                log.warning("worker.bad_learned_line", worker=worker)
        shutdown.now()  # the main process is gone, or closes at once

    def report() -> None:  # the main process's /metrics sums these
        if not output.transport.is_closing():  # else the main process is gone: nothing to tell
            output.write(counters_line(plane.counters()))

    async def report_every_interval() -> None:
        while True:
            await asyncio.sleep(COUNTERS_INTERVAL)
            report()

    try:
        await store.start()
        await flows.start()
        await plane.start()
        log.info("worker.listening", worker=worker, of=workers, port=config.egress.listen_port + worker)
        output.write(LISTENING_LINE)
        learning = asyncio.create_task(learn())
        reporting = asyncio.create_task(report_every_interval())
        await shutdown.requested.wait()
        await drain(plane, shutdown, reloader.config.egress.drain_timeout)
        learning.cancel()
        reporting.cancel()
    finally:
        await plane.close()
        await flows.close()  # forwards what the closing connections recorded
        report()  # the last counts, connections the close ended included
        await store.close()
        with contextlib.suppress(OSError):  # every record queued reaches the main process before this one exits
            await output.drain()
            output.close()
            await output.wait_closed()
        if flows.dropped:
            log.warning("worker.records_dropped", worker=worker, dropped=flows.dropped)
    return 0


# --------------------------------------------------------------------------- the data plane

LOCAL_ADDRESS_REFRESH = 30.0
STEERING_POLL = 1.0


class DataPlane:
    """The resolver, destination checks, learned addresses and the engine, around one policy store.

    With `steer`, also IPv4/IPv6 forwarding (`netplumb.ensure_forwarding`), the nftables table and
    the fwmark policy routing in this network namespace; the table is re-applied whenever what it is
    rendered from changes (attached addresses, their workers, private links). Host routes and proxy
    ARP for each sandbox's interface are the attach tooling's job (the store does not know
    interfaces). The table outlives the process on purpose: if the gateway dies, TPROXYed traffic
    finds no listener and is dropped, never forwarded.
    """

    def __init__(
        self,
        config: Config,
        store: PolicyStore,
        flowlog: FlowLog,
        *,
        steer: bool = False,
        pool: WorkerPool | None = None,
        dns: bool = True,
    ) -> None:
        self.config = config
        self.store = store
        self.steer = steer
        #: The other egress processes (`--workers`); this one is worker 0.
        self.pool = pool
        self.workers = pool.workers if pool is not None else 1
        self.engine: EgressEngine | None = None
        self.destinations: Destinations | None = None
        self.flowlog = flowlog
        #: Shared with the DNS interceptor: its answers are what opaque TCP may reach.
        self.learned = LearnedFanout(pool.workers, pool.send) if pool is not None else LearnedDestinations()
        # Built now (no sockets yet) so the control API can serve its query log; it has its own rate
        # limiter: DNS queries and connections are separate budgets. A worker process has none.
        self.dns = (
            DnsInterceptor(config.dns, lambda: store.state, learned=self.learned, flowlog=flowlog) if dns else None
        )
        #: The inspection tier, started once some policy marks a host for it (and only in the main process).
        self.tier = TierSupervisor(config.inspection, flowlog) if dns else None
        if self.tier is not None and pool is not None:
            pool.environment[TIER_TOKEN_VARIABLE] = self.tier.token  # the workers hand over to the same tier
        self._tasks: list[asyncio.Task[None]] = []
        #: The steering input last applied (or last refused: not retried until it changes).
        self._applied: SteeringConfig | None = None
        self.unattached = UnattachedSources(config.egress.unattached_log_interval)

    async def start(self) -> None:
        raise_fd_limit()
        egress = self.config.egress
        local = await asyncio.to_thread(read_local_addresses)
        self.destinations = Destinations(
            egress.public_ranges, egress.gateway_addresses, egress.blocklist_path, local_addresses=local
        )
        self.engine = EgressEngine(
            egress,
            lambda: self.store.state,
            Resolver(self.config.resolver),
            self.destinations,
            self.learned,
            flowlog=self.flowlog,
            connection_limiter=ConnectionRateLimiter(),
            bandwidth=BandwidthLimiter(),
            tier=self._tier_route(),
        )
        self.store.state.change_listeners.append(self.policy_changed)
        if self.steer:
            from gateway import netplumb

            changed = await asyncio.to_thread(netplumb.ensure_forwarding, egress.sandbox_interfaces)
            if changed:
                log.info("steering.sysctls_set", **{key.replace("/", "."): value for key, value in changed.items()})
            await self.apply_steering()
        if self.dns is not None:
            await self.dns.start_transparent()
        await self.engine.start()
        if self.pool is not None:
            await self.pool.start()
        self._tasks.append(asyncio.create_task(self._refresh_local_addresses()))
        if self.tier is not None:
            self._tasks.append(asyncio.create_task(self._follow_inspection()))
        if self.steer:
            self._tasks.append(asyncio.create_task(self._follow_store()))

    def reconfigure(self, config: Config) -> None:
        """A reload's configuration (its restart-only options as they run): the engine and DNS take their sections."""
        self.config = config
        if self.engine is not None:
            self.engine.reconfigure(config.egress)
        if self.dns is not None:
            self.dns.reconfigure(config.dns)

    def policy_changed(self, sandbox_id: str) -> int:
        """The live cut in this process: the sandbox's DNS-learned addresses its policy no longer justifies go
        first, then its relayed connections the policy no longer allows (see `EgressEngine.policy_changed`)."""
        policy = self.store.state.compiled.get(sandbox_id)
        if policy is None:
            self.learned.forget(sandbox_id)
        else:
            self.learned.retain(sandbox_id, lambda name: policy.name_allowed(name).allowed)
        return self.engine.policy_changed(sandbox_id) if self.engine is not None else 0

    def _tier_route(self) -> TierRoute | None:
        """The main process's engine asks its supervisor whether the tier serves; a worker process has the token from
        the main process and tries (a tier that is down refuses the hand-over: the connection fails closed)."""
        inspection = self.config.inspection
        tier = self.tier
        if tier is not None:
            return TierRoute(inspection.listen_port, tier.token, lambda: tier.ready, inspection.excluded)
        token = os.environ.get(TIER_TOKEN_VARIABLE)
        if not token:
            return None
        return TierRoute(inspection.listen_port, token, lambda: True, inspection.excluded)

    def _inspection_needed(self) -> bool:
        return any(policy.inspects for policy in self.store.state.compiled.values())

    async def _follow_inspection(self) -> None:
        """Start the inspection tier once a policy marks a host (it then stays up, restarted when it dies)."""
        assert self.tier is not None
        while True:
            if self._inspection_needed():
                try:
                    await self.tier.start()  # returns at once when it runs
                except GatewayError as exc:  # inspected connections keep failing closed; try again later
                    log.error("inspection.start_failed", error=str(exc))
            await asyncio.sleep(STEERING_POLL)

    def counters(self) -> EngineCounters:
        """This process's egress running totals (the engine's are zero before it starts): copies, to be summed."""
        engine = self.engine
        if engine is None:
            return EngineCounters(flow_records_dropped=self.flowlog.dropped)
        recorder = engine.recorder
        return EngineCounters(
            dict(recorder.connections),
            recorder.bytes_up,
            recorder.bytes_down,
            engine.relaying,
            {key: histogram.copy() for key, histogram in recorder.decisions.items()},
            {key: histogram.copy() for key, histogram in recorder.dials.items()},
            self.flowlog.dropped,
        )

    def unready(self) -> list[str]:
        """What of the data plane does not serve yet (nothing: it all does), for readiness."""
        egress = self.config.egress
        waiting = []
        if self.engine is None or not self.engine.listeners:
            waiting.append(f"the egress engine does not listen on port {egress.listen_port} yet")
        if self.pool is not None:
            waiting += [
                f"egress worker {k} does not listen on port {egress.listen_port + k}" for k in self.pool.not_listening()
            ]
        if self.dns is not None and not self.dns.listening:
            waiting.append(f"the DNS interceptor does not listen on port {egress.dns_port} yet")
        if self.steer and self._applied is None:
            waiting.append("the steering table has not been applied yet")
        if self.tier is not None and not self.tier.ready and self._inspection_needed():
            waiting.append(f"the inspection tier does not serve on 127.0.0.1:{self.config.inspection.listen_port}")
        return waiting

    async def close(self) -> None:
        if self.policy_changed in self.store.state.change_listeners:
            self.store.state.change_listeners.remove(self.policy_changed)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.pool is not None:
            await self.pool.close()
        if self.engine is not None:
            await self.engine.close()
        if self.dns is not None:
            await self.dns.close()
        if self.tier is not None:
            await self.tier.close()

    def stop_accepting(self) -> int:
        """Draining starts: new connections are reset at once (in every worker); returns this process's open flows.
        The steering table stays in force throughout, and after the exit too (see the class docstring)."""
        if self.pool is not None:
            self.pool.drain()
        return self.engine.stop_accepting() if self.engine is not None else 0

    def open_flows(self) -> int:
        return self.engine.open_flows() if self.engine is not None else 0

    def dial_refusal(self, policy: CompiledPolicy, address: str, port: int) -> Refusal | None:
        """The engine's address guards for explain (None before the data plane started: nothing dials yet)."""
        return None if self.destinations is None else dial_refusal(policy, self.destinations, address, port)

    async def drained(self) -> None:
        """Returns once this process's connections have ended and every worker has exited."""
        if self.engine is not None:
            await self.engine.drained()
        if self.pool is not None:
            await self.pool.exited()

    def status(self) -> dict[str, Any]:
        """The data plane's part of `GET /v1/status`."""
        return asdict(
            SteeringStatus(
                steering=self.steer,
                steering_applied=self._applied is not None,
                unattached_dropped=self.unattached.total,
                unattached_recent=list(self.unattached.recent),
            )
        )

    def steering_config(self) -> SteeringConfig:
        """What the table must say now, from the store: attached addresses, their workers, private links."""
        egress = self.config.egress
        subnets = self.config.network.sandbox_subnets
        sandboxes = list(self.store.state.sandboxes.values())
        worker_of = {
            address: worker_index(sandbox.id, self.workers) if self.workers > 1 else 0
            for sandbox in sandboxes
            for address in sandbox.addresses
        }
        return SteeringConfig(
            sandbox_subnets=subnets,
            sandbox_interfaces=egress.sandbox_interfaces,
            attached=frozenset(worker_of),
            private_links=links_from_sandboxes(sandboxes),
            workers=self.workers,
            worker_of=worker_of if self.workers > 1 else {},
            gateway_addresses=frozenset(
                a for a in egress.gateway_addresses if not any(a.version == n.version and a in n for n in subnets)
            ),
            egress_port=egress.listen_port,
            dns_port=egress.dns_port,
            fwmark=egress.fwmark,
            route_table=egress.route_table,
            dial_mark=egress.dial_mark,
            unattached_interval=egress.unattached_log_interval,
        )

    async def apply_steering(self, steering: SteeringConfig | None = None) -> None:
        steering = steering or self.steering_config()
        try:
            await asyncio.to_thread(self._apply, steering)
        finally:
            self._applied = steering  # a refused input is not retried until it changes
        log.info(
            "steering.applied",
            attached=len(steering.attached),
            private_links=len(steering.private_links),
            workers=self.workers,
        )

    def _apply(self, steering: SteeringConfig) -> None:
        """(In a thread.) Routing, then the table; the drops counted by the old table are read first."""
        from gateway import netplumb

        netplumb.ensure_routing_for(steering.policy_routing)
        if self._applied is not None:
            self._read_unattached()
        netplumb.apply_ruleset(render_ruleset(steering))

    def _read_unattached(self) -> list[str]:
        from gateway import netplumb

        try:
            dropped, sources = netplumb.read_unattached()
        except GatewayError as exc:  # e.g. the table was deleted by hand: nothing to read
            log.warning("steering.unattached_read_failed", error=str(exc))
            return []
        self.unattached.count(dropped)
        return sources

    async def _follow_store(self) -> None:
        interval = self.config.egress.unattached_log_interval
        next_read = time.monotonic() + interval
        while True:
            await asyncio.sleep(STEERING_POLL)
            try:
                wanted = self.steering_config()
                if wanted != self._applied:
                    await self.apply_steering(wanted)
            except Exception:  # keep the last good table; try again on the next change
                log.exception("steering.apply_failed")
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + interval
                try:
                    self._log_unattached(await asyncio.to_thread(self._read_unattached))
                except Exception:  # never stop following the store over a log line
                    log.exception("steering.unattached_read_failed")

    def _log_unattached(self, sources: list[str]) -> None:
        due, more = self.unattached.observe(sources, time.monotonic())
        for address in due:
            log.warning(
                "steering.unattached_source",
                address=address,
                reason="a source routed to the gateway that no sandbox record holds: dropped",
                total_dropped=self.unattached.total,
            )
        if more:
            log.warning("steering.unattached_sources_not_logged", count=more, interval=self.unattached.interval)

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


def raise_fd_limit() -> None:
    """Each relayed connection holds two sockets and, while data flows, two pipes: lift the soft
    descriptor limit to the hard one (the default soft limit of 1024 caps a gateway at ~250 flows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
