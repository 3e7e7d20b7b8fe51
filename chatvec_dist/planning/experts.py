"""MoE experts in either layout: per expert, as checkpoints ship them (`experts.N.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.N.w1.weight`), or fused, as transformers holds them (`experts.gate_up_proj` [E, 2·I, H]:
expert e's gate rows then its up rows; `experts.down_proj` [E, H, I]). Another checkpoint's experts are mapped onto
the reference's names and layout at plan time, exactly: a fused tensor is read as the per-expert tensors end to end,
a per-expert tensor as a slice of the fused one. Any other layout (transposed, interleaved) is refused."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..dtypes import ITEMSIZE
from ..errors import PlanError
from ..io.checkpoint import Checkpoint, TensorRef
from ..io.header import TensorInfo

if TYPE_CHECKING:
    from .planner import Src

FUSED = re.compile(r"^(?P<module>.+)\.experts\.(?P<role>gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(
    r"^(?P<module>.+)\.experts\.(?P<e>\d+)\.(?P<role>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
MIXTRAL_MODULE = re.compile(r"\.block_sparse_moe$")  # transformers calls it `mlp` once the experts are fused

Segment = tuple[str, int, int]  # (file, absolute byte offset, elements)


@dataclass(frozen=True)
class MappedRef(TensorRef):
    """A reference tensor that another checkpoint stores in the other experts layout: a slice of its fused tensor
    (`info.start`), or its per-expert tensors end to end in flat order (`segments`)."""

    segments: tuple[Segment, ...] = ()


@dataclass
class _Block:
    """One MoE block's experts in one checkpoint: fused tensors by role, or per-expert ones by (expert, role)."""

    module: str  # `model.layers.0.mlp`
    fused: dict[str, TensorRef] = field(default_factory=dict)  # gate_up_proj | down_proj
    experts: dict[tuple[int, str], tuple[str, TensorRef]] = field(default_factory=dict)  # (e, gate|up|down): name

    def names(self) -> set[str]:
        return {f"{self.module}.experts.{r}" for r in self.fused} | {n for n, _ in self.experts.values()}


def _blocks(ckpt: Checkpoint) -> dict[str, _Block]:
    """Each MoE block of a checkpoint, by its module path with Mixtral's `block_sparse_moe` read as `mlp`."""
    blocks: dict[str, _Block] = {}
    for name, ref in ckpt.tensors.items():
        if m := FUSED.match(name):
            block = blocks.setdefault(MIXTRAL_MODULE.sub(".mlp", m["module"]), _Block(m["module"]))
            block.fused[m["role"]] = ref
        elif m := PER_EXPERT.match(name):
            block = blocks.setdefault(MIXTRAL_MODULE.sub(".mlp", m["module"]), _Block(m["module"]))
            block.experts[(int(m["e"]), ROLES[m["role"]])] = (name, ref)
    return blocks


def map_experts(reference: Checkpoint, other: Checkpoint, excluded: set[str]) -> Checkpoint:
    """`other` with each MoE block that `reference` stores in the other layout under the reference's names (itself
    when none differ). Blocks whose every reference tensor is excluded are left as they are. Raises PlanError."""
    if other.tensors.keys() == reference.tensors.keys():  # the same names: nothing to map (checked per block else)
        return other
    theirs = _blocks(other)
    tensors, renamed = dict(other.tensors), []
    for key, ours in _blocks(reference).items():
        block = theirs.get(key)
        if block is None or ours.names() <= excluded or bool(ours.fused) == bool(block.fused):
            continue
        if ours.fused and not block.fused and block.experts:
            mapped = _fuse(ours, block, reference, other)
        elif ours.experts and block.fused and not block.experts:
            mapped = _split(ours, block, reference, other)
        else:
            continue  # both layouts in one block: the name check names what is missing
        for name in block.names():
            del tensors[name]
        renamed += [(theirs_name, ours_name) for ours_name, theirs_name in _sources(ours, block)]
        tensors |= mapped
        renamed += _rename_siblings(tensors, block.module, ours.module, reference)
    for theirs_name, ours_name in renamed:
        if theirs_name in excluded and ours_name not in excluded:
            raise PlanError(
                f"--exclude matches this tensor, which {reference.directory} holds as '{ours_name}': exclude by "
                "the reference's names (the output keeps them), so that no expert is left half merged",
                file=str(other.directory),
                tensor=theirs_name,
            )
    return dataclasses.replace(other, tensors=tensors) if renamed else other


def _sources(ours: _Block, theirs: _Block) -> list[tuple[str, str]]:
    """(reference name, other name) for every tensor of the block that feeds a reference tensor."""
    if ours.fused:
        return [
            (f"{ours.module}.experts.{'down_proj' if role == 'down' else 'gate_up_proj'}", name)
            for (_, role), (name, _) in theirs.experts.items()
        ]
    return [
        (name, f"{theirs.module}.experts.{'down_proj' if role == 'down' else 'gate_up_proj'}")
        for (_, role), (name, _) in ours.experts.items()
    ]


def _rename_siblings(tensors: dict[str, TensorRef], old: str, new: str, reference: Checkpoint) -> list[tuple[str, str]]:
    """Mixtral's router and the like: the block's other tensors, under the reference's module name."""
    if old == new:
        return []
    pairs = [
        (n, new + n[len(old) :])
        for n in tensors
        if n.startswith(old + ".") and new + n[len(old) :] in reference.tensors
    ]
    for theirs_name, ours_name in pairs:
        tensors[ours_name] = tensors.pop(theirs_name)
    return pairs


