"""A moving average of the block itself, ``ρ F̂_prev + (1 − ρ) F``, for the matrix-free fitters.

The paper averages each Kronecker factor over time, which is not the best Kronecker
approximation of the averaged block (docs/design.md §3.6). The alternative is to fit the
approximation to the running estimate of the block,

.. math::
    \\tilde F_k = ρ\\,\\hat F_{k-1} + (1-ρ)\\,F_k,\\qquad
    Z(\\tilde F_k) = ρ \\sum_j \\operatorname{vec}(A_j)\\operatorname{vec}(G_j)^\\top + (1-ρ)\\,Z(F_k),

where ``F̂_{k-1} = Σ_j A_j ⊗ G_j`` is the previous approximation (a few terms) and ``F_k`` the
current mini-batch block. Both products with ``Z(F̃_k)`` stay matrix-free, so
:class:`AveragedBlock` can be handed to :func:`fisherlab.kron.fit` in place of a
:class:`~fisherlab.kron.BlockStats`, every method ``kronecker_svd`` included (``Z(F̃)`` factors through
the batch's samples and the previous factors, :mod:`fisherlab.kron.rearranged`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisherlab.kron.block import DEFAULT_MAX_DENSE_ENTRIES, RankOneBlock, check_dense_size
from fisherlab.kron.kronsum import KronSum
from fisherlab.kron.rearranged import KroneckerSVD, ZFactors, frobenius_inner, kronecker_svd, linear_combination
from fisherlab.kron.shared import NamedPairs, SharedRearranged, direct_kronecker_svd
from fisherlab.kron.stats import BlockStats


class AveragedBlock(RankOneBlock):
    """``ρ F̂_prev + (1 − ρ) F_batch``: a :class:`~fisherlab.kron.block.Block` with the rank-one
    fast path (:class:`~fisherlab.kron.block.RankOneBlock`), but no sample block (``F̂`` has
    full rank, so there is no ``N × N`` kernel matrix).

    Args:
        stats: the current mini-batch block ``F_batch``.
        previous: the previous approximation ``F̂_prev``, same shape.
        weight: ``ρ`` in [0, 1], the weight of the past.
        kfac: the KFAC factors ``(A, G)`` that stand for this block, i.e. the running
            averages of KFAC's factors (KFAC is defined from samples, not from a block, so
            the caller says which pair to use; KFAC-corrected subtracts this term), or
            ``"running"``: ``ρ`` times ``previous``'s first term plus ``1 − ρ`` times the
            batch's KFAC factors, which is that running average when ``previous`` is a
            KFAC-corrected fit (its first term is KFAC's). Only ``kfac`` and ``kfac_corrected``
            need a pair. A given pair costs the span coordinates one more pair of extra
            matrices (half again the cost of a rank-2 ``previous``); ``"running"`` and None
            cost nothing, the first lying in the span already.

    Attributes:
        a, g: the batch's per-sample statistics (rank-one batch blocks only).
    """

    def __init__(self, stats: BlockStats, previous: KronSum, weight: float,
                 kfac: tuple[Tensor, Tensor] | str | None = None):
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must lie in [0, 1], got {weight}")
        if (previous.d_act, previous.d_grad) != (stats.d_act, stats.d_grad):
            raise ValueError(
                f"previous approximation has shape ({previous.d_act}, {previous.d_grad}), "
                f"the batch block ({stats.d_act}, {stats.d_grad})"
            )
        if isinstance(kfac, str):
            if kfac != "running":
                raise ValueError(f"kfac must be a pair of factors, 'running' or None, got {kfac!r}")
        elif kfac is not None:
            act, grad = kfac
            if act.shape != (stats.d_act, stats.d_act) or grad.shape != (stats.d_grad, stats.d_grad):
                raise ValueError("kfac factors do not match the block's shape")
        self.stats = stats
        self.previous = previous.to(stats.dtype, stats.device)
        self.weight = float(weight)
        self._kfac = kfac
        #: False for a weight-shared batch block: then Z(F̃) is taken by its products (z_operator).
        self.gram_coordinates = getattr(stats, "gram_coordinates", True)
        if self.gram_coordinates:
            self.a, self.g = stats.a, stats.g

    # Sizes from the batch block: ``a`` and ``g`` exist only where it has rank-one samples.
    @property
    def n_samples(self) -> int:
        """``N`` of the batch block."""
        return self.stats.n_samples

    @property
    def d_act(self) -> int:
        """``m``, the activation-side dimension."""
        return self.stats.d_act

    @property
    def d_grad(self) -> int:
        """``n``, the gradient-side dimension."""
        return self.stats.d_grad

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the batch block."""
        return self.stats.dtype

    @property
    def device(self) -> torch.device:
        """The device of the batch block."""
        return self.stats.device

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> AveragedBlock:
        """A copy in another dtype or on another device."""
        kfac = self._kfac
        if isinstance(kfac, tuple):
            kfac = tuple(f.to(device=device, dtype=dtype) for f in kfac)
        return AveragedBlock(self.stats.to(dtype, device), self.previous, self.weight, kfac)

    # -- the block ------------------------------------------------------------------------
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """The KFAC pair given at construction.

        Raises:
            ValueError: if none was given.
        """
        if self._kfac is None:
            raise ValueError("this averaged block was built without a KFAC pair (pass kfac=(A, G) or 'running')")
        if self._kfac == "running":
            rho, (act, grad) = self.weight, self.stats.kfac_factors()
            return rho * self.previous.act[0] + (1 - rho) * act, rho * self.previous.grad[0] + (1 - rho) * grad
        return self._kfac

    def z_matvec(self, v: Tensor) -> Tensor:
        """``Z(F̃) vec(V) = ρ Σ_j ⟨G_j, V⟩ A_j + (1 − ρ) Z(F) vec(V)``, V of shape (..., n, n)."""
        past = linear_combination(frobenius_inner(self.previous.grad, v), self.previous.act)
        return self.weight * past + (1 - self.weight) * self.stats.z_matvec(v)

    def z_rmatvec(self, u: Tensor) -> Tensor:
        """``Z(F̃)ᵀ vec(U) = ρ Σ_j ⟨A_j, U⟩ G_j + (1 − ρ) Z(F)ᵀ vec(U)``, U of shape (..., m, m)."""
        past = linear_combination(frobenius_inner(self.previous.act, u), self.previous.grad)
        return self.weight * past + (1 - self.weight) * self.stats.z_rmatvec(u)

    def rearranged_factors(self) -> ZFactors:
        """``Z(F̃) = D_a W D_gᵀ``: the batch's ``vec(a_n a_nᵀ)``, the previous factors and a
        given KFAC pair (weight 0: there so that KFAC-corrected's subtraction stays in the
        span), ``W = diag((1 − ρ)/N · I_N, ρ I_r, 0)``."""
        n, r = self.n_samples, self.previous.rank
        pair = isinstance(self._kfac, tuple)
        opts = {"dtype": self.dtype, "device": self.device}
        diag = torch.cat([torch.full((n,), (1 - self.weight) / n, **opts), torch.full((r,), self.weight, **opts),
                          torch.zeros(int(pair), **opts)])
        act, grad = self.previous.act, self.previous.grad
        columns = torch.eye(n + r + pair, **opts)
        kfac = None
        if pair:
            act, grad = torch.cat([act, self._kfac[0][None]]), torch.cat([grad, self._kfac[1][None]])
            kfac = columns[-1]
        elif self._kfac == "running":
            kfac = torch.cat([diag[:n], self.weight * columns[n, n:]])  # (1 − ρ)/N on the samples, ρ on term 1
        return ZFactors(self.a, act, self.g, grad, diag, kfac, columns[n : n + r])

    def inner(self, act: Tensor, grad: Tensor) -> Tensor:
        """``⟨F̃, A_j ⊗ G_j⟩ = ρ Σ_i ⟨A_i, A_j⟩⟨G_i, G_j⟩ + (1 − ρ) ⟨F, A_j ⊗ G_j⟩``, shape (r,)."""
        past = (frobenius_inner(self.previous.act, act) * frobenius_inner(self.previous.grad, grad)).sum(dim=-1)
        return self.weight * past + (1 - self.weight) * self.stats.inner(act, grad)

    def z_operator(self) -> SharedRearranged:
        """``Z(F̃)`` by its products, for a weight-shared batch block; the named pairs are the
        previous terms and the KFAC pair (appended where it is not the running one)."""
        r = self.previous.rank
        act, grad, count = self.previous.act, self.previous.grad, r
        kfac = None
        if self._kfac is not None:
            a, g = self.kfac_factors()
            act, grad, count = torch.cat([act, a[None]]), torch.cat([grad, g[None]]), r + 1
        columns = torch.eye(count, dtype=self.dtype, device=self.device)
        if self._kfac is not None:
            kfac = columns[-1]
        return SharedRearranged(self, factors=NamedPairs(act, grad, kfac, columns[:r]))

    def kronecker_svd(self, rank: int | None = None) -> KroneckerSVD:
        """Kronecker SVD of F̃ (for a weight-shared batch block, :func:`~fisherlab.kron.shared.direct_kronecker_svd`)."""
        return kronecker_svd(self, rank) if self.gram_coordinates else direct_kronecker_svd(self, rank)

    def frobenius_norm(self) -> Tensor:
        """``‖F̃‖_F`` from ``ρ²‖F̂‖² + 2ρ(1−ρ)⟨F, F̂⟩ + (1−ρ)²‖F‖²`` (no dense block)."""
        rho = self.weight
        cross = self.stats.inner(self.previous.act, self.previous.grad).sum()
        sq = rho**2 * self.previous.inner(self.previous) + 2 * rho * (1 - rho) * cross
        sq = sq + (1 - rho) ** 2 * self.stats.frobenius_norm() ** 2
        return sq.clamp_min(0).sqrt()

    def to_dense(self, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> Tensor:
        """The ``p × p`` averaged block in the ``A ⊗ G`` order.

        Raises:
            BlockTooLargeError: if ``p²`` exceeds ``max_entries``.
        """
        check_dense_size(self.p, max_entries)
        return self.weight * self.previous.to_dense(max_entries) + (1 - self.weight) * self.stats.to_dense(max_entries)


def average_terms(previous: KronSum, current: KronSum, rho: float) -> KronSum:
    """``ρ`` times each previous factor plus ``1 − ρ`` times the current one, term by term
    (the paper's factor average, the alternative to :class:`AveragedBlock`).

    ``A ⊗ G = (−A) ⊗ (−G)``: each current term's joint sign is aligned with the previous
    term's first (the first term is PSD in both, so only later terms can flip).
    """
    act, grad = current.act.clone(), current.grad.clone()
    for j in range(min(previous.rank, current.rank)):
        if torch.sum(previous.act[j] * act[j]) < 0:
            act[j], grad[j] = -act[j], -grad[j]
    return KronSum(rho * previous.act + (1 - rho) * act, rho * previous.grad + (1 - rho) * grad)
