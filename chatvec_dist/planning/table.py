"""The plan as an Arrow table, and its one-screen summary for `chatvec plan`."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import pyarrow as pa

from .. import gcpause
from ..recipe.spec import human_bytes
from .alphas import rule_lines
from .fp8 import SCALE_RULE
from .layout import Layout

if TYPE_CHECKING:
    from .plan import Planned


def plan_table(planned: Planned) -> pa.Table:
    """One row per output tensor per target: what will happen to it and where its bytes go."""
    return pa.concat_tables([_target_table(tp.target.name, tp.layout) for tp in planned.targets])


def _target_table(target: str, layout: Layout) -> pa.Table:
    rows = [
        {
            "target": target,
            "tensor": p.tensor.name,
            "rule": p.tensor.rule,
            "reason": p.tensor.reason,
            "shape": list(p.tensor.shape),
            "dtype_out": p.tensor.out_dtype,
            "dtype_cp": p.tensor.cp.dtype if p.tensor.cp else None,
            "merge_elems": p.tensor.merge_elems,
            "shard": layout.shards[p.shard].name,
            "offset": p.offset,
            "nbytes": p.nbytes,
            "alphas": [term.alpha for term in p.tensor.terms] if p.tensor.terms else None,
            "token_rows": len(p.tensor.rows),
        }
        for p in layout.tensors
    ]
    return pa.Table.from_pylist(rows)


def summary(planned: Planned) -> str:
    """`chatvec plan`'s text. Walking the plan fills each tensor's `srcs`: with the collector paused, as while
    planning, a hundred thousand new tuples start no collection of the whole plan (a third of this function's
    time)."""
    with gcpause.paused():
        return _summary(planned)


def _summary(planned: Planned) -> str:
    from .plan import total_io_bytes

    io = total_io_bytes(planned)
    written = sum(p.nbytes for tp in planned.targets for p in tp.layout.tensors)
    recipe = planned.recipe
    lines = [
        f"{recipe.kind}: {counted(len(recipe.vectors), 'vector')}, {counted(len(planned.targets), 'target')}; "
        f"{human_bytes(io - written)} read, {human_bytes(written)} written; "
        f"{counted(len(planned.units), 'unit')} of up to {human_bytes(recipe.unit_bytes, binary=True)}"
    ]
    dares = [
        f"vector {i}: density {v.dare.density:g}, seed {v.dare.seed}" for i, v in enumerate(recipe.vectors) if v.dare
    ]
    lines += [f"DARE on {'; '.join(dares)}"] if dares else []
    for tp in planned.targets:
        lay, t = tp.layout, tp.target
        rules = Counter(p.tensor.rule for p in lay.tensors)
        lines.append(
            f"target {t.name} → {t.out or '(no output)'}: alphas {list(t.alphas)}, {counted(len(lay.tensors), 'tensor')} "
            f"({', '.join(f'{n} {r}' for r, n in sorted(rules.items()))}), {counted(len(lay.shards), 'shard')}"
        )
        mapped = sum(p.tensor.reason == "experts:mapped" for p in lay.tensors)
        if mapped:  # one line: an MoE has thousands
            lines.append(f"  {counted(mapped, 'expert tensor')}: merge (experts:mapped, vectors in the other layout)")
        scales = sum(p.tensor.rule == SCALE_RULE for p in lay.tensors)
        if scales:  # one line: an FP8 checkpoint has one per weight
            lines.append(f"  {counted(scales, 'FP8 scale tensor')}: computed with its weight (rule scale)")
        if tp.token_rows:
            shown = ", ".join(f"{r.token or ''} {r.cp}←{r.chat}".strip() for r in tp.token_rows[:8])
            more = f", … ({len(tp.token_rows)} in all)" if len(tp.token_rows) > 8 else ""
            lines.append(f"  special tokens: CP row ← chat row: {shown}{more}")
        lines += rule_lines(tp)
        if t.ties is not None:
            lines.append(f"  TIES density {t.ties.density:g}: a pre-pass reads its vectors twice more")
        for p in lay.tensors:
            if p.tensor.reason not in ("", "non-float", "experts:mapped") and p.tensor.rule != SCALE_RULE:
                rows = f", {len(p.tensor.rows)} token rows from chat" if p.tensor.rows else ""
                lines.append(
                    f"  {p.tensor.name}: {p.tensor.rule} ({p.tensor.reason}, shape {list(p.tensor.shape)}, "
                    f"merged elements {p.tensor.merge_elems}{rows})"
                )
    return "\n".join([*lines, needs(planned)])


def needs(planned: Planned) -> str:
    """What the run will hold: input files, the driver's tally (~1.2 KB per tensor, and the block digests of the
    tensors still incomplete, their sources' too: ~0.25 KB per output block, about the largest tensor's), and a
    worker's buffers (a unit's inputs and output; a unit per s3:// output for its parts)."""
    files = {f for tp in planned.targets for p in tp.layout.tensors for s in p.tensor.srcs for f in s.files}
    shards = sum(len(tp.layout.shards) for tp in planned.targets)
    blocks = max((-(-p.nbytes // planned.block_bytes) for tp in planned.targets for p in tp.layout.tensors), default=0)
    tensors = sum(len(tp.layout.tensors) for tp in planned.targets)
    driver = 256 * blocks * len(planned.targets) + 1200 * tensors  # measured: 1.16 KB per tensor
    unit = max([planned.recipe.unit_bytes, *(u.nbytes for u in planned.units)])  # a whole FP8 weight is one unit
    return (
        f"needs: {counted(len(files), 'input file')} and {counted(shards, 'output shard')} (open files per worker "
        f"are bounded), about {human_bytes(driver)} of driver memory for the manifest, and buffers of a few units "
        f"per worker (up to {human_bytes(unit, binary=True)} each)"
    )


def counted(n: int, word: str) -> str:
    """`1 unit`, `3 units`."""
    return f"{n} {word}{'s' * (n != 1)}"
