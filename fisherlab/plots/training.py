"""Figure 2: training and validation loss against epoch and against time, one line per optimizer."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fisherlab.plots.style import color, label, marker, save_figure

#: (column on y, column on x, panel title) of the four panels, in reading order.
PANELS = (
    ("train_loss", "epoch", "training loss"),
    ("val_loss", "epoch", "validation loss"),
    ("train_loss", "seconds", "training loss"),
    ("val_loss", "seconds", "validation loss"),
)
XLABELS = {"epoch": "epoch", "seconds": "time (s)"}


def _column(history: Any, name: str) -> np.ndarray:
    # A dict of lists, a pandas DataFrame, or a fisherlab.training.History all index by name.
    if hasattr(history, "as_dict"):
        history = history.as_dict()
    return np.asarray(history[name], dtype=float)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "training"


def plot_histories(histories: Mapping[str, Any], out_dir: str | Path, title: str, stem: str | None = None,
                   ablation: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """Draw the four Figure 2 panels of one problem and save them as PNG and PDF.

    Args:
        histories: ``{optimizer name: history}``; a history is anything indexable by column
            name (``dict`` of lists, pandas ``DataFrame``, :class:`fisherlab.training.History`)
            with columns ``epoch``, ``seconds``, ``train_loss``, ``val_loss``. Names are drawn
            with the fixed labels and colours of :mod:`fisherlab.plots.style`.
        out_dir: directory for the figures (created if missing).
        title: figure title.
        stem: file name without suffix (default: the title's slug).
        ablation: ``{method: {"factors": history, "block": history}}``: adds a third column of
            two panels, training loss against epoch and against time, with each method's run
            under factor averaging (solid) and block averaging (dashed).

    Returns:
        The paths written.

    Raises:
        ValueError: if ``histories`` is empty or a history lacks a column.
    """
    if not histories:
        raise ValueError("no histories to plot")
    # A Figure, not pyplot: no global backend or figure registry is touched.
    columns = 3 if ablation else 2
    fig = Figure(figsize=(5 * columns, 7.5), layout="constrained")
    axes = fig.subplots(2, columns, squeeze=False)
    for ax, (y_name, x_name, panel) in zip(axes[:, :2].flat, PANELS):
        for name, history in histories.items():
            _line(ax, history, name, x_name, y_name, label(name))
        _finish(ax, x_name, panel)
    axes[0, 0].legend(fontsize="small")
    if ablation:
        for ax, x_name in zip(axes[:, 2], ("epoch", "seconds")):
            for name, runs in ablation.items():
                for average, style in AVERAGING_STYLES.items():
                    if average in runs:
                        _line(ax, runs[average], name, x_name, "train_loss", f"{label(name)}, {average} average", style)
            _finish(ax, x_name, "training loss (ablation)")
        axes[0, 2].legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, out_dir, stem or _slug(title))


#: Line style of each moving average in the ablation panels.
AVERAGING_STYLES = {"factors": "-", "block": "--"}


def _line(ax: Any, history: Any, name: str, x_name: str, y_name: str, text: str, style: str = "-") -> None:
    try:
        x, y = _column(history, x_name), _column(history, y_name)
    except KeyError as exc:
        raise ValueError(f"history of {name!r} has no column {exc}") from None
    finite = np.isfinite(y)
    ax.plot(x[finite], y[finite], style, color=color(name), marker=marker(name), markevery=max(1, len(x) // 10),
            markersize=4, linewidth=1.4, label=text)


def _finish(ax: Any, x_name: str, panel: str) -> None:
    ax.set_xlabel(XLABELS[x_name])
    ax.set_ylabel(panel)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def best_final(histories: Mapping[str, Any], column: str = "train_loss") -> dict[str, float]:
    """``{name: last finite value of column}`` (NaN for a history with none), for tables."""
    result = {}
    for name, history in histories.items():
        values = [v for v in _column(history, column) if math.isfinite(v)]
        result[name] = values[-1] if values else float("nan")
    return result
