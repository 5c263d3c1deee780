import json
import random

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from dsv4.chat import format as fmt
from dsv4.chat.tokenizer import IncrementalDetokenizer, Tokenizer

# every special string of the chat format that must be a single token
SPECIAL_STRINGS = [
    fmt.BOS,
    fmt.EOS,
    fmt.USER,
    fmt.ASSISTANT,
    fmt.LATEST_REMINDER,
    fmt.THINK_START,
    fmt.THINK_END,
    fmt.DSML,
    *fmt.TASK_TOKENS.values(),
]

MIXED = (
    "Hello, world! 你好，世界。こんにちは、カタカナ。안녕하세요. Привет, мир. مرحبا بالعالم. नमस्ते\n"
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 🧑🏿‍🚀 e\u0301 (combining) vs é, ñ Å ß œ ﬁ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\u00a0nbsp\n"
    "def f(x):\n\treturn {'a': [1, 2, 3], \"b\": x ** 2}  # comment\r\n    \n\n\n   trailing   \n"
    "math: ∑_{i=1}^{n} i² = n(n+1)/2, 3.14159, 1234567890, -0.5e-10; 100% <b>&amp;</b> \\n \x00\x01\x7f\n"
    + "".join(SPECIAL_STRINGS)
    + " mid"
    + fmt.THINK_START
    + "推理 reasoning 🤔"
    + fmt.THINK_END
    + "\n\n"
    + fmt.TOOL_CALLS_START
    + "\n"
    + fmt.INVOKE_START
    + 'get_weather">\n'
    + fmt.PARAMETER_START
    + 'location" string="true">北京 Beijing 🌧️'
    + fmt.PARAMETER_END
    + "\n"
    + fmt.PARAMETER_START
    + 'days" string="false">[1, 2]'
    + fmt.PARAMETER_END
    + "\n"
    + fmt.INVOKE_END
    + "\n"
    + fmt.TOOL_CALLS_END
    + fmt.EOS
    + fmt.TOOL_RESULT_START
    + '{"temp": "22°C"}'
    + fmt.TOOL_RESULT_END
    + fmt.TOOLS_TEMPLATE
    + fmt.REASONING_EFFORT_MAX
)

EMOJI = "😀😃😄😁😆😅🤣😂🙂🙃🫠😉😊😇🥰😍🤩😘😗☺️😚😙🥲😋😛😜🤪😝🤑🤗🤭🫢🫣🤫🤔🫡 👩🏽‍💻🏳️‍🌈🇺🇳 𓀀𓀁 𠀀𠀁𪚥 ꙮ"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def stream(detok: IncrementalDetokenizer, ids, chunk_sizes=None, rng=None) -> list[str]:
    """Feed ids one at a time (or in random chunks); the outputs of every call, flush last."""
    out = []
    i = 0
    while i < len(ids):
        n = 1 if rng is None else rng.randint(1, 7)
        out.append(detok.add(ids[i : i + n]) if n > 1 else detok.add(ids[i]))
        i += n
    out.append(detok.flush())
    return out


def partial_char_ids(tok: Tokenizer) -> list[int]:
    """Ids whose bytes alone are not valid UTF-8: pieces of multi-byte characters."""
    result = []
    for i in range(1000, 128000, 7):
        try:
            tok.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            result.append(i)
    return result


# ------------------------------------------------------------------------------------------ official tokenizer


def test_issue_example(tok):
    text = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
    ids = tok.encode(text)
    assert ids == [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
    assert tok.decode(ids) == text


def test_special_ids(tok):
    assert tok.vocab_size == 129280
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)  # tokenizer_config: pad = EOS
    assert tok.user_id == 128803
    assert tok.assistant_id == 128804
    assert tok.think_start_id == 128821
    assert tok.think_end_id == 128822
    assert tok.dsml_id == 128825
    assert tok.latest_reminder_id == 128828
    assert tok.task_ids == {
        "action": 128829,
        "query": 128830,
        "authority": 128831,
        "domain": 128832,
        "title": 128836,
        "read_url": 128845,
    }
    assert tok.token_to_id(fmt.BOS) == 0 and tok.id_to_token(1) == fmt.EOS
    assert tok.id_to_token(tok.vocab_size) is None
    assert tok.token_to_id("no such token here") is None


