"""The data plane of `gateway run --data-plane`: the egress engine (`gateway.engine`) and its collaborators.

The engine itself (listener, peek session, plan, dial, guard, relay, record) lives in `gateway.engine`;
this module only builds it with the resolver, destination checks and DNS-learned addresses around one
policy store, and keeps the steering table in step with the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from gateway.config import Config
from gateway.destinations import Destinations, read_local_addresses
from gateway.dns.config import DnsConfig
from gateway.dns.server import DnsInterceptor
from gateway.engine.engine import EgressEngine
from gateway.errors import GatewayError
from gateway.flowlog import FlowLog
from gateway.learned import LearnedDestinations
from gateway.nft import SteeringConfig, UnattachedSources, links_from_sandboxes, render_ruleset
from gateway.ratelimit import BandwidthLimiter, ConnectionRateLimiter
from gateway.resolver import Resolver
from gateway.stores.base import PolicyStore
from gateway.workers import LearnedFanout, WorkerPool, worker_index

log = structlog.get_logger("gateway.egress")

# --------------------------------------------------------------------------- wiring for `gateway run --data-plane`

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
            DnsInterceptor(DnsConfig.from_config(config), lambda: store.state, learned=self.learned, flowlog=flowlog)
            if dns
            else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        #: The steering input last applied (or last refused: not retried until it changes).
        self._applied: SteeringConfig | None = None
        self.unattached = UnattachedSources(config.egress.unattached_log_interval)

    async def start(self) -> None:
        _raise_fd_limit()
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
        )
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
        if self.steer:
            self._tasks.append(asyncio.create_task(self._follow_store()))

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
        return waiting

    async def close(self) -> None:
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

    def status(self) -> dict[str, Any]:
        """The data plane's part of `GET /v1/status`."""
        return {
            "steering": self.steer,
            "steering_applied": self._applied is not None,
            "unattached_dropped": self.unattached.total,
            "unattached_recent": list(self.unattached.recent),
        }

    def steering_config(self) -> SteeringConfig:
        """What the table must say now, from the store: attached addresses, their workers, private links."""
        egress = self.config.egress
        subnets = self.config.sandbox_subnets
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


def _raise_fd_limit() -> None:
    """Each relayed connection holds two sockets and, while data flows, two pipes: lift the soft
    descriptor limit to the hard one (the default soft limit of 1024 caps a gateway at ~250 flows)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
