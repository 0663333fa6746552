"""The figures of analyzed runs and of training histories, from the files given (``fisherlab plot``).

:func:`plot_files` takes paths, each one of:

- an analyzed HDF5 run file (``.h5``): the analysis figures of
  :func:`fisherlab.plots.analysis.plot_run` (errors over training, heatmaps, spectra,
  Kronecker profile), by default into ``figures/`` beside the run file, where ``errors.csv``
  also lies;
- a ``history.csv`` of ``fisherlab train``, or a directory searched recursively for them:
  all histories together make the Figure 2 panels of
  :func:`fisherlab.plots.training.plot_histories`, by default into ``figures/`` in the
  histories' common directory. Each history is labelled by the optimizer that ``run.json``
  beside it names, else by its directory's name.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fisherlab.errors import UserInputError

RUN_SUFFIXES = (".h5", ".hdf5")
HISTORY = "history.csv"
#: Written by ``fisherlab train`` beside ``history.csv``; its settings name the optimizer.
SIDECAR = "run.json"


def plot_files(paths: list[Path], layer: int | None = None, step: int | None = None,
               out: Path | None = None) -> list[str]:
    """Draw the figures of every path (module docstring); every input is read and checked first.

    Args:
        paths: run files, ``history.csv`` files and directories holding them.
        layer, step: the view of the runs' figures (:func:`fisherlab.plots.analysis.resolve_view`).
        out: directory for all figures (default: ``figures/`` beside each run, or beside the histories).

    Returns:
        One line per figure set: what was drawn and where.

    Raises:
        UserInputError: for a bad path, a view the runs lack, or an unwritable directory.
    """
    runs, histories = classify(paths)
    if not runs and (layer is not None or step is not None):
        raise UserInputError("--layer and --step apply to run files (.h5), and none was given")
    # Read and check every input before drawing anything, so bad input stops early.
    loaded = []
    if runs:
        from fisherlab.analysis import load_results
        from fisherlab.plots.analysis import plot_run, resolve_view

        for path, directory in run_out_dirs(runs, out).items():
            results = load_results(path)
            loaded.append((results, directory, *resolve_view(results, layer, step)))
    labelled = read_histories(histories) if histories else {}
    lines = []
    for results, directory, run_layer, run_step in loaded:
        with _writing_into(directory):
            written = plot_run(results, directory, layer=run_layer, step=run_step)
        lines.append(f"{results.path}: layer {run_layer}, step {run_step}: {len(written)} files in {directory}")
    if histories:
        from fisherlab.plots.training import plot_histories

        directory = out or Path(os.path.commonpath([h.resolve().parent for h in histories])) / "figures"
        with _writing_into(directory):
            written = plot_histories(labelled, directory, histories_title(histories))
        count = f"{len(histories)} histor{'y' if len(histories) == 1 else 'ies'}"
        lines.append(f"{count} ({', '.join(labelled)}): {len(written)} files in {directory}")
    return lines


def classify(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split the arguments into run files and history files (directories are searched).

    Raises:
        UserInputError: for a missing path, a directory without ``history.csv``, or a file
            that is neither a run file nor a ``.csv`` history.
    """
    runs, histories = [], []
    for path in paths:
        if path.is_dir():
            found = sorted(path.rglob(HISTORY))
            if not found:
                raise UserInputError(f"no {HISTORY} under directory {path}")
            histories += found
        elif not path.exists():
            raise UserInputError(f"no such file or directory: {path}")
        elif path.suffix.lower() in RUN_SUFFIXES:
            runs.append(path)
        elif path.suffix.lower() == ".csv":
            if path.name == "errors.csv":
                raise UserInputError(f"{path} is an analysis table; plot the run file (.h5) it was made from")
            histories.append(path)
        else:
            raise UserInputError(
                f"unknown file type {path.suffix or '(no suffix)'} of {path}: "
                f"give a run file (.h5), a {HISTORY} or a directory"
            )
    return _unique(runs), _unique(histories)


def run_out_dirs(runs: list[Path], out: Path | None) -> dict[Path, Path]:
    """Where each run's figures go: ``out`` or ``figures/`` beside it.

    Runs that would share a directory get a sub-directory each, named after the run file,
    so that their figures (named by layer and step) never overwrite one another.
    """
    base = {run: out or run.parent / "figures" for run in runs}
    shared = Counter(d.resolve() for d in base.values())
    return {run: d / _stem(run, runs) if shared[d.resolve()] > 1 else d for run, d in base.items()}


def read_histories(paths: list[Path]) -> dict[str, dict[str, list[float]]]:
    """``{label: columns}`` of each ``history.csv``, labelled by :func:`history_label`.

    Raises:
        UserInputError: if a file is unreadable or not a training history.
    """
    from fisherlab.loop import History

    labels = [history_label(path) for path in paths]
    counts = Counter(labels)
    root = Path(os.path.commonpath([p.resolve() for p in paths]))
    histories = {}
    for path, label in zip(paths, labels):
        if counts[label] > 1:  # e.g. two Adam runs with different learning rates: add where each lies
            where = path.resolve().relative_to(root)
            tag = where.parent if path.name == HISTORY else where.with_suffix("")
            label = f"{label} ({tag})" if str(tag) != "." else label
        try:
            histories[label] = History.read_csv(path).as_dict()
        except UserInputError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise UserInputError(f"cannot read training history {path}: {exc}") from None
    return histories


def history_label(path: Path) -> str:
    """The optimizer named in ``run.json`` beside ``path``, else the name of its directory."""
    return str(_settings(path).get("optimizer") or path.parent.resolve().name)


def histories_title(paths: list[Path]) -> str:
    """Figure 2's title (and so its file name): the problems the ``run.json`` files name."""
    problems = sorted({str(p) for p in (_settings(path).get("problem") for path in paths) if p})
    return f"{', '.join(problems) or 'training'} · training and validation loss"


def _settings(path: Path) -> dict:
    # run.json is optional (histories may come from elsewhere); an unreadable one is ignored.
    try:
        settings = json.loads((path.parent / SIDECAR).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _stem(run: Path, runs: list[Path]) -> str:
    # Two run files of one name (in different directories) are told apart by their directory.
    same_name = sum(r.stem == run.stem for r in runs) > 1
    return f"{run.parent.resolve().name}_{run.stem}" if same_name else run.stem


def _unique(paths: list[Path]) -> list[Path]:
    seen: dict[Path, Path] = {}
    for path in paths:
        seen.setdefault(path.resolve(), path)
    return list(seen.values())


@contextmanager
def _writing_into(out: Path) -> Iterator[None]:
    """Turn a failure to create or write the figure directory ``out`` into a user error."""
    try:
        yield
    except OSError as exc:
        raise UserInputError(f"cannot write figures into {out}: {exc.strerror or exc}") from None
