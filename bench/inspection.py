#!/usr/bin/env python3
"""The inspection tier side by side with mitmdump alone and with the fast path (issue 12, performance).

One run builds one throw-away topology with bench/egress.py's pieces (tests/netns.py: `<prefix>-sb1`,
`<prefix>-gw`, `<prefix>-inet`; egress.py's nginx HTTPS origin `cps.test` on 198.18.1.1:443 answering
`200 ok`, its authoritative DNS) and measures every subject with the same HTTPS client in the sandbox
namespace against that origin:

* `mitmdump`: mitmdump alone as a plain reverse proxy, `--mode reverse:https://198.18.1.1:443` on 198.18.0.2:8443 in
  the gateway namespace, with the tier's own options minus its addon; dialled directly by the client, which trusts
  mitmdump's CA (made as the tier's: EC P-256, where mitmdump's default is RSA). `keep_host_header` keeps the
  client's SNI and Host (cps.test) upstream, as the tier does, so the upstream certificate is checked against the
  same name.
* `fast-path`: `gateway run --data-plane --steer`, cps.test a plain allow_hosts entry, no inspect entry:
  the tier is not running. The client dials the origin's address and is steered transparently.
* `fast-path-tier-on`: the same, but the policy also marks another name (`other.test`) with an inspect
  entry, so the tier runs idle beside the fast path.
* `tier`: cps.test marked by an inspect entry (GET only, one credential injected as Authorization), the
  client steered transparently and trusting the CA `gateway certs ca` prints.

Proxy CPU = utime+stime from /proc of the subject's process and its descendants (the gateway and its tier process,
mitmproxy with the gateway's addon; for the fast paths too, so an idle tier's own CPU counts against tier-on),
before and after each round. Each phase runs `--rounds` times on the same process; with `--cycles N` the subjects
are measured in order N times (the gateway's nft table flushed after each gateway subject) and every subject's
rounds are pooled, so that a slower or faster spell of the machine falls on every subject. The table shows medians
and the rounds' spread. A round lasts `--round-seconds` (so a fast subject makes more requests, and every subject
enough CPU ticks). Phases: keep-alive (`--threads` connections, each sending small GETs one after the other) and,
unless `--no-new-conns`, one new TLS connection per request (`--threads` clients).

    sudo .venv/bin/python bench/inspection.py            # defaults: about 4-5 minutes on 2 cores
    sudo .venv/bin/python bench/inspection.py --quick    # small counts, about a minute: checks the harness works

Targets: tier CPU per request <= 1.2 x mitmdump's; fast-path-tier-on within noise of fast-path (requests/s and
CPU per request). Exit status 0 when every target passes, 1 when one fails, 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egress import (
    NAMES,
    PROXY_ADDRESS,
    REPO,
    Bench,
    Options,
    ensure_packages,
    gateway_policies,
    print_table,
    run_subjects,
    unwind_on_signals,
)
from procstat import cpu_seconds, descendants, fmt

from gateway.tier.ca import ensure_ca
from tests.netns import Topology, TopologyError

SUBJECTS = ("mitmdump", "fast-path", "fast-path-tier-on", "tier")  # also the run order: mitmdump is dialled
# directly at the gateway namespace's own address, which a gateway's nft table (left behind) would drop.
ORIGIN = "cps.test"
IDLE_MARKED = "other.test"  # what fast-path-tier-on marks: a name the client never asks for
MITMDUMP_PORT = 8443
TIER_PORT = 15080  # gateway.tier.config's default listen_port
SECRET = "bench-secret-value"
UNBOUNDED = 10**9  # requests per round: a round is bounded by time
CPU_TARGET = 1.20  # tier CPU per request <= 1.2 x mitmdump alone
#: The least a tier-on/fast-path difference must exceed to count as more than noise: /proc's CPU times come
#: in 10 ms ticks and the machine is shared, so a spread of a few rounds understates the noise.
NOISE_FLOOR = 0.05

#: HTTPS client (sandbox). argv: host port sni cafile count threads seconds keepalive|new. Each thread keeps
#: one connection open (keep-alive) or opens one per request (new); prints counts and the elapsed time.
HTTP_CLIENT = r"""
import http.client, json, resource, socket, ssl, sys, threading, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, sni, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
count, threads, seconds, fresh = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]), sys.argv[8] == "new"
ctx = ssl.create_default_context(cafile=cafile)
lock = threading.Lock()
issued, done, opened, errors = [0], [0], [0], []
deadline = time.monotonic() + seconds

def connect():
    conn = http.client.HTTPConnection(sni, port, timeout=10)
    conn.auto_open = 0  # never a plaintext reconnect: a closed connection is opened again below, over TLS
    conn.sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=sni)
    return conn

def take():
    with lock:
        if issued[0] >= count or time.monotonic() >= deadline:
            return False
        issued[0] += 1
        return True

