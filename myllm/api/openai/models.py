"""Request and response shapes of the OpenAI-style `/v1` API (the Cria document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Clients such as the openai SDK and LangChain send fields we have no use for; they are
    # ignored unless they change the meaning of the request (checked in the adapter).
    model_config = ConfigDict(extra="allow")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None
    """`{"url": ..., "detail": ...}` (a data URI), or the URL alone as some clients send it."""


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str = Field(description="a JSON object, as a string")


class ToolCallObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallObject] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: dict[str, Any]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Request):
    model: str | None = Field(None, description="default: MYLLM_DEFAULT_MODEL")
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 sequences, never in the output")
    seed: int | None = None
    presence_penalty: float | None = Field(None, description="passed to llama.cpp's presence penalty")
    frequency_penalty: float | None = Field(None, description="passed to llama.cpp's frequency penalty")
    n: int | None = Field(None, description="only 1 is supported")
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    keep_alive: str | float | None = Field(None, description="extension: as in the native API")
    # Extensions llama.cpp users expect.
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    draft_max: int | None = Field(None, description="extension: speculative decoding by prompt lookup, tokens drafted a step")
    lora: list[dict[str, Any]] | None = Field(None, description="extension (llama-server's): scales for the model's LoRA "
                                              "adapters, [{\"id\": 0, \"scale\": 0.5}]")


class ChatTemplateKwargs(BaseModel):
    """llama-server's and vLLM's way to pass variables to the chat template: the one a
    thinking model's template reads is honoured; others are refused rather than ignored."""

    model_config = ConfigDict(extra="forbid")
    enable_thinking: bool | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="function tools; calls are read from the reply")
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = Field(
        None, description="`required` and a named function are enforced by grammar")
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="a thinking model's thinking: none/minimal off, a level passed to its template")
    chat_template_kwargs: ChatTemplateKwargs | None = Field(
        None, description="extension (llama-server, vLLM): `enable_thinking` turns a thinking model's thinking on or off")


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, description="0 to 5 most likely tokens per position")


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="the first this many values of each vector, normalised again")
    user: str | None = None
    keep_alive: str | float | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelListObject(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens whose KV was reused (a returning conversation's earlier turns)."""


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int
    """Completion tokens written inside a thinking model's reasoning section."""


class UsageObject(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class Timings(BaseModel):
    """Extension, in llama-server's names: where a request's time went, as the server saw it."""

    cache_n: int
    prompt_n: int
    """Prompt tokens evaluated (the rest came from the KV cache)."""
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    draft_n: int | None = None
    """Tokens speculative decoding drafted (as llama-server names it; left out without speculation)."""
    draft_n_accepted: int | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    """A thinking model's thinking, apart from the answer (as llama-server, vLLM and DeepSeek send it)."""
    tool_calls: list[ToolCallObject] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageObject
    timings: Timings | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageObject
    timings: Timings | None = None


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorObject(BaseModel):
    error: ErrorBody
