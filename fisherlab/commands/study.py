"""``fisherlab study``: the main job — record (Adam) → analyze → plot, in one command
(:func:`fisherlab.study.study`, whose docstring gives the presets and the outputs)."""

from __future__ import annotations

import argparse

from fisherlab.commands.analyze import add_analysis_options, analysis_kwargs
from fisherlab.commands.record import add_model_arguments
from fisherlab.device import DEFAULT_DEVICE, DEVICE_HELP
from fisherlab.study import QUICK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``study``'s options to its sub-parser."""
    add_model_arguments(parser)
    parser.add_argument("--out", help="output directory (default: study-<problem>)")
    parser.add_argument("--full", action="store_true", help="the paper's settings: whole epochs, every 100 steps")
    parser.add_argument("--steps", type=int, help=f"Adam steps (default: {QUICK['steps']}; --full: the paper's epochs)")
    parser.add_argument("--every", type=int, help="record every K steps (default: 50; --full: 100)")
    parser.add_argument("--layers", help="layers to record: all, 5, or 1,5 (default: 5,6,7,8; --full, --model and "
                        "the built-in networks: all)")
    parser.add_argument("--fisher", default="mc", choices=("mc", "empirical", "exact"), help="Fisher type (default: mc)")
    parser.add_argument("--mc-samples", type=int, default=1, help="Monte-Carlo targets per example (default: 1)")
    parser.add_argument("--batch-size", type=int, help="default: the paper's")
    parser.add_argument("--lr", type=float, help="Adam's learning rate (default: 1e-3)")
    parser.add_argument("--dense-budget", default="0", help="also store dense blocks up to this size (default: 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="directory with the original data files")
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    parser.add_argument("--plot-layer", type=int, help="layer of the error and spectrum figures (default: 5)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="overwrite an existing study")
    mode.add_argument("--resume", action="store_true", help="continue an interrupted study")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_analysis_options(parser)


def run(args: argparse.Namespace) -> int:
    """Run the study ``args`` describes and print where its outputs are; 0 on success."""
    from fisherlab.study import study

    result = study(
        args.problem, args.out, full=args.full, steps=args.steps, every=args.every, layers=args.layers,
        fisher=args.fisher, mc_samples=args.mc_samples, batch_size=args.batch_size, lr=args.lr,
        dense_budget=args.dense_budget, seed=args.seed, data_dir=args.data_dir, device=args.device,
        plot_layer=args.plot_layer, force=args.force, resume=args.resume, progress=not args.quiet, say=print,
        analysis=analysis_kwargs(args), model=args.model, kfac=args.kfac, kfac_both=args.kfac_both,
    )
    print(f"run file: {result.run_file}\nerrors table: {result.table}\n"
          f"figures ({len(result.figures)}): {result.out / 'figures'}")
    return 0
