"""The flow log on a real filesystem and a real redis-server: batches, names, pagination, the mirror."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog
from redis.asyncio import Redis

from gateway.audit_config import AuditConfig
from gateway.errors import GatewayError
from gateway.flowlog import BATCH_NAME_PATTERN, SUBSCRIBER_BUFFER, FlowLog, FlowRecord, render
from gateway.logs import configure_logging, json_line_stream
from gateway.settings import load_config
from tests.factory import flow_record, wait_until_async

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

T0 = 1_700_000_000_000_000  # µs since the epoch


def flow(sandbox: str = "sb-1", end_us: int = T0, **changes: object) -> FlowRecord:
    fields = {"hostname": "example.com", "rule": "allow_hosts example.com", "src_addr": "10.75.0.10",
              "bytes_up": 517, "bytes_down": 4096, "reason": "allowed by policy", **changes}  # fmt: skip
    return flow_record(sandbox=sandbox, end_us=end_us, **fields)


def audit(
    tmp_path: Path,
    *,
    stream: str = "",
    maxlen: int = 100_000,
    interval: float = 3600.0,
    log_records: bool = False,
    subscribers: int = 16,
) -> AuditConfig:
    # A long flush interval by default: the tests flush explicitly, so only the mechanism under test writes.
    return AuditConfig(dir=tmp_path / "audit", flush_interval=interval, redis_stream=stream, redis_maxlen=maxlen,
                       log_records=log_records, max_stream_subscribers=subscribers)  # fmt: skip


@pytest.fixture
async def flows(tmp_path: Path) -> AsyncIterator[FlowLog]:
    instance = FlowLog(audit(tmp_path))
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
async def logging_flows(tmp_path: Path) -> AsyncIterator[FlowLog]:
    """A flow log with `audit.log_records` on."""
    instance = FlowLog(audit(tmp_path, log_records=True))
    await instance.start()
    yield instance
    await instance.close()


def read_ndjson(data: bytes) -> list[dict[str, object]]:
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


# --------------------------------------------------------------------------- the record


def test_record_fields_are_metadata_only() -> None:
    names = [f.name for f in fields(FlowRecord)]
    assert names == [
        "start_us", "end_us", "sandbox", "src_addr", "src_port", "dst_addr", "dst_port", "orig_dst_addr",
        "orig_dst_port", "hostname", "protocol", "bytes_up", "bytes_down", "duration_ms", "verdict", "reason", "rule",
        "method", "path", "status", "message", "denial_id", "revision", "learned_name",
    ]  # fmt: skip
    rec = flow()
    assert list(rec.to_dict()) == names
    assert json.loads(json.dumps(rec.to_dict())) == rec.to_dict()
    with pytest.raises(AttributeError):
        rec.payload = b"secret"  # type: ignore[attr-defined]  # slots: nothing outside the fields attaches
    with pytest.raises(TypeError):
        FlowRecord(**rec.to_dict(), payload=b"secret")  # type: ignore[call-arg]


async def test_records_are_not_log_lines_by_default(flows: FlowLog) -> None:
    with structlog.testing.capture_logs() as logs:
        flows.record(flow(verdict="deny"))
    assert [entry for entry in logs if entry["event"] == "flow"] == [] and flows.pending == 1


async def test_with_log_records_each_record_is_also_a_structured_log_line(logging_flows: FlowLog) -> None:
    flows = logging_flows
    with structlog.testing.capture_logs() as logs:
        flows.record(flow(verdict="deny", reason="host not in allowlist", rule="default:deny"))
    [line] = [entry for entry in logs if entry["event"] == "flow"]
    assert line["verdict"] == "deny" and line["sandbox"] == "sb-1" and line["hostname"] == "example.com"
    assert {k: v for k, v in line.items() if k not in ("event", "log_level")} == flow(
        verdict="deny", reason="host not in allowlist", rule="default:deny"
    ).to_dict()


# --------------------------------------------------------------------------- batches


async def test_batches_are_written_per_sandbox_with_seed_names(flows: FlowLog, tmp_path: Path) -> None:
    flows.record(flow("sb-1", T0 + 10))
    flows.record(flow("sb-2", T0 + 20, hostname=None, protocol="tcp"))
    flows.record(flow("sb-1", T0 + 30, bytes_up=1))
    assert await flows.flush() == 3
    pid = os.getpid()

    one, token = flows.list_batches("sb-1")
    assert token is None
    assert [b["name"] for b in one] == [f"{T0 + 10:016d}-{pid}.ndjson"]
    assert one[0]["first_ts_us"] == T0 + 10
    path = tmp_path / "audit" / "sb-1" / one[0]["name"]
    assert one[0]["size"] == path.stat().st_size
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    records = read_ndjson(flows.read_batch("sb-1", one[0]["name"]))
    assert records == [flow("sb-1", T0 + 10).to_dict(), flow("sb-1", T0 + 30, bytes_up=1).to_dict()]
    assert all(set(r) == {f.name for f in fields(FlowRecord)} for r in records)  # no payload, nothing extra

    [two], _ = flows.list_batches("sb-2")
    assert read_ndjson(flows.read_batch("sb-2", two["name"])) == [
        flow("sb-2", T0 + 20, hostname=None, protocol="tcp").to_dict()
    ]
    assert await flows.flush() == 0  # nothing queued: no empty batch
    assert len(flows.list_batches("sb-1")[0]) == 1


async def test_the_background_task_flushes_every_interval(tmp_path: Path) -> None:
    flows = FlowLog(audit(tmp_path, interval=0.05))
    await flows.start()
    try:
        flows.record(flow())
        assert await wait_until_async(lambda: flows.list_batches("sb-1")[0])  # written with no flush() call
        assert len(flows.list_batches("sb-1")[0]) == 1
    finally:
        await flows.close()


async def test_close_flushes_what_is_queued(tmp_path: Path) -> None:
    flows = FlowLog(audit(tmp_path))
    await flows.start()
    flows.record(flow())
    await flows.close()
    assert len(FlowLog(audit(tmp_path)).list_batches("sb-1")[0]) == 1


async def test_names_are_zero_padded_unique_and_chronological(flows: FlowLog, tmp_path: Path) -> None:
    # Two batches whose first records share a time, and one whose time has fewer digits: the names still
    # differ, none is overwritten, and lexical order is write order.
    for end_us in (T0, T0, 999):
        flows.record(flow(end_us=end_us))
        await flows.flush()
    batches, _ = flows.list_batches("sb-1")
    names = [b["name"] for b in batches]
    assert len(set(names)) == 3
    assert all(BATCH_NAME_PATTERN.fullmatch(n) and len(n.split("-")[0]) == 16 for n in names)
    assert names == sorted(names)
    assert [b["first_ts_us"] for b in batches] == [T0, T0 + 1, T0 + 2]

    # A batch left by an earlier process with the same pid (every container's pid 1) is not overwritten.
    fresh = FlowLog(audit(tmp_path))
    fresh.record(flow(end_us=T0, bytes_up=7))
    await fresh.flush()
    names_after = [b["name"] for b in fresh.list_batches("sb-1")[0]]
    assert names_after[:3] == names and len(names_after) == 4
    assert read_ndjson(fresh.read_batch("sb-1", names[0]))[0]["bytes_up"] == 517


async def test_pagination_with_since_us_and_continuation_tokens(flows: FlowLog) -> None:
    for i in range(7):
        flows.record(flow(end_us=T0 + i * 1000))
        await flows.flush()

    seen: list[int] = []
    token: str | None = None
    pages = 0
    while True:
        page, token = flows.list_batches("sb-1", continuation_token=token, limit=3)
        pages += 1
        seen += [b["first_ts_us"] for b in page]
        if token is None:
            break
    assert pages == 3
    assert seen == [T0 + i * 1000 for i in range(7)]

    since, token = flows.list_batches("sb-1", since_us=T0 + 2500, limit=2)
    assert [b["first_ts_us"] for b in since] == [T0 + 3000, T0 + 4000]
    rest, end = flows.list_batches("sb-1", since_us=T0 + 2500, continuation_token=token, limit=10)
    assert [b["first_ts_us"] for b in rest] == [T0 + 5000, T0 + 6000]
    assert end is None
    exact, _ = flows.list_batches("sb-1", since_us=T0 + 6000)
    assert [b["first_ts_us"] for b in exact] == [T0 + 6000]  # since_us is inclusive
    assert flows.list_batches("sb-1", since_us=T0 + 6001) == ([], None)
    assert flows.list_batches("never-seen") == ([], None)


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({"since_us": -1}, "INVALID_PARAMETER", "since_us"),
        ({"limit": 0}, "INVALID_PARAMETER", "limit"),
        ({"limit": 1001}, "INVALID_PARAMETER", "limit"),
        ({"continuation_token": "not base64 !"}, "INVALID_CONTINUATION_TOKEN", "continuation_token"),
        ({"continuation_token": "Li4vLi4vZXRjL3Bhc3N3ZA"}, "INVALID_CONTINUATION_TOKEN", "continuation_token"),
    ],
)
def test_bad_listing_parameters_are_refused(tmp_path: Path, kwargs: dict[str, object], code: str, field: str) -> None:
    with pytest.raises(GatewayError) as caught:
        FlowLog(audit(tmp_path)).list_batches("sb-1", **kwargs)  # type: ignore[arg-type]
    assert (caught.value.status, caught.value.code, caught.value.field) == (400, code, field)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "..",
        "1700000000000000-1.ndjson/../x",
        "/etc/passwd",
        "1700000000000000-1.ndjson\n",
        ".tmp-1-1700000000000000.ndjson",
        "1700000000000000-1.json",
        "170000000000000-1.ndjson",  # 15 digits
    ],
)
async def test_traversal_and_malformed_names_are_refused(flows: FlowLog, tmp_path: Path, name: str) -> None:
    secret = tmp_path / "audit" / "secret.ndjson"
    secret.write_text("not yours\n")
    with pytest.raises(GatewayError) as caught:
        flows.read_batch("sb-1", name)
    assert (caught.value.status, caught.value.code) == (400, "INVALID_BATCH_NAME")
    with pytest.raises(GatewayError) as bad_id:
        flows.read_batch("..", "1700000000000000-1.ndjson")
    assert bad_id.value.code == "INVALID_ID"


async def test_unknown_batch_and_planted_symlink_are_not_found(flows: FlowLog, tmp_path: Path) -> None:
    flows.record(flow())
    await flows.flush()
    with pytest.raises(GatewayError) as caught:
        flows.read_batch("sb-1", "1111111111111111-1.ndjson")
    assert (caught.value.status, caught.value.code) == (404, "BATCH_NOT_FOUND")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    (tmp_path / "audit" / "sb-1" / "2222222222222222-1.ndjson").symlink_to(outside)
    with pytest.raises(GatewayError) as link:
        flows.read_batch("sb-1", "2222222222222222-1.ndjson")
    assert link.value.code == "BATCH_NOT_FOUND"
    assert [b["name"] for b in flows.list_batches("sb-1")[0]] == [f"{T0:016d}-{os.getpid()}.ndjson"]


async def test_no_partial_file_is_ever_listed(flows: FlowLog, tmp_path: Path) -> None:
    """A reader listing while batches are written sees only complete batches, and never a temp file."""
    directory = tmp_path / "audit" / "sb-1"
    stop = False
    bad: list[str] = []
    complete = 0
    reading = threading.Event()

    def reader() -> int:
        checked = 0
        while not stop:
            for batch in flows.list_batches("sb-1", limit=1000)[0]:
                data = flows.read_batch("sb-1", batch["name"])
                if len(data) != batch["size"] or not data.endswith(b"\n") or data.count(b"\n") != 200:
                    bad.append(batch["name"])
                checked += 1
            reading.set()
        return checked

    task = asyncio.create_task(asyncio.to_thread(reader))
    assert await wait_until_async(reading.is_set)  # the writer starts while the reader lists
    for i in range(12):
        for j in range(200):
            flows.record(flow(end_us=T0 + i * 1000 + j, hostname=f"h{j}.example.com"))
        await flows.flush()
        complete += 1
    stop = True
    checked = await task
    assert bad == []
    assert checked > 0, "the reader never ran alongside the writer"
    assert len(flows.list_batches("sb-1", limit=1000)[0]) == complete
    assert not [p.name for p in directory.iterdir() if not BATCH_NAME_PATTERN.fullmatch(p.name)]  # no temp left


async def test_a_full_queue_drops_and_counts_and_never_raises(tmp_path: Path) -> None:
    flows = FlowLog(audit(tmp_path, log_records=True), queue_size=10)
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        for i in range(25):
            flows.record(flow(end_us=T0 + i))
        assert time.monotonic() - started < 1.0
    assert (flows.pending, flows.dropped) == (10, 15)
    warnings = [entry for entry in logs if entry["event"] == "flowlog.queue_full"]
    assert len(warnings) == 1  # once per interval, not once per record
    assert len([entry for entry in logs if entry["event"] == "flow"]) == 25  # the log line is still written
    assert await flows.flush() == 10
    with structlog.testing.capture_logs() as logs:
        for i in range(11):
            flows.record(flow(end_us=T0 + 100 + i))
    assert flows.dropped == 16
    assert len([e for e in logs if e["event"] == "flowlog.queue_full"]) == 1  # a new interval warns again
    assert flows.stats()["dropped"] == 16


async def test_a_record_for_an_invalid_sandbox_id_is_not_filed_but_others_are(flows: FlowLog, tmp_path: Path) -> None:
    flows.record(flow("../escape"))
    flows.record(flow("sb-1"))
    with structlog.testing.capture_logs() as logs:
        assert await flows.flush() == 1
    assert any(e["event"] == "flowlog.write_failed" for e in logs)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "audit" / "..").joinpath("escape").exists()
    assert flows.write_errors == 1


async def test_an_address_object_instead_of_text_is_written_as_text(flows: FlowLog) -> None:
    flows.record(flow(src_addr=ipaddress.ip_address("10.75.0.10")))  # type: ignore[arg-type]
    assert await flows.flush() == 1
    [batch] = flows.list_batches("sb-1")[0]
    assert read_ndjson(flows.read_batch("sb-1", batch["name"]))[0]["src_addr"] == "10.75.0.10"


# --------------------------------------------------------------------------- the Redis mirror


async def test_redis_mirror_writes_every_record_with_a_length_cap(tmp_path: Path, redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        flows = FlowLog(audit(tmp_path, stream="gw:flows", maxlen=100, interval=0.05), client)
        await flows.start()
        try:
            flows.record(flow(hostname=None, protocol="tcp"))
            assert await wait_until_async(lambda: flows.mirrored)
            [(_, entry)] = await client.xrange("gw:flows")
            expected = flow(hostname=None, protocol="tcp").to_dict()
            assert entry == {k: str(v) for k, v in expected.items() if v is not None}
            assert "hostname" not in entry

            for i in range(1000):
                flows.record(flow(end_us=T0 + i))
        finally:
            await flows.close()
        assert flows.mirrored == 1001
        length = await client.xlen("gw:flows")
        # MAXLEN ~ trims whole stream nodes (100 entries each by default): near the cap, never the full 1001.
        assert 100 <= length <= 200
        last = (await client.xrevrange("gw:flows", count=1))[0][1]
        assert last["end_us"] == str(T0 + 999)
        assert sum(len(read_ndjson(flows.read_batch("sb-1", b["name"]))) for b in flows.list_batches("sb-1")[0]) == 1001
    finally:
        await client.aclose()


async def test_redis_down_neither_blocks_nor_loses_file_batches(tmp_path: Path, redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    redis_server.kill()
    try:
        flows = FlowLog(audit(tmp_path, stream="gw:flows", interval=0.05), client)
        await flows.start()
        try:
            with structlog.testing.capture_logs() as logs:
                started = time.monotonic()
                for i in range(50):
                    flows.record(flow(end_us=T0 + i))
                assert time.monotonic() - started < 0.5
                assert await wait_until_async(lambda: flows.mirror_dropped == 50 and flows.written == 50)
        finally:
            await flows.close()
        assert (flows.written, flows.mirrored, flows.mirror_dropped) == (50, 0, 50)
        assert any(e["event"] == "flowlog.mirror_dropped" for e in logs)
        [batch] = flows.list_batches("sb-1")[0]
        assert len(read_ndjson(flows.read_batch("sb-1", batch["name"]))) == 50
    finally:
        await client.aclose()


async def test_without_a_stream_name_redis_is_not_used(tmp_path: Path, redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        flows = FlowLog(audit(tmp_path), client)
        await flows.start()
        flows.record(flow())
        await flows.close()
        assert flows.mirrored == 0 and await client.dbsize() == 0
        assert flows.written == 1
    finally:
        await client.aclose()


async def test_gateway_run_wiring_mirrors_to_the_store_redis_when_a_stream_is_configured(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    environ = {
        "GATEWAY_STORE__REDIS_URL": redis_server.url,
        "GATEWAY_AUDIT__DIR": str(tmp_path / "audit"),
        "GATEWAY_AUDIT__FLUSH_INTERVAL": "0.05",
        "GATEWAY_AUDIT__REDIS_STREAM": "gw:flows:wired",
    }
    config = load_config(None, environ)
    flows = FlowLog.from_config(config.audit, config.store.redis_url)
    assert flows.redis is not None
    await flows.start()
    flows.record(flow())
    await flows.close()  # mirrors what is queued, then closes the client it made
    assert flows.mirrored == 1
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        [(_, entry)] = await client.xrange("gw:flows:wired")
        assert entry["hostname"] == "example.com" and entry["verdict"] == "allow"
    finally:
        await client.aclose()
    config = load_config(None, {"GATEWAY_AUDIT__DIR": str(tmp_path)})
    assert FlowLog.from_config(config.audit, config.store.redis_url).redis is None


def test_a_stream_without_a_redis_url_is_a_configuration_error() -> None:
    with pytest.raises(GatewayError) as caught:
        load_config(None, {"GATEWAY_AUDIT__REDIS_STREAM": "gw:flows"})
    assert caught.value.code == "CONFIG_INVALID" and caught.value.field == "audit.redis_stream"


# --------------------------------------------------------------------------- rendering and fast log lines


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"hostname": None},
        {"hostname": 'q"uo\\te\u00e9\u2028.example'},
        {"src_addr": ipaddress.ip_address("10.75.0.10")},
        {"duration_ms": 3},
        {"duration_ms": float("nan")},
        {"bytes_up": True},
        {"bytes_down": 1.5},
        {"protocol": "https", "method": "GET", "path": '/a"b\u00e9', "status": 200},
        {"method": "POST", "path": "/", "status": True},
    ],
)
def test_render_says_what_json_dumps_says(changes: dict[str, object]) -> None:
    rec = flow(**changes)
    expected = json.dumps(rec.to_dict(), separators=(",", ":"), default=str)
    assert render(rec) == expected


async def test_with_json_logging_the_lines_of_one_loop_turn_are_written_together(
    logging_flows: FlowLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    flows = logging_flows
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    saved = structlog.get_config()
    configure_logging("json", "info")
    try:
        assert json_line_stream() is stream
        flows.record(flow())
        flows.record(flow(hostname=None))
        assert stream.getvalue() == ""  # at the end of this turn of the loop, in one write
        await asyncio.sleep(0)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["event"] for line in lines] == ["flow", "flow"]
        assert all(line["level"] == "info" and line["timestamp"].endswith("Z") for line in lines)
        assert {k: v for k, v in lines[1].items() if k not in ("event", "level", "timestamp")} == flow(
            hostname=None
        ).to_dict()
        with structlog.testing.capture_logs() as logs:  # another configuration: structlog again, at once
            assert json_line_stream() is None
            flows.record(flow())
        assert [entry["event"] for entry in logs] == ["flow"]
        configure_logging("json", "warning")
        assert json_line_stream() is None  # info lines are not wanted at all
    finally:
        structlog.configure(**saved)


# --------------------------------------------------------------------------- live subscribers


async def test_a_subscriber_gets_its_sandbox_and_verdict_only(flows: FlowLog) -> None:
    denials = flows.subscribe("sb-1", "deny")
    everything = flows.subscribe()
    flows.record(flow(verdict="deny", rule="default:deny"))
    flows.record(flow(verdict="allow"))
    flows.record(flow(sandbox="sb-2", verdict="deny"))
    [line] = await denials.next(1.0)
    assert json.loads(line) == flow(verdict="deny", rule="default:deny").to_dict()
    assert len(await everything.next(1.0)) == 3
    assert await denials.next(0.01) == []  # nothing new: waits, then nothing
    flows.unsubscribe(denials)
    flows.record(flow(verdict="deny"))
    assert list(denials.lines) == []


async def test_a_subscriber_that_does_not_read_loses_its_oldest_lines_counted(flows: FlowLog) -> None:
    slow = flows.subscribe()
    for i in range(SUBSCRIBER_BUFFER + 250):
        flows.record(flow(end_us=T0 + i))
    lines = await slow.next(1.0)
    assert len(lines) == SUBSCRIBER_BUFFER and slow.lagged == 250
    assert json.loads(lines[0])["end_us"] == T0 + 250  # the newest kept
    assert flows.pending == SUBSCRIBER_BUFFER + 250  # the batches lose nothing


async def test_subscribers_are_capped(tmp_path: Path) -> None:
    flows = FlowLog(audit(tmp_path, subscribers=2))
    first = flows.subscribe()
    flows.subscribe()
    with pytest.raises(GatewayError) as raised:
        flows.subscribe()
    assert (raised.value.code, raised.value.status) == ("TOO_MANY_SUBSCRIBERS", 503)
    flows.unsubscribe(first)
    flows.subscribe()


async def test_a_forwarding_flow_log_hands_over_one_loop_turn_at_once_and_keeps_nothing(tmp_path: Path) -> None:
    turns: list[list[str]] = []
    flows = FlowLog(audit(tmp_path), forward=turns.append)
    flows.record(flow(end_us=T0))
    flows.record(flow(end_us=T0 + 1))
    assert turns == []
    await asyncio.sleep(0)
    assert [[json.loads(line)["end_us"] for line in turn] for turn in turns] == [[T0, T0 + 1]]
    flows.record(flow(end_us=T0 + 2))
    await flows.close()  # what is queued at shutdown is handed over, not lost
    assert len(turns) == 2 and flows.pending == 0
    assert not (tmp_path / "audit" / "sb-1").exists()
