"""Structured logging: JSON lines in production, readable key=value on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

#: What `configure_logging` installed last, for `json_line_stream`.
_installed: dict[str, Any] = {}


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """`fmt`: json, console, or auto (console when stderr is a terminal)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    numeric = getattr(logging, level.upper())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _installed.clear()
    _installed.update(renderer=renderer, stream=sys.stderr, json=use_json, level=numeric)


def json_line_stream(level: int = logging.INFO) -> TextIO | None:
    """The stream JSON log lines go to, when `configure_logging` set up JSON lines that let `level` through and
    nothing has replaced that configuration since (`structlog.testing.capture_logs` does, for instance).

    For a hot path (a flow record per proxied request) that writes lines it rendered itself, in the same shape
    structlog's JSON renderer gives (`event`, `level` and an ISO `timestamp` beside the fields), several at a
    time. None means: log through structlog as usual."""
    if not _installed.get("json") or level < _installed["level"]:
        return None
    processors = structlog.get_config()["processors"]
    if not processors or processors[-1] is not _installed["renderer"]:  # capture_logs edits the list in place
        return None
    stream: TextIO = _installed["stream"]
    return stream
