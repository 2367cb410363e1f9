"""Ollama's request shapes for generation and embeddings (its docs/api.md), as clients send them.

Unknown top-level fields are ignored, as Ollama ignores them (clients add their own); options
are checked by `GenerationOptions`, except the llama.cpp tuning knobs Ollama accepts and this
daemon sets for itself (`IGNORED_OPTIONS`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

IGNORED_OPTIONS = frozenset({
    "num_keep", "typical_p", "repeat_last_n", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline",
    "numa", "num_batch", "main_gpu", "use_mmap", "use_mlock", "num_thread", "low_vram", "f16_kv",
    "vocab_only", "logits_all", "embedding_only", "tfs_z", "rope_frequency_base", "rope_frequency_scale",
})
"""Ollama options about how llama.cpp runs (threads, batch size, mmap, which GPU) or samplers
llama.cpp dropped: the daemon decides those (`MYLLM_*`), so a client sending them is not refused.
`num_gpu` (layers on the GPU) and `num_ctx` are real options (`GenerationOptions`)."""

KeepAlive = str | float | None


class ToolFunctionCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    function: ToolFunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: bool | Literal["low", "medium", "high"] | None = None


class GenerateRequest(BaseModel):
    model: str
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    raw: bool = False
    keep_alive: KeepAlive = None
    think: bool | Literal["low", "medium", "high"] | None = None


class EmbedRequest(BaseModel):
    model: str
    input: str | list[str] = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(BaseModel):
    """The older single-prompt embedding route."""

    model: str
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
