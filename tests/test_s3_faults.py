"""Storage is a URL, under faults, on a real S3 server (SeaweedFS on 127.0.0.1): a multi-node Ray cluster whose
nodes share no folder (inputs and output in S3, the staging folder on the driver only) losing a worker node
mid-run; a store that throttles (503 SlowDown) or drops connections mid-request, retried. Each ends with the bytes
of the same merge to a local folder, `chatvec verify` passing on the bucket and no multipart upload left open."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_llama, slow_units_env
from s3server import DroppingProxy, ThrottlingProxy, upload_folder
from test_cluster import HEALTH_CHECKS, wait_for_units

from chatvec_dist.cli import main
from chatvec_dist.io import s3
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.workarea import STAGING_ENV, staging_path

pytestmark = pytest.mark.slow
# Units of 8 MiB (an object store's parts are 5 MiB and more): several parts in most shards.
RUN = ["--no-progress", "--unit-size", "8MiB"]
BUCKET = "faults-out"
DRIVER_SECONDS = 300  # any merge subprocess, at most
_names = itertools.count()


SMALL = {"vocab": 4096, "hidden": 512, "layers": 4}  # ~26 MB each: 5 units in 3 shards of 12 MB
LARGE = {"vocab": 8192, "hidden": 1024, "layers": 4}  # ~104 MB each: 13 units in 3 shards of 40 MB
SHARDS = {"small": ["--max-shard-size", "12MB"], "large": ["--max-shard-size", "40MB"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory, s3_server) -> dict[str, str]:
    return made(tmp_path_factory.mktemp("fault-models"), s3_server, SMALL, SHARDS["small"])


@pytest.fixture(scope="module")
def large_models(tmp_path_factory, s3_server) -> dict[str, str]:
    return made(tmp_path_factory.mktemp("fault-large-models"), s3_server, LARGE, SHARDS["large"])


def made(root: Path, s3_server, shape: dict, shards: list[str]) -> dict:
    """base, chat and cp (bf16) of `shape`, in S3 (`s3:NAME`: all the merges know) and as local folders (NAME:
    for the reference only); the reference, the same merge from the local folders to a local folder (`ref`);
    the output bucket. `run`: the options every merge of them takes."""
    base = make_llama(root / "base", 0, **shape)
    make_llama(root / "chat", 1, base=base, **shape)
    make_llama(root / "cp", 2, base=base, **shape)
    found: dict = {"run": [*RUN, *shards]}
    for name in ("base", "chat", "cp"):
        found[name] = str(root / name)
        found[f"s3:{name}"] = upload_folder(s3_server, root / name, "faults-models", f"{root.name}/{name}")
    out = root / "ref"
    assert main([*merge_args(found, ""), "--out", str(out), "--backend", "local", "--workers", "2", *found["run"]]) == 0
    found["ref"] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("model")}
    assert sum(n.endswith(".safetensors") for n in found["ref"]) >= 3
    with contextlib.suppress(Exception):  # made already (by the other size's fixture)
        s3.client(True).create_bucket(Bucket=BUCKET)
    return found


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch) -> Path:
    """The driver's staging folder, the one local folder of an s3:// output's run."""
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    return tmp_path / "staging"


def merge_args(m: dict, prefix: str = "s3:") -> list[str]:
    return ["merge", "--base", m[prefix + "base"], "--chat", m[prefix + "chat"], "--cp", m[prefix + "cp"]]


def fresh_url() -> str:
    return f"s3://{BUCKET}/run{next(_names)}-{os.getpid()}/out"


def downloaded_weights(url: str) -> dict[str, bytes]:
    """The shards and the index under the prefix, downloaded (straight from the store, not through a proxy)."""
    bucket, key = s3.parse(url)
    c = s3.client(True)
    names = sorted(n for n in s3.list_names(url) if n.startswith("model"))
    return {n: c.get_object(Bucket=bucket, Key=f"{key}/{n}")["Body"].read() for n in names}


def open_uploads() -> list[tuple[str, str]]:
    """Every multipart upload still open in the output bucket."""
    r = s3.client(True).list_multipart_uploads(Bucket=BUCKET)
    return [(u["Key"], u["UploadId"]) for u in r.get("Uploads", ())]


def assert_complete(url: str, reference: dict[str, bytes]) -> None:
    """The output's bytes are the reference's, `chatvec verify` passes on the bucket, no upload is left open."""
    assert downloaded_weights(url) == reference
    assert main(["verify", url]) == 0
    assert open_uploads() == []


@pytest.fixture
def s3_cluster(s3_server, tmp_path, monkeypatch):
    """A head that runs no work and three one-CPU worker nodes, on loopback, started with the AWS_* variables
    (set by `s3_server`) and slow units (0.5 s each) in their environment, and a CHATVEC_STAGING of their own
    that must never be made: they write nothing locally. Always shut down."""
    from ray.cluster_utils import Cluster

    env = slow_units_env(0.5)
    for name in ("CHATVEC_TEST_UNIT_SECONDS", "PYTHONPATH"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "workers-staging"))
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    head = {**common, "num_cpus": 0, "include_dashboard": False, "_system_config": dict(HEALTH_CHECKS)}
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes = [c.add_node(**common, num_cpus=1) for _ in range(3)]
        c.wait_for_nodes()
        monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))  # the driver's (the nodes keep theirs)
        yield c, nodes, env
    finally:
        c.shutdown()
    assert not (tmp_path / "workers-staging").exists()


def test_a_cluster_sharing_no_folder_survives_a_lost_node_s3_to_s3(large_models, s3_cluster, tmp_path):
    c, nodes, env = s3_cluster
    url, staging = fresh_url(), tmp_path / "staging"
    merge = [*merge_args(large_models), "--out", url, "--backend", "ray", *large_models["run"]]
    argv = [sys.executable, "-m", "chatvec_dist.cli", *merge]
    env = dict(env, RAY_ADDRESS=c.address, **{STAGING_ENV: str(staging)})
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        busy = wait_for_units(staging_path(url), 2, proc, nodes=2, timeout=DRIVER_SECONDS)  # env: the driver's
        victim = next(n for n in nodes if n.node_id in busy)  # a node that has done work and has more in flight
        c.remove_node(victim, allow_graceful=False)
        assert proc.poll() is None, "the fault must land while units are in flight"
        _, stderr = proc.communicate(timeout=DRIVER_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert_complete(url, large_models["ref"])
    table, _ = read_manifest(url)
    used = {n for cell in table.column("node").to_pylist() for n in cell.split(",")}
    assert victim.node_id in used and len(used) >= 2 and used <= {n.node_id for n in nodes}


# What the dropping proxy also loses, once: the answer to a request the store acted on.
LOST_ANSWERS = {
    "dropped": None,
    "CreateMultipartUpload's answer lost": rb"POST \S*\?uploads",
    "CompleteMultipartUpload's answer lost": rb"POST \S*\?uploadId=",
}


@pytest.mark.parametrize("fault", ["throttled", *LOST_ANSWERS])
def test_a_merge_s3_to_s3_through_a_faulty_store_retries_to_the_same_bytes(fault, models, s3_server, monkeypatch):
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    if fault == "throttled":
        proxy: ThrottlingProxy | DroppingProxy = ThrottlingProxy(port, every=10)
    else:
        proxy = DroppingProxy(port, every=5, first=LOST_ANSWERS[fault], uploads=rb"PUT \S*partNumber=")
    url = fresh_url()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # a new client: every request through the proxy
        started = time.monotonic()
        assert main([*merge_args(models), "--out", url, "--backend", "local", "--workers", "2", *models["run"]]) == 0
        print(f"{fault}: {proxy.requests} requests in {time.monotonic() - started:.1f} s")
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    if isinstance(proxy, ThrottlingProxy):
        assert proxy.throttled > 0
    else:
        assert proxy.dropped["upload"] > 0 and proxy.dropped["answer"] > 0, proxy.lines
        assert sum("partNumber=" in line for line in proxy.lines) >= 5  # every part's first try cut mid-body
        assert proxy.first is None, "the answer to lose was never asked for"
    assert_complete(url, models["ref"])
