"""Source digests: the manifest records a digest of every source tensor's bytes as the workers read them, the
same for any worker count, unit size, output dtype, resume and backend; `chatvec verify --sources` rehashes the
sources and names a tensor whose bytes changed, and a file that changed or is gone. The expected digests are
computed here from the files' bytes, following docs/manifest.md."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xxhash

from chatvec_dist.cli import main
from chatvec_dist.demo import llama_config, llama_tensors, save_checkpoint
from chatvec_dist.output.digests import DIGESTS_NAME, encode_digests
from chatvec_dist.output.journal import Journal
from chatvec_dist.output.manifest import (
    MANIFEST_NAME,
    META_KEY,
    meta_digest,
    read_manifest,
    rows_digest,
    rows_hash,
)
from chatvec_dist.output.verify import verify
from chatvec_dist.output.workarea import JOURNAL_NAME

# vectors over the rows chat and base have (merge_rows), and one tensor copied from CP
RUN = ["--backend", "local", "--no-progress", "--vocab", "overlap", "--exclude", "^model.norm.weight$"]
ITEMSIZE = {"F32": 4, "BF16": 2}
VOCAB, EXTRA = 12300, 64  # embeddings of 1.5 MiB and more: split across units of 1 MiB and more, unaligned
TENSOR = "model.layers.0.mlp.up_proj.weight"


def make_models(root: Path) -> dict[str, Path]:
    """base and chat in float32 (one file each), CP in bfloat16 with 64 more tokens (two shards)."""
    g = torch.Generator().manual_seed(7)
    config = llama_config(VOCAB, "float32")
    base = llama_tensors(config, g)
    chat = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    cp = {n: (t + 0.01 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        cp[n] = torch.cat([cp[n], torch.randn(EXTRA, cp[n].shape[1], generator=g).to(torch.bfloat16)])
    return {
        "base": save_checkpoint(root / "base", base, config),
        "chat": save_checkpoint(root / "chat", chat, config),
        "cp": save_checkpoint(root / "cp", cp, llama_config(VOCAB + EXTRA, "bfloat16"), shards=2),
    }


def merge(models: dict[str, Path], out: Path, *extra: str) -> int:
    sources = ["--base", str(models["base"]), "--chat", str(models["chat"]), "--cp", str(models["cp"])]
    return main(["merge", *sources, "--out", str(out), *RUN, *extra])


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"} | {"@": 8 + n}


def expected_digest(path: Path, offset: int, nbytes: int, itemsize: int, block_elems: int) -> str:
    """docs/manifest.md: xxh3-128 of the concatenated xxh3-128 digests of each block of `block_elems` elements of
    the bytes read (the last block shorter)."""
    data = path.read_bytes()[offset : offset + nbytes]
    block = block_elems * itemsize
    digests = b"".join(xxhash.xxh3_128_digest(data[i : i + block]) for i in range(0, max(len(data), 1), block))
    return xxhash.xxh3_128_hexdigest(digests)


def digests(out: Path) -> list:
    return read_manifest(out)[0].column("source_digests").to_pylist()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("srcdigest")
    models = make_models(root / "models")
    assert merge(models, root / "out", "--workers", "1", "--unit-size", "1MiB") == 0
    return models | {"out": root / "out", "root": root}


def test_each_source_tensor_digest_is_its_bytes_hash(made):
    table, meta = read_manifest(made["out"])
    block_elems = meta["source_hash"]["block_elems"]
    assert block_elems == 131072  # 1 MiB hash blocks over 8 bytes
    files = {f: header(f) for d in ("base", "chat", "cp") for f in made[d].glob("*.safetensors")}
    roles = {"cp": made["cp"], "chat[0]": made["chat"], "base[0]": made["base"]}
    checked = 0
    for row in table.to_pylist():
        entries = row["source_digests"]
        assert [e["role"] for e in entries] == (["cp", "chat[0]", "base[0]"] if row["rule"] != "copy" else ["cp"])
        assert [e["dtype"] for e in entries] == [row["dtype_cp"], *row["dtypes_vector"]]
        for e in entries:
            path = Path(e["file"])
            assert path.parent == roles[e["role"]]
            info = files[path][row["tensor"]]
            start, end = info["data_offsets"]
            assert e["offset"] == files[path]["@"] + start
            elems = row["shape"][1] * VOCAB if row["rule"] == "merge_rows" and e["role"] != "cp" else None
            assert e["nbytes"] == (end - start if elems is None else elems * ITEMSIZE[e["dtype"]])
            assert e["hash"] == expected_digest(path, e["offset"], e["nbytes"], ITEMSIZE[e["dtype"]], block_elems)
            checked += 1
    rules = table.column("rule").to_pylist()
    assert checked == sum(1 if r == "copy" else 3 for r in rules) and {"copy", "merge", "merge_rows"} <= set(rules)
    assert (
        meta["inputs"][str(made["base"] / "model.safetensors")][0]
        == (made["base"] / "model.safetensors").stat().st_size
    )
    assert verify(made["out"], sources=True) == []


def test_same_digests_for_any_worker_count_unit_size_output_dtype_and_batch(made, tmp_path):
    expected = digests(made["out"])
    runs = {
        "w2": ["--workers", "2", "--unit-size", "2MiB"],
        "whole": ["--workers", "1"],  # 64 MiB units: each tensor in one piece
        "f32": ["--workers", "2", "--unit-size", "1MiB", "--dtype", "float32"],  # output wider than CP's bytes
    }
    for name, extra in runs.items():
        assert merge(made, tmp_path / name, *extra) == 0
        assert digests(tmp_path / name) == expected, name
    assert read_manifest(tmp_path / "f32")[0].column("hash") != read_manifest(made["out"])[0].column("hash")
    assert merge(made, tmp_path / "sweep", "--alpha", "0.5,1", "--unit-size", "1MiB") == 0  # a batch: read once
    assert digests(tmp_path / "sweep" / "alpha0.5") == digests(tmp_path / "sweep" / "alpha1") == expected


def test_a_resumed_run_keeps_its_journaled_source_digests(made, tmp_path, monkeypatch):
    from chatvec_dist.exec import worker

    real_run, calls = worker.UnitRunner.run, []

    def failing(self, unit):
        calls.append(unit.id)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_run(self, unit)

    out = tmp_path / "resumed"
    monkeypatch.setattr(worker.UnitRunner, "run", failing)
    assert merge(made, out, "--workers", "1", "--unit-size", "1MiB") == 130
    journal = Journal.load(Path(f"{out}.partial") / JOURNAL_NAME, 0)
    assert len(journal) == 2 and all(s.sources for unit in journal.values() for s in unit.segments)
    monkeypatch.setattr(worker.UnitRunner, "run", lambda self, unit: calls.append(unit.id) or real_run(self, unit))
    assert merge(made, out, "--workers", "1", "--unit-size", "1MiB") == 0
    assert not set(calls[3:]) & set(calls[:2])  # the journaled units were not redone
    assert digests(out) == digests(made["out"])


def test_ray_records_the_same_source_digests(made, ray_local, tmp_path):
    out = tmp_path / "ray"
    sources = ["--base", str(made["base"]), "--chat", str(made["chat"]), "--cp", str(made["cp"])]
    argv = ["merge", *sources, "--out", str(out), "--workers", "2", "--unit-size", "1MiB", *RUN[2:]]
    assert main(argv) == 0
    assert digests(out) == digests(made["out"])


def flip(path: Path, at: int) -> None:
    """One byte of `path` changed in place (the file stays valid)."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


