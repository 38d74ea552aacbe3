"""The tunnel end to end over real TLS: a generated CA that the client trusts (verification stays on),
the tunnel server on 127.0.0.1, and the "sandbox app" an aiohttp server on its own loopback address
(127.77.0.2, inside the test's sandbox subnet), which is as real as a namespace for what is tested here.

Host names `<id>.tunnel.localhost` are resolved to 127.0.0.1 by a resolver given to the client, so
SNI and certificate checks run exactly as a browser's would.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import ipaddress
import json
import resource
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from redis.asyncio import Redis

from gateway.audit_config import AuditConfig
from gateway.decision import DEFAULT_LIMITS
from gateway.files import write_atomic
from gateway.flowlog import FlowLog
from gateway.settings import load_config
from gateway.state import PolicyContext
from gateway.stores.config import StoreConfig
from gateway.stores.embedded import EmbeddedStore
from gateway.tunnel.certs import CertPaths, ReloadingTLS, init_certs
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.login import COOKIE
from gateway.tunnel.model import Tunnel, hash_password, new_tunnel_id, parse_request, verify_password
from gateway.tunnel.server import TunnelServer
from gateway.tunnel.service import TunnelService
from gateway.tunnel.store import FileTunnelStore, RedisTunnelStore, TunnelStore
from gateway.tunnel.throttle import LoginThrottle, client_key
from tests.factory import wait_until_async
from tests.redis_server import RedisServer

DOMAIN = "tunnel.localhost"
APP_HOST = "127.77.0.2"
CONTEXT = PolicyContext((ipaddress.ip_network("127.77.0.0/16"),), {}, DEFAULT_LIMITS)
PASSWORD = "correct horse battery"
#: The sandbox every test exposes: public access, so tunnels without a password are allowed (ingress rules).
SANDBOX = {"id": "sb1", "addresses": [APP_HOST], "ingress": {"public_access": True}}
MB = 1024 * 1024
#: The sandbox's page: it opens a WebSocket to its own origin and shows the round trip and the socket's state.
APP_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>sandbox app</title></head>
<body><h1>hello from the sandbox</h1><p>WebSocket: <b id="state">connecting</b></p><p id="echo"></p>
<script>
const ws = new WebSocket(`wss://${location.host}/ws`);
ws.onopen = () => { document.getElementById("state").textContent = "open"; ws.send("ping"); };
ws.onmessage = (e) => { document.getElementById("echo").textContent = e.data; };
ws.onclose = (e) => { document.getElementById("state").textContent = "closed " + e.code; };
</script></body></html>
"""


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TunnelResolver(AbstractResolver):
    """Every name under the tunnel domain is this machine (what DNS or *.localhost does in production)."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        assert host == DOMAIN or host.endswith("." + DOMAIN), host  # the client never goes anywhere else
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the sandbox app


def sandbox_app() -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=APP_PAGE, content_type="text/html")

    async def headers(request: web.Request) -> web.Response:
        return web.json_response({"headers": [[k, v] for k, v in request.headers.items()], "path": request.path_qs})

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for n in range(1000):  # bounded: the test ends it long before
            await response.write(f"data: {n}\n\n".encode())
            await asyncio.sleep(0.05)  # a live feed's pace: tests read the events as they come, never time them
        return response

    async def upload(request: web.Request) -> web.Response:
        total, digest = 0, hashlib.sha256()
        async for chunk in request.content.iter_any():
            total += len(chunk)
            digest.update(chunk)
        return web.json_response({"bytes": total, "sha256": digest.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["mb"]) * MB
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        block = b"x" * MB
        for _ in range(size // MB):
            await response.write(block)
        return response

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        async for msg in socket_:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await socket_.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await socket_.send_bytes(msg.data)
        return socket_

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_route("*", "/headers", headers)
    app.router.add_get("/sse", sse)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/ws", ws)
    return app


# --------------------------------------------------------------------------- fixtures


class Clock:
    """The login throttle's monotonic time, stepped by the test instead of slept through."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclasses.dataclass
class Env:
    server: TunnelServer
    store: TunnelStore
    policy: EmbeddedStore
    ca: Path
    app_port: int
    flows: FlowLog
    client: aiohttp.ClientSession
    ssl: ssl.SSLContext
    clock: Clock

    def url(self, tunnel_id: str, path: str = "/") -> str:
        return f"https://{tunnel_id}.{DOMAIN}:{self.server.port}{path}"

    async def expose(self, port: int | None = None, **fields: Any) -> Tunnel:
        return await self.store.create("sb1", {"port": port or self.app_port, **fields})

    async def records(self, tunnel: Tunnel) -> list[dict[str, Any]]:
        """The tunnel's flow records in the sandbox's audit batches, oldest first."""
        await self.flows.flush()
        batches, _ = self.flows.list_batches("sb1")
        lines = [line for b in batches for line in self.flows.read_batch("sb1", b["name"]).splitlines()]
        return [r for r in map(json.loads, lines) if r["rule"] == f"tunnel:{tunnel.id[:4]}"]

    def session(self, **options: Any) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.ssl, resolver=TunnelResolver(), **options)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


