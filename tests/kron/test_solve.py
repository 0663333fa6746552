import math

import pytest
import torch

from fisherlab.kron import KronSum, fit
from fisherlab.kron.layout import unvec, vec
from fisherlab.kron.solve import (
    FactorizationError,
    IndefiniteError,
    _cholesky,
    _damped_inverse_factor,
    _whitened_eigh,
    damped_inverse,
    generalized_eigh,
    pi_factor,
    safe_eigh,
)
from tests.conftest import CASES


def _pi_damped_dense(op: KronSum, damping: float):
    act, grad = op.act[0], op.grad[0]
    pi, root = pi_factor(act, grad), math.sqrt(damping)
    eye_a = torch.eye(op.d_act, dtype=act.dtype)
    eye_g = torch.eye(op.d_grad, dtype=act.dtype)
    dense = torch.kron(act + pi * root * eye_a, grad + root / pi * eye_g)
    if op.rank == 2:
        dense = dense + torch.kron(op.act[1], op.grad[1])
    return dense


def _check(inv, dense, op):
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(op.d_grad, op.d_act, generator=gen, dtype=torch.float64)
    ref = unvec(torch.linalg.solve(dense, vec(v)), op.d_grad, op.d_act)
    assert torch.allclose(inv.solve(v), ref, rtol=1e-9, atol=1e-9 * ref.abs().max())


@pytest.mark.parametrize("method", ["kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected"])
@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_pi_damped_solves_match_dense(stats, method, damping):
    op = fit(method, stats).op
    dense = _pi_damped_dense(op, damping)
    first = _pi_damped_dense(KronSum(op.act[:1], op.grad[:1]), damping)
    if torch.linalg.eigvalsh(dense).min() <= 0.1 * torch.linalg.eigvalsh(first).min():
        pytest.skip("the correction makes this sum (nearly) indefinite: see the remedy tests")
    inv = damped_inverse(op, damping)
    assert inv.clipped == 0
    _check(inv, dense, op)


def test_exact_damping_matches_dense(stats):
    op = fit("kfac", stats).op
    inv = damped_inverse(op, 1e-2, scheme="exact")
    _check(inv, op.to_dense() + 1e-2 * torch.eye(op.p, dtype=torch.float64), op)
    with pytest.raises(ValueError, match="single term"):
        damped_inverse(fit("deflation", stats).op, 1e-2, scheme="exact")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_damped_factor_inverse_reads_the_lower_triangle_and_is_exactly_symmetric(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 9, generator=gen, dtype=torch.float64)
    factor = x.T @ x / 40
    shift = 0.3
    reference = torch.linalg.inv(factor + shift * torch.eye(9, dtype=torch.float64))
    garbled = factor.to(dtype).clone()
    garbled[torch.ones(9, 9, dtype=torch.bool).triu(1)] = float("nan")  # the upper triangle is never read
    before = garbled.clone()
    inv = _damped_inverse_factor(garbled, shift, "activation")
    assert inv.dtype == dtype and torch.equal(inv, inv.T)
    assert torch.equal(garbled.nan_to_num(), before.nan_to_num())  # the caller's factor is left alone
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(inv.double(), reference, rtol=tol, atol=tol * reference.abs().max())


def test_damped_factor_inverse_retries_in_float64():
    # In float32, 1 + 1e-10 rounds to 1 and ones + 1e-10 I is singular; in float64 it is not.
    factor = torch.ones(2, 2, dtype=torch.float32)
    inv = _damped_inverse_factor(factor, 1e-10, "gradient")
    reference = torch.linalg.inv(torch.ones(2, 2, dtype=torch.float64) + 1e-10 * torch.eye(2, dtype=torch.float64))
    assert inv.dtype == torch.float32
    assert torch.allclose(inv.double(), reference, rtol=1e-5)
    with pytest.raises(FactorizationError, match="damped gradient factor is not positive definite"):
        _damped_inverse_factor(-factor, 1e-10, "gradient")


def _indefinite_pair():
    stats = CASES["random"]()
    act, grad = stats.kfac_factors()
    # A strongly negative correction: A ⊗ G − 2 A ⊗ G is negative definite.
    return KronSum(torch.stack([act, -2 * act]), torch.stack([grad, grad]))


def test_indefinite_correction_is_detected_and_remedied():
    op = _indefinite_pair()
    with pytest.raises(IndefiniteError, match="curvatures below"):
        damped_inverse(op, 1e-3, indefinite="raise")
    clipped = damped_inverse(op, 1e-3, indefinite="clip", floor=0.5)
    assert clipped.clipped > 0 and torch.all(clipped.denom >= 0.5)
    v = torch.randn(op.d_grad, op.d_act, dtype=torch.float64)
    x = clipped.solve(v)
    assert torch.isfinite(x).all()
    # The remedied step is a descent direction: ⟨v, x⟩ > 0 (positive definite inverse).
    assert float((v * x).sum()) > 0
    dropped = damped_inverse(op, 1e-3, indefinite="drop")
    _check(dropped, _pi_damped_dense(KronSum(op.act[:1], op.grad[:1]), 1e-3), op)


def test_clip_only_changes_the_offending_curvatures():
    stats = CASES["network"]()
    op = fit("kfac_corrected", stats).op
    plain = damped_inverse(op, 1e-2, indefinite="clip", floor=1e-12)
    clipped = damped_inverse(op, 1e-2, indefinite="clip", floor=0.999)
    keep = plain.denom >= 0.999
    assert torch.allclose(plain.denom[keep], clipped.denom[keep])
    assert clipped.clipped == int((~keep).sum())


