"""cluster/: the launcher YAML and the KubeRay manifest parse and carry what cluster/README.md relies on;
local_cluster.py parses its arguments and prints --help. No Ray is started here."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHARED = "/fsx"  # ray-cluster.yaml: the shared filesystem, at the same path on every node
MOUNT = "/models"  # kuberay.yaml: the RWX volume, at the same path in every pod


def _ray_version_pinned(text: str) -> str:
    m = re.search(r"ray\[default\]==([\d.]+)", text)
    assert m, "ray-cluster.yaml must pin one Ray version for every node"
    return m.group(1)


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]


@pytest.fixture(scope="module")
def rayjob(manifests) -> dict:
    (job,) = [d for d in manifests if d["kind"] == "RayJob"]
    return job


def _pod_specs(manifests: list[dict]) -> dict[str, dict]:
    """Every pod spec in the manifest: the staging Pod, the RayJob's head and each worker group."""
    specs = {}
    for d in manifests:
        if d["kind"] == "Pod":
            specs[d["metadata"]["name"]] = d["spec"]
        elif d["kind"] == "RayJob":
            cluster = d["spec"]["rayClusterSpec"]
            specs["head"] = cluster["headGroupSpec"]["template"]["spec"]
            for g in cluster["workerGroupSpecs"]:
                specs[g["groupName"]] = g["template"]["spec"]
    return specs


# ---- ray-cluster.yaml (Ray cluster launcher, AWS) ----


