#!/usr/bin/env python
"""CPU kernels: nanoseconds of one core per output element, the chunked torch kernels against the fused numba
ones, as a worker calls them (1 MiB strips of output: the inputs in cache) and over whole tensors.

    python benchmarks/kernels.py [--elems 33554432] [--repeat 5]

Thread CPU time (not wall), best of --repeat, one torch thread: what a worker's compute stage costs. Prints a
Markdown section for RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_fp8 import quantize, to_fp8  # noqa: E402  (the tests' reference quantizer)

from chatvec_dist.kernels import cpu, fp8  # noqa: E402
from chatvec_dist.kernels.cpu import Scratch, combine  # noqa: E402
from chatvec_dist.kernels.fp8 import Blocked, Fp8Scratch, combine_fp8  # noqa: E402
from chatvec_dist.term import Term  # noqa: E402

STRIP = 1 << 20  # bytes of output per call, as CpuCompute.strip_bytes


def best(run: Callable[[], object], repeat: int) -> float:
    """Fewest thread-CPU seconds of `run` over `repeat` calls (after one warm-up: numba's first call loads)."""
    run()
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        run()
        times.append(time.thread_time() - t0)
    return min(times)


def dense(n: int, dtype: torch.dtype, terms: int, strips: bool, fused: bool, repeat: int) -> float:
    g = torch.Generator().manual_seed(0)
    cp = torch.randn(n, generator=g).to(dtype)
    vectors = [  # distinct arrays: a vector repeated would be read from cache after its first use
        Term(0.5, torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)) for _ in range(terms)
    ]
    out = torch.empty(n, dtype=dtype)
    compute = torch.float32 if dtype == torch.bfloat16 else torch.float64
    step = STRIP // dtype.itemsize if strips else n
    scratch = Scratch()
    cpu.FUSED_MIN = 0 if fused else 1 << 62

    def run() -> None:
        for s in range(0, n, step):
            part = [Term(a, p[s : s + step], m[s : s + step]) for a, p, m in vectors]
            combine(out[s : s + step], cp[s : s + step], part, compute, scratch)

    return best(run, repeat) / n * 1e9


def blocked(rows: int, cols: int, seed: int) -> Blocked:
    q, s = quantize(np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02)
    return Blocked(to_fp8(q).flatten(), torch.from_numpy(s).flatten())


def fp8_all(rows: int, cols: int, out_dtype: torch.dtype, fused: bool, repeat: int) -> float:
    cp, chat, base = (blocked(rows, cols, s) for s in (1, 2, 3))
    out = torch.empty(rows * cols, dtype=out_dtype)
    grid = -(-rows // 128) * -(-cols // 128)
    scale = torch.empty(grid, dtype=torch.float32) if out_dtype == torch.float8_e4m3fn else None
    scratch = Fp8Scratch()
    fp8.FUSED_MIN = 0 if fused else 1 << 62
    return best(lambda: combine_fp8(out, scale, cp, [(1.0, chat, base)], cols, scratch), repeat) / (rows * cols) * 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elems", type=int, default=1 << 25, help="elements per dense case (default 32 Mi)")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [
        f"## CPU kernels, {time.strftime('%Y-%m-%d %H:%M')} (`python benchmarks/kernels.py`)",
        "",
        "ns of one core per output element (thread CPU time, best of "
        f"{a.repeat}); dense cases {a.elems:,} elements, FP8 cases a 2048 × 7168 weight.",
        "",
        "| case | torch kernel | fused (numba) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    cases: list[tuple[str, Callable[[bool], float]]] = [
        ("bf16, 1 vector, 1 MiB strips", lambda f: dense(a.elems, torch.bfloat16, 1, True, f, a.repeat)),
        ("bf16, 1 vector, whole tensor", lambda f: dense(a.elems, torch.bfloat16, 1, False, f, a.repeat)),
        ("bf16, 3 vectors, 1 MiB strips", lambda f: dense(a.elems, torch.bfloat16, 3, True, f, a.repeat)),
        ("f32, 1 vector, 1 MiB strips", lambda f: dense(a.elems // 2, torch.float32, 1, True, f, a.repeat)),
        ("FP8 → FP8 (all block-scaled)", lambda f: fp8_all(2048, 7168, torch.float8_e4m3fn, f, a.repeat)),
        ("FP8 → bf16", lambda f: fp8_all(2048, 7168, torch.bfloat16, f, a.repeat)),
    ]
    for name, case in cases:
        slow, fast = case(False), case(True)
        rows.append(f"| {name} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}× |")
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
