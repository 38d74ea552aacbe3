"""The egress engine end to end: the real `gateway run --data-plane --steer` in a gateway namespace.

The internet namespace runs an authoritative DNS server for the test names (the
gateway's resolver upstream), HTTPS (a test CA made here) and plain HTTP origins on
every origin address that answer with their own identity (local address, Host, SNI),
an SSH-like banner service and an SMTP-like one. Sandboxes use real clients (curl,
openssl s_client, Python sockets). Names in the sandbox are pinned with curl's
`--resolve`: that is exactly how a
sandbox would try to send an allowed name to an address of its choosing. The DNS tests
query the gateway's interceptor with dig, at addresses that are not resolvers at all.
That world (origins, zone, certificates, `EgressEnv` and its `env` fixture) lives in tests/factory.py: the
engine-claims, workers, rate-limit and steering modules build on it too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.factory import (
    BANNER_CLIENT,
    DENIAL_SUFFIX,
    DNS_LIMIT,
    NAMESPACE_API,
    PEEK_CAP,
    SILENT_CLIENTS,
    EgressEnv,
    assert_dns_answer_unlocks_opaque_tcp,
    egress_env,  # noqa: F401  (the fixture `env`)
    egress_policies,
    pin,
    wait_until,
)
from tests.netns import wait_for_line

REPO = Path(__file__).resolve().parents[2]
KEEPALIVE_CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
def exchange(host):
    s.sendall(f"GET /k HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return {"head": data.decode(errors="replace"), "body": "", "closed": True}
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return {"head": head.decode(), "body": body.decode()}
out = [exchange(host) for host in sys.argv[2:]]
print(json.dumps(out))
"""

HALF_CLOSE_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 23), timeout=10)
s.sendall(b"x" * int(sys.argv[2]))
s.shutdown(socket.SHUT_WR)  # half-close: the answer must still come back
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode().strip())
"""

#: Ask `name` (A) `count` times with the same packet but for its id, one after another; print each answer's
#: addresses (one line per answer).
REPEAT_CLIENT = r"""
import socket, sys
from dnslib import DNSRecord
server, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
s.settimeout(3)
query = DNSRecord.question(name, "A")
for qid in range(1, count + 1):
    query.header.id = qid
    s.send(query.pack())
    print(" ".join(str(rr.rdata) for rr in DNSRecord.parse(s.recv(4096)).rr))
"""

#: Send `count` queries for `name` (A, with EDNS) at once from one socket, then collect the answers for at most
#: 8 s; print, in the order sent, {"rcode", "after" (seconds from the burst), "ede" (its text)} or null.
BURST_CLIENT = r"""
import json, socket, sys, time
from dnslib import EDNS0, DNSRecord
server, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
s.settimeout(0.2)
query = DNSRecord.question(name, "A")
query.add_ar(EDNS0(udp_len=1232))
start = time.monotonic()
for qid in range(1, count + 1):
    query.header.id = qid
    s.send(query.pack())
answers = {}
while len(answers) < count and time.monotonic() - start < 8:
    try:
        data = s.recv(4096)
    except TimeoutError:
        continue
    reply = DNSRecord.parse(data)
    ede = [o.data[2:].decode() for rr in reply.ar if rr.rtype == 41 for o in rr.rdata if o.code == 15]
    after = time.monotonic() - start
    answers[reply.header.id] = {"rcode": reply.header.rcode, "after": after, "ede": ede[0] if ede else None}
print(json.dumps([answers.get(qid) for qid in range(1, count + 1)]))
"""

#: A WebSocket handshake for `path` of allowed.test, then (without waiting for the answer to be read) a request
#: for denied.test: WebSocket bytes after a genuine 101 (the origin echoes them), a fronted request otherwise.
UPGRADE_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=6)
s.sendall(
    f"GET {sys.argv[2]} HTTP/1.1\r\nHost: allowed.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
)
data = b""
while b"\r\n\r\n" not in data and (chunk := s.recv(4096)):
    data += chunk
status, _, rest = data.partition(b"\r\n")
s.sendall(b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n")
try:
    while (chunk := s.recv(4096)) and not (b" 101 " in status and b"denied.test" in rest):
        rest += chunk
except OSError as exc:
    rest += f"<{type(exc).__name__}>".encode()
print(status.decode(), "|", rest.decode(errors="replace").replace("\r\n", "|"))
"""

#: A request for `path` of allowed.test with the header lines argv[3] ('|' between lines; SETTINGS stands for an
#: HTTP2-Settings value). After a 101 it speaks HTTP/2 (h2c) and asks for a stream of denied.test on that
#: connection. Prints {"head": the answer's head, "bodies": {stream: data}, "after": every byte after the head}.
H2C_CLIENT = r"""
import json, socket, sys
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, StreamEnded
address, path, fields = sys.argv[1:4]
conn = H2Connection(H2Configuration(client_side=True))
settings = conn.initiate_upgrade_connection()
settings = settings.decode() if isinstance(settings, bytes) else settings
lines = "".join(f"{line}\r\n" for line in fields.replace("SETTINGS", settings).split("|") if line)
s = socket.create_connection((address, 80), timeout=5)
s.sendall(f"GET {path} HTTP/1.1\r\nHost: allowed.test\r\n{lines}\r\n".encode())
data = b""
while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
    data += chunk
head, _, rest = data.partition(b"\r\n\r\n")
after = bytearray(rest)
bodies = {}
try:
    if head.startswith(b"HTTP/1.1 101"):
        if not fields:  # the server switched unasked: a fresh HTTP/2 connection
            conn = H2Connection(H2Configuration(client_side=True))
            conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", "denied.test"), (":path", "/fronted")]
        conn.send_headers(stream, headers, end_stream=True)
        s.sendall(conn.data_to_send())
        done = False
        while not done and rest:
            for event in conn.receive_data(rest):
                if isinstance(event, DataReceived):
                    bodies[event.stream_id] = bodies.get(event.stream_id, "") + event.data.decode()
                done = done or (isinstance(event, StreamEnded) and event.stream_id == stream)
            s.sendall(conn.data_to_send())
            rest = b"" if done else s.recv(65536)
            after += rest
    while chunk := s.recv(65536):
        after += chunk
except Exception as exc:  # not HTTP/2 after all (the gateway's own answer), a reset, a timeout
    after += f"<{type(exc).__name__}>".encode()
print(json.dumps({"head": head.decode(errors="replace"), "bodies": bodies, "after": after.decode(errors="replace")}))
"""

