"""The fused CPU kernel (numba) against the float64 reference and against the chunked torch kernel it replaces:
the same bytes, the same NaN/Inf counts, norms within float32 summation error."""

from __future__ import annotations

import math

import pytest
import torch

from chatvec_dist.kernels import cpu
from chatvec_dist.kernels.cpu import FUSED_MIN, Scratch, combine
from chatvec_dist.kernels.cpu_fused import BLOCK, combine_fused
from chatvec_dist.kernels.reference import reference
from chatvec_dist.term import Term

COMPUTE = {torch.bfloat16: torch.float32, torch.float32: torch.float64}
BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3e38, -3.3e38, 1e-40, 2.0**-130]


def _rand(n: int, dtype: torch.dtype, g: torch.Generator, specials: bool = False) -> torch.Tensor:
    """Values over many binades; with `specials`, 2 % NaN, ±Inf, ±0, near-overflow and subnormal values."""
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(
        3 * torch.randn(n, generator=g, dtype=torch.float64)
    )
    if specials:
        at = torch.randint(0, n, (n // 50,), generator=g)
        x[at] = torch.tensor(SPECIALS, dtype=torch.float64)[torch.randint(0, len(SPECIALS), (len(at),), generator=g)]
    return x.to(dtype)


def _torch_path(out: torch.Tensor, cp: torch.Tensor, terms: list[Term], monkeypatch: pytest.MonkeyPatch):
    """The chunked torch kernel on the same operands (the fused one switched off)."""
    with monkeypatch.context() as m:
        m.setattr(cpu, "FUSED_MIN", 1 << 62)
        return combine(out, cp, terms, COMPUTE[out.dtype], Scratch())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("alphas", [[1.0], [0.7], [-1.3, 2.5], [1e30, 1.0, 0.1]])
def test_same_bytes_and_counts_as_the_torch_kernel_with_specials(dtype, alphas, monkeypatch):
    g = torch.Generator().manual_seed(len(alphas))
    n = 3 * BLOCK + 17  # a partial last block
    cp = _rand(n, dtype, g, specials=True)
    terms = [Term(a, _rand(n, dtype, g, specials=True), _rand(n, dtype, g, specials=True)) for a in alphas]
    fused, chunked = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    got = combine_fused(fused, cp, terms)
    want = _torch_path(chunked, cp, terms, monkeypatch)
    assert torch.equal(fused.view(BITS[dtype]), chunked.view(BITS[dtype]))
    assert (got.nan, got.inf) == (want.nan, want.inf) and got.nan > 0 and got.inf > 0
    nan_bits = fused.view(BITS[dtype])[torch.isnan(fused)]
    assert set(nan_bits.tolist()) == {0x7FC0 if dtype == torch.bfloat16 else 0x7FC00000}  # canonical, sign dropped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float64_reference_bit_for_bit_and_norms(dtype):
    """Alphas that are exact in float32 (the reference rounds once at the end; see docs/exactness.md)."""
    g = torch.Generator().manual_seed(7)
    n = FUSED_MIN + 5
    cp, base = _rand(n, dtype, g), _rand(n, dtype, g)
    chat = (base.double() * (1 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64))).to(dtype)
    terms = [Term(0.5, chat, base), Term(-2.0, base, chat)]
    out = torch.empty(n, dtype=dtype)
    stats = combine(out, cp, terms, COMPUTE[dtype], Scratch())  # through the dispatch: n ≥ FUSED_MIN
    assert torch.equal(out.view(BITS[dtype]), reference(cp, terms, dtype).view(BITS[dtype]))
    delta = 0.5 * (chat.double() - base.double()) - 2.0 * (base.double() - chat.double())
    assert math.isclose(math.sqrt(stats.cp_sq), float(cp.double().norm()), rel_tol=1e-6)
    assert math.isclose(math.sqrt(stats.delta_sq), float(delta.norm()), rel_tol=1e-6)
    assert math.isclose(math.sqrt(stats.update_sq), float((out.double() - cp.double()).norm()), rel_tol=1e-6)
    assert (stats.nan, stats.inf) == (0, 0)


def test_overflow_to_inf_is_counted_and_rounds_to_nearest_even():
    n = BLOCK
    cp = torch.full((n,), 3.3e38, dtype=torch.bfloat16)
    chat, base = torch.full((n,), 3.3e38, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16)
    stats = combine_fused(out, cp, [Term(1.0, chat, base)])
    assert torch.isinf(out).all() and (stats.nan, stats.inf) == (0, n)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8], dtype=torch.float32)  # halfway: to the even neighbour
    zero = torch.zeros(2, dtype=torch.bfloat16)
    small = torch.empty(2, dtype=torch.bfloat16)
    combine_fused(small, zero, [Term(1.0, ties.to(torch.bfloat16), zero)])
    assert small.float().tolist() == ties.to(torch.bfloat16).float().tolist()


def test_non_contiguous_operands():
    g = torch.Generator().manual_seed(3)
    n = 2 * BLOCK + 3
    cp, chat, base = (_rand(2 * n, torch.bfloat16, g)[::2] for _ in range(3))
    out = torch.empty(n, dtype=torch.bfloat16)
    combine_fused(out, cp, [Term(0.25, chat, base)])
    want = reference(cp, [Term(0.25, chat, base)], torch.bfloat16)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
