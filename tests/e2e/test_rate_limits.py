"""Rate limits through the real gateway (`gateway run --data-plane --steer`): throttle, never terminate.

Expectations come from the buckets in gateway/ratelimit.py:

* `connections_per_minute = 30`: a bucket of 30 tokens refilling 30/60 = 0.5 a second, so a
  token every 2 s. With `rate_limit_max_wait = 0.5` a connection over the limit waits when
  its token is due within 0.5 s, and is refused at once (reason `connection rate limit`)
  when it is due later.
* `bandwidth_mbit = burst_mbit = 8`: 1,000,000 bytes a second per direction, shared by all
  of the sandbox's connections; the peak bucket (rate 1 MB/s, depth 64 KiB) caps every burst,
  so N bytes take at least (N - 64 KiB) / 1 MB/s whatever was idle before.

Each sandbox gets its own limits (sb1 connections, sb2 bandwidth), so the tests do not share
buckets. The gateway, origins and sandboxes run in namespaces from tests/netns.py; the
gateway is started by `EgressEnv` from test_egress (imported, not copied).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.factory import NAMESPACE_API, EgressEnv, wait_until
from tests.netns import Topology, live_namespaces, wait_for_line

ORIGIN = "198.18.1.1"
PER_MINUTE = 30
MAX_WAIT = 0.5
TOKEN_RATE = PER_MINUTE / 60  # tokens a second
MBIT = 8
BYTES_PER_SECOND = MBIT * 1_000_000 / 8
PEAK_DEPTH = 64 * 1024
MB = 1_000_000

#: Plain HTTP: `GET /bytes/N` answers N bytes, other GETs a short body, POST the number of bytes it received.
BULK_ORIGIN = r"""
import socket, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
CHUNK = b"x" * 65536
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        size = int(self.path.split("/")[2]) if self.path.startswith("/bytes/") else 3
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            while size > 0:
                self.wfile.write(CHUNK[: min(size, len(CHUNK))])
                size -= len(CHUNK)
        except OSError:
            pass
    def do_POST(self):
        left, got = int(self.headers["Content-Length"]), 0
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
            got += len(chunk)
        body = str(got).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 256
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
threading.Thread(target=Server(("::", 80), Handler).serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

#: Opens connections one after another (`count` of them), each an HTTP GET; per connection prints
#: [ok, seconds]. A refused connection is reset by the gateway (or closed without an answer).
CONNECTOR = r"""
import json, socket, sys, time
host, count = sys.argv[1], int(sys.argv[2])
gap = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
out = []
for _ in range(count):
    start = time.monotonic()
    ok = False
    try:
        s = socket.create_connection((host, 80), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        ok = data.startswith(b"HTTP/1.0 200")
        s.close()
    except OSError:
        pass
    out.append([ok, time.monotonic() - start, time.monotonic()])
    if gap:
        time.sleep(gap)  # the client's pace is what the limit is measured against (a product run has no clock)
print(json.dumps(out))
"""

#: Opens connections every `gap` seconds until one is admitted (at most `tries`); prints every result.
UNTIL_ADMITTED = CONNECTOR.replace(
    "    if gap:\n", "    if ok:\n        break\n    if gap:\n"
)  # same client, stops at the first success


def _policies(conn_per_minute: int = PER_MINUTE, mbit: int = MBIT) -> dict[str, Any]:
    return {
        "templates": {},
        "sandboxes": {
            "sb1": {
                "id": "sb1",
                "addresses": ["10.75.0.1", "fdd4:1476:6c7e::1"],
                "profile": "unrestricted",
                "limits": {"connections_per_minute": conn_per_minute},
            },
            "sb2": {
                "id": "sb2",
                "addresses": ["10.75.0.2", "fdd4:1476:6c7e::2"],
                "profile": "unrestricted",
                "limits": {"connections_per_minute": 10_000, "bandwidth_mbit": mbit, "burst_mbit": mbit},
            },
        },
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressEnv]:
    with Topology(sandboxes=2, origins=1) as topo:
        e = EgressEnv(topo, tmp_path_factory.mktemp("ratelimits"))
        topo.attach_with_cli()
        origin = topo.popen("inet", [sys.executable, "-u", "-c", BULK_ORIGIN])
        wait_for_line(origin, "ready", 10)
        e.write_policies(_policies())
        e.environment["GATEWAY_EGRESS__RATE_LIMIT_MAX_WAIT"] = str(MAX_WAIT)
        e.start_gateway()
        yield e
    assert live_namespaces(topo.prefix) == []


def _connect(env: EgressEnv, sb: str, count: int, gap: float = 0.0, script: str = CONNECTOR) -> list[list[Any]]:
    raw = env.topo.python(sb, script, ORIGIN, str(count), str(gap), timeout=25)
    return list(json.loads(raw))


def _download(env: EgressEnv, sb: str, size: int, parallel: int = 1) -> tuple[float, list[int]]:
    """`parallel` curl downloads of `size` bytes started together; (wall seconds, bytes each got)."""
    url = f"http://{ORIGIN}/bytes/{size}"
    curl = f"curl -sS -m 25 -o /dev/null -w '%{{size_download}}\\n' {url}"
    script = " & ".join([curl] * parallel) + " & wait"
    start = time.monotonic()
    out = env.topo.run(sb, script, timeout=30)
    return time.monotonic() - start, [int(line) for line in out.stdout.split()]


def _wait_for_policy(env: EgressEnv, sandbox: str, needle: str) -> None:
    shown = ["curl", "-sS", "-m", "2", f"{NAMESPACE_API}/v1/sandboxes/{sandbox}"]
    if not wait_until(lambda: needle in env.topo.run("gw", shown).stdout.replace(" ", ""), timeout=10):
        pytest.fail(f"the store did not pick up {needle} for {sandbox}")


@pytest.mark.root
def test_connections_per_minute_admit_a_burst_then_wait_then_refuse(env: EgressEnv) -> None:
    burst = _connect(env, "sb1", PER_MINUTE)
    assert all(ok for ok, _, _ in burst), burst  # a full bucket: 30 at once, none waited
    # None waited (the first may take up to 0.8 s more: the kernel delays proxy ARP answers, proxy_delay).
    assert all(seconds < MAX_WAIT for _, seconds, _ in burst[1:]), burst
    burst_end = burst[-1][2]
    burst_seconds = burst_end - (burst[0][2] - burst[0][1])

    # The next one: its token is ~2 s away, beyond the 0.5 s bound, so it is refused at once.
    (refused,) = _connect(env, "sb1", 1)
    assert refused[0] is False and refused[1] < MAX_WAIT, refused

    # Retrying every 0.1 s: refused while the token is more than 0.5 s away; the first admitted
    # attempt found it due within 0.5 s and waited for it (the previous attempt, 0.1 s earlier, did not).
    attempts = _connect(env, "sb1", 40, gap=0.1, script=UNTIL_ADMITTED)
    admitted = attempts[-1]
    assert admitted[0] is True and all(not ok for ok, _, _ in attempts[:-1]), attempts
    assert MAX_WAIT - 0.1 - 0.05 <= admitted[1] <= MAX_WAIT + 0.5, admitted  # it waited, boundedly
    # The bucket held at most burst_seconds * 0.5 tokens after the burst; the token was complete 1/0.5 s
    # after the bucket was empty: the admitted connection finished no earlier than that.
    assert admitted[2] - burst_end >= (1 - burst_seconds * TOKEN_RATE) / TOKEN_RATE - 0.2, (burst_seconds, admitted)
    assert len(attempts) >= 5  # it really was refused for a while (>= 1 s of retries)

    denials = env.logged_flows("sb1", verdict="deny")
    assert denials and {d["reason"] for d in denials} == {"connection rate limit"}, denials
    assert {d["rule"] for d in denials} == {"limits.connections_per_minute"}

    # ... and each refusal is a flow record in the sandbox's audit batches.
    def audited() -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for path in sorted((env.workdir / "audit" / "sb1").glob("*.ndjson"))
            for line in path.read_text().splitlines()
        ]

    wait_until(lambda: sum(r["reason"] == "connection rate limit" for r in audited()) >= len(denials), timeout=5)
    records = audited()
    refused_records = [r for r in records if r["verdict"] == "deny"]
    assert len(refused_records) == len(denials)
    assert all(r["reason"] == "connection rate limit" for r in refused_records)

    # A policy change raising the limit applies to the next connection.
    env.write_policies(_policies(conn_per_minute=6000))
    _wait_for_policy(env, "sb1", '"connections_per_minute":6000')
    after = _connect(env, "sb1", 20)
    assert all(ok for ok, _, _ in after), after


