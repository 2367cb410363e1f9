"""Constrained output: JSON (any object, or one that matches a JSON Schema) as a llama.cpp
GBNF grammar, so sampling can only produce text that parses."""

from __future__ import annotations

import json

from myllm.errors import InvalidOptions
from myllm.runtime.options import GenerationOptions


def format_grammar(options: GenerationOptions) -> str | None:
    """The GBNF for `options.format`: None when the output is free text."""
    if options.format is None:
        return None
    from llama_cpp import llama_grammar

    # llama.cpp's JSON grammar accepts any value; an object is what "json" promises.
    schema = {"type": "object"} if options.format == "json" else options.format
    try:
        grammar = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises assorted errors for schemas it cannot express
        raise InvalidOptions(f"unsupported JSON schema: {exc}", field="format") from exc
    try:
        grammar.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidOptions("the JSON schema contains a lone surrogate, which is not text", field="format") from None
    return grammar
