"""The training loop: losses, balancing, indexer stages, exact resume, atomic checkpoints, export, `dsv4 train`.

Every run is a 2-layer tiny V4 (one hash and one learned MoE layer, a CSA layer with an indexer, an MTP
block) on a few KB of TinyShakespeare prepared with the byte tokenizer, a handful of steps each.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import prepare_shakespeare_docs
from multiprocess import spawn

from dsv4.cli import main
from dsv4.config import preset
from dsv4.model import Transformer, init_weights
from dsv4.model.moe import MoE, RouterRecord
from dsv4.train.data import IGNORE_INDEX, PackedLoader, open_split, split_documents
from dsv4.train.losses import (
    BiasBalancer,
    balance_loss_sum,
    cross_entropy_sum,
    expert_load,
    load_stats,
    mtp_inputs,
)
from dsv4.train.trainer import TrainConfig, Trainer, TrainError, latest_checkpoint

MODEL = {"n_layers": 2, "n_hash_layers": 1, "compress_ratios": [0, 4, 0]}
TRAIN_KEYS = {"kind", "step", "stage", "loss", "ce", "mtp", "balance", "indexer_kl", "lr", "mtp_weight", "grad_norm",
              "tokens", "tokens_per_s", "load_max_mean", "load_max_mean_worst", "hc_gain_fwd", "hc_gain_bwd"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops; also makes runs reproducible across machines
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # several documents (so packed windows hold document boundaries and rows of different lengths)
    return prepare_shakespeare_docs(tmp_path_factory.mktemp("shakespeare"), chars=30000, parts=200)


def config(data, tmp_path, **changes) -> TrainConfig:
    base = dict(data=str(data), out=str(tmp_path / "run"), preset="tiny", model=dict(MODEL), steps=20, batch_size=2,
                seq_len=32, warmup_steps=2, lr=3e-3, eval_every=0, eval_batches=2, log_every=1, progress=False,
                seed=0)
    return TrainConfig(**{**base, **changes})


def full_state(trainer: Trainer) -> dict:
    return {"model": trainer.model.state_dict(), "optimizer": trainer.optimizers.state_dict(),
            "balancer": trainer.balancer.state_dict(), "loader": trainer.loader.state_dict(), "step": trainer.step}


def assert_identical(a, b, where="") -> None:
    """Bit-identical nested state (tensors with torch.equal, everything else with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------------------ losses


def test_mtp_inputs_predict_two_ahead_within_the_document(data):
    """MTP at position t reads the token at t+1 and is scored on the token at t+2 of the *same* document."""
    batch = PackedLoader(open_split(data, "train"), 128, 4, seed=3).next_batch()
    rows = split_documents(batch)
    assert len(rows.lengths) > 2  # the windows hold document boundaries
    nxt, tgt, lengths = mtp_inputs(rows.tokens, rows.targets, rows.lengths)
    for r in range(len(rows.lengths)):
        n = int(rows.lengths[r])
        assert int(lengths[r]) == n - 1
        assert torch.equal(nxt[r, :n - 1], rows.tokens[r, 1:n])
        # the target at t is the token two after t: the row's own token t+2, or IGNORE past the document
        for t in range(n - 2):
            assert int(tgt[r, t]) in (int(rows.tokens[r, t + 2]), IGNORE_INDEX)
        assert bool((tgt[r, n:] == IGNORE_INDEX).all())


def test_cross_entropy_sum_is_torchs_with_its_gradient():
    """The summed CE with its one-pass backward (softmax - one-hot): F.cross_entropy's value and gradient within
    fp32 rounding, over logits spread far beyond exp's floor (targets among the least likely too), ignored
    positions (a whole row of them too) adding nothing and getting a zero gradient."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 300, generator=gen) * 6
    logits[1] *= 40  # a spread of thousands: most exponentials far below the floor
    targets = torch.randint(0, 300, (3, 40), generator=gen)
    targets[1, 1::4] = logits[1, 1::4].argmin(dim=-1)  # each a loss in the thousands
    targets[:, ::4] = IGNORE_INDEX
    targets[2] = IGNORE_INDEX
    ours = logits.clone().requires_grad_()
    total, count = cross_entropy_sum(ours, targets)
    (total * 0.7).backward()
    torchs = logits.clone().requires_grad_()
    want = F.cross_entropy(torchs.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    (want * 0.7).backward()
    assert count == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(total, want, rtol=1e-6, atol=0)
    # a probability is exp(logit - lse), so its rounding is lse's: fp32 steps of 6e-5 at the thousands of row 1
    torch.testing.assert_close(ours.grad, torchs.grad, rtol=1e-4, atol=1e-6)
    assert want > 1000 * 10
    assert not ours.grad[2].any() and not ours.grad[0, 0].any()


def _record(scores: torch.Tensor, ids: torch.Tensor, rows: int, hashed: bool = False) -> RouterRecord:
    return RouterRecord(layer_id=1, scores=scores, ids=ids, hashed=hashed, batch=rows)


def test_balance_loss_is_the_v3_formula_per_sequence_and_skips_hash_layers_and_padding():
    """Σ_i f_i P_i per sequence (f_i = N/(K T)·hits, P_i = mean normalised score), summed over layers, with
    padding positions excluded; perfectly uniform routing gives exactly 1 per sequence and layer."""
    E, K, T = 4, 2, 4
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    uniform = torch.ones(T, E)
    valid = torch.ones(1, T, dtype=torch.bool)
    assert float(balance_loss_sum([_record(uniform, ids, 1)], valid, E, K)) == pytest.approx(1.0)
    assert float(balance_loss_sum([_record(uniform, ids, 1, hashed=True)], valid, E, K)) == 0.0

    scores = torch.rand(2 * T, E, requires_grad=True)
    ids2 = torch.randint(0, E, (2 * T, K))
    valid2 = torch.tensor([[True, True, True, False], [True, True, False, False]])
    got = balance_loss_sum([_record(scores, ids2, 2)], valid2, E, K)
    expected = 0.0
    for r in range(2):
        n = int(valid2[r].sum())
        s = scores[r * T:r * T + n]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = F.one_hot(ids2[r * T:r * T + n], E).sum((0, 1)).float() * E / (K * n)
        expected = expected + (f * p).sum()
    assert torch.allclose(got, expected)
    got.backward()
    assert scores.grad is not None and bool(scores.grad[3].eq(0).all())  # a padding position gets no gradient


def _skewed_gate_run(speed: float, steps: int = 150) -> list[float]:
    """A learned MoE gate whose scores favour expert 0 by a wide margin; returns max/mean load per step."""
    args = dataclasses.replace(preset("tiny"), n_routed_experts=8, n_activated_experts=2)
    torch.manual_seed(0)
    moe = MoE(args.n_hash_layers, args, torch.float32)
    assert not moe.gate.hash
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.01)
        moe.gate.weight[0] += 0.006  # inputs below have a positive mean: expert 0 wins almost every token
    balancer = BiasBalancer(moe, speed=speed)
    ratios = []
    for _ in range(steps):
        x = torch.randn(1024, args.dim) + 1.0
        with torch.no_grad():
            _, ids, scores = moe.gate(x, torch.zeros(1024, dtype=torch.long))
        balancer.add([RouterRecord(moe.layer_id, scores, ids, False, 1)], torch.ones(1, 1024, dtype=torch.bool))
        ratios.append(balancer.step()["load_max_mean"])
    assert "bias" not in dict(moe.named_parameters())  # a buffer: no optimizer or gradient ever touches it
    return ratios


def test_bias_update_balances_a_skewed_router():
    """b_i += γ·sign(mean − load_i) at γ = 1e-3 drives max/mean load from ~4 (k/E of the tokens all on one
    expert) to ~1; without the update (γ = 0) the skew stays."""
    balanced = _skewed_gate_run(1e-3)
    control = _skewed_gate_run(0.0)
    assert balanced[0] > 3.0 and control[0] > 3.0
    assert max(balanced[-20:]) < 1.3
    assert min(control[-20:]) > 3.0


def test_bias_update_sums_loads_and_leaves_hash_layers_alone():
    """The balancer finds every learned gate (main and MTP blocks), none of the hash-routed ones, and moves each
    bias by exactly ±γ (0 for an expert exactly at the mean)."""
    args = dataclasses.replace(preset("tiny"), n_routed_experts=4)
    model = init_weights(Transformer(args), seed=0)
    balancer = BiasBalancer(model, speed=0.5)
    learned = [i for i in range(args.n_layers + args.n_mtp_layers) if not args.is_hash_layer(i)]
    assert sorted(balancer.gates) == learned
    layer = learned[0]
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 1]])  # loads 3, 3, 1, 1: mean 2
    rec = RouterRecord(layer, torch.rand(4, 4), ids, False, 1)
    balancer.add([rec], torch.ones(1, 4, dtype=torch.bool))
    assert expert_load([rec], torch.ones(1, 4, dtype=torch.bool), 4)[layer].tolist() == [3, 3, 1, 1]
    stats = balancer.step()
    assert stats == load_stats({layer: torch.tensor([3.0, 3, 1, 1])}) == {"load_max_mean": 1.5,
                                                                           "load_max_mean_worst": 1.5}
    assert model.layers[layer].ffn.gate.bias.tolist() == [-0.5, -0.5, 0.5, 0.5]
    assert all(not hasattr(model.layers[i].ffn.gate, "bias") for i in range(args.n_hash_layers))


# ------------------------------------------------------------------------------------------------ the loop


def test_loss_decreases_and_metrics_have_every_key(data, tmp_path):
    """40 steps lower the train CE and the held-out loss; metrics.jsonl holds the listed keys (incl. the mHC
    composite gain, ~1 for mHC) on every train record and val loss on the eval records."""
    trainer = Trainer(config(data, tmp_path, steps=40, eval_every=20))
    before = trainer.evaluate()["val_loss"]
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 41)) and [r["step"] for r in evals] == [20, 40]
    for r in train:
        assert TRAIN_KEYS <= r.keys()
        assert r["hc_gain_fwd"] == pytest.approx(1.0, abs=1e-4) and r["hc_gain_bwd"] == pytest.approx(1.0, abs=0.05)
    first = sum(r["ce"] for r in train[:5]) / 5
    last = sum(r["ce"] for r in train[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert evals[-1]["val_loss"] < before - 1.0, (before, evals[-1]["val_loss"])
    # and the curves are drawn beside the metrics at the end of the run
    pixels = pytest.importorskip("matplotlib.image").imread(tmp_path / "run" / "loss.png")
    assert pixels.shape[0] > 300 and float(pixels[..., :3].std()) > 0.05


@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_the_triton_backend_trains_and_evaluates(data, tmp_path, autocast):
    """`dsv4 train` on the triton backend (the GPU's; here under Triton's interpreter): its training ops with a
    backward (grouped experts, mHC, Sinkhorn, RMSNorm) and its inference kernels at evaluation, with and without
    autocast: the same first losses as the reference backend's to rounding, and an evaluation that runs."""
    pytest.importorskip("triton")
    from dsv4 import kernels

    runs = {}
    for backend in ("reference", "triton"):
        records = []
        with kernels.use_backend(backend):
            Trainer(config(data, tmp_path / backend, steps=3, autocast=autocast, eval_every=3, eval_batches=1),
                    log=records.append).train()
        runs[backend] = records
    for kind, key in (("train", "ce"), ("eval", "val_loss")):
        fast = [r[key] for r in runs["triton"] if r["kind"] == kind]
        slow = [r[key] for r in runs["reference"] if r["kind"] == kind]
        assert fast and len(fast) == len(slow) and all(math.isfinite(v) for v in fast), kind
        tolerance = 1e-4 if autocast == "off" else 2e-2  # (bf16: the mixes in fp32 here, in bf16 there)
        assert abs(fast[0] - slow[0]) <= tolerance * abs(slow[0]), (kind, fast, slow)


def test_bf16_autocast_trains_and_the_metrics_carry_model_flops_and_mfu(data, tmp_path):
    """autocast bf16 (the GPU recipe, on the CPU here): the forward's matmuls run in bf16 while the master weights
    and losses stay fp32, the loss falls as in fp32, and each record carries the model TFLOP/s and, with a peak
    given, the MFU they make of it (3x the forward FLOPs of `dsv4.plan` per token)."""
    from dsv4.train.trainer import train_flops_per_token

    records = []
    trainer = Trainer(config(data, tmp_path, steps=30, autocast="bf16", peak_tflops=2.0), log=records.append)
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, w, *rest):
        out = linear(x, w, *rest)
        seen.append(out.dtype)
        return out

    torch.nn.functional.linear = spy
    try:
        trainer.train()
    finally:
        torch.nn.functional.linear = linear
    assert torch.bfloat16 in seen  # autocast really ran the matmuls in bf16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    train = [r for r in records if r["kind"] == "train"]
    first = sum(r["ce"] for r in train[:5]) / 5
    last = sum(r["ce"] for r in train[-5:]) / 5
    assert last < first - 0.5, (first, last)
    per_token = train_flops_per_token(trainer.args, 32, mtp=True)
    assert per_token > 6 * trainer.model.parameter_counts()["active"] * 0.5  # at least the matmuls' 6 N
    for r in train:
        assert r["model_tflops"] == pytest.approx(per_token * r["tokens"] / r["step_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["model_tflops"] / 2.0)
    with pytest.raises(TrainError, match="autocast 'fp16'"):
        config(data, tmp_path, autocast="fp16").validate()
    with pytest.raises(TrainError, match="device 'tpu'"):
        config(data, tmp_path, device="tpu").validate()


def test_mtp_weight_follows_the_lr_schedule(data, tmp_path):
    """λ_MTP is 0.3 while the lr is stable and 0.1 once it decays, and the logged loss is CE + λ·MTP + α·bal +
    KL with that λ (so the weight really enters the loss)."""
    records = []
    trainer = Trainer(config(data, tmp_path, steps=6, warmup_steps=1, decay_steps=2), log=records.append)
    trainer.train()
    train = [r for r in records if r["kind"] == "train"]
    assert [r["mtp_weight"] for r in train] == [0.3, 0.3, 0.3, 0.3, 0.1, 0.1]
    for r in train:
        assert r["loss"] == pytest.approx(r["ce"] + r["mtp_weight"] * r["mtp"] + 1e-4 * r["balance"] + r["indexer_kl"])


def test_indexer_warmup_trains_only_the_indexers_then_sparse_trains_everything(data, tmp_path):
    """Stage schedule: dense (all train) -> indexer warm-up (only `.indexer.` parameters change, at indexer_lr,
    gate biases untouched) -> sparse (the rest trains again)."""
    records = []
    trainer = Trainer(config(data, tmp_path, steps=4, dense_steps=1, indexer_warmup_steps=2, indexer_lr=5e-3),
                      log=records.append)
    trainer.train(until=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(until=3)
    after = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".indexer." in k for k in changed), sorted(changed)
    assert {k for k in before if ".indexer." in k and k.endswith("weight")} <= changed
    trainer.train(until=4)
    final = trainer.model.state_dict()
    assert not torch.equal(final["embed.weight"], after["embed.weight"])
    assert [r["stage"] for r in records if r["kind"] == "train"] == ["dense", "indexer_warmup", "indexer_warmup",
                                                                     "sparse"]
    assert [r["lr"] for r in records if r.get("stage") == "indexer_warmup"] == [5e-3, 5e-3]
    assert all(r["indexer_kl"] > 0 for r in records if r["kind"] == "train")


def test_resume_is_bit_identical(data, tmp_path):
    """20 steps straight == 10 steps, checkpoint, a fresh trainer resumed, 10 more: every tensor of the model
    (incl. the gates' bias buffers), both optimizers' states, the balancer, the loader position and the step
    are bit-identical. The run crosses every stage (dense, indexer warm-up, sparse) and the lr decay, with
    gradient accumulation over document rows in buckets."""
    kw = dict(dense_steps=2, indexer_warmup_steps=2, grad_accum=2, bucket_tokens=48, bias_update_every=3)
    straight = Trainer(config(data, tmp_path / "a", **kw))
    straight.train()
    first = Trainer(config(data, tmp_path / "b", **kw))
    first.train(until=10)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    second = Trainer(config(data, tmp_path / "b", **kw))
    torch.rand(3), np.random.rand(3), random.random()  # the RNGs must come back from the checkpoint
    assert second.resume(tmp_path / "b" / "run").name == "step_00000010"
    assert torch.equal(torch.get_rng_state(), rng[0]) and (np.random.get_state()[1] == rng[1]).all()
    assert random.getstate() == rng[2]
    assert second.step == 10
    second.train()
    assert_identical(full_state(straight), full_state(second))
    assert straight.loader.state_dict()["step"] == 40  # the position really moved (2 batches per step)
    assert any(float(b.abs().sum()) > 0 for k, b in second.model.state_dict().items() if k.endswith("gate.bias"))


def test_resume_refuses_another_run(data, tmp_path):
    """A checkpoint resumes only the run it came from: a changed run-defining field is named."""
    Trainer(config(data, tmp_path, steps=2)).train()
    other = Trainer(config(data, tmp_path, steps=2, lr=1e-3))
    with pytest.raises(TrainError, match="lr 0.003"):
        other.resume(tmp_path / "run")
    with pytest.raises(TrainError, match="no checkpoint"):
        other.resume(tmp_path)


def test_checkpoint_write_is_atomic(data, tmp_path):
    """A crash while a checkpoint is being written leaves the previous one named by `latest`, loadable, and no
    half-written directory behind."""
    trainer = Trainer(config(data, tmp_path, steps=4))
    trainer.train(until=2)  # saves step 2
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()

    def crash(tmp):
        assert (tmp / "state.pt").is_file()  # the new state is already (partly) on disk
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(_write=crash)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    fresh = Trainer(config(data, tmp_path, steps=4))
    fresh.resume(tmp_path / "run")
    assert fresh.step == 2
    assert_identical(saved, fresh.model.state_dict())


def test_tensorboard_without_the_package_is_a_clear_error(data, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(TrainError, match="pip install tensorboard"):
            Trainer(config(data, tmp_path, tensorboard=True))
    else:
        trainer = Trainer(config(data, tmp_path, steps=1, tensorboard=True))
        trainer.train()
        assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_ablation_modes_log_their_composite_gain(data, tmp_path):
    """hc (no Sinkhorn) logs its measured composite gain, residual logs exactly 1 (identity mixing)."""
    for mode in ("hc", "residual"):
        records = []
        Trainer(config(data, tmp_path / mode, steps=2, hc_mode=mode), log=records.append).train()
        gains = [(r["hc_gain_fwd"], r["hc_gain_bwd"]) for r in records if r["kind"] == "train"]
        if mode == "residual":
            assert gains == [(1.0, 1.0)] * 2
        else:
            assert all(g[0] > 0 for g in gains)


# ------------------------------------------------------------------------------------------------ export, CLI


def test_export_loads_with_generate_and_serve(data, tmp_path, capsys):
    """The exported directory is an official checkpoint with the byte tokenizer beside it: `dsv4 generate
    --checkpoint` runs it and the runtime builds `dsv4 serve --model`'s context (model + tokenizer) from it; the loaded
    weights are the trained ones (fp8+fp4 recipe: exported losslessly)."""
    trainer = Trainer(config(data, tmp_path, steps=2, precision="fp8+fp4"))
    trainer.train()
    out = trainer.export(tmp_path / "export")
    assert (out / "tokenizer.json").is_file() and (out / "train_config.json").is_file()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "72,101,108", "--max-new-tokens", "3",
                 "--numerics", "plain", "--dtype", "float32"]) == 0
    assert "decode:" in capsys.readouterr().out

    from dsv4.checkpoint import load_model
    from dsv4.runtime import ModelSource, build_serve_context

    loaded = load_model(out, numerics="plain", dtype=torch.float32)
    trained = trainer.model.state_dict()
    for w, module in (("layers.0.attn.wq_a.weight", trainer.model.layers[0].attn.wq_a),
                      ("layers.1.ffn.experts.0.w1.weight", trainer.model.layers[1].ffn.experts[0].w1)):
        assert torch.equal(loaded.state_dict()[w], module._dsv4_precision.weight(trained[w]).float()), w
    gate = f"layers.{MODEL['n_hash_layers']}.ffn.gate.bias"
    assert torch.equal(loaded.state_dict()[gate], trained[gate])
    ctx = build_serve_context(ModelSource(model=str(out), numerics="plain", dtype="float32"))
    assert ctx.backend.tokenizer.vocab_size == 270
    with pytest.raises(TrainError, match="not empty"):
        trainer.export(out)


def test_cli_trains_resumes_and_exports(data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"preset": "tiny", "model": MODEL, "batch_size": 2, "seq_len": 32, "warmup_steps": 1,
                               "steps": 3, "eval_batches": 1, "log_every": 1}))
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(run), "--steps", "2",
                 "--model-arg", "n_routed_experts=4", "--no-progress"]) == 0
    saved = json.loads((run / "checkpoints" / "step_00000002" / "config.json").read_text())
    assert saved["steps"] == 2 and saved["model"]["n_routed_experts"] == 4 and saved["model"]["n_layers"] == 2
    assert "val loss" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--steps", "3", "--export", str(tmp_path / "exp")]) == 0
    assert latest_checkpoint(run).name == "step_00000003"
    assert (tmp_path / "exp" / "config.json").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "{tmp}/nope"], "data"),
    (["train", "--data", "{data}", "--steps", "0"], "steps must be >= 1"),
    (["train", "--data", "{data}", "--preset", "huge"], "unknown preset"),
    (["train", "--data", "{data}", "--model-arg", "n_layerz=2"], "model"),
    (["train", "--config", "{tmp}/missing.json"], "config"),
    (["train", "--resume", "{tmp}"], "no checkpoint"),
    (["train", "--data", "{data}", "--seq-len", "100000"], "fewer than one batch"),
    (["train", "--data", "{data}", "--fsdp"], "torchrun --nproc-per-node"),
    (["train", "--data", "{data}", "--expert-parallel", "--ep-size", "2"], "several processes"),
])
def test_cli_bad_input_is_a_clear_error(data, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, data=data) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4 train: ") and message in err, err


def test_cli_resume_refuses_run_defining_flags(data, tmp_path, capsys):
    Trainer(config(data, tmp_path, steps=2)).train()
    assert main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.1"]) == 2
    assert "cannot change lr" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ data parallel


def _dp_worker(rank: int, init_file: str, data: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        trainer = Trainer(config(data, Path(out), steps=3, checkpoint_every=2), dp_group=dist.group.WORLD)
        trainer.train()
        torch.save(full_state(trainer), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_equals_gradient_accumulation(data, tmp_path):
    """2 gloo ranks with one micro-batch each == one process accumulating 2: counts, gradients and expert loads
    are summed over the group, every rank keeps every other batch of the same stream. The replicas stay
    bit-identical to each other (and to the one-process run up to the summation order)."""
    spawn(_dp_worker, (str(tmp_path / "init"), str(data), str(tmp_path)), nprocs=2, timeout_s=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert_identical(ranks[0], ranks[1])
    single = Trainer(config(data, tmp_path / "single", steps=3, grad_accum=2))
    single.train()
    expected = full_state(single)
    assert ranks[0]["loader"] == expected["loader"] and ranks[0]["balancer"] == expected["balancer"]
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(ranks[0]["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
