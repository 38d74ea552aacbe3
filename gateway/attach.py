"""Development helper: attach a sandbox network namespace to the gateway (tests, benchmarks, demos).

    gateway sandbox attach --netns demo --address 10.75.0.9 --address fdd4:1476:6c7e::9
    gateway sandbox detach --netns demo
    gateway sandbox attach --interface vif7.0 --address 10.75.0.7     # an interface a VMM created
    gateway sandbox detach --interface vif7.0 [--address 10.75.0.7]

builds what a VMM builds for a real sandbox (a host route and proxy ARP per address, no bridge):

* namespace NAME (created when missing) with `eth0` holding the sandbox addresses as /32 and
  /128, `default via 169.254.1.1 dev eth0 onlink` (answered by proxy ARP) and `default via fe80::1`;
* its veth peer `vif<n>.0` on the gateway side (matches the default `egress.sandbox_interfaces`
  pattern `vif*`, so the nftables table steers it), holding `fe80::1/64`;
* the static host routes and proxy ARP on `vif<n>.0` (`netplumb.attach_sandbox`).

It acts in the network namespace it runs in (`ip netns exec GW gateway sandbox attach ...`), or
in `gateway_netns` when given. The gateway-side interface carries the alias `sandbox-netns:NAME`,
which is how a second run (idempotent: it changes nothing) and `detach` find it again.

`attach_interface` (`--interface`) is the production-shaped half only: routes + proxy ARP for an
interface the operator's VMM created (and `detach_interface` removes them). Link and namespace
work uses `ip` (JSON output) because veth creation
across namespaces is one line there; routes go through `netplumb` (pyroute2). Everything is
synchronous: call it through `asyncio.to_thread` from an event loop.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from gateway.clibase import EXIT_API_ERROR, EXIT_OK, EXIT_USAGE
from gateway.errors import GatewayError
from gateway.formatting import format_block
from gateway.policy import IPAddress, IPNetwork

SANDBOX_INTERFACE = "eth0"
GATEWAY_LINK_LOCAL = "fe80::1"
SANDBOX_NEXT_HOP_V4 = "169.254.1.1"
ALIAS_PREFIX = "sandbox-netns:"
NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 15.0
#: Interface names are at most 15 bytes (IFNAMSIZ - 1); `vif<n>.0` leaves room for a large n.
MAX_VIF_INDEX = 99_999

IP_TOOL = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"


class AttachError(GatewayError):
    status = 500


@dataclass(frozen=True, slots=True)
class Attachment:
    #: None for an interface somebody else created (`--interface`).
    netns: str | None
    #: The gateway-side end of the veth (`vif<n>.0`).
    interface: str
    addresses: tuple[IPAddress, ...]
    gateway_netns: str | None = None
    #: False when everything was already in place (a repeated attach).
    changed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "interface": self.interface,
            "addresses": [str(a) for a in self.addresses],
            "gateway_netns": self.gateway_netns,
            "changed": self.changed,
        }


# --------------------------------------------------------------------------- ip(8) helpers


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = [IP_TOOL, *(["-n", netns] if netns else []), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise AttachError("COMMAND_TIMEOUT", f"{shlex.join(argv)} did not finish in {COMMAND_TIMEOUT}s") from None
    if check and proc.returncode != 0:
        raise AttachError("COMMAND_FAILED", f"{shlex.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    text = _ip("-j", *args, netns=netns).strip()
    return list(json.loads(text)) if text else []


def _links(netns: str | None) -> list[dict[str, Any]]:
    return _ip_json("link", "show", netns=netns)


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists() and name in _netns_names()


def _netns_names() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}


def _netns_mounts_propagate() -> bool:
    """False when this process runs in a mount namespace whose /run/netns is only a slave copy (as under
    `ip netns exec`): a namespace created here would be bind-mounted in this mount namespace only and
    vanish when the process exits, leaving an empty file behind in /run/netns."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return True
    for line in lines:
        fields = line.split()
        if len(fields) > 6 and fields[4] == str(NETNS_DIR):
            optional = fields[6 : fields.index("-")]
            return not any(f.startswith("master:") for f in optional)
    return True  # no /run/netns mount yet: `ip netns add` creates a shared one in this namespace


