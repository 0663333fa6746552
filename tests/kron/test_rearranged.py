"""The two forms of Z(F): direct products (Prop. 3.1) and span coordinates, against dense algebra."""

from __future__ import annotations

import pytest
import torch

from fisherlab.kron import KronSum, fit
from fisherlab.kron import rearranged as rearranged_module
from fisherlab.kron.averaged import AveragedBlock
from fisherlab.kron.layout import rearrange, unvec, vec
from fisherlab.kron.partial_svd import lanczos_svd, power_svd
from fisherlab.kron.rearranged import (
    FactorSpan,
    Rearranged,
    SpanRearranged,
    kronecker_svd,
    rearranged,
)
from tests.conftest import CASES, _random


def _averaged(stats, rho=0.6):
    gen = torch.Generator().manual_seed(5)
    m, n = stats.d_act, stats.d_grad
    act = torch.randn(2, m, m, generator=gen, dtype=stats.dtype)
    grad = torch.randn(2, n, n, generator=gen, dtype=stats.dtype)
    previous = KronSum(act + act.mT, 1e-2 * (grad + grad.mT))
    kfac_act, kfac_grad = stats.kfac_factors()
    return AveragedBlock(stats, previous, rho, (kfac_act + 0.1 * torch.eye(m, dtype=stats.dtype), kfac_grad))


BLOCKS = {"stats": lambda s: s, "averaged": _averaged}


def _dense_z(block):
    return rearrange(block.to_dense(), block.d_act, block.d_grad)


def test_factor_span_coordinates_are_orthonormal_and_project():
    stats = CASES["random"]()
    gen = torch.Generator().manual_seed(1)
    extra = torch.randn(2, stats.d_act, stats.d_act, generator=gen, dtype=torch.float64)
    span = FactorSpan(stats.a, extra)
    c = torch.randn(3, stats.n_samples, generator=gen, dtype=torch.float64)
    inside = torch.einsum("kb,bi,bj->kij", c, stats.a, stats.a) + 0.3 * extra[0]
    torch.testing.assert_close(span.lift(span.coords(inside)), inside, rtol=1e-10, atol=1e-12)
    y = span.coords(inside)
    lifted = span.lift(y)
    torch.testing.assert_close(torch.einsum("kij,lij->kl", lifted, lifted), y @ y.T, rtol=1e-10, atol=1e-12)
    outside = torch.randn(stats.d_act, stats.d_act, generator=gen, dtype=torch.float64)
    residual = outside - span.lift(span.coords(outside))
    # The residual of an orthogonal projection is orthogonal to the whole span.
    assert span.inner(residual).abs().max() <= 1e-10 * torch.linalg.matrix_norm(outside)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_combinations_of_the_columns_have_free_coordinates(kind):
    # vectors_of(c) in span coordinates (rows of H T) is the projection of the explicit D c,
    # and lifts back to what the direct form builds.
    block = BLOCKS[kind](CASES["random"]())
    span, direct = SpanRearranged.of(block), Rearranged(block)
    f = span.factors
    gen = torch.Generator().manual_seed(2)
    coef = torch.randn(3, f.weights.shape[0], generator=gen, dtype=torch.float64)
    left, right = span.vectors_of(coef)
    mats_left, mats_right = direct.vectors_of(coef)
    torch.testing.assert_close(left, span.left_of(mats_left), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(right, span.right_of(mats_right), rtol=1e-10, atol=1e-12)
    lifted = span.lift(left, right)
    torch.testing.assert_close(lifted[0], mats_left, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lifted[1], mats_right, rtol=1e-9, atol=1e-12)
    # The KFAC pair and the previous terms are such combinations.
    act, grad = block.kfac_factors()
    torch.testing.assert_close(direct.vectors_of(f.kfac[None])[0][0], act, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(direct.vectors_of(f.kfac[None])[1][0], grad, rtol=1e-12, atol=1e-14)
    if kind == "averaged":
        torch.testing.assert_close(direct.vectors_of(f.previous)[0], block.previous.act)
    else:
        assert f.previous.shape[0] == 0


@pytest.mark.parametrize("dependent", [False, True])
def test_cholesky_coordinates_span_what_the_eigendecomposition_keeps(monkeypatch, dependent):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    extra = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64)
    extra = extra + extra.mT
    if dependent:  # as KFAC-corrected's KFAC term: in the span of the samples and extra[0]
        extra = torch.cat([extra, (x.T @ x / 10 + 0.5 * extra[0])[None]])
    cholesky = FactorSpan(x, extra)
    # The Cholesky basis: T's samples block is L⁻ᵀ, upper triangular.
    assert torch.equal(cholesky.basis[:10, :10].tril(-1), torch.zeros(10, 10, dtype=torch.float64))
    monkeypatch.setattr(rearranged_module, "_cholesky_basis", lambda *args: None)
    eigh = FactorSpan(x, extra)
    assert cholesky.dim == eigh.dim == 12
    mats = torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cholesky.lift(cholesky.coords(mats)), eigh.lift(eigh.coords(mats)), rtol=1e-10, atol=1e-12)
    a, b = cholesky.coords(mats), eigh.coords(mats)
    torch.testing.assert_close(a @ a.T, b @ b.T, rtol=1e-10, atol=1e-12)


