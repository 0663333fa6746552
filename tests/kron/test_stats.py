import pytest
import torch

from fisherlab.kron import BlockStats, BlockTooLargeError, kronecker_svd
from fisherlab.kron.layout import rearrange, vec


def _dense(stats):
    # An independent reference: the average of Kronecker products of the per-sample factors.
    terms = [torch.kron(torch.outer(a, a), torch.outer(g, g)) for a, g in zip(stats.a, stats.g)]
    return torch.stack(terms).mean(0)


def test_to_dense_is_the_mean_of_per_sample_kronecker_products(stats):
    assert torch.allclose(stats.to_dense(), _dense(stats), rtol=1e-12, atol=1e-300)


def test_dense_block_is_the_outer_product_of_per_example_weight_gradients(stats):
    grads = vec(stats.g[:, :, None] * stats.a[:, None, :])  # vec(g āᵀ) = ā ⊗ g
    assert torch.allclose(stats.to_dense(), grads.T @ grads / stats.n_samples, rtol=1e-12, atol=1e-300)


def test_prop_3_1_products_match_the_dense_rearrangement(stats):
    m, n = stats.d_act, stats.d_grad
    z = rearrange(_dense(stats), m, n)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n, n, generator=gen, dtype=torch.float64)
    u = torch.randn(m, m, generator=gen, dtype=torch.float64)
    scale = torch.linalg.matrix_norm(z)
    assert torch.allclose(vec(stats.z_matvec(v)), z @ vec(v), atol=1e-12 * scale * v.norm())
    assert torch.allclose(vec(stats.z_rmatvec(u)), z.T @ vec(u), atol=1e-12 * scale * u.norm())
    batch = torch.stack([v, 2 * v])
    assert torch.allclose(stats.z_matvec(batch)[1], 2 * stats.z_matvec(v), rtol=1e-12)


def test_frobenius_norm_and_spectrum_from_the_kernel_matrix(stats):
    dense = _dense(stats)
    assert torch.allclose(stats.frobenius_norm(), torch.linalg.matrix_norm(dense), rtol=1e-12)
    lam = torch.linalg.eigvalsh(dense).flip(0)
    k = min(stats.n_samples, stats.p)
    ours = stats.eigenvalues()
    assert ours.shape == (k,)
    assert torch.allclose(ours, lam[:k], atol=1e-12 * lam[0])
    assert torch.all(lam[k:].abs() <= 1e-12 * lam[0])


def test_kfac_factors():
    stats = BlockStats(torch.tensor([[1.0, 2.0], [1.0, -1.0]]), torch.tensor([[3.0], [1.0]]))
    a, g = stats.kfac_factors()
    assert torch.allclose(a, torch.tensor([[1.0, 0.5], [0.5, 2.5]]))
    assert torch.allclose(g, torch.tensor([[5.0]]))


def test_kronecker_svd_matches_the_dense_svd_of_the_rearrangement(stats):
    m, n = stats.d_act, stats.d_grad
    z = rearrange(_dense(stats), m, n)
    u, s, vt = torch.linalg.svd(z)
    svd = kronecker_svd(stats, rank=3)
    k = svd.singular_values.shape[0]
    assert torch.allclose(svd.singular_values, s[:k], atol=1e-10 * s[0])
    assert torch.all(s[k:] <= 1e-7 * s[0])
    for j in range(min(3, k)):
        if j + 1 < len(s) and s[j] - s[j + 1] < 1e-6 * s[0]:
            continue  # a repeated singular value has no unique vector
        ours = torch.outer(vec(svd.act[j]), vec(svd.grad[j]))
        ref = torch.outer(u[:, j], vt[j])
        assert torch.allclose(ours, ref, atol=1e-8), j
    # The factors are re-weighted KFAC factors: symmetric, in the span of a_n a_nᵀ.
    assert torch.allclose(svd.act, svd.act.mT, atol=1e-14)


def test_validation_and_size_limit():
    with pytest.raises(ValueError, match="same positive number of rows"):
        BlockStats(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="2-D"):
        BlockStats(torch.ones(3), torch.ones(3, 2))
    stats = BlockStats(torch.ones(2, 10), torch.ones(2, 10))
    with pytest.raises(BlockTooLargeError, match="max_entries"):
        stats.to_dense(max_entries=100)
    assert stats.to_dense(max_entries=10_000).shape == (100, 100)


def test_float32_agrees_with_float64(stats):
    s32 = stats.to(torch.float32)
    assert s32.frobenius_norm().dtype == torch.float32
    assert torch.allclose(s32.frobenius_norm().double(), stats.frobenius_norm(), rtol=1e-5)
    v = torch.eye(stats.d_grad, dtype=torch.float64)
    assert torch.allclose(s32.z_matvec(v.float()).double(), stats.z_matvec(v), rtol=1e-4, atol=1e-6 * stats.frobenius_norm())
