"""The fused FP8 pass (numba: all operands and the output block-scaled FP8) against the test's float64 definition
and the chunked torch pass: the same codes, scales and NaN counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_fp8 import _values, assert_fp8_equal, bits, combine64, dequantize, e4m3, quantize, to_fp8

from chatvec_dist.kernels import fp8
from chatvec_dist.kernels.fp8 import Blocked, Fp8Scratch, combine_fp8


def _operand(rows: int, cols: int, seed: int, specials: bool = False) -> tuple[Blocked, np.ndarray]:
    """A block-scaled operand and its float64 values; with `specials`, 1 % NaN, ±Inf, ±0 and tiny values (a NaN
    or Inf spoils only its own element: `quantize` leaves it out of the block's amax)."""
    v = _values(rows, cols, seed, 0.02)
    if specials:
        rng = np.random.default_rng(seed)
        at = rng.integers(0, rows * cols, rows * cols // 100)
        v.flat[at] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-9], len(at))
    q, s = quantize(v)
    return Blocked(to_fp8(q).flatten(), torch.from_numpy(s).flatten()), dequantize(q, s)


def _run(rows, cols, cp, terms, fused: bool, monkeypatch, dtype=torch.float8_e4m3fn):
    with monkeypatch.context() as m:
        m.setattr(fp8, "FUSED_MIN", 0 if fused else 1 << 62)
        out = torch.empty(rows * cols, dtype=dtype)
        scale = torch.empty(-(-rows // 128) * -(-cols // 128), dtype=torch.float32)
        scale = scale if dtype == torch.float8_e4m3fn else None
        return out, scale, combine_fp8(out, scale, cp, terms, cols, Fp8Scratch())


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,alphas", [(300, 700, [1.0]), (256, 1030, [0.3, -1.7]), (129, 127, [2.0, 1.0, 0.5])])
def test_same_bytes_and_nan_counts_as_the_torch_pass(rows, cols, alphas, dtype, monkeypatch):
    cp, _ = _operand(rows, cols, 1, specials=True)
    terms = [
        (a, _operand(rows, cols, 10 + i, specials=True)[0], _operand(rows, cols, 20 + i, specials=True)[0])
        for i, a in enumerate(alphas)
    ]
    got_q, got_s, got = _run(rows, cols, cp, terms, True, monkeypatch, dtype)
    want_q, want_s, want = _run(rows, cols, cp, terms, False, monkeypatch, dtype)
    assert torch.equal(bits(got_q), bits(want_q))
    assert got_s is None or torch.equal(bits(got_s), bits(want_s))
    assert (got.nan, got.inf) == (want.nan, want.inf) and got.nan > 0 and got.inf == 0  # FP8 operands: no Inf
    if dtype == torch.bfloat16:
        assert set(bits(got_q)[torch.isnan(got_q)].tolist()) == {0x7FC0}


def test_float64_definition_and_norms(monkeypatch):
    """Partial blocks on both edges; the test's own quantizer of the float64 combination."""
    rows, cols = 300, 700
    (cp, cp64), (chat, chat64), (base, base64) = (_operand(rows, cols, s) for s in (1, 2, 3))
    terms = [(0.3, chat, base)]
    out, scale, stats = _run(rows, cols, cp, terms, True, monkeypatch)
    expected = combine64(cp64, [(0.3, chat64, base64)])
    want_q, want_s = quantize(expected.astype(np.float32))
    assert_fp8_equal(out, want_q)
    assert torch.equal(bits(scale), bits(torch.from_numpy(want_s).flatten()))
    written = dequantize(out.float().numpy().astype(np.float64).reshape(rows, cols), want_s)
    delta = 0.3 * (chat64 - base64)
    assert math.isclose(math.sqrt(stats.cp_sq), float(np.linalg.norm(cp64)), rel_tol=1e-9)
    assert math.isclose(math.sqrt(stats.delta_sq), float(np.linalg.norm(delta)), rel_tol=1e-9)
    assert math.isclose(math.sqrt(stats.update_sq), float(np.linalg.norm(written - cp64)), rel_tol=1e-9)


def test_every_tie_rounds_to_even(monkeypatch):
    """Every midpoint between two adjacent e4m3 values (subnormal and normal, both signs) made as
    0.5·lo + 0.5·hi of two exact codes, in blocks whose amax is 448 (scale 1): the value lands on its tie."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()  # 0 … 448
    lo = np.concatenate([codes[:-1], codes, -codes[:-1]])
    hi = np.concatenate([codes[1:], codes, -codes[1:]])
    rows, cols = 128, 512
    free = np.flatnonzero(np.arange(rows * cols) % 128 != 127)[: lo.size]  # column 127 of each block: 448
    grids = []
    for v in (lo, hi):
        g = np.zeros(rows * cols)
        g[np.arange(rows * cols) % 128 == 127] = 448.0
        g[free] = v
        grids.append(g.reshape(rows, cols))
    zero = np.zeros((rows, cols))
    zq, zs = quantize(zero)
    (q1, s1), (q2, s2) = quantize(grids[0]), quantize(grids[1])
    assert (s1 == 1).all() and (s2 == 1).all() and (q1 == grids[0]).all() and (q2 == grids[1]).all()
    z = Blocked(to_fp8(zq).flatten(), torch.from_numpy(zs).flatten())
    chats = [Blocked(to_fp8(q).flatten(), torch.from_numpy(s).flatten()) for q, s in ((q1, s1), (q2, s2))]
    out, scale, _ = _run(rows, cols, z, [(0.5, chats[0], z), (0.5, chats[1], z)], True, monkeypatch)
    combined = combine64(zero, [(0.5, grids[0], zero), (0.5, grids[1], zero)])
    assert np.array_equal(combined.flat[free], (lo + hi) / 2)
    want_q, want_s = quantize(combined.astype(np.float32))
    assert (want_s == 1).all()
    assert_fp8_equal(out, want_q)
    assert torch.equal(bits(scale), bits(torch.from_numpy(want_s).flatten()))
    assert (e4m3(np.array([0.5 * 2**-9, 1.5 * 2**-9, 17.0, 19.0])) == [0.0, 2 * 2**-9, 16.0, 20.0]).all()


def test_into_bfloat16_matches_the_float64_reference(monkeypatch):
    rows, cols = 260, 1030
    (cp, cp64), (chat, chat64), (base, base64) = (_operand(rows, cols, s) for s in (4, 5, 6))
    out, _, stats = _run(rows, cols, cp, [(0.7, chat, base)], True, monkeypatch, torch.bfloat16)
    want = torch.from_numpy(combine64(cp64, [(0.7, chat64, base64)])).to(torch.float32).to(torch.bfloat16)
    assert torch.equal(bits(out), bits(want.flatten()))
    assert math.isclose(math.sqrt(stats.update_sq), float(np.linalg.norm(want.double().numpy() - cp64)), rel_tol=1e-9)
