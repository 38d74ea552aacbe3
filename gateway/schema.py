"""JSON Schema of typed answer records: an API answer is declared once, as the dataclass its producer builds.

A field's name and type are the record's own; what JSON Schema adds to them (a description, a range, a format,
a reference to another component) rides on the type as `Annotated[T, Note(...)]`, so the producer that fills
the record and the OpenAPI document (`gateway.openapi`, which calls `record_schema`) read the same declaration
and cannot drift apart. Pure: no I/O, imported by producers in every component and by the document.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Note", "json_type", "object_schema", "record_schema"]


class Note:
    """JSON Schema keywords for one field, beyond what its Python type says (later mappings and keywords win)."""

    __slots__ = ("keywords",)

    def __init__(self, *schemas: Mapping[str, Any], **keywords: Any) -> None:
        merged: dict[str, Any] = {}
        for schema in schemas:
            merged |= schema
        self.keywords: Mapping[str, Any] = merged | keywords


def object_schema(
    properties: Mapping[str, Any], required: Iterable[str] = (), description: str | None = None, *, closed: bool = True
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": dict(properties)}
    if required := list(required):
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


_SCALARS: typing.Final[Mapping[Any, str]] = {int: "integer", float: "number", str: "string", bool: "boolean"}


def json_type(annotation: Any) -> dict[str, Any]:
    """The JSON Schema of a field's type: int, float, str, bool, a Literal of strings, list[X], dict, a record
    (inline), X | None, and `Annotated[X, Note(...)]` (the note's keywords over X's). Nothing else: another type
    is a declaration error, raised (KeyError) when the document is built, not a guess."""
    if typing.get_origin(annotation) is typing.Annotated:
        inner, *extras = typing.get_args(annotation)
        schema = json_type(inner)
        for extra in extras:
            if isinstance(extra, Note):
                # a reference to a component says all there is to say: no sibling keywords from the type
                schema = dict(extra.keywords) if "$ref" in extra.keywords else {**schema, **extra.keywords}
        return schema
    if typing.get_origin(annotation) is typing.Literal:
        return {"type": "string", "enum": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return {"type": "array", "items": json_type(item)}
    if typing.get_origin(annotation) is dict:  # what it holds is the field's Note to say
        return {"type": "object"}
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return record_schema(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `Annotated[...] | None` is a Union
        inner = [json_type(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(inner) == 1 and set(inner[0]) == {"type"}:
            return {"type": [inner[0]["type"], "null"]}
        return {"anyOf": [*inner, {"type": "null"}]}
    return {"type": _SCALARS[annotation]}


def record_schema(
    record: type, description: str | None = None, *, without: Iterable[str] = (), closed: bool = True
) -> dict[str, Any]:
    """A dataclass as a JSON object: its fields in order (all required, none other unless `closed` is False),
    their schemas from their types. `description` defaults to the record's docstring."""
    hints = typing.get_type_hints(record, include_extras=True)
    skipped = set(without)
    properties = {f.name: json_type(hints[f.name]) for f in dataclasses.fields(record) if f.name not in skipped}
    return object_schema(properties, properties, description or _docstring(record), closed=closed)


def _docstring(record: type) -> str | None:
    # dataclass() writes a signature into __doc__ when the class has none: that is no description.
    doc = record.__doc__
    if doc is None or doc.startswith(f"{record.__name__}("):
        return None
    return " ".join(doc.split())
