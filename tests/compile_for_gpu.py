"""Compile the merge kernel's launches for an H100 (sm_90) without a GPU and print what the PTX says, as JSON.

Run by tests/test_triton.py in a subprocess without TRITON_INTERPRET (the interpreter hides how a real GPU
compiles: argument types, FMA contraction, denormal flushing). The launches, their arguments' types and their
constexprs come from the launcher itself (`triton_merge.launches`) on small CPU tensors, specialized as Triton's
launcher would specialize them (16-byte aligned pointers and sizes divisible by 16, or not: each call is also
compiled on views one element off).
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

from chatvec_dist.kernels import triton_merge, triton_ties
from chatvec_dist.kernels.sparse import Sparse
from chatvec_dist.planning.sparsity import TiesPlan, term_dare
from chatvec_dist.recipe.spec import Dare

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# (output dtype, CP dtype or None, vector dtype, vectors, alpha, compute dtype)
CALLS = [
    (BF16, BF16, BF16, 1, 1.0, F32),  # the common merge
    (BF16, BF16, BF16, 1, 0.3, F32),
    (F32, BF16, BF16, 1, 0.3, F64),  # a float32 output: float64 arithmetic, alpha in full
    (BF16, None, BF16, 1, 1.0, F32),  # extraction
    (F16, BF16, BF16, 0, 1.0, F32),  # a copy into another dtype
    (BF16, F16, F16, 6, 0.7, F32),  # more vectors than one launch takes
    (F64, F64, BF16, 1, 0.3, F64),  # a float64 checkpoint
    (BF16, BF16, BF16, 3, 0.3, F32, "dare"),  # DARE on every other vector: the mask's integer hash
    (BF16, BF16, BF16, 3, 0.3, F32, "ties"),  # TIES (and DARE on every other vector): its own kernel
    (F32, BF16, F32, 2, 0.3, F64, "ties"),  # TIES in float64
]
NOT_SPECIALIZED = set(triton_merge._merge_kernel.do_not_specialize)  # alphas, DARE's salts and thresholds, first
NOT_SPECIALIZED |= set(triton_ties._ties_kernel.do_not_specialize)  # and TIES' divisor alphas and thresholds


def tensors(out_dtype, cp_dtype, vec_dtype, vectors, alpha, compute, *rest):
    """The call's tensors; `off` (the last) elements into their storage (off 1: pointers not 16-byte aligned, n
    odd); with DARE on every other vector where asked, and TIES."""
    *mode, off = rest

    def zeros(dtype):
        return torch.zeros(4096 + off, dtype=dtype)[off:]

    terms = [(alpha, zeros(vec_dtype), zeros(vec_dtype) if i % 2 == 0 else None) for i in range(vectors)]
    masks = tuple(term_dare(Dare(0.3, i), "w") if i % 2 == 0 else None for i in range(vectors)) if mode else ()
    ties = TiesPlan(0.2, True, 100, (5,) * vectors) if mode == ["ties"] else None
    sparse = Sparse(2**32 - 17, masks, ties) if mode else None
    return zeros(out_dtype), zeros(cp_dtype) if cp_dtype is not None else None, terms, compute, sparse


def ptx_facts(out, cp, terms, compute, sparse) -> list[dict]:
    acc, partials = torch.empty(out.numel(), dtype=compute), torch.empty(out.numel(), dtype=torch.float64)
    if sparse is not None and sparse.ties is not None:
        fn, calls = triton_ties._ties_kernel, [triton_ties.ties_launch(out, cp, terms, compute, partials, sparse)]
    else:
        fn, calls = triton_merge._merge_kernel, triton_merge.launches(out, cp, terms, compute, acc, partials, sparse)
    names = list(inspect.signature(fn.fn).parameters)
    facts = []
    for args, constexprs in calls:
        signature, attrs = {k: "constexpr" for k in constexprs}, {}
        for i, (name, arg) in enumerate(zip(names, args)):
            kind, spec = native_specialize_impl(BaseBackend, arg, False, name not in NOT_SPECIALIZED, True)
            signature[name] = kind
            if spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
        source = ASTSource(
            fn,
            signature,
            attrs=attrs,
            constexprs={(names.index(k),): v for k, v in constexprs.items()},
        )
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=triton_merge.launch_options())
        ptx = kernel.asm["ptx"]
        facts.append(
            {
                "fma": len(re.findall(r"\bfma\.", ptx)),
                "ftz": ".ftz" in ptx,
                "f32_params": len(re.findall(r"\.param \.f32", ptx)),
                "cubin_bytes": len(kernel.asm["cubin"]),
                "v4_loads": len(re.findall(r"ld\.global[.\w]*\.v4", ptx)),
                "inexact_div": len(re.findall(r"\bdiv\.(?:full|approx)", ptx)),
            }
        )
    return facts


if __name__ == "__main__":
    print(json.dumps([[ptx_facts(*tensors(*call, off)) for off in (0, 1)] for call in CALLS]))
