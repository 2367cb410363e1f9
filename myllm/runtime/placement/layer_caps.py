"""GPU layer caps: a model that ran out of GPU memory is loaded with half the layers for a while.

The planner's estimate of a model's GPU share can be wrong, and another program may take GPU
memory the daemon counted as free. With layers on the GPU, a load that fails or crashes, a runner
that crashes, or one that reports llama.cpp out of memory while generating is tried again with
half the layers, down to none; the smaller count holds for `GPU_RETRY_MEMORY` so the next load
does not fail the same way.
"""

from __future__ import annotations

import logging
import time

from myllm.registry.schema import ModelRow
from myllm.runtime.engine_types import LoadSpec

log = logging.getLogger(__name__)
GPU_RETRY_MEMORY = 600.0
"""How long a model keeps the smaller layer count it was retried with after running out of GPU
memory (another program may have held that memory for a while)."""


class LayerCaps:
    """The most layers each model may put on the GPU for now, by digest."""

    def __init__(self) -> None:
        self._caps: dict[str, tuple[int, float]] = {}
        """Models retried with fewer layers after running out of GPU memory: digest -> (layers, until)."""

    def wanted(self, spec: LoadSpec, row: ModelRow) -> int:
        """The most layers this load may put on the GPU: what the spec asks for, unless the model
        ran out of GPU memory lately with more."""
        cap = self._caps.get(row.digest)
        if cap is None or cap[1] <= time.monotonic():
            return spec.n_gpu_layers
        return cap[0] if spec.n_gpu_layers < 0 else min(spec.n_gpu_layers, cap[0])

    def fewer(self, row: ModelRow, layers: int, why: str) -> int:
        """Half of `layers` (the next try's most), remembered for `GPU_RETRY_MEMORY` seconds."""
        fewer = layers // 2
        self._caps[row.digest] = (fewer, time.monotonic() + GPU_RETRY_MEMORY)
        log.warning("model %s with %d layers on the GPU: %s; trying again with %d", row.name, layers, why, fewer)
        return fewer
