"""analyze on run files with shared-weight blocks: every method, and KFAC in both forms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fisherlab.analysis import analyze, load_results, read_table
from fisherlab.record import record
from fisherlab.store import RunReader

EXAMPLE = str(Path(__file__).parent.parent / "examples" / "small_cnn.py") + ":build"


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cnn")
    run = folder / "run.h5"
    record(model=EXAMPLE, out=run, steps=4, every=3, batch_size=16, progress=False)  # expand, with reduce's factors
    table = analyze(run, progress=False)
    return run, read_table(table)


def _dense_error1(f: torch.Tensor, act: torch.Tensor, grad: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(f - torch.kron(act, grad)) / torch.linalg.matrix_norm(f))


def test_every_method_and_both_kfac_forms(analyzed):
    run, rows = analyzed
    by_key = {(r["step"], r["layer"], r["method"]): r for r in rows}
    methods = {r["method"] for r in rows}
    assert {"kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "kronecker_svd", "kfac_reduce"} == methods
    assert all(r["status"] == "ok" for r in rows)
    with RunReader(run) as reader:
        for step in reader.steps():
            for layer, spec in reader.layer_specs.items():
                assert ((step, layer, "kfac_reduce") in by_key) == spec.shared  # a T = 1 layer has one KFAC
                block = reader.stats(step, layer)
                f = block.to_dense()
                if spec.shared:  # KFAC-expand is the recorded form (kfac), KFAC-reduce the other row
                    for method, form in (("kfac", "expand"), ("kfac_reduce", "reduce")):
                        expected = _dense_error1(f, *block.kfac_factors(form))
                        assert by_key[(step, layer, method)]["error1"] == pytest.approx(expected, rel=1e-9)
                errors = {m: by_key[(step, layer, m)]["error1"] for m in methods if (step, layer, m) in by_key}
                assert errors["kronecker_svd"] <= min(errors.values()) + 1e-9


def test_results_list_the_variant_after_the_registry(analyzed):
    run, _ = analyzed
    assert load_results(run).methods[-1] == "kfac_reduce"


def test_a_second_analysis_has_nothing_to_do(analyzed):
    run, rows = analyzed
    before = RunReader(run)
    keys = before.analysis_keys()
    before.close()
    analyze(run, progress=False)
    with RunReader(run) as reader:
        assert reader.analysis_keys() == keys


def test_one_recorded_form_gives_no_variant_row(tmp_path):
    run = tmp_path / "run.h5"
    record(model=EXAMPLE, out=run, steps=1, batch_size=16, progress=False, kfac="reduce")
    with RunReader(run) as reader:
        assert reader.kfac_forms(0, 1) == ["reduce"] and reader.kfac_forms(0, 3) == []
        assert reader.config["kfac_both"] is False
    rows = read_table(analyze(run, progress=False, methods=["kfac"]))
    assert {r["method"] for r in rows} == {"kfac"} and len(rows) == 3
