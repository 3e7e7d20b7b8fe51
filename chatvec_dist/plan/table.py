"""The plan as an Arrow table, and its one-screen summary for `chatvec plan`."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa

from ..dtypes import ITEMSIZE
from .layout import Layout


def plan_table(layout: Layout) -> pa.Table:
    rows = [{
        "tensor": p.tensor.name, "rule": p.tensor.rule, "reason": p.tensor.reason, "shape": list(p.tensor.shape),
        "dtype_out": p.tensor.out_dtype, "dtype_cp": p.tensor.cp.dtype if p.tensor.cp else None,
        "merge_elems": p.tensor.merge_elems, "shard": layout.shards[p.shard].name, "offset": p.offset, "nbytes": p.nbytes,
    } for p in layout.tensors]
    return pa.Table.from_pylist(rows)


def input_bytes(layout: Layout) -> int:
    total = 0
    for p in layout.tensors:
        t = p.tensor
        if t.cp is not None:
            total += t.numel * ITEMSIZE[t.cp.dtype]
        for _, plus, minus in t.terms:
            total += t.merge_elems * sum(ITEMSIZE[s.dtype] for s in (plus, minus) if s)
    return total


def summary(layout: Layout) -> str:
    rules = Counter(p.tensor.rule for p in layout.tensors)
    out_bytes = sum(p.nbytes for p in layout.tensors)
    lines = [
        f"tensors: {len(layout.tensors)} ({', '.join(f'{n} {r}' for r, n in sorted(rules.items()))})",
        f"bytes: {input_bytes(layout) / 1e9:.3f} GB read, {out_bytes / 1e9:.3f} GB written",
        f"shards: {len(layout.shards)}; units: {len(layout.units)} of up to {layout.unit_bytes / 2**20:g} MiB",
    ]
    for p in layout.tensors:
        t = p.tensor
        if t.reason and t.reason != "non-float":
            lines.append(f"  {t.name}: {t.rule} ({t.reason}, shape {list(t.shape)}, merged elements {t.merge_elems})")
    return "\n".join(lines)
