"""Per-sandbox rate limits (exceeding a limit throttles, it never terminates).

The arithmetic is pure and takes an injectable clock, so the unit tests drive it with a
fake one; the asyncio layer on top only turns "wait this long" into `sleep`.

Two limits:

- **Connections per minute** (`ConnectionRateLimiter`): a token bucket per sandbox that
  refills `per_minute / 60` tokens a second and holds at most `per_minute`, so an idle
  sandbox may open `per_minute` connections at once and then one every `60 / per_minute`
  seconds. A connection over the limit waits for its token, up to `max_wait`; when the
  wait would be longer it is refused at once (reason `connection rate limit`) without
  taking a token, so refused attempts do not push later ones further back.

- **Bandwidth** (`BandwidthLimiter`): one `SharedBucket` per sandbox and direction, shared
  by all of that sandbox's connections, so together they get the sandbox's rate. It is a
  dual token bucket like `tc tbf ... peakrate`: a sustained bucket filling at
  `bandwidth_mbit` whose depth is **one second of the sustained rate**, and a small peak
  bucket filling at `burst_mbit` (depth `max(64 KiB, 10 ms of the peak rate)`), so after an
  idle second a burst of one second's worth of sustained traffic flows at up to the peak
  rate, and beyond it the sustained rate applies. The relay calls `consume(n)` before it
  forwards each chunk; sleeping there pauses reading from the source, which is the
  backpressure: no data is ever dropped.

Reservations may drive a bucket into debt (negative tokens): each caller is told how
long to wait for *its* tokens, and the next caller queues behind it, so concurrent
callers are served in arrival order rather than racing for the refill.

Buckets of sandboxes that have been idle for a while and are full again are dropped: a
full bucket is indistinguishable from a fresh one, so forgetting it changes nothing and
memory stays bounded by the number of recently active sandboxes.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

__all__ = [
    "CONNECTION_RATE_REASON",
    "BandwidthLimiter",
    "ConnectionRateLimiter",
    "SharedBucket",
    "TokenBucket",
    "mbit_to_bytes",
]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Direction = Literal["up", "down"]

CONNECTION_RATE_REASON: Final = "connection rate limit"
#: Depth of the sustained bandwidth bucket, in seconds of the sustained rate.
SUSTAINED_DEPTH_SECONDS: Final = 1.0
#: Depth of the peak bucket: small, so the peak rate really caps the speed of a burst, but at
#: least one relay chunk, so a chunk never waits only because it is larger than the bucket.
PEAK_DEPTH_SECONDS: Final = 0.010
PEAK_DEPTH_MIN_BYTES: Final = 64 * 1024
#: A bucket unused for this long and full again is forgotten.
IDLE_SECONDS: Final = 120.0
#: How often (in clock seconds) the maps are swept for idle buckets.
SWEEP_INTERVAL: Final = 30.0


def mbit_to_bytes(mbit: float) -> float:
    """Megabits per second (10^6 bits, as tc and the seeds count) to bytes per second."""
    return mbit * 1_000_000 / 8


class TokenBucket:
    """A token bucket that refills `rate` tokens a second up to `capacity`, and can go into debt.

    Not thread-safe; meant for one event loop (every call is synchronous, so no await can
    interleave with an update).
    """

    __slots__ = ("_tokens", "_updated", "capacity", "clock", "last_used", "rate")

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"rate and capacity must be positive, got {rate} and {capacity}")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.clock = clock
        self._tokens = float(capacity)  # a new bucket starts full: an idle sandbox may burst
        self._updated = clock()
        self.last_used = self._updated

    def _refill(self) -> float:
        now = self.clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
            self._updated = now
        return now

    @property
    def tokens(self) -> float:
        """Tokens available now (negative: owed to callers already told to wait)."""
        self._refill()
        return self._tokens

    def wait_for(self, n: float) -> float:
        """Seconds until `n` more tokens could be taken, without taking them."""
        self._refill()
        missing = n - self._tokens
        return missing / self.rate if missing > 0 else 0.0

    def reserve(self, n: float) -> float:
        """Take `n` tokens now, going into debt if need be; return how long the caller must wait for them."""
        return self._take(n, self._refill())

    def try_reserve(self, n: float, max_wait: float) -> float | None:
        """Like `reserve`, but only when the wait would be at most `max_wait`; None (nothing taken) otherwise."""
        now = self._refill()  # once for the check and the take: this runs for every DNS query and connection
        missing = n - self._tokens
        if missing > 0 and missing / self.rate > max_wait:
            return None
        return self._take(n, now)

    def _take(self, n: float, now: float) -> float:
        self.last_used = now
        self._tokens -= n
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def refund(self, n: float) -> None:
        """Give back tokens a caller reserved but did not use (it was cancelled while waiting)."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens + n)

    def update(self, rate: float, capacity: float) -> None:
        """New limits from now on: what accrued so far is counted at the old rate, and debt is kept, so
        callers already queued keep their place; tokens above the new capacity are dropped."""
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"rate and capacity must be positive, got {rate} and {capacity}")
        if rate == self.rate and capacity == self.capacity:
            return
        self._refill()
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._tokens = min(self._tokens, self.capacity)

    def is_idle(self, idle_for: float) -> bool:
        """Unused for `idle_for` seconds and full again: forgetting it is indistinguishable from keeping it."""
        now = self._refill()
        return now - self.last_used >= idle_for and self._tokens >= self.capacity


