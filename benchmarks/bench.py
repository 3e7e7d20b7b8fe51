#!/usr/bin/env python
"""Benchmark `chatvec merge` against the I/O floor and a few peers, on synthetic Llama-shaped bf16 checkpoints.

    python benchmarks/bench.py [--size tiny|medium|large|7b|tiny,medium] [--data DIR] [--repeat 3] [--cold] [--no-peers]

Every case runs as a subprocess (start-up included); wall times are medians over --repeat runs. Peak memory is
sampled every 50 ms over the whole process tree (driver, Ray's gcs/raylet and actors, ...). Results go to stdout
and are appended to benchmarks/RESULTS.md. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import mmap
import os
import platform
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Keep every Ray we start (here or in children) on 127.0.0.1 and without token auth.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"  # peers read local directories only

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA_VERSION = 1  # bump when the generator changes, so that stale data is regenerated

# Llama shapes. medium ≈ TinyLlama-1.1B; large ≈ 4 × medium (peak memory must not grow with it); 7b = Llama-2-7B.
SIZES = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        shard_bytes=6 * 10**6,
    ),
    "medium": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        shard_bytes=10**9,
    ),
    "large": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=23,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        shard_bytes=2 * 10**9,
    ),  # 4.3 B: ≈ 4 × medium
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        shard_bytes=2 * 10**9,
    ),
}
CHECKPOINTS = ("base", "chat", "cp")
BUF = 64 * 2**20


# ----------------------------------------------------------------------------------------------- data


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """LlamaForCausalLM's tensor names and shapes, in the usual file order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_plan(shapes: dict, shard_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for name, shape in shapes.items():
        nb = numel(shape) * 2
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nb
    if cur:
        shards.append(cur)
    return shards


def model_config(size: str) -> dict:
    """A transformers LlamaConfig as JSON (the keys of chatvec_dist.demo.llama_config, copied here so that data
    generation does not depend on the code under test)."""
    spec = {k: v for k, v in SIZES[size].items() if k != "shard_bytes"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **spec,
    }


def safetensors_header(names: list[str], shapes: dict) -> bytes:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        nb = numel(shapes[n]) * 2
        header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_random_bf16(f, count: int, rng, np) -> None:
    """`count` random bf16 values, ±[2^-7, 2): random sign and mantissa, exponent 120..127 (no NaN/Inf/denormals)."""
    step = BUF // 2
    for s in range(0, count, step):
        n = min(step, count - s)
        a = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16).copy()
        a &= 0x83FF
        a |= 0x3C00
        f.write(memoryview(a))


