"""The rearranged block ``Z(F)`` as an operator for the SVD solvers, in two exact forms.

Every block the fitters see (a :class:`~fisherlab.kron.block.RankOneBlock`) factors as
``Z = D_a W D_gᵀ``: the columns of ``D_a`` are ``vec(a_n a_nᵀ)`` (and, for an averaged block,
the previous approximation's factors), those of ``D_g`` likewise, and ``W`` is a diagonal of
weights (``I/N`` for a mini-batch block, paper Prop. 3.1). Two representations of ``Z``
serve :func:`~fisherlab.kron.partial_svd.power_svd` and
:func:`~fisherlab.kron.partial_svd.lanczos_svd`:

- :class:`Rearranged`, the matrix-free products of Prop. 3.1 on ``m × m`` and ``n × n``
  matrices, ``O(N (m² + n²))`` each;
- :class:`SpanRearranged`, the same operator in orthonormal coordinates of ``span D_a`` and
  ``span D_g`` (span coordinates). With the Gram matrix ``H = Dᵀ D`` of the columns of ``D``
  (for samples ``(a aᵀ)∘²``), any ``T`` with ``Tᵀ H T = I`` gives the basis ``P = D T`` and
  ``Z = P_a C P_gᵀ`` with the ``K × K`` core ``C = (H_a T_a)ᵀ W (H_g T_g)``. A product then
  costs ``O(K²)`` instead of ``O(N (m² + n²))`` (MNIST layer 1: 2.6e5 against 8e8 flops),
  after one ``O(K³)`` factorization per side. The iterates are the direct ones from the first product on:
  ``Z`` annihilates the part of a start vector outside ``span D_g``.

:func:`rearranged` picks the cheaper form; :func:`kronecker_svd` is the exact SVD of the
core, any rank, no iteration. The coordinates are computed in float64 whatever the
working dtype: the Gram matrices square the condition number of ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.kron.block import RankOneBlock


@dataclass(frozen=True)
class ZFactors:
    """``Z = D_a W D_gᵀ``: sample rows, extra matrices and weights that define a rearranged block.

    Matrices the fitters need besides ``Z`` are given as combinations of the columns, one
    coefficient vector ``c`` for the pair ``(D_a c, D_g c)``: :meth:`SpanRearranged.vectors_of`
    turns those into coordinates without touching an ``m × m`` or ``n × n`` matrix.

    Attributes:
        act_samples: ``(N, m)``: ``vec(a_n a_nᵀ)`` are the first ``N`` columns of ``D_a``.
        act_extra: ``(r, m, m)``: the remaining columns of ``D_a``.
        grad_samples: ``(N, n)``; grad_extra: ``(r, n, n)``: likewise for ``D_g``.
        weights: the diagonal of ``W``, of length ``N + r`` (the extra matrices come in pairs,
            one term ``vec(E_j) vec(E'_j)ᵀ`` each).
        kfac: ``(N + r,)`` coefficients of the KFAC pair, or None if the block has none.
        previous: ``(t, N + r)`` coefficients of the terms of a previous approximation the
            block holds (an averaged block's; ``t = 0`` for a mini-batch block).
    """

    act_samples: Tensor
    act_extra: Tensor
    grad_samples: Tensor
    grad_extra: Tensor
    weights: Tensor
    kfac: Tensor | None
    previous: Tensor


@dataclass(frozen=True)
class KroneckerSVD:
    """Kronecker singular value decomposition ``F = Σ_k σ_k R_k ⊗ S_k`` (``‖R_k‖ = ‖S_k‖ = 1``).

    Attributes:
        singular_values: all nonzero Kronecker singular values σ, descending.
        act: ``(r, m, m)`` activation-side factors ``R_k`` of the leading ``r`` terms.
        grad: ``(r, n, n)`` gradient-side factors ``S_k``.
    """

    singular_values: Tensor
    act: Tensor
    grad: Tensor


class FactorSpan:
    """Orthonormal coordinates of ``span{x_n x_nᵀ} + span{E_j}`` from its Gram matrix ``H = DᵀD``.

    The basis is ``P = D T`` with ``Tᵀ H T = I``: ``basis`` holds ``T`` and ``column_coords``
    ``H T = Dᵀ P`` (row ``j``: the coordinates of column ``j`` of ``D``). Any orthonormal basis
    of the span gives the same fits (the solvers and the core's singular values are rotation
    invariant), so ``T`` comes from a Cholesky factor (:func:`_cholesky_basis`, a tenth of an
    eigendecomposition's cost) wherever that is certified well conditioned, else from
    ``H = Q Λ Qᵀ`` (:func:`_eigh_basis`).
    """

    def __init__(self, samples: Tensor, extra: Tensor):
        self.lift_samples, self.lift_extra = samples, extra  # lifts run in the working dtype
        x, e = samples.double(), extra.double()
        self.samples, self.extra = x, e
        h11, h12, h22 = (x @ x.T).square(), quadratic(x, e).T, torch.einsum("rij,sij->rs", e, e)
        found = _cholesky_basis(h11, h12, h22)
        if found is None:
            found = _eigh_basis(torch.cat([torch.cat([h11, h12], dim=1), torch.cat([h12.T, h22], dim=1)]))
        self.basis, self.column_coords = found

    @property
    def dim(self) -> int:
        """``k``, the dimension of the span (the columns of ``basis``)."""
        return self.basis.shape[1]

    def inner(self, mats: Tensor) -> Tensor:
        """``D_ᵀ vec(M)``: ``x_nᵀ M x_n`` and ``⟨E_j, M⟩`` for matrices of shape (..., d, d)."""
        mats = mats.double()
        quad = quadratic(self.samples, mats)
        return torch.cat([quad, frobenius_inner(self.extra, mats)], dim=-1)

    def coords(self, mats: Tensor) -> Tensor:
        """``Pᵀ vec(M)``, the coordinates of the projection of ``M`` onto the span, shape (..., k)."""
        return self.inner(mats) @ self.basis

    def combination(self, coef: Tensor) -> Tensor:
        """``Pᵀ D c``, the coordinates of the span's element ``D c`` (..., k), for coefficients
        ``c`` (..., N + r): rows of ``H T``, no quadratic forms (``D c`` is in the span)."""
        return coef.double() @ self.column_coords

    def lift(self, coords: Tensor) -> Tensor:
        """``P y`` as matrices (..., d, d), in the samples' dtype, for coordinates ``y`` (..., k)."""
        return combine(self.lift_samples, self.lift_extra, coords @ self.basis.T)


def _cholesky_basis(h11: Tensor, h12: Tensor, h22: Tensor) -> tuple[Tensor, Tensor] | None:
    """``T`` and ``H T`` from ``H₁₁ = L Lᵀ`` (samples) and the extras' Schur complement, or None.

    With ``B = L⁻¹ H₁₂``, the extras' parts outside the samples' span have the Gram matrix
    ``S = H₂₂ − BᵀB = V Σ Vᵀ``, and ``T = [[L⁻ᵀ, −L⁻ᵀ B V Σ^{-1/2}], [0, V Σ^{-1/2}]]``,
    ``H T = [[L, 0], [Bᵀ, V Σ^{1/2}]]``. A direction ``v`` of ``S`` is dropped when the
    Rayleigh quotient ``σ_v / ‖z_v‖²`` of ``z_v = (−H₁₁⁻¹ H₁₂ v, v)`` is at most ``K ε max diag H``:
    ``H`` then has an eigenvalue that :func:`_eigh_basis` drops too (an extra matrix already
    in the span, as KFAC-corrected's KFAC term is). The rest is used only if
    ``tr H · tr H_kept⁻¹ < 1/(K ε)``: that bounds ``κ(H_kept)`` below the eigendecomposition's
    threshold, which would keep every one of these directions. None when Cholesky fails or
    the bound does not hold.
    """
    n, k = h11.shape[0], h11.shape[0] + h22.shape[0]
    eps = torch.finfo(h11.dtype).eps
    chol, info = torch.linalg.cholesky_ex(h11)
    if int(info) != 0:
        return None
    eye = torch.eye(n, dtype=h11.dtype, device=h11.device)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False, left=False)  # L⁻¹; from the right is faster
    b = inv @ h12
    sigma, v = torch.linalg.eigh(h22 - b.T @ b)
    coef = inv.T @ (b @ v)
    znorm = 1 + coef.square().sum(dim=0)
    keep = sigma > znorm * k * eps * torch.cat([h11.diagonal(), h22.diagonal()]).max()
    sigma, v, coef, znorm = sigma[keep], v[:, keep], coef[:, keep], znorm[keep]
    trace_inv = inv.square().sum() + (znorm / sigma).sum()
    if not float((h11.trace() + h22.trace()) * trace_inv) < 1 / (k * eps):
        return None
    root = sigma.sqrt()
    basis = torch.cat([torch.cat([inv.T, -coef / root], dim=1), torch.cat([h12.new_zeros(h12.T.shape), v / root], dim=1)])
    column_coords = torch.cat([torch.cat([chol, h12.new_zeros(n, v.shape[1])], dim=1), torch.cat([b.T, v * root], dim=1)])
    return basis, column_coords


def _eigh_basis(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``T = Q Λ^{-1/2}`` and ``H T = Q Λ^{1/2}`` on the eigenvalues above ``K ε`` of the largest.

    The dropped directions carry at most ``√(K ε)`` of ``‖D‖``, which is rounding noise of
    the Gram matrix itself.
    """
    lam, q = torch.linalg.eigh((gram + gram.T) / 2)
    keep = lam > lam[-1].clamp_min(torch.finfo(lam.dtype).tiny) * gram.shape[0] * torch.finfo(lam.dtype).eps
    q, root = q[:, keep], lam[keep].sqrt()
    return q / root, q * root


def quadratic(x: Tensor, mats: Tensor) -> Tensor:
    """``x_nᵀ M x_n`` for samples ``x`` (N, d) and matrices (..., d, d); shape (..., N).

    As matmuls, which run faster than torch's einsum of the same expression.
    """
    return ((x @ mats) * x).sum(-1)


def weighted_outer(c: Tensor, x: Tensor) -> Tensor:
    """``Σ_n c_n x_n x_nᵀ`` for weights ``c`` (..., N) and samples ``x`` (N, d); shape (..., d, d)."""
    return (c[..., :, None] * x).mT @ x


def frobenius_inner(mats: Tensor, x: Tensor) -> Tensor:
    """``⟨M_j, X⟩_F`` for stacked matrices (r, d, e) and ``X`` (..., d, e); shape (..., r).

    These two helpers are the solvers' inner loops: as matmuls on flattened matrices they
    cost a third of the equivalent einsum's dispatch, which dominates on small layers.
    """
    return x.flatten(-2) @ mats.flatten(1).T


def linear_combination(weights: Tensor, mats: Tensor) -> Tensor:
    """``Σ_j w_j M_j`` for weights (..., r) and stacked matrices (r, d, e); shape (..., d, e)."""
    return (weights @ mats.flatten(1)).unflatten(-1, mats.shape[1:])


def _minus_terms(z: Tensor, left: Tensor, right: Tensor, x: Tensor) -> Tensor:
    """``z − Σ_j ⟨R_j, x⟩ L_j``: a product with the operator less its subtracted terms."""
    return z - linear_combination(frobenius_inner(right, x), left) if left.shape[0] else z


def combine(samples: Tensor, extra: Tensor, coef: Tensor) -> Tensor:
    """``D c`` as matrices (..., d, d) in the samples' dtype: ``Σ_n c_n x_n x_nᵀ + Σ_j c_{N+j} E_j``."""
    c = coef.to(samples.dtype)
    n = samples.shape[0]
    return weighted_outer(c[..., :n], samples) + linear_combination(c[..., n:], extra)


class Rearranged:
    """``Z(F) − Σ_j vec(A_j) vec(G_j)ᵀ`` by the matrix-free products of Prop. 3.1.

    Vectors are ``m × m`` (left) and ``n × n`` (right) matrices. Subtracting terms is how
    deflation (the previous singular triplets) and KFAC-corrected (the KFAC term) reach the
    next triplet without forming anything dense.
    """

    def __init__(self, block, act: Tensor | None = None, grad: Tensor | None = None, factors: ZFactors | None = None):
        self.block = block
        self.factors = block.rearranged_factors() if factors is None else factors
        opts = {"dtype": block.dtype, "device": block.device}
        self.act = torch.zeros(0, block.d_act, block.d_act, **opts) if act is None else act
        self.grad = torch.zeros(0, block.d_grad, block.d_grad, **opts) if grad is None else grad

    def minus(self, left: Tensor, right: Tensor) -> Rearranged:
        """This operator with the terms ``vec(L_j) vec(R_j)ᵀ`` removed too (stacked vectors)."""
        return type(self)(self.block, torch.cat([self.act, left]), torch.cat([self.grad, right]), self.factors)

    def matvec(self, v: Tensor) -> Tensor:
        """``Z(F) vec(V) − Σ_j ⟨G_j, V⟩ A_j`` for ``V`` of shape (..., n, n), returned as (..., m, m)."""
        return _minus_terms(self.block.z_matvec(v), self.act, self.grad, v)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``Z(F)ᵀ vec(U) − Σ_j ⟨A_j, U⟩ G_j`` for ``U`` of shape (..., m, m), returned as (..., n, n)."""
        return _minus_terms(self.block.z_rmatvec(u), self.grad, self.act, u)

    def left_of(self, mats: Tensor) -> Tensor:
        """Left vectors for activation-side matrices (r, m, m): the matrices themselves."""
        return mats

    def right_of(self, mats: Tensor) -> Tensor:
        """Right vectors for gradient-side matrices (r, n, n): the matrices themselves."""
        return mats

    def vectors_of(self, coef: Tensor) -> tuple[Tensor, Tensor]:
        """Left and right vectors of the pairs ``(D_a c, D_g c)`` for coefficients (t, N + r) (:class:`ZFactors`)."""
        f = self.factors
        return combine(f.act_samples, f.act_extra, coef), combine(f.grad_samples, f.grad_extra, coef)

    def lift(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        """Matrices (r, m, m) and (r, n, n) for stacked left and right vectors."""
        return left, right

    def frobenius_norm(self) -> Tensor:
        """``‖Z‖_F`` of the operator before any subtraction (= ‖F‖_F)."""
        return self.block.frobenius_norm()


class SpanRearranged:
    """``Z − Σ_j l_j r_jᵀ`` in the orthonormal coordinates of :class:`FactorSpan` (float64).

    Vectors are ``(k, 1)`` columns, so the solvers' Frobenius norms and inner products are
    the Euclidean ones of the coordinates, which equal those of the matrices they stand for.
    """

    def __init__(self, span_act: FactorSpan, span_grad: FactorSpan, core: Tensor, factors: ZFactors,
                 left: Tensor | None = None, right: Tensor | None = None):
        self.span_act, self.span_grad, self.core, self.factors = span_act, span_grad, core, factors
        self.left = core.new_zeros(0, span_act.dim, 1) if left is None else left
        self.right = core.new_zeros(0, span_grad.dim, 1) if right is None else right

    @classmethod
    def of(cls, block) -> SpanRearranged:
        """The operator of a rank-one ``block``, nothing subtracted: core ``C = P_aᵀ Z P_g = (D_aᵀ P_a)ᵀ W (D_gᵀ P_g)``."""
        f: ZFactors = block.rearranged_factors()
        span_act, span_grad = FactorSpan(f.act_samples, f.act_extra), FactorSpan(f.grad_samples, f.grad_extra)
        core = (span_act.column_coords.T * f.weights.double()) @ span_grad.column_coords
        return cls(span_act, span_grad, core, f)

    def minus(self, left: Tensor, right: Tensor) -> SpanRearranged:
        """This operator with the terms ``l_j r_jᵀ`` removed too (stacked coordinates (t, k, 1))."""
        return SpanRearranged(self.span_act, self.span_grad, self.core, self.factors,
                              torch.cat([self.left, left]), torch.cat([self.right, right]))

    def matvec(self, v: Tensor) -> Tensor:
        """``C v − Σ_j ⟨r_j, v⟩ l_j`` for gradient-side coordinates ``v`` (..., k_g, 1)."""
        return _minus_terms(self.core @ v, self.left, self.right, v)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``Cᵀ u − Σ_j ⟨l_j, u⟩ r_j`` for activation-side coordinates ``u`` (..., k_a, 1)."""
        return _minus_terms(self.core.T @ u, self.right, self.left, u)

    def left_of(self, mats: Tensor) -> Tensor:
        """Coordinates (r, k, 1) of activation-side matrices (r, m, m), projected onto the span."""
        return self.span_act.coords(mats)[..., None]

    def right_of(self, mats: Tensor) -> Tensor:
        """Coordinates (r, k, 1) of gradient-side matrices (r, n, n), projected onto the span."""
        return self.span_grad.coords(mats)[..., None]

    def vectors_of(self, coef: Tensor) -> tuple[Tensor, Tensor]:
        """Coordinates (t, k, 1) of the pairs ``(D_a c, D_g c)`` for coefficients (t, N + r), at no
        cost of order ``N d²`` (:meth:`FactorSpan.combination`)."""
        return self.span_act.combination(coef)[..., None], self.span_grad.combination(coef)[..., None]

    def lift(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        """Matrices (r, m, m) and (r, n, n), in the block's dtype, for stacked coordinates."""
        return self.span_act.lift(left[..., 0]), self.span_grad.lift(right[..., 0])

    def frobenius_norm(self) -> Tensor:
        """``‖Z‖_F = ‖C‖_F`` of the operator before any subtraction (= ‖F‖_F)."""
        return torch.linalg.matrix_norm(self.core)


def _require_rank_one(block, what: str) -> None:
    if not isinstance(block, RankOneBlock):
        raise TypeError(
            f"{what} needs a block with rank-one samples (fisherlab.kron.block.RankOneBlock), "
            f"got {type(block).__name__}"
        )


def rearranged(block: RankOneBlock) -> Rearranged | SpanRearranged:
    """``Z`` of ``block`` in the cheaper form: span coordinates if the block already holds them
    (the exact Kronecker SVD built them) or if ``N² ≤ 4 (m² + n²)``, else the direct products.

    The coordinates cost the spans' Gram matrices ``H`` once: ``2 N² (m + n)`` flops for the samples',
    ``2 r N (m² + n²)`` for ``r`` extra matrices' inner products with them, and ``≈ 3 N³`` for
    the Cholesky factors and triangular inverses (an eigendecomposition, ``≈ 20 N³``, only where
    those are ill-conditioned). A direct product pair costs ``≈ 4 N (m² + n²)`` and a
    warm-started fit takes about 3 to 30 pairs (Figure 1 runs), so the coordinates pay off from
    about ``N² ≈ 4 (m² + n²)`` on. A block whose ``gram_coordinates`` is False (a weight-shared
    layer's, :mod:`fisherlab.kron.shared`: ``Z`` is not of that form) supplies its own operator.
    """
    if not getattr(block, "gram_coordinates", True):  # a weight-shared block: its own products
        return block.z_operator()
    _require_rank_one(block, "the fitters' rearranged block")
    if "span_rearranged" in vars(block) or block.n_samples**2 <= 4 * (block.d_act**2 + block.d_grad**2):
        return block.span_rearranged
    return Rearranged(block)


def kronecker_svd(block: RankOneBlock, rank: int | None = None) -> KroneckerSVD:
    """Exact Kronecker SVD of ``block`` from the SVD of the core ``C`` (no iteration, any size).

    The method ``kronecker_svd`` of :func:`fisherlab.kron.fit` is this decomposition cut to
    its rank. ``Z = P_a C P_gᵀ`` with orthonormal ``P_a``, ``P_g``, so ``C = X Σ Yᵀ`` gives
    the singular values of ``Z`` and ``R_k = P_a x_k = Σ_n c_{kn} a_n a_nᵀ (+ extra terms)``:
    the factors are re-weighted KFAC factors.

    Args:
        rank: number of leading terms whose factors are returned (default: all).
    """
    if not getattr(block, "gram_coordinates", True):  # the block decomposes itself
        return block.kronecker_svd(rank)
    _require_rank_one(block, "the exact Kronecker SVD")
    z = block.span_rearranged
    x, sigma, yt = torch.linalg.svd(z.core, full_matrices=False)
    r = sigma.shape[0] if rank is None else min(rank, sigma.shape[0])
    act, grad = z.lift(x[:, :r].T[..., None], yt[:r][..., None])
    return KroneckerSVD(sigma.to(block.dtype), act, grad)
