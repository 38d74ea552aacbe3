"""The transparent listening sockets nftables TPROXY feeds, and their accept loop.

Each accepted connection's original destination is the accepted socket's own address (IP_TRANSPARENT).
Accepting is driven by a reader callback on the event loop, bounded per wake-up (`ACCEPT_BATCH`) so one
listener cannot starve the loop (a full batch re-arms the reader: `gateway.readiness`); after accept()
failed (EMFILE, ENOBUFS...) the listener is left alone for `ACCEPT_BACKOFF` and then resumed.

The listeners can ask the kernel to hold a new connection until its first bytes arrive (`TCP_DEFER_ACCEPT`,
for up to `DEFER_ACCEPT` seconds): a TLS or HTTP client sends its ClientHello or request right after the
handshake, so the accept then finds it already there and the peek reads it at once, instead of the engine
waiting for it on the event loop (a poll registration, a timer and a wake-up more per connection). A client that
says nothing (a server-speaks-first protocol) is accepted once the deferral is over (the kernel's SYN-ACK
retransmission, about a second); the engine counts that second against its peek deadline.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import structlog

from gateway.readiness import rearm_reader

log = structlog.get_logger("gateway.egress")

IP_TRANSPARENT = 19  # SOL_IP
IPV6_TRANSPARENT = 75  # IPPROTO_IPV6
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 64
#: After accept() failed (EMFILE, ENOBUFS...), the listener is left alone this long.
ACCEPT_BACKOFF = 0.05
#: Seconds the kernel holds a connection that has sent nothing yet, when the listeners defer (`Listeners.defer`).
DEFER_ACCEPT = 1


def transparent_listener(family: int, host: str, port: int) -> socket.socket:
    """A non-blocking listening socket that accepts connections to any address (needs CAP_NET_ADMIN)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted socket (no setsockopt per connection): the relay forwards each chunk as it comes.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
    """The IPv4 and IPv6 transparent listeners; `on_accept(conn, peer)` gets every accepted (non-blocking) socket
    with its peer's address."""

    __slots__ = ("deferral", "on_accept", "sockets")

    def __init__(self, on_accept: Callable[[socket.socket, tuple[Any, ...]], None]) -> None:
        self.on_accept = on_accept
        self.sockets: list[socket.socket] = []
        #: Seconds a connection that sent nothing was held by the kernel before it was accepted (0: none).
        self.deferral = 0

    def open(self, hosts: tuple[str, str], port: int, defer: bool) -> None:
        loop = asyncio.get_running_loop()
        for family, host in ((socket.AF_INET, hosts[0]), (socket.AF_INET6, hosts[1])):
            listener = transparent_listener(family, host, port)
            self.sockets.append(listener)
            loop.add_reader(listener.fileno(), self._accept_ready, listener)
        self.defer(defer)

    def defer(self, on: bool) -> None:
        """Have the kernel hold each new connection until its first bytes arrive, for up to `DEFER_ACCEPT` seconds
        (or not: `on` False). A listening socket takes the change at once, for the connections it accepts next."""
        seconds = DEFER_ACCEPT if on else 0
        for listener in self.sockets:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, seconds)
        self.deferral = seconds

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
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS...: the listener stays; back off a little
                log.warning("egress.accept_failed", error=str(exc))
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_BACKOFF, self._resume_accepting, listener)
                return
            conn.setblocking(False)
            self.on_accept(conn, peer)
        rearm_reader(asyncio.get_running_loop(), listener.fileno(), self._accept_ready, listener)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener in self.sockets:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept_ready, listener)
