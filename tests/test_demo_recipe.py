"""The demo model's build: the pieces it added to the training stack and the whole recipe end to end.

  * `prepare(chat_loss=...)`: "all" (pre-training on transcripts: every token a target, no mask) vs
    "assistant" (fine-tuning: the loss mask of `render_chat`);
  * `TrainConfig.init_from`: a run starting from another run's model weights;
  * `Trainer._groups` with no target row: a packed window lying wholly inside a masked chat prompt;
  * `build_demo(RECIPES["demo-smoke"])` (corpus -> tokenizer -> shards -> pre-train -> fine-tune -> export) and
    `dsv4 train --recipe`: the same seed gives the same bytes, and what comes out is an official checkpoint
    (FP8 weights, FP4 routed experts, config/tokenizer/generation_config) that loads and runs.

The smoke build runs once per module (the determinism test builds a second time, through the CLI).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, prepare_shakespeare_docs
from safetensors import safe_open

from dsv4.chat.encoding import encode_messages
from dsv4.chat.tokenizer import Tokenizer
from dsv4.checkpoint.loader import load_model
from dsv4.checkpoint.schema import expected_tensors
from dsv4.cli import main
from dsv4.demo import corpus
from dsv4.demo.recipe import RECIPES, STAGES, build_demo
from dsv4.train.data import (
    DataError,
    PackedLoader,
    ShardWriter,
    open_split,
    prepare,
    read_manifest,
    render_chat,
    split_documents,
)
from dsv4.train.tokenizers import byte_tokenizer
from dsv4.train.trainer import TrainConfig, Trainer, TrainError, build_model, latest_checkpoint

SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
MODEL = {"n_layers": 2, "n_hash_layers": 1, "compress_ratios": [0, 4, 0]}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    threads = torch.get_num_threads()  # the recipe sets its own thread count
    yield
    torch.set_num_threads(threads)


def config(data, out, **changes) -> TrainConfig:
    base = dict(data=str(data), out=str(out), preset="tiny", model=dict(MODEL), steps=2, batch_size=2, seq_len=32,
                warmup_steps=1, lr=3e-3, eval_every=0, eval_batches=2, log_every=1, progress=False, seed=0)
    return TrainConfig(**{**base, **changes})


# ------------------------------------------------------------------------------------------------ prepare chat_loss


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> tuple[Path, list[dict]]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    records = [c.record() for c in corpus.conversations(0, 40, "train", text)]
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    corpus.write_jsonl(path, iter(records))
    return path, records


def test_chat_loss_all_writes_no_mask_and_assistant_writes_the_mask(chats, tmp_path):
    path, records = chats
    every = prepare([path], tmp_path / "all", tokenizer="bytes", chat_loss="all")
    masked = prepare([path], tmp_path / "assistant", tokenizer="bytes")  # the default: the fine-tuning mask
    assert every["options"]["chat_loss"] == "all" and masked["options"]["chat_loss"] == "assistant"
    a, m = every["splits"]["train"], masked["splits"]["train"]
    assert a["documents"] == m["documents"] == len(records) and a["tokens"] == m["tokens"]
    assert not a["mask"] and a["loss_tokens"] == a["tokens"] and not (tmp_path / "all" / "train.mask.u8").exists()
    assert m["mask"] and 0 < m["loss_tokens"] < m["tokens"]
    # the same token stream either way; only the targets differ
    stream = "train.tokens.u32"
    assert (tmp_path / "all" / stream).read_bytes() == (tmp_path / "assistant" / stream).read_bytes()
    shard_all, shard_masked = open_split(tmp_path / "all"), open_split(tmp_path / "assistant")
    assert shard_all.mask is None
    tok = byte_tokenizer()
    for i, r in enumerate(records):
        ids, mask, _ = render_chat(r["messages"], tok, tools=r.get("tools"))
        assert shard_all.document(i).tolist() == shard_masked.document(i).tolist() == ids.tolist()
        assert shard_all.document_mask(i).all()
        assert shard_masked.document_mask(i).tolist() == mask.tolist()
    # every token a target also reaches the packed batches: only document ends lack one
    batch = PackedLoader(shard_all, 64, 2, shuffle=False).next_batch()
    assert torch.equal(batch.loss_mask[:, :-1], ~batch.doc_starts[:, 1:])

    with pytest.raises(DataError, match="chat_loss"):
        prepare([path], tmp_path / "bad", tokenizer="bytes", chat_loss="none")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_cli_chat_loss_flag(chats, tmp_path):
    path, _ = chats
    assert main(["prepare-data", str(path), "--out", str(tmp_path / "d"), "--tokenizer", "bytes",
                 "--chat-loss", "all"]) == 0
    manifest = read_manifest(tmp_path / "d")
    assert manifest["options"]["chat_loss"] == "all" and not manifest["splits"]["train"]["mask"]


# ------------------------------------------------------------------------------------------------ trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_shakespeare_docs(tmp_path_factory.mktemp("shakespeare"), chars=20000, parts=150)


def test_init_from_starts_from_another_runs_weights(data, tmp_path):
    first = Trainer(config(data, tmp_path / "first"))
    first.train()
    saved = torch.load(latest_checkpoint(tmp_path / "first") / "state.pt", map_location="cpu",
                       weights_only=True)["model"]
    fresh = build_model(config(data, tmp_path / "x", seed=1)).state_dict()
    differ = [k for k in saved if saved[k].is_floating_point() and not torch.equal(saved[k], fresh[k])]
    assert len(differ) > 10  # so equality below is not the seed's doing
    for source in (tmp_path / "first", latest_checkpoint(tmp_path / "first")):  # a run or a checkpoint
        second = Trainer(config(data, tmp_path / "second", seed=1, init_from=str(source)))
        state = second.model.state_dict()
        assert state.keys() == saved.keys() and second.step == 0
        for k in saved:
            assert torch.equal(state[k], saved[k]), k
            assert torch.equal(state[k], first.model.state_dict()[k]), k

    missing = tmp_path / "no-such-run"
    with pytest.raises(TrainError, match=re.escape(str(missing))):
        Trainer(config(data, tmp_path / "third", init_from=str(missing)))
    other_shape = config(data, tmp_path / "fourth", init_from=str(tmp_path / "first"),
                         model={**MODEL, "n_routed_experts": 4})
    with pytest.raises(TrainError, match="init_from .*cannot start from its weights"):
        build_model(other_shape)


def _with_split(data: Path, root: Path, split: str, docs: list[tuple[np.ndarray, np.ndarray | None]]) -> Path:
    """A copy of the prepared `data` with `split` replaced by `docs` (ids, mask) written by ShardWriter."""
    root.mkdir()
    for f in data.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    for f in root.glob(f"{split}.*"):
        f.unlink()
    manifest = read_manifest(root)
    writer = ShardWriter(root, split, int(manifest["tokenizer"]["vocab_size"]))
    for ids, mask in docs:
        writer.add(ids, mask)
    manifest["splits"][split] = writer.close()
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def test_evaluate_survives_a_window_wholly_inside_a_masked_prompt(data, tmp_path):
    """A val document longer than seq_len whose first seq_len+1 tokens are masked (a long chat prompt): the first
    val window has no target (position j's target is token j+1 only where the mask of j+1 is set), so
    `split_documents` drops every piece and returns zero rows. Before the fix `_groups` returned [rows] for
    those zero rows and `evaluate` ran the model on a [0, 0] batch, which the model refuses (its cache needs
    batch_size > 0); now such a batch is skipped and the loss is the mean over the windows that have targets."""
    L = 32
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, 3 * L + 1)
    mask = np.ones(ids.size, dtype=np.uint8)
    mask[:L + 1] = 0
    root = _with_split(data, tmp_path / "data", "val", [(ids, mask)])
    cfg = config(root, tmp_path / "run", batch_size=1, seq_len=L, eval_batches=3)
    trainer = Trainer(cfg)
    first = PackedLoader(open_split(root, "val"), L, 1, shuffle=False).next_batch()
    assert not first.loss_mask.any() and len(split_documents(first, trainer.pad_id).lengths) == 0
    record = trainer.evaluate()
    # windows 1 and 2 hold the 2L targets (tokens L+1 .. 3L); window 0 none
    assert record["val_tokens"] == int(mask[1:3 * L + 1].sum()) == 2 * L
    assert np.isfinite(record["val_loss"]) and record["val_loss"] > 0


def test_a_train_step_without_targets_changes_nothing(data, tmp_path):
    """The same for training: a step whose batches have no target at all (every window inside prompts) runs,
    reports zero tokens and loss, and leaves the weights as they were."""
    rng = np.random.default_rng(1)
    docs = [(rng.integers(0, 256, 50), np.zeros(50, dtype=np.uint8)) for _ in range(8)]
    root = _with_split(data, tmp_path / "data", "train", docs)
    trainer = Trainer(config(root, tmp_path / "run", batch_size=2, seq_len=32))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    record = trainer.train_step()
    assert record["tokens"] == 0 and record["loss"] == 0.0 and record["grad_norm"] == 0.0 and trainer.step == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ the recipe


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    model_dir = build_demo(RECIPES["demo-smoke"], out, None, SHAKESPEARE)
    assert model_dir == out / "model"
    return out


def _files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("model*.safetensors"))
    assert files
    return files


def assert_same_safetensors(a: Path, b: Path) -> None:
    """Byte-identical files (the writer sorts the header's `__metadata__` keys, which safetensors would write in
    hash-map order), with a non-empty tensor payload."""
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    n = int.from_bytes(raw_a[:8], "little")
    assert json.loads(raw_a[8:8 + n])["__metadata__"]["format"] == "pt"
    assert len(raw_a) > 8 + n and raw_a == raw_b, a.name


def test_same_seed_gives_the_same_weights_and_tokenizer(built, tmp_path, capsys):
    """The issue's requirement: a second run from the same seed gives the same weights (here through
    `dsv4 train --recipe`, with --export elsewhere)."""
    out, export = tmp_path / "again", tmp_path / "exported"
    assert main(["train", "--recipe", "demo-smoke", "--out", str(out), "--shakespeare", str(SHAKESPEARE),
                 "--seed", "0", "--export", str(export)]) == 0
    assert f"exported to {export}" in capsys.readouterr().err
    assert not (out / "model").exists()
    first, second = _files(built / "model"), _files(export)
    assert [f.name for f in first] == [f.name for f in second]
    for a, b in zip(first, second, strict=True):
        assert_same_safetensors(a, b)
    for name in ("tokenizer.json", "config.json", "generation_config.json", "model.safetensors.index.json"):
        assert (built / "model" / name).read_bytes() == (export / name).read_bytes(), name
    assert (built / "tokenizer" / "tokenizer.json").read_bytes() == (out / "tokenizer" / "tokenizer.json").read_bytes()
    for split in ("train", "test"):
        assert (built / "corpus" / f"{split}.jsonl").read_bytes() == (out / "corpus" / f"{split}.jsonl").read_bytes()


def test_rerun_resumes_from_the_finished_stages(built, tmp_path, capsys):
    """Every stage is already done: a rerun trains nothing and exports the same model again."""
    model_dir = build_demo(RECIPES["demo-smoke"], built, tmp_path / "re", SHAKESPEARE)
    err = capsys.readouterr().err
    assert "pretrain: already trained (3 steps)" in err and "sft: already trained (3 steps)" in err
    assert "writing the corpus" not in err and "BPE" not in err
    for a, b in zip(_files(built / "model"), _files(model_dir), strict=True):
        assert_same_safetensors(a, b)


def test_stages_use_the_intended_data(built):
    """Pre-training: Shakespeare, the fact drills and the train conversations, every token a target;
    fine-tuning: a few drills and the same conversations with the assistant mask, the held-out test
    conversations as its val split, from pretrain's weights in fp32; QAT from the fine-tuned weights under the
    FP8 + FP4 expert recipe, and that last round is what is exported."""
    recipe = RECIPES["demo-smoke"]
    pre, sft = read_manifest(built / "data" / "pretrain"), read_manifest(built / "data" / "sft")
    assert pre["options"]["chat_loss"] == "all" and set(pre["splits"]) == {"train"}
    documents = recipe.train_conversations + 1 + recipe.pretrain_drills
    assert pre["splits"]["train"]["documents"] == documents and not pre["splits"]["train"]["mask"]
    assert [Path(s["path"]).name for s in pre["sources"]] == ["shakespeare.txt", "drills.jsonl", "train.jsonl"]
    assert sft["options"]["chat_loss"] == "assistant"
    documents = recipe.train_conversations + recipe.sft_drills
    assert sft["splits"]["train"]["documents"] == documents and sft["splits"]["train"]["mask"]
    assert sft["splits"]["val"]["documents"] == recipe.test_conversations and sft["splits"]["val"]["mask"]
    assert sft["tokenizer"]["sha256"] == pre["tokenizer"]["sha256"]
    test_ids = open_split(built / "data" / "sft", "val").document(0)
    tok = Tokenizer.load(built / "tokenizer" / "tokenizer.json")
    first_test = json.loads((built / "corpus" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first_test["messages"][0]["content"] in tok.decode(test_ids.tolist())
    exported = json.loads((built / "model" / "train_config.json").read_text(encoding="utf-8"))
    configs = {stage: json.loads((latest_checkpoint(built / stage) / "config.json").read_text(encoding="utf-8"))
               for stage in ("sft", "qat")}
    assert configs["sft"]["init_from"] == str(built / "pretrain") and configs["sft"]["precision"] == "fp32"
    assert configs["qat"]["init_from"] == str(built / "sft") and configs["qat"]["precision"] == "fp8+fp4"
    assert configs["sft"]["data"] == configs["qat"]["data"] == str(built / "data" / "sft")
    assert STAGES[-1] == "qat"
    assert {k: exported[k] for k in ("init_from", "precision", "data", "steps")} == {
        k: configs["qat"][k] for k in ("init_from", "precision", "data", "steps")}
    shakespeare = (built / "corpus" / "shakespeare.txt").read_text(encoding="utf-8")
    full = SHAKESPEARE.read_text(encoding="utf-8")
    assert full.startswith(shakespeare) and len(shakespeare) == int(len(full) * 0.9)


def test_export_is_an_official_checkpoint_that_loads_and_runs(built):
    model_dir = built / "model"
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (model_dir / name).is_file(), name
    tok = Tokenizer.load(model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == tok.eos_id and generation["bos_token_id"] == tok.bos_id
    assert tok.hf.to_str() == Tokenizer.load(built / "tokenizer" / "tokenizer.json").hf.to_str()

    model = load_model(model_dir, numerics="exact")
    assert model.args.vocab_size == tok.vocab_size == RECIPES["demo-smoke"].vocab_size
    specs = expected_tensors(model.args, "converted")
    seen, experts, fp8 = set(), 0, 0
    for f in _files(model_dir):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                spec = specs[name]
                tensor = st.get_slice(name)
                assert (tensor.get_dtype(), tuple(tensor.get_shape())) == (spec.dtype, spec.shape), name
                seen.add(name)
                if ".ffn.experts." in name and name.endswith(".weight"):
                    assert st.get_tensor(name).dtype == torch.float4_e2m1fn_x2, name
                    assert st.get_tensor(name[:-len("weight")] + "scale").dtype == torch.float8_e8m0fnu, name
                    experts += 1
                elif tensor.get_dtype() == "F8_E4M3":
                    assert st.get_tensor(name).dtype == torch.float8_e4m3fn
                    fp8 += 1
    assert seen == set(specs)
    args = model.args
    assert experts == (args.n_layers + args.n_mtp_layers) * args.n_routed_experts * 3
    assert fp8 > 20 and specs["layers.0.attn.wq_a.weight"].dtype == "F8_E4M3"
    assert specs["layers.0.ffn.shared_experts.w1.weight"].dtype == "F8_E4M3"

    prompt = encode_messages([{"role": "user", "content": "What is 12 + 34?"}], thinking_mode="thinking")
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (1, ids.shape[1], tok.vocab_size) and torch.isfinite(logits).all()


def test_cli_recipe_refuses_bad_input(tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert main(["train", "--recipe", "demo-smoke", "--out", str(tmp_path / "run"), *argv]) == 2
        return capsys.readouterr().err

    err = fails()
    assert err.startswith("dsv4 train: ") and "--shakespeare" in err
    missing = tmp_path / "input.txt"
    assert str(missing) in fails("--shakespeare", str(missing))
    err = fails("--shakespeare", str(SHAKESPEARE), "--steps", "5")
    assert "steps" in err and "--recipe" in err
    assert "lr" in fails("--shakespeare", str(SHAKESPEARE), "--lr", "0.1")
    assert not (tmp_path / "run").exists()  # nothing was started
