"""s3:// checkpoints as inputs, against a real S3 server (SeaweedFS on 127.0.0.1): the same bytes as from local
folders on both backends, headers only to plan, one-line errors that name the URL and never a credential."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_llama
from s3server import CuttingProxy, upload_folder

from chatvec_dist.cli import main
from chatvec_dist.io import s3
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify

RUN = ["--no-progress", "--workers", "2"]
SHARDED = ["--max-shard-size", "100KB"]


@pytest.fixture(scope="session")
def models(tmp_path_factory, s3_server) -> dict[str, Path | str]:
    """base, chat, cp (a 2048-token vocabulary: ~0.5 MB of tensors each) as local folders, and each uploaded to
    S3 under its own prefix (`s3:NAME`); `sharded`: a chatvec output of several shards with its index, both too."""
    root = tmp_path_factory.mktemp("s3models")
    base = make_llama(root / "base", 0, vocab=2048)
    make_llama(root / "chat", 1, vocab=2048, base=base)
    make_llama(root / "cp", 2, vocab=2048, base=base)
    found: dict[str, Path | str] = {n: root / n for n in ("base", "chat", "cp")}
    assert (
        main(["merge", *merge_args(found), "--out", str(root / "sharded"), "--backend", "local", *RUN, *SHARDED]) == 0
    )
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2
    for name in ("base", "chat", "cp", "sharded"):
        found[name] = root / name
        found[f"s3:{name}"] = upload_folder(s3_server, root / name, "models", f"v1/{name}")
    return found


def merge_args(m: dict, base: str = "base", chat: str = "chat", cp: str | None = "cp") -> list[str]:
    return ["--base", str(m[base]), "--chat", str(m[chat]), *(["--cp", str(m[cp])] if cp else [])]


def shards(out: Path) -> dict[str, bytes]:
    """The output's weights and index, byte for byte (its manifest and card name the sources: they differ)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("model")}


@pytest.fixture(scope="session")
def local_merge(models, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["merge", *merge_args(models), "--out", str(out), "--backend", "local", *RUN, *SHARDED]) == 0
    return shards(out)


def one_line_error(capsys, server, *names: str) -> str:
    """The one error line on stderr (exit 2 checked by the caller), naming `names`, with no secret anywhere."""
    captured = capsys.readouterr()
    assert server.secret_key not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatvec: error: "), captured.err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_merge_from_s3_writes_the_bytes_of_the_same_merge_from_local_folders(
    backend, models, local_merge, tmp_path, request
):
    if backend == "ray":
        request.getfixturevalue("ray_s3")
    out = tmp_path / "out"
    argv = ["merge", *merge_args(models, "s3:base", "s3:chat", "s3:cp"), "--out", str(out), "--backend", backend]
    assert main([*argv, *RUN, *SHARDED]) == 0
    assert shards(out) == local_merge and verify(out) == []
    recorded = read_manifest(out)[1]["sources"]["cp"]
    assert recorded["url"] == models["s3:cp"]
    assert set(recorded["objects"]) == {"config.json", "generation_config.json", "model.safetensors"}
    assert (out / "config.json").read_bytes() == (models["cp"] / "config.json").read_bytes()  # type: ignore[operator]


def test_local_and_s3_sources_mix_in_one_job_and_a_sharded_cp_is_read_through_its_index(models, tmp_path):
    for cp in ("cp", "sharded"):
        ref, out = tmp_path / f"ref-{cp}", tmp_path / f"out-{cp}"
        assert main(["merge", *merge_args(models, cp=cp), "--out", str(ref), "--backend", "local", *RUN]) == 0
        mixed = merge_args(models, "base", "s3:chat", f"s3:{cp}")
        assert main(["merge", *mixed, "--out", str(out), "--backend", "local", *RUN]) == 0
        assert shards(out) == shards(ref) and verify(out) == []


def test_planning_from_s3_reads_the_headers_and_side_files_only(models, capsys):
    tensor_bytes = sum((models[n] / "model.safetensors").stat().st_size for n in ("base", "chat", "cp"))  # type: ignore[operator]
    before = s3.traffic.bytes
    assert main(["plan", *merge_args(models, "s3:base", "s3:chat", "s3:cp")]) == 0
    fetched = s3.traffic.bytes - before
    assert 0 < fetched < tensor_bytes / 20, (fetched, tensor_bytes)
    assert "model.embed_tokens.weight: merge (vocab:full, shape [2048, 32]" in capsys.readouterr().out


