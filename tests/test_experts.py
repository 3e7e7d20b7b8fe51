"""MoE experts per expert (as checkpoints ship) and fused (transformers' `experts.gate_up_proj`), mixed across the
checkpoints of a merge: mapped at plan time onto CP's names and layout, exactly; other layouts refused."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvec_dist.cli import main
from chatvec_dist.errors import PlanError
from chatvec_dist.exec import worker
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.planning.plan import plan
from chatvec_dist.recipe.spec import Recipe, Target, Vector

EXPERTS, HIDDEN, INTER = 4, 32, 24


def _qwen3_moe(seed: int, base: dict[str, torch.Tensor] | None = None):
    """A tiny Qwen3-MoE (both layers MoE) in bfloat16: `base`'s weights plus noise, if given."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=48,
        moe_intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    if base is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_((base[name].float() + 0.02 * torch.randn(p.shape)).to(torch.bfloat16))
    return model


@pytest.fixture(scope="module")
def moes(tmp_path_factory) -> dict[str, Path]:
    """base, chat and cp, each saved per expert (`<name>_split`, over several shards) and fused (`<name>_fused`)."""
    root = tmp_path_factory.mktemp("moes")
    base = _qwen3_moe(0)
    state = {k: v.detach().clone() for k, v in base.named_parameters()}
    models = {"base": base, "chat": _qwen3_moe(1, state), "cp": _qwen3_moe(2, state)}
    for name, model in models.items():
        model.save_pretrained(root / f"{name}_split")  # transformers writes experts back one by one
        model.save_pretrained(root / f"{name}_fused", save_original_format=False)
    for name in ("base", "chat"):
        _reshard(root / f"{name}_split", 2)
    return {p.name: p for p in root.iterdir()}


def _reshard(directory: Path, count: int) -> None:
    """The checkpoint's tensors dealt round-robin into `count` shards: an expert's neighbours in other files."""
    tensors = _load(directory)
    for f in directory.glob("model*.safetensors*"):
        f.unlink()
    shards = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map = {name: shards[i % count] for i, name in enumerate(sorted(tensors))}
    for shard in shards:
        save_file(
            {n: t for n, t in tensors.items() if weight_map[n] == shard}, str(directory / shard), {"format": "pt"}
        )
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _load(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(f)
    return tensors


def _fuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every per-expert block fused by hand: [E, 2I, H] (each expert's gate rows, then its up rows), [E, H, I]."""
    out = {k: v for k, v in tensors.items() if not re.search(r"\.experts\.\d", k)}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.0.gate_proj.weight" not in tensors:
            continue
        gates = [
            torch.cat([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]])
            for e in range(EXPERTS)
        ]
        out[f"{p}.gate_up_proj"] = torch.stack(gates)
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(EXPERTS)])
    return out


