"""The Redis store against a real redis-server: other writers, bad data, crashes, restarts, gaps, two nodes.

"Another service" is plain redis-py following docs/redis-contract.md (HSET/HDEL and XADD
in one MULTI/EXEC), never the store's own code.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import Conflict, NotFound
from gateway.revisions import Revision
from gateway.settings import load_config
from gateway.stores.base import StoreUnavailable
from gateway.stores.config import StoreConfig
from gateway.stores.redis_store import RedisStore, safe_url, stream_gap, xread_entries
from tests.factory import wait_until_async

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

PREFIX = "gw:"
CONTEXT = load_config(environ={}).policy_context()
MakeStore = Callable[..., Awaitable[RedisStore]]


def store_config(url: str, *, node: str = "node-a", resync_interval: float = 3600.0) -> StoreConfig:
    # A long resync interval by default, so that only the mechanism under test can explain a result.
    return StoreConfig(
        backend="redis",
        path=Path("unused.json"),
        poll_interval=0.5,
        redis_url=url,
        redis_prefix=PREFIX,
        stream_maxlen=1000,
        resync_interval=resync_interval,
        node_id=node,
    )


def sandbox(
    sid: str, address: str, hosts: list[str] | None = None, *, profile: str = "allowlisted", template: str | None = None
) -> dict[str, Any]:
    record: dict[str, Any] = {"id": sid, "addresses": [address], "profile": profile}
    if hosts is not None:
        record["egress"] = {"allow_hosts": hosts}
    if template is not None:
        record["template"] = template
    return record


def template(name: str, hosts: list[str]) -> dict[str, Any]:
    return {"name": name, "description": "test", "egress": {"allow_hosts": hosts}}


async def external_write(client: Redis, kind: str, key: str, value: dict[str, Any] | str | None) -> None:
    """What another service does: change the hash and announce it, in one MULTI/EXEC."""
    hash_key = PREFIX + ("sandboxes" if kind == "sandbox" else "templates")
    async with client.pipeline(transaction=True) as pipe:
        if value is None:
            pipe.hdel(hash_key, key)
        else:
            pipe.hset(hash_key, key, value if isinstance(value, str) else json.dumps(value))
        op = "delete" if value is None else "put"
        pipe.xadd(PREFIX + "changes", {"kind": kind, "key": key, "op": op, "source": "test-writer"}, maxlen=10_000)
        await pipe.execute()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """`wait_until_async` for conditions that need Redis to be asked (what the store wrote back): that one
    takes only a plain predicate."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)


def allows(store: RedisStore, sandbox_id: str, host: str) -> bool | None:
    """The store's decision for a TLS connection to `host`; None when the sandbox is unknown."""
    try:
        verdict, _ = store.state.explain(sandbox_id, host, "203.0.113.7", 443, "tls")
    except NotFound:
        return None
    return verdict.allowed


def rejected(store: RedisStore) -> dict[str, str]:
    return {f"{r['kind']}:{r['key']}": r["code"] for r in store.status()["rejected"]}


async def published(client: Redis) -> dict[str, dict[str, Any]]:
    return {name: json.loads(raw) for name, raw in (await client.hgetall(PREFIX + "status:rejected")).items()}


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    connection = Redis.from_url(redis_server.url, decode_responses=True)
    yield connection
    await connection.aclose()


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[MakeStore]:
    stores: list[RedisStore] = []

    async def make(**options: Any) -> RedisStore:
        store = RedisStore(CONTEXT, store_config(redis_server.url, **options))
        await asyncio.wait_for(store.start(), 10)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


# --------------------------------------------------------------------------- following other writers


