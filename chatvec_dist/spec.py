"""The recipe (what to compute) and the run options (how), as frozen dataclasses."""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
VOCAB_POLICIES = ("auto", "skip", "overlap", "full")


@dataclass(frozen=True)
class Term:
    """One chat vector scaled by alpha: `alpha * (plus - minus)`; `minus` is None for an extracted vector."""

    plus: str
    minus: str | None
    alpha: float = 1.0


@dataclass(frozen=True)
class Recipe:
    """`out = cp + Σ alpha_i · (plus_i − minus_i)`, or without `cp` the chat vector itself (extract)."""

    terms: tuple[Term, ...]
    cp: str | None
    out: str
    vocab: str = "auto"
    exclude: tuple[str, ...] = ()
    dtype: str | None = None  # output dtype name; default: CP's (float32 for an extracted vector)
    max_shard_size: int = 5 * 10**9
    unit_bytes: int = 64 * MiB
    chat_template_from_chat: bool = False

    @property
    def kind(self) -> str:
        if self.cp is None:
            return "extract"
        return "apply" if all(t.minus is None for t in self.terms) else "merge"


@dataclass(frozen=True)
class RunOptions:
    """How to execute a recipe."""

    backend: str = "ray"  # ray | local
    workers: int | None = None  # default: one per CPU of the local machine / cluster
    cpus_per_worker: float = 1.0  # Ray CPUs each actor reserves
    address: str | None = None  # Ray cluster to join; default: RAY_ADDRESS or an embedded local Ray
    overwrite: bool = False
    restart: bool = False
    progress: bool = True
