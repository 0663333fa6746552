"""The main job behind ``fisherlab study``: record (Adam) → analyze → plot, into one directory.

The quick default finishes in a few minutes on two CPU cores: CURVES, 300 Adam steps, the
Fisher blocks of the four middle layers (5–8: the paper's layer 5, the code layer's two, and
layer 8) recorded every 50 steps (statistics only, no dense blocks: the analysis is
matrix-free), all methods, exact Error 1 and Error 2. ``layers="all"`` adds the outer layers
(p up to 314,000), whose exact Error 2 takes minutes per block on a CPU (``error2_rtol``
trades exactness for time). ``full=True`` runs the paper's setting instead (every epoch of
the problem, every layer, recorded every 100 steps; a GPU job for MNIST and FACES). The
outputs go into ``out``: ``run.h5``, ``errors.csv`` and ``figures/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fisherlab.device import DEFAULT_DEVICE, resolve_device
from fisherlab.errors import UserInputError

#: The quick default (a few minutes on two cores) and the paper's setting.
QUICK = {"steps": 300, "every": 50, "layers": "5,6,7,8"}
FULL = {"steps": None, "every": 100, "layers": "all"}


@dataclass
class Study:
    """The files a study wrote."""

    out: Path
    run_file: Path
    table: Path
    figures: list[Path]


def study(
    problem: str = "curves",
    out: str | os.PathLike | None = None,
    *,
    full: bool = False,
    steps: int | None = None,
    every: int | None = None,
    layers: str | None = None,
    fisher: str = "mc",
    mc_samples: int = 1,
    batch_size: int | None = None,
    lr: float | None = None,
    dense_budget: str | int = 0,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    device: str = DEFAULT_DEVICE,
    plot_layer: int | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = lambda text: None,
    analysis: dict | None = None,
    model: str | None = None,
    kfac: str = "expand",
    kfac_both: bool | None = None,
) -> Study:
    """Record ``problem`` with Adam, analyze every recorded block, draw the figures.

    Args:
        problem: ``curves``, ``mnist``, ``faces`` or layer sizes such as ``"20-10-20"``.
        out: the output directory (default: ``study-<problem>``).
        full: the paper's settings (:data:`FULL`) instead of the quick ones (:data:`QUICK`).
        steps, every, layers: override the preset's.
        fisher, mc_samples, batch_size, lr, dense_budget, seed, data_dir, device: as in
            :func:`fisherlab.record.record`.
        plot_layer: layer of the error and spectrum figures (default: 5).
        force: redo an existing study; resume: continue an interrupted one.
        progress: show progress bars.
        say: called with a line at the start of each stage.
        analysis: options of :func:`fisherlab.analysis.analyze` (``methods``, ``rank``, ``layers`` ...).
        model, kfac, kfac_both: as in :func:`fisherlab.record.record`; with ``model`` (or a built-in network
            such as ``mnist-cnn``) every layer is recorded unless ``layers`` says otherwise.

    Raises:
        UserInputError: for invalid settings, or an existing study without ``force`` or ``resume``.
    """
    from fisherlab.analysis import analyze, load_results
    from fisherlab.plots.analysis import plot_run
    from fisherlab.record import record

    dev = str(resolve_device(device))
    preset = FULL if full else QUICK
    from fisherlab.problems import get_task

    network = model is not None or get_task(problem) is not None
    name = Path(model.rpartition(":")[0]).stem if model is not None else problem
    out = Path(out or f"study-{name.replace(':', '_')}")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a directory")
    run_file = out / "run.h5"
    if run_file.exists() and not (force or resume):
        raise UserInputError(f"{out} already holds a study; pass --resume to continue it or --force to redo it")
    out.mkdir(parents=True, exist_ok=True)
    steps = steps if steps is not None else preset["steps"]
    every = every if every is not None else preset["every"]
    say(f"[1/3] record: {model or problem}, Adam, {'paper epochs' if steps is None else f'{steps} steps'}, every {every}")
    record(
        problem, run_file, optimizer="adam", lr=lr, batch_size=batch_size, steps=steps, every=every,
        layers=layers or ("all" if network else preset["layers"]), fisher=fisher, mc_samples=mc_samples,
        dense_budget=dense_budget, seed=seed, data_dir=data_dir, device=dev, force=force, resume=resume,
        progress=progress, model=model, kfac=kfac, kfac_both=kfac_both,
    )
    say("[2/3] analyze: every method on every recorded step and layer")
    table = analyze(run_file, out_dir=out, device=dev, progress=progress, **(analysis or {}))
    say("[3/3] plot")
    figures = plot_run(load_results(run_file), out / "figures", layer=plot_layer)
    return Study(out, run_file, table, figures)
