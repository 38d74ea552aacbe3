"""`gateway certs ca`: the inspection CA for sandboxes to trust (made now if there is none).

Plugged into the `certs` group by `gateway/cli.py` (`add_certs_parser`); imports `gateway.clibase`, never
`gateway.cli`. The certificate alone goes to stdout, so `gateway certs ca > ca.crt` saves it; what was done
and how to trust it go to stderr, for the person reading.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from gateway.clibase import EXIT_OK, EXIT_USAGE, CliExit, Parser, config_or_exit
from gateway.errors import GatewayError
from gateway.tier.ca import ensure_ca, trust_instructions


def add_certs_parser(certs: Any, common: Parser) -> None:
    p = certs.add_parser("ca", parents=[common], help="print the inspection CA certificate and how sandboxes trust it")
    p.set_defaults(run=cmd_ca)


def cmd_ca(args: argparse.Namespace, out: TextIO) -> int:
    err = sys.stderr
    config = config_or_exit(args.config).inspection
    try:
        ca = ensure_ca(config.ca_dir, config.permitted_domains)
    except GatewayError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None
    if ca.created:
        err.write(f"created the inspection CA in {config.ca_dir} (its key is mode 0600; never commit it)\n")
    out.write(ca.pem)
    err.write(trust_instructions(ca) + "\n")
    return EXIT_OK
