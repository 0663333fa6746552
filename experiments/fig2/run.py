"""Grid-search runner for Figure 2: every optimizer on every problem over the configured grid.

Each run is ``fisherlab train`` into ``runs/<profile>/<problem>/<optimizer>/<settings>/``;
a run whose ``history.csv`` exists is skipped (the cache), so the runner can be stopped and
restarted. Afterwards each optimizer's best run per problem, by final training loss (a
diverged run counts as +inf), is written to ``results/<profile>/best.json`` and summarised
in ``results/<profile>/summary.md``.

Usage::

    python experiments/fig2/run.py --profile cpu
    python experiments/fig2/run.py --profile full --problems mnist --optimizers kfac deflation
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

from fisherlab.cli import main as fisherlab_main
from fisherlab.training import History

HERE = Path(__file__).resolve().parent


def load_config(profile: str) -> dict:
    config = json.loads((HERE / "config.json").read_text())
    if profile not in config["profiles"]:
        raise SystemExit(f"unknown profile {profile!r}; choose from {', '.join(config['profiles'])}")
    return {**config["profiles"][profile], "optimizers": config["optimizers"]}


def grid(settings: dict, optimizer: str) -> list[dict]:
    """Every hyperparameter combination of ``optimizer``'s grid."""
    spec = settings["grids"][optimizer if optimizer in ("sgd", "adam") else "natural"]
    keys = sorted(spec)
    return [dict(zip(keys, values)) for values in itertools.product(*(spec[k] for k in keys))]


def run_dir(profile: str, problem: str, optimizer: str, point: dict) -> Path:
    name = "_".join(f"{k}={v:g}" for k, v in sorted(point.items()))
    return HERE / "runs" / profile / problem / optimizer / name


def train_args(settings: dict, problem: str, optimizer: str, point: dict, out: Path) -> list[str]:
    args = ["train", "--problem", problem, "--optimizer", optimizer, "--out", str(out),
            "--epochs", str(settings["epochs"]), "--t1", str(settings["t1"]), "--t2", str(settings["t2"]),
            "--average", settings["average"], "--seed", str(settings["seed"]), "--no-progress"]
    if settings["train_subset"]:
        args += ["--train-subset", str(settings["train_subset"])]
    for key, value in point.items():
        args += [f"--{key}", repr(value)]
    return args


def final_train_loss(history: History) -> float:
    last = history.rows[-1]["train_loss"]
    return last if math.isfinite(last) and not history.diverged else math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--problems", nargs="+")
    parser.add_argument("--optimizers", nargs="+")
    args = parser.parse_args(argv)
    settings = load_config(args.profile)
    problems = args.problems or settings["problems"]
    optimizers = args.optimizers or settings["optimizers"]
    results = HERE / "results" / args.profile
    best_path = results / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
    for problem in problems:
        for optimizer in optimizers:
            candidates = []
            for point in grid(settings, optimizer):
                out = run_dir(args.profile, problem, optimizer, point)
                if not (out / "history.csv").exists():
                    print(f"[fig2] {problem} {optimizer} {point}", flush=True)
                    code = fisherlab_main(train_args(settings, problem, optimizer, point, out))
                    if code != 0:
                        print(f"[fig2] failed with status {code}", file=sys.stderr)
                        continue
                candidates.append((final_train_loss(History.read_csv(out / "history.csv")), point, out))
            if not candidates:
                continue
            loss, point, out = min(candidates, key=lambda c: c[0])
            record = json.loads((out / "run.json").read_text())
            best.setdefault(problem, {})[optimizer] = {
                "settings": point,
                "final_train_loss": loss,
                "final_val_loss": record["final"]["val_loss"],
                "seconds": record["final"]["seconds"],
                "epochs": record["final"]["epoch"],
                "history": str(out.relative_to(HERE) / "history.csv"),
                "grid": [{"settings": p, "final_train_loss": l} for l, p, _ in candidates],
            }
            results.mkdir(parents=True, exist_ok=True)
            best_path.write_text(json.dumps(best, indent=1))
    write_summary(best, results / "summary.md", settings["label"])
    return 0


def write_summary(best: dict, path: Path, label: str) -> None:
    """A markdown table per problem: best settings, final losses, training time."""
    lines = [f"# Figure 2 — {label}", ""]
    for problem, by_opt in best.items():
        lines += [f"## {problem}", "", "| optimizer | best settings | final train loss | final val loss | seconds | s/epoch |",
                  "|---|---|---|---|---|---|"]
        for name, r in sorted(by_opt.items(), key=lambda kv: kv[1]["final_train_loss"]):
            per_epoch = r["seconds"] / max(r["epochs"], 1)
            settings = ", ".join(f"{k}={v:g}" for k, v in r["settings"].items())
            lines.append(f"| {name} | {settings} | {r['final_train_loss']:.3f} | {r['final_val_loss']:.3f} | "
                         f"{r['seconds']:.1f} | {per_epoch:.2f} |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
