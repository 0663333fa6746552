import pytest
import torch

import fisherlab.kron.kronsum as operator_module
from fisherlab.kron import (
    METHODS,
    BlockStats,
    ExactReference,
    KronSum,
    ZeroBlockError,
    dense_error1,
    dense_error2,
    error1,
    error2,
    fit,
)
from tests.conftest import CASES, _random


def _relclose(x: float, ref: float, rtol: float = 1e-8) -> bool:
    return abs(x - ref) <= rtol * abs(ref)


@pytest.fixture(params=["dense", "lanczos"])
def eig_path(request, monkeypatch):
    """Run once with the dense eigvalsh of F̂ and once with the iterative top-k path."""
    if request.param == "lanczos":
        monkeypatch.setattr(operator_module, "DENSE_EIG_LIMIT", 0)
    return request.param


def _indefinite(stats):
    act, grad = stats.kfac_factors()
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(act.shape, generator=gen, dtype=act.dtype)
    d = torch.randn(grad.shape, generator=gen, dtype=grad.dtype)
    return KronSum(torch.stack([act, 0.3 * (c + c.T)]), torch.stack([grad, -(d + d.T) * grad.norm()]))


@pytest.mark.parametrize("method", sorted(METHODS) + ["indefinite"])
def test_matrix_free_errors_equal_dense_errors(stats, method, eig_path):
    approx = _indefinite(stats) if method == "indefinite" else fit(method, stats).op
    dense, dense_hat = stats.to_dense(), approx.to_dense()
    e1, e2 = error1(stats, approx), error2(stats, approx)
    d1, d2 = dense_error1(dense, dense_hat), dense_error2(dense, dense_hat)
    if d1 > 1e-6:  # below that the matrix-free E1 is limited by cancellation (documented)
        assert _relclose(e1, d1), (e1, d1)
    assert _relclose(e2, d2) or abs(e2 - d2) <= 1e-8, (e2, d2)
    assert e2 <= e1 + 1e-12  # Hoffman–Wielandt


def test_indefinite_sum_has_negative_eigenvalues_that_error2_keeps(stats):
    approx = _indefinite(stats)
    lam = torch.linalg.eigvalsh(approx.to_dense())
    assert lam.min() < 0
    # Singular values instead of eigenvalues would give a different (wrong) Error 2.
    dense = stats.to_dense()
    sv = torch.linalg.svdvals(approx.to_dense())
    lam_f = torch.linalg.eigvalsh(dense).flip(0)
    wrong = float(torch.linalg.vector_norm(lam_f - sv) / torch.linalg.vector_norm(lam_f))
    assert abs(error2(stats, approx) - wrong) > 1e-6


def test_kronsum_eigenvalues_match_dense(eig_path):
    stats = CASES["network"]()
    for method in ("kfac", "deflation", "kfac_corrected"):
        op = fit(method, stats).op
        lam = torch.linalg.eigvalsh(op.to_dense()).flip(0)
        k = 7
        assert torch.allclose(op.eigenvalues(k), lam[:k], atol=1e-12 * lam[0]), method
    op = fit("kfac", stats).op
    assert torch.allclose(op.eigenvalues(), torch.linalg.eigvalsh(op.to_dense()).flip(0), atol=1e-14)


def test_errors_of_the_exact_block_are_zero(exact_stats):
    approx = fit("kfac", exact_stats).op
    assert dense_error1(exact_stats.to_dense(), approx.to_dense()) <= 1e-12
    assert error2(exact_stats, approx) <= 1e-7


def test_certified_error2_brackets_the_exact_value(monkeypatch):
    from fisherlab.kron import ExactReference
    from tests.conftest import _random

    monkeypatch.setattr(operator_module, "DENSE_EIG_LIMIT", 0)
    stats = _random(11, 80, 12, 10)  # p = 130 > N = 80 > 32: the first k is partial
    ref = ExactReference(stats)
    for method in ("deflation", "kfac_corrected"):
        op = fit(method, stats).op
        exact = dense_error2(stats.to_dense(), op.to_dense())
        for rtol in (1e-1, 1e-3):
            est = ref.error2(op, rtol=rtol)
            assert abs(est.value - exact) <= est.halfwidth + 1e-12
            assert est.halfwidth <= rtol * est.value
        assert ref.error2(op, rtol=0).halfwidth == 0


