"""JSON Schema to grammar: what constrained decoding enforces, and what it refuses by name."""

from __future__ import annotations

import json

import pytest

from services.errors import InvalidArgument
from services.llm_core.grammar import schema_to_grammar, unsupported_keywords


def test_supported_schemas_become_grammars_with_a_root_rule():
    schema = {"type": "object", "title": "Person", "properties": {
        "name": {"type": "string", "maxLength": 10, "description": "who"},
        "when": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "kind": {"anyOf": [{"const": "x"}, {"$ref": "#/$defs/y"}]}},
        "required": ["name"], "$defs": {"y": {"type": "integer"}}}
    grammar = schema_to_grammar(json.dumps(schema))
    assert grammar.startswith("kind") or "root ::=" in grammar


@pytest.mark.parametrize("schema, named", [
    ({"type": "integer", "minimum": 1}, "#: minimum"),
    ({"type": "object", "properties": {"age": {"type": "integer", "maximum": 9}}}, "#/properties/age: maximum"),
    ({"not": {"type": "string"}}, "#: not"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "#: patternProperties"),
    ({"type": "array", "items": {"type": "string", "format": "email"}}, "#/items: format 'email'"),
    ({"anyOf": [{"type": "number", "multipleOf": 2}]}, "#/anyOf/0: multipleOf"),
])
def test_keywords_the_grammar_cannot_enforce_are_refused_by_name(schema, named):
    assert named in unsupported_keywords(schema)
    with pytest.raises(InvalidArgument, match="cannot enforce"):
        schema_to_grammar(json.dumps(schema))


def test_not_json_is_refused():
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        schema_to_grammar("{type: object")
