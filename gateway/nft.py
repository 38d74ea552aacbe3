"""The gateway's nftables table, rendered as text from a `SteeringConfig` (pure: no I/O).

The whole table is one `nft -f` transaction (`add table` + `delete table` + the full
definition), so every apply replaces the previous table atomically: a packet sees either
the old table or the new one, never a half-written one, and a ruleset the kernel refuses
changes nothing. `gateway.netplumb.apply_ruleset` runs it.

What the table does (seed 002's model: a static host route per sandbox address on its
interface, proxy ARP, no bridge):

* Sandbox traffic is recognised by the interface it arrives on (`sandbox_interfaces`,
  e.g. `vif*`) or by a source inside the sandbox subnets, and goes into regular chains
  (`from_sandbox`, `sandbox_input`, `sandbox_forward`) whose last rule is an unconditional
  `drop`. Only the rules listed there accept; anything not foreseen is dropped. The base
  chains keep `policy accept` because they also see the host's own traffic, which this
  table must not touch; traffic on `lo` is the host's own whatever its addresses (the
  gateway may hold addresses inside the sandbox subnets) and is never classified.
* `prerouting` (priority mangle): neighbour discovery passes; a source must be attached
  (`@sandbox_v4` / `@sandbox_v6`) and must arrive on the interface its host route points
  at (`fib saddr . iif oif missing` = strict reverse-path check, so sandbox A cannot use
  B's address); a source routed here but not attached (no store record) is dropped, counted
  in the named counter `unattached` and remembered for a while in the bounded dynamic sets
  `unattached_v4`/`unattached_v6`, which the gateway reads to log it; replies to connections
  opened *towards* the sandbox (ingress tunnel, private links) pass; `(src . dst . L4
  protocol . dport)` in the private-link set passes; TCP/UDP 53 to any address (also one
  inside the sandbox subnets, such as a resolver address the gateway has there) is TPROXYed
  to the DNS interceptor; anything else to a sandbox subnet is dropped; anything
  else to the gateway's own addresses (control API, Redis, SSH) is dropped; TCP to any
  other address and port is TPROXYed to the egress engine and marked so the fwmark
  `ip rule` delivers it locally; everything else (QUIC and other UDP, ICMP, ...) is dropped.
  The mark is set before `tproxy`: if no listener is there, the packet is dropped by the
  chain's last rule (and even without that rule it would be routed to `lo`, not forwarded).
  ICMP: only NDP neighbour solicitation/advertisement (hop limit 255) is accepted, because
  IPv6 does not work on the link without it. Ping to the gateway is not answered.
* `input`: sandbox traffic reaches local sockets only if it was TPROXYed (marked and
  assigned to a transparent socket), is NDP, or is a reply to a connection the gateway
  opened. The TPROXY ports themselves are closed to direct (unmarked) connections from
  any non-loopback interface.
* `forward`: between sandboxes only the private links (and their replies) are forwarded;
  nothing from or to the sandbox subnets or interfaces is forwarded otherwise. TPROXYed
  traffic is delivered locally and never reaches `forward`, so if the egress engine dies
  its sandboxes' traffic is dropped, not forwarded unfiltered.
* `output` (only with `dial_mark`): connections the egress engine dials with
  `SO_MARK = dial_mark` can never reach the gateway's own addresses (including loopback)
  or the sandbox subnets, whatever the engine decides.

Set elements (attached addresses, private links, gateway addresses) are the only part
that grows with sandboxes: the rule count is constant.

Every apply re-creates the table, so the `unattached` counter and sets start empty again:
the gateway reads (and resets) them before each apply and adds them up itself.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from gateway.errors import GatewayError
from gateway.policy import IPAddress, IPNetwork, Sandbox
from gateway.schema import Note

TABLE = "sandbox_gateway"
DEFAULT_EGRESS_PORT = 15001
DEFAULT_DNS_PORT = 15053
DEFAULT_FWMARK = 0x1
DEFAULT_ROUTE_TABLE = 100
MAX_WORKERS = 256
DEFAULT_RULE_PRIORITY = 100
MAX_U32 = 0xFFFFFFFF
RESERVED_ROUTE_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_NDP = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255"
LINK_PROTOCOLS = ("tcp", "udp")
#: The named counter of packets dropped because their (routed) source is not attached.
UNATTACHED_COUNTER = "unattached"
#: Bound of each `unattached_v4`/`unattached_v6` set: a flood of sources costs at most this many elements.
UNATTACHED_SET_SIZE = 4096
DEFAULT_UNATTACHED_INTERVAL = 10.0


def _invalid(message: str, where: str) -> GatewayError:
    return GatewayError("STEERING_INVALID", message, where)


def _addr_key(address: IPAddress) -> tuple[int, int]:
    return (address.version, int(address))


@dataclass(frozen=True, slots=True)
class LinkRule:
    """`source` may open `protocol` connections to `destination` on `ports` (empty: any port). One direction."""

    source: IPAddress
    destination: IPAddress
    ports: tuple[int, ...] = ()
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class PolicyRouting:
    """The `ip rule` + local route that deliver marked (TPROXYed) packets to local sockets."""

    fwmark: int
    fwmark_mask: int
    table: int
    priority: int

    def commands(self) -> list[list[str]]:
        """The equivalent `ip` commands (for documentation and operators; netplumb uses netlink)."""
        mark = f"{self.fwmark:#x}" if self.fwmark_mask == MAX_U32 else f"{self.fwmark:#x}/{self.fwmark_mask:#x}"
        out: list[list[str]] = []
        for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
            out.append(
                ["ip", family, "rule", "add", "fwmark", mark, "lookup", str(self.table), "priority", str(self.priority)]
            )
            out.append(["ip", family, "route", "add", "local", default, "dev", "lo", "table", str(self.table)])
        return out


def check_worker_ports(egress_port: int, dns_port: int, workers: int) -> None:
    """Worker k of the egress engine listens on egress_port + k: the range must fit and miss the DNS port."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise _invalid(f"{workers!r} is not a number of workers (1-{MAX_WORKERS})", "workers")
    last = egress_port + workers - 1
    if last > 65535:
        raise _invalid(f"{workers} workers need the ports {egress_port}-{last}", "workers")
    if egress_port <= dns_port <= last:
        raise _invalid(f"the DNS port {dns_port} is inside the egress ports {egress_port}-{last}", "dns_port")


