"""`gateway.client.ApiClient` (the typed client platform services use) against a real API in this process."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.api import create_app
from gateway.client import ApiClient, ApiError, ApiUnreachable, api_url
from gateway.settings import load_config
from gateway.stores.embedded import EmbeddedStore

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def client(aiohttp_server: AiohttpServer, tmp_path: Path) -> AsyncIterator[ApiClient]:
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(f'[store]\nbackend = "embedded"\npath = "{tmp_path / "p.json"}"\n')
    config = load_config(config_path, environ={})
    store = EmbeddedStore(config.policy_context(), msgspec.structs.replace(config.store, poll_interval=0.05))
    await store.start()
    server = await aiohttp_server(
        create_app(store, host=config.api.host, port=config.api.port, tokens=config.api.tokens)
    )
    yield ApiClient(str(server.make_url("")), token=None)
    await store.close()


async def test_typed_methods_drive_the_routes(client: ApiClient) -> None:
    # The client is synchronous (urllib): call it off the loop that serves the API.
    created = await asyncio.to_thread(client.create_sandbox, {"id": "sb-1", "addresses": ["10.75.0.9"]})
    assert created.status == 201 and created.data["id"] == "sb-1"
    listed = await asyncio.to_thread(client.list_sandboxes)
    assert [s["id"] for s in listed.data["sandboxes"]] == ["sb-1"]
    patched = await asyncio.to_thread(client.patch_sandbox, "sb-1", {"labels": {"team": "a"}})
    assert patched.data["labels"] == {"team": "a"}
    verdict = await asyncio.to_thread(client.explain, "sb-1", host="example.com", port="443")
    assert verdict.data["allowed"] is False and verdict.data["request"]["host"] == "example.com"
    assert (await asyncio.to_thread(client.status)).data["sandboxes"] == 1
    assert (await asyncio.to_thread(client.delete_sandbox, "sb-1")).status in (200, 204)
    assert (await asyncio.to_thread(client.list_sandboxes)).data["sandboxes"] == []


async def test_an_id_is_one_path_segment_and_errors_carry_the_api_code(client: ApiClient) -> None:
    with pytest.raises(ApiError) as info:
        await asyncio.to_thread(client.get_sandbox, "../templates")  # percent-encoded: not the templates route
    assert info.value.response.status == 404
    assert info.value.describe().startswith("SANDBOX_NOT_FOUND: ")


def test_no_answer_is_api_unreachable_naming_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: the connection is refused
        url = api_url("0.0.0.0", port)
        assert url == f"http://127.0.0.1:{port}"
        with pytest.raises(ApiUnreachable) as info:
            ApiClient(url, token="t", timeout=5).presets()
    assert info.value.why == "connection refused"
    assert info.value.message.startswith(f"UNREACHABLE: cannot reach the gateway API at {url}: connection refused")
