"""The Figure 2 runner's stages, cache and shards, and its claim table, on fake runs."""

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


def test_a_cached_run_with_other_settings_is_run_again_and_shards_split_the_work(runner):
    run, calls, root = runner
    assert run.main(["--profile", "p", "--stage", "search", "--optimizers", "sgd", "--shard", "0/2"]) == 0
    assert run.main(["--profile", "p", "--stage", "search", "--optimizers", "sgd", "--shard", "1/2"]) == 0
    assert sorted(c[1] for c in calls) == ["0.01", "0.1"]
    assert not (root / "results" / "p" / "search.json").exists()  # shards write no summary
    record = root / "runs" / "p" / "curves" / "search" / "sgd" / "lr=0.1" / "run.json"
    stale = json.loads(record.read_text())
    stale["settings"]["t1"] = 20
    record.write_text(json.dumps(stale))
    calls.clear()
    assert run.main(["--profile", "p", "--stage", "search", "--optimizers", "sgd"]) == 0
    assert calls == [("sgd", "0.1", "2", None, "--force")]
    with pytest.raises(SystemExit, match="unknown optimizer"):
        run.main(["--profile", "p", "--optimizers", "lbfgs"])


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
