"""The one device decision: where each worker computes, and what `auto` does where the GPU kernel cannot run.

`--device auto` uses a GPU wherever the worker has one and the kernel runs there, else the CPU (saying why once);
`cuda` stops instead; `cpu` never touches a GPU. No torch at import: the Ray driver decides without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ChatvecError
from ..log import logger

if TYPE_CHECKING:
    import torch

    from .compute import CpuCompute, TritonCompute

# Threads per worker. A CPU worker owns one core and works strip by strip in cache: a second thread only contends
# for the same core and the output files' locks (measured: slower). A GPU worker runs two, so that one unit's reads
# overlap another's copies and kernel.
PIPELINE = {"cpu": 1, "cuda": 2}


def pick_device(requested: str) -> torch.device:
    """`auto`: the GPU Ray (or CUDA_VISIBLE_DEVICES) gave this process, if any, else the CPU; `cuda:N`: that GPU."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ChatvecError("--device cuda, but this worker has no CUDA device (torch.cuda.is_available() is False)")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", torch.cuda.current_device())


def make_compute(device: torch.device, strict: bool) -> CpuCompute | TritonCompute:
    """The GPU kernel on a CUDA device, else the CPU kernel. Where the GPU kernel cannot run (no Triton, no C
    compiler for its launcher, an unsupported GPU): an error if `strict` (--device cuda), else the CPU kernel with
    the reason in its `fallback` (--device auto)."""
    from . import compute

    if device.type != "cuda":
        return compute.CpuCompute()
    try:
        return compute.TritonCompute(device)
    except Exception as e:  # ImportError, Triton's compile or launcher build, CUDA errors
        reason = f"the GPU kernel cannot run on {device} ({type(e).__name__}: {_gist(e)})"
        if strict:
            raise ChatvecError(f"--device cuda, but {reason}") from e
        return compute.CpuCompute(reason)


def local_devices(requested: str, workers: int | None) -> list[str]:
    """The device of each local thread: PIPELINE["cuda"] per GPU, spread over them, where the kernel runs on the
    first; else one thread per CPU (or `workers`)."""
    import os

    import torch

    gpus = torch.cuda.device_count() if requested != "cpu" and torch.cuda.is_available() else 0
    if gpus and requested == "auto" and (why := make_compute(torch.device("cuda", 0), strict=False).fallback):
        logger.warning(f"computing on the CPU, a thread per core: {why}")
        gpus, requested = 0, "cpu"
    count = max(1, workers or (PIPELINE["cuda"] * gpus if gpus else os.cpu_count() or 1))
    return [f"cuda:{i % gpus}" for i in range(count)] if gpus else [requested] * count


def cluster_device(requested: str, gpus: float) -> str:
    """What each Ray actor is told: the device asked for (one GPU per actor, `auto` falling back as above) where
    `cuda` is asked for or `auto` finds GPUs in the cluster, else `cpu` (a CPU actor on a GPU node still sees the
    node's GPUs: it must never use them)."""
    return requested if requested == "cuda" or (requested == "auto" and gpus > 0) else "cpu"


def _gist(e: Exception) -> str:
    """An error's first line (CUDA's cause) and, when it differs, its last (a compiler's point)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    return lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
