"""Pair tensors across checkpoints and decide, for each output tensor, what happens to it."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from dataclasses import dataclass
from typing import NamedTuple

from ..dtypes import FLOAT_DTYPES, OUTPUT_DTYPES, is_float
from ..errors import PlanError
from ..io.checkpoint import Checkpoint, TensorRef
from ..pickling import by_fields
from ..quickinit import maker, quick_init
from ..recipe.spec import Dare, Target
from ..term import Term, make_term
from .alphas import tensor_alphas
from .experts import MappedRef, Segment, map_experts
from .sparsity import TermDare, TiesPlan, sparsify
from .tied import tied_heads
from .vectors import Side, Sides, side

# Tensors whose rows are tokens: Llama/Mistral/Qwen, GPT-2, BLOOM, InternLM, GPT-NeoX, ChatGLM, Mamba, Phi's head bias,
# T5/BART/mBART/Marian's shared embedding; and BART's final_logits_bias [1, V], tokens on its last dimension.
VOCAB_MODULES = (
    "embed_tokens",
    "wte",
    "word_embeddings",
    "tok_embeddings",
    "embed_in",
    "embed_out",
    "embeddings",
    "shared",
    "output_layer",
)
VOCAB_TENSOR = re.compile(
    rf"(?:^|\.)(?:{'|'.join(VOCAB_MODULES)})\.weight$|(?:^|\.)lm_head\.(?:weight|bias)$|^output\.weight$|"
    r"(?:^|\.)final_logits_bias$"
)
# VOCAB_TENSOR's names by their last two parts (or the whole name, `output.weight`, or the last, final_logits_bias)
_VOCAB_ENDS = {(m, "weight") for m in VOCAB_MODULES} | {("lm_head", "weight"), ("lm_head", "bias")}
_ENDINGS = (
    *(f"{m}.weight" for m in VOCAB_MODULES),
    "lm_head.weight",
    "lm_head.bias",
    "output.weight",
    "final_logits_bias",
)
_ENDINGS += tuple(e + "\n" for e in _ENDINGS)  # every name VOCAB_TENSOR finds ends so
VOCAB_LAST = re.compile(r"(?:^|\.)final_logits_bias$")  # [1, V]: one row, the first V_base elements are shared


_ALPHA, _PLUS, _MINUS = operator.itemgetter(0), operator.itemgetter(0), operator.itemgetter(1)  # of a Term, a pair


class _Hashed:
    """Room for a Src's hash, made on first use (sources key the dicts of every piece's inputs): a slot that is
    no dataclass field."""

    __slots__ = ("_hash",)
    _hash: int


@by_fields
@quick_init
@dataclass(frozen=True, slots=True)
class Src(_Hashed):
    """A source tensor's data: file, absolute byte offset, dtype; or, for fused experts stored per expert, the
    segments read end to end (`path`/`start`: the first's)."""

    path: str
    start: int
    dtype: str
    segments: tuple[Segment, ...] = ()
    scale: Src | None = None  # a block-scaled FP8 weight's float32 scales (planning/fp8.py)

    def __hash__(self) -> int:  # the dataclass's (a hash of the fields' tuple), kept
        found = getattr(self, "_hash", None)  # not try/except: a raised AttributeError costs twice as much
        if found is None:
            found = hash((self.path, self.start, self.dtype, self.segments, self.scale))
            object.__setattr__(self, "_hash", found)
        return found

    @property
    def files(self) -> tuple[str, ...]:
        """Every file this source reads (an FP8 weight's scales too: they may sit in another shard)."""
        own = tuple(dict.fromkeys(p for p, _, _ in self.segments)) if self.segments else (self.path,)
        return own + (self.scale.files if self.scale is not None else ())


class _Derived:
    """Room for a PlannedTensor's `srcs` and `vector_srcs`, made on first use (a run asks hundreds of thousands of
    times): slots that are no dataclass field, so never compared, printed, pickled or replaced."""

    __slots__ = ("_srcs", "_vector_srcs")
    _srcs: tuple[Src, ...]
    _vector_srcs: tuple[Src, ...]


@by_fields
@quick_init
@dataclass(frozen=True, slots=True)
class PlannedTensor(_Derived):
    """One output tensor: `out[:merge_elems] = cp + Σ alpha·(plus − minus)`, the rest a copy of CP."""

    name: str
    rule: str  # merge | merge_rows | copy
    reason: str
    shape: tuple[int, ...]
    out_dtype: str
    cp: Src | None
    terms: tuple[Term, ...]  # of Src
    merge_elems: int
    rows: tuple[tuple[int, int], ...] = ()  # (CP row, chat row): this output row is the chat tensor's (tokens.py)
    row_src: Src | None = None  # the chat tensor the rows come from
    dare: tuple[TermDare | None, ...] = ()  # per term where any vector has DARE here
    ties: TiesPlan | None = None  # the target's TIES

    @property
    def vector_srcs(self) -> tuple[Src, ...]:
        """Every chat/base (or extracted vector) source this tensor reads."""
        found = getattr(self, "_vector_srcs", None)
        return found if found is not None else self._derive()[1]

    @property
    def srcs(self) -> tuple[Src, ...]:
        """Every source this tensor reads: CP's, then the vectors', then the chat tensor its token rows come from."""
        found = getattr(self, "_srcs", None)
        return found if found is not None else self._derive()[0]

    def _derive(self) -> tuple[tuple[Src, ...], tuple[Src, ...]]:
        """(`srcs`, `vector_srcs`), kept in their slots."""
        vector = tuple(s for _, plus, minus in self.terms for s in (plus, minus) if s is not None)
        rows = (self.row_src,) if self.row_src is not None else ()
        found = ((self.cp,) if self.cp is not None else ()) + vector + rows
        object.__setattr__(self, "_vector_srcs", vector)
        object.__setattr__(self, "_srcs", found)
        return found, vector

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_make_src, make_planned = maker(Src), maker(PlannedTensor)  # a few per tensor: by the hundred thousand


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

    def with_alphas(self, alphas: tuple[float, ...] | None) -> Sources:
        """These sources with each vector's alpha replaced (None: as they are)."""
        if alphas is None:
            return self
        terms = tuple(Term(a, plus, minus) for a, (_, plus, minus) in zip(alphas, self.terms))
        return dataclasses.replace(self, terms=terms)


def plan_tensors(target: Target, sources: Sources, sides: Sides | None = None) -> list[PlannedTensor]:
    """Decide every output tensor's rule for one target, validating names, shapes and dtypes (the target's own
    fields were checked when it was made); `sides`: the job's vector sides, shared by its targets. Raises
    PlanError."""
    try:
        excludes = [re.compile(p) for p in target.exclude]
    except re.error as e:
        raise PlanError(f"invalid exclude pattern: {e}") from None
    from . import fp8  # builds on this module

    sources, scales = fp8.split_scales(sources)
    reference = sources.cp if sources.cp is not None else sources.terms[0].minus or sources.terms[0].plus
    out_dtype = OUTPUT_DTYPES.get(target.dtype or "", "F32" if sources.cp is None else None)
    names = _all_names(sources)
    for pattern in excludes:
        if not any(pattern.search(n) for n in names):
            raise PlanError(f"--exclude {pattern.pattern!r} matches no tensor of target '{target.name}' (a typo?)")
    excluded = {n for n in names if any(p.search(n) for p in excludes)}
    sources = _map_experts(reference, sources, excluded)
    non_float = {n for n, r in reference.tensors.items() if not is_float(r.info.dtype)}
    tied = tied_heads(sources)  # CP's lm_head: the vectors' tied embedding
    _check_name_sets(reference, sources, excluded | non_float | set(tied))
    keep_cp = excluded | non_float  # never combined: merge/apply copy CP's value, extract leaves them out
    files = {n: r.path for n, r in reference.tensors.items()}
    combined = (n for n in reference.tensors if n not in keep_cp)
    alphas = tensor_alphas(target, reference.tensors, combined, files)  # the output's names: MoE experts as CP's
    vectors = (sides or Sides()).of(sources)
    present = _present([reference, *(c for _, plus, minus in sources.terms for c in (plus, minus) if c is not None)])
    planned = [
        _plan_one(
            name,
            ref,
            target.vocab,
            out_dtype,
            sources.with_alphas(alphas.get(name)),
            excluded,
            side(vectors, tied.get(name, name), sources),
            scales,
            present,
        )
        for name, ref in reference.tensors.items()
        if not (sources.cp is None and name in keep_cp)
    ]
    if target.ties is not None or any(sources.dares):  # else sparsify leaves every tensor as it is
        planned = [sparsify(t, sources.dares, target.ties) for t in planned]
    tensors = fp8.attach(planned, scales)
    fp8.check_not_sparse(tensors)
    return tensors


class _Present(NamedTuple):
    """Which dtypes the reference and the vectors hold: per-tensor checks that cannot fail without them are
    skipped (each costs a 45 k-tensor plan some 25 ms)."""

    non_float: bool
    fp8: bool


def _present(ckpts: list[Checkpoint]) -> _Present:
    dtypes = set().union(*({r.info.dtype for r in c.tensors.values()} for c in ckpts))
    return _Present(not dtypes <= FLOAT_DTYPES, any(d.startswith("F8") for d in dtypes))


def _map_experts(reference: Checkpoint, sources: Sources, excluded: set[str]) -> Sources:
    """Every vector checkpoint with its MoE experts in the reference's layout (per expert or fused)."""
    terms = tuple(
        Term(a, map_experts(reference, p, excluded), map_experts(reference, m, excluded) if m else None)
        for a, p, m in sources.terms
    )
    return dataclasses.replace(sources, terms=terms)


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
    name: str,
    ref: TensorRef,
    policy: str,
    out_dtype: str | None,
    sources: Sources,
    excluded: set[str],
    vector: Side,
    scales: dict[tuple[str, int], Src],
    present: _Present,
) -> PlannedTensor:
    """`vector`: the tensor's entries in the vectors (a tied head's: their embedding's); `present`: the dtypes
    that the checkpoints hold."""
    info = ref.info
    cp = _make_src(ref.path, info.start, info.dtype) if sources.cp is not None else None
    vecs = vector.vecs
    if present.non_float:
        _check_floats_match(name, ref, vecs)
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
    if present.fp8 and (info.dtype.startswith("F8") or any(v.info.dtype.startswith("F8") for v in vecs)):
        _check_fp8(name, ref, vecs, scales)
    vocab = _vocab_dim(name, ref, vecs)
    if not vector.alike():  # else there is nothing to check
        _check_vector_shapes(name, vecs, vocab)
    terms = _terms(sources.terms, vector.srcs(_src))
    if vocab is not None:
        return _plan_vocab(name, ref, policy, dtype, cp, terms, vecs, vocab)
    if vecs[0].info.shape != info.shape:
        raise PlanError(
            f"shape {list(info.shape)} differs from {list(vecs[0].info.shape)} in {vecs[0].path}",
            file=ref.path,
            tensor=name,
        )
    mapped = "experts:mapped" if vector.mapped() else ""  # from the other layout
    return make_planned(name, "merge", mapped, info.shape, dtype, cp, terms, info.numel)


