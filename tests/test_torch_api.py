"""The code names only torch API that torch 2.11 has (the GPU machine's; CI runs 2.13): `torch_api.py` reads
the chains and holds them against its record of 2.11's modules."""

from __future__ import annotations

import json

from torch_api import RECORD, chains, missing


def test_the_code_names_only_what_torch_2_11_has():
    held = json.loads(RECORD.read_text())
    assert held["torch"].startswith("2.11."), held["torch"]
    named = list(chains())
    assert len(named) > 500 and any(name == "torch.nn.functional.scaled_mm" for name, _ in named)
    lacking = sorted({f"{where}: {name} (torch {held['torch']} lacks {why})" for name, where in named
                      if (why := missing(name, held["modules"])) is not None})
    assert not lacking, "\n".join(lacking) + "\n(a newer name: reach it with getattr and fall back to the old one)"


def test_the_check_finds_names_through_aliases_and_from_imports(tmp_path):
    (tmp_path / "dsv4").mkdir()
    (tmp_path / "dsv4" / "uses.py").write_text(
        "import torch\n"
        "import torch.distributed as dist\n"
        "from torch.nn.functional import scaled_mm, no_such_function\n"
        "dist.all_gather_single(out, x)\n"  # 2.13's name
        "dist.all_gather_into_tensor(out, x)\n"
        "torch.cuda.CUDAGraph().replay()\n"  # a class's members are not checked
        "getattr(dist, 'all_gather_single', None)\n"  # asked for, not named
        "torch.nn.not_a_module.thing\n"
    )
    for folder in ("benchmarks", "tests"):
        (tmp_path / folder).mkdir()
    held = json.loads(RECORD.read_text())["modules"]
    found = {name: missing(name, held) for name, _ in chains(tmp_path)}
    assert {name for name, why in found.items() if why} == {
        "torch.distributed.all_gather_single", "torch.nn.functional.no_such_function", "torch.nn.not_a_module.thing"}
    assert {"torch.distributed.all_gather_into_tensor", "torch.cuda.CUDAGraph", "torch.nn.functional.scaled_mm",
            "torch.distributed", "torch"} <= set(found)
