"""Per-sandbox DNS answer cache (pure: an injectable clock, no I/O).

Keyed by (sandbox, lowercased name, type, DO bit): one sandbox's entries never answer another's
query, whatever the two policies allow, so the answer a sandbox sees depends only on its own
policy and the upstream. Entries hold the answer as wire bytes (`gateway.dns.policy.Answer`);
`get` returns the entry and the whole seconds it has spent in the cache, which `render` takes
off every TTL on the way out. An entry lives for the answer's TTL as clamped by the policy
layer (positive: [min_ttl, max_ttl]; negative: the SOA minimum within [min_ttl, negative_max_ttl]).

Bounded twice: at most `max_per_sandbox` entries per sandbox (least recently used goes first),
and at most `max_total` in all (entries of the least recently active sandbox go first).

Policy changes: `bind_policy(sandbox, policy)` remembers the compiled policy object the entries
were made under; `PolicyState` compiles a new object on every change, so a different object
means a changed policy and the sandbox's entries are flushed before the next lookup. `flush`
does the same on demand.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gateway.dns.policy import Answer

__all__ = ["CacheEntry", "DnsCache"]

DEFAULT_MAX_PER_SANDBOX: Final = 2048
DEFAULT_MAX_TOTAL: Final = 200_000

Key = tuple[str, int, bool]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    answer: Answer
    stored: float
    expires: float


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
        # Outer order: sandboxes by last use (oldest first); inner order: entries by last use.
        self._tables: OrderedDict[str, OrderedDict[Key, CacheEntry]] = OrderedDict()
        self._policies: dict[str, object] = {}
        self._total = 0
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
        table = self._tables.get(sandbox_id)
        if table is None:
            self.misses += 1
            return None
        key = self.key(name, qtype, do)
        entry = table.get(key)
        if entry is None:
            self.misses += 1
            return None
        now = self._clock()
        if entry.expires <= now:
            del table[key]
            self._total -= 1
            self.misses += 1
            return None
        table.move_to_end(key)
        self._tables.move_to_end(sandbox_id)
        self.hits += 1
        return entry, now - entry.stored

    def put(self, sandbox_id: str, name: str, qtype: int, do: bool, answer: Answer) -> bool:
        """Cache an answer for its `ttl` seconds (not at all when 0). True when stored."""
        if answer.ttl <= 0:
            return False
        now = self._clock()
        table = self._tables.get(sandbox_id)
        if table is None:
            table = self._tables[sandbox_id] = OrderedDict()
        else:
            self._tables.move_to_end(sandbox_id)
        key = self.key(name, qtype, do)
        if key not in table:
            self._total += 1
        table[key] = CacheEntry(answer, now, now + answer.ttl)
        table.move_to_end(key)
        while len(table) > self.max_per_sandbox:
            table.popitem(last=False)
            self._total -= 1
        self._evict_global()
        return True

    def _evict_global(self) -> None:
        while self._total > self.max_total and self._tables:
            sandbox_id, table = next(iter(self._tables.items()))
            if table:
                table.popitem(last=False)
                self._total -= 1
            if not table:
                del self._tables[sandbox_id]

    def flush(self, sandbox_id: str) -> int:
        """Forget every entry of one sandbox (its policy changed, or it went away). Returns how many."""
        table = self._tables.pop(sandbox_id, None)
        if not table:
            return 0
        self._total -= len(table)
        return len(table)

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone: its entries and the policy reference go."""
        self.flush(sandbox_id)
        self._policies.pop(sandbox_id, None)

    def size(self, sandbox_id: str | None = None) -> int:
        if sandbox_id is None:
            return self._total
        return len(self._tables.get(sandbox_id, ()))

    def __len__(self) -> int:
        return self._total
