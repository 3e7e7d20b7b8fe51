"""numba's `njit` for the fused kernels: compiled code cached on disk where numba finds a writable place for it
(the package's `__pycache__`, else the user's cache directory, or NUMBA_CACHE_DIR), else compiled in memory by
each process, with one warning: a read-only install under a read-only home must not fail the merge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba

from ..log import logger

NO_CACHE = "no locator available"  # numba's RuntimeError when no cache directory is writable
_warned = False


def njit(**options: Any) -> Callable[[Callable], Any]:
    """`numba.njit(cache=True, **options)`, or `cache=False` (and a warning, once) where numba cannot cache."""

    def wrap(f: Callable) -> Any:
        try:
            return numba.njit(cache=True, **options)(f)
        except RuntimeError as e:
            if NO_CACHE not in str(e):
                raise
            _warn(f.__code__.co_filename)
            return numba.njit(cache=False, **options)(f)

    return wrap


def _warn(path: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            f"numba cannot cache the fused kernels of {path}: no writable __pycache__ beside it, user cache "
            "directory or NUMBA_CACHE_DIR; each process compiles them again (seconds). Set NUMBA_CACHE_DIR to a "
            "writable directory to avoid it"
        )