def worker():
    conn, ok, conns = None, 0, 0
    while take():
        try:
            if conn is None:
                conn, conns = connect(), conns + 1
            conn.request("GET", "/", headers={"Connection": "close"} if fresh else {})
            answer = conn.getresponse()
            body = answer.read()
            if answer.status != 200:
                raise OSError(f"status {answer.status}: {body[:80]!r}")
            ok += 1
            if fresh or answer.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()
    with lock:
        done[0] += ok
        opened[0] += conns

start = time.perf_counter()
pool = [threading.Thread(target=worker) for _ in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join(seconds + 30)
print(json.dumps({"ok": done[0], "connections": opened[0], "errors": len(errors), "first_errors": errors[:3],
                  "elapsed": time.perf_counter() - start}))
"""


@dataclass
class Phase:
    """One kind of traffic on one subject, several rounds."""

    rps: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # proxy CPU ms per request, per round
    child_cpu_ms: list[float] = field(default_factory=list)  # of which the processes below the subject's own
    errors: int = 0
    connections: int = 0
    requests: int = 0

    @staticmethod
    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    @staticmethod
    def spread(values: list[float]) -> float | None:
        """(max - min) / median of the rounds: how far apart one process's own rounds land."""
        return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else None


@dataclass
class Result:
    subject: str
    phases: dict[str, Phase] = field(default_factory=dict)  # "keep-alive" / "new-conn"
    processes: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    threads: int
    new_conns: bool  # also the new-connection phase
    rounds: int
    round_seconds: float


def inspect_entry(host: str, **rules: Any) -> dict[str, Any]:
    return {"hosts": [host], "deny_reason": "benchmark entry", **rules}


def policies(subject: str) -> dict[str, Any]:
    """egress.py's gateway policy (cps.test among plain allow_hosts), marked as `subject` needs."""
    data = gateway_policies()
    egress = data["sandboxes"]["sb1"]["egress"]
    if subject == "fast-path-tier-on":
        egress["inspect"] = [inspect_entry(IDLE_MARKED)]
    elif subject == "tier":
        egress["allow_hosts"] = [name for name in egress["allow_hosts"] if name != ORIGIN]
        credential = {"header": "authorization", "secret": "api", "template": "Bearer {secret}"}
        egress["inspect"] = [inspect_entry(ORIGIN, methods=["GET"], credentials=[credential])]
    return data


class InspectBench(Bench):
    def __init__(self, topo: Topology, workdir: Path, opts: Options, plan: Plan) -> None:
        super().__init__(topo, workdir, opts)
        self.plan = plan
        self.results: dict[str, Result] = {}
        self.tier_env = {
            "GATEWAY_INSPECTION__CA_DIR": str(workdir / "inspection"),
            "GATEWAY_INSPECTION__UPSTREAM_CA_FILE": str(self.cert),  # the origin's self-signed certificate
            "GATEWAY_INSPECTION__SECRETS": '{ api = { env = "BENCH_INSPECTION_SECRET" } }',
            "BENCH_INSPECTION_SECRET": SECRET,
        }

    def start_inspect_subject(self, subject: str) -> tuple[subprocess.Popen[Any], tuple[str, int], Path]:
        """Start `subject`; returns its process, where the client dials, and the CA the client trusts."""
        if subject == "mitmdump":
            confdir = self.workdir / "mitmdump-alone"
            confdir.mkdir(mode=0o700, exist_ok=True)
            # The tier's kind of CA (EC P-256): a new connection's handshake signature then costs both the same.
            ensure_ca(confdir, ())
            argv = [str(Path(sys.executable).parent / "mitmdump"), "--mode",
                    f"reverse:https://{NAMES[ORIGIN]}:443@{PROXY_ADDRESS}:{MITMDUMP_PORT}"]  # fmt: skip
            options = {
                "confdir": str(confdir),
                "ssl_verify_upstream_trusted_ca": str(self.cert),
                "keep_host_header": "true",
                # mitmdump's own addons kept quiet (the tier's process has neither), then the tier's options.
                "flow_detail": "0",
                "onboarding": "false",
                "termlog_verbosity": "warn",
                "connection_strategy": "lazy",
            }
            for name, value in options.items():
                argv += ["--set", f"{name}={value}"]
            proc = self.start_and_wait("gw", argv, PROXY_ADDRESS, MITMDUMP_PORT)
            return proc, (PROXY_ADDRESS, MITMDUMP_PORT), confdir / "mitmproxy-ca-cert.pem"
        environment = self.tier_env if subject != "fast-path" else None
        proc = self.start_gateway("gateway", policies(subject), environment)
        if subject == "fast-path":
            return proc, (NAMES[ORIGIN], 443), self.cert
        self.wait_listening(proc, "gw", "127.0.0.1", TIER_PORT, self.workdir / "gateway.log", 60)
        if subject == "fast-path-tier-on":
            return proc, (NAMES[ORIGIN], 443), self.cert
        printed = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "certs", "ca", "--config", str(self.workdir / "gateway.toml")],
            capture_output=True,
            text=True,
            env={**os.environ, **self.tier_env, "PYTHONPATH": str(REPO)},
            cwd=str(REPO),
            timeout=30,
            check=True,
        )
        ca = self.workdir / "inspection-ca.pem"
        ca.write_text(printed.stdout)
        return proc, (NAMES[ORIGIN], 443), ca

    def http(
        self, dial: tuple[str, int], ca: Path, count: int, threads: int, mode: str, seconds: float
    ) -> dict[str, Any]:
        argv = [sys.executable, "-c", HTTP_CLIENT, dial[0], str(dial[1]), ORIGIN, str(ca)]
        argv += [str(count), str(threads), str(seconds), mode]
        return json.loads(self.topo.run("sb1", argv, timeout=seconds + 60).stdout)

    def measure_inspect(self, subject: str) -> Result:
        """`subject`'s rounds, added to those of its earlier cycles (`--cycles`)."""
        result = self.results.setdefault(subject, Result(subject))
        proc, dial, ca = self.start_inspect_subject(subject)
        plan = self.plan
        try:
            # Warm-up, and a check that the path works at all (the tier's certificates, the resolver's cache).
            deadline = time.monotonic() + 30
            while (warm := self.http(dial, ca, 40, 2, "keepalive", 20))["ok"] < 40:
                if time.monotonic() > deadline:
                    raise TopologyError(f"{subject}: requests fail: {warm['first_errors']}")
                time.sleep(0.5)
            result.processes = len(descendants(proc.pid))
            phases = [("keep-alive", "keepalive"), *([("new-conn", "new")] if plan.new_conns else [])]
            for label, mode in phases:
                phase = result.phases.setdefault(label, Phase())
                for _ in range(plan.rounds):
                    tree = descendants(proc.pid)
                    cpu0, child0 = cpu_seconds(tree), cpu_seconds(tree[1:])
                    run = self.http(dial, ca, UNBOUNDED, plan.threads, mode, plan.round_seconds)
                    tree = descendants(proc.pid)
                    cpu1, child1 = cpu_seconds(tree), cpu_seconds(tree[1:])
                    phase.errors += run["errors"]
                    phase.connections += run["connections"]
                    phase.requests += run["ok"]
                    if run["ok"]:
                        phase.rps.append(run["ok"] / run["elapsed"])
                        phase.cpu_ms.append((cpu1[0] - cpu0[0]) * 1000 / run["ok"])
                        phase.child_cpu_ms.append((child1[0] - child0[0]) * 1000 / run["ok"])
                        print(
                            f"  {label}: {phase.rps[-1]:.0f} req/s, {phase.cpu_ms[-1]:.4f} ms CPU / request", flush=True
                        )
                    if run["errors"]:
                        result.notes.append(f"{label}: {run['errors']} errors, e.g. {run['first_errors'][:1]}")
        finally:
            self.topo.kill(proc)
            self.topo.processes.remove(proc)
            if subject != "mitmdump":  # its table would drop the next cycle's direct traffic to mitmdump
                self.topo.run("gw", ["nft", "flush", "ruleset"], timeout=30)
        return result


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(results: dict[str, Result]) -> bool:
    order = [s for s in SUBJECTS if s in results]
    labels = [label for label in ("keep-alive", "new-conn") if any(label in r.phases for r in results.values())]
    rows: list[tuple[str, Callable[[Result], str]]] = []
    for label in labels:

        def pick(r: Result, what: str, label: str = label) -> list[float]:
            phase = r.phases.get(label)
            return getattr(phase, what) if phase else []

        rows += [
            (f"{label} requests/s", lambda r, pick=pick: fmt(Phase.median(pick(r, "rps")), ".0f")),
            ("  spread of rounds %", lambda r, pick=pick: fmt(_pct(Phase.spread(pick(r, "rps"))), ".1f")),
            (f"{label} proxy CPU ms / request", lambda r, pick=pick: fmt(Phase.median(pick(r, "cpu_ms")), ".4f")),
            ("  spread of rounds %", lambda r, pick=pick: fmt(_pct(Phase.spread(pick(r, "cpu_ms"))), ".1f")),
            (
                "  of which tier process ms",
                lambda r, pick=pick: fmt(Phase.median(pick(r, "child_cpu_ms")) if r.processes > 1 else None, ".4f"),
            ),
            (
                f"{label} client connections",
                lambda r, label=label: str(r.phases[label].connections) if label in r.phases else "-",
            ),
        ]
    rows.append(("proxy processes", lambda r: str(r.processes)))
    print_table(rows, {s: results[s] for s in order})

    ok = True

    def check(text: str, passed: bool | None) -> None:
        nonlocal ok
        if passed is None:
            print(f"  SKIP  {text}: not measured")
            return
        ok &= passed
        print(f"  {'PASS' if passed else 'FAIL'}  {text}")

    def median_of(subject: str, label: str, what: str) -> float | None:
        r = results.get(subject)
        return Phase.median(getattr(r.phases[label], what)) if r and label in r.phases else None

    print("\ntargets (issue 12, performance):")
    for label in labels:
        tier, alone = median_of("tier", label, "cpu_ms"), median_of("mitmdump", label, "cpu_ms")
        share = ratio(tier, alone)
        check(
            f"{label}: tier CPU per request {fmt(tier, '.4f')} ms = {fmt(share, '.2f')} x mitmdump alone "
            f"({fmt(alone, '.4f')} ms) <= {CPU_TARGET:.2f} x",
            None if share is None else share <= CPU_TARGET,
        )
    for label in labels:
        base, idle = results.get("fast-path"), results.get("fast-path-tier-on")
        for what, name in (("rps", "requests/s"), ("cpu_ms", "CPU per request")):
            a, b = median_of("fast-path-tier-on", label, what), median_of("fast-path", label, what)
            share = ratio(a, b)
            spreads = [Phase.spread(getattr(r.phases[label], what)) for r in (base, idle) if r and label in r.phases]
            noise = max([NOISE_FLOOR, *(s for s in spreads if s is not None)])
            check(
                f"{label}: fast-path-tier-on/fast-path {name} {fmt(share, '.3f')} within noise (+-{noise:.1%}: "
                f"the larger of the two subjects' spread of rounds and a {NOISE_FLOOR:.0%} floor)",
                None if share is None else abs(share - 1) <= noise,
            )
    return ok