def test_special_strings_are_single_tokens(tok):
    for s in SPECIAL_STRINGS:
        [i] = tok.encode(s)
        assert tok.decode([i]) == s
        assert tok.id_to_token(i) == s
    # DSML markup: the marker is one token inside tags
    ids = tok.encode(fmt.TOOL_CALLS_START)
    assert ids.count(tok.dsml_id) == 1 and tok.decode(ids) == fmt.TOOL_CALLS_START


def test_no_bos_added(tok):
    assert tok.encode("hello") == [tok.token_to_id("hello")]
    assert tok.encode("") == []


def test_round_trip_mixed(tok):
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    for s in SPECIAL_STRINGS:
        assert tok.token_to_id(s) in ids
    assert tok.encode_batch([MIXED, EMOJI]) == [ids, tok.encode(EMOJI)]
    assert tok.decode(tok.encode(EMOJI)) == EMOJI


def test_round_trip_golden_prompts(tok, shared_dir):
    for path in sorted((shared_dir / "golden" / "encoding").glob("output_*.txt")):
        text = path.read_text(encoding="utf-8")
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids[0] == tok.bos_id


def test_decode_skip_special(tok):
    ids = tok.encode(fmt.BOS + fmt.USER + "hi" + fmt.ASSISTANT + fmt.THINK_END + "yo" + fmt.EOS)
    # only tokens flagged special (BOS, EOS, pad, placeholders) are skipped; chat markers stay
    assert tok.decode(ids, skip_special=True) == fmt.USER + "hi" + fmt.ASSISTANT + fmt.THINK_END + "yo"
    assert {tok.bos_id, tok.eos_id} <= tok.special_ids and tok.user_id not in tok.special_ids


# ------------------------------------------------------------------------------------------ incremental detokenizer


def test_incremental_token_by_token_valid_text(tok):
    for text in (MIXED, EMOJI, EMOJI * 3 + MIXED):
        ids = tok.encode(text)
        pieces = stream(tok.detokenizer(), ids)
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)  # nothing broken mid-stream
        assert pieces[-1] == ""  # nothing left for flush
    # the emoji text really does split characters across tokens: some calls must hold bytes back
    ids = tok.encode(EMOJI)
    assert any(p == "" for p in stream(tok.detokenizer(), ids)[:-1])
    assert any(len(tok.token_bytes(i)) and not _valid(tok.token_bytes(i)) for i in ids)


def _valid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_incremental_chunks(tok):
    rng = random.Random(1)
    ids = tok.encode(EMOJI + MIXED)
    for _ in range(20):
        pieces = stream(tok.detokenizer(), ids, rng=rng)
        assert "".join(pieces) == EMOJI + MIXED
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_random_ids(tok):
    rng = random.Random(0)
    partial = partial_char_ids(tok)
    specials = [tok.token_to_id(s) for s in SPECIAL_STRINGS] + [2, 128000, 129279]
    emoji_ids = tok.encode(EMOJI)
    for trial in range(300):
        n = rng.randint(1, 40)
        pools = [range(tok.vocab_size), partial, partial, specials, emoji_ids]
        ids = [rng.choice(rng.choice(pools)) for _ in range(n)]
        for skip in (False, True):
            pieces = stream(tok.detokenizer(skip_special=skip), ids, rng=rng if trial % 2 else None)
            assert "".join(pieces) == tok.decode(ids, skip_special=skip), ids


def test_incremental_specials_come_out_whole(tok):
    partial = partial_char_ids(tok)
    emoji_ids = tok.encode("🤔")
    assert len(emoji_ids) > 1
    for s in SPECIAL_STRINGS:
        sid = tok.token_to_id(s)
        d = tok.detokenizer()
        assert d.add(tok.encode("abc")) == "abc"
        assert d.add(sid) == s  # whole, in the call that feeds it
        d.add(emoji_ids[0])  # half an emoji held back ...
        assert d.add(sid) == "\ufffd" + s  # ... is broken by the special token, which still comes out whole
        assert d.add(emoji_ids) == "🤔"
        assert d.add(partial[0]) == ""
        assert d.flush() == "\ufffd"  # really invalid at the end
        assert d.add(sid) == s  # reusable after flush


