"""The tunnel's HTTP/1.1 plumbing on real loopback sockets: the keep-alive pool to apps (reuse, bodies
without a length, apps that break off or answer garbage), and client connections (pipelining, malformed
requests, streamed uploads) through a real `TunnelServer` where the whole path matters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.tunnel.wire import (
    ClientConnection,
    Request,
    UpstreamBroken,
    UpstreamInvalid,
    UpstreamPool,
    UpstreamUnavailable,
)

APP_HOST = "127.77.0.2"

AppHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def app(handler: AppHandler) -> AsyncIterator[tuple[int, list[int]]]:
    """A raw TCP "app" on the sandbox loopback address; yields (port, connection counter)."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, APP_HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def exchange(
    pool: UpstreamPool,
    port: int,
    head: bytes,
    *,
    method: bytes = b"GET",
    on_body: Callable[[bytes], None] = lambda piece: None,
) -> tuple[int, bytes, bool]:
    """One request through the pool; returns (status, body, whether the connection went back to the pool).
    `on_body` sees every piece of the body as it is handed over, for an app that answers step by step."""
    conn = await pool.acquire(APP_HOST, port)
    conn.start(head, head_request=method == b"HEAD")
    answer = await conn.response_head()
    body: list[bytes] = []

    def receive(piece: bytes) -> None:
        body.append(piece)
        on_body(piece)

    receive(conn.take_held())
    conn.attach(receive)
    await conn.wait_done()
    before = pool.idle_count(APP_HOST, port)
    pool.release(conn)
    return answer.status, b"".join(body), pool.idle_count(APP_HOST, port) > before


GET = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n"


async def test_keep_alive_connections_are_reused() -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    pool = UpstreamPool(connect_timeout=2)
    async with app(keep_alive) as (port, accepted):
        for _ in range(5):
            assert await exchange(pool, port, GET) == (200, b"ok", True)
        assert len(accepted) == 1 and pool.created == 1
        pool.close()


async def test_a_body_without_content_length_ends_with_the_close_and_the_connection_is_not_reused() -> None:
    first_seen = asyncio.Event()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ")
        await writer.drain()
        await first_seen.wait()  # the rest comes in a later read, after the pool has handed over a first piece
        writer.write(b"second")
        await writer.drain()

    def seen(piece: bytes) -> None:
        if piece:
            first_seen.set()

    pool = UpstreamPool(connect_timeout=2)
    async with app(until_close) as (port, _):
        assert await exchange(pool, port, GET, on_body=seen) == (200, b"first second", False)


async def test_chunked_responses_and_informational_answers() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await writer.drain()
            writer.write(b"2\r\nde\r\n0\r\n\r\n")
            await writer.drain()

    pool = UpstreamPool(connect_timeout=2)
    async with app(chunked) as (port, accepted):
        assert await exchange(pool, port, GET) == (200, b"abcde", True)
        assert await exchange(pool, port, GET) == (200, b"abcde", True)
        assert len(accepted) == 1
        pool.close()


async def test_an_app_that_breaks_off_mid_body_is_a_clean_error_and_is_not_reused() -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()

    pool = UpstreamPool(connect_timeout=2)
    async with app(broken) as (port, _):
        conn = await pool.acquire(APP_HOST, port)
        conn.start(GET, head_request=False)
        assert (await conn.response_head()).status == 200
        conn.attach(lambda data: None)
        with pytest.raises(UpstreamBroken):
            await asyncio.wait_for(conn.wait_done(), 5)
        pool.release(conn)
        assert pool.idle_count(APP_HOST, port) == 0


async def test_garbage_and_silence_are_told_apart() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await reader.read()  # open until the gateway hangs up: garbage, not an early close

    async def silent_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)

    pool = UpstreamPool(connect_timeout=2)
    async with app(garbage) as (port, _):
        conn = await pool.acquire(APP_HOST, port)
        conn.start(GET, head_request=False)
        with pytest.raises(UpstreamInvalid):
            await asyncio.wait_for(conn.response_head(), 5)
        pool.release(conn)
        assert pool.idle_count(APP_HOST, port) == 0  # not reused after an error
    async with app(silent_close) as (port, _):
        conn = await pool.acquire(APP_HOST, port)
        conn.start(GET, head_request=False)
        with pytest.raises(UpstreamUnavailable):
            await asyncio.wait_for(conn.response_head(), 5)
    with pytest.raises(UpstreamUnavailable):
        await pool.connect(APP_HOST, port)  # nothing listens there any more


async def test_head_answers_and_connection_close() -> None:
    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n!")
            await writer.drain()

    pool = UpstreamPool(connect_timeout=2)
    async with app(answers) as (port, _):
        head = b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n"
        assert await exchange(pool, port, head, method=b"HEAD") == (200, b"", False)
        assert await exchange(pool, port, GET) == (200, b"!", False)


