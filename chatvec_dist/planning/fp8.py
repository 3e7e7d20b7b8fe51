"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1, Qwen3-FP8): each float8_e4m3fn `W` comes with a float32
`W_scale_inv` of shape [⌈out/128⌉, ⌈in/128⌉], one scale per 128×128 block, wherever the index puts it. Planning
pairs every weight with its scale, keeps the scales out of the arithmetic, and adds, beside each weight written as
FP8, the scale tensor its unit computes. Anything else FP8 is refused with the reason."""

from __future__ import annotations

import dataclasses

from ..errors import PlanError
from ..io import s3
from ..io.checkpoint import Checkpoint, TensorRef
from ..recipe.spec import Target
from ..term import Term
from .planner import PlannedTensor, Sources, Src

BLOCK = 128  # rows and columns of a scale block
FP8 = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
SCALE_RULE = "scale"  # a weight's scales, computed by the unit that computes the weight

# Each FP8 weight's source (path, start) → its scale's source.
Scales = dict[tuple[str, int], Src]


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The scale grid of a [rows, cols] weight: one float32 per 128×128 block."""
    return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def is_fp8(dtype: str) -> bool:
    return dtype.startswith("F8")


def split_scales(sources: Sources) -> tuple[Sources, Scales]:
    """The sources without their scale tensors (which are never combined as tensors), and each FP8 weight's
    scale. Raises PlanError for a scale that fits no weight's 128×128 blocks or a quantization config this
    cannot reproduce exactly."""
    scales: Scales = {}
    stripped: dict[int, Checkpoint] = {}

    def strip(ckpt: Checkpoint | None) -> Checkpoint | None:
        if ckpt is None:
            return None
        if id(ckpt) not in stripped:
            stripped[id(ckpt)] = _strip(ckpt, scales)
        return stripped[id(ckpt)]

    terms = tuple(Term(alpha, strip(plus), strip(minus)) for alpha, plus, minus in sources.terms)
    return dataclasses.replace(sources, cp=strip(sources.cp), terms=terms), scales


def _strip(ckpt: Checkpoint, scales: Scales) -> Checkpoint:
    for name, ref in ckpt.tensors.items():
        if is_fp8(ref.info.dtype) and name + "_scale" in ckpt.tensors:
            raise PlanError(
                f"{ref.info.dtype} with a per-channel or per-tensor scale '{name}_scale' (compressed-tensors, "
                f"FBGEMM): not supported yet, only 128×128 block scales '{name}{SCALE_SUFFIX}'",
                file=ref.path,
                tensor=name,
            )
    paired = [n for n in ckpt.tensors if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in ckpt.tensors]
    if not paired:
        return ckpt
    _check_config(ckpt)
    for name in paired:
        weight, scale = ckpt.tensors[name[: -len(SCALE_SUFFIX)]], ckpt.tensors[name]
        if weight.info.dtype != FP8 or len(weight.info.shape) != 2:
            raise PlanError(
                f"a block scale of a {weight.info.dtype} tensor of shape {list(weight.info.shape)}: only 2-D "
                f"{FP8} weights are block-scaled",
                file=scale.path,
                tensor=name,
            )
        want = scale_shape(weight.info.shape)
        if scale.info.dtype != "F32" or scale.info.shape != want:
            raise PlanError(
                f"{scale.info.dtype} scale of shape {list(scale.info.shape)} does not fit 128×128 blocks of the "
                f"{list(weight.info.shape)} weight (expected F32 {list(want)})",
                file=scale.path,
                tensor=name,
            )
        scales[(weight.path, weight.info.start)] = Src(scale.path, scale.info.start, "F32")
    drop = set(paired)
    return dataclasses.replace(ckpt, tensors={n: r for n, r in ckpt.tensors.items() if n not in drop})


def _check_config(ckpt: Checkpoint) -> None:
    """A checkpoint with block scales must say so: fp8, 128×128 blocks (when it has a config at all)."""
    config = ckpt.config
    if not config:
        return
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        raise PlanError(
            f"block scales ('*{SCALE_SUFFIX}') but no quantization_config: expected quant_method fp8 with "
            f"weight_block_size [{BLOCK}, {BLOCK}]",
            file=str(ckpt.directory / "config.json"),
        )
    method, blocks = quant.get("quant_method"), quant.get("weight_block_size")
    if method != "fp8" or blocks != [BLOCK, BLOCK]:
        raise PlanError(
            f"quantization_config {method!r} with weight_block_size {blocks}: only block-scaled fp8 with "
            f"[{BLOCK}, {BLOCK}] blocks is supported",
            file=str(ckpt.directory / "config.json"),
        )


def check_scaled(name: str, refs: list[TensorRef], scales: Scales) -> None:
    """Every float8 tensor that is combined is a block-scaled float8_e4m3fn weight with its scale."""
    for t in refs:
        if not is_fp8(t.info.dtype):
            continue
        if t.info.dtype != FP8 or (t.path, t.info.start) not in scales:
            raise PlanError(
                f"{t.info.dtype} without a 128×128 block scale '{name}{SCALE_SUFFIX}': only DeepSeek-style "
                f"block-scaled {FP8} is supported (per-channel or per-tensor FP8, as compressed-tensors or FBGEMM "
                "write it, is not yet; dequantize to bfloat16 first or --exclude this tensor)",
                file=t.path,
                tensor=name,
            )


