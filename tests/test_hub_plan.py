"""Hub ids planned from their headers, over HTTP ranges, against a fake Hub on 127.0.0.1 (tests/fakehub.py): no
shard is downloaded to plan, and a merge's workers fetch each shard once, on first use."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from fakehub import FakeHub

from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.errors import SourceError
from chatvec_dist.io.sources import hub_identities, open_source

NAMES = ("base", "chat", "cp")
TOKEN = "hf_fake_token_for_tests"


@pytest.fixture
def fakehub(tmp_path, monkeypatch):
    """The demo models served as org/base, org/chat, org/cp; an empty HF cache; online, with a token."""
    import huggingface_hub.constants as c

    models = make_demo_models(tmp_path / "src")
    cache = tmp_path / "hf-home" / "hub"
    with FakeHub() as hub:
        commits = {name: hub.add(f"org/{name}", models[name]) for name in NAMES}
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(c, "ENDPOINT", hub.url)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_HOME", str(cache.parent))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(c, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        yield hub, models, commits, cache


def header_bytes(path: Path) -> int:
    """The 8-byte length field plus the JSON header: what a plan needs of a shard."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def shards(models: dict[str, Path]) -> dict[tuple[str, str], Path]:
    return {(f"org/{n}", p.name): p for n in NAMES for p in sorted(models[n].glob("*.safetensors"))}


def plan_output(capsys, base: str, chat: str, cp: str) -> str:
    assert main(["plan", "--base", base, "--chat", chat, "--cp", cp]) == 0
    return capsys.readouterr().out


def merge(out: Path, base: str, chat: str, cp: str) -> None:
    argv = ["merge", "--base", base, "--chat", chat, "--cp", cp, "--out", str(out), "--backend", "local"]
    assert main([*argv, "--no-progress"]) == 0


def test_plan_reads_only_the_headers_and_side_files(fakehub, capsys):
    hub, models, commits, cache = fakehub
    from_hub = plan_output(capsys, "org/base", "org/chat", "org/cp")
    assert from_hub == plan_output(capsys, *(str(models[n]) for n in NAMES))
    served = hub.served.bytes
    for key, path in shards(models).items():  # 8 + header bytes each, by two ranged GETs; never the tensors
        assert served[key] == header_bytes(path) < path.stat().st_size / 50 and hub.served.downloads[key] == 0
        assert not (
            cache / f"models--{key[0].replace('/', '--')}" / "snapshots" / commits[key[0][4:]] / key[1]
        ).exists()
    side = {(f"org/{n}", "config.json"): models[n] / "config.json" for n in NAMES}
    side[("org/cp", "model.safetensors.index.json")] = models["cp"] / "model.safetensors.index.json"
    for key, path in side.items():  # whole, once, into the cache
        assert served[key] == path.stat().st_size and hub.served.downloads[key] == 1
    assert set(served) == set(shards(models)) | set(side)
    assert hub.served.resolved_at == set(commits.values())  # every file read at the commit `main` resolved to
    assert hub.served.token_to_cdn == 0  # the token goes to the Hub, never to the CDN it redirects to

    before = dict(served)  # again: side files from the cache, only the headers (not cached) over the network
    assert plan_output(capsys, "org/base", "org/chat", "org/cp") == from_hub
    assert {k: served[k] - before[k] for k in served if served[k] != before[k]} == {
        key: header_bytes(path) for key, path in shards(models).items()
    }


def test_open_source_records_the_commit_and_each_file(fakehub):
    hub, models, commits, cache = fakehub
    ckpt = open_source("org/cp@main")
    snapshot = cache / "models--org--cp" / "snapshots" / commits["cp"]
    assert ckpt.directory == snapshot and (snapshot / "config.json").is_file()
    assert ckpt.source["repo"] == "org/cp" and ckpt.source["commit"] == commits["cp"]
    assert ckpt.source["revision"] == "main" and len(ckpt.tensors) == 21
    shard = "model-00001-of-00002.safetensors"
    assert ckpt.source["files"][shard] == {
        "sha256": hub.repos["org/cp"].files[shard].sha256,
        "size": (models["cp"] / shard).stat().st_size,
    }
    assert {t.path for t in ckpt.tensors.values()} == {
        str(snapshot / p.name) for p in models["cp"].glob("*.safetensors")
    }
    assert open_source(f"org/cp@{commits['cp']}").source["commit"] == commits["cp"]


