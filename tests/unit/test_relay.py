"""The callback relay on real loopback TCP sockets, under the stdlib loop and under uvloop (`gateway run`'s).

Topology of every test: client app <-> [client | Relay | upstream] <-> origin app.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import socket
import struct
import termios
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop

from gateway.engine.guard import HttpGuard
from gateway.engine.relay import SPLICE_AFTER, AfterAnswer, GuardStop, IdleSweeper, Relay
from gateway.peek.http1 import CONTINUE_TIMEOUT, HttpRequestTracker
from gateway.ratelimit import BandwidthLimiter
from tests.factory import policy, wait_until_async

Scenario = Callable[["Wired"], Coroutine[Any, Any, None]]


def on_both_loops(scenario: Scenario) -> Callable[[str], None]:
    """A test of `scenario` on a fresh loop of each kind, with freshly wired sockets."""

    @pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
    def test(loop_kind: str) -> None:
        async def main() -> None:
            client_app, client = tcp_pair()
            upstream, origin_app = tcp_pair()
            wired = Wired(client_app, origin_app, client, upstream, asyncio.get_running_loop().create_future())
            try:
                await scenario(wired)
            finally:
                for sock in (client_app, origin_app, client, upstream):
                    sock.close()

        asyncio.run(main(), loop_factory=uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop)

    test.__name__ = test.__qualname__ = scenario.__name__
    return test


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for sock in (a, b):
        sock.setblocking(False)
    return a, b


@dataclass
class Wired:
    client_app: socket.socket
    origin_app: socket.socket
    client: socket.socket
    upstream: socket.socket
    ended: asyncio.Future[Relay]

    def start(self, sweeper: IdleSweeper, **options: object) -> Relay:
        ended = self.ended
        return Relay(self.client, self.upstream, ended.set_result, sweeper=sweeper, **options)  # type: ignore[arg-type]


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        chunk = await loop.sock_recv(sock, min(1 << 20, size - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def recv_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        data += chunk
    return bytes(data)


def unread(sock: socket.socket) -> int:
    """Bytes that arrived at `sock` and wait to be read."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)))[0])


def sweeper(idle: float = 30.0) -> IdleSweeper:
    return IdleSweeper(asyncio.get_running_loop(), idle, interval=0.05)


