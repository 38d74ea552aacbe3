"""The tunnel server: HTTPS in front of sandbox ports, reached as https://<tunnel id>.<domain>/.

A lean HTTP/1.1 server on the event loop's own TLS (`gateway.tunnel.wire`: llhttp parsing, a keep-alive
pool of connections to the apps, bodies relayed chunk by chunk in the callbacks that receive them, with
backpressure both ways). Every request, CONNECT and absolute-form targets included, reaches `_handle`,
which refuses what it does not serve. A request is routed only on an exact, lowercased Host match
`<id>.<domain>[:port]` (one Host, a numeric port) against a tunnel that is alive and that its sandbox's
ingress rules permit; the upstream is only ever the address and port recorded in that tunnel, so the
service can never be used as an open proxy.

Password-protected tunnels: browsers get a login form and then a server-side session in a
host-only `__Host-` cookie (Secure, HttpOnly, SameSite=Lax); tools send HTTP Basic (any
user name). Password attempts are counted before they are checked and throttled per client
address (exponential backoff) and per tunnel (a token bucket that never locks anyone out for
long); the gateway's cookie and Basic credentials never reach the sandbox, and the app cannot
set the gateway's cookie.

WebSockets: the handshake (after an Origin check) goes to the app as the client made it, and after the
app's 101 the two streams are relayed byte for byte; the gateway follows frame boundaries from the app
so that it can end the stream with a Close frame of its own.

Every proxied exchange is registered under its tunnel; revocation, expiry and sandbox
deletion close them (a store listener for changes this node hears about, and a sweeper
that checks every `sweep_interval` for everything else: expiry, other nodes, deletions).
Login sessions live in the tunnel store (under the hash of their token), so every node
honours them, they survive a restart, and they end with their tunnel or at logout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import html
import ipaddress
import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, quote, unquote

import structlog

from gateway.flowlog import FlowLog, FlowRecord, now_us
from gateway.settings import Config
from gateway.stores.base import PolicyStore
from gateway.tunnel.certs import ReloadingTLS
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.http1 import (
    LAST_CHUNK,
    Forwarding,
    FrameBoundary,
    InvalidHost,
    ResponseFraming,
    chunk,
    client_response_head,
    close_frame,
    connection_tokens,
    cookie_value,
    parse_host,
    response_framing,
    simple_response,
    upstream_request_head,
)
from gateway.tunnel.model import ID_PATTERN, Tunnel, peer_address, verify_password
from gateway.tunnel.store import TunnelStore, open_tunnel_store
from gateway.tunnel.wire import (
    ClientConnection,
    Request,
    RequestBody,
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamInvalid,
    UpstreamPool,
    UpstreamUnavailable,
)

log = structlog.get_logger("gateway.tunnel.server")

COOKIE: Final = "__Host-gw-tunnel"
COOKIE_BYTES: Final = COOKIE.encode()
#: Every cookie name the gateway uses (lowercased): never sent to the app, never set by the app.
GATEWAY_COOKIES: Final = frozenset({COOKIE_BYTES.lower()})
GATEWAY_PREFIX: Final = "/.gateway/"
LOGIN_PATH: Final = "/.gateway/login"
LOGOUT_PATH: Final = "/.gateway/logout"
MAX_FORM_BYTES: Final = 8192
BASIC_CACHE_TTL: Final = 60.0  # a tool's repeated Basic requests cost one scrypt per minute, not one each
BASIC_CACHE_MAX: Final = 10_000
MAX_THROTTLE_ENTRIES: Final = 100_000
MAX_CONCURRENT_HASHES: Final = 2
#: Close code sent to WebSocket clients when the tunnel ends (1008: policy violation, RFC 6455).
WS_CLOSE_REVOKED: Final = 1008
#: A client connection with no request in progress (idle, or sending its head slowly) is closed after this.
KEEPALIVE_TIMEOUT: Final = 75.0
IDLE_CHECK_INTERVAL: Final = 5.0


# --------------------------------------------------------------------------- throttling


@dataclass(slots=True)
class _Attempts:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


def client_key(address: str) -> str:
    """Whose attempts these are: the address, or its /64 for IPv6 (one host commonly holds a whole /64)."""
    ip = peer_address(address)
    if ip is None:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginThrottle:
    """Password attempts, counted when they start (before the ~50 ms hash), so attempts still being checked
    count too and a burst sent at once gets no more checks than one sent in turn.

    * Per client (address, or IPv6 /64) and tunnel: `free` attempts, then each further one locks that client
      out of that tunnel for 1, 2, 4, ... seconds (at most `max_backoff`); a success clears it, and attempts
      are forgotten `window` seconds after the last one.
    * Per tunnel, all clients together: a token bucket of `tunnel_burst` attempts refilled at `tunnel_rate`
      a second bounds the guesses from many addresses. When it is empty the wait is under 1 / `tunnel_rate`
      seconds; but while many addresses keep taking every token as it comes back, a client new to the tunnel
      may keep getting that answer. A client (address, or /64) that signed in to the tunnel within `window`
      is not held by the bucket, so such a flood never keeps out those who have signed in before.
    """

    def __init__(self, free: int, window: float, max_backoff: float, tunnel_rate: float, tunnel_burst: int) -> None:
        self.free = free
        self.window = window
        self.max_backoff = max_backoff
        self.tunnel_rate = tunnel_rate
        self.tunnel_burst = tunnel_burst
        self._clients: dict[tuple[str, str], _Attempts] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._signed_in: dict[tuple[str, str], float] = {}  # (tunnel, client key) -> when it last signed in

    def admit(self, tunnel_id: str, client: str, now: float | None = None) -> float:
        """0.0: the attempt may be checked now, and is counted already; otherwise the seconds to wait."""
        now = time.monotonic() if now is None else now
        key = (tunnel_id, client_key(client))
        entry = self._clients.get(key)
        if entry is not None and now < entry.locked_until:
            return entry.locked_until - now
        signed_in = self._signed_in.get(key)
        if signed_in is None or now - signed_in > self.window:
            wait = self._take_token(tunnel_id, now)
            if wait > 0:
                return wait
        if entry is None or now - entry.last > self.window:
            if entry is None and len(self._clients) >= MAX_THROTTLE_ENTRIES:
                self.prune(now)
            entry = self._clients[key] = _Attempts()
        entry.count += 1
        entry.last = now
        if entry.count >= self.free:
            entry.locked_until = now + min(self.max_backoff, 2.0 ** (entry.count - self.free))
        return 0.0

    def _take_token(self, tunnel_id: str, now: float) -> float:
        """0.0: a token of the tunnel's bucket is taken; otherwise the seconds until there is one."""
        bucket = self._buckets.get(tunnel_id)
        if bucket is None:
            if len(self._buckets) >= MAX_THROTTLE_ENTRIES:
                self.prune(now)
            bucket = self._buckets[tunnel_id] = _Bucket(float(self.tunnel_burst), now)
        else:
            bucket.tokens = min(float(self.tunnel_burst), bucket.tokens + (now - bucket.at) * self.tunnel_rate)
            bucket.at = now
        if bucket.tokens < 1.0:
            return (1.0 - bucket.tokens) / self.tunnel_rate
        bucket.tokens -= 1.0
        return 0.0

    def success(self, tunnel_id: str, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = (tunnel_id, client_key(client))
        self._clients.pop(key, None)
        if key not in self._signed_in and len(self._signed_in) >= MAX_THROTTLE_ENTRIES:
            self.prune(now)
            if len(self._signed_in) >= MAX_THROTTLE_ENTRIES:
                return  # remembered as signed in is a privilege: never at the cost of unbounded memory
        self._signed_in[key] = now

    def prune(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        stale = [k for k, e in self._clients.items() if now - e.last > self.window and now > e.locked_until]
        for key in stale:
            del self._clients[key]
        for key in [k for k, at in self._signed_in.items() if now - at > self.window]:
            del self._signed_in[key]
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.tunnel_rate >= self.tunnel_burst]
        for tunnel_id in full:  # a full bucket is the same as none
            del self._buckets[tunnel_id]


# --------------------------------------------------------------------------- pages


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="robots" content="noindex"><title>{html.escape(title)}</title>
<style>
body{{font:16px/1.5 system-ui,sans-serif;background:#f4f5f7;color:#1d2330;display:flex;min-height:100vh;
margin:0;align-items:center;justify-content:center}}
main{{background:#fff;padding:2rem 2.25rem;border-radius:10px;box-shadow:0 2px 12px #0002;width:min(24rem,90vw)}}
h1{{font-size:1.25rem;margin:0 0 .75rem}} p{{margin:.5rem 0}} .muted{{color:#667085;font-size:.875rem}}
label{{display:block;margin:1rem 0 .25rem;font-weight:600}}
input[type=password]{{width:100%;box-sizing:border-box;padding:.6rem;border:1px solid #c5cad3;border-radius:6px;
font-size:1rem}}
button{{margin-top:1rem;width:100%;padding:.65rem;border:0;border-radius:6px;background:#2f5bea;color:#fff;
font-size:1rem;cursor:pointer}}
.error{{background:#fdecec;color:#a61b1b;padding:.5rem .75rem;border-radius:6px}}
</style></head><body><main>{body}</main></body></html>
"""


def login_page(label: str, next_path: str, error: str | None) -> str:
    error_html = f'<p class="error" role="alert" id="error">{html.escape(error)}</p>' if error else ""
    return _page(
        f"{label} - sign in",
        f"""<h1>{html.escape(label)}</h1>
<p class="muted">This preview is password protected.</p>{error_html}
<form method="post" action="{LOGIN_PATH}">
<input type="hidden" name="next" value="{html.escape(next_path)}">
<label for="password">Password</label>
<input type="password" id="password" name="password" autocomplete="current-password" required autofocus>
<button type="submit">Continue</button>
</form>""",
    )


ERROR_TITLES: Final = {
    400: "Bad request",
    401: "Sign-in required",
    403: "Forbidden",
    404: "No such preview",
    405: "Method not allowed",
    410: "This preview has ended",
    429: "Too many attempts",
    502: "The app is not answering",
}


# --------------------------------------------------------------------------- server


class _Exchange:
    """One request's facts, for its flow record."""

    __slots__ = ("bytes_down", "bytes_up", "head_sent", "host", "reason", "started_us", "status", "tunnel")

    def __init__(self) -> None:
        self.tunnel: Tunnel | None = None
        self.host: str | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.status = 0
        self.reason = ""  # set only when the gateway itself refused
        self.head_sent = False
        self.started_us = now_us()


@dataclass(slots=True)
class _Route:
    """What the last request's Host on a connection led to (keep-alive requests mostly repeat it)."""

    raw_host: bytes | None
    tunnel: Tunnel
    host: str
    forwarding: Forwarding


@dataclass(frozen=True, slots=True)
class _Page:
    """A complete answer the gateway gives itself."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _Refused(Exception):
    """An answer the gateway gives itself (404/410/502...), in HTML for browsers and JSON for the rest."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class TunnelServer:
    def __init__(
        self,
        store: TunnelStore,
        config: TunnelConfig,
        *,
        tls: ReloadingTLS | None = None,
        flows: FlowLog | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.tls = tls
        self.flows = flows
        self.throttle = LoginThrottle(
            config.login_free_failures,
            config.login_window,
            config.login_max_backoff,
            config.login_tunnel_rate,
            config.login_tunnel_burst,
        )
        #: Password hashes (16 MiB and ~50 ms of CPU each) running at once, for all tunnels together: guesses
        #: never hold every worker thread, so other tunnels' logins and tunnel creation keep going.
        self._hashing = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
        self.pool = UpstreamPool(config.connect_timeout)
        self.connections: set[ClientConnection] = set()
        self._basic_ok: dict[bytes, float] = {}
        self._live: dict[str, set[ClientConnection]] = {}  # client connections per tunnel they serve
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._last_idle_check = 0.0
        self.port: int | None = None
        store.add_listener(self._on_tunnel_ended)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self._handle, self.connections, self._detach),
            self.config.host,
            self.config.port,
            ssl=self.tls.context if self.tls else None,
            backlog=1024,
        )
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        self._sweeper = asyncio.create_task(self._sweep(), name="tunnel-sweeper")
        log.info("tunnel_server_started", host=self.config.host, port=self.port, domain=self.config.domain)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for tunnel_id in list(self._live):
            self._kill(tunnel_id, "server stopping")
        for conn in list(self.connections):
            conn.close()
        self.pool.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
        for conn in list(self.connections):
            conn.abort()

    def live_connections(self, tunnel_id: str) -> int:
        """Client connections open to the tunnel (streaming, or idle between keep-alive requests)."""
        return len(self._live.get(tunnel_id, ()))

    def _attach(self, conn: ClientConnection, tunnel: Tunnel) -> None:
        if conn.tunnel_id != tunnel.id:
            self._detach(conn)
            conn.tunnel_id = tunnel.id
            self._live.setdefault(tunnel.id, set()).add(conn)

    def _detach(self, conn: ClientConnection) -> None:
        if conn.tunnel_id is not None:
            conns = self._live.get(conn.tunnel_id)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._live[conn.tunnel_id]
            conn.tunnel_id = None

    # ------------------------------------------------------------------ ending tunnels

    def _on_tunnel_ended(self, tunnel: Tunnel) -> None:
        self._kill(tunnel.id, tunnel.revoked_reason or "ended")

    def _kill(self, tunnel_id: str, reason: str, only: list[ClientConnection] | None = None) -> None:
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
            log.info("tunnel_connections_closed", tunnel=tunnel_id[:4], count=len(live), reason=reason)
        for conn in live:
            conn.tunnel_id = None
            if conn.closer is not None:
                conn.closer()  # a Close frame (1008) to the client, then both connections close
            else:
                conn.close()  # the client sees the stream end now, whatever the handler is doing
                if conn.task is not None:
                    conn.task.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                now = time.time()
                for tunnel_id in list(self._live):
                    tunnel = self.store.tunnels.get(tunnel_id)
                    if tunnel is None or not self.store.alive(tunnel, now):
                        self._kill(tunnel_id, "expired or revoked")
                    elif (refusal := self.store.ingress_refusal(tunnel)) is not None:
                        self._kill(tunnel_id, refusal.code)  # the sandbox record no longer permits it
                    elif self.store.has_ingress_sources(tunnel):
                        refused = [
                            c for c in self._live[tunnel_id] if self.store.ingress_refusal(tunnel, c.remote) is not None
                        ]
                        if refused:
                            self._kill(tunnel_id, "INGRESS_SOURCE_DENIED", refused)
                for key in [k for k, exp in self._basic_ok.items() if exp <= now]:
                    del self._basic_ok[key]
                self.throttle.prune()
                self._close_idle()
            except Exception:  # the sweeper must survive anything
                log.exception("tunnel_sweep_failed")

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

    async def _handle(self, conn: ClientConnection, request: Request) -> None:
        exchange = _Exchange()
        keep_alive = False
        try:
            try:
                keep_alive = await self._route(conn, request, exchange)
            except _Refused as exc:
                exchange.status, exchange.reason = exc.status, exc.code
                if not exchange.head_sent:
                    keep_alive = not request.upgrade  # after an upgrade request, nothing more is parsed
                    page = self._refusal(request, exc)
                    conn.write(_encode(page, request, close=not keep_alive))
        except Exception:
            log.exception("tunnel_request_failed")
            keep_alive = False
            if not exchange.head_sent:
                exchange.status, exchange.reason = 500, "INTERNAL_ERROR"
                body = b'{"code": "INTERNAL_ERROR", "message": "the gateway failed", "field": null}'
                conn.write(simple_response(500, [(b"Content-Type", b"application/json")], body, close=True))
        finally:
            self._record(conn, exchange)
            conn.finish(request, keep_alive=keep_alive)

    async def _route(self, conn: ClientConnection, request: Request, exchange: _Exchange) -> bool:
        """Answers the request; returns whether the client connection may stay open."""
        if request.method == b"CONNECT":
            raise _Refused(405, "METHOD_NOT_ALLOWED", "CONNECT is not served: this is not a proxy", {"Allow": "GET"})
        if not request.target.startswith(b"/"):
            raise _Refused(400, "ABSOLUTE_FORM_REFUSED", "only origin-form request targets (/path) are served")
        tunnel, host = self._find(request, conn)
        exchange.tunnel, exchange.host = tunnel, host
        refusal = self.store.ingress_refusal(tunnel, conn.remote)
        if refusal is not None:  # before the login page too: a source the record refuses may not even guess
            raise _Refused(refusal.status, refusal.code, refusal.message)
        self._attach(conn, tunnel)
        path = _path(request.target)
        if path.startswith(GATEWAY_PREFIX):
            page = await self._gateway_path(conn, request, tunnel, path)
            exchange.status = page.status
            conn.write(_encode(page, request, close=False))
            return True
        if tunnel.protected:
            await self._authorize(conn, request, tunnel)
        if _is_websocket(request):
            return await self._proxy_ws(conn, request, tunnel, host, exchange)
        return await self._proxy_http(conn, request, tunnel, host, exchange)

    def _find(self, request: Request, conn: ClientConnection | None = None) -> tuple[Tunnel, str]:
        """The live tunnel the request's Host names, and that Host normalised (`name[:port]`)."""
        raw = request.fields.get(b"host")
        memo = conn.memo if conn is not None else None
        if isinstance(memo, _Route) and memo.raw_host == raw and self.store.tunnels.get(memo.tunnel.id) is memo.tunnel:
            tunnel, host = memo.tunnel, memo.host  # the same Host as the last request on this connection
        else:
            try:
                name, port = parse_host(raw)
            except InvalidHost as exc:
                raise _Refused(400, "INVALID_HOST", str(exc)) from None
            host = name if port is None else f"{name}:{port}"
            suffix = "." + self.config.domain
            label = name[: -len(suffix)] if name.endswith(suffix) else ""
            found = self.store.tunnels.get(label) if ID_PATTERN.fullmatch(label) else None
            if found is None:
                raise _Refused(404, "TUNNEL_NOT_FOUND", "there is no preview at this address")
            tunnel = found
            if conn is not None:
                conn.memo = _Route(raw, tunnel, host, self._forwarding(conn, tunnel, host))
        if not self.store.alive(tunnel):
            raise _Refused(410, "TUNNEL_GONE", "this preview has ended (expired, revoked, or its sandbox is gone)")
        return tunnel, host

    # ------------------------------------------------------------------ authentication

    @staticmethod
    def _client_address(conn: ClientConnection) -> str:
        return conn.remote or "?"

    async def _has_session(self, request: Request, tunnel: Tunnel) -> bool:
        token = _session_token(request)
        # Tokens are token_urlsafe(32): anything else is not worth a store lookup.
        if not token or len(token) > 64:
            return False
        return await self.store.find_session(token, tunnel.id)

    async def _check_password(self, conn: ClientConnection, tunnel: Tunnel, password: str) -> bool:
        """Throttled, constant-time (scrypt + compare_digest) password check; raises 429 while throttled."""
        client = self._client_address(conn)
        wait = self.throttle.admit(tunnel.id, client)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise _Refused(
                429,
                "TOO_MANY_ATTEMPTS",
                f"too many password attempts; try again in {seconds} s",
                {"Retry-After": str(seconds)},
            )
        assert tunnel.password_hash is not None
        async with self._hashing:  # admitted attempts wait their turn here: counted already, never refused
            ok = await asyncio.to_thread(verify_password, password, tunnel.password_hash)
        if ok:
            self.throttle.success(tunnel.id, client)
        else:
            log.info("tunnel_login_failed", tunnel=tunnel.id[:4], client=client)  # never the password
        return ok

    async def _authorize(self, conn: ClientConnection, request: Request, tunnel: Tunnel) -> None:
        if await self._has_session(request, tunnel):
            return
        authorization = request.header(b"authorization")
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                password = None
            if password is not None:
                cache_key = hashlib.sha256(f"{tunnel.id}\0{tunnel.password_hash}\0{password}".encode()).digest()
                if self._basic_ok.get(cache_key, 0.0) > time.time():
                    return
                if await self._check_password(conn, tunnel, password):
                    if len(self._basic_ok) < BASIC_CACHE_MAX:
                        self._basic_ok[cache_key] = time.time() + BASIC_CACHE_TTL
                    return
            raise _Refused(401, "WRONG_PASSWORD", "wrong password", {"WWW-Authenticate": _basic_challenge(tunnel)})
        raise _Refused(
            401, "PASSWORD_REQUIRED", "this preview needs a password", {"WWW-Authenticate": _basic_challenge(tunnel)}
        )

    async def _gateway_path(self, conn: ClientConnection, request: Request, tunnel: Tunnel, path: str) -> _Page:
        if path == LOGIN_PATH and tunnel.protected:
            if request.method in (b"GET", b"HEAD"):
                return self._login_response(tunnel, _safe_next(_query_value(request.target, "next") or "/"), None, 200)
            if request.method == b"POST":
                _own_page_only(request, "sign-in")  # else any page could spend its visitors' attempts here
                return await self._login(conn, request, tunnel)
            raise _Refused(405, "METHOD_NOT_ALLOWED", "use GET or POST", {"Allow": "GET, POST"})
        if path == LOGOUT_PATH:
            # Another tunnel is the same site (the browser sends the session along): its page must not end this
            # tunnel's session, nor may any other site's.
            _own_page_only(request, "logout")
            token = _session_token(request)
            if token and len(token) <= 64:
                await self.store.end_session(token)
            headers = [(b"Set-Cookie", _clear_cookie())]
            if tunnel.protected:
                return _see_other("/", headers)
            return _Page(204, headers, b"")
        raise _Refused(404, "NOT_FOUND", f"{GATEWAY_PREFIX} is reserved for the gateway")

    async def _login(self, conn: ClientConnection, request: Request, tunnel: Tunnel) -> _Page:
        length = request.content_length
        if length is not None and (not length.strip().isdigit() or int(length) > MAX_FORM_BYTES):
            raise _Refused(413, "BODY_TOO_LARGE", "the form is too large")
        raw = await request.body.read(MAX_FORM_BYTES) if request.body is not None else b""
        if len(raw) > MAX_FORM_BYTES:
            raise _Refused(413, "BODY_TOO_LARGE", "the form is too large")
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        password = (form.get("password") or [""])[0]
        next_path = _safe_next((form.get("next") or ["/"])[0])
        try:
            ok = await self._check_password(conn, tunnel, password)
        except _Refused as exc:
            if exc.status != 429:
                raise
            return self._login_response(tunnel, next_path, exc.message, 429, exc.headers)
        if not ok:
            return self._login_response(tunnel, next_path, "Wrong password. Please try again.", 401)
        lifetime = max(1.0, min(self.config.session_ttl, tunnel.expires_at - time.time()))
        token = await self.store.create_session(tunnel.id, lifetime)  # fresh on every login: no fixation
        # Host-only (no Domain), Path=/ and Secure: what the __Host- prefix requires, so no other tunnel
        # under the same domain can set or read it.
        cookie = f"{COOKIE}={token}; HttpOnly; Max-Age={int(lifetime)}; Path=/; SameSite=Lax; Secure"
        return _see_other(next_path, [(b"Set-Cookie", cookie.encode())])

    def _login_response(
        self, tunnel: Tunnel, next_path: str, error: str | None, status: int, headers: dict[str, str] | None = None
    ) -> _Page:
        label = tunnel.label or f"Preview of port {tunnel.port}"
        fields = {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
            "frame-ancestors 'none'",
            **(headers or {}),
        }
        return _Page(status, _header_list(fields), login_page(label, next_path, error).encode())

    def _refusal(self, request: Request, exc: _Refused) -> _Page:
        headers = {"Cache-Control": "no-store", **exc.headers}
        if _wants_html(request):
            tunnel_for_login = None
            if exc.code == "PASSWORD_REQUIRED" and request.method in (b"GET", b"HEAD"):
                with contextlib.suppress(_Refused):
                    tunnel_for_login = self._find(request)[0]
            if tunnel_for_login is not None:
                next_path = _safe_next(request.target.decode("latin-1"))
                headers.pop("WWW-Authenticate", None)  # a browser would show its own dialog over the form
                return self._login_response(tunnel_for_login, next_path, None, 401, headers)
            title = ERROR_TITLES.get(exc.status, "Error")
            sentence = exc.message[:1].upper() + exc.message[1:]
            body = f"<h1>{html.escape(title)}</h1><p>{html.escape(sentence)}.</p>"
            body += f'<p class="muted">{exc.status} · {html.escape(exc.code)}</p>'
            headers["Content-Type"] = "text/html; charset=utf-8"
            return _Page(exc.status, _header_list(headers), _page(title, body).encode())
        headers["Content-Type"] = "application/json; charset=utf-8"
        body = json.dumps({"code": exc.code, "message": exc.message, "field": None}).encode()
        return _Page(exc.status, _header_list(headers), body)

    # ------------------------------------------------------------------ proxying

    def _forwarding(self, conn: ClientConnection, tunnel: Tunnel, host: str) -> Forwarding:
        memo = conn.memo
        if isinstance(memo, _Route) and memo.tunnel is tunnel and memo.host == host:
            return memo.forwarding
        upstream_host = f"localhost:{tunnel.port}" if tunnel.rewrite_host else host
        return Forwarding(
            host=upstream_host.encode("latin-1"),
            forwarded_host=host.encode("latin-1"),
            forwarded_for=self._client_address(conn).encode(),
            strip_cookies=GATEWAY_COOKIES,
            strip_basic=tunnel.protected,
        )

    async def _open_exchange(
        self, conn: ClientConnection, request: Request, tunnel: Tunnel, head: bytes, exchange: _Exchange
    ) -> tuple[UpstreamConnection, ResponseHead]:
        """Send the request (head now, body as it arrives) on a pooled connection and wait for the answer's head.
        A reused connection the app closed meanwhile is retried once on a new one, when no body was sent."""
        body = request.body
        for attempt in (0, 1):
            try:
                upstream = (self.pool.take_idle(tunnel.address, tunnel.port) if attempt == 0 else None) or (
                    await self.pool.connect(tunnel.address, tunnel.port)
                )
            except UpstreamUnavailable:
                raise _Refused(
                    502, "UPSTREAM_UNAVAILABLE", f"nothing answers on port {tunnel.port} in the sandbox"
                ) from None
            conn.peer = upstream
            upstream.start(head, head_request=request.method == b"HEAD")
            if body is not None:
                _stream_body(conn, body, upstream, chunked=request.chunked)
            try:
                answer = await upstream.response_head()
                if answer.status == 101:  # switching protocols without being asked to
                    raise UpstreamInvalid("an upgrade nobody asked for")
                return upstream, answer
            except UpstreamUnavailable as exc:
                upstream.close()
                if attempt == 0 and upstream.reused and body is None and not conn.closed:
                    continue  # the app closed an idle keep-alive connection just as it was reused
                log.info("tunnel_upstream_unavailable", tunnel=tunnel.id[:4], error=str(exc))
                raise _Refused(
                    502, "UPSTREAM_UNAVAILABLE", f"nothing answers on port {tunnel.port} in the sandbox"
                ) from None
            except UpstreamError as exc:  # the app answered something that is not HTTP
                upstream.close()
                log.info("tunnel_upstream_failed", tunnel=tunnel.id[:4], error=str(exc))
                raise _Refused(502, "UPSTREAM_ERROR", f"the app on port {tunnel.port} gave no valid answer") from None
        raise AssertionError("unreachable")

    async def _proxy_http(
        self, conn: ClientConnection, request: Request, tunnel: Tunnel, host: str, exchange: _Exchange
    ) -> bool:
        body = request.body
        head = upstream_request_head(
            request.method,
            request.target,
            request.headers,
            self._forwarding(conn, tunnel, host),
            content_length=request.content_length,
            chunked=request.chunked,
            websocket=False,
            fields=request.fields,
        )
        if body is not None and request.http11 and request.fields.get(b"expect", b"").lower() == b"100-continue":
            # Answered here (the app never sees Expect), so uploads from curl and the like start at once.
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        upstream: UpstreamConnection | None = None
        try:
            upstream, answer = await self._open_exchange(conn, request, tunnel, head, exchange)
            if body is not None:
                # Never pooled after a body: an app server that answers without reading all of it (early, or
                # not at all, as naive servers do) takes the rest for the start of the next request on this
                # connection, and the client's bytes would then prefix another client's request.
                upstream.reusable = False
            framing = response_framing(
                answer.status,
                answer.fields,
                head_request=request.method == b"HEAD",
                client_keep_alive=request.keep_alive,
                client_http11=request.http11,
            )
            exchange.status = answer.status
            out = client_response_head(
                answer.status,
                answer.reason,
                answer.headers,
                framing,
                fields=answer.fields,
                gateway_cookies=GATEWAY_COOKIES,
            )
            exchange.head_sent = True
            if framing.has_body:
                # What came with the head goes out with the head: one TLS record for a small response.
                held = upstream.take_held()
                if held:
                    out += chunk(held) if framing.chunk_to_client else held
                if not upstream.complete:
                    conn.write(out)
                    out = b""
                    conn.producer = upstream  # the client not taking more pauses reading from the app
                    if framing.chunk_to_client:
                        upstream.attach(lambda data: conn.write(chunk(data)))
                    else:
                        upstream.attach(conn.write)
                    try:
                        await upstream.wait_done()  # the body streams meanwhile, chunk by chunk, as it arrives
                    except UpstreamError as exc:
                        # The head is already sent: the only honest signal left is to cut the connection.
                        log.info("tunnel_stream_aborted", tunnel=tunnel.id[:4], error=str(exc))
                        conn.close()
                        return False
                if framing.chunk_to_client:
                    out += LAST_CHUNK
            if out:
                conn.write(out)
            exchange.bytes_down = upstream.body_bytes
            self.pool.release(upstream)
            upstream = None
            return not framing.close_client
        finally:
            conn.peer = conn.producer = None
            if body is not None:
                exchange.bytes_up = body.received
            if upstream is not None:
                exchange.bytes_down = upstream.body_bytes
                upstream.close()

    async def _proxy_ws(
        self, conn: ClientConnection, request: Request, tunnel: Tunnel, host: str, exchange: _Exchange
    ) -> bool:
        """The WebSocket handshake goes to the app as the client made it; on its 101 the two streams are relayed
        byte for byte (the app and the client negotiate subprotocols and extensions between themselves)."""
        origin = request.fields.get(b"origin")
        # Another site's page must not drive the app with the visitor's session (cross-site WebSocket hijacking).
        if origin is not None and origin.decode("latin-1").lower() != f"https://{host}":
            raise _Refused(403, "ORIGIN_NOT_ALLOWED", "WebSocket connections are only accepted from this preview")
        head = upstream_request_head(
            request.method,
            request.target,
            request.headers,
            self._forwarding(conn, tunnel, host),
            content_length=None,
            chunked=False,
            websocket=True,
        )
        upstream: UpstreamConnection | None = None
        try:
            try:
                upstream = await self.pool.connect(tunnel.address, tunnel.port)  # never pooled: it becomes the stream
            except UpstreamUnavailable:
                raise _Refused(
                    502, "UPSTREAM_UNAVAILABLE", f"nothing answers on port {tunnel.port} in the sandbox"
                ) from None
            conn.peer = upstream
            upstream.start(head, head_request=False)
            try:
                answer = await upstream.response_head()
            except UpstreamError:
                raise _Refused(502, "UPSTREAM_UNAVAILABLE", f"the app on port {tunnel.port} did not answer") from None
            if answer.status != 101 or not upstream.upgraded:
                raise _Refused(502, "UPSTREAM_WEBSOCKET_REFUSED", f"the app refused the WebSocket ({answer.status})")
            no_body = ResponseFraming(False, None, False, False, False)
            upgrade = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
            head = client_response_head(
                101, answer.reason, answer.headers, no_body, extra=upgrade, gateway_cookies=GATEWAY_COOKIES
            )
            conn.write(head)
            exchange.status = 101
            exchange.head_sent = True
            conn.closer = closer = _relay_upgraded(conn, upstream, exchange)
            if not self.store.alive(tunnel):  # revoked while we were connecting
                closer()
            await upstream.wait_closed()
            return False
        finally:
            conn.peer = conn.producer = conn.raw_sink = conn.closer = None
            if upstream is not None:
                exchange.bytes_down = upstream.body_bytes
                upstream.close()

    # ------------------------------------------------------------------ flow records

    def _record(self, conn: ClientConnection, exchange: _Exchange) -> None:
        if self.flows is None or exchange.tunnel is None:
            return
        tunnel = exchange.tunnel
        end = now_us()
        allowed = not exchange.reason  # a reason is set only when the gateway itself refused
        local_addr, local_port = conn.local
        # Positional (FIELD_NAMES order): binding 17 keywords costs more than the rest of the record here.
        self.flows.record(
            FlowRecord(
                exchange.started_us,  # start_us
                end,  # end_us
                tunnel.sandbox,  # sandbox
                conn.remote,  # src_addr
                conn.remote_port,  # src_port
                tunnel.address,  # dst_addr
                tunnel.port,  # dst_port
                local_addr or self.config.host,  # orig_dst_addr
                local_port or self.config.port,  # orig_dst_port
                exchange.host,  # hostname
                "http",  # protocol
                exchange.bytes_up,  # bytes_up
                exchange.bytes_down,  # bytes_down
                (end - exchange.started_us) / 1000,  # duration_ms
                "allow" if allowed else "deny",  # verdict
                f"tunnel {exchange.reason or exchange.status}",  # reason
                f"tunnel:{tunnel.id[:4]}",  # rule
            )
        )


def _stream_body(conn: ClientConnection, body: RequestBody, upstream: UpstreamConnection, *, chunked: bool) -> None:
    """The request body to the app as it arrives (re-chunked when the client chunked it), with backpressure."""
    upstream.producer = conn  # the app not taking more pauses reading from the client
    if chunked:
        body.attach(lambda data: upstream.write(chunk(data)), lambda: upstream.write(LAST_CHUNK))
    else:
        body.attach(upstream.write, _nothing)


def _relay_upgraded(conn: ClientConnection, upstream: UpstreamConnection, exchange: _Exchange) -> Callable[[], None]:
    """Relay an upgraded stream both ways; returns what ends it with a Close frame (code 1008) to the client."""
    frames = FrameBoundary()

    def to_app(data: bytes) -> None:
        exchange.bytes_up += len(data)
        upstream.write(data)

    def to_client(data: bytes) -> None:
        frames.feed(data)
        conn.write(data)

    def close() -> None:
        if frames.at_boundary:  # never inside a frame: the client would see garbage instead of a Close
            conn.write(close_frame(WS_CLOSE_REVOKED, b"tunnel ended"))
        conn.close()
        upstream.close()

    conn.producer, upstream.producer = upstream, conn
    conn.raw_sink = to_app
    tail, conn.upgrade_tail = conn.upgrade_tail, b""
    if tail:
        to_app(tail)
    conn.set_paused("upgrade", False)
    upstream.attach(to_client)
    return close


#: Sec-Fetch-Site values of a request made by the tunnel's own pages or by the user (typed, bookmarked). A
#: client that sends none (a tool, an old browser) is taken as the user's.
_OWN_PAGE: Final = frozenset({b"same-origin", b"none"})


def _own_page_only(request: Request, what: str) -> None:
    if request.fields.get(b"sec-fetch-site", b"same-origin") not in _OWN_PAGE:
        raise _Refused(403, "CROSS_SITE_REFUSED", f"{what} is accepted only from this preview's own pages")


def _nothing() -> None:
    pass


def _encode(page: _Page, request: Request, *, close: bool) -> bytes:
    return simple_response(
        page.status,
        page.headers,
        page.body,
        close=close or not request.keep_alive,
        head_request=request.method == b"HEAD",
    )


def _header_list(fields: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]


def _see_other(location: str, headers: list[tuple[bytes, bytes]] | None = None) -> _Page:
    fields = [(b"Location", location.encode("latin-1")), (b"Cache-Control", b"no-store"), *(headers or ())]
    return _Page(303, fields, b"")


def _clear_cookie() -> bytes:
    return (
        f'{COOKIE}=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; Max-Age=0; Path=/; SameSite=Lax; Secure'
    ).encode()


def _session_token(request: Request) -> str | None:
    value = cookie_value(request.fields.get(b"cookie"), COOKIE_BYTES)
    return value.decode("latin-1") if value else None


def _is_websocket(request: Request) -> bool:
    return (
        request.method == b"GET"
        and request.upgrade
        and request.fields.get(b"upgrade", b"").lower() == b"websocket"
        and b"upgrade" in connection_tokens(request.fields.get(b"connection"))
    )


def _path(target: bytes) -> str:
    """The request target's path, percent-decoded (the query string left out)."""
    path = target.split(b"?", 1)[0].decode("latin-1")
    return unquote(path) if "%" in path else path


def _query_value(target: bytes, name: str) -> str | None:
    _, _, query = target.decode("latin-1").partition("?")
    values = parse_qs(query).get(name)
    return values[0] if values else None


def _basic_challenge(tunnel: Tunnel) -> str:
    return 'Basic realm="tunnel", charset="UTF-8"'


def _wants_html(request: Request) -> bool:
    return b"text/html" in request.fields.get(b"accept", b"")


def _safe_next(value: str) -> str:
    """Only a path on this same host: never `//evil` or a scheme (no open redirect)."""
    if (
        not value.startswith("/")
        or value.startswith("//")
        or value.startswith("/\\")
        or value.startswith(GATEWAY_PREFIX)
    ):
        return "/"
    return quote(value, safe="/?&=%#:@!$'()*+,;~-._")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- wiring


class TunnelService:
    """The tunnel store and server beside a policy store, for `gateway run`.

    Build it before the control API (the API takes `service.store`), start it after the policy
    store has loaded, close it before the policy store. The tunnel store uses the policy store's
    backend: the same Redis (same key prefix) or a tunnels.json next to the policy file.
    """

    def __init__(
        self, policy: PolicyStore, config: Config, tunnel_config: TunnelConfig, *, flows: FlowLog | None = None
    ) -> None:
        self.config = tunnel_config
        self.store = open_tunnel_store(
            policy.state,
            tunnel_config,
            backend=policy.backend,
            policy_path=config.store.path,
            redis_url=config.store.redis_url,
            prefix=config.store.redis_prefix,
        )
        # Loaded now, so a missing certificate stops start-up with CERT_INVALID (run `gateway certs init`).
        self.server = TunnelServer(
            self.store, tunnel_config, tls=ReloadingTLS(tunnel_config.cert_path, tunnel_config.key_path), flows=flows
        )

    async def start(self) -> None:
        await self.store.start()
        await self.server.start()

    async def close(self) -> None:
        await self.server.close()
        await self.store.close()