@pytest.mark.root
def test_bandwidth_is_throttled_and_shared_by_the_sandbox_connections(env: EgressEnv) -> None:
    size = 4 * MB
    seconds, got = _download(env, "sb2", size)
    assert got == [size]  # throttled, nothing dropped
    floor = (size - PEAK_DEPTH) / BYTES_PER_SECOND  # ~3.93 s
    assert floor - 0.3 <= seconds <= floor * 2 + 2, seconds

    # Two at once share the sandbox's 1 MB/s: 2 x 2 MB need ~4 s together (alone, each would need ~2 s).
    seconds, got = _download(env, "sb2", 2 * MB, parallel=2)
    assert got == [2 * MB, 2 * MB]
    shared_floor = (2 * 2 * MB - PEAK_DEPTH) / BYTES_PER_SECOND
    assert shared_floor - 0.3 <= seconds <= shared_floor * 2 + 2, seconds

    # The other direction has its own bucket of the same rate: an upload is throttled the same way.
    upload = 3 * MB
    start = time.monotonic()
    out = env.topo.run(
        "sb2",
        f"head -c {upload} /dev/zero | curl -sS -m 25 --data-binary @- http://{ORIGIN}/upload",
        timeout=30,
    )
    seconds = time.monotonic() - start
    assert out.stdout.strip() == str(upload), out.stdout + out.stderr
    up_floor = (upload - PEAK_DEPTH) / BYTES_PER_SECOND
    assert up_floor - 0.3 <= seconds <= up_floor * 2 + 2, seconds

    flows = [f for f in env.logged_flows("sb2") if f.get("bytes_down", 0) >= 2 * MB]
    assert len(flows) == 3 and all(f["verdict"] == "allow" for f in flows), flows
    assert env.logged_flows("sb2")[-1]["bytes_up"] >= upload

    # A policy change raising the limit applies to the next connection: 4 MB at 400 Mbit/s is quick.
    env.write_policies(_policies(mbit=400))
    _wait_for_policy(env, "sb2", '"bandwidth_mbit":400')
    seconds, got = _download(env, "sb2", size)
    assert got == [size] and seconds < 1.5, seconds
