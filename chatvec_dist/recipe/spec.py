"""The recipe (what to compute) and the run options (how), as frozen dataclasses."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..dtypes import OUTPUT_DTYPES
from ..errors import ChatvecError
from .alpha_rules import AlphaRule, broadcast, problem

T = TypeVar("T")
MiB = 1024 * 1024
VOCAB_POLICIES = ("auto", "skip", "overlap", "full")
BACKENDS = ("ray", "local")
DEVICES = ("auto", "cpu", "cuda")
ALPHA = 1.0  # each vector's scale unless one is given
EXTRACT_DTYPE = "float32"  # an extracted vector's dtype unless one is given (it has no CP's to keep)
FLOAT32_MAX = 3.4028234663852886e38  # kernels scale in float32: a larger alpha would be Inf there
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


def human_bytes(n: int, binary: bool = False) -> str:
    """`n` bytes as people write them: `12.3 MB`, `1.5 GB`; binary units (`16 KiB`, `64 MiB`) for unit sizes."""
    step, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "KB", "MB", "GB", "TB"))
    value, unit = float(n), units[0]
    for bigger in units[1:]:
        if round(abs(value), 1) < step:
            break
        value, unit = value / step, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f}".removesuffix(".0") + f" {unit}"


class RecipeError(ChatvecError):
    """A recipe value that cannot be used. `field` names it and `detail` says what is wrong with it, so that a
    recipe file's reader can name the field and line instead of the dataclass."""

    def __init__(
        self, what: str, *, file: str | None = None, tensor: str | None = None, field: str = "", detail: str = ""
    ) -> None:
        super().__init__(what, file=file, tensor=tensor)
        self.field = field
        self.detail = detail or what


def broadcast_alphas(values: Sequence[T], n_vectors: int, name: str = "alphas") -> tuple[T, ...]:
    """One alpha for every vector, or one per vector (the rule of every front end: CLI, API, recipe file)."""
    if len(values) == 1:
        return tuple(values) * n_vectors
    plural = "s" * (n_vectors != 1)
    _check(
        len(values) == n_vectors,
        name,
        "alphas",
        f"{len(values)} values for {n_vectors} vector{plural}: give one value (for every vector) or one per vector",
    )
    return tuple(values)


def output_under(root: str | os.PathLike[str] | None, name: str) -> str:
    """The output folder of target `name` in a batch: `root/name` (an empty or missing root is refused: it
    would put the outputs in the current folder)."""
    root = os.fspath(root) if root is not None else ""
    _check(root != "", f"target {name!r}", "out", "no output root: give the folder the outputs go under")
    return os.path.join(root, name)


@dataclass(frozen=True)
class Dare:
    """DARE: each element of a vector's delta kept with probability `density` (a function of `seed`, the tensor's
    name and the element's index), and the kept ones scaled by 1/density."""

    density: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            _density(self.density) and self.density >= 2**-32,
            "dare",
            "density",
            f"density {self.density!r}: give a number in (0, 1] (at least 2^-32, the mask's resolution)",
        )
        _check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32,
            "dare",
            "seed",
            f"seed {self.seed!r}: give a whole number in [0, 2^32)",
        )


@dataclass(frozen=True)
class Ties:
    """TIES across a target's vectors: trim each to its top-`density` magnitudes per tensor, elect each element's
    sign by the sum of the weighted deltas, combine the entries that agree (their alpha-weighted mean where
    `normalize`, else their alpha-weighted sum)."""

    density: float
    normalize: bool = True

    def __post_init__(self) -> None:
        _check(_density(self.density), "ties", "density", f"density {self.density!r}: give a number in (0, 1]")
        _check(isinstance(self.normalize, bool), "ties", "normalize", "normalize: give True or False")


@dataclass(frozen=True)
class Vector:
    """A chat vector `chat − base`; `base` is None for a vector already extracted to its own checkpoint."""

    chat: str
    base: str | None
    dare: Dare | None = None

    def __post_init__(self) -> None:
        _paths(self, "vector", chat="a checkpoint folder or a Hub id", base="a checkpoint folder or a Hub id")
        _check(self.dare is None or isinstance(self.dare, Dare), "vector", "dare", "dare: give a Dare (or none)")


