"""Sampling and length options, validated once for every API."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from myllm.errors import InvalidOptions


class GenerationOptions(BaseModel):
    """`extra="forbid"`: a misspelt option is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.1, ge=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: tuple[str, ...] = Field(default=(), max_length=16)
    max_tokens: int | None = Field(None, ge=1)
    """None: until the model stops or the context is full."""
    num_ctx: int | None = Field(None, ge=64, le=1 << 20)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


# Ollama's Modelfile/option names that mean the same as ours.
ALIASES = {"num_predict": "max_tokens"}


def resolve_options(*layers: dict[str, Any] | None) -> GenerationOptions:
    """Merge option layers (model defaults, then the request's), later ones winning;
    `None` values in a layer mean "not given". Raises `InvalidOptions` naming the field."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is not None:
                merged[ALIASES.get(key, key)] = value
    try:
        return GenerationOptions(**merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "options"
        raise InvalidOptions(f"invalid option '{field}': {_explain(error)}", field=field) from None


def _explain(error: Any) -> str:
    ctx = error.get("ctx") or {}
    kind = error["type"]
    got = error.get("input")
    if kind == "extra_forbidden":
        return f"unknown option (allowed: {', '.join(GenerationOptions.model_fields)})"
    bounds = {
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
        "greater_than": f"must be > {ctx.get('gt')}",
        "less_than": f"must be < {ctx.get('lt')}",
    }
    if kind in bounds:
        return f"{bounds[kind]} (got {got!r})"
    return f"{error['msg']} (got {got!r})"
