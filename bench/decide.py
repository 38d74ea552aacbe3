#!/usr/bin/env python3
"""Throughput of `decide` on one core, for a policy of realistic size.

The policy: 50 allow_hosts (exact and `*.` wildcards), 50 CIDRs (allow and deny, IPv4 and
IPv6), a 500-name operator preset plus the built-in git-hosts and ai-apis presets. The
workload mixes what the egress engine and the DNS interceptor really ask: allowed exact
names, allowed wildcard names, preset names, denied names, CIDR hits without a name,
connections with no name at all, deny_cidrs hits and DNS questions. Addresses are strings,
as the engine has them from the socket; the same workload is also timed with pre-parsed
`ipaddress` objects.

Rates are computed from the CPU time of the pinned thread (`--clock cpu`, the default), so
that other processes sharing the core do not count against `decide`; the wall-clock rate is
printed beside it (on an idle core the two agree). `--clock wall` reports and checks the
wall-clock rate instead.

    .venv/bin/python bench/decide.py                 # defaults: 5 repeats of >= 0.2 s per case
    .venv/bin/python bench/decide.py --min-rate 0    # report only, never fail

Exits 1 if the mixed workload with string addresses decides fewer than --min-rate per second.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.decision import DEFAULT_LIMITS, CompiledPolicy, Verdict, compile_policy, decide
from gateway.policy import Sandbox, parse_sandbox
from gateway.presets import BUILTIN_PRESETS, Preset, make_preset
from gateway.rules import Rule

SUBNETS = (ipaddress.ip_network("10.75.0.0/16"), ipaddress.ip_network("fdd4:1476:6c7e::/48"))
Query = tuple[str | None, object, int | None, str]  # (hostname, address, port, protocol)


# --------------------------------------------------------------------------- the policy


def operator_preset(size: int = 500) -> Preset:
    """An operator's internal-services preset: mostly exact names, one in five a wildcard."""
    hosts = [f"*.svc{i}.corp.example" if i % 5 == 0 else f"api{i}.team{i % 37}.corp.example" for i in range(size)]
    return make_preset("internal-500", hosts, [443, 8443], "benchmark: 500 internal names")


def allow_hosts() -> list[str]:
    exact = [f"api{i}.partner{i % 7}.example.com" for i in range(30)]
    wildcard = [f"*.cdn{i}.example.net" for i in range(20)]
    return exact + wildcard


def cidrs() -> tuple[list[str], list[str]]:
    allow = [f"198.18.{i * 4}.0/22" for i in range(20)]  # 198.18.0.0-198.18.79.255 (benchmark space)
    allow += [f"203.0.113.{i * 16}/28" for i in range(10)]
    allow += [f"2001:db8:{i:x}::/48" for i in range(5)]
    deny = [f"10.{i}.0.0/16" for i in range(8)] + ["172.16.0.0/12", "192.168.0.0/16"]
    deny += [f"198.18.{i * 4}.0/24" for i in range(3)]  # carve-outs inside allowed ranges
    deny += ["2001:db8:0:ff00::/56", "fc00::/7"]
    return allow, deny


def build_policy(preset: Preset) -> tuple[Sandbox, dict[str, Preset]]:
    presets = {**BUILTIN_PRESETS, preset.name: preset}
    allow, deny = cidrs()
    assert len(allow) + len(deny) == 50, (len(allow), len(deny))
    sandbox = parse_sandbox(
        {
            "id": "bench",
            "addresses": ["10.75.0.2"],
            "profile": "allowlisted",
            "egress": {
                "allow_hosts": allow_hosts(),
                "presets": [preset.name, "git-hosts", "ai-apis"],
                "allow_cidrs": allow,
                "deny_cidrs": deny,
            },
        },
        subnets=SUBNETS,
        known_presets=presets,
        known_secrets=(),
    )
    return sandbox, presets


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Case:
    name: str
    weight: int  # share of the mixed workload, in percent
    make: Callable[[random.Random], Query]
    expect: Callable[[Verdict], bool]


def public_v4(rng: random.Random) -> str:
    return f"{rng.randint(100, 120)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def exact_host(rng: random.Random) -> Query:
    i = rng.randrange(30)
    return f"api{i}.partner{i % 7}.example.com", public_v4(rng), 443, "tls"


def wildcard_host(rng: random.Random) -> Query:
    return f"edge-{rng.randrange(1000)}.cdn{rng.randrange(20)}.example.net", public_v4(rng), 443, "tls"


