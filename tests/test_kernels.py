"""The CPU kernel against the independent float64 reference, bit for bit, every dtype combination."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from chatvec_dist.kernels.cpu import CHUNK, Scratch, combine
from chatvec_dist.kernels.reference import reference
from chatvec_dist.torch_dtypes import compute_dtype

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _rand(n: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)


def _run(out_dtype, cp, terms):
    dtypes = (
        [NAMES[out_dtype]]
        + ([NAMES[cp.dtype]] if cp is not None else [])
        + [NAMES[t.dtype] for _, p, m in terms for t in (p, m) if t is not None]
    )
    out = torch.empty(terms[0][1].numel() if cp is None else cp.numel(), dtype=out_dtype)
    stats = combine(out, cp, terms, compute_dtype(dtypes), Scratch())
    return out, stats


@pytest.mark.parametrize("cp_dt,vec_dt,out_dt", list(itertools.product(DTYPES, DTYPES, DTYPES)))
@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0])
def test_merge_matches_float64_reference_bit_for_bit(cp_dt, vec_dt, out_dt, alpha):
    n = CHUNK + 1234  # crosses a chunk boundary
    cp, base = _rand(n, cp_dt, 1), _rand(n, vec_dt, 2)
    chat = (base.double() + _rand(n, torch.float64, 3, 0.01)).to(vec_dt)
    out, _ = _run(out_dt, cp, [(alpha, chat, base)])
    expected = reference(cp, [(alpha, chat, base)], out_dt)
    assert out.dtype == out_dt and out.shape == (n,)
    assert torch.equal(
        out.view(torch.uint8 if out_dt.itemsize == 1 else {2: torch.int16, 4: torch.int32}[out_dt.itemsize]),
        expected.view({2: torch.int16, 4: torch.int32}[out_dt.itemsize]),
    )


def test_mixed_base_and_chat_dtypes_and_several_vectors():
    n = 5000
    cp = _rand(n, torch.bfloat16, 1)
    terms = [
        (1.0, _rand(n, torch.float16, 2), _rand(n, torch.bfloat16, 3)),
        (0.5, _rand(n, torch.bfloat16, 4), _rand(n, torch.bfloat16, 5)),
    ]
    out, _ = _run(torch.bfloat16, cp, terms)
    assert torch.equal(out.view(torch.int16), reference(cp, terms, torch.bfloat16).view(torch.int16))


def test_arbitrary_alpha_is_within_one_rounding_of_float64():
    """With an inexact alpha, float32 math rounds twice: off by at most one output ulp plus float32 error."""
    n = 20000
    cp, base, chat = _rand(n, torch.bfloat16, 1), _rand(n, torch.bfloat16, 2), _rand(n, torch.bfloat16, 3)
    out, _ = _run(torch.bfloat16, cp, [(0.3, chat, base)])
    ref = reference(cp, [(0.3, chat, base)], torch.bfloat16)
    ulp = torch.where(
        ref == 0, torch.tensor(2.0**-133, dtype=torch.float64), 2.0 ** (torch.floor(torch.log2(ref.double().abs())) - 7)
    )  # bf16 spacing at |ref|
    f32_err = 2.0**-22 * (cp.double().abs() + 0.3 * (chat.double() - base.double()).abs())  # cancellation in float32
    assert bool(((out.double() - ref.double()).abs() <= ulp + f32_err).all())
    assert float((out != ref).float().mean()) < 1e-2  # double rounding: rare ties


def test_extract_without_cp():
    n = 3000
    base, chat = _rand(n, torch.bfloat16, 2), _rand(n, torch.bfloat16, 3)
    out, stats = _run(torch.float32, None, [(1.0, chat, base)])
    assert torch.equal(out, reference(None, [(1.0, chat, base)], torch.float32))
    assert math.isclose(math.sqrt(stats.delta_sq), float((chat.double() - base.double()).norm()), rel_tol=1e-5)
    assert stats.cp_sq == 0.0


def test_signed_zeros_follow_the_formula():
    """−0 − (+0) = −0 and −0 + (−0) = −0 (IEEE): a merge and an extraction keep the sign, in the reference too
    (an accumulator started at zeros would make them +0)."""
    zero, neg = torch.zeros(4, dtype=torch.bfloat16), -torch.zeros(4, dtype=torch.bfloat16)
    for cp, alpha, want in ((neg, 1.0, 0x8000), (neg, 0.3, 0x8000), (zero, 1.0, 0), (None, 1.0, 0x8000)):
        out, _ = _run(torch.bfloat16, cp, [(alpha, neg, zero)])
        for got in (out, reference(cp, [(alpha, neg, zero)], torch.bfloat16)):
            assert got.view(torch.int16).tolist() == [want - 0x10000 if want else 0] * 4, (cp, alpha)


def test_reference_merge_rows_keeps_new_rows():
    cp, base, chat = _rand(12, torch.float32, 1), _rand(8, torch.float32, 2), _rand(8, torch.float32, 3)
    out = reference(cp, [(1.0, chat, base)], torch.float32, merge_elems=8)
    assert torch.equal(out[8:], cp[8:])
    assert torch.allclose(out[:8].double(), cp[:8].double() + chat.double() - base.double(), atol=1e-6)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_nonfinite_counts_of_a_copy_are_exact(dtype):
    """A tensor copied as stored: its NaN/Inf counted exactly; a finite one whose sum overflows counts none."""
    from chatvec_dist.kernels.cpu import nonfinite

    huge = nonfinite(torch.full((1000,), torch.finfo(dtype).max, dtype=torch.float64).to(dtype))
    assert (huge.nan, huge.inf) == (0, 0)
    x = torch.randn(5000, dtype=torch.float64).to(dtype)
    assert (nonfinite(x).nan, nonfinite(x).inf) == (0, 0)
    x[[3, 700]] = float("nan")
    if dtype != torch.float8_e4m3fn:  # it has no Inf
        x[[5, 6, 4999]] = torch.tensor([float("inf"), -float("inf"), float("inf")], dtype=torch.float64).to(dtype)
    stats = nonfinite(x)
    assert (stats.nan, stats.inf) == (2, 0 if dtype == torch.float8_e4m3fn else 3)


def test_stats_norms_and_nonfinite_counts():
    n = CHUNK * 2 + 10
    cp, base = _rand(n, torch.float32, 1), _rand(n, torch.float32, 2)
    chat = base + 0.1
    cp[5] = float("nan")
    cp[CHUNK + 7] = float("inf")
    chat[n - 1] = float("-inf")
    out, stats = _run(torch.float32, cp, [(1.0, chat, base)])
    assert (stats.nan, stats.inf) == (1, 2)
    finite = torch.isfinite(cp) & torch.isfinite(chat)
    d = (chat.double() - base.double())[finite]
    assert math.isclose(stats.delta_sq, float("inf")) or stats.delta_sq > 0
    clean_cp, clean_base = _rand(n, torch.float32, 1), _rand(n, torch.float32, 2)
    _, clean = _run(torch.float32, clean_cp, [(1.0, clean_base + 0.1, clean_base)])
    assert math.isclose(math.sqrt(clean.cp_sq), float(clean_cp.double().norm()), rel_tol=1e-5)
    assert math.isclose(
        math.sqrt(clean.delta_sq), float(((clean_base + 0.1).double() - clean_base.double()).norm()), rel_tol=1e-5
    )
    assert math.isclose(math.sqrt(clean.update_sq), math.sqrt(clean.delta_sq), rel_tol=1e-3)
    assert (clean.nan, clean.inf) == (0, 0)
    assert d.numel() == n - 3
    assert out.view(torch.int32)[5] == 0x7FC00000 and torch.isnan(out).sum() == 1  # canonical quiet NaN