#: The end of several raw clients below: print everything the connection `s` returns until its end (or error).
_PRINT_UNTIL_END = r"""
data = b""
try:
    while chunk := s.recv(4096):
        data += chunk
except OSError as exc:
    data += f"<{type(exc).__name__}>".encode()
print(data.decode(errors="replace").replace("\r\n", "|"))
"""

#: A POST with Expect: 100-continue whose body, sent at once (as by a client whose wait for 100 is over), is a
#: request for denied.test; prints everything the connection returned until its end.
EXPECT_CLIENT = (
    r"""
import socket, sys
body = b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n"
s = socket.create_connection((sys.argv[1], 80), timeout=8)
head = f"POST {sys.argv[2]} HTTP/1.1\r\nHost: allowed.test\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n"
s.sendall(head.encode() + b"\r\n" + body)
"""
    + _PRINT_UNTIL_END
)

#: Two pipelined POSTs with Expect: 100-continue in one write: the first has no body (the origin still answers it
#: with a 100), the second goes to argv[2] with a body that is a request for denied.test. Prints everything the
#: connection returned until its end.
PIPELINED_EXPECT_CLIENT = (
    r"""
import socket, sys
body = b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n"
head = "POST {} HTTP/1.1\r\nHost: allowed.test\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n"
s = socket.create_connection((sys.argv[1], 80), timeout=8)
s.sendall(head.format("/upload", 0).encode() + head.format(sys.argv[2], len(body)).encode() + body)
"""
    + _PRINT_UNTIL_END
)

#: Connects to argv[1]:argv[2] and says nothing until told to (a line on stdin), then sends argv[3] (a JSON string,
#: as latin-1 bytes) and prints what comes back until the end.
SILENT_THEN_CLIENT = (
    r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)
print("connected", flush=True)
sys.stdin.readline()
s.sendall(json.loads(sys.argv[3]).encode("latin-1"))
"""
    + _PRINT_UNTIL_END
)

#: Sends argv[3] (a JSON string, as latin-1 bytes) to argv[1]:argv[2] and prints what comes back until the end.
RAW_CLIENT = (
    r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(json.loads(sys.argv[3]).encode("latin-1"))
"""
    + _PRINT_UNTIL_END
)

SERVER_FIRST_CLIENT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=4)
    data = s.recv(4096)
    print("DATA", data.decode(errors="replace").strip() or "<eof>")
except ConnectionResetError:
    print("RESET")
except OSError as exc:
    print("FAIL", type(exc).__name__, exc)
