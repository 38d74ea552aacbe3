"""The inspection tier's process (`gateway.tier.proxy`: mitmproxy with the tier's addon) on 127.0.0.1, started,
watched, restarted and stopped from here.

How things reach the process (the addon in addons/inspect.py reads them as mitmproxy options):

- `gateway_token`: a random token made once per supervisor (`.token`, what the engine sends in its hand-over
  line, `gateway.inspection.handover_line`). It is NOT on the command line, which every local
  user can read in /proc: it is written to `config.yaml` in the CA directory (0600, next to the CA key, which
  guards far more), a file mitmproxy reads at start from its confdir. That file is rewritten on every start
  and removed at close, so nothing an operator leaves there survives.
- `gateway_secrets`: the path of a JSON object {secret name: value}. Secrets never touch the disk: they are
  written to an anonymous memory file (memfd) handed to the child as an inherited descriptor, the path being
  `/dev/fd/<n>`; the addon opens and reads that path like any file. Values are read from `[inspection]
  secrets` again at every (re)start, so a rotated secret is picked up by a restart.
- `gateway_records_fd`: the write end of a pipe (one per process). The addon writes one FlowRecord per
  request as one JSON line (<= PIPE_BUF, so lines never interleave); each line read here becomes a FlowRecord
  handed to the FlowLog. A line that is not a FlowRecord is dropped and logged (`inspection.bad_record`).

The child gets a minimal environment (not the gateway's: that holds API tokens and the secrets' variables).
Its output (warnings and errors only) is logged as `inspection.output`. When it dies it is started again after
a backoff that doubles from restart_backoff to restart_backoff_max and is reset once a process has run that
long (`inspection.exited`, then `inspection.restarted` when the new one listens). `ready` is true while a
process is alive and has accepted a connection on its port: while it is false, inspected connections fail
closed and nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, Final

import structlog

import gateway.addons
from gateway.errors import GatewayError
from gateway.flowlog import FlowLog, decode_record
from gateway.processes import read_lines, wait_or_kill
from gateway.tier.ca import ensure_ca
from gateway.tier.config import InspectionConfig

log = structlog.get_logger("gateway.tier")

#: The production addon; tests hand the supervisor another script.
ADDON: Final = Path(gateway.addons.__file__).resolve().parent / "inspect.py"
#: The only variables the child inherits.
_ENVIRONMENT: Final = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH")
MAX_RECORD_LINE: Final = 65536
#: The tier's process (gateway/tier/proxy.py), as `python -m` runs it; not imported here, which would load mitmproxy
#: into every gateway process.
TIER_MODULE: Final = "gateway.tier.proxy"
OUTPUT_TAIL: Final = 20
STOP_TIMEOUT: Final = 5.0
READY_POLL: Final = 0.05


def tier_command(listen_port: int, confdir: Path, addon: Path, settings: Iterable[str] = ()) -> list[str]:
    """The command line of the tier's process (`settings`: mitmproxy options, each "name=value")."""
    argv = [sys.executable, "-m", TIER_MODULE, "--listen-port", str(listen_port), "--confdir", str(confdir)]
    argv += ["--addon", str(addon)]
    for setting in settings:
        argv += ["--set", setting]
    return argv


