"""WebSockets through a tunnel: the handshake (after an Origin check) goes to the app as the client made it, and
after the app's 101 the two streams are relayed byte for byte (the app and the client negotiate subprotocols and
extensions between themselves). The gateway follows frame boundaries from the app (`http1.FrameBoundary`) so
that it can end the stream with a Close frame of its own (1008) when the tunnel ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from gateway.tunnel.http1 import (
    Forwarding,
    FrameBoundary,
    ResponseFraming,
    client_response_head,
    close_frame,
    connection_tokens,
    upstream_request_head,
)
from gateway.tunnel.login import GATEWAY_COOKIES
from gateway.tunnel.model import Tunnel
from gateway.tunnel.pages import Refused
from gateway.tunnel.proxy import unavailable
from gateway.tunnel.record import Exchange
from gateway.tunnel.wire import (
    ClientConnection,
    Request,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamUnavailable,
)

#: Close code sent to WebSocket clients when the tunnel ends (1008: policy violation, RFC 6455).
WS_CLOSE_REVOKED: Final = 1008


def is_websocket(request: Request) -> bool:
    return (
        request.method == b"GET"
        and request.upgrade
        and request.fields.get(b"upgrade", b"").lower() == b"websocket"
        and b"upgrade" in connection_tokens(request.fields.get(b"connection"))
    )


async def relay_websocket(
    pool: UpstreamPool,
    conn: ClientConnection,
    request: Request,
    tunnel: Tunnel,
    host: str,
    forwarding: Forwarding,
    exchange: Exchange,
    alive: Callable[[], bool],
) -> bool:
    """Hands the handshake to the app and relays the upgraded streams until either side ends; `alive` says
    whether the tunnel still is (it may have been revoked while the app was being reached). Raises Refused."""
    origin = request.fields.get(b"origin")
    # Another site's page must not drive the app with the visitor's session (cross-site WebSocket hijacking).
    if origin is not None and origin.decode("latin-1").lower() != f"https://{host}":
        raise Refused(403, "ORIGIN_NOT_ALLOWED", "WebSocket connections are only accepted from this preview")
    head = upstream_request_head(
        request.method, request.target, request.headers, forwarding, content_length=None, chunked=False, websocket=True
    )
    upstream: UpstreamConnection | None = None
    try:
        try:
            upstream = await pool.connect(tunnel.address, tunnel.port)  # never pooled: it becomes the stream
        except UpstreamUnavailable:
            raise unavailable(tunnel) from None
        conn.peer = upstream
        upstream.start(head, head_request=False)
        try:
            answer = await upstream.response_head()
        except UpstreamError:
            raise Refused(502, "UPSTREAM_UNAVAILABLE", f"the app on port {tunnel.port} did not answer") from None
        if answer.status != 101 or not upstream.upgraded:
            raise Refused(502, "UPSTREAM_WEBSOCKET_REFUSED", f"the app refused the WebSocket ({answer.status})")
        no_body = ResponseFraming(False, None, False, False, False)
        upgrade = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        conn.write(
            client_response_head(
                101, answer.reason, answer.headers, no_body, extra=upgrade, gateway_cookies=GATEWAY_COOKIES
            )
        )
        exchange.status = 101
        exchange.head_sent = True
        conn.closer = closer = _relay_upgraded(conn, upstream, exchange)
        if not alive():  # revoked while we were connecting
            closer()
        await upstream.wait_closed()
        return False
    finally:
        conn.peer = conn.producer = conn.raw_sink = conn.closer = None
        if upstream is not None:
            exchange.bytes_down = upstream.body_bytes
            upstream.close()


def _relay_upgraded(conn: ClientConnection, upstream: UpstreamConnection, exchange: Exchange) -> Callable[[], None]:
    """Relay an upgraded stream both ways; returns what ends it with a Close frame (code 1008) to the client."""
    frames = FrameBoundary()

    def to_app(data: bytes) -> None:
        exchange.bytes_up += len(data)
        upstream.write(data)

    def to_client(data: bytes) -> None:
        frames.feed(data)
        conn.write(data)

    def close() -> None:
        if frames.at_boundary:  # never inside a frame: the client would see garbage instead of a Close
            conn.write(close_frame(WS_CLOSE_REVOKED, b"tunnel ended"))
        conn.close()
        upstream.close()

    conn.producer, upstream.producer = upstream, conn
    conn.raw_sink = to_app
    tail, conn.upgrade_tail = conn.upgrade_tail, b""
    if tail:
        to_app(tail)
    conn.set_paused("upgrade", False)
    upstream.attach(to_client)
    return close
