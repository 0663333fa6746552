"""``fisherlab train --model FILE.py:FACTORY`` and the generic training path."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import fisherlab.data
import fisherlab.training
from fisherlab.cli import main
from fisherlab.loop import History

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_small_cnn.py"
FAST = ["--epochs", "2", "--batch-size", "32", "--lr", "0.5", "--damping", "0.01", "--clip", "0.1", "--t1", "2",
        "--t2", "2", "--no-progress"]


@pytest.mark.parametrize(("optimizer", "fisher", "form"), [
    ("kfac", "mc", "expand"), ("deflation", "exact", "reduce"), ("kfac_corrected", "empirical", "reduce"),
    ("adam", "mc", "expand"),
])
def test_train_a_user_cnn_end_to_end(tmp_path, capsys, optimizer, fisher, form):
    out = tmp_path / "run"
    args = ["train", "--model", f"{EXAMPLE}:small_cnn", "--optimizer", optimizer, "--fisher", fisher,
            "--kfac-form", form, "--out", str(out), *FAST]
    if optimizer == "adam":
        args[args.index("--lr") + 1] = "0.05"
    assert main(args) == 0
    assert "small_cnn" in capsys.readouterr().out
    rows = History.read_csv(out / "history.csv").rows
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["model"].endswith("train_small_cnn.py:small_cnn") and record["settings"]["problem"] is None
    if optimizer != "adam":
        assert record["settings"].get("fisher", "mc") == fisher and record["diagnostics"]["steps"] == 16


def test_a_factory_run_resumes_bit_for_bit(tmp_path):
    args = ["train", "--model", f"{EXAMPLE}:small_cnn", "--optimizer", "kfac", *FAST]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*args, "--out", str(whole)]) == 0
    assert main([*[a if a != "2" or i != args.index("--epochs") + 1 else "1" for i, a in enumerate(args)],
                 "--out", str(cut)]) == 0
    assert main([*args, "--out", str(cut), "--resume"]) == 0
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


BAD_FACTORIES = {
    "raises": ("def f():\n    raise RuntimeError('no data here')\n", "no data here"),
    "not_a_tuple": ("def f():\n    return 3\n", "must return"),
    "two": ("import torch\ndef f():\n    return torch.nn.Linear(2, 2), 'gaussian'\n", "must return"),
    "no_module": ("def f():\n    return 1, [], 'gaussian'\n", "nn.Module"),
    "likelihood": ("import torch\ndef f():\n    return torch.nn.Linear(2, 2), [], 'poisson'\n", "poisson"),
    "not_pairs": ("import torch\ndef f():\n    return torch.nn.Linear(2, 2), [torch.ones(2)], 'gaussian'\n", "pairs"),
    "empty": ("import torch\ndef f():\n    return torch.nn.Linear(2, 2), [], 'gaussian'\n", "empty"),
    "targets": ("import torch\ndef f():\n    data = [(torch.ones(2), torch.ones(3))] * 4\n"
                "    return torch.nn.Linear(2, 2), data, 'gaussian'\n", "targets"),
    "labels": ("import torch\ndef f():\n    data = [(torch.ones(2), torch.tensor([1, 0]))] * 4\n"
               "    return torch.nn.Linear(2, 2), data, 'categorical'\n", "class indices"),
    "model_fails": ("import torch\ndef f():\n    data = [(torch.ones(5), torch.ones(2))] * 4\n"
                    "    return torch.nn.Linear(2, 2), data, 'gaussian'\n", "fails on the training inputs"),
    "syntax": ("def f(:\n", "SyntaxError"),
}


@pytest.mark.parametrize("case", list(BAD_FACTORIES))
def test_a_bad_factory_is_one_line_status_2_and_nothing_written(tmp_path, capsys, case):
    source, message = BAD_FACTORIES[case]
    path = tmp_path / f"{case}.py"
    path.write_text(source)
    out = tmp_path / "run"
    assert main(["train", "--model", f"{path}:f", "--optimizer", "kfac", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(("spec", "message"), [
    ("examples/train_small_cnn.py", "FILE.py:FACTORY"),
    ("missing.py:f", "does not exist"),
    (f"{EXAMPLE}:nothing", "no callable 'nothing'"),
])
def test_a_bad_model_spec_is_one_line_status_2(tmp_path, capsys, spec, message):
    out = tmp_path / "run"
    assert main(["train", "--model", spec, "--optimizer", "sgd", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_problem_and_model_exclude_each_other(tmp_path, capsys):
    args = ["train", "--problem", "curves", "--model", f"{EXAMPLE}:small_cnn", "--optimizer", "sgd", "--out",
            str(tmp_path / "run")]
    for argv, message in ((args, "not allowed"), (["train", "--optimizer", "sgd", "--out", str(tmp_path / "run")],
                                                    "one of the arguments --problem --model")):
        with pytest.raises(SystemExit) as exc:  # argparse's own errors
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


@dataclass
class _Data:
    train: torch.Tensor
    val: torch.Tensor
    train_targets: torch.Tensor
    val_targets: torch.Tensor
    meta: dict

    def provenance(self):
        return {"name": "fake"}


class _ClassifierProblem:
    """A built-in problem as a classifier brings it: build_model, dataset, batch_size and a likelihood name."""

    name, dataset, batch_size, likelihood = "fake-cnn", "fake", 16, "categorical"

    def build_model(self, seed=0, dtype=torch.float32, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)).to(dtype=dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=dtype))
        return model


def test_a_classifier_problem_plugs_into_the_training_path(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 5, 5, generator=gen)
    y = (x[:, 0, 2, 2] > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    data = _Data(x[:64], x[64:], y[:64], y[64:], {"source": "test"})
    monkeypatch.setattr(fisherlab.training, "get_problem", lambda name: _ClassifierProblem())
    monkeypatch.setattr(fisherlab.data, "load_dataset", lambda *args: data)
    out = tmp_path / "run"
    args = ["train", "--problem", "fake-cnn", "--optimizer", "lanczos", "--out", str(out), "--epochs", "3", "--lr", "0.5",
            "--damping", "0.01", "--clip", "0.1", "--t1", "2", "--t2", "2", "--no-progress", "--dtype", "float64"]
    assert main(args) == 0
    rows = History.read_csv(out / "history.csv").rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    model = _ClassifierProblem().build_model(dtype=torch.float64)
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x[:64].double()), y[:64]).item()
    assert rows[-1]["train_loss"] == pytest.approx(expected, rel=1e-12)


def test_the_built_in_cnn_trains_with_lanczos(tmp_path, monkeypatch):
    # `fisherlab train --problem mnist-cnn` on a random stand-in for MNIST (the real data are not in CI).
    import fisherlab.problems as problems

    def stand_in(seed, data_dir=None):
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(96, 1, 28, 28, generator=gen)
        y = torch.randint(10, (96,), generator=gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = problems.lenet5()
        return problems.Task("mnist-cnn", model, "categorical", x[:64], y[:64], x[64:], y[64:], batch_size=32)

    monkeypatch.setitem(problems.TASKS, "mnist-cnn", stand_in)
    out = tmp_path / "run"
    args = ["train", "--problem", "mnist-cnn", "--optimizer", "lanczos", "--out", str(out), "--epochs", "2",
            "--t1", "1", "--t2", "1", "--no-progress", "--dtype", "float64"]
    assert main(args) == 0
    rows = History.read_csv(out / "history.csv").rows
    assert [r["step"] for r in rows] == [0, 2, 4] and all(math.isfinite(r["train_loss"]) for r in rows)
    initial = stand_in(0).model.double().state_dict()
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert set(trained) == set(initial) and all(not torch.equal(trained[k], initial[k]) for k in initial)