def make_certs(directory: Path, *, force: bool = False) -> CertPaths:
    paths = CertPaths(directory / "ca.crt", directory / "ca.key", directory / "tunnel.crt", directory / "tunnel.key")
    init_certs(DOMAIN, paths, force=force)
    return paths


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    paths = make_certs(tmp_path / "certs")
    policy = EmbeddedStore(CONTEXT, StoreConfig(path=tmp_path / "policies.json", poll_interval=0.05))
    await policy.start()
    await policy.create_sandbox(SANDBOX)
    config = TunnelConfig(
        domain=DOMAIN,
        host="127.0.0.1",
        port=0,
        login_free_failures=3,
        login_tunnel_rate=2.0,
        login_tunnel_burst=6,
        login_max_backoff=30.0,
        sweep_interval=0.1,
        poll_interval=0.05,
        connect_timeout=2.0,
    )
    store = FileTunnelStore(policy.state, config, tmp_path / "tunnels.json")
    await store.start()
    flows = FlowLog(AuditConfig(tmp_path / "audit", 0.05, "", 1000))
    await flows.start()
    clock = Clock()
    tls = ReloadingTLS(paths.cert, paths.key, check_interval=0.0)
    server = TunnelServer(store, config, tls=tls, flows=flows, clock=clock)
    await server.start()
    runner = web.AppRunner(sandbox_app(), access_log=None)
    await runner.setup()
    app_port = free_port(APP_HOST)
    site = web.TCPSite(runner, APP_HOST, app_port)
    await site.start()
    client_ssl = ssl.create_default_context(cafile=str(paths.ca_cert))  # verification on, trusting only the CA
    placeholder = aiohttp.ClientSession()
    environment = Env(server, store, policy, paths.ca_cert, app_port, flows, placeholder, client_ssl, clock)
    await placeholder.close()
    environment.client = environment.session()
    try:
        yield environment
    finally:
        await environment.client.close()
        await server.close()
        await runner.cleanup()
        await flows.close()
        await store.close()
        await policy.close()


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"me:{password}".encode()).decode()}


# --------------------------------------------------------------------------- certificates and model


