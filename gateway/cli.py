"""The `gateway` command: run the gateway, check its configuration, and drive the control API.

Exit codes: 0 success (for `explain`: the connection would be allowed); 1 the API refused
the request (`CODE: message (field x)` on stderr); 2 bad invocation or invalid
configuration; 3 the API could not be reached; 4 `explain`: the connection would be denied.

Client commands find the API from `--api`, else `GATEWAY_API_URL`, else the configured
`[api] host/port`; the token from `--token`, else `GATEWAY_TOKEN`. `--json` prints the
API's JSON answers verbatim (errors too, on stderr). The client never follows redirects
and never uses an HTTP proxy, so the token is only ever sent to the URL given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from gateway import __version__
from gateway.errors import GatewayError
from gateway.untrusted import InvalidJson, parse_decimal, parse_json

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DENIED = 4  # `explain`: the connection would be denied (a verdict, not a failure)
DEFAULT_TIMEOUT = 15.0


class CliExit(Exception):
    """Stop with a message on stderr and an exit code."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- HTTP client


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    text: str

    @property
    def data(self) -> Any:
        return json.loads(self.text) if self.text else None


class ApiError(Exception):
    def __init__(self, response: ApiResponse) -> None:
        super().__init__(f"HTTP {response.status}")
        self.response = response

    def describe(self) -> str:
        """`CODE: message (field x)`, the same form GatewayError prints."""
        try:
            body = self.response.data
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            field = body.get("field")
            return f"{body['code']}: {body.get('message', '')}" + (f" (field {field})" if field else "")
        return f"HTTP_{self.response.status}: {self.response.text.strip()[:200] or 'no body'}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect would carry the bearer token elsewhere; the API never sends one


class ApiClient:
    """A small synchronous client (urllib) for the control API."""

    def __init__(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str | None] | None = None,
        content_type: str = "application/json",
    ) -> ApiResponse:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                return ApiResponse(answer.status, answer.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as exc:
            raise ApiError(ApiResponse(exc.code, exc.read().decode("utf-8", "replace"))) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            why = "connection refused" if isinstance(reason, ConnectionRefusedError) else str(reason)
            raise CliExit(EXIT_UNREACHABLE, self._unreachable(why)) from None
        except (TimeoutError, ConnectionError) as exc:
            raise CliExit(EXIT_UNREACHABLE, self._unreachable(str(exc) or type(exc).__name__)) from None

    def _unreachable(self, why: str) -> str:
        return (
            f"UNREACHABLE: cannot reach the gateway API at {self.base_url}: {why} "
            "(is `gateway run` running? set --api or GATEWAY_API_URL)"
        )


# --------------------------------------------------------------------------- output


def _cell(value: Any) -> str:
    """One value for a person: never Python's `None`/`True`, nor an empty cell."""
    if value is None or value == [] or value == {} or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1] for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "labels":
            out.extend(_flatten(value, f"{name}."))
        else:
            out.append((name, value))
    return out


def format_block(data: Mapping[str, Any]) -> str:
    """`key: value` lines, nested objects as dotted keys, aligned on the colon."""
    pairs = _flatten(data)
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return "\n".join(f"{(key + ':').ljust(width)} {_cell(value)}" for key, value in pairs)


