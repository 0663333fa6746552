"""``fisherlab record``: train a network and record its per-layer exact Fisher blocks.

Examples::

    fisherlab record --problem curves --steps 2000 --every 50 --layers 5 --out curves.h5
    fisherlab record --model examples/small_cnn.py:build --steps 100 --every 20 --out cnn.h5

Defaults follow the paper's Fisher-quality runs: Adam with learning rate 1e-3, the
problem's batch size and number of epochs, the Monte-Carlo Fisher with one draw per
example, every layer. Interrupted with Ctrl-C, the file keeps every completed step; run
the same command with ``--resume`` to continue it.
"""

from __future__ import annotations

import argparse
import sys

from fisherlab.device import DEFAULT_DEVICE, DEVICE_HELP
from fisherlab.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``record``'s options to its sub-parser."""
    from fisherlab.record import DEFAULT_EVERY, OPTIMIZERS
    from fisherlab.store import COMPRESSIONS, DEFAULT_COMPRESSION, DEFAULT_DENSE_BUDGET

    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="the HDF5 run file to write")
    parser.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="default: adam (betas 0.9, 0.999)")
    parser.add_argument("--lr", type=float, help="learning rate (default: 1e-3 for Adam, the paper's)")
    parser.add_argument("--batch-size", type=int, help="default: the paper's (CURVES 256, MNIST 512, FACES 1024); "
                        "mnist-cnn and mnist-cnn-ae 512, --model and layer sizes 64")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="default: the paper's (CURVES 40, MNIST 26, FACES 32); otherwise 10")
    length.add_argument("--steps", type=int, help="optimizer steps to run instead of whole epochs")
    parser.add_argument(
        "--every",
        type=int,
        default=DEFAULT_EVERY,
        help=f"record at step 0 and every K steps (default: {DEFAULT_EVERY})",
    )
    parser.add_argument("--layers", default="all", help="all, one index (5) or a list (1,5); 1-based (default: all)")
    parser.add_argument(
        "--fisher",
        default="mc",
        choices=("mc", "empirical", "exact"),
        help="targets drawn from the model (mc, the paper's), the data's (empirical), or exact: the loss "
        "Hessian's square root, one backward pass per output unit (default: mc)",
    )
    parser.add_argument(
        "--mc-samples", type=int, default=1, help="target draws per example for --fisher mc (default: 1)"
    )
    parser.add_argument(
        "--dense-budget",
        default=str(DEFAULT_DENSE_BUDGET),
        help="largest dense block stored, bytes of float32, e.g. 0, 500MB, 1GiB (default: 1GiB)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights, batch order and Monte-Carlo targets (default: 0)"
    )
    parser.add_argument(
        "--compression",
        default=DEFAULT_COMPRESSION,
        choices=list(COMPRESSIONS),
        help=(
            "HDF5 compression: lzf (read by plain h5py without plugins), gzip (read by every HDF5 tool; "
            "slowest), lz4 (a little faster than lzf) or zstd (as small as gzip), both needing the hdf5plugin "
            "package in every reader, or none (default: %(default)s)"
        ),
    )
    parser.add_argument("--data-dir", help="directory with the original data files (default: $FISHERLAB_DATA_DIR)")
    parser.add_argument("--cache-dir", help="cache of regenerated data sets (default: $FISHERLAB_CACHE_DIR)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="overwrite an existing run file")
    mode.add_argument("--resume", action="store_true", help="continue an existing run file from its last checkpoint")
    parser.add_argument("--linear-code", action="store_true",
                        help="no ReLU after the narrowest hidden layer (Hinton & Salakhutdinov); default: ReLU everywhere")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--problem``, ``--model`` and ``--kfac``: what is trained (shared by ``record`` and ``study``)."""
    from fisherlab.problems import TASKS

    builtins = ", ".join(TASKS)
    parser.add_argument(
        "--problem", default="curves",
        help=f"curves, mnist, faces, {builtins + ', ' if builtins else ''}or layer sizes such as 20-10-20 "
        "(default: curves)",
    )
    parser.add_argument(
        "--model", metavar="FILE.py:FACTORY",
        help="your own network instead of --problem: FACTORY() returns (model, train_set, likelihood) or "
        "(model, train_set, validation_set, likelihood), the sets yielding (input, target) pairs and the "
        "likelihood one of gaussian, bernoulli, categorical",
    )
    parser.add_argument(
        "--kfac", default="expand", choices=("expand", "reduce"),
        help="KFAC form of weight-sharing layers (convolutions): expand (Grosse & Martens) or reduce "
        "(Eschenhagen et al.) (default: expand)",
    )
    parser.add_argument(
        "--kfac-both", action="store_true", default=None,
        help="also store the other KFAC form, which analyze reports as a kfac_reduce or kfac_expand row; "
        "always so with --kfac expand (reduce's factors cost little there), optional with --kfac reduce "
        "(on LeNet-5 a captured step then costs about 4.8 Adam steps instead of 2.8)",
    )


def run(args: argparse.Namespace) -> int:
    """Record the run ``args`` describes; 0 on success, 130 when interrupted."""
    from fisherlab.record import checkpoint_path, record

    try:
        path = record(
            args.problem,
            args.out,
            optimizer=args.optimizer,
            lr=args.lr,
            batch_size=args.batch_size,
            epochs=args.epochs,
            steps=args.steps,
            every=args.every,
            layers=args.layers,
            fisher=args.fisher,
            mc_samples=args.mc_samples,
            dense_budget=args.dense_budget,
            seed=args.seed,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            device=args.device,
            force=args.force,
            resume=args.resume,
            compression=args.compression,
            linear_code=args.linear_code,
            progress=not args.no_progress,
            model=args.model,
            kfac=args.kfac,
            kfac_both=args.kfac_both,
        )
    except KeyboardInterrupt:
        print(f"fisherlab record: interrupted; {_kept(args.out)}", file=sys.stderr)
        return 130
    print(f"wrote {path} (resume state: {checkpoint_path(path)})")
    return 0


def _kept(out: str) -> str:
    """What an interrupted run left behind, and how to continue it."""
    from fisherlab.store import RunReader

    try:
        with RunReader(out) as reader:
            steps = reader.steps()
    except UserInputError:
        steps = []
    if not steps:
        return "no step was recorded; nothing was kept"
    return (
        f"{out} keeps {len(steps)} recorded steps (last: {steps[-1]}); run the same command with --resume to continue"
    )
