"""`extract --dtype float64`: extract then apply gives the bytes of a direct merge on float32 models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatvec_dist.cli import main


def make_gpt2(directory: Path, seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A tiny float32 GPT-2 (tied head); with `base`, its weights plus small noise, as a fine-tune's are."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    if base is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + 0.02 * torch.randn(p.shape))
    model.save_pretrained(directory)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def gpt2s(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    base = make_gpt2(root / "base", 0)
    make_gpt2(root / "chat", 1, base)
    make_gpt2(root / "cp", 2, base)
    return {n: root / n for n in ("base", "chat", "cp")}


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def shard_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def run(*args: str) -> None:
    assert main([*args, "--backend", "local", "--no-progress"]) == 0


def extract(d: dict[str, Path], out: Path, dtype: str) -> None:
    run("extract", "--base", str(d["base"]), "--chat", str(d["chat"]), "--out", str(out), "--dtype", dtype)


def apply(vector: Path, cp: Path, out: Path, alpha: str) -> None:
    run("apply", "--vector", str(vector), "--cp", str(cp), "--out", str(out), "--alpha", alpha, "--unit-size", "4KiB")


def test_float64_vector_is_the_exact_difference(gpt2s, tmp_path):
    vec = tmp_path / "vec64"
    extract(gpt2s, vec, "float64")
    base, chat, got = load_all(gpt2s["base"]), load_all(gpt2s["chat"]), load_all(vec)
    assert set(got) == set(base)
    for name, v in got.items():
        exact = chat[name].double() - base[name].double()  # float32 − float32: exact in float64 here
        assert v.dtype == torch.float64 and torch.equal(v, exact), name


@pytest.mark.parametrize("alpha", ["1.0", "0.3", "-0.7"])
def test_extract_float64_then_apply_is_a_direct_merge_byte_for_byte(gpt2s, tmp_path, alpha):
    direct = tmp_path / "direct"
    run(
        "merge",
        "--base",
        str(gpt2s["base"]),
        "--chat",
        str(gpt2s["chat"]),
        "--cp",
        str(gpt2s["cp"]),
        "--out",
        str(direct),
        "--alpha",
        alpha,
    )
    base, chat, cp, merged = (load_all(p) for p in (gpt2s["base"], gpt2s["chat"], gpt2s["cp"], direct))
    a = float(alpha)
    for name, c in cp.items():  # the float64 reference, rounded once to float32
        want = (c.double() + a * (chat[name].double() - base[name].double())).float()
        assert merged[name].dtype == torch.float32 and torch.equal(merged[name], want), name

    applied = {}
    for dtype in ("float64", "float32"):
        extract(gpt2s, tmp_path / f"vec-{dtype}", dtype)
        applied[dtype] = tmp_path / f"applied-{dtype}"
        apply(tmp_path / f"vec-{dtype}", gpt2s["cp"], applied[dtype], alpha)
    assert shard_bytes(applied["float64"]) == shard_bytes(direct)
    if alpha != "1.0":  # a float32 vector is rounded before alpha scales it: some elements differ
        rounded = load_all(applied["float32"])
        assert sum(int((rounded[n] != merged[n]).sum()) for n in merged) > 0

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(applied["float64"])
    assert model.dtype == torch.float32
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight.detach(), merged["transformer.h.0.mlp.c_fc.weight"])
