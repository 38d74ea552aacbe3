"""The tier's supervisor with its real mitmproxy process (`gateway.tier.proxy`): started on loopback, answering,
restarted after kill -9, records from its pipe reaching a FlowLog, and no process left after close().

The process runs a stand-in addon that only declares the two options of the inspection addon the supervisor sets
(the token is the hand-over listener's) and, once running, writes one flow record carrying what it was given (the
token and the secrets), so the test sees that both arrived where the addon will read them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
from pathlib import Path

import pytest

from gateway.audit_config import AuditConfig
from gateway.errors import GatewayError
from gateway.flowlog import FlowLog
from gateway.inspection import HANDOVER_ACCEPTED, InspectionContext, InspectRule, handover_line
from gateway.settings import load_config
from gateway.tier.ca import CERT_FILE
from gateway.tier.config import InspectionConfig
from gateway.tier.supervisor import TierSupervisor
from gateway.tunnel.certs import CertPaths, init_certs
from tests.factory import free_port, wait_until_async

STAND_IN = """
import json, os
from mitmproxy import ctx

class StandIn:
    def load(self, loader):
        loader.add_option("gateway_records_fd", int, -1, "where flow records go")
        loader.add_option("gateway_secrets", str, "", "the secrets file")

    def running(self):
        with open(ctx.options.gateway_secrets) as handle:
            given = handle.read()
        record = {"start_us": 1, "end_us": 2, "sandbox": "agent-1", "src_addr": "10.75.0.2", "src_port": 40000,
                  "dst_addr": "192.0.2.1", "dst_port": 443, "orig_dst_addr": "192.0.2.1", "orig_dst_port": 443,
                  "hostname": "api.example.com", "protocol": "tls", "bytes_up": 10, "bytes_down": 20,
                  "duration_ms": 1.5, "verdict": "allow", "reason": ctx.options.gateway_token, "rule": given}
        fd = ctx.options.gateway_records_fd
        os.write(fd, b"not a record\\n")
        os.write(fd, (json.dumps(record) + "\\n").encode())

addons = [StandIn()]
"""


def _config(tmp_path: Path, **options: object) -> InspectionConfig:
    (tmp_path / "secret").write_text("s3cret-value\n")
    lines = [
        "[inspection]",
        f"listen_port = {free_port()}",
        f'ca_dir = "{tmp_path / "ca"}"',
        f'secrets = {{ github = {{ file = "{tmp_path / "secret"}" }} }}',
        "restart_backoff = 0.05",
        *(f"{key} = {json.dumps(value)}" for key, value in options.items()),
    ]
    (tmp_path / "gateway.toml").write_text("\n".join(lines) + "\n")
    return load_config(tmp_path / "gateway.toml", environ={}).inspection


def _context(port: int, host: str = "api.example.com") -> InspectionContext:
    return InspectionContext("agent-1", host, port, host, InspectRule(hosts=(host,), ports=(port,)))


async def _hand_over(
    config: InspectionConfig, token: str, port: int, host: str = "api.example.com"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the tier, handed over as the engine does it, past the tier's acceptance."""
    reader, writer = await asyncio.open_connection("127.0.0.1", config.listen_port)
    writer.write(handover_line(token, "127.0.0.1", port, _context(port, host)))
    assert await asyncio.wait_for(reader.readexactly(len(HANDOVER_ACCEPTED)), 10) == HANDOVER_ACCEPTED
    return reader, writer


async def _answers(config: InspectionConfig, token: str) -> bool:
    """The port takes hand-overs: a request handed over to an address nothing listens on gets mitmproxy's answer."""
    reader, writer = await _hand_over(config, token, 1)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return status.startswith(b"HTTP/1.1 502 ")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


@pytest.fixture
async def flowlog(tmp_path: Path):  # type: ignore[no-untyped-def]
    flows = FlowLog(AuditConfig(dir=tmp_path / "audit"))
    await flows.start()
    yield flows
    await flows.close()


