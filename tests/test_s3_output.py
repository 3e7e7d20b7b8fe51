"""s3:// outputs against a real S3 server (SeaweedFS on 127.0.0.1): the bytes of the same merge to a local folder,
from local or s3:// inputs, on both backends; resumed after a killed driver with no upload left open; the index
the last object written; a layout the store cannot take refused at plan time."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_llama, rewrite_journal, slow_units_env
from s3server import ForgetfulProxy, make_bucket, upload_folder

from chatvec_dist.cli import main
from chatvec_dist.errors import RunError
from chatvec_dist.io import s3, s3_sink
from chatvec_dist.output.journal import Journal
from chatvec_dist.output.workarea import JOURNAL_NAME, STAGING_ENV, partial_path, staging_path

# Units of 8 MiB (parts of 5 MiB and more) over shards of 12 MB: several shards, several parts in most of them.
RUN = ["--no-progress", "--workers", "2", "--unit-size", "8MiB", "--max-shard-size", "12MB"]
BUCKET = "outs"
_names = itertools.count()


@pytest.fixture(scope="session")
def big(tmp_path_factory, s3_server) -> dict[str, str]:
    """base, chat and cp of ~26 MB each (bf16; hidden 512, 4 layers, 4096 tokens), as local folders and on S3
    (`s3:NAME`); the output bucket."""
    root = tmp_path_factory.mktemp("s3out-models")
    shape = {"vocab": 4096, "hidden": 512, "layers": 4}
    base = make_llama(root / "base", 0, **shape)
    make_llama(root / "chat", 1, base=base, **shape)
    make_llama(root / "cp", 2, base=base, **shape)
    found = {}
    for name in ("base", "chat", "cp"):
        found[name] = str(root / name)
        found[f"s3:{name}"] = upload_folder(s3_server, root / name, "s3out-models", name)
    make_bucket(s3_server, BUCKET)  # test_fp8_s3 shares the bucket
    return found


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch) -> Path:
    """Each test's staging folder (work areas of s3:// outputs), not the user's ~/.cache."""
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    return tmp_path / "staging"


def merge_args(m: dict, prefix: str = "") -> list[str]:
    return ["merge", "--base", m[prefix + "base"], "--chat", m[prefix + "chat"], "--cp", m[prefix + "cp"]]


def fresh_url(name: str = "out") -> str:
    return f"s3://{BUCKET}/run{next(_names)}-{os.getpid()}/{name}"


def weights(files: dict[str, bytes]) -> dict[str, bytes]:
    """The shards and the index (the manifest and card name the sources and places: they differ)."""
    return {n: b for n, b in files.items() if n.startswith("model")}


def local_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def downloaded(url: str) -> dict[str, bytes]:
    """Every object directly under the prefix, by name."""
    bucket, key = s3.parse(url)
    c = s3.client(True)
    return {n: c.get_object(Bucket=bucket, Key=f"{key}/{n}")["Body"].read() for n in sorted(s3.list_names(url))}


def open_uploads() -> list[tuple[str, str]]:
    """Every multipart upload still open in the output bucket."""
    r = s3.client(True).list_multipart_uploads(Bucket=BUCKET)
    return [(u["Key"], u["UploadId"]) for u in r.get("Uploads", ())]


def loads(files: dict[str, bytes], where: Path) -> None:
    """A downloaded copy opens with safetensors, every tensor the index names in the shard it names."""
    from safetensors import safe_open

    where.mkdir()
    for name, data in files.items():
        (where / name).write_bytes(data)
    index = json.loads(files["model.safetensors.index.json"])
    for shard in set(index["weight_map"].values()):
        with safe_open(str(where / shard), "pt") as f:
            assert {n for n, s in index["weight_map"].items() if s == shard} == set(f.keys())
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                f.get_tensor(name)


@pytest.fixture(scope="session")
def reference(big, tmp_path_factory) -> dict[str, bytes]:
    """The same merge to a local folder: the bytes every s3:// output must have."""
    out = tmp_path_factory.mktemp("s3out-ref") / "out"
    assert main([*merge_args(big), "--out", str(out), "--backend", "local", *RUN]) == 0
    files = weights(local_files(out))
    assert sum(n.endswith(".safetensors") for n in files) >= 3
    return files


