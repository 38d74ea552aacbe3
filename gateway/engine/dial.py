"""Dialling the upstream: a non-blocking socket marked with `SO_MARK = dial_mark`, under a connect timeout.

The ruleset's dial guard keys on this mark: a dial can never reach the gateway or a sandbox.
"""

from __future__ import annotations

import asyncio
import socket


async def dial(address: str, port: int, mark: int, timeout: float) -> socket.socket:
    """A connected socket to (address, port); OSError or TimeoutError when it cannot be had in `timeout`."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):  # not wait_for: no extra coroutine layer per connection
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock
