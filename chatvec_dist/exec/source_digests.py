"""Digests of the source tensors' bytes as the workers read them, so that an output can be audited against its
inputs later (`chatvec verify --sources`). No torch here: the driver folds them into the manifest.

A source tensor's digest is defined as the output's: xxh3-128 of the concatenated xxh3-128 digests of its blocks,
here blocks of `source_block_elems` elements of the source's own bytes (the last one shorter; a source of no
elements: one block of no bytes). Its extent is what the merge reads of it: CP's whole tensor, the vectors'
first `merge_elems` elements, a block-scaled FP8 source's float32 scales of those, and each whole chat row that
chat-template token rows are taken from (read whole, and hashed, by the piece holding the row's first element)."""

from __future__ import annotations

from collections.abc import Mapping

import xxhash

from ..dtypes import ITEMSIZE
from ..planning.fp8 import scale_elems
from ..planning.layout import Piece
from ..planning.planner import PlannedTensor, Src
from ..planning.tokens import token_dim

SOURCE_ALGORITHM = (
    "xxh3-128 of the concatenated xxh3-128 digests of each block of block_elems elements of the source's bytes"
)
Blocks = tuple[tuple[int, bytes], ...]  # (block number, digest) of consecutive blocks


def source_block_elems(block_bytes: int) -> int:
    """Elements per source hash block: the output's hash block over the largest itemsize (8 bytes). Work is cut
    on every output's hash blocks, so on these too, whatever the dtypes: the same digest for any unit size from
    1 MiB up, any worker count and any resume."""
    return max(1, block_bytes // 8)


def extents(t: PlannedTensor) -> list[tuple[Src, int]]:
    """Each source of `t` and the elements read: `streamed(t)`, then each chat row its token rows come from (in
    `t.rows` order)."""
    return streamed(t) + row_sources(t) if t.rows else streamed(t)


def streamed(t: PlannedTensor) -> list[tuple[Src, int]]:
    """The sources read in the output's element order: CP, then each term's plus and minus (the order of
    `t.srcs`), then the scales of those that are block-scaled FP8 (a whole weight's piece reads all of them)."""
    own = ([(t.cp, t.numel)] if t.cp is not None else []) + [(s, t.merge_elems) for s in t.vector_srcs]
    scales = [(s.scale, scale_elems(n, t.shape[-1])) for s, n in own if s.scale is not None]
    return own + scales if scales else own


def row_sources(t: PlannedTensor) -> list[tuple[Src, int]]:
    """Each chat row that one of `t`'s token rows is taken from, as a source of one whole row."""
    assert t.row_src is not None and not t.row_src.segments, "token rows come from a plain tensor"
    width, src = row_width(t), t.row_src
    step = width * ITEMSIZE[src.dtype]
    return [(Src(src.path, src.start + chat * step, src.dtype), width) for _, chat in t.rows]


def row_width(t: PlannedTensor) -> int:
    """Elements per token row of a vocabulary tensor."""
    tokens = t.shape[token_dim(t)]
    return t.numel // tokens if tokens else 0


def source_blocks(extent: int, block_elems: int) -> int:
    """Hash blocks of a source tensor of `extent` elements."""
    return max(1, -(-extent // block_elems))


class _Stream:
    """One source's bytes in a piece, fed in order: each full block hashed as one, across strips."""

    def __init__(self, block_bytes: int, first_block: int) -> None:
        self.block_bytes = block_bytes
        self.next = first_block
        self.hasher = xxhash.xxh3_128()
        self.filled = 0
        self.digests: list[tuple[int, bytes]] = []
        self.done: Blocks | None = None

    def feed(self, data: memoryview) -> None:
        at = 0
        while at < len(data):
            take = min(self.block_bytes - self.filled, len(data) - at)
            self.hasher.update(data[at : at + take])
            self.filled, at = self.filled + take, at + take
            if self.filled == self.block_bytes:
                self._close_block()

    def _close_block(self) -> None:
        self.digests.append((self.next, self.hasher.digest()))
        self.next, self.filled = self.next + 1, 0
        self.hasher.reset()

    def finish(self) -> Blocks:
        """The piece's block digests; a last partial block (or the one empty block of an empty source) closed."""
        if self.done is None:
            if self.filled or not self.digests:
                self._close_block()
            self.done = tuple(self.digests)
        return self.done


class PieceSources:
    """Block digests of every source a piece reads, for all outputs at once: one stream per source and extent
    (outputs of a batch share their sources' bytes), fed strip by strip with what was read; and the chat rows
    whose first element is in the piece, each hashed whole as it is read."""

    def __init__(self, piece: Piece, tensors: list[PlannedTensor], block_elems: int) -> None:
        assert piece.first % block_elems == 0, "work is cut on source hash blocks"
        self.block_elems = block_elems
        self.streams: dict[tuple[Src, int], _Stream] = {}
        self.rows: dict[Src, Blocks] = {}  # a chat row (as in row_sources) → its block digests
        for t in tensors:
            for src, extent in streamed(t):
                if piece.first < extent or piece.first == extent == 0:  # else the piece reads none of it
                    block = block_elems * ITEMSIZE[src.dtype]
                    self.streams.setdefault((src, extent), _Stream(block, piece.first // block_elems))

    def feed(self, strip: Piece, inputs: Mapping[Src, memoryview]) -> None:
        """Hash a strip's bytes of each source (`inputs`: what was read from each, as bytes), up to its extent."""
        for (src, extent), stream in self.streams.items():
            count = max(0, min(strip.last, extent) - strip.first)
            if count:
                stream.feed(inputs[src][: count * ITEMSIZE[src.dtype]])

    def row_read(self, t: PlannedTensor, at: int, count: int) -> int:
        """Elements to read of `t`'s row source from chat element `at` for a run of `count`: a whole row where the
        run starts one (then given to `feed_row`), else `count`."""
        width = row_width(t)
        return max(count, width) if at % width == 0 else count

    def feed_row(self, t: PlannedTensor, at: int, data: memoryview) -> None:
        """Hash a row read by `row_read` (`data`: its bytes), if it is a whole row."""
        assert t.row_src is not None
        width, src = row_width(t), t.row_src
        if at % width:
            return
        size = ITEMSIZE[src.dtype]
        stream = _Stream(self.block_elems * size, 0)
        stream.feed(data[: width * size])
        self.rows[Src(src.path, src.start + at * size, src.dtype)] = stream.finish()

    def digests(self, t: PlannedTensor) -> tuple[Blocks, ...]:
        """The piece's block digests of each of `t`'s sources (in `extents` order; none where the piece has none)."""
        own = tuple(self.streams[k].finish() if k in self.streams else () for k in streamed(t))
        return own + tuple(self.rows.get(src, ()) for src, _ in row_sources(t)) if t.rows else own
