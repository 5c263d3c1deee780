"""The training loop: V4's losses and schedules over prepared token shards, with exact resume.

One optimizer step (`Trainer.train_step`):
  1. take `grad_accum` packed batches from the loader and split each into per-document rows
     (`split_documents`: sample-level masking, training.md §4.3);
  2. forward every micro-batch, backward its share of the step loss
        CE/N_tok + λ_MTP·MTP/N_mtp + α·Σ_layers Σ_i f_i P_i / N_seq + w_idx · indexer KL / N_fwd,
     normalised by the step's *total* counts so accumulation equals one big batch (`losses` docstring);
  3. clip the global gradient norm to 1.0 (V3 §4.2, inherited by V4);
  4. Muon + AdamW step at lr(step) (`LRSchedule`), then the aux-loss-free bias update from the step's
     expert loads (`BiasBalancer`, after the optimizer as in V3 "at the end of each step").
λ_MTP is 0.3, 0.1 once the lr decays (`LRSchedule.mtp_weight`, V4 §4.2.2).

Sparse attention stages (training.md §6; V4 gives no numbers, V3.2's DSA recipe fills them in):
  * `dense_steps`: CSA attends to every compressed entry (`ForwardTrace.dense_indexer`), everything trains;
    the indexer learns its KL alongside (it is unused for selection, and its inputs are detached);
  * `indexer_warmup_steps`: still dense, but only the lightning indexers train, on their KL loss alone, at
    `indexer_lr` (V3.2: 1e-3); the LM head and MTP are not even run; no bias update (routing is frozen);
  * then sparse: top-k selection, all parameters on the LM losses, and the indexer on its KL over the
    selected entries (detached inputs, so neither loss leaks into the other's parameters).

Logging: a JSONL file (`metrics.jsonl`) with one record per logged step (`kind: "train"`: loss parts, lr,
MTP weight, grad norm, tokens/s, expert load balance max/mean, mHC composite gain forward/backward) and per
evaluation (`kind: "eval"`: held-out CE); a tqdm bar on a terminal; optional TensorBoard scalars.

Checkpoints (`save_checkpoint`) are atomic: written into a hidden temporary directory, fsynced, renamed
into place, and only then named by the `latest` file (itself replaced atomically), so a crash at any
point leaves the previous checkpoint the one that resumes. They hold the model (the gates' balancing
biases are buffers in its state_dict), both optimizers, the balancer's pending loads, the loader's
position, every RNG state, the step and the config. `resume` restores all of it; training N steps
straight and N/2 + resume + N/2 give bit-identical weights on CPU.

Data parallel is pluggable: pass `dp_group` and every rank walks the same seeded batch stream, keeping every
world-th batch (so a step of W ranks sees exactly the batches of one process with W x grad_accum); the
normalising counts and expert loads are summed over the group, and gradients are summed by the trainer
(`grad_sync="trainer"`) or by a wrapper that averages them (FSDP2/DDP: `grad_sync="wrapper"`, losses are
then scaled by the world size so the average is the global-batch gradient). A model parallelized by
`dsv4.parallel.parallelize` (FSDP2, expert parallelism) is clipped by the global norm over all its meshes;
its checkpoints hold the gathered plain model (`full_state_dict`, every rank calls it, rank 0 writes state.pt) and
the sharded optimizer states as a torch.distributed.checkpoint directory `optimizer/` (every rank writes its
shards into the same temporary directory before rank 0 renames it into place); `export` gathers it too. Such a
checkpoint resumes only into a parallelized model (any layout: DCP reshards); a single-process one only into a
plain model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, ModelArgs, preset
from ..model import Transformer, init_weights
from ..model.cache import ForwardTrace
from ..model.mhc import HC_MODES, composite_gain
from ..parallel.gradients import clip_grad_norm_, global_grad_norm
from ..parallel.state_dict import full_state_dict, load_full_state_dict
from ..plan import flops_per_token
from .data import DocumentRows, PackedLoader, open_split, read_manifest, split_documents
from .losses import (
    BiasBalancer,
    balance_loss_sum,
    mtp_inputs,
    target_count,
    valid_positions,
)
from .optim import Optimizers, build_optimizers, param_groups
from .precision import RECIPES, apply_precision, export_quantized
from .schedule import LRSchedule

__all__ = ["CHECKPOINT_FORMAT", "STAGES", "TrainConfig", "Trainer", "TrainError", "build_model", "checkpoint_config",
           "latest_checkpoint"]

CHECKPOINT_FORMAT = "dsv4-train-checkpoint"
CHECKPOINT_VERSION = 1
STAGES = ("dense", "indexer_warmup", "sparse")
OPTIMIZERS = ("muon", "adamw")
LOSS_PLOT = "loss.png"  # the loss curves, drawn beside the metrics at the end of a run
METRICS_FILE = "metrics.jsonl"
OPTIMIZER_DIR = "optimizer"  # a parallel run's sharded optimizer states (torch.distributed.checkpoint)


class TrainError(ValueError):
    """A bad training configuration, data directory or checkpoint; the message says which and why."""


AUTOCAST = ("off", "bf16")
# dense bf16 tensor-core peaks (TFLOP/s) by device name, for the metrics' mfu when peak_tflops is not given
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}


def peak_tflops(device: torch.device, configured: float) -> float | None:
    """The peak the mfu is measured against: the configured one, else a known GPU's dense bf16 peak, else None."""
    if configured:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def train_flops_per_token(args: ModelArgs, seq_len: int, mtp: bool) -> float:
    """Model FLOPs of training on one token: forward + backward (3x the forward), the forward's matmuls over the
    active parameters plus attention and indexer scoring at the window's mean position, and the MTP blocks'
    share when they train. (What MFU counts: recomputation and the quantisation simulation are not model FLOPs.)"""
    forward = flops_per_token(args, max(1, seq_len // 2)).total
    if mtp and args.n_mtp_layers:
        forward *= 1 + args.n_mtp_layers / args.n_layers
    return 3 * forward


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in every checkpoint; `dsv4 train` has a flag for each field)."""

    data: str = ""  # a `dsv4 prepare-data` directory (train split; val split for evaluation)
    out: str = "runs/dsv4"  # checkpoints, metrics.jsonl, tensorboard/
    preset: str = "tiny"  # model size (dsv4.config.PRESETS); the vocabulary comes from the data
    model: dict = field(default_factory=dict)  # ModelArgs overrides, e.g. {"n_layers": 2}
    hc_mode: str = "mhc"  # mhc | hc (unconstrained, ablation) | residual (ablation)
    precision: str = "fp32"  # dsv4.train.precision recipe: fp32 | bf16 | fp8 | fp8+fp4 | fp8-torchao
    optimizer: str = "muon"  # muon (V4: Muon for matrices + AdamW) | adamw (AdamW for everything: baseline)
    lr: float = 3e-3  # peak, shared by Muon and AdamW (V4: γ = 0.18 matches their update RMS)
    warmup_steps: int = 100
    decay_steps: int = -1  # cosine decay over the last N steps; -1: the last 20% (V4: stable, then decay)
    floor_ratio: float = 0.1  # lr at the end of the decay, relative to the peak (V4: 10%)
    weight_decay: float = 0.1
    adam_eps: float = 1e-20  # V4's
    steps: int = 1000  # optimizer steps in all (the schedule's length)
    batch_size: int = 8  # packed windows per micro-batch
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step
    clip: float = 1.0  # global gradient-norm clip (0: off)
    mtp_weight: float = 0.3  # λ_MTP while the lr is stable
    mtp_weight_decay: float = 0.1  # λ_MTP once the lr decays
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight
    bias_speed: float = 1e-3  # aux-loss-free bias update speed γ
    bias_update_every: int = 1  # pool expert loads over N steps before a bias update (V4: 1)
    dense_steps: int = 0  # dense CSA attention, everything trains
    indexer_warmup_steps: int = 0  # dense CSA, only the indexers train (KL) at indexer_lr
    indexer_lr: float = 1e-3
    indexer_loss_weight: float = 1.0
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end; needs a val split)
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept (0: all)
    bucket_tokens: int = 0  # > 0: group a batch's document rows into forwards of at most this many positions
    seed: int = 0
    init_from: str = ""  # a run or checkpoint directory whose model weights start this run (fine-tuning)
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)
    progress: bool = True  # tqdm bar on stderr when it is a terminal
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    device: str = "cpu"  # where the model trains: cpu, cuda, cuda:N
    autocast: str = "off"  # off | bf16: the forward under torch.autocast in bf16 (fp32 master weights and losses)
    peak_tflops: float = 0.0  # the device's peak for the metrics' mfu (0: known GPUs' dense bf16 peak, else no mfu)

    # fields that only change how a run is observed or where it is stored: a resume may change them
    RESUMABLE = ("data", "out", "steps", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                 "keep_checkpoints", "tensorboard", "progress", "threads", "device", "peak_tflops")

    def validate(self) -> TrainConfig:
        problems = []

        def need(ok: bool, why: str) -> None:
            if not ok:
                problems.append(why)

        need(bool(self.data), "data: give a prepared data directory (dsv4 prepare-data)")
        need(self.hc_mode in HC_MODES, f"hc_mode {self.hc_mode!r}: choose from {', '.join(HC_MODES)}")
        need(self.precision in RECIPES, f"precision {self.precision!r}: choose from {', '.join(RECIPES)}")
        need(self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every",
                     "bias_update_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "dense_steps", "indexer_warmup_steps", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "bucket_tokens", "threads"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "adam_eps", "clip", "mtp_weight", "mtp_weight_decay", "balance_alpha",
                     "bias_speed", "indexer_lr", "indexer_loss_weight"):
            value = getattr(self, name)
            need(isinstance(value, int | float) and math.isfinite(value) and value >= 0,
                 f"{name} must be a finite number >= 0, got {value!r}")
        need(0 <= self.floor_ratio <= 1, f"floor_ratio must be in [0, 1], got {self.floor_ratio}")
        need(self.decay_steps >= -1, f"decay_steps must be >= 0 or -1 (after the warm-up), got {self.decay_steps}")
        need(self.warmup_steps + max(self.decay_steps, 0) <= self.steps,
             f"warmup_steps {self.warmup_steps} + decay_steps {self.decay_steps} exceed steps {self.steps}")
        need(isinstance(self.model, dict), f"model must be a dict of ModelArgs overrides, got {self.model!r}")
        need(self.autocast in AUTOCAST, f"autocast {self.autocast!r}: choose from {', '.join(AUTOCAST)}")
        need(isinstance(self.peak_tflops, int | float) and self.peak_tflops >= 0,
             f"peak_tflops must be >= 0, got {self.peak_tflops!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            device = None
        need(device is not None and device.type in ("cpu", "cuda"),
             f"device {self.device!r}: cpu, cuda or cuda:N")
        if device is not None and device.type == "cuda":
            need(torch.cuda.is_available(), f"device {self.device!r}: torch sees no CUDA device here")
        if problems:
            raise TrainError("bad training config:\n  " + "\n  ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainError(f"unknown training config key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise TrainError(f"config {path}: {err.strerror or err}") from None
        except json.JSONDecodeError as err:
            raise TrainError(f"config {path}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise TrainError(f"config {path}: expected a JSON object of TrainConfig fields")
        return cls.from_dict(values)

    def schedule(self) -> LRSchedule:
        """V4's shape: warm-up, constant, cosine to floor_ratio over the last `decay_steps` (-1: 20%)."""
        if self.decay_steps < 0:
            decay = min(round(0.2 * self.steps), self.steps - self.warmup_steps)
        else:
            decay = self.decay_steps
        return LRSchedule(self.lr, self.steps, self.warmup_steps, decay, self.floor_ratio)

    def stage(self, step: int) -> str:
        if step < self.dense_steps:
            return "dense"
        if step < self.dense_steps + self.indexer_warmup_steps:
            return "indexer_warmup"
        return "sparse"


class _AdamWOnly:
    """AdamW for every parameter (the baseline of the Muon comparison), with the `Optimizers` interface."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, eps: float) -> None:
        muon, adamw = param_groups(model, weight_decay=weight_decay)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in [*muon, *adamw]]
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=eps, weight_decay=weight_decay)

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups

    def set_lr(self, lr: float) -> None:
        for group in self.adamw.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])


def _rng_state() -> dict[str, Any]:
    """Every RNG a run may draw from, as tensors / lists only (so `torch.load(weights_only=True)` reads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, cached],
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-normal form (tuples -> lists) so a config read back from config.json compares equal."""
    return json.loads(json.dumps(values))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names: a checkpoint itself, or a run directory (its `latest`)."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    pointer = path / "checkpoints" / "latest"
    if not pointer.is_file():
        raise TrainError(f"{path}: no checkpoint here (neither state.pt nor checkpoints/latest)")
    target = path / "checkpoints" / pointer.read_text(encoding="utf-8").strip()
    if not (target / "state.pt").is_file():
        raise TrainError(f"{pointer} names {target.name}, which holds no state.pt")
    return target


def checkpoint_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """The config of the checkpoint `path` names (see `latest_checkpoint`), with `overrides` of RESUMABLE fields."""
    ckpt = latest_checkpoint(path)
    try:
        saved = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"{ckpt}: cannot read config.json ({err})") from None
    bad = sorted(set(overrides) - set(TrainConfig.RESUMABLE))
    if bad:
        raise TrainError(f"cannot change {', '.join(bad)} when resuming (they define the run); "
                         f"changeable: {', '.join(TrainConfig.RESUMABLE)}")
    return TrainConfig.from_dict({**saved, **overrides})


def _model_args(c: TrainConfig, vocab_size: int) -> ModelArgs:
    try:
        args = preset(c.preset)
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in c.model.items()}
        args = args.replace(**{"vocab_size": vocab_size, **overrides})
    except (ConfigError, TypeError, ValueError) as err:
        raise TrainError(f"model: {err}") from None
    if args.vocab_size < vocab_size:
        raise TrainError(f"model vocab_size {args.vocab_size} is smaller than the data's tokenizer ({vocab_size})")
    if args.max_seq_len < c.seq_len:
        args = args.replace(max_seq_len=c.seq_len)
    return args


def _init_model(c: TrainConfig, args: ModelArgs) -> Transformer:
    """Fresh weights from the seed, or with `init_from` the model weights of another run's checkpoint (its
    optimizer states, loader position and step are not taken: a fine-tune is a new run on new data)."""
    model = init_weights(Transformer(args, dtype=torch.float32, hc_mode=c.hc_mode), seed=c.seed)
    if c.init_from:
        ckpt = latest_checkpoint(c.init_from)
        try:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
        except Exception as err:
            raise TrainError(f"init_from {ckpt}: cannot start from its weights ({err})") from None
    return model


def build_model(config: TrainConfig) -> Transformer:
    """The model `Trainer(config)` builds (the same weights: with one seed every data rank starts equal), to
    parallelize before handing it to `Trainer(config, model=...)`."""
    c = config.validate()
    try:
        vocab_size = int(read_manifest(Path(c.data))["tokenizer"]["vocab_size"])
    except (OSError, ValueError) as err:
        raise TrainError(f"data {c.data}: {err}") from None
    torch.manual_seed(c.seed)
    return _init_model(c, _model_args(c, vocab_size))


class Trainer:
    """Builds the model, optimizers, balancer and loaders of a `TrainConfig` and runs it (see the module
    docstring). `model` may be given (e.g. already sharded); `log` receives each metrics record too."""

    def __init__(self, config: TrainConfig, *, model: Transformer | None = None,
                 dp_group: dist.ProcessGroup | None = None, grad_sync: str = "trainer",
                 log: Callable[[dict], None] | None = None) -> None:
        self.config = config.validate()
        if grad_sync not in ("trainer", "wrapper"):
            raise ValueError(f"grad_sync={grad_sync!r}: 'trainer' or 'wrapper'")
        self.dp_group, self.grad_sync = dp_group, grad_sync
        self.rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.world = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.log_hook = log
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        data = Path(c.data)
        try:
            self.manifest = read_manifest(data)
            train_split = open_split(data, "train")
        except (OSError, ValueError) as err:
            raise TrainError(f"data {data}: {err}") from None
        tok = self.manifest["tokenizer"]
        self.pad_id = int(tok.get("pad_id") or 0)
        self.args = _model_args(c, int(tok["vocab_size"]))
        torch.manual_seed(c.seed)
        if model is None:
            model = _init_model(c, self.args)
        self.model = model
        # a model parallelized by dsv4.parallel.parallelize (FSDP2 / expert parallel): its own clip and checkpoints
        self.parallel = getattr(model, "data_parallel", None)
        if self.parallel is not None and c.precision != "fp32":
            raise TrainError(f"precision {c.precision!r} with a parallelized model is not supported yet; use fp32")
        if c.precision != "fp32":
            apply_precision(self.model, c.precision)
        self.device = torch.device(c.device)
        self.model.to(self.device)
        self.flops_per_token = train_flops_per_token(self.args, c.seq_len, c.mtp_weight > 0)
        self.peak_tflops = peak_tflops(self.device, c.peak_tflops)
        if c.optimizer == "muon":
            self.optimizers = build_optimizers(self.model, c.lr, weight_decay=c.weight_decay, eps=c.adam_eps)
        else:
            self.optimizers = _AdamWOnly(self.model, c.lr, c.weight_decay, c.adam_eps)
        self.schedule = c.schedule()
        self.balancer = BiasBalancer(self.model, c.bias_speed, dp_group, c.bias_update_every)
        try:
            self.loader = PackedLoader(train_split, c.seq_len, c.batch_size, seed=c.seed)
        except ValueError as err:
            raise TrainError(f"data {data}: {err}") from None
        self.val_split = open_split(data, "val") if "val" in self.manifest.get("splits", {}) else None
        self.indexer_params = [p for n, p in self.model.named_parameters() if ".indexer." in n]
        self.step = 0
        self.tokens_seen = 0
        self.out = Path(c.out)
        self._tb = None
        if c.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainError("tensorboard=True needs the tensorboard package (pip install tensorboard); "
                                 "metrics.jsonl is written either way") from None
            self._tb_class = SummaryWriter

    # ------------------------------------------------------------------------------------------ the step

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.dp_group is None:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def _groups(self, rows: DocumentRows) -> list[DocumentRows]:
        """The forwards of one batch's rows; none when no row has a target (a window inside a chat prompt)."""
        if not len(rows.lengths):
            return []
        groups = rows.buckets(self.config.bucket_tokens) if self.config.bucket_tokens else [rows]
        return [g.to(self.device) for g in groups]

    def _autocast(self):
        """The forward's autocast context (a no-op context when autocast is off)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.autocast == "bf16")

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (module docstring); returns its metrics record."""
        c, model, step = self.config, self.model, self.step
        stage = c.stage(step)
        t0 = time.perf_counter()
        model.train()
        # every rank walks the same seeded stream and keeps every world-th batch: the global step sees exactly
        # the batches one process with grad_accum x world would (so DP == accumulation, testably)
        batches = [self.loader.next_batch() for _ in range(c.grad_accum * self.world)][self.rank::self.world]
        groups = [g for b in batches for g in self._groups(split_documents(b, self.pad_id))]
        n_tok = sum(int(g.loss_mask.sum()) for g in groups)
        n_mtp = sum(int(g.loss_mask[:, 1:].sum()) for g in groups)
        n_seq = sum(len(g.lengths) for g in groups)
        n_fwd = len(groups)
        inputs = sum(int(g.lengths.sum()) for g in groups)
        n_tok, n_mtp, n_seq, n_fwd = self._all_reduce([n_tok, n_mtp, n_seq, n_fwd])
        scale = self.world if (self.dp_group is not None and self.grad_sync == "wrapper") else 1.0
        mtp_w = self.schedule.mtp_weight(step, c.mtp_weight, c.mtp_weight_decay) if self.args.n_mtp_layers else 0.0
        sums = {"ce": 0.0, "mtp": 0.0, "balance": 0.0, "indexer_kl": 0.0}
        last_maps = None
        for g in groups:
            parts, maps = self._micro(g, stage, mtp_w, max(n_tok, 1), max(n_mtp, 1), max(n_seq, 1), n_fwd, scale)
            for k, v in parts.items():
                sums[k] += v
            last_maps = maps
        if self.dp_group is not None and self.grad_sync == "trainer":
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)
        params = [p for p in model.parameters() if p.grad is not None]
        if self.parallel is not None:  # sharded and expert-local gradients on several meshes
            if c.clip > 0:
                grad_norm = float(clip_grad_norm_(params, c.clip, self.dp_group))
            else:
                grad_norm = float(global_grad_norm(params, self.dp_group))
        elif c.clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        lr = c.indexer_lr if stage == "indexer_warmup" else self.schedule(step)
        self.optimizers.set_lr(lr)
        self.optimizers.step()
        self.optimizers.zero_grad(set_to_none=True)
        balance = self.balancer.step() if stage != "indexer_warmup" else {}
        self.step += 1
        inputs = int(self._all_reduce([inputs])[0])
        self.tokens_seen += inputs
        ce, mtp, bal, kl = self._all_reduce([sums["ce"], sums["mtp"], sums["balance"], sums["indexer_kl"]])
        elapsed = time.perf_counter() - t0
        record = {"kind": "train", "step": self.step, "stage": stage,
                  "loss": ce + mtp_w * mtp + c.balance_alpha * bal + c.indexer_loss_weight * kl,
                  "ce": ce, "mtp": mtp, "balance": bal, "indexer_kl": kl, "lr": lr, "mtp_weight": mtp_w,
                  "grad_norm": grad_norm, "tokens": inputs, "tokens_per_s": inputs / max(elapsed, 1e-9),
                  "step_s": elapsed, **balance}
        model_tflops = self.flops_per_token * inputs / max(elapsed, 1e-9) / 1e12
        record["model_tflops"] = model_tflops
        if self.peak_tflops:
            record["mfu"] = model_tflops / self.peak_tflops
        if stage == "indexer_warmup":
            record["loss"] = c.indexer_loss_weight * kl
        record.update(self._hc_gain(last_maps))
        return record

    def _micro(self, rows: DocumentRows, stage: str, mtp_w: float, n_tok: float, n_mtp: float, n_seq: float,
               n_fwd: float, scale: float) -> tuple[dict[str, float], tuple]:
        """Forward + backward of one group of document rows; returns its (normalised) loss parts."""
        c, model = self.config, self.model
        width = rows.tokens.shape[1]
        valid = valid_positions(rows.lengths, width)
        trace = ForwardTrace(dense_indexer=stage != "sparse")
        with self._autocast():
            streams = model.forward_streams(rows.tokens, lengths=rows.lengths, trace=trace)
        kl = sum(trace.indexer_losses) if trace.indexer_losses else None
        parts = {"ce": 0.0, "mtp": 0.0, "balance": 0.0, "indexer_kl": 0.0}
        maps = (trace.hc_maps, valid)
        if stage == "indexer_warmup":
            if kl is not None:
                loss = kl * (c.indexer_loss_weight / n_fwd)
                (loss * scale).backward()
                parts["indexer_kl"] = kl.item() / n_fwd
            return parts, maps
        with self._autocast():
            ce_sum = model.head_loss(streams, rows.targets)
        loss = ce_sum / n_tok
        parts["ce"] = ce_sum.item() / n_tok
        bal = balance_loss_sum(trace.routing, valid, self.args.n_routed_experts, self.args.n_activated_experts)
        self.balancer.add(trace.routing, valid)
        if mtp_w > 0 and width > 1:
            next_tokens, targets, lengths = mtp_inputs(rows.tokens, rows.targets, rows.lengths)
            mtp_trace = ForwardTrace(dense_indexer=trace.dense_indexer)
            with self._autocast():
                mtp_sum = model.mtp_head_loss(streams[:, :-1], next_tokens, targets, lengths=lengths,
                                              trace=mtp_trace)
            loss = loss + mtp_w * mtp_sum / n_mtp
            parts["mtp"] = mtp_sum.item() / n_mtp
            mtp_valid = valid_positions(lengths, width - 1)
            bal = bal + balance_loss_sum(mtp_trace.routing, mtp_valid, self.args.n_routed_experts,
                                         self.args.n_activated_experts)
            self.balancer.add(mtp_trace.routing, mtp_valid)
            if mtp_trace.indexer_losses:
                kl = sum(mtp_trace.indexer_losses) + (kl if kl is not None else 0.0)
        loss = loss + c.balance_alpha * bal / n_seq
        parts["balance"] = bal.item() / n_seq
        if kl is not None:
            loss = loss + kl * (c.indexer_loss_weight / n_fwd)
            parts["indexer_kl"] = kl.item() / n_fwd
        (loss * scale).backward()
        return parts, maps

    @torch.no_grad()
    def _hc_gain(self, maps) -> dict[str, float]:
        """The mHC paper's composite Amax gain (training.md §2.5) over the real tokens of the step's last
        forward: 1 / 1 for mHC up to Sinkhorn's residual, growing for unconstrained HC; exactly 1 for plain
        residuals (identity mixing, nothing recorded)."""
        if maps is None:
            return {}
        hc_maps, valid = maps
        if not hc_maps or any(m is None for m in hc_maps):
            return {"hc_gain_fwd": 1.0, "hc_gain_bwd": 1.0}
        fwd, bwd = composite_gain([m.detach()[valid].unsqueeze(0) for m in hc_maps])
        return {"hc_gain_fwd": float(fwd), "hc_gain_bwd": float(bwd)}

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Held-out CE (token mean) and MTP CE over the first `eval_batches` batches of the val split, in the
        current attention stage; None without a val split."""
        if self.val_split is None:
            return None
        c, model = self.config, self.model
        try:
            loader = PackedLoader(self.val_split, c.seq_len, c.batch_size, seed=0, shuffle=False)
        except ValueError as err:
            raise TrainError(f"val split: {err}") from None
        model.eval()
        dense = c.stage(self.step) != "sparse"
        ce = mtp = 0.0
        n_tok = n_mtp = 0
        for _ in range(min(c.eval_batches, loader.batches_per_epoch)):
            for g in self._groups(split_documents(loader.next_batch(), self.pad_id)):
                with self._autocast():
                    streams = model.forward_streams(g.tokens, lengths=g.lengths,
                                                    trace=ForwardTrace(dense_indexer=dense))
                    s = model.head_loss(streams, g.targets)
                ce, n_tok = ce + float(s), n_tok + target_count(g.targets)
                if self.args.n_mtp_layers and g.tokens.shape[1] > 1:
                    nt, tg, ln = mtp_inputs(g.tokens, g.targets, g.lengths)
                    with self._autocast():
                        s = model.mtp_head_loss(streams[:, :-1], nt, tg, lengths=ln)
                    mtp, n_mtp = mtp + float(s), n_mtp + target_count(tg)
        model.train()
        ce, n_tok, mtp, n_mtp = self._all_reduce([ce, n_tok, mtp, n_mtp])
        record = {"kind": "eval", "step": self.step, "val_loss": ce / max(n_tok, 1), "val_tokens": int(n_tok)}
        if n_mtp:
            record["val_mtp"] = mtp / n_mtp
        return record

    # ------------------------------------------------------------------------------------------ the loop

    def _write(self, record: dict[str, Any]) -> None:
        if self.log_hook is not None:
            self.log_hook(record)
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None and self.config.tensorboard:
            self._tb = self._tb_class(log_dir=str(self.out / "tensorboard"))
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self._tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def train(self, until: int | None = None) -> dict[str, Any] | None:
        """Train to step `until` (default: the config's `steps`), logging, evaluating and checkpointing as
        configured; saves a checkpoint at the end. Returns the last evaluation (None without a val split)."""
        c = self.config
        end = min(c.steps, c.steps if until is None else until)
        bar = None
        if c.progress and self.rank == 0:
            try:
                from tqdm import tqdm

                bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                           disable=None)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                bar = None
        last_eval = None
        try:
            while self.step < end:
                record = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                if self.step % c.log_every == 0 or self.step == end:
                    self._write(record)
                if (c.eval_every and self.step % c.eval_every == 0) or self.step == c.steps:
                    last_eval = self.evaluate()
                    if last_eval is not None:
                        self._write(last_eval)
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step != end:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        if self._tb is not None:
            self._tb.flush()
        self.plot_losses()
        return last_eval

    def plot_losses(self) -> Path | None:
        """Draw the run's loss curves (train CE per stage, val CE) from metrics.jsonl into loss.png beside it;
        without matplotlib, say so on stderr and go on (the metrics are the record, the picture a convenience)."""
        metrics = self.out / METRICS_FILE
        if self.rank != 0 or not metrics.is_file():
            return None
        from ..plots import PlotUnavailable, loss_figure, read_metrics, save

        try:
            return save(loss_figure(read_metrics(metrics), title=f"{self.out.name}: loss"), self.out / LOSS_PLOT)
        except PlotUnavailable as err:
            print(f"dsv4 train: {LOSS_PLOT} not written: {err}", file=sys.stderr)
            return None

    # ------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's state.pt of a single-process (or replicated) run; see `save_checkpoint` for a
        parallelized model."""
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
                "tokens_seen": self.tokens_seen, "config": self.config.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizers.state_dict(),
                "balancer": self.balancer.state_dict(), "loader": self.loader.state_dict(), "rng": _rng_state()}

    def _balancer_state(self) -> dict[str, Any]:
        """The balancer's pending loads summed over the data ranks (a collective with `dp_group`); on resume
        rank 0 takes them and the others start from zero, so the next reduction sums the same global counts."""
        state = self.balancer.state_dict()
        if self.dp_group is not None and state["counts"]:
            ids = sorted(state["counts"])
            stacked = torch.stack([state["counts"][i] for i in ids])
            dist.all_reduce(stacked, group=self.dp_group)
            state["counts"] = dict(zip(ids, stacked.unbind(0), strict=True))
        return state

    def _named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opt = self.optimizers
        return {"muon": opt.muon, "adamw": opt.adamw} if isinstance(opt, Optimizers) else {"adamw": opt.adamw}

    def _sharded_optimizer_state(self) -> dict[str, Any]:
        """Each optimizer's state of this rank's parameters (shards, local experts), keyed by parameter name
        (flattened, so ranks holding different experts never disagree on a param-group list): what DCP saves and
        loads into. A collective. On a fresh optimizer torch first initialises the states by a zero-lr step."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(flatten_optimizer_state_dict=True)
        return {name: get_optimizer_state_dict(self.model, opt, options=options)
                for name, opt in self._named_optimizers().items()}

    def save_checkpoint(self, _write: Callable[[Path], None] | None = None) -> Path | None:
        """Write `out/checkpoints/step_XXXXXXXX` atomically and point `latest` at it (module docstring).
        Rank 0 writes state.pt (a parallelized model: gathered by every rank first; its optimizers' shards: every
        rank writes them into the temporary directory, then rank 0 renames it once all are done). `_write` is a
        test hook that runs inside the temporary directory before the rename (to simulate a crash mid-write)."""
        parallel = self.parallel is not None
        model_state = full_state_dict(self.model) if parallel else None  # collectives: every rank
        balancer = self._balancer_state()
        root = self.out / "checkpoints"
        name = f"step_{self.step:08d}"
        tmp = root / f".{name}.tmp-{os.getpid()}"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if parallel:
            import torch.distributed.checkpoint as dcp

            where = [str(tmp)]
            dist.broadcast_object_list(where, group=self.dp_group, group_src=0)  # rank 0's temporary directory
            tmp = Path(where[0])
            try:
                dcp.save(self._sharded_optimizer_state(), checkpoint_id=tmp / OPTIMIZER_DIR,
                         process_group=self.dp_group)
            except BaseException:
                if self.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        if self.rank != 0:
            if self.dp_group is not None:
                dist.barrier(group=self.dp_group)  # the others continue once rank 0's checkpoint is in place
            return None
        try:
            if parallel:
                state = {**self._parallel_state_dict(model_state), "balancer": balancer}
            else:
                state = {**self.state_dict(), "balancer": balancer}
            torch.save(state, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
            if _write is not None:
                _write(tmp)
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = root / name
        if final.exists():  # saving the same step again (e.g. a resume that trained nothing)
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(name + "\n", encoding="utf-8")
        _fsync(pointer)
        os.replace(pointer, root / "latest")
        _fsync(root)
        if self.config.keep_checkpoints:
            done = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in done[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if self.dp_group is not None:
            dist.barrier(group=self.dp_group)
        return final

    def _parallel_state_dict(self, model_state: dict[str, Any]) -> dict[str, Any]:
        """state.pt of a parallelized model: the gathered plain `model_state`; the optimizer states live in the
        checkpoint's DCP directory (named here)."""
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
                "tokens_seen": self.tokens_seen, "config": self.config.to_dict(), "model": model_state,
                "optimizer": {"dcp": OPTIMIZER_DIR}, "loader": self.loader.state_dict(), "rng": _rng_state()}

    def resume(self, path: str | Path) -> Path:
        """Restore a checkpoint (a checkpoint directory, or a run directory's latest) into this trainer,
        whose config must describe the same run (only `TrainConfig.RESUMABLE` fields may differ). A parallelized
        model: every rank calls it."""
        ckpt = latest_checkpoint(path)
        try:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        except Exception as err:
            raise TrainError(f"{ckpt}: cannot read state.pt ({err})") from None
        if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
            raise TrainError(f"{ckpt}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
        saved, mine = _plain(state["config"]), _plain(self.config.to_dict())
        differ = [k for k in mine if k not in TrainConfig.RESUMABLE and saved.get(k) != mine[k]]
        if differ:
            raise TrainError(f"{ckpt}: the checkpoint was trained with other settings: "
                             + "; ".join(f"{k} {saved.get(k)!r} (now {mine[k]!r})" for k in differ))
        sharded = isinstance(state["optimizer"], dict) and "dcp" in state["optimizer"]
        if sharded and self.parallel is None:
            raise TrainError(f"{ckpt}: written by a parallel run (sharded optimizer states in "
                             f"{state['optimizer']['dcp']}/); resume it under torchrun with --fsdp / --expert-parallel")
        if self.parallel is not None and not sharded:
            raise TrainError(f"{ckpt}: written by a single process (its optimizer states are not sharded); "
                             "a parallel run resumes only a parallel run's checkpoint")
        try:
            if self.parallel is not None:
                load_full_state_dict(self.model, state["model"])
                self._load_sharded_optimizer(ckpt / state["optimizer"]["dcp"])
            else:
                self.model.load_state_dict(state["model"])
                self.optimizers.load_state_dict(state["optimizer"])
            self.loader.load_state_dict(state["loader"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise TrainError(f"{ckpt}: does not fit this run ({err})") from None
        balancer = state["balancer"]
        if self.rank != 0:  # rank 0 holds the global pending loads (`_balancer_state`)
            balancer = {**balancer, "counts": {k: torch.zeros_like(v) for k, v in balancer["counts"].items()}}
        self.balancer.load_state_dict(balancer)
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        return ckpt

    def _load_sharded_optimizer(self, where: Path) -> None:
        """The optimizers' states from a DCP directory (a collective). A parameter without a saved state (an
        expert no token had reached) gets none, as in the run that saved it (torch's template has one for all)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        try:
            saved = set(dcp.FileSystemReader(where).read_metadata().state_dict_metadata)
        except Exception as err:
            raise TrainError(f"{where}: cannot read the sharded optimizer states ({err})") from None
        optim = self._sharded_optimizer_state()
        absent = {}
        for name, flat in optim.items():
            absent[name] = [k for k in flat if k.startswith("state.") and f"{name}.{k}" not in saved]
            for k in absent[name]:
                del flat[k]
        try:
            dcp.load(optim, checkpoint_id=where, process_group=self.dp_group)
        except dcp.api.CheckpointException as err:  # a BaseException: name what did not fit
            raise TrainError(f"{where}: the sharded optimizer states do not fit this run ({err})") from None
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        params = dict(self.model.named_parameters())
        for name, opt in self._named_optimizers().items():
            set_optimizer_state_dict(self.model, opt, optim[name], options=options)
            stateless = {k[len("state."):].rsplit(".", 1)[0] for k in absent[name]}
            for fqn in stateless & set(params):
                opt.state.pop(params[fqn], None)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> Trainer:
        """A trainer with the checkpoint's own config (plus `overrides` of RESUMABLE fields), resumed."""
        trainer = cls(checkpoint_config(path, **overrides))
        trainer.resume(path)
        return trainer

    # ------------------------------------------------------------------------------------------ export

    def export(self, path: str | Path) -> Path:
        """Write the model as an official checkpoint directory (converted layout) that `dsv4 generate
        --checkpoint` and `dsv4 serve --model` load, with the data's tokenizer.json (when it is not the
        official tokenizer) and the training config beside it. A model trained under fp8+fp4 is exported
        losslessly (`export_quantized` checks it bit for bit); otherwise the float weights are quantised to the
        layout's storage formats as any conversion does (under fp8 the FP8 Linears come out exact, being fixed
        points of the codec, while the routed experts get their first FP4 rounding: V4's FP4 expert QAT is a
        late stage, the fp8+fp4 recipe). The hc/residual ablations are not V4 checkpoints and are refused."""
        if self.config.hc_mode != "mhc":
            raise TrainError(f"export: hc_mode {self.config.hc_mode!r} is a training ablation; the official format "
                             "describes mHC models only")
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise TrainError(f"export: {path} exists and is not empty")
        model = self.model
        if self.parallel is not None:  # gathered (a collective), written by rank 0 from a plain model
            state = full_state_dict(self.model)
            if self.rank == 0:
                model = Transformer(self.args, dtype=torch.float32, hc_mode=self.config.hc_mode)
                model.load_state_dict(state)
        if self.rank == 0:
            if self.config.precision == "fp8+fp4":
                try:
                    export_quantized(model, path, layout="converted")
                except ValueError as err:
                    raise TrainError(f"export: {err}") from None
            else:
                from ..checkpoint.saver import save_model

                save_model(model, path, layout="converted")
            tok = Path(self.config.data) / "tokenizer.json"
            if self.manifest["tokenizer"].get("file") and tok.is_file():
                shutil.copyfile(tok, path / "tokenizer.json")
            (path / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n",
                                                    encoding="utf-8")
        if self.dp_group is not None:
            dist.barrier(group=self.dp_group)  # every rank returns once the export is in place
        return path
