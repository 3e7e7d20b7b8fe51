#!/usr/bin/env python
"""Batch vs separate runs: one pass producing N outputs (targets × alphas) against N single merges.

Reports bytes read and written (from the plan) and wall time, on the checkpoints made by bench.py:

    python benchmarks/batch.py [--data benchmarks/data/medium] [--backend local]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def planned_io(args: list[str]) -> tuple[float, float]:
    from chatvec_dist import job
    from chatvec_dist.cli.args import recipe_from_args
    from chatvec_dist.cli.parser import build_parser

    planned = job.plan(recipe_from_args(build_parser().parse_args(["plan", *args])))
    written = sum(p.nbytes for tp in planned.targets for p in tp.layout.tensors)
    return (sum(job.unit_io_bytes(u, planned) for u in planned.units) - written) / 1e9, written / 1e9


def timed(args: list[str], out: Path, backend: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "chatvec_dist.cli",
            "merge",
            *args,
            "--out",
            str(out),
            "--no-progress",
            "--backend",
            backend,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="benchmarks/data/medium")
    ap.add_argument("--backend", default="local")
    a = ap.parse_args()
    d = Path(a.data)
    common = ["--base", str(d / "base"), "--chat", str(d / "chat")]
    batch = [*common, "--cp", f"zh={d / 'cp'}", "--cp", f"ko={d / 'cp'}", "--alpha", "0.5,1.0"]
    singles = [[*common, "--cp", str(d / "cp"), "--alpha", alpha] for alpha in ("0.5", "1.0", "0.5", "1.0")]
    out = d / "batch-out"
    read_b, wrote_b = planned_io(batch)
    read_s = sum(planned_io(s)[0] for s in singles)
    t_batch = timed(batch, out, a.backend)
    t_single = sum(timed(s, out / f"single{i}", a.backend) for i, s in enumerate(singles))
    shutil.rmtree(out, ignore_errors=True)
    model = wrote_b / 4
    print(
        f"\n## Batch of 4 outputs (2 CP targets × alphas 0.5, 1.0) vs 4 separate merges — {a.backend} backend, "
        f"{os.cpu_count()} cores, {model:.2f} GB per model"
    )
    print("| how | GB read | GB written | model-sized transfers | wall s |\n|---|---:|---:|---:|---:|")
    print(f"| one batch | {read_b:.2f} | {wrote_b:.2f} | {(read_b + wrote_b) / model:.1f} | {t_batch:.1f} |")
    print(f"| 4 separate runs | {read_s:.2f} | {wrote_b:.2f} | {(read_s + wrote_b) / model:.1f} | {t_single:.1f} |")
    print(
        "(The two CP targets name the same directory here, so the batch reads it once: 3 + 4 transfers; with "
        "distinct CPs it is 2 + 2N.)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
