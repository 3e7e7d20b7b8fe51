"""`chatvec plan | merge | extract | apply | run | verify | inspect | demo`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from ..errors import ChatvecError
from ..log import show_on_stderr
from ..recipe.spec import (
    BACKENDS,
    DEVICES,
    VOCAB_POLICIES,
    MiB,
    Recipe,
    RunOptions,
    Target,
    Vector,
    is_plain_name,
    parse_size,
)

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # as a shell reports a process stopped by SIGPIPE


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _recipe_args(p: argparse.ArgumentParser, *, vector: bool, cp: bool, out_required: bool = True) -> None:
    if vector:
        p.add_argument("--vector", action="append", required=True, help="an extracted chat vector (repeatable)")
    else:
        p.add_argument(
            "--base", action="append", required=True, help="base checkpoint: directory or org/name[@rev] (repeatable)"
        )
        p.add_argument("--chat", action="append", required=True, help="chat checkpoint paired with each --base")
    if cp:
        p.add_argument(
            "--cp",
            action="append",
            required=True,
            metavar="[NAME=]CP",
            help="a continually pre-trained checkpoint (repeatable: one output each under --out)",
        )
        p.add_argument(
            "--alpha",
            action="append",
            metavar="A[,A...]",
            help="scale per vector (one value applies to all; default 1.0); a list sweeps: one output each",
        )
        p.add_argument(
            "--vocab",
            choices=VOCAB_POLICIES,
            default="auto",
            help="extended vocabulary: skip keeps CP's embed/lm_head, overlap merges the shared rows, full needs equal shapes",
        )
        p.add_argument(
            "--exclude", action="append", default=[], metavar="REGEX", help="keep CP's values for matching tensors"
        )
    p.add_argument("--out", required=out_required, help="output directory")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="output dtype (default: CP's)" if cp else "output dtype (default: float32)",
    )
    p.add_argument("--max-shard-size", type=size_arg, default=5 * 10**9, help="largest output shard (default 5GB)")
    p.add_argument("--unit-size", type=size_arg, default=64 * MiB, help="bytes of output per work unit (default 64MiB)")


def _run_args(p: argparse.ArgumentParser, recipe: bool = True) -> None:
    if recipe:
        p.add_argument("--print-recipe", action="store_true", help="print the equivalent recipe file and exit")
    p.add_argument("--backend", choices=BACKENDS, default="ray")
    p.add_argument("--workers", type=int, help="workers (default: one per CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs each worker reserves (default 1)")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: one worker per GPU where the cluster has GPUs, else CPU workers",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start over: discard a partial output (and redo outputs this job already committed)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--fail-on-nonfinite",
        action="store_true",
        help="refuse to commit an output with NaN/Inf values (by default they are counted in the manifest)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatvec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="show what a merge would do, without running it")
    _recipe_args(p, vector=False, cp=True, out_required=False)
    p.add_argument("--save", metavar="PLAN.parquet", help="also write the plan (one row per output tensor) as Parquet")
    p = sub.add_parser("merge", help="out = cp + Σ alpha·(chat − base)")
    _recipe_args(p, vector=False, cp=True)
    p.add_argument(
        "--chat-template-from-chat", action="store_true", help="copy the chat model's chat template where CP has none"
    )
    _run_args(p)
    p = sub.add_parser("extract", help="write the chat vector (chat − base) as its own checkpoint")
    _recipe_args(p, vector=False, cp=False)
    _run_args(p)
    p = sub.add_parser("apply", help="out = cp + alpha·vector, with a vector from `extract`")
    _recipe_args(p, vector=True, cp=True)
    _run_args(p)
    p = sub.add_parser("run", help="run a recipe file (YAML; see --print-recipe)")
    p.add_argument("recipe")
    _run_args(p)
    p = sub.add_parser("verify", help="rehash an output against its manifest")
    p.add_argument("out")
    p = sub.add_parser("inspect", help="summarize an output's manifest: per-layer updates, rules, anything unusual")
    p.add_argument("out")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plot", metavar="FILE.png", help="draw per-layer relative update norms (needs matplotlib)")
    what.add_argument(
        "--recipe", action="store_true", help="print the recipe that made this output, as a file for `chatvec run`"
    )
    p = sub.add_parser("demo", help="make tiny Llama-shaped base/chat/CP checkpoints and merge them")
    p.add_argument("--dir", default="chatvec-demo", help="where to put the demo models (default ./chatvec-demo)")
    _run_args(p, recipe=False)
    return parser


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe a command line means: one target per (CP, alpha set) of an alpha sweep."""
    if args.command == "extract":
        vectors = _vectors(args.chat, args.base)
        targets = [
            Target(
                Path(os.path.abspath(args.out)).name,
                None,
                args.out,
                (1.0,) * len(vectors),
                "auto",
                (),
                args.dtype or "float32",
            )
        ]
    else:
        vectors = (
            _vectors(args.vector, [None] * len(args.vector))
            if args.command == "apply"
            else _vectors(args.chat, args.base)
        )
        targets = _targets(args, len(vectors))
    return Recipe(
        vectors=tuple(vectors),
        targets=tuple(targets),
        max_shard_size=args.max_shard_size,
        unit_bytes=args.unit_size,
        chat_template_from_chat=getattr(args, "chat_template_from_chat", False),
    )


