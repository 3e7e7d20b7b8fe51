"""Compile the merge kernel's launches for an H100 (sm_90) without a GPU and print what the PTX says, as JSON.

Run by tests/test_triton.py in a subprocess without TRITON_INTERPRET (the interpreter hides how a real GPU
compiles: argument types, FMA contraction, denormal flushing). The launches, their arguments' types and their
constexprs come from the launcher itself (`triton_merge.launches`) on small CPU tensors.
"""
from __future__ import annotations

import inspect
import json
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

from chatvec_dist.kernels import triton_merge

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# (output dtype, CP dtype or None, vector dtype, vectors, alpha, compute dtype)
CALLS = [
    (BF16, BF16, BF16, 1, 1.0, F32),  # the common merge
    (BF16, BF16, BF16, 1, 0.3, F32),
    (F32, BF16, BF16, 1, 0.3, torch.float64),  # a float32 output: float64 arithmetic, alpha in full
    (BF16, None, BF16, 1, 1.0, F32),  # extraction
    (F16, BF16, BF16, 0, 1.0, F32),  # a copy into another dtype
    (BF16, F16, F16, 6, 0.7, F32),  # more vectors than one launch takes
]


def ptx_facts(out_dtype, cp_dtype, vec_dtype, vectors, alpha, compute) -> list[dict]:
    n = 4096
    out = torch.empty(n, dtype=out_dtype)
    cp = torch.zeros(n, dtype=cp_dtype) if cp_dtype is not None else None
    terms = [(alpha, torch.zeros(n, dtype=vec_dtype), torch.zeros(n, dtype=vec_dtype) if i % 2 == 0 else None)
             for i in range(vectors)]
    acc, partials = torch.empty(n, dtype=compute), torch.empty(n, dtype=torch.float64)
    names = list(inspect.signature(triton_merge._merge_kernel.fn).parameters)
    facts = []
    for args, constexprs in triton_merge.launches(out, cp, terms, compute, acc, partials):
        signature = {name: mangle_type(arg) for name, arg in zip(names, args)} | {k: "constexpr" for k in constexprs}
        source = ASTSource(triton_merge._merge_kernel, signature,
                           constexprs={(names.index(k),): v for k, v in constexprs.items()})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=triton_merge.launch_options())
        ptx = kernel.asm["ptx"]
        facts.append({"fma": len(re.findall(r"\bfma\.", ptx)), "ftz": ".ftz" in ptx,
                      "f32_params": len(re.findall(r"\.param \.f32", ptx)), "cubin_bytes": len(kernel.asm["cubin"])})
    return facts


if __name__ == "__main__":
    print(json.dumps([ptx_facts(*call) for call in CALLS]))
