"""`chatvec inspect`: an audit of what a manifest says, per layer, with anything unusual flagged."""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ChatvecError, printable
from ..recipe.spec import human_bytes
from .manifest import read_manifest

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LAYER = re.compile(r"\.(\d+)\.")
OUTLIER_FACTOR = 10.0  # an update this many times its siblings' median is flagged


def kind_of(name: str) -> str:
    """The tensor's name with its layer number replaced: siblings across layers share a kind."""
    return LAYER.sub(".*.", name, count=1)


def layer_of(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def per_layer(rows: list[dict]) -> dict[int, float]:
    """‖out − cp‖ / ‖cp‖ of each layer as a whole (squares summed over its tensors)."""
    update: defaultdict[int, float] = defaultdict(float)
    base: defaultdict[int, float] = defaultdict(float)
    for r in rows:
        layer = layer_of(r["tensor"])
        if layer is not None and r["rel_update"] is not None and math.isfinite(r["rel_update"]) and r["cp_norm"]:
            update[layer] += (r["rel_update"] * r["cp_norm"]) ** 2
            base[layer] += r["cp_norm"] ** 2
    return {k: (update[k] / base[k]) ** 0.5 for k in sorted(update) if base[k]}


def outliers(rows: list[dict]) -> list[tuple[str, float, float]]:
    """Tensors whose relative update is far above their siblings' median: (name, value, median), by name."""
    updated = [r for r in rows if r["rel_update"] is not None and math.isfinite(r["rel_update"])]
    if not updated:
        return []
    overall = statistics.median(r["rel_update"] for r in updated)
    groups = defaultdict(list)
    for r in updated:
        groups[kind_of(r["tensor"])].append(r)
    found = []
    for members in groups.values():  # siblings across layers where there are enough, else the whole model
        median = statistics.median(r["rel_update"] for r in members) if len(members) >= 3 else overall
        found += [
            (r["tensor"], r["rel_update"], median)
            for r in members
            if median > 0 and r["rel_update"] > OUTLIER_FACTOR * median
        ]
    return sorted(found)


def report(out_dir: str | Path) -> str:
    """The audit `chatvec inspect` prints (of a folder or an `s3://` prefix); tensors listed by name."""
    table, meta = read_manifest(out_dir)
    rows = sorted(table.to_pylist(), key=lambda r: r["tensor"])
    rules = Counter((r["rule"], r["reason"] or "-") for r in rows)
    lines = [
        f"{out_dir}: {meta.get('kind')} by chatvec_dist {meta.get('version')}, target '{meta.get('target')}', "
        f"{len(rows)} tensors, {human_bytes(sum(r['nbytes'] for r in rows))}"
    ]
    lines += [f"  {n:5d} × {rule} ({reason})" for (rule, reason), n in sorted(rules.items())]
    vocab = [r for r in rows if r["reason"].startswith("vocab:")]
    if vocab:
        lines.append("vocabulary: " + ", ".join(f"{r['tensor']} {r['shape']} → {r['reason']}" for r in vocab))
    if meta.get("special_tokens"):
        taken = ", ".join(
            f"{r.get('token') or ''} {r.get('cp')}←{r.get('chat')}".strip() for r in meta["special_tokens"]
        )
        lines.append(f"token rows from the chat model (CP row ← chat row): {taken}")
    alphas = Counter(tuple(r["alphas"]) for r in rows if r.get("alphas") is not None)  # absent: an older manifest
    if len(alphas) > 1:  # alpha rules gave tensors different alphas (a gradient: one set per layer)
        sets = sorted(alphas.items())
        shown = (
            ", ".join(f"{n} × {list(a)}" for a, n in sets)
            if len(sets) <= 8
            else f"from {list(sets[0][0])} to {list(sets[-1][0])}"
        )
        lines.append(f"alphas ({len(sets)} sets; tensors × alphas): {shown}")
    lines += sparsity_lines(rows)
    nonfinite = [r for r in rows if (r["nan_count"] or 0) + (r["inf_count"] or 0)]
    lines.append(
        "non-finite values: "
        + (", ".join(f"{r['tensor']} ({r['nan_count']} NaN, {r['inf_count']} Inf)" for r in nonfinite) or "none")
    )
    layers = per_layer(rows)
    if layers:
        lines.append("per-layer ‖out − cp‖ / ‖cp‖:")
        lines += [f"  layer {k:3d}  {v:.3e}" for k, v in layers.items()]
    odd = outliers(rows)
    lines.append(
        "unusual: " + ("; ".join(f"{n} update {v:.2e} vs a median of {m:.2e}" for n, v, m in odd) or "nothing")
    )
    return "\n".join(printable(line) for line in lines)  # names from the manifest: no terminal escapes


def sparsity_lines(rows: list[dict]) -> list[str]:
    """DARE/TIES: each vector's kept share of the merged elements over the tensors (the `density` column), and
    TIES' sign agreement (`sign_agreement`); nothing for a merge without them or an older manifest."""
    kept = [r["density"] for r in rows if r.get("density")]
    lines = []
    if kept:
        spans = [f"vector {i} {min(k):.3f}–{max(k):.3f}" for i, k in enumerate(zip(*kept))]
        lines.append(f"kept by DARE/TIES (share of merged elements, over {len(kept)} tensors): {', '.join(spans)}")
    agree = [r["sign_agreement"] for r in rows if r.get("sign_agreement") is not None]
    if agree:
        lines.append(f"TIES sign agreement: {min(agree):.3f}–{max(agree):.3f}, median {statistics.median(agree):.3f}")
    return lines


def plot(out_dir: str | Path, png: str | Path) -> None:
    """Per-layer relative update norms as a PNG (needs matplotlib: pip install 'chatvec-dist[plot]')."""
    fig = figure(out_dir)
    try:
        fig.savefig(png, dpi=110)
    except (OSError, ValueError) as e:  # a folder that is not there, a format matplotlib does not write
        raise ChatvecError(f"cannot write the plot: {e}", file=str(png)) from None


def figure(out_dir: str | Path) -> Figure:
    """The bar chart `plot` saves: one bar per layer, at whole-number ticks."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ChatvecError("--plot needs matplotlib: pip install 'chatvec-dist[plot]'") from None
    table, meta = read_manifest(out_dir)
    layers = per_layer(table.to_pylist())
    fig = Figure(figsize=(8, 3.5))  # not pyplot's: no global state, no GUI backend
    ax = fig.subplots()
    ax.bar(list(layers), list(layers.values()), color="#4477aa")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are numbered: no 2.5
    ax.set_xlabel("layer")
    ax.set_ylabel("‖out − cp‖ / ‖cp‖")
    ax.set_title(f"{meta.get('target')}: relative update per layer")
    fig.tight_layout()
    return fig
