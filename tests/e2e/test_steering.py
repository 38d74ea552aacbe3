"""Steering through the product: `gateway run --data-plane --steer` in a gateway namespace, driven only as an
operator drives it (config file, policy file, control API, `gateway sandbox attach`), observed with real
clients (curl, dig, Python sockets) and servers that say what reached them.

The topology (tests/netns.py) plays the VMM: namespaces and veths. The fixture attaches every sandbox
interface with `gateway sandbox attach --interface vifN.0 --address ...` and starts `gateway run`, which
sets the sysctls, the ip rules and the nftables table itself. sb1 (allowlisted: allowed.test and the
origin CIDRs) and sb2 (unrestricted) are in the store; sb3 is attached but has no record. The internet
namespace routes the sandbox subnets back to the gateway, so every "nothing arrives" assertion would
fail if the gateway forwarded the packet.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests import authdns
from tests.factory import EGRESS_ZONE, NAMESPACE_API, EgressEnv, wait_until
from tests.netns import GATEWAY_V4, GATEWAY_V6, INET_V4, ORIGIN_SERVER, Topology, live_namespaces

API = NAMESPACE_API
EGRESS_PORT = 15001
#: The gateway's own addresses inside the sandbox subnets (on its loopback), as a resolver a sandbox is given.
GW_SANDBOX_V4, GW_SANDBOX_V6 = "10.75.255.254", "fdd4:1476:6c7e::fffe"
#: Inside the sandbox subnets, attached to nothing at all.
NOBODY_V4 = "10.75.0.254"
UNATTACHED_INTERVAL = 1

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
    print("REPLY", peer[0], peer[1], data[:10].decode(errors="replace") if data.startswith(b"UDP") else "dns")
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
    s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print("OK", data.split(b"\r\n\r\n", 1)[-1].decode().strip() or "<empty>")
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


def _policies() -> dict[str, Any]:
    return {
        "templates": {},
        "sandboxes": {
            "sb1": {
                "id": "sb1",
                "addresses": ["10.75.0.1", "fdd4:1476:6c7e::1"],
                "profile": "allowlisted",
                "egress": {"allow_hosts": ["allowed.test"], "allow_cidrs": ["198.18.1.0/24", "2001:db8:1::/64"]},
            },
            "sb2": {"id": "sb2", "addresses": ["10.75.0.2", "fdd4:1476:6c7e::2"], "profile": "unrestricted"},
        },
    }


class Steer:
    """The running gateway (`EgressEnv` from test_egress) plus the clients and observers these tests use."""

    def __init__(self, env: EgressEnv) -> None:
        self.env = env
        self.topo = env.topo
        self.sink: subprocess.Popen[Any] | None = None
        self.sink_seen: list[str] = []

    def curl(self, sb: str, url: str, timeout: float = 3.0) -> subprocess.CompletedProcess[str]:
        argv = ["curl", "-sS", "-g", "--connect-timeout", str(min(timeout, 1.5)), "-m", str(timeout), url]
        return self.topo.run(sb, argv, check=False, timeout=timeout + 5)

    def tcp(self, sb: str, host: str, port: int, source: str = "") -> str:
        return self.topo.python(sb, TCP_CLIENT, host, str(port), *([source] if source else []), timeout=10).strip()

    def udp(self, sb: str, host: str, port: int, source: str = "") -> str:
        return self.topo.python(sb, UDP_CLIENT, host, str(port), *([source] if source else []), timeout=10).strip()

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        argv = ["curl", "-sS", "-m", "5", "-X", method, "-w", "\n%{http_code}", f"{API}{path}"]
        if body is not None:
            kind = "application/merge-patch+json" if method == "PATCH" else "application/json"
            argv += ["-H", f"Content-Type: {kind}", "--data", json.dumps(body)]
        out = self.topo.run("gw", argv, check=False, timeout=15)
        text, _, code = out.stdout.rpartition("\n")
        return int(code or 0), json.loads(text) if text.strip() else None

    def sink_lines(self) -> list[str]:
        """Datagrams the internet's UDP sink got so far (non-blocking), accumulated."""
        if self.sink is not None and self.sink.stdout is not None:
            fd = self.sink.stdout.fileno()
            os.set_blocking(fd, False)
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.sink_seen += [line for line in chunk.decode().splitlines() if line.startswith("GOT")]
        return list(self.sink_seen)

    def table(self, *, handles: bool = False) -> str:
        """The table as the kernel has it, without counters and without the unattached sources it remembers
        for a moment (their elements come and go with traffic)."""
        argv = ["nft", "-s", *(["-a"] if handles else []), "list", "table", "inet", "sandbox_gateway"]
        listing = self.topo.run("gw", argv).stdout
        return re.sub(r"(set unattached_v[46] \{[^}]*?)\n\t\telements = \{[^}]*\}", r"\1", listing)

    def sysctl(self, key: str) -> str:
        return self.topo.run("gw", ["cat", f"/proc/sys/{key}"]).stdout.strip()


