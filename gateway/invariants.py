"""Operator invariants: assertions every policy write must satisfy, and templates used as ceilings.

The `[invariants]` section declares what no policy may grant, whoever writes it (the API, the policy file,
another service's Redis record):

- `never_reach`: destinations (CIDRs, ports, or both) no sandbox, or no sandbox carrying given labels,
  reaches. A record that grants one explicitly (an allow_cidrs entry overlapping the CIDRs on those ports, a
  `host:port` entry, allow_ports or host_ports naming the port) is refused with the assertion it breaks; and
  `decide` refuses every connection to them whatever allows it (a name resolving there, allow_all), so the
  assertion holds also where a record cannot show it. The gateway's own service endpoints (the API
  listener, the inspection tier, Redis) are one such assertion, always on: `gateway-services`.
- `ceilings`: sandboxes carrying given labels stay within a template, as does every sandbox naming a template
  marked `ceiling: true`. A record that widens beyond its ceiling (allow_all, allow_internet, report mode, a
  host, preset, CIDR, port or ECH name the ceiling does not allow, a limit above the ceiling's, a ceiling's
  inspect entry dropped) is refused with what exceeds; and `decide` lets a connection pass only where the
  ceiling allows it too, so narrowing a ceiling narrows its sandboxes at once.

Pure: `PolicyState` runs the checks on every write; `decision.compile_policy` takes the compiled guards.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final

import msgspec
from msgspec import Meta

from gateway.config import LIVE, Network, OptionError, Section
from gateway.decision import CompiledPolicy, NeverReach
from gateway.hostnames import split_host_entry
from gateway.policy import ID_PATTERN, Egress, IPNetwork, Limits

#: The name of the built-in assertion that keeps sandboxes off the gateway's own services.
GATEWAY_SERVICES: Final = "gateway-services"
LOOPBACK: Final[tuple[IPNetwork, ...]] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def carries(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """Whether a sandbox with `labels` carries every one of `wanted` (an assertion's or a ceiling's selector)."""
    return all(labels.get(key) == value for key, value in wanted.items())


class Assertion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Destinations no sandbox (or no sandbox with `labels`) reaches: an address in `cidrs` on a port in `ports`;
    either may be empty (every address, resp. every port), not both."""

    noun: ClassVar[str] = "assertion"

    name: Annotated[str, Meta(description="Named in the error a violating write gets, and in flow records.")]
    cidrs: Annotated[tuple[Network, ...], Meta(description="The networks (empty: any address).")] = ()
    ports: Annotated[tuple[Annotated[int, Meta(ge=1, le=65535)], ...], Meta(description="Empty: any port.")] = ()
    labels: Annotated[
        dict[str, str], Meta(description="Applies to sandboxes carrying all these labels (empty: every sandbox).")
    ] = {}
    reason: Annotated[str, Meta(description="Why, for people: shown in the error and the denial.")] = ""

    def applies_to(self, labels: Mapping[str, str]) -> bool:
        return carries(labels, self.labels)

    def describe(self) -> str:
        where = ", ".join(str(net) for net in self.cidrs) or "any address"
        ports = f" port {', '.join(map(str, self.ports))}" if self.ports else ""
        because = f": {self.reason}" if self.reason else ""
        return f"invariant {self.name!r} (no sandbox reaches {where}{ports}{because})"


