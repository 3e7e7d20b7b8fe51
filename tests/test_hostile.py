"""Broken and hostile checkpoints through the CLI: exit 2, one line naming the file (and tensor), no output."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models, save_checkpoint
from chatvec_dist.io.checkpoint import INDEX_NAME
from chatvec_dist.io.header import MAX_HEADER_BYTES
from chatvec_dist.output.manifest import read_manifest

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"
SHARD1 = "model-00001-of-00002.safetensors"
RUN = ["--backend", "local", "--workers", "1", "--no-progress"]


@dataclass
class Case:
    """The three demo checkpoints (to be corrupted), the CLI arguments, and what the error must mention."""

    root: Path
    base: Path
    chat: Path
    cp: Path
    out: Path
    extra: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        return [
            "merge",
            "--base",
            str(self.base),
            "--chat",
            str(self.chat),
            "--cp",
            str(self.cp),
            "--out",
            str(self.out),
            *RUN,
            *self.extra,
        ]


CASES: dict[str, Callable[[Case], None]] = {}


def case(fn: Callable[[Case], None]) -> Callable[[Case], None]:
    CASES[fn.__name__] = fn
    return fn


# --- raw safetensors surgery -------------------------------------------------------------------


def split(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)


def edit(path: Path, fn: Callable[[dict, bytes], tuple[dict | bytes, bytes] | None]) -> None:
    """Rewrite a shard after `fn` mutates its header (in place, or by returning a new header and data)."""
    header, data = split(path)
    result = fn(header, data)
    write(path, *(result if result is not None else (header, data)))


def last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def edit_index(c: Case, fn: Callable[[dict], None]) -> Path:
    path = c.cp / INDEX_NAME
    doc = json.loads(path.read_text())
    fn(doc["weight_map"])
    path.write_text(json.dumps(doc))
    return path


def resave(directory: Path, fn: Callable[[dict[str, torch.Tensor]], None], shards: int = 1) -> None:
    """Load every tensor of a demo checkpoint, let `fn` change them, save it again."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(f)
        f.unlink()
    (directory / INDEX_NAME).unlink(missing_ok=True)
    fn(tensors)
    save_checkpoint(directory, tensors, json.loads((directory / "config.json").read_text()), shards=shards)


