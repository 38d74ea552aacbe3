"""The egress engine's options: the `[egress]` section."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from msgspec import Meta

from gateway.config import LIVE, Address, Network, OptionError, Section


class EgressConfig(Section, frozen=True):
    """The transparent egress engine and the DNS interceptor, fed by nftables TPROXY."""

    listen_port: Annotated[int, Meta(ge=1, le=65535, description="The TPROXY port of TCP connections.")] = 15001
    dns_port: Annotated[int, Meta(ge=1, le=65535, description="The DNS interceptor's port.")] = 15053
    peek_timeout: Annotated[
        float,
        Meta(
            ge=0.05,
            le=120,
            description=(
                "Peeking at the first bytes (TLS ClientHello / HTTP request head): its deadline (s), counted from the "
                "handshake. From 1 s on, the kernel holds a connection that has sent nothing for the first second of "
                "it (TCP_DEFER_ACCEPT), so that a client's first bytes are there when the gateway accepts it."
            ),
            extra=LIVE,
        ),
    ] = 5.0
    peek_max_bytes: Annotated[int, Meta(ge=1024, le=1 << 20, description="How much is peeked at most.", extra=LIVE)] = (
        16384
    )
    max_peeking_per_sandbox: Annotated[
        int, Meta(ge=1, le=1_000_000, description="Connections of one sandbox that may be peeking at once.", extra=LIVE)
    ] = 64
    max_peeking_total: Annotated[
        int, Meta(ge=1, le=10_000_000, description="Connections that may be peeking at once, in total.", extra=LIVE)
    ] = 4096
    connect_timeout: Annotated[
        float, Meta(ge=0.1, le=300, description="Seconds to reach the destination.", extra=LIVE)
    ] = 10.0
    idle_timeout: Annotated[
        float, Meta(ge=1, le=86_400, description="Seconds a silent connection is kept.", extra=LIVE)
    ] = 300.0
    rate_limit_max_wait: Annotated[
        float,
        Meta(
            ge=0,
            le=300,
            description="Over connections_per_minute a new connection waits up to this long (s), then is refused.",
            extra=LIVE,
        ),
    ] = 5.0
    blocklist_path: Annotated[
        Path | None,
        Meta(
            description="Operator blocklist of addresses/CIDRs (threat feed; one per line, # comments), "
            "reloaded on change."
        ),
    ] = None
    public_ranges: Annotated[
        tuple[Network, ...],
        Meta(
            description="Special-purpose ranges (private, loopback, link-local, CGNAT, ...) are refused as "
            "destinations unless a CIDR rule allows them; ranges listed here count as public instead."
        ),
    ] = ()
    gateway_addresses: Annotated[
        tuple[Address, ...],
        Meta(description="The gateway's own addresses (refused as destinations; local addresses are refused anyway)."),
    ] = ()
    sandbox_interfaces: Annotated[
        tuple[str, ...], Meta(description="Interfaces sandboxes are attached to (nftables iifname patterns).")
    ] = ("vif*",)
    fwmark: Annotated[int, Meta(ge=1, le=0xFFFFFFFF, description="Policy routing: the TPROXY mark...")] = 1
    route_table: Annotated[int, Meta(ge=1, le=0xFFFFFFFE, description="...its routing table...")] = 100
    dial_mark: Annotated[
        int, Meta(ge=1, le=0xFFFFFFFF, description="...and the mark on upstream dials (no bit shared with fwmark).")
    ] = 2
    unattached_log_interval: Annotated[
        float,
        Meta(
            ge=1,
            le=3600,
            description="With --steer: a source that is routed to the gateway but has no sandbox record is dropped, "
            "counted (GET /v1/status, data_plane) and logged as steering.unattached_source at most once per address "
            "per this many seconds.",
        ),
    ] = 10.0
    drain_timeout: Annotated[
        float,
        Meta(
            ge=0,
            le=86_400,
            description="On SIGTERM/SIGINT: how long (s) established connections may go on while new ones are reset; "
            "what is still open then is closed (0: close at once).",
            extra=LIVE,
        ),
    ] = 30.0

    def __post_init__(self) -> None:
        if self.listen_port == self.dns_port:
            raise OptionError("dns_port", "listen_port and dns_port must differ")
        if self.fwmark & self.dial_mark:
            raise OptionError(
                "dial_mark", "dial_mark must share no bit with fwmark (dialled packets would be steered back)"
            )
