"""Batches: many targets and alpha sweeps in one pass, recipe files, the audit view, the Python API."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_e2e import expected_weights, load_all, logits, shard_bytes

import chatvec_dist
from chatvec_dist import job
from chatvec_dist.cli import main
from chatvec_dist.cli.args import recipe_from_args
from chatvec_dist.cli.parser import build_parser
from chatvec_dist.kernels.reference import reference
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.recipe.file import RecipeError, load_recipe


@pytest.fixture(scope="module")
def batch(llamas, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch") / "root"
    assert (
        main(
            [
                "merge",
                "--base",
                str(llamas["base"]),
                "--chat",
                str(llamas["chat"]),
                "--cp",
                f"zh={llamas['cp']}",
                "--cp",
                f"ko={llamas['cp_ext']}",
                "--alpha",
                "0.5,1.0",
                "--vocab",
                "overlap",
                "--out",
                str(root),
                "--backend",
                "local",
                "--unit-size",
                "4KiB",
                "--no-progress",
            ]
        )
        == 0
    )
    return root


def test_one_output_per_target_and_alpha(llamas, batch):
    assert sorted(p.name for p in batch.iterdir()) == ["ko-alpha0.5", "ko-alpha1", "zh-alpha0.5", "zh-alpha1"]
    for name, cp, alpha in (
        ("zh-alpha0.5", "cp", 0.5),
        ("zh-alpha1", "cp", 1.0),
        ("ko-alpha0.5", "cp_ext", 0.5),
        ("ko-alpha1", "cp_ext", 1.0),
    ):
        out = batch / name
        expected = expected_weights(llamas, cp, merge_rows=True, alpha=alpha)
        got = load_all(out)
        assert set(got) == set(expected)
        for tensor, t in expected.items():
            assert torch.equal(got[tensor].view(torch.int16), t.view(torch.int16)), (name, tensor)
        table, meta = read_manifest(out)
        assert meta["target"] == name and table.column("target").to_pylist() == [name] * table.num_rows
        assert [t["name"] for t in meta["recipe"]["targets"]] == [
            "zh-alpha0.5",
            "zh-alpha1",
            "ko-alpha0.5",
            "ko-alpha1",
        ]
        assert verify(out) == [] and (out / "README.md").is_file() and (out / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(batch / "ko-alpha1"), logits(llamas["cp_ext"], expected_weights(llamas, "cp_ext", True)))


def test_batch_equals_separate_runs(llamas, batch, tmp_path):
    single = tmp_path / "single"
    assert (
        main(
            [
                "merge",
                "--base",
                str(llamas["base"]),
                "--chat",
                str(llamas["chat"]),
                "--cp",
                str(llamas["cp_ext"]),
                "--alpha",
                "0.5",
                "--vocab",
                "overlap",
                "--out",
                str(single),
                "--backend",
                "local",
                "--unit-size",
                "4KiB",
                "--no-progress",
            ]
        )
        == 0
    )
    assert shard_bytes(single) == shard_bytes(batch / "ko-alpha0.5")


def test_batch_reads_base_and_chat_once(llamas):
    """N outputs cost base + chat + each distinct CP once, not 4N model-sized transfers."""

    def planned(*extra: str):
        args = build_parser().parse_args(["plan", "--base", str(llamas["base"]), "--chat", str(llamas["chat"]), *extra])
        return job.plan(recipe_from_args(args))

    def read_bytes(p) -> int:
        return sum(job.unit_io_bytes(u, p) for u in p.units) - sum(
            x.nbytes for tp in p.targets for x in tp.layout.tensors
        )

    size = {n: sum(f.stat().st_size for f in llamas[n].glob("*.safetensors")) for n in ("base", "chat", "cp", "cp_ext")}
    both = planned(
        "--cp", f"zh={llamas['cp']}", "--cp", f"ko={llamas['cp_ext']}", "--alpha", "0.5,1.0", "--vocab", "overlap"
    )
    headers = 4 * 4 * 2048  # rough upper bound on header bytes not counted as tensor data
    expected = size["base"] + size["chat"] + size["cp"] + size["cp_ext"]
    assert expected - headers < read_bytes(both) <= expected
    separate = sum(
        read_bytes(planned("--cp", str(llamas[c]), "--alpha", a, "--vocab", "overlap"))
        for c in ("cp", "cp_ext")
        for a in ("0.5", "1.0")
    )
    assert separate > 2.4 * read_bytes(both)


def test_unnamed_cps_in_a_sweep_get_outputs_of_their_own(llamas, tmp_path):
    args = build_parser().parse_args(
        [
            "merge",
            "--base",
            "b",
            "--chat",
            "c",
            "--cp",
            str(llamas["cp"]),
            "--cp",
            str(llamas["cp_ext"]),
            "--alpha",
            "0.5,1",
            "--out",
            str(tmp_path),
        ]
    )
    outs = [Path(t.out).name for t in recipe_from_args(args).targets]
    assert outs == ["cp-alpha0.5", "cp-alpha1", "cp_ext-alpha0.5", "cp_ext-alpha1"]
    args = build_parser().parse_args(
        ["merge", "--base", "b", "--chat", "c", "--cp", "org/m@v1", "--cp", "org/m@v2", "--out", str(tmp_path)]
    )
    assert [Path(t.out).name for t in recipe_from_args(args).targets] == ["m@v1", "m@v2"]  # revisions apart


def test_an_extracted_vector_from_a_recipe_says_float32_in_its_config(llamas, tmp_path):
    """A recipe's extraction target with `dtype: null` writes float32 tensors; config.json must say so too."""
    from chatvec_dist.recipe.spec import Recipe, Target, Vector

    out = tmp_path / "vec"
    recipe = Recipe((Vector(str(llamas["chat"]), str(llamas["base"])),), (Target("vec", None, str(out), (1.0,)),))
    chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend="local", progress=False))
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert {t.dtype for t in load_all(out).values()} == {torch.float32}


