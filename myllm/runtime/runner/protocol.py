"""What crosses the channel between the daemon and a runner process, and how.

The channel is a Unix stream socket carrying a stream of msgpack arrays (msgpack frames itself:
an `Unpacker` fed with whatever bytes arrived yields whole messages). Each message is a list whose
first item says what it is:

daemon -> runner
  ["load", config]                      first message: what to load (`RunnerConfig` as a dict)
  ["gen", id, request]                  a generation request (`encode_request`; its options are
                                        `RunnerOptions`' fields, in order; its images
                                        [at, digest, width, height, RGB bytes], the pixels
                                        as msgpack's raw bytes; its `PromptSource`
                                        [units, raw, budget] or nil)
  ["cancel", id]                        stop request `id` within one step
  ["call", id, method, args]            tokenize / count / detokenize / embed / rerank / stats: one answer
  ["exit"]                              exit now (the OS frees the model)

runner -> daemon
  ["ready", info]                       loaded: n_ctx, n_vocab, rss_before, rss_after, vram_used
  ["fail", error]                       the load failed cleanly (`encode_error`); the runner exits
  ["ev", [[id, event], ...]]            one engine step's events for every request in it; a
                                        request sent with a `PromptSource` first gets
                                        ["p", prompt tokens] (`Started`) as it goes in
  ["ok", id, value] / ["err", id, error]  the answer to a call

Typed domain errors travel by class name and attributes and are raised again on the daemon's
side as the same class, so each API maps them as if they had been raised in-process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack

from myllm import errors
from myllm.errors import ModelCrashed, MyLLMError
from myllm.runtime.engine_types import (
    Candidate,
    DecodedImage,
    DoneEvent,
    Failed,
    GenerationRequest,
    LoadSpec,
    PromptImage,
    PromptSource,
    Started,
    Thinking,
    TokenEvent,
)


@dataclass(frozen=True)
class RunnerConfig:
    """Everything a runner needs to load its model."""

    spec: LoadSpec
    n_threads: int | None
    kv_cache_bytes: int
    nice: int = 0
    """How far below the daemon's the runner's CPU priority is (`MYLLM_RUNNER_NICE`): passed on
    its command line, applied before any of its threads start (runner/__main__.py)."""
    attention_cliff: float | None = None
    """What an earlier runner of this model measured of the CPU's attention paths (see
    `measure_cliff`), so a reload skips measuring it again; None: measure it."""

    def encode(self) -> dict[str, Any]:
        spec = asdict(self.spec)
        spec["path"] = str(self.spec.path)
        spec["projector"] = None if self.spec.projector is None else str(self.spec.projector)
        spec["draft"] = None if self.spec.draft is None else str(self.spec.draft)
        return {"spec": spec, "n_threads": self.n_threads, "kv_cache_bytes": self.kv_cache_bytes,
                "attention_cliff": self.attention_cliff}

    @classmethod
    def decode(cls, data: dict[str, Any]) -> RunnerConfig:
        from pathlib import Path

        spec = dict(data["spec"])
        spec["path"] = Path(spec["path"])
        spec["projector"] = None if spec.get("projector") is None else Path(spec["projector"])
        for name in ("rpc_servers", "rpc_layer_bytes"):  # lists, once they crossed the channel
            spec[name] = tuple(spec.get(name) or ())
        spec["draft"] = None if spec.get("draft") is None else Path(spec["draft"])
        return cls(LoadSpec(**spec), data["n_threads"], data["kv_cache_bytes"], attention_cliff=data["attention_cliff"])


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpacker() -> msgpack.Unpacker:
    """Reads messages back from a byte stream fed in pieces. No size limit beyond msgpack's own
    defaults is needed: both ends are this program."""
    return msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=1 << 30)


# -- errors --------------------------------------------------------------------------------


def encode_error(exc: BaseException) -> list[Any]:
    """[class name, message, attributes]; any non-domain exception travels as a crash of the
    request (its text, for the log)."""
    if isinstance(exc, MyLLMError):
        attrs = {k: v for k, v in vars(exc).items() if k != "message" and isinstance(v, (str, int, float, bool, type(None)))}
        return [type(exc).__name__, exc.message, attrs]
    return ["ModelCrashed", f"the model's runner failed: {type(exc).__name__}: {exc}", {}]


def decode_error(data: list[Any]) -> MyLLMError:
    name, message, attrs = data
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MyLLMError)):
        cls = ModelCrashed
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.message = message
    exc.__dict__.update(attrs)
    return exc


# -- requests and events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunnerOptions:
    """A request's options as a runner holds them (`engine_types.SamplingOptions`): only what
    the engine reads, checked by `GenerationOptions` before they crossed, so the runner needs
    no pydantic to read them back."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    max_tokens: int | None
    logprobs: int | None
    draft_max: int | None


OPTION_FIELDS = tuple(f.name for f in fields(RunnerOptions))
"""The options that cross, in the order they travel."""


def encode_request(req: GenerationRequest) -> list[Any]:
    options = [getattr(req.options, name) for name in OPTION_FIELDS]
    thinking = None if req.thinking is None else [getattr(req.thinking, f.name) for f in fields(Thinking)]
    images = [[i.at, i.image.digest, i.image.width, i.image.height, i.image.rgb] for i in req.images]
    source = None if req.source is None else [req.source.units, req.source.raw, req.source.budget]
    adapters = [[path, scale] for path, scale in req.adapters]
    return [req.tokens, options, list(req.extra_stop), req.grammar, thinking, images, source, adapters]


def decode_request(data: list[Any]) -> GenerationRequest:
    tokens, options, extra_stop, grammar, thinking, images, source, adapters = data
    values = dict(zip(OPTION_FIELDS, options, strict=True))
    values["stop"] = tuple(values["stop"])
    return GenerationRequest(tokens, RunnerOptions(**values), tuple(extra_stop), grammar,
                             None if thinking is None else Thinking(*thinking),
                             tuple(PromptImage(at, DecodedImage(*image)) for at, *image in images),
                             None if source is None else _source(*source),
                             tuple((path, scale) for path, scale in adapters))


def _source(units: list[list[list[Any]]] | None, raw: str | None, budget: int) -> PromptSource:
    """msgpack gives each (text, special) part back as a list."""
    return PromptSource(None if units is None else [[(text, special) for text, special in unit] for unit in units],
                        raw, budget)


def encode_event(event: TokenEvent | DoneEvent | Failed | Started) -> list[Any]:
    if isinstance(event, TokenEvent):
        top = None if event.top is None else [[c.token_id, c.text, c.logprob] for c in event.top]
        return ["t", event.text, event.token_id, event.logprob, top, event.piece, event.thinking]
    if isinstance(event, DoneEvent):
        return ["d", *(getattr(event, f) for f in DoneEvent.__dataclass_fields__)]
    if isinstance(event, Started):
        return ["p", event.prompt_tokens]
    return ["e", encode_error(event.error)]


def decode_event(data: list[Any]) -> TokenEvent | DoneEvent | Started | MyLLMError:
    """An event, or the domain error a failed request ends with."""
    kind = data[0]
    if kind == "t":
        _, text, token_id, logprob, top, piece, thinking = data
        cands = None if top is None else tuple(Candidate(i, t, lp) for i, t, lp in top)
        return TokenEvent(text, token_id, logprob, cands, piece, thinking)
    if kind == "d":
        return DoneEvent(*data[1:])
    if kind == "p":
        return Started(data[1])
    return decode_error(data[1])
