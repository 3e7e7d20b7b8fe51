"""Block-scaled FP8 outputs to an object store (a real SeaweedFS on 127.0.0.1): the bytes of the same job's local
output, every shard, the index, config and manifest rows; verified from the bucket; resumed after a killed driver
with the same bytes and no upload left open. The FP8 values themselves are checked against test_fp8's float64
reference."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from s3server import make_bucket
from safetensors.torch import load, load_file
from test_fp8 import LOCAL, QUANT, W, _operand, assert_fp8_equal, bits, combine64, make_models, quantize, to_fp8
from test_s3_output import BUCKET, downloaded, fresh_url, kill_once_journaled, local_files, open_uploads

from chatvec_dist import api
from chatvec_dist.cli import main
from chatvec_dist.demo import save_checkpoint
from chatvec_dist.errors import PlanError
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.workarea import STAGING_ENV
from chatvec_dist.planning.fp8 import SCALE_RULE
from chatvec_dist.planning.layout import layout
from chatvec_dist.recipe.file import dump_recipe
from chatvec_dist.recipe.spec import Recipe, RunOptions

MIB = 2**20
# Large enough for shards of several parts (≥ 5 MiB each): 2 MiB FP8 projections, 4 MiB bf16 embeddings.
SIZES = {"vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 512}


@pytest.fixture(scope="module")
def big(tmp_path_factory, s3_server) -> dict[str, Path]:
    make_bucket(s3_server, BUCKET)  # shared with test_s3_output
    return make_models(tmp_path_factory.mktemp("fp8s3"), **SIZES)


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    return tmp_path / "staging"


def both(models: dict[str, Path], local: Path, url: str) -> Recipe:
    """One job, FP8 CP and bf16 vectors, two outputs: a local folder and an s3:// prefix; one FP8 weight kept as
    CP stores it (codes and scales copied, not combined)."""
    cps = {"here": models["cp8"], "there": models["cp8"]}
    recipe = api.make_recipe(
        models["base"], models["chat"], cps, local.parent, unit_bytes=8 * MIB, max_shard_size=12_000_000, exclude=W
    )
    here, there = recipe.targets
    targets = (dataclasses.replace(here, out=str(local)), dataclasses.replace(there, out=url))
    return dataclasses.replace(recipe, targets=targets)


RUN_FACTS = {"target", "worker", "node", "seconds"}  # who computed a row, when, for which target: not its content


def manifest_rows(out: str | Path) -> list[dict]:
    """The manifest's rows, less who computed them."""
    return [{k: v for k, v in row.items() if k not in RUN_FACTS} for row in read_manifest(out)[0].to_pylist()]


def same_output(local: Path, url: str) -> dict[str, bytes]:
    """The s3:// output holds the local output's shards, index and config byte for byte, and its manifest rows."""
    files, here = downloaded(url), local_files(local)
    names = [n for n in here if n.startswith("model") or n == "config.json"]
    assert sum(n.endswith(".safetensors") for n in names) >= 2
    assert {n: files[n] for n in names} == {n: here[n] for n in names}
    assert manifest_rows(url) == manifest_rows(local)
    return files


@pytest.fixture(scope="module")
def uninterrupted(big, tmp_path_factory) -> tuple[Path, str, Recipe]:
    """The job run once to the end: its local output, its s3:// output, and the recipe."""
    local, url = tmp_path_factory.mktemp("fp8s3-out") / "here", fresh_url()
    recipe = both(big, local, url)
    api.run(recipe, LOCAL)
    return local, url, recipe


