"""Alpha rules: per-tensor alphas by name, gradients over each tower's layers; planned, merged, recorded."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file

from chatvec_dist import job, make_recipe
from chatvec_dist.cli import main
from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint
from chatvec_dist.errors import ChatvecError, PlanError
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.planning.alphas import gradient, layer_of
from chatvec_dist.recipe.alpha_rules import AlphaRule, parse_alpha_rule
from chatvec_dist.recipe.file import dump_recipe, load_recipe
from chatvec_dist.recipe.spec import Recipe, RecipeError, Target, Vector

RULES = ["norm=0", r"mlp\.=0.5:1"]  # CLI form of the rules the end-to-end tests use, with --alpha 0.8
LAYERS = 4


# --- the test's own reading of the rules: an independent reference ---------------------------------------------


def expected_alpha(name: str, layers: int = LAYERS) -> float:
    """norm → 0; mlp. → 0.5 at layer 0 … 1.0 at the last, linear; the rest 0.8. The gradient in mergekit's float
    arithmetic, `(1 − frac)·p0 + frac·p1`: at 1/3 it gives 0.6666666666666667, not np.interp's …666, and that last
    bit decides ties of float64 results exactly halfway between two float32 values (see docs/exactness.md)."""
    if "norm" in name:
        return 0.0
    if ".mlp." in name:
        t = int(re.search(r"layers\.(\d+)\.", name)[1]) / (layers - 1)
        value = (1 - t) * 0.5 + t * 1.0
        assert value == pytest.approx(float(np.interp(t, [0.0, 1.0], [0.5, 1.0])), rel=1e-15)
        return value
    return 0.8


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def shard_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


# --- parsing and validation ---------------------------------------------------------------------------------------


def test_cli_text_is_a_value_or_a_gradient_for_every_vector():
    assert parse_alpha_rule("norm=0") == AlphaRule("norm", (0.0,))
    assert parse_alpha_rule(r"mlp\.=0.5:1") == AlphaRule(r"mlp\.", ((0.5, 1.0),))
    assert parse_alpha_rule("a=b=0.25") == AlphaRule("a=b", (0.25,))  # the last '=' splits
    for bad in ("norm", "=1", "norm=", "norm=x", "norm=1:", "norm=1,2"):
        with pytest.raises(ValueError, match="--alpha-rule"):
            parse_alpha_rule(bad)
    t = Target("t", "cp", "out", (1.0, 0.5), alpha_rules=(parse_alpha_rule("norm=0.5:1"), AlphaRule("x", (0, 2))))
    assert t.alpha_rules == (AlphaRule("norm", ((0.5, 1.0), (0.5, 1.0))), AlphaRule("x", (0.0, 2.0)))


@pytest.mark.parametrize(
    "rule,detail",
    [
        (AlphaRule("(", (0.0,)), "not a valid regex"),
        (AlphaRule("a{4294967296}", (0.0,)), "not a valid regex"),
        (AlphaRule("x", (0.0, 1.0, 2.0)), "one per vector"),
        (AlphaRule("x", ((1.0,),)), "two points or more"),
        (AlphaRule("x", (float("inf"),)), "within float32's range"),
        (AlphaRule("x", (1e39,)), "within float32's range"),
        (AlphaRule("x", ("a",)), "give numbers"),
        (AlphaRule("x", (True,)), "give numbers"),
        ("norm=0", "give AlphaRule"),
    ],
)
def test_a_bad_rule_is_refused_when_the_target_is_made(rule, detail):
    with pytest.raises(RecipeError, match=detail) as e:
        Target("t", "cp", "out", (1.0, 0.5), alpha_rules=(rule,))
    assert e.value.field == "alpha_rules"


def test_api_takes_rules_as_objects_or_text(tmp_path):
    r = make_recipe("b", "c", "cp", tmp_path / "o", 0.8, alpha_rules=["norm=0", AlphaRule("mlp", ((0, 1),))])
    assert r.targets[0].alpha_rules == (AlphaRule("norm", (0.0,)), AlphaRule("mlp", ((0.0, 1.0),)))
    with pytest.raises(ChatvecError, match="alpha rule 'norm'"):
        make_recipe("b", "c", "cp", tmp_path / "o", alpha_rules=["norm"])


def test_recipe_file_reads_and_dumps_rules(tmp_path):
    text = """
