"""The sources and input files of a batch (planning/reads.py), gathered once per source object: the same as a
loop over every target's every tensor's sources, for two CPs (FP8, with their scales), an alpha sweep and token
rows taken from the chat model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_fp8 import make_models

from chatvec_dist import job
from chatvec_dist.cli.args import recipe_from_args
from chatvec_dist.cli.parser import build_parser
from chatvec_dist.planning.reads import read_files, read_paths, read_srcs


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("reads")
    models = make_models(root)
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"25": 5, "3": 200}))
    argv = ["merge", "--base", models["base8"], "--chat", models["chat8"], "--cp", f"fp8={models['cp8']}"]
    argv += ["--cp", f"other={models['base8']}", "--alpha", "0.5,1", "--special-tokens", tokens, "--out", root / "o"]
    return job.plan(recipe_from_args(build_parser().parse_args(list(map(str, argv)))))


def test_a_batch_reads_what_each_tensor_reads(planned):
    layouts = [t.layout for t in planned.targets]
    assert len({id(lay) for lay in layouts}) == len(layouts) == 4
    tensors = [p.tensor for lay in layouts for p in lay.tensors]
    srcs = [s for t in tensors for s in t.srcs]
    assert any(t.row_src is not None for t in tensors) and any(s.scale is not None for s in srcs)
    got = read_srcs(layouts)
    assert sorted(map(id, got)) == sorted({id(s) for s in srcs})  # each object once
    assert read_files(got) == {f for s in srcs for f in s.files}
    for order in (layouts, layouts[::-1], [layouts[0], layouts[2], layouts[0]]):
        assert read_paths(order) == [{s.path for p in lay.tensors for s in p.tensor.srcs} for lay in order]


def test_input_stats_are_those_of_every_file_read(planned):
    files = {f for t in planned.targets for p in t.layout.tensors for s in p.tensor.srcs for f in s.files}
    assert {Path(f).parent.name for f in files} == {"cp8", "base8", "chat8"}
    stats = job._input_stats(planned)
    assert list(stats) == sorted(files)
    for path, got in stats.items():
        st = os.stat(path)
        assert got == [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    some = sorted(files)[1:3]
    assert job._input_stats(planned, some) == {path: stats[path] for path in some}
