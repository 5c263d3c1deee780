"""The host-read counter (`host_reads.py`) the decode-step tests rely on: it sees every kind of read, in and out of
inference mode, counts each once, and leaves alone what reads nothing and what is not dsv4's code."""

from __future__ import annotations

import torch
from host_reads import count_host_reads

import dsv4.kernels.topk


def _as_dsv4_code(source: str) -> dict:
    """Functions compiled as if written in a dsv4 module (the counter counts by the caller's file)."""
    namespace = {"torch": torch}
    exec(compile(source, dsv4.kernels.topk.__file__, "exec"), namespace)  # noqa: S102 - a fixed test source
    return namespace


READS = _as_dsv4_code("""
def reads(v, x):
    bool(v.any())
    x.sum().item()
    int(x.sum())
    v.nonzero()
    v.nonzero(as_tuple=True)
    torch.where(v)
    torch.argwhere(v)
    x[v]
    torch.bincount(v.long())
    x.tolist()
    x.cpu()
    x.numpy()
    return 12

def reads_nothing(v, x):
    torch.where(v, x, 0)
    x + 1
    x[torch.tensor([0])]
    x.repeat_interleave(2)
""")


def test_every_read_counts_once_in_and_out_of_inference_mode():
    for inference in (False, True):
        with torch.inference_mode(inference):
            v, x = torch.tensor([True, False, True]), torch.arange(3.0)
            with count_host_reads() as reads:
                expected = READS["reads"](v, x)
            assert sum(reads.values()) == expected, (inference, reads)
            assert all("@ kernels/topk.py:" in site for site in reads)
            with count_host_reads() as reads:
                READS["reads_nothing"](v, x)
            assert not reads, (inference, reads)


def test_reads_outside_dsv4_are_not_counted():
    with count_host_reads() as reads:
        bool(torch.tensor([True]).any())
        torch.arange(3).tolist()
    assert not reads
    assert torch.Tensor.tolist is not None and "copy_out" not in torch.Tensor.tolist.__name__  # methods restored
