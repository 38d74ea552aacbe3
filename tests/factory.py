"""The one module of helpers that several test modules share: the things a test builds (a running `gateway run`,
a compiled policy, a genuine ClientHello, a DNS query, a resolver's upstream, the egress e2e world) and the one way
a test waits for something (`wait_until`). Test modules import from here, never from each other.

Each section names the tests it grew out of; nothing here is a test.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import route_specs
from gateway.decision import DEFAULT_LIMITS, CompiledPolicy, compile_policy
from gateway.flowlog import BATCH_NAME_PATTERN, FlowRecord, render
from gateway.openapi import openapi_document
from gateway.policy import parse_sandbox, parse_template
from gateway.presets import BUILTIN_PRESETS, Preset
from gateway.resolver import Resolver, ResolverConfig, Upstream
from gateway.state import PolicyContext
from tests import authdns
from tests.netns import INET_V4, Topology, live_namespaces, log_events, wait_for_line

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- waiting


def wait_until[T](predicate: Callable[..., T], timeout: float = 5.0, interval: float = 0.05) -> T:
    """Polls `predicate` until its answer is true or `timeout` seconds have passed; returns the last answer
    (so `assert wait_until(...)` fails when the condition never held, and a found value can be used).

    The one way a test waits for a condition it cannot be told about: never a fixed sleep, whose length
    is either too long (a slow suite) or too short (a flaky one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer := predicate():
            return answer
        time.sleep(interval)
    return predicate()


async def wait_until_async[T](predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01) -> T:
    """`wait_until` for a test that runs in the event loop: it sleeps with asyncio, so the tasks it waits for run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer := predicate():
            return answer
        await asyncio.sleep(interval)
    return predicate()


# ------------------------------ a running `gateway run` (tests/test_cli.py)


ADMIN_TOKEN = "cli-admin-token-0123456789"
LIMITED_TOKEN = "cli-limited-token-0123456789"  # sandboxes only, no network:* scope
CLI = [sys.executable, "-m", "gateway.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, port: int, *, tokens: bool = True, host: str = "127.0.0.1") -> Path:
    lines = [
        "[store]",
        'backend = "embedded"',
        f'path = "{directory / "policies.json"}"',
        "poll_interval = 0.1",
        "[api]",
        f'host = "{host}"',
        f"port = {port}",
    ]
    if tokens:
        lines.append(
            f'tokens = [{{ name = "ops", token = "{ADMIN_TOKEN}", scopes = ["admin"] }}, '
            f'{{ name = "ci", token = "{LIMITED_TOKEN}", scopes = ["sandboxes:read", "sandboxes:write"] }}]'
        )
    lines += ["[log]", 'format = "json"', "[presets.internal]", 'hosts = ["*.corp.example"]', "ports = [443]"]
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    config: Path
    stdout: Path
    stderr: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


def start_server(directory: Path, *args: str, config_in_env: bool = False, **env: str) -> Server:
    """`gateway run ARGS` on a free port, the config file named by `--config` or by `GATEWAY_CONFIG`."""
    port = free_port()
    config = write_config(directory, port)
    stdout, stderr = directory / "run.out", directory / "run.err"
    if config_in_env:
        env.setdefault("GATEWAY_CONFIG", str(config))
    command = [*CLI, "run", *args] if config_in_env else [*CLI, "run", "--config", str(config), *args]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=clean_env(**env))
    server = Server(process, f"http://127.0.0.1:{port}", config, stdout, stderr)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gateway run exited with {process.returncode}: {stderr.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    if not wait_until(ready, timeout=20):
        server.stop()
        raise AssertionError(f"gateway run never became ready: {stderr.read_text()}")
    return server


def gateway(
    *args: str, server: Server | None = None, token: str | None = ADMIN_TOKEN, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    extra = dict(env)
    if server is not None:
        extra.setdefault("GATEWAY_API_URL", server.url)
    if token is not None:
        extra.setdefault("GATEWAY_TOKEN", token)
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=30, input=stdin, env=clean_env(**extra), check=False
    )


# ------------------------------ answers checked against the OpenAPI document

DOC = openapi_document(route_specs())


def _operation(method: str, path: str) -> dict[str, Any] | None:
    for template, item in DOC["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return item[method.lower()]
    return None


def schema_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for one schema of DOC (or one that refers into its components)."""
    # The document's components travel along so `#/components/...` references resolve.
    return Draft202012Validator({**schema, "components": DOC["components"]})


class Answer:
    def __init__(self, status: int, body: Any, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None


def check_documented(method: str, path: str, answer: Answer) -> None:
    """The answer is one the OpenAPI document lists for that route, with a body its schema accepts."""
    operation = _operation(method, path)
    if operation is None:  # unknown route or method: the documented error body all the same
        assert answer.status in (404, 405), (method, path, answer.status)
        schema_validator({"$ref": "#/components/schemas/Error"}).validate(answer.body)
        return
    documented = operation["responses"].get(str(answer.status))
    assert documented is not None, f"{method} {path} answered {answer.status}, which the document does not list"
    content = documented.get("content")
    if content is None:
        assert answer.body is None, f"{method} {path} {answer.status} has a body the document does not describe"
        return
    media = answer.headers.get("Content-Type", "").split(";", 1)[0].strip()
    assert media in content, f"{method} {path} {answer.status} answered {media}, documented: {list(content)}"
    if media == "application/json":
        schema_validator(content[media]["schema"]).validate(answer.body)
    else:
        assert isinstance(answer.body, str)
    for header in documented.get("headers", {}):
        assert header in answer.headers, f"{method} {path} {answer.status} lacks the documented {header}"


# ------------------------------ compiled policies (tests/unit/test_decision.py)

CONTEXT = PolicyContext(
    (ipaddress.ip_network("10.75.0.0/16"), ipaddress.ip_network("fdd4:1476:6c7e::/48")),
    BUILTIN_PRESETS,
    DEFAULT_LIMITS,
    frozenset({"github", "openai"}),
)


def policy(
    profile: str = "allowlisted",
    egress: object = None,
    *,
    template: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    presets: Mapping[str, Preset] = BUILTIN_PRESETS,
) -> CompiledPolicy:
    """Parse a sandbox (and optional template) the way the API would, then compile it."""
    data: dict[str, Any] = {"id": "sb1", "addresses": ["10.75.0.2"], "profile": profile}
    if egress is not None:
        data["egress"] = egress
    if limits is not None:
        data["limits"] = limits
    parsed_template = None
    if template is not None:
        parsed_template = parse_template(
            {"name": "tpl", **template}, known_presets=presets, known_secrets=CONTEXT.secrets
        )
        data["template"] = "tpl"
    sandbox = parse_sandbox(data, subnets=CONTEXT.subnets, known_presets=presets, known_secrets=CONTEXT.secrets)
    return compile_policy(sandbox, parsed_template, presets, CONTEXT.default_limits)


# ------------------------------ flow records (tests/unit/test_replay.py, test_suggest.py, integration/test_flowlog.py)

PUBLIC = "93.184.216.34"
RECORDS_T0 = 1_700_000_000_000_000
_clock = itertools.count(RECORDS_T0, 1_000_000)


def flow_record(
    hostname: str | None = "api.example.com",
    port: int = 443,
    protocol: str = "tls",
    verdict: str = "allow",
    rule: str = "allow_hosts api.example.com",
    *,
    address: str = PUBLIC,
    end_us: int | None = None,
    sandbox: str = "sb1",
    **extra: Any,
) -> FlowRecord:
    """One flow record (`extra`: any other field's value); `end_us` defaults to a clock a second a record."""
    end = next(_clock) if end_us is None else end_us
    fields: dict[str, Any] = {
        "start_us": end - 1000,
        "end_us": end,
        "sandbox": sandbox,
        "src_addr": "10.75.0.2",
        "src_port": 40000,
        "dst_addr": address,
        "dst_port": port,
        "orig_dst_addr": address,
        "orig_dst_port": port,
        "hostname": hostname,
        "protocol": protocol,
        "bytes_up": 10,
        "bytes_down": 20,
        "duration_ms": 1.0,
        "verdict": verdict,
        "reason": "recorded",
        "rule": rule,
    }
    return FlowRecord(**(fields | extra))


def flow(hostname: str | None, *args: Any, **fields: Any) -> bytes:
    """One record line as the flow log writes it (`flow_record`'s arguments)."""
    return render(flow_record(hostname, *args, **fields)).encode()


def dns(name: str, verdict: str = "allow", rule: str = "allow_hosts api.example.com") -> bytes:
    return flow(name, 53, "dns", verdict, rule, address="10.75.0.1")


# ------------------------------ genuine ClientHellos (tests/unit/test_peek.py)


def client_bios(
    server_hostname: str | None, alpn: Sequence[str] | None = ("h2", "http/1.1")
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, incoming, outgoing


def genuine_hello(server_hostname: str | None = "api.example.com", alpn: Sequence[str] | None = ("h2", "http/1.1")):
    """The bytes a real TLS client (OpenSSL) writes first: one or more TLS records."""
    _, _, outgoing = client_bios(server_hostname, alpn)
    data = outgoing.read()
    assert data[0] == 0x16
    return data


# ------------------------------ DNS packets and a fake clock (tests/unit/test_dns_*.py)


def query(name: str, qtype: str = "A", *, edns: bool = False, do: bool = False, qid: int = 0x4242) -> bytes:
    record = DNSRecord.question(name, qtype)
    record.header.id = qid
    if edns:
        record.add_ar(EDNS0(udp_len=4096, flags="do" if do else ""))
    return bytes(record.pack())


#: The end of a denial's EDE text: the id a user quotes (checked here, left off what `ede_of` returns).
DENIAL_SUFFIX = re.compile(r" \(denial [0-9a-f]{8}-[0-9a-f]{10}\)\Z")


def ede_of(response: bytes, *, denial_id: bool = False) -> tuple[int, str] | None:
    """The Extended DNS Error (code, text) of a response. A denial's text ends with its id, which is cut off unless
    `denial_id`."""
    for rr in DNSRecord.parse(response).ar:
        if rr.rtype == QTYPE.OPT:
            for opt in rr.rdata:
                if opt.code == 15:
                    text = opt.data[2:].decode()
                    return struct.unpack("!H", opt.data[:2])[0], text if denial_id else DENIAL_SUFFIX.sub("", text)
    return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------ an upstream for the stub resolver (tests/unit/test_resolver.py)

RESOLVER_ZONE: dict[str, list[tuple[str, str, int]]] = {
    "one.test": [("A", "192.0.2.1", 300), ("AAAA", "2001:db8::1", 300)],
    "short.test": [("A", "192.0.2.2", 1)],
    "long.test": [("A", "192.0.2.3", 999_999)],
    "alias.test": [("CNAME", "mid.test", 60)],
    "mid.test": [("CNAME", "one.test", 30)],
    "v4only.test": [("A", "192.0.2.4", 300)],
    "big.test": [("A", f"198.51.100.{i}", 300) for i in range(1, 101)],
    # For the egress planning tests (tests/unit/test_plan.py), which reuse this server.
    "private.test": [("A", "10.0.0.5", 300)],
    "mixed.test": [("A", "10.0.0.6", 300), ("A", "192.0.2.9", 300)],
    "metadata.test": [("A", "169.254.169.254", 300)],
}


class ResolverZone(BaseResolver):
    """RESOLVER_ZONE served by dnslib; every query it answered is in `queries`."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname, qtype, handler.protocol))
        name = qname
        for _ in range(10):
            records = RESOLVER_ZONE.get(name)
            if records is None:
                if name == qname:
                    reply.header.rcode = 3  # NXDOMAIN
                return reply
            target = None
            for rtype, value, ttl in records:
                if rtype == qtype:
                    rdata = A(value) if rtype == "A" else AAAA(value)
                    reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
                elif rtype == "CNAME":
                    reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(value), ttl=ttl))
                    target = value
            if target is None:
                return reply
            name = target
        return reply


@pytest.fixture(name="server")
def resolver_server() -> Iterator[tuple[ResolverZone, int]]:
    """RESOLVER_ZONE on a loopback port: (the zone, its port). A test module imports it to use it as `server`."""
    zone = ResolverZone()
    with authdns.serve(zone) as port:
        yield zone, port


def make(port: int, *, min_ttl: int = 5, max_ttl: int = 3600, timeout: float = 1.0, extra: tuple[Upstream, ...] = ()):
    config = ResolverConfig((), timeout, min_ttl, max_ttl)
    return Resolver(config, upstreams=(*extra, Upstream("127.0.0.1", port)))


# ------------------------------ the egress e2e world (tests/e2e/test_egress.py)

NAMES = ("allowed.test", "denied.test", "later.test", "rebind.test", "meta.test")
EGRESS_ZONE = {
    "allowed.test": {"A": ["198.18.1.1"], "AAAA": ["2001:db8:1::1"]},
    "denied.test": {"A": ["198.18.1.2"], "AAAA": ["2001:db8:1::2"]},
    "later.test": {"A": ["198.18.1.3"], "AAAA": ["2001:db8:1::3"]},
    "rebind.test": {"A": ["10.1.2.3"]},
    "meta.test": {"A": ["169.254.169.254"]},
    "wire.test": {"A": ["168.63.129.16"]},  # Azure's WireServer: a metadata endpoint outside link-local
    "ali6.test": {"AAAA": ["64:ff9b::6464:64c8"]},  # Alibaba's 100.100.100.200, NAT64-wrapped
    "serial.test": {"A": ["198.18.2.{n}"]},  # {n}: the number of queries the zone server got for it
    "secret.test": {"A": ["198.18.3.{n}"]},  # allowed to no sandbox but the unrestricted sb2
    # Siblings under one parent (tests/e2e/test_policy_suggest.py collapses them to a wildcard).
    **{f"{label}.cdn.test": {"A": ["198.18.1.3"]} for label in "abcd"},
}
#: sb4's DNS budget (per minute) and the longest a query over it waits before it is refused (gateway [dns]).
DNS_LIMIT, DNS_MAX_WAIT = 60, 2.0


ORIGINS = r"""
import base64, hashlib, socket, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
CTX.load_cert_chain(sys.argv[1], sys.argv[2])
def remember_sni(sock, name, ctx):
    sock.sni_name = name
CTX.sni_callback = remember_sni

def serve_h2c(handler):
    # HTTP/2 after a 101, answering every stream with its :authority: what a server that routes h2 streams by
    # authority (a CDN) does. The upgraded request is stream 1.
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import RequestReceived
    conn = H2Connection(H2Configuration(client_side=False))
    settings = handler.headers.get("HTTP2-Settings")
    if settings:
        conn.initiate_upgrade_connection(settings)
    else:
        conn.initiate_connection()
    def answer(stream, authority, path):
        body = f"ORIGIN h2 authority={authority} path={path}\n".encode()
        conn.send_headers(stream, [(":status", "200"), ("content-length", str(len(body)))])
        conn.send_data(stream, body, end_stream=True)
    if settings:
        answer(1, handler.headers.get("Host"), handler.path)
    sock = handler.connection
    sock.sendall(conn.data_to_send())
    while data := sock.recv(65536):
        for event in conn.receive_data(data):
            if isinstance(event, RequestReceived):
                fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in event.headers}
                text = {k: v.decode() if isinstance(v, bytes) else v for k, v in fields.items()}
                answer(event.stream_id, text[":authority"], text[":path"])
        sock.sendall(conn.data_to_send())

def websocket_101(handler, protocol, accept):
    handler.send_response(101)
    handler.send_header("Upgrade", protocol)
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept)
    handler.end_headers()
    handler.wfile.flush()
    while chunk := handler.connection.recv(4096):  # then echo raw bytes: the gateway never looks inside
        handler.connection.sendall(chunk)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        self.request.settimeout(5)
        if self.server.tls:
            self.request = CTX.wrap_socket(self.request, server_side=True)
        super().setup()
    def do_GET(self):
        upgrade = (self.headers.get("Upgrade") or "").lower()
        # h2c on any mention of it (with or without Connection: upgrade), and /h2c-anyway switches unasked.
        if "h2c" in upgrade or self.path == "/h2c-anyway":
            self.send_response(101)
            self.send_header("Upgrade", "h2c")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            serve_h2c(self)
            self.close_connection = True
            return
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        if upgrade == "websocket" and self.path in ("/ws", "/ws-as-h2c", "/ws-wrong-accept"):
            protocol = "h2c" if self.path == "/ws-as-h2c" else "websocket"
            websocket_101(self, protocol, "d3Jvbmc=" if self.path == "/ws-wrong-accept" else accept.decode())
            self.close_connection = True
            return
        local = self.request.getsockname()[0].removeprefix("::ffff:")
        sni = getattr(self.request, "sni_name", None) if self.server.tls else "-"
        body = f"ORIGIN {local} host={self.headers.get('Host')} sni={sni} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def handle_expect_100(self):
        # /early answers before the body, /quiet reads it without a 100: servers that ignore Expect.
        return True if self.path in ("/early", "/quiet") else super().handle_expect_100()
    def do_POST(self):
        if self.path == "/early":  # and keeps the connection: the body is read as the next request
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = f"ORIGIN got {len(body)} bytes path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

def banner(port, text):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(64)
    def serve(conn):
        with conn:
            conn.settimeout(5)
            try:
                local = conn.getsockname()[0].removeprefix("::ffff:")
                conn.sendall(f"{text} {local}\r\n".encode())
                line = conn.recv(1024)
                conn.sendall(b"ECHO " + line)
            except OSError:
                pass
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

def until_eof(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(64)
    def serve(conn):
        with conn:
            conn.settimeout(10)
            total = 0
            try:
                while chunk := conn.recv(65536):
                    total += len(chunk)
                conn.sendall(f"GOT {total}\n".encode())  # only once the client's FIN came through
            except OSError:
                pass
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

threading.Thread(target=until_eof, args=(23,), daemon=True).start()
for port, tls in ((80, False), (443, True)):
    server = Server(("::", port), Handler)
    server.tls = tls
    threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Thread(target=banner, args=(22, "SSH-2.0-TestOrigin"), daemon=True).start()
threading.Thread(target=banner, args=(25, "220 smtp.test ESMTP"), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


#: `count` connections to (address, 22) that say nothing; each prints DATA (the SSH-like banner came), EOF or RESET.
SILENT_CLIENTS = r"""
import socket, sys
def connect():
    try:
        return socket.create_connection((sys.argv[1], 22), timeout=8)
    except ConnectionResetError:  # refused so fast (a loaded client) that connect() itself saw the reset
        return None
socks = [connect() for _ in range(int(sys.argv[2]))]
out = []
for s in socks:  # say nothing: each connection waits in the peek phase until the peek deadline
    try:
        out.append("RESET" if s is None else "DATA" if s.recv(64).startswith(b"SSH-2.0") else "EOF")
    except ConnectionResetError:
        out.append("RESET")
print(" ".join(out))
"""


#: One connection to the SSH-like origin, relayed once its banner came ("open"); then "RESET" or "EOF" when the
#: gateway ends it, "ALIVE" if nothing ended it within 20 s.
SILENT_HOLDER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 22), timeout=10)
assert s.recv(64).startswith(b"SSH-2.0")
print("open", flush=True)
s.settimeout(20)
try:
    print("EOF" if s.recv(64) == b"" else "DATA", flush=True)
except ConnectionResetError:
    print("RESET", flush=True)
except TimeoutError:
    print("ALIVE", flush=True)
"""


BANNER_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=4)
    s.sendall(b"SSH-2.0-TestClient\r\n")
    data = b""
    while b"ECHO" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print("DATA", data.decode(errors="replace").replace("\r\n", "|"))
except ConnectionResetError:
    print("RESET")
except OSError as exc:
    print("FAIL", type(exc).__name__, exc)
"""


# --------------------------------------------------------------------------- certificates


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "allowed.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "origin.pem", directory / "origin.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


# --------------------------------------------------------------------------- the running gateway


PEEK_CAP = 8


def egress_policies(later_allowed: bool = False) -> dict[str, Any]:
    hosts = ["allowed.test", "rebind.test", "meta.test", "serial.test", *(["later.test"] if later_allowed else [])]
    return {
        "templates": {},
        "sandboxes": {
            "sb1": {
                "id": "sb1",
                "addresses": ["10.75.0.1", "fdd4:1476:6c7e::1"],
                "profile": "allowlisted",
                "egress": {"allow_hosts": hosts, "allow_cidrs": ["198.18.1.4/32"], "allow_ech": ["allowed.test"]},
            },
            "sb2": {"id": "sb2", "addresses": ["10.75.0.2", "fdd4:1476:6c7e::2"], "profile": "unrestricted"},
            "sb4": {
                "id": "sb4",
                "addresses": ["10.75.0.4", "fdd4:1476:6c7e::4"],
                "profile": "allowlisted",
                "egress": {"allow_hosts": ["allowed.test"]},
                "limits": {"dns_queries_per_minute": DNS_LIMIT},
            },
            "sb5": {"id": "sb5", "addresses": ["10.75.0.5", "fdd4:1476:6c7e::5"]},  # the default profile: isolated
        },
    }


def audit_batches(directory: Path, sandbox: str = "*") -> list[Path]:
    """The finished audit batches under a flow log's directory (of one sandbox, or all), oldest first: the flow
    log writes each under a temporary dot-name first and renames it, so those are not batches (yet)."""
    return sorted(p for p in directory.glob(f"{sandbox}/*.ndjson") if BATCH_NAME_PATTERN.fullmatch(p.name))


def batch_records(batch: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in batch.read_text().splitlines() if line]


#: The API of a gateway a test world runs in its gateway namespace.
NAMESPACE_API = "http://127.0.0.1:8470"


class EgressEnv:
    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.workdir = workdir
        self.ca, self.cert, self.key = make_pki(workdir)
        self.policy_file = workdir / "policies.json"
        self.log_file = workdir / "gateway.log"
        self.blocklist = workdir / "blocklist.txt"  # the operator's threat feed; starts empty
        self.blocklist.write_text("")
        self.gateway: subprocess.Popen[Any] | None = None
        #: More GATEWAY_<SECTION>__<KEY> settings for the gateway's environment (a module's own needs).
        self.environment: dict[str, str] = {}
        #: More sections for the gateway's config file (a module's own needs), as TOML.
        self.config_sections = ""

    def write_policies(self, data: dict[str, Any]) -> None:
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.policy_file)  # atomic: the store never reads half a file

    @property
    def config_file(self) -> Path:
        return self.workdir / "gateway.toml"

    def write_config(self) -> Path:
        """The gateway's config file: the world's settings, then `config_sections`."""
        config = self.config_file
        config.write_text(
            "\n".join(
                [
                    "[store]",
                    'backend = "embedded"',
                    f'path = "{self.policy_file}"',
                    "poll_interval = 0.1",
                    "[audit]",
                    f'dir = "{self.workdir / "audit"}"',
                    "flush_interval = 0.2",
                    # Most tests read a record the moment its connection ended: from the log, written in that loop
                    # turn (the batches come up to a flush interval later). test_workers turns it off again.
                    "log_records = true",
                    "[log]",
                    'format = "json"',
                    "[egress]",
                    "peek_timeout = 2.0",
                    f"max_peeking_per_sandbox = {PEEK_CAP}",
                    "connect_timeout = 3.0",
                    'gateway_addresses = ["198.18.0.2", "2001:db8:ff::2"]',
                    f'blocklist_path = "{self.blocklist}"',
                    "[resolver]",
                    f'upstreams = ["{INET_V4}:53"]',
                    "timeout = 1.0",
                    "min_ttl = 1",
                    "[dns]",
                    f"rate_limit_max_wait = {DNS_MAX_WAIT}",
                ]
            )
            + "\n"
            + self.config_sections
        )
        return config

    def reload(self, config_sections: str) -> None:
        """SIGHUP the running gateway after writing its config file again with these sections."""
        assert self.gateway is not None
        self.config_sections = config_sections
        self.write_config()
        self.gateway.send_signal(signal.SIGHUP)

    def start_gateway(self, *extra: str) -> None:
        config = self.write_config()
        env = dict(os.environ)
        env["GATEWAY_EGRESS__PUBLIC_RANGES"] = '["198.18.0.0/15", "2001:db8::/32"]'
        env["PYTHONPATH"] = str(REPO)
        env.update(self.environment)
        log = self.log_file.open("a")
        self.gateway = self.topo.popen(
            "gw",
            [sys.executable, "-m", "gateway.cli", "run", "--data-plane", "--steer", "--config", str(config), *extra],
            stderr=log,
            env=env,
            cwd=str(REPO),
        )
        log.close()
        wait_for_line(self.gateway, "egress engine listening", 20)
        self.wait_ready()

    def stop_gateway(self, timeout: float = 20.0) -> int:
        """SIGTERM and the exit code; a gateway still running after `timeout` fails the test with what its log says
        about the stop (a drain held by a flow that never ended shows as `open_flows`), then is killed."""
        gateway = self.gateway
        assert gateway is not None
        gateway.send_signal(signal.SIGTERM)
        try:
            return gateway.wait(timeout)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(5)
            tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-40:])
            raise AssertionError(f"the gateway did not stop within {timeout} s; its log ends:\n{tail}") from None

    def worker_pids(self, index: int) -> list[int]:
        """The pids of the running gateway's worker `index` (1..N-1 of `--workers N`; none between two lives)."""
        assert self.gateway is not None
        argv = ["pgrep", "-P", str(self.gateway.pid), "-f", f"worker-index {index}( |$)"]
        found = subprocess.run(argv, capture_output=True, text=True, check=False)
        return [int(pid) for pid in found.stdout.split()]

    def readyz(self) -> subprocess.CompletedProcess[str]:
        return self.topo.run("gw", ["curl", "-sS", "-m", "2", f"{NAMESPACE_API}/readyz"], check=False)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until /readyz says ready: the store loaded and every part of the data plane serves."""
        if not wait_until(lambda: '"ready": true' in self.readyz().stdout, timeout):
            ready = self.readyz()
            raise AssertionError(ready.stdout + ready.stderr)

    def curl(self, sb: str, url: str, *extra: str, timeout: float = 6.0) -> subprocess.CompletedProcess[str]:
        argv = ["curl", "-sS", "-g", "--connect-timeout", "3", "-m", str(timeout), "--cacert", str(self.ca)]
        return self.topo.run(sb, [*argv, *extra, url], check=False, timeout=timeout + 5)

    def dig(self, sb: str, *args: str) -> str:
        out = self.topo.run(sb, ["dig", "+time=3", "+tries=1", *args], check=False, timeout=10)
        return out.stdout + out.stderr

    def dns_log(self, sb: str) -> list[dict[str, Any]]:
        """The sandbox's DNS query log, through the CLI and the API of the running gateway."""
        cli = [sys.executable, "-m", "gateway.cli", "--api", NAMESPACE_API, "--json", "audit", "dns", sb]
        shown = self.topo.run("gw", cli, check=False, timeout=20)
        queries: list[dict[str, Any]] = json.loads(shown.stdout)["queries"]
        return queries

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return log_events(self.log_file, event)

    def logged_flows(
        self, sb: str | None = None, hostname: str | None = None, protocol: str | None = None, **match: object
    ) -> list[dict[str, Any]]:
        """The flow records in the log, oldest first: `sb`'s connections to `hostname` over `protocol` (each when
        given) whose other fields equal `match` (e.g. `verdict="deny", rule="builtin:peek-cap"`)."""
        given = (("sandbox", sb), ("hostname", hostname), ("protocol", protocol))
        wanted = {**match, **{field: value for field, value in given if value is not None}}
        return [f for f in self.log_events("flow") if all(f.get(k) == v for k, v in wanted.items())]

    def wait_steered(self, sb: str) -> None:
        """Until `sb` reaches allowed.test over TLS: a sandbox created through the API is steered within a second."""
        steered = lambda: self.curl(sb, "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"), timeout=2)  # noqa: E731
        assert wait_until(lambda: steered().returncode == 0, timeout=10, interval=0.2)

    def flows(self) -> list[dict[str, Any]]:
        """Every flow record in the audit batches written so far (every sandbox, every process), in batch order."""
        return [record for batch in audit_batches(self.workdir / "audit") for record in batch_records(batch)]


