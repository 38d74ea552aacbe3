"""Latency histograms kept as plain ints, for the per-connection path.

A `Histogram` is a list of per-bucket counts and a sum: observing a value is one `bisect` (C) and two
additions, nothing of prometheus-client. The bucket bounds (`BOUNDS`, seconds) are the one list every
process uses, so a worker's histograms can be summed bucket by bucket in the main process (`add`), and the
metrics module turns them into Prometheus's cumulative `_bucket{le}` series at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

__all__ = ["BOUNDS", "Histogram", "add_all", "observe"]

#: Upper bounds in seconds (`le`), from a decision that needed no wait (~0.1 ms) to a dial near its timeout.
BOUNDS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Counts per bucket (the last one: above every bound, i.e. `+Inf` only) and the sum of the values."""

    __slots__ = ("counts", "sum")

    def __init__(self, counts: list[int] | None = None, total: float = 0.0) -> None:
        if counts is not None and len(counts) != len(BOUNDS) + 1:
            raise ValueError(f"a histogram has {len(BOUNDS) + 1} buckets, not {len(counts)}")
        self.counts = counts if counts is not None else [0] * (len(BOUNDS) + 1)
        self.sum = total

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, as Prometheus's `le` (less than or equal) means.
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def copy(self) -> Histogram:
        return Histogram(list(self.counts), self.sum)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(`le`, observations at or below it) for every bound and `+Inf`, as the exposition format has them."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*(repr(b) for b in BOUNDS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Histogram) and (self.counts, self.sum) == (other.counts, other.sum)

    def __repr__(self) -> str:
        return f"Histogram({self.counts!r}, {self.sum!r})"


def observe[K](histograms: dict[K, Histogram], key: K, seconds: float) -> None:
    """Observe `seconds` in the histogram of `key`, made on first use (labels appear once they have a value)."""
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = Histogram()
    histogram.observe(seconds)


def add_all[K](into: dict[K, Histogram], histograms: dict[K, Histogram]) -> None:
    """Sum `histograms` into `into`, key by key (copies: `into` never shares a histogram with its source)."""
    for key, histogram in histograms.items():
        mine = into.get(key)
        if mine is None:
            into[key] = histogram.copy()
        else:
            mine.add(histogram)
