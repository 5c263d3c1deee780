"""The GPU benchmark's model configs (`benchmarks/bench_gpu.py`): its run on a lent GPU has minutes, so a config
the model would refuse must fail here, on the CPU, where its CPU smoke run (tiny shapes) cannot see it."""

import importlib.util
from pathlib import Path

import pytest

from dsv4.config import ModelArgs

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("small", [False, True])
def test_configs_validate(bench_gpu, small):
    configs = bench_gpu.configs(small=small)  # (ModelArgs validates as it is built)
    assert set(configs) == {"small", "small_long", "flash_layer", "train"}
    assert all(isinstance(args, ModelArgs) for args in configs.values())


def test_gpu_configs_are_the_issues(bench_gpu):
    """The sizes the GPU issue's tables name: one V4-Flash CSA layer, and training at dim >= 2048."""
    configs = bench_gpu.configs(small=False)
    flash = configs["flash_layer"]
    assert (flash.dim, flash.n_routed_experts, flash.n_activated_experts, flash.compress_ratios) == (4096, 256, 6, (4,))
    train = configs["train"]
    assert train.dim >= 2048 and train.n_layers == 4
    assert train.compress_ratios[:train.n_layers] == (0, 4, 128, 4)