"""


# --------------------------------------------------------------------------- tests


@pytest.mark.root
def test_allowed_https_and_http_keep_alive_work_over_ipv4_and_ipv6(env: EgressEnv) -> None:
    out = env.curl("sb1", "https://allowed.test/", *pin("allowed.test", 443, "198.18.1.1"))
    assert out.stdout.strip() == "ORIGIN 198.18.1.1 host=allowed.test sni=allowed.test path=/", out.stderr
    out = env.curl("sb1", "https://allowed.test/v6", *pin("allowed.test", 443, "[2001:db8:1::1]"))
    assert out.stdout.strip() == "ORIGIN 2001:db8:1::1 host=allowed.test sni=allowed.test path=/v6", out.stderr
    # Two URLs, one connection: curl reuses it, and both requests are checked and answered.
    out = env.curl(
        "sb1", "http://allowed.test/b", "http://allowed.test/a", "-v", *pin("allowed.test", 80, "198.18.1.1")
    )
    assert out.stdout.splitlines() == [
        "ORIGIN 198.18.1.1 host=allowed.test sni=- path=/a",
        "ORIGIN 198.18.1.1 host=allowed.test sni=- path=/b",
    ], out.stderr
    assert "re-using existing" in out.stderr.lower() or "reusing existing" in out.stderr.lower(), out.stderr
    flows = env.logged_flows(hostname="allowed.test")
    assert flows and all(f["verdict"] == "allow" and f["bytes_down"] > 0 for f in flows)


@pytest.mark.root
def test_denied_names_get_an_explicit_denial(env: EgressEnv) -> None:
    tls = env.curl("sb1", "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert tls.returncode != 0 and "alert access denied" in tls.stderr.lower(), tls.stderr
    tls6 = env.curl("sb1", "https://denied.test/", *pin("denied.test", 443, "[2001:db8:1::2]"))
    assert tls6.returncode != 0 and "alert access denied" in tls6.stderr.lower(), tls6.stderr
    http = env.curl("sb1", "http://denied.test/", "-i", *pin("denied.test", 80, "198.18.1.2"))
    assert http.stdout.startswith("HTTP/1.1 403"), http.stdout
    assert "X-Gateway-Reason: host not in allowlist" in http.stdout
    assert "ORIGIN" not in http.stdout
    denials = env.logged_flows(hostname="denied.test", verdict="deny")
    assert {d["reason"] for d in denials} == {"host not in allowlist"} and len(denials) >= 3

    # ... and each denial is a flow record in the sandbox's NDJSON audit batches.
    def denied_records() -> list[dict[str, Any]]:
        records = [
            json.loads(line)
            for path in sorted((env.workdir / "audit" / "sb1").glob("*.ndjson"))
            for line in path.read_text().splitlines()
        ]
        found = [r for r in records if r["hostname"] == "denied.test"]
        return found if len(found) >= 3 else []

    denied = wait_until(denied_records, timeout=5, interval=0.1)
    assert len(denied) >= 3 and all(r["verdict"] == "deny" and r["rule"] == "default:deny" for r in denied)
    assert {r["protocol"] for r in denied} == {"tls", "http"} and all(r["bytes_up"] == 0 for r in denied)


@pytest.mark.root
def test_sni_of_an_allowed_name_sent_to_a_denied_address_reaches_the_allowed_host(env: EgressEnv) -> None:
    # The client pins allowed.test to denied.test's addresses: the gateway dials what it resolved itself.
    for pinned, expected in (("198.18.1.2", "198.18.1.1"), ("[2001:db8:1::2]", "2001:db8:1::1")):
        out = env.curl("sb1", "https://allowed.test/", *pin("allowed.test", 443, pinned))
        assert out.stdout.startswith(f"ORIGIN {expected} host=allowed.test sni=allowed.test"), out.stderr
    out = env.curl("sb1", "http://allowed.test/", *pin("allowed.test", 80, "198.18.1.2"))
    assert out.stdout.startswith("ORIGIN 198.18.1.1 host=allowed.test"), out.stderr


@pytest.mark.root
def test_a_later_keep_alive_request_for_another_host_is_refused(env: EgressEnv) -> None:
    for second, reason in (
        ("denied.test", "host denied.test: host not in allowlist"),
        ("rebind.test", "request for host rebind.test on a connection opened for allowed.test (domain fronting)"),
    ):
        raw = env.topo.python("sb1", KEEPALIVE_CLIENT, "198.18.1.1", "allowed.test", second, timeout=15)
        first, refused = json.loads(raw)
        assert first["head"].startswith("HTTP/1.1 200") and first["body"].startswith("ORIGIN 198.18.1.1")
        assert refused["head"].startswith("HTTP/1.1 403"), refused
        assert f"X-Gateway-Reason: {reason}" in refused["head"]
        assert "ORIGIN" not in refused["body"]


#: Request shapes on port 80 that would let a request for denied.test through a connection opened for
#: allowed.test if anything on the path read them differently from the gateway (request smuggling, fronting),
#: with the stable code of the gateway's refusal.
_HIDDEN = "GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n"
SMUGGLING_SHAPES = {
    "connect": ("CONNECT denied.test:80 HTTP/1.1\r\nHost: denied.test:80\r\n\r\n" + _HIDDEN, "HTTP_CONNECT_REFUSED"),
    "two hosts": ("GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: denied.test\r\n\r\n", "HTTP_DUPLICATE_HOST"),
    "absolute form": ("GET http://denied.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n", "HTTP_TARGET_HOST_MISMATCH"),
    "cl.te": (
        f"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: {len(_HIDDEN) + 5}\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{_HIDDEN}",
        "HTTP_AMBIGUOUS_LENGTH",
    ),
    "te.cl": (
        "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        f"{len(_HIDDEN):x}\r\n{_HIDDEN}\r\n0\r\n\r\n",
        "HTTP_AMBIGUOUS_LENGTH",
    ),
    "te xchunked": (
        f"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{_HIDDEN}",
        "HTTP_INVALID_TRANSFER_ENCODING",
    ),
    "te space before colon": (
        "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding : chunked\r\n"
        f"Content-Length: {len(_HIDDEN) + 5}\r\n\r\n0\r\n\r\n{_HIDDEN}",
        "HTTP_INVALID_HEADER",
    ),
    "te twice": (
        "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"
        f"\r\n0\r\n\r\n{_HIDDEN}",
        "HTTP_INVALID_TRANSFER_ENCODING",
    ),
    "obs-fold host": ("GET / HTTP/1.1\r\nHost: allowed.test\r\n denied.test\r\n\r\n", "HTTP_OBS_FOLD"),
    "bare lf": ("GET / HTTP/1.1\nHost: denied.test\n\n", "HTTP_BAD_LINE_ENDING"),
    "nul in header": ("GET / HTTP/1.1\r\nHost: allowed.test\r\nX-A: a\x00b\r\n\r\n" + _HIDDEN, "HTTP_INVALID_HEADER"),
}


@pytest.mark.root
@pytest.mark.parametrize("shape", sorted(SMUGGLING_SHAPES))
def test_smuggling_shapes_on_port_80_are_refused_and_reach_no_denied_host(env: EgressEnv, shape: str) -> None:
    request, code = SMUGGLING_SHAPES[shape]
    out = env.topo.python("sb1", RAW_CLIENT, "198.18.1.1", "80", json.dumps(request), timeout=20)
    assert out.startswith("HTTP/1.1 403") and f"X-Gateway-Reason: {code}:" in out, out
    assert "ORIGIN" not in out, out  # nothing of it reached an origin, the hidden request least of all


@pytest.mark.root
def test_an_upgrade_passes_the_new_protocol_and_a_declined_one_smuggles_nothing(env: EgressEnv) -> None:
    out = env.topo.python("sb1", UPGRADE_CLIENT, "198.18.1.1", "/ws", timeout=15)
    status, _, rest = out.strip().partition(" | ")
    assert status == "HTTP/1.1 101 Switching Protocols", out
    assert "GET / HTTP/1.1|Host: denied.test|" in rest  # echoed: after a WebSocket 101 nothing is parsed as HTTP
    # The origin does no WebSocket on /plain and answers 200: the next request is checked as HTTP.
    out = env.topo.python("sb1", UPGRADE_CLIENT, "198.18.1.1", "/plain", timeout=15)
    status, _, rest = out.strip().partition(" | ")
    assert status == "HTTP/1.1 200 OK" and "ORIGIN 198.18.1.1 host=allowed.test" in rest, out
    assert "HTTP/1.1 403 Forbidden" in rest and "X-Gateway-Reason: host denied.test: host not in allowlist" in rest


@pytest.mark.root
def test_requests_pipelined_behind_a_websocket_handshake_wait_for_its_answer(env: EgressEnv) -> None:
    # In one write: the handshake (Connection: keep-alive, Upgrade) and a request for denied.test. The origin
    # declines on /plain (200): the held request is then checked as HTTP and refused.
    handshake = (
        "GET {} HTTP/1.1\r\nHost: allowed.test\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    fronted = "GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    out = env.topo.python("sb1", RAW_CLIENT, "198.18.1.1", "80", json.dumps(handshake.format("/plain") + fronted))
    assert out.startswith("HTTP/1.1 200 OK|") and "ORIGIN 198.18.1.1 host=allowed.test" in out, out
    assert "X-Gateway-Reason: host denied.test: host not in allowlist" in out and "host=denied.test" not in out, out


#: Requests of allowed.test that ask to leave HTTP/1 other than by a WebSocket handshake (H2C_CLIENT's fields).
REFUSED_UPGRADES = {
    "h2c as curl asks": "Connection: Upgrade, HTTP2-Settings|Upgrade: h2c|HTTP2-Settings: SETTINGS",
    "h2c without Connection": "Upgrade: h2c|HTTP2-Settings: SETTINGS",
    "h2c in capitals": "Connection: upgrade|Upgrade: H2C|HTTP2-Settings: SETTINGS",
    "h2c after websocket": "Connection: Upgrade|Upgrade: websocket, h2c|HTTP2-Settings: SETTINGS",
    "h2c in a second field": "Connection: Upgrade|Upgrade: websocket|Upgrade: h2c|HTTP2-Settings: SETTINGS",
    "another protocol": "Connection: Upgrade|Upgrade: TLS/1.0",
    "websocket without its key": "Connection: Upgrade|Upgrade: websocket|Sec-WebSocket-Version: 13",
}


@pytest.mark.root
def test_an_h2c_upgrade_is_refused_so_no_http2_stream_reaches_a_denied_host(env: EgressEnv) -> None:
    # The origin speaks h2c whenever a request mentions it and serves each HTTP/2 stream by its :authority, as a
    # CDN does: were the 101 let through, a stream for denied.test would be served on allowed.test's connection.
    for form, fields in REFUSED_UPGRADES.items():
        out = json.loads(env.topo.python("sb1", H2C_CLIENT, "198.18.1.1", "/", fields, timeout=20))
        assert out["head"].startswith("HTTP/1.1 403 Forbidden"), (form, out)
        assert "X-Gateway-Reason: HTTP_UPGRADE_REFUSED: " in out["head"], (form, out)
        assert out["bodies"] == {} and "ORIGIN" not in out["after"], (form, out)
    h2c = json.loads(env.topo.python("sb1", H2C_CLIENT, "198.18.1.1", "/", REFUSED_UPGRADES["h2c as curl asks"]))
    assert "Upgrade 'h2c' refused: only a WebSocket upgrade may leave HTTP/1" in h2c["head"], h2c
    # A real client asking for h2c is told why, and may retry with HTTP/1.1.
    out = env.curl("sb1", "http://allowed.test/", "--http2", "-i", *pin("allowed.test", 80, "198.18.1.1"))
    assert out.stdout.startswith("HTTP/1.1 403") and "HTTP_UPGRADE_REFUSED" in out.stdout, out.stdout + out.stderr
    out = env.curl("sb1", "http://allowed.test/", "--http1.1", *pin("allowed.test", 80, "198.18.1.1"))
    assert out.stdout.startswith("ORIGIN 198.18.1.1 host=allowed.test"), out.stderr
    # Refused before anything was dialled: nothing reached the origin.
    refused = [
        d for d in env.log_events("flow") if d["verdict"] == "deny" and d["reason"].startswith("HTTP_UPGRADE_REFUSED")
    ]
    assert len(refused) >= len(REFUSED_UPGRADES) + 2 and {d["rule"] for d in refused} == {"builtin:http"}


@pytest.mark.root
def test_a_101_the_client_did_not_ask_for_or_to_another_protocol_leaves_nothing_unchecked(env: EgressEnv) -> None:
    # The origin switches to h2c for a plain request: the gateway still reads HTTP/1, so the client's HTTP/2
    # preface is refused before it reaches the origin and no stream is served.
    out = json.loads(env.topo.python("sb1", H2C_CLIENT, "198.18.1.1", "/h2c-anyway", "", timeout=20))
    assert out["head"].startswith("HTTP/1.1 101"), out
    assert out["bodies"] == {}, out
    assert "HTTP/1.1 403 Forbidden" in out["after"], out
    assert "X-Gateway-Reason: HTTP_UNSUPPORTED_VERSION" in out["after"], out
    # A WebSocket handshake answered with a 101 to h2c, or by a server that did not do the handshake (its
    # Sec-WebSocket-Accept is wrong): cut before the 101 reaches the client; the bytes after it never leave.
    for path, why in (
        ("/ws-as-h2c", "HTTP_UPGRADE_REFUSED: the server switched to 'h2c', not to websocket"),
        ("/ws-wrong-accept", "HTTP_UPGRADE_REFUSED: the server's 101 does not answer the request's Sec-WebSocket-Key"),
    ):
        out = env.topo.python("sb1", UPGRADE_CLIENT, "198.18.1.1", path, timeout=15)
        status, _, rest = out.strip().partition(" | ")
        assert status == "HTTP/1.1 403 Forbidden" and f"X-Gateway-Reason: {why}" in rest, out
        assert "Switching Protocols" not in rest and "Host: denied.test" not in rest, out  # nothing echoed back


@pytest.mark.root
def test_expect_100_continue_uploads_work_and_an_early_answer_smuggles_nothing(env: EgressEnv) -> None:
    # /early answers 401 at once without reading the body and keeps the connection: it would read the body, a
    # request for denied.test, as the next request. The gateway held the body, so it never went.
    out = env.topo.python("sb1", EXPECT_CLIENT, "198.18.1.1", "/early", timeout=20).strip()
    assert out.startswith("HTTP/1.1 401 Unauthorized|") and out.count("HTTP/1.") == 1, out  # its answer alone
    assert "ORIGIN" not in out and "denied.test" not in out, out
    assert not out.endswith(">"), out  # a clean end of stream, no reset or timeout
    # Uploads: the origin's 100 Continue lets the body go; a server that sends none gets it after a second.
    upload = env.workdir / "upload.bin"
    upload.write_bytes(os.urandom(200_000))
    for path in ("/upload", "/quiet"):
        uploaded = env.curl(
            "sb1",
            f"http://allowed.test{path}",
            "--data-binary",
            f"@{upload}",
            "-H",
            "Expect: 100-continue",
            *pin("allowed.test", 80, "198.18.1.1"),
        )
        assert uploaded.stdout.strip() == f"ORIGIN got 200000 bytes path={path}", uploaded.stdout + uploaded.stderr
    early = [f for f in env.log_events("flow") if f.get("reason", "").endswith("later bytes were not forwarded")]
    assert early and early[-1]["verdict"] == "allow" and early[-1]["hostname"] == "allowed.test", early


@pytest.mark.root
def test_an_earlier_requests_100_continue_does_not_release_a_later_requests_body(env: EgressEnv) -> None:
    # The origin answers the first (bodiless) request's Expect with a 100: were that taken for the answer to the
    # second request, its body would go, and /early, answering 401 without reading it, would serve it as a request
    # for denied.test. The second request is never forwarded: the connection ends after the first one's answer.
    out = env.topo.python("sb1", PIPELINED_EXPECT_CLIENT, "198.18.1.1", "/early", timeout=20).strip()
    assert "denied.test" not in out and "401" not in out, out
    assert out.startswith("HTTP/1.1 100 Continue||HTTP/1.1 200 OK|") and "ORIGIN got 0 bytes path=/upload" in out, out
    assert not out.endswith(">"), out  # a clean end of stream, no reset or timeout
    # A client that reuses its connection for a second upload with Expect retries it on a new connection.
    upload = env.workdir / "upload-twice.bin"
    upload.write_bytes(os.urandom(50_000))
    each = ["--data-binary", f"@{upload}", "-H", "Expect: 100-continue", *pin("allowed.test", 80, "198.18.1.1")]
    argv = ["curl", "-sS", "-v", "-m", "10", *each, "http://allowed.test/one", "--next", *each]
    twice = env.topo.run("sb1", [*argv, "http://allowed.test/two"], check=False, timeout=20)
    assert twice.stdout.splitlines() == [
        "ORIGIN got 50000 bytes path=/one",
        "ORIGIN got 50000 bytes path=/two",
    ], twice.stdout + twice.stderr
    assert "re-using existing connection" in twice.stderr.lower() and "retrying" in twice.stderr.lower(), twice.stderr


@pytest.mark.root
def test_the_operator_blocklist_refuses_in_every_profile_and_reloads_without_restart(env: EgressEnv) -> None:
    url = "https://allowed.test/"
    try:
        env.blocklist.write_text("# threat feed\n198.18.1.1\n2001:db8:1::/64\n")
        # The file's signature is looked at about once a second: the first refusal shows the reload happened.
        first = pin("allowed.test", 443, "198.18.1.1")
        assert wait_until(lambda: env.curl("sb1", url, *first).returncode != 0, timeout=10, interval=0.2), (
            "the blocklist was not reloaded"
        )
        for sb in ("sb1", "sb2"):  # allowlisted and unrestricted alike
            for address in ("198.18.1.1", "2001:db8:1::1"):
                result = env.curl(sb, url, *pin("allowed.test", 443, address))
                assert result.returncode != 0 and "ORIGIN" not in result.stdout, (sb, address, result)
        denied = env.logged_flows(verdict="deny", rule="builtin:blocklist")
        assert denied and "operator blocklist" in denied[-1]["reason"]
    finally:
        env.blocklist.write_text("")
    # Emptied, it is reloaded the same way (within about a second, no restart) and lets the address through again.
    again = pin("allowed.test", 443, "198.18.1.1")
    assert wait_until(
        lambda: env.curl("sb1", url, *again).stdout.startswith("ORIGIN 198.18.1.1"), timeout=10, interval=0.2
    ), "the emptied blocklist was not reloaded"


@pytest.mark.root
def test_tls_without_sni_to_an_ip_is_refused(env: EgressEnv) -> None:
    out = env.topo.run(
        "sb1",
        ["openssl", "s_client", "-connect", "198.18.1.1:443", "-noservername", "-CAfile", str(env.ca)],
        input="",
        check=False,
        timeout=10,
    )
    text = (out.stdout + out.stderr).lower()
    assert "alert access denied" in text, text
    assert "begin certificate" not in text and "allowed.test" not in text  # no handshake with the origin


@pytest.mark.root
def test_dns_rebinding_and_metadata_are_refused(env: EgressEnv) -> None:
    out = env.curl("sb1", "http://rebind.test/", "-i", *pin("rebind.test", 80, "198.18.1.1"))
    assert out.stdout.startswith("HTTP/1.1 403"), out.stdout
    assert "X-Gateway-Reason: rebind.test resolves to a refused address: private address (RFC 1918) 10.1.2.3" in (
        out.stdout
    )
    out = env.curl("sb1", "https://meta.test/", *pin("meta.test", 443, "198.18.1.1"))
    assert "alert access denied" in out.stderr.lower(), out.stderr
    # Even a sandbox allowed everything cannot reach the metadata service or a private address.
    out = env.curl("sb2", "http://169.254.169.254/latest/meta-data/", "-i")
    assert out.stdout.startswith("HTTP/1.1 403"), out.stdout
    assert "X-Gateway-Reason: cloud metadata service (AWS, GCP, Azure, OCI, OpenStack, DigitalOcean) 169" in out.stdout
    assert "X-Gateway-Rule: builtin:metadata" in out.stdout
    out = env.curl("sb2", "http://[64:ff9b::a9fe:a9fe]/", "-i")  # the same, wrapped in NAT64
    assert "X-Gateway-Reason: IPv4 169.254.169.254 embedded in NAT64" in out.stdout, out.stdout
    # The endpoints outside link-local, directly, in another IPv6 spelling, and through a DNS answer.
    for url, pinned in (
        ("http://168.63.129.16/machine", ()),
        ("http://[2002:6464:64c8::1]/", ()),  # 6to4 around 100.100.100.200
        ("http://wire.test/", pin("wire.test", 80, "198.18.1.1")),
        ("http://ali6.test/", pin("ali6.test", 80, "198.18.1.1")),
    ):
        out = env.curl("sb2", url, "-i", *pinned)
        assert out.stdout.startswith("HTTP/1.1 403"), (url, out.stdout)
        assert "X-Gateway-Rule: builtin:metadata" in out.stdout, (url, out.stdout)
    # ... while the public internet works for it.
    out = env.curl("sb2", "http://198.18.1.3/")
    assert out.stdout.startswith("ORIGIN 198.18.1.3 host=198.18.1.3"), out.stderr


@pytest.mark.root
def test_smtp_is_refused_in_every_profile_and_opaque_tcp_needs_a_cidr_rule(env: EgressEnv) -> None:
    for sb in ("sb1", "sb2"):
        for host in ("198.18.1.1", "2001:db8:1::1"):
            out = env.topo.python(sb, SERVER_FIRST_CLIENT, host, "25").strip()
            assert out in ("RESET", "DATA <eof>"), (sb, host, out)
    # SSH-like: allowed by sb1's allow_cidrs 198.18.1.4/32, refused (RST) anywhere else.
    out = env.topo.python("sb1", BANNER_CLIENT, "198.18.1.4", "22").strip()
    assert out == "DATA SSH-2.0-TestOrigin 198.18.1.4|ECHO SSH-2.0-TestClient|", out
    out = env.topo.python("sb1", BANNER_CLIENT, "198.18.1.3", "22").strip()
    assert out == "RESET", out
    # Half-close both ways through the relay, with more data than one pipe holds.
    assert env.topo.python("sb1", HALF_CLOSE_CLIENT, "198.18.1.4", str(3 << 20), timeout=20).strip() == (
        f"GOT {3 << 20}"
    )
    denied = env.logged_flows(verdict="deny", orig_dst_addr="198.18.1.3", orig_dst_port=22)
    assert denied and denied[-1]["reason"] == "no hostname (SNI/Host) and address not in allow_cidrs"


@pytest.mark.root
def test_connections_waiting_for_first_bytes_are_capped_per_sandbox(env: EgressEnv) -> None:
    out = env.topo.python("sb1", SILENT_CLIENTS, "198.18.1.4", str(PEEK_CAP + 4), timeout=20).split()
    # The first PEEK_CAP accepted wait out the peek deadline and are then relayed by address (allow_cidrs); the rest
    # are refused at once instead of piling up. Which ones are first is the kernel's: it holds silent connections
    # for the deferred accept and lets them go in the order their SYN-ACK timers fire, not the order they came.
    assert sorted(out) == ["DATA"] * PEEK_CAP + ["RESET"] * 4, out
    capped = env.logged_flows(verdict="deny", rule="builtin:peek-cap")
    assert len(capped) == 4 and capped[-1]["reason"] == "too many connections waiting for their first bytes"
    # The cap counts only connections still waiting: once those were decided, a new one waits again.
    assert env.topo.python("sb1", SILENT_CLIENTS, "198.18.1.4", "1", timeout=20).split() == ["DATA"]


#: A client that says nothing: whether the origin's banner came, and the seconds from connect() to it.
SILENT_TIMED_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 22), timeout=10)
started = time.monotonic()
s.settimeout(10)
print(s.recv(64).startswith(b"SSH-2.0"), round(time.monotonic() - started, 3))
"""


