"""Parts copied server-side (UploadPartCopy) on a real S3 server (SeaweedFS on 127.0.0.1): where a part of an
s3:// output is CP's bytes as stored (`--exclude`, `--vocab skip`), adjacent in CP's object, the store copies
it and no byte of it is uploaded. The bytes are the same merge's to a local folder; a killed run resumes with
its copied parts checked by ListParts; a CP object replaced between a worker's read and the copy is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_llama, rewrite_journal, slow_units_env
from s3server import CountingProxy, upload_folder

import chatvec_dist
from chatvec_dist.cli import main
from chatvec_dist.errors import RunError
from chatvec_dist.exec.messages import UnitResult
from chatvec_dist.io import s3, s3_sink
from chatvec_dist.output.journal import Journal
from chatvec_dist.output.workarea import JOURNAL_NAME, STAGING_ENV, partial_path, staging_path
from chatvec_dist.planning.parts import COPY_ENV, Part

BUCKET = "copies-out"
MiB = 2**20
# vocab 8192 × hidden 512 (8 MiB each for the embeddings), 4 layers of 4.5 MiB: ~34 MB each, bf16. Layers 2
# and 3 and both vocabulary tensors keep CP's values: two parts of the two 20 MB shards are copies.
SHAPE = {"vocab": 8192, "hidden": 512, "layers": 4}
KEEP = ["--exclude", r"layers\.[23]\.", "--vocab", "skip"]
RUN = ["--no-progress", "--workers", "2", "--unit-size", "8MiB", "--max-shard-size", "20MB", *KEEP]
_runs = iter(range(1_000_000))


@pytest.fixture(scope="module")
def models(tmp_path_factory, s3_server) -> dict:
    """base, chat and cp on S3 (`s3:NAME`) and as local folders (NAME); `ref`: the same merge from the local
    folders to a local folder (shards and index)."""
    root = tmp_path_factory.mktemp("copy-models")
    base = make_llama(root / "base", 0, **SHAPE)
    make_llama(root / "chat", 1, base=base, **SHAPE)
    make_llama(root / "cp", 2, base=base, **SHAPE)
    found: dict = {}
    for name in ("base", "chat", "cp"):
        found[name] = str(root / name)
        found[f"s3:{name}"] = upload_folder(s3_server, root / name, "copy-models", name)
    out = root / "ref"
    assert main([*merge_args(found, ""), "--out", str(out), "--backend", "local", *RUN]) == 0
    found["ref"] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("model")}
    try:
        s3.client(True).create_bucket(Bucket=BUCKET)
    except Exception as e:  # made by an earlier module's run
        assert s3.error_code(e) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"), e
    return found


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    return tmp_path / "staging"


def merge_args(m: dict, prefix: str = "s3:") -> list[str]:
    return ["merge", "--base", m[prefix + "base"], "--chat", m[prefix + "chat"], "--cp", m[prefix + "cp"]]


def fresh_url() -> str:
    return f"s3://{BUCKET}/run{next(_runs)}-{os.getpid()}/out"


def planned_parts(models: dict, url: str) -> list[Part]:
    recipe = chatvec_dist.make_recipe(
        models["s3:base"],
        models["s3:chat"],
        models["s3:cp"],
        url,
        unit_bytes=8 * MiB,
        max_shard_size=20_000_000,
        exclude=[r"layers\.[23]\."],
        vocab="skip",
    )
    (tp,) = chatvec_dist.plan(recipe).targets
    assert tp.parts is not None
    return [p for ps in tp.parts.values() for p in ps]


def weights(url: str) -> dict[str, bytes]:
    bucket, key = s3.parse(url)
    c = s3.client(True)
    names = sorted(n for n in s3.list_names(url) if n.startswith("model"))
    return {n: c.get_object(Bucket=bucket, Key=f"{key}/{n}")["Body"].read() for n in names}


def open_uploads() -> list[tuple[str, str]]:
    """Every multipart upload still open in the output bucket."""
    r = s3.client(True).list_multipart_uploads(Bucket=BUCKET)
    return [(u["Key"], u["UploadId"]) for u in r.get("Uploads", ())]


def through(proxy: CountingProxy, s3_server, monkeypatch, argv: list[str]) -> int:
    """`chatvec argv` with every request of this process through `proxy`."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # a new client: every request through the proxy
    try:
        return main(argv)
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)