#: Labels each sample is keyed by, per sample name (the rest of a sample's labels are fixed).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class InTopology(Protocol):
    """A test world whose gateway runs in `topo`'s gateway namespace, its API on 127.0.0.1:8470."""

    @property
    def topo(self) -> Topology: ...


def api(env: InTopology, method: str, path: str, body: object = None, *, token: str | None = None) -> tuple[int, Any]:
    """(status, JSON answer) of one API call from the gateway's namespace, with curl (and `token`, if given)."""
    argv = ["curl", "-sS", "-m", "5", "-o", "-", "-w", "\n%{http_code}", "-X", method, f"{NAMESPACE_API}{path}"]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    out = env.topo.run("gw", argv, check=False, timeout=10)
    text, _, status = out.stdout.rpartition("\n")
    assert status.isdigit(), out.stdout + out.stderr
    return int(status), json.loads(text) if text.strip() else None


def scrape(env: InTopology) -> tuple[str, Samples]:
    """GET /metrics from the gateway's namespace with curl, parsed by prometheus-client's parser."""
    out = env.topo.run("gw", ["curl", "-sS", "-m", "3", "-i", f"{NAMESPACE_API}/metrics"], check=False)
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/plain" in head.lower(), out.stdout + out.stderr
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return body, samples


def dashboard_metrics() -> set[str]:
    """Every metric name the Grafana dashboard (docs/grafana-dashboard.json) queries."""
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bgateway_[a-z_]+", expr)}


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def assert_dns_answer_unlocks_opaque_tcp(env: EgressEnv, sb: str) -> None:
    """The sandbox's own DNS answer for allowed.test makes its address (port 22, SSH-like) reachable."""
    answer = env.topo.run(
        sb, ["dig", "+time=2", "+tries=1", "@198.18.1.2", "allowed.test", "A", "+short"], check=False, timeout=10
    )
    assert answer.stdout.split() == ["198.18.1.1"], answer.stdout + answer.stderr
    out = env.topo.python(sb, BANNER_CLIENT, "198.18.1.1", "22").strip()
    assert out == "DATA SSH-2.0-TestOrigin 198.18.1.1|ECHO SSH-2.0-TestClient|", out


