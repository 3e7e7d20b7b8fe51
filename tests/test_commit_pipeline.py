"""A batch's commits: the next output's manifest is built while the last one's files are written, yet the outputs
commit one after the other, and a failed commit stops the later ones (its error the one reported)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from chatvec_dist import job
from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.errors import OutputError, VerifyError
from chatvec_dist.output.manifest import Tally
from chatvec_dist.output.verify import verify
from chatvec_dist.output.workarea import partial_path

RUN = ["--backend", "local", "--workers", "1", "--no-progress"]
ALPHAS = ["alpha0.5", "alpha1", "alpha2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_demo_models(tmp_path_factory.mktemp("pipeline") / "models")


def batch_argv(models: dict[str, Path], out: Path) -> list[str]:
    paths = ["--base", str(models["base"]), "--chat", str(models["chat"]), "--cp", str(models["cp"])]
    return ["merge", *paths, "--out", str(out), "--alpha", "0.5,1,2", *RUN]


def test_the_next_manifest_is_built_while_the_last_output_is_written(models, tmp_path, monkeypatch):
    events: list[str] = []
    tabled = [threading.Event() for _ in ALPHAS]
    real_table, real_commit = Tally.table, job.commit

    def table(self, target, metadata):
        events.append(f"table {target}")
        tabled[ALPHAS.index(target)].set()
        return real_table(self, target, metadata)

    def commit(work, out, *args):
        i = ALPHAS.index(out.name)
        if i + 1 < len(ALPHAS):  # waits for the next manifest: one after the other, this would time out
            assert tabled[i + 1].wait(timeout=60), f"{out.name}: the next manifest was not built meanwhile"
        events.append(f"commit {out.name}")
        real_commit(work, out, *args)
        events.append(f"committed {out.name}")

    monkeypatch.setattr(Tally, "table", table)
    monkeypatch.setattr(job, "commit", commit)
    assert main(batch_argv(models, tmp_path / "v")) == 0
    commits = [e for e in events if not e.startswith("table")]
    assert commits == [f"{kind} {name}" for name in ALPHAS for kind in ("commit", "committed")]  # in turn
    assert events.index("table alpha1") < events.index("committed alpha0.5")
    assert all(verify(tmp_path / "v" / name) == [] for name in ALPHAS)


def test_a_failed_commit_stops_the_later_ones_and_is_the_error_reported(models, tmp_path, monkeypatch, capsys):
    real_table, real_commit, called = Tally.table, job.commit, []

    def table(self, target, metadata):
        if target == "alpha2":  # fails too, after the failing commit began: the commit's error comes first
            started.wait(timeout=60)
            raise VerifyError("internal: the third manifest", tensor="x")
        return real_table(self, target, metadata)

    started = threading.Event()

    def commit(work, out, *args):
        called.append(out.name)
        if out.name == "alpha1":
            started.set()
            raise OutputError("commit failed (No space left on device)", file=str(work))
        real_commit(work, out, *args)

    monkeypatch.setattr(Tally, "table", table)
    monkeypatch.setattr(job, "commit", commit)
    root = tmp_path / "v"
    assert main(batch_argv(models, root)) == 2
    err = capsys.readouterr().err
    assert "commit failed (No space left on device)" in err and "third manifest" not in err
    assert called == ["alpha0.5", "alpha1"]  # the third never written
    assert verify(root / "alpha0.5") == []
    assert not (root / "alpha1").exists() and not (root / "alpha2").exists()
    assert partial_path(root / "alpha1").is_dir() and partial_path(root / "alpha2").is_dir()  # resumable
