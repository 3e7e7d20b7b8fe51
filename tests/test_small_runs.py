"""Runs of small tensors done as one (exec/small_runs.py): the same bytes, digests and stats as one at a time, and
the bytes of the float64 reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import chatvec_dist
from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint
from chatvec_dist.exec import small_runs
from chatvec_dist.exec.compute import CpuCompute
from chatvec_dist.kernels import cpu
from chatvec_dist.kernels.cpu import Scratch, combine
from chatvec_dist.kernels.cpu_runs import RunKernel
from chatvec_dist.kernels.reference import reference
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.recipe.spec import Recipe
from chatvec_dist.term import Term

BITS = {2: torch.int16, 4: torch.int32}


def _rand(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_cp", [True, False])
def test_a_run_computes_each_tensor_as_alone_and_as_the_float64_reference(out_dtype, with_cp):
    sizes = [1, 7, 64, 300, 5, 4096, 2]
    n = sum(sizes)
    cp = _rand(n, torch.bfloat16, 1) if with_cp else None
    chat, base = _rand(n, torch.bfloat16, 2), _rand(n, torch.bfloat16, 3)
    other = _rand(n, torch.float16, 4)
    chat[70] = float("nan")  # in the third tensor: a NaN (any payload) and an Inf
    chat[71] = float("inf")
    terms = [Term(0.5, chat, base), Term(-1.25, other, None)]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    compute = torch.float32 if out_dtype != torch.float32 else torch.float64
    out = torch.empty(n, dtype=out_dtype)
    kernel = RunKernel(Scratch(), sizes)
    delta = kernel.delta("terms", [(p, m) for _, p, m in terms], ((0.5, -1.25),), compute)
    stats = kernel.combine(out.view(1, n), delta, kernel.cp("cp", cp, compute) if cp is not None else None)[0]
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        alone = torch.empty(e - s, dtype=out_dtype)
        mine = [Term(a, p[s:e].clone(), m[s:e].clone() if m is not None else None) for a, p, m in terms]
        want = combine(alone, cp[s:e].clone() if cp is not None else None, mine, compute, Scratch())
        assert torch.equal(out[s:e].view(BITS[out.element_size()]), alone.view(BITS[out.element_size()])), i
        assert repr(stats[i]) == repr(want), i  # the same float64 sums (NaN too), bit for bit, and counts
        ref = reference(cp[s:e] if cp is not None else None, mine, out_dtype)
        finite = torch.isfinite(ref)
        assert torch.equal(out[s:e][finite].view(BITS[out.element_size()]), ref[finite].view(BITS[out.element_size()]))
        assert torch.equal(torch.isnan(out[s:e]), torch.isnan(ref))
    assert stats[2].nan == 1 and stats[2].inf == 1 and stats[3].nan == stats[3].inf == 0
    assert math.isclose(
        stats[1].delta_sq,
        float(sum(((0.5 * (chat[1:8].double() - base[1:8].double())) - 1.25 * other[1:8].double()) ** 2)),
        rel_tol=1e-5,
    )


def _models(tmp_path, layers: int = 12):
    cfg = llama_config(64, hidden_size=16, intermediate_size=24, num_hidden_layers=layers)
    g = torch.Generator().manual_seed(0)
    made = {}
    for k, name in enumerate(("base", "chat", "cp")):
        tensors = {
            n: (t + 0.01 * k * torch.randn(t.shape, generator=g)).bfloat16() for n, t in llama_tensors(cfg, g).items()
        }
        made[name] = tensors
        save_checkpoint(tmp_path / name, tensors, cfg, shards=3)
    return made


def _run(tmp_path, name: str, monkeypatch, runs_of_small: bool, unit_bytes: int) -> list:
    monkeypatch.setattr(CpuCompute, "runs_of_small", runs_of_small)
    d = tmp_path
    base = chatvec_dist.make_recipe(
        str(d / "base"),
        str(d / "chat"),
        {"a": str(d / "cp"), "b": str(d / "cp")},
        str(d / name),
        0.5,
        unit_bytes=unit_bytes,
    )
    a, b = base.targets
    recipe = Recipe(base.vectors, (a, dataclasses.replace(b, dtype="float32", alphas=(-0.75,))), unit_bytes=unit_bytes)
    chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend="local", workers=2, progress=False))
    return [d / name / t for t in ("a", "b")]


def test_runs_give_the_bytes_and_manifest_of_one_tensor_at_a_time(tmp_path, monkeypatch):
    made = _models(tmp_path)
    done = []
    real = small_runs.do_run
    monkeypatch.setattr(small_runs, "do_run", lambda r, run, st: done.append(len(run.members)) or real(r, run, st))
    fast = _run(tmp_path, "fast", monkeypatch, True, 64 * 1024)
    assert done and sum(done) > 0.8 * len(made["cp"]), done  # most tensors went in runs, several per run
    slow = _run(tmp_path, "slow", monkeypatch, False, 64 * 1024)
    for f, s, alpha, dtype in zip(fast, slow, (0.5, -0.75), (torch.bfloat16, torch.float32)):
        got = {k: v for p in sorted(f.glob("*.safetensors")) for k, v in load_file(p).items()}
        assert [p.read_bytes() for p in sorted(f.glob("*.safetensors"))] == [
            p.read_bytes() for p in sorted(s.glob("*.safetensors"))
        ]
        for n, c in made["cp"].items():
            want = reference(c, [(alpha, made["chat"][n], made["base"][n])], dtype).view(c.shape)
            assert got[n].dtype == dtype and torch.equal(got[n], want), n
        ft, st = read_manifest(f)[0], read_manifest(s)[0]
        for column in ("tensor", "hash", "cp_norm", "delta_norm", "rel_update", "nan_count", "source_digests"):
            assert ft.column(column).to_pylist() == st.column(column).to_pylist(), column
        assert chatvec_dist.verify(f) == []


def test_one_kernel_gives_each_output_its_own_bytes_and_stats_while_sharing_delta_and_cp():
    """Outputs in turn on one run's kernel (Δ and CP kept between them) equal each output on a fresh kernel."""
    sizes = [3, 64, 1, 200, 17]
    n = sum(sizes)
    cp1, cp2 = _rand(n, torch.bfloat16, 1), _rand(n, torch.bfloat16, 5)
    chat, base = _rand(n, torch.bfloat16, 2), _rand(n, torch.bfloat16, 3)
    cp2[10] = float("inf")  # the second CP's second tensor: an Inf (its output too)
    half, other = [Term(0.5, chat, base)], [Term(-0.3, chat, base)]
    outputs = [  # (CP, its key, terms, output dtype): chat − base shared by all, Δ by 0-3 and 5, CP by 0, 2-4
        (cp1, "cp1", half, torch.bfloat16),
        (cp2, "cp2", half, torch.bfloat16),
        (cp1, "cp1", half, torch.float16),
        (cp1, "cp1", half, torch.bfloat16),
        (cp1, "cp1", other, torch.bfloat16),
        (None, "", half, torch.bfloat16),
    ]
    shared = RunKernel(Scratch(), sizes)
    for k, (cp, cp_key, terms, dtype) in enumerate(outputs):
        vectors, alphas = [(p, m) for _, p, m in terms], (tuple(a for a, _, _ in terms),)
        got = torch.empty(n, dtype=dtype)
        stats = shared.combine(
            got.view(1, n),
            shared.delta("vectors", vectors, alphas, torch.float32),
            shared.cp(cp_key, cp, torch.float32) if cp is not None else None,
        )[0]
        fresh = RunKernel(Scratch(), sizes)
        want = torch.empty(n, dtype=dtype)
        want_stats = fresh.combine(
            want.view(1, n),
            fresh.delta("vectors", vectors, alphas, torch.float32),
            fresh.cp(cp_key, cp, torch.float32) if cp is not None else None,
        )[0]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), k
        assert repr(stats) == repr(want_stats), k
        ref = reference(cp, [tuple(t) for t in terms], dtype)
        finite = torch.isfinite(ref)
        assert torch.equal(got[finite].view(torch.int16), ref[finite].view(torch.int16)), k
    assert stats[1].cp_sq == 0.0 and stats[3].update_sq > 0  # the last: no CP


