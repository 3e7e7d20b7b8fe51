#!/usr/bin/env python
"""Scale-out on a simulated multi-node Ray cluster (ray.cluster_utils on 127.0.0.1).

Runs one merge with 1, 2 and 4 worker nodes (1 CPU each) and reports throughput, the driver's per-unit
scheduling overhead (from a run with many tiny units), and the driver's CPU time and peak RSS. On a 2-core
machine, 4 nodes oversubscribe the CPUs: read the trend, and the per-unit costs, not absolute speed-up.

    python benchmarks/scale.py [--mb 200] [--nodes 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint  # noqa: E402


def make_models(root: Path, mb: int) -> dict[str, Path]:
    hidden, inter = 1024, 2816
    layers = max(1, int(mb * 1e6 / 2 / (4 * hidden * hidden + 3 * hidden * inter)))
    cfg = llama_config(
        8192,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    paths = {}
    g = torch.Generator().manual_seed(0)
    base = None
    for name in ("base", "chat", "cp"):
        d = root / name
        paths[name] = d
        if (d / "model.safetensors.index.json").exists():
            continue
        base = base or llama_tensors(cfg, g)
        tensors = {
            n: (t + (0.002 if name != "base" else 0) * torch.randn(t.shape, generator=g)).bfloat16()
            for n, t in base.items()
        }
        save_checkpoint(d, tensors, cfg, shards=4)
    return paths


def run_driver(paths: dict[str, Path], out: Path, address: str, unit: str) -> tuple[float, float, int]:
    """(wall s, driver CPU s, peak RSS of a child process MiB) of one `chatvec merge` driver process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [
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
            "--unit-size",
            unit,
        ],
        check=True,
        env=dict(os.environ, RAY_ADDRESS=address),
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss // 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="size of each checkpoint in MB")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--data", default="benchmarks/data/scale")
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    from chatvec_dist import job
    from chatvec_dist.cli.args import recipe_from_args
    from chatvec_dist.cli.parser import build_parser

    root = Path(args.data)
    paths = make_models(root, args.mb)
    moved = 4 * sum(f.stat().st_size for f in paths["cp"].glob("*.safetensors"))
    rows = []
    for nodes in args.nodes:
        common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
        c = Cluster(initialize_head=True, head_node_args={**common, "num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(nodes):
                c.add_node(**common, num_cpus=1)
            c.wait_for_nodes()
            run_driver(paths, root / "out", c.address, "16MiB")  # warm caches and workers' imports
            wall, cpu, rss = run_driver(paths, root / "out", c.address, "16MiB")
            tiny_args = [
                "plan",
                "--base",
                str(paths["base"]),
                "--chat",
                str(paths["chat"]),
                "--cp",
                str(paths["cp"]),
                "--unit-size",
                "64KiB",
            ]
            units = len(job.plan(recipe_from_args(build_parser().parse_args(tiny_args))).units)
            t_tiny, cpu_tiny, _ = run_driver(paths, root / "out", c.address, "64KiB")
            rows.append(
                (
                    nodes,
                    wall,
                    moved / wall / 1e9,
                    cpu,
                    rss,
                    units,
                    (t_tiny - wall) / units * 1e3,
                    cpu_tiny / units * 1e3,
                )
            )
        finally:
            c.shutdown()
    print(f"\n## Scale-out on a loopback cluster — {os.cpu_count()} cores, {moved / 1e9:.2f} GB moved per merge")
    print(
        "| worker nodes | wall s | GB/s | driver CPU s | peak RSS of a child process MiB | units (64 KiB) | "
        "extra wall ms/unit | driver CPU ms/unit |\n|---|---|---|---|---|---|---|---|"
    )  # RSS: max over child processes (Ray nodes too)
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f} | {r[3]:.1f} | {r[4]} | {r[5]} | {r[6]:.2f} | {r[7]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
