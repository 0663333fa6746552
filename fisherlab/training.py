"""Training runs behind ``fisherlab train`` and Figure 2: the loop with a loss history, and its files.

:func:`train` runs :class:`fisherlab.loop.Loop` for whole epochs and returns the
:class:`~fisherlab.loop.History` (its rows are documented in :mod:`fisherlab.loop`).
:func:`run_training` is the whole command: it loads the data, builds the model and the
optimizer, trains, and writes into a directory. The model, data and likelihood come from a
problem name (:func:`fisherlab.problems.get_problem`) or from a user's ``FILE.py:FACTORY``
(:func:`fisherlab.problems.load_factory`); the rest of the run does not depend on which.

- ``history.csv``: the rows (columns :data:`~fisherlab.loop.COLUMNS`); while the run goes
  they are kept in ``history.partial.csv``, and ``history.csv`` appears only when the run
  has finished, so a killed run never looks complete;
- ``run.json``: every setting, the data set's provenance, the optimizer's diagnostics and
  whether the run diverged;
- ``checkpoint.pt``: the state to resume from, saved after every epoch and history row (see
  :class:`fisherlab.loop.Checkpoint`); ``resume=True`` continues from it, bit for bit, and
  a finished run can be extended to more epochs the same way.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fisherlab import __version__
from fisherlab.device import DEFAULT_DEVICE, resolve_device
from fisherlab.errors import UserInputError
from fisherlab.io import atomic_write
from fisherlab.likelihoods import FISHER_TYPES, Likelihood, get_likelihood
from fisherlab.loop import COLUMNS, Checkpoint, History, Loop, batch_indices, evaluate
from fisherlab.optimizers import build_optimizer, optimizer_names
from fisherlab.problems import Problem, Task, get_problem, get_task, load_factory

__all__ = [
    "COLUMNS",
    "DTYPES",
    "OPTIMIZERS",
    "History",
    "TrainingRun",
    "batch_indices",
    "build_optimizer",
    "evaluate",
    "run_training",
    "train",
]

#: Optimizers by name: the two baselines and the paper's five natural-gradient presets.
OPTIMIZERS = optimizer_names()
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: File names inside a run directory.
HISTORY, PARTIAL, RUN_JSON, CHECKPOINT = "history.csv", "history.partial.csv", "run.json", "checkpoint.pt"
# Settings that do not change a run's numbers: a resume may change them.
_RESUMABLE = {"epochs", "epoch_rows", "out", "data_dir", "cache_dir"}


def train(
    model: nn.Module,
    problem: Problem | Likelihood,
    optimizer: torch.optim.Optimizer,
    train_data: Tensor,
    val_data: Tensor,
    *,
    train_targets: Tensor | None = None,
    val_targets: Tensor | None = None,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    log_every: int = 0,
    epoch_rows: bool = True,
    progress: bool = True,
    on_row: Callable[[History], None] | None = None,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
    stop_at: int | None = None,
) -> History:
    """Train ``model`` for ``epochs`` epochs and return its loss history.

    Args:
        problem: a :class:`~fisherlab.problems.Problem` or a likelihood (its
            ``per_example_loss`` is the loss).
        train_data, val_data: one example a row, on the model's device and in its dtype.
        train_targets, val_targets: their targets, one a row (default: the inputs, an auto-encoder).
        epochs: passes over ``train_data``.
        batch_size: examples per step (incomplete last batches are dropped).
        seed: seed of the shuffling.
        log_every: also log every this many steps (0: at epoch ends only).
        epoch_rows: log a row before training and at every epoch's end (False: at the end only).
        progress: show a tqdm progress bar.
        on_row: called with the history after every new row (to save it as it grows).
        checkpoint: where to save the state after every epoch and row, and at the end.
        resume: continue from ``checkpoint`` where it holds a state.
        stop_at: pause after this many steps (a checkpoint is saved; resume continues).

    Raises:
        UserInputError: if the batch size exceeds the training set, a setting is invalid,
            or the checkpoint was saved with other settings.
    """
    if epochs < 1 or batch_size < 1:
        raise UserInputError(f"need epochs >= 1 and batch_size >= 1; got {epochs}, {batch_size}")
    if batch_size > train_data.shape[0]:
        raise UserInputError(f"batch size {batch_size} exceeds the {train_data.shape[0]} training examples")
    loop = Loop(model, problem, optimizer, train_data, train_targets=train_targets, val_targets=val_targets,
                batch_size=batch_size,
                steps=epochs * (train_data.shape[0] // batch_size), seed=seed, val_data=val_data,
                log_every=log_every, epoch_rows=epoch_rows, checkpoint=checkpoint, on_row=on_row, progress=progress)
    if resume and checkpoint is not None:
        state = _resumable(checkpoint, train_data.device, loop.steps, epochs)
        if state is not None:
            loop.load_state_dict(state)
    return loop.run(stop_at)


def _resumable(checkpoint: Checkpoint, device: torch.device, steps: int, epochs: int) -> dict | None:
    """The checkpoint's state if a run of ``steps`` steps can continue from it.

    Raises:
        UserInputError: if it was saved with other settings or is past ``steps``.
    """
    state = checkpoint.load(device)
    if state is not None and state["step"] > steps:
        raise UserInputError(
            f"cannot resume from {checkpoint.path}: it is at step {state['step']}, past the {steps} steps of {epochs} epochs"
        )
    return state


@dataclass
class TrainingRun:
    """What :func:`run_training` did: the history, the directory and the ``run.json`` record."""

    history: History
    out: Path
    record: dict


@dataclass
class _Task:
    """What a run trains: the model (built on demand), its likelihood and its data."""

    name: str
    build: Callable[[], nn.Module]
    likelihood: Problem | Likelihood
    train: Tensor
    val: Tensor
    train_targets: Tensor | None
    val_targets: Tensor | None
    batch_size: int
    provenance: dict
    meta: dict


def _problem_task(name: str, data_dir, cache_dir, train_subset: int | None, dev: torch.device,
                  dtype: torch.dtype, seed: int) -> _Task:
    """A built-in problem: ``build_model``, ``dataset``, ``batch_size``; a ``likelihood`` name if it
    has one (else the problem is its own, as the paper's auto-encoders); the data set's
    ``train_targets``/``val_targets`` if it has them (else the inputs are the targets)."""
    from fisherlab.data import load_dataset

    prob = get_problem(name)
    if prob.dataset is None:
        raise UserInputError(f"problem {prob.name!r} has no data set; use curves, mnist or faces")
    likelihood = getattr(prob, "likelihood", None)
    likelihood = get_likelihood(likelihood) if isinstance(likelihood, str) else prob
    dataset = load_dataset(prob.dataset, data_dir, cache_dir)
    subset = slice(None) if train_subset is None else slice(train_subset)
    targets = [getattr(dataset, key, None) for key in ("train_targets", "val_targets")]
    train_y, val_y = (None if t is None else _to(t, dev, dtype) for t in targets)

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return prob.build_model(seed=seed, dtype=dtype, device=dev)

    return _Task(prob.name, build, likelihood, dataset.train[subset].to(device=dev, dtype=dtype),
                 dataset.val.to(device=dev, dtype=dtype), None if train_y is None else train_y[subset], val_y,
                 prob.batch_size, dataset.provenance(), dataset.meta)


def _network_task(task: Task, train_subset: int | None, dev: torch.device, dtype: torch.dtype) -> _Task:
    """A network of any architecture with its data (:class:`fisherlab.problems.Task`: a user's
    ``FILE.py:FACTORY`` or a built-in such as ``mnist-cnn``), already checked and seeded."""
    model = task.model.to(device=dev, dtype=dtype)
    train_x, train_y = task.train_inputs, task.train_targets
    if task.val_inputs is None:  # the history then reports the training loss twice
        val_x, val_y = train_x, train_y
    else:
        val_x, val_y = task.val_inputs, task.val_targets
    if train_subset is not None:
        train_x, train_y = train_x[:train_subset], train_y[:train_subset]
    train_x, train_y, val_x, val_y = (_to(t, dev, dtype) for t in (train_x, train_y, val_x, val_y))
    batch_size = min(task.batch_size, train_x.shape[0])
    provenance = {"model": task.name, "n_train": int(train_x.shape[0]), "n_val": int(val_x.shape[0])}
    meta = {**task.meta, "likelihood": task.likelihood,
            "validation": "the training set" if task.val_inputs is None else "given"}
    return _Task(task.name, lambda: model, get_likelihood(task.likelihood), train_x, val_x, train_y, val_y,
                 batch_size, provenance, meta)


def _to(t: Tensor, dev: torch.device, dtype: torch.dtype) -> Tensor:
    """``t`` on ``dev``; floating point in ``dtype``, integers (class labels) as they are."""
    return t.to(device=dev, dtype=dtype) if t.is_floating_point() else t.to(device=dev)


def run_training(
    problem: str | None,
    optimizer: str,
    out: str | Path,
    *,
    model: str | None = None,
    fisher: str = "mc",
    kfac_form: str = "expand",
    epochs: int = 10,
    lr: float = 1e-3,
    damping: float = 1e-3,
    clip: float | None = 1e-3,
    t1: int = 100,
    t2: int = 100,
    momentum: float | None = None,
    weight_decay: float = 0.0,
    average: str | None = None,
    mc_samples: int = 1,
    profile: str = "fisherlab",
    kl_form: str | None = None,
    stats_batch: int | None = None,
    fit_tol: float | None = None,
    batch_size: int | None = None,
    train_subset: int | None = None,
    log_every: int = 0,
    epoch_rows: bool = True,
    seed: int = 0,
    device: str = DEFAULT_DEVICE,
    dtype: str = "float32",
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> TrainingRun:
    """Train a model and write its files into ``out`` (module docstring).

    Args:
        problem: a built-in problem (``curves``, ``mnist``, ``faces``, …), or None with ``model``.
        optimizer: a name of :data:`OPTIMIZERS`; ``lr`` … ``fit_tol``, ``fisher`` and
            ``kfac_form`` go to :func:`build_optimizer` (``average`` and ``kl_form`` default
            to the profile's).
        out: the run directory (created if missing).
        model: ``FILE.py:FACTORY`` (:func:`fisherlab.problems.load_factory`) instead of ``problem``; without a
            validation set the history's validation loss is the training set's.
        fisher: the natural gradient's Fisher type, ``mc``, ``empirical`` or ``exact``.
        kfac_form: KFAC of the shared-weight layers, ``expand`` or ``reduce``.
        epochs: passes over the training set.
        batch_size: default: the paper's for the problem, 64 (or the training set) for a factory.
        train_subset: use only the first N training examples.
        log_every: also log every N steps (0: per epoch only).
        epoch_rows: log a row before training and after every epoch (False: at the end only).
        seed: seed of the weights, the batch order and the Monte-Carlo targets.
        device: see :func:`fisherlab.device.resolve_device`.
        dtype: ``float32`` or ``float64``.
        data_dir, cache_dir: see :func:`fisherlab.data.load_dataset`.
        force: overwrite a finished run in ``out``.
        resume: continue the run in ``out`` from its checkpoint (start it if there is none).
        progress: show a progress bar.

    Raises:
        UserInputError: for invalid settings, a factory that fails or returns the wrong kind of
            thing, targets that do not fit the likelihood, a finished run in ``out`` without
            ``force`` or ``resume``, or a checkpoint saved with other settings; nothing is
            changed on disk then.
    """
    if (problem is None) == (model is None):
        raise UserInputError("give one of a problem name and a model factory (FILE.py:FACTORY)")
    if optimizer not in OPTIMIZERS:
        raise UserInputError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if fisher not in FISHER_TYPES:
        raise UserInputError(f"unknown Fisher type {fisher!r}; choose from {', '.join(FISHER_TYPES)}")
    if log_every < 0:
        raise UserInputError(f"log_every must be nonnegative, got {log_every}")
    if force and resume:
        raise UserInputError("choose one of force (overwrite) and resume (continue)")
    from fisherlab.optim import PROFILES

    if profile not in PROFILES:
        raise UserInputError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    average = PROFILES[profile]["average"] if average is None else average
    kl_form = PROFILES[profile]["kl_form"] if kl_form is None else kl_form
    out = Path(out)
    if (out / HISTORY).exists() and not (force or resume):
        raise UserInputError(f"{out / HISTORY} exists; pass --force to overwrite it or --resume to continue it")
    dev = resolve_device(device)
    torch_dtype = DTYPES[dtype]
    if model is not None:
        task = _network_task(load_factory(model, seed), train_subset, dev, torch_dtype)
    elif get_task(problem) is not None:
        task = _network_task(get_task(problem)(seed, data_dir), train_subset, dev, torch_dtype)
    else:
        task = _problem_task(problem, data_dir, cache_dir, train_subset, dev, torch_dtype, seed)
    train_data, val_data = task.train, task.val
    batch_size = batch_size or task.batch_size
    if stats_batch is not None and stats_batch > batch_size:
        raise UserInputError(f"the statistics batch {stats_batch} exceeds the batch size {batch_size}")

    settings = {
        "problem": None if model is not None else task.name, "optimizer": optimizer, "out": str(out),
        "epochs": epochs, "lr": lr,
        "damping": damping, "clip": clip, "t1": t1, "t2": t2, "momentum": momentum, "weight_decay": weight_decay,
        "average": average, "mc_samples": mc_samples, "profile": profile, "kl_form": kl_form,
        "stats_batch": stats_batch, "fit_tol": fit_tol, "batch_size": batch_size, "train_subset": train_subset,
        "log_every": log_every, "epoch_rows": epoch_rows, "seed": seed, "device": str(dev), "dtype": dtype,
        "data_dir": None if data_dir is None else str(data_dir),
        "cache_dir": None if cache_dir is None else str(cache_dir), "n_train": int(train_data.shape[0]),
    }
    # Only where they differ from the defaults: the checkpoints of earlier runs stay resumable.
    settings.update({k: v for k, v, default in (("model", model, None), ("fisher", fisher, "mc"),
                                                ("kfac_form", kfac_form, "expand")) if v != default})
    checkpoint = Checkpoint(
        out / CHECKPOINT,
        {**{k: v for k, v in settings.items() if k not in _RESUMABLE}, "dataset": task.provenance},
    )
    if resume:  # refuse other settings or fewer epochs before anything is changed
        _resumable(checkpoint, dev, epochs * (train_data.shape[0] // batch_size), epochs)
    if batch_size > train_data.shape[0]:
        raise UserInputError(f"batch size {batch_size} exceeds the {train_data.shape[0]} training examples")

    net = task.build()
    opt = build_optimizer(optimizer, net, task.likelihood, lr=lr, damping=damping, clip=clip, t1=t1, t2=t2,
                          momentum=momentum, weight_decay=weight_decay, average=average, mc_samples=mc_samples,
                          seed=seed, profile=profile, kl_form=kl_form, stats_batch=stats_batch, fit_tol=fit_tol,
                          fisher=fisher, kfac_form=kfac_form)
    out.mkdir(parents=True, exist_ok=True)
    (out / HISTORY).unlink(missing_ok=True)
    if force:
        checkpoint.remove()
    partial = out / PARTIAL
    record = {
        "fisherlab_version": __version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": settings,
        "dataset": task.meta,
    }
    history = train(net, task.likelihood, opt, train_data, val_data, train_targets=task.train_targets,
                    val_targets=task.val_targets, epochs=epochs, batch_size=batch_size, seed=seed,
                    log_every=log_every, epoch_rows=epoch_rows, progress=progress, on_row=lambda h: h.write_csv(partial),
                    checkpoint=checkpoint, resume=resume)
    diagnostics = getattr(opt, "diagnostics", None)
    record.update(diverged=history.diverged, final=history.rows[-1])
    if is_dataclass(diagnostics):
        record["diagnostics"] = asdict(diagnostics)
    atomic_write(out / RUN_JSON, json.dumps(record, indent=1, default=str))
    history.write_csv(out / HISTORY)
    partial.unlink(missing_ok=True)
    return TrainingRun(history, out, record)