def _check_fp8(name: str, ref: TensorRef, vecs: list[TensorRef], scales: dict[tuple[str, int], Src]) -> None:
    """A float8 tensor that is combined: block-scaled, and (for now) stored in CP's experts layout."""
    from .fp8 import check_scaled, is_fp8  # builds on this module

    for v in vecs:
        if isinstance(v, MappedRef) and is_fp8(v.info.dtype):
            raise PlanError(
                "FP8 experts stored in another layout than CP's (per expert vs fused) cannot be mapped yet: their "
                "block scales would not follow; store the vectors in CP's layout",
                file=v.path,
                tensor=name,
            )
    check_scaled(name, [ref, *vecs], scales)


def _terms(vectors: tuple[Term, ...], srcs: list[tuple[Src, Src | None]]) -> tuple[Term, ...]:
    """Each vector's alpha with the tensor's plus and minus sources."""
    if len(srcs) == 1:  # one vector
        return (make_term((vectors[0][0], *srcs[0])),)
    return tuple(map(Term, map(_ALPHA, vectors), map(_PLUS, srcs), map(_MINUS, srcs)))


def _src(ref: TensorRef) -> Src:
    if type(ref) is TensorRef:
        return _make_src(ref.path, ref.info.start, ref.info.dtype)
    return Src(ref.path, ref.info.start, ref.info.dtype, ref.segments if isinstance(ref, MappedRef) else ())


