"""The one training loop: pause and resume bit for bit, checkpoints, the device resolver, atomic writes."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from fisherlab.device import resolve_device
from fisherlab.errors import UserInputError
from fisherlab.io import atomic_write
from fisherlab.loop import Checkpoint, Hook, Loop
from fisherlab.problems import get_problem
from fisherlab.training import build_optimizer, train

SMALL = get_problem("16-8-16")


def _data(n, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.rand(4, d, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    return base[torch.randint(0, 4, (n,), generator=gen)] * 0.9 + 0.05


def _without_seconds(history):
    # NaN (the first row's batch loss) as None, so that equal rows compare equal.
    return [{k: None if math.isnan(v) else v for k, v in row.items() if k != "seconds"} for row in history.rows]


def _evaluations(history):
    # batch_loss is the mean since the previous row, so it depends on which rows there are.
    return [{k: row[k] for k in ("epoch", "step", "train_loss", "val_loss")} for row in history.rows]


def _train(name, checkpoint=None, resume=False, stop_at=None, epochs=3, log_every=3, epoch_rows=True):
    model = SMALL.build_model(seed=0)
    opt = build_optimizer(name, model, SMALL, lr=0.01 if name == "adam" else 0.05, damping=1e-2, clip=1e-2, t1=2, t2=3,
                          momentum=0.5 if name != "adam" else None)
    history = train(model, SMALL, opt, _data(136), _data(32, seed=1), epochs=epochs, batch_size=32, seed=3,
                    log_every=log_every, epoch_rows=epoch_rows, progress=False, checkpoint=checkpoint, resume=resume,
                    stop_at=stop_at)
    return history, model


@pytest.mark.parametrize("name", ["sgd", "adam", "kfac", "deflation"])
@pytest.mark.parametrize("stop_at", [5, 8])  # inside the second epoch (4 steps each), and at its end
def test_paused_and_resumed_training_equals_an_uninterrupted_run(tmp_path, name, stop_at):
    whole, model = _train(name)
    checkpoint = Checkpoint(tmp_path / "state.pt", {"name": name})
    paused, _ = _train(name, checkpoint, stop_at=stop_at)
    assert paused.rows[-1]["step"] < 12 and torch.load(checkpoint.path, weights_only=True)["step"] == stop_at
    resumed, other = _train(name, checkpoint, resume=True)
    assert _without_seconds(resumed) == _without_seconds(whole)
    assert resumed.column("step") == [0, 3, 4, 6, 8, 9, 12]
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_resume_extends_a_finished_run_to_more_epochs(tmp_path):
    checkpoint = Checkpoint(tmp_path / "state.pt", {})
    _train("kfac", checkpoint, epochs=2)
    extended, model = _train("kfac", checkpoint, resume=True, epochs=3)
    whole, reference = _train("kfac", epochs=3)
    assert _without_seconds(extended) == _without_seconds(whole)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    with pytest.raises(UserInputError, match="past the 8 steps of 2 epochs"):
        _train("kfac", checkpoint, resume=True, epochs=2)


def test_without_epoch_rows_only_the_end_is_evaluated_and_training_is_unchanged(tmp_path):
    whole, model = _train("kfac", log_every=0)
    assert whole.column("step") == [0, 4, 8, 12]
    lean, other = _train("kfac", log_every=0, epoch_rows=False)
    assert _evaluations(lean) == _evaluations(whole)[-1:]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    assert _train("kfac", epoch_rows=False)[0].column("step") == [3, 6, 9, 12]  # log_every still applies
    # Extended, as a search rung is: each part adds the row at its end.
    checkpoint = Checkpoint(tmp_path / "state.pt", {})
    assert _train("kfac", checkpoint, epochs=2, log_every=0, epoch_rows=False)[0].column("step") == [8]
    extended, again = _train("kfac", checkpoint, resume=True, log_every=0, epoch_rows=False)
    assert _evaluations(extended) == [r for r in _evaluations(whole) if r["step"] in (8, 12)]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_without_epoch_rows_a_run_still_checkpoints_every_epoch_and_records_its_divergence(tmp_path):
    class Stop(Hook):
        def after_step(self, step, epoch, loss):
            if step == 6:  # inside the second epoch (4 steps each)
                raise KeyboardInterrupt
            return False

    model = SMALL.build_model(seed=0)
    checkpoint = Checkpoint(tmp_path / "c.pt", {})
    loop = Loop(model, SMALL, torch.optim.SGD(model.parameters(), lr=0.05), _data(136), val_data=_data(32, seed=1),
                batch_size=32, steps=12, epoch_rows=False, hook=Stop(), checkpoint=checkpoint, progress=False)
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 4 and loop.history.rows == []
    problem = get_problem("linear:16-8-16")
    model = problem.build_model(seed=0)
    history = train(model, problem, build_optimizer("sgd", model, problem, lr=1e3), _data(128), _data(32), epochs=5,
                    batch_size=32, epoch_rows=False, progress=False)
    assert history.diverged and len(history.rows) == 1 and history.rows[0]["epoch"] < 5


def test_checkpoint_refuses_other_settings_and_ignores_a_damaged_file(tmp_path):
    Checkpoint(tmp_path / "c.pt", {"lr": 0.1, "seed": 0}).save({"step": 3})
    assert Checkpoint(tmp_path / "c.pt", {"seed": 0, "lr": 0.1}).load()["step"] == 3
    with pytest.raises(UserInputError, match=r"other settings \(lr\)"):
        Checkpoint(tmp_path / "c.pt", {"lr": 0.2, "seed": 0}).load()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert Checkpoint(tmp_path / "bad.pt", {}).load() is None
    assert Checkpoint(tmp_path / "missing.pt", {}).load() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "c.pt"]


def test_hook_sees_every_step_and_may_ask_for_checkpoints(tmp_path):
    class Counting(Hook):
        def __init__(self):
            self.forward_steps, self.after = [], []

        def forward(self, model, x, step):
            self.forward_steps.append(step)
            return model(x)

        def after_step(self, step, epoch, loss):
            self.after.append((step, epoch))
            return step == 4

    hook = Counting()
    model = SMALL.build_model(seed=0)
    saved = []
    checkpoint = Checkpoint(tmp_path / "c.pt", {})
    checkpoint.save = lambda state: saved.append(state["step"])
    loop = Loop(model, SMALL, torch.optim.SGD(model.parameters(), lr=0.1), _data(100), batch_size=32, steps=7,
                hook=hook, checkpoint=checkpoint, progress=False)
    assert loop.run().rows == []  # no validation data: no history
    assert hook.forward_steps == list(range(7))
    assert hook.after == [(s, s // 3) for s in range(7)]  # 3 full batches an epoch
    assert saved == [5, 7]  # after step 4 (the hook asked) and at the end


def test_loop_rejects_bad_settings():
    model = SMALL.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserInputError, match="exceeds"):
        Loop(model, SMALL, opt, _data(10), batch_size=32, steps=1)
    with pytest.raises(UserInputError, match="steps"):
        Loop(model, SMALL, opt, _data(64), batch_size=32, steps=0)


def test_recording_does_not_import_the_natural_gradient_optimizer():
    code = "import sys, fisherlab.record; print('fisherlab.optim' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(" CPU ")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cpu:0x"):
        with pytest.raises(UserInputError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="no CUDA device"):
            resolve_device("cuda")


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write(path, "first")
    assert path.read_text() == "first" and oct(path.stat().st_mode & 0o777) == "0o644"

    def failing(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full (test)")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]
    atomic_write(path, lambda handle: handle.write("a,b\n"), text=True)
    assert path.read_text() == "a,b\n"