class Ceiling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sandboxes carrying all of `labels` stay within `template`, whichever template they name."""

    noun: ClassVar[str] = "ceiling"

    labels: Annotated[dict[str, str], Meta(description="The labels that select the sandboxes (at least one).")]
    template: Annotated[str, Meta(description="The template used as their ceiling.")]

    def applies_to(self, labels: Mapping[str, str]) -> bool:
        return carries(labels, self.labels)


class InvariantsConfig(Section, frozen=True):
    """Assertions every policy write must satisfy, from every source (API, policy file, Redis). A violating
    write is refused with the assertion it breaks and the last good policy stays in force; the data plane
    refuses what the assertions forbid whatever a policy allows. The gateway's own service endpoints (the
    API, the inspection tier, Redis) are always such an assertion (`gateway-services`). SIGHUP applies a change
    at once: the next connection and write are held to it."""

    never_reach: Annotated[
        tuple[Assertion, ...],
        Meta(
            description="Tables {name, cidrs, ports, labels, reason}: destinations no sandbox (or no sandbox "
            "with all of `labels`) reaches.",
            extra=LIVE,
            examples=[
                {"name": "no-databases", "cidrs": ["10.20.0.0/16"], "ports": [5432, 6379], "reason": "prod data"},
                {"name": "no-ssh", "ports": [22], "labels": {"tier": "untrusted"}},
            ],
        ),
    ] = ()
    ceilings: Annotated[
        tuple[Ceiling, ...],
        Meta(
            description="Tables {labels, template}: sandboxes with all of `labels` stay within `template` (a "
            "template marked `ceiling: true` is the ceiling of the sandboxes naming it).",
            extra=LIVE,
            examples=[{"labels": {"tier": "ci"}, "template": "ci-ceiling"}],
        ),
    ] = ()

    def __post_init__(self) -> None:
        names: set[str] = set()
        for index, assertion in enumerate(self.never_reach):
            where = f"never_reach[{index}]"
            if not ID_PATTERN.fullmatch(assertion.name) or assertion.name == GATEWAY_SERVICES:
                raise OptionError(f"{where}.name", f"{assertion.name!r} is not a usable name (an id, not reserved)")
            if assertion.name in names:
                raise OptionError(f"{where}.name", f"two assertions are named {assertion.name!r}")
            names.add(assertion.name)
            if not assertion.cidrs and not assertion.ports:
                raise OptionError(where, "an assertion needs cidrs, ports or both (it would forbid everything)")
        for index, ceiling in enumerate(self.ceilings):
            if not ceiling.labels:
                raise OptionError(f"ceilings[{index}].labels", "a ceiling selects its sandboxes by at least one label")
            if not ID_PATTERN.fullmatch(ceiling.template):
                raise OptionError(f"ceilings[{index}].template", f"{ceiling.template!r} is not a template name")


def service_assertion(endpoints: list[tuple[str, int]]) -> Assertion | None:
    """The `gateway-services` assertion over the endpoints (host, port) the gateway serves or depends on: their
    ports on loopback (which an allow_cidrs entry could otherwise open: 127.0.0.2 reaches a service bound to
    0.0.0.0) and on each host that is an address literal. A name or the unspecified address adds only its port
    (the data plane's own-address guard covers the gateway's interfaces)."""
    networks: list[IPNetwork] = []
    ports: list[int] = []
    for host, port in endpoints:
        ports.append(port)
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            continue
        if address.is_unspecified:
            continue
        networks.append(ipaddress.ip_network(address))
        ports.append(port)
    if not ports:
        return None
    return Assertion(
        GATEWAY_SERVICES,
        tuple(dict.fromkeys((*LOOPBACK, *networks))),
        tuple(dict.fromkeys(ports)),
        reason="the gateway's own services (the API, the inspection tier, Redis) are never reachable from a sandbox",
    )


def redis_endpoint(url: str) -> list[tuple[str, int]]:
    if not url:
        return []
    parsed = urllib.parse.urlsplit(url)
    return [(parsed.hostname or "", parsed.port or 6379)] if parsed.hostname else []


@dataclass(frozen=True, slots=True)
class Invariants:
    """The assertions and ceilings in force (the config's, with the built-in one)."""

    never_reach: tuple[Assertion, ...] = ()
    ceilings: tuple[Ceiling, ...] = ()

    def assertions_for(self, labels: Mapping[str, str]) -> tuple[Assertion, ...]:
        return tuple(a for a in self.never_reach if a.applies_to(labels))

    def ceiling_templates(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.template for c in self.ceilings if c.applies_to(labels)))


def never_reach_guard(assertions: tuple[Assertion, ...]) -> NeverReach | None:
    if not assertions:
        return None
    return NeverReach(tuple((a.cidrs, frozenset(a.ports), a.name, a.describe()) for a in assertions))


# --------------------------------------------------------------------------- write checks

#: (field path in the effective egress or limits, what is wrong): the caller maps the path onto the record.
Finding = tuple[str, str]


def _overlaps_any(net: IPNetwork, nets: tuple[IPNetwork, ...]) -> bool:
    return any(net.version == n.version and net.overlaps(n) for n in nets)


def _within_net(net: IPNetwork, nets: tuple[IPNetwork, ...]) -> bool:
    return any(net.version == n.version and net.subnet_of(n) for n in nets)  # type: ignore[arg-type]


