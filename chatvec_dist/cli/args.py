"""A command line's meaning: the Recipe (what to compute) and RunOptions (how), by the dataclasses' rules."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from ..errors import ChatvecError
from ..recipe.alpha_rules import AlphaRule, parse_alpha_rule
from ..recipe.spec import (
    ALPHA,
    EXTRACT_DTYPE,
    Dare,
    Recipe,
    RunOptions,
    Target,
    Ties,
    Vector,
    broadcast_alphas,
    is_plain_name,
    output_under,
)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe a command line means: one target per (CP, alpha set) of an alpha sweep."""
    ties = Ties(args.ties) if args.ties is not None else None
    if args.command == "extract":
        vectors = _vectors(args.chat, args.base, args.dare)
        name = Path(os.path.abspath(args.out)).name
        alphas = broadcast_alphas((ALPHA,), len(vectors))
        targets = [Target(name, None, args.out, alphas, dtype=args.dtype or EXTRACT_DTYPE, ties=ties)]
    else:
        vectors = (
            _vectors(args.vector, [None] * len(args.vector), args.dare)
            if args.command == "apply"
            else _vectors(args.chat, args.base, args.dare)
        )
        targets = [dataclasses.replace(t, ties=ties) for t in _targets(args, len(vectors))]
    return Recipe(
        vectors=tuple(vectors),
        targets=tuple(targets),
        max_shard_size=args.max_shard_size,
        unit_bytes=args.unit_size,
        chat_template_from_chat=getattr(args, "chat_template_from_chat", Recipe.chat_template_from_chat),
    )


def options_from_args(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        backend=args.backend,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        device=args.device,
        address=args.address,
        overwrite=args.overwrite,
        restart=args.restart,
        progress=not args.no_progress,
        fail_on_nonfinite=args.fail_on_nonfinite,
    )


def _vectors(chats: list[str], bases: list, dares: list[str] | None) -> list[Vector]:
    if len(chats) != len(bases):
        raise ChatvecError(f"{len(bases)} --base but {len(chats)} --chat: give them in pairs")
    per_vector = broadcast_alphas([_dare(d) for d in dares], len(chats), "--dare") if dares else (None,) * len(chats)
    return [Vector(c, b, d) for c, b, d in zip(chats, bases, per_vector)]


def _dare(text: str) -> Dare:
    """`DENSITY[:SEED]` of a --dare."""
    density, _, seed = text.partition(":")
    try:
        return Dare(float(density), int(seed) if seed else 0)
    except ValueError:
        raise ChatvecError(f"--dare {text!r}: give DENSITY or DENSITY:SEED, e.g. 0.2 or 0.2:7") from None


def _targets(args: argparse.Namespace, n_vectors: int) -> list[Target]:
    """`--cp [NAME=]DIR` (repeatable) × the alpha sweep; several outputs go under `--out` as a root (`plan`
    without --out: none)."""
    alpha_sets = _alpha_sets(args.alpha or [], n_vectors)
    sweep = len(alpha_sets) > 1
    cps = _named_cps(args.cp)
    single = len(cps) == 1 and not sweep
    rules = _alpha_rules(args.alpha_rule)
    targets = []
    for cp_name, cp in cps:
        for alphas in alpha_sets:
            label = "-".join(filter(None, [cp_name, f"alpha{'_'.join(f'{a:g}' for a in alphas)}" if sweep else None]))
            out = args.out if single or args.out is None else output_under(args.out, label or Path(cp).name)
            name = label or Path(os.path.abspath(out or cp)).name
            tokens = _special_tokens(getattr(args, "special_tokens", None))
            targets.append(
                Target(name, cp, out, alphas, args.vocab, tuple(args.exclude), args.dtype, rules, special_tokens=tokens)
            )
    return targets


def _special_tokens(value: str | None) -> str | tuple[tuple[int, int], ...] | None:
    """`--special-tokens`: auto, or a JSON file mapping CP token ids to chat token ids ({"32000": 32000})."""
    if value is None or value == "auto":
        return value
    try:
        data = json.loads(Path(value).read_text(encoding="utf-8"))
    except OSError as e:
        raise ChatvecError(
            f"--special-tokens: cannot read ({e.strerror}); give auto or a JSON file", file=value
        ) from None
    except ValueError as e:
        raise ChatvecError(f"--special-tokens: not valid JSON ({e})", file=value) from None
    if not isinstance(data, dict) or not all(k.isdigit() and type(v) is int for k, v in data.items()):
        raise ChatvecError('--special-tokens: expected a JSON object of token ids, {"CP_ID": CHAT_ID, ...}', file=value)
    return tuple((int(k), v) for k, v in data.items())


def _alpha_sets(texts: list[str], n_vectors: int) -> list[tuple[float, ...]]:
    """Each --alpha is one vector's value, or a comma-separated sweep of them: one alpha set per sweep step."""
    per_vector = broadcast_alphas([_floats(t) for t in texts] or [[ALPHA]], n_vectors, "--alpha")
    steps = max(len(a) for a in per_vector)
    if any(len(a) not in (1, steps) for a in per_vector):
        raise ChatvecError("--alpha sweeps of different lengths: give each vector one value or the same number")
    return [tuple(a[j] if len(a) > 1 else a[0] for a in per_vector) for j in range(steps)]


def _alpha_rules(texts: list[str]) -> tuple[AlphaRule, ...]:
    """Each --alpha-rule, `REGEX=A` or `REGEX=A0:A1:...`, in order."""
    try:
        return tuple(parse_alpha_rule(t) for t in texts)
    except ValueError as e:
        raise ChatvecError(str(e)) from None


def _named_cps(specs: list[str]) -> list[tuple[str | None, str]]:
    """`[NAME=]DIR` of each --cp; several CPs get their folder's name where unnamed (names must differ)."""
    cps: list[tuple[str | None, str]] = []
    for spec in specs:
        name, cp = spec.split("=", 1) if "=" in spec and not Path(spec).exists() else (None, spec)
        if name is not None and not is_plain_name(name):
            raise ChatvecError(f"--cp {spec!r}: the name before '=' must be a plain file name (it names the output)")
        cps.append((name, cp))
    if len(cps) > 1:
        cps = [(name or Path(cp).name, cp) for name, cp in cps]
        for i, (name, cp) in enumerate(cps):
            if (clash := next((c for n, c in cps[:i] if n == name), None)) is not None:
                raise ChatvecError(
                    f"--cp {clash} and --cp {cp} would both be named '{name}': name them, e.g. --cp zh={clash}"
                )
    return cps


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ChatvecError(f"--alpha {text!r} is not a number or a comma-separated list of numbers") from None