async def test_external_writes_apply_within_a_second(client: Redis, make_store: MakeStore) -> None:
    store = await make_store()
    assert store.ready.is_set()

    await external_write(client, "template", "base", template("base", ["pypi.org"]))
    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.1", template="base"))
    await external_write(client, "sandbox", "sb-2", {**sandbox("sb-2", "10.75.0.2", template="base")})
    await external_write(client, "sandbox", "sb-3", sandbox("sb-3", "10.75.0.3", ["api.example.com"]))
    assert await wait_until_async(
        lambda: (
            allows(store, "sb-1", "pypi.org")
            and allows(store, "sb-2", "pypi.org")
            and allows(store, "sb-3", "api.example.com")
        ),
        1.0,
    ), "external records applied"
    policy = store.state.policy_for_address("10.75.0.3")
    assert policy is not None and policy.sandbox_id == "sb-3"

    # A template change reaches every sandbox that inherits from it, and only those.
    await external_write(client, "template", "base", template("base", ["files.example.org"]))
    assert await wait_until_async(
        lambda: all(
            allows(store, s, "files.example.org") and not allows(store, s, "pypi.org") for s in ("sb-1", "sb-2")
        ),
        1.0,
    ), "template change applied to both sandboxes"
    assert allows(store, "sb-3", "files.example.org") is False

    await external_write(client, "sandbox", "sb-3", None)
    assert await wait_until_async(lambda: "sb-3" not in store.state.sandboxes, 1.0), "delete applied"
    assert store.state.policy_for_address("10.75.0.3") is None

    async def accepted_ids() -> bool:
        return set(await client.hkeys(PREFIX + "accepted:sandboxes")) == {"sb-1", "sb-2"}

    await eventually(accepted_ids, timeout=1.0, what="accepted copies written back")
    accepted = await client.hgetall(PREFIX + "accepted:sandboxes")
    assert json.loads(accepted["sb-1"])["template"] == "base"
    assert json.loads((await client.hgetall(PREFIX + "accepted:templates"))["base"])["egress"] == {
        "allow_hosts": ["files.example.org"]
    }
    assert store.status()["rejected"] == []
    assert store.status()["last_stream_id"] == (await client.xrevrange(PREFIX + "changes", count=1))[0][0]


INVALID_WRITES: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any] | str], str]] = {
    "bad hostname": (lambda r: {**r, "egress": {"allow_hosts": ["https://evil.example.com/x"]}}, "INVALID_HOSTNAME"),
    "changed profile": (lambda r: {**r, "profile": "unrestricted", "egress": {}}, "PROFILE_IMMUTABLE"),
    "unknown template": (lambda r: {**r, "template": "no-such-template"}, "TEMPLATE_NOT_FOUND"),
    "garbage JSON": (lambda r: '{"id": "sb-1", "addresses": [', "INVALID_JSON"),
    "unconfigured secret": (
        lambda r: {
            **r,
            "egress": {"inspect": [{"hosts": ["a.com"], "credentials": [{"header": "x", "secret": "gh"}]}]},
        },
        "UNKNOWN_SECRET",
    ),
    "secret value": (
        lambda r: {**r, "egress": {"inspect": [{"hosts": ["a.com"], "credentials": [{"header": "x", "value": "v"}]}]}},
        "SECRET_VALUE_IN_POLICY",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_WRITES))
async def test_invalid_external_write_is_rejected_and_last_good_stays(
    case: str, client: Redis, make_store: MakeStore
) -> None:
    store = await make_store()
    good = sandbox("sb-1", "10.75.0.1", ["api.example.com"])
    await external_write(client, "sandbox", "sb-1", good)
    assert await wait_until_async(lambda: allows(store, "sb-1", "api.example.com"), 1.0), "v1 applied"

    mutate, code = INVALID_WRITES[case]
    with structlog.testing.capture_logs() as logs:
        await external_write(client, "sandbox", "sb-1", mutate(good))
        assert await wait_until_async(lambda: rejected(store) == {"sandbox:sb-1": code}, 1.0), f"{code} rejection"
    assert allows(store, "sb-1", "api.example.com") is True, "the last good version must still decide"
    assert store.state.sandboxes["sb-1"].profile == "allowlisted"
    (entry,) = [e for e in logs if e["event"] == "store.policy_record_rejected"]
    assert entry["code"] == code and entry["key"] == "sb-1" and entry["message"]

    async def is_published() -> bool:
        return set(await published(client)) == {"sandbox:sb-1"}

    await eventually(is_published, timeout=1.0, what="rejection published")
    status = await published(client)
    assert status["sandbox:sb-1"]["code"] == code
    assert status["sandbox:sb-1"]["message"] and status["sandbox:sb-1"]["node"] == "node-a"
    accepted = json.loads(await client.hget(PREFIX + "accepted:sandboxes", "sb-1"))
    assert accepted["egress"] == {"allow_hosts": ["api.example.com"]}, "the accepted copy is still the last good one"

    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.1", ["v2.example.com"]))
    assert await wait_until_async(lambda: allows(store, "sb-1", "v2.example.com"), 1.0), "valid v2 applied"
    assert rejected(store) == {}
    assert allows(store, "sb-1", "api.example.com") is False

    async def cleared() -> bool:
        return await published(client) == {}

    await eventually(cleared, timeout=1.0, what="published rejection removed")