def make_checkpoint(directory: Path, cfg: dict, shards: list[list[str]], shapes: dict, seed: int) -> int:
    """Write one checkpoint shard by shard, tensor by tensor, in 64 MiB pieces; return its weight bytes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(directory / fname, "wb") as f:
            f.write(safetensors_header(names, shapes))
            for n in names:
                write_random_bf16(f, numel(shapes[n]), rng, np)
                weight_map[n] = fname
                total += numel(shapes[n]) * 2
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return total


def ensure_data(root: Path, size: str) -> dict:
    """Make (or reuse) base/chat/cp under root/<size>/; return the spec (with file lists and sizes)."""
    where = root / size
    cfg = model_config(size)
    shapes = llama_shapes(cfg)
    shards = shard_plan(shapes, SIZES[size]["shard_bytes"])
    want = {"version": DATA_VERSION, "size": size, "config": cfg, "shards": shards}
    spec_path = where / "spec.json"
    if spec_path.is_file():
        have = json.loads(spec_path.read_text())
        if {k: have.get(k) for k in want} == want and all(
            Path(p).is_file() and os.path.getsize(p) == s for p, s in have["files"].items()
        ):
            print(
                f"reusing {where}/ ({have['params'] / 1e9:.3f} B params, {have['weight_bytes'] / 1e9:.2f} GB per checkpoint)"
            )
            return have
    shutil.rmtree(where, ignore_errors=True)
    params = sum(numel(s) for s in shapes.values())
    print(
        f"generating {size} checkpoints in {where}/ ({params / 1e9:.3f} B params, {len(shards)} shards each) ...",
        flush=True,
    )
    t0 = time.perf_counter()
    weight_bytes = 0
    for seed, name in enumerate(CHECKPOINTS):
        weight_bytes = make_checkpoint(where / name, cfg, shards, shapes, seed)
    files = {str(p): p.stat().st_size for name in CHECKPOINTS for p in sorted((where / name).glob("*.safetensors"))}
    spec = want | {"params": params, "weight_bytes": weight_bytes, "files": files}
    os.sync()
    spec_path.write_text(json.dumps(spec, indent=1))
    print(f"  done in {time.perf_counter() - t0:.1f} s")
    return spec


# --------------------------------------------------------------------------------------- measurement

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """user + system CPU seconds of one process so far."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Polls a process tree: peak of summed RSS (every 50 ms), of summed PSS (every 500 ms), largest single RSS."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_rss = self.peak_pss = self.max_proc_rss = self.max_procs = 0
        self.cpu: dict[int, float] = {}  # last CPU seconds seen per process of the tree
        self._halt = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self._halt.is_set():
            pids = _tree(self.pid)
            rss = [_rss(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(rss))
            self.max_proc_rss = max(self.max_proc_rss, max(rss, default=0))
            self.max_procs = max(self.max_procs, len(pids))
            for p in pids:
                self.cpu[p] = max(self.cpu.get(p, 0.0), _cpu(p))
            if tick % 10 == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
            tick += 1
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def busy_cpu() -> float:
    """CPU seconds the whole machine has spent busy (all processes, kernel included) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK  # minus idle and iowait


def wait_quiet(limit: float, threshold: float = 0.25, window: float = 2.0) -> float:
    """Wait (at most `limit` s) until the machine is idle: under `threshold` cores busy over `window` s.
    Returns the busy cores of the last window (what the run starts with)."""
    deadline = time.monotonic() + limit
    while True:
        b0 = busy_cpu()
        time.sleep(window)
        busy = (busy_cpu() - b0) / window
        if busy < threshold or time.monotonic() >= deadline:
            return busy


NOISY = 0.3  # cores used by the rest of the machine during a run, above which the run is retried


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed_run(
    cmd: list[str], cold: bool, log: Path, env: dict | None = None, cwd: Path | None = None, quiet: float = 0
) -> dict:
    """Run `cmd` once; wall time, CPU and memory of its process tree. Raises on failure, showing the log tail."""
    os.sync()
    if cold:
        drop_caches()
    idle = wait_quiet(quiet) if quiet else 0.0
    load0 = os.getloadavg()[0]
    busy0 = busy_cpu()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd or REPO, env=env, start_new_session=True
        )
        mon = TreeMemory(proc.pid)
        mon.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        mon.stop()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    # minus this process (the memory poller mostly): it is measurement overhead, not the case nor other load
    busy = busy_cpu() - busy0 - (self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime)
    # CPU of the tree: what the poller saw, or what the kernel reports for reaped descendants, whichever is more.
    cpu = max(sum(mon.cpu.values()), ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{tail}")
    return {
        "wall": wall,
        "cpu": cpu,
        "rss": mon.peak_rss,
        "pss": mon.peak_pss,
        "max_proc_rss": mon.max_proc_rss,
        "procs": mon.max_procs,
        "load": max(load0, os.getloadavg()[0]),
        "other_cpu": max(0.0, busy - cpu),
        "busy_before": idle,
        "stages": stages(log.read_text(errors="replace")),
    }


STAGES_LINE = re.compile(
    r"worker-seconds: read ([\d.]+) .*compute ([\d.]+), hash ([\d.]+), write ([\d.]+) .*fsync ([\d.]+) s"
)


def stages(log: str) -> dict[str, float]:
    """Worker-seconds per stage from chatvec's throughput line (empty for other tools)."""
    m = STAGES_LINE.search(log)
    return dict(zip(("read", "compute", "hash", "write", "fsync"), map(float, m.groups()))) if m else {}


def read_all(paths: list[str]) -> int:
    buf = bytearray(BUF)
    mv, total = memoryview(buf), 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(mv):
                total += n
    return total


def read_all_direct(paths: list[str]) -> int:
    """Read every byte with O_DIRECT (no page cache) into a page-aligned 64 MiB buffer."""
    buf, total = mmap.mmap(-1, BUF), 0
    for p in paths:
        fd, at = os.open(p, os.O_RDONLY | os.O_DIRECT), 0
        try:
            while n := os.preadv(fd, [buf], at):
                at += n
        finally:
            os.close(fd)
        total += at
    return total


def time_read(paths: list[str], cold: bool) -> tuple[float, float, float]:
    """Seconds to read every input byte once: (python readinto loop with a 64 MiB buffer, `cat > /dev/null`,
    python O_DIRECT preadv with a 64 MiB buffer)."""
    times = []
    for read in (
        read_all,
        lambda p: subprocess.run(["cat", *p], stdout=subprocess.DEVNULL, check=True),
        read_all_direct,
    ):
        if cold:
            drop_caches()
        t0 = time.perf_counter()
        read(paths)
        times.append(time.perf_counter() - t0)
    return times[0], times[1], times[2]


def time_write(path: Path, nbytes: int, cold: bool) -> tuple[float, float]:
    """Seconds to write `nbytes` from a 64 MiB buffer into a new file, and then to fsync it; the file is deleted."""
    if cold:
        drop_caches()
    buf = memoryview(os.urandom(BUF))
    os.sync()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, buf[: min(left, BUF)])
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
        os.unlink(path)
    return t1 - t0, t2 - t1