def test_print_recipe_then_run_gives_the_same_output(llamas, tmp_path, capsys):
    out = tmp_path / "viarecipe"
    args = [
        "merge",
        "--base",
        str(llamas["base"]),
        "--chat",
        str(llamas["chat"]),
        "--cp",
        str(llamas["cp"]),
        "--out",
        str(out),
        "--unit-size",
        "4KiB",
        "--exclude",
        "norm",
    ]
    assert main([*args, "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and text.startswith("# chatvec recipe")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(text)
    recipe = load_recipe(recipe_file)
    assert recipe.targets[0].exclude == ("norm",) and recipe.unit_bytes == 4096
    assert main(["run", str(recipe_file), "--backend", "local", "--no-progress"]) == 0
    direct = tmp_path / "direct"
    assert (
        main(
            [
                *args[:-4],
                "--out",
                str(direct),
                "--unit-size",
                "4KiB",
                "--exclude",
                "norm",
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 0
    )
    assert shard_bytes(out) == shard_bytes(direct)
    capsys.readouterr()
    assert main(["inspect", str(out), "--recipe"]) == 0
    assert load_recipe_text(tmp_path, capsys.readouterr().out) == recipe


def test_a_stored_recipe_runs_again_from_any_folder(llamas, tmp_path, monkeypatch, capsys):
    """Relative paths typed in one folder: `inspect --recipe` gives them absolute, and run from elsewhere it is the
    same job (already committed: nothing to do; --restart: the same bytes again)."""
    work = tmp_path / "work"
    shutil.copytree(llamas["cp"], work / "models" / "cp")
    monkeypatch.chdir(work)
    assert (
        main(
            [
                "merge",
                "--base",
                str(llamas["base"]),
                "--chat",
                str(llamas["chat"]),
                "--cp",
                "models/cp",
                "--out",
                "out",
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", "out", "--recipe"]) == 0
    recipe = load_recipe_text(tmp_path, capsys.readouterr().out)
    assert recipe.targets[0].cp == str(work / "models" / "cp") and recipe.targets[0].out == str(work / "out")
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(tmp_path / "again.yaml"), "--backend", "local", "--no-progress"]) == 0
    assert "already committed by an earlier run of this job" in capsys.readouterr().err
    before = shard_bytes(work / "out")
    assert main(["run", str(tmp_path / "again.yaml"), "--backend", "local", "--no-progress", "--restart"]) == 0
    assert shard_bytes(work / "out") == before and verify(work / "out") == []


def test_a_stored_recipe_keeps_each_source_what_it_was(llamas, tmp_path, monkeypatch, capsys):
    """`inspect --recipe` after the inputs' folder moved: the local source keeps its recorded absolute path (it
    was printed relative, and `run` would have read `models/cp` as a Hub repo id)."""
    work = tmp_path / "work"
    shutil.copytree(llamas["cp"], work / "models" / "cp")
    monkeypatch.chdir(work)
    assert (
        main(
            [
                "merge",
                "--base",
                str(llamas["base"]),
                "--chat",
                str(llamas["chat"]),
                "--cp",
                "models/cp",
                "--out",
                "out",
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 0
    )
    (work / "models").rename(work / "moved")
    capsys.readouterr()
    assert main(["inspect", "out", "--recipe"]) == 0
    recipe = load_recipe_text(tmp_path, capsys.readouterr().out)
    assert recipe.targets[0].cp == str((work / "models" / "cp").resolve())


def load_recipe_text(tmp_path: Path, text: str):
    path = tmp_path / "again.yaml"
    path.write_text(text)
    return load_recipe(path)


@pytest.mark.parametrize(
    "text,field,line",
    [
        ("vectors: []\ntargets: []\n", "vectors", 1),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - name: t\n    cp: c\n    out: o\n    alpha: 2\n",
            "targets[0].alpha",
            8,
        ),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - name: t\n    cp: c\n    out: o\n    alphas: [1, 2]\n",
            "targets[0].alphas",
            8,
        ),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - name: t\n    cp: c\n    out: o\n    vocab: most\n",
            "targets[0].vocab",
            8,
        ),
        ("vectors:\n  - chat: 3\n    base: b\ntargets: []\n", "vectors[0].chat", 2),
        ("vectors:\n  - chat: c\n    base: b\ntargets:\n  - name: t\n    out: o\n", "targets[0].cp", 5),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - {name: t, cp: c, out: o}\nunit_bytes: lots\n",
            "unit_bytes",
            6,
        ),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - {name: t, cp: c, out: o}\nunit_bytes: 3\n",
            "unit_bytes",
            6,
        ),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - {name: t, cp: c, out: o}\nmax_shard_size: -5\n",
            "max_shard_size",
            6,
        ),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - {name: t, cp: c, out: o, alphas: .nan}\n",
            "targets[0].alphas",
            5,
        ),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - {name: t, cp: c, out: o, alphas: [x]}\n",
            "targets[0].alphas",
            5,
        ),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - name: t\n    cp: c\n    out: o\n    out: p\n",
            "targets[0].out",
            8,
        ),
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - {name: t, cp: c, out: o, alphas: [1"
            + "0" * 400
            + "]}\n",
            "targets[0].alphas",
            5,
        ),  # an integer beyond any float: was an OverflowError traceback
        # a "billion laughs" of aliases where one regex goes: refused unbuilt (it was built: memory exhausted)
        (
            "vectors:\n  - chat: c\n    base: b\ntargets:\n  - name: t\n    cp: c\n    out: o\n    exclude:\n    - ["
            + ", ".join(
                f"&{k} [{', '.join([f'*{p}' if p else 'x'] * 9)}]" for p, k in zip(["", *"abcdefgh"], "abcdefghi")
            )
            + "]\n",
            "targets[0].exclude",
            9,
        ),
    ],
)
def test_recipe_errors_name_field_and_line(tmp_path, text, field, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert f"{path}:{line}" in str(e.value) and f"'{field}'" in str(e.value)


def test_a_recipe_nested_too_deeply_is_a_one_line_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(path)


def test_recipe_alphas_in_yaml_1_1_exponent_form_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("vectors:\n  - chat: c\n    base: b\ntargets:\n  - {name: t, cp: c, out: o, alphas: [1e-1]}\n")
    assert load_recipe(path).targets[0].alphas == (0.1,)


def test_two_targets_with_one_output_are_named(llamas, tmp_path):
    from chatvec_dist.errors import OutputError
    from chatvec_dist.recipe.spec import Recipe, Target, Vector

    out = str(tmp_path / "same")
    recipe = Recipe(
        (Vector(str(llamas["chat"]), str(llamas["base"])),),
        (Target("zh", str(llamas["cp"]), out, (1.0,)), Target("ko", str(llamas["cp"]), out + "/.", (0.5,))),
    )
    with pytest.raises(OutputError, match=r"targets 'zh' and 'ko' both write"):
        chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend="local", progress=False))
    assert not (tmp_path / "same").exists()