async def test_sandbox_waiting_for_its_template_applies_when_the_template_arrives(
    client: Redis, make_store: MakeStore
) -> None:
    store = await make_store()
    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.1", template="later"))
    assert await wait_until_async(lambda: rejected(store) == {"sandbox:sb-1": "TEMPLATE_NOT_FOUND"}, 1.0)
    assert "sb-1" not in store.state.sandboxes  # never accepted: nothing to fall back to, so it fails closed

    await external_write(client, "template", "later", template("later", ["pypi.org"]))
    assert await wait_until_async(lambda: allows(store, "sb-1", "pypi.org"), 1.0), "sandbox retried"
    assert rejected(store) == {}

    async def cleared() -> bool:
        return await published(client) == {}

    await eventually(cleared, timeout=1.0, what="published rejection removed")


async def test_one_transaction_moving_an_address_and_recreating_with_a_new_profile(
    client: Redis, make_store: MakeStore
) -> None:
    store = await make_store()
    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.1", ["one.example.com"]))
    await external_write(client, "sandbox", "sb-2", sandbox("sb-2", "10.75.0.2", ["two.example.com"]))
    assert await wait_until_async(lambda: len(store.state.sandboxes) == 2, 1.0)

    # sb-1 takes sb-2's address while sb-2 moves away, in one transaction: whatever order the
    # gateway applies them in, both must end up accepted.
    async with client.pipeline(transaction=True) as pipe:
        pipe.hset(PREFIX + "sandboxes", "sb-1", json.dumps(sandbox("sb-1", "10.75.0.2", ["one.example.com"])))
        pipe.hset(PREFIX + "sandboxes", "sb-2", json.dumps(sandbox("sb-2", "10.75.0.3", ["two.example.com"])))
        for sid in ("sb-1", "sb-2"):
            pipe.xadd(PREFIX + "changes", {"kind": "sandbox", "key": sid, "op": "put"})
        await pipe.execute()

    def moved() -> bool:
        one, three = store.state.policy_for_address("10.75.0.2"), store.state.policy_for_address("10.75.0.3")
        return one is not None and one.sandbox_id == "sb-1" and three is not None and three.sandbox_id == "sb-2"

    assert await wait_until_async(moved, 1.0), "address move"
    assert store.state.policy_for_address("10.75.0.1") is None
    assert rejected(store) == {}

    # Deleted and re-created under the same id with another profile: a new sandbox, not a profile change.
    # (One transaction, so the gateway reads both entries in one batch, after both happened.)
    async with client.pipeline(transaction=True) as pipe:
        pipe.hdel(PREFIX + "sandboxes", "sb-2")
        pipe.xadd(PREFIX + "changes", {"kind": "sandbox", "key": "sb-2", "op": "delete"})
        pipe.hset(PREFIX + "sandboxes", "sb-2", json.dumps(sandbox("sb-2", "10.75.0.3", profile="isolated")))
        pipe.xadd(PREFIX + "changes", {"kind": "sandbox", "key": "sb-2", "op": "put"})
        await pipe.execute()
    assert await wait_until_async(
        lambda: "sb-2" in store.state.sandboxes and store.state.sandboxes["sb-2"].profile == "isolated", 1.0
    ), "re-created sandbox"
    assert rejected(store) == {}


async def test_writer_that_forgot_xadd_is_picked_up_by_the_periodic_resync(
    client: Redis, make_store: MakeStore
) -> None:
    store = await make_store(resync_interval=1.0)
    await client.hset(PREFIX + "sandboxes", "sb-1", json.dumps(sandbox("sb-1", "10.75.0.1", ["api.example.com"])))
    assert await wait_until_async(lambda: allows(store, "sb-1", "api.example.com"), 3.0), "periodic resync"


# --------------------------------------------------------------------------- crashes and restarts


