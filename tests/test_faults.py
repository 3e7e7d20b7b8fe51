"""Faults during a merge, through the real CLI in a subprocess: disk full (RLIMIT_FSIZE), SIGINT/SIGTERM, and
the commit's fsync-then-rename. Every failure must be one line, leave no output, and be resumable."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import slow_units_env

from chatvec_dist.cli import main
from chatvec_dist.demo import llama_config, llama_tensors, make_demo_models, save_checkpoint
from chatvec_dist.errors import ChatvecError, OutputError
from chatvec_dist.exec.messages import UnitResult
from chatvec_dist.output.journal import Journal, _records
from chatvec_dist.output.verify import verify
from chatvec_dist.output.workarea import JOURNAL_NAME

RUN = ["--backend", "local", "--workers", "1", "--no-progress"]
INTERRUPTED = "chatvec: interrupted; run the same command again to resume"
START_S = 300  # to the first finished unit: Ray's workers run at nice 15, and a loaded CI machine starves them
HANG_S = 10  # a merge told to stop must be gone by then (the whole uninterrupted run takes ~3 s)


def merge_argv(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "merge",
        "--base",
        str(models["base"]),
        "--chat",
        str(models["chat"]),
        "--cp",
        str(models["cp"]),
        "--out",
        str(out),
        *RUN,
        *extra,
    ]


def cli(argv: list[str], fsize_limit: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m chatvec_dist.cli ARGV`; with a limit, writes past `fsize_limit` bytes of any file fail (EFBIG)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run(
        [sys.executable, "-m", "chatvec_dist.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit if fsize_limit is not None else None,
    )


def partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def shard_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def journal_lines(out: Path) -> list[UnitResult]:
    """Every record of the partial output's journal, each of which must be intact and readable, in order."""
    path = partial(out) / JOURNAL_NAME
    data = path.read_bytes()
    ends = [end for end, _ in _records(data)]
    assert (ends[-1] if ends else 0) == len(data)  # intact to its last byte
    units = Journal.load(path, 0)
    assert len(units) == len(ends) and all(r.segments for r in units.values())  # each readable, none twice
    return list(units.values())


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("resuming: ")]
    assert len(lines) == 1 and lines[0].startswith("chatvec: error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def assert_rerun_completes(argv: list[str], out: Path, reference: dict[str, str], resumes: bool) -> None:
    proc = cli(argv)
    assert proc.returncode == 0, proc.stderr
    assert ("resuming:" in proc.stderr) == resumes, proc.stderr
    assert verify(out) == [] and shard_hashes(out) == reference
    assert not partial(out).exists()


# --- disk full ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The demo models and the shard hashes of their uninterrupted merge (one shard, ~232 kB; or 40KB shards)."""
    root = tmp_path_factory.mktemp("faults")
    models = make_demo_models(root / "models")
    refs = {}
    for name, extra in {"one": [], "small": ["--max-shard-size", "40KB"]}.items():
        out = root / f"ref-{name}"
        assert main(merge_argv(models, out, *extra)) == 0
        refs[name] = shard_hashes(out)
    return {"models": models, "ref": refs, "root": root}


def test_disk_full_while_creating_shards(demo, tmp_path):
    out = tmp_path / "out"
    argv = merge_argv(demo["models"], out)
    shard_size = (demo["root"] / "ref-one" / "model-00001-of-00001.safetensors").stat().st_size
    assert shard_size > 200_000
    proc = cli(argv, fsize_limit=100_000)  # below the shard's size: pre-sizing it (truncate) fails
    line = assert_one_line_error(proc, str(partial(out)))
    assert "File too large" in line and "output shards" in line
    assert not out.exists()
    assert all(p.stat().st_size < shard_size for p in partial(out).glob("*.safetensors"))
    assert_rerun_completes(argv, out, demo["ref"]["one"], resumes=False)


def test_disk_full_while_writing_shards(demo, tmp_path, monkeypatch):
    """Shards already pre-sized (by a run stopped after its first unit): the limit makes the pwrites themselves fail.
    (A run stopped before any unit leaves nothing to resume, so nothing at all.)"""
    from chatvec_dist.exec import worker

    out = tmp_path / "out"
    argv = merge_argv(demo["models"], out, "--unit-size", "16KiB")
    real_run = worker.UnitRunner.run

    def stop(self, unit):
        if unit.id > 0:
            raise KeyboardInterrupt
        return real_run(self, unit)

    with monkeypatch.context() as m:
        m.setattr(worker.UnitRunner, "run", stop)
        assert main(argv) == 130
    shard = partial(out) / "model-00001-of-00001.safetensors"
    assert shard.stat().st_size > 200_000 and len(journal_lines(out)) == 1

    proc = cli(argv, fsize_limit=100_000)  # units wholly below 100 kB succeed, the first one past it fails
    line = assert_one_line_error(proc, str(shard))
    assert "write failed: File too large" in line
    assert not out.exists()
    done = journal_lines(out)
    assert 0 < len(done) < 15  # 232 kB / 16 KiB units: those before the limit were journaled
    assert_rerun_completes(argv, out, demo["ref"]["one"], resumes=True)


def test_disk_full_while_appending_the_journal(demo, tmp_path):
    """Shards of <= 41 kB fit under the limit; the journal of 229 one-KiB units (~45 kB) does not."""
    out = tmp_path / "out"
    argv = merge_argv(demo["models"], out, "--max-shard-size", "40KB", "--unit-size", "1KiB")
    proc = cli(argv, fsize_limit=42_000)
    assert not out.exists()
    assert all(p.stat().st_size <= 42_000 for p in partial(out).glob("*.safetensors"))
    assert_one_line_error(proc, str(partial(out) / JOURNAL_NAME))
    assert_rerun_completes(argv, out, demo["ref"]["small"], resumes=True)


# --- SIGINT / SIGTERM ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    """A Llama-shaped model of ~14 MB (bf16) per checkpoint: a merge runs for a few seconds, most of it startup."""
    root = tmp_path_factory.mktemp("big")
    config = llama_config(2048, "bfloat16", hidden_size=256, intermediate_size=688, num_hidden_layers=8)
    g = torch.Generator().manual_seed(1)
    base = llama_tensors(config, g)
    models = {}
    for name in ("base", "chat", "cp"):
        tensors = base if name == "base" else {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        models[name] = save_checkpoint(
            root / name, {n: t.to(torch.bfloat16).contiguous() for n, t in tensors.items()}, config
        )
    ref = root / "ref"
    assert main(merge_argv(models, ref)) == 0
    return {"models": models, "ref": shard_hashes(ref)}


def interrupt(argv: list[str], out: Path, signum: int) -> subprocess.CompletedProcess:
    """Start the merge, wait until its journal holds a finished unit, send `signum`, wait for the exit.
    Each unit takes 50 ms more (tests/slow_units), so the signal lands mid-run however late this process sends it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatvec_dist.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=slow_units_env(0.05),
    )
    journal = partial(out) / JOURNAL_NAME
    deadline = time.monotonic() + START_S
    try:
        while not Journal.load(journal, 0):
            assert proc.poll() is None, f"merge ended before the signal: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"no unit was journaled within {START_S} s"
            time.sleep(0.005)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the merge did not stop within {HANG_S} s of {signal.Signals(signum).name}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_then_same_command_resumes(big, tmp_path, signum):
    # 256 KiB units (73 of them): few futures in flight, so the LocalBackend interrupt deadlock (see
    # test_interrupt_stops_promptly) is very unlikely here; that test covers it with 8 KiB units
    out = tmp_path / "out"
    argv = merge_argv(big["models"], out, "--unit-size", "256KiB")
    proc = interrupt(argv, out, signum)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == INTERRUPTED
    assert not out.exists()
    assert not (partial(out) / "manifest.parquet").exists()
    done = journal_lines(out)  # consistent: every line parses
    assert 1 <= len(done) < 73  # stopped mid-run

    rerun = cli(argv)
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(rf"^resuming: {len(done)} of \d+ units", rerun.stderr, re.M), rerun.stderr
    assert shard_hashes(out) == big["ref"] and verify(out) == []
    assert not partial(out).exists()


def test_sigterm_on_the_ray_backend_stops_like_ctrl_c(big, tmp_path):
    """ray.init installs its own SIGTERM handler (exit 15, no message); the CLI's is put back."""
    out = tmp_path / "out"
    argv = merge_argv(big["models"], out, "--unit-size", "256KiB", "--backend", "ray", "--workers", "2")
    proc = interrupt(argv, out, signal.SIGTERM)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == INTERRUPTED and not out.exists()
    assert 1 <= len(journal_lines(out)) < 73


def test_a_signal_during_ray_init_waits_for_it_to_finish(monkeypatch):
    """Ctrl-C halfway through ray.init orphaned Ray's processes: a first Ctrl-C (or the CLI's SIGTERM) now waits
    until ray.init returns or fails, then stops the run as Ctrl-C does; a second one stops at once; a signal the
    process ignores stays ignored; every handler is put back. ray.init first installs a SIGTERM handler of its own
    (exit 15, mid-init): it is kept from doing so."""
    import ray

    from chatvec_dist.cli.main import _interrupt
    from chatvec_dist.exec.ray_backend import init_ray

    steps = []

    def init_sending(*signals, fail=False):
        def init(**kwargs):
            ray._private.utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))  # as ray.init does first
            for signum in signals:
                os.kill(os.getpid(), signum)
                time.sleep(0.05)  # the handler runs in between
            steps.append("ray.init returned")
            if fail:
                raise ConnectionError("no cluster")

        return init

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    pytest_sigterm = signal.signal(signal.SIGTERM, _interrupt)  # as the CLI has it (and never kill pytest)
    try:
        handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        for signals, fail, finished in [
            ((signal.SIGINT,), False, True),
            ((signal.SIGTERM,), True, True),
            ((signal.SIGINT, signal.SIGTERM), False, False),
        ]:
            steps.clear()
            monkeypatch.setattr(ray, "init", init_sending(*signals, fail=fail))
            with pytest.raises(KeyboardInterrupt):
                init_ray("local")
            assert steps == (["ray.init returned"] if finished else []), signals
            assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a script
        monkeypatch.setattr(ray, "init", init_sending(signal.SIGINT))
        init_ray("local")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, pytest_sigterm)


