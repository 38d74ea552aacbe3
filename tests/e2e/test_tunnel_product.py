"""The tunnel through the product: `gateway run --data-plane --steer` with `[tunnel] enabled = true` and a
config file, in the gateway namespace of a `tests.netns.Topology`, driven only as an operator would (the CLI
and the API for sandboxes and tunnels, `gateway certs init` for the certificate).

The sandbox apps run in the sandbox namespaces (one script, a behaviour per port, hostile ones included) and
write every connection and request head they see to a log file, so a test can prove what did, and what did
not, reach the app. Clients are real: curl, and raw TLS sockets (Python's ssl, verifying against the CA the
gateway made) for heads no well-behaved client would send, from the internet namespace (198.18.0.1 and
extra addresses there) and from the gateway host itself (127.0.0.1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.factory import NAMESPACE_API, Samples, dashboard_metrics, delta, scrape, wait_until
from tests.netns import INET_V4, Topology, live_namespaces, log_events, wait_for_line

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "tunnel.test"
PORT = 8443
GATEWAY = "198.18.0.2"  # the gateway's internet-side address, where the tunnel listens for the internet
API = NAMESPACE_API
PASSWORD = "correct horse battery"
FREE, BURST, RATE = 5, 14, 1.0  # [tunnel] login_free_failures, login_tunnel_burst, login_tunnel_rate
#: Extra client addresses of the internet namespace (the gateway answers them on its /24).
GUESSERS = [f"198.18.0.{n}" for n in range(11, 17)]

#: The sandbox apps, one behaviour per port (argv: log file, the gateway's log file, address, ports...). Every
#: accepted connection, request head and end of a connection is a JSON line in the log.
APPS = r"""
import json, socket, sys, threading, time
log_path, gateway_log, address, ports = sys.argv[1], sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]]
lock = threading.Lock()
counter = [0]
def log(**record):
    with lock:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
def flows(port):
    # The gateway writes an exchange's flow record once it has ended, its app connection back in the pool.
    records = []
    with open(gateway_log) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return sum(isinstance(r, dict) and r.get("event") == "flow" and r.get("dst_port") == port for r in records)
def read_head(conn, buf):
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None, buf
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest
def answer(status, body, headers=()):
    lines = [status] + list(headers) + ["Content-Length: %d" % len(body), "", ""]
    return "\r\n".join(lines).encode() + body
INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"
COOKIES = ["__Host-gw-tunnel=planted; Path=/; Secure; HttpOnly", "__host-gw-tunnel=planted; Path=/; Secure",
           "__HOST-GW-TUNNEL=planted; Domain=tunnel.test; Path=/", " __Host-gw-tunnel =planted", "__Host-gw-tunnel",
           '__Host-gw-tunnel=""; Max-Age=0; Path=/; Secure', "=__Host-gw-tunnel=planted; Path=/", " = __Host-gw-tunnel",
           "a=1, __Host-gw-tunnel=planted; Path=/",
           "app=1; Path=/"]
CLEARS = ['"cookies"', '"*"', '"cache", "COOKIES"', '"cache"']
COOKIE_PAGE = '''<!doctype html><title>tossing</title><script>
(async () => {
for (const c of ["__Host-gw-tunnel=planted; path=/; secure",
                 "__Host-gw-tunnel=planted; domain=tunnel.test; path=/; secure",
                 "__HOST-gw-tunnel=planted; domain=tunnel.test; path=/; secure",
                 "__Secure-gw-tunnel=planted; domain=tunnel.test; path=/; secure",
                 "gw-tunnel=planted; domain=tunnel.test; path=/",
                 "=__Host-gw-tunnel=planted; domain=tunnel.test; path=/deep; secure",
                 "shared=from-a; domain=tunnel.test; path=/; secure"]) document.cookie = c;
const other = new URLSearchParams(location.search).get("b");  // another tunnel, same site: its logout
if (other) {  // bounded: a refused request may never complete as a no-cors fetch sees it
  const logout = fetch(other + ".gateway/logout", {mode: "no-cors", credentials: "include"}).catch(() => null);
  await Promise.race([logout, new Promise(done => setTimeout(done, 3000))]);
}
document.title = "done " + document.cookie;
})();
</script>'''
def serve(conn, port, n):
    conn.settimeout(30)
    buf = b""
    try:
        while True:
            head, buf = read_head(conn, buf)
            if head is None:
                log(port=port, conn=n, event="eof")
                return
            text = head.decode("latin-1")
            lines = text.split("\r\n")
            path = lines[0].split(" ")[1]
            headers = [line.split(":", 1) for line in lines[1:]]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            if port == 3005 and path == "/early":  # a naive server: it answers at once and never reads the body
                log(port=port, conn=n, event="request", path=path, head=text)
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(5):
                    conn.sendall(b"5\r\ntick\n\r\n")
                    time.sleep(0.2)  # an answer that lasts: the client sends its body after the first tick
                conn.sendall(b"0\r\n\r\n")
                continue
            while len(buf) < length:
                buf += conn.recv(65536)
            body, buf = buf[:length], buf[length:]
            log(port=port, conn=n, event="request", path=path, head=text, body=body.decode("latin-1"))
            if port == 3000 and path == "/ws":  # a WebSocket that sends a text frame every 0.1 s
                import base64, hashlib
                key = next(v.strip() for k, v in headers if k.lower() == "sec-websocket-key")
                digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
                accept = base64.b64encode(digest)
                fields = ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Accept: " + accept.decode()]
                conn.sendall(("\r\n".join(["HTTP/1.1 101 Switching Protocols", *fields, "", ""])).encode())
                for _ in range(300):  # 30 s at most
                    conn.sendall(b"\x81\x04tick")
                    time.sleep(0.1)  # a live feed's pace: tests read the frames as they come, never time them
                return
            if port == 3000 and path == "/stream":
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(300):  # 30 s at most
                    conn.sendall(b"5\r\ntick\n\r\n")
                    time.sleep(0.1)  # a live feed's pace: tests read the chunks as they come, never time them
                return
            if port == 3000:
                body = json.dumps({"path": path, "headers": [[k, v.strip()] for k, v in headers]}).encode()
                conn.sendall(answer("HTTP/1.1 200 OK", body, ["Content-Type: application/json"]))
            elif port == 3001 and path == "/same":  # two answers for one request, in one write
                conn.sendall(answer("HTTP/1.1 200 OK", b"ok") + INJECTED)
            elif port == 3001 and path == "/later":  # an answer, then more while the connection is idle
                ended = flows(port)  # the earlier exchanges with this app (one a time: the tests are sequential)
                conn.sendall(answer("HTTP/1.1 200 OK", b"ok"))
                deadline = time.monotonic() + 10
                while flows(port) == ended and time.monotonic() < deadline:
                    time.sleep(0.05)
                conn.sendall(INJECTED)
            elif port == 3001:
                conn.sendall(answer("HTTP/1.1 200 OK", b"fine"))
            elif port == 3002:
                fields = ["Set-Cookie: " + c for c in COOKIES] + ["Clear-Site-Data: " + c for c in CLEARS]
                conn.sendall(answer("HTTP/1.1 200 OK", b"cookies", fields))
            elif port == 3003:
                conn.sendall(("HTTP/1.1 %s Odd\r\nContent-Length: 2\r\n\r\nok" % path.strip("/")).encode())
            elif port == 3005:
                conn.sendall(answer("HTTP/1.1 200 OK", b"answered " + path.encode()))
            elif port == 3004 and path == "/clear":  # clear the whole site's cookies, the gateway's too
                conn.sendall(answer("HTTP/1.1 200 OK", b"cleared", ['Clear-Site-Data: "cookies"']))
            elif port == 3004:  # a page whose script goes for the other tunnels' gateway session
                conn.sendall(answer("HTTP/1.1 200 OK", COOKIE_PAGE.encode(), ["Content-Type: text/html"]))
    except OSError:
        log(port=port, conn=n, event="eof")
    finally:
        conn.close()
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(256)
    while True:
        conn, _ = s.accept()
        with lock:
            counter[0] += 1
            n = counter[0]
        log(port=port, conn=n, event="accept")
        threading.Thread(target=serve, args=(conn, port, n), daemon=True).start()
