"""Draw the CNN experiment: Error 1 and Error 2 of every method on every layer of ``mnist-cnn``.

Reads ``results/<profile>/mnist-cnn/errors.csv`` (committed) and writes
``figures/cnn_errors_<profile>.{png,pdf}``: one column per layer, Error 1 on top, Error 2
below, against the training step; KFAC-expand (the recorded form, ``kfac``) and KFAC-reduce
(``kfac_reduce``, convolutional layers only) side by side.

Usage::

    python experiments/cnn/plot.py --profile cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend

from fisherlab.analysis import read_table  # noqa: E402
from fisherlab.plots import style  # noqa: E402

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parents[1] / "figures"
LAYER_NAMES = {1: "conv 1→6, 5×5", 2: "conv 6→16, 5×5", 3: "linear 400→120", 4: "linear 120→84", 5: "linear 84→10"}
LABELS = {"kfac": "KFAC (expand)", "kfac_reduce": "KFAC-reduce"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args(argv)
    rows = [r for r in read_table(HERE / "results" / args.profile / "mnist-cnn" / "errors.csv") if r["status"] == "ok"]
    layers = sorted({r["layer"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers), 5.6), sharex=True, squeeze=False)
    for col, layer in enumerate(layers):
        for row, error in enumerate(("error1", "error2")):
            ax = axes[row][col]
            for method in methods:
                points = sorted((r["step"], r[error]) for r in rows if r["layer"] == layer and r["method"] == method)
                if not points:
                    continue
                steps, values = zip(*points)
                family = "kfac" if method == "kfac_reduce" else method  # KFAC's colour, dashed for reduce
                ax.plot(steps, values, label=LABELS.get(method, style.label(method)), color=style.color(family),
                        marker=style.marker(method), markersize=3, linestyle="--" if method == "kfac_reduce" else "-")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"layer {layer}: {LAYER_NAMES.get(layer, '')}", fontsize=9)
            else:
                ax.set_xlabel("training step")
            if col == 0:
                ax.set_ylabel({"error1": "Error 1 (relative Frobenius)", "error2": "Error 2 (relative spectral ℓ2)"}[error])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("mnist-cnn (LeNet-5), Adam, batch 512, MC Fisher: every approximation on every layer", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    for path in style.save_figure(fig, FIGURES, f"cnn_errors_{args.profile}"):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
