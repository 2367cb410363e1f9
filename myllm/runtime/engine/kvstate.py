"""One sequence's KV state as llama.cpp writes it, cut into token spans and joined again.

`llama_state_seq_get_data` writes a sequence's KV in llama.cpp's own layout (llama-context.cpp,
`state_seq_get_data`, and llama-kv-cache.cpp, `state_write`): a magic number and the sequence's
id, then for each KV cache of the model (one, or two for a model with sliding-window
layers), the number of streams, then per stream a cell count and, when there are cells, one
metadata record per cell (its position, its sequence ids, and for M-RoPE or per-layer-embedding
models a cell extension), the cells' K rows layer by layer, then their V rows layer by layer (or,
with V transposed, each V dimension's run of cells). A cell is one token at one position, so the
bytes of any span of positions can be cut out, and spans joined into a state that
`llama_state_seq_set_data` reads back. The prefix cache (kvcache.py) keeps spans in a tree, so a
system prompt that many conversations share is held once.

This is llama.cpp's layout, not a published format. `parse` accepts a state only when every field
is where the layout puts it and every byte is accounted for; anything else raises
`UnknownLayout`, and the cache turns itself off for that model rather than guess. The tests
restore joined spans into a sequence and compare the model's next tokens with a full evaluation,
on a plain and on a sliding-window model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CELL_EXT = 12
"""Bytes of llama.cpp's `llama_kv_cell_ext` (x, y, token), in a cell's record on models that keep it."""


class UnknownLayout(ValueError):
    """A state this code cannot cut safely."""


@dataclass(frozen=True)
class CacheLayout:
    """The shape of one KV cache's part of a state, the same for every state of the model."""

    n_stream: int
    record: int
    """Bytes of one cell's metadata record."""
    v_trans: bool
    k_heads: tuple[bytes, ...]
    """Each layer's K header (type, row size), as written."""
    k_rows: tuple[int, ...]
    v_heads: tuple[bytes, ...]
    v_rows: tuple[int, ...]
    """Bytes of a cell's V row per layer; with V transposed, bytes of one element."""
    v_dims: tuple[int, ...]
    """With V transposed, each layer's V dimensions (runs of cells); else 1."""


@dataclass(frozen=True)
class Cells:
    """Some cells of one KV cache, sorted by position: views into a state, or copies."""

    meta: np.ndarray
    """[cells, record] bytes."""
    k: tuple[np.ndarray, ...]
    """Per layer: [cells, row] bytes."""
    v: tuple[np.ndarray, ...]
    """Per layer: [cells, row] bytes, or with V transposed [dims, cells, element] bytes."""

    @property
    def pos(self) -> np.ndarray:
        return np.ascontiguousarray(self.meta[:, :4]).view("<i4").ravel()

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes + sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def select(self, lo: int, hi: int) -> Cells:
        """The cells at positions [lo, hi), copied out of whatever they view."""
        pos = self.pos
        keep = np.flatnonzero((pos >= lo) & (pos < hi))
        keep = keep[np.argsort(pos[keep], kind="stable")]
        return Cells(self.meta[keep], tuple(a[keep] for a in self.k),
                     tuple(a[:, keep] if a.ndim == 3 else a[keep] for a in self.v))


Span = tuple[Cells, ...]
"""One `Cells` per KV cache of the model, for the same tokens."""


class _Reader:
    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.at + n > len(self.data):
            raise UnknownLayout("the state ends early")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u32(self) -> int:
        return int(self.take(4).view("<u4")[0])

    def i32(self) -> int:
        return int(self.take(4).view("<i4")[0])

    def u64(self) -> int:
        return int(self.take(8).view("<u8")[0])


def _read_cache(r: _Reader) -> tuple[CacheLayout, Cells] | None:
    """One KV cache's part; None when the sequence has no cell in it."""
    n_stream = r.u32()
    if not 1 <= n_stream <= 4096:
        raise UnknownLayout(f"{n_stream} streams")
    found: tuple[CacheLayout, Cells] | None = None
    for _ in range(n_stream):
        count = r.u32()
        if count == 0:
            continue
        if found is not None:
            raise UnknownLayout("one sequence's cells in two streams")
        found = _read_stream(r, count, n_stream)
    return found


