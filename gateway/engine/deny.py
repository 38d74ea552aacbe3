"""Explicit denials, never a silent hang: a TLS alert, an HTTP 403 with X-Gateway-Reason, a 502, or RST.

The bytes of the alert and the 403 are built by `gateway.peek` (`tls_alert`, `http_forbidden`); this module
writes them. After a denial is written the client's remaining bytes are drained for a moment, so that
closing with unread bytes (which makes the kernel send RST) cannot destroy the denial before the client
read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from gateway.peek.http1 import sanitize_reason

READ_CHUNK = 64 * 1024
#: After a denial is written, how long the client's remaining bytes are drained (so closing does not RST
#: away the 403 / alert before the client read it).
DRAIN_AFTER_DENIAL = 1.0
DRAIN_MAX_BYTES = 256 * 1024

_RST_LINGER = struct.pack("ii", 1, 0)


def shutdown_write(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the explicit denial for opaque TCP, never a silent hang."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    sock.close()


async def deny_with(sock: socket.socket, payload: bytes) -> None:
    """Write the denial, send FIN, and drain what the client still sends for a moment, so that closing with
    unread bytes (which makes the kernel send RST) cannot destroy the denial before the client reads it."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(DRAIN_AFTER_DENIAL):
            await loop.sock_sendall(sock, payload)
            shutdown_write(sock)
            drained = 0
            while drained < DRAIN_MAX_BYTES:
                chunk = await loop.sock_recv(sock, READ_CHUNK)
                if not chunk:
                    break
                drained += len(chunk)
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()


def bad_gateway(reason: str) -> bytes:
    body = f"Upstream unreachable: {sanitize_reason(reason)}\n".encode("ascii")
    return (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(body)
        + body
    )