def test_certs_init_is_idempotent_private_and_renewable(tmp_path: Path) -> None:
    paths = make_certs(tmp_path)
    for key in (paths.ca_key, paths.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sorted(names) == [f"*.{DOMAIN}", DOMAIN]
    before = paths.cert.read_bytes(), paths.ca_cert.read_bytes()
    again = init_certs(DOMAIN, paths)
    assert not again.created_ca and not again.created_leaf
    assert (paths.cert.read_bytes(), paths.ca_cert.read_bytes()) == before
    assert "update-ca-certificates" in again.trust_instructions()
    renewed = init_certs(DOMAIN, paths, force=True)
    assert renewed.created_ca and renewed.created_leaf and paths.cert.read_bytes() != before[0]
    # Another domain: the CA is kept, the leaf is reissued for the new names.
    other = init_certs("preview.example.test", paths)
    assert not other.created_ca and other.created_leaf


def test_tunnel_ids_passwords_and_requests() -> None:
    ids = {new_tunnel_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 and i.isalnum() and i == i.lower() for i in ids)
    stored = hash_password("s3cret-password")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_password("s3cret-password", stored) and not verify_password("s3cret-passwore", stored)
    assert not verify_password("x", "garbage")
    request = parse_request({"port": 80, "password": "s3cret-password"}, default_ttl=60, max_ttl=120)
    assert "s3cret" not in repr(request) and request.ttl == 60


def test_tunnel_config_reads_the_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[tunnel]\ndomain = "Preview.Example.Test"\nmax_per_sandbox = 5\n')
    config = load_config(path, environ={"GATEWAY_TUNNEL__PORT": "9443", "GATEWAY_TUNNEL__HOST": "::1"}).tunnel
    assert (config.domain, config.port, config.host, config.max_per_sandbox) == ("preview.example.test", 9443, "::1", 5)
    assert config.url_for("abc") == "https://abc.preview.example.test:9443/"
    with pytest.raises(Exception, match="unknown option"):
        load_config(None, environ={"GATEWAY_TUNNEL__NOPE": "1"})
    assert load_config(None, environ={}).tunnel == TunnelConfig()


def test_login_throttle_counts_attempts_before_they_are_checked() -> None:
    throttle = LoginThrottle(free=2, window=60, max_backoff=8, tunnel_rate=1.0, tunnel_burst=3)
    assert throttle.admit("t", "a", now=0) == 0
    assert throttle.admit("t", "a", now=0) == 0  # the second attempt is counted as it starts...
    assert throttle.admit("t", "a", now=0) == 1  # ...so a third one sent at once waits (2^0 s), unchecked
    assert throttle.admit("t", "a", now=1) == 0
    assert throttle.admit("t", "a", now=1) == 2  # and the next lock is twice as long
    throttle.success("t", "a", now=1)
    assert throttle.admit("t", "a", now=1) == 0  # the right password clears the client's record
    # The tunnel's bucket (3, one a second) holds the sum of the clients' attempts: 3 spent by now, so b gets
    # the last one and then waits, but at most 1 / rate seconds, and never longer because of a's failures.
    assert throttle.admit("t", "b", now=1) == 0
    assert throttle.admit("t", "b", now=1) == pytest.approx(1.0)
    assert throttle.admit("t", "b", now=1.5) == pytest.approx(0.5)
    assert throttle.admit("t", "c", now=1.5) == pytest.approx(0.5)
    # a signed in (at 1): the empty bucket does not hold it, for `window` seconds; its own backoff still does.
    assert throttle.admit("t", "a", now=1.5) == 0
    assert throttle.admit("t", "a", now=1.5) == pytest.approx(1.0)
    assert throttle.admit("t", "b", now=2) == 0
    for client in ("c", "d", "e"):
        assert throttle.admit("t", client, now=62) == 0
    assert throttle.admit("t", "a", now=62) == pytest.approx(1.0)  # the sign-in is forgotten: the bucket holds a
    assert throttle.admit("other", "a", now=2) == 0  # other tunnels have their own
    # An IPv6 client is its /64; an IPv4-mapped address is the IPv4 client.
    assert client_key("2001:db8:1:2::5") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("::ffff:198.51.100.7") == "198.51.100.7"
    throttle.prune(now=1000)
    assert throttle.admit("t", "a", now=1000) == 0


# --------------------------------------------------------------------------- serving


async def test_expose_and_fetch_with_forwarding_headers(env: Env) -> None:
    tunnel = await env.expose(label="Web")
    async with env.client.get(env.url(tunnel.id)) as response:
        assert response.status == 200
        assert "hello from the sandbox" in await response.text()
    sent = {"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6", "Cookie": "app=1"}
    async with env.client.get(env.url(tunnel.id, "/headers?q=1"), headers=sent) as response:
        seen = await response.json()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["path"] == "/headers?q=1"
    assert headers["x-forwarded-for"] == "127.0.0.1" and "forwarded" not in headers and "x-real-ip" not in headers
    assert headers["x-forwarded-proto"] == "https"
    assert headers["host"] == headers["x-forwarded-host"] == f"{tunnel.id}.{DOMAIN}:{env.server.port}"
    assert headers["cookie"] == "app=1"

    rewritten = await env.expose(rewrite_host=True)
    async with env.client.get(env.url(rewritten.id, "/headers")) as response:
        headers = {k.lower(): v for k, v in (await response.json())["headers"]}
    assert headers["host"] == f"localhost:{env.app_port}"
    assert headers["x-forwarded-host"] == f"{rewritten.id}.{DOMAIN}:{env.server.port}"

    await env.flows.flush()
    batches, _ = env.flows.list_batches("sb1")
    records = [json.loads(line) for b in batches for line in env.flows.read_batch("sb1", b["name"]).splitlines()]
    assert records and all(r["dst_addr"] == APP_HOST and r["protocol"] == "http" for r in records)
    assert all("Cookie" not in json.dumps(r) for r in records)
    first = [r for r in records if r["rule"] == f"tunnel:{tunnel.id[:4]}"]
    assert len(first) == 2
    for r in first:
        assert (r["sandbox"], r["src_addr"], r["dst_port"]) == ("sb1", "127.0.0.1", env.app_port)
        assert (r["orig_dst_addr"], r["orig_dst_port"]) == ("127.0.0.1", env.server.port) and r["src_port"] > 0
        assert r["hostname"] == f"{tunnel.id}.{DOMAIN}:{env.server.port}"
        assert (r["verdict"], r["reason"]) == ("allow", "tunnel 200") and r["bytes_down"] > 0
        assert r["end_us"] >= r["start_us"] and r["duration_ms"] >= 0


async def test_unknown_gone_and_unreachable_pages(env: Env) -> None:
    html = {"Accept": "text/html,application/xhtml+xml"}
    async with env.client.get(env.url("aaaaaaaaaaaaaaaa")) as response:
        assert response.status == 404 and (await response.json())["code"] == "TUNNEL_NOT_FOUND"
    async with env.client.get(env.url("aaaaaaaaaaaaaaaa"), headers=html) as response:
        assert response.status == 404 and "No such preview" in await response.text()
    tunnel = await env.expose()
    async with env.client.get(f"https://{DOMAIN}:{env.server.port}/") as response:
        assert response.status == 404  # the bare domain is no tunnel
    await env.store.revoke(tunnel.id)
    async with env.client.get(env.url(tunnel.id)) as response:
        assert response.status == 410 and (await response.json())["code"] == "TUNNEL_GONE"
    async with env.client.get(env.url(tunnel.id), headers=html) as response:
        assert response.status == 410 and "This preview has ended" in await response.text()
    closed = await env.expose(port=free_port(APP_HOST))
    async with env.client.get(env.url(closed.id)) as response:
        assert response.status == 502 and (await response.json())["code"] == "UPSTREAM_UNAVAILABLE"
    async with env.client.get(env.url(closed.id), headers=html) as response:
        assert response.status == 502 and "not answering" in await response.text()


async def raw_request(env: Env, tunnel_id: str, head: bytes) -> bytes:
    host = f"{tunnel_id}.{DOMAIN}"
    reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port, ssl=env.ssl, server_hostname=host)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def test_no_open_proxy(env: Env) -> None:
    tunnel = await env.expose()
    host = f"{tunnel.id}.{DOMAIN}"
    answer = await raw_request(env, tunnel.id, f"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 405") or answer.startswith(b"HTTP/1.1 400"), answer[:80]
    absolute = f"GET http://127.0.0.1:{env.app_port}/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    answer = await raw_request(env, tunnel.id, absolute.encode())
    assert answer.startswith(b"HTTP/1.1 400") and b"ABSOLUTE_FORM_REFUSED" in answer


