"""The [inspection] section: its checks and how secrets are read (by name, never written in the file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.settings import load_config


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text("[inspection]\n" + text)
    return path


def test_defaults_and_names_are_normalised(tmp_path: Path) -> None:
    config = load_config(
        _config(tmp_path, 'permitted_domains = ["GitHub.com."]\nexclude_hosts = ["*.Pinned.example"]\n'), environ={}
    ).inspection
    assert config.listen_port == 15080 and config.ca_dir == Path("certs/inspection")
    assert config.permitted_domains == ("github.com",) and config.exclude_hosts == ("*.pinned.example",)
    assert load_config(environ={}).inspection.secret_names() == frozenset()


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('permitted_domains = ["*.example.com"]', "inspection.permitted_domains[0]", "not a *. pattern"),
        ('exclude_hosts = ["https://x.example"]', "inspection.exclude_hosts[0]", "URL"),
        ('secrets = { github = { env = "A", file = "/x" } }', "inspection.secrets.github", "exactly one"),
        ("secrets = { github = { } }", "inspection.secrets.github", "exactly one"),
        ('secrets = { github = { value = "ghp_x" } }', "inspection.secrets[...]", "option(s) value"),
        ('secrets = { "Git Hub" = { env = "A" } }', "inspection.secrets.Git Hub", "not a secret name"),
        ("restart_backoff = 5\nrestart_backoff_max = 1", "inspection.restart_backoff_max", "at least"),
        ("listen_port = 0", "inspection.listen_port", "1-65535"),
    ],
)
def test_bad_options_are_refused_with_their_field(tmp_path: Path, text: str, field: str, words: str) -> None:
    with pytest.raises(GatewayError) as caught:
        load_config(_config(tmp_path, text + "\n"), environ={})
    assert caught.value.code == "CONFIG_INVALID" and caught.value.field == field
    assert words in caught.value.message


def test_secret_values_come_from_the_environment_and_files(tmp_path: Path) -> None:
    (tmp_path / "npm").write_text("npm-secret\n")
    text = f'secrets = {{ github = {{ env = "TOKEN_GH" }}, npm = {{ file = "{tmp_path / "npm"}" }} }}\n'
    config = load_config(_config(tmp_path, text), environ={}).inspection
    assert config.secret_names() == {"github", "npm"}
    assert config.secret_values({"TOKEN_GH": "gh-secret"}) == {"github": "gh-secret", "npm": "npm-secret"}


@pytest.mark.parametrize(
    ("content", "environ", "words"),
    [
        (None, {}, "$TOKEN_GH is not set"),
        ("", {"TOKEN_GH": "x"}, "is empty"),
        ("two\nlines\n", {"TOKEN_GH": "x"}, "line break"),
        (None, {"TOKEN_GH": "a\r\nInjected: 1"}, "line break"),
    ],
)
def test_an_unavailable_secret_is_named_and_its_value_never_shown(
    tmp_path: Path, content: str | None, environ: dict[str, str], words: str
) -> None:
    secret = tmp_path / "npm"
    if content is not None:
        secret.write_text(content)
    text = f'secrets = {{ github = {{ env = "TOKEN_GH" }}, npm = {{ file = "{secret}" }} }}\n'
    config = load_config(_config(tmp_path, text), environ={}).inspection
    if content is None and environ:
        secret.write_text("fine")
    with pytest.raises(GatewayError) as caught:
        config.secret_values(environ)
    assert caught.value.code == "SECRET_UNAVAILABLE" and words in caught.value.message
    assert "Injected" not in str(caught.value) and "lines" not in str(caught.value)


def test_a_missing_secret_file_is_unavailable(tmp_path: Path) -> None:
    text = f'secrets = {{ npm = {{ file = "{tmp_path / "absent"}" }} }}\n'
    config = load_config(_config(tmp_path, text), environ={}).inspection
    with pytest.raises(GatewayError) as caught:
        config.secret_values(dict(os.environ))
    assert caught.value.code == "SECRET_UNAVAILABLE" and caught.value.field == "inspection.secrets.npm"