def violations(egress: Egress, assertion: Assertion) -> Iterator[Finding]:
    """Where a compiled policy's effective egress explicitly grants what `assertion` forbids."""
    ports = frozenset(assertion.ports)
    cidr_ports = frozenset(egress.allow_ports) if egress.allow_ports else None  # None: any port
    # The built-in assertion refuses only entries aimed at the gateway's services (inside their networks): a broad
    # entry (0.0.0.0/0) is an ordinary policy, and decide keeps it off those services.
    hits = _within_net if assertion.name == GATEWAY_SERVICES else _overlaps_any
    for index, net in enumerate(egress.allow_cidrs or ()):
        if assertion.cidrs and not hits(net, assertion.cidrs):
            continue
        if ports and cidr_ports is not None and not (cidr_ports & ports):
            continue
        yield f"egress.allow_cidrs[{index}]", f"allow_cidrs {net} reaches what {assertion.describe()} forbids"
    if assertion.cidrs:
        return  # a name's addresses are not known at write time: decide refuses them when they are
    for index, entry in enumerate(egress.allow_hosts or ()):
        _, port = split_host_entry(entry)
        if port in ports:
            yield f"egress.allow_hosts[{index}]", f"allow_hosts {entry} names a port {assertion.describe()} forbids"
    for name in ("allow_ports", "host_ports"):
        for index, port in enumerate(getattr(egress, name) or ()):
            if port in ports:
                yield f"egress.{name}[{index}]", f"{name} {port} is a port {assertion.describe()} forbids"
    for index, rule in enumerate(egress.inspect or ()):
        if ports & frozenset(rule.ports):
            yield f"egress.inspect[{index}].ports", f"inspect ports name a port {assertion.describe()} forbids"


def exceeds(policy: CompiledPolicy, ceiling: CompiledPolicy, name: str, own_limits: Limits) -> Iterator[Finding]:
    """Where `policy` (a sandbox's, compiled without its ceilings) allows more than `ceiling` (the template `name`
    compiled alone for that sandbox): the explicit widenings a write is refused for."""
    egress, top = policy.effective_egress, ceiling.effective_egress
    beyond = f"beyond the ceiling template {name!r}"
    if policy.allow_all and not ceiling.allow_all:
        yield "egress.mode", f"mode allow_all is {beyond} (it allows only what it lists)"
    if policy.allow_internet and not ceiling.allow_internet:
        yield "egress.allow_internet", f"allow_internet is {beyond} (it is false there)"
    if policy.report and not ceiling.report:
        yield "egress.enforcement", f"report mode lets denials pass, {beyond} (it enforces)"
    if not ceiling.allow_all:
        host_ports = frozenset(egress.host_ports) if egress.host_ports else None
        for index, entry in enumerate(egress.allow_hosts or ()):
            pattern, port = split_host_entry(entry)
            wanted = frozenset((port,)) if port is not None else host_ports
            if not ceiling.covers_host(pattern, wanted):
                yield f"egress.allow_hosts[{index}]", f"allow_hosts {entry} is {beyond}"
        for index, preset in enumerate(egress.presets or ()):
            if preset not in (top.presets or ()):
                yield f"egress.presets[{index}]", f"preset {preset} is {beyond}"
        for index, rule in enumerate(egress.inspect or ()):
            for pattern in rule.hosts:
                if not ceiling.covers_host(pattern, frozenset(rule.ports)):
                    yield f"egress.inspect[{index}].hosts", f"inspect host {pattern} is {beyond}"
    for index, net in enumerate(egress.allow_cidrs or ()):
        if not _within_net(net, top.allow_cidrs or ()):
            yield f"egress.allow_cidrs[{index}]", f"allow_cidrs {net} is {beyond}"
    if (
        egress.allow_cidrs
        and top.allow_ports
        and not set(egress.allow_ports or range(1, 65536)) <= set(top.allow_ports)
    ):
        yield "egress.allow_ports", f"allow_ports {list(egress.allow_ports or ()) or 'any'} is {beyond}"
    for index, outer in enumerate(egress.allow_ech or ()):
        if not ceiling.ech_accepted(outer):
            yield f"egress.allow_ech[{index}]", f"allow_ech {outer} is {beyond}"
    kept = set(egress.inspect or ())
    for rule in top.inspect or ():
        if rule not in kept:
            yield "egress.inspect", f"{beyond}: its inspect entry for {', '.join(rule.hosts)} must stay unchanged"
    for field_name, value in own_limits.to_dict().items():
        cap = getattr(ceiling.limits, field_name)
        if value > cap:
            yield f"limits.{field_name}", f"limits.{field_name} {value} is {beyond} ({cap})"
