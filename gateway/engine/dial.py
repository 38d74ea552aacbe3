"""Dialling the upstream: a non-blocking socket marked with `SO_MARK = dial_mark`, under a connect timeout.

The ruleset's dial guard keys on this mark: a dial can never reach the gateway or a sandbox.

The connect is driven here (`connect_ex`, then one writer callback) rather than by `loop.sock_connect`:
uvloop's `sock_connect` resolves even an address literal through `getaddrinfo` in its thread pool (a
thread hand-off per connection), and the address is always a literal here (the gateway resolved it).
The timeout is a timer on the same future, not an `asyncio.timeout` scope.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

from gateway.readiness import park_reader

#: connect_ex's answers that mean "connecting": an interrupted connect goes on asynchronously too. (EAGAIN is
#: no such answer on Linux TCP: it means no local port was free, so the socket would never connect.)
_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EINTR})


def _writable(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _expired(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


async def dial(address: str, port: int, mark: int, timeout: float, *, park: bool = False) -> socket.socket:
    """A connected socket to (address, port); OSError or TimeoutError when it cannot be had in `timeout`. With
    `park`, the poll registration the connect was waited on is kept for the caller's reader
    (`gateway.readiness.park_reader`): the caller must then add its reader before it yields to the loop."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # non-blocking without an ioctl more
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex((address, port))
        if error in _IN_PROGRESS:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            fd = sock.fileno()
            loop.add_writer(fd, _writable, done)
            timer = loop.call_later(timeout, _expired, done)
            try:
                await done
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if park and not error:
                    park_reader(loop, sock)  # before the writer goes, so the registration stays
            finally:
                loop.remove_writer(fd)
                timer.cancel()
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock
