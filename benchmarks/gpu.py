#!/usr/bin/env python
"""The prepared GPU benchmark (one GPU, under 5 minutes): prints a short table last.

1. The fused Triton kernel's GB/s (bytes read + written) at several sizes on random bf16 data, against a
   device-to-device copy of the same byte count, measured in the same run (target: ≥ 90 % of the copy);
   then at the largest size for other launch shapes (BLOCK × num_warps), to tune the defaults.
2. Bit identity of the kernel with the CPU kernel and the float64 reference (subnormal values too).
3. End to end: a generated ~8 GB merge (three inputs + one output) with `--device cuda` against the CPU
   path on the same machine, and identical output bytes.

    python benchmarks/gpu.py [--e2e-gb 8] [--data /tmp/chatvec-gpu-bench] [--skip-e2e]
    python benchmarks/gpu.py --dry-run   # no GPU: tiny sizes, the kernel interpreted on the CPU, both merges on
                                         # the CPU; checks that the script runs end to end before a GPU is lent
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def timed(fn, device: str, repeat: int = 10) -> float:
    """Median seconds of `fn` after a warm-up (CUDA events on a GPU; the wall clock in a dry run)."""
    if device != "cuda":
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def kernel_gbps(n: int, device: str) -> tuple[float, float]:
    """(kernel, device-to-device copy) GB/s for a one-vector bf16 merge of `n` elements (bytes read + written)."""
    from chatvec_dist.kernels.triton_merge import TritonScratch, combine_triton

    cp, base = (torch.randn(n, device=device, dtype=torch.bfloat16) for _ in range(2))
    chat = base + 0.01 * torch.randn(n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, device=device, dtype=torch.bfloat16)
    stats, scratch = torch.zeros(5, device=device, dtype=torch.float64), TritonScratch()
    moved = 4 * n * 2  # three inputs read, one output written
    t_kernel = timed(lambda: combine_triton(out, cp, [(1.0, chat, base)], torch.float32, stats, scratch), device)
    src = torch.empty(moved // 2, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device)  # reads + writes the same byte count
    return moved / t_kernel / 1e9, moved / t_copy / 1e9


def kernel_rows(sizes: list[int], device: str) -> list[tuple]:
    return [(n, *kernel_gbps(n, device)) for n in sizes]


def launch_sweep(n: int, device: str) -> list[tuple]:
    """The kernel's GB/s at `n` elements for other (BLOCK, num_warps): data for tuning triton_merge's defaults."""
    from chatvec_dist.kernels import triton_merge

    default = triton_merge.BLOCK, triton_merge.NUM_WARPS
    rows = []
    try:
        for block in (1024, 2048, 4096):  # 8192 spills registers (ptxas, sm_90)
            for warps in (4, 8):
                triton_merge.BLOCK, triton_merge.NUM_WARPS = block, warps
                k, c = kernel_gbps(n, device)
                rows.append((block, warps, k, c, (block, warps) == default))
    finally:
        triton_merge.BLOCK, triton_merge.NUM_WARPS = default
    return rows


def identity_check(n: int = 1 << 22, device: str = "cuda") -> bool:
    """GPU kernel bits == CPU kernel bits, for each output dtype and alpha, on normal-sized and on subnormal
    values (a GPU that flushed denormals to zero would differ there)."""
    from chatvec_dist.kernels.cpu import Scratch, combine
    from chatvec_dist.kernels.reference import reference
    from chatvec_dist.kernels.triton_merge import combine_triton

    ok = True
    for scale in (1.0, 1e-38):
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
            for alpha in (1.0, 0.5, 0.3):
                g = torch.Generator().manual_seed(0)
                cp, base = ((scale * torch.randn(n, generator=g)).bfloat16() for _ in range(2))
                chat = (base.float() + 0.01 * scale * torch.randn(n, generator=g)).bfloat16()
                compute = torch.float32 if out_dtype != torch.float32 else torch.float64
                gpu = torch.empty(n, dtype=out_dtype, device=device)
                combine_triton(gpu, cp.to(device), [(alpha, chat.to(device), base.to(device))], compute,
                               torch.zeros(5, dtype=torch.float64, device=device))
                cpu = torch.empty(n, dtype=out_dtype)
                combine(cpu, cp, [(alpha, chat, base)], compute, Scratch())
                same_cpu = torch.equal(gpu.cpu().view(torch.uint8), cpu.view(torch.uint8))
                ref = reference(cp, [(alpha, chat, base)], out_dtype)
                same_ref = torch.equal(cpu.view(torch.uint8), ref.view(torch.uint8))
                print(f"identity scale={scale:g} {out_dtype} alpha={alpha}: gpu==cpu {same_cpu}, "
                      f"cpu==float64 ref {same_ref}", flush=True)
                ok &= same_cpu
    return ok


def preflight() -> str | None:
    """What would stop Triton before the first launch on this machine (it builds a small C helper once)."""
    import sysconfig

    if not any(shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "gcc", "clang")):
        return "no C compiler (cc, gcc or clang): Triton builds its launcher with one"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return f"no Python.h under {sysconfig.get_paths()['include']} (install python3-dev): Triton's launcher needs it"
    return None


def make_model(root: Path, gb_per_checkpoint: float, device: str = "cuda") -> dict[str, Path]:
    """Three Llama-shaped bf16 checkpoints of about `gb_per_checkpoint` each, made on `device`."""
    from safetensors.torch import save_file

    hidden, inter = (4096, 11008) if gb_per_checkpoint >= 0.5 else (256, 688)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, int(gb_per_checkpoint * 1e9 / 2 / per_layer))
    paths = {}
    for k, name in enumerate(("base", "chat", "cp")):
        d = root / name
        if (d / "done").exists():
            paths[name] = d
            continue
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        weight_map = {}
        for layer in range(layers):
            torch.manual_seed(layer)  # base weights; chat and cp add their own small updates
            shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                      "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                      "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
            tensors = {}
            for sub, shape in shapes.items():
                w = torch.randn(shape, device=device) * 0.02
                if k:
                    w += 0.002 * torch.randn(shape, device=device)
                tensors[f"model.layers.{layer}.{sub}.weight"] = w.bfloat16().cpu()
            fname = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
            save_file(tensors, d / fname, metadata={"format": "pt"})
            weight_map |= {n: fname for n in tensors}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "done").write_text("")
        paths[name] = d
    return paths


def merge(paths: dict[str, Path], out: Path, device: str, backend: str = "local", workers: int | None = None) -> float:
    cmd = [sys.executable, "-m", "chatvec_dist.cli", "merge", "--base", str(paths["base"]), "--chat", str(paths["chat"]),
           "--cp", str(paths["cp"]), "--out", str(out), "--overwrite", "--restart", "--no-progress", "--device", device,
           "--backend", backend] + (["--workers", str(workers)] if workers else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def floor_seconds(paths: dict[str, Path], out_bytes: int, scratch: Path) -> float:
    """Read every input byte once and write one output's bytes (hot cache, like the merges)."""
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    for d in paths.values():
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    with open(scratch, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(memoryview(buf)[: min(len(buf), left)])
    t = time.perf_counter() - t0
    scratch.unlink()
    return t


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--e2e-gb", type=float, default=8.0, help="bytes read + written by the end-to-end merge")
    ap.add_argument("--data", default="/tmp/chatvec-gpu-bench")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: tiny sizes, kernel interpreted, merges on the CPU")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (inside the functions below)
        device, name, args.e2e_gb = "cpu", "dry run on the CPU (TRITON_INTERPRET=1)", 0.04
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or pass --dry-run)", file=sys.stderr)
        return 2
    else:
        device, name = "cuda", torch.cuda.get_device_name()
    if (problem := preflight()) is not None:
        print(f"cannot run the Triton kernel here: {problem}", file=sys.stderr)
        return 2
    rows = kernel_rows([1 << 12] if args.dry_run else [1 << 20, 1 << 24, 1 << 26, 1 << 28], device)
    sweep_n = 1 << 12 if args.dry_run else 1 << 28
    sweep = launch_sweep(sweep_n, device)
    identical = identity_check(1 << 12 if args.dry_run else 1 << 22, device)
    e2e = None
    if not args.skip_e2e:
        root = Path(args.data)
        paths = make_model(root, args.e2e_gb / 4, device)
        out_bytes = sum(f.stat().st_size for f in paths["cp"].glob("*.safetensors"))
        merge(paths, root / "warm", "cpu")  # warms the page cache
        floor = floor_seconds(paths, out_bytes, root / "floor.bin")
        runs = [("I/O floor (read inputs + write output)", floor, None)]
        for label, out, how in ((f"chatvec --device {device}, local, 2 threads (default)", "out-cuda", (device, "local", None)),
                                (f"chatvec --device {device}, local, 4 threads", "out-cuda4", (device, "local", 4)),
                                (f"chatvec --device {device}, Ray (start-up included)", "out-cuda-ray", (device, "ray", None)),
                                (f"chatvec --device cpu, local, {os.cpu_count()} threads", "out-cpu", ("cpu", "local", None))):
            runs.append((label, merge(paths, root / out, *how), shard_hashes(root / out)))
        same = all(h == runs[-1][2] for _, _, h in runs[1:])
        e2e = (4 * out_bytes, runs, same)
    print(f"\n## GPU benchmark — {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| elements | kernel GB/s | D2D copy GB/s | kernel / copy |\n|---|---|---|---|")
    for n, k, c in rows:
        print(f"| {n:,} | {k:.1f} | {c:.1f} | {k / c:.0%} |")
    print(f"\n| BLOCK | num_warps | kernel GB/s at {sweep_n:,} elements "
          "| D2D copy GB/s | kernel / copy |\n|---|---|---|---|---|")
    for block, warps, k, c, default in sweep:
        print(f"| {block}{' (default)' if default else ''} | {warps} | {k:.1f} | {c:.1f} | {k / c:.0%} |")
    print(f"\nkernel bits == CPU kernel bits (bf16/fp16/fp32 out, alpha 1, 0.5, 0.3, normal and subnormal values): {identical}")
    if e2e:
        moved, runs, same = e2e
        print("| end to end (hot cache) | wall s | GB/s | × floor |\n|---|---|---|---|")
        for label, t, _ in runs:
            print(f"| {label} | {t:.1f} | {moved / t / 1e9:.2f} | {t / runs[0][1]:.2f} |")
        print(f"\noutput bytes cuda == cpu: {same}")
    return 0 if identical and (e2e is None or e2e[2]) else 1


if __name__ == "__main__":
    sys.exit(main())
