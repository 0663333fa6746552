"""The exact mini-batch Fisher block of one layer, held as per-sample statistics.

.. math::
    F = \\frac1N \\sum_{n=1}^N (a_n a_n^\\top) \\otimes (g_n g_n^\\top),
    \\qquad Z(F) = \\frac1N U V^\\top,\\;
    U = [\\operatorname{vec}(a_n a_n^\\top)]_n,\\; V = [\\operatorname{vec}(g_n g_n^\\top)]_n.

Every quantity here comes from ``a`` (N × m) and ``g`` (N × n) by batched tensor
operations; the ``p × p`` block (``p = m n``) is formed only by :meth:`BlockStats.to_dense`.

References:
    Koroko et al., *Efficient Approximations of the Fisher Matrix in Neural Networks using
    Kronecker Product Singular Value Decomposition*, 2022, Prop. 3.1 (matrix-free products).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from fisherlab.kron.block import (
    DEFAULT_MAX_DENSE_ENTRIES,
    RankOneBlock,
    SampleBlock,
    check_dense_size,
)
from fisherlab.kron.rearranged import ZFactors, quadratic, weighted_outer


class BlockStats(RankOneBlock, SampleBlock):
    """Per-sample statistics ``(a, g)`` of one layer's exact Fisher block (``P_n = ā_n g_nᵀ``).

    A :class:`~fisherlab.kron.block.SampleBlock` with the rank-one fast path
    (:class:`~fisherlab.kron.block.RankOneBlock`).

    Args:
        a: ``(N, m)`` augmented inputs ``ā_n = (1, a_n)``, bias in column 0.
        g: ``(N, n)`` per-example pre-activation gradients of the negative log-likelihood.
    """

    def __init__(self, a: Tensor, g: Tensor):
        if a.ndim != 2 or g.ndim != 2:
            raise ValueError(f"a and g must be 2-D, got shapes {tuple(a.shape)} and {tuple(g.shape)}")
        if a.shape[0] != g.shape[0] or a.shape[0] == 0:
            raise ValueError(f"a and g need the same positive number of rows, got {a.shape[0]} and {g.shape[0]}")
        if a.dtype != g.dtype or a.device != g.device:
            raise ValueError("a and g must share dtype and device")
        if not a.is_floating_point():
            raise ValueError(f"a and g must be floating point, got {a.dtype}")
        self.a = a
        self.g = g

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> BlockStats:
        """A copy in another dtype or on another device."""
        return BlockStats(self.a.to(device=device, dtype=dtype), self.g.to(device=device, dtype=dtype))

    # -- inner products of the samples ---------------------------------------------------
    @cached_property
    def act_inner_products(self) -> Tensor:
        """``a aᵀ`` (N × N): the inner products ``a_n · a_m`` of the activation samples."""
        return self.a @ self.a.T

    @cached_property
    def grad_inner_products(self) -> Tensor:
        """``g gᵀ`` (N × N): the inner products ``g_n · g_m`` of the gradient samples."""
        return self.g @ self.g.T

    # -- the block ------------------------------------------------------------------------
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """KFAC's factors ``A = E[ā āᵀ]`` and ``G = E[g gᵀ]`` (each averaged over the N samples).

        Symmetrized: BLAS need not round ``aᵀa`` symmetrically, and eigensolvers assume it.
        Computed once (the optimizer and KFAC-corrected's fit both ask); do not modify them.
        """
        return self._kfac

    @cached_property
    def _kfac(self) -> tuple[Tensor, Tensor]:
        n = self.n_samples
        # In place where a temporary would do (the same numbers as ``(x + xᵀ) / 2`` of ``xᵀx / n``).
        act, grad = (self.a.T @ self.a).div_(n), (self.g.T @ self.g).div_(n)
        return (act + act.T).div_(2), (grad + grad.T).div_(2)

    def z_matvec(self, v: Tensor) -> Tensor:
        """``Z(F) vec(V) = (1/N) Σ_n (g_nᵀ V g_n) vec(a_n a_nᵀ)`` for ``V`` of shape (..., n, n).

        Returns the result unvectorised, of shape (..., m, m).
        """
        return weighted_outer(quadratic(self.g, v), self.a) / self.n_samples

    def z_rmatvec(self, u: Tensor) -> Tensor:
        """``Z(F)ᵀ vec(U) = (1/N) Σ_n (a_nᵀ U a_n) vec(g_n g_nᵀ)`` for ``U`` of shape (..., m, m)."""
        return weighted_outer(quadratic(self.a, u), self.g) / self.n_samples

    def quadratic_forms(self, act: Tensor, grad: Tensor) -> Tensor:
        """``(a_nᵀ A_j a_n)(g_nᵀ G_j g_n)`` for stacked factors ``act`` (r, m, m), ``grad`` (r, n, n).

        Returns an ``(r, N)`` tensor; its row means are ``⟨F, A_j ⊗ G_j⟩`` (:meth:`inner`).
        """
        return quadratic(self.a, act) * quadratic(self.g, grad)

    def frobenius_norm(self) -> Tensor:
        """``‖F‖_F`` from ``‖F‖²_F = (1/N²) Σ_{s,t} (a_s·a_t)² (g_s·g_t)²``."""
        return torch.linalg.matrix_norm(self.act_inner_products * self.grad_inner_products) / self.n_samples

    def kernel_matrix(self) -> Tensor:
        """``K = (1/N) (a aᵀ) ∘ (g gᵀ)`` (``⟨P_n, P_m⟩ = (a_n·a_m)(g_n·g_m)``): its eigenvalues
        are the nonzero eigenvalues of F."""
        return self.act_inner_products * self.grad_inner_products / self.n_samples

    def to_dense(self, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> Tensor:
        """The ``p × p`` block in the ``A ⊗ G`` order (column-major vec of ``W``).

        Raises:
            BlockTooLargeError: if ``p²`` exceeds ``max_entries``.
        """
        check_dense_size(self.p, max_entries)
        phi = (self.a[:, :, None] * self.g[:, None, :]).reshape(self.n_samples, self.p)
        return phi.T @ phi / self.n_samples

    def rearranged_factors(self) -> ZFactors:
        """``Z(F) = D_a W D_gᵀ`` with ``D_a = [vec(a_n a_nᵀ)]``, ``D_g = [vec(g_n g_nᵀ)]``, ``W = I/N``;
        the KFAC pair is ``(D_a 1/N, D_g 1/N)``."""
        weights = torch.full((self.n_samples,), 1 / self.n_samples, dtype=self.dtype, device=self.device)
        return ZFactors(self.a, self.a.new_zeros(0, self.d_act, self.d_act), self.g,
                        self.g.new_zeros(0, self.d_grad, self.d_grad), weights, weights, weights.new_zeros(0, self.n_samples))
