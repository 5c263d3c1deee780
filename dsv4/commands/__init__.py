"""Subcommands of the `dsv4` console script, one module each.

Every module exposes `register(subparsers)`, which adds its parser and sets `run` (a function of the
parsed namespace returning the exit status) as the parser default. `dsv4.cli` lists the modules.
"""
