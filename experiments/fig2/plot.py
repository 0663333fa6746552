"""Draw Figure 2 from the runner's best runs: ``figures/fig2_<problem>_<profile>.{png,pdf}``.

Variants (``config.json``'s ``variants``, the block-averaged rank-2 methods) go into the
ablation column beside the four panels, each against its optimizer's best run.

The title names the problem and the profile's settings (``label`` in ``config.json``). A problem
whose best runs' ``history.csv`` files are missing is skipped and its existing figure left alone.

Usage::

    python experiments/fig2/plot.py --profile cpu [--problems mnist]
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from fisherlab.plots.training import plot_histories
from fisherlab.training import History

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIGURES = ROOT / "figures"
sys.path.insert(0, str(HERE))
from run import load_config, problem_settings  # noqa: E402 - the runner beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--problems", nargs="+", help="default: every problem in best.json")
    args = parser.parse_args(argv)
    best_path = HERE / "results" / args.profile / "best.json"
    if not best_path.exists():
        raise SystemExit(f"{best_path} does not exist; run experiments/fig2/run.py --profile {args.profile} first")
    settings = load_config(args.profile)
    order, variants = settings["optimizers"], settings["variants"]
    best = json.loads(best_path.read_text())
    for problem in args.problems or list(best):
        by_opt = best.get(problem)
        if not by_opt:
            print(f"{problem}: no best runs in {best_path.relative_to(ROOT)}")
            continue
        files = {name: HERE / by_opt[name]["history"] for name in [*order, *variants] if name in by_opt}
        missing = [name for name, path in files.items() if not path.exists()]
        if missing:
            print(f"{problem}: skipped, histories not on this machine for {', '.join(missing)} "
                  f"(run experiments/fig2/run.py --profile {args.profile} --problems {problem})")
            continue
        histories = {name: History.read_csv(path) for name, path in files.items()}
        ablation = {}
        for name in [v for v in variants if v in histories]:
            base = variants[name]["optimizer"]
            ablation[base] = {"block": histories.pop(name)} | ({"factors": histories[base]} if base in histories else {})
        label = next((r["label"] for r in by_opt.values() if "label" in r), None)
        label = label or problem_settings(settings, problem).get("label", args.profile)
        title = textwrap.fill(f"Figure 2 ({args.profile} profile): {label}", width=95)
        stem = f"fig2_{problem}_{args.profile}"
        for path in plot_histories(histories, FIGURES, title, stem=stem, ablation=ablation or None):
            print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