def _vectors(chats: list[str], bases: list) -> list[Vector]:
    if len(chats) != len(bases):
        raise ChatvecError(f"{len(bases)} --base but {len(chats)} --chat: give them in pairs")
    return [Vector(c, b) for c, b in zip(chats, bases)]


def _targets(args: argparse.Namespace, n_vectors: int) -> list[Target]:
    """`--cp [NAME=]DIR` (repeatable) × the alpha sweep; several outputs go under `--out` as a root."""
    per_vector = [_floats(a) for a in (args.alpha or ["1.0"])]
    if len(per_vector) == 1:
        per_vector *= n_vectors
    if len(per_vector) != n_vectors:
        raise ChatvecError(f"{len(per_vector)} --alpha values for {n_vectors} vectors: give one, or one per vector")
    sweep = max(len(a) for a in per_vector)
    if any(len(a) not in (1, sweep) for a in per_vector):
        raise ChatvecError("--alpha sweeps of different lengths: give each vector one value or the same number")
    alpha_sets = [tuple(a[j] if len(a) > 1 else a[0] for a in per_vector) for j in range(sweep)]
    cps = _named_cps(args.cp)
    single = len(cps) == 1 and sweep == 1
    targets = []
    for cp_name, cp in cps:
        for alphas in alpha_sets:
            label = "-".join(
                filter(None, [cp_name, f"alpha{'_'.join(f'{a:g}' for a in alphas)}" if sweep > 1 else None])
            )
            out = (args.out or "") if single else str(Path(args.out or "") / (label or Path(cp).name))
            targets.append(
                Target(
                    label or Path(os.path.abspath(out or cp)).name,
                    cp,
                    out,
                    alphas,
                    args.vocab,
                    tuple(args.exclude),
                    args.dtype,
                )
            )
    return targets


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


def _options(args: argparse.Namespace) -> RunOptions:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_on_stderr()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM stops like Ctrl-C: journal kept, resumable
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, where a closed pipe is handled: not at exit, where Python reports it
        return code
    except ChatvecError as e:
        print(f"chatvec: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("chatvec: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `chatvec plan ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_BROKEN_PIPE


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    from .. import job

    if args.command == "plan":
        from ..planning.table import plan_table, summary

        planned = job.plan(recipe_from_args(args))
        print(summary(planned))
        if args.save:
            import pyarrow.parquet as pq

            try:
                pq.write_table(plan_table(planned), args.save)
            except OSError as e:
                raise ChatvecError(f"cannot write the plan: {e}", file=args.save) from None
            print(f"wrote {args.save}")
        return EXIT_OK
    if args.command in ("merge", "extract", "apply", "run"):
        from ..recipe.file import dump_recipe, load_recipe

        recipe = load_recipe(args.recipe) if args.command == "run" else recipe_from_args(args)
        if args.print_recipe:
            print(dump_recipe(recipe), end="")
            return EXIT_OK
        for output in job.run(recipe, _options(args)):
            print(
                f"wrote {output.path}" if output.written else f"kept {output.path} (already committed; nothing written)"
            )
        return EXIT_OK
    if args.command == "inspect":
        from ..output.inspection import plot, report
        from ..output.manifest import read_manifest
        from ..recipe.file import as_recorded, dump_recipe, recipe_from_dict

        if args.recipe:  # paths made absolute: the file runs from any folder
            meta = read_manifest(args.out)[1]
            print(dump_recipe(as_recorded(recipe_from_dict(meta["recipe"], str(args.out)), meta)), end="")
            return EXIT_OK
        print(report(args.out))
        if args.plot:
            png = args.plot if Path(args.plot).suffix else args.plot + ".png"  # what matplotlib writes anyway
            plot(args.out, png)
            print(f"wrote {png}")
        return EXIT_OK
    if args.command == "verify":
        from ..output.verify import verify

        problems = verify(args.out)
        for line in problems:
            print(line)
        print(f"{args.out}: {'verified' if not problems else f'{len(problems)} problem(s)'}")
        return EXIT_MISMATCH if problems else EXIT_OK
    from ..demo import run_demo

    return run_demo(Path(args.dir), _options(args))
