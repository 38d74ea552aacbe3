"""DNS exfiltration under an allowed wildcard, end to end: the real `gateway run --data-plane --steer` with a config
file setting `[dns] name_budget` / `nxdomain_budget` (environment), dig in the sandboxes, and an upstream of the
test's own that counts every question it is asked.

sb1 allows `*.exfil.test` (a zone that answers every name, as an attacker's zone does) and `allowed.test`: a burst
of made-up names is answered until the distinct-name budget, then REFUSED with the EDE text; the upstream saw no
more names than the budget; names asked before and the exact entry keep resolving; a long random label is
NXDOMAIN and never leaves. sb2 allows `*.nx.test` (a zone where nothing exists): after the NXDOMAIN budget new
names are REFUSED. The query log (CLI over the API), the flow records and the metrics name the rule and code.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.factory import DENIAL_SUFFIX, EgressEnv, delta, scrape, wait_until
from tests.netns import INET_V4, Topology, live_namespaces

NAME_BUDGET, NXDOMAIN_BUDGET = 10, 4
RESOLVER = "@198.18.1.2"  # any address: DNS to port 53 is intercepted

#: The upstream: every name under exfil.test has an address, nothing else exists; each question is printed.
COUNTING_ZONE = r"""
import sys, threading
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
class Zone(BaseResolver):
    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        print("asked", name, QTYPE[request.q.qtype], flush=True)
        if name == "allowed.test" or name.endswith(".exfil.test"):
            if request.q.qtype == QTYPE.A:
                reply.add_answer(RR(name, QTYPE.A, rdata=A("198.18.1.9"), ttl=30))
        else:
            reply.header.rcode = 3
        return reply
quiet = DNSLogger(log="-recv,-send,-request,-reply,-truncated,-error,-data")
for tcp in (False, True):
    DNSServer(Zone(), address=sys.argv[1], port=53, tcp=tcp, logger=quiet).start_thread()
