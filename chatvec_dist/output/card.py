"""The model card (README.md) of an output: recipe, sources, the paper, the largest updates."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import printable

PAPER = (
    "Huang et al., *Chat Vector: A Simple Approach to Equip LLMs with Instruction Following and Model "
    "Alignment in New Languages*, ACL 2024 (arXiv:2310.04799)"
)


def model_card(meta: dict, manifest: pa.Table, top: int = 10) -> str:
    """Render the card from the manifest's metadata and rows."""
    # Not `huggingface_hub.ModelCard`: it imports the Hub client (0.3 s); the card is its front matter and body.
    from huggingface_hub.repocard_data import ModelCardData

    sources = meta["sources"]
    parents = [sources.get("cp") or {}] + [v.get(k) or {} for v in sources["vectors"] for k in ("chat", "base")]
    repos = list(dict.fromkeys(p["repo"] for p in parents if p.get("repo")))  # Hub parents, CP first
    merged = meta["kind"] != "extract" and len(repos) > 1
    data = ModelCardData(
        base_model=repos if merged else repos[0] if repos else None,
        base_model_relation="merge" if merged else None,
        tags=["chat-vector", "merge", "chatvec_dist"],
        library_name="transformers" if meta["kind"] != "extract" else None,
    )
    rows = _largest_updates(manifest, top)
    table = "\n".join(f"| {_code(r['tensor'])} | {r['rule']} | {r['rel_update']:.3e} |" for r in rows)
    nan, inf = (pc.fill_null(manifest.column(c), 0) for c in ("nan_count", "inf_count"))
    nonfinite = pc.sum(pc.greater(pc.add(nan, inf), 0)).as_py() or 0
    what = {
        "merge": "a CP model with chat vectors added",
        "apply": "a CP model with an extracted chat vector added",
        "extract": "a chat vector (chat − base), to be added to a CP model later",
    }[meta["kind"]]
    body = f"""
# {_code(meta["target"])}

This checkpoint is {what}, made by chatvec_dist {meta["version"]} with the *chat vector* method: {PAPER}.

`out = cp + Σ alpha_i · (chat_i − base_i)`, computed per tensor in float32 (float64 where a float32 or float64
tensor is involved) and rounded to the output dtype. `manifest.parquet` beside this card audits every tensor
(rule, hash, norms, NaN/Inf counts); `chatvec verify .` rehashes the shards against it.
Tensors holding NaN or Inf: {nonfinite or "none"}.{_sparsity(meta)}{_token_rows(meta)}

## Recipe
```json
{json.dumps(meta["recipe"], indent=2)}
```

{_rules_section(meta)}## Sources
```json
{json.dumps(sources, indent=2)}
```

## Largest relative updates ‖out − cp‖ / ‖cp‖
| tensor | rule | relative update |
|---|---|---|
{table}
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _largest_updates(manifest: pa.Table, top: int) -> list[dict]:
    """The `top` rows of the largest finite `rel_update`, largest first (in row order where equal)."""
    rows = manifest.select(["tensor", "rule", "rel_update"])
    rows = rows.filter(pc.fill_null(pc.is_finite(rows.column("rel_update")), False))
    order = pc.sort_indices(rows, [("rel_update", "descending")])  # stable
    return rows.take(order[:top]).to_pylist()


def _sparsity(meta: dict) -> str:
    """A line on DARE and TIES, which change the formula above, where the recipe used them."""
    recipe = meta["recipe"]
    target: dict = next((t for t in recipe.get("targets") or [] if t.get("name") == meta["target"]), {})
    dares = [f"vector {i}: density {v['dare']['density']:g}" for i, v in enumerate(recipe["vectors"]) if v.get("dare")]
    line = f"\nDARE: each Δ element kept at random, rescaled by 1/density ({'; '.join(dares)})." if dares else ""
    ties = target.get("ties")
    if ties:
        divided = " and divided by the sum of their alphas" if ties.get("normalize") else ""
        line += (
            f"\nTIES density {ties['density']:g}: each vector trimmed to its largest magnitudes, a sign elected per "
            f"element, the agreeing entries added by alpha{divided}. The manifest's `density` and `sign_agreement` "
            "columns have each tensor's."
        )
    return line


def _token_rows(meta: dict) -> str:
    """A line on the chat-template token rows (`special_tokens`), where any were taken from the chat model."""
    rows = meta.get("special_tokens") or []
    if not rows:
        return ""
    shown = ", ".join(_code(f"{r['token'] or ''} {r['cp']}←{r['chat']}".strip()) for r in rows)
    return f"\nToken rows taken from the chat model (CP row ← chat row) in the embeddings and LM head: {shown}."


def _rules_section(meta: dict) -> str:
    """The target's alpha rules as a table (first match wins; other tensors get the target's alphas), or nothing."""
    targets = meta["recipe"].get("targets") or []
    target = next((t for t in targets if isinstance(t, dict) and t.get("name") == meta["target"]), {})
    rules = target.get("alpha_rules") or []
    if not rules:
        return ""
    rows = "\n".join(f"| {_code(str(r['match']))} | {_code(json.dumps(r['alphas']))} |" for r in rules)
    return f"""## Alpha rules
Each tensor gets the alphas of the first rule whose regex matches its name (a list: a gradient from a tower's
first layer to its last); other tensors get {_code(json.dumps(target.get("alphas")))}. The manifest's `alphas`
column has each tensor's.

| match | alphas (one per vector) |
|---|---|
{rows}

"""


def _code(text: str) -> str:
    """`text` as a Markdown code span nothing in it can close or break out of (backticks, table pipes, controls)."""
    text = printable(text).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"
