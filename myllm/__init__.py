"""myllm: a local LLM daemon for GGUF models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["OptimizedLLM", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import myllm` (the CLI's start-up) does not load llama.cpp.
    if name == "OptimizedLLM":
        from myllm.optimized import OptimizedLLM

        return OptimizedLLM
    raise AttributeError(name)
