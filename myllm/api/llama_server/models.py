"""Shapes of the Llama-server document (000)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LlamaRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str | None = None
    max_length: int | None = Field(None, description="tokens to generate; 0 or absent: until the model stops")
    pre_response: str | None = Field(None, description="start of the assistant's turn")
    model: str | None = Field(None, description="extension: default MYLLM_DEFAULT_MODEL")


class LlamaError(BaseModel):
    error: str
