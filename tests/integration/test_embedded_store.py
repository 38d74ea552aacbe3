"""The embedded store against a real file: API writes, hand edits, bad edits, restarts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.settings import load_config
from gateway.stores.config import StoreConfig
from gateway.stores.embedded import EmbeddedStore
from tests.factory import wait_until_async

CONTEXT = load_config(environ={}).policy_context()
SANDBOX = {
    "id": "sb-1",
    "addresses": ["10.75.0.10"],
    "profile": "allowlisted",
    "egress": {"allow_hosts": ["api.example.com"]},
}


def allowed(store: EmbeddedStore, host: str) -> bool:
    verdict, _ = store.state.explain("sb-1", host, "203.0.113.5", 443, "tls")
    return verdict.allowed


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EmbeddedStore]:
    instance = EmbeddedStore(CONTEXT, StoreConfig(path=tmp_path / "policies.json", poll_interval=0.05))
    await instance.start()
    yield instance
    await instance.close()


def edit(path: Path, mutate: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


async def test_start_creates_an_empty_file_and_writes_persist_across_restart(store: EmbeddedStore) -> None:
    assert json.loads(store.path.read_text()) == {"sandboxes": {}, "templates": {}}
    await store.put_template("base", {"egress": {"presets": ["ai-apis"]}}, create=True)
    await store.create_sandbox({**SANDBOX, "template": "base"})
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    await store.close()

    again = EmbeddedStore(CONTEXT, StoreConfig(path=store.path, poll_interval=0.05))
    await again.start()
    try:
        assert again.state.get_sandbox("sb-1").template == "base"
        assert allowed(again, "api.example.com")
        assert allowed(again, "api.openai.com")  # inherited from the template (sandbox sets no presets)
        assert not allowed(again, "evil.example.net")
    finally:
        await again.close()


async def test_hand_edit_is_applied_without_restart(store: EmbeddedStore) -> None:
    await store.create_sandbox(SANDBOX)
    edit(store.path, lambda d: d["sandboxes"]["sb-1"]["egress"].update(allow_hosts=["new.example.com"]))
    assert await wait_until_async(lambda: allowed(store, "new.example.com"))
    assert not allowed(store, "api.example.com")


async def test_broken_file_keeps_last_good_policy_and_refuses_api_writes(store: EmbeddedStore) -> None:
    await store.create_sandbox(SANDBOX)
    store.path.write_text('{"sandboxes": {"sb-1": ')  # truncated by a bad editor save
    assert await wait_until_async(store.rejections)
    (rejection,) = store.rejections()
    assert rejection.error.code == "POLICY_FILE_INVALID"
    assert "not valid JSON" in rejection.error.message
    assert allowed(store, "api.example.com")  # last good policy still decides

    with pytest.raises(GatewayError) as refused:
        await store.create_sandbox({**SANDBOX, "id": "sb-2", "addresses": ["10.75.0.11"]})
    assert refused.value.code == "POLICY_FILE_INVALID"
    assert refused.value.status == 503
    assert "sb-2" not in store.state.sandboxes

    store.path.write_text(json.dumps({"sandboxes": {"sb-1": {**SANDBOX, "egress": {"allow_hosts": ["b.example"]}}}}))
    assert await wait_until_async(lambda: not store.rejections())
    assert allowed(store, "b.example")


async def test_one_invalid_record_keeps_its_last_good_version_while_others_apply(store: EmbeddedStore) -> None:
    await store.create_sandbox(SANDBOX)
    await store.create_sandbox({**SANDBOX, "id": "sb-2", "addresses": ["10.75.0.11"]})

    def mutate(data: dict) -> None:
        data["sandboxes"]["sb-1"]["egress"]["allow_hosts"] = ["https://api.example.com"]  # a URL: invalid
        data["sandboxes"]["sb-2"]["egress"]["allow_hosts"] = ["other.example.com"]

    edit(store.path, mutate)
    assert await wait_until_async(store.rejections)
    (rejection,) = store.rejections()
    assert (rejection.kind, rejection.key, rejection.error.code) == ("sandbox", "sb-1", "INVALID_HOSTNAME")
    assert rejection.error.field == "egress.allow_hosts[0]"
    assert allowed(store, "api.example.com")
    verdict, _ = store.state.explain("sb-2", "other.example.com", "203.0.113.5", 443, "tls")
    assert verdict.allowed
    assert store.status()["rejected"][0]["code"] == "INVALID_HOSTNAME"


async def test_profile_change_by_hand_is_rejected(store: EmbeddedStore) -> None:
    await store.create_sandbox(SANDBOX)
    edit(store.path, lambda d: d["sandboxes"]["sb-1"].update(profile="unrestricted", egress={}))
    assert await wait_until_async(store.rejections)
    assert store.rejections()[0].error.code == "PROFILE_IMMUTABLE"
    assert store.state.get_sandbox("sb-1").profile == "allowlisted"


async def test_removing_a_template_still_in_use_by_hand_is_rejected(store: EmbeddedStore) -> None:
    await store.put_template("base", {"egress": {"presets": ["ai-apis"]}}, create=True)
    await store.create_sandbox({**SANDBOX, "template": "base"})
    edit(store.path, lambda d: d["templates"].clear())
    assert await wait_until_async(store.rejections)
    assert store.rejections()[0].error.code == "TEMPLATE_IN_USE"
    assert allowed(store, "api.openai.com")


async def test_api_write_keeps_other_records_exactly_as_written_in_the_file(store: EmbeddedStore) -> None:
    await store.create_sandbox(SANDBOX)
    edit(store.path, lambda d: d["sandboxes"]["sb-1"].update(profile="registry"))  # rejected edit
    assert await wait_until_async(store.rejections)
    await store.create_sandbox({**SANDBOX, "id": "sb-2", "addresses": ["10.75.0.11"]})
    on_disk = json.loads(store.path.read_text())
    assert on_disk["sandboxes"]["sb-1"]["profile"] == "registry"  # the operator's edit is not overwritten
    assert "sb-2" in on_disk["sandboxes"]


async def test_deleting_a_sandbox_removes_it_from_the_file(store: EmbeddedStore) -> None:
    await store.create_sandbox(SANDBOX)
    await store.delete_sandbox("sb-1")
    assert json.loads(store.path.read_text())["sandboxes"] == {}
    assert store.state.policy_for_address("10.75.0.10") is None


async def test_a_failed_file_write_is_a_503_and_changes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    store = EmbeddedStore(CONTEXT, StoreConfig(path=folder / "policies.json", poll_interval=60))
    await store.start()
    try:
        (folder / "policies.json").unlink()
        folder.rmdir()
        folder.write_text("")  # a file where the folder was: the write cannot create its temp file
        with pytest.raises(GatewayError) as failed:
            await store.create_sandbox(SANDBOX)
        assert (failed.value.code, failed.value.status) == ("STORE_WRITE_FAILED", 503)
        assert "sb-1" not in store.state.sandboxes
    finally:
        await store.close()
