"""A checkpoint: a directory of safetensors files (sharded with an index, or not), checked up front."""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

from ..errors import ChatvecError, HeaderError, SourceError
from ..log import logger
from ..quickinit import maker, quick_init
from .header import (
    MAX_HEADER_BYTES,
    TensorInfo,
    all_safe_names,
    is_safe_name,
    loads_unique,
    parse_header_bytes,
    read_header,
    shown,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a model needs next to its weights: config, tokenizer, chat template, remote code (`auto_map`), license.
SIDE_PATTERNS = (
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.vocab",
    "*.py",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
)
# ... but not a LoRA adapter's config (transformers with peft would load the adapter's base instead) nor the
# index of pickled weights that are not copied.
NOT_SIDE_PATTERNS = ("adapter_config.json", "*.bin.index.json", "*.pt.index.json")
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_SIDE_BYTES = 512 * 1024 * 1024  # a tokenizer or tiktoken file is tens of MB; nothing here should be GBs


@quick_init
@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one tensor lives: its file and its header entry."""

    path: str
    info: TensorInfo


_make_ref = maker(TensorRef)  # one per tensor of every checkpoint


@dataclass
class Checkpoint:
    """The tensors of a checkpoint by name, in file order, plus where it came from."""

    directory: Path
    tensors: dict[str, TensorRef]
    source: dict[str, object] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        """config.json as an object ({} when absent); anything else present there is refused."""
        return read_json_object(self.directory / "config.json")


def read_json_object(path: Path, error: type[ChatvecError] = SourceError, limit: int = MAX_CONFIG_BYTES) -> dict:
    """A small JSON file that must hold an object ({} when absent); anything else is `error`, naming the file."""
    if not _is_file(path):
        return {}
    try:
        if path.stat().st_size > limit:
            raise error(f"larger than {limit} bytes", file=str(path))
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise error(f"not readable JSON ({type(e).__name__})", file=str(path)) from None
    if not isinstance(value, dict):
        raise error("not a JSON object", file=str(path))
    return value


def open_checkpoint(
    directory: str | os.PathLike, root: str | os.PathLike | None = None, source: dict | None = None
) -> Checkpoint:
    """Open a local checkpoint directory. `root` bounds where its files may resolve (default: the directory).
    Paths are kept absolute: a plan (and its job digest) means the same whichever folder it was made in."""
    directory = Path(os.path.abspath(directory))
    if not _is_dir(directory):
        raise SourceError("not a directory (and not a Hub repo id in the local cache)", file=str(directory))
    bound = _resolve(Path(root or directory), str(directory))
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        raise SourceError(f"cannot list: {e.strerror}", file=str(directory)) from None
    files, names = _weight_files(directory, entries, bound)
    tensors = _tensors(directory, files, names, bound)
    for entry in entries:  # side files (config, tokenizer) are read and copied too: none may lead outside
        if entry.is_symlink():
            _inside(entry, bound, str(entry))
    ckpt = Checkpoint(directory, tensors, source or {"path": str(directory.resolve())})
    ckpt.config  # noqa: B018 -- refuse a config.json that is not a JSON object now, not after the merge
    return ckpt


def is_side_file(name: str) -> bool:
    """Whether a remote folder's file is a side file to fetch whole (config, tokenizer, ...; not the index)."""
    if name == INDEX_NAME:
        return False
    return any(fnmatch.fnmatch(name, p) for p in SIDE_PATTERNS) and not any(
        fnmatch.fnmatch(name, p) for p in NOT_SIDE_PATTERNS
    )


def header_from_ranges(read: Callable[[int, int], bytes], size: int, where: str) -> dict[str, TensorInfo]:
    """A remote shard's header from two ranged reads (`read(offset, length)`: the 8-byte length, then the JSON),
    checked by the same bounded parser as a local file's."""
    head = read(0, min(8, size)) if size else b""
    if len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if n <= MAX_HEADER_BYTES and 8 + n <= size:
            head += read(8, n)
    return parse_header_bytes(head, size, where)[0]


def _weight_files(directory: Path, entries: list[Path], bound: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read, and the index's weight map (None without an index)."""
    files = pick_weights([p.name for p in entries if _is_file(p)], str(directory))
    if files is not None:
        return files, None
    names = _weight_map(directory / INDEX_NAME, directory, bound)
    return sorted(set(names.values())), names


def pick_weights(names: list[str], where: str) -> list[str] | None:
    """Which of a folder's files hold its weights: model.safetensors (first, as transformers loads it: the merge is
    of the model it loads), else None (the index says), else every *.safetensors; pickles only are refused."""
    if SINGLE_NAME in names:
        if INDEX_NAME in names:
            logger.warning(
                f"{where} holds both {SINGLE_NAME} and {INDEX_NAME}: reading {SINGLE_NAME}, as transformers does "
                "(remove the one that is stale)"
            )
        return [SINGLE_NAME]
    if INDEX_NAME in names:
        return None
    files = sorted(n for n in names if n.endswith(".safetensors"))
    if not files:
        pickles = sorted(n for n in names if os.path.splitext(n)[1] in PICKLE_SUFFIXES)
        if pickles:
            raise SourceError(
                f"only pickle checkpoints found ({', '.join(pickles[:3])}); chatvec_dist never unpickles files: "
                "convert them to safetensors first",
                file=where,
            )
        raise SourceError("no safetensors files found", file=where)
    return files


def _tensors(directory: Path, files: list[str], names: dict[str, str] | None, bound: Path) -> dict[str, TensorRef]:
    """Every tensor of `files` (those the index places there, with an index), in file order."""
    cited = str(directory / INDEX_NAME) if names is not None else None
    shards = [(name, str(_inside(directory / name, bound, cited or str(directory / name)))) for name in files]
    return collect_tensors(shards, lambda path: read_header(path)[0], names, str(directory / INDEX_NAME))


def collect_tensors(
    shards: list[tuple[str, str]],
    header: Callable[[str], dict[str, TensorInfo]],
    names: dict[str, str] | None,
    index: str,
) -> dict[str, TensorRef]:
    """Every tensor of `shards` ((name, path) each; `header` reads a path's, in byte order), those the index `names`
    places there where there is one, in file order; `index` is the index file, cited when it names what a shard
    lacks. Work per shard is set operations: a 45 k-tensor checkpoint has a few hundred shards."""
    tensors: dict[str, TensorRef] = {}
    placed = _placed(names) if names is not None else {}
    for name, path in shards:
        infos = header(path)
        if names is None:
            if not tensors.keys().isdisjoint(infos):
                tname = next(t for t in infos if t in tensors)
                raise HeaderError(f"tensor also present in {tensors[tname].path}", file=path, tensor=tname)
        else:
            wanted = placed.get(name, set())
            if infos.keys() != wanted:  # a shard holding tensors the index places elsewhere: those are left out
                infos = {t: info for t, info in infos.items() if t in wanted}
        tensors.update(zip(infos, map(_make_ref, repeat(path), infos.values())))
    if names is None:
        return tensors
    if len(tensors) != len(names):
        tname, fname = next((t, f) for t, f in names.items() if t not in tensors)
        raise HeaderError(f"the index places this tensor in {fname}, which lacks it", file=index, tensor=tname)
    paths = [path for _, path in shards]
    if all(a < b for a, b in zip(paths, paths[1:])):  # shards in path order, each in byte order: file order already
        return tensors
    return {n: tensors[n] for n in sorted(tensors, key=lambda n: (tensors[n].path, tensors[n].info.start))}


def _placed(names: dict[str, str]) -> dict[str, set[str]]:
    """The index's tensors per shard file."""
    placed: dict[str, set[str]] = {}
    for tname, fname in names.items():
        placed.setdefault(fname, set()).add(tname)
    return placed


def _weight_map(index: Path, directory: Path, bound: Path) -> dict[str, str]:
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise HeaderError(f"index is larger than {MAX_INDEX_BYTES} bytes", file=str(index))
        text = index.read_bytes()
    except OSError as e:
        raise HeaderError(f"index is not valid JSON ({type(e).__name__})", file=str(index)) from None
    wm = parse_weight_map(text, str(index))
    for fname, tname in _first_tensors(wm).items():  # each shard once: filesystem look-ups per file (NFS, Lustre)
        if not _is_file(directory / fname):
            raise HeaderError(f"weight_map names a missing shard {shown(fname)}", file=str(index), tensor=tname)
        _inside(directory / fname, bound, str(index), tname)
    return wm


def _first_tensors(wm: dict[str, str]) -> dict[str, str]:
    """Each shard file of a weight map, in order of first mention, with the first tensor it holds (built from the
    end, so that the first tensor's entry is written last; its place is the file's first mention)."""
    first = dict.fromkeys(wm.values(), "")
    first.update(zip(reversed(wm.values()), reversed(wm.keys())))
    return first


def parse_weight_map(text: bytes, index: str) -> dict[str, str]:
    """An index's weight_map (tensor → shard file): every name printable, every file a relative path that stays
    inside the checkpoint (no absolute path, `..`, backslash or URL)."""
    try:
        doc = loads_unique(text.decode("utf-8"))
    except HeaderError as e:
        raise HeaderError(e.what, file=index) from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise HeaderError(f"index is not valid JSON ({type(e).__name__})", file=index) from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise HeaderError("index has no weight_map object", file=index)
    if all_safe_names(wm) and all(map(_safe_path, _distinct(wm.values()))):
        return wm  # the usual case, checked in C loops and per file; else the loop names the first problem
    safe: set[str] = set()  # each file name checked once: a 45 k-tensor index names a few hundred
    for tname, fname in wm.items():
        if not is_safe_name(tname):
            raise HeaderError(
                f"weight_map names a tensor {shown(tname)} that is empty or has control characters", file=index
            )
        if isinstance(fname, str) and fname in safe:
            continue
        if not _safe_path(fname):
            raise HeaderError(f"weight_map names an unsafe path {shown(fname)}", file=index, tensor=tname)
        safe.add(fname)
    return wm


def _safe_path(fname: object) -> bool:
    """A weight map's file: a non-empty printable relative path inside the checkpoint, no backslash or URL."""
    return (
        isinstance(fname, str)
        and bool(fname)
        and fname.isprintable()
        and not os.path.isabs(fname)
        and ".." not in Path(fname).parts
        and "\\" not in fname
        and "://" not in fname
    )


def _distinct(values: Iterable[object]) -> Iterable[object]:
    """The distinct values (a list or object among them, which is no path, as None)."""
    try:
        return set(values)
    except TypeError:
        return [None]


def _inside(path: Path, bound: Path, cited: str, tensor: str | None = None) -> Path:
    """Refuse a file whose real location (symlinks followed) is outside the checkpoint."""
    real = _resolve(path, cited, tensor)
    if not real.is_relative_to(bound):
        raise HeaderError(f"{path.name} resolves to {real}, outside the checkpoint {bound}", file=cited, tensor=tensor)
    return path


def _resolve(path: Path, cited: str, tensor: str | None = None) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise HeaderError(f"{path.name} cannot be resolved ({e})", file=cited, tensor=tensor) from None


def _is_file(path: Path) -> bool:
    """`Path.is_file`, False also where the name is too long or otherwise unusable."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False
