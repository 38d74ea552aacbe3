"""gateway.example.toml documents the defaults: it must say exactly what the code does."""

from __future__ import annotations

import tomllib
from pathlib import Path

from gateway.config import DEFAULTS, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "gateway.example.toml"


def test_example_config_lists_every_option_with_its_default_value() -> None:
    documented = tomllib.loads(EXAMPLE.read_text())
    assert documented == {section: values for section, values in DEFAULTS.items() if section != "presets"}
    assert "# [presets.internal-apis]" in EXAMPLE.read_text()  # presets are documented by example


def test_example_config_loads_to_the_same_config_as_no_file() -> None:
    assert load_config(EXAMPLE, environ={}).store == load_config(environ={}).store
    assert load_config(EXAMPLE, environ={}).default_limits == load_config(environ={}).default_limits
