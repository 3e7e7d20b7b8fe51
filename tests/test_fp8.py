"""Block-scaled FP8 (DeepSeek-V3 / Qwen3-FP8 layout) as inputs and outputs, against a float64 reference of the
definition in docs/exactness.md written here: dequantize → combine in float64 → round, or requantize per 128×128
block with the test's own quantizer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chatvec_dist import api
from chatvec_dist.demo import save_checkpoint
from chatvec_dist.errors import PlanError
from chatvec_dist.kernels.fp8 import Blocked, Fp8Scratch, combine_fp8
from chatvec_dist.kernels.reference import reference
from chatvec_dist.recipe.spec import Dare, RunOptions, Ties

QUANT = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic", "fmt": "e4m3"}
QUANTIZED = re.compile(r"proj(_with_mqa)?\.weight$")  # DeepSeek-V3 keeps norms, router, embeddings in bf16
LOCAL = RunOptions(backend="local", workers=2, progress=False)


# ---- the reference: numpy float64, by hand ----


def e4m3(x: np.ndarray) -> np.ndarray:
    """Nearest-even float8_e4m3fn value of finite float64 values with |x| ≤ 448 (subnormal step 2^-9)."""
    _, ex = np.frexp(np.abs(x))
    step = np.ldexp(1.0, np.maximum(ex - 1, -6) - 3)
    return np.copysign(np.round(np.abs(x) / step) * step, x)


def quantize(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 values [rows, cols] → (FP8 values as float64, float32 scales [⌈rows/128⌉, ⌈cols/128⌉])."""
    v = v.astype(np.float32)
    rows, cols = v.shape
    grid = np.empty((-(-rows // 128), -(-cols // 128)), dtype=np.float32)
    q = np.empty(v.shape, dtype=np.float64)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            block = v[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            finite = np.abs(block[np.isfinite(block)])
            amax = finite.max() if finite.size else np.float32(0)
            scale = np.float32(amax) / np.float32(448)
            scale = np.float32(1) if scale == 0 else scale
            grid[i, j] = scale
            x = (block / scale).astype(np.float64)  # float32 division
            nan = np.isnan(x)
            x = np.clip(np.where(nan, 0, x), -448, 448)
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = np.where(nan, np.nan, e4m3(x))
    return q, grid


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32(q) × its block's scale, as a float32 multiply (the float64 product is exact, then rounded)."""
    per = np.repeat(np.repeat(scale.astype(np.float64), 128, 0), 128, 1)[: q.shape[0], : q.shape[1]]
    return (q * per).astype(np.float32).astype(np.float64)


def to_fp8(q: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(q).to(torch.float8_e4m3fn)  # exact: every value is an e4m3 value


def combine64(cp: np.ndarray | None, terms: list[tuple[float, np.ndarray, np.ndarray | None]]) -> np.ndarray:
    """cp + Σ alpha·(plus − minus) in float64, in the kernels' order."""
    delta = None
    for alpha, plus, minus in terms:
        d = plus - minus if minus is not None else plus
        d = alpha * d
        delta = d if delta is None else delta + d
    assert delta is not None
    return delta if cp is None else cp + delta


def assert_fp8_equal(got: torch.Tensor, want: np.ndarray) -> None:
    """Codes equal: same values, same signs of zero, NaN where NaN."""
    g = got.to(torch.float64).numpy().reshape(want.shape)
    assert np.array_equal(np.isnan(g), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(g[ok], want[ok]) and np.array_equal(np.signbit(g[ok]), np.signbit(want[ok]))
    assert (got.flatten().view(torch.uint8)[torch.from_numpy(np.isnan(g)).flatten()] == 0x7F).all()


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()])


# ---- the kernel, on its own ----


def _values(rows: int, cols: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)) * scale


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_fp8_cp_bf16_vectors_requantized_bit_for_bit(alpha):
    """Partial blocks on both edges, several tiles, a zero block, NaN and ±Inf: codes and scales as defined."""
    rows, cols = 300, 700
    cp_q, cp_s = quantize(_values(rows, cols, 1, 0.02))
    cp_q[128:256, 512:640] = 0.0  # a block that stays zero: scale 1
    base = torch.from_numpy(_values(rows, cols, 2, 0.02)).to(torch.bfloat16)
    chat64 = base.double().numpy() + _values(rows, cols, 3, 1e-3)
    chat64[0, 0], chat64[5, 600], chat64[299, 699] = np.nan, np.inf, -np.inf
    chat64[128:256, 512:640] = base.double().numpy()[128:256, 512:640]
    chat = torch.from_numpy(chat64).to(torch.bfloat16)
    out, out_scale = torch.empty(rows * cols, dtype=torch.float8_e4m3fn), torch.empty(3 * 6, dtype=torch.float32)
    cp = Blocked(to_fp8(cp_q).flatten(), torch.from_numpy(cp_s).flatten())
    stats = combine_fp8(out, out_scale, cp, [(alpha, chat.flatten(), base.flatten())], cols, Fp8Scratch())

    expected = combine64(dequantize(cp_q, cp_s), [(alpha, chat.double().numpy(), base.double().numpy())])
    want_q, want_s = quantize(expected.astype(np.float32))
    assert want_s[1, 4] == 1.0
    assert torch.equal(bits(out_scale), bits(torch.from_numpy(want_s).flatten()))
    assert_fp8_equal(out, want_q)
    assert stats.nan == 1 and stats.inf == 0  # ±Inf saturate to ±448 × scale
    assert out.view(torch.uint8)[5 * cols + 600] == 0x7E  # +448


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_vectors_dequantized_into_a_16_or_32_bit_output(out_dtype):
    rows, cols = 260, 1030
    cp = torch.from_numpy(_values(rows, cols, 4, 0.02)).to(torch.bfloat16)
    quantized = [quantize(_values(rows, cols, s, 0.02)) for s in (5, 6, 7)]
    ops = [Blocked(to_fp8(q).flatten(), torch.from_numpy(s).flatten()) for q, s in quantized]
    deq = [dequantize(q, s) for q, s in quantized]
    out = torch.empty(rows * cols, dtype=out_dtype)
    terms = [(1.0, ops[0], ops[1]), (-0.5, ops[2], None)]
    combine_fp8(out, None, cp.flatten(), terms, cols, Fp8Scratch())
    expected = combine64(cp.double().numpy(), [(1.0, deq[0], deq[1]), (-0.5, deq[2], None)])
    want = torch.from_numpy(expected).flatten().to(torch.float32).to(out_dtype)  # through float32, as torch does
    assert torch.equal(bits(out), bits(want))


# ---- whole checkpoints: a tiny DeepSeek-V3 ----


def _tiny_deepseek(directory: Path, **sizes: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A random DeepSeek-V3 in bfloat16; `sizes` (vocab_size, hidden_size, intermediate_size,
    moe_intermediate_size) make a larger one."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        **({"vocab_size": 256, "hidden_size": 160, "intermediate_size": 320, "moe_intermediate_size": 96} | sizes),
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=2,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        first_k_dense_replace=1,
        max_position_embeddings=64,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(directory / "hf")
    config = json.loads((directory / "hf" / "config.json").read_text())
    return load_file(directory / "hf" / "model.safetensors"), config


def _save(directory: Path, tensors: dict[str, np.ndarray], config: dict, fp8: bool) -> None:
    """bf16 (rounded from float64), or with every projection block-quantized; 3 shards, so scales often sit in
    another shard than their weights."""
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if fp8 and QUANTIZED.search(name):
            q, s = quantize(value.astype(np.float32))
            out[name], out[name + "_scale_inv"] = to_fp8(q), torch.from_numpy(s)
        else:
            out[name] = torch.from_numpy(value).to(torch.bfloat16)
    save_checkpoint(directory, out, config | ({"quantization_config": QUANT} if fp8 else {}), shards=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return make_models(tmp_path_factory.mktemp("fp8"))


def make_models(root: Path, **sizes: int) -> dict[str, Path]:
    """base, chat and cp, each in bf16 and FP8 ("base8", …); `sizes` as `_tiny_deepseek` takes them."""
    state, config = _tiny_deepseek(root, **sizes)
    rng = np.random.default_rng(0)
    base = {n: t.double().numpy() for n, t in state.items()}
    chat = {n: v + rng.standard_normal(v.shape) * 1e-3 for n, v in base.items()}
    cp = {n: v + rng.standard_normal(v.shape) * 2e-3 for n, v in base.items()}
    paths = {}
    for name, values in (("base", base), ("chat", chat), ("cp", cp)):
        for fp8 in (False, True):
            paths[name + ("8" if fp8 else "")] = root / (name + ("8" if fp8 else ""))
            _save(paths[name + ("8" if fp8 else "")], values, config, fp8)
    return paths


def _operand(directory: Path, name: str, files: dict[Path, dict[str, torch.Tensor]]) -> np.ndarray:
    """A tensor of a checkpoint as float64 values, dequantized by the reference where it is FP8."""
    if directory not in files:
        files[directory] = {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}
    t = files[directory]
    if t[name].dtype == torch.float8_e4m3fn:
        return dequantize(t[name].double().numpy(), t[name + "_scale_inv"].numpy())
    return t[name].double().numpy()


def _check_output(out: Path, models: dict, base: str, chat: str, cp: str, dtype: torch.dtype | None) -> None:
    files: dict[Path, dict[str, torch.Tensor]] = {}
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    cp_tensors = {k: v for f in sorted(models[cp].glob("*.safetensors")) for k, v in load_file(f).items()}
    for name, stored in cp_tensors.items():
        if name.endswith("_scale_inv"):
            assert (name in got) == (dtype is None)
            continue
        ops = [_operand(models[k], name, files) for k in (cp, chat, base)]
        expected = combine64(ops[0], [(1.0, ops[1], ops[2])])
        if stored.dtype == torch.float8_e4m3fn and dtype is None:
            want_q, want_s = quantize(expected.astype(np.float32))
            assert got[name].dtype == torch.float8_e4m3fn and got[name].shape == stored.shape
            assert_fp8_equal(got[name], want_q)
            assert torch.equal(bits(got[name + "_scale_inv"]), bits(torch.from_numpy(want_s)))
        elif any(name + "_scale_inv" in files[models[k]] for k in (cp, chat, base)):  # an FP8 operand
            want = torch.from_numpy(expected).to(torch.float32).to(dtype or stored.dtype)
            assert torch.equal(bits(got[name]), bits(want)), name
        else:  # an ordinary bf16 tensor: the existing kernels and reference
            t = [files[models[k]][name] for k in (cp, chat, base)]
            want = reference(t[0], [(1.0, t[1], t[2])], dtype or stored.dtype).view(stored.shape)
            assert torch.equal(bits(got[name]), bits(want)), name
    assert set(got) == {n for n in cp_tensors if dtype is None or not n.endswith("_scale_inv")}
    assert api.verify(out) == []


def test_fp8_cp_with_bf16_vectors_writes_fp8_in_cps_blocks(models, tmp_path):
    out = tmp_path / "out"
    api.merge(models["base"], models["chat"], models["cp8"], out, options=LOCAL, unit_bytes=64 * 1024)
    _check_output(out, models, "base", "chat", "cp8", None)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == QUANT


def test_bf16_cp_with_fp8_vectors_writes_bf16(models, tmp_path):
    out = tmp_path / "out"
    api.merge(models["base8"], models["chat8"], models["cp"], out, options=LOCAL)
    _check_output(out, models, "base8", "chat8", "cp", None)
    assert not any(n.endswith("_scale_inv") for n in load_file(next(out.glob("*.safetensors"))))


def test_all_fp8_same_bytes_for_any_unit_size(models, tmp_path):
    outs = []
    for unit in (8 * 1024, 1 << 20):
        outs.append(tmp_path / f"out{unit}")
        api.merge(models["base8"], models["chat8"], models["cp8"], outs[-1], options=LOCAL, unit_bytes=unit)
    _check_output(outs[0], models, "base8", "chat8", "cp8", None)
    for a, b in zip(sorted(outs[0].glob("*.safetensors")), sorted(outs[1].glob("*.safetensors"))):
        assert a.read_bytes() == b.read_bytes()


def test_fp8_to_bfloat16_drops_the_quantization_config_and_loads(models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    api.merge(models["base8"], models["chat"], models["cp8"], out, options=LOCAL, dtype="bfloat16")
    _check_output(out, models, "base8", "chat", "cp8", torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}[name]
    assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj[0][96:], got)


# ---- refusals ----


def _edit(src: Path, dst: Path, edit) -> Path:
    tensors = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    config = json.loads((src / "config.json").read_text())
    save_checkpoint(dst, *edit(tensors, config))
    return dst


W = "model.layers.0.mlp.up_proj.weight"


def _missing_scale(t, c):
    del t[W + "_scale_inv"]
    return t, c


def _per_tensor(t, c):
    t[W.replace("weight", "weight_scale")] = t.pop(W + "_scale_inv")[:1, :1].reshape(())
    return t, c


def _wrong_blocks(t, c):
    t[W + "_scale_inv"] = torch.ones(5, 3)  # 64×64 blocks of [320, 160]
    return t, c


def _other_layout(t, c):
    return t, c | {"quantization_config": QUANT | {"weight_block_size": [64, 64]}}


def _no_quantization_config(t, c):
    del c["quantization_config"]
    return t, c


def _e5m2(t, c):
    t[W] = t[W].float().to(torch.float8_e5m2)
    return t, c


@pytest.mark.parametrize(
    "edit,message,tensor",
    [
        (_missing_scale, "F8_E4M3 without a 128×128 block scale 'model.layers.0.mlp.up_proj.weight_scale_inv'", W),
        (_per_tensor, "per-channel or per-tensor scale .*: not supported yet", W),
        (_wrong_blocks, r"F32 scale of shape \[5, 3\] does not fit 128×128 blocks of the \[320, 160\]", W + "_s"),
        (_other_layout, r"weight_block_size \[64, 64\]: only block-scaled fp8 with \[128, 128\]", None),
        (_e5m2, "a block scale of a F8_E5M2 tensor", W + "_s"),
        (_no_quantization_config, r"block scales \('\*_scale_inv'\) but no quantization_config", None),
    ],
)
def test_what_cannot_be_done_exactly_is_refused_in_one_line(models, tmp_path, edit, message, tensor):
    chat = _edit(models["chat8"], tmp_path / "chat", edit)
    with pytest.raises(PlanError, match=message) as e:
        api.plan(api.make_recipe(models["base8"], chat, models["cp8"], tmp_path / "out"))
    assert "\n" not in str(e.value) and str(e.value.file).startswith(str(chat))
    assert e.value.tensor == (tensor.replace("_s", "_scale_inv") if tensor else None)


@pytest.mark.parametrize("sparse", [{"dare": Dare(0.5)}, {"ties": Ties(0.5)}])
def test_dare_and_ties_on_fp8_weights_are_not_yet(models, tmp_path, sparse):
    with pytest.raises(PlanError, match="DARE and TIES are not supported yet on block-scaled FP8") as e:
        api.plan(api.make_recipe(models["base8"], models["chat"], models["cp8"], tmp_path / "out", **sparse))
    assert e.value.tensor is not None and e.value.tensor.endswith(".weight")


# ---- the Triton pass (interpreted on CPU tensors here, as in CI): the CPU pass's bytes ----


def _triton(out, out_scale, cp, terms, cols):
    from chatvec_dist.kernels.triton_fp8 import combine_triton_fp8
    from chatvec_dist.kernels.triton_merge import TritonScratch

    stats = torch.zeros(5, dtype=torch.float64)
    combine_triton_fp8(out, out_scale, cp, terms, cols, stats, TritonScratch())
    return stats


@pytest.mark.parametrize("case", ["fp8_out", "bf16_out", "fp16_out_many_vectors", "extract_f32"])
def test_the_triton_pass_makes_the_cpu_pass_bytes(case):
    rows, cols = 300, 400
    q = [quantize(_values(rows, cols, s, 0.02 * s)) for s in (1, 2, 3)]
    fp8 = [Blocked(to_fp8(v).flatten(), torch.from_numpy(s).flatten()) for v, s in q]
    bf = [torch.from_numpy(_values(rows, cols, s, 0.02)).to(torch.bfloat16).flatten() for s in (4, 5)]
    bf[0][7], bf[0][1000], bf[1][cols * 200 + 3] = float("nan"), float("inf"), float("-inf")
    cp, out_dtype, terms = {
        "fp8_out": (fp8[0], torch.float8_e4m3fn, [(0.3, bf[0], bf[1]), (1.0, fp8[1], fp8[2])]),
        "bf16_out": (bf[0], torch.bfloat16, [(1.0, fp8[1], fp8[2])]),
        "fp16_out_many_vectors": (fp8[0], torch.float16, [(0.5 * i + 0.1, fp8[i % 3], bf[i % 2]) for i in range(6)]),
        "extract_f32": (None, torch.float32, [(1.0, fp8[1], bf[1])]),
    }[case]
    results = []
    for run in (combine_fp8, _triton):
        out = torch.empty(rows * cols, dtype=out_dtype)
        out_scale = torch.empty(3 * 4, dtype=torch.float32) if out_dtype == torch.float8_e4m3fn else None
        stats = run(out, out_scale, cp, terms, cols, *([Fp8Scratch()] if run is combine_fp8 else []))
        results.append((out, out_scale, stats))
    (out, scale, stats), (t_out, t_scale, t_stats) = results
    assert torch.equal(bits(out), bits(t_out))
    assert scale is None or torch.equal(bits(scale), bits(t_scale))
    assert (stats.nan, stats.inf) == (int(t_stats[3]), int(t_stats[4])) and stats.nan + stats.inf > 0
    assert math.isclose(stats.delta_sq, float(t_stats[1]), rel_tol=1e-9) or math.isnan(stats.delta_sq)


def test_ties_and_subnormals_round_to_even_on_both_passes():
    """Every midpoint between two e4m3 values (subnormal and normal, both signs) in a block whose amax is 448, so
    its scale is 1 and each value lands on its tie exactly."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # 0 … 448, no NaN
    mids = torch.cat([(codes[:-1] + codes[1:]) / 2, codes])
    values = torch.cat([mids, -mids])
    cp = torch.full((128, 512), 448.0, dtype=torch.float64)  # column 127 of each block: its amax
    for b, chunk in enumerate(values.split(127)):
        cp[:, b * 128 : b * 128 + chunk.numel()] = chunk
    cp = cp.to(torch.bfloat16).flatten()  # midpoints need 4 significant bits: exact in bfloat16
    assert torch.equal(
        torch.cat([cp.double().view(128, 512)[0, b * 128 : b * 128 + 127] for b in range(4)])[:506], values
    )
    want_q, want_s = quantize(cp.double().view(128, 512).numpy())
    assert (want_s == 1.0).all()
    for run in (combine_fp8, _triton):
        out, scale = torch.empty(128 * 512, dtype=torch.float8_e4m3fn), torch.empty(4, dtype=torch.float32)
        run(out, scale, cp, [], 512, *([Fp8Scratch()] if run is combine_fp8 else []))
        assert_fp8_equal(out, want_q)
        assert torch.equal(bits(scale), bits(torch.from_numpy(want_s).flatten()))
    assert (e4m3(np.array([0.5 * 2**-9, 1.5 * 2**-9, 17.0, 19.0])) == [0.0, 2 * 2**-9, 16.0, 20.0]).all()


def test_a_gpu_worker_writes_the_cpu_workers_bytes(models, tmp_path, monkeypatch):
    """The worker with the Triton pass (interpreted here) against the CPU pass: same shards, same manifest."""
    from chatvec_dist.exec import worker
    from chatvec_dist.exec.compute import TritonCompute

    api.merge(models["base8"], models["chat"], models["cp8"], tmp_path / "cpu", options=LOCAL, unit_bytes=65536)
    monkeypatch.setattr(worker, "make_compute", lambda device, strict: TritonCompute(torch.device("cpu")))
    api.merge(models["base8"], models["chat"], models["cp8"], tmp_path / "gpu", options=LOCAL, unit_bytes=65536)
    for a, b in zip(sorted((tmp_path / "cpu").glob("*.safetensors")), sorted((tmp_path / "gpu").glob("*.safetensors"))):
        assert a.read_bytes() == b.read_bytes()
    assert api.verify(tmp_path / "gpu") == []


def test_compiled_for_an_h100_the_fp8_kernel_rounds_as_the_cpu_does():
    """What bit identity on hardware depends on, from the PTX for sm_90 (no GPU needed): no FMA contraction, no
    flushed denormals, no argument narrowed to float32, and both float32 divisions correctly rounded."""
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here.parent), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(here / "compile_fp8_for_gpu.py")], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    calls = json.loads(done.stdout)
    assert [len(c) for c in calls] == [1, 1, 2]
    for facts in (f for c in calls for f in c):
        assert facts["cubin_bytes"] > 0
        assert (facts["fma"], facts["ftz"], facts["f32_params"], facts["div_inexact"]) == (0, False, 0, 0), facts
    assert calls[0][0]["div_rn"] > 0  # the requantizing launch


# ---- extract / apply, exclusions, batches, Ray ----


def test_extract_from_fp8_then_apply_to_an_fp8_cp(models, tmp_path):
    from chatvec_dist.cli import main

    vec, out = tmp_path / "vector", tmp_path / "applied"
    common = ["--no-progress", "--backend", "local"]
    assert (
        main(["extract", "--base", str(models["base"]), "--chat", str(models["chat8"]), "--out", str(vec)] + common)
        == 0
    )
    assert main(["apply", "--vector", str(vec), "--cp", str(models["cp8"]), "--out", str(out)] + common) == 0
    files: dict[Path, dict[str, torch.Tensor]] = {}
    vector = {k: v for f in sorted(vec.glob("*.safetensors")) for k, v in load_file(f).items()}
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert not any(n.endswith("_scale_inv") for n in vector)
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    chat, base = _operand(models["chat8"], name, files), _operand(models["base"], name, files)
    want_v = torch.from_numpy(chat - base).to(torch.float32)
    assert vector[name].dtype == torch.float32 and torch.equal(bits(vector[name]), bits(want_v))
    applied = _operand(models["cp8"], name, files) + want_v.double().numpy()
    want_q, want_s = quantize(applied.astype(np.float32))
    assert_fp8_equal(got[name], want_q)
    assert torch.equal(bits(got[name + "_scale_inv"]), bits(torch.from_numpy(want_s)))


def test_an_excluded_fp8_weight_keeps_its_codes_and_scales(models, tmp_path):
    out = tmp_path / "out"
    api.merge(models["base8"], models["chat8"], models["cp8"], out, options=LOCAL, exclude=re.escape(W))
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    cp = {k: v for f in sorted(models["cp8"].glob("*.safetensors")) for k, v in load_file(f).items()}
    for name in (W, W + "_scale_inv"):
        assert torch.equal(bits(got[name]), bits(cp[name]))
    other = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(bits(got[other]), bits(cp[other]))  # merged and requantized


def test_batched_fp8_and_bf16_cps_are_refused_by_name(models, tmp_path):
    recipe = api.make_recipe(models["base"], models["chat"], {"a": models["cp8"], "b": models["cp"]}, tmp_path)
    with pytest.raises(PlanError, match="differ in tensor names"):
        api.plan(recipe)


def test_ray_workers_write_the_local_bytes(models, tmp_path, ray_local):
    local, ray = tmp_path / "local", tmp_path / "ray"
    api.merge(models["base8"], models["chat"], models["cp8"], local, options=LOCAL, unit_bytes=65536)
    options = RunOptions(backend="ray", workers=2, progress=False)
    api.merge(models["base8"], models["chat"], models["cp8"], ray, options=options, unit_bytes=65536)
    for a, b in zip(sorted(local.glob("*.safetensors")), sorted(ray.glob("*.safetensors"))):
        assert a.read_bytes() == b.read_bytes()


def test_a_whole_fp8_weight_is_one_unit_with_its_scales(models, tmp_path):
    planned = api.plan(api.make_recipe(models["base"], models["chat"], models["cp8"], tmp_path, unit_bytes=8192))
    tensors = [p.tensor for p in planned.targets[0].layout.tensors]
    for unit in planned.units:
        for piece in unit.pieces:
            t = tensors[piece.index]
            if t.out_dtype == "F8_E4M3":
                assert (piece.first, piece.last) == (0, t.numel)
                scale = next(p for p in unit.pieces if tensors[p.index].name == t.name + "_scale_inv")
                assert (tensors[scale.index].rule, scale.index) == ("scale", piece.index + 1)
    largest = max(u.nbytes for u in planned.units)
    assert largest == 320 * 160 + 3 * 2 * 4 > 8192  # up_proj and its scales
    from chatvec_dist.planning.table import needs

    assert "buffers of a few units per worker (up to 50 KiB each)" in needs(planned)
