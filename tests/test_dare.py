"""DARE: the mask and rescale against a plain numpy float64 implementation of the definition written here, and the
same bytes for any worker count, backend, unit size, resume and kernel (Triton interpreted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
from test_e2e import load_all, merge_args, shard_bytes

from chatvec_dist.cli import main
from chatvec_dist.kernels.cpu import CHUNK, Scratch, combine
from chatvec_dist.kernels.sparse import Sparse
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.planning.sparsity import term_dare
from chatvec_dist.recipe.file import load_recipe
from chatvec_dist.recipe.spec import Dare

M = np.uint64(0xFFFFFFFF)


def np_fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's fmix32 on uint64 arrays of 32-bit words."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & M
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & M
    return h ^ (h >> np.uint64(16))


def np_salt(seed: int, name: str) -> int:
    key = xxhash.xxh64_intdigest(name.encode())
    one = lambda x: int(np_fmix(np.array([x], dtype=np.uint64))[0])  # noqa: E731
    return one((key >> 32) ^ one((key & 0xFFFFFFFF) ^ one(seed ^ 0x9E3779B9)))


def np_keep(seed: int, name: str, density: float, first: int, n: int) -> np.ndarray:
    """The documented mask: fmix(fmix(lo ^ fmix(hi ^ salt)) ^ salt) < round(density · 2^32)."""
    s = np.uint64(np_salt(seed, name))
    index = np.arange(first, first + n, dtype=np.uint64)
    high = np_fmix((index >> np.uint64(32)) ^ s)
    h = np_fmix(np_fmix((index & M) ^ high) ^ s)
    return h < np.uint64(round(density * 2**32))


def np_dare(cp, terms, out_dtype):
    """cp + Σ alpha · keep · (chat − base) / density, in float64; terms: (alpha, chat, base, keep, density)."""
    acc = cp.double().numpy().copy()
    for alpha, chat, base, keep, density in terms:
        acc += alpha * np.where(keep, chat.double().numpy() - base.double().numpy(), 0.0) / density
    return torch.from_numpy(acc).to(out_dtype)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def rand(n: int, seed: int, dtype=torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("first", [0, 2**32 - 1000])  # the high word of the index changes inside the call
def test_cpu_kernel_mask_and_rescale_match_numpy(first):
    n, name = CHUNK + 777, "model.layers.3.mlp.down_proj.weight"
    cp, base = rand(n, 1), rand(n, 2)
    chat = (base.double() + rand(n, 3, torch.float64, 0.01)).to(torch.bfloat16)
    other = rand(n, 4)
    dare = (term_dare(Dare(0.25, 7), name), None)
    out = torch.empty(n, dtype=torch.bfloat16)
    stats = combine(out, cp, [(1.0, chat, base), (0.5, other, None)], torch.float32, Scratch(), Sparse(first, dare))
    keep = np_keep(7, name, 0.25, first, n)
    zero = torch.zeros(n, dtype=torch.bfloat16)
    expected = np_dare(cp, [(1.0, chat, base, keep, 0.25), (0.5, other, zero, np.ones(n, bool), 1.0)], torch.bfloat16)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))  # 1/0.25 and 0.5: exact scales
    assert stats.kept == [int(keep.sum()), n]
    assert 0.24 < keep.mean() < 0.26


def test_an_inexact_density_is_within_one_rounding():
    n, name = 20000, "w"
    cp, base = rand(n, 1), rand(n, 2)
    chat = (base.double() + rand(n, 3, torch.float64, 0.05)).to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16)
    combine(out, cp, [(0.7, chat, base)], torch.float32, Scratch(), Sparse(0, (term_dare(Dare(0.3, 1), name),)))
    expected = np_dare(cp, [(0.7, chat, base, np_keep(1, name, 0.3, 0, n), 0.3)], torch.bfloat16)
    diff = ulps(out, expected)
    assert int(diff.max()) <= 1 and float((diff == 0).double().mean()) > 0.99


def test_triton_kernel_equals_cpu_kernel_bit_for_bit():
    """Six vectors (two launches), DARE on four of them with different seeds, the index crossing 2^32."""
    pytest.importorskip("triton")
    from chatvec_dist.kernels.triton_merge import combine_triton

    n, first = 5000, 2**32 - 2345
    cp = rand(n, 1)
    terms = [(0.3 + 0.1 * i, rand(n, 10 + i), rand(n, 20 + i) if i % 2 else None) for i in range(6)]
    dare = tuple(term_dare(Dare(0.2 + 0.1 * i, i), "t") if i != 2 and i != 5 else None for i in range(6))
    sparse = Sparse(first, dare)
    cpu = torch.empty(n, dtype=torch.bfloat16)
    cpu_stats = combine(cpu, cp, terms, torch.float32, Scratch(), sparse)
    dev = torch.empty(n, dtype=torch.bfloat16)
    stats = torch.zeros(5 + len(terms), dtype=torch.float64)
    combine_triton(dev, cp, terms, torch.float32, stats, None, sparse)
    assert torch.equal(dev.view(torch.int16), cpu.view(torch.int16))
    assert [int(k) for k in stats[5:]] == cpu_stats.kept
    assert cpu_stats.kept[2] == n and cpu_stats.kept[0] < n


def expected_dare(llamas, alpha: float, density: float, seed: int) -> tuple[dict, dict]:
    """Every output tensor and each one's kept share, from the checkpoints with safetensors' own loader."""
    base, chat, cp = load_all(llamas["base"]), load_all(llamas["chat"]), load_all(llamas["cp"])
    out, kept = {}, {}
    for name, c in cp.items():
        keep = np_keep(seed, name, density, 0, c.numel())
        flat = [(alpha, chat[name].flatten(), base[name].flatten(), keep, density)]
        out[name] = np_dare(c.flatten(), flat, c.dtype).view(c.shape)
        kept[name] = keep.mean()
    return out, kept


@pytest.fixture(scope="module")
def dared(llamas, tmp_path_factory):
    out = tmp_path_factory.mktemp("dare") / "out"
    extra = ("--dare", "0.25:7", "--alpha", "0.5", "--backend", "local", "--workers", "1", "--unit-size", "2KiB")
    assert main(merge_args(llamas, out, "cp", *extra)) == 0
    return out


def test_merge_with_dare_matches_numpy_and_records_the_density(llamas, dared):
    expected, kept = expected_dare(llamas, 0.5, 0.25, 7)
    got = load_all(dared)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
    table, meta = read_manifest(dared)
    rows = {r["tensor"]: r for r in table.to_pylist()}
    for name, share in kept.items():
        assert rows[name]["density"] == [pytest.approx(share, abs=1e-12)], name
        assert rows[name]["sign_agreement"] is None
    assert meta["recipe"]["vectors"][0]["dare"] == {"density": 0.25, "seed": 7}
    assert verify(dared) == []


def test_same_bytes_for_workers_unit_sizes_resume_and_ray(llamas, dared, ray_local, tmp_path, monkeypatch):
    from chatvec_dist.exec import worker

    dare = ("--dare", "0.25:7", "--alpha", "0.5")
    runs = {
        "local2": ("--backend", "local", "--workers", "2", "--unit-size", "2KiB"),
        "units64k": ("--backend", "local", "--workers", "2", "--unit-size", "64KiB"),
        "ray": ("--workers", "1", "--unit-size", "4KiB"),
    }
    for name, extra in runs.items():
        assert main(merge_args(llamas, tmp_path / name, "cp", *dare, *extra)) == 0
        assert shard_bytes(tmp_path / name) == shard_bytes(dared), name
    real_run, calls = worker.UnitRunner.run, []

    def failing(self, unit):
        calls.append(unit.id)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real_run(self, unit)

    out = tmp_path / "resumed"
    args = merge_args(llamas, out, "cp", *dare, "--backend", "local", "--workers", "1", "--unit-size", "2KiB")
    monkeypatch.setattr(worker.UnitRunner, "run", failing)
    assert main(args) == 130
    monkeypatch.setattr(worker.UnitRunner, "run", real_run)
    assert main(args) == 0
    assert shard_bytes(out) == shard_bytes(dared)
    a, b = read_manifest(out)[0], read_manifest(dared)[0]
    assert a.column("density").to_pylist() == b.column("density").to_pylist()  # journaled units' counts too


def test_another_seed_draws_another_mask(llamas, dared, tmp_path):
    out = tmp_path / "seed8"
    extra = ("--dare", "0.25:8", "--alpha", "0.5", "--backend", "local", "--unit-size", "2KiB")
    assert main(merge_args(llamas, out, "cp", *extra)) == 0
    expected, _ = expected_dare(llamas, 0.5, 0.25, 8)
    got = load_all(out)
    assert all(torch.equal(got[n].view(torch.int16), t.view(torch.int16)) for n, t in expected.items())
    assert shard_bytes(out) != shard_bytes(dared)


def test_recipe_file_round_trip_and_bad_values(llamas, tmp_path, capsys):
    args = merge_args(llamas, tmp_path / "o", "cp", "--dare", "0.1:3", "--print-recipe")
    assert main(args) == 0
    path = tmp_path / "r.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_recipe(path).vectors[0].dare == Dare(0.1, 3)
    path.write_text(path.read_text().replace("density: 0.1", "density: 1.5"))
    with pytest.raises(Exception, match=r"vectors\[0\]\.dare\.density.*\(0, 1\]"):
        load_recipe(path)
    assert main(merge_args(llamas, tmp_path / "o", "cp", "--dare", "0")) == 2
    assert "density 0.0: give a number in (0, 1]" in capsys.readouterr().err
    assert main(merge_args(llamas, tmp_path / "o", "cp", "--dare", "0.2:x")) == 2
    assert "DENSITY:SEED" in capsys.readouterr().err


def test_densities_the_mask_cannot_draw_and_scales_beyond_float32_are_refused():
    from chatvec_dist.recipe.spec import Recipe, RecipeError, Target, Vector

    with pytest.raises(RecipeError, match=r"at least 2\^-32"):
        Dare(1e-12)
    with pytest.raises(RecipeError, match="beyond float32's range") as e:
        Recipe((Vector("a", "b", Dare(1e-9)),), (Target("t", "c", "o", (1e38,)),))
    assert e.value.field == "alphas"
    with pytest.raises(RecipeError, match=r"seed"):
        Dare(0.5, -1)


def test_dare_keeps_its_mask_where_an_alpha_rule_sets_the_alpha(llamas, tmp_path):
    """Planning rebuilds a target's sources (alpha rules, the FP8 scale split, the MoE mapping): each vector's DARE
    must go with them."""
    out = tmp_path / "out"
    extra = ("--dare", "0.25:7", "--alpha", "0.5", "--alpha-rule", r"mlp\.=1", "--backend", "local")
    assert main(merge_args(llamas, out, "cp", *extra)) == 0
    half, _ = expected_dare(llamas, 0.5, 0.25, 7)
    one, _ = expected_dare(llamas, 1.0, 0.25, 7)
    got = load_all(out)
    assert any("mlp." in n for n in got) and any("mlp." not in n for n in got)
    for name, t in got.items():
        want = one[name] if "mlp." in name else half[name]
        assert torch.equal(t.view(torch.int16), want.view(torch.int16)), name
