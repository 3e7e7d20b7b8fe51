"""Synthetic Llama-shaped base, chat and CP checkpoints (bfloat16) of a chosen size, written where the user's
models live: a folder, or an s3:// prefix (each shard made in a temporary file, uploaded, then removed)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io import s3, s3_sink
from ..recipe.spec import MiB

SHARD_BYTES = 1024 * MiB
BIG = {"hidden": 1024, "intermediate": 2816, "vocab": 32000}  # TinyLlama's widths
SMALL = {"hidden": 256, "intermediate": 704, "vocab": 4096}  # below ~300 MB per checkpoint


@dataclass(frozen=True)
class Inputs:
    """The three checkpoints' locations, and every safetensors file with its size."""

    base: str
    chat: str
    cp: str
    files: list[tuple[str, int]]

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.files)


def llama_shapes(nbytes: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama with as many layers as fit in `nbytes` of bfloat16 (at least one)."""
    dims = BIG if nbytes >= 300 * 10**6 else SMALL
    h, i, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    per_layer = 2 * (4 * h * h + 3 * h * i + 2 * h)
    layers = max(1, (nbytes - 2 * (2 * v * h + h)) // per_layer)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + f"self_attn.{m}_proj.weight": (h, h) for m in "qkvo"}
        shapes |= {
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """A transformers LlamaConfig for `shapes`."""
    v, h = shapes["lm_head.weight"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0],
        "num_hidden_layers": sum(1 for n in shapes if n.endswith("input_layernorm.weight")),
        "num_attention_heads": h // 64,
        "num_key_value_heads": h // 64,
        "vocab_size": v,
        "torch_dtype": "bfloat16",
    }


def make_inputs(where: str, nbytes: int, seed: int = 0) -> Inputs:
    """base/, chat/ and cp/ under `where`, each about `nbytes` of bfloat16 weights."""
    shapes = llama_shapes(nbytes)
    made = {role: _checkpoint(_join(where, role), shapes, seed + k) for k, role in enumerate(("base", "chat", "cp"))}
    return Inputs(
        _join(where, "base"), _join(where, "chat"), _join(where, "cp"), [f for fs in made.values() for f in fs]
    )


def _join(where: str, name: str) -> str:
    return s3.join(where, name) if s3.is_url(where) else os.path.join(where, name)


def _shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most SHARD_BYTES (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _checkpoint(dest: str, shapes: dict[str, tuple[int, ...]], seed: int) -> list[tuple[str, int]]:
    """One checkpoint: its shards, index and config; the shards' locations and sizes."""
    generator = torch.Generator().manual_seed(seed)
    shards = _shards(shapes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    files = []
    with tempfile.TemporaryDirectory(prefix="chatvec-bench-") as tmp:
        local = Path(tmp) if s3.is_url(dest) else Path(dest)
        local.mkdir(parents=True, exist_ok=True)
        for fname, members in zip(names, shards):
            tensors = {
                n: torch.empty(shapes[n], dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=generator)
                for n in members
            }
            save_file(tensors, local / fname, metadata={"format": "pt"})
            files.append((_join(dest, fname), _publish(local / fname, dest)))
        index = {"metadata": {}, "weight_map": {n: f for f, ms in zip(names, shards) for n in ms}}
        (local / "model.safetensors.index.json").write_text(json.dumps(index))
        (local / "config.json").write_text(json.dumps(config(shapes)))
        for side in ("model.safetensors.index.json", "config.json"):
            _publish(local / side, dest)
    return files


def _publish(path: Path, dest: str) -> int:
    """A file made locally, put at `dest` (an upload for s3://, then removed here); its size."""
    size = path.stat().st_size
    if s3.is_url(dest):
        bucket, key = s3.parse(s3.join(dest, path.name))
        s3.client(True).upload_file(str(path), bucket, key)
        path.unlink()
    return size


MERGED = "merged"  # the merge's output, under the bench's folder


def remove(where: str) -> None:
    """Everything `chatvec bench` made under `where`: open uploads aborted first (the floor's, and a failed merge's,
    which the job keeps for a resume that will not come), then every object."""
    if not s3.is_url(where):
        import shutil

        shutil.rmtree(where, ignore_errors=True)
        return
    for prefix in (where, s3.join(where, MERGED)):
        s3_sink.abort_all(prefix)
    for url in _objects(where):
        s3_sink.delete(url)


def _objects(prefix_url: str) -> list[str]:
    bucket, prefix = s3.parse(prefix_url.rstrip("/") + "/")
    pages = s3.client(True).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", ())]
