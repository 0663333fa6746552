import pytest
import torch

from fisherlab.kron import METHODS, BlockStats, KronSum, dense_error1, fit
from fisherlab.kron.averaged import AveragedBlock
from fisherlab.kron.fitters import is_zero_block
from fisherlab.kron.layout import rearrange, unvec, vec
from fisherlab.kron.partial_svd import lanczos_svd
from fisherlab.kron.rearranged import rearranged
from tests.conftest import CASES, _random, cuda

TIGHT = 1e-12


def _fit(method, stats, rank=None, **opts):
    if "tol" in METHODS[method].options:
        opts.setdefault("tol", TIGHT)
    if "max_iter" in METHODS[method].options:
        opts.setdefault("max_iter", 5000)
    return fit(method, stats, rank=rank, **opts)


def _best_rank(stats, rank):
    """Best rank-``rank`` Kronecker approximation from a dense SVD of Z(F), as a dense matrix."""
    m, n = stats.d_act, stats.d_grad
    u, s, vt = torch.linalg.svd(rearrange(stats.to_dense(), m, n))
    return sum(s[k] * torch.kron(unvec(u[:, k], m, m), unvec(vt[k], n, n)) for k in range(rank)), s


def _has_gap(s, rank):
    return s[rank - 1] - s[rank] > 1e-3 * s[0]


@pytest.mark.parametrize("method,rank", [("kpsvd", 1), ("deflation", 1), ("deflation", 2), ("deflation", 3),
                                         ("lanczos", 1), ("lanczos", 2), ("lanczos", 3),
                                         ("kronecker_svd", 1), ("kronecker_svd", 2), ("kronecker_svd", 3)])
def test_svd_methods_match_the_dense_svd_of_z(stats, method, rank):
    best, s = _best_rank(stats, rank)
    if not _has_gap(s, rank):
        pytest.skip("no singular gap: the best approximation is not unique")
    result = _fit(method, stats, rank)
    assert result.info.converged
    ours = result.op.to_dense()
    assert torch.linalg.matrix_norm(ours - best) <= 1e-8 * torch.linalg.matrix_norm(best)
    assert torch.allclose(result.info.singular_values[:rank], s[:rank], rtol=1e-8)


def test_iterative_methods_match_the_exact_kronecker_svd(stats):
    exact = fit("kronecker_svd", stats, rank=2).op.to_dense()
    _, s = _best_rank(stats, 2)
    if not _has_gap(s, 2):
        pytest.skip("no singular gap")
    for method in ("deflation", "lanczos"):
        ours = _fit(method, stats, 2).op.to_dense()
        assert torch.linalg.matrix_norm(ours - exact) <= 1e-8 * torch.linalg.matrix_norm(exact), method


def test_kfac_corrected_is_kfac_plus_the_best_rank_one_correction(stats):
    m, n = stats.d_act, stats.d_grad
    act, grad = stats.kfac_factors()
    kfac = torch.kron(act, grad)
    u, s, vt = torch.linalg.svd(rearrange(stats.to_dense() - kfac, m, n))
    if s[0] - s[1] < 1e-3 * s[0]:
        pytest.skip("no singular gap")
    ref = kfac + s[0] * torch.kron(unvec(u[:, 0], m, m), unvec(vt[0], n, n))
    ours = _fit("kfac_corrected", stats).op.to_dense()
    assert torch.linalg.matrix_norm(ours - ref) <= 1e-8 * torch.linalg.matrix_norm(ref)


def test_optimality_orderings(stats):
    dense = stats.to_dense()
    e = {m: dense_error1(dense, _fit(m, stats).op.to_dense()) for m in METHODS}
    slack = 1e-10
    assert e["kpsvd"] <= e["kfac"] + slack
    assert e["deflation"] <= e["kpsvd"] + slack
    assert e["lanczos"] <= e["kpsvd"] + slack
    assert e["kronecker_svd"] <= e["kpsvd"] + slack
    assert e["kfac_corrected"] <= e["kfac"] + slack


def test_every_method_is_exact_when_kfac_is(exact_stats):
    dense = exact_stats.to_dense()
    for method in METHODS:
        approx = _fit(method, exact_stats).op.to_dense()
        assert torch.linalg.matrix_norm(approx - dense) <= 1e-10 * torch.linalg.matrix_norm(dense), method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_first_term_is_symmetric_positive_semidefinite(stats, method):
    op = _fit(method, stats).op
    for factor in (op.act[0], op.grad[0]):
        assert torch.equal(factor, factor.T)
        lam = torch.linalg.eigvalsh(factor)
        assert lam.min() >= -1e-10 * lam.max()


