"""`chatvec verify OUT` against damaged outputs: every kind of damage is found and named (tensor or shard)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_source_digests import write_checksummed

from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.errors import VerifyError
from chatvec_dist.output.manifest import MANIFEST_NAME, META_KEY, meta_digest, read_manifest
from chatvec_dist.output.verify import verify

RUN = ["--backend", "local", "--workers", "1", "--no-progress"]
TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One merged demo output in several shards (100KB each), never modified: tests damage copies."""
    root = tmp_path_factory.mktemp("verify")
    d = make_demo_models(root / "models")
    out = root / "out"
    assert (
        main(
            [
                "merge",
                "--base",
                str(d["base"]),
                "--chat",
                str(d["chat"]),
                "--cp",
                str(d["cp"]),
                "--out",
                str(out),
                "--max-shard-size",
                "100KB",
                *RUN,
            ]
        )
        == 0
    )
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


@pytest.fixture
def out(pristine, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    return copy


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


def rows(out: Path) -> dict[str, dict]:
    return {r["tensor"]: r for r in read_manifest(out)[0].to_pylist()}


def run_verify(out: Path, capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(["verify", str(out)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def assert_found(out: Path, capsys, *must: str) -> list[str]:
    """verify() reports problems naming everything in `must`; the CLI prints them and exits 1."""
    problems = verify(out)
    assert problems, "damage went unnoticed"
    text = "\n".join(problems)
    for word in must:
        assert word in text, (word, problems)
    code, lines, err = run_verify(out, capsys)
    assert code == 1 and err == ""
    assert lines[:-1] == problems and lines[-1] == f"{out}: {len(problems)} problem(s)"
    return problems


def test_untouched_output_verifies(out, capsys):
    assert verify(out) == []
    code, lines, err = run_verify(out, capsys)
    assert code == 0 and lines == [f"{out}: verified"] and err == ""


def test_flipped_byte_names_the_tensor(out, capsys):
    row = rows(out)[TENSOR]
    path = out / row["shard"]
    data = bytearray(path.read_bytes())
    data[row["offset"] + row["nbytes"] // 2] ^= 0x40
    path.write_bytes(bytes(data))
    problems = assert_found(out, capsys, TENSOR, str(path))
    assert problems == [f"{path}: tensor '{TENSOR}' content differs from the manifest"]


def test_truncated_shard_is_named(out, capsys):
    path = shards(out)[1]
    path.write_bytes(path.read_bytes()[:-100])
    problems = assert_found(out, capsys, str(path))
    assert all(str(path) in p for p in problems)
    assert "unreadable shard" in problems[0]


def test_swapped_shards_are_found(out, capsys):
    a, b = shards(out)[:2]
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    problems = assert_found(out, capsys, str(a), str(b))
    manifest = rows(out)
    moved = [t for t, r in manifest.items() if r["shard"] in (a.name, b.name)]
    for tensor in moved:  # every tensor of both shards is reported, in the shard where the manifest puts it
        assert any(f"{out / manifest[tensor]['shard']}: tensor '{tensor}'" in p for p in problems), tensor


def test_missing_shard_is_named(out, capsys):
    path = shards(out)[-1]
    path.unlink()
    problems = assert_found(out, capsys, str(path))
    gone = [t for t, r in rows(out).items() if r["shard"] == path.name]
    assert len(problems) == 1 and "unreadable shard" in problems[0]  # once, not once more per tensor
    assert f"none of its {len(gone)} tensors can be checked" in problems[0]


def test_manifest_edited_after_the_fact(out, capsys):
    path = out / MANIFEST_NAME
    table = pq.read_table(path)
    metadata = table.schema.metadata
    hashes = table.column("hash").to_pylist()
    i = table.column("tensor").to_pylist().index(TENSOR)
    hashes[i] = "0" * 32
    edited = table.set_column(table.schema.get_field_index("hash"), "hash", pa.array(hashes, pa.string()))
    pq.write_table(edited.replace_schema_metadata(metadata), path)
    assert pq.read_table(path).schema.metadata[META_KEY] == metadata[META_KEY]  # the edit kept the metadata
    problems = assert_found(out, capsys, str(path), "checksum", TENSOR)
    assert len(problems) == 2


def test_manifest_that_is_not_parquet(out, capsys):
    """A damaged manifest is a problem found (exit 1), named in one line; a missing one is a usage error (exit 2)."""
    path = out / MANIFEST_NAME
    path.write_text("this is not a parquet file\n")
    assert verify(out) == [f"{path}: manifest is unreadable (ArrowInvalid)"]
    with pytest.raises(VerifyError):
        read_manifest(out)
    code, lines, err = run_verify(out, capsys)
    assert (
        code == 1 and lines == [f"{path}: manifest is unreadable (ArrowInvalid)", f"{out}: 1 problem(s)"] and err == ""
    )


def test_any_flipped_manifest_byte_is_a_problem_or_harmless(pristine, tmp_path):
    """Whatever byte of the manifest is damaged, verify reports problems or (bytes no value depends on, such as
    page statistics) verifies: it never fails with a traceback. Some flips make strings that are not UTF-8."""
    data = (pristine / MANIFEST_NAME).read_bytes()
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    found = set()
    for pos in range(0, len(data), 7):
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        (copy / MANIFEST_NAME).write_bytes(damaged)
        found.update(p.split(": ", 1)[1][:30] for p in verify(copy))
    assert "manifest is unreadable (ArrowI" in found and "manifest rows do not match its" in found


def test_directory_without_manifest(out, capsys):
    (out / MANIFEST_NAME).unlink()
    code, lines, err = run_verify(out, capsys)
    assert code == 2 and lines == []
    assert err.splitlines() == [f"chatvec: error: {out / MANIFEST_NAME}: no manifest here: not a chatvec output"]
    empty = out.parent / "empty"
    empty.mkdir()
    code, lines, err = run_verify(empty, capsys)
    assert code == 2 and lines == [] and len(err.splitlines()) == 1 and str(empty / MANIFEST_NAME) in err


@pytest.mark.parametrize("meta", ["no-hash", "not-an-object"])
def test_manifest_with_malformed_metadata(out, capsys, meta):
    path = out / MANIFEST_NAME
    table = pq.read_table(path)
    doc = json.loads(table.schema.metadata[META_KEY])
    doc.pop("hash")
    blob = json.dumps(doc if meta == "no-hash" else [doc]).encode()
    pq.write_table(table.replace_schema_metadata({META_KEY: blob}), path)
    code, lines, err = run_verify(out, capsys)
    assert code in (1, 2)
    message = err.splitlines() if code == 2 else lines
    assert message and str(path) in message[0]


def rewrite_manifest(out: Path, column: str, change) -> None:
    """Edit one column of the manifest, keeping its metadata (the rows checksum then no longer matches)."""
    path = out / MANIFEST_NAME
    table = pq.read_table(path)
    values = change(table.column(column).to_pylist())
    edited = table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.string()))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), path)


def test_shard_paths_from_the_manifest_are_never_trusted(out, tmp_path, capsys):
    """A crafted manifest pointing out of the output, or at a FIFO inside it, is reported, never opened (a FIFO
    would hang the read)."""
    import os

    secret = tmp_path / "secret.safetensors"
    shutil.copyfile(shards(out)[0], secret)
    os.mkfifo(out / "evil.safetensors")
    names = iter(["../secret.safetensors", "evil.safetensors", "/etc/passwd"])
    rewrite_manifest(out, "shard", lambda shards_: [next(names, s) for s in shards_])
    problems = assert_found(out, capsys, "unsafe shard path", "not a regular file", "checksum")
    assert not any("secret" in p and "content" in p for p in problems)


def test_an_index_that_disagrees_with_the_manifest_is_found(out, capsys):
    index = out / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"].pop(TENSOR)
    index.write_text(json.dumps(doc))
    assert_found(out, capsys, str(index), "weight_map does not place the tensors as the manifest does")
    index.unlink()
    assert_found(out, capsys, str(index))


def test_a_fifo_swapped_in_after_the_check_is_refused_when_opened(out, capsys, monkeypatch):
    """Between verify's lstat and its open a shard may become a FIFO: the open itself refuses it (never blocks)."""
    import os

    from chatvec_dist.output import verify as manifest

    monkeypatch.setattr(manifest, "_unsafe_shard", lambda out_dir, shard: None)  # the check saw a regular file
    path = shards(out)[0]
    path.unlink()
    os.mkfifo(path)
    problems = verify(out)
    assert any(str(path) in p and "not a regular file" in p for p in problems), problems


def test_problems_come_in_the_manifests_row_order_however_many_shards_are_read_at_once(out):
    """Shards are checked in parallel; the lines still follow the manifest's rows, even rows that interleave
    shards (here sorted by tensor name: the rows checksum then differs, one line before the tensors')."""
    path = out / MANIFEST_NAME
    table = pq.read_table(path)
    pq.write_table(table.sort_by("tensor").replace_schema_metadata(table.schema.metadata), path)
    manifest = read_manifest(out)[0].to_pylist()
    damaged = interleaved(manifest)
    for row in damaged:
        shard = out / row["shard"]
        data = bytearray(shard.read_bytes())
        data[row["offset"]] ^= 0x01
        shard.write_bytes(bytes(data))
    expected = [
        f"{out / r['shard']}: tensor '{r['tensor']}' content differs from the manifest"
        for r in manifest
        if r in damaged
    ]
    problems = verify(out, shards_in_flight=4)
    assert problems[1:] == expected and "manifest rows do not match" in problems[0]
    assert verify(out, shards_in_flight=1) == problems


def interleaved(rows: list[dict]) -> list[dict]:
    """Three rows, in row order, of shards A, B, then A again."""
    first = rows[0]
    other = next(i for i, r in enumerate(rows) if r["shard"] != first["shard"])
    again = next(r for r in rows[other + 1 :] if r["shard"] == first["shard"])
    return [first, rows[other], again]


def test_an_output_with_more_shards_than_free_descriptors_verifies(tmp_path):
    """Each shard's file is closed once checked: a limit of open files below the shard count is no problem."""
    import subprocess
    import sys

    d = make_demo_models(tmp_path / "models")
    out = tmp_path / "out"
    argv = ["merge", "--base", str(d["base"]), "--chat", str(d["chat"]), "--cp", str(d["cp"]), "--out", str(out)]
    assert main([*argv, "--max-shard-size", "8KB", *RUN]) == 0
    shards_made = len(shards(out))
    code = (
        "import os, resource, sys; from chatvec_dist.output.verify import verify; "
        "spare = int(sys.argv[2]); used = len(os.listdir('/proc/self/fd')); "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (used + spare, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
        "print(verify(sys.argv[1]))"
    )
    spare = 8
    assert shards_made > 2 * spare
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(spare)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "[]\n", "")


def rechecksummed(out: Path, table: pa.Table, meta: dict) -> None:
    """Write `table` as the manifest with `meta` (its own checksum made anew) and checksums.json to match."""
    meta["meta_sha256"] = meta_digest(meta)
    write_checksummed(out, table, meta)


def edited_cell(table: pa.Table, column: str, change) -> pa.Table:
    """`table` with `change` applied to the first row's cell of `column` (the metadata kept)."""
    values = table.column(column).to_pylist()
    values[0] = change(values[0])
    at = table.schema.get_field_index(column)
    return table.set_column(at, table.schema.field(at), pa.array(values, table.schema.field(at).type))


def test_a_manifest_written_before_rows_hash_verifies_by_its_rows_sha256(out, capsys):
    """An earlier version's manifest: `rows_sha256`, the sha256 of the rows as JSON (computed here as it did), and
    no `rows_hash`: verify and inspect check it as before, and an edited cell is still found."""
    from chatvec_dist.output.inspection import report

    table = pq.read_table(out / MANIFEST_NAME)
    meta = json.loads(table.schema.metadata[META_KEY])
    assert set(meta["rows_hash"]) == {"algorithm", "sha256"} and "rows_sha256" not in meta
    del meta["rows_hash"]
    rows = table.replace_schema_metadata(None).to_pylist()
    meta["rows_sha256"] = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    rechecksummed(out, table, meta)
    assert verify(out) == []
    assert report(out).startswith(f"{out}: merge by chatvec_dist ")
    rechecksummed(out, edited_cell(table, "nbytes", lambda n: n + 1), meta)
    assert verify(out)[0] == f"{out / MANIFEST_NAME}: manifest rows do not match its checksum (edited after the fact?)"


@pytest.mark.parametrize(
    "column, change",
    [
        ("source_digests", lambda cell: [dict(cell[0], hash="0" * 32), *cell[1:]]),  # a nested field
        ("cp_norm", lambda value: None if value is not None else 0.0),  # null for a value, or back
        ("shape", lambda shape: shape[:-1] + [shape[-1], 1]),  # a list one longer, the same numbers
        ("reason", lambda reason: reason + " "),
    ],
)
def test_any_cell_edited_in_a_manifest_is_found_by_its_rows_hash(out, column, change):
    """The metadata (its own checksum and checksums.json made anew) kept as written: only `rows_hash` can tell."""
    table = pq.read_table(out / MANIFEST_NAME)
    meta = json.loads(table.schema.metadata[META_KEY])
    rechecksummed(out, table, dict(meta))
    assert verify(out) == []
    rechecksummed(out, edited_cell(table, column, change), dict(meta))
    assert verify(out)[0] == f"{out / MANIFEST_NAME}: manifest rows do not match its checksum (edited after the fact?)"


@pytest.mark.parametrize("rows_hash", [{"algorithm": "sha3 of something else", "sha256": "00"}, "00", None])
def test_a_rows_checksum_of_an_unknown_form_is_a_damaged_manifest(out, rows_hash):
    table = pq.read_table(out / MANIFEST_NAME)
    meta = json.loads(table.schema.metadata[META_KEY])
    meta["rows_hash"] = rows_hash
    rechecksummed(out, table, meta)
    assert verify(out)[0] == f"{out / MANIFEST_NAME}: manifest metadata is malformed"
