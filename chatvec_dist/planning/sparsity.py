"""DARE and TIES as planned: what each merged tensor's kernel needs, fixed from the recipe and the tensor's name
(no torch: the driver plans). The mask's definition lives here and in the kernels (`kernels/sparse.py`, the
Triton kernel); see docs/exactness.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from ..recipe.spec import Dare, Ties

if TYPE_CHECKING:
    from .planner import PlannedTensor

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer (a bijection of 32-bit words)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def salt(seed: int, name: str) -> int:
    """A tensor's 32-bit salt: its name's xxh64 key (two 32-bit halves) mixed with the vector's seed."""
    key = xxhash.xxh64_intdigest(name.encode("utf-8"))
    return fmix32((key >> 32) ^ fmix32((key & M32) ^ fmix32(seed ^ GOLDEN)))


def keep_bits(s: int, index: int) -> int:
    """The 32-bit word element `index` (flat, within its tensor) of a tensor with salt `s` draws: kept where it is
    below the term's threshold. (The kernels compute the same on tensors.)"""
    high = fmix32((index >> 32) ^ s)
    return fmix32(fmix32((index & M32) ^ high) ^ s)


@dataclass(frozen=True)
class TermDare:
    """One vector's DARE in one tensor: elements whose `keep_bits` are below `threshold` are kept, scaled by
    1/density (folded into the term's alpha: alpha/density in float64, rounded once to the compute dtype)."""

    density: float
    salt: int
    threshold: int  # round(density · 2^32), at most 2^32 − 1 (density < 1)


@dataclass(frozen=True)
class TiesPlan:
    """TIES in one tensor: each vector's trim size `keep` (elements of the merged part), and, once the pre-pass
    (`planning/ties_select.py`) has found them, each vector's magnitude threshold as a float32 bit pattern: an
    element is kept where |Δ| (rounded to float32) ≥ it."""

    density: float
    normalize: bool
    keep: int
    thresholds: tuple[int, ...] | None = None


def term_dare(dare: Dare | None, name: str) -> TermDare | None:
    """A vector's DARE in tensor `name`; None at density 1 (every element kept, unscaled)."""
    if dare is None or dare.density >= 1:
        return None
    return TermDare(dare.density, salt(dare.seed, name), min(M32, round(dare.density * 2**32)))


def ties_keep(density: float, merged: int) -> int:
    """Elements each vector keeps: mergekit's int(density · n), but at least one (mergekit refuses 0)."""
    return merged if density >= 1 else max(1, min(merged, int(density * merged)))


def sparsify(tensor: PlannedTensor, dares: tuple[Dare | None, ...], ties: Ties | None) -> PlannedTensor:
    """`tensor` with its vectors' DARE and its target's TIES, where it is merged."""
    if not tensor.terms or not tensor.merge_elems or (ties is None and not any(dares)):
        return tensor
    planned = tuple(term_dare(d, tensor.name) for d in dares)
    dare = planned if any(d is not None for d in planned) else ()
    plan = None
    if ties is not None:
        keep = ties_keep(ties.density, tensor.merge_elems)
        every = (0,) * len(tensor.terms) if keep == tensor.merge_elems else None  # nothing trimmed: no pre-pass
        plan = TiesPlan(ties.density, ties.normalize, keep, every)
    return dataclasses.replace(tensor, dare=dare, ties=plan)
