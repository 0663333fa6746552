"""AveragedBlock: the products, norm and fits of ρ F̂_prev + (1 − ρ) F against dense float64 algebra."""

from __future__ import annotations

import pytest
import torch

from fisherlab.kron import KronSum, fit
from fisherlab.kron.averaged import AveragedBlock, average_terms
from fisherlab.kron.layout import rearrange, unvec, vec

RHO = 0.7


def _previous(stats, seed=11):
    gen = torch.Generator().manual_seed(seed)
    m, n = stats.d_act, stats.d_grad
    act = torch.randn(2, m, m, generator=gen, dtype=stats.dtype) * 1e-2
    grad = torch.randn(2, n, n, generator=gen, dtype=stats.dtype) * 1e-2
    return KronSum(act + act.mT, grad + grad.mT)


def _block(stats, kfac="pair"):
    return AveragedBlock(stats, _previous(stats), RHO, stats.kfac_factors() if kfac == "pair" else kfac)


def test_products_match_the_rearranged_dense_average(stats):
    block = _block(stats)
    m, n = stats.d_act, stats.d_grad
    dense = RHO * _previous(stats).to_dense() + (1 - RHO) * stats.to_dense()
    torch.testing.assert_close(block.to_dense(), dense)
    z = rearrange(dense, m, n)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, n, n, generator=gen, dtype=stats.dtype)
    u = torch.randn(3, m, m, generator=gen, dtype=stats.dtype)
    torch.testing.assert_close(vec(block.z_matvec(v)), vec(v) @ z.T)
    torch.testing.assert_close(vec(block.z_rmatvec(u)), vec(u) @ z)
    torch.testing.assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(dense))


@pytest.mark.parametrize("kfac", ["pair", None])
@pytest.mark.parametrize("method,rank", [("kpsvd", 1), ("deflation", 2), ("lanczos", 2)])
def test_fits_match_the_dense_svd_of_the_averaged_block(stats, method, rank, kfac):
    # Without a KFAC pair the span has one extra pair fewer; the fits are the same.
    block = _block(stats, kfac)
    m, n = stats.d_act, stats.d_grad
    u, s, vt = torch.linalg.svd(rearrange(block.to_dense(), m, n))
    if s[rank - 1] - s[rank] < 1e-3 * s[0]:
        pytest.skip("no singular gap")
    best = sum(s[k] * torch.kron(unvec(u[:, k], m, m), unvec(vt[k], n, n)) for k in range(rank))
    opts = {"tol": 1e-12, "max_restarts": 500} if method == "lanczos" else {"tol": 1e-12, "max_iter": 20000}
    result = fit(method, block, rank, **opts)
    torch.testing.assert_close(result.op.to_dense(), best, rtol=1e-6, atol=1e-8 * float(s[0]))


@pytest.mark.parametrize("kfac", ["pair", "running"])
def test_kfac_corrected_corrects_the_given_kfac_term(stats, kfac):
    block = _block(stats, kfac)
    m, n = stats.d_act, stats.d_grad
    act, grad = block.kfac_factors()
    if kfac == "running":  # ρ × the previous first term + (1 − ρ) × the batch's KFAC pair
        batch_act, batch_grad = stats.kfac_factors()
        prev = _previous(stats)
        torch.testing.assert_close(act, RHO * prev.act[0] + (1 - RHO) * batch_act)
        torch.testing.assert_close(grad, RHO * prev.grad[0] + (1 - RHO) * batch_grad)
    residual = rearrange(block.to_dense(), m, n) - torch.outer(vec(act), vec(grad))
    u, s, vt = torch.linalg.svd(residual)
    if s[0] - s[1] < 1e-3 * s[0]:
        pytest.skip("no singular gap")
    result = fit("kfac_corrected", block, 2, tol=1e-12, max_iter=20000)
    expected = torch.kron(act, grad) + s[0] * torch.kron(unvec(u[:, 0], m, m), unvec(vt[0], n, n))
    torch.testing.assert_close(result.op.to_dense(), expected, rtol=1e-6, atol=1e-8 * float(s[0]))


def test_weight_zero_is_the_batch_block_and_one_the_previous(stats):
    prev = _previous(stats)
    torch.testing.assert_close(AveragedBlock(stats, prev, 0.0, stats.kfac_factors()).to_dense(), stats.to_dense())
    torch.testing.assert_close(AveragedBlock(stats, prev, 1.0, stats.kfac_factors()).to_dense(), prev.to_dense())


def test_invalid_arguments(stats):
    with pytest.raises(ValueError, match="weight"):
        AveragedBlock(stats, _previous(stats), 1.5, stats.kfac_factors())
    wrong = KronSum(torch.eye(stats.d_act + 1, dtype=stats.dtype), torch.eye(stats.d_grad, dtype=stats.dtype))
    with pytest.raises(ValueError, match="shape"):
        AveragedBlock(stats, wrong, 0.5, stats.kfac_factors())
    with pytest.raises(ValueError, match="'running' or None"):
        AveragedBlock(stats, _previous(stats), 0.5, "paper")
    with pytest.raises(ValueError, match="without a KFAC pair"):
        AveragedBlock(stats, _previous(stats), 0.5).kfac_factors()


def test_average_terms_averages_each_factor_after_aligning_joint_signs():
    gen = torch.Generator().manual_seed(5)
    m, n = 3, 4
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    prev = KronSum(randn(2, m, m), randn(2, n, n))
    cur = KronSum(randn(2, m, m), randn(2, n, n))
    # A ⊗ G = (−A) ⊗ (−G): flipping a current term's joint sign changes nothing, and the
    # term kept is the one whose first factor points along the previous one.
    flipped = KronSum(cur.act * torch.tensor([1.0, -1.0], dtype=torch.float64)[:, None, None],
                      cur.grad * torch.tensor([1.0, -1.0], dtype=torch.float64)[:, None, None])
    a, b = average_terms(prev, cur, RHO), average_terms(prev, flipped, RHO)
    torch.testing.assert_close(a.act, b.act, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    for j in range(2):
        sign = 1.0 if torch.sum(prev.act[j] * cur.act[j]) >= 0 else -1.0
        torch.testing.assert_close(a.act[j], RHO * prev.act[j] + (1 - RHO) * sign * cur.act[j])
        torch.testing.assert_close(a.grad[j], RHO * prev.grad[j] + (1 - RHO) * sign * cur.grad[j])
        assert torch.sum(a.act[j] * prev.act[j]) > 0 or torch.sum(prev.act[j] * cur.act[j]) == 0