@pytest.mark.root
def test_a_silent_clients_peek_deadline_runs_from_its_handshake(env: EgressEnv) -> None:
    # The kernel holds a connection that says nothing for about a second before the gateway accepts it (the
    # deferred accept, which lets a TLS or HTTP client's first bytes be there at the accept). That second counts
    # against the 2.0 s peek deadline: a server-speaks-first protocol waits out the deadline, not a second more.
    came, seconds = env.topo.python("sb1", SILENT_TIMED_CLIENT, "198.18.1.4", timeout=20).split()
    assert came == "True" and 1.9 <= float(seconds) < 2.9, seconds


@pytest.mark.root
def test_dns_is_answered_by_the_gateway_and_only_for_allowed_names(env: EgressEnv) -> None:
    dig = env.dig
    # Sent to an address that is no resolver at all (an origin): intercepted and answered by the gateway.
    assert dig("sb1", "@198.18.1.2", "allowed.test", "A", "+short").split() == ["198.18.1.1"]
    assert dig("sb1", "@2001:db8:1::2", "allowed.test", "AAAA", "+short").split() == ["2001:db8:1::1"]
    assert dig("sb1", "@198.18.1.2", "+tcp", "allowed.test", "A", "+short").split() == ["198.18.1.1"]
    denied = dig("sb1", "@198.18.1.2", "denied.test", "A")
    assert "status: NXDOMAIN" in denied, denied
    assert "EDE: 15 (Blocked)" in denied and "host not in allowlist" in denied, denied
    https = dig("sb1", "@198.18.1.2", "allowed.test", "HTTPS")
    assert "status: NOERROR" in https and "ANSWER: 0" in https, https
    # unrestricted resolves everything
    assert dig("sb2", "@198.18.1.2", "denied.test", "A", "+short").split() == ["198.18.1.2"]

    # The sandbox's query log, through the CLI and the API of the running gateway.
    queries = env.dns_log("sb1")
    blocked = [q for q in queries if q["name"] == "denied.test"]
    assert blocked and blocked[-1]["rcode"] == "NXDOMAIN" and not blocked[-1]["allowed"], queries
    assert any(q["name"] == "allowed.test" and q["answers"] == ["198.18.1.1"] for q in queries), queries


