"""The `dsv4` command line: one console script, one module per subcommand in `dsv4.commands`."""

from __future__ import annotations

import argparse
import importlib
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
    """The `dsv4` console script and `python -m dsv4`: exit with `main`'s code; a process that ended a process
    group (a torchrun rank) through `leave_process`, past the interpreter's teardown, where gloo's worker threads
    can abort it after all its work is done."""
    code = main()
    from .parallel.distributed import ended_a_group, leave_process

    if ended_a_group():
        leave_process(code)
    raise SystemExit(code)


if __name__ == "__main__":
    console()
