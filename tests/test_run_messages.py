"""What a run says: broken side files before any work, an escaped output name, nothing claimed as written twice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chatvec_dist.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    from chatvec_dist.demo import make_demo_models

    return make_demo_models(tmp_path_factory.mktemp("demo"))


def merge_argv(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "merge",
        *("--base", str(models["base"]), "--chat", str(models["chat"]), "--cp", str(models["cp"])),
        *("--out", str(out), "--backend", "local", "--no-progress", "--unit-size", "16KiB", *extra),
    ]


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_a_broken_chat_json_stops_the_job_before_any_work(demo, tmp_path, capsys, name):
    """--chat-template-from-chat reads the chat model's JSON files: a broken one was found at the commit, after all
    the work (and on every rerun); now before the first unit, naming the file."""
    chat = tmp_path / "chat"
    shutil.copytree(demo["chat"], chat)
    (chat / name).write_text("{not json")
    out = tmp_path / "out"
    assert main(merge_argv(dict(demo, chat=chat), out, "--chat-template-from-chat")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"chatvec: error: {chat / name}: not readable JSON (JSONDecodeError)"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat"]  # no work area, no lock


def test_a_broken_cp_config_stops_the_job_before_any_work(demo, tmp_path, capsys):
    cp = tmp_path / "cp"
    shutil.copytree(demo["cp"], cp)
    (cp / "config.json").write_text("[1, 2]")
    assert main(merge_argv(dict(demo, cp=cp), tmp_path / "out")) == 2
    assert capsys.readouterr().err.strip() == f"chatvec: error: {cp / 'config.json'}: not a JSON object"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cp"]


def test_a_rerun_of_a_committed_job_says_nothing_was_written(demo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(merge_argv(demo, out)) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert main(merge_argv(demo, out)) == 0
    assert capsys.readouterr().out.strip() == f"kept {out} (already committed; nothing written)"


def test_the_output_name_is_printed_escaped(demo, tmp_path, capsys):
    out = tmp_path / "a\x1b[31mred"
    assert main(merge_argv(demo, out)) == 0
    printed = capsys.readouterr().out.strip()
    assert "\x1b" not in printed and printed == f"wrote {tmp_path}/a\\x1b[31mred"
    assert out.is_dir()


def test_a_cp_shard_rewritten_in_place_during_the_run_is_not_committed(demo, tmp_path, monkeypatch, capsys):
    """The same bytes written back over a CP shard (same size) while units run: it may be a mix of two versions,
    so nothing is committed (it was, with exit 0, and verify passed); exit 3, naming the file."""
    from chatvec_dist.exec import worker

    cp = tmp_path / "cp"
    shutil.copytree(demo["cp"], cp)
    shard = sorted(cp.glob("*.safetensors"))[0]
    real_run, seen = worker.UnitRunner.run, []

    def rewrite_after_the_first_unit(self, unit):
        result = real_run(self, unit)
        if not seen:
            seen.append(unit.id)
            shard.write_bytes(shard.read_bytes())  # same size, new mtime and ctime
        return result

    monkeypatch.setattr(worker.UnitRunner, "run", rewrite_after_the_first_unit)
    out = tmp_path / "out"
    assert main(merge_argv(dict(demo, cp=cp), out, "--workers", "1")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"chatvec: error: {shard}: changed during the run (mtime): nothing was committed, and the finished units "
        "may hold its old bytes; run again with --restart"
    ), err
    assert not out.exists() and Path(f"{out}.partial").is_dir()
    monkeypatch.undo()
    assert main(merge_argv(dict(demo, cp=cp), out, "--restart")) == 0 and out.is_dir()
