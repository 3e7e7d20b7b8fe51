"""One function per `chatvec` command: parsed arguments in, exit status out (errors are raised, as
ChatvecError, for `main` to report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ChatvecError, printable
from .args import options_from_args, recipe_from_args
from .parser import EXIT_MISMATCH, EXIT_OK


def plan(args: argparse.Namespace) -> int:
    """Print what a merge would do; with --save, also write the plan as Parquet."""
    from .. import job
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


def run(args: argparse.Namespace) -> int:
    """merge, extract, apply (a recipe from the command line) or run (a recipe file): run it, or print it."""
    from .. import job
    from ..recipe.file import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe) if args.command == "run" else recipe_from_args(args)
    if args.print_recipe:
        print(dump_recipe(recipe), end="")
        return EXIT_OK
    for output in job.run(recipe, options_from_args(args)):
        where = printable(output.url or str(output.path))  # a hostile name's control characters, escaped
        print(f"wrote {where}" if output.written else f"kept {where} (already committed; nothing written)")
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    """Rehash an output (a folder or an s3:// prefix) against its manifest (with --sources, its sources too):
    each problem, then the verdict."""
    from ..output.verify import verify as verify_output

    problems = verify_output(args.out, sources=args.sources)
    for line in problems:
        print(line)
    print(f"{args.out}: {'verified' if not problems else f'{len(problems)} problem(s)'}")
    return EXIT_MISMATCH if problems else EXIT_OK


def inspect(args: argparse.Namespace) -> int:
    """The manifest's audit (and its plot), or the recipe that made the output (a folder or an s3:// prefix)."""
    from ..output.inspection import plot, report

    if args.recipe:
        return _print_recorded_recipe(args.out)
    print(report(args.out))
    if args.plot:
        png = args.plot if Path(args.plot).suffix else args.plot + ".png"  # what matplotlib writes anyway
        plot(args.out, png)
        print(f"wrote {png}")
    return EXIT_OK


def _print_recorded_recipe(out: str) -> int:
    """The recipe an output records, paths made absolute: the file runs from any folder."""
    from ..output.manifest import read_manifest
    from ..recipe.file import as_recorded, dump_recipe, recipe_from_dict

    meta = read_manifest(out)[1]
    print(dump_recipe(as_recorded(recipe_from_dict(meta["recipe"], str(out)), meta)), end="")
    return EXIT_OK


def demo(args: argparse.Namespace) -> int:
    """Tiny checkpoints made and merged: the whole pipeline in seconds."""
    from ..demo import run_demo

    return run_demo(Path(args.dir), options_from_args(args))


def bench(args: argparse.Namespace) -> int:
    """The floor of the user's storage and cluster, a merge against it, and what that predicts."""
    from ..bench.run import bench as run_bench
    from ..bench.run import report_lines

    report = run_bench(args.where, args.size, options_from_args(args), keep=args.keep)
    for line in report_lines(report):
        print(line)
    return EXIT_OK
