"""Recording any network: BlockCapture in the Recorder, --model FILE.py:FACTORY, bad input, and
the format-1 numbers of the paper's MLPs kept."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from fisherlab.capture import BlockCapture
from fisherlab.cli import main
from fisherlab.errors import UserInputError
from fisherlab.kron import BlockStats
from fisherlab.kron.shared import SharedBlock
from fisherlab.problems import lenet5, load_factory
from fisherlab.record import Recorder, record
from fisherlab.store import RunReader

ROOT = Path(__file__).parent.parent
EXAMPLE = str(ROOT / "examples" / "small_cnn.py") + ":build"
V1_FILE = Path(__file__).parent / "data" / "run_v1.h5"


def test_recording_an_mlp_gives_the_numbers_of_format_1(tmp_path):
    """Re-record the settings that wrote tests/data/run_v1.h5 (format-1 code): the same bits."""
    out = tmp_path / "run.h5"
    record("8-4-8", out, steps=3, every=1, batch_size=16, progress=False, compression="gzip")
    with RunReader(V1_FILE) as old, RunReader(out) as new:
        assert old.config == new.config and old.layers == new.layers and old.steps() == new.steps()
        assert new.attrs["format_version"] == 2
        for step in old.steps():
            assert old.step_attrs(step) == new.step_attrs(step)
            for layer in old.layers:
                a, b = old.stats(step, layer, torch.float32), new.stats(step, layer, torch.float32)
                assert torch.equal(a.a, b.a) and torch.equal(a.g, b.g)
                assert torch.equal(old.dense(step, layer), new.dense(step, layer))


def test_load_factory_of_the_example():
    task = load_factory(EXAMPLE, seed=0)
    assert task.likelihood == "categorical" and task.train_inputs.shape == (512, 1, 12, 12)
    assert task.train_targets.dtype == torch.int64 and task.val_inputs.shape[0] == 128
    again = load_factory(EXAMPLE, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(task.model.parameters(), again.model.parameters(), strict=True))
    other = load_factory(EXAMPLE, seed=1)
    assert not torch.equal(task.model[0].weight, other.model[0].weight)


@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
def test_recorded_blocks_are_the_captured_ones(tmp_path, fisher):
    """The file holds what BlockCapture gives at step 0 on the first batch of the same order."""
    out = tmp_path / "run.h5"
    record(model=EXAMPLE, out=out, steps=1, every=1, batch_size=32, fisher=fisher, kfac="reduce", kfac_both=True,
           progress=False, dense_budget="1MB")
    task = load_factory(EXAMPLE, seed=0)
    index = torch.randperm(512, generator=torch.Generator().manual_seed(0))[:32]
    x, y = task.train_inputs[index], task.train_targets[index]
    with BlockCapture(task.model, kfac="reduce", kfac_forms=("expand", "reduce")) as capture:
        output = task.model(x)
        gen = torch.Generator()
        from fisherlab.record import _mc_seed

        gen.manual_seed(_mc_seed(0, 0))
        blocks = capture.capture(output, "categorical", fisher=fisher, targets=y if fisher == "empirical" else None,
                                 generator=gen if fisher == "mc" else None)
    with RunReader(out) as reader:
        specs = reader.layer_specs
        assert [s.kind for s in specs.values()] == ["Conv2d", "Conv2d", "Linear"]
        assert [s.positions for s in specs.values()] == [100, 9, 1]
        assert [s.bias for s in specs.values()] == [True, False, True]
        assert specs[1].kernel == (3, 3) and specs[1].kfac_form == "reduce"
        assert reader.kfac_forms(0, 1) == ["expand", "reduce"]
        assert reader.config["likelihood"] == "categorical" and reader.config["fisher_type"] == fisher
        for layer, block in blocks.items():
            got = reader.stats(0, layer, torch.float32)
            assert type(got) is type(block)
            if isinstance(block, SharedBlock):
                assert got.kfac_form == "reduce"
                for key, value in block.state().items():
                    assert torch.equal(got.state()[key], value) if isinstance(value, torch.Tensor) else True
            else:
                assert isinstance(got, BlockStats) and torch.equal(got.a, block.a) and torch.equal(got.g, block.g)
            torch.testing.assert_close(reader.dense(0, layer), block.to(torch.float64).to_dense(), rtol=1e-5, atol=1e-6)


def _factory(tmp_path, body: str) -> str:
    path = tmp_path / "user.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        X = torch.randn(64, 5)
        def make():
    """) + textwrap.indent(textwrap.dedent(body), "    "))
    return f"{path}:make"


