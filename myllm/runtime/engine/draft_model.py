"""Speculative decoding with a draft model: a smaller model of the same vocabulary, loaded beside
the base model in the same runner, proposes each speculating slot's next tokens greedily, and the
base model verifies them in its step's batch (speculative.py, slots.py `SlotOutput.sample`).

A greedy draft is deterministic given the history, so the verification that prompt lookup uses is
exact for it too: every emitted token is the request's own sampler's pick, at any temperature.

The draft model has its own llama.cpp context with a sequence per slot, the base's context size
each, on the CPU (its weights and KV are counted in RAM by runtime/placement/memory.py). Each
sequence's KV follows its slot's history lazily: when a slot next drafts, the draft sequence
drops what no longer matches (rejected draft tokens, another conversation) and evaluates what it
has not seen. All the step's speculating slots draft together (`prepare`): their catch-up
tokens share decodes, then one decode per draft position serves every slot still drafting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from myllm.errors import ModelLoadError
from myllm.runtime.engine.kvcache import common_prefix
from myllm.runtime.engine.loaded_model import N_BATCH, LoadedModel
from myllm.runtime.engine.slots import Slot, logits_row
from myllm.runtime.engine_types import LoadSpec

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaModel


def check_vocabulary(base: LlamaModel, draft: LlamaModel, name: str) -> None:
    """A draft model must tokenize as the base does: the same number of tokens, the same special
    tokens and the same text for each token, else its drafts are other tokens than it means and
    none would be accepted (or worse, ids past the base's vocabulary). `ModelLoadError` else."""
    problems = []
    if base.n_vocab() != draft.n_vocab():
        problems.append(f"{draft.n_vocab()} tokens, the model {base.n_vocab()}")
    else:
        for what, a, b in (("BOS", base.token_bos(), draft.token_bos()), ("EOS", base.token_eos(), draft.token_eos())):
            if a != b:
                problems.append(f"{what} token {b}, the model {a}")
        if not problems:
            import llama_cpp

            text = llama_cpp.llama_vocab_get_text
            differs = next((i for i in range(base.n_vocab()) if text(base.vocab, i) != text(draft.vocab, i)), None)
            if differs is not None:
                problems.append(f"token {differs} is {text(draft.vocab, differs)!r}, the model's "
                                f"{text(base.vocab, differs)!r}")
    if problems:
        raise ModelLoadError(f"the draft model of '{name}' has another vocabulary ({'; '.join(problems)}): a draft "
                             "model must share its model's tokenizer")


class DraftModels:
    """The draft model of a loaded model: its llama.cpp objects and, per sequence (one per slot),
    the tokens its KV holds. Made, used and freed by the engine's scheduler thread."""

    def __init__(self, loaded: LoadedModel, n_parallel: int) -> None:
        self._loaded = loaded
        self._lib, self._ctx, self._batch = loaded.lib, loaded.ctx.ctx, loaded.batch.batch
        self._memory = loaded.lib.llama_get_memory(self._ctx)
        self._vocab = loaded.model.vocab
        self._n_vocab = loaded.model.n_vocab()
        self._cached: list[list[int]] = [[] for _ in range(n_parallel)]
        """Per sequence, the tokens whose KV the draft context holds."""
        self._ready: dict[int, tuple[int, list[int]]] = {}
        """Per sequence, this step's draft from `prepare` and the history length it follows."""
        self.decodes = 0
        """Draft decodes so far (for tests and benches: batching shows as fewer decodes)."""

    @classmethod
    def load(cls, spec: LoadSpec, base: LlamaModel, n_threads: int | None, quiet: bool) -> DraftModels:
        """The draft of `spec` (`spec.draft`), on the CPU, checked against the `base` model's vocabulary."""
        assert spec.draft is not None
        if not spec.draft.is_file():
            raise ModelLoadError(f"the draft model file of '{spec.name}' is missing (blob {spec.draft.name}); pull it again")
        draft_spec = replace(spec, name=f"{spec.name}'s draft", path=spec.draft, n_gpu_layers=0, projector=None,
                             draft=None, draft_max=0)
        loaded = LoadedModel.load(draft_spec, n_threads, quiet)
        try:
            check_vocabulary(base, loaded.model, spec.name)
        except BaseException:
            loaded.close()
            raise
        return cls(loaded, spec.n_parallel)

    def drafter(self, seq: int) -> SequenceDrafter:
        """The drafter of a request in sequence `seq` (speculative.py's `Drafter`)."""
        return SequenceDrafter(self, seq)

    def prepare(self, slots: list[Slot], rows: int, budget: int) -> None:
        """Draft for every slot of this step that will ask, all in the same decodes, with the room
        the scheduler's `_draft` will give each (its step's logits `rows` and `budget` of batch
        tokens, taken by decoding slots in this order): their `propose` then returns these."""
        wanted: list[tuple[int, list[int], int]] = []
        for slot in sorted(slots, key=lambda s: len(s.pending) > 1):
            if len(slot.pending) != 1:
                break
            speculation = slot.speculation
            n = 0
            if speculation is not None and isinstance(speculation.drafter, SequenceDrafter):
                n = max(0, min(speculation.n, rows, budget - 1, slot.limit - slot.count - 1))
                if n:
                    wanted.append((slot.seq, slot.cached + slot.pending, n))
            rows, budget = rows - n, budget - 1 - n
        drafts = self.draft(wanted)
        self._ready = {seq: (len(history), draft) for (seq, history, _), draft in zip(wanted, drafts, strict=True)}

    def propose(self, seq: int, history: Sequence[int], n: int) -> list[int]:
        """Sequence `seq`'s draft of at most `n` tokens: `prepare`'s when it drafted for this
        history, else drafted now."""
        ready = self._ready.pop(seq, None)
        if ready is not None and ready[0] == len(history):
            return ready[1][:n]
        return self.draft([(seq, list(history), n)])[0] if n > 0 else []

    def draft(self, wanted: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """Greedy drafts of up to n tokens after each (sequence, history, n), one decode per draft
        position for all of them (after their catch-up's); a draft ends early at the end of
        generation (the base model would end there too, or the draft is wrong)."""
        firsts = self._catch_up([(seq, history) for seq, history, _ in wanted])
        drafts = [[token] if not self._is_eog(token) else [] for token in firsts]
        going = [i for i, (_, _, n) in enumerate(wanted) if drafts[i] and n > 1]
        while going:
            self._batch.n_tokens = 0
            for i in going:
                self._add(wanted[i][0], drafts[i][-1], logits=True)
            rows = self._decode()
            still = []
            for row, i in enumerate(going):
                token = self._argmax(rows[row])
                if not self._is_eog(token):
                    drafts[i].append(token)
                    if len(drafts[i]) < wanted[i][2]:
                        still.append(i)
            going = still
        return [draft[:n] for draft, (_, _, n) in zip(drafts, wanted, strict=True)]

    def _catch_up(self, wanted: list[tuple[int, list[int]]]) -> list[int]:
        """Bring each sequence's KV to its history (dropping what differs, evaluating what is
        missing, the last token always, for its logits) and return each one's next greedy token."""
        todo: list[tuple[int, int, bool]] = []  # (index, token, last of its history)
        for index, (seq, history) in enumerate(wanted):
            cached = self._cached[seq]
            keep = min(common_prefix(cached, history), len(history) - 1)
            if keep < len(cached):
                self._lib.llama_memory_seq_rm(self._memory, seq, keep, -1)
                del cached[keep:]
            todo += [(index, token, i == len(history) - 1) for i, token in enumerate(history[keep:], keep)]
        firsts = [0] * len(wanted)
        for start in range(0, len(todo), N_BATCH):
            chunk = todo[start : start + N_BATCH]
            self._batch.n_tokens = 0
            for index, token, last in chunk:
                self._add(wanted[index][0], token, logits=last)
            indices = [index for index, _, last in chunk if last]
            for index, row in zip(indices, self._decode(), strict=True):
                firsts[index] = self._argmax(row)
        return firsts

    def _add(self, seq: int, token: int, logits: bool) -> None:
        batch, j = self._batch, self._batch.n_tokens
        batch.token[j] = token
        batch.pos[j] = len(self._cached[seq])
        batch.seq_id[j][0] = seq
        batch.n_seq_id[j] = 1
        batch.logits[j] = logits
        batch.n_tokens += 1
        self._cached[seq].append(token)

    def _decode(self) -> list[int]:
        """Decode the batch; the batch positions of its logits rows, in order."""
        status = self._lib.llama_decode(self._ctx, self._batch)
        if status != 0:  # what the KV holds is unknown now: start every sequence again
            self._lib.llama_memory_clear(self._memory, True)
            self._cached = [[] for _ in self._cached]
            raise ModelLoadError(f"the draft model failed while drafting (llama_decode returned {status})")
        self.decodes += 1
        return [j for j in range(self._batch.n_tokens) if self._batch.logits[j]]

    def _argmax(self, index: int) -> int:
        return int(np.argmax(logits_row(self._lib, self._ctx, index, self._n_vocab)))

    def _is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def close(self) -> None:
        self._loaded.close()


class SequenceDrafter:
    """A request's `Drafter` when its model has a draft model: that model's drafts for its slot's
    sequence."""

    def __init__(self, models: DraftModels, seq: int) -> None:
        self._models, self._seq = models, seq

    def propose(self, history: Sequence[int], n: int) -> list[int]:
        return self._models.propose(self._seq, history, n)

