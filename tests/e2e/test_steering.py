"""Steering end to end: real namespaces, the real nft table and policy routing, real clients.

A stand-in listener takes the egress engine's and DNS interceptor's place in the gateway
namespace: `IP_TRANSPARENT` sockets on the TPROXY ports that record the original
destination (`getsockname()` for TCP, the `IP_ORIGDSTADDR` control message for UDP) and
answer with it. The internet namespace routes the sandbox subnets back to the gateway, so
every "nothing arrives" assertion below would fail if the gateway forwarded the packet.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway import netplumb
from gateway.errors import GatewayError
from gateway.nft import LinkRule, SteeringConfig, render_ruleset
from tests.netns import GATEWAY_V4, GATEWAY_V6, ORIGIN_SERVER, SANDBOX_V4, SANDBOX_V6, Topology, wait_until

EGRESS_PORT = 15001
DNS_PORT = 15053

STANDIN = r"""
import json, socket, struct, sys, threading
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR = 20, 74
egress_port, dns_port, log_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()

def record(**fields):
    with lock, open(log_path, "a") as f:
        f.write(json.dumps(fields) + "\n")

def transparent(family, kind):
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    return s

def dns_answer(query):
    i = 12
    while i < len(query) and query[i]:
        i += query[i] + 1
    return query[:2] + bytes([0x80 | (query[2] & 0x79), 0x80]) + query[4:6] + bytes(6) + query[12 : i + 5]

def recv_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data

def handle(conn, peer, kind):
    with conn:
        conn.settimeout(3)
        dst, dport = conn.getsockname()[:2]
        record(proto="tcp", kind=kind, src=peer[0], dst=dst, dport=dport)
        try:
            if kind == "dns":
                (size,) = struct.unpack("!H", recv_exact(conn, 2))
                answer = dns_answer(recv_exact(conn, size))
                conn.sendall(struct.pack("!H", len(answer)) + answer)
                return
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            body = f"STANDIN {dst} {dport}\n".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except OSError:
            pass

def tcp(family, port, kind):
    s = transparent(family, socket.SOCK_STREAM)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(128)
    while True:
        conn, peer = s.accept()
        threading.Thread(target=handle, args=(conn, peer, kind), daemon=True).start()

def udp(family, port):
    v6 = family == socket.AF_INET6
    s = transparent(family, socket.SOCK_DGRAM)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    else:
        s.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    s.bind(("::" if v6 else "0.0.0.0", port))
    while True:
        data, ancillary, _, peer = s.recvmsg(65535, 1024)
        orig = None
        for level, ctype, cdata in ancillary:
            if not v6 and level == socket.SOL_IP and ctype == IP_RECVORIGDSTADDR:
                orig = (socket.inet_ntop(socket.AF_INET, cdata[4:8]), struct.unpack("!H", cdata[2:4])[0])
            elif v6 and level == socket.IPPROTO_IPV6 and ctype == IPV6_RECVORIGDSTADDR:
                orig = (socket.inet_ntop(socket.AF_INET6, cdata[8:24]), struct.unpack("!H", cdata[2:4])[0])
        record(proto="udp", kind="dns", src=peer[0], dst=orig and orig[0], dport=orig and orig[1])
        if orig is None:
            continue
        # Answer from the original destination: a transparent socket may bind a non-local address.
        reply = transparent(family, socket.SOCK_DGRAM)
        try:
            reply.bind(orig)
            reply.sendto(dns_answer(data) if len(data) >= 12 else data, peer)
        finally:
            reply.close()

for family in (socket.AF_INET, socket.AF_INET6):
    threading.Thread(target=tcp, args=(family, egress_port, "egress"), daemon=True).start()
    threading.Thread(target=tcp, args=(family, dns_port, "dns"), daemon=True).start()
    threading.Thread(target=udp, args=(family, dns_port), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

UDP_SINK = r"""
import socket, sys, threading
def sink(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(65535)
        print("GOT", port, peer[0], flush=True)
        s.sendto(b"UDP-ORIGIN", peer)
for port in sys.argv[1:]:
    threading.Thread(target=sink, args=(int(port),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

UDP_CLIENT = r"""
import socket, sys
host, port, source = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else "")
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
if source:
    s.bind((source, 0))
