"""Figures: every plotting function on a small synthetic table, plot_run and the CLI on a tiny analyzed run."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, to_hex

import fisherlab.plots.analysis as plots
from fisherlab.analysis import analyze, load_results
from fisherlab.cli import main
from fisherlab.errors import UserInputError
from fisherlab.kron import BlockStats
from fisherlab.plots import style
from fisherlab.store import RunWriter

METHODS = ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected")
LAYERS = {1: (4, 3), 2: (3, 5)}
HISTORY_COLUMNS = ("epoch", "step", "seconds", "train_loss", "val_loss", "batch_loss", "lr")


def _rows(layers=(1, 2, 5), steps=(0, 10, 20, 30)) -> list[dict]:
    """A results table whose errors grow with the method index and fall with the step (100× range)."""
    rng = np.random.default_rng(0)
    rows = []
    for step in steps:
        for layer in layers:
            for k, method in enumerate(METHODS):
                e1 = (k + 1) ** 2 / (1 + step / 10) * (1 + 0.1 * rng.random())
                rows.append({"step": step, "layer": layer, "method": method, "error1": e1, "error2": 0.5 * e1})
    return rows


def _capture(monkeypatch, write: bool) -> dict:
    drawn = {}
    real_save = plots.save_figure

    def keeping_save(fig, out_dir, stem):
        drawn[stem] = fig
        return real_save(fig, out_dir, stem) if write else []

    monkeypatch.setattr(plots, "save_figure", keeping_save)
    return drawn


@pytest.fixture
def figures(monkeypatch):
    """Figures passed to ``save``, by file stem; the files are written too."""
    return _capture(monkeypatch, write=True)


@pytest.fixture
def sketches(monkeypatch):
    """Figures passed to ``save``, by file stem, without writing them (rendering is the slow part)."""
    return _capture(monkeypatch, write=False)


def _written(paths, n=2):
    assert len(paths) == n
    assert sorted(p.suffix for p in paths) == [".pdf"] * (n // 2) + [".png"] * (n // 2)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)


def _colours(ax) -> dict[str, str]:
    return {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_describe_run_tolerates_missing_keys():
    config = {"problem": "curves", "optimizer": "adam", "fisher_type": "mc", "mc_samples": 1, "batch_size": 256}
    assert plots.describe_run(config) == "curves · Adam · Fisher: mc, 1 MC sample · batch 256"
    assert plots.describe_run({"optimizer": {"name": "sgd", "lr": 0.1}, "fisher_type": "empirical"}) == "SGD · Fisher: empirical"
    assert plots.describe_run({}) == "fisherlab run"


def test_errors_figure_has_one_fixed_colour_line_per_method(tmp_path, figures):
    _written(plots.plot_errors(_rows(), 5, tmp_path, title="synthetic"))
    fig = figures["errors_layer5"]
    error1, error2 = fig.axes[:2]
    assert _colours(error1) == {style.label(m): style.color(m).lower() for m in METHODS}
    assert error1.get_yscale() == "log"  # errors span 100×: a log axis reads better
    assert "layer 5" in fig.get_suptitle() and "synthetic" in fig.get_suptitle()
    legend = error2.get_legend()
    renderer = FigureCanvasAgg(fig).get_renderer()  # the layout is that of the saved files
    for ax in fig.axes[:2]:  # the legend sits beside the panels, never over the data
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_errors_on_a_narrow_range_get_a_linear_axis_from_zero(tmp_path, sketches):
    rows = [r | {"error1": 0.3 + 0.01 * r["step"] / 10} for r in _rows()]
    plots.plot_errors(rows, 5, tmp_path)
    error1, error2 = sketches["errors_layer5"].axes[:2]
    assert error1.get_yscale() == "linear" and error1.get_ylim()[0] == 0
    assert error2.get_yscale() == "log"


def test_errors_figure_rejects_an_unknown_layer(tmp_path):
    with pytest.raises(UserInputError, match="layer 7"):
        plots.plot_errors(_rows(), 7, tmp_path)


def test_heatmap_annotates_every_cell_at_a_step_and_on_average(tmp_path, figures):
    rows = [r for r in _rows() if not (r["layer"] == 2 and r["method"] == "lanczos" and r["step"] == 30)]
    _written(plots.plot_error_heatmap(rows, tmp_path, step=30))
    fig = figures["error_heatmap_step30"]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    at_step, mean = len(panels[0].texts), len(panels[2].texts)
    assert at_step == 3 * 5 - 1  # the missing result is left blank
    assert mean == 3 * 5
    assert "at step 30" in panels[0].get_title() and "mean over 4" in panels[2].get_title()
    assert [t.get_text() for t in panels[0].get_xticklabels()] == [style.label(m) for m in METHODS]
    assert isinstance(panels[0].images[0].norm, LogNorm)  # errors spanning 100× get a log colour scale
    assert panels[0].images[0].norm is panels[2].images[0].norm  # one scale per error: panels compare
    with pytest.raises(UserInputError, match="step 15"):
        plots.plot_error_heatmap(rows, tmp_path, step=15)


def test_spectra_show_negative_eigenvalues_as_hollow_markers(tmp_path, figures):
    exact = np.array([4.0, 1.0, 0.3, 0.05, 1e-18])  # the last one is round-off: left out
    approx = {"kfac": np.array([3.5, 1.2, 0.2, 0.04, 0.01]), "deflation": np.array([4.0, 0.9, 0.3, -0.02, -0.2])}
    _written(plots.plot_spectra(exact, approx, tmp_path, title="layer 2, step 10"))
    ax = figures["spectra"].axes[0]
    assert ax.get_yscale() == "log"
    lines = ax.get_lines()
    exact_line = next(line for line in lines if line.get_label() == style.label("fisher"))
    assert list(exact_line.get_ydata()) == [4.0, 1.0, 0.3, 0.05]
    hollow = [line for line in lines if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1
    assert to_hex(hollow[0].get_color()) == style.color("deflation").lower()
    assert list(hollow[0].get_xdata()) == [4, 5] and list(hollow[0].get_ydata()) == [0.02, 0.2]
    legend_texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("λ < 0" in t for t in legend_texts)


def test_kron_profiles_one_line_per_step_with_a_colorbar(tmp_path, figures, monkeypatch):
    profiles = [np.array([2.0, 1.0, 0.1, 1e-3]), np.array([3.0, 0.3, 3e-3, 1e-20]), np.array([1.0, 0.5, 0.2, 0.1])]
    _written(plots.plot_kron_profiles([0, 10, 20], profiles, tmp_path))
    fig = figures["kron_profile"]
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3 and ax.get_yscale() == "log"
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([1.0, 0.1, 1e-3])  # σ_k/σ_1; round-off dropped
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "training step"  # the colorbar
    monkeypatch.setattr(plots, "save_figure", lambda fig, out_dir, stem: fig)
    one_step = plots.plot_kron_profiles([5], profiles[:1], tmp_path)
    low, high = one_step.axes[1].get_ylim()
    assert low == 5 and high > low  # one step still has a valid colour scale
    with pytest.raises(UserInputError):
        plots.plot_kron_profiles([0, 1], profiles[:1], tmp_path)


def test_default_layer_is_the_papers_layer_5_else_the_middle_one():
    assert plots.default_layer([1, 2, 3, 4, 5, 6, 7, 8]) == 5
    assert plots.default_layer([1, 2, 3]) == 2
    assert plots.default_layer([2, 4]) == 2


# -- a tiny real run ----------------------------------------------------------------------


def _record(path, config=None):
    gen = torch.Generator().manual_seed(0)
    config = {"problem": "synthetic", "optimizer": "adam", "fisher_type": "mc", "mc_samples": 1, "batch_size": 6} | (config or {})
    with RunWriter(path, config, LAYERS) as writer:
        for k, step in enumerate((0, 5, 10)):
            stats = {}
            for i, (d_in, d_out) in LAYERS.items():
                a = torch.relu(torch.randn(6, d_in + 1, generator=gen, dtype=torch.float64))
                a[:, 0] = 1
                stats[i] = BlockStats(a, 1e-3 * torch.randn(6, d_out, generator=gen, dtype=torch.float64))
            writer.write_step(step, k, 1.0, stats, dense_budget=0)
    return path


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    """A recorded and analyzed run: three steps, two small layers (kfac, kpsvd and deflation)."""
    path = _record(tmp_path_factory.mktemp("run") / "run.h5")
    analyze(path, methods=["kfac", "kpsvd", "deflation"], progress=False)
    return path


def test_cli_plots_a_run_beside_it(run_file, capsys):
    assert main(["plot", str(run_file)]) == 0
    out = run_file.parent / "figures"
    assert str(out) in capsys.readouterr().out
    # Defaults: the middle analyzed layer (no layer 5 here) and the last step.
    assert {p.name for p in out.iterdir()} == {
        f"{stem}.{suffix}"
        for stem in ("errors_layer1", "error_heatmap_step10", "spectra_layer1_step10", "kron_profile_layer1")
        for suffix in ("png", "pdf")
    }
    _written(list(out.iterdir()), 8)


def test_plot_run_at_a_chosen_layer_and_step(run_file, tmp_path, sketches):
    results = load_results(run_file)
    plots.plot_run(results, tmp_path, layer=2, step=5)
    assert set(sketches) == {"errors_layer2", "error_heatmap_step5", "spectra_layer2_step5", "kron_profile_layer2"}
    spectra = sketches["spectra_layer2_step5"].axes[0]
    labels = {line.get_label() for line in spectra.get_lines()}
    assert labels >= {style.label(m) for m in ("fisher", "kfac", "kpsvd", "deflation")}
    assert "layer 2, step 5" in sketches["spectra_layer2_step5"].get_suptitle()
    assert "synthetic · Adam · Fisher: mc, 1 MC sample · batch 6" in sketches["errors_layer2"].get_suptitle()
    assert len(sketches["kron_profile_layer2"].axes[0].get_lines()) == 3
    with pytest.raises(UserInputError, match="layer 5 was not analyzed"):
        plots.plot_run(results, tmp_path, layer=5)
    with pytest.raises(UserInputError, match="step 3 was not analyzed"):
        plots.plot_run(results, tmp_path, step=3)


def test_runs_that_would_share_a_figure_directory_get_one_each(tmp_path):
    from fisherlab.plots.files import run_out_dirs

    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "sub" / "a.h5"
    assert run_out_dirs([a], None) == {a: tmp_path / "figures"}
    assert run_out_dirs([a, c], None) == {a: tmp_path / "figures", c: tmp_path / "sub" / "figures"}
    assert run_out_dirs([a, b], None) == {a: tmp_path / "figures" / "a", b: tmp_path / "figures" / "b"}
    out = tmp_path / "out"
    assert run_out_dirs([a, c], out) == {a: out / f"{tmp_path.name}_a", c: out / "sub_a"}


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_cli_bad_inputs_are_one_line_errors(run_file, tmp_path, capsys):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    unanalyzed = _record(tmp_path / "unanalyzed.h5")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    bad_history = tmp_path / "bad" / "history.csv"
    bad_history.parent.mkdir()
    bad_history.write_text("epoch,loss\n0,1.0\n")
    _one_line_error(capsys, ["plot", str(tmp_path / "missing.h5")], "no such file")
    _one_line_error(capsys, ["plot", str(foreign)], "not a fisherlab run file")
    _one_line_error(capsys, ["plot", str(unanalyzed)], "no analysis")
    _one_line_error(capsys, ["plot", str(run_file), "--layer", "7"], "layer 7")
    _one_line_error(capsys, ["plot", str(run_file), "--step", "4"], "step 4")
    _one_line_error(capsys, ["plot", str(notes)], "unknown file type")
    _one_line_error(capsys, ["plot", str(tmp_path / "bad")], "not a training history")
    _one_line_error(capsys, ["plot", str(tmp_path / "bad"), "--layer", "1"], "--layer")
    # Every input is checked before anything is drawn: a good run beside a bad one writes nothing.
    argv = ["plot", str(run_file), str(tmp_path / "bad"), "--out", str(tmp_path / "o")]
    _one_line_error(capsys, argv, "not a training history")
    _one_line_error(capsys, ["plot", str(run_file), str(unanalyzed), "--out", str(tmp_path / "o")], "no analysis")
    assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["plot", str(empty)], "no history.csv")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors exit from the parser
        main(["plot", str(run_file), "--layer", "one"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def _history(directory, optimizer=None, scale=1.0, problem="curves"):
    directory.mkdir(parents=True)
    rows = [",".join(HISTORY_COLUMNS)]
    for epoch in range(4):
        rows.append(f"{epoch},{10 * epoch},{1.5 * epoch},{scale / (1 + epoch)},{1.1 * scale / (1 + epoch)},{scale},0.001")
    (directory / "history.csv").write_text("\n".join(rows) + "\n")
    if optimizer is not None:
        (directory / "run.json").write_text(json.dumps({"settings": {"optimizer": optimizer, "problem": problem}}))
    return directory / "history.csv"


def test_cli_plots_histories_labelled_by_optimizer(tmp_path, capsys, monkeypatch):
    import fisherlab.plots.training as training_plots

    _history(tmp_path / "runs" / "a", optimizer="adam")
    _history(tmp_path / "runs" / "b", optimizer="kpsvd", scale=0.8)
    _history(tmp_path / "runs" / "sgd")  # no run.json: labelled by its directory
    seen = {}
    real = training_plots.plot_histories

    def spying(histories, out_dir, *args, **kwargs):
        seen.update(histories)
        return real(histories, out_dir, *args, **kwargs)

    monkeypatch.setattr(training_plots, "plot_histories", spying)
    assert main(["plot", str(tmp_path / "runs")]) == 0
    assert sorted(seen) == ["adam", "kpsvd", "sgd"]
    assert seen["kpsvd"]["train_loss"] == pytest.approx([0.8, 0.4, 0.8 / 3, 0.2])
    out = tmp_path / "runs" / "figures"
    assert str(out) in capsys.readouterr().out
    _written(list(out.iterdir()))
    assert {p.stem for p in out.iterdir()} == {"curves_training_and_validation_loss"}


def test_histories_of_one_optimizer_are_told_apart(tmp_path):
    from fisherlab.plots.files import read_histories

    first = _history(tmp_path / "lr1e-3", optimizer="adam")
    second = _history(tmp_path / "lr1e-2", optimizer="adam")
    assert sorted(read_histories([first, second])) == ["adam (lr1e-2)", "adam (lr1e-3)"]


def test_zero_blocks_and_failures_leave_gaps_and_blanks(tmp_path, sketches):
    rows = _rows()
    for r in rows:
        if r["layer"] == 5 and r["step"] == 10:
            r.update(error1=None, error2=None, status="zero block")
        if r["layer"] == 2 and r["method"] == "kfac" and r["step"] == 30:
            r.update(error1=None, error2=None, status="failed: RuntimeError: boom")
    plots.plot_errors(rows, 5, tmp_path)
    line = sketches["errors_layer5"].axes[0].get_lines()[0]
    assert np.isnan(line.get_ydata()[1]) and np.isfinite(line.get_ydata()).sum() == 3
    plots.plot_error_heatmap(rows, tmp_path, step=30)
    panels = [ax for ax in sketches["error_heatmap_step30"].axes if ax.images]
    assert len(panels[0].texts) == 3 * 5 - 1  # the failed fit: blank
    assert len(panels[2].texts) == 3 * 5 - 1  # its mean too; zero blocks are left out of the means
    mean = panels[2].images[0].get_array()
    layer5_kfac = np.mean([r["error1"] for r in rows if r["layer"] == 5 and r["method"] == "kfac" and r["error1"] is not None])
    assert mean[2, 0] == pytest.approx(layer5_kfac)
