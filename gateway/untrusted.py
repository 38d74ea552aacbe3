"""Values from untrusted text (request bodies, query strings, files others edit, Redis records), read without
the exceptions Python raises for hostile shapes.

`json.loads` raises JSONDecodeError for bad syntax, but a plain ValueError for an integer of more than
4,300 digits (`sys.get_int_max_str_digits`), RecursionError for nesting deeper than the interpreter's
recursion limit, and UnicodeDecodeError for bytes that are not UTF-8; `int()` raises ValueError for the same
long numbers and accepts signs, spaces, underscores and non-ASCII digits such as '١٢٣'. Every caller here
gets one error class with a stable code instead.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import GatewayError

__all__ = ["InvalidJson", "parse_decimal", "parse_json"]


class InvalidJson(GatewayError, ValueError):
    """INVALID_JSON. Also a ValueError, so code that treats unreadable data as a ValueError keeps doing so."""

    def __init__(self, message: str) -> None:
        super().__init__("INVALID_JSON", message)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two parsers could pick different copies; refuse rather than guess.
            raise InvalidJson(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise InvalidJson(f"{name} is not valid JSON")


def parse_json(data: str | bytes) -> Any:
    """One JSON document. Raises InvalidJson (a GatewayError, code INVALID_JSON) for anything else: bad syntax,
    bytes that are not UTF-8, duplicate keys, NaN/Infinity, an integer too long to convert, or nesting deeper
    than the recursion limit allows. The message says which, without a Python-internal hint."""
    try:
        return json.loads(data, object_pairs_hook=_reject_duplicate_keys, parse_constant=_no_constants)
    except InvalidJson:
        raise
    except UnicodeDecodeError:
        raise InvalidJson("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"not valid JSON: {exc}") from None
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise InvalidJson("holds an integer too long to read (more than 4300 digits)") from None
    except RecursionError:
        raise InvalidJson("nested too deeply") from None


def parse_decimal(text: str, low: int, high: int) -> int | None:
    """The integer `text` spells in ASCII decimal digits if it lies in `low`-`high`, else None.

    No sign, space, underscore or non-ASCII digit; leading zeros are allowed. The length is checked before
    any conversion, so a 5,000-digit string is just out of range."""
    if not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(max(abs(low), abs(high)))):
        return None
    value = int(digits)
    return value if low <= value <= high else None
