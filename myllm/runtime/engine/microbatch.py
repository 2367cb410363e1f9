"""What llama.cpp does with a step's batch, and the choices the scheduler makes because of it.

llama.cpp cuts each `llama_decode` batch into micro-batches. With a KV stream per sequence
(`kv_unified = false`, ours, for speed when prompts differ) a micro-batch takes a run of
*consecutive* sequence ids, found in batch order, and the same number of tokens from each
(`llama_batch_allocr::split_equal`, sequential). Each micro-batch is a pass over the weights.
Two consequences, measured with SmolLM2 on this project's 2-core CPU (bench/, issue 30):

- Busy sequences that are not one consecutive run cost a pass more every step: two sequences
  decoding take 13.0 ms a step as ids 0 and 1, 16.2 ms as 0 and 2. `contiguous` lets the slot
  choice prefer a slot that keeps the run whole (`SPLIT_COST`).
- On a CPU, flash attention for fewer than 64 query rows of one sequence takes ggml's per-row
  path (ggml-cpu ops.cpp, `GGML_FA_TILE_Q`). On the Intel CPU with AMX this was measured on, it
  is about eight times costlier per KV cell than the tiled path it takes from 64 rows on: behind
  a 2,048-token conversation, 16 new tokens take 376 ms, 63 take 1,458 ms and 64 take 320 ms;
  behind 512, 16 take 129 ms and 64 take 203 ms; with no conversation before them 63 take 178 ms
  and 64 take 162 ms. An agent's next turn, a few dozen tokens after a long cached history, is
  the worst case. `CpuAttention` evaluates the last cached tokens again so that a short prompt
  reaches the tiled path when that costs less, and puts one prompt chunk in a step, cut so that
  no piece falls below it. On an AMD EPYC (Zen 5) the two paths cost nearly the same (behind
  2,048: 16 rows 101 ms, 27 rows 167, 63 rows 364, 64 rows 306), and padding a 27-token turn
  to 65 rows doubled its time; so the cliff is measured when a model loads (`measure_cliff`),
  and without one the engine evaluates only a prompt's new tokens, as llama-server does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TILE_ROWS = 64
"""ggml's CPU flash-attention tile (`GGML_FA_TILE_Q`): from this many query rows of one sequence
in a micro-batch on, attention takes the tiled path."""

ROWS = TILE_ROWS + 1
"""Rows a padded prompt chunk gets: the first of them may go to the micro-batch it shares with
the decoding sequences (one token from each), the rest must still fill a tile."""

TILE_GAIN = 8
"""How much cheaper per KV cell a tiled row's attention is than a per-row one (measured: 22.7 ms
against 2.8 ms a row behind 2,048 cells, the cost of an empty context taken off both)."""

ROW_EFFICIENCY = 13.8
"""How much slower per multiply-add the per-row attention runs than the weights' products: with
it, `CpuAttention.for_model` finds from a model's shape the context length at which a row's
attention costs as much as the rest of its evaluation (282 tokens measured for SmolLM2, whose
shape gives 3,891 without it)."""

SPLIT_COST = 16.0
"""What breaking the busy sequences' consecutive run costs, in prompt tokens to evaluate: a pass
more over the weights every step the request decodes (a quarter of a SmolLM2 decode step, so
about 16 steps' worth over a 64-token answer)."""


CLIFF_CONTEXT = 128
"""Cached cells behind the rows `measure_cliff` times: enough for attention to weigh (at 128 a
per-row row measures 1.1 tiled ones on the EPYC; the AMX CPU's figures above put it near 1.5,
not measured there at 128), little enough to take about a third of a second on 2 cores."""

CLIFF_ROWS = 32
"""Rows on the per-row path that `measure_cliff` times."""

CLIFF_MIN = 1.3
"""A per-row row costing less than this many tiled ones at `CLIFF_CONTEXT`: no cliff worth
evaluating tokens again for."""


def measure_cliff(lib: Any, context: Any, batch: Any, seq: int = 0) -> float:
    """How much a row costs on the per-row path against the tiled one, behind `CLIFF_CONTEXT`
    cells of sequence `seq` (empty, as at load; emptied again after): the least of two timings
    of each, so one preempted evaluation does not decide. `context`, `batch`: llama-cpp-python's
    `LlamaContext` and `LlamaBatch`.

    The context goes in `TILE_ROWS` rows at a time, no batch larger than the timed ones: a
    batch's rows decide how much of llama.cpp's compute buffer it writes, and a page written
    once stays in the runner's memory. Evaluated whole, the 128 rows left SmolLM2's runner
    1.7 MB larger than its traffic of short prompts ever made it."""
    raw = batch.batch

    def evaluate(start: int, n: int) -> float:
        raw.n_tokens = n
        for i in range(n):
            raw.token[i], raw.pos[i], raw.seq_id[i][0], raw.n_seq_id[i], raw.logits[i] = 1 + i % 64, start + i, seq, 1, 0
        raw.logits[n - 1] = 1
        began = time.perf_counter()
        status = lib.llama_decode(context.ctx, raw)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} while measuring attention")
        return time.perf_counter() - began

    def after_context(n: int) -> float:
        took = evaluate(CLIFF_CONTEXT, n)
        context.kv_cache_seq_rm(seq, CLIFF_CONTEXT, -1)
        return took

    try:
        for start in range(0, CLIFF_CONTEXT, TILE_ROWS):
            evaluate(start, min(TILE_ROWS, CLIFF_CONTEXT - start))
        per_row = min(after_context(CLIFF_ROWS) for _ in range(2)) / CLIFF_ROWS
        tiled = min(after_context(TILE_ROWS) for _ in range(2)) / TILE_ROWS
    finally:
        context.kv_cache_seq_rm(seq, 0, -1)
    return per_row / tiled


