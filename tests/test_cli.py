"""The command line's conventions: help, version, one-line errors, exit statuses, empty paths, readable sizes."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import chatvec_dist
from chatvec_dist import job
from chatvec_dist.cli import main
from chatvec_dist.cli.parser import EXAMPLES, build_parser
from chatvec_dist.errors import RunError
from chatvec_dist.recipe.file import RecipeError, load_recipe
from chatvec_dist.recipe.spec import Recipe, RunOptions, Target, human_bytes


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    from chatvec_dist.demo import make_demo_models

    return make_demo_models(tmp_path_factory.mktemp("demo"))


def merge_argv(demo: dict[str, Path], out: str, *extra: str) -> list[str]:
    return [
        "merge",
        "--base",
        str(demo["base"]),
        "--chat",
        str(demo["chat"]),
        "--cp",
        str(demo["cp"]),
        "--out",
        out,
        "--backend",
        "local",
        "--no-progress",
        *extra,
    ]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chatvec: error: "), err
    return err[0]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


# --- help and version ----------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"chatvec {chatvec_dist.__version__}\n"


def test_every_option_and_positional_has_help_and_every_command_an_example():
    assert all(action.help for action in build_parser()._actions)
    for name, parser in subcommands().items():
        for action in parser._actions:
            assert action.help, (name, action.dest)
        assert parser.epilog.startswith("example") and all(f"chatvec {name}" in e for e in EXAMPLES[name][-1:]), name
        assert f"  {EXAMPLES[name][0]}" in parser.format_help()


def test_help_shows_the_dataclasses_defaults():
    merge = subcommands()["merge"]
    text = " ".join(merge.format_help().split())
    assert f"(default: {human_bytes(Recipe.max_shard_size)})" in text and "(default: 5 GB)" in text
    assert "(default: 64 MiB)" in text and f"(default: {RunOptions.backend})" in text
    args = merge.parse_args(["--base", "b", "--chat", "c", "--cp", "p", "--out", "o"])
    assert (args.max_shard_size, args.unit_size) == (Recipe.max_shard_size, Recipe.unit_bytes)
    assert (args.vocab, args.backend, args.device) == (Target.vocab, RunOptions.backend, RunOptions.device)


def test_top_level_help_lists_the_exit_statuses():
    text = build_parser().format_help()
    for code in (0, 1, 2, 3, 130, 141):
        assert f"\n  {code} " in text, code


def test_the_entry_point_module_runs():
    done = subprocess.run([sys.executable, "-m", "chatvec_dist.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == f"chatvec {chatvec_dist.__version__}\n"


def test_the_command_on_an_embedded_ray_leaves_it_and_exits_cleanly(demo, tmp_path):
    """The command's exit path (`entry`, which stops the Ray it started itself, not at Ray's exit hook): the
    merge committed, nothing printed after the run's line, the output verified."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "chatvec_dist", *merge_argv(demo, str(out), "--backend", "ray")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.match(r"[\d.]+ GB in .* on ray × \d+", done.stderr.strip().splitlines()[-1]), done.stderr
    assert main(["verify", str(out)]) == 0


