"""`gateway demo`: the product working on the embedded store, in throw-away namespaces (needs root).

The steps, as an operator would take them: a fake internet (origins, an authoritative DNS), the gateway host
and one sandbox (gateway/demo/topology.py); `gateway certs init` into the demo's own directory; `gateway run
--data-plane --steer` with a config file written here (its resolver is the fake internet's DNS, whose 198.18.0.0/15
test addresses count as the internet); `gateway sandbox attach` and `gateway sandbox create` through the CLI;
then allowed and denied requests from inside the sandbox, each printed with the gateway's rule and reason
(`gateway explain`) and its flow records (`gateway audit`); and a tunnel to a web app in the sandbox, which a
browser on the host opens through a loopback forwarder in this process (the tunnel listens inside the gateway
namespace, which the host cannot reach).

The demo is a client of the product: it builds no component itself. Everything it makes is under one fixed
prefix (`gwdemo-` namespaces, the directory `WORKDIR`), so what a crashed demo left is removed on the next start;
it touches nothing else on the host but one loopback listening socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gateway.demo.fakenet import ORIGIN_SERVER, ZONE_SERVER_SCRIPT
from gateway.demo.topology import (
    INET_V4,
    Topology,
    TopologyError,
    delete_namespaces,
    live_namespaces,
    wait_for_line,
)

PREFIX = "gwdemo"
WORKDIR = Path(tempfile.gettempdir()) / "gateway-demo"
API = "http://127.0.0.1:8470"  # inside the gateway namespace
SANDBOX = "demo"
ALLOWED, DENIED = "allowed.example", "denied.example"
ALLOWED_ADDRESS, DENIED_ADDRESS = "198.18.1.1", "198.18.1.2"
ZONE = {ALLOWED: {"A": [ALLOWED_ADDRESS]}, DENIED: {"A": [DENIED_ADDRESS]}}
APP_PORT = 3000
TUNNEL_DOMAIN = "demo.localhost"  # browsers resolve *.localhost to loopback, where the forwarder listens
TUNNEL_PORT = 8443  # the tunnel server's, inside the gateway namespace


@dataclass(frozen=True, slots=True)
class Check:
    """One request from inside the sandbox and what it must come to."""

    what: str
    expect_allowed: bool
    allowed: bool
    detail: str

    @property
    def ok(self) -> bool:
        return self.allowed == self.expect_allowed


def remove_leftovers(out: TextIO) -> None:
    """What a demo that did not get to clean up left: its namespaces (and what runs in them), its directory."""
    names = live_namespaces(f"{PREFIX}-")
    if names:
        out.write(f"removing what an earlier demo left: namespaces {', '.join(names)}\n")
        delete_namespaces(names)
    if WORKDIR.exists():
        out.write(f"removing what an earlier demo left: {WORKDIR}\n")
        shutil.rmtree(WORKDIR, ignore_errors=True)


@contextlib.contextmanager
def step(out: TextIO, title: str) -> Iterator[None]:
    """One line per step: `…` while it runs (on a terminal), then ✓ and how long it took."""
    tty = out.isatty()
    if tty:
        out.write(f"  … {title}")
        out.flush()
    started = time.monotonic()
    yield
    out.write(f"{chr(13) if tty else ''}  ✓ {title} ({time.monotonic() - started:.1f} s)\n")
    out.flush()


def config_text(workdir: Path, tunnel_public_port: int) -> str:
    certs = workdir / "certs"
    return f"""\
# Written by `gateway demo`: the embedded store, the data plane, the tunnel.
[store]
backend = "embedded"
path = "{workdir / "policies.json"}"
poll_interval = 0.2

[audit]
dir = "{workdir / "audit"}"
flush_interval = 0.2

[log]
format = "json"

[egress]
gateway_addresses = ["198.18.0.2", "2001:db8:ff::2"]
# The fake internet uses test addresses, which are not the internet unless said so.
public_ranges = ["198.18.0.0/15", "2001:db8::/32"]

[resolver]
upstreams = ["{INET_V4}:53"]
timeout = 1.0

