"""Distributed training (dsv4.parallel.parallelize): 2 gloo processes on CPU, each with half of every global batch,
train like one process on the whole batch — with FSDP2, and with expert parallelism (+ FSDP2) — for 50 steps of
V4's losses (CE + MTP + balance + indexer KL) under Muon + AdamW, clipping and the aux-loss-free bias update.

Tolerance (reduction order): one process on the whole batch and two processes on its halves compute every
row alike but sum the halves' contributions to each gradient (and the loss, and the expert outputs' GEMM blocks)
in another order, so they differ by fp32 rounding that training then carries along. The yardstick is that same
reordering inside one process: the whole batch as two accumulated micro-batches (`halves`). Two processes must
stay at least as close to the whole-batch run as `halves` does (factor 2, plus an fp32 floor), and they must
equal `halves` itself almost exactly (they sum the same two partial gradients; the remaining differences are the
fp64 vs fp32 gradient norm of the clip and GEMM blocking on other row counts). A dropped or doubled expert, a
missing gradient average or a wrong load reduction moves the loss by orders of magnitude more.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import prepare_shakespeare_docs
from multiprocess import spawn

from dsv4.config import preset
from dsv4.model import Transformer, init_weights
from dsv4.model.cache import ForwardTrace
from dsv4.model.moe import MoE
from dsv4.parallel import (
    clip_grad_norm_,
    dp_group,
    full_state_dict,
    global_grad_norm,
    leave_process,
    load_full_state_dict,
    parallelize,
)
from dsv4.train.losses import BiasBalancer, balance_loss_sum, cross_entropy_sum
from dsv4.train.optim import build_optimizers

WORLD = 2
TIMEOUT_S = 240
# tiny V4: a hash-routed sliding layer, a learned-routing CSA layer (indexer), an MTP block; 4 experts (2 per rank)
ARGS = preset("tiny").replace(vocab_size=64, n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0),
                              n_routed_experts=4, n_activated_experts=2, max_seq_len=64)
BATCH, SEQ = 4, 16  # global batch; each rank takes BATCH // WORLD rows
STEPS = 50
LR = 3e-3
MTP_W, ALPHA, BIAS_SPEED = 0.3, 1e-4, 1e-3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> Transformer:
    torch.manual_seed(0)
    return init_weights(Transformer(ARGS, dtype=torch.float32), seed=1)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stream: a random sparse Markov chain over the vocabulary (learnable), fresh rows each step."""
    g = torch.Generator().manual_seed(1000)
    nxt = torch.randint(0, ARGS.vocab_size, (ARGS.vocab_size, 3), generator=g)
    g = torch.Generator().manual_seed(step)
    tok = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    tok[:, 0] = torch.randint(0, ARGS.vocab_size, (BATCH,), generator=g)
    for t in range(SEQ):
        tok[:, t + 1] = nxt[tok[:, t], torch.randint(0, 3, (BATCH,), generator=g)]
    return tok[:, :-1], tok[:, 1:]


def _train(model, parts: list[slice], world: int, group, steps: int = STEPS) -> list[float]:
    """`steps` optimizer steps; this process runs the rows `parts` (one forward each) of every global batch.
    Losses are normalised by the global counts; with `world` > 1 the FSDP2 average needs the loss x world."""
    opt = build_optimizers(model, LR)
    balancer = BiasBalancer(model, BIAS_SPEED, group)
    n_tok, n_mtp, n_seq, n_fwd = BATCH * SEQ, BATCH * (SEQ - 1), BATCH, len(parts) * world
    curve = []
    for step in range(steps):
        tokens, targets = _batch(step)
        total = torch.zeros((), dtype=torch.float64)
        for rows in parts:
            tok, tgt = tokens[rows], targets[rows]
            valid = torch.ones_like(tok, dtype=torch.bool)
            trace = ForwardTrace()
            streams = model.forward_streams(tok, trace=trace)
            ce, _ = cross_entropy_sum(model.logits(streams), tgt)
            mtp_trace = ForwardTrace()
            mtp, _ = cross_entropy_sum(model.mtp_logits(streams[:, :-1], tok[:, 1:], trace=mtp_trace), tgt[:, 1:])
            bal = (balance_loss_sum(trace.routing, valid, ARGS.n_routed_experts, ARGS.n_activated_experts)
                   + balance_loss_sum(mtp_trace.routing, valid[:, 1:], ARGS.n_routed_experts,
                                      ARGS.n_activated_experts))
            balancer.add(trace.routing, valid)
            balancer.add(mtp_trace.routing, valid[:, 1:])
            kl = sum(trace.indexer_losses) + sum(mtp_trace.indexer_losses)
            loss = ce / n_tok + MTP_W * mtp / n_mtp + ALPHA * bal / n_seq + kl / n_fwd
            (loss * world).backward()
            total += loss.detach().double()
        if group is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            clip_grad_norm_(model.parameters(), 1.0, group)
            dist.all_reduce(total, group=group)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balancer.step()
        curve.append(float(total))
    return curve