def test_incremental_unknown_ids_are_dropped_like_decode(tok):
    d = tok.detokenizer()
    ids = [tok.vocab_size + 5, *tok.encode("ok"), 10**6]
    assert "".join(stream(d, ids)) == tok.decode(ids) == "ok"


# ------------------------------------------------------------------------------------------ custom tokenizers


CHAT_STRINGS = [fmt.USER, fmt.ASSISTANT, fmt.LATEST_REMINDER, fmt.THINK_START, fmt.THINK_END, fmt.DSML]
CHAT_STRINGS += list(fmt.TASK_TOKENS.values())


def tiny_bpe(specials=(fmt.BOS, fmt.EOS), chat=tuple(CHAT_STRINGS)) -> HFTokenizer:
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(specials)
    )
    t.train_from_iterator(["hello world, 你好世界 😀 the quick brown fox"] * 20, trainer)
    t.add_tokens([AddedToken(s, special=False, normalized=False) for s in chat])
    return t


def test_model_dir_tokenizer_wins(tmp_path, tok):
    tiny_bpe().save(str(tmp_path / "tokenizer.json"))
    custom = Tokenizer.load(tmp_path)
    assert custom.vocab_size < 1000 and custom.source == str(tmp_path / "tokenizer.json")
    assert (custom.bos_id, custom.eos_id, custom.pad_id) == (0, 1, 1)  # no tokenizer_config: format defaults
    assert custom.user_id == custom.token_to_id(fmt.USER) != tok.user_id
    text = fmt.USER + "hello 你好 🇫🇷" + fmt.ASSISTANT + fmt.THINK_START + "x" + fmt.THINK_END + "😀" + fmt.EOS
    ids = custom.encode(text)
    assert custom.decode(ids) == text and custom.encode(text) != tok.encode(text)
    assert "".join(stream(custom.detokenizer(), ids)) == text
    # tokenizer.json as a file path works too
    assert Tokenizer.load(tmp_path / "tokenizer.json").vocab_size == custom.vocab_size


def test_model_dir_tokenizer_config_eos(tmp_path):
    tiny_bpe(specials=(fmt.BOS, fmt.EOS, "<|eot|>")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot|>"}}))
    custom = Tokenizer.load(tmp_path)
    assert custom.eos_id == custom.token_to_id("<|eot|>") == 2 and custom.pad_id == 2
    assert custom.bos_id == 0


def test_model_dir_without_tokenizer_uses_bundled(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.load(tmp_path).vocab_size == 129280
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        Tokenizer.load(tmp_path / "missing")


def test_missing_special_token_is_a_clear_error(tmp_path):
    tiny_bpe(chat=[s for s in CHAT_STRINGS if s != fmt.THINK_END]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="lacks special token.*</think>"):
        Tokenizer.load(tmp_path)
    tiny_bpe(specials=(fmt.BOS,)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=fmt.EOS):
        Tokenizer.load(tmp_path)


def test_generic_decoder_window(tmp_path):
    """A non-byte-level tokenizer (WordPiece decoder) streams through the prefix-window scheme."""
    vocab = {w: i for i, w in enumerate([fmt.BOS, fmt.EOS, "[UNK]", "hello", "world", "play", "##ing", ",", "."])}
    t = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece()
    t.add_special_tokens([fmt.BOS, fmt.EOS])
    t.add_tokens([AddedToken(s, special=False, normalized=False) for s in CHAT_STRINGS])
    t.save(str(tmp_path / "tokenizer.json"))
    custom = Tokenizer.load(tmp_path)
    with pytest.raises(TypeError, match="byte-level"):
        custom.token_bytes(3)
    rng = random.Random(0)
    for trial in range(50):
        ids = [rng.randrange(custom.vocab_size) for _ in range(rng.randint(1, 20))]
        pieces = stream(custom.detokenizer(), ids, rng=rng if trial % 2 else None)
        assert "".join(pieces) == custom.decode(ids), ids
