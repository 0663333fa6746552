"""``fisherlab plot PATH [PATH ...]``: the figures of analyzed runs (``.h5``) and of training
histories (``history.csv`` or directories of them); see :mod:`fisherlab.plots.files`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``plot``'s options to its sub-parser."""
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", type=Path,
        help="analyzed run file (.h5), history.csv, or a directory holding history.csv files",
    )
    parser.add_argument(
        "--layer", type=int,
        help="layer of a run's error, spectrum and profile figures (default: 5 if analyzed, else the middle one)",
    )
    parser.add_argument("--step", type=int, help="step of a run's heatmap and spectrum (default: the last one)")
    parser.add_argument(
        "--out", type=Path, help="directory for the figures (default: figures/ beside the run file or the histories)"
    )


def run(args: argparse.Namespace) -> int:
    """Draw the figures of ``args.paths`` and print one line per figure set; 0 on success."""
    from fisherlab.plots.files import plot_files

    for line in plot_files(args.paths, args.layer, args.step, args.out):
        print(line)
    return 0
