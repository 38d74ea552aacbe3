#!/usr/bin/env python3
"""The egress data plane side by side with kernel forwarding, nginx `stream` and HAProxy (issue 3, section 6).

One run builds one throw-away topology (tests/netns.py: `<prefix>-sb1`, `<prefix>-gw`, `<prefix>-inet`)
and measures every subject with the same client (Python, in the sandbox namespace) and the same origins
(in the internet namespace):

* `kernel`:  the gateway namespace only routes (host route + proxy ARP + forwarding, no nft table).
* `nginx`:   nginx `stream` in the gateway namespace, `ssl_preread on` + a `map $ssl_preread_server_name`
             allowlist. Not transparent (nginx cannot take a TPROXY listener): the client dials nginx's
             address 198.18.0.2:8443 directly.
* `haproxy`: HAProxy (tcp mode, `tcp-request inspect-delay` + `req.ssl_sni` ACLs), same setup, 198.18.0.2:9443.
* `uvloop-relay`: the floor of a Python relay: uvloop protocols in the gateway namespace, one port per
             origin (no peek, policy, resolution, limits or records), dialled directly like the peers.
* `gateway`: the real `gateway run --data-plane --steer` (nft TPROXY table, policy allowing the test names,
             names resolved through an authoritative DNS in the internet namespace, flow records on),
             the client dials the origin's own address and is steered transparently.

Metrics per subject: new TLS connections/s (full handshakes + a tiny request, `--threads` blocking
client threads) with the proxy's CPU ms per connection (utime+stime of the proxy's processes from
/proc, before/after); p50/p99 connect+handshake latency (one connection at a time); single-connection
bulk throughput with proxy CPU s/GiB; memory per idle connection with `--idle` connections held
(RSS delta of the proxy's processes / connections).

    .venv/bin/python bench/egress.py             # defaults: about 3-5 minutes
    .venv/bin/python bench/egress.py --quick     # small counts, < 60 s: checks the harness works

Needs root and Debian's nginx (with libnginx-mod-stream) and haproxy: installed with apt-get when
missing (`--no-install` prints the command and exits 2 instead). See bench/README.md for caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Protocol

from aptget import install_missing  # bench/ is on sys.path when a script runs
from procstat import cpu_seconds, descendants, fmt, have, rss_kib

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import authdns  # noqa: E402
from tests.netns import INET_V4, Topology, TopologyError, live_namespaces, wait_for_line  # noqa: E402

SUBJECTS = ("kernel", "gateway", "nginx", "haproxy", "uvloop-relay", "gateway-nocap", "gateway-baseline")
DEFAULT_SUBJECTS = SUBJECTS[:5]
RUN_ORDER = (
    "kernel",
    "nginx",
    "haproxy",
    "uvloop-relay",
    "gateway-baseline",
    "gateway",
    "gateway-nocap",
)  # the gateway last: its nft table drops the direct peers
APT_PACKAGES = ("nginx-light", "libnginx-mod-stream", "haproxy")
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
PROXY_ADDRESS = "198.18.0.2"  # the gateway namespace's up0 address: where the direct peers listen
PEER_PORTS = {"nginx": 8443, "haproxy": 9443}
#: The bare relay has no peek: one port per origin (name -> port) stands in for the SNI map.
BARE_RELAY_PORTS = {"cps.test": 7443, "bulk.test": 7444, "idle.test": 7445}
#: name -> origin address. cps: nginx HTTPS origin; bulk: raw origin streaming after the ClientHello; idle: holds.
NAMES = {"cps.test": "198.18.1.1", "bulk.test": "198.18.1.2", "idle.test": "198.18.1.3"}
BANDWIDTH_CAP_MBIT = 10_000  # the policy maximum (gateway.policy.LIMIT_RANGES)
GIB = 1 << 30

# --------------------------------------------------------------------------- programs run in the namespaces


#: Raw origin: reads one TLS record (the ClientHello), then on the bulk address streams argv[3] bytes from
#: memory and closes, on the idle address answers one byte and holds the connection until the client closes.
RAW_ORIGIN = r"""
import asyncio, resource, socket, sys, threading
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
bulk_addr, idle_addr, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
BLOCK = memoryview(b"\xa5" * (4 << 20))

def read_hello(conn):
    head = b""
    while len(head) < 5:
        chunk = conn.recv(5 - len(head))
        if not chunk:
            return False
        head += chunk
    need = int.from_bytes(head[3:5], "big")
    while need > 0:
        chunk = conn.recv(min(need, 65536))
        if not chunk:
            return False
        need -= len(chunk)
    return True

def stream(conn):
    with conn:
        conn.settimeout(120)
        try:
            if read_hello(conn):
                left = total
                while left > 0:
                    n = min(left, len(BLOCK))
                    conn.sendall(BLOCK[:n])
                    left -= n
        except OSError:
            pass

def bulk_server():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bulk_addr, 443))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=stream, args=(conn,), daemon=True).start()

async def hold(reader, writer):
    try:
        head = await reader.readexactly(5)
        await reader.readexactly(int.from_bytes(head[3:5], "big"))
        writer.write(b"K")
        while await reader.read(4096):
            pass
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()