@dataclass(frozen=True)
class Target:
    """One output model: `out = cp + Σ alphas[i] · vector_i`, or, without `cp`, the vectors themselves (extract).
    `out` None plans without an output (`chatvec plan`); running needs one."""

    name: str
    cp: str | None
    out: str | None
    alphas: tuple[float, ...]
    vocab: str = "auto"
    exclude: tuple[str, ...] = ()
    dtype: str | None = None  # output dtype name; default: CP's (EXTRACT_DTYPE for an extracted vector)
    alpha_rules: tuple[AlphaRule, ...] = ()  # per-tensor alphas by name, first match wins; the rest get `alphas`
    # CP's rows of these token ids take the first chat model's rows: "auto" (by the chat template's tokens), or
    # (CP id, chat id) pairs (a dict is taken too); None: none
    special_tokens: str | tuple[tuple[int, int], ...] | None = None
    ties: Ties | None = None  # TIES across the vectors, instead of their plain weighted sum

    def __post_init__(self) -> None:
        where = f"target {self.name!r}"
        _token_pairs(self, where)
        _check(self.ties is None or isinstance(self.ties, Ties), where, "ties", "ties: give a Ties (or none)")
        _check(isinstance(self.name, str), where, "name", "give the name as text")
        _paths(self, where, cp="a checkpoint folder or a Hub id", out="an output folder")
        _as_tuple(self, "alphas", "exclude")
        _check(
            isinstance(self.alphas, tuple) and all(_number(a) for a in self.alphas),
            where,
            "alphas",
            f"alphas {self.alphas!r}: give numbers, one per vector (or one for all), e.g. alphas=(0.5,)",
        )
        _check(
            all(math.isfinite(a) and abs(a) <= FLOAT32_MAX for a in self.alphas),
            where,
            "alphas",
            f"alphas {list(self.alphas)} must be finite numbers within float32's range, |alpha| ≤ 3.4e38",
        )
        _check(
            self.vocab in VOCAB_POLICIES,
            where,
            "vocab",
            f"vocab {self.vocab!r}: choose one of {', '.join(VOCAB_POLICIES)}",
        )
        _check(
            isinstance(self.exclude, tuple) and all(isinstance(x, str) for x in self.exclude),
            where,
            "exclude",
            f"exclude {self.exclude!r}: give regexes as text, e.g. exclude=('lm_head',)",
        )
        _check(
            self.dtype is None or self.dtype in OUTPUT_DTYPES,
            where,
            "dtype",
            f"dtype {self.dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)} (or none: CP's)",
        )
        self._check_alpha_rules(where)

    def _check_alpha_rules(self, where: str) -> None:
        """Each rule valid for this target's vectors (a regex, numbers in float32's range), one entry per vector."""
        _as_tuple(self, "alpha_rules")
        rules = self.alpha_rules
        _check(
            isinstance(rules, tuple) and all(isinstance(r, AlphaRule) for r in rules),
            where,
            "alpha_rules",
            f"alpha_rules {rules!r}: give AlphaRule(match, alphas) values, e.g. (AlphaRule('norm', (0.0,)),)",
        )
        for rule in rules:
            wrong = problem(rule, len(self.alphas), FLOAT32_MAX)
            _check(wrong is None, where, "alpha_rules", wrong or "")
        object.__setattr__(self, "alpha_rules", tuple(broadcast(r, len(self.alphas)) for r in rules))


@dataclass(frozen=True)
class Recipe:
    """Vectors shared by every target: each unit reads them once and serves all targets."""

    vectors: tuple[Vector, ...]
    targets: tuple[Target, ...]
    max_shard_size: int = 5 * 10**9
    unit_bytes: int = 64 * MiB
    chat_template_from_chat: bool = False

    def __post_init__(self) -> None:
        _as_tuple(self, "vectors", "targets")
        _check(
            isinstance(self.vectors, tuple) and all(isinstance(v, Vector) for v in self.vectors),
            "",
            "vectors",
            "a recipe's vectors must be a tuple of Vector",
        )
        _check(
            isinstance(self.targets, tuple) and all(isinstance(t, Target) for t in self.targets),
            "",
            "targets",
            "a recipe's targets must be a tuple of Target",
        )
        for t in self.targets:
            _check(
                len(t.alphas) == len(self.vectors),
                f"target {t.name!r}",
                "alphas",
                f"{len(t.alphas)} alphas for {len(self.vectors)} vectors: give one per vector",
            )
        self._check_sizes()
        for t in self.targets:
            _check(
                t.special_tokens is None or bool(self.vectors) and self.vectors[0].base is not None,
                f"target {t.name!r}",
                "special_tokens",
                "special_tokens takes rows of the first vector's chat model, but it is an extracted vector "
                "(chat − base has no chat rows): merge with --base and --chat instead",
            )
        self._check_dare_scales()
        _check(
            isinstance(self.chat_template_from_chat, bool),
            "",
            "chat_template_from_chat",
            "chat_template_from_chat must be True or False",
        )

    def _check_dare_scales(self) -> None:
        """DARE scales a vector by alpha/density: it must stay within float32's range, as alphas do."""
        for t in self.targets:
            for i, (alpha, v) in enumerate(zip(t.alphas, self.vectors)):
                _check(
                    v.dare is None or abs(alpha / v.dare.density) <= FLOAT32_MAX,
                    f"target {t.name!r}",
                    "alphas",
                    f"alpha {alpha:g} of vector {i} over its DARE density is beyond float32's range (3.4e38)",
                )

    def _check_sizes(self) -> None:
        from ..planning.layout import check_max_shard_size, check_unit_bytes  # the layout's rules (no cycle here)

        for name, rule in (("max_shard_size", check_max_shard_size), ("unit_bytes", check_unit_bytes)):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                "",
                name,
                f"{name} {value!r}: give a positive number of bytes (an int; parse_size('64MiB') reads text)",
            )
            try:
                rule(value)
            except ChatvecError as e:
                raise RecipeError(e.what, field=name) from None

    def check_runnable(self) -> None:
        """Refuse a recipe planned without outputs (a target's `out` is None) before it is run."""
        for t in self.targets:
            _check(t.out is not None, f"target {t.name!r}", "out", "no output folder (out): give one to run it")

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
        _check(
            self.workers is None or isinstance(self.workers, int) and not isinstance(self.workers, bool),
            "",
            "workers",
            f"workers {self.workers!r}: give a whole number (or none)",
        )
        _check(
            _real(self.cpus_per_worker),
            "",
            "cpus_per_worker",
            f"cpus per worker {self.cpus_per_worker!r}: give a number",
        )
        _check(
            self.address is None or isinstance(self.address, str), "", "address", f"address {self.address!r}: give text"
        )
        for flag in ("overwrite", "restart", "progress", "fail_on_nonfinite"):
            _check(
                isinstance(getattr(self, flag), bool), "", flag, f"{flag} {getattr(self, flag)!r}: give True or False"
            )
        _check(self.backend in BACKENDS, "", "backend", f"backend {self.backend!r}: choose {' or '.join(BACKENDS)}")
        _check(
            self.device in DEVICES,
            "",
            "device",
            f"device {self.device!r}: choose {', '.join(DEVICES[:-1])} or {DEVICES[-1]}",
        )
        _check(
            self.workers is None or self.workers >= 1,
            "",
            "workers",
            f"workers {self.workers}: give at least 1 (or none: one per CPU or GPU)",
        )
        _check(
            self.cpus_per_worker > 0, "", "cpus_per_worker", f"cpus per worker {self.cpus_per_worker}: must be positive"
        )


