"""Chat-template token rows (`--special-tokens`): CP's embedding and LM head rows of the chat tokens become the chat
model's, against a float64 reference written here, with token ids from real tokenizer files (transformers reads
them), the same bytes for any worker count, backend, unit size, device and after a resume."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_llama
from test_e2e import load_all, shard_bytes

import chatvec_dist as cv
from chatvec_dist.cli import main
from chatvec_dist.demo import CHAT_TEMPLATE, ENGLISH, NEW_LANGUAGE, demo_tokens, save_generation_config, save_tokenizer
from chatvec_dist.errors import ChatvecError
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.recipe.file import dump_recipe, load_recipe, recipe_from_dict

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
CHAT_TOKENS = demo_tokens(96)  # the specials at 0-6, then English words
# CP: the new language's 64 words added, and the chat tokens at the end: other ids than the chat model's
CP_TOKENS = ["<unk>", "<s>", "</s>", *ENGLISH[:89], *NEW_LANGUAGE, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
UNIT = "168"  # bytes: 84 bfloat16 elements, so units and hash blocks cut token rows (64 elements) in two


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokens")
    base = make_llama(root / "base", 10)
    make_llama(root / "chat", 11, base=base)
    make_llama(root / "cp", 12, vocab=len(CP_TOKENS), base=base)
    for name, tokens in (("base", CHAT_TOKENS), ("chat", CHAT_TOKENS), ("cp", CP_TOKENS)):
        save_tokenizer(root / name, tokens, CHAT_TEMPLATE if name == "chat" else None)
        save_generation_config(root / name, [2, 6] if name == "chat" else 2)  # chat's turns end with <|end|> too
    return {n: root / n for n in ("base", "chat", "cp")}


def args(models: dict, out: Path, *extra: str) -> list[str]:
    paths = ["--base", str(models["base"]), "--chat", str(models["chat"]), "--cp", str(models["cp"])]
    return ["merge", *paths, "--out", str(out), "--no-progress", "--backend", "local", *extra]


def template_map(models: dict) -> dict[int, int]:
    """CP id → chat id of the tokens the chat template names literally (`<|{{ role }}|>` names none), eos and
    bos, as transformers reads both tokenizers."""
    from transformers import AutoTokenizer

    chat, cp = (AutoTokenizer.from_pretrained(models[n]) for n in ("chat", "cp"))
    tokens = ["<|assistant|>", "<|end|>", chat.eos_token, chat.bos_token]
    return {cp.convert_tokens_to_ids(t): chat.convert_tokens_to_ids(t) for t in tokens}


def reference(models: dict, rows: dict[int, int], vocab: str = "skip", dtype=torch.bfloat16) -> dict:
    """float64: cp + (chat − base) (the vocabulary tensors: CP's, or the shared rows merged), then CP's rows of
    the map replaced by the chat model's; rounded to `dtype` through float32, as torch converts."""
    cp, chat, base = (load_all(models[n]) for n in ("cp", "chat", "base"))
    out = {}
    for name, c in cp.items():
        o = c.double().numpy().copy()
        delta = chat[name].double().numpy() - base[name].double().numpy()
        if name not in VOCAB:
            o += delta
        elif vocab == "overlap":
            o[: delta.shape[0]] += delta
        for cp_id, chat_id in rows.items():
            if name in VOCAB:
                o[cp_id] = chat[name][chat_id].double().numpy()
        out[name] = torch.from_numpy(o).to(torch.float32).to(dtype)
    return out


def assert_bits_equal(out: Path, expected: dict) -> None:
    got = load_all(out)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name


@pytest.fixture(scope="module")
def auto_out(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("auto") / "out"
    extra = ("--special-tokens", "auto", "--workers", "2", "--unit-size", UNIT, "--chat-template-from-chat")
    assert main(args(models, out, *extra)) == 0
    return out


def test_auto_takes_the_chat_template_rows_as_the_reference_does(models, auto_out):
    rows = template_map(models)
    assert rows == {158: 5, 159: 6, 2: 2, 1: 1}  # the tokenizers as written: CP's chat tokens at other ids
    expected = reference(models, rows)
    assert_bits_equal(auto_out, expected)
    assert verify(auto_out) == []

    table, meta = read_manifest(auto_out)
    assert meta["special_tokens"] == [
        {"cp": 1, "chat": 1, "token": "<s>"},
        {"cp": 2, "chat": 2, "token": "</s>"},
        {"cp": 158, "chat": 5, "token": "<|assistant|>"},
        {"cp": 159, "chat": 6, "token": "<|end|>"},
    ]
    cp = load_all(models["cp"])
    for r in table.to_pylist():
        assert r["token_rows"] == (4 if r["tensor"] in VOCAB else 0), r["tensor"]
        if r["tensor"] in VOCAB:  # copies of CP (vocab:skip) but for the rows: their update is measured
            c, o = cp[r["tensor"]].double(), expected[r["tensor"]].double()
            assert r["rule"] == "copy" and r["reason"] == "vocab:skip"
            assert r["rel_update"] == pytest.approx(
                float((o - c).norm() / c.norm()), rel=1e-6
            )  # the kernel sums in float32
            assert r["cp_norm"] == pytest.approx(float(c.norm()), rel=1e-6)  # the kernel sums in float32
            assert r["nan_count"] == 0 and r["inf_count"] == 0
    assert "Token rows taken from the chat model" in (auto_out / "README.md").read_text()


def test_the_output_loads_in_transformers_and_its_chat_tokens_are_the_chat_models(models, auto_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(auto_out), AutoTokenizer.from_pretrained(auto_out)
    chat = AutoModelForCausalLM.from_pretrained(models["chat"])
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    end, assistant = tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|assistant|>")
    assert (end, assistant) == (159, 158) and ids[-1] == assistant and end in ids
    for got, want in ((model.get_input_embeddings(), chat.get_input_embeddings()), (model.lm_head, chat.lm_head)):
        assert torch.equal(got.weight[159], want.weight[6]) and torch.equal(got.weight[158], want.weight[5])
    with torch.no_grad():
        model(torch.tensor([ids]))  # runs
    generation = json.loads((auto_out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, end]  # chat's end-of-turn id [2, 6], as CP's ids


def test_same_bytes_for_workers_backends_unit_sizes_and_after_a_resume(models, auto_out, tmp_path, monkeypatch):
    from chatvec_dist.exec import worker

    one = tmp_path / "one"
    assert main(args(models, one, "--special-tokens", "auto", "--workers", "1", "--unit-size", UNIT)) == 0
    whole = tmp_path / "whole"
    assert main(args(models, whole, "--special-tokens", "auto", "--workers", "2")) == 0  # 64 MiB units
    real_run, calls = worker.UnitRunner.run, []

    def failing(self, unit):
        calls.append(unit.id)
        if len(calls) > 40:
            raise KeyboardInterrupt
        return real_run(self, unit)

    resumed = tmp_path / "resumed"
    resume_args = args(models, resumed, "--special-tokens", "auto", "--workers", "1", "--unit-size", UNIT)
    monkeypatch.setattr(worker.UnitRunner, "run", failing)
    assert main(resume_args) == 130 and not resumed.exists()
    monkeypatch.setattr(worker.UnitRunner, "run", real_run)
    assert main(resume_args) == 0
    for out in (one, whole, resumed):
        assert shard_bytes(out) == shard_bytes(auto_out) and verify(out) == []


def test_a_ray_run_gives_the_same_bytes(models, auto_out, ray_local, tmp_path):
    out = tmp_path / "ray"
    argv = [a if a != "local" else "ray" for a in args(models, out, "--special-tokens", "auto", "--unit-size", UNIT)]
    assert main([*argv, "--workers", "2"]) == 0
    assert shard_bytes(out) == shard_bytes(auto_out)


def test_the_gpu_worker_path_gives_the_same_bytes(models, auto_out, tmp_path, monkeypatch):
    """TritonCompute (on the GPU, or interpreted on CPU tensors): the rows go into the host buffer it copies back."""
    pytest.importorskip("triton")
    from chatvec_dist.exec import worker
    from chatvec_dist.exec.compute import TritonCompute

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    monkeypatch.setattr(worker, "make_compute", lambda d, strict: TritonCompute(device))
    out = tmp_path / "triton"
    assert main(args(models, out, "--special-tokens", "auto", "--workers", "1", "--unit-size", "8KiB")) == 0
    assert shard_bytes(out) == shard_bytes(auto_out)
    want = {r["tensor"]: r for r in read_manifest(auto_out)[0].to_pylist()}
    for r in read_manifest(out)[0].to_pylist():
        assert r["rel_update"] == pytest.approx(want[r["tensor"]]["rel_update"], rel=1e-5), r["tensor"]


def test_a_map_file_with_overlap_and_float16_output(models, tmp_path):
    """An explicit map (a CP row past the chat vocabulary, a shared row, a row the vectors merge) with --vocab
    overlap: rows the vectors reach are replaced too; the chat rows are converted to float16 as torch converts."""
    rows = {157: 4, 20: 30, 3: 3}
    (tmp_path / "map.json").write_text(json.dumps({str(k): v for k, v in rows.items()}))
    out = tmp_path / "out"
    extra = ("--special-tokens", str(tmp_path / "map.json"), "--vocab", "overlap", "--dtype", "float16")
    assert main(args(models, out, *extra, "--unit-size", UNIT, "--workers", "2")) == 0
    assert_bits_equal(out, reference(models, rows, "overlap", torch.float16))
    table, meta = read_manifest(out)
    assert meta["special_tokens"] == [{"cp": c, "chat": h, "token": None} for c, h in sorted(rows.items())]
    assert {r["tensor"]: r["token_rows"] for r in table.to_pylist() if r["token_rows"]} == dict.fromkeys(VOCAB, 3)
    recorded = recipe_from_dict(meta["recipe"])
    assert recorded.targets[0].special_tokens == ((3, 3), (20, 30), (157, 4))


def test_a_float32_chat_row_is_rounded_to_cp_dtype(models, tmp_path):
    """chat and base in float32, CP in bfloat16: a chat row goes to bfloat16 rounded to nearest even."""
    from safetensors.torch import load_file, save_file

    for name in ("chat", "base"):
        shutil.copytree(models[name], tmp_path / name)
        f = tmp_path / name / "model.safetensors"
        save_file({k: v.float() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    mixed = {"cp": models["cp"], "chat": tmp_path / "chat", "base": tmp_path / "base"}
    chat = load_all(mixed["chat"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # float32 values that bfloat16 cannot hold: each row must round
        for name in VOCAB:
            chat[name][5] = torch.randn(chat[name].shape[1], generator=g)
    save_file(chat, mixed["chat"] / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(args(mixed, out, "--special-tokens", "auto", "--unit-size", UNIT)) == 0
    expected = reference(mixed, template_map(mixed))
    assert_bits_equal(out, expected)
    row = chat["lm_head.weight"][5]
    assert not torch.equal(row.to(torch.bfloat16).float(), row)  # rounding happened, and matched


def test_tied_embeddings_take_the_rows_once(tmp_path):
    base = make_llama(tmp_path / "base", 20, tie=True)
    make_llama(tmp_path / "chat", 21, tie=True, base=base)
    make_llama(tmp_path / "cp", 22, tie=True, vocab=120, base=base)
    d = {n: str(tmp_path / n) for n in ("base", "chat", "cp")}
    planned = cv.plan(cv.make_recipe(d["base"], d["chat"], d["cp"], str(tmp_path / "o"), special_tokens={100: 7}))
    with_rows = {p.tensor.name: p.tensor for p in planned.targets[0].layout.tensors if p.tensor.rows}
    assert list(with_rows) == ["model.embed_tokens.weight"]
    t = with_rows["model.embed_tokens.weight"]
    assert t.rows == ((100, 7),) and t.row_src is not None and t.row_src.path.startswith(d["chat"])
    out = tmp_path / "o"
    cv.run(cv.make_recipe(d["base"], d["chat"], d["cp"], str(out), special_tokens={100: 7}), _local())
    got, chat, cp = (load_all(Path(p)) for p in (out, d["chat"], d["cp"]))
    emb = "model.embed_tokens.weight"
    want = cp[emb].clone()
    want[100] = chat[emb][7]
    assert torch.equal(got[emb], want) and "lm_head.weight" not in got


def _local() -> cv.RunOptions:
    return cv.RunOptions(backend="local", workers=1, progress=False)


def test_the_plan_shows_the_rows(models, capsys):
    plan = ["plan", *args(models, Path("x"))[1:7], "--special-tokens", "auto"]
    assert main(plan) == 0
    shown = capsys.readouterr().out
    assert "special tokens: CP row ← chat row: <s> 1←1, </s> 2←2, <|assistant|> 158←5, <|end|> 159←6" in shown
    assert "lm_head.weight: copy (vocab:skip, shape [160, 32], merged elements 0, 4 token rows from chat)" in shown


@pytest.mark.parametrize(
    ("map_", "message"),
    [
        ({"160": 1}, "special token id 160 is out of range: CP has 160 rows"),
        ({"1": 96}, "special token id 96 is out of range: the chat model has 96 rows"),
    ],
)
def test_an_id_out_of_range_is_a_one_line_error(models, tmp_path, capsys, map_, message):
    (tmp_path / "map.json").write_text(json.dumps(map_))
    assert main(args(models, tmp_path / "o", "--special-tokens", str(tmp_path / "map.json"))) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert any(f"tensor '{name}'" in err for name in VOCAB)
    assert not (tmp_path / "o").exists()


def test_a_token_cp_lacks_is_a_one_line_error(models, tmp_path, capsys):
    cp = tmp_path / "cp"
    shutil.copytree(models["cp"], cp)
    save_tokenizer(cp, [t if t != "<|end|>" else "kata" for t in CP_TOKENS])
    assert main(args({**models, "cp": cp}, tmp_path / "o", "--special-tokens", "auto")) == 2
    err = capsys.readouterr().err.strip()
    assert "CP's tokenizer lacks the chat model's token '<|end|>'" in err and str(cp / "tokenizer.json") in err
    assert len(err.splitlines()) == 1


def test_a_token_the_chat_tokenizer_lacks_is_a_one_line_error(models, tmp_path, capsys):
    chat = tmp_path / "chat"
    shutil.copytree(models["chat"], chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<eos>"}))
    (chat / "chat_template.jinja").write_text(CHAT_TEMPLATE + "{{ eos_token }}")  # read before tokenizer_config's
    assert main(args({**models, "chat": chat}, tmp_path / "o", "--special-tokens", "auto")) == 2
    err = capsys.readouterr().err.strip()
    assert "the chat model's token '<eos>' has no id" in err and str(chat / "tokenizer.json") in err
    assert len(err.splitlines()) == 1


def test_a_chat_model_without_template_tokens_is_refused(models, tmp_path, capsys):
    chat = tmp_path / "chat"
    shutil.copytree(models["chat"], chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    for key in ("chat_template", "eos_token", "bos_token"):
        config.pop(key)
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(args({**models, "chat": chat}, tmp_path / "o", "--special-tokens", "auto")) == 2
    assert "the chat model has no chat template, eos or bos token" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", "not valid JSON"), ('{"a": 1}', "expected a JSON object of token ids"), ("[1]", "expected a JSON")],
)
def test_a_bad_map_file_is_a_one_line_error(models, tmp_path, capsys, text, message):
    (tmp_path / "map.json").write_text(text)
    assert main(args(models, tmp_path / "o", "--special-tokens", str(tmp_path / "map.json"))) == 2
    err = capsys.readouterr().err
    assert message in err and "map.json" in err and len(err.strip().splitlines()) == 1


def test_recipe_rules_and_round_trips(models, tmp_path):
    recipe = cv.make_recipe(models["base"], models["chat"], models["cp"], tmp_path / "o", special_tokens={9: 2, 3: 1})
    assert recipe.targets[0].special_tokens == ((3, 1), (9, 2))
    for tokens in ("auto", ((3, 1), (9, 2))):
        r = cv.make_recipe(models["base"], models["chat"], models["cp"], tmp_path / "o", special_tokens=tokens)
        (tmp_path / "r.yaml").write_text(dump_recipe(r))
        assert load_recipe(tmp_path / "r.yaml") == r
    assert "special_tokens:\n    3: 1\n    9: 2\n" in dump_recipe(recipe)
    bad = [
        ({5: 1, -1: 2}, "give 'auto' or a map of CP token ids to chat token ids"),
        ("all", "give 'auto' or a map"),
        (((5, 1), (5, 2)), "maps CP token(s) 5 more than once"),
        ({}, "give 'auto' or a map"),
    ]
    for tokens, message in bad:
        with pytest.raises(ChatvecError, match=re.escape(message)):
            cv.make_recipe(models["base"], models["chat"], models["cp"], tmp_path / "o", special_tokens=tokens)
    with pytest.raises(ChatvecError, match="extracted vector"):
        cv.make_recipe(None, models["chat"], models["cp"], tmp_path / "o", special_tokens="auto")


def test_a_recipe_file_gives_the_field_and_line(models, tmp_path):
    text = dump_recipe(cv.make_recipe(models["base"], models["chat"], models["cp"], tmp_path / "o"))
    (tmp_path / "r.yaml").write_text(text.replace("special_tokens: null", "special_tokens: {1: x}"))
    with pytest.raises(ChatvecError, match=r"r.yaml:\d+.*targets\[0\].special_tokens': expected int, got 'x'"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text(text.replace("special_tokens: null", "special_tokens: {1: 2, 1: 3}"))
    with pytest.raises(ChatvecError, match=r"special_tokens': special_tokens maps CP token\(s\) 1 more than once"):
        load_recipe(tmp_path / "r.yaml")


def test_inspect_shows_the_rows_and_its_recipe_runs_the_same_job_again(models, auto_out, tmp_path, capsys):
    assert main(["inspect", str(auto_out)]) == 0
    assert "token rows from the chat model (CP row ← chat row): <s> 1←1, </s> 2←2, <|assistant|> 158←5" in (
        capsys.readouterr().out
    )
    assert main(["inspect", str(auto_out), "--recipe"]) == 0
    (tmp_path / "r.yaml").write_text(capsys.readouterr().out)
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.targets[0].special_tokens == "auto"
    assert main(["run", str(tmp_path / "r.yaml"), "--backend", "local", "--no-progress"]) == 0
    assert "already committed" in capsys.readouterr().err  # the same job: nothing redone


def test_transplant_stats_describe_what_is_written():
    """exec/rows.transplant: NaN written as the canonical quiet NaN, counted; norms in float64."""
    from chatvec_dist.exec.rows import transplant

    out = torch.zeros(4, dtype=torch.bfloat16)
    cp = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    chat = torch.tensor([float("nan"), math.inf, 1.0, 1.00390625], dtype=torch.float32)
    stats = transplant(out, cp, chat)
    assert out.view(torch.int16)[0] == 0x7FC0 and math.isinf(float(out[1])) and float(out[3]) == 1.0
    assert (stats.nan, stats.inf) == (1, 1) and stats.cp_sq == pytest.approx(30.0)
    assert np.isnan(stats.update_sq)  # NaN − cp: the norm says so, as the kernels' does


def test_sources_in_an_object_store_give_the_same_bytes(models, auto_out, s3_server, tmp_path):
    """The tokenizers come from each s3:// source's side files; the rows by ranged reads."""
    from s3server import upload_folder

    urls = {n: upload_folder(s3_server, models[n], "tokens", f"v1/{n}") for n in ("base", "chat", "cp")}
    out = tmp_path / "out"
    assert main(args(urls, out, "--special-tokens", "auto", "--unit-size", "8KiB", "--workers", "2")) == 0
    assert shard_bytes(out) == shard_bytes(auto_out)
    assert read_manifest(out)[1]["special_tokens"] == read_manifest(auto_out)[1]["special_tokens"]
