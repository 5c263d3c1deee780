"""The expert-parallel seam (dsv4.parallel.experts), in one process: the model's own MoE with a strategy installed
from outside (no class swap), the ranks' routed sums partitioning the single-process one. The multi-process runs are
in test_parallel.py (inference) and test_train_distributed.py (training); the import rules in test_structure.py."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv4.config import preset
from dsv4.model import Transformer, init_weights
from dsv4.model.moe import MoE
from dsv4.parallel import AllReduceExperts, install_expert_parallel, shard_model

WORLD = 2
ARGS = preset("tiny").replace(vocab_size=64, n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0),
                              n_routed_experts=4, n_activated_experts=2)


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
