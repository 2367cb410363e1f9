"""KV states of past prompts kept in RAM beyond the slots, as a prefix tree of token spans, so a
request that extends any earlier one (an agent resending its whole conversation, a Responses
chain, the next chat turn) evaluates only its new tokens, however many conversations share the
model's sequences.

A llama.cpp sequence holds one conversation's KV at a time. When another conversation takes the
sequence over, its KV is first copied out (`save`), cut into token spans (kvstate.py) and put in
the tree under the tokens it stands for: only the part the tree does not hold yet is stored, so
a 2,000-token system prompt shared by eight agents is held once, with each agent's own history
as a branch. A later prompt finds its longest stored prefix (`match`) and, when that saves
evaluating enough tokens, the spans along it are joined into one state and copied into a
sequence (`restore`). The tree keeps what it restored: other conversations may share it.

Bounded by a byte budget (MYLLM_KV_CACHE): the least recently used leaves go first, so a
shared prefix stays while any conversation under it is still in use. Everything here runs on the
engine's scheduler thread.

Sliding-window models (Gemma 3) keep two KV caches, and llama.cpp saves only the last window of
positions from the windowed one: a stored path can be restored up to a length only when each
cache's cells cover what llama.cpp needs there (all positions, or the last window).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from myllm.runtime.engine.kvstate import CacheLayout, Cells, Span, UnknownLayout, join, parse

log = logging.getLogger(__name__)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` (both lists, or both tuples) share: a binary search
    over slice comparisons, which run in C (a 3,000-token prompt in tens of microseconds)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(eq=False)
class _Node:
    tokens: list[int]
    """This node's tokens, after its parent's."""
    start: int
    """The position of its first token."""
    cells: Span | None
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    used: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cells) if self.cells else 0


@dataclass(frozen=True)
class Match:
    """A stored prefix of a prompt: `length` tokens, along `path`. Valid until the tree
    changes (a save may cut the path's spans): find it again after one."""

    length: int
    path: tuple[_Node, ...] = ()


NO_MATCH = Match(0)


class KVCache:
    def __init__(self, max_bytes: int, n_swa: int = 0, min_tokens: int = 32) -> None:
        """`n_swa`: the model's attention window (llama_model_n_swa), 0 without one."""
        self.max_bytes = max_bytes
        self.n_swa = n_swa
        self.min_tokens = min_tokens
        self._root = _Node([], 0, None, None)
        self._layouts: tuple[CacheLayout, ...] | None = None
        self._head = b""
        self._windowed: set[int] = set()
        """The KV caches whose saved cells were seen not to start at position 0."""
        self._clock = itertools.count(1)
        self.bytes = 0
        self.hits = 0
        self.enabled = max_bytes > 0

    def __len__(self) -> int:
        """Spans stored."""
        return sum(1 for _ in self._nodes())

    def _nodes(self) -> Any:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # -- finding ----------------------------------------------------------------------------------

    def _walk(self, tokens: list[int]) -> tuple[list[tuple[_Node, int]], int]:
        """The nodes along `tokens` with how many of each node's tokens match, and the total."""
        node, at, path = self._root, 0, []
        while at < len(tokens) and (child := node.children.get(tokens[at])) is not None:
            n = common_prefix(child.tokens, tokens[at:at + len(child.tokens)])
            path.append((child, n))
            at += n
            if n < len(child.tokens):
                break
            node = child
        return path, at

    def stored(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the tree holds (whether or not restorable)."""
        return self._walk(tokens)[1] if self.enabled else 0

    def match(self, tokens: list[int]) -> Match:
        """The longest restorable stored prefix of `tokens`."""
        if not self.enabled or self._layouts is None:
            return NO_MATCH
        path, length = self._walk(tokens)
        # Cut back to node boundaries until every KV cache covers what it must.
        while length > 0:
            if self._covered(path, length):
                nodes = tuple(node for node, _ in path if node.start < length)
                for node in nodes:
                    node.used = next(self._clock)
                return Match(length, nodes)
            while path and path[-1][0].start >= length:
                path.pop()
            length = path[-1][0].start if path else 0
        return NO_MATCH

    def _needed_from(self, cache: int, length: int) -> int:
        return max(0, length - self.n_swa) if cache in self._windowed else 0

    def _covered(self, path: list[tuple[_Node, int]], length: int) -> bool:
        """Whether the cells along `path` cover, in each KV cache, the positions llama.cpp
        needs to continue at `length`: contiguous runs ending at `length - 1`."""
        assert self._layouts is not None
        for cache in range(len(self._layouts)):
            needed, reach = self._needed_from(cache, length), length
            for node, _ in reversed(path):
                if reach <= needed:
                    break
                if node.start >= length:
                    continue
                assert node.cells is not None
                pos = node.cells[cache].pos
                first = int(pos[0]) if len(pos) else node.end
                if first >= reach:
                    break
                reach = first
            if reach > needed:
                return False
        return True

    # -- copying in and out -------------------------------------------------------------------------

    def save(self, lib: Any, ctx: Any, tokens: list[int], seq: int) -> None:
        """Store what the tree lacks of sequence `seq`'s KV, which holds `tokens`."""
        if not self.enabled or len(tokens) < self.min_tokens or self.stored(tokens) == len(tokens):
            return
        size = lib.llama_state_seq_get_size(ctx, seq)
        if size <= 0:
            return
        data = np.empty(size, np.uint8)
        written = lib.llama_state_seq_get_data(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq)
        try:
            state = parse(data[:written])
            if self._layouts is None:
                self._layouts, self._head = state.layouts, state.head
            elif state.layouts != self._layouts or state.head[:4] != self._head[:4]:
                raise UnknownLayout("a state laid out unlike the model's first")
            self._check_positions(state.cells, len(tokens))
        except UnknownLayout as exc:
            log.warning("saved conversation KV turned off for this model: llama.cpp's state layout is not "
                        "the one this version knows (%s)", exc)
            self.enabled = False
            return
        self._insert(tokens, state.cells)
        self._evict()

    def _check_positions(self, cells: Span, length: int) -> None:
        """Every KV cache must hold a contiguous run of positions ending at the last token; one
        that does not start at 0 is windowed, which needs the model's window."""
        for cache, part in enumerate(cells):
            pos = np.sort(part.pos)
            if len(pos) == 0 or pos[-1] != length - 1 or pos[-1] - pos[0] + 1 != len(pos):
                raise UnknownLayout("cells that are not the sequence's positions")
            if pos[0] > 0:
                if self.n_swa <= 0:
                    raise UnknownLayout("a windowed KV cache on a model without a window")
                self._windowed.add(cache)

    def _insert(self, tokens: list[int], cells: Span) -> None:
        node, at = self._root, 0
        while at < len(tokens) and (child := node.children.get(tokens[at])) is not None:
            n = common_prefix(child.tokens, tokens[at:at + len(child.tokens)])
            if n < len(child.tokens):
                self._split(child, n)
            child.used = next(self._clock)
            node, at = child, at + n
        if at < len(tokens):
            leaf = _Node(tokens[at:], at, tuple(c.select(at, len(tokens)) for c in cells), node)
            leaf.used = next(self._clock)
            node.children[tokens[at]] = leaf
            self.bytes += leaf.nbytes

    @staticmethod
    def _split(node: _Node, n: int) -> None:
        """Cut `node` after its first `n` tokens; the rest becomes its one child."""
        assert node.cells is not None
        cut = node.start + n
        rest = _Node(node.tokens[n:], cut, tuple(c.select(cut, node.end) for c in node.cells), node,
                     node.children, node.used)
        for child in rest.children.values():
            child.parent = rest
        node.tokens = node.tokens[:n]
        node.cells = tuple(c.select(node.start, cut) for c in node.cells)
        node.children = {rest.tokens[0]: rest}

    def _evict(self) -> None:
        """Least recently used leaves out until the tree fits its budget."""
        while self.bytes > self.max_bytes:
            leaf = min((n for n in self._nodes() if not n.children), key=lambda n: n.used, default=None)
            if leaf is None or leaf.parent is None:
                return
            del leaf.parent.children[leaf.tokens[0]]
            self.bytes -= leaf.nbytes

    def restore(self, lib: Any, ctx: Any, match: Match, seq: int) -> bool:
        """Replace sequence `seq`'s KV with the first `match.length` tokens stored along
        `match.path`; False if llama.cpp refused the state (the sequence is then empty)."""
        assert self._layouts is not None
        spans = []
        for node in match.path:
            assert node.cells is not None
            hi = min(node.end, match.length)
            spans.append(tuple(self._trim(cache, cells, node.start, hi, match.length)
                               for cache, cells in enumerate(node.cells)))
        data = join(self._head, self._layouts, spans)
        memory = lib.llama_get_memory(ctx)
        lib.llama_memory_seq_rm(memory, seq, -1, -1)
        if lib.llama_state_seq_set_data(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), len(data), seq) == 0:
            lib.llama_memory_seq_rm(memory, seq, -1, -1)
            return False
        self.hits += 1
        return True

    def _trim(self, cache: int, cells: Cells, start: int, hi: int, length: int) -> Cells:
        """A node's cells to restore: those before `hi`, and in a windowed cache only the window."""
        lo = max(start, self._needed_from(cache, length))
        pos = cells.pos
        if len(pos) and pos[0] >= lo and pos[-1] < hi:
            return cells
        return cells.select(lo, hi)
