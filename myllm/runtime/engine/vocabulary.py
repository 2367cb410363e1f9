"""A generation model's vocabulary: text to tokens (prompts, a conversation's units, counts) and
tokens to text, for the batch engine and for the runner's calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

from myllm.errors import PromptTooLong
from myllm.runtime.engine.lifetime import UseGuard
from myllm.runtime.engine_types import PromptSource, bounded_tokens, check_token_ids, joined_units

if TYPE_CHECKING:
    from llama_cpp import llama_vocab_p
    from llama_cpp._internals import LlamaModel


class Vocabulary:
    """Tokenizing reads only the vocabulary, so it runs on callers' threads while the scheduler
    decodes (as in llama-server and llama-cpp-python's `Llama`), each call inside the engine's
    `guard` so that closing never frees the model under it. `token_bytes` and `piece` run on
    the scheduler thread, the one that frees the model, and need no guard."""

    def __init__(self, model: LlamaModel, guard: UseGuard, n_ctx: int) -> None:
        self._model = model
        self._guard = guard
        self._n_ctx = n_ctx
        self.pointer: llama_vocab_p = model.vocab
        """llama.cpp's vocabulary, for its calls that take one (grammars, end of generation)."""
        self.n_vocab = model.n_vocab()
        bos = model.token_bos()
        self.bos_text = self.piece(bos) if bos >= 0 else ""

    def token_bytes(self, token: int) -> bytes:
        return self._model.detokenize([token], special=True)

    def piece(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", "replace")

    def _tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        with self._guard.use():
            return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def _bounded(self, text: str, add_bos: bool, special: bool, limit: int) -> list[int] | None:
        return bounded_tokens(lambda t: self._tokenize(t, add_bos, special), text, limit)

    def _bos_for(self, text: str) -> bool:
        """A BOS is added when the model wants one and the text does not already start with it."""
        return not (self.bos_text and text.startswith(self.bos_text))

    def markup(self, text: str) -> list[int]:
        """Tokens of a short piece of the model's markup the engine writes itself (a thinking
        section's closing marker): special tokens parsed, no BOS."""
        return self._tokenize(text, False, True)

    def tokenize(self, text: str) -> list[int]:
        """A raw prompt's tokens: special tokens in it are parsed, as a raw completion means the
        caller wrote the model's markup itself. One that cannot fit the context is refused
        without tokenizing all of it."""
        tokens = self._bounded(text, self._bos_for(text), True, self._n_ctx)
        if tokens is None:
            raise PromptTooLong(self._n_ctx, self._n_ctx, at_least=True)
        return tokens  # check_prompt refuses one that is just over, with its exact count

    def tokenize_units(self, units: list[list[tuple[str, bool]]], limit: int) -> list[list[int] | None]:
        """Each unit's tokens (see `RenderedPrompt.units`), the last unit first, until `limit`
        tokens are reached: earlier units are None, since they cannot fit beside the later ones
        (a conversation far past the context costs only what fits of it). A part's flag says
        whether special tokens in it are parsed: the template's markup yes, message text no, so
        a message cannot forge a turn. The first unit starts with BOS when the model wants one."""
        first = next((text for unit in units for text, _ in unit), "")
        bos = self._tokenize("", True, False) if self._bos_for(first) else []
        out: list[list[int] | None] = [None] * len(units)
        left = limit
        for i in range(len(units) - 1, -1, -1):
            tokens: list[int] = bos if i == 0 else []
            for text, special in units[i]:
                part = self._bounded(text, False, special, left - len(tokens))
                if part is None or len(part) > left - len(tokens):
                    return out
                tokens = tokens + part
            out[i] = tokens
            left -= len(tokens)
        return out

    def prompt(self, source: PromptSource) -> list[int]:
        """A `PromptSource`'s tokens, as the daemon would have had them tokenized: a raw text
        with `tokenize`, units with `tokenize_units` joined. More than its budget is
        `PromptTooLong` (with the count when all of it was tokenized)."""
        if source.raw is not None:
            tokens = self.tokenize(source.raw)
        else:
            tokens = joined_units(self.tokenize_units(source.units or [], self._n_ctx), self._n_ctx)
        if len(tokens) > source.budget:
            raise PromptTooLong(len(tokens), self._n_ctx)
        return tokens

    def count_tokens(self, text: str) -> int:
        """Tokens of a message's text on its own (no BOS, special tokens as text), at most the
        context (a longer text cannot be part of a prompt anyway)."""
        tokens = self._bounded(text, False, False, self._n_ctx)
        return self._n_ctx if tokens is None else min(len(tokens), self._n_ctx)

    def detokenize(self, tokens: list[int]) -> str:
        """Text of token ids; ids outside the vocabulary are an error (llama.cpp would abort)."""
        check_token_ids(tokens, self.n_vocab)
        with self._guard.use():
            return self._model.detokenize(tokens, special=False).decode("utf-8", "replace")
