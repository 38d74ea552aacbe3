"""`gateway sandbox attach/detach`, the development helper, run for real inside a gateway namespace.

The gateway namespace made here has an uplink with a default route (as a real host
has): proxy ARP only answers for 169.254.1.1 because the gateway has a route to it through
another interface. A TCP server in the gateway namespace on its uplink addresses and on
fe80::1 answers with the client's address, so a connection from the sandbox proves the
whole path: sandbox default routes, proxy ARP / link-local next hop, and the host route
back to the sandbox address (the reply could not get back without it).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.netplumb import ROUTE_PROTO
from tests.netns import IP, live_namespaces, wait_for_line

REPO = Path(__file__).resolve().parents[2]
SB_V4, SB_V6 = "10.75.0.9", "fdd4:1476:6c7e::9"
UPLINK_V4, UPLINK_V6 = "198.18.0.2", "2001:db8:ff::2"
PORT = 7000

#: Answers every connection with `PEER <client address>`, on each address given (v6 may carry a %scope).
PEER_SERVER = r"""
import socket, sys, threading
def serve(sock):
    while True:
        conn, peer = sock.accept()
        with conn:
            conn.sendall(f"PEER {peer[0]}\n".encode())
for spec in sys.argv[2:]:
    family = socket.AF_INET6 if ":" in spec else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(socket.getaddrinfo(spec, int(sys.argv[1]), family, socket.SOCK_STREAM)[0][4])
    s.listen(16)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
try:
    addr = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), family, socket.SOCK_STREAM)[0][4]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(addr)
    print(s.recv(200).decode().strip())
except OSError as exc:
    print("FAIL", exc)