@pytest.mark.parametrize(("source", "backend"), [("local", "local"), ("s3", "local"), ("local", "ray"), ("s3", "ray")])
def test_a_merge_to_s3_writes_the_bytes_of_the_same_merge_to_a_local_folder(
    source, backend, big, reference, tmp_path, request
):
    if backend == "ray":
        request.getfixturevalue("ray_s3")
    url = fresh_url()
    prefix = "s3:" if source == "s3" else ""
    assert main([*merge_args(big, prefix), "--out", url, "--backend", backend, *RUN]) == 0
    files = downloaded(url)
    assert weights(files) == reference
    assert {"manifest.parquet", "README.md", "checksums.json", "config.json"} <= set(files)
    assert not set(files) & {JOURNAL_NAME, "plan.json", "uploads.json"}
    assert open_uploads() == []
    loads(files, tmp_path / "copy")


def test_a_batch_writes_every_output_to_s3(big, tmp_path):
    ref = tmp_path / "ref"
    batch = ["--cp", f"a={big['cp']}", "--cp", f"b={big['cp']}", "--alpha", "0.5"]
    argv = ["merge", "--base", big["base"], "--chat", big["chat"], *batch, "--backend", "local", *RUN]
    assert main([*argv, "--out", str(ref)]) == 0
    root = fresh_url("batch")
    assert main([*argv, "--out", root]) == 0
    for name in ("a", "b"):
        assert weights(downloaded(f"{root}/{name}")) == weights(local_files(ref / name))
    assert open_uploads() == []


def test_an_existing_output_is_refused_before_any_upload_and_overwrite_replaces_only_chatvec_outputs(
    big, reference, tmp_path, capsys
):
    url = fresh_url()
    more_shards = [*RUN, "--max-shard-size", "6MB"]  # a later --max-shard-size wins: more shards than RUN's
    assert main([*merge_args(big), "--out", url, "--backend", "local", *more_shards]) == 0
    old = set(downloaded(url))
    capsys.readouterr()
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN, "--alpha", "0.5"]) == 2
    err = capsys.readouterr().err
    assert url in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert open_uploads() == []
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN, "--overwrite"]) == 0
    files = downloaded(url)
    assert weights(files) == reference and old - set(files)  # the old output's extra shards are gone
    foreign = fresh_url()
    s3_sink.put(f"{foreign}/notes.txt", b"not a model")
    assert main([*merge_args(big), "--out", foreign, "--backend", "local", *RUN, "--overwrite"]) == 2
    assert "not a chatvec output" in capsys.readouterr().err
    assert set(downloaded(foreign)) == {"notes.txt"} and open_uploads() == []


def failed_before_the_index(big: dict, url: str, monkeypatch) -> None:
    """A merge whose commit fails putting the index: every shard's upload is completed, every other file put."""
    put = s3_sink.put

    def failing_put(target: str, data: bytes) -> None:
        if target.endswith("model.safetensors.index.json"):
            raise RunError("injected failure", file=target)
        put(target, data)

    monkeypatch.setattr(s3_sink, "put", failing_put)
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN]) == 3
    files = downloaded(url)
    assert "model.safetensors.index.json" not in files and "manifest.parquet" in files  # all but the index
    monkeypatch.setattr(s3_sink, "put", put)


def test_the_index_is_the_last_object_written_and_a_failed_commit_resumes_with_its_completed_shards(
    big, reference, monkeypatch, capsys
):
    url = fresh_url()
    failed_before_the_index(big, url, monkeypatch)
    shards = sorted(n for n in reference if n.endswith(".safetensors"))
    capsys.readouterr()
    before = s3.traffic.bytes
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN]) == 0  # its own objects: no refusal
    err = capsys.readouterr().err
    units = int(err.split("resuming: ")[1].split(" of ")[1].split()[0])
    assert f"resuming: {units} of {units} units" in err  # the uploads are gone, the objects they made kept
    assert err.count("completed by the interrupted commit of this job, kept") == len(shards)
    assert s3.traffic.bytes - before < 2 * 2**20  # no part uploaded again: only the small files
    assert weights(downloaded(url)) == reference and open_uploads() == []


