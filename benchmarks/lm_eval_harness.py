"""EleutherAI's lm-evaluation-harness against `dsv4 serve`, in process and offline.

Two small tasks ship with the tests (tests/lm_eval_tasks): `dsv4_demo_facts`, ten multiple-choice questions scored
by loglikelihood through `/v1/completions` (lm-eval's `local-completions`: several token-id prompts per request,
`echo` + `logprobs`, the continuation's prompt logprobs summed), and `dsv4_demo_sums`, five held-out sums answered
through `/v1/chat/completions` (`local-chat-completions`, generate_until, the last integer of the reply graded).
The server is `dsv4 serve`'s own stack (the runtime's serve context, uvicorn on a loopback port); prints lm-eval's
result table of each task.

Nothing is downloaded: lm-eval needs a Hugging Face tokenizer for loglikelihoods (to split context from
continuation), so the server's own tokenizer is written to a temporary directory as tokenizer.json and loaded from
there; the datasets are the shipped JSONL files (`dataset_path: json`, read from the repository root).

    pip install "lm-eval[api]"                        # not a dsv4 dependency
    python benchmarks/lm_eval_harness.py              # the demo model
    python benchmarks/lm_eval_harness.py --model tiny --max-gen-toks 128  # a preset: random weights, 256-token context
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lm_eval_tasks"


def write_tokenizer(tokenizer, directory: str) -> str:
    """The server's tokenizer as a Hugging Face tokenizer directory (tokenizer.json + a config naming its class
    and special tokens), what `AutoTokenizer.from_pretrained` loads without a hub lookup."""
    from dsv4.chat import format as fmt

    tokenizer.hf.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": fmt.BOS, "eos_token": fmt.EOS}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="demo (default), a preset or a checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per /v1/completions request")
    parser.add_argument("--concurrency", type=int, default=5, help="chat requests in flight at once")
    parser.add_argument("--max-batch", type=int, default=8, help="the engine's batch (requests decoded together)")
    parser.add_argument("--max-gen-toks", type=int, help="max_tokens of the generation task (default: the task's, "
                                                          "400; a request past the server's context is a 400)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before lm-eval imports transformers and datasets
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ModuleNotFoundError:
        sys.exit('lm-eval is not installed; it is not a dsv4 dependency: pip install "lm-eval[api]"')

    from dsv4.runtime import EngineConfig, ModelSource, build_serve_context
    from dsv4.serve.app import create_app
    from dsv4.serve.background import serve_in_thread

    ctx = build_serve_context(ModelSource(model=args.model), EngineConfig(max_batch=args.max_batch))
    name = ctx.config.served_model_names[0]
    os.chdir(REPO)  # the task files name their data from the repository root
    tasks = TaskManager(include_path=str(TASKS))
    with tempfile.TemporaryDirectory() as tokdir, serve_in_thread(create_app(ctx)) as url:
        start = time.perf_counter()
        loglikelihood = lm_eval.simple_evaluate(
            model="local-completions", tasks=["dsv4_demo_facts"], task_manager=tasks,
            model_args={"model": name, "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
                        "tokenizer": write_tokenizer(ctx.backend.tokenizer, tokdir), "tokenized_requests": True,
                        "batch_size": args.batch_size, "max_length": ctx.config.max_context})
        middle = time.perf_counter()
        generation = lm_eval.simple_evaluate(
            model="local-chat-completions", tasks=["dsv4_demo_sums"], task_manager=tasks, apply_chat_template=True,
            gen_kwargs=None if args.max_gen_toks is None else {"max_gen_toks": args.max_gen_toks},
            model_args={"model": name, "base_url": f"{url}/v1/chat/completions", "num_concurrent": args.concurrency})
        end = time.perf_counter()
    print(f"\nlocal-completions ({name}, loglikelihood, {middle - start:.1f} s)")
    print(make_table(loglikelihood))
    print(f"local-chat-completions ({name}, generate_until, {end - middle:.1f} s)")
    print(make_table(generation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