def test_launcher_names_head_and_gpu_workers(launcher):
    assert launcher["cluster_name"] == "chatvec"
    assert launcher["provider"]["type"] == "aws"
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs the driver only"
    assert head["node_config"]["InstanceType"].startswith("m6i.")
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 1, name
        assert t["node_config"]["InstanceType"].split(".")[0] in ("g5", "p4d"), name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= launcher["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) == 8, "README's worked example: 8 worker nodes"


def test_launcher_mounts_the_shared_filesystem_on_every_node(launcher):
    init = launcher["initialization_commands"]  # run on head and workers alike
    mounts = [c for c in init if re.search(rf"\bmount -t (lustre|nfs4?)\b.*\s{SHARED}\s*$", c.strip())]
    assert mounts, f"no mount of the shared filesystem at {SHARED}"
    assert all(c.strip().startswith(f"mountpoint -q {SHARED} ||") for c in mounts), "mounting must be idempotent"
    env = " ".join(launcher["setup_commands"])
    assert f"HF_HOME={SHARED}/" in env, "Hub ids must resolve to paths every node can open"


def test_launcher_installs_the_same_ray_and_chatvec_everywhere(launcher):
    """Ray pinned, and chatvec from the wheel of this very version (never whatever an index serves that day)."""
    import chatvec_dist

    setup = " ".join(launcher["setup_commands"])
    wheel = f"/fsx/wheels/chatvec_dist-{chatvec_dist.__version__}-py3-none-any.whl"
    installs = [c for c in launcher["setup_commands"] if "pip install" in c and wheel in shlex.split(c)]
    assert installs, f"setup_commands must pip install {wheel}"
    assert _ray_version_pinned(setup)


def test_launcher_keeps_ray_private_and_authenticated(launcher):
    assert launcher["provider"]["use_internal_ips"] is True
    types = launcher["available_node_types"].values()
    assert all(t["node_config"]["SecurityGroupIds"] for t in types), "Ray's default group opens SSH to 0.0.0.0/0"
    setup = " ".join(launcher["setup_commands"])
    assert "RAY_AUTH_MODE=token" in setup and "chmod 600 ~/.ray/auth_token" in setup
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start + " ".join(launcher["worker_start_ray_commands"])


def test_launcher_validates_against_rays_schema(launcher):
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray not installed")
    schema = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    if not schema.is_file():
        pytest.skip("this Ray has no autoscaler schema")
    jsonschema.validate(launcher, json.loads(schema.read_text()))


# ---- kuberay.yaml (PVC + staging pod + RayJob) ----


def test_kuberay_pvc_is_read_write_many(manifests):
    (pvc,) = [d for d in manifests if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"]
    assert pvc["spec"]["resources"]["requests"]["storage"]


def test_kuberay_every_pod_mounts_the_claim_at_the_same_path(manifests):
    (pvc,) = [d for d in manifests if d["kind"] == "PersistentVolumeClaim"]
    specs = _pod_specs(manifests)
    assert {"head", "gpu", "chatvec-stage"} <= set(specs)
    images = set()
    for name, spec in specs.items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        claimed = [
            n
            for n, v in volumes.items()
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        ]
        assert claimed, name
        (container,) = spec["containers"]
        images.add(container["image"])
        assert {"name": claimed[0], "mountPath": MOUNT} in container["volumeMounts"], name
        assert {"name": "HF_HOME", "value": f"{MOUNT}/hf-cache"} in container["env"], name
    assert len(images) == 1, "one image (one Ray, one chatvec) in every pod"


def test_kuberay_rayjob_cluster(rayjob, launcher):
    assert rayjob["apiVersion"] == "ray.io/v1"
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_version_pinned(" ".join(launcher["setup_commands"]))
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == 8
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    for group in [head, gpu]:  # KubeRay wants strings
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_kuberay_rayjob_runs_chatvec_over_the_volume(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["chatvec", "merge"]
    opts, i = {}, 2
    while i < len(argv):
        if argv[i] in ("--no-progress",):
            i += 1
            continue
        opts[argv[i]] = argv[i + 1]
        i += 2
    assert opts["--address"] == "auto"
    for flag in ("--base", "--chat", "--cp", "--out"):
        assert opts[flag].startswith(f"{MOUNT}/"), flag
    from chatvec_dist.cli.parser import build_parser  # the entrypoint is a valid chatvec command line

    args = build_parser().parse_args(argv[1:])
    assert args.command == "merge" and args.address == "auto"


def test_kuberay_labels_match_the_readme_steps(manifests):
    readme = (CLUSTER / "README.md").read_text()
    components = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in manifests}
    assert components == {"storage", "merge"}
    for c in components:
        assert f"-l app.kubernetes.io/component={c}" in readme


def test_dockerfile_uses_the_same_ray(rayjob):
    text = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"rayproject/ray:([\d.]+)-", text)
    assert m and m.group(1) == rayjob["spec"]["rayClusterSpec"]["rayVersion"]


# ---- local_cluster.py ----


def _local_cluster():
    spec = importlib.util.spec_from_file_location("local_cluster", CLUSTER / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_cluster_help_runs():
    r = subprocess.run(
        [sys.executable, str(CLUSTER / "local_cluster.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    for flag in ("--nodes", "--cpus", "--head-cpus", "--address-file", "--kill-node-after", "--auth"):
        assert flag in r.stdout


def test_local_cluster_arguments():
    lc = _local_cluster()
    args = lc.build_parser().parse_args(["--nodes", "3", "--cpus", "1", "--", "chatvec", "merge", "--out", "x"])
    assert (args.nodes, args.cpus, args.head_cpus) == (3, 1, 0)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    assert command == ["chatvec", "merge", "--out", "x"]
    from test_cluster import HEALTH_CHECKS  # the checks the tests' own clusters survive a loaded machine with

    assert lc.HEALTH_CHECKS == HEALTH_CHECKS


def test_local_cluster_refuses_bad_sizes_before_starting_ray(capsys):
    lc = _local_cluster()
    assert lc.main(["--nodes", "0"]) == 2
    assert "--nodes >= 1" in capsys.readouterr().err


# ---- kuberay-s3.yaml (S3 in, S3 out, no shared volume) ----


@pytest.fixture(scope="module")
def s3_manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay-s3.yaml").read_text()) if d]


def test_kuberay_s3_needs_no_shared_volume_and_runs_chatvec_on_urls(s3_manifests, rayjob):
    assert {d["kind"] for d in s3_manifests} == {"ServiceAccount", "RayJob"}
    (job,) = [d for d in s3_manifests if d["kind"] == "RayJob"]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    specs = _pod_specs(s3_manifests)
    for name, spec in specs.items():
        claims = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert not claims, f"{name}: no shared volume"
        assert spec["serviceAccountName"] == "chatvec-s3", name
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env, "credentials never inline"
    argv = shlex.split(job["spec"]["entrypoint"])
    from chatvec_dist.cli.parser import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.command == "merge" and args.address == "auto"
    assert all(p.startswith("s3://") for p in [*args.base, *args.chat, *args.cp, args.out])
    head = specs["head"]["containers"][0]
    assert {"name": "CHATVEC_STAGING", "value": "/staging"} in head["env"]
    assert {"name": "staging", "mountPath": "/staging"} in head["volumeMounts"]
