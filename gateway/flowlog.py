"""Flow records: one metadata record per connection (and per denial, and per request the inspection tier
decided), never payload or credentials.

Each record is rendered to JSON once (`render`, a fixed template: about a quarter of `json.dumps`' cost)
and goes three ways:

- live subscribers (`subscribe`, what GET /v1/flows/stream serves): each holds the lines of its sandbox and
  verdict in a bounded buffer; one that does not read loses its oldest lines (counted), it never slows the
  data plane or grows;
- only with `audit.log_records`, a structured log line (event `flow`): with JSON logging
  (`gateway.logs.json_line_stream`) the rendered record plus `event`, `level` and `timestamp`, the lines of
  one event-loop turn written together at the end of that turn; otherwise through structlog at once. Off by
  default: records are records, not console chatter;
- an NDJSON audit batch per sandbox: every `flush_interval` a background task
  writes the records queued for each sandbox to `<dir>/<sandbox id>/<ts_us>-<pid>.ndjson`,
  where `ts_us` is the first record's `end_us` (records are queued when a connection
  closes, so this follows the order batches are written in), zero-padded to 16 digits
  so that the names' lexical order is chronological. Files are written to a temporary
  name, fsynced and then linked to their final name, so a reader never sees half a
  batch, and an existing batch (say from an earlier process that had the same pid, as
  every container's pid 1 does) is never overwritten;
- optionally a Redis stream (`audit.redis_stream`), capped near `audit.redis_maxlen`
  entries (`XADD MAXLEN ~`). The mirror has its own queue and task: Redis being slow or
  down delays or loses only the mirror, never the files.

A worker process of `--workers N` has a forwarding flow log instead (`forward`): the lines of one event-loop
turn go to `forward` together at the end of that turn (one write to the pipe to the main process, whose flow
log is the one sink), and nothing else.

`record()` is what the data plane calls: it never blocks and never raises. The queue is
bounded; when it is full the record is dropped and counted (the log line is still
written), with one warning per flush interval rather than one per record.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import json
import math
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec
import structlog

from gateway.audit_config import AuditConfig
from gateway.errors import GatewayError, NotFound
from gateway.logs import json_line_stream
from gateway.policy import ADDRESS_SCHEMA, ID_PATTERN
from gateway.schema import Note

if TYPE_CHECKING:
    import redis.asyncio


__all__ = [
    "BATCH_NAME_PATTERN",
    "FIELD_NAMES",
    "MAX_LIST_LIMIT",
    "BatchInfo",
    "FlowLog",
    "FlowRecord",
    "Subscription",
    "check_batch_name",
    "check_sandbox_id",
    "decode_record",
    "flow_verdict",
    "new_denial_id",
    "now_us",
    "render",
]

log = structlog.get_logger("gateway.flowlog")

FlowProtocol = Literal["tls", "http", "https", "tcp", "dns"]
#: would_deny: allowed only because the sandbox's policy is in report mode; `rule` is the one that would deny.
FlowVerdict = Literal["allow", "deny", "would_deny"]


def flow_verdict(allowed: bool, would_deny: bool) -> FlowVerdict:
    """The record's verdict of a decision: `would_deny` is allowed only because the policy is in report mode."""
    if not allowed:
        return "deny"
    return "would_deny" if would_deny else "allow"


#: `{ts_us}-{pid}.ndjson`: 16 digits keep lexical order chronological until the year 2286.
BATCH_NAME_PATTERN: Final = re.compile(r"^(\d{16})-(\d{1,10})\.ndjson$")
TS_DIGITS: Final = 16
MAX_LIST_LIMIT: Final = 1000
DEFAULT_QUEUE_SIZE: Final = 100_000
#: Records per file at most; a busier interval is split over several files.
MAX_BATCH_RECORDS: Final = 10_000
REDIS_TIMEOUT: Final = 5.0
#: Lines held for one live subscriber that does not read; beyond this its oldest are dropped (and counted).
SUBSCRIBER_BUFFER: Final = 1000
FILE_MODE: Final = 0o640
DIR_MODE: Final = 0o750