@pytest.mark.root
def test_an_isolated_sandbox_has_no_connection_and_no_dns(env: EgressEnv) -> None:
    # sb5's record names no profile: the default, isolated. Allowed names of other sandboxes, an address in
    # another sandbox's allow_cidrs, any port, either IP version: nothing gets out, and DNS is refused.
    # Refused before any peek (a reset): an isolated sandbox gets no denial page either.
    for url, extra in (
        ("https://allowed.test/", pin("allowed.test", 443, "198.18.1.1")),
        ("https://allowed.test/", pin("allowed.test", 443, "[2001:db8:1::1]")),
        ("http://allowed.test/", pin("allowed.test", 80, "198.18.1.1")),
    ):
        out = env.curl("sb5", url, *extra)
        assert out.returncode != 0 and "ORIGIN" not in out.stdout, (url, out)
    assert env.topo.python("sb5", BANNER_CLIENT, "198.18.1.4", "22").strip() == "RESET"
    for args in (("allowed.test", "A"), ("+tcp", "allowed.test", "A"), ("allowed.test", "AAAA")):
        answer = env.dig("sb5", "@198.18.1.2", *args)
        assert "status: REFUSED" in answer and "ANSWER: 0" in answer, answer
    denials = env.logged_flows("sb5", verdict="deny")
    assert denials and {d["rule"] for d in denials} == {"profile:isolated"}, denials


