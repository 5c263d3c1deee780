"""The runtime: typed settings and the builders of model, engine and chat service that every front end shares.

`dsv4 serve`, `dsv4 chat`, the demo evaluation, the benchmarks and the tests describe what they want with three
frozen configs and get the same objects back, so a new engine option is one field here and one flag in
`dsv4.commands.runtime_flags`, not an edit of each front end:

    source = ModelSource(model="demo")                       # "demo", a preset (random weights) or a checkpoint
    engine = EngineConfig(max_batch=8, kv_format="fp8")      # the `Engine` options, with `dsv4 serve`'s defaults
    server = ServerConfig(api_keys=("k",))                   # what the chat service and the HTTP app add
    ctx = build_serve_context(source, engine, server)        # -> create_app(ctx)

Step by step: `load(source)` -> `LoadedModel` (model, tokenizer, served names, the sampling its
generation_config.json recommends), `build_engine(loaded, engine)` -> `Engine` (a `LockstepEngine` when `env`
holds several ranks), `build_service` -> `ChatService`, `build_serve_context` -> `ServeContext`.

"auto" settings: the fp8 KV format stores the rows the exact numerics already rounded to FP8, so it is lossless
only for a bfloat16 model in exact numerics; `dtype="auto"` is float32 except bfloat16 under fp8, and
`numerics="auto"` is exact for a checkpoint, plain for a preset's random float weights, exact under fp8.
A setting the runtime cannot use raises `OptionError` (a ValueError) naming its fields before anything loads
where it can; the CLI shows the fields as its flags.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import kernels
from .chat.tokenizer import Tokenizer
from .checkpoint.loader import load_model
from .config import PRESETS, preset
from .demo import MODEL_DIR, MODEL_NAME
from .engine import AsyncEngine, Engine
from .engine.lockstep import LockstepEngine
from .formats import to_official_formats
from .kv_formats import format_names
from .model import Transformer, init_weights
from .parallel import DistEnv, check_shardable, shard_model
from .serve.context import ServeConfig, ServeContext
from .serve.prices import PriceTable
from .serve.service import ChatService

__all__ = ["DEMO", "DTYPES", "NUMERICS", "EngineConfig", "LoadedModel", "ModelSource", "OptionError", "ServerConfig",
           "build_engine", "build_serve_context", "build_service", "checkpoint_model", "load", "preset_model",
           "recommended_sampling"]

DEMO = "demo"  # `ModelSource.model` naming the demo model shipped in the package (dsv4.demo.MODEL_DIR)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
NUMERICS = ("exact", "plain")


class OptionError(ValueError):
    """A setting the runtime cannot use. `options` are the config fields at fault (the CLI names their flags);
    `message` says what is wrong without naming them."""

    def __init__(self, options: str | Sequence[str], message: str) -> None:
        self.options = (options,) if isinstance(options, str) else tuple(options)
        self.message = message
        super().__init__(f"{', '.join(self.options)}: {message}")


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise OptionError(option, f"{value!r} is not one of {', '.join(choices)}")


def _check_at_least(option: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise OptionError(option, f"must be >= {low}, got {value}")


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ModelSource:
    """What to load. `model`: "demo", a preset name (random weights from `seed`, the vocabulary resized to the
    official tokenizer's so any text encodes) or a checkpoint directory (its tokenizer.json, else the official
    one). `numerics`: "exact", "plain" or "auto"; `dtype`: "bfloat16", "float32" or "auto" (module docstring).
    `device`: where the weights go (under several ranks, each rank's `DistEnv.device`). `served_names`: the
    names clients use (empty: dsv4-PRESET, dsv4-demo, or the checkpoint directory's name)."""

    model: str = DEMO
    numerics: str = "auto"
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    served_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("numerics", self.numerics, ("auto", *NUMERICS))
        _check_choice("dtype", self.dtype, ("auto", *DTYPES))
        object.__setattr__(self, "served_names", tuple(self.served_names))

    def for_engine(self, engine: EngineConfig) -> ModelSource:
        """This source settled for `engine`'s KV format: fp8 takes a bfloat16 model in exact numerics (an explicit
        float32 or plain is an OptionError naming both settings); other formats leave "auto" to `load`."""
        if engine.kv_format != "fp8":
            return self
        why = "the fp8 KV format is lossless only for a bfloat16 model in exact numerics"
        if self.dtype == "float32":
            raise OptionError(("dtype", "kv_format"), f"float32 with fp8: {why} (the default dtype, auto, is "
                                                      "bfloat16 under fp8)")
        if self.numerics == "plain":
            raise OptionError(("numerics", "kv_format"), f"plain with fp8: {why} (the default numerics, auto, are "
                                                         "exact under fp8)")
        return dataclasses.replace(self, dtype="bfloat16", numerics="exact")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: the `Engine` keyword options, with `dsv4 serve`'s defaults. `max_batch`: sequences
    decoded together (the server's concurrent requests); `max_seq_len`: prompt + output tokens of a request
    (None or more than the model's: the model's `max_seq_len`); `prefill_chunk`: tokens per step; `kv_format`:
    "model", "bf16" or "fp8" (the registry `dsv4.kv_formats`); `kv_budget_bytes`: the KV cache's size (None: room for
    every sequence at `max_seq_len`); `page_tokens`: tokens per KV page (None: the engine's default, 128 for
    V4); `prefix_cache_bytes` (0: off; the saved states' own bytes, pages being shared with the KV pool) and
    `prefix_interval`: the prefix cache, saving long prompts every 128 tokens by default, so requests that share
    a system prompt or tool definitions but differ after them resume from the shared part (the demo's
    evaluation against its own server, 1,000 requests: 201 s with 512 MB; 64 MB evicts the shared prefixes);
    `num_speculative`: MTP draft tokens per step (0: off); `seed`: the sampler's shared generator (every rank's
    must be equal); `kernel_backend`: the `dsv4.kernels` backend the engine runs the model on (None:
    $DSV4_KERNEL_BACKEND, else "auto", the device's); `decode_graphs`: decode steps as CUDA graphs
    (`dsv4.engine.graphs`; one process, no speculation)."""

    max_batch: int = 8
    max_seq_len: int | None = None
    prefill_chunk: int = 256
    kv_format: str = "model"
    kv_budget_bytes: int | None = None
    page_tokens: int | None = None
    prefix_cache_bytes: int = 512 * 2**20
    prefix_interval: int | None = 128
    num_speculative: int = 0
    seed: int | None = 0
    kernel_backend: str | None = None
    decode_graphs: bool = False

    def __post_init__(self) -> None:
        _check_choice("kv_format", self.kv_format, format_names())
        if self.decode_graphs and self.num_speculative:
            raise OptionError(("decode_graphs", "num_speculative"), "decode graphs capture plain decode steps; with "
                              "speculation every decode step is a speculative one")
        if self.kernel_backend is not None:
            _check_choice("kernel_backend", self.kernel_backend, kernels.backend_names())
        for option, low in (("max_batch", 1), ("max_seq_len", 2), ("prefill_chunk", 1), ("kv_budget_bytes", 1),
                            ("page_tokens", 1), ("prefix_cache_bytes", 0), ("prefix_interval", 1),
                            ("num_speculative", 0)):
            _check_at_least(option, getattr(self, option), low)


@dataclass(frozen=True)
class ServerConfig:
    """What the chat service and the HTTP app add over the engine. `max_output_tokens`: the default and cap of a
    request's max_tokens (at most the context less one); `strict_reasoning`: refuse a thinking-mode tool-call turn
    sent back without its reasoning_content; `price_file`: a JSON price table over the launch prices;
    `api_keys`: accepted keys (none: no authentication); `max_queue`: requests waiting beyond the running ones;
    `max_body_bytes`: the largest request body (a bigger one is a 413); `signature_key`: the secret of Anthropic
    thinking-block signatures (None: a random key per process, so blocks signed before a restart no longer
    verify; servers behind one load balancer need the same key).

    32 MiB of body: Anthropic's own limit for Messages requests, and room for a full 1M-token V4 context (4-5 MB of
    English; ~9 MB of CJK text with every character \\u-escaped) three times over, while bounding what one request
    makes the server buffer and parse."""

    max_output_tokens: int = 4096
    strict_reasoning: bool = False
    price_file: str | None = None
    api_keys: tuple[str, ...] = ()
    max_queue: int = 64
    max_body_bytes: int = ServeConfig.max_body_bytes
    signature_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_at_least("max_output_tokens", self.max_output_tokens, 1)
        _check_at_least("max_queue", self.max_queue, 0)
        _check_at_least("max_body_bytes", self.max_body_bytes, 1)
        if self.signature_key is not None and not self.signature_key:
            raise OptionError("signature_key", "must not be empty")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for an engine: the model (eval mode), its tokenizer, the name it is served under by
    default, the sampling its generation_config.json recommends for thinking modes (None: V4's T = 1,
    top_p = 1), and the source with its "auto" settings settled."""

    model: Transformer
    tokenizer: Tokenizer
    name: str
    thinking_sampling: dict[str, float] | None
    source: ModelSource

    @property
    def served_names(self) -> list[str]:
        return list(self.source.served_names) or [self.name]


# ---------------------------------------------------------------------------------------------- models
def _parallel(env: DistEnv | None) -> bool:
    return env is not None and env.world_size > 1


def preset_model(name: str, *, numerics: str = "plain", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0, vocab_size: int | None = None,
                 env: DistEnv | None = None) -> Transformer:
    """A preset with random weights from `seed` (the same on every rank), sharded over `env`'s ranks, then put
    in the official formats for exact numerics (quantising each shard: the same as quantising first whenever the
    split keeps whole FP8 tiles, and possible for any split)."""
    args = preset(name) if vocab_size is None else preset(name).replace(vocab_size=vocab_size)
    if _parallel(env):
        check_shardable(args, env.world_size)  # before the full weights are allocated
    with torch.device(device):
        model = init_weights(Transformer(args, dtype=dtype, numerics=numerics), seed=seed)
    if _parallel(env):
        model = shard_model(model, env.rank, env.world_size)
    if numerics == "exact":
        to_official_formats(model)
    return model.eval()


def checkpoint_model(path: str | Path, *, numerics: str = "exact", dtype: torch.dtype = torch.bfloat16,
                     device: str | torch.device = "cpu", env: DistEnv | None = None) -> Transformer:
    """A checkpoint (HF release, converted, per-rank or plain export) loaded whole, or only `env`'s rank's shard."""
    if not _parallel(env):
        return load_model(path, numerics=numerics, dtype=dtype, device=device)
    return load_model(path, numerics=numerics, dtype=dtype, device=device, rank=env.rank, world_size=env.world_size,
                      shard=lambda m: shard_model(m, env.rank, env.world_size))


def recommended_sampling(model_dir: Path) -> dict[str, float] | None:
    """The sampling a model directory's generation_config.json recommends (what thinking modes use): greedy when
    it says `do_sample: false`, else its temperature and top_p; None without the file (V4's T = 1, top_p = 1)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise OptionError("model", f"{path}: cannot read it ({err})") from None
    if config.get("do_sample") is False:
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(config.get("temperature", 1.0)), "top_p": float(config.get("top_p", 1.0))}


def _model_dir(name: str) -> Path:
    if name == DEMO:
        if not (MODEL_DIR / "config.json").is_file():
            raise OptionError("model", f"the demo model is missing from the package ({MODEL_DIR}); build it with "
                                       "`dsv4 train --recipe demo --export dsv4/demo/model` or name another model")
        return MODEL_DIR
    path = Path(name)
    if not path.exists():
        raise OptionError("model", f"{name!r} is not a preset ({', '.join(PRESETS)}) nor a directory")
    return path


def load(source: ModelSource, env: DistEnv | None = None) -> LoadedModel:
    """Build or load the model `source` names, with its tokenizer and serving defaults. Under `env` of several
    ranks each rank holds its shard, on `env.device`. "auto" settings not settled by `ModelSource.for_engine`
    take their defaults: float32, and exact numerics for a checkpoint, plain for a preset."""
    dtype_name = "float32" if source.dtype == "auto" else source.dtype
    dtype = DTYPES[dtype_name]
    device = env.device if _parallel(env) else source.device
    if source.model in PRESETS:
        numerics = "plain" if source.numerics == "auto" else source.numerics
        tokenizer = Tokenizer.bundled()
        model = preset_model(source.model, numerics=numerics, dtype=dtype, device=device, seed=source.seed,
                             vocab_size=tokenizer.vocab_size, env=env)
        name, sampling = f"dsv4-{source.model}", None
    else:
        numerics = "exact" if source.numerics == "auto" else source.numerics
        path = _model_dir(source.model)
        root = path if path.is_dir() else path.parent
        sampling = recommended_sampling(root)
        model = checkpoint_model(path, numerics=numerics, dtype=dtype, device=device, env=env)
        tokenizer = Tokenizer.load(root) if (root / "tokenizer.json").exists() else Tokenizer.bundled()
        name = MODEL_NAME if root.resolve() == MODEL_DIR else root.name
    settled = dataclasses.replace(source, numerics=numerics, dtype=dtype_name)
    return LoadedModel(model, tokenizer, name, sampling, settled)


# ---------------------------------------------------------------------------------------------- engine and service
def build_engine(loaded: LoadedModel, config: EngineConfig = EngineConfig(), env: DistEnv | None = None) -> Engine:
    """The engine over `loaded.model` (EOS from its tokenizer); a `LockstepEngine` when `env` holds several ranks
    (rank 0 drives it, the others `follow()`). The options that depend on the model are checked here by name; the
    rest of the engine's own checks (a KV budget too small for the slots, ...) raise its ValueError."""
    model = loaded.model
    ratios = sorted({r for r in model.args.compress_ratios if r})
    if config.page_tokens is not None and any(config.page_tokens % r for r in ratios):
        raise OptionError("page_tokens", f"{config.page_tokens} is not a multiple of every compression ratio of "
                                         f"the model ({', '.join(map(str, ratios))})")
    if config.num_speculative and not model.args.n_mtp_layers:
        raise OptionError("num_speculative", "the model has no MTP block to draft with")
    if config.decode_graphs and _parallel(env):
        raise OptionError("decode_graphs", "not across several processes (their collectives are not captured)")
    max_seq_len = min(config.max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
    return (LockstepEngine if _parallel(env) else Engine)(
        model, max_batch=config.max_batch, max_seq_len=max_seq_len, prefill_chunk=config.prefill_chunk,
        eos_id=loaded.tokenizer.eos_id, seed=config.seed, kv_format=config.kv_format,
        kv_budget_bytes=config.kv_budget_bytes, page_tokens=config.page_tokens,
        prefix_cache_bytes=config.prefix_cache_bytes, prefix_interval=config.prefix_interval,
        num_speculative=config.num_speculative, kernel_backend=config.kernel_backend,
        decode_graphs=config.decode_graphs)


def build_service(source: ModelSource = ModelSource(), engine: EngineConfig = EngineConfig(),
                  server: ServerConfig = ServerConfig(), env: DistEnv | None = None) -> ChatService:
    """The `ChatService` over a fresh engine for `source` (the whole request path of `dsv4 serve` and `dsv4 chat`
    but HTTP). Settings are checked before the model loads where they can be."""
    prices = PriceTable.load(server.price_file) if server.price_file else PriceTable()
    loaded = load(source.for_engine(engine), env)
    core = build_engine(loaded, engine, env)
    service = ChatService(AsyncEngine(core), loaded.tokenizer, loaded.served_names, prices=prices,
                          max_context=core.max_seq_len, max_output_tokens=min(server.max_output_tokens,
                                                                              core.max_seq_len - 1),
                          strict_reasoning=server.strict_reasoning, thinking_sampling=loaded.thinking_sampling)
    if isinstance(core, LockstepEngine):  # follower ranks rebuild each request's grammar from its spec
        core.grammar_factory = service.grammars
    return service


def build_serve_context(source: ModelSource = ModelSource(), engine: EngineConfig = EngineConfig(),
                        server: ServerConfig = ServerConfig(), env: DistEnv | None = None) -> ServeContext:
    """What `create_app` serves: `build_service`'s service and the app's `ServeConfig` (served names, keys,
    `engine.max_batch` requests running at once, the context and output cap the service settled, the body limit,
    the signature key or ServeConfig's random one)."""
    service = build_service(source, engine, server, env)
    signing = {} if server.signature_key is None else {"signature_key": server.signature_key.encode("utf-8")}
    config = ServeConfig(served_model_names=list(service.model_names), api_keys=list(server.api_keys),
                         max_concurrent=engine.max_batch, max_queue=server.max_queue,
                         max_context=service.max_context, max_output_tokens=service.max_output_tokens,
                         prices=service.prices, max_body_bytes=server.max_body_bytes,
                         reasoning_modes=trained_modes(source), **signing)
    return ServeContext(service, config)


def trained_modes(source: ModelSource) -> tuple[str, ...]:
    """The reasoning modes a model was trained for: the demo never saw the think-max preamble (its README), the
    releases and everything else are taken to know all three."""
    from .demo import MODEL_DIR

    model = source.model
    if model == DEMO or (Path(model).is_dir() and Path(model).resolve() == MODEL_DIR.resolve()):
        return ("non-think", "think-high")
    return ("non-think", "think-high", "think-max")
