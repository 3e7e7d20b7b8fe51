"""Planning from headers alone: rules, vocabulary policies, tied embeddings, shards, offsets, units."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from chatvec_dist import job
from chatvec_dist.cli.args import recipe_from_args
from chatvec_dist.cli.parser import build_parser
from chatvec_dist.demo import llama_config, llama_tensors, make_demo_models, save_checkpoint
from chatvec_dist.errors import PlanError
from chatvec_dist.io.header import read_header
from chatvec_dist.planning.layout import cut_units, layout
from chatvec_dist.recipe.spec import Recipe, Target, Vector


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo_models(tmp_path_factory.mktemp("demo"))


def _recipe(d, **kw) -> Recipe:
    return Recipe(
        vectors=(Vector(str(d["chat"]), str(d["base"])),), targets=(Target("t", str(d["cp"]), "unused", (1.0,), **kw),)
    )


def _tensors(planned):
    return planned.targets[0].layout.tensors


def test_header_reader_agrees_with_safetensors(demo):
    path = demo["base"] / "model.safetensors"
    tensors, meta = read_header(path)
    assert meta == {"format": "pt"}
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(tensors)
        for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            t = f.get_tensor(name)
            info = tensors[name]
            assert info.shape == tuple(t.shape) and info.dtype == "BF16" and info.nbytes == t.numel() * 2
            with open(path, "rb") as fh:
                fh.seek(info.start)
                assert fh.read(info.nbytes) == t.view(torch.int16).numpy().tobytes()


def test_vocab_auto_skips_extended_rows(demo):
    planned = job.plan(_recipe(demo))
    rules = {p.tensor.name: (p.tensor.rule, p.tensor.reason, p.tensor.merge_elems) for p in _tensors(planned)}
    assert rules["lm_head.weight"] == ("copy", "vocab:skip", 0)
    assert rules["model.embed_tokens.weight"] == ("copy", "vocab:skip", 0)
    assert rules["model.layers.0.mlp.up_proj.weight"] == ("merge", "", 128 * 64)
    assert len(rules) == 21


def test_vocab_overlap_merges_the_shared_rows(demo):
    planned = job.plan(_recipe(demo, vocab="overlap"))
    t = next(p.tensor for p in _tensors(planned) if p.tensor.name == "lm_head.weight")
    assert (t.rule, t.reason, t.shape, t.merge_elems) == ("merge_rows", "vocab:overlap", (320, 64), 256 * 64)


def test_vocab_full_refuses_extended_vocab(demo):
    with pytest.raises(PlanError, match="--vocab full needs equal shapes") as e:
        job.plan(_recipe(demo, vocab="full"))
    assert e.value.tensor in ("lm_head.weight", "model.embed_tokens.weight")


def test_cp_with_fewer_rows_than_base_is_an_error(demo):
    recipe = _recipe(dict(demo, chat=demo["cp"], base=demo["cp"], cp=demo["base"]))
    with pytest.raises(PlanError, match="smaller than the 320 rows"):
        job.plan(recipe)


def test_extracting_from_a_chat_model_with_added_tokens_keeps_the_shared_rows(demo):
    """chat 320 rows, base 256: the vector has base's 256 rows; the other way round there is nothing to keep."""
    extract = Recipe(
        vectors=(Vector(str(demo["cp"]), str(demo["base"])),), targets=(Target("v", None, "unused", (1.0,)),)
    )
    t = next(p.tensor for p in _tensors(job.plan(extract)) if p.tensor.name == "lm_head.weight")
    assert (t.rule, t.reason, t.shape, t.merge_elems) == ("merge", "vocab:overlap", (256, 64), 256 * 64)
    cli = recipe_from_args(
        build_parser().parse_args(
            ["extract", "--chat", str(demo["cp"]), "--base", str(demo["base"]), "--out", "unused"]
        )
    )
    t = next(p.tensor for p in _tensors(job.plan(cli)) if p.tensor.name == "lm_head.weight")
    assert (t.rule, t.reason, t.shape) == ("merge", "vocab:overlap", (256, 64))  # `chatvec extract` alike
    backwards = Recipe(
        vectors=(Vector(str(demo["base"]), str(demo["cp"])),), targets=(Target("v", None, "unused", (1.0,)),)
    )
    with pytest.raises(PlanError, match="an extracted vector has no CP rows to keep") as e:
        job.plan(backwards)
    assert e.value.tensor in ("lm_head.weight", "model.embed_tokens.weight")


