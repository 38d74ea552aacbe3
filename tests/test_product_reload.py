"""SIGHUP reloads `gateway run`'s configuration file: live options (API tokens, log level) apply at once, a
changed restart-only option (the API port) is logged and keeps its running value, an invalid file changes
nothing and logs its error code."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

from tests.factory import ADMIN_TOKEN, LIMITED_TOKEN, start_server, wait_until
from tests.netns import log_events
from tests.product import ProductApi

NEW_TOKEN = "reloaded-admin-token-0123456789"


def _status(url: str, token: str) -> int:
    request = urllib.request.Request(f"{url}/v1/sandboxes", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_sighup_applies_live_options_keeps_restart_only_ones_and_refuses_an_invalid_file(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        assert _status(server.url, ADMIN_TOKEN) == 200
        text = server.config.read_text()
        port = server.url.rsplit(":", 1)[1]
        changed = text.replace(ADMIN_TOKEN, NEW_TOKEN).replace(f"port = {port}", "port = 1")
        server.config.write_text(changed.replace('format = "json"', 'format = "json"\nlevel = "debug"'))
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: log_events(server.stderr, "config.reloaded"))
        assert _status(server.url, NEW_TOKEN) == 200  # the API still on its running port
        assert _status(server.url, ADMIN_TOKEN) == 401
        reloaded = log_events(server.stderr, "config.reloaded")[0]
        assert set(reloaded["applied"]) == {"api.tokens", "log.level"}
        assert [e["option"] for e in log_events(server.stderr, "config.restart_needed")] == ["api.port"]
        # An invalid file: nothing changes, the error is logged with its code.
        server.config.write_text(changed.replace('format = "json"', 'format = "json"\nlevel = "loud"'))
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: log_events(server.stderr, "config.reload_failed"))
        assert log_events(server.stderr, "config.reload_failed")[0]["code"] == "CONFIG_INVALID"
        assert _status(server.url, NEW_TOKEN) == 200
        assert _status(server.url, LIMITED_TOKEN) == 200
        assert len(log_events(server.stderr, "config.reloaded")) == 1
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0


def test_sighup_carries_a_tokens_sandboxes_and_an_invalid_scope_keeps_the_last_good_tokens(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        ops, ci = ProductApi(server.url, ADMIN_TOKEN), ProductApi(server.url, LIMITED_TOKEN)
        for index, sandbox_id in enumerate(("tenant-a-1", "other"), start=1):
            ops.call("POST", "/v1/sandboxes", {"id": sandbox_id, "addresses": [f"10.75.0.{index}"]}, expect=201)

        def listed() -> list[str]:
            return [s["id"] for s in ci.call("GET", "/v1/sandboxes", expect=200).body["sandboxes"]]

        assert listed() == ["other", "tenant-a-1"]
        text = server.config.read_text()
        ci_entry = 'scopes = ["sandboxes:read", "sandboxes:write"] }'
        assert ci_entry in text
        scoped = text.replace(ci_entry, ci_entry[:-1] + ', sandboxes = ["tenant-a-*"] }')
        server.config.write_text(scoped)
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: log_events(server.stderr, "config.reloaded"))
        assert listed() == ["tenant-a-1"]
        assert ci.call("GET", "/v1/sandboxes/other", expect=404).code == "SANDBOX_NOT_FOUND"
        # A pattern with a `*` inside is refused at load: the file is invalid, the running tokens stay.
        server.config.write_text(scoped.replace('sandboxes = ["tenant-a-*"]', 'sandboxes = ["tenant-a-*", "x*y"]'))
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: log_events(server.stderr, "config.reload_failed"))
        failed = log_events(server.stderr, "config.reload_failed")[0]
        assert failed["code"] == "CONFIG_INVALID" and "api.tokens[1].sandboxes[1]" in str(failed), failed
        assert listed() == ["tenant-a-1"]
        assert len(ops.call("GET", "/v1/sandboxes", expect=200).body["sandboxes"]) == 2
    finally:
        assert server.stop() == 0
