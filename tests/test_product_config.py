"""Configuration options and service routes through `gateway run`: the config file named by GATEWAY_CONFIG,
GATEWAY_<SECTION>__<KEY> overrides (a TOML list of tokens among them, one by token_sha256), [limits] defaults
in the effective policy, `--event-loop asyncio`, /healthz, the audit:read scope, dns-log without the data plane,
and `[store] backend = auto` choosing Redis when redis_url is set."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import redis

from tests.factory import ADMIN_TOKEN, Server, start_server
from tests.product import ProductApi
from tests.redis_server import RedisServer

HASHED_TOKEN = "hashed-admin-token-0123456789"
AUDIT_TOKEN = "auditor-token-0123456789"
TOKENS = (
    f'[{{name="platform", token_sha256="{hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()}", scopes=["admin"]}}, '
    f'{{name="audit", token="{AUDIT_TOKEN}", scopes=["audit:read"]}}]'
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    instance = start_server(
        tmp_path_factory.mktemp("product-config"),
        "--event-loop",
        "asyncio",
        config_in_env=True,
        GATEWAY_API__TOKENS=TOKENS,
        GATEWAY_LIMITS__BANDWIDTH_MBIT="42",
        GATEWAY_LIMITS__BURST_MBIT="420",
    )
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def api(server: Server) -> ProductApi:
    client = ProductApi(server.url, HASHED_TOKEN)
    client.check_served_document()
    return client


def test_the_environment_replaces_the_files_tokens_and_a_hashed_token_authenticates(api: ProductApi) -> None:
    status = api.call("GET", "/v1/status", expect=200).body
    assert (status["backend"], status["auth"]) == ("embedded", "tokens")
    # the file's plain admin token is gone: GATEWAY_API__TOKENS replaced the whole list
    assert api.call("GET", "/v1/status", token=ADMIN_TOKEN, expect=401).code == "UNAUTHENTICATED"
    assert api.call("GET", "/v1/status", token=None, expect=401).code == "UNAUTHENTICATED"
    assert api.call("GET", "/v1/status", token=HASHED_TOKEN.upper(), expect=401).code == "UNAUTHENTICATED"


def test_limits_defaults_come_from_the_config_and_a_record_overrides_them(api: ProductApi) -> None:
    api.call("POST", "/v1/sandboxes", {"id": "lim", "addresses": ["10.75.5.1"]}, expect=201)
    limits = api.call("GET", "/v1/sandboxes/lim/policy", expect=200).body["limits"]
    assert limits == {
        "connections_per_minute": 1000,
        "bandwidth_mbit": 42,
        "burst_mbit": 420,
        "dns_queries_per_minute": 500,
    }
    api.call("PATCH", "/v1/sandboxes/lim", {"limits": {"bandwidth_mbit": 5}}, expect=200)
    assert api.call("GET", "/v1/sandboxes/lim/policy", expect=200).body["limits"]["bandwidth_mbit"] == 5
    api.call("DELETE", "/v1/sandboxes/lim", expect=204)


def test_health_needs_no_token(api: ProductApi) -> None:
    assert api.call("GET", "/healthz", token=None, expect=200).body == {"status": "ok"}
    assert api.call("GET", "/readyz", token=None, expect=200).body is not None


def test_audit_read_reads_flow_records_and_nothing_else(api: ProductApi) -> None:
    api.call("POST", "/v1/sandboxes", {"id": "aud", "addresses": ["10.75.5.2"]}, expect=201)
    auditor = ProductApi(api.url, AUDIT_TOKEN)
    try:
        assert auditor.call("GET", "/v1/sandboxes", expect=403).code == "INSUFFICIENT_SCOPE"
        assert auditor.call("GET", "/v1/sandboxes/aud", expect=403).code == "INSUFFICIENT_SCOPE"
        assert auditor.call("DELETE", "/v1/sandboxes/aud", expect=403).code == "INSUFFICIENT_SCOPE"
        batches = auditor.call("GET", "/v1/sandboxes/aud/audit-batches?limit=10")
        assert (batches.status, batches.body["batches"]) == (200, []), batches.body
        # without --data-plane there is no DNS interceptor, so no query log: 503, for any token
        assert auditor.call("GET", "/v1/sandboxes/aud/dns-log", expect=503).code == "DNS_DISABLED"
        assert api.call("GET", "/v1/sandboxes/aud/dns-log?limit=5", expect=503).code == "DNS_DISABLED"
    finally:
        api.call("DELETE", "/v1/sandboxes/aud", expect=204)


def test_backend_auto_with_a_redis_url_is_the_redis_store(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> None:
    instance = start_server(
        tmp_path_factory.mktemp("product-auto"),
        GATEWAY_STORE__BACKEND="auto",
        GATEWAY_STORE__REDIS_URL=redis_server.url,
    )
    try:
        api = ProductApi(instance.url)
        assert api.call("GET", "/v1/status", expect=200).body["backend"] == "redis"
        api.call("POST", "/v1/sandboxes", {"id": "auto", "addresses": ["10.75.5.3"]}, expect=201)
        assert redis.Redis.from_url(redis_server.url).hexists("gw:sandboxes", "auto")
    finally:
        instance.stop()
