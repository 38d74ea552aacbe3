"""The inspection addon in the tier's real mitmproxy process (`gateway.tier.proxy`, loopback, ports from the OS), in
front of a real TLS origin that echoes what it receives, driven the way the engine hands a connection over: the
hand-over line (token, vetted address, context) and the tier's one-byte acceptance, then TLS to the origin's name
through the tier's CA (curl behind a local hand-over relay that stands in for the engine, or a raw socket when the
bytes themselves are the point).

The origin (aiohttp, test CA from tests/factory.make_pki) answers every request with a JSON echo of its method,
path and headers, also echoing Authorization into a response header; /redirect answers 302 to another host;
/gzip compresses whatever the client asked for. It remembers what it saw, so a test can prove a refused request
never reached it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from gateway.addons.enforce import MAX_SCRUB_BYTES, REDACTED
from gateway.demo.run import pump
from gateway.flowlog import FlowRecord
from gateway.inspection import HANDOVER_ACCEPTED, Credential, InspectionContext, InspectRule, handover_line
from gateway.tier.supervisor import tier_command
from tests.factory import REPO, free_port, make_pki, wait_until

TOKEN = "per-run-token-0123456789"
SECRET = "ghp_Secret/Value+42&x"  # JSON- and percent-escaping both change it: the scrubber must see every form
HOST = "allowed.test"
OTHER = "denied.test"  # another name of the origin's certificate: the redirect target


@dataclass
class Origin:
    cert: Path
    key: Path
    seen: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> tuple[int, int]:
        self.tls_sock, self.plain_sock = socket.socket(), socket.socket()
        for sock in (self.tls_sock, self.plain_sock):
            sock.bind(("127.0.0.1", 0))
        self.loop = asyncio.new_event_loop()
        self.ready, self.stop = threading.Event(), asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        return self.tls_sock.getsockname()[1], self.plain_sock.getsockname()[1]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    async def _serve(self) -> None:
        from aiohttp import web

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.SockSite(runner, self.tls_sock, ssl_context=context).start()
        await web.SockSite(runner, self.plain_sock).start()
        self.ready.set()
        await self.stop.wait()
        await runner.cleanup()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        seen = {"method": request.method, "path": request.path_qs, "headers": list(request.headers.items())}
        seen["body"] = (await request.read()).decode(errors="replace")
        self.seen.append(seen)
        if request.path == "/ws":  # a WebSocket that tells the client what Authorization it was opened with
            socket_response = web.WebSocketResponse()
            await socket_response.prepare(request)
            await socket_response.send_str(f"opened with {request.headers.get('Authorization', '-')}")
            await socket_response.close()
            return socket_response
        if request.path == "/big":  # above what the tier scrubs
            return web.Response(body=b"x" * (MAX_SCRUB_BYTES + 1))
        if request.path == "/weird":  # an encoding the tier cannot decode, so cannot scrub
            return web.Response(body=b"opaque", headers={"Content-Encoding": "x-private"})
        if request.path == "/redirect":
            return web.Response(status=302, headers={"Location": f"https://{OTHER}:{request.url.port}/echo"})
        echoed = {"X-Echo-Authorization": request.headers.get("Authorization", "-")}
        echo = web.Response(text=json.dumps(seen), headers=echoed)
        if request.path == "/gzip":
            echo.enable_compression(web.ContentCoding.gzip)  # whatever Accept-Encoding said
        return echo

    def saw(self, marker: str) -> list[dict[str, Any]]:
        return [request for request in self.seen if marker in request["path"]]


@dataclass
class Tier:
    proxy_port: int
    tls_port: int
    plain_port: int
    confdir: Path
    origin: Origin
    records_fd: int
    log: Path
    _buffer: bytes = b""

    def records(self) -> list[dict[str, Any]]:
        """Every flow record the addon wrote so far (raw lines kept for the secret check)."""
        try:
            while chunk := os.read(self.records_fd, 65536):
                self._buffer += chunk
        except BlockingIOError:
            pass
        return [json.loads(line) for line in self._buffer.splitlines()]

    def raw_records(self) -> bytes:
        self.records()
        return self._buffer


def rule(**changes: Any) -> InspectRule:
    base = InspectRule(
        hosts=(HOST,),
        methods=("GET", "HEAD"),
        paths=("/echo", "/repos/*", "/redirect", "/gzip", "/ws", "/big", "/weird"),
        deny_reason="read-only GitHub",
        credentials=(Credential("authorization", "github", "Bearer {secret}"),),
    )
    return replace(base, **changes)


def context(port: int, host: str = HOST, **changes: Any) -> InspectionContext:
    inspect = replace(rule(**changes), hosts=(host,), ports=(port,))
    return InspectionContext("sb-1", host, port, host, inspect, "10.75.0.10", 40000, "198.18.1.1", port)


def start_tier(
    directory: Path, script: Path, port: int, log: Path, options: Sequence[str], pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:
    """The tier's process with the addon as the supervisor starts it (loopback, lazy upstream), listening."""
    command = tier_command(
        port, directory / "confdir", script, [f"gateway_token={TOKEN}", "connection_strategy=lazy", *options]
    )
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, pass_fds=pass_fds)
    assert wait_until(lambda: b"proxy listening" in log.read_bytes() or process.poll() is not None, timeout=30)
    assert process.poll() is None, log.read_text()
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    directory = tmp_path_factory.mktemp("inspect")
    ca, cert, key = make_pki(directory)
    origin = Origin(cert, key)
    tls_port, plain_port = origin.start()
    secrets = directory / "secrets.json"
    secrets.write_text(json.dumps({"github": SECRET}))
    secrets.chmod(0o600)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    port, log = free_port(), directory / "tier.log"
    options = [f"gateway_records_fd={write_fd}", f"gateway_secrets={secrets}", f"ssl_verify_upstream_trusted_ca={ca}"]
    process = start_tier(directory, REPO / "addons" / "inspect.py", port, log, options, pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        yield Tier(port, tls_port, plain_port, directory / "confdir", origin, read_fd, log)
    finally:
        stop(process)
        origin.close()
        os.close(read_fd)
    # A hook that raised would have been logged and skipped by mitmproxy: every test above then proved less.
    assert b"Addon error" not in log.read_bytes(), log.read_text()


@dataclass
class Answer:
    status: int  # 0: none
    headers: str
    body: str
    exit_code: int

    def header(self, name: str) -> list[str]:
        """The values of `name` in the final response."""
        block = self.headers.replace("\r\n", "\n").strip().split("\n\n")[-1]
        pairs = [line.split(":", 1) for line in block.splitlines()[1:] if ":" in line]
        return [value.strip() for key, value in pairs if key.strip().lower() == name.lower()]


def open_hand_over(tier: Tier, ctx: InspectionContext, token: str = TOKEN, line: bytes | None = None) -> socket.socket:
    """A connection to the tier that has sent the engine's hand-over line (or `line`) for `ctx`, to 127.0.0.1."""
    sock = socket.create_connection(("127.0.0.1", tier.proxy_port), timeout=10)
    sock.sendall(line if line is not None else handover_line(token, "127.0.0.1", ctx.port, ctx))
    return sock


def accepted(sock: socket.socket) -> bool:
    """The tier's answer to the line: its acceptance byte, or the connection closed with nothing written."""
    answer = sock.recv(64)
    assert answer in (HANDOVER_ACCEPTED, b""), answer
    return answer == HANDOVER_ACCEPTED


@contextlib.contextmanager
def relayed(tier: Tier, ctx: InspectionContext, token: str) -> Iterator[int]:
    """A local port whose one connection is handed over to the tier as the engine does it (line, then acceptance)
    and relayed: what curl dials in place of the engine. A refused hand-over closes curl's connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(15)

    def serve() -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        client.settimeout(15)
        with client, open_hand_over(tier, ctx, token) as upstream:
            upstream.settimeout(15)
            if not accepted(upstream):
                return
            back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
            back.start()
            pump(client, upstream)
            back.join(15)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(20)


def curl(
    tier: Tier,
    ctx: InspectionContext,
    path: str,
    *args: str,
    host: str = HOST,
    plain: bool = False,
    token: str = TOKEN,
) -> Answer:
    """One request through the tier, curl's connection handed over to it as the engine would."""
    port = tier.plain_port if plain else tier.tls_port
    scheme = "http" if plain else "https"
    out = tier.confdir.parent
    for name in ("headers", "body"):
        (out / name).unlink(missing_ok=True)
    with relayed(tier, ctx, token) as relay_port:
        command = [
            "curl", "-sS", "--max-time", "10",
            "--cacert", str(tier.confdir / "mitmproxy-ca-cert.pem"),
            "--connect-to", f"{host}:{port}:127.0.0.1:{relay_port}",
            "-D", str(out / "headers"), "-o", str(out / "body"), "-w", "%{http_code}",
            *args, f"{scheme}://{host}:{port}{path}",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    files = {name: (out / name).read_text() if (out / name).exists() else "" for name in ("headers", "body")}
    return Answer(int(done.stdout), files["headers"], files["body"], done.returncode)


def raw(tier: Tier, ctx: InspectionContext, request: bytes, *, sni: str = HOST) -> bytes:
    """The hand-over by hand, then `request` as bytes over TLS; everything the tier answers until it closes."""
    with open_hand_over(tier, ctx) as sock:
        assert accepted(sock)
        client = ssl.create_default_context(cafile=str(tier.confdir / "mitmproxy-ca-cert.pem"))
        client.set_alpn_protocols(["http/1.1"])
        with client.wrap_socket(sock, server_hostname=sni) as tls:
            tls.sendall(request)
            answer = b""
            try:
                while chunk := tls.recv(65536):
                    answer += chunk
            except (TimeoutError, ssl.SSLError, ConnectionResetError):
                pass
            return answer


def h2(tier: Tier, ctx: InspectionContext, headers: Sequence[tuple[str, str]]) -> tuple[int, list[str]]:
    """One HTTP/2 request (headers exactly as given, unvalidated) after a hand-over: (status or 0, event names)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ConnectionTerminated, ResponseReceived, StreamEnded, StreamReset

    with open_hand_over(tier, ctx) as sock:
        assert accepted(sock)
        client = ssl.create_default_context(cafile=str(tier.confdir / "mitmproxy-ca-cert.pem"))
        client.set_alpn_protocols(["h2"])
        with client.wrap_socket(sock, server_hostname=HOST) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            config = H2Configuration(
                client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
            )
            conn = H2Connection(config)
            conn.initiate_connection()
            conn.send_headers(1, list(headers), end_stream=True)
            tls.sendall(conn.data_to_send())
            status, seen = 0, []
            while True:
                data = tls.recv(65536)
                if not data:
                    return status, seen
                for event in conn.receive_data(data):
                    seen.append(type(event).__name__)
                    if isinstance(event, ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    if isinstance(event, StreamEnded | StreamReset | ConnectionTerminated):
                        return status, seen
                tls.sendall(conn.data_to_send())


def made_by_the_tier(answer: bytes) -> bool:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    return b"\r\nserver: mitmproxy" in head or b"\r\nx-gateway-reason:" in head


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# --------------------------------------------------------------------------- HTTP rules


def test_get_allowed_and_post_denied_with_the_reason(tier: Tier) -> None:
    ok = curl(tier, context(tier.tls_port), "/echo?case=get")
    assert ok.status == 200
    assert json.loads(ok.body)["method"] == "GET"
    injected = [v for k, v in tier.origin.saw("case=get")[-1]["headers"] if k.lower() == "authorization"]
    assert injected == [f"Bearer {SECRET}"]  # also when the sandbox sent no copy of its own
    denied = curl(tier, context(tier.tls_port), "/echo?case=post", "-X", "POST", "--data", "x=1")
    assert denied.status == 403
    assert denied.header("X-Gateway-Reason") == ["read-only GitHub"]
    assert denied.header("X-Gateway-Rule") == [f"inspect {HOST}"]
    [denial_id] = denied.header("X-Gateway-Denial-Id")
    assert denied.body == (
        f"Blocked by sandbox egress policy: read-only GitHub\nDenial id: {denial_id} (quote it to the operator)\n"
    )
    assert tier.origin.saw("case=get") and not tier.origin.saw("case=post")
    # The request's record carries the id (what GET /v1/denials/{id} finds).
    assert wait_until(lambda: [r for r in tier.records() if r["denial_id"] == denial_id])


def test_a_path_rule_and_dot_segments(tier: Tier) -> None:
    assert curl(tier, context(tier.tls_port), "/repos/a/b?case=repo").status == 200
    assert curl(tier, context(tier.tls_port), "/admin?case=admin").status == 403
    for sneaky in ("/repos/%2e%2e/admin?case=dots", "/repos/%252E%252E/admin?case=dots2"):
        assert curl(tier, context(tier.tls_port), sneaky, "--path-as-is").status == 400
    assert tier.origin.saw("case=repo")
    assert not tier.origin.saw("case=admin") and not tier.origin.saw("case=dots")


def test_trace_is_refused_whatever_the_entry_allows(tier: Tier) -> None:
    anything = context(tier.tls_port, methods=(), paths=(), deny_reason="")
    answer = curl(tier, anything, "/echo?case=trace", "-X", "TRACE")
    assert answer.status == 403 and "TRACE" in answer.body
    assert not tier.origin.saw("case=trace")


# --------------------------------------------------------------------------- credentials


def assert_secret_free(answer: Answer) -> None:
    for form in (SECRET, json.dumps(SECRET)[1:-1], urllib.parse.quote(SECRET, safe="")):
        assert form not in answer.headers and form not in answer.body


@pytest.mark.parametrize("path", ["/echo?case=inject", "/gzip?case=inject-gzip"])
def test_the_secret_reaches_the_origin_and_never_the_sandbox(tier: Tier, path: str) -> None:
    answer = curl(tier, context(tier.tls_port), path, "-H", "Authorization: Bearer sandbox-placeholder",
                  "-H", "Accept-Encoding: gzip", "--compressed")  # fmt: skip
    assert answer.status == 200
    seen = tier.origin.saw(path.split("?")[1])[-1]
    assert [v for k, v in seen["headers"] if k.lower() == "authorization"] == [f"Bearer {SECRET}"]  # copy replaced
    assert_secret_free(answer)
    assert answer.header("X-Echo-Authorization") == ["Bearer [REDACTED]"]
    assert json.loads(answer.body)["headers"]  # the echo itself still arrives, scrubbed
    assert "Bearer [REDACTED]" in answer.body and "sandbox-placeholder" not in answer.body


@pytest.mark.parametrize("path", ["/big", "/weird"])
def test_a_response_that_cannot_be_scrubbed_is_refused(tier: Tier, path: str) -> None:
    answer = curl(tier, context(tier.tls_port), path)
    assert answer.status == 502 and answer.header("X-Gateway-Reason")
    assert "scrubbed" in answer.body
    # The same answers pass untouched where no secret was sent: scrubbing is for entries with credentials.
    plain = curl(tier, context(tier.tls_port, credentials=()), path)
    assert plain.status == 200


def test_websocket_messages_from_the_origin_are_scrubbed(tier: Tier) -> None:
    key = base64.b64encode(b"0123456789abcdef").decode()
    upgrade = (f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    answer = raw(tier, context(tier.tls_port), upgrade.encode())
    assert status_of(answer) == 101
    assert f"opened with Bearer {REDACTED}".encode() in answer and SECRET.encode() not in answer
    assert [v for k, v in tier.origin.saw("/ws")[-1]["headers"] if k.lower() == "authorization"] == [f"Bearer {SECRET}"]


def test_a_redirect_to_another_host_carries_no_secret(tier: Tier) -> None:
    first = curl(tier, context(tier.tls_port), "/redirect?case=redirect")
    assert first.status == 302 and first.header("Location") == [f"https://{OTHER}:{tier.tls_port}/echo"]
    # The client follows: a new connection to another host, which the engine hands over with that host's entry.
    other = context(tier.tls_port, host=OTHER, credentials=())
    second = curl(tier, other, "/echo?case=followed", "-H", "Authorization: sandbox-own", host=OTHER)
    assert second.status == 200
    seen = tier.origin.saw("case=followed")[-1]
    assert [v for k, v in seen["headers"] if k.lower() == "authorization"] == ["sandbox-own"]


def test_plain_http_gets_no_secret_and_loses_the_sandbox_copy(tier: Tier) -> None:
    answer = curl(tier, context(tier.plain_port), "/echo?case=plain", "-H", "Authorization: sandbox", plain=True)
    assert answer.status == 200
    seen = tier.origin.saw("case=plain")[-1]
    assert not [v for k, v in seen["headers"] if k.lower() == "authorization"]


# --------------------------------------------------------------------------- who may talk, and about which host


def test_a_wrong_token_is_refused(tier: Tier) -> None:
    answer = curl(tier, context(tier.tls_port), "/echo?case=token", token="wrong-token")
    assert answer.status == 0 and answer.exit_code != 0
    assert not tier.origin.saw("case=token")
    assert wait_until(lambda: b"inspect.handover_refused error='the hand-over token is wrong'" in tier.log.read_bytes())


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ("a name", "does not appear to be an IPv4 or IPv6 address"),  # mitmproxy would resolve it
        ("another port", "is not the context's"),
        ("no context", "the hand-over's context is not the engine's"),
        ("the tier itself", "the hand-over names the tier itself"),
        ("an HTTP request", "not a GATEWAY-HANDOVER/1 line"),  # a client that did not come through the engine
        ("a CONNECT", "not a GATEWAY-HANDOVER/1 line"),
    ],
)
def test_a_hand_over_must_name_a_vetted_address_and_carry_the_engines_context(tier: Tier, shape: str, why: str) -> None:
    ctx = context(tier.tls_port)
    line = {
        "a name": handover_line(TOKEN, HOST, tier.tls_port, ctx),
        "another port": handover_line(TOKEN, "127.0.0.1", tier.plain_port, ctx),
        "no context": handover_line(TOKEN, "127.0.0.1", tier.tls_port, ctx).rsplit(b" ", 1)[0] + b" bm90IGpzb24=\n",
        "the tier itself": handover_line(TOKEN, "127.0.0.1", tier.proxy_port, context(tier.proxy_port)),
        "an HTTP request": f"GET http://127.0.0.1:{tier.plain_port}/echo HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
        "a CONNECT": f"CONNECT 127.0.0.1:{tier.tls_port} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
    }[shape]
    with open_hand_over(tier, ctx, line=line) as sock:
        assert not accepted(sock)  # closed, and nothing written: the engine's relay would pass it to the sandbox
    assert wait_until(lambda: why.encode() in tier.log.read_bytes())
    with open_hand_over(tier, ctx) as sock:  # the guard of this test: the engine's own line is accepted
        assert accepted(sock)


def test_host_other_than_the_sni_is_421(tier: Tier) -> None:
    answer = curl(tier, context(tier.tls_port), "/echo?case=fronting", "-H", f"Host: {OTHER}")
    assert answer.status == 421 and OTHER in answer.body
    assert not tier.origin.saw("case=fronting")


def test_an_absolute_form_target_must_name_the_host_too(tier: Tier) -> None:
    request = (
        f"GET https://{OTHER}:{tier.tls_port}/echo?case=absolute HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )
    answer = raw(tier, context(tier.tls_port), request.encode())
    assert status_of(answer) == 421 and made_by_the_tier(answer)
    assert not tier.origin.saw("case=absolute")


def test_every_request_of_a_keep_alive_connection_is_checked(tier: Tier) -> None:
    first = f"GET /echo?case=keepalive-1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
    second = f"GET /echo?case=keepalive-2 HTTP/1.1\r\nHost: {OTHER}\r\nConnection: close\r\n\r\n"
    answer = raw(tier, context(tier.tls_port), (first + second).encode())
    assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 421 " in answer
    assert tier.origin.saw("case=keepalive-1") and not tier.origin.saw("case=keepalive-2")


def test_a_request_without_a_hand_over_is_never_proxied(tier: Tier) -> None:
    url = f"http://127.0.0.1:{tier.plain_port}/echo?case=no-handover"
    command = ["curl", "-sS", "--max-time", "10", "--proxy", f"http://127.0.0.1:{tier.proxy_port}", "-o", "/dev/null",
               "-w", "%{http_code}", url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.stdout == "000" and done.returncode != 0, done  # closed: no answer at all
    assert not tier.origin.saw("case=no-handover")


def test_a_connect_inside_a_handed_over_connection_is_refused(tier: Tier) -> None:
    request = f"CONNECT {OTHER}:{tier.tls_port} HTTP/1.1\r\nHost: {OTHER}:{tier.tls_port}\r\n\r\n"
    answer = raw(tier, context(tier.tls_port), request.encode())
    assert status_of(answer) == 400 and made_by_the_tier(answer), answer[:300]
    assert not [seen for seen in tier.origin.seen if seen["method"] == "CONNECT"]


def test_an_sni_other_than_the_handed_over_host_gets_no_tls(tier: Tier) -> None:
    answer = curl(tier, context(tier.tls_port), "/echo?case=sni", host=OTHER)
    assert answer.status == 0 and answer.exit_code != 0
    assert not tier.origin.saw("case=sni")


def test_http2_authority_and_host_must_name_the_host(tier: Tier) -> None:
    base = [(":method", "GET"), (":scheme", "https"), (":path", "/echo?case=h2ok")]
    assert h2(tier, context(tier.tls_port), [*base, (":authority", HOST)])[0] == 200
    wrong = [(":method", "GET"), (":scheme", "https"), (":path", "/echo?case=h2authority"), (":authority", OTHER)]
    assert h2(tier, context(tier.tls_port), wrong)[0] == 421
    both = [(":method", "GET"), (":scheme", "https"), (":path", "/echo?case=h2host"), (":authority", HOST),
            ("host", OTHER)]  # fmt: skip
    assert h2(tier, context(tier.tls_port), both)[0] in (0, 421)  # the h2 library may refuse it first
    assert tier.origin.saw("case=h2ok") and not tier.origin.saw("case=h2authority") and not tier.origin.saw("h2host")
    http2 = curl(tier, context(tier.tls_port), "/echo?case=curlh2", "--http2", "-H", f"Host: {OTHER}")
    assert http2.status == 421 and http2.headers.startswith("HTTP/2 421")


# --------------------------------------------------------------------------- smuggling shapes

SMUGGLING = {
    "cl-and-te": "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-list": "Content-Length: 5, 5\r\n\r\nhello",
    "cl-signed": "Content-Length: +5\r\n\r\nhello",
    "two-te": "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-not-chunked-last": "Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-obfuscated": "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "obs-fold": "X-Folded: one\r\n two\r\n\r\n",
    "obs-fold-te": "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "space-before-colon": "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "two-hosts": f"Host: {OTHER}\r\n\r\n",
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_smuggling_shapes_are_refused_before_the_origin(tier: Tier, shape: str) -> None:
    head = f"GET /echo?case=smuggle-{shape} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
    answer = raw(tier, context(tier.tls_port), (head + SMUGGLING[shape]).encode())
    # Refused by the tier (mitmproxy's own page, or the addon's), or the connection closed: never the origin's answer.
    assert answer == b"" or (status_of(answer) == 400 and made_by_the_tier(answer)), answer[:300]
    assert not tier.origin.saw(f"case=smuggle-{shape}")


def test_a_well_framed_request_passes_the_same_way(tier: Tier) -> None:
    # The guard for the test above: the raw client and the origin do see a request framed once.
    head = (
        f"GET /echo?case=smuggle-none HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert status_of(raw(tier, context(tier.tls_port), head.encode())) == 200
    assert tier.origin.saw("case=smuggle-none")[-1]["body"] == "hello"


@pytest.mark.parametrize("header", [("connection", "keep-alive"), ("transfer-encoding", "chunked"), ("te", "gzip")])
def test_http2_connection_specific_headers_are_refused(tier: Tier, header: tuple[str, str]) -> None:
    request = [(":method", "GET"), (":scheme", "https"), (":path", f"/echo?case=h2conn-{header[0]}"),
               (":authority", HOST), header]  # fmt: skip
    status, events = h2(tier, context(tier.tls_port), request)
    assert status == 0 and "ConnectionTerminated" in events, events  # mitmproxy's h2 layer: GOAWAY
    assert not tier.origin.saw(f"case=h2conn-{header[0]}")


# --------------------------------------------------------------------------- records


def test_one_record_per_request_and_never_a_secret(tier: Tier) -> None:
    curl(tier, context(tier.tls_port), "/echo?case=record-ok&token=query-secret")
    curl(tier, context(tier.tls_port), "/echo?case=record-denied", "-X", "DELETE")
    ok = wait_until(lambda: [r for r in tier.records() if r["method"] == "GET" and r["status"] == 200])
    denied = wait_until(lambda: [r for r in tier.records() if r["method"] == "DELETE"])
    assert ok and denied
    assert ok[-1] | {"start_us": 0, "end_us": 0, "duration_ms": 0, "bytes_down": 0} == {
        "start_us": 0, "end_us": 0, "sandbox": "sb-1", "src_addr": "10.75.0.10", "src_port": 40000,
        "dst_addr": "127.0.0.1", "dst_port": tier.tls_port, "orig_dst_addr": "198.18.1.1",
        "orig_dst_port": tier.tls_port, "hostname": HOST, "protocol": "https", "bytes_up": 0, "bytes_down": 0,
        "duration_ms": 0, "verdict": "allow", "reason": "request allowed by the entry's HTTP rules",
        "rule": f"inspect {HOST}", "method": "GET", "path": "/echo", "status": 200, "message": None,
        "denial_id": None,
        "revision": None,  # the tier does not know the policy's revision; the connection's record names it
        "learned_name": None,
    }  # fmt: skip
    assert denied[-1]["verdict"] == "deny" and denied[-1]["status"] == 403
    assert denied[-1]["reason"] == "read-only GitHub"
    for line in tier.records():
        FlowRecord(**line)  # every line is a whole record the supervisor can hand to the FlowLog
    raw_lines = tier.raw_records()
    assert SECRET.encode() not in raw_lines and b"query-secret" not in raw_lines and b"Bearer" not in raw_lines


# --------------------------------------------------------------------------- the tier's process


def run_tier_to_exit(tmp_path: Path, script: Path, *settings: str) -> subprocess.CompletedProcess[str]:
    command = tier_command(free_port(), tmp_path / "confdir", script, settings)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        # Options of mitmdump's addons the tier does not load: the pages for sandboxes, rewriting, replay, saving.
        ("onboarding=true", "onboarding"),
        ("map_local=|example.com|/etc", "map_local"),
        ("server_replay=/tmp/flows", "server_replay"),
        ("save_stream_file=/tmp/flows", "save_stream_file"),
        ("scripts=/tmp/other.py", "scripts"),
        # A misspelt option of a loaded addon is refused, not kept for an addon that never comes.
        ("ssl_verify_upstream_trusted_cas=/tmp/ca.pem", "ssl_verify_upstream_trusted_cas"),
    ],
)
def test_the_tier_process_refuses_an_option_no_loaded_addon_has(tmp_path: Path, setting: str, named: str) -> None:
    done = run_tier_to_exit(tmp_path, REPO / "addons" / "inspect.py", setting, "connection_strategy=lazy")
    assert done.returncode == 1, done
    assert f"unknown options ['{named}']" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "settings",
    [
        ("connection_strategy=eager",),
        (),  # mitmproxy's default strategy is eager: no option change would show it to the addon
        ("connection_strategy=lazy", "validate_inbound_headers=false"),
    ],
)
def test_the_tier_process_refuses_option_values_the_addon_refuses(tmp_path: Path, settings: tuple[str, ...]) -> None:
    done = run_tier_to_exit(tmp_path, REPO / "addons" / "inspect.py", *settings)
    assert done.returncode == 1, done
    assert "the gateway's inspection addon needs" in done.stderr, done.stderr


@pytest.mark.parametrize("source", ["def broken(:\n", "addons = []\n", "import no_such_module_here\n"])
def test_the_tier_process_does_not_run_without_its_addon(tmp_path: Path, source: str) -> None:
    script = tmp_path / "addon.py"
    script.write_text(source)
    done = run_tier_to_exit(tmp_path, script)
    assert done.returncode == 1, done
    assert "the addon did not load, or defines no `addons` list" in done.stderr, done.stderr


def test_the_addon_does_not_run_without_the_hand_over_listener(tmp_path: Path) -> None:
    """Under plain mitmdump no connection would carry the engine's context: the addon refuses to start there."""
    mitmdump = Path(sys.executable).parent / "mitmdump"
    command = [str(mitmdump), "--set", f"confdir={tmp_path}", "--listen-host", "127.0.0.1", "-p", "0",
               "--set", "connection_strategy=lazy", "-s", str(REPO / "addons" / "inspect.py")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done
    assert "the gateway's inspection addon runs in the tier's process" in done.stdout + done.stderr
