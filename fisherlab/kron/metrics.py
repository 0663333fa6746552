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

import torch
from torch import Tensor

from fisherlab.kron.operator import KronSum
from fisherlab.kron.stats import BlockStats


def error1(stats: BlockStats, approx: KronSum) -> float:
    """Relative Frobenius error ``‖F − F̂‖_F / ‖F‖_F``, matrix-free."""
    norm_f2 = stats.frobenius_norm() ** 2
    cross = stats.quadratic_forms(approx.act, approx.grad).mean(dim=1).sum()
    diff2 = norm_f2 - 2 * cross + approx.inner(approx)
    return float(diff2.clamp_min(0).sqrt() / norm_f2.sqrt())


def error2(stats: BlockStats, approx: KronSum, tol: float = 0.0) -> float:
    """Relative spectral error ``‖λ(F) − λ(F̂)‖₂ / ‖λ(F)‖₂``, matrix-free.

    Args:
        tol: relative tolerance of the iterative eigensolver for large multi-term ``F̂``.
    """
    lam_f = stats.eigenvalues()
    approx = approx.symmetrized()
    lam_hat = approx.eigenvalues(k=lam_f.shape[0], tol=tol)
    norm_f2 = stats.frobenius_norm() ** 2
    diff2 = norm_f2 + approx.inner(approx) - 2 * (lam_f * lam_hat).sum()
    return float(diff2.clamp_min(0).sqrt() / norm_f2.sqrt())


def dense_error1(block: Tensor, approx_dense: Tensor) -> float:
    """Error 1 from dense matrices (the reference for small blocks)."""
    return float(torch.linalg.matrix_norm(block - approx_dense) / torch.linalg.matrix_norm(block))


def dense_error2(block: Tensor, approx_dense: Tensor) -> float:
    """Error 2 from dense matrices, eigenvalues of the symmetric parts, descending."""
    lam = torch.linalg.eigvalsh((block + block.T) / 2)
    lam_hat = torch.linalg.eigvalsh((approx_dense + approx_dense.T) / 2)
    return float(torch.linalg.vector_norm(lam - lam_hat) / torch.linalg.vector_norm(lam))
