"""``fisherlab train``: train a built-in problem (``--problem``) or a user's model
(``--model FILE.py:FACTORY``) and log its loss history.

Writes into ``--out DIR`` ``history.csv``, ``run.json`` and ``checkpoint.pt``
(:func:`fisherlab.training.run_training`); ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fisherlab.device import DEFAULT_DEVICE, DEVICE_HELP
from fisherlab.kron.shared import KFAC_FORMS
from fisherlab.likelihoods import FISHER_TYPES
from fisherlab.optim import KL_FORMS, PROFILES
from fisherlab.precondition import AVERAGES
from fisherlab.training import OPTIMIZERS


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
    """The options of ``fisherlab train``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--problem", help="a built-in problem: curves, mnist, faces, …")
    source.add_argument("--model", metavar="FILE.py:FACTORY",
                        help="FACTORY() returns (model, train_set[, validation_set], likelihood): an nn.Module, "
                             "data sets of (input, target) pairs and gaussian, bernoulli or categorical")
    parser.add_argument("--optimizer", required=True, choices=OPTIMIZERS)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate η")
    parser.add_argument("--damping", type=_positive_float, default=1e-3, help="Tikhonov damping λ (natural gradient)")
    parser.add_argument("--clip", type=_clip, default=1e-3, help="KL-clipping constant c, or 'none'")
    parser.add_argument("--profile", choices=tuple(PROFILES), default="fisherlab",
                        help="natural gradient: 'paper' is the paper's optimizer (appendix E KL clip, each factor "
                             "averaged); 'fisherlab' (default) averages the block and refits, with the same KL clip")
    parser.add_argument("--kl-form", choices=KL_FORMS, default=None,
                        help="KL clip: 'paper' ν = min(1, √(c/Σ|⟨Δ,∇⟩|)) or 'ba' (Ba et al., η² inside the sum); "
                             "default: the profile's (paper)")
    parser.add_argument("--t1", type=_positive_int, default=100, help="steps between statistics updates T₁")
    parser.add_argument("--t2", type=_positive_int, default=100, help="steps between inverse updates T₂")
    parser.add_argument("--momentum", type=float, default=None, help="default: 0.9 for SGD, 0 otherwise")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--average", choices=AVERAGES, default=None,
                        help="moving average of the block or of each factor; default: the profile's")
    parser.add_argument("--mc-samples", type=_positive_int, default=1, help="targets drawn per input (k)")
    parser.add_argument("--fisher", choices=FISHER_TYPES, default="mc",
                        help="natural gradient's Fisher: mc (targets drawn from the model), empirical (the data's "
                             "targets) or exact (one backward pass per column of the loss Hessian's square root)")
    parser.add_argument("--kfac-form", choices=KFAC_FORMS, default="expand",
                        help="KFAC of weight-sharing layers (convolutions, Linear on sequences): expand "
                             "(Grosse & Martens) or reduce (Eschenhagen et al.)")
    parser.add_argument("--stats-batch", type=_positive_int, default=None,
                        help="curvature statistics from the first N rows of each batch (the authors' code: B/4); "
                             "default: the whole batch")
    parser.add_argument("--fit-tol", type=_positive_float, default=None,
                        help="tolerance of the optimizer's iterative fits (not kfac); default: the method's")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="default: the paper's for the problem, 64 for a --model")
    parser.add_argument("--train-subset", type=_positive_int, default=None, help="use only the first N training examples")
    parser.add_argument("--log-every", type=int, default=0, help="also log every N steps (0: per epoch only)")
    parser.add_argument("--no-epoch-rows", dest="epoch_rows", action="store_false",
                        help="no history row before training or at the epochs' ends, only at the run's end: each "
                             "row is a pass over the training and validation sets, which a search that ranks "
                             "runs by their final loss does not need")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="overwrite a finished run in --out")
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its checkpoint (the same settings; --epochs may grow)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Train the run ``args`` describes; 0 on success (also for a run that diverged)."""
    from fisherlab.training import run_training

    try:
        result = run_training(
            args.problem, args.optimizer, args.out, model=args.model, fisher=args.fisher, kfac_form=args.kfac_form,
            epochs=args.epochs, lr=args.lr, damping=args.damping,
            clip=args.clip, t1=args.t1, t2=args.t2, momentum=args.momentum, weight_decay=args.weight_decay,
            average=args.average, mc_samples=args.mc_samples, profile=args.profile, kl_form=args.kl_form,
            stats_batch=args.stats_batch, fit_tol=args.fit_tol, batch_size=args.batch_size,
            train_subset=args.train_subset, log_every=args.log_every, epoch_rows=args.epoch_rows, seed=args.seed,
            device=args.device, dtype=args.dtype, data_dir=args.data_dir,
            cache_dir=args.cache_dir, force=args.force, resume=args.resume, progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"fisherlab train: interrupted; run the same command with --resume to continue from {args.out}",
              file=sys.stderr)
        return 130
    final = result.history.rows[-1]
    status = "diverged" if result.history.diverged else "done"
    print(
        f"{status}: {args.optimizer} on {args.problem or args.model}, epoch {final['epoch']}, "
        f"train {final['train_loss']:.4f}, val {final['val_loss']:.4f}, {final['seconds']:.1f} s "
        f"-> {result.out / 'history.csv'}"
    )
    return 0
