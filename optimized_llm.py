"""`from optimized_llm import OptimizedLLM`, as DeepShiva's documentation writes it."""

from myllm.optimized import OptimizedLLM

__all__ = ["OptimizedLLM"]
