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


def test_the_data_planes_limits_and_timeouts_are_live_and_its_ports_marks_and_lists_are_not() -> None:
    running = load_config(None, {})
    changes = {
        "GATEWAY_EGRESS__PEEK_TIMEOUT": "3",
        "GATEWAY_EGRESS__MAX_PEEKING_PER_SANDBOX": "2",
        "GATEWAY_EGRESS__IDLE_TIMEOUT": "60",
        "GATEWAY_EGRESS__CONNECT_TIMEOUT": "2",
        "GATEWAY_DNS__NAME_BUDGET": "5",
        "GATEWAY_DNS__MAX_LABEL_LENGTH": "20",
        "GATEWAY_DNS__REQUIRE_AD": "true",
        # What the kernel table, the listeners or the caches were built from needs a restart.
        "GATEWAY_EGRESS__LISTEN_PORT": "16001",
        "GATEWAY_EGRESS__FWMARK": "4",
        "GATEWAY_EGRESS__PUBLIC_RANGES": '["198.18.0.0/15"]',
        "GATEWAY_DNS__CACHE_TOTAL": "10",
    }
    plan = plan_reload(running, load_config(None, changes))
    assert set(plan.applied) == {
        "egress.peek_timeout",
        "egress.max_peeking_per_sandbox",
        "egress.idle_timeout",
        "egress.connect_timeout",
        "dns.name_budget",
        "dns.max_label_length",
        "dns.require_ad",
    }
    restart = {"egress.listen_port", "egress.fwmark", "egress.public_ranges", "dns.cache_total"}
    assert set(plan.restart_needed) == restart
    egress, dns = plan.config.egress, plan.config.dns
    assert (egress.peek_timeout, egress.listen_port, egress.fwmark) == (3.0, 15001, 1)
    assert (dns.name_budget, dns.max_label_length, dns.require_ad, dns.cache_total) == (5, 20, True, 200_000)


def test_presets_and_limits_defaults_are_live() -> None:
    running = load_config(None, {})
    loaded = load_config(
        None,
        {
            "GATEWAY_PRESETS__TEAM": '{ hosts = ["api.team.example"] }',
            "GATEWAY_LIMITS__CONNECTIONS_PER_MINUTE": "30",
        },
    )
    plan = plan_reload(running, loaded)
    assert (set(plan.applied), plan.restart_needed) == ({"presets", "limits.connections_per_minute"}, ())
    assert plan.config.presets["team"].hosts == ("api.team.example",)
    assert plan.config.policy_context().default_limits.connections_per_minute == 30
