"""Where tunnels live, so every gateway node sees the same ones and they survive restarts.

`TunnelStore` holds the logic (limits, revocation, liveness, change notification, login
sessions); `FileTunnelStore` keeps the records in a JSON file next to the policy file
(atomic rewrite, polled like the policy file), `RedisTunnelStore` in Redis:

- `P tunnels`: hash, tunnel id -> JSON record (the truth; `P` = `store.redis_prefix`).
- `P tunnel-sessions`: hash, SHA-256 of a login session's token -> {tunnel, expires_at}.
- `P tunnels-of:<sandbox id>`: sorted set of that sandbox's tunnel ids (score: expiry), so that
  creation counts the sandbox's live tunnels and writes the new one in one Lua script: the limit
  of `max_per_sandbox` holds across nodes creating at the same instant.
- `P tunnel-changes`: stream, one entry `{id}` per tunnel change (`{session}` per session
  change). Nodes follow it with a blocking XREAD, so a revocation made on one node reaches
  the others in well under a second, and reload everything every `RESYNC_INTERVAL` in case
  an entry was trimmed or missed.

A tunnel is alive while it is neither revoked nor expired and its sandbox still exists and
still holds the address the tunnel was created for, and this node has not seen it deleted (so a
sandbox deleted and created again under the same id, even with the same address and at once,
does not inherit old tunnels). A maintenance task writes the revocation of
tunnels whose sandbox is gone ("deleting a sandbox revokes its tunnels", seed 000) and drops
records that have been dead for `RETENTION` seconds.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import Conflict, Forbidden, GatewayError, NotFound
from gateway.files import FileWatch, read_regular_file, write_atomic
from gateway.state import PolicyState
from gateway.stores.base import StoreUnavailable
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.model import (
    REVOKED_BY_API,
    REVOKED_SANDBOX_GONE,
    Tunnel,
    ingress_refusal,
    new_tunnel,
    parse_record,
    parse_request,
    source_refusal,
)
from gateway.untrusted import parse_json

log = structlog.get_logger("gateway.tunnel.store")

RETENTION: Final = 24 * 3600.0  # dead records stay visible (and answer 410) this long
MAINTAIN_INTERVAL: Final = 1.0
RESYNC_INTERVAL: Final = 5.0
STREAM_MAXLEN: Final = 10_000

MAX_SESSIONS: Final = 100_000

Listener = Callable[[Tunnel], None]
#: XREAD's answer: [(stream, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


@dataclass(frozen=True, slots=True)
class Session:
    """A browser's login to one tunnel. Stored under the SHA-256 of its token: the store never holds a
    usable cookie, so reading the file or Redis does not let anyone log in."""

    tunnel_id: str
    expires_at: float

    def to_record(self) -> dict[str, Any]:
        return {"tunnel": self.tunnel_id, "expires_at": self.expires_at}

    @classmethod
    def from_record(cls, raw: object) -> Session:
        if not isinstance(raw, dict):
            raise ValueError("a session record is an object")
        return cls(str(raw["tunnel"]), float(raw["expires_at"]))


def session_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A tunnel's recorded address, parsed once (checked on every request against its sandbox's addresses)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def pick_address(addresses: Iterable[object]) -> str:
    """The upstream for a new tunnel: the sandbox's first IPv4 address, else its first address."""
    items = [str(a) for a in addresses]
    for text in items:
        if ipaddress.ip_address(text).version == 4:
            return text
    return items[0]