async def test_server_sent_events_stream_without_buffering(env: Env) -> None:
    tunnel = await env.expose()
    async with env.client.get(env.url(tunnel.id, "/sse")) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 2)
        second = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 2)
    assert (first, second) == (b"data: 0\n\n", b"data: 1\n\n")


async def test_upload_100_mb_and_download_stream(env: Env) -> None:
    tunnel = await env.expose()
    digest = hashlib.sha256()
    block = bytes(range(256)) * 4096  # 1 MiB

    async def body() -> AsyncIterator[bytes]:
        for _ in range(100):
            digest.update(block)
            yield block

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    async with env.client.post(env.url(tunnel.id, "/upload"), data=body()) as response:
        assert response.status == 200
        result = await response.json()
    assert result == {"bytes": 100 * MB, "sha256": digest.hexdigest()}
    # Client, gateway and app share this process: had anyone buffered the body, the peak would grow by 100 MB+.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 48 * 1024

    received = 0
    async with env.client.get(env.url(tunnel.id, "/download?mb=64")) as response:
        assert response.headers["Content-Length"] == str(64 * MB)
        async for chunk in response.content.iter_any():
            received += len(chunk)
    assert received == 64 * MB


async def test_websocket_echo_and_origin_check(env: Env) -> None:
    tunnel = await env.expose()
    origin = f"https://{tunnel.id}.{DOMAIN}:{env.server.port}"
    async with env.client.ws_connect(env.url(tunnel.id, "/ws"), origin=origin) as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=2)).data == "echo:hi"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=2)).data == b"\x00\x01"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await env.client.ws_connect(env.url(tunnel.id, "/ws"), origin="https://evil.example")
    assert refused.value.status == 403


async def test_password_login_page_session_cookie_basic_and_logout(env: Env) -> None:
    tunnel = await env.expose(label="Admin <UI>", password=PASSWORD)
    html = {"Accept": "text/html"}
    async with env.client.get(env.url(tunnel.id, "/headers")) as response:
        assert response.status == 401 and (await response.json())["code"] == "PASSWORD_REQUIRED"
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    async with env.client.get(env.url(tunnel.id, "/headers"), headers=html) as response:
        page = await response.text()
        assert response.status == 401 and 'type="password"' in page and "Admin &lt;UI&gt;" in page
        assert 'name="next" value="/headers"' in page
    login = env.url(tunnel.id, "/.gateway/login")
    form = {"password": "wrong password!", "next": "/headers"}
    async with env.client.post(login, data=form, headers=html, allow_redirects=False) as response:
        assert response.status == 401 and "Wrong password" in await response.text()
    form["password"] = PASSWORD
    async with env.client.post(login, data=form, allow_redirects=False) as response:
        assert response.status == 303 and response.headers["Location"] == "/headers"
        cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "Domain" not in cookie
    for attribute in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
        assert attribute in cookie
    token = cookie.split(";", 1)[0].split("=", 1)[1]
    assert isinstance(env.store, FileTunnelStore)
    stored = env.store.path.read_text()
    assert token not in stored and hashlib.sha256(token.encode()).hexdigest() in stored  # only its hash is kept
    with_session = {"Cookie": f"{COOKIE}={token}; app=1"}
    async with env.client.get(env.url(tunnel.id, "/headers"), headers=with_session) as response:
        assert response.status == 200
        headers = {k.lower(): v for k, v in (await response.json())["headers"]}
    assert headers["cookie"] == "app=1"  # the gateway's cookie never reaches the sandbox

    async with env.client.get(env.url(tunnel.id, "/headers"), headers=basic(PASSWORD)) as response:
        assert response.status == 200
        headers = {k.lower(): v for k, v in (await response.json())["headers"]}
    assert "authorization" not in headers
    async with env.client.get(env.url(tunnel.id), headers=basic("nope nope")) as response:
        assert response.status == 401 and (await response.json())["code"] == "WRONG_PASSWORD"

    # An open redirect through `next` is not possible.
    async with env.client.post(
        login, data={"password": PASSWORD, "next": "//evil.example/"}, allow_redirects=False
    ) as r:
        assert r.headers["Location"] == "/"
    # The session belongs to this tunnel only, and logout ends it.
    other = await env.expose(password=PASSWORD)
    async with env.client.get(env.url(other.id), headers=with_session) as response:
        assert response.status == 401
    async with env.client.get(env.url(tunnel.id, "/.gateway/logout"), headers=with_session, allow_redirects=False) as r:
        assert r.status == 303
    async with env.client.get(env.url(tunnel.id), headers=with_session) as response:
        assert response.status == 401