@on_both_loops
async def test_first_bytes_both_directions_half_close_and_counts(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    relay = wired.start(sweeper(), first=b"hello")
    assert await recv_exactly(wired.origin_app, 5) == b"hello"
    await loop.sock_sendall(wired.client_app, b" world")
    wired.client_app.shutdown(socket.SHUT_WR)  # the client is done talking; its answer must still come back
    assert await recv_to_eof(wired.origin_app) == b" world"
    await loop.sock_sendall(wired.origin_app, b"answer")
    wired.origin_app.shutdown(socket.SHUT_WR)
    assert await recv_to_eof(wired.client_app) == b"answer"
    done = await asyncio.wait_for(wired.ended, 5)
    assert done is relay and relay.error is None and relay.cut is None
    assert (relay.bytes_up, relay.bytes_down) == (11, 6)
    assert wired.upstream.fileno() == -1  # the relay closed its upstream; the client socket is the caller's
    assert wired.client.fileno() != -1


@on_both_loops
async def test_bulk_moves_to_splice_and_keeps_every_byte_in_order_under_backpressure(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    payload = os.urandom(24 << 20)
    relay = wired.start(sweeper())

    async def origin() -> None:
        await loop.sock_sendall(wired.origin_app, payload)
        wired.origin_app.shutdown(socket.SHUT_WR)

    sender = asyncio.create_task(origin())

    def stopped_reading() -> bool:
        # The client reads nothing yet: the relay must stop reading, not buffer 24 MiB. It waits for the client
        # with no reader on the upstream, whose unread bytes stay in its socket (the origin's TCP window closes).
        down = relay.down
        return down.writing and not down.reading and unread(wired.upstream) > 0

    assert await wait_until_async(stopped_reading, timeout=10)
    assert relay.down.forwarded + relay.down.in_pipe < len(payload)
    assert relay.down.pipe_r >= 0  # past SPLICE_AFTER the direction splices
    received = await asyncio.wait_for(recv_to_eof(wired.client_app), 30)
    await sender
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    wired.client_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)
    assert relay.error is None and relay.bytes_down == len(payload) and relay.bytes_up == 0


@on_both_loops
async def test_without_splice_everything_is_copied(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    payload = os.urandom(4 * SPLICE_AFTER)
    relay = wired.start(sweeper(), splice=False)
    await loop.sock_sendall(wired.client_app, payload)
    wired.client_app.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(recv_to_eof(wired.origin_app), 10) == payload
    assert relay.up.pipe_r == -1
    wired.origin_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)


@on_both_loops
async def test_idle_timeout_ends_the_relay_only_after_the_shared_idle_clock_ran_out(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    sweep = sweeper(0.3)
    started = time.monotonic()
    relay = wired.start(sweep)
    # Two thirds of the relay's own idle clock run out (and the sweeps meanwhile keep it), then it moves a byte.
    assert await wait_until_async(lambda: time.monotonic() - relay.last >= 0.2 and not relay.done)
    await loop.sock_sendall(wired.origin_app, b"x")  # activity in either direction restarts the clock
    assert await recv_exactly(wired.client_app, 1) == b"x"
    moved = time.monotonic()
    await asyncio.wait_for(wired.ended, 5)
    assert isinstance(relay.error, TimeoutError)
    assert time.monotonic() - moved >= 0.29 and time.monotonic() - started < 2
    assert not sweep.relays


@on_both_loops
async def test_a_reset_breaks_the_relay_with_the_error(wired: Wired) -> None:
    relay = wired.start(sweeper())
    wired.client_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wired.client_app.close()  # RST
    await asyncio.wait_for(wired.ended, 5)
    assert isinstance(relay.error, OSError)


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


TCP_CLOSE = 7  # include/net/tcp_states.h: where a socket that received a reset is


@pytest.mark.parametrize("size", [7, 3 * SPLICE_AFTER], ids=["copied", "spliced"])
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_bytes_then_a_reset_arriving_together_still_end_the_relay(loop_kind: str, size: int) -> None:
    """uvloop reports an error event (EPOLLERR) to a reader once and then stops polling its descriptor: a reader
    that read one chunk of what was queued and waited to be called again would never be, and the relay would hold
    both sockets until the idle timeout (a sandbox could pile those up at will)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client_app, client = tcp_pair()
        upstream, origin_app = tcp_pair()
        payload = os.urandom(size)
        ended: asyncio.Future[Relay] = loop.create_future()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * size)  # all of it fits, queued unread
        try:
            await loop.sock_sendall(client_app, payload)
            assert await wait_until_async(lambda: unread(client) == size)
            client_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client_app.close()  # RST behind the bytes: the relay's first wake-up sees both (EPOLLIN | EPOLLERR)
            assert await wait_until_async(lambda: tcp_state(client) == TCP_CLOSE)
            relay = Relay(client, upstream, ended.set_result, sweeper=sweeper())
            assert await recv_exactly(origin_app, size) == payload  # what came before the reset still goes
            await asyncio.wait_for(ended, 5)  # not the sweeper's 30 s idle timeout
            assert isinstance(relay.error, ConnectionResetError)
        finally:
            for sock in (client, upstream, origin_app):
                sock.close()

    asyncio.run(main(), loop_factory=uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop)


@on_both_loops
async def test_bandwidth_bucket_throttles_and_a_throttled_relay_is_not_idle(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    bucket = BandwidthLimiter().bucket("sb", "down", 16, 16)  # 2 MB/s, 2 MB sustained depth, 64 KiB peak depth
    payload = os.urandom(2_000_000)
    started = time.monotonic()
    relay = wired.start(sweeper(0.3), down_bucket=bucket)  # chunk waits are longer than the idle timeout
    await loop.sock_sendall(wired.origin_app, payload)
    wired.origin_app.shutdown(socket.SHUT_WR)
    received = await asyncio.wait_for(recv_to_eof(wired.client_app), 10)
    elapsed = time.monotonic() - started
    assert received == payload
    assert elapsed >= 0.8  # the peak bucket caps the burst at 2 MB/s (minus its 64 KiB depth)
    wired.client_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)
    assert relay.error is None


@on_both_loops
async def test_the_idle_clock_restarts_when_a_bandwidth_wait_ends(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    idle = 0.3
    bucket = BandwidthLimiter().bucket("sb", "down", 8, 800)  # 1 MB/s, 1 MB sustained depth
    started = time.monotonic()
    wait = bucket.reserve(1_000_000 + 600_000)  # in debt: the next byte may go 0.6 s from now
    assert wait == pytest.approx(0.6, abs=0.01)
    relay = wired.start(sweeper(idle), down_bucket=bucket)
    await loop.sock_sendall(wired.origin_app, b"x")  # read at once, then forwarded after the wait
    assert await asyncio.wait_for(recv_exactly(wired.client_app, 1), 5) == b"x"
    await asyncio.wait_for(wired.ended, 5)  # nothing moves after the byte: the idle timeout ends the relay
    assert isinstance(relay.error, TimeoutError)
    # Idle from the end of the wait on, not from the read before it (a sweep right after the wait would end it).
    # The 10 ms allow for a loop whose timers run by the millisecond.
    assert time.monotonic() - started >= wait + idle - 0.01


@on_both_loops
async def test_http_guard_cut_forwards_the_allowed_prefix_lets_the_upstream_answer_then_ends(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    tracker = HttpRequestTracker()
    first = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    tracker.feed(first)
    guard = HttpGuard(policy("allowlisted", {"allow_hosts": ["a.test"]}), tracker, "a.test", 80)
    relay = wired.start(sweeper(), first=first, guard=guard, cut_grace=5.0)
    assert await recv_exactly(wired.origin_app, len(first)) == first
    await loop.sock_sendall(
        wired.client_app, b"GET /2 HTTP/1.1\r\nHost: a.test\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n"
    )
    # Only the request for the dialled host reaches the upstream, then its write side is shut.
    assert await recv_to_eof(wired.origin_app) == b"GET /2 HTTP/1.1\r\nHost: a.test\r\n\r\n"
    await loop.sock_sendall(wired.origin_app, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 2)
    wired.origin_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)
    assert relay.error is None and relay.cut is not None and relay.cut[0].startswith("host b.test: ")
    # Both responses reached the client, whose write side stays open for the denial.
    assert await recv_exactly(wired.client_app, 76) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 2


@on_both_loops
async def test_a_cut_before_the_relay_started_and_the_grace_bound(wired: Wired) -> None:
    sweep = sweeper()
    first = b"GET / HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n"  # a refused request pipelined behind the first
    stop = GuardStop(18, ("refused", "builtin:http"))
    relay = wired.start(sweep, first=first, first_stop=stop, cut_grace=0.2)
    assert await recv_to_eof(wired.origin_app) == b"GET / HTTP/1.1\r\n\r\n"
    started = time.monotonic()
    await asyncio.wait_for(wired.ended, 5)  # the upstream never answers: the grace ends the relay
    assert 0.15 <= time.monotonic() - started < 2
    assert relay.error is None and relay.cut == ("refused", "builtin:http") and not sweep.relays


KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
#: After an upgrade these bytes are another protocol's; on a declined upgrade they are a fronted request.
FRONTED = b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n"


def start_held(wired: Wired, first: bytes, **options: object) -> Relay:
    """A relay whose first request (read by the peek, as in the engine) holds `first`'s rest for an answer."""
    tracker = HttpRequestTracker()
    events = tracker.feed(first)
    guard = HttpGuard(policy("allowlisted", {"allow_hosts": ["a.test"]}), tracker, "a.test", 80)
    stop = guard.check(events, 0)
    assert stop is not None and stop.watch is not None
    return wired.start(sweeper(), first=first, first_stop=stop, guard=guard, **options)


def assert_nothing_to_read(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.recv(1)


def assert_held(relay: Relay, forwarded: bytes, held: bytes, origin_app: socket.socket) -> None:
    """The client's bytes after `forwarded` wait in the relay for the server's answer: none went upstream."""
    assert relay.up.held == held and not relay.up.reading  # the client is not read meanwhile either
    assert relay.bytes_up == len(forwarded)
    assert_nothing_to_read(origin_app)


@on_both_loops
async def test_a_websocket_upgrade_passes_the_new_protocol_unchecked(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    relay = start_held(wired, UPGRADE + FRONTED)  # the client does not wait for the 101
    assert await recv_exactly(wired.origin_app, len(UPGRADE)) == UPGRADE
    assert_held(relay, UPGRADE, FRONTED, wired.origin_app)  # held until the server answered
    await loop.sock_sendall(wired.origin_app, SWITCHED)
    assert await recv_exactly(wired.origin_app, len(FRONTED)) == FRONTED
    assert await recv_exactly(wired.client_app, len(SWITCHED)) == SWITCHED
    bulk = os.urandom(2 * SPLICE_AFTER)
    await loop.sock_sendall(wired.client_app, bulk)
    assert await recv_exactly(wired.origin_app, len(bulk)) == bulk
    assert relay.up.guard is None and relay.up.pipe_r >= 0  # nothing left to check: the new protocol splices
    wired.client_app.shutdown(socket.SHUT_WR)
    wired.origin_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)
    assert relay.error is None and relay.cut is None


@on_both_loops
async def test_a_declined_upgrade_cannot_smuggle_a_request_for_another_host(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    relay = start_held(wired, UPGRADE + FRONTED)
    assert await recv_exactly(wired.origin_app, len(UPGRADE)) == UPGRADE
    declined = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"
    await loop.sock_sendall(wired.origin_app, declined)
    # The held bytes are checked as HTTP again: the request for b.test never reaches the upstream.
    assert await recv_to_eof(wired.origin_app) == b""
    wired.origin_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)
    assert relay.cut is not None and relay.cut[0].startswith("host b.test: ")
    assert await recv_exactly(wired.client_app, len(declined)) == declined


@on_both_loops
async def test_a_101_to_another_protocol_cuts_before_it_reaches_the_client(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    relay = start_held(wired, UPGRADE + FRONTED)
    assert await recv_exactly(wired.origin_app, len(UPGRADE)) == UPGRADE
    await loop.sock_sendall(wired.origin_app, SWITCHED.replace(b"Upgrade: websocket", b"Upgrade: h2c"))
    await asyncio.wait_for(wired.ended, 5)
    assert relay.cut is not None and relay.cut[0].startswith("HTTP_UPGRADE_REFUSED: the server switched to 'h2c'")
    assert relay.cut[1] == "builtin:http"
    assert await recv_to_eof(wired.origin_app) == b""  # the held bytes never went: the upstream is closed
    # Nor did the 101 reach the client (the caller writes the denial); the relay has ended: none can follow.
    assert relay.bytes_down == 0
    assert_nothing_to_read(wired.client_app)


EXPECT = b"POST /up HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
#: The body of EXPECT is a request for another host: a server that answers before reading the body and keeps
#: the connection might read it as the next request.
SMUGGLING_BODY = b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n"
EXPECT_SMUGGLING = EXPECT.replace(b"Length: 4", b"Length: %d" % len(SMUGGLING_BODY))


@on_both_loops
async def test_expect_holds_the_body_until_100_continue(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    relay = start_held(wired, EXPECT + b"data")
    assert await recv_exactly(wired.origin_app, len(EXPECT)) == EXPECT
    assert_held(relay, EXPECT, b"data", wired.origin_app)
    await loop.sock_sendall(wired.origin_app, b"HTTP/1.1 100 Continue\r\n\r\n")
    assert await recv_exactly(wired.origin_app, 4) == b"data"
    # The connection is checked as before: a later request for another host is cut.
    await loop.sock_sendall(wired.client_app, FRONTED)
    assert await recv_to_eof(wired.origin_app) == b""
    wired.origin_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)
    assert relay.cut is not None and relay.cut[0].startswith("host b.test: ")


@on_both_loops
async def test_expect_answered_at_once_forwards_nothing_more_from_the_client(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    relay = start_held(wired, EXPECT_SMUGGLING + SMUGGLING_BODY)
    assert await recv_exactly(wired.origin_app, len(EXPECT_SMUGGLING)) == EXPECT_SMUGGLING
    refused = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
    await loop.sock_sendall(wired.origin_app, refused)
    assert await recv_to_eof(wired.origin_app) == b""  # the body never went; the upstream's write side is shut
    assert await recv_exactly(wired.client_app, len(refused)) == refused  # the server's answer did
    wired.origin_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)
    assert relay.closed_early and relay.cut is None and relay.error is None
    assert await recv_to_eof(wired.client_app) == b""  # and then the end


@on_both_loops
async def test_expect_without_an_answer_sends_the_body_after_the_timeout(wired: Wired) -> None:
    started = time.monotonic()
    relay = start_held(wired, EXPECT + b"data")
    assert await recv_exactly(wired.origin_app, len(EXPECT) + 4) == EXPECT + b"data"
    assert time.monotonic() - started >= CONTINUE_TIMEOUT * 0.9
    relay.finish(None)


class _OnceGuard:
    """Checks the first chunk only: then the rest of the direction passes unchecked."""

    def feed(self, chunk: bytes) -> GuardStop | None:
        return GuardStop(len(chunk), None, passthrough=True)

    def answered(self, answer: object) -> AfterAnswer | tuple[str, str]:
        raise AssertionError("nothing awaits an answer")


@on_both_loops
async def test_a_guard_that_passes_the_rest_is_asked_no_more_and_the_direction_splices(wired: Wired) -> None:
    loop = asyncio.get_running_loop()
    payload = os.urandom(4 * SPLICE_AFTER)
    relay = wired.start(sweeper(), guard=_OnceGuard())
    await loop.sock_sendall(wired.client_app, payload)
    wired.client_app.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(recv_to_eof(wired.origin_app), 10) == payload
    assert relay.up.guard is None and relay.up.pipe_r >= 0
    wired.origin_app.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(wired.ended, 5)
    assert relay.cut is None and not relay.closed_early
