"""Regression pins: what the model and the engine compute today, so that refactors provably keep behaviour.

Pinned (in `pins/regression.pt`, written by `python tests/test_regression_pins.py --write`, which is only
run when a change is *meant* to alter results, and then said so in the commit):

* the logits of a seeded `tiny` model (sliding, CSA and HCA layers, hash and learned MoE, mHC, the MTP
  block) in both numerics: plain fp32, and exact bf16 with FP8 / FP4 weights; the full forward, the same
  sequence fed through a cache in uneven chunks, and the MTP head;
* the greedy tokens of the shipped demo model on held-out questions (arithmetic in both modes, both tools),
  decoded together by the engine as `dsv4 serve` runs it (exact numerics, fp32);
* the greedy tokens of the exact `tiny` model (FP8 / FP4 weights, fp32 activations) through the engine with
  bf16 KV pages, the prefix cache and MTP speculation, several requests batched. (fp32, because a bf16 model's
  results on the CPU depend on the batch around a row: its GEMMs round differently for other row counts, and
  FP8 activation quantisation turns a last-bit difference into a different token; the engine's batch
  composition is an implementation detail that refactors may change.)

Tokens must match exactly. Logits must match bit for bit on a machine kind the pins hold logits for (the same
torch build, CPU capability, vendor and BLAS-relevant features, which decide the kernels' summation order: the
first writer's kind, and kinds added with `--add-kind`, each by the code of the day it was added, before any
change of results); on another kind (another torch build, say) they must agree to within rounding with the
record of the same CPU where the pins hold one (`nearest_kind`), which is checked and reported, not skipped.

The pins were written by the reference kernel backend, and each test runs three times: on the reference (the
oracle, chosen explicitly); on the fast "cpu" backend, which must give the same tokens, the same exact-numerics
logits bit for bit, and plain fp32 logits within 1e-5 of the largest (it sums some fp32 products in another
order there: experts as one batched GEMM, attention blocks in one einsum); and on the "native" backend (C
kernels, the CPU default), which must give the same tokens, plain logits within 1e-5 and exact logits within
the official-parity tolerance (2**-8 of the largest), since its GEMMs sum a block's products in their own order.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from dsv4 import kernels

BACKENDS = ("reference", "cpu", "native")
PINS = Path(__file__).parent / "pins" / "regression.pt"
DEMO_MAX_TOKENS = 140


def _tiny_models():
    from dsv4.config import preset
    from dsv4.formats import to_official_formats
    from dsv4.model import Transformer, init_weights

    args = preset("tiny")
    plain = init_weights(Transformer(args), seed=3)
    exact = to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=3))
    return {"plain": plain.eval(), "exact": exact.eval()}


@torch.no_grad()
def model_logits(backend: str = "reference") -> dict[str, torch.Tensor]:
    with kernels.use_backend(backend):
        return _model_logits()


def _model_logits() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    out = {}
    for numerics, model in _tiny_models().items():
        tokens = torch.randint(0, model.args.vocab_size, (2, 37), generator=gen)
        out[f"{numerics}/full"] = model(tokens)
        cache = model.new_cache(2, 64)
        out[f"{numerics}/chunked"] = torch.cat([model(tokens[:, a:b], cache) for a, b in ((0, 5), (5, 16), (16, 37))],
                                               dim=1)
        streams = model.forward_streams(tokens[:, :-1])
        out[f"{numerics}/mtp"] = model.mtp_logits(streams, tokens[:, 1:])
    return out


def _drain(engine, prompts, params) -> list[list[int]]:
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for update in engine.step():
            tokens[update.request_id] += update.new_token_ids
    return [tokens[i] for i in ids]


def demo_questions() -> list[tuple[str, list[dict], list | None]]:
    """(mode, messages, tools) of the held-out questions: two sums in each mode, one call of each tool."""
    from dsv4.demo.evaluate import held_out

    picked = held_out(0, 2)
    questions = [(mode, conv.messages[:1], None) for mode in ("think-high", "non-think")
                 for conv in picked["arithmetic"]]
    questions += [("think-high", picked[skill][0].messages[:1], picked[skill][0].tools)
                  for skill in ("weather", "calculator")]
    return questions


@torch.no_grad()
def demo_greedy(backend: str = "reference") -> list[list[int]]:
    from dsv4.chat.encoding import encode_messages
    from dsv4.chat.tokenizer import Tokenizer
    from dsv4.checkpoint.loader import load_model
    from dsv4.demo import MODEL_DIR
    from dsv4.engine import Engine, SamplingParams

    model = load_model(MODEL_DIR, numerics="exact", dtype=torch.float32)
    tokenizer = Tokenizer.load(MODEL_DIR)
    prompts = []
    for mode, messages, tools in demo_questions():
        text = encode_messages(messages, thinking_mode="chat" if mode == "non-think" else "thinking", tools=tools)
        prompts.append(tokenizer.encode(text))
    engine = Engine(model, max_batch=8, max_seq_len=model.args.max_seq_len, prefill_chunk=256,
                    eos_id=tokenizer.eos_id, kernel_backend=backend)
    params = [SamplingParams(temperature=0.0, max_tokens=DEMO_MAX_TOKENS)] * len(prompts)
    return _drain(engine, prompts, params)


@torch.no_grad()
def tiny_engine_greedy(backend: str = "reference") -> list[list[int]]:
    from dsv4.config import preset
    from dsv4.engine import Engine, SamplingParams
    from dsv4.formats import to_official_formats
    from dsv4.model import Transformer, init_weights

    model = to_official_formats(init_weights(Transformer(preset("tiny"), torch.float32, "exact"), seed=3)).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in (3, 29, 12, 40)]
    prompts.append(prompts[1][:21] + prompts[3][:6])  # shares a saved prefix with the second request
    engine = Engine(model, max_batch=3, max_seq_len=96, prefill_chunk=16, kv_format="bf16",
                    prefix_cache_bytes=1 << 20, prefix_interval=8, num_speculative=1, kernel_backend=backend)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (20, 9, 17, 12, 14)]
    tokens = _drain(engine, prompts, params)
    assert engine.stats().prefix_hits > 0 and engine.stats().drafted > 0  # the pin covers both
    return tokens


# the CPU features besides torch's capability level that decide which BLAS kernels run (and so the sums' order)
_KERNEL_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx512_vnni")


def machine() -> dict[str, str]:
    """The machine kind: what decides the kernels' summation order, so that equal kinds give equal bits. The CPU's
    vendor and features count as well as torch's capability level: an AMD and an Intel CPU at "AVX512" run other
    BLAS kernels (seen here: the exact model's logits differed by a routing flip, the plain ones in the last bits)."""
    kind = {"torch": str(torch.__version__), "cpu": torch.backends.cpu.get_cpu_capability()}
    vendor, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id" and vendor == "unknown":
                vendor = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # (not Linux: the capability level alone)
        return kind
    return {**kind, "vendor": vendor, "flags": " ".join(f for f in _KERNEL_FLAGS if f in flags)}


def same_kind(recorded: dict[str, str], here: dict[str, str]) -> bool:
    """Whether a record's machine kind is this machine's: every field the record has (the first pins were written
    before the vendor and the features were recorded) equal."""
    return all(here.get(key) == value for key, value in recorded.items())


def digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (with its dtype and shape): equal digests are equal bits."""
    t = t.detach().contiguous().cpu()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(head + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def summarize(logits: dict[str, torch.Tensor]) -> dict[str, dict]:
    """What the pins keep of each logits tensor: its digest, and every 8th vocabulary entry for the
    cross-machine comparison (a few dozen KB instead of the whole tensors)."""
    return {name: {"sha256": digest(t), "sample": t[..., ::8].clone()} for name, t in logits.items()}


def compute() -> dict:
    return {"machine": machine(), "logits": summarize(model_logits()), "demo_greedy": demo_greedy(),
            "tiny_engine_greedy": tiny_engine_greedy(), "more_kinds": []}


def logit_records(pins: dict) -> list[tuple[dict, dict]]:
    """(machine kind, logits) of every kind the pins hold: the first writer's, then those added (`--add-kind`)."""
    return [(pins["machine"], pins["logits"])] + [(k["machine"], k["logits"]) for k in pins.get("more_kinds", ())]


def _most_specific_match(pins: dict, ignore: tuple[str, ...] = ()) -> int | None:
    """The most specific record whose kind, its `ignore` fields left out, is this machine's (an added kind with its
    vendor before the first writer's), or None."""
    here, records = machine(), logit_records(pins)
    matching = [i for i, (kind, _) in enumerate(records)
                if same_kind({key: value for key, value in kind.items() if key not in ignore}, here)]
    return max(matching, key=lambda i: len(records[i][0]), default=None)


def kind_of_this_machine(pins: dict) -> int | None:
    """Which record's kind this machine is, or None for a kind no record holds."""
    return _most_specific_match(pins)


def nearest_kind(pins: dict) -> int:
    """The record to hold this machine to on a kind no record holds (another torch build): the one of its CPU
    (capability, vendor, features), as the same CPU runs the same kernels (on this one torch 2.11's exact-model ops
    give 2.13's bits) while another vendor's summation order can flip a routing choice of the exact model; else
    the first writer's."""
    match = _most_specific_match(pins, ignore=("torch",))
    return 0 if match is None else match


# ---------------------------------------------------------------------------------------------- the tests


def _pins() -> dict:
    if not PINS.is_file():
        raise FileNotFoundError(f"{PINS} is missing; write it with `python {Path(__file__).name} --write`")
    return torch.load(PINS, weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_logits_are_unchanged(backend):
    pins = _pins()
    now = model_logits(backend)
    assert sorted(now) == sorted(pins["logits"])
    kind = kind_of_this_machine(pins)
    exact_bits = kind is not None
    for name, pinned in logit_records(pins)[kind if exact_bits else nearest_kind(pins)][1].items():
        sample = now[name][..., ::8]
        if backend != "reference" and name.startswith("plain"):
            bound = 1e-5 * pinned["sample"].abs().max().item()
            torch.testing.assert_close(sample, pinned["sample"], rtol=0, atol=bound, msg=name)
        elif backend == "native":  # sums a block's products in its own order: the official-parity tolerance
            bound = 2**-8 * pinned["sample"].abs().max().item()
            torch.testing.assert_close(sample, pinned["sample"], rtol=0, atol=bound, msg=name)
        elif exact_bits:
            changed = (sample != pinned["sample"]).sum().item()
            assert changed == 0 and digest(now[name]) == pinned["sha256"], (
                f"{name}: the logits differ from the pinned ones ({changed} of {sample.numel()} sampled entries)")
        else:  # another CPU capability or torch build: other summation orders, the same function
            tolerance = 1e-4 if name.startswith("plain") else 5e-2
            torch.testing.assert_close(sample, pinned["sample"], rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_model_greedy_tokens_are_unchanged(backend):
    assert demo_greedy(backend) == _pins()["demo_greedy"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_greedy_tokens_with_bf16_pages_prefix_cache_and_speculation_are_unchanged(backend):
    assert tiny_engine_greedy(backend) == _pins()["tiny_engine_greedy"]


def test_the_pinned_outputs_are_not_degenerate():
    """The pins mean something: the demo answers its sums, the requests differ, the numerics differ."""
    pins = _pins()
    from dsv4.chat.tokenizer import Tokenizer
    from dsv4.demo import MODEL_DIR

    tokenizer = Tokenizer.load(MODEL_DIR)
    texts = [tokenizer.decode(t) for t in pins["demo_greedy"]]
    assert len(set(texts)) == len(texts) and all(len(t) > 0 for t in pins["demo_greedy"])
    assert "DSML" in texts[-1] and "DSML" in texts[-2], texts[-2:]  # the two tool questions end in calls
    from dsv4.demo.evaluate import held_out

    for conv, text in zip(held_out(0, 2)["arithmetic"], texts[:2], strict=True):  # think-high gets its sums
        assert f"</think>{text.split('</think>')[-1]}".endswith(f"= {conv.meta['answer']}.<｜end▁of▁sentence｜>"), text
    assert len({tuple(t) for t in pins["tiny_engine_greedy"]}) == len(pins["tiny_engine_greedy"])
    logits = {name: pinned["sample"] for name, pinned in pins["logits"].items()}
    assert not torch.allclose(logits["plain/full"], logits["exact/full"], atol=1e-2)
    torch.testing.assert_close(logits["plain/chunked"], logits["plain/full"], rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        PINS.parent.mkdir(exist_ok=True)
        torch.save(compute(), PINS)
    elif sys.argv[1:] == ["--add-kind"]:  # this machine kind's logits beside the others' (the tokens are common)
        pins = _pins()
        if machine() in [kind for kind, _ in logit_records(pins)]:
            sys.exit(f"{PINS} already holds this machine kind {machine()}")
        pins.setdefault("more_kinds", []).append({"machine": machine(), "logits": summarize(model_logits())})
        torch.save(pins, PINS)
    else:
        sys.exit(f"usage: python {sys.argv[0]} --write | --add-kind   (rewrites {PINS} from the current code, or adds "
                 "this machine kind's logits to it)")
    print(f"wrote {PINS} ({PINS.stat().st_size:,} bytes)")
