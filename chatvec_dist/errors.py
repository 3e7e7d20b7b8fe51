"""Typed, picklable errors that name the file, the tensor and what is wrong."""

from __future__ import annotations


class ChatvecError(Exception):
    """A user-facing error: one line, naming the file and tensor where there is one."""

    def __init__(self, what: str, *, file: str | None = None, tensor: str | None = None) -> None:
        self.what = what
        self.file = None if file is None else str(file)
        self.tensor = tensor
        super().__init__(what, self.file, tensor)

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.tensor:
            where.append(f"tensor '{self.tensor}'")
        return printable(f"{': '.join(where)}: {self.what}" if where else self.what)  # always one line

    def __reduce__(self):  # keep keyword fields across pickling (Ray ships errors between processes)
        return (_rebuild, (type(self), self.what, self.file, self.tensor))


def printable(text: str) -> str:
    """`text` with every control or unprintable character written as its escape: one line, no terminal escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _rebuild(cls: type, what: str, file: str | None, tensor: str | None) -> ChatvecError:
    return cls(what, file=file, tensor=tensor)


class SourceError(ChatvecError):
    """A checkpoint cannot be found, resolved or is in a refused format."""


class HeaderError(ChatvecError):
    """A safetensors header or index is malformed or unsafe."""


class PlanError(ChatvecError):
    """Checkpoints do not fit together (missing tensors, shape or dtype mismatches)."""


class OutputError(ChatvecError):
    """The output location is unusable (exists, inside an input, foreign partial output)."""


class VerifyError(ChatvecError):
    """An output does not match its manifest."""


class RunError(ChatvecError):
    """A run that started failed on the way (a stalled cluster, workers that keep dying, a full disk): the input
    was fine, and the same command resumes once the cause is fixed."""
