"""Throw-away network topologies in namespaces, for `gateway demo`, end-to-end tests and benchmarks (needs root).

    with Topology(sandboxes=2) as topo:
        topo.attach_with_cli()      # `gateway sandbox attach --interface vifN.0 --address ...`, as an operator
        ...                         # start `gateway run --data-plane --steer` in topo.gw (gateway/demo/run.py)
        topo.run("sb1", ["curl", "-m", "3", "http://198.18.1.1/"])

The topology plays the VMM: it creates the namespaces and veths. Everything the gateway host
needs beyond that comes from the product (the attach CLI, then `gateway run --steer`: sysctls,
ip rules, the nft table). `plumb` does the latter by hand, for benchmarks that run without it.

Layout (every name starts with a prefix: a unique `gwt<6 hex>` by default, so parallel test runs never
collide; `gateway demo` uses a fixed one, so what a crashed demo left can be found and removed):

* `<prefix>-sbN`: sandbox N. `eth0` holds 10.75.0.N/32 and fdd4:1476:6c7e::N/128, with
  `default via 169.254.1.1 dev eth0 onlink` (answered by proxy ARP) and `default via fe80::1`.
* `<prefix>-gw`: the gateway host. `vifN.0` faces sandbox N (no IPv4 address, fe80::1
  link-local; the host route and proxy ARP come from `gateway sandbox attach --interface`, seed 002's model);
  `up0` faces the internet: 198.18.0.2/24 and 2001:db8:ff::2/64, default routes via `.1`.
* `<prefix>-inet`: "the internet". `eth0` holds 198.18.0.1/24 and 2001:db8:ff::1/64; origin
  addresses 198.18.1.1..K/32 and 2001:db8:1::1..K/128 sit on `lo`. It routes the sandbox
  subnets back to the gateway, so anything the gateway *forwarded* would get an answer:
  a test that sees no answer proves the gateway did not forward it.

Nothing touches the root namespace: veths are created inside the namespaces. `close()`
(also `__exit__` and an `atexit` safety net) kills every process started in the
namespaces and deletes them.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway import netplumb
from gateway.demo.fakenet import ORIGIN_SERVER
from gateway.nft import LinkRule, SteeringConfig, render_ruleset
from gateway.policy import IPAddress

SANDBOX_V4 = ipaddress.IPv4Network("10.75.0.0/16")
SANDBOX_V6 = ipaddress.IPv6Network("fdd4:1476:6c7e::/48")
GATEWAY_V4 = ipaddress.ip_address("198.18.0.2")
GATEWAY_V6 = ipaddress.ip_address("2001:db8:ff::2")
INET_V4 = ipaddress.ip_address("198.18.0.1")
INET_V6 = ipaddress.ip_address("2001:db8:ff::1")
GATEWAY_LINK_LOCAL = "fe80::1"
SANDBOX_NEXT_HOP_V4 = "169.254.1.1"
SANDBOX_INTERFACE_PATTERN = "vif*"
IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"
DEFAULT_TIMEOUT = 15.0

_LIVE: set[Topology] = set()
_LIVE_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class Sandbox:
    index: int
    netns: str
    v4: ipaddress.IPv4Address
    v6: ipaddress.IPv6Address
    interface: str = "eth0"  # inside the sandbox
    gw_interface: str = ""  # the gateway-side end of its veth

    @property
    def addresses(self) -> tuple[IPAddress, IPAddress]:
        return (self.v4, self.v6)


class TopologyError(RuntimeError):
    pass


class Topology:
    def __init__(self, sandboxes: int = 2, origins: int = 3, prefix: str | None = None) -> None:
        if not 1 <= sandboxes <= 250 or not 1 <= origins <= 250:
            raise ValueError("1-250 sandboxes and origins")
        self.prefix = prefix or f"gwt{secrets.token_hex(3)}"
        self.gw = f"{self.prefix}-gw"
        self.inet = f"{self.prefix}-inet"
        self.sandboxes: list[Sandbox] = [
            Sandbox(
                index=i,
                netns=f"{self.prefix}-sb{i}",
                v4=SANDBOX_V4[i],
                v6=SANDBOX_V6[i],
                gw_interface=f"vif{i}.0",
            )
            for i in range(1, sandboxes + 1)
        ]
        self.origins_v4 = [ipaddress.ip_address(f"198.18.1.{i}") for i in range(1, origins + 1)]
        self.origins_v6 = [ipaddress.ip_address(f"2001:db8:1::{i:x}") for i in range(1, origins + 1)]
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.closed = False
        self.config: SteeringConfig | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Topology:
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, *args: str, netns: str | None = None) -> None:
        argv = [IP, *(["-n", netns] if netns else []), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=DEFAULT_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise TopologyError(f"{' '.join(argv)}: {proc.stderr.strip()}")

    def _add_namespace(self, name: str) -> None:
        self._ip("netns", "add", name)
        self.namespaces.append(name)
        self._ip("link", "set", "lo", "up", netns=name)
        # Addresses usable at once: no duplicate address detection in a throw-away namespace.
        netplumb.write_sysctls(
            {"net/ipv6/conf/all/accept_dad": "0", "net/ipv6/conf/default/accept_dad": "0"}, netns=name
        )

    def _build(self) -> None:
        for name in (self.gw, self.inet, *(sb.netns for sb in self.sandboxes)):
            self._add_namespace(name)
        gw, inet = self.gw, self.inet

        # gateway <-> internet
        self._ip("link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", inet, netns=gw)
        self._ip("addr", "add", f"{GATEWAY_V4}/24", "dev", "up0", netns=gw)
        self._ip("addr", "add", f"{GATEWAY_V6}/64", "dev", "up0", "nodad", netns=gw)
        self._ip("link", "set", "up0", "up", netns=gw)
        self._ip("route", "add", "default", "via", str(INET_V4), netns=gw)
        self._ip("-6", "route", "add", "default", "via", str(INET_V6), netns=gw)
        self._ip("addr", "add", f"{INET_V4}/24", "dev", "eth0", netns=inet)
        self._ip("addr", "add", f"{INET_V6}/64", "dev", "eth0", "nodad", netns=inet)
        self._ip("link", "set", "eth0", "up", netns=inet)
        for origin in (*self.origins_v4, *self.origins_v6):
            self._ip("addr", "add", f"{origin}/{origin.max_prefixlen}", "dev", "lo", netns=inet)
        self._ip("route", "add", str(SANDBOX_V4), "via", str(GATEWAY_V4), netns=inet)
        self._ip("-6", "route", "add", str(SANDBOX_V6), "via", str(GATEWAY_V6), netns=inet)

        # gateway <-> each sandbox (no bridge; host route + proxy ARP come from the attach CLI)
        for sb in self.sandboxes:
            veth = ("type", "veth", "peer", "name", "eth0", "netns", sb.netns)
            self._ip("link", "add", sb.gw_interface, *veth, netns=gw)
            self._ip("addr", "add", f"{GATEWAY_LINK_LOCAL}/64", "dev", sb.gw_interface, "nodad", netns=gw)
            self._ip("link", "set", sb.gw_interface, "up", netns=gw)
            self._ip("addr", "add", f"{sb.v4}/32", "dev", "eth0", netns=sb.netns)
            self._ip("addr", "add", f"{sb.v6}/128", "dev", "eth0", "nodad", netns=sb.netns)
            self._ip("link", "set", "eth0", "up", netns=sb.netns)
            self._ip("route", "add", "default", "via", SANDBOX_NEXT_HOP_V4, "dev", "eth0", "onlink", netns=sb.netns)
            self._ip("-6", "route", "add", "default", "via", GATEWAY_LINK_LOCAL, "dev", "eth0", netns=sb.netns)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.kill_all()
            delete_namespaces(reversed(self.namespaces))
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)

    # ------------------------------------------------------------------ processes

    def ns(self, name: str) -> str:
        """`gw`, `inet`, `sbN` or a full namespace name -> the full name."""
        if name in self.namespaces:
            return name
        full = f"{self.prefix}-{name}"
        if full not in self.namespaces:
            raise KeyError(f"no namespace {name!r} in this topology")
        return full

    def argv(self, ns: str, cmd: Sequence[str] | str) -> list[str]:
        cmd = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return [IP, "netns", "exec", self.ns(ns), *cmd]

    def run(
        self,
        ns: str,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                self.argv(ns, cmd), input=input, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise TopologyError(f"{cmd!r} in {ns} timed out after {timeout}s") from exc
        if check and proc.returncode != 0:
            raise TopologyError(f"{cmd!r} in {ns} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def popen(self, ns: str, cmd: Sequence[str] | str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in `ns` (own process group, killed at close)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(self.argv(ns, cmd), start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    def python(self, ns: str, code: str, *args: str, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> str:
        """Run a Python snippet in `ns` with this interpreter; returns stdout."""
        return self.run(ns, [sys.executable, "-c", code, *args], timeout=timeout, check=check).stdout

    def start_python(
        self, ns: str, code: str, *args: str, ready: str | None = "ready", timeout: float = 10.0
    ) -> subprocess.Popen[Any]:
        """Start a Python snippet in `ns`; wait until it prints `ready` on stdout (when given)."""
        proc = self.popen(ns, [sys.executable, "-u", "-c", code, *args])
        if ready is not None:
            wait_for_line(proc, ready, timeout)
        return proc

    def kill(self, proc: subprocess.Popen[Any], timeout: float = 3.0) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()

    def kill_all(self) -> None:
        while self.processes:
            self.kill(self.processes.pop())

    def start_origin(self, ports: Iterable[int] = (80, 8443)) -> subprocess.Popen[Any]:
        """The HTTP origin in the internet namespace, on every origin address."""
        return self.start_python("inet", ORIGIN_SERVER, *(str(p) for p in ports))

    # ------------------------------------------------------------------ the gateway

    @property
    def interface_map(self) -> dict[IPAddress, str]:
        return {address: sb.gw_interface for sb in self.sandboxes for address in sb.addresses}

    def sandbox(self, index: int) -> Sandbox:
        return self.sandboxes[index - 1]

    def steering_config(
        self, *, attached: Iterable[Sandbox] | None = None, links: Iterable[LinkRule] = (), **overrides: Any
    ) -> SteeringConfig:
        chosen = self.sandboxes if attached is None else list(attached)
        return SteeringConfig(
            sandbox_subnets=(SANDBOX_V4, SANDBOX_V6),
            sandbox_interfaces=(SANDBOX_INTERFACE_PATTERN,),
            attached=frozenset(a for sb in chosen for a in sb.addresses),
            gateway_addresses=frozenset({GATEWAY_V4, GATEWAY_V6}),
            private_links=tuple(links),
            **overrides,
        )

    def attach_with_cli(self, sandboxes: Iterable[Sandbox] | None = None) -> None:
        """What an operator runs for each interface its VMM made: `gateway sandbox attach --interface vifN.0
        --address A --address B` inside the gateway namespace (host routes + proxy ARP/NDP)."""
        for sb in self.sandboxes if sandboxes is None else sandboxes:
            argv = [sys.executable, "-m", "gateway.cli", "sandbox", "attach", "--interface", sb.gw_interface]
            for address in sb.addresses:
                argv += ["--address", str(address)]
            self.run("gw", argv, timeout=30)

    def plumb(self, config: SteeringConfig) -> None:
        """Everything the gateway host needs for `config`: sysctls, host routes, ip rules, the nft table."""
        netplumb.ensure_sysctls(netns=self.gw)
        netplumb.reconcile(
            config.attached,
            {a: name for a, name in self.interface_map.items() if a in config.attached},
            netns=self.gw,
            subnets=config.sandbox_subnets,
        )
        netplumb.ensure_routing_for(config.policy_routing, netns=self.gw)
        self.apply(config)

    def apply(self, config: SteeringConfig) -> None:
        netplumb.apply_ruleset(render_ruleset(config), netns=self.gw)
        self.config = config

    def with_config(self, **changes: Any) -> SteeringConfig:
        if self.config is None:
            raise TopologyError("plumb() first")
        return replace(self.config, **changes)


def wait_for_line(proc: subprocess.Popen[Any], expected: str, timeout: float) -> str:
    """Read `proc`'s stdout until a line contains `expected` (bounded by `timeout`)."""
    assert proc.stdout is not None
    result: list[str] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if expected in line:
                result.append(line)
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout) or not result:
        stderr = ""
        if proc.poll() is not None and proc.stderr is not None:
            stderr = proc.stderr.read()
        raise TopologyError(f"process did not print {expected!r} within {timeout}s: {stderr.strip()}")
    return result[0]


def delete_namespaces(names: Iterable[str]) -> None:
    """Kill what runs in each namespace (it was started by this topology's user), then delete it."""
    names = list(names)
    for name in names:
        proc = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True, timeout=5, check=False)
        for line in proc.stdout.split():
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.kill(int(line), signal.SIGKILL)
    for name in names:
        subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=DEFAULT_TIMEOUT, check=False)


def live_namespaces(prefix: str) -> list[str]:
    out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=5, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for topo in live:
        with contextlib.suppress(Exception):
            topo.close()


atexit.register(_cleanup_all)