@pytest.mark.root
def test_a_name_the_policy_denies_never_reaches_the_upstream(env: EgressEnv) -> None:
    # secret.test's address counts the queries its authoritative server got. sb1 may not resolve it: however it
    # asks (UDP, TCP, A, AAAA, repeated), it gets NXDOMAIN, and the upstream never hears of the name, so the
    # unrestricted sb2's query afterwards is the first the server answers: 198.18.3.1.
    for args in (("secret.test", "A"), ("+tcp", "secret.test", "A"), ("secret.test", "AAAA"), ("SeCrEt.TeSt", "A")):
        answer = env.dig("sb1", "@198.18.1.2", *args)
        assert "status: NXDOMAIN" in answer, answer
    env.topo.python("sb1", REPEAT_CLIENT, "198.18.1.2", "secret.test", "3", timeout=15)
    assert env.dig("sb2", "@198.18.1.2", "secret.test", "A", "+short").split() == ["198.18.3.1"]


@pytest.mark.root
def test_dns_caches_are_per_sandbox(env: EgressEnv) -> None:
    # serial.test's address counts the queries the authoritative server got for it: the same address again is
    # a cached answer, a new one a query that went upstream. Several packets each (dig sends a fresh cookie, a
    # Python client the very same bytes), so both of the interceptor's ways to answer from its cache are seen.
    def ask(sb: str) -> list[str]:
        return [
            *env.dig(sb, "@198.18.1.2", "serial.test", "A", "+short").split(),
            *env.topo.python(sb, REPEAT_CLIENT, "198.18.1.2", "serial.test", "3", timeout=15).split(),
        ]

    first = ask("sb1")
    assert len(first) == 4 and len(set(first)) == 1 and first[0].startswith("198.18.2."), first
    assert ask("sb1") == first  # from sb1's cache: the zone server was not asked again
    second = ask("sb2")
    assert len(second) == 4 and len(set(second)) == 1, second
    assert second != first  # sb2's first query went upstream: sb1's cached answer never answers sb2
    assert ask("sb2") == second and ask("sb1") == first
    for sb, seen, asked in (("sb1", first, 3), ("sb2", second, 2)):
        logged = [(q["answers"], q["cached"]) for q in env.dns_log(sb) if q["name"] == "serial.test"]
        assert logged == [(seen[:1], False)] + [(seen[:1], True)] * (4 * asked - 1), (sb, logged)


