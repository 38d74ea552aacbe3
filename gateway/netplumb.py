"""The thin I/O shell around the kernel: nftables transactions, policy routing, host routes, sysctls.

Everything here is idempotent, so start-up can simply call it again (and `reconcile` brings
the kernel's host routes in line with the store). The model is seed 002's (Edera zone
networking): each sandbox address gets a static /32 or /128 host route on the gateway-side
interface it lives behind, and that interface answers ARP by proxy; there is no bridge. A
sandbox address without a host route has no path at all.

Every function takes `netns`: `None` acts on the namespace this process runs in (the
production case); a name acts inside `/run/netns/<name>` (tests, benchmarks). Netlink work
uses pyroute2 (`IPRoute(netns=...)`), `nft` runs as a subprocess (`ip netns exec` when
`netns` is given), and sysctls are written through `/proc/sys` in the target namespace.

The functions are synchronous (pyroute2's sync API runs its own event loop): call them from
asyncio code through `asyncio.to_thread`.
"""

from __future__ import annotations

import ipaddress
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gateway.errors import GatewayError
from gateway.nft import (
    MAX_U32,
    TABLE,
    UNATTACHED_COUNTER,
    PolicyRouting,
    parse_counter_packets,
    parse_set_elements,
)
from gateway.policy import IPAddress, IPNetwork

#: rtm_protocol stamped on the host routes this module owns; `reconcile` only ever removes routes carrying it.
ROUTE_PROTO = 0xF7
MAIN_TABLE = 254
RTN_LOCAL = 2
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
COMMAND_TIMEOUT = 15.0
ENOENT, ESRCH = 2, 3

#: Per-interface sysctls for a gateway-side sandbox interface. IPv4 proxy ARP only answers
#: on an interface that forwards (IN_DEV_FORWARD), hence `forwarding`; IPv6 proxy NDP likewise
#: needs forwarding, which is global for IPv6 (`ensure_sysctls`).
INTERFACE_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net/ipv4/conf/{if}/forwarding", "1"),
    ("net/ipv4/conf/{if}/proxy_arp", "1"),
    # Proxy ARP answers are otherwise delayed up to 0.8 s, stalling every sandbox's first connection.
    ("net/ipv4/neigh/{if}/proxy_delay", "0"),
    ("net/ipv4/conf/{if}/rp_filter", "2"),
    ("net/ipv6/conf/{if}/proxy_ndp", "1"),
    ("net/ipv6/conf/{if}/accept_ra", "0"),
)


class PlumbingError(GatewayError):
    status = 500


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    added: tuple[IPAddress, ...] = ()
    moved: tuple[IPAddress, ...] = ()
    removed: tuple[IPAddress, ...] = ()
    #: Desired addresses with no interface in `interface_map` (e.g. the sandbox's link is not up yet): no route.
    unplaced: tuple[IPAddress, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.moved or self.removed)


# --------------------------------------------------------------------------- subprocess helpers


class _NetlinkMessage(Protocol):
    """What this module reads of a pyroute2 message (pyroute2 ships no types)."""

    def get(self, key: str, default: Any = None) -> Any: ...


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise PlumbingError("TOOL_MISSING", f"{name} is not installed", name)
    return found


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """`argv` run inside `netns` (via `ip netns exec`), or as is when `netns` is None."""
    return [_tool("ip"), "netns", "exec", netns, *argv] if netns else argv


