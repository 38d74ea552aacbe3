"""Policy revisions: content ids, the bounded history, where it is kept (embedded store) and restoring."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.decision import DEFAULT_LIMITS
from gateway.errors import GatewayError
from gateway.presets import BUILTIN_PRESETS
from gateway.revisions import HISTORY_SIZE, REVISION_PATTERN, Revision, RevisionHistory, revision_id
from gateway.state import SANDBOX, PolicyContext, PolicyState
from gateway.stores.config import StoreConfig
from gateway.stores.embedded import EmbeddedStore, revisions_path

CONTEXT = PolicyContext((ipaddress.ip_network("10.75.0.0/16"),), BUILTIN_PRESETS, DEFAULT_LIMITS)


def record(sid: str = "a", address: str = "10.75.0.2", **fields: Any) -> dict[str, Any]:
    return {"id": sid, "addresses": [address], "profile": "allowlisted", **fields}


def put(state: PolicyState, raw: dict[str, Any]) -> str:
    sandbox = state.parse_sandbox(raw)
    state.check_sandbox(sandbox, create=None)
    state.set_sandbox(sandbox)
    return state.compiled[sandbox.id].revision


def put_template(state: PolicyState, raw: dict[str, Any]) -> None:
    state.set_template(state.parse_template(raw))


def revisions(state: PolicyState, sid: str = "a") -> list[str]:
    return [entry.revision for entry in state.history.entries(sid)]


# --------------------------------------------------------------------------- ids


def test_revision_id_is_a_content_id_independent_of_key_order_and_spelling() -> None:
    state = PolicyState(CONTEXT)
    first = put(state, record(egress={"allow_hosts": ["API.Example.com.", "b.example.com"]}, labels={"x": "1"}))
    assert REVISION_PATTERN.fullmatch(first)
    reordered = {"labels": {"x": "1"}, "egress": {"allow_hosts": ["api.example.com", "b.example.com"]}}
    assert put(state, {**dict(reversed(list(record().items()))), **reordered}) == first  # same record, other spelling
    assert revisions(state) == [first]  # accepting it again is not a new revision
    assert revision_id({"b": 1, "a": 2}, None) == revision_id({"a": 2, "b": 1}, None)
    assert revision_id({"a": 1}, None) != revision_id({"a": 1}, {"name": "t"})


def test_every_change_of_the_record_is_a_new_revision() -> None:
    state = PolicyState(CONTEXT)
    ids = {put(state, record(egress={"allow_hosts": [host]})) for host in ("a.com", "b.com")}
    ids.add(put(state, record(egress={"allow_hosts": ["b.com"]}, labels={"owner": "ana"})))  # labels too
    assert len(ids) == 3


def test_a_template_change_is_a_new_revision_of_each_sandbox_using_it() -> None:
    state = PolicyState(CONTEXT)
    put_template(state, {"name": "t", "egress": {"allow_hosts": ["a.com"]}})
    before = {sid: put(state, record(sid, f"10.75.0.{n}", template="t")) for n, sid in ((2, "a"), (3, "b"))}
    untouched = put(state, record("c", "10.75.0.4"))
    put_template(state, {"name": "t", "egress": {"allow_hosts": ["b.com"]}})
    for sid in ("a", "b"):
        now = state.compiled[sid].revision
        assert now != before[sid]
        assert revisions(state, sid) == [now, before[sid]]
        assert state.history.current(sid).template == "t"  # type: ignore[union-attr]
    assert revisions(state, "c") == [untouched]


def test_two_states_name_the_same_records_the_same_way_whatever_the_order() -> None:
    template = {"name": "t", "egress": {"presets": ["git-hosts"]}}
    sandboxes = {"a": record("a", template="t"), "b": record("b", "10.75.0.3", egress={"allow_hosts": ["x.org"]})}
    one, two = PolicyState(CONTEXT), PolicyState(CONTEXT)
    one.replace_all({"t": template}, sandboxes)
    put_template(two, template)
    for sid in ("b", "a"):
        two.apply_external(SANDBOX, sid, json.loads(json.dumps(sandboxes[sid], sort_keys=True)))
    assert {sid: p.revision for sid, p in one.compiled.items()} == {sid: p.revision for sid, p in two.compiled.items()}


def test_the_compiled_policy_carries_its_revision_into_the_effective_policy() -> None:
    state = PolicyState(CONTEXT)
    revision = put(state, record())
    assert state.compiled["a"].describe()["revision"] == revision
    assert state.candidate("a", record(egress={"allow_hosts": ["z.com"]})).revision not in ("", revision)


# --------------------------------------------------------------------------- history


def test_history_is_bounded_newest_first_and_deduplicated() -> None:
    state = PolicyState(CONTEXT)
    ids = [put(state, record(egress={"allow_hosts": [f"h{n}.com"]})) for n in range(HISTORY_SIZE + 5)]
    assert revisions(state) == ids[::-1][:HISTORY_SIZE]
    again = put(state, record(egress={"allow_hosts": ["h20.com"]}))  # accepted again: moves to the front
    assert again == ids[20]
    listed = revisions(state)
    assert listed[0] == again and listed.count(again) == 1 and len(listed) == HISTORY_SIZE


def test_history_names_the_source_and_goes_with_the_sandbox() -> None:
    state = PolicyState(CONTEXT, external_source="redis")
    put(state, record())
    state.apply_external(SANDBOX, "a", record(labels={"by": "other"}))
    assert [e.source for e in state.history.entries("a")] == ["redis", "api"]
    state.apply_external(SANDBOX, "a", None)
    assert state.history.entries("a") == []
    put(state, record())
    assert [e.source for e in state.history.entries("a")] == ["api"]  # a new sandbox under the old id starts afresh


def test_a_rejected_record_is_no_revision() -> None:
    state = PolicyState(CONTEXT)
    first = put(state, record())
    rejection = state.apply_external(SANDBOX, "a", record(egress={"allow_hosts": ["https://x"]}))
    assert rejection is not None
    assert revisions(state) == [first]


def test_find_restores_by_id_or_the_previous_and_refuses_the_rest() -> None:
    state = PolicyState(CONTEXT)
    first = put(state, record())
    with pytest.raises(GatewayError) as no_previous:
        state.history.find("a", None)
    assert no_previous.value.code == "REVISION_NOT_FOUND" and no_previous.value.status == 404
    second = put(state, record(labels={"x": "1"}))
    assert state.history.find("a", None).revision == first
    assert state.history.find("a", second).record == state.sandboxes["a"].to_dict()
    for unknown in ("r000000000000", first.upper()):
        with pytest.raises(GatewayError) as missing:
            state.history.find("a", unknown)
        assert missing.value.code == "REVISION_NOT_FOUND"


def test_loading_a_damaged_history_keeps_what_can_be_read() -> None:
    good = Revision("r0123456789ab", 1.0, "api", record(), None).to_dict()
    history = RevisionHistory()
    skipped = history.load(
        {
            "a": [good, {**good, "revision": "nope"}, {**good, "source": "mars"}, {**good, "at": True}, good, 7],
            "b": "not a list",
            "c": [{**good, "record": []}, {**good, "template": 5}],
        }
    )
    assert skipped == 7
    assert [e.revision for e in history.entries("a")] == ["r0123456789ab"]
    assert history.entries("b") == history.entries("c") == []
    assert RevisionHistory().load([]) == 1


# --------------------------------------------------------------------------- the embedded store keeps it


def store_at(path: Path, context: PolicyContext = CONTEXT) -> EmbeddedStore:
    return EmbeddedStore(context, StoreConfig(path=path, poll_interval=0.05))


async def test_the_embedded_store_keeps_the_history_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    store = store_at(path)
    await store.start()
    await store.create_sandbox(record())
    first = store.state.compiled["a"].revision
    await store.replace_sandbox("a", record(egress={"allow_hosts": ["a.com"]}))
    second = store.state.compiled["a"].revision
    await store.close()
    saved = json.loads(revisions_path(path).read_text())
    assert [e["revision"] for e in saved["a"]] == [second, first]

    # A hand edit while no gateway runs is a revision of the file's, found at the next start.
    data = json.loads(path.read_text())
    data["sandboxes"]["a"]["labels"] = {"edited": "by-hand"}
    path.write_text(json.dumps(data))
    again = store_at(path)
    await again.start()
    try:
        entries = again.state.history.entries("a")
        assert [e.revision for e in entries][1:] == [second, first]
        assert entries[0].source == "file" and entries[0].record["labels"] == {"edited": "by-hand"}
        restored = await again.restore_sandbox("a", None)
        assert restored.revision == second == again.state.compiled["a"].revision
        assert json.loads(path.read_text())["sandboxes"]["a"]["egress"] == {"allow_hosts": ["a.com"]}
        assert [e.revision for e in again.state.history.entries("a")][:2] == [second, entries[0].revision]
    finally:
        await again.close()


async def test_a_sandbox_removed_while_no_gateway_ran_loses_its_history(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    store = store_at(path)
    await store.start()
    await store.create_sandbox(record())
    await store.create_sandbox(record("b", "10.75.0.3"))
    await store.close()
    data = json.loads(path.read_text())
    del data["sandboxes"]["b"]
    path.write_text(json.dumps(data))
    again = store_at(path)
    await again.start()
    await again.close()
    assert set(json.loads(revisions_path(path).read_text())) == {"a"}


async def test_an_unreadable_history_file_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    revisions_path(path).write_text("{not json")
    store = store_at(path)
    await store.start()
    try:
        await store.create_sandbox(record())
        assert len(json.loads(revisions_path(path).read_text())["a"]) == 1
    finally:
        await store.close()


async def test_restore_goes_through_the_checks_of_a_replace(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    store = store_at(path)
    await store.start()
    try:
        await store.create_sandbox(record())
        first = store.state.compiled["a"].revision
        with pytest.raises(GatewayError) as unknown:
            await store.restore_sandbox("a", "r000000000000")
        assert unknown.value.code == "REVISION_NOT_FOUND"
        with pytest.raises(GatewayError) as absent:
            await store.restore_sandbox("zz", None)
        assert absent.value.code == "SANDBOX_NOT_FOUND"
        # The history holds a record of another profile (the sandbox was deleted and created again while the
        # history was kept: a restart in between): the normal replace refuses it.
        registry = Revision("r0000000000aa", 1.0, "file", {**record(), "profile": "registry"}, None)
        store.state.history.add("a", registry)
        store.state.history.add("a", store.state.history.entries("a")[1])
        with pytest.raises(GatewayError) as immutable:
            await store.restore_sandbox("a", registry.revision)
        assert immutable.value.code == "PROFILE_IMMUTABLE"
        # Another sandbox holds its address now.
        await store.replace_sandbox("a", record(address="10.75.0.9"))
        await store.create_sandbox(record("b", "10.75.0.2"))
        with pytest.raises(GatewayError) as taken:
            await store.restore_sandbox("a", first)
        assert taken.value.code == "ADDRESS_IN_USE"
        assert store.state.sandboxes["a"].addresses[0] == ipaddress.ip_address("10.75.0.9")  # nothing changed
    finally:
        await store.close()


async def test_a_replace_carrying_a_stale_revision_is_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path / "policies.json")
    await store.start()
    try:
        await store.create_sandbox(record())
        read_at = store.state.compiled["a"].revision
        await store.replace_sandbox("a", record(labels={"x": "1"}), revision=read_at)
        with pytest.raises(GatewayError) as stale:
            await store.replace_sandbox("a", record(labels={"x": "2"}), revision=read_at)
        assert stale.value.code == "REVISION_CONFLICT" and stale.value.status == 409
        assert store.state.sandboxes["a"].labels == {"x": "1"}
    finally:
        await store.close()


async def test_a_workers_store_writes_no_history(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    main, worker = (
        store_at(path),
        EmbeddedStore(CONTEXT, StoreConfig(path=path, poll_interval=0.05), keeps_history=False),
    )
    await main.start()
    await worker.start()
    try:
        await main.create_sandbox(record())
        saved = revisions_path(path).read_text()
        worker._reload()  # what its watcher does once the file changed: it reads the API's write back
        assert worker.state.compiled["a"].revision == main.state.compiled["a"].revision
        assert revisions_path(path).read_text() == saved
        assert json.loads(saved)["a"][0]["source"] == "api"
    finally:
        await worker.close()
        await main.close()