def test_an_fp8_output_to_s3_is_the_local_outputs_bytes_and_verifies(big, uninterrupted):
    local, url, recipe = uninterrupted
    planned = api.plan(recipe)
    parts = planned.targets[1].parts
    assert parts is not None and max(len([p for ps in parts.values() for p in ps if p.shard == k]) for k in (0, 1)) > 1
    tensors = [p.tensor for p in planned.targets[1].layout.tensors]
    for unit in planned.units:  # each combined FP8 weight and its scales: one unit, one part, adjacent bytes
        for piece in unit.pieces:
            if tensors[piece.index].rule == SCALE_RULE:
                weight = planned.targets[1].layout.tensors[piece.index - 1]
                scale = planned.targets[1].layout.tensors[piece.index]
                assert (weight.shard, weight.offset + weight.nbytes) == (scale.shard, scale.offset)
                assert (weight.offset + weight.nbytes) % 4 == 0
    files = same_output(local, url)
    assert open_uploads() == []
    assert json.loads(files["config.json"])["quantization_config"] == QUANT
    assert_fp8_weights(files, big)
    assert api.verify(url) == [] and api.verify(url, sources=True) == []


def test_an_s3_output_combines_an_fp8_weight_that_a_local_target_of_its_job_keeps(big, tmp_path):
    """The local target keeps W as CP stores it, the s3:// one combines it: the job's order follows the s3://
    output, each output holds what its own target asks."""
    local, url = tmp_path / "here", fresh_url()
    recipe = both(big, local, url)
    here, there = recipe.targets
    api.run(dataclasses.replace(recipe, targets=(here, dataclasses.replace(there, exclude=()))), LOCAL)
    assert_fp8_weights(downloaded(url), big, kept=())
    assert_fp8_weights(local_files(local), big)
    assert open_uploads() == [] and api.verify(url) == [] and api.verify(local) == []


def assert_fp8_weights(files: dict[str, bytes], models: dict[str, Path], kept: tuple[str, ...] = (W,)) -> None:
    """Every FP8 weight and its scales in the shards are the float64 reference's, requantized; those `kept` are
    CP's."""
    got = {k: v for n, data in files.items() if n.endswith(".safetensors") for k, v in load(data).items()}
    sources: dict[Path, dict[str, torch.Tensor]] = {}
    weights = [n for n, t in got.items() if t.dtype == torch.float8_e4m3fn]
    assert len(weights) > 10 and all(n + "_scale_inv" in got for n in weights)
    cp = {k: v for f in sorted(models["cp8"].glob("*.safetensors")) for k, v in load_file(f).items()}
    for name in kept:
        assert torch.equal(bits(got[name]), bits(cp[name])) and torch.equal(
            bits(got[name + "_scale_inv"]), bits(cp[name + "_scale_inv"])
        )
    for name in set(weights) - set(kept):
        cp, chat, base = (_operand(models[k], name, sources) for k in ("cp8", "chat", "base"))
        want_q, want_s = quantize(combine64(cp, [(1.0, chat, base)]).astype(np.float32))
        assert_fp8_equal(got[name], want_q)
        assert torch.equal(bits(got[name + "_scale_inv"]), bits(torch.from_numpy(want_s)))


def killed_midway(recipe: Recipe, where: Path) -> list[str]:
    """Run the job in a driver process with slow units, kill -9 it once two units are journaled; the arguments
    that run it again."""
    path = where / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    args = ["run", str(path), "--backend", "local", "--no-progress"]
    assert recipe.targets[1].out is not None
    kill_once_journaled(args, dict(os.environ), recipe.targets[1].out)
    return args


def test_a_killed_fp8_job_resumes_to_the_same_bytes_with_no_upload_left_open(big, uninterrupted, tmp_path, capsys):
    local, url = tmp_path / "here", fresh_url()
    again = killed_midway(both(big, local, url), tmp_path)
    capsys.readouterr()
    assert main(again) == 0
    done, units = map(int, capsys.readouterr().err.split("resuming: ")[1].split(" units")[0].split(" of "))
    assert 0 < done < units
    same_output(local, url)
    same_output(uninterrupted[0], url)  # the uninterrupted job's bytes
    assert open_uploads() == [] and api.verify(url) == []


