"""A real authoritative DNS server on loopback for tests: dnslib's server, UDP and TCP on one free port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


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


#: The same kind of server as a script for `Topology.start_python(ns, ZONE_SERVER_SCRIPT, address, zone_json)`:
#: authoritative for the zone `{name: {"A": [...], "AAAA": [...]}}` on port 53 (UDP and TCP) of `address`,
#: NXDOMAIN for every other name; prints "ready" once listening. `{n}` in an address is replaced by how many
#: times that name and type have been asked, this query included ("198.18.2.{n}"): a client that gets the
#: same address twice got a cached answer, a new one proves its query reached this server.
ZONE_SERVER_SCRIPT = r"""
import collections, json, sys, threading
from dnslib import AAAA, QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
zone = json.loads(sys.argv[2])
asked = collections.Counter()
lock = threading.Lock()
class Zone(BaseResolver):
    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if name not in zone:
            reply.header.rcode = 3
            return reply
        with lock:
            asked[name, qtype] += 1
            n = str(asked[name, qtype])
        for value in zone[name].get(qtype, []):
            value = value.replace("{n}", n)
            reply.add_answer(RR(name, getattr(QTYPE, qtype), rdata=A(value) if qtype == "A" else AAAA(value), ttl=30))
        return reply
quiet = DNSLogger(log="-recv,-send,-request,-reply,-truncated,-error,-data")
for tcp in (False, True):
    DNSServer(Zone(), address=sys.argv[1], port=53, tcp=tcp, logger=quiet).start_thread()
print("ready", flush=True)
threading.Event().wait()  # the servers run in their threads until the namespace is torn down
"""
