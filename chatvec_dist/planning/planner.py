"""Pair tensors across checkpoints and decide, for each output tensor, what happens to it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..dtypes import OUTPUT_DTYPES, is_float
from ..errors import PlanError
from ..io.checkpoint import Checkpoint, TensorRef
from ..recipe.spec import Dare, Target
from ..term import Term
from .sparsity import TermDare, TiesPlan, sparsify

# Tensors whose rows are tokens: Llama/Mistral/Qwen, GPT-2, BLOOM, InternLM, GPT-NeoX, ChatGLM, Mamba, Phi's head bias.
VOCAB_TENSOR = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embed_out|embeddings|"
    r"output_layer)\.weight$|(?:^|\.)lm_head\.(?:weight|bias)$|^output\.weight$"
)


@dataclass(frozen=True)
class Src:
    """A source tensor's data: file, absolute byte offset, dtype."""

    path: str
    start: int
    dtype: str


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: `out[:merge_elems] = cp + Σ alpha·(plus − minus)`, the rest a copy of CP."""

    name: str
    rule: str  # merge | merge_rows | copy
    reason: str
    shape: tuple[int, ...]
    out_dtype: str
    cp: Src | None
    terms: tuple[Term, ...]  # of Src
    merge_elems: int
    dare: tuple[TermDare | None, ...] = ()  # per term where any vector has DARE here
    ties: TiesPlan | None = None  # the target's TIES

    @property
    def vector_srcs(self) -> list[Src]:
        """Every chat/base (or extracted vector) source this tensor reads."""
        return [s for _, plus, minus in self.terms for s in (plus, minus) if s is not None]

    @property
    def srcs(self) -> list[Src]:
        """Every source this tensor reads: CP's, then the vectors'."""
        return ([self.cp] if self.cp is not None else []) + self.vector_srcs

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Sources:
    """The opened checkpoints of a recipe: CP (None when extracting) and each term's plus/minus."""

    cp: Checkpoint | None
    terms: tuple[Term, ...]  # of Checkpoint
    dares: tuple[Dare | None, ...] = ()  # each vector's DARE

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint opened for this target: CP, then each vector's plus and minus."""
        found = [self.cp] if self.cp is not None else []
        return found + [c for _, plus, minus in self.terms for c in (plus, minus) if c is not None]


def plan_tensors(target: Target, sources: Sources) -> list[PlannedTensor]:
    """Decide every output tensor's rule for one target, validating names, shapes and dtypes (the target's own
    fields were checked when it was made). Raises PlanError."""
    try:
        excludes = [re.compile(p) for p in target.exclude]
    except re.error as e:
        raise PlanError(f"invalid exclude pattern: {e}") from None
    reference = sources.cp if sources.cp is not None else sources.terms[0].minus or sources.terms[0].plus
    out_dtype = OUTPUT_DTYPES.get(target.dtype or "", "F32" if sources.cp is None else None)
    names = _all_names(sources)
    for pattern in excludes:
        if not any(pattern.search(n) for n in names):
            raise PlanError(f"--exclude {pattern.pattern!r} matches no tensor of target '{target.name}' (a typo?)")
    excluded = {n for n in names if any(p.search(n) for p in excludes)}
    non_float = {n for n, r in reference.tensors.items() if not is_float(r.info.dtype)}
    _check_name_sets(reference, sources, excluded | non_float)
    keep_cp = excluded | non_float  # never combined: merge/apply copy CP's value, extract leaves them out
    return [
        sparsify(_plan_one(name, ref, target.vocab, out_dtype, sources, excluded), sources.dares, target.ties)
        for name, ref in reference.tensors.items()
        if not (sources.cp is None and name in keep_cp)
    ]


def _all_names(sources: Sources) -> set[str]:
    return {name for ckpt in sources.checkpoints for name in ckpt.tensors}


def _check_name_sets(reference: Checkpoint, sources: Sources, excluded: set[str]) -> None:
    wanted = set(reference.tensors) - excluded
    for _, plus, minus in sources.terms:
        for ckpt in (plus, minus):
            if ckpt is None:
                continue
            have = set(ckpt.tensors) - excluded
            for name in sorted(wanted - have):
                raise PlanError(
                    f"missing here but present in {reference.directory}: the checkpoints must share an architecture",
                    file=str(ckpt.directory),
                    tensor=name,
                )
            for name in sorted(have - wanted):
                raise PlanError(
                    f"present here but missing in {reference.directory}: the checkpoints must share an architecture",
                    file=str(ckpt.directory),
                    tensor=name,
                )


