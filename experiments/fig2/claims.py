"""The paper's Figure 2 claims against our runs: ``results/<profile>/claims.md``.

Reads the runner's ``best.json`` (each optimizer's best full-horizon run) and compares, pair by
pair, the training loss

- per epoch: at the last epoch both runs reached;
- per second: at the shorter of the two runs' training times, each history interpolated
  linearly in time between its recorded epochs.

"a beats b" holds where a's loss is lower; KFAC ≈ KPSVD holds where the two differ by at most
``--close`` (relative, default 2 %) on both axes. It also tabulates the §3.4 remedy counters of
each natural-gradient run and the number of runs and hours of training per problem and stage.

Usage::

    python experiments/fig2/claims.py --profile paper
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fisherlab.io import atomic_write
from fisherlab.training import History

HERE = Path(__file__).resolve().parent
NATURAL = ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected")
RANK2 = ("deflation", "lanczos", "kfac_corrected")


def loss_at_epoch(history: History, epoch: int) -> float:
    """Training loss recorded at ``epoch`` (NaN if the run did not reach it)."""
    rows = [r for r in history.rows if r["epoch"] == epoch]
    return rows[-1]["train_loss"] if rows else float("nan")


def loss_at_time(history: History, seconds: float) -> float:
    """Training loss at ``seconds`` of training, linear in time between recorded rows."""
    t = np.asarray(history.column("seconds"), dtype=float)
    y = np.asarray(history.column("train_loss"), dtype=float)
    if seconds > t[-1]:
        return float("nan")
    return float(np.interp(seconds, t, y))


def compare(a: History, b: History) -> dict:
    """Both runs' losses per epoch (at the last common epoch) and per second (at the shorter time)."""
    epoch = int(min(a.rows[-1]["epoch"], b.rows[-1]["epoch"]))
    seconds = float(min(a.rows[-1]["seconds"], b.rows[-1]["seconds"]))
    return {"epoch": epoch, "seconds": seconds,
            "per_epoch": (loss_at_epoch(a, epoch), loss_at_epoch(b, epoch)),
            "per_second": (loss_at_time(a, seconds), loss_at_time(b, seconds))}


def beats(pair: tuple[float, float]) -> bool:
    return bool(pair[0] < pair[1])


def close(pair: tuple[float, float], tolerance: float) -> bool:
    return bool(abs(pair[0] - pair[1]) <= tolerance * min(abs(pair[0]), abs(pair[1])))


def claim_rows(histories: dict[str, History], tolerance: float) -> list[dict]:
    """One row per (claim, pair) whose two runs are both present."""
    pairs = [("every natural-gradient method beats SGD and Adam", m, b, "beats")
             for m in NATURAL for b in ("sgd", "adam")]
    pairs.append(("KFAC ≈ KPSVD", "kpsvd", "kfac", "close"))
    pairs += [("Deflation, Lanczos and KFAC-corrected beat KFAC", m, "kfac", "beats") for m in RANK2]
    rows = []
    for claim, a, b, kind in pairs:
        if a in histories and b in histories:
            c = compare(histories[a], histories[b])
            test = beats if kind == "beats" else (lambda p: close(p, tolerance))
            rows.append({"claim": claim, "a": a, "b": b, **c,
                         "holds_per_epoch": test(c["per_epoch"]), "holds_per_second": test(c["per_second"])})
    return rows


def remedy_rows(best: dict) -> list[dict]:
    """The §3.4 remedy counters of each natural-gradient best run."""
    rows = []
    for name, entry in best.items():
        record = json.loads((HERE / entry["history"]).with_name("run.json").read_text())
        d = record.get("diagnostics") or {}
        if "remedy_layers_total" in d:
            rows.append({"optimizer": name, "inverse_updates": d["inverse_updates"],
                         "remedy_layers_total": d["remedy_layers_total"],
                         "clipped_curvatures_total": d["clipped_curvatures_total"]})
    return rows


def cost_rows(profile: str) -> list[dict]:
    """Runs and hours of training (the runs' own clocks, evaluation excluded) per problem and stage."""
    rows = []
    for problem_dir in sorted((HERE / "runs" / profile).glob("*")):
        for stage_dir in sorted(problem_dir.glob("*")):
            records = [json.loads(p.read_text()) for p in stage_dir.glob("*/*/run.json")]
            rows.append({"problem": problem_dir.name, "stage": stage_dir.name, "runs": len(records),
                         "hours": sum(r["final"]["seconds"] for r in records) / 3600})
    return rows


def _fmt(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.2f} vs {pair[1]:.2f}"


def render(profile: str, best: dict, tolerance: float) -> str:
    lines = [f"# Figure 2 claims — profile {profile}", "",
             "Training loss of each optimizer's best full-horizon run; per epoch at the last epoch both "
             "runs reached, per second at the shorter of the two training times (interpolated between epochs). "
             f"KFAC ≈ KPSVD holds within {tolerance:.0%}.", ""]
    for problem, by_opt in best.items():
        histories = {name: History.read_csv(HERE / entry["history"]) for name, entry in by_opt.items()}
        lines += [f"## {problem}", "", "| claim | a vs b | per epoch (epoch) | holds | per second (s) | holds |",
                  "|---|---|---|---|---|---|"]
        for r in claim_rows(histories, tolerance):
            lines.append(f"| {r['claim']} | {r['a']} vs {r['b']} | {_fmt(r['per_epoch'])} ({r['epoch']}) | "
                         f"{'yes' if r['holds_per_epoch'] else 'no'} | {_fmt(r['per_second'])} ({r['seconds']:.0f}) | "
                         f"{'yes' if r['holds_per_second'] else 'no'} |")
        remedy = remedy_rows({n: e for n, e in by_opt.items() if n not in ("sgd", "adam")})
        if remedy:
            lines += ["", "§3.4 remedy (indefinite pairs only) over the run:", "",
                      "| optimizer | inverse updates | layer updates where it fired | curvatures raised |", "|---|---|---|---|"]
            lines += [f"| {r['optimizer']} | {r['inverse_updates']} | {r['remedy_layers_total']} | "
                      f"{r['clipped_curvatures_total']} |" for r in remedy]
        lines.append("")
    lines += ["## Cost", "", "| problem | stage | runs | hours of training |", "|---|---|---|---|"]
    lines += [f"| {r['problem']} | {r['stage']} | {r['runs']} | {r['hours']:.2f} |" for r in cost_rows(profile)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--close", type=float, default=0.02, help="relative tolerance of KFAC ≈ KPSVD")
    args = parser.parse_args(argv)
    best_path = HERE / "results" / args.profile / "best.json"
    if not best_path.exists():
        raise SystemExit(f"{best_path} does not exist; run experiments/fig2/run.py --profile {args.profile} first")
    out = HERE / "results" / args.profile / "claims.md"
    atomic_write(out, render(args.profile, json.loads(best_path.read_text()), args.close))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