for port in ports:
    threading.Thread(target=listen, args=(port,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

#: Requests on one TLS connection, one after another, each answer read to its end before the next request
#: goes (argv: CA, address, port, SNI name, JSON list of raw requests, source address or "").
#: Prints a JSON list of {"status", "head", "body"} (or {"eof": true}), then whatever came after them.
RAW_CLIENT = r"""
import json, socket, ssl, sys
ca, address, port, sni, requests, source = sys.argv[1:7]
port, requests = int(port), json.loads(requests)
ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection((address, port), timeout=10, source_address=(source, 0) if source else None)
s = ctx.wrap_socket(raw, server_hostname=sni)
buf = b""
def fill():
    global buf
    data = s.recv(65536)
    if not data:
        raise EOFError
    buf += data
def response():
    global buf
    while b"\r\n\r\n" not in buf:
        fill()
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    body = b""
    if fields.get("transfer-encoding") == "chunked":
        while True:
            while b"\r\n" not in buf:
                fill()
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line, 16)
            while len(buf) < size + 2:
                fill()
            body, buf = body + buf[:size], buf[size + 2:]
            if size == 0:
                break
    else:
        length = int(fields.get("content-length", "0"))
        while len(buf) < length:
            fill()
        body, buf = buf[:length], buf[length:]
    return {"status": int(lines[0].split(" ")[1]), "head": "\r\n".join(lines), "body": body.decode("latin-1")}
out = []
for request in requests:
    s.sendall(request.encode("latin-1"))
    try:
        out.append(response())
    except (EOFError, OSError):
        out.append({"eof": True})
        break
s.settimeout(1.0)
try:
    while True:
        fill()
except (EOFError, OSError):
    pass
print(json.dumps({"answers": out, "after": buf.decode("latin-1")}))
"""

#: `count` requests sent at once: every TLS connection is made first, then each sends its request, then the
#: answers are read (argv: CA, address, port, Host, count, Authorization, source address or "").
#: Prints {status: how many}.
BURST_CLIENT = r"""
import collections, json, socket, ssl, sys
ca, address, port, host, count, auth, source = sys.argv[1:8]
port, count = int(port), int(count)
ctx = ssl.create_default_context(cafile=ca)
socks = []
for _ in range(count):
    raw = socket.create_connection((address, port), timeout=20, source_address=(source, 0) if source else None)
    socks.append(ctx.wrap_socket(raw, server_hostname=host))
request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n".encode()
for s in socks:
    s.sendall(request)
statuses = collections.Counter()
for s in socks:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    statuses[data.split(b" ")[1].decode() if data else "eof"] += 1
    s.close()
print(json.dumps(statuses))
"""

#: A POST whose body goes only once the answer has started (argv: CA, address, port, Host, body). Prints the
#: answer's body.
EARLY_CLIENT = r"""
import socket, ssl, sys
ca, address, port, host, body = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((address, int(port)), timeout=10), server_hostname=host)
s.sendall(f"POST /early HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
data = b""
while b"tick" not in data:
    data += s.recv(65536)
s.sendall(body.encode())
while not data.endswith(b"0\r\n\r\n"):
    data += s.recv(65536)
print(data.decode("latin-1"))
"""

#: Wrong passwords from many addresses at once, until a stop file exists (or `seconds` at most), each address
#: in a tight keep-alive loop that ignores Retry-After (argv: CA, address, port, Host, Authorization, seconds,
#: comma-separated sources, stop file).
#: Prints "ready" once the tunnel's bucket answers 429 to an address not yet throttled, then {status: count}.
FLOOD_CLIENT = r"""
import collections, json, os, socket, ssl, sys, threading, time
ca, address, port, host, auth, seconds, sources, stop = sys.argv[1:9]
port, deadline = int(port), time.monotonic() + float(seconds)
ctx = ssl.create_default_context(cafile=ca)
request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {auth}\r\n\r\n".encode()
statuses, lock, announced = collections.Counter(), threading.Lock(), threading.Event()
def answer(s, buf):
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise EOFError
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(buf) < length:
        buf += s.recv(65536)
    return head, buf[length:]
def flood(source):
    first = True
    while time.monotonic() < deadline and not os.path.exists(stop):
        try:
            raw = socket.create_connection((address, port), timeout=10, source_address=(source, 0))
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                buf = b""
                while time.monotonic() < deadline and not os.path.exists(stop):
                    s.sendall(request)
                    head, buf = answer(s, buf)
                    status = head.split(b" ")[1].decode()
                    with lock:
                        statuses[status] += 1
                    if first and status == "429" and not announced.is_set():
                        announced.set()
                        print("ready", flush=True)
                    first = False
        except (OSError, EOFError, StopIteration):
            pass
threads = [threading.Thread(target=flood, args=(source,)) for source in sources.split(",")]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(statuses), flush=True)
"""

#: A long response (the app's /stream) read until the gateway cuts it (argv: CA, address, port, Host, source
#: address or "", Authorization or ""). Prints "ready" once streaming, then "ended" when the stream ends.
STREAM_CLIENT = r"""
import socket, ssl, sys, time
ca, address, port, host, source, auth = sys.argv[1:7]
port = int(port)
ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection((address, port), timeout=20, source_address=(source, 0) if source else None)
s = ctx.wrap_socket(raw, server_hostname=host)
extra = f"Authorization: {auth}\r\n" if auth else ""
s.sendall(f"GET /stream HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode())
data = b""
while b"tick" not in data:
    chunk = s.recv(4096)
    if not chunk:
        print("refused", data.split(b"\r\n")[0].decode(), flush=True)
        sys.exit(0)
    data += chunk
print("ready", flush=True)
try:
    while s.recv(4096):
        pass
except OSError:
    pass
print("ended", flush=True)
"""


#: A WebSocket to the app's /ws, read frame by frame until the gateway ends it (argv: CA, address, port, Host).
#: Prints "ready" once the app's frames come, then "close CODE" for a Close frame or "eof" for none.
WS_CLIENT = r"""
import base64, os, socket, ssl, struct, sys
ca, address, port, host = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((address, int(port)), timeout=20), server_hostname=host)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
def need(n):
    global buf
    while len(buf) < n:
        data = s.recv(65536)
        if not data:
            raise EOFError
        buf += data
    out, buf = buf[:n], buf[n:]
    return out
while b"\r\n\r\n" not in buf:
    data = s.recv(65536)
    if not data:
        break
    buf += data
head, _, buf = buf.partition(b"\r\n\r\n")
if not head.startswith(b"HTTP/1.1 101"):
    print("refused", head.split(b"\r\n")[0].decode(), flush=True)
    sys.exit(0)
print("ready", flush=True)
try:
    while True:
        first, size = need(2)
        size &= 0x7F
        if size == 126:
            size = struct.unpack("!H", need(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", need(8))[0]
        payload = need(size)
        if first & 0x0F == 8:
            print("close", struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else "none", flush=True)
            break
except (EOFError, OSError):
    print("eof", flush=True)
"""


def basic(password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"me:{password}".encode()).decode()


class Env:
    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.workdir = workdir
        self.config = workdir / "gateway.toml"
        self.log_file = workdir / "gateway.log"
        self.app_logs = {"sb1": workdir / "apps-sb1.ndjson", "sb2": workdir / "apps-sb2.ndjson"}
        self.ca = workdir / "certs" / "ca.crt"
        self.password_file = workdir / "password.txt"
        self.password_file.write_text(PASSWORD + "\n")
        self.gateway: subprocess.Popen[Any] | None = None

    # ------------------------------------------------------------------ the product, as an operator runs it

    def write_config(self) -> None:
        certs = self.workdir / "certs"
        self.config.write_text(
            "\n".join(
                [
                    "[store]",
                    'backend = "embedded"',
                    f'path = "{self.workdir / "policies.json"}"',
                    "poll_interval = 0.1",
                    "[audit]",
                    f'dir = "{self.workdir / "audit"}"',
                    "log_records = true",  # the app side counts exchanges by their `flow` log lines
                    "[log]",
                    'format = "json"',
                    "[egress]",
                    'gateway_addresses = ["198.18.0.2", "2001:db8:ff::2"]',
                    "[resolver]",
                    f'upstreams = ["{INET_V4}:53"]',
                    "[tunnel]",
                    "enabled = true",
                    f'domain = "{DOMAIN}"',
                    'host = "0.0.0.0"',
                    f"port = {PORT}",
                    f'cert_path = "{certs / "tunnel.crt"}"',
                    f'key_path = "{certs / "tunnel.key"}"',
                    f'ca_cert_path = "{certs / "ca.crt"}"',
                    f'ca_key_path = "{certs / "ca.key"}"',
                    f"login_free_failures = {FREE}",
                    f"login_tunnel_burst = {BURST}",
                    f"login_tunnel_rate = {RATE}",
                    "max_per_sandbox = 100",
                    "sweep_interval = 0.1",
                    "poll_interval = 0.1",
                    "connect_timeout = 3.0",
                ]
            )
            + "\n"
        )

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO)
        env["GATEWAY_EGRESS__PUBLIC_RANGES"] = '["198.18.0.0/15", "2001:db8::/32"]'
        return env

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The `gateway` command, as an operator types it, on the gateway host."""
        argv = [str(Path(sys.executable).with_name("gateway")), "--api", API, "--config", str(self.config), *args]
        proc = self.topo.run("gw", argv, check=False, timeout=30)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def start_gateway(self) -> None:
        argv = [sys.executable, "-m", "gateway.cli", "run", "--data-plane", "--steer", "--config", str(self.config)]
        log = self.log_file.open("a")
        self.gateway = self.topo.popen("gw", argv, stderr=log, env=self.environ(), cwd=str(REPO))
        log.close()
        wait_for_line(self.gateway, "egress engine listening", 30)

    def expose(self, sandbox: str, port: int, *, password: bool = False) -> dict[str, Any]:
        extra = ["--password-file", str(self.password_file)] if password else []
        tunnel: dict[str, Any] = json.loads(self.cli("--json", "tunnel", "expose", sandbox, str(port), *extra).stdout)
        return tunnel

    def sandbox(self, record: dict[str, Any], *, create: bool = False) -> None:
        if create:
            self.cli("sandbox", "create", "--data", json.dumps(record))
        else:
            self.cli("sandbox", "update", record["id"], "--data", json.dumps(record))

    # ------------------------------------------------------------------ clients

    def host(self, tunnel: dict[str, Any]) -> str:
        return f"{tunnel['id']}.{DOMAIN}"

    def curl(self, tunnel: dict[str, Any], path: str = "/", *extra: str, ns: str = "inet") -> tuple[int, str, str]:
        """(status, head, body) of a request with curl; from the internet namespace unless `ns` says otherwise."""
        address = GATEWAY if ns == "inet" else "127.0.0.1"
        host = self.host(tunnel)
        argv = ["curl", "-sS", "-i", "--max-time", "10", "--cacert", str(self.ca)]
        argv += ["--resolve", f"{host}:{PORT}:{address}", *extra, f"https://{host}:{PORT}{path}"]
        out = self.topo.run(ns, argv, check=False, timeout=20)
        assert out.returncode == 0, out.stderr
        head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
        while head.startswith("HTTP/1.1 100"):  # curl prints the interim answer too
            head, _, body = body.partition("\n\n")
        return int(head.split(" ")[1]), head, body

    def raw(
        self, requests: list[str], *, sni: str = f"x.{DOMAIN}", source: str = "", ns: str = "inet"
    ) -> dict[str, Any]:
        address = GATEWAY if ns == "inet" else "127.0.0.1"
        args = [str(self.ca), address, str(PORT), sni, json.dumps(requests), source]
        result: dict[str, Any] = json.loads(self.topo.python(ns, RAW_CLIENT, *args, timeout=30))
        return result

    # ------------------------------------------------------------------ what the product did

    def app_log(self, sandbox: str = "sb1") -> list[dict[str, Any]]:
        path = self.app_logs[sandbox]
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def reached(self, sandbox: str = "sb1") -> int:
        """Connections and requests the apps have seen (not their ends: an idle one ends when it times out)."""
        return sum(r["event"] != "eof" for r in self.app_log(sandbox))

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return log_events(self.log_file, event)

    def reasons(self, tunnel: dict[str, Any]) -> list[str]:
        """The reasons of the tunnel's flow records (each request's one log line), oldest first."""
        return [e["reason"] for e in self.log_events("flow") if e.get("rule") == f"tunnel:{tunnel['id'][:4]}"]


def get(host: str, path: str = "/", *headers: str, close: bool = False) -> str:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *headers, *(["Connection: close"] if close else [])]
    return "\r\n".join([*lines, "", ""])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with Topology(sandboxes=2, origins=1) as topo:
        e = Env(topo, tmp_path_factory.mktemp("tunnel-product"))
        # Host routes and proxy ARP as an operator sets them for the interfaces the "VMM" made; `gateway run
        # --steer` then sets its own sysctls, policy routing and nftables table for the sandboxes in its store.
        topo.attach_with_cli()
        for address in GUESSERS:
            topo.run("inet", ["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
        e.write_config()
        made = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "certs", "init", "--config", str(e.config)],
            capture_output=True,
            text=True,
            env=e.environ(),
            cwd=str(REPO),
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stdout + made.stderr
        for name, sb in (("sb1", topo.sandbox(1)), ("sb2", topo.sandbox(2))):
            ports = ("3000", "3001", "3002", "3003", "3004", "3005")
            topo.start_python(name, APPS, str(e.app_logs[name]), str(e.log_file), str(sb.v4), *ports)
        e.start_gateway()
        e.sandbox({"id": "sb1", "addresses": ["10.75.0.1"], "ingress": {"public_access": True}}, create=True)
        e.sandbox({"id": "sb2", "addresses": ["10.75.0.2"]}, create=True)
        yield e
    assert live_namespaces(topo.prefix) == []


# --------------------------------------------------------------------------- passwords


@pytest.mark.root
def test_a_burst_of_wrong_passwords_gets_few_checks_and_never_locks_others_out(env: Env) -> None:
    tunnel = env.expose("sb1", 3000, password=True)
    host = env.host(tunnel)
    burst = [str(env.ca), GATEWAY, str(PORT), host, "100", basic("wrong-password"), ""]
    statuses = json.loads(env.topo.python("inet", BURST_CLIENT, *burst, timeout=60))
    # Counted as they start, not when their hash is done: only the free attempts were checked.
    assert statuses == {"401": FREE, "429": 100 - FREE}, statuses
    # One decision record per attempt: the checked ones refused for the password, the others for the throttle.
    attempts = ("tunnel WRONG_PASSWORD", "tunnel TOO_MANY_ATTEMPTS")
    assert wait_until(lambda: sum(r in attempts for r in env.reasons(tunnel)) == 100, 5), env.reasons(tunnel)
    assert env.reasons(tunnel).count("tunnel WRONG_PASSWORD") == FREE
    # The right password from another client is accepted at once: the burst spent 5 of the tunnel's 14.
    status, _, body = env.curl(tunnel, "/", "-H", f"Authorization: {basic(PASSWORD)}", ns="gw")
    assert status == 200 and json.loads(body)["path"] == "/"

    # Many addresses guessing together (5 x 5 attempts, more than the bucket holds even as it refills) spend
    # the tunnel's bucket: then everyone, the right password too, waits, but never more than 1 / rate seconds.
    for address in GUESSERS[:-1]:
        args = [str(env.ca), GATEWAY, str(PORT), host, "6", basic("wrong-password"), address]
        env.topo.python("inet", BURST_CLIENT, *args, timeout=60)
    # The sign-in form: the right Basic password from before is remembered for a minute and would not be checked.
    form = ["-X", "POST", "--data", f"password={PASSWORD.replace(' ', '+')}&next=/", "--interface", GUESSERS[-1]]
    waited = 0.0
    for _ in range(10):
        status, head, _ = env.curl(tunnel, "/.gateway/login", *form)
        if status == 303:
            break
        retry_after = re.search(r"(?im)^Retry-After: (\d+)$", head)
        assert status == 429 and retry_after is not None and int(retry_after.group(1)) <= 1 / RATE, head
        time.sleep(int(retry_after.group(1)))  # as the client is told to (a product run has no clock to step)
        waited += int(retry_after.group(1))
    assert status == 303 and waited <= 2 / RATE


@pytest.mark.root
def test_a_flood_from_many_addresses_never_keeps_out_a_client_that_signed_in_before(env: Env) -> None:
    tunnel = env.expose("sb1", 3000, password=True)
    host = env.host(tunnel)
    form = f"password={PASSWORD.replace(' ', '+')}&next=/"
    login = ["-X", "POST", "--data", form, "-o", "/dev/null", "-w", "%{http_code}"]

    def sign_in() -> int:
        argv = ["curl", "-sS", "--max-time", "10", "--cacert", str(env.ca), "--resolve", f"{host}:{PORT}:127.0.0.1"]
        out = env.topo.run("gw", [*argv, *login, f"https://{host}:{PORT}/.gateway/login"], check=False, timeout=20)
        return int(out.stdout)

    assert sign_in() == 303  # the form: no Basic cache, every sign-in is a password check
    flooders = [f"198.18.0.{n}" for n in range(20, 60)]
    for address in flooders:
        env.topo.run("inet", ["ip", "addr", "add", f"{address}/24", "dev", "eth0"], check=False)
    stop = env.workdir / "flood.stop"
    args = [str(env.ca), GATEWAY, str(PORT), host, basic("wrong-password"), "60", ",".join(flooders), str(stop)]
    started = time.monotonic()
    flood = env.topo.start_python("inet", FLOOD_CLIENT, *args, ready="ready", timeout=15)
    try:
        # The tunnel's bucket is empty and forty addresses take every token as it comes back; a client that
        # signed in from its address before is not held by the bucket (its own backoff still holds it).
        assert [sign_in() for _ in range(3)] == [303, 303, 303]
        assert flood.poll() is None  # still flooding
    finally:
        stop.touch()
        flood.wait(timeout=30)
    flooded = time.monotonic() - started
    assert flood.stdout is not None
    statuses = json.loads(flood.stdout.read().splitlines()[-1])
    assert statuses["401"] <= BURST + flooded * RATE + 1, statuses  # the guesses checked stay within the bucket


# --------------------------------------------------------------------------- a hostile app


@pytest.mark.root
def test_metrics_count_each_password_check_by_result_and_each_answer_by_status(env: Env) -> None:
    tunnel = env.expose("sb1", 3000, password=True)  # a fresh tunnel: its throttle has counted nothing
    _, before = scrape(env)
    # One more wrong password than the free ones, sent at once: FREE checked and failed, then throttled.
    burst = [str(env.ca), GATEWAY, str(PORT), env.host(tunnel), str(FREE + 1), basic("wrong-password"), ""]
    assert json.loads(env.topo.python("inet", BURST_CLIENT, *burst, timeout=60)) == {"401": FREE, "429": 1}
    status, _, _ = env.curl(tunnel, "/", "-H", f"Authorization: {basic(PASSWORD)}", ns="gw")
    assert status == 200

    def answered(after: Samples) -> float:
        return sum(delta(before, after, "gateway_tunnel_requests_total", status=s) for s in ("200", "401", "429"))

    # A request is counted once its answer is written, which the client may see first.
    assert wait_until(lambda: answered(scrape(env)[1]) >= FREE + 2), scrape(env)[0]
    _, after = scrape(env)
    assert delta(before, after, "gateway_tunnel_requests_total", status="401") == FREE
    assert delta(before, after, "gateway_tunnel_requests_total", status="429") == 1
    assert delta(before, after, "gateway_tunnel_requests_total", status="200") == 1
    assert delta(before, after, "gateway_tunnel_logins_total", result="failed") == FREE
    assert delta(before, after, "gateway_tunnel_logins_total", result="throttled") == 1
    assert delta(before, after, "gateway_tunnel_logins_total", result="ok") == 1
    tunnel_families = {name for name in dashboard_metrics() if name.startswith("gateway_tunnel_")}
    assert tunnel_families and tunnel_families <= {name for name, _ in after}, tunnel_families


@pytest.mark.root
def test_an_apps_extra_answer_never_reaches_the_client_and_its_connection_is_dropped(env: Env) -> None:
    hostile, benign = env.expose("sb1", 3001), env.expose("sb1", 3000)
    # A second answer in the same write: the client's next request on its keep-alive connection (to
    # another tunnel) gets that tunnel's answer, not the injected one.
    result = env.raw([get(env.host(hostile), "/same"), get(env.host(benign), "/next", close=True)])
    first, second = result["answers"]
    assert (first["status"], first["body"]) == (200, "ok")
    assert second["status"] == 200 and json.loads(second["body"])["path"] == "/next", second
    assert "injected" not in json.dumps(result)
    # The gateway closed that app connection: the app sees its end.
    same = next(r for r in env.app_log() if r["port"] == 3001 and r.get("path") == "/same")["conn"]
    assert wait_until(lambda: any(r["conn"] == same and r["event"] == "eof" for r in env.app_log()), 5)

    # Bytes sent while the connection waits in the pool: the connection is closed, never reused.
    later = env.raw([get(env.host(hostile), "/later", close=True)])
    assert [(a["status"], a["body"]) for a in later["answers"]] == [(200, "ok")] and later["after"] == ""
    conn = next(r for r in env.app_log() if r["port"] == 3001 and r.get("path") == "/later")["conn"]
    assert wait_until(lambda: any(r["conn"] == conn and r["event"] == "eof" for r in env.app_log()), 5)
    status, _, body = env.curl(hostile, "/again")
    assert (status, body) == (200, "fine")
    again = next(r for r in env.app_log() if r.get("path") == "/again")["conn"]
    assert again != conn


@pytest.mark.root
def test_an_app_connection_that_carried_a_body_is_never_reused_for_another_client(env: Env) -> None:
    tunnel = env.expose("sb1", 3005)
    host = env.host(tunnel)
    # The body the naive app never reads is a request head of the attacker's, waiting for a body that the next
    # request on that app connection would be: another visitor's request, headers and cookies included.
    smuggled = f"POST /capture HTTP/1.1\r\nHost: {host}\r\nContent-Length: 60\r\n\r\n"
    answer = env.topo.python("inet", EARLY_CLIENT, str(env.ca), GATEWAY, str(PORT), host, smuggled, timeout=30)
    assert answer.count("tick") == 5
    status, _, body = env.curl(tunnel, "/victim", "-H", "Cookie: app-session=secret-of-the-victim")
    assert (status, body) == (200, "answered /victim"), body
    # The same with the body sent at once, with the head (the app has it all before it answers).
    post = f"POST /early HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(smuggled)}\r\n\r\n{smuggled}"
    assert env.raw([post], sni=host)["answers"][0]["body"] == "tick\n" * 5
    status, _, body = env.curl(tunnel, "/victim", "-H", "Cookie: app-session=secret-of-the-victim")
    assert (status, body) == (200, "answered /victim"), body
    assert not [r for r in env.app_log() if r.get("path") == "/capture" and "secret" in r.get("body", "")]


@pytest.mark.root
def test_a_204_never_announces_a_body_to_the_client(env: Env) -> None:
    # The app's 204 says Content-Length: 2 (and sends the two bytes): a client reading by the length it is
    # given would take the start of the next answer on its connection for this one's body.
    odd, benign = env.expose("sb1", 3003), env.expose("sb1", 3000)
    result = env.raw([get(env.host(odd), "/204"), get(env.host(benign), "/after", close=True)])
    first, second = result["answers"]
    assert first["status"] == 204 and "content-length" not in first["head"].lower(), first
    assert second["status"] == 200 and json.loads(second["body"])["path"] == "/after", second


@pytest.mark.root
@pytest.mark.parametrize("status_line", ["001", "099", "600", "999", "101"])
def test_an_app_status_outside_100_599_or_an_unasked_101_is_a_502(env: Env, status_line: str) -> None:
    tunnel = env.expose("sb1", 3003)
    status, _, body = env.curl(tunnel, f"/{status_line}")
    assert status == 502 and json.loads(body)["code"] == "UPSTREAM_ERROR", body


@pytest.mark.root
def test_the_app_cannot_set_or_clear_the_gateways_session_cookie(env: Env) -> None:
    tunnel = env.expose("sb1", 3002, password=True)
    host = env.host(tunnel)
    form = f"password={PASSWORD.replace(' ', '+')}&next=/"
    login = f"POST /.gateway/login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    login += f"Content-Length: {len(form)}\r\n\r\n{form}"
    answers = env.raw([login], sni=host)["answers"]
    cookie = re.search(r"(?m)^Set-Cookie: (__Host-gw-tunnel=[^;]+)", answers[0]["head"])
    assert answers[0]["status"] == 303 and cookie is not None
    page = env.raw([get(host, "/", f"Cookie: {cookie.group(1)}"), get(host, "/", f"Cookie: {cookie.group(1)}")])
    for answer in page["answers"]:
        assert answer["status"] == 200 and answer["body"] == "cookies"
        set_cookies = re.findall(r"(?im)^set-cookie:(.*)$", answer["head"])
        assert [c.strip() for c in set_cookies] == ["app=1; Path=/"], set_cookies  # the session stays as it was
        # Clearing the site's cookies would end the gateway's session (every tunnel's): only "cache" passes.
        cleared = re.findall(r"(?im)^clear-site-data:(.*)$", answer["head"])
        assert [c.strip() for c in cleared] == ['"cache"'], cleared


def login_request(host: str, password: str, *headers: str) -> str:
    """The login form's POST, as the gateway's own page sends it."""
    form = f"password={password.replace(' ', '+')}&next=/"
    lines = ["POST /.gateway/login HTTP/1.1", f"Host: {host}", "Content-Type: application/x-www-form-urlencoded"]
    lines += [*headers, f"Content-Length: {len(form)}", "Connection: close"]
    return "\r\n".join([*lines, "", form])


@pytest.mark.root
def test_only_the_tunnels_own_pages_or_the_user_can_log_in_or_out(env: Env) -> None:
    tunnel = env.expose("sb1", 3000, password=True)
    host = env.host(tunnel)

    def sign_in() -> str:
        answer = env.raw([login_request(host, PASSWORD)], sni=host)["answers"][0]
        cookie = re.search(r"(?m)^Set-Cookie: (__Host-gw-tunnel=[^;]+)", answer["head"])
        assert answer["status"] == 303 and cookie is not None, answer
        return f"Cookie: {cookie.group(1)}"

    def status(path: str, *headers: str) -> dict[str, Any]:
        answer: dict[str, Any] = env.raw([get(host, path, *headers, close=True)], sni=host)["answers"][0]
        return answer

    session = sign_in()
    # Another tunnel's page (same site: the browser sends the session along) or another site's.
    for site in ("same-site", "cross-site"):
        refused = status("/.gateway/logout", session, f"Sec-Fetch-Site: {site}")
        assert refused["status"] == 403 and json.loads(refused["body"])["code"] == "CROSS_SITE_REFUSED", refused
    assert status("/", session)["status"] == 200  # still signed in
    # Nor may another page spend its visitors' password attempts here (each would count against them).
    before = env.reasons(tunnel).count("tunnel WRONG_PASSWORD")
    cross_site = env.reasons(tunnel).count("tunnel CROSS_SITE_REFUSED")
    refused = env.raw([login_request(host, "wrong-password", "Sec-Fetch-Site: same-site")], sni=host)["answers"][0]
    assert refused["status"] == 403 and json.loads(refused["body"])["code"] == "CROSS_SITE_REFUSED", refused
    assert wait_until(lambda: env.reasons(tunnel).count("tunnel CROSS_SITE_REFUSED") > cross_site, 5)
    assert env.reasons(tunnel).count("tunnel WRONG_PASSWORD") == before  # the password was never checked
    for fetch_site in ("Sec-Fetch-Site: same-origin", "Sec-Fetch-Site: none", None):
        session = sign_in()
        assert status("/.gateway/logout", session, *filter(None, [fetch_site]))["status"] == 303
        assert status("/", session)["status"] == 401


# --------------------------------------------------------------------------- what the client sends


@pytest.mark.root
@pytest.mark.parametrize(
    "host_line",
    [
        "Host: {host}:443@evil.example",
        "Host: {host}:abc",
        "Host: {host}/x",
        "Host: {host}:",
        "Host: me@{host}",
        "Host: me:pw@{host}:8443",
        "Host: {host}:8443:1",
        "Host: {host}:99999",
        "Host: {host}\r\nHost: {host}",
        "Host: {host}\r\nHost: evil.example",
        "Host: evil.example\r\nHost: {host}",
        "",
    ],
)
def test_a_host_that_is_not_one_name_and_numeric_port_is_400_and_reaches_nothing(env: Env, host_line: str) -> None:
    tunnel = env.expose("sb1", 3000)
    host = env.host(tunnel)
    before = env.reached()
    lines = ["GET /bad-host HTTP/1.1", *filter(None, [host_line.format(host=host)]), "Connection: close"]
    answer = env.raw(["\r\n".join([*lines, "", ""])], sni=host)["answers"][0]
    assert answer["status"] == 400, answer
    assert json.loads(answer["body"])["code"] == "INVALID_HOST"
    assert env.reached() == before


@pytest.mark.root
def test_the_app_gets_a_clean_host_and_only_the_gateways_forwarding_headers(env: Env) -> None:
    tunnel = env.expose("sb1", 3000)
    host = env.host(tunnel)
    forged = [
        "X-Forwarded-For: 6.6.6.6",
        "X_Forwarded_For: 6.6.6.6",
        "x_forwarded_host: evil.example",
        "X-Forwarded-Port: 6666",
        "X-Forwarded-Prefix: /evil",
        "X-Forwarded-Scheme: http",
        "X-Forwarded-Ssl: off",
        "X-Forwarded-Server: evil.example",
        "X_Forwarded_Proto: http",
        "X-Real-IP: 6.6.6.6",
        "Forwarded: for=6.6.6.6;host=evil.example",
        "X-Client-IP: 6.6.6.6",
        "Client-IP: 6.6.6.6",
        "True-Client-IP: 6.6.6.6",
        "CF-Connecting-IP: 6.6.6.6",
        "X-Original-URL: /admin",
        "X-Rewrite-URL: /admin",
        "Proxy: http://6.6.6.6:3128",
        "Transfer_Encoding: chunked",
        "X-Forwarded-For: 7.7.7.7",
        "X-Originating-IP: 6.6.6.6",
        "Fly-Client-IP: 6.6.6.6",
        "X-Azure-ClientIP: 6.6.6.6",
        "X-Azure-SocketIP: 6.6.6.6",
        "X-Envoy-External-Address: 6.6.6.6",
        "CloudFront-Viewer-Address: 6.6.6.6:443",
        "X-Vercel-Forwarded-For: 6.6.6.6",
        "X-Forwarded-IPs: 6.6.6.6",
    ]
    upper = f"{tunnel['id'].upper()}.{DOMAIN.upper()}:0{PORT}"
    answer = env.raw([get(upper, "/clean", *forged, "X-Request-Id: kept", close=True)], sni=host)["answers"][0]
    assert answer["status"] == 200, answer
    seen = json.loads(answer["body"])["headers"]
    assert [[k.lower(), v] for k, v in seen] == [
        ["host", f"{host}:{PORT}"],
        ["x-request-id", "kept"],
        ["x-forwarded-for", "198.18.0.1"],
        ["x-forwarded-proto", "https"],
        ["x-forwarded-host", f"{host}:{PORT}"],
    ]


@pytest.mark.root
@pytest.mark.parametrize(
    "transfer_encoding", ["xchunked", '"chunked"', "chunked, identity", "gzip", "chunked\x0bx", "identity"]
)
def test_a_head_answered_400_never_reaches_the_app(env: Env, transfer_encoding: str) -> None:
    tunnel = env.expose("sb1", 3000)
    host = env.host(tunnel)
    before = len(env.app_log())
    head = f"POST /smuggle HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: {transfer_encoding}\r\n\r\n"
    result = env.raw([head + "5\r\nhello\r\n0\r\n\r\n"], sni=host)
    assert result["answers"][0]["status"] == 400, result
    # A request sent after the 400 was answered has reached the app: the refused one would have before it.
    assert env.curl(tunnel, "/marker")[0] == 200
    assert wait_until(lambda: any(r.get("path") == "/marker" for r in env.app_log()[before:]), 5)
    assert [r for r in env.app_log()[before:] if r.get("path") == "/smuggle"] == []


# --------------------------------------------------------------------------- ingress rules


def record(**ingress: Any) -> dict[str, Any]:
    return {"id": "sb2", "addresses": ["10.75.0.2"], "ingress": ingress}


def stream(env: Env, tunnel: dict[str, Any], *, source: str = "", ns: str = "inet") -> subprocess.Popen[Any]:
    address = GATEWAY if ns == "inet" else "127.0.0.1"
    auth = basic(PASSWORD) if tunnel["password_protected"] else ""
    args = [str(env.ca), address, str(PORT), env.host(tunnel), source, auth]
    return env.topo.start_python(ns, STREAM_CLIENT, *args, ready="ready", timeout=15)


def ended(proc: subprocess.Popen[Any]) -> bool:
    """Whether the stream was cut (bounded: the client would stream for 30 s otherwise)."""
    proc.wait(timeout=10)
    assert proc.stdout is not None
    return proc.returncode == 0 and "ended" in proc.stdout.read()


@pytest.mark.root
def test_ingress_rules_decide_at_expose_time(env: Env) -> None:
    env.sandbox(record(ports=[3000]))  # public_access false, the default
    refused = env.cli("tunnel", "expose", "sb2", "3000", check=False)
    assert refused.returncode != 0 and "INGRESS_PASSWORD_REQUIRED" in refused.stderr + refused.stdout
    other_port = env.cli("tunnel", "expose", "sb2", "3001", "--password-file", str(env.password_file), check=False)
    assert other_port.returncode != 0 and "INGRESS_PORT_NOT_ALLOWED" in other_port.stderr + other_port.stdout
    tunnel = env.expose("sb2", 3000, password=True)
    assert env.curl(tunnel, "/", "-H", f"Authorization: {basic(PASSWORD)}")[0] == 200
    env.sandbox(record(public_access=True))
    assert env.curl(env.expose("sb2", 3001), "/")[0] == 200


@pytest.mark.root
def test_a_record_change_cuts_the_live_tunnels_it_no_longer_permits(env: Env) -> None:
    env.sandbox(record(public_access=True))
    open_tunnel, protected = env.expose("sb2", 3000), env.expose("sb2", 3000, password=True)
    # public_access goes: the tunnel without a password stops, streams included; the protected one serves.
    streaming = stream(env, open_tunnel)
    env.sandbox(record(public_access=False))
    assert ended(streaming)
    status, _, body = env.curl(open_tunnel, "/")
    assert status == 403 and json.loads(body)["code"] == "INGRESS_PASSWORD_REQUIRED"
    shown = json.loads(env.cli("--json", "tunnel", "get", open_tunnel["id"]).stdout)
    assert shown["state"] == "ingress_denied"
    assert env.curl(protected, "/", "-H", f"Authorization: {basic(PASSWORD)}")[0] == 200
    # ingress.ports leaves out the tunnel's port: cut too.
    streaming = stream(env, protected)
    env.sandbox(record(ports=[3001]))
    assert ended(streaming)
    status, _, body = env.curl(protected, "/", "-H", f"Authorization: {basic(PASSWORD)}")
    assert status == 403 and json.loads(body)["code"] == "INGRESS_PORT_NOT_ALLOWED"
    # Allowed again: it serves again (the record is the policy, as it is now).
    env.sandbox(record(ports=[3000]))
    assert env.curl(protected, "/", "-H", f"Authorization: {basic(PASSWORD)}")[0] == 200


@pytest.mark.root
def test_ingress_sources_decide_who_is_served_and_cut_those_left_out(env: Env) -> None:
    env.sandbox(record(public_access=True, sources=["198.18.0.0/28"]))
    tunnel = env.expose("sb2", 3000)
    assert env.curl(tunnel, "/")[0] == 200  # from 198.18.0.1
    before = env.reached("sb2")
    status, _, body = env.curl(tunnel, "/", ns="gw")  # from 127.0.0.1: not a source
    assert status == 403 and json.loads(body)["code"] == "INGRESS_SOURCE_DENIED"
    assert env.reached("sb2") == before
    inside, outside = stream(env, tunnel), stream(env, tunnel, source=GUESSERS[0])
    env.sandbox(record(public_access=True, sources=["198.18.0.0/30"]))  # 198.18.0.11 is left out
    assert ended(outside)
    assert inside.poll() is None  # still streaming: it is still a source
    env.sandbox(record(public_access=True, sources=["203.0.113.0/24"]))
    assert ended(inside)


@pytest.mark.root
def test_a_sandbox_deleted_and_created_again_in_the_policy_file_does_not_inherit_its_tunnels(env: Env) -> None:
    env.sandbox(record(public_access=True))
    tunnel = env.expose("sb2", 3000)
    streaming = stream(env, tunnel)
    policy_file = env.workdir / "policies.json"
    policies = json.loads(policy_file.read_text())
    sb2 = policies["sandboxes"].pop("sb2")

    def write(data: dict[str, Any]) -> None:
        tmp = policy_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(policy_file)  # atomic: the store never reads half a file

    # Another writer (an operator's editor, here) deletes the sandbox and creates it again at once, with the
    # same address, before the tunnel store's periodic maintenance has written the revocation: the sandbox
    # of the new record is another sandbox, and the tunnels of the old one stay dead.
    write(policies)
    assert ended(streaming)  # the gateway saw the deletion
    write({**policies, "sandboxes": {**policies["sandboxes"], "sb2": sb2}})
    assert wait_until(lambda: env.cli("sandbox", "get", "sb2", check=False).returncode == 0, 10)
    status, _, body = env.curl(tunnel, "/")
    assert status == 410 and json.loads(body)["code"] == "TUNNEL_GONE", body

    # Never served again; the store's periodic maintenance writes the revocation down (within its interval).
    def revoked() -> dict[str, Any] | None:
        shown = json.loads(env.cli("--json", "tunnel", "get", tunnel["id"]).stdout)
        return shown if shown["state"] == "revoked" else None

    shown = wait_until(revoked, 10)
    assert shown and shown["revoked_reason"] == "sandbox_deleted", shown
    status, _, body = env.curl(tunnel, "/")
    assert status == 410 and json.loads(body)["code"] == "TUNNEL_GONE", body


# --------------------------------------------------------------------------- the shared site


@pytest.mark.root
def test_check_config_warns_that_tunnels_under_a_private_domain_share_a_site(env: Env) -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "--config", str(env.config)],
        capture_output=True,
        text=True,
        env=env.environ(),
        cwd=str(REPO),
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert f"warning:         tunnel domain {DOMAIN} is not a public suffix" in checked.stdout


CHROMIUM = Path("/usr/bin/chromium")

#: Chromium on the gateway host (argv: HOME trusting the CA, URL of the protected tunnel B, URL of tunnel A,
#: the password): log in to B, let A's page script and A's app go for B's session, come back to B. Prints JSON.
BROWSER = r"""
import asyncio, json, sys
from playwright.async_api import async_playwright
home, b_url, a_url, password = sys.argv[1:5]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-proxy-server",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--host-resolver-rules=MAP *.tunnel.test 127.0.0.1"]
def session(cookies):
    return [c["value"] for c in cookies if c["name"] == "__Host-gw-tunnel"]