async def test_redis_killed_while_another_service_writes(
    redis_server: RedisServer, client: Redis, make_store: MakeStore
) -> None:
    store = await make_store()
    records, updates = 20, 200
    last_written: dict[str, int] = {}
    done = failures = 0
    under_way = asyncio.Event()  # the kill comes while the writer is busy, however fast it is

    def record(i: int) -> dict[str, Any]:
        sid = f"sb-{i % records}"
        return sandbox(sid, f"10.75.1.{i % records + 1}", [f"h{i}.example.com"])

    async def writer() -> None:
        nonlocal done, failures
        deadline = time.monotonic() + 30
        writer_client = Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=2)
        try:
            while done < updates:
                sid = f"sb-{done % records}"
                try:
                    await external_write(writer_client, "sandbox", sid, record(done))
                except (RedisConnectionError, RedisTimeoutError):  # also BusyLoadingError while the AOF loads
                    assert time.monotonic() < deadline, "writer could not finish"
                    failures += 1
                    await asyncio.sleep(0.02)
                    continue  # the same update again: it may or may not have been stored
                last_written[sid] = done
                done += 1
                if done == 60:
                    under_way.set()
        finally:
            await writer_client.aclose()

    task = asyncio.create_task(writer())
    try:
        await asyncio.wait_for(under_way.wait(), 10)
        redis_server.kill()  # at once: the writer's next write (or the one it has sent) meets a dead server

        # API writes during the outage answer 503 and change nothing.
        with pytest.raises(StoreUnavailable) as info:
            await store.create_sandbox(sandbox("sb-api", "10.75.2.1", ["api.example.com"]))
        assert info.value.code == "STORE_UNAVAILABLE" and info.value.status == 503
        with pytest.raises(StoreUnavailable):
            await store.replace_sandbox("sb-0", sandbox("sb-0", "10.75.1.1", ["hijack.example.com"]))
        with pytest.raises(StoreUnavailable):
            await store.delete_sandbox("sb-1")
        assert "sb-api" not in store.state.sandboxes
        assert store.state.sandboxes["sb-0"].egress.allow_hosts != ("hijack.example.com",)
        assert "sb-1" in store.state.sandboxes, "the last good policies stay in force while Redis is down"
        assert await wait_until_async(lambda: not store.status()["connected"], 2.0), "outage noticed"

        assert await wait_until_async(lambda: failures >= 1, 5.0), "the other service's writes failing too"
        redis_server.start()
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()

    assert done == updates
    expected = {sid: (f"h{i}.example.com",) for sid, i in last_written.items()}
    assert len(expected) == records

    def converged() -> bool:
        return {sid: sb.egress.allow_hosts for sid, sb in store.state.sandboxes.items()} == expected

    assert await wait_until_async(converged, 5.0), "final state of every record"
    assert await wait_until_async(lambda: store.status()["connected"], 2.0), "reconnected"
    assert rejected(store) == {}
    assert not await client.hexists(PREFIX + "sandboxes", "sb-api"), "a write refused with 503 must not appear"
    assert json.loads(await client.hget(PREFIX + "sandboxes", "sb-0"))["egress"]["allow_hosts"] != [
        "hijack.example.com"
    ]

    # And writes through the store work again.
    await store.create_sandbox(sandbox("sb-api", "10.75.2.1", ["api.example.com"]))
    assert await client.hexists(PREFIX + "sandboxes", "sb-api")


async def test_the_first_writes_after_a_redis_restart_succeed(redis_server: RedisServer, make_store: MakeStore) -> None:
    """Concurrent API writes leave several idle connections in the store's pool; after Redis restarts, none of
    them may fail a write once the store is connected again (they are to the old server)."""
    store = await make_store()
    await asyncio.gather(
        *(store.create_sandbox(sandbox(f"sb-{i}", f"10.75.3.{i + 1}", ["a.example.com"])) for i in range(8))
    )
    redis_server.kill()
    with pytest.raises(StoreUnavailable):
        await store.delete_sandbox("sb-0")
    assert await wait_until_async(lambda: not store.status()["connected"], 5.0), "outage noticed"
    redis_server.start()
    assert await wait_until_async(lambda: store.status()["connected"], 10.0), "reconnected"
    for i in range(8):  # one after another: each takes the most recently used idle connection
        await store.replace_sandbox(f"sb-{i}", sandbox(f"sb-{i}", f"10.75.3.{i + 1}", ["b.example.com"]))
    assert {sb.egress.allow_hosts for sb in store.state.sandboxes.values()} == {("b.example.com",)}


async def test_the_sync_lag_grows_while_redis_is_down_and_drops_once_the_store_has_caught_up(
    redis_server: RedisServer, client: Redis, make_store: MakeStore
) -> None:
    store = await make_store()
    # The follower's read blocks up to 1 s: each answer confirms the state held every change until then.
    assert await wait_until_async(lambda: store.sync_lag() < 1.5, 5.0), store.sync_lag()
    redis_server.kill()
    assert await wait_until_async(lambda: store.sync_lag() > 3.0, 10.0), "the lag grows while Redis is away"
    redis_server.start()
    await external_write(client, "sandbox", "sb-new", sandbox("sb-new", "10.75.0.20", ["new.example.com"]))
    assert await wait_until_async(lambda: "sb-new" in store.state.sandboxes, 10.0), "caught up"
    assert await wait_until_async(lambda: store.sync_lag() < 1.5, 5.0), store.sync_lag()


