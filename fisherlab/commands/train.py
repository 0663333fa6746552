"""``fisherlab train``: train a benchmark auto-encoder and log its loss history.

Writes into ``--out DIR``: ``history.csv`` (columns ``epoch, step, seconds, train_loss,
val_loss, batch_loss, lr``; see :mod:`fisherlab.training`) and ``run.json`` (every setting,
the data set's provenance, the optimizer's diagnostics, whether the run diverged). While the
run goes, the rows are kept in ``history.partial.csv``; ``history.csv`` appears only when the
run has finished, so a killed run never looks complete.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fisherlab import __version__
from fisherlab.errors import UserInputError
from fisherlab.io import atomic_write
from fisherlab.optim import AVERAGES, NaturalGradient
from fisherlab.training import OPTIMIZERS, build_optimizer, train

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _clip(text: str) -> float | None:
    return None if text.lower() == "none" else _positive_float(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", required=True, help="curves, mnist or faces")
    parser.add_argument("--optimizer", required=True, choices=OPTIMIZERS)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate η")
    parser.add_argument("--damping", type=_positive_float, default=1e-3, help="Tikhonov damping λ (natural gradient)")
    parser.add_argument("--clip", type=_clip, default=1e-3, help="KL-clipping constant c, or 'none'")
    parser.add_argument("--t1", type=_positive_int, default=100, help="steps between statistics updates T₁")
    parser.add_argument("--t2", type=_positive_int, default=100, help="steps between inverse updates T₂")
    parser.add_argument("--momentum", type=float, default=None, help="default: 0.9 for SGD, 0 otherwise")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--average", choices=AVERAGES, default="block", help="moving average of the block or of each factor")
    parser.add_argument("--mc-samples", type=_positive_int, default=1, help="targets drawn per input (k)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="default: the paper's for the problem")
    parser.add_argument("--train-subset", type=_positive_int, default=None, help="use only the first N training examples")
    parser.add_argument("--log-every", type=int, default=0, help="also log every N steps (0: per epoch only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--force", action="store_true", help="overwrite a finished run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from fisherlab.data import load_dataset
    from fisherlab.problems import get_problem

    problem = get_problem(args.problem)
    if problem.dataset is None:
        raise UserInputError(f"problem {problem.name!r} has no data set; use curves, mnist or faces")
    if args.log_every < 0:
        raise UserInputError(f"--log-every must be nonnegative, got {args.log_every}")
    out: Path = args.out
    if (out / "history.csv").exists() and not args.force:
        raise UserInputError(f"{out / 'history.csv'} exists; pass --force to overwrite it")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserInputError(f"device {args.device!r} is not available ({exc})") from None

    dataset = load_dataset(problem.dataset, args.data_dir, args.cache_dir)
    dtype = DTYPES[args.dtype]
    train_data = dataset.train if args.train_subset is None else dataset.train[: args.train_subset]
    train_data = train_data.to(device=device, dtype=dtype)
    val_data = dataset.val.to(device=device, dtype=dtype)
    batch_size = args.batch_size or problem.batch_size

    torch.manual_seed(args.seed)
    model = problem.build_model(seed=args.seed, dtype=dtype, device=device)
    optimizer = build_optimizer(
        args.optimizer,
        model,
        problem,
        lr=args.lr,
        damping=args.damping,
        clip=args.clip,
        t1=args.t1,
        t2=args.t2,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        average=args.average,
        mc_samples=args.mc_samples,
        seed=args.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.csv").unlink(missing_ok=True)
    partial = out / "history.partial.csv"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    settings.update(problem=problem.name, batch_size=batch_size, n_train=int(train_data.shape[0]))
    record = {
        "fisherlab_version": __version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": settings,
        "dataset": dataset.meta,
    }
    history = train(
        model,
        problem,
        optimizer,
        train_data,
        val_data,
        epochs=args.epochs,
        batch_size=batch_size,
        seed=args.seed,
        log_every=args.log_every,
        progress=not args.no_progress,
        on_row=lambda h: h.write_csv(partial),
    )
    record["diverged"] = history.diverged
    record["final"] = history.rows[-1]
    if isinstance(optimizer, NaturalGradient):
        record["diagnostics"] = asdict(optimizer.diagnostics)
    atomic_write(out / "run.json", json.dumps(record, indent=1, default=str))
    history.write_csv(out / "history.csv")
    partial.unlink(missing_ok=True)
    final = history.rows[-1]
    status = "diverged" if history.diverged else "done"
    print(
        f"{status}: {args.optimizer} on {problem.name}, epoch {final['epoch']}, train {final['train_loss']:.4f}, "
        f"val {final['val_loss']:.4f}, {final['seconds']:.1f} s -> {out / 'history.csv'}"
    )
    return 0
