"""Does the short search horizon pick what the full one would? ``results/<profile>/horizon.md``.

Two checks on a problem whose whole grid was searched at the short horizon (CURVES):

- **Horizon.** The final stage runs each optimizer's finalists and the search ranks of
  ``check_ranks`` to the full horizon. The table lists every such run with its search rank and
  loss and its full-horizon rank and loss; the check holds where the full-horizon best is one
  of the search's finalists.
- **Halving.** Successive halving with ``--rungs`` and ``--eta`` (the MNIST and FACES search)
  replayed on the recorded search histories: the finalists it picks against those of the full
  search, and its cost in run-epochs against the full search's.

Usage::

    python experiments/fig2/horizon.py --profile paper --problem curves --rungs 1 2 --eta 3
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fisherlab.io import atomic_write

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (the runner's ranking and halving rule)


def label(point: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(point.items()))


def replay_halving(settings: dict, problem: str, name: str, profile: str, rungs: list[int], eta: int) -> tuple:
    """``(finalists, run-epochs)`` of successive halving replayed on the full search's histories."""
    points, cost, done = run.grid(settings, name), 0, 0
    for k, rung in enumerate(rungs):
        cost += len(points) * (rung - done)
        done = rung
        ranked = run.ranking(settings, problem, "search", name, profile, points, [rung])
        if k < len(rungs) - 1:
            points = run.survivors(ranked, rung, len(points), eta, settings["finalists"])
    finite = [r.point for r in ranked if math.isfinite(r.loss)]
    return finite[: settings["finalists"]], cost


def horizon_rows(settings: dict, problem: str, name: str, profile: str) -> list[dict]:
    """Every full-horizon run of ``name`` with its search rank and loss and its full-horizon rank and loss."""
    search = run.ranking(settings, problem, "search", name, profile, run.grid(settings, name),
                         run.search_rungs(settings, name))
    final = run.ranking(settings, problem, "final", name, profile, run.grid(settings, name), [settings["epochs"]])
    search_rank = {label(r.point): (i + 1, r.loss) for i, r in enumerate(search)}
    return [{"point": label(r.point), "search_rank": search_rank[label(r.point)][0],
             "search_loss": search_rank[label(r.point)][1], "final_rank": i + 1, "final_loss": r.loss}
            for i, r in enumerate(final)]


def report(settings: dict, problem: str, profile: str, names: list[str], rungs: list[int], eta: int) -> str:
    search_epochs, epochs, finalists = settings["search_epochs"], settings["epochs"], settings["finalists"]
    lines = [f"# Search horizon checks — {problem}, profile {profile}", "",
             f"## Horizon: {search_epochs}-epoch search against {epochs} epochs", "",
             f"Each optimizer's {finalists} finalists and search ranks {settings.get('check_ranks', [])} run to "
             f"{epochs} epochs. The check holds where the {epochs}-epoch best is a finalist.", "",
             f"| optimizer | settings | search rank | loss at epoch {search_epochs} | rank at {epochs} | "
             f"loss at epoch {epochs} |", "|---|---|---|---|---|---|"]
    verdicts = []
    for name in names:
        rows = horizon_rows(settings, problem, name, profile)
        for r in rows:
            lines.append(f"| {name} | {r['point']} | {r['search_rank']} | {r['search_loss']:.2f} | "
                         f"{r['final_rank']} | {r['final_loss']:.2f} |")
        if rows:
            best = rows[0]["search_rank"]
            verdicts.append(f"- {name}: the {epochs}-epoch best is search rank {best} "
                            f"({'holds' if best <= finalists else 'does not hold'}).")
    lines += ["", *verdicts, "", f"## Halving: rungs {rungs} + {search_epochs}, eta {eta}, replayed", "",
              "| optimizer | finalists of the full search | finalists of halving | same | run-epochs (×full) |",
              "|---|---|---|---|---|"]
    for name in names:
        if len(run.grid(settings, name)) <= eta * finalists:
            continue  # searched in full under halving too
        full = run.ranking(settings, problem, "search", name, profile, run.grid(settings, name), [search_epochs])
        if len(full) < len(run.grid(settings, name)):
            lines.append(f"| {name} | search incomplete ({len(full)} of {len(run.grid(settings, name))} runs) | | | |")
            continue
        full_pick = [r.point for r in full if math.isfinite(r.loss)][:finalists]
        pick, cost = replay_halving(settings, problem, name, profile, [*rungs, search_epochs], eta)
        total = len(run.grid(settings, name)) * search_epochs
        same = "yes, in order" if pick == full_pick else ("yes" if sorted(map(label, pick)) == sorted(map(label, full_pick))
                                                          else "no")
        lines.append(f"| {name} | {'; '.join(map(label, full_pick))} | {'; '.join(map(label, pick))} | {same} | "
                     f"{cost} of {total} ({cost / total:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--problem", default="curves")
    parser.add_argument("--rungs", nargs="+", type=int, default=[1, 2], help="halving rungs before the search's end")
    parser.add_argument("--eta", type=int, default=3, help="halving keeps the best 1/eta at each rung")
    args = parser.parse_args(argv)
    settings = run.problem_settings(run.load_config(args.profile), args.problem)
    if "search_epochs" not in settings or settings.get("halving"):
        raise SystemExit(f"{args.problem} has no full-grid search in profile {args.profile}")
    if sorted(set(args.rungs)) != args.rungs or args.rungs[-1] >= settings["search_epochs"] or args.rungs[0] < 1:
        raise SystemExit(f"--rungs must increase from 1 and stay below the search's {settings['search_epochs']} epochs")
    names = [*settings["optimizers"], *settings.get("with_variants", [])]
    text = report(settings, args.problem, args.profile, names, args.rungs, args.eta)
    out = HERE / "results" / args.profile / f"horizon_{args.problem}.md"
    atomic_write(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
