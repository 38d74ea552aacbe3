"""The upstream dial (gateway.engine.dial) on real loopback sockets, under the stdlib loop and under uvloop: the
connect, its failures, and the poll registration it can park for the relay (gateway.readiness.park_reader)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway import readiness
from gateway.engine.dial import dial

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main(), loop_factory=LOOPS[loop_kind])


async def _accepted(server: socket.socket) -> socket.socket:
    conn, _ = await asyncio.get_running_loop().sock_accept(server)
    return conn


def _server() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    return server


@contextlib.asynccontextmanager
async def parked_dial() -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    """(upstream, origin): a dial with `park` to a loopback origin, and the origin's end of it; both closed after."""
    with _server() as server:
        accepting = asyncio.ensure_future(_accepted(server))
        upstream = await dial("127.0.0.1", server.getsockname()[1], 0, 5.0, park=True)
        origin = await accepting
        try:
            yield upstream, origin
        finally:
            origin.close()
            upstream.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_the_parked_registration_hands_over_to_the_next_reader(loop_kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with parked_dial() as (upstream, origin):
            assert upstream.getblocking() is False
            got: asyncio.Future[bytes] = loop.create_future()
            # The next owner's reader takes the slot the placeholder held, as the relay's does.
            loop.add_reader(upstream.fileno(), lambda: got.done() or got.set_result(upstream.recv(64)))
            origin.send(b"banner")
            assert await asyncio.wait_for(got, 5) == b"banner"
            loop.remove_reader(upstream.fileno())
        assert upstream.fileno() == -1  # closed for real: nothing of the placeholder holds it open

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_bytes_before_the_next_owner_leave_it_to_read_them(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    woken: list[socket.socket] = []
    unpark = readiness._unpark

    def counted(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        woken.append(sock)
        unpark(loop, sock)

    monkeypatch.setattr(readiness, "_unpark", counted)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with parked_dial() as (upstream, origin):
            origin.send(b"early")  # the server speaks while the placeholder holds the slot
            for _ in range(1000):  # loop turns, until the placeholder was woken
                await asyncio.sleep(0)
                if woken:
                    break
            for _ in range(20):  # and it went: the bytes still there wake it no more
                await asyncio.sleep(0)
            assert woken == [upstream]
            got: asyncio.Future[bytes] = loop.create_future()
            loop.add_reader(upstream.fileno(), lambda: got.done() or got.set_result(upstream.recv(64)))
            assert await asyncio.wait_for(got, 5) == b"early"  # registered afresh, told at once
            loop.remove_reader(upstream.fileno())
        assert upstream.fileno() == -1

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_refused_dial_raises_and_parks_nothing(loop_kind: str) -> None:
    async def main() -> None:
        with _server() as server:
            port = server.getsockname()[1]
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ConnectionRefusedError):  # the port is closed now
            await dial("127.0.0.1", port, 0, 5.0, park=True)
        # Its socket is closed for real: a placeholder left on it would hold the descriptor open (under uvloop).
        assert len(os.listdir("/proc/self/fd")) == before

    run(loop_kind, main)