async def test_redis_back_without_its_data_is_followed_not_ignored(
    redis_server: RedisServer, client: Redis, make_store: MakeStore
) -> None:
    """Changes missed during an outage are found by a full resync after reconnecting, even
    when Redis lost everything (no persistence, failover to an empty replica): the gateway
    mirrors what Redis now holds, so the lost sandboxes fail closed."""
    store = await make_store()
    for i in range(1, 4):
        await store.create_sandbox(sandbox(f"sb-{i}", f"10.75.0.{i}", ["api.example.com"]))
    redis_server.kill()
    shutil.rmtree(redis_server.directory / "appendonlydir")
    redis_server.start()
    await client.hset(PREFIX + "sandboxes", "sb-9", json.dumps(sandbox("sb-9", "10.75.0.9", ["new.example.com"])))

    assert await wait_until_async(lambda: set(store.state.sandboxes) == {"sb-9"}, 5.0), "state of the emptied Redis"
    assert allows(store, "sb-1", "api.example.com") is None
    assert store.state.policy_for_address("10.75.0.1") is None
    assert store.ready.is_set()


async def test_gateway_restart_restores_state_and_falls_back_for_records_broken_meanwhile(
    client: Redis, make_store: MakeStore
) -> None:
    first = await make_store()
    await first.put_template("base", template("base", ["pypi.org"]), create=True)
    for i in range(1, 5):
        await first.create_sandbox(sandbox(f"sb-{i}", f"10.75.0.{i}", [f"v1-{i}.example.com"]))
    await first.create_sandbox(sandbox("sb-t", "10.75.0.20", template="base"))
    await external_write(client, "sandbox", "sb-5", sandbox("sb-5", "10.75.0.5", ["v1-5.example.com"]))
    assert await wait_until_async(lambda: "sb-5" in first.state.sandboxes, 1.0)
    await first.close()

    # While no gateway runs, other services change things, some of them badly.
    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.1", profile="unrestricted"))
    await external_write(client, "sandbox", "sb-2", "this is not JSON")
    await external_write(client, "sandbox", "sb-3", None)
    await external_write(client, "sandbox", "sb-4", sandbox("sb-4", "10.75.0.4", ["v2-4.example.com"]))
    await external_write(client, "sandbox", "sb-6", sandbox("sb-6", "10.75.0.6", ["v1-6.example.com"]))

    second = await make_store()
    assert set(second.state.sandboxes) == {"sb-1", "sb-2", "sb-4", "sb-5", "sb-6", "sb-t"}
    assert set(second.state.templates) == {"base"}
    assert second.state.sandboxes["sb-1"].profile == "allowlisted"
    assert allows(second, "sb-1", "v1-1.example.com") is True
    assert allows(second, "sb-2", "v1-2.example.com") is True
    assert allows(second, "sb-4", "v2-4.example.com") is True
    assert allows(second, "sb-5", "v1-5.example.com") is True
    assert allows(second, "sb-6", "v1-6.example.com") is True
    assert allows(second, "sb-t", "pypi.org") is True
    assert rejected(second) == {"sandbox:sb-1": "PROFILE_IMMUTABLE", "sandbox:sb-2": "INVALID_JSON"}
    assert {name: entry["code"] for name, entry in (await published(client)).items()} == {
        "sandbox:sb-1": "PROFILE_IMMUTABLE",
        "sandbox:sb-2": "INVALID_JSON",
    }
    accepted = await client.hgetall(PREFIX + "accepted:sandboxes")
    assert set(accepted) == {"sb-1", "sb-2", "sb-4", "sb-5", "sb-6", "sb-t"}
    assert json.loads(accepted["sb-1"])["profile"] == "allowlisted"
    assert json.loads(accepted["sb-4"])["egress"] == {"allow_hosts": ["v2-4.example.com"]}

    # It keeps following after the restart.
    await external_write(client, "sandbox", "sb-2", sandbox("sb-2", "10.75.0.2", ["v3-2.example.com"]))
    assert await wait_until_async(lambda: allows(second, "sb-2", "v3-2.example.com"), 1.0)
    assert rejected(second) == {"sandbox:sb-1": "PROFILE_IMMUTABLE"}


async def test_start_fails_clearly_when_redis_is_down(redis_server: RedisServer) -> None:
    redis_server.kill()
    store = RedisStore(CONTEXT, store_config(redis_server.url), start_timeout=0.5)
    with pytest.raises(StoreUnavailable) as info:
        await store.start()
    assert info.value.code == "STORE_UNAVAILABLE" and redis_server.url in info.value.message
    assert not store.ready.is_set()
    await store.close()


