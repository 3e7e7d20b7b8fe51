"""Hundreds of shards under a small open-files limit: descriptors are bounded per worker, and the limit, when it
still bites, is named with its remedy."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch

from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint
from chatvec_dist.errors import ChatvecError
from chatvec_dist.io import ranges
from chatvec_dist.output.verify import verify

SHARDS = 60


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    g = torch.Generator().manual_seed(0)
    cfg = llama_config(256, num_hidden_layers=8)
    base = llama_tensors(cfg, g)
    for name, scale in (("base", 0.0), ("chat", 0.01), ("cp", 0.01)):
        tensors = {n: (t + scale * torch.randn(t.shape, generator=g)).bfloat16() for n, t in base.items()}
        save_checkpoint(root / name, tensors, cfg, shards=SHARDS)
    return root


def test_a_merge_of_many_shards_runs_under_a_small_open_files_limit(many_shards, tmp_path):
    """3 × 60 input shards and 22 output shards on 2 threads: more files than the 128 descriptors allowed."""
    out = tmp_path / "out"
    argv = ["merge", "--base", str(many_shards / "base"), "--chat", str(many_shards / "chat")]
    argv += ["--cp", str(many_shards / "cp"), "--out", str(out), "--backend", "local", "--workers", "2"]
    argv += ["--max-shard-size", "40KB", "--unit-size", "16KiB", "--no-progress"]
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from chatvec_dist.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(out.glob("*.safetensors"))) > 20 and verify(out) == []


def test_the_lru_closes_the_oldest_and_fsyncs_files_it_closed_after_writing(tmp_path):
    paths = [tmp_path / f"f{i}" for i in range(5)]
    for p in paths:
        p.write_bytes(b"\0" * 8)
    files = ranges.FileHandles(limit=2)
    for p in paths:
        ranges.write_at(files.get(str(p), os.O_WRONLY), memoryview(b"x"), 0, str(p))
    assert len(files._fds) == 2 and len(files._written) == 3
    files.sync()
    assert not files._written and all(p.read_bytes()[:1] == b"x" for p in paths)
    files.close()


def test_too_many_open_files_names_the_limit_and_the_remedy(tmp_path, monkeypatch):
    def emfile(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(ranges.os, "open", emfile)
    with pytest.raises(
        ChatvecError, match=r"too many open files \(this process may open \d+: raise it with `ulimit -n`\)"
    ):
        ranges.open_regular(str(tmp_path / "x"))
