"""Features that landed apart, used together: each test a combination that once went wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file, save_file
from test_dare import np_keep
from test_experts import moes  # noqa: F401  (the fixture)
from test_fp8 import QUANT, quantize, to_fp8
from test_source_digests import rewrite_manifest
from test_special_tokens import UNIT as TOKENS_UNIT
from test_special_tokens import args as tokens_args
from test_special_tokens import models as tokens_models  # noqa: F401  (the fixture)
from test_special_tokens import template_map
from test_vocab_seq2seq import make as make_seq2seq
from test_vocab_seq2seq import merge as merge_seq2seq

from chatvec_dist.cli import main
from chatvec_dist.demo import save_checkpoint
from chatvec_dist.io.header import read_header
from chatvec_dist.output.manifest import MANIFEST_NAME, META_KEY
from chatvec_dist.output.verify import verify


def _flip_byte(directory: Path, tensor: str, element: int) -> Path:
    """Flip one bit of `tensor`'s element in whichever shard of `directory` holds it; that shard's path."""
    for f in sorted(directory.glob("*.safetensors")):
        info = read_header(f)[0].get(tensor)
        if info is None:
            continue
        with open(f, "r+b") as fh:
            fh.seek(info.start + 2 * element)
            b = fh.read(1)
            fh.seek(info.start + 2 * element)
            fh.write(bytes([b[0] ^ 1]))
        return f
    raise AssertionError(tensor)


def test_verify_sources_rereads_experts_mapped_from_the_other_layout(moes, tmp_path):  # noqa: F811
    """Vectors stored per expert over two shards, CP fused: each fused source is recorded as its segments, so
    --sources rereads the bytes the merge read (it once read the first segment's file on from its offset), and a
    changed byte of a later expert is found."""
    chat = tmp_path / "chat"
    shutil.copytree(moes["chat_split"], chat)
    out = tmp_path / "out"
    paths = ["--base", str(moes["base_split"]), "--chat", str(chat), "--cp", str(moes["cp_fused"])]
    assert main(["merge", *paths, "--out", str(out), "--no-progress", "--backend", "local"]) == 0
    assert verify(out, sources=True) == []
    shard = _flip_byte(chat, "model.layers.1.mlp.experts.3.up_proj.weight", 5)
    lines = verify(out, sources=True)
    assert any(
        line.startswith(f"{chat}/") and "'model.layers.1.mlp.experts.gate_up_proj' (chat[0]) differs" in line
        for line in lines
    ), lines
    assert any(str(shard) in line for line in lines), lines


def test_a_manifest_written_before_segments_still_verifies(moes, tmp_path):  # noqa: F811
    """Source digests as first written (no `segments` field) read as they were: the output verifies."""
    out = tmp_path / "out"
    paths = ["--base", str(moes["base_fused"]), "--chat", str(moes["chat_fused"]), "--cp", str(moes["cp_fused"])]
    assert main(["merge", *paths, "--out", str(out), "--no-progress", "--backend", "local"]) == 0
    table = pq.read_table(out / MANIFEST_NAME)
    meta = json.loads(table.schema.metadata[META_KEY])
    index = table.schema.get_field_index("source_digests")
    old = pa.list_(pa.struct([f for f in table.schema.field(index).type.value_type if f.name != "segments"]))
    cells = [[{k: v for k, v in e.items() if k != "segments"} for e in c] for c in table.column(index).to_pylist()]
    rewrite_manifest(out, table.set_column(index, "source_digests", pa.array(cells, old)), meta)
    assert pq.read_table(out / MANIFEST_NAME).schema.field(index).type == old
    assert verify(out, sources=True) == []


@pytest.fixture(scope="module")
def fp8_vocab(tmp_path_factory) -> Path:
    """base, chat and cp whose embedding is a block-scaled FP8 weight (2 × 1 blocks of 128 × 128)."""
    root = tmp_path_factory.mktemp("fp8_vocab")
    rng = np.random.default_rng(0)
    first = rng.standard_normal((256, 128)) * 0.1
    for name, noise in (("base", 0.0), ("chat", 1e-2), ("cp", 2e-2)):
        q, s = quantize((first + rng.standard_normal(first.shape) * noise).astype(np.float32))
        tensors = {
            "model.embed_tokens.weight": to_fp8(q),
            "model.embed_tokens.weight_scale_inv": torch.from_numpy(s),
            "model.norm.weight": torch.ones(128, dtype=torch.bfloat16),
        }
        save_checkpoint(root / name, tensors, {"model_type": "llama", "quantization_config": QUANT})
    (root / "map.json").write_text(json.dumps({"3": 5}))
    return root


@pytest.mark.parametrize("vocab", ["full", "skip"])
def test_token_rows_into_a_block_scaled_fp8_embedding_are_refused(fp8_vocab, tmp_path, capsys, vocab):
    """A chat row's FP8 values mean nothing under CP's block scales: refused in one line naming the embedding
    (it was silently left as merged with `full`, and `skip` blamed the scale tensor's 2 rows)."""
    paths = [f"--{n}={fp8_vocab / n}" for n in ("base", "chat", "cp")]
    extra = ["--special-tokens", str(fp8_vocab / "map.json"), "--vocab", vocab]
    assert main(["merge", *paths, "--out", str(tmp_path / "o"), "--no-progress", "--backend", "local", *extra]) == 2
    err = capsys.readouterr().err
    assert f"{fp8_vocab / 'cp'}/model.safetensors: tensor 'model.embed_tokens.weight': special_tokens into a " in err
    assert "block-scaled FP8 tensor are not supported yet" in err
    assert not (tmp_path / "o").exists()


def test_alpha_rules_match_cps_names_of_mapped_experts(moes, tmp_path, capsys):  # noqa: F811
    """CP fused, vectors per expert: a rule written for the vectors' per-expert names picks no output tensor and
    is refused (it was a silent no-op); one for CP's fused names sets their alphas."""
    paths = ["--base", str(moes["base_split"]), "--chat", str(moes["chat_split"]), "--cp", str(moes["cp_fused"])]
    run = ["merge", *paths, "--no-progress", "--backend", "local"]
    assert main([*run, "--out", str(tmp_path / "a"), "--alpha-rule", r"experts\.\d+\.down_proj=0"]) == 2
    assert "alpha rule 'experts\\\\.\\\\d+\\\\.down_proj' matches no tensor of target 'a'" in capsys.readouterr().err
    out = tmp_path / "b"
    assert main([*run, "--out", str(out), "--alpha-rule", r"experts\.down_proj=0"]) == 0
    got, cp = _tensors(out), _tensors(moes["cp_fused"])
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.experts"
        assert torch.equal(got[f"{name}.down_proj"], cp[f"{name}.down_proj"])  # cp + 0·Δ
        assert not torch.equal(got[f"{name}.gate_up_proj"], cp[f"{name}.gate_up_proj"])


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_token_rows_into_cps_stored_head_come_from_a_tied_chat_embedding(tmp_path):
    """Tied chat and base (no `lm_head`), CP storing its head: CP's head row takes the chat model's head row, its
    input embedding's (this crashed with a KeyError); float64 reference here."""
    base = make_llama(tmp_path / "base", 0, tie=True)
    chat = make_llama(tmp_path / "chat", 1, base=base, tie=True)
    cp = make_llama(tmp_path / "cp", 2, base=base, tie=True)
    cp["lm_head.weight"] = cp["model.embed_tokens.weight"] + 0.01 * torch.randn(cp["lm_head.weight"].shape)
    cp = {k: v.to(torch.bfloat16) for k, v in cp.items()}
    save_file(cp, str(tmp_path / "cp" / "model.safetensors"), {"format": "pt"})
    (tmp_path / "map.json").write_text(json.dumps({"3": 5, "7": 1}))
    paths = [f"--{n}={tmp_path / n}" for n in ("base", "chat", "cp")]
    extra = ["--special-tokens", str(tmp_path / "map.json"), "--no-progress", "--backend", "local"]
    assert main(["merge", *paths, "--out", str(tmp_path / "o"), *extra]) == 0
    got = _tensors(tmp_path / "o")
    embed = "model.embed_tokens.weight"
    delta = chat[embed].double() - base[embed].double()
    for name in (embed, "lm_head.weight"):
        want = cp[name].double() + delta
        want[3], want[7] = chat[embed][5].double(), chat[embed][1].double()
        assert torch.equal(got[name].view(torch.int16), want.float().to(torch.bfloat16).view(torch.int16)), name


@pytest.mark.parametrize("vocab", ["skip", "overlap"])
def test_token_rows_of_bart_take_final_logits_bias_elements(tmp_path, vocab):
    """BART's final_logits_bias [1, V] has its tokens on the last dimension: the chat token's element is taken
    there (every special_tokens merge of a BART once failed: 'CP has 1 rows'); float64 reference here."""
    base = make_seq2seq("bart", tmp_path / "base", 0, 40)
    chat = make_seq2seq("bart", tmp_path / "chat", 1, 40, base)
    cp = make_seq2seq("bart", tmp_path / "cp", 2, 56, base)
    (tmp_path / "map.json").write_text(json.dumps({"50": 5, "3": 7}))
    models = {n: tmp_path / n for n in ("base", "chat", "cp")}
    assert merge_seq2seq(models, tmp_path / "o", "--special-tokens", str(tmp_path / "map.json"), "--vocab", vocab) == 0
    got = _tensors(tmp_path / "o")
    for name in ("model.shared.weight", "final_logits_bias"):
        want = cp[name].double().clone()
        last = name == "final_logits_bias"
        want, c, b = (x.T if last else x for x in (want, chat[name].double(), base[name].double()))  # tokens first
        if vocab == "overlap":
            want[:40] += c - b
        want[50], want[3] = c[5], c[7]
        want = want.T if last else want
        assert torch.equal(got[name].view(torch.int32), want.float().view(torch.int32)), name


def test_the_card_says_when_dare_and_ties_changed_the_formula(llamas, tmp_path):
    """The card's `out = cp + Σ alpha_i · (chat_i − base_i)` is not what DARE and TIES compute: it says so."""
    paths = [f"--{n}={llamas[n]}" for n in ("base", "chat", "cp")]
    run = ["merge", *paths, "--no-progress", "--backend", "local"]
    assert main([*run, "--out", str(tmp_path / "plain")]) == 0
    assert main([*run, "--out", str(tmp_path / "sparse"), "--dare", "0.5:3", "--ties", "0.25"]) == 0
    plain, sparse = ((tmp_path / n / "README.md").read_text() for n in ("plain", "sparse"))
    assert "DARE" not in plain and "TIES" not in plain
    assert "\nDARE: each Δ element kept at random, rescaled by 1/density (vector 0: density 0.5).\n" in sparse
    assert "\nTIES density 0.25: each vector trimmed to its largest magnitudes, a sign elected per element, " in sparse
    assert "added by alpha and divided by the sum of their alphas. The manifest's `density`" in sparse


def test_inspect_shows_what_dare_and_ties_kept(llamas, tmp_path):
    """`chatvec inspect` reports the manifest's `density` and `sign_agreement` columns (it showed neither)."""
    from chatvec_dist.output.inspection import report

    paths = [f"--{n}={llamas[n]}" for n in ("base", "chat", "cp")]
    out = tmp_path / "o"
    extra = ["--dare", "0.5:3", "--ties", "0.5", "--no-progress", "--backend", "local"]
    assert main(["merge", *paths, "--out", str(out), *extra]) == 0
    rows = pq.read_table(out / MANIFEST_NAME).to_pylist()
    kept = [r["density"][0] for r in rows if r["density"]]
    agree = sorted(r["sign_agreement"] for r in rows if r["sign_agreement"] is not None)
    assert len(kept) == len(agree) == sum(r["rule"] == "merge" for r in rows) > 0
    lines = report(out).splitlines()
    assert any(
        line.startswith(f"kept by DARE/TIES (share of merged elements, over {len(kept)} tensors)") for line in lines
    )
    assert f"vector 0 {min(kept):.3f}–{max(kept):.3f}" in report(out)
    assert f"TIES sign agreement: {agree[0]:.3f}–{agree[-1]:.3f}, median {float(np.median(agree)):.3f}" in lines
    assert main(["merge", *paths, "--out", str(tmp_path / "plain"), "--no-progress", "--backend", "local"]) == 0
    assert "DARE/TIES" not in report(tmp_path / "plain") and "sign agreement" not in report(tmp_path / "plain")


def test_vectors_given_one_seed_draw_one_mask_as_documented(llamas, tmp_path):
    """DARE hashes (seed, tensor, element), not the vector's place: one `--dare` for two vectors gives both the
    same mask (the same kept count in every tensor, as docs/recipes-and-api.md warns); seeds apart, masks apart."""
    pair = ["--base", str(llamas["base"]), "--chat", str(llamas["chat"])]
    run = ["merge", *pair, *pair, "--cp", str(llamas["cp"]), "--no-progress", "--backend", "local"]
    assert main([*run, "--out", str(tmp_path / "one"), "--dare", "0.5:4"]) == 0
    assert main([*run, "--out", str(tmp_path / "two"), "--dare", "0.5:4", "--dare", "0.5:5"]) == 0
    one, two = ([r["density"] for r in pq.read_table(tmp_path / n / MANIFEST_NAME).to_pylist()] for n in ("one", "two"))
    assert all(a == b for a, b in one) and len(one) > 10
    assert sum(a != b for a, b in two) > len(two) // 2


def test_a_copied_fp8_scale_is_not_listed_as_a_vocabulary_tensor(fp8_vocab, tmp_path):
    """The scales copied beside an FP8 embedding kept as CP's (`--vocab skip`) say whose they are; they took the
    weight's `vocab:skip` and were listed as a vocabulary tensor of shape [2, 1]."""
    from chatvec_dist.output.inspection import report

    paths = [f"--{n}={fp8_vocab / n}" for n in ("base", "chat", "cp")]
    out = tmp_path / "o"
    assert main(["merge", *paths, "--out", str(out), "--no-progress", "--backend", "local", "--vocab", "skip"]) == 0
    reasons = {r["tensor"]: r["reason"] for r in pq.read_table(out / MANIFEST_NAME).to_pylist()}
    assert reasons["model.embed_tokens.weight_scale_inv"] == "of model.embed_tokens.weight (vocab:skip)"
    assert "vocabulary: model.embed_tokens.weight [256, 128] → vocab:skip\n" in report(out)
    got, cp = _tensors(out), _tensors(fp8_vocab / "cp")
    assert all(
        torch.equal(got[n].view(torch.uint8), cp[n].view(torch.uint8)) for n in cp if n.startswith("model.embed")
    )


def test_token_rows_with_dare_and_an_extended_vocabulary_match_float64(tokens_models, tmp_path):  # noqa: F811
    """Chat-template rows, `--vocab overlap` and DARE in one merge, units cutting token rows: DARE's mask keeps
    the element index of the whole tensor in each run around a replaced row; float64 reference here."""
    out = tmp_path / "o"
    extra = ["--vocab", "overlap", "--special-tokens", "auto", "--dare", "0.5:9", "--unit-size", TOKENS_UNIT]
    assert main(tokens_args(tokens_models, out, "--workers", "2", *extra)) == 0
    rows = template_map(tokens_models)
    cp, chat, base = (_tensors(tokens_models[n]) for n in ("cp", "chat", "base"))
    got = _tensors(out)
    assert set(got) == set(cp)
    for name, c in cp.items():
        merged = chat[name].numel()  # the rows chat and base share (all of them outside the vocabulary)
        keep = np_keep(9, name, 0.5, 0, merged)
        flat = c.flatten().double().numpy().copy()
        delta = chat[name].flatten().double().numpy() - base[name].flatten().double().numpy()
        flat[:merged] += np.where(keep, delta, 0.0) / 0.5
        want = torch.from_numpy(flat).view(c.shape)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            for cp_id, chat_id in rows.items():
                want[cp_id] = chat[name][chat_id].double()
        assert torch.equal(got[name].view(torch.int16), want.to(torch.bfloat16).view(torch.int16)), name
