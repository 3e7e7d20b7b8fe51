"""Which of a piece's sources the direct reader serves, and how far it may read ahead in each."""

from __future__ import annotations

from ..dtypes import ITEMSIZE
from ..io import s3
from ..planning.experts import read_ranges
from ..planning.layout import Piece
from ..planning.plan import input_needs
from ..planning.planner import PlannedTensor, Src


def planned_ends(piece: Piece, tensors: list[PlannedTensor]) -> dict[Src, int]:
    """Each source this piece reads as one range of a local file, on an element boundary: the range's end (the
    direct reader's windows never pass it). Fused experts' segments and objects are read as before."""
    ends = {}
    for src, count in input_needs(piece, tensors).items():
        segments = read_ranges(src, piece.first, count)
        if len(segments) == 1 and not s3.is_url(segments[0][0]) and segments[0][1] % ITEMSIZE[src.dtype] == 0:
            _, offset, nbytes = segments[0]
            ends[src] = offset + nbytes
    return ends
