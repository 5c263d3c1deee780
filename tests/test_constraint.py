"""Grammar-constrained decoding in the engine: masks applied per request in the sampler, batched with unconstrained
requests, under MTP speculation and the prefix cache, and the closer that finishes before the budget ends."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch

from dsv4.chat.closing import JsonCloser, scan_json
from dsv4.chat.grammars import completion_grammar
from dsv4.chat.tokenizer import Tokenizer
from dsv4.config import preset
from dsv4.demo import MODEL_DIR
from dsv4.engine import Engine, SamplingParams
from dsv4.engine.constraint import Grammar, GrammarError, GrammarTokenizer
from dsv4.generate import generate
from dsv4.model import Transformer, init_weights

DIGITS_THEN_WORD = r'start: /[0-9]{2,6}/ " items of " /[a-z]{1,8}/'
PATTERN = re.compile(r"[0-9]{2,6} items of [a-z]{1,8}")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(MODEL_DIR)  # the demo's 2,048-token vocabulary: a small model can use it


@pytest.fixture(scope="module")
def model():
    return init_weights(Transformer(preset("tiny").replace(vocab_size=2048)), seed=1).eval()


@pytest.fixture(scope="module")
def gtok(tok):
    return GrammarTokenizer(tok.hf.to_str(), 2048, [tok.eos_id])


def prompts(n, seed=0, lengths=(5, 17, 9, 30)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 2000, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


def drain(engine, requests):
    ids = [engine.add_request(p, q) for p, q in requests]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for u in engine.step():
            out[u.request_id] += u.new_token_ids
    return [out[i] for i in ids]


@torch.no_grad()
def masked_greedy(model, grammar, prompt, n, eos):
    """The reference: full forwards, the grammar's mask on the last logits, argmax."""
    state, tokens = grammar.start(), list(prompt)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([tokens]))[0, -1]
        token = int(logits.masked_fill(~state.mask(logits.shape[0], "cpu"), float("-inf")).argmax())
        out.append(token)
        if token == eos:
            break
        assert state.consume(token)
        tokens.append(token)
    return out


def text_of(tok, ids):
    return tok.decode([t for t in ids if t != tok.eos_id])


def test_outputs_follow_the_grammar_and_equal_masked_greedy(model, tok, gtok):
    grammar = Grammar(gtok, DIGITS_THEN_WORD)
    ps = prompts(3)
    engine = Engine(model, max_batch=3, max_seq_len=96, prefill_chunk=8, eos_id=tok.eos_id)
    outs = drain(engine, [(p, SamplingParams(temperature=0.0, max_tokens=24, grammar=grammar)) for p in ps])
    for p, out in zip(ps, outs, strict=True):
        assert out[-1] == tok.eos_id and PATTERN.fullmatch(text_of(tok, out)), text_of(tok, out)
        assert out == masked_greedy(model, grammar, p, 24, tok.eos_id)


def test_constrained_and_free_requests_batch_together(model, tok, gtok):
    grammar = Grammar(gtok, DIGITS_THEN_WORD)
    ps = prompts(4, seed=1)
    free = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    bound = SamplingParams(temperature=0.0, max_tokens=24, grammar=grammar)
    engine = Engine(model, max_batch=4, max_seq_len=96, prefill_chunk=8, eos_id=tok.eos_id)
    outs = drain(engine, [(ps[0], free), (ps[1], bound), (ps[2], free), (ps[3], bound)])
    assert outs[0] == generate(model, [ps[0]], 10).tokens[0] and outs[2] == generate(model, [ps[2]], 10).tokens[0]
    assert outs[1] == masked_greedy(model, grammar, ps[1], 24, tok.eos_id)
    assert outs[3] == masked_greedy(model, grammar, ps[3], 24, tok.eos_id)
    assert not PATTERN.fullmatch(text_of(tok, outs[0]))  # the free rows are really free


def test_speculation_keeps_constrained_tokens(model, tok, gtok):
    """MTP drafts are masked like the target (a draft the grammar refuses can never be proposed or accepted):
    greedy speculative output equals plain constrained greedy; seeded sampling stays inside the grammar."""
    grammar = Grammar(gtok, DIGITS_THEN_WORD)
    ps = prompts(3, seed=2)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, grammar=grammar)
    plain = drain(Engine(model, max_batch=3, max_seq_len=96, eos_id=tok.eos_id), [(p, greedy) for p in ps])
    for k in (1, 2):
        spec = Engine(model, max_batch=3, max_seq_len=96, eos_id=tok.eos_id, num_speculative=k)
        assert drain(spec, [(p, greedy) for p in ps]) == plain
        assert spec.stats().drafted > 0
    sampled = [SamplingParams(temperature=1.0, seed=s, max_tokens=24, grammar=grammar) for s in range(3)]
    spec = Engine(model, max_batch=3, max_seq_len=96, eos_id=tok.eos_id, num_speculative=2)
    for out in drain(spec, list(zip(ps, sampled, strict=True))):
        assert PATTERN.fullmatch(text_of(tok, out)), text_of(tok, out)


def test_a_prefix_cache_hit_keeps_the_constraint(model, tok, gtok):
    grammar = Grammar(gtok, DIGITS_THEN_WORD)
    p = prompts(1, seed=3, lengths=(40,))[0]
    params = SamplingParams(temperature=0.0, max_tokens=24, grammar=grammar)
    engine = Engine(model, max_batch=2, max_seq_len=96, prefill_chunk=16, eos_id=tok.eos_id,
                    prefix_cache_bytes=1 << 20)
    first = drain(engine, [(p, params)])
    second = drain(engine, [(p, params)])
    assert engine.stats().prefix_hits >= 1 and first == second == [masked_greedy(model, grammar, p, 24, tok.eos_id)]


