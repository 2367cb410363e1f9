"""Grammar-forced JSON parses with a strict JSON parser (issue 28): no raw control character
inside a string, whatever the model samples. llama-cpp-python's schema converter lets strings
hold U+0000-U+001F (a raw newline in a value), and its pattern `.` even a quote; llama.cpp's own
converter, which Ollama uses, excludes them."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any

import pytest

from myllm.registry.store import Registry
from myllm.runtime.batching import BatchEngine, EngineJob
from myllm.runtime.engine import DoneEvent, GenerationRequest, LoadSpec
from myllm.runtime.grammar import format_grammar
from myllm.runtime.options import GenerationOptions
from myllm.runtime.schema_size import SchemaLimits

LIMITS = SchemaLimits(grammar=65536, depth=64, nodes=65536)
SCHEMAS: list[Any] = [
    "json",
    {"type": "object", "properties": {"text": {"type": "string"}, "note": {"type": "string", "maxLength": 40}},
     "required": ["text", "note"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^a.{3,12}z$"}}, "required": ["code"]},
]


def grammar(schema: Any) -> str:
    grammar = format_grammar(GenerationOptions(format=schema), LIMITS)
    assert grammar is not None
    return grammar


@pytest.mark.parametrize("schema", SCHEMAS)
def test_strings_in_every_json_grammar_exclude_control_characters(schema: Any) -> None:
    rules = dict(line.split(" ::= ", 1) for line in grammar(schema).splitlines() if " ::= " in line)
    for name in ("char", "dot"):
        if name in rules:
            assert rules[name].startswith('[^"\\\\\\x7F\\x00-\\x1F]'), rules[name]


def samples(engine: BatchEngine, schema: Any, n: int) -> list[str]:
    """`n` replies sampled hot (temperature 1.5) under the schema's grammar, all at once."""
    events: queue.SimpleQueue[tuple[EngineJob, Any]] = queue.SimpleQueue()

    def sink(items: list[tuple[EngineJob, Any]]) -> None:
        for item in items:
            events.put(item)

    prompt = engine.tokenize("Write a JSON object about a poem with line breaks, tabs and quotes:")
    for seed in range(n):
        options = GenerationOptions(temperature=1.5, top_k=0, top_p=1.0, max_tokens=40, seed=seed)
        engine.submit(GenerationRequest(prompt, options, (), grammar(schema)), sink)
    texts: list[str] = []
    while len(texts) < n:
        _, event = events.get(timeout=120)
        if isinstance(event, DoneEvent):
            texts.append(event.text)
    return texts


@pytest.mark.parametrize("model", ["smollm2:135m", "gemma3:270m"])
def test_hot_samples_parse_with_a_strict_parser(shared_registry: Registry, model: str) -> None:
    row = shared_registry.get(model)
    engine = BatchEngine(LoadSpec.for_model(row, shared_registry.blobs.path(row.digest), num_ctx=256, n_parallel=8),
                         n_threads=2, kv_cache_bytes=0)
    try:
        for schema in SCHEMAS:
            for text in samples(engine, schema, 16):
                if len(text) >= 2 and text.rstrip().endswith(("}", "]")):  # a reply the token limit did not cut
                    json.loads(text, strict=True)  # strict: a raw control character in a string fails
    finally:
        engine.close()