BAD = {
    "fails": ("raise RuntimeError('no GPU here')", "make() failed: RuntimeError: no GPU here"),
    "not a tuple": ("return nn.Linear(5, 2)", "must return (model, train_set, likelihood)"),
    "too short": ("return nn.Linear(5, 2), 'gaussian'", "of length 2"),
    "not a module": ("return 3, list(zip(X, X)), 'gaussian'", "nn.Module first"),
    "unknown likelihood": ("return nn.Linear(5, 5), list(zip(X, X)), 'poisson'", "unknown likelihood 'poisson'"),
    "target shape": ("return nn.Linear(5, 2), list(zip(X, X)), 'gaussian'", "targets must be floating point"),
    "class targets": ("return nn.Linear(5, 3), list(zip(X, X)), 'categorical'", "integer class indices"),
    "not pairs": ("return nn.Linear(5, 5), list(X), 'gaussian'", "(input, target) pairs"),
    "batchnorm": ("return nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)), list(zip(X, X)), 'gaussian'",
                  "module '1'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_refuses_bad_factories_in_one_line_and_writes_nothing(tmp_path, capsys, case):
    body, message = BAD[case]
    spec = _factory(tmp_path, body)
    out = tmp_path / "run.h5"
    assert main(["record", "--model", spec, "--out", str(out), "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.py"]


@pytest.mark.parametrize("spec", ["nofactory.py", "missing.py:make", "{dir}/user.py:other"])
def test_cli_refuses_bad_model_specs(tmp_path, capsys, spec):
    _factory(tmp_path, "return nn.Linear(5, 5), list(zip(X, X)), 'gaussian'")
    out = tmp_path / "run.h5"
    assert main(["record", "--model", spec.format(dir=tmp_path), "--out", str(out), "--steps", "2"]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    assert not out.exists()


def test_a_gaussian_factory_without_validation_set_records(tmp_path):
    spec = _factory(tmp_path, "return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 5, bias=False)), "
                              "list(zip(X, X)), 'gaussian'")
    out = tmp_path / "run.h5"
    record(model=spec, out=out, steps=4, every=2, batch_size=16, progress=False)
    with RunReader(out) as reader:
        assert reader.steps() == [0, 2]
        assert reader.layers == {1: (5, 4), 2: (4, 5)}
        assert reader.stats(2, 2).a.shape == (16, 4)  # no bias: no column of ones


def test_cli_end_to_end_record_analyze_plot(tmp_path, capsys):
    example = tmp_path / "small_cnn.py"
    shutil.copy(ROOT / "examples" / "small_cnn.py", example)
    out = tmp_path / "cnn.h5"
    assert main(["record", "--model", f"{example}:build", "--out", str(out), "--steps", "6", "--every", "3",
                 "--batch-size", "32", "--no-progress"]) == 0
    assert main(["analyze", str(out), "--quiet"]) == 0
    table = (tmp_path / "errors.csv").read_text().splitlines()
    header = table[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in table[1:]]
    assert {r["layer"] for r in rows} == {"1", "2", "3"}
    assert all(r["status"] == "ok" for r in rows)
    for step, layer in {(r["step"], r["layer"]) for r in rows}:
        errors = {r["method"]: float(r["error1"]) for r in rows if (r["step"], r["layer"]) == (step, layer)}
        assert {"kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "kronecker_svd"} <= errors.keys()
        # The exact Kronecker SVD of rank 2 is the best symmetric rank-2 (so also rank-1) approximation.
        assert errors["kronecker_svd"] <= min(errors.values()) + 1e-6
    assert main(["plot", str(out), "--layer", "2", "--out", str(tmp_path / "figures")]) == 0
    assert any(p.suffix in (".png", ".pdf", ".svg") for p in (tmp_path / "figures").iterdir())



def test_resumed_model_run_equals_an_uninterrupted_one(tmp_path):
    """load_factory seeds the weights, so a resumed --model run continues the same trajectory."""
    whole, cut = tmp_path / "whole.h5", tmp_path / "cut.h5"
    record(model=EXAMPLE, out=whole, steps=8, every=2, batch_size=32, progress=False)
    record(model=EXAMPLE, out=cut, steps=4, every=2, batch_size=32, progress=False)
    record(model=EXAMPLE, out=cut, steps=8, every=2, batch_size=32, progress=False, resume=True)
    with RunReader(whole) as a, RunReader(cut) as b:
        assert a.steps() == b.steps() == [0, 2, 4, 6]
        for step in a.steps():
            assert a.step_attrs(step) == b.step_attrs(step)
            for layer in a.layers:
                assert torch.equal(a.stats(step, layer).kernel_matrix(), b.stats(step, layer).kernel_matrix())


def test_cli_study_with_a_model(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "--model", EXAMPLE, "--out", str(out), "--steps", "4", "--every", "2", "--batch-size", "32",
                 "--kfac", "reduce", "--kfac-both", "--quiet", "--methods", "kfac,kronecker_svd"]) == 0
    with RunReader(out / "run.h5") as reader:
        assert list(reader.layers) == [1, 2, 3] and reader.config["kfac"] == "reduce"
    table = (out / "errors.csv").read_text()
    assert ",kfac_expand," in table and ",kfac_reduce," not in table
    assert any((out / "figures").iterdir())


def test_a_format_1_run_resumes_and_keeps_its_version(tmp_path):
    old = tmp_path / "run.h5"
    shutil.copy(V1_FILE, old)
    record("8-4-8", old, steps=5, every=1, batch_size=16, progress=False, compression="gzip", resume=True)
    whole = tmp_path / "whole.h5"
    record("8-4-8", whole, steps=5, every=1, batch_size=16, progress=False, compression="gzip")
    with RunReader(old) as a, RunReader(whole) as b:
        assert a.attrs["format_version"] == 1 and a.steps() == b.steps() == [0, 1, 2, 3, 4]
        for step in a.steps():
            for layer in a.layers:
                assert torch.equal(a.stats(step, layer).g, b.stats(step, layer).g)


@pytest.mark.parametrize("data", [
    "torch.utils.data.TensorDataset(X, X)",
    "torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, X), batch_size=10)",
])
def test_factories_may_return_torch_datasets_and_loaders(tmp_path, data):
    spec = _factory(tmp_path, f"""
        from dataclasses import dataclass

        @dataclass
        class Settings:
            width: int = 3

        return nn.Sequential(nn.Linear(5, Settings().width), nn.Linear(3, 5)), {data}, 'gaussian'
    """)
    task = load_factory(spec)
    assert task.train_inputs.shape == (64, 5) and torch.equal(task.train_inputs, task.train_targets)


def test_linear_code_is_refused_for_networks(tmp_path):
    with pytest.raises(UserInputError, match="linear_code"):
        record(model=EXAMPLE, out=tmp_path / "run.h5", steps=1, linear_code=True, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_step_that_is_not_due_runs_the_plain_forward_pass_without_hooks():
    torch.manual_seed(0)
    model = lenet5()
    x, y = torch.rand(3, 1, 28, 28), torch.randint(0, 10, (3,))
    recorder = Recorder(model, "categorical", range(1, 6), every=10)
    seen = []
    conv = model[0]
    conv.register_forward_hook(lambda module, inputs, output: seen.append(len(module._forward_hooks)))
    out = recorder.forward(model, x, 3, y)  # not due: the model's own forward pass, nothing captured
    assert seen == [1] and recorder.stats is None and not recorder.capture._saved
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    recorder.forward(model, x, 10, y)  # due: the capture's hooks run beside ours
    assert seen[2] == 2 and set(recorder.stats) == set(range(1, 6))
    assert len(conv._forward_hooks) == 1  # the capture's hook is gone again