def preset_host(rng: random.Random) -> Query:
    i = rng.randrange(500)
    name = f"x{i}.svc{i}.corp.example" if i % 5 == 0 else f"api{i}.team{i % 37}.corp.example"
    return name, public_v4(rng), rng.choice((443, 8443)), "tls"


def denied_name(rng: random.Random) -> Query:
    name = rng.choice(
        [
            f"tracker{rng.randrange(10_000)}.ads.example.org",
            f"a.b.cdn{rng.randrange(20)}.example.net",  # two levels under a wildcard: not matched
            f"cdn{rng.randrange(20)}.example.net",  # the wildcard's own parent: not matched
            f"API{rng.randrange(30, 99)}.Partner1.example.com.",
        ]
    )
    return name, public_v4(rng), 443, rng.choice(("tls", "http"))


def cidr_hit(rng: random.Random) -> Query:
    if rng.random() < 0.8:
        return None, f"198.18.{rng.randrange(12, 80)}.{rng.randrange(256)}", 443, "tcp"
    return None, f"2001:db8:{rng.randrange(5):x}::{rng.randrange(1, 0xFFFF):x}", 443, "tcp"


def no_hostname(rng: random.Random) -> Query:
    return None, public_v4(rng), rng.choice((22, 80, 443, 5432)), "tcp"


def deny_hit(rng: random.Random) -> Query:
    address = rng.choice(
        [
            f"10.{rng.randrange(8)}.{rng.randrange(256)}.{rng.randrange(256)}",
            f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            f"198.18.{rng.choice((0, 4, 8))}.{rng.randrange(256)}",  # carve-outs of an allowed range
            f"fd{rng.randrange(256):02x}::{rng.randrange(1, 0xFFFF):x}",
        ]
    )
    return exact_host(rng)[0], address, 443, "tls"


def dns_question(rng: random.Random) -> Query:
    name = rng.choice([exact_host(rng)[0], wildcard_host(rng)[0], preset_host(rng)[0], denied_name(rng)[0]])
    return name, None, None, "dns"


def _allowed_by(prefix: str) -> Callable[[Verdict], bool]:
    return lambda verdict: verdict.allowed and verdict.label.startswith(prefix)


CASES: Sequence[Case] = (
    Case("allowed exact", 20, exact_host, _allowed_by("allow_hosts ")),
    Case("allowed wildcard", 10, wildcard_host, _allowed_by("allow_hosts *.")),
    Case("allowed preset (500)", 15, preset_host, _allowed_by("preset internal-500")),
    Case("denied name", 15, denied_name, lambda v: not v.allowed and v.rule is Rule.DEFAULT_DENY),
    Case("cidr hit, no name", 10, cidr_hit, _allowed_by("allow_cidrs ")),
    Case("no hostname", 10, no_hostname, lambda v: not v.allowed and v.reason.startswith("no hostname")),
    Case("deny_cidrs hit", 10, deny_hit, lambda v: not v.allowed and v.label.startswith("deny_cidrs ")),
    Case("dns question", 10, dns_question, lambda v: v.rule is not Rule.ISOLATED),
)


def workload(case: Case, rng: random.Random, size: int) -> list[Query]:
    return [case.make(rng) for _ in range(size)]


