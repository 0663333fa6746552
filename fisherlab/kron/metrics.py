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

Both are relative to ``F`` and undefined (0/0) for a block that is zero to rounding
(:func:`~fisherlab.kron.fitters.is_zero_block`: ``‖F‖²_F`` below the smallest normal
number, e.g. a layer under dead ReLUs): :class:`ExactReference` then raises
:class:`ZeroBlockError` instead of returning NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from fisherlab.kron.eigensolvers import TopEigen
from fisherlab.kron.kronsum import KronSum
from fisherlab.kron.stats import BlockStats

#: Weighted relative accuracy of the eigenvalues of large multi-term ``F̂`` for ``rtol = 0``
#: (Error 2 then agrees with the dense value to about 1e-13 relative on the paper's layer-5 sizes).
EXACT_TOL = 1e-11


class ZeroBlockError(ValueError):
    """A relative error was asked of a block that is zero to rounding."""


class ExactReference:
    """What the errors need of ``F``, computed once and shared by every approximation.

    Attributes:
        norm2: ``‖F‖²_F`` from the kernel matrix.
        zero: whether ``F`` is zero to rounding (``norm2`` below the dtype's smallest normal
            number); :meth:`error1` and :meth:`error2` then raise :class:`ZeroBlockError`.
        eigenvalues: the top ``min(N, p)`` eigenvalues of F, descending.
    """

    def __init__(self, stats: BlockStats):
        self.stats = stats
        self.norm2 = stats.frobenius_norm() ** 2
        self.zero = bool(self.norm2 < torch.finfo(self.norm2.dtype).tiny)

    def _check_nonzero(self) -> None:
        if self.zero:
            raise ZeroBlockError(
                f"the block is zero to rounding (‖F‖²_F = {float(self.norm2):.3g}): its relative errors are undefined"
            )

    @cached_property
    def eigenvalues(self) -> Tensor:
        """The top ``min(N, p)`` eigenvalues of ``F``, descending, computed once."""
        return self.stats.eigenvalues()

    def error1(self, approx: KronSum) -> float:
        """Relative Frobenius error ``‖F − F̂‖_F / ‖F‖_F``.

        Raises:
            ZeroBlockError: if ``F`` is zero to rounding.
        """
        self._check_nonzero()
        cross = self.stats.quadratic_forms(approx.act, approx.grad).mean(dim=1).sum()
        diff2 = self.norm2 - 2 * cross + approx.inner(approx)
        return float(diff2.clamp_min(0).sqrt() / self.norm2.sqrt())

    def error2(
        self, approx: KronSum, rtol: float = 0.0, tol: float = 1e-8, progress: Callable[..., None] | None = None
    ) -> SpectralError:
        """Relative spectral error, certified to ``rtol``, and the eigenvalues of ``F̂`` it used.

        With the top ``k ≤ N`` eigenvalues ``μ`` of ``F̂`` known and ``s = ‖F̂‖² − Σ_{i≤k} μ_i²``
        (the energy of the rest), the unknown part of ``Σ_{i≤N} λ_i(F) μ_i`` is bounded term by
        term, ``max(μ_lo, −(s/(p−i+1))^{1/2}) ≤ μ_i ≤ min(μ_k, (s/(i−k))^{1/2})`` for ``k < i ≤ N``
        (``μ_lo ≤ λ_min(F̂)`` Weyl's bound, cheap: computing ``λ_min`` itself converges slowly,
        the bottom of the spectrum being clustered at zero; the square roots because a negative
        ``μ_i`` makes the ``p − i`` after it no larger, a positive one the ``i − k − 1`` before it
        no smaller), and also by ``±‖λ_{>k}(F)‖ s^{1/2}`` (Cauchy–Schwarz); ``k`` doubles from 32 until the resulting
        interval on Error 2 has half-width ``≤ rtol · Error 2``, or ``k = N``. Where the
        inertia of a two-term ``F̂`` is known (:func:`positive_count`), ``μ_i ≥ 0`` replaces the
        lower bound for the ``i`` it certifies positive.
        ``rtol = 0`` asks for all N at once, weighted by ``λ(F)`` to :data:`EXACT_TOL`
        (:meth:`KronSum.eigenvalues`: ``Σ λ_i(F)|θ_i − μ_i| ≤ tol Σ λ_i(F)|θ_i|``; the
        eigenvalues near ``N``, weighted by the small ``λ_N(F)``, need only a few digits).
        One-term and small sums are exact (dense). The eigensolver's accuracy widens the
        interval by that weighted sum.

        With block Lanczos (large multi-term sums) one Krylov space serves every ``k``: it is
        grown for the top ``N``, and each of its convergence tests tries ``k = 32, 64, …, N``
        with the top ``k`` Ritz values and their error bounds ``e_i``
        (:func:`~fisherlab.kron.eigensolvers.kron_top_eigenvalues`), which widen the interval
        by ``Σ_{i≤k} λ_i(F) e_i``; a ``k`` counts once that sum is within ``tol`` (or
        :data:`EXACT_TOL`) of ``Σ_{i≤k} λ_i(F)|θ_i|``, as if solved alone to that accuracy,
        and the smallest ``k`` that certifies ``rtol`` stops it. ARPACK (few eigenvalues)
        solves each ``k`` afresh to ``tol``.

        Args:
            rtol: relative half-width allowed on Error 2.
            tol: weighted accuracy of the iterative eigensolvers in the certified mode.
            progress: told of the work inside a long Error 2 as keyword arguments: the block
                Lanczos solver's ``krylov`` dimension and ``accuracy``, then, in the certified
                mode, each interval ``k`` (eigenvalues known) and ``error2`` (``"lo–hi"``).

        Raises:
            ZeroBlockError: if ``F`` is zero to rounding.
        """
        self._check_nonzero()
        approx = approx.symmetrized()
        k_all = self.eigenvalues.shape[0]
        solver = approx.eigen_solver(k_all)
        dense = solver in ("closed form", "dense")  # exact to rounding
        exact = rtol <= 0 or dense
        bounds = _Bounds(self, approx, exact)
        if solver == "lanczos":
            return self._error2_one_space(approx, bounds, rtol, tol, exact, progress)
        k = k_all if exact else min(k_all, 32)
        tol = 0.0 if dense else EXACT_TOL if rtol <= 0 else tol
        while True:
            lam_hat = approx.eigenvalues(k=k, tol=tol, weights=self.eigenvalues[:k], progress=progress)
            slack = tol * (self.eigenvalues[:k] * lam_hat.abs()).sum()  # Σ λ_i(F) |θ_i − μ_i| ≤ this
            e_lo, e_hi = bounds.interval(lam_hat, slack, lam_hat[-1])
            mid, half = (e_lo + e_hi) / 2, (e_hi - e_lo) / 2
            if progress is not None and not exact:
                progress(k=k, error2=f"{e_lo:.4g}–{e_hi:.4g}")
            if k >= k_all or half <= rtol * mid:
                return SpectralError(mid, half, lam_hat)
            k = min(2 * k, k_all)

    def _error2_one_space(
        self, approx: KronSum, bounds: _Bounds, rtol: float, tol: float, exact: bool,
        progress: Callable[..., None] | None,
    ) -> SpectralError:
        """:meth:`error2` through one block Lanczos space for the top ``N`` (docstring there)."""
        lam_f = self.eigenvalues
        k_all = lam_f.shape[0]
        accuracy = EXACT_TOL if exact else tol
        ks = [k_all] if exact else sorted({min(32 * 2**j, k_all) for j in range(max(1, k_all.bit_length()))})
        found: list[SpectralError] = []

        def criterion(top: TopEigen) -> float:
            best = None
            for k in (k for k in ks if k <= top.values.shape[0]):
                lam_hat, err = top.values[:k], top.errors[:k]
                slack = (lam_f[:k] * err).sum()  # Σ λ_i(F) |θ_i − μ_i| ≤ this (error bounds e_i)
                e_lo, e_hi = bounds.interval(lam_hat, slack, lam_hat[-1] + err[-1])
                mid, half = (e_lo + e_hi) / 2, (e_hi - e_lo) / 2
                # The error bounds hold once the Ritz values have converged (module docstring of
                # eigensolvers): k's values count only at the weighted accuracy they were asked.
                weighted = float((lam_f[:k] * lam_hat.abs()).sum())
                ratio = float(slack) / (accuracy * weighted) if weighted > 0 else 0.0
                if not exact:
                    ratio = max(ratio, half / (rtol * mid) if mid > 0 else 0.0 if half == 0 else math.inf)
                if best is None or ratio < best[0]:
                    best = (ratio, k, e_lo, e_hi, SpectralError(mid, half, lam_hat))
                if ratio <= 1:
                    break
            if best is None:
                return math.inf
            found[:] = [best[4]]
            if progress is not None and not exact:
                progress(k=best[1], error2=f"{best[2]:.4g}–{best[3]:.4g}")
            return best[0]

        approx.eigenvalues(
            k=k_all, weights=lam_f, progress=progress, criterion=criterion, first_test=None if exact else 2 * ks[0]
        )
        return found[0]


