"""DeepShiva's OptimizedLLM class, in-process on the real test models."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from myllm.errors import InvalidOptions, ModelNotFound
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.fakehub import FakeHub


def test_document_usage(shared_registry: Registry) -> None:
    from optimized_llm import OptimizedLLM

    llm = OptimizedLLM(
        model_name="smollm2:135m",  # Model name or path
        device="auto",  # "auto", "cuda", "mps", or "cpu"
        max_memory=None,  # Memory configuration for model sharding
        load_in_8bit=False,  # Whether to use 8-bit quantization
        torch_dtype=None,  # Override default torch dtype
    )
    response = llm.generate(
        prompt="def fibonacci(n):",  # Input prompt
        max_length=40,  # Maximum tokens to generate
        temperature=0.7,  # Sampling temperature
        top_p=0.9,  # Nucleus sampling parameter
        top_k=50,  # Top-k sampling parameter
        repetition_penalty=1.1,  # Penalty for repeating tokens
        stop_sequences=None,  # List of sequences to stop on
        stream=False,  # Whether to stream the output
    )
    assert isinstance(response, str) and response.startswith("def fibonacci(n):") and len(response) > 20
    assert llm.device == "cpu"
    llm.clear_memory()
    with pytest.raises(RuntimeError, match="clear_memory"):
        llm.generate("again")


def test_stream_and_stop(shared_registry: Registry) -> None:
    from myllm import OptimizedLLM

    with OptimizedLLM("gemma3:270m", device="cpu") as llm:
        pieces = list(llm.generate("Monday, Tuesday, Wednesday,", max_length=12, temperature=0, stream=True))
        assert len(pieces) > 3
        full = "".join(pieces)
        stop = full.split(",")[1]
        stopped = llm.generate("Monday, Tuesday, Wednesday,", max_length=12, temperature=0, stop_sequences=[stop])
        assert stop not in stopped.removeprefix("Monday, Tuesday, Wednesday,")
        assert llm.last.finish_reason == "stop"


def test_local_path_and_errors(smollm2_path: Path) -> None:
    from myllm import OptimizedLLM

    with OptimizedLLM(str(smollm2_path), device="cpu") as llm:
        assert llm.model.quantization == "Q4_1"
    with pytest.raises(ModelNotFound):
        OptimizedLLM("codellama/CodeLlama-7b-hf")  # no GGUF anywhere: the hub is unreachable here
    with pytest.raises(InvalidOptions, match="device"):
        OptimizedLLM(str(smollm2_path), device="tpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with OptimizedLLM(str(smollm2_path), device="cuda") as llm:
            assert llm.device == "cpu"
    assert any("no GPU support" in str(w.message) for w in caught)


def test_load_in_8bit_prefers_q8_0(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from myllm import OptimizedLLM

    repo = {"someone/model-GGUF": {"model.Q4_K_M.gguf": smollm2_path, "model.Q8_0.gguf": smollm2_path}}
    with FakeHub(repo) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with OptimizedLLM("someone/model-GGUF", device="cpu", load_in_8bit=True) as llm:
            assert llm.model.source == "hf:someone/model-GGUF/model.Q8_0.gguf"
        with OptimizedLLM("someone/model-GGUF", device="cpu", settings=Settings(home=Path(str(Settings().home) + "-2"))) as llm:
            assert llm.model.source == "hf:someone/model-GGUF/model.Q4_K_M.gguf"
