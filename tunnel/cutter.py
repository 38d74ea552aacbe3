"""Ending what a tunnel carries when the tunnel ends: every client connection serving a tunnel is registered under
it, and revocation, expiry, sandbox deletion or an ingress change close them.

Two ways in: `on_tunnel_ended`, a store listener for changes this node hears about, and `sweep`, which the
server runs every `sweep_interval` for everything else (expiry, other nodes' writes, sandbox records that no
longer permit the tunnel or its clients). A WebSocket gets a Close frame (1008) before both sides close; any
other connection is closed at once and its handler cancelled, whatever it is doing.
"""

from __future__ import annotations

import structlog

from gateway.tunnel.model import Tunnel
from gateway.tunnel.store import TunnelStore
from gateway.tunnel.wire import ClientConnection

log = structlog.get_logger("gateway.tunnel.cutter")


class Cutter:
    def __init__(self, store: TunnelStore) -> None:
        self.store = store
        self._live: dict[str, set[ClientConnection]] = {}  # client connections per tunnel they serve
        store.add_listener(self.on_tunnel_ended)

    def live_connections(self, tunnel_id: str) -> int:
        """Client connections open to the tunnel (streaming, or idle between keep-alive requests)."""
        return len(self._live.get(tunnel_id, ()))

    def attach(self, conn: ClientConnection, tunnel: Tunnel) -> None:
        if conn.tunnel_id != tunnel.id:
            self.detach(conn)
            conn.tunnel_id = tunnel.id
            self._live.setdefault(tunnel.id, set()).add(conn)

    def detach(self, conn: ClientConnection) -> None:
        if conn.tunnel_id is not None:
            conns = self._live.get(conn.tunnel_id)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._live[conn.tunnel_id]
            conn.tunnel_id = None

    def on_tunnel_ended(self, tunnel: Tunnel) -> None:
        self.cut(tunnel.id, tunnel.revoked_reason or "ended")

    def cut_all(self, reason: str) -> None:
        for tunnel_id in list(self._live):
            self.cut(tunnel_id, reason)

    def cut(self, tunnel_id: str, reason: str, only: list[ClientConnection] | None = None) -> None:
        """Close the tunnel's live connections (`only` these, when given)."""
        if only is None:
            live = self._live.pop(tunnel_id, set())
        else:
            live = set(only)
            remaining = self._live.get(tunnel_id, set())
            remaining -= live
            if not remaining:
                self._live.pop(tunnel_id, None)
        if live:
            log.info("tunnel.connections_closed", tunnel=tunnel_id[:4], count=len(live), reason=reason)
        for conn in live:
            conn.tunnel_id = None
            if conn.closer is not None:
                conn.closer()  # a Close frame (1008) to the client, then both connections close
            else:
                conn.close()  # the client sees the stream end now, whatever the handler is doing
                if conn.task is not None:
                    conn.task.cancel()

    def sweep(self, now: float) -> None:
        """Cut what the store, as it is at `now` (wall clock), no longer lets through."""
        for tunnel_id in list(self._live):
            tunnel = self.store.tunnels.get(tunnel_id)
            if tunnel is None or not self.store.alive(tunnel, now):
                self.cut(tunnel_id, "expired or revoked")
            elif (refusal := self.store.ingress_refusal(tunnel)) is not None:
                self.cut(tunnel_id, refusal.code)  # the sandbox record no longer permits it
            elif self.store.has_ingress_sources(tunnel):
                refused = [c for c in self._live[tunnel_id] if self.store.ingress_refusal(tunnel, c.remote) is not None]
                if refused:
                    self.cut(tunnel_id, "INGRESS_SOURCE_DENIED", refused)
