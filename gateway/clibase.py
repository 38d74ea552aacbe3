"""What every command module of the `gateway` CLI shares: exit codes, `CliExit`, the parser class, and the
`Context` a client command runs in (the API client, `--json`, where output goes).

`gateway/cli.py` (the parser and dispatch) and the command modules that plug into it (`gateway.tunnel.cli`,
`gateway.attach`) import this module, never each other, so no command module depends on the dispatcher.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from gateway.client import ApiClient, ApiResponse, api_url
from gateway.errors import GatewayError
from gateway.settings import Config, load_config

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DENIED = 4  # `explain`: the connection would be denied (a verdict, not a failure)


class CliExit(Exception):
    """Stop with a message on stderr and an exit code."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that stops with `CliExit(EXIT_USAGE)` instead of exiting the process."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise CliExit(EXIT_USAGE, f"{self.prog}: error: {message}")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Unknown arguments are refused by the (sub)command that got them, with that command's usage:
        argparse would hand them up to the top level, whose usage says nothing about the subcommand."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


@dataclass
class Context:
    client: ApiClient
    json_output: bool
    out: TextIO

    def emit(self, response: ApiResponse, human: Callable[[Any], str] | None) -> None:
        if self.json_output:
            if response.text:
                self.out.write(response.text.rstrip("\n") + "\n")
            return
        if human is not None:
            text = human(response.data)
            if text:
                self.out.write(text + "\n")


def config_or_exit(path: str | None) -> Config:
    """The configuration, or `CliExit(EXIT_USAGE)` with the loader's `CODE: message`."""
    try:
        return load_config(path)
    except GatewayError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None


def client_from_args(args: argparse.Namespace) -> ApiClient:
    """The API from `--api`, else `GATEWAY_API_URL`, else the configured `[api]`; the token from `--token`,
    else `GATEWAY_TOKEN`."""
    url = args.api or os.environ.get("GATEWAY_API_URL")
    if not url:
        config = config_or_exit(args.config)
        url = api_url(config.api.host, config.api.port)
    if not url.startswith(("http://", "https://")):
        raise CliExit(EXIT_USAGE, f"--api {url!r} must start with http:// or https://")
    return ApiClient(url, args.token or os.environ.get("GATEWAY_TOKEN") or None)
