"""gateway.example.toml documents the defaults: it must say exactly what the code does."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import msgspec

from gateway.configdoc import defaults, render
from gateway.settings import SECTIONS, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "gateway.example.toml"


def test_the_committed_example_is_the_generated_one() -> None:
    # Regenerate with: .venv/bin/python -m gateway.configdoc > gateway.example.toml
    assert EXAMPLE.read_text() == render()


def test_example_config_lists_every_option_with_its_default_value() -> None:
    documented = tomllib.loads(EXAMPLE.read_text())
    assert documented == {name: defaults(model) for name, model in SECTIONS.items() if model is not None}
    assert "# [presets.internal-apis]" in EXAMPLE.read_text()  # presets are documented by example


def test_example_config_loads_to_the_same_config_as_no_file() -> None:
    from_file = load_config(EXAMPLE, environ={})
    assert dataclasses.replace(from_file, source="defaults") == load_config(environ={})
    assert from_file.store == load_config(environ={}).store
    assert from_file.limits.limits() == load_config(environ={}).limits.limits()


def test_every_option_is_described() -> None:
    for name, model in SECTIONS.items():
        if model is None:
            continue
        assert model.__doc__, name
        for field in msgspec.structs.fields(model):
            if field.name in model.supplied:
                continue
            metas = [m for m in getattr(field.type, "__metadata__", ()) if isinstance(m, msgspec.Meta)]
            assert metas and metas[0].description, f"{name}.{field.name} has no description"