# name -> (mesh shape, mesh dim names, fsdp, expert_parallel)
LAYOUTS = {
    "fsdp": ((WORLD,), ("dp",), True, False),
    "ep": ((WORLD,), ("ep",), True, True),
    "replicated": ((WORLD,), ("dp",), False, False),  # FSDP2 over a W x 1 mesh: DDP
    "ep_replicated": ((WORLD,), ("ep",), False, True),
    "ep_2d": ((1, WORLD), ("dp", "ep"), True, True),  # experts split over "ep", dense HSDP
    "dp_2d": ((WORLD, 1), ("dp", "ep"), True, True),  # every rank every expert (FSDP over "dp"), dense replicated
}


def _worker(rank: int, init_file: str, out_dir: str, layout: str, steps: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        shape, names, fsdp, expert_parallel = LAYOUTS[layout]
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        model = parallelize(_model(), mesh, fsdp=fsdp, expert_parallel=expert_parallel)
        group = dp_group(model)
        held = {n for n, _ in model.named_parameters() if ".experts." in n}
        half = BATCH // WORLD
        t0 = time.perf_counter()
        curve = _train(model, [slice(rank * half, (rank + 1) * half)], WORLD, group, steps)
        seconds = time.perf_counter() - t0
        norm = float(global_grad_norm(model.parameters(), group))  # no gradients left: 0
        state = full_state_dict(model)
        result = {"curve": curve, "held": sorted(held), "seconds": seconds, "norm_after_zero_grad": norm,
                  "moe": sorted({(type(m).__name__, type(m.expert_parallel).__name__)
                                 for m in model.modules() if isinstance(m, MoE)})}
        # the gathered plain state loads back into a parallel model (every rank reads rank 0's dict)
        objs = [state]
        dist.broadcast_object_list(objs, src=0)
        fresh = parallelize(Transformer(ARGS, dtype=torch.float32), mesh, fsdp=fsdp, expert_parallel=expert_parallel)
        load_full_state_dict(fresh, objs[0])
        again = full_state_dict(fresh)
        if rank == 0:
            result["state"] = state
            result["reloaded_equal"] = all(torch.equal(again[k], v) for k, v in state.items()) and \
                list(again) == list(state)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    leave_process(0)  # results written: past the teardown where gloo's threads can abort


@pytest.fixture(scope="module")
def single():
    """One process: the whole batch in one forward, and (the reduction-order yardstick) as two micro-batches."""
    torch.set_num_threads(1)
    out = {}
    for name, parts in (("whole", [slice(0, BATCH)]), ("halves", [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)])):
        model = _model()
        curve = _train(model, parts, 1, None)
        out[name] = {"curve": curve, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return out


def _run(tmp_path: Path, layout: str, steps: int = STEPS) -> list[dict]:
    spawn(_worker, (str(tmp_path / "init"), str(tmp_path), layout, steps), nprocs=WORLD, timeout_s=TIMEOUT_S)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _state_diff(a: dict, b: dict) -> tuple[float, float]:
    """(max |a - b|, ||a - b|| / ||b||) over every float tensor of two state dicts with the same keys in order."""
    assert list(a) == list(b)
    keys = [k for k in b if b[k].is_floating_point()]
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys)
    den = sum(float(b[k].double().square().sum()) for k in keys)
    return worst, (num / den) ** 0.5


