"""The addon's options: the secrets file (owner-only, this user's, a valid {name: value} object) and the mitmproxy
options its guarantees rest on, and the tier's hand-over listener beside it; anything else is an OptionsError, so a
misconfigured tier does not start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def write(path: Path, content: str, mode: int) -> str:
    path.write_text(content)
    path.chmod(mode)
    return str(path)


def test_an_owner_only_file_is_read(tmp_path: Path) -> None:
    from gateway.addons.inspect import read_secrets

    assert read_secrets(write(tmp_path / "s.json", json.dumps({"github": "ghp_0123456789"}), 0o600)) == {
        "github": "ghp_0123456789"
    }
    assert read_secrets(write(tmp_path / "r.json", "{}", 0o400)) == {}
    assert read_secrets("") == {}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    from mitmproxy.exceptions import OptionsError

    from gateway.addons.inspect import read_secrets

    with pytest.raises(OptionsError, match="mode 0600"):
        read_secrets(write(tmp_path / "s.json", json.dumps({"github": "ghp_0123456789"}), mode))


def test_a_symlink_bad_json_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    from mitmproxy.exceptions import OptionsError

    from gateway.addons.inspect import read_secrets

    target = write(tmp_path / "s.json", json.dumps({"github": "ghp_0123456789"}), 0o600)
    os.symlink(target, tmp_path / "link.json")
    for path in (str(tmp_path / "link.json"), write(tmp_path / "bad.json", "{", 0o600), str(tmp_path / "none")):
        with pytest.raises(OptionsError, match="gateway_secrets"):
            read_secrets(path)


@pytest.mark.parametrize("changes", [{"connection_strategy": "eager"}, {"validate_inbound_headers": False}])
def test_the_mitmproxy_options_the_addon_rests_on_are_required(changes: dict[str, object]) -> None:
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.exceptions import OptionsError
    from mitmproxy.test import taddons

    from gateway.addons.inspect import REQUIRED_OPTIONS, Inspect
    from gateway.tier.handover import Handover

    addon = Inspect()
    with taddons.context(Proxyserver(), Handover(0), addon) as tctx:
        tctx.configure(addon, **REQUIRED_OPTIONS)
        with pytest.raises(OptionsError, match="inspection addon needs"):
            tctx.configure(addon, **changes)


def test_the_addon_needs_the_hand_over_listener() -> None:
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.exceptions import OptionsError
    from mitmproxy.test import taddons

    from gateway.addons.inspect import REQUIRED_OPTIONS, Inspect

    addon = Inspect()
    with taddons.context(Proxyserver(), addon) as tctx, pytest.raises(OptionsError, match="the tier's process"):
        tctx.configure(addon, **REQUIRED_OPTIONS)
