"""How long the Redis store takes to load N sandbox policies at start-up.

Writes N valid sandbox policies the way another service would (HSET + XADD in MULTI/EXEC),
then times `RedisStore.start()` until the store is ready: once as a first start (nothing
accepted yet, every record parsed, compiled and written back as accepted) and once as a
restart (accepted copies loaded, live records unchanged). Exits 1 if a start is slower
than --max-seconds or the store did not load every record.

    .venv/bin/python bench/redis_load.py                 # own redis-server, 10,000 sandboxes
    .venv/bin/python bench/redis_load.py --count 50000 --max-seconds 25
    .venv/bin/python bench/redis_load.py --redis-url redis://127.0.0.1:6379/0   # a throw-away prefix, removed after

Without --redis-url it starts its own redis-server on a free loopback port in a temporary
directory, and always removes both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from redis.asyncio import Redis

from gateway.settings import load_config
from gateway.stores.config import StoreConfig
from gateway.stores.redis_store import RedisStore

SUBNET = ipaddress.ip_network("10.75.0.0/16")
TEMPLATES = {
    "python-dev": {
        "description": "Python packages and git",
        "egress": {"presets": ["package-registries", "git-hosts"]},
    },
    "ai-agent": {"description": "model APIs", "egress": {"presets": ["ai-apis"]}, "limits": {"bandwidth_mbit": 50}},
    "locked-down": {"description": "tight limits", "limits": {"connections_per_minute": 120, "bandwidth_mbit": 10}},
}
COMMON_HOSTS = ["github.com", "api.github.com", "pypi.org", "files.pythonhosted.org", "*.s3.amazonaws.com"]


def sandbox_record(i: int) -> dict[str, Any]:
    """A realistic allowlisted sandbox: ~10 hosts (shared, per tenant, own), CIDRs for some, a template for a third."""
    tenant = i % 700
    hosts = [
        *COMMON_HOSTS[: 3 + i % 3],
        f"api.tenant{tenant}.example.com",
        f"auth.tenant{tenant}.example.com",
        f"*.cdn.tenant{tenant}.example.net",
        f"sb-{i}.workers.example.dev",
        f"*.sb-{i}.preview.example.app",
    ]
    egress: dict[str, Any] = {"allow_hosts": hosts, "host_ports": [443, 80] if i % 4 else [443]}
    if i % 5 == 0:
        egress["allow_cidrs"] = [f"203.0.{i % 256}.0/24", "198.51.100.0/24"]
        egress["deny_cidrs"] = ["10.0.0.0/8"]
    record: dict[str, Any] = {
        "id": f"sb-{i:06d}",
        "addresses": [str(SUBNET.network_address + 2 + i)],
        "profile": "allowlisted",
        "egress": egress,
        "labels": {"tenant": f"t{tenant}", "team": ["ml", "web", "data"][i % 3]},
    }
    if i % 3 == 0:
        record["template"] = list(TEMPLATES)[i % len(TEMPLATES)]
    if i % 7 == 0:
        record["limits"] = {"connections_per_minute": 600, "dns_queries_per_minute": 300}
    return record


# --------------------------------------------------------------------------- a private redis-server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def private_redis(executable: str) -> Iterator[str]:
    """A redis-server on a free loopback port in a temporary directory; both removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="gw-bench-redis-"))
    port = _free_port()
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "",
               "--logfile", str(directory / "redis.log")]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise SystemExit(f"redis-server exited with {process.returncode}; see {directory / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not answer PING within 10 s")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- measuring


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False if that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


@dataclass
class Result:
    label: str
    seconds: float
    sandboxes: int
    rejected: int
    peak_rss_delta_mib: float
    rss_delta_mib: float