class AuditTail:
    """`gateway audit tail ARGS` in the gateway's namespace (with `token` in GATEWAY_TOKEN, if given), every line it
    prints collected."""

    def __init__(self, env: InTopology, *args: str, token: str | None = None) -> None:
        cli = [sys.executable, "-m", "gateway.cli", "--api", NAMESPACE_API, "audit", "tail", *args]
        environment = {**os.environ, "GATEWAY_TOKEN": token} if token is not None else None
        self.process = env.topo.popen("gw", cli, env=environment)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def records(self) -> list[dict[str, Any]]:
        """The lines as records (with --json)."""
        return [json.loads(line) for line in self.lines]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=10)


def pin(name: str, port: int, address: str) -> list[str]:
    return ["--resolve", f"{name}:{port}:{address}"]


def allowlisted(*sandboxes: tuple[str, str, list[str]]) -> dict[str, Any]:
    """A policy file of allowlisted sandboxes, each (id, its one address, its allow_hosts)."""
    return {
        "templates": {},
        "sandboxes": {
            sandbox_id: {"id": sandbox_id, "addresses": [address], "profile": "allowlisted",
                         "egress": {"allow_hosts": hosts}}
            for sandbox_id, address, hosts in sandboxes
        },
    }  # fmt: skip


def egress_world(topo: Topology, workdir: Path) -> EgressEnv:
    """The egress world in `topo`, the gateway not started yet: attached, the zone's DNS and the origins serving."""
    e = EgressEnv(topo, workdir)
    # Host routes and proxy ARP from the operator's attach tooling; `gateway run --steer` does the rest.
    topo.attach_with_cli()
    topo.start_python("inet", authdns.ZONE_SERVER_SCRIPT, str(INET_V4), json.dumps(EGRESS_ZONE))
    origins = topo.popen("inet", [sys.executable, "-u", "-c", ORIGINS, str(e.cert), str(e.key)])
    wait_for_line(origins, "ready", 10)
    return e