async def main():
    threading.Thread(target=bulk_server, daemon=True).start()
    server = await asyncio.start_server(hold, idle_addr, 443, backlog=8192)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""

#: TLS client (sandbox): mode `cps` (argv: host port sni count threads seconds) runs full handshakes + a tiny
#: request on `threads` blocking threads; mode `bulk` (host port sni seconds) sends a real ClientHello and counts
#: the bytes streamed back until EOF; mode `idle` (host port sni count seconds) holds `count` connections that
#: each got the origin's one-byte answer, prints `held`, and closes them all on a line on stdin.
CLIENT = r"""
import json, resource, socket, ssl, sys, threading, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
mode, host, port, sni = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE

def client_hello():
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()

if mode == "cps":
    count, threads, seconds = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
    request = f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode()
    lock = threading.Lock()
    issued = [0]
    latencies, errors = [], []
    deadline = time.monotonic() + seconds
    def worker():
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= count:
                    return
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                raw = socket.create_connection((host, port), timeout=5)
                tls = ctx.wrap_socket(raw, server_hostname=sni)
                t1 = time.perf_counter()
                tls.sendall(request)
                data = b""
                while chunk := tls.recv(4096):
                    data += chunk
                tls.close()
                if not data.startswith(b"HTTP/1.1 200"):
                    raise OSError(f"bad answer {data[:40]!r}")
                latencies.append(t1 - t0)
            except (OSError, ssl.SSLError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 30)
    elapsed = time.perf_counter() - start
    print(json.dumps({"ok": len(latencies), "errors": len(errors), "first_errors": errors[:3],
                      "elapsed": elapsed, "latencies": latencies}))
elif mode == "bulk":
    seconds = float(sys.argv[5])
    s = socket.create_connection((host, port), timeout=10)
    s.settimeout(seconds)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    s.sendall(client_hello())
    got = 0
    error = None
    try:
        while n := s.recv_into(view):
            got += n
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - t0
    print(json.dumps({"bytes": got, "elapsed": elapsed, "error": error}))
elif mode == "idle":
    count, seconds = int(sys.argv[5]), float(sys.argv[6])
    hello = client_hello()
    deadline = time.monotonic() + seconds
    socks, failed = [], 0
    batch = 200
    for start in range(0, count, batch):
        opened = []
        for _ in range(min(batch, count - start)):
            try:
                s = socket.create_connection((host, port), timeout=5)
                s.sendall(hello)
                opened.append(s)
            except OSError:
                failed += 1
        for s in opened:
            try:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                if s.recv(1) == b"K":
                    socks.append(s)
                    continue
            except OSError:
                pass
            failed += 1
            s.close()
        if time.monotonic() > deadline:
            break
    print(f"held {len(socks)} failed {failed}", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
"""

#: The floor of any Python relay here (`uvloop-relay`): uvloop protocols, one listening port per origin, no
#: peek, policy, resolution, limits or records; backpressure both ways and half-close. argv: JSON {port: origin}.
BARE_RELAY = r"""
import asyncio, json, resource, sys, uvloop
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, routes = sys.argv[1], {int(p): o for p, o in json.loads(sys.argv[2]).items()}

class Side(asyncio.Protocol):
    def __init__(self):
        self.peer = self.transport = None
        self.held = []
        self.eof = False
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        if self.peer is None or self.peer.transport is None:
            self.held.append(data)
        else:
            self.peer.transport.write(data)
    def eof_received(self):
        self.eof = True
        if self.peer is None or self.peer.transport is None:
            return False
        if self.peer.eof:  # both directions ended: done
            self.peer.transport.close()
            return False
        self.peer.transport.write_eof()
        return True  # half-close: the other direction goes on
    def connection_lost(self, exc):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
    def pause_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()
    def resume_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

class Client(Side):
    def connection_made(self, transport):
        super().connection_made(transport)
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self.dial(routes[transport.get_extra_info("sockname")[1]]))
    async def dial(self, origin):
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(Side, origin, 443)
        except OSError:
            self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        for data in self.held:
            upstream.transport.write(data)
        self.held = []
        self.transport.resume_reading()

async def main():
    loop = asyncio.get_running_loop()
    for port in routes:
        await loop.create_server(Client, host, port, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""

#: Diagnostic only (`--subjects ...,gateway-nocap`): the same gateway with the per-sandbox bandwidth buckets
#: switched off in this process (no gateway code changed), to see what the relay does without the policy cap.
NOCAP_LAUNCHER = r"""
import sys
from gateway import ratelimit
ratelimit.BandwidthLimiter.bucket = lambda self, *args, **kwargs: None
from gateway.cli import main
sys.argv[0] = "gateway"
sys.exit(main())
"""

# --------------------------------------------------------------------------- helpers


def ensure_packages(subjects: Iterable[str], install: bool) -> None:
    """nginx is always needed (the HTTPS origin is nginx); its stream module and haproxy when measured."""
    missing = set()
    if not have("nginx"):
        missing.add("nginx-light")
    if "nginx" in subjects and not NGINX_STREAM_MODULE.exists():
        missing.add("libnginx-mod-stream")
    if "haproxy" in subjects and not have("haproxy"):
        missing.add("haproxy")
    install_missing(missing, install)


def _drain(stream: Any) -> None:
    with contextlib.suppress(Exception):
        for _ in stream:
            pass


def make_pki(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cps.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "origin.pem", directory / "origin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def nginx_origin_conf(workdir: Path, cert: Path, key: Path) -> str:
    return f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {workdir}/origin-nginx.pid;
error_log {workdir}/origin-nginx.err warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp-body;
    proxy_temp_path {workdir}/tmp-proxy;
    fastcgi_temp_path {workdir}/tmp-fcgi;
    uwsgi_temp_path {workdir}/tmp-uwsgi;
    scgi_temp_path {workdir}/tmp-scgi;
    server {{
        listen {NAMES["cps.test"]}:443 ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        keepalive_requests 1000000;  # bench/inspection.py's keep-alive clients: no reconnect every 1000 requests
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_stream_conf(workdir: Path) -> str:
    entries = "\n".join(f"        {name} {address}:443;" for name, address in NAMES.items())
    return f"""