@pytest.mark.parametrize(
    "name,vocab",
    [
        ("model.embed_tokens.weight", True),
        ("lm_head.weight", True),
        ("transformer.wte.weight", True),
        ("gpt_neox.embed_in.weight", True),
        ("embed_out.weight", True),
        ("transformer.output_layer.weight", True),
        ("backbone.embeddings.weight", True),
        ("lm_head.bias", True),
        ("output.weight", True),
        ("transformer.word_embeddings.weight", True),
        ("model.layers.0.mlp.up_proj.weight", False),
        ("embeddings.position_embeddings.weight", False),
        ("model.layers.0.self_attn.o_proj.weight", False),
    ],
)
def test_vocabulary_tensors_of_common_architectures_are_recognized(name, vocab):
    from chatvec_dist.planning.planner import VOCAB_TENSOR

    assert (VOCAB_TENSOR.search(name) is not None) == vocab


def test_float8_weights_without_block_scales_are_refused_with_the_reason(tmp_path):
    """FP8 weights need their scales: raw float8 arithmetic would be silently wrong (tests/test_fp8.py has the
    block-scaled ones)."""
    g = torch.Generator().manual_seed(0)
    cfg = llama_config(64)
    for name in ("base", "chat", "cp"):
        tensors = llama_tensors(cfg, g)
        if name == "chat":
            tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(
                torch.float8_e4m3fn
            )
        save_checkpoint(tmp_path / name, tensors, cfg)
    with pytest.raises(PlanError, match="F8_E4M3 without a 128×128 block scale") as e:
        job.plan(_recipe({n: tmp_path / n for n in ("base", "chat", "cp")}))
    assert e.value.tensor == "model.layers.1.mlp.up_proj.weight" and e.value.file.startswith(str(tmp_path / "chat"))


def test_an_excluded_float8_tensor_is_kept_as_it_is_never_converted(tmp_path):
    """Excluded, it is copied as stored; under --dtype its codes would lose their scales: refused, named."""
    g = torch.Generator().manual_seed(0)
    cfg = llama_config(64)
    name = "model.layers.1.mlp.up_proj.weight"
    for which in ("base", "chat", "cp"):
        tensors = llama_tensors(cfg, g)
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        save_checkpoint(tmp_path / which, tensors, cfg)
    d = {n: tmp_path / n for n in ("base", "chat", "cp")}
    kept = next(p.tensor for p in _tensors(job.plan(_recipe(d, exclude=(name,)))) if p.tensor.name == name)
    assert (kept.rule, kept.out_dtype) == ("copy", "F8_E4M3")
    with pytest.raises(PlanError, match="an excluded F8_E4M3 tensor cannot be converted to BF16") as e:
        job.plan(_recipe(d, exclude=(name,), dtype="bfloat16"))
    assert e.value.tensor == name and e.value.file.startswith(str(tmp_path / "cp"))


def test_a_scalar_with_a_vocabulary_name_is_an_ordinary_tensor(tmp_path):
    """`lm_head.bias` of shape [] has no rows: merged as a scalar, not planned as a vocabulary (was an IndexError)."""
    g = torch.Generator().manual_seed(0)
    cfg = llama_config(64)
    for which in ("base", "chat", "cp"):
        tensors = llama_tensors(cfg, g)
        tensors["lm_head.bias"] = torch.randn((), generator=g).to(torch.bfloat16)
        save_checkpoint(tmp_path / which, tensors, cfg)
    bias = next(
        p.tensor
        for p in _tensors(job.plan(_recipe({n: tmp_path / n for n in ("base", "chat", "cp")})))
        if p.tensor.name == "lm_head.bias"
    )
    assert (bias.rule, bias.reason, bias.shape, bias.numel) == ("merge", "", (), 1)


def test_a_single_file_beside_an_index_is_read_as_transformers_reads_it(demo, tmp_path, caplog):
    """model.safetensors and an index (with its shards) in one folder: transformers loads model.safetensors, so
    that is what gets merged; the ambiguity is said."""
    import shutil

    from safetensors.torch import load_file, save_file

    cp = tmp_path / "cp"
    shutil.copytree(demo["cp"], cp)  # sharded, with its index
    single = {k: v for shard in sorted(cp.glob("model-*.safetensors")) for k, v in load_file(shard).items()}
    save_file(single, cp / "model.safetensors", metadata={"format": "pt"})
    planned = job.plan(_recipe(dict(demo, cp=cp)))
    assert {p.tensor.cp.path for p in _tensors(planned)} == {str(cp / "model.safetensors")}
    assert (
        f"{cp} holds both model.safetensors and model.safetensors.index.json: reading model.safetensors"
        in caplog.text  # logged as a warning (the CLI shows it on stderr)
    )


