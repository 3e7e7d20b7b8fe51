"""`chatvec verify` covers every byte of an output: each file against `checksums.json` (written by the commit),
shard headers included, the manifest's own bytes included, and every file added beside them."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.output import digests
from chatvec_dist.output.digests import DIGESTS_NAME
from chatvec_dist.output.manifest import MANIFEST_NAME
from chatvec_dist.output.verify import verify

RUN = ["--backend", "local", "--workers", "1", "--no-progress"]
INDEX = "model.safetensors.index.json"
# What CP has beside its weights, copied into the output: config, tokenizer, remote code (trust_remote_code runs it)
SIDE = {
    "generation_config.json": '{"bos_token_id": 1, "eos_token_id": 2}',
    "tokenizer.json": json.dumps({"model": {"vocab": {f"t{i}": i for i in range(320)}}}),
    "tokenizer_config.json": '{"model_max_length": 64}',
    "modeling_chatvec_test.py": "def forward(x):\n    return x\n",
    "LICENSE": "Apache-2.0\n",
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A merged demo output in three shards, with CP's side files copied: never modified, tests damage copies."""
    root = tmp_path_factory.mktemp("verify_files")
    models = make_demo_models(root / "models")
    for name, text in SIDE.items():
        (models["cp"] / name).write_text(text)
    out = root / "out"
    argv = ["merge", "--base", str(models["base"]), "--chat", str(models["chat"]), "--cp", str(models["cp"])]
    assert main([*argv, "--out", str(out), "--max-shard-size", "100KB", *RUN]) == 0
    assert len(list(out.glob("*.safetensors"))) == 3 and all((out / name).is_file() for name in SIDE)
    return out


