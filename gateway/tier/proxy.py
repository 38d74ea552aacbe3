"""The inspection tier's process: mitmproxy's proxy core, its TLS and its layer choice, the tier's addon, nothing else.

`mitmdump` loads some thirty-five addons: replay, map-local and map-remote, body and header rewriting, sticky
cookies, flow files, the onboarding pages, scripts reloaded when their file changes. The tier uses none of them,
and each is code a hostile sandbox's traffic would reach. mitmproxy also offers every event to every addon (a
connection passes some twenty hooks, each a walk over all of them), so in mitmdump the walk alone costs more than
the tier's own checks. This process runs `ADDONS`, the hand-over listener (`gateway.tier.handover`: the engine's
connections come in there, as transparent ones to the address the engine vetted) and the addon file it is given,
loaded once: a changed file is never reloaded, so the tier never runs for a moment without its checks.

    python -m gateway.tier.proxy --listen-port N --confdir DIR --addon FILE [--set name=value ...]

As in mitmdump, options come from `--set` and then from `config.yaml` in the confdir (where the supervisor puts
the hand-over token, so that it is not on a command line). Exit status 1 when the addon does not load or an
option is refused; mitmproxy's own start-up errors (a taken port) exit through its error check.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from mitmproxy import exceptions, hooks, master, options, optmanager
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, script, tlsconfig

from gateway.tier.handover import Handover

#: What the tier needs of mitmproxy: options and commands, the listener, the choice of layers, certificates, and
#: the refusal of h2c upgrades (HTTP/2 only inside TLS). errorcheck makes a start-up error an exit status.
ADDONS: Final = (
    core.Core,
    proxyserver.Proxyserver,
    next_layer.NextLayer,
    tlsconfig.TlsConfig,
    disable_h2c.DisableH2C,
    errorcheck.ErrorCheck,
)


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--listen-port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--confdir", type=Path, required=True, help="mitmproxy's confdir: the CA and config.yaml")
    parser.add_argument("--addon", type=Path, required=True, help="the addon file (its module-level `addons`)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE")
    return parser.parse_args(argv)


def load_addons(path: Path) -> list[Any]:
    """The addon file's `addons`, loaded as mitmproxy loads a script. SystemExit when it does not load."""
    module = script.load_script(str(path))  # logs the traceback of a failed load
    found = getattr(module, "addons", None)
    if not isinstance(found, list) or not found:
        raise SystemExit(f"{path}: the addon did not load, or defines no `addons` list")
    return found


async def serve(arguments: argparse.Namespace) -> None:
    # No mode: mitmproxy runs no listener of its own; connections come in through the hand-over listener.
    opts = options.Options(confdir=str(arguments.confdir), mode=[])
    proxy = master.Master(opts, with_termlog=True)
    tier_addons = load_addons(arguments.addon)
    proxy.addons.add(*(addon() for addon in ADDONS), Handover(arguments.listen_port), *tier_addons)
    try:
        opts.set(*arguments.settings, defer=True)
        optmanager.load_paths(opts, str(arguments.confdir / "config.yaml"))
        opts.process_deferred()
        if opts.deferred:  # mitmproxy keeps an unknown option for an addon still to come: here none comes
            raise exceptions.OptionsError(f"unknown options {sorted(opts.deferred)}")
        # As mitmproxy does for a script: its addons see every option once, also those left at their defaults (the
        # inspection addon refuses mitmproxy's default connection strategy), where later they see what changed.
        for addon in tier_addons:
            proxy.addons.invoke_addon_sync(addon, hooks.ConfigureHook(opts.keys()))
    except exceptions.OptionsError as exc:
        raise SystemExit(f"gateway.tier.proxy: {exc}") from None
    # Records below the log's verbosity are then never made (mitmdump makes every debug record, then drops it).
    logging.getLogger().setLevel(opts.termlog_verbosity.upper())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, proxy.shutdown)
    await proxy.run()


def main() -> None:
    asyncio.run(serve(parse_arguments(sys.argv[1:])))


if __name__ == "__main__":
    main()
