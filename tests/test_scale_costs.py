"""Costs that grow with files, not with tensors: the filesystem look-ups a plan makes."""

from __future__ import annotations

import os

import torch

import chatvec_dist
from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint


def test_planning_looks_up_each_file_a_few_times_not_each_tensor(tmp_path, monkeypatch):
    """On NFS or Lustre every stat is a round trip: 60 layers (543 tensors) in 20 shards per checkpoint."""
    cfg = llama_config(256, num_hidden_layers=60)
    tensors = {n: t.bfloat16() for n, t in llama_tensors(cfg, torch.Generator().manual_seed(0)).items()}
    for name in ("base", "chat", "cp"):
        save_checkpoint(tmp_path / name, tensors, cfg, shards=20)
    calls = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real, **k: calls.append(a[0]) or real(*a, **k))
    recipe = chatvec_dist.make_recipe(*(str(tmp_path / n) for n in ("base", "chat", "cp")), str(tmp_path / "out"))
    planned = chatvec_dist.plan(recipe)
    assert len(planned.targets[0].layout.tensors) == len(tensors) == 543
    assert len(calls) < 3 * 22 * 20, len(calls)  # three checkpoints of 20 shards and 2 more files: ≈ 13 each


def test_the_driver_keeps_16_bytes_per_output_block_not_a_dict_entry(tmp_path):
    """A 671B output in bf16 is 1.3 M blocks of 1 MiB per output: the tally holds each digest in 16 bytes, and
    each source hash block's (block / 8 elements: 4 per output block of a bf16 source) too."""
    import tracemalloc

    from chatvec_dist.exec.messages import SegmentResult
    from chatvec_dist.kernels.stats import Stats
    from chatvec_dist.output.manifest import Tally
    from chatvec_dist.planning.layout import layout
    from chatvec_dist.planning.planner import PlannedTensor, Src

    block, blocks = 4096, 20_000
    t = PlannedTensor("t", "merge", "", (block * blocks // 2,), "BF16", Src("x", 0, "BF16"), (), 0)
    lay = layout([t], max_shard_size=10**12)
    tracemalloc.start()
    tally = Tally(lay, block)
    for b in range(0, blocks, 100):
        digests = tuple((k, k.to_bytes(16, "little")) for k in range(b, b + 100))
        source = tuple((k, k.to_bytes(16, "little")) for k in range(4 * b, 4 * b + 400))
        tally.add(SegmentResult(0, 0, digests, Stats(), (source,)), "w", "n", 0.0)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < 24 * 5 * blocks + 100_000, held  # a dict of blocks took ~200 bytes each
    assert tally.table("t", {}).column("hash").to_pylist()[0]  # and the tensor's hash is made from them


def test_plan_says_what_a_run_will_need(tmp_path, capsys):
    from chatvec_dist.cli import main
    from chatvec_dist.demo import make_demo_models

    models = make_demo_models(tmp_path / "demo")
    argv = ["plan", "--base", str(models["base"]), "--chat", str(models["chat"]), "--cp", str(models["cp"])]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("needs: 4 input files and 1 output shard (open files per worker are bounded), about "), last
    assert "of driver memory for the manifest" in last and "(up to 64 MiB each)" in last
