"""The `chatvec` command line's grammar: commands, options, their help and an example for each command."""

from __future__ import annotations

import argparse
from typing import NoReturn

from .. import __version__
from ..dtypes import OUTPUT_DTYPES
from ..errors import printable
from ..recipe.spec import (
    ALPHA,
    BACKENDS,
    DEVICES,
    EXTRACT_DTYPE,
    VOCAB_POLICIES,
    Recipe,
    RunOptions,
    Target,
    human_bytes,
    parse_size,
)

# exit statuses (listed in `chatvec --help`)
EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_RUN_FAILED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # as a shell reports a process stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # as a shell reports a process stopped by SIGPIPE

DESCRIPTION = "Add chat vectors (chat − base) to continually pre-trained models: plan, merge, extract, apply, audit."
EXIT_STATUSES = f"""exit status:
  {EXIT_OK}    done (verify: the output matches its manifest)
  {EXIT_MISMATCH}    verify found a mismatch
  {EXIT_USAGE}    a usage error or bad input: fix the command line, recipe or checkpoints
  {EXIT_RUN_FAILED}    a run started and failed: fix the cause, then run the same command again to resume
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C, SIGTERM): run the same command again to resume
  {EXIT_BROKEN_PIPE}  the output pipe closed early (as in `chatvec plan ... | head`)"""

BASE, CHAT, CP = "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", "./llama2-zh"
EXAMPLES = {
    "plan": [f"chatvec plan --base {BASE} --chat {CHAT} --cp {CP} --save plan.parquet"],
    "merge": [
        f"chatvec merge --base {BASE} --chat {CHAT} --cp {CP} --out ./llama2-zh-chat",
        f"chatvec merge --base {BASE} --chat {CHAT} --cp zh={CP} --cp ko=./llama2-ko --alpha 0.5,1 --out ./merged",
    ],
    "extract": [f"chatvec extract --base {BASE} --chat {CHAT} --out ./llama2-chat-vector --dtype bfloat16"],
    "apply": [f"chatvec apply --vector ./llama2-chat-vector --cp {CP} --alpha 0.5 --out ./llama2-zh-chat"],
    "run": [
        f"chatvec merge --base {BASE} --chat {CHAT} --cp {CP} --out ./llama2-zh-chat --print-recipe > recipe.yaml",
        "chatvec run recipe.yaml --backend local",
    ],
    "verify": ["chatvec verify ./llama2-zh-chat", "chatvec verify --sources ./llama2-zh-chat"],
    "inspect": ["chatvec inspect ./llama2-zh-chat --plot layers.png", "chatvec inspect ./llama2-zh-chat --recipe"],
    "demo": ["chatvec demo --backend local"],
    "bench": ["chatvec bench /mnt/models/tmp --size 5GB", "chatvec bench s3://my-bucket/scratch --address auto"],
}


