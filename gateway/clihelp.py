"""`--help` examples and shell completion for the `gateway` command, both derived from the built parser.

Every command (a leaf of the argparse tree, or a group) has an example in `EXAMPLES`, keyed by its path
below `gateway` (`"sandbox create"`); `add_examples` puts it in the command's help as an `Example:` epilog.
The table is one place for every command module's examples, so that a command another module adds without
one is found by `missing_examples` (a test walks the tree with it) instead of going unnoticed. Completion
scripts come from the same tree (`shtab`), so new commands are completed without anyone writing a script.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import shtab

EXAMPLES: dict[str, str] = {
    "run": "gateway run --data-plane --steer --config /etc/gateway/gateway.toml",
    "demo": "gateway demo --no-wait   # as root: it builds network namespaces",
    "check-config": "gateway check-config --config gateway.toml",
    "sandbox": "gateway sandbox list",
    "sandbox list": "gateway sandbox list --profile allowlisted",
    "sandbox get": "gateway sandbox get agent-42",
    "sandbox policy": "gateway sandbox policy agent-42",
    "sandbox delete": "gateway sandbox delete agent-42",
    "sandbox create": "gateway sandbox create --id agent-42 --address 10.75.0.42 --profile allowlisted "
    "--allow-host api.example.com",
    "sandbox update": "gateway sandbox update agent-42 --file agent-42.json",
    "sandbox patch": """gateway sandbox patch agent-42 --data '{"labels": {"tenant": "acme"}}'""",
    "sandbox attach": "gateway sandbox attach --netns sb42 --address 10.75.0.42",
    "sandbox detach": "gateway sandbox detach --netns sb42",
    "template": "gateway template list",
    "template list": "gateway template list",
    "template get": "gateway template get python-dev",
    "template delete": "gateway template delete python-dev",
    "template create": "gateway template create --name python-dev --preset package-registries",
    "template update": "gateway template update python-dev --file python-dev.json",
    "explain": "gateway explain agent-42 api.example.com:443",
    "policy": "gateway policy diff agent-42 --file candidate.json",
    "policy diff": "gateway policy diff agent-42 --file candidate.json --since 7d --json",
    "policy suggest": "gateway policy suggest agent-42 --since 7d --write agent-42.json",
    "policy revisions": "gateway policy revisions agent-42",
    "policy restore": "gateway policy restore agent-42 --revision r3f2a9c0d1b7e",
    "status": "gateway status",
    "presets": "gateway presets --json",
    "audit": "gateway audit list agent-42",
    "audit list": "gateway audit list agent-42 --all",
    "audit get": "gateway audit get agent-42 1733160000000000-4242.ndjson",
    "audit dns": "gateway audit dns agent-42 --limit 20",
    "audit tail": "gateway audit tail agent-42 --deny",
    "audit denial": "gateway audit denial 6930b2c1-4f2a9c1b3d",
    "tunnel": "gateway tunnel list agent-42",
    "tunnel expose": "gateway tunnel expose agent-42 8080 --password",
    "tunnel list": "gateway tunnel list agent-42",
    "tunnel get": "gateway tunnel get TUNNEL_ID",
    "tunnel revoke": "gateway tunnel revoke TUNNEL_ID",
    "certs": "gateway certs init",
    "certs init": "gateway certs init --dir certs",
    "certs ca": "gateway certs ca > inspection-ca.crt",
    "completion": "gateway completion bash > /etc/bash_completion.d/gateway",
}

SHELLS = ("bash", "zsh")


def commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(path, parser) for every command below `parser`, groups before their subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                here = f"{path} {name}".strip()
                yield here, sub
                yield from commands(sub, here)


def missing_examples(parser: argparse.ArgumentParser) -> list[str]:
    return [path for path, _ in commands(parser) if path not in EXAMPLES]


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Each command's example as its `Example:` epilog, kept as written (RawDescriptionHelpFormatter), after
    whatever epilog it had."""
    for path, sub in commands(parser):
        example = EXAMPLES.get(path)
        if example is None:
            continue
        sub.epilog = "\n\n".join(part for part in (sub.epilog, f"Example:\n  {example}") if part)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    script: str = shtab.complete(parser, shell=shell)
    return script
