"""How every engine in a runner sets llama.cpp up: its thread count, and the weight buffers
that are safe on this CPU."""

from __future__ import annotations

from typing import Any

import psutil


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (Sapphire Rapids and later), from the kernel's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:  # not Linux: no such file, and no AMX build of ggml to worry about
        return False


def avoid_broken_weight_buffers() -> None:
    """Make llama.cpp keep weights in plain CPU buffers on CPUs with AMX.

    A llama.cpp built for the machine it runs on (the default, -march=native) puts quantized
    weights in its AMX buffer type on such CPUs, and the vendored llama.cpp's AMX matrix product
    segfaults on any prompt of more than a few tokens (`ggml_backend_amx_mul_mat`, seen with
    llama-cpp-python 0.3.36's own `Llama` too). `use_extra_bufts = False` (llama-server's
    `--no-repack`) avoids it. `Llama` builds its parameters from llama.cpp's defaults, so the
    defaults themselves are changed, once per process, for every engine.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if getattr(lib.llama_model_default_params, "myllm_plain_buffers", False) or not cpu_has_amx():
        return
    original = lib.llama_model_default_params

    def plain_buffers() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    plain_buffers.myllm_plain_buffers = True  # type: ignore[attr-defined]
    lib.llama_model_default_params = llama_cpp.llama_model_default_params = plain_buffers
