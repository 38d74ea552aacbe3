"""Hostile input through the product: `gateway run` as a subprocess, driven over real HTTP and through its
policy file, as an operator (or an attacker who can write to what the gateway reads) would."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.factory import ADMIN_TOKEN, Server, start_server, wait_until


def call(server: Server, method: str, path: str, data: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    return status, json.loads(text) if text else None


def stderr_of(server: Server) -> str:
    return server.stderr.read_text(errors="replace")


# --------------------------------------------------------------------------- the API


def test_hostile_numbers_and_bodies_are_400_and_leave_no_traceback(server: Server) -> None:
    record = {"id": "h1", "addresses": ["10.75.3.1"], "profile": "allowlisted", "egress": {"allow_hosts": ["a.com"]}}
    assert call(server, "POST", "/v1/sandboxes", json.dumps(record).encode())[0] == 201
    long_number = "9" * 5000
    for data in (
        b'{"id": "h2", "addresses": ["10.75.3.2"], "limits": {"bandwidth_mbit": ' + long_number.encode() + b"}}",
        b"[" * 1500 + b"]" * 1500,
        b"\xff",
    ):
        status, body = call(server, "POST", "/v1/sandboxes", data)
        assert (status, body["code"]) == (400, "INVALID_JSON"), body
    for path, code in (
        (f"/v1/sandboxes/h1/explain?host=a.com&port={long_number}", "INVALID_PORT"),
        (f"/v1/sandboxes/h1/explain?host=a.com:{long_number}", "INVALID_PORT"),
        (f"/v1/sandboxes/h1/explain?host=a.com&port={urllib.parse.quote('١٢٣')}", "INVALID_PORT"),
        (f"/v1/sandboxes/h1/audit-batches?since_us={long_number}", "INVALID_PARAMETER"),
        ("/v1/sandboxes/h1/audit-batches?since_us=-1", "INVALID_PARAMETER"),
        ("/v1/sandboxes/h1/audit-batches?limit=%2B5", "INVALID_PARAMETER"),
    ):
        status, body = call(server, "GET", path)
        assert (status, body["code"]) == (400, code), (path[:80], body)

    # Malformed requests aiohttp refuses itself: a 400 and one warning line each, no traceback.
    host, port = urllib.parse.urlsplit(server.url).hostname, urllib.parse.urlsplit(server.url).port
    for raw in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ):
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(raw)
            answer = sock.recv(4096)
        assert answer.split(b" ", 2)[1] == b"400", (raw, answer[:100])
    assert call(server, "GET", "/v1/status")[0] == 200  # the server took it all in its stride
    assert wait_until(lambda: stderr_of(server).count('"api.malformed_request"') >= 4, 10), (
        "timed out waiting for the malformed-request log lines"
    )
    log = stderr_of(server)
    assert "Traceback" not in log and "api.internal_error" not in log


# --------------------------------------------------------------------------- the policy file


def _record(hosts: list[str]) -> dict[str, Any]:
    return {"id": "pf", "addresses": ["10.75.4.1"], "profile": "allowlisted", "egress": {"allow_hosts": hosts}}


def _write_policies(path: Path, hosts: list[str]) -> None:
    path.write_text(json.dumps({"templates": {}, "sandboxes": {"pf": _record(hosts)}}))


def _allowed(server: Server, host: str) -> bool:
    status, body = call(server, "GET", f"/v1/sandboxes/pf/explain?host={host}")
    return status == 200 and bool(body["allowed"])


def _file_rejection(server: Server) -> dict[str, Any] | None:
    rejected = call(server, "GET", "/v1/status")[1]["rejected"]
    return next((r for r in rejected if r["kind"] == "file"), None)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


HOSTILE_CONTENTS: dict[str, Callable[[Path], object]] = {
    "integer of 5,000 digits": lambda p: p.write_text('{"sandboxes": {"x": {"n": ' + "1" * 5000 + "}}}"),
    "nested 1,500 levels": lambda p: p.write_text('{"templates": ' + "[" * 1500 + "]" * 1500 + "}"),
    "nested 200,000 levels": lambda p: p.write_text("[" * 200_000),
    "not UTF-8": lambda p: p.write_bytes(b'{"sandboxes": {"\xff\xfe": {}}}'),
    "duplicate keys": lambda p: p.write_text('{"sandboxes": {}, "sandboxes": {}}'),
    "NaN": lambda p: p.write_text('{"sandboxes": {"x": {"n": NaN}}}'),
    "a directory": _directory,
    "a named pipe": _fifo,
    "removed": lambda p: p.unlink(),
}


def _restore_file(path: Path) -> None:
    if path.is_dir():
        path.rmdir()
    elif path.exists() and not path.is_file():
        path.unlink()


def test_the_policy_file_watcher_survives_any_content_and_applies_later_tightenings(server: Server) -> None:
    path = server.config.parent / "policies.json"
    _write_policies(path, ["a.example.com", "b.example.com"])
    assert wait_until(lambda: _allowed(server, "b.example.com"), 10), "timed out waiting for the first edit"
    allowed = ["a.example.com", "b.example.com"]
    for name, spoil in HOSTILE_CONTENTS.items():
        spoil(path)
        assert wait_until(lambda: _file_rejection(server) is not None, 10), (
            f"timed out waiting for the rejection of {name}"
        )
        rejection = _file_rejection(server)
        assert rejection is not None and rejection["code"] == "POLICY_FILE_INVALID", (name, rejection)
        assert "the last good policies stay in force" in rejection["message"] and len(rejection["message"]) < 400
        assert _allowed(server, allowed[-1]), f"{name}: the last good policy must stay in force"
        # An API write would overwrite the operator's file: refused until the file is fixed.
        status, body = call(server, "DELETE", "/v1/sandboxes/pf")
        assert (status, body["code"]) == (503, "POLICY_FILE_INVALID"), name
        # A later valid edit, here a tightening, is applied: the watcher is still watching.
        _restore_file(path)
        allowed = allowed[:-1] if len(allowed) > 1 else ["c.example.com"]
        _write_policies(path, allowed)
        revoked = {"a.example.com", "b.example.com", "c.example.com"} - set(allowed)
        assert wait_until(lambda: _file_rejection(server) is None, 10), f"timed out waiting for the edit after {name}"
        assert _allowed(server, allowed[-1]) and not any(_allowed(server, h) for h in revoked), name
    log = stderr_of(server)
    assert "Traceback" not in log, log[-3000:]
    assert server.process.poll() is None


@pytest.mark.parametrize("name", ["integer of 5,000 digits", "nested 1,500 levels", "a directory"])
def test_gateway_run_starts_on_a_hostile_policy_file_and_shows_why(tmp_path: Path, name: str) -> None:
    path = tmp_path / "policies.json"
    path.write_text("{}")
    HOSTILE_CONTENTS[name](path)
    server = start_server(tmp_path)
    try:
        rejection = _file_rejection(server)
        assert rejection is not None and rejection["code"] == "POLICY_FILE_INVALID"
        _restore_file(path)
        _write_policies(path, ["a.example.com"])
        assert wait_until(lambda: _file_rejection(server) is None and _allowed(server, "a.example.com"), 10), (
            "timed out waiting for the fixed file"
        )
    finally:
        server.stop()
    assert "Traceback" not in stderr_of(server)
