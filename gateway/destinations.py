"""Which destination addresses the egress engine refuses whatever the name: special-purpose, own, blocklisted.

Pure except for two inputs read from the host: the operator blocklist file and, optionally,
the local interface addresses (passed in by the caller, e.g. from netlink). `check(address)`
answers in a few dict probes (one per distinct prefix length, via `decision.NetSet`) and never
touches a file: `reload_blocklist()`, called periodically by the engine (every
`BLOCKLIST_CHECK_INTERVAL`), replaces the table when the file changed (`gateway.files.FileWatch`).

Four kinds of refusal, in this order:

* `blocklist` (operator threat feed), `gateway` (the gateway's own addresses) and `metadata`
  (the clouds' instance-metadata and host-agent endpoints: the whole IPv4 link-local range, where
  most of them live, and the ones outside it such as Alibaba's 100.100.100.200, Azure's
  WireServer 168.63.129.16, Oracle's 192.0.0.192, AWS's and Google's fd00:ec2::254 and
  fd20:ce::254): refused in every profile, even when a CIDR rule of the policy or the
  operator's `public_ranges` would allow them. A sandbox has no business reaching the gateway's
  services or the credentials a metadata service hands out, and a threat feed outranks a policy.
  An IPv6 address embedding an IPv4 one (IPv4-mapped, IPv4-compatible, 6to4, Teredo server and
  client, NAT64 in the well-known and the local-use prefix) is refused with its embedded
  address's refusal first, so no spelling reaches these.
* `special`: loopback, RFC 1918, CGNAT, link-local, multicast, reserved, documentation and
  benchmarking ranges, IPv6 ULA / link-local / multicast, and the embedded forms above around
  such an address. These are refused unless an explicit `allow_cidrs` rule of the sandbox's
  policy allows the address (`Refusal.overridable`). Ranges in `public_ranges` (config) count
  as public: tests declare their fake internet (198.18/15, 2001:db8::/32) that way.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.decision import NetSet, address_key
from gateway.files import FileWatch, read_regular_file
from gateway.policy import METADATA_ENDPOINTS, IPAddress, IPNetwork
from gateway.rules import Rule

log = structlog.get_logger("gateway.destinations")

#: How often (seconds) the engine looks at the blocklist file's signature.
BLOCKLIST_CHECK_INTERVAL = 1.0

_V4_SPECIAL: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this network' address (0.0.0.0/8)"),
    ("10.0.0.0/8", "private address (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT 100.64.0.0/10)"),
    ("127.0.0.0/8", "loopback address"),
    ("169.254.0.0/16", "link-local address"),
    ("172.16.0.0/12", "private address (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignment (192.0.0.0/24)"),
    ("192.0.2.0/24", "documentation address (TEST-NET-1)"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private address (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking address (198.18.0.0/15)"),
    ("198.51.100.0/24", "documentation address (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation address (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast address"),
    ("240.0.0.0/4", "reserved address (240.0.0.0/4)"),
    ("255.255.255.255/32", "broadcast address"),
)
_V6_SPECIAL: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified address"),
    ("::1/128", "loopback address"),
    ("64:ff9b:1::/48", "local-use NAT64 address (64:ff9b:1::/48)"),
    ("100::/64", "discard-only address (100::/64)"),
    ("2001:2::/48", "benchmarking address (2001:2::/48)"),
    ("2001:10::/28", "ORCHID address (deprecated)"),
    ("2001:20::/28", "ORCHIDv2 address"),
    ("2001:db8::/32", "documentation address (2001:db8::/32)"),
    ("3fff::/20", "documentation address (3fff::/20)"),
    ("fc00::/7", "unique local address (fc00::/7)"),
    ("fe80::/10", "link-local address"),
    ("fec0::/10", "site-local address (deprecated)"),
    ("ff00::/8", "multicast address"),
)

# The IPv6 forms that embed an IPv4 address, as integer prefixes (a dial check must stay cheap).
_COMPAT_PREFIX = 0  # ::/96 (IPv4-mapped ::ffff:0:0/96 is unwrapped by `address_key` already)
_6TO4_PREFIX = 0x2002  # 2002::/16
_TEREDO_PREFIX = 0x20010000  # 2001::/32
_NAT64_PREFIX = 0x0064FF9B << 64  # 64:ff9b::/96, as value >> 32
_NAT64_LOCAL_PREFIX = 0x0064FF9B0001  # 64:ff9b:1::/48: RFC 8215, here in its /96 form (the IPv4 last)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a destination address is refused. `overridable`: an allow_cidrs rule may still allow it."""

    kind: str  # "special" | "gateway" | "blocklist" | "metadata"
    reason: str
    rule: Rule
    overridable: bool


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64), with the form's name."""
    value = int(address)
    if value >> 32 == 0xFFFF:
        return [("IPv4-mapped", ipaddress.IPv4Address(value & 0xFFFFFFFF))]
    return [(form, ipaddress.IPv4Address(inner)) for form, inner in _embedded(value)]


