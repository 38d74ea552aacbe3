"""The control API over a real embedded store: routes, errors, auth, and the OpenAPI document's truth.

Every answer in these tests goes through `Api.call`, which also checks it against the
OpenAPI document: the status must be documented for that operation and the body must
validate against the documented schema. So the document cannot drift from the API
without a test failing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from dnslib import RCODE, DNSRecord
from openapi_spec_validator import validate as validate_spec
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import (
    MAX_BODY_BYTES,
    PUBLIC,
    REPLAY_LOCK_KEY,
    SANDBOX_EXAMPLES,
    SANDBOX_PATCH_EXAMPLES,
    TEMPLATE_EXAMPLES,
    TUNNEL_EXAMPLES,
    RouteSpec,
    apply_merge_patch,
    create_app,
    parse_explain_query,
    route_specs,
)
from gateway.dns.server import DnsInterceptor
from gateway.errors import GatewayError
from gateway.flowlog import FIELD_NAMES, FlowLog, FlowRecord, new_denial_id, now_us
from gateway.metrics import registry_for, render
from gateway.policy import parse_sandbox, parse_template
from gateway.revisions import revision_id
from gateway.service import DataPlane, snapshot
from gateway.settings import Config, load_config
from gateway.stores.config import StoreConfig
from gateway.stores.embedded import EmbeddedStore
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.model import parse_request
from gateway.tunnel.store import FileTunnelStore, TunnelStore
from tests.factory import DOC, Answer, check_documented, schema_validator, wait_until_async

AiohttpClient = Callable[[web.Application], Awaitable[TestClient]]

TOKENS: dict[str, tuple[str, list[str]]] = {
    "admin": ("admin-secret-0123456789", ["admin"]),
    "reader": ("reader-secret-0123456789", ["sandboxes:read", "templates:read"]),
    "writer": (
        "writer-secret-0123456789",
        ["sandboxes:read", "sandboxes:write", "templates:read", "network:allowlisted"],
    ),
    "isolated-only": ("isolated-secret-0123456789", ["sandboxes:read", "sandboxes:write"]),
    "templater": ("templater-secret-0123456789", ["templates:read", "templates:write"]),
    "auditor": ("auditor-secret-0123456789", ["audit:read"]),
    "tunnel-viewer": ("tunnel-viewer-secret-0123456789", ["tunnels:read"]),
    "scraper": ("scraper-secret-0123456789", ["metrics:read"]),
    "tenant": (
        "tenant-secret-0123456789",
        [
            "sandboxes:read",
            "sandboxes:write",
            "network:allowlisted",
            "templates:read",
            "audit:read",
            "tunnels:read",
            "tunnels:write",
        ],
    ),
}
#: The tokens limited to some sandboxes (`sandboxes` in their [[api.tokens]] entry).
TOKEN_SANDBOXES: dict[str, list[str]] = {"tenant": ["tenant-a-*", "ci-42"]}

ALLOWLISTED = {
    "id": "agent-1",
    "addresses": ["10.75.0.10"],
    "profile": "allowlisted",
    "egress": {"allow_hosts": ["api.github.com", "*.example.com"]},
    "labels": {"team": "research"},
}


def write_config(tmp_path: Path, *, tokens: bool = True, host: str = "127.0.0.1") -> Config:
    lines = [
        "[store]",
        'backend = "embedded"',
        f'path = "{tmp_path / "policies.json"}"',
        "[api]",
        f'host = "{host}"',
        "port = 8470",
    ]
    if tokens:
        entries = ", ".join(
            f'{{ name = "{name}", token = "{secret}", scopes = {json.dumps(scopes)}'
            + (f", sandboxes = {json.dumps(TOKEN_SANDBOXES[name])}" if name in TOKEN_SANDBOXES else "")
            + " }"
            for name, (secret, scopes) in TOKENS.items()
        )
        lines.append(f"tokens = [{entries}]")
    lines += ["[presets.internal]", 'hosts = ["*.corp.example"]', "ports = [443]"]
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, environ={})


def api_section(config: Config) -> dict[str, Any]:
    """What create_app takes from the configuration: the [api] section."""
    return {"host": config.api.host, "port": config.api.port, "tokens": config.api.tokens}


# --------------------------------------------------------------------------- answers checked against the document


class Api:
    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "admin",
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        expect: int | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {TOKENS[token][0]}")
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        response = await self.client.request(method, path, data=data, headers=sent)
        text = await response.text()
        # JSON answers are parsed; anything else (an NDJSON audit batch) is kept as text.
        parsed = json.loads(text) if text and response.content_type == "application/json" else (text or None)
        answer = Answer(response.status, parsed, dict(response.headers))
        check_documented(method, path.split("?", 1)[0], answer)
        if expect is not None:
            assert answer.status == expect, f"{method} {path}: {answer.status} {text}"
        return answer


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return write_config(tmp_path)


#: The secret names the API's policy context knows (the [inspection] config would hold their values).
SECRETS = frozenset({"github"})


@pytest.fixture
async def store(config: Config) -> AsyncIterator[EmbeddedStore]:
    context = dataclasses.replace(config.policy_context(), secrets=SECRETS)
    instance = EmbeddedStore(context, msgspec.structs.replace(config.store, poll_interval=0.05))
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
async def api(aiohttp_client: AiohttpClient, store: EmbeddedStore, config: Config) -> Api:
    return Api(await aiohttp_client(create_app(store, **api_section(config))))


# --------------------------------------------------------------------------- service routes


async def test_health_and_readiness_need_no_token(api: Api) -> None:
    assert (await api.call("GET", "/healthz", token=None, expect=200)).body == {"status": "ok"}
    assert (await api.call("GET", "/readyz", token=None, expect=200)).body == {"ready": True, "backend": "embedded"}


async def test_metrics_need_metrics_read_and_count_what_the_store_holds(
    aiohttp_client: AiohttpClient, store: EmbeddedStore, config: Config, tmp_path: Path
) -> None:
    flows = FlowLog(msgspec.structs.replace(config.audit, dir=tmp_path / "audit"))
    metrics = functools.partial(render, registry_for(lambda: snapshot(store, flows, None, None)))
    api = Api(await aiohttp_client(create_app(store, **api_section(config), metrics=metrics)))
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    assert (await api.call("GET", "/metrics", token=None, expect=401)).code == "UNAUTHENTICATED"
    assert (await api.call("GET", "/metrics", token="reader", expect=403)).code == "INSUFFICIENT_SCOPE"
    answer = await api.call("GET", "/metrics", token="scraper", expect=200)
    assert answer.headers["Content-Type"].startswith("text/plain")
    samples = {s.name: s.value for f in text_string_to_metric_families(answer.body) for s in f.samples}
    assert samples["gateway_sandboxes"] == 1 and samples["gateway_store_ready"] == 1
    assert samples["gateway_flow_records_dropped_total"] == 0
    assert not any(name.startswith("gateway_egress") for name in samples)  # no data plane, no data-plane families


async def test_readyz_is_503_until_the_store_has_loaded(aiohttp_client: AiohttpClient, config: Config) -> None:
    store = EmbeddedStore(config.policy_context(), msgspec.structs.replace(config.store, poll_interval=0.05))
    api = Api(await aiohttp_client(create_app(store, **api_section(config))))
    answer = await api.call("GET", "/readyz", token=None, expect=503)
    assert answer.code == "STORE_NOT_READY"
    await store.start()
    try:
        await api.call("GET", "/readyz", token=None, expect=200)
    finally:
        await store.close()


async def test_readyz_is_503_until_the_data_plane_serves(
    aiohttp_client: AiohttpClient, config: Config, tmp_path: Path
) -> None:
    # A real data plane, built as `gateway run --data-plane --steer` builds it, before it has started: the API
    # serves already, but nothing of the plane does yet.
    store = EmbeddedStore(config.policy_context(), msgspec.structs.replace(config.store, poll_interval=0.05))
    plane = DataPlane(config, store, FlowLog(msgspec.structs.replace(config.audit, dir=tmp_path / "audit")), steer=True)
    app = create_app(store, **api_section(config), dns=plane.dns, unready=plane.unready, data_plane_status=plane.status)
    api = Api(await aiohttp_client(app))
    await store.start()
    try:
        # /v1/status carries the steering's status, checked against the document like every answer
        steering = (await api.call("GET", "/v1/status", expect=200)).body["data_plane"]
        assert steering == {
            "steering": True,
            "steering_applied": False,
            "unattached_dropped": 0,
            "unattached_recent": [],
        }
        answer = await api.call("GET", "/readyz", token=None, expect=503)
        assert answer.code == "DATA_PLANE_NOT_READY"
        assert answer.body["message"] == (
            f"the egress engine does not listen on port {config.egress.listen_port} yet; "
            f"the DNS interceptor does not listen on port {config.egress.dns_port} yet; "
            "the steering table has not been applied yet"
        )
    finally:
        await store.close()


async def test_status_counts_and_shows_records_rejected_from_the_file(api: Api, store: EmbeddedStore) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    status = (await api.call("GET", "/v1/status", expect=200)).body
    assert status["backend"] == "embedded" and status["ready"] is True and status["auth"] == "tokens"
    assert (status["sandboxes"], status["templates"], status["rejected"]) == (1, 0, [])

    # Someone edits the file by hand and breaks one record: the API shows why, the last good version stays.
    data = json.loads(store.path.read_text())
    data["sandboxes"]["agent-1"]["egress"]["allow_hosts"] = ["https://bad.example.com"]
    edited = store.path.with_name("edited.json")
    edited.write_text(json.dumps(data))
    edited.replace(store.path)  # atomic, so the watcher never reads half a file
    assert await wait_until_async(store.rejections)  # the watcher has read the edit
    [rejection] = (await api.call("GET", "/v1/status", expect=200)).body["rejected"]
    assert (rejection["kind"], rejection["key"], rejection["code"]) == ("sandbox", "agent-1", "INVALID_HOSTNAME")
    explain = await api.call("GET", "/v1/sandboxes/agent-1/explain?host=api.github.com", expect=200)
    assert explain.body["allowed"] is True


async def test_presets_lists_built_in_and_configured_presets_for_any_token(api: Api) -> None:
    presets = {
        p["name"]: p for p in (await api.call("GET", "/v1/presets", token="templater", expect=200)).body["presets"]
    }
    assert {"package-registries", "git-hosts", "ai-apis", "internal"} <= set(presets)
    assert presets["internal"] == {"name": "internal", "description": "", "hosts": ["*.corp.example"], "ports": [443]}
    assert (await api.call("GET", "/v1/presets", token=None, expect=401)).code == "UNAUTHENTICATED"


# --------------------------------------------------------------------------- sandboxes: CRUD


async def test_sandbox_crud_round_trip(api: Api, store: EmbeddedStore) -> None:
    created = await api.call("POST", "/v1/sandboxes", ALLOWLISTED, token="writer", expect=201)
    assert created.headers["Location"] == "/v1/sandboxes/agent-1"
    assert created.body["egress"] == {"allow_hosts": ["api.github.com", "*.example.com"]}
    assert (await api.call("GET", "/v1/sandboxes/agent-1", token="reader", expect=200)).body == created.body
    stored = json.loads(store.path.read_text())["sandboxes"]["agent-1"]
    assert stored == {k: v for k, v in created.body.items() if k != "revision"}  # the revision is not stored
    assert created.body["revision"] == created.headers["X-Gateway-Revision"] == revision_id(stored, None)

    listed = await api.call("GET", "/v1/sandboxes", token="reader", expect=200)
    assert [s["id"] for s in listed.body["sandboxes"]] == ["agent-1"]

    replacement = {"addresses": ["10.75.0.11"], "profile": "allowlisted", "egress": {"allow_hosts": ["pypi.org"]}}
    replaced = await api.call("PUT", "/v1/sandboxes/agent-1", replacement, token="writer", expect=200)
    assert replaced.body["addresses"] == ["10.75.0.11"]
    assert replaced.body["labels"] == {}  # PUT is a full replace: what the body leaves out is gone
    assert store.state.policy_for_address("10.75.0.10") is None  # the old address no longer maps to it

    await api.call("DELETE", "/v1/sandboxes/agent-1", token="writer", expect=204)
    assert (await api.call("GET", "/v1/sandboxes/agent-1", expect=404)).code == "SANDBOX_NOT_FOUND"
    assert (await api.call("DELETE", "/v1/sandboxes/agent-1", expect=404)).code == "SANDBOX_NOT_FOUND"
    assert json.loads(store.path.read_text())["sandboxes"] == {}


async def test_list_filters_by_profile_and_template(api: Api) -> None:
    await api.call("POST", "/v1/templates", {"name": "base", "egress": {"presets": ["ai-apis"]}}, expect=201)
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    await api.call("POST", "/v1/sandboxes", {"id": "plain", "addresses": ["10.75.0.20"]}, expect=201)
    await api.call(
        "POST",
        "/v1/sandboxes",
        {"id": "reg", "addresses": ["10.75.0.21"], "profile": "registry", "template": "base"},
        expect=201,
    )

    async def ids(query: str) -> list[str]:
        return [s["id"] for s in (await api.call("GET", f"/v1/sandboxes{query}", expect=200)).body["sandboxes"]]

    assert await ids("") == ["agent-1", "plain", "reg"]
    assert await ids("?profile=isolated") == ["plain"]
    assert await ids("?template=base") == ["reg"]
    assert await ids("?profile=allowlisted&template=base") == []
    bad = await api.call("GET", "/v1/sandboxes?profile=wide-open", expect=400)
    assert (bad.code, bad.body["field"]) == ("INVALID_PROFILE", "profile")
    typo = await api.call("GET", "/v1/sandboxes?profle=isolated", expect=400)
    assert (typo.code, typo.body["field"]) == ("UNKNOWN_PARAMETER", "profle")


async def test_create_conflicts(api: Api) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    assert (await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=409)).code == "SANDBOX_EXISTS"
    other = {"id": "other", "addresses": ["10.75.0.10"]}
    taken = await api.call("POST", "/v1/sandboxes", other, expect=409)
    assert (taken.code, taken.body["field"]) == ("ADDRESS_IN_USE", "addresses[0]")
    missing = await api.call("POST", "/v1/sandboxes", {**other, "addresses": ["10.75.0.99"], "template": "nope"})
    assert (missing.status, missing.code) == (400, "TEMPLATE_NOT_FOUND")


async def test_put_on_a_missing_sandbox_is_404_and_creates_nothing(api: Api, store: EmbeddedStore) -> None:
    answer = await api.call("PUT", "/v1/sandboxes/ghost", {"addresses": ["10.75.0.30"]}, expect=404)
    assert answer.code == "SANDBOX_NOT_FOUND"
    assert "ghost" not in json.loads(store.path.read_text())["sandboxes"]
    await api.call("POST", "/v1/sandboxes", {"id": "ghost", "addresses": ["10.75.0.30"]}, expect=201)
    mismatch = await api.call("PUT", "/v1/sandboxes/ghost", {"id": "other", "addresses": ["10.75.0.30"]}, expect=400)
    assert (mismatch.code, mismatch.body["field"]) == ("ID_MISMATCH", "id")


# --------------------------------------------------------------------------- sandboxes: profiles and scopes


async def test_network_profile_denied_writes_nothing(api: Api, store: EmbeddedStore) -> None:
    before = store.path.read_bytes()
    record = {"id": "wide", "addresses": ["10.75.0.40"], "profile": "unrestricted"}
    denied = await api.call("POST", "/v1/sandboxes", record, token="writer", expect=403)
    assert (denied.code, denied.body["field"]) == ("NETWORK_PROFILE_DENIED", "profile")
    assert "network:unrestricted" in denied.body["message"]
    assert (await api.call("GET", "/v1/sandboxes/wide", expect=404)).code == "SANDBOX_NOT_FOUND"
    assert store.path.read_bytes() == before
    assert "wide" not in store.state.sandboxes

    registry = {"id": "reg", "addresses": ["10.75.0.41"], "profile": "registry"}
    assert (await api.call("POST", "/v1/sandboxes", registry, token="isolated-only", expect=403)).code == (
        "NETWORK_PROFILE_DENIED"
    )
    isolated = {"id": "iso", "addresses": ["10.75.0.42"]}
    await api.call("POST", "/v1/sandboxes", isolated, token="isolated-only", expect=201)  # no network scope needed
    await api.call("POST", "/v1/sandboxes", record, token="admin", expect=201)  # admin implies network:*


async def test_replace_and_patch_also_need_the_network_scope(api: Api, store: EmbeddedStore) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, token="writer", expect=201)
    before = store.path.read_bytes()
    widened = {"egress": {"allow_hosts": ["*.anything.example"]}}
    patch = await api.call("PATCH", "/v1/sandboxes/agent-1", widened, token="isolated-only", expect=403)
    assert patch.code == "NETWORK_PROFILE_DENIED"
    put = await api.call("PUT", "/v1/sandboxes/agent-1", ALLOWLISTED, token="isolated-only", expect=403)
    assert put.code == "NETWORK_PROFILE_DENIED"
    # Deleting acts on that profile's sandboxes too (it could take another tenant's sandbox off the network).
    delete = await api.call("DELETE", "/v1/sandboxes/agent-1", token="isolated-only", expect=403)
    assert (delete.code, delete.body["field"]) == ("NETWORK_PROFILE_DENIED", "profile")
    assert store.path.read_bytes() == before
    await api.call("DELETE", "/v1/sandboxes/agent-1", token="writer", expect=204)


@pytest.mark.parametrize(
    ("method", "path", "data"),
    [
        ("POST", "/v1/sandboxes", b'{"id": "Bad Id!", "addresses": "nope", "profile": "unrestricted"}'),
        ("PUT", "/v1/sandboxes/agent-1", b'{"addresses": [], "profile": "allowlisted", "colour": 1}'),
        ("PUT", "/v1/sandboxes/agent-1", b"{not json"),
        ("PATCH", "/v1/sandboxes/agent-1", b'{"egress": {"allow_hosts": ["https://x"]}}'),
        ("PATCH", "/v1/sandboxes/agent-1", b"[1, 2]"),
        ("PATCH", "/v1/sandboxes/agent-1", b"\xff\xfe"),
    ],
)
async def test_the_scope_check_comes_before_validation(
    api: Api, store: EmbeddedStore, method: str, path: str, data: bytes
) -> None:
    """403, not 400: a caller who may not act on the profile learns nothing from validation and costs no work."""
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    before = store.path.read_bytes()
    denied = await api.call(method, path, data=data, token="isolated-only", expect=403)
    assert denied.code == "NETWORK_PROFILE_DENIED"
    assert store.path.read_bytes() == before
    # The same request from a caller with the scope gets the validation error.
    assert (await api.call(method, path, data=data, token="admin")).status == 400


async def test_profile_is_immutable(api: Api, store: EmbeddedStore) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    before = store.path.read_bytes()
    put = await api.call("PUT", "/v1/sandboxes/agent-1", {**ALLOWLISTED, "profile": "unrestricted"}, expect=409)
    assert (put.code, put.body["field"]) == ("PROFILE_IMMUTABLE", "profile")
    patch = await api.call("PATCH", "/v1/sandboxes/agent-1", {"profile": "registry", "egress": None}, expect=409)
    assert patch.code == "PROFILE_IMMUTABLE"
    # Leaving the profile out of a PUT means the default, isolated: a change, also refused.
    implicit = {k: v for k, v in ALLOWLISTED.items() if k not in ("profile", "egress")}
    assert (await api.call("PUT", "/v1/sandboxes/agent-1", implicit, expect=409)).code == "PROFILE_IMMUTABLE"
    assert store.path.read_bytes() == before


async def test_transit_profile_is_not_supported(api: Api) -> None:
    answer = await api.call("POST", "/v1/sandboxes", {"id": "l2", "addresses": ["10.75.0.50"], "profile": "transit"})
    assert (answer.status, answer.code, answer.body["field"]) == (400, "PROFILE_NOT_SUPPORTED", "profile")


# --------------------------------------------------------------------------- sandboxes: merge patch


def test_merge_patch_follows_rfc_7396_examples() -> None:
    # RFC 7396 appendix A.
    cases = [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ]
    for target, patch, expected in cases:
        assert apply_merge_patch(target, patch) == expected, (target, patch)


async def test_patch_merges_into_the_stored_record(api: Api, store: EmbeddedStore) -> None:
    await api.call("POST", "/v1/sandboxes", {**ALLOWLISTED, "limits": {"bandwidth_mbit": 20}}, expect=201)
    patched = await api.call(
        "PATCH",
        "/v1/sandboxes/agent-1",
        {"labels": {"owner": "ana"}, "egress": {"presets": ["ai-apis"]}, "limits": None},
        headers={"Content-Type": "application/merge-patch+json"},
        expect=200,
    )
    body = patched.body
    assert body["labels"] == {"team": "research", "owner": "ana"}  # objects merge
    assert body["egress"] == {"allow_hosts": ["api.github.com", "*.example.com"], "presets": ["ai-apis"]}
    assert body["limits"] == {}  # null removes
    stored = json.loads(store.path.read_text())["sandboxes"]["agent-1"]
    assert {**stored, "revision": patched.headers["X-Gateway-Revision"]} == body

    lists_replace = await api.call("PATCH", "/v1/sandboxes/agent-1", {"egress": {"allow_hosts": ["pypi.org"]}})
    assert lists_replace.body["egress"]["allow_hosts"] == ["pypi.org"]
    removed = await api.call("PATCH", "/v1/sandboxes/agent-1", {"labels": {"team": None}}, expect=200)
    assert removed.body["labels"] == {"owner": "ana"}


async def test_patch_result_is_validated_as_a_whole(api: Api, store: EmbeddedStore) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    before = store.path.read_bytes()
    bad_host = await api.call("PATCH", "/v1/sandboxes/agent-1", {"egress": {"allow_hosts": ["**.x.com"]}}, expect=400)
    assert (bad_host.code, bad_host.body["field"]) == ("INVALID_HOSTNAME", "egress.allow_hosts[0]")
    # Each field alone is fine, but the result breaks a cross-field rule.
    ports = await api.call("PATCH", "/v1/sandboxes/agent-1", {"egress": {"allow_ports": [443]}}, expect=400)
    assert ports.code == "ALLOW_PORTS_WITHOUT_CIDRS"
    no_addresses = await api.call("PATCH", "/v1/sandboxes/agent-1", {"addresses": None}, expect=400)
    assert (no_addresses.code, no_addresses.body["field"]) == ("MISSING_FIELD", "addresses")
    unknown = await api.call("PATCH", "/v1/sandboxes/agent-1", {"colour": "blue"}, expect=400)
    assert (unknown.code, unknown.body["field"]) == ("UNKNOWN_FIELD", "colour")
    renamed = await api.call("PATCH", "/v1/sandboxes/agent-1", {"id": "agent-2"}, expect=400)
    assert renamed.code == "ID_MISMATCH"
    not_object = await api.call("PATCH", "/v1/sandboxes/agent-1", ["egress"], expect=400)
    assert not_object.code == "INVALID_TYPE"
    assert store.path.read_bytes() == before
    assert (await api.call("PATCH", "/v1/sandboxes/nobody", {"labels": {}}, expect=404)).code == "SANDBOX_NOT_FOUND"


# --------------------------------------------------------------------------- explain and the effective policy


async def test_explain_allowed_and_denied_with_the_deciding_rule(api: Api) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    allowed = (await api.call("GET", "/v1/sandboxes/agent-1/explain?host=api.github.com", token="reader")).body
    assert (allowed["allowed"], allowed["rule"]) == (True, "allow_hosts api.github.com")
    assert allowed["sandbox"] == "agent-1"
    assert allowed["request"] == {
        "host": "api.github.com",
        "address": None,
        "port": 443,
        "protocol": "tls",
        "method": None,
        "path": None,
    }
    assert allowed["policy"]["egress"]["allow_hosts"] == ["api.github.com", "*.example.com"]

    wildcard = (await api.call("GET", "/v1/sandboxes/agent-1/explain?host=Docs.Example.com.:8443")).body
    assert (wildcard["allowed"], wildcard["rule"], wildcard["request"]["port"]) == (
        True,
        "allow_hosts *.example.com",
        8443,
    )
    assert wildcard["request"]["host"] == "docs.example.com"

    denied = (await api.call("GET", "/v1/sandboxes/agent-1/explain?host=evil.com")).body
    assert (denied["allowed"], denied["rule"], denied["reason"]) == (False, "default:deny", "host not in allowlist")
    assert (denied["would_deny"], denied["policy"]["enforcement"]) == (False, "enforce")
    smtp = (await api.call("GET", "/v1/sandboxes/agent-1/explain?host=api.github.com&port=25&protocol=tcp")).body
    assert (smtp["allowed"], smtp["rule"]) == (False, "builtin:smtp")
    http = (await api.call("GET", "/v1/sandboxes/agent-1/explain?host=api.github.com&protocol=http")).body
    assert http["request"]["port"] == 80
    dns = (await api.call("GET", "/v1/sandboxes/agent-1/explain?host=a.example.com&protocol=dns")).body
    assert (dns["allowed"], dns["request"]["port"]) == (True, None)


async def test_explain_in_report_mode_says_what_enforce_would_do(api: Api) -> None:
    record = {
        "id": "rollout",
        "addresses": ["10.75.0.61"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["api.github.com"], "allow_cidrs": ["1.1.1.0/24"], "enforcement": "report"},
    }
    await api.call("POST", "/v1/sandboxes", record, expect=201)
    base = "/v1/sandboxes/rollout/explain"
    would = (await api.call("GET", f"{base}?host=evil.com&address=8.8.8.8")).body
    assert (would["allowed"], would["would_deny"], would["rule"]) == (True, True, "default:deny")
    assert would["reason"] == "report mode: would deny (host not in allowlist)"
    assert would["policy"]["enforcement"] == "report" and would["policy"]["egress"]["enforcement"] == "report"
    # Asked about a name alone, the reason says the address may decide (as it does for a denial).
    by_name = (await api.call("GET", f"{base}?host=evil.com")).body
    assert (by_name["allowed"], by_name["would_deny"]) == (True, True)
    assert by_name["reason"].endswith("allow_cidrs decide by the destination address, which was not given: "
                                      "ask again with the address the sandbox would connect to")  # fmt: skip
    allowed = (await api.call("GET", f"{base}?host=api.github.com")).body
    assert (allowed["allowed"], allowed["would_deny"]) == (True, False)
    smtp = (await api.call("GET", f"{base}?host=evil.com&port=25&protocol=tcp")).body
    assert (smtp["allowed"], smtp["would_deny"], smtp["rule"]) == (False, False, "builtin:smtp")


async def test_explain_addresses_and_cidr_rules(api: Api) -> None:
    record = {
        "id": "cidr",
        "addresses": ["10.75.0.60"],
        "profile": "allowlisted",
        "egress": {
            "mode": "deny_all",
            "allow_cidrs": ["1.1.1.0/24"],
            "deny_cidrs": ["1.1.1.128/25"],
            "allow_ports": [443],
        },
    }
    await api.call("POST", "/v1/sandboxes", record, expect=201)

    async def verdict(query: str) -> dict[str, Any]:
        return (await api.call("GET", f"/v1/sandboxes/cidr/explain?{query}", expect=200)).body

    ok = await verdict("host=1.1.1.1")  # an address as host: a connection that carries no name
    assert (ok["allowed"], ok["rule"], ok["request"]["host"], ok["request"]["address"]) == (
        True,
        "allow_cidrs 1.1.1.0/24",
        None,
        "1.1.1.1",
    )
    assert (await verdict("address=1.1.1.200"))["rule"] == "deny_cidrs 1.1.1.128/25"
    assert (await verdict("address=1.1.1.1&port=80&protocol=tcp"))["rule"] == "allow_ports"
    v6 = await verdict("host=[2606:4700::1111]:443")
    assert (v6["allowed"], v6["request"]["address"]) == (False, "2606:4700::1111")
    named = await verdict("host=one.one.one.one&address=1.1.1.1")
    assert (named["allowed"], named["request"]["host"]) == (True, "one.one.one.one")


@pytest.mark.parametrize(
    ("query", "code", "field"),
    [
        ("host=a.com:0", "INVALID_PORT", "host"),
        ("host=a.com:http", "INVALID_PORT", "host"),
        ("host=a.com&port=70000", "INVALID_PORT", "port"),
        ("host=a.com&port=-1", "INVALID_PORT", "port"),
        ("host=a.com:443&port=80", "INVALID_PORT", "port"),
        ("address=1.2.3", "INVALID_ADDRESS", "address"),
        ("host=a.com&address=example.org", "INVALID_ADDRESS", "address"),
        ("host=1.1.1.1&address=8.8.8.8", "INVALID_ADDRESS", "address"),
        ("host=https://a.com", "INVALID_HOSTNAME", "host"),
        ("host=*.a.com", "INVALID_HOSTNAME", "host"),
        ("host=[::1", "INVALID_HOSTNAME", "host"),
        ("host=a.com&protocol=quic", "INVALID_PROTOCOL", "protocol"),
        ("host=a.com&protocol=tcp", "MISSING_FIELD", "port"),
        ("address=1.1.1.1&protocol=dns", "MISSING_FIELD", "host"),
        ("", "MISSING_FIELD", "host"),
        ("hostname=a.com", "UNKNOWN_PARAMETER", "hostname"),
        ("host=a.com&host=b.com", "INVALID_PARAMETER", "host"),
        ("host=a.com&method=G%20T", "INVALID_METHOD", "method"),
        ("host=a.com&method=" + "G" * 33, "INVALID_METHOD", "method"),
        ("host=a.com&method=GET%0D%0A", "INVALID_METHOD", "method"),
        ("host=a.com&path=repos", "INVALID_PATH", "path"),
        ("host=a.com&path=/a%20b", "INVALID_PATH", "path"),
        ("host=a.com&path=/a%0D%0AHost:%20b", "INVALID_PATH", "path"),
        ("host=a.com&path=/b%C3%BCcher", "INVALID_PATH", "path"),
        ("host=a.com&path=/" + "a" * 4096, "INVALID_PATH", "path"),
        ("host=a.com&method=GET&protocol=dns", "INVALID_PARAMETER", "method"),
        ("host=a.com&path=/&protocol=tcp&port=443", "INVALID_PARAMETER", "path"),
    ],
)
async def test_explain_rejects_bad_input(api: Api, query: str, code: str, field: str) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    answer = await api.call("GET", f"/v1/sandboxes/agent-1/explain?{query}", expect=400)
    assert (answer.code, answer.body["field"]) == (code, field)


async def test_explain_and_policy_of_an_unknown_sandbox_are_404(api: Api) -> None:
    assert (await api.call("GET", "/v1/sandboxes/ghost/explain?host=a.com", expect=404)).code == "SANDBOX_NOT_FOUND"
    assert (await api.call("GET", "/v1/sandboxes/ghost/policy", expect=404)).code == "SANDBOX_NOT_FOUND"


GITHUB_READ_ONLY = {
    "id": "gh-reader",
    "addresses": ["10.75.0.70"],
    "profile": "allowlisted",
    "egress": {
        "allow_hosts": ["api.github.com", "docs.example.com"],
        "inspect": [
            {
                "hosts": ["api.github.com"],
                "methods": ["GET", "HEAD"],
                "paths": ["/repos/*", "/user"],
                "headers": [{"name": "Accept", "prefix": "application/"}],
                "deny_reason": "read-only GitHub",
                "credentials": [{"header": "Authorization", "secret": "github", "template": "Bearer {secret}"}],
            }
        ],
    },
}


async def test_an_inspect_entry_is_stored_as_written_and_explained_with_its_http_decision(api: Api) -> None:
    created = (await api.call("POST", "/v1/sandboxes", GITHUB_READ_ONLY, expect=201)).body
    [entry] = created["egress"]["inspect"]
    assert entry["headers"] == [{"name": "accept", "prefix": "application/"}]
    assert entry["credentials"] == [{"header": "authorization", "secret": "github", "template": "Bearer {secret}"}]
    assert entry["ports"] == [443]
    assert (await api.call("GET", "/v1/sandboxes/gh-reader", expect=200)).body == created
    effective = (await api.call("GET", "/v1/sandboxes/gh-reader/policy", expect=200)).body
    assert effective["egress"]["inspect"] == created["egress"]["inspect"]

    async def explain(query: str) -> dict[str, Any]:
        return (await api.call("GET", f"/v1/sandboxes/gh-reader/explain?{query}", token="reader", expect=200)).body

    connection = await explain("host=api.github.com")
    assert (connection["allowed"], connection["rule"]) == (True, "inspect api.github.com")
    assert connection["reason"] == "host api.github.com allowed by inspect api.github.com"
    assert "http" not in connection and (connection["request"]["method"], connection["request"]["path"]) == (None, None)

    read = await explain("host=api.github.com&method=GET&path=/repos/o/r/issues?state=open")
    assert (read["allowed"], read["rule"]) == (True, "inspect api.github.com")
    assert read["request"] | {"method": "GET", "path": "/repos/o/r/issues"} == read["request"]  # no query
    assert read["http"] == {
        "allowed": True,
        "reason": "request allowed by the entry's HTTP rules",
        "failed": "",
        "header_conditions": [{"name": "accept", "prefix": "application/"}],
    }
    write = await explain("host=api.github.com&method=POST&path=/repos/o/r/issues")
    assert (write["allowed"], write["rule"], write["reason"]) == (False, "inspect api.github.com", "read-only GitHub")
    assert (write["http"]["allowed"], write["http"]["failed"]) == (False, "method")
    elsewhere = await explain("host=api.github.com&path=/gists")  # GET by default
    assert (elsewhere["allowed"], elsewhere["http"]["failed"], elsewhere["request"]["method"]) == (False, "path", "GET")
    assert (await explain("host=api.github.com&method=HEAD"))["http"]["failed"] == "path"  # path / by default
    assert (await explain("host=api.github.com&method=TRACE&path=/user"))["http"]["failed"] == "method"

    # Off the entry's port, and on hosts no entry marks, the connection's verdict decides every request.
    port = await explain("host=api.github.com:8443&method=POST&path=/x")
    assert (port["allowed"], port["rule"], port["http"]) == (True, "allow_hosts api.github.com", None)
    plain = await explain("host=docs.example.com&method=DELETE&path=/x")
    assert (plain["allowed"], plain["rule"], plain["http"]) == (True, "allow_hosts docs.example.com", None)
    refused = await explain("host=evil.example&method=GET&path=/")
    assert (refused["allowed"], refused["rule"], refused["http"]) == (False, "default:deny", None)


@pytest.mark.parametrize(
    ("inspect", "code", "field"),
    [
        ([{"hosts": ["api.github.com"], "methods": ["get"]}], "INVALID_METHOD", "egress.inspect[0].methods[0]"),
        (
            [{"hosts": ["api.github.com"], "credentials": [{"header": "authorization", "secret": "gitlab"}]}],
            "UNKNOWN_SECRET",
            "egress.inspect[0].credentials[0].secret",
        ),
        (
            [{"hosts": ["api.github.com"], "credentials": [{"header": "authorization", "value": "ghp_x" * 8}]}],
            "SECRET_VALUE_IN_POLICY",
            "egress.inspect[0].credentials[0].value",
        ),
        (
            [{"hosts": ["api.github.com"], "credentials": [{"header": "host", "secret": "github"}]}],
            "INVALID_CREDENTIAL_HEADER",
            "egress.inspect[0].credentials[0].header",
        ),
        (
            [{"hosts": ["api.github.com"]}, {"hosts": ["API.github.com"]}],
            "INSPECT_HOST_DUPLICATE",
            "egress.inspect[1].hosts[0]",
        ),
    ],
)
async def test_a_refused_inspect_entry_is_400_and_changes_nothing(
    api: Api, inspect: list[Any], code: str, field: str
) -> None:
    await api.call("POST", "/v1/sandboxes", GITHUB_READ_ONLY, expect=201)
    before = (await api.call("GET", "/v1/sandboxes", expect=200)).body
    bad = {**GITHUB_READ_ONLY, "egress": {"inspect": inspect}}
    for method, path, body in (
        ("POST", "/v1/sandboxes", {**bad, "id": "other", "addresses": ["10.75.0.71"]}),
        ("PUT", "/v1/sandboxes/gh-reader", bad),
        ("PATCH", "/v1/sandboxes/gh-reader", {"egress": {"inspect": inspect}}),
    ):
        answer = await api.call(method, path, body, expect=400)
        assert (answer.code, answer.body["field"]) == (code, field), (method, answer.body)
        assert "ghp_x" not in answer.body["message"]
    assert (await api.call("GET", "/v1/sandboxes", expect=200)).body == before
    template = {"name": "gh", "egress": {"inspect": inspect}}
    refused = await api.call("POST", "/v1/templates", template, expect=400)
    assert (refused.code, refused.body["field"]) == (code, field)
    assert (await api.call("GET", "/v1/templates", expect=200)).body == {"templates": []}


def test_explain_query_parsing_normalises_names_and_defaults_ports() -> None:
    asked = parse_explain_query({"host": "BÜCHER.example:8080", "protocol": "HTTP"})
    assert (asked.host, asked.port, asked.protocol) == ("xn--bcher-kva.example", 8080, "http")
    assert parse_explain_query({"host": "2001:db8::1"}).address == "2001:db8::1"
    with pytest.raises(GatewayError) as caught:
        parse_explain_query({"host": "a.com", "port": "٣"})  # a non-ASCII digit is not a port
    assert caught.value.code == "INVALID_PORT"


async def test_template_inheritance_is_visible_and_follows_template_changes(api: Api) -> None:
    template = {
        "name": "agents",
        "description": "AI agents",
        "egress": {"allow_hosts": ["api.openai.com"]},
        "limits": {"connections_per_minute": 300},
    }
    await api.call("POST", "/v1/templates", template, token="templater", expect=201)
    sandbox = {
        "id": "bot",
        "addresses": ["10.75.0.70"],
        "profile": "allowlisted",
        "template": "agents",
        "limits": {"bandwidth_mbit": 10},
    }
    await api.call("POST", "/v1/sandboxes", sandbox, expect=201)

    policy = (await api.call("GET", "/v1/sandboxes/bot/policy", token="reader", expect=200)).body
    assert policy["egress"]["allow_hosts"] == ["api.openai.com"]
    assert policy["limits"]["connections_per_minute"] == 300  # from the template
    assert policy["limits"]["bandwidth_mbit"] == 10  # the sandbox's own
    assert policy["limits"]["dns_queries_per_minute"] == 500  # the configured default
    allowed = (await api.call("GET", "/v1/sandboxes/bot/explain?host=api.openai.com")).body
    assert (allowed["allowed"], allowed["rule"]) == (True, "allow_hosts api.openai.com")

    changed = {"description": "AI agents", "egress": {"allow_hosts": ["api.anthropic.com"]}}
    await api.call("PUT", "/v1/templates/agents", changed, token="templater", expect=200)
    policy = (await api.call("GET", "/v1/sandboxes/bot/policy", expect=200)).body
    assert policy["egress"]["allow_hosts"] == ["api.anthropic.com"]
    assert policy["limits"]["connections_per_minute"] == 1000  # the template no longer sets it
    assert (await api.call("GET", "/v1/sandboxes/bot/explain?host=api.openai.com")).body["allowed"] is False

    # The sandbox's own list overrides the template's.
    await api.call("PATCH", "/v1/sandboxes/bot", {"egress": {"allow_hosts": ["pypi.org"]}}, expect=200)
    policy = (await api.call("GET", "/v1/sandboxes/bot/policy", expect=200)).body
    assert policy["egress"]["allow_hosts"] == ["pypi.org"]


# --------------------------------------------------------------------------- templates


async def test_template_crud_and_conflicts(api: Api, store: EmbeddedStore) -> None:
    base = {"name": "base", "egress": {"presets": ["git-hosts"]}}
    created = await api.call("POST", "/v1/templates", base, token="templater", expect=201)
    assert created.headers["Location"] == "/v1/templates/base"
    assert created.body == {
        "name": "base",
        "description": "",
        "ceiling": False,
        "egress": {"presets": ["git-hosts"]},
        "limits": {},
    }
    assert (await api.call("POST", "/v1/templates", base, expect=409)).code == "TEMPLATE_EXISTS"
    assert (await api.call("GET", "/v1/templates", token="reader", expect=200)).body == {"templates": [created.body]}
    assert (await api.call("GET", "/v1/templates/base", token="reader", expect=200)).body == created.body

    missing = await api.call("PUT", "/v1/templates/ghost", {"description": "x"}, token="templater", expect=404)
    assert missing.code == "TEMPLATE_NOT_FOUND"
    assert "ghost" not in json.loads(store.path.read_text())["templates"]
    assert (await api.call("POST", "/v1/templates", {"description": "no name"}, expect=400)).code == "MISSING_FIELD"

    await api.call("POST", "/v1/sandboxes", {"id": "user", "addresses": ["10.75.0.80"], "template": "base"}, expect=201)
    in_use = await api.call("DELETE", "/v1/templates/base", token="templater", expect=409)
    assert in_use.code == "TEMPLATE_IN_USE" and "user" in in_use.body["message"]
    await api.call("DELETE", "/v1/sandboxes/user", expect=204)
    await api.call("DELETE", "/v1/templates/base", token="templater", expect=204)
    assert (await api.call("GET", "/v1/templates/base", expect=404)).code == "TEMPLATE_NOT_FOUND"


# --------------------------------------------------------------------------- errors


async def test_request_body_errors(api: Api, store: EmbeddedStore) -> None:
    before = store.path.read_bytes()
    bad_json = await api.call("POST", "/v1/sandboxes", data=b'{"id": "x",', expect=400)
    assert (bad_json.code, bad_json.body["field"]) == ("INVALID_JSON", None)
    assert (await api.call("POST", "/v1/sandboxes", data=b"", expect=400)).code == "INVALID_JSON"
    duplicate = await api.call("POST", "/v1/sandboxes", data=b'{"id": "a", "id": "b", "addresses": ["10.75.0.9"]}')
    assert (duplicate.status, duplicate.code) == (400, "INVALID_JSON")
    nan = await api.call("POST", "/v1/sandboxes", data=b'{"id": "a", "addresses": ["10.75.0.9"], "limits": NaN}')
    assert (nan.status, nan.code) == (400, "INVALID_JSON")
    form = await api.call("POST", "/v1/sandboxes", data=b"id=a", headers={"Content-Type": "text/plain"}, expect=415)
    assert form.code == "UNSUPPORTED_MEDIA_TYPE"
    big = {"id": "big", "addresses": ["10.75.0.9"], "labels": {"pad": "x" * MAX_BODY_BYTES}}
    assert (await api.call("POST", "/v1/sandboxes", big, expect=413)).code == "BODY_TOO_LARGE"
    unknown = await api.call("POST", "/v1/sandboxes", {"id": "a", "addresses": ["10.75.0.9"], "ttl": 5}, expect=400)
    assert (unknown.code, unknown.body["field"]) == ("UNKNOWN_FIELD", "ttl")
    outside = await api.call("POST", "/v1/sandboxes", {"id": "a", "addresses": ["192.0.2.1"]}, expect=400)
    assert (outside.code, outside.body["field"]) == ("ADDRESS_OUTSIDE_SUBNETS", "addresses[0]")
    assert store.path.read_bytes() == before


async def test_body_too_large_without_content_length(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(17):
            yield b" " * 65536  # 1 MiB + 64 KiB of whitespace, streamed (chunked, no Content-Length)

    response = await api.client.post(
        "/v1/sandboxes",
        data=chunks(),
        headers={"Authorization": f"Bearer {TOKENS['admin'][0]}", "Content-Type": "application/json"},
    )
    assert response.status == 413
    assert (await response.json())["code"] == "BODY_TOO_LARGE"


async def test_unknown_route_and_wrong_method_answer_json(api: Api) -> None:
    missing = await api.call("GET", "/v1/nothing-here", expect=404)
    assert missing.body == {"code": "NOT_FOUND", "message": "no such route; see /openapi.json", "field": None}
    assert (await api.call("GET", "/v2/sandboxes", token=None, expect=404)).code == "NOT_FOUND"
    wrong = await api.call("DELETE", "/v1/sandboxes", expect=405)
    assert wrong.code == "METHOD_NOT_ALLOWED"
    assert set(wrong.headers["Allow"].split(", ")) == {"GET", "POST"}
    assert (await api.call("POST", "/v1/templates/base", {}, expect=405)).code == "METHOD_NOT_ALLOWED"


async def test_unexpected_exceptions_become_a_logged_500_without_internals(
    aiohttp_client: AiohttpClient, store: EmbeddedStore, config: Config
) -> None:
    app = create_app(store, **api_section(config))

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail")

    app.router.add_route("GET", "/broken", broken)  # on this test's own app; the real route table is untouched
    client = await aiohttp_client(app)
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/broken")
    assert response.status == 500
    body = await response.json()
    assert body == {"code": "INTERNAL", "message": "internal error; the gateway logged the details", "field": None}
    assert "secret" not in await response.text()
    assert any(entry["event"] == "api.internal_error" for entry in logs)


# --------------------------------------------------------------------------- authentication and scopes


async def test_authentication_failures(api: Api) -> None:
    missing = await api.call("GET", "/v1/sandboxes", token=None, expect=401)
    assert missing.code == "UNAUTHENTICATED"
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    wrong = await api.call(
        "GET", "/v1/sandboxes", token=None, headers={"Authorization": "Bearer not-a-real-token-at-all"}, expect=401
    )
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    basic = await api.call("GET", "/v1/sandboxes", token=None, headers={"Authorization": "Basic YTpi"}, expect=401)
    assert basic.code == "UNAUTHENTICATED"
    # 401 comes before the body is looked at: a write without a token reveals nothing about validation.
    assert (await api.call("POST", "/v1/sandboxes", data=b"{", token=None, expect=401)).code == "UNAUTHENTICATED"
    lowercase = {"Authorization": f"bearer {TOKENS['reader'][0]}"}
    await api.call("GET", "/v1/sandboxes", token=None, headers=lowercase, expect=200)


@pytest.mark.parametrize(
    ("token", "method", "path", "body"),
    [
        ("reader", "POST", "/v1/sandboxes", {"id": "x", "addresses": ["10.75.0.90"]}),
        ("reader", "DELETE", "/v1/sandboxes/agent-1", None),
        ("reader", "POST", "/v1/templates", {"name": "t"}),
        ("writer", "POST", "/v1/templates", {"name": "t"}),
        ("writer", "DELETE", "/v1/templates/t", None),
        ("templater", "GET", "/v1/sandboxes", None),
        ("templater", "GET", "/v1/status", None),
        ("templater", "GET", "/v1/sandboxes/agent-1/explain?host=a.com", None),
        ("isolated-only", "GET", "/v1/templates", None),
        ("reader", "GET", "/v1/sandboxes/agent-1/audit-batches", None),
        ("writer", "GET", "/v1/sandboxes/agent-1/audit-batches/1700000000000000-1.ndjson", None),
        ("auditor", "GET", "/v1/sandboxes", None),
    ],
)
async def test_scopes_are_enforced(
    api: Api, store: EmbeddedStore, token: str, method: str, path: str, body: Any
) -> None:
    before = store.path.read_bytes()
    answer = await api.call(method, path, body, token=token, expect=403)
    assert answer.code == "INSUFFICIENT_SCOPE"
    assert TOKENS[token][0] not in json.dumps(answer.body)
    assert store.path.read_bytes() == before


async def test_writes_are_logged_with_the_token_name_never_its_value(api: Api) -> None:
    with structlog.testing.capture_logs() as logs:
        await api.call("POST", "/v1/sandboxes", ALLOWLISTED, token="writer", expect=201)
        await api.call(
            "POST",
            "/v1/sandboxes",
            {"id": "x", "addresses": ["10.75.0.91"], "profile": "unrestricted"},
            token="writer",
            expect=403,
        )
        await api.call("GET", "/v1/sandboxes", token="writer", expect=200)
    writes = [entry for entry in logs if entry["event"] == "api.write"]
    assert [(w["token"], w["action"], w["target"], w["status"], w["result"]) for w in writes] == [
        ("writer", "sandboxes.create", "agent-1", 201, "ok"),
        ("writer", "sandboxes.create", "x", 403, "NETWORK_PROFILE_DENIED"),
    ]
    assert all(secret not in repr(logs) for secret, _ in TOKENS.values())


# --------------------------------------------------------------------------- no tokens configured


async def test_without_tokens_loopback_callers_need_none(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    config = write_config(tmp_path, tokens=False)
    store = EmbeddedStore(config.policy_context(), msgspec.structs.replace(config.store, poll_interval=0.05))
    await store.start()
    try:
        with structlog.testing.capture_logs() as logs:
            api = Api(await aiohttp_client(create_app(store, **api_section(config))))
        assert any(entry["event"] == "api.open_mode" and entry["log_level"] == "warning" for entry in logs)
        record = {"id": "open", "addresses": ["10.75.0.95"], "profile": "unrestricted"}
        await api.call("POST", "/v1/sandboxes", record, token=None, expect=201)
        assert (await api.call("GET", "/v1/status", token=None, expect=200)).body["auth"] == "open-loopback"
        # A page that rebinds its own name to 127.0.0.1 still sends its own Host: refused.
        rebound = await api.call("GET", "/v1/sandboxes", token=None, headers={"Host": "evil.example:8470"}, expect=403)
        assert rebound.code == "HOST_NOT_ALLOWED"
        for host in ("localhost:8470", "[::1]:8470", "127.0.0.1"):
            await api.call("GET", "/v1/sandboxes", token=None, headers={"Host": host}, expect=200)
    finally:
        await store.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.internal"])
def test_without_tokens_the_api_refuses_to_listen_beyond_loopback(tmp_path: Path, host: str) -> None:
    config = write_config(tmp_path, tokens=False, host=host)
    store = EmbeddedStore(config.policy_context(), config.store)
    with pytest.raises(GatewayError) as caught:
        create_app(store, **api_section(config))
    assert (caught.value.code, caught.value.field) == ("CONFIG_INVALID", "api.tokens")


# --------------------------------------------------------------------------- the OpenAPI document


async def test_openapi_is_served_without_a_token_and_is_a_valid_3_1_document(api: Api) -> None:
    served = (await api.call("GET", "/openapi.json", token=None, expect=200)).body
    assert served == DOC
    assert served["openapi"].startswith("3.1")
    validate_spec(served)


def test_every_route_is_documented_and_every_documented_route_exists(config: Config, tmp_path: Path) -> None:
    app = create_app(
        EmbeddedStore(config.policy_context(), StoreConfig(path=tmp_path / "p.json")), **api_section(config)
    )
    registered: dict[str, set[str]] = {}
    for route in app.router.routes():
        registered.setdefault(route.resource.canonical, set()).add(route.method.lower())
    methods = {"get", "put", "post", "patch", "delete", "head", "options", "trace"}
    documented = {path: {m for m in item if m in methods} for path, item in DOC["paths"].items()}
    assert registered == documented

    specs = {(spec.method.lower(), spec.path): spec for spec in route_specs()}
    for path, item in DOC["paths"].items():
        for method in documented[path]:
            operation, spec = item[method], specs[(method, path)]
            assert operation["operationId"] == spec.action
            assert operation["x-required-scope"] == spec.scope, (method, path)
            assert (operation.get("security") == []) == (spec.scope == PUBLIC), (method, path)
            for status in ("400", "500") + (() if spec.scope == PUBLIC else ("401", "403")):
                assert status in operation["responses"], (method, path, status)


def test_example_bodies_pass_the_real_parser_and_their_schema(config: Config) -> None:
    context = config.policy_context()

    def sandbox(raw: Any, sandbox_id: str | None = None) -> None:
        parse_sandbox(
            raw,
            subnets=context.subnets,
            known_presets=context.presets,
            known_secrets=context.secrets,
            sandbox_id=sandbox_id,
        )

    def examples(path: str, method: str) -> list[tuple[str, Any, dict[str, Any]]]:
        out = []
        for media in DOC["paths"][path][method]["requestBody"]["content"].values():
            out += [(name, ex["value"], media["schema"]) for name, ex in media["examples"].items()]
        assert out, (path, method)
        return out

    for _name, value, schema in examples("/v1/sandboxes", "post"):
        sandbox(value)
        schema_validator(schema).validate(value)
    for name, value, schema in examples("/v1/sandboxes/{id}", "put"):
        sandbox(value, sandbox_id=name.replace("_", "-"))
        schema_validator(schema).validate(value)
    for _, value, schema in examples("/v1/sandboxes/{id}", "patch"):
        base = parse_sandbox(
            SANDBOX_EXAMPLES["allowlisted"],
            subnets=context.subnets,
            known_presets=context.presets,
            known_secrets=context.secrets,
        )
        sandbox(apply_merge_patch(base.to_dict(), value), sandbox_id=base.id)
        schema_validator(schema).validate(value)
    for path, method in (("/v1/templates", "post"), ("/v1/templates/{name}", "put")):
        for _, value, schema in examples(path, method):
            parse_template(value, known_presets=context.presets, known_secrets=context.secrets)
            schema_validator(schema).validate(value)
    assert SANDBOX_PATCH_EXAMPLES and TEMPLATE_EXAMPLES

    # And a record the parser refuses is refused by the schema too, where the schema can say so.
    for bad in (
        {"addresses": ["10.75.0.1"]},
        {"id": "x", "addresses": [], "ttl": 1},
        {"id": "UPPER", "addresses": ["a"]},
    ):
        assert not schema_validator({"$ref": "#/components/schemas/SandboxCreate"}).is_valid(bad)


async def test_every_route_refuses_a_query_parameter_it_does_not_declare(api: Api) -> None:
    """The middleware checks each route's query against the route table, so what the document lists is exactly
    what each route accepts: an undeclared parameter is 400 before the handler runs (and before any body is read),
    and each declared one is accepted by name."""
    for spec in route_specs():
        path = spec.path.replace("{id}", "nobody").replace("{name}", "nothing")
        refused = await api.call(spec.method, f"{path}?zz_unknown=1", expect=400)
        assert (refused.code, refused.body["field"]) == ("UNKNOWN_PARAMETER", "zz_unknown"), (spec.method, path)
        declared = [parameter.name for parameter in spec.query]
        assert refused.body["message"].endswith(f"expected: {', '.join(declared) or 'none'}"), refused.body
        documented = [p["name"] for p in DOC["paths"][spec.path][spec.method.lower()].get("parameters", [])]
        assert documented == declared, (spec.method, spec.path)


def _accepted_fields(parse: Callable[[Any], object], record: Any, path: str) -> set[str]:
    """The field names the parser accepts at `path`, read from its refusal of an unknown one."""
    with pytest.raises(GatewayError) as caught:
        parse(record)
    assert (caught.value.code, caught.value.field) == ("UNKNOWN_FIELD", path)
    listed = re.search(r"expected(?: one of)?:? (.*)$", caught.value.message)
    assert listed is not None, caught.value.message
    return set(listed.group(1).split(", "))


def test_request_schemas_list_exactly_the_fields_the_parser_accepts(config: Config) -> None:
    context = config.policy_context()

    def sandbox(raw: Any) -> object:
        return parse_sandbox(raw, subnets=context.subnets, known_presets=context.presets, known_secrets=context.secrets)

    def template(raw: Any) -> object:
        return parse_template(raw, known_presets=context.presets, known_secrets=context.secrets)

    def tunnel(raw: Any) -> object:
        return parse_request(raw, default_ttl=60, max_ttl=3600)

    base = {"id": "probe", "addresses": ["10.75.0.5"], "profile": "allowlisted"}

    def inspect(entry: dict[str, Any]) -> dict[str, Any]:
        return {**base, "egress": {"inspect": [{"hosts": ["a.example.com"], **entry}]}}

    probes = {
        "SandboxCreate": (sandbox, {**base, "zz_unknown": 1}, "zz_unknown"),
        "Egress": (sandbox, {**base, "egress": {"zz_unknown": 1}}, "egress.zz_unknown"),
        "Ingress": (sandbox, {**base, "ingress": {"zz_unknown": 1}}, "ingress.zz_unknown"),
        "Limits": (sandbox, {**base, "limits": {"zz_unknown": 1}}, "limits.zz_unknown"),
        "PrivateLink": (sandbox, {**base, "private_links": [{"zz_unknown": 1}]}, "private_links[0].zz_unknown"),
        "InspectEntry": (sandbox, inspect({"zz_unknown": 1}), "egress.inspect[0].zz_unknown"),
        "HeaderMatch": (
            sandbox,
            inspect({"headers": [{"zz_unknown": 1}]}),
            "egress.inspect[0].headers[0].zz_unknown",
        ),
        "Credential": (
            sandbox,
            inspect({"credentials": [{"zz_unknown": 1}]}),
            "egress.inspect[0].credentials[0].zz_unknown",
        ),
        "TemplateCreate": (template, {"name": "probe", "zz_unknown": 1}, "zz_unknown"),
        "TunnelCreate": (tunnel, {"port": 80, "zz_unknown": 1}, "zz_unknown"),
    }
    schemas = DOC["components"]["schemas"]
    for name, (parse, record, path) in probes.items():
        # A sandbox's `revision` is the API's: taken out of the body before the parser sees it.
        api_only = {"revision"} if name == "SandboxCreate" else set()
        assert set(schemas[name]["properties"]) - api_only == _accepted_fields(parse, record, path), name
        assert schemas[name]["additionalProperties"] is False, name
    for same in ("SandboxReplace", "SandboxPatch", "Sandbox"):
        assert set(schemas[same]["properties"]) == set(schemas["SandboxCreate"]["properties"]), same
    for same in ("TemplateReplace", "Template"):
        assert set(schemas[same]["properties"]) == set(schemas["TemplateCreate"]["properties"]), same


# --------------------------------------------------------------------------- audit batches

T0 = 1_700_000_000_000_000


def flow_record(sandbox: str, end_us: int, **changes: Any) -> FlowRecord:
    values: dict[str, Any] = {
        "start_us": end_us - 1000,
        "end_us": end_us,
        "sandbox": sandbox,
        "src_addr": "10.75.0.10",
        "src_port": 40001,
        "dst_addr": "140.82.112.5",
        "dst_port": 443,
        "orig_dst_addr": "140.82.112.5",
        "orig_dst_port": 443,
        "hostname": "api.github.com",
        "protocol": "tls",
        "bytes_up": 700,
        "bytes_down": 5000,
        "duration_ms": 1.0,
        "verdict": "allow",
        "reason": "allowed by policy",
        "rule": "allow_hosts api.github.com",
    }
    return FlowRecord(**{**values, **changes})


@pytest.fixture
async def flows(tmp_path: Path, config: Config) -> AsyncIterator[FlowLog]:
    instance = FlowLog(msgspec.structs.replace(config.audit, dir=tmp_path / "audit", flush_interval=3600.0))
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
async def audit_api(aiohttp_client: AiohttpClient, store: EmbeddedStore, config: Config, flows: FlowLog) -> Api:
    return Api(await aiohttp_client(create_app(store, **api_section(config), flows=flows)))


async def _write_batches(flows: FlowLog, sandbox: str, count: int) -> None:
    for i in range(count):
        flows.record(flow_record(sandbox, T0 + i * 1000, bytes_up=i))
        await flows.flush()


async def test_audit_batches_are_listed_in_pages_and_fetched_as_ndjson(audit_api: Api, flows: FlowLog) -> None:
    await audit_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    await _write_batches(flows, "agent-1", 5)
    flows.record(flow_record("agent-1", T0 + 10_000, verdict="deny", reason="host not in allowlist", rule="x"))
    flows.record(flow_record("agent-1", T0 + 10_001))
    await flows.flush()
    await _write_batches(flows, "other", 1)

    names: list[str] = []
    pages = 0
    url = "/v1/sandboxes/agent-1/audit-batches?limit=4"
    while True:
        page = (await audit_api.call("GET", url, token="auditor", expect=200)).body
        pages += 1
        names += [batch["name"] for batch in page["batches"]]
        if page["next_continuation_token"] is None:
            break
        url = f"/v1/sandboxes/agent-1/audit-batches?limit=4&continuation_token={page['next_continuation_token']}"
    assert pages == 2 and len(names) == 6 and names == sorted(names)
    assert all(name.endswith(f"-{os.getpid()}.ndjson") for name in names)

    since = (await audit_api.call("GET", f"/v1/sandboxes/agent-1/audit-batches?since_us={T0 + 3000}")).body
    assert [b["first_ts_us"] for b in since["batches"]] == [T0 + 3000, T0 + 4000, T0 + 10_000]

    fetched = await audit_api.call("GET", f"/v1/sandboxes/agent-1/audit-batches/{names[-1]}", token="auditor")
    assert fetched.status == 200 and fetched.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in fetched.body.splitlines()]
    assert [line["end_us"] for line in lines] == [T0 + 10_000, T0 + 10_001]
    assert lines[0]["verdict"] == "deny" and all(list(line) == list(FIELD_NAMES) for line in lines)
    flow_schema = schema_validator({"$ref": "#/components/schemas/FlowRecord"})
    for line in lines:
        flow_schema.validate(line)
    assert set(DOC["components"]["schemas"]["FlowRecord"]["properties"]) == set(FIELD_NAMES)


async def test_audit_batches_outlive_the_sandbox_record(audit_api: Api, flows: FlowLog) -> None:
    await audit_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    listed = (await audit_api.call("GET", "/v1/sandboxes/agent-1/audit-batches", expect=200)).body
    assert listed == {"batches": [], "next_continuation_token": None}  # a known sandbox with no traffic yet
    await _write_batches(flows, "agent-1", 1)
    await audit_api.call("DELETE", "/v1/sandboxes/agent-1", expect=204)
    [batch] = (await audit_api.call("GET", "/v1/sandboxes/agent-1/audit-batches", expect=200)).body["batches"]
    await audit_api.call("GET", f"/v1/sandboxes/agent-1/audit-batches/{batch['name']}", expect=200)


async def test_audit_not_found(audit_api: Api, flows: FlowLog) -> None:
    await _write_batches(flows, "agent-1", 1)
    ghost = await audit_api.call("GET", "/v1/sandboxes/ghost/audit-batches", expect=404)
    assert (ghost.code, ghost.body["field"]) == ("SANDBOX_NOT_FOUND", "id")
    batch = "/v1/sandboxes/ghost/audit-batches/1700000000000000-1.ndjson"
    assert (await audit_api.call("GET", batch, expect=404)).code == "SANDBOX_NOT_FOUND"
    missing = await audit_api.call("GET", "/v1/sandboxes/agent-1/audit-batches/1111111111111111-1.ndjson", expect=404)
    assert (missing.code, missing.body["field"]) == ("BATCH_NOT_FOUND", "name")


@pytest.mark.parametrize(
    ("path", "code", "field"),
    [
        ("audit-batches?since_us=-1", "INVALID_PARAMETER", "since_us"),
        ("audit-batches?since_us=1e6", "INVALID_PARAMETER", "since_us"),
        ("audit-batches?limit=0", "INVALID_PARAMETER", "limit"),
        ("audit-batches?limit=1001", "INVALID_PARAMETER", "limit"),
        ("audit-batches?limit=ten", "INVALID_PARAMETER", "limit"),
        ("audit-batches?continuation_token=bm90LWEtbmFtZQ", "INVALID_CONTINUATION_TOKEN", "continuation_token"),
        ("audit-batches?since=5", "UNKNOWN_PARAMETER", "since"),
        ("audit-batches?limit=1&limit=2", "INVALID_PARAMETER", "limit"),
        ("audit-batches/...", "INVALID_BATCH_NAME", "name"),
        ("audit-batches/..%2F..%2Fpolicies.json", "INVALID_BATCH_NAME", "name"),
        ("audit-batches/.tmp-1-1700000000000000.ndjson", "INVALID_BATCH_NAME", "name"),
        ("audit-batches/1700000000000000-1.json", "INVALID_BATCH_NAME", "name"),
        ("audit-batches/1700000000000000-1.ndjson?x=1", "UNKNOWN_PARAMETER", "x"),
    ],
)
async def test_audit_bad_parameters_are_400(audit_api: Api, flows: FlowLog, path: str, code: str, field: str) -> None:
    await _write_batches(flows, "agent-1", 1)
    answer = await audit_api.call("GET", f"/v1/sandboxes/agent-1/{path}", expect=400)
    assert (answer.code, answer.body["field"]) == (code, field)


async def test_audit_traversal_never_reads_outside_the_audit_directory(audit_api: Api, flows: FlowLog) -> None:
    await _write_batches(flows, "agent-1", 1)
    # Whatever the client's URL handling does with dot segments, the answer is an error, never a file.
    for path in (
        "/v1/sandboxes/agent-1/audit-batches/..",
        "/v1/sandboxes/agent-1/audit-batches/%2E%2E%2Fpolicies.json",
        "/v1/sandboxes/agent-1/audit-batches/..%5C..%5Cgateway.toml",
        "/v1/sandboxes/..%2F..%2F/audit-batches",
    ):
        response = await audit_api.client.get(path, headers={"Authorization": f"Bearer {TOKENS['admin'][0]}"})
        assert response.status in (400, 404), path
        body = await response.json()
        assert body["code"] in ("INVALID_BATCH_NAME", "SANDBOX_NOT_FOUND", "NOT_FOUND"), (path, body)


async def test_audit_routes_are_503_without_a_flow_log(api: Api) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    listed = await api.call("GET", "/v1/sandboxes/agent-1/audit-batches", token="auditor", expect=503)
    assert listed.code == "AUDIT_DISABLED"
    fetched = await api.call("GET", "/v1/sandboxes/agent-1/audit-batches/1700000000000000-1.ndjson", expect=503)
    assert fetched.code == "AUDIT_DISABLED"
    assert (await api.call("GET", "/v1/sandboxes/agent-1/audit-batches", token=None, expect=401)).code == (
        "UNAUTHENTICATED"
    )


# --------------------------------------------------------------------------- tunnels


@pytest.mark.parametrize(
    ("query", "code", "field"),
    [
        ("verdict=maybe", "INVALID_PARAMETER", "verdict"),
        ("sandbox=..%2Fetc", "INVALID_ID", "id"),
        ("sandbox=a&sandbox=b", "INVALID_PARAMETER", "sandbox"),
        ("since_us=1", "UNKNOWN_PARAMETER", "since_us"),
    ],
)
async def test_flow_stream_refuses_bad_parameters(audit_api: Api, query: str, code: str, field: str) -> None:
    answer = await audit_api.call("GET", f"/v1/flows/stream?{query}", token="auditor", expect=400)
    assert (answer.code, answer.body["field"]) == (code, field)


async def test_flow_stream_needs_audit_read(audit_api: Api) -> None:
    assert (await audit_api.call("GET", "/v1/flows/stream", token=None, expect=401)).code == "UNAUTHENTICATED"
    await audit_api.call("GET", "/v1/flows/stream", token="reader", expect=403)


async def test_flow_stream_follows_the_records_filtered_and_caps_its_subscribers(
    aiohttp_client: AiohttpClient, store: EmbeddedStore, config: Config, tmp_path: Path
) -> None:
    flows = FlowLog(msgspec.structs.replace(config.audit, dir=tmp_path / "audit", max_stream_subscribers=1))
    api = Api(await aiohttp_client(create_app(store, **api_section(config), flows=flows)))
    auth = {"Authorization": f"Bearer {TOKENS['auditor'][0]}"}
    stream = await api.client.get("/v1/flows/stream?sandbox=agent-1&verdict=deny", headers=auth)
    assert (stream.status, stream.content_type) == (200, "application/x-ndjson")
    busy = await api.call("GET", "/v1/flows/stream", token="auditor", expect=503)
    assert busy.code == "TOO_MANY_SUBSCRIBERS"
    flows.record(flow_record("agent-1", T0, verdict="allow"))
    flows.record(flow_record("other", T0 + 1, verdict="deny"))
    flows.record(flow_record("agent-1", T0 + 2, verdict="deny", reason="host not in allowlist", rule="default:deny"))
    line = await asyncio.wait_for(stream.content.readline(), 5)
    assert (
        json.loads(line)
        == flow_record("agent-1", T0 + 2, verdict="deny", reason="host not in allowlist", rule="default:deny").to_dict()
    )
    stream.close()  # the subscriber leaves: noticed at the next write, and its place is free again

    def freed() -> bool:
        flows.record(flow_record("agent-1", T0 + 3, verdict="deny"))
        try:
            flows.unsubscribe(flows.subscribe())
        except GatewayError:
            return False
        return True

    assert await wait_until_async(freed, timeout=5, interval=0.05)


@pytest.fixture
async def tunnels(store: EmbeddedStore, tmp_path: Path) -> AsyncIterator[TunnelStore]:
    instance = FileTunnelStore(
        store.state, TunnelConfig(max_per_sandbox=3, poll_interval=0.05), tmp_path / "tunnels.json"
    )
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
async def tunnel_api(aiohttp_client: AiohttpClient, store: EmbeddedStore, config: Config, tunnels: TunnelStore) -> Api:
    api = Api(await aiohttp_client(create_app(store, **api_section(config), tunnels=tunnels)))
    await api.call("POST", "/v1/sandboxes", {**ALLOWLISTED, "ingress": {"public_access": True}}, expect=201)
    return api


async def test_tunnel_lifecycle_never_shows_the_password(tunnel_api: Api, tunnels: TunnelStore, tmp_path: Path) -> None:
    body = {"port": 3000, "label": "Web Server", "password": "s3cret-password", "ttl": 600}
    created = await tunnel_api.call("POST", "/v1/sandboxes/agent-1/tunnels", body, expect=201)
    tid = created.body["id"]
    assert re.fullmatch(r"[a-z2-7]{16}", tid) and "agent" not in tid
    assert created.body["url"] == f"https://{tid}.tunnel.localhost:8443/"
    assert created.headers["Location"] == f"/v1/tunnels/{tid}"
    assert created.body["password_protected"] is True and created.body["state"] == "active"
    assert created.body["address"] == "10.75.0.10" and created.body["label"] == "Web Server"
    stored = (tmp_path / "tunnels.json").read_text()
    assert "s3cret-password" not in json.dumps(created.body) and "s3cret-password" not in stored
    assert "scrypt$" in stored and (tmp_path / "tunnels.json").stat().st_mode & 0o777 == 0o600

    listed = await tunnel_api.call("GET", "/v1/sandboxes/agent-1/tunnels", token="tunnel-viewer", expect=200)
    assert [t["id"] for t in listed.body["tunnels"]] == [tid]
    got = await tunnel_api.call("GET", f"/v1/tunnels/{tid}", token="tunnel-viewer", expect=200)
    assert got.body == created.body
    # Tunnels have scopes of their own: reading sandboxes is not enough, and a viewer cannot revoke.
    assert (await tunnel_api.call("GET", f"/v1/tunnels/{tid}", token="reader", expect=403)).code == (
        "INSUFFICIENT_SCOPE"
    )
    await tunnel_api.call("DELETE", f"/v1/tunnels/{tid}", token="tunnel-viewer", expect=403)

    revoked = await tunnel_api.call("DELETE", f"/v1/tunnels/{tid}", expect=200)
    assert revoked.body["state"] == "revoked" and revoked.body["revoked_reason"] == "revoked"
    again = await tunnel_api.call("DELETE", f"/v1/tunnels/{tid}", expect=200)  # idempotent
    assert again.body["revoked_at"] == revoked.body["revoked_at"]
    assert not tunnels.alive(tunnels.get(tid))


async def test_tunnel_limits_and_errors(tunnel_api: Api) -> None:
    for port in (3000, 3001, 3002):
        await tunnel_api.call("POST", "/v1/sandboxes/agent-1/tunnels", {"port": port}, expect=201)
    over = await tunnel_api.call("POST", "/v1/sandboxes/agent-1/tunnels", {"port": 3003}, expect=409)
    assert over.code == "TOO_MANY_TUNNELS"
    missing = await tunnel_api.call("POST", "/v1/sandboxes/nope/tunnels", {"port": 1}, expect=404)
    assert missing.code == "SANDBOX_NOT_FOUND"
    assert (await tunnel_api.call("GET", "/v1/sandboxes/nope/tunnels", expect=404)).code == "SANDBOX_NOT_FOUND"
    assert (await tunnel_api.call("GET", "/v1/tunnels/aaaaaaaaaaaaaaaa", expect=404)).code == "TUNNEL_NOT_FOUND"
    for body, code, field in (
        ({"port": 0}, "INVALID_PORT", "port"),
        ({"port": True}, "INVALID_PORT", "port"),
        ({}, "MISSING_FIELD", "port"),
        ({"port": 80, "passwd": "x"}, "UNKNOWN_FIELD", "passwd"),
        ({"port": 80, "password": "short"}, "INVALID_PASSWORD", "password"),
        ({"port": 80, "ttl": 10**9}, "INVALID_TTL", "ttl"),
        ({"port": 80, "label": ""}, "INVALID_LABEL", "label"),
    ):
        answer = await tunnel_api.call("POST", "/v1/sandboxes/agent-1/tunnels", body, expect=400)
        assert (answer.code, answer.body["field"]) == (code, field), body
        assert "short" not in answer.body["message"]
    denied = await tunnel_api.call("POST", "/v1/sandboxes/agent-1/tunnels", {"port": 1}, token="reader", expect=403)
    assert denied.code == "INSUFFICIENT_SCOPE"


async def test_the_sandboxs_ingress_rules_decide_what_may_be_exposed(tunnel_api: Api, tunnels: TunnelStore) -> None:
    private = {**ALLOWLISTED, "id": "agent-2", "addresses": ["10.75.0.11"], "ingress": {"ports": [3000, 8080]}}
    await tunnel_api.call("POST", "/v1/sandboxes", private, expect=201)
    url = "/v1/sandboxes/agent-2/tunnels"
    # ingress.public_access is false (the default): no tunnel without a password.
    refused = await tunnel_api.call("POST", url, {"port": 3000}, expect=403)
    assert (refused.code, refused.body["field"]) == ("INGRESS_PASSWORD_REQUIRED", "password")
    # ingress.ports is set: only those ports, with or without a password.
    for body in ({"port": 3001, "password": "s3cret-password"}, {"port": 22, "password": "s3cret-password"}):
        assert (await tunnel_api.call("POST", url, body, expect=403)).code == "INGRESS_PORT_NOT_ALLOWED"
    assert tunnels.for_sandbox("agent-2") == []  # nothing was written
    created = await tunnel_api.call("POST", url, {"port": 8080, "password": "s3cret-password"}, expect=201)
    assert created.body["state"] == "active"
    # The record changes: the tunnel it no longer permits shows so (and stops serving: the tunnel tests).
    await tunnel_api.call("PUT", "/v1/sandboxes/agent-2", {**private, "ingress": {"ports": [3000]}}, expect=200)
    shown = await tunnel_api.call("GET", f"/v1/tunnels/{created.body['id']}", expect=200)
    assert shown.body["state"] == "ingress_denied"


async def test_deleting_a_sandbox_revokes_its_tunnels(tunnel_api: Api, tunnels: TunnelStore) -> None:
    created = await tunnel_api.call("POST", "/v1/sandboxes/agent-1/tunnels", {"port": 3000}, expect=201)
    await tunnel_api.call("DELETE", "/v1/sandboxes/agent-1", expect=204)
    tunnel = tunnels.get(created.body["id"])
    assert tunnel.revoked_reason == "sandbox_deleted" and not tunnels.alive(tunnel)
    # Recreating the sandbox under the same id does not bring the tunnel back.
    await tunnel_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    assert not tunnels.alive(tunnels.get(created.body["id"]))


async def test_tunnel_routes_are_503_without_the_tunnel_service(api: Api) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    answer = await api.call("POST", "/v1/sandboxes/agent-1/tunnels", {"port": 3000}, expect=503)
    assert answer.code == "TUNNELS_DISABLED"
    assert (await api.call("GET", "/v1/tunnels/aaaaaaaaaaaaaaaa", expect=503)).code == "TUNNELS_DISABLED"


def test_tunnel_example_bodies_pass_the_real_parser_and_their_schema() -> None:
    media = DOC["paths"]["/v1/sandboxes/{id}/tunnels"]["post"]["requestBody"]["content"]["application/json"]
    for example in media["examples"].values():
        parse_request(example["value"], default_ttl=3600, max_ttl=86400)
        schema_validator(media["schema"]).validate(example["value"])
    assert set(TUNNEL_EXAMPLES) == set(media["examples"])


# --------------------------------------------------------------------------- DNS query log


async def test_dns_query_log_of_a_sandbox(aiohttp_client: AiohttpClient, store: EmbeddedStore, config: Config) -> None:
    dns = DnsInterceptor(config.dns, lambda: store.state, upstreams=())
    api = Api(await aiohttp_client(create_app(store, **api_section(config), dns=dns)))
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    # A real query packet from the sandbox's address, for a name its policy does not allow (no upstream needed).
    query = DNSRecord.question("evil.example.net", "A").pack()
    answer = DNSRecord.parse(await dns.handle(query, ("10.75.0.10", 40000), ("198.51.100.53", 53), "udp"))
    assert answer.header.rcode == RCODE.NXDOMAIN

    log = await api.call("GET", "/v1/sandboxes/agent-1/dns-log", token="auditor", expect=200)
    (entry,) = log.body["queries"]
    seen = (entry["name"], entry["type"], entry["rcode"], entry["allowed"])
    assert seen == ("evil.example.net", "A", "NXDOMAIN", False)
    assert entry["reason"] == "blocked by sandbox policy: host not in allowlist"
    await api.call("GET", "/v1/sandboxes/agent-1/dns-log", token="reader", expect=403)  # needs audit:read
    assert (await api.call("GET", "/v1/sandboxes/nope/dns-log", expect=404)).code == "SANDBOX_NOT_FOUND"
    assert (await api.call("GET", "/v1/sandboxes/agent-1/dns-log?limit=0", expect=400)).code == "INVALID_PARAMETER"


async def test_dns_query_log_without_the_data_plane_is_503(api: Api) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    assert (await api.call("GET", "/v1/sandboxes/agent-1/dns-log", expect=503)).code == "DNS_DISABLED"


# --------------------------------------------------------------------------- hostile input (fuzzing classes)

#: Spellings that are not a plain decimal number in range: too long for int() (over 4,300 digits), signs,
#: fractions, exponents, NaN, non-ASCII digits, spaces, underscores, hexadecimal, empty.
NOT_DECIMAL = [
    "9" * 5000,
    "1" + "0" * 4400,
    "0" * 5000 + "1" * 30,
    "-1",
    "+443",
    "1.5",
    "443.0",
    "1e3",
    "NaN",
    "inf",
    "١٢٣",
    "４４３",
    "²",
    " 443",
    "443 ",
    "4_43",
    "0x1bb",
    "99999999999999999999999999",
]


@pytest.mark.parametrize("text", NOT_DECIMAL)
async def test_numeric_parameters_refuse_every_other_spelling_with_400(audit_api: Api, text: str) -> None:
    await audit_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    quoted = urllib.parse.quote(text)
    port = await audit_api.call("GET", f"/v1/sandboxes/agent-1/explain?host=a.example.com&port={quoted}")
    assert (port.status, port.code, port.body["field"]) == (400, "INVALID_PORT", "port")
    in_host = await audit_api.call("GET", f"/v1/sandboxes/agent-1/explain?host=a.example.com:{quoted}")
    assert (in_host.status, in_host.code) == (400, "INVALID_PORT")
    for name in ("since_us", "limit"):
        answer = await audit_api.call("GET", f"/v1/sandboxes/agent-1/audit-batches?{name}={quoted}")
        assert (answer.status, answer.code, answer.body["field"]) == (400, "INVALID_PARAMETER", name)
        assert len(answer.body["message"]) < 200  # a 5,000-digit value is not echoed whole


@pytest.mark.parametrize("text", ["443", "0443", "00000000000000000000443"])
async def test_leading_zeros_are_still_the_number(api: Api, text: str) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    answer = await api.call("GET", f"/v1/sandboxes/agent-1/explain?host=api.github.com&port={text}", expect=200)
    assert answer.body["request"]["port"] == 443


@pytest.mark.parametrize(
    "data",
    [
        b'{"id": "agent-9", "addresses": ["10.75.0.9"], "limits": {"bandwidth_mbit": ' + b"9" * 5000 + b"}}",
        b"[" + b"1" * 4301 + b"]",
        b"-" + b"1" * 10_000,
        b"[" * 1500 + b"]" * 1500,
        b'{"a":' * 1500 + b"1" + b"}" * 1500,
        b"[" * 200_000,
        b'{"id": "x", "id": "y"}',
        b'{"n": NaN}',
        b'{"n": -Infinity}',
        b"\xff\xfe{}",
        b'"\\ud800"',
        b"1e999999",
    ],
)
async def test_hostile_json_bodies_are_400_never_500(api: Api, store: EmbeddedStore, data: bytes) -> None:
    before = store.path.read_bytes()
    for method, path in (("POST", "/v1/sandboxes"), ("POST", "/v1/templates")):
        answer = await api.call(method, path, data=data)
        assert answer.status == 400, answer.body
        assert answer.code in ("INVALID_JSON", "INVALID_TYPE", "INVALID_FIELD", "UNKNOWN_FIELD"), answer.body
        assert len(answer.body["message"]) < 300
    assert store.path.read_bytes() == before


# --------------------------------------------------------------------------- policy diff (replay)

NARROWER = {"addresses": ["10.75.0.10"], "profile": "allowlisted", "egress": {"allow_hosts": ["api.github.com"]}}
HOUR_US = 3600 * 1_000_000


async def test_policy_diff_replays_the_window_against_the_candidate_and_applies_nothing(
    audit_api: Api, flows: FlowLog, store: EmbeddedStore
) -> None:
    await audit_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    now = now_us()
    old = {"hostname": "old.example.com", "rule": "allow_hosts *.example.com"}
    # One batch whose first record is before the window and whose later ones are in it (it is read too).
    flows.record(flow_record("agent-1", now - 3 * HOUR_US, **old))
    flows.record(flow_record("agent-1", now - HOUR_US // 2, hostname="docs.example.com", rule=old["rule"]))
    await flows.flush()
    flows.record(flow_record("agent-1", now - HOUR_US // 4))  # api.github.com: allowed before and after
    flows.record(flow_record("agent-1", now - 1000, hostname="docs.example.com", rule=old["rule"]))
    flows.record(flow_record("agent-1", now - 999, hostname="evil.test", verdict="deny", rule="default:deny"))
    flows.record(flow_record("agent-1", now - 998, hostname=None, dst_port=22, orig_dst_port=22, protocol="tcp",
                             verdict="deny", rule="builtin:metadata"))  # fmt: skip
    await flows.flush()
    before = (store.path.read_bytes(), (await audit_api.call("GET", "/v1/sandboxes/agent-1/policy")).body)
    batches = (await audit_api.call("GET", "/v1/sandboxes/agent-1/audit-batches")).body

    diff = (await audit_api.call("POST", "/v1/sandboxes/agent-1/policy/diff?since=1h", NARROWER, token="auditor",
                                 expect=200)).body  # fmt: skip
    assert [(g["name"], g["port"], g["protocol"], g["count"]) for g in diff["newly_denied"]] == [
        ("docs.example.com", 443, "tls", 2)
    ]
    denied = diff["newly_denied"][0]
    assert (denied["rule"], denied["recorded_rule"], denied["verdict"]) == ("default:deny", old["rule"], "deny")
    assert denied["first_seen_us"] == now - HOUR_US // 2 and denied["last_seen_us"] == now - 1000
    assert (diff["records"], diff["replayed"], diff["unchanged_allowed"], diff["unchanged_denied"]) == (5, 4, 1, 1)
    assert [(s["why"], s["rule"], s["count"]) for s in diff["not_replayed"]] == [("guard", "builtin:metadata", 1)]
    assert diff["policy"]["egress"]["allow_hosts"] == ["api.github.com"] and diff["newly_allowed"] == []

    whole_day = (await audit_api.call("POST", "/v1/sandboxes/agent-1/policy/diff", NARROWER, expect=200)).body
    assert [(g["name"], g["count"]) for g in whole_day["newly_denied"]] == [
        ("docs.example.com", 2),
        ("old.example.com", 1),
    ]
    assert store.path.read_bytes() == before[0]
    assert (await audit_api.call("GET", "/v1/sandboxes/agent-1/policy")).body == before[1]
    assert (await audit_api.call("GET", "/v1/sandboxes/agent-1/audit-batches")).body == batches


@pytest.mark.parametrize(
    ("query", "body", "status", "code", "field"),
    [
        ("?since=0h", NARROWER, 400, "INVALID_PARAMETER", "since"),
        ("?since=24", NARROWER, 400, "INVALID_PARAMETER", "since"),
        ("?since=31d", NARROWER, 400, "INVALID_PARAMETER", "since"),
        ("?since_us=1", NARROWER, 400, "UNKNOWN_PARAMETER", "since_us"),
        ("", {**NARROWER, "egress": {"allow_hosts": ["https://x"]}}, 400, "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
        ("", {**NARROWER, "profile": "unrestricted"}, 409, "PROFILE_IMMUTABLE", "profile"),
        ("", {**NARROWER, "template": "nope"}, 400, "TEMPLATE_NOT_FOUND", "template"),
        ("", {**NARROWER, "id": "other"}, 400, "ID_MISMATCH", "id"),
        ("", [], 400, "INVALID_TYPE", ""),
    ],
)
async def test_policy_diff_refuses_what_a_put_would_refuse_and_changes_nothing(
    audit_api: Api, flows: FlowLog, store: EmbeddedStore, query: str, body: Any, status: int, code: str, field: str
) -> None:
    await audit_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    before = store.path.read_bytes()
    answer = await audit_api.call("POST", f"/v1/sandboxes/agent-1/policy/diff{query}", body, expect=status)
    assert (answer.code, answer.body["field"]) == (code, field)
    assert store.path.read_bytes() == before


async def test_policy_diff_needs_audit_read_a_sandbox_and_a_flow_log(audit_api: Api, api: Api) -> None:
    await audit_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    refused = await audit_api.call("POST", "/v1/sandboxes/agent-1/policy/diff", NARROWER, token="reader", expect=403)
    assert refused.code == "INSUFFICIENT_SCOPE"
    ghost = await audit_api.call("POST", "/v1/sandboxes/ghost/policy/diff", NARROWER, expect=404)
    assert ghost.code == "SANDBOX_NOT_FOUND"
    quiet = (await audit_api.call("POST", "/v1/sandboxes/agent-1/policy/diff", NARROWER, expect=200)).body
    assert (quiet["records"], quiet["newly_denied"], quiet["not_replayed"]) == (0, [], [])
    without = await api.call("POST", "/v1/sandboxes/agent-1/policy/diff", NARROWER, expect=503)
    assert without.code == "AUDIT_DISABLED"
    # One replay at a time: while one runs, another is refused, not queued.
    async with audit_api.client.server.app[REPLAY_LOCK_KEY]:
        busy = await audit_api.call("POST", "/v1/sandboxes/agent-1/policy/diff", NARROWER, expect=503)
    assert busy.code == "REPLAY_BUSY"
    await audit_api.call("POST", "/v1/sandboxes/agent-1/policy/diff", NARROWER, expect=200)


# --------------------------------------------------------------------------- policy suggest


async def test_policy_suggest_answers_a_record_a_put_takes_that_newly_denies_nothing(
    audit_api: Api, flows: FlowLog, store: EmbeddedStore
) -> None:
    await audit_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    now = now_us()
    flows.record(
        flow_record("agent-1", now - 3 * HOUR_US, hostname="old.example.com", rule="allow_hosts *.example.com")
    )
    flows.record(
        flow_record("agent-1", now - HOUR_US // 2, hostname="docs.example.com", rule="allow_hosts *.example.com")
    )
    flows.record(
        flow_record(
            "agent-1",
            now - 1000,
            hostname="new.test",
            dst_port=8443,
            orig_dst_port=8443,
            verdict="deny",
            rule="default:deny",
        )
    )
    flows.record(flow_record("agent-1", now - 998, hostname=None, dst_port=22, orig_dst_port=22, protocol="tcp",
                             verdict="deny", rule="builtin:metadata"))  # fmt: skip
    await flows.flush()
    before = (store.path.read_bytes(), (await audit_api.call("GET", "/v1/sandboxes/agent-1")).body)

    answer = (await audit_api.call("GET", "/v1/sandboxes/agent-1/policy/suggest?since=1h", token="auditor",
                                   expect=200)).body  # fmt: skip
    assert [(e["entry"], e["records"], e["denied_records"]) for e in answer["entries"]] == [
        ("docs.example.com", 1, 0),
        ("new.test:8443", 1, 1),
    ]
    assert (answer["records"], answer["covered_records"]) == (3, 2)  # old.example.com is before the window
    assert [(e["why"], e["rule"], e["count"]) for e in answer["excluded"]] == [("guard", "builtin:metadata", 1)]
    record = answer["record"]
    assert record["egress"]["allow_hosts"] == ["docs.example.com", "new.test:8443"]
    # The record as stored, but for what it suggests (and the revision a GET adds: the record is a candidate).
    kept = {k: v for k, v in before[1].items() if k not in ("egress", "revision")}
    assert {k: v for k, v in record.items() if k != "egress"} == kept
    assert (store.path.read_bytes(), (await audit_api.call("GET", "/v1/sandboxes/agent-1")).body) == before

    # Tried, then applied, as the README says: the diff denies nothing it used; the PUT takes the record.
    diff = (await audit_api.call("POST", "/v1/sandboxes/agent-1/policy/diff?since=1h", record, expect=200)).body
    assert diff["newly_denied"] == [] and [g["name"] for g in diff["newly_allowed"]] == ["new.test"]
    await audit_api.call("PUT", "/v1/sandboxes/agent-1", record, expect=200)


async def test_policy_suggest_needs_audit_read_a_sandbox_an_allowlist_and_a_flow_log(audit_api: Api, api: Api) -> None:
    await audit_api.call("POST", "/v1/sandboxes", ALLOWLISTED, expect=201)
    path = "/v1/sandboxes/agent-1/policy/suggest"
    assert (await audit_api.call("GET", path, token="reader", expect=403)).code == "INSUFFICIENT_SCOPE"
    assert (await audit_api.call("GET", "/v1/sandboxes/ghost/policy/suggest", expect=404)).code == "SANDBOX_NOT_FOUND"
    for query, code in (("?since=31d", "INVALID_PARAMETER"), ("?since=", "INVALID_PARAMETER"),
                        ("?window=1h", "UNKNOWN_PARAMETER")):  # fmt: skip
        assert (await audit_api.call("GET", path + query, expect=400)).code == code
    quiet = (await audit_api.call("GET", path, expect=200)).body
    assert (quiet["records"], quiet["entries"], quiet["record"]["egress"]["allow_hosts"]) == (0, [], [])
    assert (await api.call("GET", path, expect=503)).code == "AUDIT_DISABLED"
    async with audit_api.client.server.app[REPLAY_LOCK_KEY]:
        assert (await audit_api.call("GET", path, expect=503)).code == "REPLAY_BUSY"
    await audit_api.call("POST", "/v1/sandboxes", {"id": "reg-1", "addresses": ["10.75.0.11"], "profile": "registry"},
                         expect=201)  # fmt: skip
    refused = await audit_api.call("GET", "/v1/sandboxes/reg-1/policy/suggest", expect=409)
    assert refused.code == "SUGGEST_NOT_APPLICABLE" and "profile registry" in refused.body["message"]


async def test_batches_since_reads_the_window_and_the_batch_before_it(flows: FlowLog, tmp_path: Path) -> None:
    assert list(flows.batches_since("agent-1", 0)) == []  # no batches yet: nothing, no error
    await _write_batches(flows, "agent-1", 4)  # batches first written at T0, T0+1000, T0+2000, T0+3000
    (flows.dir / "agent-1" / ".tmp-1-1.ndjson").write_text("not a batch\n")

    def firsts(since_us: int) -> list[int]:
        return [json.loads(body.splitlines()[0])["end_us"] for body in flows.batches_since("agent-1", since_us)]

    assert firsts(0) == [T0, T0 + 1000, T0 + 2000, T0 + 3000]
    assert firsts(T0 + 1500) == [T0 + 1000, T0 + 2000, T0 + 3000]  # the one before may hold later records
    assert firsts(T0 + 2000) == [T0 + 1000, T0 + 2000, T0 + 3000]
    assert firsts(T0 + 10_000) == [T0 + 3000]  # all before: the last may still hold some
    with pytest.raises(GatewayError) as caught:
        list(flows.batches_since("../x", 0))
    assert caught.value.code == "INVALID_ID"


# --------------------------------------------------------------------------- revisions


async def test_revisions_are_listed_and_the_previous_one_restored(api: Api, store: EmbeddedStore) -> None:
    created = await api.call("POST", "/v1/sandboxes", ALLOWLISTED, token="writer", expect=201)
    first = created.headers["X-Gateway-Revision"]
    narrowed = {**ALLOWLISTED, "egress": {"allow_hosts": ["api.github.com"]}}
    replaced = await api.call("PUT", "/v1/sandboxes/agent-1", narrowed, token="writer", expect=200)
    second = replaced.body["revision"]
    assert second == replaced.headers["X-Gateway-Revision"] != first

    listed = (await api.call("GET", "/v1/sandboxes/agent-1/revisions", token="reader", expect=200)).body
    assert listed["revision"] == second
    assert [(r["revision"], r["source"]) for r in listed["revisions"]] == [(second, "api"), (first, "api")]
    assert listed["revisions"][1]["record"]["egress"] == ALLOWLISTED["egress"]
    explained = await api.call("GET", "/v1/sandboxes/agent-1/explain?host=api.github.com", token="reader")
    assert explained.body["policy"]["revision"] == second

    restored = await api.call("POST", "/v1/sandboxes/agent-1/restore", {}, token="writer", expect=200)
    assert restored.headers["X-Gateway-Restored-Revision"] == first == restored.headers["X-Gateway-Revision"]
    assert restored.headers["X-Gateway-Cut-Flows"] == "0"
    assert restored.body["egress"] == ALLOWLISTED["egress"] and restored.body["revision"] == first
    assert store.state.compiled["agent-1"].revision == first
    by_id = await api.call("POST", "/v1/sandboxes/agent-1/restore", {"revision": second}, token="writer", expect=200)
    assert by_id.body["revision"] == second
    await api.call("POST", "/v1/sandboxes/agent-1/restore", {}, token="reader", expect=403)


async def test_restore_refuses_what_it_cannot_restore(api: Api) -> None:
    await api.call("POST", "/v1/sandboxes", ALLOWLISTED, token="writer", expect=201)
    cases: list[tuple[Any, int, str]] = [
        ({}, 404, "REVISION_NOT_FOUND"),  # no previous revision yet
        ({"revision": "r000000000000"}, 404, "REVISION_NOT_FOUND"),
        ({"revision": "R000000000000"}, 400, "INVALID_REVISION"),
        ({"revision": "r0"}, 400, "INVALID_REVISION"),
        ({"revision": 5}, 400, "INVALID_REVISION"),
        ({"revision": ["r000000000000"]}, 400, "INVALID_REVISION"),
        ({"revisoin": "r000000000000"}, 400, "UNKNOWN_FIELD"),
        (["r000000000000"], 400, "INVALID_TYPE"),
    ]
    for body, status, code in cases:
        answer = await api.call("POST", "/v1/sandboxes/agent-1/restore", body, token="writer", expect=status)
        assert answer.body["code"] == code, body
    missing = await api.call("POST", "/v1/sandboxes/nobody/restore", {}, token="writer", expect=404)
    assert missing.body["code"] == "SANDBOX_NOT_FOUND"
    await api.call("GET", "/v1/sandboxes/nobody/revisions", token="reader", expect=404)


async def test_a_record_sent_back_with_its_revision_is_a_precondition(api: Api) -> None:
    created = await api.call("POST", "/v1/sandboxes", {**ALLOWLISTED, "revision": "r000000000000"}, expect=201)
    read = (await api.call("GET", "/v1/sandboxes/agent-1", token="reader", expect=200)).body
    assert read["revision"] == created.body["revision"]  # the one a POST carried is ignored
    changed = await api.call("PUT", "/v1/sandboxes/agent-1", {**read, "labels": {"v": "1"}}, expect=200)
    stale = await api.call("PUT", "/v1/sandboxes/agent-1", {**read, "labels": {"v": "2"}}, expect=409)
    assert stale.body["code"] == "REVISION_CONFLICT" and stale.body["field"] == "revision"
    patch = {"labels": {"v": "3"}, "revision": read["revision"]}
    assert (await api.call("PATCH", "/v1/sandboxes/agent-1", patch, expect=409)).body["code"] == "REVISION_CONFLICT"
    patch["revision"] = changed.body["revision"]
    assert (await api.call("PATCH", "/v1/sandboxes/agent-1", patch, expect=200)).body["labels"] == {"v": "3"}
    bad = await api.call("PUT", "/v1/sandboxes/agent-1", {**read, "revision": "latest"}, expect=400)
    assert bad.body["code"] == "INVALID_REVISION"


# --------------------------------------------------------------------------- tokens limited to sandboxes

MINE, THEIRS = "tenant-a-1", "other"


def _tenant_record(sandbox_id: str, address: str, **more: Any) -> dict[str, Any]:
    return {**ALLOWLISTED, "id": sandbox_id, "addresses": [address], "ingress": {"public_access": True}, **more}


@pytest.fixture
async def scoped_api(
    aiohttp_client: AiohttpClient, store: EmbeddedStore, config: Config, flows: FlowLog, tunnels: TunnelStore
) -> Api:
    """Every route class served (flow log, tunnels, DNS log), with one sandbox in the tenant's scope and one out of
    it, each with a batch and a tunnel."""
    dns = DnsInterceptor(config.dns, lambda: store.state, upstreams=())
    app = create_app(store, **api_section(config), flows=flows, tunnels=tunnels, dns=dns)
    api = Api(await aiohttp_client(app))
    for sandbox_id, address in ((MINE, "10.75.0.21"), (THEIRS, "10.75.0.22")):
        await api.call("POST", "/v1/sandboxes", _tenant_record(sandbox_id, address), expect=201)
        await api.call("POST", f"/v1/sandboxes/{sandbox_id}/tunnels", {"port": 3000}, expect=201)
        flows.record(flow_record(sandbox_id, now_us()))
        await flows.flush()
    return api


def _sandbox_routes() -> list[RouteSpec]:
    """Every route that names a sandbox in its path, the delete last (it removes the record)."""
    specs = [spec for spec in route_specs() if spec.path.startswith("/v1/sandboxes/{id}")]
    return sorted(specs, key=lambda spec: spec.path == "/v1/sandboxes/{id}" and spec.method == "DELETE")


def _as_seen(answer: Answer, sandbox_id: str) -> tuple[int, Any]:
    return answer.status, json.loads(json.dumps(answer.body).replace(sandbox_id, "<id>"))


async def test_a_sandbox_outside_the_tokens_scope_answers_exactly_as_a_missing_one_on_every_route(
    scoped_api: Api, store: EmbeddedStore, flows: FlowLog
) -> None:
    """Driven by the route table: a route added under /v1/sandboxes/{id} is covered without being listed here."""
    batch = (await scoped_api.call("GET", f"/v1/sandboxes/{THEIRS}/audit-batches", expect=200)).body["batches"][0]
    before = store.state.sandboxes
    routes = _sandbox_routes()
    assert len(routes) >= 15  # get/put/patch/delete, policy, explain, diff, suggest, revisions, restore, ...
    for spec in routes:
        path = spec.path.replace("{name}", batch["name"])
        body = {} if spec.method in ("POST", "PUT", "PATCH") else None
        query = "?host=api.github.com" if spec.path.endswith("/explain") else ""
        hidden = await scoped_api.call(spec.method, path.replace("{id}", THEIRS) + query, body, token="tenant")
        missing = await scoped_api.call(spec.method, path.replace("{id}", "nobody") + query, body, token="admin")
        assert _as_seen(hidden, THEIRS) == _as_seen(missing, "nobody"), (spec.method, spec.path, hidden.body)
        assert hidden.code == "SANDBOX_NOT_FOUND", (spec.method, spec.path)
    assert store.state.sandboxes == before  # nothing the scoped token did out of its scope changed anything
    # ... and in its scope each route finds the sandbox (the batch of MINE: a name of its own).
    mine = (await scoped_api.call("GET", f"/v1/sandboxes/{MINE}/audit-batches", token="tenant")).body["batches"][0]
    for spec in routes:
        path = spec.path.replace("{name}", mine["name"]).replace("{id}", MINE)
        body = {"port": 3000} if spec.path.endswith("/tunnels") else None
        if spec.method in ("PUT", "PATCH"):
            body = {"egress": {"allow_hosts": ["pypi.org"]}, "ingress": {"public_access": True}}
            body = {**_tenant_record(MINE, "10.75.0.21"), **body} if spec.method == "PUT" else body
            body.pop("id", None)
        elif spec.method == "POST" and body is None:
            body = {} if spec.path.endswith("/restore") else {k: v for k, v in ALLOWLISTED.items() if k != "id"}
        query = "?host=api.github.com" if spec.path.endswith("/explain") else ""
        answer = await scoped_api.call(spec.method, path + query, body, token="tenant")
        assert answer.status < 300, (spec.method, spec.path, answer.status, answer.body)
    assert MINE not in store.state.sandboxes and THEIRS in store.state.sandboxes  # the delete came last


async def test_a_scoped_token_lists_and_creates_only_its_sandboxes(scoped_api: Api, store: EmbeddedStore) -> None:
    listed = await scoped_api.call("GET", "/v1/sandboxes", token="tenant", expect=200)
    assert [s["id"] for s in listed.body["sandboxes"]] == [MINE]
    everything = await scoped_api.call("GET", "/v1/sandboxes", expect=200)
    assert [s["id"] for s in everything.body["sandboxes"]] == [THEIRS, MINE]
    before = store.state.sandboxes
    for record in (
        _tenant_record("tenant-b-1", "10.75.0.30"),
        {"id": "tenant-b-1", "addresses": "not a list", "bogus": 1},  # 403 before the 400 validation would give
        {"addresses": ["10.75.0.30"]},  # no id: not one of its sandboxes either
        {"id": ["tenant-a-2"], "addresses": ["10.75.0.30"]},
        _tenant_record(MINE + "0", "10.75.0.30", private_links=[THEIRS]),
        _tenant_record(MINE + "0", "10.75.0.30", private_links=[{"source": "ci-42"}, {"source": THEIRS}]),
    ):
        refused = await scoped_api.call("POST", "/v1/sandboxes", record, token="tenant", expect=403)
        assert refused.code == "SANDBOX_OUT_OF_SCOPE", refused.body
        assert refused.body["field"] in ("id", "private_links[0]", "private_links[1]"), refused.body
    assert store.state.sandboxes == before
    for changed in ("PUT", "PATCH"):
        record = {k: v for k, v in _tenant_record(MINE, "10.75.0.21", private_links=[THEIRS]).items() if k != "id"}
        refused = await scoped_api.call(changed, f"/v1/sandboxes/{MINE}", record, token="tenant", expect=403)
        assert (refused.code, refused.body["field"]) == ("SANDBOX_OUT_OF_SCOPE", "private_links[0]")
    assert store.state.sandboxes == before
    await scoped_api.call("POST", "/v1/sandboxes", _tenant_record("ci-42", "10.75.0.31"), token="tenant", expect=201)
    linked = _tenant_record("tenant-a-2", "10.75.0.32", private_links=[MINE, {"source": "ci-42", "ports": [22]}])
    await scoped_api.call("POST", "/v1/sandboxes", linked, token="tenant", expect=201)
    listed = await scoped_api.call("GET", "/v1/sandboxes", token="tenant", expect=200)
    assert [s["id"] for s in listed.body["sandboxes"]] == ["ci-42", MINE, "tenant-a-2"]
    # Templates are readable; the status, which describes the whole gateway, is not.
    await scoped_api.call("GET", "/v1/templates", token="tenant", expect=200)
    status = await scoped_api.call("GET", "/v1/status", token="tenant", expect=403)
    assert status.code == "GATEWAY_WIDE_ROUTE"
    await scoped_api.call("GET", "/v1/status", expect=200)


async def test_a_scoped_token_finds_only_its_sandboxes_denials_and_tunnels(
    scoped_api: Api, flows: FlowLog, config: Config, tmp_path: Path, tunnels: TunnelStore
) -> None:
    ids = {sandbox_id: new_denial_id() for sandbox_id in (MINE, THEIRS)}
    for sandbox_id, denial_id in ids.items():
        flows.record(flow_record(sandbox_id, now_us(), verdict="deny", rule="default:deny", denial_id=denial_id))
    await flows.flush()
    unknown = new_denial_id()
    later = FlowLog(msgspec.structs.replace(config.audit, dir=tmp_path / "audit"))  # nothing in memory: the batches
    for lookup in (flows.denial, later.denial):
        assert lookup(ids[THEIRS]).sandbox == THEIRS
        with pytest.raises(GatewayError) as hidden:
            lookup(ids[THEIRS], lambda sandbox_id: sandbox_id == MINE)
        assert hidden.value.code == "DENIAL_NOT_FOUND"
        assert lookup(ids[MINE], lambda sandbox_id: sandbox_id == MINE).sandbox == MINE
    found = await scoped_api.call("GET", f"/v1/denials/{ids[MINE]}", token="tenant", expect=200)
    assert found.body["sandbox"] == MINE
    hidden_answer = await scoped_api.call("GET", f"/v1/denials/{ids[THEIRS]}", token="tenant", expect=404)
    missing = await scoped_api.call("GET", f"/v1/denials/{unknown}", token="tenant", expect=404)
    assert _as_seen(hidden_answer, ids[THEIRS]) == _as_seen(missing, unknown)
    await scoped_api.call("GET", f"/v1/denials/{ids[THEIRS]}", token="auditor", expect=200)

    by_sandbox = {t.sandbox: t.id for t in tunnels.tunnels.values()}
    own = await scoped_api.call("GET", f"/v1/tunnels/{by_sandbox[MINE]}", token="tenant", expect=200)
    assert own.body["sandbox"] == MINE
    for method in ("GET", "DELETE"):
        hidden_tunnel = await scoped_api.call(method, f"/v1/tunnels/{by_sandbox[THEIRS]}", token="tenant", expect=404)
        no_tunnel = await scoped_api.call(method, "/v1/tunnels/aaaaaaaaaaaaaaaa", token="tenant", expect=404)
        assert _as_seen(hidden_tunnel, by_sandbox[THEIRS]) == _as_seen(no_tunnel, "aaaaaaaaaaaaaaaa")
    assert tunnels.get(by_sandbox[THEIRS]).revoked_at is None  # the refused revoke changed nothing
    revoked = await scoped_api.call("DELETE", f"/v1/tunnels/{by_sandbox[MINE]}", token="tenant", expect=200)
    assert revoked.body["state"] != "active"


async def test_a_scoped_tokens_flow_stream_carries_only_its_sandboxes_records(scoped_api: Api, flows: FlowLog) -> None:
    auth = {"Authorization": f"Bearer {TOKENS['tenant'][0]}"}
    everything = await scoped_api.client.get("/v1/flows/stream", headers=auth)
    theirs = await scoped_api.client.get(f"/v1/flows/stream?sandbox={THEIRS}", headers=auth)
    nobody = await scoped_api.client.get("/v1/flows/stream?sandbox=nobody", headers=auth)
    assert [r.status for r in (everything, theirs, nobody)] == [200, 200, 200]  # as for a sandbox that is unknown
    assert await wait_until_async(lambda: len(flows._subscribers) == 3)
    flows.record(flow_record(THEIRS, T0 + 1, verdict="deny"))
    flows.record(flow_record(MINE, T0 + 2, verdict="deny"))
    line = await asyncio.wait_for(everything.content.readline(), 5)
    assert json.loads(line) == flow_record(MINE, T0 + 2, verdict="deny").to_dict()  # THEIRS' record was left out
    # Offered synchronously: a view out of the token's scope holds nothing, as one of an unknown sandbox.
    assert {len(s.lines) for s in flows._subscribers} == {0}
    for response in (everything, theirs, nobody):
        response.close()


async def test_a_scoped_token_is_not_told_other_sandboxes_ids_and_restores_no_link_from_them(
    scoped_api: Api, store: EmbeddedStore
) -> None:
    taken = _tenant_record("tenant-a-2", "10.75.0.22")  # THEIRS' address
    hidden = await scoped_api.call("POST", "/v1/sandboxes", taken, token="tenant", expect=409)
    assert (hidden.code, hidden.body["field"]) == ("ADDRESS_IN_USE", "addresses[0]")
    assert hidden.body["message"] == "10.75.0.22 belongs to another sandbox"
    await scoped_api.call("POST", "/v1/sandboxes", _tenant_record("ci-42", "10.75.0.23"), expect=201)
    mine_taken = await scoped_api.call("POST", "/v1/sandboxes", {**taken, "addresses": ["10.75.0.23"]}, token="tenant")
    assert mine_taken.status == 409 and "'ci-42'" in mine_taken.body["message"]  # one it may see is named
    shown = await scoped_api.call("POST", "/v1/sandboxes", taken, expect=409)
    assert f"{THEIRS!r}" in shown.body["message"]
    # A full token linked THEIRS into MINE, then took the link away: restoring that revision would re-open it.
    linked = {k: v for k, v in _tenant_record(MINE, "10.75.0.21", private_links=[THEIRS]).items() if k != "id"}
    await scoped_api.call("PUT", f"/v1/sandboxes/{MINE}", linked, expect=200)
    await scoped_api.call("PATCH", f"/v1/sandboxes/{MINE}", {"private_links": None}, token="tenant", expect=200)
    before = store.state.sandboxes[MINE]
    refused = await scoped_api.call("POST", f"/v1/sandboxes/{MINE}/restore", {}, token="tenant", expect=403)
    assert (refused.code, refused.body["field"]) == ("SANDBOX_OUT_OF_SCOPE", "private_links[0]")
    assert store.state.sandboxes[MINE] == before
    restored = await scoped_api.call("POST", f"/v1/sandboxes/{MINE}/restore", {}, expect=200)
    assert restored.body["private_links"][0]["source"] == THEIRS
