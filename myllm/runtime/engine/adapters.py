"""LoRA adapters on one loaded base model: each adapter file loaded once (on first use, by the
scheduler thread), and the set a step decodes with applied to the context before its decode.

llama.cpp applies adapters per context, not per sequence (`llama_set_adapters_lora`), so the
sequences of one step must all want the same set: `group` picks, among the active slots, the
ones whose request asked for one set, taking the sets in turn step by step so that no set
waits behind another. A slot's KV was computed with its set's weights, so the scheduler reuses
it only for a request with the same set (batching.py `place`), and never puts it in, or takes it
from, the RAM prefix cache unless the set is empty: KV of one adapter never serves another.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from myllm.errors import ModelLoadError
from myllm.runtime.engine.slots import Slot
from myllm.runtime.engine_types import AdapterSet


class Adapters:
    """The adapters of one engine's model, and the set its context has applied."""

    def __init__(self, lib: Any, model: Any, ctx: Any) -> None:
        """`model`, `ctx`: llama.cpp's pointers (the adapters live as long as the model)."""
        self._lib, self._model, self._ctx = lib, model, ctx
        self._loaded: dict[str, Any] = {}
        self._applied: AdapterSet = ()
        self._turn = 0

    def load(self, adapters: AdapterSet) -> None:
        """Load the files of `adapters` not yet loaded; one llama.cpp refuses (a base it does
        not fit: the registry checks that first) is a `ModelLoadError` for that request."""
        for path, _ in adapters:
            if path not in self._loaded:
                pointer = self._lib.llama_adapter_lora_init(self._model, path.encode())
                if not pointer:
                    raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {path.rsplit('/', 1)[-1]}")
                self._loaded[path] = pointer

    def group(self, active: Sequence[Slot]) -> list[Slot]:
        """The slots this step decodes: those of one adapter set (every slot when all want the
        same), with that set applied to the context."""
        sets = sorted({slot.adapters for slot in active})
        if len(sets) > 1:
            self._turn += 1
        wanted = sets[self._turn % len(sets)]
        self._apply(wanted)
        return [slot for slot in active if slot.adapters == wanted]

    def _apply(self, adapters: AdapterSet) -> None:
        if adapters == self._applied:
            return
        pointers = (self._lib.llama_adapter_lora_p_ctypes * max(1, len(adapters)))(
            *(self._loaded[path] for path, _ in adapters))
        scales = (ctypes.c_float * max(1, len(adapters)))(*(scale for _, scale in adapters))
        if self._lib.llama_set_adapters_lora(self._ctx, pointers, len(adapters), scales) != 0:
            raise ModelLoadError("llama.cpp could not apply the LoRA adapters")
        self._applied = adapters
