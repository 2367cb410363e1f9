"""Request and response shapes of Anthropic's Messages API (`/v1/messages`).

Requests allow fields they do not name (clients send `cache_control`, `anthropic-beta`
features and the like, which change nothing here); a block of a kind myllm cannot read (a
document, a search result) fails validation, which is a 400 naming it. Images come inline
(`base64`) or by `url`, in a user turn or a tool result. Thinking blocks are read (a client
sends an earlier answer back whole) and left out of the prompt, as the chat templates drop
earlier turns' thinking.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


def _form(value: Any) -> str:
    """Which form a content came in (a string or blocks), so a bad one reports that form's
    problem; a plain union would report every member's, the string's first."""
    return "text" if isinstance(value, str) else "blocks"


class TextBlock(_Shape):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(_Shape):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(_Shape):
    """A thinking model's reasoning, before its text. `signature` is opaque: Anthropic's
    proves the block came from its model; here it is a digest of the thinking, never checked
    when the block comes back (it is not part of the prompt)."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(_Shape):
    """Thinking Anthropic's safety systems encrypted: accepted in a history, never produced."""

    type: Literal["redacted_thinking"] = "redacted_thinking"
    data: str


MediaType = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
"""The image formats Anthropic takes, by the media type a base64 image names."""


class Base64Source(_Shape):
    type: Literal["base64"]
    media_type: MediaType
    data: str


class URLSource(_Shape):
    """An image by URL: fetched only where the daemon's settings allow it (a `data:` URI always)."""

    type: Literal["url"]
    url: str


class ImageBlock(_Shape):
    type: Literal["image"] = "image"
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]


TextContent = Annotated[Annotated[str, Tag("text")] | Annotated[list[TextBlock], Tag("blocks")], Discriminator(_form)]
ResultBlock = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]
ResultContent = Annotated[Annotated[str, Tag("text")] | Annotated[list[ResultBlock], Tag("blocks")], Discriminator(_form)]


class ToolResultBlock(_Shape):
    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: ResultContent = ""
    is_error: bool = False


InputBlock = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                      Field(discriminator="type")]
Content = Annotated[Annotated[str, Tag("text")] | Annotated[list[InputBlock], Tag("blocks")], Discriminator(_form)]


class InputMessage(_Shape):
    role: Literal["user", "assistant"]
    content: Content


class InputSchema(_Shape):
    """A tool's JSON Schema: Anthropic's requires an object, and so do function calls."""

    type: Literal["object"]


class Tool(_Shape):
    name: str
    description: str | None = None
    input_schema: InputSchema


class _Parallel(_Shape):
    disable_parallel_tool_use: bool = False


class AutoChoice(_Parallel):
    type: Literal["auto"]


class AnyChoice(_Parallel):
    type: Literal["any"]


class NamedChoice(_Parallel):
    type: Literal["tool"]
    name: str


class NoneChoice(_Shape):
    type: Literal["none"]


ToolChoice = Annotated[AutoChoice | AnyChoice | NamedChoice | NoneChoice, Field(discriminator="type")]


class ThinkingEnabled(_Shape):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1, description="tokens of thinking before the model is made to answer; "
                                                 "less than `max_tokens` (no 1,024 minimum here)")


class ThinkingDisabled(_Shape):
    type: Literal["disabled"]


class ThinkingAdaptive(_Shape):
    """The model decides: here, its template's default."""

    type: Literal["adaptive"]


ThinkingConfig = Annotated[ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")]


class CountTokensRequest(_Shape):
    """What makes the prompt: `count_tokens` takes this, a message adds the sampling."""

    model: str
    messages: list[InputMessage]
    system: TextContent | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = Field(
        None, description="`any` and a named tool are enforced by a grammar built from the tools' schemas")
    thinking: ThinkingConfig | None = Field(
        None, description="absent (or `adaptive`): the model's default; a model whose template cannot think "
                          "refuses `enabled`")


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, description="never in the output; `stop_sequence` names the one met")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = Field(None, description="accepted, unused")


class Usage(BaseModel):
    input_tokens: int
    """Prompt tokens evaluated for this request."""
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int
    """Prompt tokens whose KV was reused (a returning conversation's earlier turns)."""


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingBlock | TextBlock | ToolUseBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail
