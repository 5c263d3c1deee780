"""Training data: shards, the chat loss mask, splits, packing, resuming, per-document rows, the CLI.

The central property (`test_packed_loss_equals_sum_of_per_document_losses`): a packed batch turned into
per-document rows gives exactly the loss of computing each document alone with a real (tiny) DeepSeek-V4,
sliding window and compressors included - the sample-level attention masking of V4 training.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsv4.chat.encoding import render_tool_calls
from dsv4.chat.format import BOS, EOS, THINK_END
from dsv4.chat.tokenizer import Tokenizer
from dsv4.cli import main
from dsv4.config import preset
from dsv4.model import Transformer, init_weights
from dsv4.train.data import (
    IGNORE_INDEX,
    DataError,
    PackedLoader,
    Shard,
    ShardWriter,
    open_split,
    prepare,
    read_manifest,
    render_chat,
    split_documents,
)
from dsv4.train.tokenizers import BYTE_VOCAB_SIZE, byte_tokenizer

TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "reasoning_content": "greet back", "content": "Hello."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "call the tool", "content": "Checking.", "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
    {"role": "assistant", "reasoning_content": "report it", "content": "Sunny and 21C."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return byte_tokenizer()


def masked_runs(tok: Tokenizer, ids, mask) -> list[str]:
    """The decoded text of each maximal run of loss tokens."""
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def random_docs(n: int, seed: int, lo: int = 1, hi: int = 40, vocab: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(lo, hi + 1)).astype(np.uint32) for _ in range(n)]


def write_split(root, docs, masks=None, split="train", vocab=BYTE_VOCAB_SIZE) -> Shard:
    w = ShardWriter(root, split, vocab)
    for k, d in enumerate(docs):
        w.add(d, None if masks is None else masks[k])
    return Shard(root, split, w.close())


# ------------------------------------------------------------------------------------------------ tokenizer


def test_byte_tokenizer_ids_are_the_documented_ones_and_survive_tokenizer_json(tok, tmp_path):
    """Bytes are their own ids and the specials sit at 256..269, so small models with vocab 270 fit; the
    saved tokenizer.json (what a trained model ships) loads back through the ordinary `Tokenizer.load`."""
    assert tok.vocab_size == BYTE_VOCAB_SIZE == 270
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.think_end_id, tok.dsml_id) == (
        256, 257, 258, 259, 262, 263)
    text = "héllo\n" + BOS + "x" + THINK_END
    assert tok.encode(text) == [*"héllo\n".encode(), 256, ord("x"), 262]
    (tmp_path / "tokenizer.json").write_text(tok.hf.to_str(), encoding="utf-8")
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------------------------ shards


def test_shard_round_trip_tokens_boundaries_and_back_filled_masks(tmp_path):
    """Documents, offsets and masks come back exactly; a mask first seen mid-split back-fills ones."""
    docs = random_docs(7, seed=0, vocab=BYTE_VOCAB_SIZE)
    rng = np.random.default_rng(1)
    masks = [None, None, rng.integers(0, 2, docs[2].size), None, rng.integers(0, 2, docs[4].size), None, None]
    w = ShardWriter(tmp_path, "train", BYTE_VOCAB_SIZE)
    for d, m in zip(docs, masks, strict=True):
        w.add(d, m)
    w.add(np.zeros(0, dtype=np.uint32))  # empty documents are skipped
    info = w.close()
    assert info["documents"] == 7 and info["tokens"] == sum(d.size for d in docs) and info["mask"]
    shard = Shard(tmp_path, "train", info)
    assert len(shard) == 7 and shard.offsets.tolist() == np.cumsum([0] + [d.size for d in docs]).tolist()
    for i, (d, m) in enumerate(zip(docs, masks, strict=True)):
        assert shard.document(i).tolist() == d.tolist()
        assert shard.document_mask(i).tolist() == (np.ones(d.size, int) if m is None else m).tolist()
    assert info["loss_tokens"] == int(shard.mask.sum())
    with pytest.raises(DataError, match="token ids"):
        ShardWriter(tmp_path / "..", "x", 10).add([3, 10])


def test_damaged_shard_is_refused(tmp_path):
    shard = write_split(tmp_path, random_docs(3, seed=0))
    info = {"documents": len(shard), "tokens": shard.num_tokens + 1, "mask": False}
    with pytest.raises(DataError, match="expected"):
        Shard(tmp_path, "train", info)


# ------------------------------------------------------------------------------------------------ chat


@pytest.mark.parametrize("tokenizer", ["bytes", "official"])
def test_chat_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    """Masked tokens decode to each assistant message's own output (reasoning where rendered, `</think>`,
    content, DSML tool calls, EOS) and nothing else: not BOS, system/user/tool turns, nor the
    `<｜Assistant｜><think>` that opens a turn. drop_thinking drops the reasoning of turns before the
    last user turn (the tool result merges into that turn), as the encoder does."""
    from dsv4.train.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)[0]
    ids, mask, canonical = render_chat(CONVERSATION, tok)
    calls = "\n\n" + render_tool_calls([TOOL_CALL])
    assert masked_runs(tok, ids, mask) == [
        "Hello." + EOS, "Checking." + calls + EOS, "report it" + THINK_END + "Sunny and 21C." + EOS]
    assert canonical and tok.decode(ids).startswith(BOS + "Be brief.<｜User｜>Hi!<｜Assistant｜></think>")
    assert tok.decode(ids[mask == 0]).endswith("<tool_result>sunny, 21C</tool_result><｜Assistant｜><think>")

    # every reasoning kept; without reasoning "auto" renders chat mode (no empty <think></think> to learn)
    ids, mask, _ = render_chat(CONVERSATION, tok, drop_thinking=False)
    assert masked_runs(tok, ids, mask)[0] == "greet back" + THINK_END + "Hello." + EOS
    plain = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask, _ = render_chat(plain, tok)
    assert masked_runs(tok, ids, mask) == ["4" + EOS]
    assert tok.decode(ids) == BOS + "<｜User｜>2+2?<｜Assistant｜></think>4" + EOS


# ------------------------------------------------------------------------------------------------ prepare


def test_prepare_splits_by_position_documents_and_tokens(tmp_path):
    """position cuts one text like nanoGPT's TinyShakespeare split; documents and tokens keep documents whole."""
    text = "".join(f"line {i}: to be or not to be\n" for i in range(50))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    m = prepare([tmp_path / "a.txt"], tmp_path / "pos", tokenizer="bytes", val_fraction=0.1, bos=False, eos=False)
    cut = int(len(text) * 0.9)
    assert m["options"]["split"] == "position"
    assert bytes(open_split(tmp_path / "pos", "train").tokens.astype(np.uint8)).decode() == text[:cut]
    assert bytes(open_split(tmp_path / "pos", "val").tokens.astype(np.uint8)).decode() == text[cut:]

    lines = [json.dumps({"text": f"doc {i} " + "x" * (i % 7)}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a blank line is skipped
    by_docs = [prepare([tmp_path / "d.jsonl"], tmp_path / f"docs{s}", tokenizer="bytes", val_fraction=0.25, seed=s)
               for s in (0, 1)]
    assert [m["splits"]["val"]["documents"] for m in by_docs] == [10, 10]
    assert by_docs[0]["splits"]["train"]["documents"] == 30
    val = [open_split(tmp_path / f"docs{s}", "val") for s in (0, 1)]
    assert [val[0].document(i).tolist() for i in range(10)] != [val[1].document(i).tolist() for i in range(10)]
    first = val[0].document(0).tolist()
    assert first[0] == 256 and first[-1] == 257  # BOS ... EOS around each document by default

    m = prepare([tmp_path / "d.jsonl"], tmp_path / "tok", tokenizer="bytes", val_fraction=0.25, split="tokens")
    s = m["splits"]
    assert abs(s["val"]["tokens"] / (s["val"]["tokens"] + s["train"]["tokens"]) - 0.25) < 0.03


# ------------------------------------------------------------------------------------------------ packing


def test_packing_is_deterministic_for_a_seed_and_differs_for_another(tmp_path):
    shard = write_split(tmp_path, random_docs(30, seed=2))
    run = [[b.tokens.clone() for b in (PackedLoader(shard, 16, 4, seed=s).next_batch() for _ in range(8))]
           for s in (5, 5, 6)]
    assert all(torch.equal(a, b) for a, b in zip(run[0], run[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(run[0], run[2], strict=True))
    # the second epoch is another order, not a replay of the first
    loader = PackedLoader(shard, 16, 4, seed=5)
    first, second = [[loader.next_batch().tokens for _ in range(loader.batches_per_epoch)] for _ in range(2)]
    assert not torch.equal(torch.cat(first), torch.cat(second))


def test_targets_are_next_tokens_of_the_same_document_only(tmp_path):
    """No target ever crosses a document boundary; unmasked (prompt) tokens are never targets."""
    docs = random_docs(25, seed=3)
    masks = [np.random.default_rng(k).integers(0, 2, d.size) for k, d in enumerate(docs)]
    shard = write_split(tmp_path, docs, masks)
    loader = PackedLoader(shard, 16, 3, seed=0, shuffle=False)
    stream = np.concatenate(docs)
    doc_of = np.repeat(np.arange(len(docs)), [d.size for d in docs])
    mask = np.concatenate(masks)
    for step in range(loader.batches_per_epoch):
        batch = loader.next_batch()
        for b in range(3):
            a = (step * 3 + b) * 16  # shuffle=False: windows in stream order from offset 0
            assert batch.tokens[b].tolist() == stream[a:a + 16].tolist()
            for j in range(16):
                p = a + j
                ok = p + 1 < stream.size and doc_of[p + 1] == doc_of[p] and mask[p + 1]
                assert batch.targets[b, j].item() == (stream[p + 1] if ok else IGNORE_INDEX)
                assert batch.doc_starts[b, j].item() == (j == 0 or doc_of[p] != doc_of[p - 1])
            assert batch.continues[b].item() == (a > 0 and doc_of[a] == doc_of[a - 1])


def test_resume_mid_epoch_gives_exactly_the_remaining_batches(tmp_path):
    shard = write_split(tmp_path, random_docs(20, seed=4))
    loader = PackedLoader(shard, 12, 3, seed=9)
    per_epoch = loader.batches_per_epoch
    total = 2 * per_epoch + 2  # crosses two epoch boundaries
    straight = [loader.next_batch() for _ in range(total)]
    for cut in (1, per_epoch, per_epoch + 1):
        first = PackedLoader(shard, 12, 3, seed=9)
        for _ in range(cut):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # it is plain data, as a checkpoint stores it
        resumed = PackedLoader(shard, 12, 3, seed=9)
        resumed.load_state_dict(state)
        for want in straight[cut:]:
            got = resumed.next_batch()
            assert (got.epoch, got.step) == (want.epoch, want.step)
            assert torch.equal(got.tokens, want.tokens) and torch.equal(got.targets, want.targets)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(shard, 12, 3, seed=10).load_state_dict(state)


def test_split_documents_rows_are_the_document_pieces(tmp_path):
    """Rows are the pieces of documents inside the windows (a continuation is a row of its own), with their
    targets; dropping target-less pieces and sorting by length loses nothing; buckets cut padding."""
    docs = random_docs(12, seed=5, lo=1, hi=30)
    shard = write_split(tmp_path, docs)
    stream = np.concatenate(docs)
    ends = np.cumsum([d.size for d in docs])
    loader = PackedLoader(shard, 20, 2, seed=0, shuffle=False)
    for step in range(loader.batches_per_epoch):
        batch = loader.next_batch()
        rows = split_documents(batch)
        assert rows.lengths.tolist() == sorted(rows.lengths.tolist(), reverse=True)
        assert int(rows.loss_mask.sum()) == int(batch.loss_mask.sum())
        for r in range(len(rows.lengths)):
            n, (b, s) = int(rows.lengths[r]), rows.origin[r].tolist()
            p = (step * 2 + b) * 20 + s
            d = int(np.searchsorted(ends, p, side="right"))
            assert p + n <= ends[d] and (s == 0 or p == ends[d] - docs[d].size)  # inside one document
            assert rows.tokens[r, :n].tolist() == stream[p:p + n].tolist()
            assert rows.targets[r, :n].tolist() == batch.targets[b, s:s + n].tolist()
            assert (rows.targets[r, n:] == IGNORE_INDEX).all()
        groups = rows.buckets(max_tokens=24)
        assert sum(len(g.lengths) for g in groups) == len(rows.lengths)
        assert sum(g.tokens.numel() for g in groups) <= rows.tokens.numel()
        assert sum(int(g.loss_mask.sum()) for g in groups) == int(rows.loss_mask.sum())


@torch.no_grad()
def test_packed_loss_equals_sum_of_per_document_losses(tmp_path):
    """The masking property on a real tiny V4 (window 8, compressors of ratio 4 and 8, hash and learned MoE):
    the packed batch through split_documents (padded rows with lengths, and again in length buckets) gives
    the summed loss of every document piece run alone; the naive packed forward (attention across
    boundaries) does not - which is why the rows exist."""
    docs = random_docs(14, seed=6, lo=3, hi=20, vocab=BYTE_VOCAB_SIZE)
    masks = [np.random.default_rng(k).integers(0, 2, d.size) for k, d in enumerate(docs)]
    shard = write_split(tmp_path, docs, masks)
    model = init_weights(Transformer(preset("tiny").replace(vocab_size=BYTE_VOCAB_SIZE), dtype=torch.float32),
                         seed=0).eval()
    batch = PackedLoader(shard, 24, 2, seed=1).next_batch()
    rows = split_documents(batch)
    assert len(rows.lengths) >= 3 and int(rows.lengths[0]) > 8  # longer than the window: compressors matter

    def row_losses(tokens, targets, lengths=None):  # [N]: each row's summed CE
        logits = model(tokens, lengths=lengths)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)

    alone = torch.cat([row_losses(rows.tokens[r:r + 1, :n], rows.targets[r:r + 1, :n])
                       for r, n in enumerate(rows.lengths.tolist())])
    torch.testing.assert_close(row_losses(rows.tokens, rows.targets, rows.lengths), alone, rtol=1e-5, atol=1e-4)
    bucketed = torch.cat([row_losses(g.tokens, g.targets, g.lengths) for g in rows.buckets(max_tokens=30)])
    torch.testing.assert_close(bucketed, alone, rtol=1e-5, atol=1e-4)
    naive = row_losses(batch.tokens, batch.targets).sum()
    assert abs(naive.item() - alone.sum().item()) > 1e-2


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prepares_text_and_chat_end_to_end(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    assert main(["prepare-data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "text"), "--tokenizer", "bytes",
                 "--val-fraction", "0.1", "--no-bos", "--no-eos"]) == 0
    assert "train: 1 documents, 1,098 tokens" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "text")
    assert manifest["tokenizer"]["name"] == "bytes" and manifest["splits"]["val"]["tokens"] == 122
    assert Tokenizer.load(tmp_path / "text").vocab_size == BYTE_VOCAB_SIZE  # tokenizer.json shipped beside

    chats = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "2+2?"},
                                                       {"role": "assistant", "content": "4"}]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    assert main(["prepare-data", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "chat")]) == 0
    manifest = read_manifest(tmp_path / "chat")
    assert manifest["sources"][0]["format"] == "chat" and manifest["tokenizer"]["name"] == "official"
    assert manifest["chat"] == {"conversations": 2, "non_canonical": 0, "without_assistant": 0}
    shard = open_split(tmp_path / "chat")
    tok = Tokenizer.bundled()
    assert masked_runs(tok, shard.document(1), shard.document_mask(1)) == ["4" + EOS]
    assert shard.mask is not None and manifest["splits"]["train"]["loss_tokens"] == int(shard.mask.sum())


def test_cli_bad_input_names_the_file_and_line(tmp_path, capsys):
    def fails(*argv, tokenizer="bytes"):
        assert main(["prepare-data", *map(str, argv), "--tokenizer", str(tokenizer)]) == 2
        return capsys.readouterr().err

    assert "no such file" in fails(tmp_path / "missing.txt", "--out", tmp_path / "o1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken"\n')
    assert f"{bad}:2: invalid JSON" in fails(bad, "--out", tmp_path / "o2")
    bad.write_text('{"text": "ok"}\n\n{"txt": "no"}\n')
    assert f"{bad}:3: a document record needs" in fails(bad, "--out", tmp_path / "o3")
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    assert f"{bad}:1: messages[0]: unknown role" in fails(bad, "--out", tmp_path / "o4")
    assert not (tmp_path / "o4").exists()  # a failed run leaves nothing behind, so it can simply be rerun
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    assert "conversations cannot be cut" in fails(bad, "--out", tmp_path / "o5", "--split", "position",
                                                  "--val-fraction", "0.5")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not an empty directory" in fails(bad, "--out", tmp_path / "full")
    assert "tokenizer.json" in fails(bad, "--out", tmp_path / "o6", tokenizer=tmp_path / "nope.json")
    with pytest.raises(SystemExit):  # argparse: a fraction outside [0, 1)
        main(["prepare-data", str(bad), "--out", str(tmp_path / "o7"), "--val-fraction", "1.5"])
    with pytest.raises(DataError, match="no manifest.json"):
        open_split(tmp_path / "o1")
    shard = write_split(tmp_path, random_docs(2, seed=0, lo=3, hi=5))
    with pytest.raises(ValueError, match="fewer than one batch"):
        PackedLoader(shard, 16, 4)
