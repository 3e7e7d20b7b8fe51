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
