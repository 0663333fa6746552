"""The algebraically largest eigenvalues of a symmetric operator by block Krylov iterations.

Restarted block Krylov with Rayleigh–Ritz: from an orthonormal block ``X`` (b = k + extra
vectors) build ``[X, F̂X, …, F̂^d X]``, orthonormalize it (twice, against all earlier
blocks), take the Ritz pairs of ``Qᵀ F̂ Q`` and restart from the leading ``b`` Ritz vectors
until the ``k`` wanted pairs have residuals ``‖F̂y − θy‖ ≤ tol · max|θ|``. "Largest" means
algebraically largest, so indefinite operators are handled (not largest in magnitude, the
usual default of ARPACK). Pure torch: runs on CPU and CUDA, with every product batched.

References:
    Musco & Musco, *Randomized block Krylov methods for stronger and faster approximate
    singular value decomposition*, NeurIPS 2015; Saad, *Numerical Methods for Large
    Eigenvalue Problems* (2011), ch. 6 (block Krylov, Rayleigh–Ritz).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TopEigen:
    """Top ``k`` Ritz values (descending), their residual norms and the products used."""

    values: Tensor
    residuals: Tensor
    products: int
    converged: bool


def _orthonormalize(block: Tensor, basis: list[Tensor]) -> Tensor:
    for _ in range(2):  # block Gram–Schmidt twice: full reorthogonalization
        for q in basis:
            block = block - (block @ q.T) @ q
    q, r = torch.linalg.qr(block.T)
    # Drop directions that vanished (the Krylov space became invariant).
    keep = r.diagonal().abs() > 1e3 * torch.finfo(block.dtype).eps * r.diagonal().abs().max().clamp_min(1e-300)
    return q.T[keep]


def top_eigenvalues(
    matmat: Callable[[Tensor], Tensor],
    p: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device | str,
    tol: float = 1e-10,
    extra: int | None = None,
    depth: int = 3,
    max_restarts: int = 50,
    seed: int = 0,
) -> TopEigen:
    """The ``k`` algebraically largest eigenvalues of a symmetric ``p × p`` operator.

    Args:
        matmat: maps a block of row vectors ``(b, p)`` to their images ``(b, p)``.
        tol: residual tolerance relative to the largest Ritz value in magnitude.
        extra: oversampling (default ``max(8, k // 4)``).
        depth: Krylov blocks per restart.
    """
    extra = max(8, k // 4) if extra is None else extra
    b = min(k + extra, p)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = _orthonormalize(torch.randn(b, p, generator=gen, dtype=dtype, device=device), [])
    products = 0
    values = residuals = None
    for restart in range(max_restarts + 1):
        basis, images = [x], []
        invariant = False
        for d in range(depth + 1):
            images.append(matmat(basis[-1]))
            products += basis[-1].shape[0]
            invariant = sum(q.shape[0] for q in basis) >= p
            if d == depth or invariant:
                break
            nxt = _orthonormalize(images[-1], basis)
            invariant = nxt.shape[0] == 0  # F̂ maps the basis into itself: Ritz values are exact
            if invariant:
                break
            basis.append(nxt)
        q, fq = torch.cat(basis), torch.cat(images)
        h = q @ fq.T
        theta, w = torch.linalg.eigh((h + h.T) / 2)
        theta, w = theta.flip(0), w.flip(1)
        ritz = w.T @ q
        res = torch.linalg.vector_norm(w.T @ fq - theta[:, None] * ritz, dim=1)
        kk = min(k, theta.shape[0])
        values, residuals = theta[:kk], res[:kk]
        scale = theta.abs().max().clamp_min(torch.finfo(dtype).tiny)
        converged = invariant or bool((residuals <= tol * scale).all())
        if converged or restart == max_restarts:
            return TopEigen(values, residuals, products, converged)
        x = ritz[: min(b, ritz.shape[0])]
    raise AssertionError("the restart loop always returns")
