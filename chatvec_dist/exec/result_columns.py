"""A unit's result for the trip from a Ray worker to the driver, its segments as columns of builtins.

Ray pickles a returned object with cloudpickle, whose per-object hook is a Python call: for a 45 k-tensor unit of
an 8-output batch (363 k segments, each a named tuple with its Stats) that is ~2.6 s of the worker's CPU. As
columns (each field of every segment, gathered in C) pickled without a memo, it is ~0.6 s. The sources' digests
are the one column whose objects are shared (a batch's outputs report the very same objects for the sources they
share, which the driver hashes once): each distinct one is sent once, and every segment that held it gets it."""

from __future__ import annotations

import dataclasses
import io
import pickle
from itertools import count
from operator import itemgetter
from typing import Any

from ..kernels.stats import Stats, stats_columns
from ..quickinit import tuple_maker
from .messages import SegmentResult, UnitResult

_SEGMENT_GETTERS = [itemgetter(i) for i in range(len(SegmentResult._fields))]
_STATS_AT, _SOURCES_AT = SegmentResult._fields.index("stats"), SegmentResult._fields.index("sources")
_make_segment = tuple_maker(SegmentResult)


def pack_result(result: UnitResult) -> bytes:
    """`result` pickled with its segments as columns: each SegmentResult field's, the stats' by field, the
    sources' distinct objects and where each segment's is among them."""
    columns: list[Any] = [list(map(get, result.segments)) for get in _SEGMENT_GETTERS]
    columns[_STATS_AT] = stats_columns(columns[_STATS_AT])
    sources = columns[_SOURCES_AT]
    distinct = list(dict(zip(map(id, sources), sources)).values())
    place = dict(zip(map(id, distinct), count()))
    columns[_SOURCES_AT] = (distinct, list(map(place.__getitem__, map(id, sources))))
    data = io.BytesIO()
    pickler = pickle.Pickler(data, pickle.HIGHEST_PROTOCOL)
    pickler.fast = True  # no memo: builtins in trees without cycles, shared objects sent once above
    pickler.dump((dataclasses.replace(result, segments=[]), columns))
    return data.getvalue()


def unpack_result(data: bytes) -> UnitResult:
    """The result `pack_result` was given: equal segments, their sources shared as they were."""
    result, columns = pickle.loads(data)  # noqa: S301 -- the cluster's own worker, as Ray's own pickles
    columns[_STATS_AT] = list(map(Stats, *columns[_STATS_AT]))
    distinct, where = columns[_SOURCES_AT]
    columns[_SOURCES_AT] = list(map(distinct.__getitem__, where))
    return dataclasses.replace(result, segments=list(map(_make_segment, zip(*columns))))
