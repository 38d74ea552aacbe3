"""JSON Schema from typed answer records (`gateway.schema`): what each kind of field becomes, and that a field
of a type it does not know is refused rather than guessed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pytest
from jsonschema import Draft202012Validator

from gateway.schema import Note, json_type, record_schema


@dataclass(frozen=True)
class Inner:
    count: Annotated[int, Note(minimum=1)]


@dataclass(frozen=True)
class Record:
    """An answer, documented for its readers."""

    name: str
    ratio: float
    on: bool
    kind: Literal["a", "b"]
    label: str | None
    port: Annotated[int, Note(minimum=1, maximum=65535)] | None
    tags: list[Annotated[str, Note(maxLength=8)]]
    when: Annotated[str | None, Note({"format": "date-time"}, description="Or null.")]
    other: Annotated[dict[str, Any], Note({"$ref": "#/components/schemas/Other"})]
    inner: Inner


@dataclass(frozen=True)
class Undocumented:
    value: int


def test_each_field_type_becomes_its_json_schema() -> None:
    schema = record_schema(Record)
    assert schema["properties"] == {
        "name": {"type": "string"},
        "ratio": {"type": "number"},
        "on": {"type": "boolean"},
        "kind": {"type": "string", "enum": ["a", "b"]},
        "label": {"type": ["string", "null"]},
        "port": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}},
        "when": {"type": ["string", "null"], "format": "date-time", "description": "Or null."},
        "other": {"$ref": "#/components/schemas/Other"},  # a reference stands alone
        "inner": {
            "type": "object",
            "properties": {"count": {"type": "integer", "minimum": 1}},
            "required": ["count"],
            "additionalProperties": False,
        },
    }
    assert schema["required"] == list(schema["properties"])
    assert schema["additionalProperties"] is False
    assert schema["description"] == "An answer, documented for its readers."


def test_the_schema_holds_the_record_to_exactly_its_fields() -> None:
    validator = Draft202012Validator(record_schema(Undocumented))
    assert validator.is_valid({"value": 1})
    assert not validator.is_valid({})  # a field left out
    assert not validator.is_valid({"value": 1, "extra": 2})  # a field the record does not have
    assert not validator.is_valid({"value": "1"})  # a field of another type


def test_a_record_without_a_docstring_has_no_description_and_options_apply() -> None:
    # dataclass() writes the signature into a bare class's __doc__: that is not a description
    assert "description" not in record_schema(Undocumented)
    opened = record_schema(Record, "Told here.", without=["inner"], closed=False)
    assert "inner" not in opened["properties"] and "inner" not in opened["required"]
    assert opened["description"] == "Told here." and "additionalProperties" not in opened


def test_an_unknown_field_type_is_refused() -> None:
    with pytest.raises(KeyError):
        json_type(bytes)
    with pytest.raises(KeyError):
        json_type(tuple[str, ...])
