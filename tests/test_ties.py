"""TIES: the pre-pass's exact per-tensor thresholds and the merge against a plain numpy float64 implementation of
the definition (mergekit's `ties` with weights = alphas, normalize on) written here; the same bytes for any worker
count, backend, unit size and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llama
from test_dare import np_keep
from test_e2e import load_all, shard_bytes

from chatvec_dist.cli import main
from chatvec_dist.kernels.cpu import Scratch, combine
from chatvec_dist.kernels.sparse import Sparse
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.planning.kth import from_top, threshold
from chatvec_dist.planning.sparsity import TiesPlan, term_dare
from chatvec_dist.recipe.file import load_recipe
from chatvec_dist.recipe.spec import Dare, Ties

ALPHAS = (0.7, 1.2)


def kth_bits(d: np.ndarray, k: int) -> int:
    """The k-th largest |d| rounded to float32, as its bit pattern."""
    mags = np.sort(np.abs(d).astype(np.float32))[::-1]
    return int(mags[k - 1 : k].view(np.int32)[0])


def np_ties(cp: np.ndarray, deltas: list[np.ndarray], alphas, density: float, normalize=True, weights=None, masks=None):
    """cp + mergekit's TIES of the deltas (float64): trim to |d| ≥ the k-th largest (k = max(1, int(density·n))),
    sign by the sum of weight·d (≥ 0: +), the agreeing weight·d summed, divided by the agreeing alphas' sum.
    `weights`: alphas unless given (DARE: alpha/density); `masks`: what DARE kept."""
    n = cp.size
    k = n if density >= 1 else max(1, int(density * n))
    weighted, kept = [], []
    for i, (w, d) in enumerate(zip(weights or alphas, deltas)):
        keep = np.abs(d).astype(np.float32).view(np.int32) >= (kth_bits(d, k) if k < n else 0)
        keep &= masks[i] if masks is not None else True
        kept.append(int(keep.sum()))
        weighted.append(np.where(keep, w * d, 0.0))
    sign = np.where(np.sum(weighted, axis=0) >= 0, 1.0, -1.0)
    agree = [np.sign(w) == sign for w in weighted]
    mixed = np.sum([np.where(g, w, 0.0) for g, w in zip(agree, weighted)], axis=0)
    if normalize:
        divisor = np.sum([np.where(g, a, 0.0) for g, a in zip(agree, alphas)], axis=0)
        mixed = mixed / np.where(divisor == 0, 1.0, divisor)
    signed = sum(int((w != 0).sum()) for w in weighted)
    return cp + mixed, kept, sum(int(g.sum()) for g in agree) / signed


@pytest.fixture(scope="module")
def two(llamas, tmp_path_factory):
    """A second chat model of the same base: two vectors that disagree in places."""
    root = tmp_path_factory.mktemp("ties")
    make_llama(root / "chat2", 4, base=load_all(llamas["base"]), noise=0.03)
    return dict(llamas, chat2=root / "chat2")


def ties_args(d: dict, out, *extra: str) -> list[str]:
    vectors = ["--base", str(d["base"]), "--chat", str(d["chat"]), "--base", str(d["base"]), "--chat", str(d["chat2"])]
    alphas = [x for a in ALPHAS for x in ("--alpha", str(a))]
    return ["merge", *vectors, "--cp", str(d["cp"]), "--out", str(out), "--no-progress", *alphas, *extra]


@pytest.fixture(scope="module")
def tied(two, tmp_path_factory):
    out = tmp_path_factory.mktemp("tied") / "out"
    assert (
        main(ties_args(two, out, "--ties", "0.2", "--backend", "local", "--workers", "1", "--unit-size", "2KiB")) == 0
    )
    return out


def expected_ties(d: dict, density: float, dare: Dare | None = None) -> dict[str, tuple]:
    base, cp = load_all(d["base"]), load_all(d["cp"])
    chats = [load_all(d["chat"]), load_all(d["chat2"])]
    out = {}
    for name, c in cp.items():
        deltas = [ch[name].double().flatten().numpy() - base[name].double().flatten().numpy() for ch in chats]
        weights = masks = None
        if dare is not None:  # every vector: the same DARE (its seed, this tensor's name), then TIES
            keep = np_keep(dare.seed, name, dare.density, 0, c.numel())
            deltas, masks = [np.where(keep, x, 0.0) for x in deltas], [keep, keep]
            weights = [a / dare.density for a in ALPHAS]  # the divisor: the alphas (mergekit's weights)
        cpd = c.double().flatten().numpy()
        merged, kept, agreement = np_ties(cpd, deltas, ALPHAS, density, weights=weights, masks=masks)
        out[name] = (torch.from_numpy(merged).to(c.dtype).view(c.shape), [k / c.numel() for k in kept], agreement)
    return out


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def check(out, expected: dict) -> None:
    got = load_all(out)
    rows = {r["tensor"]: r for r in read_manifest(out)[0].to_pylist()}
    assert set(got) == set(expected)
    exact = total = 0
    for name, (tensor, density, agreement) in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        diff = ulps(got[name], tensor)
        # float32 arithmetic: one bfloat16 rounding off at most, or (cp and the mix cancelling) a few 1e-9 off zero
        near = (got[name].double() - tensor.double()).abs() <= 1e-6
        assert bool(((diff <= 1) | near).all()), name
        exact, total = exact + int((diff == 0).sum()), total + diff.numel()
        assert rows[name]["density"] == pytest.approx(density, abs=1e-12), name  # the thresholds are exact
        assert rows[name]["sign_agreement"] == pytest.approx(agreement, abs=1e-12), name
    assert exact / total > 0.99
    assert verify(out) == []


def test_ties_merge_matches_numpy_and_records_density_and_agreement(two, tied):
    check(tied, expected_ties(two, 0.2))
    rows = read_manifest(tied)[0].to_pylist()
    assert all(0.18 < x < 0.5 for r in rows for x in r["density"]) and all(0.5 < r["sign_agreement"] <= 1 for r in rows)


def test_dare_then_ties(two, tmp_path):
    """mergekit's dare_ties with a magnitude trim too: DARE's mask first, then the trim of what it kept."""
    out = tmp_path / "dare_ties"
    extra = ("--ties", "0.5", "--dare", "0.5:3", "--backend", "local", "--unit-size", "2KiB")
    assert main(ties_args(two, out, *extra)) == 0
    check(out, expected_ties(two, 0.5, Dare(0.5, 3)))


def test_same_bytes_for_workers_unit_sizes_resume_and_ray(two, tied, ray_local, tmp_path, monkeypatch):
    from chatvec_dist.exec import worker

    runs = {
        "local2": ("--backend", "local", "--workers", "2", "--unit-size", "2KiB"),
        "units64k": ("--backend", "local", "--workers", "2", "--unit-size", "64KiB"),
        "ray": ("--workers", "1", "--unit-size", "4KiB"),
    }
    for name, extra in runs.items():
        assert main(ties_args(two, tmp_path / name, "--ties", "0.2", *extra)) == 0
        assert shard_bytes(tmp_path / name) == shard_bytes(tied), name
    real_run, merged = worker.UnitRunner.run, []

    def failing(self, unit):
        if self.ctx.select is None:
            merged.append(unit.id)
            if len(merged) > 5:
                raise KeyboardInterrupt
        return real_run(self, unit)

    out = tmp_path / "resumed"
    args = ties_args(two, out, "--ties", "0.2", "--backend", "local", "--workers", "1", "--unit-size", "2KiB")
    monkeypatch.setattr(worker.UnitRunner, "run", failing)
    assert main(args) == 130
    monkeypatch.setattr(worker.UnitRunner, "run", real_run)
    assert main(args) == 0  # the pre-pass again (its thresholds are not stored), then the units left
    assert shard_bytes(out) == shard_bytes(tied)
    a, b = read_manifest(out)[0], read_manifest(tied)[0]
    assert a.column("density").to_pylist() == b.column("density").to_pylist()
    assert a.column("sign_agreement").to_pylist() == b.column("sign_agreement").to_pylist()


def test_radix_select_finds_the_kth_largest_bit_pattern():
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.standard_normal(5000) * 1e-3, np.zeros(100), [np.inf, 3.0, 3.0, 1e-40]])
    bits = np.abs(d).astype(np.float32).view(np.int32).astype(np.int64)
    for k in (1, 2, 3, 50, 2500, 5099, 5104):
        high, rank = from_top(np.bincount(bits >> 15, minlength=1 << 16), k)
        low = np.bincount(bits[bits >> 15 == high] & 0x7FFF, minlength=1 << 15)
        assert threshold(high, low, rank) == kth_bits(d, k), k


def test_cpu_kernel_ties_with_sum_instead_of_mean():
    """normalize False (mergekit's normalize: false): the agreeing alpha·Δ summed, not averaged."""
    n = 3000
    g = torch.Generator().manual_seed(0)
    cp, base = torch.randn(n, generator=g), torch.randn(n, generator=g)
    chats = [base + 0.1 * torch.randn(n, generator=g) for _ in range(3)]
    alphas = (0.5, 1.0, -0.25)
    deltas = [(c.double() - base.double()).numpy() for c in chats]
    k = int(0.3 * n)
    plan = TiesPlan(0.3, False, k, tuple(kth_bits(x, k) for x in deltas))
    out = torch.empty(n, dtype=torch.float32)
    terms = [(a, c, base) for a, c in zip(alphas, chats)]
    stats = combine(out, cp, terms, torch.float64, Scratch(), Sparse(0, (), plan))
    expected, kept, agreement = np_ties(cp.double().numpy(), deltas, alphas, 0.3, normalize=False)
    assert torch.equal(out, torch.from_numpy(expected).float())  # float64 arithmetic: one rounding, to float32
    assert stats.kept == kept and stats.agree / stats.signed == pytest.approx(agreement)


def test_an_output_gives_back_its_dare_and_ties_recipe(tied, tmp_path, capsys):
    capsys.readouterr()
    assert main(["inspect", str(tied), "--recipe"]) == 0
    path = tmp_path / "again.yaml"
    path.write_text(capsys.readouterr().out)
    recipe = load_recipe(path)
    assert recipe.targets[0].ties == Ties(0.2) and [v.dare for v in recipe.vectors] == [None, None]
    assert recipe.targets[0].alphas == ALPHAS


def test_ties_cli_recipe_and_bad_values(two, tmp_path, capsys):
    plan = ["plan", *ties_args(two, tmp_path / "o", "--ties", "0.3", "--dare", "0.2:5")[1:]]
    plan.remove("--no-progress")
    assert main(plan) == 0
    shown = capsys.readouterr().out
    assert "DARE on vector 0: density 0.2, seed 5; vector 1: density 0.2, seed 5" in shown
    assert "TIES density 0.3: a pre-pass reads its vectors twice more" in shown
    assert main(ties_args(two, tmp_path / "o", "--ties", "0.3", "--print-recipe")) == 0
    path = tmp_path / "r.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_recipe(path).targets[0].ties == Ties(0.3)
    path.write_text(path.read_text().replace("normalize: true", "normalize: maybe"))
    with pytest.raises(Exception, match=r"targets\[0\]\.ties\.normalize"):
        load_recipe(path)
    assert main(ties_args(two, tmp_path / "o", "--ties", "1.5")) == 2
    assert "ties: density 1.5: give a number in (0, 1]" in capsys.readouterr().err


def test_unused_term_dare_is_none_at_density_one():
    assert term_dare(Dare(1.0, 5), "x") is None


BITS = {2: torch.int16, 4: torch.int32}


@pytest.mark.parametrize(
    "dtype,compute,normalize,vectors",
    [
        (torch.bfloat16, torch.float32, True, 4),
        (torch.float16, torch.float32, True, 2),
        (torch.float32, torch.float64, False, 3),
        (torch.bfloat16, torch.float32, True, 5),  # more than one launch holds: the CPU kernel
    ],
)
def test_a_gpu_worker_merges_ties_with_the_cpu_kernels_bits(dtype, compute, normalize, vectors):
    """TritonCompute (the Triton kernels interpreted here): TIES of up to four vectors in its own kernel, of more on
    the CPU kernel; either way the bytes and statistics of the CPU kernel. DARE on every other vector, extracted
    vectors (no base) among them, alphas of both signs, the index crossing 2^32."""
    pytest.importorskip("triton")
    from chatvec_dist.exec.compute import TritonCompute

    n = 5000
    g = torch.Generator().manual_seed(vectors)
    cp, base = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    alphas = (0.7, 1.2, -0.3, 0.9, 0.5)[:vectors]
    chats = [(base.float() + 0.1 * torch.randn(n, generator=g)).to(dtype) for _ in alphas]
    terms = [(a, c, base if i % 2 == 0 else None) for i, (a, c) in enumerate(zip(alphas, chats))]
    deltas = [(c.double() - (m.double() if m is not None else 0)).numpy() for _, c, m in terms]
    dare = tuple(term_dare(Dare(0.5, i), "w") if i % 2 == 0 else None for i in range(vectors))
    plan = TiesPlan(0.2, normalize, 1000, tuple(kth_bits(x, 1000) for x in deltas))
    sparse = Sparse(2**32 - 1234, dare, plan)
    cpu, dev = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    cpu_stats = combine(cpu, cp, terms, compute, Scratch(), sparse)
    dev_stats = TritonCompute(torch.device("cpu")).combine(dev, cp, terms, compute, sparse)
    assert torch.equal(dev.view(BITS[dtype.itemsize]), cpu.view(BITS[dtype.itemsize]))
    assert (dev_stats.kept, dev_stats.agree, dev_stats.signed) == (cpu_stats.kept, cpu_stats.agree, cpu_stats.signed)
    assert dev_stats.update_sq == pytest.approx(cpu_stats.update_sq, rel=1e-5)
    assert 0 < cpu_stats.agree < cpu_stats.signed and cpu_stats.kept[0] < cpu_stats.kept[1]


def test_a_batch_with_different_ties_per_target(two, tied, tmp_path):
    """One pre-pass serves targets with different densities (and one without TIES): each output equals its own
    single-target run."""
    import dataclasses

    from chatvec_dist import RunOptions, make_recipe, run

    recipe = make_recipe(
        [two["base"], two["base"]],
        [two["chat"], two["chat2"]],
        {"a": two["cp"], "b": two["cp"], "c": two["cp"]},
        tmp_path / "batch",
        list(ALPHAS),
        unit_bytes=2048,
    )
    ties = {"a": Ties(0.2), "b": Ties(0.5, normalize=False), "c": None}
    recipe = dataclasses.replace(
        recipe, targets=tuple(dataclasses.replace(t, ties=ties[t.name]) for t in recipe.targets)
    )
    run(recipe, RunOptions(backend="local", workers=2, progress=False))
    assert shard_bytes(tmp_path / "batch" / "a") == shard_bytes(tied)
    alone = tmp_path / "b_alone"
    single = dataclasses.replace(recipe, targets=(dataclasses.replace(recipe.targets[1], out=str(alone)),))
    run(single, RunOptions(backend="local", workers=1, progress=False))
    assert shard_bytes(tmp_path / "batch" / "b") == shard_bytes(alone)
    rows = read_manifest(tmp_path / "batch" / "c")[0].to_pylist()
    assert all(r["density"] is None and r["sign_agreement"] is None for r in rows)


def test_an_alpha_sweep_shares_one_pre_pass(two, tied, tmp_path):
    """Thresholds are of |Δ|, not alpha·Δ: a sweep's outputs (other alphas, the same vectors) share the pre-pass,
    and the output at the tied run's alphas is its bytes."""
    d, out = two, tmp_path / "sweep"
    vectors = ["--base", str(d["base"]), "--chat", str(d["chat"]), "--base", str(d["base"]), "--chat", str(d["chat2"])]
    sweep = [x for a in ALPHAS for x in ("--alpha", f"{a},{a / 2}")]
    run = ["--ties", "0.2", "--backend", "local", "--unit-size", "2KiB", "--no-progress"]
    assert main(["merge", *vectors, "--cp", str(d["cp"]), "--out", str(out), *sweep, *run]) == 0
    label = "alpha" + "_".join(f"{a:g}" for a in ALPHAS)
    assert sorted(p.name for p in out.iterdir()) == sorted([label, "alpha" + "_".join(f"{a / 2:g}" for a in ALPHAS)])
    assert shard_bytes(out / label) == shard_bytes(tied)
