"""`extract --dtype float64`: extract then apply gives the bytes of a direct merge on float32 models."""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def _ulp_exponent(x: float) -> int:
    """The exponent of a float32 value's ulp (a subnormal's: 2^-149)."""
    return max(math.frexp(x)[1] - 24, -149)


def test_where_the_float64_vector_is_exact_and_that_apply_agrees_beyond(tmp_path):
    """Pairs whose ulps are 0 to 40 powers of two apart, subnormals and zeros: the float64 difference is exact up to
    29 (and can be inexact from 30), and extract (float64) then apply writes a direct merge's bytes either way."""
    g = torch.Generator().manual_seed(0)
    n = 4096
    mant = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    gap = torch.randint(0, 41, (n,), generator=g)
    chat = (sign * mant).float()
    base = (torch.rand(n, generator=g, dtype=torch.float64) * 2.0 ** (-gap.double())).float()
    base[:16] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e-39, 1.0, *[2.0**-149] * 10])[:16]  # zeros, subnormals
    cp = torch.randn(n, generator=g).float()
    for name, t in {"base": base, "chat": chat, "cp": cp}.items():
        (tmp_path / name).mkdir()
        save_file({"w": t.reshape(64, 64)}, tmp_path / name / "model.safetensors")
    d = {n: tmp_path / n for n in ("base", "chat", "cp")}
    extract(d, tmp_path / "vec", "float64")
    v = load_all(tmp_path / "vec")["w"].flatten()
    exact = inexact_beyond = 0
    for c, b, x in zip(chat.tolist(), base.tolist(), v.tolist()):
        apart = abs(_ulp_exponent(c) - _ulp_exponent(b)) if c and b else 0
        is_exact = Fraction(x) == Fraction(c) - Fraction(b)
        if apart <= 29:
            assert is_exact, (c, b, x)
            exact += 1
        else:
            inexact_beyond += not is_exact
    assert exact > 1000 and inexact_beyond > 100  # both sides of the bound are exercised
    for alpha in ("1", "0.3"):
        run(
            "merge",
            *(f"--{k}={d[k]}" for k in ("base", "chat", "cp")),
            "--out",
            str(tmp_path / f"m{alpha}"),
            "--alpha",
            alpha,
        )
        apply(tmp_path / "vec", d["cp"], tmp_path / f"a{alpha}", alpha)
        assert shard_bytes(tmp_path / f"a{alpha}") == shard_bytes(tmp_path / f"m{alpha}")
