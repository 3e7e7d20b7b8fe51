"""`chatvec demo`: models with tokenizers and a chat template; a merged output that transformers loads and runs."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatvec_dist.cli import main
from chatvec_dist.demo import CHAT_TEMPLATE, END_OF_TURN_ID, PROMPT, how_to, make_demo_models
from chatvec_dist.output.verify import verify


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_demo_models(tmp_path_factory.mktemp("demo"), with_tokenizers=True)


@pytest.mark.parametrize(("name", "vocab"), [("base", 256), ("chat", 256), ("cp", 320)])
def test_each_demo_model_loads_with_a_tokenizer_as_large_as_its_embeddings(models, name, vocab):
    tok = AutoTokenizer.from_pretrained(models[name])
    model = AutoModelForCausalLM.from_pretrained(models[name])
    assert len(tok) == vocab == model.get_input_embeddings().num_embeddings == model.lm_head.out_features
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"]) == [4, 5, END_OF_TURN_ID]
    assert tok.decode(tok("Hello! Tell me a story.")["input_ids"]) == "hello ! tell me a story ."
    assert (tok.chat_template == CHAT_TEMPLATE) == (name == "chat")  # CP has none: the merge brings chat's


def test_cp_tokenizer_knows_the_new_language_that_the_base_does_not(models):
    base, cp = (AutoTokenizer.from_pretrained(models[n]) for n in ("base", "cp"))
    assert all(i >= 256 for i in cp("saya makan")["input_ids"])
    assert base("saya makan")["input_ids"] == [base.unk_token_id] * 2
    assert cp("the sea")["input_ids"] == base("the sea")["input_ids"]  # CP's vocabulary extends the base's


def test_demo_models_have_tokenizers_only_when_asked(tmp_path):
    plain = make_demo_models(tmp_path)  # what other tests build on: weights and config only
    assert sorted(p.name for p in plain["chat"].iterdir()) == ["config.json", "model.safetensors"]


def test_demo_tokenizer_file_is_what_the_tokenizers_library_writes(models):
    for name in ("base", "cp"):
        written = json.loads((models[name] / "tokenizer.json").read_text())
        assert json.loads(Tokenizer.from_file(str(models[name] / "tokenizer.json")).to_str()) == written


def _lines_after(text: str, prefix: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    return lines[start:]


def test_demo_merges_with_the_chat_template_and_generates_with_transformers(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--backend", "local", "--no-progress"]) == 0
    out = capsys.readouterr().out
    merged = tmp_path / "merged"
    assert verify(merged) == []
    assert f"{merged}: verified against manifest.parquet" in out
    assert len(out.splitlines()) <= 25  # short enough to read
    tok = AutoTokenizer.from_pretrained(merged)
    assert len(tok) == 320 and tok.chat_template == CHAT_TEMPLATE
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [2, END_OF_TURN_ID]
    prompt, reply = (line.split(": ", 1)[1] for line in _lines_after(out, "  prompt: ")[:2])
    assert prompt == f"<s><|user|> {PROMPT} <|end|> <|assistant|>"
    assert len(reply.split()) >= 1 and "noise" in out
    assert _lines_after(out, "by hand:")[1:] == [f"  {line}" for line in how_to(merged)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec("\n".join(how_to(merged)), {})  # the how-to runs as printed, and makes the same reply
    assert printed.getvalue().rstrip("\n").endswith(reply)


def test_demo_without_transformers_merges_and_says_generation_was_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: importing it fails
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert main(["demo", "--dir", str(tmp_path), "--backend", "local", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "verified against manifest.parquet" in out and verify(tmp_path / "merged") == []
    skipped = [line for line in out.splitlines() if "generation skipped" in line]
    assert len(skipped) == 1 and "pip install 'chatvec-dist[demo]'" in skipped[0]
    assert "reply:" not in out
    merged_config = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    assert merged_config["chat_template"] == CHAT_TEMPLATE and (tmp_path / "merged" / "tokenizer.json").is_file()
