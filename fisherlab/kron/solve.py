"""Damped solves ``(F̂ + damping) X = V`` for one- and two-term Kronecker approximations.

All solves work in weight shape: ``V`` and the result have shape (..., n, m), and
``(A ⊗ G) vec(X) = vec(G X Aᵀ)``.

Where the damping goes (λ is the Tikhonov damping, π = √((tr A / m) / (tr G / n))):

- ``scheme="pi"`` (Martens & Grosse 2015, §6.3): ``(A + π√λ I) ⊗ (G + √λ/π I)``, i.e.
  ``A ⊗ G + λ I`` plus the cross terms ``√λ (π I ⊗ G + A ⊗ I / π)``.
- ``scheme="exact"`` (one term only): ``A ⊗ G + λ I`` through the eigendecompositions of
  ``A`` and ``G``.
- two terms ``A ⊗ G + C ⊗ D`` (Koroko et al. 2022, §3.4): the π-damping is put on the first
  (positive semi-definite) term only, ``A_λ ⊗ G_λ + C ⊗ D``. With whiteners
  ``W_A W_Aᵀ = A_λ⁻¹`` from Cholesky factors (the paper's ``A_λ^{-1/2}`` up to a rotation),
  ``W_Aᵀ C W_A = Q₁ S₁ Q₁ᵀ``, ``W_Gᵀ D W_G = Q₂ S₂ Q₂ᵀ`` and ``P_1 = W_A Q₁``, ``P_2 = W_G Q₂``
  (the generalized eigenvectors, ``C P₁ = A_λ P₁ S₁`` with ``P₁ᵀ A_λ P₁ = I``: :func:`generalized_eigh`),

  .. math::
      (A_λ ⊗ G_λ + C ⊗ D)^{-1} = (P_1 ⊗ P_2)\\,(I + S_1 ⊗ S_2)^{-1}\\,(P_1 ⊗ P_2)^\\top.

  A correction may be indefinite: where ``1 + s₁s₂ ≤ 0`` the damped sum is not positive
  definite along that (whitened) direction. The remedies (``indefinite``):

  - ``"clip_indefinite"`` (default): where some curvature is ≤ 0, raise every curvature below
    ``floor`` to ``floor``; a positive-definite sum is solved exactly, however small its
    curvatures. A positive-definite sum is a valid curvature model, so changing it only
    trades accuracy for a bound the KL clip already gives. Within an indefinite pair the
    small positive curvatures belong to the same overshooting correction as the negative
    ones, and raising only the non-positive ones would make the map from curvature to step
    non-monotone: a curvature of 1e-3 would keep its 1000-fold step while its neighbour at
    −1e-3 got ``1/floor``. Measured on CURVES after 30 Adam steps (three two-term methods,
    λ ∈ {1e-3, 1e-2, 1e-1}, every layer), curvatures in (0, 0.1) come almost always beside
    non-positive ones: of 40 (method, layer, λ) with any below 0.1, only 3 pairs were positive
    definite (benchmarks/results/remedy_scope.md, ``benchmarks/bench_remedy.py``).
  - ``"clip"``: raise every curvature below ``floor`` to ``floor``, in every pair (this
    changes positive-definite directions too).
  - ``"drop"``: ignore the correction everywhere.
  - ``"raise"``: raise :class:`IndefiniteError` where a curvature is below ``floor``.

  Clipped, the step along a direction is at most ``1/floor`` times the step of the damped
  first term alone. The number of changed curvatures is reported in ``clipped``. Absolute
  values are never taken.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from fisherlab.kron.kronsum import KronSum

SCHEMES = ("pi", "exact")
INDEFINITE_REMEDIES = ("clip_indefinite", "clip", "drop", "raise")
#: Most Kronecker terms :func:`damped_inverse` inverts in closed form (§3.4).
MAX_TERMS = 2


class FactorizationError(RuntimeError):
    """An eigendecomposition failed even in float64, or a damped factor is not positive definite."""


class IndefiniteError(FactorizationError):
    """The damped two-term sum is not positive definite and ``indefinite="raise"`` was asked."""


def safe_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part, retried in float64 when it fails to converge.

    Dead ReLU units give factors with zero rows and columns, on which LAPACK's eigh can fail
    in float32.
    """
    sym = (matrix + matrix.mT) / 2
    try:
        return torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        pass
    try:
        lam, q = torch.linalg.eigh(sym.double())
    except torch.linalg.LinAlgError as exc:
        raise FactorizationError(f"eigh failed on a {tuple(sym.shape)} factor even in float64") from exc
    return lam.to(sym.dtype), q.to(sym.dtype)


def _plus_diagonal(matrix: Tensor, shift: float) -> Tensor:
    """``M + shift I`` as a new tensor, without forming ``I`` (the same numbers as ``M + shift * I``)."""
    out = matrix.clone()
    out.diagonal().add_(shift)
    return out


