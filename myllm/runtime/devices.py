"""Which GPUs llama.cpp can put layers on, and their memory.

The answer comes from llama.cpp itself: `llama_supports_gpu_offload` and ggml's device registry
(each device's name, type, free and total memory), so it describes the llama.cpp that runs the
models rather than the machine: a CPU build reports no GPU even on a machine with one, and
everything then works as on a machine without one.

Asking a CUDA device for its free memory creates a CUDA context in the asking process, which
holds a few hundred MiB of GPU memory for as long as the process lives. The daemon therefore
never asks in its own process: `probe()` runs this module in a short-lived one (`python -m
myllm.runtime.devices` prints the answer as JSON). A runner, which holds a context anyway once
it offloads, asks in-process (`llama_devices()`) for the free memory before and after its load.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

GPU, IGPU = 1, 2
"""ggml's `enum ggml_backend_dev_type` values of discrete and integrated GPUs (ggml-backend.h)."""

_KINDS = {"cuda": "cuda", "rocm": "cuda", "hip": "cuda", "metal": "mps", "mtl": "mps"}
"""ggml backend names as the device names PyTorch users know (DeepShiva's `device`: "cuda",
"mps"); ROCm builds answer to "cuda" in PyTorch too. Any other backend keeps its own name."""


@dataclass(frozen=True)
class Gpu:
    name: str
    """ggml's device name: CUDA0, Metal, Vulkan0, RPC[host:port]."""
    description: str
    """The product: "NVIDIA H100 80GB HBM3"."""
    total: int
    free: int

    @property
    def kind(self) -> str:
        """The device family in PyTorch's words: cuda, mps, vulkan..."""
        family = re.sub(r"[^a-z]", "", re.sub(r"\[.*", "", self.name.lower())) or "gpu"
        return _KINDS.get(family, family)


@dataclass(frozen=True)
class Devices:
    offload: bool
    """llama.cpp was built with a backend that can offload (`llama_supports_gpu_offload`)."""
    gpus: tuple[Gpu, ...] = ()

    @property
    def available(self) -> bool:
        return self.offload and bool(self.gpus)

    @property
    def total(self) -> int:
        return sum(g.total for g in self.gpus)

    @property
    def free(self) -> int:
        return sum(g.free for g in self.gpus)

    @property
    def name(self) -> str | None:
        """The GPU's product name ("2 x NVIDIA H100 80GB HBM3" for two alike); None without one."""
        if not self.available:
            return None
        names = [g.description or g.name for g in self.gpus]
        if len(names) > 1 and len(set(names)) == 1:
            return f"{len(names)} x {names[0]}"
        return ", ".join(names)

    @property
    def kind(self) -> str:
        """What a model with layers on the GPU runs on ("cuda", "mps"), "cpu" without a GPU."""
        return self.gpus[0].kind if self.available else "cpu"

    def to_json(self) -> str:
        return json.dumps({"offload": self.offload, "gpus": [asdict(g) for g in self.gpus]})

    @classmethod
    def from_json(cls, text: str) -> Devices:
        data = json.loads(text)
        return cls(bool(data["offload"]), tuple(Gpu(**g) for g in data["gpus"]))


NO_GPU = Devices(offload=False)


def _ggml() -> Any:
    """ggml's device functions, found through libllama's handle (libllama links libggml, and
    dlsym searches a library's dependencies), so they are the very ggml llama-cpp-python
    loaded, wherever LLAMA_CPP_LIB_PATH put it. llama-cpp-python declares none of them."""
    import llama_cpp

    lib = llama_cpp.llama_cpp._lib
    lib.ggml_backend_dev_count.argtypes, lib.ggml_backend_dev_count.restype = [], ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes, lib.ggml_backend_dev_type.restype = [ctypes.c_void_p], ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_reg_count.argtypes, lib.ggml_backend_reg_count.restype = [], ctypes.c_size_t
    lib.ggml_backend_reg_get.argtypes, lib.ggml_backend_reg_get.restype = [ctypes.c_size_t], ctypes.c_void_p
    lib.ggml_backend_reg_name.argtypes, lib.ggml_backend_reg_name.restype = [ctypes.c_void_p], ctypes.c_char_p
    return lib


NOT_GPU_BACKENDS = {b"CPU", b"RPC", b"BLAS"}
"""ggml backends that are no GPU of this machine: `llama_supports_gpu_offload` is also true for
a build with the RPC backend alone (other machines' workers, runtime/engine/rpc.py)."""


def _gpu_backend(lib: Any) -> bool:
    """Whether this llama.cpp has a GPU backend (CUDA, Metal, Vulkan...), GPUs present or not."""
    return any(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)) not in NOT_GPU_BACKENDS
               for i in range(lib.ggml_backend_reg_count()))


def llama_devices() -> Devices:
    """The GPUs llama.cpp would offload to, asked in this process: discrete GPUs, else the
    integrated ones (llama.cpp's own choice when a model loads with no device list)."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return NO_GPU
    lib = _ggml()
    if not _gpu_backend(lib):
        return NO_GPU
    found: dict[int, list[Gpu]] = {GPU: [], IGPU: []}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind not in found:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found[kind].append(Gpu((lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                               (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                               int(total.value), int(free.value)))
    return Devices(True, tuple(found[GPU] or found[IGPU]))


async def probe(timeout: float = 60.0) -> Devices:
    """`llama_devices()` answered by a short-lived process (see the module's docstring). A probe
    that fails (llama.cpp cannot start, a driver hangs) is logged and counts as no GPU: the
    daemon then runs as on a CPU build."""
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "myllm.runtime.devices",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:  # a timeout, or the daemon stopping meanwhile: the probe goes too
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}")
        return Devices.from_json(out.decode().strip().splitlines()[-1])
    except Exception as exc:  # any failure of the probe: no GPU, said once
        log.warning("could not ask llama.cpp about GPUs (%r); models run on the CPU", exc)
        return NO_GPU


def main() -> None:
    """Print `llama_devices()` as one JSON line on stdout (llama.cpp's own chatter goes to stderr)."""
    devices = llama_devices()
    sys.stdout.write(devices.to_json() + "\n")


if __name__ == "__main__":
    main()
