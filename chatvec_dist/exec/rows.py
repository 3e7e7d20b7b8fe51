"""Chat-template token rows in a strip of output (planned in planning/tokens.py): the elements of the CP rows that
take the chat model's rows are the chat tensor's, converted to the output dtype as torch converts; the rest of the
strip is combined as usual. Done on the host output buffer, so the CPU and the GPU path write the same bytes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.cpu import CANONICAL_NAN
from ..kernels.stats import Stats
from ..planning.planner import PlannedTensor
from ..planning.tokens import token_dim


def ranges(t: PlannedTensor, first: int, count: int) -> list[tuple[int, int, int]]:
    """(start, end, chat element) of each run of the strip's elements [first, first + count) that a chat row
    replaces: start and end counted from the strip's first element, the chat element in the chat tensor."""
    tokens = t.shape[token_dim(t)]
    width = t.numel // tokens if tokens else 0
    found = []
    for cp_row, chat_row in t.rows:
        a, b = max(first, cp_row * width), min(first + count, (cp_row + 1) * width)
        if a < b:
            found.append((a - first, b - first, chat_row * width + a - cp_row * width))
    return sorted(found)


def gaps(found: list[tuple[int, int, int]], count: int) -> list[tuple[int, int]]:
    """The runs of [0, count) between the replaced ones."""
    runs, at = [], 0
    for a, b, _ in found:
        if at < a:
            runs.append((at, a))
        at = b
    return runs + ([(at, count)] if at < count else [])


def transplant(out: torch.Tensor, cp: torch.Tensor, chat: torch.Tensor) -> Stats:
    """`out = chat` in out's dtype (NaN written as the canonical quiet NaN, as the kernels write it), and the stats
    of what is written: ‖cp‖², ‖out − cp‖², NaN and Inf counts."""
    out.copy_(chat)
    written, before = out.double(), cp.double()
    stats = Stats(cp_sq=float(torch.dot(before, before)), update_sq=float(((written - before) ** 2).sum()))
    nan = torch.isnan(out)
    stats.nan, stats.inf = int(nan.sum()), int(torch.isinf(out).sum())
    if stats.nan and out.dtype in CANONICAL_NAN:
        bits, canonical = CANONICAL_NAN[out.dtype]
        out.view(bits)[nan] = canonical
    return stats


def combine_with_rows(
    t: PlannedTensor,
    first: int,
    out: torch.Tensor,
    cp: torch.Tensor,
    combine: Callable[[int, int], Stats],
    read_chat: Callable[[int, int], torch.Tensor],
) -> Stats:
    """One strip of `t` from element `first`: `combine(start, end)` each run that keeps the usual arithmetic,
    then each replaced run from `read_chat(chat element, count)`. `cp` and `out` are the strip's host buffers."""
    found = ranges(t, first, out.numel())
    stats = Stats()
    for a, b in gaps(found, out.numel()):
        stats.add(combine(a, b))
    for a, b, at in found:
        stats.add(transplant(out[a:b], cp[a:b], read_chat(at, b - a)))
    return stats
