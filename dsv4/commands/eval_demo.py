"""`dsv4 eval-demo`: the demo model's held-out accuracy through the real HTTP server.

Starts `dsv4 serve` over --model in a child process (or uses the server at --url), asks the first N test-split
arithmetic, weather and calculator questions of the demo corpus in non-think and think-high mode, greedy,
8 at a time, and prints: arithmetic exact-answer accuracy, the share of think-high replies with reasoning,
the tool-call rate (the right tool with the right JSON arguments) and the final-answer accuracy after the tool
result. `dsv4.demo.evaluate` describes the grading."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import UsageError, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..demo.evaluate import MODES

    p = sub.add_parser("eval-demo", help="held-out accuracy of the demo model through the real server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model directory to serve (default: the shipped demo model, dsv4/demo/model)")
    p.add_argument("--url", default=None, help="evaluate the server already running at URL instead")
    p.add_argument("--api-key", default=None, help="key for --url's server")
    p.add_argument("--questions", type=positive_int, default=100, metavar="N", help="questions per skill")
    p.add_argument("--seed", type=int, default=0, help="which held-out questions (the corpus seed)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="reasoning modes to grade")
    p.add_argument("--max-tokens", type=positive_int, default=400, help="cap on each reply")
    p.add_argument("--workers", type=positive_int, default=8, help="requests in flight at once")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.set_defaults(run=run)


def _check_model(text: str | None) -> Path:
    from ..demo import MODEL_DIR

    path = Path(text) if text is not None else MODEL_DIR
    if not path.is_dir():
        if text is None:
            raise UsageError(f"the demo model is not there ({path} does not exist); pass --model DIR or --url URL")
        raise UsageError(f"--model {text!r}: no such directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {str(path)!r}: not a model directory (no config.json)")
    return path


def run(args: argparse.Namespace) -> int:
    from ..demo.evaluate import EvalError, evaluate, stderr_progress

    try:
        if args.url is not None and args.model is not None:
            raise UsageError("give --model or --url, not both")
        model_dir = _check_model(args.model) if args.url is None else None
        report = evaluate(model_dir, url=args.url, per_skill=args.questions, seed=args.seed,
                          max_tokens=args.max_tokens, workers=args.workers, modes=args.modes, api_key=args.api_key,
                          progress=stderr_progress(max(25, args.questions // 2)) if sys.stderr.isatty() else None)
    except (EvalError, ValueError) as err:  # UsageError, CheckpointError: bad input
        print(f"dsv4 eval-demo: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