@pytest.mark.root
def test_dns_rate_limit_throttles_then_refuses(env: EgressEnv) -> None:
    # sb4 may ask DNS_LIMIT queries a minute: a full bucket of DNS_LIMIT at once, then one a second. A burst of
    # DNS_LIMIT + 4 identical queries: the bucket's worth is answered at once, the next two wait about 1 and 2 s
    # for their tokens (throttled), the last two would wait longer than DNS_MAX_WAIT and are REFUSED at once.
    count = DNS_LIMIT + 4
    out = env.topo.python("sb4", BURST_CLIENT, "198.18.1.2", "allowed.test", str(count), timeout=20)
    answers = json.loads(out)
    assert None not in answers, answers  # nothing dropped
    rcodes = [a["rcode"] for a in answers]
    assert rcodes == [0] * (DNS_LIMIT + 2) + [5] * 2, rcodes  # NOERROR, then REFUSED
    assert all(a["after"] < 0.5 for a in answers[:DNS_LIMIT]), answers[:DNS_LIMIT]
    delays = [a["after"] for a in answers[DNS_LIMIT : DNS_LIMIT + 2]]
    assert 0.7 < delays[0] < 1.6 and 1.7 < delays[1] < 2.6, delays
    refused = answers[DNS_LIMIT + 2 :]
    assert all(a["after"] < 0.5 and DENIAL_SUFFIX.sub("", a["ede"]) == "dns query rate limit" for a in refused), refused
    assert len({a["ede"] for a in refused}) == len(refused)  # each refusal its own denial id
    # Throttled, not cut off: the next query is answered once a token is back, and other sandboxes never waited.
    assert env.dig("sb4", "@198.18.1.2", "allowed.test", "A", "+short").split() == ["198.18.1.1"]
    assert env.dig("sb1", "@198.18.1.2", "allowed.test", "A", "+short").split() == ["198.18.1.1"]
    codes = [q["code"] for q in env.dns_log("sb4")]
    assert codes.count("REFUSED_RATE_LIMIT") == 2 and len(codes) == count + 1, codes


@pytest.mark.root
def test_opaque_tcp_reaches_an_address_the_sandbox_learned_from_dns_for_an_allowed_name(env: EgressEnv) -> None:
    # 198.18.1.1 port 22 is in no allow_cidrs rule: refused until the sandbox's own DNS answer for an
    # allowed name (allowed.test) returns it; the answer of a denied name never unlocks anything.
    assert env.topo.python("sb1", BANNER_CLIENT, "198.18.1.2", "22").strip() == "RESET"
    env.topo.run("sb1", ["dig", "+time=2", "+tries=1", "@198.18.1.2", "denied.test", "A"], check=False, timeout=10)
    assert env.topo.python("sb1", BANNER_CLIENT, "198.18.1.2", "22").strip() == "RESET"
    fresh = env.topo.python("sb3", BANNER_CLIENT, "198.18.1.1", "22").strip()
    assert fresh != "DATA SSH-2.0-TestOrigin 198.18.1.1|ECHO SSH-2.0-TestClient|"  # sb3 has no policy yet
    assert_dns_answer_unlocks_opaque_tcp(env, "sb1")


def _client_hello(name: str) -> bytes:
    """The first flight of a real TLS client (Python's ssl) for `name`."""
    out = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


# An ECH extension (RFC 9849 outer form): cipher suite, config id, enc, payload; its content is never read.
ECH_EXTENSION = b"\xfe\x0d" + (10).to_bytes(2, "big") + b"\x00\x00\x01\x00\x01\x42\x00\x00\x00\x00"

TLS_FIRST_ANSWER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(bytes.fromhex(sys.argv[3]))
try:
    print(s.recv(7).hex())
except OSError as exc:
    print(type(exc).__name__)
"""


def _with_ech(record: bytes) -> bytes:
    """A real client's one-record ClientHello with an Encrypted Client Hello extension appended."""
    body = bytearray(record[9:])  # record header (5) + handshake header (4)
    at = 2 + 32  # legacy_version, random
    at += 1 + body[at]  # session id
    at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher suites
    at += 1 + body[at]  # compression methods
    body[at : at + 2] = (int.from_bytes(body[at : at + 2], "big") + len(ECH_EXTENSION)).to_bytes(2, "big")
    body += ECH_EXTENSION
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return record[:3] + len(handshake).to_bytes(2, "big") + handshake


@pytest.mark.root
def test_encrypted_client_hello_is_refused_unless_the_outer_name_is_opted_in(env: EgressEnv) -> None:
    def first_answer(sb: str, name: str, ech: bool) -> str:
        hello = _client_hello(name)
        assert hello[0] == 0x16 and len(hello) == 5 + int.from_bytes(hello[3:5], "big")  # one record
        payload = _with_ech(hello) if ech else hello
        return env.topo.python(sb, TLS_FIRST_ANSWER, "198.18.1.1", "443", payload.hex()).strip()

    # A refusal is an alert record (0x15) ending fatal (2), access_denied (49 = 0x31).
    # sb4 may reach allowed.test but opts in no ECH name: the hello's outer name could hide any site.
    refused = first_answer("sb4", "allowed.test", ech=True)
    assert refused.startswith("15") and refused.endswith("0231"), refused
    assert first_answer("sb4", "allowed.test", ech=False).startswith("16")  # the same hello without ECH passes
    # sb1 opts allowed.test in: its ECH hello reaches the origin, which answers with its ServerHello.
    assert first_answer("sb1", "allowed.test", ech=True).startswith("16")


def _reframed(record: bytes, cuts: list[int]) -> bytes:
    """A one-record ClientHello re-sent as several TLS records, cut at these handshake-message offsets."""
    handshake = record[5:]
    edges = [0, *cuts, len(handshake)]
    pieces = [handshake[a:b] for a, b in itertools.pairwise(edges)]
    return b"".join(record[:3] + len(p).to_bytes(2, "big") + p for p in pieces)


@pytest.mark.root
def test_a_client_hello_split_across_tls_records_is_decided_as_one(env: EgressEnv) -> None:
    for name, passes in (("denied.test", False), ("allowed.test", True)):
        hello = _client_hello(name)
        sni_at = hello.index(name.encode()) - 5  # inside the server_name extension, mid-name
        for cuts in ([sni_at + 3], [1, 2, 3, sni_at - 2, sni_at + 1], list(range(40, len(hello) - 5, 9))):
            payload = _reframed(hello, cuts)
            assert payload.count(b"\x16\x03\x01") >= len(cuts) + 1
            out = env.topo.python("sb4", TLS_FIRST_ANSWER, "198.18.1.1", "443", payload.hex()).strip()
            if passes:
                assert out.startswith("16"), (name, cuts, out)  # the origin's ServerHello
            else:
                assert out.startswith("15") and out.endswith("0231"), (name, cuts, out)  # access_denied


