"""The pictures: `dsv4 plan --plot` (KV GiB per sequence and FLOPs per token against context, V4-Pro, V4-Flash,
V3.2) and the loss curves `dsv4 train` draws; their series are the plan's and the metrics' numbers, the PNGs
have the figure's size and are not blank, and a missing matplotlib is a clear message."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from dsv4 import plots
from dsv4.cli import main
from dsv4.config import preset
from dsv4.plan import flops_per_token, kv_plan, v32_reference

image = pytest.importorskip("matplotlib.image", reason="the plot tests need matplotlib (the dev extra installs it)")


def _series(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata())) for line in ax.lines}


def test_plan_figure_draws_the_plan_numbers_to_the_1m_mark():
    fig = plots.plan_figure("fp8")
    kv_ax, flops_ax = fig.axes
    assert kv_ax.get_xscale() == "log" and kv_ax.get_yscale() == "log"
    assert "KV cache" in kv_ax.get_title() and flops_ax.get_ylabel() == "GFLOPs"
    for ax in (kv_ax, flops_ax):
        series = _series(ax)
        assert {"V4-Pro", "V4-Flash", "V3.2", "1M tokens"} <= series.keys()
        x, _ = series["V4-Flash"]
        assert x[0] == 1024 and x[-1] == plots.MILLION and np.all(np.diff(x) > 0)
        assert series["1M tokens"][0][0] == plots.MILLION
    kv = _series(kv_ax)
    flops = _series(flops_ax)
    flash, pro = preset("flash"), preset("pro")
    assert kv["V4-Flash"][1][-1] == pytest.approx(kv_plan(flash, plots.MILLION, 1, "fp8").bytes_per_sequence / 2**30)
    assert kv["V3.2"][1][-1] == pytest.approx(v32_reference(plots.MILLION, 1, "fp8").total_bytes / 2**30)
    assert flops["V4-Pro"][1][-1] == pytest.approx(flops_per_token(pro, plots.MILLION).total / 1e9)
    assert np.all(np.diff(kv["V4-Pro"][1]) > 0)  # the cache grows with the context
    assert kv["V3.2"][1][-1] > 5 * kv["V4-Pro"][1][-1]  # the point of the picture: V4's cache is a fraction
    fig.clf()


def test_plan_plot_command_writes_a_png(tmp_path, capsys):
    path = tmp_path / "plan.png"
    assert main(["plan", "tiny", "--context", "4096", "--plot", str(path)]) == 0
    assert f"plot: {path}" in capsys.readouterr().out
    pixels = image.imread(path)
    assert pixels.shape[:2] == (round(4.2 * 110), 11 * 110)
    assert float(pixels[..., :3].std()) > 0.05  # lines and text, not a blank canvas
    fig = plots.plan_figure("fp8", plots.MILLION, extra=("tiny", preset("tiny")))
    assert "tiny" in _series(fig.axes[0])  # MODEL joins the releases when it is neither of them


@pytest.mark.parametrize("target,why", [("plan.txt", "must end in .png"), ("missing/plan.png", "no directory")])
def test_plan_plot_bad_paths_are_usage_errors(tmp_path, capsys, target, why):
    assert main(["plan", "tiny", "--plot", str(tmp_path / target)]) == 2
    assert why in capsys.readouterr().err


def test_without_matplotlib_the_message_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(plots.PlotUnavailable, match=r"pip install 'dsv4\[plot\]'"):
        plots.plan_figure()
    assert main(["plan", "tiny", "--plot", str(tmp_path / "plan.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "plan.png").exists()


def test_loss_figure_has_a_train_series_per_stage_and_the_val_points():
    records = ([{"kind": "train", "step": s, "stage": "dense", "ce": 5.0 - 0.1 * s} for s in range(1, 4)]
               + [{"kind": "train", "step": s, "stage": "sparse", "ce": 4.0 - 0.1 * s} for s in range(4, 9)]
               + [{"kind": "eval", "step": 4, "val_loss": 4.2}, {"kind": "eval", "step": 8, "val_loss": 3.5}])
    fig = plots.loss_figure(records)
    series = _series(fig.axes[0])
    assert set(series) == {"train (dense)", "train (sparse)", "val"}
    assert list(series["train (sparse)"][0]) == [4, 5, 6, 7, 8]
    assert list(series["val"][1]) == [4.2, 3.5]
    fig.clf()
