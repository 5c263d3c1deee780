"""The `dsv4` command line: one console script, one module per subcommand in `dsv4.commands`."""

from __future__ import annotations

import argparse
import importlib

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


if __name__ == "__main__":
    raise SystemExit(main())
