"""The Figure 2 runner's stages, cache, halving and shared work, and its claim table, on fake runs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from fisherlab.loop import COLUMNS, History

FIG2 = Path(__file__).resolve().parents[1] / "experiments" / "fig2"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fig2_{name}", FIG2 / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(FIG2))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FIG2))
    return module


def _history(losses, seconds_per_epoch=1.0) -> History:
    return History([{**{c: 0.0 for c in COLUMNS}, "epoch": e, "step": 10 * e, "seconds": seconds_per_epoch * e,
                     "train_loss": loss, "val_loss": loss} for e, loss in enumerate(losses)])


def _five_points_halved(root: Path, **profile) -> None:
    """Give the test profile five natural-gradient points (> eta * finalists = 4) and one halving
    rung at epoch 1 that keeps ceil(5 / 2) = 3 of them; ``profile`` sets more keys."""
    config = json.loads((root / "config.json").read_text())
    config["profiles"]["p"]["grids"]["natural"]["lr"] = [0.3, 0.1, 0.03, 0.01, 0.003]
    config["profiles"]["p"].update(halving={"rungs": [1], "eta": 2}, with_variants=[], **profile)
    (root / "config.json").write_text(json.dumps(config))


@pytest.fixture
def runner(tmp_path, monkeypatch):
    run = _load("run")
    monkeypatch.setattr(run, "HERE", tmp_path)
    config = {"optimizers": ["sgd", "kfac"], "variants": {"kfac-block": {"optimizer": "kfac", "args": {"profile": "fisherlab"}}},
              "profiles": {"p": {"label": "test", "problems": ["curves"], "search_epochs": 2, "epochs": 4, "finalists": 2,
                                 "train_subset": None, "t1": 100, "t2": 100, "average": None, "seed": 0,
                                 "natural_args": {"profile": "paper"}, "with_variants": ["kfac-block"],
                                 "grids": {"sgd": {"lr": [0.1, 0.01]},
                                           "natural": {"lr": [0.3, 0.1, 0.01], "damping": [0.1]}}}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    calls = []

    def fake_main(args):
        """Stands in for ``fisherlab train``: a loss that depends on lr only, lr=0.3 diverges."""
        opts, mode = {}, args[-1]
        for i, token in enumerate(args):
            if token.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
                opts[token] = args[i + 1]
        calls.append((opts["--optimizer"], opts.get("--lr"), opts["--epochs"], opts.get("--profile"), mode))
        out, epochs, lr = Path(opts["--out"]), int(opts["--epochs"]), float(opts["--lr"])
        out.mkdir(parents=True, exist_ok=True)
        losses = [math.nan] * (epochs + 1) if lr == 0.3 else [10 - e * (lr + 0.5) for e in range(epochs + 1)]
        _history(losses).write_csv(out / "history.csv")
        (out / "checkpoint.pt").write_text("state")
        settings = {"epochs": epochs, "train_subset": None, "t1": 100, "t2": 100, "seed": 0,
                    "profile": opts.get("--profile", "fisherlab")}
        (out / "run.json").write_text(json.dumps({"settings": settings, "final": {"val_loss": 1.0, "seconds": 1.0,
                                                                                "epoch": epochs}}))
        return 0

    monkeypatch.setattr(run, "fisherlab_main", fake_main)
    return run, calls, tmp_path


def test_search_then_finalists_to_the_full_horizon(runner):
    run, calls, root = runner
    assert run.main(["--profile", "p", "--stage", "search"]) == 0
    assert len(calls) == 2 + 3 + 3  # sgd, kfac and its variant over their grids
    assert {c[2] for c in calls} == {"2"} and all(c[4] == "--resume" for c in calls)
    assert [c[3] for c in calls if c[0] == "kfac"] == ["paper"] * 3 + ["fisherlab"] * 3
    search = json.loads((root / "results" / "p" / "search.json").read_text())
    assert [r["settings"]["lr"] for r in search["curves"]["kfac"]] == [0.1, 0.01, 0.3]
    calls.clear()
    assert run.main(["--profile", "p", "--stage", "final"]) == 0
    # The two best finite search points of each, never the diverged lr = 0.3, at 4 epochs.
    assert sorted((c[0], c[1]) for c in calls) == [("kfac", "0.01"), ("kfac", "0.01"), ("kfac", "0.1"), ("kfac", "0.1"),
                                                   ("sgd", "0.01"), ("sgd", "0.1")]
    best = json.loads((root / "results" / "p" / "best.json").read_text())
    assert best["curves"]["kfac"]["settings"] == {"damping": 0.1, "lr": 0.1}
    assert set(best["curves"]) == {"sgd", "kfac", "kfac-block"}
    calls.clear()
    assert run.main(["--profile", "p", "--stage", "final"]) == 0 and calls == []  # all cached


def test_a_cached_run_with_other_settings_is_run_again(runner):
    run, calls, root = runner
    assert run.main(["--profile", "p", "--stage", "search", "--optimizers", "sgd"]) == 0
    assert sorted(c[1] for c in calls) == ["0.01", "0.1"]
    record = root / "runs" / "p" / "curves" / "search" / "sgd" / "lr=0.1" / "run.json"
    stale = json.loads(record.read_text())
    stale["settings"]["t1"] = 20
    record.write_text(json.dumps(stale))
    calls.clear()
    assert run.main(["--profile", "p", "--stage", "search", "--optimizers", "sgd"]) == 0
    assert calls == [("sgd", "0.1", "2", None, "--force")]
    with pytest.raises(SystemExit, match="unknown optimizer"):
        run.main(["--profile", "p", "--optimizers", "lbfgs"])


def test_runners_skip_and_wait_for_runs_another_runner_holds(runner, monkeypatch):
    run, calls, root = runner
    held = root / "runs" / "p" / "curves" / "search" / "sgd" / "lr=0.1"
    other = run.claim(held)  # another runner's lock on lr = 0.1
    assert other.__enter__() is True
    with run.claim(held) as mine:
        assert mine is False  # a second claim on a held run fails
    waits = []

    def other_runner_finishes(seconds):
        waits.append(seconds)
        _history([10, 9.4, 8.8]).write_csv(held / "history.csv")
        (held / "run.json").write_text(json.dumps({"settings": {"epochs": 2, "train_subset": None, "t1": 100,
                                                                "t2": 100, "seed": 0}}))
        other.__exit__(None, None, None)

    monkeypatch.setattr(run.time, "sleep", other_runner_finishes)
    assert run.main(["--profile", "p", "--stage", "search", "--optimizers", "sgd"]) == 0
    assert [c[1] for c in calls] == ["0.01"] and len(waits) == 1  # never ran the held run, waited once for it
    search = json.loads((root / "results" / "p" / "search.json").read_text())
    assert [r["settings"]["lr"] for r in search["curves"]["sgd"]] == [0.1, 0.01]


def test_successive_halving_continues_the_best_runs_and_checks_more_ranks(runner, monkeypatch):
    run, calls, root = runner
    _five_points_halved(root, check_ranks=[4, 8])
    assert run.main(["--profile", "p", "--stage", "search"]) == 0
    kfac = [(c[1], c[2], c[4]) for c in calls if c[0] == "kfac"]
    # Rung 1: every point one epoch; the best ceil(5 / 2) = 3 finite ones continue to 2 epochs in place.
    assert kfac == [(lr, "1", "--resume") for lr in ("0.3", "0.1", "0.03", "0.01", "0.003")] + [
        (lr, "2", "--resume") for lr in ("0.1", "0.03", "0.01")]
    assert [(c[1], c[2]) for c in calls if c[0] == "sgd"] == [("0.1", "2"), ("0.01", "2")]  # 2 points: in full
    search = json.loads((root / "results" / "p" / "search.json").read_text())
    assert [(r["settings"]["lr"], r["epoch"]) for r in search["curves"]["kfac"]] == [
        (0.1, 2), (0.03, 2), (0.01, 2), (0.003, 1), (0.3, 1)]  # survivors first, the pruned at their rung
    # The survivors are decided once: a survivor another runner is continuing has no history.csv.
    survivors = root / "runs" / "p" / "curves" / "search" / "kfac" / "survivors.json"
    assert [p["lr"] for p in json.loads(survivors.read_text())["survivors"][0]] == [0.1, 0.03, 0.01]
    continued = survivors.parent / "damping=0.1_lr=0.1"
    (continued / "history.csv").rename(survivors.parent / "away.csv")
    assert [p["lr"] for p in run.search_points(run.problem_settings(run.load_config("p"), "curves"), "curves", "kfac",
                                                "p", 1)] == [0.1, 0.03, 0.01]
    # Nor does a runner still on rung 1 wait for it: it finished rung 1 and went on.
    monkeypatch.setattr(run.time, "sleep", lambda seconds: pytest.fail("waited for a survivor's next rung"))
    with run.claim(continued):
        rung_one = next(run.phases(run.load_config("p"), "p", ["curves"], ["kfac"], "search"))
        run.work(run.load_config("p"), "p", "search", rung_one, "cpu", set())
    (survivors.parent / "away.csv").rename(continued / "history.csv")
    calls.clear()
    assert run.main(["--profile", "p", "--stage", "search"]) == 0 and calls == []  # all cached
    assert run.main(["--profile", "p", "--stage", "final"]) == 0
    # Finalists (ranks 1-2) and check rank 4 (the pruned lr = 0.003); rank 8 does not exist.
    assert sorted(c[1] for c in calls if c[0] == "kfac") == ["0.003", "0.03", "0.1"]


def test_search_checkpoints_go_once_their_run_cannot_continue(runner):
    run, calls, root = runner
    _five_points_halved(root)
    settings = run.problem_settings(run.load_config("p"), "curves")
    points = run.grid(settings, "kfac")
    kfac = root / "runs" / "p" / "curves" / "search" / "kfac"

    def rung_one(*lrs):
        for lr in lrs:
            point = next(p for p in points if p["lr"] == lr)
            out = run.run_dir("p", "curves", "search", "kfac", point)
            assert run.ensure_run(settings, "curves", "search", "kfac", point, 1, out, "cpu")
        return sorted(float(path.parent.name.split("lr=")[1])
                      for path in run.spent_checkpoints(settings, "curves", "kfac", "p", 1))

    # The diverged run goes at once; three finished finite runs are not yet beaten by three others.
    assert rung_one(0.3, 0.01, 0.03, 0.1) == [0.3]
    assert rung_one(0.003) == [0.003, 0.3]  # three finished runs beat it: it cannot survive
    assert run.main(["--profile", "p", "--stage", "search"]) == 0
    assert not list((root / "runs").rglob("checkpoint.pt"))  # the last rung's go too
    assert (kfac / "damping=0.1_lr=0.003" / "history.csv").exists()  # the history stays
    assert run.main(["--profile", "p", "--stage", "final"]) == 0
    assert len(list((root / "runs" / "p" / "curves" / "final").rglob("checkpoint.pt"))) == 2 + 2  # kept: extendable


def test_status_counts_runs_done_and_epochs_left_without_running_any(runner, capsys):
    run, calls, root = runner
    _five_points_halved(root)
    settings = run.problem_settings(run.load_config("p"), "curves")

    def status(stage="search"):
        return [tuple(row)[1:] for row in run.progress(settings, "curves", stage, "kfac", "p")]

    assert [r[:5] for r in status()] == [(1, 0, 5, True, 5), (2, 0, 3, False, 3)]  # rung 2: at most 3, 1 epoch each
    assert math.isnan(status()[0][5])  # no finished run to time

    def rung_one(point):
        assert run.ensure_run(settings, "curves", "search", "kfac", point, 1,
                              run.run_dir("p", "curves", "search", "kfac", point), "cpu")

    for point in run.grid(settings, "kfac")[:4]:
        rung_one(point)
    assert status() == [(1, 4, 5, True, 1, 1.0), (2, 0, 3, False, 3, 1.0)]  # the diverged run is not timed
    rung_one(run.grid(settings, "kfac")[4])
    survivors = run.search_points(settings, "curves", "kfac", "p", 1)
    assert [p["lr"] for p in survivors] == [0.1, 0.03, 0.01]
    # A survivor on its way (history gone) finished rung 1; one without its checkpoint starts over.
    first, second = (run.run_dir("p", "curves", "search", "kfac", p) for p in survivors[:2])
    (first / "history.csv").unlink()
    (second / "checkpoint.pt").unlink()
    assert status() == [(1, 5, 5, True, 0, 1.0), (2, 0, 3, True, 1 + 2 + 1, 1.0)]
    assert run.main(["--profile", "p", "--stage", "search"]) == 0
    assert status() == [(1, 5, 5, True, 0, 1.0), (2, 3, 3, True, 0, 1.0)]
    assert status("final") == [(4, 0, 2, True, 8, 1.0)]  # two finalists to 4 epochs, timed by the search's
    calls.clear()
    assert run.main(["--profile", "p", "--stage", "final", "--status"]) == 0 and calls == []
    table = capsys.readouterr().out
    kfac = next(line.split() for line in table.splitlines() if line.startswith("kfac"))
    assert kfac == ["kfac", "4", "0/2", "8", "1.0", "0.00"]
    assert not (root / "runs" / "p" / "curves" / "final").exists()
    one_stage = {k: v for k, v in run.load_config("p").items() if k != "search_epochs"}
    with pytest.raises(SystemExit, match="profile p has no search stage for curves"):
        run.print_progress(one_stage, "p", ["curves"], ["kfac"], "search")


def test_search_runs_skip_the_epoch_rows_where_the_profile_says_so(runner):
    run, _, root = runner
    settings = run.problem_settings(run.load_config("p"), "curves")
    point, out = {"damping": 0.1, "lr": 0.1}, root / "out"
    assert "--no-epoch-rows" not in run.train_args(settings, "curves", "search", "kfac", point, 2, out)
    settings["search_epoch_rows"] = False
    assert "--no-epoch-rows" in run.train_args(settings, "curves", "search", "kfac", point, 2, out)
    assert "--no-epoch-rows" not in run.train_args(settings, "curves", "final", "kfac", point, 4, out)  # the figure's


def test_halving_replayed_on_a_full_search_reports_its_picks_and_cost(runner, monkeypatch):
    run, calls, root = runner
    config = json.loads((root / "config.json").read_text())
    config["profiles"]["p"]["grids"]["natural"]["lr"] = [0.3, 0.1, 0.03, 0.01, 0.003]
    (root / "config.json").write_text(json.dumps(config))
    assert run.main(["--profile", "p", "--stage", "search", "--optimizers", "kfac"]) == 0
    horizon = _load("horizon")
    monkeypatch.setattr(horizon.run, "HERE", root)
    settings = horizon.run.problem_settings(horizon.run.load_config("p"), "curves")
    picks, cost = horizon.replay_halving(settings, "curves", "kfac", "p", [1, 2], eta=2)
    assert [p["lr"] for p in picks] == [0.1, 0.03] and cost == 5 * 1 + 3 * 1
    assert "| kfac | damping=0.1, lr=0.1; damping=0.1, lr=0.03 |" in horizon.report(settings, "curves", "p", ["kfac"], [1], 2)


def test_claims_compare_per_epoch_and_per_second():
    claims = _load("claims")
    fast_per_epoch = _history([10, 6, 3], seconds_per_epoch=4.0)  # lower per epoch, 4x slower
    cheap = _history([10, 8, 6, 5, 4, 3.5, 3.2, 3.1, 3.0], seconds_per_epoch=1.0)
    c = claims.compare(fast_per_epoch, cheap)
    assert c["epoch"] == 2 and c["per_epoch"] == (3, 6)
    assert c["seconds"] == 8.0 and c["per_second"] == (3.0, 3.0)
    assert claims.loss_at_time(fast_per_epoch, 6.0) == pytest.approx(4.5)
    assert claims.close((100.0, 101.5), 0.02) and not claims.close((100.0, 103.0), 0.02)
    rows = claims.claim_rows({"kfac": cheap, "deflation": fast_per_epoch, "sgd": _history([10, 9, 9])}, 0.02)
    assert [(r["a"], r["b"]) for r in rows] == [("kfac", "sgd"), ("deflation", "sgd"), ("deflation", "kfac")]
    last = rows[-1]
    assert last["holds_per_epoch"] and not last["holds_per_second"]