# ------------------------------------------------------------------------------------------------ peers


def peer_streaming(base: str, chat: str, cp: str, out: str) -> None:
    """The plain streaming script: safe_open the three, float32 math per tensor, save_file per CP shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def handles(d):
        index = json.loads((Path(d) / "model.safetensors.index.json").read_text())["weight_map"]
        files = {f: safe_open(str(Path(d) / f), "pt") for f in set(index.values())}
        return {n: files[f] for n, f in index.items()}

    hb, hc = handles(base), handles(chat)
    Path(out).mkdir(parents=True, exist_ok=True)
    index = json.loads((Path(cp) / "model.safetensors.index.json").read_text())["weight_map"]
    for fname in sorted(set(index.values())):
        res = {}
        with safe_open(str(Path(cp) / fname), "pt") as f:
            for n in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                t = f.get_tensor(n)
                res[n] = (t.float() + (hc[n].get_tensor(n).float() - hb[n].get_tensor(n).float())).to(t.dtype)
        save_file(res, str(Path(out) / fname), metadata={"format": "pt"})
    shutil.copyfile(Path(cp) / "model.safetensors.index.json", Path(out) / "model.safetensors.index.json")
    shutil.copyfile(Path(cp) / "config.json", Path(out) / "config.json")


def peer_transformers(base: str, chat: str, cp: str, out: str) -> None:
    """Load three models with transformers, out = cp + (chat - base) per parameter in float32, save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    b, c, m = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16) for d in (base, chat, cp))
    sb, sc = b.state_dict(), c.state_dict()
    with torch.no_grad():
        for n, p in m.state_dict().items():
            p.copy_(p.float() + (sc[n].float() - sb[n].float()))
    m.save_pretrained(out)


PEERS = {"streaming": peer_streaming, "transformers": peer_transformers}


def mergekit_config(where: Path, base: str, chat: str, cp: str) -> Path:
    cfg = where / "mergekit.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {chat}\n    parameters:\n      weight: 1.0\n"
        f"  - model: {cp}\n    parameters:\n      weight: 1.0\n"
        f"dtype: bfloat16\n"
    )
    return cfg


# ------------------------------------------------------------------------------------------------ report