async def main():
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS,
                                          env={"HOME": home, "PATH": "/usr/bin:/bin"}, timeout=30_000)
        try:
            page = await browser.new_page()
            await page.goto(b_url, timeout=15_000)
            await page.fill("#password", password)
            await page.click("button[type=submit]")
            await page.wait_for_selector("text=x-forwarded-for", timeout=10_000)
            before = session(await page.context.cookies(b_url))
            await page.goto(a_url + "?b=" + b_url, timeout=15_000)
            await page.wait_for_function("document.title.startsWith('done')", timeout=10_000)
            seen_by_a = await page.title()
            await page.goto(a_url + "clear", timeout=15_000)
            response = await page.goto(b_url, timeout=15_000)
            after = session(await page.context.cookies(b_url))
            b_app_got = await page.inner_text("body")
            deep = await page.goto(b_url + "deep/", timeout=15_000)
            print(json.dumps({"before": before, "after": after, "a_saw": seen_by_a, "b_status": response.status,
                              "b_app_got": b_app_got, "deep_status": deep.status}))
        finally:
            await browser.close()
asyncio.run(main())
"""


@pytest.mark.root
@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("certutil") is None, reason="needs chromium and certutil")
def test_another_tunnels_page_can_neither_read_nor_replace_the_session_in_a_browser(env: Env) -> None:
    pytest.importorskip("playwright.async_api")
    protected, tossing = env.expose("sb1", 3000, password=True), env.expose("sb1", 3004)
    home = env.workdir / "browser-home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, timeout=30)
    trust = ["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "gateway-test-ca", "-i", str(env.ca)]
    subprocess.run(trust, check=True, timeout=30)
    urls = [f"https://{env.host(t)}:{PORT}/" for t in (protected, tossing)]
    seen = json.loads(env.topo.python("gw", BROWSER, str(home), *urls, PASSWORD, timeout=120))
    assert len(seen["before"]) == 1 and seen["after"] == seen["before"], seen  # not replaced, not shadowed
    assert seen["before"][0] not in seen["a_saw"]  # A's script sees A's cookies only
    assert seen["b_status"] == 200 and seen["deep_status"] == 200  # still signed in, on every path
    # What the shared site does allow (the README says so): A's cookies for the whole domain reach B's app;
    # the gateway's session never does, nor does anything A planted under the session's own name.
    got = json.loads(seen["b_app_got"])["headers"]
    cookie = next(v for k, v in got if k.lower() == "cookie")
    assert "shared=from-a" in cookie and "__Host-gw-tunnel" not in cookie and seen["before"][0] not in cookie


# --------------------------------------------------------------------------- lifetime: revoke, expiry, deletion


def websocket(env: Env, tunnel: dict[str, Any]) -> subprocess.Popen[Any]:
    args = [str(env.ca), GATEWAY, str(PORT), env.host(tunnel)]
    return env.topo.start_python("inet", WS_CLIENT, *args, ready="ready", timeout=15)


def closed_with(proc: subprocess.Popen[Any]) -> str:
    """How the WebSocket ended ("close 1008", "eof"); bounded: the app sends frames for 30 s otherwise."""
    proc.wait(timeout=10)
    assert proc.stdout is not None
    return proc.stdout.read().strip()


def gone(env: Env, tunnel: dict[str, Any]) -> None:
    status, _, body = env.curl(tunnel, "/")
    assert status == 410 and json.loads(body)["code"] == "TUNNEL_GONE", body


@pytest.mark.root
def test_revocation_cuts_a_live_stream_and_closes_a_websocket_with_1008(env: Env) -> None:
    tunnel = env.expose("sb1", 3000)
    streaming, ws = stream(env, tunnel), websocket(env, tunnel)
    started = time.monotonic()
    env.cli("tunnel", "revoke", tunnel["id"])
    assert closed_with(ws) == "close 1008"  # a Close frame between two of the app's frames, not a bare cut
    assert ended(streaming)
    assert time.monotonic() - started < 3  # promptly, not when the app's streams end (30 s)
    gone(env, tunnel)
    shown = json.loads(env.cli("--json", "tunnel", "get", tunnel["id"]).stdout)
    assert shown["state"] == "revoked", shown


@pytest.mark.root
def test_expiry_cuts_a_live_stream_and_a_websocket(env: Env) -> None:
    tunnel: dict[str, Any] = json.loads(env.cli("--json", "tunnel", "expose", "sb1", "3000", "--ttl", "10").stdout)
    streaming, ws = stream(env, tunnel), websocket(env, tunnel)
    assert wait_until(lambda: streaming.poll() is not None, 15)
    expires_at = datetime.fromisoformat(tunnel["expires_at"]).timestamp()
    assert -0.5 < time.time() - expires_at < 3  # cut at its expiry, not when the app's stream ends (30 s)
    assert ended(streaming)
    assert closed_with(ws) == "close 1008"
    gone(env, tunnel)
    assert json.loads(env.cli("--json", "tunnel", "get", tunnel["id"]).stdout)["state"] == "expired"


@pytest.mark.root
def test_deleting_the_sandbox_through_the_api_cuts_its_tunnels_connections(env: Env) -> None:
    env.sandbox(record(public_access=True))
    tunnel = env.expose("sb2", 3000)
    streaming, ws = stream(env, tunnel), websocket(env, tunnel)
    started = time.monotonic()
    deleted = env.topo.run(
        "gw",
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", f"{API}/v1/sandboxes/sb2"],
        check=False,
        timeout=20,
    )
    assert deleted.stdout in ("200", "204"), deleted.stdout + deleted.stderr
    try:
        assert ended(streaming)
        assert closed_with(ws) == "close 1008"
        assert time.monotonic() - started < 3
        gone(env, tunnel)
    finally:
        env.sandbox(record(), create=True)  # the module's sb2 again, for the tests after this one


# --------------------------------------------------------------------------- the gateway's own pages


@pytest.mark.root
def test_unknown_gone_and_not_listening_answer_html_to_browsers_and_json_otherwise(env: Env) -> None:
    unknown = {"id": "k3n5v7x2q4r6t3w2"}  # a label of the right shape that no tunnel has
    revoked = env.expose("sb1", 3000)
    env.cli("tunnel", "revoke", revoked["id"])
    silent = env.expose("sb1", 3999)  # nothing listens on it in the sandbox
    for tunnel, status, code in (
        (unknown, 404, "TUNNEL_NOT_FOUND"),
        (revoked, 410, "TUNNEL_GONE"),
        (silent, 502, "UPSTREAM_UNAVAILABLE"),
    ):
        got, head, body = env.curl(tunnel, "/")
        assert got == status and json.loads(body)["code"] == code, body
        assert re.search(r"(?im)^content-type: application/json", head), head
        got, head, body = env.curl(tunnel, "/", "-H", "Accept: text/html,application/xhtml+xml,*/*;q=0.8")
        assert got == status and re.search(r"(?im)^content-type: text/html", head), head
        assert body.lstrip().lower().startswith("<!doctype html") and code not in head, body


# --------------------------------------------------------------------------- the operator's CLI

#: Tunnels made through the API until it refuses one (argv: API, sandbox, port). Prints {"ids", "refused"}.
FILL_CLIENT = r"""
import json, sys, urllib.error, urllib.request
api, sandbox, port = sys.argv[1:4]
ids = []
for _ in range(1000):
    request = urllib.request.Request(f"{api}/v1/sandboxes/{sandbox}/tunnels", json.dumps({"port": int(port)}).encode(),
                                     {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            ids.append(json.load(answer)["id"])
    except urllib.error.HTTPError as refused:
        print(json.dumps({"ids": ids, "status": refused.code, "refused": json.load(refused)}))
        break
"""

#: Revokes tunnels through the API (argv: API, JSON list of ids).
REVOKE_CLIENT = r"""
import json, sys, urllib.request
api, ids = sys.argv[1], json.loads(sys.argv[2])
for tid in ids:
    urllib.request.urlopen(urllib.request.Request(f"{api}/v1/tunnels/{tid}", method="DELETE"), timeout=10).close()
"""


@pytest.mark.root
def test_the_cli_lists_gets_and_revokes_tunnels_and_a_sandbox_holds_at_most_max_per_sandbox(env: Env) -> None:
    env.sandbox(record(public_access=True))
    listed = json.loads(env.cli("--json", "tunnel", "list", "sb2").stdout)["tunnels"]
    live = [t for t in listed if t["state"] == "active"]
    made = json.loads(env.topo.python("gw", FILL_CLIENT, API, "sb2", "3000", timeout=120))
    # The module's config says max_per_sandbox = 100 (the default is 20).
    assert len(made["ids"]) == 100 - len(live) and made["status"] == 409, made
    assert made["refused"]["code"] == "TOO_MANY_TUNNELS", made
    refused = env.cli("tunnel", "expose", "sb2", "3000", check=False)
    assert refused.returncode != 0 and "TOO_MANY_TUNNELS" in refused.stdout + refused.stderr
    table = env.cli("tunnel", "list", "sb2").stdout
    assert all(tid in table for tid in made["ids"])
    first = made["ids"][0]
    shown = env.cli("tunnel", "get", first).stdout
    assert first in shown and "active" in shown and "sb2" in shown, shown
    env.cli("tunnel", "revoke", first)
    assert json.loads(env.cli("--json", "tunnel", "get", first).stdout)["state"] == "revoked"
    again = env.expose("sb2", 3000)  # the revoked one no longer counts
    env.topo.python("gw", REVOKE_CLIENT, API, json.dumps([again["id"], *made["ids"][1:]]), timeout=120)
    assert [
        t for t in json.loads(env.cli("--json", "tunnel", "list", "sb2").stdout)["tunnels"] if t["state"] == "active"
    ] == live


# --------------------------------------------------------------------------- flow records


@pytest.mark.root
def test_every_tunnel_request_is_a_metadata_only_flow_record_in_the_audit_batches(env: Env) -> None:
    tunnel = env.expose("sb1", 3000, password=True)
    host = env.host(tunnel)
    since_us = int((time.time() - 5) * 1e6)  # a batch opened a little before still holds these
    secret = "Cookie: app-session=secret-cookie-value"
    assert (
        env.curl(tunnel, "/audited-path?q=secret-query", "-H", f"Authorization: {basic(PASSWORD)}", "-H", secret)[0]
        == 200
    )
    assert env.curl(tunnel, "/", "-H", f"Authorization: {basic('wrong-password-value')}")[0] == 401

    def batches() -> str:
        query = f"since_us={since_us}&limit=1000"
        listed = env.topo.run("gw", ["curl", "-sS", f"{API}/v1/sandboxes/sb1/audit-batches?{query}"], timeout=20)
        names = [b["name"] for b in json.loads(listed.stdout)["batches"]]
        shown = env.cli("--json", "audit", "list", "sb1", "--all", "--since-us", str(since_us)).stdout
        assert set(names) <= {b["name"] for b in json.loads(shown)["batches"]}  # the CLI lists them too (and newer)
        return "".join(env.cli("audit", "get", "sb1", name).stdout for name in names)

    def ours() -> list[dict[str, Any]]:
        return [r for r in map(json.loads, batches().splitlines()) if r.get("hostname") == f"{host}:{PORT}"]

    assert wait_until(lambda: len(ours()) >= 2, 15)
    records = ours()
    assert [r["protocol"] for r in records] == ["http", "http"], records
    assert [(r["verdict"], r["reason"]) for r in records] == [
        ("allow", "tunnel 200"),
        ("deny", "tunnel WRONG_PASSWORD"),
    ], records
    assert {r["dst_addr"] for r in records} == {"10.75.0.1"} and {r["dst_port"] for r in records} == {3000}
    # Both were decided against sb1's record (its addresses and ingress rules): the revision the API names.
    shown = json.loads(env.topo.run("gw", ["curl", "-sS", f"{API}/v1/sandboxes/sb1"], timeout=20).stdout)
    assert {r["revision"] for r in records} == {shown["revision"]}, records
    # A new revision of sb1 (a label): the tunnel's next request is served under it, and its record says so.
    env.sandbox({**shown, "labels": {**shown.get("labels", {}), "step": "two"}})
    changed = json.loads(env.topo.run("gw", ["curl", "-sS", f"{API}/v1/sandboxes/sb1"], timeout=20).stdout)
    assert changed["revision"] != shown["revision"], changed
    assert env.curl(tunnel, "/", "-H", f"Authorization: {basic(PASSWORD)}")[0] == 200
    assert wait_until(lambda: changed["revision"] in {r["revision"] for r in ours()}, 15), ours()
    text = json.dumps(records)
    for leaked in (
        PASSWORD,
        basic(PASSWORD),
        "wrong-password-value",
        "secret-cookie-value",
        "secret-query",
        "audited-path",
    ):
        assert leaked not in text, leaked


# --------------------------------------------------------------------------- restarts (last: it restarts the gateway)


@pytest.mark.root
def test_tunnels_and_revocations_survive_a_restart_of_gateway_run(env: Env) -> None:
    kept, revoked = env.expose("sb1", 3000, password=True), env.expose("sb1", 3000)
    env.cli("tunnel", "revoke", revoked["id"])
    assert env.gateway is not None
    env.gateway.terminate()
    assert env.gateway.wait(timeout=30) == 0
    started = len(env.log_events("tunnel.server_started"))
    env.start_gateway()
    assert wait_until(lambda: len(env.log_events("tunnel.server_started")) > started, 15)
    status, _, body = env.curl(kept, "/after-restart", "-H", f"Authorization: {basic(PASSWORD)}")
    assert status == 200 and json.loads(body)["path"] == "/after-restart", body  # its password hash, kept too
    assert env.curl(kept, "/", "-H", f"Authorization: {basic('wrong-password')}")[0] == 401
    gone(env, revoked)