s.settimeout(0.6)
query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
for _ in range(2):
    s.sendto(query, (host, port))
    try:
        data, peer = s.recvfrom(65535)
    except TimeoutError:
        continue
    print("REPLY", peer[0], peer[1], data[:2].hex(), flush=True)
    break
else:
    print("NOREPLY", flush=True)
"""

TCP_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
source = sys.argv[3] if len(sys.argv) > 3 else ""
family = socket.AF_INET6 if ":" in host.split("%")[0] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(1.5)
try:
    if source:
        s.bind((source, 0))
    target = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
    s.connect(target)
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print("OK", data.split(b"\r\n\r\n", 1)[-1].decode().strip())
except OSError as exc:
    print("FAIL", type(exc).__name__, exc)
"""

ICMP_CLIENT = r"""
import socket, sys
host = sys.argv[1]
v6 = ":" in host
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
s.settimeout(0.8)
packet = bytes([128 if v6 else 8, 0, 0, 0, 0x12, 0x34, 0, 1]) + b"ping"
if not v6:
    total = sum(int.from_bytes(packet[i:i + 2], "big") for i in range(0, len(packet), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    packet = packet[:2] + (~total & 0xFFFF).to_bytes(2, "big") + packet[4:]
s.sendto(packet, (host, 0))
try:
    while True:
        data, peer = s.recvfrom(2048)
        kind = data[0] if v6 else data[(data[0] & 0x0F) * 4]
        if kind in (0, 129):
            print("ECHO-REPLY", peer[0])
            break
except TimeoutError:
    print("NOREPLY")
"""


# --------------------------------------------------------------------------- the stand-in gateway


class Gateway:
    """The plumbed gateway namespace with its stand-in listener, plus client helpers."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.log = workdir / "standin.jsonl"
        self.log.touch()
        self.standin: subprocess.Popen[Any] | None = None
        self.baseline = topo.steering_config(
            attached=topo.sandboxes[:2], egress_port=EGRESS_PORT, dns_port=DNS_PORT, dial_mark=0x2
        )
        self.sink: subprocess.Popen[Any] | None = None

    def start_standin(self) -> None:
        if self.standin is not None and self.standin.poll() is None:
            return
        self.standin = self.topo.start_python("gw", STANDIN, str(EGRESS_PORT), str(DNS_PORT), str(self.log))

    def stop_standin(self) -> None:
        if self.standin is not None:
            self.topo.kill(self.standin)
            self.topo.processes.remove(self.standin)
            self.standin = None

    def reset(self) -> None:
        """Back to the baseline: sb1 and sb2 attached, no links, stand-in running."""
        self.topo.plumb(self.baseline)
        self.start_standin()
        self.log.write_text("")
        _sink_lines(self)  # forget what earlier tests sent

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def curl(self, sb: str, url: str, *extra: str, timeout: float = 3.0) -> subprocess.CompletedProcess[str]:
        argv = ["curl", "-sS", "-g", "--connect-timeout", str(min(timeout, 1.5)), "-m", str(timeout), *extra, url]
        return self.topo.run(sb, argv, check=False, timeout=timeout + 5)

    def tcp(self, sb: str, host: str, port: int, source: str = "") -> str:
        return self.topo.python(sb, TCP_CLIENT, host, str(port), *([source] if source else []), timeout=10).strip()

    def udp(self, sb: str, host: str, port: int, source: str = "") -> str:
        return self.topo.python(sb, UDP_CLIENT, host, str(port), *([source] if source else []), timeout=10).strip()


@pytest.fixture(scope="module")
def gateway(topology: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(topology, tmp_path_factory.mktemp("steering"))
    gw.reset()
    topology.start_origin(ports=(80, 8443))
    gw.sink = topology.start_python("inet", UDP_SINK, "443", "53", "5000")
    for index in (1, 2):  # a service inside each sandbox, for the private-link tests
        topology.start_python(f"sb{index}", ORIGIN_SERVER, "8080", "8081")
    # Stand-in for the gateway's own services (control API, Redis): every address of the gateway.
    topology.start_python("gw", ORIGIN_SERVER, "6379", "8470")
    yield gw


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    gateway.reset()
    return gateway


def parallel[T](*calls: Callable[[], T]) -> list[T]:
    """Run client probes at once: negative checks each wait for a timeout, so they overlap."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def _body(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.strip()