def pi_factor(act: Tensor, grad: Tensor) -> float:
    """π = √((tr A / m) / (tr G / n)) (1 when either trace is not positive)."""
    ta = float(torch.trace(act)) / act.shape[-1]
    tg = float(torch.trace(grad)) / grad.shape[-1]
    return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor ``L Lᵀ = M`` of a damped factor, retried in float64 before giving up.

    It gives ``M⁻¹`` for one term and ``W = L⁻ᵀ``, the whitener of the §3.4 solve (``W Wᵀ = M⁻¹``,
    ``Wᵀ M W = I``; ``M^{-1/2}`` up to a rotation, which the eigenvectors of the whitened
    correction absorb). Cholesky costs far less than the eigendecomposition an inverse
    square root needs, and fails exactly when the damped factor is not numerically positive
    definite. It reads only the lower triangle, so ``M`` needs no symmetrization. The factor
    is returned in float64 when the retry was needed.
    """
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0 and matrix.dtype != torch.float64:
        chol, info = torch.linalg.cholesky_ex(matrix.double())
    if int(info) == 0:
        return chol
    raise FactorizationError(f"the damped {what} factor is not positive definite (Cholesky failed even in float64)")


def _damped_inverse_factor(factor: Tensor, shift: float, what: str) -> Tensor:
    """``(M + shift I)⁻¹`` from the Cholesky factor of the lower triangle, in ``M``'s dtype.

    On the CPU, LAPACK ``potrf`` and ``potri`` (SciPy's) run in place on the damped copy, which
    they see transposed (column-major) without a copy: its upper triangle there is the lower
    one here. They take about 0.7 times the time of torch's ``cholesky`` and
    ``cholesky_inverse`` at 785 ≤ n ≤ 1000 (one thread). Elsewhere (CUDA) torch's. Both retry in
    float64 where the factorization fails.

    Raises:
        FactorizationError: if the damped factor is not numerically positive definite, even in float64.
    """
    if factor.device.type != "cpu" or factor.dtype not in (torch.float32, torch.float64):
        return torch.cholesky_inverse(_cholesky(_plus_diagonal(factor, shift), what)).to(factor.dtype)
    for dtype in dict.fromkeys((factor.dtype, torch.float64)):
        work = _plus_diagonal(factor.detach().to(dtype), shift)
        potrf, potri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "potri"), dtype=work.numpy().dtype)
        chol, info = potrf(work.numpy().T, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            inv, info = potri(chol, lower=0, overwrite_c=1)
        if info == 0:
            inv = torch.from_numpy(inv).mT  # the inverse in its lower triangle: mirrored
            lower = torch.ones(inv.shape, dtype=torch.bool).tril_()
            return torch.where(lower, inv, inv.mT).to(factor.dtype)
    raise FactorizationError(f"the damped {what} factor is not positive definite (Cholesky failed even in float64)")


def generalized_eigh(matrix: Tensor, damped: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """``S`` and ``P`` with ``M P = A P S``, ``Pᵀ A P = I`` for a damped factor ``A``, in ``M``'s dtype.

    On the CPU this is LAPACK's ``sygvd`` through SciPy (Cholesky factor, whitening,
    eigendecomposition and back-transformation in one call), faster than :func:`_cholesky`
    with the three triangular solves and ``eigh`` of :func:`_whitened_eigh`. Elsewhere (CUDA)
    it is those. Both read only the lower
    triangles and retry in float64 when LAPACK fails.

    Raises:
        FactorizationError: if ``A`` is not positive definite or the eigendecomposition
            fails, even in float64.
    """
    if matrix.device.type != "cpu":
        return _whitened_eigh(_cholesky(damped, what), matrix)
    for dtype in dict.fromkeys((matrix.dtype, torch.float64)):
        try:
            s, p = scipy.linalg.eigh(matrix.to(dtype).numpy(), damped.to(dtype).numpy(), lower=True,
                                     driver="gvd", check_finite=False)
        except np.linalg.LinAlgError:
            continue
        return torch.from_numpy(s).to(matrix.dtype), torch.from_numpy(p).to(matrix.dtype)
    _cholesky(damped, what)  # raises the precise error where A is the culprit
    raise FactorizationError(f"the generalized eigendecomposition of a {tuple(matrix.shape)} factor failed even in float64")


def _whitened_eigh(chol: Tensor, matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``S`` and ``P = L⁻ᵀ Q`` for ``L⁻¹ M L⁻ᵀ = Q S Qᵀ``, in ``matrix``'s dtype.

    Three triangular solves (``M L⁻ᵀ``, then ``(M L⁻ᵀ)ᵀ L⁻ᵀ`` by the symmetry of ``M``, then
    ``(Qᵀ L⁻¹)ᵀ``) instead of an explicit inverse and three products. All three solve from
    the right: on torch's row-major tensors that is up to twice as fast as from the left
    (one thread, 200 ≤ m ≤ 1000).
    """
    half = torch.linalg.solve_triangular(chol.mT, matrix.to(chol.dtype), upper=True, left=False)
    s, q = safe_eigh(torch.linalg.solve_triangular(chol.mT, half.mT, upper=True, left=False))
    p = torch.linalg.solve_triangular(chol, q.mT, upper=False, left=False).mT
    return s.to(matrix.dtype), p.to(matrix.dtype)