def test_certified_error2_where_p_is_much_larger_than_n(monkeypatch):
    # p = 2,440 ≫ N = 64: the positional bounds on the unknown μ_i (a negative one spread over
    # the p − i places after it) certify rtol = 0.1 from k = 32, where Weyl's λ_min bound and
    # Cauchy–Schwarz alone needed k = 64.
    from fisherlab.kron import ExactReference
    from tests.conftest import _random

    monkeypatch.setattr(operator_module, "DENSE_EIG_LIMIT", 0)
    stats = _random(5, 64, 60, 40)
    ref = ExactReference(stats)
    op = fit("deflation", stats).op
    exact = dense_error2(stats.to_dense(), op.to_dense())
    est = ref.error2(op, rtol=0.1)
    assert abs(est.value - exact) <= est.halfwidth + 1e-12 and est.halfwidth <= 0.1 * est.value
    assert est.eigenvalues.shape[0] == 32


def test_top_eigenvalues_are_algebraic_for_indefinite_operators():
    from fisherlab.kron.eigensolvers import top_eigenvalues

    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))
    # A decaying spectrum with a negative part of larger magnitude than the top.
    lam = torch.cat([0.9 ** torch.arange(200.0), -2 * 0.8 ** torch.arange(100.0)]).double()
    mat = (q * lam) @ q.T
    out = top_eigenvalues(lambda v: mat @ v, 300, 20, torch.float64, "cpu", tol=0)
    assert torch.allclose(out, lam.sort(descending=True).values[:20], atol=1e-12)  # algebraic, not |λ|


def test_min_eigenvalue_bound_is_a_lower_bound(stats):
    op = _indefinite(stats)
    assert op.min_eigenvalue_bound() <= float(torch.linalg.eigvalsh(op.to_dense())[0]) + 1e-14


def test_compression_to_the_factor_ranges_keeps_the_spectrum(monkeypatch):
    from tests.conftest import _random

    stats = _random(12, 6, 9, 8)  # N = 6 < m, n: fitted factors have rank ≤ 6
    for method in ("deflation", "kfac_corrected", "kronecker_svd"):
        op = fit(method, stats).op
        small = op.compressed()
        assert small.d_act <= 6 and small.d_grad <= 6
        lam = torch.linalg.eigvalsh(op.to_dense()).flip(0)
        assert torch.allclose(op.eigenvalues(), lam, atol=1e-12 * lam[0])
        monkeypatch.setattr(operator_module, "DENSE_EIG_LIMIT", 0)
        assert torch.allclose(op.eigenvalues(5), lam[:5], atol=1e-12 * lam[0])
        monkeypatch.undo()


def test_error2_is_exact_when_the_restricted_sum_is_small():
    # p = 2,440 is above the dense limit, but one repeated input leaves the two-term sum a
    # range of 1 × 8 dimensions: eigvalsh there is exact, so no solver slack may be reported
    # (it once gave Error 2 = 2e-6 where the true value is 0: KFAC is exact on repeated
    # inputs; the matrix-free formulas' rounding floor is about 1e-7).
    stats = _random(4, 8, 60, 40)
    stats = BlockStats(stats.a[:1].expand(8, -1).clone(), stats.g)
    op = fit("deflation", stats).op
    assert op.rank == 2 and op.eigen_solver(8) == "dense"
    ref = ExactReference(stats)
    e2 = ref.error2(op)
    assert e2.halfwidth == 0
    assert e2.value <= 1e-7 and ref.error1(op) <= 1e-7


@pytest.mark.parametrize("scale", [0.0, 1e-80])
def test_errors_of_a_zero_block_raise_instead_of_nan(scale):
    stats = CASES["network"]()
    zero = BlockStats(stats.a, stats.g * scale)
    ref = ExactReference(zero)
    assert ref.zero and not ExactReference(stats).zero
    approx = fit("kfac", stats).op
    with pytest.raises(ZeroBlockError, match="zero to rounding"):
        ref.error1(approx)
    with pytest.raises(ZeroBlockError, match="zero to rounding"):
        ref.error2(approx)


