"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests.redis_server` is importable however pytest was started
    sys.path.insert(0, str(REPO))

from tests.factory import Server, start_server  # noqa: E402
from tests.redis_server import RedisServer, RedisServerError, find_redis_server  # noqa: E402

# A suite started in the background of a non-interactive shell inherits SIGINT ignored, and so would every
# process it starts (an ignored signal stays ignored across exec): the tests that press Ctrl-C on a `gateway`
# command (demo, audit tail) would then wait in vain. A handled SIGINT is reset to the default in children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private `redis-server` (loopback, free port, own directory, AOF fsync always), stopped afterwards.

    Fails, never skips, when redis-server is missing: these tests are the proof that the
    Redis store works, and CI installs it.
    """
    try:
        executable = find_redis_server()
    except RedisServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("redis"), executable=executable)
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """`gateway run` of one test's own (modules that share one across their tests define theirs)."""
    instance = start_server(tmp_path)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def product_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`gateway run` on the embedded store and a free loopback port, for the tests of one module."""
    instance = start_server(tmp_path_factory.mktemp("product"))
    try:
        yield instance
    finally:
        instance.stop()
