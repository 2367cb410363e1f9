"""Request and response shapes of the native MyLLM API (the 003 document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class InferenceOptions(BaseModel):
    """The document's InferenceOptions; a few more llama.cpp options are accepted as
    extensions. Ranges are checked by `GenerationOptions`, which names the field in its error."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, description="0.0 to 2.0")
    top_p: float | None = Field(None, description="0.0 to 1.0")
    top_k: int | None = Field(None, description="integer >= 0")
    max_tokens: int | None = Field(None, description="integer >= 1")
    stop: list[str] | None = Field(None, description="stop sequences, never part of the output")
    repeat_penalty: float | None = Field(None, description=">= 0.0")
    min_p: float | None = Field(None, description="extension: 0.0 to 1.0")
    seed: int | None = Field(None, description="extension: same seed and options give the same text")
    presence_penalty: float | None = Field(None, description="extension: -2.0 to 2.0")
    frequency_penalty: float | None = Field(None, description="extension: -2.0 to 2.0")
    num_ctx: int | None = Field(None, description="extension: context length to load the model with")
    num_gpu: int | None = Field(None, description="extension: layers to load on the GPU (-1 as many as fit, 0 none)")
    thinking_budget: int | None = Field(None, description="extension: tokens a thinking model may think before it answers")
    lora: list[dict[str, Any]] | None = Field(None, description="scales for the model's LoRA adapters, llama-server's "
                                              "shape: [{\"id\": 0, \"scale\": 0.5}] (an adapter not named keeps 1)")
    draft_max: int | None = Field(None, description="extension: speculative decoding by prompt lookup, the most "
                                  "tokens drafted a step (0 to 64; 0: off); the output is the same, faster when it copies")


IMAGES_DOC = ("extension (the 003 document has no images): image files (PNG, JPEG, WebP, GIF), base64 each, as "
              "Ollama's `images`; for a model that takes images (`vision`)")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str
    thinking: str | None = Field(None, description="extension: a thinking model's thinking before its answer "
                                 "(sent back in a request, it stays out of the prompt)")
    images: list[str] | None = Field(None, description=IMAGES_DOC + "; they go before the message's text, where "
                                     "Ollama puts them, and a stored session keeps them")


Think = bool | Literal["low", "medium", "high"] | None
THINK_DOC = ("extension: a thinking model's thinking: true, false, or a level its template reads; "
             "omitted, the model's default")


class ChatRequest(BaseModel):
    model: str | None = Field(None, description="default: MYLLM_DEFAULT_MODEL")
    messages: list[Message] = Field(min_length=1)
    session_id: str | None = Field(None, description="continue (or start) this session; omitted: a new one")
    stream: bool = False
    options: InferenceOptions = Field(default_factory=InferenceOptions)
    keep_alive: str | float | None = Field(None, description="extension: how long the model stays loaded")
    think: Think = Field(None, description=THINK_DOC)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    message: Message
    session_id: str
    usage: Usage


class GenerateRequest(BaseModel):
    model: str | None = None
    prompt: str
    stream: bool = False
    options: InferenceOptions = Field(default_factory=InferenceOptions)
    system: str | None = None
    session_id: str | None = Field(None, description="extension: continue a generate session")
    raw: bool = Field(False, description="extension: no chat template around the prompt")
    keep_alive: str | float | None = None
    think: Think = Field(None, description=THINK_DOC)
    images: list[str] | None = Field(None, description=IMAGES_DOC + "; they go before the prompt's text (not with "
                                     "`raw`, not in a generate session: a session with images is a chat)")


class GenerateResponse(BaseModel):
    text: str
    usage: Usage
    session_id: str | None = None
    thinking: str | None = Field(None, description="extension: a thinking model's thinking, apart from `text`")


class EmbeddingsRequest(BaseModel):
    model: str | None = None
    input: str | list[str]
    keep_alive: str | float | None = None


class EmbeddingResponse(BaseModel):
    embedding: list[float]
    model: str


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    model: str


