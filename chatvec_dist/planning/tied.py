"""A tied CP that stores its head: `lm_head.weight` combined with the vectors' input embedding, which is their head."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import PlanError

if TYPE_CHECKING:
    from .planner import Sources

HEAD = "lm_head.weight"
# A tied model's input embedding, which serves as its output head.
INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|shared)\.weight$")


def tied_heads(sources: Sources) -> dict[str, str]:
    """`{HEAD: embedding}` where a tied CP stores `lm_head.weight` and no chat or base model does, their head being
    their input embedding (no config says `tie_word_embeddings: false`, as an untied model's does): CP's head then
    gets the embedding's update, as in a model that ties them. Otherwise `{}` (the name sets are checked as usual)."""
    vectors = [c for _, plus, minus in sources.terms for c in (plus, minus) if c is not None]
    if sources.cp is None or HEAD not in sources.cp.tensors or any(HEAD in c.tensors for c in vectors):
        return {}
    if any(c.config.get("tie_word_embeddings") is False for c in [sources.cp, *vectors]):  # untied: false, always
        return {}
    shared = set.intersection(*({n for n in c.tensors if INPUT_EMBEDDING.search(n)} for c in vectors))
    found = sorted(shared)
    if len(found) > 1:  # T5/BART may store `shared` and each tower's copy of it: `shared` is the one tied
        found = [n for n in found if n.endswith("shared.weight")] or found
    if len(found) > 1:
        raise PlanError(
            f"stored here but not in {vectors[0].directory}, whose tied head could be any of {found} "
            "(--exclude it to keep CP's head)",
            file=sources.cp.tensors[HEAD].path,
            tensor=HEAD,
        )
    return {HEAD: found[0]} if found else {}  # none: the name sets' check says what is missing
