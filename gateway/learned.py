"""DNS-learned destinations: the addresses a sandbox was told for an allowed name, for a while.

Opaque TCP (SSH to a git host, anything without SNI or Host) carries no name, so the
egress engine asks here: "did this sandbox's own DNS answer for an allowed name return
this address, and is that answer still fresh?" If so the connection is decided as a
connection to that name. Entries are per sandbox (one sandbox's answers never vouch for
another's connection), expire with the answer's TTL, and are bounded in number (the
oldest entry goes first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from gateway.decision import address_key
from gateway.policy import IPAddress

DEFAULT_MAX_PER_SANDBOX = 4096
DEFAULT_MAX_SANDBOXES = 100_000


class LearnedDestinations:
    def __init__(
        self,
        max_per_sandbox: int = DEFAULT_MAX_PER_SANDBOX,
        max_sandboxes: int = DEFAULT_MAX_SANDBOXES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_per_sandbox = max_per_sandbox
        self.max_sandboxes = max_sandboxes
        self._clock = clock
        # sandbox -> (version, int) -> (name, expires at); insertion order = age (refreshes move to the end).
        self._by_sandbox: OrderedDict[str, OrderedDict[tuple[int, int], tuple[str, float]]] = OrderedDict()

    def add(self, sandbox_id: str, name: str, addresses: Iterable[str | IPAddress], ttl: float) -> None:
        if ttl <= 0:
            return
        expires = self._clock() + ttl
        table = self._by_sandbox.get(sandbox_id)
        if table is None:
            table = self._by_sandbox[sandbox_id] = OrderedDict()
            while len(self._by_sandbox) > self.max_sandboxes:
                self._by_sandbox.popitem(last=False)
        else:
            self._by_sandbox.move_to_end(sandbox_id)
        for address in addresses:
            try:
                key = address_key(address)
            except ValueError:
                continue
            table[key] = (name, expires)
            table.move_to_end(key)
        while len(table) > self.max_per_sandbox:
            table.popitem(last=False)

    def lookup(self, sandbox_id: str, address: str | IPAddress) -> str | None:
        table = self._by_sandbox.get(sandbox_id)
        if not table:
            return None
        try:
            key = address_key(address)
        except ValueError:
            return None
        entry = table.get(key)
        if entry is None:
            return None
        name, expires = entry
        if expires <= self._clock():
            del table[key]
            return None
        return name

    def forget(self, sandbox_id: str) -> None:
        self._by_sandbox.pop(sandbox_id, None)

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_sandbox.values())