def test_ray_workers_write_an_fp8_output_to_s3(big, tmp_path, ray_s3):
    local, url = tmp_path / "here", fresh_url()
    recipe = both(big, local, url)
    api.run(recipe, RunOptions(backend="ray", workers=2, progress=False))
    same_output(local, url)
    assert open_uploads() == []


def test_an_fp8_weight_whose_bytes_would_leave_its_scales_unaligned_is_refused_for_s3(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    rng = np.random.default_rng(0)
    for model in ("base", "chat", "cp"):
        q, s = quantize(rng.standard_normal((5, 131)).astype(np.float32))  # 655 codes
        tensors = {name: to_fp8(q), name + "_scale_inv": torch.from_numpy(s)}
        save_checkpoint(tmp_path / model, tensors, {"model_type": "llama", "quantization_config": QUANT})
    paths = [tmp_path / m for m in ("base", "chat", "cp")]
    api.plan(api.make_recipe(*paths, tmp_path / "out"))  # a local folder takes it
    with pytest.raises(PlanError, match=r"FP8 weight of shape \[5, 131\] \(655 bytes, not a multiple of 4\)") as e:
        api.plan(api.make_recipe(*paths, "s3://bucket/out"))
    assert (e.value.tensor, e.value.file, "\n" in str(e.value)) == (name, "s3://bucket/out", False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("fp8s3-tiny"))


def test_an_s3_output_that_keeps_an_fp8_weight_another_target_combines_is_refused(tiny, tmp_path):
    """Target a combines W (its codes and scales side by side, one unit), the s3:// target b keeps it as CP stores
    it (apart in its shard): no one cut of the work fits both; the plan names the weight and both targets."""
    recipe = api.make_recipe(tiny["base"], tiny["chat"], {"a": tiny["cp8"], "b": tiny["cp8"]}, tmp_path)
    a, b = recipe.targets
    for a_out in (str(tmp_path / "a"), "s3://bucket/a"):
        targets = (dataclasses.replace(a, out=a_out), dataclasses.replace(b, out="s3://bucket/b", exclude=(W,)))
        with pytest.raises(PlanError, match="target 'a' combines this FP8 weight and target 'b' keeps it") as e:
            api.plan(dataclasses.replace(recipe, targets=targets))
        assert (e.value.tensor, e.value.file, "\n" in str(e.value)) == (W, str(tiny["cp8"]), False)
    api.plan(dataclasses.replace(recipe, targets=(dataclasses.replace(targets[0], exclude=(W,)), targets[1])))


def test_a_shard_boundary_never_falls_between_an_fp8_weight_and_its_scales_in_an_object_store(tiny):
    split = 0
    for limit in range(8_000, 60_000, 3_000):
        recipe = api.make_recipe(tiny["base"], tiny["chat"], tiny["cp8"], "s3://bucket/out", max_shard_size=limit)
        lay = api.plan(recipe).targets[0].layout
        for k, placed in enumerate(lay.tensors):
            if placed.tensor.rule == SCALE_RULE:
                weight = lay.tensors[k - 1]
                assert weight.tensor.name + "_scale_inv" == placed.tensor.name
                assert (weight.shard, weight.offset + weight.nbytes) == (placed.shard, placed.offset)
        for shard in range(len(lay.shards)):  # within the limit, or one tensor (with its scales) over it
            held = [p for p in lay.tensors if p.shard == shard]
            alone = len(held) == 1 or (len(held) == 2 and held[1].tensor.rule == SCALE_RULE)
            assert alone or sum(p.nbytes for p in held) <= limit
        plain = layout([p.tensor for p in lay.tensors], limit)  # the same order, cut as for a local folder
        split += any(
            p.tensor.rule == SCALE_RULE and p.shard != plain.tensors[k - 1].shard for k, p in enumerate(plain.tensors)
        )
    assert split  # some limits would have cut a pair
