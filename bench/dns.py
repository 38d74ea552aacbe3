#!/usr/bin/env python3
"""Queries per second and CPU per query of the DNS interceptor, beside dnsmasq doing the same job.

Everything runs on loopback: a small authoritative server (dnslib, in this process) for `one.test`;
the interceptor (plain mode, its own process pinned to one core) with a sandbox at 127.0.0.2 whose
allowlist is `one.test`; dnsmasq (pinned to the same core, when installed) configured as the same
allowlist: `one.test` forwarded to the authoritative server and cached, every other name NXDOMAIN
(`address=/#/`). A bounded Python load client (its own process, the other core when there is one)
keeps `--window` queries in flight for `--seconds` per case and counts answers.

Cases: a denied name (answered from policy), a cached allowed name (one upstream query, then the
cache); in both the client repeats one packet but for its id, as a stub resolver does. A third case,
reported but not a target, is the cached name asked with a fresh EDNS cookie in every packet (as each
`dig` run sends): no two packets are alike, so the interceptor cannot answer from its ready responses
and takes the slow way (parse, decide, cache lookup, render) every time. CPU per query is the server
process's user+system CPU time over the answered queries.

    .venv/bin/python bench/dns.py                  # 3 s per case
    .venv/bin/python bench/dns.py --min-rate 0     # report only, never fail

Exits 1 if the interceptor answers fewer than --min-rate queries/s in a target case, or, when dnsmasq
ran, less than a third of dnsmasq's rate or less than a third of its queries per CPU-second. Both: one
Python client may not be able to keep dnsmasq busy (its `busy` column under 1), which flatters the rate
comparison but not the per-CPU one. When a server is not busy its rate is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import multiprocessing as mp
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dnslib import EDNS0, QTYPE, RR, A, DNSRecord, EDNSOption  # noqa: E402
from dnslib.server import BaseResolver, DNSLogger, DNSServer  # noqa: E402

SANDBOX = "127.0.0.2"
#: case -> (name, a fresh EDNS cookie in every packet)
CASES = {"denied": ("denied.example", False), "cached": ("one.test", False), "cookie": ("one.test", True)}
TARGET_CASES = ("denied", "cached")
COOKIE_OPTION = 10  # RFC 7873; an 8-byte client cookie


class _Zone(BaseResolver):
    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        if str(request.q.qname).rstrip(".").lower() == "one.test" and request.q.qtype == QTYPE.A:
            reply.add_answer(RR("one.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=3600))
        else:
            reply.header.rcode = 3
        return reply


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_interceptor(port: int, upstream: int, core: int, ready: mp.Event) -> None:  # type: ignore[type-arg]
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    os.sched_setaffinity(0, {core})
    from gateway.decision import DEFAULT_LIMITS
    from gateway.dns.config import DnsConfig
    from gateway.dns.server import DnsInterceptor
    from gateway.presets import BUILTIN_PRESETS
    from gateway.resolver import Upstream
    from gateway.state import PolicyContext, PolicyState

    async def main() -> None:
        state = PolicyState(PolicyContext((ipaddress.ip_network("127.0.0.0/8"),), BUILTIN_PRESETS, DEFAULT_LIMITS))
        sandbox = state.parse_sandbox(
            {
                "id": "bench",
                "addresses": [SANDBOX],
                "profile": "allowlisted",
                "egress": {"allow_hosts": ["one.test"]},
                "limits": {"dns_queries_per_minute": 1_000_000},
            }
        )
        state.set_sandbox(sandbox)
        dns = DnsInterceptor(DnsConfig(), lambda: state, upstreams=(Upstream("127.0.0.1", upstream),))
        await dns.start_plain("127.0.0.1", port)
        ready.set()
        await asyncio.Event().wait()

    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def _load(
    port: int,
    name: str,
    cookie: bool,
    seconds: float,
    window: int,
    core: int | None,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    query = DNSRecord.question(name, "A")
    if cookie:
        query.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(COOKIE_OPTION, bytes(8))]))  # the last 8 bytes
    base = bytearray(query.pack())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((SANDBOX, 0))
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    answered = sent = rcodes_ok = 0
    outstanding = 0
    expected = 3 if name != "one.test" else 0
    start = time.monotonic()
    end = start + seconds
    last_answer = start
    while True:
        now = time.monotonic()
        if now >= end:
            break
        while outstanding < window:
            struct.pack_into("!H", base, 0, secrets.randbits(16))
            if cookie:
                base[-8:] = os.urandom(8)
            try:
                sock.send(base)
            except BlockingIOError:
                break
            sent += 1
            outstanding += 1
        ready, _, _ = select.select([sock], [], [], 0.05)
        if not ready:
            if now - last_answer > 0.2:
                outstanding = 0  # lost: send a new window
            continue
        for _ in range(window):
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                break
            answered += 1
            outstanding = max(0, outstanding - 1)
            rcodes_ok += (data[3] & 0x0F) == expected
            last_answer = time.monotonic()
    out.put((answered, sent, rcodes_ok, time.monotonic() - start))
    sock.close()


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(pid: int, port: int, case: str, seconds: float, window: int, core: int | None) -> dict[str, float]:
    name, cookie = CASES[case]
    queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    warm = mp.Process(target=_load, args=(port, name, cookie, 0.3, window, core, queue))  # also fills the cache
    warm.start()
    queue.get(timeout=30)
    warm.join(10)
    before = _cpu(pid)
    proc = mp.Process(target=_load, args=(port, name, cookie, seconds, window, core, queue))
    proc.start()
    answered, sent, ok, elapsed = queue.get(timeout=seconds + 30)
    proc.join(10)
    cpu = _cpu(pid) - before
    return {
        "qps": answered / elapsed,
        "cpu_us_per_query": cpu / answered * 1e6 if answered else float("inf"),
        "qps_per_cpu_second": answered / cpu if cpu else float("inf"),
        "server_busy": cpu / elapsed,  # well under 1: the server waited for the client (rates are a lower bound)
        "lost": max(0, sent - answered),  # includes the last window, in flight when the client stopped
        "wrong_rcode": answered - ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=64, help="queries in flight")
    parser.add_argument("--min-rate", type=float, default=5000.0)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    server_core = cores[0]
    client_core = cores[1] if len(cores) > 1 else None

    zone = DNSServer(_Zone(), address="127.0.0.1", port=0, logger=DNSLogger(log="-recv,-send,-request,-reply"))
    upstream = zone.server.server_address[1]
    zone.start_thread()
    results: dict[str, dict[str, dict[str, float]]] = {}
    children: list[subprocess.Popen[bytes] | mp.Process] = []
    try:
        port = _free_port()
        ready = mp.Event()
        gw = mp.Process(target=_run_interceptor, args=(port, upstream, server_core, ready), daemon=True)
        gw.start()
        children.append(gw)
        if not ready.wait(30):
            raise SystemExit("the interceptor did not start")
        assert gw.pid is not None
        results["gateway"] = {case: _measure(gw.pid, port, case, args.seconds, args.window, client_core)
                              for case in CASES}  # fmt: skip

        dnsmasq = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
        if dnsmasq:
            peer_port = _free_port()
            peer = subprocess.Popen(
                [dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                 "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={peer_port}", "--pid-file=",
                 "--user=root", "--cache-size=10000", "--address=/#/", f"--server=/one.test/127.0.0.1#{upstream}"],
                preexec_fn=lambda: os.sched_setaffinity(0, {server_core}),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            children.append(peer)
            time.sleep(0.5)
            if peer.poll() is not None:
                print("dnsmasq failed:", peer.stderr.read().decode() if peer.stderr else "", file=sys.stderr)
            else:
                results["dnsmasq"] = {case: _measure(peer.pid, peer_port, case, args.seconds, args.window, client_core)
                                      for case in CASES}  # fmt: skip
        else:
            print("dnsmasq not installed (apt package dnsmasq-base): no peer run", file=sys.stderr)
    finally:
        for child in children:
            if isinstance(child, subprocess.Popen):
                child.terminate()
                child.wait(5)
            else:
                child.terminate()
                child.join(5)
        zone.stop()

    print(f"{'server':8} {'case':7} {'qps':>9} {'cpu us/q':>9} {'q/cpu-s':>9} {'busy':>5} {'lost':>6} {'bad':>5}")
    for server, cases in results.items():
        for case, r in cases.items():
            print(f"{server:8} {case:7} {r['qps']:9.0f} {r['cpu_us_per_query']:9.1f} {r['qps_per_cpu_second']:9.0f}"
                  f" {r['server_busy']:5.2f} {r['lost']:6.0f} {r['wrong_rcode']:5.0f}")  # fmt: skip
    failed = False
    for case, r in results.get("gateway", {}).items():
        peer = results.get("dnsmasq", {}).get(case)
        if peer:
            print(f"gateway/dnsmasq {case:7} rate {r['qps'] / peer['qps']:.2f}"
                  f"  per CPU-second {r['qps_per_cpu_second'] / peer['qps_per_cpu_second']:.2f}")  # fmt: skip
        if case not in TARGET_CASES or not args.min_rate:
            continue
        if r["qps"] < args.min_rate:
            print(f"FAIL: {case}: {r['qps']:.0f} qps < {args.min_rate:.0f}", file=sys.stderr)
            failed = True
        for metric, label in (("qps", "qps"), ("qps_per_cpu_second", "queries per CPU-second")):
            if peer and r[metric] < peer[metric] / 3:
                print(f"FAIL: {case}: {r[metric]:.0f} {label} < a third of dnsmasq's {peer[metric]:.0f}",
                      file=sys.stderr)  # fmt: skip
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
