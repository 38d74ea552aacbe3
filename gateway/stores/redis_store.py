"""The Redis policy store: records in hashes, changes in a stream, snapshot + follow.

Other services change policies by writing Redis directly (the contract is in
docs/redis-contract.md); the gateway follows. Key schema, P = `store.redis_prefix`:

- `P sandboxes`, `P templates`: hashes, id/name -> JSON record (the API's form). The truth.
- `P changes`: stream, one entry per change: kind (sandbox|template), key, op (put|delete),
  optional source. An entry only says "look at this key again": the gateway re-reads the
  hash, so replaying, duplicating or batching entries is harmless.
- `P accepted:sandboxes`, `P accepted:templates`: the version of each record this gateway
  last accepted. Loaded before the live hashes on start-up, so a record broken while no
  gateway was running still falls back to its last good version, and the profile of an
  existing sandbox still cannot change across a restart.
- `P status:rejected`: "kind:key" -> JSON {kind, key, code, message, field, at, node} for
  every record the gateway refuses, removed once a valid version (or a delete) arrives.
- `P revisions:<sandbox id>`: list, the sandbox's last revisions, newest first (gateway.revisions), shared by
  every node: each offers the revisions it puts in force (PUSH_REVISION_LUA).

Nothing is lost between loading and following: the snapshot (all hashes and the stream's
last id) is one MULTI/EXEC, and following starts at that id. Whenever an update may have
been missed (a dropped connection, a stream trimmed or deleted past our position, or just
every `resync_interval` for writers that forgot XADD) the gateway takes a new snapshot
and applies the difference.

`RecordSync` is the protocol logic without I/O (what to apply, what to write back);
`RedisStore` does the talking to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import Conflict, ErrorBody, GatewayError, NotFound
from gateway.revisions import HISTORY_SIZE, Revision
from gateway.state import SANDBOX, TEMPLATE, PolicyContext, PolicyState, Rejection
from gateway.stores.base import Expect, PolicyStore, StoreUnavailable
from gateway.stores.config import StoreConfig
from gateway.untrusted import InvalidJson, parse_json

log = structlog.get_logger("gateway.store.redis")

KINDS = (SANDBOX, TEMPLATE)
RecordKey = tuple[str, str]  # (kind, id or name)
StreamId = tuple[int, int]  # (milliseconds, sequence): compared as a tuple, the way Redis orders ids
Raw = bytes  # a record exactly as stored in Redis

#: Records refused only because of another record (a template not there yet, an address
#: another sandbox still holds, a template still in use) are retried when others change.
#: Which of those a change of each kind can resolve: a sandbox that changed or left may have
#: freed an address or a template; a template that arrived may be the one a sandbox was missing.
UNBLOCKS: Mapping[str, frozenset[str]] = {
    SANDBOX: frozenset({"ADDRESS_IN_USE", "TEMPLATE_IN_USE"}),
    TEMPLATE: frozenset({"TEMPLATE_NOT_FOUND"}),
}
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
READ_BLOCK_MS = 1000
#: The follower answers at least once per READ_BLOCK_MS; no answer for this long means the state may lag (readiness).
SYNC_STALE_AFTER = 5.0
READ_COUNT = 1000
GAP_CHECK_INTERVAL = 1.0
WRITE_CHUNK = 1000
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0

# Runs atomically in Redis, so two gateway nodes racing on the same key cannot both win,
# and the live record, the accepted copy and the change entry never disagree.
# KEYS: live hash, accepted hash, status hash, changes stream.
# ARGV: key, expect (absent|present|any), record JSON ("" deletes), stream maxlen, kind, source.
PERSIST_LUA = """
local present = redis.call('HEXISTS', KEYS[1], ARGV[1])
if ARGV[2] == 'absent' and present == 1 then return '!exists' end
if ARGV[2] == 'present' and present == 0 then return '!missing' end
local op = 'put'
if ARGV[3] == '' then
  op = 'delete'
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
redis.call('HDEL', KEYS[3], ARGV[5] .. ':' .. ARGV[1])
return redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
                  'kind', ARGV[5], 'key', ARGV[1], 'op', op, 'source', ARGV[6])
