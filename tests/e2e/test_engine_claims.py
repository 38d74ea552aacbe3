"""Engine claims through `gateway run --data-plane --steer` (the egress module's topology and gateway, by import):
a ClientHello cut into many TLS records and TCP segments by a raw client in a sandbox is still read for its SNI
and decided by it, and special-purpose destinations are refused unless a CIDR rule allows them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# The egress module's gateway (the fixture `env`), started once for this module too (sb1 allowlisted, sb2 unrestricted).
from tests.factory import BANNER_CLIENT, EgressEnv, egress_env, pin  # noqa: F401

SPLIT_HELLO_CLIENT = r"""
import socket, ssl, sys
address, name, ca, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ssl.create_default_context(cafile=ca).wrap_bio(incoming, outgoing, server_hostname=name)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
assert hello[0] == 22 and int.from_bytes(hello[3:5], "big") == len(hello) - 5, "one handshake record"
s = socket.create_connection((address, 443), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
body = hello[5:]
for i in range(0, len(body), size):  # the one handshake message over many records, each in two writes
    part = body[i : i + size]
    record = hello[:3] + len(part).to_bytes(2, "big") + part
    s.sendall(record[:2])
    s.sendall(record[2:])
def pump():
    data = s.recv(65536)
    if not data:
        raise EOFError
    incoming.write(data)
try:
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if pending := outgoing.read():
                s.sendall(pending)
            pump()
    tls.write(f"GET /split HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
    s.sendall(outgoing.read())
    answer = b""
    while True:
        try:
            chunk = tls.read(65536)
            if not chunk:
                break
            answer += chunk
        except ssl.SSLWantReadError:
            if pending := outgoing.read():
                s.sendall(pending)
            try:
                pump()
            except EOFError:
                break
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
    print("OK", answer.split(b"\r\n\r\n", 1)[-1].decode().strip())
except ssl.SSLError as exc:
    print("TLSERR", exc.reason)
except (ConnectionResetError, EOFError):
    print("RESET")
"""


@pytest.mark.root
@pytest.mark.parametrize("size", [1, 7, 100])
def test_a_client_hello_split_over_records_and_segments_is_decided_by_its_sni(env: EgressEnv, size: int) -> None:
    out = env.topo.python("sb1", SPLIT_HELLO_CLIENT, "198.18.1.1", "allowed.test", str(env.ca), str(size)).strip()
    assert out == "OK ORIGIN 198.18.1.1 host=allowed.test sni=allowed.test path=/split", out
    out = env.topo.python("sb1", SPLIT_HELLO_CLIENT, "198.18.1.1", "denied.test", str(env.ca), str(size)).strip()
    assert out in ("TLSERR TLSV1_ALERT_ACCESS_DENIED", "RESET"), out


@pytest.fixture
def without_public_ranges(env: EgressEnv) -> Iterator[EgressEnv]:
    """The same gateway restarted without declaring the test internet (198.18/15) public, so its addresses are
    what they are: benchmarking, special-purpose; restarted as the module had it afterwards."""

    def restart(**environment: str) -> None:
        assert env.gateway is not None
        env.stop_gateway(15)
        env.environment.update(environment)
        env.start_gateway()

    restart(GATEWAY_EGRESS__PUBLIC_RANGES="[]")
    try:
        yield env
    finally:
        env.environment.pop("GATEWAY_EGRESS__PUBLIC_RANGES")
        restart()


@pytest.mark.root
def test_special_purpose_destinations_need_an_explicit_cidr_rule(without_public_ranges: EgressEnv) -> None:
    env = without_public_ranges
    # allowed by name, but the name's address is special-purpose: refused, in every profile
    out = env.curl("sb1", "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
    assert "alert access denied" in out.stderr.lower(), out.stdout + out.stderr
    out = env.curl("sb2", "http://198.18.1.3/", "-i")
    assert out.stdout.startswith("HTTP/1.1 403"), out.stdout
    assert "benchmarking address (198.18.0.0/15)" in out.stdout, out.stdout
    # sb1's allow_cidrs 198.18.1.4/32 names it: that rule, and only that, lets it through
    banner = env.topo.python("sb1", BANNER_CLIENT, "198.18.1.4", "22").strip()
    assert banner == "DATA SSH-2.0-TestOrigin 198.18.1.4|ECHO SSH-2.0-TestClient|", banner
    assert env.topo.python("sb1", BANNER_CLIENT, "198.18.1.3", "22").strip() == "RESET"
