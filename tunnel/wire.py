"""HTTP/1.1 connections for the tunnel, the I/O part: client connections (behind the loop's TLS), app
connections in a keep-alive pool, and the relays between them. The heads, framing and header rules are
in `gateway.tunnel.http1`; what a request means (routing, passwords, pages) belongs to `gateway.tunnel.server`
and the modules it hands requests to.

Bodies are never buffered whole. Bytes are handed on in the callback that received them (no task switch
per chunk), and backpressure is wired across: when one side's transport stops taking writes, the other
side's transport stops reading, until the first one drains.

Parsing is llhttp (through httptools), strict: a request with both Content-Length and chunked framing, or
anything else malformed, is a 400 and the connection closes; an app that answers something that is not
HTTP is an upstream error.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, cast

import httptools

from gateway.tunnel.http1 import (
    HeadBuilder,
    Headers,
    HeadTooLarge,
    header_map,
    is_chunked,
    response_has_body,
    response_length,
    simple_response,
    valid_reason,
)

#: Request body bytes held for a handler that has not taken the body yet; past this, reading pauses.
BODY_BUFFER: Final = 256 * 1024
#: Idle keep-alive connections kept per app (address, port); more are closed when they come back.
MAX_IDLE_PER_APP: Final = 64
APP_IDLE_TIMEOUT: Final = 30.0  # an idle app connection is closed after this long


class Pausable:
    """The other end of a relay: what to pause when this end cannot take more."""

    def pause_reading(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def resume_reading(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class HeadCallbacks:
    """The httptools callbacks that collect one message head, shared by the request and the response side.
    The first line's callback (`on_url` for a request, `on_status` for a response) is `on_first_line`."""

    _head: HeadBuilder | None

    def on_message_begin(self) -> None:
        self._head = HeadBuilder()

    def on_first_line(self, data: bytes) -> None:
        assert self._head is not None
        self._head.add_first(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is not None:  # None: a trailer after a chunked body (dropped, as hop-by-hop framing)
            self._head.add_header(name, value)

    def take_head(self) -> HeadBuilder:
        head, self._head = self._head, None
        assert head is not None
        return head


# --------------------------------------------------------------------------- errors


class UpstreamError(Exception):
    """The app could not be used for this exchange."""


class UpstreamUnavailable(UpstreamError):
    """Nothing accepted the connection, it timed out, or it closed before answering."""


class UpstreamInvalid(UpstreamError):
    """The app answered something that is not HTTP (or a head over the limits)."""


class UpstreamBroken(UpstreamError):
    """The app broke off in the middle of a response body."""


# --------------------------------------------------------------------------- requests


class RequestBody:
    """A request body as it arrives: held (bounded: past BODY_BUFFER the client connection stops reading)
    until the handler attaches a sink, then handed on chunk by chunk."""

    __slots__ = ("_chunks", "_conn", "_on_done", "_sink", "_waiter", "done", "held", "received")

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self._on_done: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.held = 0
        self.received = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self._sink is not None:
            self._sink(data)
            return
        self._chunks.append(data)
        self.held += len(data)
        if self.held > BODY_BUFFER:
            self._conn.set_paused("body", True)
        self._wake()

    def finish(self) -> None:
        self.done = True
        if self._on_done is not None:
            self._on_done()
        self._wake()

    def fail(self) -> None:
        self._wake()

    def attach(self, sink: Callable[[bytes], None], on_done: Callable[[], None]) -> None:
        """From now on every chunk goes to `sink` at once; `on_done` runs when the body is complete."""
        chunks, self._chunks, self.held = self._chunks, [], 0
        for data in chunks:
            sink(data)
        self._sink, self._on_done = sink, on_done
        self._conn.set_paused("body", False)
        if self.done:
            on_done()

    async def read(self, limit: int) -> bytes:
        """The whole body, or its first `limit`+1 bytes when it is longer (for small forms only)."""
        while not self.done and self.held <= limit and not self._conn.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = b"".join(self._chunks)
        return data[: limit + 1]

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Request:
    """One request head from a client, and its body when it has one."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "content_length",
        "fields",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "target",
        "upgrade",
    )

    def __init__(
        self, method: bytes, target: bytes, headers: Headers, *, http11: bool, keep_alive: bool, upgrade: bool
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.fields = fields = header_map(headers)
        self.http11 = http11
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.content_length: bytes | None = fields.get(b"content-length")
        self.chunked = is_chunked(fields.get(b"transfer-encoding"))
        self.body: RequestBody | None = None
        self.complete = False  # the whole request, body included, has been read

    def header(self, name: bytes) -> str:
        """A header's value as text ("" when absent); `name` lowercased."""
        value = self.fields.get(name)
        return value.decode("latin-1") if value is not None else ""


Handler = Callable[["ClientConnection", Request], Awaitable[None]]


# --------------------------------------------------------------------------- client connections


class ClientConnection(asyncio.Protocol, Pausable, HeadCallbacks):
    """A client's connection: requests parsed as they arrive and handled one at a time (pipelined ones wait,
    with reading paused), responses written by the handler through `write`."""

    def __init__(
        self,
        handler: Handler,
        registry: set[ClientConnection],
        on_lost: Callable[[ClientConnection], None] | None = None,
    ) -> None:
        self._handler = handler
        self._registry = registry
        self._on_lost = on_lost
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        self.remote_port = 0
        self.local: tuple[str, int] = ("", 0)
        self.closed = False
        self.current: Request | None = None
        self.task: asyncio.Task[None] | None = None  # serves the requests, one at a time
        self.idle_since = time.monotonic()
        #: While a response or an upgraded stream is relayed: the app connection feeding this client.
        self.producer: Pausable | None = None
        #: The app connection of the exchange in progress: it is aborted when this client goes away.
        self.peer: UpstreamConnection | None = None
        #: After an upgrade, bytes from the client go here instead of the parser.
        self.raw_sink: Callable[[bytes], None] | None = None
        self.upgrade_tail = b""
        #: The handler's memo for this connection (keep-alive requests mostly repeat the same Host).
        self.memo: object = None
        #: The tunnel this connection serves (revocation closes it) and, for an upgraded stream, what ends it.
        self.tunnel_id: str | None = None
        self.closer: Callable[[], None] | None = None
        self._upgraded = False
        self._head: HeadBuilder | None = None
        self._receiving: Request | None = None
        self._parsed: list[Request] = []  # heads completed by the read being parsed, not yet accepted
        self._queue: deque[Request] = deque()  # requests read and not yet handled
        self._next: asyncio.Future[None] | None = None  # the serving task waits here for a request
        self._paused: set[str] = set()
        self._reading = True
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TLS transport is not a subclass
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote, self.remote_port = str(peer[0]), int(peer[1])
        local = transport.get_extra_info("sockname")
        if local:
            self.local = (str(local[0]), int(local[1]))
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        if self.raw_sink is not None:
            self.raw_sink(data)
            return
        if self._upgraded:
            self.upgrade_tail += data  # bytes after an upgrade request, before the handler relays them
            if len(self.upgrade_tail) > BODY_BUFFER:
                self.set_paused("upgrade", True)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded = True
            self.upgrade_tail = data[exc.args[0] :]
        except (httptools.HttpParserError, HeadTooLarge) as exc:
            self._bad_request(exc)
            return
        if self._parsed:
            self._dispatch()

    def eof_received(self) -> bool | None:
        return None  # close our side too (a TLS transport ignores half-close anyway)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._registry.discard(self)
        if self._on_lost is not None:
            self._on_lost(self)
        if self.peer is not None:
            self.peer.abort(UpstreamBroken("the client went away"))
        for request in (self._receiving, self.current, *self._queue):
            if request is not None and request.body is not None:
                request.body.fail()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client went away"))
            self._drain.exception()  # retrieved here: a writer may never await it
        if self._next is not None and not self._next.done():
            self._next.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.producer is not None:
            self.producer.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.producer is not None:
            self.producer.resume_reading()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ------------------------------------------------------------------ httptools callbacks

    on_url = HeadCallbacks.on_first_line

    def on_headers_complete(self) -> None:
        head = self.take_head()
        parser = self.parser
        request = Request(
            parser.get_method(),
            head.first,
            head.headers,
            http11=parser.get_http_version() == "1.1",
            keep_alive=parser.should_keep_alive(),
            upgrade=parser.should_upgrade(),
        )
        length = request.content_length
        if request.chunked or (length is not None and length.strip() != b"0"):
            request.body = RequestBody(self)
        self._receiving = request
        # Handed on only once feed_data returns without an error: llhttp refuses some heads (a Transfer-Encoding
        # that is not chunked, say) only after this callback, and a refused request must never reach the app.
        self._parsed.append(request)

    def on_body(self, data: bytes) -> None:
        request = self._receiving
        if request is not None and request.body is not None:
            request.body.feed(data)

    def on_message_complete(self) -> None:
        request, self._receiving = self._receiving, None
        if request is not None:
            request.complete = True
            if request.body is not None:
                request.body.finish()

    # ------------------------------------------------------------------ the handler's side

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def finish(self, request: Request, *, keep_alive: bool) -> None:
        """The handler is done with `request`: on to the next one, or close."""
        self.current = self.producer = self.peer = None
        if self.closed:
            return
        if not (keep_alive and request.keep_alive and request.complete) or self._upgraded:
            self.close()
            return
        self.idle_since = time.monotonic()
        if not self._queue and self._paused:
            self.set_paused("pipeline", False)

    def close(self) -> None:
        """Close after what is written has gone out."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def set_paused(self, reason: str, paused: bool) -> None:
        if paused:
            self._paused.add(reason)
        else:
            self._paused.discard(reason)
        want = not self._paused
        if want != self._reading and self.transport is not None and not self.closed:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def pause_reading(self) -> None:
        self.set_paused("peer", True)

    def resume_reading(self) -> None:
        self.set_paused("peer", False)

    # ------------------------------------------------------------------ internals

    def _dispatch(self) -> None:
        """The requests whose heads this read completed (and llhttp accepted) go to the serving task."""
        self._queue.extend(self._parsed)
        self._parsed.clear()
        if self.current is not None:
            self.set_paused("pipeline", True)  # pipelined: it waits, and so does the rest of the stream
        elif self.task is None:
            self.task = self.loop.create_task(self._serve())
        elif self._next is not None and not self._next.done():
            self._next.set_result(None)

    async def _serve(self) -> None:
        """The connection's requests, one after another as they come: one task for the connection's life
        rather than one per request."""
        try:
            while not self.closed:
                if not self._queue:
                    self._next = self.loop.create_future()
                    await self._next  # the next request's head, or the connection's end
                    continue
                request = self.current = self._queue.popleft()
                await self._handler(self, request)  # it ends with finish()
        finally:
            self._next = None
            if not self.closed:
                self.close()  # only a bug in a handler gets here with the connection open

    def _bad_request(self, exc: Exception) -> None:
        too_large = isinstance(exc, HeadTooLarge) or isinstance(exc.__context__, HeadTooLarge)  # raised in a callback
        status = 431 if too_large else 400
        if self.current is None and self.transport is not None:
            body = b'{"code": "BAD_REQUEST", "message": "malformed HTTP request", "field": null}'
            self.write(simple_response(status, [(b"Content-Type", b"application/json")], body, close=True))
        # Nothing read on this connection after the one in progress is handled: not the malformed request
        # (whose head llhttp may have reported complete before refusing it), nor anything pipelined.
        self._parsed.clear()
        self._queue.clear()
        self.close()
        self._upgraded = True  # nothing more is parsed on this connection


# --------------------------------------------------------------------------- app connections


class ResponseHead:
    __slots__ = ("fields", "headers", "keep_alive", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: Headers, keep_alive: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.fields = header_map(headers)
        self.keep_alive = keep_alive


class UpstreamConnection(asyncio.Protocol, Pausable, HeadCallbacks):
    """A connection to an app: one exchange at a time (`start`, `response_head`, `attach`, `wait_done`),
    then back to its pool when the response was read to its end and both sides allow keep-alive."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False  # it served an exchange before this one
        self.reusable = True
        self.idle_since = 0.0
        #: While a request body or an upgraded stream is relayed: the client connection feeding this app.
        self.producer: Pausable | None = None
        self.body_bytes = 0  # response body bytes of the current exchange (everything, once upgraded)
        self.head: ResponseHead | None = None
        self.complete = False
        self.upgraded = False
        self._active = False
        self._received = 0
        self._head_request = False
        self._informational = False
        self._head: HeadBuilder | None = None
        self._error: UpstreamError | None = None
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._done_waiter: asyncio.Future[None] | None = None
        self._closed_waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._held: list[bytes] = []
        self._reading = True
        self._write_paused = False

    # ------------------------------------------------------------------ exchange

    def start(self, head: bytes, *, head_request: bool) -> None:
        """Send a request head; the body (if any) follows through `write`."""
        self._active = True
        self._head_request = head_request
        self.head = None
        self.complete = False
        self.body_bytes = 0
        self._received = 0
        self._sink = None
        self._held = []
        self.write(head)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def response_head(self) -> ResponseHead:
        if self.head is None:
            if self._error is not None:
                raise self._error
            self._head_waiter = self.loop.create_future()
            try:
                return await self._head_waiter
            finally:
                self._head_waiter = None
        return self.head

    def take_held(self) -> bytes:
        """The body bytes that arrived before anyone attached (typically with the head, in the same read)."""
        held, self._held = self._held, []
        return b"".join(held)

    def attach(self, sink: Callable[[bytes], None]) -> None:
        """Every body chunk (or, once upgraded, every byte) goes to `sink` from now on."""
        held, self._held = self._held, []
        for data in held:
            sink(data)
        self._sink = sink

    async def wait_done(self) -> None:
        """Until the response body has ended (raises UpstreamBroken when the app broke off)."""
        if self.complete:
            return
        if self._error is not None:
            raise self._error
        self._done_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._done_waiter
        finally:
            self._done_waiter = None

    async def wait_closed(self) -> None:
        """Until the connection is closed (an upgraded stream ends so)."""
        if not self.closed:
            self._closed_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._closed_waiter
            finally:
                self._closed_waiter = None

    def abort(self, error: UpstreamError) -> None:
        """End the exchange now (the client went away, or the tunnel ended)."""
        self.reusable = False
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def input_waiting(self) -> bool:
        """Whether the app sent something (bytes, or its close) that the loop has not read yet. An idle
        connection must have nothing to say: bytes there would be taken for the answer to the next request."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self.on_body(data)
            return
        if not self._active or self.complete:
            # Bytes after a complete response and before the next request: a second answer the app wants to
            # slip in front of the next request. Nothing of it is passed on, and the connection is not reused.
            self.abort(UpstreamInvalid("the app sent bytes after its response"))
            return
        self._received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            self.reusable = False
            tail = data[exc.args[0] :]
            if tail:
                self.on_body(tail)
        except (httptools.HttpParserError, HeadTooLarge) as exc:
            reason = exc.__context__ if isinstance(exc.__context__, UpstreamInvalid) else None  # raised in a callback
            self.abort(reason or UpstreamInvalid(f"not HTTP: {type(exc).__name__}"))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self.pool.forget(self)
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        if not self._active:
            return
        if self.head is None:
            if self._received:
                self._fail(UpstreamInvalid("the app closed in the middle of its response head"))
            else:
                self._fail(UpstreamUnavailable("the app closed the connection before answering"))
        elif not self.complete:
            until_close = (
                response_has_body(self.head.status, head_request=self._head_request)
                and (response_length(self.head.fields)[1])
            )
            if until_close or self.upgraded:
                self._finish()
            else:
                self._fail(UpstreamBroken("the app closed the connection in the middle of the body"))

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.producer is not None:
            self.producer.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.producer is not None:
            self.producer.resume_reading()

    def pause_reading(self) -> None:
        if self._reading and self.transport is not None and not self.closed:
            self._reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading and self.transport is not None and not self.closed:
            self._reading = True
            self.transport.resume_reading()

    # ------------------------------------------------------------------ httptools callbacks

    on_status = HeadCallbacks.on_first_line

    def on_message_begin(self) -> None:
        if self.complete:  # a second response in the same read: see data_received
            raise UpstreamInvalid("the app sent more than one response")
        HeadCallbacks.on_message_begin(self)

    def on_headers_complete(self) -> None:
        builder = self.take_head()
        status = self.parser.get_status_code()
        if not 100 <= status <= 599 or self.parser.get_http_version() not in ("1.0", "1.1"):
            raise UpstreamInvalid(f"not an HTTP/1.x status line (status {status})")
        if not valid_reason(builder.first):
            raise UpstreamInvalid("control characters in the status line")
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue, 103 Early Hints: not passed on, the real answer follows
            return
        head = ResponseHead(status, builder.first, builder.headers, self.parser.should_keep_alive())
        self.head = head
        if not head.keep_alive:
            self.reusable = False
        if self._head_request:
            self.reusable = False  # the parser would wait for the body a HEAD answer announces but never sends
            self._finish()
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(head)

    def on_body(self, data: bytes) -> None:
        if self.complete and not self.upgraded:
            return  # a body after a HEAD answer (the exchange has ended): never passed on
        self.body_bytes += len(data)
        if self._sink is not None:
            self._sink(data)
        else:
            self._held.append(data)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._finish()

    # ------------------------------------------------------------------ internals

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        if self._done_waiter is not None and not self._done_waiter.done():
            self._done_waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        for waiter in (self._head_waiter, self._done_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)


class UpstreamPool:
    """Keep-alive connections to apps, per (address, port): reused while idle, at most MAX_IDLE_PER_APP each,
    closed after APP_IDLE_TIMEOUT idle or when the app closes them."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self.created = 0

    def take_idle(self, host: str, port: int) -> UpstreamConnection | None:
        """An idle connection to (host, port), if there is one (then `connect` for a new one)."""
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if conn.usable and not conn.input_waiting():
                conn.reused = True
                return conn
            conn.abort(UpstreamInvalid("the app sent bytes or closed while idle"))
        return None

    async def acquire(self, host: str, port: int) -> UpstreamConnection:
        """An idle connection to (host, port) if there is one, else a new one."""
        return self.take_idle(host, port) or await self.connect(host, port)

    async def connect(self, host: str, port: int) -> UpstreamConnection:
        """A new connection (raises UpstreamUnavailable)."""
        loop = asyncio.get_running_loop()
        key = (host, port)
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: UpstreamConnection(self, key), host, port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"cannot connect: {type(exc).__name__}") from None
        self.created += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool when the exchange ended cleanly and the connection may be reused; else closed."""
        conn._active = False
        conn.producer = conn._sink = None
        if conn.reusable and conn.complete and not conn.closed:  # (an upgraded connection is never reusable)
            idle = self._idle.get(conn.key)
            if idle is None:
                idle = self._idle[conn.key] = []
            if len(idle) < MAX_IDLE_PER_APP:
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def idle_count(self, host: str, port: int) -> int:
        return len(self._idle.get((host, port), ()))

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key, idle in list(self._idle.items()):
            for conn in [c for c in idle if now - c.idle_since > APP_IDLE_TIMEOUT]:
                idle.remove(conn)
                conn.close()
            if not idle:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
        self._idle.clear()
