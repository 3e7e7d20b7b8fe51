"""Costs that grow with files, not with tensors: the filesystem look-ups a plan makes."""

from __future__ import annotations

import dataclasses
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


def test_the_tally_folds_each_tensor_once_its_blocks_arrived(tmp_path):
    """Driver memory per output grows with tensors, not bytes: ten times the blocks per tensor, the same memory
    once every tensor is complete; and the hashes are those of all the block digests in order."""
    import tracemalloc

    import xxhash

    from chatvec_dist.exec.messages import SegmentResult
    from chatvec_dist.kernels.stats import Stats
    from chatvec_dist.output.manifest import Tally
    from chatvec_dist.planning.layout import layout
    from chatvec_dist.planning.planner import PlannedTensor, Src

    def held(blocks: int) -> tuple[int, Tally]:
        block = 4096
        ts = [
            PlannedTensor(f"t{i}", "merge", "", (block * blocks // 2,), "BF16", Src("x", 0, "BF16"), (), 0)
            for i in range(50)
        ]
        lay = layout(ts, max_shard_size=10**12)
        tracemalloc.start()
        tally = Tally(lay, block)
        for i in range(len(ts)):
            for b in reversed(range(0, blocks, 10)):  # out of order, in pieces of ten blocks
                digests = tuple((k, (i * blocks + k).to_bytes(16, "little")) for k in range(b, b + 10))
                source = tuple((k, k.to_bytes(16, "little")) for k in range(4 * b, 4 * b + 40))
                tally.add(SegmentResult(i, i, digests, Stats(), (source,)), "w", "n", 0.0)
        now, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return now, tally

    small, _ = held(100)
    large, tally = held(1000)
    assert large < small * 1.2 + 10_000, (small, large)  # 16 B per block kept would be 50 × 900 × 80 B more
    hashes = tally.table("t", {}).column("hash").to_pylist()
    want = xxhash.xxh3_128_hexdigest(b"".join((1000 + k).to_bytes(16, "little") for k in range(1000)))
    assert hashes[1] == want


def test_units_lost_with_their_worker_are_rechecked_from_the_journal(tmp_path, monkeypatch):
    """The driver keeps no unit results for the recheck: it reads the journal back. A suspect unit whose bytes are
    gone is redone; one whose bytes are there is not."""
    from chatvec_dist.demo import make_demo_models
    from chatvec_dist.exec.local import LocalBackend
    from chatvec_dist.output.verify import verify
    from chatvec_dist.output.workarea import partial_path

    models = make_demo_models(tmp_path / "demo")
    out = tmp_path / "out"
    runs: list[list[int]] = []
    real = LocalBackend.run

    def run(self, units, on_result):
        units = list(units)
        runs.append([u.id for u in units])
        real(self, units, on_result)
        if len(runs) > 1:
            return []
        shard = sorted(partial_path(out).glob("*.safetensors"))[-1]
        data = bytearray(shard.read_bytes())
        data[-64:] = bytes(64)  # the last unit's bytes lost with its worker
        shard.write_bytes(data)
        return [units[0], units[-1]]  # both suspect

    monkeypatch.setattr(LocalBackend, "run", run)
    recipe = chatvec_dist.make_recipe(str(models["base"]), str(models["chat"]), str(models["cp"]), str(out))
    recipe = dataclasses.replace(recipe, unit_bytes=64 * 1024)
    chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend="local", workers=1, progress=False))
    assert len(runs) == 2 and runs[1] == [runs[0][-1]], runs  # only the lost unit was redone
    assert verify(out) == []


