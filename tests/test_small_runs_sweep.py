"""An alpha sweep in runs of small tensors (exec/small_runs.py, kernels/cpu_runs.py): outputs that differ in their
alphas alone are rows of one kernel pass, each row the bytes and stats of its output computed alone; a tensor whose
outputs differ in anything else (any PlannedTensor field, a vector's source) is still told apart exactly."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_small_runs import _models, assert_same_output

import chatvec_dist
from chatvec_dist.demo import llama_config, save_checkpoint
from chatvec_dist.exec import small_runs
from chatvec_dist.exec.compute import CpuCompute
from chatvec_dist.kernels import cpu_runs
from chatvec_dist.kernels.cpu import Scratch, combine
from chatvec_dist.kernels.cpu_runs import RunKernel
from chatvec_dist.kernels.reference import reference
from chatvec_dist.planning.layout import Piece, Placed
from chatvec_dist.planning.planner import PlannedTensor, Src
from chatvec_dist.recipe.spec import Recipe
from chatvec_dist.term import Term

BITS = {2: torch.int16, 4: torch.int32}
EXACT = {1.0, -0.75, 0.0, 2.5, -1.0}  # float32 values (1: no multiplication)
ALPHAS = [*EXACT, 0.3, 1 / 3, 1e-3]  # and others (any float), which a float32 kernel rounds first, as alone


def _values(n: int, dtype: torch.dtype, seed: int, specials: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    if specials and n > 3:
        x[torch.randint(0, n, (3,), generator=g)] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    return x


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    rows=st.lists(
        st.lists(st.sampled_from(ALPHAS) | st.floats(-1e40, 1e40), min_size=2, max_size=2), min_size=1, max_size=6
    ),
    vectors=st.integers(1, 2),
    extracted=st.booleans(),
    with_cp=st.booleans(),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    specials=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_each_row_of_alphas_gets_the_bytes_and_stats_of_its_output_alone(
    sizes, rows, vectors, extracted, with_cp, out_dtype, specials, seed
):
    """Rows of alphas over one run: each row's bytes and each tensor's stats are those `cpu.combine` gives that
    output's tensor alone (bit for bit, NaN and Inf counts too), and the float64 reference's bytes."""
    n = sum(sizes)
    alphas = tuple(tuple(row[:vectors]) for row in rows)
    src = torch.float32 if out_dtype == torch.float32 else torch.bfloat16
    cp = _values(n, src, seed, specials) if with_cp else None
    pairs = [
        (_values(n, src, seed + 1 + i, specials), None if extracted and i else _values(n, src, seed + 9 + i, False))
        for i in range(vectors)
    ]
    compute = torch.float64 if out_dtype == torch.float32 else torch.float32
    kernel = RunKernel(Scratch(), sizes)
    out = torch.empty(len(alphas), n, dtype=out_dtype)
    stats = kernel.combine(
        out, kernel.delta("v", pairs, alphas, compute), kernel.cp("cp", cp, compute) if cp is not None else None
    )
    bits = BITS[out.element_size()]
    for j, row in enumerate(alphas):
        s = 0
        for k, size in enumerate(sizes):
            e = s + size
            terms = [
                Term(a, p[s:e].clone(), m[s:e].clone() if m is not None else None) for a, (p, m) in zip(row, pairs)
            ]
            mine = cp[s:e].clone() if cp is not None else None
            alone = torch.empty(size, dtype=out_dtype)
            want = combine(alone, mine, terms, compute, Scratch())
            assert torch.equal(out[j, s:e].view(bits), alone.view(bits)), (j, k)
            assert repr(stats[j][k]) == repr(want), (j, k)
            if set(row) <= EXACT:  # the reference's bytes where the alphas are small float32 values
                ref = reference(mine, terms, out_dtype)
                assert torch.equal(torch.isnan(out[j, s:e]), torch.isnan(ref)), (j, k)
                finite = torch.isfinite(ref)
                assert torch.equal(out[j, s:e][finite].view(bits), ref[finite].view(bits)), (j, k)
            s = e


def test_rows_share_the_differences_and_delta_and_recompute_for_other_alphas():
    """Equal vectors and alphas: Δ reused (the same tensor); other alphas: Δ computed again, from the same
    differences; every call's rows equal a fresh kernel's."""
    sizes = [5, 90, 3]
    n = sum(sizes)
    chat, base = _values(n, torch.bfloat16, 1, True), _values(n, torch.bfloat16, 2, False)
    kernel = RunKernel(Scratch(), sizes)
    first = kernel.delta("v", [(chat, base)], ((0.5,), (1.0,)), torch.float32)
    again = kernel.delta("v", [(chat, base)], ((0.5,), (1.0,)), torch.float32)
    assert again is first
    other = kernel.delta("v", [(chat, base)], ((0.25,), (0.5,), (1.0,)), torch.float32)
    fresh = RunKernel(Scratch(), sizes).delta("v", [(chat, base)], ((0.25,), (0.5,), (1.0,)), torch.float32)
    assert torch.equal(other[0].view(torch.int32), fresh[0].view(torch.int32))
    assert repr(other[1]) == repr(fresh[1])
    assert torch.equal(other[0][2].view(torch.int32), (chat.float() - base.float()).view(torch.int32))  # × 1: none
    assert torch.equal(other[0][0].view(torch.int32), ((chat.float() - base.float()) * 0.25).view(torch.int32))


def _placed(t: PlannedTensor) -> Placed:
    return Placed(t, 0, 0, t.numel * 2)


def _tensor(alpha: float = 0.5, **changes) -> PlannedTensor:
    cp, chat, base = (
        Src("/m/cp.safetensors", 64, "BF16"),
        Src("/m/c.safetensors", 8, "BF16"),
        Src("/m/b.safetensors", 8, "BF16"),
    )
    t = PlannedTensor("w", "merge", "", (4, 4), "BF16", cp, (Term(alpha, chat, base),), 16)
    return dataclasses.replace(t, **changes)


def _expected(tensors: list[PlannedTensor]) -> tuple:
    """Each output's column written out by hand: sources numbered in order of first use over the outputs."""
    slots: dict[tuple, int] = {}

    def of(s: Src) -> int:
        return slots.setdefault((s.path, s.start, s.dtype), len(slots))

    columns = []
    for t in tensors:
        cp = of(t.cp) if t.cp is not None else None
        columns.append((t.out_dtype, cp, tuple((a, of(p), of(m) if m is not None else None) for a, p, m in t.terms)))
    return tuple(columns)


