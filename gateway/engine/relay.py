"""Relaying one allowed connection both ways, driven by event-loop callbacks (no task per connection).

Each direction (`_Half`) keeps a reader callback on its source for as long as it may read, so a
wait costs no future, no task switch and no epoll change; a wake-up reads until the source would block
or the direction stops reading (`gateway.readiness` says why), up to `READ_BUDGET`. A direction moves its first
`SPLICE_AFTER` bytes by copying (`recv`/`send`: a TLS handshake and a small request/response
never pay for a kernel pipe's creation) and then switches to `os.splice` through a pipe, so bulk
bytes never enter Python.

Backpressure: when the destination cannot take everything, the direction stops reading its
source (the sender's TCP window closes) and waits for the destination to be writable. Bandwidth
buckets are charged between reading and forwarding; a direction that must wait stops reading and
resumes from a timer. An end of file is forwarded as a write shutdown once everything before it
was delivered (half-close); the relay ends when both directions have ended, on an error, at the
idle timeout (one periodic sweep for all relays) or when closed.

Plain HTTP's client->server direction always copies: every chunk goes through the request guard,
which may end the direction early ("cut") at a refused request; the relay then lets the upstream
finish the earlier responses for at most `cut_grace` seconds. At a request that waits for the
server (a WebSocket handshake, or `Expect` before a body) the guard stops the direction and the
relay holds the client's further bytes until the server answered (the guard's
`AnswerWatch` reads the other direction, which copies meanwhile; for `Expect` a timer answers too): after a
genuine WebSocket `101` the rest passes (by splice too); after a declined upgrade or `100
Continue` the held bytes are checked as HTTP again; after a final answer to `Expect` nothing
more from the client goes (the connection ends after the server's answer), as at a stop
without a refusal; any other `101` or an unreadable answer cuts the connection before the
answer reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

COPY_CHUNK = 64 * 1024
#: Bytes a direction moves by copying before it switches to splice.
SPLICE_AFTER = 64 * 1024
PIPE_SIZE = 1 << 20
#: Bytes a direction moves per wake-up at most before the other connections get their turn.
READ_BUDGET = 4 << 20
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), spelled out for Pythons built without it
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
CAN_SPLICE = hasattr(os, "splice")


class Bucket(Protocol):
    """A bandwidth bucket: `reserve(n)` takes n bytes and says how many seconds to wait before forwarding them."""

    def reserve(self, nbytes: int) -> float: ...


@dataclass(frozen=True, slots=True)
class GuardStop:
    """Where a client->server chunk stops: `forward` bytes of it may go; then either the connection is cut
    (`refusal` = (reason, rule)), or the rest waits for the server's answer, read by `watch`, or (neither)
    nothing more from the client goes and the connection ends after the server's answers, as `closed_early`."""

    forward: int
    refusal: tuple[str, str] | None
    watch: AnswerWatch | None = None
    #: All of the chunk goes and the guard is done: the rest of the direction passes unchecked (and may splice).
    passthrough: bool = False


class AfterAnswer(Enum):
    """What the server's answer to a held request means for the client bytes held behind it."""

    SWITCH = "switch"  # the rest of the direction passes unchecked (and may splice)
    RESUME = "resume"  # the held bytes go through the guard again
    CLOSE = "close"  # nothing more from the client: the connection ends after the server's answer


class AnswerWatch(Protocol):
    """Reads the server's answer to a held request from the server->client bytes. What the answer is (and
    means) is the guard's business: the relay only hands it back to `Guard.answered`."""

    @property
    def timeout(self) -> float | None:
        """After this long without an answer, `timed_out()` is the answer (None: wait for one)."""
        ...

    def feed(self, data: bytes) -> object | None:
        """The answer once these bytes complete it, else None."""
        ...

    def closed(self) -> object: ...

    def timed_out(self) -> object: ...


class Guard(Protocol):
    """Checks client->server bytes (the protocol meaning, e.g. HTTP's, lives behind it: the relay moves bytes)."""

    def feed(self, chunk: bytes) -> GuardStop | None: ...

    def answered(self, answer: object) -> AfterAnswer | tuple[str, str]:
        """The server's answer to the held request: what to do, or the refusal (reason, rule) that cuts."""
        ...


