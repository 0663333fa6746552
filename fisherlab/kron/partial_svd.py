"""Iterative singular triplets of the rearranged block ``Z(F)``, matrix-free.

Both solvers work on any object with ``matvec(V) -> U`` and ``rmatvec(U) -> V`` on
matrix-shaped vectors (the factors themselves, or ``(k, 1)`` coordinates: see
:mod:`fisherlab.kron.rearranged`); inner products are Frobenius.
Convergence is measured by the residual **relative to σ**, ``‖Zᵀu − σ v‖ ≤ tol · σ``: Fisher
blocks have entries of order 1e-4, so an absolute tolerance stops before converging.

References:
    Koroko et al. 2022, appendix B.1 (power SVD) and B.2 / §3.2.2 (Lanczos bidiagonalization).
    Baglama & Reichel, *Augmented implicitly restarted Lanczos bidiagonalization methods*,
    SIAM J. Sci. Comput. 27 (2005) — the thick restart used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.kron.rearranged import frobenius_inner, linear_combination


@dataclass
class Triplets:
    """Singular triplets ``σ_k, U_k, V_k`` (``Z vec(V_k) ≈ σ_k vec(U_k)``) and how they were found."""

    sigma: Tensor  # (r,)
    left: Tensor  # (r, m, m)
    right: Tensor  # (r, n, n)
    iterations: int
    residual: float  # max_k ‖Zᵀu_k − σ_k v_k‖ / σ_k (relative to σ_1 where σ_k is ~0)
    converged: bool


def _floor_tol(tol: float, dtype: torch.dtype) -> float:
    # Residuals below a few dozen ulps are rounding noise: asking for less never converges.
    return max(tol, 50 * torch.finfo(dtype).eps)


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.matrix_norm(x)
    return (x / norm if norm > 0 else x), norm


def power_svd(op, v0: Tensor, tol: float = 1e-6, max_iter: int = 200, negligible: float = 0.0) -> Triplets:
    """Top singular triplet by alternating power iterations (appendix B.1).

    Each sweep is ``u ← Z v / ‖Z v‖``, ``v ← Zᵀ u / ‖Zᵀ u‖``; with ``σ = ‖Z v‖`` it stops when
    ``‖Zᵀ u − σ v‖ ≤ tol σ``. Starting from a PSD ``v0`` keeps every iterate PSD when ``op`` is
    the plain ``Z(F)`` (the weights ``a_nᵀ U a_n`` are then nonnegative).

    Args:
        negligible: a σ at or below this is rounding noise (a deflated operator that is
            numerically zero): the triplet is returned with σ = 0 at once.
    """
    tol = _floor_tol(tol, v0.dtype)
    v, _ = _unit(v0)
    residual = float("inf")
    u = sigma = None
    for it in range(1, max_iter + 1):
        u, sigma_v = _unit(op.matvec(v))
        w = op.rmatvec(u)
        if sigma_v <= negligible:  # nothing left to find (e.g. a deflated rank-1 block)
            return Triplets(torch.zeros_like(sigma_v).reshape(1), u[None] * 0, v[None], it, 0.0, True)
        residual = float(torch.linalg.matrix_norm(w - sigma_v * v) / sigma_v)
        v, sigma = _unit(w)
        if residual <= tol:
            break
    return Triplets(sigma.reshape(1), u[None], v[None], it, residual, residual <= tol)


def _orthogonalize(x: Tensor, basis: list[Tensor]) -> Tensor:
    # Classical Gram–Schmidt applied twice ("twice is enough"): full reorthogonalization.
    if not basis:
        return x
    b = torch.stack(basis)
    for _ in range(2):
        x = x - linear_combination(frobenius_inner(b, x), b)
    return x


def lanczos_svd(
    op, v0: Tensor, rank: int, krylov_dim: int | None = None, tol: float = 1e-6, max_restarts: int = 50
) -> Triplets:
    """Top ``rank`` singular triplets by thick-restarted Golub–Kahan–Lanczos bidiagonalization.

    Builds orthonormal bases ``V_k``, ``U_k`` with ``Z V_k = U_k B_k`` (full
    reorthogonalization), takes the Ritz triplets of ``B_k = U_kᵀ Z V_k``, and restarts from
    the ``rank + 1`` leading Ritz vectors plus the next Lanczos vector until every wanted
    triplet satisfies ``‖Zᵀu − σ v‖ ≤ tol σ`` (and ``‖Z v − σ u‖`` likewise).

    Args:
        krylov_dim: K, the largest basis size before a restart (default ``max(2 rank + 4, 8)``).
    """
    kdim = max(2 * rank + 4, 8) if krylov_dim is None else krylov_dim
    tol = _floor_tol(tol, v0.dtype)
    breakdown = 1e3 * torch.finfo(v0.dtype).eps
    if kdim <= rank:
        raise ValueError(f"krylov_dim ({kdim}) must exceed rank ({rank})")
    v_basis = [_unit(v0)[0]]
    zv: list[Tensor] = []
    u_basis: list[Tensor] = []
    ztu: list[Tensor] = []
    iterations = 0
    for restart in range(max_restarts + 1):
        exhausted = False
        while len(zv) < min(kdim, len(v_basis)):
            zv.append(op.matvec(v_basis[len(zv)]))
            iterations += 1
            u, norm = _unit(_orthogonalize(zv[-1], u_basis))
            if norm <= breakdown * torch.linalg.matrix_norm(zv[-1]) or norm == 0:
                exhausted = True  # Z V is spanned by U already: the subspace is invariant
                break
            u_basis.append(u)
            ztu.append(op.rmatvec(u))
            w, norm = _unit(_orthogonalize(ztu[-1], v_basis))
            if norm <= breakdown * torch.linalg.matrix_norm(ztu[-1]) or norm == 0:
                exhausted = True
                break
            v_basis.append(w)
        if not u_basis:
            # Z v0 = 0: no Krylov space to search. Zero triplets, not converged (v0 may merely lie
            # in Z's null space); fit() answers a zero block before any solver runs.
            zeros = v0.new_zeros(rank, *zv[0].shape)
            return Triplets(v0.new_zeros(rank), zeros, v0.new_zeros(rank, *v0.shape), iterations, 0.0, False)
        vk = torch.stack(v_basis[: len(zv)])
        uk, zvk, ztuk = torch.stack(u_basis), torch.stack(zv), torch.stack(ztu)
        b = frobenius_inner(zvk, uk)  # U_kᵀ Z V_k
        x, sigma, yt = torch.linalg.svd(b, full_matrices=False)
        left, zt_left = linear_combination(x.T, uk), linear_combination(x.T, ztuk)
        right, z_right = linear_combination(yt, vk), linear_combination(yt, zvk)
        res = torch.sqrt(
            torch.linalg.matrix_norm(zt_left - sigma[:, None, None] * right) ** 2
            + torch.linalg.matrix_norm(z_right - sigma[:, None, None] * left) ** 2
        )
        r = min(rank, sigma.shape[0])
        # σ₁ ≥ b₁₁ = ⟨Z v₁, u₁⟩ > 0 once the basis is not empty (the empty one returned above).
        scale = torch.clamp(sigma[:r], min=sigma[0] * 1e-12)
        residual = float((res[:r] / scale).max())
        if residual <= tol or exhausted or restart == max_restarts:
            return Triplets(sigma[:r], left[:r], right[:r], iterations, residual, residual <= tol or exhausted)
        # Not exhausted, so the basis holds one unprocessed Lanczos vector: keep it.
        keep = min(rank + 1, sigma.shape[0])
        v_basis = list(right[:keep]) + [v_basis[len(zv)]]
        zv = list(z_right[:keep])
        u_basis = list(left[:keep])
        ztu = list(zt_left[:keep])
    raise AssertionError("the restart loop always returns")
