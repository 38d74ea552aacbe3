"""One request's facts and its one decision record.

Every request the tunnel serves or refuses for a known tunnel is exactly one `FlowRecord` (smokescreen's
canonical decision line), built here and nowhere else: the flow log writes it as the `flow` log line and into
the sandbox's audit batches, so a refusal is never logged a second time. Its rule is `Rule.TUNNEL` with the
tunnel's first four characters (`tunnel:ab12`); its reason is `tunnel <code>` when the gateway itself refused
(a wrong password, an unreachable app) and `tunnel <status>` when the app answered. Its revision is that of the
sandbox policy in force when the request was routed: the record whose addresses and ingress rules decided it.
"""

from __future__ import annotations

from gateway.flowlog import FlowRecord, now_us
from gateway.rules import Rule
from gateway.tunnel.model import Tunnel
from gateway.tunnel.wire import ClientConnection


class Exchange:
    """One request's facts, for its flow record."""

    __slots__ = ("bytes_down", "bytes_up", "head_sent", "host", "reason", "revision", "started_us", "status", "tunnel")

    def __init__(self) -> None:
        self.tunnel: Tunnel | None = None
        self.host: str | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.status = 0
        self.reason = ""  # set only when the gateway itself refused: the refusal's code
        self.head_sent = False
        self.revision: str | None = None  # of the sandbox policy the request was decided against
        self.started_us = now_us()


def flow_record(
    conn: ClientConnection, exchange: Exchange, tunnel: Tunnel, listen: tuple[str, int], end_us: int
) -> FlowRecord:
    """The exchange's decision record; `listen` is the server's address, for a connection that has no local one."""
    allowed = not exchange.reason  # a reason is set only when the gateway itself refused
    local_addr, local_port = conn.local
    # Positional (FIELD_NAMES order): binding 17 keywords costs more than the rest of the record here.
    return FlowRecord(
        exchange.started_us,  # start_us
        end_us,  # end_us
        tunnel.sandbox,  # sandbox
        conn.remote,  # src_addr
        conn.remote_port,  # src_port
        tunnel.address,  # dst_addr
        tunnel.port,  # dst_port
        local_addr or listen[0],  # orig_dst_addr
        local_port or listen[1],  # orig_dst_port
        exchange.host,  # hostname
        "http",  # protocol
        exchange.bytes_up,  # bytes_up
        exchange.bytes_down,  # bytes_down
        (end_us - exchange.started_us) / 1000,  # duration_ms
        "allow" if allowed else "deny",  # verdict
        f"tunnel {exchange.reason or exchange.status}",  # reason
        Rule.TUNNEL.label(tunnel.id[:4]),  # rule
        revision=exchange.revision,
    )
