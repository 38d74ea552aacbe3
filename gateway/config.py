"""Configuration machinery: one TOML file with documented defaults, every option overridable by environment.

Each section is a typed model (`Section`, a frozen `msgspec.Struct`) owned by the component it configures:
`[egress]` in gateway/engine/config.py, `[resolver]` in gateway/resolver.py, `[dns]` in dns/config.py,
`[tunnel]` in tunnel/config.py, `[store]` in gateway/stores/config.py, `[audit]` in gateway/audit_config.py,
`[api]` in gateway/api_config.py; the core ones (`[network]`, `[limits]`, `[log]`, `[presets]`) are here.
A field declares an option once: its name, type, default, range (`msgspec.Meta(ge=, le=)`) and description,
from which both the parser and gateway.example.toml (gateway/configdoc.py) come. `gateway.settings` puts the
sections together into the `Config` the composition root reads; this module knows no component.

Environment variables are `GATEWAY_<SECTION>__<KEY>` (double underscore between
section and key), e.g. `GATEWAY_STORE__REDIS_URL=redis://127.0.0.1:6379/0`. A value
is read as a TOML value when it parses as one (numbers, booleans, lists, inline
tables) and as a plain string otherwise. `GATEWAY_CONFIG` names the file.

msgspec, not pydantic-settings: the CLI loads this for every command, and `import msgspec` costs ~30-50 ms
where `import pydantic_settings` costs ~210-260 ms here.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal

import msgspec
from msgspec import Meta

from gateway.decision import DEFAULT_LIMITS
from gateway.errors import GatewayError
from gateway.policy import LIMIT_RANGES, Limits
from gateway.presets import BUILTIN_PRESETS, Preset, make_preset

if TYPE_CHECKING:
    from gateway.policy import IPAddress, IPNetwork

    Network = IPNetwork
    Address = IPAddress
else:
    # msgspec takes one class per custom type in a field: the common base of IPv4Network and IPv6Network
    # (resp. the addresses); `_decode` turns the text into the right one.
    Network = ipaddress._BaseNetwork
    Address = ipaddress._BaseAddress

ENV_PREFIX = "GATEWAY_"


class OptionError(Exception):
    """A rule across options broken, raised by a section's `__post_init__`: `key` is the option to blame
    (relative to the section, e.g. `dns_port` or `tokens[0].token`). Not a ValueError, so that msgspec lets it
    through instead of blaming the whole table."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A `[section]` of the configuration file. Subclasses declare each option as a field with its default and
    `Annotated[..., Meta(description=...)]`; their docstring is the section's comment in the example file.

    `supplied` names fields that are not options of the section but given by whoever builds the component
    (the DNS interceptor's port comes from [egress]); they are neither read from the file nor documented."""

    supplied: ClassVar[frozenset[str]] = frozenset()


#: `Meta(extra=LIVE)` marks an option SIGHUP applies to a running gateway; any other option needs a restart.
LIVE: Final[dict[str, Any]] = {"live": True}


def live_options(model: type[Section]) -> frozenset[str]:
    """The options of `model` a reload applies while the gateway runs (marked `Meta(extra=LIVE)`)."""
    return frozenset(
        f.name
        for f in msgspec.structs.fields(model)
        if any(isinstance(m, Meta) and (m.extra or {}).get("live") for m in getattr(f.type, "__metadata__", ()))
    )


def option_names(model: type[Section]) -> list[str]:
    return [f.name for f in msgspec.structs.fields(model) if f.name not in model.supplied]


def invalid(message: str, where: str) -> GatewayError:
    return GatewayError("CONFIG_INVALID", message, where)


# --------------------------------------------------------------------------- core sections


class NetworkConfig(Section, frozen=True):
    """The sandboxes' side of the network."""

    sandbox_subnets: Annotated[
        tuple[Network, ...],
        Meta(
            min_length=1,
            description="Addresses sandboxes may have. A sandbox record's addresses must fall inside these.",
        ),
    ] = (ipaddress.ip_network("10.75.0.0/16"), ipaddress.ip_network("fdd4:1476:6c7e::/48"))


def _default(name: str) -> int:
    value = getattr(DEFAULT_LIMITS, name)
    assert isinstance(value, int)  # the decision's defaults set every limit
    return value


class LimitsConfig(Section, frozen=True):
    """Per-sandbox defaults (seed 000), used where neither the sandbox nor its template sets one."""

    # The ranges are the policy parser's, the defaults the decision's: one declaration each.
    connections_per_minute: Annotated[
        int,
        Meta(
            ge=LIMIT_RANGES["connections_per_minute"][0],
            le=LIMIT_RANGES["connections_per_minute"][1],
            description="New connections a sandbox may open per minute.",
            extra=LIVE,
        ),
    ] = _default("connections_per_minute")
    bandwidth_mbit: Annotated[
        int,
        Meta(
            ge=LIMIT_RANGES["bandwidth_mbit"][0],
            le=LIMIT_RANGES["bandwidth_mbit"][1],
            description="Sustained bandwidth (Mbit/s).",
            extra=LIVE,
        ),
    ] = _default("bandwidth_mbit")
    burst_mbit: Annotated[
        int,
        Meta(
            ge=LIMIT_RANGES["burst_mbit"][0],
            le=LIMIT_RANGES["burst_mbit"][1],
            description="Burst (Mbit/s), at least bandwidth_mbit.",
            extra=LIVE,
        ),
    ] = _default("burst_mbit")
    dns_queries_per_minute: Annotated[
        int,
        Meta(
            ge=LIMIT_RANGES["dns_queries_per_minute"][0],
            le=LIMIT_RANGES["dns_queries_per_minute"][1],
            description="DNS queries a sandbox may send per minute.",
            extra=LIVE,
        ),
    ] = _default("dns_queries_per_minute")

    def __post_init__(self) -> None:
        if self.burst_mbit < self.bandwidth_mbit:
            raise OptionError("burst_mbit", "burst_mbit must be at least bandwidth_mbit")

    def limits(self) -> Limits:
        return Limits(self.connections_per_minute, self.bandwidth_mbit, self.burst_mbit, self.dns_queries_per_minute)


LOG_LEVELS = ("debug", "info", "warning", "error")


class LogConfig(Section, frozen=True):
    """The service's log lines."""

    format: Annotated[
        Literal["auto", "json", "console"], Meta(description="auto: readable on a terminal, JSON lines otherwise.")
    ] = "auto"
    level: Annotated[str, Meta(description="debug, info, warning or error (any case).", extra=LIVE)] = "info"

    def __post_init__(self) -> None:
        level = self.level.lower()
        if level not in LOG_LEVELS:
            raise OptionError("level", f"{self.level!r} is not a log level; use {_choices(LOG_LEVELS)}")
        msgspec.structs.force_setattr(self, "level", level)


#: `[presets.NAME]` tables are not a fixed set of options: `gateway.settings` parses them with `parse_presets`.
PRESETS_DOC = """\
Operator presets, usable by name in any policy's egress.presets, next to the built-in
package-registries, git-hosts and ai-apis. ports omitted = any port.
[presets.internal-apis]
description = "Company APIs"
hosts = ["api.internal.example.com", "*.svc.example.com"]
ports = [443]"""


def parse_presets(raw: Mapping[str, Any]) -> dict[str, Preset]:
    presets: dict[str, Preset] = dict(BUILTIN_PRESETS)
    for name, spec in raw.items():
        where = f"presets.{name}"
        if name in BUILTIN_PRESETS:
            raise invalid(f"{name!r} is a built-in preset; choose another name", where)
        if not isinstance(spec, Mapping) or not isinstance(spec.get("hosts"), list) or not spec["hosts"]:
            raise invalid("a preset is a table with a non-empty hosts list (and optional ports, description)", where)
        unknown = set(spec) - {"hosts", "ports", "description"}
        if unknown:
            raise invalid(f"unknown preset option(s) {', '.join(sorted(unknown))}", where)
        try:
            presets[name] = make_preset(name, spec["hosts"], spec.get("ports"), str(spec.get("description", "")))
        except GatewayError as exc:
            raise invalid(exc.message, exc.field or where) from None
    return presets


# --------------------------------------------------------------------------- loading


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _plain(kind: Any) -> Any:
    while typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    return kind


def _union(kind: Any) -> tuple[Any, ...]:
    kind = _plain(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return typing.get_args(kind)
    return (kind,)


def _takes_text(model: type[Section], key: str) -> bool:
    """String and path options take environment text as it is, so GATEWAY_STORE__NODE_ID=123 stays "123"."""
    for f in msgspec.structs.fields(model):
        if f.name == key:
            return any(k in (str, Path) or typing.get_origin(k) is Literal for k in _union(f.type))
    return False


def _optional_paths(model: type[Section]) -> set[str]:
    return {f.name for f in msgspec.structs.fields(model) if set(_union(f.type)) == {Path, type(None)}}


def read_sources(
    sections: Mapping[str, type[Section] | None], path: str | Path | None, environ: Mapping[str, str]
) -> tuple[dict[str, dict[str, Any]], str]:
    """The file's tables and the environment's overrides merged per section (the environment wins), each key
    checked against its section's options; `None` marks a section of free-form tables ([presets])."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in sections}
    source = "defaults"
    path = path or environ.get(f"{ENV_PREFIX}CONFIG")

    def merge(overlay: Mapping[str, Any], where: str) -> None:
        for section, values in overlay.items():
            if section not in sections:
                known = ", ".join(sorted(sections))
                raise invalid(f"unknown section [{section}]; known: {known}", f"{where}:{section}")
            if not isinstance(values, Mapping):
                raise invalid(f"[{section}] must be a table", f"{where}:{section}")
            model = sections[section]
            for key, value in values.items():
                if model is not None and key not in option_names(model):
                    known = ", ".join(sorted(option_names(model)))
                    raise invalid(f"unknown option {section}.{key}; known: {known}", f"{where}:{section}.{key}")
                merged[section][key] = value

    if path:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise invalid(f"config file {path} does not exist", str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise invalid(f"config file {path} is not valid TOML: {exc}", str(path)) from None
        merge(data, str(path))
        source = str(path)
    overrides: dict[str, dict[str, Any]] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        model = sections.get(section)
        is_text = model is not None and _takes_text(model, key)
        overrides.setdefault(section, {})[key] = text if is_text else _parse_env_value(text)
    merge(overrides, "environment")
    return merged, source


def _decode(kind: type, value: Any) -> Any:
    """msgspec's hook for the types it does not know: the text in the file becomes the Python value."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if kind is Path:
        return Path(value)
    if kind is Network:
        try:
            return ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a CIDR ({exc})") from None
    if kind is Address:
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
    raise NotImplementedError(kind)


_KINDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
}
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_TYPE = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_RANGE = re.compile(r"^Expected `(?P<want>\w+)` (?P<op>[<>]=?) (?P<bound>\S+)$")
_LENGTH = re.compile(r"^Expected `(?P<want>\w+)` of length (?P<op>[<>]=?) (?P<bound>\S+)$")
_ENUM = re.compile(r"^Invalid enum value (?P<value>.*)$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]+)`$")


def number_text(value: float) -> str:
    """A bound as people write it: 65535, 1048576, 0.05 (not 1.04858e+06)."""
    return str(int(value)) if value == int(value) else repr(value)


def _choices(options: typing.Iterable[str]) -> str:
    names = list(options)
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _field(model: type[Section], key: str) -> msgspec.structs.FieldInfo | None:
    return next((f for f in msgspec.structs.fields(model) if f.name == key), None)


def _human(model: type[Section], raw: Mapping[str, Any], what: str, path: str) -> str:
    """msgspec's message in the words of this file's other messages, with the value when it is a plain option."""
    top = re.match(r"^\.(\w+)", path)
    info = _field(model, top.group(1)) if top else None
    value = raw.get(top.group(1)) if top and path == top.group(0) else None
    got = f", got {value!r}" if top and path == top.group(0) else ""
    if m := _TYPE.match(what):
        return f"expected {_KINDS.get(m['want'], m['want'])}, got {_KINDS.get(m['got'], m['got']).split()[-1]}"
    if m := _RANGE.match(what):
        meta = _meta(info.type) if info else None
        if meta is not None and meta.ge is not None and meta.le is not None:
            bounds = f"{number_text(meta.ge)}-{number_text(meta.le)}"
            return f"expected {_KINDS[m['want']]} in {bounds}{got}"
        return f"expected {_KINDS.get(m['want'], m['want'])} {m['op']} {m['bound']}{got}"
    if m := _LENGTH.match(what):
        noun = (
            "a non-empty list" if m["op"] == ">=" and m["bound"] == "1" else f"a list of length {m['op']} {m['bound']}"
        )
        return f"expected {noun}{got}"
    if m := _UNKNOWN.match(what):  # in a nested table (a section's own keys are checked by read_sources)
        noun = getattr(_struct_at(model, path), "noun", "table")
        return f"unknown {noun} option(s) {m['key']}"
    if (m := _ENUM.match(what)) and info is not None:
        options = typing.get_args(_plain(info.type))
        return f"{m['value']} is not a choice; use {_choices(options)}"
    return what[:1].lower() + what[1:]


def _struct_at(model: type[Section], path: str) -> Any:
    """The type of the value at `path` (`.tokens[0]`) inside the section."""
    kind: Any = model
    for name in re.findall(r"\.(\w+)|\[\d+\]", path):
        if name:
            info = _field(kind, name)
            kind = _plain(info.type) if info else None
        else:
            kind = _plain(typing.get_args(kind)[0]) if typing.get_args(kind) else None
    return kind


def _meta(kind: Any) -> Meta | None:
    if typing.get_origin(kind) is Annotated:
        return next((m for m in typing.get_args(kind)[1:] if isinstance(m, Meta)), None)
    return None


def build_section[S: Section](model: type[S], name: str, raw: Mapping[str, Any], **supplied: Any) -> S:
    """The section from its merged table (missing options take their defaults), or GatewayError(CONFIG_INVALID)
    naming the option (`egress.listen_port`, `api.tokens[0].scopes`). TOML has no null: an empty string stands
    for "none" in an optional path option."""
    values = dict(raw)
    for key in _optional_paths(model):
        if values.get(key) == "":
            values[key] = None
    values.update(supplied)
    try:
        return msgspec.convert(values, model, dec_hook=_decode)
    except OptionError as exc:
        raise invalid(exc.message, f"{name}.{exc.key}") from None
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        assert m is not None  # the pattern matches any text
        path = m["path"] or ""
        raise invalid(_human(model, values, m["what"], path), f"{name}{path}") from None
