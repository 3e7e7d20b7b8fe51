"""Compile the FP8 kernel's launches for an H100 (sm_90) without a GPU and print what the PTX says, as JSON.

Run by tests/test_fp8.py in a subprocess without TRITON_INTERPRET (the interpreter runs Python, not PTX). The
launches come from the launcher itself (`triton_fp8.launches`) on small CPU tensors, specialized as Triton's
launcher would specialize them.
"""

from __future__ import annotations

import inspect
import json
import re

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from chatvec_dist.kernels import triton_fp8
from chatvec_dist.kernels.fp8 import Blocked

ALPHAS = {"a0", "a1", "a2", "a3"}  # the kernel's do_not_specialize
ROWS, COLS = 256, 384


def fp8() -> Blocked:
    return Blocked(torch.zeros(ROWS * COLS, dtype=torch.float8_e4m3fn), torch.ones(6, dtype=torch.float32))


def bf16() -> torch.Tensor:
    return torch.zeros(ROWS * COLS, dtype=torch.bfloat16)


# (output dtype, CP, vectors): requantized, dequantized into bfloat16, and six vectors (two launches)
CALLS = [
    (torch.float8_e4m3fn, fp8, [(0.3, bf16, bf16), (1.0, fp8, fp8)]),
    (torch.bfloat16, bf16, [(1.0, fp8, fp8)]),
    (torch.float32, fp8, [(0.7, fp8, None)] * 6),
]


def ptx_facts(out_dtype, cp, vectors) -> list[dict]:
    out = torch.zeros(ROWS * COLS, dtype=out_dtype)
    out_scale = torch.zeros(6, dtype=torch.float32) if out_dtype == torch.float8_e4m3fn else None
    terms = [(a, p(), m() if m is not None else None) for a, p, m in vectors]
    acc, partials = torch.empty(ROWS * COLS, dtype=torch.float64), torch.empty(30, dtype=torch.float64)
    names = list(inspect.signature(triton_fp8._fp8_kernel.fn).parameters)
    facts = []
    for args, constexprs in triton_fp8.launches(out, out_scale, cp(), terms, COLS, acc, partials):
        signature, attrs = {k: "constexpr" for k in constexprs}, {}
        for i, (name, arg) in enumerate(zip(names, args)):
            kind, spec = native_specialize_impl(BaseBackend, arg, False, name not in ALPHAS, True)
            signature[name] = kind
            if spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
        source = ASTSource(
            triton_fp8._fp8_kernel,
            signature,
            attrs=attrs,
            constexprs={(names.index(k),): v for k, v in constexprs.items()},
        )
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=triton_fp8.launch_options())
        ptx = kernel.asm["ptx"]
        facts.append(
            {
                "fma": len(re.findall(r"\bfma\.", ptx)),
                "ftz": ".ftz" in ptx,
                "f32_params": len(re.findall(r"\.param \.f32", ptx)),
                "div_rn": len(re.findall(r"\bdiv\.rn\.f32", ptx)),
                "div_inexact": len(re.findall(r"\bdiv\.(?:full|approx)\.", ptx)),
                "cubin_bytes": len(kernel.asm["cubin"]),
            }
        )
    return facts


if __name__ == "__main__":
    print(json.dumps([ptx_facts(*call) for call in CALLS]))