def _found(tensors: list[PlannedTensor]):
    tables = [[_placed(t)] for t in tensors]
    found = small_runs._member(Piece(0, 0, 16), tables, 1 << 20)
    return None if found is None else (found[1], small_runs._shape(found[1]))


def test_a_sweep_is_found_by_its_alphas_and_each_output_keeps_its_column():
    t0 = _tensor(0.5)
    sweep = [t0] + [
        PlannedTensor(t0.name, t0.rule, t0.reason, t0.shape, t0.out_dtype, t0.cp, (Term(a, *t0.terms[0][1:]),), 16)
        for a in (1.0, -0.75, 0.5)
    ]
    key, shape = _found(sweep)
    assert len(key) == 2 and key[1] == ((0.5,), (1.0,), (-0.75,), (0.5,))  # the sweep's key
    assert shape == _expected(sweep)


@pytest.mark.parametrize(
    ("change", "full"),
    [
        ({"out_dtype": "F16"}, True),
        ({"cp": Src("/m/cp2.safetensors", 64, "BF16")}, True),
        ({"cp": None}, True),
        ({"terms": (Term(0.25, Src("/m/c2.safetensors", 8, "BF16"), Src("/m/b.safetensors", 8, "BF16")),)}, True),
        ({"terms": (Term(0.25, Src("/m/c.safetensors", 8, "BF16"), None),)}, True),
        ({"terms": (Term(0.25, Src("/m/c.safetensors", 8, "BF16"), Src("/m/b.safetensors", 8, "BF16")),)}, True),
        ({"terms": (Term(0.0, *_tensor().terms[0][1:]),)}, True),  # 0.0: the full check tells it from −0.0
        ({"cp": Src("/m/cp.safetensors", 64, "BF16")}, False),  # equal, not the same object: compared equal
        ({"reason": "other"}, False),  # not read by a run
    ],
)
def test_outputs_that_differ_in_more_than_alphas_get_their_own_columns(change, full):
    """Any difference but the alphas (or a vector's source, equal but not the same object) takes the full check:
    each output's column is its own."""
    t0 = _tensor(0.5)
    other = dataclasses.replace(t0, **change)
    key, shape = _found([t0, other, t0])
    assert shape == _expected([t0, other, t0])
    assert len(key) == (3 if full else 2)  # the full check's key, or the sweep's