load_module {NGINX_STREAM_MODULE};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {workdir}/peer-nginx.pid;
error_log {workdir}/peer-nginx.err warn;
events {{ worker_connections 16384; }}
stream {{
    map $ssl_preread_server_name $upstream {{
{entries}
        default 127.0.0.1:9;
    }}
    server {{
        listen {PROXY_ADDRESS}:{PEER_PORTS["nginx"]} backlog=4096;
        ssl_preread on;
        preread_timeout 5s;
        proxy_pass $upstream;
        proxy_connect_timeout 3s;
        proxy_timeout 300s;
    }}
}}
"""


def haproxy_conf() -> str:
    rules = "\n".join(f"    use_backend be_{name.split('.')[0]} if {{ req.ssl_sni -i {name} }}" for name in NAMES)
    backends = "\n".join(
        f"backend be_{name.split('.')[0]}\n    server s {address}:443\n" for name, address in NAMES.items()
    )
    return f"""
global
    maxconn 9000
    nbthread 1
defaults
    mode tcp
    timeout connect 3s
    timeout client 300s
    timeout server 300s
frontend fe
    bind {PROXY_ADDRESS}:{PEER_PORTS["haproxy"]} backlog 4096
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    tcp-request content reject
{rules}
{backends}
"""


def gateway_policies() -> dict[str, Any]:
    limit = {
        "connections_per_minute": 1_000_000,
        "bandwidth_mbit": BANDWIDTH_CAP_MBIT,
        "burst_mbit": BANDWIDTH_CAP_MBIT,
    }
    return {
        "templates": {},
        "sandboxes": {
            "sb1": {
                "id": "sb1",
                "addresses": ["10.75.0.1", "fdd4:1476:6c7e::1"],
                "profile": "allowlisted",
                "egress": {"allow_hosts": list(NAMES)},
                "limits": limit,
            }
        },
    }


def gateway_toml(workdir: Path, policy_file: Path) -> str:
    return (
        "\n".join(
            [
                "[store]",
                'backend = "embedded"',
                f'path = "{policy_file}"',
                "poll_interval = 1.0",
                "[audit]",
                f'dir = "{workdir / "audit"}"',
                "flush_interval = 1.0",
                "[log]",
                'format = "json"',
                "[limits]",
                "connections_per_minute = 1000000",
                f"bandwidth_mbit = {BANDWIDTH_CAP_MBIT}",
                f"burst_mbit = {BANDWIDTH_CAP_MBIT}",
                "[egress]",
                "peek_timeout = 5.0",
                "connect_timeout = 3.0",
                'gateway_addresses = ["198.18.0.2", "2001:db8:ff::2"]',
                "[resolver]",
                f'upstreams = ["{INET_V4}:53"]',
                "timeout = 1.0",
                "min_ttl = 60",
            ]
        )
        + "\n"
    )


# --------------------------------------------------------------------------- the bench


@dataclass
class Result:
    subject: str
    cps: float | None = None
    cpu_ms_per_conn: float | None = None
    cps_sys_share: float | None = None
    bulk_sys_share: float | None = None
    cps_errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    bulk_bytes: int = 0
    bulk_mb_s: float | None = None
    cpu_s_per_gib: float | None = None
    idle_held: int = 0
    kib_per_idle: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Options:
    cps_count: int
    cps_threads: int
    latency_count: int
    bulk_bytes: int
    idle: int
    phase_seconds: float
    profile: Path | None = None  # run the gateway under cProfile, stats written here
    event_loop: str = "uvloop"  # the gateway's --event-loop
    baseline: Path | None = None  # another checkout (with its own .venv) measured as `gateway-baseline`


class Bench:
    def __init__(self, topo: Topology, workdir: Path, opts: Options) -> None:
        self.topo = topo
        self.workdir = workdir
        self.opts = opts
        self.cert, self.key = make_pki(workdir)

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        topo = self.topo
        from gateway import netplumb

        # Kernel forwarding: sysctls + host routes + proxy ARP only (no nft table, no policy routing).
        netplumb.ensure_sysctls(netns=topo.gw)
        netplumb.reconcile(
            frozenset(a for sb in topo.sandboxes for a in sb.addresses),
            topo.interface_map,
            netns=topo.gw,
            subnets=topo.steering_config().sandbox_subnets,
        )
        # Many short connections from one address: let the client reuse TIME_WAIT ports (sandbox namespace only).
        netplumb.write_sysctls({"net/ipv4/tcp_tw_reuse": "1"}, netns=topo.sandbox(1).netns)
        topo.start_python(
            "inet", authdns.ZONE_SERVER_SCRIPT, str(INET_V4), json.dumps({n: {"A": [a]} for n, a in NAMES.items()})
        )
        topo.start_python("inet", RAW_ORIGIN, NAMES["bulk.test"], NAMES["idle.test"], str(self.opts.bulk_bytes))
        conf = self.workdir / "origin-nginx.conf"
        conf.write_text(nginx_origin_conf(self.workdir, self.cert, self.key))
        self.start_and_wait("inet", ["nginx", "-c", str(conf), "-e", str(self.workdir / "origin-nginx.err")],
                            NAMES["cps.test"], 443)  # fmt: skip

    def start_and_wait(self, ns: str, argv: list[str], host: str, port: int, **kwargs: Any) -> subprocess.Popen[Any]:
        output = self.workdir / f"{Path(argv[0]).name}-{ns}.out"
        with output.open("a") as out:
            proc = self.topo.popen(ns, argv, stdout=out, stderr=out, **kwargs)
        self.wait_listening(proc, ns, host, port, output)
        return proc

    def wait_listening(
        self, proc: subprocess.Popen[Any], ns: str, host: str, port: int, output: Path, seconds: float = 15
    ) -> None:
        """Until something accepts on host:port in `ns`; TopologyError when `proc` exits first (tail of `output`)."""
        probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TopologyError(f"{proc.args} exited with {proc.returncode} at start: {output.read_text()[-2000:]}")
            if self.topo.run(ns, [sys.executable, "-c", probe], check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise TopologyError(f"nothing listening on {host}:{port} in {ns} after {seconds:g} s")

    def start_subject(self, subject: str) -> tuple[subprocess.Popen[Any] | None, Callable[[str], tuple[str, int]]]:
        """Start `subject` in the gateway namespace; returns its process and name -> (dial host, port)."""
        if subject == "kernel":
            return None, lambda name: (NAMES[name], 443)
        if subject == "nginx":
            conf = self.workdir / "peer-nginx.conf"
            conf.write_text(nginx_stream_conf(self.workdir))
            argv = ["nginx", "-c", str(conf), "-e", str(self.workdir / "peer-nginx.err")]
            proc = self.start_and_wait("gw", argv, PROXY_ADDRESS, PEER_PORTS["nginx"])
            return proc, lambda name: (PROXY_ADDRESS, PEER_PORTS["nginx"])
        if subject == "haproxy":
            conf = self.workdir / "haproxy.cfg"
            conf.write_text(haproxy_conf())
            proc = self.start_and_wait("gw", ["haproxy", "-db", "-f", str(conf)], PROXY_ADDRESS, PEER_PORTS["haproxy"])
            return proc, lambda name: (PROXY_ADDRESS, PEER_PORTS["haproxy"])
        if subject == "uvloop-relay":
            routes = json.dumps({port: NAMES[name] for name, port in BARE_RELAY_PORTS.items()})
            argv = [sys.executable, "-c", BARE_RELAY, PROXY_ADDRESS, routes]
            proc = self.start_and_wait("gw", argv, PROXY_ADDRESS, BARE_RELAY_PORTS["cps.test"])
            return proc, lambda name: (PROXY_ADDRESS, BARE_RELAY_PORTS[name])
        assert subject in ("gateway", "gateway-nocap", "gateway-baseline")
        return self.start_gateway(subject, gateway_policies()), lambda name: (NAMES[name], 443)

    def start_gateway(
        self, subject: str, policies: dict[str, Any], environment: dict[str, str] | None = None
    ) -> subprocess.Popen[Any]:
        """`gateway run --data-plane --steer` in the gateway namespace with `policies`, once its engine listens.

        `subject` picks the checkout (gateway-baseline) and the launcher (gateway-nocap); `environment` adds
        GATEWAY_<SECTION>__<KEY> settings (and what they reference) to the gateway's environment."""
        # The steering the attach tooling leaves (policy routing, nft table); the gateway then writes its own table.
        self.topo.plumb(self.topo.steering_config(dial_mark=2))
        policy_file = self.workdir / "policies.json"
        policy_file.write_text(json.dumps(policies))
        config = self.workdir / "gateway.toml"
        config.write_text(gateway_toml(self.workdir, policy_file))
        checkout = self.opts.baseline if subject == "gateway-baseline" and self.opts.baseline else REPO
        python = str(checkout / ".venv/bin/python") if checkout != REPO else sys.executable
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        env["GATEWAY_EGRESS__PUBLIC_RANGES"] = '["198.18.0.0/15", "2001:db8::/32"]'
        env.update(environment or {})
        log = (self.workdir / "gateway.log").open("a")
        proc = self.topo.popen(
            "gw",
            [
                python,
                *(["-m", "cProfile", "-o", str(self.opts.profile)] if self.opts.profile and checkout == REPO else []),
                *(["-c", NOCAP_LAUNCHER] if subject == "gateway-nocap" else ["-m", "gateway.cli"]),
                *["run", "--data-plane", "--steer", "--config", str(config), "--event-loop", self.opts.event_loop],
            ],
            stderr=log,
            env=env,
            cwd=str(checkout),
        )
        log.close()
        wait_for_line(proc, "egress engine listening", 30)
        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()  # never let stdout fill up
        return proc

    # ---------------------------------------------------------------- phases

    def client(self, *args: Any, timeout: float) -> dict[str, Any]:
        out = self.topo.run("sb1", [sys.executable, "-c", CLIENT, *map(str, args)], timeout=timeout)
        return json.loads(out.stdout)

    def measure(self, subject: str) -> Result:
        result = Result(subject)
        proc, target = self.start_subject(subject)
        try:
            pids = (lambda: descendants(proc.pid)) if proc is not None else (lambda: [])
            opts = self.opts
            # Warm-up (and a check that the path works at all): resolver cache, first-connection costs.
            warm = self.client("cps", *target("cps.test"), "cps.test", 20, 2, 20, timeout=40)
            if warm["ok"] == 0:
                raise TopologyError(f"{subject}: no connection works: {warm['first_errors']}")

            # Memory per idle connection (first: later phases leave heaps grown).
            host, port = target("idle.test")
            before = rss_kib(pids())
            holder = self.topo.popen(
                "sb1",
                [sys.executable, "-u", "-c", CLIENT, "idle", host, str(port), "idle.test", str(opts.idle),
                 str(opts.phase_seconds * 2)],
                stdin=subprocess.PIPE,
            )  # fmt: skip
            try:
                line = wait_for_line(holder, "held", opts.phase_seconds * 2 + 30)
                result.idle_held = int(line.split()[1])
                time.sleep(1.0)  # let the proxy settle (flow bookkeeping, lazily allocated buffers)
                after = rss_kib(pids())
                if result.idle_held and proc is not None:
                    result.kib_per_idle = (after - before) / result.idle_held
                if result.idle_held < opts.idle:
                    result.notes.append(f"only {result.idle_held}/{opts.idle} idle connections held")
            finally:
                with contextlib.suppress(OSError):
                    assert holder.stdin is not None
                    holder.stdin.write("\n")
                    holder.stdin.flush()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    holder.wait(30)
                self.topo.kill(holder)
                self.topo.processes.remove(holder)
            time.sleep(2.0)  # closes drain through the proxy

            # Latency: one connection at a time.
            lat = self.client("cps", *target("cps.test"), "cps.test", opts.latency_count, 1, opts.phase_seconds,
                              timeout=opts.phase_seconds + 40)  # fmt: skip
            ms = sorted(x * 1000 for x in lat["latencies"])
            if ms:
                result.p50_ms = statistics.median(ms)
                result.p99_ms = ms[min(len(ms) - 1, int(len(ms) * 0.99))]

            # New TLS connections per second, with the proxy's CPU per connection.
            cpu0 = cpu_seconds(pids())
            run = self.client("cps", *target("cps.test"), "cps.test", opts.cps_count, opts.cps_threads,
                              opts.phase_seconds, timeout=opts.phase_seconds + 40)  # fmt: skip
            cpu1 = cpu_seconds(pids())
            result.cps_errors = run["errors"]
            if run["ok"]:
                result.cps = run["ok"] / run["elapsed"]
                if proc is not None:
                    result.cpu_ms_per_conn = (cpu1[0] - cpu0[0]) * 1000 / run["ok"]
                    result.cps_sys_share = (cpu1[1] - cpu0[1]) / max(cpu1[0] - cpu0[0], 1e-9)
            if run["errors"]:
                result.notes.append(f"{run['errors']} connection errors, e.g. {run['first_errors'][:1]}")

            # Single-connection bulk download.
            cpu0 = cpu_seconds(pids())
            bulk = self.client("bulk", *target("bulk.test"), "bulk.test", opts.phase_seconds * 4,
                               timeout=opts.phase_seconds * 4 + 30)  # fmt: skip
            cpu1 = cpu_seconds(pids())
            result.bulk_bytes = bulk["bytes"]
            if bulk["bytes"]:
                result.bulk_mb_s = bulk["bytes"] / bulk["elapsed"] / 1e6
                if proc is not None:
                    result.cpu_s_per_gib = (cpu1[0] - cpu0[0]) / (bulk["bytes"] / GIB)
                    result.bulk_sys_share = (cpu1[1] - cpu0[1]) / max(cpu1[0] - cpu0[0], 1e-9)
            if bulk["bytes"] != opts.bulk_bytes or bulk["error"]:
                result.notes.append(f"bulk: {bulk['bytes']}/{opts.bulk_bytes} bytes, {bulk['error']}")
        finally:
            if proc is not None:
                self.topo.kill(proc)
                with contextlib.suppress(ValueError):
                    self.topo.processes.remove(proc)
        return result


