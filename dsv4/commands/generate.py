"""`dsv4 generate`: run a model with the cache and report prefill/decode tokens per second.

The model is an official checkpoint (`--checkpoint`: the HF download, a converted or a per-rank directory, a
plain export), a preset with random weights (`--preset`), or by default the demo model shipped in the package
(`dsv4.demo.MODEL_DIR`). The prompt is token ids (`--prompt`), text (`--text`, encoded with the checkpoint's
tokenizer), or by default random ids - for a checkpoint with a tokenizer, a chat turn asking a sum in thinking
mode. With a tokenizer the output is also printed as text. Started by `torchrun
--nproc-per-node N -m dsv4 generate ...` it runs tensor + expert parallel over the N processes
(gloo on CPU): each rank loads (or builds) only its shard, and only rank 0 prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import kernels
from .common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate tokens with the cache and report tokens/s")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="model preset (tiny, small, flash, pro); random weights")
    source.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="official checkpoint directory (HF download, converted, per-rank or plain export; "
                             "default: the demo model shipped in the package)")
    gen.add_argument("--numerics", choices=("plain", "exact"), default="exact",
                     help="exact: official FP8/FP4 storage and QAT simulation; plain: float weights")
    gen.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="comma-separated prompt token ids (default: random)")
    prompt.add_argument("--text", default=None, help="prompt text, encoded with the checkpoint's tokenizer")
    gen.add_argument("--prompt-len", type=positive_int, default=32, help="length of the random prompt")
    gen.add_argument("--batch", type=positive_int, default=1, help="number of prompts decoded together")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="<= 0 means greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    gen.add_argument("--kernel-backend", choices=kernels.backend_names(), default=None,
                     help=f"kernel backend (default: ${kernels.ENV_VAR}, else {kernels.DEFAULT_BACKEND})")
    gen.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where to run; under torchrun, cuda means GPU LOCAL_RANK per process and NCCL collectives")
    gen.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..checkpoint.reader import read_args
    from ..config import ConfigError, preset
    from ..parallel import ShardingError, check_shardable, close_distributed, init_distributed

    if args.checkpoint is None and args.preset is None:
        from ..demo import MODEL_DIR

        args.checkpoint = str(MODEL_DIR)
    tokenizer = None
    try:
        if args.checkpoint:
            path = Path(args.checkpoint)
            if not path.exists():
                raise CheckpointError(f"{path}: no such checkpoint directory")
            root = path if path.is_dir() else path.parent
            model_args = read_args(root)[0]
            if (root / "tokenizer.json").is_file():
                from ..chat.tokenizer import Tokenizer

                tokenizer = Tokenizer.load(root)
        else:
            model_args = preset(args.preset)
    except (ConfigError, CheckpointError) as err:
        print(f"dsv4 generate: {err}", file=sys.stderr)
        return 2
    if args.text is not None or (tokenizer is not None and args.prompt is None):
        if tokenizer is None:
            print("dsv4 generate: --text needs a checkpoint with a tokenizer.json", file=sys.stderr)
            return 2
        if args.text is None:
            from ..chat.encoding import encode_messages

            ids = tokenizer.encode(encode_messages([{"role": "user", "content": "What is 347 + 589?"}],
                                                   thinking_mode="thinking"))
        else:
            ids = [tokenizer.bos_id] + tokenizer.encode(args.text)
        prompts = [ids] * args.batch
    elif args.prompt:
        try:
            prompt = [int(t) for t in args.prompt.split(",")]
        except ValueError:
            print(f"dsv4 generate: --prompt must be comma-separated integers, got {args.prompt!r}", file=sys.stderr)
            return 2
        bad = [t for t in prompt if not 0 <= t < model_args.vocab_size]
        if bad:
            print(f"dsv4 generate: prompt ids {bad} outside the vocabulary [0, {model_args.vocab_size})",
                  file=sys.stderr)
            return 2
        prompts = [prompt] * args.batch
    else:
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, model_args.vocab_size, (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.batch)]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("dsv4 generate: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    env = init_distributed(device=args.device)  # under torchrun (WORLD_SIZE > 1): tensor parallel over the ranks
    done = False
    try:
        check_shardable(model_args, env.world_size)
        _generate(args, model_args, prompts, env, tokenizer)
        done = True
    except (ShardingError, CheckpointError) as err:
        if env.is_main:
            print(f"dsv4 generate: {err}", file=sys.stderr)
        return 2
    finally:
        close_distributed(env, wait_for_peers=done)
    return 0


def _generate(args: argparse.Namespace, model_args, prompts: list[list[int]], env, tokenizer=None) -> None:
    from ..generate import generate
    from ..model import Transformer
    from ..runtime import checkpoint_model, preset_model

    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        counts = Transformer(model_args).parameter_counts()  # the whole model's (each rank holds a shard)
    if args.checkpoint:
        model = checkpoint_model(args.checkpoint, numerics=args.numerics, dtype=dtype, device=env.device, env=env)
        source = f"checkpoint {args.checkpoint}"
    else:
        model = preset_model(args.preset, numerics=args.numerics, dtype=dtype, device=env.device, seed=args.seed,
                             env=env)
        source = f"preset {args.preset} (random weights)"
    eos = tokenizer.eos_id if tokenizer is not None else None
    with kernels.use_backend(args.kernel_backend):
        result = generate(model, prompts, args.max_new_tokens, args.temperature, eos_id=eos, seed=args.seed)
    if not env.is_main:
        return
    parallel = f", tensor parallel over {env.world_size} processes" if env.world_size > 1 else ""
    print(f"model: {source}, {counts['total'] / 1e6:.1f}M parameters, "
          f"{args.numerics} numerics, {args.dtype}{parallel}")
    for b, toks in enumerate(result.tokens):
        print(f"[{b}] {','.join(map(str, toks))}")
        if tokenizer is not None:
            print(f"[{b}] {tokenizer.decode(toks)!r}")
    print(f"prefill: {result.prefill_tokens} tokens in {result.prefill_seconds:.2f}s = {result.prefill_tps:.1f} tok/s")
    print(f"decode:  {result.decode_tokens} tokens in {result.decode_seconds:.2f}s = {result.decode_tps:.1f} tok/s")
