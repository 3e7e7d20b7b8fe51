"""The Triton kernel, bit for bit against the float64 reference and the CPU kernel, every dtype combination: on
the GPU where there is one, else run by Triton's interpreter on CPU tensors (as in CI)."""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from chatvec_dist.kernels.cpu import Scratch, combine  # noqa: E402
from chatvec_dist.kernels.reference import reference  # noqa: E402
from chatvec_dist.kernels.triton_merge import combine_triton  # noqa: E402
from chatvec_dist.torch_dtypes import compute_dtype  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
N = 2500  # the interpreter is slow: small tensors, more than one block
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # interpreted: conftest


def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


def rand(n: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def both(out_dtype, cp, terms):
    dtypes = (
        [NAMES[out_dtype]]
        + ([NAMES[cp.dtype]] if cp is not None else [])
        + [NAMES[x.dtype] for _, p, m in terms for x in (p, m) if x is not None]
    )
    compute = compute_dtype(dtypes)
    n = terms[0][1].numel() if cp is None else cp.numel()
    gpu, cpu = torch.empty(n, dtype=out_dtype, device=DEVICE), torch.empty(n, dtype=out_dtype)
    stats = torch.zeros(5, dtype=torch.float64, device=DEVICE)
    combine_triton(gpu, on_device(cp), [(a, on_device(p), on_device(m)) for a, p, m in terms], compute, stats)
    return gpu.cpu(), stats.cpu(), cpu, combine(cpu, cp, terms, compute, Scratch())


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@pytest.mark.parametrize("cp_dt,vec_dt,out_dt", list(itertools.product(DTYPES, DTYPES, DTYPES)))
def test_every_dtype_combination_matches_reference_and_cpu(cp_dt, vec_dt, out_dt, alpha):
    cp, base = rand(N, cp_dt, 1), rand(N, vec_dt, 2)
    chat = (base.double() + rand(N, torch.float64, 3, 0.01)).to(vec_dt)
    terms = [(alpha, chat, base)]
    gpu, stats, cpu, cpu_stats = both(out_dt, cp, terms)
    assert torch.equal(bits(gpu), bits(reference(cp, terms, out_dt)))
    assert torch.equal(bits(gpu), bits(cpu))
    assert stats[0].item() == pytest.approx(cpu_stats.cp_sq, rel=1e-5)
    assert stats[1].item() == pytest.approx(cpu_stats.delta_sq, rel=1e-5)
    assert stats[2].item() == pytest.approx(cpu_stats.update_sq, rel=1e-4)


@pytest.mark.parametrize(
    "cp_dt,vec_dt", [(torch.float64, torch.float64), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float64)]
)
def test_float64_outputs_match_reference_and_cpu(cp_dt, vec_dt):
    """A checkpoint stored in float64 merges on the GPU too: float64 arithmetic, values beyond float32's range
    kept (and not counted as Inf), NaN written canonically."""
    cp, base = rand(N, cp_dt, 1), rand(N, vec_dt, 2)
    if cp_dt == torch.float64:
        cp[:7] = torch.tensor([1e300, -1e300, float("inf"), float("nan"), 5e-324, -0.0, 1e-310], dtype=torch.float64)
    chat = (base.double() + rand(N, torch.float64, 3, 0.01)).to(vec_dt)
    terms = [(0.3, chat, base)]
    gpu, stats, cpu, cpu_stats = both(torch.float64, cp, terms)
    assert torch.equal(bits(gpu), bits(cpu))
    finite = ~torch.isnan(cpu)
    assert torch.equal(bits(gpu)[finite], bits(reference(cp, terms, torch.float64))[finite])
    assert (
        (int(stats[3]), int(stats[4]))
        == (cpu_stats.nan, cpu_stats.inf)
        == ((1, 1) if cp_dt == torch.float64 else (0, 0))
    )


