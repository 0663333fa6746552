"""Grid-search runner for Figure 2: every optimizer on every problem over the configured grid.

Each run is ``fisherlab train`` into ``runs/<profile>/<problem>/<optimizer>/<settings>/``;
a run whose ``history.csv`` exists is skipped (the cache), so the runner can be stopped and
restarted. Afterwards each optimizer's best run per problem, by final training loss (a
diverged run counts as +inf), is written to ``results/<profile>/best.json`` and summarised
in ``results/<profile>/summary.md``.

A profile may carry ``per_problem``: ``{problem: {key: value}}`` whose keys (``label``,
``epochs``, ``train_subset``, ``t1``, ``t2``, ``average``, ``seed``, ``grids``) replace the
profile's for that problem only; a profile without it behaves as before. A cached run whose
``run.json`` was made with other epochs, subset, T1, T2, average or seed than the config now
asks for is reported and run again.

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
from fisherlab.io import atomic_write
from fisherlab.training import History

HERE = Path(__file__).resolve().parent


#: Settings a cached run's ``run.json`` must match to be reused (config key -> run.json key).
CACHE_KEYS = {"epochs": "epochs", "train_subset": "train_subset", "t1": "t1", "t2": "t2",
              "average": "average", "seed": "seed"}


def load_config(profile: str) -> dict:
    config = json.loads((HERE / "config.json").read_text())
    if profile not in config["profiles"]:
        raise SystemExit(f"unknown profile {profile!r}; choose from {', '.join(config['profiles'])}")
    return {**config["profiles"][profile], "optimizers": config["optimizers"]}


def problem_settings(settings: dict, problem: str) -> dict:
    """The profile's settings with ``per_problem[problem]`` laid over them (keys starting with _ ignored)."""
    override = settings.get("per_problem", {}).get(problem, {})
    merged = {k: v for k, v in settings.items() if k != "per_problem"}
    merged.update({k: v for k, v in override.items() if not k.startswith("_")})
    return merged


def cache_mismatch(settings: dict, out: Path) -> list[str]:
    """The settings in which the cached run in ``out`` differs from ``settings`` (empty: reusable)."""
    try:
        recorded = json.loads((out / "run.json").read_text())["settings"]
    except (OSError, KeyError, ValueError):
        return ["run.json unreadable"]
    wanted = {key: settings[key] for key in CACHE_KEYS}
    wanted["train_subset"] = wanted["train_subset"] or None  # null or 0: the whole training set
    return [f"{key}: {recorded.get(rkey)!r} != {wanted[key]!r}"
            for key, rkey in CACHE_KEYS.items() if recorded.get(rkey) != wanted[key]]


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
    parser.add_argument("--device", default="auto", help="of every run (default: auto, cuda where available)")
    args = parser.parse_args(argv)
    settings = load_config(args.profile)
    problems = args.problems or settings["problems"]
    optimizers = args.optimizers or settings["optimizers"]
    results = HERE / "results" / args.profile
    best_path = results / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
    for problem in problems:
        here = problem_settings(settings, problem)
        for optimizer in optimizers:
            candidates = []
            for point in grid(here, optimizer):
                out = run_dir(args.profile, problem, optimizer, point)
                cached = (out / "history.csv").exists()
                stale = cache_mismatch(here, out) if cached else []
                if stale:
                    print(f"[fig2] cached run {out.relative_to(HERE)} has other settings ({'; '.join(stale)}); "
                          "running it again", flush=True)
                if not cached or stale:
                    print(f"[fig2] {problem} {optimizer} {point}", flush=True)
                    extra = ["--device", args.device] + (["--force"] if stale else [])
                    code = fisherlab_main(train_args(here, problem, optimizer, point, out) + extra)
                    if code != 0:
                        print(f"[fig2] failed with status {code}", file=sys.stderr)
                        continue
                candidates.append((final_train_loss(History.read_csv(out / "history.csv")), point, out))
            if not candidates:
                continue
            loss, point, out = min(candidates, key=lambda c: c[0])
            record = json.loads((out / "run.json").read_text())
            run_settings = record["settings"]
            best.setdefault(problem, {})[optimizer] = {
                "settings": point,
                "label": here["label"],
                "run": {key: run_settings.get(key) for key in ("epochs", "n_train", "batch_size", "t1", "t2", "average", "seed")},
                "final_train_loss": loss,
                "final_val_loss": record["final"]["val_loss"],
                "seconds": record["final"]["seconds"],
                "epochs": record["final"]["epoch"],
                "history": str(out.relative_to(HERE) / "history.csv"),
                "grid": [{"settings": p, "final_train_loss": loss} for loss, p, _ in candidates],
            }
            atomic_write(best_path, json.dumps(best, indent=1))
    write_summary(best, results / "summary.md", args.profile,
                  {problem: problem_settings(settings, problem)["label"] for problem in best})
    return 0


def write_summary(best: dict, path: Path, profile: str, labels: dict[str, str]) -> None:
    """A markdown table per problem: best settings, final losses, training time."""
    lines = [f"# Figure 2 — profile {profile}", ""]
    for problem, by_opt in best.items():
        lines += [f"## {problem}", "", f"{labels.get(problem, profile)}.", "",
                  "| optimizer | best settings | final train loss | final val loss | seconds | s/epoch |",
                  "|---|---|---|---|---|---|"]
        for name, r in sorted(by_opt.items(), key=lambda kv: kv[1]["final_train_loss"]):
            per_epoch = r["seconds"] / max(r["epochs"], 1)
            settings = ", ".join(f"{k}={v:g}" for k, v in r["settings"].items())
            lines.append(f"| {name} | {settings} | {r['final_train_loss']:.3f} | {r['final_val_loss']:.3f} | "
                         f"{r['seconds']:.1f} | {per_epoch:.2f} |")
        lines.append("")
    atomic_write(path, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