def _egress_summary(egress: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if egress.get("allow_internet") is False:
        parts.append("internet off")
    if egress.get("mode"):
        parts.append(str(egress["mode"]))
    for key, word in (
        ("allow_hosts", "host"),
        ("presets", "preset"),
        ("allow_cidrs", "allow-cidr"),
        ("deny_cidrs", "deny-cidr"),
    ):
        count = len(egress.get(key) or ())
        if count:
            parts.append(f"{count} {word}{'s' if count > 1 else ''}")
    return ", ".join(parts) or "-"


def _target(request: Mapping[str, Any]) -> str:
    where = request.get("host") or request.get("address") or "?"
    if ":" in where:
        where = f"[{where}]"
    if request.get("port") is not None:
        where += f":{request['port']}"
    if request.get("protocol") not in (None, "tls"):
        where += f"/{request['protocol']}"
    if request.get("host") and request.get("address"):
        where += f" via {request['address']}"
    return where


def format_verdict(answer: Mapping[str, Any]) -> str:
    """`DENY  evil.com:443  host not in allowlist  (rule default:deny)`."""
    word = "ALLOW" if answer.get("allowed") else "DENY"
    return f"{word}  {_target(answer.get('request') or {})}  {answer.get('reason')}  (rule {answer.get('rule')})"


# --------------------------------------------------------------------------- request bodies


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


def _load_body(args: argparse.Namespace) -> Any | None:
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


def _require_body(args: argparse.Namespace) -> Any:
    body = _load_body(args)
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


def _record_from(args: argparse.Namespace, flag_names: Sequence[str], build: Callable[[], dict[str, Any]]) -> Any:
    body = _load_body(args)
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


# --------------------------------------------------------------------------- client commands


@dataclass
class Context:
    client: ApiClient
    json_output: bool
    out: TextIO

    def emit(self, response: ApiResponse, human: Callable[[Any], str] | None) -> None:
        if self.json_output:
            if response.text:
                self.out.write(response.text.rstrip("\n") + "\n")
            return
        if human is not None:
            text = human(response.data)
            if text:
                self.out.write(text + "\n")


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _sandbox_rows(data: Any) -> str:
    sandboxes = data["sandboxes"]
    if not sandboxes:
        return "no sandboxes"
    rows = [(s["id"], s["profile"], s["template"], s["addresses"], _egress_summary(s["egress"])) for s in sandboxes]
    return format_table(("ID", "PROFILE", "TEMPLATE", "ADDRESSES", "EGRESS"), rows)


def _template_rows(data: Any) -> str:
    templates = data["templates"]
    if not templates:
        return "no templates"
    rows = [(t["name"], _egress_summary(t["egress"]), t["limits"], t["description"]) for t in templates]
    return format_table(("NAME", "EGRESS", "LIMITS", "DESCRIPTION"), rows)


def _preset_rows(data: Any) -> str:
    rows = [
        (p["name"], p["ports"] if p["ports"] is not None else "any", len(p["hosts"]), p["description"])
        for p in data["presets"]
    ]
    return format_table(("NAME", "PORTS", "HOSTS", "DESCRIPTION"), rows)


def format_time(epoch: float, now: float | None = None) -> str:
    """`2026-12-02T03:36:21Z (5 min ago)`: ISO 8601 in UTC, and how long ago (or how soon) for a person."""
    from datetime import UTC, datetime

    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    delta = round(now - epoch)
    span = abs(delta)
    for size, unit in ((86_400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if span >= size or size == 1:
            amount = f"{span // size} {unit}"
            break
    return f"{stamp} ({amount} ago)" if delta >= 0 else f"{stamp} (in {amount})"


def _status_block(data: Any) -> str:
    rejected = data.get("rejected") or []
    lines = [format_block({k: v for k, v in data.items() if k != "rejected"} | {"rejected": len(rejected)})]
    for item in rejected:
        field = f" (field {item['field']})" if item.get("field") else ""
        since = f" since {format_time(item['at'])}" if isinstance(item.get("at"), int | float) else ""
        lines.append(f"  {item['kind']} {item['key']}{since}: {item['code']}: {item['message']}{field}")
    return "\n".join(lines)


def cmd_sandbox(ctx: Context, args: argparse.Namespace) -> None:
    c = ctx.client
    action = args.action
    if action == "list":
        answer = c.request("GET", "/v1/sandboxes", query={"profile": args.profile, "template": args.template})
        ctx.emit(answer, _sandbox_rows)
    elif action == "get":
        ctx.emit(c.request("GET", f"/v1/sandboxes/{_quote(args.id)}"), format_block)
    elif action == "policy":
        ctx.emit(c.request("GET", f"/v1/sandboxes/{_quote(args.id)}/policy"), format_block)
    elif action == "create":
        body = _record_from(args, SANDBOX_FLAGS + EGRESS_FLAGS, lambda: sandbox_from_flags(args))
        answer = c.request("POST", "/v1/sandboxes", body)
        ctx.emit(answer, lambda d: f"created sandbox {d['id']}\n" + format_block(d))
    elif action == "update":
        answer = c.request("PUT", f"/v1/sandboxes/{_quote(args.id)}", _require_body(args))
        ctx.emit(answer, lambda d: f"replaced sandbox {d['id']}\n" + format_block(d))
    elif action == "patch":
        patch = _require_body(args)
        answer = c.request(
            "PATCH", f"/v1/sandboxes/{_quote(args.id)}", patch, content_type="application/merge-patch+json"
        )
        ctx.emit(answer, lambda d: f"patched sandbox {d['id']}\n" + format_block(d))
    elif action == "delete":
        ctx.emit(c.request("DELETE", f"/v1/sandboxes/{_quote(args.id)}"), lambda _: f"deleted sandbox {args.id}")


def cmd_template(ctx: Context, args: argparse.Namespace) -> None:
    c = ctx.client
    action = args.action
    if action == "list":
        ctx.emit(c.request("GET", "/v1/templates"), _template_rows)
    elif action == "get":
        ctx.emit(c.request("GET", f"/v1/templates/{_quote(args.name)}"), format_block)
    elif action == "create":
        body = _record_from(args, TEMPLATE_FLAGS + EGRESS_FLAGS, lambda: template_from_flags(args))
        answer = c.request("POST", "/v1/templates", body)
        ctx.emit(answer, lambda d: f"created template {d['name']}\n" + format_block(d))
    elif action == "update":
        answer = c.request("PUT", f"/v1/templates/{_quote(args.name)}", _require_body(args))
        ctx.emit(answer, lambda d: f"replaced template {d['name']}\n" + format_block(d))
    elif action == "delete":
        ctx.emit(c.request("DELETE", f"/v1/templates/{_quote(args.name)}"), lambda _: f"deleted template {args.name}")


def cmd_explain(ctx: Context, args: argparse.Namespace) -> int:
    query = {"host": args.host, "address": args.address, "protocol": args.protocol, "port": args.port}
    answer = ctx.client.request("GET", f"/v1/sandboxes/{_quote(args.sandbox)}/explain", query=query)
    ctx.emit(answer, format_verdict)
    return EXIT_OK if answer.data.get("allowed") else EXIT_DENIED


def cmd_status(ctx: Context, args: argparse.Namespace) -> None:
    ctx.emit(ctx.client.request("GET", "/v1/status"), _status_block)


def cmd_presets(ctx: Context, args: argparse.Namespace) -> None:
    ctx.emit(ctx.client.request("GET", "/v1/presets"), _preset_rows)


# --------------------------------------------------------------------------- run / check-config


def _load_config(path: str | None) -> Any:
    from gateway.settings import load_config

    try:
        return load_config(path)
    except GatewayError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None


def _api_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", ""):  # listening everywhere: reach it on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _listen_description(bound: Sequence[tuple[Any, ...]]) -> str:
    """Where the API listens, `(host, port, ...)` per socket as bound; for a wildcard, how to reach it here."""
    described = []
    for host, port, *_ in bound:
        if host in ("0.0.0.0", "::", ""):
            every = {"0.0.0.0": "every IPv4 address", "::": "every IPv6 address", "": "every address"}[host]
            shown = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
            described.append(f"{shown} ({every}; from this host {_api_url(host, port)})")
        else:
            described.append(_api_url(host, port))
    return " and ".join(described)


def _redact_url(url: str) -> str:
    """A Redis URL without its credentials, for printing."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def _store_description(config: Any) -> str:
    if config.store.backend == "redis":
        return f"redis {_redact_url(config.store.redis_url)} (prefix {config.store.redis_prefix})"
    return f"embedded {config.store.path.resolve()}"


def check_runnable(config: Any) -> None:
    """What `gateway run` refuses at start-up beyond what loading the configuration checks: `run` calls this
    before it starts anything, and `check-config` calls it, so the two never disagree. Raises CliExit."""
    from gateway.api import check_api_exposure
    from gateway.tunnel.certs import build_server_context

    try:
        check_api_exposure(config)
        if config.tunnel.enabled:  # the tunnel serves from its first second: the pair must load now
            build_server_context(config.tunnel.cert_path, config.tunnel.key_path)
    except GatewayError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.presets import BUILTIN_PRESETS
    from gateway.tunnel.config import shared_site_warning

    config = _load_config(args.config)
    check_runnable(config)
    limits = config.default_limits
    lines = [
        f"config:          {config.source}",
        f"store:           {_store_description(config)}",
        f"api:             {_listen_description([(config.api_host, config.api_port)])}",
        f"sandbox subnets: {', '.join(str(n) for n in config.sandbox_subnets)}",
        f"default limits:  {limits.connections_per_minute} conn/min, {limits.bandwidth_mbit} Mbit/s "
        f"(burst {limits.burst_mbit}), {limits.dns_queries_per_minute} DNS queries/min",
    ]
    if config.tokens:
        lines.append(f"tokens:          {len(config.tokens)}")
        width = max(len(t.name) for t in config.tokens)
        lines += [f"  {t.name.ljust(width)}  {', '.join(sorted(t.scopes))}" for t in config.tokens]
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
    from gateway.logs import configure_logging

    config = _load_config(args.config)
    check_runnable(config)
    configure_logging(config.log_format, config.log_level)
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
    loop_factory = None
    if args.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    if args.worker_index is not None:  # started by a main process's pool (see gateway.workers)
        from gateway.workers import serve_worker

        return asyncio.run(serve_worker(config, args.worker_index, workers), loop_factory=loop_factory)

    def worker_argv(index: int) -> list[str]:
        argv = [sys.executable, "-m", "gateway.cli", "run", "--data-plane", "--event-loop", args.event_loop]
        argv += ["--workers", str(workers), "--worker-index", str(index)]
        return argv + (["--config", args.config] if args.config else [])

    serve = _serve(config, out, data_plane=data_plane, steer=steer, workers=workers, worker_argv=worker_argv)
    return asyncio.run(serve, loop_factory=loop_factory)


async def _serve(
    config: Any,
    out: TextIO,
    *,
    data_plane: bool = False,
    steer: bool = False,
    workers: int = 1,
    worker_argv: Callable[[int], list[str]] | None = None,
) -> int:
    import structlog
    from aiohttp import web

    from gateway.api import create_app
    from gateway.egress import DataPlane
    from gateway.flowlog import FlowLog
    from gateway.stores import open_store
    from gateway.tunnel.server import TunnelService
    from gateway.workers import WorkerPool

    log = structlog.get_logger("gateway.cli")
    store = open_store(config.policy_context(), config.store)
    flows = FlowLog.from_config(config)  # one flow log for the API's audit routes and every data-plane component
    tunnels: TunnelService | None = None
    pool = WorkerPool(workers, worker_argv) if workers > 1 and worker_argv is not None else None
    plane = DataPlane(config, store, flows, steer=steer, pool=pool) if data_plane else None  # nothing listens yet
    try:
        if config.tunnel.enabled:  # loads the certificate now: a missing one stops start-up with CERT_INVALID
            tunnels = TunnelService(store, config, config.tunnel, flows=flows)
        # refuses an exposed API without tokens before anything starts
        app = create_app(
            store,
            config,
            flows=flows,
            tunnels=tunnels.store if tunnels else None,
            dns=plane.dns if plane else None,
            data_plane_status=plane.status if plane else None,
            unready=plane.unready if plane else None,
        )
    except GatewayError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    started: DataPlane | None = None
    try:
        try:
            await store.start()
        except GatewayError as exc:
            raise CliExit(EXIT_API_ERROR, str(exc)) from None
        except OSError as exc:  # the embedded store creates its file and folder on first start
            raise CliExit(EXIT_API_ERROR, f"STORE_UNAVAILABLE: {_store_description(config)}: {exc}") from None
        await flows.start()
        if tunnels is not None:
            await tunnels.start()
            out.write(f"tunnels served on https://*.{config.tunnel.domain}:{config.tunnel.origin_port}/\n")
        await runner.setup()
        site = web.TCPSite(runner, config.api_host, config.api_port)
        try:
            await site.start()
        except OSError as exc:
            raise CliExit(
                EXIT_API_ERROR,
                f"LISTEN_FAILED: cannot listen on {config.api_host}:{config.api_port}: {exc.strerror or exc}",
            ) from None
        listening = _listen_description(runner.addresses)  # as bound, not as configured
        out.write(f"gateway API listening on {listening}, store {_store_description(config)}\n")
        out.flush()
        if plane is not None:
            try:
                await plane.start()
            except (GatewayError, OSError) as exc:
                await plane.close()
                raise CliExit(EXIT_API_ERROR, f"DATA_PLANE_FAILED: {exc}") from None
            started = plane
            steering = " (steering applied)" if steer else ""
            first = config.egress.listen_port
            ports = f"ports {first}-{first + workers - 1} ({workers} workers)" if workers > 1 else f"port {first}"
            out.write(f"egress engine listening on {ports}{steering}\n")
            out.flush()
        await stop.wait()
        log.info("gateway.stopping")
    finally:
        if started is not None:
            await started.close()
        await runner.cleanup()
        if tunnels is not None:
            await tunnels.close()
        await flows.close()  # writes what is still queued
        await store.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return EXIT_OK


# --------------------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise CliExit(EXIT_USAGE, f"{self.prog}: error: {message}")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Unknown arguments are refused by the (sub)command that got them, with that command's usage:
        argparse would hand them up to the top level, whose usage says nothing about the subcommand."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _client_options(defaults: bool) -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand (`gateway --json sandbox list` or
    `gateway sandbox list --json`). Subcommand copies default to SUPPRESS so they do not
    overwrite a value given before the subcommand."""
    parser = argparse.ArgumentParser(add_help=False)

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
    group.add_argument("--allow-host", action="append", metavar="HOST", help="allowed hostname or *.domain")
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
    parser = _Parser(
        prog="gateway",
        description="Sandbox network gateway: run it, check its configuration, manage policies through its API.",
        parents=[_client_options(defaults=True)],
        epilog="Exit codes: 0 ok, 1 the API refused the request, 2 bad usage or configuration, 3 API unreachable, "
        "4 explain: the connection would be denied.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

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

    sandbox = commands.add_parser("sandbox", help="manage sandboxes").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
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
    from gateway.attach import add_attach_commands  # local commands (root, no API)

    add_attach_commands(sandbox)

    template = commands.add_parser("template", help="manage templates").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
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

    commands.add_parser("status", parents=[common], help="store backend, counts, rejected records")
    commands.add_parser("presets", parents=[common], help="list presets")
    _audit_parser(commands, common)
    from gateway.tunnel.cli import add_parsers as _tunnel_parsers  # here: gateway.tunnel.cli imports this module

    _tunnel_parsers(commands, common)
    return parser


def _client(args: argparse.Namespace) -> ApiClient:
    url = args.api or os.environ.get("GATEWAY_API_URL")
    if not url:
        config = _load_config(args.config)
        url = _api_url(config.api_host, config.api_port)
    if not url.startswith(("http://", "https://")):
        raise CliExit(EXIT_USAGE, f"--api {url!r} must start with http:// or https://")
    return ApiClient(url, args.token or os.environ.get("GATEWAY_TOKEN") or None)


# --------------------------------------------------------------------------- audit batches (flow records)


def _audit_rows(batches: Sequence[Mapping[str, Any]]) -> str:
    from datetime import UTC, datetime

    if not batches:
        return "no audit batches"
    rows = [
        (b["name"], datetime.fromtimestamp(b["first_ts_us"] / 1e6, UTC).isoformat(timespec="milliseconds"), b["size"])
        for b in batches
    ]
    return format_table(("NAME", "FIRST RECORD (UTC)", "BYTES"), rows)


def _dns_rows(queries: Sequence[Mapping[str, Any]]) -> str:
    from datetime import UTC, datetime

    if not queries:
        return "no DNS queries"
    rows = [
        (
            datetime.fromtimestamp(q["time"], UTC).isoformat(timespec="milliseconds"),
            q["name"],
            q["type"],
            q["rcode"],
            ", ".join(q["answers"]) or "-",
            "allow" if q["allowed"] else "DENY",
            q["reason"],
        )
        for q in queries
    ]
    return format_table(("TIME (UTC)", "NAME", "TYPE", "RCODE", "ANSWERS", "VERDICT", "REASON"), rows)


def cmd_audit(ctx: Context, args: argparse.Namespace) -> None:
    """`audit list` pages through the batches (every page with --all); `audit get` prints a batch's NDJSON;
    `audit dns` shows the sandbox's recent DNS queries."""
    if args.action == "dns":
        answer = ctx.client.request(
            "GET", f"/v1/sandboxes/{_quote(args.sandbox)}/dns-log", query={"limit": str(args.limit)}
        )
        ctx.emit(answer, lambda data: _dns_rows(data["queries"]))
        return
    path = f"/v1/sandboxes/{_quote(args.sandbox)}/audit-batches"
    if args.action == "get":
        answer = ctx.client.request("GET", f"{path}/{_quote(args.name)}")
        ctx.out.write(answer.text if answer.text.endswith("\n") or not answer.text else answer.text + "\n")
        return
    batches: list[Any] = []
    token: str | None = None
    while True:
        query = {"since_us": str(args.since_us), "limit": str(args.limit), "continuation_token": token}
        page = ctx.client.request("GET", path, query=query).data
        batches += page["batches"]
        token = page["next_continuation_token"]
        if token is None or not args.all:
            break
    if ctx.json_output:
        ctx.out.write(json.dumps({"batches": batches, "next_continuation_token": token}) + "\n")
        return
    ctx.out.write(_audit_rows(batches) + "\n")
    if token is not None:
        ctx.out.write("more batches follow: use --all, or --since-us after the last one shown\n")


def _audit_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    audit = commands.add_parser("audit", help="flow record batches (NDJSON) of a sandbox").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    p = audit.add_parser("list", parents=[common], help="list a sandbox's audit batches, oldest first")
    p.add_argument("sandbox")
    p.add_argument("--since-us", type=int, default=0, metavar="N", help="only batches from this time (µs since epoch)")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="batches per page (1-1000)")
    p.add_argument("--all", action="store_true", help="follow the continuation tokens to the last batch")
    p = audit.add_parser("get", parents=[common], help="print one batch (NDJSON, one flow record per line)")
    p.add_argument("sandbox")
    p.add_argument("name", help="a batch name from `audit list`")
    p = audit.add_parser("dns", parents=[common], help="a sandbox's recent DNS queries (needs --data-plane)")
    p.add_argument("sandbox")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="how many of the latest queries (1-1000)")


#: A command returns its exit code, or None for EXIT_OK.
CLIENT_COMMANDS: dict[str, Callable[[Context, argparse.Namespace], int | None]] = {
    "sandbox": cmd_sandbox,
    "template": cmd_template,
    "explain": cmd_explain,
    "status": cmd_status,
    "presets": cmd_presets,
    "audit": cmd_audit,
}


def main(argv: Sequence[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return cmd_run(args, out)
        if args.command == "check-config":
            return cmd_check_config(args, out)
        if args.command == "sandbox" and args.action in ("attach", "detach"):
            from gateway.attach import run_attach_command

            return run_attach_command(args, out, err)
        if args.command in ("certs", "tunnel"):
            from gateway.tunnel.cli import run_command

            return run_command(args, out)
        ctx = Context(_client(args), args.json, out)
        return CLIENT_COMMANDS[args.command](ctx, args) or EXIT_OK
    except ApiError as exc:
        if args is not None and args.json and exc.response.text:
            err.write(exc.response.text.rstrip("\n") + "\n")
        else:
            err.write(exc.describe() + "\n")
        return EXIT_API_ERROR
    except CliExit as exc:
        if exc.message:
            err.write(exc.message + "\n")
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m gateway.cli` runs this file as __main__, a second copy beside the `gateway.cli` that
    # gateway.tunnel.cli imports: run that one, so there is one CliExit (and one of everything else).
    from gateway.cli import main as _main

    raise SystemExit(_main())