def test_the_closer_finishes_json_within_the_budget(model, tok, gtok):
    """A random model never closes a JSON string on its own; in the closing window the closer does, so every
    output parses and validates however small the budget."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array",
              "items": {"type": "string"}, "minItems": 1}, "n": {"type": "integer", "minimum": 3}},
              "required": ["name", "tags", "n"]}
    lark = completion_grammar(thinking=False, think_end_id=tok.think_end_id, response_format=schema)
    closer = JsonCloser(tok, thinking=False, schema=schema)
    grammar = Grammar(gtok, lark, closer)
    ps = prompts(3, seed=4)
    engine = Engine(model, max_batch=3, max_seq_len=200, eos_id=tok.eos_id)
    for max_tokens in (40, 90):
        outs = drain(engine, [(p, SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, grammar=grammar))
                              for i, p in enumerate(ps)])
        for out in outs:
            assert out[-1] == tok.eos_id and len(out) <= max_tokens
            jsonschema.validate(json.loads(text_of(tok, out)), schema)
    free = Grammar(gtok, lark)  # no closer: the same budget ends mid-document
    outs = drain(engine, [(p, SamplingParams(temperature=1.0, seed=i, max_tokens=40, grammar=free))
                          for i, p in enumerate(ps)])
    assert any(out[-1] != tok.eos_id for out in outs)


def test_the_closer_finishes_a_required_tool_call_within_the_budget(model, tok, gtok):
    """A random model writing a forced call never ends a raw string or a number on its own; the closer ends the
    reasoning, the values, the parameters and the block, and the parsed arguments validate."""
    from dsv4.chat.closing import ToolCallCloser
    from dsv4.chat.parser import parse_completion

    tool = {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "nights": {"type": "integer", "minimum": 1}, "note": {"type": "string"},
        "rooms": {"type": "array", "items": {"type": "integer"}, "minItems": 1}}, "required": ["city", "nights",
                                                                                           "rooms"]}}}
    lark = completion_grammar(thinking=True, think_end_id=tok.think_end_id, tools=[tool], tool_choice="required")
    grammar = Grammar(gtok, lark, ToolCallCloser(tok, thinking=True, forced=True, tools=[tool]))
    engine = Engine(model, max_batch=3, max_seq_len=300, eos_id=tok.eos_id)
    outs = drain(engine, [(p, SamplingParams(temperature=1.0, seed=i, max_tokens=200, grammar=grammar))
                          for i, p in enumerate(prompts(3, seed=5))])
    for out in outs:
        assert out[-1] == tok.eos_id and len(out) <= 200
        message = parse_completion(tok.decode(out[:-1]), thinking=True, tools=[tool])
        assert len(message.tool_calls) >= 1
        for call in message.tool_calls:
            jsonschema.validate(json.loads(call.arguments), tool["function"]["parameters"])


def test_scan_json_tracks_where_a_prefix_stands():
    assert scan_json("") == ("value", None)
    assert scan_json('{"a') == ("key_string", "{")
    assert scan_json('{"a": "x\\"y') == ("string", "{")
    assert scan_json('{"a": [1, 23') == ("scalar", "[")
    assert scan_json('{"a": [1, 23]') == ("after", "{")
    assert scan_json('{"a": {}, ') == ("key", "{")
    assert scan_json('{"a"') == ("colon", "{")
    assert scan_json("[[], ") == ("value", "[")


def test_bad_grammars_and_params_are_refused(gtok):
    with pytest.raises(GrammarError):
        Grammar(gtok, "start: undefined_rule")
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams(grammar="start: /a/")


def test_the_engine_decodes_without_llguidance_and_a_grammar_says_what_it_needs():
    """llguidance is imported where a grammar is built: where it is not installed (the offline GPU machine before
    its wheel is carried) the engine still serves unconstrained requests, the same tokens; a grammar fails, naming
    the package."""
    script = """
import sys
sys.modules["llguidance"] = None  # as if not installed: importing it raises ModuleNotFoundError
import torch
from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.engine.constraint import GrammarTokenizer
from dsv4.model import Transformer, init_weights
model = init_weights(Transformer(preset("tiny").replace(vocab_size=2048)), seed=1).eval()
engine = Engine(model, max_batch=2, max_seq_len=48, prefill_chunk=8)
request = engine.add_request([5, 17, 9, 30, 2], SamplingParams(max_tokens=6, temperature=0.0))
tokens = []
while engine.has_unfinished():
    tokens += [t for u in engine.step() for t in u.new_token_ids]
print(tokens)
try:
    GrammarTokenizer("{}", 2048, [1])
except ModuleNotFoundError as e:
    print(e.name)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed_tokens, missing = done.stdout.strip().splitlines()
    engine = Engine(init_weights(Transformer(preset("tiny").replace(vocab_size=2048)), seed=1).eval(), max_batch=2,
                    max_seq_len=48, prefill_chunk=8)
    assert printed_tokens == str(drain(engine, [([5, 17, 9, 30, 2], SamplingParams(max_tokens=6, temperature=0.0))])[0])
    assert missing == "llguidance"