async def test_brute_force_is_throttled_per_client_and_per_tunnel(env: Env) -> None:
    tunnel = await env.expose(password=PASSWORD)
    login = env.url(tunnel.id, "/.gateway/login")
    statuses = []
    for _ in range(4):
        async with env.client.post(login, data={"password": "guess-guess"}, allow_redirects=False) as response:
            statuses.append(response.status)
    assert statuses[:3] == [401, 401, 401] and statuses[3] == 429
    # While locked, even the right password is not checked.
    async with env.client.get(env.url(tunnel.id), headers=basic(PASSWORD)) as response:
        assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
    # Another client address is not locked by the first one's failures...
    async with env.session(local_addr=("127.0.0.3", 0)) as other:
        async with other.get(env.url(tunnel.id), headers=basic(PASSWORD)) as response:
            assert response.status == 200
        # ...but the tunnel's bucket (6 attempts, 2 more a second) holds every client's attempts together:
        # once many addresses have spent it, everyone waits a moment, and never longer than 1 / rate.
        throttled = None
        for n in range(4, 30):
            async with (
                env.session(local_addr=(f"127.0.0.{n}", 0)) as guesser,
                guesser.get(env.url(tunnel.id), headers=basic("guess-again")) as response,
            ):
                if response.status == 429:
                    throttled = response
                    break
        assert throttled is not None and throttled.headers["Retry-After"] == "1"
        # The sign-in form (a Basic password that was right before is remembered, so it would not be checked):
        # the bucket holds the right password too, until a token is back after 1 / rate = 0.5 s.
        form = {"password": PASSWORD, "next": "/"}
        async with env.session(local_addr=("127.0.0.30", 0)) as right:
            async with right.post(login, data=form, allow_redirects=False) as response:
                assert response.status == 429 and response.headers["Retry-After"] == "1"
            env.clock.advance(0.25)  # half a token back
            async with right.post(login, data=form, allow_redirects=False) as response:
                assert response.status == 429
            env.clock.advance(0.25)
            async with right.post(login, data=form, allow_redirects=False) as response:
                assert response.status == 303
    records = await env.records(tunnel)
    # One record per attempt, the refused ones as denials with their reason (and no other log line for them).
    reasons = [r["reason"] for r in records if r["verdict"] == "deny"]
    assert reasons.count("tunnel WRONG_PASSWORD") == 5 and "tunnel TOO_MANY_ATTEMPTS" in reasons


async def test_revocation_closes_open_websocket_and_sse(env: Env) -> None:
    tunnel = await env.expose()
    ws = await env.client.ws_connect(env.url(tunnel.id, "/ws"))
    await ws.send_str("x")
    assert (await ws.receive(timeout=2)).data == "echo:x"
    sse = await env.client.get(env.url(tunnel.id, "/sse"))
    await asyncio.wait_for(sse.content.readuntil(b"\n\n"), 2)
    assert await wait_until_async(lambda: env.server.cutter.live_connections(tunnel.id) == 2, 2)

    started = time.monotonic()
    await env.store.revoke(tunnel.id)
    message = await ws.receive(timeout=2)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.IncompleteReadError)):
        for _ in range(100):
            await asyncio.wait_for(sse.content.readuntil(b"\n\n"), 2)
    assert time.monotonic() - started < 2
    await ws.close()
    sse.close()
    async with env.client.get(env.url(tunnel.id)) as response:
        assert response.status == 410


async def test_expiry_and_sandbox_deletion_end_tunnels_and_connections(env: Env) -> None:
    tunnel = await env.expose()
    # Bring the expiry close instead of waiting for the minimum ttl: the record as another node would write it.
    soon = time.time() + 0.5
    assert isinstance(env.store, FileTunnelStore)
    data = json.loads(env.store.path.read_text())
    data["tunnels"][tunnel.id]["expires_at"] = soon
    write_atomic(env.store.path, json.dumps(data).encode())
    assert await wait_until_async(lambda: env.store.get(tunnel.id).expires_at == soon, 2)  # the store polls the file
    ws = await env.client.ws_connect(env.url(tunnel.id, "/ws"))
    message = await ws.receive(timeout=3)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await ws.close()
    async with env.client.get(env.url(tunnel.id)) as response:
        assert response.status == 410

    other = await env.expose()
    ws = await env.client.ws_connect(env.url(other.id, "/ws"))
    await env.policy.delete_sandbox("sb1")  # as if by a file edit or another service: no API involved
    message = await ws.receive(timeout=3)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await ws.close()
    async with env.client.get(env.url(other.id)) as response:
        assert response.status == 410
    assert await wait_until_async(lambda: env.store.get(other.id).revoked_reason == "sandbox_deleted", 3)


