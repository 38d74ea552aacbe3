"""The tunnel server: HTTPS in front of sandbox ports, reached as https://<tunnel id>.<domain>/.

A lean HTTP/1.1 server on the event loop's own TLS (`gateway.tunnel.wire`: llhttp parsing, client connections,
a keep-alive pool of connections to the apps). This module is the front: every request, CONNECT and
absolute-form targets included, reaches `TunnelServer.handle`, which refuses what it does not serve. A request
is routed only on an exact, lowercased Host match `<id>.<domain>[:port]` (one Host, a numeric port) against a
tunnel that is alive and that its sandbox's ingress rules permit; then

- paths under `/.gateway/` and the password gate of protected tunnels go to `gateway.tunnel.login`
  (throttled by `gateway.tunnel.throttle`);
- WebSocket handshakes to `gateway.tunnel.websocket`, everything else to `gateway.tunnel.proxy`, which only
  ever reach the address and port recorded in the tunnel, so the service can never be used as an open proxy;
- the gateway's own answers are `gateway.tunnel.pages`.

Every client connection is registered under its tunnel with the `Cutter` (`gateway.tunnel.cutter`), which
closes them when the tunnel ends: the sweeper here runs its checks every `sweep_interval`, and also forgets
stale login state and closes idle connections. Every request for a known tunnel ends in exactly one flow
record (`gateway.tunnel.record`), the request's only log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final
from urllib.parse import unquote

import structlog

from gateway.flowlog import FlowLog, now_us
from gateway.tunnel.certs import ReloadingTLS
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.cutter import Cutter
from gateway.tunnel.http1 import InvalidHost, parse_host, simple_response
from gateway.tunnel.login import Login
from gateway.tunnel.model import ID_PATTERN, Tunnel
from gateway.tunnel.pages import GATEWAY_PREFIX, Refused, encode, refusal_page
from gateway.tunnel.proxy import AppProxy, Route
from gateway.tunnel.record import Exchange, flow_record
from gateway.tunnel.store import TunnelStore
from gateway.tunnel.throttle import LoginThrottle
from gateway.tunnel.websocket import is_websocket, relay_websocket
from gateway.tunnel.wire import ClientConnection, Request, UpstreamPool

log = structlog.get_logger("gateway.tunnel.server")

#: A client connection with no request in progress (idle, or sending its head slowly) is closed after this.
KEEPALIVE_TIMEOUT: Final = 75.0
IDLE_CHECK_INTERVAL: Final = 5.0


class TunnelServer:
    """The tunnel's HTTPS front. `clock` is the monotonic time the login throttle counts in (a test steps it)."""

    def __init__(
        self,
        store: TunnelStore,
        config: TunnelConfig,
        *,
        tls: ReloadingTLS | None = None,
        flows: FlowLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.tls = tls
        self.flows = flows
        self.login = Login(store, config, LoginThrottle.from_config(config, clock=clock))
        self.pool = UpstreamPool(config.connect_timeout)
        self.proxy = AppProxy(self.pool)
        self.cutter = Cutter(store)
        self.connections: set[ClientConnection] = set()
        #: Requests answered, by the status the client got (the app's or the gateway's own), for /metrics.
        self.answered: dict[int, int] = {}
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._last_idle_check = 0.0
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self.handle, self.connections, self.cutter.detach),
            self.config.host,
            self.config.port,
            ssl=self.tls.context if self.tls else None,
            backlog=1024,
        )
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        self._sweeper = asyncio.create_task(self._sweep(), name="tunnel-sweeper")
        log.info("tunnel.server_started", host=self.config.host, port=self.port, domain=self.config.domain)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        self.cutter.cut_all("server stopping")
        for conn in list(self.connections):
            conn.close()
        self.pool.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
        for conn in list(self.connections):
            conn.abort()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                now = time.time()
                self.cutter.sweep(now)
                self.login.prune(now)
                self._close_idle()
            except Exception:  # the sweeper must survive anything
                log.exception("tunnel.sweep_failed")

    def _close_idle(self) -> None:
        """Client connections idle (between requests, or sending a head slowly) past KEEPALIVE_TIMEOUT."""
        now = time.monotonic()
        if now - self._last_idle_check < IDLE_CHECK_INTERVAL:
            return
        self._last_idle_check = now
        for conn in [c for c in self.connections if c.current is None and now - c.idle_since > KEEPALIVE_TIMEOUT]:
            conn.close()
        self.pool.sweep(now)

    # ------------------------------------------------------------------ the request

    async def handle(self, conn: ClientConnection, request: Request) -> None:
        """Answers one request and writes its flow record."""
        exchange = Exchange()
        keep_alive = False
        try:
            try:
                keep_alive = await self._route(conn, request, exchange)
            except Refused as exc:
                exchange.status, exchange.reason = exc.status, exc.code
                if not exchange.head_sent:
                    keep_alive = not request.upgrade  # after an upgrade request, nothing more is parsed
                    page = refusal_page(request, exc, self._login_tunnel(request, exc, exchange))
                    conn.write(encode(page, request, close=not keep_alive))
        except Exception:
            log.exception("tunnel.request_failed")
            keep_alive = False
            if not exchange.head_sent:
                exchange.status, exchange.reason = 500, "INTERNAL_ERROR"
                body = b'{"code": "INTERNAL_ERROR", "message": "the gateway failed", "field": null}'
                conn.write(simple_response(500, [(b"Content-Type", b"application/json")], body, close=True))
        finally:
            self.answered[exchange.status] = self.answered.get(exchange.status, 0) + 1
            if self.flows is not None and exchange.tunnel is not None:
                listen = (self.config.host, self.config.port)
                self.flows.record(flow_record(conn, exchange, exchange.tunnel, listen, now_us()))
            conn.finish(request, keep_alive=keep_alive)

    async def _route(self, conn: ClientConnection, request: Request, exchange: Exchange) -> bool:
        """Answers the request; returns whether the client connection may stay open."""
        if request.method == b"CONNECT":
            raise Refused(405, "METHOD_NOT_ALLOWED", "CONNECT is not served: this is not a proxy", {"Allow": "GET"})
        if not request.target.startswith(b"/"):
            raise Refused(400, "ABSOLUTE_FORM_REFUSED", "only origin-form request targets (/path) are served")
        tunnel, host = self._find(request, conn)
        exchange.tunnel, exchange.host = tunnel, host
        exchange.revision = self.store.revision(tunnel)  # the record `_find` and the ingress check below read
        refusal = self.store.ingress_refusal(tunnel, conn.remote)
        if refusal is not None:  # before the login page too: a source the record refuses may not even guess
            raise Refused(refusal.status, refusal.code, refusal.message)
        self.cutter.attach(conn, tunnel)
        client = conn.remote or "?"
        path = _path(request.target)
        if path.startswith(GATEWAY_PREFIX):
            page = await self.login.gateway_path(client, request, tunnel, path)
            exchange.status, exchange.reason = page.status, page.refusal
            conn.write(encode(page, request, close=False))
            return True
        if tunnel.protected:
            await self.login.authorize(client, request, tunnel)
        if is_websocket(request):
            forwarding = self.proxy.forwarding(conn, tunnel, host)
            alive = lambda: self.store.alive(tunnel)  # noqa: E731 - asked once, after the app has answered
            return await relay_websocket(self.pool, conn, request, tunnel, host, forwarding, exchange, alive)
        return await self.proxy.http(conn, request, tunnel, host, exchange)

    def _find(self, request: Request, conn: ClientConnection) -> tuple[Tunnel, str]:
        """The live tunnel the request's Host names, and that Host normalised (`name[:port]`)."""
        raw = request.fields.get(b"host")
        memo = conn.memo
        if isinstance(memo, Route) and memo.raw_host == raw and self.store.tunnels.get(memo.tunnel.id) is memo.tunnel:
            tunnel, host = memo.tunnel, memo.host  # the same Host as the last request on this connection
        else:
            try:
                name, port = parse_host(raw)
            except InvalidHost as exc:
                raise Refused(400, "INVALID_HOST", str(exc)) from None
            host = name if port is None else f"{name}:{port}"
            suffix = "." + self.config.domain
            label = name[: -len(suffix)] if name.endswith(suffix) else ""
            found = self.store.tunnels.get(label) if ID_PATTERN.fullmatch(label) else None
            if found is None:
                raise Refused(404, "TUNNEL_NOT_FOUND", "there is no preview at this address")
            tunnel = found
            conn.memo = Route(raw, tunnel, host, self.proxy.forwarding(conn, tunnel, host))
        if not self.store.alive(tunnel):
            raise Refused(410, "TUNNEL_GONE", "this preview has ended (expired, revoked, or its sandbox is gone)")
        return tunnel, host

    def _login_tunnel(self, request: Request, exc: Refused, exchange: Exchange) -> Tunnel | None:
        """The tunnel whose login form answers a browser's request for a password (it is still alive), or None."""
        if exc.code != "PASSWORD_REQUIRED" or request.method not in (b"GET", b"HEAD") or exchange.tunnel is None:
            return None
        tunnel = self.store.tunnels.get(exchange.tunnel.id)
        return tunnel if tunnel is not None and self.store.alive(tunnel) else None


def _path(target: bytes) -> str:
    """The request target's path, percent-decoded (the query string left out)."""
    path = target.split(b"?", 1)[0].decode("latin-1")
    return unquote(path) if "%" in path else path
