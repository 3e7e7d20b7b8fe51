"""End to end through the CLI: real transformers checkpoints, real Ray actors, outputs that load and run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatvec_dist.cli import main
from chatvec_dist.kernels.reference import reference
from chatvec_dist.output.journal import Journal
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify
from chatvec_dist.output.workarea import JOURNAL_NAME


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(f)
    return tensors


def merge_args(d: dict, out: Path, cp: str = "cp", *extra: str) -> list[str]:
    return [
        "merge",
        "--base",
        str(d["base"]),
        "--chat",
        str(d["chat"]),
        "--cp",
        str(d[cp]),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def shard_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def expected_weights(d: dict, cp: str = "cp", merge_rows: bool = False, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """The float64 reference for every tensor, from safetensors' own loader."""
    base, chat, cpw = load_all(d["base"]), load_all(d["chat"]), load_all(d[cp])
    out = {}
    for name, c in cpw.items():
        if base[name].shape == c.shape:
            out[name] = reference(c, [(alpha, chat[name], base[name])], c.dtype).view(c.shape)
        elif merge_rows:
            out[name] = reference(c, [(alpha, chat[name], base[name])], c.dtype, base[name].numel()).view(c.shape)
        else:
            out[name] = c
    return out


def logits(directory: Path, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if state is not None:
        model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 17, 42, 90]])).logits