class Evil:
    """Unpickling this opens (creates) `marker`: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- shard headers -----------------------------------------------------------------------------


@case
def truncated_shard(c: Case) -> None:
    path = c.base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    c.expect = [str(path), "tensor '"]


@case
def empty_shard(c: Case) -> None:
    (c.base / "model.safetensors").write_bytes(b"")
    c.expect = [str(c.base / "model.safetensors"), "8-byte"]


@case
def shorter_than_length_field(c: Case) -> None:
    (c.base / "model.safetensors").write_bytes(b"\x10\x00\x00")
    c.expect = [str(c.base / "model.safetensors")]


@case
def header_length_past_eof(c: Case) -> None:
    path = c.base / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(blob) - 7) + blob[8:])  # one byte more than the file holds
    c.expect = [str(path), "past the end"]


@case
def header_length_over_cap(c: Case) -> None:
    path = c.base / "model.safetensors"
    write(path, b"{}", b"", length=MAX_HEADER_BYTES + 1)
    c.expect = [str(path), "cap"]


@case
def header_length_max_u64(c: Case) -> None:
    path = c.base / "model.safetensors"
    write(path, b"{}", b"", length=2**64 - 1)
    c.expect = [str(path), "cap"]


@case
def invalid_json(c: Case) -> None:
    path = c.base / "model.safetensors"
    write(path, b'{"model.norm.weight": {"dtype": "BF16",', b"\0" * 64)
    c.expect = [str(path), "not valid JSON"]


@case
def invalid_utf8(c: Case) -> None:
    path = c.base / "model.safetensors"
    write(path, b'{"\xff\xfe": {}}', b"")
    c.expect = [str(path), "not valid JSON"]


@case
def deeply_nested_json(c: Case) -> None:
    path = c.base / "model.safetensors"
    write(path, b"[" * 200_000 + b"]" * 200_000, b"")
    c.expect = [str(path)]


@case
def header_not_object(c: Case) -> None:
    path = c.base / "model.safetensors"
    write(path, b"[1, 2, 3]", b"")
    c.expect = [str(path), "not a JSON object"]


@case
def duplicate_keys(c: Case) -> None:
    path = c.base / "model.safetensors"
    header, data = split(path)
    text = json.dumps(header)
    body = text[:-1] + f', "{NORM}": ' + json.dumps(header[NORM]) + "}"
    write(path, body.encode(), data)
    c.expect = [str(path), "duplicate key", NORM]


@case
def metadata_not_string_map(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h.__setitem__("__metadata__", {"format": 1}))
    c.expect = [str(path), "__metadata__"]


@case
def metadata_falsy_non_object(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h.__setitem__("__metadata__", 0))
    c.expect = [str(path), "__metadata__"]


@case
def entry_not_object(c: Case) -> None:
    path = c.base / "model.safetensors"
    header, data = split(path)
    header[NORM] = [1, 2]
    write(path, header, data)
    c.expect = [str(path), NORM]


@case
def tensor_name_with_newline(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h.__setitem__(NORM + "\nchatvec: ok", h.pop(NORM)))
    c.expect = [str(path), "control characters"]


@case
def offsets_past_end(c: Case) -> None:
    path = c.base / "model.safetensors"

    def fn(h: dict, data: bytes) -> None:
        b, e = h[Q]["data_offsets"]
        h[Q]["data_offsets"] = [len(data), len(data) + e - b]

    edit(path, fn)
    c.expect = [str(path), Q, "past the end"]


@case
def offsets_reversed(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h[Q].__setitem__("data_offsets", h[Q]["data_offsets"][::-1]))
    c.expect = [str(path), Q]


@case
def offsets_not_integers(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h[Q].__setitem__("data_offsets", [float(o) for o in h[Q]["data_offsets"]]))
    c.expect = [str(path), Q, "data_offsets"]


@case
def overlapping_offsets(c: Case) -> None:
    path = c.base / "model.safetensors"
    header, data = split(path)
    name = last_tensor(header)
    header[name]["data_offsets"] = [o - 2 for o in header[name]["data_offsets"]]
    write(path, header, data[:-2])
    c.expect = [str(path), name, "overlaps"]


@case
def gap_between_tensors(c: Case) -> None:
    path = c.base / "model.safetensors"
    header, data = split(path)
    name = last_tensor(header)
    begin = header[name]["data_offsets"][0]
    header[name]["data_offsets"] = [o + 8 for o in header[name]["data_offsets"]]
    write(path, header, data[:begin] + b"\0" * 8 + data[begin:])
    c.expect = [str(path), name, "gap"]


@case
def trailing_bytes(c: Case) -> None:
    path = c.base / "model.safetensors"
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    c.expect = [str(path), "ends at byte"]


@case
def unknown_dtype(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h[Q].__setitem__("dtype", "Q7"))
    c.expect = [str(path), Q, "dtype"]


@case
def unhashable_dtype(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h[Q].__setitem__("dtype", ["BF16"]))
    c.expect = [str(path), Q, "dtype"]


@case
def shape_bytes_mismatch(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h[Q].__setitem__("shape", [64, 65]))
    c.expect = [str(path), Q, "bytes"]


@case
def negative_dim(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h[Q].__setitem__("shape", [-64, -64]))
    c.expect = [str(path), Q, "shape"]


@case
def absurd_dims(c: Case) -> None:
    path = c.base / "model.safetensors"
    edit(path, lambda h, d: h[Q].__setitem__("shape", [2**40, 2**40, 2**40]))
    c.expect = [str(path), Q, "shape"]


@case
def huge_integer_dim(c: Case) -> None:
    path = c.base / "model.safetensors"
    header, data = split(path)
    text = json.dumps(header).replace('"shape": [64, 64]', '"shape": [0, 1' + "0" * 3000 + "]", 1)
    write(path, text.encode(), data)
    c.expect = [str(path)]


def add_empty_tensor(path: Path, shape: list[int]) -> None:
    """Give a shard one more tensor, of zero elements (it holds no bytes) and the given shape."""

    def fn(h: dict, data: bytes) -> None:
        h["model.zz_empty"] = {"dtype": "BF16", "shape": shape, "data_offsets": [len(data), len(data)]}

    edit(path, fn)


@case
def zero_elements_dim_beyond_int64(c: Case) -> None:
    """[0, 2**63] holds no element, yet no int64 (the manifest's, torch's) can hold its second dimension."""
    path = c.base / "model.safetensors"
    add_empty_tensor(path, [0, 2**63])
    c.expect = [str(path), "model.zz_empty", "absurd shape [0, 9223372036854775808]"]


@case
def zero_elements_strides_beyond_int64(c: Case) -> None:
    path = c.base / "model.safetensors"
    add_empty_tensor(path, [0, 2**40, 2**40])
    c.expect = [str(path), "model.zz_empty", "absurd shape"]


@case
def pickle_bytes_as_safetensors(c: Case) -> None:
    marker = c.root / "pwned"
    (c.base / "model.safetensors").write_bytes(pickle.dumps(Evil(marker)))
    c.expect = [str(c.base / "model.safetensors")]


@case
def tensor_in_two_unindexed_shards(c: Case) -> None:
    shutil.copyfile(c.base / "model.safetensors", c.base / "model-extra.safetensors")
    (c.base / "model.safetensors").rename(c.base / "model-a.safetensors")
    c.expect = [str(c.base), "also present"]


@case
def symlinked_shard_outside(c: Case) -> None:
    outside = c.root / "elsewhere.safetensors"
    (c.base / "model.safetensors").rename(outside)
    (c.base / "model.safetensors").symlink_to(outside)
    c.expect = [str(c.base / "model.safetensors"), "outside the checkpoint"]


@case
def symlinked_side_file_outside(c: Case) -> None:
    secret = c.root / "secret.txt"
    secret.write_text("do not copy me")
    (c.cp / "tokenizer.json").symlink_to(secret)
    c.expect = [str(c.cp / "tokenizer.json"), "outside the checkpoint"]


@case
def symlink_loop(c: Case) -> None:
    (c.base / "model.safetensors").rename(c.base / "model-00001.safetensors")  # unindexed: every *.safetensors is read
    (c.base / "loop.safetensors").symlink_to(c.base / "loop.safetensors")
    c.expect = [str(c.base / "loop.safetensors")]


@case
def config_not_json(c: Case) -> None:
    (c.cp / "config.json").write_text("{not json")
    c.extra = ["--dtype", "float32"]  # the output's config.json is rewritten with the dtype: must fail up front
    c.expect = [str(c.cp / "config.json")]


@case
def config_not_object(c: Case) -> None:
    (c.cp / "config.json").write_text("[]")
    c.extra = ["--dtype", "float32"]
    c.expect = [str(c.cp / "config.json")]


# --- the index ---------------------------------------------------------------------------------


@case
def index_parent_path(c: Case) -> None:
    shutil.copyfile(c.cp / SHARD1, c.root / "x.safetensors")  # it exists: refused for where it is, not for missing
    c.expect = [str(edit_index(c, lambda wm: wm.__setitem__(Q, "../x.safetensors"))), Q, "unsafe"]


@case
def index_absolute_path(c: Case) -> None:
    shutil.copyfile(c.cp / SHARD1, c.root / "x.safetensors")
    c.expect = [str(edit_index(c, lambda wm: wm.__setitem__(Q, str(c.root / "x.safetensors")))), Q, "unsafe"]


@case
def index_symlink_outside(c: Case) -> None:
    shutil.copyfile(c.cp / SHARD1, c.root / "x.safetensors")
    (c.cp / "evil.safetensors").symlink_to(c.root / "x.safetensors")
    c.expect = [str(edit_index(c, lambda wm: wm.__setitem__(Q, "evil.safetensors"))), Q, "outside the checkpoint"]


@case
def index_missing_shard(c: Case) -> None:
    c.expect = [str(edit_index(c, lambda wm: wm.__setitem__(Q, "model-00003-of-00003.safetensors"))), Q, "missing"]


@case
def index_tensor_not_in_shard(c: Case) -> None:
    c.expect = [str(edit_index(c, lambda wm: wm.__setitem__("model.bogus.weight", SHARD1))), "model.bogus.weight"]


@case
def index_shard_not_a_string(c: Case) -> None:
    c.expect = [str(edit_index(c, lambda wm: wm.__setitem__(Q, 7))), Q]


@case
def index_not_json(c: Case) -> None:
    (c.cp / INDEX_NAME).write_text('{"weight_map": ')
    c.expect = [str(c.cp / INDEX_NAME), "not valid JSON"]


@case
def index_not_utf8(c: Case) -> None:
    (c.cp / INDEX_NAME).write_bytes(b'{"weight_map": {"\xff": 1}}')
    c.expect = [str(c.cp / INDEX_NAME)]


@case
def index_deeply_nested(c: Case) -> None:
    (c.cp / INDEX_NAME).write_text("[" * 200_000 + "]" * 200_000)
    c.expect = [str(c.cp / INDEX_NAME)]


@case
def index_without_weight_map(c: Case) -> None:
    (c.cp / INDEX_NAME).write_text('{"metadata": {}, "weight_map": {}}')
    c.expect = [str(c.cp / INDEX_NAME), "weight_map"]


@case
def index_duplicate_keys(c: Case) -> None:
    path = c.cp / INDEX_NAME
    text = path.read_text().rstrip()
    assert text.endswith("}}")
    path.write_text(text[:-2] + f', "{Q}": "model-00002-of-00002.safetensors"}}}}')
    c.expect = [str(path), "duplicate key", Q]


# --- checkpoints that do not fit together ------------------------------------------------------


@case
def base_chat_different_names(c: Case) -> None:
    edit(c.chat / "model.safetensors", lambda h, d: h.__setitem__("model.norm_x.weight", h.pop(NORM)))
    c.expect = [str(c.chat), NORM]


@case
def shape_mismatch_outside_vocab(c: Case) -> None:
    edit(c.chat / "model.safetensors", lambda h, d: h[Q].__setitem__("shape", [32, 128]))  # same bytes, other shape
    c.expect = [str(c.chat / "model.safetensors"), Q, "shape"]


@case
def cp_vocab_smaller(c: Case) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[EMBED] = t[EMBED][:200].clone()

    resave(c.cp, shrink, shards=2)
    c.expect = [str(c.cp), EMBED, "smaller"]


@case
def vocab_full_with_extended_cp(c: Case) -> None:
    c.extra = ["--vocab", "full"]
    c.expect = [str(c.cp), "--vocab full"]


@case
def float_vs_int_dtype(c: Case) -> None:
    edit(c.base / "model.safetensors", lambda h, d: h[Q].__setitem__("dtype", "I16"))  # same itemsize as BF16
    c.expect = [str(c.base / "model.safetensors"), Q, "I16"]


# --- options ---------------------------------------------------------------------------------


@case
def alpha_not_finite(c: Case) -> None:
    c.extra = ["--alpha", "nan"]
    c.expect = ["alphas [nan] must be finite numbers"]


@case
def alpha_beyond_float32(c: Case) -> None:
    """The kernels scale in float32, where 1e39 is Inf (outputs ±Inf, and Inf·0 = NaN in a kernel's idle lanes)."""
    c.extra = ["--alpha", "1e39"]
    c.expect = ["alphas [1e+39] must be finite numbers within float32's range, |alpha| ≤ 3.4e38"]


@case
def exclude_matching_nothing(c: Case) -> None:
    c.extra = ["--exclude", "no_such_tensor"]
    c.expect = ["'no_such_tensor' matches no tensor"]


@case
def cp_name_is_a_path(c: Case) -> None:
    c.extra = ["--cp", f"../escape={c.cp}"]
    c.expect = ["../escape=", "plain file name"]


@case
def unnamed_cps_with_one_folder_name(c: Case) -> None:
    other = c.root / "other" / c.cp.name
    shutil.copytree(c.cp, other)
    c.extra = ["--cp", str(other)]
    c.expect = [str(c.cp), str(other), f"both be named '{c.cp.name}'", "name them"]


@case
def workers_zero(c: Case) -> None:
    c.extra = ["--workers", "0"]
    c.expect = ["workers 0"]


@case
def cpus_per_worker_zero(c: Case) -> None:
    c.extra = ["--cpus-per-worker", "0"]
    c.expect = ["cpus per worker 0.0: must be positive"]


@case
def unit_size_not_whole_mib(c: Case) -> None:
    c.extra = ["--unit-size", "1.5MiB"]
    c.expect = ["unit size 1572864 bytes", "whole number of MiB"]


@case
def device_cuda_without_gpu(c: Case) -> None:
    c.extra = ["--device", "cuda"]  # found by the first worker, after the shards were laid out
    c.expect = ["--device cuda", "no CUDA device"]


@case
def ray_address_that_nothing_listens_on(c: Case) -> None:
    c.extra = ["--backend", "ray", "--address", "127.0.0.1:1"]  # refused in a second, not after Ray's retries
    c.expect = ["cannot reach the Ray cluster at 127.0.0.1:1", "Connection refused"]


@case
def overwrite_of_a_folder_that_is_not_an_output(c: Case) -> None:
    c.out.mkdir()
    (c.out / "notes.txt").write_text("mine")
    c.extra = ["--overwrite"]
    c.expect = [str(c.out), "not a chatvec output", "move it away yourself"]


# --- sources and destinations ------------------------------------------------------------------


@case
def pickle_only_checkpoint(c: Case) -> None:
    marker = c.root / "pwned"
    shutil.rmtree(c.base)
    c.base.mkdir()
    (c.base / "config.json").write_text("{}")
    (c.base / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(marker)))
    c.expect = [str(c.base), "pickle"]


