"""`gateway run --data-plane --workers N`: the egress engine in N processes, so it uses every core.

The main process is worker 0 and keeps what there is one of per gateway: the control API, the
tunnel, the nftables steering and the DNS interceptor (a sandbox's query log and DNS budget stay
in one place). Workers 1..N-1 run only an egress engine, on `egress.listen_port + k`, each
following the policy store itself. The steering sends all TCP of a sandbox to one worker
(`worker_index` of its id, for every address of it), so per-sandbox state stays in one process:
the connection rate limit, the shared bandwidth buckets and the DNS-learned addresses, which the
main process's DNS interceptor sends to the sandbox's worker as JSON lines on its stdin.

Failure: a worker that exits is started again after `RESTART_DELAY`; meanwhile its sandboxes' TCP
finds no listener and is dropped (fail closed), and readiness says so (a worker writes
`LISTENING_LINE` on its stdout once its engine listens). A worker exits when its stdin closes, so
no worker outlives the main process.

This module is the pool and the fan-out only and imports nothing of the engine: what a worker process
runs is built by the composition root (`gateway.service.serve_worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from gateway.learned import LearnedDestinations
from gateway.policy import IPAddress
from gateway.processes import wait_or_kill

log = structlog.get_logger("gateway.workers")

RESTART_DELAY = 1.0
#: Learned-address lines buffered for a worker that does not read them; beyond this they are dropped
#: (the sandbox's next DNS answer brings them again).
MAX_PENDING_BYTES = 4 << 20
STOP_TIMEOUT = 5.0
#: What a worker writes on its stdout once its engine listens (its only line there).
LISTENING_LINE = b"listening\n"


def worker_index(sandbox_id: str, workers: int) -> int:
    """The worker that serves a sandbox: stable across processes and restarts (not Python's salted hash)."""
    return zlib.crc32(sandbox_id.encode()) % workers


class LearnedFanout(LearnedDestinations):
    """The main process's learned-address table: keeps worker 0's sandboxes, sends the others' to their worker."""

    def __init__(self, workers: int, send: Callable[[int, bytes], None]) -> None:
        super().__init__()
        self.workers = workers
        self.send = send

    def add(self, sandbox_id: str, name: str, addresses: Iterable[str | IPAddress], ttl: float) -> None:
        worker = worker_index(sandbox_id, self.workers)
        if worker == 0:
            super().add(sandbox_id, name, addresses, ttl)
        elif ttl > 0:
            self.send(worker, json.dumps([sandbox_id, name, [str(a) for a in addresses], ttl]).encode() + b"\n")


def apply_learned_line(learned: LearnedDestinations, line: bytes) -> bool:
    """One line from the main process into a worker's table; False (and nothing changed) for a bad line."""
    try:
        sandbox_id, name, addresses, ttl = json.loads(line)
        if not (isinstance(sandbox_id, str) and isinstance(name, str) and isinstance(addresses, list)):
            return False
        learned.add(sandbox_id, name, [str(a) for a in addresses], float(ttl))
    except (ValueError, TypeError):
        return False
    return True


class WorkerPool:
    """Starts workers 1..N-1 (`argv_for(k)`), restarts the ones that exit, and carries lines to their stdin."""

    def __init__(self, workers: int, argv_for: Callable[[int], list[str]]) -> None:
        if workers < 2:
            raise ValueError("a pool is for two or more workers")
        self.workers = workers
        self.argv_for = argv_for
        #: Variables added to the workers' environment (what a worker needs from this process at start).
        self.environment: dict[str, str] = {}
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self.dropped_lines = 0
        #: Workers whose current process said its engine listens.
        self.listening: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def start(self) -> None:
        for worker in range(1, self.workers):
            await self._spawn(worker)
            self._tasks.append(asyncio.create_task(self._watch(worker)))

    async def _spawn(self, worker: int) -> None:
        process = await asyncio.create_subprocess_exec(
            *self.argv_for(worker),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **self.environment},
        )
        self.processes[worker] = process
        log.info("worker.started", worker=worker, pid=process.pid)

    async def _listened(self, worker: int, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # a line over the reader's limit: not the signal
            while line := await process.stdout.readline():
                if line == LISTENING_LINE:
                    self.listening.add(worker)

    async def _watch(self, worker: int) -> None:
        while True:
            process = self.processes[worker]
            await self._listened(worker, process)  # until its stdout closes, i.e. it is exiting
            code = await process.wait()
            self.listening.discard(worker)
            if self._closing:
                return
            self.restarts += 1
            log.error("worker.exited", worker=worker, code=code, restart_in=RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self._spawn(worker)
            except OSError as exc:
                log.error("worker.start_failed", worker=worker, error=str(exc))

    def send(self, worker: int, line: bytes) -> None:
        process = self.processes.get(worker)
        stdin = process.stdin if process is not None and process.returncode is None else None
        if stdin is None or stdin.is_closing() or stdin.transport.get_write_buffer_size() > MAX_PENDING_BYTES:
            self.dropped_lines += 1
            return
        stdin.write(line)

    def not_listening(self) -> list[int]:
        """Workers whose engine does not listen now (starting, or exited and waiting to be restarted)."""
        return [worker for worker in range(1, self.workers) if worker not in self.listening]

    def stats(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "pids": {k: p.pid for k, p in sorted(self.processes.items()) if p.returncode is None},
            "restarts": self.restarts,
            "dropped_learned_lines": self.dropped_lines,
        }

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for process in self.processes.values():
            if process.returncode is None and process.stdin is not None:
                process.stdin.close()  # the worker's signal to stop
        for process in self.processes.values():
            await wait_or_kill(process, STOP_TIMEOUT)