class IdleSweeper:
    """One periodic check of every live relay's idle clock (instead of a timer per relay or per wait).

    Scheduled only while some relay is registered; a relay waiting on a bandwidth timer is not idle.
    """

    __slots__ = ("every", "handle", "idle_timeout", "interval", "loop", "relays")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float, interval: float = 1.0) -> None:
        self.loop = loop
        self.every = interval
        self.relays: set[Relay] = set()
        self.handle: asyncio.TimerHandle | None = None
        self.retime(idle_timeout)

    def retime(self, idle_timeout: float) -> None:
        """A new idle timeout (a reload): every relay is held to it from the next sweep on."""
        self.idle_timeout = idle_timeout
        self.interval = min(self.every, idle_timeout / 4)  # a relay lives at most a quarter over its idle timeout

    def add(self, relay: Relay) -> None:
        self.relays.add(relay)
        if self.handle is None:
            self.handle = self.loop.call_later(self.interval, self._sweep)

    def discard(self, relay: Relay) -> None:
        self.relays.discard(relay)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _sweep(self) -> None:
        self.handle = None
        now = time.monotonic()
        for relay in [r for r in self.relays if now - r.last >= self.idle_timeout and not r.throttled()]:
            relay.finish(TimeoutError())
        if self.relays:
            self.handle = self.loop.call_later(self.interval, self._sweep)


class Relay:
    """Both directions of one connection. `on_done(relay)` is called once, from a loop callback, when it ends:
    `error` is None for a clean end (both sides closed, a guard cut, or `closed_early`), TimeoutError for
    the idle timeout, or the OSError that broke it. The relay closes the upstream socket; the client socket
    is the caller's."""

    __slots__ = (
        "answer_timer",
        "client",
        "closed_early",
        "cut",
        "cut_grace",
        "down",
        "error",
        "grace",
        "guard",
        "last",
        "loop",
        "on_done",
        "splice",
        "sweeper",
        "up",
        "upstream",
    )

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        on_done: Callable[[Relay], None],
        *,
        sweeper: IdleSweeper,
        first: bytes | bytearray = b"",
        first_stop: GuardStop | None = None,
        guard: Guard | None = None,
        up_bucket: Bucket | None = None,
        down_bucket: Bucket | None = None,
        splice: bool = True,
        cut_grace: float = 5.0,
    ) -> None:
        self.loop = sweeper.loop
        self.client = client
        self.upstream = upstream
        self.on_done: Callable[[Relay], None] | None = on_done
        self.sweeper: IdleSweeper | None = sweeper
        self.last = time.monotonic()
        self.error: BaseException | None = None
        #: (reason, rule) of the request the guard refused; the client gets the denial after the relay ends.
        self.cut: tuple[str, str] | None = None
        #: The server answered a request with Expect before its body, or the guard ended the client's direction
        #: without a refusal: nothing more from the client went.
        self.closed_early = False
        self.answer_timer: asyncio.TimerHandle | None = None
        self.cut_grace = cut_grace
        self.grace: asyncio.TimerHandle | None = None
        self.guard = guard
        self.splice = splice and CAN_SPLICE
        self.up = _Half(self, client, upstream, up_bucket, guard, self.splice and guard is None)
        self.down = _Half(self, upstream, client, down_bucket, None, self.splice)
        sweeper.add(self)
        self.down.resume_reading()
        if first:
            self.up.take(bytes(first), first_stop)
        else:
            self.up.resume_reading()

    @property
    def bytes_up(self) -> int:
        return self.up.forwarded

    @property
    def bytes_down(self) -> int:
        return self.down.forwarded

    @property
    def done(self) -> bool:
        return self.on_done is None

    def throttled(self) -> bool:
        return self.up.timer is not None or self.down.timer is not None

    def await_answer(self, watch: AnswerWatch) -> None:
        """The client's further bytes wait for the server's answer: watch it (copying that direction meanwhile)."""
        self.down.watch = watch
        if watch.timeout is not None:
            self.answer_timer = self.loop.call_later(watch.timeout, self._answer_timed_out, watch)

    def _answer_timed_out(self, watch: AnswerWatch) -> None:
        self.answer_timer = None
        if self.down.watch is watch:
            self.down.watch = None
            self.answered(watch.timed_out())

    def answered(self, answer: object) -> None:
        """The server answered the held request: act on what the guard makes of it."""
        if self.answer_timer is not None:
            self.answer_timer.cancel()
            self.answer_timer = None
        up = self.up
        assert self.guard is not None and up.held is not None
        outcome = self.guard.answered(answer)
        held, up.held = up.held, None
        if isinstance(outcome, tuple):  # refused: the answer and everything after it stay where they are
            self.cut = outcome
            self.finish(None)
            return
        if outcome is AfterAnswer.CLOSE:
            self.closed_early = True
            up.eof = True
            up.flush()  # what was forwarded before the hold, then the upstream's write side is shut
            return
        if outcome is AfterAnswer.SWITCH:
            up.unguard()  # e.g. WebSocket: nothing more to check
        if not held:
            up.flush()  # reads on
        else:
            up.take(held, None if outcome is AfterAnswer.SWITCH else self.guard.feed(held))

    def half_done(self, half: _Half) -> None:
        if self.up.ended and self.down.ended:
            self.finish(None)
        elif (self.cut is not None or self.closed_early) and half is self.up and self.grace is None:
            self.grace = self.loop.call_later(self.cut_grace, self.finish, None)

    def finish(self, error: BaseException | None) -> None:
        """End the relay (idempotent): stop both directions, close the upstream, report once."""
        on_done = self.on_done
        if on_done is None:
            return
        self.on_done = None
        self.error = error
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        if self.answer_timer is not None:
            self.answer_timer.cancel()
            self.answer_timer = None
        self.up.stop()
        self.down.stop()
        if self.sweeper is not None:
            self.sweeper.discard(self)
            self.sweeper = None
        self.upstream.close()
        on_done(self)