def _sink_lines(gw: Gateway) -> list[str]:
    """Lines the internet's UDP sink printed so far (non-blocking)."""
    if gw.sink is None or gw.sink.stdout is None:
        return []
    lines: list[str] = []
    fd = gw.sink.stdout.fileno()
    os.set_blocking(fd, False)
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        lines += chunk.decode().splitlines()
    return [line for line in lines if line.startswith("GOT")]


# --------------------------------------------------------------------------- pure rendering (no root)


def _config(**changes: Any) -> SteeringConfig:
    a, b = ipaddress.ip_address("10.75.0.1"), ipaddress.ip_address("10.75.0.2")
    base = SteeringConfig(
        sandbox_subnets=(SANDBOX_V4, SANDBOX_V6),
        sandbox_interfaces=("vif*",),
        attached=frozenset({a, b, ipaddress.ip_address("fdd4:1476:6c7e::1")}),
        gateway_addresses=frozenset({GATEWAY_V4, GATEWAY_V6}),
        private_links=(LinkRule(a, b, (8080,)),),
    )
    return replace(base, **changes)


def test_render_is_deterministic_and_has_the_documented_shape() -> None:
    text = render_ruleset(_config())
    assert text == render_ruleset(_config())
    assert text.splitlines()[2:4] == ["add table inet sandbox_gateway", "delete table inet sandbox_gateway"]
    assert "elements = { 10.75.0.1, 10.75.0.2 }" in text
    assert "elements = { 10.75.0.1 . 10.75.0.2 . 8080 }" in text
    assert f"tproxy ip to :{15001} accept" in text and "tproxy ip6 to :15001 accept" in text
    assert "meta mark set 0x1 tproxy ip to :15053 accept" in text
    for chain in ("from_sandbox", "sandbox_input", "sandbox_forward"):
        body = text.split(f"chain {chain} {{\n", 1)[1].split("\n\t}", 1)[0].splitlines()
        assert body[-1].strip().startswith("counter drop"), f"{chain} must end in an unconditional drop"
    assert "chain output" not in text  # only with dial_mark


def test_workers_get_the_tcp_of_their_sandboxes_through_a_verdict_map() -> None:
    a, b, c = (ipaddress.ip_address(x) for x in ("10.75.0.1", "10.75.0.2", "fdd4:1476:6c7e::1"))
    text = render_ruleset(_config(workers=3, worker_of={a: 0, b: 2, c: 2}))
    assert "elements = { 10.75.0.1 : jump egress_worker_0, 10.75.0.2 : jump egress_worker_2 }" in text
    assert "elements = { fdd4:1476:6c7e::1 : jump egress_worker_2 }" in text
    steer = text.split("chain from_sandbox {\n", 1)[1].split("\n\t}", 1)[0]
    assert "meta l4proto tcp ip saddr vmap @worker_v4" in steer and "tproxy ip to :15001" not in steer
    for worker in range(3):
        body = text.split(f"chain egress_worker_{worker} {{\n", 1)[1].split("\n\t}", 1)[0].splitlines()
        assert body[0].endswith(f"tproxy ip to :{15001 + worker} accept") and body[-1].strip() == "counter drop"
    assert "th dport { 15001-15003, 15053 }" in text  # every worker's port is closed to direct connections