class TunnelStore(abc.ABC):
    backend = "?"

    def __init__(self, policy: PolicyState, config: TunnelConfig) -> None:
        self.policy = policy  # the policy store's state: read only, to know which sandboxes exist
        self.config = config
        self.tunnels: dict[str, Tunnel] = {}
        self.sessions: dict[str, Session] = {}  # session_key(token) -> Session
        #: tunnel id -> (sandbox record, address in it, what its ingress rules say): checked on every request,
        #: so the answers for this very record (records are replaced, never changed in place) are remembered.
        self._record_checks: dict[str, tuple[object, bool, Forbidden | None]] = {}
        self._listeners: list[Listener] = []
        #: Live tunnels whose sandbox this node saw deleted: dead at once, whatever record comes back under the
        #: sandbox's id before the maintenance task has written their revocation.
        self._orphaned: set[str] = set()
        policy.removal_listeners.append(self._sandbox_removed)
        self._lock = asyncio.Lock()
        self._maintainer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._load()
        self._maintainer = asyncio.create_task(self._maintain(), name=f"tunnel-store-{self.backend}")

    async def close(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
            self._maintainer = None

    @abc.abstractmethod
    async def _load(self) -> None:
        """Read every record (start-up, and whenever an update may have been missed)."""

    @abc.abstractmethod
    async def _persist(self, put: list[Tunnel], delete: list[str]) -> None:
        """Durably write these records and drop those ids, then tell the other nodes."""

    @abc.abstractmethod
    async def _persist_sessions(self, put: dict[str, Session], delete: list[str]) -> None:
        """Durably write these sessions and drop those keys, then tell the other nodes."""

    async def _fetch_session(self, key: str) -> Session | None:
        """A session this node has not heard of yet (another node created it a moment ago); None: none."""
        return None

    async def _follow_once(self) -> None:  # noqa: B027 - backends that are told about changes override it
        """One round of picking up changes other writers made."""

    # ------------------------------------------------------------------ reads

    def add_listener(self, listener: Listener) -> None:
        """`listener(tunnel)` runs whenever a tunnel this node knew as alive stops being alive by a record change."""
        self._listeners.append(listener)

    def alive(self, tunnel: Tunnel, now: float | None = None) -> bool:
        if not tunnel.live(now) or tunnel.id in self._orphaned:
            return False
        checks = self._checks(tunnel)
        return checks is not None and checks[1]

    def ingress_refusal(self, tunnel: Tunnel, client: str | None = None) -> Forbidden | None:
        """Why the sandbox's ingress rules, as the record is now, refuse serving this tunnel (to `client`, when
        given: `ingress.sources`), or None. A tunnel whose sandbox is gone is `alive`'s business."""
        checks = self._checks(tunnel)
        if checks is None:
            return None
        if checks[2] is not None or client is None:
            return checks[2]
        sandbox = self.policy.sandboxes.get(tunnel.sandbox)
        return source_refusal(sandbox.ingress, client) if sandbox is not None else None

    def revision(self, tunnel: Tunnel) -> str | None:
        """The revision of the sandbox policy in force now, whose record (addresses, ingress rules) `alive` and
        `ingress_refusal` decide the tunnel's requests with; None when the sandbox is gone."""
        compiled = self.policy.compiled.get(tunnel.sandbox)
        return compiled.revision if compiled is not None else None

    def has_ingress_sources(self, tunnel: Tunnel) -> bool:
        sandbox = self.policy.sandboxes.get(tunnel.sandbox)
        return sandbox is not None and bool(sandbox.ingress.sources)

    def _checks(self, tunnel: Tunnel) -> tuple[object, bool, Forbidden | None] | None:
        sandbox = self.policy.sandboxes.get(tunnel.sandbox)
        if sandbox is None:
            return None
        known = self._record_checks.get(tunnel.id)
        if known is not None and known[0] is sandbox:
            return known
        found = _address(tunnel.address) in sandbox.addresses
        checks = (sandbox, found, ingress_refusal(sandbox.ingress, tunnel.port, protected=tunnel.protected))
        if len(self._record_checks) >= 10_000:
            self._record_checks.clear()
        self._record_checks[tunnel.id] = checks
        return checks

    def get(self, tunnel_id: str, visible: Callable[[str], bool] | None = None) -> Tunnel:
        """The tunnel; TUNNEL_NOT_FOUND when there is none, or when `visible` (the caller's scope) refuses its
        sandbox: the same answer."""
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or (visible is not None and not visible(tunnel.sandbox)):
            raise NotFound("TUNNEL_NOT_FOUND", f"no tunnel {tunnel_id!r}", "id")
        return tunnel

    def for_sandbox(self, sandbox_id: str) -> list[Tunnel]:
        return sorted((t for t in self.tunnels.values() if t.sandbox == sandbox_id), key=lambda t: t.created_at)

    def public(self, tunnel: Tunnel) -> dict[str, Any]:
        state = tunnel.state()
        if state == "active":
            if not self.alive(tunnel):
                state = "sandbox_gone"
            elif self.ingress_refusal(tunnel) is not None:
                state = "ingress_denied"
        return asdict(tunnel.to_public(self.config.url_for(tunnel.id), state))

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "tunnels": len(self.tunnels),
            "alive": sum(map(self.alive, self.tunnels.values())),
        }

    # ------------------------------------------------------------------ writes

    async def create(self, sandbox_id: str, raw: object) -> Tunnel:
        """Expose a port. Errors: SANDBOX_NOT_FOUND (404), INGRESS_PORT_NOT_ALLOWED and INGRESS_PASSWORD_REQUIRED
        (403: the sandbox's ingress rules), TOO_MANY_TUNNELS (409), the request's 400s."""
        sandbox = self.policy.get_sandbox(sandbox_id)
        request = parse_request(raw, default_ttl=self.config.default_ttl, max_ttl=self.config.max_ttl)
        self._check_ingress(sandbox_id, request.port, protected=request.password is not None)
        # scrypt takes ~50 ms of CPU: not on the event loop, which also proxies traffic.
        tunnel = await asyncio.to_thread(new_tunnel, sandbox_id, pick_address(sandbox.addresses), request)
        async with self._lock:
            # The record may have gone or changed while the hash was computed.
            self._check_ingress(sandbox_id, tunnel.port, protected=tunnel.protected)
            live = [t for t in self.tunnels.values() if t.sandbox == sandbox_id and self.alive(t)]
            if len(live) >= self.config.max_per_sandbox:
                raise self._too_many(sandbox_id, len(live))
            await self._persist_new(tunnel, [str(a) for a in sandbox.addresses])
            self._apply(tunnel.id, tunnel)
        log.info("tunnel.created", tunnel=tunnel.id, sandbox=sandbox_id, port=tunnel.port, protected=tunnel.protected)
        return tunnel

    def _check_ingress(self, sandbox_id: str, port: int, *, protected: bool) -> None:
        refusal = ingress_refusal(self.policy.get_sandbox(sandbox_id).ingress, port, protected=protected)
        if refusal is not None:
            raise refusal

    def _too_many(self, sandbox_id: str, live: int) -> Conflict:
        return Conflict(
            "TOO_MANY_TUNNELS",
            f"sandbox {sandbox_id!r} already has {live} live tunnels, the most allowed "
            f"({self.config.max_per_sandbox}); revoke one first",
            "port",
        )

    async def _persist_new(self, tunnel: Tunnel, addresses: list[str]) -> None:
        """Store a new tunnel; the count was checked against this node's view (under its lock). A store that
        other nodes write to concurrently checks the limit again, atomically, where it writes."""
        await self._persist([tunnel], [])

    async def revoke(
        self, tunnel_id: str, reason: str = REVOKED_BY_API, *, visible: Callable[[str], bool] | None = None
    ) -> Tunnel:
        """Revoke (idempotent: revoking a dead tunnel answers it as it is); `visible` as for `get`."""
        async with self._lock:
            tunnel = self.get(tunnel_id, visible)
            if tunnel.revoked_at is not None:
                return tunnel
            revoked = tunnel.revoke(reason)
            await self._persist([revoked], [])
            self._apply(tunnel_id, revoked)
        log.info("tunnel.revoked", tunnel=tunnel_id, sandbox=tunnel.sandbox, reason=reason)
        return revoked

    async def revoke_sandbox(self, sandbox_id: str, reason: str = REVOKED_SANDBOX_GONE) -> list[Tunnel]:
        async with self._lock:
            revoked = [t.revoke(reason) for t in self.for_sandbox(sandbox_id) if t.revoked_at is None]
            if revoked:
                await self._persist(revoked, [])
                for tunnel in revoked:
                    self._apply(tunnel.id, tunnel)
        if revoked:
            log.info("tunnel.sandbox_revoked", sandbox=sandbox_id, count=len(revoked), reason=reason)
        return revoked

    # ------------------------------------------------------------------ login sessions

    async def create_session(self, tunnel_id: str, lifetime: float) -> str:
        """A fresh random token for a browser that gave the tunnel's password; the cookie value."""
        token = secrets.token_urlsafe(32)
        key = session_key(token)
        session = Session(tunnel_id, time.time() + lifetime)
        async with self._lock:
            if len(self.sessions) >= MAX_SESSIONS:  # bounded: drop the one closest to its end
                oldest = min(self.sessions, key=lambda k: self.sessions[k].expires_at)
                await self._persist_sessions({}, [oldest])
                self.sessions.pop(oldest, None)
            await self._persist_sessions({key: session}, [])
            self.sessions[key] = session
        return token

    async def find_session(self, token: str, tunnel_id: str) -> bool:
        """Whether `token` is a live session of this tunnel (the tunnel's own liveness is checked apart)."""
        key = session_key(token)
        session = self.sessions.get(key)
        if session is None:
            session = await self._fetch_session(key)
            if session is not None:
                self.sessions[key] = session
        return session is not None and session.tunnel_id == tunnel_id and session.expires_at > time.time()

    async def end_session(self, token: str) -> None:
        key = session_key(token)
        async with self._lock:
            await self._persist_sessions({}, [key])
            self.sessions.pop(key, None)

    async def maintain_once(self, now: float | None = None) -> None:
        """Write down revocations for sandboxes that are gone; drop records dead for RETENTION."""
        now = time.time() if now is None else now
        async with self._lock:
            gone = [
                t.revoke(REVOKED_SANDBOX_GONE, now)
                for t in self.tunnels.values()
                if t.live(now) and not self.alive(t, now)
            ]
            old = [
                t.id
                for t in self.tunnels.values()
                if (t.revoked_at is not None and t.revoked_at + RETENTION < now) or t.expires_at + RETENTION < now
            ]
            if gone or old:
                await self._persist(gone, old)
                for tunnel in gone:
                    self._apply(tunnel.id, tunnel)
                for tunnel_id in old:
                    self._apply(tunnel_id, None)
            dead_sessions = [
                key
                for key, session in self.sessions.items()
                if session.expires_at <= now
                or (owner := self.tunnels.get(session.tunnel_id)) is None
                or not self.alive(owner, now)
            ]
            if dead_sessions:
                await self._persist_sessions({}, dead_sessions)
                for key in dead_sessions:
                    self.sessions.pop(key, None)

    async def _maintain(self) -> None:
        next_maintain = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._follow_once()
                if loop.time() >= next_maintain:
                    next_maintain = loop.time() + MAINTAIN_INTERVAL
                    await self.maintain_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the task must outlive any error; the next round retries
                log.exception("tunnel.maintenance_failed")
                await asyncio.sleep(MAINTAIN_INTERVAL)

    # ------------------------------------------------------------------ applying

    def _sandbox_removed(self, sandbox_id: str) -> None:
        self._orphaned.update(t.id for t in self.tunnels.values() if t.sandbox == sandbox_id and t.live())

    def _apply(self, tunnel_id: str, tunnel: Tunnel | None) -> None:
        before = self.tunnels.get(tunnel_id)
        if tunnel is None or tunnel.revoked_at is not None:
            self._orphaned.discard(tunnel_id)  # its record says it is dead now
        if tunnel is None:
            self.tunnels.pop(tunnel_id, None)
        else:
            self.tunnels[tunnel_id] = tunnel
        if before is not None and before.live() and (tunnel is None or not tunnel.live()):
            for listener in self._listeners:
                try:
                    listener(before if tunnel is None else tunnel)
                except Exception:
                    log.exception("tunnel.listener_failed", tunnel=tunnel_id)

    def _replace_sessions(self, records: dict[str, object]) -> None:
        sessions: dict[str, Session] = {}
        for key, raw in records.items():
            try:
                sessions[key] = Session.from_record(raw)
            except (KeyError, TypeError, ValueError):
                log.error("tunnel.session_rejected")
        self.sessions = sessions

    def _replace_all(self, records: dict[str, object]) -> None:
        seen: set[str] = set()
        for key, raw in records.items():
            try:
                tunnel = parse_record(raw)
            except GatewayError as exc:
                log.error("tunnel.record_rejected", tunnel=key, code=exc.code, message=exc.message)
                continue
            seen.add(tunnel.id)
            if self.tunnels.get(tunnel.id) != tunnel:
                self._apply(tunnel.id, tunnel)
        for tunnel_id in [tid for tid in self.tunnels if tid not in seen]:
            self._apply(tunnel_id, None)


