"""Hub sources: `org/name[@revision]` resolved offline from a real Hugging Face cache layout."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.errors import SourceError
from chatvec_dist.io.sources import open_source
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.verify import verify


def cache_repo(cache: Path, repo_id: str, src: Path, commit: str, branch: str = "main") -> Path:
    """Lay `src` out as the HF cache does: blobs named by sha256, a snapshot of symlinks, a ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    models = make_demo_models(tmp_path / "src")
    commits = {}
    for i, name in enumerate(("base", "chat", "cp")):
        commits[name] = f"{i + 1:040x}"
        cache_repo(cache, f"org/{name}", models[name], commits[name])
    return cache, models, commits


def test_repo_id_resolves_offline_with_commit_and_sha256(hub):
    cache, models, commits = hub
    ckpt = open_source("org/cp")
    assert ckpt.source["repo"] == "org/cp" and ckpt.source["commit"] == commits["cp"]
    shard = "model-00001-of-00002.safetensors"
    data = (models["cp"] / shard).read_bytes()
    assert ckpt.source["files"][shard]["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(ckpt.tensors) == 21
    assert open_source(f"org/cp@{commits['cp']}").source["commit"] == commits["cp"]


def test_merge_from_hub_ids_records_sources(hub, tmp_path):
    cache, models, commits = hub
    out = tmp_path / "out"
    assert (
        main(
            [
                "merge",
                "--base",
                "org/base",
                "--chat",
                "org/chat",
                "--cp",
                "org/cp@main",
                "--out",
                str(out),
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = read_manifest(out)[1]
    assert meta["sources"]["cp"]["commit"] == commits["cp"] and meta["sources"]["cp"]["revision"] == "main"
    assert meta["sources"]["vectors"][0]["base"]["repo"] == "org/base"
    assert verify(out) == []
    card = (out / "README.md").read_text()  # every Hub parent, CP first, as the Hub lists a merge's models
    assert "base_model:\n- org/cp\n- org/chat\n- org/base\n" in card and "base_model_relation: merge" in card


def test_missing_repo_is_a_clear_error(hub, capsys):
    with pytest.raises(SourceError, match="org/absent"):
        open_source("org/absent")
    assert main(["plan", "--base", "org/absent", "--chat", "org/chat", "--cp", "org/cp"]) == 2
    assert "org/absent" in capsys.readouterr().err


def test_symlink_out_of_the_repo_cache_is_refused(hub, tmp_path, capsys):
    cache, models, commits = hub
    snapshot = cache / "models--org--cp" / "snapshots" / commits["cp"]
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(models["cp"] / "model-00002-of-00002.safetensors", outside)
    target = snapshot / "model-00002-of-00002.safetensors"
    target.unlink()
    target.symlink_to(outside)
    assert main(["plan", "--base", "org/base", "--chat", "org/chat", "--cp", "org/cp"]) == 2
    assert "outside the checkpoint" in capsys.readouterr().err
    assert os.path.exists(outside)


def test_a_node_without_the_drivers_cache_fetches_into_its_own(hub, tmp_path, monkeypatch):
    """Workers read Hub inputs from their own node's cache (here: a second cache, the driver's gone)."""
    import huggingface_hub.constants as c

    from chatvec_dist import job

    cache, models, commits = hub
    node_cache = tmp_path / "node-cache"
    shutil.copytree(cache, node_cache, symlinks=True)
    real_execute = job._execute

    def on_another_node(*args, **kwargs):
        hidden = tmp_path / "driver-cache-unreachable"
        cache.rename(hidden)  # the paths the driver planned with vanish for the workers
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(node_cache))
        try:
            return real_execute(*args, **kwargs)
        finally:
            hidden.rename(cache)  # the driver commits with its own cache's side files (config, tokenizer)

    monkeypatch.setattr(job, "_execute", on_another_node)
    out = tmp_path / "out"
    assert (
        main(
            [
                "merge",
                "--base",
                "org/base",
                "--chat",
                "org/chat",
                "--cp",
                "org/cp",
                "--out",
                str(out),
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 0
    )
    assert verify(out) == []
    reference = tmp_path / "reference"
    monkeypatch.setattr(job, "_execute", real_execute)
    assert (
        main(
            [
                "merge",
                "--base",
                str(models["base"]),
                "--chat",
                str(models["chat"]),
                "--cp",
                str(models["cp"]),
                "--out",
                str(reference),
                "--backend",
                "local",
                "--no-progress",
            ]
        )
        == 0
    )
    same = lambda d: {p.name: p.read_bytes() for p in d.glob("*.safetensors")}  # noqa: E731
    assert same(out) == same(reference)


def test_a_partly_cached_repo_fetches_the_rest(hub, tmp_path, monkeypatch):
    """`AutoConfig.from_pretrained` leaves a snapshot holding just config.json: the weights must still be fetched
    (the Hub is faked here: the fetch completes the snapshot the way snapshot_download does)."""
    import huggingface_hub

    cache, models, commits = hub
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copyfile(models["cp"] / "config.json", only_config / "config.json")
    snapshot = cache_repo(cache, "org/partial", only_config, "f" * 40)
    unusable = (
        r"org/partial: the cached snapshot is unusable and fetching did not mend it \(offline, or a damaged "
        r"file that the cache still holds: delete it there to have it downloaded again\): .*no safetensors files"
    )
    with pytest.raises(SourceError, match=unusable):
        open_source("org/partial")  # offline: nothing more to fetch, and the error says why

    real, fetched = huggingface_hub.snapshot_download, []

    def hub_online(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kwargs)
        fetched.append((repo_id, kwargs["ignore_patterns"]))
        for f in sorted(models["cp"].iterdir()):
            if not (snapshot / f.name).exists():
                shutil.copyfile(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_online)
    ckpt = open_source("org/partial")
    assert len(ckpt.tensors) == 21 and ckpt.source["commit"] == "f" * 40
    assert fetched == [("org/partial", ["consolidated*.safetensors", "*/*"])]
    assert open_source("org/cp").source["commit"] == commits["cp"] and len(fetched) == 1  # complete: no fetch


def test_a_repo_with_only_consolidated_weights_still_fetches_them(hub, tmp_path, monkeypatch):
    """consolidated*.safetensors is skipped where HF-format shards exist; a repo that has nothing else gets it."""
    import huggingface_hub

    cache, models, commits = hub
    only = tmp_path / "consolidated-only"
    only.mkdir()
    shutil.copyfile(models["cp"] / "config.json", only / "config.json")
    snapshot = cache_repo(cache, "org/native", only, "e" * 40)
    real, asked = huggingface_hub.snapshot_download, []

    def hub_online(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kwargs)
        asked.append(kwargs.get("ignore_patterns"))
        if kwargs.get("ignore_patterns") == ["*/*"]:  # the Hub repo holds one consolidated file
            shutil.copyfile(models["cp"] / "model-00001-of-00002.safetensors", snapshot / "consolidated.safetensors")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_online)
    assert open_source("org/native").tensors and asked == [["consolidated*.safetensors", "*/*"], ["*/*"]]


def test_a_cached_snapshot_lacking_its_remote_code_is_topped_up(hub, tmp_path, monkeypatch, capsys):
    """A snapshot cached complete by a tool that skipped *.py: the module files its auto_map names are fetched
    (offline: the weights are used, with a warning naming what the output will lack)."""
    import json

    import huggingface_hub

    cache, models, commits = hub
    src = tmp_path / "no-code"
    shutil.copytree(models["cp"], src)
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {
        "AutoModelForCausalLM": "modeling_x.XForCausalLM",
        "AutoConfig": "org/other--configuration_y.Y",
    }
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_x.XTok", None]}})
    )
    snapshot = cache_repo(cache, "org/custom", src, "c" * 40)
    code = {"modeling_x.py": "# modeling\n", "tokenization_x.py": "# tokenizer\n"}

    ckpt = open_source("org/custom")  # offline
    assert len(ckpt.tensors) == 21
    assert (
        "lacks modeling_x.py, tokenization_x.py, named by its auto_map (the Hub has no such" in capsys.readouterr().err
    )

    real, fetched = huggingface_hub.snapshot_download, []

    def hub_online(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kwargs)
        fetched.append((repo_id, kwargs.get("revision")))
        for name, text in code.items():
            (snapshot / name).write_text(text)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_online)
    ckpt = open_source("org/custom")
    assert fetched == [("org/custom", "c" * 40)] and set(code) <= set(ckpt.source["files"])  # the cached commit's
    assert open_source("org/custom") and len(fetched) == 1  # complete now: no second fetch
    assert capsys.readouterr().err == ""


def test_a_fetch_takes_the_top_level_files_only():
    """A repo's subfolders (training checkpoints, ONNX, quantized copies) are never read: never downloaded."""
    from huggingface_hub.utils import filter_repo_objects

    from chatvec_dist.io.sources import ALLOW_PATTERNS, IGNORE_PATTERNS

    names = [
        "model-00001-of-00002.safetensors",
        "config.json",
        "tokenizer.json",
        "modeling_x.py",
        "consolidated.safetensors",
        "checkpoint-500/model.safetensors",
        "onnx/model.safetensors",
        "gptq-4bit/config.json",
        "original/params.json",
    ]
    kept = list(filter_repo_objects(names, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    assert kept == ["model-00001-of-00002.safetensors", "config.json", "tokenizer.json", "modeling_x.py"]


def test_a_mistyped_path_under_a_local_folder_is_not_tried_on_the_hub(hub, tmp_path, monkeypatch, capsys):
    """`models/llama-zh` when `models/` is here but not `models/llama-zh`: a typo, said so (never a Hub fetch)."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()  # the cache holds org/cp: without this folder, the Hub id resolves
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("the Hub was tried"))
    with pytest.raises(
        SourceError, match=r"^org/cp: no such directory; org/ exists here, so this is not read as a Hub"
    ):
        open_source("org/cp")
    argv = ["plan", "--base", "org/base", "--chat", "org/chat", "--cp", "org/cp"]
    assert main(argv) == 2
    assert "org/ exists here, so this is not read as a Hub id" in capsys.readouterr().err


def test_a_snapshot_lacking_its_remote_code_warns_through_the_logger(hub, tmp_path, monkeypatch, capsys):
    """The warning is a `chatvec` log record: a library user silences it as any logger, the CLI shows it."""
    import json
    import logging

    cache, models, commits = hub
    src = tmp_path / "no-code"
    shutil.copytree(models["cp"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "modeling_x.X"}}))
    cache_repo(cache, "org/custom", src, "c" * 40)
    monkeypatch.setattr(logging.getLogger("chatvec"), "level", logging.ERROR)
    assert open_source("org/custom").tensors and capsys.readouterr().err == ""
    monkeypatch.setattr(logging.getLogger("chatvec"), "level", logging.INFO)
    assert main(["plan", "--base", "org/base", "--chat", "org/chat", "--cp", "org/custom"]) == 0
    assert "chatvec: warning: org/custom: the snapshot lacks modeling_x.py" in capsys.readouterr().err
