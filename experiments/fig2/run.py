"""Grid-search runner for Figure 2: every optimizer on every problem over the configured grid.

Each run is ``fisherlab train`` into ``runs/<profile>/<problem>/<stage>/<optimizer>/<settings>/``.
A run whose ``history.csv`` exists is complete and skipped (the cache); any other run is started
or continued from its checkpoint (``--resume``), so the runner can be killed and restarted at any
time and loses at most the steps since the last epoch. A cached run whose ``run.json`` records
other settings than the config now asks for (``CACHE_KEYS``) is reported and run again.

Stages. A profile with ``search_epochs`` is run in two stages:

- ``search``: every grid point for ``search_epochs`` epochs (the short horizon);
- ``final``: each optimizer's ``finalists`` best search points (by training loss at the end of
  the search) for ``epochs`` epochs.

A profile without ``search_epochs`` has one stage, ``final``, over the whole grid. Each optimizer's
best final run (by final training loss; a diverged run counts as +inf) goes into
``results/<profile>/best.json`` and ``results/<profile>/summary.md``; the search ranking into
``results/<profile>/search.json``.

Config keys of a profile (``per_problem: {problem: {key: value}}`` replaces them for one problem):
``label``, ``epochs``, ``search_epochs``, ``finalists``, ``train_subset``, ``t1``, ``t2``,
``average``, ``seed``, ``grids`` (``sgd``, ``adam``, ``natural`` and optionally one per optimizer
or variant), ``natural_args`` (extra ``fisherlab train`` options of the natural-gradient
optimizers, such as ``{"profile": "paper"}``) and ``with_variants`` (variants run after the
optimizers). ``variants`` (top level) defines each variant: an optimizer run with other options,
such as the block-averaged Deflation of the ablation.

Two runners share the work with ``--shard 0/2`` and ``--shard 1/2`` (one thread each); a sharded
runner writes no summary, so run it once more without ``--shard`` afterwards (everything cached).

Usage::

    python experiments/fig2/run.py --profile cpu
    OMP_NUM_THREADS=1 python experiments/fig2/run.py --profile paper --problems curves --stage search --shard 0/2
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
BASELINES = ("sgd", "adam")

#: Settings a cached run's ``run.json`` must match to be reused (config key -> run.json key).
CACHE_KEYS = {"epochs": "epochs", "train_subset": "train_subset", "t1": "t1", "t2": "t2",
              "average": "average", "seed": "seed"}


def load_config(profile: str) -> dict:
    config = json.loads((HERE / "config.json").read_text())
    if profile not in config["profiles"]:
        raise SystemExit(f"unknown profile {profile!r}; choose from {', '.join(config['profiles'])}")
    return {**config["profiles"][profile], "optimizers": config["optimizers"],
            "variants": config.get("variants", {})}


def problem_settings(settings: dict, problem: str) -> dict:
    """The profile's settings with ``per_problem[problem]`` laid over them (keys starting with _ ignored)."""
    override = settings.get("per_problem", {}).get(problem, {})
    merged = {k: v for k, v in settings.items() if k != "per_problem"}
    merged.update({k: v for k, v in override.items() if not k.startswith("_")})
    return merged


def base_optimizer(settings: dict, name: str) -> str:
    """The ``fisherlab train --optimizer`` of an optimizer or variant name."""
    return settings["variants"].get(name, {}).get("optimizer", name)


def run_options(settings: dict, name: str) -> dict:
    """Extra ``fisherlab train`` options of ``name``: the profile's natural_args, then the variant's."""
    if base_optimizer(settings, name) in BASELINES:
        return {}
    return {**settings.get("natural_args", {}), **settings["variants"].get(name, {}).get("args", {})}


def expected(settings: dict, name: str, epochs: int) -> dict:
    """The run.json settings a cached run of ``name`` must have (``CACHE_KEYS`` and ``run_options``)."""
    wanted = {rkey: settings[key] for key, rkey in CACHE_KEYS.items()}
    wanted.update(epochs=epochs, train_subset=settings["train_subset"] or None)  # null or 0: all of it
    if settings["average"] is None or base_optimizer(settings, name) in BASELINES:
        del wanted["average"]  # the optimizer's profile chooses it
    wanted.update({key.replace("-", "_"): value for key, value in run_options(settings, name).items()})
    return wanted


def cache_mismatch(wanted: dict, out: Path) -> list[str]:
    """The settings in which the cached run in ``out`` differs from ``wanted`` (empty: reusable)."""
    try:
        recorded = json.loads((out / "run.json").read_text())["settings"]
    except (OSError, KeyError, ValueError):
        return ["run.json unreadable"]
    return [f"{key}: {recorded.get(key)!r} != {value!r}" for key, value in wanted.items() if recorded.get(key) != value]


def grid(settings: dict, name: str) -> list[dict]:
    """Every hyperparameter combination of the grid of ``name`` (its own, else its optimizer's kind)."""
    grids, base = settings["grids"], base_optimizer(settings, name)
    spec = grids.get(name) or grids.get(base) or grids["natural"]
    keys = sorted(spec)
    return [dict(zip(keys, values)) for values in itertools.product(*(spec[k] for k in keys))]


def run_dir(profile: str, problem: str, stage: str, name: str, point: dict) -> Path:
    label = "_".join(f"{k}={v:g}" for k, v in sorted(point.items()))
    return HERE / "runs" / profile / problem / stage / name / label


def train_args(settings: dict, problem: str, name: str, point: dict, epochs: int, out: Path) -> list[str]:
    args = ["train", "--problem", problem, "--optimizer", base_optimizer(settings, name), "--out", str(out),
            "--epochs", str(epochs), "--t1", str(settings["t1"]), "--t2", str(settings["t2"]),
            "--seed", str(settings["seed"]), "--no-progress"]
    if settings["average"] is not None:
        args += ["--average", settings["average"]]
    if settings["train_subset"]:
        args += ["--train-subset", str(settings["train_subset"])]
    for key, value in {**run_options(settings, name), **point}.items():
        args += [f"--{key.replace('_', '-')}", value if isinstance(value, str) else repr(value)]
    return args


