"""Error 1 (relative Frobenius) and Error 2 (relative spectral ℓ2) of an approximation.

.. math::
    E_1 = \\frac{\\|F - \\hat F\\|_F}{\\|F\\|_F},\\qquad
    E_2 = \\frac{\\|\\lambda(F) - \\lambda(\\hat F)\\|_2}{\\|\\lambda(F)\\|_2},

with eigenvalues (not singular values) sorted in descending order.

Matrix-free forms (any layer size):
``‖F − F̂‖² = ‖F‖² − 2⟨F, F̂⟩ + ‖F̂‖²`` with ``⟨F, A⊗G⟩ = (1/N) Σ_n (a_nᵀ A a_n)(g_nᵀ G g_n)``;
and, since ``rank F ≤ N`` and ``λ(F) ≥ 0``,
``‖λ(F) − λ(F̂)‖² = ‖F‖² + ‖F̂‖² − 2 Σ_{i≤N} λ_i(F) λ_i(F̂)``, which needs only the ``N``
algebraically largest eigenvalues of the (exactly symmetric) ``F̂``.
The matrix-free E1 loses digits to cancellation when E1 is below about 1e-7 (float64).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from fisherlab.kron.operator import KronSum
from fisherlab.kron.stats import BlockStats


class ExactReference:
    """What the errors need of ``F``, computed once and shared by every approximation.

    Attributes:
        norm2: ``‖F‖²_F`` from the Gram identity.
        eigenvalues: the top ``min(N, p)`` eigenvalues of F, descending.
    """

    def __init__(self, stats: BlockStats):
        self.stats = stats
        self.norm2 = stats.frobenius_norm() ** 2

    @cached_property
    def eigenvalues(self) -> Tensor:
        return self.stats.eigenvalues()

    def error1(self, approx: KronSum) -> float:
        """Relative Frobenius error ``‖F − F̂‖_F / ‖F‖_F``."""
        cross = self.stats.quadratic_forms(approx.act, approx.grad).mean(dim=1).sum()
        diff2 = self.norm2 - 2 * cross + approx.inner(approx)
        return float(diff2.clamp_min(0).sqrt() / self.norm2.sqrt())

    def error2(self, approx: KronSum, tol: float = 0.0) -> tuple[float, Tensor]:
        """Relative spectral error and the top ``min(N, p)`` eigenvalues of ``F̂`` it used.

        Args:
            tol: relative tolerance of the iterative eigensolver for large multi-term ``F̂``.
        """
        approx = approx.symmetrized()
        lam_hat = approx.eigenvalues(k=self.eigenvalues.shape[0], tol=tol)
        diff2 = self.norm2 + approx.inner(approx) - 2 * (self.eigenvalues * lam_hat).sum()
        return float(diff2.clamp_min(0).sqrt() / self.norm2.sqrt()), lam_hat


def error1(stats: BlockStats, approx: KronSum) -> float:
    """Relative Frobenius error ``‖F − F̂‖_F / ‖F‖_F``, matrix-free."""
    return ExactReference(stats).error1(approx)


def error2(stats: BlockStats, approx: KronSum, tol: float = 0.0) -> float:
    """Relative spectral error ``‖λ(F) − λ(F̂)‖₂ / ‖λ(F)‖₂``, matrix-free."""
    return ExactReference(stats).error2(approx, tol)[0]


def dense_error1(block: Tensor, approx_dense: Tensor) -> float:
    """Error 1 from dense matrices (the reference for small blocks)."""
    return float(torch.linalg.matrix_norm(block - approx_dense) / torch.linalg.matrix_norm(block))


def dense_error2(block: Tensor, approx_dense: Tensor) -> float:
    """Error 2 from dense matrices, eigenvalues of the symmetric parts, descending."""
    lam = torch.linalg.eigvalsh((block + block.T) / 2)
    lam_hat = torch.linalg.eigvalsh((approx_dense + approx_dense.T) / 2)
    return float(torch.linalg.vector_norm(lam - lam_hat) / torch.linalg.vector_norm(lam))
