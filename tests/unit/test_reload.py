"""`plan_reload`: which changed options a SIGHUP applies (marked live in their section) and which need a restart."""

from __future__ import annotations

import dataclasses

import msgspec

from gateway.settings import load_config, plan_reload


def test_live_options_apply_and_restart_only_ones_keep_their_running_value() -> None:
    running = load_config(None, {})
    loaded = load_config(
        None, {"GATEWAY_LOG__LEVEL": "debug", "GATEWAY_API__PORT": "9000", "GATEWAY_EGRESS__DRAIN_TIMEOUT": "5"}
    )
    plan = plan_reload(running, loaded)
    assert set(plan.applied) == {"log.level", "egress.drain_timeout"}
    assert plan.restart_needed == ("api.port",)
    assert (plan.config.log.level, plan.config.egress.drain_timeout, plan.config.api.port) == ("debug", 5.0, 8470)
    assert plan.config.sections["log"] == loaded.sections["log"]


def test_an_unchanged_file_changes_nothing() -> None:
    running = load_config(None, {})
    plan = plan_reload(running, load_config(None, {}))
    assert (plan.applied, plan.restart_needed) == ((), ())
    assert plan.config == running


def test_a_config_changed_in_code_is_reloaded_from_its_changed_section() -> None:
    # A worker's config is the main one with its own egress.listen_port: a reload must compare that section,
    # not a copy of the one it was made from.
    running = load_config(None, {})
    worker = dataclasses.replace(running, egress=msgspec.structs.replace(running.egress, listen_port=15001))
    assert worker.sections["egress"].listen_port == 15001  # type: ignore[attr-defined]
    plan = plan_reload(worker, load_config(None, {"GATEWAY_EGRESS__DRAIN_TIMEOUT": "5"}))
    assert (plan.config.egress.listen_port, plan.config.egress.drain_timeout) == (15001, 5.0)