def _check_floats_match(name: str, ref: TensorRef, vecs: list[TensorRef]) -> None:
    """A tensor that is float in one checkpoint must be float in all (an int buffer is copied, never combined)."""
    wanted = is_float(ref.info.dtype)
    for other in vecs:
        if is_float(other.info.dtype) != wanted:
            raise PlanError(
                f"dtype {other.info.dtype} cannot be combined with {ref.info.dtype} in {ref.path}",
                file=other.path,
                tensor=name,
            )


def is_vocab_name(name: str) -> bool:
    """Whether VOCAB_TENSOR matches, told by the name's ending, then its last two parts (0.15 µs, a search 1 µs;
    `$` matches before a final newline too)."""
    if not name.endswith(_ENDINGS):  # most names: one C call
        return False
    parts = (name[:-1] if name.endswith("\n") else name).rsplit(".", 2)
    if parts[-1] == "final_logits_bias":
        return True
    if len(parts) < 2:
        return False
    return (parts[-2], parts[-1]) in _VOCAB_ENDS or parts == ["output", "weight"]


def _vocab_dim(name: str, ref: TensorRef, vecs: list[TensorRef]) -> int | None:
    """The dimension of a vocabulary tensor's tokens (None: not one): rows, or the last of BART's [1, V] bias."""
    if not is_vocab_name(name):
        return None
    refs = [ref, *vecs]
    if not all(t.info.shape for t in refs):  # a scalar has no rows
        return None
    if VOCAB_LAST.search(name) is None:
        return 0
    for t in refs:
        if len(t.info.shape) != 2 or t.info.shape[0] != 1:
            raise PlanError(f"shape {list(t.info.shape)}: expected [1, vocabulary]", file=t.path, tensor=name)
    return 1


