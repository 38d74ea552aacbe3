"""The `gateway` command: run the gateway, check its configuration, and drive the control API.

Exit codes: 0 success (for `explain`: the connection would be allowed); 1 the API refused
the request (`CODE: message (field x)` on stderr); 2 bad invocation or invalid
configuration; 3 the API could not be reached; 4 `explain`: the connection would be denied.

Client commands find the API from `--api`, else `GATEWAY_API_URL`, else the configured
`[api] host/port`; the token from `--token`, else `GATEWAY_TOKEN`. `--json` prints the
API's JSON answers verbatim (errors too, on stderr). The client never follows redirects
and never uses an HTTP proxy, so the token is only ever sent to the URL given (`gateway.client`).

This module is the parser and the dispatch. Its neighbours have one job each: `gateway.client` (the
API client), `gateway.formatting` (tables and blocks for people), `gateway.flags` (records from
flags), `gateway.clibase` (exit codes, `CliExit`, the parser class, `Context`), `gateway.service`
(what `gateway run` starts). `gateway.tunnel.cli`, `gateway.tier.cli` and `gateway.attach` add their commands
through `add_parsers`/`add_certs_parser`/`add_attach_commands` and run them; they import `gateway.clibase`,
never this module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from gateway import __version__
from gateway.attach import add_attach_commands, run_attach_command
from gateway.clibase import (
    EXIT_API_ERROR,
    EXIT_DENIED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliExit,
    Context,
    Parser,
    client_from_args,
    config_or_exit,
)
from gateway.client import RESTORED_HEADER, ApiError, ApiResponse, ApiUnreachable
from gateway.clihelp import SHELLS, add_examples, completion_script
from gateway.demo.run import run as run_demo
from gateway.errors import GatewayError
from gateway.flags import (
    EGRESS_FLAGS,
    SANDBOX_FLAGS,
    TEMPLATE_FLAGS,
    record_from,
    require_body,
    sandbox_from_flags,
    template_from_flags,
)
from gateway.formatting import (
    audit_rows,
    diff_block,
    dns_rows,
    flow_line,
    format_block,
    format_verdict,
    listen_description,
    preset_rows,
    revision_rows,
    sandbox_rows,
    status_block,
    store_description,
    suggestion_block,
    template_rows,
)
from gateway.settings import Config
from gateway.tier.cli import add_certs_parser as add_tier_certs_parser
from gateway.tunnel.cli import COMMANDS as TUNNEL_COMMANDS
from gateway.tunnel.cli import add_certs_parser as add_tunnel_certs_parser
from gateway.tunnel.cli import add_parsers as add_tunnel_parsers
from gateway.tunnel.cli import run_command as run_tunnel_command

# --------------------------------------------------------------------------- client commands


def cmd_sandbox(ctx: Context, args: argparse.Namespace) -> None:
    c = ctx.client
    action = args.action
    if action == "list":
        ctx.emit(c.list_sandboxes(profile=args.profile, template=args.template), sandbox_rows)
    elif action == "get":
        ctx.emit(c.get_sandbox(args.id), format_block)
    elif action == "policy":
        ctx.emit(c.sandbox_policy(args.id), format_block)
    elif action == "create":
        answer = c.create_sandbox(record_from(args, SANDBOX_FLAGS + EGRESS_FLAGS, lambda: sandbox_from_flags(args)))
        ctx.emit(answer, lambda d: f"created sandbox {d['id']}\n" + format_block(d))
    elif action == "update":
        answer = c.replace_sandbox(args.id, require_body(args))
        ctx.emit(answer, lambda d: f"replaced sandbox {d['id']}{_cut_note(answer)}\n" + format_block(d))
    elif action == "patch":
        answer = c.patch_sandbox(args.id, require_body(args))
        ctx.emit(answer, lambda d: f"patched sandbox {d['id']}{_cut_note(answer)}\n" + format_block(d))
    elif action == "delete":
        answer = c.delete_sandbox(args.id)
        ctx.emit(answer, lambda _: f"deleted sandbox {args.id}{_cut_note(answer)}")


def _cut_note(answer: ApiResponse) -> str:
    cut = answer.cut_flows
    return f"; ended {cut} open connection{'s' * (cut != 1)} it no longer allows" if cut else ""


def cmd_template(ctx: Context, args: argparse.Namespace) -> None:
    c = ctx.client
    action = args.action
    if action == "list":
        ctx.emit(c.list_templates(), template_rows)
    elif action == "get":
        ctx.emit(c.get_template(args.name), format_block)
    elif action == "create":
        answer = c.create_template(record_from(args, TEMPLATE_FLAGS + EGRESS_FLAGS, lambda: template_from_flags(args)))
        ctx.emit(answer, lambda d: f"created template {d['name']}\n" + format_block(d))
    elif action == "update":
        answer = c.replace_template(args.name, require_body(args))
        ctx.emit(answer, lambda d: f"replaced template {d['name']}{_cut_note(answer)}\n" + format_block(d))
    elif action == "delete":
        ctx.emit(c.delete_template(args.name), lambda _: f"deleted template {args.name}")


def cmd_explain(ctx: Context, args: argparse.Namespace) -> int:
    answer = ctx.client.explain(
        args.sandbox,
        host=args.host,
        address=args.address,
        protocol=args.protocol,
        port=args.port,
        method=args.method,
        path=args.path,
    )
    ctx.emit(answer, format_verdict)
    return EXIT_OK if answer.data.get("allowed") else EXIT_DENIED


def cmd_policy(ctx: Context, args: argparse.Namespace) -> None:
    """`policy diff`: the candidate record replayed against the sandbox's recorded flows; `policy suggest`: the
    smallest allowlist those flows needed, as a record (`--write FILE` saves it); nothing is applied. `policy
    revisions`: its recent revisions; `policy restore`: one of them (default the previous) applied again."""
    c = ctx.client
    if args.action == "diff":
        ctx.emit(c.policy_diff(args.sandbox, require_body(args), since=args.since), diff_block)
    elif args.action == "revisions":
        ctx.emit(c.sandbox_revisions(args.sandbox), revision_rows)
    elif args.action == "restore":
        answer = c.restore_sandbox(args.sandbox, args.revision)
        restored = answer.headers.get(RESTORED_HEADER, "?")
        ctx.emit(
            answer,
            lambda d: (
                f"restored sandbox {d['id']} to {restored}: revision {d['revision']} in force"
                f"{_cut_note(answer)}\n" + format_block(d)
            ),
        )
    else:
        suggestion = c.policy_suggest(args.sandbox, since=args.since)
        hint = f"gateway policy suggest {args.sandbox} --write FILE     # the record, to review and edit"
        if args.write is not None:
            try:
                with open(args.write, "w", encoding="utf-8") as out:
                    json.dump(suggestion.data["record"], out, indent=2)
                    out.write("\n")
            except OSError as exc:
                raise CliExit(EXIT_USAGE, f"cannot write {args.write}: {exc.strerror}") from None
            hint = f"the record is in {args.write}: review it, then use it as FILE"
        ctx.emit(suggestion, lambda data: suggestion_block(data, hint))


def cmd_status(ctx: Context, args: argparse.Namespace) -> None:
    ctx.emit(ctx.client.status(), status_block)


def cmd_presets(ctx: Context, args: argparse.Namespace) -> None:
    ctx.emit(ctx.client.presets(), preset_rows)


def cmd_audit(ctx: Context, args: argparse.Namespace) -> int | None:
    """`audit list` pages through the batches (every page with --all); `audit get` prints a batch's NDJSON;
    `audit dns` shows the sandbox's recent DNS queries; `audit tail` follows the records live; `audit denial`
    shows the record of one denial."""
    if args.action == "dns":
        ctx.emit(ctx.client.dns_log(args.sandbox, limit=args.limit), lambda data: dns_rows(data["queries"]))
        return None
    if args.action == "tail":
        return _audit_tail(ctx, args)
    if args.action == "denial":
        ctx.emit(ctx.client.denial(args.denial_id), flow_line)
        return None
    if args.action == "get":
        answer = ctx.client.audit_batch(args.sandbox, args.name)
        ctx.out.write(answer.text if answer.text.endswith("\n") or not answer.text else answer.text + "\n")
        return None
    batches: list[Any] = []
    token: str | None = None
    while True:
        page = ctx.client.audit_batches(
            args.sandbox, since_us=args.since_us, limit=args.limit, continuation_token=token
        ).data
        batches += page["batches"]
        token = page["next_continuation_token"]
        if token is None or not args.all:
            break
    if ctx.json_output:
        ctx.out.write(json.dumps({"batches": batches, "next_continuation_token": token}) + "\n")
        return None
    ctx.out.write(audit_rows(batches) + "\n")
    if token is not None:
        ctx.out.write("more batches follow: use --all, or --since-us after the last one shown\n")
    return None


def _audit_tail(ctx: Context, args: argparse.Namespace) -> int:
    """Each record as it is decided, a line each (--json: the record's JSON), until Ctrl-C (exit 0). A gap (this
    view fell behind) is said on stderr."""
    try:
        verdict = "deny" if args.deny else "would_deny" if args.would_deny else None
        for item in ctx.client.stream_flows(sandbox=args.sandbox, verdict=verdict):
            if "note" in item:
                sys.stderr.write(f"-- {item.get('dropped', '?')} records skipped: this view fell behind --\n")
                continue
            ctx.out.write((json.dumps(item) if ctx.json_output else flow_line(item)) + "\n")
            ctx.out.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    raise CliExit(EXIT_UNREACHABLE, "the gateway ended the flow stream (it stopped)")


# --------------------------------------------------------------------------- run / check-config


def _check_runnable(config: Config) -> None:
    """`gateway.service.check_runnable`, its refusal as a usage error (imported here: the service imports the
    whole gateway, which the client commands never need)."""
    from gateway.service import check_runnable

    try:
        check_runnable(config)
    except GatewayError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.presets import BUILTIN_PRESETS
    from gateway.tunnel.config import shared_site_warning

    config = config_or_exit(args.config)
    _check_runnable(config)
    limits = config.limits.limits()
    lines = [
        f"config:          {config.source}",
        f"store:           {store_description(config)}",
        f"api:             {listen_description([(config.api.host, config.api.port)])}",
        f"sandbox subnets: {', '.join(str(n) for n in config.network.sandbox_subnets)}",
        f"default limits:  {limits.connections_per_minute} conn/min, {limits.bandwidth_mbit} Mbit/s "
        f"(burst {limits.burst_mbit}), {limits.dns_queries_per_minute} DNS queries/min",
    ]
    if config.api.tokens:
        lines.append(f"tokens:          {len(config.api.tokens)}")
        width = max(len(t.name) for t in config.api.tokens)
        lines += [
            f"  {t.name.ljust(width)}  {', '.join(sorted(t.scopes))}"
            + ("" if t.sandboxes is None else f"  sandboxes: {', '.join(t.sandboxes)}")
            for t in config.api.tokens
        ]
    else:
        lines.append("tokens:          none: the API is open to every local process (it listens on loopback only)")
    lines.append(f"presets:         {len(config.presets)}")
    width = max(len(name) for name in config.presets)
    for name in sorted(config.presets):
        preset = config.presets[name]
        ports = ", ".join(map(str, sorted(preset.ports))) if preset.ports is not None else "any"
        kind = "built-in" if name in BUILTIN_PRESETS else "configured"
        lines.append(f"  {name.ljust(width)}  {kind:<10}  {len(preset.hosts)} hosts, ports {ports}")
    if config.tunnel.enabled and (shared := shared_site_warning(config.tunnel.domain)) is not None:
        lines.append(f"warning:         {shared}")
    lines.append("configuration is valid")
    out.write("\n".join(lines) + "\n")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    """The flags of `gateway run`, checked; then `gateway.service.run` starts what they ask for."""
    from gateway.service import StartupError, run

    config = config_or_exit(args.config)
    _check_runnable(config)
    data_plane = bool(getattr(args, "data_plane", False))
    steer = bool(getattr(args, "steer", False))
    if steer and not data_plane:
        raise CliExit(EXIT_USAGE, "--steer needs --data-plane (steering without the engine would drop all traffic)")
    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    if workers > 1 and not data_plane:
        raise CliExit(EXIT_USAGE, "--workers is for the egress engine: it needs --data-plane")
    if workers > 1:
        from gateway.nft import check_worker_ports

        try:
            check_worker_ports(config.egress.listen_port, config.egress.dns_port, workers)
        except GatewayError as exc:
            raise CliExit(EXIT_USAGE, f"--workers {workers}: {exc.message}") from None

    def worker_argv(index: int) -> list[str]:
        argv = [sys.executable, "-m", "gateway.cli", "run", "--data-plane", "--event-loop", args.event_loop]
        argv += ["--workers", str(workers), "--worker-index", str(index)]
        return argv + (["--config", args.config] if args.config else [])

    try:
        return run(
            config,
            out,
            data_plane=data_plane,
            steer=steer,
            workers=workers,
            event_loop=args.event_loop,
            worker=args.worker_index,  # set when a main process's pool started this one (gateway.workers)
            worker_argv=worker_argv,
            config_path=args.config,
        )
    except StartupError as exc:
        raise CliExit(EXIT_USAGE if exc.config_error else EXIT_API_ERROR, exc.message) from None


# --------------------------------------------------------------------------- argument parsing


def _client_options(defaults: bool) -> Parser:
    """Options accepted both before and after the subcommand (`gateway --json sandbox list` or
    `gateway sandbox list --json`). Subcommand copies default to SUPPRESS so they do not
    overwrite a value given before the subcommand."""
    parser = Parser(add_help=False)

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--api",
        metavar="URL",
        default=default(None),
        help="API base URL (default: $GATEWAY_API_URL, else the configured [api] host and port)",
    )
    parser.add_argument(
        "--token",
        default=default(None),
        help="API token (default: $GATEWAY_TOKEN, which is better: other local users can see a flag in ps)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print the API's JSON answers verbatim"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default(None),
        help="configuration file (default: $GATEWAY_CONFIG, else built-in defaults)",
    )
    return parser


def _egress_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("egress (repeatable flags also take comma-separated lists)")
    group.add_argument(
        "--allow-host", action="append", metavar="HOST", help="allowed hostname or *.domain, optionally HOST:PORT"
    )
    group.add_argument(
        "--deny-host",
        action="append",
        metavar="HOST",
        help="refused hostname or *.domain (optionally HOST:PORT), whatever allows it; also under allow_all",
    )
    group.add_argument("--preset", action="append", metavar="NAME", help="include a preset (see `gateway presets`)")
    group.add_argument(
        "--egress-allow-cidr",
        "--allow-cidr",
        dest="allow_cidr",
        action="append",
        metavar="CIDR",
        help="allowed destination CIDR",
    )
    group.add_argument(
        "--egress-deny-cidr",
        "--deny-cidr",
        dest="deny_cidr",
        action="append",
        metavar="CIDR",
        help="refused destination CIDR (checked before every allow)",
    )
    group.add_argument(
        "--egress-allow-port",
        "--allow-port",
        dest="allow_port",
        action="append",
        metavar="PORT",
        help="restrict the allowed CIDRs to this destination port",
    )
    group.add_argument("--host-port", action="append", metavar="PORT", help="restrict --allow-host to this port")
    group.add_argument(
        "--egress-mode",
        metavar="MODE",
        help="allow_all or deny_all (default: deny_all when a CIDR or port flag is given)",
    )
    group.add_argument("--no-internet", action="store_true", help="allow_internet false: block all egress")


def _body_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", "-f", metavar="FILE", help="JSON record from a file (- for stdin)")
    parser.add_argument("--data", "-d", metavar="JSON", help="JSON record inline")


def build_parser() -> argparse.ArgumentParser:
    common = _client_options(defaults=False)
    parser = Parser(
        prog="gateway",
        description="Sandbox network gateway: run it, check its configuration, manage policies through its API.",
        parents=[_client_options(defaults=True)],
        epilog="Exit codes: 0 ok, 1 the API refused the request, 2 bad usage or configuration, 3 API unreachable, "
        "4 explain: the connection would be denied.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = commands.add_parser("run", parents=[common], help="run the gateway (control API and policy store)")
    p.add_argument(
        "--data-plane",
        action="store_true",
        help="also run the egress engine (transparent listeners on egress.listen_port; needs CAP_NET_ADMIN)",
    )
    p.add_argument(
        "--steer",
        action="store_true",
        help="with --data-plane: apply the nftables table and policy routing for the store's sandboxes "
        "in this network namespace, and re-apply when they change",
    )
    p.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="uvloop (default: libuv; cheaper TLS and loop work, the tunnel serves ~1.4x the requests) or the "
        "standard library's loop",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="with --data-plane: run the egress engine in N processes (0: one per CPU); worker k listens on "
        "egress.listen_port + k and serves the sandboxes the steering assigns to it",
    )
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the main process
    commands.add_parser("check-config", parents=[common], help="validate the configuration and summarise it")
    p = commands.add_parser(
        "demo", help="show the gateway working in throw-away namespaces: a sandbox, its decisions, a tunnel (root)"
    )
    p.add_argument("--no-wait", action="store_true", help="clean up and exit at once (0: every decision as expected)")
    p.add_argument("--port", type=int, default=8443, help="the loopback port the tunnel URL opens on (default 8443)")

    sandbox = commands.add_parser("sandbox", help="manage sandboxes").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    p = sandbox.add_parser("list", parents=[common], help="list sandboxes")
    p.add_argument("--profile")
    p.add_argument("--template")
    for name, text in (("get", "show a sandbox"), ("policy", "show its effective policy"), ("delete", "delete it")):
        sandbox.add_parser(name, parents=[common], help=text).add_argument("id")
    p = sandbox.add_parser("create", parents=[common], help="create a sandbox from a record or from flags")
    _body_options(p)
    p.add_argument("--id")
    p.add_argument("--address", action="append", metavar="IP", help="sandbox source address (repeatable)")
    # No argparse choices for values the API validates: its errors explain more (e.g. why not transit).
    p.add_argument("--profile", help="isolated (default), registry, allowlisted or unrestricted")
    p.add_argument("--template")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    _egress_options(p)
    for name, text in (("update", "replace a sandbox (PUT)"), ("patch", "merge-patch a sandbox (RFC 7396)")):
        p = sandbox.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
        _body_options(p)
    add_attach_commands(sandbox)  # local commands (root, no API)

    template = commands.add_parser("template", help="manage templates").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    template.add_parser("list", parents=[common], help="list templates")
    for name, text in (("get", "show a template"), ("delete", "delete it")):
        template.add_parser(name, parents=[common], help=text).add_argument("name")
    p = template.add_parser("create", parents=[common], help="create a template from a record or from flags")
    _body_options(p)
    p.add_argument("--name")
    p.add_argument("--description")
    _egress_options(p)
    p = template.add_parser("update", parents=[common], help="replace a template (PUT)")
    p.add_argument("name")
    _body_options(p)

    p = commands.add_parser("explain", parents=[common], help="would this connection be allowed?")
    p.add_argument("sandbox")
    p.add_argument("host", metavar="HOST[:PORT]", nargs="?", help="hostname (or address), optionally with :port")
    p.add_argument("--address", help="destination address, for CIDR rules")
    p.add_argument("--port")
    p.add_argument("--protocol", help="tls (default), http, tcp, udp or dns")
    p.add_argument("--method", help="an HTTP request on the connection, decided as on an inspected host (default GET)")
    p.add_argument("--path", help="that request's path (default /)")

    policy = commands.add_parser(
        "policy", help="try a policy before applying it; list and restore its revisions"
    ).add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    p = policy.add_parser(
        "diff", parents=[common], help="replay the recorded flows against a candidate record: what it newly denies"
    )
    p.add_argument("sandbox")
    _body_options(p)
    p.add_argument("--since", metavar="DURATION", help="how far back: 90s, 30m, 24h (default), 7d; at most 30d")
    p = policy.add_parser(
        "suggest", parents=[common], help="the smallest allowlist the recorded flows needed, as a record to apply"
    )
    p.add_argument("sandbox")
    p.add_argument("--since", metavar="DURATION", help="how far back: 90s, 30m, 24h (default), 7d; at most 30d")
    p.add_argument("--write", metavar="FILE", help="also write the candidate record (JSON) to FILE")
    p = policy.add_parser("revisions", parents=[common], help="a sandbox's recent policy revisions, newest first")
    p.add_argument("sandbox")
    p = policy.add_parser(
        "restore", parents=[common], help="apply one of its recent revisions again (default: the previous one)"
    )
    p.add_argument("sandbox")
    p.add_argument("--revision", metavar="R", help="the revision to restore (r + 12 hex digits, from `revisions`)")

    commands.add_parser("status", parents=[common], help="store backend, counts, rejected records")
    commands.add_parser("presets", parents=[common], help="list presets")
    _audit_parser(commands, common)
    add_tunnel_parsers(commands, common)
    certs = commands.add_parser("certs", help="local certificates: the tunnel's, the inspection CA").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    add_tunnel_certs_parser(certs, common)
    add_tier_certs_parser(certs, common)
    p = commands.add_parser("completion", help="print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=SHELLS)
    add_examples(parser)
    return parser


def _audit_parser(commands: Any, common: Parser) -> None:
    audit = commands.add_parser("audit", help="flow record batches (NDJSON) of a sandbox").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    p = audit.add_parser("list", parents=[common], help="list a sandbox's audit batches, oldest first")
    p.add_argument("sandbox")
    p.add_argument("--since-us", type=int, default=0, metavar="N", help="only batches from this time (µs since epoch)")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="batches per page (1-1000)")
    p.add_argument("--all", action="store_true", help="follow the continuation tokens to the last batch")
    p = audit.add_parser("get", parents=[common], help="print one batch (NDJSON, one flow record per line)")
    p.add_argument("sandbox")
    p.add_argument("name", help="a batch name from `audit list`")
    p = audit.add_parser("tail", parents=[common], help="follow flow records live, one line each (Ctrl-C ends)")
    p.add_argument("sandbox", nargs="?", help="only this sandbox's records")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--deny", action="store_true", help="only denials")
    only.add_argument(
        "--would-deny", action="store_true", help="only what report mode let pass that enforce would deny"
    )
    p = audit.add_parser("denial", parents=[common], help="the flow record of a denial, by the id the sandbox was told")
    p.add_argument("denial_id", help="as in X-Gateway-Denial-Id or a DNS answer's EDE text")
    p = audit.add_parser("dns", parents=[common], help="a sandbox's recent DNS queries (needs --data-plane)")
    p.add_argument("sandbox")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="how many of the latest queries (1-1000)")


#: A command returns its exit code, or None for EXIT_OK.
CLIENT_COMMANDS: dict[str, Callable[[Context, argparse.Namespace], int | None]] = {
    "sandbox": cmd_sandbox,
    "template": cmd_template,
    "explain": cmd_explain,
    "policy": cmd_policy,
    "status": cmd_status,
    "presets": cmd_presets,
    "audit": cmd_audit,
}


def main(argv: Sequence[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command == "completion":
            out.write(completion_script(parser, args.shell))
            return EXIT_OK
        if args.command == "run":
            return cmd_run(args, out)
        if args.command == "check-config":
            return cmd_check_config(args, out)
        if args.command == "demo":
            return run_demo(out, wait=not args.no_wait, port=args.port)
        if args.command == "sandbox" and args.action in ("attach", "detach"):
            return run_attach_command(args, out, err)
        if args.command == "certs":
            return int(args.run(args, out))
        if args.command in TUNNEL_COMMANDS:
            return run_tunnel_command(args, out)
        ctx = Context(client_from_args(args), args.json, out)
        return CLIENT_COMMANDS[args.command](ctx, args) or EXIT_OK
    except ApiError as exc:
        if args is not None and args.json and exc.response.text:
            err.write(exc.response.text.rstrip("\n") + "\n")
        else:
            err.write(exc.describe() + "\n")
        return EXIT_API_ERROR
    except ApiUnreachable as exc:
        err.write(exc.message + "\n")
        return EXIT_UNREACHABLE
    except CliExit as exc:
        if exc.message:
            err.write(exc.message + "\n")
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