def _batch(tmp_path, name: str, monkeypatch, runs_of_small: bool) -> list:
    """A batch over one vector: outputs alike (a, b), Δ shared with another CP (c) or dtype (d), other alphas (e),
    and layer 1 at alpha 0.0 (f) and −0.0 (g), where CP holds −0.0 values (0.0 + −0.0·Δ and −0.0 + 0.0·Δ differ)."""
    monkeypatch.setattr(CpuCompute, "runs_of_small", runs_of_small)
    d = tmp_path
    base = chatvec_dist.make_recipe(
        str(d / "base"), str(d / "chat"), {k: str(d / "cp") for k in "abcdefg"}, str(d / name), 0.5, unit_bytes=1 << 20
    )
    t = {x.name: x for x in base.targets}
    zero, negative = (
        chatvec_dist.make_recipe(str(d / "base"), str(d / "chat"), str(d / "cp"), "/x", alpha_rules=[rule])
        .targets[0]
        .alpha_rules
        for rule in ("layers\\.1\\.=0.0", "layers\\.1\\.=-0.0")
    )
    targets = (
        t["a"],
        t["b"],
        dataclasses.replace(t["c"], cp=str(d / "cp2")),
        dataclasses.replace(t["d"], dtype="float16"),
        dataclasses.replace(t["e"], alphas=(-0.75,), dtype="float32"),
        dataclasses.replace(t["f"], alpha_rules=zero),
        dataclasses.replace(t["g"], alpha_rules=negative),
    )
    recipe = Recipe(base.vectors, targets, unit_bytes=1 << 20)
    chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend="local", workers=2, progress=False))
    return [d / name / k for k in "abcdefg"]