def _embedded(value: int) -> list[tuple[str, int]]:
    """`embedded_ipv4` on an IPv6 address's integer value (not IPv4-mapped: that one is unwrapped before)."""
    if value >> 32 == _COMPAT_PREFIX:
        return [("IPv4-compatible", value)] if value > 1 else []
    if value >> 112 == _6TO4_PREFIX:
        return [("6to4", (value >> 80) & 0xFFFFFFFF)]
    if value >> 96 == _TEREDO_PREFIX:
        # RFC 4380 4: server IPv4 in bits 32-63, client IPv4 obfuscated (inverted) in the last 32 bits.
        return [("Teredo server", (value >> 64) & 0xFFFFFFFF), ("Teredo client", ~value & 0xFFFFFFFF)]
    if value >> 32 == _NAT64_PREFIX:
        return [("NAT64", value & 0xFFFFFFFF)]
    if value >> 80 == _NAT64_LOCAL_PREFIX:
        return [("local-use NAT64", value & 0xFFFFFFFF)]
    return []


def parse_blocklist(text: str, source: str = "blocklist") -> tuple[dict[str, int], list[tuple[int, str]]]:
    """(network text -> line number, [(line number, problem)]). One IP or CIDR per line; `#` comments."""
    entries: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            net = ipaddress.ip_network(line, strict=False)
        except ValueError:
            problems.append((number, f"{line[:80]!r} is not an IP address or CIDR"))
            continue
        entries.setdefault(str(net), number)
    return entries, problems