def test_links_any_port_absorbs_specific_ports_and_links_to_detached_addresses_are_inert() -> None:
    a, b = ipaddress.ip_address("10.75.0.1"), ipaddress.ip_address("10.75.0.2")
    gone = ipaddress.ip_address("10.75.0.9")
    text = render_ruleset(_config(private_links=(LinkRule(a, b, (80,)), LinkRule(a, b), LinkRule(a, gone, (1,)))))
    assert "elements = { 10.75.0.1 . 10.75.0.2 . 1-65535 }" in text
    assert "10.75.0.9" not in text


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"attached": frozenset({ipaddress.ip_address("192.0.2.1")})}, "attached"),
        ({"egress_port": 0}, "egress_port"),
        ({"dns_port": 15001}, "dns_port"),
        ({"route_table": 254}, "route_table"),
        ({"fwmark": 0x3, "fwmark_mask": 0x1}, "fwmark"),
        ({"dial_mark": 0x1}, "dial_mark"),
        ({"sandbox_interfaces": ('vif"; drop',)}, "sandbox_interfaces[0]"),
        ({"sandbox_interfaces": ()}, "sandbox_interfaces"),
        ({"gateway_addresses": frozenset({ipaddress.ip_address("10.75.9.9")})}, "gateway_addresses"),
        ({"workers": 0}, "workers"),
        ({"workers": 2, "egress_port": 65535}, "workers"),
        ({"workers": 60, "dns_port": 15053}, "dns_port"),
        ({"workers": 2, "worker_of": {ipaddress.ip_address("10.75.0.9"): 1}}, "worker_of"),
        ({"workers": 2, "worker_of": {ipaddress.ip_address("10.75.0.1"): 2}}, "worker_of"),
    ],
)
def test_invalid_configs_are_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(GatewayError) as caught:
        _config(**changes)
    assert caught.value.code == "STEERING_INVALID" and caught.value.field == field


def test_masked_fwmark_keeps_other_bits() -> None:
    text = render_ruleset(_config(fwmark=0x100, fwmark_mask=0x100))
    assert "meta mark set meta mark & 0xfffffeff | 0x100" in text
    assert "meta mark & 0x100 == 0x100 socket transparent 1 accept" in text
    assert _config(fwmark=0x100, fwmark_mask=0x100).policy_routing.commands()[0][5] == "0x100/0x100"


# --------------------------------------------------------------------------- kernel plumbing (root)


@pytest.mark.root
def test_tcp_any_port_reaches_the_listener_with_the_original_destination(gw: Gateway) -> None:
    assert _body(gw.curl("sb1", "http://198.18.1.1/")) == "STANDIN 198.18.1.1 80"
    assert _body(gw.curl("sb1", "http://198.18.1.2:8443/")) == "STANDIN 198.18.1.2 8443"
    assert _body(gw.curl("sb2", "http://[2001:db8:1::3]:8443/")) == "STANDIN 2001:db8:1::3 8443"
    assert _body(gw.curl("sb2", "http://[2001:db8:1::1]/")) == "STANDIN 2001:db8:1::1 80"
    # Any port, any address (even one nobody routes): it is the listener that answers, not the origin.
    assert gw.tcp("sb1", "203.0.113.77", 5432) == "OK STANDIN 203.0.113.77 5432"
    assert gw.tcp("sb2", "2001:db8:77::1", 22) == "OK STANDIN 2001:db8:77::1 22"
    seen = {(r["src"], r["dst"], r["dport"]) for r in gw.records() if r["kind"] == "egress"}
    assert ("10.75.0.1", "198.18.1.1", 80) in seen  # the peer is the sandbox's own address: no NAT
    assert ("fdd4:1476:6c7e::2", "2001:db8:1::3", 8443) in seen


