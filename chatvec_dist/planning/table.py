"""The plan as an Arrow table, and its one-screen summary for `chatvec plan`."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import pyarrow as pa

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
        }
        for p in layout.tensors
    ]
    return pa.Table.from_pylist(rows)


def summary(planned: Planned) -> str:
    from .plan import unit_io_bytes

    io = sum(unit_io_bytes(u, planned) for u in planned.units)
    written = sum(p.nbytes for tp in planned.targets for p in tp.layout.tensors)
    lines = [
        f"{planned.recipe.kind}: {len(planned.recipe.vectors)} vector(s), {len(planned.targets)} target(s); "
        f"{(io - written) / 1e9:.3f} GB read, {written / 1e9:.3f} GB written; "
        f"{len(planned.units)} units of up to {planned.recipe.unit_bytes / 2**20:g} MiB"
    ]
    for tp in planned.targets:
        lay, t = tp.layout, tp.target
        rules = Counter(p.tensor.rule for p in lay.tensors)
        lines.append(
            f"target {t.name} → {t.out or '(no output)'}: alphas {list(t.alphas)}, {len(lay.tensors)} tensors "
            f"({', '.join(f'{n} {r}' for r, n in sorted(rules.items()))}), {len(lay.shards)} shard(s)"
        )
        for p in lay.tensors:
            if p.tensor.reason and p.tensor.reason != "non-float":
                lines.append(
                    f"  {p.tensor.name}: {p.tensor.rule} ({p.tensor.reason}, shape {list(p.tensor.shape)}, "
                    f"merged elements {p.tensor.merge_elems})"
                )
    return "\n".join(lines)
