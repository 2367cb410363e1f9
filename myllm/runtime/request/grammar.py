"""Constrained output: JSON (any object, or one that matches a JSON Schema) as a llama.cpp
GBNF grammar, so sampling can only produce text that parses.

A schema is measured before it is converted (`runtime/request/schema_size.py`: the converter writes
repetitions out in full and can loop forever on some patterns), and `format_grammar` is called
off the event loop (`Runtime.prepare`), so even a schema that passes every bound never holds it."""

from __future__ import annotations

import json
from typing import Any, Literal

from myllm.errors import InvalidOptions
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.request.schema_size import SchemaLimits, check_schema, described

STRING_CHAR = '[^"\\\\\\x7F\\x00-\\x1F]'
"""A character JSON allows raw inside a string: not a quote, a backslash or a control character
(llama.cpp's own converter's rule; its escapes are the `char` rule's other alternative)."""
_LOOSE_RULES = {
    "char": '[^"\\\\]',
    "dot": "[^\\x0A\\x0D]",
}
"""The first alternatives of llama-cpp-python's converter's rules that let a string hold what
JSON forbids: `char` (any character but a quote or a backslash: a raw newline in a value, which
`json.loads` and `JSON.parse` refuse; its other alternative, the escapes, stays) and `dot` (a
pattern's `.`: any character but CR and LF, a quote too)."""


def _json_strings(grammar: str) -> str:
    """`grammar` with its string characters as JSON allows them. The converter writes each rule
    on one line as `name ::= body`; only those rules' exact first alternatives are replaced."""
    lines = grammar.split("\n")
    for i, line in enumerate(lines):
        name, sep, body = line.partition(" ::= ")
        loose = _LOOSE_RULES.get(name)
        rest = body[len(loose):] if loose is not None and body.startswith(loose) else None
        if sep and rest is not None and (not rest or rest.startswith(" |")):
            lines[i] = f"{name} ::= {STRING_CHAR}{rest}"
    return "\n".join(lines)


def format_schema(fmt: Literal["json"] | dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema an output format stands for: `"json"` promises an object (llama.cpp's
    JSON grammar would accept any value), a schema itself."""
    return {"type": "object"} if fmt == "json" else fmt


def format_grammar(options: GenerationOptions, limits: SchemaLimits, field: str = "format") -> str | None:
    """The GBNF for `options.format`: None when the output is free text. `limits.grammar`
    characters at most (sampling with a grammar costs time on every token in proportion to its
    open alternatives; the runner then measures what an accepted one costs:
    `BatchEngine.check_grammar`). `field` names what the schema came from in errors."""
    if options.format is None:
        return None
    from llama_cpp import llama_grammar

    schema = format_schema(options.format)
    try:
        check_schema(schema, limits, field)
    except RecursionError:  # MYLLM_MAX_SCHEMA_DEPTH set past what Python's stack walks
        raise InvalidOptions(f"{described(field)} nests too deeply to measure", field=field) from None
    try:
        grammar = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises assorted errors for schemas it cannot express
        raise InvalidOptions(f"unsupported {described(field)}: {str(exc)[:300]}", field=field) from exc
    grammar = _json_strings(grammar)
    if len(grammar) > limits.grammar:
        raise InvalidOptions(
            f"the grammar of {described(field)} is {len(grammar)} characters, more than the {limits.grammar} allowed "
            "(MYLLM_MAX_GRAMMAR); use a smaller schema (fewer enum values or alternatives)",
            field=field,
        )
    try:
        grammar.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidOptions(f"{described(field)} contains a lone surrogate, which is not text", field=field) from None
    return grammar