async def test_certificate_files_are_reloaded_when_they_change(env: Env, tmp_path: Path) -> None:
    tunnel = await env.expose()

    async def served_serial() -> int:
        host = f"{tunnel.id}.{DOMAIN}"
        context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
        _, writer = await asyncio.open_connection("127.0.0.1", env.server.port, ssl=context, server_hostname=host)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der).serial_number

    first = await served_serial()
    make_certs(tmp_path / "certs", force=True)  # a renewal (new CA too: the client reloads it above)
    assert await served_serial() != first


async def test_tunnels_survive_a_restart(env: Env, tmp_path: Path) -> None:
    tunnel = await env.expose(password=PASSWORD)
    token = await env.store.create_session(tunnel.id, 60)
    again = FileTunnelStore(env.policy.state, env.store.config, tmp_path / "tunnels.json")
    await again.start()
    try:
        assert again.get(tunnel.id) == tunnel and again.alive(tunnel)
        assert await again.find_session(token, tunnel.id)  # browsers stay logged in across a restart
    finally:
        await again.close()


async def test_redis_store_shares_tunnels_and_revocations_across_nodes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    policy = EmbeddedStore(CONTEXT, StoreConfig(path=tmp_path / "policies.json", poll_interval=0.05))
    await policy.start()
    await policy.create_sandbox(SANDBOX)
    config = TunnelConfig(max_per_sandbox=2)
    nodes = [RedisTunnelStore(policy.state, config, redis_server.url, "gwtest:") for _ in range(2)]
    for node in nodes:
        await node.start()
    try:
        ended: list[str] = []
        nodes[1].add_listener(lambda t: ended.append(t.id))
        tunnel = await nodes[0].create("sb1", {"port": 3000, "password": PASSWORD})
        assert await wait_until_async(lambda: tunnel.id in nodes[1].tunnels, 1)
        assert nodes[1].tunnels[tunnel.id] == tunnel
        started = time.monotonic()
        await nodes[0].revoke(tunnel.id)
        assert await wait_until_async(lambda: ended == [tunnel.id], 1)
        assert time.monotonic() - started < 1 and not nodes[1].alive(nodes[1].get(tunnel.id))
        restarted = RedisTunnelStore(policy.state, config, redis_server.url, "gwtest:")
        await restarted.start()
        assert restarted.get(tunnel.id).revoked_at is not None
        await restarted.close()

        # Login sessions: made on one node, honoured at once on the other, ended everywhere by logout.
        live = await nodes[0].create("sb1", {"port": 3001, "password": PASSWORD})
        assert await wait_until_async(lambda: live.id in nodes[1].tunnels, 1)
        token = await nodes[0].create_session(live.id, 60)
        assert await nodes[1].find_session(token, live.id)
        assert not await nodes[1].find_session(token, tunnel.id)  # bound to its tunnel
        await nodes[0].end_session(token)
        assert await wait_until_async(lambda: not nodes[1].sessions, 1)
        assert not await nodes[1].find_session(token, live.id)
        # Revoking the tunnel drops its sessions from the store too.
        token = await nodes[0].create_session(live.id, 60)
        await nodes[1].revoke(live.id)
        assert await wait_until_async(lambda: not nodes[0].sessions and not nodes[1].sessions, 3)
    finally:
        for node in nodes:
            await node.close()
        await policy.close()


# --------------------------------------------------------------------------- a real browser


CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    # The browser reaches nothing but the tunnel: every name maps to loopback, nothing else resolves.
    f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1, EXCLUDE localhost",
]


