"""`chatvec bench WHERE`: make inputs on the user's storage, measure the floor on every node, then a merge, in one
run; report the ratio, GB/s per node and in aggregate, and what that predicts for the big models."""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

from ..io import s3
from ..log import logger
from ..recipe.spec import Recipe, RunOptions, Target, Vector, human_bytes
from .data import MERGED, Inputs, make_inputs, remove
from .floor import NodeFloor, floor_on_node, shares

MODELS = {"70B": 70.6e9, "405B": 405.9e9, "671B": 671.0e9}  # parameters; bfloat16, 3 inputs + 1 output each


@dataclass(frozen=True)
class BenchReport:
    nodes: list[NodeFloor]
    floor_s: float  # wall of the floor, all nodes at once
    merge_s: float  # wall of `chatvec merge`, start-up included
    in_bytes: int
    out_bytes: int
    backend: str

    @property
    def moved(self) -> int:
        return self.in_bytes + self.out_bytes


def bench(where: str, nbytes: int, options: RunOptions, keep: bool = False) -> BenchReport:
    """Inputs of about `nbytes` per checkpoint made under a fresh folder of `where`, the floor, the merge; what was
    made is removed unless `keep`."""
    root = (s3.join if s3.is_url(where) else os.path.join)(where, f"chatvec-bench-{uuid.uuid4().hex[:8]}")
    logger.info(f"making base, chat and CP of {human_bytes(nbytes)} each under {root}")
    try:
        inputs = make_inputs(root, nbytes)
        out_bytes = sum(size for path, size in inputs.files if path.startswith(inputs.cp))
        nodes, floor_s = _floor(inputs, out_bytes, root, options)
        merge_s = _merge(inputs, root, options)
    finally:
        if not keep:
            remove(root)
    return BenchReport(nodes, floor_s, merge_s, inputs.nbytes, out_bytes, options.backend)


def _floor(inputs: Inputs, out_bytes: int, root: str, options: RunOptions) -> tuple[list[NodeFloor], float]:
    """Every node's share at once: (what each did, the wall of all)."""
    join = s3.join if s3.is_url(root) else os.path.join
    if options.backend == "local":
        streams = options.workers or os.cpu_count() or 1
        t0 = time.perf_counter()
        done = [
            floor_on_node(
                socket.gethostname(), shares(inputs.files, 1)[0], join(root, "floor-0.bin"), out_bytes, streams
            )
        ]
        return done, time.perf_counter() - t0
    from .cluster import on_every_node

    return on_every_node(inputs.files, out_bytes, lambda k: join(root, f"floor-{k}.bin"), options)


def _merge(inputs: Inputs, root: str, options: RunOptions) -> float:
    from .. import job

    out = (s3.join if s3.is_url(root) else os.path.join)(root, MERGED)
    recipe = Recipe((Vector(inputs.chat, inputs.base),), (Target("bench", inputs.cp, out, (1.0,)),))
    t0 = time.perf_counter()
    job.run(recipe, options)
    return time.perf_counter() - t0


def report_lines(r: BenchReport) -> list[str]:
    """What `chatvec bench` prints."""
    floor_rate = r.moved / r.floor_s / 1e9
    merge_rate = r.moved / r.merge_s / 1e9
    lines = [f"moved {human_bytes(r.in_bytes)} in, {human_bytes(r.out_bytes)} out on {len(r.nodes)} node(s)"]
    for n in r.nodes:
        rate = (n.bytes_read + n.bytes_written) / n.seconds / 1e9 if n.seconds else 0.0
        lines.append(
            f"  floor on {n.node}: read {human_bytes(n.bytes_read)} in {n.read_s:.2f} s, "
            f"wrote {human_bytes(n.bytes_written)} in {n.write_s:.2f} s ({rate:.2f} GB/s)"
        )
    lines += [
        f"floor: {r.floor_s:.2f} s ({floor_rate:.2f} GB/s aggregate, {floor_rate / len(r.nodes):.2f} per node)",
        f"merge ({r.backend}): {r.merge_s:.2f} s ({merge_rate:.2f} GB/s aggregate, start-up included)",
        f"merge / floor: {r.merge_s / r.floor_s:.2f}×",
        "predicted at this merge rate (bfloat16: three inputs read, one output written):",
    ]
    for name, params in MODELS.items():
        nbytes = 4 * 2 * params
        lines.append(f"  {name}: {human_bytes(int(nbytes))} moved, ~{nbytes / (merge_rate * 1e9) / 60:.0f} min")
    return lines