def _pair_with_curvatures(lowest: float):
    """A damped pair whose curvatures 1 + s₁s₂ run from ``lowest`` to 1, with some in (0, 0.1)."""
    gen = torch.Generator().manual_seed(4)
    act = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    grad = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    act, grad = act @ act.T + torch.eye(5, dtype=torch.float64), grad @ grad.T + torch.eye(4, dtype=torch.float64)
    pi, root = pi_factor(act, grad), math.sqrt(1e-2)
    a_l, g_l = act + pi * root * torch.eye(5, dtype=torch.float64), grad + root / pi * torch.eye(4, dtype=torch.float64)
    s1 = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    s2 = torch.full((4,), lowest - 1.0, dtype=torch.float64)
    s2[1:] = torch.linspace(-0.95, 0.0, 3, dtype=torch.float64)
    # C P₁ = A_λ P₁ S₁ with P₁ᵀ A_λ P₁ = I: C = A_λ P₁ S₁ P₁ᵀ A_λ for any A_λ-orthonormal P₁.
    p1 = torch.linalg.cholesky(torch.linalg.inv(a_l))
    p2 = torch.linalg.cholesky(torch.linalg.inv(g_l))
    c = a_l @ p1 @ torch.diag(s1) @ p1.T @ a_l
    d = g_l @ p2 @ torch.diag(s2) @ p2.T @ g_l
    op = KronSum(torch.stack([act, (c + c.T) / 2]), torch.stack([grad, (d + d.T) / 2]))
    curvatures = 1 + s2[:, None] * s1[None, :]
    return op, curvatures


def test_clip_indefinite_leaves_a_positive_definite_sum_untouched():
    op, curvatures = _pair_with_curvatures(0.02)
    assert curvatures.min() > 0 and int(((curvatures > 0) & (curvatures < 0.1)).sum()) > 0
    inv = damped_inverse(op, 1e-2)  # the default remedy
    assert inv.clipped == 0
    torch.testing.assert_close(torch.sort(inv.denom.flatten()).values, torch.sort(curvatures.flatten()).values)
    _check(inv, _pi_damped_dense(op, 1e-2), op)
    # The unscoped remedy changes those positive-definite directions.
    assert damped_inverse(op, 1e-2, indefinite="clip").clipped == int((curvatures < 0.1).sum())


def test_clip_indefinite_raises_every_curvature_below_the_floor_in_an_indefinite_sum():
    op, curvatures = _pair_with_curvatures(-0.5)
    low = curvatures < 0.1
    assert (curvatures <= 0).any() and ((curvatures > 0) & low).any()
    inv = damped_inverse(op, 1e-2)
    assert inv.clipped == int(low.sum())
    expected = torch.where(low, torch.full_like(curvatures, 0.1), curvatures)
    torch.testing.assert_close(torch.sort(inv.denom.flatten()).values, torch.sort(expected.flatten()).values)
    assert torch.equal(inv.denom, damped_inverse(op, 1e-2, indefinite="clip").denom)


def test_invalid_arguments_and_non_positive_definite_factors():
    op = fit("kfac", CASES["random"]())
    with pytest.raises(ValueError, match="pi, exact"):
        damped_inverse(op.op, 1e-3, scheme="tikhonov")
    with pytest.raises(ValueError, match="clip, drop, raise"):
        damped_inverse(op.op, 1e-3, indefinite="abs")
    with pytest.raises(ValueError, match="nonnegative"):
        damped_inverse(op.op, -1.0)
    singular = KronSum(torch.zeros(1, 3, 3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[None])
    with pytest.raises(FactorizationError, match="not positive definite"):
        damped_inverse(singular, 0.0)
    corrected = KronSum(torch.cat([singular.act, torch.eye(3, dtype=torch.float64)[None]]), singular.grad.repeat(2, 1, 1))
    with pytest.raises(FactorizationError, match="damped activation factor is not positive definite"):
        damped_inverse(corrected, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generalized_eigh_paths_agree_and_solve_the_pencil(dtype):
    # The CPU path (LAPACK sygvd) and the CUDA one (Cholesky, triangular solves, eigh) give
    # the same curvatures and eigenvectors with M P = A P S, Pᵀ A P = I.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    damped = x.T @ x / 40 + 0.1 * torch.eye(12, dtype=torch.float64)
    y = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    matrix = (y.T * torch.randn(40, generator=gen, dtype=torch.float64)) @ y / 40  # indefinite
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    cpu = generalized_eigh(matrix.to(dtype), damped.to(dtype), "activation")
    other = _whitened_eigh(_cholesky(damped.to(dtype), "activation"), matrix.to(dtype))
    for s, p in (cpu, other):
        assert s.dtype == p.dtype == dtype
        s, p = s.double(), p.double()
        torch.testing.assert_close(matrix @ p, damped @ p * s, **tol)
        torch.testing.assert_close(p.T @ damped @ p, torch.eye(12, dtype=torch.float64), **tol)
    torch.testing.assert_close(cpu[0], other[0], **tol)
    # Eigenvectors agree up to sign (the curvatures are distinct).
    signs = torch.sign((cpu[1] * other[1]).sum(0))
    torch.testing.assert_close(cpu[1] * signs, other[1], **tol)


def test_safe_eigh_on_dead_units_and_asymmetric_input():
    m = torch.zeros(5, 5)
    m[0, 0], m[1, 2] = 1.0, 1e-3  # zero rows/columns and a slight asymmetry
    lam, q = safe_eigh(m)
    sym = (m + m.T) / 2
    assert torch.allclose(q @ torch.diag(lam) @ q.T, sym, atol=1e-6)