def trusting_home(tmp_path: Path, ca: Path) -> Path:
    """A HOME whose NSS database trusts the test CA, as a person would after `gateway certs init`."""
    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, timeout=30)
    subprocess.run(
        ["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "gateway-test-ca", "-i", str(ca)],
        check=True,
        timeout=30,
    )
    return home


@pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which("certutil") is None, reason="needs /usr/bin/chromium and certutil"
)
async def test_browser_login_app_websocket_and_revocation(env: Env, tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    output = Path(__file__).resolve().parents[2] / "test-output" / "tunnel"
    output.mkdir(parents=True, exist_ok=True)
    tunnel = await env.expose(label="Browser demo", password=PASSWORD)
    home = trusting_home(tmp_path, env.ca)
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=BROWSER_ARGS,
            env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
            timeout=30_000,
        )
        try:
            page = await browser.new_page()  # certificate errors are NOT ignored: the CA is trusted via NSS
            response = await page.goto(env.url(tunnel.id), timeout=15_000)
            assert response is not None and response.status == 401
            assert await page.locator("h1").inner_text() == "Browser demo"
            await page.screenshot(path=str(output / "login.png"))
            await page.fill("#password", "not the password")
            await page.click("button[type=submit]")
            await page.wait_for_selector("#error", timeout=10_000)
            assert "Wrong password" in await page.locator("#error").inner_text()
            await page.fill("#password", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_selector("text=hello from the sandbox", timeout=10_000)
            await page.wait_for_function("document.getElementById('echo').textContent === 'echo:ping'", timeout=10_000)
            assert await page.locator("#state").inner_text() == "open"
            await page.screenshot(path=str(output / "app.png"))

            await env.store.revoke(tunnel.id)
            await page.wait_for_function(
                "document.getElementById('state').textContent.startsWith('closed')", timeout=5_000
            )
            response = await page.reload(timeout=15_000)
            assert response is not None and response.status == 410
            assert "This preview has ended" in await page.content()
            await page.screenshot(path=str(output / "revoked.png"))
        finally:
            await browser.close()


# --------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from gateway.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


async def test_cli_certs_init_and_tunnel_commands(env: Env, tmp_path: Path) -> None:
    from aiohttp.test_utils import TestServer

    from gateway.api import create_app
    from gateway.settings import load_config

    code, text = run_cli(["certs", "init", "--dir", str(tmp_path / "cli-certs"), "--domain", DOMAIN])
    assert code == 0 and "created CA and certificate" in text and (tmp_path / "cli-certs" / "tunnel.key").exists()

    config = load_config(environ={})
    server = TestServer(
        create_app(
            env.policy,
            host=config.api.host,
            port=config.api.port,
            tokens=config.api.tokens,
            tunnels=env.store,
        ),
        host="127.0.0.1",
    )
    await server.start_server()
    try:
        api = f"http://127.0.0.1:{server.port}"
        secret = tmp_path / "password.txt"
        secret.write_text(PASSWORD + "\n")
        argv = ["tunnel", "expose", "sb1", str(env.app_port), "--label", "cli", "--password-file", str(secret)]
        code, text = await asyncio.to_thread(run_cli, [*argv, "--api", api, "--json"])
        assert code == 0, text
        created = json.loads(text.strip().splitlines()[-1])  # the same process also logs to stdout
        assert created["password_protected"] and PASSWORD not in text
        code, text = await asyncio.to_thread(run_cli, ["tunnel", "list", "sb1", "--api", api])
        assert code == 0 and created["id"] in text
        code, text = await asyncio.to_thread(run_cli, ["tunnel", "revoke", created["id"], "--api", api])
        assert code == 0 and "revoked" in text
        assert not env.store.alive(env.store.get(created["id"]))
    finally:
        await server.close()


async def test_a_second_node_on_the_same_file_sees_new_tunnels_and_revocations(env: Env, tmp_path: Path) -> None:
    other = FileTunnelStore(env.policy.state, env.store.config, tmp_path / "tunnels.json")
    await other.start()
    try:
        ended: list[str] = []
        other.add_listener(lambda t: ended.append(t.id))
        tunnel = await env.expose()
        assert await wait_until_async(lambda: tunnel.id in other.tunnels, 2)
        await env.store.revoke(tunnel.id)
        assert await wait_until_async(lambda: ended == [tunnel.id], 2)
        # And the other way round: a revocation written by the second node reaches the serving one.
        second = await env.expose()
        assert await wait_until_async(lambda: second.id in other.tunnels, 2)
        await other.revoke(second.id)
        assert await wait_until_async(lambda: not env.store.alive(env.store.get(second.id)), 2)
    finally:
        await other.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_upload_with_expect_continue_and_basic_auth(env: Env, tmp_path: Path) -> None:
    tunnel = await env.expose(password=PASSWORD)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"z" * (8 * MB))
    host = f"{tunnel.id}.{DOMAIN}"
    command = [
        "curl", "--silent", "--show-error", "--fail", "--noproxy", "*", "--max-time", "20",
        "--cacert", str(env.ca), "--resolve", f"{host}:{env.server.port}:127.0.0.1",
        "--user", f"me:{PASSWORD}", "-H", "Expect: 100-continue", "--expect100-timeout", "10",
        "--data-binary", f"@{payload}", env.url(tunnel.id, "/upload"),
    ]  # fmt: skip
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert json.loads(stdout)["bytes"] == 8 * MB
    assert time.monotonic() - started < 5  # curl would have waited 10 s for a 100 Continue that never came


async def test_an_upstream_that_is_not_http_is_a_502(env: Env) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, APP_HOST, 0)
    try:
        tunnel = await env.expose(port=server.sockets[0].getsockname()[1])
        async with env.client.get(env.url(tunnel.id)) as response:
            assert response.status == 502 and (await response.json())["code"] == "UPSTREAM_ERROR"
    finally:
        server.close()
        await server.wait_closed()


async def test_tunnel_service_wires_store_and_server_beside_the_policy_store(tmp_path: Path) -> None:
    from gateway.settings import load_config

    paths = make_certs(tmp_path / "certs")
    config = load_config(environ={"GATEWAY_STORE__PATH": str(tmp_path / "policies.json")})
    policy = EmbeddedStore(CONTEXT, config.store)
    await policy.start()
    tunnel_config = TunnelConfig(cert_path=paths.cert, key_path=paths.key, port=free_port("127.0.0.1"))
    service = TunnelService(policy, tunnel_config, policy_path=config.store.path)
    await service.start()
    try:
        await policy.create_sandbox(SANDBOX)
        tunnel = await service.store.create("sb1", {"port": 9})
        assert (tmp_path / "tunnels.json").exists()  # next to the policy file
        connector = aiohttp.TCPConnector(
            ssl=ssl.create_default_context(cafile=str(paths.ca_cert)), resolver=TunnelResolver()
        )
        async with aiohttp.ClientSession(connector=connector) as client:
            url = f"https://{tunnel.id}.{DOMAIN}:{service.server.port}/"
            async with client.get(url) as response:
                assert response.status == 502  # nothing listens on port 9: the whole path works up to the sandbox
    finally:
        await service.close()
        await policy.close()


