"""What the daemon needs from a loaded model instance, whatever runs it: the typed boundary
between choosing and holding a model (placement/), building and running a request (request/,
service.py) and the process that computes (runner/client.py's `ModelRunner`, or a pure-logic
test's fake).

Protocols only, importing no runner client and no engine, so every side is typed against this
module alone. Each consumer asks for what it uses: prompt building a `Tokenizer`, the model manager
a `PlacedRunner` (memory, health, the end of it), the runtime the whole `Runner`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from myllm.errors import MyLLMError
from myllm.runtime.engine_types import DecodedImage, Event, GenerationRequest

RunnerStats = dict[str, int]
"""A runner's figures about itself (resident memory, tokens decoded, saved KV states and
bytes...): counts and bytes, so a model's instances add up."""


class Tokenizer(Protocol):
    """What building a prompt needs: the model's tokenizer and its context."""

    @property
    def n_ctx(self) -> int:
        """Tokens a sequence's context holds."""
        ...

    async def tokenize(self, text: str) -> list[int]:
        """`text`'s tokens, special tokens in it parsed (a raw prompt)."""
        ...

    async def tokenize_units(self, units: list[list[tuple[str, bool]]], limit: int) -> list[list[int] | None]:
        """Each unit's tokens (a unit: pieces of text, each with whether its special tokens
        are parsed); None for the early units that cannot fit beside the later ones in `limit`."""
        ...


class EventStream(Protocol):
    """One request's events: `TokenEvent`s then one `DoneEvent`, or an error raised instead."""

    async def __anext__(self) -> Event:
        """The next event (`StopAsyncIteration` after the `DoneEvent`)."""
        ...

    async def started(self) -> int:
        """For a request sent with a `PromptSource`: its prompt's tokens once it went in; the
        error that kept it out is raised here."""
        ...

    async def aclose(self) -> None:
        """Stop early: the request is cancelled where it runs (within one step)."""
        ...


ExitHandler = Callable[["PlacedRunner", MyLLMError], None]
"""Told of a runner's end it did not ask for (a crash, running out of memory): the runner, and
the error its requests failed with."""


class PlacedRunner(Protocol):
    """What the model manager needs of an instance it placed: the memory it holds, whether it is
    in use, its health, and how to end it."""

    on_exit: ExitHandler | None
    """Set by the manager: told when the runner dies on its own (not when closed)."""
    on_out_of_memory: ExitHandler | None
    """Set by the manager: told (once) when llama.cpp ran out of memory while generating."""

    @property
    def pid(self) -> int | None:
        """Its process, if it has one."""
        ...

    @property
    def rss_before(self) -> int:
        """Its resident memory before the model loaded."""
        ...

    @property
    def rss_after(self) -> int:
        """Its resident memory once the model had loaded."""
        ...

    @property
    def vram_used(self) -> int:
        """GPU memory its load took (0 on the CPU)."""
        ...

    @property
    def attention_cliff(self) -> float | None:
        """What its load measured of the CPU's attention paths (`RunnerConfig.attention_cliff`),
        for the next load of the same model; None where attention does not run on the CPU."""
        ...

    @property
    def busy(self) -> bool:
        """Whether a request or a call is running or waiting on it."""
        ...

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        ...

    @property
    def generating(self) -> int:
        """Sequences generating now (at most the model's slots)."""
        ...

    def rss(self) -> int:
        """Its resident memory now (0 once it has exited)."""
        ...

    async def health(self, timeout: float, stall_limit: float) -> str | None:
        """What is wrong with it (no answer within `timeout`, a step running longer than
        `stall_limit` seconds...), or None."""
        ...

    async def stats(self) -> RunnerStats:
        """Its own figures."""
        ...

    def abort(self, error: MyLLMError) -> None:
        """Fail every running and queued request now with `error`."""
        ...

    def kill(self, reason: str) -> None:
        """End it now; its end is reported (`on_exit`) as a crash naming `reason`."""
        ...

    async def close(self) -> None:
        """End it and wait: what runs on it fails with `ShuttingDown`; `on_exit` is not told."""
        ...


class Runner(PlacedRunner, Tokenizer, Protocol):
    """A loaded instance as a request uses it: placed by the manager, tokenizing prompts, and
    counting, checking a grammar, generating, embedding."""

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Each text's token count."""
        ...

    async def check_grammar(self, grammar: str) -> None:
        """`InvalidOptions` unless llama.cpp accepts `grammar` (GBNF) at a bearable cost."""
        ...

    def generate(self, req: GenerationRequest) -> EventStream:
        """Start generating. Admission is decided here (`Overloaded`, `ShuttingDown`), so a
        refusal comes before any stream does."""
        ...

    async def embed(self, inputs: list[str | list[int]], truncate: bool = False) -> tuple[list[list[float]], int]:
        """One vector per input (a text, or token ids), and the tokens they took."""
        ...

    async def rerank(self, query: str, documents: list[str], truncate: bool = False) -> tuple[list[float], int]:
        """A reranker's score per query-document pair, and the tokens they took."""
        ...

    async def image_positions(self, images: list[DecodedImage]) -> list[int]:
        """The prompt positions each image takes on a vision model."""
        ...
