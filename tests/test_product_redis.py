"""The Redis contract through `gateway run`: two nodes on one redis-server. Creating one id on both at once
gives one 201 and one 409; a record a plain redis-py writer commits (MULTI HSET + XADD) reaches the API of
both; an invalid one is rejected by both and the last good version stays, also across a restart of a node
(gw:accepted)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.factory import Server, free_port, gateway, start_server, wait_until, write_config
from tests.netns import log_events
from tests.product import ProductApi
from tests.redis_server import RedisServer


def start_node(directory: Path, redis_url: str, node: str) -> Server:
    return start_server(
        directory, GATEWAY_STORE__BACKEND="auto", GATEWAY_STORE__REDIS_URL=redis_url, GATEWAY_STORE__NODE_ID=node
    )


@pytest.fixture
def nodes(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[Server]]:
    started = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        started.append(start_node(tmp_path / name, redis_server.url, name))
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def write(client: redis.Redis, key: str, record: dict[str, Any] | str) -> None:
    """Exactly as the README's writer: the hash and the change notification in one MULTI/EXEC."""
    with client.pipeline(transaction=True) as pipe:
        pipe.hset("gw:sandboxes", key, record if isinstance(record, str) else json.dumps(record))
        pipe.xadd(
            "gw:changes", {"kind": "sandbox", "key": key, "op": "put", "source": "billing-service"}, maxlen=100000
        )
        pipe.execute()


def rejection(api: ProductApi, key: str) -> dict[str, Any] | None:
    rejected = api.call("GET", "/v1/status", expect=200).body["rejected"]
    return next((r for r in rejected if (r["kind"], r["key"]) == ("sandbox", key)), None)


def test_two_nodes_creating_one_id_at_once_give_one_201_and_one_409(nodes: list[Server]) -> None:
    apis = [ProductApi(server.url) for server in nodes]
    apis[0].check_served_document()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for n in range(8):
            record = {"id": f"race-{n}", "addresses": [f"10.75.6.{n + 1}"]}
            answers = list(pool.map(lambda api, record=record: api.call("POST", "/v1/sandboxes", record), apis))
            assert sorted(a.status for a in answers) == [201, 409], [a.body for a in answers]
            assert next(a for a in answers if a.status == 409).code == "SANDBOX_EXISTS"
    for api in apis:
        assert wait_until(lambda api=api: len(api.call("GET", "/v1/sandboxes").body["sandboxes"]) == 8, 10), (
            "both see 8"
        )