class _Bounds:
    """Bounds on ``Σ_{i≤N} λ_i(F) μ_i`` given the top ``k`` eigenvalues of ``F̂`` (:meth:`ExactReference.error2`)."""

    def __init__(self, ref: ExactReference, approx: KronSum, exact: bool):
        self.lam_f = ref.eigenvalues
        self.norm = ref.norm2.sqrt()
        self.energy = approx.inner(approx)
        self.base = ref.norm2 + self.energy
        self.p = approx.p
        self.mu_lo = None if exact else approx.min_eigenvalue_bound()  # below every unknown μ_i
        self.positive = 0 if exact else positive_count(approx)  # μ_i > 0 for i ≤ this (inertia)

    def interval(self, lam_hat: Tensor, slack: Tensor, top_k: Tensor) -> tuple[float, float]:
        """Error 2's interval from ``μ_i ≈ lam_hat_i`` (``i ≤ k``, ``Σ λ_i(F)|θ_i − μ_i| ≤ slack``)
        and ``μ_{k+1} ≤ top_k``."""
        lam_f = self.lam_f
        k, k_all = lam_hat.shape[0], lam_f.shape[0]
        known = (lam_f[:k] * lam_hat).sum()
        if k >= k_all:
            tail_lo = tail_hi = known.new_zeros(())
        else:
            # Σ_{i>k} μ_i² ≤ s = ‖F̂‖² − Σ_{i≤k} μ_i² (exact for symmetric F̂; θ_i ≤ μ_i, so the positive
            # θ_i² do not exceed μ_i²), so by the order of the μ_i: μ_i ≤ (s/(i−k))^{1/2} and
            # μ_i ≥ −(s/(p−i+1))^{1/2} (a negative μ_i makes all later ones at least as negative;
            # tight where p ≫ N), and Cauchy–Schwarz.
            lo_mu = min(float(lam_hat[-1]), self.mu_lo)
            energy = (self.energy - (lam_hat.clamp_min(0) ** 2).sum()).clamp_min(0)
            cs = (lam_f[k:] ** 2).sum().sqrt() * energy.sqrt()
            pos = torch.arange(k + 1, k_all + 1, dtype=lam_f.dtype, device=lam_f.device)
            mu_hi = torch.minimum((energy / (pos - k)).sqrt(), top_k)
            mu_lo_i = (-(energy / (self.p - pos + 1)).sqrt()).clamp_min(lo_mu)
            mu_lo_i = torch.where(pos <= self.positive, mu_lo_i.clamp_min(0), mu_lo_i)
            tail_hi = torch.minimum((lam_f[k:] * mu_hi).sum(), cs)
            tail_lo = torch.maximum((lam_f[k:] * mu_lo_i).sum(), -cs)
        e_lo = float((self.base - 2 * (known + slack + tail_hi)).clamp_min(0).sqrt() / self.norm)
        e_hi = float((self.base - 2 * (known - slack + tail_lo)).clamp_min(0).sqrt() / self.norm)
        return e_lo, e_hi


