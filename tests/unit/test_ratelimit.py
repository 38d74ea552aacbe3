"""Rate limits with a fake clock (exact numbers), plus one short real-time check of the asyncio layer."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.ratelimit import (
    PEAK_DEPTH_MIN_BYTES,
    BandwidthLimiter,
    ConnectionRateLimiter,
    SharedBucket,
    TokenBucket,
    mbit_to_bytes,
)


class FakeClock:
    """A clock that only moves when told to; `sleep` moves it, so awaited waits are exact and instant."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


# --------------------------------------------------------------------------- the token bucket


def test_bucket_starts_full_then_queues_callers_in_order() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, capacity=5, clock=clock)
    assert [bucket.reserve(1) for _ in range(5)] == [0, 0, 0, 0, 0]
    # Debt: each further caller waits for its own token, behind those already queued.
    assert [bucket.reserve(1) for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    clock.advance(0.3)
    assert bucket.tokens == pytest.approx(0)
    clock.advance(100)
    assert bucket.tokens == 5  # never above capacity


def test_try_reserve_refuses_without_taking_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, capacity=1, clock=clock)
    assert bucket.try_reserve(1, max_wait=0) == 0
    assert bucket.try_reserve(1, max_wait=0.5) is None
    assert bucket.tokens == 0  # the refusal took nothing
    assert bucket.try_reserve(1, max_wait=1.0) == pytest.approx(1.0)


def test_update_applies_at_once_and_keeps_the_queue() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, capacity=10, clock=clock)
    for _ in range(10):
        bucket.reserve(1)
    assert bucket.reserve(1) == pytest.approx(1.0)  # one token owed
    clock.advance(0.5)  # half a token accrued at the old rate
    bucket.update(rate=10, capacity=2)
    assert bucket.tokens == pytest.approx(-0.5)  # the debt is kept: the queued caller keeps its place
    assert bucket.reserve(1) == pytest.approx(0.15)  # and the new rate applies to the next one at once
    clock.advance(10)
    assert bucket.tokens == 2  # the new capacity


def test_bucket_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 1).update(1, 0)


# --------------------------------------------------------------------------- connections per minute


async def test_1000_per_minute_admits_1000_at_once_and_the_1001st_waits_60_ms() -> None:
    clock = FakeClock()
    limiter = ConnectionRateLimiter(clock, clock.sleep)
    for _ in range(1000):
        assert await limiter.admit("sb", 1000, max_wait=5.0)
    assert clock.slept == []  # the first thousand did not wait at all
    assert await limiter.admit("sb", 1000, max_wait=5.0)
    assert clock.slept == [pytest.approx(0.060)]
    assert limiter.reserve("sb", 1000, max_wait=5.0) == pytest.approx(0.060)  # the next one, 60 ms later


async def test_a_connection_that_would_wait_longer_than_max_wait_is_refused_at_once() -> None:
    clock = FakeClock()
    limiter = ConnectionRateLimiter(clock, clock.sleep)
    for _ in range(60):
        assert await limiter.admit("sb", 60, max_wait=0)
    # One a second from now on: a wait of 1 s does not fit in 0.5 s.
    assert not await limiter.admit("sb", 60, max_wait=0.5)
    assert clock.slept == []  # refused without waiting
    assert not await limiter.admit("sb", 60, max_wait=0.999)
    # Refusals took nothing, so the next caller willing to wait 1 s waits exactly 1 s, not 3.
    assert await limiter.admit("sb", 60, max_wait=1.0)
    assert clock.slept == [pytest.approx(1.0)]


async def test_sandboxes_have_separate_buckets_and_policy_changes_apply_at_once() -> None:
    clock = FakeClock()
    limiter = ConnectionRateLimiter(clock, clock.sleep)
    for _ in range(10):
        assert await limiter.admit("a", 10, max_wait=0)
    assert not await limiter.admit("a", 10, max_wait=0)
    assert await limiter.admit("b", 10, max_wait=0)  # b is untouched by a's traffic
    # The policy now says 600/min: the capacity grows, but what a already used stays used;
    # the refill is 10/s from now on, so the next token is 0.1 s away instead of 6 s.
    assert limiter.reserve("a", 600, max_wait=10) == pytest.approx(0.1)


async def test_a_cancelled_waiter_gives_its_token_back() -> None:
    clock = FakeClock()
    waiting = asyncio.Event()

    async def sleep_until_cancelled(seconds: float) -> None:
        waiting.set()
        await asyncio.get_running_loop().create_future()

    limiter = ConnectionRateLimiter(clock, sleep_until_cancelled)
    for _ in range(60):
        assert await limiter.admit("sb", 60, max_wait=0)
    waiter = asyncio.create_task(limiter.admit("sb", 60, max_wait=5))
    await waiting.wait()
    assert limiter.bucket("sb", 60).tokens == -1  # the waiter holds its token
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.bucket("sb", 60).tokens == 0  # given back: not -1


def test_idle_full_buckets_are_forgotten_busy_ones_kept() -> None:
    clock = FakeClock()
    limiter = ConnectionRateLimiter(clock, clock.sleep, idle_seconds=120, sweep_interval=30)
    for sandbox in ("quiet", "busy"):
        limiter.reserve(sandbox, 60, max_wait=0)
    clock.advance(100)
    limiter.reserve("busy", 60, max_wait=0)
    clock.advance(30)  # quiet: idle 130 s and full again; busy: used 30 s ago
    limiter.reserve("other", 60, max_wait=0)  # any call may sweep
    assert "quiet" not in limiter and "busy" in limiter and "other" in limiter
    assert len(limiter) == 2


