"""`gateway audit list|get` and `gateway policy suggest` against a real API server (in this process) with a real
flow log on disk."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.api import create_app
from gateway.cli import main
from gateway.clibase import EXIT_API_ERROR, EXIT_OK, EXIT_USAGE
from gateway.flowlog import FlowLog, FlowRecord, now_us
from gateway.settings import load_config
from gateway.stores.embedded import EmbeddedStore

TOKEN = "audit-cli-token-0123456789"
T0 = 1_700_000_000_000_000
AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]


def record(end_us: int) -> FlowRecord:
    return FlowRecord(
        start_us=end_us - 10,
        end_us=end_us,
        sandbox="sb-1",
        src_addr="10.75.0.5",
        src_port=50000,
        dst_addr="198.51.100.7",
        dst_port=443,
        orig_dst_addr="198.51.100.7",
        orig_dst_port=443,
        hostname="pypi.org",
        protocol="tls",
        bytes_up=10,
        bytes_down=20,
        duration_ms=0.01,
        verdict="allow",
        reason="allowed by policy",
        rule="allow_hosts pypi.org",
    )


@pytest.fixture
async def server(aiohttp_server: AiohttpServer, tmp_path: Path) -> AsyncIterator[tuple[str, FlowLog]]:
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(
        f'[store]\nbackend = "embedded"\npath = "{tmp_path / "p.json"}"\n'
        f'[api]\ntokens = [{{ name = "auditor", token = "{TOKEN}", scopes = ["audit:read"] }}]\n'
    )
    # sb-1's record (its batches would outlive it), for `policy suggest`.
    sandbox = {
        "id": "sb-1",
        "addresses": ["10.75.0.5"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["pypi.org"]},
    }
    (tmp_path / "p.json").write_text(json.dumps({"templates": {}, "sandboxes": {"sb-1": sandbox}}))
    config = load_config(config_path, environ={})
    store = EmbeddedStore(config.policy_context(), msgspec.structs.replace(config.store, poll_interval=0.05))
    await store.start()
    flows = FlowLog(msgspec.structs.replace(config.audit, dir=tmp_path / "audit", flush_interval=3600.0))
    await flows.start()
    for i in range(5):
        flows.record(record(T0 + i * 1000))
        await flows.flush()
    srv = await aiohttp_server(
        create_app(
            store,
            host=config.api.host,
            port=config.api.port,
            tokens=config.api.tokens,
            flows=flows,
        )
    )
    yield str(srv.make_url("")).rstrip("/"), flows
    await flows.close()
    await store.close()


async def gateway(url: str, *args: str) -> int:
    # main() is synchronous (urllib): run it off the loop that serves the API.
    return await asyncio.to_thread(main, ["--api", url, "--token", TOKEN, *args])


async def test_audit_list_pages_and_all(server: tuple[str, FlowLog], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = server
    assert await gateway(url, "audit", "list", "sb-1", "--limit", "2") == EXIT_OK
    out = capsys.readouterr().out
    assert out.count(".ndjson") == 2 and "more batches follow" in out
    assert "2023-11-14T22:13:20.000+00:00" in out  # T0 as UTC

    assert await gateway(url, "--json", "audit", "list", "sb-1", "--limit", "2", "--all") == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert [b["first_ts_us"] for b in listed["batches"]] == [T0 + i * 1000 for i in range(5)]
    assert listed["next_continuation_token"] is None

    assert await gateway(url, "--json", "audit", "list", "sb-1", "--since-us", str(T0 + 3000)) == EXIT_OK
    assert len(json.loads(capsys.readouterr().out)["batches"]) == 2


async def test_audit_get_prints_the_ndjson(server: tuple[str, FlowLog], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = server
    name = f"{T0 + 4000:016d}-{os.getpid()}.ndjson"
    assert await gateway(url, "audit", "get", "sb-1", name) == EXIT_OK
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line) == record(T0 + 4000).to_dict()


async def test_audit_errors_exit_1_with_the_code(
    server: tuple[str, FlowLog], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = server
    assert await gateway(url, "audit", "get", "sb-1", "1111111111111111-1.ndjson") == EXIT_API_ERROR
    assert capsys.readouterr().err.startswith("BATCH_NOT_FOUND:")
    assert await gateway(url, "audit", "list", "nobody") == EXIT_API_ERROR
    assert capsys.readouterr().err.startswith("SANDBOX_NOT_FOUND:")
    assert await gateway(url, "audit", "get", "sb-1", "../p.json") == EXIT_API_ERROR
    assert capsys.readouterr().err.startswith("INVALID_BATCH_NAME:")


async def test_policy_suggest_prints_the_entries_and_writes_the_record(
    server: tuple[str, FlowLog], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, flows = server
    denied = dataclasses.replace(
        record(now_us()), hostname="files.pythonhosted.org", verdict="deny", rule="default:deny"
    )
    flows.record(denied)
    flows.record(record(now_us()))
    await flows.flush()
    path = tmp_path / "sb-1.json"
    assert await gateway(url, "policy", "suggest", "sb-1", "--since", "1h", "--write", str(path)) == EXIT_OK
    shown = capsys.readouterr().out
    assert shown.startswith("sandbox sb-1: 2 records since ") and f"the record is in {path}" in shown
    (row,) = [line for line in shown.splitlines() if line.startswith("files.pythonhosted.org ")]
    assert row.split()[1:6] == ["allow_hosts", "1", "1", "443", "files.pythonhosted.org"]
    assert "gateway sandbox update sb-1 --file FILE" in shown and "None" not in shown
    written = json.loads(path.read_text())
    assert written["egress"]["allow_hosts"] == ["files.pythonhosted.org", "pypi.org"]

    assert await gateway(url, "--json", "policy", "suggest", "sb-1", "--since", "1h") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["record"] == written
    nowhere = tmp_path / "missing" / "x.json"
    assert await gateway(url, "policy", "suggest", "sb-1", "--write", str(nowhere)) == EXIT_USAGE
    assert capsys.readouterr().err.startswith(f"cannot write {nowhere}: No such file or directory")
    assert await gateway(url, "policy", "suggest", "sb-1", "--since", "99y") == EXIT_API_ERROR
    assert capsys.readouterr().err.startswith("INVALID_PARAMETER:")