def test_error2_reports_its_progress(monkeypatch):
    # p = 2,440, N = 64 ≥ ARPACK_MAX_K: block Lanczos, whose tests report the Krylov dimension and
    # accuracy; the certified mode then reports each interval, which ends within rtol.
    monkeypatch.setattr(operator_module, "DENSE_EIG_LIMIT", 0)
    stats = _random(5, 64, 60, 40)
    ref = ExactReference(stats)
    op = fit("deflation", stats).op
    seen = []
    exact = ref.error2(op, progress=lambda **info: seen.append(info))
    krylov = [info for info in seen if "krylov" in info]
    assert krylov and all(set(info) == {"krylov", "accuracy"} for info in seen)
    assert [i["krylov"] for i in krylov] == sorted({i["krylov"] for i in krylov})  # one report per test, growing
    assert krylov[-1]["accuracy"] <= 1e-11 < krylov[0]["accuracy"]  # EXACT_TOL met at the last test only
    assert ref.error2(op, progress=None).value == exact.value  # reporting changes nothing
    seen.clear()
    est = ref.error2(op, rtol=0.1, progress=lambda **info: seen.append(info))
    intervals = [info for info in seen if "error2" in info]
    lo, hi = (float(x) for x in intervals[-1]["error2"].split("–"))
    assert intervals[-1]["k"] == est.eigenvalues.shape[0]
    assert lo == pytest.approx(est.value - est.halfwidth, rel=1e-3) and hi == pytest.approx(est.value + est.halfwidth, rel=1e-3)


def _two_terms(seed: int, m: int, n: int, scale: float) -> KronSum:
    gen = torch.Generator().manual_seed(seed)

    def spd(d):
        x = torch.randn(d, d, generator=gen, dtype=torch.float64)
        return x @ x.T / d + 0.1 * torch.eye(d, dtype=torch.float64)

    def sym(d):
        x = torch.randn(d, d, generator=gen, dtype=torch.float64)
        return scale * (x + x.T) / 2

    return KronSum(torch.stack([spd(m), sym(m)]), torch.stack([spd(n), sym(n)]))


@pytest.mark.parametrize("scale", [0.05, 0.5, 3.0])
def test_positive_count_is_the_inertia_of_two_term_sums(scale):
    from fisherlab.kron.metrics import positive_count

    op = _two_terms(3, 7, 5, scale)
    dense = torch.linalg.eigvalsh(op.to_dense())
    exact = int((dense > 0).sum())
    assert positive_count(op) == exact  # well conditioned: every product clears its rounding margin
    assert (scale < 0.1) == (exact == op.p)  # a small second term leaves F̂ definite, a large one does not


def test_positive_count_of_fitted_sums_never_overcounts(stats):
    from fisherlab.kron.metrics import positive_count

    for method in ("deflation", "kfac_corrected", "kronecker_svd"):
        op = fit(method, stats, **({} if method == "kronecker_svd" else {"tol": 1e-12})).op
        dense = torch.linalg.eigvalsh(op.symmetrized().to_dense())
        assert positive_count(op) <= int((dense > 1e-12 * dense.abs().max()).sum())
    assert positive_count(fit("kfac", stats).op) == 0  # one term: not the two-term pencil


def test_inertia_narrows_the_certified_interval(monkeypatch):
    # p = 2,440, N = 64: the interval at k = 32 (rtol = 0.1) is set by the bounds on the unknown μ_i;
    # certifying the top N of them positive narrows it (by a fifth here: these spectra decay slowly).
    import fisherlab.kron.metrics as metrics_module

    monkeypatch.setattr(operator_module, "DENSE_EIG_LIMIT", 0)
    stats = _random(5, 64, 60, 40)
    ref = ExactReference(stats)
    for method in ("deflation", "kfac_corrected"):
        op = fit(method, stats).op
        exact = dense_error2(stats.to_dense(), op.to_dense())
        dense = torch.linalg.eigvalsh(op.symmetrized().to_dense())
        assert 64 <= metrics_module.positive_count(op) <= int((dense > 0).sum())
        with_inertia = ref.error2(op, rtol=0.1)
        with monkeypatch.context() as patch:
            patch.setattr(metrics_module, "positive_count", lambda approx: 0)
            without = ref.error2(op, rtol=0.1)
        assert with_inertia.eigenvalues.shape[0] == without.eigenvalues.shape[0] == 32
        for est in (with_inertia, without):
            assert abs(est.value - exact) <= est.halfwidth + 1e-12
        assert with_inertia.halfwidth < 0.9 * without.halfwidth
