"""Fixed colours, markers and display names, so a method looks the same in every figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fisherlab.io import atomic_write
from fisherlab.kron.methods import METHODS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Resolution of the PNG figures.
DPI = 150
#: Every figure is written in these formats.
FORMATS = ("png", "pdf")

#: Display names of the approximations (from the registry) and of the other optimizers.
LABELS = {name: method.label for name, method in METHODS.items()} | {"sgd": "SGD", "adam": "Adam", "fisher": "exact F",
                                                                    "kfac_expand": "KFAC-expand", "kfac_reduce": "KFAC-reduce"}

#: Colour-blind-safe palette (Okabe–Ito), fixed per name.
COLORS = {
    "kfac": "#000000",
    "kfac_expand": "#999999",
    "kfac_reduce": "#999999",
    "kpsvd": "#E69F00",
    "deflation": "#0072B2",
    "lanczos": "#009E73",
    "kfac_corrected": "#D55E00",
    "kronecker_svd": "#CC79A7",
    "sgd": "#999999",
    "adam": "#56B4E9",
    "fisher": "#7F7F7F",
}

MARKERS = {
    "kfac": "o",
    "kpsvd": "s",
    "deflation": "^",
    "lanczos": "v",
    "kfac_corrected": "D",
    "kronecker_svd": "x",
    "kfac_expand": "1",
    "kfac_reduce": "2",
    "sgd": ".",
    "adam": "+",
    "fisher": "",
}


def label(name: str) -> str:
    """Display name of a method or optimizer (the name itself when unknown)."""
    return LABELS.get(name, name)


def color(name: str) -> str | None:
    """Fixed colour of a method (None lets matplotlib choose for unknown names)."""
    return COLORS.get(name)


def marker(name: str) -> str:
    """Fixed marker of a method (``""``, no marker, for unknown names)."""
    return MARKERS.get(name, "")


def save_figure(fig: Figure, out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` into ``out_dir`` (created if needed), atomically.

    Returns:
        The paths written.
    """
    paths = [Path(out_dir) / f"{stem}.{suffix}" for suffix in FORMATS]
    for path in paths:
        atomic_write(path, lambda handle, fmt=path.suffix[1:]: fig.savefig(handle, format=fmt, dpi=DPI))
        fig.set_layout_engine("none")  # keep the first save's layout: laying out again costs as much
    return paths
