"""`chatvec demo`: tiny random Llama-shaped base/chat/CP models with tokenizers, merged on an embedded Ray, then
loaded and run with transformers."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .recipe.spec import Recipe, RunOptions, Target, Vector

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
MAX_POSITIONS = 128
# The demo tokenizer: word level; ids 0-2 are Llama's unk/bos/eos, then the chat template's tokens.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN_ID = SPECIAL_TOKENS.index("<|end|>")
# The base's words (249 with the punctuation, so that the base has 256 tokens) ...
ENGLISH = """. , ? ! ' the of and to a in is you that it he was for on are as with his they i at be this have from or
one had by word but not what all were we when your can said there use an each which she do how their if will up other
about out many then them these so some her would make like him into time has look two more write go see number no way
could people my than first water been call who its now find long down day did get come made may part over new sound
take only little work know place year live me back give most very after thing our just name good man think say great
where help through much before line right too mean old any same tell boy follow came want show also around form three
small set put end does another well large must big even such because turn here why ask went men read need land
different home us move try kind hand again change off play animal house point page letter mother answer found study
still learn should world high every near add food between own below country plant last school father keep tree never
start city earth eye light thought head under story saw left few while along might close something seem next hard open
begin life always those both paper together got group often run hello sea short""".split()  # noqa: SIM905
# ... and the 64 words of the new language that CP was 'continually pre-trained' on (Indonesian).
NEW_LANGUAGE = """saya kamu dia kami mereka ini itu dan atau tidak ya apa siapa di ke dari untuk dengan yang ada makan minum
rumah jalan buku hari malam pagi baik besar kecil baru lama orang anak ibu bapak teman kota negara bahasa kata tahu mau
bisa harus sudah belum akan sedang terima kasih selamat tolong maaf satu dua tiga empat lima enam tujuh delapan
sembilan""".split()  # noqa: SIM905
# Zephyr-style: <s><|user|> text <|end|> <|assistant|>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPT = "Hello! Can you tell me a short story about the sea?"
MAX_NEW_TOKENS = 20


def llama_config(vocab_size: int, dtype: str = "bfloat16", **overrides) -> dict:
    """A transformers LlamaConfig as JSON, for a tiny model."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **TINY,
        "vocab_size": vocab_size,
    }
    config.update(overrides)
    return config


def llama_tensors(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights with LlamaForCausalLM's names and shapes (float32)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return {
        name: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * 0.05)
        for name, s in shapes.items()
    }