def plot(report: Report, in_bytes: int, out_bytes: int, title: str, path: Path) -> bool:
    """A PNG: GB/s of each tool (whole process), and of each stage (the floor's parts; chatvec's worker stages)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tools = [
        (r["case"].replace("**", ""), report.io_bytes / r["median"] / 1e9)
        for r in report.rows
        if r["io"] and r["median"] > 0
    ]
    parts = {r["case"]: r["median"] for r in report.rows}
    stage_rows = []
    for label, nbytes, key in (
        ("floor: read inputs (cat)", in_bytes, "↳ read inputs, `cat > /dev/null`"),
        ("floor: read inputs (python)", in_bytes, "↳ read inputs, python readinto 64 MiB"),
        ("floor: read inputs (O_DIRECT)", in_bytes, "↳ read inputs, python O_DIRECT 64 MiB"),
        ("floor: write output", out_bytes, "↳ write one output's bytes from a buffer"),
        ("floor: fsync output", out_bytes, "↳ fsync of that write (chatvec fsyncs its output)"),
    ):
        if parts.get(key):
            stage_rows.append((label, nbytes / parts[key] / 1e9))
    for r in report.rows:
        st = r["mem"].get("stages")
        if not st:
            continue
        who = r["case"].replace("chatvec merge, ", "")
        for stage, nbytes in (
            ("read", in_bytes),
            ("compute", in_bytes + out_bytes),
            ("hash", out_bytes),
            ("write", out_bytes),
            ("fsync", out_bytes),
        ):
            if st[stage] > 0:
                stage_rows.append((f"{who}: {stage}", nbytes / st[stage] / 1e9))
    fig, axes = plt.subplots(2, 1, figsize=(10, 0.32 * (len(tools) + len(stage_rows)) + 2.5))
    for ax, rows, what in (
        (axes[0], tools, "per tool: (bytes read + written) / wall of the whole process"),
        (axes[1], stage_rows, "per stage: bytes / seconds in it (chatvec: worker-seconds, summed over workers)"),
    ):
        names, values = [n for n, _ in rows][::-1], [v for _, v in rows][::-1]
        ax.barh(
            names,
            values,
            color=["#c44" if n.startswith("floor") or n.startswith("I/O floor") else "#48a" for n in names],
        )
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlabel("GB/s")
        ax.set_title(what, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine() -> str:
    cpu = "unknown CPU"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = "AVX-512" if " avx512f" in line else "AVX2" if " avx2" in line else ""
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}{', ' + flags if flags else ''}), {mem / 2**30:.1f} GiB RAM, {platform.system()} {platform.release()}"


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "chatvec_dist"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return rev + ("+uncommitted changes in chatvec_dist/" if dirty else "")
    except OSError:
        return "?"


def fmt_bytes(n: float) -> str:
    return "—" if not n else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


class Report:
    def __init__(self, io_bytes: int) -> None:
        self.io_bytes = io_bytes
        self.floor = 0.0
        self.rows: list[dict] = []

    def add(
        self, case: str, walls: list[float], mem: list[dict] | None = None, io: bool = True, note: str = ""
    ) -> None:
        m = {k: max(r[k] for r in mem) for k in ("rss", "pss", "max_proc_rss", "procs", "load")} if mem else {}
        if mem:
            m["cpu"] = statistics.median(r["cpu"] for r in mem)
            staged = [r["stages"] for r in mem if r.get("stages")]
            if staged:
                m["stages"] = {k: statistics.median(r[k] for r in staged) for k in staged[0]}
            m["other_cpu"] = max(r["other_cpu"] / r["wall"] for r in mem)
        self.rows.append(
            {"case": case, "walls": walls, "median": statistics.median(walls), "io": io, "mem": m, "note": note}
        )

    def table(self) -> str:
        head = (
            "| case | wall s (median) | runs | GB/s | × floor | CPU s | other load | peak RSS, tree | peak PSS, tree | max RSS, one process |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        lines = []
        for r in self.rows:
            med = r["median"]
            gbs = f"{self.io_bytes / med / 1e9:.2f}" if r["io"] and med > 0 else "—"
            ratio = f"{med / self.floor:.2f}" if r["io"] and self.floor > 0 else "—"
            runs = " / ".join(f"{w:.2f}" for w in r["walls"])
            m = r["mem"]
            case = r["case"] + (f" ({r['note']})" if r["note"] else "")
            cpu = f"{m['cpu']:.1f}" if "cpu" in m else "—"
            other = f"{m['other_cpu']:.2f}" if "other_cpu" in m else "—"
            lines.append(
                f"| {case} | {med:.2f} | {runs} | {gbs} | {ratio} | {cpu} | {other} | {fmt_bytes(m.get('rss', 0))} | "
                f"{fmt_bytes(m.get('pss', 0))} | {fmt_bytes(m.get('max_proc_rss', 0))} |"
            )
        return head + "\n".join(lines) + "\n"


TARGET_RATIO = 1.3  # (T(size) − T(tiny)) / (floor(size) − floor(tiny))
TARGET_COLD_RATIO = 1.15  # the same, with --cold (inputs read from disk)
TARGET_FIXED_S = 2.0  # chatvec on tiny minus `import torch, ray; ray.init()`
TARGET_RSS = 1.5e9  # per process


def targets(reports: dict[str, Report], goal: float = TARGET_RATIO) -> str:
    """The issue's targets, from reports of one run: size-dependent cost, fixed cost, peak RSS per process."""

    def row(rep: Report, prefix: str) -> dict | None:
        return next((r for r in rep.rows if r["case"].startswith(prefix)), None)

    tiny = reports["tiny"]
    out = [
        "\n### Targets, from the sections above (one run)\n",
        "| target | case | measured | goal | |",
        "|---|---|---:|---:|---|",
    ]
    for size, rep in reports.items():
        if size == "tiny":
            continue
        dfloor = rep.floor - tiny.floor
        for r in rep.rows:
            small = row(tiny, r["case"]) if r["case"].startswith("chatvec merge") else None
            if small and dfloor > 0:
                ratio = (r["median"] - small["median"]) / dfloor
                out.append(
                    f"| size-dependent cost, {size} − tiny: ({r['median']:.2f} − {small['median']:.2f}) s / "
                    f"({rep.floor:.2f} − {tiny.floor:.2f}) s | {r['case']} | {ratio:.2f} × | ≤ {goal} × | "
                    f"{'met' if ratio <= goal else 'NOT met'} |"
                )
    ray, init = row(tiny, "chatvec merge, Ray"), row(tiny, "start-up only: `python -c 'import torch, ray")
    if ray and init:
        extra = ray["median"] - init["median"]
        out.append(
            f"| fixed cost: tiny merge − `import torch, ray; ray.init()` ({ray['median']:.2f} − {init['median']:.2f} s) | "
            f"{ray['case']} | {extra:.2f} s | ≤ {TARGET_FIXED_S} s | {'met' if extra <= TARGET_FIXED_S else 'NOT met'} |"
        )
    for size, rep in reports.items():
        for r in rep.rows:
            rss = r["mem"].get("max_proc_rss")
            if rss and r["case"].startswith("chatvec merge"):
                out.append(
                    f"| peak RSS of one process, {size} | {r['case']} | {fmt_bytes(rss)} | ≤ {fmt_bytes(TARGET_RSS)} | "
                    f"{'met' if rss <= TARGET_RSS else 'NOT met'} |"
                )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- cases