def _shape_of(block: _Block, where: Checkpoint, count: int) -> tuple[int, int]:
    """(I, H) of a per-expert block whose experts are exactly 0..count-1, each gate and up [I, H], down [H, I]."""
    want = {(e, r) for e in range(count) for r in ("gate", "up", "down")}
    missing, extra = sorted(want - set(block.experts)), sorted(set(block.experts) - want)
    if missing or extra:
        e, role = (missing or extra)[0]
        raise PlanError(
            f"{count} experts expected, each with gate, up and down projections, but expert {e}'s {role} "
            f"projection is {'missing' if missing else 'one too many'}",
            file=str(where.directory),
            tensor=f"{block.module}.experts",
        )
    first = block.experts[(0, "gate")][1].info
    if len(first.shape) != 2:
        name, ref = block.experts[(0, "gate")]
        raise PlanError(f"an expert's projection of shape {list(first.shape)}", file=ref.path, tensor=name)
    inter, hidden = first.shape
    for (_, role), (name, ref) in block.experts.items():
        want_shape = (hidden, inter) if role == "down" else (inter, hidden)
        if ref.info.shape != want_shape:
            raise PlanError(
                f"shape {list(ref.info.shape)} differs from {list(want_shape)}, expert 0's", file=ref.path, tensor=name
            )
    return inter, hidden


def _check_fused(block: _Block, where: Checkpoint, count: int, inter: int, hidden: int, other: Checkpoint) -> None:
    """The fused tensors (in `where`) are [E, 2·I, H] and [E, H, I], transformers' layout, for the per-expert ones
    of `other`; a transposed one is refused."""
    want = {"gate_up_proj": (count, 2 * inter, hidden), "down_proj": (count, hidden, inter)}
    for role, shape in want.items():
        ref = block.fused.get(role)
        name = f"{block.module}.experts.{role}"
        if ref is None:
            raise PlanError(
                f"missing, while {other.directory} stores these experts one by one",
                file=str(where.directory),
                tensor=name,
            )
        if ref.info.shape != shape:
            raise PlanError(
                f"experts fused as {list(ref.info.shape)}, which is not the {count} experts of {other.directory} "
                f"([{inter}, {hidden}] gate and up, [{hidden}, {inter}] down) end to end as {list(shape)}: a "
                "transposed or interleaved layout (GPT-OSS, Llama 4) cannot be mapped exactly; convert one "
                "checkpoint to the other's layout first",
                file=ref.path,
                tensor=name,
            )


def _fuse(ours: _Block, theirs: _Block, reference: Checkpoint, other: Checkpoint) -> dict[str, TensorRef]:
    """The reference is fused, `other` per expert: each fused tensor read from the per-expert ones, end to end."""
    shape = next(iter(ours.fused.values())).info.shape
    count = shape[0] if shape else 0
    inter, hidden = _shape_of(theirs, other, count)
    _check_fused(ours, reference, count, inter, hidden, other)
    mapped: dict[str, TensorRef] = {}
    for role, parts in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
        refs = [theirs.experts[(e, p)] for e in range(count) for p in parts]
        dtypes = {ref.info.dtype for _, ref in refs}
        if len(dtypes) > 1:
            name, ref = next((n, r) for n, r in refs if r.info.dtype != refs[0][1].info.dtype)
            raise PlanError(
                f"dtype {ref.info.dtype} differs from {refs[0][1].info.dtype}, expert 0's", file=ref.path, tensor=name
            )
        name = f"{ours.module}.experts.{role}"
        shape = ours.fused[role].info.shape
        first = refs[0][1]
        nbytes = count * len(parts) * inter * hidden * ITEMSIZE[first.info.dtype]
        info = TensorInfo(name, first.info.dtype, shape, first.info.start, first.info.start + nbytes)
        segments = tuple((ref.path, ref.info.start, ref.info.numel) for _, ref in refs)
        mapped[name] = MappedRef(first.path, info, segments)
    return mapped


def _split(ours: _Block, theirs: _Block, reference: Checkpoint, other: Checkpoint) -> dict[str, TensorRef]:
    """The reference is per expert, `other` fused: each per-expert tensor read as a slice of the fused one."""
    count = len({e for e, _ in ours.experts})
    inter, hidden = _shape_of(ours, reference, count)
    _check_fused(theirs, other, count, inter, hidden, reference)
    mapped: dict[str, TensorRef] = {}
    for (e, role), (name, _) in ours.experts.items():
        fused = theirs.fused["down_proj" if role == "down" else "gate_up_proj"]
        size = ITEMSIZE[fused.info.dtype]
        index = e if role == "down" else 2 * e + (role == "up")  # gate_up: expert e's gate, then its up
        start = fused.info.start + index * inter * hidden * size
        shape = (hidden, inter) if role == "down" else (inter, hidden)
        mapped[name] = MappedRef(
            fused.path, TensorInfo(name, fused.info.dtype, shape, start, start + inter * hidden * size)
        )
    return mapped


def read_ranges(src: Src, first: int, count: int) -> list[Segment]:
    """(file, byte offset, bytes) to read for elements [first, first + count) of a source, in order."""
    size = ITEMSIZE[src.dtype]
    if not src.segments:
        return [(src.path, src.start + first * size, count * size)]
    ranges, at = [], 0
    for path, start, numel in src.segments:
        lo, hi = max(first, at), min(first + count, at + numel)
        if lo < hi:
            ranges.append((path, start + (lo - at) * size, (hi - lo) * size))
        at += numel
    return ranges
