"""The Python API: the same operations as the CLI, sharing its recipe objects."""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union, cast

from .errors import ChatvecError
from .recipe.alpha_rules import AlphaRule, parse_alpha_rule
from .recipe.spec import (
    ALPHA,
    Dare,
    Recipe,
    RunOptions,
    Target,
    Ties,
    Vector,
    broadcast_alphas,
    is_plain_name,
    output_under,
)

if TYPE_CHECKING:
    from .planning.plan import Planned

PathText = Union[str, "os.PathLike[str]"]


def make_recipe(
    base: PathText | list[PathText | None] | None,
    chat: PathText | list[PathText],
    cp: PathText | dict[str, PathText],
    out: PathText,
    alpha: float | list[float] = ALPHA,
    *,
    vocab: str = Target.vocab,
    exclude: str | tuple[str, ...] = Target.exclude,
    dtype: str | None = Target.dtype,
    alpha_rules: tuple[AlphaRule | str, ...] | list[AlphaRule | str] = Target.alpha_rules,
    special_tokens: str | dict[int, int] | None = None,
    max_shard_size: int = Recipe.max_shard_size,
    unit_bytes: int = Recipe.unit_bytes,
    chat_template_from_chat: bool = Recipe.chat_template_from_chat,
    dare: Dare | list[Dare | None] | None = None,
    ties: Ties | None = Target.ties,
) -> Recipe:
    """A recipe for `cp + Σ alpha_i (chat_i − base_i)`; `cp` may map target names to CPs (outputs go under `out`).
    `alpha`: one value for every vector, or a list with one per vector (an alpha sweep is one call per value).
    Paths are text or `pathlib.Path`; `exclude` is one regex or several; `alpha_rules` are `AlphaRule`s or text as
    `--alpha-rule` takes it (`'norm=0'`, `'mlp\\.=0.5:1'`), the first match wins; `special_tokens`: "auto" or
    {CP id: chat id}, CP's embedding and LM head rows that become the first chat model's. `dare`: one `Dare` for
    every vector or one per vector; `ties`: TIES across the vectors (e.g. `Ties(0.2)`)."""
    chats = list(chat) if isinstance(chat, (list, tuple)) else [chat]  # each then checked by Vector
    bases = list(base) if isinstance(base, (list, tuple)) else [base]
    if len(bases) != len(chats):
        raise ChatvecError(f"{len(bases)} base(s) for {len(chats)} chat model(s): give one base per chat model")
    dares = broadcast_alphas(dare if isinstance(dare, (list, tuple)) else [dare], len(chats), "dare")
    vectors = tuple(
        Vector(cast(str, c), cast("str | None", b), d) for c, b, d in zip(chats, bases, dares)
    )  # checked there
    alphas = _alphas(alpha, len(vectors))
    if isinstance(cp, dict):
        for name in cp:
            if not is_plain_name(name):
                raise ChatvecError(f"target name {name!r}: give a plain name (its output goes to {out}/NAME)")
        outs = {name: output_under(out, name) for name in cp}
    else:
        outs = {Path(out).name: cast(str, out)}
        cp = {Path(out).name: cp}
    cps = cast(dict[str, str], cp)  # each path checked by Target
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    tokens = tuple(special_tokens.items()) if isinstance(special_tokens, dict) else special_tokens
    rules = tuple(_alpha_rule(r) for r in alpha_rules)
    targets = tuple(
        Target(
            name, path, outs[name], alphas, vocab, exclude, dtype, alpha_rules=rules, special_tokens=tokens, ties=ties
        )
        for name, path in cps.items()
    )
    return Recipe(
        vectors,
        targets,
        max_shard_size=max_shard_size,
        unit_bytes=unit_bytes,
        chat_template_from_chat=chat_template_from_chat,
    )


def _alphas(alpha: object, n_vectors: int) -> tuple[float, ...]:
    """`alpha` as one float per vector: a number (for every vector) or a list of them (one per vector)."""
    values = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha]
    if not all(isinstance(a, numbers.Real) and not isinstance(a, bool) for a in values):  # numpy's too
        raise ChatvecError(f"alpha {alpha!r}: give a number, or a list of numbers (one per vector)")
    return broadcast_alphas([float(cast(float, a)) for a in values], n_vectors, "alpha")


def _alpha_rule(rule: AlphaRule | str) -> AlphaRule:
    """An AlphaRule as given (checked by Target), or one from `--alpha-rule` text."""
    if not isinstance(rule, str):
        return rule
    try:
        return parse_alpha_rule(rule)
    except ValueError as e:
        raise ChatvecError(str(e).replace("--alpha-rule", "alpha rule", 1)) from None


def plan(recipe: Recipe) -> Planned:
    """Validate and lay out a recipe from headers alone (nothing is written)."""
    from . import job

    return job.plan(recipe)


def run(recipe: Recipe | str | Path, options: RunOptions | None = None) -> list[Path]:
    """Run a recipe (or a recipe file); return the output directories."""
    from . import job
    from .recipe.file import load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    recipe.check_runnable()
    return [output.path for output in job.run(recipe, options or RunOptions())]


def merge(
    base: PathText | list[PathText | None] | None,
    chat: PathText | list[PathText],
    cp: PathText | dict[str, PathText],
    out: PathText,
    alpha: float | list[float] = 1.0,
    *,
    options: RunOptions | None = None,
    **recipe_options,
) -> list[Path]:
    """`out = cp + Σ alpha_i (chat_i − base_i)`, like `chatvec merge`."""
    return run(make_recipe(base, chat, cp, out, alpha, **recipe_options), options)


def verify(out: str | Path, sources: bool = False) -> list[str]:
    """Rehash an output (a folder or an `s3://bucket/prefix`) against its manifest (with `sources`, reread and
    rehash its source tensors too); the problems found (empty: verified)."""
    from .output.verify import verify as _verify

    return _verify(out, sources=sources)
