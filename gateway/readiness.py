"""Reader callbacks that stay woken on every event loop `gateway run` can use.

uvloop (libuv's `uv_poll`) reports an error event on a descriptor (EPOLLERR: a TCP reset, an ICMP error on
a socket that reports them) by calling the reader once and then no longer polling that descriptor, where
the stdlib loop (level-triggered) calls it again for as long as there is something to read. So a reader
returns only once its source would block (or it removed itself); one that stops early, to let other work
run or after an error it consumed, re-arms: removed and added again, the descriptor is polled afresh and,
if still readable, fires at once.

A descriptor handed from one owner to the next (a dial's writer, then the relay's reader) can keep its poll
registration in between (`park_reader`): uvloop tears a registration down when its last callback goes, and
making it again costs an ioctl, several epoll_ctl calls and a handle.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any


def rearm_reader(loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[..., Any], *args: Any) -> None:
    """The reader on `fd` returned before `fd` would block: have it polled afresh."""
    loop.remove_reader(fd)
    loop.add_reader(fd, callback, *args)


def park_reader(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Hold `sock`'s poll registration for its next owner, whose `add_reader` replaces this placeholder. Should the
    socket turn readable first, the placeholder removes itself: the next owner's reader then registers afresh and
    is told at once. The socket itself (not its number) is registered, so that under uvloop closing it while the
    placeholder is there cannot free its number for another socket to inherit the registration."""
    loop.add_reader(sock, _unpark, loop, sock)


def _unpark(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    loop.remove_reader(sock)
