"""The tier's listener: it takes the engine's hand-over line, then gives the connection to mitmproxy as a
transparent one to the address the line names.

The engine connects on loopback and writes one line (`gateway.inspection.handover_line`): the per-run token, the
vetted address and port, and the `InspectionContext`. This addon reads it, answers `HANDOVER_ACCEPTED` and runs
mitmproxy's connection handler on the same stream with the transparent mode's top layer, the server address set
to the vetted one: mitmproxy dials exactly what the engine vetted and does no DNS. What a regular proxy would
need, an HTTP CONNECT layer wrapped around every event of the connection and a CONNECT request and response made
for each, is not run at all. A line that is not the engine's (wrong token, a name instead of an address, another
port than the context's, the tier's own address) gets the connection closed, with nothing written to it.

The context is kept per mitmproxy client connection (`contexts`), for the inspection addon, which finds this one
as `ctx.master.addons.get("handover")`. The option `gateway_token` is this addon's.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Final

from mitmproxy import connection, ctx
from mitmproxy.proxy import layers, mode_specs
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler

from gateway.inspection import HANDOVER_ACCEPTED, MAX_HANDOVER_LINE, InspectionContext, parse_handover

if TYPE_CHECKING:
    from mitmproxy.addonmanager import Loader

log = logging.getLogger("gateway.inspect")

LISTEN_HOST: Final = "127.0.0.1"
#: The engine writes its line at once after connecting; a connection that says nothing for this long is closed.
LINE_TIMEOUT: Final = 10.0
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1"})


class Handover:
    def __init__(self, listen_port: int) -> None:
        self.listen_port = listen_port
        self.mode = mode_specs.ProxyMode.parse(f"transparent@{LISTEN_HOST}:{listen_port}")
        self.contexts: weakref.WeakKeyDictionary[connection.Client, InspectionContext] = weakref.WeakKeyDictionary()
        self.server: asyncio.Server | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option("gateway_token", str, "", "The per-run token of the gateway's hand-over line.")

    async def running(self) -> None:
        try:
            self.server = await asyncio.start_server(
                self._accept, LISTEN_HOST, self.listen_port, limit=MAX_HANDOVER_LINE
            )
        except OSError as exc:  # logged as an error: mitmproxy's start-up check then ends the process
            log.error("the tier's hand-over listener failed on %s:%d: %s", LISTEN_HOST, self.listen_port, exc)
            return
        log.info("hand-over proxy listening at %s:%d", LISTEN_HOST, self.listen_port)

    def done(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), LINE_TIMEOUT)
            address, port, context = parse_handover(line, ctx.options.gateway_token)
            if address in _LOOPBACK and port == self.listen_port:
                raise ValueError("the hand-over names the tier itself")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.warning("inspect.handover_refused error='the line ended early'")
            writer.close()  # (a connection closed at once is the supervisor's readiness probe)
            return
        except (ValueError, asyncio.LimitOverrunError, TimeoutError, OSError) as exc:
            log.warning("inspect.handover_refused error=%r", str(exc)[:200])
            writer.close()
            return
        writer.write(HANDOVER_ACCEPTED)
        handler = ProxyConnectionHandler(ctx.master, reader, writer, ctx.options, self.mode)
        handler.layer = layers.modes.TransparentProxy(handler.layer.context)
        client = handler.layer.context.client
        client.sockname = handler.layer.context.server.address = (address, port)
        self.contexts[client] = context
        try:
            with ctx.master.addons.get("proxyserver").register_connection(client.id, handler):
                await handler.handle_client()
        except asyncio.CancelledError:
            # The process is stopping. (Python 3.12.1's stream callback would log a cancelled task as an error.)
            writer.close()
