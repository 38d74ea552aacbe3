"""The fake internet's servers, as scripts to start in a namespace (`Topology.start_python(ns, SCRIPT, *args)`):
HTTP origins and an authoritative DNS server. `gateway demo` and the end-to-end tests share them.
"""

from __future__ import annotations

#: A tiny origin server for the internet namespace: HTTP on every port given, any address,
#: answering `ORIGIN <local address> <local port>`. Benchmarks may start their own.
ORIGIN_SERVER = r"""
import socket, sys, threading
def serve(conn):
    with conn:
        conn.settimeout(3)
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        host, port = conn.getsockname()[:2]
        body = f"ORIGIN {host} {port}\n".encode()
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except OSError:
            pass
def listen(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(512)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
for port in sys.argv[1:]:
    threading.Thread(target=listen, args=(int(port),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


#: An authoritative DNS server (dnslib's) as a script for `Topology.start_python(ns, ZONE_SERVER_SCRIPT, address,
#: zone_json)`: authoritative for the zone `{name: {"A": [...], "AAAA": [...]}}` on port 53 (UDP and TCP) of `address`,
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