class ModelInfo(BaseModel):
    name: str
    family: str
    size_mb: int
    quantization: str
    context_size: int
    template: str
    parameters: dict[str, Any]
    loaded: bool
    status: Literal["ok", "broken"] = Field(description="extension: 'broken' when the blob is missing or damaged")
    problem: str | None = Field(None, description="extension: what is wrong with a broken model")
    digest: str = Field(description="extension: sha256 of the GGUF file")
    size: int = Field(description="extension: the GGUF file's bytes")
    modified_at: str = Field(description="extension: when the name was last written (ISO 8601)")
    thinking: bool = Field(False, description="extension: the model thinks (its chat template has a reasoning "
                           "section), so `think` applies")
    vision: bool = Field(False, description="extension: the model takes images (it has a projector)")
    kind: Literal["chat", "embedding", "reranking"] = Field(
        description="extension: what the model is for, from its GGUF: `chat` (also embeds), `embedding` "
        "(only embeds), `reranking` (only ranks documents: /api/rerank)")


class StoredFile(BaseModel):
    """A GGUF file a model uses beside its own, in the blob store."""

    digest: str
    size: int


class ModelDetail(ModelInfo):
    """`GET /api/models/{name}`: the list's fields, and (extensions) everything `myllm show`
    prints, so the CLI can show a model from a running daemon."""

    architecture: str
    parameter_count: int | None = None
    parameter_size: str | None = None
    embedding_length: int | None = None
    vocab_size: int | None = None
    license: str | None = None
    source: str | None = None
    system: str | None = None
    chat_template: str | None = Field(None, description="the Jinja chat template itself (`template` is its short name)")
    created_at: str
    projector_digest: str | None = Field(None, description="sha256 of the model's projector (mmproj) GGUF, if any")
    projector_size: int | None = Field(None, description="the projector file's bytes")
    adapters: list[StoredFile] = Field(default_factory=list,
                                       description="the model's LoRA adapters (its ADAPTER lines), in order: each "
                                       "GGUF's sha256 and bytes; a request's `lora` scales them by index")
    draft_digest: str | None = Field(None, description="sha256 of the draft model's GGUF (its DRAFT line, speculative "
                                     "decoding), if any")
    draft_size: int | None = Field(None, description="the draft model file's bytes")


class ModelList(BaseModel):
    models: list[ModelInfo]


class StatusMessage(BaseModel):
    status: str
    message: str


class ServerInfo(BaseModel):
    name: str
    version: str
    status: str
    models_available: int
    ollama_port: int | None = Field(None, description="extension: where this daemon serves Ollama's API (none: off)")


class SessionSummary(BaseModel):
    id: str
    kind: str
    model: str
    created: str
    updated: str
    message_count: int
    preview: str | None = Field(None, description="extension: the start of its first user message")


class SessionList(BaseModel):
    sessions: list[SessionSummary]


class SessionMessage(BaseModel):
    role: str
    content: str
    tokens: int | None
    model: str | None
    created: str
    thinking: str | None = Field(None, description="extension: a thinking model's thinking before this answer")
    images: list[str] = Field(default_factory=list, description="extension: the images sent in this message, in "
                              "order, each by the sha256 (hex) of its file: GET /api/sessions/{id}/images/{digest}")


class SessionDetail(SessionSummary):
    messages: list[SessionMessage]


class ErrorDetail(BaseModel):
    detail: str


class RunningModel(BaseModel):
    name: str
    size_mb: int = Field(description="estimated memory, RAM and GPU together: weights + KV cache + compute buffers")
    rss_growth_mb: int = Field(description="measured growth of the model's runner process RSS when it loaded")
    context_length: int
    processor: str = Field(description='where it computes, by memory: "100% CPU", "100% GPU", "48%/52% CPU/GPU"')
    size_vram_mb: int = Field(description="extension: the estimate's GPU share (of size_mb)")
    vram_used_mb: int = Field(description="extension: GPU memory measured: the device's free memory before the load "
                              "less after it")
    gpu_layers: int = Field(description="extension: layers on the GPU, of `layers`")
    layers: int = Field(description="extension: the model's offloadable layers (repeating layers and the output layer)")
    expires_at: str | None = Field(description="when it unloads if idle; null: in use, or kept loaded")
    active: int
    queued: int
    busy: int = Field(description="extension: sequences generating now, of `slots`")
    slots: int = Field(description="extension: sequences the model generates at once (MYLLM_NUM_PARALLEL)")
    memory_mb: int = Field(description="extension: the model's runner processes (one per instance), resident memory measured now")


class RunningList(BaseModel):
    models: list[RunningModel]


class Health(BaseModel):
    status: str
    """`healthy`, `degraded` (see `problems`), or `starting` (also while shutting down)."""
    timestamp: str
    problems: list[str] = []
