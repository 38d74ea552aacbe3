"""A real `redis-server` for tests: private loopback port and directory, durable AOF, killable.

The server runs with `--appendonly yes --appendfsync always --save ""`, the durability
the contract recommends, so a SIGKILL loses nothing a client was told was written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType

from tests.factory import wait_until
from tests.netns import IP, in_namespace


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    """The `redis-server` executable; raises RedisServerError saying how to get one."""
    path = shutil.which(os.environ.get("REDIS_SERVER") or "redis-server")
    if not path:
        raise RedisServerError(
            "redis-server is not installed (or not on PATH): the Redis integration tests run against a real "
            "server. Install it (apt-get install redis-server) or point REDIS_SERVER at the binary."
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(port: int, timeout: float = 0.5, host: str = "127.0.0.1") -> bytes:
    """The server's raw answer to PING (b"+PONG", or an error such as b"-LOADING ...")."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(256).split(b"\r\n", 1)[0]


class RedisServer:
    """On loopback, or (`netns`) inside that network namespace on its address `host`."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        executable: str | None = None,
        netns: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.directory = Path(directory)
        self.netns = netns
        self.host = host
        self.directory.mkdir(parents=True, exist_ok=True)
        self.executable = executable or find_redis_server()
        self.port = port or free_port()
        self.log_path = self.directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on the same port and directory; returns once PING answers PONG."""
        if self.running:
            return
        command = [
            *([IP, "netns", "exec", self.netns] if self.netns else []),
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            # Off the loopback only inside a test's own namespace, where every client is one of the test's.
            "--protected-mode", "yes" if self.netns is None else "no",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        answers = [b""]
        pinger = in_namespace(self.netns) if self.netns else None

        def pong() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {self._log_tail()}")
            with contextlib.suppress(OSError):
                if pinger is None:
                    answers.append(ping(self.port))
                else:
                    answers.append(pinger.submit(ping, self.port, 0.5, self.host).result())
            return answers[-1] == b"+PONG"

        try:
            if wait_until(pong, timeout, interval=0.01):
                return
        finally:
            if pinger is not None:
                pinger.shutdown()
        answer = answers[-1]
        self.kill()
        raise RedisServerError(f"redis-server on port {self.port} did not answer PING within {timeout} s "
                               f"(last answer {answer!r}): {self._log_tail()}")  # fmt: skip

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync, like a crash."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 5.0) -> None:
        """A clean shutdown (SIGTERM), falling back to SIGKILL."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
