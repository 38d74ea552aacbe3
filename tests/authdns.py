"""A real authoritative DNS server on loopback for tests: dnslib's server, UDP and TCP on one free port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from gateway.demo.fakenet import ZONE_SERVER_SCRIPT

__all__ = ["ZONE_SERVER_SCRIPT", "serve"]


class TruncatingHandler(DNSHandler):
    udplen = 512  # a classic UDP limit: large answers come back truncated, so clients must retry over TCP


class Quiet(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-recv,-send,-request,-reply,-truncated,-error,-data")


@contextmanager
def serve(resolver: BaseResolver, host: str = "127.0.0.1") -> Iterator[int]:
    """Serve `resolver` over UDP (truncating at 512 bytes) and TCP on the same free port; yields the port."""
    for _ in range(20):
        udp = DNSServer(resolver, address=host, port=0, handler=TruncatingHandler, logger=Quiet())
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(resolver, address=host, port=port, tcp=True, handler=TruncatingHandler, logger=Quiet())
        except OSError:  # the TCP side of that port is taken: try another
            udp.server.server_close()
            continue
        break
    else:
        raise RuntimeError("no free port for the test DNS server")
    udp.start_thread()
    tcp.start_thread()
    try:
        yield port
    finally:
        # shutdown() waits up to one poll interval (0.5 s) per server: stop both at once.
        stoppers = [threading.Thread(target=srv.stop) for srv in (udp, tcp)]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(5)
        for srv in (udp, tcp):
            srv.server.server_close()