def test_verify_sources_names_a_changed_tensor_and_a_file_gone(made, tmp_path, capsys):
    models = {n: tmp_path / n for n in ("base", "chat", "cp")}
    for n, path in models.items():
        shutil.copytree(made[n], path)
    out = tmp_path / "out"
    assert merge(models, out, "--workers", "1") == 0
    assert main(["verify", "--sources", str(out)]) == 0
    base = models["base"] / "model.safetensors"
    entry = next(e for e in header(base).items() if e[0] == TENSOR)[1]
    flip(base, header(base)["@"] + entry["data_offsets"][0] + 100)
    assert verify(out) == []  # the output itself is intact
    problems = verify(out, sources=True)
    read = len(header(base)) - 2  # all its tensors but the excluded norm ("@": the header's length)
    assert problems == [
        f"{base}: changed since the output was written (mtime); 1 of its {read} source tensor(s) differ",
        f"{base}: tensor '{TENSOR}' (base[0]) differs from its digest in {out / MANIFEST_NAME}",
    ]
    capsys.readouterr()
    assert main(["verify", "--sources", str(out)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"{out}: 2 problem(s)"
    (models["chat"] / "model.safetensors").unlink()
    gone = verify(out, sources=True)
    assert len(gone) == 3 and gone[0].startswith(f"{models['chat'] / 'model.safetensors'}: gone or unreadable (")


def rewrite_manifest(out: Path, table: pa.Table, meta: dict) -> None:
    """Write `table` as the output's manifest with its checksums (rows as the manifest has them: `rows_hash`, or an
    earlier version's `rows_sha256`; metadata; checksums.json) made anew."""
    rows = table.replace_schema_metadata(None)
    if "rows_hash" in meta:
        meta["rows_hash"] = rows_hash(rows)
    else:
        meta["rows_sha256"] = rows_digest(rows)
    if "meta_sha256" in meta:
        meta["meta_sha256"] = meta_digest(meta)
    write_checksummed(out, table, meta)


def write_checksummed(out: Path, table: pa.Table, meta: dict) -> None:
    """Write `table` as the output's manifest with `meta` as given, and checksums.json to match."""
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), out / MANIFEST_NAME)
    files = json.loads((out / DIGESTS_NAME).read_text())["files"]
    data = (out / MANIFEST_NAME).read_bytes()
    files[MANIFEST_NAME] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (out / DIGESTS_NAME).write_bytes(encode_digests(files))