@pytest.mark.root
def test_dns_udp_and_tcp_53_reach_the_interceptor_with_the_original_destination(gw: Gateway) -> None:
    # The answer comes back from the address the sandbox asked, so an ordinary resolver accepts it.
    assert gw.udp("sb1", "198.18.0.53", 53).startswith("REPLY 198.18.0.53 53 abcd")
    assert gw.udp("sb2", "2001:db8:1::53", 53).startswith("REPLY 2001:db8:1::53 53 abcd")
    # A sandbox may also use the gateway's own address as its resolver: port 53 is the one exception.
    assert gw.udp("sb1", str(GATEWAY_V4), 53).startswith(f"REPLY {GATEWAY_V4} 53 abcd")
    dig = gw.topo.run("sb1", ["dig", "+tcp", "+tries=1", "+time=2", "@192.0.2.53", "example.com"], check=False)
    assert "status: NOERROR" in dig.stdout, dig.stdout + dig.stderr
    dig = gw.topo.run("sb2", ["dig", "+tries=1", "+time=2", "@2001:db8:1::53", "example.com", "AAAA"], check=False)
    assert "status: NOERROR" in dig.stdout, dig.stdout + dig.stderr
    dns = {(r["proto"], r["src"], r["dst"], r["dport"]) for r in gw.records() if r["kind"] == "dns"}
    assert ("udp", "10.75.0.1", "198.18.0.53", 53) in dns
    assert ("udp", "fdd4:1476:6c7e::2", "2001:db8:1::53", 53) in dns
    assert ("tcp", "10.75.0.1", "192.0.2.53", 53) in dns
    assert not _sink_lines(gw), "a DNS query reached the internet"


@pytest.mark.root
def test_quic_other_udp_and_icmp_get_nowhere(gw: Gateway) -> None:
    _sink_lines(gw)
    # Control: the sink answers when asked from the gateway itself.
    assert gw.udp("gw", "198.18.1.1", 443).startswith("REPLY ")
    assert wait_until(lambda: bool(_sink_lines(gw)), 2)
    results = parallel(
        lambda: gw.udp("sb1", "198.18.1.1", 443),
        lambda: gw.udp("sb2", "2001:db8:1::2", 443),
        lambda: gw.udp("sb1", "198.18.1.1", 5000),
        lambda: gw.topo.python("sb1", ICMP_CLIENT, "198.18.1.1").strip(),
        lambda: gw.topo.python("sb2", ICMP_CLIENT, "2001:db8:1::1").strip(),
        lambda: gw.topo.python("sb1", ICMP_CLIENT, "fe80::1%eth0").strip(),  # not even the gateway answers ping
    )
    assert results == ["NOREPLY"] * 6
    assert gw.topo.python("inet", ICMP_CLIENT, "198.18.1.1").strip().startswith("ECHO-REPLY")  # control
    time.sleep(0.2)
    assert not _sink_lines(gw)
    assert not [r for r in gw.records() if r["proto"] == "udp"]


@pytest.mark.root
def test_sandbox_to_sandbox_only_over_a_private_link_and_only_one_way(gw: Gateway) -> None:
    sb1, sb2 = gw.topo.sandbox(1), gw.topo.sandbox(2)
    unlinked = parallel(
        lambda: gw.curl("sb1", f"http://{sb2.v4}:8080/"), lambda: gw.curl("sb1", f"http://[{sb2.v6}]:8080/")
    )
    assert all(out.returncode != 0 and "ORIGIN" not in out.stdout for out in unlinked)

    links = (LinkRule(sb1.v4, sb2.v4, (8080,)), LinkRule(sb1.v6, sb2.v6, (8080,)))
    gw.topo.apply(gw.topo.with_config(private_links=links))
    # Forwarded, not proxied: sandbox 2's own server answers, and it sees sandbox 1's address.
    assert _body(gw.curl("sb1", f"http://{sb2.v4}:8080/")) == f"ORIGIN ::ffff:{sb2.v4} 8080"
    assert _body(gw.curl("sb1", f"http://[{sb2.v6}]:8080/")) == f"ORIGIN {sb2.v6} 8080"
    refused = parallel(
        lambda: gw.curl("sb1", f"http://{sb2.v4}:8081/"),  # not the linked port
        lambda: gw.curl("sb2", f"http://{sb1.v4}:8080/"),  # not the other direction
        lambda: gw.curl("sb2", f"http://[{sb1.v6}]:8080/"),
    )
    assert all(out.returncode != 0 and "ORIGIN" not in out.stdout for out in refused)
    assert not gw.records()