print("ready", flush=True)
threading.Event().wait()
"""


class Upstream:
    """The names the counting zone was asked, as it printed them."""

    def __init__(self, lines: Any) -> None:
        self.asked: Counter[str] = Counter()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()

    def _read(self, lines: Any) -> None:
        for line in lines:
            if line.startswith("asked "):
                self.asked[line.split()[1]] += 1

    def names_under(self, suffix: str) -> set[str]:
        return {name for name in list(self.asked) if name.endswith(suffix)}


def policies() -> dict[str, Any]:
    def sandbox(index: int, hosts: list[str]) -> dict[str, Any]:
        return {
            "id": f"sb{index}",
            "addresses": [f"10.75.0.{index}", f"fdd4:1476:6c7e::{index}"],
            "profile": "allowlisted",
            "egress": {"allow_hosts": hosts},
        }

    return {
        "templates": {},
        "sandboxes": {"sb1": sandbox(1, ["*.exfil.test", "allowed.test"]), "sb2": sandbox(2, ["*.nx.test"])},
    }


class World:
    def __init__(self, env: EgressEnv, upstream: Upstream) -> None:
        self.env, self.upstream = env, upstream


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Topology(sandboxes=2, origins=1) as topo:
        env = EgressEnv(topo, tmp_path_factory.mktemp("dnsbudget"))
        env.environment["GATEWAY_DNS__NAME_BUDGET"] = str(NAME_BUDGET)
        env.environment["GATEWAY_DNS__NXDOMAIN_BUDGET"] = str(NXDOMAIN_BUDGET)
        topo.attach_with_cli()
        zone = topo.start_python("inet", COUNTING_ZONE, str(INET_V4))
        upstream = Upstream(zone.stdout)
        env.write_policies(policies())
        env.start_gateway()
        assert wait_until(lambda: "198.18.1.9" in env.dig("sb1", RESOLVER, "allowed.test", "A", "+short"), 10)
        yield World(env, upstream)
    assert live_namespaces(topo.prefix) == []


def answers(output: str) -> dict[str, tuple[str, str | None]]:
    """dig's output for several names: name -> (status, EDE text (without a denial's id) or None)."""
    found = {}
    for chunk in output.split("->>HEADER<<-")[1:]:
        status = re.search(r"status: (\w+)", chunk)
        question = re.search(r"QUESTION SECTION:\n;(\S+?)\.\s", chunk)
        ede = re.search(r"EDE: \d+ \(\w+\): \((.*)\)", chunk)
        assert status and question, chunk
        text = DENIAL_SUFFIX.sub("", ede.group(1)) if ede else None
        found[question.group(1).lower()] = (status.group(1), text)
    return found


def made_up(count: int, zone: str) -> list[str]:
    """Names as a DNS tunnel makes them: a fresh label each (16 characters: under the shape limits)."""
    return [f"{secrets.token_hex(8)}.{zone}" for _ in range(count)]


@pytest.mark.root
def test_a_burst_of_made_up_names_under_a_wildcard_is_refused_after_the_budget(world: World) -> None:
    env, upstream = world.env, world.upstream
    _, before = scrape(env)
    known = "www.exfil.test"
    assert env.dig("sb1", RESOLVER, known, "A", "+short").split() == ["198.18.1.9"]
    burst = made_up(3 * NAME_BUDGET, "exfil.test")
    got = answers(env.dig("sb1", RESOLVER, "+tries=1", *burst))
    assert set(got) == set(burst)
    statuses = [got[name][0] for name in burst]
    # www and the first NAME_BUDGET - 1 of the burst resolve; every later new name is refused with the reason.
    assert statuses == ["NOERROR"] * (NAME_BUDGET - 1) + ["REFUSED"] * (2 * NAME_BUDGET + 1), statuses
    reason = f"DNS_NAME_BUDGET: sandbox queried more than {NAME_BUDGET} distinct names in 60 s"
    assert {got[name][1] for name in burst[NAME_BUDGET - 1 :]} == {reason}
    # The upstream saw at most the budget of such names.
    assert wait_until(lambda: len(upstream.names_under(".exfil.test")) == NAME_BUDGET, 5)
    assert upstream.names_under(".exfil.test") == {known, *burst[: NAME_BUDGET - 1]}

    # The sandbox's own traffic goes on: a name it asked before (also another type, which goes upstream) and its
    # exact entry.
    assert env.dig("sb1", RESOLVER, known, "A", "+short").split() == ["198.18.1.9"]
    assert "status: NOERROR" in env.dig("sb1", RESOLVER, burst[0], "AAAA")
    assert env.dig("sb1", RESOLVER, "allowed.test", "A", "+short").split() == ["198.18.1.9"]

    # The records name the rule: the query log through the CLI and the API, the flow records, the metrics.
    logged = {e["name"]: e for e in env.dns_log("sb1")}
    refused = logged[burst[-1]]
    assert (refused["code"], refused["rule"], refused["rcode"], refused["allowed"], refused["reason"]) == (
        "REFUSED_NAME_BUDGET",
        "builtin:dns_budget",
        "REFUSED",
        False,
        reason,
    )
    assert logged[burst[0]]["code"] == "FORWARDED"
    flows = env.logged_flows("sb1", burst[-1], "dns")
    assert flows and {(f["verdict"], f["rule"], f["reason"]) for f in flows} == {("deny", "builtin:dns_budget", reason)}
    _, after = scrape(env)
    labels = {"code": "REFUSED_NAME_BUDGET", "rcode": "REFUSED", "verdict": "deny"}
    assert delta(before, after, "gateway_dns_queries_total", **labels) == 2 * NAME_BUDGET + 1


@pytest.mark.root
def test_long_and_random_labels_under_a_wildcard_never_leave(world: World) -> None:
    env, upstream = world.env, world.upstream
    long_label = "a" * 41
    random_label = "4f7a1c9e2b8d0a6f3e5c7b9a1d2e4f6a"  # 32 hex characters: 31 letter/digit alternations
    got = answers(env.dig("sb2", RESOLVER, f"{long_label}.nx.test", f"{random_label}.nx.test"))
    assert got[f"{long_label}.nx.test"] == (
        "NXDOMAIN",
        "DNS_LABEL_LENGTH: label of 41 characters under a wildcard entry, over dns.max_label_length 40",
    )
    assert got[f"{random_label}.nx.test"] == (
        "NXDOMAIN",
        "DNS_LABEL_RANDOM: label under a wildcard entry looks random (31 letter/digit alternations in 32 characters, "
        "over dns.max_label_alternations 8)",
    )
    assert f"{long_label}.nx.test" not in upstream.asked and f"{random_label}.nx.test" not in upstream.asked
    logged = {e["name"]: e for e in env.dns_log("sb2")}
    assert {logged[f"{label}.nx.test"]["rule"] for label in (long_label, random_label)} == {"builtin:dns_label"}
    assert logged[f"{long_label}.nx.test"]["code"] == "BLOCKED_LABEL_LENGTH"
    assert logged[f"{random_label}.nx.test"]["code"] == "BLOCKED_LABEL_RANDOM"


@pytest.mark.root
def test_after_the_nxdomain_budget_new_names_are_refused(world: World) -> None:
    env, upstream = world.env, world.upstream
    burst = made_up(3 * NXDOMAIN_BUDGET, "nx.test")
    got = answers(env.dig("sb2", RESOLVER, *burst))
    statuses = [got[name][0] for name in burst]
    assert statuses == ["NXDOMAIN"] * NXDOMAIN_BUDGET + ["REFUSED"] * (2 * NXDOMAIN_BUDGET), statuses
    reason = f"DNS_NXDOMAIN_BUDGET: sandbox got more than {NXDOMAIN_BUDGET} NXDOMAIN answers in 60 s"
    assert {got[name][1] for name in burst[NXDOMAIN_BUDGET:]} == {reason}
    assert wait_until(lambda: set(burst) & set(upstream.asked) == set(burst[:NXDOMAIN_BUDGET]), 5)
    # sb1 is not affected by sb2's budget.
    assert env.dig("sb1", RESOLVER, "allowed.test", "A", "+short").split() == ["198.18.1.9"]
