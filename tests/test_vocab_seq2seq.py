"""Vocabulary tensors beyond decoder-only models: T5/BART's `shared.weight`, BART's `final_logits_bias` [1, V]
under --vocab skip|overlap, and a tied CP that stores its `lm_head.weight` too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvec_dist.cli import main
from chatvec_dist.output.manifest import read_manifest

V, V_CP = 64, 80  # base/chat vocabulary, CP's extended one


def t5_config(vocab: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)


def bart_config(vocab: int):
    from transformers import BartConfig

    return BartConfig(
        vocab_size=vocab,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )


def make(kind: str, directory: Path, seed: int, vocab: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A tiny model saved by transformers; with `base`, base's values (on the elements both have) plus noise, and a
    random final_logits_bias (a zero buffer when fresh)."""
    from transformers import BartForConditionalGeneration, T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = (
        T5ForConditionalGeneration(t5_config(vocab))
        if kind == "t5"
        else BartForConditionalGeneration(bart_config(vocab))
    )
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if base is not None and name in base:
                both = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, base[name].shape))
                t[both] = base[name][both]
            if name == "final_logits_bias" or base is not None:
                t.add_(0.02 * torch.randn(t.shape))
    model.save_pretrained(directory)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["t5", "bart"])
def seq2seq(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(request.param)
    base = make(request.param, root / "base", 0, V)
    make(request.param, root / "chat", 1, V, base)
    make(request.param, root / "cp", 2, V_CP, base)
    return {"kind": request.param, **{n: root / n for n in ("base", "chat", "cp")}}


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def shard_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def merge(d: dict, out: Path, *extra: str) -> int:
    args = ["merge", "--base", str(d["base"]), "--chat", str(d["chat"]), "--cp", str(d["cp"]), "--out", str(out)]
    return main([*args, "--backend", "local", "--no-progress", *extra])


def reference(cp: torch.Tensor, chat: torch.Tensor, base: torch.Tensor, alpha: float, shared: int) -> torch.Tensor:
    """float64: CP's first `shared` flat elements plus alpha·(chat − base), the rest CP's; rounded to CP's dtype."""
    out = cp.double().flatten().clone()
    out[:shared] += alpha * (chat.double().flatten()[:shared] - base.double().flatten()[:shared])
    return out.to(cp.dtype).view(cp.shape)


@pytest.mark.parametrize("policy", ["skip", "overlap"])
def test_extended_vocabulary_of_encoder_decoder_models(seq2seq, tmp_path, policy):
    out = tmp_path / policy
    assert merge(seq2seq, out, "--vocab", policy, "--alpha", "0.5") == 0
    base, chat, cp = (load_all(seq2seq[n]) for n in ("base", "chat", "cp"))
    got = load_all(out)
    vocab = {"model.shared.weight", "final_logits_bias", "shared.weight"} & set(cp)
    assert vocab == ({"shared.weight"} if seq2seq["kind"] == "t5" else {"model.shared.weight", "final_logits_bias"})
    for name, c in cp.items():
        if name in vocab:
            assert c.shape[-1 if name == "final_logits_bias" else 0] == V_CP
            shared = V * c.numel() // V_CP if policy == "overlap" else 0
        else:
            shared = c.numel()
        want = reference(c, chat[name], base[name], 0.5, shared)
        assert got[name].dtype == c.dtype and torch.equal(got[name], want), name
    rows = {r["tensor"]: r for r in read_manifest(out)[0].to_pylist()}
    for name in vocab:
        assert (rows[name]["rule"], rows[name]["reason"]) == {
            "skip": ("copy", "vocab:skip"),
            "overlap": ("merge_rows", "vocab:overlap"),
        }[policy]

    from transformers import AutoModelForSeq2SeqLM

    model, info = AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = model.state_dict()
    for name in vocab:
        assert torch.equal(loaded[name], got[name]), name
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 70]]), decoder_input_ids=torch.tensor([[0, 3, 79]]))


def test_final_logits_bias_workers_give_the_same_bytes(seq2seq, tmp_path):
    if seq2seq["kind"] != "bart":
        pytest.skip("BART's bias")
    runs = {n: tmp_path / n for n in ("w1", "w2")}
    for n, out in runs.items():
        assert merge(seq2seq, out, "--vocab", "overlap", "--workers", n[1], "--unit-size", "1KiB") == 0
    assert shard_bytes(runs["w1"]) == shard_bytes(runs["w2"])