def test_the_plan_copies_only_parts_that_are_one_range_of_cp_copied_as_stored(models):
    """Checked against CP's own header, read here: each copy's range of CP's object holds exactly the tensors
    the output's part holds, all of them excluded or vocabulary tensors, in the same order."""
    from safetensors import safe_open

    parts = planned_parts(models, fresh_url())
    copies = [p for p in parts if p.copy is not None]
    assert len(copies) >= 2 and all(p.start > 0 and p.size >= 5 * MiB for p in copies)
    cp_file = Path(models["cp"]) / "model.safetensors"
    header = json.loads(cp_file.read_bytes()[8 : 8 + int.from_bytes(cp_file.read_bytes()[:8], "little")])
    data_start = 8 + int.from_bytes(cp_file.read_bytes()[:8], "little")
    with safe_open(str(cp_file), "pt") as f:
        kept = {n for n in f.keys() if ".layers.2." in n or ".layers.3." in n or "embed" in n or "lm_head" in n}  # noqa: SIM118
    for p in copies:
        url, offset = p.copy
        assert url == f"{models['s3:cp']}/model.safetensors"
        inside = [
            n
            for n, e in header.items()
            if n != "__metadata__"
            and data_start + e["data_offsets"][0] < offset + p.size
            and data_start + e["data_offsets"][1] > offset
        ]
        assert inside and set(inside) <= kept, inside
    copied = sum(p.size for p in copies)
    assert copied >= 12 * MiB


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_copied_parts_give_the_bytes_of_the_same_merge_to_a_local_folder_and_are_not_uploaded(
    backend, models, s3_server, monkeypatch, request
):
    if backend == "ray":
        request.getfixturevalue("ray_s3")
    url = fresh_url()
    parts = planned_parts(models, url)
    copied = sum(p.size for p in parts if p.copy is not None)
    proxy = CountingProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    argv = [*merge_args(models), "--out", url, "--backend", backend, *RUN]
    if backend == "ray":  # its workers keep the endpoint Ray started with: only the driver's requests are seen
        assert main(argv) == 0
    else:
        assert through(proxy, s3_server, monkeypatch, argv) == 0
        assert proxy.copied == [200] * sum(p.copy is not None for p in parts)
        assert proxy.uploaded == sum(p.size for p in parts) - copied  # not one copied byte went up
    assert weights(url) == models["ref"]
    assert open_uploads() == []
    assert main(["verify", url]) == 0