def _split(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every fused block cut into experts by hand."""
    out = {k: v for k, v in tensors.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.gate_up_proj" not in tensors:
            continue
        for e in range(EXPERTS):
            out[f"{p}.{e}.gate_proj.weight"] = tensors[f"{p}.gate_up_proj"][e, :INTER]
            out[f"{p}.{e}.up_proj.weight"] = tensors[f"{p}.gate_up_proj"][e, INTER:]
            out[f"{p}.{e}.down_proj.weight"] = tensors[f"{p}.down_proj"][e]
    return out


def _expected(cp: dict, chat: dict, base: dict, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """The float64 reference, rounded once (through float32, as torch converts) to bfloat16."""
    return {
        n: (c.double() + alpha * (chat[n].double() - base[n].double())).float().to(torch.bfloat16)
        for n, c in cp.items()
    }


def _merge(moes: dict, out: Path, cp: str, vectors: str, *extra: str, chat: str | None = None) -> list[str]:
    return [
        "merge",
        "--base",
        str(moes[f"base_{vectors}"]),
        "--chat",
        str(moes[f"chat_{chat or vectors}"]),
        "--cp",
        str(moes[f"cp_{cp}"]),
        "--out",
        str(out),
        "--no-progress",
        "--unit-size",
        "2KiB",  # units cut through experts and their segments
        *extra,
    ]


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def _assert_bytes(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == torch.bfloat16 and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name


def _loads_as(out: Path, expected: dict[str, torch.Tensor]) -> None:
    """transformers loads the output with no missing or unexpected key, and holds the expected experts."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    fused = _fuse(expected)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int16), fused[name].view(torch.int16)), name
    assert any(n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def fused_cp_out(moes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fused_cp") / "out"
    assert main(_merge(moes, out, "fused", "split", "--backend", "local", "--workers", "1")) == 0
    return out


def test_fused_cp_gets_per_expert_vectors(moes, fused_cp_out):
    """CP fused, base and chat per expert (over several shards): the output keeps CP's fused names, exact."""
    base, chat = _fuse(_load(moes["base_split"])), _fuse(_load(moes["chat_split"]))
    expected = _expected(_load(moes["cp_fused"]), chat, base)
    got = _load(fused_cp_out)
    _assert_bytes(got, expected)
    assert "model.layers.1.mlp.experts.gate_up_proj" in got and not any(".experts.0." in n for n in got)
    assert not torch.equal(
        got["model.layers.0.mlp.experts.gate_up_proj"],
        _load(moes["cp_fused"])["model.layers.0.mlp.experts.gate_up_proj"],
    )
    _loads_as(fused_cp_out, expected)
    assert verify(fused_cp_out) == []
    rows = read_manifest(fused_cp_out)[0].to_pylist()
    assert {r["tensor"] for r in rows if r["reason"] == "experts:mapped"} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    }


def test_plan_shows_the_mapping_in_one_line(moes, capsys):
    argv = ["plan", "--base", str(moes["base_fused"]), "--chat", str(moes["chat_fused"]), "--cp", str(moes["cp_split"])]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "  24 expert tensors: merge (experts:mapped, vectors in the other layout)" in shown
    assert "experts.0.gate_proj" not in shown


def test_per_expert_cp_gets_fused_vectors(moes, tmp_path):
    """CP per expert, base and chat fused: the output keeps CP's per-expert names, exact."""
    out = tmp_path / "out"
    assert main(_merge(moes, out, "split", "fused", "--backend", "local", "--workers", "2")) == 0
    base, chat = _split(_load(moes["base_fused"])), _split(_load(moes["chat_fused"]))
    expected = _expected(_load(moes["cp_split"]), chat, base)
    _assert_bytes(_load(out), expected)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in _load(out)
    _loads_as(out, expected)


def test_same_bytes_as_same_layout_for_any_workers_and_backend(moes, fused_cp_out, ray_local, tmp_path):
    """Mapped vectors give the bytes that vectors already in CP's layout give, with 2 workers and on Ray."""
    runs = {
        "same_layout": ("fused", ["--backend", "local", "--workers", "2"]),
        "local2": ("split", ["--backend", "local", "--workers", "2"]),
        "ray1": ("split", ["--workers", "1"]),
    }
    for name, (vectors, extra) in runs.items():
        assert main(_merge(moes, tmp_path / name, "fused", vectors, *extra)) == 0
        assert _shards(tmp_path / name) == _shards(fused_cp_out), name
    mixed = tmp_path / "mixed"  # base per expert, chat fused: each mapped on its own
    assert main(_merge(moes, mixed, "fused", "split", "--backend", "local", chat="fused")) == 0
    assert _shards(mixed) == _shards(fused_cp_out)


def test_per_expert_vectors_in_an_object_store(moes, fused_cp_out, s3_server, tmp_path):
    """Segments read with ranged GETs from s3:// objects give the same bytes."""
    from s3server import upload_folder

    urls = {f"{n}_split": upload_folder(s3_server, moes[f"{n}_split"], "moes", n) for n in ("base", "chat")}
    out = tmp_path / "out"
    assert main(_merge(dict(moes, **urls), out, "fused", "split", "--backend", "local")) == 0
    assert _shards(out) == _shards(fused_cp_out)


def test_interrupted_mapped_merge_resumes_to_the_same_bytes(moes, fused_cp_out, tmp_path, monkeypatch):
    real_run, calls = worker.UnitRunner.run, []

    def failing(self, unit):
        calls.append(unit.id)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real_run(self, unit)

    out = tmp_path / "resumed"
    args = _merge(moes, out, "fused", "split", "--backend", "local", "--workers", "1")
    monkeypatch.setattr(worker.UnitRunner, "run", failing)
    assert main(args) == 130
    monkeypatch.setattr(worker.UnitRunner, "run", lambda self, unit: calls.append(unit.id) or real_run(self, unit))
    first = len(calls)
    assert main(args) == 0
    assert len(calls) - first == len(set(calls)) - 5  # the five journaled units were not redone
    assert _shards(out) == _shards(fused_cp_out) and verify(out) == []


def test_extract_keeps_the_base_layout_and_apply_maps_it(moes, fused_cp_out, tmp_path):
    """An extracted vector keeps base's layout (per expert, chat fused); applied to a fused CP, it maps again."""
    vec = tmp_path / "vec"
    argv = ["extract", "--base", str(moes["base_split"]), "--chat", str(moes["chat_fused"]), "--out", str(vec)]
    assert main([*argv, "--no-progress", "--backend", "local"]) == 0
    base, chat = _load(moes["base_split"]), _split(_load(moes["chat_fused"]))
    got = _load(vec)
    assert set(got) == set(base)
    for name, b in base.items():
        want = (chat[name].double() - b.double()).float()
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want), name
    out = tmp_path / "applied"
    argv = ["apply", "--vector", str(vec), "--cp", str(moes["cp_fused"]), "--out", str(out), "--no-progress"]
    assert main([*argv, "--backend", "local"]) == 0
    cp = _load(moes["cp_fused"])
    vector = _fuse(_load(vec))
    for name, c in cp.items():
        want = (c.double() + vector[name].double()).float().to(torch.bfloat16)
        assert torch.equal(_load(out)[name].view(torch.int16), want.view(torch.int16)), name


def _recipe(moes: dict, cp: str, vectors: str, exclude: tuple[str, ...] = ()) -> Recipe:
    target = Target("t", str(moes[f"cp_{cp}"]), "unused", (1.0,), exclude=exclude)
    return Recipe(vectors=(Vector(str(moes[f"chat_{vectors}"]), str(moes[f"base_{vectors}"])),), targets=(target,))


def test_exclusion_is_by_cp_names_and_never_splits_an_expert_block(moes):
    """Excluding CP's fused tensors keeps them; a pattern that matches only the vectors' per-expert names (which
    would leave CP's fused tensor merged from the other experts) is refused, naming the tensor."""
    planned = plan(_recipe(moes, "fused", "split", (r"layers\.0\.mlp\.experts\.",)))
    rules = {p.tensor.name: (p.tensor.rule, p.tensor.reason) for p in planned.targets[0].layout.tensors}
    assert rules["model.layers.0.mlp.experts.gate_up_proj"] == ("copy", "excluded")
    assert rules["model.layers.1.mlp.experts.gate_up_proj"] == ("merge", "experts:mapped")
    assert rules["model.layers.1.mlp.gate.weight"] == ("merge", "")
    with pytest.raises(PlanError, match="exclude by the reference's names") as e:
        plan(_recipe(moes, "fused", "split", (r"experts\.2\.up_proj",)))
    assert e.value.tensor is not None and e.value.tensor.endswith("experts.2.up_proj.weight")
    with pytest.raises(PlanError, match="exclude by the reference's names"):
        plan(_recipe(moes, "split", "fused", (r"experts\.gate_up_proj",)))


def test_mapped_sources_read_every_shard_of_the_experts(moes):
    """A fused tensor read from per-expert tensors over several shards: each file is an input of the job."""
    planned = plan(_recipe(moes, "fused", "split"))
    t = next(p.tensor for p in planned.targets[0].layout.tensors if p.tensor.name.endswith("0.mlp.experts.down_proj"))
    src = t.terms[0].plus
    assert len(src.segments) == EXPERTS and sum(n for _, _, n in src.segments) == t.numel
    assert len(src.files) > 1 and set(src.files) <= {str(p) for p in moes["chat_split"].glob("*.safetensors")}


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a checkpoint folder with its tensors passed through `change` (one shard)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(change(_load(src)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_transposed_or_incomplete_experts_are_refused(moes, tmp_path):
    """A fused layout other than transformers' (here transposed, as GPT-OSS and Llama 4 store theirs) or experts
    missing are refused with the file and tensor, before any work, and with no hint that would half merge."""

    def transposed(t):
        return {n: (v.transpose(1, 2).contiguous() if "experts." in n and v.dim() == 3 else v) for n, v in t.items()}

    for name in ("base", "chat"):
        moes = dict(moes, **{f"{name}_x": _rewrite(moes[f"{name}_fused"], tmp_path / f"{name}_t", transposed)})
    recipe = Recipe(
        vectors=(Vector(str(moes["chat_x"]), str(moes["base_x"])),),
        targets=(Target("t", str(moes["cp_split"]), "unused", (1.0,)),),
    )
    with pytest.raises(PlanError, match=r"transposed or interleaved layout.*cannot be mapped exactly") as e:
        plan(recipe)
    assert "exclude" not in str(e.value) and e.value.tensor == "model.layers.0.mlp.experts.gate_up_proj"

    def fewer(t):
        return {n: v for n, v in t.items() if ".experts.3." not in n}

    few = _rewrite(moes["base_split"], tmp_path / "few", fewer)
    recipe = Recipe(
        vectors=(Vector(str(moes["chat_split"]), str(few)),),
        targets=(Target("t", str(moes["cp_fused"]), "unused", (1.0,)),),
    )
    with pytest.raises(PlanError, match=r"4 experts expected, .* but expert 3's down projection is missing") as e:
        plan(recipe)
    assert e.value.file == str(few) and "exclude" not in str(e.value)


def test_mixtral_router_and_experts_map_to_the_fused_names(tmp_path):
    """Mixtral ships `block_sparse_moe.experts.N.w1/w3/w2` and `block_sparse_moe.gate`; transformers fuses them
    into `mlp.experts.*` and `mlp.gate`. A fused CP gets per-expert vectors, router included, and loads; a
    per-expert CP gets fused vectors."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=64,
    )
    dirs = {}
    for seed, name in enumerate(("base", "chat", "cp")):
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config).to(torch.bfloat16)
        for layout in ("split", "fused"):
            dirs[name, layout] = tmp_path / f"{name}_{layout}"
            model.save_pretrained(dirs[name, layout], save_original_format=layout == "split")

    def merge(out: Path, cp: str, vectors: str) -> None:
        argv = ["merge", "--base", str(dirs["base", vectors]), "--chat", str(dirs["chat", vectors])]
        argv += ["--cp", str(dirs["cp", cp]), "--out", str(out), "--no-progress", "--backend", "local"]
        assert main(argv) == 0

    out = tmp_path / "out"
    merge(out, "fused", "split")
    base, chat, cp = _load(dirs["base", "split"]), _load(dirs["chat", "split"]), _load(dirs["cp", "fused"])
    p = "model.layers.0.block_sparse_moe"

    def fused(t: dict) -> dict:
        got = {k.replace(".block_sparse_moe.gate.", ".mlp.gate."): v for k, v in t.items() if ".experts." not in k}
        got["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([t[f"{p}.experts.{e}.w1.weight"], t[f"{p}.experts.{e}.w3.weight"]]) for e in range(2)]
        )
        got["model.layers.0.mlp.experts.down_proj"] = torch.stack([t[f"{p}.experts.{e}.w2.weight"] for e in range(2)])
        return got

    expected = _expected(cp, fused(chat), fused(base))
    _assert_bytes(_load(out), expected)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    model, info = MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, param in model.named_parameters():
        assert torch.equal(param.detach().view(torch.int16), expected[name].view(torch.int16)), name
    merge(tmp_path / "out_split", "split", "fused")
    assert set(_load(tmp_path / "out_split")) == set(_load(dirs["cp", "split"]))
    _assert_bytes(fused(_load(tmp_path / "out_split")), expected)