@pytest.fixture(scope="module")
def steer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Steer]:
    with Topology(sandboxes=3, origins=3) as topo:
        env = EgressEnv(topo, tmp_path_factory.mktemp("steering"))
        env.environment["GATEWAY_EGRESS__UNATTACHED_LOG_INTERVAL"] = str(UNATTACHED_INTERVAL)
        s = Steer(env)
        # The gateway namespace starts as a fresh host would: no forwarding, router advertisements accepted.
        assert (s.sysctl("net/ipv4/ip_forward"), s.sysctl("net/ipv6/conf/all/forwarding")) == ("0", "0")
        assert s.sysctl("net/ipv6/conf/up0/accept_ra") == "1"
        topo.attach_with_cli()
        for address in (f"{GW_SANDBOX_V4}/32", f"{GW_SANDBOX_V6}/128"):
            topo.run("gw", ["ip", "addr", "add", address, "dev", "lo"])
        topo.start_python("inet", authdns.ZONE_SERVER_SCRIPT, str(INET_V4), json.dumps(EGRESS_ZONE))
        topo.start_origin(ports=(80, 8443, 5432))
        s.sink = topo.start_python("inet", UDP_SINK, "443", "5000")
        for index in (1, 2):  # services inside the sandboxes, for the private-link tests
            topo.start_python(f"sb{index}", ORIGIN_SERVER, "8080", "8081")
        # ... and on port 53 of sb2, which DNS to its address must never reach.
        topo.start_python("sb2", ORIGIN_SERVER, "53")
        topo.start_python("sb2", UDP_SINK, "5000", "5001", "53")
        # Stand-in for other services of the gateway host (Redis, SSH...), on every address it has.
        topo.start_python("gw", ORIGIN_SERVER, "6379")
        env.write_policies(_policies())
        env.start_gateway()
        yield s
    assert live_namespaces(topo.prefix) == []