# --------------------------------------------------------------------------- bandwidth


def _send(bucket: SharedBucket, clock: FakeClock, total: int, chunk: int = 65536) -> None:
    """Forward `total` bytes through `bucket` as a relay would: reserve, then wait, chunk by chunk."""
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        clock.advance(bucket.reserve(n))
        sent += n


def test_bandwidth_burst_runs_at_peak_then_the_sustained_rate_applies() -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(clock, clock.sleep)
    bucket = limiter.bucket("sb", "up", sustained_mbit=100, burst_mbit=1000)
    rate, peak = mbit_to_bytes(100), mbit_to_bytes(1000)
    assert (rate, peak) == (12_500_000, 125_000_000)
    start = clock.now
    depth = int(rate)  # one second of the sustained rate

    _send(bucket, clock, depth)
    burst_time = clock.now - start
    # The burst is limited by the peak rate (less what the small peak bucket held, and the sustained refill
    # meanwhile): about 0.09 s, far below the 1 s it would take at the sustained rate, and not instant.
    peak_depth = max(PEAK_DEPTH_MIN_BYTES, peak * 0.010)
    assert (depth - peak_depth) / peak * 0.95 <= burst_time <= (depth - peak_depth) / peak * 1.05

    n = 25_000_000
    _send(bucket, clock, n)
    # From the start, total bytes = depth + rate * elapsed, exactly, once the sustained bucket is the limit.
    assert clock.now - start == pytest.approx(n / rate, rel=1e-6)


def test_two_connections_of_one_sandbox_share_its_rate() -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(clock, clock.sleep)
    a = limiter.bucket("sb", "down", 8, 800)
    b = limiter.bucket("sb", "down", 8, 800)
    assert a is b
    assert limiter.bucket("sb", "up", 8, 800) is not a  # directions are separate
    assert mbit_to_bytes(8) == 1_000_000  # 1 MB/s, depth 1 MB
    waits = [(a if i % 2 else b).reserve(100_000) for i in range(40)]  # 4 MB over two connections
    # Together they get 1 MB/s after the 1 MB allowance: the last chunk goes 3 s from now, not 1.5 s.
    assert waits[-1] == pytest.approx(3.0)
    other = limiter.bucket("other", "down", 8, 800)
    assert other.reserve(100_000) == 0  # another sandbox is not affected


def test_bandwidth_change_applies_to_the_shared_bucket_at_once() -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(clock, clock.sleep)
    bucket = limiter.bucket("sb", "up", 8, 800)
    bucket.reserve(1_000_000)  # the allowance is used up
    assert bucket.reserve(1_000_000) == pytest.approx(1.0)  # 1 MB at 1 MB/s
    clock.advance(1.0)
    same = limiter.bucket("sb", "up", 80, 800)  # the policy now says 80 Mbit/s = 10 MB/s
    assert same is bucket
    assert bucket.reserve(1_000_000) == pytest.approx(0.1)


async def test_consume_sleeps_the_computed_time_and_never_drops() -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(clock, clock.sleep)
    bucket = limiter.bucket("sb", "up", 8, 800)
    await bucket.consume(1_000_000)
    assert clock.slept == []
    await bucket.consume(500_000)
    assert clock.slept == [pytest.approx(0.5)]
    await bucket.consume(0)
    assert clock.slept == [pytest.approx(0.5)]


def test_idle_bandwidth_buckets_are_dropped_unless_a_connection_holds_them() -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(clock, clock.sleep, idle_seconds=120, sweep_interval=30)
    held = limiter.bucket("held", "up", 8, 8)
    held.reserve(2_000_000)  # in debt
    limiter.bucket("gone", "up", 8, 8).reserve(10)
    clock.advance(200)
    limiter.bucket("new", "up", 8, 8)  # triggers a sweep
    assert ("gone", "up") not in limiter and ("held", "up") not in limiter and ("new", "up") in limiter
    # A connection still holds "held": the next connection must find the same bucket, not a fresh one.
    assert limiter.bucket("held", "up", 8, 8) is held


# --------------------------------------------------------------------------- real time


async def test_real_time_throttling_waits_at_least_the_computed_time() -> None:
    limiter = ConnectionRateLimiter()
    bandwidth = BandwidthLimiter()
    started = time.monotonic()
    # 600/min = one every 0.1 s after the first 600: five more wait 0.1 .. 0.5 s, and run concurrently.
    for _ in range(600):
        assert await limiter.admit("sb", 600, max_wait=1.0)
    assert time.monotonic() - started < 0.2
    results = await asyncio.gather(*(limiter.admit("sb", 600, max_wait=1.0) for _ in range(5)))
    assert all(results)
    connections_elapsed = time.monotonic() - started
    assert connections_elapsed >= 0.5 - 0.005  # asyncio.sleep never returns early; allow clock granularity
    assert not await limiter.admit("sb", 600, max_wait=0.05)

    # 8 Mbit/s = 1 MB/s with a 1 MB allowance (bursting at 100 MB/s): 1.3 MB from two concurrent senders needs >= 0.3 s.
    bucket = bandwidth.bucket("sb", "up", 8, 800)
    begun = time.monotonic()

    async def sender() -> None:
        for _ in range(13):
            await bucket.consume(50_000)

    await asyncio.gather(sender(), sender())
    elapsed = time.monotonic() - begun
    assert 0.3 - 0.005 <= elapsed < 1.5
