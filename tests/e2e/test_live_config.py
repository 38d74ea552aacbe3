"""SIGHUP applies the live `[egress]` and `[dns]` options to a running `gateway run --data-plane --steer`: the
operator edits the config file and sends the signal, nothing else.

Before the reload a 15-character label under sb3's wildcard goes upstream; a held connection stays open. An invalid
value (max_label_length = 64) changes nothing. Then the reload: the held connection is cut by the new idle timeout,
the label is refused by the new `dns.max_label_length`, and connections waiting for their first bytes are capped by
the new `egress.max_peeking_per_sandbox`, each with its rule in the flow records.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.factory import (
    PEEK_CAP,
    SILENT_CLIENTS,
    SILENT_HOLDER,
    EgressEnv,
    api,
    egress_env,  # noqa: F401  (the fixture `env`)
    egress_policies,
    pin,
    wait_until,
)
from tests.netns import wait_for_line

RESOLVER = "@198.18.1.2"  # any address: DNS to port 53 is intercepted
LABEL_NAME = "abcdefghijklmno.wild.test"  # a 15-character label under sb3's wildcard entry


def policies() -> dict[str, Any]:
    data = egress_policies()
    data["sandboxes"]["sb3"] = {
        "id": "sb3",
        "addresses": ["10.75.0.3", "fdd4:1476:6c7e::3"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["allowed.test", "*.wild.test"]},
    }
    return data


def reload(env: EgressEnv, edit: dict[str, str]) -> None:
    """Edit the config file (each old text replaced once) and send SIGHUP."""
    config = env.workdir / "gateway.toml"
    text = config.read_text()
    for old, new in edit.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    config.write_text(text)
    assert env.gateway is not None
    env.gateway.send_signal(signal.SIGHUP)


def label_refused(env: EgressEnv) -> bool:
    return "DNS_LABEL_LENGTH" in env.dig("sb3", RESOLVER, LABEL_NAME, "A")


@pytest.mark.root
def test_sighup_applies_live_egress_and_dns_options_to_the_running_data_plane(env: EgressEnv) -> None:
    env.write_policies(policies())
    assert wait_until(lambda: env.dig("sb3", RESOLVER, "allowed.test", "A", "+short").split() == ["198.18.1.1"], 10)
    assert not label_refused(env)  # under the default max_label_length (40) it goes upstream
    holder = env.topo.start_python("sb1", SILENT_HOLDER, "198.18.1.4", ready="open", timeout=15)

    # An invalid value: the whole file is refused, nothing changes.
    reload(env, {"[dns]\n": "[dns]\nmax_label_length = 64\n"})
    assert wait_until(lambda: env.log_events("config.reload_failed"), 10)
    assert env.log_events("config.reload_failed")[0]["code"] == "CONFIG_INVALID"
    assert not label_refused(env)

    reload(
        env,
        {
            "max_label_length = 64\n": "max_label_length = 10\n",
            f"max_peeking_per_sandbox = {PEEK_CAP}\n": "max_peeking_per_sandbox = 1\nidle_timeout = 1\n",
            "peek_timeout = 2.0\n": "peek_timeout = 3.0\n",
        },
    )
    assert wait_until(lambda: env.log_events("config.reloaded"), 10)
    applied = env.log_events("config.reloaded")[0]["applied"]
    assert set(applied) == {
        "dns.max_label_length",
        "egress.max_peeking_per_sandbox",
        "egress.idle_timeout",
        "egress.peek_timeout",
    }
    assert env.log_events("config.restart_needed") == []

    # The connection opened before the reload is held to the new idle timeout.
    assert holder.stdout is not None
    assert wait_for_line(holder, "", 20).strip() == "RESET"

    def idle_cut() -> list[dict[str, Any]]:
        return [f for f in env.log_events("flow") if f["reason"].endswith("; closed after 1.0s idle")]

    assert wait_until(idle_cut, 5)
    assert (idle_cut()[0]["orig_dst_addr"], idle_cut()[0]["orig_dst_port"]) == ("198.18.1.4", 22)

    # The label is refused under the new limit, and never goes upstream.
    refused = env.dig("sb3", RESOLVER, LABEL_NAME, "A")
    assert "status: NXDOMAIN" in refused, refused
    assert "DNS_LABEL_LENGTH: label of 15 characters under a wildcard entry, over dns.max_label_length 10" in refused
    logged = [e for e in env.dns_log("sb3") if e["name"] == LABEL_NAME]
    assert [e["code"] for e in logged][-1] == "BLOCKED_LABEL_LENGTH"

    # One connection may wait for its first bytes now: of three silent ones, two are refused at once (which two
    # is the kernel's order of letting deferred connections go).
    capped_before = env.logged_flows(rule="builtin:peek-cap")
    out = env.topo.python("sb1", SILENT_CLIENTS, "198.18.1.4", "3", timeout=20).split()
    assert sorted(out) == ["DATA", "RESET", "RESET"], out
    capped = env.logged_flows(rule="builtin:peek-cap")
    assert len(capped) - len(capped_before) == 2


@pytest.mark.root
def test_sighup_puts_an_operators_changed_preset_in_force_for_the_sandboxes_naming_it(env: EgressEnv) -> None:
    def recompiled() -> int:
        return len(env.log_events("policies.recompiled"))

    def reaches(name: str, address: str) -> bool:
        return env.curl("sb3", f"https://{name}/", *pin(name, 443, address), timeout=3).returncode == 0

    before = recompiled()
    reload(env, {"[dns]\n": '[presets.team]\nhosts = ["later.test"]\n[dns]\n'})
    assert wait_until(lambda: recompiled() == before + 1, 10)
    data = policies()
    data["sandboxes"]["sb3"]["egress"] = {"allow_hosts": ["allowed.test"], "presets": ["team"]}
    env.write_policies(data)  # a record naming the preset: accepted now that the configuration has it
    assert wait_until(lambda: reaches("later.test", "198.18.1.3"), 10)
    assert not reaches("denied.test", "198.18.1.2")

    reload(env, {'hosts = ["later.test"]': 'hosts = ["denied.test"]'})
    assert wait_until(lambda: recompiled() == before + 2, 10)
    reloaded = [e for e in env.log_events("config.reloaded") if "presets" in e["applied"]]
    assert len(reloaded) == 2 and env.log_events("config.restart_needed") == []
    assert reaches("denied.test", "198.18.1.2") and not reaches("later.test", "198.18.1.3")
    status, answer = api(env, "GET", "/v1/presets")
    assert status == 200 and {p["name"]: p["hosts"] for p in answer["presets"]}["team"] == ["denied.test"]
