"""The request shape of OpenAI's Responses API (`POST /v1/responses`); its answers are built as
plain dicts in responses.py, item by item as the reference gives them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
"""`reasoning.effort` as the openai package lists it."""


class Reasoning(BaseModel):
    """`reasoning`: how much a thinking model thinks. `summary` is accepted and echoed: the
    reply carries the whole reasoning text, never a summary."""

    model_config = ConfigDict(extra="allow")
    effort: Effort | None = None
    summary: str | None = None


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    reasoning: Reasoning | None = None
