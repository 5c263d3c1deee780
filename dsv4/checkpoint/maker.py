"""Write random checkpoints in the exact official format, for any config: tests use them instead of downloads.

Every tensor of `expected_tensors(args, layout)` is generated on its own (seeded by the checkpoint
seed and the tensor's name, so the result does not depend on sharding) with values of a trained
model's order of magnitude, quantised with the official formats (FP8 e4m3 + 128x128 ue8m0 scales,
FP4 e2m1 packed two per byte + 1x32 ue8m0 scales; I8 in the download layout, float4_e2m1fn_x2 - "F4" -
in the converted one, as the official convert.py writes it), and streamed into shards of bounded size, so
even a Flash-sized config needs only one shard's worth of memory. The directory gets `config.json`
(HF dialect), `model.safetensors.index.json` and `model-0000k-of-0000n.safetensors`, like the release.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelArgs
from ..quant import quantize_fp4_weight, quantize_fp8_weight
from .reader import INDEX_FILE
from .schema import DTYPES, TensorSpec, expected_tensors
from .validate import FLOAT_KEY, LAYOUT_KEY


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _randn(shape: tuple[int, ...], gen: torch.Generator, std: float, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std + mean


def _mhc_base(spec: TensorSpec, args: ModelArgs, gen: torch.Generator) -> torch.Tensor:
    """Near-static mHC start (as `init_weights`): soft one-hot read-out, identity-dominated comb."""
    hc = args.hc_mult
    base = _randn(spec.shape, gen, 0.1)
    if spec.shape[0] == (2 + hc) * hc:
        base[int(torch.randint(hc, (1,), generator=gen))] += 2.0
        base[2 * hc:] += (4.0 * torch.eye(hc)).flatten()
    return base


def _float_values(spec: TensorSpec, args: ModelArgs, gen: torch.Generator) -> torch.Tensor:
    """fp32 values for a tensor of `spec` (before any storage format)."""
    name, shape = spec.name, spec.shape
    if name.endswith("_fn"):
        return _randn(shape, gen, 0.02)
    if name.endswith("_base"):
        return _mhc_base(spec, args, gen)
    if name.endswith(("hc_attn_scale", "hc_ffn_scale", "hc_head_scale")):
        return _randn(shape, gen, 0.002, 0.01)
    if name.endswith("attn_sink"):
        return _randn(shape, gen, 0.5)
    if name.endswith(".ape"):
        return _randn(shape, gen, 0.1)
    if name.endswith("norm.weight"):
        return _randn(shape, gen, 0.05, 1.0)
    if name.endswith("gate.bias"):
        return _randn(shape, gen, 0.01)
    if name == "embed.weight":
        return _randn(shape, gen, 1.0)
    if len(shape) == 2:  # a linear weight [out, in] (head, gate, projections, experts)
        return _randn(shape, gen, 1.0 / math.sqrt(shape[1]))
    raise AssertionError(f"no value rule for {name}")


def _tid2eid(args: ModelArgs, gen: torch.Generator) -> torch.Tensor:
    """Each token id routed to k distinct experts."""
    ranks = torch.rand(args.vocab_size, args.n_routed_experts, generator=gen).argsort(dim=-1)
    return ranks[:, : args.n_activated_experts].contiguous()


def random_tensors(args: ModelArgs, layout: str = "hf", seed: int = 0,
                   float_dtype: str = "BF16") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the layout, in schema order, generated one weight at a time."""
    specs = expected_tensors(args, layout, float_dtype)
    for name, spec in specs.items():
        if name.endswith(".scale") and spec.fmt in ("fp8", "fp4"):
            continue  # produced together with its weight
        gen = _generator(seed, name)
        if name.endswith("tid2eid"):
            yield name, _tid2eid(args, gen)
            continue
        values = _float_values(spec if spec.fmt == "plain" else _unpacked(spec), args, gen)
        if spec.fmt == "fp8":
            q, scale = quantize_fp8_weight(values)
            yield name, q
            yield name.removesuffix(".weight") + ".scale", scale
        elif spec.fmt == "fp4":
            q, scale = quantize_fp4_weight(values)
            yield name, q.view(DTYPES[spec.dtype])  # int8 (hf) or float4_e2m1fn_x2 (converted): the same bytes
            yield name.removesuffix(".weight") + ".scale", scale
        else:
            yield name, values.to(DTYPES[spec.dtype])


def _unpacked(spec: TensorSpec) -> TensorSpec:
    """The logical [out, in] spec of a quantised weight (packed FP4 is stored I8 [out, in/2]; F4 and FP8
    headers already hold [out, in])."""
    if spec.fmt != "fp4" or spec.dtype == "F4":
        return spec
    out_f, half = spec.shape
    return TensorSpec(spec.name, (out_f, 2 * half), "F32", spec.component, spec.block)


def _shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its `__metadata__` keys sorted, in place. safetensors writes them in
    hash-map order, which differs from run to run; sorted, the same tensors give the same bytes (reproducible
    builds). Only the key order changes, so the header keeps its length and every offset stays valid."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        ordered = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"))
        encoded = ordered.encode("utf-8")
        if len(encoded) > size:  # never: the same keys and values
            raise AssertionError("re-serialised safetensors header is longer than the original")
        f.seek(8)
        f.write(encoded + b" " * (size - len(encoded)))


def write_checkpoint(path: str | Path, args: ModelArgs, tensors: Iterator[tuple[str, torch.Tensor]], *,
                     layout: str = "hf", float_dtype: str = "BF16", shards: int | None = None,
                     max_shard_bytes: int = 4 << 30, extra_metadata: dict[str, str] | None = None) -> Path:
    """Stream (name, tensor) pairs into `path` as config.json + index + shards.

    With `shards` the total size is split into that many shards (the total is known from the
    schema); otherwise a shard is closed once it reaches `max_shard_bytes`."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    specs = expected_tensors(args, layout, float_dtype)
    total = sum(s.nbytes for s in specs.values())
    if shards is not None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        max_shard_bytes = -(-total // shards)
    metadata = {"format": "pt", **({LAYOUT_KEY: layout, FLOAT_KEY: float_dtype} if layout != "hf" else {}),
                **(extra_metadata or {})}
    # write with temporary names, rename once the shard count is known
    pending: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        nonlocal pending
        if pending:
            tmp = root / f".partial-{len(written):05d}.safetensors"
            save_file(pending, str(tmp), metadata=metadata)
            _sort_metadata(tmp)
            written.append((tmp, list(pending)))
        pending = {}

    done_bytes = 0
    for name, tensor in tensors:
        pending[name] = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        done_bytes += nbytes
        if done_bytes >= (len(written) + 1) * max_shard_bytes:  # shard boundaries at multiples of the size
            flush()
    flush()
    weight_map = {}
    for k, (tmp, names) in enumerate(written, start=1):
        final = _shard_name(k, len(written))
        tmp.rename(root / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2) + "\n")
    return root


def make_random_checkpoint(path: str | Path, args: ModelArgs, *, seed: int = 0, shards: int | None = 3,
                           max_shard_bytes: int = 4 << 30, layout: str = "hf") -> Path:
    """A random checkpoint for `args` in the official layout (`hf` = the download, `converted` = wo_a bf16 and
    FP4 experts as F4, as the official convert.py writes them)."""
    return write_checkpoint(path, args, random_tensors(args, layout, seed), layout=layout, shards=shards,
                            max_shard_bytes=max_shard_bytes)