@case
def empty_directory(c: Case) -> None:
    c.base = c.root / "empty"
    c.base.mkdir()
    c.expect = [str(c.base), "no safetensors"]


@case
def nonexistent_path(c: Case) -> None:
    c.chat = c.root / "does-not-exist"
    c.expect = [str(c.chat), "not a directory"]


@case
def name_too_long(c: Case) -> None:
    c.chat = c.root / ("x" * 300)
    c.expect = [str(c.chat)]


@case
def output_exists(c: Case) -> None:
    c.out.mkdir()
    (c.out / "keep.txt").write_text("mine")
    c.expect = [str(c.out), "exists"]


@case
def output_inside_input(c: Case) -> None:
    c.out = c.cp / "merged"
    c.expect = [str(c.out), "overlaps the input"]


# --- the battery -------------------------------------------------------------------------------


def _demo(root: Path) -> Case:
    paths = make_demo_models(root)
    return Case(root, paths["base"], paths["chat"], paths["cp"], root / "out")


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused(name: str, tmp_path: Path, capsys) -> None:
    c = _demo(tmp_path)
    existed = c.out.exists()
    CASES[name](c)
    preexisting = sorted(os.listdir(c.out)) if c.out.exists() else None
    code = main(c.argv())
    stdout, stderr = capsys.readouterr()
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("chatvec: error:"), stderr
    for s in c.expect:
        assert s in lines[0], f"{s!r} not in {lines[0]!r}"
    assert not existed
    if preexisting is None:
        assert not c.out.exists()
    else:
        assert sorted(os.listdir(c.out)) == preexisting  # untouched
    assert not c.out.with_name(c.out.name + ".partial").exists()  # a run that could not start leaves nothing
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled


@pytest.mark.parametrize("save", [False, True])
def test_plan_refuses_a_dim_beyond_int64(tmp_path: Path, capsys, save: bool) -> None:
    """`chatvec plan` (and `--save`, which writes the shapes as int64) refuses it at parse time, in one line."""
    c = _demo(tmp_path)
    path = c.chat / "model.safetensors"
    add_empty_tensor(path, [0, 2**63])
    plan = tmp_path / "plan.parquet"
    argv = ["plan", "--base", str(c.base), "--chat", str(c.chat), "--cp", str(c.cp)]
    assert main(argv + (["--save", str(plan)] if save else [])) == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.splitlines() == [
        f"chatvec: error: {path}: tensor 'model.zz_empty': absurd shape [0, 9223372036854775808]"
    ]
    assert not plan.exists()


def test_zero_element_tensors_of_sane_shapes_still_merge(tmp_path: Path) -> None:
    """The bound is on the dimensions, not on zero-element tensors: an ordinary empty one such as [0, 64] merges."""
    c = _demo(tmp_path)
    for d in (c.base, c.chat):
        add_empty_tensor(d / "model.safetensors", [0, 64])
    add_empty_tensor(c.cp / SHARD1, [0, 64])
    index = c.cp / INDEX_NAME
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.zz_empty"] = SHARD1
    index.write_text(json.dumps(doc))
    assert main(c.argv()) == 0
    table, _ = read_manifest(c.out)
    row = next(r for r in table.to_pylist() if r["tensor"] == "model.zz_empty")
    assert row["shape"] == [0, 64] and row["nbytes"] == 0


