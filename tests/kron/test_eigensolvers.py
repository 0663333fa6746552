"""Block Lanczos for the top eigenvalues of Kronecker sums, against dense eigvalsh."""

import pytest
import torch

import fisherlab.kron.kronsum as operator_module
from fisherlab.kron import BlockStats, ExactReference, KronSum, dense_error2, fit
from fisherlab.kron.eigensolvers import kron_top_eigenvalues
from tests.conftest import _random, devices


def _sum(seed: int, m: int, n: int, rank: int = 2, dead: bool = False) -> KronSum:
    """A PSD first term, then indefinite terms of comparable size; optionally dead units."""
    gen = torch.Generator().manual_seed(seed)
    xa = torch.randn(m, 2 * m, generator=gen, dtype=torch.float64)
    xg = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    act, grad = [xa @ xa.T / m], [xg @ xg.T / n]
    for _ in range(rank - 1):
        c = torch.randn(m, m, generator=gen, dtype=torch.float64)
        d = torch.randn(n, n, generator=gen, dtype=torch.float64)
        act.append(0.5 * (c + c.T))
        grad.append(0.5 * (d + d.T))
    act, grad = torch.stack(act), torch.stack(grad)
    if dead:  # zero rows and columns in every factor
        act[:, 1], act[:, :, 1] = 0, 0
        grad[:, 0], grad[:, :, 0] = 0, 0
    return KronSum(act, grad)


def _dense_top(op: KronSum) -> torch.Tensor:
    return torch.linalg.eigvalsh(op.to_dense()).flip(0)


@pytest.mark.parametrize("rank,dead,ks", [(2, False, "all"), (3, False, (1, 5, 21, 41)), (2, True, (1, 5, 21, 41))])
def test_top_eigenvalues_match_dense(rank, dead, ks):
    op = _sum(rank + 10 * dead, 7, 6, rank, dead)
    lam = _dense_top(op)
    assert lam.min() < -0.1 * lam.max()  # indefinite, with a sizeable negative part
    for k in range(1, op.p) if ks == "all" else ks:
        out = kron_top_eigenvalues(op.act, op.grad, k, tol=1e-13)
        assert torch.allclose(out.values, lam[:k], rtol=0, atol=1e-11 * lam.abs().max()), k
        assert (out.residuals >= 0).all() and out.dim >= k


def test_k_must_be_below_p():
    op = _sum(0, 3, 2)
    with pytest.raises(ValueError):
        kron_top_eigenvalues(op.act, op.grad, op.p)


def test_weighted_accuracy_is_met():
    op = _sum(4, 12, 10)
    lam = _dense_top(op)
    k, tol = 40, 1e-6
    w = 0.8 ** torch.arange(k, dtype=torch.float64)
    out = kron_top_eigenvalues(op.act, op.grad, k, tol=tol, weights=w)
    error = float((w * (out.values - lam[:k]).abs()).sum())
    assert error <= float((w * out.errors).sum()) <= tol * float((w * out.values.abs()).sum()) * (1 + 1e-12)
    floor = 100 * torch.finfo(torch.float64).eps * float(out.values.abs().max())
    assert (out.errors <= out.residuals.clamp_min(floor)).all()


def _fitted(seed: int, d_in: int, d_out: int, n: int) -> tuple[KronSum, torch.Tensor]:
    """A rank-2 Deflation fit of a ReLU-like block (decaying spectrum, a few negative
    eigenvalues) and the eigenvalues of F, the weights Error 2 uses."""
    gen = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, d_in, generator=gen, dtype=torch.float64)
    h = torch.relu(low_rank + 0.3 * torch.randn(n, d_in, generator=gen, dtype=torch.float64))
    a = torch.cat([torch.ones(n, 1, dtype=torch.float64), h], dim=1)
    g = torch.randn(n, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, d_out, generator=gen, dtype=torch.float64)
    g = g + 0.2 * torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    stats = BlockStats(a, g)
    return fit("deflation", stats, rank=2).op.symmetrized(), stats.eigenvalues()