def test_inexact_alpha_gives_the_cpu_kernels_bits():
    cp, base, chat = rand(N, torch.bfloat16, 1), rand(N, torch.bfloat16, 2), rand(N, torch.bfloat16, 3)
    gpu, _, cpu, _ = both(torch.bfloat16, cp, [(0.3, chat, base)])
    assert torch.equal(bits(gpu), bits(cpu))


def test_more_vectors_than_one_launch_holds_chain_in_cpu_order():
    cp = rand(N, torch.bfloat16, 0)
    terms = [
        (0.1 * (i + 1), rand(N, torch.bfloat16, 2 * i + 1), rand(N, torch.bfloat16, 2 * i + 2) if i % 2 else None)
        for i in range(6)
    ]
    gpu, stats, cpu, cpu_stats = both(torch.bfloat16, cp, terms)
    assert torch.equal(bits(gpu), bits(cpu))
    assert stats[1].item() == pytest.approx(cpu_stats.delta_sq, rel=1e-5)


def test_extract_and_copy_and_bfloat16_rounding_edges():
    base, chat = rand(N, torch.bfloat16, 2), rand(N, torch.bfloat16, 3)
    gpu, _, cpu, _ = both(torch.float32, None, [(1.0, chat, base)])
    assert torch.equal(gpu, cpu) and torch.equal(gpu, reference(None, [(1.0, chat, base)], torch.float32))
    # Exact ties and specials: round to nearest even, NaN stays NaN, overflow goes to Inf.
    edges = torch.tensor(
        [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, float("inf"), float("nan"), 0.0, -0.0, 1e-40, 2**-133],
        dtype=torch.float32,
    ).repeat(300)
    gpu, stats, cpu, cpu_stats = both(torch.bfloat16, edges, [])
    assert torch.equal(bits(gpu), bits(cpu))
    nan = torch.isnan(edges)
    assert torch.equal(bits(cpu)[~nan], bits(edges.to(torch.bfloat16))[~nan])  # torch's own rounding elsewhere
    assert bool((bits(cpu)[nan] == 0x7FC0).all())  # canonical quiet NaN
    assert (int(stats[3]), int(stats[4])) == (cpu_stats.nan, cpu_stats.inf) == (300, 600)


def test_signed_zeros_follow_the_formula():
    """−0 − (+0) = −0, and −0 + (−0) = −0: as the CPU kernel and the float64 reference."""
    zero, neg = torch.zeros(N, dtype=torch.bfloat16), -torch.zeros(N, dtype=torch.bfloat16)
    for cp, alpha in ((neg, 1.0), (neg, 0.3), (zero, 1.0), (None, 1.0)):
        gpu, _, cpu, _ = both(torch.bfloat16, cp, [(alpha, neg, zero)])
        ref = reference(cp, [(alpha, neg, zero)], torch.bfloat16)
        assert torch.equal(bits(gpu), bits(cpu)) and torch.equal(bits(gpu), bits(ref))
        assert bits(gpu)[0].item() == (0 if cp is zero else -0x8000)


@pytest.mark.parametrize("out_dt", DTYPES)
def test_subnormal_inputs_and_outputs_keep_their_bits(out_dt):
    """bfloat16 subnormals (|x| < 1.2e-38) widened exactly and results rounded exactly, as on a GPU (no flushing)."""
    cp, base = rand(N, torch.bfloat16, 1, 1e-38), rand(N, torch.bfloat16, 2, 1e-38)
    chat = (base.double() + rand(N, torch.float64, 3, 1e-40)).to(torch.bfloat16)
    assert (cp.float().abs() < torch.finfo(torch.float32).tiny).sum() > N // 2  # mostly subnormal
    for alpha in (1.0, 0.3):
        gpu, _, cpu, _ = both(out_dt, cp, [(alpha, chat, base)])
        assert torch.equal(bits(gpu), bits(cpu))
        assert torch.equal(bits(cpu), bits(reference(cp, [(alpha, chat, base)], out_dt)))


