"""Output for people: tables, `key: value` blocks, verdicts, times, and the one-line descriptions of where the
API listens and which store is used. Pure functions of the API's answers (or the configuration): no I/O.

Every value goes through `cell`, so a person never sees Python's `None`/`True` nor an empty cell.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.client import api_url
from gateway.settings import Config


def cell(value: Any) -> str:
    """One value for a person: never Python's `None`/`True`, nor an empty cell."""
    if value is None or value == [] or value == {} or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items())
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [list(headers)] + [[cell(v) for v in row] for row in rows]
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
    return "\n".join(f"{(key + ':').ljust(width)} {cell(value)}" for key, value in pairs)


def egress_summary(egress: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if egress.get("allow_internet") is False:
        parts.append("internet off")
    if egress.get("mode"):
        parts.append(str(egress["mode"]))
    for key, word in (
        ("allow_hosts", "host"),
        ("deny_hosts", "deny-host"),
        ("presets", "preset"),
        ("allow_cidrs", "allow-cidr"),
        ("deny_cidrs", "deny-cidr"),
        ("inspect", "inspect rule"),
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


def _header_condition(match: Mapping[str, Any]) -> str:
    if match.get("absent"):
        return f"no {match['name']}"
    return f"{match['name']}: {match['equals']}" if "equals" in match else f"{match['name']}: {match.get('prefix')}..."


def format_verdict(answer: Mapping[str, Any]) -> str:
    """`DENY  evil.com:443  host not in allowlist  (rule default:deny)`; with an HTTP request asked,
    `DENY  POST api.github.com:443 /repos/x  read-only GitHub  (rule inspect api.github.com)`; then the precedence
    chain, a numbered line per rule looked at, the deciding one marked `=>`."""
    word = "WOULD-DENY" if answer.get("would_deny") else "ALLOW" if answer.get("allowed") else "DENY"
    request = answer.get("request") or {}
    target = _target(request)
    if request.get("method"):
        target = f"{request['method']} {target} {request.get('path')}"
    line = f"{word}  {target}  {answer.get('reason')}  (rule {answer.get('rule')})"
    http = answer.get("http") or {}
    conditions = [_header_condition(match) for match in http.get("header_conditions", ())]
    if http.get("allowed") and conditions:
        line += f"\n  if its headers also match: {'; '.join(conditions)}"
    steps = answer.get("chain") or ()
    if steps:
        line += "\n  precedence chain:" + "".join(
            f"\n  {index:>3}. {'=> ' if step.get('decided') else ''}{step.get('rule')}: {step.get('result')}"
            for index, step in enumerate(steps, 1)
        )
    return line


def sandbox_rows(data: Any) -> str:
    sandboxes = data["sandboxes"]
    if not sandboxes:
        return "no sandboxes"
    rows = [(s["id"], s["profile"], s["template"], s["addresses"], egress_summary(s["egress"])) for s in sandboxes]
    return format_table(("ID", "PROFILE", "TEMPLATE", "ADDRESSES", "EGRESS"), rows)


def revision_rows(data: Any) -> str:
    """`gateway policy revisions`: newest first, the one in force marked."""
    rows = [
        (
            ("* " if r["revision"] == data["revision"] else "  ") + r["revision"],
            format_time(r["at"]),
            r["source"],
            r["template"],
            egress_summary(r["record"].get("egress") or {}),
        )
        for r in data["revisions"]
    ]
    return format_table(("REVISION", "ACCEPTED", "SOURCE", "TEMPLATE", "EGRESS"), rows) + "\n(* in force)"


def template_rows(data: Any) -> str:
    templates = data["templates"]
    if not templates:
        return "no templates"
    rows = [(t["name"], egress_summary(t["egress"]), t["limits"], t["description"]) for t in templates]
    return format_table(("NAME", "EGRESS", "LIMITS", "DESCRIPTION"), rows)


def preset_rows(data: Any) -> str:
    rows = [
        (p["name"], p["ports"] if p["ports"] is not None else "any", len(p["hosts"]), p["description"])
        for p in data["presets"]
    ]
    return format_table(("NAME", "PORTS", "HOSTS", "DESCRIPTION"), rows)


def format_time(epoch: float, now: float | None = None) -> str:
    """`2026-12-02T03:36:21Z (5 min ago)`: ISO 8601 in UTC, and how long ago (or how soon) for a person."""
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    delta = round(now - epoch)
    span = abs(delta)
    for size, unit in ((86_400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if span >= size or size == 1:
            amount = f"{span // size} {unit}"
            break
    return f"{stamp} ({amount} ago)" if delta >= 0 else f"{stamp} (in {amount})"


def status_block(data: Any) -> str:
    rejected = data.get("rejected") or []
    lines = [format_block({k: v for k, v in data.items() if k != "rejected"} | {"rejected": len(rejected)})]
    for item in rejected:
        field = f" (field {item['field']})" if item.get("field") else ""
        since = f" since {format_time(item['at'])}" if isinstance(item.get("at"), int | float) else ""
        lines.append(f"  {item['kind']} {item['key']}{since}: {item['code']}: {item['message']}{field}")
    return "\n".join(lines)


def listen_description(bound: Sequence[tuple[Any, ...]]) -> str:
    """Where the API listens, `(host, port, ...)` per socket as bound; for a wildcard, how to reach it here."""
    described = []
    for host, port, *_ in bound:
        if host in ("0.0.0.0", "::", ""):
            every = {"0.0.0.0": "every IPv4 address", "::": "every IPv6 address", "": "every address"}[host]
            shown = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
            described.append(f"{shown} ({every}; from this host {api_url(host, port)})")
        else:
            described.append(api_url(host, port))
    return " and ".join(described)


def redact_url(url: str) -> str:
    """A Redis URL without its credentials, for printing."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def store_description(config: Config) -> str:
    if config.store.backend == "redis":
        return f"redis {redact_url(config.store.redis_url)} (prefix {config.store.redis_prefix})"
    return f"embedded {config.store.path.resolve()}"


def audit_rows(batches: Sequence[Mapping[str, Any]]) -> str:
    if not batches:
        return "no audit batches"
    rows = [
        (b["name"], datetime.fromtimestamp(b["first_ts_us"] / 1e6, UTC).isoformat(timespec="milliseconds"), b["size"])
        for b in batches
    ]
    return format_table(("NAME", "FIRST RECORD (UTC)", "BYTES"), rows)


def dns_rows(queries: Sequence[Mapping[str, Any]]) -> str:
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


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_FLOW_VERDICTS = {"allow": "allow", "would_deny": "WOULD-DENY"}


def flow_line(record: Mapping[str, Any]) -> str:
    """One flow record as `gateway audit tail` shows it: time (UTC), sandbox, verdict, protocol, what the sandbox
    asked for (hostname, else address) -> what was dialled, bytes for allows, the request for inspected ones, rule
    and reason."""
    when = datetime.fromtimestamp(record["end_us"] / 1e6, UTC).strftime("%H:%M:%S.%f")[:-3]
    verdict = _FLOW_VERDICTS.get(record["verdict"], "DENY")
    asked = _endpoint(record.get("hostname") or record["orig_dst_addr"], record["orig_dst_port"])
    parts = [when, record["sandbox"], verdict, record["protocol"], asked, "->",
             _endpoint(record["dst_addr"], record["dst_port"])]  # fmt: skip
    if record.get("method"):
        parts.append(f"{record['method']} {record.get('path') or '/'} {record.get('status') or '-'}")
    if record["verdict"] != "deny":
        parts.append(f"up={record['bytes_up']} down={record['bytes_down']}")
    parts.append(f"rule={record['rule'] or '-'}")
    if record.get("revision"):
        parts.append(f"revision={record['revision']}")
    parts.append(f"reason={json.dumps(record['reason'])}")
    if record.get("message"):
        parts.append(f"message={json.dumps(record['message'])}")
    if record.get("denial_id"):
        parts.append(f"denial={record['denial_id']}")
    return " ".join(parts)


def _utc(epoch_us: int) -> str:
    """A record time (µs since the epoch) as the tables show it: ISO 8601 UTC to the second."""
    return datetime.fromtimestamp(epoch_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _diff_rows(groups: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (
            g["name"] or ", ".join(g["addresses"]) + " (no name: by address only)",
            g["port"],
            g["protocol"],
            g["count"],
            _utc(g["first_seen_us"]),
            _utc(g["last_seen_us"]),
            g["recorded_rule"],
            g["rule"] + (" (report mode: would deny)" if g["verdict"] == "would_deny" else ""),
        )
        for g in groups
    ]
    return format_table(("NAME", "PORT", "PROTO", "FLOWS", "FIRST SEEN", "LAST SEEN", "WAS", "NOW"), rows)


def diff_block(data: Mapping[str, Any]) -> str:
    """`gateway policy diff`: what the candidate newly denies and allows, what stays, what was not replayed."""
    lines = [
        f"sandbox {data['sandbox']}: {data['records']} records since {_utc(data['since_us'])}, "
        f"{data['replayed']} replayed ({data['decisions']} distinct decisions); nothing was applied",
    ]
    for title, key in (("newly denied", "newly_denied"), ("newly allowed", "newly_allowed")):
        lines.append("")
        lines.append(f"{title}: {data[key + '_records']} records")
        if data[key]:
            lines.append(_diff_rows(data[key]))
    if data["truncated"]:
        lines.append("(only the largest groups are listed; --json has the same list)")
    lines.append("")
    lines.append(f"unchanged: {data['unchanged_allowed']} allowed, {data['unchanged_denied']} denied")
    if any(g["by_address_only"] for g in (*data["newly_denied"], *data["newly_allowed"])):
        lines.append(
            "flows without a name are decided by address only: a name the sandbox resolved through the gateway's "
            "DNS could decide them otherwise"
        )
    for skipped in data["not_replayed"]:
        lines.append(f"not replayed: {skipped['count']} records ({skipped['rule']}): {skipped['explanation']}")
    if data["unreadable"]:
        lines.append(f"unreadable: {data['unreadable']} lines of the batches are not flow records")
    return "\n".join(lines)


def _names_cell(entry: Mapping[str, Any]) -> str:
    names, more = entry["names"], entry["names_total"] - len(entry["names"])
    return ", ".join(names) + (f" (+{more})" if more else "") if names else "-"


def suggestion_block(data: Mapping[str, Any], write_hint: str) -> str:
    """`gateway policy suggest`: the entries with their evidence, what was left out, and how to apply it.
    `write_hint` is the file the record was written to (`--write`), or how to write one."""
    entries = data["entries"]
    lines = [
        f"sandbox {data['sandbox']}: {data['records']} records since {_utc(data['since_us'])}, "
        f"{data['covered_records']} covered by {len(entries)} entries; nothing was applied",
        "",
    ]
    if entries:
        rows = [
            (e["entry"], e["field"], e["records"], e["denied_records"], ",".join(str(p) for p in e["ports"]) or "-",
             _names_cell(e), _utc(e["first_seen_us"]), _utc(e["last_seen_us"]))
            for e in entries
        ]  # fmt: skip
        lines.append(format_table(("ENTRY", "LIST", "FLOWS", "DENIED", "PORTS", "NAMES", "FIRST SEEN", "LAST SEEN"),
                                  rows))  # fmt: skip
    else:
        lines.append("no entries: nothing in the window needs one")
    for left in data["excluded"]:
        lines.append(f"left out: {left['count']} records ({left['rule']}): {left['explanation']}")
    if data["unreadable"]:
        lines.append(f"unreadable: {data['unreadable']} lines of the batches are not flow records")
    egress = data["record"]["egress"]
    lines += ["", "the candidate record's allowlist (the rest of the record is the current one):"]
    for name in ("allow_hosts", "allow_cidrs", "allow_ports", "host_ports"):
        if name in egress:
            lines.append(f"  egress.{name}: {', '.join(str(v) for v in egress[name]) or '(none)'}")
    sandbox = data["sandbox"]
    lines += [
        "",
        "to apply it:",
        f"  {write_hint}",
        f"  gateway policy diff {sandbox} --file FILE       # what it would newly deny (nothing, for this window)",
        f"  gateway sandbox update {sandbox} --file FILE    # apply it (set egress.enforcement to enforce when ready)",
    ]
    return "\n".join(lines)
