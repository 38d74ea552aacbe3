"""Handing a marked connection to the inspection tier: one line on a loopback connection, then the relay as usual.

The engine has decided the connection (an `egress.inspect` entry allowed its name) and vetted the address to dial;
the tier (mitmproxy with the gateway's addon) decides every request inside it. The hand-over line
(`gateway.inspection.handover_line`) names that vetted address, so the tier dials exactly what the fast path would
have (it does no DNS of its own), and carries the sandbox's identity and the entry as an `InspectionContext`, with
the per-run token. The tier takes the connection as a transparent one to that address (mitmproxy then runs no HTTP
CONNECT layer around every event of it) and answers `HANDOVER_ACCEPTED`, one byte, before any byte of mitmproxy's:
a tier that refuses, or is hung, is noticed here within the timeout, before the sandbox has been sent anything.

The engine knows the tier only as a `TierRoute` handed to it by the composition root.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

from gateway.engine.dial import dial
from gateway.inspection import HANDOVER_ACCEPTED, InspectionContext, handover_line


@dataclass(frozen=True, slots=True)
class TierRoute:
    """Where the inspection tier listens, its per-run token, whether it serves; `excluded(host)`: a host kept
    opaque (pinned)."""

    port: int
    token: str
    ready: Callable[[], bool]
    excluded: Callable[[str], bool]


class HandoverFailed(Exception):
    """The tier is down or refused the hand-over; the message says which."""


async def hand_over(
    route: TierRoute, target: str, port: int, context: InspectionContext, timeout: float
) -> socket.socket:
    """A loopback socket to the tier, which has accepted the hand-over for (target, port); HandoverFailed otherwise."""
    if not route.ready():
        raise HandoverFailed("the inspection tier is not running")
    try:
        sock = await dial("127.0.0.1", route.port, 0, timeout)
    except (OSError, TimeoutError) as exc:
        raise HandoverFailed(f"the inspection tier is unreachable: {exc}") from None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, handover_line(route.token, target, port, context))
            answer = await loop.sock_recv(sock, len(HANDOVER_ACCEPTED))
        if answer != HANDOVER_ACCEPTED:
            raise HandoverFailed(f"the inspection tier refused the hand-over (it answered {answer!r})")
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise HandoverFailed(f"the inspection tier did not answer the hand-over: {exc!r}") from None
    except BaseException:  # refused, or the connection's task cancelled: the socket goes either way
        sock.close()
        raise
    return sock