class DampedInverse:
    """``(F̂ + damping)⁻¹`` in one of two forms.

    - factored (two terms, or ``scheme="exact"``): ``X ↦ P₂ [(P₂ᵀ V P₁) / D] P₁ᵀ``;
    - Kronecker (one π-damped term, or a dropped correction): ``X ↦ G_λ⁻¹ V A_λ⁻¹``, the two
      inverses from their Cholesky factors (LAPACK ``potri``, faster than a triangular
      inverse and its product with itself).

    Attributes:
        left: ``P₂`` (n × n), gradient side; ``G_λ⁻¹`` in the Kronecker form.
        right: ``P₁`` (m × m), activation side; ``A_λ⁻¹`` in the Kronecker form.
        denom: ``D`` (n × m), the (clipped) curvatures in the factored basis; None in the
            Kronecker form.
        clipped: how many curvatures the indefinite remedy changed.
    """

    def __init__(self, left: Tensor, right: Tensor, denom: Tensor | None, clipped: int = 0):
        self.left, self.right, self.denom, self.clipped = left, right, denom, clipped

    def solve(self, v: Tensor) -> Tensor:
        """``(F̂ + damping)⁻¹ vec(V)`` in weight shape, ``V`` of shape (..., n, m)."""
        if self.denom is None:
            return self.left @ v @ self.right
        y = self.left.mT @ v @ self.right
        return self.left @ (y / self.denom) @ self.right.mT


def damped_inverse(
    op: KronSum,
    damping: float,  # λ in the paper
    scheme: str = "pi",
    indefinite: str = "clip_indefinite",
    floor: float = 0.1,
) -> DampedInverse:
    """Factor ``(F̂ + damping)`` once for repeated solves (see the module docstring).

    Args:
        op: one term (KFAC, KPSVD) or two terms (Deflation, Lanczos, KFAC-corrected); the
            first term must be positive semi-definite.
        damping: λ ≥ 0.
        scheme: ``"pi"`` or ``"exact"`` (one term only).
        indefinite: remedy for two-term sums that are not positive definite (module docstring).
        floor: smallest curvature kept by the ``clip`` remedies, in (0, 1].

    Raises:
        ValueError: invalid arguments.
        FactorizationError: a damped first-term factor is not positive definite.
        IndefiniteError: with ``indefinite="raise"``, when the sum is not positive definite.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown damping scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if indefinite not in INDEFINITE_REMEDIES:
        raise ValueError(f"unknown indefinite remedy {indefinite!r}; choose from {', '.join(INDEFINITE_REMEDIES)}")
    if not damping >= 0:
        raise ValueError(f"damping must be nonnegative, got {damping}")
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    if op.rank > MAX_TERMS:
        raise ValueError(f"closed-form solves exist for one or two Kronecker terms, got {op.rank}")
    act, grad = op.act[0], op.grad[0]
    if scheme == "exact":
        if op.rank != 1:
            raise ValueError("scheme='exact' damps A ⊗ G + λI, which needs a single term")
        la, qa = safe_eigh(act)
        lg, qg = safe_eigh(grad)
        denom = lg[:, None] * la[None, :] + damping
        if denom.min() <= 0:
            raise FactorizationError(f"A ⊗ G + λI is not positive definite (min eigenvalue {float(denom.min()):.3g})")
        return DampedInverse(qg, qa, denom)
    pi = pi_factor(act, grad)
    root = math.sqrt(damping)
    if op.rank == 1 or indefinite == "drop":
        return DampedInverse(_damped_inverse_factor(grad, root / pi, "gradient"),
                             _damped_inverse_factor(act, pi * root, "activation"), None)
    damped_a, damped_g = _plus_diagonal(act, pi * root), _plus_diagonal(grad, root / pi)
    s1, p1 = generalized_eigh(op.act[1], damped_a, "activation")
    s2, p2 = generalized_eigh(op.grad[1], damped_g, "gradient")
    denom = 1 + s2[:, None] * s1[None, :]
    low = denom < floor
    if indefinite == "clip_indefinite" and not bool((denom <= 0).any()):
        low = torch.zeros_like(low)
    clipped = int(low.sum())
    if clipped and indefinite == "raise":
        raise IndefiniteError(
            f"the damped two-term sum has {clipped} curvatures below {floor} (min {float(denom.min()):.3g})"
        )
    return DampedInverse(p2, p1, torch.where(low, torch.full_like(denom, floor), denom), clipped)
