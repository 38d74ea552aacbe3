"""CLI commands for the tunnel: `gateway certs init` (local) and `gateway tunnel ...` (through the control API).

Registered from `gateway/cli.py` by small hooks: `add_parsers(commands, common)` and `add_certs_parser(certs,
common)` (into the `certs` group, which the inspection tier's `certs ca` shares) in its parser, and
`run_command(args, out)` in its `main` for the commands in `COMMANDS`. It imports what
commands share from `gateway.clibase` and the API client from `gateway.client`, never `gateway.cli`.
Passwords are never taken from the command line (they would land in shell history and
`ps`): `--password` prompts, `--password-file` reads the first line of a file (- for stdin).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.clibase import (
    EXIT_API_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    CliExit,
    Context,
    Parser,
    client_from_args,
    config_or_exit,
)
from gateway.errors import GatewayError
from gateway.formatting import format_block, format_table
from gateway.tunnel.certs import CertPaths, init_certs
from gateway.tunnel.config import TunnelConfig

COMMANDS = ("tunnel",)


def add_certs_parser(certs: Any, common: Parser) -> None:
    """`certs init`; the `certs` group runs its subcommand's `run(args, out)`."""
    p = certs.add_parser("init", parents=[common], help="create a local CA and the wildcard certificate for tunnels")
    p.add_argument("--domain", help="tunnel domain (default: [tunnel] domain)")
    p.add_argument("--dir", metavar="DIR", help="write into DIR instead of the configured paths")
    p.add_argument("--force", action="store_true", help="renew the CA and certificate even if they are still valid")
    p.set_defaults(run=cmd_certs)


def add_parsers(commands: Any, common: Parser) -> None:
    tunnel = commands.add_parser("tunnel", help="temporary HTTPS URLs for sandbox ports").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    p = tunnel.add_parser("expose", parents=[common], help="expose a sandbox port at a new https URL")
    p.add_argument("sandbox")
    p.add_argument("port", type=int)
    p.add_argument("--label", help="a name for people (shown on the login page)")
    p.add_argument("--ttl", type=float, metavar="SECONDS", help="lifetime (default: [tunnel] default_ttl)")
    p.add_argument("--rewrite-host", action="store_true", help="send Host: localhost:<port> to the app")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--password", action="store_true", help="protect it with a password (prompted)")
    secret.add_argument("--password-file", metavar="FILE", help="protect it with the first line of FILE (- stdin)")
    p = tunnel.add_parser("list", parents=[common], help="list a sandbox's tunnels")
    p.add_argument("sandbox")
    for name, text in (("get", "show a tunnel"), ("revoke", "revoke a tunnel now (closes its connections)")):
        tunnel.add_parser(name, parents=[common], help=text).add_argument("id")


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    cmd_tunnel(Context(client_from_args(args), args.json, out), args)
    return EXIT_OK


def cmd_certs(args: argparse.Namespace, out: TextIO) -> int:
    config: TunnelConfig = config_or_exit(args.config).tunnel
    if args.dir:
        base = Path(args.dir)
        paths = CertPaths(base / "ca.crt", base / "ca.key", base / "tunnel.crt", base / "tunnel.key")
    else:
        paths = CertPaths(config.ca_cert_path, config.ca_key_path, config.cert_path, config.key_path)
    try:
        result = init_certs(args.domain or config.domain, paths, force=args.force)
    except GatewayError as exc:
        raise CliExit(EXIT_USAGE if exc.status < 500 else EXIT_API_ERROR, str(exc)) from None
    if result.created_ca or result.created_leaf:
        made = [name for name, flag in (("CA", result.created_ca), ("certificate", result.created_leaf)) if flag]
        out.write(f"created {' and '.join(made)} (keys are mode 0600; never commit them)\n")
    else:
        out.write("the existing CA and certificate are valid; nothing changed (use --force to renew)\n")
    out.write(result.trust_instructions() + "\n")
    return EXIT_OK


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_file:
        handle = sys.stdin if args.password_file == "-" else open(args.password_file, encoding="utf-8")  # noqa: SIM115
        try:
            return handle.readline().rstrip("\r\n")
        finally:
            if handle is not sys.stdin:
                handle.close()
    if args.password:
        first = getpass.getpass("Tunnel password: ")
        if getpass.getpass("Again: ") != first:
            raise CliExit(EXIT_USAGE, "the passwords differ")
        return first
    return None


def _rows(data: Any) -> str:
    tunnels = data["tunnels"]
    if not tunnels:
        return "no tunnels"
    return format_table(
        ("ID", "PORT", "STATE", "PASSWORD", "EXPIRES", "LABEL", "URL"),
        [
            (
                t["id"],
                t["port"],
                t["state"],
                "yes" if t["password_protected"] else "no",
                t["expires_at"],
                t["label"] or "",
                t["url"],
            )
            for t in tunnels
        ],
    )


def _block(data: Any) -> str:
    keys = ("id", "url", "sandbox", "address", "port", "label", "state", "password_protected", "expires_at")
    shown = {key: data.get(key) for key in keys}
    if data.get("revoked_at"):
        shown["revoked_at"] = f"{data['revoked_at']} ({data.get('revoked_reason') or 'no reason given'})"
    return format_block(shown)


def cmd_tunnel(ctx: Context, args: argparse.Namespace) -> None:
    c = ctx.client
    if args.action == "expose":
        body: dict[str, Any] = {"port": args.port}
        if args.label:
            body["label"] = args.label
        if args.ttl is not None:
            body["ttl"] = args.ttl
        if args.rewrite_host:
            body["rewrite_host"] = True
        password = _read_password(args)
        if password is not None:
            body["password"] = password
        ctx.emit(c.expose_tunnel(args.sandbox, body), lambda d: f"{d['url']}\n" + _block(d))
    elif args.action == "list":
        ctx.emit(c.list_tunnels(args.sandbox), _rows)
    elif args.action == "get":
        ctx.emit(c.get_tunnel(args.id), _block)
    elif args.action == "revoke":
        ctx.emit(c.revoke_tunnel(args.id), lambda d: f"revoked {d['url']}")
