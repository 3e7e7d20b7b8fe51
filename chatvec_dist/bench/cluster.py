"""The floor on every node of a Ray cluster at once: one task pinned to each alive node with CPUs."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..exec.ray_backend import init_ray
from ..recipe.spec import RunOptions
from .floor import NodeFloor, floor_on_node, shares


def on_every_node(
    files: list[tuple[str, int]], out_bytes: int, out: Callable[[int], str], options: RunOptions
) -> tuple[list[NodeFloor], float]:
    """Each node reads 1/N of `files` and writes 1/N of `out_bytes` to `out(k)`, with a stream per CPU: (what each
    did, the wall of all; tasks started before the clock)."""
    ray = init_ray(options.address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    task = ray.remote(num_cpus=0)(floor_on_node)
    warm = ray.remote(num_cpus=0)(lambda: None)
    pinned = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes]
    ray.get([warm.options(scheduling_strategy=p).remote() for p in pinned])  # worker processes up: not timed
    reads = shares(files, len(nodes))
    t0 = time.perf_counter()
    done = [
        task.options(scheduling_strategy=p).remote(
            f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})",
            reads[k],
            out(k),
            out_bytes // len(nodes),
            int(n["Resources"]["CPU"]),
        )
        for k, (n, p) in enumerate(zip(nodes, pinned))
    ]
    return list(ray.get(done)), time.perf_counter() - t0