@pytest.mark.parametrize("method", ["deflation", "lanczos", "kronecker_svd"])
def test_second_term_is_orthogonal_to_the_first(stats, method):
    op = _fit(method, stats).op
    act = op.act / torch.linalg.matrix_norm(op.act)[:, None, None]
    grad = op.grad / torch.linalg.matrix_norm(op.grad)[:, None, None]
    assert abs(float((act[0] * act[1]).sum() * (grad[0] * grad[1]).sum())) <= 1e-8


def test_relative_tolerance_converges_on_tiny_blocks():
    # Entries of order 1e-8: an absolute tolerance of 1e-6 would stop after one sweep.
    stats = CASES["dead_units"]()
    tiny = BlockStats(stats.a * 1e-2, stats.g * 1e-2)
    ref = fit("kronecker_svd", tiny, rank=2).op.to_dense()
    ours = fit("deflation", tiny, tol=1e-10, max_iter=5000)
    assert ours.info.iterations > 2
    assert torch.linalg.matrix_norm(ours.op.to_dense() - ref) <= 1e-6 * torch.linalg.matrix_norm(ref)


@pytest.mark.parametrize("method", ["kpsvd", "deflation", "lanczos", "kfac_corrected"])
def test_warm_start_saves_iterations(method):
    base = _random(8, 60, 10, 8)  # Z(F) of 121 × 64: Lanczos does not exhaust it at once
    gen = torch.Generator().manual_seed(9)
    nearby = BlockStats(base.a, base.g * (1 + 1e-3 * torch.randn(base.g.shape, generator=gen, dtype=torch.float64)))
    first = _fit(method, base)
    cold = _fit(method, nearby)
    warm = _fit(method, nearby, init=first)
    assert warm.info.iterations < cold.info.iterations
    assert torch.allclose(warm.op.to_dense(), cold.op.to_dense(), atol=1e-7 * torch.linalg.matrix_norm(cold.op.to_dense()))


def test_unknown_method_rank_and_option_are_rejected():
    stats = CASES["random"]()
    with pytest.raises(ValueError, match="kfac, kpsvd"):
        fit("kfca", stats)
    with pytest.raises(ValueError, match="rank 1 by definition"):
        fit("kpsvd", stats, rank=2)
    with pytest.raises(ValueError, match="takes no option"):
        fit("kfac", stats, tol=1e-3)
    with pytest.raises(ValueError, match="at least 1"):
        fit("deflation", stats, rank=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_float32_fits_agree_with_float64(method):
    stats = CASES["network"]()
    ref = fit(method, stats).op.to_dense()
    ours = fit(method, stats.to(torch.float32)).op
    assert ours.act.dtype == torch.float32
    assert torch.linalg.matrix_norm(ours.to_dense().double() - ref) <= 1e-4 * torch.linalg.matrix_norm(ref)


@cuda
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_fits_agree_with_cpu(method):
    stats = CASES["network"]()
    ref = fit(method, stats).op.to_dense()
    ours = fit(method, stats.to(device="cuda")).op.to("cpu").to_dense()
    assert torch.linalg.matrix_norm(ours - ref) <= 1e-8 * torch.linalg.matrix_norm(ref)


def test_kronsum_algebra():
    gen = torch.Generator().manual_seed(3)
    act = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64)
    op, other = KronSum(act, grad), KronSum(act[:1] * 2, grad[:1])
    dense, dense_other = op.to_dense(), other.to_dense()
    assert torch.allclose(op.inner(other), (dense * dense_other).sum(), rtol=1e-12)
    assert torch.allclose(op.frobenius_norm(), torch.linalg.matrix_norm(dense), rtol=1e-12)
    assert torch.allclose((op + other).to_dense(), dense + dense_other, rtol=1e-12)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    assert torch.allclose(op @ x, dense @ x, rtol=1e-12)
    assert torch.allclose(op @ x[:, 0], dense @ x[:, 0], rtol=1e-12)
    assert torch.allclose(vec(op.matvec(unvec(x[:, 0], 2, 3))), dense @ x[:, 0], rtol=1e-12)


