"""The commit's edges: an output that is a link to nothing, a crash inside --overwrite's two renames, a full disk
while side files are copied: one line naming the path, and what is left on disk is resumable."""

from __future__ import annotations

import errno
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chatvec_dist import job
from chatvec_dist.api import make_recipe
from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.errors import RunError
from chatvec_dist.output import commit as commit_module
from chatvec_dist.output.digests import DIGESTS_NAME
from chatvec_dist.output.manifest import MANIFEST_NAME, read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.output.workarea import JOURNAL_NAME
from chatvec_dist.recipe.spec import RunOptions

RUN = ["--backend", "local", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_demo_models(tmp_path_factory.mktemp("commit") / "models")


def merge_argv(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["merge", "--base", str(models["base"]), "--chat", str(models["chat"]), "--cp", str(models["cp"])] + [
        "--out",
        str(out),
        *RUN,
        *extra,
    ]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("chatvec: warning: restored")]
    assert len(err) == 1 and err[0].startswith("chatvec: error: "), err
    return err[0]


def alphas(out: Path) -> list[float]:
    return read_manifest(out)[1]["recipe"]["targets"][0]["alphas"]


def test_an_output_that_is_a_link_to_nothing_is_refused_before_any_work(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    for extra in ([], ["--overwrite"]):
        assert main(merge_argv(models, out, *extra)) == 2
        line = one_error_line(capsys)
        assert (
            line
            == f"chatvec: error: {out}: output is a symbolic link to nothing ({tmp_path / 'gone'}): remove it, or name a folder"
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and out.is_symlink()  # no work area, no lock


def crash_between_the_overwrite_renames(monkeypatch) -> None:
    """The old output is moved aside, then the work area's rename into place fails (as a crash would stop it)."""
    real = Path.rename

    def rename(self: Path, target):
        if self.name.endswith(".partial"):
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_a_crash_between_the_overwrite_renames_is_recovered(models, tmp_path, monkeypatch, capsys):
    """The old output is back at OUT on the next run (no longer hidden as .OUT.replaced); without --overwrite that
    run stops there, with it the resumed commit replaces it as asked."""
    out = tmp_path / "out"
    assert main(merge_argv(models, out, "--alpha", "0.5")) == 0
    argv = merge_argv(models, out, "--alpha", "1", "--overwrite")
    capsys.readouterr()
    with monkeypatch.context() as m:
        crash_between_the_overwrite_renames(m)
        assert main(argv) == 3  # a failed run
    assert "commit failed (Input/output error)" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.replaced", "out.partial"]

    assert main(argv[:-1]) == 2  # the same command without --overwrite: the old output is put back, and kept
    err = capsys.readouterr().err
    assert f"chatvec: warning: restored {out} from .out.replaced, where an interrupted --overwrite had moved it" in err
    assert f"chatvec: error: {out}: output exists (pass --overwrite to replace it)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]
    assert alphas(out) == [0.5] and verify(out) == []

    assert main(argv) == 0  # with it: resumed, and the old output replaced
    assert "resuming: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert alphas(out) == [1.0] and verify(out) == []


def test_the_same_command_completes_an_interrupted_overwrite(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(merge_argv(models, out, "--alpha", "0.5")) == 0
    argv = merge_argv(models, out, "--alpha", "1", "--overwrite")
    with monkeypatch.context() as m:
        crash_between_the_overwrite_renames(m)
        assert main(argv) == 3  # a failed run
    capsys.readouterr()
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert alphas(out) == [1.0] and verify(out) == []


def test_disk_full_while_copying_side_files_names_the_output_file(models, tmp_path):
    """RLIMIT_FSIZE below a side file's size (shards of 40 kB fit): the copy into the work area fails, named by
    its output path (it named CP's file); a run that failed, resumable once space is freed."""
    cp = tmp_path / "cp"
    shutil.copytree(models["cp"], cp)
    (cp / "tokenizer.json").write_text(json.dumps({"vocab": ["x" * 60] * 1000}))  # ~64 kB
    out = tmp_path / "out"
    argv = merge_argv(dict(models, cp=cp), out, "--max-shard-size", "40KB")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run(
        [sys.executable, "-m", "chatvec_dist.cli", *argv], capture_output=True, text=True, timeout=120, preexec_fn=limit
    )
    assert proc.returncode == 3, proc.stderr  # a failed run
    lines = [line for line in proc.stderr.splitlines() if line.startswith("chatvec: error: ")]
    work = tmp_path / "out.partial"
    assert lines == [
        f"chatvec: error: {work / 'tokenizer.json'}: commit failed (File too large); fix the cause and run the same "
        "command again"
    ], proc.stderr
    assert not out.exists() and (work / JOURNAL_NAME).stat().st_size > 0
    assert main(argv) == 0 and verify(out) == []
    assert (out / "tokenizer.json").read_bytes() == (cp / "tokenizer.json").read_bytes()


def test_an_oserror_during_the_commit_is_a_run_error(models, tmp_path, monkeypatch):
    """Not bad input: the run failed on the way (RunError), naming the output file being written."""
    out = tmp_path / "out"

    def disk_full(table, path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(commit_module, "write_manifest", disk_full)
    recipe = make_recipe(models["base"], models["chat"], models["cp"], out)
    options = RunOptions(backend="local", workers=1, progress=False)
    with pytest.raises(RunError) as e:
        job.run(recipe, options)
    assert str(e.value) == (
        f"{tmp_path / 'out.partial' / MANIFEST_NAME}: commit failed (No space left on device); fix the cause and "
        "run the same command again"
    )
    assert not out.exists()
    monkeypatch.undo()
    job.run(recipe, options)
    assert verify(out) == [] and (out / DIGESTS_NAME).is_file()