@pytest.mark.parametrize("tol", [1e-3, 1e-5, 1e-8, 1e-11])
def test_weighted_tolerances_converge(tol):
    # Loose tolerances once locked inaccurate vectors, whose projection stalled the rest.
    op, w = _fitted(7, 9, 60, 96)
    lam = _dense_top(op)[: w.shape[0]]
    out = kron_top_eigenvalues(op.act, op.grad, w.shape[0], tol=tol, weights=w)
    assert float((w * (out.values - lam).abs()).sum()) <= tol * float((w * out.values.abs()).sum())


@pytest.mark.parametrize("device", devices())
def test_float32_and_device(device):
    op = _sum(5, 9, 8)
    lam = _dense_top(op)
    out = kron_top_eigenvalues(op.act.float().to(device), op.grad.float().to(device), 20, tol=1e-5)
    assert out.values.dtype == torch.float32 and out.values.device.type == device
    assert torch.allclose(out.values.cpu().double(), lam[:20], rtol=0, atol=1e-4 * lam.abs().max())


@pytest.fixture
def lanczos_path(monkeypatch):
    """Route every multi-term KronSum.eigenvalues through block Lanczos; count the calls."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[2])
        return kron_top_eigenvalues(*args, **kwargs)

    monkeypatch.setattr(operator_module, "DENSE_EIG_LIMIT", 0)
    monkeypatch.setattr(operator_module, "ITERATIVE_MAX_FRACTION", 2.0)
    monkeypatch.setattr(operator_module, "ARPACK_MAX_K", 0)
    monkeypatch.setattr(operator_module, "kron_top_eigenvalues", spy)
    return calls


def test_kronsum_eigenvalues_through_block_lanczos(lanczos_path):
    op = _sum(6, 8, 5, dead=True)
    lam = _dense_top(op)
    for k in (1, 7, 20, op.p - 1, op.p):
        assert torch.allclose(op.eigenvalues(k, tol=1e-13), lam[:k], rtol=0, atol=1e-11 * lam.abs().max()), k
    assert lanczos_path == [1, 7, 20]  # k ≥ the restricted size (28) is left to eigvalsh


@pytest.mark.parametrize("method", ["deflation", "lanczos", "kfac_corrected"])
def test_error2_through_block_lanczos_equals_dense(method, lanczos_path):
    # rtol = 0 with an iterative solver runs at metrics.EXACT_TOL and reports a half-width.
    stats = _random(11, 60, 12, 10)  # p = 130, N = 60
    op = fit(method, stats).op
    exact = dense_error2(stats.to_dense(), op.to_dense())
    est = ExactReference(stats).error2(op)
    assert lanczos_path == [60]
    assert abs(est.value - exact) <= 1e-8 * exact
    assert abs(est.value - exact) <= est.halfwidth + 1e-14 and est.halfwidth <= 1e-8 * exact


def test_small_blocks_grow_the_basis(monkeypatch):
    # Blocks of 3 vectors: the Krylov space outgrows its first allocation (3k + 8 blocks).
    from fisherlab.kron import eigensolvers

    monkeypatch.setattr(eigensolvers, "BLOCK", 3)
    op = _sum(8, 12, 10)
    lam = _dense_top(op)
    out = kron_top_eigenvalues(op.act, op.grad, 20, tol=1e-12)
    assert out.dim > 3 * 20 + 8 * 3
    assert torch.allclose(out.values, lam[:20], rtol=0, atol=1e-10 * lam.abs().max())


@pytest.mark.parametrize("kind", ["well-conditioned", "rank-deficient"])
def test_wide_svd_matches_lapack(kind):
    # The Gram route (κ < 1e4) and the QR route (a rank-deficient block) both give a thin SVD
    # with orthonormal rows of Vᵀ and the singular values LAPACK gives.
    from fisherlab.kron.eigensolvers import _wide_svd

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 500, generator=gen, dtype=torch.float64) * torch.logspace(0, -1, 6, dtype=torch.float64)[:, None]
    if kind == "rank-deficient":
        x[4] = 2 * x[1] - x[0]
    u, sig, vt = _wide_svd(x)
    ref = torch.linalg.svdvals(x)
    torch.testing.assert_close(sig, ref, rtol=1e-12, atol=1e-13 * float(ref[0]))
    torch.testing.assert_close((u * sig) @ vt, x, rtol=0, atol=1e-13 * float(ref[0]))
    torch.testing.assert_close(u.mT @ u, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-13)
    keep = sig > 1e-12 * sig[0]
    rows = vt[keep]
    torch.testing.assert_close(rows @ rows.mT, torch.eye(int(keep.sum()), dtype=torch.float64), rtol=0, atol=1e-13)


def test_a_criterion_stops_the_space_where_the_caller_is_done(monkeypatch):
    # The caller's criterion replaces the weighted test: it sees the top min(k, dim) Ritz values
    # at each test from first_test on (blocks of 4 here), and its ratio ≤ 1 stops the space there.
    from fisherlab.kron import eigensolvers

    monkeypatch.setattr(eigensolvers, "BLOCK", 4)
    op = _sum(9, 12, 10)
    lam = _dense_top(op)
    seen = []

    def criterion(out):
        seen.append(out.dim)
        n = out.values.shape[0]
        return 0.5 if n >= 8 and float(out.errors[:8].max()) <= 1e-10 * float(lam.abs().max()) else 2.0

    out = kron_top_eigenvalues(op.act, op.grad, 40, criterion=criterion, first_test=8)
    assert seen[0] == 8 and seen == sorted(set(seen)) and out.dim == seen[-1]
    assert out.values.shape[0] == min(40, out.dim)
    assert torch.allclose(out.values[:8], lam[:8], rtol=0, atol=1e-10 * lam.abs().max())
    assert out.dim < kron_top_eigenvalues(op.act, op.grad, 40, tol=1e-13).dim  # stopped before the top 40 converged


def test_semi_orthogonal_reorthogonalization_keeps_dense_accuracy(monkeypatch):
    # Projections below ε^{3/4} are left in place: the values still match dense eigvalsh to the
    # requested accuracy, and the subtraction is skipped for some blocks, not all.
    from fisherlab.kron import eigensolvers

    monkeypatch.setattr(eigensolvers, "BLOCK", 4)
    op, w = _fitted(3, 9, 60, 96)
    lam = _dense_top(op)[: w.shape[0]]
    out = kron_top_eigenvalues(op.act, op.grad, w.shape[0], tol=1e-12, weights=w)
    assert float((w * (out.values - lam).abs()).sum()) <= 1e-12 * float((w * out.values.abs()).sum())
    subtracted = []
    real_addmm = torch.Tensor.addmm_

    def counting(self, mat1, mat2, **kwargs):
        subtracted.append(mat2.shape[0])
        return real_addmm(self, mat1, mat2, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", counting)
    kron_top_eigenvalues(op.act, op.grad, w.shape[0], tol=1e-12, weights=w)
    blocks = out.dim // 4
    # per block: B_j (X C_j) per vector (4), the block's own projection, the previous block's
    # (all but the first), and the reorthogonalization against the basis (only where needed)
    local = blocks * 4 + blocks + (blocks - 1)
    assert local < len(subtracted) < local + blocks  # some blocks skipped the subtraction, not all


@pytest.mark.parametrize("method", ["deflation", "kfac_corrected"])
def test_certified_error2_grows_one_krylov_space(method, lanczos_path):
    # p = 2,440, N = 100: k = 32, 64 and 100 are tried on one block Lanczos space for the top N
    # (no restart per k); every interval brackets the dense Error 2 and meets its rtol.
    stats = _random(13, 100, 60, 40)
    op = fit(method, stats).op
    exact = dense_error2(stats.to_dense(), op.to_dense())
    ref = ExactReference(stats)
    ks = []
    for rtol in (0.3, 1e-2, 1e-5):
        est = ref.error2(op, rtol=rtol)
        assert abs(est.value - exact) <= est.halfwidth + 1e-14 and est.halfwidth <= rtol * est.value, rtol
        ks.append(est.eigenvalues.shape[0])
    assert lanczos_path == [100, 100, 100]  # one call per Error 2, for the top N
    assert ks[0] == 32 and ks[-1] == 100  # a loose rtol stops at the first k, a tight one needs N
    # the exact mode, and the certified one where it must reach k = N, meet the exact value
    assert abs(ref.error2(op).value - exact) <= 1e-9 * exact
