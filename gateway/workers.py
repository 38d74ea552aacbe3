"""`gateway run --data-plane --workers N`: the egress engine in N processes, so it uses every core.

The main process is worker 0 and keeps what there is one of per gateway: the control API, the
tunnel, the nftables steering and the DNS interceptor (a sandbox's query log and DNS budget stay
in one place). Workers 1..N-1 run only an egress engine, on `egress.listen_port + k`, each
following the policy store itself. The steering sends all TCP of a sandbox to one worker
(`worker_index` of its id, for every address of it), so per-sandbox state stays in one process:
the connection rate limit, the shared bandwidth buckets and the DNS-learned addresses, which the
main process's DNS interceptor sends to the sandbox's worker as JSON lines on its stdin.

Worker -> main, on the worker's stdout: one message a line, `<kind>[ <payload>]\n`, so that other kinds can
be added. `listening` (`LISTENING_LINE`) says its engine listens; `record <FlowRecord JSON>` carries one flow
record to the main process's flow log, the one sink (batches, Redis stream, live views): a worker writes the
records of one event-loop turn in one write (`record_lines`). A line of no known kind, or a record that does not
decode, is counted (`bad_lines`) and skipped; it never stops the reader.

Failure: a worker that exits is started again after `RESTART_DELAY`; meanwhile its sandboxes' TCP
finds no listener and is dropped (fail closed), and readiness says so (a worker writes
`LISTENING_LINE` on its stdout once its engine listens). A worker exits when its stdin closes, so
no worker outlives the main process.

Metrics: a worker also writes a counters line (`counters_line`: its engine's counters and latency histograms, and
the flow records its flow log dropped) on its stdout every
`COUNTERS_INTERVAL` and when it stops; the pool keeps each worker's latest (`EngineCounters`) and
folds a process's last one into `retired` when it exits, so the sums it reports (`totals`) never go
back when a worker restarts (at most a crashed worker's last interval is lost).

Draining (`drain`): each worker gets SIGTERM and drains its own connections like the main process;
`close` then closes their stdin, which makes a worker still draining close at once.

This module is the pool and the fan-out only and imports nothing of the engine: what a worker process
runs is built by the composition root (`gateway.service.serve_worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.flowlog import FlowRecord, decode_record
from gateway.latency import Histogram, add_all
from gateway.learned import LearnedDestinations
from gateway.policy import IPAddress
from gateway.processes import read_lines, wait_or_kill

log = structlog.get_logger("gateway.workers")

RESTART_DELAY = 1.0
#: Learned-address lines buffered for a worker that does not read them; beyond this they are dropped
#: (the sandbox's next DNS answer brings them again).
MAX_PENDING_BYTES = 4 << 20
STOP_TIMEOUT = 5.0
#: What a worker writes on its stdout once its engine listens (its only line there).
LISTENING_LINE = b"listening\n"
RECORD_PREFIX = b"record "
#: The longest message line read from a worker (a flow record is far shorter).
MAX_MESSAGE_LINE = 1 << 20


def record_lines(lines: list[str]) -> bytes:
    """The `record` messages for rendered flow records, as one write."""
    return b"".join(RECORD_PREFIX + line.encode() + b"\n" for line in lines)


COUNTERS_PREFIX = b"counters "
COUNTERS_INTERVAL = 1.0


@dataclass(slots=True)
class EngineCounters:
    """An egress process's running totals (its engine's, and the flow records its flow log dropped), as a worker
    reports them to the main process."""

    connections: dict[tuple[str, str, str], int] = field(default_factory=dict)  # by (protocol, verdict, rule)
    bytes_up: int = 0
    bytes_down: int = 0
    relaying: int = 0  # a gauge: not carried into `retired`
    decisions: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # by (protocol, verdict)
    dials: dict[str, Histogram] = field(default_factory=dict)  # by outcome
    flow_records_dropped: int = 0

    def add(self, other: EngineCounters) -> None:
        for key, count in other.connections.items():
            self.connections[key] = self.connections.get(key, 0) + count
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.relaying += other.relaying
        add_all(self.decisions, other.decisions)
        add_all(self.dials, other.dials)
        self.flow_records_dropped += other.flow_records_dropped


def counters_line(counters: EngineCounters) -> bytes:
    rows = [[*key, count] for key, count in counters.connections.items()]
    decisions = [[*key, h.counts, h.sum] for key, h in counters.decisions.items()]
    dials = [[key, h.counts, h.sum] for key, h in counters.dials.items()]
    body = {"connections": rows, "bytes_up": counters.bytes_up, "bytes_down": counters.bytes_down,
            "relaying": counters.relaying, "decisions": decisions, "dials": dials,
            "flow_records_dropped": counters.flow_records_dropped}  # fmt: skip
    return COUNTERS_PREFIX + json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _histogram(counts: object, total: object) -> Histogram:
    if not isinstance(counts, list) or not isinstance(total, int | float):
        raise TypeError("not a histogram")
    return Histogram([int(n) for n in counts], float(total))  # ValueError for another number of buckets


def parse_counters_line(line: bytes) -> EngineCounters | None:
    """A worker's counters line, or None when it is not one (a worker is ours, but its output is checked)."""
    if not line.startswith(COUNTERS_PREFIX):
        return None
    try:
        body = json.loads(line[len(COUNTERS_PREFIX) :])
        return EngineCounters(
            {(str(p), str(v), str(r)): int(n) for p, v, r, n in body["connections"]},
            int(body["bytes_up"]),
            int(body["bytes_down"]),
            int(body["relaying"]),
            {(str(p), str(v)): _histogram(counts, total) for p, v, counts, total in body["decisions"]},
            {str(outcome): _histogram(counts, total) for outcome, counts, total in body["dials"]},
            int(body["flow_records_dropped"]),
        )
    except (ValueError, TypeError, KeyError):
        return None


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

    def __init__(
        self, workers: int, argv_for: Callable[[int], list[str]], on_record: Callable[[FlowRecord, str], None]
    ) -> None:
        if workers < 2:
            raise ValueError("a pool is for two or more workers")
        self.workers = workers
        self.argv_for = argv_for
        self.on_record = on_record
        #: Variables added to the workers' environment (what a worker needs from this process at start).
        self.environment: dict[str, str] = {}
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self.dropped_lines = 0
        #: Message lines from workers that were not understood (garbled, unknown kind, bad record).
        self.bad_lines = 0
        #: Workers whose current process said its engine listens.
        self.listening: set[int] = set()
        #: Each worker's current process's latest counters, and the last ones of processes that exited.
        self.counters: dict[int, EngineCounters] = {}
        self.retired = EngineCounters()
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
            limit=MAX_MESSAGE_LINE,
            env={**os.environ, **self.environment},
        )
        self.processes[worker] = process
        log.info("worker.started", worker=worker, pid=process.pid)

    async def _read_messages(self, worker: int, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None

        def message(line: bytes) -> None:
            if line == LISTENING_LINE:
                self.listening.add(worker)
            elif line.startswith(COUNTERS_PREFIX):
                counters = parse_counters_line(line)
                if counters is None:
                    bad("not a counters line")
                else:
                    self.counters[worker] = counters
            elif line.startswith(RECORD_PREFIX):
                payload = line[len(RECORD_PREFIX) : -1]  # what the worker's `render` wrote, without the newline
                try:
                    record = decode_record(payload)
                except ValueError as exc:
                    bad(f"not a flow record: {exc}")
                    return
                self.on_record(record, payload.decode())
            else:
                bad("no known kind")

        def bad(why: str) -> None:
            self.bad_lines += 1
            if self.bad_lines & (self.bad_lines - 1) == 0:  # 1, 2, 4, ...: a garbling worker does not flood the log
                log.warning("worker.bad_message", worker=worker, reason=why, bad_lines=self.bad_lines)

        with contextlib.suppress(OSError):
            await read_lines(process.stdout, message, bad)

    async def _watch(self, worker: int) -> None:
        while True:
            process = self.processes[worker]
            await self._read_messages(worker, process)  # until its stdout closes, i.e. it is exiting
            code = await process.wait()
            self.listening.discard(worker)
            if (last := self.counters.pop(worker, None)) is not None:
                last.relaying = 0  # its connections ended with it
                self.retired.add(last)
            if self._closing:
                return
            self.restarts += 1
            log.error("worker.exited", worker=worker, code=code, restart_in=RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)
            if self._closing:
                return
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

    def totals(self) -> EngineCounters:
        """Workers 1..N-1's counters summed, those of exited processes included."""
        total = EngineCounters()
        total.add(self.retired)
        for counters in list(self.counters.values()):
            total.add(counters)
        return total

    def not_listening(self) -> list[int]:
        """Workers whose engine does not listen now (starting, or exited and waiting to be restarted)."""
        return [worker for worker in range(1, self.workers) if worker not in self.listening]

    def stats(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "pids": {k: p.pid for k, p in sorted(self.processes.items()) if p.returncode is None},
            "restarts": self.restarts,
            "dropped_learned_lines": self.dropped_lines,
            "bad_message_lines": self.bad_lines,
        }

    def send_signal(self, signum: int) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    def drain(self) -> None:
        """SIGTERM to every worker: each drains its own connections and exits (none is restarted from now on)."""
        self._closing = True
        self.send_signal(signal.SIGTERM)

    async def exited(self) -> None:
        """Returns once every worker process has exited."""
        await asyncio.gather(*(process.wait() for process in self.processes.values()))

    async def close(self) -> None:
        """Ask every worker to stop at once (its stdin closes, draining or not), read what they still send (the
        records they queued) until their stdout closes, then wait for them (SIGKILL after STOP_TIMEOUT)."""
        self._closing = True
        for process in self.processes.values():
            if process.returncode is None and process.stdin is not None:
                process.stdin.close()  # the worker's signal to stop
        _, late = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT) if self._tasks else ((), ())
        for task in late:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for process in self.processes.values():
            await wait_or_kill(process, STOP_TIMEOUT)