# --------------------------------------------------------------------------- report


def run_subjects[R](
    topo: Topology,
    workdir: Path,
    setup: Callable[[], None],
    measure: Callable[[str], R],
    subjects: list[str],
    *,
    keep_workdir: bool,
) -> dict[str, R]:
    """Build the topology, `setup`, then `measure` each subject in order; namespaces and the workdir go at the end
    (also on failure), with a warning for any namespace left behind."""
    results: dict[str, R] = {}
    try:
        with topo:
            print(f"topology {topo.prefix}: {topo.sandboxes[0].netns} -> {topo.gw} -> {topo.inet}", flush=True)
            setup()
            for subject in subjects:
                t0 = time.monotonic()
                print(f"measuring {subject} ...", flush=True)
                results[subject] = measure(subject)
                print(f"  done in {time.monotonic() - t0:.1f} s", flush=True)
    finally:
        left = live_namespaces(topo.prefix)
        if left:
            print(f"WARNING: namespaces left behind: {left}", file=sys.stderr)
        if keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


PAIR: Final = ("gateway-baseline", "gateway")


def alternated(chosen: list[str], rounds: int) -> list[str]:
    """The order to measure `chosen` in: the two gateways `rounds` times, each round's first the other's second
    of the round before (the baseline first in round 1, as with one round), in the gateway's place of the order."""
    if rounds == 1 or not all(s in chosen for s in PAIR):
        return chosen
    at = chosen.index(PAIR[0])
    pairs = [s for r in range(rounds) for s in (PAIR if r % 2 == 0 else PAIR[::-1])]
    return [*chosen[:at], *pairs, *(s for s in chosen[at:] if s not in PAIR)]