# --------------------------------------------------------------------------- gaps in the change stream


async def xinfo_calls(client: Redis) -> int:
    """How many XINFO STREAM the server answered so far (the store asks one at each gap check and snapshot)."""
    return int((await client.info("commandstats")).get("cmdstat_xinfo|stream", {"calls": 0})["calls"])


def gap_logged(logs: list[dict[str, Any]]) -> bool:
    return any(entry["event"] == "store.redis_stream_gap" for entry in logs)


@pytest.mark.parametrize("loss", ["trimmed", "deleted entry", "stream deleted"])
async def test_missed_notifications_while_following_are_recovered_by_a_resync(
    loss: str, client: Redis, make_store: MakeStore
) -> None:
    store = await make_store()
    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.1", ["v1.example.com"]))
    assert await wait_until_async(lambda: allows(store, "sb-1", "v1.example.com"), 1.0)

    # The notification disappears in the same transaction that wrote it, so the blocked
    # follower never reads it: only gap detection can notice (the periodic resync is an hour away).
    changes = PREFIX + "changes"
    with structlog.testing.capture_logs() as logs:
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(PREFIX + "sandboxes", "sb-1", json.dumps(sandbox("sb-1", "10.75.0.1", ["v2.example.com"])))
            pipe.hset(PREFIX + "sandboxes", "sb-2", json.dumps(sandbox("sb-2", "10.75.0.2", ["v1.example.com"])))
            entry_id = f"{int(time.time() * 1000) + 5000}-0"
            pipe.xadd(changes, {"kind": "sandbox", "key": "sb-1", "op": "put"}, id=entry_id)
            if loss == "trimmed":
                pipe.xtrim(changes, maxlen=0)
            elif loss == "deleted entry":
                pipe.xdel(changes, entry_id)
            else:
                pipe.delete(changes)
            await pipe.execute()
        assert await wait_until_async(
            lambda: allows(store, "sb-1", "v2.example.com") and allows(store, "sb-2", "v1.example.com"), 3.0
        ), "resync after the gap"
    assert gap_logged(logs)

    # Following continues from the right place afterwards.
    await external_write(client, "sandbox", "sb-3", sandbox("sb-3", "10.75.0.3", ["v1.example.com"]))
    assert await wait_until_async(lambda: allows(store, "sb-3", "v1.example.com"), 1.0), "following after the gap"


async def test_stream_trimmed_while_the_gateway_was_down(client: Redis, make_store: MakeStore) -> None:
    first = await make_store()
    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.1", ["v1.example.com"]))
    assert await wait_until_async(lambda: "sb-1" in first.state.sandboxes, 1.0)
    await first.close()

    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.1", ["v2.example.com"]))
    await external_write(client, "sandbox", "sb-2", sandbox("sb-2", "10.75.0.2", ["v1.example.com"]))
    await client.xtrim(PREFIX + "changes", maxlen=0)
    last_generated = (await client.xinfo_stream(PREFIX + "changes"))["last-generated-id"]

    with structlog.testing.capture_logs() as logs:
        second = await make_store()
        assert allows(second, "sb-1", "v2.example.com") and allows(second, "sb-2", "v1.example.com")
        assert second.status()["last_stream_id"] == last_generated
        await external_write(client, "sandbox", "sb-3", sandbox("sb-3", "10.75.0.3", ["v1.example.com"]))
        assert await wait_until_async(lambda: "sb-3" in second.state.sandboxes, 1.0)
        # Two more gap checks (XINFO STREAM, which nothing else asks now): the first one's verdict was logged
        # before the follower sent the second.
        checks = await xinfo_calls(client)

        async def checked_twice() -> bool:
            return await xinfo_calls(client) >= checks + 2

        await eventually(checked_twice, timeout=5.0, what="two gap checks")
    assert not gap_logged(logs), "an empty, trimmed stream is not a gap once the snapshot took its last id"


# --------------------------------------------------------------------------- several gateway nodes


