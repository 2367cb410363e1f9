"""Shapes of the DeepShiva (002) and LLM-service (004) documents."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LoadModelRequest(BaseModel):
    model_name: str | None = Field(None, description="a registered name, a local .gguf path or a Hugging Face repo")


class GenerateRequest(BaseModel):
    """One request for both documents' `/generate`. `max_tokens` or `top_k` make it an
    LLM-service request (defaults max_tokens 1, temperature 1.0, top_k 5); otherwise it is a
    DeepShiva request (defaults max_length 512, temperature 0.7)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    max_length: int | None = Field(None, description="DeepShiva: tokens to generate (>= 1, default 512)")
    max_tokens: int | None = Field(None, description="LLM service: tokens to generate (1-100, default 1)")
    temperature: float | None = Field(None, description="0.0 to 2.0")
    top_k: int | None = Field(None, description="LLM service: candidates to return per position (1-50, default 5)")
    top_p: float | None = Field(None, description="extension: nucleus sampling")
    stop: list[str] | None = Field(None, description="extension: stop sequences")
    model: str | None = Field(None, description="extension: a model other than the one /load_model chose")


class TokenProbability(BaseModel):
    token: str
    probability: float = Field(ge=0.0, le=1.0)
    percentage: float = Field(ge=0.0, le=100.0)
    logprob: float
    rank: int = Field(ge=1)


class Position(BaseModel):
    token: str
    candidates: list[TokenProbability]


class GenerateResponse(BaseModel):
    status: str
    response: str = Field(description="DeepShiva: the prompt followed by the generated text")
    generated_text: str = Field(description="LLM service: the generated text alone")
    tokens: list[TokenProbability] = Field(description="top-k candidates for the first generated position")
    positions: list[Position] = Field(description="extension: the candidates of every generated position")
    metadata: dict[str, Any]


class StatusMessage(BaseModel):
    status: str
    message: str


class ModelStatus(BaseModel):
    status: str
    model_loaded: bool
    model_name: str
    device: str


class LegacyError(BaseModel):
    status: str
    message: str
    detail: str
    error_code: str
