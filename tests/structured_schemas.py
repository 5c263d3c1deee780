"""The structured-output conformance schemas: 50 JSON schemas of the kinds clients send (flat and nested objects,
arrays, enums, required fields, numbers with bounds, strings with patterns, unions, nullable fields, constants).
Every output the server produces for them must validate (`tests/test_structured_outputs.py`)."""

from __future__ import annotations

from typing import Any


def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, **extra}


STRING, INTEGER, NUMBER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}

FLAT = [
    obj({"answer": INTEGER}),
    obj({"name": STRING}),
    obj({"name": STRING, "age": INTEGER}),
    obj({"city": STRING, "temperature": NUMBER, "sunny": BOOLEAN}),
    obj({"title": STRING, "done": BOOLEAN}, required=["title"]),
    obj({"a": INTEGER, "b": INTEGER, "sum": INTEGER}),
    obj({"question": STRING, "answer": STRING, "confidence": NUMBER}),
    obj({"id": INTEGER, "label": STRING, "active": BOOLEAN, "score": NUMBER}),
    obj({"summary": STRING}, required=[]),
    obj({"x": NUMBER, "y": NUMBER}),
]

ENUMS = [
    obj({"color": {"type": "string", "enum": ["red", "green", "blue"]}}),
    obj({"unit": {"enum": ["celsius", "fahrenheit"]}, "value": NUMBER}),
    obj({"level": {"type": "integer", "enum": [1, 2, 3]}}),
    obj({"mood": {"enum": ["happy", "sad", "neutral"]}, "reason": STRING}),
    obj({"sky": {"enum": ["sunny", "cloudy", "rainy", "snowy", "windy", "foggy"]}, "city": STRING}),
]

BOUNDED_NUMBERS = [
    obj({"percent": {"type": "integer", "minimum": 0, "maximum": 100}}),
    obj({"rating": {"type": "number", "minimum": 1, "maximum": 5}}),
    obj({"year": {"type": "integer", "minimum": 1900, "maximum": 2100}}),
    obj({"probability": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"count": {"type": "integer", "exclusiveMinimum": 0}}),
    obj({"delta": {"type": "integer", "minimum": -10, "maximum": 10}}),
    obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60}, "city": STRING}),
    obj({"port": {"type": "integer", "minimum": 1024, "maximum": 65535}, "host": STRING}),
]

PATTERNS = [
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}),
    obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
    obj({"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}, "name": STRING}),
    obj({"email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"}}),
    obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    obj({"time": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"}}),
    obj({"word": {"type": "string", "minLength": 3, "maxLength": 8}}),
]

ARRAYS = [
    obj({"tags": {"type": "array", "items": STRING}}),
    obj({"numbers": {"type": "array", "items": INTEGER, "minItems": 2, "maxItems": 5}}),
    obj({"cities": {"type": "array", "items": STRING, "minItems": 1}}),
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": INTEGER, "maxItems": 3}, "maxItems": 3}}),
    obj({"people": {"type": "array", "items": obj({"name": STRING, "age": INTEGER}), "maxItems": 3}}),
    {"type": "array", "items": INTEGER, "minItems": 1, "maxItems": 4},
    obj({"steps": {"type": "array", "items": STRING, "minItems": 2, "maxItems": 4}, "result": INTEGER}),
    obj({"flags": {"type": "array", "items": BOOLEAN}}),
]

NESTED = [
    obj({"user": obj({"name": STRING, "age": INTEGER})}),
    obj({"location": obj({"city": STRING, "country": STRING}), "population": INTEGER}),
    obj({"order": obj({"id": INTEGER, "items": {"type": "array", "items": obj({"sku": STRING, "qty": INTEGER}),
                                                  "maxItems": 2}})}),
    obj({"a": obj({"b": obj({"c": STRING})})}),
    obj({"weather": obj({"sky": {"enum": ["sunny", "rainy"]}, "temp": {"type": "integer", "minimum": -30,
                                                                         "maximum": 45}}), "city": STRING}),
    obj({"meta": obj({"version": {"type": "string", "pattern": "^[0-9]\\.[0-9]$"}, "stable": BOOLEAN}),
         "name": STRING}),
    obj({"config": obj({"retries": {"type": "integer", "minimum": 0, "maximum": 5},
                        "verbose": BOOLEAN}, required=["retries"])}),
]

UNIONS = [
    obj({"value": {"anyOf": [INTEGER, STRING]}}),
    obj({"note": {"type": ["string", "null"]}}),
    obj({"kind": {"const": "sum"}, "result": INTEGER}),
    obj({"answer": {"oneOf": [obj({"number": INTEGER}), obj({"text": STRING})]}}),
    obj({"status": {"enum": ["ok", "error"]}, "error": {"type": ["string", "null"]}}),
]

SCHEMAS = FLAT + ENUMS + BOUNDED_NUMBERS + PATTERNS + ARRAYS + NESTED + UNIONS
assert len(SCHEMAS) == 50, len(SCHEMAS)