@pytest.fixture(scope="module")
def merged(llamas, ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "out"
    assert main(merge_args(llamas, out, "cp", "--workers", "2", "--unit-size", "2KiB")) == 0
    return out


def test_merge_loads_in_transformers_with_reference_logits(llamas, merged):
    expected = expected_weights(llamas)
    got = load_all(merged)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype == torch.bfloat16 and got[name].shape == t.shape
        assert torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
    assert torch.equal(logits(merged), logits(llamas["cp"], expected))
    assert not torch.equal(logits(merged), logits(llamas["cp"]))


def test_manifest_audits_every_tensor(llamas, merged):
    table, meta = read_manifest(merged)
    rows = {r["tensor"]: r for r in table.to_pylist()}
    assert set(rows) == set(load_all(merged))
    assert meta["kind"] == "merge" and meta["recipe"]["targets"][0]["alphas"] == [1.0] and meta["version"]
    assert meta["sources"]["cp"]["path"] == str(llamas["cp"].resolve())
    cp = load_all(llamas["cp"])
    base, chat = load_all(llamas["base"]), load_all(llamas["chat"])
    for name, r in rows.items():
        assert r["rule"] == "merge" and r["dtype_out"] == "BF16" and r["nan_count"] == 0 and r["inf_count"] == 0
        assert r["cp_norm"] == pytest.approx(float(cp[name].double().norm()), rel=1e-5)
        assert r["delta_norm"] == pytest.approx(float((chat[name].double() - base[name].double()).norm()), rel=1e-5)
        assert r["rel_update"] > 0 and len(r["hash"]) == 32 and r["worker"] and r["seconds"] >= 0
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(rows)
    assert {r["shard"] for r in rows.values()} == set(index["weight_map"].values())
    assert not list(merged.parent.glob("*.partial"))
    card = (merged / "README.md").read_text()
    assert "chat-vector" in card and "Chat Vector" in card and str(llamas["chat"]) in card
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == 96


def test_same_bytes_for_any_worker_count_and_backend(llamas, merged, ray_local, tmp_path, capsys):
    """…and each says how long its start-up took (until the first worker was ready), within its wall time."""
    runs = {"ray1": ["--workers", "1"], "local2": ["--backend", "local", "--workers", "2"]}
    for name, extra in runs.items():
        capsys.readouterr()
        assert main(merge_args(llamas, tmp_path / name, "cp", "--unit-size", "2KiB", *extra)) == 0
        line = re.search(r"GB in ([\d.]+) s .* start-up ([\d.]+) s and fsync included", capsys.readouterr().err)
        assert line and 0 <= float(line[2]) <= float(line[1]) + 0.05, name  # both rounded
        assert shard_bytes(tmp_path / name) == shard_bytes(merged)
        a, _ = read_manifest(tmp_path / name)
        b, _ = read_manifest(merged)
        assert a.column("hash").to_pylist() == b.column("hash").to_pylist()


def test_a_worker_dead_before_its_final_fsync_has_its_units_checked(llamas, merged, ray_local, tmp_path, monkeypatch):
    """A Ray actor that dies after its units but before its fsync: no traceback; its units are rechecked on disk
    (here the bytes survived in the page cache, so nothing is redone) and the job commits the same bytes."""
    from chatvec_dist.exec.ray_backend import RayBackend

    real, checked = RayBackend._flush, []

    def flush_after_a_death(self, finished):
        victim = max(self.actors, key=lambda a: len(finished.get(a, [])))  # one that finished units
        checked.extend(finished.get(victim, []))
        ray_local.kill(victim, no_restart=True)
        _wait_until_dead(ray_local, victim)  # ray.kill is asynchronous: without this, close() may still run
        return real(self, finished)

    from chatvec_dist import job

    real_check, rechecked = job._still_valid, set()
    monkeypatch.setattr(RayBackend, "_flush", flush_after_a_death)
    monkeypatch.setattr(job, "_still_valid", lambda r, *a: rechecked.add(r.unit) or real_check(r, *a))
    out = tmp_path / "out"
    assert main(merge_args(llamas, out, "cp", "--unit-size", "2KiB", "--workers", "2")) == 0
    assert checked and {u.id for u in checked} <= rechecked
    assert shard_bytes(out) == shard_bytes(merged) and verify(out) == []


def test_more_workers_than_the_cluster_holds_is_said_and_still_finishes(llamas, merged, ray_local, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(merge_args(llamas, out, "cp", "--unit-size", "2KiB", "--workers", "3")) == 0  # 2 CPUs here
    err = capsys.readouterr().err
    assert "3 workers asked, but the Ray cluster has room for 2 now (2 CPU(s) at 1 per worker)" in err
    assert shard_bytes(out) == shard_bytes(merged)


def test_auto_computes_on_the_cpu_where_the_gpu_kernel_cannot_run(llamas, merged, tmp_path, monkeypatch, capsys):
    """torch reports a GPU the kernel cannot use (here: a CPU build of torch told it has one): `--device auto`
    says so once and computes on the CPU, a thread per core as `--device cpu` would (same bytes); `--device cuda`
    fails, naming why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # sized for GPUs, that would be 8 threads
    out = tmp_path / "auto"
    assert main(merge_args(llamas, out, "cp", "--unit-size", "2KiB", "--backend", "local")) == 0
    err = capsys.readouterr().err
    warning = "chatvec: warning: computing on the CPU, a thread per core: the GPU kernel cannot run on cuda:0 ("
    assert err.count(warning) == 1 and err.count("warning") == 1, err
    assert f"on local × {os.cpu_count()}," in err and shard_bytes(out) == shard_bytes(merged)
    assert main(merge_args(llamas, tmp_path / "cuda", "cp", "--backend", "local", "--device", "cuda")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("chatvec: error: --device cuda, but the GPU kernel cannot run on cuda:0 ("), err
    assert not (tmp_path / "cuda").exists() and not (tmp_path / "cuda.partial").exists()


def test_ray_workers_without_a_gpu_are_told_to_use_the_cpu(ray_local):
    """On a node with GPUs, an actor Ray gave none still sees them (Ray leaves CUDA_VISIBLE_DEVICES alone for
    num_gpus=0): with no GPU in the cluster's resources, `auto` sends the workers `cpu`, not `auto`."""
    from chatvec_dist.exec.ray_backend import RayBackend

    backend = RayBackend(None, 1, None, 1.0, "auto")
    try:
        assert backend.device == "cpu" and not backend.use_gpus
    finally:
        for actor in backend.actors + list(backend._starting.values()):
            ray_local.kill(actor, no_restart=True)


def test_a_gpu_actor_sees_only_its_own_gpu_where_ray_leaves_all_visible(ray_local, monkeypatch):
    """RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES (clusters shared with other frameworks; Ray Jobs set it for
    their drivers): Ray then leaves every GPU visible, and each actor would use GPU 0. The actor narrows
    CUDA_VISIBLE_DEVICES to the GPUs Ray gave it, as Ray would; without the flag it leaves Ray's setting alone."""
    from chatvec_dist.exec import ray_backend

    assert ray_backend.own_gpus({"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}, [3]) == "3"
    assert ray_backend.own_gpus({"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "True"}, [2, 5]) == "2,5"
    for env, ids in (
        ({}, [3]),
        ({"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "0"}, [3]),
        ({"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}, []),
    ):  # Ray's reading; a CPU actor
        assert ray_backend.own_gpus(env, ids) is None
    monkeypatch.setattr(ray_local, "get_gpu_ids", lambda: [1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    ray_backend._Worker("auto")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # Ray's own setting stands
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    ray_backend._Worker("auto")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def _wait_until_dead(ray, actor, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError("a killed Ray actor still answers")


@pytest.mark.parametrize("policy", ["skip", "overlap"])
def test_extended_vocabulary(llamas, tmp_path, policy):
    out = tmp_path / policy
    assert main(merge_args(llamas, out, "cp_ext", "--vocab", policy, "--backend", "local")) == 0
    expected = expected_weights(llamas, "cp_ext", merge_rows=policy == "overlap")
    got, cp = load_all(out), load_all(llamas["cp_ext"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == (160, 32)
        assert torch.equal(got[name][96:], cp[name][96:])  # new tokens keep CP's rows
        assert torch.equal(got[name], expected[name])
        assert torch.equal(got[name][:96], cp[name][:96]) == (policy == "skip")
    rows = {r["tensor"]: r for r in read_manifest(out)[0].to_pylist()}
    assert rows["lm_head.weight"]["reason"] == f"vocab:{policy}"
    assert rows["lm_head.weight"]["rule"] == {"skip": "copy", "overlap": "merge_rows"}[policy]
    assert torch.equal(logits(out), logits(llamas["cp_ext"], expected))


@pytest.mark.parametrize("policy", ["auto", "overlap"])
def test_chat_model_with_added_tokens(llamas, tmp_path, policy):
    """A chat model that added tokens to its base (OpenHermes: 32002 rows on Mistral's 32000): its extra rows have
    no base row. `auto` keeps CP's embeddings (the paper's rule); `overlap` adds the delta on the rows all share."""
    d = dict(llamas, chat=llamas["cp_ext"])  # 160 rows, made from base's 96 plus noise
    out = tmp_path / policy
    assert main(merge_args(d, out, "cp", "--vocab", policy, "--backend", "local")) == 0
    got, cp, base, chat = load_all(out), load_all(llamas["cp"]), load_all(llamas["base"]), load_all(llamas["cp_ext"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        want = (
            cp[name] if policy == "auto" else reference(cp[name], [(1.0, chat[name][:96], base[name])], cp[name].dtype)
        )
        assert got[name].shape == (96, 32) and torch.equal(got[name], want.view(96, 32)), name
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(
        got[name], reference(cp[name], [(1.0, chat[name], base[name])], cp[name].dtype).view(cp[name].shape)
    )
    rows = {r["tensor"]: r for r in read_manifest(out)[0].to_pylist()}
    assert (rows["lm_head.weight"]["rule"], rows["lm_head.weight"]["reason"]) == {
        "auto": ("copy", "vocab:skip"),
        "overlap": ("merge", "vocab:overlap"),
    }[policy]


def test_side_files_remote_code_and_license_go_with_the_output(llamas, tmp_path):
    """A CP with `auto_map` remote code (Qwen-1, InternLM2, ChatGLM), a tiktoken vocabulary and a license: the
    output needs them all to load; weights, pickles and notes stay behind, and the index is the output's own."""
    cp = tmp_path / "cp"
    shutil.copytree(llamas["cp"], cp)
    extra = {
        "configuration_my.py": "X = 1\n",
        "modeling_my.py": "Y = 2\n",
        "qwen.tiktoken": "YQ== 0\n",
        "LICENSE": "terms\n",
        "notes.md": "not a side file\n",
        "pytorch_model.bin": "pickle",
        "pytorch_model.bin.index.json": "{}",
        "adapter_config.json": "{}",
    }
    for name, text in extra.items():
        (cp / name).write_text(text)
    out = tmp_path / "out"
    assert main(merge_args(dict(llamas, cp=cp), out, "cp", "--backend", "local")) == 0
    for name in (
        "configuration_my.py",
        "modeling_my.py",
        "qwen.tiktoken",
        "LICENSE",
        "config.json",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (cp / name).read_bytes(), name
    assert not any(
        (out / name).exists()
        for name in ("notes.md", "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_config.json")
    )
    assert set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == set(load_all(out))


def test_verify_catches_one_flipped_byte(merged, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    assert main(["verify", str(copy)]) == 0
    table, _ = read_manifest(copy)
    row = next(r for r in table.to_pylist() if r["tensor"] == "model.layers.1.mlp.up_proj.weight")
    path = copy / row["shard"]
    data = bytearray(path.read_bytes())
    data[row["offset"] + 1000] ^= 0x01
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj.weight" in out and "1 problem" in out
    assert verify(merged) == []


def test_verify_catches_a_changed_header_metadata(merged, tmp_path):
    """Every one-bit change inside a shard's `__metadata__` ({"format": "pt"}, which transformers reads) is caught."""
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    original = shard.read_bytes()
    start = original.index(b'"__metadata__"')
    end = original.index(b"}", start) + 1
    for i in range(start, end):
        for bit in (0x01, 0x20):
            data = bytearray(original)
            data[i] ^= bit
            shard.write_bytes(bytes(data))
            assert verify(copy), (i, bytes(data[start:end]))
    shard.write_bytes(original)
    assert verify(copy) == []


def test_verify_catches_an_edited_manifest_metadata(merged, tmp_path):
    """The recipe or sources edited inside the manifest's metadata: caught (only its rows had a checksum)."""
    import pyarrow.parquet as pq

    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    table = pq.read_table(copy / "manifest.parquet")
    meta = json.loads(table.schema.metadata[b"chatvec"])
    meta["recipe"]["targets"][0]["alphas"] = [0.25]
    pq.write_table(table.replace_schema_metadata({b"chatvec": json.dumps(meta).encode()}), copy / "manifest.parquet")
    assert verify(copy) == [
        f"{copy / 'manifest.parquet'}: manifest metadata (recipe, sources) does not match its "
        "checksum (edited after the fact?)"
    ]


def test_extract_then_apply_equals_merge(llamas, merged, tmp_path):
    vec = tmp_path / "vector"
    assert (
        main(
            [
                "extract",
                "--base",
                str(llamas["base"]),
                "--chat",
                str(llamas["chat"]),
                "--out",
                str(vec),
                "--no-progress",
                "--backend",
                "local",
            ]
        )
        == 0
    )
    v, base, chat = load_all(vec), load_all(llamas["base"]), load_all(llamas["chat"])
    for name, t in v.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, chat[name].float() - base[name].float())
    assert read_manifest(vec)[1]["kind"] == "extract"
    out = tmp_path / "applied"
    assert (
        main(
            [
                "apply",
                "--vector",
                str(vec),
                "--cp",
                str(llamas["cp"]),
                "--out",
                str(out),
                "--no-progress",
                "--backend",
                "local",
                "--unit-size",
                "2KiB",
            ]
        )
        == 0
    )
    assert shard_bytes(out) == shard_bytes(merged)


def test_several_vectors_and_output_dtype(llamas, tmp_path):
    out = tmp_path / "two"
    args = [
        "merge",
        "--base",
        str(llamas["base"]),
        "--chat",
        str(llamas["chat"]),
        "--base",
        str(llamas["base"]),
        "--chat",
        str(llamas["cp"]),
        "--alpha",
        "0.5",
        "--alpha",
        "-0.25",
        "--cp",
        str(llamas["cp"]),
        "--out",
        str(out),
        "--dtype",
        "float32",
        "--backend",
        "local",
        "--no-progress",
    ]
    assert main(args) == 0
    base, chat, cp = load_all(llamas["base"]), load_all(llamas["chat"]), load_all(llamas["cp"])
    got = load_all(out)
    for name, c in cp.items():
        want = reference(c, [(0.5, chat[name], base[name]), (-0.25, c, base[name])], torch.float32).view(c.shape)
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    logits(out)


def test_output_dtype_reaches_the_sub_configs_of_a_composite_model(llamas, tmp_path):
    """Gemma-3 / Qwen2-VL style configs carry a dtype per sub-model: --dtype must change them all."""
    cp = tmp_path / "cp"
    shutil.copytree(llamas["cp"], cp)
    config = json.loads((cp / "config.json").read_text())
    config |= {"text_config": {"torch_dtype": "bfloat16", "hidden_size": 32}, "vision_config": {"patch_size": 14}}
    (cp / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(merge_args(dict(llamas, cp=cp), out, "cp", "--dtype", "float16", "--backend", "local")) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "float16"
    assert written["text_config"] == {"torch_dtype": "float16", "dtype": "float16", "hidden_size": 32}
    assert written["vision_config"] == {"patch_size": 14}  # names no dtype: left alone


def test_chat_template_from_chat(llamas, tmp_path):
    chat = tmp_path / "chat"
    shutil.copytree(llamas["chat"], chat)
    (chat / "chat_template.jinja").write_text("{{ messages }}")
    d = dict(llamas, chat=chat)
    assert main(merge_args(d, tmp_path / "plain", "cp", "--backend", "local")) == 0
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()
    generation = json.loads((chat / "generation_config.json").read_text())
    (chat / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": [2, 7]}))  # an end of turn
    assert main(merge_args(d, tmp_path / "templ", "cp", "--backend", "local", "--chat-template-from-chat")) == 0
    assert (tmp_path / "templ" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((tmp_path / "templ" / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    cp_generation = json.loads((llamas["cp"] / "generation_config.json").read_text())
    assert json.loads((tmp_path / "plain" / "generation_config.json").read_text()) == cp_generation


def test_chat_eos_survives_a_resumed_commit_and_is_refused_outside_the_vocabulary(
    llamas, tmp_path, monkeypatch, capsys
):
    import errno

    from chatvec_dist.output import commit as output

    chat = tmp_path / "chat"
    shutil.copytree(llamas["chat"], chat)
    (chat / "chat_template.jinja").write_text("{{ messages }}")
    generation = json.loads((chat / "generation_config.json").read_text())
    (chat / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": [2, 7]}))
    argv = merge_args(
        dict(llamas, chat=chat), tmp_path / "out", "cp", "--backend", "local", "--chat-template-from-chat"
    )
    real = output.write_manifest

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "manifest.parquet")

    monkeypatch.setattr(output, "write_manifest", disk_full)  # the template was copied, then the commit failed
    assert main(argv) == 3  # a failed run, not bad input
    monkeypatch.setattr(output, "write_manifest", real)
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, 7]

    (chat / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": [2, 96]}))  # an added token
    capsys.readouterr()
    assert (
        main(
            merge_args(
                dict(llamas, chat=chat), tmp_path / "out2", "cp", "--backend", "local", "--chat-template-from-chat"
            )
        )
        == 0
    )
    assert "end-of-sequence ids [2, 96] are not all in the output's vocabulary (96 tokens)" in capsys.readouterr().err
    cp_generation = json.loads((llamas["cp"] / "generation_config.json").read_text())
    assert json.loads((tmp_path / "out2" / "generation_config.json").read_text()) == cp_generation


def test_out_dot_is_a_clear_error(llamas, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(merge_args(llamas, Path("."), "cp", "--backend", "local")) == 2
    assert "output exists" in capsys.readouterr().err


def test_existing_output_is_refused_unless_overwrite(llamas, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(merge_args(llamas, out, "cp", "--backend", "local")) == 2
    assert "output exists" in capsys.readouterr().err and (out / "keep").exists()
    assert main(merge_args(llamas, out, "cp", "--backend", "local", "--overwrite")) == 2  # not a chatvec output
    assert "not a chatvec output" in capsys.readouterr().err and (out / "keep").exists()
    (out / "keep").unlink()  # an empty folder, or an earlier output, is replaced
    assert main(merge_args(llamas, out, "cp", "--backend", "local", "--overwrite", "--alpha", "0.5")) == 0
    assert main(merge_args(llamas, out, "cp", "--backend", "local", "--overwrite")) == 0
    assert verify(out) == [] and read_manifest(out)[1]["recipe"]["targets"][0]["alphas"] == [1.0]


def test_overwrite_checks_again_at_the_commit_what_it_deletes(llamas, tmp_path, monkeypatch, capsys):
    """An output replaced by someone's own files while the merge ran is not deleted by --overwrite's commit."""
    from chatvec_dist.exec import worker

    out = tmp_path / "o"
    assert main(merge_args(llamas, out, "cp", "--backend", "local", "--alpha", "0.5")) == 0
    real_run = worker.UnitRunner.run

    def meanwhile(self, unit):
        if out.joinpath("manifest.parquet").exists():
            shutil.rmtree(out)
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        return real_run(self, unit)

    monkeypatch.setattr(worker.UnitRunner, "run", meanwhile)
    assert main(merge_args(llamas, out, "cp", "--backend", "local", "--workers", "1", "--overwrite")) == 2
    assert "not a chatvec output" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"] and (tmp_path / "o.partial").is_dir()  # kept: resumable


def test_interrupted_run_resumes_and_keeps_verified_units(llamas, merged, tmp_path, monkeypatch):
    from chatvec_dist.exec import worker

    real_run, calls = worker.UnitRunner.run, []

    def failing(self, unit):
        calls.append(unit.id)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real_run(self, unit)

    out = tmp_path / "resumed"
    args = merge_args(llamas, out, "cp", "--backend", "local", "--workers", "1", "--unit-size", "2KiB")
    monkeypatch.setattr(worker.UnitRunner, "run", failing)
    assert main(args) == 130
    assert not out.exists()
    partial = Path(str(out) + ".partial")
    assert len(Journal.load(partial / JOURNAL_NAME, 0)) == 5
    assert not (partial / "manifest.parquet").exists()
    monkeypatch.setattr(worker.UnitRunner, "run", lambda self, unit: calls.append(unit.id) or real_run(self, unit))
    first = len(calls)
    assert main(args) == 0
    assert len(calls) - first == len(set(calls)) - 5  # the five journaled units were not redone
    assert shard_bytes(out) == shard_bytes(merged) and verify(out) == []


def test_demo_command_runs_on_embedded_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "chatvec_dist.cli", "demo", "--dir", str(tmp_path / "demo"), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified against manifest.parquet" in proc.stdout
    assert verify(tmp_path / "demo" / "merged") == []
    assert "  prompt: <s><|user|> " in proc.stdout and "  reply: " in proc.stdout  # transformers ran the output


def test_units_lost_with_a_dead_worker_are_redone(llamas, merged, tmp_path, monkeypatch):
    """A backend reports units whose worker died after finishing them; bytes that did not survive are redone."""
    from chatvec_dist.exec.local import LocalBackend

    real_run, calls = LocalBackend.run, []

    def lossy(self, units, on_result):
        units = list(units)
        calls.append(len(units))
        real_run(self, units, on_result)
        if len(calls) > 1:
            return []
        first = units[0]  # pretend its worker's page cache died with the node: zero its bytes on disk
        piece = first.pieces[0]
        placed = self.ctx.outputs[0].tensors[piece.index]
        with open(self.ctx.outputs[0].shard_paths[placed.shard], "r+b") as f:
            f.seek(placed.offset + piece.first * 2)
            f.write(bytes((piece.last - piece.first) * 2))
        return [first, units[1]]

    monkeypatch.setattr(LocalBackend, "run", lossy)
    out = tmp_path / "out"
    assert main(merge_args(llamas, out, "cp", "--backend", "local", "--unit-size", "2KiB")) == 0
    assert calls[1] == 1  # only the unit whose bytes were lost is redone; the intact suspect is kept
    assert shard_bytes(out) == shard_bytes(merged) and verify(out) == []
    assert read_manifest(out)[0].column("hash").to_pylist() == read_manifest(merged)[0].column("hash").to_pylist()


def test_local_backend_threads_default_to_cpus_or_spread_over_gpus(monkeypatch):
    """Without a GPU: one thread per CPU. With GPUs (faked here: none on this machine): two threads per GPU,
    thread i on GPU i mod count, so that a multi-GPU box uses every GPU."""
    from chatvec_dist.exec import device
    from chatvec_dist.exec.local import LocalBackend

    assert LocalBackend(None, None, "auto").devices == ["auto"] * os.cpu_count()
    assert LocalBackend(None, 3, "cpu").devices == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert LocalBackend(None, None, "auto").devices == ["cpu"] * os.cpu_count()  # the kernel cannot run here
    monkeypatch.setattr(device, "make_compute", lambda where, strict: types.SimpleNamespace(fallback=None))
    assert LocalBackend(None, None, "auto").devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert LocalBackend(None, 3, "cuda").devices == ["cuda:0", "cuda:1", "cuda:0"]
    assert LocalBackend(None, None, "cpu").devices == ["cpu"] * os.cpu_count()
