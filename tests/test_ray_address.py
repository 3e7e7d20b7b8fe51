"""A wrong cluster address fails in seconds; a head lost mid-run ends with chatvec's own error, and the rerun
resumes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import slow_units_env
from test_cluster import HEALTH_CHECKS, args, models, reference_out, shards, wait_for_units  # noqa: F401

from chatvec_dist.cli import main
from chatvec_dist.output.verify import verify
from chatvec_dist.output.workarea import JOURNAL_NAME


def test_a_port_that_is_not_a_ray_gcs_fails_in_seconds_and_leaves_nothing(models, tmp_path, capsys):  # noqa: F811
    """A mistyped port whose server accepts connections but never answers (Ray's own client waited for good)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        out = tmp_path / "out"
        started = time.monotonic()
        assert main(args(models, out, "--address", address)) == 2
        assert time.monotonic() - started < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"chatvec: error: {address} accepts connections but is not a Ray cluster's GCS (no gRPC answer within "
        "10 s): a mistyped port? `ray start --head` prints the address to use"
    ), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT.partial, no lock file


def start(head_port: int | None = None):
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    head = {**common, "num_cpus": 0, "include_dashboard": False, "_system_config": dict(HEALTH_CHECKS)}
    c = Cluster(initialize_head=True, head_node_args=head)
    c.add_node(**common, num_cpus=1)
    c.wait_for_nodes()
    return c


@pytest.mark.slow
def test_a_head_lost_mid_run_is_a_failed_run_and_the_rerun_resumes(
    models,  # noqa: F811
    reference_out,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    env = slow_units_env(0.01)
    for name in ("CHATVEC_TEST_UNIT_SECONDS", "PYTHONPATH"):
        monkeypatch.setenv(name, env[name])
    out = tmp_path / "out"
    c = start()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatvec_dist.cli", *args(models, out, "--address", c.address)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_units(out, 20, proc)
        c.remove_node(c.head_node, allow_graceful=False)
        _, stderr = proc.communicate(timeout=120)
    finally:
        c.shutdown()
    lines = stderr.strip().splitlines()
    assert proc.returncode == 3, stderr[-3000:]
    assert lines[-1].startswith("chatvec: error: lost the Ray cluster's head: its GCS at "), lines[-3:]
    assert not out.exists() and (Path(f"{out}.partial") / JOURNAL_NAME).stat().st_size > 0

    c = start()
    try:
        again = subprocess.run(
            [sys.executable, "-m", "chatvec_dist.cli", *args(models, out, "--address", c.address)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        c.shutdown()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming: " in again.stderr
    assert shards(out) == shards(reference_out) and verify(out) == []