def final_train_loss(history: History) -> float:
    last = history.rows[-1]["train_loss"]
    return last if math.isfinite(last) and not history.diverged else math.inf


def ensure_run(settings: dict, problem: str, name: str, point: dict, epochs: int, out: Path, device: str) -> bool:
    """Bring the run in ``out`` to completion (cached, resumed or started); False if it failed."""
    wanted = expected(settings, name, epochs)
    stale = cache_mismatch(wanted, out) if (out / "history.csv").exists() else None
    if stale == []:
        return True
    if stale:
        print(f"[fig2] cached run {out.relative_to(HERE)} has other settings ({'; '.join(stale)}); "
              "running it again", flush=True)
    print(f"[fig2] {problem} {name} {point} {epochs} epochs", flush=True)
    mode = "--force" if stale else "--resume"
    code = fisherlab_main(train_args(settings, problem, name, point, epochs, out) + ["--device", device, mode])
    if code != 0:
        print(f"[fig2] {out.relative_to(HERE)} failed with status {code}", file=sys.stderr, flush=True)
    return code == 0


def ranking(settings: dict, problem: str, stage: str, name: str, profile: str, points: list[dict]) -> list[tuple]:
    """``(final train loss, point, run dir)`` of the complete runs among ``points``, best first."""
    ranked = []
    for point in points:
        out = run_dir(profile, problem, stage, name, point)
        if (out / "history.csv").exists():
            ranked.append((final_train_loss(History.read_csv(out / "history.csv")), point, out))
    return sorted(ranked, key=lambda c: c[0])


def tasks(settings: dict, profile: str, problems: list[str], names: list[str], stage: str) -> list[tuple]:
    """Every ``(problem, name, point, epochs, run dir)`` of ``stage``, in a fixed order."""
    todo = []
    for problem in problems:
        here = problem_settings(settings, problem)
        two_stage = "search_epochs" in here
        if stage == "search" and not two_stage:
            raise SystemExit(f"profile {profile} has no search stage for {problem} (no search_epochs)")
        for name in names:
            if stage == "search" or not two_stage:
                points, epochs = grid(here, name), here["search_epochs"] if stage == "search" else here["epochs"]
            else:
                searched = ranking(here, problem, "search", name, profile, grid(here, name))
                finite = [point for loss, point, _ in searched if math.isfinite(loss)]
                points, epochs = finite[: here["finalists"]], here["epochs"]
            todo += [(problem, name, point, epochs, run_dir(profile, problem, stage, name, point)) for point in points]
    return todo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--problems", nargs="+")
    parser.add_argument("--optimizers", nargs="+", help="optimizer or variant names (default: the config's)")
    parser.add_argument("--stage", choices=("search", "final"), default="final")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th task starting at the i-th")
    parser.add_argument("--device", default="cpu", help="of every run (default: cpu)")
    args = parser.parse_args(argv)
    settings = load_config(args.profile)
    problems = args.problems or settings["problems"]
    names = args.optimizers or [*settings["optimizers"], *settings.get("with_variants", [])]
    unknown = [n for n in names if base_optimizer(settings, n) not in settings["optimizers"]]
    if unknown:
        raise SystemExit(f"unknown optimizer or variant {', '.join(unknown)}")
    index, count = (int(part) for part in args.shard.split("/"))
    if not 0 <= index < count:
        raise SystemExit(f"--shard i/n needs 0 <= i < n, got {args.shard}")
    todo = tasks(settings, args.profile, problems, names, args.stage)
    failed = 0
    for problem, name, point, epochs, out in todo[index::count]:
        failed += not ensure_run(problem_settings(settings, problem), problem, name, point, epochs, out, args.device)
    if count == 1:
        summarise(settings, args.profile, problems, names, args.stage)
    return 1 if failed else 0


def summarise(settings: dict, profile: str, problems: list[str], names: list[str], stage: str) -> None:
    """Write the search ranking or the best final runs of every (problem, optimizer) that has runs."""
    results = HERE / "results" / profile
    path = results / ("search.json" if stage == "search" else "best.json")
    table = json.loads(path.read_text()) if path.exists() else {}
    for problem in problems:
        here = problem_settings(settings, problem)
        for name in names:
            ranked = ranking(here, problem, stage, name, profile, grid(here, name))
            if not ranked:
                continue
            grid_rows = [{"settings": p, "final_train_loss": loss, "history": str(o.relative_to(HERE) / "history.csv")}
                         for loss, p, o in ranked]
            if stage == "search":
                table.setdefault(problem, {})[name] = grid_rows
                continue
            loss, point, out = ranked[0]
            record = json.loads((out / "run.json").read_text())
            run_settings = record["settings"]
            table.setdefault(problem, {})[name] = {
                "settings": point,
                "label": here["label"],
                "run": {key: run_settings.get(key) for key in ("epochs", "n_train", "batch_size", "t1", "t2", "average",
                                                               "profile", "kl_form", "seed")},
                "final_train_loss": loss,
                "final_val_loss": record["final"]["val_loss"],
                "seconds": record["final"]["seconds"],
                "epochs": record["final"]["epoch"],
                "history": str(out.relative_to(HERE) / "history.csv"),
                "grid": grid_rows,
            }
    atomic_write(path, json.dumps(table, indent=1))
    if stage == "final":
        write_summary(table, results / "summary.md", profile,
                      {problem: problem_settings(settings, problem)["label"] for problem in table})


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
