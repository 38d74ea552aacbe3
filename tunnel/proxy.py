"""The path to the sandbox app: a request relayed to the address and port its tunnel records, and the answer back.

The upstream is only ever the tunnel's own address and port, so the server can never be used as an open proxy.
Requests go out on a keep-alive pool of app connections (`gateway.tunnel.wire.UpstreamPool`); the request body
streams to the app as it arrives and the answer's body to the client, chunk by chunk in the callbacks that
receive them, with backpressure both ways. The gateway's cookie and Basic credentials are stripped on the way
out, and the app cannot set the gateway's cookie on the way back (`gateway.tunnel.http1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from gateway.tunnel.http1 import (
    LAST_CHUNK,
    Forwarding,
    chunk,
    client_response_head,
    response_framing,
    upstream_request_head,
)
from gateway.tunnel.login import GATEWAY_COOKIES
from gateway.tunnel.model import Tunnel
from gateway.tunnel.pages import Refused
from gateway.tunnel.record import Exchange
from gateway.tunnel.wire import (
    ClientConnection,
    Request,
    RequestBody,
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamInvalid,
    UpstreamPool,
    UpstreamUnavailable,
)

log = structlog.get_logger("gateway.tunnel.proxy")


@dataclass(slots=True)
class Route:
    """What the last request's Host on a connection led to (keep-alive requests mostly repeat it)."""

    raw_host: bytes | None
    tunnel: Tunnel
    host: str
    forwarding: Forwarding


def unavailable(tunnel: Tunnel) -> Refused:
    return Refused(502, "UPSTREAM_UNAVAILABLE", f"nothing answers on port {tunnel.port} in the sandbox")


class AppProxy:
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def forwarding(self, conn: ClientConnection, tunnel: Tunnel, host: str) -> Forwarding:
        """The headers the app is told about the client (`host` is the request's normalised Host)."""
        memo = conn.memo
        if isinstance(memo, Route) and memo.tunnel is tunnel and memo.host == host:
            return memo.forwarding
        upstream_host = f"localhost:{tunnel.port}" if tunnel.rewrite_host else host
        return Forwarding(
            host=upstream_host.encode("latin-1"),
            forwarded_host=host.encode("latin-1"),
            forwarded_for=(conn.remote or "?").encode(),
            strip_cookies=GATEWAY_COOKIES,
            strip_basic=tunnel.protected,
        )

    async def http(
        self, conn: ClientConnection, request: Request, tunnel: Tunnel, host: str, exchange: Exchange
    ) -> bool:
        """Relays the exchange; returns whether the client connection may stay open. Raises Refused (502)."""
        body = request.body
        head = upstream_request_head(
            request.method,
            request.target,
            request.headers,
            self.forwarding(conn, tunnel, host),
            content_length=request.content_length,
            chunked=request.chunked,
            websocket=False,
            fields=request.fields,
        )
        if body is not None and request.http11 and request.fields.get(b"expect", b"").lower() == b"100-continue":
            # Answered here (the app never sees Expect), so uploads from curl and the like start at once.
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        upstream: UpstreamConnection | None = None
        try:
            upstream, answer = await self._open_exchange(conn, request, tunnel, head)
            if body is not None:
                # Never pooled after a body: an app server that answers without reading all of it (early, or
                # not at all, as naive servers do) takes the rest for the start of the next request on this
                # connection, and the client's bytes would then prefix another client's request.
                upstream.reusable = False
            framing = response_framing(
                answer.status,
                answer.fields,
                head_request=request.method == b"HEAD",
                client_keep_alive=request.keep_alive,
                client_http11=request.http11,
            )
            exchange.status = answer.status
            out = client_response_head(
                answer.status,
                answer.reason,
                answer.headers,
                framing,
                fields=answer.fields,
                gateway_cookies=GATEWAY_COOKIES,
            )
            exchange.head_sent = True
            if framing.has_body:
                # What came with the head goes out with the head: one TLS record for a small response.
                held = upstream.take_held()
                if held:
                    out += chunk(held) if framing.chunk_to_client else held
                if not upstream.complete:
                    conn.write(out)
                    out = b""
                    conn.producer = upstream  # the client not taking more pauses reading from the app
                    if framing.chunk_to_client:
                        upstream.attach(lambda data: conn.write(chunk(data)))
                    else:
                        upstream.attach(conn.write)
                    try:
                        await upstream.wait_done()  # the body streams meanwhile, chunk by chunk, as it arrives
                    except UpstreamError as exc:
                        # The head is already sent: the only honest signal left is to cut the connection.
                        log.info("tunnel.stream_aborted", tunnel=tunnel.id[:4], error=str(exc))
                        conn.close()
                        return False
                if framing.chunk_to_client:
                    out += LAST_CHUNK
            if out:
                conn.write(out)
            exchange.bytes_down = upstream.body_bytes
            self.pool.release(upstream)
            upstream = None
            return not framing.close_client
        finally:
            conn.peer = conn.producer = None
            if body is not None:
                exchange.bytes_up = body.received
            if upstream is not None:
                exchange.bytes_down = upstream.body_bytes
                upstream.close()

    async def _open_exchange(
        self, conn: ClientConnection, request: Request, tunnel: Tunnel, head: bytes
    ) -> tuple[UpstreamConnection, ResponseHead]:
        """Send the request (head now, body as it arrives) on a pooled connection and wait for the answer's head.
        A reused connection the app closed meanwhile is retried once on a new one, when no body was sent."""
        body = request.body
        for attempt in (0, 1):
            try:
                upstream = (self.pool.take_idle(tunnel.address, tunnel.port) if attempt == 0 else None) or (
                    await self.pool.connect(tunnel.address, tunnel.port)
                )
            except UpstreamUnavailable:
                raise unavailable(tunnel) from None
            conn.peer = upstream
            upstream.start(head, head_request=request.method == b"HEAD")
            if body is not None:
                _stream_body(conn, body, upstream, chunked=request.chunked)
            try:
                answer = await upstream.response_head()
                if answer.status == 101:  # switching protocols without being asked to
                    raise UpstreamInvalid("an upgrade nobody asked for")
                return upstream, answer
            except UpstreamUnavailable:
                upstream.close()
                if attempt == 0 and upstream.reused and body is None and not conn.closed:
                    continue  # the app closed an idle keep-alive connection just as it was reused
                raise unavailable(tunnel) from None
            except UpstreamError:  # the app answered something that is not HTTP
                upstream.close()
                raise Refused(502, "UPSTREAM_ERROR", f"the app on port {tunnel.port} gave no valid answer") from None
        raise AssertionError("unreachable")


def _stream_body(conn: ClientConnection, body: RequestBody, upstream: UpstreamConnection, *, chunked: bool) -> None:
    """The request body to the app as it arrives (re-chunked when the client chunked it), with backpressure."""
    upstream.producer = conn  # the app not taking more pauses reading from the client
    if chunked:
        body.attach(lambda data: upstream.write(chunk(data)), lambda: upstream.write(LAST_CHUNK))
    else:
        body.attach(upstream.write, _nothing)


def _nothing() -> None:
    pass