@pytest.mark.root
def test_gateway_services_are_unreachable_from_sandboxes(gw: Gateway) -> None:
    # Control: the stand-in "Redis" and "control API" answer on the gateway's address from the internet.
    assert _body(gw.curl("inet", f"http://{GATEWAY_V4}:6379/")).startswith("ORIGIN")
    assert _body(gw.curl("inet", f"http://[{GATEWAY_V6}]:8470/")).startswith("ORIGIN")
    # An address of the gateway that nobody listed in the config (think docker0): `fib daddr type local`.
    gw.topo.run("gw", ["ip", "addr", "add", "198.18.0.3/32", "dev", "up0"])
    urls = (
        f"http://{GATEWAY_V4}:6379/",
        f"http://[{GATEWAY_V6}]:8470/",
        "http://198.18.0.3:6379/",
        "http://[fe80::1%25eth0]:6379/",  # the gateway's link-local on the sandbox's own link
        "http://169.254.1.1:6379/",  # the proxy-ARP next hop is not a gateway service either
    )
    try:
        outs = parallel(*(lambda url=url: gw.curl("sb1", url) for url in urls))
    finally:
        gw.topo.run("gw", ["ip", "addr", "del", "198.18.0.3/32", "dev", "up0"])
    for url, out in zip(urls, outs, strict=True):
        assert "ORIGIN" not in out.stdout, url
        assert (out.returncode == 0) == url.startswith("http://169.254.1.1"), (url, out.stdout, out.stderr)
    # 169.254.1.1 is not a gateway address: it is TPROXYed like any destination (the engine refuses it).
    assert {r["dst"] for r in gw.records()} <= {"169.254.1.1"}
    # The TPROXY listener itself is not reachable directly (only through TPROXY), not even from the internet.
    direct = gw.topo.python("inet", TCP_CLIENT, str(GATEWAY_V4), str(EGRESS_PORT)).strip()
    assert direct.startswith("FAIL"), direct


@pytest.mark.root
def test_the_gateway_itself_reaches_sandbox_ports_for_the_ingress_tunnel(gw: Gateway) -> None:
    # Connections the gateway opens towards a sandbox (the tunnel) get their replies back (ct direction reply).
    sb1, sb2 = gw.topo.sandbox(1), gw.topo.sandbox(2)
    assert _body(gw.curl("gw", f"http://{sb1.v4}:8080/")) == f"ORIGIN ::ffff:{sb1.v4} 8080"
    assert _body(gw.curl("gw", f"http://[{sb2.v6}]:8081/")) == f"ORIGIN {sb2.v6} 8081"
    # ... but the internet cannot use the gateway as a router into the sandboxes.
    outs = parallel(
        lambda: gw.curl("inet", f"http://{sb1.v4}:8080/"), lambda: gw.curl("inet", f"http://[{sb2.v6}]:8081/")
    )
    assert all(out.returncode != 0 and "ORIGIN" not in out.stdout for out in outs)


@pytest.mark.root
def test_engine_dials_with_the_dial_mark_cannot_reach_the_gateway_itself(gw: Gateway) -> None:
    code = r"""
import socket, sys
for host, port in ((sys.argv[1], 6379), ("127.0.0.1", 6379), ("10.75.0.1", 8080), ("198.18.1.1", 80)):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x2)
    s.settimeout(1.5)
    try:
        s.connect((host, port))
        print(host, "connected")
    except OSError as exc:
        print(host, "refused", exc.errno)
    s.close()
"""
    lines = gw.topo.python("gw", code, str(GATEWAY_V4)).splitlines()
    # EHOSTUNREACH at once (the output chain rejects): the gateway's address, loopback, a sandbox.
    assert [line.split()[1:] for line in lines[:3]] == [["refused", "113"]] * 3, lines
    assert lines[3] == "198.18.1.1 connected", lines