# --------------------------------------------------------------------------- the lean proxy path


async def test_keep_alive_to_the_app_and_a_stale_pooled_connection_is_retried(env: Env) -> None:
    """Requests reuse one connection to the app; when the app has closed a pooled connection meanwhile (it
    reads the next request and hangs up without answering), the gateway retries once on a new one."""
    accepted: list[int] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        served = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if served == 3:
                    break  # hang up on the 4th request, unanswered
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(app, APP_HOST, 0)
    try:
        tunnel = await env.expose(port=server.sockets[0].getsockname()[1])
        for _ in range(5):
            async with env.client.get(env.url(tunnel.id)) as response:
                assert response.status == 200 and await response.read() == b"ok"
        assert len(accepted) == 2  # three answers on the first connection, the retried request on the second
    finally:
        env.server.pool.close()  # the pooled connection would keep the app server's wait_closed() waiting
        server.close()
        await server.wait_closed()


async def test_a_chunked_upload_streams_to_the_app_before_it_ends(env: Env) -> None:
    tunnel = await env.expose()
    release = asyncio.Event()
    seen = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await asyncio.wait_for(release.wait(), 5)  # the rest only once the app has the first part
        yield b"b" * 1000

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        size = int((await reader.readline()).strip(), 16)
        first = await reader.readexactly(size + 2)
        seen.set()
        release.set()
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            rest += await reader.read(4096)
        body = f"{len(first) - 2} then {len(rest)}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(app, APP_HOST, 0)
    try:
        tunnel = await env.expose(port=server.sockets[0].getsockname()[1])
        async with env.client.post(env.url(tunnel.id, "/up"), data=body()) as response:
            assert response.status == 200
            assert (await response.read()).startswith(b"1000 then")
        assert seen.is_set()
    finally:
        server.close()
        await server.wait_closed()


async def test_an_http10_client_gets_a_chunked_answer_delimited_by_the_close(env: Env) -> None:
    tunnel = await env.expose()
    host = f"{tunnel.id}.{DOMAIN}"
    answer = await raw_request(env, tunnel.id, f"GET /sse HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert b"Connection: close" in head and body.startswith(b"data: 0\n\n")


async def test_revocation_sends_the_websocket_client_a_policy_close(env: Env) -> None:
    tunnel = await env.expose()
    async with env.client.ws_connect(env.url(tunnel.id, "/ws")) as ws:
        await ws.send_str("x")
        assert (await ws.receive(timeout=2)).data == "echo:x"
        await env.store.revoke(tunnel.id)
        message = await ws.receive(timeout=2)
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1008


async def test_the_tunnel_limit_holds_across_nodes_creating_at_the_same_instant(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    policy = EmbeddedStore(CONTEXT, StoreConfig(path=tmp_path / "policies.json", poll_interval=0.05))
    await policy.start()
    await policy.create_sandbox(SANDBOX)
    config = TunnelConfig(max_per_sandbox=3)
    nodes = [RedisTunnelStore(policy.state, config, redis_server.url, "gwrace:") for _ in range(2)]
    for node in nodes:
        await node.start()
    try:
        # Each node sees no tunnels yet, so each alone would let all of its own through: only Redis can say no.
        attempts = [node.create("sb1", {"port": 3000 + i}) for i in range(3) for node in nodes]
        results = await asyncio.gather(*attempts, return_exceptions=True)
        made = [r for r in results if isinstance(r, Tunnel)]
        refused = [r for r in results if not isinstance(r, Tunnel)]
        assert len(made) == 3 and len(refused) == 3
        assert all(getattr(r, "code", None) == "TOO_MANY_TUNNELS" for r in refused)
        assert await wait_until_async(
            lambda: all(len([t for t in n.tunnels.values() if n.alive(t)]) == 3 for n in nodes), 2
        )
        # A revoked tunnel frees its place, on either node.
        await nodes[1].revoke(made[0].id)
        again = await nodes[0].create("sb1", {"port": 4000})
        assert again.sandbox == "sb1"
        with pytest.raises(Exception, match="live tunnels"):
            await nodes[1].create("sb1", {"port": 4001})
        # A node restarted over records from before the index existed puts them in it.
        client = Redis.from_url(redis_server.url)
        await client.delete("gwrace:tunnels-of:sb1")
        await client.aclose()
        restarted = RedisTunnelStore(policy.state, config, redis_server.url, "gwrace:")
        await restarted.start()
        try:
            with pytest.raises(Exception, match="live tunnels"):
                await restarted.create("sb1", {"port": 4002})
        finally:
            await restarted.close()
    finally:
        for node in nodes:
            await node.close()
        await policy.close()