@dataclass(frozen=True, slots=True)
class SteeringConfig:
    """Everything the gateway's nftables table depends on. Validated on construction."""

    sandbox_subnets: tuple[IPNetwork, ...]
    #: Names or trailing-`*` patterns of the gateway-side sandbox interfaces (e.g. `vif*`). At least one.
    sandbox_interfaces: tuple[str, ...]
    #: Sandbox addresses that are attached (host route + policy). Anything else in the subnets is dropped.
    attached: frozenset[IPAddress] = frozenset()
    #: The gateway's own addresses (sandboxes may not reach their services; `fib daddr type local` covers the rest).
    gateway_addresses: frozenset[IPAddress] = frozenset()
    private_links: tuple[LinkRule, ...] = ()
    egress_port: int = DEFAULT_EGRESS_PORT
    dns_port: int = DEFAULT_DNS_PORT
    fwmark: int = DEFAULT_FWMARK
    fwmark_mask: int = MAX_U32
    route_table: int = DEFAULT_ROUTE_TABLE
    rule_priority: int = DEFAULT_RULE_PRIORITY
    #: SO_MARK the egress engine sets on upstream sockets; enables the `output` guard. None: no output chain.
    dial_mark: int | None = None
    table: str = TABLE
    #: Egress engine processes (`gateway run --workers`): worker k listens on egress_port + k and gets the
    #: TCP of the sandbox addresses `worker_of` maps to k (all addresses of a sandbox to one worker).
    workers: int = 1
    worker_of: Mapping[IPAddress, int] = field(default_factory=dict)
    #: How long an unattached source stays in the `unattached_v4`/`_v6` sets after its first dropped packet.
    unattached_interval: float = DEFAULT_UNATTACHED_INTERVAL

    def __post_init__(self) -> None:
        if not self.sandbox_subnets:
            raise _invalid("at least one sandbox subnet is needed", "sandbox_subnets")
        for i, net in enumerate(self.sandbox_subnets):
            if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise _invalid(f"{net!r} is not an IP network", f"sandbox_subnets[{i}]")
        if not self.sandbox_interfaces:
            # Fail closed: traffic from these interfaces is filtered whatever source address it claims.
            raise _invalid("name the gateway-side sandbox interfaces (e.g. vif*)", "sandbox_interfaces")
        for i, pattern in enumerate(self.sandbox_interfaces):
            name = pattern.removesuffix("*")
            if not _IFNAME.match(name):
                raise _invalid(
                    f"{pattern!r} is not an interface name or a name with a trailing *", f"sandbox_interfaces[{i}]"
                )
        for name, port in (("egress_port", self.egress_port), ("dns_port", self.dns_port)):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise _invalid(f"{port!r} is not a port (1-65535)", name)
        check_worker_ports(self.egress_port, self.dns_port, self.workers)
        for address, worker in self.worker_of.items():
            if address not in self.attached or not 0 <= worker < self.workers:
                raise _invalid(f"{address} -> worker {worker}: not an attached address and a worker", "worker_of")
        if not 0 < self.fwmark_mask <= MAX_U32 or not 0 < self.fwmark <= MAX_U32:
            raise _invalid("fwmark and fwmark_mask must be non-zero 32-bit values", "fwmark")
        if self.fwmark & ~self.fwmark_mask:
            raise _invalid(f"fwmark {self.fwmark:#x} has bits outside fwmark_mask {self.fwmark_mask:#x}", "fwmark")
        if not 0 < self.route_table <= MAX_U32 or self.route_table in RESERVED_ROUTE_TABLES:
            raise _invalid(f"{self.route_table} is reserved or out of range for a routing table", "route_table")
        if not 0 < self.rule_priority < 32766:
            raise _invalid("the rule priority must be in 1-32765 (before the main table)", "rule_priority")
        if self.dial_mark is not None and (
            not 0 < self.dial_mark <= MAX_U32 or self.dial_mark & self.fwmark_mask == self.fwmark
        ):
            raise _invalid("dial_mark must be a non-zero 32-bit value that the fwmark rule does not match", "dial_mark")
        if not _TABLE_NAME.match(self.table):
            raise _invalid(f"{self.table!r} is not a valid table name", "table")
        for address in self.attached:
            if not self.in_subnets(address):
                raise _invalid(f"{address} is not inside the sandbox subnets", "attached")
        for address in self.gateway_addresses:
            if self.in_subnets(address):
                raise _invalid(f"gateway address {address} is inside the sandbox subnets", "gateway_addresses")
        for i, link in enumerate(self.private_links):
            where = f"private_links[{i}]"
            if link.source.version != link.destination.version:
                raise _invalid("a private link joins two addresses of the same IP version", where)
            for end in (link.source, link.destination):
                if not self.in_subnets(end):
                    raise _invalid(f"{end} is not inside the sandbox subnets", where)
            for port in link.ports:
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    raise _invalid(f"{port!r} is not a port (1-65535)", f"{where}.ports")
            if link.protocol not in LINK_PROTOCOLS:
                raise _invalid(f"{link.protocol!r} is not tcp or udp", f"{where}.protocol")
        if not 1 <= self.unattached_interval <= 3600:
            raise _invalid("the unattached-source interval must be 1-3600 seconds", "unattached_interval")

    def in_subnets(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.sandbox_subnets)

    @property
    def policy_routing(self) -> PolicyRouting:
        return PolicyRouting(self.fwmark, self.fwmark_mask, self.route_table, self.rule_priority)


