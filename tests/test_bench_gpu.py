"""The GPU benchmark's model configs (`benchmarks/bench_gpu.py`): its run on a lent GPU has minutes, so a config
the model would refuse must fail here, on the CPU, where its CPU smoke run (tiny shapes) cannot see it."""

import importlib.metadata
import importlib.util
import re
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


def test_the_gpu_run_carries_every_dependency_the_gpu_machine_lacks():
    """Each of dsv4's runtime dependencies is one the GPU machine has (what `../shared/device.md` says it has) or a
    wheel `gpu_run.sh --fetch` downloads for it: llguidance was neither, and 4 of the run's 9 sections failed on it
    in a rehearsal with only that machine's packages."""
    root = _PATH.parents[1]
    device_md = root.parent / "shared" / "device.md"
    has = device_md.read_text().split("\n\n")[1]  # the paragraph of what the machine has
    assert "torch 2.11" in has and "numpy" in has, has
    wheels = re.search(r"WHEELS=\((.*?)\)", (root / "benchmarks" / "gpu_run.sh").read_text(), re.S).group(1)

    def name(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")

    carried = {name(w) for w in wheels.split()}
    present = {name(w) for w in re.findall(r"[A-Za-z][A-Za-z0-9_.-]*", has)}
    needed = [name(r) for r in importlib.metadata.requires("dsv4") if "extra ==" not in r]
    assert {"llguidance", "fastapi", "transformers"} <= carried
    assert not [n for n in needed if n not in carried | present], (carried, present)