@pytest.fixture
def out(pristine, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


def problems_of(out: Path, capsys) -> list[str]:
    """verify()'s problem lines, which the CLI prints before its summary line, exiting 1."""
    problems = verify(out)
    capsys.readouterr()
    code = main(["verify", str(out)])
    captured = capsys.readouterr()
    assert code == (1 if problems else 0) and captured.err == ""
    assert captured.out.splitlines()[:-1] == problems
    return problems


def flip(path: Path, pos: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


def shard_header(path: Path) -> tuple[int, bytes]:
    """The header length field's value and the header's JSON bytes (padding included)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8 : 8 + n]


def test_every_file_of_the_output_is_listed(pristine, capsys):
    files = json.loads((pristine / DIGESTS_NAME).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in pristine.iterdir() if p.name != DIGESTS_NAME)
    for shard in pristine.glob("*.safetensors"):
        n, _ = shard_header(shard)
        assert files[shard.name]["header_bytes"] == 8 + n and files[shard.name]["size"] == shard.stat().st_size
    assert problems_of(pristine, capsys) == []


@pytest.mark.parametrize("name", [*SIDE, "config.json", "README.md"])
def test_a_flipped_bit_in_any_file_is_named(out, capsys, name):
    path = out / name
    flip(path, path.stat().st_size // 2)
    assert problems_of(out, capsys) == [f"{path}: content differs from {DIGESTS_NAME}"]


def test_an_index_with_another_total_size_or_whitespace_is_named(out, capsys):
    """The index-specific check compares weight maps only: its other bytes are covered by the digest."""
    path = out / INDEX
    doc = json.loads(path.read_text())
    size = path.stat().st_size
    doc["metadata"]["total_size"] += 1
    path.write_text(json.dumps(doc, indent=2))
    assert path.stat().st_size == size
    assert problems_of(out, capsys) == [f"{path}: content differs from {DIGESTS_NAME}"]
    doc["metadata"]["total_size"] -= 1
    path.write_text(json.dumps(doc, indent=1))
    smaller = path.stat().st_size
    assert problems_of(out, capsys) == [
        f"{path}: size differs from {DIGESTS_NAME} ({smaller} bytes, {size} when written)"
    ]


def test_a_shard_header_padding_byte_is_named(out, capsys):
    """A space of padding made a tab: the JSON still parses to the same header, and the tensors still verify."""
    padded = [s for s in sorted(out.glob("*.safetensors")) if shard_header(s)[1].endswith(b" ")]
    assert padded, "no shard header has padding"
    path = padded[0]
    n, _ = shard_header(path)
    flip(path, 8 + n - 1, ord(" ") ^ ord("\t"))
    assert problems_of(out, capsys) == [f"{path}: header bytes (JSON and padding) differ from {DIGESTS_NAME}"]


def test_a_shard_is_hashed_once_its_header_read_for_the_digest(out, monkeypatch):
    """Shard data is rehashed per tensor, against the manifest; the file digest reads only the header bytes."""
    read = []
    real = digests._sha256

    def spy(location, name: str, nbytes: int) -> str:
        read.append((name, nbytes))
        return real(location, name, nbytes)

    monkeypatch.setattr(digests, "_sha256", spy)
    assert verify(out) == []
    files = json.loads((out / DIGESTS_NAME).read_text())["files"]
    shards = {name: n for name, n in read if name.endswith(".safetensors")}
    assert shards == {name: e["header_bytes"] for name, e in files.items() if "header_bytes" in e}
    assert all(n < files[name]["size"] for name, n in shards.items())


def test_any_flipped_bit_of_the_manifest_is_a_problem_naming_it(pristine, tmp_path):
    """Before file digests about a third of single-bit flips (Parquet statistics, magic bytes) went unnoticed:
    filtered queries of such a manifest return nothing, and verify said "verified"."""
    data = (pristine / MANIFEST_NAME).read_bytes()
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    path = copy / MANIFEST_NAME
    unnoticed = []
    for pos in [*range(0, 4), *range(3, len(data) - 8, 7), *range(len(data) - 8, len(data))]:
        damaged = bytearray(data)
        damaged[pos] ^= 1 << (pos % 8)
        path.write_bytes(damaged)
        problems = verify(copy)
        if not any(p.startswith(f"{path}: ") for p in problems):
            unnoticed.append((pos, problems))
    assert unnoticed == []


def test_a_manifest_rewritten_with_its_rows_and_metadata_intact_is_named(out, capsys):
    """Parquet written again from the same table: the rows and metadata checksums agree, the bytes do not."""
    import pyarrow.parquet as pq

    path = out / MANIFEST_NAME
    pq.write_table(pq.read_table(path), path, compression="zstd")
    problems = problems_of(out, capsys)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: size differs from {DIGESTS_NAME}")


def test_a_missing_file_is_named(out, capsys):
    (out / "modeling_chatvec_test.py").unlink()
    assert problems_of(out, capsys) == [f"{out / 'modeling_chatvec_test.py'}: missing (listed in {DIGESTS_NAME})"]


def test_every_file_added_is_listed(out, capsys):
    """Remote code a loader would run, a second index, a hidden file, a folder, a link: each one line, by name."""
    (out / "modeling_evil.py").write_text("import os\n")
    (out / "model.safetensors").write_bytes(b"")
    (out / ".hidden").write_text("")
    (out / "sub").mkdir()
    (out / "link.json").symlink_to(out / "config.json")
    added = ["link.json", "model.safetensors", "modeling_evil.py", "sub", ".hidden"]
    assert sorted(problems_of(out, capsys)) == sorted(
        f"{out / name}: not written by chatvec (added after the commit; not in {DIGESTS_NAME})" for name in added
    )


def test_a_file_made_a_link_or_fifo_is_named_and_never_read(out, capsys, tmp_path):
    """Same bytes behind a link are still a changed output; a FIFO would block a read: neither is opened."""
    shutil.copyfile(out / "config.json", tmp_path / "config.json")
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(tmp_path / "config.json")
    (out / "LICENSE").unlink()
    os.mkfifo(out / "LICENSE")
    assert sorted(problems_of(out, capsys)) == [
        f"{out / name}: not a regular file (a link, FIFO or directory): not opened"
        for name in ("LICENSE", "config.json")
    ]


@pytest.mark.parametrize("damage", ["bit", "whitespace", "entry", "not-json", "fifo"])
def test_a_damaged_digests_file_is_one_line(out, capsys, damage):
    """Its own bytes are checked too: any change is one line naming it (nothing else can be checked against it)."""
    path = out / DIGESTS_NAME
    text = path.read_text()
    if damage == "bit":
        flip(path, len(text) // 2)
    elif damage == "whitespace":
        path.write_text(text + " ")
    elif damage == "entry":  # a consistent-looking edit: the self digest no longer matches
        doc = json.loads(text)
        doc["files"]["config.json"]["size"] += 1
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    elif damage == "not-json":
        path.write_text("[]")
    else:
        path.unlink()
        os.mkfifo(path)
    problems = problems_of(out, capsys)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: ")
    assert problems[0].endswith("no file could be checked against it")


def test_a_crafted_digests_file_with_a_valid_self_digest_is_refused_without_traceback(out, capsys):
    """Names that leave the output, or fields of the wrong type, even with a matching self digest."""
    path = out / DIGESTS_NAME
    for files in ({"../secret": {"size": 1, "sha256": "0" * 64}}, {"config.json": {"size": "1", "sha256": "x"}}):
        path.write_bytes(digests.encode_digests(files))
        problems = problems_of(out, capsys)
        assert problems == [
            f"{path}: does not match its own checksum (damaged or edited): no file could be checked against it"
        ]


def test_an_output_without_file_digests_says_only_tensors_were_checked(out, capsys):
    """An output written before chatvec recorded file digests (or whose digests file was deleted): one line."""
    (out / DIGESTS_NAME).unlink()
    (out / "config.json").write_text("{}")  # not checkable without the digests
    assert problems_of(out, capsys) == [
        f"{out / DIGESTS_NAME}: missing (an output written before chatvec recorded file digests, or the file was "
        "deleted): only the tensors and the manifest were checked"
    ]


def test_a_file_named_by_a_specific_check_is_not_named_again(out, capsys):
    """A missing shard: one line (its tensors cannot be checked), not a second one from the digests."""
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.unlink()
    problems = problems_of(out, capsys)
    assert len(problems) == 1 and problems[0].startswith(f"{shard}: unreadable shard")


def test_verify_of_a_folder_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["verify", str(missing)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"chatvec: error: {missing}: no such folder"]
    assert not missing.exists()