vectors:
- {chat: c1, base: b1}
- {chat: c2, base: b2}
targets:
- name: t
  cp: cp
  out: o
  alphas: [1.0, 0.5]
  alpha_rules:
  - match: 'norm'
    alphas: [0.0]
  - match: 'mlp\\.'
    alphas: [[0.5, 1.0], 0.25]
  - match: 'attn'
    alphas: 0.75
"""
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.targets[0].alpha_rules == (
        AlphaRule("norm", (0.0, 0.0)),
        AlphaRule(r"mlp\.", ((0.5, 1.0), 0.25)),
        AlphaRule("attn", (0.75, 0.75)),
    )
    (tmp_path / "again.yaml").write_text(dump_recipe(recipe))
    assert load_recipe(tmp_path / "again.yaml") == recipe
    for bad, where in [
        ("alphas: [[1.0]]", "two points"),
        ("alphas: [0, 1, 2]", "one per vector"),
        ("alphas: [x]", "finite number"),
        ("alphas: [[0, [1]]]", "expected int or float or str, got a list"),
    ]:
        (tmp_path / "bad.yaml").write_text(text.replace("alphas: [0.0]", bad))
        with pytest.raises(
            RecipeError, match=rf"bad.yaml:1[12]: field 'targets\[0\]\.alpha_rules\[0\].*{re.escape(where)}"
        ):
            load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(text.replace("  - match: 'norm'\n", "  - \n"))
    with pytest.raises(RecipeError, match=r"alpha_rules\[0\]\.match': is required"):
        load_recipe(tmp_path / "bad.yaml")


# --- layers, towers, gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,where",
    [
        ("model.layers.12.mlp.up_proj.weight", ("model.layers.", 12)),
        ("transformer.h.3.attn.c_attn.weight", ("transformer.h.", 3)),
        ("transformer.blocks.0.ffn.up_proj.weight", ("transformer.blocks.", 0)),
        ("encoder.block.2.layer.1.DenseReluDense.wi.weight", ("encoder.block.", 2)),  # T5: `layer.1` is a sublayer
        ("model.decoder.layers.1.fc1.weight", ("model.decoder.layers.", 1)),
        ("bert.encoder.layer.7.output.dense.weight", ("bert.encoder.layer.", 7)),
        (
            "model.vision_tower.vision_model.encoder.layers.5.mlp.fc1.weight",
            ("model.vision_tower.vision_model.encoder.layers.", 5),
        ),
        ("model.language_model.layers.0.self_attn.q_proj.weight", ("model.language_model.layers.", 0)),
        ("visual.blocks.31.attn.qkv.weight", ("visual.blocks.", 31)),
        ("model.layers.3.block_sparse_moe.experts.7.w1.weight", ("model.layers.", 3)),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.norm.weight", None),
        ("model.layers_norm.5.weight", None),
    ],
)
def test_layer_index_and_tower_from_the_name(name, where):
    assert layer_of(name) == where


def test_gradient_is_linear_between_evenly_spread_points():
    for points in [(0.5, 1.0), (0.0, 1.0, 0.0), (1.0, 0.2, 0.7, 0.3)]:
        xs = np.linspace(0.0, 1.0, len(points))
        for t in [0.0, 0.1, 1 / 3, 0.5, 2 / 3, 0.9, 1.0]:
            assert gradient(points, t) == pytest.approx(float(np.interp(t, xs, points)), rel=1e-15, abs=1e-15)
        for x, p in zip(xs, points):  # at a point: exactly its value
            assert gradient(points, float(x)) == p


def _llama(root: Path, layers: int = LAYERS) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    cfg = llama_config(64, num_hidden_layers=layers)
    for name in ("base", "chat", "cp"):
        save_checkpoint(root / name, llama_tensors(cfg, g), cfg)
    return {n: root / n for n in ("base", "chat", "cp")}


def _alphas(planned, target: int = 0) -> dict[str, tuple[float, ...]]:
    return {p.tensor.name: tuple(t.alpha for t in p.tensor.terms) for p in planned.targets[target].layout.tensors}


def test_plan_picks_the_first_matching_rule_per_vector(tmp_path):
    d = _llama(tmp_path)
    rules = (
        AlphaRule("norm", (0.0, 0.5)),
        AlphaRule(r"mlp\.", ((0.0, 1.0), 0.25)),
        AlphaRule(r"layers\.0\.", (9.0,)),  # after `mlp\.`: layer 0's MLP keeps the gradient
    )
    recipe = Recipe(
        (Vector(str(d["chat"]), str(d["base"])), Vector(str(d["cp"]), str(d["base"]))),
        (Target("t", str(d["cp"]), None, (0.8, -0.2), alpha_rules=rules),),
    )
    got = _alphas(job.plan(recipe))
    for name, alphas in got.items():
        layer = re.search(r"layers\.(\d+)\.", name)
        if "norm" in name:
            want = (0.0, 0.5)
        elif ".mlp." in name:
            want = (int(layer[1]) / (LAYERS - 1), 0.25)
        elif layer and layer[1] == "0":
            want = (9.0, 9.0)
        else:
            want = (0.8, -0.2)
        assert alphas == pytest.approx(want, rel=1e-15), name
    assert {a for n, a in got.items() if "mlp" in n} >= {(0.0, 0.25), (1.0, 0.25)}


def test_gradient_spans_each_tower_of_an_encoder_decoder(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=32,
        d_model=8,
        encoder_layers=3,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_position_embeddings=16,
    )
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "bart")
    p = str(tmp_path / "bart")
    rules = (AlphaRule(r"layers\.\d+\.fc1", ((0.0, 1.0),)),)
    recipe = Recipe((Vector(p, p),), (Target("t", p, None, (1.0,), alpha_rules=rules),))
    got = _alphas(job.plan(recipe))
    assert {n: a for n, a in got.items() if "fc1" in n} == {
        **{f"model.encoder.layers.{i}.fc1.{w}": (i / 2,) for i in range(3) for w in ("weight", "bias")},
        **{f"model.decoder.layers.{i}.fc1.{w}": (float(i),) for i in range(2) for w in ("weight", "bias")},
    }
    assert got["model.encoder.layers.0.fc2.weight"] == (1.0,)


def test_gradient_rule_on_a_tensor_without_a_layer_is_a_plan_error(tmp_path):
    d = _llama(tmp_path)

    def plan(*rules: AlphaRule, exclude: tuple[str, ...] = ()):
        return job.plan(
            Recipe(
                (Vector(str(d["chat"]), str(d["base"])),),
                (Target("t", str(d["cp"]), None, (1.0,), exclude=exclude, alpha_rules=rules),),
            )
        )

    with pytest.raises(PlanError, match=r"alpha rule 'weight' is a gradient over layers.*no layer index") as e:
        plan(AlphaRule("weight", ((0.0, 1.0),)))
    assert e.value.tensor in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
    assert e.value.file and e.value.file.endswith(".safetensors")
    got = _alphas(plan(AlphaRule(r"^model\.norm", (0.0,)), AlphaRule("weight", ((0.0, 1.0),)), exclude=("embed|lm_",)))
    assert got["model.norm.weight"] == (0.0,) and got["lm_head.weight"] == ()  # excluded: copied, no alphas
    assert got["model.layers.3.mlp.up_proj.weight"] == (1.0,)
    with pytest.raises(PlanError, match="alpha rule 'nrom' matches no tensor of target 't'"):
        plan(AlphaRule("nrom", (0.0,)))


# --- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> dict[str, Path]:
    """float32 Llamas with 4 layers: a float64 reference then rounds once, as the merge does."""
    root = tmp_path_factory.mktemp("deep")
    base = make_llama(root / "base", 0, dtype=torch.float32, layers=LAYERS)
    make_llama(root / "chat", 1, base=base, dtype=torch.float32, layers=LAYERS)
    make_llama(root / "cp", 2, base=base, dtype=torch.float32, layers=LAYERS)
    return {n: root / n for n in ("base", "chat", "cp")}


def merge_args(d: dict, out: Path, *extra: str) -> list[str]:
    rules = [a for r in RULES for a in ("--alpha-rule", r)]
    args = ["merge", "--base", str(d["base"]), "--chat", str(d["chat"]), "--cp", str(d["cp"]), "--out", str(out)]
    return [*args, "--alpha", "0.8", *rules, "--no-progress", "--unit-size", "2KiB", *extra]


@pytest.fixture(scope="module")
def ruled(deep, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ruled") / "out"
    assert main(merge_args(deep, out, "--backend", "local", "--workers", "2")) == 0
    return out


def test_merge_with_rules_equals_the_float64_reference(deep, ruled):
    base, chat, cp, got = (load_all(p) for p in (deep["base"], deep["chat"], deep["cp"], ruled))
    assert set(got) == set(cp)
    for name, c in cp.items():
        a = expected_alpha(name)
        want = (c.double() + a * (chat[name].double() - base[name].double())).float()
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want), name
    assert torch.equal(got["model.norm.weight"], cp["model.norm.weight"])  # alpha 0: CP's
    rows = {r["tensor"]: r for r in read_manifest(ruled)[0].to_pylist()}
    for name, r in rows.items():
        assert r["alphas"] == ([expected_alpha(name)] if r["rule"] != "copy" else None), name
    meta = read_manifest(ruled)[1]
    assert meta["recipe"]["targets"][0]["alpha_rules"] == [
        {"match": "norm", "alphas": [0.0]},
        {"match": r"mlp\.", "alphas": [[0.5, 1.0]]},
    ]
    card = (ruled / "README.md").read_text()
    assert "## Alpha rules" in card and "| `norm` | `[0.0]` |" in card and r"| `mlp\.` | `[[0.5, 1.0]]` |" in card

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(ruled, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in got.items())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 17]])).logits).all()


def test_same_bytes_for_workers_ray_and_a_resume(deep, ruled, ray_local, tmp_path, monkeypatch):
    from chatvec_dist.exec import worker

    assert main(merge_args(deep, tmp_path / "w1", "--backend", "local", "--workers", "1")) == 0
    assert main(merge_args(deep, tmp_path / "ray", "--workers", "2")) == 0
    real_run, calls = worker.UnitRunner.run, []

    def failing(self, unit):
        calls.append(unit.id)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_run(self, unit)

    args = merge_args(deep, tmp_path / "resumed", "--backend", "local", "--workers", "1")
    monkeypatch.setattr(worker.UnitRunner, "run", failing)
    assert main(args) == 130
    monkeypatch.setattr(worker.UnitRunner, "run", real_run)
    assert main(args) == 0
    for name in ("w1", "ray", "resumed"):
        assert shard_bytes(tmp_path / name) == shard_bytes(ruled), name
    assert verify(tmp_path / "resumed") == []


def test_plan_shows_and_saves_each_tensors_alphas(deep, tmp_path, capsys):
    args = merge_args(deep, tmp_path / "o")[1:]
    assert main(["plan", *[a for a in args if a != "--no-progress"], "--save", str(tmp_path / "p.parquet")]) == 0
    text = capsys.readouterr().out
    assert "alpha rule 'norm' → [0.0]: 9 tensors" in text
    assert r"alpha rule 'mlp\.' → [[0.5, 1.0]]: 12 tensors, alphas from [0.5] to [1.0]" in text
    assert "other → [0.8]: 18 tensors" in text
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert {r["tensor"]: r["alphas"] for r in rows} == {r["tensor"]: [expected_alpha(r["tensor"])] for r in rows}


def test_recorded_recipe_round_trips_the_rules(deep, ruled, tmp_path, capsys):
    capsys.readouterr()
    assert main(["inspect", str(ruled), "--recipe"]) == 0
    recorded = capsys.readouterr().out
    (tmp_path / "again.yaml").write_text(recorded)
    again = load_recipe(tmp_path / "again.yaml")
    assert again.targets[0].alpha_rules == (AlphaRule("norm", (0.0,)), AlphaRule(r"mlp\.", ((0.5, 1.0),)))
    assert main(merge_args(deep, ruled, "--print-recipe")) == 0
    assert capsys.readouterr().out == recorded  # the command line's recipe is the one recorded
    assert main(["run", str(tmp_path / "again.yaml"), "--backend", "local", "--no-progress"]) == 0
    assert "kept" in capsys.readouterr().out  # the same job: already committed
    assert main(["inspect", str(ruled)]) == 0
    assert "alphas (6 sets; tensors × alphas): 9 × [0.0], 3 × [0.5]" in capsys.readouterr().out


def test_cli_refuses_rules_with_one_line(deep, tmp_path, capsys):
    for rule, said in [
        ("nrom=0", "alpha rule 'nrom' matches no tensor"),
        ("weight=0:1", "is a gradient over layers, but this tensor has no layer index"),
        ("(=0", "not a valid regex"),
        ("norm", "--alpha-rule 'norm': give REGEX=A"),
    ]:
        args = merge_args(deep, tmp_path / "o", "--backend", "local")
        assert main([*args, "--alpha-rule", rule]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((deep["cp"] / "config.json").read_text())["num_hidden_layers"] == LAYERS
