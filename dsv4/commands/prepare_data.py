"""`dsv4 prepare-data`: text files, JSONL documents and JSONL chat conversations -> token shards.

The work is done by `dsv4.train.data.prepare` (its module docstring describes the shard format, the chat
loss mask and the splits); this module parses the command line, draws the progress bar and turns bad input
into exit status 2 with a message naming the file and line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError, human_bytes


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.data import DATA_FORMATS, SPLIT_MODES

    p = sub.add_parser(
        "prepare-data", help="tokenize text / JSONL documents / JSONL chat into memory-mapped token shards",
        description="Writes OUT/manifest.json, {train,val}.tokens.u32 (uint32 ids), {split}.docs.u64 (document "
                    "offsets) and, for chat, {split}.mask.u8 (1 = loss on the token: assistant-produced text only).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files (.txt: one document per file; "
                   ".jsonl: {\"text\": ...} or {\"messages\": [...], \"tools\"?: [...]} per line)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--format", choices=DATA_FORMATS, default="auto",
                   help="how to read the inputs (auto: per file, by extension and first record)")
    p.add_argument("--tokenizer", default="official",
                   help="official (DeepSeek-V4, 129,280 ids), bytes (256 byte ids + 14 V4 specials), "
                        "or a tokenizer.json path")
    p.add_argument("--val-fraction", type=_fraction, default=0.0, help="share held out for validation (default 0)")
    p.add_argument("--split", choices=SPLIT_MODES, default="auto",
                   help="documents | tokens: whole documents; position: cut each text at 1-F of its characters "
                        "(auto: position for a single text file, else documents)")
    p.add_argument("--seed", type=int, default=0, help="which documents go to validation (documents split)")
    p.add_argument("--no-bos", dest="bos", action="store_false", help="no BOS before each text/jsonl document")
    p.add_argument("--no-eos", dest="eos", action="store_false", help="no EOS after each text/jsonl document")
    p.add_argument("--thinking-mode", choices=("auto", "thinking", "chat"), default="auto",
                   help="chat rendering (auto: thinking when an assistant message has reasoning_content)")
    p.add_argument("--keep-thinking", dest="drop_thinking", action="store_false",
                   help="keep the reasoning of earlier assistant turns (the encoder drops it by default)")
    p.add_argument("--chat-loss", choices=("assistant", "all"), default="assistant",
                   help="chat targets: what the assistant produces (fine-tuning), or every token (pre-training)")
    p.set_defaults(run=run)


def _progress_bar(total: int):
    """A tqdm bar over the input bytes on stderr (off when stderr is not a terminal); None without tqdm,
    which the project does not depend on directly (it comes with huggingface_hub / transformers)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - only in a minimal install
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare-data", file=sys.stderr, disable=None)


def run(args: argparse.Namespace) -> int:
    from ..train.data import DataError, prepare

    bar = None
    try:
        missing = [p for p in args.inputs if not Path(p).is_file()]
        if missing:
            raise UsageError(f"no such file: {', '.join(missing)}")
        bar = _progress_bar(sum(Path(p).stat().st_size for p in args.inputs))
        manifest = prepare(args.inputs, args.out, tokenizer=args.tokenizer, fmt=args.format,
                           val_fraction=args.val_fraction, split=args.split, seed=args.seed, bos=args.bos,
                           eos=args.eos, thinking_mode=args.thinking_mode, drop_thinking=args.drop_thinking,
                           chat_loss=args.chat_loss, progress=bar.update if bar is not None else None)
    except (UsageError, DataError) as err:
        if bar is not None:
            bar.close()
        print(f"dsv4 prepare-data: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if bar is not None:
            bar.close()
        print(f"dsv4 prepare-data: {err}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    tok = manifest["tokenizer"]
    print(f"wrote {args.out}: tokenizer {tok['name']} ({tok['vocab_size']:,} ids)")
    for name, s in manifest["splits"].items():
        masked = f", {s['loss_tokens']:,} loss tokens" if s["mask"] else ""
        print(f"  {name}: {s['documents']:,} documents, {s['tokens']:,} tokens "
              f"({human_bytes(4 * s['tokens'])}){masked}")
    chat = manifest.get("chat")
    if chat and (chat["non_canonical"] or chat["without_assistant"]):
        print(f"  chat: {chat['conversations']:,} conversations, {chat['without_assistant']} without an assistant "
              f"turn, {chat['non_canonical']} tokenized differently from their whole text", file=sys.stderr)
    return 0
