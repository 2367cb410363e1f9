"""DeepShiva's `OptimizedLLM` Python interface, in-process (no daemon), over the same
registry, pull and engine as the server.

The constructor's Hugging Face-era arguments map onto llama.cpp as follows:
- `model_name`: a registered name, a local .gguf path, a Hugging Face GGUF repo
  (`owner/repo[:QUANT]`) or a catalog name; anything not registered is pulled first.
- `device`: "cpu" loads no layers on a GPU; "auto", "cuda" and "mps" offload every layer when
  llama-cpp-python was built with GPU support, and fall back to the CPU (with a warning for
  "cuda"/"mps") when it was not.
- `load_in_8bit`: when pulling a repo given without a quantization, prefer its Q8_0 file.
- `max_memory` and `torch_dtype`: accepted for compatibility; a GGUF file fixes its own
  precision, and memory follows from the file and the context size.
"""

from __future__ import annotations

import queue
import warnings
from collections.abc import Iterator
from typing import Any

from myllm.errors import InvalidOptions
from myllm.pull import ensure_model
from myllm.registry.store import Registry
from myllm.runtime.devices import llama_devices
from myllm.runtime.engine.batching import BatchEngine, EngineJob
from myllm.runtime.engine_types import DoneEvent, Failed, GenerationRequest, LoadSpec, TokenEvent
from myllm.runtime.request.options import GenerationOptions
from myllm.settings import Settings

DEVICES = ("auto", "cpu", "cuda", "mps")


def gpu_layers(device: str) -> int:
    if device not in DEVICES:
        raise InvalidOptions(f"device must be one of {', '.join(DEVICES)} (got {device!r})", field="device")
    if device == "cpu":
        return 0
    if llama_devices().offload:  # a GPU backend: llama_supports_gpu_offload also says yes for RPC alone
        return -1
    if device != "auto":
        warnings.warn(f"device={device!r}: this llama-cpp-python build has no GPU support; using the CPU", stacklevel=3)
    return 0


class OptimizedLLM:
    def __init__(
        self,
        model_name: str | None = None,
        device: str = "auto",
        max_memory: Any = None,
        load_in_8bit: bool = False,
        torch_dtype: Any = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.model_name = model_name or self.settings.default_model
        self.max_memory = max_memory
        self.torch_dtype = torch_dtype
        registry = Registry.open(self.settings)
        try:
            self.model = ensure_model(registry, self.settings, self.model_name, "Q8_0" if load_in_8bit else None)
            path = registry.blob_file(self.model)
        finally:
            registry.close()
        self.n_gpu_layers = gpu_layers(device)
        self.device = llama_devices().kind if self.n_gpu_layers else "cpu"
        """Where the model computes: "cpu", or the GPU's kind ("cuda", "mps")."""
        spec = LoadSpec.for_model(self.model, path, self.settings.num_ctx, self.n_gpu_layers,
                                  flash_attention=self.settings.flash_attention, draft_max=self.settings.draft_max)
        # The daemon's engine, in this process: one sequence, no saved conversations.
        self._engine: BatchEngine | None = BatchEngine(spec, self.settings.num_threads, kv_cache_bytes=0)

    def generate(
        self,
        prompt: str,
        max_length: int = 512,
        temperature: float = 0.7,
        top_p: float = 0.9,
        top_k: int = 50,
        repetition_penalty: float = 1.1,
        stop_sequences: list[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The prompt followed by its continuation (as Hugging Face's `generate` + decode
        gives it); with `stream=True`, an iterator of the new text pieces."""
        options = GenerationOptions.parse({
            "max_tokens": max_length, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "repeat_penalty": repetition_penalty, "stop": stop_sequences,
        })
        pieces = self._pieces(prompt, options)
        if stream:
            return pieces
        return prompt + "".join(pieces)

    def _pieces(self, prompt: str, options: GenerationOptions) -> Iterator[str]:
        engine = self._engine
        if engine is None:
            raise RuntimeError("the model was released by clear_memory(); create a new OptimizedLLM")
        tokens = engine.tokenize(prompt)
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def sink(items: list[tuple[EngineJob, Any]]) -> None:
            for _, event in items:
                events.put(event)

        job = engine.submit(GenerationRequest(tokens, options), sink)  # a prompt too long fails here

        def run() -> Iterator[str]:
            try:
                while True:
                    event = events.get()
                    if isinstance(event, Failed):
                        raise event.error
                    if isinstance(event, DoneEvent):
                        self.last = event
                        return
                    if isinstance(event, TokenEvent) and event.text:
                        yield event.text
            finally:  # a caller that stops iterating early stops the generation
                job.cancel.set()

        return run()

    def clear_memory(self) -> None:
        """Free the llama.cpp model and context."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            from myllm.runtime.placement.memory import release_freed_memory

            release_freed_memory()

    def __enter__(self) -> OptimizedLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear_memory()
