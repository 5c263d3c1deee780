"""`dsv4 inspect`: the release's counts for presets; a checkpoint described from headers only."""

from __future__ import annotations

import pytest

from dsv4.checkpoint.maker import make_random_checkpoint
from dsv4.checkpoint.reader import Checkpoint
from dsv4.cli import main
from dsv4.config import preset


@pytest.mark.parametrize("name, total, main_params, active, mtp, tensors", [
    ("flash", "290,942,289,362", "284,332,240,471", "13,799,632,471", "6,610,048,891", "69,187"),
    ("pro", "1,598,837,347,742", "1,572,997,201,763", "49,779,081,059", "25,840,145,979", "145,116"),
])
def test_inspect_presets_print_the_released_counts(capsys, name, total, main_params, active, mtp, tensors):
    assert main(["inspect", name]) == 0
    out = capsys.readouterr().out
    main_row = next(line for line in out.splitlines() if "= main model" in line)
    assert main_params in main_row and active in main_row
    assert mtp in next(line for line in out.splitlines() if "= MTP block" in line)
    total_row = next(line for line in out.splitlines() if "= total" in line)
    assert total in total_row and tensors in total_row
    assert f"{tensors} tensors" in out


def test_inspect_checkpoint_reads_headers_only(tmp_path, capsys, monkeypatch):
    root = make_random_checkpoint(tmp_path / "ck", preset("tiny"), shards=2)

    def no_data(*_args, **_kwargs):
        raise AssertionError("inspect must not read tensor data")

    monkeypatch.setattr(Checkpoint, "tensor", no_data)
    monkeypatch.setattr(Checkpoint, "tensor_slice", no_data)
    assert main(["inspect", str(root), "--validate"]) == 0
    out = capsys.readouterr().out
    assert "hf layout, 2 file(s)" in out and "validated" in out
    assert "508 tensors" in out and "F8_E8M0 196" in out
    capsys.readouterr()
    assert main(["inspect", "tiny"]) == 0
    from_schema = capsys.readouterr().out
    row = [line for line in from_schema.splitlines() if "= total" in line]
    assert row and row == [line for line in out.splitlines() if "= total" in line]


def test_inspect_rejects_bad_input(tmp_path, capsys):
    assert main(["inspect", "gigantic"]) == 2
    assert "unknown preset 'gigantic'" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no model.safetensors.index.json" in capsys.readouterr().err
