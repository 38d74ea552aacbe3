"""Protocol logic of the egress engine's peek: bytes in, events out, no I/O.

The egress engine accepts a sandbox's TCP connection, reads (without forwarding) the first
bytes under a deadline and a size bound (`gateway.engine.session`), and asks this package what
they are, one module per protocol: `classify` (TLS, HTTP/1.x or opaque), `tls` (the ClientHello
parser and the alerts), `http1` (the request tracker, the server's answers, WebSocket, the 403).

Nothing here touches a socket, a clock or asyncio, in the style of h11 / mitmproxy's layers:
the same code is exercised by unit tests byte by byte. Every parser keeps offsets, so a feed
costs time proportional to the new bytes only, and every buffer is bounded.
"""
