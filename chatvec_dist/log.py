"""The `chatvec` logger: library code logs here; the CLI shows it on stderr (warnings as `chatvec: warning: …`)."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("chatvec")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.WARNING:  # progress notes: `resuming: …`, the throughput line
            return record.getMessage()
        return f"chatvec: {record.levelname.lower()}: {record.getMessage()}"


def show_on_stderr(level: int = logging.INFO) -> None:
    """Print the logger's records from `level` up on stderr, once per process."""
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.setLevel(level)