def _plan_one(
    name: str, ref: TensorRef, policy: str, out_dtype: str | None, sources: Sources, excluded: set[str]
) -> PlannedTensor:
    info = ref.info
    cp = Src(ref.path, info.start, info.dtype) if sources.cp is not None else None
    pairs = [
        Term(alpha, plus.tensors.get(name), minus.tensors.get(name) if minus else None)
        for alpha, plus, minus in sources.terms
    ]
    _check_floats_match(name, ref, pairs)
    if not is_float(info.dtype):
        return PlannedTensor(name, "copy", "non-float", info.shape, info.dtype, cp, (), 0)
    dtype = out_dtype or info.dtype
    if name in excluded:
        if info.dtype.startswith("F8") and dtype != info.dtype:
            raise PlanError(
                f"an excluded {info.dtype} tensor cannot be converted to {dtype}: float8 weights are stored "
                "with separate scales (leave --dtype out to keep it as it is, or dequantize first)",
                file=ref.path,
                tensor=name,
            )
        return PlannedTensor(name, "copy", "excluded", info.shape, dtype, cp, (), 0)
    vecs = [other for _, plus, minus in pairs for other in (plus, minus) if other is not None]
    _check_not_float8(name, [ref, *vecs])
    vocab = VOCAB_TENSOR.search(name) is not None and all(t.info.shape for t in [ref, *vecs])  # rows: not a scalar
    _check_vector_shapes(name, vecs, vocab)
    terms = tuple(Term(alpha, _src(plus), _src(minus) if minus else None) for alpha, plus, minus in pairs)
    if vocab:
        return _plan_vocab(name, ref, policy, dtype, cp, terms, vecs)
    if vecs[0].info.shape != info.shape:
        raise PlanError(
            f"shape {list(info.shape)} differs from {list(vecs[0].info.shape)} in {vecs[0].path}",
            file=ref.path,
            tensor=name,
        )
    return PlannedTensor(name, "merge", "", info.shape, dtype, cp, terms, info.numel)


def _src(ref: TensorRef) -> Src:
    return Src(ref.path, ref.info.start, ref.info.dtype)


def _check_floats_match(name: str, ref: TensorRef, pairs: list[Term]) -> None:
    """A tensor that is float in one checkpoint must be float in all (an int buffer is copied, never combined)."""
    for _, plus, minus in pairs:
        for other in (plus, minus):
            if other is not None and is_float(other.info.dtype) != is_float(ref.info.dtype):
                raise PlanError(
                    f"dtype {other.info.dtype} cannot be combined with {ref.info.dtype} in {ref.path}",
                    file=other.path,
                    tensor=name,
                )


def _check_not_float8(name: str, refs: list[TensorRef]) -> None:
    for t in refs:
        if t.info.dtype.startswith("F8"):
            raise PlanError(
                f"{t.info.dtype} weights are stored with separate scales that a chat vector cannot account "
                "for: dequantize the checkpoints to bfloat16 first (or --exclude this tensor)",
                file=t.path,
                tensor=name,
            )


def _check_vector_shapes(name: str, vecs: list[TensorRef], vocab: bool) -> None:
    """Chat and base shapes agree; a chat model may add tokens (rows) to its base's vocabulary, nothing else."""
    vec_shape = vecs[0].info.shape
    for other in vecs:
        shape = other.info.shape
        if shape[1:] != vec_shape[1:] or len(shape) != len(vec_shape) or (shape != vec_shape and not vocab):
            where = " outside the vocabulary dimension" if vocab else ""
            raise PlanError(
                f"shape {list(shape)} differs from {list(vec_shape)} in {vecs[0].path}{where}",
                file=other.path,
                tensor=name,
            )


def _plan_vocab(
    name: str, ref: TensorRef, policy: str, dtype: str, cp: Src | None, terms: tuple[Term, ...], vecs: list[TensorRef]
) -> PlannedTensor:
    """embed_tokens / lm_head: rows are tokens. Vectors combine over the rows every chat and base have (a chat
    model's added tokens have no base row); CP's rows past those keep CP's values (`overlap`) or all do (`skip`)."""
    shape = ref.info.shape
    fewest = min(vecs, key=lambda v: v.info.shape[0])
    rows = fewest.info.shape[0]
    if len(shape) != len(fewest.info.shape) or shape[1:] != fewest.info.shape[1:]:
        raise PlanError(
            f"shape {list(shape)} differs from {list(fewest.info.shape)} in {fewest.path} outside the "
            "vocabulary dimension",
            file=ref.path,
            tensor=name,
        )
    if shape[0] < rows:
        raise PlanError(
            f"vocabulary of {shape[0]} rows is smaller than the {rows} rows of {fewest.path}",
            file=ref.path,
            tensor=name,
        )
    equal = all(v.info.shape == shape for v in vecs)
    if policy == "auto":  # an extracted vector keeps the rows chat and base share
        policy = "full" if equal else "skip" if cp is not None else "overlap"
    if policy == "full" and not equal:
        other = next(v for v in vecs if v.info.shape != shape)
        raise PlanError(
            f"--vocab full needs equal shapes, but this has {shape[0]} rows and {other.path} "
            f"{other.info.shape[0]} (use --vocab skip or overlap)",
            file=ref.path,
            tensor=name,
        )
    if cp is None and (policy == "skip" or rows < shape[0]):
        raise PlanError(
            f"an extracted vector has no CP rows to keep: {fewest.path} has {rows} rows and {ref.path} "
            f"{shape[0]} (merge directly with --vocab skip or overlap)",
            file=ref.path,
            tensor=name,
        )
    reason = f"vocab:{policy}"
    if policy == "skip":
        return PlannedTensor(name, "copy", reason, shape, dtype, cp, (), 0)
    merged = ref.info.numel // shape[0] * rows if shape[0] else 0
    rule = "merge" if rows == shape[0] else "merge_rows"
    return PlannedTensor(name, rule, reason, shape, dtype, cp, terms, merged)