def test_cholesky_coordinates_refuse_a_singular_gram_matrix():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # 30 > 4·5/2
    assert rearranged_module._cholesky_basis((x @ x.T).square(), x.new_zeros(30, 0), x.new_zeros(0, 0)) is None
    assert FactorSpan(x, x.new_zeros(0, 4, 4)).dim == 10


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_span_products_equal_the_dense_rearrangement(stats, kind):
    block = BLOCKS[kind](stats)
    z = _dense_z(block)
    op = SpanRearranged.of(block)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(block.d_grad, block.d_grad, generator=gen, dtype=torch.float64)
    u = torch.randn(block.d_act, block.d_act, generator=gen, dtype=torch.float64)
    zv = op.lift(op.matvec(op.right_of(v[None])[0])[None], op.right_of(v[None]))[0][0]
    ztu = op.lift(op.left_of(u[None]), op.rmatvec(op.left_of(u[None])[0])[None])[1][0]
    scale = torch.linalg.matrix_norm(z)
    torch.testing.assert_close(vec(zv), z @ vec(v), rtol=0, atol=1e-10 * float(scale * v.norm()))
    torch.testing.assert_close(vec(ztu), z.T @ vec(u), rtol=0, atol=1e-10 * float(scale * u.norm()))
    # Z(F) = P_a C P_gᵀ: the core has the singular values of Z.
    s = torch.linalg.svdvals(z)
    k = min(op.core.shape)
    torch.testing.assert_close(torch.linalg.svdvals(op.core)[: min(k, 4)], s[: min(k, 4)], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_power_iterates_are_the_same_in_both_forms(kind):
    block = BLOCKS[kind](_random(7, 30, 6, 5))
    direct, span = Rearranged(block), SpanRearranged.of(block)
    v0 = block.kfac_factors()[1]
    a = power_svd(direct, v0, tol=1e-9, max_iter=500)
    b = power_svd(span, span.right_of(v0[None])[0], tol=1e-9, max_iter=500)
    assert a.iterations == b.iterations
    torch.testing.assert_close(b.sigma, a.sigma, rtol=1e-12, atol=0)
    act, grad = span.lift(b.left, b.right)
    torch.testing.assert_close(torch.kron(act[0], grad[0]), torch.kron(a.left[0], a.right[0]), rtol=1e-9, atol=1e-12)
    # Deflated and Lanczos: the same top-2 triplets.
    la = lanczos_svd(direct, v0, 2, tol=1e-10)
    lb = lanczos_svd(span, span.right_of(v0[None])[0], 2, tol=1e-10)
    torch.testing.assert_close(lb.sigma, la.sigma, rtol=1e-10, atol=0)


def test_the_cheaper_form_is_chosen_and_built_coordinates_are_reused():
    assert isinstance(rearranged(_random(0, 40, 30, 20)), SpanRearranged)
    small = _random(0, 400, 3, 2)
    assert isinstance(rearranged(small), Rearranged)
    kronecker_svd(small, rank=1)
    assert rearranged(small) is small.span_rearranged


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_kronecker_svd_of_any_block_matches_the_dense_svd(stats, kind):
    block = BLOCKS[kind](stats)
    m, n = block.d_act, block.d_grad
    u, s, vt = torch.linalg.svd(_dense_z(block))
    svd = kronecker_svd(block, rank=3)
    k = svd.singular_values.shape[0]
    torch.testing.assert_close(svd.singular_values, s[:k], rtol=1e-9, atol=1e-12 * float(s[0]))
    if k < s.shape[0]:  # what the core drops is rounding noise
        assert s[k:].max() <= 1e-6 * s[0]
    for r in range(min(3, k)):
        if r + 1 < s.shape[0] and s[r] - s[r + 1] < 1e-3 * s[0]:
            break  # no gap: the singular pair is not unique
        ours = svd.singular_values[r] * torch.kron(svd.act[r], svd.grad[r])
        best = s[r] * torch.kron(unvec(u[:, r], m, m), unvec(vt[r], n, n))
        torch.testing.assert_close(ours, best, rtol=0, atol=1e-9 * float(s[0]))


def test_exact_kronecker_svd_fits_an_averaged_block():
    block = _averaged(_random(3, 20, 4, 3))
    m, n = block.d_act, block.d_grad
    u, s, vt = torch.linalg.svd(_dense_z(block))
    best = sum(s[k] * torch.kron(unvec(u[:, k], m, m), unvec(vt[k], n, n)) for k in range(2))
    ours = fit("kronecker_svd", block, rank=2).op.to_dense()
    torch.testing.assert_close(ours, best, rtol=0, atol=1e-9 * float(s[0]))
