"""`chatvec demo`: tiny random Llama-shaped base/chat/CP checkpoints, merged on an embedded Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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


def llama_config(vocab_size: int, dtype: str = "bfloat16", **overrides) -> dict:
    """A transformers LlamaConfig as JSON, for a tiny model."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 128,
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
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, directory / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def make_demo_models(
    root: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, cp_extra_vocab: int = 64
) -> dict[str, Path]:
    """base; chat = base + an update; CP = base continually 'pre-trained' with `cp_extra_vocab` new tokens."""
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
    return {
        "base": save_checkpoint(root / "base", cast(base), config),
        "chat": save_checkpoint(root / "chat", cast(chat), config),
        "cp": save_checkpoint(root / "cp", cast(cp), cp_config, shards=2),
    }


def run_demo(root: Path, options: RunOptions) -> int:
    from . import job
    from .output.manifest import read_manifest
    from .output.verify import verify
    from .planning.table import summary

    paths = make_demo_models(root)
    print(f"made tiny Llama-shaped checkpoints under {root}/: base, chat, and cp with 64 extra tokens")
    out = root / "merged"
    recipe = Recipe(
        vectors=(Vector(str(paths["chat"]), str(paths["base"])),),
        targets=(Target("merged", str(paths["cp"]), str(out), (1.0,)),),
        unit_bytes=16 * 1024,
    )  # small units, so that every worker gets some
    print(summary(job.plan(recipe)))
    job.run(recipe, dataclasses.replace(options, overwrite=True, restart=True))
    table, _ = read_manifest(out)
    print(f"{'tensor':<48} {'rule':<6} {'reason':<10} {'‖out−cp‖/‖cp‖':>14}")
    for row in table.to_pylist():
        rel = f"{row['rel_update']:.3e}" if row["rel_update"] is not None else "-"
        print(f"{row['tensor']:<48} {row['rule']:<6} {row['reason']:<10} {rel:>14}")
    problems = verify(out)
    print(f"wrote {out}: {table.num_rows} tensors, {'verified against manifest.parquet' if not problems else problems}")
    return 0 if not problems else 1