CASES = ("ray", "local", "local1", "streaming", "transformers", "mergekit")


@dataclass
class SizeRun:
    """One model size's benchmark: the options, its data, the chatvec under test, and the report and notes."""

    args: argparse.Namespace
    size: str
    spec: dict
    notes: list[str]
    report: Report = field(init=False)
    env: dict | None = None  # the children's environment (None: this process's)
    chatvec: list[str] = field(default_factory=list)  # the command that runs chatvec
    code: str = ""  # which chatvec_dist is measured, for the results

    def __post_init__(self) -> None:
        self.report = Report(self.in_bytes + self.out_bytes)

    @property
    def where(self) -> Path:
        return self.args.data / self.size

    @property
    def dirs(self) -> dict[str, str]:
        return {n: str(self.where / n) for n in CHECKPOINTS}

    @property
    def out_dir(self) -> Path:
        return self.where / "out"

    @property
    def logs(self) -> Path:
        return self.where / "logs"

    @property
    def inputs(self) -> list[str]:
        return list(self.spec["files"])

    @property
    def in_bytes(self) -> int:
        return sum(self.spec["files"].values())

    @property
    def out_bytes(self) -> int:
        return self.in_bytes // 3

    @property
    def mode(self) -> str:
        return "cold" if self.args.cold else "hot"

    def merge(self, *extra: str) -> list[str]:
        """`chatvec merge` of this size's base/chat/cp into out_dir, plus `extra` options."""
        d = self.dirs
        merge = [*self.chatvec, "merge", "--base", d["base"], "--chat", d["chat"], "--cp", d["cp"]]
        return [*merge, "--out", str(self.out_dir), "--overwrite", "--no-progress", *extra]

    def peer(self, name: str) -> list[str]:
        """This script running peer `name` on this size's checkpoints, into out_dir."""
        d = self.dirs
        me = [sys.executable, str(Path(__file__).resolve()), "_peer"]
        return [*me, name, d["base"], d["chat"], d["cp"], str(self.out_dir)]


def start_size(args: argparse.Namespace, size: str, notes: list[str]) -> SizeRun:
    """Make (or reuse) the data of one size and say what will be measured."""
    spec = ensure_data(args.data, size)
    run = SizeRun(args, size, spec, notes)
    run.logs.mkdir(exist_ok=True)
    print(
        f"size {size}: {spec['params'] / 1e9:.3f} B params; reads {run.in_bytes / 1e9:.2f} GB, writes {run.out_bytes / 1e9:.2f} GB; "
        f"{run.mode} cache; {args.repeat} run(s) per case"
    )
    return run


def floor_round(run: SizeRun) -> tuple[float, float, float, float, float, float]:
    """One round of the I/O floor: seconds of (python read, cat read, O_DIRECT read, write, fsync), and the other
    load."""
    if run.args.quiet_wait:
        wait_quiet(run.args.quiet_wait)
    b0, c0, t0 = busy_cpu(), own_cpu(), time.perf_counter()
    py, cat, direct = time_read(run.inputs, run.args.cold)
    w, s = time_write(run.where / "floor-write.tmp", run.out_bytes, run.args.cold)
    other = max(0.0, busy_cpu() - b0 - (own_cpu() - c0)) / (time.perf_counter() - t0)
    print(
        f"  I/O floor round: read {py:.2f} s (python) / {cat:.2f} s (cat) / {direct:.2f} s (O_DIRECT), write {w:.2f} s + fsync {s:.2f} s, "
        f"other load {other:.2f}",
        flush=True,
    )
    return py, cat, direct, w, s, other