def test_int_in_cp_float_in_base_is_refused(tmp_path: Path, capsys) -> None:
    c = _demo(tmp_path)
    edit(
        c.cp / "model-00001-of-00002.safetensors",
        lambda h, d: h[NORM].__setitem__("dtype", "I16") if NORM in h else None,
    )
    edit(
        c.cp / "model-00002-of-00002.safetensors",
        lambda h, d: h[NORM].__setitem__("dtype", "I16") if NORM in h else None,
    )
    assert main(c.argv()) == 2
    assert NORM in capsys.readouterr().err


def test_int_tensor_is_copied_from_cp(tmp_path: Path) -> None:
    c = _demo(tmp_path)
    ids = {
        "base": torch.arange(16, dtype=torch.int64),
        "chat": torch.arange(16, dtype=torch.int64) * 3,
        "cp": torch.arange(16, dtype=torch.int64) * 7 - 5,
    }
    for name, shards in (("base", 1), ("chat", 1), ("cp", 2)):
        resave(getattr(c, name), lambda t, v=ids[name]: t.__setitem__("model.position_ids", v), shards=shards)
    assert main(c.argv()) == 0
    table, _ = read_manifest(c.out)
    row = next(r for r in table.to_pylist() if r["tensor"] == "model.position_ids")
    assert (row["rule"], row["reason"], row["dtype_out"]) == ("copy", "non-float", "I64")
    merged: dict[str, torch.Tensor] = {}
    for f in c.out.glob("*.safetensors"):
        merged |= load_file(f)
    assert torch.equal(merged["model.position_ids"], ids["cp"])
