"""Constrained output: JSON (any object, or one that matches a JSON Schema) as a llama.cpp
GBNF grammar, so sampling can only produce text that parses."""

from __future__ import annotations

import json
from typing import Any

from myllm.errors import InvalidOptions


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """GBNF for a JSON object; with `schema`, for values that validate against it."""
    from llama_cpp import llama_grammar

    if schema is None:
        # llama.cpp's JSON grammar accepts any value; an object is what json mode promises.
        return llama_grammar.json_schema_to_gbnf(json.dumps({"type": "object"}))
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises assorted errors for schemas it cannot express
        raise InvalidOptions(f"unsupported JSON schema: {exc}", field="response_format") from exc
