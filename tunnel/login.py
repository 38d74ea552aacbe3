"""Who may use a password-protected tunnel: the login form and its session cookie, HTTP Basic for tools, logout.

Browsers get a login form and then a server-side session in a host-only `__Host-` cookie (Secure, HttpOnly,
SameSite=Lax); tools send HTTP Basic (any user name). Sessions live in the tunnel store under the hash of their
token, so every node honours them. Every password attempt goes through the `LoginThrottle` before its hash
(scrypt: 16 MiB and ~50 ms of CPU) runs, and at most `MAX_CONCURRENT_HASHES` hashes run at once for all tunnels
together. A tool's repeated Basic requests are remembered for `BASIC_CACHE_TTL` so they cost one hash a minute.
The gateway's cookie and Basic credentials never reach the app (the proxy strips them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import math
import time
from typing import Final
from urllib.parse import parse_qs

from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.http1 import cookie_value
from gateway.tunnel.model import Tunnel, verify_password
from gateway.tunnel.pages import (
    GATEWAY_PREFIX,
    LOGIN_PATH,
    LOGOUT_PATH,
    Page,
    Refused,
    login_response,
    safe_next,
    see_other,
)
from gateway.tunnel.store import TunnelStore
from gateway.tunnel.throttle import LoginThrottle
from gateway.tunnel.wire import Request

COOKIE: Final = "__Host-gw-tunnel"
COOKIE_BYTES: Final = COOKIE.encode()
#: Every cookie name the gateway uses (lowercased): never sent to the app, never set by the app.
GATEWAY_COOKIES: Final = frozenset({COOKIE_BYTES.lower()})
MAX_FORM_BYTES: Final = 8192
BASIC_CACHE_TTL: Final = 60.0  # a tool's repeated Basic requests cost one scrypt per minute, not one each
BASIC_CACHE_MAX: Final = 10_000
MAX_CONCURRENT_HASHES: Final = 2
BASIC_CHALLENGE: Final = 'Basic realm="tunnel", charset="UTF-8"'
#: Sec-Fetch-Site values of a request made by the tunnel's own pages or by the user (typed, bookmarked). A
#: client that sends none (a tool, an old browser) is taken as the user's.
OWN_PAGE: Final = frozenset({b"same-origin", b"none"})


class Login:
    """The password gate of protected tunnels; `client` is always the client's address."""

    def __init__(self, store: TunnelStore, config: TunnelConfig, throttle: LoginThrottle) -> None:
        self.store = store
        self.config = config
        self.throttle = throttle
        #: Password hashes running at once, for all tunnels together: guesses never hold every worker thread,
        #: so other tunnels' logins and tunnel creation keep going.
        self._hashing = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
        self._basic_ok: dict[bytes, float] = {}
        #: Password checks by result (ok, failed, throttled), for /metrics; a session or a remembered Basic
        #: credential is no check and is not counted.
        self.results: dict[str, int] = {"ok": 0, "failed": 0, "throttled": 0}

    def prune(self, now: float) -> None:
        """Forget Basic credentials checked more than BASIC_CACHE_TTL before `now` (wall clock) and stale
        throttle entries."""
        for key in [k for k, exp in self._basic_ok.items() if exp <= now]:
            del self._basic_ok[key]
        self.throttle.prune()

    async def authorize(self, client: str, request: Request, tunnel: Tunnel) -> None:
        """Returns when the request may reach the app; raises Refused (401, 429) otherwise."""
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
                if await self._check_password(client, tunnel, password):
                    if len(self._basic_ok) < BASIC_CACHE_MAX:
                        self._basic_ok[cache_key] = time.time() + BASIC_CACHE_TTL
                    return
            raise Refused(401, "WRONG_PASSWORD", "wrong password", {"WWW-Authenticate": BASIC_CHALLENGE})
        raise Refused(401, "PASSWORD_REQUIRED", "this preview needs a password", {"WWW-Authenticate": BASIC_CHALLENGE})

    async def gateway_path(self, client: str, request: Request, tunnel: Tunnel, path: str) -> Page:
        """The answer for a path under GATEWAY_PREFIX (the login form, logout); raises Refused."""
        if path == LOGIN_PATH and tunnel.protected:
            if request.method in (b"GET", b"HEAD"):
                return login_response(tunnel, safe_next(query_value(request.target, "next") or "/"), None, 200)
            if request.method == b"POST":
                own_page_only(request, "sign-in")  # else any page could spend its visitors' attempts here
                return await self._login(client, request, tunnel)
            raise Refused(405, "METHOD_NOT_ALLOWED", "use GET or POST", {"Allow": "GET, POST"})
        if path == LOGOUT_PATH:
            # Another tunnel is the same site (the browser sends the session along): its page must not end this
            # tunnel's session, nor may any other site's.
            own_page_only(request, "logout")
            token = session_token(request)
            if token and len(token) <= 64:
                await self.store.end_session(token)
            headers = [(b"Set-Cookie", clear_cookie())]
            if tunnel.protected:
                return see_other("/", headers)
            return Page(204, headers, b"")
        raise Refused(404, "NOT_FOUND", f"{GATEWAY_PREFIX} is reserved for the gateway")

    async def _has_session(self, request: Request, tunnel: Tunnel) -> bool:
        token = session_token(request)
        # Tokens are token_urlsafe(32): anything else is not worth a store lookup.
        if not token or len(token) > 64:
            return False
        return await self.store.find_session(token, tunnel.id)

    async def _check_password(self, client: str, tunnel: Tunnel, password: str) -> bool:
        """Throttled, constant-time (scrypt + compare_digest) password check; raises 429 while throttled."""
        wait = self.throttle.admit(tunnel.id, client)
        if wait > 0:
            self.results["throttled"] += 1
            seconds = max(1, math.ceil(wait))
            raise Refused(
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
        self.results["ok" if ok else "failed"] += 1
        return ok

    async def _login(self, client: str, request: Request, tunnel: Tunnel) -> Page:
        length = request.content_length
        if length is not None and (not length.strip().isdigit() or int(length) > MAX_FORM_BYTES):
            raise Refused(413, "BODY_TOO_LARGE", "the form is too large")
        raw = await request.body.read(MAX_FORM_BYTES) if request.body is not None else b""
        if len(raw) > MAX_FORM_BYTES:
            raise Refused(413, "BODY_TOO_LARGE", "the form is too large")
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        password = (form.get("password") or [""])[0]
        next_path = safe_next((form.get("next") or ["/"])[0])
        try:
            ok = await self._check_password(client, tunnel, password)
        except Refused as exc:
            if exc.status != 429:
                raise
            return login_response(tunnel, next_path, exc.message, 429, exc.headers, refusal=exc.code)
        if not ok:
            message = "Wrong password. Please try again."
            return login_response(tunnel, next_path, message, 401, refusal="WRONG_PASSWORD")
        lifetime = max(1.0, min(self.config.session_ttl, tunnel.expires_at - time.time()))
        token = await self.store.create_session(tunnel.id, lifetime)  # fresh on every login: no fixation
        # Host-only (no Domain), Path=/ and Secure: what the __Host- prefix requires, so no other tunnel
        # under the same domain can set or read it.
        cookie = f"{COOKIE}={token}; HttpOnly; Max-Age={int(lifetime)}; Path=/; SameSite=Lax; Secure"
        return see_other(next_path, [(b"Set-Cookie", cookie.encode())])


def own_page_only(request: Request, what: str) -> None:
    if request.fields.get(b"sec-fetch-site", b"same-origin") not in OWN_PAGE:
        raise Refused(403, "CROSS_SITE_REFUSED", f"{what} is accepted only from this preview's own pages")


def clear_cookie() -> bytes:
    return (
        f'{COOKIE}=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; Max-Age=0; Path=/; SameSite=Lax; Secure'
    ).encode()


def session_token(request: Request) -> str | None:
    value = cookie_value(request.fields.get(b"cookie"), COOKIE_BYTES)
    return value.decode("latin-1") if value else None


def query_value(target: bytes, name: str) -> str | None:
    _, _, query = target.decode("latin-1").partition("?")
    values = parse_qs(query).get(name)
    return values[0] if values else None