def _check(ranks: list[dict], single: dict, what: str) -> None:
    """Loss curves: within 2x the reorder yardstick (measured ~1e-6 over 50 steps) and 1e-5 absolute. Weights:
    a few parameters get gradients that are nearly pure rounding noise — the first layer's attention mHC maps
    act on hc identical streams (the embedding repeated), so most directions of their gradient are degenerate —
    and Muon (unit singular values) and AdamW (eps 1e-20, a sign-like step) turn noise into lr-sized steps;
    they do not move the loss. So the weights are compared with the same yardstick: the relative distance
    (Frobenius, all tensors) within 2x, the largest single difference within 3x, of halves-vs-whole."""
    whole, halves = single["whole"], single["halves"]
    curve = ranks[0]["curve"]
    assert ranks[1]["curve"] == curve  # the all-reduced loss: the same number on every rank
    assert curve[-1] < 0.6 * curve[0]  # it trains
    noise = _max_diff(halves["curve"], whole["curve"])
    d_whole, d_halves = _max_diff(curve, whole["curve"]), _max_diff(curve, halves["curve"])
    state = ranks[0]["state"]
    (w_noise, r_noise), (w_whole, r_whole) = _state_diff(halves["state"], whole["state"]), \
        _state_diff(state, whole["state"])
    print(f"{what}: {STEPS} steps in {ranks[0]['seconds']:.1f}s; loss {curve[0]:.4f} -> {curve[-1]:.4f}; "
          f"max |loss diff| vs whole {d_whole:.2e}, vs halves {d_halves:.2e}, halves vs whole {noise:.2e}; "
          f"weights vs whole: max {w_whole:.2e} rel {r_whole:.2e}, halves vs whole: max {w_noise:.2e} "
          f"rel {r_noise:.2e}")
    assert d_whole <= 2 * noise + 1e-6 and d_whole <= 1e-5 and d_halves <= 1e-5
    assert r_whole <= 2 * r_noise + 1e-6 and w_whole <= 3 * w_noise + 1e-6
    # the gathered state dict is the plain model's (keys, order, shapes), loads into one, and loaded back into a
    # parallel model it gathers to the same tensors
    plain = Transformer(ARGS, dtype=torch.float32)
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state)
    assert ranks[0]["reloaded_equal"]
    assert ranks[0]["norm_after_zero_grad"] == 0.0


def test_fsdp2_two_processes_match_one(tmp_path, single):
    ranks = _run(tmp_path, "fsdp")
    _check(ranks, single, "FSDP2")
    # FSDP only: every rank holds (a shard of) every expert
    assert ranks[0]["held"] == ranks[1]["held"] and len(ranks[0]["held"]) == 3 * 4 * (ARGS.n_layers + 1)
    # the model's own MoE class, the training strategy installed from outside
    assert ranks[0]["moe"] == [("MoE", "ReplicatedExperts")]


def test_expert_parallel_two_processes_match_one(tmp_path, single):
    ranks = _run(tmp_path, "ep")
    _check(ranks, single, "EP + FSDP2")
    # each rank holds only its 2 of the 4 experts of every MoE layer (incl. the MTP block's)
    for rank, result in enumerate(ranks):
        ids = {int(n.split(".experts.")[1].split(".")[0]) for n in result["held"]}
        assert ids == {2 * rank, 2 * rank + 1}, (rank, ids)
        assert len(result["held"]) == 3 * 2 * (ARGS.n_layers + 1)
        assert result["moe"] == [("MoE", "AllToAllExperts")]


@pytest.mark.parametrize("layout", ["replicated", "ep_replicated", "ep_2d", "dp_2d"])
def test_other_layouts_follow_the_same_curve(tmp_path, single, layout):
    """fsdp=False (dense replicated) with and without EP, and the 2-D ("dp", "ep") mesh both ways round: the first
    steps of the same curve, a plain state dict that reloads."""
    steps = 4
    ranks = _run(tmp_path, layout, steps)
    assert ranks[1]["curve"] == ranks[0]["curve"]
    assert _max_diff(ranks[0]["curve"], single["whole"]["curve"][:steps]) <= 1e-5
    assert list(ranks[0]["state"]) == list(Transformer(ARGS, dtype=torch.float32).state_dict())
    assert ranks[0]["reloaded_equal"]
    split = LAYOUTS[layout][3] and WORLD in LAYOUTS[layout][0][-1:]
    assert len(ranks[0]["held"]) == 3 * (2 if split else 4) * (ARGS.n_layers + 1)
    assert ranks[0]["moe"] == [("MoE", "AllToAllExperts" if split else "ReplicatedExperts")]


# ------------------------------------------------------------------------------------------------ with the Trainer

TRAIN_MODEL = {"n_layers": 2, "n_hash_layers": 1, "compress_ratios": [0, 4, 0], "n_routed_experts": 4}
TRAIN_STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_shakespeare_docs(tmp_path_factory.mktemp("shakespeare"), chars=20000, parts=150)


def _trainer_config(data: Path, out: Path, **changes):
    from dsv4.train.trainer import TrainConfig

    base = dict(data=str(data), out=str(out), preset="tiny", model=dict(TRAIN_MODEL), steps=TRAIN_STEPS,
                batch_size=2, seq_len=32, warmup_steps=1, eval_every=0, log_every=1, progress=False, seed=0)
    return TrainConfig(**{**base, **changes})


