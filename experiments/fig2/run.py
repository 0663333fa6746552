"""Grid-search runner for Figure 2: every optimizer on every problem over the configured grid.

Each run is ``fisherlab train`` into ``runs/<profile>/<problem>/<stage>/<optimizer>/<settings>/``.
A run whose ``history.csv`` exists is complete and skipped (the cache); any other run is started
or continued from its checkpoint (``--resume``), so the runner can be killed and restarted at any
time and loses at most the steps since the last epoch. A cached run whose ``run.json`` records
other settings than the config now asks for (``CACHE_KEYS``) is reported and run again.

Stages. A profile with ``search_epochs`` is run in two stages:

- ``search``: every grid point for ``search_epochs`` epochs (the short horizon). With a
  ``halving`` spec (``{"rungs": [1, 2], "eta": 3}``) a grid larger than ``eta * finalists``
  points is searched by successive halving: every point runs to the first rung, the best
  ``1/eta`` of them (at least ``finalists``) continue to the next rung, and so on to
  ``search_epochs``. A run continues in its own directory (``--resume``), so a survivor's
  history equals that of a point run straight to the end, and a pruned point keeps the history
  of its last rung. The baselines' eight-point grids are searched in full. Optimizers are
  searched one after another, and a search run's checkpoint is deleted once the run cannot
  continue (``spent_checkpoints``), so that the disk holds about a third of one grid's.
- ``final``: each optimizer's ``finalists`` best search points (deepest rung first, then
  training loss at that rung) for ``epochs`` epochs, plus the search ranks listed in
  ``check_ranks`` (1-based; the check that the short horizon picks what the full one would).

A profile without ``search_epochs`` has one stage, ``final``, over the whole grid. Each optimizer's
best final run (by final training loss; a diverged run counts as +inf) goes into
``results/<profile>/best.json`` and ``results/<profile>/summary.md``; the search ranking into
``results/<profile>/search.json``.

Config keys of a profile (``per_problem: {problem: {key: value}}`` replaces them for one problem):
``label``, ``epochs``, ``search_epochs``, ``halving``, ``finalists``, ``check_ranks``,
``search_epoch_rows`` (false: search runs evaluate only at their end, ``--no-epoch-rows``),
``train_subset``, ``t1``, ``t2``, ``average``, ``seed``, ``grids`` (``sgd``, ``adam``,
``natural`` and optionally one per optimizer or variant), ``natural_args`` (extra
``fisherlab train`` options of the natural-gradient optimizers, such as
``{"profile": "paper"}``) and ``with_variants`` (variants run after the optimizers).
``variants`` (top level) defines each variant: an optimizer run with other options, such as the
block-averaged Deflation of the ablation.

Any number of runners started with the same command share the work (run them with one thread
each): a runner claims a run by an exclusive lock on ``.<run dir>.lock`` beside it, which the
operating system releases when the runner exits or dies, and waits at the end of a rung (and of
the stage) for the runs other runners hold. A run another runner left unfinished is resumed by
whichever runner claims it next. Every runner writes the stage's summary when the stage is done.
``--status`` prints how far a stage is (runs done and run-epochs left per rung, and the training
hours left at the finished runs' pace) and runs nothing.

Usage::

    python experiments/fig2/run.py --profile cpu
    for i in 0 1; do OMP_NUM_THREADS=1 python experiments/fig2/run.py --profile paper --stage search & done
    python experiments/fig2/run.py --profile paper --problems faces --stage search --status
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fisherlab.cli import main as fisherlab_main
from fisherlab.io import atomic_write
from fisherlab.training import CHECKPOINT, History

HERE = Path(__file__).resolve().parent
BASELINES = ("sgd", "adam")
POLL_SECONDS = 10  # how often a runner waiting for another's runs looks again

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
    """The settings in which the cached run in ``out`` differs from ``wanted`` (empty: reusable).

    A run with more epochs than ``wanted`` is reusable (a search run continued to a later rung);
    one with fewer differs (``ensure_run`` continues it). Without ``epochs`` in ``wanted`` only the
    other settings are compared.
    """
    try:
        recorded = json.loads((out / "run.json").read_text())["settings"]
    except (OSError, KeyError, ValueError):
        return ["run.json unreadable"]
    differ = [f"{key}: {recorded.get(key)!r} != {value!r}" for key, value in wanted.items()
              if key != "epochs" and recorded.get(key) != value]
    if "epochs" in wanted and (not isinstance(recorded.get("epochs"), int) or recorded["epochs"] < wanted["epochs"]):
        differ.append(f"epochs: {recorded.get('epochs')!r} < {wanted['epochs']!r}")
    return differ


def grid(settings: dict, name: str) -> list[dict]:
    """Every hyperparameter combination of the grid of ``name`` (its own, else its optimizer's kind)."""
    grids, base = settings["grids"], base_optimizer(settings, name)
    spec = grids.get(name) or grids.get(base) or grids["natural"]
    keys = sorted(spec)
    return [dict(zip(keys, values)) for values in itertools.product(*(spec[k] for k in keys))]


def run_dir(profile: str, problem: str, stage: str, name: str, point: dict) -> Path:
    label = "_".join(f"{k}={v:g}" for k, v in sorted(point.items()))
    return HERE / "runs" / profile / problem / stage / name / label


def train_args(settings: dict, problem: str, stage: str, name: str, point: dict, epochs: int, out: Path) -> list[str]:
    args = ["train", "--problem", problem, "--optimizer", base_optimizer(settings, name), "--out", str(out),
            "--epochs", str(epochs), "--t1", str(settings["t1"]), "--t2", str(settings["t2"]),
            "--seed", str(settings["seed"]), "--no-progress"]
    if settings["average"] is not None:
        args += ["--average", settings["average"]]
    if settings["train_subset"]:
        args += ["--train-subset", str(settings["train_subset"])]
    if stage == "search" and not settings.get("search_epoch_rows", True):
        args.append("--no-epoch-rows")  # the ranking needs the loss at the rung's end only
    for key, value in {**run_options(settings, name), **point}.items():
        args += [f"--{key.replace('_', '-')}", value if isinstance(value, str) else repr(value)]
    return args


def reached(history: History, epochs: list[int]) -> tuple[float, int] | None:
    """``(training loss, epoch)`` at the last of ``epochs`` the run reached, None if it reached none.

    A diverged run (the loop stops at once) counts as +inf at the first of ``epochs`` at or after
    the epoch where it stopped.
    """
    if history.diverged:
        stop = history.rows[-1]["epoch"]
        return math.inf, min((e for e in epochs if e >= stop), default=max(epochs))
    losses = {row["epoch"]: row["train_loss"] for row in history.rows}
    hit = [e for e in epochs if e in losses]
    return (losses[max(hit)], max(hit)) if hit else None


def is_complete(settings: dict, name: str, epochs: int, out: Path) -> bool:
    return (out / "history.csv").exists() and cache_mismatch(expected(settings, name, epochs), out) == []


def ensure_run(settings: dict, problem: str, stage: str, name: str, point: dict, epochs: int, out: Path,
               device: str) -> bool:
    """Bring the run in ``out`` to completion (cached, continued, resumed or started); False if it failed."""
    wanted = expected(settings, name, epochs)
    cached = (out / "history.csv").exists()
    if cached and cache_mismatch(wanted, out) == []:
        return True
    # Only fewer epochs (a search run going on to the next rung): continue it in place.
    stale = cache_mismatch({k: v for k, v in wanted.items() if k != "epochs"}, out) if cached else []
    if stale:
        print(f"[fig2] cached run {out.relative_to(HERE)} has other settings ({'; '.join(stale)}); "
              "running it again", flush=True)
    print(f"[fig2] {problem} {name} {point} {epochs} epochs", flush=True)
    mode = "--force" if stale else "--resume"
    code = fisherlab_main(train_args(settings, problem, stage, name, point, epochs, out) + ["--device", device, mode])
    if code != 0:
        print(f"[fig2] {out.relative_to(HERE)} failed with status {code}", file=sys.stderr, flush=True)
    return code == 0


class Ranked(NamedTuple):
    loss: float
    epoch: int
    point: dict
    out: Path


def ranking(settings: dict, problem: str, stage: str, name: str, profile: str, points: list[dict],
            epochs: list[int]) -> list[Ranked]:
    """The runs among ``points`` that reached one of ``epochs``, each at the last it reached, best first.

    Runs that got further come first (a pruned search point ranks below every survivor), then lower
    training loss at that epoch.
    """
    ranked = []
    for point in points:
        out = run_dir(profile, problem, stage, name, point)
        if not (out / "history.csv").exists():
            continue
        at = reached(History.read_csv(out / "history.csv"), epochs)
        if at is not None:
            ranked.append(Ranked(*at, point, out))
    return sorted(ranked, key=lambda r: (-r.epoch, r.loss))


def search_rungs(settings: dict, name: str) -> list[int]:
    """The epochs at which the search of ``name`` ranks its points (the last is ``search_epochs``)."""
    halving = settings.get("halving")
    if halving and len(grid(settings, name)) > halving["eta"] * settings["finalists"]:
        return [*halving["rungs"], settings["search_epochs"]]
    return [settings["search_epochs"]]


def survivor_count(before: int, eta: int, finalists: int) -> int:
    """How many of ``before`` points continue after a rung: ``1/eta`` of them, at least ``finalists``."""
    return max(finalists, math.ceil(before / eta))


def survivors(ranked: list[Ranked], rung: int, before: int, eta: int, finalists: int) -> list[dict]:
    """The points that continue after ``rung``: the best ``survivor_count`` of ``before`` that are finite."""
    finite = [r.point for r in ranked if r.epoch == rung and math.isfinite(r.loss)]
    return finite[: survivor_count(before, eta, finalists)]


def halving_record(settings: dict, problem: str, name: str, profile: str) -> tuple[Path, dict]:
    """Where the survivors of ``name``'s rungs are kept, and the spec they were decided under."""
    rungs = search_rungs(settings, name)
    spec = {"rungs": rungs, "eta": settings["halving"]["eta"], "finalists": settings["finalists"],
            "grid": grid(settings, name)}
    return HERE / "runs" / profile / problem / "search" / name / "survivors.json", spec


def search_points(settings: dict, problem: str, name: str, profile: str, rung: int) -> list[dict]:
    """The points of ``name`` that run to rung ``rung``: all of the grid at rung 0.

    The survivors of each rung are decided once, by the first runner to get there, and kept in
    ``survivors.json`` beside the runs: another runner may already be continuing some of them
    (which removes their ``history.csv`` until they finish), so they could not be ranked again.
    """
    points = grid(settings, name)
    if rung == 0:
        return points
    path, spec = halving_record(settings, problem, name, profile)
    with locked(path.parent / ".survivors.lock", wait=True):
        saved = json.loads(path.read_text()) if path.exists() else {}
        if saved.get("spec") != spec:
            saved = {"spec": spec, "survivors": []}
        while len(saved["survivors"]) < rung:
            k = len(saved["survivors"])
            before = saved["survivors"][-1] if k else points
            ranked = ranking(settings, problem, "search", name, profile, before, [spec["rungs"][k]])
            saved["survivors"].append(survivors(ranked, spec["rungs"][k], len(before), spec["eta"], settings["finalists"]))
            atomic_write(path, json.dumps(saved, indent=1))
    return saved["survivors"][rung - 1]


def decided_survivors(settings: dict, problem: str, name: str, profile: str) -> list[list[dict]]:
    """The survivors of each rung of ``name``'s search decided so far (none without halving)."""
    if len(search_rungs(settings, name)) == 1:
        return []
    path, spec = halving_record(settings, problem, name, profile)
    saved = json.loads(path.read_text()) if path.exists() else {}
    return saved.get("survivors", []) if saved.get("spec") == spec else []


def moved_on(settings: dict, problem: str, name: str, profile: str, epochs: int) -> set[Path]:
    """The runs that finished the rung ending at ``epochs`` and went on: its survivors, once decided.

    A runner continuing one has removed its ``history.csv``; it must not count as unfinished here,
    or the other runners would wait on this rung for as long as any survivor is running.
    """
    rungs = search_rungs(settings, name)
    if epochs == rungs[-1]:
        return set()
    decided = decided_survivors(settings, problem, name, profile)
    rung = rungs.index(epochs)
    return {run_dir(profile, problem, "search", name, point) for point in decided[rung]} if rung < len(decided) else set()


def check_stage(settings: dict, profile: str, problems: list[str], stage: str) -> None:
    """Exit with one line if a problem has no ``stage`` in ``profile`` (a search needs search_epochs)."""
    for problem in problems:
        if stage == "search" and "search_epochs" not in problem_settings(settings, problem):
            raise SystemExit(f"profile {profile} has no search stage for {problem} (no search_epochs)")


def phases(settings: dict, profile: str, problems: list[str], names: list[str], stage: str) -> Iterator[list[tuple]]:
    """The stage's ``(problem, name, point, epochs, run dir)`` tasks: one list per rung of each
    optimizer's search (optimizer by optimizer, so that only one grid's checkpoints are on disk at
    a time), or one list of every final run.

    A rung's list is computed when the previous one is done (its survivors depend on it).
    """
    check_stage(settings, profile, problems, stage)
    if stage == "final":
        yield [(problem, name, point, problem_settings(settings, problem)["epochs"],
                run_dir(profile, problem, stage, name, point))
               for problem in problems for name in names
               for point in final_points(problem_settings(settings, problem), problem, name, profile)]
        return
    for problem in problems:
        here = problem_settings(settings, problem)
        for name in names:
            rungs = search_rungs(here, name)
            for rung, epochs in enumerate(rungs):
                yield [(problem, name, point, epochs, run_dir(profile, problem, stage, name, point))
                       for point in search_points(here, problem, name, profile, rung)]


def spent_checkpoints(settings: dict, problem: str, name: str, profile: str, epochs: int) -> list[Path]:
    """The checkpoints of the search runs ending at ``epochs`` (a rung) that will never be continued.

    Those of every finished run at the search's last rung (the final stage starts its runs
    afresh), and at an earlier rung those of the finished runs that diverged or that at least as
    many finished runs as survive the rung beat: runs finishing later can only push them further
    down. A checkpoint costs up to a few hundred MB (a rank-2 method's factors on FACES), so a
    128-point grid's would not fit on disk.
    """
    rungs = search_rungs(settings, name)
    rung = rungs.index(epochs)
    points = search_points(settings, problem, name, profile, rung)
    done = [r for r in ranking(settings, problem, "search", name, profile, points, [epochs]) if r.epoch == epochs]
    if rung < len(rungs) - 1:
        keep = survivor_count(len(points), settings["halving"]["eta"], settings["finalists"])
        finite = [r for r in done if math.isfinite(r.loss)]
        done = [r for r in done if not math.isfinite(r.loss)] + finite[keep:]
    return [r.out / CHECKPOINT for r in done if (r.out / CHECKPOINT).exists()]


def final_points(settings: dict, problem: str, name: str, profile: str) -> list[dict]:
    """The whole grid (one-stage profile), or the search's finalists and ``check_ranks`` of ``name``."""
    if "search_epochs" not in settings:
        return grid(settings, name)
    searched = ranking(settings, problem, "search", name, profile, grid(settings, name), search_rungs(settings, name))
    finite = [r.point for r in searched if math.isfinite(r.loss)]
    ranks = range(settings["finalists"])
    if name in settings["optimizers"]:
        ranks = [*ranks, *(rank - 1 for rank in settings.get("check_ranks", []) if rank > settings["finalists"])]
    return [finite[rank] for rank in ranks if rank < len(finite)]


class Progress(NamedTuple):
    name: str
    epochs: int  # the rung's (search) or the full horizon (final)
    done: int
    runs: int  # decided, or at most this many where a rung's survivors are not decided yet
    decided: bool
    epochs_left: int  # run-epochs still to train
    seconds_per_epoch: float  # median training seconds an epoch of the finished runs (NaN: none yet)


def progress(settings: dict, problem: str, stage: str, name: str, profile: str) -> list[Progress]:
    """How far ``name``'s search (one row a rung) or final stage is, read from the run directories.

    Changes nothing: a rung whose survivors are not decided yet counts the most that can survive.
    A run left unfinished without a checkpoint (one killed, or continued on another machine)
    starts over, so its epochs count in full; with one, from the rung before (an upper bound).
    """
    per_epoch = []  # of both stages: an epoch costs the same
    for path in (HERE / "runs" / profile / problem).glob(f"*/{name}/*/history.csv"):
        history = History.read_csv(path)
        last = history.rows[-1]
        if not history.diverged and last["epoch"] > 0:
            per_epoch.append(last["seconds"] / last["epoch"])
    seconds = float(np.median(per_epoch)) if per_epoch else math.nan
    if stage == "final":
        points, horizon = final_points(settings, problem, name, profile), settings["epochs"]
        outs = [run_dir(profile, problem, stage, name, p) for p in points]
        done = sum(is_complete(settings, name, horizon, out) for out in outs)
        return [Progress(name, horizon, done, len(outs), True, (len(outs) - done) * horizon, seconds)]
    decided = decided_survivors(settings, problem, name, profile)
    rows, count, before = [], len(grid(settings, name)), 0
    for k, epochs in enumerate(search_rungs(settings, name)):
        points = grid(settings, name) if k == 0 else decided[k - 1] if k - 1 < len(decided) else None
        if points is None:  # undecided: the most that can survive, each continued from its checkpoint
            count = survivor_count(count, settings["halving"]["eta"], settings["finalists"])
            rows.append(Progress(name, epochs, 0, count, False, count * (epochs - before), seconds))
        else:
            count = len(points)
            went_on = moved_on(settings, problem, name, profile, epochs)
            outs = [run_dir(profile, problem, "search", name, p) for p in points]
            todo = [out for out in outs if out not in went_on and not is_complete(settings, name, epochs, out)]
            left = sum(epochs - before if (out / CHECKPOINT).exists() else epochs for out in todo)
            rows.append(Progress(name, epochs, count - len(todo), count, True, left, seconds))
        before = epochs
    return rows


def print_progress(settings: dict, profile: str, problems: list[str], names: list[str], stage: str) -> None:
    """The ``--status`` table: runs done and run-epochs left per rung, and the training hours left."""
    check_stage(settings, profile, problems, stage)
    for problem in problems:
        here = problem_settings(settings, problem)
        print(f"{problem}, {stage} stage (profile {profile})")
        print(f"{'optimizer':<22}{'epochs':>7}{'runs done':>14}{'epochs left':>13}{'s/epoch':>9}{'hours left':>12}")
        total, unknown = 0.0, []
        for name in names:
            for row in progress(here, problem, stage, name, profile):
                runs = f"{row.done}/{row.runs}" if row.decided else f"0/<={row.runs}"
                hours = row.epochs_left * row.seconds_per_epoch / 3600
                if row.epochs_left and math.isnan(hours):
                    unknown.append(name)
                elif row.epochs_left:
                    total += hours
                print(f"{row.name:<22}{row.epochs:>7}{runs:>14}{row.epochs_left:>13}{row.seconds_per_epoch:>9.1f}"
                      f"{hours:>12.2f}")
        missing = f" (and {', '.join(sorted(set(unknown)))}, with no finished run to time)" if unknown else ""
        print(f"training hours left: {total:.2f} on one runner{missing}; evaluation and start-up come on top")


@contextlib.contextmanager
def locked(lock: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``lock``; without ``wait`` yield False if another process has it.

    The operating system releases the lock when its process exits or dies.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim(out: Path) -> contextlib.AbstractContextManager[bool]:
    """This runner's hold on the run in ``out``: yields False if another runner has it."""
    return locked(out.parent / f".{out.name}.lock", wait=False)


def work(settings: dict, profile: str, stage: str, todo: list[tuple], device: str, failed: set[Path]) -> None:
    """Run every task of ``todo`` no other runner holds; return when each is complete or failed here.

    In the search, the checkpoints of runs that will not continue go as soon as that is known.
    """
    def tidy(problem: str, name: str, epochs: int) -> None:
        if stage == "search":
            for path in spent_checkpoints(problem_settings(settings, problem), problem, name, profile, epochs):
                path.unlink(missing_ok=True)

    rungs = {(t[0], t[1], t[3]) for t in todo}
    waiting = False
    while True:
        gone = set().union(*(moved_on(problem_settings(settings, problem), problem, name, profile, epochs)
                             for problem, name, epochs in rungs)) if stage == "search" else set()
        pending = [t for t in todo if t[4] not in failed and t[4] not in gone
                   and not is_complete(problem_settings(settings, t[0]), t[1], t[3], t[4])]
        if not pending:
            for problem, name, epochs in rungs:
                tidy(problem, name, epochs)
            return
        ran = False
        for problem, name, point, epochs, out in pending:
            with claim(out) as mine:
                here = problem_settings(settings, problem)
                if not mine or is_complete(here, name, epochs, out):
                    continue
                ran = True
                if not ensure_run(here, problem, stage, name, point, epochs, out, device):
                    failed.add(out)
            tidy(problem, name, epochs)
        if not ran:
            if not waiting:
                print(f"[fig2] waiting for {len(pending)} runs held by another runner", flush=True)
            waiting = True
            time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--problems", nargs="+")
    parser.add_argument("--optimizers", nargs="+", help="optimizer or variant names (default: the config's)")
    parser.add_argument("--stage", choices=("search", "final"), default="final")
    parser.add_argument("--device", default="cpu", help="of every run (default: cpu)")
    parser.add_argument("--status", action="store_true",
                        help="print the stage's runs done and left, and the training hours left; run nothing")
    args = parser.parse_args(argv)
    settings = load_config(args.profile)
    problems = args.problems or settings["problems"]
    names = args.optimizers or [*settings["optimizers"], *settings.get("with_variants", [])]
    unknown = [n for n in names if base_optimizer(settings, n) not in settings["optimizers"]]
    if unknown:
        raise SystemExit(f"unknown optimizer or variant {', '.join(unknown)}")
    if args.status:
        print_progress(settings, args.profile, problems, names, args.stage)
        return 0
    failed: set[Path] = set()
    for todo in phases(settings, args.profile, problems, names, args.stage):
        work(settings, args.profile, args.stage, todo, args.device, failed)
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
            epochs = search_rungs(here, name) if stage == "search" else [here["epochs"]]
            ranked = ranking(here, problem, stage, name, profile, grid(here, name), epochs)
            if not ranked:
                continue
            grid_rows = [{"settings": r.point, "epoch": r.epoch, "final_train_loss": r.loss,
                          "history": str(r.out.relative_to(HERE) / "history.csv")} for r in ranked]
            if stage == "search":
                table.setdefault(problem, {})[name] = grid_rows
                continue
            loss, epoch, point, out = ranked[0]
            run_settings = json.loads((out / "run.json").read_text())["settings"]
            rows = History.read_csv(out / "history.csv").rows
            row = next((r for r in rows if r["epoch"] == epoch), rows[-1])  # a diverged run may stop early
            table.setdefault(problem, {})[name] = {
                "settings": point,
                "label": here["label"],
                "run": {key: run_settings.get(key) for key in ("n_train", "batch_size", "t1", "t2", "average",
                                                               "profile", "kl_form", "seed")},
                "final_train_loss": loss,
                "final_val_loss": row["val_loss"],
                "seconds": row["seconds"],
                "epochs": epoch,
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