# --------------------------------------------------------------------------- embedded


class FileTunnelStore(TunnelStore):
    """Tunnels in one JSON file `{"tunnels": {id: record}}`, mode 0600 (it holds password hashes)."""

    backend = "embedded"

    def __init__(self, policy: PolicyState, config: TunnelConfig, path: Path) -> None:
        super().__init__(policy, config)
        self.path = Path(path)
        self._watch = FileWatch([self.path])

    async def _load(self) -> None:
        self._watch.changed()  # the version read now is what later polls compare against
        try:
            records, sessions = self._read()
        except (FileNotFoundError, NotADirectoryError):
            self._replace_all({})
            return
        except (OSError, ValueError) as exc:
            # Keep what we have: a broken file must not revive or forget tunnels.
            log.error("tunnel.file_rejected", path=str(self.path), error=str(exc))
            return
        self._replace_all(records)
        self._replace_sessions(sessions)

    def _read(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # Any content, however hostile, is an OSError or a ValueError (parse_json's InvalidJson) here.
        data = parse_json(read_regular_file(self.path) or b"{}")
        records = data.get("tunnels", {}) if isinstance(data, dict) else None
        sessions = data.get("sessions", {}) if isinstance(data, dict) else None
        if not isinstance(records, dict) or not isinstance(sessions, dict):
            raise ValueError("expected {'tunnels': {id: record}, 'sessions': {key: record}}")
        return records, sessions

    async def _follow_once(self) -> None:
        await asyncio.sleep(self.config.poll_interval)
        if self._watch.changed():
            async with self._lock:
                await self._load()

    def _current(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The file as it is now, not memory: another process may have written since our last poll."""
        try:
            return self._read()
        except (OSError, ValueError):
            return (
                {tid: t.to_record() for tid, t in self.tunnels.items()},
                {key: s.to_record() for key, s in self.sessions.items()},
            )

    async def _persist(self, put: list[Tunnel], delete: list[str]) -> None:
        records, sessions = self._current()
        for tunnel in put:
            records[tunnel.id] = tunnel.to_record()
        for tunnel_id in delete:
            records.pop(tunnel_id, None)
        await self._save(records, sessions)

    async def _persist_sessions(self, put: dict[str, Session], delete: list[str]) -> None:
        records, sessions = self._current()
        sessions.update({key: session.to_record() for key, session in put.items()})
        for key in delete:
            sessions.pop(key, None)
        await self._save(records, sessions)

    async def _save(self, records: dict[str, Any], sessions: dict[str, Any]) -> None:
        data = json.dumps({"tunnels": records, "sessions": sessions}, indent=2, sort_keys=True).encode() + b"\n"
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise StoreUnavailable("STORE_WRITE_FAILED", f"could not write {self.path}: {exc}") from exc

    def _write(self, data: bytes) -> None:
        write_atomic(self.path, data)
        self._watch.changed()  # our own write: nothing to reload


# --------------------------------------------------------------------------- redis


#: Creates a tunnel only if its sandbox has fewer than the allowed live tunnels, counted in Redis itself, so
#: nodes writing at the same instant cannot both pass the check (a script runs atomically). The per-sandbox
#: index (a sorted set of tunnel ids) is checked against the records on the way: revoked, expired, missing or
#: moved (another address) tunnels do not count, and the first three leave the index.
#: KEYS: tunnels hash, the sandbox's index, change stream. ARGV: id, record, now, limit, expires_at, stream
#: maxlen, then the sandbox's addresses. Returns -1 when created, else the live count that refused it.
CREATE_SCRIPT: Final = """
local now = tonumber(ARGV[3])
local addresses = {}
for i = 7, #ARGV do addresses[ARGV[i]] = true end
local live = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local raw = redis.call('HGET', KEYS[1], id)
    local current = false
    if raw then
        local ok, rec = pcall(cjson.decode, raw)
        if ok and type(rec) == 'table' and rec.revoked_at == cjson.null and tonumber(rec.expires_at)
                and tonumber(rec.expires_at) > now then
            current = true
            if addresses[rec.address] then live = live + 1 end
        end
    end
    if not current then redis.call('ZREM', KEYS[2], id) end
end
if live >= tonumber(ARGV[4]) then return live end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'id', ARGV[1])
return -1
"""


class RedisTunnelStore(TunnelStore):
    backend = "redis"

    def __init__(self, policy: PolicyState, config: TunnelConfig, redis_url: str, prefix: str) -> None:
        super().__init__(policy, config)
        self.redis_url = redis_url
        self.hash_key = f"{prefix}tunnels"
        self.stream_key = f"{prefix}tunnel-changes"
        self.sessions_key = f"{prefix}tunnel-sessions"
        self.index_prefix = f"{prefix}tunnels-of:"  # + sandbox id: that sandbox's tunnel ids (for the limit)
        self._redis: Redis | None = None
        self._position = "0-0"
        self._next_resync = 0.0

    async def start(self) -> None:
        self._redis = Redis.from_url(self.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        try:
            await self._load()
            await self._index_live()
        except RedisError as exc:
            await self._redis.aclose()
            self._redis = None
            raise StoreUnavailable("STORE_UNAVAILABLE", f"cannot load tunnels from Redis: {exc}") from None
        self._maintainer = asyncio.create_task(self._maintain(), name="tunnel-store-redis")

    async def close(self) -> None:
        await super().close()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def _client(self) -> Redis:
        if self._redis is None:
            raise StoreUnavailable("STORE_UNAVAILABLE", "the Redis tunnel store is not started")
        return self._redis

    async def _load(self) -> None:
        # Snapshot and stream position in one transaction: following starts exactly after it.
        pipe = self._client.pipeline(transaction=True)
        pipe.hgetall(self.hash_key)
        pipe.xrevrange(self.stream_key, "+", "-", count=1)
        pipe.hgetall(self.sessions_key)
        records, newest, sessions = await pipe.execute()
        self._position = newest[0][0].decode() if newest else "0-0"
        decoded: dict[str, object] = {}
        for key, raw in records.items():
            try:
                decoded[key.decode()] = parse_json(raw)
            except ValueError:
                log.error("tunnel.record_rejected", tunnel=key.decode("utf-8", "replace"), code="INVALID_JSON")
        self._replace_all(decoded)
        session_records: dict[str, object] = {}
        for key, raw in sessions.items():
            with contextlib.suppress(ValueError):
                session_records[key.decode()] = parse_json(raw)
        self._replace_sessions(session_records)
        self._next_resync = asyncio.get_running_loop().time() + RESYNC_INTERVAL

    async def _follow_once(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if loop.time() >= self._next_resync:
                async with self._lock:
                    await self._load()
                return
            # Short block: the maintenance round (sandbox deletions) runs between reads.
            # Bytes throughout (no decode_responses); the client's stubs type the reply as a union of shapes.
            answer = await self._client.xread({self.stream_key: self._position}, count=1000, block=500)
            reply = cast(StreamReply, answer)
        except RedisError as exc:
            log.warning("tunnel.redis_unavailable", error=str(exc))
            self._next_resync = 0.0
            await asyncio.sleep(0.5)
            return
        if not reply:
            return
        entries = reply[0][1]
        ids = sorted({fields.get(b"id", b"").decode() for _, fields in entries} - {""})
        session_keys = sorted({fields.get(b"session", b"").decode() for _, fields in entries} - {""})
        async with self._lock:
            if session_keys:
                for key, raw in zip(
                    session_keys, await self._client.hmget(self.sessions_key, session_keys), strict=True
                ):
                    try:
                        if raw is None:
                            self.sessions.pop(key, None)
                        else:
                            self.sessions[key] = Session.from_record(parse_json(raw))
                    except (KeyError, TypeError, ValueError):
                        log.error("tunnel.session_rejected")
            values = await self._client.hmget(self.hash_key, ids) if ids else []
            for tunnel_id, raw in zip(ids, values, strict=True):
                if raw is None:
                    self._apply(tunnel_id, None)
                    continue
                try:
                    self._apply(tunnel_id, parse_record(parse_json(raw)))
                except (ValueError, GatewayError) as exc:
                    log.error("tunnel.record_rejected", tunnel=tunnel_id, error=str(exc))
            self._position = entries[-1][0].decode()

    async def _persist_sessions(self, put: dict[str, Session], delete: list[str]) -> None:
        pipe = self._client.pipeline(transaction=True)
        if put:
            pipe.hset(self.sessions_key, mapping={k: json.dumps(v.to_record()) for k, v in put.items()})
        if delete:
            pipe.hdel(self.sessions_key, *delete)
        for key in [*put, *delete]:
            pipe.xadd(self.stream_key, {"session": key}, maxlen=STREAM_MAXLEN, approximate=True)
        try:
            await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable("STORE_UNAVAILABLE", f"Redis is unavailable ({exc}); nothing was changed") from None

    async def _fetch_session(self, key: str) -> Session | None:
        try:
            raw = await self._client.hget(self.sessions_key, key)
            return Session.from_record(parse_json(raw)) if raw is not None else None
        except (RedisError, KeyError, TypeError, ValueError):
            return None

    async def _index_live(self) -> None:
        """Every live tunnel in its sandbox's index (idempotent; records written before the index existed)."""
        pipe = self._client.pipeline(transaction=False)
        for tunnel in self.tunnels.values():
            if tunnel.live():
                pipe.zadd(self.index_prefix + tunnel.sandbox, {tunnel.id: tunnel.expires_at})
        await pipe.execute()

    async def _persist_new(self, tunnel: Tunnel, addresses: list[str]) -> None:
        args: list[str | int | float] = [tunnel.id, json.dumps(tunnel.to_record()), time.time()]
        args.append(self.config.max_per_sandbox)
        args += [tunnel.expires_at, STREAM_MAXLEN, *addresses]
        keys = [self.hash_key, self.index_prefix + tunnel.sandbox, self.stream_key]
        try:
            refused = await self._client.eval(CREATE_SCRIPT, len(keys), *keys, *args)
        except RedisError as exc:
            raise StoreUnavailable("STORE_UNAVAILABLE", f"Redis is unavailable ({exc}); nothing was changed") from None
        if int(refused) >= 0:
            raise self._too_many(tunnel.sandbox, int(refused))  # other nodes made tunnels this one has not seen yet

    async def _persist(self, put: list[Tunnel], delete: list[str]) -> None:
        pipe = self._client.pipeline(transaction=True)
        if put:
            pipe.hset(self.hash_key, mapping={t.id: json.dumps(t.to_record()) for t in put})
        if delete:
            pipe.hdel(self.hash_key, *delete)
        for tunnel_id in [t.id for t in put] + delete:
            pipe.xadd(self.stream_key, {"id": tunnel_id}, maxlen=STREAM_MAXLEN, approximate=True)
        try:
            await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable("STORE_UNAVAILABLE", f"Redis is unavailable ({exc}); nothing was changed") from None


def open_tunnel_store(
    policy: PolicyState, config: TunnelConfig, *, backend: str, policy_path: Path, redis_url: str = "", prefix: str = ""
) -> TunnelStore:
    """The tunnel store matching the policy store's backend ("embedded" or "redis")."""
    if backend == "redis":
        return RedisTunnelStore(policy, config, redis_url, prefix)
    return FileTunnelStore(policy, config, config.store_path(policy_path))
