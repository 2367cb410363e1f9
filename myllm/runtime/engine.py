"""One llama.cpp instance of one registered model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from myllm.errors import ModelLoadError
from myllm.registry.schema import ModelRow


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


@dataclass(frozen=True)
class LoadSpec:
    """Everything that changes how a model is loaded; two requests with the same spec share
    one instance whatever their sampling options."""

    name: str
    path: Path
    n_ctx: int
    n_gpu_layers: int = 0

    @classmethod
    def for_model(cls, row: ModelRow, num_ctx: int, n_gpu_layers: int = 0) -> LoadSpec:
        ctx = min(num_ctx, row.context_length) if row.context_length else num_ctx
        return cls(row.name, Path(row.blob_path), ctx, n_gpu_layers)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class LlamaEngine:
    def __init__(self, spec: LoadSpec, n_threads: int | None = None) -> None:
        from llama_cpp import Llama

        self.spec = spec
        if not spec.path.is_file():
            raise ModelLoadError(f"model file for '{spec.name}' is missing: {spec.path}")
        try:
            self.llm = Llama(
                model_path=str(spec.path),
                n_ctx=spec.n_ctx,
                n_threads=n_threads or default_threads(),
                n_gpu_layers=spec.n_gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"llama.cpp could not load '{spec.name}': {exc}") from exc

    def complete(self, prompt: str, max_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> Completion:
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
        choice = out["choices"][0]
        usage = out["usage"]
        return Completion(
            choice["text"], usage["prompt_tokens"], usage["completion_tokens"], choice["finish_reason"] or "stop"
        )

    def close(self) -> None:
        self.llm.close()