def is_plain_name(name: object) -> bool:
    """A target name that can name a folder under the output root: one printable path component."""
    return (
        isinstance(name, str)
        and name.isprintable()
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\")
    )


def _check(ok: bool, where: str, field: str, detail: str) -> None:
    """Refuse `field` with `detail`; the message starts with `where` (which target, say) where there is one."""
    if not ok:
        raise RecipeError(f"{where}: {detail}" if where else detail, field=field, detail=detail)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _density(x: object) -> bool:
    return _number(x) and 0 < x <= 1  # type: ignore[operator]


def _real(x: object) -> bool:
    return _number(x) and math.isfinite(x)  # type: ignore[arg-type]


def _token_pairs(target: Target, where: str) -> None:
    """special_tokens as "auto", None, or sorted (CP id, chat id) pairs of ids ≥ 0, each CP id once."""
    value: object = target.special_tokens
    if isinstance(value, dict):  # the API's {CP id: chat id}
        value = tuple(value.items())
    if isinstance(value, (list, tuple)):
        value = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in value)
    _check(value is None or target.cp is not None, where, "special_tokens", "special_tokens needs a CP model")
    if value is None or value == "auto":
        return
    ok = (
        isinstance(value, tuple)
        and bool(value)
        and all(isinstance(p, tuple) and len(p) == 2 and all(_id(i) for i in p) for p in value)
    )
    _check(
        ok,
        where,
        "special_tokens",
        f"special_tokens {value!r}: give 'auto' or a map of CP token ids to chat token ids, e.g. {{32000: 32000}}",
    )
    assert isinstance(value, tuple)
    cp_ids = [p[0] for p in value]
    twice = sorted({i for i in cp_ids if cp_ids.count(i) > 1})
    _check(
        not twice,
        where,
        "special_tokens",
        f"special_tokens maps CP token(s) {', '.join(map(str, twice))} more than once",
    )
    object.__setattr__(target, "special_tokens", tuple(sorted(value)))


def _id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _as_tuple(obj: object, *names: str) -> None:
    """List fields taken as the tuples they are stored as."""
    for name in names:
        if isinstance(getattr(obj, name), list):
            object.__setattr__(obj, name, tuple(getattr(obj, name)))


def _paths(obj: object, where: str, **wanted: str) -> None:
    """Path-like fields kept as text (a pathlib.Path is welcome); None only where optional; never empty (an empty
    path would mean the current folder to the OS). `wanted`: each field's name → what it should be."""
    for name, what in wanted.items():
        value = getattr(obj, name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
            object.__setattr__(obj, name, value)
        if value is None and name in ("base", "cp", "out"):
            continue
        _check(isinstance(value, str), where, name, f"{name} {value!r}: give {what} as text (or a pathlib.Path)")
        _check(value != "", where, name, f"{name} is empty: give {what}")
