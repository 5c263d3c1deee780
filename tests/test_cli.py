import subprocess
import sys

import torch

from dsv4.cli import main
from dsv4.config import preset
from dsv4.generate import generate
from dsv4.model import Transformer, init_weights


def test_generate_command_runs_and_reports_speed(capsys):
    assert main(["generate", "--preset", "tiny", "--prompt-len", "12", "--max-new-tokens", "5", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "decode:" in out and "tok/s" in out
    rows = [line for line in out.splitlines() if line.startswith("[")]
    assert len(rows) == 2 and all(len(r.split("] ")[1].split(",")) == 5 for r in rows)


def test_generate_command_rejects_bad_input(capsys):
    assert main(["generate", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny", "--prompt", "1,2,999999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "--preset", "tiny", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "dsv4", "generate", "--max-new-tokens", "0"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr


@torch.no_grad()
def test_greedy_generation_matches_full_recompute():
    model = init_weights(Transformer(preset("tiny")), seed=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]
    result = generate(model, prompts, max_new_tokens=12)
    for prompt, new in zip(prompts, result.tokens, strict=True):
        seq = list(prompt)
        for _ in range(12):  # no cache: recompute the whole sequence every step
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(prompt):] == new


def test_generate_from_a_checkpoint(tmp_path, capsys):
    from dsv4.checkpoint import load_model, make_random_checkpoint

    root = make_random_checkpoint(tmp_path / "ck", preset("tiny"), seed=2, shards=2)
    assert main(["generate", "--checkpoint", str(root), "--prompt", "5,6,7,8", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {root}" in out and "exact numerics" in out
    printed = [int(t) for t in next(line for line in out.splitlines() if line.startswith("[0]")).split()[1].split(",")]
    assert printed == generate(load_model(root), [[5, 6, 7, 8]], max_new_tokens=4).tokens[0]
    assert main(["generate", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    (root / "config.json").write_text("{}")
    assert main(["generate", "--checkpoint", str(root)]) == 2
    assert "invalid config" in capsys.readouterr().err


def test_a_rank_that_ended_its_process_group_exits_without_the_interpreters_teardown(monkeypatch):
    """`python -m dsv4` / the console script: the command's exit code either way; after `close_distributed` ended a
    process group (a torchrun rank) through os._exit, past the teardown where gloo's worker threads can abort the
    process, with the output flushed first."""
    import pytest

    from dsv4 import cli
    from dsv4.parallel import distributed

    class Left(Exception):
        pass

    exits, flushed = [], []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(distributed.os, "_exit", lambda code: exits.append(code) or (_ for _ in ()).throw(Left()))
    monkeypatch.setattr(distributed.sys.stdout, "flush", lambda: flushed.append("out"))
    with pytest.raises(SystemExit) as ended:
        cli.console()
    assert ended.value.code == 3 and exits == []
    monkeypatch.setattr(distributed, "_ended_group", True)
    with pytest.raises(Left):
        cli.console()
    assert exits == [3] and "out" in flushed