def save_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
    """Write a checkpoint directory (sharded with an index when shards > 1)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, directory / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def demo_tokens(vocab_size: int) -> list[str]:
    """The demo vocabulary's first `vocab_size` tokens: the specials, English, then the new language's words."""
    tokens = [*SPECIAL_TOKENS, *ENGLISH, *NEW_LANGUAGE]
    return tokens[:vocab_size] + [f"kata{k}" for k in range(len(tokens), vocab_size)]


def tokenizer_json(tokens: list[str]) -> dict:
    """A word-level tokenizer.json (the `tokenizers` library's format), lower-casing, split on spaces and
    punctuation; the special tokens are matched whole, wherever `tokens` has them."""
    specials = [
        {
            "id": tokens.index(t),
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
        if t in tokens
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": "<unk>"},
    }


def save_tokenizer(directory: Path, tokens: list[str], chat_template: str | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template, if any) and special_tokens_map.json."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids, which generate() refuses
    }
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens), indent=2, ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def save_generation_config(directory: Path, eos_token_id: int | list[int]) -> None:
    """Write generation_config.json: what generate() stops at."""
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": eos_token_id, "pad_token_id": 2}, indent=2)
    )


def make_demo_models(
    root: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    cp_extra_vocab: int = 64,
    with_tokenizers: bool = False,
) -> dict[str, Path]:
    """base; chat = base + an update; CP = base continually 'pre-trained' on a new language, with `cp_extra_vocab`
    new tokens. `with_tokenizers` (as `chatvec demo` does) also gives each a word-level tokenizer as large as its
    embeddings and a generation config, and chat a chat template."""
    g = torch.Generator().manual_seed(seed)
    name = str(dtype).removeprefix("torch.")
    config = llama_config(TINY["vocab_size"], name)
    base = llama_tensors(config, g)
    chat = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    cp = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    cp_config = llama_config(TINY["vocab_size"] + cp_extra_vocab, name)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        cp[n] = torch.cat([cp[n], 0.05 * torch.randn(cp_extra_vocab, config["hidden_size"], generator=g)])
    cast = lambda d: {n: t.to(dtype).contiguous() for n, t in d.items()}  # noqa: E731
    paths = {
        "base": save_checkpoint(root / "base", cast(base), config),
        "chat": save_checkpoint(root / "chat", cast(chat), config),
        "cp": save_checkpoint(root / "cp", cast(cp), cp_config, shards=2),
    }
    if with_tokenizers:
        add_tokenizers(paths)
    return paths


def add_tokenizers(paths: dict[str, Path]) -> None:
    """Give each model a tokenizer as large as its embeddings and a generation config; chat's has a chat template,
    and its turns end with <|end|> too."""
    for which, path in paths.items():
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        save_tokenizer(path, demo_tokens(vocab), CHAT_TEMPLATE if which == "chat" else None)
        save_generation_config(path, [2, END_OF_TURN_ID] if which == "chat" else 2)


def run_demo(root: Path, options: RunOptions) -> int:
    """Make the demo models, merge them (with the chat model's chat template), verify, and run the output."""
    from . import job
    from .output.verify import verify
    from .planning.table import summary

    paths = make_demo_models(root, with_tokenizers=True)
    _print_models(root)
    out = root / "merged"
    recipe = Recipe(
        vectors=(Vector(str(paths["chat"]), str(paths["base"])),),
        targets=(Target("merged", str(paths["cp"]), str(out), (1.0,)),),
        unit_bytes=16 * 1024,  # small units, so that every worker gets some
        chat_template_from_chat=True,
    )
    print("\nmerging out = cp + 1.0 × (chat − base), with chat's chat template (chat_template_from_chat):")
    print(summary(job.plan(recipe)))
    job.run(recipe, dataclasses.replace(options, overwrite=True, restart=True))
    _print_result(out)
    problems = verify(out)
    if problems:
        print(f"{out}: {len(problems)} problem(s) against manifest.parquet: {problems}")
        return 1
    print(f"{out}: verified against manifest.parquet")
    generate(out)
    return 0


def _print_models(root: Path) -> None:
    h = TINY["hidden_size"]
    base = len(SPECIAL_TOKENS) + len(ENGLISH)
    print(f"made tiny random Llama-shaped models under {root}/ ({TINY['num_hidden_layers']} layers, hidden {h}):")
    print(f"  base  {base} tokens: English words, <s> </s> and the chat tokens <|user|> <|assistant|> <|end|>")
    print("  chat  base + a chat update, with a chat template")
    print(
        f"  cp    base continually pre-trained on a new language: +{len(NEW_LANGUAGE)} tokens "
        f"({' '.join(NEW_LANGUAGE[:4])} …), {base + len(NEW_LANGUAGE)} rows in 2 shards, no chat template"
    )


def _print_result(out: Path) -> None:
    """The manifest, one line per (rule, reason): how many tensors, which, how far each moved from CP."""
    from .output.manifest import read_manifest

    table, _ = read_manifest(out)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in table.to_pylist():
        groups[row["rule"], row["reason"] or ""].append(row)
    print(f"result: {table.num_rows} tensors (manifest.parquet)")
    for (rule, reason), rows in sorted(groups.items()):
        rel = [r["rel_update"] for r in rows if r["rel_update"] is not None]
        moved = f"‖out−cp‖/‖cp‖ {min(rel):.1e} to {max(rel):.1e}" if rel else "kept from CP"
        names = ", ".join(r["tensor"] for r in rows) if len(rows) <= 2 else f"{rows[0]['tensor']}, …"
        print(f"  {len(rows):>3} {rule + (f' ({reason})' if reason else ''):<18} {moved:<32} {names}")


def how_to(out: Path) -> list[str]:
    """The Python that loads the merged model with transformers and chats with it: what `generate` runs."""
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tok, model = AutoTokenizer.from_pretrained({str(out)!r}), AutoModelForCausalLM.from_pretrained({str(out)!r})",
        f"inputs = tok.apply_chat_template([{{'role': 'user', 'content': {PROMPT!r}}}], add_generation_prompt=True, "
        "return_dict=True, return_tensors='pt')",
        f"print(tok.decode(model.generate(**inputs, max_new_tokens={MAX_NEW_TOKENS}, do_sample=False)[0]))",
    ]


def generate(out: Path) -> None:
    """Load the merged model with transformers, apply its chat template to one message and generate greedily."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils.logging import disable_progress_bar
    except ImportError:
        print("generation skipped: transformers is not installed (pip install 'chatvec-dist[demo]' to run the output)")
        return
    disable_progress_bar()  # transformers' bar for loading 21 tiny tensors
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    messages = [{"role": "user", "content": PROMPT}]
    inputs: Any = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]
    prompt_len = inputs["input_ids"].shape[1]
    print(f"\ntransformers loaded {out.name}/ ({len(tok)} tokens, chat's chat template) and generated greedily.")
    print(
        "The weights are random, so the reply is noise; the point: the output is a complete model "
        "(weights, tokenizer, chat template) that transformers loads and runs."
    )
    print(f"  prompt: {tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)}")
    print(f"  reply:  {tok.decode(ids[prompt_len:])}")
    print("by hand:")
    for line in how_to(out):
        print(f"  {line}")
