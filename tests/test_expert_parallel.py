"""The expert-parallel seam (dsv4.parallel.experts), in one process: the model's own MoE with a strategy installed
from outside (no class swap), the ranks' routed sums partitioning the single-process one; and the import rules of
the model and parallel packages. The multi-process runs are in test_parallel.py (inference) and
test_train_distributed.py (training)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.config import preset
from dsv4.model import Transformer, init_weights
from dsv4.model.moe import MoE
from dsv4.parallel import AllReduceExperts, install_expert_parallel, shard_model

WORLD = 2
ARGS = preset("tiny").replace(vocab_size=64, n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0),
                              n_routed_experts=4, n_activated_experts=2)
PACKAGE = Path(dsv4.__file__).parent


@torch.no_grad()
def test_ranks_partition_the_routed_sum():
    """Each rank's MoE (the same class, its experts only) computes exactly the single-process routed sum of its own
    experts; the ranks' sums add up to the whole routed output, the shared expert added once by each."""
    model = init_weights(Transformer(ARGS, dtype=torch.float32), seed=5)
    full = model.layers[1].ffn  # learned routing
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, ARGS.dim, generator=g)
    tokens = torch.randint(0, ARGS.vocab_size, (3, 5), generator=g)
    weights, ids, _ = full.gate(x.reshape(-1, ARGS.dim), tokens.reshape(-1))
    routed = full.run_experts(x.reshape(-1, ARGS.dim), weights, ids, range(ARGS.n_routed_experts))
    shared = full.shared_experts(x.reshape(-1, ARGS.dim))
    partials = []
    for rank in range(WORLD):
        moe = copy.deepcopy(full)
        strategy = AllReduceExperts(rank, WORLD, ARGS.n_routed_experts, reduce=lambda y: partials.append(y) or y)
        assert install_expert_parallel(moe, strategy) == [moe]
        assert type(moe) is MoE and moe.expert_parallel is strategy
        mine = range(rank * 2, rank * 2 + 2)
        assert [e for e, expert in enumerate(moe.experts) if expert is not None] == list(mine)
        assert set(moe.state_dict()) < set(full.state_dict())  # official names, the others' experts absent
        out = moe(x, tokens)
        alone = full.run_experts(x.reshape(-1, ARGS.dim), weights, ids, mine)
        assert torch.equal(partials[-1], alone)
        assert torch.equal(out, (alone + shared).reshape(x.shape))
    torch.testing.assert_close(partials[0] + partials[1], routed, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="MoE of 4 experts"):
        install_expert_parallel(copy.deepcopy(full), AllReduceExperts(0, WORLD, 8, reduce=lambda y: y))


def test_shard_model_installs_one_strategy_on_every_moe():
    model = shard_model(Transformer(ARGS), 1, WORLD)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == ARGS.n_layers + ARGS.n_mtp_layers
    assert {type(m) for m in moes} == {MoE}
    assert len({id(m.expert_parallel) for m in moes}) == 1
    assert "experts 2..3 of 4 here" in repr(model.layers[0].ffn)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in `path`, relative ones resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            out.append((module, [alias.name for alias in node.names]))
    return out


@pytest.mark.parametrize("package, allowed", [
    ("model", ("dsv4.model", "dsv4.config", "dsv4.kernels", "dsv4.quant")),
    ("parallel", ("dsv4.parallel", "dsv4.model", "dsv4.config", "dsv4.kernels")),
])
def test_package_imports_only_what_it_stands_on(package, allowed):
    """No upward imports: the model knows nothing of parallelism or training, parallelism nothing of training,
    engine or server. Neither swaps classes."""
    for path in sorted((PACKAGE / package).glob("*.py")):
        for module, names in _imports(path):
            if module == "dsv4":
                assert set(names) <= {"kernels", "quant"}, (path.name, names)
            elif module.startswith("dsv4."):
                assert module.startswith(allowed), (path.name, module)
        assert "__class__ =" not in path.read_text(), path.name


def test_parallel_takes_no_private_names_from_other_modules():
    for path in sorted((PACKAGE / "parallel").glob("*.py")):
        for module, names in _imports(path):
            if module.startswith("dsv4"):
                assert not [n for n in names if n.startswith("_")], (path.name, module, names)
