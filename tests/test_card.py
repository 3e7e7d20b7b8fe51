"""The model card is rendered without huggingface_hub's ModelCard (its import pulls in the Hub client): it must be
the very text ModelCard made of it, and the Hub's parser must read its metadata back."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pyarrow as pa
import pytest
from huggingface_hub import ModelCard

from chatvec_dist.output.card import model_card


def meta(kind: str, cp: dict | None, vectors: list[dict]) -> dict:
    recipe = {
        "vectors": [{"chat": "c", "base": "b", "dare": None} for _ in vectors],
        "targets": [{"name": "zh|`x`", "alphas": [0.5], "alpha_rules": [{"match": "mlp", "alphas": [0.25]}]}],
    }
    return {
        "version": "9.9",
        "kind": kind,
        "target": "zh|`x`",
        "recipe": recipe,
        "sources": {"cp": cp, "vectors": vectors},
        "special_tokens": [{"cp": 3, "chat": 7, "token": "<|eot|>"}],
    }


MANIFEST = pa.table(
    {
        "tensor": ["a.weight", "b|`weight`", "c.weight"],
        "rule": ["merge", "merge", "copy"],
        "rel_update": [0.25, float("nan"), None],
        "nan_count": [0, 2, None],
        "inf_count": [1, 0, None],
    }
)
HUB = {"repo": "org/cp", "commit": "abc"}


@pytest.mark.parametrize(
    "kind, cp, vectors, metadata",
    [
        (  # a merge of Hub models: every parent, CP first
            "merge",
            HUB,
            [{"chat": {"repo": "org/chat"}, "base": {"repo": "org/base"}}],
            {
                "base_model": ["org/cp", "org/chat", "org/base"],
                "base_model_relation": "merge",
                "library_name": "transformers",
            },
        ),
        (  # local folders: no parent
            "merge",
            {"path": "/m/cp"},
            [{"chat": {"path": "/m/chat"}, "base": {"path": "/m/base"}}],
            {"library_name": "transformers"},
        ),
        (  # one Hub parent: not a list, no relation
            "extract",
            None,
            [{"chat": {"repo": "org/chat"}, "base": {"path": "/m/base"}}],
            {"base_model": "org/chat"},
        ),
        (
            "apply",
            {"path": "/m/cp"},
            [{"chat": {"repo": "org/vec"}, "base": None}, {"chat": {"repo": "org/v2"}, "base": None}],
            {"base_model": ["org/vec", "org/v2"], "base_model_relation": "merge", "library_name": "transformers"},
        ),
    ],
)
def test_the_card_is_what_modelcard_makes_of_it_and_reads_back(kind, cp, vectors, metadata, tmp_path):
    card = model_card(meta(kind, cp, vectors), MANIFEST)
    parsed = ModelCard(card)
    assert str(parsed) == card  # what chatvec wrote through ModelCard before
    assert parsed.data.to_dict() == {**metadata, "tags": ["chat-vector", "merge", "chatvec_dist"]}
    assert parsed.text.startswith("\n# `` zh\\|`x` ``\n") and "| `a.weight` | merge | 2.500e-01 |" in parsed.text
    (tmp_path / "README.md").write_text(card, encoding="utf-8")
    assert ModelCard.load(tmp_path / "README.md").data.to_dict() == parsed.data.to_dict()


def test_rendering_the_card_does_not_import_the_hub_client():
    code = (
        "import sys, pyarrow as pa\n"
        "from chatvec_dist.output.card import model_card\n"
        "meta = {'version': '1', 'kind': 'merge', 'target': 't', 'recipe': {'vectors': []}, 'special_tokens': None,\n"
        "        'sources': {'cp': {'repo': 'o/cp'}, 'vectors': [{'chat': {'repo': 'o/c'}, 'base': None}]}}\n"
        "empty = pa.table({c: pa.array([], pa.float64()) for c in ('rel_update', 'nan_count', 'inf_count')})\n"
        "card = model_card(meta, empty.append_column('tensor', pa.array([], pa.string()))"
        ".append_column('rule', pa.array([], pa.string())))\n"
        "assert card.startswith('---\\nbase_model:\\n- o/cp\\n- o/c\\n'), card\n"
        "print(sorted(m for m in sys.modules if m.startswith(('huggingface_hub.hf_api', 'huggingface_hub.repocard', "
        "'httpx'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['huggingface_hub.repocard_data']"


def test_the_card_lists_the_largest_finite_updates_in_row_order_where_equal():
    """Against the rows sorted here in Python (stable): ties (0.0 and -0.0 too) keep row order; NaN, Inf and
    nulls are left out; the count of tensors with NaN or Inf is every row with either."""
    rng = random.Random(3)
    values = [0.0, -0.0, 0.5, 0.25, 1.0, float("nan"), float("inf"), None]
    rel = [rng.choice(values + [rng.random()]) for _ in range(60)]
    nan = [rng.choice([0, 0, 0, 2, None]) for _ in rel]
    inf = [rng.choice([0, 0, 0, 1, None]) for _ in rel]
    names = [f"t{i}" for i in range(len(rel))]
    table = pa.table(
        {"tensor": names, "rule": ["merge"] * len(rel), "rel_update": rel, "nan_count": nan, "inf_count": inf}
    )
    finite = [(n, r) for n, r in zip(names, rel) if r is not None and math.isfinite(r)]
    want = sorted(finite, key=lambda row: -row[1])[:10]
    card = model_card(meta("merge", None, [{"chat": {"path": "/c"}, "base": None}]), table)
    lines = [line for line in card.splitlines() if line.startswith("| `t")]
    assert lines == [f"| `{n}` | merge | {r:.3e} |" for n, r in want]
    assert f"Tensors holding NaN or Inf: {sum(1 for a, b in zip(nan, inf) if (a or 0) + (b or 0))}." in card
