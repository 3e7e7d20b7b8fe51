"""`chatvec bench`: the floor and a merge on the user's storage (a folder, s3://, a multi-node cluster)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from chatvec_dist.bench.floor import CHUNK, shares
from chatvec_dist.cli import main
from chatvec_dist.output.verify import verify

SIZE = ["--size", "8MB", "--no-progress"]


def test_shares_read_every_input_byte_once_and_balance_the_nodes():
    files = [("a", 3 * CHUNK + 5), ("b", 7), ("c", 2 * CHUNK)]
    for nodes in (1, 2, 3, 7):
        got = shares(files, nodes)
        assert len(got) == nodes
        seen = {p: np.zeros(size, dtype=np.int64) for p, size in files}
        for share in got:
            for path, offset, length in share:
                assert 0 < length <= CHUNK
                seen[path][offset : offset + length] += 1
        assert all((counts == 1).all() for counts in seen.values())
        loads = [sum(n for *_, n in share) for share in got]
        assert max(loads) - min(loads) <= 1


def numbers(out: str, pattern: str) -> list[float]:
    """Every number that the groups of `pattern` capture in `out`, in order."""
    found = re.findall(pattern, out)
    return [float(x) for m in found for x in (m if isinstance(m, tuple) else (m,))]


def test_bench_on_a_folder_reports_the_floor_and_the_merge_and_leaves_nothing(tmp_path, capsys):
    assert main(["bench", str(tmp_path), "--backend", "local", *SIZE]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^  floor on ", out, re.M)) == 1
    moved_in, moved_out = numbers(out, r"moved ([\d.]+) MB in, ([\d.]+) MB out")
    read, wrote = numbers(out, r"read ([\d.]+) MB in [\d.]+ s, wrote ([\d.]+) MB")
    assert (read, wrote) == (moved_in, moved_out) and 3 * 6 < moved_in <= 3 * 8  # whole layers: within one of the size
    assert numbers(out, r"merge / floor: ([\d.]+)×")[0] > 0
    assert [m for m in ("70B", "405B", "671B") if f"  {m}: " in out] == ["70B", "405B", "671B"]
    assert list(tmp_path.iterdir()) == []  # the scratch folder is removed


def test_bench_keep_leaves_a_merge_that_verifies_and_equals_the_reference(tmp_path, capsys):
    assert main(["bench", str(tmp_path), "--backend", "local", "--keep", *SIZE]) == 0
    (root,) = tmp_path.iterdir()
    assert sorted(p.name for p in root.iterdir()) == ["base", "chat", "cp", "merged"]
    merged = root / "merged"
    assert verify(merged) == []

    def tensor(model: str, name: str) -> np.ndarray:
        (index,) = (root / model).glob("*.safetensors")
        with safe_open(str(index), "pt") as f:
            return f.get_tensor(name).double().numpy()

    name = "model.layers.0.mlp.down_proj.weight"
    expected = tensor("cp", name) + (tensor("chat", name) - tensor("base", name))
    with safe_open(str(next(merged.glob("*.safetensors"))), "pt") as f:
        got = f.get_tensor(name)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(expected).float().bfloat16())


def test_bench_on_s3_with_ray_leaves_no_object_and_no_upload(ray_s3, s3_server, capsys):
    from chatvec_dist.io import s3, s3_sink

    s3.client(True).create_bucket(Bucket="bench")
    assert main(["bench", "s3://bench/scratch", *SIZE]) == 0
    out = capsys.readouterr().out
    assert "merge (ray)" in out and len(re.findall(r"^  floor on ", out, re.M)) == 1
    assert s3.client(True).list_objects_v2(Bucket="bench").get("KeyCount", 0) == 0
    assert s3_sink.open_uploads("s3://bench/scratch") == {}


@pytest.mark.slow
def test_bench_measures_every_node_of_a_cluster(tmp_path):
    from test_cluster import start_cluster

    c, _ = start_cluster()
    try:
        env = dict(os.environ, RAY_ADDRESS=c.address)
        run = subprocess.run(
            [sys.executable, "-m", "chatvec_dist", "bench", str(tmp_path), *SIZE],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        c.shutdown()
    assert run.returncode == 0, run.stderr
    nodes = re.findall(r"^  floor on 127\.0\.0\.1 \((\w+)\): read ([\d.]+) MB", run.stdout, re.M)
    assert len({n for n, _ in nodes}) == 3  # the head has no CPU: no share
    total = numbers(run.stdout, r"moved ([\d.]+) MB in")[0]
    assert sum(float(mb) for _, mb in nodes) == pytest.approx(total, abs=0.3)
    assert list(Path(tmp_path).iterdir()) == []


def test_removing_an_s3_bench_folder_aborts_a_failed_merges_uploads(s3_server):
    """A merge that failed keeps its uploads for a resume; the bench's clean-up aborts them, none left billed."""
    from chatvec_dist.bench.data import MERGED, remove
    from chatvec_dist.io import s3, s3_sink

    s3.client(True).create_bucket(Bucket="bench-left")
    root = "s3://bench-left/scratch"
    s3_sink.create_upload(s3.join(root, "floor-0.bin"))
    s3_sink.create_upload(s3.join(root, f"{MERGED}/model-00001-of-00001.safetensors"))
    s3_sink.put(s3.join(root, "base/config.json"), b"{}")
    remove(root)
    assert s3_sink.open_uploads(root) == {} and s3_sink.open_uploads(s3.join(root, MERGED)) == {}
    assert s3.client(True).list_objects_v2(Bucket="bench-left").get("KeyCount", 0) == 0