@pytest.mark.parametrize("since", ["source_digests", "alphas"])
def test_an_older_manifest_says_its_sources_cannot_be_checked(made, tmp_path, since):
    """A manifest written before the column (or before every appended one): verify and inspect work; --sources
    says, in one line, it cannot check them."""
    from chatvec_dist.output.inspection import report

    out = tmp_path / "old"
    shutil.copytree(made["out"], out)
    table = pq.read_table(out / MANIFEST_NAME)
    meta = json.loads(table.schema.metadata[META_KEY])
    del meta["source_hash"], meta["inputs"], meta["meta_sha256"], meta["rows_hash"]  # none of them then
    names = table.column_names
    rewrite_manifest(out, table.drop_columns(names[names.index(since) :]), meta)  # columns are only appended
    assert verify(out) == []
    assert report(out).startswith(f"{out}: merge by chatvec_dist ")
    assert verify(out, sources=True) == [
        f"{out / MANIFEST_NAME}: written before chatvec recorded source digests: its sources cannot be checked"
    ]


def test_a_manifest_naming_a_fifo_or_a_null_source_is_answered_not_waited_on(made, tmp_path):
    out = tmp_path / "odd"
    shutil.copytree(made["out"], out)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    table = pq.read_table(out / MANIFEST_NAME)
    meta = json.loads(table.schema.metadata[META_KEY])
    cells = table.column("source_digests").to_pylist()
    cells[0] = [dict(cells[0][0], file=str(fifo))]
    cells[1] = [None, *cells[1][1:]]
    column = pa.array(cells, table.schema.field("source_digests").type)
    index = table.schema.get_field_index("source_digests")
    rewrite_manifest(out, table.set_column(index, "source_digests", column), meta)
    assert verify(out) == []
    second = table.column("tensor").to_pylist()[1]
    assert verify(out, sources=True) == [
        f"{fifo}: gone or unreadable (not a regular file (a FIFO, device or directory): not read): its 1 source "
        "tensor(s) not checked",
        f"{out / MANIFEST_NAME}: tensor '{second}' has a malformed source digest: not checked",
    ]


def test_s3_sources_are_recorded_and_checked(made, s3_server, tmp_path):
    """Sources in an object store: the same digests as from local files; an object replaced with one byte changed
    is named with the tensor (and its new ETag)."""
    import boto3
    from s3server import upload_folder

    urls = {n: upload_folder(s3_server, made[n], "srcdigest", n) for n in ("base", "chat", "cp")}
    out = tmp_path / "out"
    assert main(["merge", *sum((["--" + n, u] for n, u in urls.items()), []), "--out", str(out), *RUN]) == 0
    assert [[e["hash"] for e in row] for row in digests(out)] == [
        [e["hash"] for e in row] for row in digests(made["out"])
    ]
    assert all(e["file"].startswith("s3://srcdigest/") for row in digests(out) for e in row)
    assert verify(out, sources=True) == []
    data = bytearray((made["base"] / "model.safetensors").read_bytes())
    head = header(made["base"] / "model.safetensors")
    data[head["@"] + head[TENSOR]["data_offsets"][0] + 8] ^= 0x01
    boto3.client("s3").put_object(Bucket="srcdigest", Key="base/model.safetensors", Body=bytes(data))
    url = f"{urls['base']}/model.safetensors"
    problems = verify(out, sources=True)
    assert len(problems) == 2 and problems[0].startswith(f"{url}: changed since the output was written (etag)")
    assert problems[1] == f"{url}: tensor '{TENSOR}' (base[0]) differs from its digest in {out / MANIFEST_NAME}"
