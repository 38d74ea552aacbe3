"""The namespace topology of the end-to-end tests and benchmarks: the product's (gateway/demo/topology.py, which
`gateway demo` uses too), with a unique random prefix per run, plus what only tests use: log lines, `Lan` (hosts
on one bridge, for tests across nodes) and `in_namespace` (a thread inside a namespace).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.demo.fakenet import ORIGIN_SERVER
from gateway.demo.topology import (
    GATEWAY_V4,
    GATEWAY_V6,
    INET_V4,
    IP,
    Topology,
    TopologyError,
    live_namespaces,
    wait_for_line,
)

__all__ = [
    "GATEWAY_V4",
    "GATEWAY_V6",
    "INET_V4",
    "IP",
    "ORIGIN_SERVER",
    "Lan",
    "Topology",
    "TopologyError",
    "in_namespace",
    "live_namespaces",
    "log_events",
    "wait_for_line",
]


def log_events(log_file: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of a `gateway run` log file whose `event` is `event` (other lines are skipped)."""
    found = []
    for line in log_file.read_text().splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("event") == event:
            found.append(data)
    return found


class Lan(Topology):
    """Namespaces `<prefix>-<name>` on one bridge in `<prefix>-hub` (10.98.0.1/24), member N at 10.98.0.(N+2):
    separate hosts on one network (two gateway nodes, their Redis, an app), for tests of what crosses hosts.
    Only Topology's lifecycle and process helpers apply (`run`, `popen`, `start_python`, `close`), not its
    gateway layout."""

    def __init__(self, members: Sequence[str], prefix: str | None = None) -> None:
        super().__init__(sandboxes=1, origins=1, prefix=prefix or f"gwn{secrets.token_hex(3)}")
        self.hub = f"{self.prefix}-hub"
        self.addresses = {name: ipaddress.ip_address(f"10.98.0.{n + 2}") for n, name in enumerate(members)}
        self.addresses["hub"] = ipaddress.ip_address("10.98.0.1")

    def __enter__(self) -> Lan:
        super().__enter__()
        return self

    def _build(self) -> None:
        self._add_namespace(self.hub)
        self._ip("link", "add", "br0", "type", "bridge", netns=self.hub)
        self._ip("addr", "add", f"{self.addresses['hub']}/24", "dev", "br0", netns=self.hub)
        self._ip("link", "set", "br0", "up", netns=self.hub)
        for n, (name, address) in enumerate(item for item in self.addresses.items() if item[0] != "hub"):
            netns = f"{self.prefix}-{name}"
            self._add_namespace(netns)
            port = f"port{n}"
            self._ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns, netns=self.hub)
            self._ip("link", "set", port, "master", "br0", "up", netns=self.hub)
            self._ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
            self._ip("link", "set", "eth0", "up", netns=netns)


def in_namespace(netns: str) -> ThreadPoolExecutor:
    """A thread inside `netns`: what it runs (an HTTP client, a socket) sees that namespace's network, while the
    test process stays in its own. setns(2) on a network namespace moves only the calling thread."""

    def enter() -> None:
        with open(f"/run/netns/{netns}") as handle:
            os.setns(handle.fileno(), os.CLONE_NEWNET)

    return ThreadPoolExecutor(max_workers=1, initializer=enter, thread_name_prefix=netns)
