"""How every engine in a runner sets llama.cpp up: its thread count, and the weight buffers
that are safe on this CPU."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import psutil


def bindings_only() -> None:
    """Make `import llama_cpp` in this process give llama-cpp-python's bindings without its
    high-level API. For a runner whose engine is the batch engine, which calls llama.cpp through
    the bindings (`llama_cpp.llama_cpp`, also every name of the package) and `_internals` alone.

    The package's `__init__` is `from .llama_cpp import *` and then `from .llama import *`; the
    second brings `Llama` with its chat formats, caches and helpers (jinja2, diskcache with
    sqlite3, multiprocessing...): ~9 MB that a runner would hold for as long as its model stays
    loaded, never used. Here the package is registered with the first half only, the same
    objects under the same names. A process that needs `Llama` (an embedding runner,
    `OptimizedLLM`, the tests) does not call this; called after llama_cpp was imported, it does
    nothing."""
    if "llama_cpp" in sys.modules:
        return
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        raise ModuleNotFoundError("llama_cpp")
    package = importlib.util.module_from_spec(spec)  # its __init__ is not run
    sys.modules["llama_cpp"] = package
    try:
        bindings = importlib.import_module("llama_cpp.llama_cpp")
    except BaseException:
        del sys.modules["llama_cpp"]
        raise
    package.__dict__.update({name: value for name, value in vars(bindings).items() if not name.startswith("_")})


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