def positive_count(approx: KronSum) -> int:
    """How many eigenvalues of a two-term ``F̂ = A₁ ⊗ G₁ + A₂ ⊗ G₂`` are certainly positive.

    With ``A₁`` and ``G₁`` positive definite, ``F̂`` is congruent to ``I + S ⊗ T``, ``S =
    A₁^{-1/2} A₂ A₁^{-1/2}`` and ``T`` likewise (the pencils ``(A₂, A₁)`` and ``(G₂, G₁)`` of
    §3.4 of the paper), whose eigenvalues are ``1 + s_i t_j``: by Sylvester's law of inertia
    ``F̂`` has as many positive eigenvalues. The sum is first restricted to its factors' ranges
    (:meth:`KronSum.compressed`: same nonzero eigenvalues), where a fitted first term is
    definite. A product is counted only if it clears the rounding of ``s`` and ``t``: the
    whitening by ``α^{-1/2}`` amplifies it by the condition number ``κ`` of the first factor.

    Returns:
        0 for other sums, or where a first factor is not safely positive definite.
    """
    if approx.rank != 2:
        return 0
    small = approx.symmetrized().compressed()
    spectra = []
    for first, second in ((small.act[0], small.act[1]), (small.grad[0], small.grad[1])):
        alpha, u = torch.linalg.eigh(first)
        eps = torch.finfo(alpha.dtype).eps
        kappa = float(alpha[-1] / alpha[0]) if alpha[0] > 0 else float("inf")
        if not kappa * eps < 1e-3:
            return 0
        w = u / alpha.sqrt()
        spectrum = torch.linalg.eigvalsh(w.mT @ second @ w)
        spectra.append((spectrum, 10 * first.shape[0] * eps * kappa * float(spectrum.abs().max())))
    (s, ds), (t, dt) = spectra
    margin = s.abs()[:, None] * dt + t.abs()[None, :] * ds + ds * dt
    return int((1 + s[:, None] * t[None, :] > margin).sum())