def parallel[T](*calls: Callable[[], T]) -> list[T]:
    """Run client probes at once: negative checks each wait for a timeout, so they overlap."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def _refused(out: subprocess.CompletedProcess[str]) -> bool:
    return out.returncode != 0 and "ORIGIN" not in out.stdout


# --------------------------------------------------------------------------- tests


@pytest.mark.root
def test_run_steer_sets_forwarding_and_keeps_router_advertisements_on_the_hosts_own_interfaces(
    steer: Steer,
) -> None:
    assert steer.sysctl("net/ipv4/ip_forward") == "1"
    assert steer.sysctl("net/ipv6/conf/all/forwarding") == "1"
    assert steer.sysctl("net/ipv6/conf/up0/accept_ra") == "2"  # the uplink still takes RAs while forwarding
    assert steer.sysctl("net/ipv6/conf/vif1.0/accept_ra") == "0"  # never from a sandbox (set by attach)
    [changed] = steer.env.log_events("steering.sysctls_set")
    assert changed["net.ipv6.conf.up0.accept_ra"] == "2" and changed["net.ipv4.ip_forward"] == "1"
    assert "10.75.0.1 dev vif1.0 proto 247" in steer.topo.run("gw", ["ip", "route"]).stdout  # from the attach CLI


@pytest.mark.root
def test_tcp_to_any_port_reaches_the_engine_with_the_original_destination(steer: Steer) -> None:
    # The engine dials the original destination (allowed by sb1's CIDRs): the origin says which one it got.
    assert steer.curl("sb1", "http://198.18.1.1/").stdout.strip() == "ORIGIN ::ffff:198.18.1.1 80"
    assert steer.curl("sb1", "http://198.18.1.2:8443/").stdout.strip() == "ORIGIN ::ffff:198.18.1.2 8443"
    assert steer.curl("sb2", "http://[2001:db8:1::3]:8443/").stdout.strip() == "ORIGIN 2001:db8:1::3 8443"
    assert steer.tcp("sb2", "198.18.1.3", 5432) == "OK ORIGIN ::ffff:198.18.1.3 5432"
    # An address nobody routes is still the engine's to decide (sb1's CIDRs do not allow it): its 403.
    refused = steer.tcp("sb1", "203.0.113.77", 5432)
    first, *rest = refused.splitlines()
    assert first == "OK Blocked by sandbox egress policy: no hostname (SNI/Host) and address not in allow_cidrs"
    assert rest and rest[-1].startswith("Denial id: "), refused
    assert wait_until(lambda: steer.env.logged_flows(orig_dst_addr="203.0.113.77"), 5)
    seen = {(f["src_addr"], f["orig_dst_addr"], f["orig_dst_port"], f["verdict"]) for f in steer.env.logged_flows()}
    assert ("10.75.0.1", "198.18.1.2", 8443, "allow") in seen  # the peer is the sandbox's own address: no NAT
    assert ("fdd4:1476:6c7e::2", "2001:db8:1::3", 8443, "allow") in seen
    assert ("10.75.0.1", "203.0.113.77", 5432, "deny") in seen


@pytest.mark.root
@pytest.mark.parametrize(
    "resolver",
    [
        GW_SANDBOX_V4,
        GW_SANDBOX_V6,
        NOBODY_V4,
        "fdd4:1476:6c7e::fe",
        "10.75.0.2",
        "fdd4:1476:6c7e::2",
        "198.18.0.53",
        "192.0.2.53",
        "2001:db8:1::53",
        str(GATEWAY_V4),
    ],
)
def test_dns_to_any_address_is_answered_by_the_interceptor(steer: Steer, resolver: str) -> None:
    """Also a resolver inside the sandbox subnets: the gateway's own address there, one nobody holds, or another
    sandbox's (sb2 serves UDP and TCP on port 53: an answer from it would not parse as DNS)."""
    for transport in ("+notcp", "+tcp"):
        allowed = steer.env.dig("sb1", transport, f"@{resolver}", "allowed.test", "A", "+short")
        assert allowed.split() == ["198.18.1.1"], (resolver, transport, allowed)
        denied = steer.env.dig("sb1", transport, f"@{resolver}", "denied.test", "A")
        assert "status: NXDOMAIN" in denied and "blocked by sandbox policy" in denied, (resolver, denied)
    asked = [q for q in steer.env.dns_log("sb1") if q.get("name") in ("allowed.test", "denied.test")]
    assert len(asked) >= 4


