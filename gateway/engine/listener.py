"""The transparent listening sockets nftables TPROXY feeds, and their accept loop.

Each accepted connection's original destination is the accepted socket's own address (IP_TRANSPARENT).
Accepting is driven by a reader callback on the event loop, bounded per wake-up (`ACCEPT_BATCH`) so one
listener cannot starve the loop (a full batch re-arms the reader: `gateway.readiness`); after accept()
failed (EMFILE, ENOBUFS...) the listener is left alone for `ACCEPT_BACKOFF` and then resumed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import structlog

from gateway.readiness import rearm_reader

log = structlog.get_logger("gateway.egress")

IP_TRANSPARENT = 19  # SOL_IP
IPV6_TRANSPARENT = 75  # IPPROTO_IPV6
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 64
#: After accept() failed (EMFILE, ENOBUFS...), the listener is left alone this long.
ACCEPT_BACKOFF = 0.05


def transparent_listener(family: int, host: str, port: int) -> socket.socket:
    """A non-blocking listening socket that accepts connections to any address (needs CAP_NET_ADMIN)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listeners:
    """The IPv4 and IPv6 transparent listeners; `on_accept(conn)` gets every accepted (non-blocking) socket."""

    __slots__ = ("on_accept", "sockets")

    def __init__(self, on_accept: Callable[[socket.socket], None]) -> None:
        self.on_accept = on_accept
        self.sockets: list[socket.socket] = []

    def open(self, hosts: tuple[str, str], port: int) -> None:
        loop = asyncio.get_running_loop()
        for family, host in ((socket.AF_INET, hosts[0]), (socket.AF_INET6, hosts[1])):
            listener = transparent_listener(family, host, port)
            self.sockets.append(listener)
            loop.add_reader(listener.fileno(), self._accept_ready, listener)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.sockets:
            loop.remove_reader(listener.fileno())
            listener.close()
        self.sockets.clear()

    def _accept_ready(self, listener: socket.socket) -> None:
        """Accept what the backlog holds (bounded per wake-up, so one listener cannot starve the loop)."""
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS...: the listener stays; back off a little
                log.warning("egress.accept_failed", error=str(exc))
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_BACKOFF, self._resume_accepting, listener)
                return
            conn.setblocking(False)
            self.on_accept(conn)
        rearm_reader(asyncio.get_running_loop(), listener.fileno(), self._accept_ready, listener)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener in self.sockets:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept_ready, listener)
