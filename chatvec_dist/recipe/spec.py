"""The recipe (what to compute) and the run options (how), as frozen dataclasses."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from ..dtypes import OUTPUT_DTYPES

MiB = 1024 * 1024
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB', '64MiB' or '1000000' as bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 64MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


VOCAB_POLICIES = ("auto", "skip", "overlap", "full")
BACKENDS = ("ray", "local")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Vector:
    """A chat vector `chat − base`; `base` is None for a vector already extracted to its own checkpoint."""

    chat: str
    base: str | None

    def __post_init__(self) -> None:
        _paths(self, "chat", "base")


@dataclass(frozen=True)
class Target:
    """One output model: `out = cp + Σ alphas[i] · vector_i`, or, without `cp`, the vectors themselves (extract)."""

    name: str
    cp: str | None
    out: str
    alphas: tuple[float, ...]
    vocab: str = "auto"
    exclude: tuple[str, ...] = ()
    dtype: str | None = None  # output dtype name; default: CP's (float32 for an extracted vector)

    def __post_init__(self) -> None:
        _paths(self, "cp", "out")
        where = f"target {self.name!r}"
        _check(isinstance(self.name, str) and isinstance(self.out, str), f"{where}: name and out must be text")
        _check(
            isinstance(self.alphas, tuple) and all(_real(a) and abs(a) <= FLOAT32_MAX for a in self.alphas),
            f"{where}: alphas {list(self.alphas) if isinstance(self.alphas, tuple) else self.alphas!r} must be "
            "finite numbers within float32's range, |alpha| ≤ 3.4e38 (a tuple)",
        )
        _check(
            self.vocab in VOCAB_POLICIES, f"{where}: vocab {self.vocab!r}: choose one of {', '.join(VOCAB_POLICIES)}"
        )
        _check(
            isinstance(self.exclude, tuple) and all(isinstance(x, str) for x in self.exclude),
            f"{where}: exclude {self.exclude!r} must be a tuple of regexes (text)",
        )
        _check(
            self.dtype is None or self.dtype in OUTPUT_DTYPES,
            f"{where}: dtype {self.dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)} (or none: CP's)",
        )


@dataclass(frozen=True)
class Recipe:
    """Vectors shared by every target: each unit reads them once and serves all targets."""

    vectors: tuple[Vector, ...]
    targets: tuple[Target, ...]
    max_shard_size: int = 5 * 10**9
    unit_bytes: int = 64 * MiB
    chat_template_from_chat: bool = False

    def __post_init__(self) -> None:
        _check(
            isinstance(self.vectors, tuple) and all(isinstance(v, Vector) for v in self.vectors),
            "a recipe's vectors must be a tuple of Vector",
        )
        _check(
            isinstance(self.targets, tuple) and all(isinstance(t, Target) for t in self.targets),
            "a recipe's targets must be a tuple of Target",
        )
        for name in ("max_shard_size", "unit_bytes"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name} {value!r}: give a positive number of bytes (an int; parse_size('64MiB') reads text)",
            )
        _check(isinstance(self.chat_template_from_chat, bool), "chat_template_from_chat must be True or False")

    @property
    def kind(self) -> str:
        """What the recipe does, in a word (a recipe mixing extract and merge targets says extract)."""
        kinds = {self.kind_of(t) for t in self.targets}
        return "extract" if "extract" in kinds else kinds.pop() if kinds else "merge"

    def kind_of(self, target: Target) -> str:
        """What one target's output is: a chat vector (extract) or a model (merge, or apply of stored vectors)."""
        if target.cp is None:
            return "extract"
        return "apply" if all(v.base is None for v in self.vectors) else "merge"


@dataclass(frozen=True)
class RunOptions:
    """How to execute a recipe."""

    backend: str = "ray"  # ray | local
    workers: int | None = None  # default: one per CPU of the local machine / cluster
    cpus_per_worker: float = 1.0  # Ray CPUs each actor reserves
    device: str = "auto"  # auto (a GPU where the worker has one) | cpu | cuda
    address: str | None = None  # Ray cluster to join; default: RAY_ADDRESS or an embedded local Ray
    overwrite: bool = False
    restart: bool = False
    progress: bool = True
    fail_on_nonfinite: bool = False  # NaN/Inf in any output tensor: an error instead of counts in the manifest

    def __post_init__(self) -> None:
        from ..errors import ChatvecError

        _check(
            self.workers is None or isinstance(self.workers, int) and not isinstance(self.workers, bool),
            f"workers {self.workers!r}: give a whole number (or none)",
        )
        _check(_real(self.cpus_per_worker), f"cpus per worker {self.cpus_per_worker!r}: give a number")
        _check(self.address is None or isinstance(self.address, str), f"address {self.address!r}: give text")
        for flag in ("overwrite", "restart", "progress", "fail_on_nonfinite"):
            _check(isinstance(getattr(self, flag), bool), f"{flag} {getattr(self, flag)!r}: give True or False")
        if self.backend not in BACKENDS:
            raise ChatvecError(f"backend {self.backend!r}: choose {' or '.join(BACKENDS)}")
        if self.device not in DEVICES:
            raise ChatvecError(f"device {self.device!r}: choose {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
        if self.workers is not None and self.workers < 1:
            raise ChatvecError(f"workers {self.workers}: give at least 1 (or none: one per CPU or GPU)")
        if not self.cpus_per_worker > 0:
            raise ChatvecError(f"cpus per worker {self.cpus_per_worker}: must be positive")


def is_plain_name(name: object) -> bool:
    """A target name that can name a folder under the output root: one printable path component."""
    return (
        isinstance(name, str)
        and name.isprintable()
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\")
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        from ..errors import ChatvecError

        raise ChatvecError(message)


FLOAT32_MAX = 3.4028234663852886e38  # kernels scale in float32: a larger alpha would be Inf there


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _paths(obj: object, *names: str) -> None:
    """Path-like fields kept as text (a pathlib.Path is welcome); anything else is refused before any work."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(obj, name, os.fspath(value))
        elif not (value is None and name in ("base", "cp") or isinstance(value, str)):
            _check(False, f"{type(obj).__name__}.{name} {value!r}: give a path or a Hub id as text (or a pathlib.Path)")
