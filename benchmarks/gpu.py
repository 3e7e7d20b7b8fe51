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

Runs from a checkout without `pip install` (a lent GPU machine may lack Ray and have no network: the Ray run is
then skipped). Each section is printed as soon as it is measured, so a failure late loses nothing before it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's chatvec_dist, installed or not
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the merges'
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def timed(fn, device: str, moved: int, repeat: int = 7) -> float:
    """Median seconds per call of `fn` after a warm-up. On a GPU, each sample times back-to-back calls (at least
    eight, and about 4 GB) between two CUDA events, as a merge's stream of launches runs: the host's cost of the
    first launch, which the GPU waits for, is then spread thin, and a call costs what it costs in a merge; in a
    dry run, the wall clock of one call."""
    if device != "cuda":
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    calls = max(8, min(1000, int(4e9 // moved)))
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def kernel_gbps(n: int, device: str) -> tuple[float, float]:
    """(kernel, device-to-device copy) GB/s for a one-vector bf16 merge of `n` elements (bytes read + written)."""
    from chatvec_dist.kernels.triton_merge import TritonScratch, combine_triton

    cp, base = (torch.randn(n, device=device, dtype=torch.bfloat16) for _ in range(2))
    chat = base + 0.01 * torch.randn(n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, device=device, dtype=torch.bfloat16)
    stats, scratch = torch.zeros(5, device=device, dtype=torch.float64), TritonScratch()
    moved = 4 * n * 2  # three inputs read, one output written
    t_kernel = timed(lambda: combine_triton(out, cp, [(1.0, chat, base)], torch.float32, stats, scratch), device, moved)
    src = torch.empty(moved // 2, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device, moved)  # reads + writes the same byte count
    return moved / t_kernel / 1e9, moved / t_copy / 1e9


def per_call_us(device: str, n: int = 4096) -> tuple[float, float]:
    """(the kernel, a torch copy) µs per call on `n` elements back to back: the fixed cost of a call, which the
    host's launch work sets (what a merge pays per small tensor)."""
    from chatvec_dist.kernels.triton_merge import TritonScratch, combine_triton

    cp, chat, base, out = (torch.randn(n, device=device, dtype=torch.bfloat16) for _ in range(4))
    stats, scratch = torch.zeros(5, device=device, dtype=torch.float64), TritonScratch()
    t_kernel = timed(lambda: combine_triton(out, cp, [(1.0, chat, base)], torch.float32, stats, scratch), device, 8 * n)
    t_copy = timed(lambda: out.copy_(cp), device, 4 * n)
    return t_kernel * 1e6, t_copy * 1e6


def kernel_rows(sizes: list[int], device: str) -> list[tuple]:
    print("| elements | kernel GB/s | D2D copy GB/s | kernel / copy |\n|---|---|---|---|", flush=True)
    rows = []
    for n in sizes:
        rows.append((n, *kernel_gbps(n, device)))
        print(KERNEL_ROW.format(*rows[-1], rows[-1][1] / rows[-1][2]), flush=True)
    return rows


KERNEL_ROW = "| {:,} | {:.1f} | {:.1f} | {:.0%} |"
SWEEP_ROW = "| {}{} | {} | {:.1f} | {:.1f} | {:.0%} |"


def launch_sweep(n: int, device: str) -> list[tuple]:
    """The kernel's GB/s at `n` elements for other (BLOCK, num_warps): data for tuning triton_merge's defaults."""
    from chatvec_dist.kernels import triton_merge

    default = triton_merge.BLOCK, triton_merge.NUM_WARPS
    print(
        f"\n| BLOCK | num_warps | kernel GB/s at {n:,} elements | D2D copy GB/s | kernel / copy |\n|---|---|---|---|---|",
        flush=True,
    )
    rows = []
    try:
        for block in (1024, 2048, 4096):  # 8192 spills registers (ptxas, sm_90)
            for warps in (4, 8):
                triton_merge.BLOCK, triton_merge.NUM_WARPS = block, warps
                k, c = kernel_gbps(n, device)
                rows.append((block, warps, k, c, (block, warps) == default))
                print(SWEEP_ROW.format(block, " (default)" if rows[-1][4] else "", warps, k, c, k / c), flush=True)
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
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            for alpha in (1.0, 0.5, 0.3):
                g = torch.Generator().manual_seed(0)
                cp, base = ((scale * torch.randn(n, generator=g)).bfloat16() for _ in range(2))
                chat = (base.float() + 0.01 * scale * torch.randn(n, generator=g)).bfloat16()
                compute = torch.float32 if out_dtype.itemsize == 2 else torch.float64
                gpu = torch.empty(n, dtype=out_dtype, device=device)
                combine_triton(
                    gpu,
                    cp.to(device),
                    [(alpha, chat.to(device), base.to(device))],
                    compute,
                    torch.zeros(5, dtype=torch.float64, device=device),
                )
                cpu = torch.empty(n, dtype=out_dtype)
                combine(cpu, cp, [(alpha, chat, base)], compute, Scratch())
                same_cpu = torch.equal(gpu.cpu().view(torch.uint8), cpu.view(torch.uint8))
                ref = reference(cp, [(alpha, chat, base)], out_dtype)
                off_ref = int((cpu.view(torch.uint8) != ref.view(torch.uint8)).view(n, -1).any(1).sum())
                print(
                    f"identity scale={scale:g} {out_dtype} alpha={alpha}: gpu==cpu {same_cpu}; cpu != float64 "
                    f"ref in {off_ref} of {n:,} (16-bit outputs: rounded through float32, ≤ 1 ulp)",
                    flush=True,
                )
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
    layers = max(1, round(gb_per_checkpoint * 1e9 / 2 / per_layer))
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
            torch.manual_seed(layer)  # base weights; chat and cp add updates of their own (seeded apart)
            own = torch.Generator(device).manual_seed(1_000_003 * k + layer)
            shapes = {
                "self_attn.q_proj": (hidden, hidden),
                "self_attn.k_proj": (hidden, hidden),
                "self_attn.v_proj": (hidden, hidden),
                "self_attn.o_proj": (hidden, hidden),
                "mlp.gate_proj": (inter, hidden),
                "mlp.up_proj": (inter, hidden),
                "mlp.down_proj": (hidden, inter),
            }
            tensors = {}
            for sub, shape in shapes.items():
                w = torch.randn(shape, device=device) * 0.02
                if k:
                    w += 0.002 * torch.randn(shape, device=device, generator=own)
                tensors[f"model.layers.{layer}.{sub}.weight"] = w.bfloat16().cpu()
            fname = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
            save_file(tensors, d / fname, metadata={"format": "pt"})
            weight_map |= {n: fname for n in tensors}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "done").write_text("")
        paths[name] = d
    return paths


def merge(
    paths: dict[str, Path], out: Path, device: str, backend: str = "local", workers: int | None = None
) -> tuple[float, str]:
    """(wall seconds, the merge's last stderr line: its throughput summary, or why it failed)."""
    cmd = [
        sys.executable,
        "-m",
        "chatvec_dist.cli",
        "merge",
        "--base",
        str(paths["base"]),
        "--chat",
        str(paths["chat"]),
        "--cp",
        str(paths["cp"]),
        "--out",
        str(out),
        "--overwrite",
        "--restart",
        "--no-progress",
        "--device",
        device,
        "--backend",
        backend,
    ] + (["--workers", str(workers)] if workers else [])
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=MERGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # a hung merge costs one row, not the rest of a lent GPU's time
        shutil.rmtree(out, ignore_errors=True)
        return float("nan"), f"FAILED (still running after {MERGE_TIMEOUT_S} s, stopped)"
    seconds = time.perf_counter() - t0
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode:
        shutil.rmtree(out, ignore_errors=True)
        return float("nan"), f"FAILED (exit {done.returncode}): {last}"
    return seconds, last


MERGE_TIMEOUT_S = 150


def floor_seconds(paths: dict[str, Path], out_bytes: int, scratch: Path) -> float:
    """Read every input byte once and write one output's bytes, fsynced as a merge's are (hot cache, like the
    merges)."""
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
        os.fsync(fh.fileno())
    t = time.perf_counter() - t0
    scratch.unlink()
    return t


def shard_hashes(out: Path) -> dict[str, str] | None:
    if not out.is_dir():
        return None  # the merge failed
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def end_to_end(root: Path, gb: float, device: str) -> tuple[int, list[tuple], bool]:
    """The ~`gb` merge: the I/O floor, then chatvec on the GPU (local threads, `auto`'s choice, Ray if installed)
    and on the CPU."""
    paths = make_model(root, gb / 4, device)
    out_bytes = sum(f.stat().st_size for f in paths["cp"].glob("*.safetensors"))
    moved = 4 * out_bytes
    merge(paths, root / "warm", "cpu")  # warms the page cache
    print(
        f"\n| end to end, {moved / 1e9:.1f} GB moved (hot cache) | wall s | GB/s | × floor | chatvec's summary |"
        "\n|---|---|---|---|---|",
        flush=True,
    )
    floor = floor_seconds(paths, out_bytes, root / "floor.bin")
    runs = [("I/O floor (read inputs + write output, fsync)", floor, None, "")]
    cases = [
        (f"chatvec --device {device}, local, 2 threads (default)", "out-cuda", (device, "local", None)),
        (f"chatvec --device {device}, local, 4 threads", "out-cuda4", (device, "local", 4)),
        ("chatvec --device auto (the default), local", "out-auto", ("auto", "local", None)),
    ]  # picks the GPU?
    if importlib.util.find_spec("ray") is not None:
        cases.append((f"chatvec --device {device}, Ray (start-up included)", "out-cuda-ray", (device, "ray", None)))
    else:
        print("(Ray is not installed here: the Ray run is skipped)", flush=True)
    cases.append((f"chatvec --device cpu, local, {os.cpu_count()} threads", "out-cpu", ("cpu", "local", None)))
    print(E2E_ROW.format(runs[0][0], floor, moved / floor / 1e9, 1.0, ""), flush=True)
    for label, out, how in cases:
        seconds, summary = merge(paths, root / out, *how)
        runs.append((label, seconds, shard_hashes(root / out), summary))
        print(E2E_ROW.format(label, seconds, moved / seconds / 1e9, seconds / floor, summary), flush=True)
    hashes = [h for _, _, h, _ in runs[1:]]
    same = None not in hashes and all(h == hashes[-1] for h in hashes)
    print(f"\noutput bytes cuda == cpu: {same}", flush=True)
    return moved, runs, same


E2E_ROW = "| {} | {:.1f} | {:.2f} | {:.2f} | {} |"


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
    import triton

    print(
        f"## GPU benchmark — {name}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}\n",
        flush=True,
    )
    fixed = per_call_us(device)
    print(
        f"fixed cost per call (4,096 elements, back to back): kernel {fixed[0]:.1f} µs, torch copy {fixed[1]:.1f} µs\n",
        flush=True,
    )
    rows = kernel_rows([1 << 12] if args.dry_run else [1 << 20, 1 << 24, 1 << 26, 1 << 28], device)
    sweep = launch_sweep(1 << 12 if args.dry_run else 1 << 28, device)
    identical = identity_check(1 << 12 if args.dry_run else 1 << 22, device)
    e2e = None if args.skip_e2e else end_to_end(Path(args.data), args.e2e_gb, device)

    print(f"\n## Summary — {name}")  # the short table, last
    for n, k, c in rows:
        print(f"kernel at {n:,} elements: {k:.1f} GB/s, {k / c:.0%} of a device-to-device copy ({c:.1f} GB/s)")
    print(f"fixed cost per call: kernel {fixed[0]:.1f} µs, torch copy {fixed[1]:.1f} µs")
    best = max(sweep, key=lambda r: r[2])
    print(
        f"fastest launch shape: BLOCK {best[0]}, num_warps {best[1]} ({best[2]:.1f} GB/s; default "
        f"{next(r[2] for r in sweep if r[4]):.1f})"
    )
    print(f"kernel bits == CPU kernel bits: {identical}")
    if e2e:
        moved, runs, same = e2e
        for label, t, _, _ in runs:
            print(f"{label}: {t:.1f} s, {moved / t / 1e9:.2f} GB/s, {t / runs[0][1]:.2f} × floor")
        print(f"output bytes cuda == cpu: {same}")
    return 0 if identical and (e2e is None or e2e[2]) else 1


if __name__ == "__main__":
    sys.exit(main())