@dataclass(frozen=True)
class SpectralError:
    """Error 2 with its certified half-width and the top eigenvalues of ``F̂`` it used."""

    value: float
    halfwidth: float
    eigenvalues: Tensor


def error1(stats: BlockStats, approx: KronSum) -> float:
    """Relative Frobenius error ``‖F − F̂‖_F / ‖F‖_F``, matrix-free."""
    return ExactReference(stats).error1(approx)


def error2(stats: BlockStats, approx: KronSum, rtol: float = 0.0) -> float:
    """Relative spectral error ``‖λ(F) − λ(F̂)‖₂ / ‖λ(F)‖₂``, matrix-free (see :class:`ExactReference`)."""
    return ExactReference(stats).error2(approx, rtol).value


def dense_error1(block: Tensor, approx_dense: Tensor) -> float:
    """Error 1 from dense matrices (the reference for small blocks)."""
    return float(torch.linalg.matrix_norm(block - approx_dense) / torch.linalg.matrix_norm(block))


def dense_error2(block: Tensor, approx_dense: Tensor) -> float:
    """Error 2 from dense matrices, eigenvalues of the symmetric parts, descending."""
    lam = torch.linalg.eigvalsh((block + block.T) / 2)
    lam_hat = torch.linalg.eigvalsh((approx_dense + approx_dense.T) / 2)
    return float(torch.linalg.vector_norm(lam - lam_hat) / torch.linalg.vector_norm(lam))
