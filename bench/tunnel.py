#!/usr/bin/env python3
"""The tunnel service side by side with nginx as a TLS-terminating reverse proxy (issue 5, "Performance").

One run, one upstream "sandbox app" (a raw asyncio HTTP/1.1 server on 127.77.0.2: `GET /` answers `ok`,
`GET /download?mb=N` streams N MiB from memory), two subjects in front of it, each pinned to CPU 0:

* `gateway`: the real `TunnelServer` (tunnel store + embedded policy store + flow records + JSON logs, as
             `gateway run` wires it, under uvloop as `gateway run` runs it) in its own process, with a
             generated test CA and wildcard leaf (`init_certs`) and one tunnel without a password to the app.
* `nginx`:   nginx (1 worker, a buffered access log), the same certificate, `proxy_http_version 1.1`,
             keep-alive to the upstream, `proxy_buffering off`.

Metrics per subject: keep-alive requests/s and p50/p99 latency with small responses (`wrk`, one thread,
`--conns` connections, on CPU 1; `--rounds` phases of `--seconds` in which the subjects take turns, so a
drift in the VM's speed falls on both), the proxy's CPU per request (utime+stime from /proc),
and one large download (`--download-mib`) through each: MB/s at a Python client that verifies the
certificate, and the proxy's CPU seconds per GiB.

    .venv/bin/python bench/tunnel.py            # defaults: about 2 minutes
    .venv/bin/python bench/tunnel.py --quick    # < 60 s: checks the harness works

Installs `nginx-light` and `wrk` with apt-get when missing (`--no-install` prints the command and exits 2).
Exit status: 0 when both targets pass, 1 when one fails, 2 when it cannot run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aptget import install_missing  # bench/ is on sys.path when a script runs
from procstat import cpu_seconds, descendants, fmt, have

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DOMAIN = "tunnel.localhost"
APP_HOST = "127.77.0.2"  # the sandbox app (inside the sandbox's loopback subnet 127.77.0.0/16)
PROXY_HOST = "127.0.0.1"
APT_PACKAGES = {"nginx": "nginx-light", "wrk": "wrk"}
MIB = 1 << 20
GIB = 1 << 30
TARGET_RPS_SHARE = 0.25
TARGET_DOWNLOAD_SHARE = 0.50

# --------------------------------------------------------------------------- programs run in child processes

#: The sandbox app: raw asyncio protocol, HTTP/1.1 keep-alive, `GET /` -> "ok\n", `GET /download?mb=N` -> N MiB.
UPSTREAM = r"""
import asyncio, sys
host, port = sys.argv[1], int(sys.argv[2])
BLOCK = memoryview(b"\xa5" * (1 << 20))
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
SMALL = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"

class App(asyncio.Protocol):
    def connection_made(self, transport):
        self.t, self.buf, self.left, self.paused = transport, b"", 0, False
    def pause_writing(self):
        self.paused = True
    def resume_writing(self):
        self.paused = False
        self.pump()
    def pump(self):
        while self.left > 0 and not self.paused:
            n = min(self.left, len(BLOCK))
            self.t.write(BLOCK[:n])
            self.left -= n
        if self.left == 0 and self.buf:
            self.data_received(b"")
    def data_received(self, data):
        self.buf += data
        while self.left == 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            target = head.split(b" ", 2)[1]
            if target.startswith(b"/download?mb="):
                size = int(target.split(b"=", 1)[1]) << 20
                self.t.write(HEAD % size)
                self.left = size
                self.pump()
            else:
                self.t.write(SMALL)

