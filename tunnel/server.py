"""The tunnel server: HTTPS in front of sandbox ports, reached as https://<tunnel id>.<domain>/.

One low-level aiohttp server (no router: every request, CONNECT and absolute-form targets
included, reaches `_handle`, which refuses what it does not serve). A request is routed only
on an exact, lowercased Host match `<id>.<domain>[:port]` against a tunnel that is alive;
the upstream is only ever the address and port recorded in that tunnel, so the service can
never be used as an open proxy.

Password-protected tunnels: browsers get a login form and then a server-side session in a
host-only `__Host-` cookie (Secure, HttpOnly, SameSite=Lax); tools send HTTP Basic (any
user name). Wrong passwords are throttled per client address and per tunnel with
exponential backoff; the gateway's cookie and Basic credentials never reach the sandbox.

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
import json
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, quote

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Config
from gateway.flowlog import FlowLog, FlowRecord, now_us
from gateway.stores.base import PolicyStore
from gateway.tunnel.certs import ReloadingTLS
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.model import ID_PATTERN, Tunnel, verify_password
from gateway.tunnel.store import TunnelStore, open_tunnel_store

log = structlog.get_logger("gateway.tunnel.server")

COOKIE: Final = "__Host-gw-tunnel"
GATEWAY_PREFIX: Final = "/.gateway/"
LOGIN_PATH: Final = "/.gateway/login"
LOGOUT_PATH: Final = "/.gateway/logout"
MAX_FORM_BYTES: Final = 8192
WS_MAX_MESSAGE: Final = 16 * 1024 * 1024
BASIC_CACHE_TTL: Final = 60.0  # a tool's repeated Basic requests cost one scrypt per minute, not one each
BASIC_CACHE_MAX: Final = 10_000
MAX_THROTTLE_ENTRIES: Final = 100_000
#: Close code sent to WebSocket clients when the tunnel ends (1008: policy violation, RFC 6455).
WS_CLOSE_REVOKED: Final = 1008

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Client-supplied copies are dropped; the gateway sets its own X-Forwarded-* from what it saw.
FORWARDING: Final = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"})


# --------------------------------------------------------------------------- throttling


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Wrong passwords per (tunnel, client address) and per tunnel; past a free allowance each further
    failure locks that key for 1, 2, 4, ... seconds (capped). Failures are forgotten after `window`."""

    def __init__(self, free: int, tunnel_free: int, window: float, max_backoff: float) -> None:
        self.free = free
        self.tunnel_free = tunnel_free
        self.window = window
        self.max_backoff = max_backoff
        self._entries: dict[tuple[str, str], _Failures] = {}

    def retry_after(self, tunnel_id: str, client: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        waits = [e.locked_until - now for e in self._lookup(tunnel_id, client)]
        return max([0.0, *waits])

    def failure(self, tunnel_id: str, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key, free in (((tunnel_id, client), self.free), ((tunnel_id, ""), self.tunnel_free)):
            entry = self._entries.get(key)
            if entry is None or now - entry.last > self.window:
                if entry is None and len(self._entries) >= MAX_THROTTLE_ENTRIES:
                    self.prune(now)
                entry = self._entries[key] = _Failures()
            entry.count += 1
            entry.last = now
            if entry.count >= free:
                entry.locked_until = now + min(self.max_backoff, 2.0 ** (entry.count - free))

    def success(self, tunnel_id: str, client: str) -> None:
        self._entries.pop((tunnel_id, client), None)

    def prune(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in [k for k, e in self._entries.items() if now - e.last > self.window and now > e.locked_until]:
            del self._entries[key]

    def _lookup(self, tunnel_id: str, client: str) -> Iterable[_Failures]:
        for key in ((tunnel_id, client), (tunnel_id, "")):
            entry = self._entries.get(key)
            if entry is not None:
                yield entry


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


@dataclass(eq=False, slots=True)
class _Live:
    """One proxied exchange, so revocation can end it."""

    task: asyncio.Task[Any] | None
    transport: asyncio.BaseTransport | None
    ws: web.WebSocketResponse | None = None
    upstream_ws: aiohttp.ClientWebSocketResponse | None = None


@dataclass(slots=True)
class _Exchange:
    tunnel: Tunnel | None = None
    host: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    status: int = 0
    reason: str = ""
    started_us: int = field(default_factory=now_us)


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
            config.login_free_failures, config.login_tunnel_failures, config.login_window, config.login_max_backoff
        )
        self._basic_ok: dict[bytes, float] = {}
        self._live: dict[str, set[_Live]] = {}
        self._closers: set[asyncio.Task[None]] = set()
        self._client: aiohttp.ClientSession | None = None
        self._runner: web.ServerRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port: int | None = None
        store.add_listener(self._on_tunnel_ended)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(
            auto_decompress=False,  # bytes pass through as the app sent them
            timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout, sock_read=None),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            cookie_jar=aiohttp.DummyCookieJar(),  # never keep one visitor's cookies for another
            trust_env=False,  # never through an HTTP proxy from the environment
        )
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.host, self.config.port, ssl_context=self.tls.context if self.tls else None
        )
        await site.start()
        sockets = [s for srv in self._runner.sites for s in (getattr(srv, "_server", None).sockets or ())]
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        self._sweeper = asyncio.create_task(self._sweep(), name="tunnel-sweeper")
        log.info("tunnel_server_started", host=self.config.host, port=self.port, domain=self.config.domain)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for tunnel_id in list(self._live):
            self._kill(tunnel_id, "server stopping")
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    def live_connections(self, tunnel_id: str) -> int:
        return len(self._live.get(tunnel_id, ()))

    # ------------------------------------------------------------------ ending tunnels

    def _on_tunnel_ended(self, tunnel: Tunnel) -> None:
        self._kill(tunnel.id, tunnel.revoked_reason or "ended")

    def _kill(self, tunnel_id: str, reason: str) -> None:
        live = self._live.pop(tunnel_id, set())
        if live:
            log.info("tunnel_connections_closed", tunnel=tunnel_id[:4], count=len(live), reason=reason)
        for conn in live:
            if conn.ws is not None:
                task = asyncio.create_task(self._close_ws(conn))
                self._closers.add(task)  # a reference, so the task is not collected mid-way
                task.add_done_callback(self._closers.discard)
            else:
                if conn.transport is not None:
                    conn.transport.close()  # the client sees the stream end now, whatever the handler is doing
                if conn.task is not None:
                    conn.task.cancel()

    @staticmethod
    async def _close_ws(conn: _Live) -> None:
        with contextlib.suppress(Exception):
            if conn.upstream_ws is not None:
                await asyncio.wait_for(conn.upstream_ws.close(), 1.0)
        with contextlib.suppress(Exception):
            assert conn.ws is not None
            await asyncio.wait_for(conn.ws.close(code=WS_CLOSE_REVOKED, message=b"tunnel ended"), 1.0)
        if conn.transport is not None:
            conn.transport.close()
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
                for key in [k for k, exp in self._basic_ok.items() if exp <= now]:
                    del self._basic_ok[key]
                self.throttle.prune()
            except Exception:  # the sweeper must survive anything
                log.exception("tunnel_sweep_failed")

    # ------------------------------------------------------------------ the request

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = _Exchange()
        try:
            response = await self._route(request, exchange)
        except _Refused as exc:
            exchange.status, exchange.reason = exc.status, exc.code
            response = self._refusal(request, exc)
        finally:
            self._record(request, exchange)
        return response

    async def _route(self, request: web.BaseRequest, exchange: _Exchange) -> web.StreamResponse:
        if request.method == "CONNECT":
            raise _Refused(405, "METHOD_NOT_ALLOWED", "CONNECT is not served: this is not a proxy", {"Allow": "GET"})
        if not request.raw_path.startswith("/"):
            raise _Refused(400, "ABSOLUTE_FORM_REFUSED", "only origin-form request targets (/path) are served")
        tunnel, host = self._find(request)
        exchange.tunnel, exchange.host = tunnel, host
        path = request.rel_url.path
        if path.startswith(GATEWAY_PREFIX):
            return await self._gateway_path(request, tunnel, path)
        if tunnel.protected:
            await self._authorize(request, tunnel)
        if self._is_websocket(request):
            return await self._proxy_ws(request, tunnel, host, exchange)
        return await self._proxy_http(request, tunnel, host, exchange)

    def _find(self, request: web.BaseRequest) -> tuple[Tunnel, str]:
        host = request.headers.get("Host", "").strip().lower()
        name = host.rsplit(":", 1)[0] if ":" in host else host
        suffix = "." + self.config.domain
        label = name[: -len(suffix)] if name.endswith(suffix) else ""
        tunnel = self.store.tunnels.get(label) if ID_PATTERN.fullmatch(label) else None
        if tunnel is None:
            raise _Refused(404, "TUNNEL_NOT_FOUND", "there is no preview at this address")
        if not self.store.alive(tunnel):
            raise _Refused(410, "TUNNEL_GONE", "this preview has ended (expired, revoked, or its sandbox is gone)")
        return tunnel, host

    # ------------------------------------------------------------------ authentication

    def _client_address(self, request: web.BaseRequest) -> str:
        return request.remote or "?"

    async def _has_session(self, request: web.BaseRequest, tunnel: Tunnel) -> bool:
        token = request.cookies.get(COOKIE)
        # Tokens are token_urlsafe(32): anything else is not worth a store lookup.
        if not token or len(token) > 64:
            return False
        return await self.store.find_session(token, tunnel.id)

    async def _check_password(self, request: web.BaseRequest, tunnel: Tunnel, password: str) -> bool:
        """Throttled, constant-time (scrypt + compare_digest) password check; raises 429 while locked."""
        client = self._client_address(request)
        wait = self.throttle.retry_after(tunnel.id, client)
        if wait > 0:
            raise _Refused(
                429,
                "TOO_MANY_ATTEMPTS",
                f"too many wrong passwords; try again in {int(wait) + 1} s",
                {"Retry-After": str(int(wait) + 1)},
            )
        assert tunnel.password_hash is not None
        ok = await asyncio.to_thread(verify_password, password, tunnel.password_hash)
        if ok:
            self.throttle.success(tunnel.id, client)
        else:
            self.throttle.failure(tunnel.id, client)
            log.info("tunnel_login_failed", tunnel=tunnel.id[:4], client=client)  # never the password
        return ok

    async def _authorize(self, request: web.BaseRequest, tunnel: Tunnel) -> None:
        if await self._has_session(request, tunnel):
            return
        authorization = request.headers.get("Authorization", "")
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
                if await self._check_password(request, tunnel, password):
                    if len(self._basic_ok) < BASIC_CACHE_MAX:
                        self._basic_ok[cache_key] = time.time() + BASIC_CACHE_TTL
                    return
            raise _Refused(401, "WRONG_PASSWORD", "wrong password", {"WWW-Authenticate": _basic_challenge(tunnel)})
        raise _Refused(
            401, "PASSWORD_REQUIRED", "this preview needs a password", {"WWW-Authenticate": _basic_challenge(tunnel)}
        )

    async def _gateway_path(self, request: web.BaseRequest, tunnel: Tunnel, path: str) -> web.StreamResponse:
        if path == LOGIN_PATH and tunnel.protected:
            if request.method == "GET":
                return self._login_response(tunnel, _safe_next(request.query.get("next", "/")), None, 200)
            if request.method == "POST":
                return await self._login(request, tunnel)
            raise _Refused(405, "METHOD_NOT_ALLOWED", "use GET or POST", {"Allow": "GET, POST"})
        if path == LOGOUT_PATH:
            token = request.cookies.get(COOKIE)
            if token and len(token) <= 64:
                await self.store.end_session(token)
            response = _see_other("/") if tunnel.protected else web.Response(status=204)
            response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
            return response
        raise _Refused(404, "NOT_FOUND", f"{GATEWAY_PREFIX} is reserved for the gateway")

    async def _login(self, request: web.BaseRequest, tunnel: Tunnel) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
            raise _Refused(413, "BODY_TOO_LARGE", "the form is too large")
        raw = await request.content.read(MAX_FORM_BYTES + 1)
        if len(raw) > MAX_FORM_BYTES:
            raise _Refused(413, "BODY_TOO_LARGE", "the form is too large")
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        password = (form.get("password") or [""])[0]
        next_path = _safe_next((form.get("next") or ["/"])[0])
        try:
            ok = await self._check_password(request, tunnel, password)
        except _Refused as exc:
            if exc.status != 429:
                raise
            return self._login_response(tunnel, next_path, exc.message, 429, exc.headers)
        if not ok:
            return self._login_response(tunnel, next_path, "Wrong password. Please try again.", 401)
        lifetime = max(1.0, min(self.config.session_ttl, tunnel.expires_at - time.time()))
        token = await self.store.create_session(tunnel.id, lifetime)  # fresh on every login: no fixation
        response = _see_other(next_path)
        # Host-only (no Domain), Path=/ and Secure: what the __Host- prefix requires, so no other tunnel
        # under the same domain can set or read it.
        response.set_cookie(COOKIE, token, path="/", secure=True, httponly=True, samesite="Lax", max_age=int(lifetime))
        response.headers["Cache-Control"] = "no-store"
        return response

    def _login_response(
        self, tunnel: Tunnel, next_path: str, error: str | None, status: int, headers: dict[str, str] | None = None
    ) -> web.Response:
        label = tunnel.label or f"Preview of port {tunnel.port}"
        return web.Response(
            status=status,
            text=login_page(label, next_path, error),
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                "frame-ancestors 'none'",
                **(headers or {}),
            },
        )

    def _refusal(self, request: web.BaseRequest, exc: _Refused) -> web.Response:
        headers = {"Cache-Control": "no-store", **exc.headers}
        if _wants_html(request):
            tunnel_for_login = None
            if exc.code == "PASSWORD_REQUIRED" and request.method in ("GET", "HEAD"):
                with contextlib.suppress(_Refused):
                    tunnel_for_login = self._find(request)[0]
            if tunnel_for_login is not None:
                next_path = _safe_next(request.raw_path)
                headers.pop("WWW-Authenticate", None)  # a browser would show its own dialog over the form
                return self._login_response(tunnel_for_login, next_path, None, 401, headers)
            title = ERROR_TITLES.get(exc.status, "Error")
            sentence = exc.message[:1].upper() + exc.message[1:]
            body = f"<h1>{html.escape(title)}</h1><p>{html.escape(sentence)}.</p>"
            body += f'<p class="muted">{exc.status} · {html.escape(exc.code)}</p>'
            return web.Response(status=exc.status, text=_page(title, body), content_type="text/html", headers=headers)
        return web.Response(
            status=exc.status,
            text=json.dumps({"code": exc.code, "message": exc.message, "field": None}),
            content_type="application/json",
            headers=headers,
        )

    # ------------------------------------------------------------------ proxying

    @staticmethod
    def _is_websocket(request: web.BaseRequest) -> bool:
        return (
            request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower()
        )

    def _upstream_url(self, tunnel: Tunnel, request: web.BaseRequest, scheme: str) -> URL:
        host = f"[{tunnel.address}]" if ":" in tunnel.address else tunnel.address
        return URL(f"{scheme}://{host}:{tunnel.port}{request.raw_path}", encoded=True)

    def _upstream_headers(
        self, request: web.BaseRequest, tunnel: Tunnel, host: str, *, websocket: bool
    ) -> CIMultiDict[str]:
        listed = {h.strip().lower() for h in request.headers.get("Connection", "").split(",")}
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in listed or lower in FORWARDING or lower in ("host", "expect"):
                continue
            if websocket and lower.startswith("sec-websocket-"):
                continue  # the client library makes its own handshake with the sandbox
            if lower == "cookie":
                value = _strip_cookie(value)
                if not value:
                    continue
            if lower == "authorization" and tunnel.protected and value[:6].lower() == "basic ":
                continue  # the gateway's credentials, not the app's
            headers.add(name, value)
        headers["Host"] = f"localhost:{tunnel.port}" if tunnel.rewrite_host else host
        headers["X-Forwarded-For"] = self._client_address(request)
        headers["X-Forwarded-Proto"] = "https"
        headers["X-Forwarded-Host"] = host
        return headers

    def _track(self, tunnel: Tunnel, request: web.BaseRequest) -> _Live:
        conn = _Live(asyncio.current_task(), request.transport)
        self._live.setdefault(tunnel.id, set()).add(conn)
        return conn

    def _untrack(self, tunnel: Tunnel, conn: _Live) -> None:
        conns = self._live.get(tunnel.id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._live[tunnel.id]

    async def _proxy_http(
        self, request: web.BaseRequest, tunnel: Tunnel, host: str, exchange: _Exchange
    ) -> web.StreamResponse:
        assert self._client is not None
        conn = self._track(tunnel, request)
        try:
            if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
                # Answered here (the app never sees Expect), so uploads from curl and the like start at once.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _CountingBody(request.content, exchange) if request.body_exists else None
            try:
                upstream = await self._client.request(
                    request.method,
                    self._upstream_url(tunnel, request, "http"),
                    headers=self._upstream_headers(request, tunnel, host, websocket=False),
                    data=body,
                    allow_redirects=False,
                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                )
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, TimeoutError) as exc:
                log.info("tunnel_upstream_unavailable", tunnel=tunnel.id[:4], error=type(exc).__name__)
                raise _Refused(
                    502, "UPSTREAM_UNAVAILABLE", f"nothing answers on port {tunnel.port} in the sandbox"
                ) from None
            except aiohttp.ClientError as exc:  # the app broke off or answered something that is not HTTP
                log.info("tunnel_upstream_failed", tunnel=tunnel.id[:4], error=type(exc).__name__)
                raise _Refused(502, "UPSTREAM_ERROR", f"the app on port {tunnel.port} gave no valid answer") from None
            async with upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                listed = {h.strip().lower() for h in upstream.headers.get("Connection", "").split(",")}
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP and name.lower() not in listed:
                        response.headers.add(name, value)
                exchange.status = upstream.status
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():  # as it arrives: SSE and large bodies stream
                        exchange.bytes_down += len(chunk)
                        await response.write(chunk)
                    await response.write_eof()
                except (aiohttp.ClientError, ConnectionError) as exc:
                    # The head is already sent: the only honest signal left is to cut the connection.
                    log.info("tunnel_stream_aborted", tunnel=tunnel.id[:4], error=type(exc).__name__)
                    if request.transport is not None:
                        request.transport.close()
                return response
        finally:
            self._untrack(tunnel, conn)

    async def _proxy_ws(
        self, request: web.BaseRequest, tunnel: Tunnel, host: str, exchange: _Exchange
    ) -> web.StreamResponse:
        assert self._client is not None
        origin = request.headers.get("Origin")
        # Another site's page must not drive the app with the visitor's session (cross-site WebSocket hijacking).
        if origin is not None and origin.lower() != f"https://{host}":
            raise _Refused(403, "ORIGIN_NOT_ALLOWED", "WebSocket connections are only accepted from this preview")
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        conn = self._track(tunnel, request)
        try:
            try:
                upstream = await self._client.ws_connect(
                    self._upstream_url(tunnel, request, "ws"),
                    headers=self._upstream_headers(request, tunnel, host, websocket=True),
                    protocols=protocols,
                    max_msg_size=WS_MAX_MESSAGE,
                    autoping=True,
                )
            except aiohttp.WSServerHandshakeError as exc:
                raise _Refused(
                    502, "UPSTREAM_WEBSOCKET_REFUSED", f"the app refused the WebSocket ({exc.status})"
                ) from None
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, TimeoutError):
                raise _Refused(
                    502, "UPSTREAM_UNAVAILABLE", f"nothing answers on port {tunnel.port} in the sandbox"
                ) from None
            conn.upstream_ws = upstream
            ws = web.WebSocketResponse(
                protocols=[upstream.protocol] if upstream.protocol else (), max_msg_size=WS_MAX_MESSAGE, autoping=True
            )
            await ws.prepare(request)
            conn.ws = ws
            exchange.status = 101
            if not self.store.alive(tunnel):  # revoked while we were connecting
                await self._close_ws(conn)
                return ws
            await _relay_ws(ws, upstream, exchange)
            return ws
        finally:
            self._untrack(tunnel, conn)
            if conn.upstream_ws is not None and not conn.upstream_ws.closed:
                with contextlib.suppress(Exception):
                    await conn.upstream_ws.close()

    # ------------------------------------------------------------------ flow records

    def _record(self, request: web.BaseRequest, exchange: _Exchange) -> None:
        if self.flows is None or exchange.tunnel is None:
            return
        tunnel = exchange.tunnel
        peer = request.transport.get_extra_info("peername") if request.transport else None
        local = request.transport.get_extra_info("sockname") if request.transport else None
        end = now_us()
        allowed = not exchange.reason  # a reason is set only when the gateway itself refused
        self.flows.record(
            FlowRecord(
                start_us=exchange.started_us,
                end_us=end,
                sandbox=tunnel.sandbox,
                src_addr=str(peer[0]) if peer else (request.remote or ""),
                src_port=int(peer[1]) if peer else 0,
                dst_addr=tunnel.address,
                dst_port=tunnel.port,
                orig_dst_addr=str(local[0]) if local else self.config.host,
                orig_dst_port=int(local[1]) if local else self.config.port,
                hostname=exchange.host,
                protocol="http",
                bytes_up=exchange.bytes_up,
                bytes_down=exchange.bytes_down,
                duration_ms=(end - exchange.started_us) / 1000,
                verdict="allow" if allowed else "deny",
                reason=f"tunnel {exchange.reason or exchange.status}",
                rule=f"tunnel:{tunnel.id[:4]}",
            )
        )


