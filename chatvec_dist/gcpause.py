"""The garbage collector around the driver's large heaps. A plan of 45 000 tensors is about a million small
objects, none in a reference cycle: each full collection scans them all (a dozen while planning: a third of the
plan's time), and every later one during the run scans them again."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No collection inside the block (what it leaves in cycles is collected after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """What is alive when the block starts (the plan) stays out of the collections inside it."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """`paused`, and what is alive at its end (what the block made: many long-lived objects, none in a cycle: a
    plan, a journal read back, a unit's results) frozen before collections resume, so that none scans it: else the
    first one scans it all (0.1–0.17 s after a 45 k-tensor plan), then each older one again. A cycle made
    meanwhile is found after `frozen`'s block, or never in a worker process (which ends with its job)."""
    with paused():
        try:
            yield
        finally:
            gc.freeze()  # before `paused` lets collections resume