@pytest.mark.root
def test_other_ports_to_addresses_inside_the_sandbox_subnets_and_the_gateway_stay_dropped(steer: Steer) -> None:
    # Control: the stand-in service answers on the gateway's addresses, from the gateway and the internet.
    assert steer.tcp("gw", GW_SANDBOX_V4, 6379) == f"OK ORIGIN ::ffff:{GW_SANDBOX_V4} 6379"
    assert steer.tcp("inet", str(GATEWAY_V4), 6379).startswith("OK ORIGIN")
    steer.topo.run("gw", ["ip", "addr", "add", "198.18.0.3/32", "dev", "up0"])  # an address nobody configured
    targets = [
        (GW_SANDBOX_V4, 6379),
        (GW_SANDBOX_V4, 53 + 1),
        (GW_SANDBOX_V6, 6379),
        (NOBODY_V4, 80),
        (str(GATEWAY_V4), 6379),
        (str(GATEWAY_V6), 8470),
        ("198.18.0.3", 6379),
        ("fe80::1%eth0", 6379),  # the gateway's link-local on the sandbox's own link
        (str(GATEWAY_V4), EGRESS_PORT),
    ]
    try:
        outs = parallel(*(lambda t=t: steer.tcp("sb1", t[0], t[1]) for t in targets))
    finally:
        steer.topo.run("gw", ["ip", "addr", "del", "198.18.0.3/32", "dev", "up0"])
    for target, out in zip(targets, outs, strict=True):
        assert out.startswith("FAIL") and "ORIGIN" not in out, (target, out)
    # Dropped by the table, not refused by the engine: none of them is a flow.
    probed = (6379, 54, 8470, EGRESS_PORT)
    assert not [f for f in steer.env.logged_flows(src_addr="10.75.0.1") if f["orig_dst_port"] in probed]
    # The TPROXY port is not reachable directly from the internet either.
    assert steer.tcp("inet", str(GATEWAY_V4), EGRESS_PORT).startswith("FAIL")


@pytest.mark.root
def test_quic_other_udp_and_icmp_get_nowhere(steer: Steer) -> None:
    assert steer.udp("gw", "198.18.1.1", 443).endswith(" 443 UDP-ORIGIN")  # control
    assert wait_until(lambda: len(steer.sink_lines()) == 1, 3)
    results = parallel(
        lambda: steer.udp("sb2", "198.18.1.1", 443),  # unrestricted: still no UDP
        lambda: steer.udp("sb2", "2001:db8:1::2", 443),
        lambda: steer.udp("sb1", "198.18.1.1", 5000),
        lambda: steer.topo.python("sb2", ICMP_CLIENT, "198.18.1.1").strip(),
        lambda: steer.topo.python("sb2", ICMP_CLIENT, "2001:db8:1::1").strip(),
        lambda: steer.topo.python("sb1", ICMP_CLIENT, "fe80::1%eth0").strip(),  # not even the gateway answers
    )
    assert results == ["NOREPLY"] * 6
    assert steer.topo.python("inet", ICMP_CLIENT, "198.18.1.1").strip().startswith("ECHO-REPLY")  # control
    assert len(steer.sink_lines()) == 1


