"""Handing a marked connection to the inspection tier: one CONNECT on loopback, then the relay as usual.

The engine has decided the connection (an `egress.inspect` entry allowed its name) and vetted the
address to dial; the tier (mitmproxy with the gateway's addon) decides every request inside it. The
hand-over request names that vetted address as the CONNECT target, so the tier dials exactly what the
fast path would have (it does no DNS of its own), and carries the sandbox's identity and the entry as
an `InspectionContext`, authenticated by the per-run token (`Proxy-Authorization`).

The engine knows the tier only as a `TierRoute` handed to it by the composition root.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

from gateway.engine.dial import dial
from gateway.inspection import InspectionContext

#: The tier's answer to the hand-over is one short status line and a few headers.
MAX_ANSWER = 4096


@dataclass(frozen=True, slots=True)
class TierRoute:
    """Where the inspection tier listens and whether it serves; `excluded(host)`: a host kept opaque (pinned)."""

    port: int
    authorization: str
    ready: Callable[[], bool]
    excluded: Callable[[str], bool]


class HandoverFailed(Exception):
    """The tier is down or refused the hand-over; the message says which."""


def connect_request(route: TierRoute, target: str, port: int, context: InspectionContext) -> bytes:
    authority = f"[{target}]:{port}" if ":" in target else f"{target}:{port}"
    return (
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {route.authorization}\r\n"
        f"X-Gateway-Context: {context.encode()}\r\n\r\n"
    ).encode("ascii")


async def hand_over(
    route: TierRoute, target: str, port: int, context: InspectionContext, timeout: float
) -> socket.socket:
    """A loopback socket to the tier, past its `200` to the CONNECT for (target, port); HandoverFailed otherwise."""
    if not route.ready():
        raise HandoverFailed("the inspection tier is not running")
    try:
        sock = await dial("127.0.0.1", route.port, 0, timeout)
    except (OSError, TimeoutError) as exc:
        raise HandoverFailed(f"the inspection tier is unreachable: {exc}") from None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, connect_request(route, target, port, context))
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await loop.sock_recv(sock, MAX_ANSWER - len(answer))
                if not chunk or len(answer) + len(chunk) >= MAX_ANSWER:
                    raise HandoverFailed("the inspection tier closed the hand-over or answered too much")
                answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"200" or rest:
            raise HandoverFailed(f"the inspection tier refused the hand-over: {head[:80]!r}")
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise HandoverFailed(f"the inspection tier did not answer the hand-over: {exc!r}") from None
    except BaseException:  # refused, or the connection's task cancelled: the socket goes either way
        sock.close()
        raise
    return sock