def test_a_vector_extracted_to_s3_applies_as_from_a_local_folder(models, s3_server, tmp_path):
    vector = tmp_path / "vector"
    assert main(["extract", *merge_args(models, cp=None), "--out", str(vector), "--backend", "local", *RUN]) == 0
    url = upload_folder(s3_server, vector, "models", "vector")
    for name, source in (("local", str(vector)), ("s3", url)):
        argv = ["apply", "--vector", source, "--cp", str(models["cp"]), "--alpha", "0.5", "--out", str(tmp_path / name)]
        assert main([*argv, "--backend", "local", *RUN]) == 0
    assert shards(tmp_path / "s3") == shards(tmp_path / "local")
    merged = tmp_path / "merged"
    assert main(["merge", *merge_args(models), "--out", str(merged), "--backend", "local", *RUN]) == 0
    upload_folder(s3_server, merged, "models", "merged")
    assert (
        main(["apply", "--vector", "s3://models/merged", "--cp", str(models["cp"]), "--out", str(tmp_path / "x")]) == 2
    )


def test_the_side_files_folder_is_gone_when_the_process_ends(models, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    argv = ["plan", *merge_args(models, "s3:base", "s3:chat", "s3:cp")]
    proc = subprocess.run([sys.executable, "-m", "chatvec_dist.cli", *argv], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_killed_process_side_files_folder_is_removed_by_the_next_and_a_live_one_kept(models, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    hold = f"from chatvec_dist.io.s3_checkpoint import open_s3_checkpoint as o; c = o({str(models['s3:cp'])!r})"
    hold += "; print(flush=True); input()"

    def holder() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", hold], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"  # its folder is made
        return proc

    live = holder()
    (live_folder,) = tmp_path.iterdir()
    killed = holder()
    killed.kill()
    killed.wait()
    assert len(list(tmp_path.iterdir())) == 2
    argv = ["plan", *merge_args(models, "s3:base", "s3:chat", "s3:cp")]
    proc = subprocess.run([sys.executable, "-m", "chatvec_dist.cli", *argv], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == [live_folder] and (live_folder / "config.json").is_file()
    live.communicate(b"\n")
    assert live.returncode == 0 and list(tmp_path.iterdir()) == []


def test_a_large_range_is_read_as_concurrent_parts_into_the_buffer(s3_server, tmp_path):
    blob = os.urandom(3 * s3.PART_BYTES + 12345)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "blob.bin").write_bytes(blob)
    url = upload_folder(s3_server, tmp_path / "big", "models", "big") + "/blob.bin"
    buf = bytearray(len(blob) - 1000)
    requests = s3.traffic.requests
    s3.read_into(url, 777, memoryview(buf))
    assert buf == blob[777 : 777 + len(buf)]
    assert s3.traffic.requests - requests == 4  # ceil(len / PART_BYTES) ranged GETs
    with pytest.raises(s3.SourceError, match=r"the object ends at byte \d+, before the range planned"):
        s3.read_into(url, len(blob) - 10, memoryview(bytearray(20)), tensor="t")


def test_a_body_that_ends_early_is_asked_for_again_from_where_it_stopped(s3_server, tmp_path, monkeypatch):
    blob = os.urandom(s3.PART_BYTES)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "blob.bin").write_bytes(blob)
    url = upload_folder(s3_server, tmp_path / "one", "models", "cut") + "/blob.bin"
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    buf = bytearray(len(blob) - 5)
    for cuts in (2, s3.BODY_TRIES):
        proxy = CuttingProxy(port, cuts, limit=100_000)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # a new client: new connections
        try:
            requests = s3.traffic.requests
            if cuts < s3.BODY_TRIES:
                s3.read_into(url, 5, memoryview(buf))
                assert buf == blob[5:] and s3.traffic.requests - requests == cuts + 1
            else:
                with pytest.raises(
                    s3.SourceError, match=r"blob.bin: tensor 't': the body kept ending early \(3 tries\)"
                ):
                    s3.read_into(url, 0, memoryview(buf), tensor="t")
        finally:
            proxy.close()


def test_bad_s3_inputs_are_one_line_errors_naming_the_url(models, s3_server, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "odd"
    folder.mkdir()
    cp = Path(models["cp"])
    (folder / "config.json").write_bytes((cp / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes((cp / "model.safetensors").read_bytes()[:5000])
    truncated = upload_folder(s3_server, folder, "odd", "truncated")
    (folder / "model.safetensors").write_bytes(b"PK\x03\x04 not a safetensors file, a zip" * 100)
    zipped = upload_folder(s3_server, folder, "odd", "zipped")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../v1/cp/model.safetensors"}})
    )
    escaping = upload_folder(s3_server, folder, "odd", "escaping")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "s3://models/v1/cp/x"}}))
    elsewhere = upload_folder(s3_server, folder, "odd", "elsewhere")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "y.safetensors"}}))
    missing = upload_folder(s3_server, folder, "odd", "missing")
    cases = {
        "s3://no-such-bucket/base": "no such bucket",
        "s3://models/v1/nothing-here": "no objects under this prefix",
        truncated: "run past the end of the file (data section has 2832 bytes)",
        zipped: "exceeds the",
        escaping: "weight_map names an unsafe path '../v1/cp/model.safetensors'",
        elsewhere: "weight_map names an unsafe path 's3://models/v1/cp/x'",
        missing: "tensor 'w': weight_map names a missing shard 'y.safetensors'",
        "s3://x": "malformed S3 URL",
    }
    for url, what in cases.items():
        assert main(["plan", *merge_args(models, cp=None), "--cp", url]) == 2
        one_line_error(capsys, s3_server, url, what)
    assert main(["plan", *merge_args(models, cp=None), "--cp", "s3://me:pw@models/v1/cp"]) == 2
    assert ":pw" not in one_line_error(capsys, s3_server, "s3://…@models/v1/cp: malformed S3 URL")