def test_equal_vocab_defaults_to_full(tmp_path):
    g = torch.Generator().manual_seed(0)
    cfg = llama_config(64)
    for name in ("base", "chat", "cp"):
        save_checkpoint(tmp_path / name, llama_tensors(cfg, g), cfg)
    planned = job.plan(_recipe({n: tmp_path / n for n in ("base", "chat", "cp")}))
    lm = next(p.tensor for p in _tensors(planned) if p.tensor.name == "lm_head.weight")
    assert (lm.rule, lm.reason) == ("merge", "vocab:full")


def test_tied_embeddings_invent_and_drop_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    cfg = llama_config(64, tie_word_embeddings=True)
    for name in ("base", "chat", "cp"):
        save_checkpoint(tmp_path / name, llama_tensors(cfg, g), cfg)
    d = {n: tmp_path / n for n in ("base", "chat", "cp")}
    names = {p.tensor.name for p in _tensors(job.plan(_recipe(d)))}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    untied = llama_config(64)
    save_checkpoint(tmp_path / "cp2", llama_tensors(untied, g), untied)
    with pytest.raises(PlanError, match="lm_head.weight|missing"):
        job.plan(_recipe(dict(d, cp=tmp_path / "cp2")))


def test_exclude_keeps_cp_values_and_need_not_exist_in_base(tmp_path, demo):
    cfg = json.loads((demo["cp"] / "config.json").read_text())
    tensors = {n: torch.zeros(1) for n in ["extra.bias"]}
    # CP gets a tensor base/chat lack: an error, unless excluded.
    from safetensors.torch import load_file

    cp = {}
    for f in sorted(demo["cp"].glob("*.safetensors")):
        cp |= load_file(f)
    save_checkpoint(tmp_path / "cp", cp | tensors, cfg)
    d = dict(demo, cp=tmp_path / "cp")
    with pytest.raises(PlanError, match="missing here but present") as e:
        job.plan(_recipe(d))
    assert e.value.tensor == "extra.bias"
    planned = job.plan(_recipe(d, exclude=(r"^extra\.", r"norm")))
    rules = {p.tensor.name: (p.tensor.rule, p.tensor.reason) for p in _tensors(planned)}
    assert rules["extra.bias"] == ("copy", "excluded")
    assert rules["model.norm.weight"] == ("copy", "excluded")
    assert rules["model.layers.0.self_attn.q_proj.weight"] == ("merge", "")


def test_layout_shards_offsets_and_units(demo):
    tensors = [p.tensor for p in _tensors(job.plan(_recipe(demo)))]
    lay = layout(tensors, max_shard_size=40_000)
    units = cut_units([lay], unit_bytes=4096)
    assert len(lay.shards) > 2
    for i, shard in enumerate(lay.shards):
        placed = sorted((p for p in lay.tensors if p.shard == i), key=lambda p: p.offset)
        assert placed[0].offset == len(shard.header) and len(shard.header) % 8 == 0
        for a, b in zip(placed, placed[1:]):
            assert a.offset + a.nbytes == b.offset  # contiguous, as the safetensors reader requires
        assert placed[-1].offset + placed[-1].nbytes == shard.size
        assert all(p.offset % 2 == 0 for p in placed)
        assert sum(p.nbytes for p in placed) <= 40_000 or len(placed) == 1
    # Units cover every tensor exactly once, in pieces of at most the unit size starting on hash blocks.
    covered = {}
    for u in units:
        assert 0 < u.nbytes <= 4096
        assert sum((pc.last - pc.first) * 2 for pc in u.pieces) == u.nbytes
        for pc in u.pieces:
            assert pc.first % 2048 == 0
            covered.setdefault(pc.index, []).append((pc.first, pc.last))
    for index, parts in covered.items():
        parts.sort()
        assert parts[0][0] == 0 and parts[-1][1] == lay.tensors[index].tensor.numel
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert set(covered) == set(range(len(lay.tensors)))
    assert [u.id for u in units] == list(range(len(units)))


