"""Source digests of the bytes the earlier manifests left out: the float32 `*_scale_inv` of block-scaled FP8
vector and CP sources, and the chat rows that chat-template token rows are taken from. Each is its own
`source_digests` entry (roles `chat[0].scale`, `chat[0].row[N]`, ...), hashed by the workers as read, the same for
any unit size; `chatvec verify --sources` names a changed scale or row. Expected digests from the files' bytes,
as docs/manifest.md defines them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from test_fp8 import LOCAL, make_models
from test_source_digests import expected_digest, header, rewrite_manifest

from chatvec_dist import api
from chatvec_dist.output.manifest import read_manifest

TOKENS = {25: 5, 3: 200}  # CP row → chat row; CP row 25 (elements 4000–4160) straddles two 8 KiB units
W = "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"
ITEMSIZE = {"F32": 4, "BF16": 2, "F8_E4M3": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("scalerows"))


def merge(models: dict[str, Path], out: Path, chat: Path | None = None, **options) -> Path:
    chat = chat or models["chat8"]
    api.merge(models["base8"], chat, models["cp8"], out, options=LOCAL, special_tokens=TOKENS, **options)
    return out


def located(folder: Path) -> dict[str, tuple[Path, int, int]]:
    """Each tensor of a checkpoint: (file, absolute offset of its data, bytes)."""
    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        h = header(f)
        for name, info in h.items():
            if name != "@":
                start, end = info["data_offsets"]
                found[name] = (f, h["@"] + start, end - start)
    return found


def new_entries(out: Path) -> dict[tuple[str, str], dict]:
    """The scale and row entries, by (output tensor, role)."""
    return {
        (row["tensor"], e["role"]): e
        for row in read_manifest(out)[0].to_pylist()
        for e in row["source_digests"]
        if "." in e["role"]
    }


def test_scales_and_token_rows_are_digested_as_read_for_any_unit_size(models, tmp_path):
    out = merge(models, tmp_path / "small", unit_bytes=8192)
    table, meta = read_manifest(out)
    block_elems = meta["source_hash"]["block_elems"]
    where = {k: located(models[k]) for k in ("cp8", "chat8", "base8")}
    roles = {"cp": "cp8", "chat[0]": "chat8", "base[0]": "base8"}
    scaled = 0
    for row in table.to_pylist():
        entries = row["source_digests"]
        if row["dtype_out"] == "F8_E4M3":  # a combined FP8 weight: its three sources' scales after them
            assert [e["role"] for e in entries] == [*roles, *(f"{r}.scale" for r in roles)]
            for e in entries[3:]:
                f, offset, nbytes = where[roles[e["role"][:-6]]][row["tensor"] + "_scale_inv"]
                assert (e["file"], e["offset"], e["nbytes"], e["dtype"]) == (str(f), offset, nbytes, "F32")
                assert e["hash"] == expected_digest(f, offset, nbytes, 4, block_elems)
            scaled += 1
        elif row["token_rows"]:  # the chat rows taken, each a whole row of the chat tensor
            assert [e["role"] for e in entries] == [*roles, "chat[0].row[200]", "chat[0].row[5]"]
            f, offset, _ = where["chat8"][row["tensor"]]
            width = row["shape"][1] * 2
            for e, chat_row in zip(entries[3:], (200, 5)):
                assert (e["file"], e["offset"], e["nbytes"]) == (str(f), offset + chat_row * width, width)
                assert e["hash"] == expected_digest(f, e["offset"], width, 2, block_elems)
        else:
            assert all("." not in e["role"] for e in entries)
    assert scaled > 10 and {r["tensor"] for r in table.to_pylist() if r["token_rows"]} == {EMBED, "lm_head.weight"}
    assert block_elems == 1024  # 8 KiB hash blocks over 8 bytes: a row (160 elements) in one block
    whole = merge(models, tmp_path / "whole")  # 64 MiB units: every tensor in one piece
    assert new_entries(whole) == new_entries(out)
    assert api.verify(out, sources=True) == []


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_verify_sources_names_a_changed_scale_and_a_changed_token_row(models, tmp_path):
    chat = tmp_path / "chat"
    shutil.copytree(models["chat8"], chat)
    out = merge(models, tmp_path / "out", chat=chat, unit_bytes=8192, vocab="skip")  # chat's embedding: rows only
    assert api.verify(out, sources=True) == []
    where = located(chat)
    scale_file, scale_at, _ = where[W + "_scale_inv"]
    flip(scale_file, scale_at + 5)
    embed_file, embed_at, _ = where[EMBED]
    flip(embed_file, embed_at + 5 * 320 + 7)  # chat row 5, taken into CP's row 25
    lines = api.verify(out, sources=True)
    differ = sorted(line for line in lines if "differs from its digest" in line)
    manifest = out / "manifest.parquet"
    assert differ == sorted(
        [
            f"{scale_file}: tensor '{W}_scale_inv' (chat[0].scale) differs from its digest in {manifest}",
            f"{embed_file}: tensor '{EMBED}' (chat[0].row[5]) differs from its digest in {manifest}",
        ]
    ), lines
    assert all("changed since the output was written" in line for line in lines if line not in differ)


def test_a_manifest_written_without_scale_and_row_entries_still_verifies(models, tmp_path):
    """As an earlier version wrote it (the same column, those entries absent): read and verified as written."""
    out = merge(models, tmp_path / "out")
    table, meta = read_manifest(out)
    index = table.schema.get_field_index("source_digests")
    cells = [[e for e in c if "." not in e["role"]] for c in table.column(index).to_pylist()]
    assert sum(map(len, cells)) < sum(map(len, table.column(index).to_pylist()))
    column = pa.array(cells, table.schema.field(index).type)
    rewrite_manifest(out, table.set_column(index, "source_digests", column), meta)
    assert read_manifest(out)[0].column("source_digests").to_pylist() == cells
    assert api.verify(out, sources=True) == []
