import csv
import sys

import h5py
import pytest
import torch

from fisherlab.analysis import COLUMNS, analyze, load_results, read_table
from fisherlab.cli import main
from fisherlab.errors import UserInputError
from fisherlab.kron import BlockStats, fit
from fisherlab.kron.metrics import dense_error1, dense_error2
from fisherlab.store import RunReader, RunWriter

LAYERS = {1: (4, 3), 2: (3, 5)}


def _stats(gen, n, d_in, d_out):
    a = torch.relu(torch.randn(n, d_in + 1, generator=gen, dtype=torch.float64))
    a[:, 0] = 1
    return BlockStats(a, 1e-3 * torch.randn(n, d_out, generator=gen, dtype=torch.float64))


@pytest.fixture
def run_file(tmp_path):
    """A tiny recorded run: three steps, two layers, float64 statistics and dense blocks."""
    path = tmp_path / "run.h5"
    gen = torch.Generator().manual_seed(0)
    with RunWriter(path, {"problem": "synthetic", "fisher_type": "mc", "batch_size": 9}, LAYERS) as writer:
        for k, step in enumerate((0, 5, 10)):
            stats = {i: _stats(gen, 9, *dims) for i, dims in LAYERS.items()}
            writer.write_step(step, k, 1.0 / (k + 1), stats)
    return path


def test_errors_equal_dense_computations_from_the_stored_blocks(run_file, tmp_path):
    table = analyze(run_file, out_dir=tmp_path / "out", progress=False, tol=1e-12, error2_rtol=0)
    rows = list(csv.DictReader(open(table)))
    assert tuple(rows[0].keys()) == COLUMNS
    assert len(rows) == 3 * 2 * 6
    with RunReader(run_file) as reader:
        for row in rows:
            step, layer = int(row["step"]), int(row["layer"])
            dense = reader.dense(step, layer)
            options = {"tol": 1e-12} if row["method"] not in ("kfac", "kronecker_svd") else {}
            approx = fit(row["method"], reader.stats(step, layer), **options)
            dense_hat = approx.op.to_dense()
            assert float(row["error1"]) == pytest.approx(dense_error1(dense, dense_hat), rel=1e-8)
            assert float(row["error2"]) == pytest.approx(dense_error2(dense, dense_hat), rel=1e-8, abs=1e-10)


def test_warm_start_is_used_after_the_first_step(run_file):
    analyze(run_file, methods=["deflation"], progress=False)
    rows = load_results(run_file).rows
    assert [r["warm_started"] for r in rows if r["layer"] == 1] == [False, True, True]