def test_full_refuses_an_extended_final_logits_bias(seq2seq, tmp_path, capsys):
    assert merge(seq2seq, tmp_path / "o", "--vocab", "full") == 2
    assert "--vocab full needs equal shapes" in capsys.readouterr().err


def make_gpt2(directory: Path, seed: int, vocab: int = V, base: dict | None = None, head: bool = False) -> dict:
    """A tiny tied float32 GPT-2; `head`: its files also store lm_head.weight (= wte), as some tied CPs do."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base is not None:
                rows = min(p.shape[0], base[name].shape[0])
                p[:rows] = base[name][:rows]
                p.add_(0.02 * torch.randn(p.shape))
    model.save_pretrained(directory)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if head:
        stored = load_file(directory / "model.safetensors")
        assert "lm_head.weight" not in stored
        save_file(
            {**stored, "lm_head.weight": stored["transformer.wte.weight"].clone()}, directory / "model.safetensors"
        )
    return state


@pytest.mark.parametrize("vocab,policy", [(V, "auto"), (V_CP, "overlap"), (V_CP, "skip")])
def test_tied_cp_storing_its_head_gets_the_embeddings_update(tmp_path, vocab, policy):
    base = make_gpt2(tmp_path / "base", 0)
    make_gpt2(tmp_path / "chat", 1, base=base)
    make_gpt2(tmp_path / "cp", 2, vocab, base=base, head=True)
    d = {n: tmp_path / n for n in ("base", "chat", "cp")}
    assert json.loads((d["cp"] / "config.json").read_text()).get("tie_word_embeddings", True) is True
    out = tmp_path / "out"
    assert merge(d, out, "--vocab", policy, "--alpha", "0.7") == 0
    b, c, cp, got = (load_all(p) for p in (d["base"], d["chat"], d["cp"], out))
    shared = 0 if policy == "skip" else V * 16
    emb = "transformer.wte.weight"
    want = reference(cp["lm_head.weight"], c[emb], b[emb], 0.7, shared)
    assert torch.equal(got["lm_head.weight"], want)
    assert torch.equal(got["lm_head.weight"], got[emb])  # CP's head was its embedding: so is the output's
    assert torch.equal(got[emb], cp[emb]) == (policy == "skip")
    row = next(r for r in read_manifest(out)[0].to_pylist() if r["tensor"] == "lm_head.weight")
    assert row["reason"] == f"vocab:{'full' if policy == 'auto' else policy}"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight.detach(), got[emb])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_untied_cp_head_missing_from_the_vectors_is_still_refused(tmp_path, capsys):
    base = make_gpt2(tmp_path / "base", 0)
    make_gpt2(tmp_path / "chat", 1, base=base)
    make_gpt2(tmp_path / "cp", 2, base=base, head=True)
    config = json.loads((tmp_path / "cp" / "config.json").read_text())
    (tmp_path / "cp" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    assert merge({n: tmp_path / n for n in ("base", "chat", "cp")}, tmp_path / "out") == 2
    assert "lm_head.weight" in capsys.readouterr().err


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config or {}))
    return directory


def test_a_bias_that_is_not_one_row_and_an_ambiguous_tied_head_are_plan_errors(tmp_path, capsys):
    def plan(**cps: dict[str, torch.Tensor]) -> str:
        d = {n: _write(tmp_path / f"{n}{len(list(tmp_path.iterdir()))}", t) for n, t in cps.items()}
        args = ["plan", "--base", str(d["base"]), "--chat", str(d["chat"]), "--cp", str(d["cp"]), "--vocab", "overlap"]
        assert main(args) == 2
        return capsys.readouterr().err

    two_rows = {"final_logits_bias": torch.zeros(2, V)}
    err = plan(base=two_rows, chat=two_rows, cp={"final_logits_bias": torch.zeros(2, V_CP)})
    assert "final_logits_bias" in err and "expected [1, vocabulary]" in err
    towers = {"encoder.embed_tokens.weight": torch.zeros(V, 4), "decoder.embed_tokens.weight": torch.zeros(V, 4)}
    err = plan(base=towers, chat=towers, cp={**towers, "lm_head.weight": torch.zeros(V, 4)})
    assert "lm_head.weight" in err and "tied head could be any of" in err
