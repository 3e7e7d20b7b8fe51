"""`chatvec verify`, `inspect` and recipes on outputs in S3 (a real SeaweedFS on 127.0.0.1): an output's folder
uploaded under a prefix is checked where it is, each damage one line naming the object's URL, as locally; recipes
keep s3:// paths as they are."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from s3server import upload_folder

from chatvec_dist import api
from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.io import s3
from chatvec_dist.output.digests import DIGESTS_NAME
from chatvec_dist.output.location import S3Output
from chatvec_dist.output.manifest import MANIFEST_NAME, read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.recipe.file import load_recipe, with_absolute_paths
from chatvec_dist.recipe.spec import Recipe, Target, Vector

RUN = ["--backend", "local", "--workers", "1", "--no-progress"]
TENSOR = "model.layers.1.mlp.up_proj.weight"
BUCKET = "outputs"


@pytest.fixture(scope="module")
def made(tmp_path_factory, s3_server) -> dict[str, Path | str]:
    """Demo models uploaded to S3 (`s3:base`, ...), merged from there into a local output of several shards
    (`out`), which is uploaded too (`url`): never modified, tests damage copies."""
    root = tmp_path_factory.mktemp("s3verify")
    models = make_demo_models(root / "models")
    found: dict[str, Path | str] = {f"s3:{n}": upload_folder(s3_server, p, "inputs", n) for n, p in models.items()}
    out = root / "out"
    sources = ["--base", found["s3:base"], "--chat", found["s3:chat"], "--cp", found["s3:cp"]]
    assert main(["merge", *sources, "--out", str(out), "--max-shard-size", "100KB", *RUN]) == 0  # type: ignore[list-item]
    assert len(list(out.glob("*.safetensors"))) >= 3
    found |= {"out": out, "url": upload_folder(s3_server, out, BUCKET, "pristine")}
    return found


def cli(capsys, server, *argv: str) -> tuple[int, list[str], list[str]]:
    """Exit status, stdout and stderr lines of one command; no secret anywhere in them."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert server.secret_key not in captured.out + captured.err
    return code, captured.out.splitlines(), captured.err.splitlines()


def uploaded_copy(made, s3_server, tmp_path: Path, prefix: str, change: Callable[[Path], None]) -> tuple[Path, str]:
    """A copy of the output, changed by `change`, then uploaded under a fresh prefix: (the copy, its URL)."""
    copy = tmp_path / prefix
    shutil.copytree(made["out"], copy)
    change(copy)
    return copy, upload_folder(s3_server, copy, BUCKET, prefix)


def flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def flip_tensor(out: Path) -> None:
    row = next(r for r in read_manifest(out)[0].to_pylist() if r["tensor"] == TENSOR)
    flip(out / row["shard"], row["offset"] + row["nbytes"] // 2)


def flip_writer_name(out: Path) -> None:
    """A byte of the manifest no value depends on (the writer's name in its footer): the table reads the same."""
    path = out / MANIFEST_NAME
    flip(path, path.read_bytes().rindex(b"parquet-cpp-arrow"))


def test_an_uploaded_output_verifies_from_the_bucket_reading_each_byte_once(made, s3_server, capsys):
    url = str(made["url"])
    before = s3.traffic.bytes
    assert verify(url) == []
    fetched = s3.traffic.bytes - before
    out = Path(made["out"])
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    headers = sum(e.get("header_bytes", 0) for e in json.loads((out / DIGESTS_NAME).read_text())["files"].values())
    # every byte once; twice only the shard headers, the manifest and the index (parsed, then hashed as files)
    assert fetched == sum(sizes.values()) + headers + sizes[MANIFEST_NAME] + sizes["model.safetensors.index.json"]
    assert cli(capsys, s3_server, "verify", url) == (0, [f"{url}: verified"], []) and api.verify(url) == []
    assert cli(capsys, s3_server, "verify", url + "/") == (0, [f"{url}/: verified"], [])


@pytest.mark.parametrize(
    "damage, change, line",
    [
        ("tensor", flip_tensor, "{shard}: tensor '" + TENSOR + "' content differs from the manifest"),
        ("config", lambda out: flip(out / "config.json", 20), "config.json: content differs from checksums.json"),
        (
            "checksums",
            lambda out: flip(out / DIGESTS_NAME, 100),
            "checksums.json: does not match its own checksum (damaged or edited): no file could be checked against it",
        ),
        ("manifest", flip_writer_name, "manifest.parquet: content differs from checksums.json"),
        ("deleted", lambda out: (out / "config.json").unlink(), "config.json: missing (listed in checksums.json)"),
        (
            "added",
            lambda out: (out / "modeling_evil.py").write_text("import os\n"),
            "modeling_evil.py: not written by chatvec (added after the commit; not in checksums.json)",
        ),
    ],
)
def test_each_damage_is_one_line_naming_the_object_as_locally(made, s3_server, tmp_path, capsys, damage, change, line):
    copy, url = uploaded_copy(made, s3_server, tmp_path, damage, change)
    shard = next(r["shard"] for r in read_manifest(made["out"])[0].to_pylist() if r["tensor"] == TENSOR)
    expected = f"{url}/{line.format(shard=shard)}"
    assert cli(capsys, s3_server, "verify", url) == (1, [expected, f"{url}: 1 problem(s)"], [])
    assert verify(copy) == [expected.replace(url, str(copy))]  # the same line as for the local folder


def test_an_object_in_a_deeper_folder_is_named(made, s3_server, tmp_path, capsys):
    """Locally a folder added beside the files is named; under a prefix, objects further down are too."""
    _, url = uploaded_copy(made, s3_server, tmp_path, "deeper", lambda out: None)
    bucket, key = s3.parse(url)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{key}/sub/modeling_evil.py", Body=b"import os\n")
    added = f"{url}/sub/: not written by chatvec (added after the commit; not in checksums.json)"
    assert cli(capsys, s3_server, "verify", url) == (1, [added, f"{url}: 1 problem(s)"], [])


def test_an_object_replaced_while_verifying_is_named_never_mixed(made, s3_server, tmp_path):
    """Reads are pinned to the ETags listed first: a shard replaced after the listing is an error for that shard."""
    copy, url = uploaded_copy(made, s3_server, tmp_path, "replaced", lambda out: None)
    location = S3Output(url)
    assert location.names()  # listed now
    flip_tensor(copy)
    upload_folder(s3_server, copy, BUCKET, "replaced")
    problems = verify(location)
    assert len(problems) == 1 and "the object changed while being read (its ETag differs)" in problems[0], problems


def test_a_prefix_without_a_manifest_is_a_usage_error(made, s3_server, tmp_path, capsys):
    _, url = uploaded_copy(made, s3_server, tmp_path, "nomanifest", lambda out: (out / MANIFEST_NAME).unlink())
    code, out, err = cli(capsys, s3_server, "verify", url)
    assert (code, out, err) == (
        2,
        [],
        [f"chatvec: error: {url}/{MANIFEST_NAME}: no manifest here: not a chatvec output"],
    )
    empty = f"s3://{BUCKET}/nothing-here"
    assert cli(capsys, s3_server, "verify", empty) == (
        2,
        [],
        [f"chatvec: error: {empty}: no objects under this prefix (no such output)"],
    )
    for bad, what in (("s3://no-such-bucket/out", "no such bucket"), ("s3://x", "malformed S3 URL")):
        code, out, err = cli(capsys, s3_server, "verify", bad)
        assert code == 2 and out == [] and len(err) == 1 and bad in err[0] and what in err[0], err


def test_inspect_reads_the_manifest_from_the_bucket(made, s3_server, tmp_path, capsys):
    url, out = str(made["url"]), str(made["out"])
    code, lines, err = cli(capsys, s3_server, "inspect", url)
    assert code == 0 and err == [] and lines[0].startswith(f"{url}: merge by chatvec_dist")
    assert cli(capsys, s3_server, "inspect", out)[1] == [line.replace(url, out) for line in lines]
    png = tmp_path / "layers.png"
    assert cli(capsys, s3_server, "inspect", url, "--plot", str(png))[0] == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_inspect_recipe_prints_s3_sources_back_as_urls(made, s3_server, tmp_path, capsys):
    code, lines, err = cli(capsys, s3_server, "inspect", str(made["url"]), "--recipe")
    assert code == 0 and err == []
    (tmp_path / "r.yaml").write_text("\n".join(lines) + "\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert (recipe.vectors[0].chat, recipe.vectors[0].base) == (made["s3:chat"], made["s3:base"])
    assert recipe.targets[0].cp == made["s3:cp"] and recipe.targets[0].out == str(made["out"])
    assert cli(capsys, s3_server, "inspect", str(made["out"]), "--recipe")[1] == lines


def test_print_recipe_then_run_keeps_s3_sources(made, s3_server, tmp_path, capsys, monkeypatch):
    """Printed, then run from another folder: the s3:// sources are read from S3 (never made paths), the same
    bytes as the merge from them, and the output's recorded recipe names them again."""
    monkeypatch.chdir(tmp_path)
    sources = ["--base", made["s3:base"], "--chat", made["s3:chat"], "--cp", made["s3:cp"]]
    argv = ["merge", *sources, "--out", "again", "--max-shard-size", "100KB", "--print-recipe"]
    code, lines, _ = cli(capsys, s3_server, *argv)  # type: ignore[arg-type]
    assert code == 0
    (tmp_path / "r.yaml").write_text("\n".join(lines) + "\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "s3:" / "inputs" / "cp").mkdir(parents=True)  # what s3://inputs/cp would be as a relative path
    monkeypatch.chdir(elsewhere)
    assert cli(capsys, s3_server, "run", str(tmp_path / "r.yaml"), *RUN)[0] == 0
    again = elsewhere / "again"
    assert verify(again) == []
    for shard in Path(made["out"]).glob("*.safetensors"):
        assert (again / shard.name).read_bytes() == shard.read_bytes()
    code, lines, _ = cli(capsys, s3_server, "inspect", str(again), "--recipe")
    recorded = "\n".join(lines)
    assert code == 0 and all(f": {made[n]}" in recorded for n in ("s3:base", "s3:chat", "s3:cp"))


def test_absolute_paths_leave_s3_urls_as_they_are(tmp_path):
    """Never made relative to the folder, never read as a local folder, an output URL included."""
    (tmp_path / "s3:" / "b" / "cp").mkdir(parents=True)
    recipe = Recipe(
        (Vector("s3://b/chat", "s3://b/base"),),
        (Target("t", "s3://b/cp", "s3://b/out", (1.0,)), Target("u", "s3://b/cp", "rel", (1.0,))),
    )
    resolved = with_absolute_paths(recipe, str(tmp_path))
    assert resolved.vectors == recipe.vectors
    assert [(t.cp, t.out) for t in resolved.targets] == [
        ("s3://b/cp", "s3://b/out"),
        ("s3://b/cp", str(tmp_path / "rel")),
    ]