def contiguous(seqs: Iterable[int]) -> bool:
    """Whether these sequence ids are one consecutive run (one micro-batch when all decode)."""
    ids = set(seqs)
    return not ids or max(ids) - min(ids) + 1 == len(ids)


@dataclass(frozen=True)
class CpuAttention:
    """The cost of evaluating a sequence's prompt rows when attention runs on the CPU."""

    balance: float
    """The context length at which one row's per-row attention costs as much as the rest of
    evaluating it (the weights' products)."""

    @classmethod
    def on_cpu(cls, lib: Any, model: Any, n_gpu_layers: int, flash_attention: str,
               cliff: Callable[[], float]) -> CpuAttention | None:
        """The model's cost model when its attention runs on the CPU (no layer offloaded, or a
        llama.cpp without GPU support) with flash attention (llama.cpp's `auto` turns it on
        there) and this CPU's per-row path is costlier than its tiled one (`cliff()`, measured:
        see `measure_cliff`); None on a GPU, without flash attention (with it off, 63 rows
        behind 2,048 cells take 302 ms and 64 take 309) or without a cliff."""
        if flash_attention == "off" or (n_gpu_layers and lib.llama_supports_gpu_offload()):
            return None
        ratio = cliff()
        log.info("a per-row attention row costs %.2f tiled rows here: %s", ratio,
                 "short prompts behind long ones evaluate a tile" if ratio >= CLIFF_MIN else "no padding")
        if ratio < CLIFF_MIN:
            return None
        return cls.for_model(lib.llama_model_n_params(model), lib.llama_model_n_layer(model), lib.llama_model_n_embd(model))

    @classmethod
    def for_model(cls, n_params: int, n_layer: int, n_embd: int) -> CpuAttention:
        """From the model's shape: a row's products take 2 multiply-adds per parameter, and its
        attention 4 per layer, query dimension and KV cell (scores and values)."""
        return cls(n_params / (2 * n_layer * max(n_embd, 1)) / ROW_EFFICIENCY)

    def worth_padding(self, rows: int, context: int) -> bool:
        """Whether `ROWS` rows on the tiled path cost less than `rows` on the per-row path,
        after `context` cached tokens."""
        return rows * (self.balance + context) > ROWS * (self.balance + context / TILE_GAIN)

    def start(self, keep: int, total: int) -> int:
        """Where to start evaluating a `total`-token prompt of which the sequence holds the
        first `keep`: earlier than `keep` when evaluating up to `ROWS` tokens is cheaper."""
        rows = total - keep
        if rows >= ROWS or total < ROWS or not self.worth_padding(rows, keep):
            return keep
        return total - ROWS

    @staticmethod
    def take(pending: int, budget: int) -> int:
        """How many of a prompt's `pending` tokens go into this step, within `budget`: never
        leave fewer than `ROWS` for a later step, which would then take the per-row path."""
        take = min(pending, budget)
        if 0 < pending - take < ROWS and take > ROWS:
            take = max(ROWS, pending - ROWS)
        return take