# --- usage errors: one line and a hint, exit 2 -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,error,hint",
    [
        (["merge", "--base", "b"], "the following arguments are required: --chat, --cp, --out", "chatvec merge"),
        (["merg"], "argument COMMAND: invalid choice: 'merg'", "chatvec"),
        ([], "the following arguments are required: COMMAND", "chatvec"),
        (["plan", "--base", "b", "--chat", "c", "--cp", "p", "--unit-size", "lots"], "--unit-size", "chatvec plan"),
    ],
)
def test_usage_errors_are_one_line_and_a_hint(argv, error, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 2, err
    assert err[0].startswith("chatvec: error: ") and error in err[0]
    assert err[1] == f"run '{hint} --help' to see the options"


def test_alpha_count_error_says_what_to_give(demo, tmp_path, capsys):
    argv = merge_argv(demo, str(tmp_path / "o"), "--alpha", "0.5,1", "--alpha", "2")
    argv[1:1] = ["--base", str(demo["base"]), "--chat", str(demo["chat"])]  # two vectors, three alpha lists
    argv += ["--alpha", "3"]
    assert main(argv) == 2
    assert "--alpha: 3 values for 2 vectors: give one value (for every vector) or one per vector" in one_error_line(
        capsys
    )
    assert not (tmp_path / "o").exists()


def test_alphas_of_a_target_say_what_to_give():
    with pytest.raises(chatvec_dist.ChatvecError, match=r"alphas 'x': give numbers, one per vector .*alphas=\(0.5,\)"):
        Target("t", "cp", "o", "x")
    assert Target("t", "cp", "o", [0.5]).alphas == (0.5,)  # a list is the tuple it means


def test_one_alpha_rule_in_every_front_end(demo, tmp_path, capsys):
    """One value for every vector, or one per vector: the same rule and words from the CLI, API and a file."""
    rule = "3 values for 2 vectors: give one value (for every vector) or one per vector"
    two = {"base": ["b", "b2"], "chat": ["c", "c2"]}
    assert chatvec_dist.make_recipe(**two, cp="p", out="o", alpha=[0.5]).targets[0].alphas == (0.5, 0.5)
    with pytest.raises(chatvec_dist.ChatvecError, match=f"^alpha: {re.escape(rule)}"):
        chatvec_dist.make_recipe(**two, cp="p", out="o", alpha=[1, 2, 3])
    path = tmp_path / "r.yaml"
    text = "vectors: [{chat: c, base: b}, {chat: c2, base: b2}]\ntargets:\n  - {name: t, cp: p, out: o, alphas: %s}\n"
    path.write_text(text % "[0.5]")
    assert load_recipe(path).targets[0].alphas == (0.5, 0.5)
    path.write_text(text % "[1, 2, 3]")
    with pytest.raises(RecipeError, match=re.escape(f"{path}:3: field 'targets[0].alphas': {rule}")):
        load_recipe(path)
    argv = ["plan", "--base", "b", "--chat", "c", "--base", "b2", "--chat", "c2", "--cp", "p"]
    assert main([*argv, "--alpha", "1", "--alpha", "2", "--alpha", "3"]) == 2
    assert one_error_line(capsys) == f"chatvec: error: --alpha: {rule}"


# --- exit statuses ---------------------------------------------------------------------------------------------


def test_a_run_that_started_and_failed_exits_3(demo, tmp_path, monkeypatch, capsys):
    def stalled(recipe, options):
        raise RunError("the cluster stalled", file=str(tmp_path / "o"))

    monkeypatch.setattr(job, "run", stalled)  # no real failure raises RunError yet
    assert main(merge_argv(demo, str(tmp_path / "o"))) == 3
    assert one_error_line(capsys) == f"chatvec: error: {tmp_path / 'o'}: the cluster stalled"


# --- empty paths are errors, never the current folder ----------------------------------------------------------


def test_an_empty_base_is_an_error_not_the_current_folder(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(demo["base"])  # a checkpoint here: "" would have read it
    argv = merge_argv(demo, str(tmp_path / "o"))
    argv[argv.index("--base") + 1] = ""
    assert main(argv) == 2
    assert "base is empty: give a checkpoint folder or a Hub id" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cps", [1, 2])
def test_an_empty_out_never_replaces_the_current_folder(demo, tmp_path, monkeypatch, capsys, cps):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    argv = merge_argv(demo, "", "--overwrite")
    if cps == 2:
        argv += ["--cp", f"other={demo['cp']}"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert ("out is empty: give an output folder" if cps == 1 else "no output root") in line, line
    assert sorted(os.listdir(work)) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["work"]


def test_an_empty_path_in_a_recipe_file_names_its_field_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("vectors:\n  - chat: c\n    base: ''\ntargets:\n  - {name: t, cp: c, out: o}\n")
    with pytest.raises(RecipeError, match=rf"{path}:3: field 'vectors\[0\].base': base is empty"):
        load_recipe(path)
    path.write_text("vectors:\n  - chat: c\n    base: b\ntargets:\n  - name: t\n    cp: c\n    out: ''\n")
    with pytest.raises(RecipeError, match=rf"{path}:7: field 'targets\[0\].out': out is empty"):
        load_recipe(path)


def test_an_empty_path_in_the_api_names_its_field(tmp_path):
    with pytest.raises(chatvec_dist.ChatvecError, match="out is empty"):
        chatvec_dist.make_recipe("b", "c", "cp", "")
    with pytest.raises(chatvec_dist.ChatvecError, match="no output root"):
        chatvec_dist.make_recipe("b", "c", {"zh": "cp"}, "")
    with pytest.raises(chatvec_dist.ChatvecError, match="chat is empty"):
        chatvec_dist.make_recipe("b", "", "cp", "o")


def test_a_recipe_planned_without_outputs_is_not_run(demo):
    recipe = Recipe(
        (chatvec_dist.Vector(str(demo["chat"]), str(demo["base"])),), (Target("t", str(demo["cp"]), None, (1.0,)),)
    )
    assert chatvec_dist.plan(recipe).targets[0].target.out is None
    with pytest.raises(chatvec_dist.ChatvecError, match="target 't': no output folder"):
        chatvec_dist.run(recipe, RunOptions(backend="local", progress=False))


# --- readable output -------------------------------------------------------------------------------------------


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1, 999, 12_345_678, 1_500_000_000, 999_960)] == [
        "0 B",
        "1 B",
        "999 B",
        "12.3 MB",
        "1.5 GB",
        "1 MB",
    ]
    assert [human_bytes(n, binary=True) for n in (16 * 1024, 64 * 2**20, 1536)] == ["16 KiB", "64 MiB", "1.5 KiB"]


def test_plan_prints_readable_sizes_and_counts(demo, capsys):
    argv = ["plan", "--base", str(demo["base"]), "--chat", str(demo["chat"]), "--cp", str(demo["cp"])]
    assert main([*argv, "--unit-size", "16KiB"]) == 0
    first, target = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("merge: 1 vector, 1 target; ") and first.endswith(" units of up to 16 KiB"), first
    assert " KB read, " in first and " KB written; " in first and "GB" not in first, first
    assert target.endswith(", 1 shard"), target
    assert main([*argv, "--unit-size", "1MiB"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("; 1 unit of up to 1 MiB")


def test_inspect_lists_tensors_by_name_and_plots_whole_layers(demo, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from chatvec_dist.output.inspection import figure
    from chatvec_dist.output.manifest import read_manifest

    chat = tmp_path / "chat"
    shutil.copytree(demo["chat"], chat)
    tensors = load_file(chat / "model.safetensors")
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):  # in two shards
        tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, chat / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    assert main(merge_argv(dict(demo, chat=chat), str(out), "--vocab", "overlap")) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert (
        "non-finite values: model.layers.0.input_layernorm.weight (1 NaN, 0 Inf), "
        "model.layers.1.mlp.up_proj.weight (1 NaN, 0 Inf)" in text
    )
    assert "vocabulary: lm_head.weight " in text and " KB\n" in text.splitlines()[0] + "\n"
    ticks = figure(out).axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
    rows = [r["tensor"] for r in read_manifest(out)[0].to_pylist()]  # the manifest's order is the layout's
    assert rows.index("model.layers.1.mlp.up_proj.weight") < rows.index("model.layers.0.input_layernorm.weight")
