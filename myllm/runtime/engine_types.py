"""What both sides of the runner boundary share: how a model is loaded (`LoadSpec`), what a
request is and what it produces (events), and the checks on a prompt's tokens. Plain data and
pure functions: the daemon imports this, never the engines (runtime/engine/) that use it; and a
runner imports it too, so it imports nothing but the errors at run time: the registry
(SQLAlchemy) or pydantic here would weigh on every runner, numpy on the daemon
(tests/test_runner_imports.py).

Generation runs in the batch engine (runtime/engine/batching.py), inside a runner process per loaded
model (runtime/runner/).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from myllm.errors import InvalidOptions, PromptTooLong

if TYPE_CHECKING:
    from myllm.registry.schema import ModelRow

CTX_PAD = 256
"""llama.cpp pads a context to a multiple of this."""


def context_size(num_ctx: int) -> int:
    """The context a model is loaded with for `num_ctx`: rounded up to the next of 256, 512,
    768, 1024, 1536, 2048, 3072, 4096, 6144... (a power of two, or one and a half times one,
    each a multiple of llama.cpp's padding). Requests asking for nearby sizes share one
    instance, so a key cycling `num_ctx` one padding step at a time cannot load a runner per
    value (two sizes per doubling remain), at the cost of at most half again the KV asked for."""
    if num_ctx <= CTX_PAD:
        return CTX_PAD
    power = 1 << (num_ctx - 1).bit_length()
    between = power * 3 // 4
    return between if num_ctx <= between and between % CTX_PAD == 0 else power


POOLING_MEAN, POOLING_RANK = 1, 4
"""llama.cpp's `LLAMA_POOLING_TYPE_MEAN` and `_RANK` (the registry keeps a GGUF's `pooling_type`
as this number)."""


def pooling_of(row: ModelRow) -> int:
    """How `row` pools its embeddings: see `LoadSpec.pooling`."""
    if row.kind == "reranking":
        return POOLING_RANK
    declared = int((row.details or {}).get("pooling_type") or 0)
    return declared if row.kind == "embedding" and declared else POOLING_MEAN


@dataclass(frozen=True)
class LoadSpec:
    """Everything that changes how a model is loaded. Requests with the same spec share one
    instance whatever their sampling options."""

    name: str
    path: Path
    n_ctx: int
    """Context per sequence."""
    n_gpu_layers: int = 0
    """Layers llama.cpp puts on the GPU (negative: all of them, llama.cpp's convention). In the
    manager's load key it is what was asked for; the runner gets the planner's number."""
    embedding: bool = False
    n_parallel: int = 1
    """Sequences generated at once (continuous batching when > 1)."""
    flash_attention: str = "auto"
    """llama.cpp's flash attention: "auto", "on" or "off" (MYLLM_FLASH_ATTENTION)."""
    projector: Path | None = None
    """A vision model's projector (its `mmproj` blob on this machine), for libmtmd; None: text only.
    The planner counts it on the GPU when `n_gpu_layers` is not 0 (runtime/placement/memory.py)."""
    pooling: int = POOLING_MEAN
    """How an embedding instance pools (llama.cpp's `llama_pooling_type`): the model's own for an
    embedding model that declares one (mean, CLS, last), rank for a reranker, and mean for any
    other model asked for embeddings."""
    draft_max: int = 0
    """Tokens a request may draft a step (speculative decoding, MYLLM_DRAFT_MAX): the context keeps
    this many logits rows more than one per sequence for verifying them; 0: no speculation."""
    rpc_servers: tuple[str, ...] = ()
    """llama.cpp RPC workers (`host:port`) that take the layers `n_gpu_layers` asks for instead of
    a local GPU (MYLLM_RPC_SERVERS, or the model's `rpc_servers`); empty: none."""
    rpc_layer_bytes: tuple[int, ...] = ()
    """Only in the runner's copy: the bytes k layers on the workers take, for each k the load
    allows (the planner's footprint), so the runner puts as many as the workers' free memory holds."""
    grammar_seconds: float = 1.0
    """CPU seconds a request's grammar may take for one token (MYLLM_GRAMMAR_TOKEN_MS; see
    `SamplerFactory.check_grammar` and `SlotOutput`)."""
    stream_interval: float = 0.0
    """Seconds a runner may hold streamed tokens before sending them (MYLLM_STREAM_INTERVAL_MS;
    engine/slots.py `Outbox`)."""
    draft: Path | None = None
    """The model's draft model (its GGUF blob on this machine; Modelfile `DRAFT`), loaded beside it
    on the CPU to draft for speculative decoding (runtime/engine/draft_model.py); None: prompt lookup."""

    def unpathed(self, error: object) -> str:
        """An error's text without the blob's absolute path (clients are not told where
        MYLLM_HOME is): the blob's own name stands for it."""
        text = str(error).replace(str(self.path), self.path.name)
        for extra in (self.projector, self.draft):
            if extra is not None:
                text = text.replace(str(extra), extra.name)
        return text

    @classmethod
    def for_model(
        cls, row: ModelRow, path: Path, num_ctx: int, n_gpu_layers: int = 0, embedding: bool = False,
        n_parallel: int = 1, flash_attention: str = "auto", projector: Path | None = None, draft_max: int = 0,
        name: str | None = None, rpc_servers: tuple[str, ...] = (),
        draft: Path | None = None, grammar_seconds: float = 1.0, stream_interval: float = 0.0,
    ) -> LoadSpec:
        """`path`: the model's blob on this machine. The context is `context_size(num_ctx)` (a multiple of llama.cpp's
        padding, so its size and llama-cpp-python's token buffer are the same), at most what the model was trained for."""
        ctx = context_size(num_ctx)
        if row.context_length:
            ctx = min(ctx, row.context_length)
        return cls(name or row.name, path, ctx, n_gpu_layers, embedding, 1 if embedding else n_parallel, flash_attention,
                   projector, pooling_of(row) if embedding else POOLING_MEAN, 0 if embedding else draft_max,
                   () if embedding else rpc_servers, draft=None if embedding else draft,
                   grammar_seconds=grammar_seconds, stream_interval=stream_interval)


@dataclass(frozen=True)
class Candidate:
    token_id: int
    text: str
    logprob: float

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


@dataclass(frozen=True)
class TokenEvent:
    """A piece of generated text. `text` may be "" when a token only completed part of a
    character or may start a stop string; such tokens still carry their probabilities."""

    text: str
    token_id: int
    logprob: float | None = None
    top: tuple[Candidate, ...] | None = None
    piece: str | None = None
    """The token's own text, present when probabilities were asked for."""
    thinking: str = ""
    """Thinking text this token completed, apart from the answer's `text` (a request with
    `Thinking` only)."""


@dataclass(frozen=True)
class Thinking:
    """How a request's output separates thinking from the answer (runtime/engine/thinking.py):
    the markers of the model's family, which the daemon takes from its chat template
    (runtime/request/template.py's `Markup`)."""

    open: str
    close: str
    answer: str
    """What follows `close` before the answer; past the budget the engine writes both."""
    headers: tuple[str, ...] = ()
    """Markup outside the section that is not answer text (gpt-oss's message headers): dropped."""
    started: bool = False
    """The prompt opened the section (its template ends with `open`): the output starts inside it."""
    budget: int | None = None
    """Tokens of thinking after which the engine writes `closing` itself, so the model answers."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple(self.headers))  # a list, once it crossed the runner channel

    @property
    def closing(self) -> str:
        """What the engine writes when the budget is spent."""
        return self.close + self.answer


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str
    """`stop` (end of turn or a stop string), `length` (max_tokens or context), `cancelled`."""
    text: str
    prompt_tokens: int
    prompt_eval_tokens: int
    """Prompt tokens actually evaluated; fewer than `prompt_tokens` when a cached prefix was reused."""
    completion_tokens: int
    prompt_ms: float
    generation_ms: float
    stop_sequence: str | None = None
    """The stop string that ended the text when one did (a request's `stop` or the template's
    end-of-turn text): Anthropic's API reports which of the caller's sequences it was."""
    thinking: str = ""
    """All the thinking, apart from `text` (a request with `Thinking` only)."""
    thinking_tokens: int = 0
    """Of `completion_tokens`, those written inside the reasoning section (OpenAI's
    `reasoning_tokens`)."""
    draft_tokens: int = 0
    """Tokens speculative decoding drafted (runtime/engine/speculative.py): 0 without it."""
    draft_accepted: int = 0
    """Of `draft_tokens`, those the model's own sampling picked (each saved a decode step)."""


Event = TokenEvent | DoneEvent


@dataclass(frozen=True)
class Failed:
    """A request's last event when it failed (the error says why); a `DoneEvent` is the last
    event of every other request, cancelled ones included. Made by an engine, written to the
    channel by its runner (runtime/runner/protocol.py), which the daemon reads as the error itself."""

    error: BaseException


class SamplingOptions(Protocol):
    """What the engines read of a request's options. On the daemon's side and in-process it is
    the request's `GenerationOptions` (runtime/request/options.py, where every range is checked);
    in a runner it is `protocol.RunnerOptions`, plain values that crossed the channel already
    checked, so a runner loads neither pydantic nor the options' model."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repeat_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop(self) -> tuple[str, ...]: ...
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def logprobs(self) -> int | None: ...
    @property
    def draft_max(self) -> int | None: ...


@dataclass(frozen=True)
class DecodedImage:
    """An image a client sent, decoded to raw pixels before it crosses to a runner
    (runtime/request/images.py), so a runner never parses a client's file format."""

    digest: str
    """The sha256 (hex) of the bytes the client sent: the image's identity (libmtmd's bitmap id,
    the KV cache's placeholders, a session's stored blob)."""
    width: int
    height: int
    rgb: bytes = field(repr=False)
    """`width * height` pixels, 3 bytes each (R, G, B), row after row (megabytes: kept out of reprs)."""


@dataclass(frozen=True)
class PromptImage:
    """An image's place in a prompt: it goes before `tokens[at]` (`at == len(tokens)`: after
    the last one). The text on either side is tokenized apart, as libmtmd tokenizes the text
    between its media markers."""

    at: int
    image: DecodedImage


SOURCE_CHARS = 8192
"""Characters of prompt text up to which the daemon sends text for the runner to tokenize with
the request (`PromptSource`) instead of tokenizing it first: a runner tokenizes that much on
its main thread, in well under a millisecond."""


@dataclass(frozen=True)
class PromptSource:
    """A prompt the runner tokenizes itself when the request arrives, so that a request is one
    message to the runner, not a tokenizing call's round trip and then the request: that round
    trip (0.5-1.5 ms on a busy 2-core machine, where the daemon waits for the runner's main
    thread) lay on every request's way to its first token. `units` as
    `Vocabulary.tokenize_units` takes them (a rendered conversation), or `raw`: one text whose
    special tokens are parsed (a raw completion). A prompt of more than `budget` tokens is
    refused with `PromptTooLong` before it goes in (a conversation that must be trimmed then
    takes the daemon's own path)."""

    units: list[list[tuple[str, bool]]] | None
    """Each part: text, and whether special tokens in it are parsed (markup yes, message text no)."""
    raw: str | None
    budget: int


@dataclass(frozen=True)
class Started:
    """A request given as a `PromptSource` went in: its prompt's tokens (the first event)."""

    prompt_tokens: int


AdapterSet = tuple[tuple[str, float], ...]
"""LoRA adapters a generation runs with: each adapter file's path on the runner's machine and
its scale, in the model's order, none at scale 0 (engine/adapters.py)."""


@dataclass
class GenerationRequest:
    tokens: list[int]
    """Empty while `source` is set: the runner fills it in."""
    options: SamplingOptions
    extra_stop: tuple[str, ...] = ()
    grammar: str | None = None
    """GBNF the output must follow (see runtime/request/grammar.py)."""
    thinking: Thinking | None = None
    """Set for a thinking model asked to think: its output is split (and budgeted)."""
    images: tuple[PromptImage, ...] = ()
    """Images among `tokens`, in order (a model loaded with a projector only). Each becomes
    the tokens its projector makes of it; the prompt's count and context include them."""
    source: PromptSource | None = None
    """The prompt's text, when the runner tokenizes it (no images then)."""
    adapters: AdapterSet = ()
    """The LoRA adapters to generate with (none: the base model)."""


def check_prompt(tokens: list[int], n_ctx: int) -> None:
    """A prompt must have a token and leave room for one more in a sequence's context."""
    if not tokens:
        raise InvalidOptions("the prompt is empty", field="prompt")
    if len(tokens) >= n_ctx:
        raise PromptTooLong(len(tokens), n_ctx)


CHARS_PER_TOKEN_BOUND = 16
"""More characters per token than any real text averages (English runs at about four)."""


def bounded_tokens(tokenize: Callable[[str], list[int]], text: str, limit: int) -> list[int] | None:
    """The tokens of `text`, or None when it is far longer than `limit` tokens could be and
    the head of it alone has more (a 4 MB prompt takes 30 s and ~900 MB to tokenize; its head
    answers at once). A list longer than `limit` is over too, by that many."""
    head = max(limit, 1) * CHARS_PER_TOKEN_BOUND
    if len(text) > head and len(tokenize(text[:head])) > limit:
        return None
    return tokenize(text)


def joined_units(units: list[list[int] | None], n_ctx: int) -> list[int]:
    """A prompt's tokens from its units' (`tokenize_units`): a unit left untokenized (None)
    means the whole cannot fit the context. Both sides join them: the daemon when it tokenized
    the prompt itself, the runner when the prompt came with its request (`PromptSource`)."""
    if any(unit is None for unit in units):
        raise PromptTooLong(n_ctx, n_ctx, at_least=True)
    return [token for unit in units if unit is not None for token in unit]


def check_token_ids(tokens: list[int], n_vocab: int) -> None:
    """Token ids a client sent must be in the vocabulary: llama.cpp aborts on any other."""
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidOptions(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})", field="input")
