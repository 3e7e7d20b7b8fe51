"""A real multi-node Ray cluster on 127.0.0.1: spread workers, a node lost mid-run, a driver killed mid-run."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import slow_units_env

from chatvec_dist.cli import main
from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint
from chatvec_dist.output.journal import Journal
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.output.workarea import JOURNAL_NAME

pytestmark = pytest.mark.slow
# a removed node is found dead in seconds; a node merely slow on a loaded machine (up to ~10 s) is not
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 5}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """~14 MB bf16 checkpoints: enough small units that a fault lands mid-run."""
    root = tmp_path_factory.mktemp("models")
    g = torch.Generator().manual_seed(0)
    cfg = llama_config(2048, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4)
    base = llama_tensors(cfg, g)
    paths = {}
    for name, scale in (("base", 0.0), ("chat", 0.01), ("cp", 0.01)):
        tensors = {n: (t + scale * torch.randn(t.shape, generator=g)).bfloat16() for n, t in base.items()}
        paths[name] = save_checkpoint(root / name, tensors, cfg, shards=2)
    return paths


@pytest.fixture(scope="module")
def reference_out(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(args(models, out, "--backend", "local")) == 0
    return out


@pytest.fixture
def cluster():
    """Three one-CPU worker nodes and a head that runs no work."""
    c, nodes = start_cluster()
    yield c, nodes
    c.shutdown()


@pytest.fixture
def slow_cluster(monkeypatch):
    """`cluster`, its Ray workers 10 ms slower per unit (they inherit their node's environment, set here)."""
    env = slow_units_env(0.01)
    for name in ("CHATVEC_TEST_UNIT_SECONDS", "PYTHONPATH"):
        monkeypatch.setenv(name, env[name])
    c, nodes = start_cluster()
    yield c, nodes
    c.shutdown()


def start_cluster():
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    c = Cluster(
        initialize_head=True,
        head_node_args={**common, "num_cpus": 0, "include_dashboard": False, "_system_config": dict(HEALTH_CHECKS)},
    )
    nodes = [c.add_node(**common, num_cpus=1) for _ in range(3)]
    c.wait_for_nodes()
    return c, nodes


def args(models: dict, out: Path, *extra: str) -> list[str]:
    return [
        "merge",
        "--base",
        str(models["base"]),
        "--chat",
        str(models["chat"]),
        "--cp",
        str(models["cp"]),
        "--out",
        str(out),
        "--unit-size",
        "8KiB",
        "--max-shard-size",
        "6MB",
        "--no-progress",
        *extra,
    ]


def driver(models: dict, out: Path, address: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=address)
    return subprocess.Popen(
        [sys.executable, "-m", "chatvec_dist.cli", *args(models, out, *extra)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_units(out: Path, count: int, proc: subprocess.Popen, nodes: int = 1, timeout: float = 300) -> set[str]:
    """Wait until the journal holds `count` finished units, done on at least `nodes` distinct nodes; return those."""
    journal = Path(str(out) + ".partial") / JOURNAL_NAME
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = Journal.load(journal, 0)  # a record being written is not read yet
        seen = {r.node for r in done.values()}
        if len(done) >= count and len(seen) >= nodes:
            return seen
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the job made no progress")


def shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def test_workers_spread_over_nodes_and_survive_node_loss(models, reference_out, slow_cluster, tmp_path):
    c, nodes = slow_cluster  # 1,700 units × 10 ms: work is left when the node goes, however late that is
    out = tmp_path / "out"
    proc = driver(models, out, c.address)
    busy = wait_for_units(out, 40, proc, nodes=2)
    victim = next(n for n in nodes if n.node_id in busy)  # a node that has done work and has more in flight
    c.remove_node(victim, allow_graceful=False)
    assert proc.poll() is None, "the fault must land while units are in flight"
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert shards(out) == shards(reference_out)
    assert verify(out) == []
    table, _ = read_manifest(out)
    assert table.num_rows == read_manifest(reference_out)[0].num_rows
    assert table.column("hash").to_pylist() == read_manifest(reference_out)[0].column("hash").to_pylist()
    used = {n for cell in table.column("node").to_pylist() for n in cell.split(",")}
    assert victim.node_id in used and len(used) >= 2 and used <= {n.node_id for n in nodes}


def test_killed_driver_resumes_with_identical_bytes(models, reference_out, cluster, tmp_path):
    c, _ = cluster
    out = tmp_path / "out"
    proc = driver(models, out, c.address)
    wait_for_units(out, 60, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (Path(str(out) + ".partial") / "manifest.parquet").exists()
    again = driver(models, out, c.address)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    resumed = int(re.search(r"resuming: (\d+) of", stderr).group(1))
    assert resumed >= 60
    assert shards(out) == shards(reference_out) and verify(out) == []


def test_restart_discards_partial_output(models, reference_out, cluster, tmp_path):
    c, _ = cluster
    out = tmp_path / "out"
    proc = driver(models, out, c.address)
    wait_for_units(out, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = driver(models, out, c.address, "--restart")
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0 and "resuming" not in stderr
    assert shards(out) == shards(reference_out)


def test_a_merge_started_before_the_worker_nodes_join_waits_for_them(models, reference_out, tmp_path):
    """Right after `ray up` only the head (no CPU for work) is there: the driver waits for nodes, then sizes its
    pool on them (it ran one CPU worker before, and never used the GPU nodes that joined)."""
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**common, "num_cpus": 0, "include_dashboard": False})
    try:
        out = tmp_path / "out"
        proc = driver(models, out, c.address)
        waiting = proc.stderr.readline()
        assert "waiting for the Ray cluster's worker nodes to join" in waiting, waiting
        gpu_node = c.add_node(**common, num_cpus=2, num_gpus=2)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert "on ray × 2," in stderr  # one worker per (declared) GPU: `auto` saw the GPUs once they came
        table, _ = read_manifest(out)
        assert {n for cell in table.column("node").to_pylist() for n in cell.split(",")} == {gpu_node.node_id}
        assert shards(out) == shards(reference_out)
    finally:
        c.shutdown()


def test_one_worker_per_gpu_lands_on_gpu_nodes(models, reference_out, tmp_path):
    """Placement with declared (fake) GPUs: `--device auto` asks one GPU per actor, so actors go to GPU nodes
    only; inside, with no CUDA device present, they compute on the CPU and the bytes are the same."""
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**common, "num_cpus": 0, "include_dashboard": False})
    try:
        cpu_node = c.add_node(**common, num_cpus=1)
        gpu_node = c.add_node(**common, num_cpus=2, num_gpus=2)
        c.wait_for_nodes()
        out = tmp_path / "out"
        proc = driver(models, out, c.address)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        table, _ = read_manifest(out)
        used = {n for cell in table.column("node").to_pylist() for n in cell.split(",")}
        workers = {w for cell in table.column("worker").to_pylist() for w in cell.split(",")}
        assert used == {gpu_node.node_id} and cpu_node.node_id not in used
        assert 1 <= len({w.split(":")[1] for w in workers}) <= 2  # actor processes that did work (one per GPU) ...
        assert "on ray × 2," in stderr  # ... of the two started (the second may start after the first did all)
        assert "chatvec: warning: a Ray worker given a GPU computes on the CPU: torch sees no CUDA device" in stderr
        assert "pass --device cpu to use a worker per CPU" in stderr
        assert shards(out) == shards(reference_out)
        proc = driver(models, tmp_path / "cuda", c.address, "--device", "cuda")
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2 and not (tmp_path / "cuda").exists()
        assert stderr.strip().splitlines()[-1].startswith("chatvec: error: --device cuda, but this worker has no CUDA")
    finally:
        c.shutdown()