class Destinations:
    """The destination check the egress engine runs on every address it would dial."""

    def __init__(
        self,
        public_ranges: Iterable[IPNetwork] = (),
        gateway_addresses: Iterable[IPAddress] = (),
        blocklist_path: Path | None = None,
        *,
        local_addresses: Iterable[IPAddress] = (),
    ) -> None:
        self._public = NetSet(public_ranges)
        self._labels: dict[str, str] = {}
        nets: list[IPNetwork] = []
        for text, label in (*_V4_SPECIAL, *_V6_SPECIAL):
            net = ipaddress.ip_network(text)
            nets.append(net)
            self._labels[str(net)] = label
        self._special = NetSet(nets)
        self._metadata = NetSet(ipaddress.ip_network(text) for text, _ in METADATA_ENDPOINTS)
        self._metadata_labels = {str(ipaddress.ip_network(text)): label for text, label in METADATA_ENDPOINTS}
        self._configured_own = tuple(gateway_addresses)
        self._own: set[tuple[int, int]] = set()
        self.set_local_addresses(local_addresses)
        self.blocklist_path = blocklist_path
        self._block_watch = FileWatch((blocklist_path,) if blocklist_path is not None else ())
        self._block = NetSet(())
        self._block_lines: dict[str, int] = {}
        self.reload_blocklist()

    # ------------------------------------------------------------------ inputs

    def set_local_addresses(self, addresses: Iterable[IPAddress]) -> None:
        """The gateway's own addresses: configured ones plus these (the host's interface addresses)."""
        own = {address_key(a) for a in self._configured_own}
        own.update(address_key(a) for a in addresses)
        self._own = own

    def reload_blocklist(self) -> bool:
        """Re-read the blocklist if its file changed (inode, mtime, size). True when the list was replaced."""
        path = self.blocklist_path
        if path is None or not self._block_watch.changed():
            return False
        try:
            os.stat(path)
            missing = False
        except FileNotFoundError:
            missing = True
        except OSError as exc:
            log.warning("egress.blocklist_unreadable", path=str(path), error=str(exc))
            self._block_watch.forget()  # looked at again next time, as an unchanged unreadable file would not be
            return False
        if missing:
            log.warning("egress.blocklist_missing", path=str(path), note="no operator blocklist in force")
            entries: dict[str, int] = {}
        else:
            try:
                text = read_regular_file(Path(path)).decode("utf-8", "replace")
            except OSError as exc:  # also a directory, FIFO or oversized file put in its place
                log.warning("egress.blocklist_unreadable", path=str(path), error=str(exc))
                return False
            entries, problems = parse_blocklist(text)
            for number, problem in problems:
                log.warning("egress.blocklist_bad_line", path=str(path), line=number, problem=problem)
        self._block = NetSet(ipaddress.ip_network(net) for net in entries)
        self._block_lines = entries
        log.info("egress.blocklist_loaded", path=str(path), entries=len(entries))
        return True

    # ------------------------------------------------------------------ the check

    def check(self, address: str | IPAddress) -> Refusal | None:
        """None when the address may be dialled (policy permitting); else why not."""
        try:
            key = address_key(address)  # IPv4-mapped is unwrapped here already
        except ValueError:
            return Refusal("special", f"unparseable address {address!r}", Rule.SPECIAL_ADDRESS, False)
        refusal = self._always_refused(key, address)
        if refusal is not None:
            return refusal
        embedded = _embedded(key[1]) if key[0] == 6 else ()
        for form, inner in embedded:  # before public_ranges: no spelling reaches what is always refused
            refusal = self._always_refused((4, inner), inner)
            if refusal is not None:
                return _wrapped(refusal, form, inner, address)
        if self._public.match(key) is not None:
            return None
        hit = self._special.match(key)
        if hit is not None:
            return Refusal("special", f"{self._labels[hit]} {_shown(key, address)}", Rule.SPECIAL_ADDRESS, True)
        for form, inner in embedded:
            refusal = self.check(ipaddress.IPv4Address(inner))
            if refusal is not None:
                return _wrapped(refusal, form, inner, address)
        return None

    def _always_refused(self, key: tuple[int, int], address: object) -> Refusal | None:
        """The refusals no policy and no `public_ranges` override: blocklist, own address, metadata."""
        if self._block:
            hit = self._block.match(key)
            if hit is not None:
                line = self._block_lines.get(hit)
                where = f" (line {line})" if line else ""
                return Refusal("blocklist", f"operator blocklist {hit}{where}", Rule.BLOCKLIST, False)
        if key in self._own:
            return Refusal("gateway", f"the gateway's own address {_shown(key, address)}", Rule.GATEWAY_ADDRESS, False)
        hit = self._metadata.match(key)
        if hit is not None:
            return Refusal("metadata", f"{self._metadata_labels[hit]} {_shown(key, address)}", Rule.METADATA, False)
        return None


def _shown(key: tuple[int, int], address: object) -> str:
    """An address as refusals name it: IPv4 as such (also when it came IPv4-mapped), IPv6 as given."""
    return str(ipaddress.IPv4Address(key[1])) if key[0] == 4 else str(address)


def _wrapped(inner: Refusal, form: str, embedded: int, address: object) -> Refusal:
    why = inner.reason.rsplit(" ", 1)[0]
    reason = f"IPv4 {ipaddress.IPv4Address(embedded)} embedded in {form} {address} is refused: {why}"
    return Refusal(inner.kind, reason, inner.rule, inner.overridable)


def read_local_addresses() -> list[IPAddress]:
    """Every address on this host's interfaces (netlink; synchronous: call it via asyncio.to_thread)."""
    from pyroute2 import IPRoute

    out: list[IPAddress] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            text = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if text:
                try:
                    out.append(ipaddress.ip_address(text.split("%", 1)[0]))
                except ValueError:
                    continue
    return out
