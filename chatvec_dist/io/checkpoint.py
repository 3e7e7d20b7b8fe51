"""A checkpoint: a directory of safetensors files (sharded with an index, or not), checked up front."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HeaderError, SourceError
from .header import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its file and its header entry."""

    path: str
    info: TensorInfo


@dataclass
class Checkpoint:
    """The tensors of a checkpoint by name, in file order, plus where it came from."""

    directory: Path
    tensors: dict[str, TensorRef]
    files: list[str]
    source: dict[str, object] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        path = self.directory / "config.json"
        if not path.is_file():
            return {}
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SourceError(f"config.json is not readable JSON ({e})", file=str(path)) from None
        return value if isinstance(value, dict) else {}


def open_checkpoint(directory: str | os.PathLike, root: str | os.PathLike | None = None, source: dict | None = None) -> Checkpoint:
    """Open a local checkpoint directory. `root` bounds where its files may resolve (default: the directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError("not a directory (and not a Hub repo id in the local cache)", file=str(directory))
    bound = Path(root or directory).resolve()
    index = directory / INDEX_NAME
    if index.is_file():
        names = _weight_map(index, directory, bound)
        files = sorted(set(names.values()))
    elif (directory / SINGLE_NAME).is_file():
        files, names = [SINGLE_NAME], None
    else:
        files, names = sorted(p.name for p in directory.glob("*.safetensors")), None
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise SourceError(
                f"only pickle checkpoints found ({', '.join(pickles[:3])}); chatvec_dist never unpickles files: "
                "convert them to safetensors first", file=str(directory))
        raise SourceError("no safetensors files found", file=str(directory))
    tensors: dict[str, TensorRef] = {}
    for name in files:
        path = _inside(directory / name, bound, str(index if names is not None else directory / name))
        header, _ = read_header(path)
        for tname, info in header.items():
            if names is None:
                if tname in tensors:
                    raise HeaderError(f"tensor also present in {tensors[tname].path}", file=str(path), tensor=tname)
                tensors[tname] = TensorRef(str(path), info)
            elif names.get(tname) == name:
                tensors[tname] = TensorRef(str(path), info)
    if names is not None:
        for tname, fname in names.items():
            if tname not in tensors:
                raise HeaderError(f"the index places this tensor in {fname}, which lacks it", file=str(index), tensor=tname)
        tensors = {n: tensors[n] for n in sorted(tensors, key=lambda n: (tensors[n].path, tensors[n].info.start))}
    return Checkpoint(directory, tensors, [str(directory / f) for f in files], source or {"path": str(directory.resolve())})


def _weight_map(index: Path, directory: Path, bound: Path) -> dict[str, str]:
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise HeaderError(f"index is larger than {MAX_INDEX_BYTES} bytes", file=str(index))
        doc = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HeaderError(f"index is not valid JSON ({type(e).__name__})", file=str(index)) from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise HeaderError("index has no weight_map object", file=str(index))
    for tname, fname in wm.items():
        if not isinstance(fname, str) or not fname or os.path.isabs(fname) or ".." in Path(fname).parts or "\\" in fname:
            raise HeaderError(f"weight_map names an unsafe path {fname!r}", file=str(index), tensor=tname)
        if not (directory / fname).is_file():
            raise HeaderError(f"weight_map names a missing shard {fname!r}", file=str(index), tensor=tname)
        _inside(directory / fname, bound, str(index), tname)
    return wm


def _inside(path: Path, bound: Path, cited: str, tensor: str | None = None) -> Path:
    """Refuse a file whose real location (symlinks followed) is outside the checkpoint."""
    real = path.resolve()
    if not real.is_relative_to(bound):
        raise HeaderError(f"{path.name} resolves to {real}, outside the checkpoint {bound}", file=cited, tensor=tensor)
    return path