class Parser(argparse.ArgumentParser):
    """Usage errors in two lines, not a usage dump: what is wrong, and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"chatvec: error: {printable(message)}\nrun '{self.prog} --help' to see the options\n")


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="chatvec",
        description=DESCRIPTION,
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chatvec {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (chatvec COMMAND --help: its options)"
    )

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog="\n  ".join(["examples:" if len(EXAMPLES[name]) > 1 else "example:", *EXAMPLES[name]]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("plan", "show what a merge would do, without running it")
    _recipe_args(p, vector=False, cp=True, out_required=False)
    p.add_argument("--save", metavar="PLAN.parquet", help="also write the plan (one row per output tensor) as Parquet")
    p = command("merge", "out = cp + Σ alpha·(chat − base)")
    _recipe_args(p, vector=False, cp=True)
    p.add_argument(
        "--chat-template-from-chat", action="store_true", help="copy the chat model's chat template where CP has none"
    )
    _run_args(p)
    p = command("extract", "write the chat vector (chat − base) as its own checkpoint")
    _recipe_args(p, vector=False, cp=False)
    _run_args(p)
    p = command("apply", "out = cp + alpha·vector, with a vector from `chatvec extract`")
    _recipe_args(p, vector=True, cp=True)
    _run_args(p)
    p = command("run", "run a recipe file (YAML; see --print-recipe)")
    p.add_argument("recipe", help="the recipe file, as --print-recipe or `chatvec inspect OUT --recipe` write it")
    _run_args(p)
    p = command("verify", "rehash an output against its manifest")
    p.add_argument("out", help="an output folder that chatvec wrote")
    p.add_argument(
        "--sources",
        action="store_true",
        help="also reread every source tensor the output was made from and compare it with its recorded digest",
    )
    p = command("inspect", "summarize an output's manifest: per-layer updates, rules, anything unusual")
    p.add_argument("out", help="an output folder that chatvec wrote")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plot", metavar="FILE.png", help="draw per-layer relative update norms (needs matplotlib)")
    what.add_argument(
        "--recipe", action="store_true", help="print the recipe that made this output, as a file for `chatvec run`"
    )
    p = command("demo", "make tiny Llama-shaped base/chat/CP checkpoints and merge them")
    p.add_argument("--dir", default="chatvec-demo", help="where to put the demo models (default: ./%(default)s)")
    _run_args(p, recipe=False)
    p = command("bench", "measure your storage's I/O floor and a merge against it, and predict big merges")
    p.add_argument("where", help="a folder or s3:// prefix where your models live (a scratch folder is made under it)")
    p.add_argument(
        "--size", type=size_arg, default="2GB", metavar="SIZE", help="bytes per synthetic checkpoint (default: 2GB)"
    )
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and the merged output")
    _run_args(p, recipe=False)
    return parser


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
            help=f"scale per vector (one value applies to all; default: {ALPHA:g}); a list sweeps: one output each",
        )
        p.add_argument(
            "--vocab",
            choices=VOCAB_POLICIES,
            default=Target.vocab,
            help="extended vocabulary: skip keeps CP's embed/lm_head, overlap merges the shared rows, "
            "full needs equal shapes; auto: full where shapes match, else skip (default: %(default)s)",
        )
        p.add_argument(
            "--exclude", action="append", default=[], metavar="REGEX", help="keep CP's values for matching tensors"
        )
        p.add_argument(
            "--alpha-rule",
            action="append",
            default=[],
            metavar="REGEX=A[:A...]",
            help="matching tensors get alpha A (every vector) instead of --alpha, or a gradient A0:A1:... over "
            "the layers (repeatable: the first match wins), e.g. 'norm=0' 'mlp\\.=0.5:1'",
        )
        if not vector:
            p.add_argument(
                "--special-tokens",
                metavar="auto|FILE.json",
                help="CP's embedding and LM head rows of these tokens become the chat model's: auto (the tokens "
                'of its chat template, eos and bos, found by text in both tokenizers) or a JSON map {"CP_ID": CHAT_ID}',
            )
    p.add_argument(
        "--dare",
        action="append",
        metavar="DENSITY[:SEED]",
        help="DARE: keep each element of a vector's delta with probability DENSITY (typically 0.1–0.3), scaled by "
        "1/DENSITY; one value applies to every vector, or give one per vector (default seed: 0)",
    )
    p.add_argument(
        "--ties",
        type=float,
        metavar="DENSITY",
        help="TIES: trim each vector to its top DENSITY magnitudes per tensor, elect each element's sign, average "
        "the agreeing entries weighted by alpha",
    )
    p.add_argument(
        "--out",
        required=out_required,
        help="output directory (the root of several outputs: one per CP and alpha)"
        if out_required
        else "the output directory the plan is for (default: none)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(OUTPUT_DTYPES),
        help="output dtype (default: CP's)" if cp else f"output dtype (default: {EXTRACT_DTYPE})",
    )
    p.add_argument(
        "--max-shard-size",
        type=size_arg,
        default=Recipe.max_shard_size,
        metavar="SIZE",
        help=f"largest output shard (default: {human_bytes(Recipe.max_shard_size)})",
    )
    p.add_argument(
        "--unit-size",
        type=size_arg,
        default=Recipe.unit_bytes,
        metavar="SIZE",
        help=f"bytes of output per work unit (default: {human_bytes(Recipe.unit_bytes, binary=True)})",
    )


def _run_args(p: argparse.ArgumentParser, recipe: bool = True) -> None:
    if recipe:
        p.add_argument("--print-recipe", action="store_true", help="print the equivalent recipe file and exit")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=RunOptions.backend,
        help="ray: Ray actors, on a cluster or an embedded local Ray; local: threads in this process "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="how many workers (default: one per CPU, or per GPU on GPUs)"
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        metavar="N",
        default=RunOptions.cpus_per_worker,
        help="Ray CPUs each worker reserves (default: %(default)g)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=RunOptions.device,
        help="auto: one worker per GPU where the cluster has GPUs, else CPU workers (default: %(default)s)",
    )
    p.add_argument(
        "--address", metavar="HOST:PORT", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start over: discard a partial output (and redo outputs this job already committed)",
    )
    p.add_argument("--no-progress", action="store_true", help="draw no progress bar on stderr")
    p.add_argument(
        "--fail-on-nonfinite",
        action="store_true",
        help="refuse to commit an output with NaN/Inf values (by default they are counted in the manifest)",
    )
