"""Per-sandbox DNS caches (pure: an injectable clock, no I/O).

Two tables per sandbox, flushed together, each bounded on its own:

- **answers**, keyed by (lowercased name, type, DO bit): the upstream's answer as wire bytes
  (`gateway.dns.answer.Answer`). `get` returns the entry and the whole seconds it has spent in the
  cache, which `render` takes off every TTL on the way out. An entry lives for the answer's TTL as
  clamped by the policy layer (positive: [min_ttl, max_ttl]; negative: the SOA minimum within
  [min_ttl, negative_max_ttl]).
- **ready responses** (`Ready`), keyed by the query packet itself (`policy.query_key`: the bytes after
  the id, name lowercased): the response last sent to that packet over UDP. The same packet again (a
  stub asking every few seconds, a denied name retried) is answered by copying its id and question
  into it, without parsing, deciding or rendering. One made from a cached answer lives as long as that
  answer and is re-rendered once per second of its age (the TTLs count down); one made from the policy
  alone (a denial, an empty HTTPS answer) lives until the policy changes.

One sandbox's entries never answer another's query, whatever the two policies allow, so the answer a
sandbox sees depends only on its own policy and the upstream. Each table is bounded twice: at most
`max_per_sandbox` entries per sandbox (least recently used goes first), and at most `max_total` in all
(entries of the least recently active sandbox go first).

Policy changes: `bind_policy(sandbox, policy)` remembers the compiled policy object the entries were
made under; `PolicyState` compiles a new object on every change, so a different object means a changed
policy and both of the sandbox's tables are flushed before the next lookup. `flush` does the same on
demand.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from gateway.dns.answer import Answer, Outcome

__all__ = ["CacheEntry", "DnsCache", "Ready"]

DEFAULT_MAX_PER_SANDBOX: Final = 2048
DEFAULT_MAX_TOTAL: Final = 200_000

Key = tuple[str, int, bool]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    answer: Answer
    stored: float
    expires: float


@dataclass(slots=True)
class Ready:
    """The response last sent to one query packet over UDP (see the module doc)."""

    response: bytes  # as sent but for the id and the question's letter case, which each query brings
    outcome: Outcome  # what the query log records for it
    generation: int  # of the malware blocklist it was decided under (0: no list read)
    entry: CacheEntry | None = None  # the cached answer it renders; None: made from the policy alone
    second: int = 0  # whole seconds `entry` had been cached when `response` was rendered
    expires: float = math.inf


class _Expiring(Protocol):
    @property
    def expires(self) -> float: ...


class _Tables[K, V: _Expiring]:
    """Entries per sandbox, least recently used first, bounded per sandbox and in total; stale ones are dropped."""

    def __init__(self, max_per_sandbox: int, max_total: int) -> None:
        self.max_per_sandbox = max_per_sandbox
        self.max_total = max_total
        # Outer order: sandboxes by last use (oldest first); inner order: entries by last use.
        self._tables: OrderedDict[str, OrderedDict[K, V]] = OrderedDict()
        self.total = 0

    def get(self, sandbox_id: str, key: K, now: float) -> V | None:
        table = self._tables.get(sandbox_id)
        if table is None:
            return None
        value = table.get(key)
        if value is None:
            return None
        if value.expires <= now:
            del table[key]
            self.total -= 1
            return None
        table.move_to_end(key)
        self._tables.move_to_end(sandbox_id)
        return value

    def put(self, sandbox_id: str, key: K, value: V) -> None:
        table = self._tables.get(sandbox_id)
        if table is None:
            table = self._tables[sandbox_id] = OrderedDict()
        else:
            self._tables.move_to_end(sandbox_id)
        if key not in table:
            self.total += 1
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_per_sandbox:
            table.popitem(last=False)
            self.total -= 1
        while self.total > self.max_total and self._tables:
            oldest_id, oldest = next(iter(self._tables.items()))
            if oldest:
                oldest.popitem(last=False)
                self.total -= 1
            if not oldest:
                del self._tables[oldest_id]

    def flush(self, sandbox_id: str) -> int:
        table = self._tables.pop(sandbox_id, None)
        if not table:
            return 0
        self.total -= len(table)
        return len(table)

    def size(self, sandbox_id: str) -> int:
        return len(self._tables.get(sandbox_id, ()))

    def clear(self) -> None:
        self._tables.clear()
        self.total = 0


class DnsCache:
    def __init__(
        self,
        max_per_sandbox: int = DEFAULT_MAX_PER_SANDBOX,
        max_total: int = DEFAULT_MAX_TOTAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_per_sandbox < 1 or max_total < 1:
            raise ValueError("cache sizes must be positive")
        self.max_per_sandbox = max_per_sandbox
        self.max_total = max_total
        self._clock = clock
        self._answers: _Tables[Key, CacheEntry] = _Tables(max_per_sandbox, max_total)
        self._ready: _Tables[bytes, Ready] = _Tables(max_per_sandbox, max_total)
        self._policies: dict[str, object] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(name: str, qtype: int, do: bool) -> Key:
        return (name.lower(), qtype, bool(do))

    def bind_policy(self, sandbox_id: str, policy: object) -> bool:
        """Remember the policy the sandbox's entries are made under; flush them when it changed. True: flushed."""
        current = self._policies.get(sandbox_id)
        if current is policy:
            return False
        self._policies[sandbox_id] = policy
        if current is None:
            return False
        self.flush(sandbox_id)
        return True

    def bound(self, sandbox_id: str) -> object | None:
        """The policy object the sandbox's entries are made under (an answer fetched under another is not stored)."""
        return self._policies.get(sandbox_id)

    def get(self, sandbox_id: str, name: str, qtype: int, do: bool) -> tuple[CacheEntry, float] | None:
        """(entry, seconds it has been cached) when fresh; None otherwise (a stale entry is removed)."""
        now = self._clock()
        entry = self._answers.get(sandbox_id, self.key(name, qtype, do), now)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry, now - entry.stored

    def put(self, sandbox_id: str, name: str, qtype: int, do: bool, answer: Answer) -> CacheEntry | None:
        """Cache an answer for its `ttl` seconds (not at all when 0). The entry when stored."""
        if answer.ttl <= 0:
            return None
        now = self._clock()
        entry = CacheEntry(answer, now, now + answer.ttl)
        self._answers.put(sandbox_id, self.key(name, qtype, do), entry)
        return entry

    def get_ready(self, sandbox_id: str, key: bytes) -> tuple[Ready, float] | None:
        """(ready response, seconds its answer has been cached) when fresh. Not counted in `hits`: the caller
        counts one when it sends a response made from a cached answer (the rate limit may stop it first)."""
        now = self._clock()
        ready = self._ready.get(sandbox_id, key, now)
        if ready is None:
            return None
        return ready, (now - ready.entry.stored if ready.entry is not None else 0.0)

    def put_ready(self, sandbox_id: str, key: bytes, ready: Ready) -> None:
        """Keep the response sent to the packet with `key`; `ready.entry` (if any) sets its lifetime."""
        if ready.entry is not None:
            ready.expires = ready.entry.expires
        self._ready.put(sandbox_id, key, ready)

    def flush(self, sandbox_id: str) -> int:
        """Forget every entry of one sandbox (its policy changed, or it went away). Returns how many answers."""
        self._ready.flush(sandbox_id)
        return self._answers.flush(sandbox_id)

    def clear(self) -> None:
        """Forget every sandbox's entries (the options they were made under changed); the policy bindings stay."""
        self._ready.clear()
        self._answers.clear()

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone: its entries and the policy reference go."""
        self.flush(sandbox_id)
        self._policies.pop(sandbox_id, None)

    def size(self, sandbox_id: str | None = None) -> int:
        """Cached answers (ready responses are not counted: they are renderings of answers and of the policy)."""
        if sandbox_id is None:
            return self._answers.total
        return self._answers.size(sandbox_id)

    def ready_size(self, sandbox_id: str | None = None) -> int:
        if sandbox_id is None:
            return self._ready.total
        return self._ready.size(sandbox_id)

    def __len__(self) -> int:
        return self._answers.total