def median_result(rounds: list[Result]) -> Result:
    """One subject's rounds as one result: each metric's median over the rounds that measured it."""
    if len(rounds) == 1:
        return rounds[0]
    merged = Result(rounds[0].subject, notes=[n for r in rounds for n in r.notes])
    for item in fields(Result):
        values = [getattr(r, item.name) for r in rounds]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if item.name not in ("subject", "notes") and numbers:
            counts = all(isinstance(v, int) for v in numbers)  # a count stays a count (held connections, errors)
            setattr(merged, item.name, statistics.median_low(numbers) if counts else statistics.median(numbers))
    return merged


class Noted(Protocol):
    notes: list[str]


def print_table[R: Noted](rows: list[tuple[str, Callable[[R], str]]], results: dict[str, R]) -> None:
    """The subjects side by side (in `results`' order), one metric per row, then each subject's notes."""
    width, col = 34, max([12, *(len(s) + 2 for s in results)])
    print("\nmetric".ljust(width + 1) + "".join(s.rjust(col) for s in results))
    print("-" * (width + col * len(results)))
    for label, get in rows:
        print(label.ljust(width) + "".join(get(result).rjust(col) for result in results.values()))
    for subject, result in results.items():
        for note in result.notes:
            print(f"note [{subject}]: {note}")