# --------------------------------------------------------------------------- connections per minute


class _Idle(Protocol):
    def is_idle(self, idle_for: float) -> bool: ...


class _PerSandboxBuckets[K, B: _Idle]:
    """Buckets keyed per sandbox, forgotten once idle and full again (bounded memory, no behaviour change)."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        *,
        idle_seconds: float = IDLE_SECONDS,
        sweep_interval: float = SWEEP_INTERVAL,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self.idle_seconds = idle_seconds
        self.sweep_interval = sweep_interval
        self._buckets: dict[K, B] = {}
        self._last_sweep = clock()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        """Whether the map keeps a bucket for `key` (a sandbox, or a sandbox and direction); asking creates none."""
        return key in self._buckets

    def _maybe_sweep(self) -> None:
        now = self.clock()
        if now - self._last_sweep < self.sweep_interval:
            return
        self._last_sweep = now
        for key in [k for k, b in self._buckets.items() if b.is_idle(self.idle_seconds)]:
            del self._buckets[key]


class ConnectionRateLimiter(_PerSandboxBuckets[str, TokenBucket]):
    """Connections per minute per sandbox, with a bounded wait (throttle, not terminate)."""

    def bucket(self, sandbox_id: str, per_minute: int) -> TokenBucket:
        """The sandbox's bucket, with its limits set from the current policy."""
        if per_minute <= 0:
            raise ValueError(f"per_minute must be positive, got {per_minute}")
        self._maybe_sweep()
        rate, capacity = per_minute / 60.0, float(per_minute)
        found = self._buckets.get(sandbox_id)
        if found is None:
            found = self._buckets[sandbox_id] = TokenBucket(rate, capacity, self.clock)
        else:
            found.update(rate, capacity)
        return found

    def reserve(self, sandbox_id: str, per_minute: int, max_wait: float) -> float | None:
        """The pure decision: seconds to wait for a token (taken), or None to refuse (nothing taken)."""
        return self.bucket(sandbox_id, per_minute).try_reserve(1, max_wait)

    async def admit(self, sandbox_id: str, per_minute: int, max_wait: float) -> bool:
        """True when the connection may proceed (after waiting at most `max_wait`); False: refuse it with
        reason `CONNECTION_RATE_REASON`."""
        bucket = self.bucket(sandbox_id, per_minute)
        wait = bucket.try_reserve(1, max_wait)
        if wait is None:
            return False
        if wait > 0:
            try:
                await self.sleep(wait)
            except asyncio.CancelledError:
                bucket.refund(1)  # the connection went away while queued: its token is not spent
                raise
        return True


