"""Password attempts against tunnels, throttled per client and per tunnel (pure: no I/O, the time is a parameter
or the injected clock).

Attempts are counted when they start, before the ~50 ms hash, so a burst sent at once gets no more checks than
one sent in turn. `LoginThrottle.admit` answers 0.0 (check it now) or the seconds to wait; the server turns the
wait into a 429 with Retry-After.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.model import peer_address

MAX_THROTTLE_ENTRIES: Final = 100_000


@dataclass(slots=True)
class _Attempts:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


def client_key(address: str) -> str:
    """Whose attempts these are: the address, or its /64 for IPv6 (one host commonly holds a whole /64)."""
    ip = peer_address(address)
    if ip is None:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginThrottle:
    """Password attempts, counted when they start (before the ~50 ms hash), so attempts still being checked
    count too and a burst sent at once gets no more checks than one sent in turn.

    * Per client (address, or IPv6 /64) and tunnel: `free` attempts, then each further one locks that client
      out of that tunnel for 1, 2, 4, ... seconds (at most `max_backoff`); a success clears it, and attempts
      are forgotten `window` seconds after the last one.
    * Per tunnel, all clients together: a token bucket of `tunnel_burst` attempts refilled at `tunnel_rate`
      a second bounds the guesses from many addresses. When it is empty the wait is under 1 / `tunnel_rate`
      seconds; but while many addresses keep taking every token as it comes back, a client new to the tunnel
      may keep getting that answer. A client (address, or /64) that signed in to the tunnel within `window`
      is not held by the bucket, so such a flood never keeps out those who have signed in before.
    """

    def __init__(
        self,
        free: int,
        window: float,
        max_backoff: float,
        tunnel_rate: float,
        tunnel_burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock  # the time when a call gives none (a test steps it instead of sleeping)
        self.free = free
        self.window = window
        self.max_backoff = max_backoff
        self.tunnel_rate = tunnel_rate
        self.tunnel_burst = tunnel_burst
        self._clients: dict[tuple[str, str], _Attempts] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._signed_in: dict[tuple[str, str], float] = {}  # (tunnel, client key) -> when it last signed in

    @classmethod
    def from_config(cls, config: TunnelConfig, *, clock: Callable[[], float] = time.monotonic) -> LoginThrottle:
        return cls(
            config.login_free_failures,
            config.login_window,
            config.login_max_backoff,
            config.login_tunnel_rate,
            config.login_tunnel_burst,
            clock=clock,
        )

    def admit(self, tunnel_id: str, client: str, now: float | None = None) -> float:
        """0.0: the attempt may be checked now, and is counted already; otherwise the seconds to wait."""
        now = self.clock() if now is None else now
        key = (tunnel_id, client_key(client))
        entry = self._clients.get(key)
        if entry is not None and now < entry.locked_until:
            return entry.locked_until - now
        signed_in = self._signed_in.get(key)
        if signed_in is None or now - signed_in > self.window:
            wait = self._take_token(tunnel_id, now)
            if wait > 0:
                return wait
        if entry is None or now - entry.last > self.window:
            if entry is None and len(self._clients) >= MAX_THROTTLE_ENTRIES:
                self.prune(now)
            entry = self._clients[key] = _Attempts()
        entry.count += 1
        entry.last = now
        if entry.count >= self.free:
            entry.locked_until = now + min(self.max_backoff, 2.0 ** (entry.count - self.free))
        return 0.0

    def _take_token(self, tunnel_id: str, now: float) -> float:
        """0.0: a token of the tunnel's bucket is taken; otherwise the seconds until there is one."""
        bucket = self._buckets.get(tunnel_id)
        if bucket is None:
            if len(self._buckets) >= MAX_THROTTLE_ENTRIES:
                self.prune(now)
            bucket = self._buckets[tunnel_id] = _Bucket(float(self.tunnel_burst), now)
        else:
            bucket.tokens = min(float(self.tunnel_burst), bucket.tokens + (now - bucket.at) * self.tunnel_rate)
            bucket.at = now
        if bucket.tokens < 1.0:
            return (1.0 - bucket.tokens) / self.tunnel_rate
        bucket.tokens -= 1.0
        return 0.0

    def success(self, tunnel_id: str, client: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        key = (tunnel_id, client_key(client))
        self._clients.pop(key, None)
        if key not in self._signed_in and len(self._signed_in) >= MAX_THROTTLE_ENTRIES:
            self.prune(now)
            if len(self._signed_in) >= MAX_THROTTLE_ENTRIES:
                return  # remembered as signed in is a privilege: never at the cost of unbounded memory
        self._signed_in[key] = now

    def prune(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        stale = [k for k, e in self._clients.items() if now - e.last > self.window and now > e.locked_until]
        for key in stale:
            del self._clients[key]
        for key in [k for k, at in self._signed_in.items() if now - at > self.window]:
            del self._signed_in[key]
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.tunnel_rate >= self.tunnel_burst]
        for tunnel_id in full:  # a full bucket is the same as none
            del self._buckets[tunnel_id]
