"""`/v1/completions` as evaluation harnesses use it, against a live server on the real engine and the demo model:
several prompts per request in OpenAI's four forms, `echo` with the prompt tokens' logprobs in vLLM's legacy
shape, `max_tokens: 0`. The loglikelihood request is exactly what lm-evaluation-harness's `local-completions` sends
(captured from `benchmarks/lm_eval_harness.py`); its logprobs must equal the model's full-forward log-softmax."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
from serve_stubs import live_server

from dsv4.runtime import EngineConfig, ModelSource, build_serve_context
from dsv4.serve.app import create_app

FACTS = Path(__file__).parent / "lm_eval_tasks" / "dsv4_demo_facts.jsonl"


@pytest.fixture(scope="module")
def server():
    ctx = build_serve_context(ModelSource(model="demo"), EngineConfig(max_batch=4))
    with live_server(create_app(ctx)) as url:
        yield url, ctx


@pytest.fixture(scope="module")
def model_name(server):
    return server[1].config.served_model_names[0]


def post(server, body: dict) -> dict:
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@torch.inference_mode()
def full_forward_logprobs(server, ids: list[int]) -> torch.Tensor:
    """log_softmax of the served model's full (training) forward over `ids`: row p scores token p + 1."""
    model = server[1].backend.engine.engine.model
    return model(torch.tensor([ids], device=model.embed.weight.device)).log_softmax(-1)[0].cpu()


