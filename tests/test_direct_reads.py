"""Direct reads (io/direct.py): exact bytes past the page cache, only inside the planned range, a buffered fallback
on tmpfs and for cached files, and merges that are byte-identical whichever way their inputs were read."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file

from chatvec_dist.cli import main
from chatvec_dist.exec.worker import DIRECT_READS_ENV
from chatvec_dist.io.direct import ALIGN, WINDOW, DirectReader, cached_pages
from chatvec_dist.io.ranges import FileHandles
from chatvec_dist.kernels.reference import reference

PAGE = os.sysconf("SC_PAGE_SIZE")


def write_file(path: Path, nbytes: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def evict(*paths: Path) -> None:
    """Push the files out of the page cache (written back first), as on a machine with too little RAM for them."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached(path: Path, offset: int = 0, nbytes: int | None = None) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        found = cached_pages(fd, offset, nbytes if nbytes is not None else os.path.getsize(path))
    finally:
        os.close(fd)
    if found is None:
        pytest.skip("cachestat(2) is not available here (Linux < 6.5 or filtered)")
    return found


def direct_works(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"\0" * ALIGN)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture(autouse=True)
def direct_reads(monkeypatch):
    """Direct reads are opt-in (CHATVEC_DIRECT_READS=1): every merge here takes them."""
    monkeypatch.setenv(DIRECT_READS_ENV, "1")


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    if not direct_works(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    return tmp_path


def test_strips_of_an_uncached_range_come_exact_and_past_the_page_cache(disk: Path):
    path = disk / "f.bin"
    data = write_file(path, 3 * WINDOW + 12345)
    evict(path)
    assert cached(path) == 0
    files = FileHandles()
    reader = DirectReader(files)
    start, end, step = 1000 * 2 + 6, 3 * WINDOW + 10000, 1 << 20  # unaligned both ends, as tensors are
    for offset in range(start, end, step):
        n = min(step, end - offset)
        assert bytes(reader.read("in", str(path), offset, n, end, "t")) == data[offset : offset + n]
    assert reader.direct_bytes >= end - start - 2 * 3 * ALIGN - WINDOW // 2  # all but heads, tails, small rests
    inner = (start // PAGE + 2) * PAGE
    assert cached(path, inner, WINDOW) * PAGE < WINDOW // 8  # the bytes did not pass through the page cache
    files.close()


def test_no_byte_outside_the_planned_range_is_asked_for(disk: Path, monkeypatch):
    path = disk / "f.bin"
    data = write_file(path, 2 * WINDOW, seed=1)
    evict(path)
    asked: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd: int, buffers: list, offset: int, *flags: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            asked.append((offset, offset + sum(len(memoryview(b)) for b in buffers)))
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", spy)
    files = FileHandles()
    reader = DirectReader(files)
    start, end = 777, 777 + 5 * (1 << 20) + 3  # the planned range; the file goes on past it
    for offset in range(start, end, 1 << 20):
        n = min(1 << 20, end - offset)
        assert bytes(reader.read(0, str(path), offset, n, end, "t")) == data[offset : offset + n]
    files.close()
    assert reader.direct_bytes > 0
    assert asked and all(start <= lo and hi <= end for lo, hi in asked), asked


@pytest.fixture
def ramfs(tmp_path: Path):
    """A ramfs (no O_DIRECT on any kernel) mounted in tmp_path: root only."""
    where = tmp_path / "ramfs"
    where.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a ramfs here (not root?)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def read_strips(reader: DirectReader, path: Path, start: int, end: int) -> list[bytes]:
    return [bytes(reader.read(1, str(path), o, min(1 << 20, end - o), end, "t")) for o in range(start, end, 1 << 20)]


def test_a_filesystem_without_o_direct_is_read_buffered_per_file(ramfs: Path, disk: Path):
    refuses, takes = ramfs / "a.bin", disk / "b.bin"
    data = {p: write_file(p, WINDOW + 5000, seed=2) for p in (refuses, takes)}
    evict(takes)
    files = FileHandles()
    reader = DirectReader(files)
    for p in (refuses, takes, refuses):
        assert read_strips(reader, p, 3, WINDOW + 5000) == read_strips_of(data[p], 3, WINDOW + 5000)
    assert reader.refused == {str(refuses)}
    assert WINDOW // 2 < reader.direct_bytes <= WINDOW + 5000  # `takes` only, once
    files.close()


def read_strips_of(data: bytes, start: int, end: int) -> list[bytes]:
    return [data[o : min(o + (1 << 20), end)] for o in range(start, end, 1 << 20)]


def test_tmpfs_is_read_whether_or_not_it_takes_o_direct():
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    path = shm / f"chatvec-direct-{os.getpid()}.bin"
    try:
        data = write_file(path, WINDOW + 5000, seed=2)
        files = FileHandles()
        assert read_strips(DirectReader(files), path, 3, WINDOW + 5000) == read_strips_of(data, 3, WINDOW + 5000)
        files.close()
    finally:
        path.unlink(missing_ok=True)


def test_a_cached_range_is_copied_from_the_cache_not_read_again(disk: Path):
    path = disk / "f.bin"
    data = write_file(path, 2 * WINDOW, seed=3)
    path.read_bytes()
    assert cached(path) * PAGE >= 2 * WINDOW
    files = FileHandles()
    reader = DirectReader(files)
    assert bytes(reader.read(0, str(path), 10, WINDOW - 20, 2 * WINDOW, "t")) == data[10 : WINDOW - 10]
    assert reader.direct_bytes == 0
    files.close()


def test_a_file_shorter_than_planned_is_named(disk: Path):
    path = disk / "f.bin"
    write_file(path, 2 << 20, seed=4)
    evict(path)
    files = FileHandles()
    with pytest.raises(Exception, match=r"file ends at byte"):
        DirectReader(files).read(0, str(path), 100, 1 << 20, 4 << 20, "model.norm.weight")
    files.close()


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def sha(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def big_llamas(tmp_path_factory) -> dict[str, Path]:
    """Llamas whose embeddings (2048 × 256 bf16: 1 MiB) are read past the page cache when uncached."""
    root = tmp_path_factory.mktemp("direct_llamas")
    if not direct_works(root):
        pytest.skip(f"{root} does not take O_DIRECT")
    base = make_llama(root / "base", 0, vocab=2048, hidden=256)
    make_llama(root / "chat", 1, vocab=2048, hidden=256, base=base)
    make_llama(root / "cp", 2, vocab=2048, hidden=256, base=base)
    return {n: root / n for n in ("base", "chat", "cp")}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_merge_of_uncached_inputs_equals_the_reference_and_the_cached_merge(big_llamas, tmp_path, workers):
    d = big_llamas
    shards = [p for n in ("base", "chat", "cp") for p in d[n].glob("*.safetensors")]
    common = ["--backend", "local", "--workers", workers, "--no-progress"]
    for name in ("cached", "uncached"):
        if name == "uncached":
            evict(*shards)
        args = ["merge", "--base", str(d["base"]), "--chat", str(d["chat"]), "--cp", str(d["cp"])]
        assert main([*args, "--out", str(tmp_path / name), *common]) == 0
    embed = 2048 * 256 * 2
    assert all(cached(p) * PAGE < os.path.getsize(p) - embed // 2 for p in shards)  # read past the cache
    assert sha(tmp_path / "uncached") == sha(tmp_path / "cached")
    base, chat, cp = (load_all(d[n]) for n in ("base", "chat", "cp"))
    out = load_all(tmp_path / "uncached")
    assert out.keys() == cp.keys()
    for name, c in cp.items():
        want = reference(c, [(1.0, chat[name], base[name])], c.dtype).view(c.shape)
        assert out[name].dtype == torch.bfloat16 and out[name].shape == c.shape
        assert torch.equal(out[name].view(torch.int16), want.view(torch.int16)), name


def test_a_ties_merge_of_uncached_inputs_has_the_cached_merges_bytes(big_llamas, tmp_path):
    """TIES' pre-pass reads through the direct reader too (exec/histogram.py): same thresholds, same bytes."""
    d = big_llamas
    shards = [p for n in ("base", "chat", "cp") for p in d[n].glob("*.safetensors")]
    vectors = ["--base", str(d["base"]), "--chat", str(d["chat"]), "--base", str(d["base"]), "--chat", str(d["cp"])]
    common = ["--cp", str(d["cp"]), "--alpha", "0.5", "--alpha", "0.75", "--ties", "0.3", "--backend", "local"]
    for name in ("cached", "uncached"):
        if name == "uncached":
            evict(*shards)
        assert main(["merge", *vectors, *common, "--out", str(tmp_path / name), "--no-progress"]) == 0
    embed = 2048 * 256 * 2
    assert all(cached(p) * PAGE < os.path.getsize(p) - embed // 2 for p in shards)
    assert sha(tmp_path / "uncached") == sha(tmp_path / "cached")
