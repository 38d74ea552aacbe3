"""DNS-learned destinations: the addresses a sandbox was told for an allowed name, for a while.

Opaque TCP (SSH to a git host, anything without SNI or Host) carries no name, so the
egress engine asks here: "did this sandbox's own DNS answer for an allowed name return
this address, and is that answer still fresh?" If so the connection is decided as a
connection to that name. Entries are per sandbox (one sandbox's answers never vouch for
another's connection), expire with the answer's TTL, and are bounded in number (the
oldest entry goes first), per sandbox and per name: a name whose answers keep naming new
addresses (a rotating pool, a hostile authoritative server) holds at most `max_per_name` of
them, so an allowed name cannot make a whole CDN range reachable by address. An address
vouches for the name that last returned it, and the connection is then decided as one to
that name on that port: the name's rule and its ports, nothing wider.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from gateway.decision import address_key
from gateway.policy import IPAddress

DEFAULT_MAX_PER_SANDBOX = 4096
DEFAULT_MAX_PER_NAME = 64
DEFAULT_MAX_SANDBOXES = 100_000

Key = tuple[int, int]


class LearnedDestinations:
    def __init__(
        self,
        max_per_sandbox: int = DEFAULT_MAX_PER_SANDBOX,
        max_sandboxes: int = DEFAULT_MAX_SANDBOXES,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_per_name: int = DEFAULT_MAX_PER_NAME,
    ) -> None:
        self.max_per_sandbox = max_per_sandbox
        self.max_per_name = max_per_name
        self.max_sandboxes = max_sandboxes
        self._clock = clock
        # sandbox -> (version, int) -> (name, expires at); insertion order = age (refreshes move to the end).
        self._by_sandbox: OrderedDict[str, OrderedDict[Key, tuple[str, float]]] = OrderedDict()
        # sandbox -> name -> its addresses, oldest first (the per-name bound).
        self._by_name: dict[str, dict[str, OrderedDict[Key, None]]] = {}

    def add(self, sandbox_id: str, name: str, addresses: Iterable[str | IPAddress], ttl: float) -> None:
        if ttl <= 0:
            return
        expires = self._clock() + ttl
        table = self._by_sandbox.get(sandbox_id)
        if table is None:
            table = self._by_sandbox[sandbox_id] = OrderedDict()
            names = self._by_name[sandbox_id] = {}
            while len(self._by_sandbox) > self.max_sandboxes:
                gone, _ = self._by_sandbox.popitem(last=False)
                self._by_name.pop(gone, None)
        else:
            self._by_sandbox.move_to_end(sandbox_id)
            names = self._by_name[sandbox_id]
        mine: OrderedDict[Key, None] | None = None  # made on the first usable address: no empty entry
        for address in addresses:
            try:
                key = address_key(address)
            except ValueError:
                continue
            previous = table.get(key)
            if previous is not None and previous[0] != name:
                _release(names, previous[0], key)  # the address now vouches for this name only
            table[key] = (name, expires)
            table.move_to_end(key)
            if mine is None:
                mine = names.setdefault(name, OrderedDict())
            mine[key] = None
            mine.move_to_end(key)
            if len(mine) > self.max_per_name:
                oldest, _ = mine.popitem(last=False)
                del table[oldest]
        while len(table) > self.max_per_sandbox:
            key, (owner, _) = table.popitem(last=False)
            _release(names, owner, key)

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
            _release(self._by_name[sandbox_id], name, key)
            return None
        return name

    def forget(self, sandbox_id: str) -> int:
        """Everything the sandbox learned goes (it was deleted); returns how many addresses."""
        self._by_name.pop(sandbox_id, None)
        return len(self._by_sandbox.pop(sandbox_id, {}))

    def retain(self, sandbox_id: str, justified: Callable[[str], bool]) -> int:
        """Keep only the sandbox's addresses whose name is still `justified` (its policy changed); returns how many
        went."""
        table = self._by_sandbox.get(sandbox_id)
        if not table:
            return 0
        names = self._by_name[sandbox_id]
        kept = {name for name in names if justified(name)}  # decided once per name, not per address
        gone = [key for key, (name, _) in table.items() if name not in kept]
        for key in gone:
            name, _ = table.pop(key)
            _release(names, name, key)
        return len(gone)

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_sandbox.values())


def _release(names: dict[str, OrderedDict[Key, None]], name: str, key: Key) -> None:
    """`key` no longer vouches for `name`; a name left with no address is forgotten (names stay bounded)."""
    keys = names.get(name)
    if keys is not None:
        keys.pop(key, None)
        if not keys:
            del names[name]
