"""How much memory a loaded model takes: estimated before a load, measured after it.

estimate = runner process + weights + KV cache + compute buffers, where
  runner  = 80 MiB: the Python interpreter, numpy and llama.cpp's libraries of the model's own
            process (measured: ~79 MiB resident before the model loads),
  weights = the GGUF file size (llama.cpp maps it whole), and a vision model's projector's
            (libmtmd reads it whole into its own buffers; the buffers it computes an image in
            are not counted), and its LoRA adapters' (each read whole into llama.cpp's buffers;
            other adapter models sharing the instance load theirs on first use, which the
            runner's measured RSS then counts),
  KV      = layers x KV heads x (key size + value size) x 2 bytes (f16) x context,
  compute = 16 MiB + 160 bytes x vocabulary (logits and graph scratch; fitted to llama.cpp's
            CPU buffers for SmolLM2 and Gemma 3 at 512-8192 context, within a few MiB),
  embedding contexts add 32 MiB + 4 bytes x embedding size x context for pooled outputs,
  and a generation instance adds its saved-conversation KV cache (MYLLM_KV_CACHE) in full,
  and a draft model (Modelfile DRAFT, on the CPU) its file size, with KV and compute buffers
            counted as the model's own (the safe side: a draft model is the smaller one).
Each runner's RSS is measured too, and the manager counts whichever of the two is larger (see
`ModelManager.used()`), so an estimate that is too low cannot overfill the budget for long.

With a GPU the same parts are split by the number of layers llama.cpp offloads (`Footprint`):
`n_gpu_layers` = k puts the output layer and the last k - 1 repeating layers, with their KV
cache, on the GPU; the input embeddings always stay on the CPU. A projector goes on the GPU whole
when any layer does (the runner asks libmtmd for the GPU then, `LoadSpec.projector`), else it
stays in RAM. GPU memory is measured too
(the device's free memory before and after the runner's load).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil

from myllm.registry.schema import ModelRow

MiB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_memory(value: str | int, available: int | None = None) -> int:
    """Bytes from `6GiB`, `512MB`, `1073741824` or `75%` (of memory available now)."""
    if isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    if text.endswith("%"):
        pct = float(text[:-1])
        if not 0 < pct <= 100:
            raise ValueError(f"memory percentage must be in (0, 100]: {value!r}")
        base = available if available is not None else psutil.virtual_memory().available
        return int(base * pct / 100)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r} (try 6GiB, 512MB or 75%)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


RUNNER_OVERHEAD = 80 * MiB


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int
    process: int = RUNNER_OVERHEAD

    @property
    def total(self) -> int:
        return self.process + self.weights + self.kv_cache + self.compute


def _kv_per_layer(row: ModelRow, n_ctx: int) -> int:
    d = row.details or {}
    heads = int(d.get("attention.head_count") or 1)
    kv_heads = int(d.get("attention.head_count_kv") or heads)
    n_embd = int(row.embedding_length or d.get("embedding_length") or 0)
    key = int(d.get("attention.key_length") or (n_embd // heads if heads else 0))
    value = int(d.get("attention.value_length") or key)
    return kv_heads * (key + value) * 2 * n_ctx


def _compute(row: ModelRow, n_ctx: int, embedding: bool) -> int:
    compute = COMPUTE_BASE + 160 * int(row.vocab_size or 0)
    if embedding:
        n_embd = int(row.embedding_length or (row.details or {}).get("embedding_length") or 0)
        compute += 32 * MiB + 4 * n_embd * n_ctx
    return compute


def _draft(row: ModelRow, n_ctx: int, embedding: bool) -> int:
    """A draft model's RAM (runtime/engine/draft_model.py): its file, and the KV and compute
    buffers of a context as large as the model's, taken to be the model's own (the draft's
    shape is not in the model's row; a draft is the smaller model, so this is the safe side)."""
    if row.draft_digest is None or embedding:
        return 0
    layers = int((row.details or {}).get("block_count") or 0)
    return int(row.draft_size or 0) + layers * _kv_per_layer(row, n_ctx) + _compute(row, n_ctx, False)


def estimate(row: ModelRow, n_ctx: int, embedding: bool = False, kv_cache: int = 0) -> MemoryEstimate:
    """The whole instance's memory, wherever it lives (RAM alone on a CPU); a draft model's
    counts in its weights."""
    layers = int((row.details or {}).get("block_count") or 0)
    weights = (int(row.size) + int(row.projector_size or 0) + sum(int(a["size"]) for a in row.adapters or ())
               + _draft(row, n_ctx, embedding))
    return MemoryEstimate(weights, layers * _kv_per_layer(row, n_ctx) + kv_cache, _compute(row, n_ctx, embedding))


COMPUTE_BASE = 16 * MiB
"""Graph scratch of each device that computes part of a model (the CPU always does: llama.cpp
looks the input embeddings up there)."""

GPU_OVERHEAD = 457 * MiB
"""GPU memory a process holds before its first tensor: the CUDA context, cuBLAS's workspace and
the kernels it loads. Ollama reserves the same per GPU (its `cudaMinimumMemory`); the measured
figure beside each estimate (`/api/ps`) says how close it is on a given GPU."""


@dataclass(frozen=True)
class Split:
    """Bytes in RAM and in GPU memory."""

    ram: int
    vram: int

    @property
    def total(self) -> int:
        return self.ram + self.vram


@dataclass(frozen=True)
class Footprint:
    """One instance's memory by part, so it can be split by the number of layers on the GPU."""

    process: int
    input: int
    """Input embeddings: always in RAM."""
    layers: tuple[int, ...]
    """Weights of each repeating layer, first to last."""
    output: int
    """The output layer's weights (norm and matrix) on a GPU."""
    output_on_cpu: int
    """The same on the CPU, where a model whose output matrix is its input embeddings (tied)
    reads the same mapped bytes; on a GPU llama.cpp copies them there."""
    kv_layer: int
    """KV cache of one layer (every sequence's context)."""
    saved_kv: int
    """The saved-conversation KV cache: RAM."""
    compute: int
    """Compute buffers of the device that runs the output layer (logits and graph scratch)."""
    gpu_overhead: int = GPU_OVERHEAD
    projector: int = 0
    """A vision model's projector: on the GPU with any layer, else in RAM."""
    draft: int = 0
    """A draft model, its KV and buffers: in RAM (`_draft`)."""

    @property
    def max_gpu_layers(self) -> int:
        """Every repeating layer and the output layer: llama.cpp's count of offloadable layers."""
        return len(self.layers) + 1

    def split(self, gpu_layers: int) -> Split:
        """Where the bytes are when `gpu_layers` layers are offloaded (as llama.cpp counts them:
        the output layer first, then repeating layers from the last one back)."""
        k = max(0, min(gpu_layers, self.max_gpu_layers))
        n = len(self.layers)
        if k == 0:
            ram = (self.process + self.input + sum(self.layers) + self.output_on_cpu + n * self.kv_layer + self.saved_kv
                   + self.compute + self.projector + self.draft)
            return Split(ram, 0)
        cpu_layers = n - (k - 1)
        ram = (self.process + self.input + sum(self.layers[:cpu_layers]) + cpu_layers * self.kv_layer + self.saved_kv
               + COMPUTE_BASE + self.draft)
        vram = (self.gpu_overhead + self.output + sum(self.layers[cpu_layers:]) + (k - 1) * self.kv_layer + self.compute
                + self.projector)
        return Split(ram, vram)


def movable(fp: Footprint, gpu_layers: int) -> Split:
    """What offloading moves (layers, their KV cache, the output layer's compute buffers) and
    where it is with `gpu_layers` offloaded; what stays put either way (the runner, the input
    embeddings, the saved KV cache, the GPU's own overhead) does not count."""
    k = max(0, min(gpu_layers, fp.max_gpu_layers))
    full = fp.split(fp.max_gpu_layers)
    if k == 0:
        return Split(fp.split(0).ram - full.ram, 0)
    split = fp.split(k)
    return Split(split.ram - full.ram, split.vram - fp.gpu_overhead)


def processor(moved: Split) -> str:
    """Ollama's PROCESSOR column for what offloading moves (`movable`: one instance's, or
    the sum over a model's instances): "100% CPU", "100% GPU", or "48%/52% CPU/GPU", its share
    in each memory."""
    if moved.vram == 0:
        return "100% CPU"
    if moved.ram == 0:
        return "100% GPU"
    cpu = min(99, max(1, round(100 * moved.ram / moved.total)))
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def footprint(row: ModelRow, n_ctx: int, embedding: bool = False, kv_cache: int = 0) -> Footprint:
    """`row`'s footprint with `n_ctx` tokens of context (all sequences together). Weights come
    from the file's tensor sizes when the registry recorded them (`details["tensor_bytes"]`),
    else from the file size: the embeddings' share from the vocabulary and embedding sizes at
    the file's average bytes per parameter, the rest evenly over the layers, and a GPU's copy of
    the output matrix taken to be as large as the embeddings (the safe side). Either way the
    whole file counts on the CPU (the header, the tokenizer with it, in `input`), so with no
    layer offloaded the RAM is `estimate()`'s total (a projector's bytes included)."""
    d = row.details or {}
    size = int(row.size)
    n_layers = int(d.get("block_count") or 0)
    tensors = d.get("tensor_bytes")
    if tensors and len(tensors.get("layers", ())) == n_layers:
        layers = tuple(int(b) for b in tensors["layers"])
        embed, output = int(tensors["input"]), int(tensors["output"])
        output_on_cpu = output - embed if tensors["tied"] else output
        embed += max(0, size - embed - sum(layers) - output_on_cpu)
    else:
        n_embd = int(row.embedding_length or d.get("embedding_length") or 0)
        per_param = size / max(int(row.parameter_count or 0), 1)
        embed = min(size, int(int(row.vocab_size or 0) * n_embd * per_param))
        output, output_on_cpu = embed, 0
        rest = size - embed
        layers = tuple(rest // n_layers + (1 if i < rest % n_layers else 0) for i in range(n_layers))
        if not n_layers:
            embed = size
    return Footprint(RUNNER_OVERHEAD, embed, layers, output, output_on_cpu, _kv_per_layer(row, n_ctx), kv_cache,
                     _compute(row, n_ctx, embedding), projector=int(row.projector_size or 0),
                     draft=_draft(row, n_ctx, embedding))


def release_freed_memory() -> None:
    """Hand memory freed by an unloaded model back to the OS. Without it glibc keeps ~90 MiB
    of freed llama.cpp buffers per cycle in its arenas, and RSS drifts above the budget."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