def test_a_unit_carries_only_its_cut_of_the_plan_and_computes_the_same(tmp_path):
    """Ray workers get each unit with its own cut of the work context: the cuts together are about the whole
    context once (not once per worker), and a unit run with its cut reports what it reports with the whole."""
    import pickle

    from chatvec_dist.demo import make_demo_models
    from chatvec_dist.exec.messages import OutputContext, WorkContext
    from chatvec_dist.exec.unit_context import unit_context
    from chatvec_dist.exec.worker import UnitRunner
    from chatvec_dist.planning.layout import Unit

    models = make_demo_models(tmp_path / "demo")
    outs = {"a": str(models["cp"]), "b": str(models["cp"])}
    recipe = chatvec_dist.make_recipe(str(models["base"]), str(models["chat"]), outs, str(tmp_path / "out"), 0.5)
    planned = chatvec_dist.plan(dataclasses.replace(recipe, unit_bytes=32 * 1024))
    shards = []
    for k, tp in enumerate(planned.targets):
        paths = []
        for s in tp.layout.shards:
            paths.append(str(tmp_path / f"{k}-{s.name}"))
            with open(paths[-1], "wb") as f:
                f.write(s.header)
                f.truncate(s.size)
        shards.append(OutputContext(tp.layout.tensors, paths))
    whole = WorkContext(shards, planned.block_bytes, {})
    assert len(planned.units) > 5
    cuts = [unit_context(whole, u) for u in planned.units]
    for unit, cut in zip(planned.units, cuts):
        assert all(set(o.tensors) == {p.index for p in unit.pieces} for o in cut.outputs)
    total, once = sum(len(pickle.dumps(c)) for c in cuts), len(pickle.dumps(whole))
    assert len(pickle.dumps(unit_context(whole, Unit(-1, (), 0)))) < 300  # what a worker starts with
    assert total < once + 2048 * len(cuts), (total, once)  # each message repeats class names and file paths
    runner, cut_runner = UnitRunner(whole, device="cpu"), UnitRunner(cuts[0], device="cpu")
    try:
        for unit, cut in zip(planned.units, cuts):
            cut_runner.ctx = cut
            assert runner.run(unit).segments == cut_runner.run(unit).segments, unit.id
    finally:
        runner.close()
        cut_runner.close()


def test_the_plans_total_io_is_the_sum_over_its_units(tmp_path):
    """`chatvec plan` sums bytes per tensor, not per unit (22 k units on DeepSeek-V3): the same total, here with an
    extended vocabulary merged on its shared rows, two outputs."""
    from chatvec_dist.demo import make_demo_models
    from chatvec_dist.planning.plan import total_io_bytes, unit_io_bytes

    models = make_demo_models(tmp_path / "demo")
    paths = {k: str(v) for k, v in models.items()}
    recipe = chatvec_dist.make_recipe(
        paths["base"],
        paths["chat"],
        {"a": paths["cp"], "b": paths["cp"]},
        tmp_path / "out",
        vocab="overlap",
        unit_bytes=4096,
    )
    planned = chatvec_dist.plan(recipe)
    assert len(planned.units) > 10 and any(p.tensor.rule == "merge_rows" for p in planned.targets[0].layout.tensors)
    assert total_io_bytes(planned) == sum(unit_io_bytes(u, planned) for u in planned.units)


def test_a_unit_carries_the_hub_files_and_etags_of_what_it_reads():
    from chatvec_dist.exec.messages import OutputContext, WorkContext
    from chatvec_dist.exec.unit_context import unit_context
    from chatvec_dist.planning.layout import Piece, Placed, Unit
    from chatvec_dist.planning.planner import PlannedTensor, Src
    from chatvec_dist.term import Term

    scale = Src("s3://b/scales.safetensors", 8, "F32")
    a, b = Src("/hub/a.safetensors", 8, "BF16"), Src("s3://b/w.safetensors", 8, "F8_E4M3", scale=scale)
    c = Src("/hub/c.safetensors", 8, "BF16")
    tensors = [
        PlannedTensor("x", "merge", "", (2,), "BF16", a, (Term(0.5, a, None),), 2),
        PlannedTensor("y", "merge", "", (2,), "BF16", c, (Term(0.5, b, None),), 2),
    ]
    out = OutputContext([Placed(t, 0, 0, 4) for t in tensors], ["o"])
    files = ["/hub/a.safetensors", "/hub/c.safetensors", "s3://b/w.safetensors", "s3://b/scales.safetensors"]
    ctx = WorkContext([out, out], 64, {f: ("r", "c", f) for f in files}, {f: "e" for f in files})
    first = unit_context(ctx, Unit(0, (Piece(0, 0, 2),), 4))
    assert set(first.hub_files) == set(first.etags) == {"/hub/a.safetensors"}
    second = unit_context(ctx, Unit(1, (Piece(1, 0, 2),), 4))
    assert set(second.hub_files) == set(files[1:]) and second.etags == {f: "e" for f in files[1:]}
    assert unit_context(dataclasses.replace(ctx, hub_files={}, etags={}), Unit(1, (Piece(1, 0, 2),), 4)).etags == {}