def test_a_shard_replaced_after_an_interrupted_commit_is_made_again(big, reference, monkeypatch, capsys):
    url = fresh_url()
    failed_before_the_index(big, url, monkeypatch)
    shards = sorted(n for n in reference if n.endswith(".safetensors"))
    s3_sink.put(f"{url}/{shards[1]}", reference[shards[1]][::-1])  # same size, other bytes
    capsys.readouterr()
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN]) == 0
    err = capsys.readouterr().err
    assert err.count("completed by the interrupted commit of this job, kept") == len(shards) - 1
    done, units = map(int, err.split("resuming: ")[1].split(" units")[0].split(" of "))
    assert 0 < done < units
    assert weights(downloaded(url)) == reference and open_uploads() == []


def test_a_completion_whose_answer_was_lost_and_whose_retry_is_answered_no_such_upload_is_accepted(
    big, reference, s3_server, monkeypatch
):
    proxy = ForgetfulProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), lose_first=True)
    url = fresh_url()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # a new client: every request through the proxy
        assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN]) == 0
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert not proxy.lose_first and proxy.forgotten >= 1  # the answer lost, its retry answered NoSuchUpload
    assert weights(downloaded(url)) == reference and open_uploads() == []


def test_plan_refuses_parts_too_small_for_an_object_store_naming_the_shard(big, capsys):
    url = fresh_url()
    assert main(["plan", *merge_args(big)[1:], "--out", url, "--unit-size", "2MiB", "--max-shard-size", "12MB"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{url}/model-00001-of-" in lines[0] and "5 MiB" in lines[0], lines


def kill_once_journaled(argv: list[str], env: dict, out: str) -> None:
    """Run `chatvec ARGV` in a driver process with slow units, kill -9 it once `out`'s journal holds two units;
    its uploads must stay open for the rerun."""
    command = [sys.executable, "-m", "chatvec_dist.cli", *argv]
    proc = subprocess.Popen(command, env=slow_units_env(1.0, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = partial_path(staging_path(out)) / JOURNAL_NAME  # env: this test's staging
    deadline = time.monotonic() + 120
    while len(Journal.load(journal, 0)) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert open_uploads(), "the killed run's uploads stay open for the rerun"


def killed_midway(big: dict, url: str, env: dict) -> None:
    """Run the merge in a driver process with slow units, kill -9 it once two units are journaled."""
    kill_once_journaled([*merge_args(big), "--out", url, "--backend", "local", *RUN], env, url)


def test_a_killed_driver_resumes_on_the_same_machine_with_no_upload_left_open(big, reference, capsys):
    url = fresh_url()
    killed_midway(big, url, dict(os.environ))
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN]) == 0
    assert "resuming: " in capsys.readouterr().err
    assert weights(downloaded(url)) == reference and open_uploads() == []


def test_restart_or_another_machine_aborts_the_open_uploads(big, reference, tmp_path, capsys):
    url = fresh_url()
    killed_midway(big, url, dict(os.environ))
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN, "--restart"]) == 0
    assert "resuming: " not in capsys.readouterr().err
    assert weights(downloaded(url)) == reference and open_uploads() == []
    url = fresh_url()
    killed_midway(big, url, dict(os.environ))
    os.environ[STAGING_ENV] = str(tmp_path / "another-machine")  # put back by the autouse fixture
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN]) == 0
    assert "aborted " in capsys.readouterr().err
    assert weights(downloaded(url)) == reference and open_uploads() == []


def test_a_journaled_unit_counts_only_if_listparts_shows_its_parts_as_journaled(big, reference, capsys):
    url = fresh_url()
    killed_midway(big, url, dict(os.environ))
    work = partial_path(staging_path(url))
    lines = list(Journal.load(work / JOURNAL_NAME, 0).values())
    first, *rest = lines[0].parts
    etag = '"0123456789abcdef0123456789abcdef"'  # a part the store does not have
    lines[0] = dataclasses.replace(lines[0], parts=[dataclasses.replace(first, etag=etag), *rest])
    rewrite_journal(work / JOURNAL_NAME, lines)
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN]) == 0
    assert f"resuming: {len(lines) - 1} of " in capsys.readouterr().err
    assert weights(downloaded(url)) == reference and open_uploads() == []
    url = fresh_url()
    killed_midway(big, url, dict(os.environ))
    for key, upload_id in open_uploads():  # aborted elsewhere: every journaled unit is redone
        s3_sink.abort(f"s3://{BUCKET}/{key}", upload_id)
    assert main([*merge_args(big), "--out", url, "--backend", "local", *RUN]) == 0
    assert "resuming: " not in capsys.readouterr().err
    assert weights(downloaded(url)) == reference and open_uploads() == []
