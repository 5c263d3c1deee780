"""The demo model's recipe: corpus -> tokenizer -> token shards -> pre-train -> fine-tune -> official checkpoint.

    dsv4 train --recipe demo --out runs/demo --export DIR     (under an hour on 2 CPU cores)

Stages (all in `out`, each skipped when its result is already there, so an interrupted build resumes):
  corpus/      train.jsonl and test.jsonl (`dsv4.demo.corpus`, held-out by question), shakespeare.txt (the
               first 90% of TinyShakespeare) and drills.jsonl (`corpus.fact_drills`: the single-digit steps
               of the arithmetic traces, as text)
  tokenizer/   tokenizer.json: a BPE trained on the rendered train conversations and the Shakespeare text
  data/pretrain, data/sft
               `dsv4.train.data.prepare` shards. Pre-training: Shakespeare, the drills and the conversations with
               every token a target; fine-tuning: the conversations with the loss on the assistant's turns only
               (plus a few drills), and the test conversations as the held-out split (its loss is the val loss)
  pretrain/    a `Trainer` run: Muon, dense CSA for the first steps then sparse, in fp32
  sft/         a `Trainer` run starting from pretrain's weights (`init_from`), in fp32 too: the FP8 fake
               quantisation of every activation costs ~30% of a CPU step
  qat/         a short last round from sft's weights under the fp8+fp4 recipe: FP8 weights and activations and
               the FP4 expert QAT that V4 adds late in training (training.md §3.4), so the export is exactly the
               weights the model was trained with
  export       `Trainer.export` (FP8 weights, FP4 experts, config.json, tokenizer.json) + generation_config.json

Everything is seeded: the same seed, thread count and torch build give the same weights, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat import encoding as enc
from . import corpus

__all__ = ["RECIPES", "STAGES", "DemoRecipe", "build_demo", "demo_model_args"]

STAGES = ("pretrain", "sft", "qat")

# greedy by default: the demo's arithmetic traces leave one right next token, and sampling at T = 1 (V4's
# recommendation for the real models) would make a 3M-parameter model slip a digit
GENERATION_CONFIG = {"bos_token_id": None, "eos_token_id": None, "do_sample": False, "temperature": 1.0,
                     "top_p": 1.0}


def demo_model_args() -> dict[str, Any]:
    """ModelArgs overrides on the `tiny` preset: dim 128, 4 layers (sliding-only, CSA 4, HCA 16, CSA 4) + an MTP
    block, 8 routed experts (the first layer hash-routed) + 1 shared, window 128: about 3.2M parameters."""
    return {"dim": 128, "moe_inter_dim": 128, "n_layers": 4, "n_hash_layers": 1, "n_mtp_layers": 1, "n_heads": 4,
            "n_routed_experts": 8, "n_activated_experts": 2, "q_lora_rank": 64, "head_dim": 32, "rope_head_dim": 16,
            "o_groups": 2, "o_lora_rank": 64, "window_size": 128, "compress_ratios": [0, 4, 16, 4, 0],
            "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16, "original_seq_len": 1024,
            "max_seq_len": 4096}


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the build depends on."""

    seed: int = 0
    train_conversations: int = 30000
    test_conversations: int = 1000
    vocab_size: int = 2048
    model: dict[str, Any] = field(default_factory=demo_model_args)
    seq_len: int = 512
    batch_size: int = 8
    # a packed batch holds ~30 conversations: grouped by length (padding ~20%, not ~75%) into forwards of at most
    # this many positions (4096 runs ~10% more tokens a second than 2048 on 2 cores)
    bucket_tokens: int = 4096
    pretrain_drills: int = 4500  # documents of 40 facts: about 30% of the pre-training tokens
    sft_drills: int = 1500
    pretrain_steps: int = 380
    pretrain_lr: float = 3e-3
    dense_steps: int = 60
    sft_steps: int = 380
    sft_lr: float = 3e-3
    qat_steps: int = 60
    qat_lr: float = 1e-3
    warmup_steps: int = 30
    eval_every: int = 100
    threads: int = 2

    def train_config(self, stage: str, out: Path) -> dict[str, Any]:
        """The TrainConfig fields of a stage (one of `STAGES`)."""
        common = {"preset": "tiny", "model": self.model, "seq_len": self.seq_len, "batch_size": self.batch_size,
                  "seed": self.seed, "warmup_steps": self.warmup_steps, "threads": self.threads, "progress": True,
                  "log_every": 10, "keep_checkpoints": 1, "bucket_tokens": self.bucket_tokens}
        if stage == "pretrain":
            return {**common, "data": str(out / "data" / "pretrain"), "out": str(out / "pretrain"),
                    "steps": self.pretrain_steps, "lr": self.pretrain_lr, "precision": "fp32",
                    "dense_steps": self.dense_steps, "eval_every": 0}
        tuning = {"data": str(out / "data" / "sft"), "out": str(out / stage), "eval_every": self.eval_every,
                  "eval_batches": 4}
        if stage == "sft":
            return {**common, **tuning, "steps": self.sft_steps, "lr": self.sft_lr, "precision": "fp32",
                    "init_from": str(out / "pretrain")}
        if stage == "qat":
            return {**common, **tuning, "steps": self.qat_steps, "lr": self.qat_lr, "precision": "fp8+fp4",
                    "init_from": str(out / "sft"), "warmup_steps": min(self.warmup_steps, self.qat_steps // 4)}
        raise ValueError(f"unknown stage {stage!r}; the stages are {STAGES}")


RECIPES = {
    "demo": DemoRecipe(),
    # the same pipeline in seconds (tests: determinism, the format of what comes out)
    "demo-smoke": DemoRecipe(train_conversations=300, test_conversations=20, vocab_size=600, seq_len=128,
                             batch_size=2, bucket_tokens=2048, pretrain_drills=20, sft_drills=5,
                             pretrain_steps=3, dense_steps=1, sft_steps=3, qat_steps=2,
                             warmup_steps=1,
                             eval_every=0, model={**demo_model_args(), "dim": 32, "moe_inter_dim": 32,
                                                  "q_lora_rank": 16, "o_lora_rank": 16}),
}


def _log(message: str) -> None:
    print(f"dsv4 demo: {message}", file=sys.stderr, flush=True)


def _render(conv: dict[str, Any]) -> str:
    think = any(m.get("reasoning_content") for m in conv["messages"])
    return enc.encode_messages(conv["messages"], tools=conv.get("tools"),
                               thinking_mode="thinking" if think else "chat")


def _write_corpus(recipe: DemoRecipe, root: Path, shakespeare_path: Path) -> None:
    text = shakespeare_path.read_text(encoding="utf-8")
    text = text[:int(len(text) * 0.9)]  # the last 10% stays unseen (nanoGPT's split)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "shakespeare.txt").write_text(text, encoding="utf-8")
    for split, count in (("train", recipe.train_conversations), ("test", recipe.test_conversations)):
        records = (c.record() for c in corpus.conversations(recipe.seed, count, split, text))
        corpus.write_jsonl(tmp / f"{split}.jsonl", records)
    for name, count in (("drills", recipe.pretrain_drills), ("sft-drills", recipe.sft_drills)):
        drills = corpus.fact_drills(f"{recipe.seed}-{name}", count)
        corpus.write_jsonl(tmp / f"{name}.jsonl", ({"text": d} for d in drills))
    tmp.rename(root)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_demo(recipe: DemoRecipe, out: str | Path, export: str | Path | None, shakespeare: str | Path) -> Path:
    """Run the recipe in `out` (stages already done are kept) and export the model to `export` (default
    out/model). Returns the model directory."""
    from ..train.data import prepare
    from ..train.trainer import TrainConfig, Trainer
    from .tokenizer import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2) + "\n", encoding="utf-8")
    corpus_dir = out / "corpus"
    if not (corpus_dir / "test.jsonl").is_file():
        _log(f"writing the corpus ({recipe.train_conversations} + {recipe.test_conversations} conversations)")
        _write_corpus(recipe, corpus_dir, Path(shakespeare))
    tok_file = out / "tokenizer" / "tokenizer.json"
    if not tok_file.is_file():
        _log(f"training a {recipe.vocab_size}-id BPE tokenizer")
        texts = [_render(c) for c in _read_jsonl(corpus_dir / "train.jsonl")]
        texts.append((corpus_dir / "shakespeare.txt").read_text(encoding="utf-8"))
        tok = train_tokenizer(texts, recipe.vocab_size)
        tok_file.parent.mkdir(parents=True, exist_ok=True)
        tok_file.write_text(tok.hf.to_str(pretty=True), encoding="utf-8")
    data = out / "data"
    if not (data / "pretrain" / "manifest.json").is_file():
        shutil.rmtree(data / "pretrain", ignore_errors=True)
        prepare([corpus_dir / "shakespeare.txt", corpus_dir / "drills.jsonl", corpus_dir / "train.jsonl"],
                data / "pretrain", tokenizer=str(tok_file), chat_loss="all")
    if not (data / "sft" / "manifest.json").is_file():
        _fine_tuning_shards([corpus_dir / "sft-drills.jsonl", corpus_dir / "train.jsonl"], data / "sft", corpus_dir,
                            tok_file)
    for stage in STAGES:
        config = TrainConfig.from_dict(recipe.train_config(stage, out))
        done = out / stage / "checkpoints" / "latest"
        if done.is_file():
            trainer = Trainer.from_checkpoint(out / stage, progress=config.progress)
            if trainer.step >= config.steps:
                _log(f"{stage}: already trained ({trainer.step} steps)")
                continue
            _log(f"{stage}: resuming at step {trainer.step}")
        else:
            _log(f"{stage}: {config.steps} steps")
            trainer = Trainer(config)
        trainer.train()
    model_dir = Path(export) if export is not None else out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    trainer = Trainer.from_checkpoint(out / STAGES[-1], progress=False)
    trainer.export(model_dir)
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    generation = {**GENERATION_CONFIG, "bos_token_id": ids["<｜begin▁of▁sentence｜>"],
                  "eos_token_id": ids["<｜end▁of▁sentence｜>"]}
    (model_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    _log(f"exported to {model_dir}")
    return model_dir


def _fine_tuning_shards(inputs: list[Path], target: Path, corpus_dir: Path, tok_file: Path) -> None:
    """`inputs` as the train split of `target` (assistant-token loss) and exactly the test conversations as its
    "val" split (a documents split by index would draw them at random): prepare each, then move the test
    shard's train split in as val."""
    from ..train.data import prepare

    test = target.with_name(target.name + "-test")
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(test, ignore_errors=True)
    prepare(inputs, target, tokenizer=str(tok_file))
    prepare([corpus_dir / "test.jsonl"], test, tokenizer=str(tok_file))
    _adopt_as_val(target, test)


def _adopt_as_val(target: Path, source: Path) -> None:
    """Move `source`'s train split into `target` as its val split (same tokenizer), then delete `source`."""
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    other = json.loads((source / "manifest.json").read_text(encoding="utf-8"))
    if other["tokenizer"]["sha256"] != manifest["tokenizer"]["sha256"]:
        raise ValueError("the val shard was tokenized differently")
    for suffix in ("tokens.u32", "docs.u64", "mask.u8"):
        if (source / f"train.{suffix}").is_file():
            shutil.move(source / f"train.{suffix}", target / f"val.{suffix}")
    manifest["splits"]["val"] = other["splits"]["train"]
    manifest["sources"] += [{**s, "split": "val"} for s in other["sources"]]
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(source)