# ------------------------------ long-lived connections (tests/e2e/test_live_cut.py, test_deny_hosts.py)


#: Three long-lived connections from a sandbox, probed on demand: `check` prints {name: "alive" | "cut"}.
#: A and B are TLS WebSockets (the origin echoes after the 101), C is opaque TCP to port 23 (read until EOF).
HOLDER = r"""
import base64, json, os, socket, ssl, sys
ca = sys.argv[1]
ctx = ssl.create_default_context(cafile=ca)

def websocket(name, address):
    s = ctx.wrap_socket(socket.create_connection((address, 443), timeout=5), server_hostname=name)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: {name}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("closed before the 101")
        head += chunk
    assert head.split(b" ")[1] == b"101", head
    return s

def echoes(s):
    try:
        s.sendall(b"ping")
        return s.recv(16) == b"ping"
    except (OSError, ssl.SSLError):
        return False

def open_(s):  # opaque: the origin says nothing until our FIN, so any readable event is the end
    try:
        s.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False

def opaque(address, port):
    s = socket.create_connection((address, port), timeout=5)
    s.sendall(b"SSH-2.0-TestClient\r\n")  # a client that speaks first: decided on these bytes, then relayed
    s.setblocking(False)  # probed without waiting (a socket with a timeout would wait for readability first)
    return s

specs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {
    "A": ["websocket", "allowed.test", "198.18.1.1"], "B": ["websocket", "later.test", "198.18.1.3"],
    "C": ["opaque", "198.18.1.1", 23]}
conns = {n: (kind, (websocket if kind == "websocket" else opaque)(*args)) for n, (kind, *args) in specs.items()}
print("ready", flush=True)
for line in sys.stdin:
    status = {n: "alive" if (open_(s) if kind == "opaque" else echoes(s)) else "cut" for n, (kind, s) in conns.items()}
    print(json.dumps(status), flush=True)
"""