def test_a_batch_gives_each_output_the_bytes_and_manifest_of_one_tensor_at_a_time(tmp_path, monkeypatch):
    made = _models(tmp_path, layers=4)
    g = torch.Generator().manual_seed(9)
    cp, config = made["cp"], llama_config(64, hidden_size=16, intermediate_size=24, num_hidden_layers=4)
    for n, c in cp.items():
        if ".1." in n:
            c.view(-1)[: c.numel() // 2] = -0.0  # half of each tensor of layer 1: −0.0
    save_checkpoint(tmp_path / "cp", cp, config, shards=3)
    cp2 = {n: (c.float() + 0.01 * torch.randn(c.shape, generator=g)).bfloat16() for n, c in cp.items()}
    save_checkpoint(tmp_path / "cp2", cp2, config, shards=3)
    groups = []
    real = small_runs._groups
    monkeypatch.setattr(small_runs, "_groups", lambda shape: groups.append(r := real(shape)) or r)
    fast = _batch(tmp_path, "fast", monkeypatch, True)
    assert groups and all(sum(map(len, g.values())) < 7 for g in groups)  # a and b alike: computed once
    slow = _batch(tmp_path, "slow", monkeypatch, False)
    for f, s in zip(fast, slow):
        assert_same_output(f, s)
    got_f, got_g = (load_file(next(p.glob("*.safetensors"))) for p in fast[5:])
    name = "model.layers.1.mlp.up_proj.weight"
    chat, base = made["chat"][name], made["base"][name]
    for got, alpha in ((got_f, 0.0), (got_g, -0.0)):
        want = reference(cp[name], [(alpha, chat, base)], torch.bfloat16).view(chat.shape)
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), alpha
    assert not torch.equal(got_f[name].view(torch.int16), got_g[name].view(torch.int16))
    for n, c in cp.items():
        want = reference(c, [(0.5, made["chat"][n], made["base"][n])], torch.bfloat16).view(c.shape)
        assert torch.equal(load_file(next(fast[0].glob("*.safetensors")))[n], want), n


