"""Where the arithmetic runs: the CPU kernel in place, or the Triton kernel on a GPU with async copies."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels.cpu import Scratch, combine
from ..kernels.fp8 import Fp8Scratch, Operand, combine_fp8
from ..kernels.sparse import Sparse
from ..kernels.stats import Stats
from ..planning.planner import Src
from ..term import Term


class CpuCompute:
    """Inputs stay where they were read; the chunked CPU kernel writes straight into the output buffer."""

    pinned = False
    runs_of_small = True  # small tensors end to end in one pass (exec/small_runs.py)
    strip_bytes = 1 << 20  # of output per step: the inputs, the output and its hash stay in cache
    device = torch.device("cpu")

    def __init__(self, fallback: str | None = None) -> None:
        self.scratch = Scratch()
        self.fp8_scratch: Fp8Scratch | None = None  # made on the first FP8 weight
        self.fallback = fallback  # why a GPU that `auto` offered is not used

    def upload(self, inputs: dict[Src, torch.Tensor]) -> dict[Src, torch.Tensor]:
        return inputs

    def combine(
        self,
        out: torch.Tensor,
        cp: torch.Tensor | None,
        terms: Sequence[Term],
        compute: torch.dtype,
        sparse: Sparse | None = None,
    ) -> Stats:
        return combine(out, cp, terms, compute, self.scratch, sparse)

    def combine_fp8(
        self, out: torch.Tensor, out_scale: torch.Tensor | None, cp: Operand | None, terms: Sequence[Term], cols: int
    ) -> Stats:
        """A [rows, cols] weight with block-scaled FP8 operands or output (kernels/fp8.py), tile by tile."""
        if self.fp8_scratch is None:
            self.fp8_scratch = Fp8Scratch()
        return combine_fp8(out, out_scale, cp, terms, cols, self.fp8_scratch)


class TritonCompute:
    """The fused Triton kernel on reused device buffers. On a GPU: pinned host buffers and copies on this thread's
    own stream. (On the CPU only under TRITON_INTERPRET=1: how the tests run this path without a GPU.)"""

    strip_bytes = 1 << 62  # whole pieces: large copies keep PCIe busy; each launch has a fixed cost
    fallback = None
    runs_of_small = False  # the stats come from the kernel

    def __init__(self, device: torch.device) -> None:
        from ..kernels.triton_merge import MAX_TERMS, TritonScratch, combine_triton
        from ..kernels.triton_ties import ties_triton

        self.device = device
        self.pinned = device.type == "cuda"
        if self.pinned:
            torch.cuda.set_device(device)  # this thread's launches go to its GPU
        self.stream = torch.cuda.Stream(device) if self.pinned else None  # torch.cuda.stream(None) does nothing
        self._kernel = combine_triton
        self._ties = ties_triton
        self._max_terms = MAX_TERMS  # TIES of more vectors: on the CPU kernel
        self._scratch = TritonScratch()  # the kernel's and this class's device buffers, reused
        self._cpu_scratch = Scratch()  # TIES: on the CPU kernel
        with torch.cuda.stream(self.stream):  # made where it is used: no other stream touches it
            stats = torch.zeros(5, dtype=torch.float64, device=device)
            probe = torch.zeros(1, dtype=torch.bfloat16, device=device)
            combine_triton(probe, probe, [], torch.float32, stats, self._scratch)  # Triton works here: now
        if self.stream is not None:
            self.stream.synchronize()

    def _buffer(self, key: object, nbytes: int) -> torch.Tensor:
        return self._scratch.get(key, nbytes, torch.uint8, self.device)

    def combine_fp8(
        self, out: torch.Tensor, out_scale: torch.Tensor | None, cp: Operand | None, terms: Sequence[Term], cols: int
    ) -> Stats:
        """The fused FP8 kernel (kernels/triton_fp8.py) on the uploaded operands; `out` and `out_scale` are host
        tensors, filled when this returns."""
        from ..kernels.triton_fp8 import combine_triton_fp8

        with torch.cuda.stream(self.stream):
            stats = self._scratch.get("stats", 5, torch.float64, self.device)
            stats.zero_()
            dev_out = self._buffer("out", out.numel() * out.element_size()).view(out.dtype)
            dev_scale = None
            if out_scale is not None:
                dev_scale = self._buffer("out-scale", out_scale.numel() * 4).view(torch.float32)
            combine_triton_fp8(dev_out, dev_scale, cp, terms, cols, stats, self._scratch)
            out.copy_(dev_out, non_blocking=True)
            if out_scale is not None and dev_scale is not None:
                out_scale.copy_(dev_scale, non_blocking=True)
            host = stats.to("cpu", non_blocking=True)
        return self._finish(host)

    def upload(self, inputs: dict[Src, torch.Tensor]) -> dict[Src, torch.Tensor]:
        """Start the host → device copies of a piece's inputs (each once, whatever the number of outputs)."""
        out = {}
        with torch.cuda.stream(self.stream):
            for slot, (src, host) in enumerate(inputs.items()):
                dev = self._buffer(("in", slot), host.numel() * host.element_size())
                dev.copy_(host.view(torch.uint8), non_blocking=True)
                out[src] = dev.view(host.dtype)
        return out

    def combine(
        self,
        out: torch.Tensor,
        cp: torch.Tensor | None,
        terms: Sequence[Term],
        compute: torch.dtype,
        sparse: Sparse | None = None,
    ) -> Stats:
        """Run the kernel on device, copy the result into the (pinned) host `out`, wait, return the stats. TIES of
        more vectors than one launch holds runs on the CPU kernel (its inputs copied back)."""
        ties = sparse is not None and sparse.ties is not None
        if ties and len(terms) > self._max_terms:
            return self._on_cpu(out, cp, terms, compute, sparse)  # type: ignore[arg-type]
        n_kept = len(terms) if sparse is not None else 0
        with torch.cuda.stream(self.stream):
            stats = self._scratch.get("stats", 5 + n_kept + 2 * ties, torch.float64, self.device)
            stats.zero_()
            dev_out = self._buffer("out", out.numel() * out.element_size()).view(out.dtype)
            if sparse is not None and ties:
                self._ties(dev_out, cp, terms, compute, stats, self._scratch, sparse)
            else:
                self._kernel(dev_out, cp, terms, compute, stats, self._scratch, sparse)
            out.copy_(dev_out, non_blocking=True)
            host = stats.to("cpu", non_blocking=True)
        return self._finish(host, n_kept, ties)

    def _finish(self, host: torch.Tensor, n_kept: int = 0, ties: bool = False) -> Stats:
        """Wait for this stream's work; the stats it copied to the host (DARE: a count kept per vector; TIES: then
        the agreeing and signed counts)."""
        if self.stream is not None:
            self.stream.synchronize()
        cp_sq, delta_sq, update_sq, nan, inf, *rest = (int(x) if i > 2 else x for i, x in enumerate(host.tolist()))
        agree, signed = rest[n_kept:] if ties else (0, 0)
        return Stats(cp_sq, delta_sq, update_sq, nan, inf, rest[:n_kept], agree, signed)

    def _on_cpu(
        self, out: torch.Tensor, cp: torch.Tensor | None, terms: Sequence[Term], compute: torch.dtype, sparse: Sparse
    ) -> Stats:
        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.cpu()

        with torch.cuda.stream(self.stream):
            cpu_terms = [Term(a, host(p), host(m)) for a, p, m in terms]
            return combine(out, host(cp), cpu_terms, compute, self._cpu_scratch, sparse)