@pytest.mark.root
def test_private_links_from_the_api_open_one_direction_one_protocol_their_ports_and_close_again(
    steer: Steer,
) -> None:
    sb2_v4, sb2_v6, sb1_v4 = "10.75.0.2", "fdd4:1476:6c7e::2", "10.75.0.1"
    url4, url6 = f"http://{sb2_v4}:8080/", f"http://[{sb2_v6}]:8080/"
    assert all(map(_refused, parallel(lambda: steer.curl("sb1", url4), lambda: steer.curl("sb1", url6))))
    applied = len(steer.env.log_events("steering.applied"))

    # A link changes no address: the table must be re-applied anyway.
    code, _ = steer.api("PATCH", "/v1/sandboxes/sb2", {"private_links": [{"source": "sb1", "ports": [8080]}]})
    assert code == 200
    assert wait_until(lambda: steer.curl("sb1", url4, timeout=1).returncode == 0, 10)
    assert len(steer.env.log_events("steering.applied")) == applied + 1
    # Forwarded, not proxied: sandbox 2's own server answers and sees sandbox 1's address.
    assert steer.curl("sb1", url4).stdout.strip() == f"ORIGIN ::ffff:{sb2_v4} 8080"
    assert steer.curl("sb1", url6).stdout.strip() == f"ORIGIN {sb2_v6} 8080"
    assert steer.tcp("sb2", GW_SANDBOX_V4, 8080).startswith("FAIL")  # unrelated: unchanged
    refused = parallel(
        lambda: steer.curl("sb1", f"http://{sb2_v4}:8081/"),  # not the linked port
        lambda: steer.curl("sb2", f"http://{sb1_v4}:8080/"),  # not the other direction
        lambda: steer.curl("sb2", "http://[fdd4:1476:6c7e::1]:8080/"),
        lambda: steer.curl("sb3", url4),  # not another sandbox
    )
    assert all(map(_refused, refused))
    # A TCP link opens no UDP, not even on its port, and no ICMP.
    assert (
        parallel(
            lambda: steer.udp("sb1", sb2_v4, 8080),
            lambda: steer.udp("sb1", sb2_v4, 5000),
            lambda: steer.topo.python("sb1", ICMP_CLIENT, sb2_v4).strip(),
            lambda: steer.topo.python("sb1", ICMP_CLIENT, sb2_v6).strip(),
        )
        == ["NOREPLY"] * 4
    )

    udp_link = {"source": "sb1", "ports": [5000], "protocol": "udp"}
    code, body = steer.api("PATCH", "/v1/sandboxes/sb2", {"private_links": [udp_link]})
    assert code == 200 and body["private_links"] == [udp_link]
    assert wait_until(lambda: steer.udp("sb1", sb2_v4, 5000).startswith("REPLY"), 10)
    assert steer.udp("sb1", sb2_v6, 5000) == f"REPLY {sb2_v6} 5000 UDP-ORIGIN"
    assert parallel(lambda: steer.udp("sb1", sb2_v4, 5001), lambda: steer.udp("sb2", sb1_v4, 5000)) == [
        "NOREPLY",
        "NOREPLY",
    ]
    assert _refused(steer.curl("sb1", url4))  # the TCP link is gone with the replaced list

    # An invalid link changes nothing: refused with its field, the UDP link stays.
    code, error = steer.api("PATCH", "/v1/sandboxes/sb2", {"private_links": [{"source": "sb1", "protocol": "icmp"}]})
    assert (code, error["code"], error["field"]) == (400, "INVALID_PROTOCOL", "private_links[0].protocol")
    code, _ = steer.api("PATCH", "/v1/sandboxes/sb2", {"private_links": None})
    assert code == 200
    assert wait_until(lambda: steer.udp("sb1", sb2_v4, 5000) == "NOREPLY", 10)
    # Never via the engine (DNS to sb2's addresses is the interceptor's, and a flow of its own).
    engine = [f for f in steer.env.logged_flows() if f["protocol"] != "dns"]
    assert not [f for f in engine if f["orig_dst_addr"] in (sb2_v4, sb2_v6)]


@pytest.mark.root
def test_a_private_link_to_a_record_holding_the_gateways_own_address_reaches_nothing(steer: Steer) -> None:
    # A record may name an address the gateway holds inside the sandbox subnets, with a link from sb1 to every
    # port: the link is in the table, but what it would deliver is the gateway's own, and that stays dropped.
    record: dict[str, Any] = {"id": "gwfake", "addresses": [GW_SANDBOX_V4, GW_SANDBOX_V6], "profile": "isolated"}
    record["private_links"] = [{"source": "sb1"}, {"source": "sb1", "protocol": "udp"}]
    created = steer.api("POST", "/v1/sandboxes", record)
    assert created[0] == 201, created
    try:
        assert wait_until(lambda: GW_SANDBOX_V4 in steer.table() and "link_v4" in steer.table(), 10)
        assert wait_until(lambda: f"10.75.0.1 . {GW_SANDBOX_V4} . tcp" in steer.table(), 10), steer.table()
        outs = parallel(
            lambda: steer.tcp("sb1", GW_SANDBOX_V4, 6379),
            lambda: steer.tcp("sb1", GW_SANDBOX_V6, 6379),
            lambda: steer.tcp("sb1", GW_SANDBOX_V4, 8470),
        )
        assert all(out.startswith("FAIL") and "ORIGIN" not in out for out in outs), outs
    finally:
        assert steer.api("DELETE", "/v1/sandboxes/gwfake")[0] in (200, 204)
    assert wait_until(lambda: GW_SANDBOX_V4 not in steer.table(), 10)


