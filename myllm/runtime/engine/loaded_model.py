"""Loading a model for the batch engine: llama.cpp's model, one context holding a sequence per
slot, the one batch every step fills, and the model's projector when it takes images
(runtime/engine/media.py). Made, used and freed by one thread, the scheduler's (see
`BatchEngine`)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from myllm.errors import ModelLoadError, OutOfMemory
from myllm.runtime.engine.llama_setup import avoid_broken_weight_buffers, default_threads
from myllm.runtime.engine.media import Projector
from myllm.runtime.engine.rpc import Workers
from myllm.runtime.engine_types import LoadSpec

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

N_BATCH = 512
"""Tokens one step decodes at most, all sequences together (llama.cpp's batch and micro-batch)."""

FLASH_ATTENTION = {"auto": -1, "off": 0, "on": 1}
"""MYLLM_FLASH_ATTENTION's values as llama.cpp's `llama_flash_attn_type`."""


def output_rows(spec: LoadSpec) -> int:
    """Rows of logits one step may ask for: one per sequence, and a draft's (shared by the
    sequences speculating in the step: prompt lookup drafts only when a request copies). With a
    draft model every request drafts, so every sequence gets a draft's rows."""
    return spec.n_parallel + spec.draft_max * (spec.n_parallel if spec.draft is not None else 1)


@dataclass(frozen=True)
class LoadedModel:
    lib: ModuleType
    """llama_cpp, for the calls the engine makes on these objects' pointers."""
    model: LlamaModel
    ctx: LlamaContext
    batch: LlamaBatch
    devices: ctypes.Array[ctypes.c_void_p] | None
    """The device list given to llama.cpp when not its default one (none for a model with no
    layer on a GPU, the RPC workers' for one spread over them): it must outlive the model."""
    projector: Projector | None
    """libmtmd's context for a model loaded with a projector (`LoadSpec.projector`)."""

    @classmethod
    def load(cls, spec: LoadSpec, n_threads: int | None, quiet: bool) -> LoadedModel:
        """`quiet` silences what llama.cpp prints while loading."""
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._utils import suppress_stdout_stderr

        avoid_broken_weight_buffers()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = spec.n_gpu_layers
        devices = None
        if spec.rpc_servers:
            workers = Workers.connect(spec.rpc_servers, spec.rpc_layer_bytes, spec.name)
            devices, model_params.n_gpu_layers = workers.devices, workers.layers
            model_params.devices = ctypes.addressof(devices)
        elif spec.n_gpu_layers == 0:
            # No layer on a GPU means no GPU at all: an empty device list (just its NULL end),
            # else llama.cpp still makes a GPU backend for the context, which holds a CUDA
            # context and runs large CPU-weight products there ("op offload"), GPU memory the
            # budget does not count. The array must outlive the model: kept beside it.
            devices = (ctypes.c_void_p * 1)()
            model_params.devices = ctypes.addressof(devices)
        try:
            with suppress_stdout_stderr(disable=not quiet):
                model = internals.LlamaModel(path_model=str(spec.path), params=model_params, verbose=not quiet)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load '{spec.name}': {spec.unpathed(exc)}") from exc
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = spec.n_ctx * spec.n_parallel
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = spec.n_parallel
        # At most one row of logits per sequence per step, and `draft_max` more for verifying a
        # speculative draft (speculative.py): llama.cpp's default (one per batch token) reserves
        # the output buffer and compute buffers for 512 rows of the vocabulary, 96 MiB for
        # SmolLM2's and 512 MiB for Gemma 3's, GPU memory when the output layer is offloaded;
        # each row kept costs about 0.2 MiB for SmolLM2 and 1 MiB for Gemma 3.
        params.n_outputs_max = output_rows(spec)
        n_threads = params.n_threads = params.n_threads_batch = n_threads or default_threads()
        params.kv_unified = False  # each sequence its own n_ctx cells: faster when prompts differ
        params.flash_attn_type = FLASH_ATTENTION[spec.flash_attention]
        params.swa_full = True  # keep sliding-window models' KV whole, so prefixes can be reused
        try:
            with suppress_stdout_stderr(disable=not quiet):
                ctx = internals.LlamaContext(model=model, params=params, verbose=not quiet)
        except ValueError as exc:
            model.close()
            raise OutOfMemory(f"llama.cpp could not allocate a context for '{spec.name}': {spec.unpathed(exc)}") from exc
        projector = None
        if spec.projector is not None:
            try:
                with suppress_stdout_stderr(disable=not quiet):
                    projector = Projector.load(spec, model, n_threads, N_BATCH)
            except BaseException:
                ctx.close()
                model.close()
                raise
        batch = internals.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=False)
        return cls(llama_cpp, model, ctx, batch, devices, projector)

    def close(self) -> None:
        """Free the batch, the context and the model (on the thread that made them)."""
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):
            if self.projector is not None:
                self.projector.close()
            self.batch.close()
            self.ctx.close()
            self.model.close()