def _check_name(name: str, what: str) -> None:
    if not name or "/" in name or name in (".", "..") or len(name) > 64:
        raise AttachError("INVALID_NAME", f"{name!r} is not a usable {what}", what)


def _addresses(values: Iterable[IPAddress | str], subnets: Sequence[IPNetwork]) -> tuple[IPAddress, ...]:
    out: list[IPAddress] = []
    for value in values:
        try:
            address = ipaddress.ip_address(str(value))
        except ValueError:
            raise AttachError("INVALID_ADDRESS", f"{value!r} is not an IP address", "address", status=400) from None
        if subnets and not any(address.version == net.version and address in net for net in subnets):
            inside = ", ".join(str(n) for n in subnets)
            raise AttachError("ADDRESS_OUTSIDE_SUBNETS", f"{address} is not in {inside}", "address", status=400)
        if address not in out:
            out.append(address)
    if not out:
        raise AttachError("NO_ADDRESS", "at least one sandbox address is needed", "address", status=400)
    return tuple(out)


def find_interface(name: str, *, gateway_netns: str | None = None) -> str | None:
    """The gateway-side interface attached to namespace `name` (found by its alias), if any."""
    for link in _links(gateway_netns):
        if link.get("ifalias") == ALIAS_PREFIX + name:
            return str(link["ifname"])
    return None


def _free_vif(gateway_netns: str | None) -> str:
    taken = {str(link.get("ifname")) for link in _links(gateway_netns)}
    for index in range(1, MAX_VIF_INDEX + 1):
        if f"vif{index}.0" not in taken:
            return f"vif{index}.0"
    raise AttachError("NO_INTERFACE_NAME", "no free vif<n>.0 name")


# --------------------------------------------------------------------------- attach / detach


def attach_interface(
    address: IPAddress | str, ifname: str, *, gateway_netns: str | None = None, subnets: Sequence[IPNetwork] = ()
) -> bool:
    """Host route + proxy ARP/NDP for a sandbox address behind an interface the operator's VMM created.

    Idempotent; True when the route was added or moved."""
    from gateway import netplumb  # here, not at the top: pyroute2 costs every `gateway` command ~0.3 s to import

    (checked,) = _addresses([address], subnets)
    return netplumb.attach_sandbox(checked, ifname, netns=gateway_netns)


def _check_steered(ifname: str, patterns: Sequence[str] | None, what: str) -> None:
    """A sandbox interface must match `egress.sandbox_interfaces` (None: not checked). From any other interface
    the table classifies only sources inside the sandbox subnets, and with the forwarding `--steer` turns on a
    spoofed source outside them would be forwarded unfiltered."""
    from gateway import netplumb

    if patterns is not None and not netplumb.is_sandbox_interface(ifname, patterns):
        raise AttachError(
            "INTERFACE_NOT_STEERED",
            f"{ifname!r} matches none of egress.sandbox_interfaces ({', '.join(patterns)}): the gateway would not "
            "filter what arrives on it whatever its source address",
            what,
            status=400,
        )


def attach_interfaces(
    addresses: Iterable[IPAddress | str],
    ifname: str,
    *,
    gateway_netns: str | None = None,
    subnets: Sequence[IPNetwork] = (),
    interfaces: Sequence[str] | None = None,
) -> Attachment:
    """`attach_interface` for each address (all checked before anything changes); `interfaces`: the
    `egress.sandbox_interfaces` patterns `ifname` must match."""
    _check_name(ifname, "interface")
    _check_steered(ifname, interfaces, "interface")
    wanted = _addresses(addresses, subnets)
    changed = False
    for address in wanted:
        changed |= attach_interface(address, ifname, gateway_netns=gateway_netns)
    return Attachment(None, ifname, wanted, gateway_netns, changed)


