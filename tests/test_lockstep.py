"""The engine on a 2-process tensor/expert-parallel group (gloo): rank 0 drives, rank 1 follows in lockstep,
both see the same updates, and the tokens equal a single-process engine's."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist
from multiprocess import spawn
from serve_stubs import live_server

from dsv4.cli import build_parser
from dsv4.commands.serve import configs
from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.engine.lockstep import LockstepEngine
from dsv4.model import Transformer, init_weights
from dsv4.parallel import shard_model
from dsv4.runtime import build_serve_context
from dsv4.serve.app import create_app

WORLD = 2
TIMEOUT_S = 120
# heads, index heads, experts and vocab split in two
ARGS = preset("tiny").replace(n_heads=4, o_groups=2, index_n_heads=4, n_routed_experts=8, vocab_size=512)


def _model() -> Transformer:
    return init_weights(Transformer(ARGS, dtype=torch.float32), seed=5).eval()


def _requests():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, ARGS.vocab_size, (n,), generator=g).tolist() for n in (17, 6, 25, 9)]
    params = [SamplingParams(temperature=0.0, max_tokens=10), SamplingParams(temperature=0.9, seed=4, max_tokens=12),
              SamplingParams(temperature=0.0, max_tokens=8), SamplingParams(temperature=1.0, max_tokens=9)]
    return list(zip(prompts, params, strict=True))


def _drive(engine) -> dict[int, list[int]]:
    """Add two requests, step, add the rest, abort one mid-way, step to the end; tokens per request id."""
    reqs = _requests()
    out: dict[int, list[int]] = {}
    ids = [engine.add_request(*r) for r in reqs[:2]]
    for step in range(200):
        if step == 2:
            ids += [engine.add_request(*r) for r in reqs[2:]]
        if step == 5:
            engine.abort(ids[2])
        for u in engine.step():
            out.setdefault(u.request_id, []).extend(u.new_token_ids)
        if step > 5 and not engine.has_unfinished():
            break
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = shard_model(_model(), rank, WORLD)
        engine = LockstepEngine(model, max_batch=3, max_seq_len=64, prefill_chunk=8, page_tokens=8, num_pages=14,
                                seed=11)
        if rank == 0:
            tokens = _drive(engine)
            engine.shutdown()
        else:
            tokens = {}
            engine.follow(lambda ups: [tokens.setdefault(u.request_id, []).extend(u.new_token_ids) for u in ups])
        torch.save(tokens, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_lockstep_engine_matches_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_worker, (str(Path(tmp) / "init"), tmp), nprocs=WORLD, timeout_s=TIMEOUT_S)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0] == ranks[1]  # the follower's replica produced exactly the driver's updates
    single = _drive(Engine(_model(), max_batch=3, max_seq_len=64, prefill_chunk=8, page_tokens=8, num_pages=14,
                           seed=11))
    assert ranks[0] == single
    assert len(single.get(2, [])) < 8 and all(len(single[i]) == n for i, n in ((0, 10), (1, 12), (3, 9)))


def test_lockstep_needs_a_seed():
    with pytest.raises(ValueError, match="seed"):
        LockstepEngine(_model(), max_batch=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, port: int) -> None:
    """End torchrun and its workers: SIGTERM lets torchrun stop them (they run in sessions of their own, so
    killing torchrun's process group would orphan them); anything still serving `port` afterwards is killed."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    marker = f"--port\0{port}\0".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_serve_under_torchrun_answers_like_one_process():
    """`torchrun --nproc-per-node 2 -m dsv4 serve`: rank 0 serves, rank 1 follows; a greedy answer equals the
    single-process server's."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun is installed with torch next to the interpreter"
    port = _free_port()
    flags = ["serve", "--model", "tiny", "--port", str(port), "--max-concurrent", "2", "--prefix-cache-mb", "0",
             "--log-level", "warning"]
    body = {"model": "dsv4-tiny", "max_tokens": 6, "temperature": 0, "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": "Hello there"}]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", str(WORLD), "-m", "dsv4", *flags],
                            start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.poll() is not None else "(still running)"
                pytest.fail(f"the torchrun server did not come up: {out[-3000:]}")
            time.sleep(0.5)
        parallel = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).json()
        streamed = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "stream": True},
                              timeout=60).text
    finally:
        _stop(proc, port)
    args = build_parser().parse_args(flags)
    with live_server(create_app(build_serve_context(*configs(args)))) as base:
        single = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
    assert parallel["usage"]["completion_tokens"] == 6
    assert parallel["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]
    assert streamed.rstrip().endswith("data: [DONE]")