"""


def _run(argv: list[str], *, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: {proc.returncode} {proc.stdout} {proc.stderr}")
    return proc


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    return _run([IP, *(["-n", netns] if netns else []), *args], check=check).stdout


def _ipj(*args: str, netns: str) -> list[dict[str, Any]]:
    return list(json.loads(_ip("-j", *args, netns=netns) or "[]"))


@dataclass
class Lab:
    prefix: str
    gw: str
    sb: str

    def gateway_cli(self, *args: str, inside: bool = True) -> subprocess.CompletedProcess[str]:
        """`python -m gateway.cli sandbox ...`, inside the gateway namespace (`ip netns exec`) or from here."""
        argv = [sys.executable, "-m", "gateway.cli", "--json", "sandbox", *args]
        if inside:
            argv = [IP, "netns", "exec", self.gw, *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, cwd=str(REPO))

    def attach(self, *extra: str, inside: bool = True) -> dict[str, Any]:
        out = self.gateway_cli(
            "attach", "--netns", self.sb, "--address", SB_V4, "--address", SB_V6, *extra, inside=inside
        )
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def state(self) -> dict[str, Any]:
        """Everything attach touches, in a comparable form (no counters, no timers)."""
        gw_links = [
            (link["ifname"], link.get("ifalias"), tuple(link.get("flags", ()))) for link in _ipj("link", netns=self.gw)
        ]
        return {
            "gw_links": gw_links,
            "gw_addrs": _ip("-br", "addr", netns=self.gw),
            "gw_routes": _ip("route", netns=self.gw) + _ip("-6", "route", netns=self.gw),
            "sb_addrs": _ip("-br", "addr", netns=self.sb),
            "sb_routes": _ip("route", netns=self.sb) + _ip("-6", "route", netns=self.sb),
        }

    def connect(self, host: str) -> str:
        return _run([IP, "netns", "exec", self.sb, sys.executable, "-c", CLIENT, host, str(PORT)]).stdout.strip()


@pytest.fixture
def lab() -> Iterator[Lab]:
    prefix = f"gwa{secrets.token_hex(3)}"
    lab = Lab(prefix, f"{prefix}-gw", f"{prefix}-sb")
    try:
        _ip("netns", "add", lab.gw)
        _ip("link", "set", "lo", "up", netns=lab.gw)
        # An uplink with default routes, so the gateway has a route to 169.254.1.1 (proxy ARP needs one). A veth
        # whose peer stays in the same namespace: no dummy module here, and nothing ever leaves through it.
        _ip("link", "add", "up0", "type", "veth", "peer", "name", "up0p", netns=lab.gw)
        _ip("link", "set", "up0p", "up", netns=lab.gw)
        _ip("addr", "add", f"{UPLINK_V4}/24", "dev", "up0", netns=lab.gw)
        _ip("addr", "add", f"{UPLINK_V6}/64", "dev", "up0", "nodad", netns=lab.gw)
        _ip("link", "set", "up0", "up", netns=lab.gw)
        _ip("route", "add", "default", "via", "198.18.0.1", netns=lab.gw)
        _ip("-6", "route", "add", "default", "via", "2001:db8:ff::1", netns=lab.gw)
        yield lab
    finally:
        for name in live_namespaces(prefix):
            for pid in _ip("netns", "pids", name, check=False).split():
                with contextlib.suppress(OSError):
                    subprocess.run(["kill", "-9", pid], timeout=5, check=False)
        for name in live_namespaces(prefix):
            _ip("netns", "del", name, check=False)
    assert live_namespaces(prefix) == [], "namespaces left behind"


def _start_server(lab: Lab, *addresses: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [IP, "netns", "exec", lab.gw, sys.executable, "-u", "-c", PEER_SERVER, str(PORT), *addresses],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_line(proc, "ready", 10)
    return proc


@pytest.mark.root
def test_attach_inside_the_gateway_namespace_wires_routes_and_proxy_arp(lab: Lab) -> None:
    # Under `ip netns exec` a namespace the helper created would not outlive it (private mount namespace):
    # it refuses, clearly, and leaves nothing behind.
    refused = lab.gateway_cli("attach", "--netns", lab.sb, "--address", SB_V4)
    assert refused.returncode == 1 and "NETNS_WOULD_VANISH" in refused.stderr, refused.stderr
    assert live_namespaces(lab.sb) == [] and _ip("-br", "link", netns=lab.gw).count("vif") == 0
    # An address outside the configured sandbox subnets is a usage error.
    outside = lab.gateway_cli("attach", "--netns", lab.sb, "--address", "192.0.2.1")
    assert outside.returncode == 2 and "ADDRESS_OUTSIDE_SUBNETS" in outside.stderr, outside.stderr

    _ip("netns", "add", lab.sb)
    first = lab.attach()
    assert first == {
        "netns": lab.sb,
        "interface": "vif1.0",
        "addresses": [SB_V4, SB_V6],
        "gateway_netns": None,
        "changed": True,
    }
    vif = first["interface"]
    # Sandbox side: /32 and /128 on eth0, defaults via 169.254.1.1 onlink and fe80::1.
    addrs = {
        (a["local"], a["prefixlen"]) for link in _ipj("addr", "show", "eth0", netns=lab.sb) for a in link["addr_info"]
    }
    assert {(SB_V4, 32), (SB_V6, 128)} <= addrs
    v4_default = _ip("route", "show", "default", netns=lab.sb)
    assert v4_default.startswith("default via 169.254.1.1 dev eth0") and "onlink" in v4_default
    assert _ip("-6", "route", "show", "default", netns=lab.sb).startswith("default via fe80::1 dev eth0")
    # Gateway side: the vif with fe80::1 and its alias, our host routes, proxy ARP on.
    assert _ipj("link", "show", vif, netns=lab.gw)[0]["ifalias"] == f"sandbox-netns:{lab.sb}"
    link = _ipj("addr", "show", vif, netns=lab.gw)[0]
    assert ("fe80::1", 64) in {(a["local"], a["prefixlen"]) for a in link["addr_info"]}
    for family, address in (("-4", SB_V4), ("-6", SB_V6)):
        (route,) = _ipj(family, "route", "show", address, netns=lab.gw)
        assert route["dev"] == vif and route["protocol"] in (ROUTE_PROTO, str(ROUTE_PROTO)), route
    sysctl = _run([IP, "netns", "exec", lab.gw, "sysctl", "-n", f"net.ipv4.conf.{vif.replace('.', '/')}.proxy_arp"])
    assert sysctl.stdout.strip() == "1"

    # Reachability both ways, v4 through the proxy-ARP next hop, v6 through fe80::1: the server sees the
    # sandbox's own address, and its answer came back over the host route.
    server = _start_server(lab, UPLINK_V4, UPLINK_V6, f"fe80::1%{vif}")
    try:
        assert lab.connect(UPLINK_V4) == f"PEER {SB_V4}"
        assert lab.connect(UPLINK_V6) == f"PEER {SB_V6}"
        assert lab.connect("fe80::1%eth0").startswith("PEER fe80::")
        neigh = _ipj("neigh", "show", "169.254.1.1", netns=lab.sb)
        gw_mac = _ipj("link", "show", vif, netns=lab.gw)[0]["address"]
        assert neigh and neigh[0]["lladdr"] == gw_mac, neigh  # answered by the gateway's proxy ARP
    finally:
        server.kill()
        server.wait(5)

    # Idempotent: a second run changes nothing at all.
    before = lab.state()
    again = lab.attach()
    assert again == {**first, "changed": False}
    assert lab.state() == before

    # Detach removes the routes, the veth and the namespace; a second detach is a no-op.
    out = lab.gateway_cli("detach", "--netns", lab.sb)
    assert out.returncode == 0 and json.loads(out.stdout) == {"netns": lab.sb, "removed": True}, out.stderr
    assert live_namespaces(lab.sb) == []
    assert "vif" not in _ip("-br", "link", netns=lab.gw)
    assert SB_V4 not in _ip("route", netns=lab.gw) and SB_V6 not in _ip("-6", "route", netns=lab.gw)
    out = lab.gateway_cli("detach", "--netns", lab.sb)
    assert out.returncode == 0 and json.loads(out.stdout) == {"netns": lab.sb, "removed": False}, out.stderr


@pytest.mark.root
def test_attach_from_outside_creates_the_namespace_and_reattaches_with_new_addresses(lab: Lab) -> None:
    # From this (the host's) mount namespace the helper may create the sandbox namespace itself.
    first = lab.attach("--gateway-netns", lab.gw, inside=False)
    assert first["changed"] and first["interface"] == "vif1.0" and first["gateway_netns"] == lab.gw
    assert live_namespaces(lab.sb) == [lab.sb]
    assert lab.attach("--gateway-netns", lab.gw, inside=False)["changed"] is False
    # Re-attaching with other addresses moves to exactly those: the stale route and address go.
    out = lab.gateway_cli(
        "attach", "--netns", lab.sb, "--address", "10.75.0.10", "--gateway-netns", lab.gw, inside=False
    )
    assert out.returncode == 0 and json.loads(out.stdout)["changed"], out.stderr
    routes = _ip("route", netns=lab.gw) + _ip("-6", "route", netns=lab.gw)
    assert "10.75.0.10 dev vif1.0" in routes and SB_V4 not in routes and SB_V6 not in routes
    sb_addrs = _ip("-br", "addr", "show", "eth0", netns=lab.sb)
    assert "10.75.0.10/32" in sb_addrs and SB_V4 not in sb_addrs and SB_V6 not in sb_addrs
    assert _ip("-6", "route", "show", "default", netns=lab.sb).strip() == ""  # no v6 address, no v6 default
    # --interface: only the host route + proxy ARP, for an interface someone else created.
    out = lab.gateway_cli("attach", "--interface", "vif1.0", "--address", "10.75.0.12", "--gateway-netns", lab.gw)
    assert out.returncode == 0 and json.loads(out.stdout)["changed"] is True, out.stderr
    assert "10.75.0.12 dev vif1.0 proto 247" in _ip("route", netns=lab.gw)
    # A second sandbox gets the next vif.
    other = f"{lab.prefix}-sb2"
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--json", "sandbox", "attach", "--netns", other,
         "--address", "10.75.0.11", "--gateway-netns", lab.gw],
        capture_output=True, text=True, timeout=30, check=False, cwd=str(REPO),
    )  # fmt: skip
    assert out.returncode == 0 and json.loads(out.stdout)["interface"] == "vif2.0", out.stderr
    for name in (lab.sb, other):
        out = lab.gateway_cli("detach", "--netns", name, "--gateway-netns", lab.gw, inside=False)
        assert out.returncode == 0 and json.loads(out.stdout)["removed"], out.stderr
    assert live_namespaces(lab.prefix) == [lab.gw]
    assert "vif" not in _ip("-br", "link", netns=lab.gw)
    assert "10.75.0." not in _ip("route", netns=lab.gw)  # detach took the --interface route too


@pytest.mark.root
def test_attach_interface_wires_an_interface_a_vmm_made_and_detach_interface_removes_only_ours(lab: Lab) -> None:
    # The VMM's part: a veth into the sandbox with its addresses and default routes (as tests/netns.py does).
    _ip("netns", "add", lab.sb)
    _ip("link", "add", "vif7.0", "type", "veth", "peer", "name", "eth0", "netns", lab.sb, netns=lab.gw)
    _ip("addr", "add", "fe80::1/64", "dev", "vif7.0", "nodad", netns=lab.gw)
    _ip("link", "set", "vif7.0", "up", netns=lab.gw)
    for args in (
        ("addr", "add", f"{SB_V4}/32", "dev", "eth0"),
        ("addr", "add", f"{SB_V6}/128", "dev", "eth0", "nodad"),
        ("link", "set", "eth0", "up"),
        ("link", "set", "lo", "up"),
        ("route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink"),
        ("-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"),
    ):
        _ip(*args, netns=lab.sb)

    def attach(*extra: str) -> subprocess.CompletedProcess[str]:
        return lab.gateway_cli("attach", "--interface", "vif7.0", "--address", SB_V4, "--address", SB_V6, *extra)

    # Refused before anything changes: an address outside the subnets, a missing interface, --ifname.
    outside = lab.gateway_cli("attach", "--interface", "vif7.0", "--address", SB_V4, "--address", "192.0.2.7")
    assert outside.returncode == 2 and "ADDRESS_OUTSIDE_SUBNETS" in outside.stderr, outside.stderr
    missing = lab.gateway_cli("attach", "--interface", "vif9.0", "--address", SB_V4)
    assert missing.returncode == 1 and "INTERFACE_NOT_FOUND" in missing.stderr, missing.stderr
    both = attach("--ifname", "vif8.0")
    assert both.returncode == 2 and "--ifname is for --netns" in both.stderr, both.stderr
    neither = lab.gateway_cli("attach", "--address", SB_V4)
    assert neither.returncode == 2, neither.stderr
    assert SB_V4 not in _ip("route", netns=lab.gw)

    first = attach()
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {
        "netns": None,
        "interface": "vif7.0",
        "addresses": [SB_V4, SB_V6],
        "gateway_netns": None,
        "changed": True,
    }
    sysctl = _run([IP, "netns", "exec", lab.gw, "sysctl", "-n", "net.ipv4.conf.vif7/0.proxy_arp"])
    assert sysctl.stdout.strip() == "1"
    server = _start_server(lab, UPLINK_V4, UPLINK_V6)
    try:
        assert lab.connect(UPLINK_V4) == f"PEER {SB_V4}"  # proxy ARP next hop, and the host route back
        assert lab.connect(UPLINK_V6) == f"PEER {SB_V6}"
    finally:
        server.kill()
        server.wait(5)
    before = lab.state()
    again = attach()
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False and lab.state() == before
    # One of our routes on the wrong interface (a sandbox moved): attaching moves it back.
    _ip("route", "replace", f"{SB_V4}/32", "dev", "up0", "proto", "247", netns=lab.gw)
    moved = attach()
    assert moved.returncode == 0 and json.loads(moved.stdout)["changed"] is True, moved.stderr
    assert lab.state() == before

    # A route somebody else owns on the same interface is not ours to remove.
    _ip("route", "add", "10.75.0.200/32", "dev", "vif7.0", netns=lab.gw)
    out = lab.gateway_cli("detach", "--interface", "vif7.0", "--address", SB_V6)
    assert out.returncode == 0 and json.loads(out.stdout) == {"interface": "vif7.0", "removed": [SB_V6]}, out.stderr
    out = lab.gateway_cli("detach", "--interface", "vif7.0")
    assert out.returncode == 0 and json.loads(out.stdout)["removed"] == [SB_V4], out.stderr
    routes = _ip("route", netns=lab.gw)
    assert SB_V4 not in routes and "10.75.0.200 dev vif7.0" in routes
    assert "vif7.0" in _ip("-br", "link", netns=lab.gw)  # the interface is the VMM's: it stays
    out = lab.gateway_cli("detach", "--interface", "vif7.0")
    assert out.returncode == 0 and json.loads(out.stdout)["removed"] == [], out.stderr