@pytest.mark.root
def test_unattached_and_spoofed_sources_are_dropped_and_attaching_changes_only_set_elements(gw: Gateway) -> None:
    topo = gw.topo
    _, sb2, sb3 = topo.sandboxes
    # sb1 borrows sb2's address (and an unattached one): the reverse-path check drops both. UDP shows it
    # best: a spoofed TCP handshake fails anyway (the answer goes to the real sb2), a datagram would arrive.
    # (IPv4 also has the kernel's rp_filter: "loose" acts strict on an interface without an IPv4 address,
    # as the gateway-side veths are. IPv6 has no kernel equivalent; only the nft fib rule stops it.)
    topo.run("sb1", ["ip", "addr", "add", f"{sb2.v4}/32", "dev", "eth0"])
    topo.run("sb1", ["ip", "addr", "add", f"{sb2.v6}/128", "dev", "eth0", "nodad"])
    topo.run("sb1", ["ip", "addr", "add", "10.75.0.50/32", "dev", "eth0"])
    try:
        outs = parallel(
            # sb3 has a link and addresses, but no host route and no set entry: it is not attached.
            lambda: gw.tcp("sb3", "198.18.1.1", 80),
            lambda: gw.udp("sb3", "198.18.0.53", 53),
            lambda: gw.tcp("sb1", "198.18.1.1", 80, source=str(sb2.v4)),
            lambda: gw.udp("sb1", "198.18.0.53", 53, source=str(sb2.v4)),
            lambda: gw.tcp("sb1", "2001:db8:1::1", 80, source=str(sb2.v6)),
            lambda: gw.udp("sb1", "2001:db8:1::53", 53, source=str(sb2.v6)),
            lambda: gw.tcp("sb1", "198.18.1.1", 80, source="10.75.0.50"),
            lambda: gw.udp("sb1", "198.18.0.53", 53, source="10.75.0.50"),
        )
        assert [out.split()[0] for out in outs] == ["FAIL", "NOREPLY"] * 4, outs
    finally:
        topo.run("sb1", ["ip", "addr", "del", f"{sb2.v4}/32", "dev", "eth0"])
        topo.run("sb1", ["ip", "addr", "del", f"{sb2.v6}/128", "dev", "eth0"])
        topo.run("sb1", ["ip", "addr", "del", "10.75.0.50/32", "dev", "eth0"])
    assert not gw.records()

    # A host route alone is not enough: an address outside the attached set is still dropped.
    netplumb.attach_sandbox(sb3.v4, sb3.gw_interface, netns=topo.gw)
    netplumb.attach_sandbox(sb3.v6, sb3.gw_interface, netns=topo.gw)
    outs = parallel(lambda: gw.udp("sb3", "198.18.0.53", 53), lambda: gw.udp("sb3", "2001:db8:1::53", 53))
    assert outs == ["NOREPLY", "NOREPLY"]
    assert not gw.records()

    before = netplumb.list_table(netns=topo.gw, handles=True)
    topo.apply(topo.with_config(attached=frozenset(a for sb in topo.sandboxes for a in sb.addresses)))
    after = netplumb.list_table(netns=topo.gw, handles=True)
    assert _rules(before) == _rules(after), "attaching a sandbox must not change the rules"
    assert str(sb3.v4) in after and str(sb3.v4) not in before
    assert _without_elements(before) == _without_elements(after)
    assert _body(gw.curl("sb3", "http://198.18.1.3/")) == "STANDIN 198.18.1.3 80"
    assert _body(gw.curl("sb3", "http://[2001:db8:1::3]/")) == "STANDIN 2001:db8:1::3 80"


def _rules(listing: str) -> list[str]:
    """Rule lines without their handles (handles are renumbered when the table is recreated)."""
    return [re.sub(r" # handle \d+$", "", line.strip()) for line in listing.splitlines() if "# handle" in line]


def _without_elements(listing: str) -> str:
    listing = re.sub(r"elements = \{[^}]*\}", "elements = {...}", listing)
    return re.sub(r" # handle \d+", "", listing)