class _CountingBody:
    """The request body as an async iterator of chunks (streamed, never buffered whole), counted."""

    def __init__(self, content: aiohttp.StreamReader, exchange: _Exchange) -> None:
        self.content = content
        self.exchange = exchange

    def __aiter__(self) -> _CountingBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.content.readany()
        if not chunk:
            raise StopAsyncIteration
        self.exchange.bytes_up += len(chunk)
        return chunk


async def _relay_ws(ws: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, exchange: _Exchange) -> None:
    async def client_to_app() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                exchange.bytes_up += len(msg.data)
                await upstream.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                exchange.bytes_up += len(msg.data)
                await upstream.send_bytes(msg.data)
        await upstream.close(code=ws.close_code or 1000)

    async def app_to_client() -> None:
        async for msg in upstream:
            if msg.type == aiohttp.WSMsgType.TEXT:
                exchange.bytes_down += len(msg.data)
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                exchange.bytes_down += len(msg.data)
                await ws.send_bytes(msg.data)
        await ws.close(code=upstream.close_code or 1000)

    tasks = [asyncio.create_task(client_to_app()), asyncio.create_task(app_to_client())]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
                await task
    finally:
        for task in tasks:
            task.cancel()


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _basic_challenge(tunnel: Tunnel) -> str:
    return 'Basic realm="tunnel", charset="UTF-8"'


def _wants_html(request: web.BaseRequest) -> bool:
    return "text/html" in request.headers.get("Accept", "")


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


def _strip_cookie(header: str) -> str:
    parts = [p for p in (part.strip() for part in header.split(";")) if p and p.split("=", 1)[0].strip() != COOKIE]
    return "; ".join(parts)


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
