#!/usr/bin/env python
"""Giant models without their bytes: plan time and driver memory on sparse checkpoints shaped like 70B, 405B,
Qwen3-235B-A22B and DeepSeek-V3 (real headers, real tensor counts, files that take no disk), and end-to-end costs
per tensor on "thin" DeepSeek-V3-shaped checkpoints (every tensor name, tiny shapes): one output and a batch of 8
(an alpha sweep of one CP: 8 distinct outputs).

    python benchmarks/giant.py [--models 70b,405b,qwen3-235b,deepseek-v3,deepseek-v3-fp8] [--thin-layers 61] [--backend ray]

Goals (issue 18): a DeepSeek-V3-shaped plan ≤ 3 s and ≤ 300 MB; ≤ 100 µs of wall per tensor end to end; an
8-output batch's fixed cost ≤ 2 × one output's. Prints a Markdown section for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

Shapes = dict[str, tuple[int, ...]]


def llama(layers: int, hidden: int, inter: int, vocab: int, kv: int) -> Shapes:
    shapes: Shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden)}
        shapes |= {p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden)}
        shapes |= {p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden)}
        shapes |= {p + "mlp.down_proj.weight": (hidden, inter)}
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def experts(p: str, n: int, inter: int, hidden: int) -> Shapes:
    out: Shapes = {}
    for e in range(n):
        q = f"{p}mlp.experts.{e}."
        out |= {q + "gate_proj.weight": (inter, hidden), q + "up_proj.weight": (inter, hidden)}
        out[q + "down_proj.weight"] = (hidden, inter)
    return out


def qwen3_235b(layers: int = 94) -> Shapes:
    h, vocab = 4096, 151936
    shapes: Shapes = {"model.embed_tokens.weight": (vocab, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (8192, h), p + "self_attn.k_proj.weight": (512, h)}
        shapes |= {p + "self_attn.v_proj.weight": (512, h), p + "self_attn.o_proj.weight": (h, 8192)}
        shapes |= {p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,)}
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {p + "mlp.gate.weight": (128, h)} | experts(p, 128, 1536, h)
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}


def deepseek_v3(layers: int = 61) -> Shapes:
    h, vocab = 7168, 129280
    shapes: Shapes = {"model.embed_tokens.weight": (vocab, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_a_proj.weight": (1536, h), p + "self_attn.q_a_layernorm.weight": (1536,)}
        shapes |= {p + "self_attn.q_b_proj.weight": (24576, 1536), p + "self_attn.kv_a_proj_with_mqa.weight": (576, h)}
        shapes |= {p + "self_attn.kv_a_layernorm.weight": (512,), p + "self_attn.kv_b_proj.weight": (32768, 512)}
        shapes |= {p + "self_attn.o_proj.weight": (h, 16384)}
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if n < 3:
            shapes |= {p + "mlp.gate_proj.weight": (18432, h), p + "mlp.up_proj.weight": (18432, h)}
            shapes |= {p + "mlp.down_proj.weight": (h, 18432)}
            continue
        shapes |= {p + "mlp.gate.weight": (256, h), p + "mlp.gate.e_score_correction_bias": (256,)}
        shapes |= experts(p, 256, 2048, h)
        q = p + "mlp.shared_experts."
        shapes |= {
            q + "gate_proj.weight": (2048, h),
            q + "up_proj.weight": (2048, h),
            q + "down_proj.weight": (h, 2048),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}


FP8_CONFIG = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
ITEMSIZE = {"BF16": 2, "F8_E4M3": 1, "F32": 4}


def fp8(shapes: Shapes) -> tuple[Shapes, dict[str, str]]:
    """DeepSeek-V3 as released: its linear weights float8_e4m3fn, each with float32 `*.weight_scale_inv` of one
    scale per 128×128 block; embeddings, norms, the router and the head in bf16."""
    out: Shapes = {}
    dtypes: dict[str, str] = {}
    for n, s in shapes.items():
        out[n] = s
        kept = ("embed_tokens", "lm_head", "norm", "mlp.gate.")
        if len(s) == 2 and n.endswith(".weight") and not any(k in n for k in kept):
            dtypes[n] = "F8_E4M3"
            out[n + "_scale_inv"] = (-(-s[0] // 128), -(-s[1] // 128))
            dtypes[n + "_scale_inv"] = "F32"
    return out, dtypes


MODELS = {  # name: (shapes, shards)
    "70b": (lambda: llama(80, 8192, 28672, 128256, 1024), 30),
    "405b": (lambda: llama(126, 16384, 53248, 128256, 1024), 191),
    "qwen3-235b": (qwen3_235b, 118),
    "deepseek-v3": (deepseek_v3, 270),
    "deepseek-v3-fp8": (deepseek_v3, 163),  # its linear weights in block-scaled FP8 (`fp8`)
}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(
    where: Path, shapes: Shapes, shards: int, sparse: bool, dtypes: dict[str, str] | None = None
) -> None:
    """safetensors shards (bf16 unless `dtypes` says otherwise: then with DeepSeek's FP8 quantization config) with
    an index; `sparse`: the data region is a hole (no disk), else zeros."""
    where.mkdir(parents=True)
    names = list(shapes)
    dtypes = dtypes or {}
    weight_map = {}
    for k in range(shards):
        members = names[k * len(names) // shards : (k + 1) * len(names) // shards]
        header, at = {}, 0
        for n in members:
            dtype = dtypes.get(n, "BF16")
            size = ITEMSIZE[dtype] * numel(shapes[n])
            header[n] = {"dtype": dtype, "shape": list(shapes[n]), "data_offsets": [at, at + size]}
            at += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        with open(where / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            if sparse:
                f.truncate(8 + len(raw) + at)
            else:
                f.write(bytes(at))
        weight_map |= dict.fromkeys(members, fname)
    (where / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llama", "torch_dtype": "bfloat16"} | (FP8_CONFIG if dtypes else {})
    (where / "config.json").write_text(json.dumps(config))


def thin(shapes: Shapes) -> Shapes:
    """The same names, each dimension cut to at most 8 (vocabulary rows kept apart: 16)."""
    return {
        n: tuple(min(d, 16 if i == 0 and "embed" in n or "lm_head" in n else 8) for i, d in enumerate(s))
        for n, s in shapes.items()
    }


def timed(argv: list[str]) -> tuple[float, float, float]:
    """(wall s, peak RSS MB, CPU s: user + system, all threads) of `chatvec ARGV` in a fresh process. On a shared
    machine the CPU seconds say more than the wall."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "chatvec_dist", *argv], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"chatvec {' '.join(argv)} failed")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def plans(root: Path, models: list[str]) -> list[str]:
    rows = [
        "| model | tensors | shards | bytes per checkpoint | plan wall s | plan CPU s | plan peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        make, shards = MODELS[name]
        shapes, dtypes = fp8(make()) if name.endswith("-fp8") else (make(), {})
        for role in ("base", "chat", "cp"):
            write_checkpoint(root / name / role, shapes, shards, sparse=True, dtypes=dtypes)
        d = root / name
        wall, rss, cpu = timed(["plan", "--base", str(d / "base"), "--chat", str(d / "chat"), "--cp", str(d / "cp")])
        size = sum(ITEMSIZE[dtypes.get(n, "BF16")] * numel(s) for n, s in shapes.items())
        rows.append(
            f"| {name} | {len(shapes):,} | {shards} | {size / 1e12:.2f} TB | {wall:.2f} | {cpu:.2f} | {rss:.0f} |"
        )
        shutil.rmtree(d)
    return rows


def merges(root: Path, layers: int, backend: str) -> list[str]:
    shapes = thin(deepseek_v3(layers))
    for role in ("base", "chat", "cp"):
        write_checkpoint(root / "thin" / role, shapes, 270, sparse=False)
    d = root / "thin"
    common = ["merge", "--base", str(d / "base"), "--chat", str(d / "chat"), "--no-progress", "--backend", backend]
    one, rss1, cpu1 = timed([*common, "--cp", str(d / "cp"), "--out", str(root / "one")])
    sweep = ",".join(f"{a / 10:g}" for a in range(3, 11))  # 8 outputs: an alpha sweep, 0.3 … 1.0
    eight, rss8, cpu8 = timed([*common, "--cp", str(d / "cp"), "--alpha", sweep, "--out", str(root / "eight")])
    n = len(shapes)
    return [
        f"| thin DeepSeek-V3 ({n:,} tensors, 270 shards), {backend} | wall s | µs per tensor | CPU s | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
        f"| one output | {one:.1f} | {one / n * 1e6:.0f} | {cpu1:.1f} | {rss1:.0f} |",
        f"| batch of 8 outputs (alphas 0.3 … 1.0) | {eight:.1f} | {eight / n / 8 * 1e6:.0f} per output-tensor | {cpu8:.1f} | {rss8:.0f} |",
        f"| batch / one | {eight / one:.2f}× | | {cpu8 / cpu1:.2f}× | |",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="70b,405b,qwen3-235b,deepseek-v3,deepseek-v3-fp8")
    ap.add_argument("--thin-layers", type=int, default=61, help="layers of the thin merge (0: skip it)")
    ap.add_argument("--backend", default="ray")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatvec-giant-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        lines = ["## Giant models: plans from sparse checkpoints, thin end-to-end merges", ""]
        lines += plans(root, [m for m in a.models.split(",") if m])
        if a.thin_layers:
            lines += ["", *merges(root, a.thin_layers, a.backend)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
