"""The method registry: one record per method, one validation for fit() and the optimizer."""

import dataclasses

import pytest

from fisherlab.analysis import DEFAULT_METHODS
from fisherlab.kron import METHODS, current_name, fit, validate
from fisherlab.kron.solve import MAX_TERMS
from fisherlab.optim import PRESETS, NaturalGradient
from fisherlab.plots import style
from fisherlab.problems import get_problem
from tests.conftest import CASES

PAPER = ["kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected"]


@pytest.mark.parametrize("name", list(METHODS))
def test_each_record_is_consistent_with_its_fitter(name):
    m = METHODS[name]
    assert m.name == name and m.label
    assert validate(name)[1] == m.default_rank
    assert set(m.analysis_options) <= set(m.options)
    if m.optimizer_options is not None:
        assert set(m.optimizer_options) <= set(m.options)
        assert validate(name, optimizer=True)[2] == dict(m.optimizer_options)
        assert m.optimizer_ranks and max(m.optimizer_ranks) <= MAX_TERMS
    result = fit(name, CASES["random"]())
    assert result.info.method == name and result.op.rank == m.default_rank


def test_registry_order_and_who_uses_it():
    assert list(METHODS) == [*PAPER, "kronecker_svd"]
    assert DEFAULT_METHODS == tuple(METHODS)
    assert list(PRESETS) == PAPER
    assert list(style.LABELS)[: len(METHODS)] == list(METHODS)
    assert style.label("kronecker_svd") == "Kronecker SVD (exact)"
    assert [METHODS[m].warm_starts for m in METHODS] == [False, True, True, True, True, False]


def test_records_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["kfac"].default_rank = 2
    with pytest.raises(TypeError):
        METHODS["kpsvd"].optimizer_options["tol"] = 1.0
    with pytest.raises(TypeError):
        METHODS["kfac"] = METHODS["kpsvd"]


def test_validation_of_names_ranks_and_options():
    with pytest.raises(ValueError, match=", ".join(METHODS)):
        validate("magic")
    with pytest.raises(ValueError, match="renamed kronecker_svd"):
        validate("gram_svd")
    assert current_name("gram_svd") == "kronecker_svd" and current_name("kfac") == "kfac"
    with pytest.raises(ValueError, match="rank 1 by definition"):
        validate("kfac", 2)
    with pytest.raises(ValueError, match="at least 1"):
        validate("kronecker_svd", 0)
    assert validate("deflation", 3)[1] == 3
    with pytest.raises(ValueError, match="rank 1 or 2 in the optimizer"):
        validate("deflation", 3, optimizer=True)
    with pytest.raises(ValueError, match="does not offer method 'kronecker_svd'; choose from " + ", ".join(PAPER)):
        validate("kronecker_svd", optimizer=True)
    with pytest.raises(ValueError, match="lanczos takes no option max_iter"):
        validate("lanczos", options={"max_iter": 3})
    assert validate("lanczos", options={"tol": 1e-2}, optimizer=True)[2] == {"tol": 1e-2, "max_restarts": 3}


def test_the_optimizer_validates_through_the_registry():
    problem = get_problem("6-4-6")
    with pytest.raises(ValueError, match="does not offer"):
        NaturalGradient(problem.build_model(), problem, method="kronecker_svd")
    with pytest.raises(ValueError, match="renamed"):
        NaturalGradient(problem.build_model(), problem, method="gram_svd")
    opt = NaturalGradient(problem.build_model(), problem, method="deflation", fit_options={"tol": 1e-2})
    assert (opt.config.rank, opt.config.fit_options) == (2, {"tol": 1e-2, "max_iter": 25})