"""


# The shared revision history (gateway.revisions): one capped list per sandbox, newest first, JSON entries. Every
# node offers the revision it just put in force; only one that is still the live record (the sandbox's raw value
# and its template's are those the node applied: a node that lags offers nothing stale) and not already the newest
# entry is pushed, a former entry of the same revision removed.
# KEYS: the sandbox's list, live sandboxes hash, live templates hash.
# ARGV: sandbox id, revision id, entry JSON, size, sandbox raw, template name ("" for none), template raw.
PUSH_REVISION_LUA = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[5] then return 0 end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[3], ARGV[6]) ~= ARGV[7] then return 0 end
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
for index, entry in ipairs(entries) do
  local ok, decoded = pcall(cjson.decode, entry)
  if ok and type(decoded) == 'table' and decoded['revision'] == ARGV[2] then
    if index == 1 then return 0 end
    redis.call('LREM', KEYS[1], 0, entry)
  end
end
redis.call('LPUSH', KEYS[1], ARGV[3])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[4]) - 1)
return 1
"""
# A removed sandbox's history goes with it, unless the sandbox is back by now. KEYS: its list, live sandboxes hash.
DROP_REVISIONS_LUA = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return redis.call('DEL', KEYS[1]) end
return 0
"""


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True, slots=True)
class Keys:
    sandboxes: str
    templates: str
    changes: str
    accepted_sandboxes: str
    accepted_templates: str
    rejected: str
    revisions_prefix: str

    @classmethod
    def for_prefix(cls, prefix: str) -> Keys:
        return cls(
            sandboxes=f"{prefix}sandboxes",
            templates=f"{prefix}templates",
            changes=f"{prefix}changes",
            accepted_sandboxes=f"{prefix}accepted:sandboxes",
            accepted_templates=f"{prefix}accepted:templates",
            rejected=f"{prefix}status:rejected",
            revisions_prefix=f"{prefix}revisions:",
        )

    def revisions(self, sandbox_id: str) -> str:
        return self.revisions_prefix + sandbox_id

    def live(self, kind: str) -> str:
        return self.sandboxes if kind == SANDBOX else self.templates

    def accepted(self, kind: str) -> str:
        return self.accepted_sandboxes if kind == SANDBOX else self.accepted_templates


def parse_stream_id(value: bytes | str | None) -> StreamId:
    if not value:
        return (0, 0)
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_stream_id(value: StreamId) -> str:
    return f"{value[0]}-{value[1]}"


def encode_record(record: Mapping[str, Any]) -> Raw:
    return json.dumps(record, separators=(",", ":")).encode()


def decode_record(raw: Raw) -> object:
    """The record's data; GatewayError(INVALID_JSON) when it is not JSON at all."""
    try:
        return parse_json(raw)
    except InvalidJson as exc:  # the same rules as an API body: one parser for every entry point
        preview = raw[:40].decode("utf-8", "replace")
        raise GatewayError("INVALID_JSON", f"the stored value is {exc.message}; starts with {preview!r}") from None


def status_field(key: RecordKey) -> str:
    return f"{key[0]}:{key[1]}"