[tunnel]
enabled = true
domain = "{TUNNEL_DOMAIN}"
host = "127.0.0.1"
port = {TUNNEL_PORT}
public_port = {tunnel_public_port}
cert_path = "{certs / "tunnel.crt"}"
key_path = "{certs / "tunnel.key"}"
ca_cert_path = "{certs / "ca.crt"}"
ca_key_path = "{certs / "ca.key"}"
"""


class Forwarder:
    """A loopback TCP listener in this (the host's) namespace; each connection is carried to `target` inside
    `netns`: the thread that serves it enters the namespace first (setns is per thread)."""

    def __init__(self, port: int, netns: str, target: tuple[str, int]) -> None:
        self.netns, self.target = netns, target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
            try:
                os.setns(fd, os.CLONE_NEWNET)
            finally:
                os.close(fd)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            with upstream:
                upstream.settimeout(None)
                back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
                back.start()
                pump(client, upstream)
                back.join()

    def close(self) -> None:
        self.listener.close()


def pump(source: socket.socket, sink: socket.socket) -> None:
    """One direction between two blocking sockets, until the end of file or a reset (a client that closes with
    bytes unread resets); then the sink's write side is shut."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class Demo:
    def __init__(self, topo: Topology, out: TextIO) -> None:
        self.topo, self.out = topo, out
        self.config = WORKDIR / "gateway.toml"
        self.sandbox = topo.sandbox(1)

    def gateway(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`gateway ARGS` in the gateway namespace, against the running gateway's API."""
        argv = [sys.executable, "-m", "gateway.cli", "--api", API, *args]
        return self.topo.run("gw", argv, check=check, timeout=30)

    def start(self, forward_port: int) -> None:
        out = self.out
        with step(out, "certificates for the tunnel (gateway certs init)"):
            WORKDIR.mkdir(parents=True, exist_ok=True)
            self.config.write_text(config_text(WORKDIR, forward_port))
            certs = subprocess.run(
                [sys.executable, "-m", "gateway.cli", "certs", "init", "--config", str(self.config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if certs.returncode != 0:
                raise TopologyError(f"gateway certs init: {certs.stderr.strip()}")
        with step(out, f"fake internet: origins {ALLOWED_ADDRESS} and {DENIED_ADDRESS}, DNS on {INET_V4}"):
            self.topo.start_python("inet", ORIGIN_SERVER, "80")
            self.topo.start_python("inet", ZONE_SERVER_SCRIPT, str(INET_V4), json.dumps(ZONE))
        with step(out, f"a web app in the sandbox on port {APP_PORT}"):
            site = WORKDIR / "site"
            site.mkdir()
            (site / "index.html").write_text("<!doctype html><title>demo</title><h1>Hello from the sandbox</h1>\n")
            app = [sys.executable, "-u", "-m", "http.server", str(APP_PORT), "--directory", str(site)]
            self.topo.popen(f"sb{self.sandbox.index}", app)
        with step(out, f"gateway sandbox attach --interface {self.sandbox.gw_interface}"):
            self.topo.attach_with_cli([self.sandbox])
        with step(out, f"gateway run --data-plane --steer --config {self.config}"):
            log = (WORKDIR / "gateway.log").open("a")
            argv = [sys.executable, "-m", "gateway.cli", "run", "--data-plane", "--steer", "--config", str(self.config)]
            self.gateway_proc = self.topo.popen("gw", argv, stderr=log, cwd=str(WORKDIR))
            log.close()
            wait_for_line(self.gateway_proc, "egress engine listening", 30)
        with step(out, f"gateway sandbox create --id {SANDBOX} --profile allowlisted --allow-host {ALLOWED}"):
            record = {
                "id": SANDBOX,
                "addresses": [str(a) for a in self.sandbox.addresses],
                "profile": "allowlisted",
                "egress": {"allow_hosts": [ALLOWED]},
                "ingress": {"public_access": True},
            }
            self.gateway("sandbox", "create", "--data", json.dumps(record))

    # ------------------------------------------------------------------ requests from inside the sandbox

    def explain(self, host: str, *args: str) -> str:
        answer = json.loads(self.gateway("--json", "explain", SANDBOX, host, *args, check=False).stdout)
        return f"rule {answer.get('rule')}: {answer.get('reason')}"

    def dig(self, name: str, expect_allowed: bool, within: float = 0.0) -> Check:
        """`within`: ask again (for up to that many seconds) until answered. The gateway steers a new sandbox's
        traffic within about a second of its creation; until then its packets are dropped."""
        argv = ["dig", "+time=1", "+tries=1", f"@{INET_V4}", name, "A", "+noall", "+answer", "+comments"]
        deadline = time.monotonic() + within
        while True:
            shown = self.topo.run(f"sb{self.sandbox.index}", argv, check=False, timeout=15).stdout
            answers = [line.split()[-1] for line in shown.splitlines() if line and not line.startswith(";")]
            if answers or time.monotonic() >= deadline:
                break
        status = next((line.split("status: ")[1].split(",")[0] for line in shown.splitlines() if "status:" in line), "")
        detail = f"{status or 'no answer'} {' '.join(answers)}".strip()
        reason = self.explain(name, "--protocol", "dns")
        return Check(f"dig {name}", expect_allowed, bool(answers), f"{detail}; {reason}")

    def curl(self, name: str, address: str, expect_allowed: bool) -> Check:
        argv = ["curl", "-sS", "-m", "5", "-o", "-", "-w", "\n%{http_code}", "--resolve", f"{name}:80:{address}"]
        shown = self.topo.run(f"sb{self.sandbox.index}", [*argv, f"http://{name}/"], check=False, timeout=15)
        body, _, code = shown.stdout.rpartition("\n")
        allowed = code == "200" and body.startswith("ORIGIN")
        detail = (
            f"HTTP {code} {(body.strip().splitlines() or [''])[0][:60]!r}"
            if code != "000"
            else shown.stderr.strip()[:80]
        )
        reason = self.explain(f"{name}:80", "--protocol", "http", "--address", address)
        return Check(f"curl http://{name}/", expect_allowed, allowed, f"{detail}; {reason}")

    def requests(self) -> list[Check]:
        self.out.write(f"\nFrom inside sandbox {SANDBOX!r} ({self.sandbox.v4}), allowed: {ALLOWED} only\n")
        checks = []
        for run in (
            lambda: self.dig(ALLOWED, True, within=10.0),  # first: proves the sandbox is steered
            lambda: self.dig(DENIED, False),
            lambda: self.curl(ALLOWED, ALLOWED_ADDRESS, True),
            lambda: self.curl(DENIED, DENIED_ADDRESS, False),
        ):
            check = run()
            checks.append(check)
            mark = "✓" if check.ok else "✗ UNEXPECTED"
            verdict = "allowed" if check.allowed else "denied "
            self.out.write(f"  {mark} {verdict} {check.what:<32} {check.detail}\n")
            self.out.flush()
        return checks

    def watch(self) -> None:
        """Follow the gateway's decisions as they happen: `gateway audit tail` (the live flow records), each line
        printed as it arrives, beside the requests that caused it."""
        self.seen = threading.Event()  # the denied curl's record came: every decision has been shown
        self.tail = self.topo.popen("gw", [sys.executable, "-u", "-m", "gateway.cli", "--api", API, "audit", "tail",
                                           SANDBOX])  # fmt: skip

        def show() -> None:
            assert self.tail.stdout is not None
            with contextlib.suppress(ValueError, OSError):  # the tail was stopped
                for line in self.tail.stdout:
                    self.out.write(f"      flow record: {line}")
                    self.out.flush()
                    if " DENY http " in line:
                        self.seen.set()

        threading.Thread(target=show, daemon=True).start()

    def stop_watching(self) -> None:
        self.seen.wait(10)  # records are written when a connection closes: the last may trail its request
        self.topo.kill(self.tail)

    def tunnel(self, forward_port: int) -> str:
        answer = self.gateway("--json", "tunnel", "expose", SANDBOX, str(APP_PORT), "--label", "demo-app")
        url: str = json.loads(answer.stdout)["url"]
        self.out.write(
            f"\nTunnel to the sandbox's web app (gateway tunnel expose {SANDBOX} {APP_PORT}):\n"
            f"  tunnel URL: {url}\n"
            f"  Open it in a browser on this host: *.localhost is loopback, where the demo forwards port "
            f"{forward_port} into the gateway namespace.\n"
            f"  The browser will not know the demo's CA (trust it, or accept the warning); curl can check it:\n"
            f"  curl --cacert {WORKDIR / 'certs' / 'ca.crt'} {url}\n"
        )
        return url


def run(out: TextIO, *, wait: bool, port: int = TUNNEL_PORT) -> int:
    """The demo; 0 when every request came out as expected."""
    if os.geteuid() != 0:
        out.write("gateway demo needs root (network namespaces): sudo .venv/bin/gateway demo\n")
        return 2
    remove_leftovers(out)
    out.write("Building the demo (namespaces gwdemo-*, files in " + str(WORKDIR) + "):\n")
    forwarder: Forwarder | None = None
    topo = Topology(sandboxes=1, origins=2, prefix=PREFIX)
    try:
        with step(out, "namespaces: fake internet, gateway host, one sandbox"):
            topo.__enter__()  # closes itself if it fails half-way
        try:
            forwarder = Forwarder(port, topo.gw, ("127.0.0.1", TUNNEL_PORT))
            demo = Demo(topo, out)
            demo.start(forwarder.port)
            demo.watch()
            checks = demo.requests()
            demo.stop_watching()
            demo.tunnel(forwarder.port)
            failed = [c for c in checks if not c.ok]
            out.write(f"\n{len(checks) - len(failed)} of {len(checks)} decisions as expected.\n")
            if wait:
                out.write("Ctrl-C removes everything.\n")
                out.flush()
                threading.Event().wait()
            return 1 if failed else 0
        finally:
            if forwarder is not None:
                forwarder.close()
            topo.close()
    except KeyboardInterrupt:
        return 0
    except (TopologyError, subprocess.CalledProcessError, OSError) as exc:
        out.write(f"\ndemo failed: {exc}\n")
        return 1
    finally:
        shutil.rmtree(WORKDIR, ignore_errors=True)
        out.write("removed the demo's namespaces and files\n")