async def test_started_answering_restarted_after_kill_and_closed(tmp_path: Path, flowlog: FlowLog) -> None:
    addon = tmp_path / "stand_in.py"
    addon.write_text(STAND_IN)
    config = _config(tmp_path)
    supervisor = TierSupervisor(config, flowlog, addon=addon)
    await supervisor.start()
    try:
        assert supervisor.ready and await _answers(config, supervisor.token)
        first = supervisor.pid
        assert first is not None and first in _children(os.getpid())
        # the secrets and the token are nowhere on the command line
        cmdline = Path(f"/proc/{first}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline and supervisor.token.encode() not in cmdline
        assert oct((config.ca_dir / "config.yaml").stat().st_mode & 0o777) == "0o600"

        await wait_until_async(lambda: flowlog.pending >= 1, timeout=15)
        os.kill(first, signal.SIGKILL)
        assert await wait_until_async(lambda: supervisor.restarts == 1 and supervisor.ready, timeout=60)
        assert supervisor.pid != first and await _answers(config, supervisor.token)
        await wait_until_async(lambda: flowlog.pending >= 2, timeout=15)
    finally:
        await supervisor.close()
    assert supervisor.pid is None and not supervisor.ready and _children(os.getpid()) == set()
    assert not (config.ca_dir / "config.yaml").exists()
    await flowlog.flush()
    batches = (tmp_path / "audit" / "agent-1").iterdir()
    lines = [json.loads(line) for path in batches for line in path.read_text().splitlines()]
    assert len(lines) == 2 and supervisor.bad_records == 2
    assert all(line["reason"] == supervisor.token for line in lines)  # the token reached the addon's option
    assert all(json.loads(line["rule"]) == {"github": "s3cret-value"} for line in lines)  # and the secrets


async def test_a_missing_secret_or_addon_stops_the_start(tmp_path: Path, flowlog: FlowLog) -> None:
    config = _config(tmp_path)
    (tmp_path / "secret").unlink()
    addon = tmp_path / "stand_in.py"
    addon.write_text(STAND_IN)
    with pytest.raises(GatewayError) as caught:
        await TierSupervisor(config, flowlog, addon=addon).start()
    assert caught.value.code == "SECRET_UNAVAILABLE"
    with pytest.raises(GatewayError) as caught:
        await TierSupervisor(config, flowlog, addon=tmp_path / "absent.py").start()
    assert caught.value.code == "INSPECTION_ADDON_MISSING"
    (tmp_path / "secret").write_text("back")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", config.listen_port))
        taken.listen()  # something else answering there must not pass for the tier
        with pytest.raises(GatewayError) as caught:
            await TierSupervisor(config, flowlog, addon=addon).start()
    assert caught.value.code == "INSPECTION_PORT_IN_USE"
    assert _children(os.getpid()) == set()


async def test_tls_through_the_tier_is_served_with_the_name_constrained_ca(tmp_path: Path, flowlog: FlowLog) -> None:
    """mitmproxy signs its leaves with the gateway's EC CA, inside the CA's name constraints, and dials the
    hand-over's address, checking the origin against upstream_ca_file."""
    origin_certs = CertPaths(*(tmp_path / "origin" / n for n in ("ca.crt", "ca.key", "origin.crt", "origin.key")))
    init_certs("origin.test", origin_certs)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\norigin")
        await writer.drain()
        writer.close()

    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(origin_certs.cert, origin_certs.key)
    origin = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=served)
    origin_port = origin.sockets[0].getsockname()[1]
    addon = tmp_path / "stand_in.py"
    addon.write_text(STAND_IN)
    config = _config(tmp_path, permitted_domains=["origin.test"], upstream_ca_file=str(origin_certs.ca_cert))
    supervisor = TierSupervisor(config, flowlog, addon=addon)
    await supervisor.start()
    try:
        reader, writer = await _hand_over(config, supervisor.token, origin_port, "api.origin.test")
        trusted = ssl.create_default_context(cafile=str(config.ca_dir / CERT_FILE))
        await writer.start_tls(trusted, server_hostname="api.origin.test")
        writer.write(b"GET / HTTP/1.1\r\nHost: api.origin.test\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).endswith(b"origin")
        writer.close()
    finally:
        await supervisor.close()
        origin.close()