async def test_an_idle_connection_the_app_closed_is_not_handed_out() -> None:
    pooled = asyncio.Event()

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await pooled.wait()  # then closes while idle, as servers with a short keep-alive timeout do

    pool = UpstreamPool(connect_timeout=2)
    async with app(one_shot) as (port, accepted):
        conn = await pool.acquire(APP_HOST, port)
        conn.start(GET, head_request=False)
        assert (await conn.response_head()).status == 200
        conn.attach(lambda data: None)
        await conn.wait_done()
        pool.release(conn)
        assert pool.idle_count(APP_HOST, port) == 1
        pooled.set()
        await asyncio.wait_for(conn.wait_closed(), 5)
        assert pool.idle_count(APP_HOST, port) == 0  # forgotten when the app closed it
        assert await exchange(pool, port, GET) == (200, b"ok", True)
        assert len(accepted) == 2
        pool.close()


# --------------------------------------------------------------------------- client connections


@contextlib.asynccontextmanager
async def plain_server(
    handler: Callable[[ClientConnection, Request], Awaitable[None]],
) -> AsyncIterator[int]:
    registry: set[ClientConnection] = set()
    server = await asyncio.get_running_loop().create_server(lambda: ClientConnection(handler, registry), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for conn in list(registry):
            conn.abort()


async def echo_target(conn: ClientConnection, request: Request) -> None:
    body = await request.body.read(1 << 20) if request.body is not None else b""
    payload = request.target + b" " + body
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload))
    conn.finish(request, keep_alive=True)


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with plain_server(echo_target) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        )
        await writer.drain()
        answers = []
        for _ in range(3):
            head = await read_head(reader)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            answers.append(await reader.readexactly(length))
        assert answers == [b"/a ", b"/b xyz", b"/c hi"]
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400"),
    ],
)
async def test_malformed_requests_are_refused_and_the_connection_closed(request_bytes: bytes, status: bytes) -> None:
    async with plain_server(echo_target) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # read to EOF: the connection closes
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
        writer.close()


async def test_trailers_after_a_chunked_body_are_dropped_not_fatal() -> None:
    async def trailers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n")
            writer.write(b"2\r\nok\r\n0\r\nX-Sum: 42\r\n\r\n")
            await writer.drain()

    pool = UpstreamPool(connect_timeout=2)
    async with app(trailers) as (port, _):
        assert await exchange(pool, port, GET) == (200, b"ok", True)
        assert await exchange(pool, port, GET) == (200, b"ok", True)
        pool.close()
    async with plain_server(echo_target) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\nX-Sum: 1\r\n\r\n"
        )
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(4) == b"/t z"
        writer.close()


# --------------------------------------------------------------------------- hostile apps and heads


async def test_bytes_after_a_complete_response_are_an_error_and_never_passed_on() -> None:
    """A second response in the same write, or bytes sent later while the connection waits in the pool:
    nothing of them is handed on, and the connection is closed rather than reused."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"

    async def same_write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + smuggled)
            await writer.drain()

    pooled = asyncio.Event()
    sent_later = asyncio.Event()

    async def later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if not sent_later.is_set():
                await pooled.wait()
                writer.write(smuggled)  # while the connection is idle in the pool
                await writer.drain()
                sent_later.set()

    pool = UpstreamPool(connect_timeout=2)
    async with app(same_write) as (port, accepted):
        for n in (1, 2):
            assert await exchange(pool, port, GET) == (200, b"ok", False)
            assert len(accepted) == n  # a new connection each time
    async with app(later) as (port, accepted):
        assert await exchange(pool, port, GET) == (200, b"ok", True)
        pooled.set()
        await sent_later.wait()
        # Whether the loop has read the bytes yet or they still wait in the socket: never handed out again.
        assert await exchange(pool, port, GET) == (200, b"ok", True)
        assert len(accepted) == 2
        pool.close()


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 001 OK", b"HTTP/1.1 099 Low", b"HTTP/1.1 600 High", b"HTTP/1.1 999 OK", b"HTTP/1.1 200 O\x01K"],
)
async def test_a_status_outside_100_599_or_a_control_character_is_not_http(status_line: bytes) -> None:
    async def odd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(status_line + b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # open until the gateway hangs up

    pool = UpstreamPool(connect_timeout=2)
    async with app(odd) as (port, _):
        conn = await pool.acquire(APP_HOST, port)
        conn.start(GET, head_request=False)
        with pytest.raises(UpstreamInvalid):
            await asyncio.wait_for(conn.response_head(), 5)
        pool.release(conn)
        assert pool.idle_count(APP_HOST, port) == 0


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b'POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "chunked"\r\n\r\n',
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
@pytest.mark.parametrize("pipelined_after_a_good_one", [False, True])
async def test_a_request_llhttp_refuses_after_its_head_is_never_handled(
    head: bytes, pipelined_after_a_good_one: bool
) -> None:
    handled: list[bytes] = []

    async def handler(conn: ClientConnection, request: Request) -> None:
        handled.append(request.target)
        await echo_target(conn, request)

    async with plain_server(handler) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        first = b"GET /good HTTP/1.1\r\nHost: x\r\n\r\n" if pipelined_after_a_good_one else b""
        writer.write(first + head + b"0\r\n\r\n")  # the body arrives with the head, as an attacker would send it
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        assert handled == []
        writer.close()