def _pct(value: float | None) -> float | None:
    return None if value is None else value * 100


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts (< 90 s): checks the harness works")
    parser.add_argument("--subjects", default=",".join(SUBJECTS), help=f"comma-separated subset of {SUBJECTS}")
    parser.add_argument("--threads", type=int, default=8, help="client threads = keep-alive connections (8)")
    parser.add_argument("--no-new-conns", action="store_true", help="keep-alive phase only")
    parser.add_argument("--rounds", type=int, help="rounds per phase (default 5, quick 3)")
    parser.add_argument("--round-seconds", type=float, help="length of a round (default 6, quick 2)")
    parser.add_argument(
        "--cycles", type=int, default=1, help="measure the subjects in order this many times, rounds pooled (1)"
    )
    parser.add_argument("--no-install", action="store_true", help="print the apt command and exit 2 when missing")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (path printed)")
    args = parser.parse_args(argv)

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = set(subjects) - set(SUBJECTS)
    if unknown or not subjects:
        parser.error(f"unknown subjects {sorted(unknown)}; choose from {SUBJECTS}")
    quick = args.quick
    plan = Plan(
        threads=max(1, min(args.threads, 64)),
        new_conns=not args.no_new_conns,
        rounds=max(1, args.rounds or (3 if quick else 5)),
        round_seconds=args.round_seconds or (2.0 if quick else 6.0),
    )
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    ensure_packages((), install=not args.no_install)  # the origin is egress.py's nginx

    unwind_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="bench-inspect-"))
    started, load_before = time.monotonic(), os.getloadavg()[0]
    topo = Topology(sandboxes=1, origins=3)
    # egress.py's Bench: only its origins and plumbing are used here (no bulk bytes, no idle connections).
    opts = Options(cps_count=0, cps_threads=0, latency_count=0, bulk_bytes=0, idle=0, phase_seconds=plan.round_seconds)
    bench = InspectBench(topo, workdir, opts, plan)
    cycles = max(1, min(args.cycles, 10))
    chosen = [subject for subject in SUBJECTS if subject in subjects] * cycles
    results = run_subjects(topo, workdir, bench.setup, bench.measure_inspect, chosen, keep_workdir=args.keep_workdir)

    phases = f"keep-alive: {plan.threads} connections"
    if plan.new_conns:
        phases += f"; new-conn: a new TLS connection per request, {plan.threads} clients"
    print(
        f"\n{phases}; {plan.rounds} rounds of {plan.round_seconds:g} s per phase and subject, "
        f"{cycles} cycle(s) of the subjects in order, medians of all rounds shown; "
        f"{os.cpu_count()} CPUs; 1-min load {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"total {time.monotonic() - started:.0f} s"
    )
    print(
        "mitmdump is dialled directly at 198.18.0.2:8443; the gateway subjects at the origin's address (steered). "
        "Proxy CPU = utime+stime of the subject's process tree (gateway + its tier process for the gateway subjects)."
    )
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