def test_bad_credentials_and_a_wrong_endpoint_fail_in_seconds_without_showing_a_secret(
    models, s3_server, capsys, monkeypatch
):
    argv = ["plan", *merge_args(models, "s3:base", "s3:chat", "s3:cp")]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 24)
    assert main(argv) == 2
    assert "not-the-secret-" not in one_line_error(capsys, s3_server, models["s3:chat"], "access denied")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOBODY")
    assert main(argv) == 2
    one_line_error(capsys, s3_server, models["s3:chat"], "access denied")
    monkeypatch.undo()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 20
    one_line_error(capsys, s3_server, models["s3:chat"], f"cannot connect to the S3 endpoint http://127.0.0.1:{port}")


def test_without_boto3_an_s3_input_says_what_to_install(models, tmp_path):
    code = (
        "import sys; sys.modules['boto3'] = None; from chatvec_dist.cli import main; "
        f"sys.exit(main(['plan', '--base', {models['s3:base']!r}, '--chat', {str(models['chat'])!r}, "
        f"'--cp', {str(models['cp'])!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "chatvec: error: s3:// needs boto3: pip install 'chatvec-dist[s3]'"


def test_an_object_replaced_after_a_failed_run_is_not_resumed(models, s3_server, tmp_path, monkeypatch, capsys):
    """A run that failed at its commit leaves a resumable partial output; the CP object then replaced (same size,
    other bytes) changes its ETag: the rerun refuses to reuse the units done from the old bytes."""
    folder = tmp_path / "cp"
    folder.mkdir()
    for p in Path(models["cp"]).iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    url = upload_folder(s3_server, folder, "replaced", "cp")
    out = tmp_path / "out"
    argv = [
        "merge",
        *merge_args(models, "s3:base", "s3:chat", None),
        "--cp",
        url,
        "--out",
        str(out),
        "--backend",
        "local",
    ]
    argv += RUN

    def rename(self: Path, target) -> None:
        raise OSError(errno.EIO, "Input/output error", str(self))

    monkeypatch.setattr(Path, "rename", rename)
    assert main(argv) == 3
    monkeypatch.undo()
    capsys.readouterr()
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # the last tensor's last bytes: other values, same size
    shard.write_bytes(bytes(data))
    upload_folder(s3_server, folder, "replaced", "cp")
    assert main(argv) == 2
    one_line_error(
        capsys,
        s3_server,
        f"a partial output is here from before {url}/model.safetensors changed (etag): its finished units may "
        "hold the old bytes (pass --restart to redo them)",
    )
    assert main([*argv, "--restart"]) == 0 and verify(out) == []


def test_an_object_replaced_during_the_run_is_never_mixed_into_the_output(
    models, s3_server, tmp_path, monkeypatch, capsys
):
    """Workers read each object at the ETag it was planned with: a CP object replaced after the first unit fails
    the next read of it (or the check before the commit), and nothing is committed."""
    from chatvec_dist.exec import worker

    folder = tmp_path / "cp"
    folder.mkdir()
    for p in Path(models["cp"]).iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    url = upload_folder(s3_server, folder, "midrun", "cp")
    real_run, replaced = worker.UnitRunner.run, []

    def replace_after_the_first_unit(self, unit):
        result = real_run(self, unit)
        if not replaced:
            replaced.append(unit.id)
            shard = folder / "model.safetensors"
            data = bytearray(shard.read_bytes())
            data[-64:] = bytes(64)
            shard.write_bytes(bytes(data))
            upload_folder(s3_server, folder, "midrun", "cp")
        return result

    monkeypatch.setattr(worker.UnitRunner, "run", replace_after_the_first_unit)
    out = tmp_path / "out"
    argv = ["merge", *merge_args(models, "s3:base", "s3:chat", None), "--cp", url, "--out", str(out)]
    code = main([*argv, "--backend", "local", "--workers", "1", "--unit-size", "16KiB", "--no-progress"])
    assert replaced and code in (2, 3)
    line = one_line_error(capsys, s3_server, f"{url}/model.safetensors")
    assert "the object changed while being read (its ETag differs)" in line, line  # the pinned read
    assert not out.exists()
