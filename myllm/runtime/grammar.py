"""Constrained output: JSON (any object, or one that matches a JSON Schema) as a llama.cpp
GBNF grammar, so sampling can only produce text that parses."""

from __future__ import annotations

import json

from myllm.errors import InvalidOptions
from myllm.runtime.options import GenerationOptions

MAX_GRAMMAR = 64 * 1024
"""Characters of GBNF a request's format may become. Sampling with a grammar costs time on every
token in proportion to its open alternatives; a larger one is refused before it is compiled
(the runner then measures what a smaller one costs: `BatchEngine.check_grammar`)."""


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
    if len(grammar) > MAX_GRAMMAR:
        raise InvalidOptions(
            f"the JSON schema's grammar is {len(grammar)} characters, more than the {MAX_GRAMMAR} allowed; "
            "use a smaller schema (fewer enum values or alternatives)",
            field="format",
        )
    try:
        grammar.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidOptions("the JSON schema contains a lone surrogate, which is not text", field="format") from None
    return grammar