def _run(argv: list[str], *, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PlumbingError("COMMAND_TIMEOUT", f"{shlex.join(argv)} did not finish in {timeout}s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise PlumbingError("COMMAND_FAILED", f"{shlex.join(argv[:6])} failed ({proc.returncode}): {detail}")
    return proc.stdout


# --------------------------------------------------------------------------- nftables


def apply_ruleset(text: str, *, netns: str | None = None, check_only: bool = False) -> None:
    """Apply an `nft -f` script as one transaction. On error the kernel keeps the previous ruleset."""
    argv = [_tool("nft"), *(["-c"] if check_only else []), "-f", "-"]
    try:
        _run(in_netns(netns, argv), stdin=text)
    except PlumbingError as exc:
        raise PlumbingError("NFT_REJECTED", exc.message, "ruleset") from None


# --------------------------------------------------------------------------- netlink


@contextmanager
def _iproute(netns: str | None) -> Iterator[IPRoute]:
    # flags=0: never create a namespace that is not there (pyroute2's default is O_CREAT).
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise PlumbingError("INTERFACE_NOT_FOUND", f"no interface named {name!r}", "interface")
    return int(found[0])


def _family(address: IPAddress) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def ensure_policy_routing(
    fwmark: int,
    table: int,
    *,
    mask: int = MAX_U32,
    priority: int = 100,
    netns: str | None = None,
) -> bool:
    """`ip rule add fwmark M[/mask] lookup T priority P` + `ip route add local default dev lo table T`, v4 and v6.

    Idempotent; returns True when something was added.
    """
    changed = False
    with _iproute(netns) as ipr:
        lo = _ifindex(ipr, "lo")
        for family, default in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            if not _find_rules(ipr, family, fwmark, mask, table, priority):
                ipr.rule("add", family=family, fwmark=fwmark, fwmask=mask, table=table, priority=priority)
                changed = True
            if not _local_default(ipr, family, table, lo):
                ipr.route(
                    "replace", family=family, dst=default, type=RTN_LOCAL, oif=lo, table=table, scope=RT_SCOPE_HOST
                )
                changed = True
    return changed


def ensure_routing_for(routing: PolicyRouting, *, netns: str | None = None) -> bool:
    return ensure_policy_routing(
        routing.fwmark, routing.table, mask=routing.fwmark_mask, priority=routing.priority, netns=netns
    )


def _find_rules(ipr: IPRoute, family: int, fwmark: int, mask: int, table: int, priority: int) -> list[_NetlinkMessage]:
    out = []
    for rule in ipr.rule("dump", family=family):
        if (
            rule.get("fwmark") == fwmark
            and (rule.get("fwmask") if rule.get("fwmask") is not None else MAX_U32) == mask
            and rule.get("table") == table
            and rule.get("priority") == priority
        ):
            out.append(rule)
    return out


def _local_default(ipr: IPRoute, family: int, table: int, lo: int) -> bool:
    return any(
        route.get("type") == RTN_LOCAL and route.get("dst_len") == 0 and route.get("oif") == lo
        for route in ipr.route("dump", family=family, table=table)
    )


# --------------------------------------------------------------------------- sysctls


def write_sysctls(values: Mapping[str, str], *, netns: str | None = None) -> None:
    """Write `/proc/sys/<key>` = value (keys with `/`, so interface names may contain dots)."""
    if not values:
        return
    for key in values:
        if ".." in key or key.startswith("/"):
            raise PlumbingError("SYSCTL_INVALID", f"{key!r} is not a sysctl path", "sysctl")
    if netns is None:
        for key, value in values.items():
            Path("/proc/sys", key).write_text(value)
        return
    script = " && ".join(f"echo {shlex.quote(v)} > {shlex.quote('/proc/sys/' + k)}" for k, v in values.items())
    _run(in_netns(netns, ["sh", "-c", script]))


def read_sysctls(pattern: str, *, netns: str | None = None) -> dict[str, str]:
    """`/proc/sys/<pattern>` (a glob, e.g. `net/ipv6/conf/*/accept_ra`) -> value, keys without `/proc/sys/`."""
    if ".." in pattern or pattern.startswith("/"):
        raise PlumbingError("SYSCTL_INVALID", f"{pattern!r} is not a sysctl path", "sysctl")
    if netns is None:
        root = Path("/proc/sys")
        return {str(path.relative_to(root)): path.read_text().strip() for path in root.glob(pattern)}
    script = f'for f in /proc/sys/{pattern}; do [ -e "$f" ] && printf \'%s %s\\n\' "$f" "$(cat "$f")"; done; true'
    out: dict[str, str] = {}
    for line in _run(in_netns(netns, ["sh", "-c", script])).splitlines():
        key, _, value = line.partition(" ")
        out[key.removeprefix("/proc/sys/")] = value.strip()
    return out


def is_sandbox_interface(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name` matches one of the `egress.sandbox_interfaces` patterns (a name, or a prefix and `*`)."""
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def ensure_forwarding(sandbox_interfaces: Iterable[str], *, netns: str | None = None) -> dict[str, str]:
    """What private links (forwarded between sandbox interfaces) and proxy NDP need: IPv4 and IPv6 forwarding.

    Both are namespace-wide. IPv6 forwarding also makes every interface ignore router advertisements while
    its `accept_ra` is 1, which would cost a host whose uplink uses SLAAC its addresses and default route;
    so when this turns IPv6 forwarding on, every existing interface that is not a sandbox interface and has
    `accept_ra = 1` gets `accept_ra = 2` (accept them even when forwarding). Idempotent; returns what it
    wrote (key -> value), empty when everything was already so.
    """
    patterns = tuple(sandbox_interfaces)
    wanted: dict[str, str] = {}
    current = read_sysctls("net/ipv4/ip_forward", netns=netns) | read_sysctls(
        "net/ipv6/conf/all/forwarding", netns=netns
    )
    if current.get("net/ipv6/conf/all/forwarding") != "1":
        for key, value in sorted(read_sysctls("net/ipv6/conf/*/accept_ra", netns=netns).items()):
            name = key.split("/")[3]
            if value == "1" and name not in ("all", "default") and not is_sandbox_interface(name, patterns):
                wanted[key] = "2"
    for key in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        if current.get(key) != "1":
            wanted[key] = "1"
    write_sysctls(wanted, netns=netns)  # accept_ra first: no moment with forwarding on and RAs ignored
    return wanted


def ensure_sysctls(*, forwarding: bool = True, netns: str | None = None) -> None:
    """Namespace-wide forwarding on or off, as is (tests and benchmarks; `gateway run --steer` uses
    `ensure_forwarding`, which also keeps router advertisements working on the host's own interfaces)."""
    flag = "1" if forwarding else "0"
    write_sysctls(
        {"net/ipv4/ip_forward": flag, "net/ipv6/conf/all/forwarding": flag},
        netns=netns,
    )


def interface_sysctls(interface: str) -> dict[str, str]:
    return {key.format(**{"if": interface}): value for key, value in INTERFACE_SYSCTLS}


# --------------------------------------------------------------------------- sandbox attachment


def _addr_key(address: IPAddress) -> tuple[int, int]:
    return (address.version, int(address))


def _host_route(address: IPAddress) -> str:
    return f"{address}/{address.max_prefixlen}"


def _routes_for(ipr: IPRoute, address: IPAddress) -> list[_NetlinkMessage]:
    return [
        route
        for route in ipr.route("dump", family=_family(address), table=MAIN_TABLE)
        if route.get("dst_len") == address.max_prefixlen
        and route.get("dst") is not None
        and ipaddress.ip_address(route.get("dst")) == address
    ]


def _ensure_route(ipr: IPRoute, address: IPAddress, index: int) -> bool:
    if any(r.get("oif") == index and r.get("proto") == ROUTE_PROTO for r in _routes_for(ipr, address)):
        return False
    ipr.route(
        "replace",
        family=_family(address),
        dst=_host_route(address),
        oif=index,
        table=MAIN_TABLE,
        proto=ROUTE_PROTO,
        scope=RT_SCOPE_LINK,
    )
    return True


def _remove_route(ipr: IPRoute, address: IPAddress, index: int | None) -> bool:
    removed = False
    for route in _routes_for(ipr, address):
        if route.get("proto") != ROUTE_PROTO or (index is not None and route.get("oif") != index):
            continue
        try:
            ipr.route(
                "del",
                family=_family(address),
                dst=_host_route(address),
                oif=route.get("oif"),
                table=MAIN_TABLE,
                scope=route.get("scope"),
            )
            removed = True
        except NetlinkError as exc:
            if exc.code not in (ENOENT, ESRCH):
                raise
    return removed


def attach_sandbox(address: IPAddress | str, interface: str, *, netns: str | None = None) -> bool:
    """Static host route `address/32|128 dev interface` (proto ROUTE_PROTO) + proxy ARP/NDP on the interface.

    Idempotent; moves the route if it pointed at another interface. Returns True when the route changed.
    """
    address = ipaddress.ip_address(address)
    with _iproute(netns) as ipr:
        index = _ifindex(ipr, interface)  # a missing interface is INTERFACE_NOT_FOUND, before anything changes
        write_sysctls(interface_sysctls(interface), netns=netns)
        return _ensure_route(ipr, address, index)


def detach_sandbox(address: IPAddress | str, interface: str | None = None, *, netns: str | None = None) -> bool:
    """Remove the host route (only ours, and only via `interface` when given). Idempotent; True if removed."""
    address = ipaddress.ip_address(address)
    with _iproute(netns) as ipr:
        index = None
        if interface is not None:
            found = ipr.link_lookup(ifname=interface)
            if not found:
                return False
            index = int(found[0])
        return _remove_route(ipr, address, index)


def _owned_routes(ipr: IPRoute, nets: tuple[IPNetwork, ...]) -> dict[IPAddress, int]:
    out: dict[IPAddress, int] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family, table=MAIN_TABLE):
            if route.get("proto") != ROUTE_PROTO or route.get("dst") is None:
                continue
            address = ipaddress.ip_address(route.get("dst"))
            if route.get("dst_len") != address.max_prefixlen:
                continue
            if nets and not any(address.version == n.version and address in n for n in nets):
                continue
            out[address] = int(route.get("oif"))
    return out


def attached_routes(*, netns: str | None = None, subnets: Iterable[IPNetwork] = ()) -> dict[IPAddress, str]:
    """The host routes this module owns: address -> interface name."""
    with _iproute(netns) as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
        return {address: names.get(index, "") for address, index in _owned_routes(ipr, tuple(subnets)).items()}


def reconcile(
    desired_addresses: Iterable[IPAddress | str],
    interface_map: Mapping[IPAddress | str, str],
    *,
    netns: str | None = None,
    subnets: Iterable[IPNetwork] = (),
) -> ReconcileResult:
    """Make the kernel's host routes match the store: add missing, move misplaced, remove stale ones.

    `desired_addresses` come from the policy store; `interface_map` says which gateway-side
    interface each address lives behind (from the sandbox runtime). Only routes stamped with
    `ROUTE_PROTO` (and, when `subnets` is given, inside them) are ever removed. A desired
    address without a known interface gets no route (reported as `unplaced`).
    """
    desired = {ipaddress.ip_address(a) for a in desired_addresses}
    where = {ipaddress.ip_address(a): name for a, name in interface_map.items()}
    added: list[IPAddress] = []
    moved: list[IPAddress] = []
    removed: list[IPAddress] = []
    unplaced = sorted((a for a in desired if not where.get(a)), key=_addr_key)
    errors: dict[str, str] = {}
    placed = {a: where[a] for a in desired if where.get(a)}
    write_sysctls(
        {k: v for name in sorted(set(placed.values())) for k, v in interface_sysctls(name).items()}, netns=netns
    )
    with _iproute(netns) as ipr:
        current = _owned_routes(ipr, tuple(subnets))
        for address in sorted(current.keys() - placed.keys(), key=_addr_key):
            try:
                if _remove_route(ipr, address, None):
                    removed.append(address)
            except NetlinkError as exc:
                errors[str(address)] = str(exc)
        indexes: dict[str, int] = {}
        for address in sorted(placed, key=_addr_key):
            name = placed[address]
            try:
                if name not in indexes:
                    indexes[name] = _ifindex(ipr, name)
                if _ensure_route(ipr, address, indexes[name]):
                    (moved if address in current else added).append(address)
            except (GatewayError, NetlinkError) as exc:
                errors[str(address)] = str(exc)
    return ReconcileResult(tuple(added), tuple(moved), tuple(removed), tuple(unplaced), errors)


# --------------------------------------------------------------------------- unattached sources


def read_unattached(table: str = TABLE, *, netns: str | None = None) -> tuple[int, list[str]]:
    """Packets dropped from unattached sources since the last call (the counter is reset as it is read), and
    the sources seen within the table's unattached interval."""
    nft = _tool("nft")
    dropped = parse_counter_packets(
        _run(in_netns(netns, [nft, "-j", "reset", "counter", "inet", table, UNATTACHED_COUNTER]))
    )
    sources = [
        address
        for version in (4, 6)
        for address in parse_set_elements(
            _run(in_netns(netns, [nft, "-j", "list", "set", "inet", table, f"unattached_v{version}"]))
        )
    ]
    return dropped, sources
