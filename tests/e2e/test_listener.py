"""The egress listeners (gateway.engine.listener) with the real kernel: transparent sockets on loopback, the
deferred accept (TCP_DEFER_ACCEPT) and the peer address handed on with each connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.engine.listener import DEFER_ACCEPT, Listeners

pytestmark = pytest.mark.root


class Accepted:
    """What the listeners hand on: (socket, peer) in accept order, awaitable one by one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[socket.socket, tuple[object, ...]]] = asyncio.Queue()

    def __call__(self, conn: socket.socket, peer: tuple[object, ...]) -> None:
        self.queue.put_nowait((conn, peer))

    async def next(self, timeout: float = 5.0) -> tuple[socket.socket, tuple[object, ...]]:
        return await asyncio.wait_for(self.queue.get(), timeout)


@pytest.fixture
async def listening() -> AsyncIterator[tuple[Listeners, Accepted]]:
    accepted = Accepted()
    listeners = Listeners(accepted)
    listeners.open(("127.0.0.1", "::1"), 0, defer=True)
    try:
        yield listeners, accepted
    finally:
        listeners.close()
        while not accepted.queue.empty():
            accepted.queue.get_nowait()[0].close()


def _port(listeners: Listeners) -> int:
    return int(listeners.sockets[0].getsockname()[1])


async def _connect(port: int) -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
    return client


async def test_a_connection_that_says_nothing_is_accepted_after_one_that_spoke(
    listening: tuple[Listeners, Accepted],
) -> None:
    listeners, accepted = listening
    assert [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) for s in listeners.sockets] == [DEFER_ACCEPT] * 2
    assert listeners.deferral == DEFER_ACCEPT
    silent = await _connect(_port(listeners))
    speaking = await _connect(_port(listeners))  # connected second, but says something at once
    try:
        speaking.send(b"\x16\x03\x01")
        conn, peer = await accepted.next()
        # The kernel held the silent one back: the one that spoke comes first, its bytes already there to read.
        assert peer[:2] == speaking.getsockname()
        assert conn.getpeername() == speaking.getsockname() and conn.recv(16) == b"\x16\x03\x01"
        conn.close()
        conn, peer = await accepted.next()  # the silent one, once the deferral is over
        assert peer[:2] == silent.getsockname()
        with pytest.raises(BlockingIOError):
            conn.recv(16)
        conn.close()
    finally:
        silent.close()
        speaking.close()


async def test_without_the_deferral_connections_come_in_the_order_they_connected(
    listening: tuple[Listeners, Accepted],
) -> None:
    listeners, accepted = listening
    listeners.defer(False)  # as a reload to a peek deadline under DEFER_ACCEPT does
    assert [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) for s in listeners.sockets] == [0, 0]
    assert listeners.deferral == 0
    silent = await _connect(_port(listeners))
    speaking = await _connect(_port(listeners))
    try:
        speaking.send(b"\x16\x03\x01")
        first, peer = await accepted.next()
        assert peer[:2] == silent.getsockname()
        first.close()
        second, peer = await accepted.next()
        assert peer[:2] == speaking.getsockname()
        second.close()
    finally:
        silent.close()
        speaking.close()