def attach(tensors: list[PlannedTensor], scales: Scales) -> list[PlannedTensor]:
    """Give each FP8 source its scale, and put right after each weight written as FP8 its scale tensor: computed
    beside a merged weight (rule `scale`), CP's copied beside a weight kept as stored."""
    if not scales:  # then no tensor reads or writes FP8 (check_scaled refused any combined FP8 source)
        return tensors
    planned: list[PlannedTensor] = []
    for t in tensors:
        t = _with_scales(t, scales)
        planned.append(t)
        name = t.name + SCALE_SUFFIX
        if t.rule == "copy" and t.cp is not None and (t.cp.path, t.cp.start) in scales:
            src = scales[(t.cp.path, t.cp.start)]
            reason = f"of {t.name} ({t.reason})"  # not the weight's own: a scale is no vocabulary tensor
            planned.append(PlannedTensor(name, "copy", reason, scale_shape(t.shape), "F32", src, (), 0))
        elif t.rule != "copy" and is_fp8(t.out_dtype):
            planned.append(PlannedTensor(name, SCALE_RULE, f"of {t.name}", scale_shape(t.shape), "F32", None, (), 0))
    return planned


def _with_scales(t: PlannedTensor, scales: Scales) -> PlannedTensor:
    if t.rule == "copy" or not (is_fp8(t.out_dtype) or any(is_fp8(s.dtype) for s in t.srcs)):
        return t
    if t.rule != "merge" or len(t.shape) != 2:
        raise PlanError(
            f"a {t.rule} of a block-scaled FP8 tensor of shape {list(t.shape)} ({t.reason}): only whole 2-D "
            "weights of equal shapes are combined in FP8",
            file=(t.cp or t.srcs[0]).path,
            tensor=t.name,
        )

    def scaled(s: Src | None) -> Src | None:
        return dataclasses.replace(s, scale=scales[(s.path, s.start)]) if s is not None and is_fp8(s.dtype) else s

    terms = tuple(Term(alpha, scaled(plus), scaled(minus)) for alpha, plus, minus in t.terms)
    return dataclasses.replace(t, cp=scaled(t.cp), terms=terms)


def in_one_piece(t: PlannedTensor) -> bool:
    """Whether a tensor is computed whole by one unit: an FP8 weight that is combined (its blocks and its scale
    tensor are written together) and that scale tensor."""
    if t.rule == SCALE_RULE:
        return True
    return t.rule != "copy" and (is_fp8(t.out_dtype) or any(s.scale is not None for s in t.srcs))


def check_not_sparse(tensors: list[PlannedTensor]) -> None:
    """DARE and TIES run in the merge kernels, not in the FP8 pass: refused on FP8 weights, never ignored."""
    for t in tensors:
        if (t.dare or t.ties is not None) and in_one_piece(t):
            raise PlanError(
                "DARE and TIES are not supported yet on block-scaled FP8 weights (dequantize the checkpoints to "
                "bfloat16 first, or --exclude them)",
                file=next((s.path for s in t.srcs), None),
                tensor=t.name,
            )


def with_scales_beside(t: PlannedTensor) -> bool:
    """A combined weight written as FP8, or its scale tensor: one unit writes both, the scales right after the
    weight (so, in an object store's shard, one part holds both)."""
    return t.rule == SCALE_RULE or (t.rule != "copy" and is_fp8(t.out_dtype))


def check_store_pairs(out: str | None, tensors: list[PlannedTensor], at_shards: bool) -> None:
    """In a job with an object-store output (`at_shards`: every output laid out for one), each combined FP8 weight
    is followed in its shard by its float32 scales: the weight's bytes must keep them 4-byte aligned."""
    for t in tensors if at_shards else ():
        if t.rule != SCALE_RULE and with_scales_beside(t) and t.numel % 4:
            raise PlanError(
                f"a block-scaled FP8 weight of shape {list(t.shape)} ({t.numel} bytes, not a multiple of 4) to an "
                "object store: its float32 scales, placed right after it, would be unaligned (write to a local "
                "folder and upload it)",
                file=out,
                tensor=t.name,
            )


def check_combined_alike(targets: list[tuple[Target, list[PlannedTensor]]]) -> None:
    """In a job with object-store outputs (`targets`: each one with its tensors), every object-store output
    combines each FP8 weight that any target combines: its unit writes the weight and its scales as one range of
    the shard, and the job's order and cut of the work follow the first such output."""
    beside = [{t.name for t in tensors if with_scales_beside(t)} for _, tensors in targets]
    combined = set().union(*beside)
    for (target, _), mine in zip(targets, beside):
        if target.out is not None and s3.is_url(target.out) and mine != combined:
            odd = min(combined - mine)
            other = next(t.name for (t, _), theirs in zip(targets, beside) if odd in theirs)
            raise PlanError(
                f"target '{other}' combines this FP8 weight and target '{target.name}' keeps it as stored: an "
                "s3:// output must combine every FP8 weight that another target of its job combines (run them as "
                "separate jobs)",
                file=target.cp,
                tensor=odd,
            )


def scale_elems(elems: int, cols: int) -> int:
    """Scales that cover the first `elems` (whole rows) of a weight with `cols` columns."""
    return -(-elems // cols // BLOCK) * -(-cols // BLOCK) if cols else 0