def safe_url(url: str) -> str:
    """The Redis URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def stream_gap(info: Mapping[str, Any] | None, position: StreamId, entries_read: int) -> str | None:
    """Why entries after `position` may have been lost (None: they were not).

    `info` is XINFO STREAM's answer (None when the stream does not exist); `entries_read`
    counts the entries the stream had received up to `position`, as far as we know it.
    """
    if info is None:
        return "stream deleted" if position != (0, 0) else None
    last_generated = parse_stream_id(info.get("last-generated-id"))
    if last_generated < position:
        return "stream recreated (ids went backwards)"
    if parse_stream_id(info.get("max-deleted-entry-id")) > position:
        return "entries after our position were deleted"
    added = info.get("entries-added")
    if added is not None:
        if added < entries_read:
            return "stream recreated (fewer entries than we read)"
        # Trimming removes from the head: the first `added - length` entries may be gone.
        if added - info.get("length", 0) > entries_read:
            return "stream trimmed past our position"
        return None
    # Redis before 7.0 does not count entries. If the oldest entry left is newer than our
    # position, what lay between may be gone; we cannot tell, so assume it is.
    if last_generated == position:
        return None
    first = info.get("first-entry")
    if not first or parse_stream_id(first[0]) > position:
        return "stream trimmed past our position"
    return None


def stream_info(reply: Mapping[Any, Any]) -> dict[str, Any]:
    """XINFO STREAM with str keys, whichever protocol (RESP2/RESP3) and redis-py version answered."""
    return {(key.decode() if isinstance(key, bytes) else key): value for key, value in reply.items()}


Entry = tuple[bytes, Mapping[bytes, bytes]]


def _is_entry(value: object) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], bytes | str)


def xread_entries(reply: Any) -> list[Entry]:
    """The entries of an XREAD reply, whichever protocol (RESP2/RESP3) and redis-py version answered.

    RESP2 gives `[[stream, [entry, ...]]]`; RESP3 through redis-py gives `{stream: [[entry, ...]]}`.
    """
    if not reply:
        return []
    groups = list(reply.values()) if isinstance(reply, dict) else [pair[1] for pair in reply]

    def flatten(value: object) -> list[Entry]:
        if not isinstance(value, list | tuple):
            return []
        if all(_is_entry(item) for item in value):
            return list(value)
        return [entry for item in value for entry in flatten(item)]

    return [entry for group in groups for entry in flatten(group)]


def parse_entries(entries: Sequence[Entry]) -> tuple[list[RecordKey], set[RecordKey]]:
    """The records a batch of change entries names (first-seen order) and those it says were deleted."""
    wanted: dict[RecordKey, None] = {}
    deleted: set[RecordKey] = set()
    for entry_id, fields in entries:
        try:
            kind = fields[b"kind"].decode()
            name = fields[b"key"].decode()
        except (KeyError, UnicodeDecodeError):
            log.warning(
                "store.redis_change_entry_ignored", entry=entry_id.decode(), reason="needs kind and key (UTF-8)"
            )
            continue
        if kind not in KINDS or not name:
            log.warning(
                "store.redis_change_entry_ignored",
                entry=entry_id.decode(),
                kind=kind,
                key=name,
                reason="kind must be sandbox or template, with a non-empty key",
            )
            continue
        wanted[(kind, name)] = None
        if fields.get(b"op") == b"delete":
            deleted.add((kind, name))
    return list(wanted), deleted


@contextlib.contextmanager
def _bulk_allocation() -> Iterator[None]:
    # Loading thousands of records allocates millions of small objects; the cyclic collector
    # would rescan every record already loaded each time, adding a third to the load time.
    # Nothing here creates reference cycles, and the block runs without yielding to the loop.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(slots=True)
class Snapshot:
    """Everything the store reads from Redis, taken in one transaction."""

    live: dict[RecordKey, Raw]
    accepted: dict[RecordKey, Raw]
    rejected: dict[str, Raw]
    position: StreamId
    entries_added: int  # how many entries the stream had received at `position`


@dataclass(slots=True)
class WriteBack:
    """What Redis must be told after records were applied: accepted copies and published rejections."""

    accepted_set: dict[RecordKey, Raw] = field(default_factory=dict)
    accepted_del: list[RecordKey] = field(default_factory=list)
    status_set: dict[str, Raw] = field(default_factory=dict)
    status_del: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.accepted_set or self.accepted_del or self.status_set or self.status_del)


# --------------------------------------------------------------------------- protocol logic (no I/O)


class RecordSync:
    """Applies raw records from Redis to the state and works out what to write back.

    Keeps the raw value last seen for every record, so that a resync only touches what
    actually changed (re-parsing every policy each minute would stall the event loop)
    and an echo of a value already applied costs nothing.
    """

    def __init__(self, state: PolicyState, node: str) -> None:
        self.state = state
        self.node = node
        self.seen: dict[RecordKey, Raw] = {}  # live value last applied or refused; absent: deleted
        self.accepted_known: dict[RecordKey, Raw] = {}  # what we believe the accepted hashes hold
        self.status_known: dict[str, tuple[str, str, str | None] | None] = {}  # published rejections
        # The exact value each record in force was accepted from. Written back verbatim as the
        # accepted copy, so after a restart an unchanged live record is byte-equal to it and
        # is not parsed twice.
        self.applied: dict[RecordKey, Raw] = {}

    # ------------------------------------------------------------------ applying

    def load(self, snapshot: Snapshot) -> None:
        """First load: the accepted copies, then the live records over them."""
        before = dict(self.state.rejections)
        decoded: dict[str, dict[str, object]] = {SANDBOX: {}, TEMPLATE: {}}
        broken: dict[RecordKey, GatewayError] = {}
        with _bulk_allocation():
            for key, raw in snapshot.accepted.items():
                try:
                    decoded[key[0]][key[1]] = decode_record(raw)
                except GatewayError as error:
                    broken[key] = error
            self.state.replace_all(decoded[TEMPLATE], decoded[SANDBOX])
            self.applied = {key: raw for key, raw in snapshot.accepted.items() if self._in_force(key)}
            for key, exc in broken.items():
                self._reject(key, exc.body)
            # As if the live hashes still held the accepted copies: only live records that
            # differ from them need parsing again.
            self.seen = dict(snapshot.accepted)
            self._apply_changes(self.diff(snapshot.live), ())
        self._log_rejections(before, set(self.state.rejections) | set(before))

    def diff(self, live: Mapping[RecordKey, Raw]) -> dict[RecordKey, Raw | None]:
        """The records whose live value differs from the one last seen (None: deleted)."""
        changes: dict[RecordKey, Raw | None] = {key: raw for key, raw in live.items() if self.seen.get(key) != raw}
        changes.update({key: None for key in self.seen if key not in live})
        return changes

    def apply(self, values: Mapping[RecordKey, Raw | None], deleted: Iterable[RecordKey] = ()) -> set[RecordKey]:
        """Apply current raw values (None: the record is gone); returns every record whose outcome may have changed.

        `deleted`: records a change entry said were deleted. If such a sandbox exists again,
        it was deleted and re-created, so its profile may differ: apply the delete first,
        exactly as if the two entries had been read one at a time.
        """
        changed = {key: raw for key, raw in values.items() if raw != self.seen.get(key)}
        if not changed:
            return set()
        before = {key: rej for key in changed if (rej := self.state.rejections.get(key)) is not None}
        with _bulk_allocation():
            touched = self._apply_changes(changed, deleted)
        self._log_rejections(before, touched)
        return touched

    def _apply_changes(self, changed: Mapping[RecordKey, Raw | None], deleted: Iterable[RecordKey]) -> set[RecordKey]:
        for key in deleted:
            if key[0] == SANDBOX and changed.get(key) is not None and key[1] in self.state.sandboxes:
                self.state.apply_external(SANDBOX, key[1], None)
                self.applied.pop(key, None)
        # The order replace_all uses: sandboxes leave first (freeing addresses and templates),
        # templates arrive before the sandboxes that use them, and templates go last, once
        # no sandbox refers to them any more.
        sandbox_deletes = sorted(k for k, raw in changed.items() if k[0] == SANDBOX and raw is None)
        template_puts = sorted(k for k, raw in changed.items() if k[0] == TEMPLATE and raw is not None)
        sandbox_puts = sorted(k for k, raw in changed.items() if k[0] == SANDBOX and raw is not None)
        template_deletes = sorted(k for k, raw in changed.items() if k[0] == TEMPLATE and raw is None)
        for key in sandbox_deletes + template_puts:
            self._apply_one(key, changed[key])
        pending = sandbox_puts
        while pending:
            failed = [key for key in pending if self._apply_one(key, changed[key]) is not None]
            if len(failed) == len(pending):
                break
            pending = failed
        for key in template_deletes:
            self._apply_one(key, None)
        applied = [key for key in changed if key not in self.state.rejections]
        return set(changed) | self._retry_dependents(applied)

    def record_written(self, key: RecordKey, raw: Raw | None) -> None:
        """This node wrote `raw` itself (live and accepted, status cleared): its echo is not news."""
        if raw is None:
            self.seen.pop(key, None)
            self.accepted_known.pop(key, None)
            self.applied.pop(key, None)
        else:
            self.seen[key] = raw
            self.accepted_known[key] = raw
            self.applied[key] = raw
        self.status_known.pop(status_field(key), None)

    def _apply_one(self, key: RecordKey, raw: Raw | None) -> Rejection | None:
        kind, name = key
        if raw is None:
            self.seen.pop(key, None)
            rejection = self.state.apply_external(kind, name, None)
            if rejection is None:
                self.applied.pop(key, None)
            return rejection
        self.seen[key] = raw
        try:
            data = decode_record(raw)
        except GatewayError as exc:
            return self._reject(key, exc.body)
        try:
            rejection = self.state.apply_external(kind, name, data)
        except Exception as exc:
            # A parser bug must cost one record, not stop every other policy from loading
            # (the follower would otherwise resync and fail on it forever).
            log.exception("store.policy_record_crashed", kind=kind, key=name)
            return self._reject(key, ErrorBody("RECORD_UNPROCESSABLE", f"internal error processing it: {exc!r}"))
        if rejection is None:
            self.applied[key] = raw
        return rejection

    def _in_force(self, key: RecordKey) -> bool:
        return key[1] in (self.state.sandboxes if key[0] == SANDBOX else self.state.templates)

    def _reject(self, key: RecordKey, body: ErrorBody) -> Rejection:
        rejection = Rejection(key[0], key[1], body, time.time())
        self.state.rejections[key] = rejection
        return rejection

    def _retry_dependents(self, applied: Iterable[RecordKey]) -> set[RecordKey]:
        """Retry records refused because of others, as far as what was just applied can have helped them."""
        codes: set[str] = set()
        for kind, _name in applied:
            codes |= UNBLOCKS[kind]
        retried: set[RecordKey] = set()
        while codes:
            candidates = sorted(
                (key for key, rej in self.state.rejections.items() if key[0] in KINDS and rej.error.code in codes),
                key=lambda key: (key[0] == TEMPLATE, key),  # sandboxes first: they free templates and addresses
            )
            resolved = [key for key in candidates if self._apply_one(key, self.seen.get(key)) is None]
            retried.update(resolved)
            codes = set().union(*(UNBLOCKS[kind] for kind, _name in resolved))
        return retried

    def _log_rejections(self, before: Mapping[RecordKey, Rejection], keys: Iterable[RecordKey]) -> None:
        for key in keys:
            old, new = before.get(key), self.state.rejections.get(key)
            if new is not None and (old is None or old.error != new.error):
                log.error(
                    "store.policy_record_rejected",
                    kind=key[0],
                    key=key[1],
                    code=new.error.code,
                    message=new.error.message,
                    field=new.error.field,
                )
            elif new is None and old is not None:
                log.info("store.policy_record_recovered", kind=key[0], key=key[1])

    # ------------------------------------------------------------------ writing back

    def adopt(self, snapshot: Snapshot) -> None:
        """Believe what the snapshot says the accepted and status hashes hold."""
        self.accepted_known = dict(snapshot.accepted)
        self.status_known = {}
        for name, raw in snapshot.rejected.items():
            try:
                data = json.loads(raw)
                self.status_known[name] = (data["code"], data["message"], data.get("field"))
            except (ValueError, TypeError, KeyError, RecursionError):
                self.status_known[name] = None  # unreadable: rewritten or removed below

    def write_back(self, keys: Iterable[RecordKey] | None = None) -> WriteBack:
        """The writes that bring the accepted copies and published rejections in line with the state.

        `keys`: the records to look at; None for all of them (after a snapshot).
        """
        if keys is None:
            everything: set[RecordKey] = {(SANDBOX, sid) for sid in self.state.sandboxes}
            everything |= {(TEMPLATE, name) for name in self.state.templates}
            everything |= set(self.accepted_known) | {k for k in self.state.rejections if k[0] in KINDS}
            published = list(self.status_known)
            keys = everything
        else:
            keys = set(keys)
            published = []
        out = WriteBack()
        for key in keys:
            kind, name = key
            record = (self.state.sandboxes if kind == SANDBOX else self.state.templates).get(name)
            if record is None:
                if self.accepted_known.pop(key, None) is not None:
                    out.accepted_del.append(key)
            else:
                raw = self.applied.get(key) or encode_record(record.to_dict())
                if self.accepted_known.get(key) != raw:
                    out.accepted_set[key] = raw
                self.accepted_known[key] = raw
            self._status_write(key, out)
        for name in published:  # stale: published for records that no longer exist
            kind, _, key_name = name.partition(":")
            if (kind, key_name) not in keys and (kind, key_name) not in self.state.rejections:
                out.status_del.append(name)
                del self.status_known[name]
        return out

    def _status_write(self, key: RecordKey, out: WriteBack) -> None:
        name = status_field(key)
        rejection = self.state.rejections.get(key)
        if rejection is None:
            if name in self.status_known:
                out.status_del.append(name)
                del self.status_known[name]
            return
        signature = (rejection.error.code, rejection.error.message, rejection.error.field)
        # Another node publishing the same refusal is as good as ours: leave it, so nodes do not take turns.
        if self.status_known.get(name) != signature:
            out.status_set[name] = json.dumps({**rejection.to_dict(), "node": self.node}).encode()
            self.status_known[name] = signature


# --------------------------------------------------------------------------- the store


class RedisStore(PolicyStore):
    backend = "redis"
    external_source = "redis"

    def __init__(
        self, context: PolicyContext, config: StoreConfig, *, start_timeout: float = 10.0, keeps_history: bool = True
    ) -> None:
        super().__init__(context)
        self.config = config
        self.keys = Keys.for_prefix(config.redis_prefix)
        self.start_timeout = start_timeout
        self.sync = RecordSync(self.state, config.node_id)
        self._url = safe_url(config.redis_url)
        self._redis: Redis | None = None
        self._script: AsyncScript | None = None
        self._follower: asyncio.Task[None] | None = None
        self._loaded = False
        self._position: StreamId = (0, 0)
        self._entries_read = 0
        self._connected = False
        #: When the change-stream follower last had an answer from Redis (monotonic).
        self._last_contact = time.monotonic()
        #: The state holds every change Redis had at this moment (monotonic): when the snapshot or the change-stream
        #: read whose entries were applied last was answered.
        self._synced_at = time.monotonic()
        self._last_resync: float | None = None
        self._next_resync = 0.0
        self._next_gap_check = 0.0
        #: Sandboxes whose newest revision (or removal) is not in the shared history yet.
        self._revisions_due: set[str] = set()
        self._revisions_wakeup = asyncio.Event()
        self._revisions_lock = asyncio.Lock()
        self._revisions_task: asyncio.Task[None] | None = None
        self._push_revision: AsyncScript | None = None
        self._drop_revisions: AsyncScript | None = None
        #: False in an egress worker: the main process's store shares the history (a worker would only repeat it).
        self.keeps_history = keeps_history
        if keeps_history:
            self.state.history.listeners.append(self._revision_due)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # No client-side retries: a timed-out conditional write could run twice and then
        # report a conflict with itself. The follower retries on its own terms instead.
        node = "".join(c for c in self.config.node_id[:64] if c.isprintable() and not c.isspace())
        self._redis = Redis.from_url(
            self.config.redis_url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            client_name=f"gateway:{node}",  # shows the gateway nodes in CLIENT LIST
        )
        self._script = self._redis.register_script(PERSIST_LUA)
        self._push_revision = self._redis.register_script(PUSH_REVISION_LUA)
        self._drop_revisions = self._redis.register_script(DROP_REVISIONS_LUA)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._resync("start")
                break
            except RedisError as exc:
                if loop.time() + backoff > deadline:
                    await self._redis.aclose()
                    self._redis = None
                    raise StoreUnavailable(
                        "STORE_UNAVAILABLE",
                        f"cannot load policies from Redis at {self._url} within {self.start_timeout:g} s: {exc}",
                    ) from None
                log.warning("store.redis_unavailable", url=self._url, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        self.ready.set()
        self._follower = asyncio.create_task(self._follow(), name="redis-policy-follower")
        if self.keeps_history:
            self._revisions_task = asyncio.create_task(self._share_revisions(), name="redis-revision-history")

    async def close(self) -> None:
        if self._revisions_task is not None:
            self._revisions_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revisions_task
            self._revisions_task = None
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._connected = False

    def out_of_sync(self) -> str | None:
        if not self._connected:
            return f"not connected to Redis at {self._url}: policy changes may not be followed"
        silent = time.monotonic() - self._last_contact
        if silent > SYNC_STALE_AFTER:
            return f"no answer from Redis at {self._url} for {silent:.0f}s: policy changes may not be followed"
        return None

    def sync_lag(self) -> float:
        # An upper bound: while a blocking read waits (up to READ_BLOCK_MS) Redis would have sent any change at
        # once, but only its answer confirms that Redis was there.
        return max(0.0, time.monotonic() - self._synced_at)

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "redis": self._url,
            "prefix": self.config.redis_prefix,
            "last_stream_id": format_stream_id(self._position),
            "connected": self._connected,
            "last_resync": self._last_resync,
        }

    @property
    def _client(self) -> Redis:
        if self._redis is None:
            raise StoreUnavailable("STORE_UNAVAILABLE", "the Redis store is not started")
        return self._redis

    # ------------------------------------------------------------------ reading

    async def _snapshot(self) -> Snapshot:
        keys = self.keys
        pipe = self._client.pipeline(transaction=True)
        pipe.hgetall(keys.sandboxes)
        pipe.hgetall(keys.templates)
        pipe.hgetall(keys.accepted_sandboxes)
        pipe.hgetall(keys.accepted_templates)
        pipe.hgetall(keys.rejected)
        pipe.xrevrange(keys.changes, "+", "-", count=1)
        pipe.xinfo_stream(keys.changes)
        results = await pipe.execute(raise_on_error=False)
        for result in results[:6]:
            if isinstance(result, Exception):
                raise result
        live_s, live_t, acc_s, acc_t, rejected, newest, info = results
        position = parse_stream_id(newest[0][0]) if newest else (0, 0)
        entries_added = 0
        if not isinstance(info, Exception):  # an error here means the stream does not exist yet
            info = stream_info(info)
            # After a trim to zero the stream is empty but ids continue from last-generated-id.
            position = max(position, parse_stream_id(info.get("last-generated-id")))
            entries_added = int(info.get("entries-added") or 0)

        def records(kind: str, data: Mapping[bytes, bytes]) -> dict[RecordKey, Raw]:
            return {(kind, name.decode("utf-8", "replace")): raw for name, raw in data.items()}

        return Snapshot(
            live={**records(TEMPLATE, live_t), **records(SANDBOX, live_s)},
            accepted={**records(TEMPLATE, acc_t), **records(SANDBOX, acc_s)},
            rejected={name.decode("utf-8", "replace"): raw for name, raw in rejected.items()},
            position=position,
            entries_added=entries_added,
        )

    async def _resync(self, reason: str) -> None:
        started = time.monotonic()
        async with self._write_lock:
            snapshot = await self._snapshot()
            answered = time.monotonic()
            if self._loaded:
                changed = len(self.sync.apply(self.sync.diff(snapshot.live)))
            else:
                self.sync.load(snapshot)
                self._loaded = True
                changed = len(snapshot.live)
            self._position = snapshot.position
            self._entries_read = snapshot.entries_added
            self.sync.adopt(snapshot)
            await self._write_back(None)
        self._synced_at = answered
        self._connected = True
        self._last_contact = time.monotonic()
        self._last_resync = time.time()
        self._next_resync = asyncio.get_running_loop().time() + self.config.resync_interval
        log.info(
            "store.redis_policies_loaded" if reason == "start" else "store.redis_resynced",
            reason=reason,
            changed=changed,
            sandboxes=len(self.state.sandboxes),
            templates=len(self.state.templates),
            rejected=len(self.state.rejections),
            position=format_stream_id(self._position),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _gap(self) -> str | None:
        try:
            info = await self._client.xinfo_stream(self.keys.changes)
        except ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise
            return stream_gap(None, self._position, self._entries_read)
        return stream_gap(stream_info(info), self._position, self._entries_read)

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN
        resync_reason: str | None = None
        while True:
            try:
                now = loop.time()
                if resync_reason is None and now >= self._next_resync:
                    resync_reason = "periodic"
                if resync_reason is None and now >= self._next_gap_check:
                    self._next_gap_check = now + GAP_CHECK_INTERVAL
                    gap = await self._gap()
                    if gap is not None:
                        log.warning("store.redis_stream_gap", reason=gap, position=format_stream_id(self._position))
                        resync_reason = "gap"
                if resync_reason is not None:
                    await self._resync(resync_reason)
                    resync_reason = None
                    backoff = BACKOFF_MIN
                    continue
                reply = await self._client.xread(
                    {self.keys.changes: format_stream_id(self._position)}, count=READ_COUNT, block=READ_BLOCK_MS
                )
                self._connected = True
                answered = self._last_contact = time.monotonic()
                entries = xread_entries(reply)
                if entries:
                    await self._process(entries)
                self._synced_at = answered
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the follower must outlive any error; it resyncs afterwards
                self._connected = False
                resync_reason = "reconnect"
                await self._drop_idle_connections()
                if isinstance(exc, RedisError):
                    log.warning(
                        "store.redis_unavailable", url=self._url, error=str(exc) or type(exc).__name__, retry_in=backoff
                    )
                else:
                    log.exception("store.redis_follower_failed", retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _process(self, entries: Sequence[Entry]) -> None:
        wanted, deleted = parse_entries(entries)
        async with self._write_lock:
            if wanted:
                pipe = self._client.pipeline(transaction=True)  # one consistent view across the records
                for kind, name in wanted:
                    pipe.hget(self.keys.live(kind), name)
                values = dict(zip(wanted, await pipe.execute(), strict=True))
                touched = self.sync.apply(values, deleted)
                if touched:
                    await self._write_back(touched)
            self._position = parse_stream_id(entries[-1][0])
            self._entries_read += len(entries)

    async def _write_back(self, keys: Iterable[RecordKey] | None) -> None:
        plan = self.sync.write_back(keys)
        if not plan:
            return
        pipe = self._client.pipeline(transaction=False)
        for kind in KINDS:
            items = [(name, raw) for (k, name), raw in plan.accepted_set.items() if k == kind]
            for start in range(0, len(items), WRITE_CHUNK):
                pipe.hset(self.keys.accepted(kind), mapping=dict(items[start : start + WRITE_CHUNK]))
            gone = [name for k, name in plan.accepted_del if k == kind]
            for start in range(0, len(gone), WRITE_CHUNK):
                pipe.hdel(self.keys.accepted(kind), *gone[start : start + WRITE_CHUNK])
        if plan.status_set:
            # redis-py types mapping keys as a union of encodable types (Mapping's key is invariant)
            pipe.hset(self.keys.rejected, mapping=cast("dict[Any, Any]", plan.status_set))
        if plan.status_del:
            pipe.hdel(self.keys.rejected, *plan.status_del)
        await pipe.execute()

    async def _drop_idle_connections(self) -> None:
        """After a connection error, close the pool's idle connections too: they are to the same server, and
        without client-side retries (see `start`) one left over from before a Redis restart would fail the first
        write after Redis is back. They reconnect when next used."""
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.connection_pool.disconnect(inuse_connections=False)

    # ------------------------------------------------------------------ writing

    # ------------------------------------------------------------------ the shared revision history

    def _revision_due(self, sandbox_id: str, _entry: object) -> None:
        self._revisions_due.add(sandbox_id)
        self._revisions_wakeup.set()

    async def _revisions_committed(self) -> None:
        """An API write's revision is shared before the write answers (then it is the newest entry even when
        another node offers the same revision a moment later: that one names the source redis)."""
        try:
            await self._flush_revisions()
        except RedisError as exc:  # the write itself went through; the task offers it again
            log.warning("store.revisions_not_shared", error=str(exc), pending=len(self._revisions_due))
            self._revisions_wakeup.set()

    async def revisions(self, sandbox_id: str) -> list[Revision]:
        """The shared history in Redis, after this node's own newest revisions are in it."""
        self.state.get_sandbox(sandbox_id)
        try:
            await self._flush_revisions()
            raws = await self._client.lrange(self.keys.revisions(sandbox_id), 0, HISTORY_SIZE - 1)
        except RedisError as exc:
            raise StoreUnavailable(
                "STORE_UNAVAILABLE", f"cannot read the revision history from Redis at {self._url}: {exc}"
            ) from None
        entries = []
        for raw in raws:
            try:
                entries.append(Revision.from_dict(parse_json(raw)))
            except (InvalidJson, ValueError):
                continue  # not an entry the gateway wrote: skipped, as the embedded store skips one
        return entries

    async def _share_revisions(self) -> None:
        while True:
            await self._revisions_wakeup.wait()
            self._revisions_wakeup.clear()
            try:
                await self._flush_revisions()
            except RedisError as exc:
                log.warning("store.revisions_not_shared", error=str(exc), pending=len(self._revisions_due))
                await asyncio.sleep(BACKOFF_MAX)
                self._revisions_wakeup.set()

    async def _flush_revisions(self) -> None:
        """Offer the newest revision of every sandbox that has one due (or drop the history of one removed). A
        failure leaves the rest due."""
        async with self._revisions_lock:
            while self._revisions_due:
                sandbox_id = self._revisions_due.pop()  # before the await: one due again meanwhile stays due
                try:
                    await self._share_revision(sandbox_id)
                except BaseException:
                    self._revisions_due.add(sandbox_id)
                    raise

    async def _share_revision(self, sandbox_id: str) -> None:
        if self._push_revision is None or self._drop_revisions is None:
            return
        history_key = self.keys.revisions(sandbox_id)
        entry = self.state.history.current(sandbox_id) if sandbox_id in self.state.sandboxes else None
        if entry is None:
            await self._drop_revisions(keys=[history_key, self.keys.sandboxes], args=[sandbox_id])
            return
        raw = self.sync.applied.get((SANDBOX, sandbox_id))
        template_raw = self.sync.applied.get((TEMPLATE, entry.template)) if entry.template else b""
        if raw is None or template_raw is None:
            return  # not applied from a value Redis holds: nothing to compare the live record with
        await self._push_revision(
            keys=[history_key, self.keys.sandboxes, self.keys.templates],
            args=[
                sandbox_id,
                entry.revision,
                json.dumps(entry.to_dict(), sort_keys=True),
                HISTORY_SIZE,
                raw,
                entry.template or "",
                template_raw,
            ],
        )

    async def _persist(self, kind: str, key: str, record: dict[str, Any] | None, expect: Expect) -> None:
        if self._script is None:
            raise StoreUnavailable("STORE_UNAVAILABLE", "the Redis store is not started")
        raw = encode_record(record) if record is not None else b""
        try:
            result = await self._script(
                keys=[self.keys.live(kind), self.keys.accepted(kind), self.keys.rejected, self.keys.changes],
                args=[key, expect, raw, self.config.stream_maxlen, kind, self.config.node_id],
            )
        except RedisTimeoutError as exc:
            self._connected = False
            raise StoreUnavailable(
                "STORE_UNAVAILABLE",
                f"Redis at {self._url} did not answer in time ({exc}); the change was not confirmed and is not in "
                "force here yet. It may still have been stored: read it back before retrying.",
            ) from None
        except RedisError as exc:
            self._connected = False
            await self._drop_idle_connections()
            raise StoreUnavailable(
                "STORE_UNAVAILABLE",
                f"Redis at {self._url} is unavailable ({exc or type(exc).__name__}); nothing was changed",
            ) from None
        field_name = "id" if kind == SANDBOX else "name"
        if result == b"!exists":
            raise Conflict(
                f"{kind.upper()}_EXISTS",
                f"{kind} {key!r} already exists in Redis (another gateway node or service wrote it first; "
                "if it is not listed here, it was refused: see the store status)",
                field_name,
            )
        if result == b"!missing":
            raise NotFound(
                f"{kind.upper()}_NOT_FOUND", f"no {kind} {key!r} in Redis (deleted by another writer)", field_name
            )
        self.sync.record_written((kind, key), raw or None)
