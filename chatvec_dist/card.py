"""The model card (README.md) of an output: recipe, sources, the paper, the largest updates."""
from __future__ import annotations

import json

import pyarrow as pa

PAPER = ("Huang et al., *Chat Vector: A Simple Approach to Equip LLMs with Instruction Following and Model "
         "Alignment in New Languages*, ACL 2024 (arXiv:2310.04799)")


def model_card(meta: dict, manifest: pa.Table, top: int = 10) -> str:
    """Render the card from the manifest's metadata and rows."""
    from huggingface_hub import ModelCard, ModelCardData  # 0.3 s to import: only at commit

    sources = meta["sources"]
    cp = sources.get("cp") or {}
    data = ModelCardData(base_model=cp.get("repo"), tags=["chat-vector", "merge", "chatvec_dist"],
                         library_name="transformers" if meta["kind"] != "extract" else None)
    rows = [r for r in manifest.to_pylist() if r["rel_update"] is not None]
    rows.sort(key=lambda r: -r["rel_update"])
    table = "\n".join(f"| `{r['tensor']}` | {r['rule']} | {r['rel_update']:.3e} |" for r in rows[:top])
    what = {"merge": "a CP model with chat vectors added", "apply": "a CP model with an extracted chat vector added",
            "extract": "a chat vector (chat − base), to be added to a CP model later"}[meta["kind"]]
    body = f"""
# {meta['target']}

This checkpoint is {what}, made by chatvec_dist {meta['version']} with the *chat vector* method: {PAPER}.

`out = cp + Σ alpha_i · (chat_i − base_i)`, computed per tensor in float32 (float64 where a float32 tensor is
involved) and rounded once to the output dtype. `manifest.parquet` beside this card audits every tensor
(rule, hash, norms, NaN/Inf counts); `chatvec verify .` rehashes the shards against it.

## Recipe
```json
{json.dumps(meta['recipe'], indent=2)}
```

## Sources
```json
{json.dumps(sources, indent=2)}
```

## Largest relative updates ‖out − cp‖ / ‖cp‖
| tensor | rule | relative update |
|---|---|---|
{table}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
