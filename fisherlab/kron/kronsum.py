"""Sums of Kronecker products ``F̂ = Σ_j A_j ⊗ G_j`` as linear operators.

``A_j`` (m × m) acts on the activation side, ``G_j`` (n × n) on the gradient side; in
weight shape ``F̂ vec(X) = vec(Σ_j G_j X A_jᵀ)`` for ``X`` of shape (n, m).

Closed forms used here:

.. math::
    \\langle A\\otimes G, C\\otimes D\\rangle = \\langle A, C\\rangle\\langle G, D\\rangle,\\qquad
    \\lambda(A\\otimes G) = \\{\\alpha_i\\gamma_k\\}.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch
from torch import Tensor

from fisherlab.kron.block import DEFAULT_MAX_DENSE_ENTRIES, check_dense_size
from fisherlab.kron.eigensolvers import TopEigen, kron_top_eigenvalues, top_eigenvalues
from fisherlab.kron.layout import unvec, vec

#: Sums with ``p`` up to this size (after :meth:`KronSum.compressed`) get their eigenvalues
#: from a dense eigvalsh.
DENSE_EIG_LIMIT = 2048
#: Larger sums too, when the block Lanczos space (``2k`` before the first convergence test)
#: would exceed this fraction of ``p``.
ITERATIVE_MAX_FRACTION = 0.5
#: Below this ``k`` (on the CPU), ARPACK instead of block Lanczos.
ARPACK_MAX_K = 64


class KronSum:
    """``Σ_j A_j ⊗ G_j`` with factors stacked as ``act`` (r, m, m) and ``grad`` (r, n, n)."""

    def __init__(self, act: Tensor | list[Tensor], grad: Tensor | list[Tensor]):
        act = torch.stack(list(act)) if not isinstance(act, Tensor) else act
        grad = torch.stack(list(grad)) if not isinstance(grad, Tensor) else grad
        if act.ndim == 2:
            act, grad = act[None], grad[None]
        if act.ndim != 3 or grad.ndim != 3 or act.shape[0] != grad.shape[0]:
            raise ValueError(f"need stacked square factors, got {tuple(act.shape)} and {tuple(grad.shape)}")
        if act.shape[1] != act.shape[2] or grad.shape[1] != grad.shape[2]:
            raise ValueError("Kronecker factors must be square")
        self.act = act
        self.grad = grad

    # -- shape ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Number of Kronecker terms."""
        return self.act.shape[0]

    @property
    def d_act(self) -> int:
        """``m``, the size of the activation-side factors ``A_j``."""
        return self.act.shape[1]

    @property
    def d_grad(self) -> int:
        """``n``, the size of the gradient-side factors ``G_j``."""
        return self.grad.shape[1]

    @property
    def p(self) -> int:
        """Size of the operator, ``m n``."""
        return self.d_act * self.d_grad

    @property
    def terms(self) -> list[tuple[Tensor, Tensor]]:
        """The ``(A_j, G_j)`` pairs."""
        return list(zip(self.act, self.grad))

    def to(self, dtype: torch.dtype | None = None, device=None) -> KronSum:
        """The same sum with its factors in ``dtype`` on ``device`` (None keeps the current one)."""
        return KronSum(self.act.to(device=device, dtype=dtype), self.grad.to(device=device, dtype=dtype))

    def __add__(self, other: KronSum) -> KronSum:
        return KronSum(torch.cat([self.act, other.act]), torch.cat([self.grad, other.grad]))

    def __mul__(self, scale: float) -> KronSum:
        return KronSum(self.act * scale, self.grad)

    __rmul__ = __mul__

    def symmetrized(self) -> KronSum:
        """Each factor replaced by its symmetric part (exact symmetry is what eigensolvers assume)."""
        return KronSum((self.act + self.act.mT).div_(2), (self.grad + self.grad.mT).div_(2))

    # -- products ------------------------------------------------------------------------
    def matvec(self, x: Tensor) -> Tensor:
        """``Σ_j G_j X A_jᵀ`` for ``X`` of shape (..., n, m) (weight shape, bias column 0)."""
        return torch.einsum("rkl,...li,rji->...kj", self.grad, x, self.act)

    def __matmul__(self, v: Tensor) -> Tensor:
        """Product with a column-major ``vec`` (length p) or a (p, k) block of them."""
        if v.ndim == 1:
            return vec(self.matvec(unvec(v, self.d_grad, self.d_act)))
        return vec(self.matvec(unvec(v.T, self.d_grad, self.d_act))).T

    def to_dense(self, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> Tensor:
        """The ``p × p`` matrix ``Σ_j kron(A_j, G_j)``."""
        check_dense_size(self.p, max_entries, "sum")
        return sum(torch.kron(a, g) for a, g in self.terms)

    # -- norms ---------------------------------------------------------------------------
    def inner(self, other: KronSum) -> Tensor:
        """``⟨F̂, F̂'⟩_F = Σ_{j,k} ⟨A_j, A'_k⟩ ⟨G_j, G'_k⟩``."""
        ga = torch.einsum("rij,sij->rs", self.act, other.act)
        gg = torch.einsum("rij,sij->rs", self.grad, other.grad)
        return (ga * gg).sum()

    def frobenius_norm(self) -> Tensor:
        """``‖F̂‖_F = √⟨F̂, F̂⟩_F`` (:meth:`inner`) as a 0-d tensor."""
        return self.inner(self).clamp_min(0).sqrt()

    # -- spectrum ------------------------------------------------------------------------
    def eigenvalues(
        self, k: int | None = None, tol: float = 1e-8, weights: Tensor | None = None,
        progress: Callable[..., None] | None = None, criterion: Callable[[TopEigen], float] | None = None,
        first_test: int | None = None,
    ) -> Tensor:
        """The ``k`` algebraically largest eigenvalues (all ``p`` when ``k`` is None), descending.

        One term: the exact products ``α_i γ_k``. Several terms: the sum is first restricted
        to the joint ranges of its factors (:meth:`compressed`; the other eigenvalues are
        zero), then solved by whichever solver is fastest at that size (the thresholds were
        measured; benchmarks/results/eigensolvers.md):

        - a dense eigvalsh up to :data:`DENSE_EIG_LIMIT` (below it the iterative solvers do
          not win), or when the Krylov space would exceed :data:`ITERATIVE_MAX_FRACTION` of
          the size;
        - ARPACK's implicitly restarted Lanczos (:func:`~fisherlab.kron.eigensolvers.top_eigenvalues`)
          for ``k <`` :data:`ARPACK_MAX_K` on the CPU;
        - otherwise block Lanczos with full reorthogonalization in the eigenbasis of the first
          term (:func:`~fisherlab.kron.eigensolvers.kron_top_eigenvalues`), pure torch, any device.

        "Largest" is algebraic, so indefinite sums are handled. Accuracy: ``Σ w_i |θ_i − μ_i| ≤
        tol Σ w_i |θ_i|`` for the returned ``θ`` (``w`` = ``weights``, default all ones; ARPACK
        meets it pair by pair, ``|θ_i − μ_i| ≤ tol |θ_i|``). Factors are symmetrized first.
        ``progress``, ``criterion`` and ``first_test`` are passed to the block Lanczos solver
        (its Krylov dimension and accuracy; a caller's own stopping test), the others ignore them.
        """
        sym = self.symmetrized()
        k = self.p if k is None else min(k, self.p)
        if self.rank == 1:
            ea = torch.linalg.eigvalsh(sym.act[0])
            eg = torch.linalg.eigvalsh(sym.grad[0])
            return torch.sort((ea[:, None] * eg[None, :]).flatten(), descending=True).values[:k]
        small = self._compressed
        zeros = sym.act.new_zeros(min(k, self.p - small.p))
        kk = min(k, small.p)
        solver = self.eigen_solver(k)
        if solver == "dense":
            top = torch.linalg.eigvalsh(small.to_dense(max_entries=small.p**2)).flip(0)[:kk]
        elif solver == "arpack":
            n, m = small.d_grad, small.d_act

            def matvec(v: Tensor) -> Tensor:  # any fixed flattening of X (n × m) will do
                return small.matvec(v.reshape(n, m)).reshape(-1)

            top = top_eigenvalues(matvec, small.p, kk, self.act.dtype, self.act.device, tol=tol)
        else:
            w = None if weights is None else weights[:kk]
            top = kron_top_eigenvalues(
                small.act, small.grad, kk, tol=tol, weights=w, progress=progress, criterion=criterion, first_test=first_test
            ).values
        return torch.sort(torch.cat([top, zeros]), descending=True).values[:k]

    def eigen_solver(self, k: int | None = None) -> str:
        """Which solver :meth:`eigenvalues` uses for the top ``k``: ``"closed form"`` (one term) or
        ``"dense"`` (both exact to rounding), ``"arpack"`` or ``"lanczos"`` (accurate to ``tol``)."""
        if self.rank == 1:
            return "closed form"
        small = self._compressed
        kk = min(self.p if k is None else k, small.p)
        if small.p <= DENSE_EIG_LIMIT or kk == small.p or 2 * kk > ITERATIVE_MAX_FRACTION * small.p:
            return "dense"
        return "arpack" if kk < ARPACK_MAX_K and small.act.device.type == "cpu" else "lanczos"

    @cached_property
    def _compressed(self) -> KronSum:
        return self.symmetrized().compressed()

    def compressed(self) -> KronSum:
        """The same sum restricted to the joint ranges of its factors (exact up to rounding).

        With ``Q_a`` an orthonormal basis of ``Σ_j range(A_j)`` and ``Q_g`` likewise,
        ``F̂ = (Q_a ⊗ Q_g) (Σ_j Q_aᵀA_jQ_a ⊗ Q_gᵀG_jQ_g) (Q_a ⊗ Q_g)ᵀ``: the nonzero
        eigenvalues are those of the smaller sum. Fitted factors are re-weighted sums of
        ``a_n a_nᵀ`` (or ``g_n g_nᵀ``), so their ranges have dimension at most N: a layer with
        more inputs or outputs than samples shrinks (CURVES layer 1: p = 314,000 → 66,000).
        Directions below ``1e3 ε`` of the largest are dropped.
        """
        qa, qg = _joint_range(self.act), _joint_range(self.grad)
        if qa.shape[1] == self.d_act and qg.shape[1] == self.d_grad:
            return self
        return KronSum(qa.mT @ self.act @ qa, qg.mT @ self.grad @ qg)

    def min_eigenvalue_bound(self) -> float:
        """A lower bound on ``λ_min(F̂)``: ``Σ_j λ_min(A_j ⊗ G_j)`` (Weyl's inequality)."""
        sym = self.symmetrized()
        ea = torch.linalg.eigvalsh(sym.act)[:, [0, -1]]
        eg = torch.linalg.eigvalsh(sym.grad)[:, [0, -1]]
        products = ea[:, :, None] * eg[:, None, :]
        return float(products.flatten(1).min(dim=1).values.sum())

def _joint_range(factors: Tensor) -> Tensor:
    """Orthonormal basis (columns) of the sum of the ranges of stacked factors.

    From the SVD of ``[F_1, F_2, …]`` (not the eigenvalues of ``Σ F_j F_jᵀ``, which square
    the condition number), keeping singular values above ``1e3 ε`` of the largest.
    """
    u, sigma, _ = torch.linalg.svd(torch.cat(list(factors), dim=1), full_matrices=False)
    keep = sigma > 1e3 * torch.finfo(sigma.dtype).eps * sigma[0].clamp_min(torch.finfo(sigma.dtype).tiny)
    return u[:, keep]
