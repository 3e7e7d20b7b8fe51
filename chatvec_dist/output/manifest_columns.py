"""The manifest's table built column by column: what the layout fixes (names, shapes, rules, places, the sources'
places), made once per layout object and shared by the outputs that share it (and by the next layout where only
its alphas differ: layout_alike.py), then what the run measured."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress
from operator import attrgetter, is_, itemgetter
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..dtypes import FLOAT_DTYPES, ITEMSIZE
from ..errors import VerifyError
from ..exec.source_digests import extents
from ..planning.experts import read_ranges
from ..planning.layout import Layout
from ..planning.planner import PlannedTensor, Src
from ..term import Term
from .columns_digest import column_digest, encoding_head, resumed, same_values
from .layout_alike import alike

if TYPE_CHECKING:
    from .totals import Totals

STRING, INT, FLOAT = pa.string(), pa.int64(), pa.float64()
_TENSOR, _TERMS, _ALPHA = attrgetter("tensor"), attrgetter("terms"), itemgetter(0)
SEGMENT = pa.struct([("file", STRING), ("offset", INT), ("nbytes", INT)])
SOURCE_FIELDS = ("role", "file", "offset", "nbytes", "dtype")  # then `hash`, then `segments`


@dataclass(frozen=True)
class LayoutColumns:
    """The columns a layout fixes, and per tensor what decides whether a measured value is reported."""

    fixed: dict[str, pa.Array]  # tensor, rule, reason, shape, dtype_out, dtype_cp, dtypes_vector, shard, offset, …
    sources: list[pa.Array]  # source_digests' SOURCE_FIELDS and `segments`, every tensor's sources end to end
    counts: np.ndarray  # per tensor, its sources (the digests it must have)
    measured: np.ndarray  # cp_norm is reported (CP is there and not copied as stored)
    changed: np.ndarray  # rel_update is reported (vectors added, or token rows taken)
    terms: np.ndarray  # delta_norm is reported
    counted: np.ndarray  # NaN/Inf are counted (a float output)
    ties: np.ndarray  # sign_agreement is reported
    merge_elems: list[int]
    digests: dict[str, bytes]  # each of `fixed`'s column_digest (rows_hash)
    sources_head: hashlib._Hash  # source_digests' encoding up to its `hash` field (rows_hash)
    # The last `source_digests` column made of these sources (shared with the columns `_with_alphas` makes of
    # them): the hashes it was made of (their tuples, held), the column, and its digest once asked.
    last: list[tuple[list[tuple[str | None, ...]], pa.ListArray, bytes | None]] = field(default_factory=list)

    def source_digests(self, source_hashes: Sequence[tuple[str | None, ...]]) -> pa.ListArray:
        """The `source_digests` column: `sources` with each tensor's sources' `source_hashes`; the last one made
        where they are the very tuples it was made of (a batch's outputs report the same objects for the sources
        they share: manifest.py's `_single_hashes`)."""
        if self.made_of(source_hashes):
            return self.last[0][1]
        *fields, segments = self.sources
        digests = pa.StructArray.from_arrays(
            [*fields, pa.array(list(chain.from_iterable(source_hashes)), STRING), segments],
            names=[*SOURCE_FIELDS, "hash", "segments"],
        )
        column = pa.ListArray.from_arrays(_offsets(self.counts), digests)
        self.last[:] = [(list(source_hashes), column, None)]
        return column

    def made_of(self, source_hashes: Sequence[tuple[str | None, ...]]) -> bool:
        """Whether the last `source_digests` column was made of these very tuples (checked complete then)."""
        last = self.last[0][0] if self.last else None
        return last is not None and len(last) == len(source_hashes) and all(map(is_, source_hashes, last))

    def sources_digest(self, column: pa.ListArray) -> bytes:
        """column_digest of the `source_digests` column made from `sources` (its fields but `hash`)."""
        if self.last and self.last[0][1] is column and self.last[0][2] is not None:
            return self.last[0][2]
        items = column.flatten()
        digest = resumed(self.sources_head, [items.field("hash"), items.field("segments")])
        if self.last and self.last[0][1] is column:
            self.last[0] = (self.last[0][0], column, digest)
        return digest


# The last layout's columns, while that layout lives.
_cached: list[tuple[weakref.ref[Layout], LayoutColumns]] = []


def layout_columns(layout: Layout) -> LayoutColumns:
    """The columns of `layout`: made once for the outputs of a batch that share the layout object, and taken from
    the previous layout's but for `alphas` where only the terms' alphas differ (an alpha sweep's targets)."""
    earlier = _cached[0][0]() if _cached else None
    if earlier is layout:
        return _cached[0][1]
    if earlier is not None and alike(earlier, layout):
        columns = _with_alphas(_cached[0][1], layout)
    else:
        columns = _make(layout)
    _cached[:] = [(weakref.ref(layout, lambda _: _cached.clear()), columns)]
    return columns


def _with_alphas(columns: LayoutColumns, layout: Layout) -> LayoutColumns:
    """`columns` with the `alphas` of `layout`'s terms (as many per tensor as `columns`' layout has: `alike`)."""
    earlier: pa.ListArray = columns.fixed["alphas"]
    terms = chain.from_iterable(map(_TERMS, map(_TENSOR, layout.tensors)))
    values = pa.array(np.fromiter(map(_ALPHA, terms), np.float64, len(earlier.values)), FLOAT)
    alphas = pa.ListArray.from_arrays(earlier.offsets, values, mask=earlier.is_null())
    fixed, digests = {**columns.fixed, "alphas": alphas}, {**columns.digests, "alphas": column_digest(alphas)}
    return dataclasses.replace(columns, fixed=fixed, digests=digests)


def _alphas(per_tensor: list[tuple[Term, ...]]) -> pa.Array:
    """Each tensor's terms' alphas; null for a tensor without terms."""
    count = np.fromiter(map(len, per_tensor), np.int64, len(per_tensor))
    alphas = pa.array(list(map(float, map(itemgetter(0), chain.from_iterable(per_tensor)))), FLOAT)
    return pa.ListArray.from_arrays(_offsets(count), alphas, mask=pa.array(count == 0))


def _make(layout: Layout) -> LayoutColumns:
    placed = layout.tensors
    ts: list[PlannedTensor] = list(map(attrgetter("tensor"), placed))
    cps = list(map(attrgetter("cp"), ts))
    terms = _Terms(ts)
    shards = [s.name for s in layout.shards]
    has_cp = np.array([cp is not None for cp in cps], bool)
    fixed = {
        "tensor": pa.array(list(map(attrgetter("name"), ts)), STRING),
        "rule": pa.array(list(map(attrgetter("rule"), ts)), STRING),
        "reason": pa.array(list(map(attrgetter("reason"), ts)), STRING),
        "shape": pa.array(list(map(attrgetter("shape"), ts)), pa.list_(INT)),
        "dtype_out": pa.array(list(map(attrgetter("out_dtype"), ts)), STRING),
        "dtype_cp": pa.array([cp.dtype if cp is not None else None for cp in cps], STRING),
        "dtypes_vector": pa.ListArray.from_arrays(_offsets(terms.vectors_per_tensor), _field(terms.vectors, "dtype")),
        "shard": pa.array([shards[p.shard] for p in placed], STRING),
        "offset": pa.array(list(map(attrgetter("offset"), placed)), INT),
        "nbytes": pa.array(list(map(attrgetter("nbytes"), placed)), INT),
        "alphas": _alphas(terms.per_tensor),
        "token_rows": pa.array(list(map(len, map(attrgetter("rows"), ts))), INT),
    }
    counts, sources = _sources(ts, cps, has_cp, terms)
    rows = fixed["token_rows"].to_numpy() > 0
    same = pc.fill_null(pc.equal(fixed["dtype_cp"], fixed["dtype_out"]), False).to_numpy(zero_copy_only=False)
    copied = _is(fixed["rule"], "copy") & same & ~rows  # CP's bytes as stored
    return LayoutColumns(
        fixed,
        sources,
        counts,
        measured=has_cp & ~copied,
        changed=(terms.count > 0) | rows,
        terms=terms.count > 0,
        counted=pc.is_in(fixed["dtype_out"], pa.array(sorted(FLOAT_DTYPES))).to_numpy(zero_copy_only=False),
        ties=np.array([t is not None for t in map(attrgetter("ties"), ts)], bool),
        merge_elems=list(map(attrgetter("merge_elems"), ts)),
        digests={name: column_digest(column) for name, column in fixed.items()},
        sources_head=encoding_head(_offsets(counts), sources[:-1]),  # all but `segments`
    )


def _is(strings: pa.Array, value: str) -> np.ndarray:
    return pc.equal(strings, value).to_numpy(zero_copy_only=False)


class _Terms:
    """Every tensor's terms, and end to end the vector sources they read (plus, then minus where there is one),
    with each one's role and tensor."""

    def __init__(self, ts: list[PlannedTensor]) -> None:
        self.per_tensor = per_tensor = list(map(attrgetter("terms"), ts))
        self.count = np.array(list(map(len, per_tensor)), np.int64)
        flat = list(chain.from_iterable(per_tensor))
        sides = list(chain.from_iterable(zip(map(itemgetter(1), flat), map(itemgetter(2), flat))))
        there = [s is not None for s in sides]
        self.vectors: list[Src] = list(compress(sides, there))
        nth = np.arange(len(flat)) - np.repeat(_offsets(self.count)[:-1], self.count)  # the recipe's i-th vector
        roles = chain.from_iterable(map(_vector_roles, nth.tolist()))
        self.roles = list(compress(roles, there))
        per_term = np.array(there, bool).reshape(-1, 2).sum(axis=1)
        self.tensor = np.repeat(np.repeat(np.arange(len(ts)), self.count), per_term)  # each vector's tensor
        self.vectors_per_tensor = np.bincount(self.tensor, minlength=len(ts))


@functools.lru_cache(maxsize=64)
def _vector_roles(i: int) -> tuple[str, str]:
    """The roles of the recipe's i-th vector's plus and minus sides (an applied vector's plus side: `chat[i]`)."""
    return f"chat[{i}]", f"base[{i}]"


def _sources(
    ts: list[PlannedTensor], cps: list[Src | None], has_cp: np.ndarray, terms: _Terms
) -> tuple[np.ndarray, list[pa.Array]]:
    """Per tensor how many sources it reads, and the source_digests fields but `hash` of every tensor's sources end
    to end, each tensor's as `source_digests.extents` gives them: `cp` (all its elements), then its vectors (the
    merged elements), then where a tensor has them its FP8 scales and token-row chat rows (`_Extra`)."""
    with_cp = np.flatnonzero(has_cp)
    cp_srcs = [cps[i] for i in with_cp.tolist()]
    extra = _Extra(ts, cp_srcs + terms.vectors, np.concatenate([with_cp, terms.tensor]))
    tensor = np.concatenate([with_cp, terms.tensor, np.array(extra.tensor, np.int64)])
    order = np.argsort(tensor, kind="stable")  # per tensor: CP, its vectors, its extra sources, each in order
    srcs: list[Src] = _ordered(cp_srcs + terms.vectors + extra.srcs, order)
    merged = np.array(list(map(attrgetter("merge_elems"), ts)), np.int64)
    numel = np.array(list(map(math.prod, map(attrgetter("shape"), (ts[i] for i in with_cp.tolist())))), np.int64)
    elems = np.concatenate([numel, merged[terms.tensor], np.array(extra.extents, np.int64)])[order]
    dtypes = list(map(attrgetter("dtype"), srcs))
    itemsize = np.array(list(map(ITEMSIZE.__getitem__, dtypes)), np.int64)
    segments: list[list[dict] | None] = [None] * len(srcs)
    for i in np.flatnonzero(np.array(list(map(bool, map(attrgetter("segments"), srcs))), bool)).tolist():
        segments[i] = [dict(file=p, offset=o, nbytes=n) for p, o, n in read_ranges(srcs[i], 0, int(elems[i]))]
    return np.bincount(tensor, minlength=len(ts)), [
        pa.array(_ordered(["cp"] * len(cp_srcs) + terms.roles + extra.roles, order), STRING),
        _field(srcs, "path"),
        pa.array(list(map(attrgetter("start"), srcs)), INT),
        pa.array(elems * itemsize, INT),
        pa.array(dtypes, STRING),
        pa.array(segments, pa.list_(SEGMENT)),
    ]


class _Extra:
    """The sources that follow a tensor's own in `extents` order, for the tensors that have any: the float32
    scales of its block-scaled FP8 sources, and the chat rows its token rows are taken from (per tensor, as
    `source_digests.extents` and `source_roles` give them)."""

    def __init__(self, ts: list[PlannedTensor], own: list[Src], tensor: np.ndarray) -> None:
        scaled = np.array([s.scale is not None for s in own], bool)
        rows = np.flatnonzero(np.array(list(map(bool, map(attrgetter("rows"), ts))), bool))
        self.tensor: list[int] = []
        self.srcs: list[Src] = []
        self.extents: list[int] = []
        self.roles: list[str] = []
        for i in sorted(set(tensor[scaled].tolist()) | set(rows.tolist())):
            t = ts[i]
            found, roles = extents(t), source_roles(t)
            first = (t.cp is not None) + len(t.vector_srcs)  # after its own sources
            self.tensor += [i] * (len(found) - first)
            self.srcs += [src for src, _ in found[first:]]
            self.extents += [n for _, n in found[first:]]
            self.roles += roles[first:]


def source_roles(t: PlannedTensor) -> list[str]:
    """Each source's role, in `extents` order: `cp`, then `chat[i]` and `base[i]` for the recipe's i-th vector (an
    applied vector's plus side is its `chat[i]`); then `ROLE.scale`, the float32 scales of each block-scaled FP8
    one; then `chat[0].row[N]`, each chat row N that token rows are taken from."""
    roles = list(_roles(t.cp is not None, tuple(minus is not None for _, _, minus in t.terms)))
    scaled = [f"{role}.scale" for role, src in zip(roles, t.srcs) if src.scale is not None]  # row_src: past roles
    return roles + scaled + [f"chat[0].row[{chat}]" for _, chat in t.rows]


@functools.lru_cache(maxsize=64)
def _roles(cp: bool, minus: tuple[bool, ...]) -> tuple[str, ...]:
    """The roles of a tensor with or without CP and terms with or without a minus side (a few shapes per job)."""
    roles = ["cp"] if cp else []
    for i, has_minus in enumerate(minus):
        plus_role, minus_role = _vector_roles(i)
        roles += [plus_role] + ([minus_role] if has_minus else [])
    return tuple(roles)


def _ordered(values: list, order: np.ndarray) -> list:
    """`values` in `order` (a permutation), in C."""
    found = np.empty(len(values), object)
    found[:] = values
    return found[order].tolist()


def _field(objects: list, name: str) -> pa.Array:
    return pa.array(list(map(attrgetter(name), objects)), STRING)


def _offsets(counts: np.ndarray) -> pa.Array:
    """List offsets (int32) of lists of `counts` items."""
    offsets = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.array(offsets)


def measured_columns(layout: LayoutColumns, totals: Totals) -> dict[str, pa.Array]:
    """The columns the run measured: hashes, norms, counts, workers, seconds, source digests, DARE/TIES shares."""
    hashes, source_hashes = totals.hashes.tolist(), totals.source_hashes.tolist()
    # a tensor's hash is set with its totals: the hashes say which tensors are complete
    _check_complete(layout, hashes, source_hashes, layout.made_of(source_hashes))
    names, cp_norm = pa.array(list(totals.names), STRING), np.sqrt(totals.cp_sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(totals.update_sq) / cp_norm
    return {
        "hash": pa.array(hashes, STRING),
        "cp_norm": pa.array(cp_norm, FLOAT, mask=~layout.measured),
        "delta_norm": pa.array(np.sqrt(totals.delta_sq), FLOAT, mask=~layout.terms),
        "rel_update": pa.array(rel, FLOAT, mask=~(layout.changed & layout.measured & (cp_norm != 0))),
        "nan_count": pa.array(totals.nan, INT, mask=~layout.counted),
        "inf_count": pa.array(totals.inf, INT, mask=~layout.counted),
        "worker": pc.take(names, pa.array(totals.worker)),
        "node": pc.take(names, pa.array(totals.node)),
        "seconds": pa.array(totals.seconds, FLOAT),
        "source_digests": layout.source_digests(source_hashes),
        **_shares(layout, totals),
    }


# The last manifest's measured columns and their digests, by name.
_measured: dict[str, tuple[pa.Array, bytes]] = {}


def measured_digests(columns: Mapping[str, pa.Array]) -> dict[str, bytes]:
    """column_digest of each of `columns`: the last manifest's column's where it holds exactly the same values
    (`same_values`: a sweep's outputs have the same CP norms, NaN counts, workers and all-null columns)."""
    digests = {}
    for name, column in columns.items():
        last = _measured.get(name)
        digests[name] = last[1] if last is not None and same_values(column, last[0]) else column_digest(column)
        _measured[name] = (column, digests[name])
    return digests


def _shares(layout: LayoutColumns, totals: Totals) -> dict[str, pa.Array]:
    """DARE/TIES: each vector's kept share (`density`) and the share of kept entries agreeing with the elected sign
    (`sign_agreement`); all null (made at once) in a job without either."""
    count = len(totals)
    if not any(totals.kept):
        density = pa.nulls(count, pa.list_(FLOAT))
    else:
        density = pa.array(
            [[k / n for k in kept] if kept and n else None for kept, n in zip(totals.kept, layout.merge_elems)],
            pa.list_(FLOAT),
        )
    if not layout.ties.any():
        agreement = pa.nulls(count, FLOAT)
    else:
        pairs = zip(totals.agree.tolist(), totals.signed.tolist(), layout.ties)
        agreement = pa.array(
            [(agree / signed if signed else None) if tie else None for agree, signed, tie in pairs], FLOAT
        )
    return {"density": density, "sign_agreement": agreement}


def _check_complete(
    layout: LayoutColumns,
    hashes: Sequence[str | None],
    source_hashes: Sequence[tuple[str | None, ...]],
    sources_checked: bool,
) -> None:
    """Every tensor and each of its sources reported in full (else an internal error naming the first not);
    `sources_checked`: the source hashes are the very tuples of a column made before (checked then)."""
    if all(hashes) and (sources_checked or _sources_complete(layout, source_hashes)):
        return  # every hash there (a hash is never empty)
    want = layout.counts.tolist()
    for i, (h, found, n) in enumerate(zip(hashes, source_hashes, want)):
        if h is None or not _complete(found, n):
            done = len(found) - found.count(None)
            what = "not all of its blocks were" if h is None else f"{done} of its {n} sources"
            raise VerifyError(f"internal: {what} reported in full", tensor=layout.fixed["tensor"][i].as_py())


def _sources_complete(layout: LayoutColumns, source_hashes: Sequence[tuple[str | None, ...]]) -> bool:
    return list(map(len, source_hashes)) == layout.counts.tolist() and all(chain.from_iterable(source_hashes))


def _complete(found: tuple[str | None, ...], want: int) -> bool:
    return len(found) == want and None not in found