@pytest.mark.parametrize(
    "change",
    [
        {"rule": "copy"},
        {"merge_elems": 8},
        {"rows": ((0, 1),)},
        {"row_src": Src("/m/c.safetensors", 8, "BF16")},
        {"terms": (Term(-0.0, Src("/m/c.safetensors", 8, "BF16"), Src("/m/b.safetensors", 8, "BF16")),)},
        {"terms": ()},
    ],
)
def test_a_field_a_run_cannot_do_in_any_output_leaves_the_tensor_alone(change):
    t0 = _tensor(0.5)
    assert _found([t0, dataclasses.replace(t0, **change)]) is None
    assert _found([dataclasses.replace(t0, **change), t0]) is None


def test_every_planned_tensor_field_but_name_reason_and_terms_is_compared():
    """A field PlannedTensor gains is compared by the sweep's check (and must be at its default for a run)."""
    fields = {f.name for f in dataclasses.fields(PlannedTensor)}
    got = set(small_runs._fixed.__reduce__()[1])
    assert got == fields - {"name", "reason", "terms"}


def _sweep(
    tmp_path, name: str, monkeypatch, runs_of_small: bool, alphas: list[tuple[float, float]], backend: str = "local"
) -> list:
    """A sweep over two vectors (the second: chat2 − base) into `name` (a folder in tmp_path, or an s3:// URL)."""
    monkeypatch.setattr(CpuCompute, "runs_of_small", runs_of_small)
    d = tmp_path
    out = name if name.startswith("s3://") else str(d / name)
    cps = {f"s{k}": str(d / "cp") for k in range(len(alphas))}
    base = chatvec_dist.make_recipe(
        [str(d / "base")] * 2, [str(d / "chat"), str(d / "chat2")], cps, out, 0.5, unit_bytes=1 << 20
    )
    targets = tuple(dataclasses.replace(t, alphas=a) for t, a in zip(base.targets, alphas))
    options = chatvec_dist.RunOptions(backend=backend, workers=2, progress=False)
    chatvec_dist.run(Recipe(base.vectors, targets, max_shard_size=6000, unit_bytes=1 << 20), options)
    return [t.out if name.startswith("s3://") else d / name / t.name for t in targets]


