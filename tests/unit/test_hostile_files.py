"""Every file the gateway watches survives whatever is put in its place: a directory, a named pipe (which
would block a plain open), a file too large for memory, content no parser expects. The last good version
stays in force and the next good file is read. (The policy file is tested through `gateway run` in
tests/test_hostile_input.py.)"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.destinations import Destinations
from gateway.dns.blocklist import DomainBlocklist
from gateway.files import read_regular_file
from gateway.settings import load_config
from gateway.state import PolicyState
from gateway.tunnel.config import TunnelConfig
from gateway.tunnel.store import FileTunnelStore
from gateway.untrusted import InvalidJson, parse_decimal, parse_json
from tests.factory import wait_until_async


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _restore(path: Path) -> None:
    if path.is_dir():
        path.rmdir()
    elif path.exists():
        path.unlink()


SPOILERS: dict[str, Callable[[Path], object]] = {
    "directory": _directory,
    "named pipe": _fifo,
    "removed": lambda p: p.unlink(),
    "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe\x00garbage\n" * 100),
}


def test_read_regular_file_refuses_what_is_not_a_regular_file_of_bounded_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(path, 100) == b"x" * 100
    with pytest.raises(OSError, match="larger than 99 bytes"):
        read_regular_file(path, 99)
    _fifo(path)
    with pytest.raises(OSError, match="not a regular file"):  # and it returns at once: opened non-blocking
        read_regular_file(path)
    _restore(path)
    path.mkdir()
    with pytest.raises(OSError, match="not a regular file"):
        read_regular_file(path)


@pytest.mark.parametrize(
    "text",
    ["1" * 5000, "[" * 100_000, "[" * 1500 + "]" * 1500, '{"a": 1, "a": 2}', "NaN", '{"x": -Infinity}', "{"],
)
def test_parse_json_turns_every_failure_into_invalid_json(text: str) -> None:
    for data in (text, text.encode()):
        with pytest.raises(InvalidJson) as caught:
            parse_json(data)
        assert caught.value.code == "INVALID_JSON" and isinstance(caught.value, ValueError)
        assert "set_int_max_str_digits" not in caught.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("65535", 65535), ("065535", 65535), ("65536", None), ("9" * 5000, None), ("-1", None),
     ("+1", None), ("1.0", None), ("١", None), (" 1", None), ("1_0", None), ("", None)],
)  # fmt: skip
def test_parse_decimal(text: str, expected: int | None) -> None:
    assert parse_decimal(text, 0, 65535) == expected


@pytest.mark.parametrize("name", SPOILERS)
def test_the_operator_blocklist_keeps_its_last_list(tmp_path: Path, name: str) -> None:
    path = tmp_path / "block.txt"
    path.write_text("203.0.113.0/24\n")
    public = [ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("198.51.100.0/24")]
    dest = Destinations(public, blocklist_path=path)
    assert dest.check("203.0.113.9") is not None
    SPOILERS[name](path)
    dest.reload_blocklist()
    refusal = dest.check("203.0.113.9")  # returns (no blocking on a pipe), and the decision still stands
    if name in ("directory", "named pipe"):
        assert refusal is not None and refusal.kind == "blocklist"
    _restore(path)
    path.write_text("198.51.100.0/24\n")
    assert dest.reload_blocklist()
    assert dest.check("203.0.113.9") is None and dest.check(ipaddress.ip_address("198.51.100.1")) is not None


@pytest.mark.parametrize("name", SPOILERS)
def test_the_malware_domain_list_keeps_its_last_list(tmp_path: Path, name: str) -> None:
    path = tmp_path / "malware.txt"
    path.write_text("bad.example\n")
    now = [0.0]
    blocklist = DomainBlocklist(path, check_interval=1.0, clock=lambda: now[0])
    assert blocklist.match("x.bad.example") == ("bad.example", 1)
    SPOILERS[name](path)
    now[0] += 10
    blocklist.maybe_reload()
    result = blocklist.match("x.bad.example")
    if name != "not UTF-8":
        assert result == ("bad.example", 1) and blocklist.error
    _restore(path)
    path.write_text("worse.example\n")
    now[0] += 10
    blocklist.maybe_reload()
    assert blocklist.match("x.bad.example") is None and blocklist.match("worse.example") is not None


#: A revoked tunnel (revoked within RETENTION): one the store keeps showing and its maintenance leaves alone.
TUNNEL = {
    "id": "t" * 16,
    "sandbox": "sb1",
    "address": "10.75.0.2",
    "port": 8080,
    "created_at": time.time() - 60,
    "expires_at": time.time() + 3600,
    "revoked_at": time.time() - 30,
    "revoked_reason": "deleted",
}


@pytest.mark.parametrize(
    "spoil",
    [
        lambda p: p.write_text('{"tunnels": {"x": ' + "1" * 5000 + "}}"),
        lambda p: p.write_text('{"tunnels": ' + "[" * 1500 + "]" * 1500 + "}"),
        lambda p: p.write_bytes(b"\xff\xfe"),
        _directory,
        _fifo,
    ],
    ids=["long integer", "deep nesting", "not UTF-8", "directory", "named pipe"],
)
async def test_the_tunnel_file_keeps_its_last_tunnels(tmp_path: Path, spoil: Callable[[Path], None]) -> None:
    policy = PolicyState(load_config(None, environ={}).policy_context())
    path = tmp_path / "tunnels.json"
    store = FileTunnelStore(policy, TunnelConfig(poll_interval=0.01), path)
    path.write_text(json.dumps({"tunnels": {TUNNEL["id"]: TUNNEL}, "sessions": {}}))
    with structlog.testing.capture_logs() as logs:
        await store.start()
        try:
            last_good = dict(store.tunnels)
            assert list(last_good) == [TUNNEL["id"]]
            spoil(path)
            # The store's own poll meets the spoiled file and refuses it, saying so (it neither raises nor blocks).
            assert await wait_until_async(
                lambda: [e for e in logs if e["log_level"] == "error" and e.get("path") == str(path)]
            ), logs
            assert store.tunnels == last_good
            # ... and goes on following the file: the next good one is read.
            _restore(path)
            path.write_text(json.dumps({"tunnels": {}, "sessions": {}}))
            assert await wait_until_async(lambda: not store.tunnels), store.tunnels
        finally:
            await store.close()


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30) | st.from_regex(r"\A[0-9]{1,6000}\Z") | st.integers().map(str))
def test_parse_decimal_never_raises_and_agrees_with_int_on_plain_digits(text: str) -> None:
    value = parse_decimal(text, 1, 65535)
    plain = text.isascii() and text.isdigit()
    if plain and len(text.lstrip("0")) <= 5 and 1 <= int(text) <= 65535:
        assert value == int(text)
    else:
        assert value is None


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_parse_json_reads_what_json_writes_and_refuses_the_rest_with_one_error(value: object) -> None:
    text = json.dumps(value)
    assert parse_json(text) == value
    for spoiled in (text[:-1], text + "]", "[" * 5000 + text, text.replace("1", "1" * 5000, 1)):
        with contextlib.suppress(InvalidJson):  # any other exception fails the test
            parse_json(spoiled)