class Holder:
    """HOLDER in sandbox `sb`, for one `with` block (its connections close when the block ends). `conns`: other
    connections than A, B and C, by name: ["websocket", name, address] or ["opaque", address, port]."""

    def __init__(self, env: EgressEnv, sb: str, conns: dict[str, list[str | int]] | None = None) -> None:
        self.env = env
        argv = [sys.executable, "-u", "-c", HOLDER, str(env.ca), *([json.dumps(conns)] if conns else [])]
        self.process = env.topo.popen(sb, argv, stdin=subprocess.PIPE)

    def __enter__(self) -> Holder:
        wait_for_line(self.process, "ready", 15)
        return self

    def __exit__(self, *_: object) -> None:
        self.env.topo.kill(self.process)

    def check(self) -> dict[str, str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("check\n")
        self.process.stdin.flush()
        status: dict[str, str] = json.loads(self.process.stdout.readline())
        return status


@pytest.fixture(scope="module", name="env")
def egress_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressEnv]:
    """The egress world, one per test module that imports it (it is used there as `env`)."""
    with Topology(sandboxes=5, origins=4) as topo:
        e = egress_world(topo, tmp_path_factory.mktemp("egress"))
        e.write_policies(egress_policies())
        e.start_gateway()
        yield e
    assert live_namespaces(topo.prefix) == []
