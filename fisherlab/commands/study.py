"""``fisherlab study``: the main job — record (Adam) → analyze → plot, in one command.

The defaults finish in a few minutes on two CPU cores: CURVES, 300 Adam steps, the Fisher
blocks of the four middle layers (5–8: the paper's layer 5, the code layer's two, and
layer 8) recorded every 50 steps (statistics only, no dense blocks: the analysis is
matrix-free), all methods, exact Error 1 and Error 2. ``--layers all`` adds the outer
layers (p up to 314,000), whose exact Error 2 takes minutes per block on a CPU
(``--error2-rtol`` trades exactness for time). ``--full`` runs the paper's setting instead
(every epoch of the problem, every layer, recorded every 100 steps; a GPU job for MNIST and
FACES). The outputs go into ``--out DIR``: ``run.h5``, ``errors.csv``
and ``figures/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fisherlab.commands.analyze import add_analysis_options, analysis_kwargs
from fisherlab.device import DEFAULT_DEVICE, DEVICE_HELP, resolve_device
from fisherlab.errors import UserInputError

#: The quick default (a few minutes on two cores) and the paper's setting.
QUICK = {"steps": 300, "every": 50, "layers": "5,6,7,8"}
FULL = {"steps": None, "every": 100, "layers": "all"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", default="curves", help="curves, mnist, faces, or layer sizes such as 20-10-20")
    parser.add_argument("--out", help="output directory (default: study-<problem>)")
    parser.add_argument("--full", action="store_true", help="the paper's settings: whole epochs, every 100 steps")
    parser.add_argument("--steps", type=int, help=f"Adam steps (default: {QUICK['steps']}; --full: the paper's epochs)")
    parser.add_argument("--every", type=int, help="record every K steps (default: 50; --full: 100)")
    parser.add_argument("--layers", help="layers to record: all, 5, or 1,5 (default: 4-9; --full: all)")
    parser.add_argument("--fisher", default="mc", choices=("mc", "empirical"), help="Fisher type (default: mc)")
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
    from fisherlab.analysis import analyze, load_results
    from fisherlab.plots.analysis import plot_run
    from fisherlab.record import record

    device = str(resolve_device(args.device))
    preset = FULL if args.full else QUICK
    out = Path(args.out or f"study-{args.problem.replace(':', '_')}")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a directory")
    run_file = out / "run.h5"
    if run_file.exists() and not (args.force or args.resume):
        raise UserInputError(f"{out} already holds a study; pass --resume to continue it or --force to redo it")
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps if args.steps is not None else preset["steps"]
    every = args.every if args.every is not None else preset["every"]
    print(f"[1/3] record: {args.problem}, Adam, {'paper epochs' if steps is None else f'{steps} steps'}, every {every}")
    record(
        args.problem, run_file, optimizer="adam", lr=args.lr, batch_size=args.batch_size, steps=steps, every=every,
        layers=args.layers or preset["layers"], fisher=args.fisher, mc_samples=args.mc_samples, dense_budget=args.dense_budget,
        seed=args.seed, data_dir=args.data_dir, device=device, force=args.force, resume=args.resume,
        progress=not args.quiet,
    )
    options = analysis_kwargs(args)
    print("[2/3] analyze: every method on every recorded step and layer")
    table = analyze(run_file, out_dir=out, device=device, progress=not args.quiet, **options)
    print("[3/3] plot")
    figures = plot_run(load_results(run_file), out / "figures", layer=args.plot_layer)
    print(f"run file: {run_file}\nerrors table: {table}\nfigures ({len(figures)}): {out / 'figures'}")
    return 0