def assert_same_output(fast, slow) -> None:
    """The same shards, and the same manifest values (hashes, norms, counts, source digests) per tensor."""
    assert [p.read_bytes() for p in sorted(fast.glob("*.safetensors"))] == [
        p.read_bytes() for p in sorted(slow.glob("*.safetensors"))
    ], fast.name
    ft, st = read_manifest(fast)[0], read_manifest(slow)[0]
    for column in ("tensor", "hash", "cp_norm", "delta_norm", "rel_update", "nan_count", "source_digests"):
        assert repr(ft.column(column).to_pylist()) == repr(st.column(column).to_pylist()), (fast.name, column)


def _sweep(tmp_path, name: str, monkeypatch, runs_of_small: bool, alphas: tuple[float, ...]) -> list:
    """An alpha sweep: targets alike but for their alphas (planned once, then given their alphas: reuse.py)."""
    monkeypatch.setattr(CpuCompute, "runs_of_small", runs_of_small)
    d = tmp_path
    cps = {f"s{k}": str(d / "cp") for k in range(len(alphas))}
    base = chatvec_dist.make_recipe(str(d / "base"), str(d / "chat"), cps, str(d / name), 0.5, unit_bytes=1 << 20)
    targets = tuple(dataclasses.replace(t, alphas=(a,)) for t, a in zip(base.targets, alphas))
    options = chatvec_dist.RunOptions(backend="local", workers=2, progress=False)
    chatvec_dist.run(Recipe(base.vectors, targets, unit_bytes=1 << 20), options)
    return [d / name / t.name for t in targets]


def test_an_alpha_sweep_gives_each_output_the_bytes_and_manifest_of_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Outputs alike but for their alphas (planned once, then given their alphas) share their runs, yet each gets
    the bytes and manifest of one tensor at a time and the float64 reference's bytes; a sweep holding −0.0 does
    each tensor alone (0.0 and −0.0 may give other bytes)."""
    made = _models(tmp_path, layers=2)
    runs = []
    do_run = small_runs.do_run
    monkeypatch.setattr(small_runs, "do_run", lambda r, run, st: runs.append(run) or do_run(r, run, st))
    for alphas in ((0.25, 1.0, -0.75, 0.25), (0.5, -0.0)):  # exact alphas: the reference's bytes
        runs.clear()
        fast = _sweep(tmp_path, f"fast{len(alphas)}", monkeypatch, True, alphas)
        assert bool(runs) == (len(alphas) == 4)  # −0.0: each tensor alone
        slow = _sweep(tmp_path, f"slow{len(alphas)}", monkeypatch, False, alphas)
        for f, s, alpha in zip(fast, slow, alphas):
            assert_same_output(f, s)
            got = {k: v for p in sorted(f.glob("*.safetensors")) for k, v in load_file(p).items()}
            for n, c in made["cp"].items():
                want = reference(c, [(alpha, made["chat"][n], made["base"][n])], torch.bfloat16).view(c.shape)
                assert torch.equal(got[n].view(torch.int16), want.view(torch.int16)), (f.name, n)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=12),
    lead=st.integers(0, 7),
    double=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_a_slices_sum_of_squares_depends_on_its_values_alone(sizes, lead, double, seed):
    """`sq_sums` of a run gives each slice the sum it gets alone, wherever it lies (any element offset, so any
    alignment), and the float64 sum of its squares to within float64's rounding."""
    dtype = torch.float64 if double else torch.float32
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1e-30, 1.0, 1e25], dtype=torch.float64)[torch.randint(0, 3, (1,), generator=g)]
    x = (torch.randn(lead + sum(sizes), generator=g, dtype=torch.float64) * scale).to(dtype)[lead:]
    starts = np.cumsum([0, *sizes[:-1]], dtype=np.intp)
    got = cpu.sq_sums(x, starts, Scratch())
    for i, (s, n) in enumerate(zip(starts.tolist(), sizes)):
        alone = x[s : s + n].clone()
        assert got[i] == cpu.sq_sums(alone, np.zeros(1, np.intp), Scratch())[0], i  # bit for bit
        want = math.fsum(v * v for v in alone.double().tolist())  # exact squares for float32
        assert math.isclose(got[i], want, rel_tol=1e-12), (i, got[i], want)