def measure_floor(run: SizeRun) -> None:
    """The I/O floor rounds (noisy ones retried), added to the report with their parts."""
    args = run.args
    if not args.cold:
        read_all(run.inputs)  # warm the page cache
    reads_py, reads_cat, reads_direct, writes, fsyncs = [], [], [], [], []
    floor_noisy, attempts = 0, 0
    while len(writes) < args.repeat:
        attempts += 1
        py, cat, direct, w, s, other = floor_round(run)
        if other > NOISY and attempts <= args.repeat + args.retries:
            floor_noisy += 1
            continue
        reads_py.append(py), reads_cat.append(cat), reads_direct.append(direct)
        writes.append(w), fsyncs.append(s)
    if floor_noisy:
        run.notes.append(f"I/O floor: {floor_noisy} round(s) discarded as noisy (other load > {NOISY})")
    floor_runs = [min(reads) + w for *reads, w in zip(reads_py, reads_cat, reads_direct, writes)]
    report = run.report
    report.floor = statistics.median(floor_runs)
    report.add("**I/O floor**: read inputs once + write one output", floor_runs)
    report.add("↳ read inputs, python readinto 64 MiB", reads_py, io=False)
    report.add("↳ read inputs, `cat > /dev/null`", reads_cat, io=False)
    report.add("↳ read inputs, python O_DIRECT 64 MiB", reads_direct, io=False)
    report.add("↳ write one output's bytes from a buffer", writes, io=False)
    report.add("↳ fsync of that write (chatvec fsyncs its output)", fsyncs, io=False)
    if not args.cold:
        read_all(run.inputs)  # re-warm after the floor writes


def export_snapshot(data: Path, rev: str) -> Path:
    """chatvec_dist as committed at `rev`, exported (once) under data/snapshot-<rev>/."""
    snap = (data / f"snapshot-{rev}").resolve()
    if not (snap / "chatvec_dist").is_dir():
        snap.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", rev, "chatvec_dist"], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    return snap