def test_shards_the_cache_holds_are_read_there(fakehub, capsys):
    """A partly cached repo: the cached shard's header is read from the cache, the other's over HTTP."""
    from huggingface_hub import hf_hub_download

    hub, models, commits, cache = fakehub
    cached, remote = ("org/cp", "model-00001-of-00002.safetensors"), ("org/cp", "model-00002-of-00002.safetensors")
    hf_hub_download(*cached, revision=commits["cp"])
    before = hub.served.bytes[cached]
    assert open_source("org/cp").tensors
    assert hub.served.bytes[cached] == before and hub.served.bytes[remote] == header_bytes(models["cp"] / remote[1])


def test_a_cached_shard_linked_out_of_the_repo_cache_is_refused(fakehub, tmp_path, capsys):
    """As for a snapshot read from the cache: a file of the snapshot folder must resolve inside the repo's cache."""
    from huggingface_hub import hf_hub_download

    hub, models, commits, cache = fakehub
    name = "model-00002-of-00002.safetensors"
    pointer = Path(hf_hub_download("org/cp", name, revision=commits["cp"]))
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(models["cp"] / name, outside)
    pointer.unlink()
    pointer.symlink_to(outside)
    assert main(["plan", "--base", "org/base", "--chat", "org/chat", "--cp", "org/cp"]) == 2
    assert f"{name} resolves to {outside}, outside the checkpoint" in capsys.readouterr().err


def test_hub_identities_need_no_local_file(fakehub):
    """A job's identity of a Hub input (size, sha256, commit) comes from the plan: no shard is on disk yet."""
    hub, models, commits, cache = fakehub
    ckpt = open_source("org/cp")
    identities = hub_identities([ckpt])
    for path in {t.path for t in ckpt.tensors.values()}:
        name = Path(path).name
        assert not os.path.exists(path)
        assert identities[path] == [
            (models["cp"] / name).stat().st_size,
            hub.repos["org/cp"].files[name].sha256,
            commits["cp"],
        ]


def test_a_fully_fetched_repo_then_resolves_offline(fakehub, monkeypatch):
    """Once the cache holds every shard (a merge's workers fetched them), the same id resolves with no network:
    the branch's commit was recorded (refs/main) when it was opened."""
    import huggingface_hub.constants as c
    from huggingface_hub import hf_hub_download

    hub, models, commits, cache = fakehub
    assert open_source("org/cp").source["commit"] == commits["cp"]
    for _, name in (k for k in shards(models) if k[0] == "org/cp"):
        hf_hub_download("org/cp", name, revision=commits["cp"])
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    ckpt = open_source("org/cp")
    assert ckpt.source["commit"] == commits["cp"] and len(ckpt.tensors) == 21


def test_merge_from_hub_ids_fetches_each_shard_once_and_matches_local(fakehub, tmp_path):
    hub, models, commits, cache = fakehub
    merge(tmp_path / "from-hub", "org/base", "org/chat", "org/cp")
    merge(tmp_path / "local", *(str(models[n]) for n in NAMES))
    same = lambda d: {p.name: p.read_bytes() for p in d.glob("*.safetensors")}  # noqa: E731
    assert same(tmp_path / "from-hub") == same(tmp_path / "local")
    for key, path in shards(models).items():  # the plan's headers, then the whole shard once, by a worker
        assert hub.served.downloads[key] == 1
        assert hub.served.bytes[key] == header_bytes(path) + path.stat().st_size


def test_a_missing_repo_is_one_line_naming_it(fakehub, capsys):
    with pytest.raises(SourceError, match=r"^org/absent: no such repo on the Hub"):
        open_source("org/absent")
    assert main(["plan", "--base", "org/absent", "--chat", "org/chat", "--cp", "org/cp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/absent: no such repo on the Hub" in err


def test_a_missing_revision_is_one_line_naming_the_repo(fakehub):
    with pytest.raises(SourceError, match=r"^org/cp: no such revision"):
        open_source("org/cp@v9")


def test_a_gated_repo_is_one_line_naming_it(fakehub, capsys):
    hub, models, commits, cache = fakehub
    hub.add("org/gated", models["chat"], gated=True)  # its file list is public, its files answer 401
    assert main(["plan", "--base", "org/base", "--chat", "org/gated", "--cp", "org/cp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/gated: a gated repo: ask for access on its Hub page" in err


def test_existing_hub_layout_in_the_cache_is_read_without_the_network(fakehub, tmp_path, capsys):
    """A snapshot the cache holds whole is used as before (offline first): not one request to the Hub."""
    from test_hub import cache_repo

    hub, models, commits, cache = fakehub
    for name in NAMES:
        cache_repo(cache, f"org/{name}", models[name], commits[name])
    plan_output(capsys, "org/base", "org/chat", "org/cp")
    assert not hub.served.bytes and not hub.served.resolved_at
    shutil.rmtree(cache)