def lm_eval_requests(tokenizer) -> tuple[list[list[int]], list[int]]:
    """The first question of the shipped facts task as lm-eval builds its loglikelihood requests: context +
    " " + each choice, tokenized whole; the context's own token count is where the continuation starts."""
    doc = json.loads(FACTS.read_text().splitlines()[0])
    ctx = tokenizer.encode(doc["context"])
    prompts = [tokenizer.encode(doc["context"] + " " + choice) for choice in doc["choices"]]
    assert all(p[:len(ctx)] == ctx for p in prompts)
    return prompts, [len(ctx)] * len(prompts)


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_request(server, model_name, max_tokens):
    """lm-eval 0.4 sends max_tokens 1 and drops the generated token (`token_logprobs[ctxlen:-1]`); max_tokens 0 is
    the same request without it. Each prompt token after the first has the full forward's logprob."""
    tokenizer = server[1].backend.tokenizer
    prompts, ctxlens = lm_eval_requests(tokenizer)
    body = {"model": model_name, "prompt": prompts, "temperature": 0, "max_tokens": max_tokens, "logprobs": 1,
            "seed": 1234, "echo": True}
    out = post(server, body)
    assert [c["index"] for c in out["choices"]] == list(range(len(prompts)))
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert out["usage"]["completion_tokens"] == max_tokens * len(prompts)
    for choice, ids, ctxlen in zip(out["choices"], prompts, ctxlens, strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert choice["text"].startswith(tokenizer.decode(ids))
        assert lp["tokens"][:len(ids)] == [tokenizer.token_bytes(t).decode("utf-8", "replace") for t in ids]
        ref = full_forward_logprobs(server, ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(lp["token_logprobs"][1:len(ids)], dtype=torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # bitwise equal on x86 CPUs
        for i, top in enumerate(lp["top_logprobs"][1:len(ids)], start=1):
            # the prompt token itself, then the most likely one (the same token when the model agrees)
            assert list(top.values())[0] == lp["token_logprobs"][i] and 1 <= len(top) <= 2
            assert max(top.values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-5)
        # lm-eval's own arithmetic (LocalCompletionsAPI.parse_logprobs) on this response
        scored = lp["token_logprobs"][ctxlen:len(ids)]
        assert sum(scored) == pytest.approx(want[ctxlen - 1:].sum().item(), abs=1e-4)
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
        assert choice["finish_reason"] in (("length",) if max_tokens == 0 else ("length", "stop"))
    assert post(server, body)["choices"] == out["choices"]  # again, with the prompts now in the prefix cache


def test_prompt_forms_and_choice_numbering(server, model_name):
    """A string, a list of strings, token ids and lists of token ids; choice index = prompt index * n + i; the
    same prompt as text or as its ids gives the same choice; usage sums over the prompts."""
    tokenizer = server[1].backend.tokenizer
    texts = ["7 + 4 + 1 =", "The weather in Oslo is"]
    ids = [tokenizer.encode(t) for t in texts]
    common = {"model": model_name, "max_tokens": 3, "temperature": 0, "echo": True}
    by_text = post(server, {**common, "prompt": texts, "n": 2})
    assert [c["index"] for c in by_text["choices"]] == [0, 1, 2, 3]
    for c in by_text["choices"]:
        assert c["text"].startswith(texts[c["index"] // 2]) and c["logprobs"] is None
    assert by_text["usage"]["prompt_tokens"] == sum(map(len, ids))  # each prompt once, whatever n (as vLLM counts)
    by_ids = post(server, {**common, "prompt": ids, "n": 2})
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    one_text = post(server, {**common, "prompt": texts[1]})
    one_ids = post(server, {**common, "prompt": ids[1]})
    assert one_text["choices"][0]["text"] == one_ids["choices"][0]["text"] == by_text["choices"][2]["text"]
    assert one_ids["usage"]["prompt_tokens"] == len(ids[1])


def test_echo_alone_with_max_tokens_zero(server, model_name):
    out = post(server, {"model": model_name, "prompt": ["3 + 5 + 0 =", "Hello"], "max_tokens": 0, "echo": True})
    assert [(c["text"], c["finish_reason"], c["logprobs"]) for c in out["choices"]] == [
        ("3 + 5 + 0 =", "length", None), ("Hello", "length", None)]
    assert out["usage"]["completion_tokens"] == 0


def test_streamed_choices_equal_the_whole_response(server, model_name):
    """Streaming as today, per choice: the echo (with the prompt logprobs) first, then the completion; text and
    logprobs reassembled per choice equal the non-streaming body, text_offset counting on across chunks."""
    body = {"model": model_name, "prompt": ["9 + 3 + 1 =", "6 - 3 - 1 ="], "max_tokens": 4, "temperature": 0,
            "echo": True, "logprobs": 2}
    whole = post(server, body)
    texts: dict[int, str] = {}
    logprobs: dict[int, dict[str, list]] = {}
    finish: dict[int, str] = {}
    with httpx.stream("POST", server[0] + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            (c,) = json.loads(line[6:])["choices"]
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            for key, values in c["logprobs"].items():
                logprobs.setdefault(c["index"], {}).setdefault(key, []).extend(values)
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    for c in whole["choices"]:
        assert (texts[c["index"]], finish[c["index"]]) == (c["text"], c["finish_reason"])
        assert logprobs[c["index"]] == c["logprobs"]


def test_openai_sdk(server, model_name):
    """The official SDK's `completions.create` with a list of prompts, echo, max_tokens 0 and logprobs 0 (each
    top_logprobs entry then holds just the prompt token)."""
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model=model_name, prompt=["4 + 4 + 1 =", "8 - 5 - 0 ="], echo=True, max_tokens=0,
                                  logprobs=0)
    for c in r.choices:
        assert c.finish_reason == "length" and c.text in ("4 + 4 + 1 =", "8 - 5 - 0 =")
        assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
        assert all(len(top) == 1 for top in c.logprobs.top_logprobs[1:])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model_name, prompt="a", max_tokens=0)


@pytest.mark.parametrize("body,param,message", [
    ({"prompt": [[1, 2], []]}, "prompt", "prompt[1] is empty"),
    ({"prompt": [[1], [10**6]]}, "prompt", "prompt[1]: token ids"),
    ({"prompt": ["a"] * 129}, "prompt", "at most 128 choices"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "only with echo"),
])
def test_bad_prompts_name_the_field(server, model_name, body, param, message):
    r = httpx.post(server[0] + "/v1/completions", json={"model": model_name, **body}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and message in error["message"], r.text