async def main():
    server = await asyncio.get_running_loop().create_server(App, host, port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

#: The gateway's tunnel server, wired as `gateway run` wires it (policy store, tunnel store, flow log).
GATEWAY = r"""
import asyncio, ipaddress, json, signal, sys
from pathlib import Path
from gateway.audit_config import AuditConfig
from gateway.decision import DEFAULT_LIMITS
from gateway.flowlog import FlowLog
from gateway.logs import configure_logging
from gateway.state import PolicyContext
from gateway.stores.config import StoreConfig
from gateway.stores.embedded import EmbeddedStore
from gateway.tunnel.certs import ReloadingTLS
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.server import TunnelServer
from gateway.tunnel.store import FileTunnelStore

workdir, domain, host, port, app_host, app_port, event_loop = sys.argv[1:8]
workdir = Path(workdir)

async def main():
    configure_logging("json", "info")  # as `gateway run` in production: JSON lines (to the log file here)
    context = PolicyContext((ipaddress.ip_network("127.77.0.0/16"),), {}, DEFAULT_LIMITS)
    policy = EmbeddedStore(context, StoreConfig(path=workdir / "policies.json"))
    await policy.start()
    # public_access: a tunnel without a password (the sandbox's ingress rules allow it only so)
    await policy.create_sandbox({"id": "sb1", "addresses": [app_host], "ingress": {"public_access": True}})
    config = TunnelConfig(domain=domain, host=host, port=int(port), cert_path=workdir / "tunnel.crt",
                          key_path=workdir / "tunnel.key", path=workdir / "tunnels.json")
    store = FileTunnelStore(policy.state, config, workdir / "tunnels.json")
    await store.start()
    flows = FlowLog(AuditConfig(workdir / "audit", 1.0, "", 1000))
    await flows.start()
    server = TunnelServer(store, config, tls=ReloadingTLS(config.cert_path, config.key_path), flows=flows)
    await server.start()
    tunnel = await store.create("sb1", {"port": int(app_port)})
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    (workdir / "ready.json").write_text(json.dumps({"port": server.port, "id": tunnel.id}))
    await stop.wait()
    await server.close()
    await store.close()
    await flows.close()
    await policy.close()
if event_loop == "uvloop":  # as `gateway run` runs (its default; --event-loop asyncio for the stdlib loop)
    import uvloop
    asyncio.run(main(), loop_factory=uvloop.new_event_loop)
else:
    asyncio.run(main())
"""

#: One large download over TLS with the certificate verified against the test CA; prints JSON.
DOWNLOAD = r"""
import json, socket, ssl, sys, time
port, host, ca, mib, timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
sock = ctx.wrap_socket(raw, server_hostname=host.split(":")[0])
t0 = time.perf_counter()
sock.sendall(f"GET /download?mb={mib} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    chunk = sock.recv(65536)
    if not chunk:
        raise SystemExit("closed before the response head")
    head += chunk
head, body = head.split(b"\r\n\r\n", 1)
status = int(head.split(b" ", 2)[1])
fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
length = int(next(v for k, v in fields.items() if k.strip().lower() == b"content-length"))
got, buf = len(body), bytearray(1 << 20)
deadline = t0 + timeout
while got < length and time.perf_counter() < deadline:
    n = sock.recv_into(buf)
    if n == 0:
        break
    got += n
seconds = time.perf_counter() - t0
sock.close()
print(json.dumps({"status": status, "bytes": got, "expected": length, "seconds": seconds}))
"""

# --------------------------------------------------------------------------- process bookkeeping

_PROCS: list[subprocess.Popen[Any]] = []


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def _stop_all() -> None:
    while _PROCS:
        _stop(_PROCS.pop())


atexit.register(_stop_all)


def spawn(argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[Any]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=kwargs.pop("stdout", out), stderr=out, **kwargs)
    _PROCS.append(proc)
    return proc


def taskset(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def ensure_packages(install: bool) -> None:
    install_missing((pkg for binary, pkg in APT_PACKAGES.items() if not have(binary)), install)


def wait_port(proc: subprocess.Popen[Any], host: str, port: int, log: Path, seconds: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {host}:{port} after {seconds:.0f} s")


def free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- subjects


def nginx_conf(workdir: Path, port: int, app_port: int) -> str:
    return f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx.err warn;
events {{ worker_connections 8192; }}
http {{
    # As the gateway writes an access record per request (batched to files each second), so does nginx.
    access_log {workdir}/nginx-access.log combined buffer=64k flush=1s;
    client_body_temp_path {workdir}/tmp-body;
    proxy_temp_path {workdir}/tmp-proxy;
    fastcgi_temp_path {workdir}/tmp-fcgi;
    uwsgi_temp_path {workdir}/tmp-uwsgi;
    scgi_temp_path {workdir}/tmp-scgi;
    keepalive_requests 1000000;
    upstream app {{
        server {APP_HOST}:{app_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen {PROXY_HOST}:{port} ssl backlog=4096;
        ssl_certificate {workdir}/tunnel.crt;
        ssl_certificate_key {workdir}/tunnel.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_buffering off;
            proxy_buffer_size 64k;  # the read size when not buffering (default 4k: ~1/3 of the throughput)
            proxy_buffers 4 64k;
            proxy_request_buffering off;
        }}
    }}
}}
"""


@dataclass
class Options:
    conns: int
    seconds: float
    rounds: int
    download_mib: int
    proxy_cpu: int | None
    client_cpu: int | None
    profile: Path | None = None
    event_loop: str = "uvloop"


@dataclass
class Round:
    """One request phase of one subject."""

    rps: float
    requests: int
    cpu: float  # proxy CPU seconds (utime + stime)
    sys: float  # of which stime
    wall: float
    wrk: dict[str, float]


@dataclass
class Result:
    subject: str
    rounds: list[Round] = field(default_factory=list)
    download_mb_s: float | None = None
    cpu_s_per_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    # Over all rounds: requests / wall and CPU / requests; latency percentiles as the median of the rounds'.
    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.rounds)

    @property
    def rps(self) -> float | None:
        seconds = sum(r.requests / r.rps for r in self.rounds if r.rps)  # wrk's own measured durations
        return self.requests / seconds if seconds else None

    @property
    def cpu_us_per_req(self) -> float | None:
        return sum(r.cpu for r in self.rounds) / self.requests * 1e6 if self.requests else None

    @property
    def rps_sys_share(self) -> float | None:
        cpu = sum(r.cpu for r in self.rounds)
        return sum(r.sys for r in self.rounds) / cpu if cpu else None

    @property
    def proxy_busy(self) -> float | None:
        wall = sum(r.wall for r in self.rounds)
        return sum(r.cpu for r in self.rounds) / wall if wall else None

    def latency(self, key: str) -> float | None:
        found = [r.wrk[key] for r in self.rounds if key in r.wrk]
        return statistics.median(found) if found else None


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(text)
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(out: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for pct in ("50", "99"):
        match = re.search(rf"^\s*{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if match:
            found[f"p{pct}"] = _ms(match[1])
    match = re.search(r"(\d+) requests in", out)
    found["requests"] = float(match[1]) if match else 0.0
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    found["rps"] = float(match[1]) if match else 0.0
    errors = 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if match:
        errors += sum(int(g) for g in match.groups())
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match:
        errors += int(match[1])
    found["errors"] = float(errors)
    return found


#: A started subject: its process, port and the Host header that reaches the app through it.
Running = tuple[subprocess.Popen[Any], int, str]


class Bench:
    def __init__(self, workdir: Path, opts: Options) -> None:
        self.workdir = workdir
        self.opts = opts

    def setup(self) -> None:
        from gateway.tunnel.certs import CertPaths, init_certs

        w = self.workdir
        init_certs(DOMAIN, CertPaths(w / "ca.crt", w / "ca.key", w / "tunnel.crt", w / "tunnel.key"))
        os.chmod(w, 0o755)  # nginx's worker (not root) reads nothing here at run time, but keep it reachable
        self.app_port = free_port(APP_HOST)
        log = w / "upstream.log"
        proc = spawn(
            [*taskset(self.opts.client_cpu), sys.executable, "-c", UPSTREAM, APP_HOST, str(self.app_port)],
            log,
        )
        wait_port(proc, APP_HOST, self.app_port, log)

    def start(self, subject: str) -> Running:
        """Start `subject` on the proxy CPU; returns (process, port, Host header value)."""
        w = self.workdir
        if subject == "nginx":
            port = free_port(PROXY_HOST)
            conf = w / "nginx.conf"
            conf.write_text(nginx_conf(w, port, self.app_port))
            log = w / "nginx.out"
            proc = spawn([*taskset(self.opts.proxy_cpu), "nginx", "-c", str(conf), "-e", str(w / "nginx.err")], log)
            wait_port(proc, PROXY_HOST, port, log)
            return proc, port, f"app.{DOMAIN}:{port}"
        port = free_port(PROXY_HOST)
        script = w / "gateway_tunnel.py"
        script.write_text(GATEWAY)
        profile = ["-m", "cProfile", "-o", str(self.opts.profile)] if self.opts.profile else []
        argv = [*taskset(self.opts.proxy_cpu), sys.executable, *profile, str(script)]
        argv += [str(w), DOMAIN, PROXY_HOST, str(port), APP_HOST, str(self.app_port), self.opts.event_loop]
        log = w / "gateway.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        ready_file = w / "ready.json"
        ready_file.unlink(missing_ok=True)
        # Its log lines (flow records included: one JSON line per request, as in production) go to a file.
        proc = spawn(argv, log, env=env, cwd=str(w))
        deadline = time.monotonic() + 30
        while not ready_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        if not ready_file.exists():
            raise RuntimeError(f"gateway did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)  # the file is written in one call; let it land
        ready = json.loads(ready_file.read_text())
        return proc, ready["port"], f"{ready['id']}.{DOMAIN}:{ready['port']}"

    def wrk(self, port: int, host: str, seconds: float, conns: int) -> dict[str, float]:
        argv = [*taskset(self.opts.client_cpu), "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s"]
        argv += ["--latency", "--timeout", "5s", "-H", f"Host: {host}", f"https://{PROXY_HOST}:{port}/"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-1000:]}")
        return parse_wrk(out.stdout)

    def download(self, port: int, host: str, mib: int, timeout: float) -> dict[str, Any]:
        argv = [*taskset(self.opts.client_cpu), sys.executable, "-c", DOWNLOAD, str(port), host]
        argv += [str(self.workdir / "ca.crt"), str(mib), str(timeout)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"download client failed: {out.stderr[-1500:]}")
        return json.loads(out.stdout)

    def measure(self, subjects: list[str]) -> dict[str, Result]:
        """Every subject started once, then `rounds` request phases in which the subjects take turns (the
        order reversed every other round, so a drift of the machine's speed during the run falls on both),
        then one large download through each."""
        running: dict[str, Running] = {}
        results = {subject: Result(subject) for subject in subjects}
        try:
            for subject in subjects:
                proc, port, host = running[subject] = self.start(subject)
                # A check that the path works at all (a verified download of 1 MiB), then 2 s of load.
                check = self.download(port, host, 1, 20)
                if check["status"] != 200 or check["bytes"] != MIB:
                    raise RuntimeError(f"{subject}: the path does not work: {check}")
                warm = self.wrk(port, host, 2, self.opts.conns)
                if warm["requests"] == 0 or warm["errors"] > 0:
                    raise RuntimeError(f"{subject}: warm-up failed: {warm}")
            for index in range(self.opts.rounds):
                print(f"  round {index + 1} of {self.opts.rounds} ...", flush=True)
                for subject in subjects if index % 2 == 0 else subjects[::-1]:
                    self._request_phase(running[subject], results[subject])
            for subject in subjects:
                self._download_phase(running[subject], results[subject])
        finally:
            for proc, _, _ in running.values():
                _stop(proc)
                with contextlib.suppress(ValueError):
                    _PROCS.remove(proc)
        return results

    def _request_phase(self, subject: Running, result: Result) -> None:
        proc, port, host = subject
        pids = descendants(proc.pid)
        cpu0, sys0 = cpu_seconds(pids)
        t0 = time.monotonic()
        load = self.wrk(port, host, self.opts.seconds, self.opts.conns)
        wall = time.monotonic() - t0
        cpu1, sys1 = cpu_seconds(pids)
        result.rounds.append(Round(load["rps"], int(load["requests"]), cpu1 - cpu0, sys1 - sys0, wall, load))
        if load["errors"]:
            result.notes.append(f"{int(load['errors'])} wrk errors (socket errors or non-2xx)")

    def _download_phase(self, subject: Running, result: Result) -> None:
        proc, port, host = subject
        pids = descendants(proc.pid)
        mib = self.opts.download_mib
        cpu0, _ = cpu_seconds(pids)
        got = self.download(port, host, mib, timeout=max(60.0, mib / 20))
        cpu1, _ = cpu_seconds(pids)
        if got["bytes"] != mib * MIB:
            result.notes.append(f"download incomplete: {got['bytes']} of {mib * MIB} bytes")
        if got["bytes"]:
            result.download_mb_s = got["bytes"] / got["seconds"] / 1e6
            result.cpu_s_per_gib = (cpu1 - cpu0) / (got["bytes"] / GIB)


# --------------------------------------------------------------------------- report


def report(results: dict[str, Result], opts: Options) -> bool:
    order = [s for s in ("gateway", "nginx") if s in results]
    rows: list[tuple[str, Callable[[Result], str]]] = [
        (f"keep-alive req/s ({opts.conns} conns)", lambda r: fmt(r.rps, ".0f")),
        ("latency p50 ms (median of rounds)", lambda r: fmt(r.latency("p50"), ".2f")),
        ("latency p99 ms (median of rounds)", lambda r: fmt(r.latency("p99"), ".2f")),
        ("proxy CPU us / request", lambda r: fmt(r.cpu_us_per_req, ".1f")),
        ("  of which kernel (stime) %", lambda r: fmt(r.rps_sys_share and r.rps_sys_share * 100, ".0f")),
        ("requests / proxy CPU-second", lambda r: fmt(r.cpu_us_per_req and 1e6 / r.cpu_us_per_req, ".0f")),
        ("proxy core busy % (req phase)", lambda r: fmt(r.proxy_busy and r.proxy_busy * 100, ".0f")),
        (f"download {opts.download_mib} MiB MB/s", lambda r: fmt(r.download_mb_s, ".0f")),
        ("proxy CPU s / GiB", lambda r: fmt(r.cpu_s_per_gib, ".3f")),
    ]
    width, col = 34, 12
    print()
    print("metric".ljust(width) + "".join(s.rjust(col) for s in order))
    print("-" * (width + col * len(order)))
    for label, get in rows:
        print(label.ljust(width) + "".join(get(results[s]).rjust(col) for s in order))
    for s in order:
        for note in results[s].notes:
            print(f"note [{s}]: {note}")
    gw, ngx = results.get("gateway"), results.get("nginx")
    if gw is None or ngx is None:
        print("\n(both subjects are needed for the targets: none checked)")
        return True
    if len(gw.rounds) > 1:
        print("\nper round, gateway / nginx (req/s; requests per proxy CPU-second):")
        for index, (g, n) in enumerate(zip(gw.rounds, ngx.rounds, strict=True), 1):
            rate = g.rps / n.rps if n.rps else 0.0
            per_cpu = (g.requests / g.cpu) / (n.requests / n.cpu) if g.cpu and n.cpu and n.requests else 0.0
            print(f"  round {index}: {g.rps:.0f} / {n.rps:.0f} = {rate:.0%}; per CPU-second {per_cpu:.0%}")
    print("\ntargets (issue 5, Performance), for the gateway:")
    ok = True

    def check(label: str, value: float | None, base: float | None, share: float) -> None:
        nonlocal ok
        if not value or not base:
            print(f"  FAIL  {label}: not measured")
            ok = False
            return
        passed = value >= share * base
        ok &= passed
        print(
            f"  {'PASS' if passed else 'FAIL'}  {label} {value:.0f} >= {share:.0%} of nginx's {base:.0f}: "
            f"{value / base:.0%}"
        )

    check("request rate, both pinned to one core, req/s", gw.rps, ngx.rps, TARGET_RPS_SHARE)

    def per_cpu(r: Result) -> float | None:
        return r.cpu_us_per_req and 1e6 / r.cpu_us_per_req

    # A subject that does not fill its core (busy < ~95%) is held back by the client core: requests per CPU-second
    # of the proxy is then the fair "per core" rate. Both are checked.
    check("requests per proxy CPU-second (per core capacity)", per_cpu(gw), per_cpu(ngx), TARGET_RPS_SHARE)
    check("single large download, MB/s", gw.download_mb_s, ngx.download_mb_s, TARGET_DOWNLOAD_SHARE)
    return ok


# --------------------------------------------------------------------------- main


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks and atexit: every process stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases (< 60 s): checks the harness works")
    parser.add_argument("--subjects", default="gateway,nginx", help="comma-separated subset of gateway,nginx")
    parser.add_argument("--conns", type=int, help="wrk keep-alive connections (default 50)")
    parser.add_argument("--seconds", type=float, help="request phase per subject and round (default 10, quick 5)")
    parser.add_argument("--rounds", type=int, help="request phases per subject, taking turns (default 3, quick 1)")
    parser.add_argument("--download-mib", type=int, help="large download size (default 1024, quick 256)")
    parser.add_argument("--no-install", action="store_true", help="print the apt command and exit 2 when missing")
    parser.add_argument(
        "--profile-gateway",
        type=Path,
        metavar="FILE",
        help="run the gateway under cProfile (its numbers are then inflated); stats to FILE, top 25 printed",
    )
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the gateway's event loop, as `gateway run --event-loop` (default uvloop, as `gateway run`)",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs, certificates and logs")
    args = parser.parse_args(argv)
    asked = {s.strip() for s in args.subjects.split(",") if s.strip()}
    subjects = [s for s in ("gateway", "nginx") if s in asked]
    if not asked or asked - {"gateway", "nginx"}:
        parser.error("--subjects: choose from gateway,nginx")
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    opts = Options(
        conns=max(1, min(args.conns or 50, 1000)),
        seconds=min(args.seconds or (5.0 if args.quick else 10.0), 300.0),
        rounds=max(1, min(args.rounds or (1 if args.quick else 3), 20)),
        download_mib=max(1, min(args.download_mib or (256 if args.quick else 1024), 8192)),
        proxy_cpu=proxy_cpu,
        client_cpu=client_cpu,
        profile=args.profile_gateway.resolve() if args.profile_gateway else None,
        event_loop=args.event_loop,
    )
    ensure_packages(install=not args.no_install)
    if not have("taskset") and proxy_cpu is not None:
        print("taskset (util-linux) is missing", file=sys.stderr)
        return 2

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="bench-tunnel-"))
    results: dict[str, Result] = {}
    started = time.monotonic()
    try:
        bench = Bench(workdir, opts)
        bench.setup()
        print(f"measuring {' and '.join(subjects)} ...", flush=True)
        results = bench.measure(subjects)
    except RuntimeError as exc:
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2
    finally:
        _stop_all()
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    pinning = f"proxy on CPU {proxy_cpu}, wrk + upstream + download client on CPU {client_cpu}"
    print(
        f"\nwrk 1 thread, {opts.conns} keep-alive connections, {opts.rounds} rounds of {opts.seconds:.0f} s per "
        "subject (taking turns), GET / (3-byte body); "
        f"{opts.download_mib} MiB download over one TLS connection; {os.cpu_count()} CPUs, "
        f"{pinning if proxy_cpu is not None else 'no pinning (one CPU)'}; total {time.monotonic() - started:.0f} s"
    )
    print(
        f"Gateway event loop: {opts.event_loop}. "
        "Upstream: raw asyncio HTTP/1.1 app on 127.77.0.2. Proxy CPU = utime+stime of the proxy's processes "
        "(nginx: master + 1 worker); softirq work is not attributed. Proxy core busy < ~95% means that subject "
        "was bound by the client/upstream core, not by itself."
    )
    ok = report(results, opts)
    if opts.profile is not None and opts.profile.exists():
        import pstats

        print(f"\ngateway profile ({opts.profile}), top 25 by own time:")
        pstats.Stats(str(opts.profile)).sort_stats("tottime").print_stats(25)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
