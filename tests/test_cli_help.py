"""`gateway --help`, every command's `Example:`, and `gateway completion bash|zsh` loaded into real shells."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.clihelp import commands, missing_examples
from tests.factory import gateway


def test_every_command_has_a_summary_and_an_example() -> None:
    parser = build_parser()
    assert missing_examples(parser) == []
    for path, sub in commands(parser):
        text = sub.format_help()
        assert "Example:\n  gateway " + path.split()[0] in text, path


def test_top_level_help_lists_every_command_with_its_line() -> None:
    done = gateway("--help", token=None)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # argparse wraps a long name's line onto the next
    groups = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = {choice.dest: choice.help for choice in groups._choices_actions}
    assert set(listed) == {path for path, _ in commands(build_parser()) if " " not in path}
    for name, line in listed.items():
        assert line and f"{name} {line}" in text, name


def test_a_command_without_an_example_is_found() -> None:
    parser = build_parser()
    groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    groups.add_parser("brand-new", help="a command someone adds")
    assert missing_examples(parser) == ["brand-new"]


def script(tmp_path: Path, shell: str) -> Path:
    done = gateway("completion", shell, token=None)
    assert done.returncode == 0, done.stderr
    path = tmp_path / f"gateway.{shell}"
    path.write_text(done.stdout)
    return path


def bash_complete(path: Path, *words: str) -> list[str]:
    """What bash's completion function for `gateway` offers for the last of `words` (COMP_WORDS/COMP_CWORD)."""
    line = " ".join(("gateway", *words))
    program = f"""
source {path}
spec=$(complete -p gateway)
fn=$(printf '%s' "$spec" | sed -E 's/.*-F ([^ ]+).*/\\1/')
COMP_WORDS=(gateway {" ".join(words)})
COMP_CWORD={len(words)}
COMP_LINE='{line}'
COMP_POINT=${{#COMP_LINE}}
"$fn" gateway {words[-1]} {(("gateway", *words))[-2]}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completes_commands_and_subcommands(tmp_path: Path) -> None:
    path = script(tmp_path, "bash")
    assert bash_complete(path, "sa") == ["sandbox"]
    assert bash_complete(path, "sandbox", "cr") == ["create"]
    assert "revoke" in bash_complete(path, "tunnel", "")


def test_zsh_script_is_valid_zsh(tmp_path: Path) -> None:
    path = script(tmp_path, "zsh")
    assert "#compdef gateway" in path.read_text()
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (apt zsh)")
    done = subprocess.run([zsh, "-n", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_completion_refuses_an_unknown_shell() -> None:
    done = gateway("completion", "fish", token=None)
    assert done.returncode == 2 and "invalid choice" in done.stderr
