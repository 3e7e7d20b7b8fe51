"""The fused numba kernels where numba's surroundings are hostile: no writable cache directory, several threads
compiling at once, operands of mixed layouts or of the wrong length."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import chatvec_dist
from chatvec_dist.kernels.cpu import FUSED_MIN, Scratch, combine
from chatvec_dist.kernels.fp8 import Blocked, Fp8Scratch, combine_fp8
from chatvec_dist.kernels.reference import reference
from chatvec_dist.term import Term

PACKAGE = Path(chatvec_dist.__file__).parent
COMPUTE = {torch.bfloat16: torch.float32, torch.float32: torch.float64}

# Runs in a fresh process: merges through the dispatch (numba compiles on first use) and checks the bytes against
# the float64 reference, in several threads at once where asked.
PROBE = textwrap.dedent(
    """
    import sys, threading, torch
    from chatvec_dist.kernels.cpu import FUSED_MIN, Scratch, combine
    from chatvec_dist.kernels.fp8 import Blocked, Fp8Scratch, combine_fp8
    from chatvec_dist.kernels.reference import reference
    from chatvec_dist.term import Term

    def one(seed, dtype, failures):
        g = torch.Generator().manual_seed(seed)
        n = FUSED_MIN + seed
        cp, chat, base = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
        terms = [Term(0.5, chat, base), Term(-2.0, base, chat)]
        out = torch.empty(n, dtype=dtype)
        combine(out, cp, terms, {torch.bfloat16: torch.float32, torch.float32: torch.float64}[dtype], Scratch())
        if not torch.equal(out, reference(cp, terms, dtype)):
            failures.append((seed, dtype))

    def fp8(failures):
        codes = torch.arange(256 * 256, dtype=torch.int32).remainder(127).to(torch.uint8)
        x = Blocked(codes.view(torch.float8_e4m3fn), torch.ones(4))
        out = torch.empty(256 * 256, dtype=torch.float8_e4m3fn)
        combine_fp8(out, torch.empty(4), x, [(1.0, x, x)], 256, Fp8Scratch())
        if not torch.equal(out.view(torch.uint8), codes):
            failures.append("fp8")

    def guarded(f, *args):
        try:
            f(*args)
        except Exception as e:
            failures.append(repr(e)[:200])

    failures = []
    jobs = [(one, (i, d, failures)) for i in range(int(sys.argv[1])) for d in (torch.bfloat16, torch.float32)]
    threads = [threading.Thread(target=guarded, args=(f, *a)) for f, a in jobs + [(fp8, (failures,))]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("failures", failures)
    """
)


def _probe(pythonpath: Path, env: dict[str, str], threads: int = 1) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(threads)],
        env=base | {"PYTHONPATH": str(pythonpath)} | env,
        cwd=pythonpath,  # `python -c` imports from its working directory first
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_no_writable_cache_directory_compiles_in_memory_and_warns_once(tmp_path):
    """The package's __pycache__ cannot be made (a file is there) and the user's cache directory is under a file:
    numba finds no place to cache; the kernels still run (and compute the same bytes), with one warning."""
    copy = tmp_path / "pkg"
    shutil.copytree(PACKAGE, copy / "chatvec_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for d in (copy / "chatvec_dist").rglob("*"):
        if d.is_dir():
            (d / "__pycache__").write_text("not a directory")
    (copy / "chatvec_dist" / "__pycache__").write_text("not a directory")
    blocked = tmp_path / "file"
    blocked.write_text("")
    run = _probe(copy, {"XDG_CACHE_HOME": str(blocked / "cache"), "HOME": str(blocked / "home")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "failures []" in run.stdout
    assert run.stderr.count("numba cannot cache the fused kernels") == 1, run.stderr[-3000:]
    assert not list(copy.rglob("*.nbi"))


def test_threads_compiling_at_once_in_a_fresh_process(tmp_path):
    """Five threads call the kernels for the first time together, with an empty cache (NUMBA_CACHE_DIR)."""
    run = _probe(PACKAGE.parent, {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}, threads=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "failures []" in run.stdout
    assert list((tmp_path / "cache").rglob("*.nbi"))  # it did compile there, not load another cache


def test_mixed_layouts_take_the_torch_kernel():
    """A strided vector beside contiguous ones: numba would type the tuple apart and fail; the same bytes."""
    g = torch.Generator().manual_seed(5)
    n = FUSED_MIN
    cp, chat, base = (torch.randn(n, generator=g).bfloat16() for _ in range(3))
    strided = torch.stack([chat, base], 1)[:, 0]  # chat's values, every other element of a buffer
    terms = [Term(0.5, chat, base), Term(-2.0, strided, base)]
    out = torch.empty(n, dtype=torch.bfloat16)
    combine(out, cp, terms, torch.float32, Scratch())
    assert torch.equal(out.view(torch.int16), reference(cp, terms, torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_operand_of_another_length_is_an_error_not_a_read_past_its_end(dtype):
    n = FUSED_MIN
    cp, chat, short = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype), torch.zeros(n - 1, dtype=dtype)
    with pytest.raises(RuntimeError, match="must match"):
        combine(torch.empty(n, dtype=dtype), cp, [Term(0.5, chat, short)], COMPUTE[dtype], Scratch())


@pytest.mark.parametrize("what", ["values", "scale", "out_scale", "rows"])
def test_fp8_operands_that_do_not_fit_are_an_error_not_a_read_past_their_end(what):
    rows, cols = 256, 256
    x = Blocked(torch.zeros(rows * cols, dtype=torch.float8_e4m3fn), torch.ones(4))
    bad = {
        "values": Blocked(x.values[:-cols], x.scale),
        "scale": Blocked(x.values, x.scale[:3]),
    }.get(what, x)
    n = rows * cols - (cols // 2 if what == "rows" else 0)  # "rows": not whole rows
    out_scale = torch.empty(3 if what == "out_scale" else 4)
    with pytest.raises(RuntimeError, match="shape|size"):
        combine_fp8(torch.empty(n, dtype=torch.float8_e4m3fn), out_scale, x, [(1.0, bad, x)], cols, Fp8Scratch())


def test_ray_actors_compute_the_fused_bytes_and_manifest_of_the_local_backend(tmp_path, monkeypatch):
    """The embedding (1024 × 128 bfloat16, a fused combine) merged by Ray actors and by local threads."""
    from safetensors.torch import load_file

    from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint
    from chatvec_dist.output.manifest import read_manifest

    cfg = llama_config(1024, hidden_size=128, intermediate_size=64, num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    made = {}
    for k, name in enumerate(("base", "chat", "cp")):
        made[name] = {
            n: (t + 0.01 * k * torch.randn(t.shape, generator=g)).bfloat16() for n, t in llama_tensors(cfg, g).items()
        }
        save_checkpoint(tmp_path / name, made[name], cfg)
    big = "model.embed_tokens.weight"
    assert made["cp"][big].numel() >= FUSED_MIN
    from chatvec_dist.kernels import cpu_fused

    sizes, real = [], cpu_fused.combine_fused
    monkeypatch.setattr(cpu_fused, "combine_fused", lambda out, *a: sizes.append(out.numel()) or real(out, *a))
    outs = {}
    for backend in ("ray", "local"):
        recipe = chatvec_dist.make_recipe(
            *(str(tmp_path / n) for n in ("base", "chat", "cp")), str(tmp_path / backend), 0.5
        )
        chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend=backend, workers=2, progress=False))
        outs[backend] = tmp_path / backend
    assert made["cp"][big].numel() in sizes  # the local threads' (the actors' process has its own module)
    shards = {b: [p.read_bytes() for p in sorted(o.glob("*.safetensors"))] for b, o in outs.items()}
    assert shards["ray"] == shards["local"]
    got = {k: v for p in sorted(outs["ray"].glob("*.safetensors")) for k, v in load_file(p).items()}
    want = reference(made["cp"][big], [Term(0.5, made["chat"][big], made["base"][big])], torch.bfloat16)
    assert torch.equal(got[big].view(torch.int16), want.view(made["cp"][big].shape).view(torch.int16))
    rows = {b: {r["tensor"]: r for r in read_manifest(o)[0].to_pylist()} for b, o in outs.items()}
    for column in ("hash", "cp_norm", "delta_norm", "rel_update", "nan_count"):
        assert rows["ray"][big][column] == rows["local"][big][column], column