def test_apply_refuses_a_merged_model_as_its_vector(llamas, batch, tmp_path, capsys):
    out = tmp_path / "applied"
    assert (
        main(
            [
                "apply",
                "--vector",
                str(batch / "zh-alpha0.5"),
                "--cp",
                str(llamas["cp"]),
                "--out",
                str(out),
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{batch / 'zh-alpha0.5'}: a chatvec merge output, not a chat vector" in err and not out.exists()


def test_a_recipe_mixing_extract_and_merge_labels_each_output_by_what_it_is(llamas, tmp_path, capsys):
    """The merged model of a recipe that also extracts is a merge output (apply refuses it as a vector); the
    extracted vector is an extract output."""
    from chatvec_dist.recipe.spec import Recipe, Target, Vector

    recipe = Recipe(
        (Vector(str(llamas["chat"]), str(llamas["base"])),),
        (
            Target("vec", None, str(tmp_path / "vec"), (1.0,)),
            Target("model", str(llamas["cp"]), str(tmp_path / "model"), (1.0,)),
        ),
    )
    chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend="local", progress=False))
    assert [read_manifest(tmp_path / n)[1]["kind"] for n in ("vec", "model")] == ["extract", "merge"]
    assert (
        main(
            [
                "apply",
                "--vector",
                str(tmp_path / "model"),
                "--cp",
                str(llamas["cp"]),
                "--out",
                str(tmp_path / "wrong"),
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "a chatvec merge output, not a chat vector" in capsys.readouterr().err and not (tmp_path / "wrong").exists()


def test_plan_into_a_closed_pipe_is_a_quiet_exit(llamas):
    """`chatvec plan ... | head`: the reader closed the pipe; no traceback, the shell's SIGPIPE status."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as for most users
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatvec_dist.cli",
            "plan",
            "--base",
            str(llamas["base"]),
            "--chat",
            str(llamas["chat"]),
            "--cp",
            str(llamas["cp"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # before the child has imported anything: its first print meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_recipe_yaml_syntax_error_is_a_clean_exit(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("vectors: [\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 2" in err and len(err.strip().splitlines()) == 1


def test_inspect_flags_an_outlier_and_plots(llamas, batch, tmp_path, capsys):
    chat = tmp_path / "chat"
    tensors = load_all(llamas["chat"])
    tensors["model.layers.1.mlp.up_proj.weight"] = (
        tensors["model.layers.1.mlp.up_proj.weight"].float() * 40
    ).bfloat16()
    from safetensors.torch import save_file

    chat.mkdir()
    save_file(tensors, chat / "model.safetensors", metadata={"format": "pt"})
    (chat / "config.json").write_text((llamas["chat"] / "config.json").read_text())
    out = tmp_path / "odd"
    assert (
        main(
            [
                "merge",
                "--base",
                str(llamas["base"]),
                "--chat",
                str(chat),
                "--cp",
                str(llamas["cp"]),
                "--out",
                str(out),
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "unusual: model.layers.1.mlp.up_proj.weight" in text
    assert "layer   0" in text and "layer   1" in text and "2 × merge (vocab:full)" in text
    assert main(["inspect", str(batch / "zh-alpha1")]) == 0
    assert "unusual: nothing" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    assert main(["inspect", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_and_inspect_show_hostile_names_as_text(tmp_path, capsys):
    """Names from checkpoints and outputs reach the card and the terminal as text: a tensor name cannot close its
    code span or split the table, a target name cannot send terminal escapes; a NaN update does not top the table."""
    from safetensors.torch import save_file

    hostile = "w` | <img src=x onerror=alert(1)> [click](javascript:alert(1)) | `x"

    def checkpoint(name: str, **values: float) -> Path:
        (tmp_path / name).mkdir()
        tensors = {
            hostile: torch.full((4,), values["h"]),
            "small": torch.full((4,), 1.0),
            "bad": torch.full((4,), values["b"]),
        }
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        return tmp_path / name

    base, chat = checkpoint("base", h=0.0, b=0.0), checkpoint("chat", h=1.0, b=float("nan"))
    cp = checkpoint("cp", h=1.0, b=1.0)
    from chatvec_dist.recipe.spec import Recipe, Target, Vector

    out = tmp_path / "o"
    recipe = Recipe((Vector(str(chat), str(base)),), (Target("x\x1b]0;pwned\x07\x1b[2J", str(cp), str(out), (1.0,)),))
    chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend="local", progress=False))
    card = (out / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ``")]
    assert rows and rows[0].startswith("| ``w` \\| <img") and rows[0].count(" | ") == 2  # three cells, pipes escaped
    assert "Tensors holding NaN or Inf: 1." in card and "`bad`" not in card.split("## Largest")[1]
    assert "\x1b" not in card
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\\x1b]0;pwned" in shown


def test_inspect_and_plan_write_errors_are_one_line(llamas, batch, tmp_path, capsys):
    out = batch / "zh-alpha0.5"
    for argv in (
        ["inspect", str(out), "--plot", str(tmp_path / "no" / "x.png")],
        ["inspect", str(out), "--plot", str(tmp_path / "x.xyz")],
        [
            "plan",
            "--base",
            str(llamas["base"]),
            "--chat",
            str(llamas["chat"]),
            "--cp",
            str(llamas["cp"]),
            "--save",
            str(tmp_path / "no" / "p.parquet"),
        ],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("chatvec: error: "), err
    with pytest.raises(SystemExit):
        main(["inspect", str(out), "--recipe", "--plot", "x.png"])  # one or the other (the plot was skipped)
    capsys.readouterr()
    assert main(["inspect", str(out), "--plot", str(tmp_path / "layers")]) == 0
    assert f"wrote {tmp_path / 'layers.png'}" in capsys.readouterr().out and (tmp_path / "layers.png").is_file()


def test_python_api(llamas, tmp_path):
    opts = chatvec_dist.RunOptions(backend="local", progress=False)
    outs = chatvec_dist.merge(
        str(llamas["base"]),
        str(llamas["chat"]),
        {"zh": str(llamas["cp"])},
        str(tmp_path / "api"),
        alpha=0.5,
        options=opts,
        unit_bytes=4096,
    )
    assert outs == [tmp_path / "api" / "zh"]
    assert chatvec_dist.verify(outs[0]) == []
    recipe = chatvec_dist.make_recipe(str(llamas["base"]), str(llamas["chat"]), str(llamas["cp"]), "unused", 0.5)
    planned = chatvec_dist.plan(recipe)
    assert len(planned.targets) == 1 and planned.targets[0].target.alphas == (0.5,)
    expected = expected_weights(llamas, "cp", alpha=0.5)
    got = load_all(outs[0])
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    recipe = chatvec_dist.make_recipe("b", "c", "cp", "o", chat_template_from_chat=True)
    assert recipe.chat_template_from_chat
    with pytest.raises(chatvec_dist.ChatvecError, match="alpha 'abc': give a number"):
        chatvec_dist.make_recipe("b", "c", "cp", "o", alpha="abc")
    with pytest.raises(chatvec_dist.ChatvecError, match="backend 'Ray': choose ray or local"):
        chatvec_dist.RunOptions(backend="Ray")


def test_python_api_takes_paths_and_refuses_misuse_before_any_work(llamas, tmp_path):
    """pathlib.Path works wherever a path goes (it failed at the commit, after all the work); a single exclude
    regex is one pattern, not its letters; wrong types are one ChatvecError before anything is read or written."""
    import numpy as np

    out = chatvec_dist.merge(
        llamas["base"],
        llamas["chat"],
        llamas["cp"],
        tmp_path / "out",
        np.float32(0.5),
        exclude="lm_head",
        options=chatvec_dist.RunOptions(backend="local", progress=False),
    )
    rows = {r["tensor"]: r for r in read_manifest(out[0])[0].to_pylist()}
    assert {n for n, r in rows.items() if r["reason"] == "excluded"} == {"lm_head.weight"}
    assert verify(out[0]) == [] and out == [tmp_path / "out"]
    misuse = [
        lambda: chatvec_dist.make_recipe([str(llamas["base"])] * 2, [str(llamas["chat"])], str(llamas["cp"]), "o"),
        lambda: chatvec_dist.make_recipe(llamas["base"], llamas["chat"], llamas["cp"], "o", unit_bytes="64MiB"),
        lambda: chatvec_dist.make_recipe(llamas["base"], llamas["chat"], {"../x": llamas["cp"]}, "o"),
        lambda: chatvec_dist.make_recipe(
            llamas["base"], llamas["chat"], llamas["cp"], "o", chat_template_from_chat="no"
        ),
        lambda: chatvec_dist.make_recipe(llamas["base"], 42, llamas["cp"], "o"),
        lambda: chatvec_dist.RunOptions(workers="8"),
        lambda: chatvec_dist.RunOptions(overwrite="yes"),
    ]
    for call in misuse:
        with pytest.raises(chatvec_dist.ChatvecError):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_strips_within_pieces_give_the_same_bytes_and_hashes(llamas, tmp_path, monkeypatch):
    """Pieces are worked strip by strip; a strip boundary must not change a byte or a block's digest, in a batch
    whose outputs differ in dtype (bf16 and float32) and vocabulary."""
    from chatvec_dist.exec.compute import CpuCompute
    from chatvec_dist.planning import layout
    from chatvec_dist.recipe.spec import Recipe

    monkeypatch.setattr(layout, "HASH_BLOCK_BYTES", 1024)  # many blocks per 16 KiB piece

    def run(name: str, strip_bytes: int) -> Path:
        monkeypatch.setattr(CpuCompute, "strip_bytes", strip_bytes)
        base = chatvec_dist.make_recipe(
            str(llamas["base"]),
            str(llamas["chat"]),
            {"zh": str(llamas["cp"]), "ko": str(llamas["cp_ext"])},
            str(tmp_path / name),
            0.5,
            vocab="overlap",
            unit_bytes=16 * 1024,
        )
        zh, ko = base.targets
        recipe = Recipe(base.vectors, (zh, dataclasses.replace(ko, dtype="float32")), unit_bytes=16 * 1024)
        chatvec_dist.run(recipe, chatvec_dist.RunOptions(backend="local", workers=2, progress=False))
        return tmp_path / name

    strips, whole = run("strips", 2048), run("whole", 1 << 20)
    for name in ("zh", "ko"):
        assert shard_bytes(strips / name) == shard_bytes(whole / name)
        a, meta = read_manifest(strips / name)
        assert a.column("hash").to_pylist() == read_manifest(whole / name)[0].column("hash").to_pylist()
        assert verify(strips / name) == []
    got, want = load_all(strips / "zh"), expected_weights(llamas, "cp", merge_rows=True, alpha=0.5)
    assert all(torch.equal(got[n].view(torch.int16), t.view(torch.int16)) for n, t in want.items())
    base, chat, cp = load_all(llamas["base"]), load_all(llamas["chat"]), load_all(llamas["cp_ext"])
    got = load_all(strips / "ko")
    for n, c in cp.items():
        want = reference(c, [(0.5, chat[n], base[n])], torch.float32, base[n].numel()).view(c.shape)
        assert got[n].dtype == torch.float32 and torch.equal(got[n], want), n
    rows = {r["tensor"]: r for r in read_manifest(strips / "ko")[0].to_pylist()}
    whole_rows = {r["tensor"]: r for r in read_manifest(whole / "ko")[0].to_pylist()}
    for n, r in rows.items():
        assert r["delta_norm"] == pytest.approx(whole_rows[n]["delta_norm"], rel=1e-12)
        assert r["cp_norm"] == pytest.approx(float(cp[n].double().norm()), rel=1e-5)


def test_a_batch_reads_each_input_byte_once_and_writes_each_output_byte_once(llamas, tmp_path, monkeypatch):
    """The I/O floor, counted: the workers' byte counts (the throughput line) equal the inputs' tensor bytes
    (base, chat and each CP read once for four outputs) and the outputs' tensor bytes."""
    from chatvec_dist.io.header import read_header

    def tensor_bytes(directory: Path) -> int:
        return sum(info.nbytes for f in directory.glob("*.safetensors") for info in read_header(f)[0].values())

    seen = []
    real = job.throughput
    monkeypatch.setattr(job, "throughput", lambda stages, *rest: seen.append(stages) or real(stages, *rest))
    root = tmp_path / "root"
    assert (
        main(
            [
                "merge",
                "--base",
                str(llamas["base"]),
                "--chat",
                str(llamas["chat"]),
                "--cp",
                f"zh={llamas['cp']}",
                "--cp",
                f"ko={llamas['cp_ext']}",
                "--alpha",
                "0.5,1.0",
                "--vocab",
                "overlap",
                "--out",
                str(root),
                "--backend",
                "local",
                "--unit-size",
                "4KiB",
                "--no-progress",
            ]
        )
        == 0
    )
    (stages,) = seen
    assert stages.bytes_read == sum(tensor_bytes(llamas[k]) for k in ("base", "chat", "cp", "cp_ext"))
    assert stages.bytes_written == sum(tensor_bytes(out) for out in root.iterdir())
    assert stages.bytes_written == 2 * tensor_bytes(llamas["cp"]) + 2 * tensor_bytes(llamas["cp_ext"])
    assert min(stages.read, stages.compute, stages.hash, stages.write) > 0