# --------------------------------------------------------------------------- rendering


def _mark_match(cfg: SteeringConfig, *, negate: bool = False) -> str:
    op = "!=" if negate else "=="
    if cfg.fwmark_mask == MAX_U32:
        return f"meta mark {op} {cfg.fwmark:#x}"
    return f"meta mark & {cfg.fwmark_mask:#x} {op} {cfg.fwmark:#x}"


def _mark_set(cfg: SteeringConfig) -> str:
    if cfg.fwmark_mask == MAX_U32:
        return f"meta mark set {cfg.fwmark:#x}"
    return f"meta mark set meta mark & {~cfg.fwmark_mask & MAX_U32:#x} | {cfg.fwmark:#x}"


def _anon(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _elements(items: list[str], indent: str = "\t\t") -> list[str]:
    if not items:
        return []
    if len(items) <= 4:
        return [f"{indent}elements = {_anon(items)}"]
    body = [f"{indent}\t{item}," for item in items]
    body[-1] = body[-1].rstrip(",")
    return [f"{indent}elements = {{", *body, f"{indent}}}"]


def _set(name: str, type_: str, items: list[str], *, interval: bool = False, comment: str = "") -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {type_}"]
    if interval:
        lines.append("\t\tflags interval")
    if comment:
        lines.append(f'\t\tcomment "{comment}"')
    lines += _elements(items)
    lines.append("\t}")
    return lines


def _map(name: str, type_: str, items: list[str]) -> list[str]:
    return [f"\tmap {name} {{", f"\t\ttype {type_}", *_elements(items), "\t}"]


_LINK_MATCH = (
    "meta l4proto { tcp, udp } ip saddr . ip daddr . meta l4proto . th dport @link_v4 accept",
    "meta l4proto { tcp, udp } ip6 saddr . ip6 daddr . meta l4proto . th dport @link_v6 accept",
)


def _to_egress(cfg: SteeringConfig, port: int) -> list[str]:
    mark_set = _mark_set(cfg)
    return [
        f"meta nfproto ipv4 meta l4proto tcp {mark_set} tproxy ip to :{port} accept",
        f"meta nfproto ipv6 meta l4proto tcp {mark_set} tproxy ip6 to :{port} accept",
    ]


def _link_elements(links: Iterable[LinkRule], attached: frozenset[IPAddress], version: int) -> list[str]:
    """One element per (src, dst, protocol, port); `any port` is the interval 1-65535 and absorbs the specific
    ports of the same protocol.

    Links with an end that is not attached are left out (a detached sandbox's links are inert, not an error).
    """
    ports: dict[tuple[IPAddress, IPAddress, str], set[int] | None] = {}
    for link in links:
        if link.source.version != version or link.source not in attached or link.destination not in attached:
            continue
        key = (link.source, link.destination, link.protocol)
        if not link.ports:
            ports[key] = None
        elif key not in ports or ports[key] is not None:
            current = ports.get(key) or set()
            ports[key] = current | set(link.ports)
    out: list[str] = []
    for (src, dst, proto), chosen in sorted(
        ports.items(), key=lambda kv: (_addr_key(kv[0][0]), _addr_key(kv[0][1]), kv[0][2])
    ):
        if chosen is None:
            out.append(f"{src} . {dst} . {proto} . 1-65535")
        else:
            out.extend(f"{src} . {dst} . {proto} . {port}" for port in sorted(chosen))
    return out


def links_from_sandboxes(sandboxes: Iterable[Sandbox]) -> tuple[LinkRule, ...]:
    """The address-level links the store's `private_links` grant, in a deterministic order.

    A link lives on its target and names its source by id; a source that is not in the store (or the target
    itself) grants nothing. Every address of the source may reach every address of the target of the same
    IP version."""
    by_id = {sandbox.id: sandbox for sandbox in sandboxes}
    out: list[LinkRule] = []
    for target_id in sorted(by_id):
        target = by_id[target_id]
        for link in target.private_links:
            source = by_id.get(link.source)
            if source is None or source.id == target.id:
                continue
            out.extend(
                LinkRule(src, dst, tuple(sorted(link.ports)), link.protocol)
                for src in source.addresses
                for dst in target.addresses
                if src.version == dst.version
            )
    return tuple(out)


def _sorted_addresses(addresses: Iterable[IPAddress], version: int) -> list[str]:
    return [str(a) for a in sorted((a for a in addresses if a.version == version), key=_addr_key)]


def _classify(cfg: SteeringConfig, target: str, *, outbound_too: bool = False) -> list[str]:
    """Base-chain rules that send sandbox traffic (by interface or by sandbox-subnet source) to `target`.

    Loopback traffic is the host's own (nothing from a sandbox arrives on `lo`, TPROXYed packets keep their
    interface), also when it carries an address of the gateway's inside the sandbox subnets: it passes."""
    rules: list[str] = ['iif "lo" accept comment "the host\'s own traffic"']
    ifaces = [f'"{name}"' for name in cfg.sandbox_interfaces]
    if ifaces:
        rules.append(f"iifname {_anon(ifaces)} jump {target}")
        if outbound_too:
            rules.append(f"oifname {_anon(ifaces)} jump {target}")
    for family, version in (("ip", 4), ("ip6", 6)):
        nets = [str(n) for n in cfg.sandbox_subnets if n.version == version]
        if nets:
            rules.append(f"{family} saddr {_anon(nets)} jump {target}")
            if outbound_too:
                rules.append(f"{family} daddr {_anon(nets)} jump {target}")
    return rules


def _chain(name: str, rules: list[str], hook: str | None = None, comment: str = "") -> list[str]:
    lines = [f"\tchain {name} {{"]
    if comment:
        lines.append(f'\t\tcomment "{comment}"')
    if hook:
        lines.append(f"\t\t{hook}")
    lines += [f"\t\t{rule}" for rule in rules]
    lines.append("\t}")
    return lines


def render_table(cfg: SteeringConfig) -> str:
    """The table definition alone (`table inet <name> { ... }`), deterministic for a given config."""
    subnets = {v: [str(n) for n in cfg.sandbox_subnets if n.version == v] for v in (4, 6)}
    mark_set, mark = _mark_set(cfg), _mark_match(cfg)
    out: list[str] = [f"table inet {cfg.table} {{"]

    out += _set("sandbox_v4", "ipv4_addr", _sorted_addresses(cfg.attached, 4), comment="attached sandbox addresses")
    out += _set("sandbox_v6", "ipv6_addr", _sorted_addresses(cfg.attached, 6), comment="attached sandbox addresses")
    out += _set("gateway_v4", "ipv4_addr", _sorted_addresses(cfg.gateway_addresses, 4))
    out += _set("gateway_v6", "ipv6_addr", _sorted_addresses(cfg.gateway_addresses, 6))
    out += [f"\tcounter {UNATTACHED_COUNTER} {{", '\t\tcomment "packets from routed sources with no record"', "\t}"]
    for family, version in (("ipv4_addr", 4), ("ipv6_addr", 6)):
        out += [
            f"\tset unattached_v{version} {{",
            f"\t\ttype {family}",
            f"\t\tsize {UNATTACHED_SET_SIZE}",
            "\t\tflags dynamic,timeout",
            f"\t\ttimeout {round(cfg.unattached_interval)}s",
            '\t\tcomment "unattached sources seen recently (read by the gateway to log them)"',
            "\t}",
        ]
    out += _set(
        "link_v4",
        "ipv4_addr . ipv4_addr . inet_proto . inet_service",
        _link_elements(cfg.private_links, cfg.attached, 4),
        interval=True,
        comment="private links: src . dst . protocol . dport",
    )
    if cfg.workers > 1:
        for family, version in (("ipv4_addr", 4), ("ipv6_addr", 6)):
            pairs = sorted((a, w) for a, w in cfg.worker_of.items() if a.version == version)
            jumps = [f"{a} : jump egress_worker_{w}" for a, w in pairs]
            out += _map(f"worker_v{version}", f"{family} : verdict", jumps)
    out += _set(
        "link_v6",
        "ipv6_addr . ipv6_addr . inet_proto . inet_service",
        _link_elements(cfg.private_links, cfg.attached, 6),
        interval=True,
        comment="private links: src . dst . protocol . dport",
    )

    # ---- prerouting: classify, then steer or drop
    out += _chain(
        "prerouting",
        _classify(cfg, "from_sandbox"),
        hook="type filter hook prerouting priority mangle; policy accept;",
    )
    steer: list[str] = [
        f"{_NDP} accept",
        # Router solicitations, MLD reports...: every sandbox sends them. Dropped, but not as an unattached source.
        'ip6 saddr fe80::/10 counter drop comment "link-local source: neighbour discovery only"',
        'fib saddr . iif oif missing counter drop comment "source not routed via this interface"',
        # Remembering the source is a rule of its own: when the set is full its `add` fails and ends only that
        # rule, so the drop below still happens (fail closed) and is still counted.
        "ip saddr != @sandbox_v4 add @unattached_v4 { ip saddr }",
        f'ip saddr != @sandbox_v4 counter name "{UNATTACHED_COUNTER}" drop comment "unattached source"',
        "ip6 saddr != @sandbox_v6 add @unattached_v6 { ip6 saddr }",
        f'ip6 saddr != @sandbox_v6 counter name "{UNATTACHED_COUNTER}" drop comment "unattached source"',
        'ct direction reply accept comment "replies to connections opened towards the sandbox"',
        *_LINK_MATCH,
        # DNS before the sandbox-subnet drop: the resolver a sandbox is given may be an address inside the
        # sandbox subnets (the gateway's own there, or none at all); it is intercepted like any other.
        f"meta nfproto ipv4 meta l4proto {{ tcp, udp }} th dport 53 {mark_set} tproxy ip to :{cfg.dns_port} accept",
        f"meta nfproto ipv6 meta l4proto {{ tcp, udp }} th dport 53 {mark_set} tproxy ip6 to :{cfg.dns_port} accept",
    ]
    if subnets[4]:
        steer.append(f'ip daddr {_anon(subnets[4])} counter drop comment "sandbox to sandbox, not linked"')
    if subnets[6]:
        steer.append(f'ip6 daddr {_anon(subnets[6])} counter drop comment "sandbox to sandbox, not linked"')
    steer += [
        'fib daddr type local counter drop comment "the gateway\'s own services"',
        'ip daddr @gateway_v4 counter drop comment "the gateway\'s own services"',
        'ip6 daddr @gateway_v6 counter drop comment "the gateway\'s own services"',
        f"meta l4proto tcp socket transparent 1 {mark_set} accept",
        *(
            _to_egress(cfg, cfg.egress_port)
            if cfg.workers == 1
            else ["meta l4proto tcp ip saddr vmap @worker_v4", "meta l4proto tcp ip6 saddr vmap @worker_v6"]
        ),
        'counter drop comment "everything else: QUIC, other UDP, ICMP, no listener"',
    ]
    out += _chain("from_sandbox", steer)
    if cfg.workers > 1:
        for worker in range(cfg.workers):
            out += _chain(f"egress_worker_{worker}", [*_to_egress(cfg, cfg.egress_port + worker), "counter drop"])

    # ---- input: the TPROXY ports only via TPROXY; sandboxes reach nothing else local
    out += _chain(
        "input",
        [
            f"iif != lo meta l4proto {{ tcp, udp }} th dport {{ {cfg.egress_port}-{cfg.egress_port + cfg.workers - 1}, "
            f"{cfg.dns_port} }} "
            f'{_mark_match(cfg, negate=True)} counter drop comment "TPROXY ports: only via TPROXY"',
            *_classify(cfg, "sandbox_input"),
        ],
        hook="type filter hook input priority filter; policy accept;",
    )
    out += _chain(
        "sandbox_input",
        [
            f"{_NDP} accept",
            f'{mark} socket transparent 1 accept comment "TPROXYed to the egress engine or DNS interceptor"',
            'ct direction reply accept comment "replies to the gateway\'s own connections (ingress tunnel)"',
            "counter drop",
        ],
    )

    # ---- forward: only private links between sandboxes
    out += _chain(
        "forward",
        _classify(cfg, "sandbox_forward", outbound_too=True),
        hook="type filter hook forward priority filter; policy accept;",
    )
    out += _chain(
        "sandbox_forward",
        [
            *_LINK_MATCH,
            "ct direction reply meta l4proto { tcp, udp } ip daddr . ip saddr . meta l4proto . th sport @link_v4 "
            "accept",
            "ct direction reply meta l4proto { tcp, udp } ip6 daddr . ip6 saddr . meta l4proto . th sport @link_v6 "
            "accept",
            "counter drop",
        ],
    )

    if cfg.dial_mark is not None:
        dial = f"meta mark & {cfg.dial_mark:#x} == {cfg.dial_mark:#x}"
        # reject, not drop: the engine's connect() fails at once instead of timing out.
        no = "counter reject with icmpx type admin-prohibited"
        guard = [f'{dial} fib daddr type local {no} comment "engine dials never reach the gateway itself"']
        guard += [f"{dial} ip daddr @gateway_v4 {no}", f"{dial} ip6 daddr @gateway_v6 {no}"]
        if subnets[4]:
            guard.append(f"{dial} ip daddr {_anon(subnets[4])} {no}")
        if subnets[6]:
            guard.append(f"{dial} ip6 daddr {_anon(subnets[6])} {no}")
        out += _chain("output", guard, hook="type filter hook output priority filter; policy accept;")

    out.append("}")
    return "\n".join(out) + "\n"


def render_ruleset(cfg: SteeringConfig) -> str:
    """The whole `nft -f` transaction: create-if-missing, delete, define. Atomic and idempotent."""
    header = [
        "#!/usr/sbin/nft -f",
        "# Generated by gateway.nft. Applied as one transaction: the previous table is replaced atomically.",
        f"add table inet {cfg.table}",
        f"delete table inet {cfg.table}",
    ]
    return "\n".join(header) + "\n" + render_table(cfg)


# --------------------------------------------------------------------------- reading `nft -j` answers


def _nft_objects(text: str, kind: str) -> list[Mapping[str, Any]]:
    try:
        data = json.loads(text)
    except ValueError:
        raise _invalid("nft did not answer JSON", "nft") from None
    items = data.get("nftables", []) if isinstance(data, dict) else []
    return [item[kind] for item in items if isinstance(item, dict) and isinstance(item.get(kind), dict)]


def parse_counter_packets(text: str) -> int:
    """The packet count in `nft -j list|reset counter ...` output (0 when the counter is not there)."""
    return sum(int(c.get("packets", 0)) for c in _nft_objects(text, "counter"))


def parse_set_elements(text: str) -> list[str]:
    """The element values of `nft -j list set ...` output (plain, or `{"elem": {"val": ...}}` with timeouts)."""
    out: list[str] = []
    for found in _nft_objects(text, "set"):
        for element in found.get("elem", ()):
            value = element.get("elem", {}).get("val") if isinstance(element, dict) else element
            if isinstance(value, str):
                out.append(value)
    return out


@dataclass(frozen=True, slots=True)
class SteeringStatus:
    """The steering's state, which `GET /v1/status` shows as `data_plane` (only with `gateway run --data-plane`)."""

    steering: Annotated[bool, Note(description="Started with --steer.")]
    steering_applied: bool
    unattached_dropped: Annotated[
        int,
        Note(
            minimum=0,
            description="Packets dropped since start-up because their source, routed to the gateway, is no "
            "sandbox's address (read every egress.unattached_log_interval).",
        ),
    ]
    unattached_recent: Annotated[
        list[str], Note(description="Such sources seen within the last interval (at most 64).")
    ]


@dataclass(slots=True)
class UnattachedSources:
    """Bookkeeping for the drops of unattached sources: a running total (the table's counter is reset at
    every read and every re-apply) and which addresses to log now, at most once per address per `interval`.

    Bounded: it remembers at most the addresses of the last interval, which the table's sets bound already."""

    interval: float
    max_logged: int = 64
    total: int = 0
    recent: tuple[str, ...] = ()
    _logged: dict[str, float] = field(default_factory=dict)

    def count(self, dropped: int) -> None:
        self.total += max(0, dropped)

    def observe(self, sources: Iterable[str], now: float) -> tuple[list[str], int]:
        """The addresses to log now (at most `max_logged`) and how many more were due but left out."""
        self._logged = {a: t for a, t in self._logged.items() if now - t < self.interval}
        seen = sorted(set(sources))
        self.recent = tuple(seen[: self.max_logged])
        due = [a for a in seen if a not in self._logged]
        for address in due[: self.max_logged]:
            self._logged[address] = now
        return due[: self.max_logged], max(0, len(due) - self.max_logged)
