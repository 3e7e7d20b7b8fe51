"""The demo models: tokenizers as large as their embeddings, and a chat template for the chat model."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatvec_dist.demo import CHAT_TEMPLATE, END_OF_TURN_ID, make_demo_models


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
