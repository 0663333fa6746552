"""Draw Figure 1 from the runner's results into the repository's ``figures/`` folder.

Usage::

    python experiments/fig1/plot.py --profile cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fisherlab.analysis import load_results
from fisherlab.errors import UserInputError
from fisherlab.plots.analysis import describe_run, plot_errors

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parents[1] / "figures"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args(argv)
    config = json.loads((HERE / "config.json").read_text())
    for problem in config["profiles"][args.profile]["problems"]:
        run = HERE / "results" / args.profile / problem / "run.h5"
        if not run.exists():
            print(f"{problem}: no results yet (run run.py first)")
            continue
        try:
            results = load_results(run)
        except UserInputError as exc:  # e.g. still being recorded
            print(f"{problem}: skipped ({exc})")
            continue
        title = f"Figure 1 ({args.profile}) · {describe_run(results.config)}"
        paths = plot_errors(results.rows, config["layer"], FIGURES, title=title, stem=f"fig1_{problem}_{args.profile}")
        print(f"{problem}: {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    main()
