"""Sampling and generation options: one model for every API, the Modelfile, the REPL and
`OptimizedLLM`, so each range is checked once, here.

Adapters build a `GenerationOptions` from their own request shape (`GenerationOptions.parse`);
the runtime lays it over the model's stored defaults (`over`) and hands it to the engines.
API-specific protocol limits (OpenAI's `top_logprobs` <= 20, say) stay in each adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from myllm.errors import InvalidOptions
from myllm.settings import rpc_endpoints

MAX_LOGPROBS = 50
"""Candidates per position the core returns at most. They come from the model's whole
distribution, so the bound only keeps responses small."""


class LoraScale(BaseModel):
    """llama-server's per-request adapter choice: the model's adapter `id` (its place among the
    model's ADAPTER lines, from 0) at `scale` (0: off for this request)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0)
    scale: float = Field(ge=-16.0, le=16.0)


class GenerationOptions(BaseModel):
    """`extra="forbid"`: a misspelt option is an error, never silently ignored. Frozen, and
    `model_fields_set` records what the caller actually gave, which is what `over` keeps."""

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
    num_gpu: int | None = Field(None, ge=-1, le=1024)
    """Layers on the GPU (Ollama's option): -1 as many as fit, 0 none, N at most N. Like
    `num_ctx` it changes how the model is loaded, so it is part of the instance's load key."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """None: no probabilities; 0: the chosen token's; k > 0: also the top k candidates."""
    format: Literal["json"] | dict[str, Any] | None = None
    """`"json"`: the output is a JSON object; a dict: a JSON Schema the output validates against."""
    draft_max: int | None = Field(None, ge=0, le=64)
    """Speculative decoding by prompt lookup (runtime/engine/speculative.py): the most tokens drafted
    a step, from the prompt and output, and verified in one batch; 0 or None: off. The loaded model
    allows at most MYLLM_DRAFT_MAX (a larger value is held to it). Output is the same either way:
    only speed changes (faster for outputs that copy their prompt)."""
    lora: tuple[LoraScale, ...] | None = Field(None, max_length=64)
    """Scales for the model's LoRA adapters, by id (llama-server's `lora`); an adapter not named
    keeps scale 1, as the model was created; None: every adapter at 1."""
    thinking_budget: int | None = Field(None, ge=1)
    """Tokens a thinking model may think before the engine closes its reasoning section and it
    answers; None: no limit but `max_tokens`."""

    @classmethod
    def parse(cls, values: Mapping[str, Any] | None) -> GenerationOptions:
        """Options as a caller wrote them: `None` values mean "not given" (so they do not count
        as set), Ollama's names are accepted (`num_predict`), and a bad value raises
        `InvalidOptions` naming the option rather than pydantic's error."""
        given = {ALIASES.get(key, key): value for key, value in (values or {}).items() if value is not None}
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"][:1]) or "options"
            raise InvalidOptions(f"invalid option '{field}': {_explain(error)}", field=field) from None

    def over(self, defaults: GenerationOptions) -> GenerationOptions:
        """These options laid over `defaults` (a model's stored PARAMETERs): every field this
        instance was given wins, the rest come from `defaults` where it sets them."""
        values = {name: getattr(defaults, name) for name in defaults.model_fields_set}
        values.update({name: getattr(self, name) for name in self.model_fields_set})
        return type(self).model_validate(values)

    @field_validator("format", mode="before")
    @classmethod
    def _json_or_schema(cls, value: Any) -> Any:
        if value is not None and value != "json" and not isinstance(value, dict):
            raise ValueError('must be "json" or a JSON Schema object')
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
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


ALIASES = {"num_predict": "max_tokens", "draft_num_predict": "draft_max"}
"""Ollama's Modelfile/option names that mean the same as ours."""

REQUEST_ONLY = frozenset({"logprobs", "format", "lora"})
"""Options that ask for a kind of response, which only a request can: a model's stored
defaults never set them."""

MODEL_ONLY = frozenset({"rpc_servers"})
"""Parameters of how a model loads that only its stored defaults set, never a request:
`rpc_servers` (its RPC workers, over MYLLM_RPC_SERVERS) names machines the daemon connects to,
which no client may aim it at."""

PARAMETERS = (tuple(name for name in GenerationOptions.model_fields if name not in REQUEST_ONLY) + tuple(ALIASES)
              + tuple(sorted(MODEL_ONLY)))
"""The names a model's defaults may be given under (Modelfile `PARAMETER`, the REPL's
`/set parameter`): every option but the request-only ones, Ollama's aliases, and the model-only
parameters."""


def sampling_defaults(parameters: Mapping[str, Any] | None) -> GenerationOptions:
    """A model's stored defaults as the options a request is laid over (the model-only ones
    left out: they are the load's, `LoadSpec`)."""
    return GenerationOptions.parse({k: v for k, v in (parameters or {}).items() if k not in MODEL_ONLY})


def parameter_value(name: str, value: Any) -> Any:
    """The typed value of one parameter as text (`PARAMETER top_k 40`) or JSON gives it,
    converted and range-checked by `GenerationOptions`; `stop` (a string or all of them)
    gives a tuple. Raises `InvalidOptions` naming the option. `name` must be one of
    `PARAMETERS`."""
    if name == "rpc_servers":
        try:
            return ",".join(rpc_endpoints(str(value)))
        except ValueError as exc:
            raise InvalidOptions(f"invalid option 'rpc_servers': {exc}", field="rpc_servers") from None
    key = ALIASES.get(name, name)
    return getattr(GenerationOptions.parse({key: value}), key)


def stored_parameter(name: str, value: Any) -> Any:
    """`parameter_value` as a model's stored defaults keep it (JSON: `stop` as a list), for
    a Modelfile's PARAMETER lines and Ollama's `create` alike."""
    typed = parameter_value(name, value)
    return list(typed) if name == "stop" else typed


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