class _Half:
    """One direction: source -> destination, by copying first and then by splice."""

    __slots__ = (
        "bucket",
        "dfd",
        "dst",
        "ended",
        "eof",
        "forwarded",
        "guard",
        "held",
        "in_pipe",
        "pending",
        "pipe_r",
        "pipe_w",
        "reading",
        "relay",
        "sfd",
        "splice",
        "src",
        "timer",
        "watch",
        "writing",
    )

    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        bucket: Bucket | None,
        guard: Guard | None,
        splice: bool,
    ) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.bucket = bucket
        self.guard = guard
        self.splice = splice
        self.pending: memoryview | None = None  # copied bytes not yet forwarded
        self.pipe_r = self.pipe_w = -1
        self.in_pipe = 0  # spliced bytes waiting in the pipe
        self.forwarded = 0
        self.eof = False  # the source ended (or the guard cut): shut the destination's write side once flushed
        self.ended = False
        self.reading = self.writing = False
        self.timer: asyncio.TimerHandle | None = None
        self.held: bytes | None = None  # client bytes after a held request, until the server answered it
        self.watch: AnswerWatch | None = None  # on the server->client direction while an answer awaits

    def unguard(self) -> None:
        """Nothing more to check in this direction: bulk may splice from now on."""
        self.guard = None
        self.splice = self.relay.splice

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.relay.loop.add_reader(self.sfd, self.readable)

    def _pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.relay.loop.remove_reader(self.sfd)

    def stop(self) -> None:
        self._pause_reading()
        if self.writing:
            self.writing = False
            self.relay.loop.remove_writer(self.dfd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending = None
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1

    def readable(self) -> None:
        """Read until the source would block, ended or failed, or this direction stopped reading (backpressure, a
        bandwidth wait, a held request, the relay's end): under uvloop a reset with bytes queued before it wakes
        the reader once, and a direction that took one chunk of them would wait for the idle timeout."""
        budget = READ_BUDGET
        while self.reading:
            spliced = self.pipe_w >= 0 and self.watch is None  # an answer is watched in copied bytes
            try:
                if spliced:
                    n = os.splice(self.sfd, self.pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
                    self.in_pipe += n
                else:
                    data = self.src.recv(COPY_CHUNK)
                    n = len(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.relay.finish(exc)
                return
            self.relay.last = time.monotonic()
            if spliced:
                if n == 0:
                    self.eof = True
                self._charge(n)
            else:
                self.take(data, self.guard.feed(data) if data and self.guard is not None else None)
            budget -= n
            if budget <= 0 and self.reading:  # other connections' turn; re-armed (gateway.readiness)
                self._pause_reading()
                self.resume_reading()
                return

    def take(self, data: bytes, stop: GuardStop | None) -> None:
        """Bytes copied from the source (b"" = its end), with where the guard stopped them: forward what may go."""
        relay = self.relay
        if self.watch is not None:
            answer = self.watch.feed(data) if data else self.watch.closed()
            if answer is not None:
                self.watch = None
                relay.answered(answer)
                if relay.done:
                    return
        if not data:
            self.eof = True
        elif stop is not None:
            if stop.refusal is not None:
                relay.cut = stop.refusal
                self.eof = True
            elif stop.passthrough:
                self.unguard()
            elif stop.watch is None:
                relay.closed_early = True
                self.eof = True
            else:
                self.held = data[stop.forward :]
                relay.await_answer(stop.watch)
            data = data[: stop.forward]
        if data:
            self.pending = memoryview(data)
        self._charge(len(data))

    def _charge(self, n: int) -> None:
        if n and self.bucket is not None:
            wait = self.bucket.reserve(n)
            if wait > 0:  # the bytes wait in Python or in the pipe; the source is not read meanwhile
                self._pause_reading()
                self.timer = self.relay.loop.call_later(wait, self.flush)
                return
        self.flush()

    def flush(self) -> None:
        """Forward what is pending; then read on, wait for the destination, or end the direction."""
        if self.timer is not None:
            # A bandwidth wait just ended. It was no idleness, so the idle clock restarts now: left at the read
            # before the wait, it would let a sweep that runs before the next read end the relay.
            self.timer = None
            self.relay.last = time.monotonic()
        try:
            if self.pending is not None:
                view = self.pending
                while view:
                    sent = self.dst.send(view)
                    self.forwarded += sent
                    view = view[sent:]
                self.pending = None
            while self.in_pipe:
                sent = os.splice(self.pipe_r, self.dfd, self.in_pipe, flags=_SPLICE_FLAGS)
                self.forwarded += sent
                self.in_pipe -= sent
        except (BlockingIOError, InterruptedError):
            if self.pending is not None:
                self.pending = view
            self.relay.last = time.monotonic()
            self._pause_reading()
            if not self.writing:
                self.writing = True
                self.relay.loop.add_writer(self.dfd, self.flush)
            return
        except OSError as exc:
            self.relay.finish(exc)
            return
        if self.writing:
            self.writing = False
            self.relay.loop.remove_writer(self.dfd)
        if self.eof:
            self._end()
            return
        if self.held is not None:
            self._pause_reading()  # nothing more from the client before the server answered its upgrade
            return
        if self.splice and self.pipe_w < 0 and self.forwarded >= SPLICE_AFTER:
            self._open_pipe()
        self.resume_reading()

    def _open_pipe(self) -> None:
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # out of descriptors: copying works too
            self.splice = False
            return
        with contextlib.suppress(OSError):  # fewer wake-ups for a bulk flow; the default size works too
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_SIZE)

    def _end(self) -> None:
        self._pause_reading()
        self.ended = True
        relay = self.relay
        # The upstream is not shut down when the other direction has ended too: the relay closes it at once, and
        # the close sends the FIN (nothing is unread on it: its bytes were read to their end).
        # After a cut the client's write side stays open: the denial is still to be written to it.
        if not (relay.down.ended if self is relay.up else relay.cut is not None):
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
        relay.half_done(self)
