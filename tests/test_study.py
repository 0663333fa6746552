"""``fisherlab study``: record → analyze → plot in one command, on a tiny custom problem."""

from __future__ import annotations

import csv

from fisherlab.cli import main
from fisherlab.store import RunReader


def test_study_writes_the_run_the_table_and_the_figures(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--problem", "12-6-12", "--steps", "4", "--every", "2", "--layers", "all", "--methods", "kfac,kpsvd",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[1/3] record" in printed and "[3/3] plot" in printed
    with RunReader(out / "run.h5") as reader:
        assert reader.steps() == [0, 2] and list(reader.layers) == [1, 2]
    with open(out / "errors.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["step"], r["layer"], r["method"]) for r in rows} == {
        (s, layer, m) for s in ("0", "2") for layer in ("1", "2") for m in ("kfac", "kpsvd")}
    assert any(p.suffix == ".png" for p in (out / "figures").iterdir())
    assert main(args) == 2  # an existing study is neither overwritten nor continued unasked
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0]
    assert main([*args, "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