async def write_policies(url: str, prefix: str, count: int, batch: int = 500) -> float:
    """The contract's protocol, batched: each MULTI/EXEC holds the HSETs and XADDs of `batch` records."""
    client = Redis.from_url(url)
    started = time.perf_counter()
    try:
        async with client.pipeline(transaction=True) as pipe:
            for name, spec in TEMPLATES.items():
                pipe.hset(f"{prefix}templates", name, json.dumps({"name": name, **spec}))
                pipe.xadd(f"{prefix}changes", {"kind": "template", "key": name, "op": "put"}, maxlen=100_000)
            await pipe.execute()
        for start in range(0, count, batch):
            async with client.pipeline(transaction=True) as pipe:
                for i in range(start, min(start + batch, count)):
                    record = sandbox_record(i)
                    pipe.hset(f"{prefix}sandboxes", record["id"], json.dumps(record))
                    pipe.xadd(f"{prefix}changes", {"kind": "sandbox", "key": record["id"], "op": "put"}, maxlen=100_000)
                await pipe.execute()
    finally:
        await client.aclose()
    return time.perf_counter() - started


async def time_start(label: str, url: str, prefix: str) -> Result:
    config = StoreConfig(
        backend="redis", path=Path("unused.json"), poll_interval=0.5, redis_url=url, redis_prefix=prefix,
        stream_maxlen=100_000, resync_interval=3600.0, node_id="bench",
    )  # fmt: skip
    store = RedisStore(load_config(environ={}).policy_context(), config)
    gc.collect()
    rss_before = _rss_kib("VmRSS")
    peak_reset = reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    await store.start()
    await store.ready.wait()
    seconds = time.perf_counter() - started
    if peak_reset:
        peak_delta = _rss_kib("VmHWM") - rss_before
    else:  # the process-lifetime peak: only grows, so this understates a second measurement
        peak_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
    result = Result(
        label=label,
        seconds=seconds,
        sandboxes=len(store.state.sandboxes),
        rejected=len(store.state.rejections),
        peak_rss_delta_mib=peak_delta / 1024,
        rss_delta_mib=(_rss_kib("VmRSS") - rss_before) / 1024,
    )
    await store.close()
    return result


async def cleanup(url: str, prefix: str) -> None:
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def run(url: str, prefix: str, count: int) -> tuple[float, list[Result]]:
    try:
        write_seconds = await write_policies(url, prefix, count)
        results = [await time_start("first start", url, prefix), await time_start("restart", url, prefix)]
    finally:
        await cleanup(url, prefix)
    return write_seconds, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="sandboxes to write (default 10000)")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="fail if a start takes longer (default 5)")
    parser.add_argument("--redis-url", help="use this Redis (under a throw-away prefix) instead of starting one")
    parser.add_argument("--redis-server", default=os.environ.get("REDIS_SERVER") or shutil.which("redis-server"),
                        help="redis-server executable (default: from PATH)")  # fmt: skip
    args = parser.parse_args(argv)
    if not 1 <= args.count <= SUBNET.num_addresses - 4:
        parser.error(f"--count must be 1-{SUBNET.num_addresses - 4} (one address each in {SUBNET})")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"

    if args.redis_url:
        write_seconds, results = asyncio.run(run(args.redis_url, prefix, args.count))
    else:
        if not args.redis_server:
            parser.error("redis-server not found; install it or pass --redis-server / --redis-url")
        with private_redis(args.redis_server) as url:
            write_seconds, results = asyncio.run(run(url, prefix, args.count))

    python = sys.version.split()[0]
    print(f"wrote {args.count} sandboxes + {len(TEMPLATES)} templates in {write_seconds:.2f} s (Python {python})")
    print(f"{'':12} {'N':>7} {'seconds':>8} {'sandboxes/s':>12} {'peak RSS Δ':>11} {'RSS Δ':>9}")
    failed = False
    for r in results:
        print(f"{r.label:12} {r.sandboxes:>7} {r.seconds:>8.2f} {r.sandboxes / r.seconds:>12,.0f} "
              f"{r.peak_rss_delta_mib:>8.1f} MiB {r.rss_delta_mib:>5.1f} MiB")  # fmt: skip
        if r.sandboxes != args.count or r.rejected:
            print(f"FAIL: {r.label} loaded {r.sandboxes} of {args.count} sandboxes, {r.rejected} rejected")
            failed = True
        if r.seconds > args.max_seconds:
            print(f"FAIL: {r.label} took {r.seconds:.2f} s, more than --max-seconds {args.max_seconds:g}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