def test_a_unit_size_that_makes_too_many_units_is_refused_with_one_that_works(demo, monkeypatch):
    """A few bytes per unit on a large model would swamp the driver: refused, naming a size that fits."""
    from chatvec_dist.planning import layout as layout_module

    monkeypatch.setattr(layout_module, "MAX_UNITS", 100)
    with pytest.raises(PlanError, match=r"units: use --unit-size (\d+)(KiB)? or more") as e:
        job.plan(dataclasses.replace(_recipe(demo), unit_bytes=64))
    size = int(re.search(r"--unit-size (\d+)", str(e.value)).group(1)) * (1024 if "KiB" in str(e.value) else 1)
    assert len(job.plan(dataclasses.replace(_recipe(demo), unit_bytes=size)).units) <= 100 + 20  # + tensor ends


def test_units_are_shared_by_targets_of_different_vocabularies(demo):
    """One CP with 320 rows and one with 256: pieces span the larger; each output takes its own rows."""
    same = _recipe(demo)
    recipe = Recipe(vectors=same.vectors, targets=(same.targets[0], Target("small", str(demo["base"]), "u2", (0.5,))))
    planned = job.plan(recipe)
    big, small = (tp.layout for tp in planned.targets)
    lm = [i for i, p in enumerate(big.tensors) if p.tensor.name == "lm_head.weight"][0]
    assert small.tensors[lm].tensor.name == "lm_head.weight"
    assert (big.tensors[lm].tensor.numel, small.tensors[lm].tensor.numel) == (320 * 64, 256 * 64)
    assert big.tensors[lm].tensor.rule == "copy" and small.tensors[lm].tensor.rule == "merge"
    pieces = [pc for u in planned.units for pc in u.pieces if pc.index == lm]
    assert pieces[0].first == 0 and pieces[-1].last == 320 * 64


def test_plan_cli_prints_summary_without_running(demo, capsys, tmp_path):
    from chatvec_dist.cli import main

    out = tmp_path / "never"
    assert (
        main(
            [
                "plan",
                "--base",
                str(demo["base"]),
                "--chat",
                str(demo["chat"]),
                "--cp",
                str(demo["cp"]),
                "--out",
                str(out),
                "--vocab",
                "overlap",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "21 tensors (19 merge, 2 merge_rows)" in text and "vocab:overlap" in text
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    import pyarrow.parquet as pq

    saved = tmp_path / "plan.parquet"
    assert (
        main(
            [
                "plan",
                "--base",
                str(demo["base"]),
                "--chat",
                str(demo["chat"]),
                "--cp",
                str(demo["cp"]),
                "--save",
                str(saved),
            ]
        )
        == 0
    )
    rows = {r["tensor"]: r for r in pq.read_table(saved).to_pylist()}
    assert (
        len(rows) == 21
        and rows["lm_head.weight"]["rule"] == "copy"
        and rows["lm_head.weight"]["reason"] == "vocab:skip"
    )
    assert rows["model.norm.weight"]["nbytes"] == 128 and rows["model.norm.weight"]["dtype_out"] == "BF16"


def test_the_driver_plans_and_audits_without_torch(demo, tmp_path):
    """Planning, the Ray driver, manifests and outputs never import torch: the driver on a Ray cluster starts fast
    and small; only workers (and the local backend) load it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from chatvec_dist.cli import main\n"
        "import chatvec_dist.job, chatvec_dist.exec.ray_backend, chatvec_dist.output.commit, chatvec_dist.output.verify\n"
        "import chatvec_dist.io.sources, chatvec_dist.output.card, chatvec_dist.output.inspection, chatvec_dist.recipe.file\n"
        f"assert main(['plan', '--base', {str(demo['base'])!r}, '--chat', {str(demo['chat'])!r}, "
        f"'--cp', {str(demo['cp'])!r}, '--out', {str(tmp_path / 'o')!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_itemsizes_match_torch():
    from chatvec_dist.dtypes import FLOAT_DTYPES, ITEMSIZE
    from chatvec_dist.torch_dtypes import TORCH_DTYPES

    assert set(ITEMSIZE) == set(TORCH_DTYPES)
    assert all(ITEMSIZE[n] == TORCH_DTYPES[n].itemsize for n in ITEMSIZE)
    assert all(TORCH_DTYPES[n].is_floating_point for n in FLOAT_DTYPES)