def test_reused_scratch_gives_fresh_stats_for_a_smaller_call():
    """Partials rows are reused across calls: a smaller call (a copy: no vectors) must not see stale rows."""
    from chatvec_dist.kernels.triton_merge import TritonScratch

    scratch, stats = TritonScratch(), torch.zeros(5, dtype=torch.float64, device=DEVICE)
    cp, base, chat = (rand(3 * N, torch.bfloat16, seed).to(DEVICE) for seed in (1, 2, 3))
    combine_triton(
        torch.empty(3 * N, dtype=torch.bfloat16, device=DEVICE), cp, [(1.0, chat, base)], torch.float32, stats, scratch
    )
    assert (stats[:3] > 0).all()
    stats.zero_()
    out = torch.empty(N, dtype=torch.bfloat16, device=DEVICE)
    combine_triton(out, cp[:N], [], torch.float32, stats, scratch)
    assert torch.equal(out, cp[:N])
    assert stats[0].item() == pytest.approx(float(cp[:N].double().square().sum()), rel=1e-6)
    assert stats[1:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_the_gpu_worker_pipeline_gives_the_cpu_paths_bytes(llamas, tmp_path, monkeypatch):
    """TritonCompute — device buffers, uploads of only what the kernel reads, the kernel, the copy back, whole
    pieces, hash and write block by block — on the GPU, or on CPU tensors (interpreted): a batch with a float32
    output and an extended vocabulary whose skipped embeddings are copies gives the CPU path's bytes, hashes and
    stats. (Overlap is measured by benchmarks/gpu.py.)"""
    import dataclasses

    from test_e2e import shard_bytes

    import chatvec_dist
    from chatvec_dist.exec import worker
    from chatvec_dist.exec.compute import TritonCompute
    from chatvec_dist.output.manifest import read_manifest
    from chatvec_dist.output.verify import verify
    from chatvec_dist.recipe.spec import Recipe

    uploaded = []

    class Recorded(TritonCompute):
        def upload(self, inputs):
            uploaded.extend(inputs)
            return super().upload(inputs)

    def recipe(out: str) -> Recipe:
        base = chatvec_dist.make_recipe(
            str(llamas["base"]),
            str(llamas["chat"]),
            {"zh": str(llamas["cp"]), "ko": str(llamas["cp_ext"])},
            out,
            0.5,
            vocab="skip",
            unit_bytes=8192,
        )
        zh, ko = base.targets
        return Recipe(base.vectors, (dataclasses.replace(zh, dtype="float32"), ko), unit_bytes=8192)

    options = chatvec_dist.RunOptions(backend="local", workers=2, progress=False)
    chatvec_dist.run(recipe(str(tmp_path / "cpu")), options)
    monkeypatch.setattr(worker, "make_compute", lambda device, strict: Recorded(DEVICE))
    chatvec_dist.run(recipe(str(tmp_path / "triton")), options)  # two threads: launches take turns (_LAUNCH)

    for name in ("zh", "ko"):
        cpu, tri = tmp_path / "cpu" / name, tmp_path / "triton" / name
        assert shard_bytes(tri) == shard_bytes(cpu) and verify(tri) == []
        want = {r["tensor"]: r for r in read_manifest(cpu)[0].to_pylist()}
        for r in read_manifest(tri)[0].to_pylist():
            assert r["hash"] == want[r["tensor"]]["hash"]
            for norm in ("cp_norm", "delta_norm", "rel_update"):
                got, expected = r[norm], want[r["tensor"]][norm]  # None where not measured (a copy)
                assert (got is None) == (expected is None), (name, r["tensor"], norm)
                assert expected is None or got == pytest.approx(expected, rel=1e-5, abs=1e-12), (
                    name,
                    r["tensor"],
                    norm,
                )
    planned = chatvec_dist.plan(recipe(str(tmp_path / "plan")))
    rules = {p.tensor.name: p.tensor for tp in planned.targets for p in tp.layout.tensors if tp.target.name == "ko"}
    copied = {rules[n].cp for n in ("model.embed_tokens.weight", "lm_head.weight")}
    assert {rules[n].rule for n in ("model.embed_tokens.weight", "lm_head.weight")} == {"copy"}
    assert uploaded and not copied & set(uploaded)  # read, written straight from the host buffer, never uploaded


def test_a_gpu_worker_tries_the_kernel_when_it_starts(monkeypatch):
    """The kernel is launched once as a GPU worker starts, so a toolchain that cannot build Triton's launcher fails
    there, where `auto` can still choose the CPU (and `cuda` stops), naming the cause (first line) and the point
    (last line)."""
    from chatvec_dist.errors import ChatvecError
    from chatvec_dist.exec import compute, device
    from chatvec_dist.kernels import triton_merge

    calls = []
    monkeypatch.setattr(triton_merge, "combine_triton", lambda *args: calls.append(args))
    compute.TritonCompute(DEVICE)
    assert len(calls) == 1

    def no_compiler(device):
        raise RuntimeError("Failed to build Triton's launcher\n  cc -O3 main.c\nerror: no C compiler found")

    monkeypatch.setattr(compute, "TritonCompute", no_compiler)
    fallback = device.make_compute(torch.device("cuda", 0), strict=False)
    assert isinstance(fallback, compute.CpuCompute)
    assert fallback.fallback == (
        "the GPU kernel cannot run on cuda:0 (RuntimeError: Failed to build Triton's "
        "launcher … error: no C compiler found)"
    )
    with pytest.raises(ChatvecError, match=r"^--device cuda, but the GPU kernel cannot run on cuda:0 \(RuntimeError"):
        device.make_compute(torch.device("cuda", 0), strict=True)


def test_compiled_for_an_h100_the_kernel_rounds_as_the_cpu_does():
    """The interpreter runs Python, not PTX: compile every launch shape for sm_90 (no GPU needed), specialized as
    Triton's launcher does, and check what bit identity on hardware depends on: no FMA contraction, no flushed
    denormals, no argument narrowed to float32 (an alpha of 0.3 must reach a float64 merge in full); and that
    aligned data gets 16-byte loads."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip(f"triton {triton.__version__}: ASTSource takes named signatures from 3.3 on")
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here.parent), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(here / "compile_for_gpu.py")], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    calls = json.loads(done.stdout)  # per call: the launches on aligned tensors, then on views one element off
    assert [[len(launches) for launches in c] for c in calls] == [[1, 1]] * 5 + [[2, 2]] + [[1, 1]] * 4
    for aligned, unaligned in calls:
        for facts in aligned + unaligned:
            assert facts["cubin_bytes"] > 0
            assert (facts["fma"], facts["ftz"], facts["f32_params"], facts["inexact_div"]) == (0, False, 0, 0), facts
        assert all(facts["v4_loads"] > 0 for facts in aligned), aligned  # 16-byte loads where the data allows


def test_the_prepared_gpu_benchmark_runs_end_to_end_as_a_dry_run(tmp_path):
    """benchmarks/gpu.py waits for a lent GPU; its dry run (kernel interpreted, merges on the CPU) keeps it from
    rotting in between: the identity check, the model maker, the merges and the tables all run and agree. Run as
    on a lent GPU machine: from the checkout, not installed, and without Ray (its run is skipped, said so)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo / "tests" / "without_ray")}
    done = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "gpu.py"), "--dry-run", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = done.stdout[done.stdout.index("## Summary") :]
    assert "kernel bits == CPU kernel bits: True" in summary and "output bytes cuda == cpu: True" in summary
    assert "(Ray is not installed here: the Ray run is skipped)" in done.stdout
    assert (
        done.stdout.count("chatvec --device cpu, local") == 6 and "FAILED" not in done.stdout
    )  # 3 runs, table + summary