#: `{unix seconds, hex}-{40 random bits, hex}`: the time says which batches may hold the record.
DENIAL_ID_PATTERN: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{10}")
#: Denials the flow log keeps by id in memory (the newest), for a lookup before their batch is written.
DENIAL_INDEX_SIZE: Final = 10_000
#: How far around a denial id's time a lookup reads batches (records are queued when the connection closes,
#: batches cover a flush interval).
DENIAL_SEARCH_SECONDS: Final = 120


def new_denial_id() -> str:
    return f"{time.time_ns() // 1_000_000_000:08x}-{secrets.token_hex(5)}"


def now_us() -> int:
    """Microseconds since the epoch (wall clock, as flow records carry)."""
    return time.time_ns() // 1000


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__ (~6 us a
# record, ten times a plain one), and a record is built for every connection, tunnel request and DNS query.
# Records are built once and never changed.
@dataclass(slots=True)
class FlowRecord:
    """One connection's (or one inspected HTTP request's) metadata. Deliberately has no field for payload, header
    values or credentials."""

    start_us: Annotated[int, Note(description="µs since the epoch.")]
    end_us: Annotated[int, Note(description="µs since the epoch.")]
    sandbox: str
    src_addr: Annotated[str, Note(ADDRESS_SCHEMA)]
    src_port: int
    dst_addr: Annotated[str, Note(ADDRESS_SCHEMA, description="The address the gateway dialled.")]
    dst_port: int
    orig_dst_addr: Annotated[str, Note(ADDRESS_SCHEMA, description="The destination the sandbox asked for.")]
    orig_dst_port: int
    hostname: Annotated[str | None, Note(description="TLS SNI or HTTP Host.")]
    protocol: FlowProtocol
    bytes_up: Annotated[int, Note(minimum=0)]
    bytes_down: Annotated[int, Note(minimum=0)]
    duration_ms: Annotated[float, Note(minimum=0)]
    verdict: FlowVerdict
    reason: str
    rule: str
    # One HTTP request's own facts, for the records of the inspection tier (one per request, protocol
    # "http"/"https"); None in a connection's record.
    method: Annotated[
        str | None, Note(description="An inspected HTTP request's method (null in a connection's record).")
    ] = None
    #: Without the query: queries carry tokens.
    path: Annotated[str | None, Note(description="An inspected HTTP request's path, without the query.")] = None
    status: Annotated[int | None, Note(description="The status answered to an inspected HTTP request.")] = None
    #: Set on denials only: what the sandbox was told (the operator's message) and the id it can quote.
    message: Annotated[
        str | None, Note(description="The operator's message for the rule that denied (egress.deny_messages).")
    ] = None
    denial_id: Annotated[
        str | None, Note(description="A denial's id, told the sandbox; GET /v1/denials/{id} finds this record.")
    ] = None
    revision: Annotated[
        str | None,
        Note(
            description="The revision of the sandbox's policy that decided (an inspected request: the policy its "
            "connection was handed over with; a tunnel request: the sandbox's policy it was served under; null "
            "where no policy decides: an unknown source)."
        ),
    ] = None

    learned_name: Annotated[
        str | None,
        Note(
            description="A connection that carried no name (opaque TCP, TLS without SNI, HTTP with an address as "
            "Host) to an address the gateway's DNS had answered this sandbox with, for this name: it was decided on "
            "that name (null otherwise)."
        ),
    ] = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELD_NAMES}


FIELD_NAMES: Final = tuple(f.name for f in fields(FlowRecord))


def decode_record(line: bytes) -> FlowRecord:
    """A record from its JSON (what `render` wrote, in another process). Raises ValueError for anything else."""
    try:
        return msgspec.json.decode(line, type=FlowRecord)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None