def report(results: dict[str, Result], opts: Options, subjects: list[str]) -> bool:
    order = [s for s in SUBJECTS if s in results]
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("new TLS conn/s (client-bound)", lambda r: fmt(r.cps, ".0f")),
        ("proxy CPU ms / new conn", lambda r: fmt(r.cpu_ms_per_conn, ".3f")),
        ("  of which kernel (stime) %", lambda r: fmt(r.cps_sys_share and r.cps_sys_share * 100, ".0f")),
        ("connect+handshake p50 ms", lambda r: fmt(r.p50_ms, ".2f")),
        ("connect+handshake p99 ms", lambda r: fmt(r.p99_ms, ".2f")),
        ("bulk 1 conn MB/s", lambda r: fmt(r.bulk_mb_s, ".0f")),
        ("bulk 1 conn Gbit/s", lambda r: fmt(r.bulk_mb_s and r.bulk_mb_s * 8 / 1000, ".2f")),
        ("proxy CPU s / GiB", lambda r: fmt(r.cpu_s_per_gib, ".3f")),
        ("  of which kernel (stime) %", lambda r: fmt(r.bulk_sys_share and r.bulk_sys_share * 100, ".0f")),
        (f"KiB / idle conn ({opts.idle} held)", lambda r: fmt(r.kib_per_idle, ".2f")),
    ]
    print_table(rows, {s: results[s] for s in order})

    ok = True
    gw = results.get("gateway")
    if gw is None:
        print("\n(no gateway in --subjects: no targets checked)")
        return True
    print("\ntargets (issue 3, section 6), for the gateway:")

    def check(label: str, value: float | None, limit: float | None, passed: Callable[[float, float], bool]) -> None:
        nonlocal ok
        if value is None or limit is None:
            print(f"  SKIP  {label}: not measured")
            return
        verdict = passed(value, limit)
        ok &= verdict
        print(f"  {'PASS' if verdict else 'FAIL'}  {label}")

    ngx = results.get("nginx")
    limit = ngx.cpu_ms_per_conn * 1.5 if ngx and ngx.cpu_ms_per_conn else None
    check(
        f"CPU per new connection {fmt(gw.cpu_ms_per_conn, '.3f')} ms <= 1.5 x nginx's "
        f"({fmt(ngx and ngx.cpu_ms_per_conn, '.3f')} ms -> {fmt(limit, '.3f')} ms)"
        + (f": {gw.cpu_ms_per_conn / ngx.cpu_ms_per_conn:.2f}x nginx" if limit and gw.cpu_ms_per_conn else ""),
        gw.cpu_ms_per_conn,
        limit,
        lambda v, lim: v <= lim,
    )
    bare = results.get("uvloop-relay")
    if bare and bare.cpu_ms_per_conn and gw.cpu_ms_per_conn:
        print(
            f"        reference, a bare uvloop relay (no peek, policy, resolution, limits or records): "
            f"{bare.cpu_ms_per_conn:.3f} ms per new connection, {fmt(bare.cpu_s_per_gib, '.3f')} CPU-s/GiB; "
            f"the gateway's own work adds {gw.cpu_ms_per_conn - bare.cpu_ms_per_conn:.3f} ms"
            + (f"; the target is {limit / bare.cpu_ms_per_conn:.2f}x the bare relay" if limit else "")
        )
        before = results.get("gateway-baseline")
        if before and before.cpu_ms_per_conn:
            print(
                f"        before/after, the --baseline checkout in the same run (gateway-baseline): "
                f"{before.cpu_ms_per_conn:.3f} ms per new connection, adding "
                f"{before.cpu_ms_per_conn - bare.cpu_ms_per_conn:.3f} ms over the bare relay"
            )
    check(f"CPU per GiB {fmt(gw.cpu_s_per_gib, '.3f')} s <= 0.5 s", gw.cpu_s_per_gib, 0.5, lambda v, lim: v <= lim)
    kern = results.get("kernel")
    cap_mb_s = BANDWIDTH_CAP_MBIT / 8
    if kern and kern.bulk_mb_s and gw.bulk_mb_s:
        share = gw.bulk_mb_s / kern.bulk_mb_s
        capped = cap_mb_s < 0.9 * kern.bulk_mb_s
        check(
            f"bulk {gw.bulk_mb_s:.0f} MB/s >= 90% of kernel forwarding ({kern.bulk_mb_s:.0f} MB/s): {share:.0%}"
            + (
                f" [the policy's bandwidth cap {BANDWIDTH_CAP_MBIT} Mbit/s = {cap_mb_s:.0f} MB/s (+1 s burst bucket) "
                f"is below 90% of kernel forwarding: this target cannot pass with the cap on; "
                f"{gw.bulk_mb_s / cap_mb_s:.0%} of the cap reached]"
                if capped
                else f" [policy bandwidth cap {BANDWIDTH_CAP_MBIT} Mbit/s applies]"
            ),
            share,
            0.9,
            lambda v, lim: v >= lim,
        )
        nocap = results.get("gateway-nocap")
        if nocap and nocap.bulk_mb_s:
            print(
                f"        diagnostic, the same relay without the bandwidth buckets (gateway-nocap): "
                f"{nocap.bulk_mb_s:.0f} MB/s = {nocap.bulk_mb_s / kern.bulk_mb_s:.0%} of kernel forwarding, "
                f"{fmt(nocap.cpu_s_per_gib, '.3f')} CPU-s/GiB"
            )
    else:
        check("bulk >= 90% of kernel forwarding", None, None, lambda v, lim: True)
    check(
        f"memory per idle connection {fmt(gw.kib_per_idle, '.2f')} KiB <= 8 KiB ({gw.idle_held} held)",
        gw.kib_per_idle,
        8.0,
        lambda v, lim: v <= lim,
    )
    return ok


