"""The whole chain on a real model: registry row -> llama.cpp -> text."""

from myllm.registry.store import Registry
from myllm.runtime.engine import DoneEvent, GenerationRequest, LlamaEngine, LoadSpec
from myllm.runtime.options import GenerationOptions


def test_generate_from_registered_smollm2(shared_registry: Registry) -> None:
    row = shared_registry.get("smollm2:135m")
    spec = LoadSpec.for_model(row, num_ctx=512)
    assert spec.n_ctx == 512
    engine = LlamaEngine(spec, n_threads=2)
    try:
        tokens = engine.tokenize("The capital of France is")
        events = list(engine.generate(GenerationRequest(tokens, GenerationOptions(temperature=0, max_tokens=8))))
    finally:
        engine.close()
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.prompt_tokens == 5
    assert done.completion_tokens == 8
    assert "Paris" in done.text


def test_context_capped_at_trained_length(shared_registry: Registry) -> None:
    assert LoadSpec.for_model(shared_registry.get("smollm2:135m"), num_ctx=100_000).n_ctx == 8192


def test_context_rounded_to_llama_cpp_padding(shared_registry: Registry) -> None:
    spec = LoadSpec.for_model(shared_registry.get("smollm2:135m"), num_ctx=320)
    assert spec.n_ctx == 512
    engine = LlamaEngine(spec, n_threads=2)
    try:
        assert engine.n_ctx == 512 == len(engine.llm.input_ids)
    finally:
        engine.close()