def test_resumed_analysis_gives_the_same_table(run_file, tmp_path, monkeypatch):
    full = tmp_path / "full.h5"
    full.write_bytes(run_file.read_bytes())
    ref = open(analyze(full, out_dir=tmp_path / "a", progress=False, warm_start=False)).read()

    import fisherlab.analysis as analysis_module

    calls = {"n": 0}
    real_fit = analysis_module.fit

    def dying_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed mid-way
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(analysis_module, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        analyze(run_file, out_dir=tmp_path / "b", progress=False, warm_start=False)
    monkeypatch.setattr(analysis_module, "fit", real_fit)
    resumed = open(analyze(run_file, out_dir=tmp_path / "b", progress=False, warm_start=False)).read()

    def strip_timing(text):
        rows = list(csv.DictReader(text.splitlines()))
        return [{k: v for k, v in r.items() if k not in ("seconds", "error_seconds")} for r in rows]

    assert strip_timing(resumed) == strip_timing(ref)


def test_results_expose_spectra_and_profiles(run_file):
    analyze(run_file, methods=["kfac", "lanczos"], progress=False)
    results = load_results(run_file)
    assert results.methods == ["kfac", "lanczos"] and results.layers == [1, 2] and results.steps == [0, 5, 10]
    spectra = results.spectra(5, 2)
    assert set(spectra) == {"exact_block", "kfac", "lanczos"}
    assert spectra["exact_block"].shape == (9,)
    steps, profiles = results.profiles(1)
    assert steps == [0, 5, 10] and profiles[0][0] >= profiles[0][-1]


def test_results_stored_under_the_former_name_gram_svd_still_read(run_file, tmp_path, monkeypatch):
    table = analyze(run_file, out_dir=tmp_path, methods=["kfac", "kronecker_svd"], progress=False)
    expected = load_results(run_file).rows
    assert read_table(table) == expected
    old_table = tmp_path / "old.csv"
    old_table.write_text(table.read_text().replace(",kronecker_svd,", ",gram_svd,"))
    assert "gram_svd" in old_table.read_text()
    assert read_table(old_table) == expected
    with h5py.File(run_file, "a") as fh:  # the groups as the code before the rename named them
        for step in fh["analysis"].values():
            for layer in step.values():
                layer.move("kronecker_svd", "gram_svd")
    results = load_results(run_file)
    assert results.rows == expected and results.methods == ["kfac", "kronecker_svd"]
    assert set(results.spectra(5, 2)) == {"exact_block", "kfac", "kronecker_svd"}

    import fisherlab.analysis as analysis_module

    def no_fit(*args, **kwargs):
        raise AssertionError("a result stored under the former name was fitted again")

    monkeypatch.setattr(analysis_module, "fit", no_fit)
    assert read_table(analyze(run_file, out_dir=tmp_path, methods=["kronecker_svd"], progress=False)) == expected


def test_read_table_rejects_what_is_not_an_errors_table(tmp_path):
    with pytest.raises(UserInputError, match="no such"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "history.csv").write_text("epoch,train_loss\n1,0.5\n")
    with pytest.raises(UserInputError, match="not an errors table"):
        read_table(tmp_path / "history.csv")


def test_cli_analyze_and_bad_input(run_file, tmp_path, capsys):
    assert main(["analyze", str(run_file), "--methods", "kfac,kpsvd", "--quiet"]) == 0
    assert (run_file.parent / "errors.csv").exists()
    capsys.readouterr()
    for argv in (
        ["analyze", str(tmp_path / "missing.h5")],
        ["analyze", str(run_file), "--methods", "kfac,magic"],
        ["analyze", str(run_file), "--analysis-layers", "7"],
        ["analyze", str(run_file), "--rank", "0"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err, (argv, err)
    foreign = tmp_path / "foreign.h5"
    foreign.write_text("not hdf5")
    assert main(["analyze", str(foreign)]) == 2


def test_cli_names_the_new_name_of_gram_svd(run_file, capsys):
    assert main(["analyze", str(run_file), "--methods", "gram_svd", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gram_svd is now kronecker_svd" in err


@pytest.fixture(params=[0.0, 1e-80], ids=["zero", "underflow"])
def dead_run(tmp_path, request):
    """Two steps of two layers; layer 2's g at step 5 is zero (dead ReLUs above it) or so small
    that the block's squared norm underflows (zero to rounding)."""
    path = tmp_path / "dead.h5"
    gen = torch.Generator().manual_seed(1)
    with RunWriter(path, {"problem": "synthetic", "fisher_type": "mc", "batch_size": 9}, LAYERS) as writer:
        for k, step in enumerate((0, 5)):
            stats = {i: _stats(gen, 9, *dims) for i, dims in LAYERS.items()}
            if step == 5:
                stats[2] = BlockStats(stats[2].a, stats[2].g * request.param)
            writer.write_step(step, k, 1.0, stats)
    return path


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_dead_layer_is_analyzed_with_a_zero_block_status(dead_run, capsys):
    assert main(["analyze", str(dead_run), "--quiet"]) == 0
    assert "zero blocks" in capsys.readouterr().out
    rows = _csv(dead_run.parent / "errors.csv")
    assert len(rows) == 2 * 2 * 6
    for row in rows:
        dead = (row["step"], row["layer"]) == ("5", "2")
        assert row["status"] == ("zero block" if dead else "ok"), row
        if dead:  # undefined, left empty: no NaN without a reason
            assert row["error1"] == row["error2"] == "" and row["converged"] == "True" and row["iterations"] == "0"
        else:
            assert 0 <= float(row["error1"]) < 1 and 0 <= float(row["error2"]) < 1
    with RunReader(dead_run) as reader:
        _, attrs = reader.read_analysis(5, 2, "exact_block")
        assert attrs["status"] == "zero block" and attrs["frobenius_norm"] < 1e-150
        assert reader.read_analysis(5, 2, "lanczos")[1]["error1"] is None
    # A rerun finds every row done.
    assert main(["analyze", str(dead_run), "--quiet"]) == 0
    assert _csv(dead_run.parent / "errors.csv") == rows


def test_a_failing_fit_is_recorded_and_the_analysis_goes_on(run_file, monkeypatch, capsys):
    import fisherlab.analysis as analysis_module

    real_fit = analysis_module.fit

    def failing_fit(method, stats, **kwargs):
        if method == "deflation" and stats.d_grad == 5:
            raise RuntimeError("linalg.svd: the algorithm failed to converge\nsecond line")
        return real_fit(method, stats, **kwargs)

    monkeypatch.setattr(analysis_module, "fit", failing_fit)
    assert main(["analyze", str(run_file), "--quiet"]) == 0
    assert "3 of 36 results failed" in capsys.readouterr().err
    rows = _csv(run_file.parent / "errors.csv")
    failed = [r for r in rows if r["status"] != "ok"]
    assert {(r["layer"], r["method"]) for r in failed} == {("2", "deflation")} and len(failed) == 3
    assert failed[0]["status"] == "failed: RuntimeError: linalg.svd: the algorithm failed to converge"
    assert failed[0]["error1"] == "" and failed[0]["rank"] == "2"
    assert main(["analyze", str(run_file), "--quiet", "--strict"]) == 1  # retried, fails again
    capsys.readouterr()
    monkeypatch.setattr(analysis_module, "fit", real_fit)
    assert main(["analyze", str(run_file), "--quiet", "--strict"]) == 0  # the failed rows are redone
    assert {r["status"] for r in _csv(run_file.parent / "errors.csv")} == {"ok"}


def test_old_results_without_status_read_and_nan_ones_are_redone(run_file):
    analyze(run_file, methods=["kfac"], progress=False)
    with RunReader(run_file, mode="a") as reader:  # as an older fisherlab wrote them
        for step, layer, method in reader.analysis_keys():
            arrays, attrs = reader.read_analysis(step, layer, method)
            attrs.pop("status")
            if (step, layer) == (5, 1) and method == "kfac":
                attrs["error1"] = attrs["error2"] = float("nan")
            reader.write_analysis(step, layer, method, arrays, attrs)
    rows = load_results(run_file).rows
    assert {r["status"] for r in rows} == {"ok"}
    analyze(run_file, methods=["kfac"], progress=False)
    with RunReader(run_file) as reader:
        assert reader.read_analysis(5, 1, "kfac")[1]["status"] == "ok"  # redone
        assert "status" not in reader.read_analysis(0, 1, "kfac")[1]  # kept


def test_without_dask_the_parallel_options_say_how_to_install_it(run_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails as if not installed
    assert main(["analyze", str(run_file), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "dask[distributed]"' in err


def test_the_progress_bar_names_the_method_in_hand(run_file, monkeypatch):
    import fisherlab.analysis as analysis_module

    seen = []
    monkeypatch.setattr(analysis_module, "_postfix", lambda bar, **info: seen.append(info))
    analyze(run_file, methods=["kfac", "lanczos"], progress=True)
    assert seen[:2] == [{"step": 0, "layer": 1, "method": "kfac"}, {"step": 0, "layer": 1, "method": "lanczos"}]
    assert len(seen) == 3 * 2 * 2
