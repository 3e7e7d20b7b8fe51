"""`chatvec plan | merge | extract | apply | run | verify | inspect | demo | bench`: parse, dispatch, report."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable

from ..errors import ChatvecError, RunError
from ..log import show_on_stderr
from . import commands
from .parser import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_RUN_FAILED, EXIT_USAGE, build_parser

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": commands.plan,
    "merge": commands.run,
    "extract": commands.run,
    "apply": commands.run,
    "run": commands.run,
    "verify": commands.verify,
    "inspect": commands.inspect,
    "demo": commands.demo,
    "bench": commands.bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_on_stderr()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM stops like Ctrl-C: journal kept, resumable
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe is handled: not at exit, where Python reports it
        return code
    except RunError as e:  # first: a RunError is a ChatvecError too
        print(f"chatvec: error: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except ChatvecError as e:
        print(f"chatvec: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("chatvec: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `chatvec plan ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_BROKEN_PIPE


def entry() -> int:
    """The `chatvec` command: `main`, then Ray left at once (an embedded Ray stopped, a cluster left running):
    Ray's own exit hook first sleeps 0.5 s for log lines this driver does not show."""
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
