"""Runs of small tensors done as one (exec/small_runs.py): the same bytes, digests and stats as one at a time, and
the bytes of the float64 reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

import chatvec_dist
from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint
from chatvec_dist.exec import small_runs
from chatvec_dist.exec.compute import CpuCompute
from chatvec_dist.kernels.cpu import Scratch, combine
from chatvec_dist.kernels.cpu_runs import combine_run
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
    stats = combine_run(out, cp, terms, compute, Scratch(), bounds)
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