async def test_two_nodes_creating_the_same_id_exactly_one_wins(make_store: MakeStore) -> None:
    a = await make_store(node="node-a")
    b = await make_store(node="node-b")
    for n in range(8):
        sid = f"race-{n}"
        results = await asyncio.gather(
            a.create_sandbox(sandbox(sid, f"10.75.3.{n + 1}", ["a.example.com"])),
            b.create_sandbox(sandbox(sid, f"10.75.3.{n + 1}", ["b.example.com"])),
            return_exceptions=True,
        )
        losers = [r for r in results if isinstance(r, BaseException)]
        winners = [r for r in results if not isinstance(r, BaseException)]
        assert len(winners) == 1 and len(losers) == 1, results
        assert isinstance(losers[0], Conflict) and losers[0].code == "SANDBOX_EXISTS"
        hosts = winners[0].egress.allow_hosts
        assert await wait_until_async(
            lambda sid=sid, hosts=hosts: all(
                sid in s.state.sandboxes and s.state.sandboxes[sid].egress.allow_hosts == hosts for s in (a, b)
            ),
            1.0,
        ), "both nodes agree on the winner"

    results = await asyncio.gather(
        a.put_template("shared", template("shared", ["a.example.com"]), create=True),
        b.put_template("shared", template("shared", ["b.example.com"]), create=True),
        return_exceptions=True,
    )
    codes = sorted(getattr(r, "code", "ok") for r in results)
    assert codes == ["TEMPLATE_EXISTS", "ok"]
    assert rejected(a) == {} and rejected(b) == {}


async def test_writes_through_one_node_reach_the_other_within_a_second(client: Redis, make_store: MakeStore) -> None:
    a = await make_store(node="node-a")
    b = await make_store(node="node-b")

    await a.put_template("base", template("base", ["pypi.org"]), create=True)
    await a.create_sandbox(sandbox("sb-1", "10.75.0.1", template="base"))
    assert await wait_until_async(lambda: allows(b, "sb-1", "pypi.org"), 1.0), "create on the other node"

    await a.replace_sandbox("sb-1", {**sandbox("sb-1", "10.75.0.1", ["api.example.com"]), "template": "base"})
    assert await wait_until_async(
        lambda: allows(b, "sb-1", "api.example.com") and not allows(b, "sb-1", "pypi.org"), 1.0
    ), "update on the other node"
    await b.put_template("base", template("base", ["files.example.org"]), create=False)
    assert await wait_until_async(lambda: "files.example.org" in a.state.templates["base"].egress.allow_hosts, 1.0)

    await b.delete_sandbox("sb-1")
    assert await wait_until_async(lambda: "sb-1" not in a.state.sandboxes, 1.0), "delete on the other node"
    await a.delete_template("base")
    assert await wait_until_async(lambda: "base" not in b.state.templates, 1.0), "template delete on the other node"

    # Each node also saw the echo of its own writes; applying them again must not have caused anything.
    last = (await client.xinfo_stream(PREFIX + "changes"))["last-generated-id"]
    assert await wait_until_async(lambda: a.status()["last_stream_id"] == last == b.status()["last_stream_id"], 2.0), (
        "both nodes past every echo"
    )
    assert rejected(a) == {} and rejected(b) == {}
    assert await published(client) == {}
    assert await client.hgetall(PREFIX + "accepted:sandboxes") == {}
    assert await client.hgetall(PREFIX + "accepted:templates") == {}
    entries = await client.xrange(PREFIX + "changes")
    assert [(e["kind"], e["op"], e["source"]) for _id, e in entries][:2] == [
        ("template", "put", "node-a"),
        ("sandbox", "put", "node-a"),
    ]


# --------------------------------------------------------------------------- the protocol logic alone (no Redis)


def info(last: str, length: int, added: int, first: str | None = None, max_deleted: str = "0-0") -> dict[str, Any]:
    return {
        "last-generated-id": last.encode(),
        "length": length,
        "entries-added": added,
        "max-deleted-entry-id": max_deleted.encode(),
        "first-entry": (first.encode(), {}) if first else None,
    }


@pytest.mark.parametrize(
    ("xinfo", "position", "entries_read", "gap"),
    [
        (None, (0, 0), 0, None),  # no stream yet, nothing read
        (None, (5, 0), 3, "stream deleted"),
        (info("9-0", 3, 3, "7-0"), (8, 0), 2, None),  # one unread entry, all there
        (info("9-0", 1, 3, "9-0"), (8, 0), 2, None),  # head trimmed, but only entries we had read
        (info("9-0", 1, 3, "9-0"), (7, 0), 1, "stream trimmed past our position"),
        (info("9-0", 0, 3), (9, 0), 3, None),  # emptied after we read everything
        (info("9-0", 0, 3), (8, 0), 2, "stream trimmed past our position"),
        (info("9-0", 2, 3, "7-0", max_deleted="9-0"), (8, 0), 2, "entries after our position were deleted"),
        (info("4-0", 1, 1, "4-0"), (8, 0), 2, "stream recreated (ids went backwards)"),
        (info("9-0", 1, 1, "9-0"), (8, 0), 5, "stream recreated (fewer entries than we read)"),
    ],
)
def test_stream_gap_rules(
    xinfo: dict[str, Any] | None, position: tuple[int, int], entries_read: int, gap: str | None
) -> None:
    assert stream_gap(xinfo, position, entries_read) == gap