class TierSupervisor:
    def __init__(self, config: InspectionConfig, flowlog: FlowLog, *, addon: Path = ADDON) -> None:
        self.config = config
        self.flowlog = flowlog
        self.addon = addon
        self.token = secrets.token_urlsafe(32)
        self.restarts = 0
        self.bad_records = 0
        self._process: asyncio.subprocess.Process | None = None
        self._answered = False  # the current process accepted a connection on its port
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._output: deque[str] = deque(maxlen=OUTPUT_TAIL)

    @property
    def ready(self) -> bool:
        return self._answered and self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.returncode is None else None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the tier unless it runs already, and wait until it listens. Raises GatewayError: the CA does not
        fit (INSPECTION_CA_INVALID), a secret is unavailable (SECRET_UNAVAILABLE), the addon is missing
        (INSPECTION_ADDON_MISSING), its port is taken (INSPECTION_PORT_IN_USE), or no process listened within
        start_timeout (INSPECTION_START_FAILED)."""
        if self._task is not None:
            return
        if not self.addon.is_file():
            raise GatewayError("INSPECTION_ADDON_MISSING", f"the inspection addon {self.addon} does not exist")
        self._closing.clear()
        await self._launch()
        if not self.ready:
            await self.close()
            raise GatewayError(
                "INSPECTION_START_FAILED",
                f"the tier's process did not listen on 127.0.0.1:{self.config.listen_port} within "
                f"{self.config.start_timeout:g} s: {' | '.join(self._output) or 'no output'}",
                "inspection.listen_port",
            )
        log.info("inspection.started", port=self.config.listen_port, pid=self.pid)
        self._task = asyncio.create_task(self._supervise(), name="inspection-supervisor")

    async def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after STOP_TIMEOUT) and the tasks; leaves no process."""
        self._closing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_process()
        for reader in list(self._readers):
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        with contextlib.suppress(FileNotFoundError):
            (self.config.ca_dir / "config.yaml").unlink()

    async def _supervise(self) -> None:
        backoff = self.config.restart_backoff
        while True:
            process = self._process
            assert process is not None
            started = time.monotonic()
            code = await process.wait()
            self._answered = False
            log.warning("inspection.exited", pid=process.pid, returncode=code, output=list(self._output))
            if time.monotonic() - started >= self.config.restart_backoff_max:
                backoff = self.config.restart_backoff
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), backoff)
                    return
                backoff = min(backoff * 2, self.config.restart_backoff_max)
                try:
                    await self._launch()
                except GatewayError as exc:  # a secret or the CA went away: try again later
                    log.error("inspection.start_failed", code=exc.code, error=exc.message)
                    continue
                if self.ready:
                    break
                await self._stop_process()
                log.error("inspection.start_failed", code="INSPECTION_START_FAILED", output=list(self._output))
            self.restarts += 1
            log.warning("inspection.restarted", pid=self.pid, restarts=self.restarts)

    # ------------------------------------------------------------------ one process

    def _command(self, records_fd: int, secrets_fd: int) -> list[str]:
        config = self.config
        options = {
            "gateway_records_fd": str(records_fd),
            "gateway_secrets": f"/dev/fd/{secrets_fd}",
            "termlog_verbosity": "warn",
            # The addon requires it: upstream is dialled only for a request the addon let through.
            "connection_strategy": "lazy",
        }
        if config.upstream_ca_file is not None:
            options["ssl_verify_upstream_trusted_ca"] = str(config.upstream_ca_file)
        settings = (f"{name}={value}" for name, value in options.items())
        return tier_command(config.listen_port, config.ca_dir, self.addon, settings)

    def _write_confdir_options(self) -> None:
        """The token, in mitmproxy's confdir config file (0600): see the module's docstring."""
        path = self.config.ca_dir / "config.yaml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            os.fchmod(fd, 0o600)
            handle.write(f"gateway_token: {json.dumps(self.token)}\n")

    def _check_port_free(self) -> None:
        """Readiness is "the port accepts": another listener there would pass for the tier, so refuse first."""
        with socket.socket() as probe:
            # As mitmproxy binds (a closed tier's connections in TIME_WAIT do not count; a listener does).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.config.listen_port))
            except OSError as exc:
                raise GatewayError(
                    "INSPECTION_PORT_IN_USE",
                    f"127.0.0.1:{self.config.listen_port} is taken ({exc.strerror}); choose inspection.listen_port",
                    "inspection.listen_port",
                ) from None

    async def _launch(self) -> None:
        """One tier process, waited for until it accepts a connection, exits or start_timeout passes."""
        self._check_port_free()
        values = self.config.secret_values()
        ensure_ca(self.config.ca_dir, self.config.permitted_domains)
        self._write_confdir_options()
        secrets_fd = os.memfd_create("gateway-inspection-secrets", os.MFD_CLOEXEC)
        os.fchmod(secrets_fd, 0o600)  # a memfd starts at 0777; the addon refuses a secrets file others could read
        read_fd, write_fd = os.pipe()
        try:
            os.write(secrets_fd, json.dumps(values).encode())
            environment = {name: os.environ[name] for name in _ENVIRONMENT if name in os.environ}
            self._output.clear()
            self._answered = False
            self._process = await asyncio.create_subprocess_exec(
                *self._command(write_fd, secrets_fd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=environment,
                pass_fds=(write_fd, secrets_fd),
                start_new_session=True,  # a Ctrl-C meant for the gateway reaches the tier only through close()
            )
        finally:
            os.close(secrets_fd)
            os.close(write_fd)
        process = self._process
        assert process.stdout is not None
        self._spawn(self._read_output(process.stdout))
        self._spawn(self._read_records(read_fd))
        await self._wait_listening(process)

    async def _wait_listening(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self.config.start_timeout
        while process.returncode is None and time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.config.listen_port)
            except OSError:
                await asyncio.sleep(READY_POLL)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._answered = process.returncode is None
            return

    async def _stop_process(self) -> None:
        process, self._answered = self._process, False
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        await wait_or_kill(process, STOP_TIMEOUT)
        log.info("inspection.stopped", pid=process.pid, returncode=process.returncode)

    # ------------------------------------------------------------------ the child's output and records

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read_output(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()[:1000]
            if text:
                self._output.append(text)
                log.warning("inspection.output", line=text)

    async def _read_records(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_RECORD_LINE)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            await read_lines(reader, self._record_line, self._bad_record)
        finally:
            transport.close()

    def _record_line(self, line: bytes) -> None:
        try:
            record = decode_record(line)
        except ValueError as exc:
            self._bad_record(str(exc))
            return
        self.flowlog.record(record)

    def _bad_record(self, why: str) -> None:
        self.bad_records += 1
        log.warning("inspection.bad_record", reason=why, bad_records=self.bad_records)