def detach_interface(
    ifname: str, addresses: Iterable[IPAddress | str] = (), *, gateway_netns: str | None = None
) -> tuple[IPAddress, ...]:
    """Remove our host routes via `ifname` (only those of `addresses` when given); the interface stays (the
    VMM owns it). Idempotent; returns the addresses whose route was removed."""
    from gateway import netplumb

    _check_name(ifname, "interface")
    only = set(_addresses(addresses, ())) if addresses else None
    removed: list[IPAddress] = []
    for address, interface in netplumb.attached_routes(netns=gateway_netns).items():
        mine = interface == ifname and (only is None or address in only)
        if mine and netplumb.detach_sandbox(address, ifname, netns=gateway_netns):
            removed.append(address)
    return tuple(removed)


def attach_netns(
    name: str,
    addresses: Iterable[IPAddress | str],
    *,
    gateway_netns: str | None = None,
    ifname: str | None = None,
    subnets: Sequence[IPNetwork] = (),
    interfaces: Sequence[str] | None = None,
) -> Attachment:
    """Create (or complete) sandbox namespace `name` wired to the gateway; see the module docstring.
    `interfaces`: the `egress.sandbox_interfaces` patterns the gateway-side interface must match.

    Not transactional: after a failure part way, `detach_netns` removes whatever was made."""
    from gateway import netplumb

    _check_name(name, "netns")
    # The interface this attach ends up with: the one asked for, the one made earlier, or a new vif<n>.0.
    _check_steered(ifname or find_interface(name, gateway_netns=gateway_netns) or "vif1.0", interfaces, "ifname")
    wanted = _addresses(addresses, subnets)
    changed = False
    if not netns_exists(name):
        if gateway_netns is None and not _netns_mounts_propagate():
            raise AttachError(
                "NETNS_WOULD_VANISH",
                f"namespace {name!r} does not exist, and creating it from inside `ip netns exec` would not "
                f"outlive this process: create it first (`ip netns add {name}`), or run without `ip netns exec` "
                "and pass the gateway namespace instead",
                "netns",
            )
        _ip("netns", "add", name)
        changed = True
    # Addresses usable at once: no duplicate address detection on a point-to-point link we just made.
    netplumb.write_sysctls({"net/ipv6/conf/all/accept_dad": "0", "net/ipv6/conf/default/accept_dad": "0"}, netns=name)

    vif = find_interface(name, gateway_netns=gateway_netns)
    if vif is not None and ifname is not None and vif != ifname:
        raise AttachError("ALREADY_ATTACHED", f"{name!r} is already attached through {vif}", "ifname", status=409)
    if vif is None:
        vif = ifname or _free_vif(gateway_netns)
        _check_name(vif, "ifname")
        if any(link.get("ifname") == SANDBOX_INTERFACE for link in _links(name)):
            raise AttachError("INTERFACE_EXISTS", f"{name!r} already has an {SANDBOX_INTERFACE}", "netns", status=409)
        _ip("link", "add", vif, "type", "veth", "peer", "name", SANDBOX_INTERFACE, "netns", name, netns=gateway_netns)
        _ip("link", "set", vif, "alias", ALIAS_PREFIX + name, netns=gateway_netns)
        changed = True

    changed |= _ensure_gateway_side(vif, gateway_netns)
    changed |= _ensure_sandbox_side(name, wanted)
    # Host routes: only ours (proto netplumb.ROUTE_PROTO) on this interface; stale ones from an earlier run go.
    for address, interface in netplumb.attached_routes(netns=gateway_netns).items():
        if interface == vif and address not in wanted:
            changed |= netplumb.detach_sandbox(address, vif, netns=gateway_netns)
    for address in wanted:
        changed |= netplumb.attach_sandbox(address, vif, netns=gateway_netns)
    return Attachment(name, vif, wanted, gateway_netns, changed)