# --------------------------------------------------------------------------- bandwidth


@dataclass(frozen=True, slots=True)
class BandwidthLimits:
    sustained_mbit: float
    burst_mbit: float


class SharedBucket:
    """One sandbox's bandwidth in one direction, shared by all its connections (a dual token bucket)."""

    __slots__ = ("__weakref__", "limits", "peak", "sleep", "sustained")

    def __init__(self, sustained_mbit: float, burst_mbit: float, clock: Clock, sleep: Sleep) -> None:
        self.sleep = sleep
        self.limits = BandwidthLimits(sustained_mbit, max(burst_mbit, sustained_mbit))
        rate, peak_rate = self._rates()
        self.sustained = TokenBucket(rate, rate * SUSTAINED_DEPTH_SECONDS, clock)
        self.peak = TokenBucket(peak_rate, self._peak_depth(peak_rate), clock)

    def _rates(self) -> tuple[float, float]:
        return mbit_to_bytes(self.limits.sustained_mbit), mbit_to_bytes(self.limits.burst_mbit)

    @staticmethod
    def _peak_depth(peak_rate: float) -> float:
        return max(float(PEAK_DEPTH_MIN_BYTES), peak_rate * PEAK_DEPTH_SECONDS)

    def update(self, sustained_mbit: float, burst_mbit: float) -> None:
        limits = BandwidthLimits(sustained_mbit, max(burst_mbit, sustained_mbit))
        if limits == self.limits:
            return
        self.limits = limits
        rate, peak_rate = self._rates()
        self.sustained.update(rate, rate * SUSTAINED_DEPTH_SECONDS)
        self.peak.update(peak_rate, self._peak_depth(peak_rate))

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` from both buckets; the bytes may go when both allow it: the longer of the two waits."""
        if nbytes <= 0:
            return 0.0
        return max(self.sustained.reserve(nbytes), self.peak.reserve(nbytes))

    async def consume(self, nbytes: int) -> None:
        """Wait until `nbytes` may be forwarded. Call before forwarding each chunk: while this sleeps the relay
        reads nothing more, so the sender is slowed by TCP flow control and nothing is dropped."""
        wait = self.reserve(nbytes)
        if wait > 0:
            await self.sleep(wait)

    def is_idle(self, idle_for: float) -> bool:
        return self.sustained.is_idle(idle_for) and self.peak.is_idle(idle_for)


class BandwidthLimiter(_PerSandboxBuckets[tuple[str, Direction], SharedBucket]):
    """Shared per-sandbox, per-direction bandwidth buckets.

    Strong references (the base's map) keep a recently used bucket (and its debt) even between connections,
    so closing and reopening connections never earns a fresh burst. The weak map finds a bucket a live
    connection still holds after the sweep dropped it, so two connections never get separate buckets.
    """

    def __init__(
        self,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        *,
        idle_seconds: float = IDLE_SECONDS,
        sweep_interval: float = SWEEP_INTERVAL,
    ) -> None:
        super().__init__(clock, sleep, idle_seconds=idle_seconds, sweep_interval=sweep_interval)
        self._held: weakref.WeakValueDictionary[tuple[str, Direction], SharedBucket] = weakref.WeakValueDictionary()

    def bucket(self, sandbox_id: str, direction: Direction, sustained_mbit: float, burst_mbit: float) -> SharedBucket:
        """The bucket for this sandbox and direction, its limits set from the current policy."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        if sustained_mbit <= 0 or burst_mbit <= 0:
            raise ValueError(f"bandwidth must be positive, got {sustained_mbit} and {burst_mbit}")
        self._maybe_sweep()
        key = (sandbox_id, direction)
        found = self._buckets.get(key) or self._held.get(key)
        if found is None:
            found = SharedBucket(sustained_mbit, burst_mbit, self.clock, self.sleep)
            self._held[key] = found
        else:
            found.update(sustained_mbit, burst_mbit)
        self._buckets[key] = found
        return found