class Subscription:
    """One live view of the records: those of `sandbox` (None: all) with `verdict` (None: both), as rendered JSON,
    in a buffer of `size` lines. A reader that falls behind loses the oldest lines, counted in `lagged`."""

    def __init__(
        self,
        sandbox: str | None,
        verdict: str | None,
        size: int = SUBSCRIBER_BUFFER,
        visible: Callable[[str], bool] | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.verdict = verdict
        self.visible = visible  # the reader's scope: records of other sandboxes are never offered to it
        self.lines: deque[str] = deque(maxlen=size)
        self.lagged = 0
        self._wakeup = asyncio.Event()

    def offer(self, rec: FlowRecord, line: str) -> None:
        if self.sandbox not in (None, rec.sandbox) or self.verdict not in (None, rec.verdict):
            return
        if self.visible is not None and not self.visible(rec.sandbox):
            return
        if len(self.lines) == self.lines.maxlen:
            self.lagged += 1
        self.lines.append(line)
        self._wakeup.set()

    async def next(self, timeout: float) -> list[str]:
        """The lines queued since the last call; waits up to `timeout` seconds for one (then an empty list)."""
        if not self.lines:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
        self._wakeup.clear()
        lines = list(self.lines)
        self.lines.clear()
        return lines


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """One batch file of a sandbox's flow records."""

    name: Annotated[str, Note(pattern=BATCH_NAME_PATTERN.pattern)]
    size: Annotated[int, Note(minimum=0, description="Bytes.")]
    first_ts_us: Annotated[
        int, Note(minimum=0, description="When the batch's first record was written (its end_us), µs since the epoch.")
    ]


_TEMPLATE: Final = (
    '{"start_us":%d,"end_us":%d,"sandbox":%s,"src_addr":%s,"src_port":%d,"dst_addr":%s,"dst_port":%d,'
    '"orig_dst_addr":%s,"orig_dst_port":%d,"hostname":%s,"protocol":%s,"bytes_up":%d,"bytes_down":%d,'
    '"duration_ms":%r,"verdict":%s,"reason":%s,"rule":%s,"method":%s,"path":%s,"status":%s,"message":%s,'
    '"denial_id":%s,"revision":%s,"learned_name":%s}'
)
_quote = json.encoder.encode_basestring_ascii  # C: escapes exactly as json.dumps does


#: JSON text of strings seen in records (addresses, names, reasons and rules recur), None as null; bounded.
_QUOTED: dict[object, str] = {None: "null"}
_QUOTED_MAX: Final = 4096
_INTS: Final = {int}


def _quoted(value: object) -> str:
    if type(value) is not str:
        return "null" if value is None else _quote(str(value))
    if len(_QUOTED) >= _QUOTED_MAX:
        _QUOTED.clear()
        _QUOTED[None] = "null"
    found = _QUOTED[value] = _quote(value)
    return found


def render(rec: FlowRecord) -> str:
    """The record as one compact JSON object (no newline): what `json.dumps(rec.to_dict())` would say, made from
    a fixed template. Anything of an unexpected type goes through `json.dumps` (text for unknown objects)."""
    duration = rec.duration_ms
    types = {type(rec.start_us), type(rec.end_us), type(rec.src_port), type(rec.dst_port), type(rec.orig_dst_port),
             type(rec.bytes_up), type(rec.bytes_down)}  # fmt: skip
    status = rec.status
    if (
        types != _INTS
        or type(duration) not in (float, int)
        or not math.isfinite(duration)
        or (status is not None and type(status) is not int)
    ):
        # default=str: a caller passing an ipaddress object instead of text must not cost the whole batch.
        return json.dumps(rec.to_dict(), separators=(",", ":"), default=str)
    texts = (rec.sandbox, rec.src_addr, rec.dst_addr, rec.orig_dst_addr, rec.hostname, rec.protocol, rec.verdict,
             rec.reason, rec.rule, rec.method, rec.revision, rec.learned_name)  # fmt: skip
    quoted = _QUOTED
    try:
        sandbox, src, dst, orig, hostname, protocol, verdict, reason, rule, method, revision, learned = [
            quoted[t] for t in texts
        ]
    except (KeyError, TypeError):
        sandbox, src, dst, orig, hostname, protocol, verdict, reason, rule, method, revision, learned = map(
            _quoted, texts
        )
    return _TEMPLATE % (
        rec.start_us,
        rec.end_us,
        sandbox,
        src,
        rec.src_port,
        dst,
        rec.dst_port,
        orig,
        rec.orig_dst_port,
        hostname,
        protocol,
        rec.bytes_up,
        rec.bytes_down,
        duration,
        verdict,
        reason,
        rule,
        method,
        "null" if rec.path is None else _quote(str(rec.path)),  # paths rarely recur: not worth the cache
        "null" if status is None else status,
        "null" if rec.message is None else _quote(str(rec.message)),
        "null" if rec.denial_id is None else _quote(str(rec.denial_id)),
        revision,
        learned,
    )


_SECOND: list[object] = [None, ""]  # the last whole second formatted, and its text


def _timestamp() -> str:
    """Now, as structlog's `TimeStamper(fmt="iso", utc=True)` writes it (the date and time formatted once a
    second)."""
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    if _SECOND[0] != second:
        _SECOND[:] = [second, datetime.datetime.fromtimestamp(second, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_SECOND[1]}.{micro:06d}Z"


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        name = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        name = ""
    if not BATCH_NAME_PATTERN.fullmatch(name):
        raise GatewayError("INVALID_CONTINUATION_TOKEN", "the continuation token is not one this API gave out",
                           "continuation_token")  # fmt: skip
    return name


def check_sandbox_id(sandbox_id: str) -> str:
    if not isinstance(sandbox_id, str) or not ID_PATTERN.fullmatch(sandbox_id):
        raise GatewayError("INVALID_ID", f"{sandbox_id!r} is not a sandbox id", "id")
    return sandbox_id


def check_batch_name(name: str) -> str:
    """Batch names are exactly `{16 digits}-{pid}.ndjson`: nothing else (no `..`, no `/`) reaches the disk."""
    if not isinstance(name, str) or not BATCH_NAME_PATTERN.fullmatch(name):
        raise GatewayError("INVALID_BATCH_NAME", f"{name!r} is not a batch name ({{ts_us}}-{{pid}}.ndjson)", "name")
    return name


class FlowLog:
    """The flow record sink: structured log, NDJSON batches per sandbox, optional Redis stream."""

    def __init__(
        self,
        config: AuditConfig,
        redis: redis.asyncio.Redis | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        forward: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.config = config
        self.dir = Path(config.dir)
        self.redis = redis if config.redis_stream else None
        self._owns_redis = False
        self.queue_size = queue_size
        self.pid = os.getpid()
        self._pending: list[tuple[FlowRecord, str]] = []  # with its rendered JSON
        #: Forwarding (a worker process): no batches, mirror, log or subscribers of its own.
        self.forward = forward
        self._turn_lines: list[str] = []  # rendered records waiting for the end of this event-loop turn
        self._turn_scheduled = False
        self._subscribers: set[Subscription] = set()
        self._denials: dict[str, FlowRecord] = {}  # by denial id, oldest first (insertion order), bounded
        self._mirror: deque[FlowRecord] = deque()
        self._last_ts: dict[str, int] = {}  # per sandbox: batch names strictly increase within this process
        self._task: asyncio.Task[None] | None = None
        self._mirror_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._drop_warned = False
        self._mirror_warned = False
        self.dropped = 0  # records not written to files because the queue was full
        self.mirror_dropped = 0  # records not mirrored (queue full or Redis failed)
        self.written = 0  # records written to batch files
        self.mirrored = 0
        self.write_errors = 0

    @classmethod
    def from_config(cls, audit: AuditConfig, redis_url: str) -> FlowLog:
        """The flow log `gateway run` uses: with the Redis mirror on its own client when `audit.redis_stream` is set
        (the configuration guarantees `store.redis_url` then); the flow log closes that client."""
        if not audit.redis_stream:
            return cls(audit)
        import redis.asyncio

        flows = cls(audit, redis.asyncio.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT))
        flows._owns_redis = True
        return flows

    # ------------------------------------------------------------------ the data plane's side

    def record(self, rec: FlowRecord, rendered: str | None = None) -> None:
        """Queue one record. Never blocks and never raises: the data plane must not wait on its audit trail.
        `rendered`: the record's `render` already made (a worker's, which the main process need not redo)."""
        try:
            line = render(rec) if rendered is None else rendered
            if self.forward is not None:
                self._at_turn_end(line)
                return
            if self.config.log_records:
                if self._turn_scheduled or json_line_stream() is not None:
                    self._at_turn_end(line)
                else:
                    log.info("flow", **rec.to_dict())
            for subscriber in self._subscribers:
                subscriber.offer(rec, line)
            if rec.denial_id is not None:
                denials = self._denials
                denials[rec.denial_id] = rec
                if len(denials) > DENIAL_INDEX_SIZE:
                    del denials[next(iter(denials))]
            if len(self._pending) >= self.queue_size:
                self.dropped += 1
                if not self._drop_warned:
                    self._drop_warned = True
                    log.warning("flowlog.queue_full", queue_size=self.queue_size, dropped_total=self.dropped,
                                message="flow records are being dropped: the audit writer cannot keep up")  # fmt: skip
            else:
                self._pending.append((rec, line))
            if self.redis is not None:
                if len(self._mirror) >= self.queue_size:
                    self._count_mirror_drop(1, "queue full")
                else:
                    self._mirror.append(rec)
        except Exception:  # a broken log sink must not break a connection
            with contextlib.suppress(Exception):
                self.dropped += 1

    def _at_turn_end(self, line: str) -> None:
        self._turn_lines.append(line)
        if self._turn_scheduled:
            return
        try:
            asyncio.get_running_loop().call_soon(self._end_turn)
            self._turn_scheduled = True
        except RuntimeError:  # no event loop (a script, a test): now
            self._end_turn()

    def _end_turn(self) -> None:
        """The lines queued during this turn of the event loop: forwarded, or written as `flow` log lines, at once."""
        self._turn_scheduled = False
        lines, self._turn_lines = self._turn_lines, []
        if not lines:
            return
        if self.forward is not None:
            try:
                self.forward(lines)
            except Exception:  # a broken pipe must not break a connection
                self.dropped += len(lines)
            return
        stream = json_line_stream()
        if stream is None:  # the logging configuration changed during this turn: through structlog, then
            for line in lines:
                log.info("flow", **json.loads(line))
            return
        tail = ',"event":"flow","level":"info","timestamp":"' + _timestamp() + '"}\n'
        try:
            stream.write("".join(line[:-1] + tail for line in lines))  # each line: the record's object, extended
            stream.flush()
        except Exception:  # a broken log sink must not break a connection
            pass

    # ------------------------------------------------------------------ live subscribers

    def subscribe(
        self, sandbox: str | None = None, verdict: str | None = None, visible: Callable[[str], bool] | None = None
    ) -> Subscription:
        """A live view of the records from now on (only those of sandboxes `visible` accepts, when given). Raises
        GatewayError TOO_MANY_SUBSCRIBERS (503) at the cap."""
        if len(self._subscribers) >= self.config.max_stream_subscribers:
            raise GatewayError("TOO_MANY_SUBSCRIBERS", f"{len(self._subscribers)} live flow views are served already "
                               "(audit.max_stream_subscribers)", status=503)  # fmt: skip
        subscription = Subscription(sandbox, verdict, visible=visible)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def stats(self) -> dict[str, int]:
        return {
            "pending": len(self._pending),
            "written": self.written,
            "dropped": self.dropped,
            "write_errors": self.write_errors,
            "mirrored": self.mirrored,
            "mirror_dropped": self.mirror_dropped,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="flowlog-writer")
        if self.redis is not None and self._mirror_task is None:
            self._mirror_task = asyncio.create_task(self._run_mirror(), name="flowlog-redis")

    async def close(self) -> None:
        """Stop the tasks, then write what is queued (and try the mirror once more, briefly)."""
        self._end_turn()
        for task in (self._task, self._mirror_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._mirror_task = None
        await self.flush()
        if self.redis is not None and self._mirror:
            await self._mirror_once(timeout=1.0)  # shutting down: do not hang on an unreachable Redis
        if self.redis is not None and self._owns_redis:
            await self.redis.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval)
            try:
                await self.flush()
            except Exception:  # keep writing later batches whatever happened to this one
                log.exception("flowlog.flush_failed")

    # ------------------------------------------------------------------ files

    async def flush(self) -> int:
        """Write every queued record to batch files now; returns how many were written."""
        async with self._flush_lock:
            self._drop_warned = False
            self._mirror_warned = False
            if not self._pending:
                return 0
            pending, self._pending = self._pending, []
            groups: dict[str, list[tuple[FlowRecord, str]]] = {}
            for entry in pending:
                groups.setdefault(entry[0].sandbox, []).append(entry)
            written = 0
            for sandbox, records in groups.items():
                for i in range(0, len(records), MAX_BATCH_RECORDS):
                    chunk = records[i : i + MAX_BATCH_RECORDS]
                    try:
                        await asyncio.to_thread(self._write_batch, sandbox, chunk)
                        written += len(chunk)
                    except Exception as exc:
                        self.write_errors += len(chunk)
                        log.error("flowlog.write_failed", sandbox=sandbox, records=len(chunk), error=str(exc))
            self.written += written
            return written

    def _write_batch(self, sandbox: str, records: list[tuple[FlowRecord, str]]) -> Path:
        if not ID_PATTERN.fullmatch(sandbox):
            raise GatewayError("INVALID_ID", f"{sandbox!r} is not a sandbox id; its records cannot be filed", "sandbox")
        directory = self.dir / sandbox
        directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        ts = max(records[0][0].end_us, self._last_ts.get(sandbox, -1) + 1, 0)
        body = ("\n".join([line for _, line in records]) + "\n").encode()
        temp = directory / f".tmp-{self.pid}-{ts}.ndjson"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away; the mode is part of the contract
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            while True:
                final = directory / f"{ts:0{TS_DIGITS}d}-{self.pid}.ndjson"
                try:
                    os.link(temp, final)  # atomic, and unlike rename never replaces an existing batch
                    break
                except FileExistsError:
                    ts += 1
        finally:
            os.unlink(temp)
        self._last_ts[sandbox] = ts
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    # ------------------------------------------------------------------ reading

    def list_batches(
        self, sandbox_id: str, since_us: int = 0, continuation_token: str | None = None, limit: int = 100
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Batches of one sandbox in chronological order: those whose first record is at or after `since_us`,
        after the batch the token names, at most `limit`. Returns (batches, next token or None when done).
        A sandbox with no batches gives an empty list. Raises GatewayError (400) for bad input."""
        check_sandbox_id(sandbox_id)
        if isinstance(since_us, bool) or not isinstance(since_us, int) or since_us < 0:
            raise GatewayError("INVALID_PARAMETER", "since_us must be a non-negative integer", "since_us")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise GatewayError("INVALID_PARAMETER", f"limit must be an integer in 1-{MAX_LIST_LIMIT}", "limit")
        after = _decode_token(continuation_token) if continuation_token else None
        directory = self.dir / sandbox_id
        names: list[tuple[str, int, int]] = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    match = BATCH_NAME_PATTERN.fullmatch(entry.name)
                    if match is None or not entry.is_file(follow_symlinks=False):
                        continue  # temp files and anything else in the directory are not batches
                    first = int(match.group(1))
                    if first < since_us or (after is not None and entry.name <= after):
                        continue
                    names.append((entry.name, first, entry.stat(follow_symlinks=False).st_size))
        except FileNotFoundError:
            return [], None
        names.sort()
        page = names[:limit]
        batches = [asdict(BatchInfo(name, size, first)) for name, first, size in page]
        token = _encode_token(page[-1][0]) if len(names) > limit else None
        return batches, token

    def batches_since(self, sandbox_id: str, since_us: int, until_us: int | None = None) -> Iterator[bytes]:
        """The NDJSON of the sandbox's batches that may hold records that ended at or after `since_us` (and, with
        `until_us`, were first written before it), oldest first: the batches first written from then on, and the
        one before them (written earlier, it may hold later records). Reads one batch at a time; the caller
        filters the records by time."""
        check_sandbox_id(sandbox_id)
        try:
            with os.scandir(self.dir / sandbox_id) as entries:
                names = sorted(
                    entry.name
                    for entry in entries
                    if BATCH_NAME_PATTERN.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                )
        except FileNotFoundError:
            return
        start = 0
        for index, name in enumerate(names):
            if int(name[:TS_DIGITS]) >= since_us:
                break
            start = index
        else:
            start = max(len(names) - 1, 0)
        for name in names[start:]:
            if until_us is not None and int(name[:TS_DIGITS]) > until_us:
                return
            try:
                body = self.read_batch(sandbox_id, name)
            except NotFound:  # removed since the listing (retention): nothing to replay in it
                continue
            yield body

    def denial(self, denial_id: str, visible: Callable[[str], bool] | None = None) -> FlowRecord:
        """The record of the denial with this id: from memory while it is recent, else from the batches written
        around its time (every sandbox's, or those `visible` accepts: the caller's scope). Raises GatewayError
        (400) for a malformed id, NotFound otherwise (also for a denial of a sandbox `visible` refuses)."""
        if not DENIAL_ID_PATTERN.fullmatch(denial_id):
            raise GatewayError("INVALID_PARAMETER", "a denial id is 8 hex digits, '-', 10 hex digits", "id")
        not_found = NotFound("DENIAL_NOT_FOUND", f"no denial {denial_id} in the flow records kept", "id")
        found = self._denials.get(denial_id)
        if found is not None:
            if visible is not None and not visible(found.sandbox):
                raise not_found
            return found
        at_us = int(denial_id[:8], 16) * 1_000_000
        window_us = DENIAL_SEARCH_SECONDS * 1_000_000
        needle = f'"denial_id":"{denial_id}"'.encode()
        try:
            sandboxes = [entry.name for entry in os.scandir(self.dir) if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            sandboxes = []
        for sandbox_id in sandboxes:
            if not ID_PATTERN.fullmatch(sandbox_id) or (visible is not None and not visible(sandbox_id)):
                continue
            for batch in self.batches_since(sandbox_id, at_us - window_us, until_us=at_us + window_us):
                if needle in batch:
                    for line in batch.splitlines():
                        if needle in line:
                            return decode_record(line)
        raise not_found

    def has_sandbox(self, sandbox_id: str) -> bool:
        """Whether batches were ever written for this sandbox (they outlive the sandbox's policy record)."""
        return bool(ID_PATTERN.fullmatch(sandbox_id)) and (self.dir / sandbox_id).is_dir()

    def read_batch(self, sandbox_id: str, name: str) -> bytes:
        """The batch's NDJSON bytes. Raises GatewayError 400 for a malformed name, NotFound (BATCH_NOT_FOUND)."""
        check_sandbox_id(sandbox_id)
        check_batch_name(name)
        path = self.dir / sandbox_id / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound("BATCH_NOT_FOUND", f"sandbox {sandbox_id} has no audit batch {name}", "name") from None
        except OSError as exc:  # e.g. ELOOP: a symlink planted in the directory is not followed
            raise NotFound("BATCH_NOT_FOUND", f"audit batch {name} cannot be read ({exc.strerror})", "name") from None
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    # ------------------------------------------------------------------ Redis mirror

    def _count_mirror_drop(self, count: int, why: str) -> None:
        self.mirror_dropped += count
        if not self._mirror_warned:
            self._mirror_warned = True
            log.warning("flowlog.mirror_dropped", stream=self.config.redis_stream, records=count, reason=why,
                        dropped_total=self.mirror_dropped)  # fmt: skip

    async def _run_mirror(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval)
            if self._mirror:
                await self._mirror_once()

    async def _mirror_once(self, timeout: float = REDIS_TIMEOUT) -> None:
        if self.redis is None:
            return
        batch = [self._mirror.popleft() for _ in range(min(len(self._mirror), MAX_BATCH_RECORDS))]
        if not batch:
            return
        stream, maxlen = self.config.redis_stream, self.config.redis_maxlen
        try:
            pipe = self.redis.pipeline(transaction=False)
            for rec in batch:
                # Flat string fields, so XRANGE readers need no JSON; a missing hostname is simply absent.
                entry = {k: str(v) for k, v in rec.to_dict().items() if v is not None}
                pipe.xadd(stream, entry, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
            await asyncio.wait_for(pipe.execute(), timeout)
            self.mirrored += len(batch)
        except asyncio.CancelledError:
            self._count_mirror_drop(len(batch), "cancelled")
            raise
        except Exception as exc:  # Redis down or slow: the files already have these records
            self._count_mirror_drop(len(batch), f"{type(exc).__name__}: {exc}")
