"""The training loop behind ``fisherlab train`` and Figure 2: optimizers by name, a loss history.

Every optimizer takes the same step, ``optimizer.step(closure)`` with a closure that runs the
forward pass, the auto-encoder loss (the batch mean of the per-example negative
log-likelihood, :meth:`fisherlab.problems.Problem.loss`) and the backward pass; the
natural-gradient optimizers run their extra backward pass inside it.

The history has one row before training (epoch 0, step 0), one after every ``log_every``
steps if asked, and one at the end of every epoch. ``train_loss`` and ``val_loss`` are the
losses of the whole training and validation sets at that moment; ``batch_loss`` is the mean
mini-batch loss since the previous row; ``seconds`` is the wall-clock time spent training
(evaluation excluded, CUDA synchronised), so losses can be drawn against time.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fisherlab.errors import UserInputError
from fisherlab.io import atomic_write
from fisherlab.optim import PRESETS, NaturalGradient
from fisherlab.problems import Problem

#: Optimizers by name: the two baselines and the paper's five natural-gradient presets.
OPTIMIZERS = ("sgd", "adam", *PRESETS)
#: Columns of ``history.csv``, in order.
COLUMNS = ("epoch", "step", "seconds", "train_loss", "val_loss", "batch_loss", "lr")
#: The paper's baselines (§4): SGD with momentum 0.9, Adam with betas (0.9, 0.999).
SGD_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)


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
        """Write the rows to ``path`` (via a temporary file, so it is never torn)."""

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


def build_optimizer(
    name: str,
    model: nn.Module,
    problem: Problem,
    *,
    lr: float,
    damping: float = 1e-3,
    clip: float | None = 1e-3,
    t1: int = 100,
    t2: int = 100,
    momentum: float | None = None,
    weight_decay: float = 0.0,
    average: str = "block",
    mc_samples: int = 1,
    seed: int = 0,
    fit_options: dict | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over all of ``model``'s parameters.

    ``damping``, ``clip`` (KL-clipping c, None for none), ``t1``, ``t2``, ``average``,
    ``mc_samples`` and ``fit_options`` apply to the natural-gradient optimizers only.
    ``momentum`` defaults to 0.9 for SGD and 0 for the natural-gradient optimizers (the
    paper's settings); Adam uses betas (0.9, 0.999).

    Raises:
        UserInputError: for an unknown name or an invalid setting.
    """
    try:
        if name == "sgd":
            mom = SGD_MOMENTUM if momentum is None else momentum
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=mom, weight_decay=weight_decay)
        if name == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay)
        if name in PRESETS:
            return NaturalGradient.from_preset(
                name,
                model,
                problem,
                lr=lr,
                damping=damping,
                kl_clip=clip,
                t_stats=t1,
                t_inv=t2,
                momentum=0.0 if momentum is None else momentum,
                weight_decay=weight_decay,
                average=average,
                mc_samples=mc_samples,
                fit_options=fit_options,
                seed=seed,
            )
    except ValueError as exc:
        raise UserInputError(f"{name}: {exc}") from exc
    raise UserInputError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def evaluate(model: nn.Module, problem: Problem, data: Tensor, chunk: int = 4096) -> float:
    """Mean per-example loss of the auto-encoder on ``data`` (targets = inputs)."""
    total = 0.0
    for start in range(0, data.shape[0], chunk):
        x = data[start : start + chunk]
        total += float(problem.per_example_loss(model(x), x).sum())
    return total / data.shape[0]


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    # Incomplete last batches are dropped: every Fisher estimate uses the same batch size.
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]


def train(
    model: nn.Module,
    problem: Problem,
    optimizer: torch.optim.Optimizer,
    train_data: Tensor,
    val_data: Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    log_every: int = 0,
    progress: bool = True,
    on_row: Callable[[History], None] | None = None,
) -> History:
    """Train the auto-encoder ``model`` and return its loss history.

    Args:
        train_data, val_data: one example a row, on the model's device and in its dtype.
        epochs: passes over ``train_data``.
        batch_size: examples per step (incomplete last batches are dropped).
        seed: seed of the shuffling.
        log_every: also log every this many steps (0: at epoch ends only).
        progress: show a tqdm progress bar.
        on_row: called with the history after every new row (to save it as it grows).

    Raises:
        UserInputError: if the batch size exceeds the training set or a setting is invalid.
    """
    if epochs < 1 or batch_size < 1 or log_every < 0:
        raise UserInputError(f"need epochs >= 1, batch_size >= 1, log_every >= 0; got {epochs}, {batch_size}, {log_every}")
    if batch_size > train_data.shape[0]:
        raise UserInputError(f"batch size {batch_size} exceeds the {train_data.shape[0]} training examples")
    from tqdm import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    history = History()
    seconds, step, batch_losses = 0.0, 0, []

    def log(epoch: int) -> None:
        model.eval()
        row = {
            "epoch": epoch,
            "step": step,
            "seconds": seconds,
            "train_loss": evaluate(model, problem, train_data),
            "val_loss": evaluate(model, problem, val_data),
            "batch_loss": sum(batch_losses) / len(batch_losses) if batch_losses else float("nan"),
            "lr": optimizer.param_groups[0]["lr"],
        }
        model.train()
        batch_losses.clear()
        history.rows.append(row)
        history.diverged = not math.isfinite(row["train_loss"])
        if on_row is not None:
            on_row(history)

    log(0)
    steps_per_epoch = train_data.shape[0] // batch_size
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step", dynamic_ncols=True)
    try:
        for epoch in range(1, epochs + 1):
            for index in batch_indices(train_data.shape[0], batch_size, generator):
                x = train_data[index.to(device)]

                def closure(x: Tensor = x) -> Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    loss = problem.loss(model(x), x)
                    loss.backward()
                    return loss

                _sync(device)
                start = time.perf_counter()
                loss = optimizer.step(closure)
                _sync(device)
                seconds += time.perf_counter() - start
                step += 1
                batch_losses.append(float(loss.detach()))
                bar.update()
                if not math.isfinite(batch_losses[-1]):
                    log(epoch)
                    history.diverged = True
                    return history
                if log_every and step % log_every == 0:
                    log(epoch)
                    bar.set_postfix(train=f"{history.rows[-1]['train_loss']:.4g}", val=f"{history.rows[-1]['val_loss']:.4g}")
            if not (log_every and step % log_every == 0):
                log(epoch)
            bar.set_postfix(train=f"{history.rows[-1]['train_loss']:.4g}", val=f"{history.rows[-1]['val_loss']:.4g}")
            if history.diverged:
                return history
    finally:
        bar.close()
    return history


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

