"""A corpus of JSON schemas for guided decoding tests: nested objects, arrays with bounds, enums,
anyOf with null, string patterns and lengths, number bounds (and mixes). Every answer a guided model
gives must validate against its schema, whatever the weights."""

from __future__ import annotations

import itertools

S = {"type": "string", "maxLength": 12}
I = {"type": "integer"}


def _obj(props: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


BASE: list[dict] = [
    # scalars and bounds
    {"type": "integer", "minimum": 0, "maximum": 100},
    {"type": "integer", "minimum": -50, "maximum": -3},
    {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "number", "minimum": -1000.5, "maximum": 1000.5},
    {"type": "boolean"},
    {"type": "null"},
    {"type": "string", "minLength": 3, "maxLength": 6},
    {"type": "string", "pattern": "^[a-z]{2,5}$"},
    {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
    {"type": "string", "pattern": "^(yes|no|maybe)$"},
    {"type": "string", "format": "date"},
    {"enum": ["red", "green", "blue"]},
    {"enum": [1, 2, 3, "four", None, True]},
    {"const": "fixed"},
    # objects
    _obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 150}}),
    _obj({"a": I, "b": {"type": "boolean"}, "c": {"type": "null"}}),
    _obj({"id": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}, "score": {"type": "number", "minimum": 0,
                                                                                 "maximum": 10}}),
    _obj({"color": {"enum": ["red", "green"]}, "size": {"enum": ["S", "M", "L", "XL"]}}),
    _obj({"x": I, "y": I}, required=["x"]),
    _obj({"nickname": {"anyOf": [S, {"type": "null"}]}}),
    _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}}),
    _obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}}),
    _obj({"point": _obj({"x": I, "y": I}), "label": S}),
    _obj({"user": _obj({"name": S, "address": _obj({"city": S, "zip": {"type": "string",
                                                                          "pattern": "^[0-9]{5}$"}})})}),
    _obj({"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9},
                                                "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}}),
    _obj({"status": {"const": "ok"}, "code": {"type": "integer", "minimum": 200, "maximum": 599}}),
    _obj({"when": {"type": "string", "format": "date"}, "count": {"type": "integer", "minimum": 1, "maximum": 5}}),
    _obj({"ratio": {"type": "number", "minimum": 0, "maximum": 1}, "flag": {"type": "boolean"}}),
    _obj({"item": {"anyOf": [_obj({"kind": {"const": "book"}, "pages": I}),
                             _obj({"kind": {"const": "film"}, "minutes": I})]}}),
    _obj({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}}),
    _obj({"empty": _obj({})}),
    # arrays
    {"type": "array", "items": I, "maxItems": 4},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 5},
    {"type": "array", "items": _obj({"k": S, "v": {"type": "integer", "minimum": 0, "maximum": 99}}),
     "maxItems": 3},
    {"type": "array", "items": {"anyOf": [I, {"type": "null"}]}, "maxItems": 4},
    {"type": "array", "prefixItems": [I, {"type": "string", "maxLength": 4}, {"type": "boolean"}],
     "items": False},
    {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 3}, "minItems": 1, "maxItems": 2},
    # anyOf / nullable at the top
    {"anyOf": [I, {"type": "null"}]},
    {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "boolean"}]},
    {"type": ["integer", "null"], "minimum": 0, "maximum": 3},
    {"type": ["string", "null"], "maxLength": 4},
    # definitions and references
    {"$defs": {"pt": _obj({"x": I, "y": I})}, **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
    {"$defs": {"c": {"enum": ["r", "g", "b"]}}, "type": "array", "items": {"$ref": "#/$defs/c"}, "maxItems": 3},
]


def corpus(min_count: int = 60) -> list[dict]:
    """BASE, plus objects combining pairs of them (nested one level) until there are min_count."""
    out = list(BASE)
    for a, b in itertools.combinations(BASE, 2):
        if len(out) >= min_count:
            break
        out.append(_obj({"first": a, "second": b}))
    return out