def use_snapshot(run: SizeRun) -> None:
    """Run chatvec from a `git archive` export of --snapshot, first on the children's PYTHONPATH."""
    rev = subprocess.run(
        ["git", "rev-parse", "--short", run.args.snapshot], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    snap = export_snapshot(run.args.data, rev)
    run.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(snap), *filter(None, [os.environ.get("PYTHONPATH")])]))
    run.code = f"git {rev} (snapshot)"
    run.chatvec = [sys.executable, "-m", "chatvec_dist.cli"]
    probe = subprocess.run(
        [sys.executable, "-c", "import chatvec_dist; print(chatvec_dist.__file__)"],
        env=run.env,
        cwd=run.where,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not probe.startswith(str(snap)):
        raise SystemExit(f"snapshot not picked up: chatvec_dist comes from {probe}")


def choose_code(run: SizeRun) -> None:
    """Which chatvec_dist the cases run: the --snapshot export, or the working tree's."""
    if run.args.snapshot:
        use_snapshot(run)
        return
    run.code = f"git {git_rev()}"
    chatvec = shutil.which("chatvec")
    run.chatvec = [chatvec] if chatvec else [sys.executable, "-m", "chatvec_dist.cli"]


def log_name(label: str, k: int) -> str:
    return f"{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')[:60]}-{k}.log"


def print_run(label: str, r: dict, flag: str) -> None:
    print(
        f"  {label}: {r['wall']:.2f} s{flag}, CPU {r['cpu']:.1f} s, other CPU {r['other_cpu']:.1f} s (busy before {r['busy_before']:.2f}), peak tree RSS {fmt_bytes(r['rss'])}, PSS {fmt_bytes(r['pss'])}, "
        f"{r['procs']} processes",
        flush=True,
    )


def run_case(run: SizeRun, label: str, cmd: list[str], io: bool = True) -> None:
    """Time `cmd` --repeat times (noisy runs retried) and add its row; a failed run ends the case with a note."""
    args = run.args
    walls, mems, noisy, k = [], [], [], 0
    while len(walls) < args.repeat:
        k += 1
        shutil.rmtree(run.out_dir, ignore_errors=True)
        shutil.rmtree(run.out_dir.with_name("out.partial"), ignore_errors=True)
        try:
            r = timed_run(
                cmd, args.cold, run.logs / log_name(label, k), env=run.env, cwd=run.where, quiet=args.quiet_wait
            )
        except RuntimeError as e:
            print(f"  {label}: FAILED\n{e}", flush=True)
            run.notes.append(f"{label}: run {k} failed ({str(e).strip().splitlines()[-1][:200]})")
            break
        flag = ""
        if r["other_cpu"] / r["wall"] > NOISY and k <= args.repeat + args.retries:
            noisy.append(r["wall"])
            flag = " [noisy: discarded, retrying]"
        else:
            walls.append(r["wall"]), mems.append(r)
        print_run(label, r, flag)
    if noisy:
        run.notes.append(
            f"{label}: {len(noisy)} run(s) discarded as noisy (other load > {NOISY}): "
            + ", ".join(f"{w:.2f} s" for w in noisy)
        )
    if walls:
        run.report.add(label, walls, mems, io=io)


def case_ray(run: SizeRun) -> None:
    """chatvec merge on the Ray backend, then `chatvec verify` of its output."""
    run_case(run, f"chatvec merge, Ray backend × {os.cpu_count() or 1}", run.merge())
    verify = subprocess.run(
        [*run.chatvec, "verify", str(run.out_dir)], capture_output=True, text=True, env=run.env, cwd=run.where
    )
    print("  " + (verify.stdout.strip().splitlines() or ["?"])[-1])
    if verify.returncode != 0:
        run.notes.append(f"`chatvec verify` of the Ray output failed: {verify.stdout[-500:]}")


def case_local(run: SizeRun) -> None:
    run_case(run, f"chatvec merge, local backend × {os.cpu_count() or 1} threads", run.merge("--backend", "local"))


def case_local1(run: SizeRun) -> None:
    run_case(run, "chatvec merge, local backend × 1 thread", run.merge("--backend", "local", "--workers", "1"))


def cases_startup(run: SizeRun) -> None:
    """Start-up only: import torch; import torch and start Ray; chatvec --help."""
    py = sys.executable
    run_case(run, "start-up only: `python -c 'import torch'`", [py, "-c", "import torch"], io=False)
    run_case(
        run,
        "start-up only: `python -c 'import torch, ray; ray.init()'`",
        [py, "-c", "import torch, ray; ray.init()"],
        io=False,
    )
    run_case(run, "start-up only: `chatvec --help`", [*run.chatvec, "--help"], io=False)


def case_streaming(run: SizeRun) -> None:
    run_case(run, "peer: plain streaming script (safe_open, fp32, save_file)", run.peer("streaming"))


def case_transformers(run: SizeRun) -> None:
    """The transformers peer, skipped with a note when transformers is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        run.notes.append("transformers not installed: its case was skipped")
    else:
        run_case(run, "peer: transformers (load 3 models, add, save_pretrained)", run.peer("transformers"))


def case_mergekit(run: SizeRun) -> None:
    """mergekit's task_arithmetic, skipped with a note when mergekit-yaml is not found."""
    mk = run.args.mergekit or shutil.which("mergekit-yaml")
    if not mk:
        run.notes.append("mergekit not installed (`mergekit-yaml` not on PATH): its case was skipped")
        return
    d = run.dirs
    cfg = mergekit_config(run.where, d["base"], d["chat"], d["cp"])
    run_case(run, "peer: mergekit-yaml task_arithmetic (bf16)", [mk, str(cfg), str(run.out_dir), "--no-copy-tokenizer"])


def run_cases(run: SizeRun) -> None:
    """The cases asked for, in table order: chatvec merges, start-up only, peers; the output is removed after."""
    wanted = set(run.args.cases.split(",")) if run.args.cases else set(CASES)
    try:
        for name, case in (("ray", case_ray), ("local", case_local), ("local1", case_local1)):
            if name in wanted:
                case(run)
        if not run.args.no_startup:
            cases_startup(run)
        if not run.args.no_peers:
            for name, case in (("streaming", case_streaming), ("transformers", case_transformers)):
                if name in wanted:
                    case(run)
            if "mergekit" in wanted:
                case_mergekit(run)
    finally:
        shutil.rmtree(run.out_dir, ignore_errors=True)


def section(run: SizeRun) -> str:
    """The RESULTS.md section of one size: heading, setup, notes, table, and the chart when one was drawn."""
    args, spec, size, mode = run.args, run.spec, run.size, run.mode
    in_bytes, out_bytes = run.in_bytes, run.out_bytes
    table = run.report.table()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cfg = spec["config"]
    desc = (
        f"`--size {size}`: hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
        f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, "
        f"vocab {cfg['vocab_size']}; {spec['params'] / 1e9:.3f} B params, bf16, {len(spec['shards'])} shards, "
        f"{in_bytes / 3 / 1e9:.3f} GB per checkpoint; reads {in_bytes / 1e9:.2f} GB + writes {out_bytes / 1e9:.2f} GB"
    )
    text = (
        f"\n## {stamp} — {size}, {mode} cache, {args.repeat} run(s) per case\n\n"
        f"- Machine: {machine()}\n- Model: {desc}\n- chatvec: {run.code}; Python {platform.python_version()}\n"
        f"- Whole process, start-up included. GB/s = (bytes read + written) / wall; × floor = wall / I/O floor "
        f"(floor = median over rounds of: the fastest read of all inputs (python, cat, O_DIRECT) + one output's write without fsync).\n"
        f"- CPU s = user + system seconds of the case's process tree (median); other load = CPU seconds that the rest "
        f"of the machine (other processes, kernel threads: page-cache writeback counts here) used per wall second "
        f"during the case, worst kept run — runs above {NOISY} were retried (up to --retries extra runs per case) and are listed in the notes.\n"
        f"- Memory sampled every 50 ms (PSS every 500 ms) over the process tree; RSS sums count shared pages "
        f"(libraries, Ray's object store) once per process, PSS splits them.\n"
        + "".join(f"- Note: {n}\n" for n in run.notes)
        + "\n"
        + table
    )
    png = args.results.with_name(f"bench-{size}-{mode}.png")
    if not args.no_results and plot(
        run.report, in_bytes, out_bytes, f"{size} ({spec['params'] / 1e9:.2f} B params), {mode} cache, {machine()}", png
    ):
        text += f"\n![GB/s per tool and per stage]({png.name})\n"
    return text


def bench_size(args: argparse.Namespace, size: str, notes: list[str]) -> tuple[Report, str]:
    """Every case on one model size; returns the report and its RESULTS.md section."""
    run = start_size(args, size, notes)
    measure_floor(run)
    choose_code(run)
    run_cases(run)
    text = section(run)
    print(text)
    return run.report, text


# -------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size",
        default="tiny",
        help=f"one of {', '.join(SIZES)}, or several comma-separated: with tiny and a "
        "larger one, the size-dependent and fixed-cost targets are computed from the same run (tiny,medium)",
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=HERE / "data",
        help="where the synthetic checkpoints live (default benchmarks/data)",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timing (needs root)")
    ap.add_argument(
        "--cache-limit",
        metavar="SIZE",
        help="run the floor and every case in a memory cgroup of SIZE (e.g. 2G; cgroup v1, root): "
        "inputs larger than SIZE are read from disk, as on a machine with less RAM than the model",
    )
    ap.add_argument("--no-peers", action="store_true", help="skip the streaming script, transformers and mergekit")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up-only cases")
    ap.add_argument("--cases", help=f"comma-separated subset of: {','.join(CASES)}")
    ap.add_argument(
        "--snapshot",
        metavar="REV",
        help="benchmark chatvec_dist as committed at REV (e.g. HEAD), "
        "exported with `git archive` and put first on PYTHONPATH, instead of the working tree",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        metavar="S",
        help="before each run wait up to S seconds for the machine to be idle (default 120; 0: don't)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=4,
        metavar="N",
        help=f"per case, up to N extra runs replacing runs during which the rest of the machine used more "
        f"than {NOISY} cores (default 4)",
    )
    ap.add_argument("--mergekit", metavar="PATH", help="the mergekit-yaml executable (default: the one on PATH)")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    for size in args.size.split(","):
        if size not in SIZES:
            ap.error(f"--size: unknown size {size!r} (choose from {', '.join(SIZES)})")
    return args


def check_cold(args: argparse.Namespace) -> list[str]:
    """With --cold where the page cache cannot be dropped: warn, fall back to hot, and return the note."""
    if args.cold and not drop_caches():
        print("WARNING: cannot write /proc/sys/vm/drop_caches (not root?): the 'cold' figures are hot-cache figures")
        args.cold = False
        return ["--cold asked, but /proc/sys/vm/drop_caches is not writable here: figures are hot-cache"]
    return []


def own_memory_cgroup() -> Path:
    """This process's cgroup-v1 memory controller directory."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, where = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory" + where)
    raise OSError("no cgroup-v1 memory controller")


def limit_cache(limit: str) -> list[str]:
    """Move this process (so the floor and every case after it) into a new memory cgroup of `limit` bytes
    (`2G`), a child of its own: the page cache it fills is charged there, so inputs larger than `limit` are read
    from disk. Caches are dropped first (a page stays charged to whoever read it first). Undone at exit."""
    parent = own_memory_cgroup()
    group = parent / f"chatvec_bench_{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(limit)
        drop_caches()
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as e:
        raise SystemExit(f"--cache-limit: cannot make a memory cgroup under {parent}: {e}") from None

    def leave() -> None:
        (parent / "cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()

    atexit.register(leave)
    got = int((group / "memory.limit_in_bytes").read_text())
    return [
        f"memory cgroup of {got / 2**30:.2f} GiB for the floor and every case (page cache included): `--cache-limit {limit}`"
    ]


def append_results(path: Path, text: str) -> None:
    if not path.exists():
        path.write_text("# Benchmark results\n\nWritten by `python benchmarks/bench.py`; newest last.\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    print(f"appended to {path}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_peer":  # internal: run one peer in this (child) process
        PEERS[sys.argv[2]](*sys.argv[3:7])
        return 0
    args = parse_args()
    notes = check_cold(args)
    if args.cache_limit:
        notes += limit_cache(args.cache_limit)
    sections, reports = [], {}
    for size in args.size.split(","):
        reports[size], text = bench_size(args, size, list(notes))
        sections.append(text)
    if "tiny" in reports and len(reports) > 1:
        text = targets(reports, TARGET_COLD_RATIO if args.cold else TARGET_RATIO)
        print(text)
        sections.append(text)
    if not args.no_results:
        append_results(args.results, "".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