def mixed(rng: random.Random, size: int) -> list[Query]:
    queries = [case.make(rng) for case in CASES for _ in range(case.weight * size // 100)]
    rng.shuffle(queries)
    return queries


def preparsed(queries: list[Query]) -> list[Query]:
    return [(h, ipaddress.ip_address(a) if isinstance(a, str) else a, p, proto) for h, a, p, proto in queries]


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    decisions: int = 0
    cpu_ns: int = 0
    wall_ns: int = 0

    def add(self, other: Timing) -> None:
        self.decisions += other.decisions
        self.cpu_ns += other.cpu_ns
        self.wall_ns += other.wall_ns

    def rate(self, clock: str) -> float:
        return self.decisions / max(1, self.cpu_ns if clock == "cpu" else self.wall_ns) * 1e9


def run_once(policy: CompiledPolicy, queries: list[Query], min_seconds: float) -> Timing:
    """Decide the whole list as often as it takes to fill min_seconds of wall-clock time."""
    timing = Timing()
    while timing.wall_ns < min_seconds * 1e9:
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        for hostname, address, port, protocol in queries:
            decide(policy, hostname, address, port, protocol)  # type: ignore[arg-type]
        timing.cpu_ns += time.thread_time_ns() - cpu
        timing.wall_ns += time.perf_counter_ns() - wall
        timing.decisions += len(queries)
    return timing


def measure(policy: CompiledPolicy, queries: list[Query], repeats: int, min_seconds: float) -> tuple[Timing, ...]:
    return tuple(run_once(policy, queries, min_seconds) for _ in range(repeats))


def median_rate(runs: Sequence[Timing], clock: str) -> float:
    return statistics.median(run.rate(clock) for run in runs)


def pin(cpu: int | None) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if cpu is None else cpu
    if chosen not in allowed:
        sys.exit(f"cpu {chosen} is not available (allowed: {allowed})")
    os.sched_setaffinity(0, {chosen})
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--min-rate", type=float, default=200_000, help="fail below this many mixed decisions/s")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last one allowed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="minimum duration of one timed run")
    parser.add_argument("--queries", type=int, default=10_000, help="distinct queries per workload")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="rates by thread CPU time or wall")
    args = parser.parse_args(argv)
    clock, other = args.clock, ("wall" if args.clock == "cpu" else "cpu")

    cpu = pin(args.cpu)
    rng = random.Random(args.seed)

    preset = operator_preset()
    sandbox, presets = build_policy(preset)
    compile_runs = 200
    now = time.thread_time_ns if clock == "cpu" else time.perf_counter_ns
    start = now()
    for _ in range(compile_runs):
        policy = compile_policy(sandbox, None, presets, DEFAULT_LIMITS)
    compile_us = (now() - start) / compile_runs / 1000

    workloads: list[tuple[str, list[Query]]] = []
    for case in CASES:
        queries = workload(case, rng, args.queries)
        bad = [q for q in queries if not case.expect(decide(policy, *q))]  # type: ignore[arg-type]
        if bad:
            verdict = decide(policy, *bad[0])  # type: ignore[arg-type]
            print(f"workload {case.name!r} does not decide as intended, e.g. {bad[0]} -> {verdict}")
            return 2
        workloads.append((case.name, queries))
    mix = mixed(rng, args.queries)
    workloads.append(("MIXED (string addresses)", mix))
    workloads.append(("MIXED (ipaddress objects)", preparsed(mix)))

    print(f"python {sys.version.split()[0]}, pinned to CPU {cpu}, rates by {clock} time")
    print(f"median of {args.repeats} runs of >= {args.min_seconds} s over {args.queries:,} distinct queries per case")
    print(
        f"policy: {len(sandbox.egress.allow_hosts or ())} allow_hosts, "
        f"{len(sandbox.egress.allow_cidrs or ()) + len(sandbox.egress.deny_cidrs or ())} CIDRs, "
        f"presets {', '.join(sandbox.egress.presets or ())} ({len(preset.hosts)} names in {preset.name})"
    )
    print(f"compile_policy: {compile_us:,.1f} us per policy (mean of {compile_runs})\n")
    header = f"{'case':<28} {'decisions/s':>12} {'ns/decision':>12} {other + ' decisions/s':>18}"
    print(header)
    print("-" * len(header))
    gc.collect()
    total = Timing()
    mixed_rate = 0.0
    for name, queries in workloads:
        runs = measure(policy, queries, args.repeats, args.min_seconds)
        for run in runs:
            total.add(run)
        rate = median_rate(runs, clock)
        if name == "MIXED (string addresses)":
            mixed_rate = rate
        print(f"{name:<28} {rate:>12,.0f} {1e9 / rate:>12,.0f} {median_rate(runs, other):>18,.0f}")
    print("-" * len(header))
    rate = total.rate(clock)
    print(f"{'total (all cases)':<28} {rate:>12,.0f} {1e9 / rate:>12,.0f} {total.rate(other):>18,.0f}")
    print(f"(the benchmark thread had the CPU for {total.cpu_ns / total.wall_ns:.0%} of the wall-clock time)")

    if mixed_rate < args.min_rate:
        print(f"\nFAIL: mixed string-address rate {mixed_rate:,.0f}/s is below --min-rate {args.min_rate:,.0f}/s")
        return 1
    print(f"\nOK: mixed string-address rate {mixed_rate:,.0f}/s >= --min-rate {args.min_rate:,.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
