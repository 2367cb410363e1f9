"""The whole chain on a real model: registry row -> llama.cpp -> text."""

from myllm.registry.store import Registry
from myllm.runtime.engine import LlamaEngine, LoadSpec


def test_generate_from_registered_smollm2(shared_registry: Registry) -> None:
    row = shared_registry.get("smollm2:135m")
    spec = LoadSpec.for_model(row, num_ctx=512)
    assert spec.n_ctx == 512
    engine = LlamaEngine(spec, n_threads=2)
    try:
        out = engine.complete("The capital of France is", max_tokens=8, temperature=0.0)
    finally:
        engine.close()
    assert out.completion_tokens > 0
    assert out.prompt_tokens == 5
    assert "Paris" in out.text
