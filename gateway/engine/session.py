"""The peek session: read (never forward) a connection's first bytes under a deadline and a size bound.

A TLS ClientHello (reassembled across records and segments) gives the SNI, an HTTP/1.x request head
gives the Host, anything else is opaque. A client that sends nothing within the deadline is taken as
opaque (server-speaks-first protocols). The protocol logic is `gateway.peek`'s; this module only feeds
it and says, with one typed result, what the peek found:

- `TlsHello`: a complete ClientHello;
- `HttpRequest`: a complete first request head (and the tracker following the rest of the stream);
- `Opaque`: neither (possibly nothing at all: the client waits for the server);
- `PeekFailed`: malformed, too large, too slow or cut short, with the reason;
- `Closed`: connected and closed without a byte (nothing to decide, nothing to record).

The bytes read are kept in the result and handed over (not copied) to the relay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.peek.classify import NEED_MORE, TrafficKind, classify
from gateway.peek.http1 import HttpError, HttpEvent, HttpRequestTracker, RequestHead
from gateway.peek.tls import ClientHello, ClientHelloParser, PeekError

READ_CHUNK = 64 * 1024


@dataclass(slots=True)
class TlsHello:
    data: bytearray
    hello: ClientHello


@dataclass(slots=True)
class HttpRequest:
    data: bytearray
    head: RequestHead
    tracker: HttpRequestTracker
    later: list[HttpEvent]  # HTTP events after the first head (pipelined requests)


@dataclass(slots=True)
class Opaque:
    data: bytearray  # empty: the client said nothing within the deadline


@dataclass(frozen=True, slots=True)
class PeekFailed:
    kind: TrafficKind | None  # what the bytes were classified as, None when not even that
    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The client closed before sending a byte."""


type Peeked = TlsHello | HttpRequest | Opaque | PeekFailed | Closed


class Peeker:
    """Sans-I/O peek: bytes in, a `Peeked` out once the traffic is classified and its name known (or not
    decidable within `max_bytes`). Nothing read is ever forwarded by the peek itself."""

    __slots__ = ("buf", "events", "kind", "max_bytes", "parser", "tracker")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.kind: TrafficKind | None = None
        self.parser: ClientHelloParser | None = None
        self.tracker: HttpRequestTracker | None = None
        self.events: list[HttpEvent] = []

    @property
    def want(self) -> int:
        """How many more bytes may be read (0: the bound is reached, see `too_large`)."""
        return self.max_bytes - len(self.buf)

    def too_large(self) -> PeekFailed:
        return PeekFailed(self.kind, f"{self.kind or 'protocol'} header larger than {self.max_bytes} bytes")

    def timed_out(self, timeout: float) -> Opaque | PeekFailed:
        if not self.buf:
            return Opaque(self.buf)  # nothing said: a server-speaks-first protocol
        return PeekFailed(self.kind, f"no complete {self.kind or 'protocol'} header within {timeout}s")

    def feed(self, chunk: bytes) -> Peeked | None:
        """The next bytes from the client (b"" = it closed); the result once decided, else None."""
        buf = self.buf
        if not chunk:
            if not buf:
                return Closed()
            return PeekFailed(self.kind, "client closed the connection before its request was complete")
        start = len(buf)
        buf += chunk
        if self.kind is None:
            decided = classify(buf)
            if decided is NEED_MORE:
                return None
            assert isinstance(decided, TrafficKind)
            self.kind = decided
            start = 0  # the parsers get everything read so far
            if decided is TrafficKind.OPAQUE:
                return Opaque(buf)
            if decided is TrafficKind.TLS:
                self.parser = ClientHelloParser(max_handshake_size=self.max_bytes)
            else:
                self.tracker = HttpRequestTracker(max_head_size=self.max_bytes)
        new = bytes(buf[start:])
        if self.parser is not None:
            result = self.parser.feed(new)
            if isinstance(result, ClientHello):
                return TlsHello(buf, result)
            if isinstance(result, PeekError):
                return PeekFailed(self.kind, f"{result.code}: {result.message}")
        elif self.tracker is not None:
            events = self.events
            events.extend(e for e in self.tracker.feed(new) if e is not NEED_MORE)
            for index, event in enumerate(events):
                if isinstance(event, HttpError):
                    return PeekFailed(self.kind, f"{event.code}: {event.message}")
                if isinstance(event, RequestHead):
                    return HttpRequest(buf, event, self.tracker, events[index + 1 :])
        return None


async def peek(
    recv: Callable[[int], Awaitable[bytes]],
    timeout: float,
    max_bytes: int,
    peeker: Peeker | None = None,
    *,
    waited: float = 0.0,
) -> Peeked:
    """Read (never forward) until the traffic is classified and its name known, within `timeout` and `max_bytes`.
    `peeker` continues a peek that already has some bytes; `waited` seconds of the deadline are already spent."""
    deadline = time.monotonic() + timeout - waited
    peeker = peeker or Peeker(max_bytes)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return peeker.timed_out(timeout)
        want = peeker.want
        if want <= 0:
            return peeker.too_large()
        try:
            chunk = await asyncio.wait_for(recv(min(want, READ_CHUNK)), remaining)
        except TimeoutError:
            continue
        peeked = peeker.feed(chunk)
        if peeked is not None:
            return peeked
