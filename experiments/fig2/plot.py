"""Draw Figure 2 from the runner's best runs: ``figures/fig2_<problem>_<profile>.{png,pdf}``.

Usage::

    python experiments/fig2/plot.py --profile cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fisherlab.plots.training import plot_histories
from fisherlab.training import History

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args(argv)
    best_path = HERE / "results" / args.profile / "best.json"
    if not best_path.exists():
        raise SystemExit(f"{best_path} does not exist; run experiments/fig2/run.py --profile {args.profile} first")
    config = json.loads((HERE / "config.json").read_text())
    order = config["optimizers"]
    best = json.loads(best_path.read_text())
    for problem, by_opt in best.items():
        histories = {name: History.read_csv(HERE / by_opt[name]["history"]) for name in order if name in by_opt}
        paths = plot_histories(histories, HERE.parents[1] / "figures", f"fig2 {problem} {args.profile}")
        for path in paths:
            print(path.relative_to(HERE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
