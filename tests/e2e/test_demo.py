"""`gateway demo`, run as a new user would (a subprocess of the installed command): its decisions, its tunnel
opened from the host, its clean-up on Ctrl-C, and the removal of what a killed demo left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.demo.run import PREFIX, WORKDIR
from tests.factory import wait_until
from tests.netns import live_namespaces

TIMEOUT = 120
URL = re.compile(r"tunnel URL: (https://(\S+?):(\d+)/)")


def demo(*args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-u", "-m", "gateway.cli", "demo", "--port", "0", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def demo_no_wait() -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gateway.cli", "demo", "--no-wait", "--port", "0"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)


class Output:
    """A running demo's output, read as it comes (a thread), so a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: self.lines.extend(stdout), daemon=True).start()

    @property
    def text(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def nothing_left() -> Iterator[None]:
    yield
    assert live_namespaces(f"{PREFIX}-") == []
    assert not WORKDIR.exists()


@pytest.mark.root
def test_demo_no_wait_shows_each_decision_with_its_reason_and_the_tunnel_url(nothing_left: None) -> None:
    done = demo_no_wait()
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"✓ allowed dig allowed\.example +NOERROR 198\.18\.1\.1; rule allow_hosts allowed\.example", out)
    assert re.search(r"✓ denied  dig denied\.example +NXDOMAIN; rule default:deny: host not in allowlist", out)
    assert re.search(r"✓ allowed curl http://allowed\.example/ +HTTP 200 'ORIGIN \S*198\.18\.1\.1 80'", out)
    assert re.search(r"✓ denied  curl http://denied\.example/ +HTTP 403 .*rule default:deny: host not in allow", out)
    # The gateway's own records, live from `gateway audit tail`.
    assert re.search(
        r"flow record: \S+ \S+ DENY http denied\.example:80 -> \S+ rule=default:deny revision=r[0-9a-f]{12} reason=",
        out,
    ), out
    assert re.search(r"flow record: \S+ \S+ allow http allowed\.example:80 -> \S+ up=\d+ down=\d+ rule=allow_h", out)
    assert URL.search(out), out
    assert "4 of 4 decisions as expected" in out


@pytest.mark.root
def test_the_tunnel_opens_from_the_host_and_ctrl_c_removes_everything(nothing_left: None) -> None:
    proc = demo()
    output = Output(proc)
    try:
        assert wait_until(lambda: "Ctrl-C removes everything" in output.text, TIMEOUT), output.text
        url, host, port = URL.search(output.text).groups()  # type: ignore[union-attr]
        ca = WORKDIR / "certs" / "ca.crt"
        fetched = subprocess.run(
            ["curl", "-sS", "-m", "10", "--cacert", str(ca), "--resolve", f"{host}:{port}:127.0.0.1", url],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert "Hello from the sandbox" in fetched.stdout
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0, output.text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert wait_until(lambda: "removed the demo's namespaces and files" in output.text, 5), output.text


@pytest.mark.root
def test_a_killed_demos_leftovers_are_reported_and_removed_by_the_next(nothing_left: None) -> None:
    proc = demo()
    output = Output(proc)
    try:
        assert wait_until(lambda: "Ctrl-C removes everything" in output.text, TIMEOUT), output.text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    left = live_namespaces(f"{PREFIX}-")
    running = [pid for name in left for pid in _netns_pids(name)]
    assert left and running and WORKDIR.exists()  # a killed demo cleans up nothing
    done = demo_no_wait()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"removing what an earlier demo left: namespaces {', '.join(left)}" in done.stdout
    assert f"removing what an earlier demo left: {WORKDIR}" in done.stdout
    assert wait_until(lambda: not any(Path("/proc", pid).exists() for pid in running), 5)


def _netns_pids(name: str) -> list[str]:
    shown = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=5, check=False)
    return shown.stdout.split()
