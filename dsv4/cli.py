"""The `dsv4` command line: one console script, one module per subcommand in `dsv4.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

COMMANDS = ("generate", "plan", "inspect", "convert", "make_checkpoint", "serve", "prepare_data", "chat", "train",
            "eval_demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in readable PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dsv4.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def console() -> NoReturn:
    """The `dsv4` console script and `python -m dsv4`: exit with `main`'s code. A process that ended a process
    group (a torchrun rank) exits without the interpreter's teardown, once its output is flushed: gloo's worker
    threads may still be dropping the last collective's work then (a barrier holding an earlier broadcast's
    tensors), and a thread that needs the GIL while the interpreter finalizes aborts the process (SIGABRT,
    "terminate called without an active exception") after all its work is done."""
    code = main()
    from .parallel.distributed import ended_a_group

    if ended_a_group():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    console()