def test_without_copies_every_part_is_uploaded_to_the_same_bytes(models, s3_server, monkeypatch, capsys):
    url = fresh_url()
    monkeypatch.setenv(COPY_ENV, "0")
    parts = planned_parts(models, url)
    assert all(p.copy is None for p in parts)
    proxy = CountingProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    assert through(proxy, s3_server, monkeypatch, [*merge_args(models), "--out", url, "--backend", "local", *RUN]) == 0
    assert proxy.copied == [] and proxy.uploaded == sum(p.size for p in parts)
    assert weights(url) == models["ref"]
    monkeypatch.setenv(COPY_ENV, "yes")
    capsys.readouterr()
    assert main(["plan", *merge_args(models)[1:], "--out", url, *RUN[3:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and COPY_ENV in err[0], err


def killed_after_a_copy(models: dict, url: str, copies: set[tuple[int, int]]) -> list[UnitResult]:
    """Run the merge in a driver process with slow units, kill -9 it once two units are journaled, one with a
    copied part; the journaled units."""
    argv = [sys.executable, "-m", "chatvec_dist.cli", *merge_args(models), "--out", url, "--backend", "local", *RUN]
    proc = subprocess.Popen(argv, env=slow_units_env(1.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = partial_path(staging_path(url)) / JOURNAL_NAME  # the env: this test's staging

    def journaled() -> list[UnitResult]:
        return list(Journal.load(journal, 0).values())

    deadline = time.monotonic() + 120
    while not (len(lines := journaled()) >= 2 and any(copied(line, copies) for line in lines)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no unit with a copied part journaled"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert open_uploads(), "the killed run's uploads stay open for the rerun"
    return journaled()


def copied(unit: UnitResult, copies: set[tuple[int, int]]) -> bool:
    """Whether a journaled unit has a copied part."""
    return any((p.shard, p.number) in copies for p in unit.parts)


def test_a_killed_run_resumes_its_copied_parts_checked_by_listparts(models, capsys):
    url = fresh_url()
    copies = {(p.shard, p.number) for p in planned_parts(models, url) if p.copy is not None}
    lines = killed_after_a_copy(models, url, copies)
    assert main([*merge_args(models), "--out", url, "--backend", "local", *RUN]) == 0
    assert f"resuming: {len(lines)} of " in capsys.readouterr().err  # its copied part listed with its ETag
    assert weights(url) == models["ref"] and open_uploads() == []


def test_a_journaled_copy_the_store_does_not_list_as_journaled_is_done_again(models, capsys):
    url = fresh_url()
    copies = {(p.shard, p.number) for p in planned_parts(models, url) if p.copy is not None}
    lines = killed_after_a_copy(models, url, copies)
    at = next(k for k, x in enumerate(lines) if copied(x, copies))
    etag = '"0123456789abcdef0123456789abcdef-2"'  # an ETag the store does not list
    lines[at] = dataclasses.replace(lines[at], parts=[dataclasses.replace(p, etag=etag) for p in lines[at].parts])
    rewrite_journal(partial_path(staging_path(url)) / JOURNAL_NAME, lines)
    assert main([*merge_args(models), "--out", url, "--backend", "local", *RUN]) == 0
    assert f"resuming: {len(lines) - 1} of " in capsys.readouterr().err
    assert weights(url) == models["ref"] and open_uploads() == []


def test_a_cp_object_replaced_between_the_read_and_the_copy_is_refused(models, s3_server, monkeypatch, capsys):
    cp = upload_folder(s3_server, Path(models["cp"]), "copy-models", f"pinned-{os.getpid()}")
    shard = f"{cp}/model.safetensors"
    original = (Path(models["cp"]) / "model.safetensors").read_bytes()
    direct = s3.client(True)  # to the store itself, not through the proxy

    def replace() -> None:
        bucket, key = s3.parse(shard)
        direct.put_object(Bucket=bucket, Key=key, Body=original[:-2] + original[-2:][::-1])  # same size

    proxy = CountingProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), before_copy=replace)
    url = fresh_url()
    argv = ["merge", "--base", models["s3:base"], "--chat", models["s3:chat"], "--cp", cp, "--out", url]
    assert through(proxy, s3_server, monkeypatch, [*argv, "--backend", "local", *RUN]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shard in err[0] and "changed" in err[0], err
    assert proxy.copied[:1] == [412] and proxy.before_copy is None  # the copy itself refused: PreconditionFailed
    assert "model.safetensors.index.json" not in s3.list_names(url)  # nothing committed
    assert s3_sink.abort_all(url) == 2  # the failed run's uploads, left for a rerun: gone, for the other tests


def test_a_commit_interrupted_before_the_index_keeps_shards_with_copied_parts(models, monkeypatch, capsys):
    """The completed objects are recognised by their multipart ETag, computed from the journaled part ETags, the
    copied parts' included (SeaweedFS gives those a `digest-n` ETag of their own)."""
    url = fresh_url()
    put = s3_sink.put

    def failing_put(target: str, data: bytes) -> None:
        if target.endswith("model.safetensors.index.json"):
            raise RunError("injected failure", file=target)
        put(target, data)

    monkeypatch.setattr(s3_sink, "put", failing_put)
    assert main([*merge_args(models), "--out", url, "--backend", "local", *RUN]) == 3
    monkeypatch.setattr(s3_sink, "put", put)
    capsys.readouterr()
    assert main([*merge_args(models), "--out", url, "--backend", "local", *RUN]) == 0
    err = capsys.readouterr().err
    assert err.count("completed by the interrupted commit of this job, kept") == 2  # both shards
    assert weights(url) == models["ref"] and open_uploads() == []