def _outside(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return shape[:dim] + shape[dim + 1 :]


def _check_vector_shapes(name: str, vecs: list[TensorRef], vocab: int | None) -> None:
    """Chat and base shapes agree; a chat model may add tokens (rows) to its base's vocabulary, nothing else."""
    vec_shape = vecs[0].info.shape
    dim = vocab or 0
    for other in vecs:
        shape = other.info.shape
        if (
            _outside(shape, dim) != _outside(vec_shape, dim)
            or len(shape) != len(vec_shape)
            or (shape != vec_shape and vocab is None)
        ):
            where = " outside the vocabulary dimension" if vocab is not None else ""
            raise PlanError(
                f"shape {list(shape)} differs from {list(vec_shape)} in {vecs[0].path}{where}",
                file=other.path,
                tensor=name,
            )


def _plan_vocab(
    name: str,
    ref: TensorRef,
    policy: str,
    dtype: str,
    cp: Src | None,
    terms: tuple[Term, ...],
    vecs: list[TensorRef],
    dim: int,
) -> PlannedTensor:
    """embed_tokens / lm_head: rows (dimension `dim`, the last of a [1, V] bias) are tokens. Vectors combine over
    the rows every chat and base have (a chat model's added tokens have no base row); CP's rows past those keep CP's
    values (`overlap`) or all do (`skip`). Those rows are the first elements: no dimension before `dim` is over 1."""
    shape = ref.info.shape
    fewest = min(vecs, key=lambda v: v.info.shape[dim])
    rows = fewest.info.shape[dim]
    if len(shape) != len(fewest.info.shape) or _outside(shape, dim) != _outside(fewest.info.shape, dim):
        raise PlanError(
            f"shape {list(shape)} differs from {list(fewest.info.shape)} in {fewest.path} outside the "
            "vocabulary dimension",
            file=ref.path,
            tensor=name,
        )
    size = shape[dim]
    if size < rows:
        raise PlanError(
            f"vocabulary of {size} rows is smaller than the {rows} rows of {fewest.path}",
            file=ref.path,
            tensor=name,
        )
    equal = all(v.info.shape == shape for v in vecs)
    if policy == "auto":  # an extracted vector keeps the rows chat and base share
        policy = "full" if equal else "skip" if cp is not None else "overlap"
    if policy == "full" and not equal:
        other = next(v for v in vecs if v.info.shape != shape)
        raise PlanError(
            f"--vocab full needs equal shapes, but this has {size} rows and {other.path} "
            f"{other.info.shape[dim]} (use --vocab skip or overlap)",
            file=ref.path,
            tensor=name,
        )
    if cp is None and (policy == "skip" or rows < size):
        raise PlanError(
            f"an extracted vector has no CP rows to keep: {fewest.path} has {rows} rows and {ref.path} "
            f"{size} (merge directly with --vocab skip or overlap)",
            file=ref.path,
            tensor=name,
        )
    reason = f"vocab:{policy}"
    if policy == "skip":
        return PlannedTensor(name, "copy", reason, shape, dtype, cp, (), 0)
    merged = ref.info.numel // size * rows if size else 0
    rule = "merge" if rows == size else "merge_rows"
    return PlannedTensor(name, rule, reason, shape, dtype, cp, terms, merged)
