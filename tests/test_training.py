"""The training loop, its history, the ``fisherlab train`` command and the Figure 2 plot."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import fisherlab.data
import fisherlab.loop
from fisherlab.cli import main
from fisherlab.data import Dataset
from fisherlab.errors import UserInputError
from fisherlab.plots.training import best_final, plot_histories
from fisherlab.problems import get_problem
from fisherlab.training import COLUMNS, History, build_optimizer, train

SMALL = get_problem("16-8-16")


def _data(n, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.rand(4, d, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    return base[torch.randint(0, 4, (n,), generator=gen)] * 0.9 + 0.05


@pytest.mark.parametrize("name", ["sgd", "adam", "kfac", "deflation"])
def test_train_logs_every_epoch_and_every_n_steps(name):
    model = SMALL.build_model(seed=0)
    opt = build_optimizer(name, model, SMALL, lr=0.01 if name == "adam" else 0.05, damping=1e-2, clip=1e-2, t1=2, t2=2)
    seen = []
    history = train(model, SMALL, opt, _data(128), _data(32, seed=1), epochs=3, batch_size=32, log_every=3,
                    progress=False, on_row=lambda h: seen.append(len(h.rows)))
    assert seen == list(range(1, len(history.rows) + 1))
    assert history.column("step") == [0, 3, 4, 6, 8, 9, 12]
    assert history.column("epoch") == [0, 1, 1, 2, 2, 3, 3]
    seconds = history.column("seconds")
    assert seconds[0] == 0 and all(b >= a for a, b in itertools.pairwise(seconds))
    assert history.rows[-1]["train_loss"] < history.rows[0]["train_loss"]
    assert not history.diverged


def test_history_csv_round_trip(tmp_path):
    rows = [{"epoch": 0, "step": 0, "seconds": 0.0, "train_loss": 2.5, "val_loss": 2.6, "batch_loss": float("nan"), "lr": 0.1},
            {"epoch": 1, "step": 4, "seconds": 1.25, "train_loss": 1.5, "val_loss": 1.75, "batch_loss": 2.0, "lr": 0.1}]
    History(rows).write_csv(tmp_path / "h.csv")
    back = History.read_csv(tmp_path / "h.csv")
    assert back.column("train_loss") == [2.5, 1.5] and back.column("step") == [0, 4]
    assert not back.diverged
    (tmp_path / "bad.csv").write_text("epoch,step\n0,0\n")
    with pytest.raises(UserInputError, match="train_loss"):
        History.read_csv(tmp_path / "bad.csv")


def test_divergence_stops_the_run():
    problem = get_problem("linear:16-8-16")
    model = problem.build_model(seed=0)
    opt = build_optimizer("sgd", model, problem, lr=1e3)
    history = train(model, problem, opt, _data(128), _data(32), epochs=5, batch_size=32, progress=False)
    assert history.diverged and history.rows[-1]["epoch"] < 5


def test_build_optimizer_rejects_unknown_names_and_bad_settings():
    with pytest.raises(UserInputError, match="unknown optimizer"):
        build_optimizer("lbfgs", SMALL.build_model(), SMALL, lr=0.1)
    with pytest.raises(UserInputError, match="damping"):
        build_optimizer("kfac", SMALL.build_model(), SMALL, lr=0.1, damping=-1)


def test_plot_histories_writes_the_figure_panels(tmp_path):
    histories = {
        "kfac": {c: [0, 1, 2] if c in ("epoch", "step") else [3.0, 2.0, 1.0] for c in COLUMNS},
        "adam": History([{c: float(i) + 1 for c in COLUMNS} for i in range(3)]),
    }
    paths = plot_histories(histories, tmp_path / "figures", "CURVES (CPU-sized)")
    assert [p.name for p in paths] == ["curves_cpu_sized.png", "curves_cpu_sized.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert best_final(histories) == {"kfac": 1.0, "adam": 3.0}


@pytest.fixture
def tiny_curves(monkeypatch):
    def fake(name, data_dir=None, cache_dir=None):
        gen = torch.Generator().manual_seed(0)
        return Dataset(torch.rand(80, 784, generator=gen), torch.rand(20, 784, generator=gen), None, {"source": "test"})

    monkeypatch.setattr(fisherlab.data, "load_dataset", fake)


def test_train_command_writes_history_and_run_record(tmp_path, tiny_curves):
    out = tmp_path / "run"
    args = ["train", "--problem", "curves", "--optimizer", "kfac", "--epochs", "2", "--batch-size", "40",
            "--lr", "0.01", "--damping", "0.01", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    history = History.read_csv(out / "history.csv")
    assert history.column("epoch") == [0, 1, 2] and history.column("step") == [0, 2, 4]
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["optimizer"] == "kfac" and record["diagnostics"]["stats_updates"] == 1
    assert not (out / "history.partial.csv").exists()
    assert main(args) == 2  # a finished run is not overwritten without --force
    lean = [*args[:-3], "--out", str(tmp_path / "lean"), "--no-progress"]
    assert main([*lean, "--no-epoch-rows"]) == 0
    assert History.read_csv(tmp_path / "lean" / "history.csv").column("step") == [4]
    assert json.loads((tmp_path / "lean" / "run.json").read_text())["settings"]["epoch_rows"] is False
    assert main([*lean, "--resume", "--epochs", "3"]) == 0  # the rows are no setting of the training itself
    assert History.read_csv(tmp_path / "lean" / "history.csv").column("step") == [4, 6]


@pytest.mark.parametrize(
    "extra,message",
    [(["--problem", "20-10-20"], "no data set"), (["--problem", "imagenet"], "unknown problem"),
     (["--problem", "curves", "--lr", "-1"], "positive"), (["--problem", "curves", "--batch-size", "500"], "exceeds")],
)
def test_train_command_bad_input_is_one_line_and_status_2(tmp_path, tiny_curves, capsys, extra, message):
    try:
        code = main(["train", "--optimizer", "sgd", "--out", str(tmp_path / "x"), "--no-progress", *extra])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra,message",
    [(["--optimizer", "kfac", "--stats-batch", "0"], "must be a positive integer, got 0"),
     (["--optimizer", "kfac", "--stats-batch", "41"], "the statistics batch 41 exceeds the batch size 40"),
     (["--optimizer", "kfac", "--fit-tol", "1e-3"], "kfac: fit_tol does not apply to kfac"),
     (["--optimizer", "kpsvd", "--fit-tol", "-1"], "must be a positive number, got -1"),
     (["--optimizer", "kpsvd", "--profile", "ours"], "invalid choice: 'ours'"),
     (["--optimizer", "kpsvd", "--kl-form", "martens"], "invalid choice: 'martens'")],
)
def test_train_command_new_settings_bad_input_is_one_line_and_status_2(tmp_path, tiny_curves, capsys, extra, message):
    args = ["train", "--problem", "curves", "--batch-size", "40", "--out", str(tmp_path / "x"), "--no-progress", *extra]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "extra,settings",
    [([], {"profile": "fisherlab", "kl_form": "paper", "average": "block"}),
     (["--profile", "paper"], {"profile": "paper", "kl_form": "paper", "average": "factors"}),
     (["--profile", "paper", "--kl-form", "ba", "--average", "block"],
      {"profile": "paper", "kl_form": "ba", "average": "block"})],
)
def test_train_command_profile_and_new_settings_reach_the_optimizer(tmp_path, tiny_curves, monkeypatch, extra, settings):
    built = {}
    original = fisherlab.training.build_optimizer

    def spy(*args, **kwargs):
        built["opt"] = original(*args, **kwargs)
        return built["opt"]

    monkeypatch.setattr(fisherlab.training, "build_optimizer", spy)
    out = tmp_path / "run"
    args = ["train", "--problem", "curves", "--optimizer", "deflation", "--epochs", "1", "--batch-size", "40",
            "--lr", "0.01", "--damping", "0.01", "--stats-batch", "10", "--fit-tol", "0.01", "--out", str(out),
            "--no-progress", *extra]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert {k: record["settings"][k] for k in settings} == settings
    assert record["settings"]["stats_batch"] == 10 and record["settings"]["fit_tol"] == 0.01
    config = built["opt"].config
    assert (config.kl_form, config.average, config.stats_batch) == (settings["kl_form"], settings["average"], 10)
    assert config.fit_options["tol"] == 0.01
    for key in ("remedy_layers", "clipped_curvatures", "remedy_layers_total", "clipped_curvatures_total"):
        assert key in record["diagnostics"]


def _interrupt_at(monkeypatch, at_step):
    original = fisherlab.loop.Loop._one_step

    def one_step(self, *args):
        if self.step == at_step:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(fisherlab.loop.Loop, "_one_step", one_step)


def _rows(path):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in History.read_csv(path).rows]


@pytest.mark.parametrize("optimizer", ["adam", "deflation"])
def test_train_command_interrupted_and_resumed_matches_an_uninterrupted_run(tmp_path, tiny_curves, capsys, monkeypatch,
                                                                            optimizer):
    args = ["train", "--problem", "curves", "--optimizer", optimizer, "--epochs", "4", "--batch-size", "20",
            "--lr", "0.01", "--damping", "0.01", "--t1", "3", "--log-every", "3", "--no-progress"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*args, "--out", str(whole)]) == 0
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 11)  # rows at steps 0, 3, 4, 6, 8, 9: the checkpoint holds step 9
        assert main([*args, "--out", str(cut)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0]
    assert not (cut / "history.csv").exists() and (cut / "history.partial.csv").exists()
    assert main([*args, "--out", str(cut), "--resume"]) == 0
    assert str(_rows(cut / "history.csv")) == str(_rows(whole / "history.csv"))  # str: NaN equals NaN
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    first, second = (json.loads((d / "run.json").read_text()) for d in (whole, cut))
    assert {k: v for k, v in first["final"].items() if k != "seconds"} == {
        k: v for k, v in second["final"].items() if k != "seconds"}


def test_train_command_resume_with_other_settings_is_refused(tmp_path, tiny_curves, capsys):
    out = tmp_path / "run"
    args = ["train", "--problem", "curves", "--optimizer", "sgd", "--epochs", "2", "--batch-size", "40", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*args, "--resume", "--lr", "0.02"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (lr)" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*args, "--resume", "--epochs", "3"]) == 0  # more epochs: the same run, extended
    assert History.read_csv(out / "history.csv").column("epoch") == [0, 1, 2, 3]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*args, "--resume", "--epochs", "1"]) == 2  # fewer: refused
    assert "past the 2 steps of 1 epochs" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_plot_histories_adds_the_ablation_column(tmp_path):
    def history(scale):
        return {c: [0, 1, 2] if c in ("epoch", "step") else [3.0 * scale, 2.0 * scale, scale] for c in COLUMNS}

    ablation = {"deflation": {"factors": history(1.0), "block": history(0.9)}, "lanczos": {"factors": history(1.1)}}
    paths = plot_histories({"kfac": history(1.0)}, tmp_path, "CURVES", stem="with", ablation=ablation)
    assert [p.name for p in paths] == ["with.png", "with.pdf"]
    without = plot_histories({"kfac": history(1.0)}, tmp_path, "CURVES", stem="without")
    from matplotlib.image import imread

    # The third column widens the figure by half: 15 inches against 10 at the same height.
    assert imread(paths[0]).shape[1] / imread(without[0]).shape[1] == pytest.approx(1.5, rel=0.02)
    with pytest.raises(ValueError, match="no column"):
        plot_histories({"kfac": history(1.0)}, tmp_path, "CURVES", ablation={"deflation": {"block": {"epoch": [0]}}})