@pytest.mark.root
def test_reapplying_is_idempotent_and_a_refused_ruleset_changes_nothing(gw: Gateway) -> None:
    topo = gw.topo
    first = netplumb.list_table(netns=topo.gw)
    topo.apply(gw.baseline)
    topo.apply(gw.baseline)
    assert netplumb.list_table(netns=topo.gw) == first
    broken = render_ruleset(gw.baseline).replace("counter drop", "counter dropp", 1)
    with pytest.raises(GatewayError) as caught:
        netplumb.apply_ruleset(broken, netns=topo.gw)
    assert caught.value.code == "NFT_REJECTED"
    assert netplumb.list_table(netns=topo.gw) == first  # the whole transaction was refused
    assert _body(gw.curl("sb1", "http://198.18.1.1/")) == "STANDIN 198.18.1.1 80"


@pytest.mark.root
def test_without_the_listener_nothing_is_forwarded(gw: Gateway) -> None:
    topo = gw.topo
    # Control: without the table, this topology *would* forward the sandbox to the origin.
    netplumb.delete_table(netns=topo.gw)
    try:
        assert _body(gw.curl("sb1", "http://198.18.1.1/")) == "ORIGIN ::ffff:198.18.1.1 80"
    finally:
        topo.apply(gw.baseline)
    gw.stop_standin()
    urls = ("http://198.18.1.1/", "http://198.18.1.2:8443/", "http://[2001:db8:1::1]/")
    outs = parallel(*(lambda url=url: gw.curl("sb1", url) for url in urls), lambda: gw.udp("sb1", "198.18.0.53", 53))
    for url, out in zip(urls, outs[:3], strict=True):
        assert out.returncode != 0 and "ORIGIN" not in out.stdout, (url, out.stdout)
    assert outs[3] == "NOREPLY"
    assert not _sink_lines(gw)
    gw.start_standin()
    assert _body(gw.curl("sb1", "http://198.18.1.1/")) == "STANDIN 198.18.1.1 80"


@pytest.mark.root
def test_reconcile_adds_missing_moves_and_removes_stale_host_routes(gw: Gateway) -> None:
    topo = gw.topo
    sb1, sb2, _ = topo.sandboxes
    subnets = (SANDBOX_V4, SANDBOX_V6)
    stale = ipaddress.ip_address("10.75.0.99")
    netplumb.attach_sandbox(stale, sb1.gw_interface, netns=topo.gw)
    netplumb.detach_sandbox(sb2.v6, netns=topo.gw)
    netplumb.attach_sandbox(sb2.v4, sb1.gw_interface, netns=topo.gw)  # on the wrong interface
    # A route somebody else owns, inside the subnets: reconcile must leave it alone.
    topo.run("gw", ["ip", "route", "add", "10.75.0.200/32", "dev", sb1.gw_interface])
    desired = {a: sb.gw_interface for sb in (sb1, sb2) for a in sb.addresses}
    desired[ipaddress.ip_address("10.75.0.77")] = ""  # in the store, interface not up yet
    result = netplumb.reconcile(desired, {a: i for a, i in desired.items() if i}, netns=topo.gw, subnets=subnets)
    assert result.removed == (stale,)
    assert result.added == (sb2.v6,)
    assert result.moved == (sb2.v4,)
    assert result.unplaced == (ipaddress.ip_address("10.75.0.77"),)
    assert not result.errors
    routes = netplumb.attached_routes(netns=topo.gw, subnets=subnets)
    assert routes == {a: sb.gw_interface for sb in (sb1, sb2) for a in sb.addresses}
    assert "10.75.0.200" in topo.run("gw", ["ip", "route"]).stdout
    topo.run("gw", ["ip", "route", "del", "10.75.0.200/32"])
    again = netplumb.reconcile(desired, {a: i for a, i in desired.items() if i}, netns=topo.gw, subnets=subnets)
    assert not again.changed
    assert _body(gw.curl("sb2", "http://[2001:db8:1::1]/")) == "STANDIN 2001:db8:1::1 80"
