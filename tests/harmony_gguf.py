"""A small gpt-oss stand-in for the tests and the bench: no gpt-oss model is small enough, so
SmolLM2 is rewritten with the gguf package so that seven of its unused control tokens
(`<repo_name>` ... `<issue_closed>`, ids 3-9) become harmony's, still control tokens in the file
as in gpt-oss's, with `<|return|>` its end of text and OpenAI's gpt-oss template (as llama.cpp
vendors it: tests/data/openai-gpt-oss-120b.jinja) its chat template. llama.cpp then treats them
as it treats gpt-oss's: `<|channel|>`, `<|message|>`, `<|start|>`, `<|constrain|>` and, beside
`<|return|>` and `<|call|>`, `<|end|>` are always rendered; `<|return|>` and `<|call|>` end the
generation."""

from __future__ import annotations

from pathlib import Path

from tests.hostile_gguf import rewrite_gguf

GPT_OSS_TEMPLATE = Path(__file__).resolve().parent / "data" / "openai-gpt-oss-120b.jinja"
"""OpenAI's gpt-oss chat template, as llama.cpp vendors it (models/templates)."""
MARKERS = {3: "<|start|>", 4: "<|channel|>", 5: "<|message|>", 6: "<|end|>", 7: "<|return|>", 8: "<|call|>",
           9: "<|constrain|>"}
"""The harmony tokens, by id."""


def write_harmony_gguf(source: Path, dest: Path) -> Path:
    """Write to `dest` SmolLM2 (`source`) with harmony's special tokens and gpt-oss's template."""
    import gguf

    reader = gguf.GGUFReader(source)
    tokens = reader.fields[gguf.Keys.Tokenizer.LIST].contents()
    types = reader.fields[gguf.Keys.Tokenizer.TOKEN_TYPE].contents()
    if any(types[i] != gguf.TokenType.CONTROL for i in MARKERS):
        raise ValueError(f"{source}: tokens {sorted(MARKERS)} are not all control tokens")
    kind = gguf.GGUFValueType
    return rewrite_gguf(source, dest, keys={
        gguf.Keys.Tokenizer.LIST: ([MARKERS.get(i, token) for i, token in enumerate(tokens)], kind.ARRAY),
        gguf.Keys.Tokenizer.EOS_ID: (7, kind.UINT32),
        gguf.Keys.Tokenizer.CHAT_TEMPLATE: (GPT_OSS_TEMPLATE.read_text(), kind.STRING),
    })