def _zero_blocks() -> dict[str, BlockStats]:
    stats = CASES["network"]()
    # g ≡ 0 (dead ReLUs above); and g ~ 1e-80, whose block (~1e-160) has a squared norm that
    # underflows float64's normal range: zero to rounding.
    return {"zero": BlockStats(stats.a, torch.zeros_like(stats.g)), "underflow": BlockStats(stats.a, stats.g * 1e-80)}


@pytest.mark.parametrize("case", ["zero", "underflow"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_block_gives_the_zero_operator_at_once(method, case):
    stats = _zero_blocks()[case]
    assert is_zero_block(stats)
    warm = fit(method, CASES["network"]()) if method not in ("kfac", "kronecker_svd") else None
    result = fit(method, stats, init=warm)
    assert result.info.converged and result.info.iterations == 0 and result.info.residual == 0
    assert result.op.rank == METHODS[method].default_rank and result.warm is None
    assert torch.count_nonzero(result.op.to_dense()) == 0
    assert torch.count_nonzero(result.info.singular_values) == 0


def test_zero_block_test_is_the_underflow_of_the_squared_norm():
    stats = CASES["network"]()
    tiny = torch.finfo(torch.float64).tiny
    assert not is_zero_block(stats)
    assert not is_zero_block(BlockStats(stats.a, stats.g * 1e-60))  # ‖F‖ ~ 1e-120: ‖F‖² is normal
    for scale in (1e-60, 1e-80):
        norm2 = float(BlockStats(stats.a, stats.g * scale).frobenius_norm()) ** 2
        assert is_zero_block(BlockStats(stats.a, stats.g * scale)) == (norm2 < tiny)
    # float32 underflows far sooner: a block that is plainly nonzero in float64 is zero to rounding there.
    small = BlockStats(stats.a, stats.g * 1e-12)
    assert not is_zero_block(small) and is_zero_block(small.to(torch.float32))


def test_zero_block_test_reads_the_norm_off_span_coordinates_already_built():
    stats = CASES["network"]()
    previous = fit("deflation", stats).op
    blocks = {"batch": stats, "averaged": AveragedBlock(stats, previous, 0.7),
              "zero": _zero_blocks()["zero"], "zero averaged": AveragedBlock(_zero_blocks()["zero"], previous * 0.0, 0.7)}
    for name, block in blocks.items():
        before = is_zero_block(block)
        assert "span_rearranged" not in vars(block)  # the test builds nothing itself
        core = block.span_rearranged.frobenius_norm()
        torch.testing.assert_close(core, block.frobenius_norm(), rtol=1e-10, atol=0)  # ‖C‖_F = ‖F‖_F
        assert is_zero_block(block) == before == name.startswith("zero"), name


@pytest.mark.parametrize("rank", [1, 2])
def test_lanczos_solver_returns_unconverged_zero_triplets_when_the_start_is_annihilated(rank):
    stats = _zero_blocks()["zero"]
    op = rearranged(stats)
    v0 = op.right_of(torch.eye(stats.d_grad, dtype=stats.dtype)[None])[0]
    t = lanczos_svd(op, v0, rank)
    assert t.sigma.shape == (rank,) and torch.count_nonzero(t.sigma) == 0 and not t.converged
    assert t.left.shape[0] == rank and t.right.shape == (rank, *v0.shape)


@cuda
@pytest.mark.parametrize("case", ["zero", "underflow", "network"])
def test_cuda_lanczos_keeps_everything_on_the_device(case):
    stats = CASES["network"]() if case == "network" else _zero_blocks()[case]
    on_gpu = stats.to(device="cuda")
    op = rearranged(on_gpu)
    v0 = op.right_of(torch.eye(stats.d_grad, dtype=stats.dtype, device="cuda")[None])[0]
    t = lanczos_svd(op, v0, 2)
    assert t.sigma.device.type == t.left.device.type == t.right.device.type == "cuda"
    result = fit("lanczos", on_gpu)
    assert result.op.act.device.type == "cuda"
    ref = fit("lanczos", stats).op.to_dense()
    assert torch.linalg.matrix_norm(result.op.to("cpu").to_dense() - ref) <= 1e-8 * max(1.0, float(torch.linalg.matrix_norm(ref)))