@pytest.mark.root
def test_the_gateway_itself_reaches_sandbox_ports_and_the_internet_cannot(steer: Steer) -> None:
    # Connections the gateway opens towards a sandbox (the ingress tunnel) get their replies back.
    assert steer.curl("gw", "http://10.75.0.1:8080/").stdout.strip() == "ORIGIN ::ffff:10.75.0.1 8080"
    assert steer.curl("gw", "http://[fdd4:1476:6c7e::2]:8081/").stdout.strip() == "ORIGIN fdd4:1476:6c7e::2 8081"
    outs = parallel(
        lambda: steer.curl("inet", "http://10.75.0.1:8080/"),
        lambda: steer.curl("inet", "http://[fdd4:1476:6c7e::2]:8081/"),
    )
    assert all(map(_refused, outs))


@pytest.mark.root
def test_connections_with_the_engines_dial_mark_cannot_reach_the_gateway_itself(steer: Steer) -> None:
    """The output guard in the table `gateway run` applied: a socket marked as the engine marks its dials
    (egress.dial_mark, 2) is rejected towards the gateway, loopback and the sandboxes, whatever decided it."""
    code = r"""
import socket, sys
for host, port in ((sys.argv[1], 6379), ("127.0.0.1", 8470), ("10.75.0.1", 8080), ("198.18.1.1", 80)):
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
    lines = steer.topo.python("gw", code, str(GATEWAY_V4)).splitlines()
    assert [line.split()[1:] for line in lines[:3]] == [["refused", "113"]] * 3, lines  # EHOSTUNREACH at once
    assert lines[3] == "198.18.1.1 connected", lines


def _rules(listing: str) -> list[str]:
    """Rule lines without their handles (handles are renumbered when the table is recreated)."""
    return [re.sub(r" # handle \d+$", "", line.strip()) for line in listing.splitlines() if "# handle" in line]


@pytest.mark.root
def test_an_attached_source_without_a_record_is_dropped_counted_and_logged_until_the_store_has_it(
    steer: Steer,
) -> None:
    topo = steer.topo
    outs = parallel(
        lambda: steer.tcp("sb3", "198.18.1.1", 80),
        lambda: steer.udp("sb3", "198.18.0.53", 53),
        lambda: steer.tcp("sb3", "2001:db8:1::1", 80),
    )
    assert [out.split()[0] for out in outs] == ["FAIL", "NOREPLY", "FAIL"], outs
    assert not steer.env.logged_flows(src_addr="10.75.0.3")

    def logged() -> set[str]:
        return {e["address"] for e in steer.env.log_events("steering.unattached_source")}

    assert wait_until(lambda: {"10.75.0.3", "fdd4:1476:6c7e::3"} <= logged(), 10), logged()
    # Every sandbox's link-local chatter (router solicitations, MLD) is dropped, but it is no unattached source.
    assert not [address for address in logged() if address.startswith("fe80:")], logged()
    code, status = steer.api("GET", "/v1/status")
    assert code == 200 and status["data_plane"]["steering"] is True and status["data_plane"]["steering_applied"]
    dropped = status["data_plane"]["unattached_dropped"]
    assert dropped >= 3, status
    # Once per address per interval, however many packets: a burst of 30 more is 30 counted, not 30 logged.
    before = len([e for e in steer.env.log_events("steering.unattached_source") if e["address"] == "10.75.0.3"])
    sink_before = len(steer.sink_lines())
    topo.python("sb3", "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "[s.sendto(b'x', ('198.18.1.1', 443)) for _ in range(30)]")  # fmt: skip

    def counted() -> int:
        return int(steer.api("GET", "/v1/status")[1]["data_plane"]["unattached_dropped"])

    assert wait_until(lambda: counted() >= dropped + 30, 10)
    after = [e for e in steer.env.log_events("steering.unattached_source") if e["address"] == "10.75.0.3"]
    assert len(after) - before <= 2, after  # at most one per interval while the burst is read
    assert len(steer.sink_lines()) == sink_before, "an unattached source's datagram reached the internet"

    # Spoofing: sb1 borrows sb2's address (attached elsewhere) and one nobody has: the reverse-path check.
    spoofed = ("10.75.0.2", "fdd4:1476:6c7e::2", "10.75.0.50")
    for address in spoofed:
        prefix = 128 if ":" in address else 32
        topo.run(
            "sb1", ["ip", "addr", "add", f"{address}/{prefix}", "dev", "eth0", *(["nodad"] if prefix == 128 else [])]
        )
    try:
        outs = parallel(
            lambda: steer.tcp("sb1", "198.18.1.1", 80, source="10.75.0.2"),
            lambda: steer.udp("sb1", "198.18.0.53", 53, source="10.75.0.2"),
            lambda: steer.tcp("sb1", "2001:db8:1::1", 80, source="fdd4:1476:6c7e::2"),
            lambda: steer.udp("sb1", "2001:db8:1::53", 53, source="fdd4:1476:6c7e::2"),
            lambda: steer.udp("sb1", "198.18.0.53", 53, source="10.75.0.50"),
        )
    finally:
        for address in spoofed:
            topo.run("sb1", ["ip", "addr", "del", f"{address}/{128 if ':' in address else 32}", "dev", "eth0"])
    assert [out.split()[0] for out in outs] == ["FAIL", "NOREPLY", "FAIL", "NOREPLY", "NOREPLY"], outs

    # Given a record through the API, sb3 is steered; its addresses change set elements only, never rules.
    rules = _rules(steer.table(handles=True))
    record = {"id": "sb3", "addresses": ["10.75.0.3", "fdd4:1476:6c7e::3"], "profile": "unrestricted"}
    assert steer.api("POST", "/v1/sandboxes", record)[0] == 201
    assert wait_until(lambda: steer.curl("sb3", "http://198.18.1.3/", timeout=1).returncode == 0, 10)
    assert steer.curl("sb3", "http://[2001:db8:1::3]/").stdout.strip() == "ORIGIN 2001:db8:1::3 80"
    after_table = steer.table(handles=True)
    assert _rules(after_table) == rules and "10.75.0.3" in after_table


@pytest.mark.root
def test_attach_refuses_an_interface_the_table_does_not_filter_by_name(steer: Steer) -> None:
    """Forwarding is on (`--steer`): from an interface outside egress.sandbox_interfaces, only sources inside the
    sandbox subnets are classified, so a spoofed source outside them would be forwarded to the internet
    unfiltered. Attaching such an interface is refused before anything changes."""
    topo = steer.topo
    topo.run("gw", ["ip", "link", "add", "tapx0", "type", "veth", "peer", "name", "eth1", "netns", topo.ns("sb3")])
    try:
        topo.run("gw", ["ip", "link", "set", "tapx0", "up"])
        attach = [sys.executable, "-m", "gateway.cli", "sandbox", "attach", "--interface", "tapx0"]
        out = topo.run("gw", [*attach, "--address", "10.75.0.9"], check=False, timeout=30)
        assert out.returncode == 2 and out.stderr.startswith("INTERFACE_NOT_STEERED: 'tapx0'"), out.stdout + out.stderr
        assert "tapx0" not in topo.run("gw", ["ip", "route"]).stdout
        assert steer.sysctl("net/ipv4/conf/tapx0/proxy_arp") == "0"
        # The same interface under a name the table knows is attached.
        topo.run("gw", ["ip", "link", "set", "tapx0", "name", "vifx0"])
        out = topo.run("gw", [*attach[:-1], "vifx0", "--address", "10.75.0.9"], check=False, timeout=30)
        assert out.returncode == 0 and "10.75.0.9 dev vifx0" in topo.run("gw", ["ip", "route"]).stdout, out.stderr
    finally:
        for name in ("tapx0", "vifx0"):
            topo.run("gw", ["ip", "link", "del", name], check=False)


@pytest.mark.root
def test_reapplying_is_idempotent_and_a_refused_ruleset_changes_nothing(steer: Steer) -> None:
    first = steer.table()
    applied = len(steer.env.log_events("steering.applied"))
    # A change that steering does not depend on re-applies nothing.
    assert steer.api("PATCH", "/v1/sandboxes/sb1", {"labels": {"team": "a"}})[0] == 200
    assert wait_until(lambda: steer.api("GET", "/v1/sandboxes/sb1")[1]["labels"] == {"team": "a"}, 5)
    code, _ = steer.api("PATCH", "/v1/sandboxes/sb2", {"private_links": ["sb1"]})
    assert code == 200 and wait_until(lambda: len(steer.env.log_events("steering.applied")) == applied + 1, 10)
    code, _ = steer.api("PATCH", "/v1/sandboxes/sb2", {"private_links": None})
    assert code == 200 and wait_until(lambda: len(steer.env.log_events("steering.applied")) == applied + 2, 10)
    assert steer.table() == first  # back to the same table
    # An operator's broken edit of the table is refused by the kernel as a whole.
    broken = "add table inet sandbox_gateway\nadd rule inet sandbox_gateway from_sandbox counter dropp\n"
    out = steer.topo.run("gw", ["nft", "-f", "-"], input=broken, check=False)
    assert out.returncode != 0 and steer.table() == first
    assert steer.curl("sb1", "http://198.18.1.1/").stdout.strip() == "ORIGIN ::ffff:198.18.1.1 80"


@pytest.mark.root
def test_without_the_gateway_process_nothing_is_forwarded_and_a_restart_reconciles(steer: Steer) -> None:
    env, topo = steer.env, steer.topo
    assert env.gateway is not None
    assert not env.log_events("steering.apply_failed")
    table = steer.table()
    os.killpg(env.gateway.pid, signal.SIGKILL)
    env.gateway.wait(5)
    assert steer.table() == table  # the table outlives the process
    urls = ("http://198.18.1.1/", "http://198.18.1.2:8443/", "http://[2001:db8:1::1]/")
    outs = parallel(
        *(lambda url=url: steer.curl("sb2", url) for url in urls), lambda: steer.udp("sb2", "198.18.0.53", 53)
    )
    assert all(isinstance(o, subprocess.CompletedProcess) and _refused(o) for o in outs[:3]), outs
    assert outs[3] == "NOREPLY", outs
    # Control: without the table this topology *would* forward the sandbox to the origin.
    topo.run("gw", ["nft", "delete", "table", "inet", "sandbox_gateway"])
    assert steer.curl("sb2", "http://198.18.1.1/").stdout.strip() == "ORIGIN ::ffff:198.18.1.1 80"
    # Restarted, the gateway writes the same table from the store again (sb3 was added through the API).
    env.start_gateway()
    assert steer.table() == table
    assert steer.curl("sb3", "http://198.18.1.1/").stdout.strip() == "ORIGIN ::ffff:198.18.1.1 80"
    assert _refused(steer.curl("sb1", "http://10.75.0.2:8080/"))
