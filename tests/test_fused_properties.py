"""Property tests (hypothesis) of the fused numba kernels against the chunked torch kernels they replace: any
bit pattern (NaN payloads and signs, ±0, subnormals, ±Inf), any alpha within float32's range, 1 to 6 vectors,
lengths about the kernel's block, contiguous, strided or offset; FP8 codes of every value with scale grids
holding 0, ±Inf, NaN, subnormal and huge scales. The same bytes, scales and NaN/Inf counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatvec_dist.kernels import cpu, fp8
from chatvec_dist.kernels.cpu import Scratch, combine
from chatvec_dist.kernels.cpu_fused import BLOCK, combine_fused
from chatvec_dist.kernels.fp8 import Blocked, Fp8Scratch, combine_fp8
from chatvec_dist.term import Term

BITS = {torch.bfloat16: (torch.int16, np.int16), torch.float32: (torch.int32, np.int32)}
COMPUTE = {torch.bfloat16: torch.float32, torch.float32: torch.float64}
F32_MAX = float(np.finfo(np.float32).max)
ALPHAS = st.one_of(
    st.sampled_from([1.0, 0.0, -0.0, -1.0, 1 + 2.0**-24 + 2.0**-40, 0.1, F32_MAX, -F32_MAX, 1e-45]),
    st.floats(-F32_MAX, F32_MAX, allow_nan=False),
)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _operand(data: st.DataObject, n: int, dtype: torch.dtype, layout: int, seed: int) -> torch.Tensor:
    """Random bits (every class of value) or, half the time, values of one sign near each other (cancellation)."""
    rng = np.random.default_rng(seed)
    ints, np_ints = BITS[dtype]
    if data.draw(st.booleans()):
        x = torch.from_numpy(rng.integers(np.iinfo(np_ints).min, np.iinfo(np_ints).max, n, dtype=np_ints)).view(dtype)
    else:
        x = torch.from_numpy(1 + 1e-3 * rng.standard_normal(n)).to(dtype) * float(rng.choice([1e-38, 1.0, 1e38]))
    if layout == 1:  # every other element of a buffer
        return torch.stack([x, torch.zeros_like(x)], 1)[:, 0]
    if layout == 2:  # at a storage offset
        return torch.cat([torch.zeros(1, dtype=dtype), x])[1:]
    return x


@SETTINGS
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    n=st.sampled_from([0, 1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7]),
    alphas=st.lists(ALPHAS, min_size=1, max_size=6),
    layout=st.integers(0, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_is_the_torch_kernel(data, dtype, n, alphas, layout, seed, monkeypatch):
    cp = _operand(data, n, dtype, layout, seed)
    terms = [
        Term(a, _operand(data, n, dtype, layout, seed + 2 * i + 1), _operand(data, n, dtype, layout, seed + 2 * i + 2))
        for i, a in enumerate(alphas)
    ]
    fused, chunked = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    got = combine_fused(fused, cp, terms)
    with monkeypatch.context() as m:
        m.setattr(cpu, "FUSED_MIN", 1 << 62)
        want = combine(chunked, cp, terms, COMPUTE[dtype], Scratch())
    ints = BITS[dtype][0]
    assert torch.equal(fused.view(ints), chunked.view(ints))
    assert (got.nan, got.inf) == (want.nan, want.inf)


SCALES = st.one_of(
    st.sampled_from([0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 1e-40, F32_MAX, 1.0]),
    st.floats(1e-30, 1e30),
)


@SETTINGS
@given(
    data=st.data(),
    rows=st.sampled_from([1, 127, 128, 129, 200]),
    cols=st.sampled_from([1, 127, 128, 129, 300]),
    alphas=st.lists(ALPHAS, min_size=1, max_size=4),
    to_bf16=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_fp8_is_the_torch_pass(data, rows, cols, alphas, to_bf16, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    grid = -(-rows // 128) * -(-cols // 128)

    def operand() -> Blocked:
        codes = torch.from_numpy(rng.integers(0, 256, rows * cols, dtype=np.uint8))
        scale = torch.tensor(data.draw(st.lists(SCALES, min_size=grid, max_size=grid)), dtype=torch.float32)
        return Blocked(codes.view(torch.float8_e4m3fn), scale)

    cp = operand()
    terms = [(a, operand(), operand()) for a in alphas]
    dtype = torch.bfloat16 if to_bf16 else torch.float8_e4m3fn
    results = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            m.setattr(fp8, "FUSED_MIN", 0 if fused else 1 << 62)
            out, scale = torch.empty(rows * cols, dtype=dtype), None if to_bf16 else torch.empty(grid)
            results.append((out, scale, combine_fp8(out, scale, cp, terms, cols, Fp8Scratch())))
    (a, sa, got), (b, sb, want) = results
    ints = torch.int16 if to_bf16 else torch.uint8
    assert torch.equal(a.view(ints), b.view(ints))
    assert sa is None or torch.equal(sa.view(torch.int32), sb.view(torch.int32))
    assert (got.nan, got.inf) == (want.nan, want.inf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_huge_values_give_finite_norms_where_float32_dots_overflow(dtype, monkeypatch):
    """The fused kernel sums squares in float64: values near 1e30 give finite norms, as the float64 reference
    does; the torch kernel's float32 dot products (a tensor of SMALL_NORMS elements or more) are Inf there (see
    docs/exactness.md). Same bytes."""
    n = cpu.SMALL_NORMS
    cp, chat, base = (torch.full((n,), v, dtype=dtype) for v in (1e30, 2e30, 1e30))
    terms = [Term(0.5, chat, base)]
    fused, chunked = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    got = combine_fused(fused, cp, terms)
    with monkeypatch.context() as m:
        m.setattr(cpu, "FUSED_MIN", 1 << 62)
        want = combine(chunked, cp, terms, COMPUTE[dtype], Scratch())
    assert torch.equal(fused, chunked)
    c = cp.double()
    assert got.cp_sq == pytest.approx(float((c * c).sum()), rel=1e-6)
    assert got.update_sq == pytest.approx(float(((fused.double() - c) ** 2).sum()), rel=1e-6)
    assert want.cp_sq == float("inf") if dtype == torch.bfloat16 else want.cp_sq == pytest.approx(got.cp_sq)