def test_a_sweep_of_two_vectors_in_batches_of_rows_gives_each_output_its_own_bytes(tmp_path, monkeypatch):
    """A two-vector sweep of five outputs (two alike), with a chunk so small that a run's rows come in batches,
    and shards so small that runs span them: each output the bytes and manifest of one tensor at a time, and the
    float64 reference's bytes."""
    made = _models(tmp_path, layers=2)
    g = torch.Generator().manual_seed(3)
    chat2 = {n: (c.float() + 0.02 * torch.randn(c.shape, generator=g)).bfloat16() for n, c in made["chat"].items()}
    config = llama_config(64, hidden_size=16, intermediate_size=24, num_hidden_layers=2)
    save_checkpoint(tmp_path / "chat2", chat2, config, shards=3)
    monkeypatch.setattr(small_runs, "CHUNK", 1024)  # a run of ≤ 1024 elements, rows of one pass ≤ 2048 in all
    monkeypatch.setattr(cpu_runs, "CHUNK", 2048)
    alphas = [(0.25, 0.75), (1.0, 1.0), (0.25, 0.75), (-0.5, 0.25), (1.0, 0.125)]  # float32 values: exact
    batches = []
    real = RunKernel.combine
    monkeypatch.setattr(RunKernel, "combine", lambda k, out, d, c: batches.append(len(out)) or real(k, out, d, c))
    stretches = []
    known = small_runs._Writer._stretches
    monkeypatch.setattr(small_runs._Writer, "_stretches", lambda w, *a: stretches.append(r := known(w, *a)) or r)
    fast = _sweep(tmp_path, "fast", monkeypatch, True, alphas)
    assert batches and max(batches) == 4 and min(batches) < 4  # 4 distinct rows, in batches where a run is long
    assert max(map(len, stretches)) > 1  # a run written in stretches, into two shards
    slow = _sweep(tmp_path, "slow", monkeypatch, False, alphas)
    for f, s, (a, b) in zip(fast, slow, alphas):
        assert_same_output(f, s)
        got = {k: v for p in sorted(f.glob("*.safetensors")) for k, v in load_file(p).items()}
        for n, c in made["cp"].items():
            terms = [(a, made["chat"][n], made["base"][n]), (b, chat2[n], made["base"][n])]
            want = reference(c, terms, torch.bfloat16).view(c.shape)
            assert torch.equal(got[n].view(torch.int16), want.view(torch.int16)), (f.name, n)


def test_a_sweep_into_s3_outputs_copies_each_member_into_its_part(tmp_path, monkeypatch, s3_server):
    """Runs of a sweep to s3:// outputs (each member copied into its unit's part): each output's shards are the
    bytes of the same sweep to local folders done one tensor at a time."""
    from chatvec_dist.io import s3

    _models(tmp_path, layers=2)
    shutil.copytree(tmp_path / "chat", tmp_path / "chat2")
    bucket = "small-runs-sweep"
    try:
        s3.client(True).create_bucket(Bucket=bucket)
    except Exception as e:  # made by an earlier run of this test in the session
        assert s3.error_code(e) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"), e
    staged = []
    real = small_runs._Writer.write
    monkeypatch.setattr(
        small_runs._Writer, "write", lambda w, o, *a: staged.append(o in w.runner._staged) or real(w, o, *a)
    )
    alphas = [(0.25, 0.75), (1.0, 1.0), (-0.5, 0.25)]
    fast = _sweep(tmp_path, f"s3://{bucket}/{tmp_path.name}/fast", monkeypatch, True, alphas)
    assert staged and all(staged)
    slow = _sweep(tmp_path, "slow", monkeypatch, False, alphas)
    client = s3.client(True)
    for f, s in zip(fast, slow):
        b, key = s3.parse(str(f))
        names = sorted(p.name for p in s.glob("*.safetensors"))
        assert len(names) > 1
        for name in names:
            got = client.get_object(Bucket=b, Key=f"{key}/{name}")["Body"].read()
            assert got == (s / name).read_bytes(), (f, name)


def test_a_sweep_on_ray_workers_gives_the_bytes_of_the_local_one(tmp_path, monkeypatch, ray_local):
    """Ray workers get each unit's cut of the plan made again from columns (its sources shared as planned): the
    same bytes and manifest as the local backend's runs."""
    _models(tmp_path, layers=2)
    shutil.copytree(tmp_path / "chat", tmp_path / "chat2")
    alphas = [(0.25, 0.75), (1.0, 1.0), (-0.5, 0.25)]
    local = _sweep(tmp_path, "local", monkeypatch, True, alphas)
    ray = _sweep(tmp_path, "ray", monkeypatch, True, alphas, backend="ray")
    for a, b in zip(ray, local):
        assert_same_output(a, b)
