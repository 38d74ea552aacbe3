"""API records from command-line flags: `sandbox create --id sb1 --address 10.64.0.2 --allow-host api.example.com`
becomes the JSON the API takes, or the whole record comes from `--file`/`--data` (never both).

The records are only assembled here; the API validates them (its errors explain more than argparse
choices could), so a flag value is checked only where it must be parsed (ports, `KEY=VALUE` labels).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from gateway.clibase import EXIT_USAGE, CliExit
from gateway.untrusted import InvalidJson, parse_decimal, parse_json


def _split(values: Iterable[str] | None) -> list[str]:
    """Repeatable flags also take comma-separated lists: `--allow-host a.com,b.com`."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def _ports(values: Iterable[str] | None) -> list[int]:
    ports: list[int] = []
    for text in _split(values):
        port = parse_decimal(text, 1, 65535)
        if port is None:
            raise CliExit(EXIT_USAGE, f"INVALID_PORT: {text[:40]!r} is not a port in 1-65535")
        ports.append(port)
    return ports


def egress_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The egress object the flags describe (empty when none was given).

    A CIDR or port flag means "only these, minus those", so it implies mode deny_all unless
    `--egress-mode` says otherwise (`allow_all` cannot be combined with them).
    """
    egress: dict[str, Any] = {}
    for flag, key in (
        ("allow_host", "allow_hosts"),
        ("deny_host", "deny_hosts"),
        ("preset", "presets"),
        ("allow_cidr", "allow_cidrs"),
        ("deny_cidr", "deny_cidrs"),
    ):
        values = _split(getattr(args, flag, None))
        if values:
            egress[key] = values
    for flag, key in (("allow_port", "allow_ports"), ("host_port", "host_ports")):
        ports = _ports(getattr(args, flag, None))
        if ports:
            egress[key] = ports
    implies_deny_all = any(key in egress for key in ("allow_cidrs", "deny_cidrs", "allow_ports"))
    mode = getattr(args, "egress_mode", None) or ("deny_all" if implies_deny_all else None)
    if mode:
        egress["mode"] = mode
    if getattr(args, "no_internet", False):
        egress["allow_internet"] = False
    return egress


def _labels(values: Iterable[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for text in values or ():
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise CliExit(EXIT_USAGE, f"INVALID_LABEL: {text!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def load_body(args: argparse.Namespace) -> Any | None:
    """The JSON body from --file (`-` = stdin) or --data, or None when neither was given."""
    file, data = getattr(args, "file", None), getattr(args, "data", None)
    if file is not None and data is not None:
        raise CliExit(EXIT_USAGE, "give either --file or --data, not both")
    if file is not None:
        source = "stdin" if file == "-" else file
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise CliExit(EXIT_USAGE, f"cannot read {source}: {exc.strerror or exc}") from None
    elif data is not None:
        source, text = "--data", data
    else:
        return None
    try:
        return parse_json(text)
    except InvalidJson as exc:
        raise CliExit(EXIT_USAGE, f"INVALID_JSON: {source}: {exc.message}") from None


def require_body(args: argparse.Namespace) -> Any:
    body = load_body(args)
    if body is None:
        raise CliExit(EXIT_USAGE, "give the record with --file FILE (- for stdin) or --data JSON")
    return body


def sandbox_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    if not args.id or not args.address:
        raise CliExit(EXIT_USAGE, "sandbox create needs --id and --address (or the whole record with --file/--data)")
    record: dict[str, Any] = {"id": args.id, "addresses": _split(args.address)}
    if args.profile:
        record["profile"] = args.profile
    if args.template:
        record["template"] = args.template
    egress = egress_from_flags(args)
    if egress:
        record["egress"] = egress
    labels = _labels(args.label)
    if labels:
        record["labels"] = labels
    return record


def _flags_given(args: argparse.Namespace, names: Iterable[str]) -> list[str]:
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, None) not in (None, [], False)]


SANDBOX_FLAGS = ("id", "address", "profile", "template", "label")
TEMPLATE_FLAGS = ("name", "description")
EGRESS_FLAGS = (
    "allow_host",
    "preset",
    "allow_cidr",
    "deny_cidr",
    "allow_port",
    "host_port",
    "egress_mode",
    "no_internet",
)


def record_from(args: argparse.Namespace, flag_names: Sequence[str], build: Callable[[], dict[str, Any]]) -> Any:
    body = load_body(args)
    if body is None:
        return build()
    flags = _flags_given(args, flag_names)
    if flags:
        raise CliExit(EXIT_USAGE, f"give the record either with --file/--data or with flags, not both ({flags[0]})")
    return body


def template_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    if not args.name:
        raise CliExit(EXIT_USAGE, "template create needs --name (or the whole record with --file/--data)")
    record: dict[str, Any] = {"name": args.name}
    if args.description:
        record["description"] = args.description
    egress = egress_from_flags(args)
    if egress:
        record["egress"] = egress
    return record