def test_xread_replies_of_both_protocols_give_the_same_entries() -> None:
    entry = (b"1-0", {b"kind": b"sandbox", b"key": b"a"})
    assert xread_entries([[b"gw:changes", [entry, entry]]]) == [entry, entry]  # RESP2
    assert xread_entries({b"gw:changes": [[entry, entry]]}) == [entry, entry]  # RESP3
    assert xread_entries({b"gw:changes": [[]]}) == []
    assert xread_entries(None) == [] and xread_entries([]) == []


def test_passwords_stay_out_of_messages() -> None:
    assert safe_url("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert safe_url("redis://gw:s3cret@redis/1") == "redis://gw:***@redis/1"
    assert safe_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# --------------------------------------------------------------------------- the shared revision history


async def test_the_revision_history_is_shared_between_nodes_and_outlives_them(
    make_store: MakeStore, client: Redis
) -> None:
    a = await make_store(node="node-a")
    b = await make_store(node="node-b")
    await a.create_sandbox(sandbox("sb-1", "10.75.0.10", ["a.example"]))
    first = a.state.compiled["sb-1"].revision
    await a.replace_sandbox("sb-1", sandbox("sb-1", "10.75.0.10", ["b.example"]))
    second = a.state.compiled["sb-1"].revision
    await wait_until_async(lambda: allows(b, "sb-1", "b.example"))

    async def listed(store: RedisStore) -> list[tuple[str, str]]:
        return [(e.revision, e.source) for e in await store.revisions("sb-1")]

    assert await listed(a) == await listed(b) == [(second, "api"), (first, "api")]  # node b's offers were no news

    # Another service's write is a revision of source redis, offered by both nodes and listed once.
    await external_write(client, "sandbox", "sb-1", sandbox("sb-1", "10.75.0.10", ["c.example"]))
    await wait_until_async(lambda: allows(a, "sb-1", "c.example") and allows(b, "sb-1", "c.example"))
    third = a.state.compiled["sb-1"].revision
    assert third == b.state.compiled["sb-1"].revision
    await eventually(lambda: _has(listed(b), third), 5, "the service's revision in the history")
    assert await listed(a) == [(third, "redis"), (second, "api"), (first, "api")]
    assert len(await client.lrange(PREFIX + "revisions:sb-1", 0, -1)) == 3

    # Restoring on node b, from the shared history, goes through the write path; node a follows.
    restored = await b.restore_sandbox("sb-1", first)
    assert restored.revision == first
    await wait_until_async(lambda: allows(a, "sb-1", "a.example"))
    assert [r for r, _ in await listed(a)] == [first, third, second]

    # A new node (or a restarted one) reads the same history; a deletion takes it away.
    c = await make_store(node="node-c")
    assert [r for r, _ in await listed(c)] == [first, third, second]
    await a.delete_sandbox("sb-1")
    assert await client.exists(PREFIX + "revisions:sb-1") == 0


async def _has(listing: Awaitable[list[tuple[str, str]]], revision: str) -> bool:
    return any(r == revision for r, _ in await listing)


async def test_a_node_that_lags_offers_nothing_stale(make_store: MakeStore, client: Redis) -> None:
    a = await make_store(node="node-a")
    await a.create_sandbox(sandbox("sb-1", "10.75.0.10", ["a.example"]))
    first = a.state.compiled["sb-1"].revision
    # The live record changes behind node a's back (no change entry: a does not follow it until a resync). A
    # revision a offers now is not of the live record, so it is not pushed over what is in force.
    await client.hset(PREFIX + "sandboxes", "sb-1", json.dumps(sandbox("sb-1", "10.75.0.10", ["z.example"])))
    a.state.history.add(
        "sb-1", Revision("r0000000000ff", time.time(), "api", a.state.sandboxes["sb-1"].to_dict(), None)
    )
    await a._flush_revisions()
    assert [json.loads(e)["revision"] for e in await client.lrange(PREFIX + "revisions:sb-1", 0, -1)] == [first]
    # A garbage entry another writer left in the list costs that entry only.
    await client.rpush(PREFIX + "revisions:sb-1", "not json")
    assert [e.revision for e in await a.revisions("sb-1")] == [first]