def _link(ifname: str, netns: str | None) -> dict[str, Any]:
    found = _ip_json("addr", "show", "dev", ifname, netns=netns)
    if not found:
        raise AttachError("INTERFACE_NOT_FOUND", f"no interface {ifname!r}", "ifname")
    return found[0]


def _has_address(link: dict[str, Any], address: str, prefix: int) -> bool:
    return any(
        ipaddress.ip_address(info["local"]) == ipaddress.ip_address(address) and info.get("prefixlen") == prefix
        for info in link.get("addr_info", ())
        if "local" in info
    )


def _ensure_gateway_side(vif: str, gateway_netns: str | None) -> bool:
    changed = False
    link = _link(vif, gateway_netns)
    if not _has_address(link, GATEWAY_LINK_LOCAL, 64):
        _ip("addr", "add", f"{GATEWAY_LINK_LOCAL}/64", "dev", vif, "nodad", netns=gateway_netns)
        changed = True
    if "UP" not in link.get("flags", ()):
        _ip("link", "set", vif, "up", netns=gateway_netns)
        changed = True
    return changed


def _ensure_sandbox_side(name: str, wanted: tuple[IPAddress, ...]) -> bool:
    changed = False
    lo = _link("lo", name)
    if "UP" not in lo.get("flags", ()):
        _ip("link", "set", "lo", "up", netns=name)
        changed = True
    link = _link(SANDBOX_INTERFACE, name)
    for info in link.get("addr_info", ()):
        # Global addresses not asked for any more go (a rerun with other addresses); link-local stays.
        if info.get("scope") == "global" and ipaddress.ip_address(info["local"]) not in wanted:
            _ip("addr", "del", f"{info['local']}/{info['prefixlen']}", "dev", SANDBOX_INTERFACE, netns=name)
            changed = True
    for address in wanted:
        if not _has_address(link, str(address), address.max_prefixlen):
            extra = ("nodad",) if address.version == 6 else ()
            _ip("addr", "add", f"{address}/{address.max_prefixlen}", "dev", SANDBOX_INTERFACE, *extra, netns=name)
            changed = True
    if "UP" not in link.get("flags", ()):
        _ip("link", "set", SANDBOX_INTERFACE, "up", netns=name)
        changed = True
    versions = {a.version for a in wanted}
    defaults = {4: (SANDBOX_NEXT_HOP_V4, ("onlink",)), 6: (GATEWAY_LINK_LOCAL, ())}
    for version, (via, flags) in defaults.items():
        family = f"-{version}"
        routes = _ip_json(family, "route", "show", "default", netns=name)
        present = any(r.get("gateway") == via and r.get("dev") == SANDBOX_INTERFACE for r in routes)
        if version in versions and not present:
            _ip(family, "route", "replace", "default", "via", via, "dev", SANDBOX_INTERFACE, *flags, netns=name)
            changed = True
        elif version not in versions and present:
            _ip(family, "route", "del", "default", "via", via, "dev", SANDBOX_INTERFACE, netns=name)
            changed = True
    return changed


def detach_netns(name: str, *, gateway_netns: str | None = None) -> bool:
    """Remove the host routes, the veth and namespace `name` (idempotent). True when something was removed."""
    from gateway import netplumb

    _check_name(name, "netns")
    changed = False
    vif = find_interface(name, gateway_netns=gateway_netns)
    if vif is not None:
        # Routes first, explicitly: the kernel would drop them with the link, but only ours are ours to remove.
        for address, interface in netplumb.attached_routes(netns=gateway_netns).items():
            if interface == vif:
                netplumb.detach_sandbox(address, vif, netns=gateway_netns)
        _ip("link", "del", vif, netns=gateway_netns)
        changed = True
    if netns_exists(name):
        _ip("netns", "del", name)
        changed = True
    return changed


# --------------------------------------------------------------------------- command line