def _record_size(r: _Reader, count: int) -> int:
    """A record is (pos, n_seq_id = 1[, ext], seq_id): the size whose records all say one
    sequence and after which the data section starts as the layout says (V transposed or not,
    then a layer count: the layers this cache holds, not necessarily all of the model's)."""
    for record in (12, 12 + _CELL_EXT):
        end = r.at + count * record
        if end + 8 > len(r.data):
            continue
        records = r.data[r.at:end].reshape(count, record)
        n_seq = np.ascontiguousarray(records[:, 4:8]).view("<u4").ravel()
        head = r.data[end:end + 8].view("<u4")
        if np.all(n_seq == 1) and head[0] in (0, 1) and 1 <= head[1] <= 4096:
            return record
    raise UnknownLayout("cell records of an unknown size")


def _read_stream(r: _Reader, count: int, n_stream: int) -> tuple[CacheLayout, Cells]:
    record = _record_size(r, count)
    meta = r.take(count * record).reshape(count, record)
    v_trans = bool(r.u32())
    n_layer = r.u32()
    k_heads, k_rows, k = [], [], []
    for _ in range(n_layer):
        head = r.take(12)
        row = int(head[4:].view("<u8")[0])
        k_heads.append(head.tobytes())
        k_rows.append(row)
        k.append(r.take(count * row).reshape(count, row))
    v_heads, v_rows, v_dims, v = [], [], [], []
    for _ in range(n_layer):
        head = r.take(12)
        if v_trans:
            element, dims = (int(x) for x in head[4:].view("<u4"))
            v.append(r.take(dims * count * element).reshape(dims, count, element))
        else:
            element, dims = int(head[4:].view("<u8")[0]), 1
            v.append(r.take(count * element).reshape(count, element))
        v_heads.append(head.tobytes())
        v_rows.append(element)
        v_dims.append(dims)
    layout = CacheLayout(n_stream, record, v_trans, tuple(k_heads), tuple(k_rows), tuple(v_heads), tuple(v_rows),
                         tuple(v_dims))
    return layout, Cells(meta, tuple(k), tuple(v))


_HEAD = 8
"""The magic number and the sequence id that open a state (the id is not read back)."""


@dataclass(frozen=True)
class State:
    head: bytes
    layouts: tuple[CacheLayout, ...]
    cells: Span
    """Views into the buffer the state was read from."""


def parse(data: np.ndarray) -> State:
    """Read a state (`data`: its bytes as uint8)."""
    r = _Reader(data)
    head = r.take(_HEAD).tobytes()
    layouts, cells = [], []
    while r.at < len(data):
        part = _read_cache(r)
        if part is None:
            raise UnknownLayout("a KV cache without the sequence's cells")
        layouts.append(part[0])
        cells.append(part[1])
    if not layouts:
        raise UnknownLayout("an empty state")
    return State(head, tuple(layouts), tuple(cells))


def join(head: bytes, layouts: tuple[CacheLayout, ...], spans: list[Span]) -> np.ndarray:
    """One state of all the cells of `spans` (each a `Span`, in order), as uint8 bytes."""
    parts: list[np.ndarray | bytes] = [head]
    for i, layout in enumerate(layouts):
        cells = [span[i] for span in spans]
        count = sum(len(c.meta) for c in cells)
        parts.append(np.array([layout.n_stream, count], "<u4").tobytes())
        parts.extend(c.meta for c in cells)
        parts.append(np.array([int(layout.v_trans), len(layout.k_heads)], "<u4").tobytes())
        for layer, head in enumerate(layout.k_heads):
            parts.append(head)
            parts.extend(c.k[layer] for c in cells)
        for layer, head in enumerate(layout.v_heads):
            parts.append(head)
            if layout.v_trans:
                parts.append(np.concatenate([c.v[layer] for c in cells], axis=1))
            else:
                parts.extend(c.v[layer] for c in cells)
        parts.append(bytes(4 * (layout.n_stream - 1)))  # the other streams: no cells
    out = np.empty(sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts), np.uint8)
    at = 0
    for p in parts:
        flat = np.frombuffer(p, np.uint8) if isinstance(p, bytes) else p.reshape(-1).view(np.uint8)
        out[at:at + len(flat)] = flat
        at += len(flat)
    return out