def test_a_plain_redis_writer_reaches_both_nodes_and_a_bad_write_keeps_the_last_good_version_across_a_restart(
    nodes: list[Server], redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    apis = [ProductApi(server.url) for server in nodes]
    good = {
        "id": "billed",
        "addresses": ["10.75.6.40"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["api.example.com"]},
    }
    write(client, "billed", good)
    for api in apis:
        assert wait_until(lambda api=api: api.call("GET", "/v1/sandboxes/billed").status == 200, 10), (
            f"{api.url} has it"
        )
        assert api.call("GET", "/v1/sandboxes/billed/explain?host=api.example.com", expect=200).body["allowed"]
    stored = apis[0].call("GET", "/v1/sandboxes/billed", expect=200).body

    for bad, code in (
        ({**good, "egress": {"allow_hosts": ["https://api.example.com"]}}, "INVALID_HOSTNAME"),
        ({**good, "egress": {"allow_hosts": ["api.example.com"], "enforcement": "report-only"}}, "INVALID_ENFORCEMENT"),
        ("{not json", "INVALID_JSON"),
    ):
        write(client, "billed", bad)
        for api in apis:
            seen = wait_until(
                lambda api=api, code=code: (r := rejection(api, "billed")) and r["code"] == code and r, 10
            )
            assert seen and seen["code"] == code, f"{api.url} rejects it with {code}: {seen}"
            assert api.call("GET", "/v1/sandboxes/billed", expect=200).body == stored
        assert "sandbox:billed" in client.hgetall("gw:status:rejected")

    # A restart: the hash still holds the broken record; the node's last good copy comes from gw:accepted.
    accepted = client.hget("gw:accepted:sandboxes", "billed")
    assert isinstance(accepted, str) and json.loads(accepted)["egress"]["allow_hosts"] == ["api.example.com"]
    nodes[0].stop()
    nodes[0] = start_node(nodes[0].config.parent, redis_server.url, "a")
    restarted = ProductApi(nodes[0].url)
    assert restarted.call("GET", "/v1/sandboxes/billed", expect=200).body == stored
    assert restarted.call("GET", "/v1/sandboxes/billed/explain?host=api.example.com", expect=200).body["allowed"]
    assert wait_until(lambda: rejection(restarted, "billed"), 10), "the restarted node shows the rejection"

    fixed = {**good, "egress": {"allow_hosts": ["next.example.com"]}}
    write(client, "billed", fixed)
    for api in (restarted, apis[1]):
        assert wait_until(
            lambda api=api: api.call("GET", "/v1/sandboxes/billed/explain?host=next.example.com").body["allowed"], 10
        ), f"{api.url} applies the fix"
        assert wait_until(lambda api=api: rejection(api, "billed") is None, 10), f"{api.url} clears the rejection"


def test_run_with_redis_down_refuses_to_start_and_says_where(tmp_path: Path) -> None:
    # Nothing listens there: the gateway must not serve (and decide) without its policies.
    url = f"redis://127.0.0.1:{free_port()}/0"
    config = write_config(tmp_path, free_port())
    result = gateway("run", "--config", str(config), GATEWAY_STORE__BACKEND="auto", GATEWAY_STORE__REDIS_URL=url)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the JSON log lines of its retries
    assert last.startswith("STORE_UNAVAILABLE: ") and url in last, result.stderr
    assert "Traceback" not in result.stderr


def sync_lag(api: ProductApi) -> float:
    """`gateway_store_sync_lag_seconds` from the node's GET /metrics."""
    body = api.call("GET", "/metrics", expect=200).body
    assert isinstance(body, str)
    [lag] = [f for f in text_string_to_metric_families(body) if f.name == "gateway_store_sync_lag_seconds"]
    return float(lag.samples[0].value)


def test_readyz_is_503_and_the_sync_lag_grows_while_redis_is_down_and_both_recover_once_it_is_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    node = start_node(tmp_path, redis_server.url, "a")
    try:
        api = ProductApi(node.url)
        assert api.call("GET", "/readyz", expect=200)
        assert wait_until(lambda: sync_lag(api) < 1.5, 5), sync_lag(api)  # its follower's read blocks up to 1 s
        redis_server.kill()
        lost = wait_until(lambda: api.call("GET", "/readyz").status == 503, 10)
        assert lost, api.call("GET", "/readyz").body
        assert api.call("GET", "/readyz").code == "STORE_NOT_SYNCED"
        assert wait_until(lambda: sync_lag(api) > 6, 10), sync_lag(api)  # past readiness's 5 s: still growing
        redis_server.start()
        assert wait_until(lambda: api.call("GET", "/readyz").status == 200, 15)
        assert wait_until(lambda: sync_lag(api) < 1.5, 5), sync_lag(api)
    finally:
        node.stop()


def test_a_preset_changed_by_sighup_is_in_force_on_both_nodes_for_a_sandbox_stored_in_redis(
    nodes: list[Server],
) -> None:
    apis = [ProductApi(server.url) for server in nodes]

    def reload(hosts: str) -> None:
        for server in nodes:
            before = len(log_events(server.stderr, "policies.recompiled"))
            text = server.config.read_text().split("[presets.team]")[0]
            server.config.write_text(f"{text}[presets.team]\nhosts = {hosts}\n")
            server.process.send_signal(signal.SIGHUP)
            assert wait_until(lambda s=server, n=before: len(log_events(s.stderr, "policies.recompiled")) > n, 10)

    def allowed(api: ProductApi, host: str) -> bool:
        answer = api.call("GET", f"/v1/sandboxes/team-1/explain?host={host}&port=443", expect=200).body
        return bool(answer["allowed"])

    reload('["a.team.example"]')  # added live: a record may name it now
    record = {"id": "team-1", "addresses": ["10.75.6.50"], "profile": "allowlisted", "egress": {"presets": ["team"]}}
    apis[0].call("POST", "/v1/sandboxes", record, expect=201)
    for api in apis:
        assert wait_until(lambda api=api: api.call("GET", "/v1/sandboxes/team-1").status == 200, 10)
        assert allowed(api, "a.team.example") and not allowed(api, "b.team.example")
    reload('["b.team.example"]')
    for api in apis:
        assert allowed(api, "b.team.example") and not allowed(api, "a.team.example")