def _trainer_worker(rank: int, init_file: str, data: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from dsv4.train.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        config = _trainer_config(Path(data), Path(out) / "run")
        # the model the Trainer would build, parallelized from outside and handed in
        plain = Trainer(config).model
        model = parallelize(plain, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",)))
        trainer = Trainer(config, model=model, dp_group=dp_group(model), grad_sync="wrapper")
        records = [trainer.train_step() for _ in range(TRAIN_STEPS)]
        state = full_state_dict(trainer.model)
        if rank == 0:
            torch.save({"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records],
                        "state": state}, Path(out) / "trainer.pt")
    finally:
        dist.destroy_process_group()
    leave_process(0)  # results written: past the teardown where gloo's threads can abort


def test_trainer_with_fsdp2_model_equals_one_process_accumulating(data, tmp_path):
    """The Trainer's data-parallel seam takes a parallelized model as is (FSDP2: grad_sync="wrapper", its clip on
    DTensors): 2 ranks == one process with grad_accum 2, the Trainer's own losses (documents, MTP, balance, KL)."""
    from dsv4.train.trainer import Trainer

    spawn(_trainer_worker, (str(tmp_path / "init"), str(data), str(tmp_path)), nprocs=WORLD, timeout_s=TIMEOUT_S)
    got = torch.load(tmp_path / "trainer.pt", weights_only=True)
    single = Trainer(_trainer_config(data, tmp_path / "single", grad_accum=WORLD))
    records = [single.train_step() for _ in range(TRAIN_STEPS)]
    for name in ("loss", "grad_norm"):
        for a, b in zip(got[name], [r[name] for r in records], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (name, got[name], [r[name] for r in records])
    expected = single.model.state_dict()
    assert list(got["state"]) == list(expected)
    _, rel = _state_diff(got["state"], expected)
    assert rel <= 1e-3, rel


# ---------------------------------------------------------------------------------------- dsv4 train under torchrun

TORCHRUN_TIMEOUT_S = 300
CLI_STEPS = 6


def _cli_flags(data: Path) -> list[str]:
    model = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in TRAIN_MODEL.items()]
    return ["train", "--data", str(data), "--preset", "tiny", *(x for m in model for x in ("--model-arg", m)),
            "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1", "--eval-every", "0", "--log-every", "1",
            "--no-progress", "--threads", "1"]


def _torchrun(flags: list[str]) -> str:
    """`torchrun --standalone --nproc-per-node 2 -m dsv4 <flags>`; its stderr. Never left running: on a timeout
    torchrun is told to stop its workers (they run in sessions of their own), then killed."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun is installed with torch next to the interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", str(WORLD), "-m", "dsv4", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        pytest.fail(f"torchrun did not finish within {TORCHRUN_TIMEOUT_S}s")
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys(), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(b[step]), (step, a, b)


@pytest.fixture(scope="module")
def one_process_accumulating(data, tmp_path_factory):
    from dsv4.cli import main

    run = tmp_path_factory.mktemp("one") / "run"
    assert main([*_cli_flags(data), "--out", str(run), "--steps", str(CLI_STEPS), "--grad-accum", str(WORLD)]) == 0
    return _losses(run)


@pytest.mark.parametrize("layout", ["--fsdp", "--expert-parallel"])
def test_torchrun_train_equals_one_process_accumulating(data, tmp_path, capsys, one_process_accumulating, layout):
    """`torchrun --nproc-per-node 2 -m dsv4 train --fsdp | --expert-parallel`: the losses of one process with
    --grad-accum 2; the export loads with `dsv4 generate`; its step-4 checkpoint resumed (same layout) continues
    the run; a single process refuses the sharded checkpoint by name."""
    from dsv4.cli import main

    run, exported = tmp_path / "run", tmp_path / "export"
    err = _torchrun([*_cli_flags(data), "--out", str(run), "--steps", str(CLI_STEPS), "--checkpoint-every", "4",
                     "--export", str(exported), layout])
    assert err.count("dsv4 train: exported") == 1  # rank 0 alone prints
    straight = _losses(run)
    _close(straight, one_process_accumulating)
    assert (run / "checkpoints" / "step_00000004" / "optimizer" / ".metadata").is_file()
    assert main(["generate", "--checkpoint", str(exported), "--prompt", "72,101,108", "--max-new-tokens", "3",
                 "--numerics", "plain", "--dtype", "float32"]) == 0
    assert "decode:" in capsys.readouterr().out

    resumed = tmp_path / "resumed"
    err = _torchrun(["train", "--resume", str(run / "checkpoints" / "step_00000004"), "--out", str(resumed),
                     "--steps", str(CLI_STEPS), layout])
    assert "resumed" in err and "at step 4" in err
    _close(_losses(resumed), {s: v for s, v in straight.items() if s > 4})

    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "written by a parallel run" in capsys.readouterr().err