# --------------------------------------------------------------------------- main


_MAIN_PID = os.getpid()


def _on_signal(signum: int, _frame: Any) -> None:
    if os.getpid() != _MAIN_PID:
        # A forked helper (pyroute2 forks one per namespace) inherits this handler: it must never unwind
        # into the atexit clean-up, which would tear the topology down under the running benchmark.
        os._exit(128 + signum)
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: processes killed, namespaces deleted


def unwind_on_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP unwind the main process through its finally blocks (see _on_signal)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts (< 60 s): checks the harness works")
    parser.add_argument(
        "--subjects",
        default=",".join(DEFAULT_SUBJECTS),
        help=f"comma-separated subset of {SUBJECTS} (default: the first five; gateway-nocap is a diagnostic)",
    )
    parser.add_argument("--conns", type=int, help="new TLS connections per subject (default 4000, quick 300)")
    parser.add_argument("--threads", type=int, default=8, help="client threads for the connection rate (default 8)")
    parser.add_argument("--latency-conns", type=int, help="sequential connections for p50/p99 (default 1000/100)")
    parser.add_argument("--bulk-mib", type=int, help="bulk download size in MiB (default 2048, quick 256)")
    parser.add_argument("--idle", type=int, help="idle connections held (default 5000, quick 500)")
    parser.add_argument("--phase-seconds", type=float, help="upper bound per phase (default 30, quick 10)")
    parser.add_argument("--no-install", action="store_true", help="print the apt command and exit 2 when missing")
    parser.add_argument(
        "--profile-gateway",
        type=Path,
        metavar="FILE",
        help="run the gateway under cProfile (its CPU numbers are then inflated); stats to FILE, top 30 printed",
    )
    parser.add_argument(
        "--event-loop", choices=("uvloop", "asyncio"), default="uvloop", help="the gateway's loop (as gateway run)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also measure the gateway of another checkout (its own .venv, e.g. a git worktree of an older "
        "commit) as subject gateway-baseline, in the same run: before/after figures side by side",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --baseline: measure the gateway and gateway-baseline this many times each, alternating which "
        "goes first (the one measured first and the one measured second differ by more than the code may); the "
        "table shows each one's median round, metric by metric, and every round's CPU per connection",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (path printed)")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be 1-10")
    if args.rounds > 1 and args.baseline is None:
        parser.error("--rounds needs --baseline CHECKOUT (it alternates the two gateways)")

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    if args.baseline is not None:
        if not (args.baseline / ".venv/bin/python").exists():
            parser.error(f"--baseline {args.baseline}: no .venv/bin/python there (run its scripts/setup first)")
        if "gateway-baseline" not in subjects:
            subjects.append("gateway-baseline")
    elif "gateway-baseline" in subjects:
        parser.error("subject gateway-baseline needs --baseline CHECKOUT")
    unknown = set(subjects) - set(SUBJECTS)
    if unknown or not subjects:
        parser.error(f"unknown subjects {sorted(unknown)}; choose from {SUBJECTS}")
    quick = args.quick
    opts = Options(
        cps_count=args.conns or (300 if quick else 4000),
        cps_threads=max(1, min(args.threads, 64)),
        latency_count=args.latency_conns or (100 if quick else 1000),
        bulk_bytes=(args.bulk_mib or (256 if quick else 2048)) << 20,
        idle=min(args.idle or (500 if quick else 5000), 8000),
        phase_seconds=args.phase_seconds or (10.0 if quick else 30.0),
        profile=args.profile_gateway.resolve() if args.profile_gateway else None,
        event_loop=args.event_loop,
        baseline=args.baseline.resolve() if args.baseline else None,
    )
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    ensure_packages(subjects, install=not args.no_install)

    unwind_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="bench-egress-"))
    started = time.monotonic()
    topo = Topology(sandboxes=1, origins=3)
    bench = Bench(topo, workdir, opts)
    chosen = [subject for subject in RUN_ORDER if subject in subjects]
    measured: dict[str, list[Result]] = {}

    def measure(subject: str) -> Result:
        result = bench.measure(subject)
        measured.setdefault(subject, []).append(result)
        return result

    run_subjects(topo, workdir, bench.setup, measure, alternated(chosen, args.rounds), keep_workdir=args.keep_workdir)
    results = {subject: median_result(rounds) for subject, rounds in measured.items()}

    print(
        f"\n{opts.cps_count} new TLS connections ({opts.cps_threads} client threads), {opts.latency_count} "
        f"sequential for latency, {opts.bulk_bytes >> 20} MiB bulk, {opts.idle} idle; "
        f"{os.cpu_count()} CPUs; total {time.monotonic() - started:.0f} s"
    )
    print(
        "nginx, haproxy and uvloop-relay are dialled directly at 198.18.0.2 (not transparent: nginx cannot take "
        "a TPROXY listener); kernel and gateway are dialled at the origin's address. Proxy CPU = utime+stime of "
        "the proxy's processes (softirq work done while a proxy is on the CPU counts as its stime here: tick "
        "accounting; the rest, in ksoftirqd or on the other core, counts for no subject)."
    )
    if args.rounds > 1:
        print(f"\n{args.rounds} rounds of the two gateways, alternating which went first; CPU ms / new conn:")
        for index, (now, before) in enumerate(zip(measured["gateway"], measured["gateway-baseline"], strict=True)):
            first = "gateway-baseline" if index % 2 == 0 else "gateway"
            print(f"  round {index + 1} (first: {first}): gateway {fmt(now.cpu_ms_per_conn, '.3f')}, "
                  f"gateway-baseline {fmt(before.cpu_ms_per_conn, '.3f')}")  # fmt: skip
    ok = report(results, opts, subjects)
    if opts.profile is not None and opts.profile.exists():
        import pstats

        print(f"\ngateway profile ({opts.profile}), top 30 by own time:")
        pstats.Stats(str(opts.profile)).sort_stats("tottime").print_stats(30)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
