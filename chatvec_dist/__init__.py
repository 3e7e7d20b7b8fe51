"""chatvec_dist: add chat vectors (chat − base) to continually pre-trained models, at scale, on Ray."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import make_recipe, merge, plan, run, verify  # noqa: E402
from .errors import ChatvecError  # noqa: E402  (every error the API raises about its input)
from .recipe.alpha_rules import AlphaRule  # noqa: E402
from .recipe.spec import Dare, Recipe, RunOptions, Target, Ties, Vector  # noqa: E402

__all__ = [
    "AlphaRule",
    "ChatvecError",
    "Dare",
    "Recipe",
    "RunOptions",
    "Target",
    "Ties",
    "Vector",
    "make_recipe",
    "merge",
    "plan",
    "run",
    "verify",
]