def test_an_abandoned_workers_error_is_not_printed_after_the_run_failed(tmp_path):
    """Two workers fail (no CUDA under --device cuda); the run stops at the first error. Ray printed the second,
    unfetched, as a traceback once its reference was dropped: after chatvec's one-line error, its last line."""
    script = tmp_path / "abandon.py"
    script.write_text("""
import gc, sys, time
from chatvec_dist.exec.ray_backend import init_ray
ray = init_ray(None)

@ray.remote(num_cpus=0)
class Worker:
    def ready(self):
        raise ValueError("no CUDA here")

first, second = Worker.remote(), Worker.remote()
refs = [first.ready.remote(), second.ready.remote()]
try:
    ray.get(refs[0])
except Exception:
    print("chatvec: error: the first worker failed", file=sys.stderr)
del refs
gc.collect()
time.sleep(3)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=START_S)
    assert done.returncode == 0 and done.stderr.strip().splitlines() == ["chatvec: error: the first worker failed"], (
        done.stderr
    )


def test_a_cluster_that_refuses_the_driver_is_a_one_line_error(monkeypatch, capsys):
    """ray.init failing to join (here: a token-auth cluster joined without the token) is one line naming the
    usual causes, exit 2 — it was ~20 lines of Ray's retries and a traceback."""
    import ray

    from chatvec_dist.exec import ray_backend

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to GCS: InvalidAuthToken\n(20 more lines)")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(ray_backend, "_check_reachable", lambda address: None)
    with pytest.raises(ChatvecError) as e:
        ray_backend.init_ray("10.0.0.1:6379")
    assert str(e.value).startswith(
        "cannot join the Ray cluster at 10.0.0.1:6379 (ConnectionError: Failed to connect "
        "to GCS: InvalidAuthToken); a cluster with token authentication needs RAY_AUTH_MODE=token"
    )


def test_interrupt_stops_promptly(big, tmp_path):
    out = tmp_path / "out"
    argv = merge_argv(big["models"], out, "--unit-size", "8KiB")  # 1689 queued units
    proc = interrupt(argv, out, signal.SIGINT)
    assert proc.returncode == 130 and not out.exists()
    assert len(journal_lines(out)) < 1689
    # stopped: the units queued when the signal came were not computed, so the shard is not the finished one
    assert shard_hashes(partial(out)) != big["ref"]


# --- commit ------------------------------------------------------------------------------------


def test_commit_fsyncs_everything_then_renames(demo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self: Path, target) -> Path:
        events.append(("rename", f"{self} -> {target}"))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    assert main(merge_argv(demo["models"], out, "--max-shard-size", "40KB")) == 0
    monkeypatch.undo()

    work = partial(out)
    assert not work.exists()
    names = {p.name for p in out.iterdir()}
    assert JOURNAL_NAME not in names and "plan.json" not in names
    assert {"manifest.parquet", "model.safetensors.index.json", "README.md", "config.json"} <= names
    assert verify(out) == [] and shard_hashes(out) == demo["ref"]["small"]

    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert [events[i][1] for i in renames] == [f"{work} -> {out}"]
    before = {path for kind, path in events[: renames[0]] if kind == "fsync"}
    assert {str(work.resolve() / n) for n in names} <= before  # every output file durable before the rename
    assert ("fsync", str(work.resolve())) in events[: renames[0]]  # and the directory's entries
    assert ("fsync", str(out.parent.resolve())) in events[renames[0] :]  # and the rename itself, after

    assert main(merge_argv(demo["models"], out, "--max-shard-size", "40KB", "--overwrite")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no out.partial, no out.old left behind
    assert verify(out) == []


def test_overwrite_replaces_the_output_and_nothing_beside_it(demo, tmp_path):
    """The old output is moved aside under a name of its own, then removed: a sibling `out.old` (here the CP
    itself) is left alone. An input where the work area would go is refused (--restart deletes it)."""
    cp = tmp_path / "out.old"
    shutil.copytree(demo["models"]["cp"], cp)
    models, out = dict(demo["models"], cp=cp), tmp_path / "out"
    assert main(merge_argv(models, out)) == 0
    before = shard_hashes(cp)
    assert main(merge_argv(models, out, "--overwrite")) == 0
    assert shard_hashes(cp) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.old"]
    shutil.copytree(cp, partial(tmp_path / "new"))
    proc = cli(merge_argv(dict(demo["models"], cp=partial(tmp_path / "new")), tmp_path / "new"))
    assert "overlaps the input checkpoint" in assert_one_line_error(proc)


@pytest.mark.parametrize("restart", [False, True])
def test_a_folder_or_file_of_the_users_where_the_work_area_goes_is_kept(demo, tmp_path, restart, capsys):
    """OUT.partial that chatvec did not make (no plan file) is never deleted or reused, even with --restart."""
    out = tmp_path / "keep"
    partial(out).mkdir()
    (partial(out) / "thesis.txt").write_text("precious")
    (tmp_path / "also.partial").write_text("a file")
    for target in (out, tmp_path / "also"):
        assert main(merge_argv(demo["models"], target, *(["--restart"] if restart else []))) == 2
        err = capsys.readouterr().err
        assert f"{partial(target)}: this is where the output's work area goes, and it is not one chatvec made" in err
    assert (partial(out) / "thesis.txt").read_text() == "precious" and (
        tmp_path / "also.partial"
    ).read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["also.partial", "keep.partial"]
    batch = merge_argv(
        dict(demo["models"], cp=f"aa={demo['models']['cp']}"), tmp_path, "--cp", f"also={demo['models']['cp']}"
    )
    assert main(batch) == 2  # 'aa' is fine, 'also' is refused: no work area is made for either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["also.partial", "keep.partial"]


def fail_the_commit_at_its_rename(argv: list[str], monkeypatch, capsys) -> None:
    def rename(self: Path, target) -> None:
        raise OSError(errno.EIO, "Input/output error", str(self))

    monkeypatch.setattr(Path, "rename", rename)
    assert main(argv) == 3  # a failed run, not bad input
    monkeypatch.undo()
    assert "commit failed (Input/output error); fix the cause and run the same command again" in capsys.readouterr().err


def test_a_commit_failed_at_its_last_step_resumes_and_rewrites_damaged_headers(demo, tmp_path, monkeypatch, capsys):
    """The journal outlives every commit step but the rename, so the same command resumes; shard headers come from
    the plan and are rewritten on resume (never fsynced before the commit, a power cut may have lost them)."""
    out = tmp_path / "out"
    argv = merge_argv(demo["models"], out, "--max-shard-size", "40KB")
    fail_the_commit_at_its_rename(argv, monkeypatch, capsys)
    shards = sorted(partial(out).glob("*.safetensors"))
    assert len(shards) > 1 and (partial(out) / JOURNAL_NAME).stat().st_size > 0
    for shard in shards:
        with open(shard, "r+b") as f:
            f.write(b"\0" * 64)
    assert_rerun_completes(argv, out, demo["ref"]["small"], resumes=True)


def test_a_garbled_journal_line_is_redone_and_a_garbled_plan_is_a_clear_error(demo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = merge_argv(demo["models"], out, "--max-shard-size", "40KB")
    fail_the_commit_at_its_rename(argv, monkeypatch, capsys)
    plan = partial(out) / "plan.json"
    good = plan.read_bytes()
    plan.write_bytes(b"\0" * 16)  # a crash while the plan was written
    line = assert_one_line_error(cli(argv), str(partial(out)))
    assert "a partial output of a different (or unknown) job is here (pass --restart to discard it)" in line
    plan.write_bytes(good)
    with open(partial(out) / JOURNAL_NAME, "ab") as f:
        f.write(b'{"unit": 99, "segm\xc3')  # garbage after the last record
    assert_rerun_completes(argv, out, demo["ref"]["small"], resumes=True)


def test_an_input_rewritten_with_its_size_and_mtime_put_back_is_not_resumed(demo, tmp_path, monkeypatch, capsys):
    """`cp -p` or `rsync -a` of a changed file keeps its size and mtime: its ctime still tells, so the units already
    done from the old bytes are not reused."""
    models = {k: tmp_path / k for k in ("base", "chat", "cp")}
    for k, d in models.items():
        shutil.copytree(demo["models"][k], d)
    out = tmp_path / "out"
    argv = merge_argv(models, out)
    fail_the_commit_at_its_rename(argv, monkeypatch, capsys)
    shard = sorted(models["cp"].glob("*.safetensors"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # the last tensor's last bytes: other values, same size
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(argv) == 2
    assert (
        f"{partial(out)}: a partial output is here from before {shard} changed (ctime; chmod, chown, a new hard "
        "link or a rewrite change it): its finished units may hold the old bytes (pass --restart to redo them)"
    ) in capsys.readouterr().err
    assert main(argv + ["--restart"]) == 0 and verify(out) == []


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(demo, tmp_path):
    from chatvec_dist.output.workarea import exclusive

    out = tmp_path / "out"
    argv = merge_argv(demo["models"], out)
    with exclusive(out):  # what the first run holds from planning to its commit
        line = assert_one_line_error(cli(argv + ["--restart"]), str(out))
        assert "another chatvec run is writing this output" in line
    assert_rerun_completes(argv, out, demo["ref"]["one"], resumes=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file goes with the run


def test_a_batch_that_failed_between_two_commits_resumes_without_redoing_the_first(demo, tmp_path, monkeypatch, capsys):
    from chatvec_dist import job

    models, root = demo["models"], tmp_path / "v"
    argv = merge_argv(models, root, "--alpha", "0.5,1")
    real, commits = job.commit, []

    def disk_full_at_the_second(work, out, *args):
        commits.append(out)
        if len(commits) == 2:
            raise OutputError(
                "commit failed (No space left on device); fix the cause and run the same command again", file=str(work)
            )
        return real(work, out, *args)

    monkeypatch.setattr(job, "commit", disk_full_at_the_second)
    assert main(argv) == 2
    monkeypatch.undo()
    assert (root / "alpha0.5").is_dir() and not (root / "alpha1").exists() and partial(root / "alpha1").is_dir()
    (root / "alpha0.5" / JOURNAL_NAME).write_text("")  # as if a crash came between a commit's last two steps
    (root / ".alpha0.5.replaced").mkdir()  # and an interrupted --overwrite
    capsys.readouterr()
    assert main(argv + ["--overwrite"]) == 0  # the same job's committed output is kept even so: the same bytes
    err = capsys.readouterr().err
    assert f"already committed by an earlier run of this job (--restart redoes it): {root / 'alpha0.5'}" in err
    assert re.search(r"^resuming: (\d+) of \1 units", err, re.M), err
    assert sorted(p.name for p in root.iterdir()) == ["alpha0.5", "alpha1"]
    assert not (root / "alpha0.5" / JOURNAL_NAME).exists()
    reference = tmp_path / "reference"
    assert main(merge_argv(models, reference, "--alpha", "0.5,1")) == 0
    for name in ("alpha0.5", "alpha1"):
        assert verify(root / name) == [] and shard_hashes(root / name) == shard_hashes(reference / name)
    assert main(argv) == 0 and "already committed" in capsys.readouterr().err  # a third run: nothing to do
    before = {n: (root / n / "manifest.parquet").stat().st_ino for n in ("alpha0.5", "alpha1")}
    assert main(argv + ["--restart"]) == 0 and "already committed" not in capsys.readouterr().err  # redone ...
    assert all(verify(root / name) == [] for name in ("alpha0.5", "alpha1"))
    assert all((root / n / "manifest.parquet").stat().st_ino != ino for n, ino in before.items())  # ... anew
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("mine")
    assert main(merge_argv(models, root / "other", "--restart")) == 2  # --restart replaces only this job's outputs
    assert "output exists (pass --overwrite" in capsys.readouterr().err
    assert (root / "other" / "notes.txt").read_text() == "mine"


def test_an_output_that_is_a_link_is_checked_by_the_names_a_run_writes(demo, tmp_path, capsys):
    """`a` a (dangling) link elsewhere and a second target at `a.partial`: the run writes a.partial beside the
    link, so they collide (the check followed the link and let both start); a symlink loop is a clear error."""
    models = demo["models"]
    (tmp_path / "a").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    argv = [
        "merge",
        "--base",
        str(models["base"]),
        "--chat",
        str(models["chat"]),
        "--cp",
        f"a={models['cp']}",
        "--cp",
        f"b={models['cp']}",
        "--out",
        str(tmp_path),
        *RUN,
        "--print-recipe",
    ]
    assert main(argv) == 0
    recipe = capsys.readouterr().out
    for second, message in (("a.partial", "have overlapping outputs"), ("loop/b", "output path cannot be resolved")):
        (tmp_path / "r.yaml").write_text(recipe.replace(str(tmp_path / "b"), str(tmp_path / second)))
        assert main(["run", str(tmp_path / "r.yaml"), *RUN]) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "loop", "r.yaml"]


def test_restart_decides_what_it_may_replace_under_the_lock(demo, tmp_path, monkeypatch, capsys):
    """--restart replaces this job's own committed output; another job's output committed there while this run
    waited for the lock is not this job's, so it is kept (the decision is made again under the lock)."""
    from chatvec_dist import job

    models, out, other = demo["models"], tmp_path / "out", tmp_path / "other"
    argv = merge_argv(models, out)
    assert main(argv) == 0 and main(merge_argv(models, other, "--alpha", "0.5")) == 0
    real = job.exclusive

    def another_run_commits_first(path):
        if path == out:  # the other job's run held the lock and committed just before this one got it
            shutil.rmtree(out)
            shutil.copytree(other, out)
        return real(path)

    monkeypatch.setattr(job, "exclusive", another_run_commits_first)
    capsys.readouterr()
    assert main(argv + ["--restart"]) == 2
    assert "output exists (pass --overwrite" in capsys.readouterr().err
    assert shard_hashes(out) == shard_hashes(other) and verify(out) == []


@pytest.mark.parametrize("second", ["a.partial", "a/inner", ".a.lock"])
def test_targets_in_each_others_way_are_refused_before_anything_is_written(demo, tmp_path, second, capsys):
    """One target's output inside another's, or where its work area or lock goes, is refused up front."""
    models = demo["models"]
    argv = [
        "merge",
        "--base",
        str(models["base"]),
        "--chat",
        str(models["chat"]),
        "--cp",
        f"a={models['cp']}",
        "--cp",
        f"b={models['cp']}",
        "--out",
        str(tmp_path),
        *RUN,
    ]
    recipe = tmp_path / "r.yaml"
    assert main(argv + ["--print-recipe"]) == 0
    text = capsys.readouterr().out.replace(str(tmp_path / "b"), str(tmp_path / second))
    recipe.write_text(text)
    assert main(["run", str(recipe), *RUN]) == 2
    err = capsys.readouterr().err
    assert f"targets 'a' and 'b' have overlapping outputs: {tmp_path / 'a'} and {tmp_path / second}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_out_dot_is_the_current_folder(demo, tmp_path, monkeypatch):
    """`--out .` (or `a/..`) names a folder like any other: an empty one may be replaced with --overwrite."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(merge_argv(demo["models"], Path("."), "--overwrite")) == 0
    assert verify(empty) == [] and not partial(empty).exists()


@pytest.mark.parametrize("case", ["extract", "excluded", "rows past the base", "copied as stored"])
def test_nonfinite_outputs_are_counted_whatever_made_them(tmp_path, case, capsys):
    """An Inf that rounding to float16 makes (an extracted difference, an excluded or extra-row CP value converted),
    or a NaN/Inf CP holds in a tensor copied as stored: counted in the manifest and refused by
    --fail-on-nonfinite, as an overflow in a merge is."""
    from safetensors.torch import save_file

    from chatvec_dist.output.manifest import read_manifest

    def checkpoint(name: str, w: torch.Tensor, v: torch.Tensor, lm_head: torch.Tensor) -> Path:
        tensors = {"w": w, "v": v, "lm_head.weight": lm_head}
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        return tmp_path / name

    base = checkpoint("base", w=torch.tensor([-40000.0, 0.0, 1.0]), v=torch.ones(4), lm_head=torch.zeros(2, 2))
    chat = checkpoint("chat", w=torch.tensor([40000.0, 0.0, 1.0]), v=torch.ones(4), lm_head=torch.zeros(2, 2))
    v = {"excluded": [1e6, -1e6, 1.0, 2.0], "copied as stored": [float("nan"), float("inf"), 1.0, 2.0]}.get(
        case, [1.0] * 4
    )
    extra_row = 1e5 if case == "rows past the base" else 1.0
    cp = checkpoint(
        "cp", w=torch.zeros(3), v=torch.tensor(v), lm_head=torch.tensor([[0.0, 0.0], [0.0, 0.0], [extra_row, 1.0]])
    )
    merge = ["merge", "--cp", str(cp), "--exclude", "^(v|w)$"]  # w: chat − base overflows float16 (extract's case)
    tensor, counts, argv = {
        "extract": ("w", (0, 1), ["extract", "--dtype", "float16"]),
        "excluded": ("v", (0, 2), [*merge, "--dtype", "float16"]),
        "rows past the base": ("lm_head.weight", (0, 1), [*merge, "--dtype", "float16", "--vocab", "overlap"]),
        "copied as stored": ("v", (1, 1), merge),
    }[case]
    argv = [*argv, "--base", str(base), "--chat", str(chat), "--backend", "local", "--no-progress"]
    out = tmp_path / "counted"
    assert main([*argv, "--out", str(out)]) == 0
    rows = {r["tensor"]: r for r in read_manifest(out)[0].to_pylist()}
    assert (rows[tensor]["nan_count"], rows[tensor]["inf_count"]) == counts
    assert sum((r["nan_count"] or 0) + (r["inf_count"] or 0) for r in rows.values()) == sum(counts)
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "refused"), "--fail-on-nonfinite"]) == 2
    assert f"{counts[0]} NaN and {counts[1]} Inf in the output" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_nonfinite_inputs_are_counted_or_refused(tmp_path, capsys):
    """NaN/Inf in an input: counted per tensor in the manifest; with --fail-on-nonfinite, nothing is committed."""
    from safetensors.torch import load_file, save_file

    from chatvec_dist.cli import main
    from chatvec_dist.demo import make_demo_models
    from chatvec_dist.output.manifest import read_manifest

    models = make_demo_models(tmp_path / "m")
    tensors = load_file(models["chat"] / "model.safetensors")
    bad = tensors["model.layers.1.mlp.up_proj.weight"]
    bad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=bad.dtype)
    save_file(tensors, models["chat"] / "model.safetensors", metadata={"format": "pt"})
    argv = [
        "merge",
        "--base",
        str(models["base"]),
        "--chat",
        str(models["chat"]),
        "--cp",
        str(models["cp"]),
        "--backend",
        "local",
        "--no-progress",
    ]
    out = tmp_path / "counted"
    assert main([*argv, "--out", str(out)]) == 0
    rows = {r["tensor"]: r for r in read_manifest(out)[0].to_pylist()}
    assert (
        rows["model.layers.1.mlp.up_proj.weight"]["nan_count"],
        rows["model.layers.1.mlp.up_proj.weight"]["inf_count"],
    ) == (1, 2)
    assert sum(r["nan_count"] or 0 for r in rows.values()) == 1
    refused = tmp_path / "refused"
    capsys.readouterr()
    assert main([*argv, "--out", str(refused), "--fail-on-nonfinite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.layers.1.mlp.up_proj.weight" in err and "1 NaN and 2 Inf" in err
    assert not refused.exists()