def _silent_then(env: EgressEnv, sb: str, address: str, port: int, payload: bytes) -> str:
    """What comes back to a client that says nothing until the gateway has decided by address and dialled the
    origin (its peek is over), then sends `payload`."""
    client = env.topo.popen(sb, [sys.executable, "-u", "-c", SILENT_THEN_CLIENT, address, str(port),
                                 json.dumps(payload.decode("latin-1"))], stdin=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_line(client, "connected", 10)
        dialled = ["ss", "-Htn", "state", "established", "dst", f"{address}:{port}"]
        assert wait_until(lambda: env.topo.run("gw", dialled).stdout.strip() != "", 15)
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=15)
    finally:
        client.kill()
    return str(out).strip()


@pytest.mark.root
def test_a_client_silent_through_the_peek_still_cannot_name_another_host(env: EgressEnv) -> None:
    # sb4 may reach allowed.test only; its own DNS answer makes 198.18.1.1 an address it may reach by address
    # (a server-speaks-first protocol). Said first after the peek, an HTTP request or a TLS hello would name a
    # host that decision never checked: denied.test, served by the same origin.
    answer = env.dig("sb4", "@198.18.1.2", "allowed.test", "A", "+short")
    assert answer.split() == ["198.18.1.1"], answer
    fronted = b"GET / HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n"
    out = _silent_then(env, "sb4", "198.18.1.1", 80, fronted)
    assert "ORIGIN" not in out and out.startswith("HTTP/1.1 403 Forbidden"), out
    assert "X-Gateway-Reason: http from a client that said nothing for 2.0s (decided by address" in out, out
    out = _silent_then(env, "sb4", "198.18.1.1", 443, _client_hello("denied.test"))
    # Cut before the hello left: the origin's end of a handshake that never began, then the gateway's reason.
    assert "ORIGIN" not in out and "X-Gateway-Reason: tls from a client that said nothing for 2.0s" in out, out
    # A server-speaks-first protocol whose client speaks second still works (the SSH-like banner service).
    out = _silent_then(env, "sb4", "198.18.1.1", 22, b"SSH-2.0-TestClient\r\n")
    assert out == "SSH-2.0-TestOrigin 198.18.1.1|ECHO SSH-2.0-TestClient|", out


@pytest.mark.root
def test_request_lines_only_a_lenient_server_reads_are_refused_not_relayed_as_opaque(env: EgressEnv) -> None:
    # sb1 may reach 198.18.1.1 as opaque TCP once its DNS answer returned it for allowed.test; an HTTP server
    # there that parses request lines loosely must still never get a request for a denied host.
    assert_dns_answer_unlocks_opaque_tcp(env, "sb1")
    for line in ("GET\t/\tHTTP/1.1", "get / HTTP/1.1", "\r\nGET / HTTP/1.1", " GET / HTTP/1.1", "GET\xa0/ HTTP/1.1"):
        request = json.dumps(line + "\r\nHost: denied.test\r\n\r\n")
        out = env.topo.python("sb1", RAW_CLIENT, "198.18.1.1", "80", request, timeout=15).strip()
        assert out.startswith("HTTP/1.1 403 Forbidden|") and "X-Gateway-Reason: " in out, (line, out)
        assert "ORIGIN" not in out, (line, out)


@pytest.mark.root
def test_a_policy_change_applies_to_the_next_connection(env: EgressEnv) -> None:
    before = env.curl("sb1", "https://later.test/", *pin("later.test", 443, "198.18.1.3"))
    assert "alert access denied" in before.stderr.lower(), before.stderr
    env.write_policies(egress_policies(later_allowed=True))
    shown = ["curl", "-sS", "-m", "2", f"{NAMESPACE_API}/v1/sandboxes/sb1"]
    assert wait_until(lambda: "later.test" in env.topo.run("gw", shown, check=False).stdout, timeout=10), (
        "the store did not pick up the policy file"
    )
    after = env.curl("sb1", "https://later.test/", *pin("later.test", 443, "198.18.1.3"))
    assert after.stdout.startswith("ORIGIN 198.18.1.3 host=later.test sni=later.test"), after.stderr


@pytest.mark.root
def test_a_sandbox_added_through_the_api_is_steered_and_decided(env: EgressEnv) -> None:
    # sb3 has a link and a host route but is in no store record: its packets are dropped by the table.
    url = "https://allowed.test/"
    before = env.curl("sb3", url, *pin("allowed.test", 443, "198.18.1.1"), timeout=2)
    assert before.returncode != 0 and "ORIGIN" not in before.stdout
    record = {
        "id": "sb3",
        "addresses": ["10.75.0.3", "fdd4:1476:6c7e::3"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["allowed.test"]},
    }
    created = env.topo.run(
        "gw",
        ["curl", "-sS", "-m", "3", "-H", "Content-Type: application/json", "--data", json.dumps(record),
         f"{NAMESPACE_API}/v1/sandboxes"],
        check=False,
    )  # fmt: skip
    assert '"id": "sb3"' in created.stdout or '"id":"sb3"' in created.stdout, created.stdout + created.stderr
    # The gateway re-applies its table within about a second.
    attempts = [before]

    def steered() -> bool:
        attempts.append(env.curl("sb3", url, *pin("allowed.test", 443, "[2001:db8:1::1]"), timeout=2))
        return attempts[-1].returncode == 0

    wait_until(steered, timeout=10, interval=0.2)
    out = attempts[-1]
    assert out.stdout.startswith("ORIGIN 2001:db8:1::1 host=allowed.test"), out.stderr
    denied = env.curl("sb3", "https://denied.test/", *pin("denied.test", 443, "198.18.1.2"))
    assert "alert access denied" in denied.stderr.lower(), denied.stderr


@pytest.mark.root
def test_killing_the_gateway_leaves_the_sandbox_no_path_out(env: EgressEnv) -> None:
    assert env.gateway is not None
    assert not env.log_events("egress.error"), env.log_events("egress.error")  # nothing above hit an engine bug
    os.killpg(env.gateway.pid, signal.SIGKILL)
    env.gateway.wait(5)
    for url, extra in (
        ("https://allowed.test/", pin("allowed.test", 443, "198.18.1.1")),
        ("http://allowed.test/", pin("allowed.test", 80, "198.18.1.1")),
        ("http://[2001:db8:1::1]/", []),
    ):
        out = env.curl("sb1", url, *extra, timeout=3)
        assert out.returncode != 0 and "ORIGIN" not in out.stdout, (url, out.stdout)
    banner = env.topo.python("sb2", BANNER_CLIENT, "198.18.1.4", "22").strip()
    assert not banner.startswith("DATA SSH"), banner
    # Control: the origins themselves are still up (from the gateway namespace).
    control = env.topo.run("gw", ["curl", "-sS", "-m", "3", "http://198.18.1.1/"], check=False)
    assert control.stdout.startswith("ORIGIN 198.18.1.1")