def add_attach_commands(subparsers: Any) -> None:
    """`attach` and `detach` subcommands: local, need root, never talk to the API (so no --api/--token)."""
    # SUPPRESS: a `gateway --config FILE sandbox attach ...` given before the subcommand is not overwritten.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="configuration file (for network.sandbox_subnets)"
    )
    gateway_netns = argparse.ArgumentParser(add_help=False)
    gateway_netns.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not a table")
    gateway_netns.add_argument(
        "--gateway-netns", metavar="NAME", help="act in this gateway namespace instead of the current one"
    )

    def target(parser: argparse.ArgumentParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--netns", metavar="NAME", help="sandbox network namespace (development helper)")
        which.add_argument(
            "--interface",
            metavar="IF",
            help="an existing gateway-side interface (created by a VMM): only its host routes and proxy ARP",
        )

    p = subparsers.add_parser(
        "attach",
        parents=[config, gateway_netns],
        help="(root) wire a sandbox to this gateway namespace: an interface a VMM made, or a new namespace",
        description="With --interface IF: the static host route of each sandbox address via IF and proxy ARP/NDP "
        "on it (no bridge; IF must exist). With --netns NAME (development): create network namespace NAME "
        "(if missing) with a veth vif<n>.0 <-> eth0 to the namespace this runs in, the sandbox addresses, default "
        "routes, and the gateway-side host routes and proxy ARP.",
    )
    target(p)
    p.add_argument("--address", action="append", required=True, metavar="IP", help="sandbox address (repeatable)")
    p.add_argument("--ifname", metavar="VIF", help="with --netns: the gateway-side interface name (default: vif<n>.0)")
    d = subparsers.add_parser(
        "detach",
        parents=[gateway_netns],
        help="(root) remove the host routes via an interface, or a namespace made by `attach`, its veth and routes",
    )
    target(d)
    d.add_argument("--address", action="append", metavar="IP", help="with --interface: only these addresses' routes")


def run_attach_command(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Handler for `attach` / `detach` (`args.action`). Prints the attachment (`--json`: as JSON)."""

    def emit(data: dict[str, Any]) -> None:
        out.write((json.dumps(data) if getattr(args, "json", False) else format_block(data)) + "\n")

    if os.geteuid() != 0:
        err.write("attach/detach need root (network namespaces, links, routes)\n")
        return EXIT_USAGE
    try:
        if args.action == "detach" and args.interface is not None:
            gone = detach_interface(args.interface, args.address or (), gateway_netns=args.gateway_netns)
            out.write(json.dumps({"interface": args.interface, "removed": [str(a) for a in gone]}) + "\n")
            return EXIT_OK
        if args.action == "detach":
            if args.address:
                raise AttachError(
                    "USAGE", "--address is for --interface; --netns removes the whole namespace", status=400
                )
            removed = detach_netns(args.netns, gateway_netns=args.gateway_netns)
            emit({"netns": args.netns, "removed": removed})
            return EXIT_OK
        from gateway.settings import load_config

        config = load_config(getattr(args, "config", None))
        subnets, interfaces = config.network.sandbox_subnets, config.egress.sandbox_interfaces
        if args.interface is not None:
            if args.ifname is not None:
                raise AttachError("USAGE", "--ifname is for --netns; --interface names the interface", status=400)
            attachment = attach_interfaces(
                args.address, args.interface, gateway_netns=args.gateway_netns, subnets=subnets, interfaces=interfaces
            )
        else:
            attachment = attach_netns(
                args.netns,
                args.address,
                gateway_netns=args.gateway_netns,
                ifname=args.ifname,
                subnets=subnets,
                interfaces=interfaces,
            )
    except GatewayError as exc:
        err.write(f"{exc}\n")
        return EXIT_USAGE if exc.status == 400 else EXIT_API_ERROR  # exit 1: the command failed, as for the API
    emit(attachment.to_dict())
    return EXIT_OK
