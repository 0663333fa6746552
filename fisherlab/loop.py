"""The one training loop: data order, epochs, evaluation, history, timing, checkpoints.

:class:`Loop` trains a model with any torch optimizer, on inputs with targets (a classifier,
a regression) or on inputs that are their own targets (the paper's auto-encoders); ``fisherlab train``
(:func:`fisherlab.training.train`) is this loop with an evaluation history, ``fisherlab
record`` (:func:`fisherlab.record.record`) is this loop with a :class:`Hook` that probes the
Fisher statistics and stores them.

Every step is ``optimizer.step(closure)``; the closure zeroes the gradients, runs the forward
pass (through the hook's :meth:`Hook.forward`), the loss (the batch mean of the per-example
negative log-likelihood, ``per_example_loss`` of the problem or likelihood) and the backward
pass; the natural-gradient optimizers run their extra backward pass inside it (an optimizer
with ``needs_targets`` set, the empirical Fisher's, also gets ``step(closure, targets=y)``).

Data order. The batches come from a generator seeded with ``seed``: one permutation of the
training set per epoch, the incomplete last batch dropped (every Fisher estimate uses the
same batch size). Step ``s`` (the state after ``s`` updates) lies in epoch ``s //
steps_per_epoch``.

History (when validation data are given). One row before training (epoch 0, step 0), one
after every ``log_every`` steps if asked, one at the end of every epoch and one at the end
of the run; with ``epoch_rows=False`` neither the first row nor the epochs' (each row costs a
pass over both sets, which a search that ranks runs by their final loss does not need).
``train_loss`` and ``val_loss`` are the losses of the whole training and validation sets at
that moment; ``batch_loss`` is the mean mini-batch loss since the previous row; ``seconds``
is the wall-clock time spent training (evaluation excluded, CUDA synchronised), so losses
can be drawn against time. A non-finite batch loss ends the run with a row and ``diverged``
set; so does a non-finite training loss in an epoch's row.

Checkpoints. With a :class:`Checkpoint`, the model, the optimizer, the batch generator and
the loop's counters are saved atomically after a history row, a step the hook asks for or
(with a history) an epoch, at most once per ``checkpoint_interval`` seconds, and at the end
of the run;
:meth:`Loop.load_state_dict` restores them and the run continues bit for bit as if it had
not stopped (on the same device; ``seconds`` excepted). The checkpoint is tied to the run's
settings: resuming with other settings is refused.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fisherlab.errors import UserInputError
from fisherlab.io import atomic_write
from fisherlab.likelihoods import Likelihood
from fisherlab.problems import Problem

#: Columns of ``history.csv``, in order.
COLUMNS = ("epoch", "step", "seconds", "train_loss", "val_loss", "batch_loss", "lr")

_CHECKPOINT_FORMAT = "fisherlab.checkpoint"


@dataclass
class History:
    """Rows of ``COLUMNS``; ``diverged`` is set when a loss stopped being finite."""

    rows: list[dict] = field(default_factory=list)
    diverged: bool = False

    def column(self, name: str) -> list[float]:
        """The values of one column, row by row."""
        return [row[name] for row in self.rows]

    def as_dict(self) -> dict[str, list[float]]:
        """``{column: values}``, the form :func:`fisherlab.plots.training.plot_histories` takes."""
        return {name: self.column(name) for name in COLUMNS}

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write the rows to ``path`` (atomically, so it is never torn)."""

        def write(handle) -> None:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)

        atomic_write(path, write, text=True)

    @classmethod
    def read_csv(cls, path: str | os.PathLike) -> History:
        """Read a ``history.csv`` written by :meth:`write_csv`.

        Raises:
            UserInputError: if the file lacks one of the columns.
        """
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = set(COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise UserInputError(f"{path} is not a training history: no column {', '.join(sorted(missing))}")
            rows = [{k: (int(row[k]) if k in ("epoch", "step") else float(row[k])) for k in COLUMNS} for row in reader]
        history = cls(rows)
        history.diverged = any(not math.isfinite(r["train_loss"]) for r in rows)
        return history


@torch.no_grad()
def evaluate(model: nn.Module, problem: Problem | Likelihood, data: Tensor, chunk: int = 4096,
             targets: Tensor | None = None) -> float:
    """Mean per-example loss of ``model`` on ``data`` with ``targets`` (default: the inputs, an auto-encoder)."""
    total = 0.0
    for start in range(0, data.shape[0], chunk):
        x = data[start : start + chunk]
        y = x if targets is None else targets[start : start + chunk]
        total += float(problem.per_example_loss(model(x), y).sum())
    return total / data.shape[0]


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """One epoch's batches: a permutation of ``range(n)`` cut into full batches."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]


class Hook:
    """What a :class:`Loop` calls at every step; the default methods do nothing extra."""

    def forward(self, model: nn.Module, x: Tensor, step: int, target: Tensor | None = None) -> Tensor:
        """The forward pass of step ``step`` (updates taken so far) on batch ``x``; ``target``,
        the batch's targets, is passed only where the data have targets of their own (not
        for an auto-encoder, whose targets are ``x``), so hooks written for auto-encoders work."""
        return model(x)

    def after_step(self, step: int, epoch: int, loss: float) -> bool:
        """Called after the update of step ``step`` (``epoch`` = completed epochs before it,
        ``loss`` = its batch loss); return True to ask for a checkpoint."""
        return False

    def postfix(self) -> dict:
        """Extra fields of the progress bar."""
        return {}


class Checkpoint:
    """The state to resume a run from: one file, written atomically, tied to the run's settings.

    Args:
        path: the checkpoint file.
        settings: everything that determines the run's numbers (JSON types); a checkpoint
            saved under other settings is refused.
    """

    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path = Path(path)
        self.settings_json = json.dumps(settings, sort_keys=True, default=str)

    def save(self, state: dict) -> None:
        """Write ``state`` with the settings (atomic replace)."""
        payload = {"format": _CHECKPOINT_FORMAT, "settings": self.settings_json, **state}
        atomic_write(self.path, lambda handle: torch.save(payload, handle))

    def load(self, device: torch.device | str = "cpu") -> dict | None:
        """The saved state, or None if there is no readable checkpoint.

        Raises:
            UserInputError: if the checkpoint was saved under other settings.
        """
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError):  # a damaged one: start over
            return None
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            return None
        if state["settings"] != self.settings_json:
            saved, wanted = json.loads(state["settings"]), json.loads(self.settings_json)
            keys = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
            raise UserInputError(f"cannot resume from {self.path}: it was saved with other settings ({', '.join(keys)})")
        return state

    def remove(self) -> None:
        """Delete the checkpoint file if there is one."""
        self.path.unlink(missing_ok=True)


class Loop:
    """Train ``model`` on ``train_data`` for ``steps`` optimizer steps (see the module docstring).

    Args:
        model: the network.
        problem: a :class:`~fisherlab.problems.Problem` or a likelihood: its
            ``per_example_loss(output, target)`` gives the loss (the batch mean).
        optimizer: any torch optimizer over the model's parameters.
        train_data: one example a row, on the model's device and in its dtype.
        train_targets, val_targets: the targets of ``train_data`` and ``val_data``, one a row
            (default: the inputs themselves, an auto-encoder).
        batch_size: examples per step.
        steps: optimizer steps in the run.
        seed: seed of the batch order.
        val_data: validation examples; given, the loop keeps a :class:`History`.
        log_every: also log a history row every this many steps (0: at epoch ends only).
        epoch_rows: log the rows before training and at every epoch's end (False: only at the
            run's end, every ``log_every`` steps, and where it diverges).
        hook: the per-step :class:`Hook`.
        checkpoint: where to save the state to resume from (None: no checkpoints).
        checkpoint_interval: least seconds between checkpoints, except the last one.
        on_row: called with the history after every new row (to save it as it grows).
        progress: show a tqdm progress bar.

    Raises:
        UserInputError: if a setting is invalid or the batch size exceeds the training set.
    """

    def __init__(
        self,
        model: nn.Module,
        problem: Problem | Likelihood,
        optimizer: torch.optim.Optimizer,
        train_data: Tensor,
        *,
        train_targets: Tensor | None = None,
        val_targets: Tensor | None = None,
        batch_size: int,
        steps: int,
        seed: int = 0,
        val_data: Tensor | None = None,
        log_every: int = 0,
        epoch_rows: bool = True,
        hook: Hook | None = None,
        checkpoint: Checkpoint | None = None,
        checkpoint_interval: float = 0.0,
        on_row: Callable[[History], None] | None = None,
        progress: bool = True,
    ):
        if steps < 1 or batch_size < 1 or log_every < 0:
            raise UserInputError(f"need steps >= 1, batch_size >= 1, log_every >= 0; got {steps}, {batch_size}, {log_every}")
        if batch_size > train_data.shape[0]:
            raise UserInputError(f"batch size {batch_size} exceeds the {train_data.shape[0]} training examples")
        self.model, self.problem, self.optimizer = model, problem, optimizer
        for name, targets, data in (("train", train_targets, train_data), ("validation", val_targets, val_data)):
            if targets is not None and (data is None or targets.shape[0] != data.shape[0]):
                raise UserInputError(f"the {name} targets must have one row per example")
        self.train_data, self.val_data = train_data, val_data
        self.train_targets, self.val_targets = train_targets, val_targets
        self.batch_size, self.steps, self.log_every, self.epoch_rows = batch_size, steps, log_every, epoch_rows
        self.steps_per_epoch = train_data.shape[0] // batch_size
        self.hook = hook or Hook()
        self.checkpoint, self.checkpoint_interval = checkpoint, checkpoint_interval
        self.on_row, self.progress = on_row, progress
        self.device = train_data.device
        self.generator = torch.Generator().manual_seed(seed)
        self.history = History()
        self.step = 0  # updates taken
        self.seconds = 0.0
        self._batch_losses: list[float] = []  # since the last history row
        self._last_loss: float | None = None
        self._stopped = False  # diverged: a non-finite batch loss, or training loss at an epoch's end
        # The generator's state at the start of the current epoch: the rest of the epoch's
        # batch order follows from it, so it is what a checkpoint keeps.
        self._epoch_rng = self.generator.get_state()

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Model, optimizer, batch generator and counters: everything :meth:`load_state_dict` needs."""
        at_epoch_end = self.step % self.steps_per_epoch == 0
        return {
            "step": self.step,
            "seconds": self.seconds,
            "batch_losses": list(self._batch_losses),
            "rows": [dict(row) for row in self.history.rows],
            "diverged": self.history.diverged,
            "stopped": self._stopped,
            "epoch_rng": self.generator.get_state() if at_epoch_end else self._epoch_rng,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (or a :class:`Checkpoint`'s state)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["epoch_rng"].cpu())
        self._epoch_rng = self.generator.get_state()
        self.step = int(state["step"])
        self.seconds = float(state["seconds"])
        self._batch_losses = [float(v) for v in state["batch_losses"]]
        self.history = History([dict(row) for row in state["rows"]], bool(state["diverged"]))
        self._stopped = bool(state["stopped"])

    def save_checkpoint(self) -> None:
        """Save :meth:`state_dict` to the checkpoint (if the loop has one)."""
        if self.checkpoint is not None:
            self.checkpoint.save(self.state_dict())

    # -- the run -------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> History:
        """Train up to step ``steps`` (or ``stop_at``, then checkpoint: a deliberate pause).

        Returns:
            The history (empty without validation data).
        """
        from tqdm import tqdm

        end = self.steps if stop_at is None else min(stop_at, self.steps)
        keeps_history = self.val_data is not None
        if keeps_history and self.epoch_rows and self.step == 0 and not self.history.rows:
            self._log()
        bar = tqdm(total=self.steps, initial=min(self.step, self.steps), disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        last_checkpoint = time.monotonic()
        try:
            while self.step < end and not self._stopped:
                epoch = self.step // self.steps_per_epoch
                skip = self.step - epoch * self.steps_per_epoch
                self._epoch_rng = self.generator.get_state()
                for position, index in enumerate(batch_indices(self.train_data.shape[0], self.batch_size, self.generator)):
                    if position < skip:
                        continue
                    index = index.to(self.device)
                    x = self.train_data[index]
                    y = None if self.train_targets is None else self.train_targets[index]
                    asked = self._one_step(x, y, keeps_history)
                    logged = keeps_history and self._log_due()
                    bar.set_postfix(self._postfix(), refresh=False)
                    bar.update()
                    epoch_end = keeps_history and self.step % self.steps_per_epoch == 0  # also without its row
                    due = (asked or logged or epoch_end) and time.monotonic() - last_checkpoint >= self.checkpoint_interval
                    if self._stopped or self.step == end:
                        break
                    if due:
                        last_checkpoint = time.monotonic()
                        self.save_checkpoint()
            if keeps_history and end == self.steps and (not self.history.rows or self.history.rows[-1]["step"] != self.step):
                self._log()
            self.save_checkpoint()
        finally:
            bar.close()
        return self.history

    def _one_step(self, x: Tensor, y: Tensor | None, keeps_history: bool) -> bool:
        step, model, problem, optimizer = self.step, self.model, self.problem, self.optimizer

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            output = self.hook.forward(model, x, step) if y is None else self.hook.forward(model, x, step, y)
            loss = problem.per_example_loss(output, x if y is None else y).mean()
            loss.backward()
            return loss

        if keeps_history:  # the history's seconds are device time
            _sync(self.device)
        start = time.perf_counter()
        if getattr(optimizer, "needs_targets", False):
            loss = float(optimizer.step(closure, targets=x if y is None else y).detach())
        else:
            loss = float(optimizer.step(closure).detach())
        if keeps_history:
            _sync(self.device)
            self._batch_losses.append(loss)
        self.seconds += time.perf_counter() - start
        self.step += 1
        self._last_loss = loss
        return self.hook.after_step(step, step // self.steps_per_epoch, loss)

    def _log_due(self) -> bool:
        """Log the rows the step calls for; whether one was logged."""
        if not math.isfinite(self._last_loss):
            self._log()
            self.history.diverged = self._stopped = True
            return True
        logged = False
        if self.log_every and self.step % self.log_every == 0:
            self._log()
            logged = True
        if self.step % self.steps_per_epoch == 0:
            if self.epoch_rows and not logged:
                self._log()
                logged = True
            self._stopped = self.history.diverged
        return logged

    def _log(self) -> None:
        model = self.model
        modes = [(m, m.training) for m in model.modules()]  # restored as they were: eval-mode batch norm stays so
        model.eval()
        row = {
            "epoch": 0 if self.step == 0 else (self.step - 1) // self.steps_per_epoch + 1,
            "step": self.step,
            "seconds": self.seconds,
            "train_loss": evaluate(model, self.problem, self.train_data, targets=self.train_targets),
            "val_loss": evaluate(model, self.problem, self.val_data, targets=self.val_targets),
            "batch_loss": sum(self._batch_losses) / len(self._batch_losses) if self._batch_losses else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        for module, training in modes:
            module.train(training)
        self._batch_losses.clear()
        self.history.rows.append(row)
        self.history.diverged = not math.isfinite(row["train_loss"])
        if self.on_row is not None:
            self.on_row(self.history)

    def _postfix(self) -> dict:
        fields = dict(self.hook.postfix())
        if self.history.rows:
            fields.update(train=f"{self.history.rows[-1]['train_loss']:.4g}", val=f"{self.history.rows[-1]['val_loss']:.4g}")
        elif self._last_loss is not None:
            fields["loss"] = f"{self._last_loss:.4g}"
        return fields


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
